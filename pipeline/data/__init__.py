"""Data stage: image sources → decoded images → masks → WebDataset shards + manifests → loaders.

``sources`` (Places365 lists, folders, tar archives), ``imageops`` (decode/resize/encode), ``masks`` (mask
generators), ``mask_import`` (external mask folders), ``buckets`` (hole-ratio buckets), ``sharding`` (the shard
job), ``manifest`` (the dataset version record), ``loaders`` (training and eval loaders), ``sample_data``
(a Places-like sample dataset for demos and tests).
"""
