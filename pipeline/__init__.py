"""holefill data and training machinery: sources, masks, shards, manifests, loaders, metrics, training, tracking."""

__version__ = "0.1.0"
