"""Kernels that exercise ntfast/_triton/runtime.py (not ntfast ops)."""

import triton
import triton.language as tl

from ._probe_helpers import twice


@triton.jit
def scale_add_kernel(
    x_ptr,  # (N,) f32|f64
    y_ptr,  # (N,) f32|f64
    out_ptr,  # (N,) same dtype: out = c * x + 2 * y
    n,
    c,
    BLOCK: tl.constexpr,
):
    """out = c·x + twice(y); one program per BLOCK entries."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, c * x + twice(y), mask=mask)


@triton.jit
def two_outputs_kernel(
    x_ptr,  # (N,)
    sum_ptr,  # (1,) accumulated with atomics: relies on zero-initialised outputs
    sq_ptr,  # (N,) x²
    n,
    BLOCK: tl.constexpr,
):
    """sum = Σ x (atomically per program), sq = x²."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.atomic_add(sum_ptr, tl.sum(x, axis=0))
    tl.store(sq_ptr + offs, x * x, mask=mask)


@triton.jit
def unmasked_kernel(
    x_ptr,  # (N,)
    out_ptr,  # (N,)
    n,
    BLOCK: tl.constexpr,
):
    """Copies BLOCK entries per program WITHOUT a mask: writes past the end when N % BLOCK != 0
    (the canary guard must catch it)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs))
