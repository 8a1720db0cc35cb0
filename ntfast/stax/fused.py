"""Automatic fused path of ``serial`` networks: conv stacks run per offset tile (ops.fused_cnn).

``serial(...)``'s ``kernel_fn(x1, x2, get)`` first asks :func:`fused_kernel` whether its leading
layers form a network that :func:`ntfast.ops.fused_cnn.fused_cnn` evaluates: stride-1 ``Conv``
(NHWC, any filter, SAME / VALID / CIRCULAR, both parameterizations), channel-wise ``Dense``,
elementwise nonlinearities, ``AvgPool`` / ``SumPool`` and ``Identity``, closed by a
``GlobalAvgPool`` / ``GlobalSumPool`` / ``Flatten`` readout. If so, that prefix runs fused from the
input images and the remaining layers (the fully connected head) run layer by layer on the
resulting ``Kernel``; otherwise the whole network runs layer by layer. Results do not depend on
the path (tests/test_fused.py compares both, and Neural Tangents, in f64).

Each layer tells how it fuses through an attribute on its ``kernel_fn``:
``kernel_fn.fused_step = fn(input_shape) -> tuple of steps | None`` (None: this instance cannot be
fused, e.g. a strided conv). The input kernel and the prefix's output ``Kernel`` structure (static
fields, shapes) come from ``jax.eval_shape`` of the layer-by-layer path, so both paths raise the
same errors and return identical metadata; nothing of size ``(HW)²`` is ever materialized.

Knobs: :func:`fused_options` (``enabled``, ``tile``, ``memory_bytes``) as a context manager or
global setting; ``NTFAST_FUSED=0`` disables the path; ``NTFAST_FUSED_MEMORY`` bounds tile memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ntfast import _utils as utils
from ntfast import backend as _backend
from ntfast.ops import fused_cnn as fc

FUSED_STEP = "fused_step"
FUSED_INPUTS = "fused_from_inputs"

# Head layers that never read cov1/cov2 when only nngp/ntk are requested.
_AFFINE_STEPS = (fc.DenseStep,)


@dataclasses.dataclass(frozen=True)
class _Options:
    enabled: bool = True
    tile: int | None = None
    memory_bytes: int | None = None


_global = [_Options()]
_local = threading.local()


def _current() -> _Options:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _global[0]


def _checked(enabled, tile, memory_bytes) -> _Options:
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be a bool, got {enabled!r}.")
    for name, v in (("tile", tile), ("memory_bytes", memory_bytes)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"`{name}` must be a positive int or None, got {v!r}.")
    return _Options(enabled, tile, memory_bytes)


@contextlib.contextmanager
def fused_options(
    enabled: bool = True, tile: int | None = None, memory_bytes: int | None = None
) -> Iterator[None]:
    """Context manager for the fused conv path of ``serial`` networks.

    Args:
      enabled: ``False`` forces the layer-by-layer path.
      tile: offset rows per tile (``None``: automatic, see ``ntfast.ops.fused_cnn.auto_tile``).
      memory_bytes: memory the tiles may use (``None``: ``NTFAST_FUSED_MEMORY`` or 1/4 of RAM).
    """
    opts = _checked(enabled, tile, memory_bytes)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(opts)
    try:
        yield
    finally:
        stack.pop()


def set_fused_options(
    enabled: bool = True, tile: int | None = None, memory_bytes: int | None = None
) -> None:
    """Global version of :func:`fused_options`."""
    _global[0] = _checked(enabled, tile, memory_bytes)


def _env_enabled() -> bool:
    v = os.environ.get("NTFAST_FUSED", "1").strip().lower()
    if v in ("0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on", ""):
        return True
    raise ValueError(f"NTFAST_FUSED must be 0 or 1, got {v!r}.")


# ----------------------------------------------------------------------------------------------
# Planning.


def _out_shape(init_fn: Callable, shape: tuple) -> tuple:
    """The layer's output shape for ``shape`` (its ``init_fn`` evaluated abstractly)."""
    box = []

    def f(key):
        out, params = init_fn(key, shape)
        box.append(tuple(out))
        return params

    jax.eval_shape(f, jax.random.PRNGKey(0))
    return box[0]


def layer_steps(layers, shape: tuple):
    """Steps of the fusable prefix of ``layers`` (``(init_fn, kernel_fn)`` pairs) for inputs of
    ``shape``: ``(steps, n)`` with ``steps`` ending in a Readout and ``n`` layers consumed, or
    ``(steps, None)`` when every layer fuses without a readout, or None when a layer cannot fuse
    before a readout."""
    steps = []
    for n, (init_fn, kernel_fn) in enumerate(layers):
        spec = getattr(kernel_fn, FUSED_STEP, None)
        if spec is None:
            return None
        got = spec(shape)
        if got is None:
            return None
        for i, s in enumerate(got):
            if isinstance(s, fc.Readout):
                if i != len(got) - 1:
                    return None
                return (*steps, s), n + 1
            steps.append(s)
        shape = _out_shape(init_fn, shape)
    return tuple(steps), None


