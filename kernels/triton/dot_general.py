"""Triton kernels of ``ntfast.ops.dot_general``: the input covariance and the bilinear form.

Both ops are contractions; their launcher (``ntfast/_triton/dot_general.py``) maps every layout
onto one strided, batched matrix product and this file only runs the product:

``cov_matmul_kernel``
    ``out[g2, g1, i, j] = Σ_k A[g2, g1, i, k] · B[g2, g1, j, k] / DIVISOR`` on ``tl.dot`` tiles,
    accumulated in the input dtype (f32 or f64). Operands are addressed by one stride per index
    (a stride 0 broadcasts an operand along a batch index), so most layouts need no copy. The
    output row and column offsets are ``(i // ROW_LO) · O_SM + row_tab[i % ROW_LO]`` (columns
    alike): a small int32 table of the offsets of the inner ``ROW_LO`` rows lets one product write
    NT's zipped ``(N1, N2, H, H', W, W')`` covariance directly, where rows ``(n, h, w)`` and columns
    ``(m, h', w')`` interleave in memory. The input covariance ``x1·x2ᵀ/C`` is one product
    (``DIVISOR = C``); the bilinear form ``Σ O1[p, a] · O2[q, b] · K[a, b]`` is two
    (``DIVISOR = 1``).

``pixel_cov_kernel``
    ``out[g, n, m, s] = Σ_c x1[g, n, s, c] · x2[g, m, s, c] / DIVISOR``: the diagonal-spatial
    covariance, one small product per pixel ``s``. As a batched matmul its stores would stride by
    the pixel count; here a program owns a ``BLOCK_N × BLOCK_N × BLOCK_S`` box of ``(n, m, s)``
    and writes runs of ``BLOCK_S`` consecutive pixels, reading each input value for ``BLOCK_N``
    outputs.

``sq_norm_kernel``
    ``out[r] = Σ_k x[r, k]² / DIVISOR``: the per-image, per-pixel input variances (the
    ``diagonal_batch`` and ``diagonal_spatial`` layout), which are no matrix product.

f32 products take ``INPUT_PRECISION`` (``"ieee"``: true f32 FMAs; ``"tf32"`` only when the caller
asked for ``lax.Precision.DEFAULT``); the other kernels use plain FMAs. f64 products run with an
f64 accumulator (``tl.dot`` supports fp64 only that way). ``tl.dot`` needs tiles of at least 16 on
a GPU, so every ``BLOCK_*`` is ≥ 16; masked loads pad short edges (odd sizes, ``K < 16``) with 0.
Pointer offsets are computed in int64: the outputs of big batches exceed 2³¹ elements.
"""

import triton
import triton.language as tl


