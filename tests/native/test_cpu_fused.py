"""C++ CPU handler of ``fused_cnn`` (backend ``"native"``, target ``ntfast_fused_cnn``).

Numerics vs the XLA reference (the definition) in f64 over a sweep of qualifying plans (filter
sizes, paddings, parameterizations, every compiled nonlinearity, poolings, readouts, odd sizes,
N1 ≠ N2, x2=None, compute_ntk/compute_cov off) and vs Neural Tangents for whole ``stax``
networks; the f32 accuracy rule (native error ≤ 2× XLA-f32's error vs the f64 truth, + tiny abs);
every ISA variant the machine runs (AVX-512 VL, AVX2, the portable loops); jit / vmap / grad through the custom call; the
backend flag (explicit native raises on an unsupported plan, auto falls back) and the
unavailable-module report.

The extension module is found as ``ntfast/_native/__init__.py`` documents (installed wheel,
``NTFAST_NATIVE_DIR``, or the installed distribution behind a source checkout). Without it the
numerics tests skip, naming what un-skips them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntfast
from ntfast import backend as B
from ntfast.ops import fused_cnn as fc

native = pytest.importorskip("ntfast._native")

_MISSING = native.module_error("_cpu")
needs_cpu = pytest.mark.skipif(
    _MISSING is not None,
    reason="ntfast._native._cpu is not built: `pip install .`, or build with CMake and set "
    f"NTFAST_NATIVE_DIR to its native/ folder ({_MISSING})",
)

RTOL = 1e-6
# Native vs the XLA reference in f64. Not ~1e-15: on a self pair's δ = 0 entries (q12 = q11 =
# q22 exactly) the kernel's variance chain reproduces q12 bit for bit, so θ = 0, while the XLA
# reference's differently ordered sums leave det ~ 1e-16 and θ ~ √det ~ 1e-8 (the arc-cosine
# angle is √-conditioned there): the ReLU-family Σ̇ (NTK) differs by ~1e-9 relative.
TOL_REF = 1e-8


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-300))


def _images(shape, seed, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


RELU = fc.NonlinStep("abrelu", (("a", 0.0), ("b", 1.0)))
LEAKY = fc.NonlinStep("abrelu", (("a", 0.1), ("b", 1.0)))
ABS = fc.NonlinStep("abrelu", (("a", -1.0), ("b", 1.0)))
ERF = fc.NonlinStep("erf", (("a", 1.3), ("b", 0.7), ("c", 0.2)))
GELU = fc.NonlinStep("gelu", ())


def _conv(f=(3, 3), pad="SAME", w=2.0, b=0.01, scale=None):
    return fc.ConvStep(tuple(f), pad, w, b, scale)


def _pool(window=(2, 2), strides=(2, 2), pad="VALID", kind="AVG", norm=False):
    return fc.PoolStep(tuple(window), tuple(strides), pad, kind, norm)


PLANS = {
    "relu-gap-3x3-same": (_conv(), RELU, _conv(), RELU, fc.Readout("GAP")),
    "f1-f2-f5-same": (
        _conv((1, 1)),
        LEAKY,
        _conv((2, 2)),
        ERF,
        _conv((5, 5)),
        GELU,
        fc.Readout("GAP"),
    ),
    "valid-gsp": (
        _conv((2, 3), "VALID"),
        ERF,
        _conv((3, 1), "VALID", b=None),
        GELU,
        fc.Readout("GSP"),
    ),
    "circular-flatten": (
        _conv((3, 2), "CIRCULAR"),
        LEAKY,
        _conv((5, 3), "CIRCULAR"),
        ABS,
        fc.Readout("FLATTEN"),
    ),
    "circular-big-filter": (_conv((7, 9), "CIRCULAR", w=1.5), RELU, fc.Readout("GAP")),
    "standard-param": (
        _conv(scale=3.0),
        RELU,
        fc.DenseStep(1.2, 0.3, 5.0),
        GELU,
        _conv((1, 1), b=None, scale=2.5),
        fc.Readout("GAP"),
    ),
    "dense-ntk-no-bias": (_conv(b=None), ABS, fc.DenseStep(0.8, None), ERF, fc.Readout("GSP")),
    "myrtle-like": (
        _conv(b=0.0),
        RELU,
        _conv(b=0.0),
        RELU,
        _pool(),
        _conv(b=0.0),
        RELU,
        _pool(),
        _pool(),
        fc.Readout("FLATTEN"),
    ),
    "pool-same-norm": (
        _conv((2, 2)),
        RELU,
        _pool((3, 2), (1, 2), "SAME", "AVG", True),
        _conv((2, 2), "VALID"),
        GELU,
        _pool((2, 1), (2, 1), "VALID", "SUM"),
        fc.DenseStep(0.8, 0.1),
        RELU,
        fc.Readout("GAP"),
    ),
    "pool-circular-sum": (
        _conv((3, 3), "CIRCULAR"),
        ERF,
        _pool((3, 3), (2, 2), "CIRCULAR", "SUM"),
        _conv((2, 2), "CIRCULAR"),
        RELU,
        fc.Readout("GSP"),
    ),
    "pool-first": (_pool((2, 2), (1, 1)), _conv(), RELU, fc.Readout("GAP")),
    "pool-same-no-norm": (
        _conv(),
        LEAKY,
        _pool((3, 3), (2, 2), "SAME", "AVG", False),
        RELU,
        fc.Readout("GAP"),
    ),
    "conv-only": (_conv(), _conv((2, 2), "VALID"), fc.Readout("GAP")),
    "erf-defaults": (_conv(), fc.NonlinStep("erf", ()), fc.Readout("GAP")),
}


# ----------------------------------------------------------------------------------------------
# A small NumPy oracle in NT's full-spatial layout K[a, b, i, i', j, j'] (every image against
# every image; no compilation, milliseconds for 5×7 images): the sweep's truth, independent of
# both the packed offset layout and the XLA reference. Validated against the XLA reference and
# NT by the tests below that use them.


def _same_pads(size, f, s):
    out = -(-size // s)
    total = max((out - 1) * s + f - size, 0)
    return total // 2, total - total // 2


def _pad(k, axis, lo, hi, padding):
    if padding == "VALID" or (lo == 0 and hi == 0):
        return k
    if padding == "CIRCULAR":
        n = k.shape[axis]
        return np.take(k, np.arange(-lo, n + hi) % n, axis=axis)
    widths = [(0, 0)] * k.ndim
    widths[axis] = (lo, hi)
    return np.pad(k, widths)


def _np_conv(k, st):
    """Shared-weight box filter of a stride-1 conv on K (N, M, H, H', W, W')."""
    (fh, fw), pad = st.filter_shape, st.padding
    for axes, f in (((2, 3), fh), ((4, 5), fw)):
        lo, hi = _same_pads(k.shape[axes[0]], f, 1) if pad != "VALID" else (0, 0)
        for ax in axes:
            k = _pad(k, ax, lo, hi, pad)
        n = k.shape[axes[0]] - f + 1
        out = 0
        for a in range(f):
            idx = [slice(None)] * 6
            idx[axes[0]] = idx[axes[1]] = slice(a, a + n)
            out = out + k[tuple(idx)]
        k = out / f
    return k


def _np_pool(k, st):
    for ax in range(2, 6):
        logical = (ax - 2) // 2
        p, s, size = st.window_shape[logical], st.strides[logical], k.shape[ax]
        lo, hi = _same_pads(size, p, s) if st.padding != "VALID" else (0, 0)
        kp = _pad(k, ax, lo, hi, st.padding)
        n = (kp.shape[ax] - p) // s + 1
        out = 0
        for a in range(p):
            idx = [slice(None)] * 6
            idx[ax] = slice(a, a + s * (n - 1) + 1, s)
            out = out + kp[tuple(idx)]
        if st.pool_type == "AVG":
            d = np.full(n, float(p))
            if st.padding == "SAME" and st.normalize_edges:
                starts = np.arange(n) * s - lo
                d = (np.minimum(starts + p, size) - np.maximum(starts, 0)).astype(float)
            shape = [1] * 6
            shape[ax] = n
            out = out / d.reshape(shape)
        k = out
    return k


def _np_nonlin(kind, params, q12, q11, q22):
    p = dict(params)
    if kind == "abrelu":
        a, b = p["a"], p["b"]
        s = np.sqrt(np.maximum(q11 * q22 - q12 * q12, 0))
        theta = np.where((s == 0) & (q12 == 0), np.pi / 2, np.arctan2(s, q12))
        k0 = (np.pi - theta) / (2 * np.pi)
        k1 = (s + (np.pi - theta) * q12) / (2 * np.pi)
        return (a - b) ** 2 * k1 + a * b * q12, (a - b) ** 2 * k0 + a * b
    if kind == "erf":
        a, b, c = p.get("a", 1.0), p.get("b", 1.0), p.get("c", 0.0)
        q12, q11, q22 = b * b * q12, b * b * q11, b * b * q22
        delta = np.sqrt((1 + 2 * q11) * (1 + 2 * q22) - 4 * q12 * q12)
        return (
            a * a * 2 / np.pi * np.arctan2(2 * q12, delta) + c * c,
            a * a * b * b * 4 / np.pi / delta,
        )
    p1, p2 = 1 + q11, 1 + q22
    delta = np.sqrt(p1 * p2 - q12 * q12)
    r2, t, phi = q12 * q12 / (p1 * p2), q11 * q22 / (p1 * p2), np.arctan2(q12, delta)
    new = (r2 / delta + t * delta + q12 * phi) / (2 * np.pi) + q12 / 4
    first = (1 / delta**2 + 1 / (p1 * p2) - t + 1) * q12 / (2 * np.pi * delta)
    return new, first + 0.25 + phi / (2 * np.pi)


def _np_affine(st, k, t, kb, tb):
    bias = 0.0 if st.b_var is None else st.b_var
    new = st.w_var * kb + bias
    if st.ntk_scale is None:
        return new, new + st.w_var * tb
    return new, st.ntk_scale * kb + st.w_var * tb + (0.0 if st.b_var is None else 1.0)


def oracle(plan, x1, x2=None):
    """``(nngp, ntk, cov1, cov2)`` of ``plan`` (f64 NumPy), as the op returns them."""
    x1 = np.asarray(x1, np.float64)
    xs = x1 if x2 is None else np.concatenate([x1, np.asarray(x2, np.float64)])
    k = np.einsum("ahwc,bgvc->abhgwv", xs, xs) / xs.shape[-1]
    t = np.zeros_like(k)
    for st in plan[:-1]:
        if isinstance(st, fc.ConvStep):
            k, t = _np_affine(st, k, t, _np_conv(k, st), _np_conv(t, st))
        elif isinstance(st, fc.DenseStep):
            k, t = _np_affine(st, k, t, k, t)
        elif isinstance(st, fc.PoolStep):
            k, t = _np_pool(k, st), _np_pool(t, st)
        else:
            n = np.arange(k.shape[0])
            var = k[n, n]  # (N, H, H, W, W)
            h, w = np.arange(k.shape[2]), np.arange(k.shape[4])
            var = var[:, h[:, None], h[:, None], w[None, :], w[None, :]]  # (N, H, W)
            q11 = var[:, None, :, None, :, None]
            q22 = var[None, :, None, :, None, :]
            k, dot = _np_nonlin(st.kind, st.params, k, q11, q22)
            t = t * dot
    kind = plan[-1].kind
    if kind == "FLATTEN":
        h, w = np.arange(k.shape[2]), np.arange(k.shape[4])
        diag = lambda v: v[:, :, h[:, None], h[:, None], w[None, :], w[None, :]].mean((2, 3))
        k, t = diag(k), diag(t)
    else:
        red = np.mean if kind == "GAP" else np.sum
        k, t = red(k, (2, 3, 4, 5)), red(t, (2, 3, 4, 5))
    n1 = x1.shape[0]
    self_k = np.diagonal(k)
    if x2 is None:
        return k, t, self_k, None
    return k[:n1, n1:], t[:n1, n1:], self_k[:n1], self_k[n1:]


def _both(plan, x1, x2, backend, **kw):
    return fc.fused_cnn(x1, x2, plan=plan, backend=backend, **kw)


def _check(out, ref, tol=RTOL):
    for k, (a, b) in enumerate(zip(out, ref)):
        if b is None:
            assert a is None, k
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, b.dtype)
        assert _rel(a, b) <= tol, (k, _rel(a, b))


def _oracle_check(plan, x1, x2, out, tol=1e-12):
    ref = oracle(plan, x1, x2)
    for k, (a, b) in enumerate(zip(out, ref)):
        if k == 1 and a is None:
            continue
        if b is None:
            assert a is None, k
            continue
        assert a is not None and a.shape == b.shape, (k, None if a is None else a.shape)
        assert _rel(a, b) <= tol, (k, _rel(a, b))


def _size(name):
    return (8, 9) if name == "myrtle-like" else (5, 7)


@needs_cpu
@pytest.mark.parametrize("name", sorted(PLANS))
@pytest.mark.parametrize("n2", [None, 2])
def test_matches_oracle_f64(name, n2):
    plan = PLANS[name]
    x1 = _images((3, *_size(name), 2), 0)
    x2 = None if n2 is None else _images((n2, *_size(name), 2), 1)
    out = _both(plan, x1, x2, "native")
    assert all(v is None or v.dtype == jnp.float64 for v in out)
    _oracle_check(plan, x1, x2, out)


@needs_cpu
@pytest.mark.parametrize("name", ["myrtle-like", "f1-f2-f5-same"])
def test_matches_reference_f64(name):
    # One XLA reference call per plan (it compiles for seconds): x2 = [x1; x2'] covers the
    # symmetric block and the N1 ≠ N2 block at once.
    plan = PLANS[name]
    x1, x2 = _images((2, *_size(name), 2), 2), _images((1, *_size(name), 2), 3)
    ref = _both(plan, x1, jnp.concatenate([x1, x2]), "xla")
    sym = _both(plan, x1, None, "native")
    cross = _both(plan, x1, x2, "native")
    for k in range(2):
        assert _rel(sym[k], ref[k][:, :2]) <= TOL_REF, (k, _rel(sym[k], ref[k][:, :2]))
        assert _rel(cross[k], ref[k][:, 2:]) <= TOL_REF, (k, _rel(cross[k], ref[k][:, 2:]))
    assert _rel(cross[2], ref[2]) <= TOL_REF and _rel(cross[3], ref[3][2:]) <= TOL_REF


@needs_cpu
@pytest.mark.parametrize("compute_ntk", [False, True])
@pytest.mark.parametrize("compute_cov", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_optional_outputs(compute_ntk, compute_cov, sym):
    plan = PLANS["myrtle-like"]
    x1, x2 = _images((2, 8, 9, 3), 2), None if sym else _images((1, 8, 9, 3), 3)
    out = _both(plan, x1, x2, "native", compute_ntk=compute_ntk, compute_cov=compute_cov)
    assert (out[1] is None) == (not compute_ntk)
    assert (out[2] is None) == (not compute_cov)
    assert out[3] is None if (sym or not compute_cov) else out[3].shape == (1,)
    ref = oracle(plan, x1, x2)
    full = [v for v, r in zip(out, ref)]
    _oracle_check(
        plan,
        x1,
        x2,
        (full[0], full[1], full[2] if compute_cov else ref[2], full[3] if compute_cov else ref[3]),
    )


SIMD_VARIANTS = ["generic", "avx2", "avx512"]


def _assert_f32_within_2x_xla(nat, xla, truth, where):
    """The f32 rule: native finite, and its error ≤ 2× the XLA reference's f32 error (+ 1e-6 of
    the output's scale), both against the f64 truth."""
    nat = np.asarray(nat, np.float64)
    assert np.all(np.isfinite(nat)), where
    tscale = float(np.max(np.abs(truth)))
    err_xla = float(np.max(np.abs(np.asarray(xla, np.float64) - truth)))
    err_nat = float(np.max(np.abs(nat - truth)))
    assert err_nat <= 2 * err_xla + 1e-6 * tscale, (where, err_nat, err_xla, tscale)


