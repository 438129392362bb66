"""The whole holefill pipeline on one machine, in a few minutes on a laptop-class CPU (`make demo`).

    python jobs/demo.py                   # local stack: Ray head (dashboard :8265) + MLflow server (:5000)
    python jobs/demo.py --embedded        # no servers: embedded Ray, MLflow in a local SQLite file

Steps, each one the same job a user runs by hand (see README "Lifecycle"):
  1. start the local stack (infra/local/stack.py), left running so the MLflow UI can be browsed afterwards
  2. generate a small Places-like dataset (real JPEGs, Places365 layout and file lists)
  3. shard it: training shards, and the pinned bucket-balanced eval set (jobs/shard_places2.py)
  4. train RN and LBAM briefly on 2 CPU workers with DeepSpeed; each registers its generator (jobs/train_*.py)
  5. promote each registered version through the gate to `champion` (jobs/promote.py)
  6. inpaint a validation image with `models:/lbam@champion` (jobs/inpaint.py), and draw the comparison picture
     `demo_comparison.png`: input with its hole | RN champion | LBAM champion | truth, each model captioned
     with the steps it trained (a few steps make a blurry, greyish fill: the picture says so, not hides it)
Then it prints where to look and how long each step took. Re-running reuses the stack, data and shards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from infra.local.stack import LocalStack
from jobs import inpaint as inpaint_job
from jobs import promote as promote_job
from jobs import shard_places2 as shard_job
from models.inpaint import inpaint_tensor
from pipeline.data.manifest import load_manifest
from pipeline.data.sample_data import generate_sample_dataset, load_sample_dataset
from pipeline.joblog import setup_job_logging
from pipeline.lifecycle.inference import load_image, load_mask, load_model_ref
from pipeline.lifecycle.training import train_and_register
from pipeline.pictures import captioned_row, show_hole
from pipeline.train.config import load_train_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"


class StepTimer:
    """Times the demo's steps so the summary can show each one's share of the total."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"\n=== {name}", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start
            print(f"=== {name}: {self.seconds[name]:.1f} s", flush=True)

    def table(self) -> str:
        total = sum(self.seconds.values()) or 1.0
        rows = [f"  {name:<56} {sec:7.1f} s  {100 * sec / total:5.1f} %" for name, sec in self.seconds.items()]
        return "\n".join([*rows, f"  {'total':<56} {total:7.1f} s"])


def _check(status: int, what: str) -> None:
    if status != 0:
        raise SystemExit(f"demo: {what} failed (exit status {status}); see the log above")


def _shard(source: str, root: str, out: str, extra: list[str]) -> str:
    manifest = Path(out) / "manifest.json"
    _check(shard_job.main(["--source", source, "--root", root, "--out", out, *extra]), f"sharding into {out}")
    return str(manifest)


def _train(arch: str, train_manifest: str, eval_manifest: str, work: Path, steps: int,
           tracking_uri: str) -> tuple[str, int]:
    """Train ``arch`` briefly and register it; ``(registered version, steps trained)``."""
    config = load_train_config(CONFIGS / f"train_{arch}_cpu_tiny.yaml", updates={
        "data": {"train_manifest": train_manifest, "eval_manifest": eval_manifest},
        "train": {"max_steps": steps, "ckpt_every": steps, "val_every": steps, "image_every": steps},
        "run": {"name": f"demo-{arch}-{int(time.time())}", "storage_path": str(work / "ray_results")},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "holefill-demo"},
    })
    result = train_and_register(config)
    return str(result.model_version), result.final_step


def comparison_picture(image, mask, outputs: list[tuple[str, int, object]]):
    """``input with its hole | each model's output | truth`` as one captioned HWC ``uint8`` picture.

    ``image`` (1,3,H,W) in [0,1] is the truth, ``mask`` (1,1,H,W) has 1 = hole (shown white in the input),
    ``outputs`` are ``(model name, steps trained, (1,3,H,W) output)``.
    """
    holed = show_hole(image, mask)
    tiles = [("input + hole", holed)]
    tiles += [(f"{name} after {steps} steps", output) for name, steps, output in outputs]
    tiles.append(("truth", image))
    return captioned_row(tiles)


