"""Combinators: ``serial``, ``parallel``, ``repeat`` (NT 0.6.5 semantics).

``serial`` composes layer requirements with ``Diagonal.__rshift__`` and ``parallel`` with
``Diagonal.__and__``, so the whole network decides once which covariance entries it must track.
Parameter initialization consumes PRNG keys exactly like ``jax.example_libraries.stax`` (which NT
builds on), so the same key gives the same parameters as an NT network.
"""

from __future__ import annotations

import functools
import operator as op
import warnings
from collections.abc import Callable

from jax import lax, random

from . import fused
from .elementwise import fused_with_dense
from .requirements import Diagonal, get_req, layer, requires


def _serial_init_apply(init_fns, apply_fns):
    n = len(init_fns)

    def init_fn(rng, input_shape):
        params = []
        for f in init_fns:
            rng, layer_rng = random.split(rng)
            input_shape, p = f(layer_rng, input_shape)
            params.append(p)
        return input_shape, params

    def apply_fn(params, inputs, **kwargs):
        rng = kwargs.pop("rng", None)
        rngs = random.split(rng, n) if rng is not None else (None,) * n
        for f, p, r in zip(apply_fns, params, rngs):
            inputs = f(p, inputs, rng=r, **kwargs)
        return inputs

    return init_fn, apply_fn


@layer
def serial(*layers):
    """Serial composition of layers: ``serial(Dense(512), Relu(), Dense(1))``.

    Args:
      *layers: ``(init_fn, apply_fn, kernel_fn)`` triples.

    Returns:
      ``(init_fn, apply_fn, kernel_fn)`` of the composition.
    """
    if not layers:
        raise ValueError("`serial` needs at least one layer.")
    _check_layers(layers, "serial")
    init_fns, apply_fns, kernel_fns = zip(*layers)
    init_fn, apply_fn = _serial_init_apply(init_fns, apply_fns)

    @requires(**_get_input_req_attr(kernel_fns, fold=op.rshift))
    def kernel_fn(k, **kwargs):
        i = 0
        while i < len(kernel_fns):
            f = kernel_fns[i]
            # A nonlinearity then a Dense layer: one fused op where the backend has one.
            pair = None
            if i + 1 < len(kernel_fns):
                pair = fused_with_dense(f, kernel_fns[i + 1], k, kwargs)
            if pair is not None:
                k, i = pair, i + 2
            else:
                k, i = f(k, **kwargs), i + 1
        return k

    # Conv networks with a spatial readout run fused per offset tile (ntfast.stax.fused).
    pairs = tuple(zip(init_fns, kernel_fns))
    kernel_fn.fused_step = fused.serial_step(pairs)
    kernel_fn.fused_from_inputs = functools.partial(fused.fused_kernel, pairs, kernel_fns)
    return init_fn, apply_fn, kernel_fn