def _use_simd(simd, monkeypatch):
    """Caps the handler's ISA variant at ``simd`` (read per call), or skips naming why it can't."""
    monkeypatch.delenv("NTFAST_SIMD", raising=False)
    info = native.build_info()["_cpu"]
    if simd not in info["simd"].split("+"):
        pytest.skip(f"this build has no {simd} variant ({info['simd']}: non-x86 or non-GCC/Clang)")
    order = SIMD_VARIANTS.index
    if order(info["simd_selected"]) < order(simd):
        pytest.skip(f"this CPU cannot run the {simd} variant (best: {info['simd_selected']})")
    monkeypatch.setenv("NTFAST_SIMD", simd)
    assert native.build_info()["_cpu"]["simd_selected"] == simd


@needs_cpu
@pytest.mark.parametrize("simd", SIMD_VARIANTS)
def test_isa_variants_and_threads(simd, monkeypatch):
    # The handler reads NTFAST_SIMD / NTFAST_NUM_THREADS per call: every ISA build, pair-parallel
    # (many pairs) and row-parallel (one pair) modes must give the same values.
    _use_simd(simd, monkeypatch)
    plan = PLANS["pool-same-norm"]
    x1, x2 = _images((4, 6, 5, 2), 4), _images((1, 6, 5, 2), 5)
    sym_fn = jax.jit(lambda a: _both(plan, a, None, "native"))
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("NTFAST_NUM_THREADS", threads)
        _oracle_check(plan, x1, None, sym_fn(x1))
        _oracle_check(plan, x1[:1], x2, _both(plan, x1[:1], x2, "native"))


