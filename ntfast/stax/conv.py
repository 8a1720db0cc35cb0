"""``Conv``: the shared-weight convolution layer (NT 0.6.5 ``stax.Conv``).

Finite width: ``y = W_std / sqrt(C·|F|) · conv(x, W) + b_std · b`` (NTK parameterization) or
``y = conv(x, W) / sqrt(s0) + b`` with ``W ~ N(0, W_std² s0 / (C·|F|))``, ``b ~ N(0, b_std²)``
(standard parameterization), ``C`` input channels, ``|F| = Π filter_shape``.

Infinite width (per covariance array, layouts as in :mod:`ntfast.ops.conv`)::

    K' = W_std² · conv_cov(K) + b_std²
    Θ' = W_std² · conv_cov(Θ) + K'                                  (NTK parameterization)
    Θ' = C·|F|/s0 · conv_cov(K) + W_std² · conv_cov(Θ) [+ 1 if b_std]  (standard)

``conv_cov`` flips the stored order of full-spatial pairs, so ``is_reversed`` flips as in NT; the
output spatial axes are then permuted from the ``lhs`` to the ``out`` spec order like NT does.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax, random

from ..ops import fused_cnn as fc
from ..ops.conv import conv_cov
from .pooling import parse_padding, pool_mask, positive_ints, window_strides, wrap_pad_same
from .requirements import Bool, Diagonal, Padding, layer, requires, supports_masking

_PARAMETERIZATIONS = ("ntk", "standard")


def _default_dimension_numbers(n: int) -> tuple[str, str, str]:
    """Channels-last specs with NT's spatial letters: ``("NABC", "ABIO", "NABC")`` for 2-D."""
    spatial = "".join(c for c in string.ascii_uppercase if c not in "NCIO")[:n]
    lhs = "N" + spatial + "C"
    return lhs, spatial + "IO", lhs


def _check_dimension_numbers(dimension_numbers, n: int) -> tuple[str, str, str]:
    """Validated ``(lhs_spec, rhs_spec, out_spec)`` strings for ``n`` spatial axes."""
    err = (
        "`dimension_numbers` must be three strings (lhs, rhs, out specs), e.g. "
        f"('NHWC', 'HWIO', 'NHWC'), with {n} spatial letters matching `filter_shape`; "
        f"got {dimension_numbers!r}"
    )
    try:
        lhs, rhs, out = ("".join(spec) for spec in dimension_numbers)
    except (TypeError, ValueError):
        raise ValueError(err + ".") from None
    for spec, special in ((lhs, "NC"), (rhs, "IO"), (out, "NC")):
        if len(spec) != n + 2 or len(set(spec)) != len(spec) or not set(special) <= set(spec):
            raise ValueError(err + f": spec {spec!r} must hold {special!r} and {n} letters.")
    spatial = [
        [c for c in spec if c not in special]
        for spec, special in ((lhs, "NC"), (rhs, "IO"), (out, "NC"))
    ]
    if not set(spatial[0]) == set(spatial[1]) == set(spatial[2]):
        raise ValueError(err + ": the specs name different spatial axes.")
    return lhs, rhs, out


