"""``opgen bench``: each case against its baselines in one process, interleaved, medians and ratios.

- :mod:`opgen.bench.protocol`: the measuring protocol (:class:`Impl`, :func:`measure`, :class:`CaseResult`) and the
  record (:func:`environment`, :func:`format_results`, :func:`write_json`), re-exported here;
- :mod:`opgen.bench.cases`: the cases per op (``SUITES``), with :mod:`opgen.bench.attention` and
  :mod:`opgen.bench.conv` for those families;
- :mod:`opgen.bench.baselines`: torch formulations a user would otherwise run (only torch, no opgen imports);
- :mod:`opgen.bench.training`: the training suites (``opgen bench training``, opt-in): model-shaped blocks
  (:mod:`opgen.bench.blocks`: Mamba-1, Mamba-2, ConvNeXt, ResNet, Swin) and the scan ops, forward and
  forward+backward, each verified against torch (output and every gradient) before it is timed.

The command itself is :mod:`opgen.cli.bench`.
"""
from __future__ import annotations

from .protocol import CaseResult, Impl, environment, format_results, measure, write_json

__all__ = ["CaseResult", "Impl", "environment", "format_results", "measure", "write_json"]
