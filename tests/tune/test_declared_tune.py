"""Tuning and inspecting user-declared ops: :func:`opgen.tune.declared.tune_op`, ``opgen tune module:attr`` and
``opgen show module:attr``; the next call of the op uses the tuned config; bad names are clear errors."""
from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import opgen
from opgen.config import Config
from opgen.ir import ArgumentError
from opgen.runtime import make_session
from opgen.tune.declared import Declaration, build, load, locate, tune_op

MOD = "opgen_test_declared_tune_ops"       # one name per test run: the shared measuring worker caches modules
SOURCE = '''
import opgen
from opgen import Float


@opgen.op
def decay_scan(x: Float["B C L"], f: Float["B C L"], *, scale: float = 1.0):
    b, c, t = opgen.axes("b c t")
    keep = opgen.sigmoid(f[b, c, t])
    return opgen.scan(t, a=keep, b=(1.0 - keep) * x[b, c, t] * scale, axes=(b, c, t))


def declare():
    return decay_scan.build()


def needs_args(x):
    return decay_scan.build()


not_an_op = 3
'''
SHAPE = {"B": 1, "C": 8, "L": 32}


@pytest.fixture(scope="module")
def decl_module(tmp_path_factory):
    """A module of declarations written to a temp dir on sys.path (the measuring worker imports it by name)."""
    root = tmp_path_factory.mktemp("decl")
    (root / f"{MOD}.py").write_text(SOURCE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield importlib.import_module(MOD)
    sys.modules.pop(MOD, None)


@pytest.fixture(scope="module")
def tvm_measurer():
    """A measuring worker of this module's own: it loads TVM, whose SIGSEGV handler would change the crash reports
    that tests/tune/test_measure.py checks on the shared ``measurer``."""
    from opgen.tune.measure import MeasureOptions, Measurer

    m = Measurer(MeasureOptions(timeout=60.0, setup_timeout=120.0, warmup=1, min_reps=3, min_time_s=0.01))
    yield m
    m.close()


@pytest.fixture
def session(tmp_path, monkeypatch):
    """The default session of this test: a fresh cache dir (kernels and the tuning journal)."""
    import opgen.runtime

    s = make_session(Config(cache_dir=tmp_path / "cache"))
    monkeypatch.setattr(opgen.runtime, "default_session", lambda: s)
    monkeypatch.setenv("OPGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OPGEN_TUNE_STORAGE", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return s


def _inputs(dims=SHAPE):
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(dims["B"], dims["C"], dims["L"], generator=g) for k in ("x", "f")}


def test_tune_op_then_the_next_call_uses_the_tuned_config(decl_module, session, tvm_measurer, monkeypatch):
    op = decl_module.decay_scan.build()
    used = []
    real = session.tuned_config

    def spy(o, b, target):
        cfg = real(o, b, target)
        used.append((target.name, cfg))
        return cfg
    monkeypatch.setattr(session, "tuned_config", spy)
    ins = _inputs()
    before = opgen.run(op, **ins)["out"]
    assert used == [("tvm", None)]                      # nothing tuned yet: the default config, memoized

    res = tune_op(decl_module.decay_scan, SHAPE, trials=2, progress=False, measurer=tvm_measurer,
                   seed=0)
    assert res.best_config is not None and 1 <= res.measured <= 2
    assert res.study_name.startswith("opgen/decay_scan/f32/B1-C8-L32/tvm/")

    after = opgen.run(op, **ins)["out"]                  # same op object, same shape: memo dropped by tune_op
    target, cfg = used[-1]
    assert target == "tvm" and cfg is not None and cfg.to_json() == res.best_config
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)

    # the built op and the name lead to the same declaration, so to the same study
    assert locate(op)[0] == locate(decl_module.decay_scan)[0] == Declaration(f"{MOD}:decay_scan",
                                                                             root=locate(op)[0].root)
    assert locate(f"{MOD}:declare")[1].fingerprint == op.fingerprint


