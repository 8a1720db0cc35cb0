"""Layout and tree helpers shared by every ntfast module.

Same public names and semantics as Neural Tangents 0.6.5 ``_src/utils/utils.py`` so that layer code
written against NT's helpers reads the same here; the implementations are ours.

Vocabulary used below (NT's):

- *zipped* layout: the two copies of each spatial axis of a covariance sit next to each other,
  ``(..., H, H, W, W, D, D)``; *unzipped*: ``(..., H, W, D, H, W, D)``.
- *reversed*: spatial axis pairs stored last-to-first, ``(..., D, D, W, W, H, H)``
  (``Kernel.is_reversed``).
- *NT tree* (``NTTree``): nested lists/tuples (exact types, not subclasses such as namedtuples)
  whose leaves are arrays, kernels, shapes, ...
"""

from __future__ import annotations

import functools
import inspect
import operator
import types
import warnings
from collections import namedtuple
from collections.abc import Callable, Iterable, Sequence, Sized
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import random
from jax.tree_util import tree_all, tree_map

PyTree = Any
Axes = int | Sequence[int]

_SingleSlice = int | slice | type(Ellipsis)
SliceType = _SingleSlice | tuple[_SingleSlice, ...]
"""An index into an array: ``x[1, :, 2:8:3]`` is ``(1, slice(None), slice(2, 8, 3))``."""

_T = TypeVar("_T")
_ArrayOrShape = TypeVar("_ArrayOrShape", np.ndarray, jax.Array, list, tuple)


# ------------------------------------------------------------------------------------------------
# NT trees.


def is_list_or_tuple(x: Any) -> bool:
    """True for exactly ``list`` or ``tuple``; subclasses (namedtuples) are leaves of an NT tree."""
    return type(x) in (list, tuple)


def is_nt_tree_of(x: Any, dtype: type | tuple[type, ...]) -> bool:
    """Whether ``x`` is an instance of ``dtype`` or a nested list/tuple whose leaves all are."""
    if isinstance(x, dtype):
        return True
    return is_list_or_tuple(x) and all(is_nt_tree_of(child, dtype) for child in x)


def _check_same_nt_structure(trees: Sequence[Any]) -> None:
    """Raises TypeError unless all ``trees`` have the same list/tuple skeleton.

    Leaves are not compared: a leaf in one tree may face a leaf of any type in another; a node
    must face a node of the same type (list vs tuple), and children are checked pairwise.
    """
    if not any(is_list_or_tuple(t) for t in trees):
        return
    node_types = [type(t) for t in trees]
    if any(t is not node_types[0] for t in node_types[1:]):
        raise TypeError(f"Inconsistent NTTree structure found. Node Types: {node_types}.")
    for children in zip(*trees):
        _check_same_nt_structure(children)


def nt_tree_fn(
    nargs: int | None = None,
    tree_structure_argnum: int | None = None,
    reduce: Callable = lambda x: x,
):
    """Decorator lifting a function of leaves to a function of NT trees.

    The first ``nargs`` positional arguments (all of them if ``None``; negative counts from the end
    like a slice bound) are NT trees traversed in lockstep; the remaining positional and keyword
    arguments are passed unchanged to every leaf call. At each list/tuple node the children's
    results are collected into a node of the same type and passed through ``reduce``.

    The skeleton is read from argument ``tree_structure_argnum``; if ``None``, all traversed
    arguments must share it (TypeError otherwise) and argument 0 is used.
    """

    def decorator(fn):
        @wraps(fn)
        def tree_fn(*args, **kwargs):
            n = len(args) if nargs is None else nargs
            trees, rest = args[:n], args[n:]

            argnum = tree_structure_argnum
            if argnum is None:
                _check_same_nt_structure(trees)
                argnum = 0

            node = args[argnum]
            if is_list_or_tuple(node):
                results = (tree_fn(*(leaves + rest), **kwargs) for leaves in zip(*trees))
                return reduce(type(node)(results))
            return fn(*args, **kwargs)

        return tree_fn

    return decorator


