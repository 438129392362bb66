"""It learns: train RN and LBAM on a CPU budget through the real path, then beat classical inpainting on held-out images.

    make learn                                   # = .venv/bin/python bench/convergence.py
    .venv/bin/python bench/convergence.py --only rn --set rn:train.max_steps=50     # a shorter look

Steps (each the job a user runs by hand, on the embedded default: local Ray, MLflow in a SQLite file):

1. generate the Places-like sample dataset (``pipeline.data.sample_data``): train and validation images;
2. shard it (``jobs/shard_places2.py``): the training shards, the **pinned bucket-balanced eval set of the
   validation split** (never trained on) and a small validation set of the same split for the curves;
3. train RN and LBAM (``jobs/train_rn.py`` / ``jobs/train_lbam.py``: Ray Train + DeepSpeed on 2 CPU workers,
   MLflow tracking and registration) with ``jobs/configs/train_*_cpu_learn.yaml``;
4. evaluate on the pinned eval set, per hole-ratio bucket and overall with N: the registered versions
   (loaded back from MLflow), the same networks untrained (built from the run's seed, as the job builds
   them), a mean-colour fill and OpenCV's Telea (``cv2.inpaint``); hole PSNR and hole L1 (over hole pixels
   only), and SSIM of the composited image (a windowed statistic has no hole-only form);
5. print the table side by side with each run's wall time and steps; write the learning curves (train
   losses and validation PSNR against step, both models; logged to each MLflow run) and a comparison grid
   (input with hole | Telea | RN | LBAM | truth, a few images per bucket).

Why Telea and not scikit-image's biharmonic inpainting: Telea is the classical method people reach for
(``cv2.inpaint``, OpenCV's default and the baseline of inpainting papers), it takes milliseconds per image,
and it fills large holes without a global solve; biharmonic solves a sparse system per channel whose size is
the hole (tens of seconds per large-hole image here) and needs scikit-image (+ SciPy's sparse solvers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

# Run as a script, this file's folder leads sys.path and its name would shadow the ``models`` package.
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH_DIR]
REPO = Path(_BENCH_DIR).parent

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from pipeline.buckets import BUCKET_NAMES, bucket_of  # noqa: E402

CONFIGS = REPO / "jobs" / "configs"
ARCHS = ("rn", "lbam")
LARGE_BUCKETS = BUCKET_NAMES[-3:]  # (0.3,0.4], (0.4,0.5], (0.5,0.6]: where the targets ask to beat Telea

Fill = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------ baselines


def mean_fill(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each hole filled with the mean colour of its image's valid pixels (composited; mask 1 = hole)."""
    valid = 1 - mask
    mean = (image * valid).sum(dim=(2, 3), keepdim=True) / valid.sum(dim=(2, 3), keepdim=True).clamp_min(1)
    return image * valid + mean * mask


