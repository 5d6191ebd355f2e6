"""opgen.ir: the symbolic IR (dims, axes, value expressions, Map/Reduce/Scan nodes, ops), range inference,
verification, binding and printing. Needs only sympy, networkx and numpy."""
from .bind import Binding, bind, reduction_terms
from .builder import (BF16, F16, F32, F64, Float, OpBuilder, OpDef, TensorRef, active, axes, axis, compute, max,
                      min, op, prod, reduce, scan, sum)
from .dtypes import DType, accum_dtype, as_dtype, promote
from .errors import ArgumentError, BackendUnavailable, IRError, OpgenError, ShapeError, TraceError
from .expr import (Access, Expr, ExprOp, absolute, cast, const, exp, index, load, log, maximum, minimum, sigmoid,
                   silu, softplus, sqrt, tanh, where)
from .nodes import (MAX, MIN, PROD, SUM, Affine, Associative, Map, Monoid, Reduce, Scan, TensorParam, monoid)
from .op import Op
from .printer import expr_str, index_str, op_str
from .symbols import Axis, Dim, dims
from .traversal import Traversal, backward, column_major, forward, row_major, strided, zigzag
from .verify import AccessStatus, access_report

__all__ = [
    "BF16", "F16", "F32", "F64", "Float", "OpBuilder", "OpDef", "TensorRef", "active", "axes", "axis", "compute",
    "max", "min", "op", "prod", "reduce", "scan", "sum", "DType", "accum_dtype", "as_dtype", "promote",
    "ArgumentError", "BackendUnavailable", "IRError", "OpgenError", "ShapeError", "TraceError", "Access", "Expr",
    "ExprOp", "absolute", "cast", "const", "exp", "index", "load", "log", "maximum", "minimum", "sigmoid", "silu",
    "softplus", "sqrt", "tanh", "where", "MAX", "MIN", "PROD", "SUM", "Affine", "Associative", "Map", "Monoid",
    "Reduce", "Scan", "TensorParam", "monoid", "Op", "expr_str", "index_str", "op_str", "Axis", "Dim", "dims",
    "Traversal", "backward", "column_major", "forward", "row_major", "strided", "zigzag", "Binding", "bind", "reduction_terms",
    "AccessStatus", "access_report",
]
