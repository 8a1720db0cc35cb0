"""Empirical (finite-width) NNGP and NTK of any JAX function; Taylor expansions.

Same public names, signatures and output conventions as Neural Tangents 0.6.5
``neural_tangents._src.empirical``; the code is ours.

For a function ``f(params, x, **kwargs)`` with outputs ``f(x)`` of shape ``(d_0, ..., d_{D-1})``:

- NNGP sample: ``K[a, b] = f(x1)[a] · f(x2)[b]``;
- NTK sample:  ``Θ[a, b] = Σ_p ∂f(x1)[a]/∂p · ∂f(x2)[b]/∂p`` (sum over every parameter entry).

Output layout (NT's): the kernel has the axes of ``f(x1)`` and ``f(x2)`` *zipped*
``(d_0, d_0', d_1, d_1', ...)``, except that an axis in ``trace_axes`` is summed over both copies
(and the result divided by the product of the traced sizes, i.e. averaged), and an axis in
``diagonal_axes`` keeps only ``a_i == b_i`` and appears once, at its own position. With the
defaults (``trace_axes=(-1,)``) and outputs ``(N, k)`` the kernel is ``(N1, N2)``;
``trace_axes=()`` gives ``(N1, N2, k, k)``; ``diagonal_axes=(0,)`` gives ``(N, )`` variances.

PyTree outputs: each output leaf gets its own kernel (cross-covariances between leaves are not
computed, as in NT), in a tree of the same structure.

Only the Jacobian-contraction method is implemented: every :class:`NtkImplementation` value is
accepted (for code written against NT) and computes the same kernel, up to rounding, by
instantiating both Jacobians with reverse-mode autodiff and contracting them.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import tree_map, tree_reduce

from . import _utils as utils
from .typing import (
    ApplyFn,
    Axes,
    EmpiricalGetKernelFn,
    EmpiricalKernelFn,
    PyTree,
    VMapAxes,
)

__all__ = [
    "DEFAULT_NTK_IMPLEMENTATION",
    "NtkImplementation",
    "empirical_kernel_fn",
    "empirical_nngp_fn",
    "empirical_ntk_fn",
    "empirical_ntk_vp_fn",
    "linearize",
    "taylor_expand",
]


# ------------------------------------------------------------------------------------------------
# Taylor expansions.


def linearize(f: ApplyFn, params: PyTree) -> ApplyFn:
    """First-order Taylor expansion of ``f`` in its parameters around ``params``.

    ``f_lin(p, *args, **kw) = f(params, *args, **kw) + J(params) · (p − params)``, with the
    Jacobian-vector product computed by ``jax.jvp`` (no Jacobian is stored). Same signature as
    ``f``; ``f`` may take and return any PyTrees.
    """

    def f_lin(p, *args, **kwargs):
        dparams = tree_map(operator.sub, p, params)
        f0, df = jax.jvp(lambda q: f(q, *args, **kwargs), (params,), (dparams,))
        return tree_map(operator.add, f0, df)

    return f_lin


def taylor_expand(f: ApplyFn, params: PyTree, degree: int) -> ApplyFn:
    """Taylor expansion of ``f`` of order ``degree`` in its parameters around ``params``.

    ``f_tayl(p) = Σ_{n=0..degree} (1/n!) · Dⁿf(params)[δ, ..., δ]`` with ``δ = p − params``; the
    n-th directional derivative is a nest of ``n`` ``jax.jvp`` calls along ``δ``.
    ``degree=0`` returns ``f(params, ...)``; ``degree=1`` equals :func:`linearize`.
    """
    if not isinstance(degree, int) or degree < 0:
        raise ValueError(f"`degree` must be a non-negative integer, got {degree!r}.")

    def expand(g: Callable, delta: PyTree, order: int):
        # g(params) + (1/1)·D[g(params) + (1/2)·D[g + (1/3)·D[...]]] — Horner's scheme on the
        # directional derivative D = (jvp along delta), which gives the 1/n! factors.
        if order == degree:
            return g(params)

        def directional(q):
            return jax.jvp(g, (q,), (delta,))[1]

        rest = expand(directional, delta, order + 1)
        return tree_map(lambda a, b: a + b / (order + 1), g(params), rest)

    def f_tayl(p, *args, **kwargs):
        delta = tree_map(operator.sub, p, params)
        return expand(lambda q: f(q, *args, **kwargs), delta, 0)

    return f_tayl


# ------------------------------------------------------------------------------------------------
# Contractions.


def _trace_and_diagonal(trace_axes: Axes, diagonal_axes: Axes, ndim: int):
    """Both axis sets as sorted non-negative lists for outputs of ``ndim`` dimensions."""
    out = []
    for axes, name in ((trace_axes, "trace_axes"), (diagonal_axes, "diagonal_axes")):
        try:
            out.append(utils.canonicalize_axis(axes, ndim))
        except (IndexError, ValueError, TypeError) as e:
            raise ValueError(
                f"`{name}` must be integer axes of the outputs (ndim {ndim}), got {axes!r}."
            ) from e
    trace, diagonal = out
    both = set(trace) & set(diagonal)
    if both:
        raise ValueError(
            f"Output axes {sorted(both)} are in both `trace_axes` {trace_axes!r} and "
            f"`diagonal_axes` {diagonal_axes!r}; an axis is either traced or diagonal."
        )
    return trace, diagonal


def _contract(
    a: jax.Array, b: jax.Array, n_out: int, trace: list[int], diagonal: list[int]
) -> jax.Array:
    """Outer product of ``a`` and ``b`` over their first ``n_out`` (output) axes, NT layout.

    ``a``: ``(d_0, ..., d_{n_out-1}) + P``, ``b``: ``(d_0', ..., d_{n_out-1}') + P`` (``P`` the
    same trailing parameter shape, contracted; empty for the NNGP). Output axes in ``trace`` are
    contracted too (not averaged here), those in ``diagonal`` shared; the result has, for each
    remaining output axis ``i`` in order, ``(d_i, d_i')`` or ``(d_i,)`` if diagonal.
    """
    if a.ndim != b.ndim:
        raise ValueError(
            f"Outputs for `x1` and `x2` must have the same number of dimensions, got shapes "
            f"{a.shape[:n_out]} and {b.shape[:n_out]}."
        )
    for i in (*trace, *diagonal):
        if a.shape[i] != b.shape[i]:
            kind = "trace_axes" if i in trace else "diagonal_axes"
            raise ValueError(
                f"Output axis {i} is in `{kind}` but has sizes {a.shape[i]} and {b.shape[i]} "
                f"for `x1` and `x2` (shapes {a.shape[:n_out]} and {b.shape[:n_out]})."
            )
    # einsum in sublist form: index i < a.ndim labels axis i of `a`; axis i of `b` shares the
    # label when contracted or diagonal, else gets a fresh label a.ndim + i.
    a_idx = list(range(a.ndim))
    b_idx = [i if (i in trace or i in diagonal or i >= n_out) else a.ndim + i for i in a_idx]
    out_idx = []
    for i in range(n_out):
        if i in trace:
            continue
        out_idx += [i] if i in diagonal else [i, a.ndim + i]
    return jnp.einsum(a, a_idx, b, b_idx, out_idx)


def _check_implementation(implementation: Any) -> NtkImplementation:
    try:
        return NtkImplementation(implementation)
    except ValueError as e:
        raise ValueError(
            "`implementation` must be an NtkImplementation or one of the ints 0, 1, 2, 3, got "
            f"{implementation!r}."
        ) from e


# ------------------------------------------------------------------------------------------------
# NNGP.


def empirical_nngp_fn(
    f: ApplyFn, trace_axes: Axes = (-1,), diagonal_axes: Axes = ()
) -> EmpiricalKernelFn:
    """Returns ``nngp_fn(x1, x2, params, **apply_fn_kwargs)``: one sample of the NNGP of ``f``.

    ``K = f(params, x1) ⊗ f(params, x2)`` per output leaf, traced over ``trace_axes`` (and divided
    by the traced size), diagonal along ``diagonal_axes``: shape ``zip(f(x1).shape,
    f(x2).shape)`` minus the traced axes, with diagonal axes once (see the module docstring).

    Args:
      f: ``f(params, x, **kwargs)``, PyTree inputs and outputs.
      trace_axes: output axes averaged over (the pair of copies contracted).
      diagonal_axes: output axes kept only on the diagonal of their pair.

    ``nngp_fn``'s ``x2=None`` means ``x2 = x1`` (``f`` is evaluated once). ``apply_fn_kwargs`` are
    split by NT's rule: ``rng`` becomes two keys (equal iff ``x1 == x2``), a 2-tuple is
    ``(value for x1, value for x2)``, anything else is shared.
    """

    def nngp_fn(x1: PyTree, x2: PyTree | None, params: PyTree, **apply_fn_kwargs) -> PyTree:
        kwargs1, kwargs2 = utils.split_kwargs(apply_fn_kwargs, x1, x2)
        out1 = f(params, x1, **kwargs1)
        out2 = out1 if utils.all_none(x2) else f(params, x2, **kwargs2)

        def nngp_leaf(o1, o2):
            trace, diagonal = _trace_and_diagonal(trace_axes, diagonal_axes, o1.ndim)
            return _contract(o1, o2, o1.ndim, trace, diagonal) / utils.size_at(o1, trace)

        return tree_map(nngp_leaf, out1, out2)

    return nngp_fn


# ------------------------------------------------------------------------------------------------
# NTK.


class NtkImplementation(enum.IntEnum):
    """How NT computes a finite-width NTK (Novak et al. 2022, "Fast Finite Width NTK").

    ntfast computes every value by Jacobian contraction; the others are accepted so that code
    written for NT runs unchanged, and give the same kernel up to rounding.

    Attributes:
      AUTO: (0) NT picks the cheapest method by FLOP count.
      JACOBIAN_CONTRACTION: (1) both Jacobians by reverse mode, then contracted.
      NTK_VECTOR_PRODUCTS: (2) NT: NTK-vector products (forward and reverse mode).
      STRUCTURED_DERIVATIVES: (3) NT: a custom interpreter exploiting Jacobian structure.
    """

    AUTO = 0
    JACOBIAN_CONTRACTION = 1
    NTK_VECTOR_PRODUCTS = 2
    STRUCTURED_DERIVATIVES = 3


DEFAULT_NTK_IMPLEMENTATION = NtkImplementation.JACOBIAN_CONTRACTION
"""NT's default, and the only method ntfast implements."""

_DEFAULT_NTK_J_RULES: bool = True
_DEFAULT_NTK_S_RULES: bool = True
_DEFAULT_NTK_FWD: bool | None = None
# NT's debugging knobs of STRUCTURED_DERIVATIVES; accepted and ignored here.


def _vmap_axes_triple(vmap_axes: VMapAxes, x: PyTree, fx: PyTree, kwargs: dict[str, Any]):
    """``vmap_axes`` as ``(x_axis, fx_axis, kw_axes)`` trees with non-negative axes.

    A 3-tuple is ``(in_axes, out_axes, kwargs_axes)``; anything else is ``in_axes = out_axes``
    with no batched kwargs. An int is broadcast over the leaves of ``x`` / ``fx`` / the kwargs.
    """
    if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
        x_axis, fx_axis, kw_axes = vmap_axes
    else:
        x_axis, fx_axis, kw_axes = vmap_axes, vmap_axes, {}
    if kw_axes is None:
        kw_axes = {}
    if isinstance(x_axis, int):
        x_axis = tree_map(lambda _: x_axis, x)
    if isinstance(fx_axis, int):
        fx_axis = tree_map(lambda _: fx_axis, fx)
    if isinstance(kw_axes, int):
        kw_axes = tree_map(lambda _: kw_axes, kwargs)
    if not isinstance(kw_axes, dict):
        raise TypeError(
            f"The kwargs part of `vmap_axes` must be a dict name -> axes, got {kw_axes!r}."
        )
    unknown = set(kw_axes) - set(kwargs)
    if unknown:
        raise ValueError(
            f"`vmap_axes` names keyword arguments {sorted(unknown)} not passed to the kernel "
            f"function (got {sorted(kwargs)})."
        )

    def mod(axes, tree):
        if axes is None:
            return None
        return tree_map(lambda a, t: a % t.ndim, axes, tree)

    x_axis = mod(x_axis, x)
    fx_axis = mod(fx_axis, fx)
    kw_axes = {k: mod(v, kwargs[k]) for k, v in kw_axes.items()}
    return x_axis, fx_axis, kw_axes


def _expand(tree: PyTree, axes: PyTree | None) -> PyTree:
    if axes is None or tree is None:
        return tree
    return tree_map(lambda a, x: x if a is None else jnp.expand_dims(x, a), axes, tree)


def _squeeze(tree: PyTree, axes: PyTree | None) -> PyTree:
    if axes is None:
        return tree
    return tree_map(lambda a, x: x if a is None else jnp.squeeze(x, a), axes, tree)


def _jacobian_fn(f: ApplyFn, vmap_axes: VMapAxes):
    """Returns ``jac(x, params, kwargs) -> (J, fx_shapes)``; ``J`` maps each output leaf of
    ``f(params, x)`` to the tree of its Jacobians w.r.t. ``params``, each of shape
    ``output_leaf.shape + param_leaf.shape``.

    With ``vmap_axes`` the Jacobian is ``vmap``-ed over the batch axes (one example at a time,
    reverse mode over that example's outputs only: ``N`` times fewer backward passes).
    """

    def jac(x, params, kwargs):
        fx = jax.eval_shape(lambda p: f(p, x, **kwargs), params)
        if vmap_axes is None:
            return jax.jacrev(lambda p: f(p, x, **kwargs))(params), fx
        x_axis, fx_axis, kw_axes = _vmap_axes_triple(vmap_axes, x, fx, kwargs)
        if utils.all_none(x_axis) and utils.all_none(kw_axes):
            return jax.jacrev(lambda p: f(p, x, **kwargs))(params), fx
        names = list(kwargs)

        def one_slice(x_i, *kw_values):
            # `f` expects batched inputs: give each slice a batch axis of size 1, drop it after.
            kw_i = {
                k: _expand(v, kw_axes.get(k)) if k in kw_axes else v
                for k, v in zip(names, kw_values)
            }
            x_i = _expand(x_i, x_axis)
            return jax.jacrev(lambda p: _squeeze(f(p, x_i, **kw_i), fx_axis))(params)

        in_axes = (x_axis, *(kw_axes.get(k) for k in names))
        j = jax.vmap(one_slice, in_axes=in_axes, out_axes=fx_axis)(x, *kwargs.values())
        return j, fx

    return jac


def empirical_ntk_fn(
    f: ApplyFn,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = None,
    implementation: NtkImplementation | int = DEFAULT_NTK_IMPLEMENTATION,
    _j_rules: bool = _DEFAULT_NTK_J_RULES,
    _s_rules: bool = _DEFAULT_NTK_S_RULES,
    _fwd: bool | None = _DEFAULT_NTK_FWD,
) -> EmpiricalKernelFn:
    """Returns ``ntk_fn(x1, x2, params, **apply_fn_kwargs)``: one sample of the NTK of ``f``.

    ``Θ = Σ_p J1[..., p] J2[..., p]`` with ``J = ∂f(params, x)/∂params`` (shape
    ``f(x).shape + param.shape`` per parameter leaf), traced over ``trace_axes`` (divided by the
    traced size) and diagonal along ``diagonal_axes``; same layout as :func:`empirical_nngp_fn`.

    Args:
      f: ``f(params, x, **kwargs)``, PyTree inputs and outputs.
      trace_axes: output axes averaged over.
      diagonal_axes: output axes kept only on the diagonal.
      vmap_axes: ``None``, axes (int / PyTree) of both ``x`` and ``f(x)``, or a triple
        ``(in_axes, out_axes, kwargs_axes)``. Certifies that ``f`` acts independently on slices
        along those axes (no BatchNorm, no stax Dropout), which makes the Jacobians cheaper. A wrong
        value gives silently wrong kernels, as in NT.
      implementation: any :class:`NtkImplementation` (or ``0..3``); all compute the same kernel
        by Jacobian contraction here.
      _j_rules, _s_rules, _fwd: NT's debugging knobs; ignored.

    Raises:
      ValueError: unknown ``implementation``; axes out of range; output shapes of ``x1`` and ``x2``
        that disagree on traced or diagonal axes.
    """
    _check_implementation(implementation)
    jac = _jacobian_fn(f, vmap_axes)

    def ntk_fn(x1: PyTree, x2: PyTree | None, params: PyTree, **apply_fn_kwargs) -> PyTree:
        kwargs1, kwargs2 = utils.split_kwargs(apply_fn_kwargs, x1, x2)
        j1, fx1 = jac(x1, params, kwargs1)
        j2 = j1 if utils.all_none(x2) else jac(x2, params, kwargs2)[0]

        def ntk_leaf(fx, j1_leaf, j2_leaf):
            # j*_leaf: tree (params structure) of Jacobians of this output leaf.
            trace, diagonal = _trace_and_diagonal(trace_axes, diagonal_axes, fx.ndim)
            size = utils.size_at(fx, trace)
            terms = tree_map(
                lambda a, b: _contract(a, b, fx.ndim, trace, diagonal) / size, j1_leaf, j2_leaf
            )
            return tree_reduce(operator.add, terms)

        # `fx1`'s leaves (ShapeDtypeStructs) are where `j1` / `j2` hold parameter subtrees.
        return tree_map(ntk_leaf, fx1, j1, j2)

    return ntk_fn


# ------------------------------------------------------------------------------------------------
# Both.


_KERNEL_NAMES = ("nngp", "ntk")


def empirical_kernel_fn(
    f: ApplyFn,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = None,
    implementation: NtkImplementation | int = DEFAULT_NTK_IMPLEMENTATION,
    _j_rules: bool = _DEFAULT_NTK_J_RULES,
    _s_rules: bool = _DEFAULT_NTK_S_RULES,
    _fwd: bool | None = _DEFAULT_NTK_FWD,
) -> EmpiricalGetKernelFn:
    """Returns ``kernel_fn(x1, x2, get, params, **apply_fn_kwargs)``: samples of NNGP and/or NTK.

    Arguments as in :func:`empirical_ntk_fn` (``vmap_axes`` and ``implementation`` concern the
    NTK only). ``get``: ``"nngp"`` / ``"ntk"`` returns that array (tree); a tuple returns an
    ``EmpiricalKernel`` namedtuple with those fields in that order; ``None`` means
    ``("nngp", "ntk")``. For list/tuple outputs of ``f`` the result is a list/tuple of those.
    """
    nngp_fn = empirical_nngp_fn(f, trace_axes, diagonal_axes)
    ntk_fn = empirical_ntk_fn(
        f, trace_axes, diagonal_axes, vmap_axes, implementation, _j_rules, _s_rules, _fwd
    )
    fns = {"nngp": nngp_fn, "ntk": ntk_fn}

    @utils.get_namedtuple("EmpiricalKernel")
    def kernel_fn(
        x1: PyTree, x2: PyTree | None, get: Any, params: PyTree, **apply_fn_kwargs
    ) -> PyTree:
        names = _KERNEL_NAMES if get is None else get
        unknown = [g for g in names if g not in fns]
        if unknown:
            raise ValueError(
                f"`get` entries must be among {_KERNEL_NAMES} for empirical kernels, got {unknown}."
            )
        outs = [fns[g](x1, x2, params, **apply_fn_kwargs) for g in names]
        # One {name: kernel} dict per output leaf; `get_namedtuple` turns them into the result.
        return tree_map(lambda *ks: dict(zip(names, ks)), *outs)

    return kernel_fn


# ------------------------------------------------------------------------------------------------
# NTK-vector products.


def empirical_ntk_vp_fn(
    f: ApplyFn, x1: PyTree, x2: PyTree | None, params: PyTree, **apply_fn_kwargs
) -> Callable[[PyTree], PyTree]:
    """Returns ``ntk_vp(cotangents) = Θ(x1, x2) · cotangents`` without forming ``Θ``.

    ``cotangents`` has the structure and shapes of ``f(params, x2)``; the result those of
    ``f(params, x1)``. Computed as ``J1 · (J2ᵀ · v)``: one VJP through ``x2`` then one JVP through
    ``x1`` (Novak et al. 2022, section L). No trace or diagonal: the full NTK acts on ``v``.
    """
    kwargs1, kwargs2 = utils.split_kwargs(apply_fn_kwargs, x1, x2)

    def f1(p):
        return f(p, x1, **kwargs1)

    f2 = f1 if utils.all_none(x2) else (lambda p: f(p, x2, **kwargs2))

    def ntk_vp(cotangents: PyTree) -> PyTree:
        (dparams,) = jax.vjp(f2, params)[1](cotangents)
        return jax.jvp(f1, (params,), (dparams,))[1]

    return ntk_vp
