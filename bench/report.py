"""Per-entry and per-op times, ratios and roofline figures from pytest-benchmark JSON.

Usage::

    python -m pytest bench/ --benchmark-enable --benchmark-json=bench/out/bench.json
    python bench/report.py bench/out/bench.json [--stat median|min|mean]

Networks (``bench_networks.py``): for every network and input shape, the time per kernel entry
(one NNGP and one NTK value) of each implementation (``stats[stat] / extra_info["n_entries"]``) and
the speed-up of each ntfast backend over Neural Tangents, ``NT time / ntfast time`` (> 1: ntfast is
faster).

Ops (``bench_ops.py``): for every op case and shape, the time per call of each implementation, the
bandwidth and flop rate it reaches (analytic bytes and flops of the call, ``bench/roofline.py``),
and the ratios ``xla / this`` and ``NT / this``; then, per op case, the roofline bound of the call
on an H100, ``max(bytes / bandwidth, flops / peak)``, beside the best time measured here and on
which device. Triton rows measured in the CPU interpreter are marked and never enter a ratio.
Standalone: only the standard library, so it runs anywhere the JSON is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

IMPL_ORDER = ("nt", "xla", "xla-layer", "triton", "native")


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def load(paths: list[str]) -> tuple[list[dict], list[str]]:
    """Every benchmark from every file, and a line describing each machine."""
    rows, machines = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        info = data.get("machine_info", {})
        cpu = info.get("cpu", {}).get("brand_raw", "?")
        machines.append(f"{path}: {info.get('node', '?')}, {cpu}, {data.get('datetime', '?')}")
        rows += data.get("benchmarks", [])
    return rows, machines


def network_rows(rows: list[dict]) -> list[dict]:
    return [b for b in rows if "n_entries" in b.get("extra_info", {})]


def op_rows(rows: list[dict]) -> list[dict]:
    return [b for b in rows if "op_case" in b.get("extra_info", {})]


def table(rows: list[dict], stat: str = "median") -> list[str]:
    """Lines of the report: one block per (network, shape), one line per implementation."""
    groups: dict[tuple, dict] = defaultdict(dict)
    for b in rows:
        e = b["extra_info"]
        groups[(e["network"], e["shape"])][e["impl"]] = b
    header = (
        f"{'network':<11} {'shape':<10} {'impl':<8} {'device':<14} "
        f"{'per entry':>11} {'rounds':>6}  NT / ntfast"
    )
    lines = [f"time per kernel entry (NNGP + NTK), {stat} over rounds", header, "-" * len(header)]
    for (network, shape), impls in groups.items():
        per_entry = {
            impl: b["stats"][stat] / b["extra_info"]["n_entries"] for impl, b in impls.items()
        }
        nt = per_entry.get("nt")
        order = [i for i in IMPL_ORDER if i in impls] + sorted(set(impls) - set(IMPL_ORDER))
        for impl in order:
            b = impls[impl]
            if impl == "nt":
                ratio = "(reference)"
            elif nt is None:
                ratio = "n/a (no NT run)"
            else:
                ratio = f"{nt / per_entry[impl]:.2f}×"
            lines.append(
                f"{network:<11} {shape:<10} {impl:<8} {b['extra_info'].get('device', '?'):<14} "
                f"{format_time(per_entry[impl]):>11} {b['stats']['rounds']:>6}  {ratio}"
            )
    return lines


def _times(r: float) -> str:
    return f"{r:,.0f}×" if r >= 100 else f"{r:.3g}×"


def _ratio(reference: float | None, t: float) -> str:
    return "-" if reference is None else f"{reference / t:.2f}×"


def op_table(rows: list[dict], stat: str = "median") -> list[str]:
    """Lines of the op report: per (op case, shape, device) one line per implementation (ratios
    only between implementations measured on the same device), then the roofline block: per op
    case and shape, the H100 bound and the best time measured on each device."""
    groups: dict[tuple, dict] = defaultdict(dict)
    for b in rows:
        e = b["extra_info"]
        groups[(e["op_case"], e["shape"], e.get("device", "?"))][e["impl"]] = b
    header = (
        f"{'op case':<12} {'shape':<10} {'impl':<7} {'device':<22} {'time':>9} {'GB/s':>8} "
        f"{'GFLOP/s':>8} {'xla/this':>9} {'NT/this':>8}"
    )
    lines = [
        f"time per op call, {stat} over rounds; ratios (same device) > 1: this one is faster",
        header,
        "-" * len(header),
    ]
    best: dict[tuple, dict[str, tuple[float, str]]] = defaultdict(dict)
    for (case, shape, device), impls in groups.items():
        times = {impl: b["stats"][stat] for impl, b in impls.items()}
        measured = {i: t for i, t in times.items() if not impls[i]["extra_info"].get("interpreter")}
        order = [i for i in IMPL_ORDER if i in impls] + sorted(set(impls) - set(IMPL_ORDER))
        for impl in order:
            e, t = impls[impl]["extra_info"], times[impl]
            row = f"{case:<12} {shape:<10} {impl:<7} {device:<22} {format_time(t):>9} "
            if impl not in measured:
                lines.append(row + "  (Triton interpreter on CPU: correctness run, not a timing)")
                continue
            lines.append(
                row + f"{e['bytes'] / t / 1e9:>8.2f} {e['flops'] / t / 1e9:>8.2f} "
                f"{_ratio(measured.get('xla'), t):>9} {_ratio(measured.get('nt'), t):>8}"
            )
            here = best[(case, shape)]
            if device not in here or t < here[device][0]:
                here[device] = (t, impl)

    e0 = rows[0]["extra_info"]
    title = (
        f"roofline of each op call on an {e0.get('roofline_device', 'H100')}: "
        f"bound = max(bytes / {e0.get('roofline_bandwidth', 0) / 1e12:.2f} TB/s, "
        f"flops / {e0.get('roofline_peak_flops', 0) / 1e12:.0f} TFLOP/s ({e0.get('dtype', '?')}))"
        "; best measured time per device and its ratio to the bound"
    )
    header = (
        f"{'op case':<12} {'shape':<10} {'launch':>6} {'MB':>9} {'MFLOP':>9} {'flop/B':>7} "
        f"{'bound':>9} {'limiter':<8}  best here (impl @ device, time / bound)"
    )
    lines += ["", title, header, "-" * len(header)]
    seen = set()
    for case, shape, _ in groups:
        if (case, shape) in seen:
            continue
        seen.add((case, shape))
        e = next(
            b["extra_info"] for (c, sh, _), impls in groups.items() if (c, sh) == (case, shape)
            for b in impls.values()
        )  # fmt: skip
        bound = e["roofline_bound_s"]
        here = "; ".join(
            f"{format_time(t)} ({impl} @ {device}, {_times(t / bound)})"
            for device, (t, impl) in sorted(best[(case, shape)].items())
        )
        lines.append(
            f"{case:<12} {shape:<10} {e['launches']:>6} {e['bytes'] / 1e6:>9.3f} "
            f"{e['flops'] / 1e6:>9.2f} {e['flops'] / e['bytes']:>7.2f} {format_time(bound):>9} "
            f"{e['roofline_limiter']:<8}  {here or '-'}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    p.add_argument("--stat", default="median", choices=("median", "min", "mean"))
    args = p.parse_args(argv)
    rows, machines = load(args.json)
    nets, ops = network_rows(rows), op_rows(rows)
    if not nets and not ops:
        print("no bench_networks / bench_ops results in " + ", ".join(args.json), file=sys.stderr)
        return 1
    blocks = []
    if nets:
        blocks.append("\n".join(table(nets, args.stat)))
    if ops:
        blocks.append("\n".join(op_table(ops, args.stat)))
    print("\n\n".join(blocks))
    print("\n".join(["", "machines:", *machines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
