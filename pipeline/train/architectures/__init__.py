"""The architectures holefill trains: one module each, registering its :class:`~pipeline.train.spec.ArchitectureSpec`.

A third architecture is a model file under ``models/`` (registering its networks) plus one module here
(registering its spec), listed below.
"""

from pipeline.train.architectures import lbam, rn  # noqa: F401  (each module registers its spec)
