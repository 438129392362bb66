"""The GPU check of ``make gpu-check``: throughput, MFU, memory and syncs per step, sized to a lease.

Every row is the real training step (``optimiser_step`` on holefill's DeepSpeed engines, pinned uint8 batches
converted on the device) at 256² (LBAM's discriminator takes nothing else): images/s per GPU over ``--steps``
timed steps after ``--warmup`` (the device synchronised at both ends only), MFU (the step's FLOPs x steps/s over
the dense bf16 peak, 989 TFLOPS on H100/H200 SXM; fp32 rows use the same peak, so they show what bf16 buys),
peak memory allocated, CUDA syncs per step (``torch.cuda.set_sync_debug_mode``).

The whole check runs inside a time budget (``--budget``, default 8 minutes of wall time counted from the
start of this process), in sections, most important first:

1. ``essential``: RN and LBAM at batch 16 in bf16, the rows everything else is compared against;
2. ``tests``: the ``gpu`` tests (``pytest tests/gpu``, a subprocess, cut at the budget);
3. ``speedup``: the same two in fp32 (the bf16 speed-up);
4. ``zero``: ZeRO 1 and 2 against 0 (what ``deepspeed.zero_stage``'s default waits for);
5. ``switches``: cudnn.benchmark, channels_last, then torch.compile of G (the slowest), each alone against
   none (what the ``performance.*`` defaults wait for);
6. ``batches``: batch 8 and 32 in bf16;
7. ``fp32-batches``: batch 8 and 32 in fp32;
8. ``scaling``: with more than one GPU, batch 16 bf16 at world size 2..N (NCCL) and the efficiency.

Before each row the time it needs is estimated from what this run has measured (set-up seconds per model,
FLOP/s per precision, times the row's FLOPs); a row or section that does not fit what is left is skipped with
a note, and the check goes on with what still fits. Before anything is measured, the estimates come from the
assumptions below (``ASSUMED_*``; ``--plan`` prints them for the whole check from FLOPs counted here).
Each row is written to the output folder as soon as it is measured (``rows.jsonl``, ``table.txt``, ``notes.txt``,
``tests.log``, ``meta.json``), so a check cut short still leaves its first rows.

FLOPs: counted op by op by ``torch.utils.flop_counter`` over one whole optimiser step (convolutions and
matmuls, forward and backward), the gradient penalty's ``autograd.grad`` and double backward included. Stock
``FlopCounterMode`` raises on that ``autograd.grad`` (its per-module tracker's hooks do not support a leaf
input); :class:`StepFlopCounter` is the same counter without the per-module tracker, so the penalty is
*counted*, not estimated (tests/test_gpu_check.py checks it equals the stock count where the stock one works).

Runs without Ray (DeepSpeed, pydantic, webdataset only). ``--device cpu`` runs the same logic on the CPU at
tiny sizes (tests/test_gpu_check.py runs it for both models with ``--tiny``).

    python bench/gpu_check.py                        # on a GPU machine (make gpu-check / gpu-check-offline)
    python bench/gpu_check.py --budget 300 --out /tmp/check
    python bench/gpu_check.py --plan                 # how long each section takes, estimated from FLOPs
    python bench/gpu_check.py --device cpu --tiny --batch 1 --size 32 --steps 1 --warmup 0 \\
        --sections essential speedup --out /tmp/cpu-check         # seconds: the tiny variants, bf16 and fp32
    python bench/gpu_check.py --device cpu --precision fp32 --batch 1 --size 32 --steps 1 --warmup 0 \\
        --sections essential --out /tmp/cpu-check                 # minutes: the real LBAM at 256²
"""

from __future__ import annotations

import time

START = time.monotonic()  # the budget counts this process's imports too

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The offline GPU venv (`make gpu-check-offline`) does not install holefill: this checkout's packages, and tests/
# for `support.engine_probe`.
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.errors import one_line  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM, dense bf16 tensor-core peak
DEFAULT_BUDGET_S = 480.0
SECTIONS = ("essential", "tests", "speedup", "zero", "switches", "batches", "fp32-batches", "scaling")
SWITCHES = ("cudnn_benchmark", "channels_last", "compile_generator")
# Used until this run has measured better (and by --plan): guesses, never measured on a GPU yet.
ASSUMED_FLOPS_PER_S = {"bf16": 200e12, "fp32": 60e12}  # ~20 % of the bf16 peak; fp32 convs run as TF32
ASSUMED_SETUP_S = 15.0  # engines, DeepSpeed's set-up, warm-up steps' one-off costs, the FLOP count
ASSUMED_COMPILE_S = 120.0  # torch.compile of the generator, on top of the set-up
ASSUMED_TESTS_S = 120.0  # the gpu tests (a dozen or so cases of a few tiny steps, engines built each time)
ASSUMED_SPAWN_S = 30.0  # per world size of the scaling table: processes, NCCL, imports
MARGIN = 1.2  # a row runs only if 1.2 x its estimate fits in what is left