@triton.jit
def cov_matmul_kernel(
    a_ptr,  # A: (G2, G1, M, K) f32|f64, strided (A_SG2, A_SG1, A_SM, A_SK)
    b_ptr,  # B: (G2, G1, N, K) same dtype, strided (B_SG2, B_SG1, B_SN, B_SK)
    row_tab_ptr,  # (ROW_LO,) int32: out offset of row i % ROW_LO
    col_tab_ptr,  # (COL_LO,) int32: out offset of column j % COL_LO
    out_ptr,  # out: (G2, G1, M, N) same dtype, addressed as in the module docstring
    M,
    N,
    K,
    G1,
    A_SG2,
    A_SG1,
    A_SM,
    A_SK,
    B_SG2,
    B_SG1,
    B_SN,
    B_SK,
    O_SG2,
    O_SG1,
    O_SM,
    O_SN,
    ROW_LO,
    COL_LO,
    DIVISOR,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One ``BLOCK_M × BLOCK_N`` output tile per program; a 1-D grid over (g2, g1, tile_m, tile_n).

    A 1-D grid because the batch counts (pixels, images × vmapped axes) exceed CUDA's 65535 limit
    of the second and third grid axes.
    """
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    tiles = tiles_m * tiles_n
    g = pid // tiles
    t = pid % tiles
    g2 = (g // G1).to(tl.int64)
    g1 = (g % G1).to(tl.int64)
    tm = t // tiles_n
    tn = t % tiles_n

    offs_m = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    a_ptrs = (
        a_ptr
        + g2 * A_SG2
        + g1 * A_SG1
        + offs_m[:, None].to(tl.int64) * A_SM
        + offs_k[None, :].to(tl.int64) * A_SK
    )
    # B is read transposed, (BLOCK_K, BLOCK_N), as tl.dot's right operand.
    b_ptrs = (
        b_ptr
        + g2 * B_SG2
        + g1 * B_SG1
        + offs_k[:, None].to(tl.int64) * B_SK
        + offs_n[None, :].to(tl.int64) * B_SN
    )
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=a_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * A_SK
        b_ptrs += BLOCK_K * B_SK

    row_off = (offs_m // ROW_LO).to(tl.int64) * O_SM + tl.load(
        row_tab_ptr + offs_m % ROW_LO, mask=mask_m, other=0
    ).to(tl.int64)
    col_off = (offs_n // COL_LO).to(tl.int64) * O_SN + tl.load(
        col_tab_ptr + offs_n % COL_LO, mask=mask_n, other=0
    ).to(tl.int64)
    out_ptrs = out_ptr + g2 * O_SG2 + g1 * O_SG1 + row_off[:, None] + col_off[None, :]
    tl.store(out_ptrs, acc / DIVISOR, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def pixel_cov_kernel(
    a_ptr,  # x1: (G, N1, P, C) f32|f64, contiguous per g; A_SG = 0 broadcasts over g
    b_ptr,  # x2: (G, N2, P, C) same dtype; B_SG
    out_ptr,  # (G, N1, N2, P) same dtype, contiguous
    N1,
    N2,
    P,
    C,
    A_SG,
    B_SG,
    DIVISOR,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One ``(n, m, s)`` box per program; a 1-D grid with the pixel blocks fastest, so programs
    launched together write neighbouring runs of the same ``out[g, n, m, :]`` rows."""
    pid = tl.program_id(0)
    tiles_s = (P + BLOCK_S - 1) // BLOCK_S
    tiles_n = (N1 + BLOCK_N - 1) // BLOCK_N
    tiles_m = (N2 + BLOCK_N - 1) // BLOCK_N
    ts = pid % tiles_s
    rest = pid // tiles_s
    tm = rest % tiles_m
    rest = rest // tiles_m
    tn = rest % tiles_n
    g = (rest // tiles_n).to(tl.int64)

    offs_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tm * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = ts * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < P
    mask_a = (offs_n < N1)[:, None] & mask_s[None, :]
    mask_b = (offs_m < N2)[:, None] & mask_s[None, :]
    a_ptrs = a_ptr + g * A_SG + offs_n[:, None].to(tl.int64) * P * C + offs_s[None, :] * C
    b_ptrs = b_ptr + g * B_SG + offs_m[:, None].to(tl.int64) * P * C + offs_s[None, :] * C
    acc = tl.full((BLOCK_N, BLOCK_N, BLOCK_S), 0, dtype=a_ptr.dtype.element_ty)
    for c in range(C):
        a = tl.load(a_ptrs + c, mask=mask_a, other=0.0)
        b = tl.load(b_ptrs + c, mask=mask_b, other=0.0)
        acc += a[:, None, :] * b[None, :, :]

    out_ptrs = (
        out_ptr
        + g * N1 * N2 * P
        + offs_n[:, None, None].to(tl.int64) * N2 * P
        + offs_m[None, :, None].to(tl.int64) * P
        + offs_s[None, None, :]
    )
    mask = (offs_n < N1)[:, None, None] & (offs_m < N2)[None, :, None] & mask_s[None, None, :]
    tl.store(out_ptrs, acc / DIVISOR, mask=mask)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def sq_norm_kernel(
    x_ptr,  # (R, K) f32|f64, strided (X_SR, X_SK): rows = (image, pixel), K = channels
    out_ptr,  # (R,) same dtype, contiguous
    R,
    K,
    X_SR,
    X_SK,
    DIVISOR,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[r] = Σ_k x[r, k]² / DIVISOR``; one program per ``BLOCK_R`` rows, loop over ``K``."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < R
    ptrs = x_ptr + offs_r[:, None].to(tl.int64) * X_SR + offs_k[None, :].to(tl.int64) * X_SK
    acc = tl.full((BLOCK_R,), 0, dtype=x_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(ptrs, mask=mask_r[:, None] & (offs_k[None, :] < K - k0), other=0.0)
        # tl.reduce with a local combine is what tl.sum expands to; Triton's library @jit helpers
        # (tl.sum, tl.zeros, tl.cdiv) are avoided because the runtime's CPU interpreter path
        # cannot call them reliably in a process that also compiles kernels.
        acc += tl.reduce(x * x, 1, _add)
        ptrs += BLOCK_K * X_SK
    tl.store(out_ptr + offs_r, acc / DIVISOR, mask=mask_r)
