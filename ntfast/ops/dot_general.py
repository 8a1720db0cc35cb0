"""Covariances of linear maps: the input covariance and the ``dot_general`` bilinear form.

Two hot ops, each a pure-XLA reference registered under its op name and a public function that
dispatches per call (``backend=None`` takes the flag in force, see :mod:`ntfast.backend`):

``"input_cov"`` -- :func:`input_cov`
    The covariances of the network inputs, ``x1·x2ᵀ / C`` contracted over the channel axis
    (length ``C``), in every layout NT's ``Kernel`` can hold (``diagonal_batch`` x
    ``diagonal_spatial``, any ``batch_axis`` / ``channel_axis``). Reproduces the arrays of NT's
    ``_inputs_to_kernel`` (``neural_tangents/_src/stax/requirements.py``).

``"dot_general"`` -- :func:`bilinear`
    The covariance of ``y = lax.dot_general(x, O)`` (or ``(O, x)``) for a constant ``O`` and a
    Gaussian ``x`` with covariance ``K``:
    ``Cov(y1[p], y2[q]) = Σ_{a,b} O1[p, a] · O2[q, b] · K[a, b]``. Written as two successive
    pairwise contractions (``O1`` into ``K``, then ``O2``), never the outer product ``O1 ⊗ O2``.
    :func:`kernel_dot_general` maps NT's ``Kernel.dot_general`` onto it: it derives the index
    labels of every covariance array from the kernel layout and calls :func:`bilinear` for
    ``cov1``, ``cov2``, ``nngp`` and ``ntk``.

Kernel layouts (``S`` spatial axes, ``N1``/``N2`` batch sizes, spatial axes in input order)::

    diagonal_batch   cov1: (N1, ...)        nngp/ntk: (N1, N2, ...)
    full batch       cov1: (N1, N1, ...)
    diagonal_spatial ... = (H, W, ...)
    full spatial     ... = (H, H, W, W, ...)  ("zipped"; pairs in reverse order if is_reversed)
"""

from __future__ import annotations

import functools
import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntfast import backend as _backend

from .layout import materialized_transpose

__all__ = ["bilinear", "input_cov", "kernel_dot_general"]


# ----------------------------------------------------------------------------------------------
# Input covariance.


def _to_nsc(x: jnp.ndarray, batch_axis: int, channel_axis: int) -> jnp.ndarray:
    """Moves ``x`` to ``(N, *spatial, C)``, spatial axes kept in their input order."""
    return jnp.moveaxis(x, (batch_axis, channel_axis), (0, -1))


def _zip_pairs(x: jnp.ndarray, start: int) -> jnp.ndarray:
    """``(..., A, B, C, A', B', C')`` -> ``(..., A, A', B, B', C, C')`` from axis ``start``."""
    half = (x.ndim - start) // 2
    perm = list(range(start)) + [start + i + side * half for i in range(half) for side in (0, 1)]
    return materialized_transpose(x, perm)