@needs_cpu
@pytest.mark.parametrize("simd", SIMD_VARIANTS)
def test_f32_accuracy_rule(simd, monkeypatch):
    # Native f32 error ≤ 2× the XLA reference's f32 error, both against the f64 truth, for every
    # ISA variant (the AVX2/AVX-512 ones run the hand-vectorized f32 ReLU rows).
    _use_simd(simd, monkeypatch)
    for name in ("myrtle-like",):
        plan = PLANS[name]
        x1, x2 = _images((3, 8, 9, 3), 6), _images((2, 8, 9, 3), 7)
        truth = oracle(plan, x1, x2)
        y1, y2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
        xla32, nat32 = _both(plan, y1, y2, "xla"), _both(plan, y1, y2, "native")
        for k, (t, a, b) in enumerate(zip(truth, xla32, nat32)):
            assert b.dtype == jnp.float32
            _assert_f32_within_2x_xla(b, a, t, (name, k))


@needs_cpu
@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
@pytest.mark.parametrize("nonlin", [RELU, LEAKY, ABS], ids=["relu", "leaky", "abs"])
@pytest.mark.parametrize("simd", ["avx2", "avx512"])
def test_f32_relu_family_extreme_inputs(simd, scale, nonlin, monkeypatch):
    # The AVX2 f32 ReLU-family row (kernels/cpu/simd_avx2.h: exponent normalization, Kahan
    # determinant, polynomial atan) on the inputs where its shortcuts could break: tiny and huge
    # variances (q ~ 1e±24: q11·q22 would under/overflow f32 without the normalization; much
    # smaller images make the f32 input products x_a·x_b themselves subnormal), exactly parallel
    # and antiparallel pairs (x2 = 2·x1: det = 0 and Σ̇ = 1/2 exactly; x2 = −x1: θ = π), a zero
    # image (the origin: θ = π/2 by convention) and self pairs (compute_cov). Same 2×-XLA-f32
    # rule as above, per output. Not here: nearly parallel pairs (x2 = x1 + 1e-3·noise), where
    # θ ~ √(1 − ρ) turns the f32 rounding of the *inputs* q12, q11, q22 into ~1e-6 errors in any
    # f32 implementation, XLA's included, so "2× XLA's error" compares two rounding accidents.
    _use_simd(simd, monkeypatch)
    plan = (_conv((1, 1), b=0.0), nonlin, _conv((2, 2), b=0.0), nonlin, fc.Readout("GAP"))
    base = np.asarray(_images((2, 5, 7, 3), 11))
    x1 = scale * np.concatenate([base, np.zeros((1, 5, 7, 3))])
    x2 = scale * np.concatenate([2.0 * base[:1], -base[1:]])
    x1, x2 = jnp.asarray(x1), jnp.asarray(x2)
    truth = oracle(plan, x1, x2)
    y1, y2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    xla32 = _both(plan, y1, y2, "xla", compute_cov=True)
    nat32 = _both(plan, y1, y2, "native", compute_cov=True)
    for k, (t, a, b) in enumerate(zip(truth, xla32, nat32)):
        _assert_f32_within_2x_xla(b, a, t, k)


