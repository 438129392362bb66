"""Reading a generator from any file reference: the one reader every stage uses (:func:`read_generator`).

A reference is one of

* a **training checkpoint folder** (local path or fsspec URL): ``state.json`` (``arch``, ``generator_kwargs``) and
  ``generator.pt`` (a :class:`~models.record.GeneratorRecord` payload; checkpoints written before records hold a
  plain state dict there, whose keywords come from ``state.json`` or, failing that, from the weights' shapes);
* a **weights file** (local path or fsspec URL, read ``weights_only``): a record payload, a plain state dict, or a
  wrapper dict (``{"arch": ..., "state_dict": ..., "generator_kwargs": ...}``, or the state dict under
  ``state_dict``/``model``/``generator``/``netG``/...), ``module.`` prefixes (DataParallel) dropped;
* an **official release** (the authors' key layout, converted by :func:`models.convert.from_official`), tried when
  a weights file does not fit holefill's own layout.

MLflow references (``models:/``, ``runs:/``, a local MLflow model folder) are read in the lifecycle stage
(:func:`pipeline.lifecycle.packaging.load_generator_record`), which hands every other reference to this reader.
A reference that cannot be read is one ``ValueError`` line saying which forms were tried and why each failed. A
plain state dict without its network's keywords is matched to them from its shapes
(:func:`models.record.kwargs_for_weights`) or refused naming the option that supplies them.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Mapping

import torch

from models.convert import extract_state_dict, from_official, load_weights_bytes
from models.record import KWARGS_OPTION, GeneratorRecord, is_record_payload, kwargs_for_weights, weights_problem
from models.registry import architectures
from pipeline.errors import one_line
from pipeline.fsutil import StorageOptionsLike, join_url, publish_bytes, read_bytes, url_to_fs
from pipeline.redaction import redact

__all__ = ["CHECKPOINT_GENERATOR", "CHECKPOINT_STATE", "is_checkpoint_folder", "read_generator",
           "record_bytes", "write_generator"]

CHECKPOINT_STATE = "state.json"  # a training checkpoint's small JSON part (pipeline.train.checkpoint writes it)
CHECKPOINT_GENERATOR = "generator.pt"  # a training checkpoint's generator record
_MAX_STATE_BYTES = 1 << 20
_MLFLOW = ("models:/", "runs:/", "mlflow-artifacts:/")  # read by the lifecycle stage, never here


def record_bytes(record: GeneratorRecord) -> bytes:
    """The record's payload as ``torch.save`` bytes (``weights_only`` readable)."""
    buffer = io.BytesIO()
    torch.save(record.to_payload(), buffer)
    return buffer.getvalue()


def write_generator(record: GeneratorRecord, url: str, storage_options: StorageOptionsLike = None) -> str:
    """Publish ``record`` as a weights file at ``url`` (atomically); returns ``url``."""
    publish_bytes(url, record_bytes(record), storage_options)
    return url


def is_checkpoint_folder(ref: str, storage_options: StorageOptionsLike = None) -> bool:
    """Whether ``ref`` is a folder holding a checkpoint's ``state.json``."""
    try:
        fs, path = url_to_fs(join_url(ref, CHECKPOINT_STATE), storage_options)
        return bool(fs.isfile(path))
    except (OSError, ValueError):
        return False


def read_generator(ref: str, *, arch: str | None = None, kwargs: Mapping[str, Any] | None = None,
                   storage_options: StorageOptionsLike = None, option: str = KWARGS_OPTION) -> GeneratorRecord:
    """The :class:`~models.record.GeneratorRecord` at ``ref`` (a checkpoint folder, a weights file, an official
    release; see the module docstring).

    ``arch`` / ``kwargs``: what the caller knows of the network; they name it for files that do not, and must agree
    with files that do. ``option`` is named in the refusal of a plain state dict whose keywords its shapes do not
    show. Every failure is one ``ValueError`` line naming the forms tried.
    """
    shown = redact(ref)
    if ref.startswith(_MLFLOW):
        raise ValueError(f"cannot read {shown} here: an MLflow reference is read by the lifecycle stage "
                         "(jobs, or pipeline.lifecycle.packaging.load_generator_record)")
    if is_checkpoint_folder(ref, storage_options):
        try:
            return _from_checkpoint(ref, arch, kwargs, storage_options, option)
        except ValueError as exc:
            raise ValueError(f"cannot read a generator from checkpoint folder {shown}: {one_line(exc)}") from None
    try:
        payload = read_bytes(ref, storage_options)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, OSError) as exc:
        why = {FileNotFoundError: "no such file", IsADirectoryError: "a folder, not a file"}.get(type(exc), one_line(exc))
        raise ValueError(f"cannot read a generator from {shown}: tried a checkpoint folder (no {CHECKPOINT_STATE}) "
                         f"and a weights file ({why})") from None
    provenance = {"kind": "weights file", "source": str(shown), "sha256": hashlib.sha256(payload).hexdigest()}
    try:
        return _from_payload(load_weights_bytes(payload, str(shown)), arch, kwargs, provenance, option)
    except ValueError as exc:
        raise ValueError(f"cannot read a generator from weights file {shown}: {one_line(exc)}") from None


