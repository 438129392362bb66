"""The architectures holefill trains: one module each, holding that architecture's typed settings (``model.options``),
its fixed and official recipes, and the :class:`~pipeline.train.spec.ArchitectureSpec` it registers on import.

Every module of this package is imported here (found by listing the package, not by name), so a third
architecture is a model file under ``models/`` (registering its networks) plus one module here (registering its
spec); nothing else is edited (``tests/test_architecture_spec.py`` shows it with a toy one).
"""

import importlib
import pkgutil

__all__ = ["ARCHITECTURE_MODULES"]

# Each module registers its spec when imported (pipeline.train.spec.register_spec); sorted: a stable order.
ARCHITECTURE_MODULES = tuple(
    importlib.import_module(f"{__name__}.{info.name}")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name)
)
