"""The operator library, declared in the IR. Each function validates its arguments, builds (and caches) the IR
for the call's dtypes and options, and runs it on the best available backend."""
from .attention import attention
from .conv import causal_conv1d, conv2d, long_conv
from .scan import chunk_gla, linear_scan, selective_scan

__all__ = ["attention", "causal_conv1d", "chunk_gla", "conv2d", "linear_scan", "long_conv", "selective_scan"]