@dataclass(frozen=True)
class Case:
    """One configuration to measure."""

    arch: str
    batch: int
    precision: str
    zero_stage: int = 0
    switch: str | None = None

    @property
    def label(self) -> str:
        extra = f" ZeRO {self.zero_stage}" if self.zero_stage else f" + {self.switch}" if self.switch else ""
        return f"{self.arch} {self.precision}{extra}"

    @property
    def base(self) -> Case:
        """The plain (ZeRO 0, no switch) configuration this one is compared against."""
        return Case(self.arch, self.batch, self.precision)


@dataclass
class Row:
    """One measured configuration."""

    label: str
    batch: int
    images_per_s: float
    flops_per_step: float
    peak_gib: float
    syncs_per_step: float
    arch: str = ""
    precision: str = ""
    zero_stage: int = 0
    switch: str | None = None
    setup_s: float = 0.0  # engines, warm-up and the FLOP count
    step_s: float = 0.0  # one timed step
    seconds: float = 0.0  # the whole row

    @property
    def mfu(self) -> float:
        return mfu(self.flops_per_step, self.images_per_s / self.batch)

    @property
    def case(self) -> Case:
        return Case(self.arch, self.batch, self.precision, self.zero_stage, self.switch)


def mfu(flops_per_step: float, steps_per_s: float, peak: float = PEAK_BF16_FLOPS) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak."""
    return flops_per_step * steps_per_s / peak


class _NoModuleTracking:
    """Stands in for ``FlopCounterMode``'s module tracker: every FLOP goes to ``Global`` only. That tracker's
    backward hooks are what raise on ``autograd.grad`` of a leaf (the gradient penalty)."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class StepFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` counting op by op without the per-module breakdown, so double backward through
    ``autograd.grad`` (LBAM's gradient penalty) is counted like any other op."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _NoModuleTracking()


def step_flops(run_step: Callable[[], object]) -> float:
    """FLOPs of one call of ``run_step`` (forward, backward, double backward), counted op by op."""
    with StepFlopCounter() as counter:
        run_step()
    return float(counter.get_total_flops())


class Budget:
    """Wall-clock budget of the whole check, counted from ``start``."""

    def __init__(self, seconds: float, start: float = START, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.start, self.clock = seconds, start, clock

    def spent(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.seconds - self.spent()

    def fits(self, estimate: float) -> bool:
        """Whether ``MARGIN`` x ``estimate`` seconds fit in what is left."""
        return estimate * MARGIN <= self.left()

    def stamp(self) -> str:
        return f"[{self.spent():5.0f} s of {self.seconds:.0f}]"


class Estimator:
    """Seconds a row will take: set-up (per model) + (warmup + 1 + steps) x FLOPs / FLOP/s (per precision),
    from rows measured in this run where there are any, else the ``ASSUMED_*`` constants. A row's FLOPs
    scale with its batch from the FLOPs per image counted for its model."""

    def __init__(self, steps: int, warmup: int) -> None:
        self.steps, self.warmup = steps, warmup
        self.flops_per_image: dict[str, float] = {}
        self.rate: dict[str, float] = {}
        self.setup: dict[str, float] = {}
        self.compile_extra: dict[str, float] = {}
        self.measured: set[str] = set()  # what the estimates come from: "rate bf16", "setup rn", ...

    def record(self, row: Row) -> None:
        """Learn from a measured row."""
        self.flops_per_image[row.arch] = row.flops_per_step / row.batch
        if row.switch == "compile_generator":
            self.compile_extra[row.arch] = max(0.0, row.setup_s - self.setup.get(row.arch, 0.0))
            self.measured.add(f"compile {row.arch}")
            return
        if row.step_s > 0 and not row.zero_stage and not row.switch:
            self.rate[row.precision] = row.flops_per_step / row.step_s
            self.measured.add(f"rate {row.precision}")
        self.setup[row.arch] = max(self.setup.get(row.arch, 0.0), row.setup_s)
        self.measured.add(f"setup {row.arch}")

    def flops(self, case: Case) -> float | None:
        per_image = self.flops_per_image.get(case.arch)
        return None if per_image is None else per_image * case.batch

    def estimate(self, case: Case) -> float | None:
        """Seconds ``case`` needs, or None when its model's FLOPs are not known yet."""
        flops = self.flops(case)
        if flops is None:
            return None
        rate = self.rate.get(case.precision) or ASSUMED_FLOPS_PER_S[case.precision]
        seconds = self.setup.get(case.arch, ASSUMED_SETUP_S) + (self.warmup + 1 + self.steps) * flops / rate
        if case.switch == "compile_generator":
            seconds += self.compile_extra.get(case.arch, ASSUMED_COMPILE_S)
        return seconds

    def basis(self, case: Case) -> str:
        """Whether the estimate of ``case`` rests on this run's measurements or on the assumptions."""
        parts = [f"rate {case.precision}", f"setup {case.arch}"]
        if case.switch == "compile_generator":
            parts.append(f"compile {case.arch}")
        return "measured" if all(p in self.measured for p in parts) else "assumed"


class Recorder:
    """The output folder, written as the check goes: a check cut short still leaves its first rows."""

    def __init__(self, out: Path, meta: dict) -> None:
        self.out = out
        self.rows: list[Row] = []
        self.failures = 0
        out.mkdir(parents=True, exist_ok=True)
        for name in ("rows.jsonl", "notes.txt"):
            (out / name).write_text("")
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    def add(self, row: Row) -> None:
        self.rows.append(row)
        with open(self.out / "rows.jsonl", "a") as handle:
            handle.write(json.dumps({**asdict(row), "mfu": row.mfu}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        (self.out / "table.txt").write_text(format_table(self.rows) + "\n")

    def note(self, text: str) -> None:
        print(text, flush=True)
        with open(self.out / "notes.txt", "a") as handle:
            handle.write(text + "\n")

    def fail(self, text: str) -> None:
        """A note that makes the check exit non-zero at the end."""
        self.failures += 1
        self.note(text)


def format_table(rows: list[Row]) -> str:
    """A fixed-width table. ``bf16 x``: a bf16 row's speed over the same row in fp32; ``vs base``: a ZeRO or
    switch row's speed over the same configuration without it."""
    by_case = {row.case: row for row in rows}
    header = (f"{'config':<34}{'batch':>6}{'img/s/GPU':>11}{'MFU':>8}{'peak GiB':>10}{'syncs/step':>12}"
              f"{'bf16 x':>8}{'vs base':>9}{'row s':>7}")
    lines = [header, "-" * len(header)]
    for row in rows:
        case = row.case
        plain_bf16 = case == case.base and row.precision == "bf16"
        fp32 = by_case.get(Case(case.arch, case.batch, "fp32")) if plain_bf16 else None
        base = by_case.get(case.base) if case != case.base else None
        speedup = f"{row.images_per_s / fp32.images_per_s:.2f}" if fp32 else ""
        versus = f"{row.images_per_s / base.images_per_s:.2f}" if base else ""
        lines.append(
            f"{row.label:<34}{row.batch:>6}{_rate(row.images_per_s):>11}{100 * row.mfu:>7.1f}%{row.peak_gib:>10.2f}"
            f"{row.syncs_per_step:>12.1f}{speedup:>8}{versus:>9}{row.seconds:>7.0f}"
        )
    return "\n".join(lines)


def _rate(images_per_s: float) -> str:
    """One decimal on a GPU; three significant digits for the CPU's fractions of an image per second."""
    return f"{images_per_s:.1f}" if images_per_s >= 10 else f"{images_per_s:.3g}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_size(arch: str, size: int, tiny: bool = False) -> int:
    """RN's crop is ``size``; LBAM's discriminator takes 256² only (its fusion conv turns a 4x4 map into one
    score), or the tiny variant's 128²."""
    from support.engine_probe import TINY_SIZES

    from models.lbam import DISCRIMINATOR_SIZE

    if arch != "lbam":
        return size
    return TINY_SIZES["lbam"][0] if tiny else DISCRIMINATOR_SIZE


def measure(case: Case, size: int, device: torch.device, *, steps: int, warmup: int, tiny: bool = False) -> Row:
    """Build the engines like a training worker and time ``steps`` optimiser steps of ``case`` (``tiny``: the
    CPU variants of ``tests/support/engine_probe.py``: one RN residual block, LBAM at 1/16 width with a stand-in VGG)."""
    from support import engine_probe as probe

    from pipeline.train.config import PerformanceSettings
    from pipeline.train.host_sync import count_cuda_syncs, count_host_reads
    from pipeline.train.loop import apply_speed_switches

    began = time.perf_counter()
    recipe, engines, parts = probe.build(case.arch, case.zero_stage, case.precision, device=device, batch=case.batch,
                                         tiny=tiny)
    performance = PerformanceSettings(**({case.switch: True} if case.switch else {}))
    apply_speed_switches(performance, engines.generator.module, engines.discriminator.module, device)
    batches = probe.uint8_batches(case.arch, batch=case.batch, size=image_size(case.arch, size, tiny),
                                  pin=device.type == "cuda", tiny=tiny)

    def run_step():
        return probe.step(recipe, parts, batches, case.precision, device)

    for _ in range(warmup):
        run_step()
    flops = step_flops(run_step)
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    counter = count_cuda_syncs() if device.type == "cuda" else count_host_reads()
    start = time.perf_counter()
    with counter as syncs:
        for _ in range(steps):
            run_step()
        _synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    torch.backends.cudnn.benchmark = False
    del recipe, engines, parts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Row(case.label, case.batch, steps * case.batch / seconds, flops, peak, syncs.total / steps,
               arch=case.arch, precision=case.precision, zero_stage=case.zero_stage, switch=case.switch,
               setup_s=start - began, step_s=seconds / steps, seconds=time.perf_counter() - began)


def section_cases(name: str, args: argparse.Namespace, device: torch.device) -> list[Case]:
    """The rows of a table section (``essential``, ``speedup``, ``batches``, ...), in order."""
    batch, precision = args.batch, args.precision
    cases = []
    if name == "switches":  # switch by switch, so the cheap ones run for both models before any compile
        # cudnn is GPU-only; compiling on the CPU only costs the smoke run time
        return [Case(arch, batch, precision, switch=s) for s in SWITCHES for arch in args.archs
                if device.type == "cuda" or s == "channels_last"]
    for arch in args.archs:
        if name == "essential":
            cases.append(Case(arch, batch, precision))
        elif name == "speedup" and precision != "fp32":
            cases.append(Case(arch, batch, "fp32"))
        elif name == "batches":
            cases += [Case(arch, b, precision) for b in args.batches if b != batch]
        elif name == "zero":
            cases += [Case(arch, batch, precision, zero_stage=stage) for stage in (1, 2)]
        elif name == "fp32-batches" and precision != "fp32":
            cases += [Case(arch, b, "fp32") for b in args.batches if b != batch]
    return cases


def run_rows(name: str, cases: list[Case], args, device, budget: Budget, estimator: Estimator, rec: Recorder) -> None:
    """Measure ``cases`` in order, skipping (with a note) each one whose estimate does not fit the budget."""
    for case in cases:
        estimate = estimator.estimate(case)
        if estimate is not None and not budget.fits(estimate):
            rec.note(f"{budget.stamp()} {name}: skipped {case.label} batch {case.batch}: needs ~{estimate:.0f} s "
                     f"({estimator.basis(case)}), {max(budget.left(), 0):.0f} s left")
            continue
        guess = f" (~{estimate:.0f} s)" if estimate is not None else ""
        print(f"{budget.stamp()} {name}: {case.label} batch {case.batch}{guess}", flush=True)
        try:
            row = measure(case, args.size, device, steps=args.steps, warmup=args.warmup, tiny=args.tiny)
        except Exception as exc:  # one row (an OOM, a compile error) must not cost the lease the rest
            rec.fail(f"{budget.stamp()} {name}: {case.label} batch {case.batch} failed: "
                     f"{one_line(exc, typed=True)}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        estimator.record(row)
        rec.add(row)
        print(f"{budget.stamp()}   {_rate(row.images_per_s)} img/s, MFU {100 * row.mfu:.1f} %, "
              f"{row.flops_per_step / 1e9:.1f} GFLOP/step, peak {row.peak_gib:.2f} GiB, "
              f"{row.syncs_per_step:.1f} syncs/step, {row.seconds:.0f} s", flush=True)


def run_tests(budget: Budget, rec: Recorder, device: torch.device) -> None:
    """``pytest -m gpu tests/gpu`` in a subprocess, cut when the budget is spent; its log in ``tests.log``.

    ``--confcutdir tests/gpu`` keeps the suite's root conftest (MLflow / Ray fixtures) out: the offline host has
    neither; ``tests/gpu/conftest.py`` sets up what these tests need.
    """
    left = budget.left()
    if not budget.fits(ASSUMED_TESTS_S if device.type == "cuda" else 30.0):
        rec.note(f"{budget.stamp()} tests: skipped: the gpu tests need ~{ASSUMED_TESTS_S:.0f} s (assumed), "
                 f"{max(left, 0):.0f} s left")
        return
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider",
               "--confcutdir", str(REPO / "tests" / "gpu"), str(REPO / "tests" / "gpu")]
    print(f"{budget.stamp()} tests: {' '.join(command[1:])} (log: {rec.out / 'tests.log'})", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    began = time.perf_counter()
    with open(rec.out / "tests.log", "w") as log:
        try:
            code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=left).returncode
        except subprocess.TimeoutExpired:
            code = None
    tail = (rec.out / "tests.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
    outcome = "cut at the budget" if code is None else f"exit {code}"
    line = f"{budget.stamp()} tests: {outcome} after {time.perf_counter() - began:.0f} s: {tail[0]}"
    if code in (0, None):
        rec.note(line)
    else:
        rec.fail(line)


def _init_group(device: torch.device, rank: int = 0, world_size: int = 1, port: int | None = None) -> None:
    from pipeline.train.engines import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or _free_port()), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    init_distributed(device.type == "cuda")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scaling_worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out) -> None:
    device = torch.device("cuda", rank)
    _init_group(device, rank, world_size, port)
    for arch in args.archs:
        row = measure(Case(arch, args.batch, args.precision), args.size, device, steps=args.steps, warmup=args.warmup)
        if rank == 0:
            out.put((arch, row.images_per_s))
    dist.destroy_process_group()


def run_scaling(args: argparse.Namespace, budget: Budget, estimator: Estimator, rec: Recorder) -> None:
    """Per-GPU images/s at world size 2..N (batch ``--batch``, ZeRO 0) and efficiency against one GPU."""
    import torch.multiprocessing as mp

    single = {r.arch: r.images_per_s for r in rec.rows if r.case == Case(r.arch, args.batch, args.precision)}
    if len(single) != len(args.archs):
        rec.note(f"{budget.stamp()} scaling: skipped: it compares against the essential rows, not all measured")
        return
    lines = [f"{'model':<8}{'GPUs':>6}{'img/s/GPU':>11}{'efficiency':>12}"]
    for world_size in range(2, torch.cuda.device_count() + 1):
        estimate = ASSUMED_SPAWN_S + sum(estimator.estimate(Case(a, args.batch, args.precision)) for a in args.archs)
        if not budget.fits(estimate):
            rec.note(f"{budget.stamp()} scaling: skipped {world_size} GPUs: needs ~{estimate:.0f} s, "
                     f"{max(budget.left(), 0):.0f} s left")
            break
        print(f"{budget.stamp()} scaling: {world_size} GPUs (~{estimate:.0f} s)", flush=True)
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_scaling_worker, args=(world_size, _free_port(), args, queue), nprocs=world_size, join=True)
        while not queue.empty():
            arch, rate = queue.get()
            lines.append(f"{arch:<8}{world_size:>6}{rate:>11.1f}{100 * rate / single[arch]:>11.1f}%")
        (rec.out / "scaling.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def plan(args: argparse.Namespace, device: torch.device) -> None:
    """Print how long each section would take on one GPU, estimated from FLOPs counted here (batch 1, fp32,
    scaled by batch) and the ``ASSUMED_*`` rates and set-up times: nothing here was timed on a GPU."""
    from support import engine_probe as probe

    estimator = Estimator(args.steps, args.warmup)
    for arch in args.archs:
        recipe, _, parts = probe.build(arch, 0, "fp32", device=device, batch=1)
        batches = probe.uint8_batches(arch, batch=1, size=image_size(arch, args.size))
        estimator.flops_per_image[arch] = step_flops(lambda: probe.step(recipe, parts, batches, "fp32", device))
        print(f"{arch}: {estimator.flops_per_image[arch] / 1e9:.1f} GFLOP per image per step "
              f"(G and D, forward and backward{', gradient penalty included' if arch == 'lbam' else ''})")
    cuda = torch.device("cuda")
    total = 0.0
    print(f"estimated on one GPU at {ASSUMED_FLOPS_PER_S['bf16'] / 1e12:.0f} TFLOP/s bf16, "
          f"{ASSUMED_FLOPS_PER_S['fp32'] / 1e12:.0f} fp32, {ASSUMED_SETUP_S:.0f} s set-up per row, "
          f"{ASSUMED_COMPILE_S:.0f} s per compile (assumptions, not measurements):")
    for name in args.sections:
        if name == "tests":
            seconds, detail = ASSUMED_TESTS_S, "assumed"
        elif name == "scaling":
            seconds, detail = 0.0, "one GPU: none"
        else:
            estimates = [(case, estimator.estimate(case)) for case in section_cases(name, args, cuda)]
            seconds = sum(e for _, e in estimates)
            detail = ", ".join(f"{s.label} b{s.batch} {e:.0f} s" for s, e in estimates) or "none"
        total += seconds
        print(f"  {name:<13}{seconds:>6.0f} s  (cumulative {total:>4.0f} s)  {detail}")


def default_out(device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return REPO / "bench" / "results" / f"gpu-check-{datetime.now(timezone.utc):%Y-%m-%d-%H%M}-{slug}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--archs", nargs="+", default=["rn", "lbam"], choices=["rn", "lbam"])
    parser.add_argument("--batch", type=int, default=16, help="the batch of the essential, ZeRO and switch rows")
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32], help="the batch sizes compared")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="of the essential rows")
    parser.add_argument("--size", type=int, default=256, help="RN's crop (LBAM's is always 256)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds of wall time, all in")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--out", type=Path, help="folder for the rows (default bench/results/gpu-check-DATE-GPU)")
    parser.add_argument("--no-switches", action="store_true", help="skip the ZeRO and speed-switch sections")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: one RN residual block, LBAM at 1/16 width and 128² with a stand-in VGG")
    parser.add_argument("--plan", action="store_true", help="print each section's estimated time and stop")
    args = parser.parse_args(argv)
    if args.no_switches:
        args.sections = [s for s in args.sections if s not in ("zero", "switches")]
    if args.device == "cuda" and not torch.cuda.is_available() and not args.plan:  # --plan counts FLOPs anywhere
        raise SystemExit("gpu_check: no CUDA device visible (use --device cpu for the CPU-side smoke run)")
    cuda = args.device == "cuda" and torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    _init_group(device)
    if args.plan:
        plan(args, device)
        dist.destroy_process_group()
        return

    budget = Budget(args.budget)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86'})"
    out = args.out or default_out(device)
    import deepspeed

    meta = {"device": name, "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
            "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
            "python": platform.python_version(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "args": sys.argv[1:] if argv is None else argv,
            "budget_s": args.budget, "peak_bf16_flops": PEAK_BF16_FLOPS}
    rec = Recorder(out, meta)
    lbam = f"LBAM {image_size('lbam', args.size, args.tiny)}²{' (tiny variants)' if args.tiny else ''}"
    print(f"{budget.stamp()} holefill gpu-check on {name}, torch {torch.__version__}, RN {args.size}² / {lbam}, "
          f"{args.steps} timed steps, budget {args.budget:.0f} s; MFU against {PEAK_BF16_FLOPS / 1e12:.0f} TFLOPS "
          f"(dense bf16); rows -> {out}", flush=True)
    estimator = Estimator(args.steps, args.warmup)
    for section in [s for s in SECTIONS if s in args.sections]:
        if budget.left() <= 0:
            rec.note(f"{budget.stamp()} {section}: skipped: the budget is spent")
            continue
        if section == "tests":
            run_tests(budget, rec, device)
        elif section == "scaling":
            if device.type == "cuda" and torch.cuda.device_count() > 1:
                dist.destroy_process_group()
                run_scaling(args, budget, estimator, rec)
                _init_group(device)
        else:
            run_rows(section, section_cases(section, args, device), args, device, budget, estimator, rec)
    print(format_table(rec.rows), flush=True)
    failed = f", {rec.failures} failed (notes.txt)" if rec.failures else ""
    print(f"{budget.stamp()} done: {len(rec.rows)} rows in {out}{failed}", flush=True)
    dist.destroy_process_group()
    if rec.failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
