"""Triton kernels of the ``nonlin_<kind>`` ops: Gaussian expectations of elementwise nonlinearities.

For ``(u, v) ~ N(0, [[q11, q12], [q12, q22]])`` one pass computes, per covariance entry,

    new = E[f(u) f(v)]        and, with an NTK,   ntk_out = ntk · E[f'(u) f'(v)] = ntk · Σ̇,

optionally followed by the next Dense layer's affine map (``HAS_AFFINE``)::

    new'     = w_var · new + b_var
    ntk_out' = (t_e · new + t_c) + w_var · (ntk · Σ̇)

(NTK parameterization: ``t_e = w_var``, ``t_c = b_var``, i.e. ``ntk_out' = new' + w_var·ntk·Σ̇``;
standard: ``t_e = N_in / s_in``, ``t_c = 1`` with a bias, else 0). The math of every kind is the XLA
reference's (``ntfast/ops/nonlin.py``), operation for operation: normalized Gram matrix
``(q11, q22, q12) / m``, ``m = max(q11, q22, |q12|)``, with the determinant clamped at 0 (finite on
and near the x1 == x2 diagonal, no f32 overflow of ``q11·q22``), θ from ``atan2`` (never an
unclipped ``acos``), scaled square roots.

Layout contract (the launcher, ``ntfast/_triton/nonlin.py``, builds it):

- ``q12``, ``ntk`` and the outputs are contiguous arrays of ``T`` entries (the output shape);
- ``q11``, ``q22`` are compact arrays broadcast against the output; the broadcast is described by
  ``layout = [ndim, (size, stride11, stride22) × ndim]`` (int32, outer to inner collapsed dims,
  strides in elements, 0 where the side is broadcast; ``T`` = the product of the sizes), walked
  per entry with int32 div/mod (the program's first entry is decomposed in int64 once, so ``T``
  may exceed 2^31; each size and each of ``q11``, ``q22`` must stay below 2^31 entries). Sizes
  live in memory, not in scalar arguments, so one compiled kernel serves every shape;
- ``prm`` (dtype of the data, so f64 constants stay f64): ``prm[0:5]`` the kind's constants
  (computed in Python f64 by the launcher, see ``KIND_PARAMS``), ``prm[5:9] = w_var, b_var,
  t_e, t_c``.

One program handles ``BLOCK`` consecutive entries.
"""

import triton
import triton.language as tl

from ._math import atan2, div, exp, recip, sqrt

#: KIND constexpr of each supported ``nonlin_<kind>`` (Cos is ``sin`` with ``c + π/2``).
KINDS = {"abrelu": 0, "sign": 1, "erf": 2, "gelu": 3, "sin": 4, "rbf": 5, "exp": 6, "gaussian": 7}
#: Meaning of ``prm[0:5]`` per kind (the launcher's order).
KIND_PARAMS = {
    "abrelu": ("(a-b)^2", "a*b"),
    "sign": (),
    "erf": ("b^2", "a^2*2/pi", "c^2", "a^2*b^2*4/pi"),
    "gelu": (),
    "sin": ("b^2", "-b^2", "cos(2c)", "a^2/2", "a^2*b^2/2"),
    "rbf": ("gamma", "2*gamma"),
    "exp": ("a^2", "b^2"),
    "gaussian": ("2b", "4b^2", "a^2", "4a^2b^2"),
}
N_PARAMS = 9

_ABRELU = tl.constexpr(0)
_SIGN = tl.constexpr(1)
_ERF = tl.constexpr(2)
_GELU = tl.constexpr(3)
_SIN = tl.constexpr(4)
_RBF = tl.constexpr(5)
_EXP = tl.constexpr(6)
_GAUSSIAN = tl.constexpr(7)


