"""Reproducible experiments (each a `python -m train_cuda.experiments.<name>` entry point)."""
