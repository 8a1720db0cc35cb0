"""Branching layers: ``FanOut``, ``FanInSum``, ``FanInProd``, ``FanInConcat`` (NT 0.6.5 semantics).

Fan-in layers assume the branches are independent given the inputs (each branch must contain an
affine layer, e.g. ``Dense``/``Conv``): the covariance of a sum is then the sum of covariances,
and of a product (of zero-mean Gaussians) the product. Concatenation along the channel axis
averages covariances weighted by channel counts; along a spatial/batch axis it stacks them.
"""

from __future__ import annotations

import functools
import warnings

import jax.numpy as jnp

from ..kernel import Kernel
from .requirements import layer, supports_masking


@layer
def FanOut(num: int):
    """Replicates the input ``num`` times (use before ``parallel``)."""
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise ValueError(f"`num` must be a positive int, got {num!r}.")

    def init_fn(rng, input_shape):
        return [input_shape] * num, ()

    def apply_fn(params, inputs, **kwargs):
        return [inputs] * num

    def kernel_fn(k, **kwargs):
        return [k] * num

    return init_fn, apply_fn, kernel_fn


def _fan_in_init(rng, input_shape):
    return input_shape[0], ()


def _fan_in_kernel(ks, cov1, cov2, nngp, ntk, is_gaussian, is_reversed, shape1, shape2) -> Kernel:
    k0 = ks[0]
    return Kernel(
        cov1=cov1,
        cov2=cov2,
        nngp=nngp,
        ntk=ntk,
        x1_is_x2=k0.x1_is_x2,
        is_gaussian=is_gaussian,
        is_reversed=is_reversed,
        is_input=k0.is_input,
        diagonal_batch=k0.diagonal_batch,
        diagonal_spatial=k0.diagonal_spatial,
        shape1=shape1,
        shape2=shape2,
        batch_axis=k0.batch_axis,
        channel_axis=k0.channel_axis,
        mask1=None,
        mask2=None,
    )


def _check_equal_shapes(ks, name: str) -> None:
    if not all(k.shape1 == ks[0].shape1 and k.shape2 == ks[0].shape2 for k in ks[1:]):
        raise ValueError(
            f"All shapes should be equal in `{name}`, got `x1.shape`s of "
            f"{[k.shape1 for k in ks]}, `x2.shape`s of {[k.shape2 for k in ks]}."
        )


@layer
@supports_masking(remask_kernel=False)
def FanInSum():
    """Sums a sequence of inputs (e.g. residual connections).

    Kernel: ``K = Σ_b K_b`` for independent zero-mean Gaussian branches.
    """

    def apply_fn(params, inputs, **kwargs):
        return sum(inputs)

    def kernel_fn(ks, **kwargs):
        ks, is_reversed = _preprocess_kernels_for_fan_in(ks)
        _check_equal_shapes(ks, "FanInSum")
        is_gaussian = all(k.is_gaussian for k in ks)
        if not is_gaussian and len(ks) != 1:
            raise NotImplementedError(
                "`FanInSum` is only implemented for the case where all input layers are "
                "guaranteed to be mean-zero Gaussian, i.e. having all `is_gaussian` set to "
                f"`True`, got {[k.is_gaussian for k in ks]}."
            )

        def total(mats):
            return None if mats[0] is None else sum(mats)

        return _fan_in_kernel(
            ks,
            cov1=total([k.cov1 for k in ks]),
            cov2=total([k.cov2 for k in ks]),
            nngp=total([k.nngp for k in ks]),
            ntk=total([k.ntk for k in ks]),
            is_gaussian=is_gaussian,
            is_reversed=is_reversed,
            shape1=ks[0].shape1,
            shape2=ks[0].shape2,
        )

    def mask_fn(mask, input_shape):
        return _sum_masks(mask)

    return _fan_in_init, apply_fn, kernel_fn, mask_fn


