"""Triton launchers of the ``nonlin_<kind>`` ops (kernels: ``kernels/triton/nonlin.py``).

Registered for backend ``"triton"`` with the exact signatures of the XLA references
(``ntfast/ops/nonlin.py``): ``abrelu`` (Relu, LeakyRelu, Abs), ``sign``, ``erf``, ``gelu``,
``sin`` (Sin, Cos), ``rbf``, ``exp``, ``gaussian``. Every other kind has no Triton kernel: the
dispatcher raises :class:`ntfast.backend.BackendError` for it.

One launch per call computes ``new = E[f(u) f(v)]`` and, with an NTK, ``ntk·Σ̇`` from one read
of each input (custom calls ``ntfast_nonlin_<kind>``). :func:`nonlin_affine` also applies the next
Dense layer in the same pass (``ntfast_nonlin_<kind>_affine``); :func:`nonlin_affine_reference`
is its XLA definition.

Broadcasting: ``q11``, ``q22`` are read in place through a stride table (the kernel's ``layout``;
adjacent axes with the same broadcast pattern are merged, so the layers' ``(N1, 1, H, 1, W, 1)``
against ``(N1, N2, H, H', W, W')`` costs one int32 div/mod per entry and merged axis); ``q12``
and ``ntk`` are materialized to the output shape only when they are themselves broadcast.
Per-kind constants are computed in Python f64 in the reference's order and passed as an array of
the data's dtype, so one compiled kernel per (kind, dtype, with/without NTK, with/without affine)
serves every shape and parameter value (``SPECIALIZATIONS``).

Served: float32 and float64 results (integer inputs are promoted to the default float dtype like
the reference), any broadcastable shapes, mixed input dtypes (then ``ntk·Σ̇`` is formed in XLA in
the promoted dtype). Refused with ``BackendError``: other dtypes (float16, bfloat16, complex),
traced (non-static) kind parameters, and arrays beyond the kernels' int32 offsets (one merged axis
or one variance array of 2^31 entries or more).
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np

from ntfast import backend as _backend
from ntfast.backend import BackendError
from ntfast.ops import nonlin as _ref

from . import runtime

_KERNELS = "nonlin"  # kernels/triton/nonlin.py
SUPPORTED = ("abrelu", "sign", "erf", "gelu", "sin", "rbf", "exp", "gaussian")
# The kernels' KIND codes (kernels/triton/nonlin.py's KINDS; tests/triton/test_nonlin.py checks).
_KIND_CODE = {kind: i for i, kind in enumerate(SUPPORTED)}
N_PARAMS = 9  # kernel's prm: 5 kind constants, then w_var, b_var, t_e, t_c
BLOCK = 1024
NUM_WARPS = 4
_DTYPES = {np.dtype(np.float32): "fp32", np.dtype(np.float64): "fp64"}
_INT32_MAX = 2**31 - 1


def call_name(kind: str, affine: bool = False) -> str:
    """Custom-call name of a launch: ``ntfast_nonlin_<kind>`` (``..._affine`` with the epilogue)."""
    return f"ntfast_nonlin_{kind}" + ("_affine" if affine else "")


# ------------------------------------------------------------------------------------------------
# Static parameters


def _static(kind: str, name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise BackendError(
            f"backend 'triton' op 'nonlin_{kind}': parameter {name!r} must be a static Python "
            f"number (it is compiled into the launch), got {type(value).__name__}; "
            "use backend='xla' for traced parameters."
        ) from e


def _kind_constants(kind: str, params: dict) -> tuple[float, ...]:
    """The kernel's ``prm[0:5]`` for ``kind`` (see ``KIND_PARAMS`` of the kernels), evaluated in
    Python f64 in the same order as the XLA reference's Python-scalar subexpressions."""
    p = {k: _static(kind, k, v) for k, v in params.items()}
    if kind == "abrelu":
        a, b = p["a"], p["b"]
        return ((a - b) ** 2, a * b)
    if kind == "erf":
        a, b, c = p["a"], p["b"], p["c"]
        b2 = b * b
        return (b2, a * a * (2 / math.pi), c * c, a * a * b2 * (4 / math.pi))
    if kind == "sin":
        a, b, c = p["a"], p["b"], p["c"]
        b2 = b * b
        return (b2, -b2, math.cos(2 * c), a * a / 2, a * a * b2 / 2)
    if kind == "rbf":
        return (p["gamma"], 2 * p["gamma"])
    if kind == "exp":
        return (p["a"] * p["a"], p["b"] * p["b"])
    if kind == "gaussian":
        a, b = p["a"], p["b"]
        return (2 * b, 4 * b * b, a * a, 4 * a * a * b * b)
    return ()  # sign, gelu


