"""Native CPU fused kernel: time per kernel entry, 1 vs 2 threads, and GFLOP/s.

Runs ``ntfast.ops.fused_cnn.fused_cnn(..., backend="native")`` on the conv prefix of the
benchmark networks (``bench/networks.py``; the Dense head after the readout is negligible) for
CIFAR-sized f32 images, NNGP + NTK, and prints per network and thread count: seconds per call,
milliseconds per kernel entry, and GFLOP/s of the analytic operation count below. The thread
count goes through ``NTFAST_NUM_THREADS``, which the handler reads on every call (no recompile).

Operation count (per entry of an offset plane, both NNGP and NTK propagated; a division or a
square root counts as one operation, comparisons/selects are free), every plane of the periodic
grid ``(Lh·Lw)²`` of each segment, margins included (the kernel computes them):

* input covariance: ``2C`` (one multiply-add per channel);
* conv ``fh×fw``: box sums ``2·((fh−1) + (fw−1))`` + affine/mask NNGP 3 + NTK 5;
* ReLU (``abrelu``, fused_math.h): 62 (Gram normalization 6, det/sqrt 4, atan2 rational 30,
  k0/k1 8, outputs/masks 14);
* AvgPool ``p×p``: ``2·(p²)² + 2`` per output entry (both arrays); GAP readout: 2.

The count is the math's (the portable formulas of ``kernels/common/fused_math.h``), not the
instructions a build executes (the AVX2/AVX-512 f32 ReLU row needs fewer, the masked columns are
skipped): GFLOP/s compare runs and machines. Against the CPU's peak only loosely: the 2-vCPU
AMD EPYC (Zen 4) CI-class machine has 2 cores × 2.6 GHz × 2 FMA pipes × 8 f32 lanes × 2 = 166
GFLOP/s of f32 FMA (nominal clock), and the native kernel now reaches 144–193 GFLOP/s of this
count (Myrtle-10, CNN-GAP-8; 200 on 256×256 images): more than that peak, because the f32 rows
execute fewer operations than the count (no Gram normalization where the variance maps allow,
a polynomial instead of the 30-operation rational arctangent, conv sums shared by lane shifts).
The vector pipes, not memory, bound it (the layer stack of a plane lives in L1).

Usage: ``python -m bench.bench_native [--networks Myrtle-10 CNN-GAP-8] [--n 2] [--threads 1 2]``
(``NTFAST_NATIVE_DIR`` for a development build). Pairs evaluated per call: ``n×n`` cross pairs;
with poolings also one lean self pair per image (only the offsets of its variance maps).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import networks
from ntfast.ops import fused_cnn as fc

RELU_FLOPS = 62


def plan_of(name: str):
    """The fused plan of the network's conv prefix (up to its readout)."""
    steps = []
    for layer, kw in networks.NETWORKS[name]:
        if layer == "Conv":
            b = kw.get("b_std", 0.0)
            steps.append(
                fc.ConvStep(tuple(kw["filter_shape"]), kw["padding"], kw["W_std"] ** 2, b * b)
            )
        elif layer == "Relu":
            steps.append(fc.NonlinStep("abrelu", (("a", 0.0), ("b", 1.0))))
        elif layer == "AvgPool":
            steps.append(
                fc.PoolStep(tuple(kw["window_shape"]), tuple(kw["strides"]), "VALID", "AVG", False)
            )
        elif layer in ("Flatten", "GlobalAvgPool"):
            steps.append(fc.Readout("FLATTEN" if layer == "Flatten" else "GAP"))
            return tuple(steps)
        else:
            raise ValueError(f"{name}: layer {layer} is not in a fused conv prefix")
    raise ValueError(f"{name}: no readout")


def flops_per_pair(plan, size, channels: int) -> float:
    """Analytic operation count of one pair through ``plan`` (see the module docstring)."""
    total = 0.0
    for k, seg in enumerate(fc.segments(plan, size)):
        lh, lw = seg.grid
        flatten = isinstance(seg.end, fc.Readout) and seg.end.kind == "FLATTEN"
        entries = (lh * lw) * (1 if flatten else lh * lw)
        if k == 0:
            total += 2 * channels * entries
        for s in seg.steps:
            if isinstance(s, fc.ConvStep):
                fh, fw = s.filter_shape
                total += (2 * ((fh - 1) + (fw - 1)) + 8) * entries
            elif isinstance(s, fc.DenseStep):
                total += 8 * entries
            else:
                total += RELU_FLOPS * entries
        if isinstance(seg.end, fc.PoolStep):
            p = seg.end.window_shape
            nxt = fc.segments(plan, size)[k + 1].grid
            total += (2 * (p[0] * p[1]) ** 2 + 2) * (nxt[0] * nxt[1]) ** 2
        elif not flatten:
            total += 2 * entries
    return total


def run(name: str, n: int, threads: list[int], rounds: int, size=(32, 32), channels=3):
    plan = plan_of(name)
    rng = np.random.default_rng(0)
    x1 = jnp.asarray(rng.standard_normal((n, *size, channels)), jnp.float32)
    x2 = jnp.asarray(rng.standard_normal((n, *size, channels)), jnp.float32)
    fn = jax.jit(
        lambda a, b: fc.fused_cnn(a, b, plan=plan, compute_cov=False, backend="native")[:2]
    )
    # Cross pairs only: with compute_cov=False the self pairs of a pooling network run only the
    # offsets their variance maps need (a few planes per segment), not counted.
    n_pairs = n * n
    flops = flops_per_pair(plan, size, channels) * n_pairs
    rows = []
    for t in threads:
        os.environ["NTFAST_NUM_THREADS"] = str(t)
        jax.block_until_ready(fn(x1, x2))  # compile + warm up
        best = cpu = float("inf")
        for _ in range(rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(x1, x2))
            best = min(best, time.perf_counter() - t0)
            cpu = min(cpu, time.process_time() - c0)
        rows.append((t, best))
        # CPU seconds of the process (all threads): robust to other load on the machine, where
        # the wall time of 2 threads is not.
        print(
            f"{name:10s} threads={t}  {best:8.3f} s/call (cpu {cpu:6.3f} s)  "
            f"{1e3 * best / (n * n):8.1f} ms/entry  "
            f"{flops / best / 1e9:6.1f} GFLOP/s  ({n_pairs} cross pairs, "
            f"{flops / n_pairs / 1e9:.2f} GFLOP/pair)",
            flush=True,
        )
    if len(rows) > 1:
        print(
            f"{name:10s} speed-up {rows[0][0]}->{rows[-1][0]} threads: "
            f"{rows[0][1] / rows[-1][1]:.2f}x",
            flush=True,
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--networks", nargs="+", default=["Myrtle-10", "CNN-GAP-8"])
    p.add_argument("--n", type=int, default=2, help="images per side (n×n entries)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, nargs=2, default=[32, 32])
    args = p.parse_args(argv)
    import ntfast._native as native

    print("native build:", native.build_info())
    for name in args.networks:
        run(name, args.n, args.threads, args.rounds, tuple(args.size))


if __name__ == "__main__":
    main()
