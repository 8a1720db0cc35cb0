"""Linear layers: ``Dense``, ``DotGeneral``, ``Identity``, ``Index`` (with the ``Slice`` helper).

Same signatures, defaults and semantics as Neural Tangents 0.6.5 (``_src/stax/linear.py``). A
linear map of a Gaussian is Gaussian, so each ``kernel_fn`` is exact:

- ``Dense`` (NTK parameterization): ``K' = σw²·K + σb²``, ``Θ' = K' + σw²·Θ``, elementwise on
  every covariance array whatever its layout (the weights are shared by all positions).
- ``DotGeneral`` with a constant ``O``: ``K'[p, q] = Σ_{a,b} O[p, a] O[q, b] K[a, b]`` through the
  hot op :func:`ntfast.ops.dot_general.kernel_dot_general`.
- ``Index``: ``K'`` is ``K`` indexed on both members of each (sample, position) pair.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax, random

from .. import _utils as utils
from ..kernel import Kernel
from ..ops import fused_cnn as fc
from ..ops.dot_general import kernel_dot_general
from .requirements import Bool, Diagonal, layer, requires, supports_masking

__all__ = ["Dense", "DotGeneral", "Identity", "Index", "Slice"]


@layer
@supports_masking(remask_kernel=False)
def Identity():
    """Identity (no-op), as :obj:`jax.example_libraries.stax.Identity`.

    Returns:
        ``(init_fn, apply_fn, kernel_fn)``; ``kernel_fn`` returns its input kernel.
    """

    def init_fn(rng, input_shape):
        return input_shape, ()

    def apply_fn(params, inputs, **kwargs):
        return inputs

    def kernel_fn(k: Kernel, **kwargs) -> Kernel:
        return k

    kernel_fn.fused_step = lambda input_shape: ()

    return init_fn, apply_fn, kernel_fn


@layer
@supports_masking(remask_kernel=False)
def DotGeneral(
    *,
    lhs: jax.Array | float | None = None,
    rhs: jax.Array | float | None = None,
    dimension_numbers: lax.DotDimensionNumbers = (((), ()), ((), ())),
    precision: lax.Precision | None = None,
    batch_axis: int = 0,
    channel_axis: int = -1,
):
    """Constant (non-trainable) ``lax.dot_general`` with the inputs.

    ``apply_fn`` computes ``lax.dot_general(inputs, rhs, dimension_numbers, precision)`` or
    ``lax.dot_general(lhs, inputs, ...)``; this expresses any linear map of the inputs
    (permutations, pooling, striding, masking, ...). The covariance of the outputs is the
    bilinear form ``K'[p, q] = Σ_{a,b} O[p, a] · O[q, b] · K[a, b]`` of the input covariance
    ``K`` (:func:`ntfast.ops.dot_general.kernel_dot_general`).

    Args:
        lhs: constant left factor, or ``None`` (the inputs are then the left factor).
        rhs: constant right factor, or ``None`` (the inputs are then the right factor). If both
            are ``None`` the layer is the identity.
        dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
        precision: ``None`` or a ``lax.Precision`` for ``apply_fn``.
        batch_axis: batch axis of the inputs. May be contracted, but then no layer can follow.
        channel_axis: channel axis of the inputs (infinite in ``kernel_fn``); may not appear in
            ``dimension_numbers``.

    Returns:
        ``(init_fn, apply_fn, kernel_fn, mask_fn)``.

    Raises:
        ValueError: both ``lhs`` and ``rhs`` are given.
    """
    if rhs is not None and lhs is not None:
        raise ValueError(
            "At most one of constant `rhs` and `lhs` can be non-`None`, since the other factor "
            "is considered to be the layer `inputs`."
        )
    is_identity = rhs is None and lhs is None
    is_lhs = rhs is None
    other = None if is_identity else jnp.asarray(lhs if is_lhs else rhs)

    def dot_fn(x):
        if other is None:
            return x
        args = (other.astype(x.dtype), x) if is_lhs else (x, other.astype(x.dtype))
        return lax.dot_general(*args, dimension_numbers, precision)

    def init_fn(rng, input_shape):
        dtype = jnp.float32 if other is None else other.dtype
        out = jax.eval_shape(dot_fn, jax.ShapeDtypeStruct(input_shape, dtype))
        return out.shape, ()

    def apply_fn(params, inputs, **kwargs):
        return dot_fn(inputs)

    # A contracted axis needs its pairwise (off-diagonal) covariances.
    input_cs = tuple(dimension_numbers[0][1 if is_lhs else 0])
    diagonal_batch = batch_axis not in input_cs or is_identity
    diagonal_spatial = Diagonal(
        input=Bool.YES if (input_cs in ((), (batch_axis,)) or is_identity) else Bool.NO
    )

    @requires(
        diagonal_batch=diagonal_batch,
        diagonal_spatial=diagonal_spatial,
        batch_axis=batch_axis,
        channel_axis=channel_axis,
    )
    def kernel_fn(k: Kernel, **kwargs) -> Kernel:
        return kernel_dot_general(k, other, other, is_lhs, dimension_numbers)

    def mask_fn(mask, input_shape):
        # An output entry is masked iff every input entry feeding it is masked.
        mask_shape = list(input_shape)
        mask_shape[channel_axis] = mask.shape[channel_axis]
        return ~dot_fn(~jnp.broadcast_to(mask, mask_shape))

    return init_fn, apply_fn, kernel_fn, mask_fn


def _affine(mat: jax.Array | None, W_std: float, b_std: float | None) -> jax.Array | None:
    """Covariance of ``x·W + b`` for i.i.d. ``W ~ N(0, W_std²)``, ``b ~ N(0, b_std²)``:
    ``W_std²·mat + b_std²`` (any layout; ``None`` stays ``None``)."""
    if mat is None:
        return None
    mat = W_std**2 * mat
    return mat if b_std is None else mat + b_std**2


@layer
@supports_masking(remask_kernel=True)
def Dense(
    out_dim: int,
    W_std: float = 1.0,
    b_std: float | None = None,
    batch_axis: int = 0,
    channel_axis: int = -1,
    parameterization: str = "ntk",
    s: tuple[int, int] = (1, 1),
):
    r"""Dense (fully connected) layer, as :obj:`jax.example_libraries.stax.Dense`.

    Finite width: ``"ntk"``: ``z = σw/√N_in · x·W + σb·b`` with ``W, b ~ N(0, 1)``;
    ``"standard"``: ``z = x·W/√s[0] + b`` with ``W ~ N(0, σw²/(N_in/s[0]))``, ``b ~ N(0, σb²)``
    and ``W`` of shape ``(s[0]·in_dim, s[1]·out_dim)`` (Sohl-Dickstein et al. 2020,
    arXiv:2001.07301).

    Infinite width (every covariance array, any layout; ``K`` = nngp, cov1, cov2):
    ``K' = σw²·K + σb²``; ``"ntk"``: ``Θ' = K' + σw²·Θ``; ``"standard"``:
    ``Θ' = (N_in/s[0])·K + σw²·Θ (+ 1 with a bias)``.

    Args:
        out_dim: output channel count (ignored by ``kernel_fn`` under ``"ntk"``).
        W_std: weight standard deviation ``σw``.
        b_std: bias standard deviation ``σb``; ``None`` means no bias.
        batch_axis: batch axis of the inputs.
        channel_axis: channel axis of the inputs (infinite in ``kernel_fn``).
        parameterization: ``"ntk"`` or ``"standard"``.
        s: ``"standard"`` only: width scalings ``(s_in, s_out)`` of the layer.

    Returns:
        ``(init_fn, apply_fn, kernel_fn, mask_fn)``.

    Raises:
        ValueError: unknown ``parameterization``.
    """
    if not isinstance(parameterization, str):
        raise TypeError(f"`parameterization` must be a string, got {type(parameterization)}.")
    parameterization = parameterization.lower()
    if parameterization not in ("ntk", "standard"):
        raise ValueError(
            f"Parameterization not supported: {parameterization} (expected 'ntk' or 'standard')."
        )

    def draw(rng, input_shape, width):
        c_axis = channel_axis % len(input_shape)
        output_shape = tuple(input_shape[:c_axis]) + (width,) + tuple(input_shape[c_axis + 1 :])
        rng_w, rng_b = random.split(rng)
        W = random.normal(rng_w, (input_shape[c_axis], width))
        if b_std is None:
            b = None
        else:
            b_shape = [1] * len(input_shape)
            b_shape[channel_axis] = width
            b = random.normal(rng_b, b_shape)
        return output_shape, (W, b)

    def init_fn(rng, input_shape):
        if parameterization == "ntk":
            return draw(rng, input_shape, out_dim)
        output_shape, (W, b) = draw(rng, input_shape, out_dim * s[1])
        W = W * (W_std / (input_shape[channel_axis] / s[0]) ** 0.5)
        return output_shape, (W, None if b is None else b * b_std)

    def apply_fn(params, inputs, **kwargs):
        W, b = params
        prod = jnp.moveaxis(jnp.tensordot(W, inputs, (0, channel_axis)), 0, channel_axis)
        if parameterization == "ntk":
            out = W_std / inputs.shape[channel_axis] ** 0.5 * prod
            return out if b is None else out + b_std * b
        out = prod / s[0] ** 0.5
        return out if b is None else out + b

    @requires(batch_axis=batch_axis, channel_axis=channel_axis, diagonal_spatial=Diagonal())
    def kernel_fn(k: Kernel, **kwargs) -> Kernel:
        ntk = k.ntk
        if parameterization == "ntk":
            nngp = _affine(k.nngp, W_std, b_std)
            if ntk is not None:
                ntk = nngp + W_std**2 * ntk
        else:
            if ntk is not None:
                input_width = k.shape1[channel_axis] / s[0]
                ntk = input_width * k.nngp + W_std**2 * ntk
                if b_std is not None:
                    ntk = ntk + 1.0
            nngp = _affine(k.nngp, W_std, b_std)
        return k.replace(
            cov1=_affine(k.cov1, W_std, b_std),
            nngp=nngp,
            cov2=_affine(k.cov2, W_std, b_std),
            ntk=ntk,
            is_gaussian=True,
            is_input=False,
        )

    def mask_fn(mask, input_shape):
        return jnp.all(mask, axis=channel_axis, keepdims=True)

    def dense_affine(k):
        """Keyword arguments of ``ops.nonlin.nonlin_affine`` for this layer after ``k``."""
        width = None if parameterization == "ntk" else k.shape1[channel_axis] / s[0]
        return {
            "w_var": W_std**2,
            "b_var": None if b_std is None else b_std**2,
            "parameterization": parameterization,
            "input_width": width,
        }

    kernel_fn.dense_affine = dense_affine

    def fused_step(input_shape):
        nd = len(input_shape)
        if nd < 2 or batch_axis % nd != 0 or channel_axis % nd != nd - 1:
            return None
        scale = None if parameterization == "ntk" else input_shape[channel_axis] / s[0]
        b_var = None if b_std is None else b_std**2
        return (fc.DenseStep(W_std**2, b_var, scale),)

    kernel_fn.fused_step = fused_step

    return init_fn, apply_fn, kernel_fn, mask_fn


@layer
@supports_masking(remask_kernel=False)
def Index(idx: utils.SliceType, batch_axis: int = 0, channel_axis: int = -1):
    """Indexes the activations like ``x[idx]`` (build ``idx`` with :obj:`Slice`).

    The kernel is indexed on both members of every (sample, position) pair: for full spatial
    covariances ``K'[n, m, h, h', ...] = K[idx_b[n], idx_b[m], idx_h[h], idx_h[h'], ...]``.

    Args:
        idx: the index, e.g. ``stax.Slice[::2, :4, 1]``.
        batch_axis: batch axis of the inputs.
        channel_axis: channel axis of the inputs (infinite in ``kernel_fn``).

    Returns:
        ``(init_fn, apply_fn, kernel_fn, mask_fn)``.

    Raises:
        NotImplementedError: in ``kernel_fn``, if the channel axis is indexed (other than ``:``
            or ``...``) or the batch axis is indexed with an integer (the kernel keeps a batch
            axis).
    """

    def init_fn(rng, input_shape):
        return utils.slice_shape(input_shape, idx), ()

    def apply_fn(params, x, **kwargs):
        return x[idx]

    def mask_fn(mask, input_shape):
        return mask[idx]

    @requires(batch_axis=batch_axis, channel_axis=channel_axis)
    def kernel_fn(k: Kernel, **kwargs) -> Kernel:
        return k[idx]

    return init_fn, apply_fn, kernel_fn, mask_fn


class _Slice:
    """``Slice[1:10, :, ::-1]`` returns the index ``(slice(1, 10), slice(None), slice(None, None,
    -1))``, to pass to :obj:`Index` (slice syntax is not allowed in call arguments)."""

    def __getitem__(self, idx: utils.SliceType) -> utils.SliceType:
        return idx

    def __repr__(self) -> str:
        return "Slice"


Slice = _Slice()
