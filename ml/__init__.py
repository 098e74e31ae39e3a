"""Graft's transfer-learning engine: a plain PyTorch library (never imports Django)."""

__version__ = "0.1.0"
