"""Error types shared by every layer of opgen.

All errors derive from :class:`OpgenError`. Messages name the op, the argument or IR object involved,
what was expected and what came, so a user can fix the call without reading opgen's source.
"""
from __future__ import annotations


class OpgenError(Exception):
    """Base class of every error raised by opgen."""


class IRError(OpgenError, ValueError):
    """An operator declaration is malformed (raised while building or verifying IR)."""


class ShapeError(OpgenError, ValueError):
    """Concrete sizes do not satisfy an op's symbolic shapes or constraints."""


class ArgumentError(OpgenError, ValueError):
    """A public op was called with a bad argument (shape, dtype, device, layout, type)."""


class TraceError(ArgumentError):
    """A user function (score_mod / mask_mod) uses a construct opgen cannot trace into IR."""


class UnsupportedConstruct(TraceError):
    """A traced mod uses a Python or torch construct the tracer has no IR for (the op may fall back)."""


class FallbackWarning(UserWarning):
    """A call ran on a slower fallback path (the warning says which and why)."""


class BackendUnavailable(OpgenError, RuntimeError):
    """A backend cannot run here (missing dependency or device)."""
