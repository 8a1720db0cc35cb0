"""Launching the hand-written Triton kernels from JAX: the one module that touches the machinery.

Every Triton launch of ntfast goes through :func:`launch`, which picks per lowering platform
(``jax.lax.platform_dependent``, so one traced function serves both):

* ``cuda``: ``jax_triton.triton_call(..., name="ntfast_<op>_<variant>")``, an XLA custom call
  (``triton_kernel_call_ffi``) that carries the compiled kernel and our name;
* every other platform (CPU above all): ``jax.pure_callback`` running the SAME kernel source in the
  Triton interpreter on numpy buffers (correct, slow; a warning says so once per process).

:func:`differentiable` makes a launcher survive ``grad``/``jvp`` (derivatives from the XLA reference)
and ``vmap`` (a batching rule; default: a ``lax.map`` over the batch).

The kernel sources (``kernels/triton/<op>.py``; installed as ``ntfast/_kernels/triton/``) are
imported twice by :func:`kernels`, under two private package names: once compiled (for
``triton_call``), once with the interpreter on. The interpreter must be in force when the
``@triton.jit`` decorators run, and a kernel calling other jitted helpers cannot be re-wrapped one
function at a time, hence the second import. Rules for kernel files, which follow from this:
no jax or ntfast imports; sibling helpers imported relatively; every module that defines a
``@triton.jit`` function imports ``triton.language`` (the interpreter looks for it in the
function's globals, even where unused). Triton's own library functions (``tl.sum``, ``tl.max``,
``tl.cdiv``...) work in both copies (see :func:`_interpreter_scope`).

Versions (see ``pyproject.toml``): Triton's interpreter path works on jax 0.10-0.12; jax-triton
0.4.1 (needed only for the ``cuda`` branch) requires jax >= 0.11 and Python >= 3.12. On jax 0.12 its
dead-code-elimination rule has the old two-argument signature and every ``jit`` fails with a
``TypeError``; :func:`_patch_jax_triton` installs a rule that accepts both signatures.

Scalar kernel arguments are passed by keyword. On ``cuda`` jax-triton bakes them into the kernel
(each distinct value compiles once) and passes a Python ``float`` as fp32 when it fits in fp32:
an op that needs an f64 scalar must pass it as an array (or a ``tl.constexpr``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import threading
import types
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import triton

__all__ = [
    "CanaryError",
    "canary_guard",
    "compile_specialization",
    "cuda_lowering_unavailable_reason",
    "differentiable",
    "jax_triton_unavailable_reason",
    "kernel_call_names",
    "kernels",
    "kernels_dir",
    "kernels_path",
    "launch",
    "record_launches",
    "run_interpreted",
]

# Extra directories searched for kernel sources before ntfast's own (tests add theirs).
KERNELS_DIR_ENV = "NTFAST_TRITON_KERNELS"
# Compute capability used when lowering for cuda on a machine without a visible CUDA device.
COMPUTE_CAPABILITY_ENV = "NTFAST_TRITON_COMPUTE_CAPABILITY"
DEFAULT_COMPUTE_CAPABILITY = 80

# Compiler options of every compiled launch and of the compile proof: FMA contraction on, Triton's
# default so far (3.9 warns that 3.10 flips it; the kernels' numerics must not move with it).
COMPILE_OPTIONS = {"enable_fp_fusion": True}

_PKG_COMPILED = "_ntfast_triton_kernels"
_PKG_INTERPRET = "_ntfast_triton_kernels_interpret"

# --------------------------------------------------------------------------------------------
# Kernel sources
# --------------------------------------------------------------------------------------------


def kernels_dir() -> Path:
    """Where ntfast's own ``@triton.jit`` sources are: the installed ``ntfast/_kernels/triton/``,
    else the source tree's ``kernels/triton/``."""
    pkg_root = Path(__file__).resolve().parent.parent  # .../ntfast
    installed = pkg_root / "_kernels" / "triton"
    if installed.is_dir():
        return installed
    return pkg_root.parent / "kernels" / "triton"