@_backend.register("input_cov", "xla")
@functools.partial(
    jax.jit,
    static_argnames=(
        "diagonal_batch", "diagonal_spatial", "batch_axis", "channel_axis", "precision",
    ),
)  # fmt: skip
def _input_cov_xla(
    x1: jnp.ndarray,
    x2: jnp.ndarray | None,
    *,
    diagonal_batch: bool,
    diagonal_spatial: bool,
    batch_axis: int,
    channel_axis: int,
    precision=None,
):
    """Reference of :func:`input_cov`; axes already canonical (non-negative)."""
    n_channels = x1.shape[channel_axis]
    a1 = _to_nsc(x1, batch_axis, channel_axis)
    a2 = None if x2 is None else _to_nsc(x2, batch_axis, channel_axis)
    spatial = a1.shape[1:-1]
    n_pix = int(np.prod(spatial, dtype=np.int64))

    def full_batch(u: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
        n1, n2, c = u.shape[0], v.shape[0], u.shape[-1]
        if diagonal_spatial:
            # One (N1, C) @ (C, N2) product per pixel: (P, N1, C) @ (P, C, N2) -> (P, N1, N2).
            up = jnp.moveaxis(u.reshape(n1, n_pix, c), 1, 0)
            vp = jnp.moveaxis(v.reshape(n2, n_pix, c), 1, 0)
            out = jnp.matmul(up, jnp.swapaxes(vp, 1, 2), precision=precision)
            out = jnp.moveaxis(out, 0, -1).reshape((n1, n2) + spatial)
        else:
            # One (N1·P, C) @ (C, N2·P) product, then (N1, S, N2, S) -> (N1, N2, s, s', ...).
            out = jnp.matmul(
                u.reshape(n1 * n_pix, c), v.reshape(n2 * n_pix, c).T, precision=precision
            )
            out = out.reshape((n1,) + spatial + (n2,) + spatial)
            out = jnp.moveaxis(out, 1 + len(spatial), 1)
            out = _zip_pairs(out, 2)
        return out / n_channels

    def diag_batch(u: jnp.ndarray) -> jnp.ndarray:
        n, c = u.shape[0], u.shape[-1]
        if diagonal_spatial:
            out = jnp.sum(u * u, axis=-1)
        else:
            # One (P, C) @ (C, P) product per image.
            up = u.reshape(n, n_pix, c)
            out = jnp.matmul(up, jnp.swapaxes(up, 1, 2), precision=precision)
            out = _zip_pairs(out.reshape((n,) + spatial + spatial), 1)
        return out / n_channels

    def self_cov(u: jnp.ndarray) -> jnp.ndarray:
        return diag_batch(u) if diagonal_batch else full_batch(u, u)

    cov1 = self_cov(a1)
    cov2 = None if a2 is None else self_cov(a2)
    nngp = full_batch(a1, a1 if a2 is None else a2)
    return cov1, nngp, cov2


def input_cov(
    x1: jnp.ndarray,
    x2: jnp.ndarray | None = None,
    *,
    diagonal_batch: bool,
    diagonal_spatial: bool,
    batch_axis: int,
    channel_axis: int | None,
    precision=None,
    backend: str | None = None,
):
    """Uncentred input covariances ``(cov1, nngp, cov2)``, averaged over the channel axis.

    With ``C = x1.shape[channel_axis]``, ``n, m`` batch indices and ``s, t`` spatial positions:
    ``nngp[n, m, s, t] = Σ_c x1[n, s, c] · x2[m, t, c] / C``; ``cov1`` is the same for
    ``(x1, x1)`` and ``cov2`` for ``(x2, x2)``. Layouts (``S`` = spatial shape in input order):

    ============================  ======================  =====================================
    (diagonal_batch, spatial)     cov1                    nngp
    ============================  ======================  =====================================
    (True, True)                  (N1, *S)                (N1, N2, *S)
    (True, False)                 (N1, H, H, W, W, ...)   (N1, N2, H, H, W, W, ...)
    (False, True)                 (N1, N1, *S)            (N1, N2, *S)
    (False, False)                (N1, N1, H, H, ...)     (N1, N2, H, H, W, W, ...)
    ============================  ======================  =====================================

    Same arrays as NT's ``_inputs_to_kernel`` (after its masking): inputs are cast to
    ``canonicalize_dtype(float64)``, ``x2=None`` means ``x2 = x1`` for ``nngp`` and gives
    ``cov2=None``. ``channel_axis=None`` flattens every non-batch axis into the channel axis
    (the caller must then record ``diagonal_spatial=False``, ``batch_axis=0``,
    ``channel_axis=1`` in the ``Kernel``, as NT does). The full-spatial layouts cost one matmul
    of ``(N1·P, C) @ (C, N2·P)`` (``P`` pixels), the diagonal-spatial ones ``P`` batched
    ``(N1, C) @ (C, N2)`` products.

    Args:
        x1: ``(2+S)``-D array, batch and channel axes at ``batch_axis`` / ``channel_axis``.
        x2: ``None`` or an array of the same shape as ``x1`` except for the batch size.
        diagonal_batch: whether ``cov1``/``cov2`` keep only the ``n == n'`` diagonal.
        diagonal_spatial: whether all arrays keep only the ``s == s'`` spatial diagonal.
        batch_axis: batch axis of the inputs (may be negative).
        channel_axis: channel axis of the inputs (may be negative), or ``None`` (see above).
        precision: ``lax.Precision`` of the products (``None``: the platform default, as NT).
        backend: ``"xla" | "triton" | "native" | "auto"`` or ``None`` for the flag in force.

    Returns:
        ``(cov1, nngp, cov2)``; ``cov2`` is ``None`` when ``x2`` is ``None``.
    """
    if not isinstance(x1, (np.ndarray, jax.Array)):
        raise TypeError(f"`x1` must be an array, got {type(x1)}.")
    if x2 is not None and not isinstance(x2, (np.ndarray, jax.Array)):
        raise TypeError(f"`x2` must be an array or None, got {type(x2)}.")
    for name, x in (("x1", x1), ("x2", x2)):
        if x is not None and x.ndim < 2:
            raise ValueError(
                f"`{name}` must be at least 2-D (a batch axis and a channel axis), got shape "
                f"{tuple(x.shape)}."
            )
    ndim = x1.ndim
    if x2 is not None and x2.ndim != ndim:
        raise ValueError(
            f"`x2` must have the same number of axes as `x1`, got shapes {tuple(x1.shape)} "
            f"and {tuple(x2.shape)}."
        )
    for name, ax in (("batch_axis", batch_axis), ("channel_axis", channel_axis)):
        if ax is not None and not -ndim <= ax < ndim:
            raise ValueError(f"`{name}`={ax} is out of range for {ndim}-D inputs.")
    batch_axis %= ndim

    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    x1 = jnp.asarray(x1).astype(dtype)
    x2 = None if x2 is None else jnp.asarray(x2).astype(dtype)

    if channel_axis is None:

        def flatten(x):
            if x is None:
                return None
            return jnp.moveaxis(x, batch_axis, 0).reshape(x.shape[batch_axis], -1)

        x1, x2 = flatten(x1), flatten(x2)
        batch_axis, channel_axis, diagonal_spatial = 0, 1, False
    else:
        channel_axis %= ndim
        if channel_axis == batch_axis:
            raise ValueError(
                f"`batch_axis` and `channel_axis` must differ, both are {batch_axis} (mod {ndim})."
            )

    if x2 is not None:
        rest1 = tuple(d for i, d in enumerate(x1.shape) if i != batch_axis)
        rest2 = tuple(d for i, d in enumerate(x2.shape) if i != batch_axis)
        if rest1 != rest2:
            raise ValueError(
                f"`x1` and `x2` must have the same shape apart from the batch axis {batch_axis}, "
                f"got {tuple(x1.shape)} and {tuple(x2.shape)}."
            )

    return _backend.dispatch("input_cov", backend)(
        x1,
        x2,
        diagonal_batch=bool(diagonal_batch),
        diagonal_spatial=bool(diagonal_spatial),
        batch_axis=batch_axis,
        channel_axis=channel_axis,
        precision=precision,
    )


# ----------------------------------------------------------------------------------------------
# The bilinear form of ``dot_general``.

_LETTERS = string.ascii_letters


def _subscripts(*label_lists: Sequence[int]) -> list[str]:
    """Integer labels -> einsum letter strings (labels compacted so any int works)."""
    used = sorted({lab for labels in label_lists for lab in labels})
    if len(used) > len(_LETTERS):
        raise ValueError(f"Too many distinct axes ({len(used)}) for one contraction.")
    letter = {lab: _LETTERS[i] for i, lab in enumerate(used)}
    return ["".join(letter[lab] for lab in labels) for labels in label_lists]


def _contract(a, a_labels, b, b_labels, keep_labels, precision):
    """``einsum`` of two operands keeping ``keep_labels`` (in the order given); a pairwise dot."""
    sa, sb, so = _subscripts(a_labels, b_labels, keep_labels)
    return jnp.einsum(f"{sa},{sb}->{so}", a, b, precision=precision)


@_backend.register("dot_general", "xla")
@functools.partial(
    jax.jit,
    static_argnames=("mat_labels", "other1_labels", "other2_labels", "out_labels", "precision"),
)
def _bilinear_xla(
    mat: jnp.ndarray,
    other1: jnp.ndarray | None,
    other2: jnp.ndarray | None,
    *,
    mat_labels: tuple[int, ...],
    other1_labels: tuple[int, ...] | None,
    other2_labels: tuple[int, ...] | None,
    out_labels: tuple[int, ...],
    precision=None,
) -> jnp.ndarray:
    """Reference of :func:`bilinear`: ``other1`` into ``mat`` first, then ``other2``."""
    cur, cur_labels = mat, tuple(mat_labels)
    if other1 is not None:
        # Keep every label still needed by `other2` or the output, in first-seen order.
        later = set(out_labels) | set(other2_labels or ())
        keep = []
        for lab in tuple(other1_labels) + cur_labels:
            if lab in later and lab not in keep:
                keep.append(lab)
        cur = _contract(other1, other1_labels, cur, cur_labels, keep, precision)
        cur_labels = tuple(keep)
    if other2 is not None:
        cur = _contract(cur, cur_labels, other2, other2_labels, out_labels, precision)
    else:
        cur = jnp.einsum(
            "{}->{}".format(*_subscripts(cur_labels, out_labels)), cur, precision=precision
        )
    return cur


def bilinear(
    mat: jnp.ndarray,
    other1: jnp.ndarray | None,
    other2: jnp.ndarray | None,
    *,
    mat_labels: Sequence[int],
    other1_labels: Sequence[int] | None,
    other2_labels: Sequence[int] | None,
    out_labels: Sequence[int],
    precision=None,
    backend: str | None = None,
) -> jnp.ndarray:
    """``out = Σ other1 · mat · other2`` over the labels absent from ``out_labels``.

    The covariance ``Cov(y1[p], y2[q]) = Σ_{a,b} O1[p, a] · O2[q, b] · K[a, b]`` of two linear
    images ``y_i = O_i x_i`` of a Gaussian with covariance ``K``, in einsum's integer-label
    form: each array axis carries an integer label, equal labels are the same index (a shared
    label between ``other1`` and ``other2`` is a diagonal, e.g. the batch of a
    ``diagonal_batch`` covariance), and the labels of ``out_labels`` are kept in that order.
    ``other1`` (``other2``) may be ``None``: that side is left as it is (labels that only it
    carried are summed). Evaluated as two pairwise contractions, ``O1`` into ``K`` then ``O2``:
    ``O1 ⊗ O2`` is never formed.

    Args:
        mat: the covariance ``K``, one label per axis in ``mat_labels``.
        other1: left factor ``O1`` (contracts with the first input's axes) or ``None``.
        other2: right factor ``O2`` (contracts with the second input's axes) or ``None``.
        mat_labels, other1_labels, other2_labels, out_labels: integer labels (static).
        precision: ``lax.Precision`` of the contractions; ``None`` is the platform default.
        backend: ``"xla" | "triton" | "native" | "auto"`` or ``None`` for the flag in force.
    """
    mat_labels = tuple(int(i) for i in mat_labels)
    out_labels = tuple(int(i) for i in out_labels)
    labels = {"mat": mat_labels, "out": out_labels}
    for name, arr, lab in (("other1", other1, other1_labels), ("other2", other2, other2_labels)):
        if arr is None:
            labels[name] = None
            continue
        if lab is None or len(lab) != arr.ndim:
            raise ValueError(f"`{name}_labels` must have one label per axis of `{name}`.")
        labels[name] = tuple(int(i) for i in lab)
    if len(mat_labels) != mat.ndim:
        raise ValueError(
            f"`mat_labels` must have one label per axis of `mat`: {mat_labels} vs {mat.shape}."
        )
    present = set(mat_labels) | set(labels["other1"] or ()) | set(labels["other2"] or ())
    missing = [lab for lab in out_labels if lab not in present]
    if missing:
        raise ValueError(f"`out_labels` {missing} appear in no operand.")
    return _backend.dispatch("dot_general", backend)(
        mat,
        other1,
        other2,
        mat_labels=mat_labels,
        other1_labels=labels["other1"],
        other2_labels=labels["other2"],
        out_labels=out_labels,
        precision=precision,
    )


def axis_after_dot(
    axis: int,
    contracting_dims: Sequence[int],
    batch_dims: Sequence[int],
    lhs_ndim: int | None = None,
) -> int:
    """Position of the input axis ``axis`` in the output of ``lax.dot_general``.

    ``lax.dot_general`` orders its output (batch dims, lhs free dims, rhs free dims); ``lhs_ndim``
    is the rank of the constant when it is the lhs (``None`` when the input is the lhs).
    """
    if axis in batch_dims:
        return list(batch_dims).index(axis)
    pos = axis - sum(i < axis for i in contracting_dims) + sum(i > axis for i in batch_dims)
    if lhs_ndim is not None:
        pos += lhs_ndim - len(batch_dims) - len(contracting_dims)
    return pos


def _dot_labels(
    *,
    n_input: int,
    n_other: int,
    batch_axis: int,
    channel_axis: int,
    diagonal_spatial: bool,
    is_reversed: bool,
    is_lhs: bool,
    input_cs: Sequence[int],
    input_bs: Sequence[int],
    other_cs: Sequence[int],
    other_bs: Sequence[int],
):
    """Label builder for :func:`kernel_dot_general`; returns ``labels(batch_ndim)``.

    Input axis ``i`` has labels ``(2i, 2i+1)`` on the (first, second) side and a free axis ``j``
    of the constant ``(2(n_input+j), 2(n_input+j)+1)``; the two coincide where the covariance is
    diagonal (the batch when ``batch_ndim == 1``; spatial and free axes when
    ``diagonal_spatial``). The output follows ``lax.dot_general``'s axis order (batch dims, lhs
    free, rhs free) with the kernel's batch axis moved first and the channel axis dropped.
    """
    pair_of_other = dict(zip(tuple(other_bs) + tuple(other_cs), tuple(input_bs) + tuple(input_cs)))
    spatial_axes = [i for i in range(n_input) if i not in (batch_axis, channel_axis)]
    if is_reversed and not diagonal_spatial:
        spatial_axes = spatial_axes[::-1]
    input_free = [i for i in range(n_input) if i not in tuple(input_cs) + tuple(input_bs)]
    other_free = [j for j in range(n_other) if j not in pair_of_other]
    # Output axes in lax order: ("in", i) for input axes, ("o", j) for free axes of the constant.
    out_axes = [("in", i) for i in input_bs]
    frees = [("o", j) for j in other_free], [("in", i) for i in input_free]
    out_axes += frees[0] + frees[1] if is_lhs else frees[1] + frees[0]
    out_axes = [a for a in out_axes if a != ("in", channel_axis)]
    if ("in", batch_axis) in out_axes:
        out_axes.remove(("in", batch_axis))
        out_axes.insert(0, ("in", batch_axis))

    def labels(batch_ndim: int):
        def pair(kind: str, i: int) -> tuple[int, int]:
            base = 2 * (i if kind == "in" else n_input + i)
            diagonal = (batch_ndim == 1) if (kind, i) == ("in", batch_axis) else diagonal_spatial
            return base, base if diagonal else base + 1

        def both(kind: str, i: int) -> tuple[int, ...]:
            left, right = pair(kind, i)
            return (left,) if left == right else (left, right)

        mat = both("in", batch_axis) + tuple(lab for i in spatial_axes for lab in both("in", i))
        o1 = tuple(
            pair("in", pair_of_other[j])[0] if j in pair_of_other else pair("o", j)[0]
            for j in range(n_other)
        )
        o2 = tuple(
            pair("in", pair_of_other[j])[1] if j in pair_of_other else pair("o", j)[1]
            for j in range(n_other)
        )
        out = tuple(lab for kind, i in out_axes for lab in both(kind, i))
        return mat, o1, o2, out

    return labels


def kernel_dot_general(
    k,
    other1: jnp.ndarray | None,
    other2: jnp.ndarray | None,
    is_lhs: bool,
    dimension_numbers: lax.DotDimensionNumbers,
    *,
    precision=None,
    backend: str | None = None,
):
    """Covariances of ``lax.dot_general`` of the inputs with constants: NT's ``Kernel.dot_general``.

    With ``is_lhs=False`` the layer computes ``y_i = lax.dot_general(x_i, other_i, dn)``, with
    ``is_lhs=True`` ``y_i = lax.dot_general(other_i, x_i, dn)``. Every covariance array
    (``cov1``, ``cov2``, ``nngp``, ``ntk``) becomes ``Σ O1[p, a] O2[q, b] K[a, b]`` through
    :func:`bilinear`; ``cov1`` uses ``(other1, other1)``, ``cov2`` ``(other2, other2)``. The
    output layout is the kernel layout of ``y``: its batch axis first, then its non-channel axes
    in ``lax.dot_general`` order, zipped unless ``diagonal_spatial``; ``is_reversed`` is reset and
    ``batch_axis``/``channel_axis`` move to their place in ``y``. A ``None`` constant leaves its
    side untransformed (both ``None``: ``k`` is returned).

    Raises:
        ValueError: the channel axis is contracted or batched (its size is infinite).
        NotImplementedError: ``other1`` and ``other2`` have different ranks.
    """
    if other1 is None and other2 is None:
        return k
    if other1 is not None and other2 is not None and other1.ndim != other2.ndim:
        raise NotImplementedError(
            f"Factors 1/2 with different dimensionality not implemented, got {other1.ndim} and "
            f"{other2.ndim}."
        )
    (lhs_cs, rhs_cs), (lhs_bs, rhs_bs) = dimension_numbers
    (other_cs, input_cs), (other_bs, input_bs) = (
        ((lhs_cs, rhs_cs), (lhs_bs, rhs_bs)) if is_lhs else ((rhs_cs, lhs_cs), (rhs_bs, lhs_bs))
    )
    n_input = len(k.shape1)
    n_other = (other1 if other1 is not None else other2).ndim

    def mod(axes, n):
        return [int(a) % n for a in axes]

    input_cs, input_bs = mod(input_cs, n_input), mod(input_bs, n_input)
    other_cs, other_bs = mod(other_cs, n_other), mod(other_bs, n_other)
    batch_axis, channel_axis = k.batch_axis % n_input, k.channel_axis % n_input
    if channel_axis in input_cs + input_bs:
        raise ValueError(
            f"Batch or contracting dimension {channel_axis} cannot be equal to `channel_axis` "
            f"(the infinite-width axis); got dimension_numbers={dimension_numbers}."
        )
    labels = _dot_labels(
        n_input=n_input,
        n_other=n_other,
        batch_axis=batch_axis,
        channel_axis=channel_axis,
        diagonal_spatial=k.diagonal_spatial,
        is_reversed=k.is_reversed,
        is_lhs=is_lhs,
        input_cs=input_cs,
        input_bs=input_bs,
        other_cs=other_cs,
        other_bs=other_bs,
    )

    def apply(mat, batch_ndim, o1, o2):
        if mat is None or mat.ndim == 0 or (o1 is None and o2 is None):
            return mat
        mat_l, o1_l, o2_l, out_l = labels(batch_ndim)
        return bilinear(
            mat,
            o1,
            o2,
            mat_labels=mat_l,
            other1_labels=o1_l,
            other2_labels=o2_l,
            out_labels=out_l,
            precision=precision,
            backend=backend,
        )

    cov_ndim = 1 if k.diagonal_batch else 2
    lhs_ndim = n_other if is_lhs else None
    return k.replace(
        cov1=apply(k.cov1, cov_ndim, other1, other1),
        cov2=apply(k.cov2, cov_ndim, other2, other2),
        nngp=apply(k.nngp, 2, other1, other2),
        ntk=apply(k.ntk, 2, other1, other2),
        is_reversed=False,
        batch_axis=axis_after_dot(batch_axis, input_cs, input_bs, lhs_ndim),
        channel_axis=axis_after_dot(channel_axis, input_cs, input_bs, lhs_ndim),
    )
