"""Shared pytest options: ``--update-golden`` rewrites the golden snapshots under tests/golden/."""
from __future__ import annotations

from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden snapshot files")


@pytest.fixture
def golden(request):
    """``golden(name, text)``: compare ``text`` with tests/golden/name (or write it with --update-golden)."""
    update = request.config.getoption("--update-golden")

    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        if update or not path.exists():
            if not update:
                pytest.fail(f"golden file {path} is missing; run pytest --update-golden to create it")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
            return
        expected = path.read_text().rstrip("\n")
        assert text == expected, f"{name} differs from its golden snapshot (rerun with --update-golden if intended)"
    return check
