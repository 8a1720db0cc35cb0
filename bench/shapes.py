"""Named input shapes for the kernel benchmarks (``SHAPES``) and the op benchmarks (``OP_SHAPES``).

A shape is one ``kernel_fn(x1, x2)`` call: ``n1 × n2`` kernel entries on NHWC images. ``cifar-2x2``
is the measured setting (CIFAR-10-sized RGB images, 4 entries: Neural Tangents takes ~0.6 s per
entry of Myrtle-5 on a 2-core CPU, so bigger batches only add waiting); ``smoke`` is what a run
with ``--benchmark-disable`` executes, once, to prove the benchmark code works (one entry: Myrtle-5
pools five times by 2, so images smaller than 32×32 vanish).

An op shape (``bench_ops.py``) is the same kind of image batch; every op case derives its arrays
from it (the input images, the zipped ``(N1, N2, H, H, W, W)`` covariance of the input layer).
``op-smoke`` (odd sizes, N1 ≠ N2) is small enough for the Triton interpreter: it is what a run with
``--benchmark-disable`` executes and the only shape ``triton`` runs on a CPU; the Triton tests
(``tests/triton``) check the same op cases on it. ``cifar-8x8`` is a GPU-sized batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class KernelShape:
    """``x1: (n1, height, width, channels)``, ``x2: (n2, height, width, channels)``, ``dtype``."""

    name: str
    n1: int
    n2: int
    height: int
    width: int
    channels: int
    dtype: str = "float32"
    symmetric: bool = False  # x2=None: the train×train kernel (ntfast evaluates one triangle)

    @property
    def n_entries(self) -> int:
        """Kernel entries per call (each entry: one NNGP and one NTK value)."""
        return self.n1 * self.n2

    def inputs(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Standard-normal ``x1, x2`` (distinct images; ``x2`` None if symmetric) in ``dtype``."""
        rng = np.random.default_rng(seed)
        size = (self.height, self.width, self.channels)
        x1 = rng.standard_normal((self.n1, *size)).astype(self.dtype)
        x2 = rng.standard_normal((self.n2, *size)).astype(self.dtype)
        return x1, None if self.symmetric else x2


SHAPES = {
    s.name: s
    for s in (
        KernelShape("cifar-2x2", n1=2, n2=2, height=32, width=32, channels=3),
        KernelShape("cifar-4x4", n1=4, n2=4, height=32, width=32, channels=3),
        KernelShape("cifar-4-sym", n1=4, n2=4, height=32, width=32, channels=3, symmetric=True),
        KernelShape("smoke", n1=1, n2=1, height=32, width=32, channels=3),
    )
}
DEFAULT_SHAPE = "cifar-2x2"
SMOKE_SHAPE = "smoke"

OP_SHAPES = {
    s.name: s
    for s in (
        KernelShape("op-smoke", n1=1, n2=2, height=5, width=6, channels=3),
        KernelShape("cifar-2x2", n1=2, n2=2, height=32, width=32, channels=3),
        KernelShape("cifar-8x8", n1=8, n2=8, height=32, width=32, channels=3),
    )
}
DEFAULT_OP_SHAPE = "cifar-2x2"
OP_SMOKE_SHAPE = "op-smoke"
