"""Distributed GAN training of RN and LBAM on Ray Train with one DeepSpeed engine per network.

``spec`` and ``architectures`` (one spec per trainable architecture: its networks, typed options, recipe),
``recipes`` (how each trains, and the one GAN step), ``config`` (what a job may set), ``engines`` (DeepSpeed
engines and precision), ``loop`` (the per-worker loop), ``checkpoint`` (what a checkpoint holds) and
``launch`` (:func:`run_training`, the driver).
"""

from pipeline.train.config import TrainJobConfig, check_train_config, load_train_config
from pipeline.train.launch import TrainingResult, run_training

__all__ = ["TrainJobConfig", "TrainingResult", "check_train_config", "load_train_config", "run_training"]