def kernels_path() -> list[Path]:
    """Directories searched for ``<op>.py``: those in ``$NTFAST_TRITON_KERNELS``
    (``os.pathsep``-separated; tests add their own kernels this way), then :func:`kernels_dir`."""
    extra = [Path(p).resolve() for p in os.environ.get(KERNELS_DIR_ENV, "").split(os.pathsep) if p]
    return [*extra, kernels_dir()]


_load_lock = threading.RLock()
_loaded_from: dict[str, list[Path]] = {}


def _package(name: str, path: list[Path]) -> types.ModuleType:
    """A synthetic package ``name`` whose submodules are the files of the directories ``path``."""
    pkg = sys.modules.get(name)
    if pkg is not None and _loaded_from.get(name) == path:
        return pkg
    # A different search path (tests changing the override): drop the stale copies.
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(d) for d in path]
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    _loaded_from[name] = path
    return pkg


def kernels(op: str, *, interpret: bool) -> types.ModuleType:
    """The module ``kernels/triton/<op>.py``: compiled copy, or interpreter copy if ``interpret``.

    The two copies are distinct modules (``_ntfast_triton_kernels.<op>`` and
    ``_ntfast_triton_kernels_interpret.<op>``) imported from :func:`kernels_path`; relative imports
    between kernel files resolve within the same copy.
    """
    if not re.fullmatch(r"[A-Za-z_]\w*", op):
        raise ValueError(f"`op` must be a kernel module name, got {op!r}.")
    path = kernels_path()
    if not any((d / f"{op}.py").is_file() for d in path):
        raise FileNotFoundError(f"no Triton kernel source {op}.py in {[str(d) for d in path]}.")
    name = _PKG_INTERPRET if interpret else _PKG_COMPILED
    with _load_lock:
        _package(name, path)
        full = f"{name}.{op}"
        if full in sys.modules:
            return sys.modules[full]
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = bool(interpret)
            return importlib.import_module(full)


def _kernel_fn(op: str, kernel: str | Callable, *, interpret: bool):
    name = kernel if isinstance(kernel, str) else getattr(kernel, "__name__", None)
    if not isinstance(name, str):
        raise TypeError(
            f"`kernel` must be a kernel name or a @triton.jit function, got {kernel!r}."
        )
    mod = kernels(op, interpret=interpret)
    try:
        return getattr(mod, name)
    except AttributeError:
        raise AttributeError(f"kernels/triton/{op}.py has no kernel {name!r}.") from None


# --------------------------------------------------------------------------------------------
# jax-triton (cuda branch)
# --------------------------------------------------------------------------------------------

_jt_state: dict[str, Any] = {}


def _jax_triton():
    """``jax_triton`` (patched for jax 0.12), or None with the reason in ``_jt_state``."""
    if "module" not in _jt_state:
        try:
            import jax_triton
        except Exception as e:  # noqa: BLE001 - ImportError, or jax internals it needs missing
            _jt_state["module"] = None
            _jt_state["reason"] = (
                f"jax-triton is not importable ({type(e).__name__}: {e}); it needs jax >= 0.11 "
                f"and Python >= 3.12 (pip install 'ntfast[triton]'), this is jax {jax.__version__}"
            )
        else:
            _patch_jax_triton(jax_triton)
            _jt_state["module"] = jax_triton
            _jt_state["reason"] = None
    return _jt_state["module"]


def jax_triton_unavailable_reason() -> str | None:
    """None if the ``cuda`` branch can be lowered here (jax-triton importable), else why not."""
    _jax_triton()
    return _jt_state["reason"]


def cuda_lowering_unavailable_reason() -> str | None:
    """None if launches can be lowered for ``cuda`` here (the lowering proof; a CUDA GPU is not
    needed), else why not: jax-triton missing, or jaxlib without its GPU Triton support."""
    reason = jax_triton_unavailable_reason()
    if reason is not None:
        return reason
    if _jt_state["module"].triton_lib.triton_kernel_call_lib is None:
        import jaxlib

        return (
            "jaxlib has no GPU Triton support: install the CUDA plugin matching jaxlib "
            f"(pip install --no-deps jax-cuda13-plugin=={jaxlib.__version__}; no GPU needed)"
        )
    return None