def _from_checkpoint(ref: str, arch: str | None, kwargs: Mapping[str, Any] | None,
                     storage_options: StorageOptionsLike, option: str) -> GeneratorRecord:
    raw = read_bytes(join_url(ref, CHECKPOINT_STATE), storage_options)
    if len(raw) > _MAX_STATE_BYTES:
        raise ValueError(f"{CHECKPOINT_STATE} is {len(raw)} bytes, more than a checkpoint state holds")
    try:
        state = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{CHECKPOINT_STATE} is not JSON: {one_line(exc)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("arch"), str):
        raise ValueError(f"{CHECKPOINT_STATE} names no architecture (arch)")
    state_kwargs = state.get("generator_kwargs")
    if state_kwargs is not None and not isinstance(state_kwargs, dict):
        raise ValueError(f"{CHECKPOINT_STATE}: generator_kwargs must be an object")
    weights_url = join_url(ref, CHECKPOINT_GENERATOR)
    try:
        payload = load_weights_bytes(read_bytes(weights_url, storage_options), CHECKPOINT_GENERATOR)
    except FileNotFoundError:
        raise ValueError(f"it has no {CHECKPOINT_GENERATOR}") from None
    provenance = {"kind": "training run", "source": str(redact(ref))}
    if isinstance(state.get("step"), int):
        provenance["step"] = str(state["step"])
    record = _from_payload(payload, state["arch"], state_kwargs, provenance, option, wrappers=False)
    if record.arch != state["arch"]:
        raise ValueError(f"{CHECKPOINT_GENERATOR} holds a {record.arch} generator, {CHECKPOINT_STATE} says {state['arch']}")
    return _agreeing(record, arch, kwargs)


def _agreeing(record: GeneratorRecord, arch: str | None, kwargs: Mapping[str, Any] | None) -> GeneratorRecord:
    """``record``, when the caller's ``arch`` / ``kwargs`` (if given) describe it."""
    problem = record.matches(arch or record.arch, record.kwargs if kwargs is None else kwargs)
    if problem is not None:
        raise ValueError(problem)
    return record


def _without_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return state


def _from_payload(payload: Any, arch: str | None, kwargs: Mapping[str, Any] | None, provenance: dict[str, str],
                  option: str, wrappers: bool = True) -> GeneratorRecord:
    """A record from a loaded torch file: a record payload, a wrapper dict, a plain or an official state dict."""
    if is_record_payload(payload):
        record = GeneratorRecord.from_payload(payload)
        return _agreeing(record.with_provenance(**{k: v for k, v in provenance.items() if k not in record.provenance}),
                         arch, kwargs)
    file_arch = payload.get("arch") if wrappers and isinstance(payload, Mapping) else None
    file_kwargs = payload.get("generator_kwargs") if wrappers and isinstance(payload, Mapping) else None
    if file_arch is not None and not isinstance(file_arch, str):
        raise ValueError("its arch entry is not a string")
    if file_kwargs is not None and not isinstance(file_kwargs, Mapping):
        raise ValueError("its generator_kwargs entry is not a dict")
    if arch is not None and file_arch is not None and arch != file_arch:
        raise ValueError(f"it holds a {file_arch} generator, not {arch}")
    arch = arch or file_arch
    if arch is None:
        raise ValueError(f"it does not say its architecture: pass --arch (one of {', '.join(architectures())})")
    state = _without_module_prefix(extract_state_dict(payload))
    kwargs = file_kwargs if kwargs is None else kwargs
    layouts = (  # (name, how the record is made): holefill's own layout first, then the authors'
        (f"holefill {arch} layout", lambda: GeneratorRecord(
            arch, kwargs_for_weights(arch, state, option) if kwargs is None else dict(kwargs), state, provenance)),
        (f"official {arch} release", lambda: GeneratorRecord(
            arch, dict(kwargs or {}), from_official(arch, "generator", state), {**provenance, "kind": "official release"})),
    )
    tried = []
    for name, make in layouts:
        try:
            record = make()
            problem = weights_problem(record.arch, record.kwargs, record.state_dict)
        except ValueError as exc:
            problem = one_line(exc)
        if problem is None:
            return record
        tried.append(f"{name}: {problem}")
    raise ValueError("; ".join(tried))
