"""opgen.schedules: schedule spaces (knobs and constraints as data) and kernel plans."""
from .space import Config, Knob, Space

__all__ = ["Config", "Knob", "Space"]
