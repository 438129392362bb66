"""The evidence behind a promotion decision, readable in the MLflow UI by a person promoting by hand.

* :func:`comparison_markdown`: every metric of champion and challenger side by side, per hole bucket and
  overall, with N (the version description renders it as a table);
* :func:`bucket_pictures`: per bucket, rows of input with its hole shown | champion | challenger | truth for
  the samples both evaluations kept (the same eval keys);
* :func:`log_evidence`: one run in the promotion experiment holding the table and the pictures; its id is
  tagged on the challenger version.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from pipeline.buckets import BUCKET_NAMES
from pipeline.evaluation.evaluate import PER_BUCKET_METRICS, Sample
from pipeline.tracking import get_or_create_experiment

__all__ = ["bucket_pictures", "comparison_markdown", "log_evidence"]

_OVERALL = ("p_ids", "u_ids")


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def comparison_markdown(champion: Mapping[str, float] | None, challenger: Mapping[str, float]) -> str:
    """Markdown table: bucket | N | each metric as champion → challenger (``-`` where not measured)."""
    champion = champion or {}
    metrics = [m for m in PER_BUCKET_METRICS if m in challenger or m in champion]
    head = "| hole ratio | N (champion / challenger) | " + " | ".join(f"{m} champion | {m} challenger" for m in metrics) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(metrics))]
    for bucket, suffix in [*((b, f"/{b}") for b in BUCKET_NAMES), ("all", "")]:
        counts = f"{int(champion.get(f'count{suffix}', 0))} / {int(challenger.get(f'count{suffix}', 0))}"
        cells = [f"{_cell(champion.get(m + suffix))} | {_cell(challenger.get(m + suffix))}" for m in metrics]
        lines.append(f"| {bucket} | {counts} | " + " | ".join(cells) + " |")
    overall = [m for m in _OVERALL if m in challenger or m in champion]
    if overall:
        lines.append("")
        lines.append("Overall: " + "; ".join(f"{m} {_cell(champion.get(m))} → {_cell(challenger.get(m))}" for m in overall))
    return "\n".join(lines)


def bucket_pictures(champion: Sequence[Sample], challenger: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Per bucket, an (H·k, 4W, 3) uint8 picture: input with hole | champion | challenger | truth, one row per
    sample both evaluations kept. Without a champion its column shows the input."""
    by_key = {s.key: s for s in champion}
    pictures: dict[str, np.ndarray] = {}
    for bucket in BUCKET_NAMES:
        rows = []
        for sample in (s for s in challenger if s.bucket == bucket):
            old = by_key.get(sample.key)
            if champion and old is None:
                continue
            middle = old.output if old is not None else sample.masked
            row = np.concatenate([sample.masked, middle, sample.output, sample.truth], axis=2)
            rows.append(row.transpose(1, 2, 0))
        if rows and len({r.shape for r in rows}) == 1:
            pictures[bucket] = np.ascontiguousarray(np.concatenate(rows, axis=0))
    return pictures


def log_evidence(client, experiment: str, model: str, challenger: str, champion: str | None, decision_markdown: str,
                 pictures: Mapping[str, np.ndarray]) -> str:
    """One run holding ``decision.md`` and ``pictures/<bucket>.png``; returns its id."""
    run = client.create_run(get_or_create_experiment(client, experiment),
                            run_name=f"promotion-{model}-{challenger}-vs-{champion or 'none'}",
                            tags={"holefill.model_name": model, "holefill.model_version": challenger,
                                  "holefill.promotion.compared_to": champion or "none"})
    run_id = run.info.run_id
    client.log_text(run_id, decision_markdown + "\n", "decision.md")
    for bucket, picture in pictures.items():
        client.log_image(run_id, picture, f"pictures/{bucket}.png")
    client.set_terminated(run_id)
    return run_id