_RELU_FAMILY_PLANS = [
    name
    for name, plan in PLANS.items()
    if any(isinstance(st, fc.NonlinStep) and st.kind == "abrelu" for st in plan)
]


@needs_cpu
@pytest.mark.parametrize("name", _RELU_FAMILY_PLANS)
@pytest.mark.parametrize("simd", ["avx2", "avx512"])
def test_f32_fused_conv_relu_every_plan(simd, name, monkeypatch):
    # The AVX2/AVX-512 variants run a conv followed by a ReLU-family step as one fused in-place
    # pass (simd_avx2.h conv_abrelu_plane: any filter width, leaky/abs, normalized or not,
    # 4-wide row tails). Every test plan with such a step on 9×11 images (rows ending in 4-wide
    # tails; pooled plans shrink them further) and a zero image, NTK on and off, self
    # covariances: the 2×-XLA-f32 rule against the f64 truth, per output.
    _use_simd(simd, monkeypatch)
    plan = PLANS[name]
    x1 = _images((2, 9, 11, 3), 21)
    x2 = jnp.concatenate([_images((2, 9, 11, 3), 22), jnp.zeros((1, 9, 11, 3))])  # + the origin
    truth = oracle(plan, x1, x2)
    y1, y2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    for compute_ntk in (True, False):
        kw = {"compute_ntk": compute_ntk, "compute_cov": True}
        xla32 = _both(plan, y1, y2, "xla", **kw)
        nat32 = _both(plan, y1, y2, "native", **kw)
        for k, (t, a, b) in enumerate(zip(truth, xla32, nat32)):
            if not compute_ntk and k == 1:
                continue
            _assert_f32_within_2x_xla(b, a, t, (name, k))