def all_none(x: PyTree, attr: str | None = None) -> bool:
    """Whether every leaf of pytree ``x`` (or its attribute ``attr``) is None.

    ``None`` itself has no leaves in a JAX pytree, so ``all_none(None)`` is True.
    """
    if attr is None:
        return tree_all(tree_map(lambda leaf: leaf is None, x))
    return tree_all(tree_map(lambda leaf: getattr(leaf, attr) is None, x))


# ------------------------------------------------------------------------------------------------
# Signatures and `get`.


def wraps(f: Callable):
    """Like ``functools.wraps(f)``, and also gives the wrapper ``f``'s exact signature.

    The wrapper is re-wrapped in a fresh function so that decorating the same ``g`` twice never
    mutates a shared object.
    """

    def decorator(g: Callable) -> Callable:
        @functools.wraps(f)
        def wrapped(*args, **kwargs):
            return g(*args, **kwargs)

        wrapped.__signature__ = inspect.signature(f)
        return wrapped

    return decorator


def canonicalize_get(get: Any) -> tuple[bool, tuple[str, ...] | None]:
    """Normalizes a ``get`` argument.

    Returns ``(get_is_not_tuple, get)``: ``(True, None)`` for ``None``; ``(True, ("ntk",))`` for the
    string ``"NTK"``; ``(False, ("nngp", "ntk"))`` for ``("nngp", "ntk")``. Names are lower-cased.
    Raises ValueError if ``get`` is empty or has repeated names.
    """
    if get is None:
        return True, None
    if not get:
        raise ValueError(f'"get" must be non-empty, got {get!r}.')
    is_single = isinstance(get, str)
    if not (is_single or isinstance(get, (tuple, list))) or not all(
        isinstance(g, str) for g in ((get,) if is_single else get)
    ):
        raise TypeError(f'"get" must be None, a string or a tuple of strings, got {get!r}.')
    names = (get,) if is_single else tuple(get)
    names = tuple(name.lower() for name in names)
    if len(set(names)) != len(names):
        raise ValueError(f'All entries in "get" must be unique. Got {names}')
    return is_single, names


_NAMEDTUPLE_TYPES: dict[tuple[str, tuple[str, ...]], type] = {}


def _namedtuple_type(name: str, fields: tuple[str, ...]) -> type:
    """One namedtuple class per ``(name, fields)``, so equal requests give the same type."""
    key = (name, tuple(fields))
    cls = _NAMEDTUPLE_TYPES.get(key)
    if cls is None:
        cls = _NAMEDTUPLE_TYPES[key] = namedtuple(name, key[1])
    return cls


def _as_dict(output: Any) -> Any:
    """A dict view of a kernel-like result (dict, ``asdict()``, namedtuple), lazily for generators."""
    if isinstance(output, dict):
        return output
    if hasattr(output, "asdict"):
        return output.asdict()
    if hasattr(output, "_asdict"):
        return output._asdict()
    if isinstance(output, types.GeneratorType):
        return (_as_dict(item) for item in output)
    raise ValueError(f"Cannot read named fields from an output of type {type(output)}.")


