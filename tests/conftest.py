"""Shared pytest options: ``--update-golden`` rewrites the golden snapshots under tests/golden/."""
from __future__ import annotations

from dataclasses import replace
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


@pytest.fixture
def reference_backend(monkeypatch):
    """Run the library ops on the reference interpreter (a session with ``backend="reference"``): for tests of an
    op's semantics against independent formulations, whose kernels are tested per backend under tests/targets
    (this spares one cold kernel build per parametrization)."""
    import opgen.attention_op
    import opgen.conv_ops
    import opgen.torch_ops
    from opgen.config import from_env
    from opgen.runtime import make_session

    session = make_session(replace(from_env(), backend="reference"))
    for module in (opgen.attention_op, opgen.conv_ops, opgen.torch_ops):
        monkeypatch.setattr(module, "default_session", lambda: session)
    return session
