"""Confide: privacy-preserving federated training on Flower."""

__version__ = "0.1.0"
