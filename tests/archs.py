"""Seeded generator of small NT-valid architectures, shared by the parity sweep and the benchmarks.

An architecture is a plain-data :class:`Spec`: a layer tree of ``(layer_name, kwargs)`` nodes, the
input shapes, the ``kernel_fn`` call arguments (``x2``, ``get``, ``mask_constant``,
``diagonal_batch`` / ``diagonal_spatial``) and a seed for the inputs. :func:`build` instantiates the
same network from any module with NT's ``stax`` API (``ntfast.stax`` or NT 0.6.5's ``stax``), so
one spec drives both sides of a parity check.

Combinators are nodes too: ``("serial", {"layers": (...)})``, ``("parallel", {"layers": (...)})``,
``("repeat", {"layer": node, "n": 2})``. Callables (``Elementwise``'s ``fn``/``nngp_fn``,
``ElementwiseNumerical``'s ``fn``/``df``) are named by strings and resolved in :func:`build`;
``DotGeneral`` constants are nested tuples of floats.

The generator tracks the activation shape and its batch / channel axes layer by layer (strides and
VALID windows never shrink an axis below 1; every nonlinearity follows an affine layer; FanIn
branches have matching shapes), so every spec is a valid network for NT's ``kernel_fn``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Every public layer the sweep must exercise (the coverage test asserts each appears).
ELEMENTWISE = (
    "Relu",
    "ABRelu",
    "LeakyRelu",
    "Abs",
    "Erf",
    "Sigmoid_like",
    "Gelu",
    "Sin",
    "Cos",
    "Rbf",
    "Exp",
    "Gaussian",
    "Gabor",
    "ExpNormalized",
    "Sign",
    "Hermite",
    "Monomial",
    "RectifiedMonomial",
    "Polynomial",
    "Elementwise",
    "ElementwiseNumerical",
)
LINEAR = (
    "Dense",
    "Conv",
    "AvgPool",
    "SumPool",
    "GlobalAvgPool",
    "GlobalSumPool",
    "Flatten",
    "Identity",
    "DotGeneral",
    "Index",
    "LayerNorm",
    "Dropout",
)
COMBINATORS = (
    "serial",
    "parallel",
    "repeat",
    "FanOut",
    "FanInSum",
    "FanInProd",
    "FanInConcat",
)
ALL_LAYERS = ELEMENTWISE + LINEAR + COMBINATORS

Node = tuple  # (layer_name, kwargs dict)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One architecture and one ``kernel_fn`` call on it.

    Attributes:
      name: readable pytest id (family, index and the distinguishing choices).
      net: the layer tree (a ``serial`` node).
      x_shapes: shape of ``x1`` (batch axis 0), or one shape per leaf when ``tree`` is True.
      n2: batch size of ``x2``; ``None`` means ``x2=None``; ``"same"`` passes a copy of ``x1``.
      tree: inputs are a list of arrays (an NTTree) fed to a top-level ``parallel``.
      get: ``None``, a string, or a tuple of strings.
      kwargs: extra ``kernel_fn`` keyword arguments (``diagonal_batch``, ``diagonal_spatial``,
        ``mask_constant``).
      mask_positions: positions ``(example, *spatial)`` of ``x1`` / ``x2`` set to the mask constant
        in all channels (only with ``mask_constant`` in ``kwargs``).
      seed: seed of the inputs.
    """

    name: str
    net: Node
    x_shapes: tuple
    n2: Any = None
    tree: bool = False
    get: Any = None
    kwargs: tuple = ()
    mask_positions: tuple = ()
    seed: int = 0

    @property
    def kernel_kwargs(self) -> dict:
        return dict(self.kwargs)

    def layer_names(self) -> set:
        """Names of every layer and combinator in the tree (for the coverage test)."""
        return _names(self.net)


def _names(node: Node) -> set:
    name, kw = node
    out = {name}
    if name in ("serial", "parallel"):
        for child in kw["layers"]:
            out |= _names(child)
    elif name == "repeat":
        out |= _names(kw["layer"])
    return out


# ----------------------------------------------------------------------------------------------
# Building networks from specs.


def _erf_nngp(cov12, var1, var2):
    """E[erf(u) erf(v)] for (u, v) ~ N(0, [[var1, cov12], [cov12, var2]])."""
    prod = (1 + 2 * var1) * (1 + 2 * var2)
    return jnp.arcsin(2 * cov12 / jnp.sqrt(prod)) * 2 / np.pi


def _erf_d_nngp(cov12, var1, var2):
    prod = (1 + 2 * var1) * (1 + 2 * var2)
    return 4 / (np.pi * jnp.sqrt(prod - 4 * cov12**2))


def _sin_nngp(cov12, var1, var2):
    """E[sin(u) sin(v)] = exp(-(var1 + var2) / 2) sinh(cov12)."""
    return jnp.exp(-(var1 + var2) / 2) * jnp.sinh(cov12)


def _sin_d_nngp(cov12, var1, var2):
    return jnp.exp(-(var1 + var2) / 2) * jnp.cosh(cov12)


def _sin(x):
    return jnp.sin(x)


def _cos(x):
    return jnp.cos(x)


def _tanh(x):
    return jnp.tanh(x)


def _tanh_grad(x):
    return 1 - jnp.tanh(x) ** 2


def _softplus(x):
    return jax.nn.softplus(x)


FUNCTIONS = {
    "erf": jax.scipy.special.erf,
    "erf_nngp": _erf_nngp,
    "erf_d_nngp": _erf_d_nngp,
    "sin": _sin,
    "cos": _cos,
    "sin_nngp": _sin_nngp,
    "sin_d_nngp": _sin_d_nngp,
    "tanh": _tanh,
    "tanh_grad": _tanh_grad,
    "softplus": _softplus,
}


