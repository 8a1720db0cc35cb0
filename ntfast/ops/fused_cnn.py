"""Hot op ``fused_cnn``: NNGP/NTK of a whole conv network, fused per tile of spatial offsets.

The per-offset algorithm of DESIGN.md §2. For one pair of images the full-spatial covariance
``K[i, i', j, j']`` of a stride-1 conv stack is stored in the *packed offset layout*::

    D[δh, i, δw, j] = K[i, (i + δh) mod Lh, j, (j + δw) mod Lw]        δh, i < Lh;  δw, j < Lw

on a periodic grid ``L = H + g`` whose last ``g`` rows/columns are zero (the zero padding of SAME
convolutions; ``g = 0`` for CIRCULAR). Every entry of ``D`` is one entry of ``K`` (no waste beyond
the ``g`` margin) and a stride-1 conv keeps the offset: ``K'[i, i'] = 1/f Σ_a K[i+a-lo, i'+a-lo]``
is a circular box filter of ``D`` along ``i`` (and ``j``) for every ``(δh, δw)`` independently.
Nonlinearities are pointwise given the per-image variance maps ``V1[i, j]`` and
``V2[(i + δh) mod L, (j + δw) mod L]``. So a tile of ``δh`` rows runs through every conv /
nonlinearity / Dense step of a segment on its own, from the input images (``D0 = x1·x2ᵀ / C``
per offset) to the readout, with memory ``O(tile · Lw · Lh · Lw)`` per pair instead of NT's
several ``O((HW)²)`` arrays per layer. The variance maps of every layer are computed once per
image from the ``δ = 0`` row only (``O(HW)`` per layer).

Only pooling couples offsets: a segment that ends in ``AvgPool``/``SumPool`` produces every
offset (tile by tile) and pools them in the packed layout (per axis, each output entry is a static
weighted sum of ``window²`` input entries: :func:`_pool_packed`, the math of
:func:`ntfast.ops.pool.pool_cov`) onto the next segment's grid; the next segment's variance maps
come from each image's own (self-pair) pooled covariance. Readouts: ``GAP``/``GSP`` sum every entry
(``mean``/``sum`` over ``(HW)²``), ``FLATTEN`` needs only ``δ = 0`` (``O(HW)`` per pair).

Op (registered backends implement exactly this signature; static arguments are keywords)::

    fused_cnn(x1, x2, *, plan, pairs, compute_ntk, tile=None, pair_block=None, backend=None)
        -> (nngp (P,), ntk (P,) or None)

``x1``, ``x2``: ``(M1, H, W, C)`` / ``(M2, H, W, C)`` NHWC images (``x2=None``: ``x2 = x1``);
``pairs``: static ``(ia, ib)`` index tuples (``P`` pairs, ``ia`` into ``x1``, ``ib`` into ``x2``);
``plan``: a tuple of the step dataclasses below ending in one :class:`Readout`.
``tile``: ``δh`` rows per tile (memory knob; ``None``: :func:`auto_tile`); ``pair_block``: pairs
evaluated together (``None``: automatic). The result does not depend on ``tile``/``pair_block``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntfast import backend as _backend
from ntfast.ops.conv import PADDINGS, axis_pads, padding_name, same_pads
from ntfast.ops.nonlin import nonlin
from ntfast.ops.pool import window_divisors


@dataclasses.dataclass(frozen=True)
class ConvStep:
    """Stride-1 shared-weight conv (``ntfast.stax.Conv``): ``K' = w·box(K) + b``; NTK param
    ``Θ' = w·box(Θ) + K'``, standard ``Θ' = ntk_scale·box(K) + w·box(Θ) [+ 1 if b]``."""

    filter_shape: tuple[int, int]
    padding: str
    w_var: float
    b_var: float | None
    ntk_scale: float | None = None  # None: NTK parameterization; else fan_in / s0 (standard)


@dataclasses.dataclass(frozen=True)
class DenseStep:
    """Channel-wise Dense (``ntfast.stax.Dense`` on the channel axis): pointwise affine map."""

    w_var: float
    b_var: float | None
    ntk_scale: float | None = None


@dataclasses.dataclass(frozen=True)
class NonlinStep:
    """Elementwise nonlinearity: ``ntfast.ops.nonlin.nonlin(kind, q12, q11, q22, ntk, **params)``."""

    kind: str
    params: tuple = ()  # sorted (name, value) items (hashable)


@dataclasses.dataclass(frozen=True)
class PoolStep:
    """``AvgPool``/``SumPool``: arguments of :func:`ntfast.ops.pool.pool_cov`."""

    window_shape: tuple[int, int]
    strides: tuple[int, int]
    padding: str
    pool_type: str
    normalize_edges: bool


@dataclasses.dataclass(frozen=True)
class Readout:
    """``"GAP"`` (mean of all ``(HW)²`` entries), ``"GSP"`` (sum), ``"FLATTEN"`` (diagonal mean)."""

    kind: str


READOUTS = ("GAP", "GSP", "FLATTEN")
Step = ConvStep | DenseStep | NonlinStep | PoolStep