def _patch_jax_triton(jax_triton) -> None:
    """jax-triton 0.4.1 registers ``rule(used_outputs, eqn)`` for DCE; jax 0.12 calls
    ``rule(used_outputs, live_inputs, eqn)``. The replacement takes either and keeps jax-triton's
    semantics (the launch is never removed and needs all its inputs)."""
    from jax._src.interpreters import partial_eval as pe

    prim = jax_triton.triton_lib.triton_kernel_call_p

    def keep_launch(used_outputs, *rest):
        eqn = rest[-1]
        return [True] * len(eqn.invars), eqn

    pe.dce_rules[prim] = keep_launch


def _compute_capability() -> int | None:
    """``$NTFAST_TRITON_COMPUTE_CAPABILITY``; else None (jax-triton asks the GPU) when a CUDA device
    is visible; else ``DEFAULT_COMPUTE_CAPABILITY`` (lowering for cuda on a GPU-less machine)."""
    env = os.environ.get(COMPUTE_CAPABILITY_ENV)
    if env:
        return int(env)
    try:
        if jax.devices("cuda"):
            return None
    except RuntimeError:
        pass
    return DEFAULT_COMPUTE_CAPABILITY


_unavailable_p = None


def _unavailable_primitive():
    """A primitive standing in for the cuda launch when jax-triton is missing: it traces (so the
    cpu branch of ``platform_dependent`` keeps working) and fails only if lowered for cuda."""
    global _unavailable_p
    if _unavailable_p is None:
        from jax.extend.core import Primitive
        from jax.interpreters import mlir

        p = Primitive("ntfast_triton_unavailable")
        p.multiple_results = True

        def abstract_eval(*_, out_avals, name, reason):
            return [jax.core.ShapedArray(a.shape, a.dtype) for a in out_avals]

        def lowering(ctx, *_, out_avals, name, reason):
            from ntfast.backend import BackendError

            raise BackendError(f"cannot lower Triton launch {name!r} for cuda: {reason}.")

        p.def_abstract_eval(abstract_eval)
        mlir.register_lowering(p, lowering)
        _unavailable_p = p
    return _unavailable_p


# --------------------------------------------------------------------------------------------
# Interpreter branch
# --------------------------------------------------------------------------------------------


class _HostStorage:
    """The storage half of the torch-like protocol the Triton interpreter expects."""

    def __init__(self, array: np.ndarray):
        self._array = array

    def data_ptr(self) -> int:
        return self._array.ctypes.data

    def cpu(self) -> _HostStorage:  # already host memory: the interpreter works in place
        return self

    def copy_(self, other: _HostStorage) -> None:
        if other._array is not self._array:  # the interpreter copies "back from the host"
            np.copyto(self._array, other._array)