# SAME 3×3 conv + ReLU-family stacks whose rows the f32 SIMD variants run on the register path
# (simd_avx2.h conv3_abrelu_rows, blocks of 8 columns, or 16 on AVX-512 where the row has whole
# 16-column blocks), with the (H, W) that reach each of its edge cases: the guard column in a
# part block after the last output block (W = 8, 24, 16, 48), a wider grid whose column lw − 1 lies
# beyond that block (VALID first: 8 or 16 valid columns of a 17- or 40-wide image → the left
# neighbour of column 0 from an unaligned block), the wrap at a block boundary (CIRCULAR, W = 16:
# no guard column), a single block (W = 8; 16 on AVX-512), 4 + 2 single blocks (W = 48 on AVX2),
# 2 + 1 (W = 48 on AVX-512), pooled grids, leaky/abs, no bias, TLIVE off (first layer) and on.
_CONV3_CASES = {
    "same-8x24": ((_conv(), RELU, _conv(), LEAKY, _conv(b=None), RELU, fc.Readout("GAP")), (8, 24)),
    "same-5x8": ((_conv(), ABS, _conv(), RELU, fc.Readout("FLATTEN")), (5, 8)),
    "same-3x48": ((_conv(), RELU, _conv(), RELU, fc.Readout("GAP")), (3, 48)),
    "circular-16": (
        (_conv((3, 3), "CIRCULAR"), RELU, _conv((3, 3), "CIRCULAR"), RELU, fc.Readout("GAP")),
        (6, 16),
    ),
    "valid-then-same": (
        (_conv((3, 10), "VALID"), RELU, _conv(), RELU, _conv(), LEAKY, fc.Readout("GSP")),
        (9, 17),
    ),
    "valid-then-same-40": (
        (_conv((3, 25), "VALID"), RELU, _conv(), RELU, fc.Readout("GAP")),
        (5, 40),
    ),
    "myrtle-16": (PLANS["myrtle-like"], (16, 16)),
}


