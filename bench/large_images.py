"""Large-image CNN kernels: time per pair and peak memory against image size (32 … 256).

The 8-layer CNN-GAP network (``bench/networks.py``) NNGP+NTK, f32, through ntfast's fused
per-offset path (``ntfast.ops.fused_cnn``), one fresh process per image size so that each peak
RSS (``ru_maxrss``) is that size's alone. Prints a table, writes it as Markdown and JSON, and
plots time per pair and peak RSS against the image side with the ``(HW)²`` scaling line (the work
of one pair: ``(HW)²`` covariance entries per layer) through the smallest measured size.

    python bench/large_images.py                        # 32 64 128 (4x4 pairs) and 256 (1x1)
    python bench/large_images.py --sizes 32 64 --pairs 2x2 2x2 --out bench/out/large

Pairs ``AxB``: ``x1`` has A images, ``x2`` B images (``get=("nngp", "ntk")`` with a Dense-only
head: no per-image self pairs are needed, so A·B pair evaluations). Neural Tangents holds one
``(HW)²`` array per layer and pair (1 GiB per array at 128×128 f32); it is not run here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SIZES = (32, 64, 128, 256)
DEFAULT_PAIRS = ("4x4", "4x4", "4x4", "1x1")


def _one(size: int, n1: int, n2: int, tile: int | None) -> dict:
    """Runs in the child process: one kernel_fn call, timed after compilation."""
    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    from bench import networks
    from ntfast import stax
    from ntfast.stax.fused import fused_options

    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((n1, size, size, 3)).astype(np.float32)
    x2 = rng.standard_normal((n2, size, size, 3)).astype(np.float32)
    kernel_fn = networks.build("CNN-GAP-8", stax)[2]
    with fused_options(tile=tile):
        fn = jax.jit(lambda a, b: tuple(kernel_fn(a, b, get=("nngp", "ntk"))))
        t0 = time.perf_counter()
        compiled = fn.lower(x1, x2).compile()
        compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    nngp, ntk = jax.block_until_ready(compiled(x1, x2))
    run_s = time.perf_counter() - t0
    assert np.all(np.isfinite(nngp)) and np.all(np.isfinite(ntk))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "size": size,
        "pairs": n1 * n2,
        "compile_s": compile_s,
        "run_s": run_s,
        "per_pair_s": run_s / (n1 * n2),
        "peak_rss_gib": peak_kib / 2**20,
        "nngp00": float(nngp[0, 0]),
        "cpu_count": os.cpu_count(),
    }


def _child(size: int, pairs: str, tile: int | None) -> dict:
    n1, n2 = (int(v) for v in pairs.lower().split("x"))
    cmd = [sys.executable, __file__, "--child", str(size), str(n1), str(n2)]
    if tile is not None:
        cmd += ["--tile", str(tile)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> list[str]:
    base = rows[0]
    lines = [
        "| image | pairs | time / pair | (HW)² line | peak RSS | compile |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        line = base["per_pair_s"] * (r["size"] / base["size"]) ** 4
        lines.append(
            f"| {r['size']}×{r['size']} | {r['pairs']} | {r['per_pair_s']:.3g} s | "
            f"{line:.3g} s | {r['peak_rss_gib']:.2f} GiB | {r['compile_s']:.1f} s |"
        )
    return lines


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[bench]'): no plot written")
        return False
    sizes = [r["size"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.loglog(sizes, [r["per_pair_s"] for r in rows], "o-", label="ntfast fused (measured)")
    s0, t0 = sizes[0], rows[0]["per_pair_s"]
    ax1.loglog(sizes, [t0 * (s / s0) ** 4 for s in sizes], "--", label="(HW)² scaling")
    ax1.set_xlabel("image side (pixels)")
    ax1.set_ylabel("seconds per pair (NNGP+NTK)")
    ax1.set_title("CNN-GAP-8, f32")
    ax1.legend()
    ax2.semilogx(sizes, [r["peak_rss_gib"] for r in rows], "o-", label="ntfast peak RSS")
    ax2.semilogx(
        sizes, [(s**4) * 4 / 2**30 for s in sizes], ":", label="one (HW)² f32 array (NT: per layer)"
    )
    ax2.set_ylim(0, max(9, max(r["peak_rss_gib"] for r in rows) * 1.2))
    ax2.axhline(8, color="gray", lw=0.5)
    ax2.set_xlabel("image side (pixels)")
    ax2.set_ylabel("GiB")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    ap.add_argument("--pairs", nargs="+", default=None, help="AxB per size (default 4x4…, 1x1)")
    ap.add_argument("--tile", type=int, default=None, help="offset rows per tile (default auto)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "large_images"))
    ap.add_argument("--child", type=int, nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_one(*args.child, args.tile)))
        return 0
    pairs = args.pairs or [
        DEFAULT_PAIRS[DEFAULT_SIZES.index(s)] if s in DEFAULT_SIZES else "1x1" for s in args.sizes
    ]
    if len(pairs) != len(args.sizes):
        ap.error("--pairs needs one AxB per size")
    rows = []
    for size, p in zip(args.sizes, pairs):
        r = _child(size, p, args.tile)
        rows.append(r)
        print(
            f"{size}x{size}: {r['pairs']} pairs, {r['per_pair_s']:.3g} s/pair, "
            f"peak RSS {r['peak_rss_gib']:.2f} GiB",
            flush=True,
        )
    os.makedirs(args.out, exist_ok=True)
    lines = table(rows)
    print("\n".join(lines))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    if plot(rows, os.path.join(args.out, "scaling.png")):
        print(f"plot: {os.path.join(args.out, 'scaling.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
