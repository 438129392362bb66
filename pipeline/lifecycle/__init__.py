"""Lifecycle stage: what happens to a trained model. ``packaging`` (a generator as an MLflow model: log,
register, load), ``training`` (train + register), ``evaluations`` (evaluate model references and registered
versions), ``promotion`` (aliases and the promotion gate), ``retraining`` (incremental retraining),
``inference`` (inpaint files with a model reference).
"""
