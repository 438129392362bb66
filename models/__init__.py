"""holefill models: RN and LBAM generators/discriminators, losses, VGG16 features, official-checkpoint converters.

Model files know nothing of Ray, MLflow or files. Architectures are looked up by name in
:mod:`models.registry` (``"rn"``, ``"lbam"``).
"""
