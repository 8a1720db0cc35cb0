"""Hot op ``conv_cov``: covariance propagation through a shared-weight convolution.

Op (registered backends implement exactly this signature; static arguments are keywords)::

    conv_cov(x, *, filter_shape, strides, padding, diagonal_spatial=False, is_reversed=False,
             backend=None) -> array

``x`` is one covariance array of an infinite-width conv layer's input with any number ``B >= 0`` of
leading batch axes (``nngp``/``ntk``: ``B = 2``, ``(N1, N2, ...)``; ``cov1``/``cov2``: ``B = 1``
with ``diagonal_batch`` else ``B = 2``) followed by ``S = len(filter_shape)`` spatial axes:

- full spatial (``diagonal_spatial=False``), NT's zipped layout ``(*batch, H, H', W, W', ...)``;
  with ``is_reversed=True`` the pairs are stored last-to-first, ``(*batch, ..., W, W', H, H')``;
- diagonal spatial (``diagonal_spatial=True``): ``(*batch, H, W, ...)`` (``is_reversed`` ignored).

``filter_shape`` and ``strides`` are given in the *logical* spatial order ``(H, W, ...)``;
``padding`` is ``"VALID"``, ``"SAME"`` or ``"CIRCULAR"`` (a string or an enum whose ``name`` is one).

The math, per spatial axis with filter size ``f``, stride ``s`` and the axis padded by the SAME
amounts ``(lo, hi)`` (zeros for SAME, periodic wrap for CIRCULAR, none for VALID) into ``xp``::

    full spatial:     out[i, i'] = (1/f) Σ_{a<f} xp[s·i + a, s·i' + a]
    diagonal spatial: out[i]     = (1/f) Σ_{a<f} xp[s·i + a]

applied independently to every spatial axis (pair), i.e. for 2-D
``K'[i,i',j,j'] = 1/(fh·fw) Σ_{a,b} Kp[s·i+a, s·i'+a, s·j+b, s·j'+b]``: the covariance of
``Σ_{a,b} w_ab · x[s·i+a, s·j+b] / sqrt(fh·fw)`` with i.i.d. unit weights shared over positions.
Scaling by ``W_std²`` and adding ``b_std²`` belong to the layer (``ntfast.stax.Conv``).

Output layout: full spatial returns its pairs in the *opposite* stored order of ``x`` (the output's
``is_reversed`` is ``not is_reversed``), exactly as NT's ``_conv_kernel_full_spatial_shared`` does,
so that kernels match NT's static fields; diagonal spatial keeps the order.

Cost: NT convolves each zipped pair with a 2-D ``diag(1/f)`` filter, f² multiply-adds per output
entry where f suffice (NT issue #29). Here each axis (pair) is a sum of ``f`` (diagonally) shifted
strided slices: ``f - 1`` adds per output entry per spatial axis, ``Σ f`` in total, never ``Π f`` or
``f²``. The diagonal-spatial case is separable the same way (``Σ f`` instead of the ``Π f`` of a
``reduce_window``).

The window helpers below are shared with ``ntfast.ops.pool``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntfast import backend as _backend
from ntfast.ops.layout import materialized_transpose

PADDINGS = ("VALID", "SAME", "CIRCULAR")


def padding_name(padding) -> str:
    """``"VALID" | "SAME" | "CIRCULAR"`` from a string or a Padding-like enum; ValueError else."""
    name = getattr(padding, "name", padding)
    if isinstance(name, str) and name.upper() in PADDINGS:
        return name.upper()
    raise ValueError(f"`padding` must be one of {PADDINGS}, got {padding!r}.")


def same_pads(size: int, f: int, s: int) -> tuple[int, int]:
    """SAME padding ``(lo, hi)`` of one axis, as ``lax.padtype_to_pads`` computes it.

    The output has ``ceil(size / s)`` entries; the total padding makes the last window fit and is
    split with the extra unit at the high end.
    """
    out = -(-size // s)
    total = max((out - 1) * s + f - size, 0)
    return total // 2, total - total // 2


def axis_pads(size: int, f: int, s: int, padding: str) -> tuple[int, int]:
    """``(lo, hi)`` added to an axis of ``size`` before a VALID window (VALID adds nothing)."""
    return (0, 0) if padding == "VALID" else same_pads(size, f, s)


def pad_axis(x: jax.Array, axis: int, lo: int, hi: int, padding: str) -> jax.Array:
    """Pads ``axis`` by ``(lo, hi)``: zeros for SAME, periodic wrap for CIRCULAR."""
    if lo == 0 and hi == 0:
        return x
    if padding == "CIRCULAR":
        n = x.shape[axis]
        if lo <= n and hi <= n:
            parts = [
                lax.slice_in_dim(x, n - lo, n, axis=axis),
                x,
                lax.slice_in_dim(x, 0, hi, axis=axis),
            ]
            return lax.concatenate(parts, axis)
        # Pads longer than the axis wrap more than once (numpy's "wrap"): gather static indices.
        return jnp.take(x, np.arange(-lo, n + hi) % n, axis=axis)
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (lo, hi, 0)
    return lax.pad(x, jnp.zeros((), x.dtype), config)


def n_windows(padded: int, f: int, s: int) -> int:
    """Number of VALID windows of size ``f``, stride ``s`` in an axis of size ``padded``."""
    return max((padded - f) // s + 1, 0)


def pad_axes(x: jax.Array, axes: Sequence[int], windows, strides, padding: str) -> jax.Array:
    """Pads each of ``axes`` by its SAME amounts for its window/stride (no-op for VALID).

    All axes are padded up front, before any window sum: XLA then fuses the padding into the
    first tap sum, where padding pair by pair would materialize a padded copy per pair (~3x
    slower on CPU, measured).
    """
    for ax, f, s in zip(axes, windows, strides):
        lo, hi = axis_pads(x.shape[ax], f, s, padding)
        x = pad_axis(x, ax, lo, hi, padding)
    return x


def tap_sum(x: jax.Array, axes: Sequence[int], f: int, s: int) -> jax.Array:
    """``out[.., i, .., i', ..] = Σ_{a<f} x[.., s·i + a, .., s·i' + a, ..]`` over ``axes`` (VALID).

    The same tap offset ``a`` is applied to every axis in ``axes``: one axis gives a 1-D box sum,
    a zipped pair gives the diagonal (shared-weight) sum. ``f`` shifted strided slices, ``f - 1``
    adds per output entry.
    """
    shape = list(x.shape)
    outs = [n_windows(shape[ax], f, s) for ax in axes]
    for ax, o in zip(axes, outs):
        shape[ax] = o
    if min(outs) == 0:
        sizes = [x.shape[ax] for ax in axes]
        raise ValueError(
            f"A window (filter_shape / window_shape entry) of size {f} with stride {s} does not "
            f"fit in a spatial axis of (padded) size {sizes[0]}: the output would be empty. Use "
            f"a smaller window or SAME/CIRCULAR padding."
        )
    acc = None
    for a in range(f):
        start, limit, stride = [0] * x.ndim, list(x.shape), [1] * x.ndim
        for ax, o in zip(axes, outs):
            start[ax], limit[ax], stride[ax] = a, a + s * (o - 1) + 1, s
        tap = lax.slice(x, start, limit, stride)
        acc = tap if acc is None else acc + tap
    return acc


def stored_pairs(n_spatial: int, is_reversed: bool) -> list[int]:
    """Logical spatial index of each stored axis pair (full-spatial layout)."""
    order = list(range(n_spatial))
    return order[::-1] if is_reversed else order


def check_window_args(x: jax.Array, shape, strides, diagonal_spatial: bool, what: str) -> int:
    """Validates window shape / strides against ``x``; returns the number of batch axes."""
    shape, strides = tuple(shape), tuple(strides)
    if len(strides) != len(shape):
        raise ValueError(
            f"`strides` must have one entry per spatial axis ({len(shape)}), got {strides}."
        )
    if any(int(v) < 1 for v in shape) or any(int(v) < 1 for v in strides):
        raise ValueError(f"`{what}` and `strides` must be positive, got {shape} and {strides}.")
    per_axis = 1 if diagonal_spatial else 2
    batch_ndim = x.ndim - per_axis * len(shape)
    if batch_ndim < 0:
        layout = "diagonal-spatial" if diagonal_spatial else "full-spatial (zipped)"
        raise ValueError(
            f"A {layout} covariance with {len(shape)} spatial axes needs at least "
            f"{per_axis * len(shape)} dimensions, got shape {x.shape}."
        )
    return batch_ndim


def conv_cov_reference(
    x: jax.Array,
    *,
    filter_shape: Sequence[int],
    strides: Sequence[int],
    padding: str,
    diagonal_spatial: bool = False,
    is_reversed: bool = False,
) -> jax.Array:
    """Pure-XLA reference of :func:`conv_cov` (the definition); traceable, not jitted."""
    padding = padding_name(padding)
    b = check_window_args(x, filter_shape, strides, diagonal_spatial, "filter_shape")
    n = len(filter_shape)
    if diagonal_spatial:
        axes = range(b, b + n)
        x = pad_axes(x, axes, filter_shape, strides, padding)
        for ax, f, s in zip(axes, filter_shape, strides):
            x = tap_sum(x, (ax,), f, s)
        return x * (1.0 / float(np.prod(filter_shape)))

    order = stored_pairs(n, is_reversed)
    windows = [filter_shape[logical] for logical in order for _ in (0, 1)]
    steps = [strides[logical] for logical in order for _ in (0, 1)]
    x = pad_axes(x, range(b, b + 2 * n), windows, steps, padding)
    for p in range(n):
        ax = b + 2 * p
        x = tap_sum(x, (ax, ax + 1), windows[2 * p], steps[2 * p])
    x = x * (1.0 / float(np.prod(filter_shape)))
    # NT's loop over pairs leaves them in reverse stored order; keep that layout (is_reversed flips).
    pairs_reversed = [b + 2 * p + k for p in range(n - 1, -1, -1) for k in (0, 1)]
    return materialized_transpose(x, list(range(b)) + pairs_reversed)


# Registered jitted, so that eager calls compile one fused program per configuration instead of
# one per slice/add; inside an outer jit it simply inlines.
_backend.register(
    "conv_cov",
    "xla",
    jax.jit(
        conv_cov_reference,
        static_argnames=("filter_shape", "strides", "padding", "diagonal_spatial", "is_reversed"),
    ),
)


def conv_cov(
    x: jax.Array,
    *,
    filter_shape: Sequence[int],
    strides: Sequence[int],
    padding: str,
    diagonal_spatial: bool = False,
    is_reversed: bool = False,
    backend: str | None = None,
) -> jax.Array:
    """Covariance after a shared-weight conv with unit-variance weights (see module docstring).

    Args:
      x: ``(*batch, H, H', W, W', ...)`` (pairs reversed if ``is_reversed``) or, with
        ``diagonal_spatial``, ``(*batch, H, W, ...)``.
      filter_shape, strides: per logical spatial axis ``(H, W, ...)``.
      padding: ``"VALID" | "SAME" | "CIRCULAR"``.
      diagonal_spatial: layout of ``x`` (and of the output).
      is_reversed: stored pair order of a full-spatial ``x``.
      backend: ``None`` (current flag), ``"auto"``, ``"xla"``, ``"triton"``, ``"native"``.

    Returns:
      Full spatial: ``(*batch, ..., W_out, W_out', H_out, H_out')`` if ``x`` was stored
      ``H``-first, i.e. the pair order flips. Diagonal spatial: ``(*batch, H_out, W_out, ...)``.
      ``X_out = ceil((X + pads - f + 1) / s)``: ``ceil(X / s)`` for SAME/CIRCULAR.
    """
    return _backend.dispatch("conv_cov", backend)(
        x,
        filter_shape=tuple(int(v) for v in filter_shape),
        strides=tuple(int(v) for v in strides),
        padding=padding_name(padding),
        diagonal_spatial=bool(diagonal_spatial),
        is_reversed=bool(is_reversed),
    )
