"""Types of the functions and trees ntfast passes around; NT 0.6.5's ``_src/utils/typing.py`` names.

A *layer* is a triple ``(init_fn, apply_fn, kernel_fn)`` (plus ``mask_fn`` internally):

- ``init_fn(rng, input_shape) -> (output_shape, params)`` builds finite-width parameters;
- ``apply_fn(params, inputs) -> outputs`` runs the finite network;
- ``kernel_fn(x1_or_kernel, x2=None, get=None) -> Kernel | arrays`` gives the infinite-width
  NNGP/NTK analytically (:class:`AnalyticKernelFn`), from one draw of parameters
  (:class:`EmpiricalKernelFn`) or by sampling (:class:`MonteCarloKernelFn`).

The protocols are ``runtime_checkable``: ``isinstance(f, InitFn)`` only checks that ``f`` is
callable (Python cannot check a call signature at run time); they serve documentation and static
type checkers.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, Union, runtime_checkable

import jax

from .kernel import Kernel

__all__ = [
    "AnalyticKernelFn",
    "ApplyFn",
    "Axes",
    "EmpiricalGetKernelFn",
    "EmpiricalKernelFn",
    "Get",
    "InitFn",
    "InternalLayer",
    "InternalLayerMasked",
    "KernelFn",
    "KernelOrInput",
    "Kernels",
    "Layer",
    "LayerKernelFn",
    "MaskFn",
    "MonteCarloKernelFn",
    "NTTree",
    "NTTrees",
    "PyTree",
    "Shapes",
    "VMapAxes",
    "VMapAxisTriple",
]

PyTree = Any
"""A JAX pytree (nested tuples/lists/dicts/dataclasses with array leaves)."""

Axes = int | Sequence[int]
"""One axis (``axis=-1``) or several (``axis=(1, 3)``)."""

T = TypeVar("T")

if TYPE_CHECKING:
    NTTree = Union[T, list["NTTree[T]"], tuple["NTTree[T]", ...]]  # noqa: UP007 - forward refs
    NTTrees = Union[list["NTTree[T]"], tuple["NTTree[T]", ...]]  # noqa: UP007 - forward refs
else:
    # Sphinx and `typing.get_type_hints` cannot resolve the recursive form.
    NTTree = list[T] | tuple[T, ...] | T
    """A leaf ``T`` or nested lists/tuples of them: NT's light-weight tree.

    Arises in networks with parallel branches (``stax.parallel``, ``FanOut``); exactly ``list`` and
    ``tuple`` nodes count (a namedtuple is a leaf).
    """
    NTTrees = list[T] | tuple[T, ...]
    """A list or tuple of ``NTTree`` s."""

Shapes = NTTree[tuple[int, ...]]
"""A shape (tuple of ints) or an ``NTTree`` of shapes."""

Get = None | str | tuple[str, ...]
"""Which kernels to return: ``None`` (the whole :class:`Kernel`), ``"nngp"``, ``("nngp", "ntk")``..."""

KernelOrInput = NTTree[Kernel] | NTTree[jax.Array]
"""What a layer ``kernel_fn`` takes first: input arrays ``x1`` or kernels of a previous layer."""

Kernels = list[Kernel] | tuple[Kernel, ...]
"""Kernels flowing into/out of branching layers (``FanOut``, ``FanInSum``, ...)."""


@runtime_checkable
class InitFn(Protocol):
    """``init_fn(rng, input_shape, **kwargs) -> (output_shape, params)``.

    Draws the parameters of a finite-width network for inputs of ``input_shape`` (an NT tree of
    shapes) and returns the output shape(s) together with the parameter pytree.
    """

    def __call__(self, rng: jax.Array, input_shape: Shapes, **kwargs) -> tuple[Shapes, PyTree]: ...


@runtime_checkable
class ApplyFn(Protocol):
    """``apply_fn(params, inputs, *args, **kwargs) -> outputs``: the finite-width forward pass."""

    def __call__(
        self, params: PyTree, inputs: NTTree[jax.Array], *args, **kwargs
    ) -> NTTree[jax.Array]: ...


@runtime_checkable
class MaskFn(Protocol):
    """``mask_fn(mask, input_shape) -> mask``: forward-propagates an input mask through a layer.

    ``True`` entries mark masked (absent) positions; shapes follow the activations.
    """

    def __call__(
        self, mask: jax.Array | Sequence[jax.Array], input_shape: Shapes
    ) -> jax.Array | Sequence[jax.Array]: ...


@runtime_checkable
class LayerKernelFn(Protocol):
    """``kernel_fn(k) -> k'``: a layer's map of :class:`Kernel` (trees) to :class:`Kernel` (trees).

    The internal, un-decorated form; ``@layer`` turns it into an :class:`AnalyticKernelFn`.
    """

    def __call__(self, k: NTTree[Kernel]) -> NTTree[Kernel]: ...


@runtime_checkable
class AnalyticKernelFn(Protocol):
    """``kernel_fn(x1, x2=None, get=None, **kwargs)``: the closed-form infinite-width kernel.

    ``x1`` is inputs (arrays, ``x2`` then the second batch or None for ``x2 = x1``) or kernels of
    a previous layer. Returns the :class:`Kernel` (``get=None``), one array (``get="ntk"``) or a
    namedtuple of arrays (``get=("nngp", "ntk")``), per leaf of the input tree.
    """

    def __call__(
        self,
        x1: KernelOrInput,
        x2: NTTree[jax.Array] | None = None,
        get: Get = None,
        **kwargs,
    ) -> NTTree[Kernel] | NTTree[jax.Array]: ...


@runtime_checkable
class EmpiricalGetKernelFn(Protocol):
    """``kernel_fn(x1, x2, get, params, **kwargs)``: finite-width kernels of one network draw.

    Like :class:`EmpiricalKernelFn` but chooses the kernels with ``get`` (e.g.
    ``("nngp", "ntk")`` computes both together).
    """

    def __call__(
        self,
        x1: NTTree[jax.Array],
        x2: NTTree[jax.Array] | None,
        get: Get,
        params: PyTree,
        **kwargs,
    ) -> NTTree[jax.Array]: ...


@runtime_checkable
class EmpiricalKernelFn(Protocol):
    """``kernel_fn(x1, x2, params, **kwargs)``: the empirical NTK or NNGP of one network draw.

    :class:`EmpiricalGetKernelFn` with ``get`` fixed to ``"nngp"`` or ``"ntk"``.
    """

    def __call__(
        self,
        x1: NTTree[jax.Array],
        x2: NTTree[jax.Array] | None,
        params: PyTree,
        **kwargs,
    ) -> NTTree[jax.Array]: ...


@runtime_checkable
class MonteCarloKernelFn(Protocol):
    """``kernel_fn(x1, x2, get=None, **kwargs)``: Monte Carlo estimate of the analytic kernel.

    Averages empirical kernels over random network draws; with several sample counts it returns a
    generator of successive estimates.
    """

    def __call__(
        self,
        x1: NTTree[jax.Array],
        x2: NTTree[jax.Array] | None,
        get: Get = None,
        **kwargs,
    ) -> NTTree[jax.Array] | Generator[NTTree[jax.Array], None, None]: ...


KernelFn = AnalyticKernelFn | EmpiricalKernelFn | EmpiricalGetKernelFn | MonteCarloKernelFn
"""Any of the kernel function kinds."""

InternalLayer = tuple[InitFn, ApplyFn, LayerKernelFn]
"""What a layer constructor returns before ``@layer``: ``(init_fn, apply_fn, kernel_fn)``."""

InternalLayerMasked = tuple[InitFn, ApplyFn, LayerKernelFn, MaskFn]
"""``InternalLayer`` with a ``mask_fn``."""

Layer = tuple[InitFn, ApplyFn, AnalyticKernelFn]
"""A public layer: ``(init_fn, apply_fn, kernel_fn)``."""

_VMapAxis = PyTree | None
"""A pytree of integers (or None) naming batch axes for ``vmap``."""

VMapAxisTriple = tuple[_VMapAxis, _VMapAxis, dict[str, _VMapAxis]]
"""``(input axes, output axes, {kwarg name: axes})`` for ``vmap`` in the empirical NTK."""

VMapAxes = _VMapAxis | VMapAxisTriple
"""``vmap`` axes: a single pytree of axes or a :data:`VMapAxisTriple`."""