@layer
@supports_masking(remask_kernel=False)
def FanInProd():
    """Elementwise product of a sequence of inputs.

    Kernel: ``K = Π_b K_b``; NTK by the product rule ``Θ = Σ_b Θ_b Π_{c≠b} K_c``.
    """

    def apply_fn(params, inputs, **kwargs):
        return functools.reduce(jnp.multiply, inputs)

    def kernel_fn(ks, **kwargs):
        ks, is_reversed = _preprocess_kernels_for_fan_in(ks)
        _check_equal_shapes(ks, "FanInProd")
        nngps = [k.nngp for k in ks]
        ntks = [k.ntk for k in ks]
        if any(t is None for t in ntks):
            nngp, ntk = functools.reduce(jnp.multiply, nngps), None
        else:
            nngp, ntk = 1.0, 0.0
            for k_b, t_b in zip(nngps, ntks):
                ntk = ntk * k_b + nngp * t_b
                nngp = nngp * k_b
        cov2s = [k.cov2 for k in ks]
        return _fan_in_kernel(
            ks,
            cov1=functools.reduce(jnp.multiply, [k.cov1 for k in ks]),
            cov2=None if any(c is None for c in cov2s) else functools.reduce(jnp.multiply, cov2s),
            nngp=nngp,
            ntk=ntk,
            is_gaussian=len(ks) == 1 and ks[0].is_gaussian,
            is_reversed=is_reversed,
            shape1=None,
            shape2=None,
        )

    def mask_fn(mask, input_shape):
        return _sum_masks(mask)

    return _fan_in_init, apply_fn, kernel_fn, mask_fn


@layer
@supports_masking(remask_kernel=False)
def FanInConcat(axis: int = -1):
    """Concatenates a sequence of inputs along ``axis``.

    Along the channel axis the covariance is the channel-count-weighted mean of the branches'
    (the output is not Gaussian); along a spatial or batch axis, covariances are stacked (only
    for Gaussian inputs), with zero covariance between different branches.
    """
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"`axis` must be an int, got {axis!r}.")

    def init_fn(rng, input_shape):
        ax = axis % len(input_shape[0])
        size = sum(s[ax] for s in input_shape)
        return input_shape[0][:ax] + (size,) + input_shape[0][ax + 1 :], ()

    def apply_fn(params, inputs, **kwargs):
        return jnp.concatenate(inputs, axis)

    def kernel_fn(ks, **kwargs):
        ks, is_reversed = _preprocess_kernels_for_fan_in(ks)
        k0 = ks[0]
        ndim = len(k0.shape1)
        ax = axis % ndim
        drop = lambda s: s[:ax] + s[ax + 1 :]
        for k in ks:
            if drop(k.shape1) != drop(k0.shape1) or drop(k.shape2) != drop(k0.shape2):
                raise ValueError("Non-`axis` shapes should be equal in `FanInConcat`.")
        if ax != k0.channel_axis:
            is_gaussian = all(k.is_gaussian for k in ks)
            if not is_gaussian:
                raise NotImplementedError(
                    "`FanInConcat` layer along the non-channel axis is only implemented for the "
                    "case if all input layers guaranteed to be mean-zero Gaussian, i.e. having "
                    "all `is_gaussian` set to `True`."
                )
        else:
            is_gaussian = False
        if ax == k0.batch_axis:
            warnings.warn(
                f"Concatenation along the batch axis ({ax}) gives inconsistent covariances when "
                f"batching - proceed with caution."
            )
        spatial = tuple(i for i in range(ndim) if i not in (k0.channel_axis, k0.batch_axis))
        if ax in spatial and is_reversed:
            ax = spatial[::-1][spatial.index(ax)]
        to_kernel_axis = {k0.batch_axis: 0, k0.channel_axis: -1}
        to_kernel_axis.update({s: i + 1 for i, s in enumerate(spatial)})
        kax = to_kernel_axis[ax]
        widths = [k.shape1[k0.channel_axis] for k in ks]
        db, ds = k0.diagonal_batch, k0.diagonal_spatial
        return _fan_in_kernel(
            ks,
            cov1=_concat_kernels([k.cov1 for k in ks], kax, db, ds, widths),
            cov2=_concat_kernels([k.cov2 for k in ks], kax, db, ds, widths),
            nngp=_concat_kernels([k.nngp for k in ks], kax, False, ds, widths),
            ntk=_concat_kernels([k.ntk for k in ks], kax, False, ds, widths),
            is_gaussian=is_gaussian,
            is_reversed=is_reversed,
            shape1=None,
            shape2=None,
        )

    def mask_fn(mask, input_shape):
        return _concat_masks(mask, input_shape, axis)

    return init_fn, apply_fn, kernel_fn, mask_fn