def get_namedtuple(name: str):
    """Decorator for functions with a ``get`` argument: select fields from the returned kernel(s).

    The decorated function is called with ``get`` canonicalized (see :func:`canonicalize_get`).
    Its output (an NT tree of kernels / dicts / namedtuples, or a generator of them) is then
    mapped leaf-wise:

    - ``get=None``: returned as is, except dicts, which become a namedtuple ``name`` of their keys;
    - ``get="ntk"`` (a single string): the ``ntk`` entry alone;
    - ``get=("nngp", "ntk")``: a namedtuple ``name`` with fields ``nngp, ntk``.

    Raises ValueError if the function has no ``get`` parameter, or ``get`` is neither passed nor
    defaulted.
    """

    def decorator(fn):
        try:
            spec = inspect.getfullargspec(fn)
            get_index = spec.args.index("get")
        except (TypeError, ValueError) as e:
            raise ValueError("`get_namedtuple` functions must have a `get` argument.") from e
        defaults = spec.defaults

        @wraps(fn)
        def getter_fn(*args, **kwargs):
            args = list(args)
            if "get" in kwargs:
                is_single, get = canonicalize_get(kwargs["get"])
                kwargs["get"] = get
            elif get_index < len(args):
                is_single, get = canonicalize_get(args[get_index])
                args[get_index] = get
            elif defaults is None:
                raise ValueError(
                    "`get_namedtuple` function must have a `get` argument provided or set by "
                    "default."
                )
            else:
                # Positional defaults align with the last len(defaults) parameters.
                is_single, get = canonicalize_get(defaults[get_index - len(spec.args)])

            out = fn(*args, **kwargs)

            @nt_tree_fn()
            def select(leaf):
                if get is None:
                    if isinstance(leaf, dict):
                        return _namedtuple_type(name, tuple(leaf.keys()))(*leaf.values())
                    return leaf
                leaf = _as_dict(leaf)
                if is_single:
                    if isinstance(leaf, types.GeneratorType):
                        return (item[get[0]] for item in leaf)
                    return leaf[get[0]]
                cls = _namedtuple_type(name, get)
                if isinstance(leaf, types.GeneratorType):
                    return (cls(*(item[g] for g in get)) for item in leaf)
                return cls(*(leaf[g] for g in get))

            return select(out)

        return getter_fn

    return decorator


# ------------------------------------------------------------------------------------------------
# Inputs and keyword arguments.


def is_array(x: Any) -> bool:
    """Whether ``x`` is a numpy or JAX array (including tracers)."""
    return isinstance(x, (np.ndarray, jax.Array))


@nt_tree_fn(nargs=2, reduce=lambda flags: jnp.all(jnp.array(flags)))
def x1_is_x2(x1: jax.Array, x2: jax.Array | None = None, eps: float = 1e-12) -> bool | jax.Array:
    """Whether ``x2`` is (numerically) ``x1``: None, the same object, or ``max|x1 − x2| < eps``.

    Different shapes give False. ``eps`` becomes 1e-4 on TPU (bf16 matmuls). Inputs without
    subtraction (e.g. typed PRNG keys) compare with ``==``. Trees reduce with ``all``.
    """
    if not is_array(x1):
        raise TypeError(f"`x1` must be an ndarray. A {type(x1)} is found.")
    if x2 is None or x1 is x2:
        return True
    if x1.shape != x2.shape:
        return False
    if jax.default_backend() == "tpu":
        eps = 1e-4
    try:
        diff = x1 - x2
    except TypeError:
        return jnp.all(x1 == x2)
    return jnp.all(jnp.abs(diff) < eps)


def _read_keys(key: Any, x1: Any, x2: Any) -> tuple[Any, Any]:
    """Maps a dropout ``rng`` (None, one key, or a pair) to ``(key1, key2)`` for ``x1`` and ``x2``.

    Invariant: ``key1 == key2`` exactly when ``x1 == x2`` (same inputs see the same dropout mask,
    different inputs independent masks); a given pair is adjusted, with a warning, to keep it.
    """
    if key is None or all_none(x2):
        return key, key
    if isinstance(key, tuple) and len(key) == 2:
        key1, key2 = key
        distinct = jnp.where(x1_is_x2(key1, key2), random.fold_in(key2, 1), key2)
        key2 = jnp.where(x1_is_x2(x1, x2), key1, distinct)
        warnings.warn(
            "The value of `key[1]` might be replaced by a new value if key[0] == key[1] and "
            "x1 != x2 or key[0] != key[1] and x1 == x2."
        )
        return key1, key2
    if isinstance(key, jax.Array):
        return key, jnp.where(x1_is_x2(x1, x2), key, random.fold_in(key, 1))
    raise TypeError(f"`rng` must be None, a PRNG key or a pair of keys, got {type(key)}.")


