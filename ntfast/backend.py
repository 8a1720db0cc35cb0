"""The backend flag: which implementation runs the hot covariance ops.

Names: ``"auto" | "xla" | "triton" | "native"``. ``"xla"`` is the pure-XLA reference
(``ntfast/ops/<op>.py``), the definition every other backend must match, and the TPU path.

Where the choice comes from, most specific first:

1. per call: ``ntfast.ops.<op>(..., backend="xla")`` or ``kernel_fn(x1, x2, backend="xla")``;
2. the innermost ``with ntfast.use_backend("xla"):`` block;
3. the global ``ntfast.set_backend("xla")``;
4. the ``NTFAST_BACKEND`` environment variable, read when first needed;
5. ``"auto"``.

``"auto"`` takes, per op, the first backend in ``AUTO_ORDER`` that has the op registered, is
available on this machine and suits its default device (``"triton"``: a CUDA GPU only), and falls
back silently. An explicit name never falls back: an unavailable backend, an op it lacks or a
request it cannot serve raises :class:`BackendError` naming the reason — except that ``"native"``
(whole-network fused kernels) runs the XLA definition of the ops it has no kernel for
(``XLA_FILLED``).

Optional backends live in their own packages (``"triton"``: ``ntfast._triton``) and are imported
the first time the backend is considered, so ``import ntfast`` works without Triton. ``"triton"``
requested explicitly on a CPU (or any non-CUDA device) runs the same kernels in the Triton
interpreter (slow; it warns once).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

BACKENDS = ("auto", "xla", "triton", "native")
# Preference of "auto" among concrete backends; "xla" is always last and always present.
AUTO_ORDER = ("native", "triton", "xla")
# Backends whose missing ops are the XLA definition: "native" provides fused whole-network
# kernels (fused_cnn), so a network's other layers (input covariance, a Dense head, layers the
# fused kernels do not cover) run the XLA reference under an explicit backend="native".
XLA_FILLED = ("native",)


class BackendError(RuntimeError):
    """A requested backend cannot serve a request (unknown, unavailable, or op not implemented)."""


_registry: dict[str, dict[str, Callable]] = {}
# backend name -> zero-arg function returning None if usable here, else the reason it is not.
_availability: dict[str, Callable[[], str | None]] = {"xla": lambda: None}
# backend name -> zero-arg predicate: may "auto" pick it for this machine's default device?
_auto_eligible: dict[str, Callable[[], bool]] = {}
# Optional backends registered by importing a package on first use; the import's outcome
# (None = imported, else the reason it failed) is remembered.
_LAZY_PACKAGES = {"triton": "ntfast._triton", "native": "ntfast._native"}
_lazy_outcome: dict[str, str | None] = {}
_global: list[str | None] = [None]
_local = threading.local()


def _check_name(name: str, what: str = "backend") -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"`{what}` must be one of {BACKENDS}, got {name!r}.")
    return name


def set_backend(name: str | None) -> None:
    """Sets the global backend; ``None`` goes back to ``NTFAST_BACKEND`` / ``"auto"``."""
    _global[0] = None if name is None else _check_name(name)


def get_backend() -> str:
    """The backend in force here: innermost context manager, else global, else env, else auto."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if _global[0] is not None:
        return _global[0]
    env = os.environ.get("NTFAST_BACKEND")
    if env:
        return _check_name(env.strip().lower(), "NTFAST_BACKEND")
    return "auto"


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[str]:
    """Context manager: ``with use_backend("xla"): ...``. ``None`` leaves the current choice."""
    if name is None:
        yield get_backend()
        return
    _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def register_availability(backend: str, check: Callable[[], str | None]) -> None:
    """Declares how to tell whether ``backend`` is usable: ``check()`` returns None or a reason."""
    _availability[_check_name(backend)] = check


def _load(backend: str) -> str | None:
    """Imports an optional backend's package once (it registers its ops); None or why it failed."""
    if backend not in _LAZY_PACKAGES:
        return None
    if backend not in _lazy_outcome:
        import importlib

        try:
            importlib.import_module(_LAZY_PACKAGES[backend])
        except ImportError as e:
            if e.name and not e.name.startswith("ntfast"):
                _lazy_outcome[backend] = f"{e.name} is not installed ({e})"
            else:
                _lazy_outcome[backend] = f"importing {_LAZY_PACKAGES[backend]} failed: {e!r}"
        except Exception as e:  # noqa: BLE001 - a broken optional backend must not break ntfast
            _lazy_outcome[backend] = f"importing {_LAZY_PACKAGES[backend]} failed: {e!r}"
        else:
            _lazy_outcome[backend] = None
    return _lazy_outcome[backend]


