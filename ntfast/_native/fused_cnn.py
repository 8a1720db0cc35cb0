"""Native launcher of op ``fused_cnn``: the XLA FFI target ``ntfast_fused_cnn``.

Same signature and results as the XLA reference :func:`ntfast.ops.fused_cnn.fused_cnn_reference`
(the definition). The plan is encoded once per call site by :func:`ntfast.ops.fused_table.encode`
into the attributes ``plan_i``/``plan_f``; ``tile``/``pair_block`` are memory knobs of the XLA
path and do not change the result, so the kernels ignore them.

Transformations: ``jit`` (the call is one custom call), ``vmap`` (``vmap_method="sequential"``:
one call per batch element), ``jvp``/``grad`` (``custom_jvp`` whose tangent is the JVP of the XLA
reference: exact derivatives of the same function, computed by XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ntfast import backend as _backend
from ntfast.ops import fused_cnn as _fc
from ntfast.ops import fused_table as _table

TARGET = "ntfast_fused_cnn"
# Capacity of kernels/common/plan.h (kMaxSegments, kMaxSteps).
MAX_SEGMENTS = 16
MAX_STEPS = 128
DTYPES = ("float32", "float64")

_threads = [0]


def set_num_threads(n: int | None) -> None:
    """Threads of later-traced calls (``None``/0: ``NTFAST_NUM_THREADS`` or every usable CPU,
    read at run time). Applies at trace time: jitted functions keep the value they were traced
    with."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise ValueError(f"`n` must be a non-negative int or None, got {n!r}.")
    _threads[0] = int(n or 0)


def unsupported_reason(plan, dtype, size=None) -> str | None:
    """Why the native kernels cannot run ``plan`` for inputs of ``dtype`` and spatial ``size``
    (None: they can; any image size fits the CPU and CUDA kernels)."""
    name = np.dtype(dtype).name
    if name not in DTYPES:
        return f"dtype {name} is not supported (have: {list(DTYPES)})"
    reason = _table.unsupported_reason(plan)
    if reason is not None:
        return reason
    n_pool = sum(isinstance(s, _fc.PoolStep) for s in plan)
    n_steps = sum(isinstance(s, (_fc.ConvStep, _fc.DenseStep, _fc.NonlinStep)) for s in plan)
    if n_pool + 1 > MAX_SEGMENTS:
        return f"{n_pool} poolings exceed the kernel's {MAX_SEGMENTS - 1}"
    if n_steps > MAX_STEPS:
        return f"{n_steps} conv/dense/nonlinearity steps exceed the kernel's {MAX_STEPS}"
    return None


@functools.lru_cache(maxsize=256)
def _encoded(plan, size):
    ints, floats = _table.encode(plan, size)
    ints.setflags(write=False)
    floats.setflags(write=False)
    return ints, floats


def _ffi(x1, x2, plan, sym, compute_ntk, compute_cov, threads):
    """The custom call: ``(nngp, ntk, cov1, cov2)``, arrays always (zeros where not computed)."""
    ints, floats = _encoded(plan, tuple(int(v) for v in x1.shape[1:3]))
    n1, n2 = x1.shape[0], x2.shape[0]
    dt = x1.dtype
    out = (
        jax.ShapeDtypeStruct((n1, n2), dt),
        jax.ShapeDtypeStruct((n1, n2), dt),
        jax.ShapeDtypeStruct((n1,), dt),
        jax.ShapeDtypeStruct((n2,), dt),
    )
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    return call(
        x1,
        x2,
        plan_i=np.asarray(ints),
        plan_f=np.asarray(floats),
        sym=np.int64(sym),
        compute_ntk=np.int64(compute_ntk),
        compute_cov=np.int64(compute_cov),
        threads=np.int64(threads),
    )


def _reference(xs, plan, sym, compute_ntk, compute_cov):
    x1, x2 = (xs[0], None) if sym else xs
    nngp, ntk, cov1, cov2 = _fc.fused_cnn_reference(
        x1, x2, plan=plan, compute_ntk=compute_ntk, compute_cov=compute_cov
    )
    n1, n2 = x1.shape[0], (x1 if sym else x2).shape[0]
    zeros = lambda shape: jnp.zeros(shape, nngp.dtype)
    return (
        nngp,
        zeros((n1, n2)) if ntk is None else ntk,
        zeros((n1,)) if cov1 is None else cov1,
        zeros((n2,)) if cov2 is None else cov2,
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4, 5))
def _native(xs, plan, sym, compute_ntk, compute_cov, threads):
    x1 = xs[0]
    x2 = x1 if sym else xs[1]
    return tuple(_ffi(x1, x2, plan, sym, compute_ntk, compute_cov, threads))


@_native.defjvp
def _native_jvp(plan, sym, compute_ntk, compute_cov, threads, primals, tangents):
    (xs,), (dxs,) = primals, tangents
    out = _native(xs, plan, sym, compute_ntk, compute_cov, threads)
    ref = lambda v: _reference(v, plan, sym, compute_ntk, compute_cov)
    _, dout = jax.jvp(ref, (xs,), (dxs,))
    return out, dout


@_backend.register("fused_cnn", "native")
def fused_cnn_native(
    x1,
    x2=None,
    *,
    plan,
    compute_ntk: bool = True,
    compute_cov: bool = True,
    tile: int | None = None,
    pair_block: int | None = None,
):
    """:func:`ntfast.ops.fused_cnn.fused_cnn_reference` on the native kernels (see module doc)."""
    del tile, pair_block  # XLA memory knobs; the kernels tile by offset planes themselves
    reason = unsupported_reason(plan, jnp.result_type(x1))
    if reason is not None:
        raise _backend.BackendError(f"backend 'native' cannot run this 'fused_cnn': {reason}.")
    sym = x2 is None
    x1 = jnp.asarray(x1)
    xs = (x1,) if sym else (x1, jnp.asarray(x2, x1.dtype))
    nngp, ntk, cov1, cov2 = _native(
        xs, plan, sym, bool(compute_ntk), bool(compute_cov), _threads[0]
    )
    return (
        nngp,
        ntk if compute_ntk else None,
        cov1 if compute_cov else None,
        None if (sym or not compute_cov) else cov2,
    )


fused_cnn_native.unsupported_reason = unsupported_reason
