"""Triton launcher of the ``fused_cnn`` op (kernel: ``kernels/triton/fused_cnn.py``).

Registered for backend ``"triton"`` with the exact signature of the XLA reference
(:func:`ntfast.ops.fused_cnn.fused_cnn_reference`, the definition). Per segment of the plan
(``ntfast.ops.fused_cnn.segments``) one launch runs every pair × offset tile through all the
segment's conv / Dense / nonlinearity steps on chip (custom calls
``ntfast_fused_cnn_<source>_<end>``: source ``images`` or ``packed``, end ``readout`` or
``planes``). The glue between launches is XLA, built from the reference's own helpers:

- per-image variance maps (``fused_cnn._variance_chain``; O(HW) per image and layer);
- pooling between segments: the packed planes (the reference's whole packed layout
  ``[δh, i, δw, j]``) of a segment ending in ``AvgPool``/``SumPool`` are pooled in that layout
  onto the next segment's grid (``fused_cnn._pool_packed``) and read by the next launch;
- pairs: self pairs (each image with itself) run first, through every segment, because the
  variance maps of a later segment come from each image's own pooled covariance; then the cross
  pairs (``x2=None``: the strict upper triangle only, mirrored) with those maps;
- readouts: per-program partial sums, summed and scaled (GAP/GSP/FLATTEN) like the reference.

Block shape: a program holds ``[BH, BT, BW] = [i, offset, j]`` (``BT`` consecutive flattened
offsets ``(δh, δw)`` of one pair) with square ``BH = BW`` the next power of two
>= max(Lh, Lw, 16) and ``BT = TILE_ENTRIES / BH²`` (see the kernel), so the periodic grid of
every segment must fit ``MAX_BLOCK`` (64: images up to 63×63 with SAME 3×3, 64×64 with
VALID/CIRCULAR). Grid: ``(pairs, ceil(n_offsets / BT))``. Served: float32/float64,
nonlinearities ABRelu (ReLU, LeakyRelu, Abs), Erf, Gelu (``ops.fused_table``). Other requests
raise :class:`~ntfast.backend.BackendError` (``unsupported_reason`` tells the dispatcher
beforehand, so ``"auto"`` skips them; the image size only once the dispatcher's query has it).

``tile`` (the XLA path's δh rows per tile) does not apply: the kernel's tile is its block;
``pair_block`` bounds the pairs per launch (``None``: all pairs when the plan has no pooling,
else as many as ``fused_cnn.memory_budget()`` holds packed planes of). Derivatives: the XLA
reference's (``runtime.differentiable``); ``vmap``: a map over the batch.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from ntfast import backend as _backend
from ntfast.backend import BackendError
from ntfast.ops import fused_cnn as fc
from ntfast.ops import fused_table as ft

from . import runtime
from .nonlin import _kind_constants

_KERNELS = "fused_cnn"  # kernels/triton/fused_cnn.py
_KERNEL = "fused_cnn_kernel"
_K = runtime.kernels(_KERNELS, interpret=False)  # its table layout constants

BLOCKS = (16, 32, 64)  # square plane blocks BH = BW (tl.dot needs >= 16)
MAX_BLOCK = BLOCKS[-1]
# BH · BT · BW per program: the on-chip working set of one plane array. With 8 warps ptxas
# (sm_90) reports 255 registers and 0.4-2 KB (f32) / 1.6-2 KB (f64) of spills per thread: the
# nonlinearity's temporaries; a smaller tile would spill less but cannot go below one 64×64 plane.
TILE_ENTRIES = 4096
NUM_WARPS = 8
_DTYPES = {np.dtype(np.float32): "fp32", np.dtype(np.float64): "fp64"}
_NONLIN_KINDS = {code: kind for kind, (code, _) in ft.NONLIN_CODES.items()}


def call_name(packed: bool, planes: bool) -> str:
    """Custom-call name of a launch: ``ntfast_fused_cnn_<images|packed>_<readout|planes>``."""
    source = "packed" if packed else "images"
    return f"ntfast_fused_cnn_{source}_{'planes' if planes else 'readout'}"


def block_shape(grid: tuple[int, int]) -> tuple[int, int, int] | None:
    """``(BH, BT, BW)`` of a segment's periodic ``grid``, or None if it exceeds ``MAX_BLOCK``."""
    side = max(16, 1 << (max(grid) - 1).bit_length())
    if side > MAX_BLOCK:
        return None
    return side, TILE_ENTRIES // (side * side), side


