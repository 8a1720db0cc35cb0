"""Infinite-width Myrtle CNN on handwritten digits: NNGP and NTK kernel regression.

Run ``python -m ntfast.demo`` (or ``ntfast-demo``). The data is scikit-learn's ``digits`` set
(1,797 grayscale 8×8 images of the digits 0-9, shipped inside scikit-learn: no download).

What it computes, for a random split of ``n_train`` / ``n_test`` images:

1. The NNGP kernel ``K`` and the NTK ``Θ`` of an infinitely wide Myrtle network (Shankar et al.
   2020, "Neural Kernels Without Tangents"; the architecture of Neural Tangents' Myrtle example):
   ``[Conv(3×3, SAME) → Relu] × a → AvgPool(2×2) → [Conv → Relu] × b → AvgPool(2×2) →
   [Conv → Relu] × c → pool to 1×1 → Dense(10)`` with ``(a, b, c) = (2, 1, 1)`` for depth 5,
   ``(2, 2, 2)`` for 7, ``(3, 3, 3)`` for 10, ``W_std = √2``, ``b_std = 0``. The original's last
   three ``AvgPool(2×2)`` + ``Flatten`` take 32×32 CIFAR images from 4×4 to 1×1; on 8×8 digits the
   map is 2×2 at that point, and ``GlobalAvgPool`` is the same average. Kernels come in f32, as
   ``(train × train)`` and ``(test × train)`` matrices, computed block by block: only the upper
   triangle of the symmetric train kernel is evaluated, and finished blocks can be kept in an
   ``.npz`` cache (``--cache``) so an interrupted run resumes where it stopped.
2. Kernel ridge regression on centred one-hot labels ``Y`` (entries 0.9 / -0.1):
   ``f(x_test) = K(x_test, X) (K(X, X) + λ·mean(diag K(X, X))·I)⁻¹ Y`` with ``λ = diag_reg``,
   i.e. the GP posterior mean (NNGP) and the infinite-time gradient-descent solution for MSE
   loss (NTK), as in Neural Tangents' ``predict.gradient_descent_mse_ensemble`` at ``t = ∞``.
   The class is the arg-max. A linear ridge regression on the pixels (kernel ``X Xᵀ``) is the
   baseline.

Defaults (200 train, 100 test, Myrtle-5): about 25 s of CPU time (kernels + a ~10 s compile),
under a minute of wall time on a 2-core CPU; seed 0 gives 100% test accuracy for NNGP and NTK
against 90% for the linear baseline (chance: 10%).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Myrtle depth -> number of (Conv, Relu) pairs in each of the three resolution stages.
MYRTLE_STAGES = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}
KINDS = ("nngp", "ntk")
N_CLASSES = 10
# Channel count of the finite network; the infinite-width kernels do not depend on it.
WIDTH = 128


# ----------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
    """Standardized digits images ``(N, 8, 8, 1)`` f32 (NHWC) and integer labels ``(N,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(n_train: int, n_test: int, seed: int) -> DigitsSplit:
    """Random disjoint train/test split of scikit-learn's digits, standardized with train stats.

    Pixels (0..16) are scaled by one mean and one standard deviation over all training pixels, so
    that the input covariance ``x·x'/C`` has order-one entries; per-pixel scaling would blow up
    the always-blank border pixels.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # the demo's data ships with scikit-learn, an optional dependency
        raise SystemExit(
            "The demo needs scikit-learn (its digits dataset): pip install 'ntfast[demo]'"
        ) from e

    digits = load_digits()
    images = digits.images.astype(np.float32)
    labels = digits.target.astype(np.int64)
    n_total = len(labels)
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if n_train + n_test > n_total:
        raise ValueError(
            f"`n_train` + `n_test` must be at most {n_total} (digits set size), "
            f"got {n_train} + {n_test}."
        )
    order = np.random.default_rng(seed).permutation(n_total)
    train, test = order[:n_train], order[n_train : n_train + n_test]
    mean, std = images[train].mean(), images[train].std()

    def prep(idx):
        return ((images[idx] - mean) / std)[..., None].astype(np.float32)

    return DigitsSplit(prep(train), labels[train], prep(test), labels[test])


# ----------------------------------------------------------------------------------------------
# Network.


def myrtle_network(stax, depth: int = 5, spatial: int = 8):
    """Myrtle network of ``depth`` on ``spatial × spatial`` inputs, from a stax-like module.

    ``stax`` is ``ntfast.stax`` (or any module with Neural Tangents' stax API). Returns
    ``(description, (init_fn, apply_fn, kernel_fn))``.
    """
    if depth not in MYRTLE_STAGES:
        raise ValueError(f"`depth` must be one of {sorted(MYRTLE_STAGES)}, got {depth!r}.")
    if spatial < 4 or spatial % 4:
        raise ValueError(f"`spatial` must be a multiple of 4 (two 2×2 poolings), got {spatial}.")
    w_std, b_std = math.sqrt(2.0), 0.0
    layers, parts = [], []
    for stage, repeats in enumerate(MYRTLE_STAGES[depth]):
        size = spatial >> stage
        for _ in range(repeats):
            layers += [
                stax.Conv(WIDTH, (3, 3), W_std=w_std, b_std=b_std, padding="SAME"),
                stax.Relu(),
            ]
        parts.append(f"[Conv 3×3 SAME → Relu] ×{repeats} @ {size}×{size}")
        if stage < 2:
            layers.append(stax.AvgPool((2, 2), strides=(2, 2)))
            parts.append("AvgPool 2×2")
    layers += [stax.GlobalAvgPool(), stax.Dense(N_CLASSES, W_std=w_std, b_std=b_std)]
    parts += [f"GlobalAvgPool ({spatial >> 2}×{spatial >> 2} → 1×1)", f"Dense({N_CLASSES})"]
    description = f"Myrtle-{depth} (W_std=√2, b_std=0, infinite width): " + " → ".join(parts)
    return description, stax.serial(*layers)


# ----------------------------------------------------------------------------------------------
# Blocked kernel computation with a resumable cache.


def block_plan(n_train: int, n_test: int, block: int) -> list[tuple[str, int, int]]:
    """Blocks to evaluate: ``("train", i, j)`` for ``i <= j`` (upper triangle of the symmetric
    train kernel) then ``("test", i, j)`` for every (test block i, train block j)."""
    nb_train, nb_test = -(-n_train // block), -(-n_test // block)
    plan = [("train", i, j) for i in range(nb_train) for j in range(i, nb_train)]
    plan += [("test", i, j) for i in range(nb_test) for j in range(nb_train)]
    return plan


def _pad_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """Pads the batch to a multiple of ``block`` by repeating the last image, so every block has
    one shape (one compilation); the padded rows are dropped after the kernel call."""
    extra = -len(x) % block
    return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x


def fingerprint(**config) -> str:
    """Identity of a kernel computation: the config and a hash of every array in it."""
    parts = {}
    for key, value in sorted(config.items()):
        if isinstance(value, np.ndarray):
            digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]
            parts[key] = f"{value.dtype}{list(value.shape)}:{digest}"
        else:
            parts[key] = value
    return json.dumps(parts, sort_keys=True)


class CacheMismatchError(ValueError):
    """The ``--cache`` file belongs to another computation (other data, network or settings)."""


class KernelCache:
    """Train and test kernels under construction, with the set of finished blocks.

    On disk (``path``, an ``.npz``): ``fingerprint`` (JSON string), ``{train,test}_{nngp,ntk}``
    matrices (f32, unfinished entries 0) and ``done`` (``(B, 3)`` int rows ``(part, i, j)``,
    part 0 = train, 1 = test). Writes go to a temporary file in the same folder that then replaces
    ``path``, so a crash mid-write never leaves a truncated cache.
    """

    def __init__(self, n_train: int, n_test: int, fp: str, path: str | None = None):
        self.path, self.fp = path, fp
        self.mats = {
            f"{part}_{kind}": np.zeros((n, n_train), np.float32)
            for part, n in (("train", n_train), ("test", n_test))
            for kind in KINDS
        }
        self.done: set[tuple[str, int, int]] = set()
        if path is not None and os.path.exists(path):
            self._load()

    def _load(self) -> None:
        with np.load(self.path, allow_pickle=False) as data:
            stored = str(data["fingerprint"])
            if stored != self.fp:
                raise CacheMismatchError(
                    f"cache {self.path!r} holds kernels of a different computation "
                    f"(stored: {stored}; requested: {self.fp}). Delete it or pass another "
                    "`--cache` path."
                )
            for key in self.mats:
                self.mats[key] = np.array(data[key], np.float32)
            self.done = {(("train", "test")[p], int(i), int(j)) for p, i, j in data["done"]}

    def save(self) -> None:
        if self.path is None:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        done = np.array(
            [((0 if part == "train" else 1), i, j) for part, i, j in sorted(self.done)], np.int64
        ).reshape(-1, 3)
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, fingerprint=np.array(self.fp), done=done, **self.mats)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise


@dataclasses.dataclass
class KernelRun:
    """Kernels and what it took: ``kernels[f"{part}_{kind}"]`` for part in train/test."""

    kernels: dict[str, np.ndarray]
    blocks_total: int
    blocks_computed: int
    blocks_cached: int
    compile_s: float
    compute_s: float
    entries_computed: int
    complete: bool


def compute_kernels(
    kernel_fn: Callable,
    x_train: np.ndarray,
    x_test: np.ndarray,
    *,
    block: int = 50,
    cache: str | None = None,
    fp: str = "",
    progress: bool = True,
    save_every_s: float = 5.0,
    stop_after: int | None = None,
) -> KernelRun:
    """NNGP and NTK of ``x_train × x_train`` and ``x_test × x_train``, block by block.

    Every block is a ``kernel_fn(x1, x2, get=("nngp", "ntk"))`` call on ``block × block`` inputs
    (last blocks padded), compiled once ahead of time. Finished blocks go to ``cache`` (if given)
    at most every ``save_every_s`` seconds, at the end and on any interruption (Ctrl-C included);
    a later call with the same ``fp`` skips them. ``stop_after`` stops after that many newly
    computed blocks (a deliberate interruption, for tests) and returns ``complete=False``.
    """
    import jax

    if block < 1:
        raise ValueError(f"`block` must be a positive integer, got {block!r}.")
    n_train, n_test = len(x_train), len(x_test)
    store = KernelCache(n_train, n_test, fp, cache)
    plan = block_plan(n_train, n_test, block)
    todo = [b for b in plan if b not in store.done]
    inputs = {"train": _pad_blocks(x_train, block), "test": _pad_blocks(x_test, block)}

    compile_s = compute_s = 0.0
    computed = entries = 0
    if todo:
        t0 = time.perf_counter()
        spec = jax.ShapeDtypeStruct((block,) + x_train.shape[1:], x_train.dtype)
        compiled = (
            jax.jit(lambda a, b: tuple(kernel_fn(a, b, get=KINDS))).lower(spec, spec).compile()
        )
        compile_s = time.perf_counter() - t0

    bar = _progress_bar(len(plan), len(plan) - len(todo), progress)
    last_save = time.perf_counter()
    try:
        for part, i, j in todo:
            if stop_after is not None and computed >= stop_after:
                break
            rows = slice(i * block, min((i + 1) * block, n_train if part == "train" else n_test))
            cols = slice(j * block, min((j + 1) * block, n_train))
            x1 = inputs[part][i * block : (i + 1) * block]
            x2 = inputs["train"][j * block : (j + 1) * block]
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(x1, x2))
            compute_s += time.perf_counter() - t0
            n_rows, n_cols = rows.stop - rows.start, cols.stop - cols.start
            for kind, value in zip(KINDS, out):
                value = np.asarray(value, np.float32)[:n_rows, :n_cols]
                mat = store.mats[f"{part}_{kind}"]
                mat[rows, cols] = value
                if part == "train" and i != j:
                    mat[cols, rows] = value.T
            store.done.add((part, i, j))
            computed += 1
            entries += n_rows * n_cols
            bar.update(1)
            if time.perf_counter() - last_save >= save_every_s:
                store.save()
                last_save = time.perf_counter()
    finally:
        bar.close()
        if computed:
            store.save()

    return KernelRun(
        kernels=store.mats,
        blocks_total=len(plan),
        blocks_computed=computed,
        blocks_cached=len(plan) - len(todo),
        compile_s=compile_s,
        compute_s=compute_s,
        entries_computed=entries,
        complete=len(store.done) == len(plan),
    )


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="block",
        desc="kernel blocks",
        disable=not enabled,
        file=sys.stderr,
    )


# ----------------------------------------------------------------------------------------------
# Regression.


def kernel_regression(
    k_train: np.ndarray, k_test: np.ndarray, y_train: np.ndarray, diag_reg: float
) -> np.ndarray:
    """Ridge predictions ``k_test (k_train + λ·mean(diag k_train)·I)⁻¹ Y`` with centred one-hot
    ``Y`` (``N_CLASSES`` columns). Solved in f64 (Cholesky-free ``solve``: the train kernel of a
    deep ReLU net is only numerically positive definite). Returns ``(n_test, N_CLASSES)``."""
    if diag_reg < 0:
        raise ValueError(f"`diag_reg` must be non-negative, got {diag_reg!r}.")
    k_train = np.asarray(k_train, np.float64)
    k_test = np.asarray(k_test, np.float64)
    targets = np.eye(N_CLASSES)[y_train] - 1.0 / N_CLASSES
    reg = diag_reg * np.trace(k_train) / len(k_train)
    coef = np.linalg.solve(k_train + reg * np.eye(len(k_train)), targets)
    return k_test @ coef


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(pred, axis=1) == labels))


# ----------------------------------------------------------------------------------------------
# The demo.


def run(
    n_train: int = 200,
    n_test: int = 100,
    depth: int = 5,
    seed: int = 0,
    backend: str | None = "auto",
    diag_reg: float = 1e-4,
    block: int = 50,
    cache: str | None = None,
    progress: bool = True,
    stax: Any = None,
    stop_after: int | None = None,
    out: Callable[[str], Any] = print,
) -> dict:
    """Runs the demo and returns its numbers (see the module docstring).

    ``stax`` defaults to ``ntfast.stax``; any module with Neural Tangents' stax API works (the
    tests compare against Neural Tangents itself). ``backend`` is ntfast's backend flag, in force
    while the kernel function is traced. Returns a dict with ``accuracy`` (``nngp``, ``ntk``,
    ``linear``; ``None`` for kernels when ``stop_after`` interrupted the run), the ``KernelRun``
    under ``run`` and the split under ``data``.
    """
    import contextlib

    if stax is None:
        from ntfast import stax
    from ntfast.backend import use_backend

    data = load_digits_split(n_train, n_test, seed)
    # Blocks larger than both sets would only compute padding.
    block = min(block, max(n_train, n_test))
    description, (_, _, kernel_fn) = myrtle_network(stax, depth, spatial=data.x_train.shape[1])
    fp = fingerprint(
        network=description,
        stax=getattr(stax, "__name__", repr(stax)),
        backend=backend,
        block=block,
        x_train=data.x_train,
        x_test=data.x_test,
    )
    out(f"Network: {description}")
    out(
        f"Data: scikit-learn digits, {n_train} train / {n_test} test images "
        f"(8×8×1, f32, seed {seed}); chance accuracy {1 / N_CLASSES:.0%}"
    )
    n_pairs = n_train * (n_train + 1) // 2 + n_test * n_train
    out(
        f"Kernels: train×train {n_train}×{n_train} (symmetric) and test×train "
        f"{n_test}×{n_train}, NNGP + NTK, in {block}×{block} blocks "
        f"(≈{n_pairs:,} image pairs); backend {backend!r}" + (f"; cache {cache}" if cache else "")
    )
    ctx = use_backend(backend) if backend else contextlib.nullcontext()
    with ctx:
        result = compute_kernels(
            kernel_fn,
            data.x_train,
            data.x_test,
            block=block,
            cache=cache,
            fp=fp,
            progress=progress,
            stop_after=stop_after,
        )
    per_entry = result.compute_s / result.entries_computed if result.entries_computed else 0.0
    out(
        f"Kernel time: {result.compute_s:.1f} s for {result.blocks_computed} blocks "
        f"({per_entry * 1e6:.0f} µs per pair, NNGP+NTK) + {result.compile_s:.1f} s compile; "
        f"{result.blocks_cached} of {result.blocks_total} blocks from the cache"
    )

    acc = {"nngp": None, "ntk": None}
    if result.complete:
        for kind in KINDS:
            pred = kernel_regression(
                result.kernels[f"train_{kind}"],
                result.kernels[f"test_{kind}"],
                data.y_train,
                diag_reg,
            )
            acc[kind] = accuracy(pred, data.y_test)
    else:
        out("Stopped before the kernels were complete; run again with the same --cache to resume.")
    flat_train = data.x_train.reshape(n_train, -1).astype(np.float64)
    flat_test = data.x_test.reshape(n_test, -1).astype(np.float64)
    acc["linear"] = accuracy(
        kernel_regression(
            flat_train @ flat_train.T, flat_test @ flat_train.T, data.y_train, diag_reg
        ),
        data.y_test,
    )
    out(f"Test accuracy (ridge, diag_reg={diag_reg:g}):")
    for name, label in (("nngp", "NNGP"), ("ntk", "NTK"), ("linear", "linear on pixels")):
        shown = "n/a (incomplete)" if acc[name] is None else f"{acc[name]:.1%}"
        out(f"  {label:<17} {shown}")
    return {"accuracy": acc, "run": result, "data": data, "description": description}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ntfast-demo",
        description="NNGP and NTK kernel regression of an infinite Myrtle CNN on sklearn digits.",
    )
    p.add_argument("--n-train", type=int, default=200, help="training images (default 200)")
    p.add_argument("--n-test", type=int, default=100, help="test images (default 100)")
    p.add_argument(
        "--depth", type=int, default=5, choices=sorted(MYRTLE_STAGES), help="Myrtle depth"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "xla", "triton", "native"),
        help="ntfast backend for the kernel ops (default auto)",
    )
    p.add_argument(
        "--diag-reg",
        type=float,
        default=1e-4,
        help="ridge, relative to the mean diagonal of the train kernel (default 1e-4)",
    )
    p.add_argument("--block", type=int, default=50, help="kernel block size (default 50)")
    p.add_argument(
        "--cache",
        default=None,
        help="npz file keeping finished kernel blocks; rerun with it to resume",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ntfast.backend import BackendError

    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("n_train", "n_test", "block"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.diag_reg < 0:
        parser.error("--diag-reg must be non-negative")
    try:
        run(
            n_train=args.n_train,
            n_test=args.n_test,
            depth=args.depth,
            seed=args.seed,
            backend=args.backend,
            diag_reg=args.diag_reg,
            block=args.block,
            cache=args.cache,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(
            "Interrupted"
            + (f"; finished blocks are in {args.cache}, rerun to resume." if args.cache else "."),
            file=sys.stderr,
        )
        return 130
    except (CacheMismatchError, BackendError) as e:
        print(f"ntfast-demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
