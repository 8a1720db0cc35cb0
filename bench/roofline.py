"""Bytes, flops and the H100 roofline bound of every benchmarked op call (paper figures).

Usage::

    python bench/roofline.py [--dtype float32|float64]

prints, per op case of ``bench/bench_ops.py`` and named op shape of ``bench/shapes.py``, the bytes
moved and the flops of one call, its arithmetic intensity and the H100 bound
``max(bytes / bandwidth, flops / peak)``. ``bench_ops.py`` stores the same figures in each
benchmark's ``extra_info`` and ``bench/report.py`` sets them beside the measured times.

Counting rules (what the Triton launches of ntfast must move at least): every launch reads each
of its inputs once and writes each of its outputs once, so an op made of several launches (the two
products of ``dot_general``, one conv pass per spatial pair) pays for its intermediates. Flops
count multiply-adds as 2; the nonlinearities' closed forms count each transcendental (sqrt, atan2,
asin, ...) as its polynomial evaluation, ~20 flops; these expectations are far below the H100's
ridge point (~18 flop/byte in f32), so the bound is the memory traffic whatever the estimate.
The cost functions use only the standard library (``report.py`` needs none of this module: the
figures travel in the benchmark JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

# NVIDIA H100 SXM: HBM3 bandwidth, and the dense peaks ``tl.dot``/FMA code can reach without
# tf32 (f32 on CUDA cores, f64 through DMMA): rounded figures from the data sheet.
H100 = {"name": "H100 SXM", "bandwidth": 3.35e12, "float32": 60e12, "float64": 30e12}

# Arithmetic per covariance entry of a nonlinearity's closed form (see the module docstring).
NONLIN_FLOPS = {
    # P = q11·q22, s = sqrt(P − q12²), θ = atan2(s, q12), q12' = (s + (π − θ) q12)/2π,
    # Σ̇ = (π − θ)/2π, ntk·Σ̇, plus the scale-free normalisation.
    "abrelu": 36,
    # q12' = (2/π) asin(2 q12 / sqrt((1 + 2 q11)(1 + 2 q22))), Σ̇ = 4/(π sqrt(det)), ntk·Σ̇.
    "erf": 40,
}
_ITEMSIZE = {"float32": 4, "float64": 8}


@dataclasses.dataclass(frozen=True)
class Cost:
    """One op call: bytes moved, flops, and the launches they are made of."""

    bytes: int
    flops: int
    launches: int

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else float("inf")


def bound(cost: Cost, dtype: str = "float32", peaks: dict = H100) -> tuple[float, str]:
    """``(seconds, limiter)``: ``max(bytes / bandwidth, flops / peak)`` and which term wins."""
    t_mem = cost.bytes / peaks["bandwidth"]
    t_flop = cost.flops / peaks[dtype]
    return (t_mem, "memory") if t_mem >= t_flop else (t_flop, "compute")


def _pixels(height: int, width: int) -> int:
    return height * width


def input_cov_cost(n1, n2, height, width, channels, dtype="float32") -> Cost:
    """``input_cov(x1, x2)`` with ``diagonal_batch=True``, full spatial (the CNN layout):
    ``cov1 (N1, H, H, W, W)``, ``nngp (N1, N2, H, H, W, W)``, ``cov2 (N2, ...)``; one product per
    array, ``K = C``, plus the division by ``C`` (1 flop per entry)."""
    p = _pixels(height, width)
    outputs = (n1 + n1 * n2 + n2) * p * p
    inputs = 2 * (n1 + n2) * p * channels  # each image set read by two of the three launches
    return Cost(
        bytes=_ITEMSIZE[dtype] * (inputs + outputs),
        flops=(2 * channels + 1) * outputs,
        launches=3,
    )


def conv_cov_cost(n1, n2, height, width, channels=None, dtype="float32", filter_shape=(3, 3)):
    """``conv_cov`` of a zipped ``nngp (N1, N2, H, H, W, W)``, stride 1, SAME: one pass per
    spatial pair, each reading and writing the whole array; ``f`` adds per entry per pass (the
    separable diagonal sum) and one scaling multiply."""
    size = n1 * n2 * _pixels(height, width) ** 2
    passes = len(filter_shape)
    return Cost(
        bytes=_ITEMSIZE[dtype] * 2 * size * passes,
        flops=size * (sum(filter_shape) + 1),
        launches=passes,
    )


def nonlin_cost(n1, n2, height, width, channels=None, dtype="float32", kind="abrelu") -> Cost:
    """``nonlin(kind, q12, q11, q22, ntk)`` on a zipped ``nngp``: reads ``q12`` and ``ntk``, the
    per-image variance maps ``q11 (N1, H, W)``, ``q22 (N2, H, W)``; writes ``q12'`` and ``ntk'``."""
    p = _pixels(height, width)
    size = n1 * n2 * p * p
    return Cost(
        bytes=_ITEMSIZE[dtype] * (4 * size + (n1 + n2) * p),
        flops=NONLIN_FLOPS[kind] * size,
        launches=1,
    )


def dot_general_cost(n1, n2, height, width, channels=None, dtype="float32") -> Cost:
    """``bilinear`` of a zipped ``nngp (N1, N2, H, H', W, W')`` with a dense ``O (H, H)`` on both
    ``H`` axes: ``O1`` into ``K`` (``(N1, N2, H, H', W, W')``, ``K = H``), then ``O2`` into that;
    the intermediate is written once and read once."""
    p = _pixels(height, width)
    size = n1 * n2 * p * p
    return Cost(
        bytes=_ITEMSIZE[dtype] * (4 * size + 2 * 2 * height * height),
        flops=2 * 2 * size * height,
        launches=2,
    )


COSTS = {
    "input_cov": input_cov_cost,
    "conv_cov": conv_cov_cost,
    "nonlin_relu": lambda *a, **k: nonlin_cost(*a, kind="abrelu", **k),
    "nonlin_erf": lambda *a, **k: nonlin_cost(*a, kind="erf", **k),
    "dot_general": dot_general_cost,
}
"""Op case name (as in ``bench_ops.py``) -> ``cost(n1, n2, height, width, channels, dtype)``."""


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def table(shapes: dict, dtype: str = "float32") -> list[str]:
    """Paper roofline of every op case on every shape (``shapes``: name -> object with ``n1, n2,
    height, width, channels``)."""
    header = (
        f"{'op':<12} {'shape':<10} {'launches':>8} {'MB':>9} {'MFLOP':>10} {'flop/B':>7} "
        f"{'H100 bound':>11}  limiter"
    )
    title = f"H100 roofline ({dtype}): {H100['bandwidth'] / 1e12:.2f} TB/s, "
    title += f"{H100[dtype] / 1e12:.0f} TFLOP/s"
    lines = [title, header, "-" * len(header)]
    for op, cost_fn in COSTS.items():
        for name, s in shapes.items():
            c = cost_fn(s.n1, s.n2, s.height, s.width, s.channels, dtype=dtype)
            t, limiter = bound(c, dtype)
            lines.append(
                f"{op:<12} {name:<10} {c.launches:>8} {c.bytes / 1e6:>9.3f} {c.flops / 1e6:>10.2f} "
                f"{c.intensity:>7.2f} {format_time(t):>11}  {limiter}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32", choices=tuple(_ITEMSIZE))
    args = p.parse_args(argv)
    try:
        from bench.shapes import OP_SHAPES
    except ImportError:  # run as a script from bench/
        from shapes import OP_SHAPES
    print("\n".join(table(OP_SHAPES, args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
