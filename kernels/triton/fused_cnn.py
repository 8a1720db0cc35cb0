"""Triton kernel of the ``fused_cnn`` op: one segment of a conv network, per pair × offset tile.

The math is the XLA reference's (``ntfast/ops/fused_cnn.py``, DESIGN.md §2). For one pair of
images ``(a, b)`` and one packed offset ``(δh, δw)`` the plane

    P[i, j] = K[i, (i + δh) mod Lh, j, (j + δw) mod Lw]        i < Lh, j < Lw

of a stride-1 conv stack goes through every step of a segment independently of the other
offsets, so a program keeps its planes on chip from the segment's source to its end:

- source: the images, ``P0[i, j] = Σ_c x[a, i, j, c] · x[b, (i+δh) mod Lh, (j+δw) mod Lw, c] / C``
  (zero outside the ``H × W`` image: the grid's zero margin), or the packed input of the previous
  (pooled) segment (``packed``), both in the reference's whole packed layout
  ``[δh, i, δw, j]``;
- ConvStep: circular box filters along ``i`` and ``j`` (``out[r] = 1/f Σ_{a<f} in[(r + a − lo)
  mod L]``; without CIRCULAR the window's own zero padding, no wrap) as two ``tl.dot`` with
  band matrices built from iota comparisons, then the affine map; DenseStep: the affine map;
  NonlinStep: the Gaussian expectation of ``kernels/triton/nonlin.py`` with ``q11 = V1[i, j]``,
  ``q22 = V2[(i+δh) mod Lh, (j+δw) mod Lw]`` from per-image variance maps. Every step ends by
  zeroing the entries whose two positions are not both in the valid region (as the reference);
- end: readout partial sums (GAP/GSP/FLATTEN; the launcher scales) or the full packed planes
  (``planes``: the launcher pools them in XLA).

Block: a program owns ``BT`` consecutive packed offsets (flattened ``δh·n_dw + δw``, tile
``pid(1)``) of pair ``pid(0)``, held as ``[BH, BT, BW] = [i, offset, j]``: the ``i`` box is
``band_h @ X`` viewed ``(BH, BT·BW)`` and the ``j`` box ``X @ band_wᵀ`` viewed ``(BH·BT, BW)``,
both plain 2-D dots (``BH, BW >= 16``; f32 with ``input_precision="ieee"``, never TF32; f64 with
an f64 accumulator).

Steps come from an int32 table and a float table (``ntfast/_triton/fused_cnn.py`` builds them
from ``ntfast.ops.fused_table.encode``) and are looped over at run time, and the source kind,
the end kind and the NTK flag are table entries too (uniform branches), so only the dtype and the
block shape specialize the kernel: six compiled variants serve every plan and image size.

Int table (``tab``)::

    [0:HEADER]  Lh, Lw, H, W, C, circular, n_steps, K, hv_out, wv_out, n_dw, n_dh,
                packed, planes, has_ntk, 0
    then per step (STEP_INTS): type, hv, wv, lo_h, fh, lo_w, fw, has_b, standard, nonlin, kmap, 0

``K``: variance maps per image (``kmap``: the map of a nonlinearity step); ``n_dh × n_dw``: the
offsets computed (``Lh × Lw``; ``1 × 1`` for a Flatten readout, which needs only ``δ = 0``).
Float table (``flt``, the data's dtype), per step (STEP_FLOATS): ``w_var, b_var (0 if none),
ntk_scale (0: NTK parameterization), 1/fh, 1/fw``, then the nonlinearity's 5 constants
(``nonlin.KIND_PARAMS``).
"""

import triton
import triton.language as tl

from ._math import div
from .nonlin import _expectation

