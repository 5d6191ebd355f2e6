"""opgen.targets: the backend interface (:mod:`opgen.targets.base`) and the backends (``reference`` now)."""
from .base import Caps, Target, TargetRegistry

__all__ = ["Caps", "Target", "TargetRegistry"]
