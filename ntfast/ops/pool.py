"""Hot op ``pool_cov``: covariance propagation through average / sum pooling.

Op (registered backends implement exactly this signature; static arguments are keywords)::

    pool_cov(x, *, window_shape, strides, padding, pool_type="AVG", normalize_edges=False,
             diagonal_spatial=False, is_reversed=False, backend=None) -> array

Layouts of ``x`` as in :mod:`ntfast.ops.conv`: ``B >= 0`` leading batch axes, then the spatial axes,
zipped pairs ``(H, H', W, W', ...)`` (stored last-to-first if ``is_reversed``) or, with
``diagonal_spatial``, ``(H, W, ...)``. ``window_shape``/``strides`` are in logical ``(H, W, ...)``
order; ``padding`` is ``"VALID" | "SAME" | "CIRCULAR"``; ``pool_type`` is ``"AVG" | "SUM"``.
The output keeps the layout and the pair order of ``x``.

Math (NT's ``_Pool`` kernel_fn), per spatial axis with window ``p``, stride ``s`` and the axis
padded into ``xp`` (zeros for SAME, periodic wrap by the SAME amounts for CIRCULAR)::

    box[i]        = Σ_{a<p} xp[s·i + a]                        (diagonal spatial)
    box[i, i']    = Σ_{a<p} Σ_{a'<p} xp[s·i + a, s·i' + a']     (full spatial: two 1-D box sums)

SUM pooling returns the box sums. AVG pooling divides by ``d(i)`` per window index, where
``d(i) = p`` except for SAME padding with ``normalize_edges``, where ``d(i)`` counts the taps that
fall inside the unpadded axis: full spatial divides ``box[i, i']`` by ``d(i)·d(i')``; diagonal
spatial divides ``box[i]`` by ``d(i)²`` (NT normalizes a diagonal-spatial kernel twice: the pooled
entries are sums of ``p`` independent positions, so the variance of their mean scales as ``1/p²``).

Cost: the full-spatial 2-D box of a pair is separable, ``2(p - 1)`` adds per output entry per
spatial axis instead of the ``p²`` of a ``reduce_window`` over both axes; the normalization is a
static per-axis table, no ``reduce_window`` over ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from ntfast import backend as _backend
from ntfast.ops.conv import (
    axis_pads,
    check_window_args,
    pad_axes,
    padding_name,
    stored_pairs,
    tap_sum,
)

POOL_TYPES = ("AVG", "SUM")


def window_divisors(size: int, p: int, s: int, padding: str, normalize_edges: bool) -> np.ndarray:
    """Per-output-index normalizer ``d(i)`` of one axis of AVG pooling (f64 numpy, static)."""
    lo, hi = axis_pads(size, p, s, padding)
    n_out = max((size + lo + hi - p) // s + 1, 0)
    if padding != "SAME" or not normalize_edges:
        return np.full((n_out,), float(p))
    starts = np.arange(n_out) * s - lo
    inside = np.minimum(starts + p, size) - np.maximum(starts, 0)
    return np.maximum(inside, 0).astype(np.float64)


def _divide_axis(x: jax.Array, axis: int, d: np.ndarray) -> jax.Array:
    shape = [1] * x.ndim
    shape[axis] = d.shape[0]
    return x * (1.0 / d).astype(x.dtype).reshape(shape)


def _check_pool_type(pool_type) -> str:
    name = getattr(pool_type, "name", pool_type)
    if isinstance(name, str) and name.upper() in POOL_TYPES:
        return name.upper()
    raise ValueError(f"`pool_type` must be one of {POOL_TYPES}, got {pool_type!r}.")


def pool_cov_reference(
    x: jax.Array,
    *,
    window_shape: Sequence[int],
    strides: Sequence[int],
    padding: str,
    pool_type: str = "AVG",
    normalize_edges: bool = False,
    diagonal_spatial: bool = False,
    is_reversed: bool = False,
) -> jax.Array:
    """Pure-XLA reference of :func:`pool_cov` (the definition); traceable, not jitted."""
    padding = padding_name(padding)
    average = _check_pool_type(pool_type) == "AVG"
    b = check_window_args(x, window_shape, strides, diagonal_spatial, "window_shape")
    n = len(window_shape)
    if diagonal_spatial:
        axes = [(p, b + p) for p in range(n)]
    else:
        axes = [
            (logical, b + 2 * i + k)
            for i, logical in enumerate(stored_pairs(n, is_reversed))
            for k in (0, 1)
        ]
    sizes = [x.shape[ax] for _, ax in axes]
    windows = [int(window_shape[logical]) for logical, _ in axes]
    steps = [int(strides[logical]) for logical, _ in axes]
    x = pad_axes(x, [ax for _, ax in axes], windows, steps, padding)
    for (_, ax), size, p, s in zip(axes, sizes, windows, steps):
        x = tap_sum(x, (ax,), p, s)
        if average:
            d = window_divisors(size, p, s, padding, normalize_edges)
            x = _divide_axis(x, ax, d * d if diagonal_spatial else d)
    return x


_STATIC = (
    "window_shape",
    "strides",
    "padding",
    "pool_type",
    "normalize_edges",
    "diagonal_spatial",
    "is_reversed",
)
_backend.register("pool_cov", "xla", jax.jit(pool_cov_reference, static_argnames=_STATIC))


def pool_cov(
    x: jax.Array,
    *,
    window_shape: Sequence[int],
    strides: Sequence[int],
    padding: str,
    pool_type: str = "AVG",
    normalize_edges: bool = False,
    diagonal_spatial: bool = False,
    is_reversed: bool = False,
    backend: str | None = None,
) -> jax.Array:
    """Covariance after AVG/SUM pooling (see module docstring); same layout and order as ``x``.

    Output spatial sizes: ``(X + pads - p) // s + 1``, ``ceil(X / s)`` for SAME/CIRCULAR.
    """
    return _backend.dispatch("pool_cov", backend)(
        x,
        window_shape=tuple(int(v) for v in window_shape),
        strides=tuple(int(v) for v in strides),
        padding=padding_name(padding),
        pool_type=_check_pool_type(pool_type),
        normalize_edges=bool(normalize_edges),
        diagonal_spatial=bool(diagonal_spatial),
        is_reversed=bool(is_reversed),
    )