HEADER = 16
STEP_INTS = 12
STEP_FLOATS = 10
#: Step types (``ntfast.ops.fused_table.STEP_*``) and nonlinearity codes (``NONLIN_*``).
STEP_CONV, STEP_DENSE, STEP_NONLIN = 0, 1, 2
NONLIN_ABRELU, NONLIN_ERF, NONLIN_GELU = 0, 1, 2
#: The ``KIND`` of ``nonlin._expectation`` for each nonlinearity code.
EXPECTATION_KIND = {NONLIN_ABRELU: 0, NONLIN_ERF: 2, NONLIN_GELU: 3}

_HDR = tl.constexpr(HEADER)
_SI = tl.constexpr(STEP_INTS)
_SF = tl.constexpr(STEP_FLOATS)
_CONV = tl.constexpr(STEP_CONV)
_NONLIN = tl.constexpr(STEP_NONLIN)
_ABRELU = tl.constexpr(NONLIN_ABRELU)
_ERF = tl.constexpr(NONLIN_ERF)
_KIND_ABRELU = tl.constexpr(0)
_KIND_ERF = tl.constexpr(2)
_KIND_GELU = tl.constexpr(3)


@triton.jit
def _total(x):
    """Sum of every entry of ``x``: ``tl.sum``'s own reduction. (``tl.sum`` itself is not reliably
    callable from the interpreter copy in a process that also compiles kernels; its combine
    function is, and the interpreter reduces with numpy when it sees it, not entry by entry.)"""
    return tl.reduce(tl.reshape(x, (x.numel,)), 0, tl.standard._sum_combine)