def _draw_comparison(image_path: str, mask_path: Path, steps: dict[str, int], tracking_uri: str, out: Path) -> None:
    from PIL import Image

    image = load_image(image_path)
    mask = load_mask(mask_path, *image.shape[-2:])
    outputs = []
    for arch in steps:
        generator, _ = load_model_ref(f"models:/{arch}@champion", tracking_uri)
        outputs.append((arch.upper(), steps[arch], inpaint_tensor(generator, arch, image, mask)))
    Image.fromarray(comparison_picture(image, mask, outputs)).save(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(REPO / ".holefill-local" / "demo"), help="folder for data and runs")
    parser.add_argument("--embedded", action="store_true", help="no servers: embedded Ray and a SQLite MLflow store")
    parser.add_argument("--train-images", type=int, default=48)
    parser.add_argument("--val-images", type=int, default=36)
    parser.add_argument("--rn-steps", type=int, default=4)
    parser.add_argument("--lbam-steps", type=int, default=2)
    args = parser.parse_args(argv)
    setup_job_logging("demo")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    timer = StepTimer()
    print(f"holefill demo in {work}")

    with timer.step("1. start local stack (Ray head + MLflow server)"):
        if args.embedded:
            tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
            ui = f"mlflow ui --backend-store-uri {tracking_uri}  (then http://127.0.0.1:5000)"
            print("embedded mode: no servers; Ray starts inside this process")
        else:
            stack = LocalStack(state_dir=str(REPO / ".holefill-local"))
            status = stack.start()
            print(status.report())
            # The jobs below join this cluster (with its token) and log to this server, as `ray job submit` jobs
            # would: the exports the stack printed. Ray reads its authentication settings once, when it is
            # imported, so without them in this process's environment the rest runs in a process started with them.
            client_env = status.client_env()
            if any(os.environ.get(key) != value for key, value in client_env.items()) or "RAY_AUTH_TOKEN" in os.environ:
                env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_TOKEN"}  # it beats the file
                print("demo: continuing with the stack's exports in the environment", flush=True)
                sys.stderr.flush()
                os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()),
                                           *(sys.argv[1:] if argv is None else argv)], {**env, **client_env})
            tracking_uri = ui = stack.mlflow_uri
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri

    with timer.step("2. generate the sample dataset"):
        sample_root = work / "sample"
        if (sample_root / "places365_train_standard.txt").exists():
            dataset = load_sample_dataset(str(sample_root))
        else:
            dataset = generate_sample_dataset(str(sample_root), n_train=args.train_images, n_val=args.val_images, seed=0)
        print(f"{len(dataset.train_files)} train and {len(dataset.val_files)} val images under {sample_root}")

    with timer.step("3. shard: training set and pinned eval set"):
        train_manifest = _shard(str(sample_root / "places365_train_standard.txt"), str(sample_root / "data_large"),
                                str(work / "shards" / "train-v1"), ["--samples-per-shard", "16"])
        eval_manifest = _shard(str(sample_root / "places365_val.txt"), str(sample_root / "val_large"),
                               str(work / "shards" / "eval-v1"),
                               ["--eval", "--masks", "lama_thick_256", "--samples-per-shard", "16",
                                "--set", "eval.per_bucket=2"])
        for url in (train_manifest, eval_manifest):
            manifest = load_manifest(url)
            print(f"{url}: {manifest.total_samples} samples in {len(manifest.shards)} shards, "
                  f"{len(manifest.rejected)} rejected")

    versions, steps = {}, {}
    with timer.step(f"4a. train RN ({args.rn_steps} steps, 2 CPU workers, DeepSpeed)"):
        versions["rn"], steps["rn"] = _train("rn", train_manifest, eval_manifest, work, args.rn_steps, tracking_uri)
    with timer.step(f"4b. train LBAM ({args.lbam_steps} steps, 2 CPU workers, DeepSpeed)"):
        versions["lbam"], steps["lbam"] = _train("lbam", train_manifest, eval_manifest, work, args.lbam_steps,
                                                 tracking_uri)

    with timer.step("5. promote through the gate"):
        for name, version in versions.items():
            _check(promote_job.main(["--model", name, "--challenger", version, "--eval-manifest", eval_manifest,
                                     "--set", f"tracking_uri={json.dumps(tracking_uri)}"]), f"promoting {name}")

    with timer.step("6. inpaint a validation image with models:/lbam@champion; draw the comparison"):
        image = dataset.val_path(dataset.val_files[0])
        out = work / "inpainted.png"
        _check(inpaint_job.main(["--model", "models:/lbam@champion", "--image", image, "--out", str(out),
                                 "--set", f"tracking_uri={json.dumps(tracking_uri)}"]), "inpainting")
        picture = work / "demo_comparison.png"
        # The same hole the inpaint job drew (it writes its generated mask beside the output).
        _draw_comparison(image, out.with_name(out.stem + ".mask.png"), steps, tracking_uri, picture)

    print("\n=== holefill demo finished\n" + timer.table())
    print(f"\nMLflow UI:        {ui}   (experiments holefill-demo, models rn and lbam, alias champion)")
    if not args.embedded:
        print(f"Ray dashboard:    {stack.dashboard_url}")
        print("Stop the stack:   .venv/bin/python infra/local/stack.py stop")
    print(f"Inpainted image:  {out}  (input {image})")
    print(f"Comparison:       {picture}  (input + hole | RN | LBAM | truth; "
          f"{steps['rn']} and {steps['lbam']} training steps, so the fills are rough)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