@layer
@supports_masking(remask_kernel=True)
def Conv(
    out_chan: int,
    filter_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str = Padding.VALID.name,
    W_std: float = 1.0,
    b_std: float | None = None,
    dimension_numbers: tuple[str, str, str] | None = None,
    parameterization: str = "ntk",
    s: tuple[int, int] = (1, 1),
):
    """General convolution (NT's ``stax.Conv``, based on ``jax.example_libraries.stax.GeneralConv``).

    Args:
      out_chan: output channels (ignored by ``kernel_fn`` in NTK parameterization).
      filter_shape: filter size per spatial axis, in the ``rhs`` spec's spatial order.
      strides: strides per spatial axis (``rhs`` order); ``None`` means all ones.
      padding: ``"VALID"``, ``"SAME"`` or ``"CIRCULAR"`` (periodic convolution).
      W_std: weight standard deviation.
      b_std: bias standard deviation; ``None`` means no bias.
      dimension_numbers: ``(lhs_spec, rhs_spec, out_spec)`` as for ``lax.conv_general_dilated``;
        ``None`` means channels last, ``("NABC", "ABIO", "NABC")`` in 2-D.
      parameterization: ``"ntk"`` or ``"standard"``.
      s: ``(s0, s1)`` widths scale of the standard parameterization (as NT's ``Dense``).

    Returns:
      ``(init_fn, apply_fn, kernel_fn)``; kernel math: :func:`ntfast.ops.conv.conv_cov`.
    """
    filter_shape = positive_ints(filter_shape, "filter_shape")
    n = len(filter_shape)
    strides = window_strides(strides, n, "filter_shape")
    padding = parse_padding(padding)
    parameterization = str(parameterization).lower()
    if parameterization not in _PARAMETERIZATIONS:
        raise ValueError(
            f"`parameterization` must be one of {_PARAMETERIZATIONS}, got {parameterization!r}."
        )
    if dimension_numbers is None:
        dimension_numbers = _default_dimension_numbers(n)
    lhs_spec, rhs_spec, out_spec = _check_dimension_numbers(dimension_numbers, n)
    dimension_numbers = (lhs_spec, rhs_spec, out_spec)

    # CIRCULAR = wrap-pad by the SAME amounts, then a VALID convolution.
    init_padding = Padding.SAME if padding == Padding.CIRCULAR else padding
    apply_padding = Padding.VALID if padding == Padding.CIRCULAR else padding
    out_chan_init = out_chan if parameterization == "ntk" else out_chan * s[1]

    def fan_in(input_shape):
        return input_shape[lhs_spec.index("C")] * int(np.prod(filter_shape))

    def ntk_init_fn(rng, input_shape):
        taps = iter(filter_shape)
        w_shape = [
            out_chan_init
            if c == "O"
            else input_shape[lhs_spec.index("C")]
            if c == "I"
            else next(taps)
            for c in rhs_spec
        ]
        output_shape = lax.conv_general_shape_tuple(
            input_shape, w_shape, strides, init_padding.name, dimension_numbers
        )
        b_shape = [out_chan_init if c == "C" else 1 for c in out_spec]
        k_w, k_b = random.split(rng)
        W = random.normal(k_w, w_shape)
        b = random.normal(k_b, b_shape)
        return output_shape, (W, None if b_std is None else b)

    def init_fn(rng, input_shape):
        output_shape, (W, b) = ntk_init_fn(rng, input_shape)
        if parameterization == "standard":
            W = W * (W_std / (fan_in(input_shape) / s[0]) ** 0.5)
            b = None if b is None else b * b_std
        return output_shape, (W, b)

    def apply_fn(params, inputs, **kwargs):
        W, b = params
        if parameterization == "ntk":
            norm, b_scale = W_std / fan_in(inputs.shape) ** 0.5, b_std
        else:
            norm, b_scale = 1.0 / s[0] ** 0.5, 1.0
        if padding == Padding.CIRCULAR:
            axes = tuple(lhs_spec.index(c) for c in rhs_spec if c not in "IO")
            inputs = wrap_pad_same(inputs, filter_shape, strides, axes)
        out = norm * lax.conv_general_dilated(
            inputs, W, strides, apply_padding.name, dimension_numbers=dimension_numbers
        )
        if b is not None:
            out = out + b_scale * b
        return out

    # Spatial letters in the order the covariance stores them (lhs order) and in filter order.
    input_spatial = tuple(c for c in lhs_spec if c not in "NC")
    filter_spatial = tuple(c for c in rhs_spec if c not in "IO")
    out_spatial = tuple(c for c in out_spec if c not in "NC")
    filter_kernel = tuple(filter_shape[filter_spatial.index(c)] for c in input_spatial)
    strides_kernel = tuple(strides[filter_spatial.index(c)] for c in input_spatial)
    # NT's permutation of the output spatial axes (passed to `Kernel.transpose`).
    out_permutation = tuple(out_spatial.index(c) for c in input_spatial)

    @requires(
        batch_axis=lhs_spec.index("N"),
        channel_axis=lhs_spec.index("C"),
        diagonal_spatial=Diagonal(output=Bool.NO),
    )
    def kernel_fn(k, **kwargs):
        def conv(x):
            if x is None or x.ndim == 0:
                return x
            return conv_cov(
                x,
                filter_shape=filter_kernel,
                strides=strides_kernel,
                padding=padding.name,
                diagonal_spatial=k.diagonal_spatial,
                is_reversed=k.is_reversed,
            )

        def affine(x, scale, shift):
            if x is None:
                return x
            x = x * scale
            return x if shift is None else x + shift

        b_var = None if b_std is None else b_std**2
        cov1 = affine(conv(k.cov1), W_std**2, b_var)
        cov2 = affine(conv(k.cov2), W_std**2, b_var)
        nngp_conv = conv(k.nngp)
        nngp = affine(nngp_conv, W_std**2, b_var)
        ntk = k.ntk
        if ntk is not None:
            if parameterization == "ntk":
                ntk = W_std**2 * conv(ntk) + nngp
            else:
                ntk = fan_in(k.shape1) / s[0] * nngp_conv + W_std**2 * conv(ntk)
                if b_std is not None:
                    ntk = ntk + 1.0

        out = k.replace(
            cov1=cov1,
            nngp=nngp,
            cov2=cov2,
            ntk=ntk,
            is_gaussian=True,
            is_reversed=k.is_reversed if k.diagonal_spatial else not k.is_reversed,
            batch_axis=out_spec.index("N"),
            channel_axis=out_spec.index("C"),
            is_input=False,
        )
        if out_permutation != tuple(range(n)):
            out = out.transpose(out_permutation)
        return out

    def fused_step(input_shape):
        # Stride-1 2-D convs on channels-last images with spatial axes kept in order.
        if n != 2 or any(v != 1 for v in strides) or len(input_shape) != 4:
            return None
        if lhs_spec[0] != "N" or lhs_spec[-1] != "C" or out_spec != lhs_spec:
            return None
        scale = None if parameterization == "ntk" else fan_in(input_shape) / s[0]
        b_var = None if b_std is None else b_std**2
        return (fc.ConvStep(filter_kernel, padding.name, W_std**2, b_var, scale),)

    kernel_fn.fused_step = fused_step

    def mask_fn(mask, input_shape):
        batch_axis, channel_axis = lhs_spec.index("N"), lhs_spec.index("C")
        # One weight sum per position: a position is masked if all its channels are.
        mask = jnp.all(mask, axis=channel_axis, keepdims=True)
        mask = pool_mask(mask, filter_shape, strides, init_padding, batch_axis, channel_axis)
        return jnp.transpose(mask, tuple(out_spec.index(c) for c in lhs_spec))

    return init_fn, apply_fn, kernel_fn, mask_fn
