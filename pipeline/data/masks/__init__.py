"""Masks: ``generators`` (the seeded irregular-mask generators, ``MaskSettings`` and ``make_mask``), ``pool`` (a seeded
pool drawn anew for each image, the official loaders' pairing), ``importer`` (external mask folders for evaluation or
as a training pool) and ``stats`` (the generators' hole-ratio table beside LaMa's, ``jobs/mask_stats.py``).
"""
