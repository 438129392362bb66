"""The shard job: sources in, WebDataset shards with precomputed masks and a manifest out.

``config`` (``ShardJobConfig`` and its rules), ``plan`` (deterministic assignment of sources to shards, eval-set
balancing, the plan fingerprint), ``task`` (one shard: read, decode, encode, write, verify), ``driver`` (Ray
scheduling of the tasks, progress, retries), ``run`` (the entry point ``run_shard_job``: plan, run, regroup, publish).
"""