def _materialize(name: str, kw: dict) -> dict:
    kw = dict(kw)
    if name in ("Elementwise", "ElementwiseNumerical"):
        for key in ("fn", "nngp_fn", "d_nngp_fn", "df"):
            if isinstance(kw.get(key), str):
                kw[key] = FUNCTIONS[kw[key]]
    if name == "DotGeneral":
        for key in ("lhs", "rhs"):
            if isinstance(kw.get(key), tuple):
                kw[key] = jnp.asarray(np.array(kw[key], np.float64))
    return kw


def _sign_nngp(cov12, var1, var2):
    """E[sign(u) sign(v)] = (2/pi) arcsin(cov12 / sqrt(var1 var2)), 0 where a variance is 0."""
    prod = var1 * var2
    safe = jnp.where(prod > 0, prod, 1.0)
    rho = jnp.clip(cov12 / jnp.sqrt(safe), -1.0, 1.0)
    return jnp.where(prod > 0, jnp.arcsin(rho) * 2 / np.pi, 0.0)


def _zero(cov12, var1, var2):
    return jnp.zeros_like(cov12)


def build(spec_or_node, stax, fix_nt_defects: bool = False):
    """Instantiates ``(init_fn, apply_fn, kernel_fn)`` of a spec (or layer node) from ``stax``.

    ``fix_nt_defects`` (for the NT side of a parity check) swaps layers whose NT 0.6.5 kernel is
    wrong for a correct equivalent built from NT's own machinery:

    - ``Sign``: NT sets every entry of cov1/cov2 to 1, which is right only for the variances;
      the location-location entries of a full-spatial (or diagonal_batch=False) cov1 are
      (2/pi) arcsin(rho), like nngp. Replaced by ``Elementwise(sign, arcsin kernel, 0)``, which
      applies the same formula to nngp, cov1 and cov2 (and zeroes the NTK, as NT's Sign does).
    - ``RectifiedMonomial(degree=1)``: NT's is NaN on and inaccurate near the x1 == x2 diagonal
      (unclipped arccos); replaced by the identical ``Relu``. Other degrees keep NT's layer and the
      NaN-tolerant comparison.
    """
    node = spec_or_node.net if isinstance(spec_or_node, Spec) else spec_or_node
    name, kw = node
    if name in ("serial", "parallel"):
        return getattr(stax, name)(*(build(child, stax, fix_nt_defects) for child in kw["layers"]))
    if name == "repeat":
        return stax.repeat(build(kw["layer"], stax, fix_nt_defects), kw["n"])
    if fix_nt_defects and name == "Sign":
        return stax.Elementwise(fn=jnp.sign, nngp_fn=_sign_nngp, d_nngp_fn=_zero)
    if fix_nt_defects and name == "RectifiedMonomial" and kw["degree"] == 1:
        # relu(x)^1 == relu(x): NT's Relu computes the same kernel with a clipped arc-cosine,
        # where NT's RectifiedMonomial is NaN on (and inaccurate near) the x1 == x2 diagonal;
        # e.g. on jax 0.12 spec 091 had finite NT entries 3e-4 off after a LayerNorm.
        return stax.Relu()
    return getattr(stax, name)(**_materialize(name, kw))


def make_inputs(spec: Spec, dtype=np.float64):
    """Deterministic ``(x1, x2)`` for a spec; ``x2`` is ``None`` when ``spec.n2`` is ``None``."""
    rng = np.random.RandomState(spec.seed)
    shapes = spec.x_shapes if spec.tree else (spec.x_shapes,)
    mask_constant = dict(spec.kwargs).get("mask_constant")

    def one(shape, which):
        x = rng.standard_normal(shape).astype(dtype)
        if mask_constant is not None:
            for pos in spec.mask_positions:
                if pos[0] == which and pos[1] < shape[0]:
                    x[pos[1:]] = mask_constant  # all channels of one position
        return jnp.asarray(x)

    x1 = [one(s, 1) for s in shapes]
    if spec.n2 is None:
        x2 = None
    elif spec.n2 == "same":
        x2 = [jnp.array(np.array(x)) for x in x1]
    else:
        x2 = [one((spec.n2,) + tuple(s[1:]), 2) for s in shapes]
    if not spec.tree:
        return x1[0], None if x2 is None else x2[0]
    return x1, x2


def kernel_call(spec: Spec, kernel_fn, x1=None, x2=None, jit: bool = False, **extra):
    """Calls ``kernel_fn`` the way the spec says (inputs default to :func:`make_inputs`).

    With ``jit=True`` the call is traced once with ``get`` and the keyword arguments static: on
    CPU one XLA compilation of the whole network is ~10x cheaper than NT's op-by-op dispatch.
    """
    if x1 is None:
        x1, x2 = make_inputs(spec)
    kwargs = {**spec.kernel_kwargs, **extra}

    def call(a, b):
        return kernel_fn(a, b, spec.get, **kwargs)

    return jax.jit(call)(x1, x2) if jit else call(x1, x2)


# ----------------------------------------------------------------------------------------------
# Comparing outputs.

KERNEL_ARRAYS = ("nngp", "ntk", "cov1", "cov2")
KERNEL_STATIC = (
    "is_gaussian",
    "is_reversed",
    "is_input",
    "diagonal_batch",
    "diagonal_spatial",
    "shape1",
    "shape2",
    "batch_axis",
    "channel_axis",
    "x1_is_x2",
)


