"""What the tests share: fixtures as pytest plugins (``local_stack``, ``serving_helpers``, ``suite_log``, ``s3_server``),
reference weights and data (``pattern_weights``, ``metrics_pattern``, ``eval_helpers``), fault injection
(``fault_proxy``), and the probes run as subprocesses by path (``engine_probe``, ``official_probe``). Imported as
``support.<module>``: ``tests/`` is on ``sys.path`` (``tests/conftest.py``, ``tests/gpu/conftest.py``)."""