@triton.jit
def _gram(q12, q11, q22):
    """``(m, c, det)``: ``c = q12/m``, ``det = max(q11 q22 − q12², 0) / m²`` from the normalized
    entries (``m = max(q11, q22, |q12|)``, 1 if all vanish)."""
    m = tl.maximum(
        tl.maximum(q11, q22, propagate_nan=tl.PropagateNan.ALL),
        tl.abs(q12),
        propagate_nan=tl.PropagateNan.ALL,
    )
    m = tl.where(m > 0, m, 1.0)
    a = div(q11, m)
    b = div(q22, m)
    c = div(q12, m)
    det = tl.maximum(a * b - c * c, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return m, c, det


@triton.jit
def _sqrt_e_plus_kd(e, k, m, det):
    """``sqrt(max(e + k·m²·det, 0))`` with ``max(m, 1)`` factored out (no overflow of m²)."""
    mb = tl.maximum(m, 1.0)
    r = div(m, mb)
    return mb * sqrt(
        tl.maximum(div(div(e, mb), mb) + k * (r * r) * det, 0.0, propagate_nan=tl.PropagateNan.ALL)
    )


@triton.jit
def _angle(q12, q11, q22):
    """``(m, c, sn, π − θ)``, θ = atan2(sn, c) ∈ [0, π] (π/2 when sn = c = 0), sn = √det."""
    m, c, det = _gram(q12, q11, q22)
    sn = sqrt(det)
    theta = tl.where((sn == 0) & (c == 0), 1.5707963267948966, atan2(sn, c))
    return m, c, sn, 3.141592653589793 - theta


@triton.jit
def _expectation(q12, q11, q22, prm_ptr, KIND: tl.constexpr, NEED_DOT: tl.constexpr):
    """``(new, Σ̇)`` of the kind (``Σ̇`` only if ``NEED_DOT``; else a placeholder)."""
    p0 = tl.load(prm_ptr + 0)
    p1 = tl.load(prm_ptr + 1)
    p2 = tl.load(prm_ptr + 2)
    p3 = tl.load(prm_ptr + 3)
    p4 = tl.load(prm_ptr + 4)
    if KIND == _ABRELU:
        # (a−b)² k_1 + ab q12, Σ̇ = (a−b)² k_0 + ab with k_0 = (π−θ)/2π, k_1 = m((π−θ)c + sn)/2π.
        m, c, sn, pt = _angle(q12, q11, q22)
        new = p0 * div(m * (pt * c + sn), 6.283185307179586) + p1 * q12
        dot = p0 * div(pt, 6.283185307179586) + p1
    elif KIND == _SIGN:
        # 1 − 2θ/π = 4 k_0 − 1; Σ̇ := 0 (NT's convention), applied by the caller.
        m, c, sn, pt = _angle(q12, q11, q22)
        new = 4.0 * div(pt, 6.283185307179586) - 1.0
        dot = new
    elif KIND == _ERF:
        # a² (2/π) atan2(2Q12, δ) + c², Σ̇ = a² b² (4/π) / δ, Q = b² q,
        # δ = √((1 + 2Q11)(1 + 2Q22) − 4Q12²) = √(1 + 2(Q11 + Q22) + 4 m² det).
        s12 = p0 * q12
        s11 = p0 * q11
        s22 = p0 * q22
        m, c, det = _gram(s12, s11, s22)
        delta = _sqrt_e_plus_kd(1.0 + 2.0 * (s11 + s22), 4.0, m, det)
        new = p1 * atan2(2.0 * s12, delta) + p2
        dot = div(p3, delta)
    elif KIND == _GELU:
        # arXiv:2002.08517; δ² = (1 + q11)(1 + q22) − q12², φ = atan2(q12, δ).
        m, c, det = _gram(q12, q11, q22)
        delta = _sqrt_e_plus_kd(1.0 + q11 + q22, 1.0, m, det)
        e1 = 1.0 + q11
        e2 = 1.0 + q22
        r = div(div(q12, sqrt(e1)), sqrt(e2))
        t = div(q11, e1) * div(q22, e2)
        phi = atan2(q12, delta)
        new = div(div(r * r, delta) + t * delta + q12 * phi, 6.283185307179586) + q12 * 0.25
        dot = new
        if NEED_DOT:
            inv = recip(delta)
            inner = div(inv, delta) + div(recip(e1), e2) - t + 1.0
            first = div(inner * q12, 6.283185307179586 * delta)
            dot = first + 0.25 + div(phi, 6.283185307179586)
    elif KIND == _SIN:
        # a²/2 (s₊ − s₋ cos 2c), Σ̇ = a² b²/2 (s₊ + s₋ cos 2c),
        # s₊ = exp(b² (q12 − (q11 + q22)/2)), s₋ = exp(−b² (q12 + (q11 + q22)/2)).
        half = (q11 + q22) * 0.5
        s_plus = exp(p0 * (q12 - half))
        s_minus = exp(p1 * (q12 + half)) * p2
        new = p3 * (s_plus - s_minus)
        dot = p4 * (s_plus + s_minus)
    elif KIND == _RBF:
        new = exp(p0 * (2.0 * q12 - q11 - q22))
        dot = p1 * new
    elif KIND == _EXP:
        new = p0 * exp(p1 * ((q11 + q22) * 0.5 + q12))
        dot = p1 * new
    else:
        tl.static_assert(KIND == _GAUSSIAN, "unknown KIND")
        # a² / δ, Σ̇ = 4a²b² q12 / δ³, δ = √((1 − 2b q11)(1 − 2b q22) − 4b² q12²).
        m, c, det = _gram(q12, q11, q22)
        delta = _sqrt_e_plus_kd(1.0 - p0 * (q11 + q22), p1, m, det)
        inv = recip(delta)
        new = p2 * inv
        dot = p3 * q12 * (inv * inv * inv)
    return new, dot


@triton.jit
def _broadcast_offsets(layout_ptr, base, BLOCK: tl.constexpr):
    """``(T, off11, off22)``: the entry count and the int32 offsets into ``q11``, ``q22`` of entries
    ``base + [0, BLOCK)`` (row-major index decomposed over the collapsed dims, innermost first,
    carrying the in-block offset; the program's ``base`` is decomposed once, in int64)."""
    ndim = tl.load(layout_ptr)
    carry = tl.arange(0, BLOCK)
    rem = base
    n = base * 0 + 1
    # tl.full, not tl.zeros: triton.language's own @jit helpers fail in the interpreter unless
    # Triton itself was imported with TRITON_INTERPRET=1.
    off11 = tl.full([BLOCK], 0, tl.int32)
    off22 = tl.full([BLOCK], 0, tl.int32)
    for d in range(ndim):
        at = 1 + 3 * (ndim - 1 - d)
        size = tl.load(layout_ptr + at)
        stride11 = tl.load(layout_ptr + at + 1)
        stride22 = tl.load(layout_ptr + at + 2)
        n = n * size
        first = (rem % size).to(tl.int32)
        rem = rem // size
        idx = first + carry
        carry = idx // size
        idx = idx - carry * size
        off11 += idx * stride11
        off22 += idx * stride22
    return n, off11, off22


@triton.jit
def _nonlin_body(
    q12_ptr,
    q11_ptr,
    q22_ptr,
    ntk_ptr,
    layout_ptr,
    prm_ptr,
    new_ptr,
    ntk_out_ptr,
    KIND: tl.constexpr,
    HAS_NTK: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    loc = tl.arange(0, BLOCK)
    n, off11, off22 = _broadcast_offsets(layout_ptr, base, BLOCK)
    mask = base + loc < n
    q12 = tl.load(q12_ptr + base + loc, mask=mask, other=0.0)
    q11 = tl.load(q11_ptr + off11, mask=mask, other=1.0)
    q22 = tl.load(q22_ptr + off22, mask=mask, other=1.0)
    new, dot = _expectation(q12, q11, q22, prm_ptr, KIND, HAS_NTK and KIND != _SIGN)
    out = new
    if HAS_AFFINE:
        w_var = tl.load(prm_ptr + 5)
        b_var = tl.load(prm_ptr + 6)
        out = w_var * new + b_var
    tl.store(new_ptr + base + loc, out, mask=mask)
    if HAS_NTK:
        if KIND == _SIGN:
            ntk_dot = tl.full([BLOCK], 0.0, new.dtype)
        else:
            ntk_dot = tl.load(ntk_ptr + base + loc, mask=mask, other=0.0) * dot
        if HAS_AFFINE:
            t_e = tl.load(prm_ptr + 7)
            t_c = tl.load(prm_ptr + 8)
            ntk_dot = (t_e * new + t_c) + w_var * ntk_dot
        tl.store(ntk_out_ptr + base + loc, ntk_dot, mask=mask)


@triton.jit
def nonlin_kernel(
    q12_ptr,  # (T,) f32|f64 covariances, contiguous (T = output entries)
    q11_ptr,  # (S1,) f32|f64 variances of side 1, broadcast by `layout`
    q22_ptr,  # (S2,) f32|f64 variances of side 2, broadcast by `layout`
    layout_ptr,  # (1 + 3·ndim,) int32: ndim, (size, stride11, stride22) per collapsed dim
    prm_ptr,  # (N_PARAMS,) f32|f64: kind constants, then w_var, b_var, t_e, t_c
    new_ptr,  # (T,) f32|f64 out: E[f(u) f(v)] (then w_var·E + b_var if HAS_AFFINE)
    KIND: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """NNGP-only pass: ``new = E[f(u) f(v)]`` (+ affine). One program per BLOCK entries."""
    _nonlin_body(
        q12_ptr,
        q11_ptr,
        q22_ptr,
        q12_ptr,
        layout_ptr,
        prm_ptr,
        new_ptr,
        new_ptr,
        KIND,
        False,
        HAS_AFFINE,
        BLOCK,
    )


@triton.jit
def nonlin_ntk_kernel(
    q12_ptr,  # (T,) f32|f64 covariances, contiguous
    q11_ptr,  # (S1,) f32|f64 variances of side 1, broadcast by `layout`
    q22_ptr,  # (S2,) f32|f64 variances of side 2, broadcast by `layout`
    ntk_ptr,  # (T,) f32|f64 NTK entries, contiguous
    layout_ptr,  # (1 + 3·ndim,) int32: ndim, (size, stride11, stride22) per collapsed dim
    prm_ptr,  # (N_PARAMS,) f32|f64: kind constants, then w_var, b_var, t_e, t_c
    new_ptr,  # (T,) f32|f64 out: E[f(u) f(v)] (+ affine)
    ntk_out_ptr,  # (T,) f32|f64 out: ntk·Σ̇ (+ affine)
    KIND: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """NNGP + NTK pass: ``new`` and ``ntk·Σ̇`` (+ affine) from one read of each input."""
    _nonlin_body(
        q12_ptr,
        q11_ptr,
        q22_ptr,
        ntk_ptr,
        layout_ptr,
        prm_ptr,
        new_ptr,
        ntk_out_ptr,
        KIND,
        True,
        HAS_AFFINE,
        BLOCK,
    )