@layer
def repeat(layer, n: int):
    """``serial(*[layer] * n)`` compiled as a ``lax.scan`` (faster compilation for large ``n``).

    The layer must keep the activation shape and the ``Kernel`` metadata unchanged (so e.g. a
    single ``Conv``, which flips ``is_reversed``, must be repeated in pairs).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"`n` must be a non-negative int, got {n!r}.")
    _check_layers((layer,), "repeat")
    init_fn, apply_fn, kernel_fn = layer

    def init_fn_repeat(rng, input_shape):
        out_shape, _ = init_fn(rng, input_shape)
        if out_shape != input_shape:
            raise ValueError(
                f"`init_fn` produces a different output shape {out_shape} than the input shape "
                f"{input_shape}. Please use the `serial(*([layer] * n))` construction instead."
            )

        def step(rng, _):
            rng, layer_rng = random.split(rng)
            return rng, init_fn(layer_rng, input_shape)[1]

        _, params = lax.scan(step, rng, None, n)
        return out_shape, params

    def apply_fn_repeat(params, inputs, **kwargs):
        def step(x, p):
            return apply_fn(p, x, **kwargs), None

        return lax.scan(step, inputs, params, n)[0]

    @requires(**get_req(kernel_fn, {}))
    def kernel_fn_repeat(k, **kwargs):
        if n > 0:
            k = kernel_fn(k, **kwargs)
            k = lax.scan(lambda kk, _: (kernel_fn(kk, **kwargs), None), k, None, n - 1)[0]
        return k

    return init_fn_repeat, apply_fn_repeat, kernel_fn_repeat


@layer
def parallel(*layers):
    """Parallel composition: applies ``layers[i]`` to the ``i``-th input of a sequence.

    Typically used between ``FanOut`` and ``FanInSum`` / ``FanInConcat`` / ``FanInProd``.
    """
    _check_layers(layers, "parallel")
    init_fns, apply_fns, kernel_fns = zip(*layers) if layers else ((), (), ())
    n = len(layers)

    def init_fn(rng, input_shape):
        rngs = random.split(rng, n)
        results = [f(r, s) for f, r, s in zip(init_fns, rngs, input_shape)]
        shapes = tuple(r[0] for r in results)
        params = tuple(r[1] for r in results)
        return type(input_shape)((shapes, params))

    def apply_fn(params, inputs, **kwargs):
        rng = kwargs.pop("rng", None)
        rngs = random.split(rng, n) if rng is not None else (None,) * n
        return type(inputs)(
            f(p, x, rng=r, **kwargs) for f, p, x, r in zip(apply_fns, params, inputs, rngs)
        )

    @requires(**_get_input_req_attr(kernel_fns, fold=op.and_))
    def kernel_fn(ks, **kwargs):
        return type(ks)(f(k, **kwargs) for k, f in zip(ks, kernel_fns))

    return init_fn, apply_fn, kernel_fn


def _check_layers(layers, name: str) -> None:
    for i, lyr in enumerate(layers):
        if not (isinstance(lyr, (tuple, list)) and len(lyr) == 3 and all(map(callable, lyr))):
            raise TypeError(
                f"`{name}` expects layers as (init_fn, apply_fn, kernel_fn) triples; argument {i} "
                f"is {type(lyr).__name__}{'' if not isinstance(lyr, (tuple, list)) else f' of length {len(lyr)}'}. "
                f"Did you forget to call a layer constructor, e.g. `Relu()` instead of `Relu`?"
            )


def _get_input_req_attr(kernel_fns, fold: Callable[[Diagonal, Diagonal], Diagonal]) -> dict:
    """Combined input requirements of layers in ``serial`` (``fold=>>``) / ``parallel`` (``&``)."""
    req: dict = {}
    for f in kernel_fns:
        for key, v in dict(get_req(f, {})).items():
            if key == "use_dropout":
                if key in req and req[key] != v:
                    raise ValueError(
                        "`use_dropout` is a single whole-network attribute and cannot be set to "
                        "different values."
                    )
                req[key] = v
            elif key in ("batch_axis", "channel_axis"):
                if key not in req:
                    req[key] = v
                elif fold is op.and_ and req[key] != v:
                    if (req[key] >= 0) == (v >= 0):
                        warnings.warn(
                            f"For `kernel_fn`, `{key}` parameters must match in all parallel "
                            f"branches, got {req[key]} and {v}. This WILL lead to [silent] errors "
                            f"if `kernel_fn` is called."
                        )
                    else:
                        warnings.warn(
                            f"Got potentially mismatching `{key}` values in parallel branches: "
                            f"{req[key]} and {v}."
                        )
                elif fold not in (op.and_, op.rshift):
                    raise ValueError(fold)
            elif key in ("diagonal_batch", "diagonal_spatial"):
                req[key] = fold(req[key], v) if key in req else v
            else:
                raise NotImplementedError(f"Unknown layer requirement {key!r}.")
    return req


__all__ = ["parallel", "repeat", "serial"]
