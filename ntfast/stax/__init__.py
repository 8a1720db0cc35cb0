"""NT-compatible layers: each returns ``(init_fn, apply_fn, kernel_fn)``.

``import ntfast as nt; nt.stax.serial(nt.stax.Dense(512), nt.stax.Relu(), nt.stax.Dense(1))``
runs Neural Tangents example code unchanged. Layer math lives in :mod:`ntfast.ops`.
"""

from .branching import FanInConcat, FanInProd, FanInSum, FanOut
from .combinators import parallel, repeat, serial
from .conv import Conv
from .elementwise import (
    ABRelu,
    Abs,
    Cos,
    Elementwise,
    ElementwiseNumerical,
    Erf,
    Exp,
    ExpNormalized,
    Gabor,
    Gaussian,
    Gelu,
    Hermite,
    LeakyRelu,
    Monomial,
    Polynomial,
    Rbf,
    RectifiedMonomial,
    Relu,
    Sigmoid_like,
    Sign,
    Sin,
)
from .linear import Dense, DotGeneral, Identity, Index, Slice
from .normalization import Dropout, LayerNorm
from .pooling import AvgPool, Flatten, GlobalAvgPool, GlobalSumPool, SumPool
from .requirements import (
    Bool,
    Diagonal,
    MaskedArray,
    Padding,
    layer,
    requires,
    supports_masking,
    unmask_fn,
)

__all__ = [
    "ABRelu", "Abs", "AvgPool", "Bool", "Conv", "Cos", "Dense", "Diagonal", "DotGeneral",
    "Dropout", "Elementwise", "ElementwiseNumerical", "Erf", "Exp", "ExpNormalized", "FanInConcat",
    "FanInProd", "FanInSum", "FanOut", "Flatten", "Gabor", "Gaussian", "Gelu", "GlobalAvgPool",
    "GlobalSumPool", "Hermite", "Identity", "Index", "LayerNorm", "LeakyRelu", "MaskedArray",
    "Monomial", "Padding", "Polynomial", "Rbf", "RectifiedMonomial", "Relu", "Sigmoid_like",
    "Sign", "Sin", "Slice", "SumPool", "layer", "parallel", "repeat", "requires", "serial",
    "supports_masking", "unmask_fn",
]  # fmt: skip
