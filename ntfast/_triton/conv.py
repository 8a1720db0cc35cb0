"""Triton launchers of the window ops ``conv_cov`` and ``pool_cov`` (kernels: ``kernels/triton/conv.py``).

Both ops are separable: a covariance array with ``B`` batch axes and ``n`` spatial axes (pairs) is
reduced by one launch per spatial axis (pair), each seeing the array as a small row-major box:

``conv_cov``, full spatial (``ntfast_conv_cov_full``, ``conv_pair_kernel``): stored pairs are
convolved last to first; pass ``k`` views the array as ``(P, A, A', Q)`` with ``P`` = batch x the
pairs in front of pair ``k`` and ``Q`` = the pairs already done, and writes ``(P, Q, O, O')``, so
the pair lands behind those. After ``n`` passes the pairs are in reverse stored order, the layout
of the reference (no separate transpose)::

    (B, p0, p1, p2) -> (B, p0, p1, p2') -> (B, p0, p2', p1') -> (B, p2', p1', p0')

``conv_cov``, diagonal spatial (``ntfast_conv_cov_diag``) and ``pool_cov``
(``ntfast_conv_pool_cov``), ``window_axis_kernel``: one 1-D box sum per axis, ``(P, A, Q) ->
(P, O, Q)`` in place order; pooling visits both axes of a pair separately (two box sums, no pair
coupling) and divides per axis like the reference.

Work is ``F`` taps per output entry per pass. Sizes, filter, stride and padding are runtime ints:
the compiled variants are dtype x tile shape x padding kind, all listed in ``SPECIALIZATIONS``.
Requests the kernels do not serve (dtypes other than f32/f64, slabs beyond int32 offsets) raise
:class:`ntfast.backend.BackendError`; argument errors raise the reference's ``ValueError``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntfast import backend as _backend
from ntfast.backend import BackendError
from ntfast.ops import conv as _conv
from ntfast.ops import pool as _pool

from . import runtime

_KERNELS = "conv"  # kernels/triton/conv.py
FULL_CALL = "ntfast_conv_cov_full"
DIAG_CALL = "ntfast_conv_cov_diag"
POOL_CALL = "ntfast_conv_pool_cov"

# Tiles (BLOCK_M rows of flattened (p, i[, i']) x BLOCK_Q trailing entries): a long row strip
# when nothing trails (Q == 1: the last axis / first pair), else a square-ish tile so that the
# loads run along q and the stores along the rows.
ROWS_TILE = (1024, 1)
BLOCK_TILE = (64, 32)
NUM_WARPS = 4
_DTYPES = {np.dtype(np.float32): "fp32", np.dtype(np.float64): "fp64"}
_INT32_MAX = 2**31 - 1
_GRID_Y_MAX = 65535  # CUDA limit of grid dimension 1


def _tile(q: int) -> tuple[int, int]:
    return ROWS_TILE if q == 1 else BLOCK_TILE


def _check_dtype(x: jax.Array, op: str) -> None:
    if jnp.dtype(x.dtype) not in _DTYPES:
        raise BackendError(
            f"backend 'triton' op {op!r} supports float32 and float64 arrays, got {x.dtype}."
        )


def _check_fits(op: str, rows: int, m: int, q: int, slab_in: int, slab_out: int, *, strip: bool):
    """Raises BackendError unless the pass's per-entry int32 offsets and its grid fit.

    ``strip``: a program's rows may start anywhere in slab ``p0`` (int64) and reach at most
    ``(M + BLOCK_M - 2) // M`` slabs further; offsets inside that stretch are int32. Otherwise a
    program stays in one slab. Returns the launch grid.
    """
    block_m, block_q = _tile(q)
    if strip:
        span = (m + block_m - 2) // m + 1
        grid = (-(-rows * m // block_m), -(-q // block_q))
    else:
        span = 1
        grid = (rows * -(-m // block_m), -(-q // block_q))
    if max(span * slab_in, span * slab_out) > _INT32_MAX or grid[0] > _INT32_MAX:
        raise BackendError(
            f"backend 'triton' op {op!r}: one batch entry's slab of {max(slab_in, slab_out)} "
            "entries exceeds the kernels' int32 offsets; split the batch or use backend='xla'."
        )
    if grid[1] > _GRID_Y_MAX:
        raise BackendError(
            f"backend 'triton' op {op!r}: {q} trailing entries exceed the launch grid "
            f"({_GRID_Y_MAX} x {block_q}); use backend='xla'."
        )
    return grid


def _out_size(size: int, f: int, s: int, padding: str) -> tuple[int, int]:
    """``(low padding, output size)`` of one axis; ValueError if no window fits (as the reference)."""
    lo, hi = _conv.axis_pads(size, f, s, padding)
    out = _conv.n_windows(size + lo + hi, f, s)
    if out == 0:
        raise ValueError(
            f"A window (filter_shape / window_shape entry) of size {f} with stride {s} does not "
            f"fit in a spatial axis of (padded) size {size + lo + hi}: the output would be empty. "
            "Use a smaller window or SAME/CIRCULAR padding."
        )
    return lo, out


# ------------------------------------------------------------------------------------------------
# Passes


def _pair_pass(x: jax.Array, p: int, q: int, f: int, s: int, padding: str, den: int) -> jax.Array:
    """``x`` viewed ``(P, A1, A2, Q)`` -> ``(P, Q, O1, O2)`` (flat 4-D result)."""
    _, a1, a2, _ = x.shape
    lo1, o1 = _out_size(a1, f, s, padding)
    lo2, o2 = _out_size(a2, f, s, padding)
    out = jax.ShapeDtypeStruct((p, q, o1, o2), x.dtype)
    if p * q == 0:
        return jnp.zeros(out.shape, out.dtype)
    # Row strips across slabs only without trailing entries (see the kernel).
    grid = _check_fits("conv_cov", p, o1 * o2, q, a1 * a2 * q, q * o1 * o2, strip=q == 1)
    block_m, block_q = _tile(q)
    return runtime.launch(
        _KERNELS,
        "conv_pair_kernel",
        x,
        out_shape=out,
        grid=grid,
        name=FULL_CALL,
        num_warps=NUM_WARPS,
        n_lead=p,
        n_trail=q,
        a1=a1,
        a2=a2,
        o1=o1,
        o2=o2,
        lo1=lo1,
        lo2=lo2,
        taps=f,
        stride=s,
        den=den,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        CIRCULAR=padding == "CIRCULAR",
    )


def _axis_pass(
    x: jax.Array,
    f: int,
    s: int,
    padding: str,
    den: int,
    *,
    name: str,
    op: str,
    edge_pow: int = 0,
) -> jax.Array:
    """``x`` viewed ``(P, A, Q)`` -> ``(P, O, Q)``; divides by ``den`` (x ``cnt(i)^edge_pow``)."""
    p, a, q = x.shape
    lo, o = _out_size(a, f, s, padding)
    out = jax.ShapeDtypeStruct((p, o, q), x.dtype)
    if p * q == 0:
        return jnp.zeros(out.shape, out.dtype)
    grid = _check_fits(op, p, o, q, a * q, o * q, strip=True)
    block_m, block_q = _tile(q)
    return runtime.launch(
        _KERNELS,
        "window_axis_kernel",
        x,
        out_shape=out,
        grid=grid,
        name=name,
        num_warps=NUM_WARPS,
        n_lead=p,
        n_trail=q,
        a=a,
        o=o,
        lo=lo,
        taps=f,
        stride=s,
        den=den,
        edge_pow=max(edge_pow, 1),
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        CIRCULAR=padding == "CIRCULAR",
        EDGE=edge_pow > 0,
    )


def _axis_sums(x: jax.Array, plan, *, name: str, op: str) -> jax.Array:
    """Applies 1-D box passes ``plan = [(axis, f, s, padding, den, edge_pow), ...]`` in order."""
    shape = list(x.shape)
    for ax, f, s, padding, den, edge_pow in plan:
        p, q = math.prod(shape[:ax]), math.prod(shape[ax + 1 :])
        y = _axis_pass(
            x.reshape(p, shape[ax], q), f, s, padding, den, name=name, op=op, edge_pow=edge_pow
        )
        shape[ax] = y.shape[1]
        x = y.reshape(shape)
    return x


# ------------------------------------------------------------------------------------------------
# conv_cov


def _conv_impl(
    x: jax.Array,
    *,
    filter_shape: tuple[int, ...],
    strides: tuple[int, ...],
    padding: str,
    diagonal_spatial: bool,
    is_reversed: bool,
) -> jax.Array:
    _check_dtype(x, "conv_cov")
    b = _conv.check_window_args(x, filter_shape, strides, diagonal_spatial, "filter_shape")
    n = len(filter_shape)
    total = math.prod(filter_shape)
    if diagonal_spatial:
        plan = [
            (b + k, filter_shape[k], strides[k], padding, total if k == n - 1 else 1, 0)
            for k in range(n)
        ]
        return _axis_sums(x, plan, name=DIAG_CALL, op="conv_cov")

    batch = x.shape[:b]
    # Stored pairs as (size, size'); pair k is convolved with the filter of its logical axis.
    pairs = [tuple(x.shape[b + 2 * k : b + 2 * k + 2]) for k in range(n)]
    order = _conv.stored_pairs(n, is_reversed)
    done: list[int] = []  # output sizes of the pairs already moved to the back, in final order
    for k in range(n - 1, -1, -1):
        f, s = filter_shape[order[k]], strides[order[k]]
        p = math.prod(batch) * math.prod(a * a2 for a, a2 in pairs[:k])
        q = math.prod(done)
        y = _pair_pass(x.reshape(p, *pairs[k], q), p, q, f, s, padding, total if k == 0 else 1)
        done += list(y.shape[2:])
        x = y
    return x.reshape(*batch, *done)


def _fold_batch(impl):
    """vmap rule: a mapped axis in front is one more leading batch axis of the same op."""

    def rule(axis_size, in_batched, x):
        return impl(x), in_batched[0]

    return rule


@functools.cache
def _conv_fn(**statics):
    """The differentiable, batchable launcher for one static configuration (cached)."""
    impl = functools.partial(_conv_impl, **statics)
    reference = functools.partial(_conv.conv_cov_reference, **statics)
    return runtime.differentiable(impl, reference, batch_rule=_fold_batch(impl))


@_backend.register("conv_cov", "triton")
def conv_cov(
    x: jax.Array,
    *,
    filter_shape: Sequence[int],
    strides: Sequence[int],
    padding: str,
    diagonal_spatial: bool = False,
    is_reversed: bool = False,
) -> jax.Array:
    """Triton ``conv_cov``: same signature, layouts and math as ``ntfast.ops.conv.conv_cov``."""
    fn = _conv_fn(
        filter_shape=tuple(int(v) for v in filter_shape),
        strides=tuple(int(v) for v in strides),
        padding=_conv.padding_name(padding),
        diagonal_spatial=bool(diagonal_spatial),
        is_reversed=bool(is_reversed),
    )
    return fn(x)


# ------------------------------------------------------------------------------------------------
# pool_cov


def _pool_impl(
    x: jax.Array,
    *,
    window_shape: tuple[int, ...],
    strides: tuple[int, ...],
    padding: str,
    pool_type: str,
    normalize_edges: bool,
    diagonal_spatial: bool,
    is_reversed: bool,
) -> jax.Array:
    _check_dtype(x, "pool_cov")
    b = _conv.check_window_args(x, window_shape, strides, diagonal_spatial, "window_shape")
    n = len(window_shape)
    if diagonal_spatial:
        axes = [(k, b + k) for k in range(n)]
    else:
        order = _conv.stored_pairs(n, is_reversed)
        axes = [(order[i], b + 2 * i + j) for i in range(n) for j in (0, 1)]
    # Per axis divisor, as the reference: AVG divides by d(i) (d(i)² diagonal spatial), where
    # d(i) is the window size or, for SAME with normalize_edges, its taps inside the axis.
    power = 2 if diagonal_spatial else 1
    edges = pool_type == "AVG" and normalize_edges and padding == "SAME"
    plan = []
    for logical, ax in axes:
        w = window_shape[logical]
        den = 1 if pool_type == "SUM" or edges else w**power
        plan.append((ax, w, strides[logical], padding, den, power if edges else 0))
    return _axis_sums(x, plan, name=POOL_CALL, op="pool_cov")


@functools.cache
def _pool_fn(**statics):
    """The differentiable, batchable launcher for one static configuration (cached)."""
    impl = functools.partial(_pool_impl, **statics)
    reference = functools.partial(_pool.pool_cov_reference, **statics)
    return runtime.differentiable(impl, reference, batch_rule=_fold_batch(impl))


@_backend.register("pool_cov", "triton")
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
) -> jax.Array:
    """Triton ``pool_cov``: same signature, layouts and math as ``ntfast.ops.pool.pool_cov``."""
    fn = _pool_fn(
        window_shape=tuple(int(v) for v in window_shape),
        strides=tuple(int(v) for v in strides),
        padding=_conv.padding_name(padding),
        pool_type=_pool._check_pool_type(pool_type),
        normalize_edges=bool(normalize_edges),
        diagonal_spatial=bool(diagonal_spatial),
        is_reversed=bool(is_reversed),
    )
    return fn(x)


# ------------------------------------------------------------------------------------------------
# Compile proof


def _specializations() -> list[dict]:
    """Every (kernel, dtype, constexpr) combination the launchers above can pick."""
    pair_args = ("n_lead", "n_trail", "a1", "a2", "o1", "o2", "lo1", "lo2", "taps", "stride", "den")
    axis_args = ("n_lead", "n_trail", "a", "o", "lo", "taps", "stride", "den", "edge_pow")
    specs = []
    for dtype in _DTYPES.values():
        ptrs = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
        for (block_m, block_q), circular in (
            (t, c) for t in (ROWS_TILE, BLOCK_TILE) for c in (False, True)
        ):
            tiles = {"BLOCK_M": block_m, "BLOCK_Q": block_q}
            cx = {**tiles, "CIRCULAR": circular}
            specs.append(_spec("conv_pair_kernel", FULL_CALL, dtype, ptrs, pair_args, cx))
            # EDGE (normalize_edges) only with SAME padding, never with CIRCULAR.
            for edge in (False, True) if not circular else (False,):
                cx = {**tiles, "CIRCULAR": circular, "EDGE": edge}
                names = (POOL_CALL,) if edge else (DIAG_CALL, POOL_CALL)
                specs.append(_spec("window_axis_kernel", names, dtype, ptrs, axis_args, cx))
    return specs


def _spec(kernel, names, dtype, ptrs, ints, constexprs) -> dict:
    """One entry: ``triton.compile(ASTSource(fn, signature, constexprs), target=...)`` inputs."""
    signature = {**ptrs, **{k: "i32" for k in ints}, **{k: "constexpr" for k in constexprs}}
    return {
        "op": _KERNELS,
        "kernel": kernel,
        "names": (names,) if isinstance(names, str) else names,
        "dtype": dtype,
        "signature": signature,
        "constexprs": dict(constexprs),
        "num_warps": NUM_WARPS,
        "num_stages": 1,
    }


#: Every kernel specialization the ``conv_cov``/``pool_cov`` launchers can pick, as dicts with keys
#: ``op`` (kernel module), ``kernel``, ``names`` (custom calls that use it), ``dtype``,
#: ``signature`` (triton.compile signature incl. ``"constexpr"`` entries), ``constexprs``,
#: ``num_warps``, ``num_stages``. jax-triton additionally turns int arguments equal to 1 into
#: constants and marks multiples of 16; those are value specializations of these kernels.
SPECIALIZATIONS: list[dict] = _specializations()
