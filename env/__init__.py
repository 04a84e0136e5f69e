"""Environments that score model output for post-training."""
