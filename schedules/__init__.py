"""opgen.schedules: schedule spaces as data (knobs, their choices, feasibility checks, default configs).

- :mod:`.space`: the types (:class:`Knob`, :class:`Space`, :class:`Config` for the tuner; :class:`TargetKnob`,
  :class:`TargetSpace` for a target's own description of a kernel's knobs);
- :mod:`.scan`, :mod:`.window` (with :mod:`.window_static`), :mod:`.attention`: per family and per target (TVM,
  Triton), the knobs, their checks and default configs; the targets and the tuner read them from here.

Imports flow one way: ``opgen.ir`` <- ``opgen.schedules`` <- ``opgen.targets`` <- ``opgen`` (tests/test_layout.py).
"""
from .space import Config, Knob, Space, TargetKnob, TargetSpace

__all__ = ["Config", "Knob", "Space", "TargetKnob", "TargetSpace"]
