"""opgen.schedules: schedule spaces (knobs and constraints as data) and kernel plans."""
from .space import Config, Knob, Space, TargetKnob, TargetSpace

__all__ = ["Config", "Knob", "Space", "TargetKnob", "TargetSpace"]
