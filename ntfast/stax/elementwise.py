"""Elementwise nonlinearities: NT 0.6.5's ``stax/elementwise.py`` layers, same public API.

For a Gaussian input kernel (a random affine layer before the activation), every layer maps

    nngp[n1, n2, s, s'] <- E[f(u) f(v)],   ntk <- ntk · E[f'(u) f'(v)]

with ``(u, v) ~ N(0, [[var1[n1, s], nngp], [nngp, var2[n2, s']]])`` and ``cov1``/``cov2`` the same
way with both sides from one batch. ``var1``/``var2`` are the per-sample, per-location variances
(``get_diagonal``), broadcast against each layout:

- ``nngp`` ``(N1, N2, H, H', W, W')``: ``var1 -> (N1, 1, H, 1, W, 1)``, ``var2 -> (1, N2, 1, H, 1, W)``;
  diagonal spatial ``(N1, N2, H, W)``: ``(N1, 1, H, W)`` and ``(1, N2, H, W)``;
- ``cov1`` ``(N1, H, H', W, W')`` (diagonal batch) or ``(N1, N1, ...)``: the same with ``var1``
  on both sides; batch- and spatially-diagonal ``(N1, H, W)``: the variance map ``E[f(u)²]``.

All math is in :mod:`ntfast.ops.nonlin` (``nonlin(kind, ...)``, one dispatched op per family);
this module does layouts, NT's API, and errors.

Deliberate differences from NT 0.6.5 (fixes; everything else matches to rounding):

- ``RectifiedMonomial`` is finite and correct on the ``x1 == x2`` diagonal (NT: NaN).
- ``Sign``'s ``cov1``/``cov2`` off-diagonal entries (spatial or batch) are ``1 − 2θ/π`` like
  ``nngp`` (NT sets every nonzero entry to 1).
- ``ABRelu``-family kernels are computed scale-free, so ``do_stabilize`` is accepted but not
  needed: deep stacks don't overflow f32 (NT #197) with or without it.
- ``Polynomial``, ``ElementwiseNumerical`` stay finite for zero-variance inputs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

from .. import _utils as utils
from .. import backend as _backend
from ..kernel import Kernel
from ..ops import fused_cnn as fc
from ..ops.nonlin import affine_terms, nonlin, nonlin_affine, nonlin_variance
from .requirements import Diagonal, get_diagonal, layer, requires, supports_masking

__all__ = [
    "ABRelu",
    "Abs",
    "Cos",
    "Elementwise",
    "ElementwiseNumerical",
    "Erf",
    "Exp",
    "ExpNormalized",
    "Gabor",
    "Gaussian",
    "Gelu",
    "Hermite",
    "LeakyRelu",
    "Monomial",
    "Polynomial",
    "Rbf",
    "RectifiedMonomial",
    "Relu",
    "Sigmoid_like",
    "Sign",
    "Sin",
]

_NOT_GAUSSIAN = (
    "The input to the activation function must be Gaussian, i.e. a random affine transform is "
    "required before the activation function."
)
_AUTODIFF_URL = (
    "https://jax.readthedocs.io/en/latest/faq.html#gradients-contain-nan-where-using-where"
)


def _map_kernel(
    k: Kernel, kind: str, params: dict, diag_variance: bool = True, affine: dict | None = None
) -> Kernel:
    """Applies the ``kind`` expectation to ``nngp``/``ntk``/``cov1``/``cov2`` of ``k``.

    ``diag_variance``: use the simplified variance map for batch- and spatially-diagonal
    ``cov1``/``cov2`` (NT does so for the layers that have a ``nngp_fn_diag``).
    ``affine``: keyword arguments of :func:`ntfast.ops.nonlin.nonlin_affine` (the next Dense
    layer's map), applied in the same op to ``nngp``/``ntk`` and afterwards to ``cov1``/``cov2``.
    """
    var1 = get_diagonal(k.cov1, k.diagonal_batch, k.diagonal_spatial)
    var2 = var1 if k.cov2 is None else get_diagonal(k.cov2, k.diagonal_batch, k.diagonal_spatial)
    end = 1 if k.diagonal_spatial else var1.ndim

    def pair(va, vb, start):
        return (
            utils.interleave_ones(va, start, end, True),
            utils.interleave_ones(vb, start, end, False),
        )

    if affine is None:
        nngp, ntk = nonlin(kind, k.nngp, *pair(var1, var2, 0), k.ntk, **params)
    else:
        nngp, ntk = nonlin_affine(kind, k.nngp, *pair(var1, var2, 0), k.ntk, **affine, **params)
        w, b, _, _ = affine_terms(**affine)

    def own(cov, var):
        if cov is None:
            return None
        # Per-sample variances only (batch-diagonal, and diagonal-spatial or no spatial axes,
        # e.g. after Flatten): E[f(u)²] directly, no arc-cosine.
        if k.diagonal_batch and (k.diagonal_spatial or cov.ndim == 1) and diag_variance:
            out = nonlin_variance(kind, cov, **params)
        else:
            start = 1 if k.diagonal_batch else 0
            out = nonlin(kind, cov, *pair(var, var, start), **params)[0]
        return out if affine is None else w * out + b

    return k.replace(cov1=own(k.cov1, var1), nngp=nngp, cov2=own(k.cov2, var2), ntk=ntk)


def _elementwise(
    fn: Callable | None,
    name: str,
    kind: str | None,
    params: dict,
    *,
    diag_variance: bool = True,
    on_kernel: Callable[[], None] | None = None,
):
    """``(init_fn, apply_fn, kernel_fn)`` of an activation ``fn`` with expectation ``kind``."""

    def init_fn(rng, input_shape):
        return input_shape, ()

    def apply_fn(params_, inputs, **kwargs):
        if fn is None:
            raise NotImplementedError(
                f"{name}: no finite-width function `fn` was provided, so `apply_fn` is undefined."
            )
        return fn(inputs)

    @requires(diagonal_spatial=Diagonal())
    def kernel_fn(k: Kernel, **kwargs) -> Kernel:
        if kind is None:
            raise NotImplementedError(
                f"{name}: no `nngp_fn` was provided, so the infinite-width `kernel_fn` is undefined."
            )
        if not k.is_gaussian:
            raise ValueError(_NOT_GAUSSIAN)
        if on_kernel is not None:
            on_kernel()
        k = _map_kernel(k, kind, params, diag_variance)
        return k.replace(is_gaussian=False)

    if kind is not None:
        step = (fc.NonlinStep(kind, tuple(sorted(params.items()))),)
        kernel_fn.fused_step = lambda input_shape: step
        kernel_fn.nonlin_spec = (kind, params, diag_variance)

    init_fn.__name__ = apply_fn.__name__ = kernel_fn.__name__ = name
    return init_fn, apply_fn, kernel_fn


@layer
@supports_masking(remask_kernel=True)
def Erf(a: float = 1.0, b: float = 1.0, c: float = 0.0):
    """Affine transform of ``Erf`` nonlinearity, i.e. ``a * erf(b * x) + c``.

    Kernel (Williams 1997): ``nngp' = a² (2/π) arcsin(2b² q12 / √((1+2b² q11)(1+2b² q22))) + c²``.

    Args:
      a: output scale.
      b: input scale.
      c: output shift.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """

    def fn(x):
        return a * erf(b * x) + c

    return _elementwise(fn, f"Erf({a}, {b}, {c})", "erf", {"a": a, "b": b, "c": c})


def Sigmoid_like():
    """A sigmoid like function ``f(x) = .5 * erf(x / 2.4020563531719796) + .5``.

    The constant minimizes the squared distance to the logistic sigmoid on ``[-5, 5]``.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """
    return Erf(a=0.5, b=1 / 2.4020563531719796, c=0.5)


@layer
@supports_masking(remask_kernel=False)
def Gabor():
    """Gabor function ``exp(-x^2) * sin(x)``.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """

    def fn(x):
        return jnp.exp(-(x**2)) * jnp.sin(x)

    return _elementwise(fn, "Gabor", "gabor", {})


@layer
@supports_masking(remask_kernel=False)
def Gelu(approximate: bool = False):
    """Gelu function ``x Φ(x)``.

    Args:
      approximate: only relevant for the finite-width ``apply_fn``: if ``True`` it uses the
        ``tanh`` approximation (:obj:`jax.nn.gelu`). The ``kernel_fn`` is always the exact GELU
        kernel (arXiv:2002.08517), as in NT.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """

    def fn(x):
        return jax.nn.gelu(x, approximate=approximate)

    return _elementwise(fn, "Gelu", "gelu", {})


@layer
@supports_masking(remask_kernel=True)
def Sin(a: float = 1.0, b: float = 1.0, c: float = 0.0):
    """Affine transform of ``Sin`` nonlinearity, i.e. ``a sin(b*x + c)``.

    Args:
      a: output scale.
      b: input scale.
      c: input phase shift.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """

    def fn(x):
        return a * jnp.sin(b * x + c)

    return _elementwise(fn, f"Sin({a}, {b}, {c})", "sin", {"a": a, "b": b, "c": c})


def Cos(a: float = 1.0, b: float = 1.0, c: float = 0.0):
    """Affine transform of ``Cos`` nonlinearity, i.e. ``a cos(b*x + c) = a sin(b*x + c + π/2)``.

    Args:
      a: output scale.
      b: input scale.
      c: input phase shift.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """
    return Sin(a=a, b=b, c=c + jnp.pi / 2)


@layer
@supports_masking(remask_kernel=True)
def Rbf(gamma: float = 1.0):
    """Dual activation function for normalized RBF or squared exponential kernel.

    ``f(x) = sqrt(2)*sin(sqrt(2*gamma) x + pi/4)``, whose NNGP map is
    ``k = exp(-gamma * (q11 + q22 - 2 * q12))``.

    Args:
      gamma: related to the characteristic length-scale ``l`` by ``gamma = 1 / (2 l^2)``.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """

    def fn(x):
        return jnp.sqrt(2) * jnp.sin(jnp.sqrt(2 * gamma) * x + jnp.pi / 4)

    return _elementwise(fn, f"Rbf({gamma})", "rbf", {"gamma": gamma})


@layer
@supports_masking(remask_kernel=False)
def ABRelu(a: float, b: float, do_stabilize: bool = False):
    """ABReLU nonlinearity, i.e. ``a * min(x, 0) + b * max(x, 0)``.

    Kernel: ``nngp' = (a−b)² k₁ + ab·nngp`` and ``Σ̇ = (a² + b²)/2 − (a−b)² θ/2π`` with the
    arc-cosine kernel ``k₁`` (Cho & Saul 2009; arXiv:1711.09090).

    Args:
      a: slope for ``x < 0``.
      b: slope for ``x > 0``.
      do_stabilize: accepted for NT compatibility. NT rescales the kernel by its maximum to
        avoid f32 overflow in very deep networks; the expectation here is computed from the
        normalized covariance, so it never overflows and no rescaling is needed.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """

    def fn(x):
        return a * jnp.minimum(x, 0) + b * jnp.maximum(x, 0)

    return _elementwise(fn, f"ABReLU({a}, {b})", "abrelu", {"a": a, "b": b})


def Relu(do_stabilize: bool = False):
    """ReLU nonlinearity.

    Args:
      do_stabilize: accepted for NT compatibility (see :obj:`ABRelu`).

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """
    return ABRelu(0, 1, do_stabilize)


def LeakyRelu(alpha: float, do_stabilize: bool = False):
    """Leaky ReLU nonlinearity, i.e. ``alpha * min(x, 0) + max(x, 0)``.

    Args:
      alpha: slope for ``x < 0``.
      do_stabilize: accepted for NT compatibility (see :obj:`ABRelu`).

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """
    return ABRelu(alpha, 1, do_stabilize)


def Abs(do_stabilize: bool = False):
    """Absolute value nonlinearity.

    Args:
      do_stabilize: accepted for NT compatibility (see :obj:`ABRelu`).

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """
    return ABRelu(-1, 1, do_stabilize)


@layer
@supports_masking(remask_kernel=False)
def Sign():
    """Sign function.

    Kernel: ``nngp' = 1 − 2θ/π``; the NTK contribution is 0 (``sign' = 0`` almost everywhere).

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """

    def fn(x):
        return jnp.sign(x)

    return _elementwise(fn, "Sign", "sign", {})


@layer
@supports_masking(remask_kernel=True)
def Exp(a: float = 1, b: float = 1):
    """Elementwise natural exponent function ``a * jnp.exp(b * x)``.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """

    def fn(x):
        return a * jnp.exp(b * x)

    return _elementwise(fn, f"Exp({a}, {b})", "exp", {"a": a, "b": b})


@layer
@supports_masking(remask_kernel=True)
def Gaussian(a: float = 1, b: float = -1):
    """Elementwise Gaussian function ``a * jnp.exp(b * x**2)``.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """

    def fn(x):
        return a * jnp.exp(b * x**2)

    return _elementwise(fn, f"Gaussian({a}, {b})", "gaussian", {"a": a, "b": b})


@layer
@supports_masking(remask_kernel=True)
def ExpNormalized(gamma: float = 1, shift: float = -1, do_clip: bool = False):
    """Simulates the "Gaussian normalized kernel" (arXiv:2003.02237, page 6).

    ``nngp' = √(q11 q22) exp(gamma (nngp / √(q11 q22) + shift))``. Kernel-only: there is no
    finite-width function.

    Args:
      gamma: exponent scalar coefficient.
      shift: shift exponentiated normalized covariance by this much.
      do_clip: True to clip normalized covariance, potentially improving accuracy.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Raises:
      NotImplementedError: if finite width ``apply_fn`` is called.
    """
    params = {"gamma": gamma, "shift": shift, "do_clip": do_clip}
    return _elementwise(None, "ExpNormalized", "exp_normalized", params, diag_variance=False)


def _warn_unit_norm():
    warnings.warn(
        "Inputs to this layer are assumed to have unit norm across  channels/features, i.e. "
        "jnp.std(x, axis=channel_axis) == 1."
    )


@layer
@supports_masking(remask_kernel=True)
def Hermite(degree: int):
    """Hermite polynomials ``He_degree(x) / √degree!``.

    Inputs to this layer are assumed to have unit norm, i.e.
    ``jnp.std(x, axis=channel_axis) == 1``; then ``nngp' = nngp^degree``.

    Args:
      degree: a non-negative integer.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """
    if degree < 0:
        raise NotImplementedError("`degree` must be a non-negative integer.")

    p = np.polynomial.hermite_e.herme2poly([0] * degree + [1])[::-1]
    norm = math.factorial(degree) ** 0.5

    def fn(x):
        return jnp.polyval(p, x) / norm

    return _elementwise(
        fn,
        f"{degree}-Hermite polynomial",
        "hermite",
        {"degree": int(degree)},
        diag_variance=False,
        on_kernel=_warn_unit_norm,
    )


@layer
@supports_masking(remask_kernel=False)
def Monomial(degree: int):
    """Monomials, i.e. ``x^degree``.

    Args:
      degree: an integer between 0 and 5.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """
    if degree not in [0, 1, 2, 3, 4, 5]:
        raise NotImplementedError("The `degree` must be an integer between `0` and `5`.")

    def fn(x):
        return x**degree

    return _elementwise(fn, f"{degree}-monomial", "monomial", {"degree": int(degree)})


@layer
@supports_masking(remask_kernel=False)
def RectifiedMonomial(degree: int):
    """Rectified monomials, i.e. ``(x >= 0) * x^degree``.

    Kernel: the arc-cosine kernel of order ``degree`` (Cho & Saul 2009), in closed form for
    every degree and exact on the diagonal.

    Args:
      degree: a non-negative integer power.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """
    if degree < 0:
        raise NotImplementedError("`degree` must be a non-negative integer.")

    def fn(x):
        return (x >= 0) * x**degree

    return _elementwise(
        fn, f"{degree}-rectified-monomial", "rectified_monomial", {"degree": int(degree)}
    )


@layer
@supports_masking(remask_kernel=False)
def Polynomial(coef: Sequence[float]):
    """Polynomials, i.e. ``coef[0] + coef[1] * x + … + coef[n] * x**n``.

    Args:
      coef: a sequence of coefficients. Follows :class:`numpy.polynomial.polynomial.Polynomial`.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """
    coef = np.array(coef)

    def fn(x):
        return jnp.polyval(coef[::-1], x)

    params = {"coef": tuple(float(v) for v in coef)}
    return _elementwise(fn, f"{coef}-polynomial", "polynomial", params)


@layer
@supports_masking(remask_kernel=True)
def Elementwise(
    fn: Callable[[float], float] | None = None,
    nngp_fn: Callable[[float, float, float], float] | None = None,
    d_nngp_fn: Callable[[float, float, float], float] | None = None,
):
    """Elementwise application of ``fn`` using the provided ``nngp_fn``.

    Builds a layer from a scalar nonlinearity ``fn`` and its 2-D Gaussian integral
    ``nngp_fn(cov12, var1, var2) = E[fn(x1) fn(x2)]``; the NTK uses
    ``d_nngp_fn(cov12, var1, var2) = E[fn'(x1) fn'(x2)]``, derived as ``∂ nngp_fn / ∂ cov12`` by
    autodiff when not given (Price's theorem; arXiv:2209.04121). Prefer the dedicated layers
    (``Relu``, ``Erf`` ...) when they exist: they are more precise and stable.

    Args:
      fn: scalar activation ``R -> R``; if ``None``, ``apply_fn`` raises.
      nngp_fn: scalar ``(cov12, var1, var2) -> E[fn(x1) fn(x2)]`` over the bivariate normal with
        those variances and covariance; if ``None``, ``kernel_fn`` raises.
      d_nngp_fn: optional scalar ``(cov12, var1, var2) -> E[fn'(x1) fn'(x2)]``.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.

    Raises:
      ValueError: if neither ``fn`` nor ``nngp_fn`` is given.
      NotImplementedError: if ``fn``/``nngp_fn`` is missing and ``apply_fn``/``kernel_fn`` is
        called.
    """
    if fn is not None:
        name = fn.__name__
    elif nngp_fn is not None:
        name = nngp_fn.__name__
    else:
        raise ValueError(
            "No finite (`fn`) or infinite (`nngp_fn`) functions provided, the layer will not do "
            "anything."
        )

    if nngp_fn is None:
        return _elementwise(fn, name, None, {})
    if d_nngp_fn is None:
        warnings.warn(
            f"Using JAX autodiff to compute the `fn` derivative for NTK. Beware of {_AUTODIFF_URL}."
        )
    params = {"nngp_fn": nngp_fn, "d_nngp_fn": d_nngp_fn}
    # NT evaluates cov1 through `nngp_fn(cov, var, var)` in every layout (no separate diag map).
    return _elementwise(fn, name, "elementwise", params, diag_variance=False)


@layer
@supports_masking(remask_kernel=True)
def ElementwiseNumerical(
    fn: Callable[[float], float],
    deg: int,
    df: Callable[[float], float] | None = None,
):
    """Activation function using numerical integration (Gauss–Hermite quadrature).

    Args:
      fn: activation function.
      deg: number of quadrature points per dimension, ``>= 1`` (``deg²`` evaluations per
        kernel entry). ``deg=25`` is a good start for smooth ``fn``; kinked ones (ReLU, Abs)
        converge slowly, prefer their dedicated layers.
      df: optional derivative of ``fn``; computed with :obj:`jax.grad` if not provided.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``.
    """
    warnings.warn(
        f"Numerical Activation Layer with fn={fn}, deg={deg} used!Note that numerical error is "
        "controlled by `deg` and for a giventolerance level, required `deg` will highly be "
        "dependent on the choiceof `fn`."
    )
    if df is None:
        warnings.warn(
            f"Using JAX autodiff to compute the `fn` derivative for NTK. Beware of {_AUTODIFF_URL}."
        )
        df = jnp.vectorize(jax.grad(fn))
    if int(deg) < 1:
        raise ValueError(f"`deg` must be an integer >= 1, got {deg!r}.")
    params = {"fn": fn, "deg": int(deg), "df": df}
    return _elementwise(fn, f"ElementwiseNumerical({fn},deg={deg})", "numerical", params)


def fused_with_dense(f, g, k, kwargs):
    """``g(f(k))`` for a nonlinearity layer ``f`` followed by a ``Dense`` layer ``g``, with the
    nonlinearity and the Dense map in one op (``nonlin_affine_<kind>``), or None.

    Used by ``serial`` when the backend in force has a fused kernel for the pair (Triton: one pass
    over the covariances instead of two); the XLA path keeps the two layers (XLA fuses them
    itself). The output ``Kernel``'s structure comes from ``jax.eval_shape`` of the two layers,
    so static fields, shapes and errors are exactly those of the unfused pair.
    """
    spec = getattr(f, "nonlin_spec", None)
    dense = getattr(g, "dense_affine", None)
    if spec is None or dense is None or not isinstance(k, Kernel):
        return None
    if k.mask1 is not None or k.mask2 is not None:
        return None
    kind, params, diag_variance = spec
    try:
        if _backend.resolve(f"nonlin_affine_{kind}") == "xla":
            return None
    except _backend.BackendError:
        return None  # the unfused layers raise the precise error
    # Structure only (backend-independent): traced with the XLA ops, so no kernel launch of
    # the unfused layers is traced.
    with _backend.use_backend("xla"):
        shaped = jax.eval_shape(lambda kk: g(f(kk, **kwargs), **kwargs), k)
    out = _map_kernel(k, kind, params, diag_variance, affine=dense(k))
    return shaped.replace(
        nngp=out.nngp, ntk=out.ntk, cov1=out.cov1, cov2=out.cov2, x1_is_x2=k.x1_is_x2
    )