def serial_step(layers) -> Callable:
    """``fused_step`` of a ``serial`` used as a layer: all its layers' steps (a readout only last)."""

    def spec(shape):
        got = layer_steps(layers, shape)
        if got is None:
            return None
        steps, n = got
        if n is not None and n != len(layers):
            return None
        return steps

    return spec


def _plain(x) -> bool:
    return isinstance(x, (np.ndarray, jax.Array)) and x.ndim == 4


def fused_kernel(layers, kernel_fns, x1, x2, get, input_fn, kwargs):
    """The ``Kernel`` of ``serial(*layers)`` via the fused path, or None if it does not apply.

    ``layers``: ``(init_fn, kernel_fn)`` per layer; ``input_fn(x1, x2)`` builds the input Kernel
    (evaluated abstractly only); ``kwargs``: the call's layer kwargs (pattern, diagonal_* ...).
    """
    opts = _current()
    if not opts.enabled or not _env_enabled():
        return None
    if not _plain(x1) or not (x2 is None or _plain(x2)):
        return None
    if any(v is not None for v in kwargs.values()):
        return None  # masks, patterns, forced layouts, dropout rngs: layer by layer
    if not (jnp.issubdtype(x1.dtype, jnp.floating) and (x2 is None or x2.dtype == x1.dtype)):
        return None  # the layer path raises the proper error
    got = layer_steps(layers, tuple(x1.shape))
    if got is None or got[1] is None:
        return None
    plan, n = got
    try:
        fc.segments(plan, tuple(x1.shape[1:3]))
    except ValueError:
        return None  # e.g. CIRCULAR mixed with SAME: the layer path handles it
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    try:
        _backend.resolve("fused_cnn", query=fc.backend_query(plan, dtype, x1.shape[1:3]))
    except _backend.BackendError:
        # The requested backend has no fused kernel for this network: its per-layer ops run.
        return None

    # Structure (static fields, shapes, errors) of the prefix's output, never computed.
    def prefix(a, b):
        k = input_fn(a, b)
        for f in kernel_fns[:n]:
            k = f(k, **kwargs)
        return k

    shaped = jax.eval_shape(prefix, x1, x2)
    a = jnp.asarray(x1).astype(dtype)
    b = None if x2 is None else jnp.asarray(x2).astype(dtype)
    compute_ntk = shaped.ntk is not None
    head = kernel_fns[n:]
    wants_cov = get is None or any(g in ("cov1", "cov2") for g in utils.canonicalize_get(get)[1])
    # Only nngp/ntk requested and a Dense-only head: the per-image kernels are never read.
    head_reads_cov = False
    for f in head:
        spec = getattr(f, FUSED_STEP, None)
        steps = None if spec is None else spec(tuple(shaped.shape1))
        if steps is None or not all(isinstance(s, _AFFINE_STEPS) for s in steps):
            head_reads_cov = True
    compute_cov = wants_cov or head_reads_cov
    nngp, ntk, cov1, cov2 = _run(a, b, plan, compute_ntk, compute_cov, opts)

    def layout(cov, x, full):
        if not compute_cov:
            return jnp.full(full.shape, jnp.nan, dtype)
        if full.shape == cov.shape:
            return cov
        return _run(x, None, plan, False, False, opts)[0]  # full per-batch covariance

    cov1 = layout(cov1, a, shaped.cov1)
    cov2 = None if shaped.cov2 is None else layout(cov2, b, shaped.cov2)
    if compute_ntk and ntk.shape != shaped.ntk.shape:
        ntk = jnp.broadcast_to(ntk, shaped.ntk.shape)
    k = shaped.replace(
        nngp=nngp.astype(shaped.nngp.dtype),
        ntk=ntk.astype(shaped.ntk.dtype) if compute_ntk else None,
        cov1=cov1.astype(shaped.cov1.dtype),
        cov2=None if cov2 is None else cov2.astype(shaped.cov2.dtype),
        x1_is_x2=utils.x1_is_x2(a, b),
        mask1=None,
        mask2=None,
    )
    for f in head:
        k = f(k, **kwargs)
    return k


def _run(a, b, plan, compute_ntk, compute_cov, opts):
    tile = opts.tile
    if tile is None and opts.memory_bytes is not None:
        seg = fc.segments(plan, tuple(a.shape[1:3]))
        tile = min(fc.auto_tile(s.grid, a.dtype.itemsize, opts.memory_bytes) for s in seg)
    return fc.fused_cnn(
        a, b, plan=plan, compute_ntk=compute_ntk, compute_cov=compute_cov, tile=tile
    )