def telea_fill(image: torch.Tensor, mask: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """OpenCV's Telea fast-marching inpainting (``cv2.inpaint``, ``radius`` px neighbourhood), composited.

    Works on uint8 RGB as OpenCV does; the result is pasted into the hole only, so known pixels stay exact.
    """
    try:
        import cv2
    except ImportError:
        raise SystemExit("bench/convergence.py needs OpenCV: pip install opencv-python-headless") from None
    outputs = []
    for index in range(image.shape[0]):
        rgb = (image[index].permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
        hole = (mask[index, 0].numpy() > 0.5).astype(np.uint8) * 255
        filled = cv2.inpaint(np.ascontiguousarray(rgb), hole, radius, cv2.INPAINT_TELEA)
        outputs.append(torch.from_numpy(filled).permute(2, 0, 1).float() / 255)
    filled = torch.stack(outputs)
    return image * (1 - mask) + filled * mask


def network_fill(generator: nn.Module, arch: str) -> Fill:
    """A generator as a fill (``models.inpaint.inpaint_tensor``: size fitting and compositing, as evaluation does)."""
    from models.inpaint import inpaint_tensor

    generator = generator.float().eval()

    @torch.no_grad()
    def fill(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return inpaint_tensor(generator, arch, image, mask)

    return fill


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass
class EvalImage:
    """One sample of the pinned eval set: (1,3,H,W) image, (1,1,H,W) mask (1 = hole), its bucket."""

    key: str
    image: torch.Tensor
    mask: torch.Tensor
    ratio: float
    bucket: str | None


def load_eval_images(eval_manifest: str, crop_size: int | None = 256, limit: int | None = None) -> list[EvalImage]:
    """Every sample of ``eval_manifest`` once (the public eval loader, centre crops), sorted by key."""
    from pipeline.data.loaders import make_eval_loader

    images = []
    for batch in make_eval_loader(eval_manifest, batch_size=1, crop_size=crop_size):
        ratio = float(batch["hole_ratio"][0])
        images.append(EvalImage(batch["key"][0], batch["image"], batch["mask"], ratio, bucket_of(ratio)))
    images.sort(key=lambda item: item.key)
    return images[:limit] if limit else images


def hole_metrics(output: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Hole PSNR and hole L1 (over hole pixels and channels only) and SSIM of the composited image, one image."""
    from pipeline.evaluation.metrics import ssim

    hole = mask.expand_as(truth) > 0.5
    diff = (output.float() - truth.float())[hole]
    mse = float(diff.pow(2).mean()) if diff.numel() else 0.0
    return {
        "psnr": 10 * math.log10(1.0 / max(mse, 1e-10)),
        "l1": float(diff.abs().mean()) if diff.numel() else 0.0,
        "ssim": float(ssim(output.float(), truth.float())[0]),
    }


@dataclass
class MethodResult:
    """Per-image metrics of one method on the eval set, and the outputs kept for the grid."""

    name: str
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self, images: Sequence[EvalImage]) -> dict[str, dict[str, float]]:
        """``{bucket or "all": {"n", "psnr", "ssim", "l1"}}`` means over the images of each bucket."""
        groups: dict[str, list[str]] = {name: [] for name in (*BUCKET_NAMES, "all")}
        for item in images:
            if item.bucket is not None:
                groups[item.bucket].append(item.key)
            groups["all"].append(item.key)
        out = {}
        for name, keys in groups.items():
            row: dict[str, float] = {"n": len(keys)}
            for metric in ("psnr", "ssim", "l1"):
                values = [self.per_image[key][metric] for key in keys]
                row[metric] = float(np.mean(values)) if values else float("nan")
            out[name] = row
        return out


def evaluate_fill(name: str, fill: Fill, images: Sequence[EvalImage], keep: set[str] = frozenset()) -> MethodResult:
    """Run ``fill`` on every eval image one at a time (an answer depends only on its own input)."""
    result = MethodResult(name)
    started = time.perf_counter()
    for item in images:
        output = fill(item.image, item.mask)
        result.per_image[item.key] = hole_metrics(output, item.image, item.mask)
        if item.key in keep:
            result.outputs[item.key] = output
    result.seconds = time.perf_counter() - started
    return result


def grid_keys(images: Sequence[EvalImage], per_bucket: int) -> list[str]:
    """The first ``per_bucket`` keys of every bucket (by key): the rows of the comparison grid."""
    keys = []
    for bucket in BUCKET_NAMES:
        keys += [item.key for item in images if item.bucket == bucket][:per_bucket]
    return keys


def format_table(results: Sequence[MethodResult], images: Sequence[EvalImage]) -> str:
    """Buckets down, methods across: hole PSNR (dB, higher is better), SSIM, hole L1 (lower is better), N."""
    summaries = [(result.name, result.summary(images)) for result in results]
    lines = []
    for metric, label, digits in (("psnr", "hole PSNR (dB), higher is better", 2), ("ssim", "SSIM (composited), "
                                  "higher is better", 4), ("l1", "hole L1, lower is better", 4)):
        lines.append(f"\n{label}")
        lines.append(f"{'hole ratio':<12}{'N':>4}" + "".join(f"{name:>16}" for name, _ in summaries))
        for bucket in (*BUCKET_NAMES, "all"):
            n = summaries[0][1][bucket]["n"]
            cells = "".join(f"{summary[bucket][metric]:>16.{digits}f}" for _, summary in summaries)
            lines.append(f"{bucket:<12}{n:>4}{cells}")
    return "\n".join(lines)


def target_report(trained: MethodResult, untrained: MethodResult, mean: MethodResult, classical: MethodResult,
                  images: Sequence[EvalImage]) -> list[str]:
    """The issue's targets for one trained model, bucket by bucket: which hold and which do not."""
    t, u, m, c = (r.summary(images) for r in (trained, untrained, mean, classical))
    lines = []

    def beats(a: dict, b: dict) -> bool:
        return a["psnr"] > b["psnr"] and a["l1"] < b["l1"]

    for bucket in (*BUCKET_NAMES, "all"):
        marks = [f"untrained {'yes' if beats(t[bucket], u[bucket]) else 'NO'}",
                 f"mean fill {'yes' if beats(t[bucket], m[bucket]) else 'NO'}",
                 f"{classical.name} {'yes' if beats(t[bucket], c[bucket]) else 'no'}"
                 + (" (target)" if bucket in (*LARGE_BUCKETS, "all") else "")]
        lines.append(f"  {trained.name} {bucket:<10} beats (PSNR and L1): " + ", ".join(marks))
    return lines


# ------------------------------------------------------------------------------------------------ the real path


def _run(what: str, job: str, argv: Sequence[str], attempts: int = 3) -> float:
    """Run ``jobs/<job>.py`` with ``argv`` as a user would; its wall time in seconds; exit on failure.

    The jobs run in this process (as ``jobs/demo.py`` runs them), so Ray starts once for all of them: on a loaded
    machine a local Ray start can time out (its raylet has 30 s to register with the GCS). A failed job is run
    again (``attempts`` in all): every job here resumes (the shard job skips finished shards, training resumes
    from its last checkpoint under the same run name). The wall time counts every attempt.
    """
    import importlib

    main = importlib.import_module(f"jobs.{job}").main
    print(f"\n=== {what}\n$ python jobs/{job}.py {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    for attempt in range(1, attempts + 1):
        try:
            status = main(list(argv))
        except Exception as exc:  # noqa: BLE001 - reported, then retried or fatal below
            print(f"=== {what}: {type(exc).__name__}: {exc}", flush=True)
            status = 1
        if status == 0:
            break
        print(f"=== {what}: attempt {attempt} of {attempts} failed (exit status {status})", flush=True)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"convergence: {what} failed (exit status {status}); see the log above")
    print(f"=== {what}: {seconds:.0f} s", flush=True)
    return seconds


def prepare_data(work: Path, train_images: int, val_images: int, per_bucket: int, curve_per_bucket: int,
                 store_size: int) -> dict[str, str]:
    """Generate the sample dataset (once) and shard it: training shards, the pinned eval set, the curves' set.

    Both eval sets come from the validation split (never trained on); the curves' set is a small one so that
    validating during training costs little of the budget. Re-running reuses what exists.
    """
    from pipeline.data.sample_data import generate_sample_dataset

    sample = work / "sample"
    if not (sample / "places365_val.txt").exists():
        print(f"generating {train_images} train and {val_images} validation images under {sample}", flush=True)
        generate_sample_dataset(str(sample), n_train=train_images, n_val=val_images, seed=0)
    shard = ["--store-size", str(store_size)]
    manifests = {"train": work / "shards" / "train", "eval": work / "shards" / "eval",
                 "curves": work / "shards" / "curves"}
    jobs = {
        "train": ["--source", str(sample / "places365_train_standard.txt"), "--root", str(sample / "data_large"),
                  "--masks", "lama_train_mix", "--samples-per-shard", "50"],
        # The demo's eval masks (thick LaMa strokes and boxes) reach every bucket up to 0.6.
        "eval": ["--source", str(sample / "places365_val.txt"), "--root", str(sample / "val_large"), "--eval",
                 "--masks", "lama_thick_256", "--samples-per-shard", "32", "--set", f"eval.per_bucket={per_bucket}"],
        "curves": ["--source", str(sample / "places365_val.txt"), "--root", str(sample / "val_large"), "--eval",
                   "--masks", "lama_thick_256", "--seed", "1", "--samples-per-shard", "32",
                   "--set", f"eval.per_bucket={curve_per_bucket}"],
    }
    for name, folder in manifests.items():
        if not (folder / "manifest.json").exists():
            _run(f"shard the {name} set", "shard_places2", [*shard, *jobs[name], "--out", str(folder)])
    return {name: str(folder / "manifest.json") for name, folder in manifests.items()}


@dataclass
class TrainedRun:
    """One training job's outcome, read back from MLflow."""

    arch: str
    seconds: float
    steps: int
    run_id: str
    version: str
    config: object


def train(arch: str, manifests: Mapping[str, str], work: Path, tracking_uri: str, overrides: Sequence[str]) -> TrainedRun:
    """``jobs/train_<arch>.py`` with ``jobs/configs/train_<arch>_cpu_learn.yaml``; the registered version it made."""
    from pipeline.tracking import mlflow_client
    from pipeline.train.config import load_train_config

    config_path = CONFIGS / f"train_{arch}_cpu_learn.yaml"
    sets = [
        f"data.train_manifest={json.dumps(manifests['train'])}",
        f"data.eval_manifest={json.dumps(manifests['curves'])}",
        f"run.name={arch}-learn-{time.strftime('%Y%m%d-%H%M%S')}",
        f"run.storage_path={json.dumps(str(work / 'ray_results'))}",
        f"mlflow.tracking_uri={json.dumps(tracking_uri)}",
        *overrides,
    ]
    config = load_train_config(config_path, sets)
    argv = ["--config", str(config_path)]
    for item in sets:
        argv += ["--set", item]
    seconds = _run(f"train {arch.upper()} ({config.train.max_steps} steps)", f"train_{arch}", argv)
    run = latest_run(arch, config, tracking_uri)
    run.seconds = seconds  # the whole job as a user waits for it: Ray start, data, training, registration
    return run


def latest_run(arch: str, config, tracking_uri: str) -> TrainedRun:
    """The newest registered version of ``config``'s model and its run (wall time: the MLflow run's duration)."""
    from pipeline.tracking import mlflow_client

    client = mlflow_client(tracking_uri)
    versions = client.search_model_versions(f"name='{config.registered_model}'")
    if not versions:
        raise SystemExit(f"convergence: no registered {config.registered_model} in {tracking_uri}; train it first")
    latest = max(versions, key=lambda v: int(v.version))
    info = client.get_run(latest.run_id).info
    seconds = ((info.end_time or info.start_time) - info.start_time) / 1000
    history = client.get_metric_history(latest.run_id, "train/g_loss")
    steps = max((m.step for m in history), default=config.train.max_steps)
    return TrainedRun(arch, seconds, steps, latest.run_id, str(latest.version), config)


def untrained_generator(run: TrainedRun) -> nn.Module:
    """The run's generator at its initialisation: built as the training job builds it (seeded with ``train.seed``)."""
    from models.registry import get_architecture

    torch.manual_seed(run.config.train.seed)
    return get_architecture(run.arch).generator(**dict(run.config.model.generator_options)).eval()


def trained_generator(run: TrainedRun, tracking_uri: str) -> nn.Module:
    """The registered version, loaded back from MLflow (``models:/<name>/<version>``)."""
    from pipeline.lifecycle.inference import load_model_ref

    generator, _ = load_model_ref(f"models:/{run.config.registered_model}/{run.version}", tracking_uri)
    return generator


# ------------------------------------------------------------------------------------------------ pictures

# Training logs its losses as train/<name> (validation as val/<metric>[/<bucket>]).
_CURVE_KEYS = {"rn": ("train/g_l1", "train/g_adv", "train/d_loss"),
               "lbam": ("train/g_hole", "train/g_valid", "train/g_adv", "train/d_loss")}


def learning_curves(runs: Sequence[TrainedRun], tracking_uri: str, out: Path) -> None:
    """Train losses and validation PSNR against step for every run, from the runs' MLflow metric histories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.tracking import mlflow_client

    client = mlflow_client(tracking_uri)
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(5 * (len(runs) + 1), 3.6))
    for axis, run in zip(axes, runs):
        for key in _CURVE_KEYS[run.arch]:
            history = sorted(client.get_metric_history(run.run_id, key), key=lambda m: m.step)
            if history:
                axis.plot([m.step for m in history], [abs(m.value) for m in history], label=f"|{key[6:]}|", linewidth=1)
        axis.set_yscale("log")  # losses of different scales; WGAN terms can be negative, so magnitudes
        axis.set_title(f"{run.arch.upper()} train losses")
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    axis = axes[-1]
    for run in runs:
        history = sorted(client.get_metric_history(run.run_id, "val/psnr"), key=lambda m: m.step)
        axis.plot([m.step for m in history], [m.value for m in history], marker="o", label=run.arch.upper())
    axis.set_title("validation PSNR (composited, dB)")
    axis.set_xlabel("step")
    axis.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    for run in runs:
        client.log_artifact(run.run_id, str(out), artifact_path="learning")


def comparison_grid(images: Sequence[EvalImage], keys: Sequence[str], columns: Sequence[tuple[str, MethodResult]],
                    out: Path, tile: int = 128) -> None:
    """Rows of ``input with hole | <each method> | truth`` (``tile``-pixel tiles), captioned, saved as PNG."""
    import torch.nn.functional as F
    from PIL import Image

    from pipeline.tracking import captioned_row

    by_key = {item.key: item for item in images}

    def small(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), size=(tile, tile), mode="area")

    rows = []
    for key in keys:
        item = by_key[key]
        holed = item.image * (1 - item.mask) + item.mask  # the hole shown white
        tiles = [(f"hole {item.ratio:.2f}", small(holed))]
        tiles += [(name, small(result.outputs[key])) for name, result in columns]
        tiles.append(("truth", small(item.image)))
        rows.append(captioned_row(tiles, band=16))
    gap = np.full((4, rows[0].shape[1], 3), 255, dtype=np.uint8)
    picture = np.concatenate([part for row in rows for part in (row, gap)][:-1], axis=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(out, optimize=True)


# ------------------------------------------------------------------------------------------------ main


def _per_arch_sets(items: Sequence[str]) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {arch: [] for arch in ARCHS}
    for item in items:
        arch, _, assignment = item.partition(":")
        if arch not in sets or "=" not in assignment:
            raise SystemExit(f"convergence: --set takes ARCH:key.path=value with ARCH one of {', '.join(ARCHS)}, got {item!r}")
        sets[arch].append(assignment)
    return sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(REPO / ".holefill-local" / "learn"), help="folder for data, runs, MLflow")
    parser.add_argument("--only", choices=ARCHS, action="append", help="train/evaluate only this model (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="ARCH:KEY=VALUE",
                        help="override a key of train_<ARCH>_cpu_learn.yaml, e.g. rn:train.max_steps=50")
    parser.add_argument("--reuse", action="store_true", help="evaluate the latest registered versions, train nothing")
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=80)
    parser.add_argument("--store-size", type=int, default=128,
                        help="short side of every stored image (px); evaluation runs on centre crops of this size")
    parser.add_argument("--per-bucket", type=int, default=10, help="pinned eval set: images per hole-ratio bucket")
    parser.add_argument("--curve-per-bucket", type=int, default=2, help="validation set of the curves, per bucket")
    parser.add_argument("--grid-per-bucket", type=int, default=1, help="rows of the comparison grid per bucket")
    parser.add_argument("--grid", default=str(REPO / "docs" / "learn_grid.png"))
    parser.add_argument("--curves", default=str(REPO / "docs" / "learn_curves.png"))
    parser.add_argument("--table", default=None, help="also write the printed table to this file")
    args = parser.parse_args(argv)
    archs = tuple(args.only or ARCHS)
    sets = _per_arch_sets(args.set)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    started = time.perf_counter()

    manifests = prepare_data(work, args.train_images, args.val_images, args.per_bucket, args.curve_per_bucket,
                             args.store_size)
    runs = []
    for arch in archs:
        if args.reuse:
            from pipeline.train.config import load_train_config

            config = load_train_config(CONFIGS / f"train_{arch}_cpu_learn.yaml", [
                f"data.train_manifest={json.dumps(manifests['train'])}",
                f"data.eval_manifest={json.dumps(manifests['curves'])}", *sets[arch]])
            runs.append(latest_run(arch, config, tracking_uri))
        else:
            runs.append(train(arch, manifests, work, tracking_uri, sets[arch]))

    print("\n=== evaluate on the pinned eval set (validation split)", flush=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    images = load_eval_images(manifests["eval"], crop_size=args.store_size)
    keys = set(grid_keys(images, args.grid_per_bucket))
    mean = evaluate_fill("mean fill", mean_fill, images)
    telea = evaluate_fill("Telea", telea_fill, images, keys)
    results, trained = [mean, telea], {}
    for run in runs:
        untrained = evaluate_fill(f"{run.arch.upper()} untrained", network_fill(untrained_generator(run), run.arch), images)
        trained[run.arch] = evaluate_fill(f"{run.arch.upper()} trained",
                                          network_fill(trained_generator(run, tracking_uri), run.arch), images, keys)
        results += [untrained, trained[run.arch]]

    lines = [f"holefill `make learn`: {len(images)} held-out images of the validation split "
             f"(eval manifest {manifests['eval']}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]
    for run in runs:
        c = run.config
        lines.append(f"  {run.arch.upper()}: {run.steps} steps in {run.seconds / 60:.1f} min "
                     f"(batch {c.train.batch_size} x {c.scaling.num_workers} workers, {c.data.crop_size}² crops, "
                     f"lr x{c.train.lr_scale}), MLflow run {run.run_id}, registered {c.registered_model} v{run.version}")
    lines.append(format_table(results, images))
    lines.append("\ntargets (trained model beats ... on hole PSNR and hole L1 together):")
    for run in runs:
        untrained = next(r for r in results if r.name == f"{run.arch.upper()} untrained")
        lines += target_report(trained[run.arch], untrained, mean, telea, images)
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    if args.table:
        Path(args.table).write_text(text + "\n")

    columns = [("Telea", telea)] + [(f"{arch.upper()} {next(r.steps for r in runs if r.arch == arch)} steps",
                                     trained[arch]) for arch in archs]
    comparison_grid(images, grid_keys(images, args.grid_per_bucket), columns, Path(args.grid))
    learning_curves(runs, tracking_uri, Path(args.curves))
    print(f"\ncomparison grid:  {args.grid}\nlearning curves:  {args.curves} (also an artifact of each MLflow run)"
          f"\nMLflow:           mlflow ui --backend-store-uri {tracking_uri}"
          f"\ntotal:            {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
