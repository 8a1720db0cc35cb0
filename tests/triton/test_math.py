"""Accuracy of the portable math helpers ``kernels/triton/_math.py`` over their whole input range.

The helpers run in the Triton interpreter (the same source the GPU compiles), on f32 and f64,
against numpy: ``div``/``sqrt``/``recip`` must be correctly rounded (bit-equal to IEEE numpy);
``atan2`` and ``exp`` within 1 ulp of the correctly rounded result (truth: numpy in f64 for f32,
in long double for f64 where the platform has it). Inputs cover zeros of both signs, subnormals,
the largest finite values, infinities, NaN, every octant and the reduction boundaries
(``|y/x| = tan(π/8)``, ``|y| = |x|``), and the ±1 "clip points" of the arc-cosine kernels
(``atan2(sn, c)`` with ``sn → 0``, ``c → ±1``).
"""

import numpy as np
import pytest
import triton
import triton.language as tl

from ntfast._triton import runtime

M = runtime.kernels("_math", interpret=True)
BLOCK = 16384

with triton.knobs.runtime.scope():
    triton.knobs.runtime.interpret = True

    @triton.jit
    def _apply(x_ptr, y_ptr, out_ptr, n, FN: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=1.0)
        y = tl.load(y_ptr + offs, mask=mask, other=1.0)
        if FN == 0:
            r = M.atan2(y, x)
        elif FN == 1:
            r = M.exp(x)
        elif FN == 2:
            r = M.div(y, x)
        elif FN == 3:
            r = M.sqrt(x)
        else:
            r = M.recip(x)
        tl.store(out_ptr + offs, r, mask=mask)


_FN = {"atan2": 0, "exp": 1, "div": 2, "sqrt": 3, "recip": 4}


