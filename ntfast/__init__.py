"""ntfast: fast infinite-width neural-network kernels (NNGP and NTK) in JAX, NT-compatible.

``import ntfast as nt`` then use ``nt.stax``, ``nt.Kernel``, ``nt.empirical_kernel_fn``,
``nt.monte_carlo_kernel_fn`` as in Neural Tangents. The hot covariance ops dispatch through the
backend flag (:mod:`ntfast.backend`): ``nt.set_backend``, ``nt.use_backend``, ``NTFAST_BACKEND``,
or ``kernel_fn(..., backend=...)``.
"""

from . import typing
from .backend import (
    BackendError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from .kernel import Kernel

__version__ = "0.1.0"


def __getattr__(name):
    # Heavy submodules load on first use so that `import ntfast` stays cheap.
    import importlib

    lazy = {
        "stax": ("ntfast.stax", None),
        "ops": ("ntfast.ops", None),
        "empirical_kernel_fn": ("ntfast.empirical", "empirical_kernel_fn"),
        "empirical_ntk_fn": ("ntfast.empirical", "empirical_ntk_fn"),
        "empirical_nngp_fn": ("ntfast.empirical", "empirical_nngp_fn"),
        "empirical_ntk_vp_fn": ("ntfast.empirical", "empirical_ntk_vp_fn"),
        "linearize": ("ntfast.empirical", "linearize"),
        "taylor_expand": ("ntfast.empirical", "taylor_expand"),
        "NtkImplementation": ("ntfast.empirical", "NtkImplementation"),
        "monte_carlo_kernel_fn": ("ntfast.monte_carlo", "monte_carlo_kernel_fn"),
    }
    if name in lazy:
        mod_name, attr = lazy[name]
        mod = importlib.import_module(mod_name)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ntfast' has no attribute {name!r}")


__all__ = [
    "BackendError",
    "Kernel",
    "NtkImplementation",
    "available_backends",
    "empirical_kernel_fn",
    "empirical_nngp_fn",
    "empirical_ntk_fn",
    "empirical_ntk_vp_fn",
    "get_backend",
    "linearize",
    "monte_carlo_kernel_fn",
    "set_backend",
    "stax",
    "taylor_expand",
    "typing",
    "use_backend",
]
