"""holefill models: RN and LBAM generators/discriminators, losses, VGG16 features, official-checkpoint converters.

Model files know nothing of Ray, MLflow or files. Each architecture's model file registers itself in
:mod:`models.registry` (``"rn"``, ``"lbam"``) when imported; importing this package imports every module in it,
so a new architecture is a new model file here and nothing else in this package.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module
