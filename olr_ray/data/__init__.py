"""Datasets: the CelebA reader and the built-in synthetic CelebA-like faces."""
