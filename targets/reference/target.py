"""The reference target object (see :mod:`opgen.targets.base`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from opgen.targets.base import Caps

from .evaluate import DEFAULT_MAX_ELEMENTS, evaluate


@dataclass(frozen=True)
class ReferenceTarget:
    """Runs any op with torch on any device; the oracle for every compiled kernel."""

    name: str = "reference"
    max_elements: int = DEFAULT_MAX_ELEMENTS

    def caps(self) -> Caps:
        return Caps(device_kind="any", name="torch reference", cores=os.cpu_count() or 1)

    def available(self) -> tuple[bool, str]:
        try:
            import torch  # noqa: F401
        except ImportError:
            return False, "torch is not installed"
        return True, ""

    def supports(self, op, device_kind: str) -> bool:
        return True

    def run(self, op, inputs: Mapping, binding, node_runner=None) -> dict:
        return evaluate(op, inputs, binding, self.max_elements, node_runner)
