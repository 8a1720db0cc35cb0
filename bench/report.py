"""Per-entry times and NT/ntfast ratios from pytest-benchmark JSON.

Usage::

    python -m pytest bench/ --benchmark-enable --benchmark-json=bench/out/networks.json
    python bench/report.py bench/out/networks.json [--stat median|min|mean]

For every network and input shape: the time per kernel entry (one NNGP and one NTK value) of each
implementation (``stats[stat] / extra_info["n_entries"]``) and the speed-up of each ntfast backend
over Neural Tangents, ``NT time / ntfast time`` (> 1: ntfast is faster). Standalone: only the
standard library, so it runs anywhere the JSON is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

IMPL_ORDER = ("nt", "xla", "triton", "native")


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def load(paths: list[str]) -> tuple[list[dict], list[str]]:
    """Benchmarks of ``bench_networks.py`` from every file, and a line describing each machine."""
    rows, machines = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        info = data.get("machine_info", {})
        cpu = info.get("cpu", {}).get("brand_raw", "?")
        machines.append(f"{path}: {info.get('node', '?')}, {cpu}, {data.get('datetime', '?')}")
        rows += [b for b in data.get("benchmarks", []) if "n_entries" in b.get("extra_info", {})]
    return rows, machines


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    p.add_argument("--stat", default="median", choices=("median", "min", "mean"))
    args = p.parse_args(argv)
    rows, machines = load(args.json)
    if not rows:
        print("no bench_networks results in " + ", ".join(args.json), file=sys.stderr)
        return 1
    print("\n".join(table(rows, args.stat)))
    print("\n".join(["", "machines:", *machines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