# ------------------------------------------------------------------------------------------------
# Layout


def _broadcast_strides(shape: tuple[int, ...], sub: tuple[int, ...]) -> list[int]:
    """Element strides of a C-contiguous ``sub`` broadcast to ``shape`` (0 on broadcast axes)."""
    sub = (1,) * (len(shape) - len(sub)) + tuple(sub)
    strides, acc = [0] * len(shape), 1
    for d in reversed(range(len(shape))):
        if sub[d] != 1:
            strides[d] = acc
        acc *= sub[d]
    return strides


def layout(
    shape: tuple[int, ...], shape11: tuple[int, ...], shape22: tuple[int, ...]
) -> np.ndarray:
    """The kernel's ``layout``: ``[ndim, (size, stride11, stride22) × ndim]`` (int32), the output
    ``shape`` with size-1 axes dropped and neighbours of equal broadcast pattern merged."""
    s11, s22 = _broadcast_strides(shape, shape11), _broadcast_strides(shape, shape22)
    dims: list[list[int]] = []
    for size, a, b in zip(shape, s11, s22):
        if size == 1:
            continue
        if dims and dims[-1][1] == a * size and dims[-1][2] == b * size:
            dims[-1] = [dims[-1][0] * size, a, b]
        else:
            dims.append([size, a, b])
    dims = dims or [[1, 0, 0]]
    too_big = [d[0] for d in dims if d[0] > _INT32_MAX]
    if too_big or math.prod(shape11) > _INT32_MAX or math.prod(shape22) > _INT32_MAX:
        raise BackendError(
            f"backend 'triton' nonlin ops: output {shape} with variances {shape11}, {shape22} "
            "exceeds the kernels' int32 offsets (an axis run or a variance array of >= 2^31 "
            "entries); use backend='xla' or split the batch."
        )
    return np.array([len(dims), *(v for d in dims for v in d)], np.int32)


def _result_dtype(*arrays) -> np.dtype:
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(float)  # the reference's float arithmetic promotes ints
    return np.dtype(dtype)


def _check_dtype(kind: str, dtype: np.dtype) -> None:
    if dtype not in _DTYPES:
        raise BackendError(
            f"backend 'triton' op 'nonlin_{kind}' supports float32 and float64, got {dtype}."
        )


# ------------------------------------------------------------------------------------------------
# Launch


