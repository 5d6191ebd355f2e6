"""A last check of generated kernel source before it is executed: only the shapes of code opgen writes.

Every renderer builds its text from names opgen makes (validated identifiers, :mod:`opgen.ir.names`), numbers
and fixed keywords. This guard is the second line of defence behind that rule: before a TVMScript or Triton
module is executed, its syntax tree is checked for what no renderer writes (imports other than the backend's,
dunder names or attributes, calls of ``eval`` / ``exec`` / ``open`` / ``__import__`` and their like, class
definitions, ``global`` statements). A source that fails raises :class:`GeneratedSourceError` and is never run.
"""
from __future__ import annotations

import ast

from opgen.ir.errors import OpgenError

ALLOWED_IMPORTS = frozenset({"tvm.script", "triton", "triton.language", "math"})
FORBIDDEN_NAMES = frozenset({"eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "globals", "locals",
                             "vars", "breakpoint", "input", "help", "memoryview", "object", "type", "super",
                             "os", "sys", "subprocess", "builtins", "importlib", "exit", "quit"})


class GeneratedSourceError(OpgenError, RuntimeError):
    """Generated kernel source contains a construct no opgen renderer writes (it is not executed)."""


def check_generated_source(source: str, origin: str) -> None:
    """Raise :class:`GeneratedSourceError` unless ``source`` has only the constructs opgen's renderers write.

    ``origin`` names the renderer or file for the message."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise GeneratedSourceError(f"{origin}: generated source does not parse (line {exc.lineno}: {exc.msg})") \
            from None
    for node in ast.walk(tree):
        why = _forbidden(node)
        if why:
            line = getattr(node, "lineno", "?")
            raise GeneratedSourceError(f"{origin}: generated source line {line} has {why}; it is not executed "
                                       f"(names in generated code must be ones opgen makes)")


def _forbidden(node: ast.AST) -> str:
    if isinstance(node, ast.Import):
        bad = [a.name for a in node.names if a.name not in ALLOWED_IMPORTS]
        return f"an import of {bad}" if bad else ""
    if isinstance(node, ast.ImportFrom):
        return "" if node.module in ALLOWED_IMPORTS and node.level == 0 else f"an import from {node.module!r}"
    if isinstance(node, ast.Name) and (node.id.startswith("__") or node.id in FORBIDDEN_NAMES):
        return f"the name {node.id!r}"
    if isinstance(node, ast.Attribute) and node.attr.startswith("__"):
        return f"the attribute {node.attr!r}"
    if isinstance(node, (ast.ClassDef, ast.Global, ast.Nonlocal, ast.AsyncFunctionDef, ast.Await, ast.Lambda,
                         ast.Delete)):
        return f"a {type(node).__name__} statement"
    if isinstance(node, ast.FunctionDef) and node.name.startswith("__"):
        return f"the function name {node.name!r}"
    return ""
