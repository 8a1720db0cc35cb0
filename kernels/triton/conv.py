"""Triton kernels of the window ops ``conv_cov`` and ``pool_cov`` (reference: ``ntfast/ops/conv.py``).

Each kernel is one *separable pass* over one spatial axis (or one zipped axis pair) of a covariance
array viewed as a small row-major box, so that any number of batch axes, any number of spatial
axes and both stored pair orders reduce to a few launches of the same two kernels:

- ``conv_pair_kernel``: the shared-weight (diagonal) tap sum of a zipped pair, moving the pair
  behind the trailing entries so that ``n`` passes leave the pairs in reverse stored order
  (the layout ``conv_cov`` returns)::

      x   (n_lead, a1, a2, n_trail)  ->  out (n_lead, n_trail, o1, o2)
      out[p, q, i, i'] = inv · Σ_{k<taps} x[p, r1(stride·i + k − lo1), r2(stride·i' + k − lo2), q]

- ``window_axis_kernel``: the 1-D box sum of one axis (diagonal-spatial conv, pooling)::

      x   (n_lead, a, n_trail)  ->  out (n_lead, o, n_trail)
      out[p, i, q] = inv(i) · Σ_{k<taps} x[p, r(stride·i + k − lo), q]

``r`` is the identity where ``0 <= r < a`` and a zero tap outside (SAME zero padding; VALID passes
``lo = 0`` and only in-range taps), or ``r mod a`` with ``CIRCULAR`` (periodic padding, any number
of wraps). ``taps`` loads per output entry per pass: ``Σ f`` adds over a layer, never ``Π f``.
``inv = 1/den`` (with ``EDGE``: ``1/(den·cnt(i)^edge_pow)``, ``cnt(i)`` = taps of window ``i``
inside the unpadded axis) is formed in f64 and rounded once to the array dtype, as the reference
multiplies by a rounded reciprocal.

Indexing: program ``(pid_m, pid_q)`` owns ``BLOCK_M`` flattened rows ``(p, i[, i'])`` and
``BLOCK_Q`` trailing entries ``q``. Row strips may span slabs ``p`` (needed when a slab has few
rows); the slab of the first row is an int64 scalar (arrays may exceed 2^31 entries) and per-entry
offsets are int32 relative to it, which the launcher guarantees to fit. Sizes, taps, stride and
padding amounts are runtime ints, so only the dtype, the tile shape and the padding kind
(``CIRCULAR``, ``EDGE``) specialize a kernel. The launcher uses ``BLOCK_Q == 1`` exactly when
``n_trail == 1``.
"""

import triton
import triton.language as tl


@triton.jit
def _strip(pid_m, n_lead, rows, BLOCK_M: tl.constexpr):
    """Row strip ``pid_m`` of ``n_lead`` slabs of ``rows`` rows each: the slab ``p0`` of its
    first row (int64), its rows ``t`` counted from the start of slab ``p0`` (int32), their mask."""
    row0 = tl.cast(pid_m, tl.int64) * BLOCK_M
    p0 = row0 // rows
    lane = tl.arange(0, BLOCK_M)
    t = (row0 - p0 * rows).to(tl.int32) + lane
    # Rows left in the array from row0 on, clipped so the comparison stays int32.
    left = tl.minimum(tl.cast(n_lead, tl.int64) * rows - row0, BLOCK_M).to(tl.int32)
    return p0, t, lane < left


@triton.jit
def _tap(r, size, ok, CIRCULAR: tl.constexpr):
    """Source index of padded position ``r`` on an axis of ``size`` and the updated validity."""
    if CIRCULAR:
        r = r % size  # C remainder: takes the sign of r
        r = tl.where(r < 0, r + size, r)
    else:
        ok = ok & (r >= 0) & (r < size)
    return r, ok


