"""holefill's machinery, by stage: ``data`` ← ``train`` ← ``evaluation`` ← ``lifecycle`` (each imports only the
ones before it), with shared plumbing at this level: ``config`` (typed configs), ``paths`` (local paths in configs),
``jobcli`` (the jobs' command line), ``fsutil`` (fsspec helpers), ``raycluster`` (connecting to Ray), ``joblog``
(job logging), ``tracking`` (MLflow runs), ``buckets`` (hole-ratio buckets) and ``metrics`` (pixel metrics used
by training validation and evaluation alike).
"""

__version__ = "0.1.0"
