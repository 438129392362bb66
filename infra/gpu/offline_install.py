"""Install the wheelhouse on an air-gapped GPU host, beside the host's own torch (``make gpu-check-offline``).

Run with the host's python3 (stdlib only; ``packaging`` from the host or pip's vendored copy). In order, each
failure one line naming what to do:

1. the host's torch is a CUDA build (a GPU need not be visible yet: ``gpu-check-run`` checks that next);
2. the wheelhouse's wheels are for this Python (the ``cpXY`` of its compiled wheels);
3. the host has every package the wheelhouse assumes (``host-requirements.txt``, written by
   ``make wheelhouse``), at a version that satisfies its specifier;
4. a venv (``.venv-gpu``) that sees exactly what the host's python3 sees. ``venv --system-site-packages`` is
   not that when python3 is itself a venv (``/opt/torch/.venv/bin/python3``): the new venv would see the
   *base* interpreter's site-packages, not that venv's (no torch, numpy...). So a ``.pth`` file adds each
   directory on the host interpreter's ``sys.path`` beyond the standard library, in order, with
   ``site.addsitedir`` (which also runs the ``.pth`` files there): a venv's site-packages, the base's when
   that venv includes them, a ``pip install --target`` directory on ``PYTHONPATH``, the user site;
5. ``pip install --no-index`` of the wheelhouse into it (pip resolves against the host's packages too);
6. the GPU check's imports work in it.

    python3 infra/gpu/offline_install.py --wheelhouse wheelhouse --venv .venv-gpu
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

PREFIX = "gpu-check-offline:"
PTH_NAME = "_holefill_host_site.pth"
# What bench/gpu_check.py and tests/gpu import, checked in the new venv after the install.
GPU_PATH_IMPORTS = ("torch", "deepspeed", "pydantic", "webdataset", "yaml", "fsspec", "numpy", "PIL", "pytest",
                    "pytest_timeout", "pipeline.train.loop", "pipeline.train.engines", "models.registry")


class InstallError(Exception):
    """One line for the user: what is missing and what to do."""


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name
    return Requirement, canonicalize_name


def check_torch_has_cuda() -> str:
    """``torch X (CUDA Y)`` for the host's torch; raises when it is missing or a CPU build."""
    try:
        import torch
    except ImportError as exc:
        raise InstallError(f"{sys.executable} has no torch ({exc}); run with PYTHON=<the host's python3 that "
                           "has a CUDA torch>") from exc
    if not torch.version.cuda:
        raise InstallError(f"torch {torch.__version__} in {sys.executable} is a CPU build; the GPU check needs "
                           "a CUDA build of torch on the host")
    return f"torch {torch.__version__} (CUDA {torch.version.cuda})"


def check_python_tag(wheelhouse: Path) -> None:
    """The wheelhouse's compiled wheels are for this interpreter's ``cpXY``."""
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for wheel in sorted(wheelhouse.glob("*.whl")):
        tags = wheel.stem.split("-")[-3:]
        python_tag = tags[0]
        if python_tag.startswith("cp") and python_tag != here:
            built = f"{python_tag[2]}.{python_tag[3:]}"
            raise InstallError(f"the wheelhouse is for CPython {built} ({wheel.name}); the host's python is "
                               f"{sys.version_info.major}.{sys.version_info.minor}: rebuild it with "
                               f"TARGET_PYTHON={sys.version_info.major}.{sys.version_info.minor} make wheelhouse")


def missing_host_packages(host_requirements: Path) -> list[str]:
    """``name spec (needed by ...)`` for each assumed host package absent here or at a version that fails."""
    import importlib.metadata as metadata

    Requirement, _ = _packaging()
    missing = []
    for line in host_requirements.read_text().splitlines():
        spec, _, needed_by = line.partition("#")
        if not spec.strip():
            continue
        req = Requirement(spec.strip())
        who = f" (for {needed_by.strip()})" if needed_by.strip() else ""
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{req}{who}")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(f"{req} (has {version}){who}")
    return missing


def host_site_dirs() -> list[str]:
    """Directories on this interpreter's ``sys.path`` beyond the standard library: what the new venv adds."""
    stdlib = {os.path.realpath(sysconfig.get_path(key)) for key in ("stdlib", "platstdlib")}
    script_dir = os.path.realpath(sys.path[0] or os.getcwd())
    dirs = []
    for entry in sys.path[1:]:
        real = os.path.realpath(entry or os.getcwd())
        if not os.path.isdir(real) or real in stdlib or real == script_dir or real in dirs:
            continue
        if real.startswith(tuple(stdlib)) and "site-packages" not in real and "dist-packages" not in real:
            continue  # lib-dynload and the like
        dirs.append(real)
    return dirs


def venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def venv_site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def make_venv(path: Path) -> Path:
    """A venv seeing the host's packages through a ``.pth``; pip from the host, else from ensurepip."""
    python = venv_python(path)
    if not python.exists():
        venv.EnvBuilder(with_pip=False, symlinks=True).create(path)
    lines = [f"import site; site.addsitedir({d!r})" for d in host_site_dirs()]
    (venv_site_packages(python) / PTH_NAME).write_text("\n".join(lines) + "\n")
    probe = subprocess.run([str(python), "-c", "import torch; assert torch.version.cuda"], capture_output=True,
                           text=True)
    if probe.returncode:
        tail = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise InstallError(f"{path} cannot import the host's CUDA torch through {PTH_NAME} ({tail})")
    if subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True).returncode:
        subprocess.run([str(python), "-m", "ensurepip", "--default-pip"], check=True, capture_output=True)
    return python


def install(python: Path, wheelhouse: Path) -> None:
    """``pip install --no-index`` of the wheelhouse; on failure, pip's last error line."""
    command = [str(python), "-m", "pip", "install", "--quiet", "--no-index", "--disable-pip-version-check",
               "--find-links", str(wheelhouse), "-r", str(wheelhouse / "requirements.txt")]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or ["?"]
        raise InstallError(f"pip install --no-index of {wheelhouse} failed: {errors[-1]}")


def check_imports(python: Path, repo: Path) -> None:
    """Every module the GPU check imports loads in the new venv (run from the repository root)."""
    code = ("import importlib, sys\nfor name in sys.argv[1:]:\n    try:\n        importlib.import_module(name)\n"
            "    except Exception as exc:\n        sys.exit(f'{name}: {type(exc).__name__}: {exc}')")
    result = subprocess.run([str(python), "-c", code, *GPU_PATH_IMPORTS], cwd=repo, capture_output=True, text=True)
    if result.returncode:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise InstallError(f"{python} cannot import what the GPU check needs: {tail}")


def run(wheelhouse: Path, venv_dir: Path, repo: Path) -> None:
    """Steps 1-6 of the module docstring, printing one line per step."""
    print(f"{PREFIX} host {sys.executable} (Python {sys.version.split()[0]}), {check_torch_has_cuda()}")
    if not (wheelhouse / "requirements.txt").is_file():
        raise InstallError(f"no wheelhouse at {wheelhouse} (build one where pip works with `make wheelhouse` and "
                           "copy it here, or set WHEELHOUSE=...)")
    check_python_tag(wheelhouse)
    host_requirements = wheelhouse / "host-requirements.txt"
    if not host_requirements.is_file():
        raise InstallError(f"{wheelhouse} has no host-requirements.txt: rebuild it with `make wheelhouse`")
    missing = missing_host_packages(host_requirements)
    if missing:
        names = " ".join(_packaging()[0](item.split(" (")[0]).name for item in missing)
        raise InstallError(f"the host lacks what the wheelhouse assumes it has: {'; '.join(missing)}. Rebuild the "
                           f"wheelhouse with them: WHEELHOUSE_ADD=\"{names}\" make wheelhouse")
    python = make_venv(venv_dir)
    print(f"{PREFIX} {venv_dir} sees the host's packages ({len(host_site_dirs())} site dirs linked by {PTH_NAME})")
    install(python, wheelhouse)
    wheels = sorted(re.sub(r"-py.*|-cp.*", "", w.name) for w in wheelhouse.glob("*.whl"))
    print(f"{PREFIX} installed {len(wheels)} wheels without an index: {', '.join(wheels)}")
    check_imports(python, repo)
    print(f"{PREFIX} {venv_dir} imports deepspeed, pydantic, webdataset and holefill's training step")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheelhouse", type=Path, default=Path("wheelhouse"))
    parser.add_argument("--venv", type=Path, default=Path(".venv-gpu"))
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[2]
    try:
        run(args.wheelhouse.resolve(), args.venv.absolute(), repo)
    except InstallError as exc:
        raise SystemExit(f"{PREFIX} {exc}") from None


if __name__ == "__main__":
    main()
