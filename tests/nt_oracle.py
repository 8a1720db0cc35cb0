"""Neural Tangents 0.6.5 as an in-process oracle on the same JAX (DESIGN.md §3).

NT's package ``__init__`` imports TensorFlow-bound modules and fails on jax >= 0.6, but its ``stax``
runs: we register a bare ``neural_tangents`` module whose ``__path__`` is the installed package
folder, so that ``import neural_tangents.stax`` skips the top-level ``__init__``.
"""

import importlib.util
import sys
import types


def load_nt_stax():
    """Returns ``neural_tangents.stax`` (0.6.5), or raises ImportError with the install hint."""
    mod = sys.modules.get("neural_tangents.stax")
    if mod is not None:
        return mod
    spec = importlib.util.find_spec("neural_tangents")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "neural-tangents is not installed: pip install neural-tangents==0.6.5 --no-deps "
            "frozendict scipy"
        )
    if "neural_tangents" not in sys.modules:
        bare = types.ModuleType("neural_tangents")
        bare.__path__ = list(spec.submodule_search_locations)
        sys.modules["neural_tangents"] = bare
    from neural_tangents import stax

    return stax
