"""Pooling layers: ``AvgPool``, ``SumPool``, ``GlobalAvgPool``, ``GlobalSumPool``, ``Flatten``.

Same signatures, defaults and kernel semantics as Neural Tangents 0.6.5 (``stax/linear.py``). The
covariance math of windowed pooling is the op :func:`ntfast.ops.pool.pool_cov`; global pooling and
flattening are reductions done here (they are single passes over the covariance).

Kernel layouts (``B`` = 1 for ``cov1``/``cov2`` with ``diagonal_batch``, else 2):

- full spatial ``(*batch, H, H', W, W', ...)`` (pairs last-to-first if ``is_reversed``),
- diagonal spatial ``(*batch, H, W, ...)``.

Windowed pooling keeps the layout; ``GlobalAvgPool``/``GlobalSumPool``/``Flatten`` remove the
spatial axes (the output is ``(*batch,)``).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _utils as utils
from ..ops import fused_cnn as fc
from ..ops.conv import pad_axis, same_pads
from ..ops.pool import pool_cov
from .requirements import Bool, Diagonal, Padding, layer, mean_and_var, requires, supports_masking

_AVG, _SUM = "AVG", "SUM"


# ------------------------------------------------------------------------------------------------
# Argument parsing and helpers shared with ntfast.stax.conv.


def parse_padding(padding) -> Padding:
    """``Padding`` from its name or itself; ValueError naming the argument otherwise."""
    if isinstance(padding, Padding):
        return padding
    try:
        return Padding(padding)
    except (ValueError, TypeError):
        names = tuple(p.name for p in Padding)
        raise ValueError(f"`padding` must be one of {names}, got {padding!r}.") from None


def positive_ints(values, name: str) -> tuple[int, ...]:
    """``values`` as a tuple of positive ints; ValueError naming ``name`` otherwise."""
    try:
        out = tuple(int(v) for v in values)
    except TypeError:
        raise ValueError(f"`{name}` must be a sequence of positive ints, got {values!r}.") from None
    if not out or any(v < 1 for v in out) or any(int(v) != v for v in values):
        raise ValueError(f"`{name}` must be a non-empty sequence of positive ints, got {values!r}.")
    return out


def window_strides(strides, n: int, what: str) -> tuple[int, ...]:
    """``strides`` (None: all ones) checked to have ``n`` entries, one per axis of ``what``."""
    if not strides:
        return (1,) * n
    strides = positive_ints(strides, "strides")
    if len(strides) != n:
        raise ValueError(
            f"`strides` must have one entry per entry of `{what}` ({n}), got {strides}."
        )
    return strides


def wrap_pad_same(x, window: Sequence[int], strides: Sequence[int], axes: Sequence[int]):
    """Periodic padding of ``axes`` by the SAME amounts, so that a VALID window over the result
    is a CIRCULAR window over ``x`` (NT's ``_same_pad_for_filter_shape``)."""
    for ax, f, s in zip(axes, window, strides):
        lo, hi = same_pads(x.shape[ax], f, s)
        x = pad_axis(x, ax, lo, hi, "CIRCULAR")
    return x


def window_out_size(size: int, f: int, s: int, padding: str) -> int:
    """Output length of a window ``f``, stride ``s`` over ``size`` entries (``-1`` stays ``-1``)."""
    if size < 0:
        return size
    if padding == "VALID":
        return max((size - f) // s + 1, 0)
    return -(-size // s)


def pool_mask(mask, window_shape, strides, padding: Padding, batch_axis: int, channel_axis: int):
    """Mask of a windowed layer's output: the input mask sampled at each window's center tap.

    The entry for window ``i`` along an axis is ``mask[s·i - lo + (f - 1) // 2]`` (``lo`` the
    low-side padding), as in NT's ``_pool_mask``.
    """
    non_spatial = sorted(set(utils.canonicalize_axis((batch_axis, channel_axis), mask)))
    window, stride = list(window_shape), list(strides)
    for i in non_spatial:
        window.insert(i, 1)
        stride.insert(i, 1)
    # CIRCULAR windows have SAME output lengths and centers (NT's `_pool_mask` rejects CIRCULAR).
    pad_name = "VALID" if padding == Padding.VALID else "SAME"
    slices, out_shape = [], []
    for size, f, s in zip(mask.shape, window, stride):
        lo = same_pads(size, f, s)[0] if pad_name == "SAME" else 0
        out = window_out_size(size, f, s, pad_name)
        start = (f - 1) // 2 - lo
        slices.append(slice(start, start + 1 + (out - 1) * s, s))
        out_shape.append(out)
    out_shape = tuple(out_shape)
    if mask.shape == out_shape:
        return mask
    mask = mask[tuple(slices)]
    if mask.shape != out_shape:
        raise ValueError(f"Mask shape must be {out_shape}, got {mask.shape} after striding.")
    return mask


def _check_channel_mask(mask, channel_axis: int) -> None:
    if mask.shape[channel_axis] != 1:
        raise NotImplementedError(
            "Different channel-wise masks as inputs to pooling layers are not supported; "
            f"the mask must have size 1 along `channel_axis={channel_axis}`, got shape "
            f"{mask.shape}."
        )


def _non_spatial(batch_axis: int, channel_axis: int, ndim: int) -> tuple[int, int]:
    b, c = batch_axis % ndim, channel_axis % ndim
    if b == c:
        raise ValueError(
            f"`batch_axis` ({batch_axis}) and `channel_axis` ({channel_axis}) must be different "
            f"axes of a {ndim}-D input."
        )
    return b, c


# ------------------------------------------------------------------------------------------------
# Windowed pooling.


@layer
@supports_masking(remask_kernel=True)
def AvgPool(
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str = Padding.VALID.name,
    normalize_edges: bool = False,
    batch_axis: int = 0,
    channel_axis: int = -1,
):
    """Average pooling (NT's ``stax.AvgPool``).

    Args:
      window_shape: pooling window per spatial axis.
      strides: window strides; ``None`` means all ones.
      padding: ``"VALID"``, ``"SAME"`` or ``"CIRCULAR"`` (periodic boundary).
      normalize_edges: ``True`` divides by the number of in-image taps of each window (matters
        only for SAME padding; matches ``jax.example_libraries.stax.AvgPool``), ``False`` by the
        window size.
      batch_axis, channel_axis: the input's batch and channel axes (channels infinite for
        ``kernel_fn``).

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``. Kernel math: :func:`ntfast.ops.pool.pool_cov`.
    """
    return _Pool(_AVG, window_shape, strides, padding, normalize_edges, batch_axis, channel_axis)


@layer
@supports_masking(remask_kernel=True)
def SumPool(
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str = Padding.VALID.name,
    batch_axis: int = 0,
    channel_axis: int = -1,
):
    """Sum pooling (NT's ``stax.SumPool``); arguments as :func:`AvgPool` without normalization."""
    return _Pool(_SUM, window_shape, strides, padding, False, batch_axis, channel_axis)


def _Pool(pool_type, window_shape, strides, padding, normalize_edges, batch_axis, channel_axis):
    window_shape = positive_ints(window_shape, "window_shape")
    strides = window_strides(strides, len(window_shape), "window_shape")
    padding = parse_padding(padding)
    ndim = len(window_shape) + 2
    non_spatial = _non_spatial(batch_axis, channel_axis, ndim)
    spatial_axes = tuple(i for i in range(ndim) if i not in non_spatial)

    def full(values, fill=1):
        out = [fill] * ndim
        for ax, v in zip(spatial_axes, values):
            out[ax] = v
        return tuple(out)

    window_full, strides_full = full(window_shape), full(strides)
    shape_padding = "SAME" if padding == Padding.CIRCULAR else padding.name

    def init_fn(rng, input_shape):
        if len(input_shape) != ndim:
            raise ValueError(
                f"Expected a {ndim}-D input ({len(window_shape)} spatial axes), got shape "
                f"{tuple(input_shape)}."
            )
        out = tuple(
            window_out_size(d, f, s, shape_padding)
            for d, f, s in zip(input_shape, window_full, strides_full)
        )
        return out, ()

    def apply_fn(params, inputs, **kwargs):
        if padding == Padding.CIRCULAR:
            inputs = wrap_pad_same(inputs, window_shape, strides, spatial_axes)
            pad_name = "VALID"
        else:
            pad_name = padding.name
        out = lax.reduce_window(
            inputs, np.zeros((), inputs.dtype), lax.add, window_full, strides_full, pad_name
        )
        if pool_type == _SUM:
            return out
        if normalize_edges and pad_name == "SAME":
            spatial_shape = tuple(inputs.shape[i] for i in spatial_axes)
            counts = lax.reduce_window(
                jnp.ones(spatial_shape, inputs.dtype),
                np.zeros((), inputs.dtype),
                lax.add,
                window_shape,
                strides,
                "SAME",
            )
            return out / jnp.expand_dims(counts, non_spatial)
        return out / float(np.prod(window_shape))

    @requires(
        batch_axis=batch_axis,
        channel_axis=channel_axis,
        diagonal_spatial=Diagonal(input=Bool.MAYBE),
    )
    def kernel_fn(k, **kwargs):
        def pool(mat):
            if mat is None or mat.ndim == 0:
                return mat
            return pool_cov(
                mat,
                window_shape=window_shape,
                strides=strides,
                padding=padding.name,
                pool_type=pool_type,
                normalize_edges=normalize_edges,
                diagonal_spatial=k.diagonal_spatial,
                is_reversed=k.is_reversed,
            )

        return k.replace(cov1=pool(k.cov1), nngp=pool(k.nngp), cov2=pool(k.cov2), ntk=pool(k.ntk))

    def mask_fn(mask, input_shape):
        _check_channel_mask(mask, channel_axis)
        return pool_mask(mask, window_shape, strides, padding, batch_axis, channel_axis)

    def fused_step(input_shape):
        if len(window_shape) != 2 or len(input_shape) != 4:
            return None
        if non_spatial != (0, 3):
            return None
        return (fc.PoolStep(window_shape, strides, padding.name, pool_type, bool(normalize_edges)),)

    kernel_fn.fused_step = fused_step

    return init_fn, apply_fn, kernel_fn, mask_fn


# ------------------------------------------------------------------------------------------------
# Global pooling and flattening.


@layer
@supports_masking(remask_kernel=False)
def GlobalSumPool(batch_axis: int = 0, channel_axis: int = -1):
    """Global sum pooling: sums out all spatial axes, keeping batch and channel axes in order.

    Kernel: ``K'[n1, n2] = Σ_{h, h', w, w'} K[n1, n2, h, h', w, w']`` (full spatial) or
    ``Σ_{h, w} K[n1, n2, h, w]`` (diagonal spatial).
    """
    return _GlobalPool(_SUM, batch_axis, channel_axis)


@layer
@supports_masking(remask_kernel=False)
def GlobalAvgPool(batch_axis: int = 0, channel_axis: int = -1):
    """Global average pooling: averages out all spatial axes, keeping batch and channel axes.

    Kernel: the mean of ``K`` over all (unmasked) spatial entries; a diagonal-spatial kernel is
    further divided by the number of positions (the mean of ``P`` independent positions has
    variance ``mean(K) / P``).
    """
    return _GlobalPool(_AVG, batch_axis, channel_axis)


def _GlobalPool(pool_type, batch_axis, channel_axis):
    def reduce(x, axes, mask):
        if pool_type == _AVG:
            return mean_and_var(x, axes, mask=mask)[0]
        return jnp.sum(x, axes)

    def spatial_of(ndim):
        non_spatial = _non_spatial(batch_axis, channel_axis, ndim)
        return tuple(i for i in range(ndim) if i not in non_spatial)

    def init_fn(rng, input_shape):
        spatial = spatial_of(len(input_shape))
        return tuple(d for i, d in enumerate(input_shape) if i not in spatial), ()

    def apply_fn(params, inputs, mask=None, **kwargs):
        return reduce(inputs, spatial_of(inputs.ndim), mask)

    @requires(
        batch_axis=batch_axis,
        channel_axis=channel_axis,
        diagonal_spatial=Diagonal(input=Bool.MAYBE, output=Bool.YES),
    )
    def kernel_fn(k, **kwargs):
        if k.diagonal_spatial:
            # A global pool sums all location-location covariances; a diagonal_spatial kernel
            # has dropped the off-diagonal ones (NT silently sums the diagonal only).
            raise ValueError(
                "GlobalAvgPool / GlobalSumPool need the full spatial covariance, but the input "
                "kernel has `diagonal_spatial == True`. Recompute it with "
                "`diagonal_spatial=False` (the default for networks ending in a global pool)."
            )

        def pool(mat, batch_ndim, mask):
            if mat is None or mat.ndim == 0:
                return mat
            return reduce(mat, tuple(range(batch_ndim, mat.ndim)), mask)

        mask11, mask12, mask22 = k._get_mask_prods(k.mask1, k.mask2)
        cov_ndim = 1 if k.diagonal_batch else 2
        ndim = len(k.shape1)
        batch_first = batch_axis % ndim < channel_axis % ndim
        return k.replace(
            cov1=pool(k.cov1, cov_ndim, mask11),
            nngp=pool(k.nngp, 2, mask12),
            cov2=pool(k.cov2, cov_ndim, mask22),
            ntk=pool(k.ntk, 2, mask12),
            batch_axis=0 if batch_first else 1,
            channel_axis=1 if batch_first else 0,
            is_reversed=False,
        )

    def mask_fn(mask, input_shape):
        _check_channel_mask(mask, channel_axis)
        return jnp.all(mask, spatial_of(mask.ndim))

    def fused_step(input_shape):
        nd = len(input_shape)
        if nd != 4 or batch_axis % nd != 0 or channel_axis % nd != nd - 1:
            return None
        return (fc.Readout("GAP" if pool_type == _AVG else "GSP"),)

    kernel_fn.fused_step = fused_step

    return init_fn, apply_fn, kernel_fn, mask_fn


@layer
@supports_masking(remask_kernel=False)
def Flatten(batch_axis: int = 0, batch_axis_out: int = 0):
    """Flattens all non-batch axes into one channel axis (NT's ``stax.Flatten``).

    Args:
      batch_axis: the input's batch axis.
      batch_axis_out: the output's batch axis, ``0`` (``(N, C)``) or ``1`` (``(C, N)``).

    Kernel: the mean of the spatial diagonal, ``K'[n1, n2] = mean_{h, w} K[n1, n2, h, h, w, w]``
    (full spatial; O(HW)) or ``mean_{h, w} K[n1, n2, h, w]`` (diagonal spatial).
    """
    if batch_axis_out in (0, -2):
        batch_axis_out, channel_axis_out = 0, 1
    elif batch_axis_out in (1, -1):
        batch_axis_out, channel_axis_out = 1, 0
    else:
        raise ValueError(f"`batch_axis_out` must be 0 or 1, got {batch_axis_out}.")

    def output_shape(input_shape):
        input_shape = tuple(input_shape)
        b = batch_axis % len(input_shape)
        channels = functools.reduce(operator.mul, input_shape[:b] + input_shape[b + 1 :], 1)
        n = input_shape[b]
        return (n, channels) if batch_axis_out == 0 else (channels, n)

    def init_fn(rng, input_shape):
        return output_shape(input_shape), ()

    def apply_fn(params, inputs, **kwargs):
        moved = jnp.moveaxis(inputs, batch_axis, -batch_axis_out)
        return moved.reshape(output_shape(inputs.shape))

    @requires(batch_axis=batch_axis, channel_axis=None, diagonal_spatial=Diagonal(output=Bool.YES))
    def kernel_fn(k, **kwargs):
        def trace(x, batch_ndim):
            if x is None:
                return x
            if k.diagonal_spatial:
                return jnp.mean(x, tuple(range(batch_ndim, x.ndim)))
            while x.ndim > batch_ndim:
                x = jnp.trace(x, axis1=-2, axis2=-1) / x.shape[-1]
            return x

        cov_ndim = 1 if k.diagonal_batch else 2
        return k.replace(
            cov1=trace(k.cov1, cov_ndim),
            nngp=trace(k.nngp, 2),
            cov2=trace(k.cov2, cov_ndim),
            ntk=trace(k.ntk, 2),
            is_gaussian=False,
            is_reversed=False,
            batch_axis=batch_axis_out,
            channel_axis=channel_axis_out,
            diagonal_spatial=False,
        )

    def mask_fn(mask, input_shape):
        mask = jnp.broadcast_to(mask, input_shape)
        return jnp.moveaxis(mask, batch_axis, batch_axis_out).reshape(output_shape(mask.shape))

    def fused_step(input_shape):
        if len(input_shape) != 4 or batch_axis % 4 != 0:
            return None
        return (fc.Readout("FLATTEN"),)

    kernel_fn.fused_step = fused_step

    return init_fn, apply_fn, kernel_fn, mask_fn