# ------------------------------------------------------------------------------------------------
# Which requests the kernel serves


def unsupported_reason(plan, dtype, size=None) -> str | None:
    """Why the Triton ``fused_cnn`` cannot run ``plan`` on ``dtype`` images (of spatial ``size``,
    if known), or None. The dispatcher asks before choosing the backend."""
    if np.dtype(dtype) not in _DTYPES:
        return f"the fused kernel supports float32 and float64, got {np.dtype(dtype).name}"
    reason = ft.unsupported_reason(plan)
    if reason is not None:
        return reason
    if size is not None:
        return _size_reason(plan, tuple(size))
    return None


def _size_reason(plan, size) -> str | None:
    try:
        segs = fc.segments(plan, size)
    except ValueError as e:
        return str(e)
    for seg in segs:
        if block_shape(seg.grid) is None:
            return (
                f"a segment's packed planes ({seg.grid[0]}×{seg.grid[1]} for images of {size}) "
                f"exceed the kernel's on-chip block of {MAX_BLOCK}×{MAX_BLOCK}"
            )
    return None


# ------------------------------------------------------------------------------------------------
# Tables


def segment_tables(plan, size, dtype) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per segment, the kernel's ``(tab int32, flt dtype)`` (layout: the kernel module's doc),
    decoded from :func:`ntfast.ops.fused_table.encode`."""
    ints, floats = ft.encode(plan, size)
    n_segs, n_steps = int(ints[1]), int(ints[2])
    seg_rows = ints[ft.HEADER_INTS : ft.HEADER_INTS + n_segs * ft.SEG_INTS].reshape(n_segs, -1)
    step_rows = ints[ft.HEADER_INTS + n_segs * ft.SEG_INTS :].reshape(n_steps, ft.STEP_INTS)
    step_floats = floats.reshape(n_steps, ft.STEP_FLOATS)
    out = []
    for row in seg_rows:
        lh, lw, _, _, circular, first, count, end = (int(v) for v in row[:8])
        hv_out, wv_out = int(row[15]), int(row[16])
        tab = np.zeros(_K.HEADER + count * _K.STEP_INTS, np.int32)
        n_dh, n_dw = (1, 1) if end == ft.END_FLATTEN else (lh, lw)
        tab[:12] = [lh, lw, *size, 0, circular, count, 0, hv_out, wv_out, n_dw, n_dh]
        flt = np.zeros(count * _K.STEP_FLOATS, np.float64)
        n_maps = 0
        for k in range(count):
            s_i, s_f = step_rows[first + k], step_floats[first + k]
            rec = tab[_K.HEADER + k * _K.STEP_INTS :][: _K.STEP_INTS]
            rec[:10] = s_i  # type, hv, wv, lo_h, fh, lo_w, fw, has_b, standard, nonlin
            f = flt[k * _K.STEP_FLOATS :][: _K.STEP_FLOATS]
            f[:3] = s_f[:3]  # w_var, b_var, ntk_scale
            if s_i[0] == ft.STEP_NONLIN:
                kind = _NONLIN_KINDS[int(s_i[9])]
                names = ft.NONLIN_CODES[kind][1]
                consts = _kind_constants(kind, dict(zip(names, s_f[3 : 3 + len(names)])))
                f[5 : 5 + len(consts)] = consts
                rec[10] = n_maps
                n_maps += 1
            else:
                # 1/f as the reference's `out * (1.0 / f)` (f = 1 for Dense: unused).
                f[3], f[4] = 1.0 / int(s_i[4]), 1.0 / int(s_i[6])
        tab[7] = max(n_maps, 1)
        out.append((tab, flt.astype(dtype)))
    return out


# ------------------------------------------------------------------------------------------------
# One segment, one block of pairs


def _launch(tab, flt, *, xs, src, idx, var, compute_ntk, planes):
    """One launch: every pair of ``idx = (ia, ib, va, vb)`` through the segment of ``tab``.

    ``src``: None (images ``xs``) or the packed ``(nngp, ntk)`` inputs ``(n, Lh, Lh, Lw, Lw)``
    (the reference's whole packed layout ``[δh, i, δw, j]``).
    Returns packed ``(nngp, ntk)`` planes, or partial sums ``(n, n_tiles)`` per program.
    """
    dtype = flt.dtype
    lh, lw, n_dw, n_dh = (int(tab[k]) for k in (0, 1, 10, 11))
    bh, bt, bw = block_shape((lh, lw))
    n = idx[0].shape[0]
    grid = (n, -(-(n_dh * n_dw) // bt))
    tab = tab.copy()
    tab[12:15] = (src is not None, planes, compute_ntk)
    if flt.size == 0:  # a segment without steps (pooling right after the images or a pooling)
        flt = np.zeros(1, dtype)
    dummy = jnp.zeros((1,), dtype)
    if src is None:
        tab[4] = xs.shape[-1]
        img, srcn, srct = xs, dummy, dummy
    else:
        img, srcn = dummy, src[0]
        srct = src[1] if compute_ntk else dummy
    shape = (n, lh, lh, lw, lw) if planes else grid
    out = [jax.ShapeDtypeStruct(shape, dtype)]
    out.append(jax.ShapeDtypeStruct(shape if compute_ntk else (1,), dtype))
    outn, outt = runtime.launch(
        _KERNELS,
        _KERNEL,
        img,
        srcn,
        srct,
        *(jnp.asarray(a, jnp.int32) for a in idx),
        var,
        jnp.asarray(tab),
        jnp.asarray(flt),
        out_shape=out,
        grid=grid,
        name=call_name(src is not None, planes),
        num_warps=NUM_WARPS,
        BH=bh,
        BT=bt,
        BW=bw,
    )
    return outn, (outt if compute_ntk else None)


def _maps(seg, v0):
    """``(K, Lh, Lw)`` variance maps of one image entering the segment's nonlinearities."""
    maps = fc._variance_chain(seg, v0)
    if not maps:
        return jnp.ones((1, *seg.grid), v0.dtype)
    return jnp.stack(maps)


def _chain(segs, tabs, xs, ia, ib, maps, compute_ntk):
    """Pairs ``(ia, ib)`` (images of ``xs``) through every segment.

    ``maps``: per segment ``(M, K, Lh, Lw)`` variance maps of every image; None for self pairs
    (``ia == ib``), whose maps come from their own pooled covariances. Returns the readout
    values ``(nngp, ntk or None)`` and, for self pairs, the maps per segment.
    """
    own = maps is None
    n = ia.shape[0]
    own_maps, src = [], None
    for s, (seg, (tab, flt)) in enumerate(zip(segs, tabs)):
        if own:
            if s == 0:
                v0 = jax.vmap(lambda x, g=seg.grid: fc._image_variance(x, g))(xs[ia])
            else:
                v0 = src[0][:, 0, :, 0, :]  # δ = 0: K[i, i, j, j], 0 outside the image
            var = jax.vmap(functools.partial(_maps, seg))(v0)
            own_maps.append(var)
            idx = (ia, ib, jnp.arange(n), jnp.arange(n))
        else:
            var, idx = maps[s], (ia, ib, ia, ib)
        planes = isinstance(seg.end, fc.PoolStep)
        outn, outt = _launch(
            tab, flt, xs=xs, src=src, idx=idx, var=var, compute_ntk=compute_ntk, planes=planes
        )
        if not planes:
            hv, wv = seg.sizes[-1] if seg.sizes else seg.size_in
            scale = {"GAP": 1.0 / (hv * wv) ** 2, "GSP": 1.0, "FLATTEN": 1.0 / (hv * wv)}
            scale = scale[seg.end.kind]
            nngp = jnp.sum(outn, 1) * scale
            return (nngp, None if outt is None else jnp.sum(outt, 1) * scale), own_maps
        pool = jax.vmap(functools.partial(fc._pool_packed, seg, segs[s + 1]))
        src = (pool(outn), None if outt is None else pool(outt))
    raise AssertionError("a plan ends in a readout")


def _blocked(fn, ia: np.ndarray, ib: np.ndarray, block: int):
    """``fn(ia, ib)`` over blocks of ``block`` pairs (``lax.map``; the last block is padded with
    repeats of the last pair, trimmed from the outputs)."""
    n = ia.size
    if n <= block:
        return fn(jnp.asarray(ia, jnp.int32), jnp.asarray(ib, jnp.int32))
    n_blocks = -(-n // block)
    pad = n_blocks * block - n
    blocks = [
        jnp.asarray(np.concatenate([a, np.full(pad, a[-1], a.dtype)]), jnp.int32).reshape(
            n_blocks, block
        )
        for a in (ia, ib)
    ]
    out = jax.lax.map(lambda ab: fn(*ab), tuple(blocks))
    return jax.tree_util.tree_map(lambda y: y.reshape((n_blocks * block,) + y.shape[2:])[:n], out)


def _pair_block(segs, n_pairs, itemsize, compute_ntk, pair_block):
    if pair_block is not None:
        return max(1, min(pair_block, max(n_pairs, 1)))
    # Per pair: the packed planes of each pooling segment (kernel output, unpacked copy, packed
    # input of the next segment), NNGP and NTK.
    per_pair = sum(
        3 * (1 + compute_ntk) * math.prod(seg.grid) ** 2 * itemsize
        for seg in segs
        if isinstance(seg.end, fc.PoolStep)
    )
    if not per_pair:
        return max(n_pairs, 1)
    return max(1, min(max(n_pairs, 1), _memory_budget() // per_pair))


def _memory_budget() -> int:
    """Bytes for the packed planes of one block of pairs: ``NTFAST_FUSED_MEMORY`` if set, else a
    quarter of the default device's memory when it reports one (a GPU), else
    ``fused_cnn.memory_budget()`` (a quarter of host memory)."""
    if not os.environ.get("NTFAST_FUSED_MEMORY"):
        try:
            limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        except Exception:  # noqa: BLE001 - backends without memory stats
            limit = None
        if limit:
            return int(limit) // 4
    return fc.memory_budget()


# ------------------------------------------------------------------------------------------------
# The op


def _impl(x1, x2, *, plan, compute_ntk, compute_cov, tile, pair_block):
    """``(nngp, ntk, cov1, cov2)`` exactly as ``fused_cnn_reference`` (same shapes, dtypes)."""
    del tile  # the kernel's tile is its block (result independent of it, as the reference's)
    xs = x1 if x2 is None else jnp.concatenate([x1, x2])
    dtype = np.dtype(xs.dtype)
    size = tuple(x1.shape[1:3])
    reason = unsupported_reason(plan, dtype, size)
    if reason is not None:
        raise BackendError(f"backend 'triton' cannot run this 'fused_cnn' request: {reason}.")
    segs = fc.segments(plan, size)
    tabs = segment_tables(plan, size, dtype)
    sym = x2 is None
    n1 = x1.shape[0]
    m = xs.shape[0]

    with _backend.use_backend("xla"):  # the glue (variance maps, pooling) is XLA
        need_self = sym or compute_cov or len(segs) > 1
        if need_self:
            values = sym or compute_cov
            ntk_self = compute_ntk and values
            own = np.arange(m)
            block = _pair_block(segs, m, dtype.itemsize, ntk_self, pair_block)
            (self_nngp, self_ntk), maps = _blocked(
                lambda a, b: _chain(segs, tabs, xs, a, b, None, ntk_self), own, own, block
            )
        else:
            seg = segs[0]
            maps = [jax.vmap(lambda x: _maps(seg, fc._image_variance(x, seg.grid)))(xs)]
            self_nngp = self_ntk = None

        n2 = None if sym else x2.shape[0]
        ia, ib = fc.cross_pairs(n1, n2)
        if ia.size:
            block = _pair_block(segs, ia.size, dtype.itemsize, compute_ntk, pair_block)
            (cross_nngp, cross_ntk), _ = _blocked(
                lambda a, b: _chain(segs, tabs, xs, a, b, maps, compute_ntk), ia, ib, block
            )
        else:
            cross_nngp = jnp.zeros((0,), dtype)
            cross_ntk = jnp.zeros((0,), dtype) if compute_ntk else None

    cross_ntk = cross_ntk if compute_ntk else None
    return fc.assemble((cross_nngp, cross_ntk), (self_nngp, self_ntk), n1, n2, compute_cov)


def _reference(x1, x2, **statics):
    with _backend.use_backend("xla"):
        return fc.fused_cnn_reference(x1, x2, **statics)


@functools.cache
def _op(**statics):
    """The differentiable, batchable launcher of one static configuration (cached)."""
    impl = functools.partial(_impl, **statics)
    return runtime.differentiable(impl, functools.partial(_reference, **statics))


@_backend.register("fused_cnn", "triton")
def fused_cnn(
    x1,
    x2=None,
    *,
    plan,
    compute_ntk: bool = True,
    compute_cov: bool = True,
    tile: int | None = None,
    pair_block: int | None = None,
):
    """Triton ``fused_cnn``: same signature, shapes and math as the XLA reference
    (``ntfast.ops.fused_cnn.fused_cnn_reference``)."""
    fn = _op(
        plan=plan,
        compute_ntk=bool(compute_ntk),
        compute_cov=bool(compute_cov),
        tile=tile,
        pair_block=pair_block,
    )
    return fn(x1, x2)


fused_cnn.unsupported_reason = unsupported_reason


# ------------------------------------------------------------------------------------------------
# Compile proof


def _specializations() -> list[dict]:
    """Every (dtype, block) combination the launcher can pick (source, end and NTK are data)."""
    specs = []
    names = tuple(call_name(p, e) for p in (False, True) for e in (False, True))
    for dtype in _DTYPES.values():
        signature = {p: f"*{dtype}" for p in ("img_ptr", "srcn_ptr", "srct_ptr", "var_ptr")}
        signature.update({p: "*i32" for p in ("ia_ptr", "ib_ptr", "va_ptr", "vb_ptr", "tab_ptr")})
        signature.update({p: f"*{dtype}" for p in ("flt_ptr", "outn_ptr", "outt_ptr")})
        for side in BLOCKS:
            bh, bt, bw = block_shape((side, side))
            constexprs = {"BH": bh, "BT": bt, "BW": bw}
            specs.append(
                {
                    "op": _KERNELS,
                    "kernel": _KERNEL,
                    "names": names,
                    "dtype": dtype,
                    "signature": {**signature, **{k: "constexpr" for k in constexprs}},
                    "constexprs": constexprs,
                    "num_warps": NUM_WARPS,
                    "num_stages": 1,
                }
            )
    return specs


#: Every kernel specialization the ``fused_cnn`` launcher can pick, as dicts with keys ``op``
#: (kernel module), ``kernel``, ``names`` (custom calls that use it), ``dtype``, ``signature``
#: (triton.compile signature incl. ``"constexpr"`` entries), ``constexprs``, ``num_warps``,
#: ``num_stages``. Plans and sizes are data (``tab``, ``flt``), not specializations.
SPECIALIZATIONS: list[dict] = _specializations()
