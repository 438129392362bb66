"""Deployment material stays consistent with the repository: every manifest parses, has the fields its
consumer (KubeRay, the Ray cluster launcher, cron, systemd, the MLflow CLI) requires, and every
script, config and path it names exists here."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
# Where the repository sits on the machines the manifests describe (image, launcher nodes, cron host).
DEPLOYED_ROOTS = ("/opt/holefill/", "/home/ubuntu/holefill/")
# A repository path inside a command or value: jobs/..., infra/..., possibly under a deployed root.
REPO_PATH = re.compile(r"(?:^|(?<=[\s'\"=:(]))(?:/opt/holefill/|/home/ubuntu/holefill/)?"
                       r"((?:jobs|infra|pipeline|models|tests|bench)/[\w./-]*[\w])")
KUBERAY_KINDS = {"RayJob", "RayCronJob", "RayCluster"}
# The KubeRay release the manifests are written for, and its CRD fields as read from that release (the file says where).
KUBERAY_VERSION = "1.7.0"
KUBERAY = json.loads((REPO / "tests" / "data" / f"kuberay_{KUBERAY_VERSION}_fields.json").read_text())
OPERATOR_VALUES = INFRA / "k8s" / "kuberay-operator-values.yaml"
REQUIRED_REFERENCES = {"jobs/train_lbam.py", "jobs/retrain.py", "jobs/configs/train_lbam.yaml",
                       "jobs/configs/retrain.yaml"}
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def yaml_files() -> list[Path]:
    return sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml"), REPO / "ray_cluster.yaml"])


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strings_in(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings_in(key)
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


def kuberay_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in yaml_files() for doc in load_docs(path)
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/")]


def crontab_entries() -> list[tuple[str, str]]:
    """(schedule, command) of every job line in infra/cron/*.crontab."""
    entries = []
    for path in sorted((INFRA / "cron").glob("*.crontab")):
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#") or re.match(r"^[A-Z_]+=", line):
                continue
            fields = line.split(None, 5)
            assert len(fields) == 6, f"{path.name}: not 'm h dom mon dow command': {line}"
            entries.append((" ".join(fields[:5]), fields[5]))
    return entries


def referenced_repo_paths() -> dict[str, str]:
    """Every repository path named by a manifest, crontab or unit file -> where it was named."""
    texts: list[tuple[str, str]] = []
    for path in yaml_files():
        texts += [(str(path.relative_to(REPO)), s) for doc in load_docs(path) for s in strings_in(doc)]
    texts += [("crontab", command) for _, command in crontab_entries()]
    for path in [*INFRA.rglob("*.service"), *INFRA.rglob("Dockerfile")]:
        texts += [(str(path.relative_to(REPO)), line) for line in path.read_text().splitlines()
                  if not line.lstrip().startswith("#")]
    found: dict[str, str] = {}
    for where, text in texts:
        for match in REPO_PATH.finditer(text):
            found.setdefault(match.group(1), where)
    return found


def command_words(text: str) -> list[str]:
    return shlex.split(text.replace("\\%", "%"))


def assert_valid_schedule(schedule: str) -> None:
    fields = schedule.split()
    assert len(fields) == 5, f"schedule {schedule!r} must have 5 fields"
    assert all(CRON_FIELD.match(f) for f in fields), f"schedule {schedule!r} has an invalid field"


# -- every file ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses_into_mappings(path):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in docs)


def test_every_referenced_repository_path_exists():
    references = referenced_repo_paths()
    assert REQUIRED_REFERENCES <= set(references), f"not referenced: {REQUIRED_REFERENCES - set(references)}"
    missing = {ref: where for ref, where in references.items() if not (REPO / ref).exists()}
    assert not missing, f"referenced but not in the repository: {missing}"


def test_config_overrides_name_keys_their_config_file_has():
    commands = [doc["spec"].get("entrypoint") or doc["spec"]["jobTemplate"]["entrypoint"]
                for _, doc in kuberay_docs() if doc["kind"] in ("RayJob", "RayCronJob")]
    commands += [command for _, command in crontab_entries()]
    checked = 0
    for command in commands:
        words = command_words(command)
        if "--config" not in words:
            continue
        config_path = REPO / REPO_PATH.search(words[words.index("--config") + 1]).group(1)
        if not config_path.exists():
            continue  # reported by test_every_referenced_repository_path_exists
        config = yaml.safe_load(config_path.read_text())
        for i, word in enumerate(words):
            if word != "--set":
                continue
            keys = words[i + 1].split("=", 1)[0].split(".")
            node = config
            for key in keys:
                assert isinstance(node, dict) and key in node, f"--set {words[i + 1]}: no such key in {config_path.name}"
                node = node[key]
            checked += 1
    assert checked > 0


def test_shell_scripts_parse():
    scripts = sorted(INFRA.rglob("*.sh"))
    assert scripts
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


# -- KubeRay ---------------------------------------------------------------------------------------------


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    assert head["template"]["spec"]["containers"][0]["image"], where
    assert spec["workerGroupSpecs"], f"{where}: no worker group"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"], where
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{where}: {group['groupName']}"
        assert group["template"]["spec"]["containers"][0]["image"], where


def check_ray_job_spec(spec: dict, where: str) -> None:
    assert spec["entrypoint"].startswith("python "), where
    check_ray_cluster_spec(spec["rayClusterSpec"], where)


def crd_field_errors(node: Any, object_name: str, where: str) -> list[str]:
    """Fields of ``node`` that the stated KubeRay version's CRD does not have, lacks, or has only as deprecated."""
    spec = KUBERAY["objects"][object_name]
    if not isinstance(node, dict):
        return [f"{where}: {object_name} must be a mapping"]
    errors = [f"{where}.{key}: no such field in KubeRay {KUBERAY_VERSION}'s {object_name}"
              for key in node if key not in spec["fields"]]
    errors += [f"{where}.{key}: required by {object_name}" for key in spec["required"] if key not in node]
    errors += [f"{where}.{key}: deprecated in KubeRay {KUBERAY_VERSION}" for key in spec.get("deprecated", ()) if key in node]
    for key, value in node.items():
        enum = KUBERAY["enums"].get(f"{object_name}.{key}")
        if enum is not None and value not in enum:
            errors.append(f"{where}.{key}: {value!r} is not one of {enum}")
    for key, child in spec.get("children", {}).items():
        if key not in node:
            continue
        if child.endswith("[]"):
            items = node[key] if isinstance(node[key], list) else [None]
            for i, item in enumerate(items):
                errors += crd_field_errors(item, child[:-2], f"{where}.{key}[{i}]")
        else:
            errors += crd_field_errors(node[key], child, f"{where}.{key}")
    return errors


def job_specs() -> list[tuple[str, dict, dict]]:
    """(where, RayJob spec, the document) of every RayJob and every RayCronJob's job template."""
    found = []
    for path, doc in kuberay_docs():
        where = f"{path.name}:{doc['metadata']['name']}"
        if doc["kind"] == "RayJob":
            found.append((where, doc["spec"], doc))
        elif doc["kind"] == "RayCronJob":
            found.append((f"{where}.jobTemplate", doc["spec"]["jobTemplate"], doc))
    return found


def ray_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_kuberay_manifests_have_the_fields_kuberay_requires():
    docs = kuberay_docs()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"RayJob", "RayCronJob"} <= kinds
    for path, doc in docs:
        where = f"{path.name}:{doc.get('metadata', {}).get('name')}"
        assert doc["apiVersion"] == "ray.io/v1", where
        assert doc["kind"] in KUBERAY_KINDS, where
        assert doc["metadata"]["name"], where
        if doc["kind"] == "RayJob":
            check_ray_job_spec(doc["spec"], where)
        elif doc["kind"] == "RayCronJob":
            assert_valid_schedule(doc["spec"]["schedule"])
            check_ray_job_spec(doc["spec"]["jobTemplate"], where)
        else:
            check_ray_cluster_spec(doc["spec"], where)


def test_kuberay_manifests_use_only_fields_of_the_stated_kuberay_version():
    errors = []
    for path, doc in kuberay_docs():
        where = f"{path.name}:{doc['kind']}"
        errors += [f"{where}.{key}: not a top-level field" for key in doc if key not in ("apiVersion", "kind", "metadata", "spec")]
        errors += crd_field_errors(doc["spec"], KUBERAY["kinds"][doc["kind"]], f"{where}.spec")
    assert not errors, "\n".join(errors)


def test_the_crd_field_check_fails_on_unknown_missing_and_deprecated_fields():
    _, spec, _ = next(found for found in job_specs() if "retrain" in found[0])
    cron = {"schedule": "17 3 * * *", "concurrencyPolicy": "Forbid", "jobTemplate": spec}
    assert crd_field_errors(cron, "RayCronJobSpec", "x") == ["x.concurrencyPolicy: no such field in KubeRay 1.7.0's RayCronJobSpec"]
    assert crd_field_errors({"jobTemplate": spec}, "RayCronJobSpec", "x") == ["x.schedule: required by RayCronJobSpec"]
    legacy = {**spec, "deletionStrategy": {"onSuccess": {"policy": "DeleteCluster"}, "onFailure": {"policy": "DeleteNone"}}}
    assert "x.deletionStrategy.onSuccess: deprecated in KubeRay 1.7.0" in crd_field_errors(legacy, "RayJobSpec", "x")
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    nested = {**spec, "rayClusterSpec": {**spec["rayClusterSpec"], "workerGroupSpecs": [{**group, "gpus": 8}]}}
    assert crd_field_errors(nested, "RayJobSpec", "x") == [
        "x.rayClusterSpec.workerGroupSpecs[0].gpus: no such field in KubeRay 1.7.0's WorkerGroupSpec"]
    bad_status = {**spec, "deletionStrategy": {"deletionRules": [{"policy": "DeleteCluster", "condition": {"jobStatus": "STOPPED"}}]}}
    assert crd_field_errors(bad_status, "RayJobSpec", "x") == [
        "x.deletionStrategy.deletionRules[0].condition.jobStatus: 'STOPPED' is not one of ['SUCCEEDED', 'FAILED']"]


def test_every_rayjob_is_bounded_in_time_and_deleted_by_deletion_rules_however_it_ends():
    for where, spec, doc in job_specs():
        assert spec.get("activeDeadlineSeconds", 0) > 0, f"{where}: no activeDeadlineSeconds"
        assert 0 < spec.get("preRunningDeadlineSeconds", 0) < spec["activeDeadlineSeconds"], f"{where}: preRunningDeadlineSeconds"
        # KubeRay 1.7 refuses deletionRules beside shutdownAfterJobFinishes (and so beside ttlSecondsAfterFinished).
        assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec, where
        rules = spec["deletionStrategy"]["deletionRules"]
        by_condition: dict[tuple[str, str], dict[str, int]] = {}
        for rule in rules:
            condition = rule["condition"]
            keys = [k for k in ("jobStatus", "jobDeploymentStatus") if k in condition]
            assert len(keys) == 1, f"{where}: a condition names exactly one of jobStatus, jobDeploymentStatus: {rule}"
            policies = by_condition.setdefault((keys[0], condition[keys[0]]), {})
            assert rule["policy"] not in policies, f"{where}: duplicate rule {rule}"
            policies[rule["policy"]] = condition.get("ttlSeconds", 0)
            if spec["rayClusterSpec"].get("enableInTreeAutoscaling"):
                assert rule["policy"] != "DeleteWorkers", f"{where}: KubeRay refuses DeleteWorkers with autoscaling"
        # the cluster goes whether the job succeeded, failed, or never ran (deadline, submission failure)
        for condition in (("jobStatus", "SUCCEEDED"), ("jobStatus", "FAILED"), ("jobDeploymentStatus", "Failed")):
            policies = by_condition.get(condition, {})
            assert {"DeleteCluster", "DeleteSelf"} & set(policies), f"{where}: nothing deletes the cluster on {condition}"
            ttls = [policies[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in policies]
            assert ttls == sorted(ttls), f"{where}: KubeRay requires ttl DeleteWorkers <= DeleteCluster <= DeleteSelf"
            if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for g in spec["rayClusterSpec"]["workerGroupSpecs"]
                   for c in g["template"]["spec"]["containers"]):
                assert policies.get("DeleteWorkers") == 0, f"{where}: GPU pods must go as soon as the job ends"


def test_the_nightly_raycronjob_runs_in_utc_and_ends_before_the_next_night():
    crons = [doc for _, doc in kuberay_docs() if doc["kind"] == "RayCronJob"]
    assert crons
    for doc in crons:
        spec = doc["spec"]
        assert spec["timeZone"] == "UTC"
        minute, hour, *rest = spec["schedule"].split()
        assert rest == ["*", "*", "*"] and minute.isdigit() and hour.isdigit(), "a once-a-day schedule"
        # RayCronJob has no concurrencyPolicy: the job's own deadline keeps two nights' clusters apart.
        template = spec["jobTemplate"]
        assert template["activeDeadlineSeconds"] + max(
            r["condition"].get("ttlSeconds", 0) for r in template["deletionStrategy"]["deletionRules"]
            if r["policy"] == "DeleteWorkers") < 24 * 3600


def test_ray_clusters_use_token_auth_and_expose_nothing_outside_kubernetes():
    for where, spec, _ in job_specs():
        cluster = spec["rayClusterSpec"]
        auth = cluster.get("authOptions", {})
        assert auth.get("mode") == "token", f"{where}: Ray token authentication is off"
        assert not auth.get("enableK8sTokenAuth"), f"{where}: KubeRay {KUBERAY_VERSION} refuses K8s token auth for RayJobs"
        assert ray_version(cluster["rayVersion"]) >= ray_version(KUBERAY["min_ray_version_for_token_auth"]), where
        head = cluster["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the head Service is reachable from outside"
        assert not head.get("enableIngress"), f"{where}: an unauthenticated ingress to the dashboard"


def test_the_operator_values_turn_on_the_raycronjob_gate_and_keep_the_rest_at_their_defaults():
    (values,) = load_docs(OPERATOR_VALUES)
    gates = {gate["name"]: gate["enabled"] for gate in values["featureGates"]}
    defaults = KUBERAY["feature_gates"]
    assert set(gates) <= set(defaults), f"not feature gates of KubeRay {KUBERAY_VERSION}: {set(gates) - set(defaults)}"
    assert defaults["RayCronJob"] is False and gates["RayCronJob"] is True
    assert gates["RayJobDeletionPolicy"] is True, "deletionRules need it"
    assert {name: on for name, on in gates.items() if on != defaults[name]} == {"RayCronJob": True}
    readme = (INFRA / "README.md").read_text()
    assert f"KubeRay {KUBERAY_VERSION}" in readme and "RayCronJob" in readme and OPERATOR_VALUES.name in readme
    cron_text = (INFRA / "k8s" / "raycronjob-retrain.yaml").read_text()
    assert "feature gate RayCronJob" in cron_text and OPERATOR_VALUES.name in cron_text


def test_training_rayjob_runs_on_gpu_workers_and_retraining_is_scheduled():
    docs = [doc for _, doc in kuberay_docs()]
    train = [d for d in docs if d["kind"] == "RayJob" and "jobs/train_" in d["spec"]["entrypoint"]]
    assert train, "no RayJob runs a training script"
    for doc in train:
        groups = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        limits = [c["resources"]["limits"] for g in groups for c in g["template"]["spec"]["containers"]]
        assert any(int(limit.get("nvidia.com/gpu", 0)) >= 1 for limit in limits)
    cron = [d for d in docs if d["kind"] == "RayCronJob"]
    assert any("jobs/retrain.py" in d["spec"]["jobTemplate"]["entrypoint"] for d in cron)


# -- Ray cluster launcher ----------------------------------------------------------------------------------


def test_cluster_launcher_has_cpu_head_and_gpu_workers_that_install_holefill():
    (config,) = load_docs(REPO / "ray_cluster.yaml")
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                "file_mounts", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, key
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"], "the head is a CPU node"
    gpu_workers = [t for name, t in types.items()
                   if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers, "no GPU worker type"
    for name, node_type in types.items():
        assert node_type["node_config"]["InstanceType"], name
        if name != config["head_node_type"]:
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name

    # The repository is mounted, then installed (editable) from where it was mounted.
    mount_target = next(target for target, source in config["file_mounts"].items() if source == ".")
    setup = "\n".join(config["setup_commands"])
    assert re.search(rf"pip install .*-e \"?{re.escape(mount_target)}", setup)
    for variable in ("MLFLOW_TRACKING_URI", "AWS_DEFAULT_REGION"):
        assert f"export {variable}=" in setup, variable
    assert all("ray start" in " ".join(config[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))


# -- cron -----------------------------------------------------------------------------------------------------


def test_crontab_submits_retrain_through_ray_job_submit():
    entries = crontab_entries()
    assert entries
    for schedule, command in entries:
        assert_valid_schedule(schedule)
        assert not re.search(r"(?<!\\)%", command), "cron turns an unescaped % into a newline"
        words = command_words(command)
        assert words[words.index("job") - 1].endswith("ray") and words[words.index("job") + 1] == "submit"
        assert words[words.index("--address") + 1].startswith("http://")
        entrypoint = words[words.index("--") + 1:]
        assert entrypoint[:2] == ["python", "jobs/retrain.py"]
        assert (REPO / entrypoint[entrypoint.index("--config") + 1]).exists()


# -- production MLflow --------------------------------------------------------------------------------------------


def mlflow_server_args() -> list[str]:
    text = (INFRA / "mlflow" / "server.sh").read_text()
    return re.findall(r"^\s*(--[a-z-]+)", text, flags=re.MULTILINE)


def test_production_mlflow_listens_on_loopback_unless_mlflow_basic_auth_is_on(tmp_path):
    env = dict(line.split("=", 1) for line in (INFRA / "mlflow" / "mlflow.env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["MLFLOW_HOST"] == "127.0.0.1" and env["MLFLOW_AUTH"] == "none"

    def run(**settings: str) -> subprocess.CompletedProcess:
        base = {"PATH": "/usr/bin:/bin", "MLFLOW_BIN": "echo", "MLFLOW_BACKEND_STORE_URI": "postgresql://u@h/db",
                "MLFLOW_ARTIFACTS_DESTINATION": "s3://b/p", "MLFLOW_ALLOWED_HOSTS": "mlflow.internal"}
        return subprocess.run(["bash", str(INFRA / "mlflow" / "server.sh")], env={**base, **settings},
                              capture_output=True, text=True, timeout=30)

    default = run()
    assert default.returncode == 0 and "--host 127.0.0.1 " in default.stdout and "--app-name" not in default.stdout
    exposed = run(MLFLOW_HOST="0.0.0.0")
    assert exposed.returncode == 2 and exposed.stderr.startswith("server.sh: MLFLOW_HOST=0.0.0.0 without authentication")
    assert run(MLFLOW_AUTH="basic-auth", MLFLOW_HOST="0.0.0.0").returncode == 2  # no auth config, no secret
    config = tmp_path / "basic_auth.ini"
    config.write_text((INFRA / "mlflow" / "basic_auth.ini.example").read_text())
    authed = run(MLFLOW_AUTH="basic-auth", MLFLOW_HOST="0.0.0.0", MLFLOW_AUTH_CONFIG_PATH=str(config),
                 MLFLOW_FLASK_SERVER_SECRET_KEY="s")
    assert authed.returncode == 0 and "--app-name basic-auth" in authed.stdout and "--host 0.0.0.0 " in authed.stdout
    assert run(MLFLOW_AUTH="ldap").stderr.startswith("server.sh: MLFLOW_AUTH=ldap: use none")


def test_production_mlflow_uses_postgres_proxied_s3_artifacts_and_allowed_hosts():
    server_sh = (INFRA / "mlflow" / "server.sh").read_text()
    assert re.search(r'exec "\$\{MLFLOW_BIN:-mlflow\}" server', server_sh)
    flags = mlflow_server_args()
    for flag in ("--backend-store-uri", "--artifacts-destination", "--allowed-hosts", "--host", "--port"):
        assert flag in flags, flag
    assert "--default-artifact-root" not in flags, "artifacts must be proxied, not written by clients"

    env = dict(line.split("=", 1) for line in (INFRA / "mlflow" / "mlflow.env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    required = set(re.findall(r"\$\{(\w+):\?", server_sh))
    assert required and required <= set(env), f"server.sh needs {required - set(env)}"


def test_systemd_unit_runs_the_server_script_with_the_env_file():
    unit = (INFRA / "mlflow" / "holefill-mlflow.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["EnvironmentFile"].endswith("mlflow.env")
    exec_start = settings["ExecStart"].split()[0]
    root = next(r for r in DEPLOYED_ROOTS if exec_start.startswith(r))
    script = REPO / exec_start[len(root):]
    assert script.exists() and script.stat().st_mode & 0o111, f"{script} must exist and be executable"


# -- image ------------------------------------------------------------------------------------------------------


def test_image_copies_only_what_exists_and_installs_holefill():
    dockerfile = (INFRA / "k8s" / "Dockerfile").read_text()
    copies = [line.split()[1:] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    assert copies
    for words in copies:
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert re.search(r'pip install .*-e "\.', dockerfile)
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, flags=re.MULTILINE).group(1)
    assert f"{workdir.rstrip('/')}/" in DEPLOYED_ROOTS, "manifests run scripts from the image's WORKDIR"


# -- placement: every shipped GPU job fits its cluster -------------------------------------------------------


def _set_values(entrypoint: str) -> dict[str, str]:
    tokens = shlex.split(entrypoint)
    return dict(tokens[i + 1].split("=", 1) for i, t in enumerate(tokens[:-1]) if t == "--set" and "=" in tokens[i + 1])


def _config_arg(entrypoint: str) -> Path:
    tokens = shlex.split(entrypoint)
    path = tokens[tokens.index("--config") + 1]
    for root in DEPLOYED_ROOTS:
        path = path.removeprefix(root)
    return REPO / path


def _training_workers(entrypoint: str) -> int:
    """Ray Train workers (one GPU each) the job asks for: ``--set scaling.num_workers`` or its config's."""
    overrides = _set_values(entrypoint)
    config = yaml.safe_load(_config_arg(entrypoint).read_text())
    if "train_config" in config:  # retrain.py: the fine-tune runs its train_config with train_overrides
        overrides = {**dict(o.split("=", 1) for o in config.get("train_overrides", [])), **overrides}
        config = yaml.safe_load((REPO / config["train_config"]).read_text())
    return int(overrides.get("scaling.num_workers", config["scaling"]["num_workers"]))


def _pod_gpus(group: dict) -> int:
    return max(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in group["template"]["spec"]["containers"])


def test_every_kuberay_gpu_job_fits_on_one_whole_machine_pod_and_leaves_the_head_cpu_only():
    jobs = [(doc["spec"].get("jobTemplate", doc["spec"]), f"{path.name}") for path, doc in kuberay_docs()
            if doc["kind"] in ("RayJob", "RayCronJob")]
    for spec, where in jobs:
        entry = spec["entrypoint"]
        if "jobs/train_" not in entry and "jobs/retrain.py" not in entry:
            continue
        cluster = spec["rayClusterSpec"]
        head_limits = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" not in head_limits, f"{where}: the head is CPU-only"
        pods = [_pod_gpus(g) for g in cluster["workerGroupSpecs"] for _ in range(g["maxReplicas"]) if _pod_gpus(g)]
        workers = _training_workers(entry)
        assert pods and sum(pods) >= workers, f"{where}: {workers} GPU workers, GPUs {pods}"
        # workers of one job share a machine (NVLink) unless they need more than one machine's GPUs
        assert workers <= max(pods) or workers % max(pods) == 0, f"{where}: {workers} workers over pods of {max(pods)}"
        if "jobs/retrain.py" in entry:
            assert max(pods) > workers, f"{where}: no GPU left for the champion/challenger evaluation"


def test_cluster_launcher_gpu_nodes_hold_each_shipped_training_config_on_one_machine():
    (config,) = load_docs(REPO / "ray_cluster.yaml")
    gpus_per_node = max(t["resources"].get("GPU", 0) for t in config["available_node_types"].values())
    for path in sorted((REPO / "jobs" / "configs").glob("train_*.yaml")):
        scaling = yaml.safe_load(path.read_text())["scaling"]
        if scaling["use_gpu"]:
            assert scaling["num_workers"] <= gpus_per_node, path.name
