"""The layout is the architecture: stages import one way and no module sits in an import circle.

Stages, earliest first: ``models`` ← ``pipeline.data`` ← ``pipeline.evaluation`` ← ``pipeline.train`` ←
``pipeline.lifecycle`` ← ``jobs``; the plumbing at ``pipeline``'s top is used by all stages and uses none.
Every ``import`` counts, including those inside functions (a lazy import is still a dependency). Training's
validation is evaluation on the rank's slice, so training imports evaluation and never the other way round.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["models", "pipeline", "pipeline.data", "pipeline.evaluation", "pipeline.train", "pipeline.lifecycle", "jobs"]


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _modules() -> dict[str, Path]:
    return {_module_name(f): f for root in ("models", "pipeline", "jobs") for f in (REPO / root).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _stage(module: str) -> int:
    """Index in STAGES of the deepest stage containing ``module`` (the plumbing is ``pipeline`` itself)."""
    best = -1
    for index, stage in enumerate(STAGES):
        if module == stage or module.startswith(stage + "."):
            if best < 0 or len(stage) > len(STAGES[best]):
                best = index
    return best


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_module_imports_a_later_stage():
    plumbing = STAGES.index("pipeline")
    offences = []
    for module, targets in _graph().items():
        own = _stage(module)
        for target in targets:
            theirs = _stage(target)
            if own == plumbing and theirs > plumbing:
                offences.append(f"plumbing {module} -> {target}")
            elif theirs > own and own != plumbing:
                offences.append(f"{module} -> {target}")
    assert offences == []


def test_there_are_no_import_circles():
    graph = _graph()
    circles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_model_files_know_nothing_of_the_pipeline_ray_or_mlflow():
    """Weights may come from any fsspec URL (models/convert.py), but nothing of the pipeline reaches models/."""
    modules = _modules()
    forbidden = ("pipeline", "jobs", "ray", "mlflow", "deepspeed", "webdataset")
    offences = []
    for name, path in modules.items():
        if not name.startswith("models"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            offences += [f"{name} -> {n}" for n in names if n.split(".")[0] in forbidden]
    assert offences == []


def test_validation_during_training_runs_through_the_evaluation_loop():
    """One evaluation loop: the train stage validates with ``pipeline.evaluation.evaluate.evaluate_slice`` and
    reads no eval set of its own."""
    assert "pipeline.evaluation.evaluate" in _graph()["pipeline.train.loop"]
    train_sources = "".join(path.read_text() for path in (REPO / "pipeline" / "train").rglob("*.py"))
    assert "evaluate_slice(" in train_sources and "make_eval_loader" not in train_sources