# ----------------------------------------------------------------------------------------------
# Plan analysis (pure Python, static).


@dataclasses.dataclass(frozen=True)
class _Segment:
    steps: tuple  # ConvStep | DenseStep | NonlinStep
    end: PoolStep | Readout
    size_in: tuple[int, int]  # valid spatial size (H, W) entering the segment
    grid: tuple[int, int]  # periodic grid (Lh, Lw)
    sizes: tuple  # valid (H, W) after each step
    pads: tuple  # per conv step: ((lo_h, fh), (lo_w, fw)); None for other steps
    circular: bool  # CIRCULAR convs: the grid is the image (no zero margin), box filters wrap


def check_plan(plan) -> None:
    """ValueError unless ``plan`` is a tuple of steps ending in exactly one :class:`Readout`."""
    if not isinstance(plan, tuple) or not plan or not isinstance(plan[-1], Readout):
        raise ValueError(f"`plan` must be a tuple of steps ending in a Readout, got {plan!r}.")
    for s in plan[:-1]:
        if not isinstance(s, (ConvStep, DenseStep, NonlinStep, PoolStep)):
            raise TypeError(f"`plan` has an unsupported step {s!r}.")
    if plan[-1].kind not in READOUTS:
        raise ValueError(f"Readout kind must be one of {READOUTS}, got {plan[-1].kind!r}.")
    for s in plan:
        if isinstance(s, (ConvStep, PoolStep)) and padding_name(s.padding) not in PADDINGS:
            raise ValueError(f"unsupported padding in {s!r}.")