def default_device_is_cuda() -> bool:
    """Whether JAX's default device is an NVIDIA GPU (CUDA; not ROCm, TPU or CPU)."""
    import jax

    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False
    if device.platform == "cuda":
        return True
    if device.platform != "gpu":
        return False
    return "cuda" in str(getattr(device.client, "platform_version", "")).lower()


def _triton_unavailable_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e}); pip install 'triton>=3.7,<3.10'"
    reason = _load("triton")
    if reason is not None:
        return reason
    if default_device_is_cuda():
        # Compiled kernels on the GPU need jax-triton; elsewhere the interpreter needs only Triton.
        from ._triton import runtime

        return runtime.cuda_lowering_unavailable_reason()
    return None


_availability["triton"] = _triton_unavailable_reason
_auto_eligible["triton"] = lambda: default_device_is_cuda()  # late-bound: replaceable in tests


def _native_unavailable_reason() -> str | None:
    reason = _load("native")
    if reason is not None:
        return reason
    from . import _native

    return _native.unavailable_reason()


def _native_auto_eligible() -> bool:
    if _load("native") is not None:
        return False
    from . import _native

    return _native.auto_eligible()


_availability["native"] = _native_unavailable_reason
_auto_eligible["native"] = _native_auto_eligible


def unavailable_reason(backend: str) -> str | None:
    """None if ``backend`` can run on this machine, else a human-readable reason."""
    _check_name(backend)
    if backend == "auto":
        return None
    check = _availability.get(backend)
    if check is None:
        return f"backend {backend!r} is not built into this version of ntfast"
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - any failure to probe means unavailable, with the reason
        return f"backend {backend!r} failed its availability check: {e!r}"


def available_backends() -> dict[str, str | None]:
    """Every concrete backend mapped to None (usable) or the reason it is not."""
    return {b: unavailable_reason(b) for b in BACKENDS if b != "auto"}


def register(op: str, backend: str, fn: Callable | None = None):
    """Registers ``fn`` as ``backend``'s implementation of ``op`` (usable as a decorator)."""
    _check_name(backend)
    if backend == "auto":
        raise ValueError("`backend` cannot be 'auto' when registering an implementation.")

    def deco(f: Callable) -> Callable:
        _registry.setdefault(op, {})[backend] = f
        return f

    return deco if fn is None else deco(fn)


def _unsupported(op: str, backend: str, query: dict | None) -> str | None:
    """Why ``backend``'s ``op`` cannot serve the static request ``query`` (None: it can).

    An implementation may declare limits through an ``unsupported_reason(**query)`` attribute
    (e.g. a compiled fused kernel covering only some nonlinearities); the XLA reference has none.
    """
    check = getattr(_registry[op][backend], "unsupported_reason", None)
    if query is None or check is None:
        return None
    return check(**query)


def resolve(op: str, backend: str | None = None, query: dict | None = None) -> str:
    """The concrete backend that will run ``op`` for the request ``backend`` (None: current flag).

    ``query``: the call's static arguments, for implementations that cover only some of them
    (``"auto"`` skips those; an explicit backend that cannot serve them raises BackendError).
    """
    name = get_backend() if backend is None else _check_name(backend)
    if _registry.get(op) is None or "xla" not in _registry[op]:
        raise KeyError(f"op {op!r} has no registered XLA reference.")
    if name == "auto":
        for cand in AUTO_ORDER:
            eligible = _auto_eligible.get(cand)
            if cand == "xla" or (eligible is not None and not eligible()):
                continue
            if (
                unavailable_reason(cand) is None
                and cand in _registry[op]
                and _unsupported(op, cand, query) is None
            ):
                return cand
        return "xla"
    reason = unavailable_reason(name)  # imports an optional backend's package first
    if reason is not None:
        raise BackendError(f"backend {name!r} requested for op {op!r} is unavailable: {reason}.")
    impls = _registry[op]
    if name not in impls and name in XLA_FILLED:
        return "xla"
    if name not in impls:
        raise BackendError(
            f"backend {name!r} does not implement op {op!r} (implemented by: {sorted(impls)})."
        )
    reason = _unsupported(op, name, query)
    if reason is not None:
        raise BackendError(f"backend {name!r} cannot run this {op!r} request: {reason}.")
    return name


def dispatch(op: str, backend: str | None = None, query: dict | None = None) -> Callable:
    """The implementation of ``op`` for the request ``backend`` (see :func:`resolve`)."""
    return _registry[op][resolve(op, backend, query)]


def registered_ops() -> dict[str, tuple[str, ...]]:
    """Op name -> backends that registered an implementation of it."""
    return {op: tuple(sorted(impls)) for op, impls in _registry.items()}
