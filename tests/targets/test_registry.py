"""The target interface: explicit registries reject duplicates and select the first usable target."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from opgen.ops.scan import declare_linear_scan
from opgen.targets import Caps, Target, TargetRegistry
from opgen.targets.reference import ReferenceTarget


@dataclass(frozen=True)
class _Missing:
    name: str = "missing"

    def caps(self) -> Caps:
        return Caps(device_kind="cuda")

    def available(self):
        return False, "no GPU here"

    def supports(self, op, device_kind):
        return True

    def run(self, op, inputs, binding):  # pragma: no cover - never selected
        raise AssertionError("an unavailable target must not run")


def test_reference_target_satisfies_the_protocol():
    assert isinstance(ReferenceTarget(), Target)
    assert ReferenceTarget().available() == (True, "")


def test_registry_skips_unavailable_and_rejects_duplicates():
    reg = TargetRegistry((_Missing(), ReferenceTarget()))
    assert reg.select(declare_linear_scan(), "cpu").name == "reference"
    with pytest.raises(ValueError, match="already registered"):
        reg.add(ReferenceTarget())
    only_missing = TargetRegistry((_Missing(),))
    with pytest.raises(LookupError, match="no GPU here"):
        only_missing.select(declare_linear_scan(), "cuda")