def _sum_masks(masks):
    """A position of the fan-in output is masked only if it is masked in every input."""
    present = [m for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, present) if present else None


def _concat_masks(masks, input_shapes, axis: int):
    if len(masks) != len(input_shapes):
        raise ValueError(
            f"Number of masks ({len(masks)}) and inputs ({len(input_shapes)}) don't match."
        )
    if all(m is None for m in masks):
        return None
    axis %= len(input_shapes[0])
    masks = [
        None
        if m is None
        else jnp.broadcast_to(m, m.shape[:axis] + (input_shapes[i][axis],) + m.shape[axis + 1 :])
        for i, m in enumerate(masks)
    ]
    max_shape = tuple(map(max, *(m.shape for m in masks if m is not None)))
    out = []
    for i, m in enumerate(masks):
        if m is None:
            # An unmasked input: all-False, with its own extent along `axis` and the (possibly
            # broadcast) extent of the other masks elsewhere.
            shape = tuple(map(min, max_shape, input_shapes[i]))
            shape = shape[:axis] + (input_shapes[i][axis],) + shape[axis + 1 :]
            out.append(jnp.zeros(shape, jnp.bool_))
        else:
            out.append(
                jnp.broadcast_to(
                    m, max_shape[:axis] + m.shape[axis : axis + 1] + max_shape[axis + 1 :]
                )
            )
    return jnp.concatenate(out, axis)


def _preprocess_kernels_for_fan_in(ks):
    """Checks the branches share a layout and brings them to the majority spatial order."""
    ks = list(ks)
    k0 = ks[0]
    if not all(
        k.diagonal_batch == k0.diagonal_batch
        and k.diagonal_spatial == k0.diagonal_spatial
        and k.batch_axis == k0.batch_axis
        and k.channel_axis == k0.channel_axis
        for k in ks[1:]
    ):
        raise NotImplementedError(
            "`FanIn` layers are only implemented for the case if all input layers output the "
            "same layout of covariance matrices, i.e. having all matching `diagonal_batch` and "
            "`diagonal_spatial` and other attributes."
        )
    is_reversed = sum(k.is_reversed for k in ks) > len(ks) / 2
    ks = [k if k.is_reversed == is_reversed else k.reverse() for k in ks]
    warnings.warn(
        "`FanIn` layers assume independent inputs which is not verified in the code. Please make "
        "sure to have at least one `Dense` / `Conv` / `GlobalSelfAttention` etc. layer in each "
        "branch."
    )
    return ks, is_reversed


def _concat_kernels(mats, axis: int, diagonal_batch: bool, diagonal_spatial: bool, widths):
    """Covariance of a concatenation, in kernel-axis terms (0 batch, -1 channel, i>0 spatial)."""
    if mats[0] is None:
        return None
    if axis == -1:
        if all(w == widths[0] for w in widths):
            widths = [1] * len(widths)
        return sum(m * w for m, w in zip(mats, widths)) / sum(widths)
    if (axis == 0 and diagonal_batch) or (axis != 0 and diagonal_spatial):
        return jnp.concatenate(mats, axis + (0 if diagonal_batch else 1))
    # Full covariance along the concatenated axis: block-diagonal, zero between branches.
    pad_axis = max(0, 2 * axis - (1 if diagonal_batch else 0))
    rows = []
    for i, m in enumerate(mats):
        pads = [(0, 0)] * m.ndim
        before = sum(mats[j].shape[pad_axis] for j in range(i))
        after = sum(mats[j].shape[pad_axis] for j in range(i + 1, len(mats)))
        pads[pad_axis] = (before, after)
        rows.append(jnp.pad(m, pads))
    return jnp.concatenate(rows, pad_axis + 1)
