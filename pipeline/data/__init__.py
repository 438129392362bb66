"""Data stage: image sources → decoded images → masks → WebDataset shards + manifests → loaders.

``sources`` (Places365 lists, folders, tar archives; ``SourceSettings``), ``imageops`` (decode/resize/encode),
``masks/`` (``generators``: the seeded mask generators and ``MaskSettings``; ``pool``: a training mask pool drawn per
load; ``importer``: external mask folders; ``stats``: the generators' hole-ratio table), ``shardjob/`` (the shard job:
``config``, ``plan``, ``task``, ``driver``, ``run``), ``tario`` (the tar format), ``manifest`` (the dataset version
record), ``shard_stream`` (shard lists and the checked, resumed read of a shard), ``train_geometry`` (every crop:
training geometries and the eval centre crop), ``loaders`` (training and eval loaders as webdataset stages),
``sample_data`` (a Places-like sample dataset for demos and tests). Hole-ratio buckets are plumbing:
``pipeline.buckets``.
"""