@triton.jit
def _band(out_idx, in_idx, lo, f, size, circ):
    """Integer weight of input ``in_idx`` in output ``out_idx`` of a length-``f`` box filter with
    low padding ``lo`` on an axis of ``size``: the taps ``a < f`` with ``in = out + a − lo``
    (``circ != 0``: modulo ``size``, counting every wrap; else only in range). 0 off the axis."""
    k = in_idx - out_idx + lo
    kc = k % size
    kc = tl.where(kc < 0, kc + size, kc)
    wrapped = tl.where(kc < f, (f - 1 - kc) // size + 1, 0)
    flat = tl.where((k >= 0) & (k < f), 1, 0)
    w = tl.where(circ != 0, wrapped, flat)
    return tl.where((out_idx < size) & (in_idx < size), w, 0)


@triton.jit
def _box_rows(x, lo, f, size, circ, inv, BH: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr):
    """``out[r, :, :] = inv · Σ_c band(r, c) x[c, :, :]``: the box filter along ``i``."""
    band = _band(tl.arange(0, BH)[:, None], tl.arange(0, BH)[None, :], lo, f, size, circ)
    y = tl.dot(
        band.to(x.dtype), tl.reshape(x, (BH, BT * BW)), input_precision="ieee", out_dtype=x.dtype
    )
    return tl.reshape(y, (BH, BT, BW)) * inv


@triton.jit
def _box_cols(x, lo, f, size, circ, inv, BH: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr):
    """``out[:, :, r] = inv · Σ_c x[:, :, c] band(r, c)``: the box filter along ``j``."""
    band_t = _band(tl.arange(0, BW)[None, :], tl.arange(0, BW)[:, None], lo, f, size, circ)
    y = tl.dot(
        tl.reshape(x, (BH * BT, BW)), band_t.to(x.dtype), input_precision="ieee", out_dtype=x.dtype
    )
    return tl.reshape(y, (BH, BT, BW)) * inv


@triton.jit
def _box2(
    x,
    lo_h,
    fh,
    lh,
    lo_w,
    fw,
    lw,
    circ,
    inv_h,
    inv_w,
    BH: tl.constexpr,
    BT: tl.constexpr,
    BW: tl.constexpr,
):
    """The 2-D box filter of a conv step (rows, then columns), for the NNGP and the NTK plane."""
    return _box_cols(
        _box_rows(x, lo_h, fh, lh, circ, inv_h, BH, BT, BW), lo_w, fw, lw, circ, inv_w, BH, BT, BW
    )


@triton.jit
def fused_cnn_kernel(
    img_ptr,  # (M, H, W, C) f32|f64 NHWC images (packed source: unused)
    srcn_ptr,  # (B, Lh, Lh, Lw, Lw) f32|f64 packed input NNGP [pair, δh, i, δw, j] (packed only)
    srct_ptr,  # (B, Lh, Lh, Lw, Lw) f32|f64 packed input NTK (packed source with NTK only)
    ia_ptr,  # (B,) int32 image of side 1 of each pair (row of img)
    ib_ptr,  # (B,) int32 image of side 2
    va_ptr,  # (B,) int32 variance-map row of side 1 (row of var)
    vb_ptr,  # (B,) int32 variance-map row of side 2
    var_ptr,  # (V, K, Lh, Lw) f32|f64 variance maps entering each nonlinearity (1 off-image)
    tab_ptr,  # (HEADER + n_steps·STEP_INTS,) int32 segment table
    flt_ptr,  # (n_steps·STEP_FLOATS,) f32|f64 step constants
    outn_ptr,  # planes: (B, Lh, Lh, Lw, Lw) packed NNGP; else (B, n_tiles) partial sums
    outt_ptr,  # the same for the NTK (has_ntk), else (1,) unused
    BH: tl.constexpr,
    BT: tl.constexpr,
    BW: tl.constexpr,
):
    """One segment for pair ``pid(0)`` and the ``BT`` packed offsets of tile ``pid(1)``: source →
    steps → readout partial sums or packed planes (see module doc)."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    lh = tl.load(tab_ptr + 0)
    lw = tl.load(tab_ptr + 1)
    circ = tl.load(tab_ptr + 5)
    n_steps = tl.load(tab_ptr + 6)
    n_maps = tl.load(tab_ptr + 7)
    n_dw = tl.load(tab_ptr + 10)
    n_off = tl.load(tab_ptr + 11) * n_dw
    packed = tl.load(tab_ptr + 12)
    planes = tl.load(tab_ptr + 13)
    has_ntk = tl.load(tab_ptr + 14)
    dtype = var_ptr.dtype.element_ty

    i = tl.arange(0, BH)[:, None, None]
    off = tile * BT + tl.arange(0, BT)[None, :, None]  # flattened offset (δh, δw)
    dh = off // n_dw
    dw = off - dh * n_dw
    j = tl.arange(0, BW)[None, None, :]
    ip = (i + dh) % lh  # partner row (i < lh: in range)
    jp = (j + dw) % lw
    on_grid = (i < lh) & (j < lw) & (off < n_off)
    plane = lh * lw
    packed_off = ((dh * lh + i) * lw + dw) * lw + j  # whole packed layout [δh, i, δw, j]

    # Source.
    t = tl.full((BH, BT, BW), 0.0, dtype)  # the input layer's NTK is 0
    if packed != 0:
        base = b.to(tl.int64) * (plane * plane)
        d = tl.load(srcn_ptr + base + packed_off, mask=on_grid, other=0.0)
        if has_ntk != 0:
            t = tl.load(srct_ptr + base + packed_off, mask=on_grid, other=0.0)
    else:
        h = tl.load(tab_ptr + 2)
        w = tl.load(tab_ptr + 3)
        nc = tl.load(tab_ptr + 4)
        img = h * w * nc
        base1 = tl.load(ia_ptr + b).to(tl.int64) * img
        base2 = tl.load(ib_ptr + b).to(tl.int64) * img
        ok1 = (i < h) & (j < w)
        ok2 = (ip < h) & (jp < w) & on_grid
        off1 = (i * w + j) * nc
        off2 = (ip * w + jp) * nc
        acc = tl.full((BH, BT, BW), 0.0, dtype)
        for c in range(nc):
            u = tl.load(img_ptr + base1 + off1 + c, mask=ok1, other=0.0)
            v = tl.load(img_ptr + base2 + off2 + c, mask=ok2, other=0.0)
            acc += u * v
        d = div(acc, tl.full((BH, BT, BW), 0.0, dtype) + nc.to(dtype))

    # Steps.
    row1 = tl.load(va_ptr + b)
    row2 = tl.load(vb_ptr + b)
    map1 = var_ptr + row1.to(tl.int64) * n_maps * plane + i * lw + j
    map2 = var_ptr + row2.to(tl.int64) * n_maps * plane + ip * lw + jp
    # An image with itself at offset 0 (i' = i, j' = j): K[i, i, j, j] IS the variance map. The
    # angle of the arc-cosine kernels is √det-sensitive there (q12 = q11 = q22), so a rounding
    # difference between this plane and the map (other summation orders) would cost √eps in the
    # NTK; the map is used for both, as the reference's bit-identical computations do.
    diagonal = (row1 == row2) & (off == 0)
    for s in range(n_steps):
        row = tab_ptr + _HDR + s * _SI
        fl = flt_ptr + s * _SF
        typ = tl.load(row)
        hv = tl.load(row + 1)
        wv = tl.load(row + 2)
        m = ((i < hv) & (ip < hv) & (j < wv) & (jp < wv) & (off < n_off)).to(dtype)
        if typ == _NONLIN:
            code = tl.load(row + 9)
            at = tl.load(row + 10) * plane
            q11 = tl.load(map1 + at, mask=(i < lh) & (j < lw), other=1.0)
            q11 = tl.broadcast_to(q11, (BH, BT, BW))
            q22 = tl.load(map2 + at, mask=on_grid, other=1.0)
            d = tl.where(diagonal, q11 * m, d)
            prm = fl + 5
            if code == _ABRELU:
                new, dot = _expectation(d, q11, q22, prm, _KIND_ABRELU, True)
            elif code == _ERF:
                new, dot = _expectation(d, q11, q22, prm, _KIND_ERF, True)
            else:
                new, dot = _expectation(d, q11, q22, prm, _KIND_GELU, True)
            d = new * m
            if has_ntk != 0:
                t = t * dot * m
        else:
            w_var = tl.load(fl)
            b_var = tl.load(fl + 1)
            scale = tl.load(fl + 2)
            if typ == _CONV:
                lo_h = tl.load(row + 3)
                fh = tl.load(row + 4)
                lo_w = tl.load(row + 5)
                fw = tl.load(row + 6)
                inv_h = tl.load(fl + 3)
                inv_w = tl.load(fl + 4)
                d = _box2(d, lo_h, fh, lh, lo_w, fw, lw, circ, inv_h, inv_w, BH, BT, BW)
                if has_ntk != 0:
                    t = _box2(t, lo_h, fh, lh, lo_w, fw, lw, circ, inv_h, inv_w, BH, BT, BW)
            nd = (w_var * d + b_var) * m
            if has_ntk != 0:
                if tl.load(row + 8) != 0:
                    # Standard parameterization: Θ' = scale·K + w·Θ (+ 1 with a bias).
                    t = (scale * d + w_var * t + tl.load(row + 7).to(dtype)) * m
                else:
                    t = nd + w_var * t * m
            d = nd

    # End.
    if planes != 0:
        base = b.to(tl.int64) * (plane * plane)
        tl.store(outn_ptr + base + packed_off, d, mask=on_grid)
        if has_ntk != 0:
            tl.store(outt_ptr + base + packed_off, t, mask=on_grid)
    else:
        hv_out = tl.load(tab_ptr + 8)
        wv_out = tl.load(tab_ptr + 9)
        valid = (i < hv_out) & (ip < hv_out) & (j < wv_out) & (jp < wv_out) & (off < n_off)
        m_out = valid.to(dtype)
        slot = b.to(tl.int64) * tl.num_programs(1) + tile
        tl.store(outn_ptr + slot, _total(d * m_out))
        if has_ntk != 0:
            tl.store(outt_ptr + slot, _total(t * m_out))