class _HostTensor:
    """A numpy array dressed as the torch tensor the interpreter accepts (pointer, strides, dtype).

    The interpreter "copies to the host" by asking for the storage's ``cpu()``; returning the same
    storage makes it read and write our numpy buffer directly.
    """

    def __init__(self, array: np.ndarray):
        self._array = array
        self.dtype = array.dtype

    def data_ptr(self) -> int:
        return self._array.ctypes.data

    def untyped_storage(self) -> _HostStorage:
        return _HostStorage(self._array)

    def new_empty(self, *_, **__) -> _HostTensor:
        return _HostTensor(self._array)

    def set_(self, *_) -> _HostTensor:
        return self

    def storage_offset(self) -> int:
        return 0

    def size(self) -> tuple[int, ...]:
        return self._array.shape

    def stride(self) -> tuple[int, ...]:
        return tuple(s // self._array.itemsize for s in self._array.strides)


class CanaryError(AssertionError):
    """An interpreter launch wrote outside its buffers (found by :func:`canary_guard`)."""


_guard_state: dict[str, Any] = {"pad": 0, "violations": None}
# The interpreter patches triton.language globally and keeps the grid index in a global builder:
# two launches must not interleave (XLA:CPU may run independent callbacks concurrently).
_interp_lock = threading.Lock()
_warned = [False]

_INPUT_CANARY = np.nan  # an unmasked out-of-bounds read of a float input poisons the result
_OUTPUT_CANARY_BYTE = 0xA5


@contextlib.contextmanager
def canary_guard(pad: int = 4096) -> Iterator[list[str]]:
    """Test hook: interpreter launches run with every buffer inside a guarded allocation.

    Within the block each input is copied into the middle of a buffer ``pad`` elements longer on
    both sides whose margins hold NaN (float inputs; so an unmasked out-of-bounds read shows up as
    NaN in the result), and each output sits between margins of the byte ``0xA5``. After each launch
    every margin is checked; a changed margin raises :class:`CanaryError` naming the launch and
    buffer (surfacing through JAX as a runtime error) and is appended to the yielded list. Call
    ``block_until_ready`` inside the block: the check runs when the computation executes.
    """
    if pad < 1:
        raise ValueError(f"`pad` must be a positive number of elements, got {pad!r}.")
    violations: list[str] = []
    previous = dict(_guard_state)
    _guard_state.update(pad=int(pad), violations=violations)
    try:
        yield violations
    finally:
        _guard_state.update(previous)


def _guarded(shape, dtype, pad: int, fill) -> tuple[np.ndarray, np.ndarray]:
    """(full buffer, C-contiguous view of ``shape`` in its middle)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    full = np.empty(size + 2 * pad, dtype)
    if fill is None:
        full.view(np.uint8)[:] = _OUTPUT_CANARY_BYTE
    else:
        full[:] = fill
    inner = full[pad : pad + size].reshape(shape)
    return full, inner


def _margins_intact(full: np.ndarray, pad: int, fill) -> bool:
    head, tail = full[:pad], full[full.size - pad :]
    if fill is None:
        expected = np.full(pad * full.itemsize, _OUTPUT_CANARY_BYTE, np.uint8)
        return bool(
            np.array_equal(head.view(np.uint8), expected)
            and np.array_equal(tail.view(np.uint8), expected)
        )
    if isinstance(fill, float) and np.isnan(fill):
        return bool(np.isnan(head).all() and np.isnan(tail).all())
    return bool((head == fill).all() and (tail == fill).all())


# id(JITFunction) -> (the JITFunction, kept alive so the id stays unique; its interpreter twin)
_twins: dict[int, tuple[Any, Any]] = {}


def _language_namespaces() -> list[Any]:
    """The modules and classes of ``triton.language`` that the interpreter patches."""
    tl = triton.language
    mods = [m for n, m in list(sys.modules.items()) if n.startswith("triton.language") and m]
    classes = [tl.core.tensor, tl.core.tensor_descriptor_base, tl.core.dtype]
    classes += [c for c in (getattr(tl.core, "condition", None),) if c is not None]
    return mods + classes


@contextlib.contextmanager
def _interpreter_scope() -> Iterator[None]:
    """Lets one interpreter launch run in a process that also compiles the same kernels.

    * Triton's own ``@triton.jit`` library functions (``tl.sum``, ``tl.max``, ``tl.cdiv``,
      ``x.sum()``...) were decorated when ``triton`` was imported, with the interpreter off; an
      interpreted kernel calling them fails ("Cannot call @triton.jit'd outside of the scope of a
      kernel"). They are swapped for interpreter twins during the launch. (``TRITON_INTERPRET=1``
      for the whole process would break the compiled copy instead.)
    * The interpreter patches ``triton.language`` while it runs, and each nested jitted call
      patches it again without undoing it (harmless in a process that only interprets). Everything
      is put back afterwards, or a later ``triton.compile`` sees the interpreter's stand-ins.

    Callers hold ``_interp_lock``.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    try:
        # Imported lazily by the launcher (mangle_type); it asserts that the library functions it
        # re-exports are JITFunctions, so it must be loaded before they are swapped.
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass
    namespaces = _language_namespaces()
    saved = [(ns, dict(vars(ns))) for ns in namespaces]
    try:
        for ns in namespaces:
            for attr, value in list(vars(ns).items()):
                if isinstance(value, JITFunction):
                    twin = _twins.get(id(value))
                    if twin is None:
                        twin = _twins[id(value)] = (value, InterpretedFunction(value.fn))
                    setattr(ns, attr, twin[1])
        yield
    finally:
        for ns, before in saved:
            _restore(ns, before)


