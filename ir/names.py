"""The one rule for names that may reach generated source: plain ASCII identifiers.

Renderers paste op, tensor, dim and axis names into TVMScript and Triton source behind fixed prefixes
(``b_``, ``h_``, ``n_``, ``dim_``, ...). Every such name is checked here when the IR object that carries it is
created, so a name read from a spec string, a tuning record or a user declaration can never be more than an
identifier: no quote, newline, bracket or operator can reach a generated file.
"""
from __future__ import annotations

import keyword
import re

from .errors import IRError

MAX_NAME_LENGTH = 128
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def is_safe_name(name: object) -> bool:
    """True when ``name`` is an ASCII Python identifier (not a keyword) of at most ``MAX_NAME_LENGTH`` chars."""
    return (isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and _IDENT.match(name) is not None
            and not keyword.iskeyword(name))


def check_qualname(kind: str, name: object) -> str:
    """A dotted name (``conv2d_backward.t0``) whose every part passes :func:`check_name`."""
    if not isinstance(name, str) or len(name) > 4 * MAX_NAME_LENGTH \
            or not all(is_safe_name(part) for part in name.split(".")):
        raise IRError(f"{kind} name {_shown(name)} is not allowed: expected ASCII identifiers joined by '.' "
                      f"([A-Za-z_][A-Za-z0-9_]*, no Python keyword)")
    return name


def _shown(name: object) -> str:
    return repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80]) + "..."


def check_name(kind: str, name: object) -> str:
    """``name`` itself when :func:`is_safe_name`, else an :class:`IRError` naming ``kind`` and the name."""
    if not is_safe_name(name):
        raise IRError(f"{kind} name {_shown(name)} is not allowed: expected an ASCII identifier ([A-Za-z_][A-Za-z0-9_]*, "
                      f"at most {MAX_NAME_LENGTH} characters, not a Python keyword)")
    return name