def run(fn: str, x, y=None):
    x = np.ascontiguousarray(x)
    y = np.ones_like(x) if y is None else np.ascontiguousarray(y, x.dtype)
    out = np.zeros_like(x)
    grid = (-(-x.size // BLOCK),)
    with np.errstate(all="ignore"):  # the interpreter evaluates inf/NaN lanes with numpy
        runtime.run_interpreted(_apply, grid, x, y, out, x.size, FN=_FN[fn], BLOCK=BLOCK)
    return out


_LD = np.finfo(np.longdouble).nmant > np.finfo(np.float64).nmant


def ulp_error(got, truth, dtype):
    """|got − truth| in units of the spacing of ``dtype`` at the rounded truth (NaN/inf: exact)."""
    with np.errstate(over="ignore"):
        truth_r = truth.astype(dtype)
    special = ~np.isfinite(truth_r) | ~np.isfinite(got)
    assert np.array_equal(np.isnan(got), np.isnan(truth_r)), "NaN pattern differs"
    assert np.array_equal(got[special & ~np.isnan(got)], truth_r[special & ~np.isnan(got)])
    spacing = np.spacing(np.abs(truth_r)).astype(truth.dtype)
    with np.errstate(invalid="ignore"):
        err = np.abs(got.astype(truth.dtype) - truth) / spacing
    return np.where(special, 0.0, err)


def _magnitudes(dtype, n, rng):
    info = np.finfo(dtype)
    lo, hi = np.log10(info.smallest_subnormal), np.log10(info.max)
    return (10.0 ** rng.uniform(lo, hi, n)).astype(dtype)


def _atan2_inputs(dtype):
    rng = np.random.default_rng(0)
    n = 40000
    sign = lambda: rng.choice([-1.0, 1.0], n).astype(dtype)
    # wide: magnitudes over the whole range, both signs
    y, x = sign() * _magnitudes(dtype, n, rng), sign() * _magnitudes(dtype, n, rng)
    # ratio-controlled: |y/x| from 1e-12 to 1e12, densest near the reduction points
    base = (10.0 ** rng.uniform(-3, 3, n)).astype(dtype)
    ratio = np.concatenate(
        [
            10.0 ** rng.uniform(-12, 12, n // 2),
            np.tan(np.pi / 8) * (1 + rng.uniform(-1e-3, 1e-3, n // 4)),
            1 + rng.uniform(-1e-3, 1e-3, n - n // 2 - n // 4),
        ]
    )
    y2, x2 = sign() * (base * ratio).astype(dtype), sign() * base
    # arc-cosine clip points: (sn, c) = (√(1 − c²) ≥ 0, c → ±1) and sn tiny at |c| = 1
    c = np.concatenate(
        [1 - 10.0 ** rng.uniform(-16, 0, n // 2), -1 + 10.0 ** rng.uniform(-16, 0, n // 2)]
    )
    c = np.clip(c, -1, 1).astype(dtype)
    sn = np.sqrt(np.maximum(1 - c.astype(np.float64) ** 2, 0)).astype(dtype)
    tiny = _magnitudes(dtype, 200, rng) * np.finfo(dtype).eps
    specials = np.array(
        [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, np.finfo(dtype).max, np.finfo(dtype).tiny],
        dtype,
    )
    sy, sx = np.meshgrid(specials, specials)
    both_inf = np.isinf(sy) & np.isinf(sx)  # documented: NaN (numpy: odd multiples of π/4)
    sy, sx = sy[~both_inf], sx[~both_inf]
    ys = np.concatenate([y, y2, sn, tiny, tiny, sy]).astype(dtype)
    xs = np.concatenate([x, x2, c, np.ones_like(tiny), -np.ones_like(tiny), sx]).astype(dtype)
    return ys, xs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_atan2_within_one_ulp_everywhere(dtype):
    y, x = _atan2_inputs(dtype)
    got = run("atan2", x, y)
    truth_dtype = np.longdouble if (dtype == np.float64 and _LD) else np.float64
    truth = np.arctan2(y.astype(truth_dtype), x.astype(truth_dtype))
    err = ulp_error(got, truth, dtype)
    assert err.max() <= 1.0, (dtype, err.max(), y[err.argmax()], x[err.argmax()])
    # Exact values the kernels rely on: θ = 0 at c = 1, π at c = −1 (sn = 0), signs of zeros.
    z = np.zeros(4, dtype)
    np.testing.assert_array_equal(
        run("atan2", np.array([1, -1, 0.0, -0.0], dtype), z),
        np.arctan2(z, np.array([1, -1, 0.0, -0.0], dtype)),
    )


def test_atan2_both_infinite_is_nan():
    inf = np.array([np.inf, -np.inf], np.float32)
    assert np.isnan(run("atan2", inf, inf[::-1].copy())).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_within_one_ulp_over_whole_range(dtype):
    rng = np.random.default_rng(1)
    lo, hi = (-110.0, 95.0) if dtype == np.float32 else (-750.0, 712.0)
    x = np.concatenate(
        [
            rng.uniform(lo, hi, 60000),
            rng.uniform(-1, 1, 20000) * 10.0 ** rng.uniform(-40, 0, 20000),
            np.log(np.finfo(dtype).max) + rng.uniform(-1e-3, 1e-3, 500),
            np.log(np.finfo(dtype).smallest_subnormal) + rng.uniform(-1, 1, 500),
            np.log(np.finfo(dtype).tiny) + rng.uniform(-1, 1, 500),
            [0.0, -0.0, np.inf, -np.inf, np.nan, np.finfo(dtype).max, -np.finfo(dtype).max],
        ]
    ).astype(dtype)
    got = run("exp", x)
    truth_dtype = np.longdouble if (dtype == np.float64 and _LD) else np.float64
    with np.errstate(over="ignore"):
        truth = np.exp(x.astype(truth_dtype))
    err = ulp_error(got, truth, dtype)
    assert err.max() <= 1.0, (dtype, err.max(), x[err.argmax()])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_div_sqrt_recip_correctly_rounded(dtype):
    rng = np.random.default_rng(2)
    n = 20000
    a = rng.choice([-1.0, 1.0], n).astype(dtype) * _magnitudes(dtype, n, rng)
    b = rng.choice([-1.0, 1.0], n).astype(dtype) * _magnitudes(dtype, n, rng)
    specials = np.array([0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, 3.0], dtype)
    a = np.concatenate([a, np.repeat(specials, specials.size)])
    b = np.concatenate([b, np.tile(specials, specials.size)])
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(run("div", b, a), a / b)
        np.testing.assert_array_equal(run("recip", b), np.ones_like(b) / b)
        np.testing.assert_array_equal(run("sqrt", np.abs(a)), np.sqrt(np.abs(a)))
        assert np.isnan(run("sqrt", np.array([-1.0, -1e-30], dtype))).all()
