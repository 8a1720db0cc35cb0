"""The benchmarked networks, written once as plain data and built from any stax-like module.

A network is a list of ``(layer_name, kwargs)`` (the layers of one ``serial``), so the same list
builds Neural Tangents 0.6.5's network (``neural_tangents.stax``) and ntfast's (``ntfast.stax``).
Definitions follow Neural Tangents' examples:

* ``FC-3``: ``Flatten → [Dense(512, W_std=√2, b_std=0.05) → Relu] ×3 → Dense(10)``; the image is
  flattened first so that the three hidden layers are a plain MLP on 32·32·3 inputs.
* ``CNN-GAP-4``: ``[Conv(C, 3×3, SAME, W_std=√2, b_std=0.05) → Relu] ×4 → GlobalAvgPool →
  Dense(10)``, every layer at full resolution (32×32): the full ``(HW)²`` covariance per pair.
* ``Myrtle-5``: ``[Conv 3×3 SAME → Relu] ×2 → AvgPool 2×2 → [Conv → Relu] → AvgPool 2×2 →
  [Conv → Relu] → AvgPool 2×2 ×3 → Flatten → Dense(10)``, ``W_std=√2, b_std=0`` (Shankar et al.
  2020; Neural Tangents' README).

:func:`cost` estimates per kernel entry (one NNGP + one NTK value) the covariance entries each
layer writes and the arithmetic of a direct evaluation; the numbers go to ``extra_info``.
"""

from __future__ import annotations

import math

SQRT2 = math.sqrt(2.0)
WIDTH = 512  # finite-network width; the infinite-width kernels do not depend on it

_dense = ("Dense", {"out_dim": WIDTH, "W_std": SQRT2, "b_std": 0.05})
_conv = ("Conv", {"out_chan": WIDTH, "filter_shape": (3, 3), "padding": "SAME", "W_std": SQRT2})
_relu = ("Relu", {})
_pool = ("AvgPool", {"window_shape": (2, 2), "strides": (2, 2)})


def _myrtle(stages: tuple[int, int, int]) -> list:
    conv = (_conv[0], {**_conv[1], "b_std": 0.0})
    layers = [conv, _relu] * stages[0] + [_pool]
    layers += [conv, _relu] * stages[1] + [_pool]
    layers += [conv, _relu] * stages[2] + [_pool] * 3
    return [*layers, ("Flatten", {}), ("Dense", {"out_dim": 10, "W_std": SQRT2, "b_std": 0.0})]


NETWORKS = {
    "FC-3": [("Flatten", {}), *[_dense, _relu] * 3, ("Dense", {**_dense[1], "out_dim": 10})],
    "CNN-GAP-4": [
        *[(_conv[0], {**_conv[1], "b_std": 0.05}), _relu] * 4,
        ("GlobalAvgPool", {}),
        ("Dense", {"out_dim": 10, "W_std": SQRT2, "b_std": 0.05}),
    ],
    "Myrtle-5": _myrtle((2, 1, 1)),
    # The large-image issue's targets (DESIGN.md §2 cost anchors).
    "CNN-GAP-8": [
        *[(_conv[0], {**_conv[1], "b_std": 0.05}), _relu] * 8,
        ("GlobalAvgPool", {}),
        ("Dense", {"out_dim": 10, "W_std": SQRT2, "b_std": 0.05}),
    ],
    "Myrtle-10": _myrtle((3, 3, 3)),
}


def build(name: str, stax):
    """``(init_fn, apply_fn, kernel_fn)`` of network ``name`` from the module ``stax``."""
    if name not in NETWORKS:
        raise ValueError(f"`name` must be one of {sorted(NETWORKS)}, got {name!r}.")
    return stax.serial(*(getattr(stax, layer)(**kwargs) for layer, kwargs in NETWORKS[name]))


def describe(name: str) -> str:
    return " → ".join(layer for layer, _ in NETWORKS[name])


# Arithmetic per output covariance value of a direct evaluation (estimates, for roofline context):
# a 3×3 conv reads 9 values (multiply-add), the ReLU arc-cosine step ~20 flops (sqrt, atan2, ...),
# a 2×2 average pool of a 4-D covariance reads 2⁴ values.
_FLOPS_PER_VALUE = {"Conv": 2 * 9, "Relu": 20, "AvgPool": 2 * 16, "Dense": 2}


def cost(name: str, height: int, width: int, channels: int, bytes_per_value: int = 4) -> dict:
    """Per kernel entry: covariance values written (``cov_values``: the input covariance, then
    NNGP and NTK of every layer), ``bytes`` for writing each once, and ``flops`` of a direct
    evaluation. A full-spatial layer holds ``(HW)²`` values per array; after Flatten / GAP, one.
    """
    layers = NETWORKS[name]
    spatial = height * width
    if layers[0][0] == "Flatten":
        # A flattened image's covariance is one dot product over its H·W·C values.
        values, flops, layers = 1, 2 * channels * spatial, layers[1:]
    else:
        values = spatial**2
        flops = 2 * channels * values
    written = values
    for layer, kwargs in layers:
        if layer in ("Flatten", "GlobalAvgPool"):
            # Flatten averages the spatial diagonal (HW reads), GAP every (HW)² value.
            flops += 2 * 2 * (spatial if layer == "Flatten" else spatial**2)
            values = 1
        elif layer == "AvgPool":
            spatial //= math.prod(kwargs["strides"])
            values = spatial**2
        flops += 2 * _FLOPS_PER_VALUE.get(layer, 0) * values
        written += 2 * values
    return {"cov_values": written, "bytes": written * bytes_per_value, "flops": flops}
