"""Argument types and helpers shared by the commands that take an op: ``--shape``, ``--static``, ``--dtype``, and
declared ops (``package.module:attribute``)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def parse_shape(text: str) -> dict[str, int]:
    """``B=2,D=256`` -> ``{"B": 2, "D": 256}`` (argparse type of ``--shape``)."""
    dims: dict[str, int] = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"--shape expects NAME=INT pairs like B=2,D=256,N=16,L=512; got {part!r}")
        dims[name.strip()] = int(value)
    return dims


def parse_static(text: str) -> tuple[str, Any]:
    """``k=v`` -> ``("k", v)``, ``v`` read as a Python literal (``3``, ``0.5``, ``True``, ``'x'``) or else kept as
    the string (argparse type of ``--static``)."""
    import ast

    name, eq, value = text.partition("=")
    if not eq or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"--static expects NAME=VALUE like reverse=True or chunk=64; got {text!r}")
    try:
        v = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        v = value.strip()
    return name.strip(), v


def is_declared(name: str) -> bool:
    """Whether a command's op argument names a user declaration (``package.module:attribute``), not a library op."""
    return ":" in name


def declared_path() -> None:
    """Let a command import declarations from the current directory, as ``python -m`` does (the ``opgen`` console
    script's own directory is on sys.path instead)."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)


def add_declared_args(p: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--static`` of a command that takes a declared op."""
    p.add_argument("--dtype", default=None, choices=("float32", "float64", "bfloat16", "float16"),
                   help="the dtype a declared op is built with (default float32; library ops: float32)")
    p.add_argument("--static", type=parse_static, action="append", default=[], metavar="NAME=VALUE",
                   help="a static (keyword-only) option of a declared op, read as a Python literal (repeatable)")