def _launch(kind, consts, affine, q12, q11, q22, ntk):
    """One kernel launch on arrays of one float dtype; ``q12``, ``ntk`` of the output shape,
    ``q11``, ``q22`` broadcastable to it. Returns ``(new, ntk_out or None)`` of that shape."""
    shape, dtype = q12.shape, q12.dtype
    size = math.prod(shape)
    if size == 0:
        zeros = jnp.zeros(shape, dtype)
        return zeros, None if ntk is None else zeros
    lay = layout(shape, q11.shape, q22.shape)
    prm = np.zeros(N_PARAMS, dtype)
    prm[: len(consts)] = consts
    if affine is not None:
        prm[5:9] = affine
    out = jax.ShapeDtypeStruct((size,), dtype)
    flat = [x.reshape(-1) for x in (q12, q11, q22)]
    common = {
        "grid": (-(-size // BLOCK),),
        "name": call_name(kind, affine is not None),
        "num_warps": NUM_WARPS,
        "KIND": _KIND_CODE[kind],
        "HAS_AFFINE": affine is not None,
        "BLOCK": BLOCK,
    }
    if ntk is None:
        new = runtime.launch(
            _KERNELS,
            "nonlin_kernel",
            *flat,
            jnp.asarray(lay),
            jnp.asarray(prm),
            out_shape=out,
            **common,
        )
        return new.reshape(shape), None
    new, ntk_out = runtime.launch(
        _KERNELS,
        "nonlin_ntk_kernel",
        *flat,
        ntk.reshape(-1),
        jnp.asarray(lay),
        jnp.asarray(prm),
        out_shape=[out, out],
        **common,
    )
    return new.reshape(shape), ntk_out.reshape(shape)


def _unbroadcast(x, full: tuple[int, ...], shape: tuple[int, ...]):
    """``x`` of shape ``full`` (constant along the axes that ``shape`` broadcasts) cut to ``shape``."""
    lead = len(full) - len(shape)
    idx = (0,) * lead + tuple(
        slice(0, 1) if s == 1 and f != 1 else slice(None) for s, f in zip(shape, full[lead:])
    )
    return x[idx]


def _impl(q12, q11, q22, ntk, *, kind, consts, affine):
    """``(new, ntk_out)`` with the reference's shapes and dtypes (+ the affine epilogue)."""
    q12, q11, q22 = (jnp.asarray(x) for x in (q12, q11, q22))
    dtype = _result_dtype(q12, q11, q22)
    _check_dtype(kind, dtype)
    q12, q11, q22 = (x.astype(dtype) for x in (q12, q11, q22))
    shape = jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape)
    if ntk is not None:
        ntk = jnp.asarray(ntk)
        mixed = _result_dtype(ntk, dtype) != dtype
        if mixed or (kind == "sign" and affine is None):
            # Σ̇ in the data's dtype, ntk·Σ̇ in XLA with the reference's promotion (sign: Σ̇ := 0
            # needs no kernel output at all).
            new, dot = _impl(
                q12,
                q11,
                q22,
                None if kind == "sign" else jnp.ones(shape, dtype),
                kind=kind,
                consts=consts,
                affine=None,
            )
            ntk_out = jnp.zeros_like(ntk) if kind == "sign" else ntk * dot
            if affine is not None:
                w, b, t_e, t_c = affine
                ntk_out = (t_e * new + t_c) + w * ntk_out
                new = w * new + b
            return new, ntk_out
        full = jnp.broadcast_shapes(shape, ntk.shape)
        q12 = jnp.broadcast_to(q12, full)
        ntk = jnp.broadcast_to(ntk.astype(dtype), full)  # exact: dtype is the wider one
        new, ntk_out = _launch(kind, consts, affine, q12, q11, q22, ntk)
        return _unbroadcast(new, full, shape), ntk_out
    new, _ = _launch(kind, consts, affine, jnp.broadcast_to(q12, shape), q11, q22, None)
    return new, None


def _batch_rule(fn):
    """vmap rule: the op is elementwise with broadcasting, so a batch axis is one more leading
    axis (size 1 on the unbatched arrays, after right-aligning the ranks)."""

    def rule(axis_size, in_batched, *arrays):
        rank = max(x.ndim - bool(b) for x, b in zip(arrays, in_batched) if x is not None)

        def lift(x, b):
            if x is None:
                return None
            core = x.shape[1:] if b else x.shape
            return x.reshape((axis_size if b else 1,) + (1,) * (rank - len(core)) + core)

        new, ntk_out = fn(*(lift(x, b) for x, b in zip(arrays, in_batched)))
        new_batched = any(in_batched[:3])
        if not new_batched:
            new = new[0]
        return (new, ntk_out), (new_batched, None if ntk_out is None else True)

    return rule


def _differentiable(impl, reference):
    """``runtime.differentiable`` whose batching rule calls the wrapped function itself, so
    that a vmap of a vmap folds again (one launch) instead of mapping the inner launch."""
    holder = []
    fn = runtime.differentiable(impl, reference, batch_rule=_batch_rule(lambda *a: holder[0](*a)))
    holder.append(fn)
    return fn


@functools.cache
def _op(kind: str, params: tuple, affine: tuple | None):
    """The differentiable, batchable launcher of one (kind, params, epilogue)."""
    kw = dict(params)
    impl = functools.partial(_impl, kind=kind, consts=_kind_constants(kind, kw), affine=affine)
    if affine is None:
        reference = functools.partial(_ref.KINDS[kind][0], **kw)
    else:
        reference = functools.partial(_affine_reference, kind=kind, params=kw, affine=affine)
    return _differentiable(impl, reference)


def _run(kind: str, q12, q11, q22, ntk, params: dict, affine=None):
    key = tuple(sorted((k, _static(kind, k, v)) for k, v in params.items()))
    return _op(kind, key, affine)(q12, q11, q22, ntk)


# ------------------------------------------------------------------------------------------------
# Registered ops: exactly the references' signatures.


@_backend.register("nonlin_abrelu", "triton")
def abrelu_expectation(q12, q11, q22, ntk=None, *, a, b):
    """Triton ``nonlin_abrelu`` (ABRelu, Relu, LeakyRelu, Abs); see the XLA reference."""
    return _run("abrelu", q12, q11, q22, ntk, {"a": a, "b": b})


@_backend.register("nonlin_sign", "triton")
def sign_expectation(q12, q11, q22, ntk=None):
    """Triton ``nonlin_sign``; ``ntk·Σ̇ := 0`` as the reference."""
    return _run("sign", q12, q11, q22, ntk, {})


@_backend.register("nonlin_erf", "triton")
def erf_expectation(q12, q11, q22, ntk=None, *, a=1.0, b=1.0, c=0.0):
    """Triton ``nonlin_erf`` (Erf, Sigmoid_like); see the XLA reference."""
    return _run("erf", q12, q11, q22, ntk, {"a": a, "b": b, "c": c})


@_backend.register("nonlin_gelu", "triton")
def gelu_expectation(q12, q11, q22, ntk=None):
    """Triton ``nonlin_gelu``; see the XLA reference."""
    return _run("gelu", q12, q11, q22, ntk, {})


@_backend.register("nonlin_sin", "triton")
def sin_expectation(q12, q11, q22, ntk=None, *, a=1.0, b=1.0, c=0.0):
    """Triton ``nonlin_sin`` (Sin, Cos); see the XLA reference."""
    return _run("sin", q12, q11, q22, ntk, {"a": a, "b": b, "c": c})


@_backend.register("nonlin_rbf", "triton")
def rbf_expectation(q12, q11, q22, ntk=None, *, gamma=1.0):
    """Triton ``nonlin_rbf``; see the XLA reference."""
    return _run("rbf", q12, q11, q22, ntk, {"gamma": gamma})


@_backend.register("nonlin_exp", "triton")
def exp_expectation(q12, q11, q22, ntk=None, *, a=1.0, b=1.0):
    """Triton ``nonlin_exp``; see the XLA reference."""
    return _run("exp", q12, q11, q22, ntk, {"a": a, "b": b})


@_backend.register("nonlin_gaussian", "triton")
def gaussian_expectation(q12, q11, q22, ntk=None, *, a=1.0, b=-1.0):
    """Triton ``nonlin_gaussian``; see the XLA reference."""
    return _run("gaussian", q12, q11, q22, ntk, {"a": a, "b": b})


# ------------------------------------------------------------------------------------------------
# Nonlinearity fused with the next Dense layer


def _affine_reference(q12, q11, q22, ntk=None, *, kind, params, affine):
    new, ntk_dot = _ref.KINDS[kind][0](q12, q11, q22, ntk, **params)
    return _ref.apply_affine(new, ntk_dot, affine)


def _bound_params(kind: str, params: dict) -> dict:
    """``params`` validated against the reference's signature, defaults filled in."""
    if kind not in _ref.KINDS:
        raise ValueError(f"`kind` must be one of {sorted(_ref.KINDS)}, got {kind!r}.")
    _ref._check_params(kind, params)
    bound = inspect.signature(_ref.KINDS[kind][0]).bind(None, None, None, None, **params)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k in _ref.KINDS[kind][2]}