def rel_err(actual, expected) -> float:
    """max|actual - expected| / max|expected| (absolute error when ``expected`` is all zeros)."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    if not np.array_equal(np.isnan(a), np.isnan(e)):
        return math.inf
    ok = ~np.isnan(e)
    if not ok.any():
        return 0.0
    diff = np.max(np.abs(a[ok] - e[ok]))
    scale = np.max(np.abs(e[ok]))
    return float(diff / scale) if scale > 0 else float(diff)


def _is_kernel(x) -> bool:
    return all(hasattr(x, f) for f in KERNEL_ARRAYS + ("is_reversed", "mask1"))


def _static_equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_static_equal(x, y) for x, y in zip(a, b))
    return np.array_equal(np.asarray(a), np.asarray(b))


def compare(
    actual, expected, rtol: float = 1e-6, path: str = "out", nt_nan_ok: bool = False
) -> list:
    """Differences between an ntfast ``kernel_fn`` output and NT's, as readable strings.

    Handles Kernels (arrays with ``rtol``; static fields and masks exactly), namedtuples from
    ``get``, bare arrays/scalars and NTTrees (lists/tuples of those). NaN patterns must match,
    except with ``nt_nan_ok``: entries where NT is NaN (a known NT defect, e.g.
    ``RectifiedMonomial`` on the x1 == x2 diagonal) must be finite in ntfast and are left out of
    the error.
    """
    problems = []
    if _is_kernel(expected):
        if not _is_kernel(actual):
            return [f"{path}: expected a Kernel, got {type(actual).__name__}"]
        for f in KERNEL_ARRAYS:
            problems += compare(
                getattr(actual, f), getattr(expected, f), rtol, f"{path}.{f}", nt_nan_ok
            )
        for f in KERNEL_STATIC + ("mask1", "mask2"):
            a, e = getattr(actual, f), getattr(expected, f)
            if f in ("shape1", "shape2") and a is not None and e is not None:
                a, e = tuple(a), tuple(e)
            if not _static_equal(a, e):
                problems.append(f"{path}.{f}: {_short(a)} != NT {_short(e)}")
        return problems
    if hasattr(expected, "_fields"):  # namedtuple from `get=(...)`
        if not hasattr(actual, "_fields") or tuple(actual._fields) != tuple(expected._fields):
            return [f"{path}: expected namedtuple {expected._fields}, got {_short(actual)}"]
        for f in expected._fields:
            problems += compare(
                getattr(actual, f), getattr(expected, f), rtol, f"{path}.{f}", nt_nan_ok
            )
        return problems
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return [f"{path}: expected a {type(expected).__name__} of {len(expected)}"]
        if type(actual) is not type(expected):
            problems.append(f"{path}: type {type(actual).__name__} != {type(expected).__name__}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            problems += compare(a, e, rtol, f"{path}[{i}]", nt_nan_ok)
        return problems
    if expected is None or actual is None:
        if not (expected is None and actual is None):
            problems.append(f"{path}: {_short(actual)} != NT {_short(expected)}")
        return problems
    if isinstance(expected, (bool, np.bool_)) or np.asarray(expected).dtype == bool:
        if not _static_equal(actual, expected):
            problems.append(f"{path}: {_short(actual)} != NT {_short(expected)}")
        return problems
    if np.shape(actual) != np.shape(expected):
        return [f"{path}: shape {np.shape(actual)} != NT {np.shape(expected)}"]
    if nt_nan_ok:
        nt_nan = np.isnan(np.asarray(expected))
        if np.isnan(np.asarray(actual)[nt_nan]).any():
            problems.append(f"{path}: NaN where NT is NaN (the NT defect should be fixed)")
        actual = np.where(nt_nan, np.nan, np.asarray(actual))
    err = rel_err(actual, expected)
    if not err <= rtol:
        problems.append(f"{path}: rel err {err:.3g} > {rtol:g}")
    return problems


def _short(x) -> str:
    if hasattr(x, "shape") and getattr(x, "ndim", 0) > 0:
        return f"array{tuple(x.shape)}"
    return repr(x)[:60]


# ----------------------------------------------------------------------------------------------
# The generator.


class _State:
    """Activation shape of one input batch plus its batch / channel axes and Gaussianity."""

    def __init__(self, shape, channel_axis, gaussian=False):
        self.shape = tuple(shape)
        self.input_shape = self.shape  # what the network is fed
        self.channel = channel_axis % len(shape)
        self.gaussian = gaussian

    def copy(self):
        return _State(self.shape, self.channel, self.gaussian)

    @property
    def spatial(self):
        return tuple(i for i in range(len(self.shape)) if i not in (0, self.channel))

    @property
    def ca(self) -> int:
        """Channel axis as a layer argument (``-1`` when trailing, as users write it)."""
        return -1 if self.channel == len(self.shape) - 1 else self.channel

    def lhs_spec(self) -> str:
        letters = iter({1: "W", 2: "HW", 3: "DHW"}[len(self.spatial)])
        return "".join(
            "N" if i == 0 else "C" if i == self.channel else next(letters)
            for i in range(len(self.shape))
        )


class _Gen:
    """Random choices plus round-robin pools that guarantee coverage over the sweep."""

    def __init__(self, seed):
        self.rng = np.random.RandomState(seed)
        order = list(ELEMENTWISE)
        self.rng.shuffle(order)
        self._nonlins = order
        self._next_nonlin = 0
        self._paddings = ["SAME", "VALID", "CIRCULAR"]
        self._next_padding = 0
        self._cycles = {}

    def choice(self, seq):
        return seq[self.rng.randint(len(seq))]

    def cycle(self, key: str, seq):
        """Round-robin over ``seq`` per ``key``: every option appears once per ``len(seq)`` calls,
        so coverage does not hinge on the random draws."""
        i = self._cycles.get(key, 0)
        self._cycles[key] = i + 1
        return seq[i % len(seq)]

    def coin(self, p=0.5) -> bool:
        return bool(self.rng.rand() < p)

    def std(self) -> float:
        return float(np.round(self.rng.uniform(0.5, 2.0), 3))

    def b_std(self):
        return self.choice([None, 0.0, float(np.round(self.rng.uniform(0.05, 0.5), 3))])

    def next_nonlin_name(self) -> str:
        name = self._nonlins[self._next_nonlin % len(self._nonlins)]
        self._next_nonlin += 1
        return name

    def next_padding(self) -> str:
        p = self._paddings[self._next_padding % 3]
        self._next_padding += 1
        return p

    # -- layers ----------------------------------------------------------------------------

    def dense(self, st: _State, out=None, **over) -> Node:
        out = out or int(self.rng.randint(1, 4))
        kw = {"out_dim": out, "W_std": self.std(), "b_std": self.b_std()}
        if self.coin(0.3):
            kw["parameterization"] = "standard"
            if self.coin(0.5):
                kw["s"] = (int(self.rng.randint(1, 3)), int(self.rng.randint(1, 3)))
        if st.ca != -1:
            kw["channel_axis"] = st.ca
        kw.update(over)
        shape = list(st.shape)
        # NT's standard parameterization builds `out_dim * s[1]` channels (width multiplier).
        shape[st.channel] = out * (kw.get("s", (1, 1))[1] if "parameterization" in kw else 1)
        st.shape, st.gaussian = tuple(shape), True
        return ("Dense", kw)

    def conv(self, st: _State, padding=None, out_spec=None, strides_ok=True, **over) -> Node:
        padding = padding or self.next_padding()
        filt, strides, new = [], [], list(st.shape)
        for ax in st.spatial:
            size = st.shape[ax]
            f = int(self.rng.randint(1, min(3, size) + 1))
            s = int(self.rng.randint(1, 3)) if strides_ok and self.coin(0.35) else 1
            filt.append(f)
            strides.append(s)
            new[ax] = (size - f) // s + 1 if padding == "VALID" else -(-size // s)
        lhs = st.lhs_spec()
        spatial_letters = "".join(c for c in lhs if c not in "NC")
        rhs = self.choice([spatial_letters + "IO", "OI" + spatial_letters, "IO" + spatial_letters])
        out = out_spec or lhs
        kw = {
            "out_chan": int(self.rng.randint(1, 4)),
            "filter_shape": tuple(filt),
            "strides": tuple(strides) if any(s > 1 for s in strides) or self.coin() else None,
            "padding": padding,
            "W_std": self.std(),
            "b_std": self.b_std(),
            "dimension_numbers": (lhs, rhs, out),
        }
        if kw["strides"] is None:
            del kw["strides"]
        if self.coin(0.25):
            kw["parameterization"] = "standard"
        kw.update(over)
        new[st.channel] = kw["out_chan"]
        # Output layout: `out` lists the same letters, possibly permuted.
        sizes = {c: new[i] for i, c in enumerate(lhs)}
        st.shape = tuple(sizes[c] for c in out)
        st.channel = out.index("C")
        st.gaussian = True
        return ("Conv", kw)

    def nonlin(self, st: _State, name=None, branch=False) -> list:
        """An elementwise layer (plus a LayerNorm before Hermite, whose kernel assumes unit
        variances). Requires a Gaussian input; leaves a non-Gaussian one.

        ``branch``: the layer sits in a ``parallel`` branch. NT infers output shapes by running
        ``apply_fn``; ExpNormalized has none, so NT keeps the *input* shapes for the whole
        ``parallel`` and a following FanIn rejects them. Such branches skip ExpNormalized.
        """
        assert st.gaussian, "nonlinearities need a preceding affine layer"
        name = name or self.next_nonlin_name()
        if branch and name == "ExpNormalized":
            name = self.next_nonlin_name()
        rng = self.rng
        r3 = lambda lo, hi: float(np.round(rng.uniform(lo, hi), 3))
        pre = []
        if name == "Relu":
            kw = {"do_stabilize": True} if self.coin(0.3) else {}
        elif name == "ABRelu":
            kw = {"a": r3(-1, 0.5), "b": r3(0.5, 2), "do_stabilize": self.coin(0.3)}
        elif name == "LeakyRelu":
            kw = {"alpha": r3(0.01, 0.5)}
        elif name == "Abs":
            kw = {"do_stabilize": True} if self.coin(0.3) else {}
        elif name in ("Erf", "Sin", "Cos"):
            kw = (
                {"a": r3(0.5, 1.5), "b": r3(0.3, 1.5), "c": r3(-0.5, 0.5)} if self.coin(0.7) else {}
            )
        elif name == "Gelu":
            kw = {"approximate": self.coin()}
        elif name == "Rbf":
            kw = {"gamma": r3(0.2, 1.5)}
        elif name == "Exp":
            kw = {"a": r3(0.5, 1.5), "b": r3(0.2, 0.8)}
        elif name == "Gaussian":
            kw = {"a": r3(0.5, 1.5), "b": r3(-1.5, -0.3)}
        elif name == "ExpNormalized":
            kw = {"gamma": r3(0.3, 1.5), "shift": r3(-1.5, 0), "do_clip": self.coin()}
        elif name == "Hermite":
            kw = {"degree": int(rng.randint(0, 5))}
            pre = [("LayerNorm", {"axis": st.ca, "channel_axis": st.ca})]
        elif name == "Monomial":
            kw = {"degree": int(rng.randint(0, 6))}
        elif name == "RectifiedMonomial":
            kw = {"degree": int(rng.randint(0, 4))}
        elif name == "Polynomial":
            kw = {"coef": tuple(r3(-1, 1) for _ in range(int(rng.randint(1, 5))))}
        elif name == "Elementwise":
            if self.coin():
                kw = {"fn": "erf", "nngp_fn": "erf_nngp"}
                if self.coin():
                    kw["d_nngp_fn"] = "erf_d_nngp"
            else:
                kw = {"fn": "sin", "nngp_fn": "sin_nngp", "d_nngp_fn": "sin_d_nngp"}
        elif name == "ElementwiseNumerical":
            kw = self.choice(
                [
                    {"fn": "tanh", "deg": int(rng.randint(8, 20)), "df": "tanh_grad"},
                    {"fn": "tanh", "deg": int(rng.randint(8, 20))},
                    {"fn": "softplus", "deg": int(rng.randint(8, 20))},
                    {"fn": "sin", "deg": 12, "df": "cos"},
                ]
            )
        else:  # Sign, Gabor, Sigmoid_like
            kw = {}
        st.gaussian = False
        return pre + [(name, kw)]

    def pool(self, st: _State, kind=None) -> Node:
        kind = kind or self.choice(["AvgPool", "SumPool"])
        padding = self.choice(["SAME", "VALID", "CIRCULAR"])
        window, strides, new = [], [], list(st.shape)
        for ax in st.spatial:
            size = st.shape[ax]
            w = int(self.rng.randint(1, min(3, size) + 1))
            s = int(self.rng.randint(1, 3))
            window.append(w)
            strides.append(s)
            new[ax] = (size - w) // s + 1 if padding == "VALID" else -(-size // s)
        kw = {"window_shape": tuple(window), "strides": tuple(strides), "padding": padding}
        if kind == "AvgPool":
            # Explicit True / explicit False / NT's default, in turn.
            edges = self.cycle("normalize_edges", [True, False, None])
            if edges is not None:
                kw["normalize_edges"] = edges
        if st.ca != -1:
            kw["channel_axis"] = st.ca
        st.shape = tuple(new)
        return (kind, kw)

    def readout(self, st: _State, kind=None) -> list:
        """Removes spatial axes: Flatten / GlobalAvgPool / GlobalSumPool, then a Dense."""
        kind = kind or self.choice(["Flatten", "GlobalAvgPool", "GlobalSumPool"])
        if kind == "Flatten":
            node = ("Flatten", {})
            st.shape = (st.shape[0], int(np.prod(st.shape[1:])))
        else:
            node = (kind, {"channel_axis": st.ca} if st.ca != -1 else {})
            st.shape = (st.shape[0], st.shape[st.channel])
        st.channel = 1
        return [node, self.dense(st)]

    def get(self):
        return self.choice(
            [
                None,
                None,
                "nngp",
                "ntk",
                ("nngp", "ntk"),
                ("ntk", "nngp", "cov1", "cov2"),
                ("cov1", "nngp"),
                "cov2",
                ("nngp", "diagonal_spatial", "is_gaussian"),
                ("ntk", "shape1", "diagonal_batch", "x1_is_x2"),
            ]
        )

    def x2(self, n1):
        return self.choice([None, None, n1 + 1, max(1, n1 - 1), "same"])


def _serial(layers) -> Node:
    return ("serial", {"layers": tuple(layers)})


def _flatten_layers(items) -> list:
    out = []
    for it in items:
        out.extend(it if isinstance(it, list) else [it])
    return out


def _image_state(g: _Gen, ndim_spatial: int, channels_first: bool):
    n1 = int(g.rng.randint(2, 4))
    max_sizes = {1: (7,), 2: (6, 7), 3: (3, 4, 4)}[ndim_spatial]
    sizes = tuple(int(g.rng.randint(3, m + 1)) for m in max_sizes)
    c = int(g.rng.randint(1, 4))
    shape = (n1, c) + sizes if channels_first else (n1,) + sizes + (c,)
    return _State(shape, 1 if channels_first else -1), n1


# -- families ------------------------------------------------------------------------------------
# Each returns (name suffix, layers, x_shapes, extra Spec fields).


def _fam_mlp(g: _Gen):
    n1 = int(g.rng.randint(2, 4))
    st = _State((n1, int(g.rng.randint(1, 4))), -1)
    layers = [g.dense(st)]
    for _ in range(int(g.rng.randint(1, 4))):
        if g.coin(0.2):
            layers.append(("LayerNorm", {}))
        layers += g.nonlin(st)
        if g.coin(0.2):
            layers.append(("Dropout", {"rate": float(np.round(g.rng.uniform(0.3, 1), 3))}))
        elif g.coin(0.15):
            layers.append(("Identity", {}))
        layers.append(g.dense(st))
    kwargs = {}
    if g.coin(0.3):
        kwargs["diagonal_batch"] = False
    return "mlp", layers, st, {"n2": g.x2(n1), "get": g.get(), "kwargs": kwargs}


def _fam_cnn(g: _Gen, ndim_spatial=2):
    st, n1 = _image_state(g, ndim_spatial, g.coin(0.4))
    layers = []
    depth = int(g.rng.randint(1, 4))
    for i in range(depth):
        # Occasionally switch layout through the conv's output spec.
        out_spec = None
        if g.coin(0.15):
            lhs = st.lhs_spec()
            sp = "".join(c for c in lhs if c not in "NC")
            out_spec = "NC" + sp if lhs.endswith("C") else "N" + sp + "C"
        layers.append(g.conv(st, out_spec=out_spec))
        layers += g.nonlin(st)
        if st.spatial and g.coin(0.25) and i < depth - 1:
            layers.append(g.pool(st))
    layers.append(g.conv(st))
    kwargs = {}
    readout = g.readout(st)
    if readout[0][0] == "Flatten" and g.coin(0.3):
        kwargs["diagonal_spatial"] = False  # force the full-spatial path under Flatten
    if g.coin(0.25):
        kwargs["diagonal_batch"] = False
    layers += readout
    name = {1: "cnn1d", 2: "cnn2d", 3: "cnn3d"}[ndim_spatial]
    return name, layers, st, {"n2": g.x2(n1), "get": g.get(), "kwargs": kwargs}


def _fam_cnn1d(g):
    return _fam_cnn(g, 1)


def _fam_cnn3d(g):
    return _fam_cnn(g, 3)


def _fam_dense_images(g: _Gen):
    """No conv: Dense over channels keeps diagonal_spatial possible (Flatten) or not (GAP)."""
    st, n1 = _image_state(g, g.choice([1, 2]), g.coin(0.3))
    layers = [g.dense(st)]
    for _ in range(int(g.rng.randint(1, 3))):
        layers += g.nonlin(st)
        layers.append(g.dense(st))
    kwargs = {}
    kind = g.choice(["Flatten", "Flatten", "GlobalAvgPool", "GlobalSumPool"])
    if kind == "Flatten" and g.coin(0.3):
        kwargs["diagonal_spatial"] = False
    if g.coin(0.3):
        kwargs["diagonal_batch"] = False
    layers += g.readout(st, kind)
    return "dense_img", layers, st, {"n2": g.x2(n1), "get": g.get(), "kwargs": kwargs}


def _fam_resnet(g: _Gen):
    st, n1 = _image_state(g, 2, g.coin(0.4))
    layers = [g.conv(st, padding="SAME", strides_ok=False)]
    for _ in range(int(g.rng.randint(1, 3))):
        b = st.copy()
        pad = g.choice(["SAME", "CIRCULAR"])
        branch = g.nonlin(b, branch=True) + [
            g.conv(b, padding=pad, strides_ok=False, out_chan=b.shape[b.channel])
        ]
        shortcut = ("Identity", {}) if g.coin() else _serial([("Identity", {})])
        layers += [
            ("FanOut", {"num": 2}),
            ("parallel", {"layers": (_serial(branch), shortcut)}),
            ("FanInSum", {}),
        ]
        st.gaussian = True
    layers += g.nonlin(st)
    layers += g.readout(st, g.choice(["GlobalAvgPool", "Flatten"]))
    return "resnet", layers, st, {"n2": g.x2(n1), "get": g.get()}


def _fam_fanin(g: _Gen):
    """FanOut into 2-3 branches, joined by FanInProd or FanInConcat (channel or spatial axis)."""
    image = g.coin(0.6)
    if image:
        st, n1 = _image_state(g, 2, g.coin(0.3))
        first = g.conv(st, padding="SAME", strides_ok=False)
    else:
        n1 = int(g.rng.randint(2, 4))
        st = _State((n1, 3), -1)
        first = g.dense(st)
    num = int(g.rng.randint(2, 4))
    join = g.cycle("fanin", ["FanInProd", "FanInConcat", "FanInConcat_spatial"])
    if join == "FanInConcat_spatial" and not image:
        join = "FanInConcat"
    branches, outs = [], []
    for j in range(num):
        b = st.copy()
        if join == "FanInConcat_spatial":
            # Branches differ only along the first spatial axis; outputs must stay Gaussian.
            ax = b.spatial[0]
            f = [1] * len(b.spatial)
            f[0] = min(j + 1, b.shape[ax])
            kw = {
                "out_chan": 2,
                "filter_shape": tuple(f),
                "padding": "VALID",
                "W_std": g.std(),
                "b_std": g.b_std(),
                "dimension_numbers": (b.lhs_spec(), "OI" + "HW", b.lhs_spec()),
            }
            shape = list(b.shape)
            shape[ax] = b.shape[ax] - f[0] + 1
            shape[b.channel] = 2
            b.shape = tuple(shape)
            branch = g.nonlin(b, branch=True) + [("Conv", kw)]
        elif join == "FanInProd":
            branch = (
                g.nonlin(b, branch=True)
                if g.coin(0.6)
                else [g.dense(b, out=b.shape[b.channel], s=(1, 1))]
            )
            if not image and g.coin(0.4):
                branch = [g.dense(b, out=b.shape[b.channel], s=(1, 1))] + g.nonlin(b, branch=True)
        else:
            branch = g.nonlin(b, branch=True) + ([g.dense(b)] if g.coin() else [])
        branches.append(_serial(branch))
        outs.append(b)
    if join == "FanInConcat_spatial":
        axis = outs[0].spatial[0]
        shape = list(outs[0].shape)
        shape[axis] = sum(o.shape[axis] for o in outs)
        st.shape, st.gaussian = tuple(shape), True
        join_node = ("FanInConcat", {"axis": axis})
    elif join == "FanInConcat":
        shape = list(outs[0].shape)
        shape[st.channel] = sum(o.shape[o.channel] for o in outs)
        st.shape, st.gaussian = tuple(shape), False
        join_node = ("FanInConcat", {"axis": st.ca})
    else:
        st.shape, st.gaussian = outs[0].shape, False
        join_node = ("FanInProd", {})
    layers = [first, ("FanOut", {"num": num}), ("parallel", {"layers": tuple(branches)}), join_node]
    if image:
        layers.append(g.conv(st, padding="SAME"))
        layers += g.nonlin(st)
        layers += g.readout(st)
    else:
        layers.append(g.dense(st))
        layers += g.nonlin(st)
        layers.append(g.dense(st))
    return "fanin_" + join.lower(), layers, st, {"n2": g.x2(n1), "get": g.get()}


def _fam_tree(g: _Gen):
    """NTTree inputs [vector, image] through a top-level parallel; optionally joined."""
    n1 = int(g.rng.randint(2, 4))
    sa = _State((n1, int(g.rng.randint(1, 4))), -1)
    sb, _ = _image_state(g, 2, False)
    sb.shape = sb.input_shape = (n1,) + sb.shape[1:]
    x_shapes = (sa.shape, sb.shape)
    out = int(g.rng.randint(1, 4))
    a = [g.dense(sa)] + g.nonlin(sa, branch=True) + [g.dense(sa, out=out, s=(1, 1))]
    b = [g.conv(sb, padding="SAME")] + g.nonlin(sb, branch=True)
    b += [g.readout(sb)[0], g.dense(sb, out=out, s=(1, 1))]
    layers = [("parallel", {"layers": (_serial(a), _serial(b))})]
    joined = g.cycle("tree", [None, "FanInSum", "FanInConcat"])
    if joined == "FanInSum":
        layers.append(("FanInSum", {}))
    elif joined == "FanInConcat":
        layers += [("FanInConcat", {}), ("Dense", {"out_dim": 1, "W_std": 1.3, "b_std": 0.1})]
    get = g.choice([None, "nngp", ("nngp", "ntk"), "ntk"])
    n2 = g.choice([None, n1 + 1])
    return f"tree_{joined or 'out'}", layers, x_shapes, {"n2": n2, "get": get, "tree": True}


def _fam_dotgeneral(g: _Gen):
    variant = g.cycle("dot", ["rhs_vector", "rhs_matrix", "rhs_scalar", "lhs_scalar"])
    # A matrix rhs appends its free axis last: only channels-first keeps a valid layout.
    st, n1 = _image_state(g, 2, g.coin(0.5) or variant == "rhs_matrix")
    layers = [g.conv(st, padding="SAME")]
    layers += g.nonlin(st)
    dn_kw = {} if st.ca == -1 else {"channel_axis": st.ca}
    if variant == "rhs_scalar":
        layers.append(("DotGeneral", dict(rhs=float(np.round(g.rng.uniform(-2, 2), 3)), **dn_kw)))
    elif variant == "lhs_scalar":
        layers.append(("DotGeneral", dict(lhs=float(np.round(g.rng.uniform(-2, 2), 3)), **dn_kw)))
    else:
        ax = g.choice(list(st.spatial))
        size = st.shape[ax]
        if variant == "rhs_vector" or st.ca == -1:
            # Contracting one spatial axis with a vector keeps the other axes in order.
            rhs = tuple(float(v) for v in np.round(g.rng.standard_normal(size), 3))
            shape = list(st.shape)
            del shape[ax]
            new_channel = st.channel - (1 if ax < st.channel else 0)
            variant = "rhs_vector"
        else:
            # Channels-first: (N, C, ..., S) · (S, S') appends S' as the last spatial axis.
            s_out = int(g.rng.randint(1, 4))
            rhs = tuple(
                tuple(float(v) for v in row)
                for row in np.round(g.rng.standard_normal((size, s_out)), 3)
            )
            shape = [d for i, d in enumerate(st.shape) if i != ax] + [s_out]
            new_channel = st.channel
        layers.append(
            ("DotGeneral", dict(rhs=rhs, dimension_numbers=(((ax,), (0,)), ((), ())), **dn_kw))
        )
        st.shape, st.channel = tuple(shape), new_channel
    layers += g.readout(st, g.choice(["GlobalAvgPool", "Flatten", "GlobalSumPool"]))
    return "dotgeneral_" + variant, layers, st, {"n2": g.x2(n1), "get": g.get()}


def _fam_index(g: _Gen):
    st, _n1 = _image_state(g, 2, g.coin(0.4))
    st.shape = st.input_shape = (3,) + st.shape[1:]
    layers = [g.conv(st, padding="SAME")]
    layers += g.nonlin(st)
    idx = [slice(None)] * len(st.shape)
    variant = g.cycle("index", ["crop", "int", "batch", "stride", "reverse"])
    ax = g.choice(list(st.spatial))
    if variant == "crop":
        idx[ax] = slice(1, None)
    elif variant == "stride":
        idx[ax] = slice(None, None, 2)
    elif variant == "reverse":
        idx[ax] = slice(None, None, -1)
    elif variant == "int":
        idx[ax] = int(g.rng.randint(0, st.shape[ax]))
    else:
        idx[0] = slice(1, None)
    idx = tuple(idx)
    new_shape = np.empty(st.shape)[idx].shape
    kw = {"idx": idx}
    if st.ca != -1:
        kw["channel_axis"] = st.ca
    layers.append(("Index", kw))
    if variant == "int" and ax < st.channel:
        st.channel -= 1
    st.shape = new_shape
    layers.append(g.conv(st, padding="SAME"))
    layers += g.readout(st)
    n2 = g.choice([None, 2, 4])
    return "index_" + variant, layers, st, {"n2": n2, "get": g.get()}


def _fam_layernorm(g: _Gen):
    st, n1 = _image_state(g, g.choice([1, 2]), g.coin(0.4))
    layers = [g.conv(st, padding=g.choice(["SAME", "VALID"]))]
    variant = g.cycle("layernorm", ["channel", "all", "spatial_first"])
    if variant == "channel":
        axis = st.ca
    elif variant == "all":
        axis = tuple(range(1, len(st.shape)))
    else:
        axis = (st.spatial[0], st.channel)
    kw = {"axis": axis}
    if st.ca != -1:
        kw["channel_axis"] = st.ca
    layers.append(("LayerNorm", kw))
    layers += g.nonlin(st)
    layers.append(g.conv(st))
    layers += g.readout(st)
    return "layernorm_" + variant, layers, st, {"n2": g.x2(n1), "get": g.get()}


def _fam_dropout(g: _Gen):
    n1 = int(g.rng.randint(2, 4))
    st = _State((n1, 3), -1)
    mode = g.cycle("dropout", ["train", "test"])
    layers = [g.dense(st)] + g.nonlin(st)
    layers.append(("Dropout", {"rate": float(np.round(g.rng.uniform(0.3, 0.95), 3)), "mode": mode}))
    layers.append(g.dense(st))
    layers += g.nonlin(st)
    layers.append(g.dense(st))
    return "dropout_" + mode, layers, st, {"n2": g.x2(n1), "get": g.get()}


def _fam_repeat(g: _Gen):
    image = g.coin()
    if image:
        st, n1 = _image_state(g, 2, g.coin(0.3))
        layers = [g.conv(st, padding="SAME", strides_ok=False)]
        b = st.copy()
        # Two convs per block: each full-spatial conv flips `is_reversed`, and `repeat` needs the
        # block to map a Kernel to one with the same static metadata.
        block = []
        for _ in range(2):
            pad = g.choice(["SAME", "CIRCULAR"])
            block += g.nonlin(b)
            block.append(g.conv(b, padding=pad, strides_ok=False, out_chan=b.shape[b.channel]))
    else:
        n1 = int(g.rng.randint(2, 4))
        st = _State((n1, 3), -1)
        layers = [g.dense(st, out=2, s=(1, 1))]
        b = st.copy()
        block = g.nonlin(b) + [g.dense(b, out=2, s=(1, 1))]
    layers.append(("repeat", {"layer": _serial(block), "n": int(g.rng.randint(1, 4))}))
    st.gaussian = True
    layers += g.nonlin(st)
    layers += g.readout(st) if image else [g.dense(st)]
    return "repeat", layers, st, {"n2": g.x2(n1), "get": g.get()}


def _fam_masked(g: _Gen):
    """Sequences / images with masked positions (all channels equal ``mask_constant``)."""
    ndim = g.choice([1, 2])
    st, n1 = _image_state(g, ndim, False)
    n2 = g.choice([None, n1 + 1, max(1, n1 - 1)])
    const = g.cycle("mask", [-7.5, float("nan"), 1e4])
    positions = []
    for which, n in ((1, n1), (2, n2 or 0)):
        for ex in range(n):
            for _ in range(int(g.rng.randint(0, 3))):
                pos = tuple(int(g.rng.randint(0, st.shape[a])) for a in st.spatial)
                positions.append((which, ex) + pos)
    layers = [g.conv(st, padding=g.choice(["SAME", "VALID", "CIRCULAR"]), strides_ok=False)]
    layers += g.nonlin(st)
    if g.coin(0.4):
        layers.append(g.conv(st, padding="SAME", strides_ok=False))
        layers += g.nonlin(st)
    layers.append(g.dense(st))
    layers += g.readout(st, g.choice(["GlobalAvgPool", "GlobalSumPool", "Flatten"]))
    return (
        "masked",
        layers,
        st,
        {
            "n2": n2,
            "get": g.get(),
            "kwargs": {"mask_constant": const},
            "mask_positions": tuple(positions),
        },
    )


def _fam_pool(g: _Gen):
    st, n1 = _image_state(g, g.choice([1, 2, 2]), g.coin(0.4))
    layers = [g.conv(st, padding="SAME")]
    layers += g.nonlin(st)
    layers.append(g.pool(st, kind=g.choice(["AvgPool", "SumPool"])))
    layers.append(g.conv(st, padding=g.choice(["SAME", "CIRCULAR"])))
    if g.coin():
        layers.append(g.pool(st, kind="AvgPool"))
    layers += g.readout(st)
    return "pool", layers, st, {"n2": g.x2(n1), "get": g.get()}


FAMILIES = (
    _fam_mlp,
    _fam_cnn,
    _fam_cnn1d,
    _fam_cnn,
    _fam_cnn3d,
    _fam_dense_images,
    _fam_resnet,
    _fam_fanin,
    _fam_tree,
    _fam_dotgeneral,
    _fam_index,
    _fam_layernorm,
    _fam_dropout,
    _fam_repeat,
    _fam_masked,
    _fam_pool,
)


def make_archs(n: int = 128, seed: int = 0) -> list:
    """``n`` deterministic, NT-valid specs cycling through the families (see module docstring)."""
    g = _Gen(seed)
    specs = []
    for i in range(n):
        fam = FAMILIES[i % len(FAMILIES)]
        suffix, layers, st, extra = fam(g)
        x_shapes = st if isinstance(st, tuple) else st.input_shape
        layers = _flatten_layers(layers)
        net = _serial(layers)
        bits = [f"{i:03d}", suffix]
        if extra.get("n2") is not None:
            bits.append(f"x2={extra['n2']}")
        get = extra.get("get")
        if get is not None:
            bits.append("get=" + (get if isinstance(get, str) else "+".join(get)))
        kwargs = extra.pop("kwargs", {})
        for k, v in kwargs.items():
            bits.append(f"{k}={v}")
        specs.append(
            Spec(
                name="-".join(bits),
                net=net,
                x_shapes=tuple(x_shapes),
                kwargs=tuple(sorted(kwargs.items())),
                seed=seed * 100_003 + i,
                **extra,
            )
        )
    return specs


def describe(spec: Spec) -> str:
    """A one-line readable rendering of the network (for failure reports)."""

    def render(node):
        name, kw = node
        if name in ("serial", "parallel"):
            return f"{name}(" + ", ".join(render(c) for c in kw["layers"]) + ")"
        if name == "repeat":
            return f"repeat({render(kw['layer'])}, {kw['n']})"
        args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
        return f"{name}({args})"

    return (
        f"{render(spec.net)}; x1 {spec.x_shapes}, n2={spec.n2}, get={spec.get!r}, "
        f"kwargs={spec.kernel_kwargs}"
    )
