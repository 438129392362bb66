"""Export a registered generator with torch.export or to ONNX, verified against the eager model, logged on its version.

    python jobs/export.py models:/lbam@champion --format onnx              # writes lbam-v<N>.onnx, logs it
    python jobs/export.py --model models:/rn/4 --format exported_program --out rn.pt2   # torch.export.load reads it
    python jobs/export.py --model ckpt/checkpoint_000010 --format onnx --no-log   # a training checkpoint

The exported graph takes ``image`` (B,3,H,W) in [0,1] and ``mask`` (B,1,H,W), 1 = hole (H, W multiples of
the architecture's size rule: RN 4, LBAM 128) and returns the composited result. Before anything is logged
the file is run on random inputs of three sizes and must match the eager generator within ``tolerance``
(1e-4); it is then logged under ``exports/v<N>/`` of the version's run and the version is tagged
``holefill.export.<format>``. Both formats come from one ``torch.export`` of the model (no TorchScript); ONNX
uses torch's torch.export-based exporter and needs ``pip install 'holefill[export]'`` (onnx, onnxscript,
onnxruntime).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.jobcli import Flag, run_job
from pipeline.lifecycle.evaluations import parse_registered_ref
from pipeline.lifecycle.exporting import (
    SUFFIX,
    ExportJobConfig,
    ExportResult,
    export_generator,
    log_export,
    verify_export,
)
from pipeline.lifecycle.inference import load_model_ref
from pipeline.tracking import check_tracking_server, mlflow_client, resolve_tracking_uri

FLAGS = {
    "model": Flag("model", "models:/name@alias (default models:/lbam@champion), models:/name/N, checkpoint, weights"),
    "format": Flag("format", "what to write", options={"choices": tuple(SUFFIX)}),
    "out": Flag("out", "output file (default <name>-v<version>.<pt2|onnx>)"),
    "arch": Flag("arch", "architecture of a plain weights file (rn, lbam)"),
    "no_log": Flag("log_to_mlflow", "write the file only; log nothing to MLflow", const=False),
}


def export(config: ExportJobConfig) -> int:
    """Load the model (a registered alias is pinned to its version first), export, verify, log, print the path."""
    tracking_uri = resolve_tracking_uri(config.tracking_uri, os.environ)
    registered = None
    model_ref = config.model
    if model_ref.startswith(("models:/", "runs:/")):
        check_tracking_server(tracking_uri)
        registered = parse_registered_ref(model_ref, mlflow_client(tracking_uri))
        if registered:  # the alias may move while we work: export and log exactly this version
            model_ref = f"models:/{registered[0]}/{registered[1]}"
    generator, arch = load_model_ref(model_ref, tracking_uri, config.arch)
    default_name = f"{registered[0]}-v{registered[1]}" if registered else arch
    path = Path(config.out or f"{default_name}{SUFFIX[config.format]}")
    export_generator(generator, arch, config.format, path, config.seed)
    diffs = verify_export(path, config.format, generator, arch, config.tolerance, config.seed)
    result = ExportResult(path, config.format, diffs)
    print(f"{path}: {config.format}, max |exported - eager| "
          + ", ".join(f"{h}x{w}: {d:.2g}" for (h, w), d in diffs.items()))
    if config.log_to_mlflow and registered:
        print(f"logged as {log_export(tracking_uri, registered[0], registered[1], result)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point (the model may come first, without ``--model``); returns the exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--model", *argv]
    return run_job("export", __doc__, ExportJobConfig, export, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
