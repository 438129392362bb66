"""What the offline wheelhouse holds: DeepSpeed and holefill's GPU path, minus what the GPU host image has.

Walks the requirements (``Requires-Dist``, markers evaluated for the target Python on Linux x86_64) of the
GPU path's distributions as installed in *this* interpreter's environment (the tested versions), starting from
DeepSpeed and the pyproject requirements the GPU check imports. A distribution the host image holds
(``infra/gpu/host_packages.txt``, or a requirement of one of those, e.g. torch's typing-extensions) is neither
packed nor walked into: the host provides it with its own requirements. Prints the wheels to pack as
``name==version`` (DeepSpeed first) and writes what the wheelhouse assumes the host has, with the
specifiers and who needs it, for ``offline_install.py`` to check before installing.

    python infra/gpu/wheelhouse_plan.py --target-python 3.12 --host-requirements OUT/host-requirements.txt \
        --wheel OUT/deepspeed-0.19.8-py3-none-any.whl
    WHEELHOUSE_ADD="numpy nvidia-ml-py" ...   # pack these although the host list names them
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.markers import Marker
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
HOST_PACKAGES = REPO / "infra" / "gpu" / "host_packages.txt"
# The distributions the GPU check (bench/gpu_check.py, tests/gpu) imports, by their pyproject names; their
# specifiers come from pyproject.toml. Ray, MLflow, s3fs, scipy... are not on that path (the Ray Train GPU test
# skips without Ray; DeepSpeed imports MLflow only if it is there).
GPU_PATH = ("deepspeed", "torch", "pydantic", "webdataset", "pyyaml", "fsspec", "numpy", "pillow", "psutil",
            "pytest", "pytest-timeout")
# Upper bounds in pyproject.toml that exist for the CPU suite only, not for tests/gpu: pytest's ``<9.2`` keeps
# pytest-xdist's ``--dist loadgroup`` working in ``make test``; tests/gpu runs without xdist, on whatever pytest the
# GPU host image has (not known in advance), so the host is asked for pytest's floor only.
CPU_SUITE_CAPS = ("pytest",)


def gpu_path_requirement(req: Requirement) -> Requirement:
    """``req`` as the GPU check needs it: without the upper bounds of :data:`CPU_SUITE_CAPS`."""
    if canonical(req.name) not in CPU_SUITE_CAPS:
        return req
    floor = Requirement(str(req))
    floor.specifier = SpecifierSet(",".join(str(s) for s in req.specifier if s.operator not in ("<", "<=")))
    return floor


def canonical(name: str) -> str:
    """PEP 503 name: ``PyYAML`` and ``pyyaml``, ``py_cpuinfo`` and ``py-cpuinfo`` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_host_packages(path: Path = HOST_PACKAGES) -> dict[str, Requirement]:
    """The host image's packages (comments and blank lines skipped), by canonical name."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {canonical(req.name): req for req in map(Requirement, filter(None, lines))}


def pyproject_requirements() -> dict[str, Requirement]:
    """Every requirement of pyproject.toml (dependencies and extras), by canonical name."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return {canonical(req.name): req for req in map(Requirement, specs)}


def target_environment(python: str) -> dict[str, str]:
    """Marker environment of CPython ``python`` (e.g. ``3.12``) on Linux x86_64."""
    return {"python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
            "os_name": "posix", "platform_machine": "x86_64", "extra": ""}


# Requirements read from built wheels (DeepSpeed's CUDA wheel requires nvidia-ml-py; a CPU install does not).
WHEEL_REQUIRES: dict[str, list[str]] = {}


def read_wheel_requires(wheel: Path) -> None:
    """Use ``wheel``'s own ``Requires-Dist`` for its distribution instead of the installed one's."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode()
    distribution = canonical(re.search(r"^Name: (.+)$", text, re.M).group(1).strip())
    WHEEL_REQUIRES[distribution] = re.findall(r"^Requires-Dist: (.+)$", text, re.M)


def requirements_of(name: str, environment: dict[str, str]) -> list[Requirement]:
    """The distribution's requirements that apply to ``environment`` (extras excluded)."""
    found = []
    lines = WHEEL_REQUIRES[name] if name in WHEEL_REQUIRES else metadata.requires(name)
    for line in lines or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(environment):
            found.append(req)
    return found


def host_closure(host: dict[str, Requirement], environment: dict[str, str]) -> set[str]:
    """The host packages and everything they require (as far as this environment has them installed)."""
    seen, todo = set(), list(host)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [canonical(req.name) for req in requirements_of(name, environment)]
        except metadata.PackageNotFoundError:
            pass  # not installed here (e.g. nvidia-ml-py's own requirements): the host has it anyway
    return seen


def plan(target_python: str, add: set[str]) -> tuple[list[str], dict[str, tuple[Requirement, set[str]]]]:
    """(wheels to pack as ``name==version``, host requirements: name -> (merged requirement, needed by))."""
    environment = target_environment(target_python)
    on_host = host_closure({k: v for k, v in read_host_packages().items() if k not in add}, environment) - add
    project = pyproject_requirements()
    pack: dict[str, str] = {}
    assumed: dict[str, list[Requirement]] = defaultdict(list)
    needed_by: dict[str, set[str]] = defaultdict(set)
    todo = [(gpu_path_requirement(project[name]), "holefill") for name in GPU_PATH]
    while todo:
        req, parent = todo.pop(0)
        name = canonical(req.name)
        if name in on_host:
            assumed[name].append(req)
            needed_by[name].add(parent)
            continue
        if name in pack:
            continue
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"wheelhouse: {name} (needed by {parent}) is not installed in {sys.executable}")
        pack[name] = f"{name}=={version}"
        todo += [(child, name) for child in requirements_of(name, environment)]
    host = {}
    for name, reqs in assumed.items():
        merged = Requirement(name)
        merged.specifier = reqs[0].specifier
        for req in reqs[1:]:
            merged.specifier &= req.specifier
        host[name] = (merged, needed_by[name])
    wheels = [pack.pop("deepspeed")] + sorted(pack.values())
    return wheels, host


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-python", default="3.12")
    parser.add_argument("--host-requirements", type=Path, required=True, help="where to write the host's list")
    parser.add_argument("--add", default="", help="names to pack although the host list has them")
    parser.add_argument("--wheel", type=Path, action="append", default=[], help="a built wheel to read requires from")
    args = parser.parse_args(argv)
    for wheel in args.wheel:
        read_wheel_requires(wheel)
    add = {canonical(name) for name in args.add.split()}
    wheels, host = plan(args.target_python, add)
    lines = [f"# What this wheelhouse assumes the GPU host's python{args.target_python} already has "
             "(infra/gpu/offline_install.py checks it before installing)."]
    lines += [f"{req}  # {', '.join(sorted(by))}" for _, (req, by) in sorted(host.items())]
    args.host_requirements.write_text("\n".join(lines) + "\n")
    print("\n".join(wheels))


if __name__ == "__main__":
    main()