def _restore(ns: Any, before: dict[str, Any]) -> None:
    """Puts the attributes of module or class ``ns`` back to the snapshot ``before``."""
    now = vars(ns)
    is_class = isinstance(ns, type)
    for attr in [a for a in now if a not in before]:
        if is_class:
            delattr(ns, attr)
        else:
            del now[attr]
    for attr, value in before.items():
        if now.get(attr, _MISSING) is not value:
            if is_class:
                setattr(ns, attr, value)
            else:
                now[attr] = value


_MISSING = object()


def run_interpreted(fn, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Runs ``fn[grid](*args, **kwargs)`` in the interpreter, numpy arrays in place of tensors.

    ``fn`` is a kernel of an interpreter copy (``kernels(op, interpret=True)``, or one decorated
    with the interpreter knob on). numpy arguments are passed as pointers to their memory (made
    C-contiguous and written in place: pass the output arrays themselves). Use this rather than
    ``fn[grid](...)``: it serializes launches and undoes the interpreter's global patches of
    ``triton.language``, which otherwise break later compilations in the same process.
    """

    def wrap(a):
        return _HostTensor(_contiguous(a)) if isinstance(a, np.ndarray) else a

    with _interp_lock, _interpreter_scope():
        fn[grid](*map(wrap, args), **{k: wrap(v) for k, v in kwargs.items()})


def _contiguous(a: np.ndarray) -> np.ndarray:
    if not a.flags.c_contiguous:
        raise ValueError(
            "run_interpreted: numpy arguments must be C-contiguous (it writes in place)."
        )
    return a


def _warn_interpreter_once(name: str) -> None:
    if not _warned[0]:
        _warned[0] = True
        warnings.warn(
            f"ntfast: backend 'triton' is running {name!r} (and every later Triton launch) in the "
            "Triton interpreter on the CPU: correct but very slow. Use backend='xla' on a CPU, or "
            "a CUDA GPU for compiled Triton kernels.",
            RuntimeWarning,
            stacklevel=2,
        )


def _run_interpreter(
    op: str,
    kernel: str | Callable,
    name: str,
    grid: tuple[int, ...],
    out_avals: Sequence[jax.ShapeDtypeStruct],
    scalars: dict[str, Any],
    *arrays: np.ndarray,
) -> tuple[np.ndarray, ...]:
    fn = _kernel_fn(op, kernel, interpret=True)
    _warn_interpreter_once(name)
    pad, violations = _guard_state["pad"], _guard_state["violations"]
    inputs, outputs, checks = [], [], []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if pad:
            fill = _INPUT_CANARY if np.issubdtype(a.dtype, np.floating) else None
            full, inner = _guarded(a.shape, a.dtype, pad, fill)
            np.copyto(inner, a)
            checks.append((f"input {i}", full, fill))
        else:
            inner = np.array(a, copy=True, order="C")  # private, writable, contiguous
        inputs.append(inner)
    for i, aval in enumerate(out_avals):
        if pad:
            full, inner = _guarded(aval.shape, aval.dtype, pad, None)
            inner[...] = 0
            checks.append((f"output {i}", full, None))
        else:
            inner = np.zeros(aval.shape, aval.dtype)
        outputs.append(inner)
    run_interpreted(fn, grid, *inputs, *outputs, **scalars)
    bad = [what for what, full, fill in checks if not _margins_intact(full, pad, fill)]
    if bad:
        msg = f"Triton launch {name!r} ({op}.{getattr(fn, '__name__', fn)}) wrote out of bounds"
        msg += f" of {', '.join(bad)} (canary margins of {pad} elements changed)"
        if violations is not None:
            violations.append(msg)
        raise CanaryError(msg)
    return tuple(np.array(o) for o in outputs)


# --------------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------------


def _normalize_grid(grid, metaparams: dict[str, Any]) -> tuple[int, ...]:
    g = grid(dict(metaparams)) if callable(grid) else grid
    if isinstance(g, (int, np.integer)):
        g = (g,)
    g = tuple(int(d) for d in g)
    if not 1 <= len(g) <= 3 or any(d < 0 for d in g):
        raise ValueError(f"`grid` must give 1 to 3 non-negative ints, got {g!r}.")
    return g


_launch_logs: list[list[dict[str, Any]]] = []


@contextlib.contextmanager
def record_launches() -> Iterator[list[dict[str, Any]]]:
    """Test hook: every :func:`launch` traced inside the block appends a dict (``op``, ``kernel``,
    ``name``, ``grid``, ``in_dtypes``, ``out_dtypes``, ``metaparams``, ``num_warps``,
    ``num_stages``) to the yielded list. Launches are recorded when traced, not when run."""
    log: list[dict[str, Any]] = []
    _launch_logs.append(log)
    try:
        yield log
    finally:
        _launch_logs.remove(log)


def launch(
    op: str,
    kernel: str | Callable,
    *arrays: jax.Array,
    out_shape: jax.ShapeDtypeStruct | Sequence[jax.ShapeDtypeStruct],
    grid: tuple[int, ...] | int | Callable[[dict[str, Any]], tuple[int, ...]],
    name: str,
    num_warps: int = 4,
    num_stages: int = 1,
    **metaparams: Any,
):
    """Launches kernel ``kernel`` of ``kernels/triton/<op>.py`` on ``arrays``, like ``triton_call``.

    Pointer arguments: ``arrays`` then one zero-initialised output per ``out_shape`` entry, in the
    kernel's parameter order. ``metaparams``: scalar and ``tl.constexpr`` arguments, by keyword.
    ``grid``: 1-3 ints, or ``grid(metaparams) -> tuple``. ``name``: the custom-call name,
    ``ntfast_<op>_<variant>``. Returns one array if ``out_shape`` is a single struct, else a tuple.

    On ``cuda``: ``jax_triton.triton_call`` (a custom call named ``name``). Elsewhere:
    ``jax.pure_callback`` into the Triton interpreter (warns once per process). Neither has
    derivative or batching rules: wrap launchers with :func:`differentiable`.
    """
    if not (isinstance(name, str) and name.startswith(f"ntfast_{op}")):
        raise ValueError(f"`name` must be 'ntfast_{op}_<variant>', got {name!r}.")
    single = not isinstance(out_shape, (list, tuple))
    outs = [out_shape] if single else list(out_shape)
    out_avals = tuple(jax.ShapeDtypeStruct(tuple(o.shape), jnp.dtype(o.dtype)) for o in outs)
    arrays = tuple(jnp.asarray(a) for a in arrays)
    params = _kernel_fn(op, kernel, interpret=False).arg_names
    unknown = sorted(set(metaparams) - set(params))
    if unknown:
        # jax-triton would treat them as metaparams and the interpreter would drop them: typos.
        raise TypeError(f"kernel {op}.{kernel} has no parameter(s) {unknown}; it takes {params}.")
    grid_t = _normalize_grid(grid, metaparams)
    scalars = dict(metaparams)
    for log in _launch_logs:
        log.append(
            {
                "op": op,
                "kernel": kernel if isinstance(kernel, str) else kernel.__name__,
                "name": name,
                "grid": grid_t,
                "in_dtypes": [jnp.dtype(a.dtype) for a in arrays],
                "out_dtypes": [jnp.dtype(a.dtype) for a in out_avals],
                "metaparams": scalars,
                "num_warps": num_warps,
                "num_stages": num_stages,
            }
        )

    def on_cuda(*xs):
        jt = _jax_triton()
        if jt is None:
            prim = _unavailable_primitive()
            return tuple(prim.bind(*xs, out_avals=out_avals, name=name, reason=_jt_state["reason"]))
        with warnings.catch_warnings():
            # jax-triton 0.4.1 deprecates zeroed_outputs in favour of Refs; the contract here is
            # "outputs start at zero", which this keeps on every platform.
            warnings.simplefilter("ignore", DeprecationWarning)
            res = jt.triton_call(
                *xs,
                kernel=_kernel_fn(op, kernel, interpret=False),
                out_type=list(out_avals),
                grid=grid_t,
                name=name,
                num_warps=num_warps,
                num_stages=num_stages,
                backend_options=dict(COMPILE_OPTIONS),
                compute_capability=_compute_capability(),
                zeroed_outputs=tuple(range(len(out_avals))),
                **scalars,
            )
        return tuple(res)

    def on_host(*xs):
        cb = functools.partial(_run_interpreter, op, kernel, name, grid_t, out_avals, scalars)
        return tuple(
            jax.pure_callback(cb, out_avals, *xs, vmap_method="sequential") if out_avals else ()
        )

    res = jax.lax.platform_dependent(*arrays, cuda=on_cuda, default=on_host)
    return res[0] if single else tuple(res)


# --------------------------------------------------------------------------------------------
# differentiable
# --------------------------------------------------------------------------------------------

BatchRule = Callable[..., tuple[Any, Any]]


def differentiable(
    impl: Callable[..., Any],
    reference: Callable[..., Any],
    *,
    batch_rule: BatchRule | None = None,
) -> Callable[..., Any]:
    """``impl(*arrays)`` made differentiable (through ``reference``) and batchable.

    ``impl`` and ``reference`` take the same positional arrays (bind static arguments with
    ``functools.partial`` first) and return the same pytree; ``None`` entries are passed through
    untouched. Derivatives: a ``jax.custom_jvp`` whose tangent is ``jax.jvp(reference, ...)``, so
    ``grad`` (by transposition), ``jvp`` and higher orders all see the reference's derivatives while
    the primal output comes from ``impl``. Batching: a ``jax.custom_batching.custom_vmap`` rule,
    ``batch_rule(axis_size, in_batched, *arrays) -> (out, out_batched)`` if given (batch axes are
    at position 0 of the batched arrays; ``in_batched`` has ``False`` for ``None`` entries),
    otherwise a ``lax.map`` over the batch (correct, one launch per batch element).
    """

    @functools.cache
    def build(present: tuple[bool, ...]):
        def full(xs):
            it = iter(xs)
            return [next(it) if p else None for p in present]

        def call_impl(*xs):
            return impl(*full(xs))

        def call_ref(*xs):
            return reference(*full(xs))

        batched_impl = jax.custom_batching.custom_vmap(call_impl)

        @batched_impl.def_vmap
        def _rule(axis_size, in_batched, *xs):
            if batch_rule is not None:
                flags = iter(in_batched)
                all_flags = [next(flags) if p else False for p in present]
                return batch_rule(axis_size, all_flags, *full(xs))
            return _map_rule(batched_impl, axis_size, in_batched, xs)

        f = jax.custom_jvp(batched_impl)

        @f.defjvp
        def _jvp(primals, tangents):
            out = f(*primals)
            _, tangent_out = jax.jvp(call_ref, primals, tangents)
            return out, tangent_out

        return f

    @functools.wraps(impl)
    def wrapped(*arrays):
        present = tuple(a is not None for a in arrays)
        return build(present)(*(a for a in arrays if a is not None))

    return wrapped


def _map_rule(fn, axis_size, in_batched, xs):
    """Default batching: ``lax.map`` of ``fn`` over the batched arguments (unbatched ones closed
    over). ``fn`` itself stays batchable for enclosing ``vmap``s."""
    batched = [x for x, b in zip(xs, in_batched) if b]

    def one(bs):
        it = iter(bs)
        return fn(*[next(it) if b else x for x, b in zip(xs, in_batched)])

    out = jax.lax.map(one, batched)
    return out, jax.tree.map(lambda _: True, out)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation (the GPU-less compile proof)
# --------------------------------------------------------------------------------------------


def compile_specialization(spec: dict[str, Any], capability: int, *, op: str | None = None):
    """``triton.compile`` one entry of a launcher's ``SPECIALIZATIONS`` for ``sm_<capability>``.

    Needs no GPU (ptxas ships with the Triton wheel). ``spec`` keys: ``kernel`` (name in
    ``kernels/triton/<op>.py``), ``op`` (the kernel module; else the ``op`` argument),
    ``signature`` (parameter -> Triton type: ``"*fp32"``, ``"*fp64"``, ``"i32"``, ``"fp32"``...;
    constexpr parameters may be listed as ``"constexpr"`` or left out), ``constexprs`` (parameter ->
    value), optional ``num_warps`` (4) and ``num_stages`` (1). Returns the compiled kernel
    (``.asm["ptx"]``, ``.asm["cubin"]``).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = spec.get("op", op)
    if module is None:
        raise ValueError("`spec` has no 'op' entry and no `op` was given.")
    fn = _kernel_fn(module, spec["kernel"], interpret=False)
    constexprs = dict(spec.get("constexprs", {}))
    given = dict(spec["signature"])
    missing = [a for a in fn.arg_names if a not in given and a not in constexprs]
    if missing:
        raise ValueError(f"specialization of {spec['kernel']!r} lacks types for {missing}.")
    signature = {a: given.get(a, "constexpr") for a in fn.arg_names}
    options = {
        **COMPILE_OPTIONS,
        "num_warps": spec.get("num_warps", 4),
        "num_stages": spec.get("num_stages", 1),
    }
    source = ASTSource(fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


# --------------------------------------------------------------------------------------------
# Lowered-IR inspection (tests, benchmarks)
# --------------------------------------------------------------------------------------------


def kernel_call_names(lowered) -> list[str]:
    """The names of every Triton custom call in ``lowered`` (a ``jax.stages.Lowered`` or its
    StableHLO ``ir.Module``), one entry per call, in program order (``""`` for an unnamed call).

    jax-triton stores the name in the call's zlib-compressed ``opaque`` backend config (a protobuf
    whose top level holds the kernel call and the name), so the module's text does not show it.
    """
    module = lowered.compiler_ir("stablehlo") if hasattr(lowered, "compiler_ir") else lowered
    names: list[str] = []

    def visit(op) -> None:
        if op.name == "stablehlo.custom_call" and "triton" in str(
            op.attributes["call_target_name"]
        ):
            names.append(_call_name(op))
        for region in op.regions:
            for block in region:
                for inner in block:
                    visit(inner.operation)

    visit(module.operation)
    return names


_IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")


def _call_name(op) -> str:
    attrs = op.attributes
    if "mhlo.backend_config" not in attrs or "opaque" not in attrs["mhlo.backend_config"]:
        return ""
    raw = zlib.decompress(attrs["mhlo.backend_config"]["opaque"].value_bytes)
    # Walk the top-level protobuf fields; the name is the length-delimited one that is an
    # identifier (the others are the nested kernel-call message and the metadata bytes).
    pos, found = 0, ""
    while pos < len(raw):
        key, pos = _varint(raw, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(raw, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(raw, pos)
            payload, pos = raw[pos : pos + size], pos + size
            if _IDENT.fullmatch(payload):
                found = payload.decode()
        else:
            break
    return found


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