def nonlin_affine_reference(kind: str, q12, q11, q22, ntk=None, **kwargs):
    """XLA definition of :func:`nonlin_affine`: the registered XLA op ``nonlin_affine_<kind>``
    (``ntfast.ops.nonlin.nonlin_affine``: ``nonlin_<kind>`` then the Dense kernel map)."""
    return _ref.nonlin_affine(kind, q12, q11, q22, ntk, backend="xla", **kwargs)


def nonlin_affine(
    kind: str,
    q12,
    q11,
    q22,
    ntk=None,
    *,
    w_var,
    b_var=None,
    parameterization: str = "ntk",
    input_width=None,
    **params,
):
    """``nonlin_<kind>`` fused with the following ``Dense`` layer's kernel map, in one launch.

    For a layer sequence ``<nonlinearity>, Dense(W_std, b_std, parameterization, s)`` with
    ``w_var = W_std**2``, ``b_var = b_std**2`` (None: no bias) and, for ``"standard"``,
    ``input_width = N_in / s[0]`` (the nonlinearity's channel count over ``s_in``):

        nngp' = w_var · E[f(u) f(v)] + b_var
        ntk'  = nngp' + w_var · ntk·Σ̇                                    ("ntk")
        ntk'  = input_width · E[f(u) f(v)] + w_var · ntk·Σ̇ (+ 1 if bias)  ("standard")

    Arguments and shapes as ``nonlin_<kind>`` (``ntfast.ops.nonlin.nonlin``); cov1/cov2 are the
    ``ntk=None`` case. Returns ``(nngp', ntk' or None)``, equal (to rounding) to
    :func:`nonlin_affine_reference`; differentiable and batchable like the plain ops. Kinds
    without a Triton kernel raise :class:`~ntfast.backend.BackendError`.
    """
    params = _bound_params(kind, params)
    if kind not in _KIND_CODE:
        raise BackendError(
            f"backend 'triton' has no kernel for nonlin kind {kind!r} (supported: {SUPPORTED})."
        )
    names = ("w_var", "b_var", "input_width", "t_c")
    affine = tuple(
        _static("affine", n, v)
        for n, v in zip(names, _ref.affine_terms(w_var, b_var, parameterization, input_width))
    )
    return _run(kind, q12, q11, q22, ntk, params, affine)


