"""The reference backend: a torch interpreter of the IR (the oracle and the fallback)."""
from .evaluate import evaluate
from .target import ReferenceTarget

__all__ = ["evaluate", "ReferenceTarget"]
