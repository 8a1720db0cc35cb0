"""The ``"native"`` backend: C++ (CPU) and CUDA kernels registered as XLA FFI targets.

Extension modules (built by the top-level ``CMakeLists.txt``, installed in this folder):

- ``ntfast._native._cpu``: the C++ CPU handlers (``kernels/cpu``);
- ``ntfast._native._cuda``: the CUDA handlers (``kernels/cuda``; only where nvcc built it).

Each exposes ``handlers() -> {target name: PyCapsule}`` and ``build_info() -> dict``. One target
name, one handler per platform: ``ntfast_fused_cnn`` (op ``fused_cnn``, :mod:`.fused_cnn`).

Where the modules are looked for, first hit wins:

1. this package (an installed wheel);
2. the folder named by ``NTFAST_NATIVE_DIR`` (a developer build of a source checkout, e.g.
   ``cmake -S . -B build/native && cmake --build build/native -j2`` then
   ``NTFAST_NATIVE_DIR=build/native/native``);
3. the ``ntfast/_native`` folder of an installed ``ntfast`` distribution, when this package is a
   source checkout that shadows it (CI runs the tests from the source tree after
   ``pip install .``).

Importing this package never fails for want of a module: :func:`unavailable_reason` says what is
missing, and the backend flag reports it (``ntfast.backend.available_backends()``).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

from ntfast import backend as _backend

TARGETS = ("ntfast_fused_cnn",)
_PLATFORMS = {"_cpu": "cpu", "_cuda": "CUDA"}
_modules: dict[str, object | None] = {}
_errors: dict[str, str] = {}
_registered: set[str] = set()


def _candidate_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    dirs = []
    env = os.environ.get("NTFAST_NATIVE_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    from importlib import metadata

    try:
        installed = Path(metadata.distribution("ntfast").locate_file("ntfast/_native")).resolve()
    except metadata.PackageNotFoundError:
        return dirs  # no installed distribution: nothing more to search
    if installed != here:
        dirs.append(installed)
    return dirs


def _load_from(directory: Path, name: str):
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = directory / f"{name}{suffix}"
        if path.is_file():
            full = f"{__name__}.{name}"
            spec = importlib.util.spec_from_file_location(full, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(full, None)
                raise
            return module
    return None


def _import_packaged(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def load_module(name: str):
    """The extension module ``name`` (``"_cpu"`` or ``"_cuda"``), or None (reason in
    :func:`module_error`). Loaded once; its handlers are registered with XLA on load."""
    if name in _modules:
        return _modules[name]
    module, errors = None, []
    try:
        module = _import_packaged(name)
    except ImportError as e:
        errors.append(f"{__name__}.{name}: {e}")
    if module is None:
        for directory in _candidate_dirs():
            try:
                module = _load_from(directory, name)
            except Exception as e:  # noqa: BLE001 - a broken build must not break ntfast
                errors.append(f"{directory}: {e!r}")
                continue
            if module is not None:
                break
            errors.append(f"{directory}: no {name} module")
    if module is not None:
        try:
            _register(name, module)
        except Exception as e:  # noqa: BLE001
            errors.append(f"registering {name}'s FFI targets failed: {e!r}")
            module = None
    _modules[name] = module
    if module is None:
        _errors[name] = "; ".join(errors) or "not found"
    return module


def module_error(name: str) -> str | None:
    """Why ``load_module(name)`` returned None (None if it loaded)."""
    load_module(name)
    return _errors.get(name)


def _register(name: str, module) -> None:
    import jax

    platform = _PLATFORMS[name]
    for target, capsule in module.handlers().items():
        if (target, platform) in _registered:
            continue
        jax.ffi.register_ffi_target(target, capsule, platform=platform)
        _registered.add((target, platform))


def build_info() -> dict:
    """``build_info()`` of each loaded module (``{"_cpu": {...}, "_cuda": {...}}``)."""
    return {n: m.build_info() for n in _PLATFORMS if (m := load_module(n)) is not None}


def _default_platform() -> str:
    import jax

    if _backend.default_device_is_cuda():
        return "cuda"
    try:
        return jax.devices()[0].platform
    except RuntimeError:
        return "cpu"


def _module_for(platform: str) -> str | None:
    return {"cpu": "_cpu", "cuda": "_cuda"}.get(platform)


def unavailable_reason() -> str | None:
    """None if the native kernels can run on the default device, else why not."""
    platform = _default_platform()
    name = _module_for(platform)
    if name is None:
        return f"no native kernels for the {platform!r} platform (only cpu and cuda)"
    if load_module(name) is None:
        return (
            f"the extension module ntfast._native.{name} is not available ({_errors[name]}); "
            "build it with `pip install .` (a C++ compiler, nanobind and jaxlib are needed"
            + (", and nvcc" if name == "_cuda" else "")
            + ") or point NTFAST_NATIVE_DIR at a CMake build's native/ folder"
        )
    return None


def auto_eligible() -> bool:
    """Whether ``"auto"`` may pick native: on CPU when ``_cpu`` loaded, on a CUDA GPU when
    ``_cuda`` loaded (whether native or triton is preferred on GPUs is the flag's AUTO_ORDER)."""
    name = _module_for(_default_platform())
    return name is not None and load_module(name) is not None


from ntfast._native import fused_cnn  # noqa: F401  (registers the op implementation)