@needs_cpu
@pytest.mark.parametrize("name", sorted(_CONV3_CASES))
@pytest.mark.parametrize("simd", ["avx2", "avx512"])
def test_f32_conv3_register_path_bit_exact(simd, name, monkeypatch):
    # The register path must give the bits of the two-pass form (same additions in the same
    # order; NTFAST_CONV=two-pass turns it off), NTK on and off, N1 ≠ N2, self covariances, a zero
    # image; and stay within the 2×-XLA-f32 rule of the f64 truth.
    _use_simd(simd, monkeypatch)
    plan, (h, w) = _CONV3_CASES[name]
    x1 = _images((2, h, w, 3), 31)
    x2 = jnp.concatenate([_images((2, h, w, 3), 32), jnp.zeros((1, h, w, 3))])
    truth = oracle(plan, x1, x2)
    y1, y2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    for compute_ntk in (True, False):
        kw = {"compute_ntk": compute_ntk, "compute_cov": True}
        monkeypatch.delenv("NTFAST_CONV", raising=False)
        reg = _both(plan, y1, y2, "native", **kw)
        monkeypatch.setenv("NTFAST_CONV", "two-pass")
        two = _both(plan, y1, y2, "native", **kw)
        xla32 = _both(plan, y1, y2, "xla", **kw)
        for k, (r, p, a, t) in enumerate(zip(reg, two, xla32, truth)):
            if not compute_ntk and k == 1:
                continue
            np.testing.assert_array_equal(np.asarray(r), np.asarray(p), err_msg=f"{name} {k}")
            _assert_f32_within_2x_xla(r, a, t, (name, k))


@needs_cpu
@pytest.mark.parametrize(
    "name", ["f1-f2-f5-same", "circular-flatten", "pool-same-norm", "pool-same-no-norm"]
)
def test_f32_wide_rows_avx512_bits_of_avx2(name, monkeypatch):
    # Rows of 32+ entries: the AVX-512 unit runs the ReLU-family rows (unfused after Dense /
    # pooling, and the two-pass conv + ReLU of filters other than SAME 3×3) 16 lanes at a time,
    # AVX2 8: the same operations lane by lane, so the same bits; and the f32 results within the
    # 2×-XLA-f32 rule of the f64 truth.
    x1, x2 = _images((2, 4, 35, 2), 41), _images((1, 4, 35, 2), 42)
    plan = PLANS[name]
    y1, y2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    out = {}
    for simd in ("avx2", "avx512"):
        _use_simd(simd, monkeypatch)
        out[simd] = _both(plan, y1, y2, "native", compute_cov=True)
    truth = oracle(plan, x1, x2)
    xla32 = _both(plan, y1, y2, "xla", compute_cov=True)
    for k, (a, b, t, r) in enumerate(zip(out["avx2"], out["avx512"], truth, xla32)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=f"{name} {k}")
        _assert_f32_within_2x_xla(b, r, t, (name, k))


