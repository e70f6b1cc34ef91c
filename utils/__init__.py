"""The shared foundation: env factory, configs, run folders, logging, checkpoints, datasets.

Every area imports from here; this package imports none of them.
"""
