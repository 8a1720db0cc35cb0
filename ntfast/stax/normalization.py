"""Normalization layers: ``LayerNorm`` and ``Dropout``.

Same signatures, defaults and semantics as Neural Tangents 0.6.5 (``_src/stax/linear.py``).

- ``LayerNorm`` over axes containing the channel axis: at infinite width the sample mean over
  channels of a centred Gaussian is 0 and its variance is the per-(sample, position) variance
  ``v = diag(K)`` (averaged over the other normalized axes), so
  ``K'[a, b] = K[a, b] / sqrt((eps + v[a]) · (eps + v[b]))``, and the same for ``Θ``.
- ``Dropout`` (keep rate ``r``, train mode): ``x ↦ x·B/r`` with ``B ~ Bernoulli(r)`` i.i.d. per
  entry, so entries of a covariance that pair an activation with itself are multiplied by
  ``1/r`` and all others are unchanged.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
from jax import random

from .. import _utils as utils
from ..kernel import Kernel
from .requirements import get_diagonal_outer_prods, layer, mean_and_var, requires, supports_masking

__all__ = ["Dropout", "LayerNorm"]


@layer
@supports_masking(remask_kernel=False)
def LayerNorm(
    axis: utils.Axes = -1,
    eps: float = 1e-12,
    batch_axis: int = 0,
    channel_axis: int = -1,
):
    """Layer normalisation: ``(x - mean) / sqrt(eps + var)`` over ``axis`` (masked entries ignored).

    ``kernel_fn`` needs Gaussian inputs (``k.is_gaussian``) and ``axis`` containing the channel
    axis. With ``v1 = diag(cov1)``, ``v2 = diag(cov2)`` (per sample and position, averaged over the
    normalized non-channel axes, ignoring masked positions):
    ``nngp'[n, m, s, t] = nngp[n, m, s, t] / sqrt((eps + v1[n, s]) · (eps + v2[m, t]))``, the same
    for ``ntk``; ``cov1`` (``cov2``) uses ``v1`` (``v2``) on both sides.

    Args:
        axis: axes to normalize over (must include ``channel_axis`` for ``kernel_fn``).
        eps: added to the variances to avoid division by zero.
        batch_axis: batch axis of the inputs.
        channel_axis: channel axis of the inputs (infinite in ``kernel_fn``).

    Returns:
        ``(init_fn, apply_fn, kernel_fn)``.

    Raises:
        NotImplementedError: non-Gaussian input kernel, or per-channel masks.
        ValueError: ``axis`` does not contain the channel axis.
    """

    def init_fn(rng, input_shape):
        return input_shape, ()

    def apply_fn(params, inputs, mask=None, **kwargs):
        norm_axes = utils.canonicalize_axis(axis, inputs)
        mean, var = mean_and_var(inputs, norm_axes, keepdims=True, mask=mask, get_var=True)
        return (inputs - mean) / jnp.sqrt(eps + var)

    @requires(batch_axis=batch_axis, channel_axis=channel_axis)
    def kernel_fn(k: Kernel, **kwargs) -> Kernel:
        if not k.is_gaussian:
            raise NotImplementedError("LayerNorm only implemented for Gaussian inputs.")
        ndim = len(k.shape1)
        c_axis, b_axis = channel_axis % ndim, batch_axis % ndim
        norm_axes = utils.canonicalize_axis(axis, k.shape1)
        if c_axis not in norm_axes:
            raise ValueError(
                f"Normalisation over channels (axis {c_axis}) necessary for convergence to an "
                f"asymptotic kernel; got axis={norm_axes}."
            )
        # Axes of the variance map `get_diagonal(cov)`: batch first, then spatial axes in the
        # kernel's order (reversed if `is_reversed`).
        spatial = [i for i in range(ndim) if i not in (c_axis, b_axis)]
        if k.is_reversed:
            spatial = spatial[::-1]
        var_axes = tuple(
            0 if i == b_axis else 1 + spatial.index(i) for i in norm_axes if i != c_axis
        )

        def variance_mask(m):
            # Input-layout mask -> layout of the variance map (N, *spatial in kernel order).
            if m is None:
                return None
            if m.shape[c_axis] != 1:
                raise NotImplementedError(
                    "`LayerNorm` with different per-channel masks not implemented in the "
                    "infinite limit."
                )
            return jnp.transpose(m, [b_axis] + spatial + [c_axis])[..., 0]

        prod11, prod12, prod22 = get_diagonal_outer_prods(
            eps + k.cov1,
            None if k.cov2 is None else eps + k.cov2,
            k.diagonal_batch,
            k.diagonal_spatial,
            operator.mul,
            axis=var_axes,
            mask1=variance_mask(k.mask1),
            mask2=variance_mask(k.mask2),
        )
        return k.replace(
            nngp=k.nngp / jnp.sqrt(prod12),
            ntk=None if k.ntk is None else k.ntk / jnp.sqrt(prod12),
            cov1=k.cov1 / jnp.sqrt(prod11),
            cov2=None if k.cov2 is None else k.cov2 / jnp.sqrt(prod22),
        )

    return init_fn, apply_fn, kernel_fn


def _scale_diagonal(
    x: jax.Array | None, factor, diagonal_batch: bool, diagonal_spatial: bool
) -> jax.Array | None:
    """Multiplies by ``factor`` the entries of ``x`` pairing an activation with itself.

    ``x`` is a covariance in kernel layout: batch ``(N,)`` if ``diagonal_batch`` else
    ``(N1, N2)``, then spatial ``(H, W, ...)`` if ``diagonal_spatial`` else ``(H, H', W, W', ...)``.
    The self-pairs are ``n == m`` (always, under ``diagonal_batch``) and ``h == h'`` for every
    spatial pair. A full-batch ``x`` with ``N1 != N2`` holds different samples on its two sides
    and is returned unchanged.
    """
    if x is None or x.ndim == 0:
        # `None`, or the input layer's placeholder NTK `0.` (NT raises an IndexError here).
        return x
    if diagonal_batch and diagonal_spatial:
        return x * factor
    if not diagonal_batch and x.shape[0] != x.shape[1]:
        return x
    # Pairs of axes whose equal indices form the self-pairs, as (first, second) positions.
    pairs = [] if diagonal_batch else [(0, 1)]
    if not diagonal_spatial:
        start = 1 if diagonal_batch else 2
        pairs += [(a, a + 1) for a in range(start, x.ndim, 2)]
    on_diag = jnp.ones((1,) * x.ndim, dtype=bool)
    for a, b in pairs:
        shape = [1] * x.ndim
        shape[a] = shape[b] = x.shape[a]
        on_diag = on_diag & jnp.eye(x.shape[a], dtype=bool).reshape(shape)
    return jnp.where(on_diag, x * factor, x)


@layer
@supports_masking(remask_kernel=False)
def Dropout(rate: float, mode: str = "train"):
    """Dropout, as :obj:`jax.example_libraries.stax.Dropout`; ``rate`` is the *keep* rate.

    Train mode: ``apply_fn(params, x, rng=key)`` returns ``where(B, x / rate, 0)`` with
    ``B ~ Bernoulli(rate)``. ``kernel_fn``: the self-pair entries (same sample and position) of
    ``cov1``/``cov2`` — and of ``nngp``/``ntk`` when ``x1 is x2`` — are multiplied by
    ``1/rate``; the layer's output is no longer Gaussian. Test mode is the identity.

    Args:
        rate: keep probability in ``(0, 1]`` (``1`` keeps every unit).
        mode: ``"train"`` or ``"test"``.

    Returns:
        ``(init_fn, apply_fn, kernel_fn)``.

    Raises:
        ValueError: bad ``mode`` or ``rate``; in ``kernel_fn``, a dropout on the input layer;
            in ``apply_fn``, no ``rng``.
    """
    if mode not in ("test", "train"):
        raise ValueError(f'The `mode` must be either "test" or "train", got {mode!r}.')
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"The `rate` must be > 0. and <= 1., got {rate}.")

    def init_fn(rng, input_shape):
        return input_shape, ()

    def apply_fn(params, inputs, **kwargs):
        rng = kwargs.get("rng", None)
        if rng is None:
            raise ValueError(
                "Dropout layer requires apply_fn to be called with a PRNG key argument: "
                "`apply_fn(params, inputs, rng=key)`."
            )
        if mode == "test":
            return inputs
        keep = random.bernoulli(rng, rate, inputs.shape)
        return jnp.where(keep, inputs / rate, 0)

    def kernel_fn_test(k: Kernel, **kwargs) -> Kernel:
        return k

    @requires(use_dropout=True)
    def kernel_fn_train(k: Kernel, **kwargs) -> Kernel:
        # NT's input kernels carry `is_input=False` (kept for static-field parity), so the input
        # layer is also recognized by its parameter-free NTK: the 0-d zero `_inputs_to_kernel` sets.
        if k.is_input or (k.ntk is not None and jnp.ndim(k.ntk) == 0):
            raise ValueError(
                "Dropout(mode='train') cannot be applied to the input layer: place it after a "
                "Dense/Conv layer (inputs are fixed, so dropping them is not a random layer here)."
            )
        factor = 1.0 / rate
        pair_factor = jnp.where(k.x1_is_x2, factor, 1.0)
        return k.replace(
            cov1=_scale_diagonal(k.cov1, factor, k.diagonal_batch, k.diagonal_spatial),
            cov2=_scale_diagonal(k.cov2, factor, k.diagonal_batch, k.diagonal_spatial),
            nngp=_scale_diagonal(k.nngp, pair_factor, False, k.diagonal_spatial),
            ntk=_scale_diagonal(k.ntk, pair_factor, False, k.diagonal_spatial),
            is_gaussian=False,
        )

    kernel_fn = kernel_fn_test if mode == "test" else kernel_fn_train
    return init_fn, apply_fn, kernel_fn
