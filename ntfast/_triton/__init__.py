"""The Triton backend: importing this package registers every Triton launcher with the dispatcher.

``ntfast.backend`` imports it lazily, the first time the ``"triton"`` backend is considered, so
``import ntfast`` works without Triton. Launchers: ``ntfast/_triton/<op>.py`` (kernels in
``kernels/triton/<op>.py``); the launch machinery: :mod:`ntfast._triton.runtime`.
"""

import importlib
import importlib.util

from . import runtime

# Op launchers, each registering itself with `@ntfast.backend.register(<op>, "triton")`.
LAUNCHERS = ("conv", "nonlin", "dot_general", "fused_cnn")

for _name in LAUNCHERS:
    # Launchers land one by one; a missing module is not an error, a broken one is.
    if importlib.util.find_spec(f"{__name__}.{_name}") is not None:
        importlib.import_module(f"{__name__}.{_name}")

__all__ = ["LAUNCHERS", "runtime"]