def split_kwargs(
    kwargs: dict[str, Any], x1: Any = None, x2: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits keyword arguments into those for ``x1`` and those for ``x2``.

    ``rng`` (when ``x2`` is given) becomes two keys (see :func:`_read_keys`); any other length-2
    tuple is split in its two halves; everything else is shared.
    """
    kwargs1: dict[str, Any] = {}
    kwargs2: dict[str, Any] = {}
    for k, v in kwargs.items():
        if x2 is not None and k == "rng":
            kwargs1[k], kwargs2[k] = _read_keys(v, x1, x2)
        elif isinstance(v, tuple) and len(v) == 2:
            kwargs1[k], kwargs2[k] = v
        else:
            kwargs1[k] = kwargs2[k] = v
    return kwargs1, kwargs2


# ------------------------------------------------------------------------------------------------
# Axes.


def _get_ndim(x: int | Sized | jax.Array) -> int:
    """Number of dimensions of an array, of a shape (its length), or an ``int`` given as is."""
    if hasattr(x, "ndim"):
        return x.ndim
    if hasattr(x, "__len__"):
        return len(x)
    if isinstance(x, int):
        return x
    raise TypeError(f"Expected an array, a shape or a number of dimensions, got {type(x)}.")


def mod(axis: Axes, x: int | Sized | jax.Array) -> list[int]:
    """``axis`` (int or sequence) as a list of non-negative axes of ``x`` (ndim, shape or array).

    Order and repeats are kept; nothing is bounds-checked (``n == 0`` leaves axes unchanged).
    """
    n = _get_ndim(x)
    axes = [axis] if isinstance(axis, int) else axis
    return [a % n if n > 0 else a for a in axes]


def canonicalize_axis(axis: Axes, x: int | Sized | jax.Array) -> list[int]:
    """``axis`` as a sorted, duplicate-free list of non-negative axes of ``x``.

    Raises ``numpy.exceptions.AxisError`` (a ValueError and IndexError) for an out-of-range axis.
    """
    n = _get_ndim(x)
    axes = [axis] if isinstance(axis, int) else list(axis)
    out = set()
    for a in axes:
        a = operator.index(a)
        if not -n <= a < n:
            raise np.exceptions.AxisError(a, n)
        out.add(a % n)
    return sorted(out)


def axis_after_dot(
    axis: int,
    contracting_dims: Sequence[int],
    batch_dims: Sequence[int],
    lhs_ndim: int | None = None,
) -> int:
    """Position of input axis ``axis`` in the output of ``lax.dot_general``.

    ``dot_general`` output axes are: batch dims (in ``batch_dims`` order), then the lhs's free
    axes, then the rhs's free axes. ``axis`` belongs to the operand described by
    ``contracting_dims``/``batch_dims``; pass ``lhs_ndim`` (the other operand's ndim) when that
    operand is the rhs, so its free axes come after the lhs's.
    """
    if axis in batch_dims:
        return list(batch_dims).index(axis)
    n_contracted_before = sum(1 for c in contracting_dims if c < axis)
    n_batch_after = sum(1 for b in batch_dims if b > axis)
    shift = 0 if lhs_ndim is None else lhs_ndim - len(batch_dims) - len(contracting_dims)
    return axis - n_contracted_before + n_batch_after + shift


def size_at(x: Any, axes: Iterable[int] | None = None) -> int:
    """Product of the sizes of ``axes`` (all axes if None) of an array or shape."""
    shape = x.shape if hasattr(x, "shape") else x
    if axes is None:
        axes = range(len(shape))
    return functools.reduce(operator.mul, (shape[a] for a in axes), 1)


def zip_flat(x: Iterable[_T], y: Iterable[_T]) -> tuple[_T, ...]:
    """Interleaves two sequences: ``(x0, y0, x1, y1, ...)``, truncated to the shorter one."""
    return tuple(v for pair in zip(x, y) for v in pair)


def double_tuple(x: Iterable[_T]) -> tuple[_T, ...]:
    """Repeats every element twice: ``(a, b) -> (a, a, b, b)`` (one index per zipped axis pair)."""
    return tuple(v for v in x for _ in (0, 1))


# ------------------------------------------------------------------------------------------------
# Zipped covariance layouts.


def _zip_or_unzip(x: jax.Array, start_axis: int, end_axis: int | None, unzip: bool) -> jax.Array:
    if end_axis is None:
        end_axis = x.ndim
    n = end_axis - start_axis
    if n % 2:
        raise ValueError(f"Need even number of axes to zip, got {n}.")
    half = n // 2
    # Zipped position of the second copy of axis k is start + 2k + 1; unzipped it is start + half + k.
    second_copies_zipped = range(start_axis + 1, end_axis, 2)
    second_copies_unzipped = range(end_axis - half, end_axis)
    if unzip:
        return jnp.moveaxis(x, second_copies_zipped, second_copies_unzipped)
    return jnp.moveaxis(x, second_copies_unzipped, second_copies_zipped)


def zip_axes(x: jax.Array, start_axis: int = 0, end_axis: int | None = None) -> jax.Array:
    """``[..., X, Y, Z, X', Y', Z', ...] -> [..., X, X', Y, Y', Z, Z', ...]`` on axes start:end.

    Raises ValueError if ``end_axis - start_axis`` is odd.
    """
    return _zip_or_unzip(x, start_axis, end_axis, unzip=False)


def unzip_axes(x: jax.Array, start_axis: int = 0, end_axis: int | None = None) -> jax.Array:
    """``[..., X, X', Y, Y', Z, Z', ...] -> [..., X, Y, Z, X', Y', Z', ...]``: inverse of zip_axes."""
    return _zip_or_unzip(x, start_axis, end_axis, unzip=True)


def diagonal_between(x: jax.Array, start_axis: int = 0, end_axis: int | None = None) -> jax.Array:
    """Diagonal of an *unzipped* block ``[..., X, Y, X, Y, ...] -> [..., X, Y, ...]``.

    ``out[..., x, y, ...] = in[..., x, y, x, y, ...]`` over axes ``start_axis:end_axis``.
    """
    if end_axis is None:
        end_axis = x.ndim
    n = end_axis - start_axis
    if n % 2:
        raise ValueError(f"Need even number of axes to flatten, got {n}.")
    half = n // 2
    if half == 0:
        return x
    lead, side, trail = (
        x.shape[:start_axis],
        x.shape[start_axis : start_axis + half],
        x.shape[end_axis:],
    )
    m = size_at(side)
    square = x.reshape(lead + (m, m) + trail)
    diag = jnp.moveaxis(
        jnp.diagonal(square, axis1=start_axis, axis2=start_axis + 1), -1, start_axis
    )
    return diag.reshape(lead + side + trail)


def interleave_ones(x: jax.Array, start_axis: int, end_axis: int, x_first: bool) -> jax.Array:
    """Inserts a size-1 axis after (``x_first``) or before each axis in ``start_axis:end_axis``.

    ``(N, H, W)`` with axes 1:3 becomes ``(N, H, 1, W, 1)`` (x_first) or ``(N, 1, H, 1, W)``, so
    two such arrays broadcast to the zipped outer product ``(N, H, H, W, W)``.
    """
    middle = x.shape[start_axis:end_axis]
    ones = (1,) * len(middle)
    pairs = zip_flat(middle, ones) if x_first else zip_flat(ones, middle)
    return x.reshape(x.shape[:start_axis] + pairs + x.shape[end_axis:])


def outer_prod(
    x: jax.Array, y: jax.Array | None, start_axis: int, end_axis: int, prod_op: Callable
) -> jax.Array:
    """Zipped outer product over axes ``start_axis:end_axis`` (``y = x`` if None).

    ``out[..., i, j, k, l, ...] = prod_op(x[..., i, k, ...], y[..., j, l, ...])``; axes outside the
    range broadcast.
    """
    if y is None:
        y = x
    return prod_op(
        interleave_ones(x, start_axis, end_axis, True),
        interleave_ones(y, start_axis, end_axis, False),
    )


def reverse_zipped(x: _ArrayOrShape | None, start_axis: int = 0) -> _ArrayOrShape | None:
    """Reverses the order of zipped axis pairs after ``start_axis`` (pairs kept intact).

    ``(N, H, H', W, W', D, D')`` with ``start_axis=1`` becomes ``(N, D, D', W, W', H, H')``. Works
    on arrays (axes moved) and on shapes / lists of dims (entries permuted, type kept). None passes.
    """
    if x is None:
        return x
    ndim = _get_ndim(x)
    # Pairs (i, i + 1) taken from the last pair back to the first.
    order = tuple(j for i in range(ndim - 2, start_axis - 1, -2) for j in (i, i + 1))
    if is_array(x):
        return jnp.moveaxis(x, order, range(start_axis, ndim))
    return x[:start_axis] + type(x)(x[i] for i in order)


def make_2d(
    x: jax.Array | None, start_axis: int = 0, end_axis: int | None = None
) -> jax.Array | None:
    """Flattens the zipped axes ``start_axis:end_axis`` (``X, X, Y, Y, ...``) into a matrix.

    ``(1, 2, 3, 3, 4, 4)`` becomes ``(12, 24)``; with ``start_axis=2`` ``(1, 2, 12, 12)``.
    """
    if x is None:
        return x
    if end_axis is None:
        end_axis = x.ndim
    x = unzip_axes(x, start_axis, end_axis)
    half = (end_axis - start_axis) // 2
    rows = size_at(x.shape[start_axis : start_axis + half])
    cols = size_at(x.shape[start_axis + half : end_axis])
    return x.reshape(x.shape[:start_axis] + (rows, cols) + x.shape[end_axis:])


def mask(x: jax.Array | None, mask_mat: jax.Array | None) -> jax.Array | None:
    """Zeroes ``x`` where ``mask_mat`` is True (``True`` = masked out). None in, None-safe out."""
    if x is None or mask_mat is None:
        return x
    return jnp.where(mask_mat, jnp.zeros((), x.dtype), x)


# ------------------------------------------------------------------------------------------------
# Indexing.


def canonicalize_idx(idx: SliceType, ndim: int) -> tuple[int | slice, ...]:
    """Expands an index to one entry per axis: a bare int/slice/Ellipsis is wrapped, ``...`` is
    replaced by full slices, and trailing axes get ``slice(None)``."""
    if idx is Ellipsis or isinstance(idx, (int, slice)):
        idx = (idx,) + (slice(None),) * (ndim - 1)
    idx = tuple(idx)
    for i, s in enumerate(idx):
        if s is Ellipsis:
            idx = idx[:i] + (slice(None),) * (ndim - len(idx) + 1) + idx[i + 1 :]
    return idx + (slice(None),) * (ndim - len(idx))


def slice_shape(shape: tuple[int, ...], idx: SliceType) -> tuple[int, ...]:
    """Shape of ``np.empty(shape)[idx]``, keeping unknown sizes (None or negative) as they are.

    An unknown-sized axis may only be indexed with ``:``; anything else raises ValueError.
    """
    full_idx = canonicalize_idx(idx, len(shape))
    probe_shape = list(shape)
    unknown: dict[int, Any] = {}
    n_dropped = 0  # axes removed by integer indices before the current one
    for axis, (i, size) in enumerate(zip(full_idx, shape)):
        if size is None or size < 0:
            if i != slice(None):
                raise ValueError(
                    f"Trying to index with {i} axis {axis} of unknown size {size}. Please provide "
                    f"input shape {shape} with non-negative integer size at axis {axis}."
                )
            probe_shape[axis] = 0
            unknown[axis - n_dropped] = size
        if isinstance(i, int):
            n_dropped += 1
    out = list(np.empty(probe_shape)[idx].shape)
    for axis, size in unknown.items():
        out[axis] = size
    return tuple(out)
