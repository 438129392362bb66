"""holefill models: RN and LBAM generators/discriminators, losses, VGG16 features, official-checkpoint converters.

Model files know nothing of Ray, MLflow or files. Each architecture's model file registers itself in
:mod:`models.registry` (``"rn"``, ``"lbam"``) when imported; importing this package imports them all.
"""

from models import lbam, rn  # noqa: F401  (each model file registers its architecture)