@triton.jit
def conv_pair_kernel(
    x_ptr,  # (n_lead, a1, a2, n_trail) f32|f64: leading axes, the pair, pairs already done
    out_ptr,  # (n_lead, n_trail, o1, o2) same dtype: the convolved pair moved to the back
    n_lead,  # batch entries x the spatial entries of the pairs in front
    n_trail,  # entries of the pairs already convolved
    a1,  # input sizes of the pair
    a2,
    o1,  # output sizes of the pair
    o2,
    lo1,  # low padding of each axis (0 for VALID)
    lo2,
    taps,  # filter size
    stride,
    den,  # the sum is multiplied by 1/den (rounded once to the dtype)
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    CIRCULAR: tl.constexpr,
):
    """``out[p, q, i, i'] = 1/den · Σ_k xp[p, stride·i + k, stride·i' + k, q]``: one pair.

    ``BLOCK_Q == 1`` requires ``n_trail == 1``: rows ``(p, i, i')`` form one strip that may span
    slabs and is stored as is. ``BLOCK_Q > 1``: a program owns rows of one slab ``p`` only, so
    the stores (contiguous along ``(i, i')``, strided along ``q``) and the loads (contiguous along
    ``q``) are both visibly contiguous and the compiler can transpose the tile on chip.
    """
    rows = o1 * o2
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < n_trail
    if BLOCK_Q == 1:
        p0, t, row_ok = _strip(tl.program_id(0), n_lead, rows, BLOCK_M)
        pl = t // rows
        m = t - pl * rows
        src_row = pl * (a1 * a2)
        dst = t[:, None]
    else:
        n_blocks = (rows + BLOCK_M - 1) // BLOCK_M
        pid = tl.program_id(0)
        p = pid // n_blocks
        m = (pid - p * n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = m < rows
        p0 = tl.cast(p, tl.int64)
        src_row = 0
        dst = q[None, :] * rows + m[:, None]
    i1 = m // o2
    i2 = m - i1 * o2
    x_slab = x_ptr + p0 * (a1 * a2 * n_trail)
    out_slab = out_ptr + p0 * (n_trail * rows)

    acc = tl.full((BLOCK_M, BLOCK_Q), 0.0, x_ptr.dtype.element_ty)
    r1 = stride * i1 - lo1
    r2 = stride * i2 - lo2
    for _ in range(taps):
        c1, ok = _tap(r1, a1, row_ok, CIRCULAR)
        c2, ok = _tap(r2, a2, ok, CIRCULAR)
        src = src_row + (c1 * a2 + c2) * n_trail
        v = tl.load(
            x_slab + (src[:, None] + q[None, :]), mask=ok[:, None] & q_ok[None, :], other=0.0
        )
        acc += v
        r1 += 1
        r2 += 1
    inv = (tl.full((1, 1), 1.0, tl.float64) / den).to(acc.dtype)
    tl.store(out_slab + dst, acc * inv, mask=row_ok[:, None] & q_ok[None, :])


@triton.jit
def window_axis_kernel(
    x_ptr,  # (n_lead, a, n_trail) f32|f64: leading axes, the axis, trailing axes
    out_ptr,  # (n_lead, o, n_trail) same dtype
    n_lead,
    n_trail,
    a,  # input size of the axis
    o,  # output size of the axis
    lo,  # low padding (0 for VALID)
    taps,  # window size
    stride,
    den,  # constant divisor
    edge_pow,  # with EDGE: divide by den·cnt(i)^edge_pow, edge_pow in {1, 2}
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    CIRCULAR: tl.constexpr,
    EDGE: tl.constexpr,
):
    """``out[p, i, q] = Σ_k xp[p, stride·i + k, q] / d(i)``: one axis of a separable window sum.

    Loads and stores both run along ``q`` (or along the rows when ``n_trail == 1``), so strips
    may span slabs in either tile shape.
    """
    p0, t, row_ok = _strip(tl.program_id(0), n_lead, o, BLOCK_M)
    pl = t // o
    i = t - pl * o
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < n_trail
    x_slab = x_ptr + p0 * (a * n_trail)
    out_slab = out_ptr + p0 * (o * n_trail)

    acc = tl.full((BLOCK_M, BLOCK_Q), 0.0, x_ptr.dtype.element_ty)
    start = stride * i - lo
    r = start
    for _ in range(taps):
        c, ok = _tap(r, a, row_ok, CIRCULAR)
        v = tl.load(
            x_slab + ((pl * a + c) * n_trail)[:, None] + q[None, :],
            mask=ok[:, None] & q_ok[None, :],
            other=0.0,
        )
        acc += v
        r += 1
    if EDGE:
        # Taps of window i inside the unpadded axis (NT's normalize_edges, SAME padding only).
        cnt = (tl.minimum(start + taps, a) - tl.maximum(start, 0)).to(tl.float64)
        cnt = tl.maximum(cnt, 0.0)
        d = tl.where(edge_pow == 2, cnt * cnt, cnt) * den
        inv = (1.0 / d).to(acc.dtype)[:, None]
    else:
        inv = (tl.full((1, 1), 1.0, tl.float64) / den).to(acc.dtype)
    if BLOCK_Q == 1:
        dst = t[:, None]  # n_trail == 1: the strip itself, visibly contiguous
    else:
        dst = (pl * o + i)[:, None] * n_trail + q[None, :]
    tl.store(out_slab + dst, acc * inv, mask=row_ok[:, None] & q_ok[None, :])