def _register_affine(kind: str) -> None:
    def impl(q12, q11, q22, ntk=None, **kw):
        return nonlin_affine(kind, q12, q11, q22, ntk, **kw)

    _backend.register(f"nonlin_affine_{kind}", "triton", impl)


for _kind in _KIND_CODE:
    _register_affine(_kind)


# ------------------------------------------------------------------------------------------------
# Compile proof


def _specializations() -> list[dict]:
    """Every (kernel, dtype, constexpr) combination the launchers above can pick."""
    specs = []
    for dtype in _DTYPES.values():
        for kernel, with_ntk in (("nonlin_kernel", False), ("nonlin_ntk_kernel", True)):
            inputs = ["q12_ptr", "q11_ptr", "q22_ptr"] + (["ntk_ptr"] if with_ntk else [])
            outputs = ["new_ptr"] + (["ntk_out_ptr"] if with_ntk else [])
            signature = {p: f"*{dtype}" for p in inputs}
            signature.update(layout_ptr="*i32", prm_ptr=f"*{dtype}")
            signature.update({p: f"*{dtype}" for p in outputs})
            for kind in SUPPORTED:
                for has_affine in (False, True):
                    if kind == "sign" and with_ntk and not has_affine:
                        continue  # ntk·Σ̇ := 0 without a kernel output
                    constexprs = {
                        "KIND": _KIND_CODE[kind],
                        "HAS_AFFINE": has_affine,
                        "BLOCK": BLOCK,
                    }
                    specs.append(
                        {
                            "op": _KERNELS,
                            "kernel": kernel,
                            "names": (call_name(kind, has_affine),),
                            "dtype": dtype,
                            "signature": {**signature, **{k: "constexpr" for k in constexprs}},
                            "constexprs": constexprs,
                            "num_warps": NUM_WARPS,
                            "num_stages": 1,
                        }
                    )
    return specs


#: Every kernel specialization the ``nonlin_<kind>`` launchers can pick, as dicts with keys ``op``
#: (kernel module), ``kernel``, ``names`` (custom calls that use it), ``dtype``, ``signature``
#: (triton.compile signature incl. ``"constexpr"`` entries), ``constexprs``, ``num_warps``,
#: ``num_stages``. Sizes and kind parameters are data (``layout``, ``prm``), not specializations.
SPECIALIZATIONS: list[dict] = _specializations()