@needs_cpu
@pytest.mark.parametrize("simd", ["avx2", "avx512"])
def test_f32_relu_rows_skip_normalization_bit_exactly(simd, monkeypatch):
    # Variance maps within 2^±30 let the f32 ReLU rows skip their power-of-two normalization
    # (simd_avx2.h, NORM=false), which must not change a bit. Bias-free ReLU networks are exactly
    # homogeneous under a power-of-two input scale (every step scales by 2^2k, no rounding
    # changes), and 2^20·x puts the maps (~2^40) outside the range, i.e. on the normalized path:
    # K(2^20 x) == 2^40 K(x) bit for bit, for the unnormalized path at x.
    _use_simd(simd, monkeypatch)
    plan = PLANS["myrtle-like"]
    x1 = _images((3, 8, 9, 3), 13).astype(jnp.float32)
    x2 = _images((2, 8, 9, 3), 14).astype(jnp.float32)
    small = _both(plan, x1, x2, "native", compute_cov=True)
    big = _both(plan, x1 * 2.0**20, x2 * 2.0**20, "native", compute_cov=True)
    for k, (a, b) in enumerate(zip(small, big)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == np.float32 and np.all(a != 0), k
        np.testing.assert_array_equal(b, a * np.float32(2.0**40), err_msg=str(k))


@needs_cpu
def test_jit_vmap_grad():
    plan = PLANS["pool-same-norm"]
    x1, x2 = _images((2, 6, 5, 2), 8), _images((3, 6, 5, 2), 9)
    _oracle_check(plan, x1, x2, jax.jit(lambda a, b: _both(plan, a, b, "native"))(x1, x2))
    batch = jnp.stack([x1, 2.0 * x1])
    vm = jax.vmap(lambda a: _both(plan, a, x2, "native")[0])(batch)
    assert _rel(vm[0], oracle(plan, x1, x2)[0]) <= 1e-12
    assert _rel(vm[1], oracle(plan, 2.0 * x1, x2)[0]) <= 1e-12


@needs_cpu
def test_grad_matches_finite_differences():
    # The custom_jvp tangent (JVP of the XLA reference) through jit(grad), against central
    # differences of the oracle along a random direction.
    plan = (_conv((2, 2)), RELU, _pool((2, 2), (1, 1)), GELU, fc.Readout("GAP"))
    x1, v = _images((2, 3, 4, 2), 10), _images((2, 3, 4, 2), 11)

    def fn(a):
        nngp, ntk, cov1, _ = _both(plan, a, None, "native")
        return jnp.sum(nngp) + jnp.sum(ntk**2) + jnp.sum(cov1)

    def fn_np(a):
        nngp, ntk, cov1, _ = oracle(plan, a, None)
        return np.sum(nngp) + np.sum(ntk**2) + np.sum(cov1)

    eps = 1e-5
    fd = (fn_np(np.asarray(x1) + eps * v) - fn_np(np.asarray(x1) - eps * v)) / (2 * eps)
    g = jax.jit(jax.grad(fn))(x1)
    assert abs(float(jnp.vdot(g, v)) - fd) <= 1e-6 * abs(fd)


@needs_cpu
def test_jit_lowering_contains_one_custom_call():
    plan = PLANS["relu-gap-3x3-same"]
    x1 = _images((2, 5, 5, 2), 11)
    text = jax.jit(lambda a: _both(plan, a, None, "native")).lower(x1).as_text()
    assert text.count("ntfast_fused_cnn") == 1
    text = jax.jit(lambda a: _both(plan, a, None, "xla")).lower(x1).as_text()
    assert "ntfast_fused_cnn" not in text


NT_NETWORKS = {
    "cnn-gap": lambda s: s.serial(
        s.Conv(4, (3, 3), padding="SAME", W_std=1.4, b_std=0.1),
        s.Relu(),
        s.Conv(4, (2, 2), padding="VALID", W_std=1.2, b_std=0.2),
        s.Gelu(),
        s.GlobalAvgPool(),
        s.Dense(3, W_std=1.1, b_std=0.1),
    ),
    "myrtle-mini": lambda s: s.serial(
        s.Conv(4, (3, 3), padding="SAME", W_std=1.4, b_std=0.0),
        s.Relu(),
        s.AvgPool((2, 2), (2, 2)),
        s.Conv(4, (3, 3), padding="SAME", W_std=1.4, b_std=0.0),
        s.LeakyRelu(0.2),
        s.AvgPool((2, 2), (2, 2)),
        s.Flatten(),
        s.Dense(10, W_std=1.4),
    ),
}


@needs_cpu
@pytest.mark.parametrize("name", sorted(NT_NETWORKS))
def test_networks_match_neural_tangents(name, nt_stax, nf_stax):
    x1, x2 = _images((3, 7, 6, 2), 12), _images((2, 7, 6, 2), 13)
    calls = []
    real = native.fused_cnn.fused_cnn_native

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    B._registry["fused_cnn"]["native"] = spy
    try:
        # "auto" picks native on CPU (explicit "native" would also apply to the layers outside
        # the fused prefix, which have no native implementation).
        out = NT_NETWORKS[name](nf_stax)[2](x1, x2)
    finally:
        B._registry["fused_cnn"]["native"] = real
    assert calls, "the native fused op did not run"
    nt = NT_NETWORKS[name](nt_stax)[2](x1, x2)
    for field in ("nngp", "ntk", "cov1", "cov2"):
        a, c = getattr(out, field), getattr(nt, field)
        if c is None:
            assert a is None
            continue
        assert _rel(a, c) <= RTOL, (field, _rel(a, c))


@needs_cpu
def test_flag_explicit_raises_auto_falls_back():
    sin_plan = (
        _conv(),
        fc.NonlinStep("sin", (("a", 1.0), ("b", 1.0), ("c", 0.0))),
        fc.Readout("GAP"),
    )
    x = _images((2, 5, 5, 2), 14)
    with pytest.raises(B.BackendError, match="sin"):
        _both(sin_plan, x, None, "native")
    query = fc.backend_query(sin_plan, x.dtype, x.shape[1:3])
    assert B.resolve("fused_cnn", "auto", query) == "xla"
    assert B.resolve(
        "fused_cnn", "auto", fc.backend_query(PLANS["myrtle-like"], x.dtype, x.shape[1:3])
    ) == ("native")
    assert native.fused_cnn.unsupported_reason(PLANS["myrtle-like"], "float16") is not None
    assert B.available_backends()["native"] is None
    assert native.auto_eligible()


def test_unavailable_module_is_reported(monkeypatch):
    # Simulate a checkout without any built module: nothing importable, nothing on disk.
    monkeypatch.setattr(native, "_modules", {})
    monkeypatch.setattr(native, "_errors", {})
    monkeypatch.setattr(native, "_candidate_dirs", list)

    def missing(name):
        raise ModuleNotFoundError(f"No module named 'ntfast._native.{name}'")

    monkeypatch.setattr(native, "_import_packaged", missing)
    reason = native.unavailable_reason()
    assert reason is not None and "_cpu" in reason and "NTFAST_NATIVE_DIR" in reason
    assert not native.auto_eligible()
    assert B.unavailable_reason("native") == reason
    assert B.resolve(
        "fused_cnn", "auto", fc.backend_query(PLANS["myrtle-like"], "float64", (8, 8))
    ) == ("xla")
    with pytest.raises(B.BackendError, match="unavailable"):
        B.resolve("fused_cnn", "native")


def test_import_ntfast_never_needs_the_module(tmp_path):
    import subprocess
    import sys

    code = (
        "import ntfast, ntfast.backend as b; r = b.available_backends()['native']; "
        "print('ok', r is None or isinstance(r, str))"
    )
    env = {"NTFAST_NATIVE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=str(__import__("pathlib").Path(ntfast.__file__).parents[1]),
        timeout=120,
    )
    assert res.returncode == 0 and "ok True" in res.stdout, res.stderr


@needs_cpu
def test_handler_rejects_bad_plans_and_shapes():
    plan = PLANS["relu-gap-3x3-same"]
    x = _images((2, 5, 7, 2), 15)
    ints, floats = native.fused_cnn._encoded(plan, (5, 7))
    out = [jax.ShapeDtypeStruct(s, x.dtype) for s in ((2, 2), (2, 2), (2,), (2,))]
    call = jax.ffi.ffi_call(native.fused_cnn.TARGET, out, vmap_method="sequential")
    attrs = {"sym": np.int64(1), "compute_ntk": np.int64(1), "compute_cov": np.int64(1)}
    bad_version = np.array(ints).copy()
    bad_version[0] = 99
    with pytest.raises(Exception, match="version"):
        jax.block_until_ready(
            call(x, x, plan_i=bad_version, plan_f=np.asarray(floats), threads=np.int64(0), **attrs)
        )
    with pytest.raises(Exception, match="plan_f"):
        jax.block_until_ready(
            call(
                x,
                x,
                plan_i=np.asarray(ints),
                plan_f=np.asarray(floats)[:-1],
                threads=np.int64(0),
                **attrs,
            )
        )
    other_size = _images((2, 6, 7, 2), 16)
    with pytest.raises(Exception, match="image size"):
        jax.block_until_ready(
            call(
                other_size,
                other_size,
                plan_i=np.asarray(ints),
                plan_f=np.asarray(floats),
                threads=np.int64(0),
                **attrs,
            )
        )


@needs_cpu
def test_set_num_threads():
    plan = PLANS["relu-gap-3x3-same"]
    x1 = _images((3, 5, 7, 2), 17)
    try:
        native.fused_cnn.set_num_threads(1)
        _oracle_check(plan, x1, None, _both(plan, x1, None, "native"))
    finally:
        native.fused_cnn.set_num_threads(None)
    with pytest.raises(ValueError, match="non-negative"):
        native.fused_cnn.set_num_threads(-1)
