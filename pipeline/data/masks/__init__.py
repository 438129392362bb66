"""Masks: ``generators`` (the seeded irregular-mask generators and ``make_mask``), ``pool`` (a seeded pool
drawn anew for each image, the official loaders' pairing) and ``importer`` (external mask folders for evaluation).
"""
