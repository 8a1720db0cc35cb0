"""The :class:`Kernel` dataclass: NNGP/NTK covariances of a layer's outputs, and their layout.

Same fields, order, defaults and method semantics as Neural Tangents 0.6.5
``neural_tangents._src.utils.kernel.Kernel``; a frozen dataclass registered as a JAX pytree
(arrays are leaves, layout flags and shapes are static metadata), so it passes through ``jit``,
``vmap`` and ``grad``. Imports nothing of ntfast but ``_utils``.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import _utils as utils

__all__ = ["DotGeneralPlan", "EinsumSpec", "Kernel", "dot_general_plan"]


def _static(**kwargs):
    """A field that is pytree metadata (hashable, part of the treedef), not a leaf."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """Infinite-width NNGP and NTK of a layer's outputs, for two batches of inputs ``x1``, ``x2``.

    Notation: ``N1``/``N2`` batch sizes, ``S1, S2, ...`` the spatial sizes of the activations
    (all axes but ``batch_axis`` and ``channel_axis``, in order; e.g. ``H, W`` for ``NHWC``).
    The channel axis is infinite and never stored. Array shapes per layout:

    ::

        array       diagonal_spatial=False            diagonal_spatial=True
        nngp, ntk   (N1, N2, S1, S1, S2, S2, ...)     (N1, N2, S1, S2, ...)
        cov1        (N1, [N1,] S1, S1, S2, S2, ...)   (N1, [N1,] S1, S2, ...)
        cov2        (N2, [N2,] S1, S1, S2, S2, ...)   (N2, [N2,] S1, S2, ...)

    where the bracketed batch axis is present iff ``diagonal_batch`` is False. With
    ``is_reversed`` (full spatial only) the spatial pairs are stored last-to-first:
    ``(N1, N2, ..., S2, S2, S1, S1)``.

    Attributes:
      nngp: ``E[f(x1)[n1, ..., s, ...] f(x2)[n2, ..., s', ...]]`` per channel (the NNGP), with
        ``s, s'`` zipped pairs (full spatial) or ``s == s'`` only (diagonal spatial).
      ntk: the neural tangent kernel, same shape as ``nngp``; None when not computed, or a
        0-d array for a constant.
      cov1: covariance of the first batch with itself: the ``n1 == n1'`` diagonal only
        (``diagonal_batch``) or the full ``N1 × N1`` one.
      cov2: same for the second batch; None when ``x2`` is None (then ``x2 = x1``).
      x1_is_x2: boolean (Python or 0-d array): whether ``x1`` and ``x2`` are the same inputs.
      is_gaussian: whether the outputs (per channel) are jointly Gaussian with covariance
        ``nngp`` given the inputs: true after a dense/conv layer, false after a nonlinearity.
      is_reversed: spatial pairs stored in reverse order (saves transposes in conv stacks;
        meaningful only with ``diagonal_spatial=False``).
      is_input: this is the input layer's kernel (dropout is not applied to inputs).
      diagonal_batch: ``cov1``/``cov2`` keep only the per-sample variances ``(N, ...)`` instead
        of ``(N, N, ...)``.
      diagonal_spatial: all arrays keep only the ``s == s'`` location diagonal.
      shape1: shape of the activations ``f(x1)`` (channel axis included, with the finite size
        of the inputs or of the last finite layer).
      shape2: shape of ``f(x2)``.
      batch_axis: batch axis of the activations.
      channel_axis: channel axis of the activations (the one taken to infinity).
      mask1: optional boolean array broadcastable to ``shape1`` with the same ndim; True marks
        a masked (absent) entry. Size 1 along the channel axis.
      mask2: same for the second batch.
    """

    nngp: jax.Array
    ntk: jax.Array | None

    cov1: jax.Array
    cov2: jax.Array | None
    x1_is_x2: jax.Array

    is_gaussian: bool = _static()
    is_reversed: bool = _static()
    is_input: bool = _static()

    diagonal_batch: bool = _static()
    diagonal_spatial: bool = _static()

    shape1: tuple[int, ...] | None = _static()
    shape2: tuple[int, ...] | None = _static()

    batch_axis: int = _static()
    channel_axis: int = _static()

    mask1: jax.Array | None = None
    mask2: jax.Array | None = None

    # ------------------------------------------------------------------------------------------
    # Dataclass conveniences (shallow: arrays are returned as they are, never copied).

    def replace(self, **changes: Any) -> Kernel:
        """A copy with the given fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def asdict(self) -> dict[str, Any]:
        """``{field name: value}`` in field order, not recursing into values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def astuple(self) -> tuple[Any, ...]:
        """Field values in field order, not recursing into values."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @property
    def _cov_batch_ndim(self) -> int:
        """Number of leading batch axes of ``cov1``/``cov2``."""
        return 1 if self.diagonal_batch else 2

    # ------------------------------------------------------------------------------------------
    # Layout operations.

    def slice(self, n1_slice: slice, n2_slice: slice) -> Kernel:
        """Sub-kernel of the samples ``x1[n1_slice]`` and ``x2[n2_slice]``.

        Indexes the leading batch axes (a missing ``cov2`` is read from ``cov1``, since then
        ``x2 = x1``); ``shape1/2`` get the new batch sizes in axis 0.
        """
        cov1 = self.cov1[n1_slice]
        cov2 = (self.cov1 if self.cov2 is None else self.cov2)[n2_slice]
        ntk = self.ntk
        if ntk is not None and ntk.ndim > 0:
            ntk = ntk[n1_slice, n2_slice]
        return self.replace(
            cov1=cov1,
            nngp=self.nngp[n1_slice, n2_slice],
            cov2=cov2,
            ntk=ntk,
            shape1=(cov1.shape[0],) + tuple(self.shape1[1:]),
            shape2=(cov2.shape[0],) + tuple(self.shape2[1:]),
            mask1=None if self.mask1 is None else self.mask1[n1_slice],
            mask2=None if self.mask2 is None else self.mask2[n2_slice],
        )

    def reverse(self) -> Kernel:
        """Reverses the order of spatial axis pairs in every covariance and flips ``is_reversed``.

        ``nngp`` of shape ``(N1, N2, H, H, W, W, D, D)`` becomes ``(N1, N2, D, D, W, W, H, H)``.
        """
        b = self._cov_batch_ndim
        return self.replace(
            cov1=utils.reverse_zipped(self.cov1, b),
            nngp=utils.reverse_zipped(self.nngp, 2),
            cov2=utils.reverse_zipped(self.cov2, b),
            ntk=utils.reverse_zipped(self.ntk, 2),
            is_reversed=not self.is_reversed,
        )

    def transpose(self, axes: Sequence[int] | None = None) -> Kernel:
        """Permutes the spatial axes like ``numpy.transpose`` with ``axes`` over spatial dims only.

        Batch axes stay leading; each zipped pair moves as a unit. ``(N, X, X, Y, Y)`` with
        ``axes=(1, 0)`` becomes ``(N, Y, Y, X, X)``. ``axes=None`` keeps the identity order (NT's
        behaviour: it does not reverse). Metadata (``shape1``, ...) is left unchanged, as in NT.
        """
        if axes is None:
            axes = tuple(range(len(self.shape1) - 2))

        def permute(mat, batch_ndim):
            # A 0-d (constant) ntk has no axes to permute (NT raises on it).
            if mat is None or mat.ndim == 0:
                return mat
            if self.diagonal_spatial:
                spatial = [batch_ndim + a for a in axes]
            else:
                spatial = [batch_ndim + 2 * a + j for a in axes for j in (0, 1)]
            return jnp.transpose(mat, list(range(batch_ndim)) + spatial)

        b = self._cov_batch_ndim
        return self.replace(
            cov1=permute(self.cov1, b),
            nngp=permute(self.nngp, 2),
            cov2=permute(self.cov2, b),
            ntk=permute(self.ntk, 2),
        )

    # ------------------------------------------------------------------------------------------
    # Masking.

    def mask(self, mask1: jax.Array | None, mask2: jax.Array | None) -> Kernel:
        """Zeroes covariance entries that involve a masked input position; stores the masks.

        An entry of ``nngp``/``ntk`` is zeroed where ``mask1`` or ``mask2`` is True at either of its
        two positions; ``cov1``/``cov2`` likewise with ``mask1``/``mask2`` on both sides.
        """
        mask11, mask12, mask22 = self._get_mask_prods(mask1, mask2)
        return self.replace(
            cov1=utils.mask(self.cov1, mask11),
            nngp=utils.mask(self.nngp, mask12),
            cov2=utils.mask(self.cov2, mask22),
            ntk=utils.mask(self.ntk, mask12),
            mask1=mask1,
            mask2=mask2,
        )

    def _mask_to_kernel_layout(self, m: jax.Array) -> jax.Array:
        """Activation-layout mask ``(..N.., ..S.., 1)`` -> ``(N, S1, S2, ...)`` in kernel order."""
        if m.shape[self.channel_axis] != 1:
            raise NotImplementedError(
                f"Different channel-wise masks are not supported for infinite-width layers "
                f"(got `mask.shape == {m.shape}` with `channel_axis={self.channel_axis}`); the "
                f"mask must have size 1 along the channel axis."
            )
        m = jnp.moveaxis(m, (self.batch_axis, self.channel_axis), (0, -1))[..., 0]
        if self.is_reversed:
            m = jnp.transpose(m, (0, *range(m.ndim - 1, 0, -1)))
        return m

    def _get_mask_prods(
        self, mask1: jax.Array | None, mask2: jax.Array | None
    ) -> tuple[jax.Array | None, jax.Array | None, jax.Array | None]:
        """Masks in covariance layout: ``(mask1 ⊗ mask1, mask1 ⊗ mask2, mask2 ⊗ mask2)``.

        ``a ⊗ b`` is the zipped logical-or outer product over the axes the covariance keeps in
        pairs: for ``nngp`` the batch axes and, unless ``diagonal_spatial``, the spatial axes; for
        ``cov1``/``cov2`` the batch axes only if not ``diagonal_batch``. Each is None if both
        masks are None. A None ``mask2`` stands for ``mask1`` (``x2 = x1``): ``mask22 = mask11``
        and ``mask12 = mask1 ⊗ mask1``.
        """

        def outer(m1, m2, batch_ndim):
            if m1 is None and m2 is None:
                return None
            start = 2 - batch_ndim
            if m1 is None:
                # NT fails here; we read a missing ``mask1`` as "x1 fully visible": the product
                # is ``mask2`` alone, laid on the right-hand side.
                m2 = self._mask_to_kernel_layout(m2)
                end = 1 if self.diagonal_spatial else m2.ndim
                return utils.interleave_ones(m2, start, end, False)
            m1 = self._mask_to_kernel_layout(m1)
            # A missing ``mask2`` means ``x2 = x1``: its mask is ``mask1`` (outer_prod's default).
            m2 = None if m2 is None else self._mask_to_kernel_layout(m2)
            end = 1 if self.diagonal_spatial else m1.ndim
            return utils.outer_prod(m1, m2, start, end, operator.or_)

        b = self._cov_batch_ndim
        mask11 = outer(mask1, mask1, b)
        mask22 = mask11 if mask2 is None else outer(mask2, mask2, b)
        mask12 = outer(mask1, mask2, 2)
        return mask11, mask12, mask22

    # ------------------------------------------------------------------------------------------
    # Linear maps.

    def dot_general(
        self,
        other1: jax.Array | None,
        other2: jax.Array | None,
        is_lhs: bool,
        dimension_numbers: jax.lax.DotDimensionNumbers,
    ) -> Kernel:
        """Covariances of ``y = lax.dot_general(x, O)`` (or ``dot_general(O, x)`` if ``is_lhs``).

        With ``y1`` built from ``x1`` and ``other1``, ``y2`` from ``x2`` and ``other2``, the
        covariance of a bilinear map of Gaussian inputs is

            ``Cov(y1[p], y2[q]) = Σ_{a,b} other1[p, a] · other2[q, b] · Cov(x1[a], x2[b])``

        where ``a``/``b`` run over the contracted axes and dot-batch axes are shared indices.
        ``cov1`` uses ``other1`` on both sides, ``cov2`` ``other2``. The result is not reversed;
        ``batch_axis``/``channel_axis`` move to their place in ``y``
        (:func:`ntfast._utils.axis_after_dot`). A diagonal (``diagonal_spatial``) axis stays
        diagonal: ``other1`` and ``other2`` then share the index of every free axis.

        Pure-jnp reference (``jnp.einsum``); ``ntfast.ops.dot_general`` is the dispatching op.

        Raises:
          ValueError: the channel axis is contracted or batched.
          NotImplementedError: ``other1`` and ``other2`` differ in ndim.
        """
        if other1 is None and other2 is None:
            return self
        n_other = (other2 if other1 is None else other1).ndim
        if other1 is not None and other2 is not None and other1.ndim != other2.ndim:
            raise NotImplementedError(
                f"Factors 1/2 with different dimensionality not implemented, got "
                f"{other1.ndim} and {other2.ndim}."
            )
        plan = dot_general_plan(self, n_other, is_lhs, dimension_numbers)

        def apply(spec, mat, left, right):
            if mat is None or mat.ndim == 0 or (left is None and right is None):
                return mat
            operands = [x for x in (left, mat, right) if x is not None]
            terms = [t for t, x in zip(spec.inputs, (left, mat, right)) if x is not None]
            return jnp.einsum(",".join(terms) + "->" + spec.output, *operands, optimize=True)

        return self.replace(
            cov1=apply(plan.cov1, self.cov1, other1, other1),
            nngp=apply(plan.nngp, self.nngp, other1, other2),
            cov2=apply(plan.cov2, self.cov2, other2, other2),
            ntk=apply(plan.nngp, self.ntk, other1, other2),
            is_reversed=False,
            batch_axis=plan.batch_axis,
            channel_axis=plan.channel_axis,
        )

    # ------------------------------------------------------------------------------------------
    # Affine maps of the outputs: ``k * a`` is the kernel of ``a · f``, ``k + b`` of ``f + b``
    # with ``b`` an independent N(0, b²) bias (so ``k - b`` equals ``k + b``, and ``-k`` is ``k``).

    def __mul__(self, other: float) -> Kernel:
        var = other**2
        return self.replace(
            cov1=var * self.cov1,
            nngp=var * self.nngp,
            cov2=None if self.cov2 is None else var * self.cov2,
            ntk=None if self.ntk is None else var * self.ntk,
        )

    __rmul__ = __mul__

    def __add__(self, other: float) -> Kernel:
        # A bias has no trainable weights feeding earlier layers: the NTK is unchanged.
        var = other**2
        return self.replace(
            cov1=var + self.cov1,
            nngp=var + self.nngp,
            cov2=None if self.cov2 is None else var + self.cov2,
        )

    __sub__ = __add__

    def __truediv__(self, other: float) -> Kernel:
        return self.__mul__(1.0 / other)

    def __neg__(self) -> Kernel:
        return self

    __pos__ = __neg__

    # ------------------------------------------------------------------------------------------
    # Indexing.

    def __getitem__(self, idx: utils.SliceType) -> Kernel:
        """Kernel of ``f(x)[idx]``: ``idx`` indexes the activations (``shape1`` axes).

        The batch axis may be sliced but not integer-indexed (the kernel always keeps a batch
        axis); the channel axis may not be indexed at all (NotImplementedError for both).
        Spatial indices apply to both members of each zipped pair; integer indices drop axes, and
        ``batch_axis``/``channel_axis`` shift accordingly.
        """
        idx = utils.canonicalize_idx(idx, len(self.shape1))
        batch_idx = idx[self.batch_axis]
        channel_idx = idx[self.channel_axis]
        if channel_idx != slice(None):
            raise NotImplementedError(
                f"Indexing into the (infinite) channel axis {self.channel_axis} not supported "
                f"(got index {channel_idx!r})."
            )
        if isinstance(batch_idx, int):
            raise NotImplementedError(
                f"Indexing an axis with an integer index (e.g. `0` vs `(0,)`) removes the "
                f"respective axis. The kernel must keep its batch axis ({self.batch_axis}), so "
                f"it cannot be indexed with integers (use a tuple or a `slice` instead)."
            )

        spatial = tuple(
            s for i, s in enumerate(idx) if i not in (self.batch_axis, self.channel_axis)
        )
        if self.is_reversed:
            spatial = spatial[::-1]
        if not self.diagonal_spatial:
            spatial = utils.double_tuple(spatial)
        pair_idx = (batch_idx, batch_idx) + spatial
        cov_idx = (batch_idx,) * self._cov_batch_ndim + spatial

        ntk = self.ntk
        if ntk is not None and ntk.ndim > 0:
            ntk = ntk[pair_idx]

        def n_ints_before(axis: int) -> int:
            return sum(isinstance(s, int) for s in idx[:axis])

        return self.replace(
            nngp=self.nngp[pair_idx],
            ntk=ntk,
            cov1=self.cov1[cov_idx],
            cov2=None if self.cov2 is None else self.cov2[cov_idx],
            channel_axis=self.channel_axis - n_ints_before(self.channel_axis),
            batch_axis=self.batch_axis - n_ints_before(self.batch_axis),
            shape1=utils.slice_shape(self.shape1, idx),
            shape2=utils.slice_shape(self.shape2, idx),
            mask1=None if self.mask1 is None else self.mask1[idx],
            mask2=None if self.mask2 is None else self.mask2[idx],
        )


_DATA_FIELDS = ("nngp", "ntk", "cov1", "cov2", "x1_is_x2", "mask1", "mask2")
jax.tree_util.register_dataclass(
    Kernel,
    data_fields=list(_DATA_FIELDS),
    meta_fields=[f.name for f in dataclasses.fields(Kernel) if f.name not in _DATA_FIELDS],
)


# ----------------------------------------------------------------------------------------------
# The einsum plan of `Kernel.dot_general`, shared with `ntfast.ops.dot_general` backends.


class EinsumSpec(NamedTuple):
    """Einsum terms for ``(left factor, covariance, right factor) -> output``."""

    inputs: tuple[str, str, str]
    output: str


class DotGeneralPlan(NamedTuple):
    """Everything static about ``Kernel.dot_general``: einsum specs and the new axes."""

    nngp: EinsumSpec  # also used for ntk
    cov1: EinsumSpec
    cov2: EinsumSpec
    batch_axis: int
    channel_axis: int


def dot_general_plan(
    k: Kernel, n_other: int, is_lhs: bool, dimension_numbers: jax.lax.DotDimensionNumbers
) -> DotGeneralPlan:
    """Einsum specs computing :meth:`Kernel.dot_general` for each covariance array of ``k``.

    Every array axis gets a symbolic label: an input axis ``i`` of the activations has a *left*
    label (its index in ``x1``) and a *right* one (in ``x2``), equal when the kernel stores it
    diagonally (``diagonal_spatial`` for spatial axes, ``diagonal_batch`` for ``cov``'s batch). A
    factor axis paired by the dimension numbers with input axis ``i`` takes ``i``'s label (left
    label in ``other1``, right label in ``other2``); a free factor axis ``j`` gets fresh labels
    ``p_j`` / ``q_j`` (one shared label if ``diagonal_spatial``). The output lists the pairs of
    ``y``'s non-channel axes in ``y``'s order, batch axis first.
    """
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
    if is_lhs:
        other_c, input_c, other_b, input_b = lhs_c, rhs_c, lhs_b, rhs_b
    else:
        input_c, other_c, input_b, other_b = lhs_c, rhs_c, lhs_b, rhs_b
    n_input = len(k.shape1)
    input_c, input_b = utils.mod(input_c, n_input), utils.mod(input_b, n_input)
    other_c, other_b = utils.mod(other_c, n_other), utils.mod(other_b, n_other)
    paired = dict(zip(other_b + other_c, input_b + input_c))  # factor axis -> input axis

    for i in input_b + input_c:
        if i == k.channel_axis:
            raise ValueError(
                f"Batch or contracting dimension {i} cannot be equal to `channel_axis` "
                f"({k.channel_axis}): the channel axis is infinite."
            )

    spatial_axes = [i for i in range(n_input) if i not in (k.batch_axis, k.channel_axis)]

    def label(i: int, batch_ndim: int, side: str) -> str:
        """Label of input axis ``i`` on ``side`` ('l' or 'r') of an array with ``batch_ndim``."""
        if i == k.batch_axis:
            return "n_r" if (side == "r" and batch_ndim == 2) else "n_l"
        s = spatial_axes.index(i)
        return f"s{s}_l" if (k.diagonal_spatial or side == "l") else f"s{s}_r"

    def free_label(j: int, side: str) -> str:
        return f"p{j}" if (k.diagonal_spatial or side == "l") else f"q{j}"

    def pair(labels: list[str]) -> list[str]:
        """Drops the right copy when it equals the left (diagonal axes)."""
        return labels[:1] if labels[0] == labels[1] else labels

    def spec(batch_ndim: int) -> EinsumSpec:
        # Covariance axes in storage order: batch, then spatial pairs (possibly reversed).
        stored = [label(k.batch_axis, batch_ndim, "l")]
        if batch_ndim == 2:
            stored.append(label(k.batch_axis, batch_ndim, "r"))
        for i in spatial_axes:
            stored += pair([label(i, batch_ndim, "l"), label(i, batch_ndim, "r")])
        if k.is_reversed:
            reordered = utils.reverse_zipped(stored, batch_ndim)
            if len(reordered) != len(stored):
                raise ValueError(
                    f"`is_reversed=True` with `diagonal_spatial=True` and an odd number of spatial "
                    f"axes ({len(spatial_axes)}) has no pairwise reversal."
                )
            stored = reordered

        def factor(side: str) -> list[str]:
            return [
                label(paired[j], batch_ndim, side) if j in paired else free_label(j, side)
                for j in range(n_other)
            ]

        # Output: the input's dot-batch axes, then its free non-channel axes, batch axis first.
        kept = input_b + [
            i for i in range(n_input) if i not in input_c + input_b + [k.channel_axis]
        ]
        if k.batch_axis in kept:
            kept.remove(k.batch_axis)
            kept.insert(0, k.batch_axis)
        kept_labels = []
        for i in kept:
            kept_labels += pair([label(i, batch_ndim, "l"), label(i, batch_ndim, "r")])
        other_free = []
        for j in range(n_other):
            if j not in paired:
                other_free += pair([free_label(j, "l"), free_label(j, "r")])

        if is_lhs:
            # y = [dot-batch axes, lhs (factor) free axes, rhs (input) free axes].
            per_axis = 1 if k.diagonal_spatial else 2
            n_batch_spatial = len(input_b) - (k.batch_axis in input_b)
            n_lead = (0 if k.batch_axis in input_c else batch_ndim) + per_axis * n_batch_spatial
        else:
            n_lead = len(kept_labels)
        out = kept_labels[:n_lead] + other_free + kept_labels[n_lead:]

        symbols = {}
        for name in stored + factor("l") + factor("r") + out:
            symbols.setdefault(name, _einsum_symbol(len(symbols)))

        def term(names):
            return "".join(symbols[n] for n in names)

        return EinsumSpec(
            inputs=(term(factor("l")), term(stored), term(factor("r"))), output=term(out)
        )

    lhs_ndim = n_other if is_lhs else None
    cov_spec = spec(k._cov_batch_ndim)
    return DotGeneralPlan(
        nngp=spec(2),
        cov1=cov_spec,
        cov2=cov_spec,
        batch_axis=utils.axis_after_dot(k.batch_axis, input_c, input_b, lhs_ndim),
        channel_axis=utils.axis_after_dot(k.channel_axis, input_c, input_b, lhs_ndim),
    )


_SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _einsum_symbol(i: int) -> str:
    if i >= len(_SYMBOLS):
        raise ValueError(f"dot_general needs more than {len(_SYMBOLS)} einsum labels.")
    return _SYMBOLS[i]