def test_cli_tune_and_show_a_declared_op(decl_module, session, capsys):
    from opgen.cli import main
    from opgen.ir import bind
    from opgen.tune.declared import input_shapes

    name = f"{MOD}:decay_scan"
    assert main(["tune", name, "--shape", "B=1,C=8,L=16", "--trials", "1", "--no-progress", "--static",
                 "scale=2.0", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "opgen/decay_scan/f32/B1-C8-L16/tvm" in out and name in out and "vs torch" not in out
    # what the CLI stored is what a call of the op with that static option finds
    op = decl_module.decay_scan.build(scale=2.0)
    target = session.targets.get("tvm")
    b = bind(op, input_shapes(op, {"B": 1, "C": 8, "L": 16}))
    assert session.tuned_config(op, b, target) is not None
    assert session.tuned_config(decl_module.decay_scan.build(), b, target) is None     # another op: not tuned

    assert main(["show", name, "--stage", "verified"]) == 0
    assert f"fingerprint {decl_module.decay_scan.build().fingerprint}" in capsys.readouterr().out
    assert main(["show", name, "--stage", "fused"]) == 0
    assert "variants:" in capsys.readouterr().out
    assert main(["show", name, "--stage", "tvm", "--shape", "B=1,C=8,L=16"]) == 0
    assert capsys.readouterr().out.startswith("# tvm kernel of decay_scan at B=1, C=8, L=16")
    assert main(["show", name, "--stage", "plan"]) == 2                   # plan needs the sizes
    assert "needs --shape with its dims (B, C, L)" in capsys.readouterr().err
    assert main(["show", name, "--stage", "plan", "--shape", "B=1,C=8"]) == 2
    assert "missing ['L']" in capsys.readouterr().err
    assert main(["show", "linear_scan", "--shape", "B=1"]) == 2           # library ops take no --shape
    assert main(["show", "os:system"]) == 2
    assert "not an op declaration" in capsys.readouterr().err
    assert main(["tune", "a b:c", "--shape", "B=1"]) == 2
    assert "op: expected" in capsys.readouterr().err


MALFORMED = ["a b:c", "mod", "", "a:b:c", "a.:b", ":b", "a:", "pkg/mod:x", "mod:1x", "os;x:y"]


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_names_import_nothing(name, session, monkeypatch):
    def no_import(*a, **k):
        raise AssertionError(f"imported {a} for a malformed name")
    monkeypatch.setattr(importlib, "import_module", no_import)
    with pytest.raises(ArgumentError, match=r"^decl: expected .*'package.module:attribute'.* got "):
        tune_op(name, SHAPE, trials=1, progress=False)


@pytest.mark.parametrize("name, message", [
    ("os:system", r"'os:system' is an object of type builtin_function_or_method, not an op declaration"),
    (f"{MOD}:missing", rf"module '{MOD}' has no attribute 'missing'"),
    ("opgen_no_such_pkg.mod:missing", r"no module named 'opgen_no_such_pkg' on sys.path"),
    (f"{MOD}:not_an_op", r"is an object of type int, not an op declaration"),
    (f"{MOD}:needs_args", r"the function needs arguments \['x'\]"),
    ("os.path:join", r"the function needs arguments"),
])
def test_bad_names_are_clear_errors(name, message, decl_module, session):
    with pytest.raises(ArgumentError, match=message):
        tune_op(name, SHAPE, trials=1, progress=False)


def test_bad_shapes_and_options(decl_module, session):
    with pytest.raises(ArgumentError, match=r"shape: op decay_scan takes dims B, C, L; missing \['L'\]"):
        tune_op(decl_module.decay_scan, {"B": 1, "C": 8}, progress=False)
    with pytest.raises(ArgumentError, match=r"unknown \['N'\]"):
        tune_op(decl_module.decay_scan, {**SHAPE, "N": 4}, progress=False)
    with pytest.raises(ArgumentError, match="trials must be a positive int"):
        tune_op(decl_module.decay_scan, SHAPE, trials=0, progress=False)
    with pytest.raises(ArgumentError, match="backend: expected one of auto, tvm, triton"):
        tune_op(decl_module.decay_scan, SHAPE, backend="cuda", progress=False)
    with pytest.raises(ArgumentError, match="static options must be JSON values"):
        tune_op(decl_module.decay_scan, SHAPE, scale=object(), progress=False)
    with pytest.raises(ArgumentError, match="carries its static options"):
        tune_op(decl_module.decay_scan.build(), SHAPE, scale=2.0, progress=False)


def test_local_and_interactive_declarations_are_refused_with_the_fix(session, monkeypatch):
    def make():
        @opgen.op
        def local_op(x: opgen.Float["B"]):  # noqa: F821 (a dims string, not a name)
            (b,) = opgen.axes("b")
            return opgen.compute(x[b] * 2.0, (b,))
        return local_op

    with pytest.raises(ArgumentError, match="declared inside a function .*declare it at module level"):
        tune_op(make(), {"B": 4}, progress=False)
    d = make()
    fake_main = type(sys)("__main__")                 # a REPL's __main__: no __file__
    fake_main.local_op = d
    monkeypatch.setattr(d.fn, "__module__", "__main__")
    monkeypatch.setattr(d.fn, "__qualname__", "local_op")
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    with pytest.raises(ArgumentError, match="interactive __main__ .*put the declaration in a module file"):
        tune_op(d, {"B": 4}, progress=False)


def test_a_script_declaration_is_imported_by_file_without_running_its_main_block(tmp_path, monkeypatch):
    script = tmp_path / "my_script.py"
    marker = tmp_path / "main-block-ran"
    script.write_text(SOURCE + textwrap.dedent(f'''
        if __name__ == "__main__":
            open({str(marker)!r}, "w").close()
        '''))
    spec = importlib.util.spec_from_file_location("my_script_as_main", script)
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    main.__name__ = "__main__"
    with monkeypatch.context() as m:                # the script as it runs: python my_script.py
        m.setitem(sys.modules, "__main__", main)
        m.setattr(main.decay_scan.fn, "__module__", "__main__")
        where, op, _, _ = locate(main.decay_scan)
    assert where == Declaration("__main__:decay_scan", file=str(script))
    obj, mod = load(where)                            # what a worker (another __main__) does
    assert mod is not main and mod.__name__.startswith("_opgen_main_") and Path(mod.__file__) == script
    assert build(obj, where.qualname, None, {}, mod).fingerprint == op.fingerprint
    assert not marker.exists()
    (tmp_path / "not_py.txt").write_text(SOURCE)
    with pytest.raises(ArgumentError, match="not a regular .py file"):
        load(Declaration("__main__:decay_scan", file=str(tmp_path / "not_py.txt")))
