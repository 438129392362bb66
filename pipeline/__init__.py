"""holefill's machinery, by stage: ``data`` ← ``train`` ← ``evaluation`` ← ``lifecycle`` (each imports only the
ones before it), with shared plumbing at this level: ``config`` (typed configs), ``jobcli`` (the jobs' command
line), ``fsutil`` (fsspec helpers), ``joblog`` (job logging), ``tracking`` (MLflow runs) and ``metrics``
(pixel metrics used by training validation and evaluation alike).
"""

__version__ = "0.1.0"