def _pool_out(size: int, window: int, stride: int, padding: str) -> int:
    if padding == "VALID":
        return (size - window) // stride + 1
    return -(-size // stride)


def segments(plan, size: tuple[int, int]) -> tuple[_Segment, ...]:
    """Splits ``plan`` at poolings; sizes, periodic grids and conv pads of each segment.

    Raises ValueError if a segment mixes CIRCULAR with other conv paddings (no common grid) or a
    VALID window empties the image.
    """
    check_plan(plan)
    out, steps, start = [], [], tuple(size)
    cur = tuple(size)
    for s in plan:
        if isinstance(s, (PoolStep, Readout)):
            out.append(_make_segment(tuple(steps), s, start))
            if isinstance(s, PoolStep):
                cur = out[-1].sizes[-1] if out[-1].sizes else start
                pad = padding_name(s.padding)
                cur = tuple(
                    _pool_out(cur[a], s.window_shape[a], s.strides[a], pad) for a in range(2)
                )
                if min(cur) < 1:
                    raise ValueError(f"pooling {s!r} leaves no spatial entries.")
                start, steps = cur, []
            continue
        steps.append(s)
    return tuple(out)


def _make_segment(steps, end, size_in) -> _Segment:
    paddings = {padding_name(s.padding) for s in steps if isinstance(s, ConvStep)}
    if "CIRCULAR" in paddings and len(paddings) > 1:
        raise ValueError("a fused segment cannot mix CIRCULAR with other conv paddings.")
    circular = paddings == {"CIRCULAR"}
    cur, sizes, pads, margin = list(size_in), [], [], [0, 0]
    for s in steps:
        if isinstance(s, ConvStep):
            p = padding_name(s.padding)
            pad = []
            for a in range(2):
                f = s.filter_shape[a]
                if p == "VALID":
                    lo = 0
                    cur[a] = cur[a] - f + 1
                    if cur[a] < 1:
                        raise ValueError(f"VALID conv {s!r} leaves no spatial entries.")
                else:
                    lo, hi = same_pads(cur[a], f, 1)
                    if not circular:
                        margin[a] = max(margin[a], lo, hi)
                pad.append((lo, f))
            pads.append(tuple(pad))
        else:
            pads.append(None)
        sizes.append(tuple(cur))
    if circular:
        # Periodic grid of exactly the image: index (i + a - lo) mod H is NT's wrap padding (also
        # for filters larger than the image, which wrap more than once).
        grid = tuple(size_in)
    else:
        grid = (size_in[0] + margin[0], size_in[1] + margin[1])
    return _Segment(tuple(steps), end, tuple(size_in), grid, tuple(sizes), tuple(pads), circular)


# ----------------------------------------------------------------------------------------------
# Packed-layout primitives for one pair. A tile holds the rows ``dh`` (``(t,)``, traced or static)
# and the columns ``dw`` (static numpy, all ``Lw`` offsets, or ``[0]`` for a Flatten readout); arrays
# are ``(t, Lh, len(dw), Lw)`` = ``[δh, i, δw, j]``: each ``(δw, j)`` block of a row ``(δh, i)`` is
# contiguous, so a partner lookup ``(i + δh) mod Lh`` moves whole blocks (no element gather).

# Spatial axes (i, j) of a tile, and of an ``(Lh, Lw)`` map.
_TILE_AXES = (1, 3)
_MAP_AXES = (0, 1)


def _box(d, axis: int, lo: int, f: int, circular: bool = True):
    """``out[i] = 1/f Σ_{a<f} d[(i + a - lo) mod L]`` along ``axis`` (circular box filter).

    A wrap pad then a ``reduce_window`` sum: XLA keeps the window sum as its own loop, where a
    sum of ``f`` rolled copies gets fused into the next step and recomputed per tap (measured 16x
    slower at depth 4 on a 7x33x33x33 tile).
    """
    if f == 1 and lo == 0:
        return d
    axis %= d.ndim
    widths = [(0, 0)] * d.ndim
    widths[axis] = (lo, f - 1 - lo)
    window = [1] * d.ndim
    window[axis] = f
    if circular:
        d, widths = jnp.pad(d, widths, mode="wrap"), [(0, 0)] * d.ndim
    # Non-circular grids: every wrapped read lands in the zero margin (or feeds a masked
    # output), so the window's own zero padding is the same sum without a padded copy.
    out = lax.reduce_window(d, np.zeros((), d.dtype), lax.add, window, (1,) * d.ndim, widths)
    return out * (1.0 / f)


def _rows(dh, lh):
    """``(t, Lh)`` partner rows ``(i + δh) mod Lh``."""
    return (dh[:, None] + jnp.arange(lh)[None, :]) % lh


def _cols(dw, lw):
    """``(len(dw), Lw)`` partner columns ``(j + δw) mod Lw`` (static)."""
    return (np.asarray(dw)[:, None] + np.arange(lw)[None, :]) % lw


def _valid_mask(dh, dw, grid, size, dtype):
    """1 where both positions of a packed entry lie in the valid ``size`` region, else 0."""
    (lh, lw), (hv, wv) = grid, size
    mh = (jnp.arange(lh)[None, :] < hv) & (_rows(dh, lh) < hv)  # (t, Lh)
    mw = (np.arange(lw)[None, :] < wv) & (_cols(dw, lw) < wv)  # (dw, Lw)
    return mh.astype(dtype)[:, :, None, None] * jnp.asarray(mw, dtype)[None, None, :, :]


def _skew(v, dw, grid):
    """Partner lookup table of a map ``v`` ``(Lh, Lw, ...)``: ``(2 Lh, len(dw), Lw, ...)`` with
    ``table[δh + i, δw, j] = v[(i + δh) mod Lh, (j + δw) mod Lw]`` (rows: :func:`_row_slices`).

    Built once per segment (``O(L³)``, outside the tile loop) without an element gather
    (XLA:CPU gathers cost ~2x a whole conv + nonlinearity step of a tile): the column shifts
    come from tiling each row ``Lw + 1`` times and reading it as ``(Lw, Lw + 1)`` (row ``δw``
    starts at ``(δw + j) mod Lw``); the row shifts are slices of the skew stacked twice.
    """
    lh, lw = grid
    reps = [1] * v.ndim
    reps[1] = lw + 1
    skew = jnp.tile(v, reps).reshape((lh, lw, lw + 1) + v.shape[2:])[:, :, :lw]
    if len(dw) != lw:
        skew = jnp.take(skew, np.asarray(dw), axis=1)
    return jnp.concatenate([skew, skew])


def _row_slices(x, dh, n):
    """``stack([x[δ : δ + n] for δ in dh])`` (``dh`` static or traced)."""
    return jnp.stack([lax.dynamic_slice_in_dim(x, dh[k], n, 0) for k in range(len(dh))])


def _pad_to(v, grid):
    """Pads the last two (spatial) axes of ``v`` with zeros up to ``grid``."""
    ph, pw = grid[0] - v.shape[-2], grid[1] - v.shape[-1]
    widths = [(0, 0)] * (v.ndim - 2) + [(0, ph), (0, pw)]
    return jnp.pad(v, widths)


def _region(grid, size, dtype):
    hv, wv = size
    mh = (np.arange(grid[0]) < hv)[:, None]
    mw = (np.arange(grid[1]) < wv)[None, :]
    return jnp.asarray(mh & mw, dtype)


def _conv_box(x, pad, circular, axes=_TILE_AXES):
    (lo_h, fh), (lo_w, fw) = pad
    return _box(_box(x, axes[0], lo_h, fh, circular), axes[1], lo_w, fw, circular)


def _affine(s, d, t, m):
    """Conv (after its box filter ``d``/``t``) or Dense step on a pair: new ``(nngp, ntk)``."""
    # Masked after every step: a box filter spreads valid entries into the zero margin, and the
    # biases must not fill it.
    nd = s.w_var * d
    if s.b_var is not None:
        nd = nd + s.b_var
    nd = nd * m
    if t is None:
        return nd, None
    if s.ntk_scale is None:
        return nd, nd + s.w_var * t * m
    nt = s.ntk_scale * d + s.w_var * t
    if s.b_var is not None:
        nt = nt + 1.0
    return nd, nt * m


def _run_steps(seg, d, t, dh, dw, var1, var2):
    """Runs the steps of ``seg`` on one pair's tile ``(nngp, ntk)``.

    ``var1``: per nonlinearity, the ``(Lh, Lw)`` variance map of the first image; ``var2``: the
    second image's, as partner tables (:func:`_skew`).
    """
    k = 0
    for s, size, pad in zip(seg.steps, seg.sizes, seg.pads):
        m = _valid_mask(dh, dw, seg.grid, size, d.dtype)
        if isinstance(s, ConvStep):
            # A 0-d ``t`` is the input layer's zero NTK: its box filter is zero too (and a
            # full zeros array would be constant-folded through the window sums at compile time).
            tc = t if t is None or t.ndim == 0 else _conv_box(t, pad, seg.circular)
            d, t = _affine(s, _conv_box(d, pad, seg.circular), tc, m)
        elif isinstance(s, DenseStep):
            d, t = _affine(s, d, t, m)
        else:
            q11 = var1[k][None, :, None, :]
            q22 = _row_slices(var2[k], dh, seg.grid[0])
            d, t = nonlin(s.kind, d, q11, q22, t, **dict(s.params))
            d = d * m
            t = None if t is None else t * m
            k += 1
        # One materialized tile per step (cache-sized): otherwise XLA fuses the next conv's f
        # shifted reads into this step and recomputes it per tap, compounding with depth.
        d, t = lax.optimization_barrier((d, t))
    return d, t


def _variance_chain(seg, v0):
    """Variance maps entering each nonlinearity of ``seg`` for one image (``δ = 0`` only).

    ``v0``: ``(Lh, Lw)`` diagonal ``K[i, i, j, j]`` of the image's own segment input (0 outside
    the valid region). Returns the maps, 1 outside the valid region (NaN-safe, masked later).
    """
    out, v, size = [], v0, seg.size_in
    for s, size_next, pad in zip(seg.steps, seg.sizes, seg.pads):
        if isinstance(s, ConvStep):
            v = s.w_var * _conv_box(v, pad, seg.circular, _MAP_AXES)
            v = v + (0.0 if s.b_var is None else s.b_var)
        elif isinstance(s, DenseStep):
            v = s.w_var * v + (0.0 if s.b_var is None else s.b_var)
        else:
            r = _region(seg.grid, size, v.dtype)
            vf = v * r + (1 - r)
            out.append(vf)
            v = nonlin(s.kind, vf, vf, vf, **dict(s.params))[0]
        size = size_next
        v = v * _region(seg.grid, size, v.dtype)
    return out


def _images_tile(x1p, x2s, dh, lh):
    """``D0[t, i, δw, j] = Σ_c x1[i, j, c]·x2[(i+δh) mod L, (j+δw) mod L, c] / C``.

    ``x1p``: ``(Lh, Lw, C)``; ``x2s``: ``(C, 2 Lh, len(dw), Lw)`` per-channel partner tables.
    """
    n_c = x1p.shape[-1]

    def term(c):
        x1c = lax.dynamic_index_in_dim(x1p, c, -1, keepdims=False)
        x2c = lax.dynamic_index_in_dim(x2s, c, 0, keepdims=False)
        return x1c[None, :, None, :] * _row_slices(x2c, dh, lh)

    # Channel by channel: a product then a sum over a minor axis of size C costs 4-7x more
    # (measured 0.78 vs 0.21 ms for a 7x33x33x33 tile of RGB images).
    if n_c <= _UNROLL_CHANNELS:
        out = term(0)
        for c in range(1, n_c):
            out = out + term(c)
    else:
        out = lax.fori_loop(1, n_c, lambda c, acc: acc + term(c), term(0))
    return out / n_c


def _packed_rows(x, dh, dw):
    """Rows ``dh`` and columns ``dw`` of a whole packed ``(Lh, Lh, Lw, Lw)`` array."""
    x = _row_slices(x, dh, 1)[:, 0]
    return x if len(dw) == x.shape[2] else jnp.take(x, np.asarray(dw), axis=2)


def _pool_axis_table(grid_in, size_in, grid_out, size_out, p, s, padding, normalize, pool_sum):
    """Static gather table of one axis of a pooling in packed layout.

    Output ``B[δ', I] = Σ_k coef[δ', I, k]·A[row[δ', I, k]]`` over the flattened input pairs
    ``row = δ·L + i``: for ``J = (I + δ') mod L'`` in the valid region, the ``p²`` taps
    ``K[s·I + a − lo, s·J + a' − lo] / (d(I)·d(J))`` (zero taps for SAME padding outside the
    axis; CIRCULAR wraps mod the valid size) read at ``δ = (v − u) mod L``, ``i = u``.
    """
    lo, _ = axis_pads(size_in, p, s, padding)
    div = (
        np.ones(size_out)
        if pool_sum
        else window_divisors(size_in, p, s, padding, normalize)[:size_out]
    )
    dlt, big_i = np.meshgrid(np.arange(grid_out), np.arange(grid_out), indexing="ij")
    big_j = (big_i + dlt) % grid_out
    ok = (big_i < size_out) & (big_j < size_out)
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    u = s * big_i[..., None] + a.reshape(-1) - lo  # (L', L', p²)
    v = s * big_j[..., None] + b.reshape(-1) - lo
    if padding == "CIRCULAR":
        u, v = u % size_in, v % size_in
        inside = np.ones(u.shape, bool)
    else:
        inside = (u >= 0) & (u < size_in) & (v >= 0) & (v < size_in)
    keep = ok[..., None] & inside
    bi = np.minimum(big_i, size_out - 1)
    bj = np.minimum(big_j, size_out - 1)
    coef = np.where(keep, 1.0 / (div[bi] * div[bj])[..., None], 0.0)
    u, v = np.where(keep, u, 0), np.where(keep, v, 0)
    rows = ((v - u) % grid_in) * grid_in + u
    return rows.reshape(grid_out * grid_out, p * p), coef.reshape(grid_out * grid_out, p * p)


def _pool_packed(seg, nxt, x):
    """Pools a segment's whole packed output ``x`` ``(Lh, Lh, Lw, Lw)`` onto ``nxt``'s grid.

    Separable: the h axis gathers whole ``(δw, j)`` blocks (``window`` taps per output pair of
    rows), then the w axis gathers within the (smaller) result.
    """
    p = seg.end
    pad = padding_name(p.padding)
    size = seg.sizes[-1] if seg.sizes else seg.size_in
    (lh, lw), (oh, ow) = seg.grid, nxt.grid
    tables = [
        _pool_axis_table(
            seg.grid[a],
            size[a],
            nxt.grid[a],
            nxt.size_in[a],
            p.window_shape[a],
            p.strides[a],
            pad,
            p.normalize_edges,
            p.pool_type == "SUM",
        )
        for a in range(2)
    ]
    (rh, ch), (rw, cw) = tables
    x = x.reshape(lh * lh, lw * lw)
    y = jnp.take(x, rh.reshape(-1), axis=0).reshape(rh.shape + (lw * lw,))
    y = jnp.einsum("rk,rkc->rc", jnp.asarray(ch, x.dtype), y)  # (oh², lw²)
    y = jnp.take(y, rw.reshape(-1), axis=1).reshape((oh * oh,) + rw.shape)
    y = jnp.sum(y * jnp.asarray(cw, x.dtype), -1)
    return y.reshape(oh, oh, ow, ow)


# ----------------------------------------------------------------------------------------------
# Tiling.

# Working set of one tile, in entries per array: ~1 MiB of f32 keeps a step's operands in the L2
# cache of a CPU core (bench/bench_fused.py measures the effect).
_TILE_ENTRIES = 1 << 18
# Segments ending in a pooling with at most this many tiles unroll their tile loop.
_UNROLL_MAX = 8
# Input channels summed in an unrolled loop (more: a fori_loop).
_UNROLL_CHANNELS = 16
# Live arrays of one tile at the peak of a step (operands, f conv taps, nonlinearity terms).
_LIVE_ARRAYS = 40


def memory_budget() -> int:
    """Bytes the fused path may use for tiles: ``NTFAST_FUSED_MEMORY`` or 1/4 of physical memory."""
    env = os.environ.get("NTFAST_FUSED_MEMORY")
    if env:
        try:
            value = int(float(env))
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(
                f"NTFAST_FUSED_MEMORY must be a positive number of bytes, got {env!r}."
            )
        return value
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def auto_tile(grid: tuple[int, int], itemsize: int = 4, memory_bytes: int | None = None) -> int:
    """``δh`` rows per tile: about ``_TILE_ENTRIES`` entries, within ``memory_bytes`` for the
    ``_LIVE_ARRAYS`` live arrays of a tile (never less than one row)."""
    lh, lw = grid
    row = lw * lh * lw
    budget = memory_budget() if memory_bytes is None else memory_bytes
    cap = max(1, int(budget // (_LIVE_ARRAYS * itemsize * row)))
    return max(1, min(lh, cap, _TILE_ENTRIES // row or 1))


def _tiles(lh: int, tile: int):
    """``(n_tiles, tile)`` row indices covering ``0..lh-1`` (padding rows repeat the last one)
    and their weights (0 for padding rows)."""
    n = -(-lh // tile)
    rows = np.arange(n * tile)
    return np.minimum(rows, lh - 1).reshape(n, tile), (rows < lh).reshape(n, tile)


# ----------------------------------------------------------------------------------------------
# One pair through the whole plan.


def _cone(n: int, radius: tuple) -> np.ndarray:
    """Packed offsets ``-r … r`` (mod ``n``) of a radius ``r`` (all of them if ``2r + 1 >= n``)."""
    (r,) = radius
    if 2 * r + 1 >= n:
        return np.arange(n)
    return np.concatenate([np.arange(r + 1), np.arange(n - r, n)])


def _segment_run(seg, src, var1, var2, compute_ntk: bool, tile: int, radius=None, nxt=None):
    """One pair through one segment, tile by tile.

    ``src``: ``("images", x1p, x2p)`` (``(Lh, Lw, C)`` zero-padded images) or ``("packed", dn, dt)``
    (the previous segment's pooled packed arrays on this grid). Returns the readout scalars
    ``(nngp, ntk)`` or the packed arrays pooled onto the next segment ``nxt``'s grid (``ntk``
    None if not computed).
    ``radius=(rh, rw)``: only offsets ``|δh| <= rh``, ``|δw| <= rw`` are computed (whole packed
    rows and columns, so exactly); the others are left 0 — for a pooling segment whose output is
    only read near the diagonal (:func:`_variance_radii`).
    """
    lh, lw = seg.grid
    readout = seg.end if isinstance(seg.end, Readout) else None
    if radius is not None:
        if readout is not None:
            raise ValueError("`radius` applies to segments that end in a pooling.")
        rows_h, dw = _cone(lh, radius[:1]), _cone(lw, radius[1:])
        src, var2 = _tables(seg, src, var2, dw)
        d, t = _run_rows(seg, src, var1, var2, compute_ntk, rows_h, dw)
        zeros = jnp.zeros((lh, lh, lw, lw), d.dtype)
        # Advanced indices split by a slice: their (t, dw) axes come first in the value.
        at = (rows_h[:, None], slice(None), dw[None, :])
        d = zeros.at[at].set(d.transpose(0, 2, 1, 3))
        t = None if t is None else zeros.at[at].set(t.transpose(0, 2, 1, 3))
        return _pool_packed(seg, nxt, d), None if t is None else _pool_packed(seg, nxt, t)
    if readout is not None and readout.kind == "FLATTEN":
        # Flatten reads the spatial diagonal only: the δ = 0 row and column suffice.
        dw = np.zeros(1, np.int32)
        rows, weights = np.zeros((1, 1), np.int32), np.ones((1, 1), bool)
    else:
        dw = np.arange(lw)
        rows, weights = _tiles(lh, tile)
    src, var2 = _tables(seg, src, var2, dw)

    def tile_fn(args):
        dh, w = args
        d, t = _run_rows(seg, src, var1, var2, compute_ntk, dh, dw)
        if readout is None:
            return d, t
        w = w.astype(d.dtype)[:, None, None, None]
        return jnp.sum(d * w), None if t is None else jnp.sum(t * w)

    if readout is None and len(rows) <= _UNROLL_MAX:
        # Every offset is needed: a static loop writes each tile once, where lax.map's stacked
        # outputs cost more than the tiles' work (measured 13 ms for 5 tiles of 7x33x33x33 f32).
        outs = [tile_fn((r, w)) for r, w in zip(rows, weights)]
        d = jnp.stack([o[0] for o in outs])
        t = None if outs[0][1] is None else jnp.stack([o[1] for o in outs])
    else:
        d, t = lax.map(tile_fn, (jnp.asarray(rows), jnp.asarray(weights)))
    if readout is not None:
        d = jnp.sum(d)
        t = None if t is None else jnp.sum(t)
        hv, wv = seg.sizes[-1] if seg.sizes else seg.size_in
        scale = {"GAP": 1.0 / (hv * wv) ** 2, "GSP": 1.0, "FLATTEN": 1.0 / (hv * wv)}[readout.kind]
        return d * scale, None if t is None else t * scale

    # Row-major copy behind a barrier (as ops.layout.materialized_transpose): otherwise the
    # pooling gather's preferred layout propagates back into every tile's computation.
    d, t = (None if a is None else _stacked(a, lh) for a in (d, t))
    return _pool_packed(seg, nxt, d), None if t is None else _pool_packed(seg, nxt, t)


def _stacked(x, lh):
    """Stacked tiles ``(n, t, Lh, Lw, Lw)`` as the whole packed ``(Lh, Lh, Lw, Lw)`` array."""
    x = lax.optimization_barrier(x.reshape(-1)).reshape((-1,) + x.shape[2:])
    return x[:lh]


def _tables(seg, src, var2, dw):
    """The second image's partner tables for columns ``dw`` (:func:`_skew`), once per segment."""
    var2 = [_skew(v, dw, seg.grid) for v in var2]
    if src[0] == "images":
        src = ("images", src[1], jnp.moveaxis(_skew(src[2], dw, seg.grid), -1, 0))
    return src, var2


def _run_rows(seg, src, var1, var2, compute_ntk, dh, dw):
    """The segment's steps on the packed rows ``dh`` and columns ``dw`` (static) of one pair
    (``src``/``var2`` with partner tables from :func:`_tables`)."""
    dh = jnp.asarray(dh)
    if src[0] == "images":
        d = _images_tile(src[1], src[2], dh, seg.grid[0])
        t = jnp.zeros((), d.dtype) if compute_ntk else None
    else:
        d = _packed_rows(src[1], dh, dw)
        t = _packed_rows(src[2], dh, dw) if compute_ntk else None
    d, t = _run_steps(seg, d, t, dh, dw, var1, var2)
    if t is not None and t.ndim == 0:
        t = jnp.zeros_like(d)  # no conv in the segment: the input layer's zero NTK, as a tile
    return d, t


def _image_variance(x, grid):
    """``(Lh, Lw)`` input variance map ``Σ_c x² / C`` of one ``(H, W, C)`` image, 0-padded."""
    return _pad_to(jnp.sum(x * x, -1) / x.shape[-1], grid)


def _variance_radii(segs) -> list:
    """Per segment, the offsets ``(rh, rw)`` of an image's self pair that the variance maps of
    the later segments read, when the self pair's own kernel value is not needed.

    A segment's maps need only the ``δ = 0`` entries of its input; a ``window × stride`` pooling
    reads input offsets ``stride·δ' − (window − 1) … stride·δ' + (window − 1)`` for output
    offset ``δ'`` (convs keep offsets). Segments after the last nonlinearity need nothing.
    Returns ``None`` for segments not to run.
    """
    has_nl = [any(isinstance(st, NonlinStep) for st in seg.steps) for seg in segs]
    last = max((i for i, h in enumerate(has_nl) if h), default=0)
    radii = [None] * len(segs)
    need = (0, 0)  # radius read at the input of segment s + 1
    for s in range(last - 1, -1, -1):
        p = segs[s].end
        need = tuple(p.strides[a] * need[a] + p.window_shape[a] - 1 for a in range(2))
        radii[s] = need
    return radii


def _self_pair(segs, x, compute_ntk, tiles, values: bool = True):
    """One image with itself through every segment.

    Returns ``((nngp, ntk), maps)``: the readout values (None if not ``values``) and, per
    segment, the variance maps of its nonlinearities (what every pair with this image needs).
    Without ``values`` only the offsets those maps depend on are computed (:func:`_variance_radii`).
    """
    maps = []
    xp = _pad_image(x, segs[0].grid)
    src = ("images", xp, xp)
    v0 = _image_variance(x, segs[0].grid)
    radii = None if values else _variance_radii(segs)
    out = (None, None)
    for s, seg in enumerate(segs):
        if s:
            v0 = src[1][0, :, 0, :]  # δ = 0: K[i, i, j, j] on the grid, 0 outside the image
        vars_ = _variance_chain(seg, v0)
        maps.append(vars_)
        nxt = segs[s + 1] if s + 1 < len(segs) else None
        if values:
            out = _segment_run(seg, src, vars_, vars_, compute_ntk, tiles[s], nxt=nxt)
        elif radii[s] is not None:
            out = _segment_run(
                seg, src, vars_, vars_, compute_ntk, tiles[s], radius=radii[s], nxt=nxt
            )
        else:
            maps.extend([] for _ in segs[s + 1 :])
            break
        src = ("packed", *out)
    return out, maps


def _cross_pair(segs, x1, x2, maps1, maps2, compute_ntk, tiles):
    """One pair of distinct images through every segment, given both images' variance maps."""
    src = ("images", _pad_image(x1, segs[0].grid), _pad_image(x2, segs[0].grid))
    for s, seg in enumerate(segs):
        nxt = segs[s + 1] if s + 1 < len(segs) else None
        out = _segment_run(seg, src, maps1[s], maps2[s], compute_ntk, tiles[s], nxt=nxt)
        src = ("packed", *out)
    return out


def _pad_image(x, grid):
    """``(H, W, C)`` image zero-padded to ``(Lh, Lw, C)``."""
    return jnp.pad(x, ((0, grid[0] - x.shape[0]), (0, grid[1] - x.shape[1]), (0, 0)))


# ----------------------------------------------------------------------------------------------
# The op.


def _block(n_items: int, entries_per_item: int, pair_block: int | None) -> int:
    if pair_block is not None:
        return max(1, min(int(pair_block), max(n_items, 1)))
    return max(1, min(max(n_items, 1), _TILE_ENTRIES // max(entries_per_item, 1)))


@_backend.register("fused_cnn", "xla")
def fused_cnn_reference(
    x1,
    x2=None,
    *,
    plan,
    compute_ntk: bool = True,
    compute_cov: bool = True,
    tile: int | None = None,
    pair_block: int | None = None,
):
    """Pure-XLA reference of :func:`fused_cnn` (the definition); traceable, not jitted."""
    segs = segments(plan, tuple(x1.shape[1:3]))
    itemsize = jnp.dtype(x1.dtype).itemsize
    tiles = [tile or auto_tile(seg.grid, itemsize) for seg in segs]
    sym = x2 is None
    n1 = x1.shape[0]
    xs = x1 if sym else jnp.concatenate([x1, x2])
    # Entries of one pair's tile in the largest segment: sets how many pairs run together.
    work = max(
        (1 if isinstance(s.end, Readout) and s.end.kind == "FLATTEN" else t * s.grid[1])
        * s.grid[0]
        * s.grid[1]
        for s, t in zip(segs, tiles)
    )
    block = _block(xs.shape[0], work, pair_block)

    need_self = sym or compute_cov or len(segs) > 1
    if need_self:
        # Self pairs whose kernel values nobody reads only feed later segments' variance maps.
        values = sym or compute_cov
        (self_nngp, self_ntk), maps = lax.map(
            lambda x: _self_pair(segs, x, compute_ntk and values, tiles, values),
            xs,
            batch_size=block,
        )
    else:
        maps = [jax.vmap(lambda x: _variance_chain(segs[0], _image_variance(x, segs[0].grid)))(xs)]
        self_nngp = self_ntk = None

    ia, ib = cross_pairs(n1, None if sym else x2.shape[0])
    if ia.size:

        def pair(ab):
            a, b = ab
            pick = lambda m, i: jax.tree_util.tree_map(lambda v: v[i], m)
            return _cross_pair(segs, xs[a], xs[b], pick(maps, a), pick(maps, b), compute_ntk, tiles)

        cross_nngp, cross_ntk = lax.map(
            pair, (jnp.asarray(ia), jnp.asarray(ib)), batch_size=_block(ia.size, work, pair_block)
        )
    else:
        cross_nngp = jnp.zeros((0,), x1.dtype)
        cross_ntk = jnp.zeros((0,), x1.dtype) if compute_ntk else None

    return assemble(
        (cross_nngp, cross_ntk),
        (self_nngp, self_ntk),
        n1,
        None if sym else x2.shape[0],
        compute_cov,
    )


def cross_pairs(n1: int, n2: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Static ``(ia, ib)`` indices of the cross pairs into ``concatenate([x1, x2])``: for
    ``n2=None`` (``x2 = x1``) the strict upper triangle, else all ``n1 × n2`` pairs."""
    if n2 is None:
        return np.triu_indices(n1, k=1)
    return np.repeat(np.arange(n1), n2), n1 + np.tile(np.arange(n2), n1)


def assemble(cross, own, n1: int, n2: int | None, compute_cov: bool):
    """``(nngp, ntk, cov1, cov2)`` of the op from the cross-pair values ``cross = (nngp, ntk)``
    (ordered as :func:`cross_pairs`) and the self-pair values ``own = (nngp, ntk)`` of
    ``concatenate([x1, x2])`` (None entries where not computed)."""
    ia, ib = cross_pairs(n1, n2)

    def matrix(c, diag):
        if c is None:
            return None
        if n2 is not None:
            return c.reshape(n1, n2)
        out = jnp.zeros((n1, n1), c.dtype)
        out = out.at[ia, ib].set(c).at[ib, ia].set(c)
        return out.at[np.arange(n1), np.arange(n1)].set(diag)

    nngp, ntk = (matrix(c, d) for c, d in zip(cross, own))
    cov1 = cov2 = None
    if compute_cov:
        cov1 = own[0][:n1]
        cov2 = None if n2 is None else own[0][n1:]
    return nngp, ntk, cov1, cov2


def backend_query(plan, dtype, size) -> dict:
    """Static request a backend's ``fused_cnn.unsupported_reason(plan=, dtype=, size=)`` judges
    (``size``: the images' spatial ``(H, W)``)."""
    return {"plan": plan, "dtype": np.dtype(dtype).name, "size": tuple(int(v) for v in size)}


def fused_cnn(
    x1,
    x2=None,
    *,
    plan,
    compute_ntk: bool = True,
    compute_cov: bool = True,
    tile: int | None = None,
    pair_block: int | None = None,
    backend: str | None = None,
):
    """NNGP (and NTK) of the conv network ``plan`` between NHWC images, fused per offset tile.

    Args:
      x1: ``(N1, H, W, C)`` images. x2: ``(N2, H, W, C)`` or ``None`` (``x2 = x1``: only the
        upper triangle of pairs is evaluated and mirrored).
      plan: tuple of :class:`ConvStep` / :class:`DenseStep` / :class:`NonlinStep` /
        :class:`PoolStep` ending in one :class:`Readout` (``ntfast.stax.serial`` builds it).
      compute_ntk: also propagate the NTK.
      compute_cov: also return each image's own kernel value (``cov1``/``cov2``).
      tile: ``δh`` rows per tile (memory knob); ``None`` picks :func:`auto_tile`.
      pair_block: pairs evaluated together (``None``: automatic).

    Returns:
      ``(nngp, ntk, cov1, cov2)``: ``(N1, N2)``, ``(N1, N2)`` or None, ``(N1,)`` or None,
      ``(N2,)`` or None (None when ``x2`` is None or ``compute_cov`` is False).
    """
    check_plan(plan)
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"`{name}` must be (N, H, W, C) images, got shape {np.shape(x)}.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"`{name}` must be a real floating array, got dtype {x.dtype}.")
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise ValueError(
            f"`x1` and `x2` must have the same image shape, got {x1.shape[1:]} and {x2.shape[1:]}."
        )
    if tile is not None and (not isinstance(tile, int) or isinstance(tile, bool) or tile < 1):
        raise ValueError(f"`tile` must be a positive int or None, got {tile!r}.")
    if pair_block is not None and (
        not isinstance(pair_block, int) or isinstance(pair_block, bool) or pair_block < 1
    ):
        raise ValueError(f"`pair_block` must be a positive int or None, got {pair_block!r}.")
    query = backend_query(plan, x1.dtype, x1.shape[1:3])
    return _backend.dispatch("fused_cnn", backend, query)(
        x1,
        x2,
        plan=plan,
        compute_ntk=bool(compute_ntk),
        compute_cov=bool(compute_cov),
        tile=tile,
        pair_block=pair_block,
    )
