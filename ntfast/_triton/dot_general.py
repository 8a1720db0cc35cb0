"""Triton launchers of ``input_cov`` and ``dot_general`` (kernels in kernels/triton/dot_general.py).

Both ops are contractions. Most launches are one strided, batched matrix product of
``cov_matmul_kernel``, ``out[g2, g1, i, j] = Σ_k A[g2, g1, i, k] · B[g2, g1, j, k] / D``, with one
stride per index of each operand (stride 0 broadcasts) and output rows/columns placed through small
int32 offset tables, so NT's zipped layouts are written directly (no transpose after the product).
The diagonal-spatial input covariances, which are no large products, have their own kernels.

``input_cov`` (custom calls ``ntfast_input_cov_<variant>``), inputs moved to ``(N, *S, C)``,
``P = Π S`` pixels, ``V`` a folded ``vmap`` axis (``g2``):

==================  ==========================  ==================================================
variant             layout                      launch
==================  ==========================  ==================================================
``full``            nngp, full-batch cov        rows ``(n, s)``, cols ``(m, t)``, ``K = C``; rows
                    ``(N1, N2, H, H', W, W')``  and cols split ``(n | s)`` into a stride and a
                                                table of zipped pixel offsets
``diag_spatial``    ``(N1, N2, *S)``            ``pixel_cov_kernel``: ``(n, m, s)`` boxes, ``C``
                                                FMAs each (``P < 16``: ``g1 = s``, ``P``
                                                products ``(N1, C) @ (C, N2)``)
``diag_batch``      ``(N, H, H', W, W')``       ``g1 = n``: ``N`` products ``(P, C) @ (C, P)``
``diag``            ``(N, *S)``                 ``sq_norm_kernel``: ``Σ_c x² / C`` per row
==================  ==========================  ==================================================

``dot_general`` (the bilinear form ``Σ_{a,b} O1[p, a] · O2[q, b] · K[a, b]`` of
``ntfast.ops.dot_general.bilinear``, in einsum's integer-label form): two pairwise contractions,
``ntfast_dot_general_left`` (``O1`` into ``K``) then ``ntfast_dot_general_right`` (``O2`` into
that), planned by :func:`plan_contraction`. A label is a batch index (``g1``) if both operands and
the output have it, contracted (``k``) if both operands but not the output have it, else a free
row (``i``, first operand) or column (``j``, second operand) index; labels only one operand has
and the output lacks are summed beforehand. The intermediate is laid out so that the second
product reads it as a plain ``(rows, K)`` matrix, and the leading free axes of the big operand
(``K``'s batch axes) become the broadcast batch ``g2``, so a covariance array is read in place,
never transposed. An operand whose index groups are not contiguous runs of its axes is transposed
first (in JAX; the small constants ``O``), an output that cannot be addressed (batch labels apart,
or > 2³¹ entries needing a table) is written in product order and transposed after.

f32 products use ``input_precision="ieee"`` (true f32: XLA's GPU default would be tf32) unless the
caller passed ``lax.Precision.DEFAULT`` (``"tf32"``, XLA's meaning on GPUs); ``HIGH`` (bf16×3 in
XLA) gets ``"ieee"``, never less accurate than asked. f64 products accumulate in f64.

Derivatives and ``vmap``: every launch is wrapped by :func:`runtime.differentiable` (VJP of the
XLA reference); ``vmap`` folds the mapped axis into ``g2`` (``input_cov``) or adds it as one more
batch label (``dot_general``). Requests the kernels cannot serve (dtypes other than f32/f64,
unknown precisions, repeated labels in one operand, int32 grid/table overflow) raise
:class:`ntfast.backend.BackendError`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntfast import backend as _backend
from ntfast.backend import BackendError
from ntfast.ops import layout as _layout

from . import runtime

# Kernel modules (the launch name must start with ``ntfast_<module>``): kernels/triton/input_cov.py
# re-exports the kernels of kernels/triton/dot_general.py under the op's name.
_INPUT_COV = "input_cov"
_DOT_GENERAL = "dot_general"
MATMUL = "cov_matmul_kernel"
SQ_NORM = "sq_norm_kernel"
PIXEL_COV = "pixel_cov_kernel"

CALL_FULL = "ntfast_input_cov_full"
CALL_DIAG_SPATIAL = "ntfast_input_cov_diag_spatial"
CALL_DIAG_BATCH = "ntfast_input_cov_diag_batch"
CALL_DIAG = "ntfast_input_cov_diag"
CALL_LEFT = "ntfast_dot_general_left"
CALL_RIGHT = "ntfast_dot_general_right"

# Tiles: BLOCK x BLOCK outputs per program; BLOCK_K 16 for short contractions (C = 3 image
# channels, most label contractions), else 32. tl.dot needs every tile dimension >= 16.
BLOCK = 64
BLOCK_KS = (16, 32)
SQ_BLOCK_R, SQ_BLOCK_K = 128, 16
# pixel_cov_kernel boxes: 8 x 8 image pairs x 64 pixels; below PIXEL_MIN pixels the box would be
# mostly empty and the matmul kernel serves instead.
PIXEL_BLOCK_N, PIXEL_BLOCK_S, PIXEL_MIN = 8, 64, 16
NUM_WARPS = 4
NUM_STAGES = 2
_DTYPES = {np.dtype(np.float32): "fp32", np.dtype(np.float64): "fp64"}
_INT32_MAX = 2**31 - 1
_MATMUL_INTS = (
    "M", "N", "K", "G1", "A_SG2", "A_SG1", "A_SM", "A_SK", "B_SG2", "B_SG1", "B_SN", "B_SK",
    "O_SG2", "O_SG1", "O_SM", "O_SN", "ROW_LO", "COL_LO", "DIVISOR",
)  # fmt: skip
_SQ_INTS = ("R", "K", "X_SR", "X_SK", "DIVISOR")
_PIXEL_INTS = ("N1", "N2", "P", "C", "A_SG", "B_SG", "DIVISOR")


# ------------------------------------------------------------------------------------------------
# Shared pieces


def _check_dtype(op: str, *arrays) -> np.dtype:
    """The dtype the reference computes in (JAX's promotion of the operands): f32 or f64 only."""
    dtype = np.dtype(jnp.result_type(*(a for a in arrays if a is not None)))
    if dtype not in _DTYPES:
        raise BackendError(
            f"backend 'triton' op {op!r} supports float32 or float64 arrays, got "
            f"{sorted({str(a.dtype) for a in arrays if a is not None})} (computing in {dtype})."
        )
    return dtype


def _cast(dtype, *arrays):
    return tuple(None if a is None else jnp.asarray(a).astype(dtype) for a in arrays)


_PRECISION_RANK = {
    lax.Precision.DEFAULT: 0,
    lax.Precision.HIGH: 1,
    lax.Precision.HIGHEST: 2,
}
_F32_PRECISION = ("tf32", "ieee", "ieee")


def input_precision(op: str, precision, dtype) -> str:
    """``tl.dot``'s ``input_precision`` for a ``lax`` ``precision`` argument and operand dtype.

    ``None`` (NT's default), ``HIGH`` and ``HIGHEST`` give ``"ieee"`` (true f32 products);
    ``DEFAULT`` gives ``"tf32"``, what XLA uses for it on NVIDIA GPUs; a pair takes the higher of
    the two. f64 products are always f64 (``"ieee"``).
    """
    items = precision if isinstance(precision, (tuple, list)) else (precision,)
    rank = 0 if items else 2
    for p in items:
        if p is None:
            rank = max(rank, 2)
            continue
        try:
            rank = max(rank, _PRECISION_RANK[lax.Precision(p)])
        except (ValueError, KeyError, TypeError):
            raise BackendError(
                f"backend 'triton' op {op!r} supports precision None or a lax.Precision, got "
                f"{precision!r}."
            ) from None
    return "ieee" if np.dtype(dtype) == np.float64 else _F32_PRECISION[rank]


def _block_k(k: int) -> int:
    return BLOCK_KS[0] if k <= BLOCK_KS[0] else BLOCK_KS[1]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_NO_TABLE = np.zeros(1, np.int64)


@dataclasses.dataclass(frozen=True)
class _Matmul:
    """Index sizes and strides of one ``cov_matmul_kernel`` launch (elements, not bytes)."""

    m: int
    n: int
    k: int
    g1: int = 1
    g2: int = 1
    a: tuple[int, int, int, int] = (0, 0, 0, 0)  # strides of A along (g2, g1, i, k)
    b: tuple[int, int, int, int] = (0, 0, 0, 0)  # strides of B along (g2, g1, j, k)
    o: tuple[int, int, int, int] = (0, 0, 0, 0)  # out (g2, g1, i // ROW_LO, j // COL_LO)
    # (ROW_LO,) / (COL_LO,) out offsets of i % ROW_LO / j % COL_LO
    row_tab: np.ndarray = dataclasses.field(default_factory=lambda: _NO_TABLE)
    col_tab: np.ndarray = dataclasses.field(default_factory=lambda: _NO_TABLE)
    divisor: int = 1


def _run_matmul(
    kernels: str, name: str, a, b, plan: _Matmul, out_shape, precision: str
) -> jax.Array:
    """Launches ``cov_matmul_kernel``; ``out_shape`` is the output's (final) shape."""
    out = jax.ShapeDtypeStruct(tuple(out_shape), a.dtype)
    if plan.m * plan.n * plan.g1 * plan.g2 == 0:
        return jnp.zeros(out.shape, out.dtype)
    tiles = _cdiv(plan.m, BLOCK) * _cdiv(plan.n, BLOCK) * plan.g1 * plan.g2
    if tiles > _INT32_MAX or max(plan.row_tab.max(), plan.col_tab.max()) > _INT32_MAX:
        raise BackendError(
            f"backend 'triton' launch {name!r}: {tiles} tiles or the output offsets exceed the "
            "kernel's int32 grid/tables; split the batch or use backend='xla'."
        )
    scalars = dict(
        zip(
            _MATMUL_INTS,
            (plan.m, plan.n, plan.k, plan.g1, *plan.a, *plan.b)
            + (plan.o[0], plan.o[1], plan.o[2], plan.o[3])
            + (len(plan.row_tab), len(plan.col_tab), plan.divisor),
        )
    )
    return runtime.launch(
        kernels,
        MATMUL,
        a,
        b,
        np.asarray(plan.row_tab, np.int32),
        np.asarray(plan.col_tab, np.int32),
        out_shape=out,
        grid=(tiles,),
        name=name,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
        BLOCK_M=BLOCK,
        BLOCK_N=BLOCK,
        BLOCK_K=_block_k(plan.k),
        INPUT_PRECISION=precision,
        **scalars,
    )


def _row_major(shape: Sequence[int]) -> list[int]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return strides[::-1]


# ------------------------------------------------------------------------------------------------
# input_cov


def _zipped_offsets(spatial: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Offsets in the zipped ``(S0, S0', S1, S1', ...)`` block of pixel ``s`` as the first and as
    the second member of each pair, for ``s`` in row-major order over ``spatial``."""
    if not spatial:
        return _NO_TABLE, _NO_TABLE
    zs = np.asarray(_row_major(tuple(d for d in spatial for _ in (0, 1))), np.int64)
    idx = np.indices(spatial, dtype=np.int64).reshape(len(spatial), -1)
    return zs[0::2] @ idx, zs[1::2] @ idx


def _check_pixels(p: int) -> None:
    if p * p > _INT32_MAX:
        raise BackendError(
            f"backend 'triton' op 'input_cov': {p} pixels per image; one image pair's "
            f"{p * p} covariance entries exceed the kernel's int32 offset tables. Use "
            "backend='xla' or diagonal_spatial=True."
        )


def _pair_cov_impl(x1, x2, *, diagonal_spatial: bool, precision) -> jax.Array:
    """``nngp``/full-batch covariance of ``x1: (V1, N1, *S, C)`` and ``x2: (V2, N2, *S, C)``,
    ``V1, V2 ∈ {1, V}`` (1 broadcasts): ``(V, N1, N2, *S)`` or ``(V, N1, N2, zipped S)``."""
    dtype = _check_dtype("input_cov", x1, x2)
    ip = input_precision("input_cov", precision, dtype)
    (v1, n1), (v2, n2) = x1.shape[:2], x2.shape[:2]
    spatial, c = tuple(x1.shape[2:-1]), x1.shape[-1]
    v, p = max(v1, v2), math.prod(spatial)
    a_sv = n1 * p * c if v1 > 1 else 0
    b_sv = n2 * p * c if v2 > 1 else 0
    if diagonal_spatial and p >= PIXEL_MIN:
        out = jax.ShapeDtypeStruct((v, n1, n2, *spatial), dtype)
        tiles = v * _cdiv(n1, PIXEL_BLOCK_N) * _cdiv(n2, PIXEL_BLOCK_N) * _cdiv(p, PIXEL_BLOCK_S)
        if tiles == 0:
            return jnp.zeros(out.shape, out.dtype)
        if tiles > _INT32_MAX or n2 * p > _INT32_MAX:
            raise BackendError(
                f"backend 'triton' launch {CALL_DIAG_SPATIAL!r}: the grid or one image's "
                "covariances exceed int32; split the batch or use backend='xla'."
            )
        return runtime.launch(
            _INPUT_COV,
            PIXEL_COV,
            x1,
            x2,
            out_shape=out,
            grid=(tiles,),
            name=CALL_DIAG_SPATIAL,
            num_warps=NUM_WARPS,
            N1=n1,
            N2=n2,
            P=p,
            C=c,
            A_SG=a_sv,
            B_SG=b_sv,
            DIVISOR=c,
            BLOCK_N=PIXEL_BLOCK_N,
            BLOCK_S=PIXEL_BLOCK_S,
        )
    if diagonal_spatial:
        # Few pixels (P = 1: inputs without spatial axes): P plain products (N1, C) @ (C, N2).
        plan = _Matmul(
            m=n1, n=n2, k=c, g1=p, g2=v,
            a=(a_sv, c, p * c, 1), b=(b_sv, c, p * c, 1),
            o=(n1 * n2 * p, 1, n2 * p, p), divisor=c,
        )  # fmt: skip
        return _run_matmul(_INPUT_COV, CALL_DIAG_SPATIAL, x1, x2, plan, (v, n1, n2, *spatial), ip)
    _check_pixels(p)
    first, second = _zipped_offsets(spatial)
    plan = _Matmul(
        m=n1 * p, n=n2 * p, k=c, g2=v,
        a=(a_sv, 0, c, 1), b=(b_sv, 0, c, 1),
        o=(n1 * n2 * p * p, 0, n2 * p * p, p * p), row_tab=first, col_tab=second, divisor=c,
    )  # fmt: skip
    zipped = tuple(d for d in spatial for _ in (0, 1))
    return _run_matmul(_INPUT_COV, CALL_FULL, x1, x2, plan, (v, n1, n2, *zipped), ip)


def _self_cov_impl(x, *, diagonal_batch: bool, diagonal_spatial: bool, precision) -> jax.Array:
    """``cov1``/``cov2`` of ``x: (V, N, *S, C)`` in the layout of the flags (leading ``V``)."""
    if not diagonal_batch:
        return _pair_cov_impl(x, x, diagonal_spatial=diagonal_spatial, precision=precision)
    dtype = _check_dtype("input_cov", x)
    v, n = x.shape[:2]
    spatial, c = tuple(x.shape[2:-1]), x.shape[-1]
    p = math.prod(spatial)
    if diagonal_spatial:
        rows = v * n * p
        out = jax.ShapeDtypeStruct((v, n, *spatial), dtype)
        if rows == 0:
            return jnp.zeros(out.shape, out.dtype)
        return runtime.launch(
            _INPUT_COV,
            SQ_NORM,
            x,
            out_shape=out,
            grid=(_cdiv(rows, SQ_BLOCK_R),),
            name=CALL_DIAG,
            num_warps=NUM_WARPS,
            R=rows,
            K=c,
            X_SR=c,
            X_SK=1,
            DIVISOR=c,
            BLOCK_R=SQ_BLOCK_R,
            BLOCK_K=SQ_BLOCK_K,
        )
    _check_pixels(p)
    first, second = _zipped_offsets(spatial)
    plan = _Matmul(
        m=p, n=p, k=c, g1=n, g2=v,
        a=(n * p * c, p * c, c, 1), b=(n * p * c, p * c, c, 1),
        o=(n * p * p, p * p, 0, 0), row_tab=first, col_tab=second, divisor=c,
    )  # fmt: skip
    zipped = tuple(d for d in spatial for _ in (0, 1))
    ip = input_precision("input_cov", precision, dtype)
    return _run_matmul(_INPUT_COV, CALL_DIAG_BATCH, x, x, plan, (v, n, *zipped), ip)


def _pair_cov_reference(x1, x2, *, diagonal_spatial: bool, precision):
    v = max(x1.shape[0], x2.shape[0])
    ref = _backend.dispatch("input_cov", "xla")

    def one(a, b):
        return ref(
            a, b, diagonal_batch=False, diagonal_spatial=diagonal_spatial, batch_axis=0,
            channel_axis=a.ndim - 1, precision=precision,
        )[1]  # fmt: skip

    bcast = [jnp.broadcast_to(x, (v, *x.shape[1:])) for x in (x1, x2)]
    return jax.vmap(one)(*bcast)


def _self_cov_reference(x, *, diagonal_batch: bool, diagonal_spatial: bool, precision):
    ref = _backend.dispatch("input_cov", "xla")

    def one(a):
        return ref(
            a, None, diagonal_batch=diagonal_batch, diagonal_spatial=diagonal_spatial,
            batch_axis=0, channel_axis=a.ndim - 1, precision=precision,
        )[0]  # fmt: skip

    return jax.vmap(one)(x)


def _merge_leading(axis_size: int, in_batched, *xs):
    """Inputs of a batch rule -> the same inputs with ``(axis_size, V)`` merged into one leading
    axis; an input that is 1 along both stays 1 (broadcast by stride 0 in the kernel)."""
    lead = [(axis_size if b else 1, x.shape[1 if b else 0]) for x, b in zip(xs, in_batched)]
    v = max(vv for _, vv in lead)
    out = []
    for x, b, (aa, vv) in zip(xs, in_batched, lead):
        rest = x.shape[2 if b else 1 :]
        if aa * vv == 1:
            out.append(x.reshape(1, *rest))
            continue
        full = jnp.broadcast_to(x if b else x[None], (axis_size, v, *rest))
        out.append(full.reshape(axis_size * v, *rest))
    return out, v


@functools.cache
def _pair_cov_fn(diagonal_spatial: bool, precision):
    statics = {"diagonal_spatial": diagonal_spatial, "precision": precision}
    impl = functools.partial(_pair_cov_impl, **statics)
    reference = functools.partial(_pair_cov_reference, **statics)

    def rule(axis_size, in_batched, x1, x2):
        (y1, y2), v = _merge_leading(axis_size, in_batched, x1, x2)
        out = fn(y1, y2)
        return out.reshape(axis_size, v, *out.shape[1:]), True

    fn = runtime.differentiable(impl, reference, batch_rule=rule)
    return fn


@functools.cache
def _self_cov_fn(diagonal_batch: bool, diagonal_spatial: bool, precision):
    statics = {
        "diagonal_batch": diagonal_batch,
        "diagonal_spatial": diagonal_spatial,
        "precision": precision,
    }
    impl = functools.partial(_self_cov_impl, **statics)
    reference = functools.partial(_self_cov_reference, **statics)

    def rule(axis_size, in_batched, x):
        (y,), v = _merge_leading(axis_size, in_batched, x)
        out = fn(y)
        return out.reshape(axis_size, v, *out.shape[1:]), True

    fn = runtime.differentiable(impl, reference, batch_rule=rule)
    return fn


def _hashable_precision(precision):
    if isinstance(precision, list):
        return tuple(precision)
    return precision


@_backend.register("input_cov", "triton")
def input_cov(
    x1: jax.Array,
    x2: jax.Array | None,
    *,
    diagonal_batch: bool,
    diagonal_spatial: bool,
    batch_axis: int,
    channel_axis: int,
    precision=None,
):
    """Triton ``input_cov``: same signature, layouts and math as ``ntfast.ops.dot_general``'s
    reference (axes already canonical): ``(cov1, nngp, cov2)``, ``cov2 = None`` if ``x2`` is."""
    # Like the reference: cov1 / cov2 in the dtype of x1 / x2, nngp in their promotion.
    for x in (x1, x2):
        if x is not None:
            _check_dtype("input_cov", x)
    dtype = _check_dtype("input_cov", x1, x2)
    input_precision("input_cov", precision, dtype)  # fail early on an unsupported precision
    precision = _hashable_precision(precision)

    def canonical(x):
        return None if x is None else jnp.moveaxis(x, (batch_axis, channel_axis), (0, -1))[None]

    u1, u2 = canonical(x1), canonical(x2)
    self_fn = _self_cov_fn(bool(diagonal_batch), bool(diagonal_spatial), precision)
    nngp = _pair_cov_fn(bool(diagonal_spatial), precision)(
        *_cast(dtype, u1, u1 if u2 is None else u2)
    )[0]
    # Without x2 a full-batch cov1 is nngp itself (XLA would CSE the two products; a custom
    # call is never merged, so reuse it here).
    cov1 = nngp if u2 is None and not diagonal_batch else self_fn(u1)[0]
    cov2 = None if u2 is None else self_fn(u2)[0]
    return cov1, nngp, cov2


# ------------------------------------------------------------------------------------------------
# dot_general: planning one pairwise contraction


@dataclasses.dataclass(frozen=True)
class _OperandPlan:
    """How one operand reaches the kernel: axes summed first, then an optional transpose."""

    presum: tuple[int, ...]  # axes (of the given operand) summed in JAX
    perm: tuple[int, ...] | None  # transpose of the summed operand, None: read in place
    strides: tuple[int, int, int, int]  # along (g2, g1, i|j, k), after presum/perm


@dataclasses.dataclass(frozen=True)
class ContractionPlan:
    """A pairwise einsum ``out[out_labels] = Σ A[a_labels] · B[b_labels]`` as one kernel launch.

    ``out_perm`` is None when the kernel writes ``out_labels`` order directly; otherwise it writes
    the product order ``(g2, g1, i, j)`` (shape ``product_shape``) and ``out_perm`` transposes it.
    """

    a: _OperandPlan
    b: _OperandPlan
    matmul: _Matmul
    out_shape: tuple[int, ...]
    product_shape: tuple[int, ...]
    out_perm: tuple[int, ...] | None


def _run_positions(labels: Sequence[int], group: Sequence[int]) -> int | None:
    """Position of ``group`` as a contiguous run (same order) inside ``labels``, or None."""
    if not group:
        return -1
    try:
        start = list(labels).index(group[0])
    except ValueError:
        return None
    if tuple(labels[start : start + len(group)]) != tuple(group):
        return None
    return start


def _group_view(labels, shape, groups) -> tuple[int, ...] | None:
    """One stride per group if every group is a contiguous run of ``labels`` (row-major
    ``shape``), each group read as one flattened index; an empty group has stride 0."""
    strides = _row_major(shape)
    out = []
    for group in groups:
        start = _run_positions(labels, group)
        if start is None:
            return None
        out.append(0 if start < 0 else strides[start + len(group) - 1])
    return tuple(out)


def _table(labels_out, shape_out, group, sizes) -> np.ndarray:
    """Offset in the row-major ``shape_out`` array of each row-major multi-index of ``group``."""
    strides = dict(zip(labels_out, _row_major(shape_out)))
    idx = np.indices([sizes[lab] for lab in group], dtype=np.int64).reshape(len(group), -1)
    return np.asarray([strides[lab] for lab in group], np.int64) @ idx


def plan_contraction(
    a_labels: Sequence[int],
    a_shape: Sequence[int],
    b_labels: Sequence[int],
    b_shape: Sequence[int],
    out_labels: Sequence[int],
) -> ContractionPlan:
    """Plans ``einsum(A[a_labels], B[b_labels] -> out[out_labels])`` as one ``cov_matmul_kernel``.

    See the module docstring for the index groups. Raises BackendError for a label repeated in one
    operand (a diagonal: ``bilinear``'s callers never produce it) and ValueError for a label of
    two different sizes.
    """
    a_labels, b_labels, out_labels = tuple(a_labels), tuple(b_labels), tuple(out_labels)
    for name, labels in (("first", a_labels), ("second", b_labels), ("output", out_labels)):
        if len(set(labels)) != len(labels):
            raise BackendError(
                f"backend 'triton' op 'dot_general': the {name} operand repeats a label "
                f"{labels}; diagonals within one operand are not supported, use backend='xla'."
            )
    sizes: dict[int, int] = {}
    for labels, shape in ((a_labels, a_shape), (b_labels, b_shape)):
        for lab, d in zip(labels, shape):
            if sizes.setdefault(lab, d) != d:
                raise ValueError(f"label {lab} has sizes {sizes[lab]} and {d}.")
    sa, sb, so = set(a_labels), set(b_labels), set(out_labels)
    presum_a = tuple(i for i, lab in enumerate(a_labels) if lab not in sb and lab not in so)
    presum_b = tuple(i for i, lab in enumerate(b_labels) if lab not in sa and lab not in so)
    al = tuple(lab for lab in a_labels if lab in sb or lab in so)
    bl = tuple(lab for lab in b_labels if lab in sa or lab in so)
    ash, bsh = [sizes[lab] for lab in al], [sizes[lab] for lab in bl]

    g1 = tuple(lab for lab in out_labels if lab in sa and lab in sb)
    big_is_a = math.prod(ash) >= math.prod(bsh)
    big = al if big_is_a else bl
    ks = tuple(lab for lab in big if lab in sa and lab in sb and lab not in so)
    free_a = [lab for lab in al if lab not in sb]
    free_b = [lab for lab in bl if lab not in sa]

    # The big operand's leading free axes become the broadcast batch g2 when its free axes are
    # not one run (K's batch axes in front of a contracted spatial axis).
    g2: tuple[int, ...] = ()
    free_big = free_a if big_is_a else free_b
    if _run_positions(big, free_big) is None:
        lead = []
        for lab in big:
            if lab not in free_big:
                break
            lead.append(lab)
        if lead and _run_positions(out_labels, lead) is not None:
            g2 = tuple(lead)
            free_big[:] = [lab for lab in free_big if lab not in g2]
    free_a, free_b = tuple(free_a), tuple(free_b)

    def operand(labels, shape, presum, own_g2, free):
        groups = (own_g2, g1, free, ks)
        view = _group_view(labels, shape, groups)
        if view is not None:
            return _OperandPlan(presum, None, view)
        order = own_g2 + g1 + free + ks
        perm = tuple(labels.index(lab) for lab in order)
        view = _group_view(order, [sizes[lab] for lab in order], groups)
        return _OperandPlan(presum, perm, view)

    pa = operand(al, ash, presum_a, g2 if big_is_a else (), free_a)
    pb = operand(bl, bsh, presum_b, () if big_is_a else g2, free_b)

    def size(group):
        return math.prod(sizes[lab] for lab in group)

    out_shape = tuple(sizes[lab] for lab in out_labels)
    product_labels = g2 + g1 + free_a + free_b
    product_shape = tuple(sizes[lab] for lab in product_labels)
    base = {"m": size(free_a), "n": size(free_b), "k": size(ks), "g1": size(g1), "g2": size(g2)}
    base.update(a=pa.strides, b=pb.strides)

    direct = _group_view(out_labels, out_shape, (g2, g1))
    total = math.prod(out_shape)
    if direct is not None:
        o_strides = list(direct)
        tabs = []
        for group in (free_a, free_b):
            stride = _group_view(out_labels, out_shape, (group,))
            if stride is not None:
                o_strides.append(stride[0])
                tabs.append(_NO_TABLE)
            elif total <= _INT32_MAX:
                o_strides.append(0)
                tabs.append(_table(out_labels, out_shape, group, sizes))
            else:
                direct = None
                break
    if direct is not None:
        mm = _Matmul(**base, o=tuple(o_strides), row_tab=tabs[0], col_tab=tabs[1])
        return ContractionPlan(pa, pb, mm, out_shape, out_shape, None)
    o_strides = _group_view(product_labels, product_shape, (g2, g1, free_a, free_b))
    mm = _Matmul(**base, o=o_strides)
    out_perm = tuple(product_labels.index(lab) for lab in out_labels)
    return ContractionPlan(pa, pb, mm, out_shape, product_shape, out_perm)


def _prepare(x, plan: _OperandPlan):
    if plan.presum:
        x = jnp.sum(x, axis=plan.presum)
    if plan.perm is not None:
        x = jnp.transpose(x, plan.perm)
    return x


def contract(a, a_labels, b, b_labels, out_labels, *, name: str, precision: str) -> jax.Array:
    """``einsum(a[a_labels], b[b_labels] -> out[out_labels])`` through one kernel launch."""
    plan = plan_contraction(a_labels, a.shape, b_labels, b.shape, out_labels)
    a, b = _prepare(a, plan.a), _prepare(b, plan.b)
    out = _run_matmul(_DOT_GENERAL, name, a, b, plan.matmul, plan.product_shape, precision)
    if plan.out_perm is not None:
        out = _layout.materialized_transpose(out, plan.out_perm)
    return out


def intermediate_labels(other1_labels, mat_labels, other2_labels, out_labels) -> tuple[int, ...]:
    """Labels (in storage order) of ``O1 · K`` when ``O2`` follows: the second product's batch
    labels, then its free rows in output order, then its contracted labels in ``O2``'s order, so
    that it reads the intermediate as a plain ``(g1, rows, K)`` array."""
    later_o2, out = set(other2_labels), tuple(out_labels)
    present = set(other1_labels) | set(mat_labels)
    keep = {lab for lab in present if lab in later_o2 or lab in set(out)}
    batch = tuple(lab for lab in out if lab in keep and lab in later_o2)
    rows = tuple(lab for lab in out if lab in keep and lab not in later_o2)
    ks = tuple(lab for lab in other2_labels if lab in keep and lab not in set(out))
    return batch + rows + ks


def _bilinear_impl(
    mat, other1, other2, *, mat_labels, other1_labels, other2_labels, out_labels, precision
) -> jax.Array:
    dtype = _check_dtype("dot_general", mat, other1, other2)
    ip = input_precision("dot_general", precision, dtype)
    cur, cur_labels = mat, tuple(mat_labels)
    if other1 is not None:
        labels = (
            tuple(out_labels)
            if other2 is None
            else intermediate_labels(other1_labels, cur_labels, other2_labels, out_labels)
        )
        cur = contract(other1, other1_labels, cur, cur_labels, labels, name=CALL_LEFT, precision=ip)
        cur_labels = labels
    if other2 is not None:
        return contract(
            cur, cur_labels, other2, other2_labels, out_labels, name=CALL_RIGHT, precision=ip
        )
    # No second factor: what is left is a transpose or a sum, no contraction.
    letters = {lab: chr(ord("a") + i) for i, lab in enumerate(sorted(set(cur_labels)))}
    spec = "".join(letters[lab] for lab in cur_labels) + "->"
    return jnp.einsum(spec + "".join(letters[lab] for lab in out_labels), cur)


@functools.cache
def _bilinear_fn(mat_labels, other1_labels, other2_labels, out_labels, precision):
    statics = {
        "mat_labels": mat_labels,
        "other1_labels": other1_labels,
        "other2_labels": other2_labels,
        "out_labels": out_labels,
        "precision": precision,
    }
    impl = functools.partial(_bilinear_impl, **statics)
    reference = functools.partial(_backend.dispatch("dot_general", "xla"), **statics)

    def rule(axis_size, in_batched, mat, other1, other2):
        # The mapped axis is one more label, leading in every batched operand and the output.
        new = 1 + max((*mat_labels, *(other1_labels or ()), *(other2_labels or ()), *out_labels))
        b_mat, b1, b2 = in_batched

        def extend(labels, batched):
            return None if labels is None else ((new,) + labels if batched else labels)

        fn = _bilinear_fn(
            extend(mat_labels, b_mat),
            extend(other1_labels, b1),
            extend(other2_labels, b2),
            (new,) + out_labels,
            precision,
        )
        return fn(mat, other1, other2), True

    return runtime.differentiable(impl, reference, batch_rule=rule)


@_backend.register("dot_general", "triton")
def bilinear(
    mat: jax.Array,
    other1: jax.Array | None,
    other2: jax.Array | None,
    *,
    mat_labels: tuple[int, ...],
    other1_labels: tuple[int, ...] | None,
    other2_labels: tuple[int, ...] | None,
    out_labels: tuple[int, ...],
    precision=None,
) -> jax.Array:
    """Triton ``dot_general`` (the bilinear form): same signature and math as the reference of
    ``ntfast.ops.dot_general.bilinear``."""
    dtype = _check_dtype("dot_general", mat, other1, other2)
    input_precision("dot_general", precision, dtype)
    mat, other1, other2 = _cast(dtype, mat, other1, other2)
    fn = _bilinear_fn(
        tuple(mat_labels),
        None if other1 is None else tuple(other1_labels),
        None if other2 is None else tuple(other2_labels),
        tuple(out_labels),
        _hashable_precision(precision),
    )
    return fn(mat, other1, other2)


# ------------------------------------------------------------------------------------------------
# Compile proof


def _specializations() -> list[dict]:
    """Every (kernel module, kernel, dtype, constexpr) combination the launchers above can pick.

    ``cov_matmul_kernel`` is listed under both modules that launch it (``input_cov`` and
    ``dot_general``: one function, so Triton's cache compiles it once per variant)."""
    specs = []
    for np_dtype, dtype in _DTYPES.items():
        precisions = ("ieee",) if np_dtype == np.float64 else tuple(sorted(set(_F32_PRECISION)))
        ptrs = {
            "a_ptr": f"*{dtype}",
            "b_ptr": f"*{dtype}",
            "row_tab_ptr": "*i32",
            "col_tab_ptr": "*i32",
            "out_ptr": f"*{dtype}",
        }
        for block_k in BLOCK_KS:
            for ip in precisions:
                cx = {"BLOCK_M": BLOCK, "BLOCK_N": BLOCK, "BLOCK_K": block_k, "INPUT_PRECISION": ip}
                for op, names in (
                    (_INPUT_COV, (CALL_FULL, CALL_DIAG_SPATIAL, CALL_DIAG_BATCH)),
                    (_DOT_GENERAL, (CALL_LEFT, CALL_RIGHT)),
                ):
                    specs.append(
                        _spec(op, MATMUL, names, dtype, ptrs, _MATMUL_INTS, cx, NUM_STAGES)
                    )
        pix_ptrs = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
        cx = {"BLOCK_N": PIXEL_BLOCK_N, "BLOCK_S": PIXEL_BLOCK_S}
        specs.append(
            _spec(_INPUT_COV, PIXEL_COV, (CALL_DIAG_SPATIAL,), dtype, pix_ptrs, _PIXEL_INTS, cx, 1)
        )
        sq_ptrs = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
        cx = {"BLOCK_R": SQ_BLOCK_R, "BLOCK_K": SQ_BLOCK_K}
        specs.append(_spec(_INPUT_COV, SQ_NORM, (CALL_DIAG,), dtype, sq_ptrs, _SQ_INTS, cx, 1))
    return specs


def _spec(op, kernel, names, dtype, ptrs, ints, constexprs, num_stages) -> dict:
    """One entry: ``triton.compile(ASTSource(fn, signature, constexprs), target=...)`` inputs."""
    signature = {**ptrs, **{k: "i32" for k in ints}, **{k: "constexpr" for k in constexprs}}
    return {
        "op": op,
        "kernel": kernel,
        "names": tuple(names),
        "dtype": dtype,
        "signature": signature,
        "constexprs": dict(constexprs),
        "num_warps": NUM_WARPS,
        "num_stages": num_stages,
    }


#: Every kernel specialization the ``input_cov``/``dot_general`` launchers can pick, as dicts with
#: keys ``op`` (the kernel module a launch names: ``kernels/triton/input_cov.py`` re-exports the
#: kernels of ``dot_general.py``), ``kernel``, ``names`` (custom calls that use it), ``dtype``,
#: ``signature`` (``triton.compile`` signature incl. ``"constexpr"`` entries), ``constexprs``,
#: ``num_warps``, ``num_stages``. Int arguments beyond int32 (strides of outputs over 2³¹ entries)
#: compile as i64, those equal to 1 as constants (jax-triton value specializations).
SPECIALIZATIONS: list[dict] = _specializations()
