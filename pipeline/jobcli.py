"""The command line every job shares: ``--config FILE``, ``--set key=value``, shortcut flags, one-line errors.

A job declares its shortcut flags as :class:`Flag` records (flag -> config key) and hands its work to
:func:`run_job`, which parses the arguments, sets up job logging, loads and validates the typed config
(shortcut flags first, ``--set`` last, so ``--set`` wins), makes its relative local paths absolute against the
caller's working directory (:mod:`pipeline.paths`; Ray workers run elsewhere) and logs them, runs the work
and turns every ``ValueError`` (``ConfigError`` included) into ``<job>: <one line>`` on stderr and exit
status 2 (a Ray that did not start: one line and status 3, :data:`pipeline.raycluster.RAY_START_EXIT_STATUS`).
The work returns the job's exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeVar

from pipeline.config import Config, add_config_arguments, parse_job_config
from pipeline.joblog import setup_job_logging
from pipeline.paths import ray_working_dir_copy, resolve_config_paths
from pipeline.raycluster import RAY_START_EXIT_STATUS, RayStartError
from pipeline.redaction import redact

__all__ = ["Flag", "build_parser", "flag_overrides", "run_job"]

C = TypeVar("C", bound=Config)


@dataclass(frozen=True)
class Flag:
    """A shortcut flag for a config key: ``--eval-manifest X`` means ``--set eval_manifest="X"``.

    ``const`` makes it a switch: given, it sets ``key`` to ``const``. ``options`` go to ``add_argument``
    (``type``, ``choices``, ...). Values are JSON-quoted, so a path such as ``2024`` stays a string.
    """

    key: str
    help: str = ""
    const: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)


def build_parser(prog: str, doc: str | None, flags: Mapping[str, Flag] = {},
                 default_config: str | None = None) -> argparse.ArgumentParser:
    """The job's parser: the first paragraph of its docstring as description, its flags, ``--config``/``--set``."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, spec in flags.items():
        option = "--" + name.replace("_", "-")
        if spec.const is not None:
            parser.add_argument(option, dest=name, action="store_true", help=spec.help)
        else:
            parser.add_argument(option, dest=name, help=spec.help, **dict(spec.options))
    add_config_arguments(parser, default_config)
    return parser


def flag_overrides(args: argparse.Namespace, flags: Mapping[str, Flag]) -> list[str]:
    """``key=value`` overrides for the shortcut flags that were given."""
    overrides = []
    for name, spec in flags.items():
        value = getattr(args, name, None)
        if spec.const is not None:
            if value:
                overrides.append(f"{spec.key}={json.dumps(spec.const)}")
        elif value is not None:
            overrides.append(f"{spec.key}={json.dumps(value)}")
    return overrides


def run_job(prog: str, doc: str | None, config_type: type[C], work: Callable[[C], int | None],
            argv: Sequence[str] | None = None, flags: Mapping[str, Flag] = {},
            default_config: str | None = None, log_name: str | None = None) -> int:
    """Parse ``argv``, load ``config_type``, run ``work(config)``; returns the exit status.

    Bad input anywhere (a config value, a missing file, a model that does not exist) is one line on stderr
    naming what is wrong and exit status 2; nothing is half-written by the parsing itself.
    """
    parser = build_parser(prog, doc, flags, default_config)
    args = parser.parse_args(argv)
    try:
        config = parse_job_config(config_type, args, flag_overrides(args, flags))
        resolved = resolve_config_paths(config)
        logger = setup_job_logging(log_name or prog)  # after the config: a config error stays the only line on stderr
        for change in resolved:
            logger.info("path %s: %s -> %s", change.key, redact(change.given), redact(change.resolved))
            if ray_working_dir_copy(change.resolved) is not None:
                logger.warning("path %s lies in Ray's copy of the job's --working-dir, which lacks git-ignored "
                               "files (data under .holefill-local/, for one): give data as absolute paths or URLs",
                               change.key)
        status = work(config)
    except RayStartError as exc:  # the machine, not the input: its own status
        print(f"{prog}: {redact(str(exc))}", file=sys.stderr)
        return RAY_START_EXIT_STATUS
    except ValueError as exc:  # ConfigError and every other one-line rule violation
        # A Ray task's error (RayTaskError subclasses its cause's type) carries a traceback: show the cause's line.
        cause = exc.cause if isinstance(getattr(exc, "cause", None), ValueError) else exc
        print(f"{prog}: {redact(str(cause))}", file=sys.stderr)
        return 2
    return 0 if status is None else int(status)
