"""Packaging and layering: every package is listed, imports flow one way, ``import opgen`` stays light."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"opgen": "opgen", "ir": "opgen.ir", "schedules": "opgen.schedules", "targets": "opgen.targets"}


def _packages_on_disk() -> set[str]:
    found = set()
    for top, name in MAPPED.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    return found


def test_pyproject_lists_every_package_folder():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(cfg["packages"]) == _packages_on_disk()
    assert cfg["package-dir"] == {v: k for k, v in MAPPED.items()}
    assert (ROOT / "opgen" / "py.typed").exists()


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


def test_imports_flow_one_way():
    """opgen.ir imports no other opgen layer; schedules only ir; targets only ir, schedules, targets."""
    allowed = {"ir": ("opgen.ir",), "schedules": ("opgen.ir", "opgen.schedules"),
               "targets": ("opgen.ir", "opgen.schedules", "opgen.targets")}
    for top, ok in allowed.items():
        for py in (ROOT / top).rglob("*.py"):
            for mod in _imports(py):
                if mod == "opgen" or mod.startswith("opgen."):
                    assert mod.startswith(ok), f"{py.relative_to(ROOT)} imports {mod}"


def test_core_does_not_import_heavy_dependencies_at_module_level():
    heavy = {"torch", "triton", "tvm", "optuna"}
    for top in ("ir", "schedules"):
        for py in (ROOT / top).rglob("*.py"):
            tree = ast.parse(py.read_text())
            for node in tree.body:
                names = {a.name.split(".")[0] for a in getattr(node, "names", [])} if isinstance(node, ast.Import) \
                    else {(node.module or "").split(".")[0]} if isinstance(node, ast.ImportFrom) else set()
                assert not names & heavy, f"{py.relative_to(ROOT)} imports {names & heavy} at module level"


def test_import_opgen_is_light():
    code = ("import sys, opgen, opgen.ir; heavy = [m for m in ('torch', 'triton', 'tvm', 'optuna') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_cli_lists_the_library_from_another_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "opgen.cli", "list"], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert names == ["linear_scan", "selective_scan", "chunk_gla", "causal_conv1d", "conv2d", "long_conv",
                     "attention"]
