"""opgen.schedules: schedule spaces (knobs and constraints as data), kernel plans and per-family strategies.

The spaces arrive with the compiled backends; the IR they plan over is :mod:`opgen.ir`.
"""
