"""The layer machinery: requirements, masking, and the public ``kernel_fn`` of every layer.

Same internal API (names and semantics) as Neural Tangents 0.6.5's ``stax/requirements.py``, so that
layers written against NT's conventions work here:

- ``@layer`` turns a constructor returning ``(init_fn, apply_fn, kernel_fn)`` into a public layer
  whose ``kernel_fn(x1_or_kernel, x2=None, get=None, **kwargs)`` accepts inputs or ``Kernel``s.
- ``@requires(**reqs)`` attaches the input requirements of a ``Kernel -> Kernel`` function
  (``diagonal_batch``, ``diagonal_spatial``, ``batch_axis``, ``channel_axis``, ``use_dropout``).
- ``@supports_masking(remask_kernel)`` adds ``mask_constant`` handling to ``apply_fn`` and mask
  propagation to ``kernel_fn``.
- :class:`Diagonal` / :class:`Bool` are the three-valued logic deciding whether a network can
  track only diagonal (batch or spatial) covariance entries; ``serial`` composes them with ``>>``
  and ``parallel`` with ``&``.

``kernel_fn`` also takes ``backend=`` per call (see :mod:`ntfast.backend`).
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.tree_util import tree_all, tree_map

from .. import _utils as utils
from ..backend import use_backend
from ..kernel import Kernel
from ..ops.dot_general import input_cov

PyTree = Any


class Padding(enum.Enum):
    """Type of padding in pooling and convolutional layers (``VALID``, ``SAME``, ``CIRCULAR``)."""

    CIRCULAR = "CIRCULAR"
    SAME = "SAME"
    VALID = "VALID"


def layer(layer_fn: Callable) -> Callable:
    """Decorator for public layers: ``kernel_fn`` then accepts arrays or ``Kernel``s.

    The returned constructor gives ``(init_fn, apply_fn, kernel_fn)`` where ``kernel_fn`` is
    the public ``AnalyticKernelFn``: ``kernel_fn(x1, x2=None, get=None, *, diagonal_batch=None,
    diagonal_spatial=None, mask_constant=None, backend=None, **kwargs)``.
    """
    name = layer_fn.__name__

    @utils.wraps(layer_fn)
    def new_layer_fns(*args, **kwargs):
        init_fn, apply_fn, kernel_fn = layer_fn(*args, **kwargs)
        kernel_fn = _preprocess_kernel_fn(init_fn, apply_fn, kernel_fn)
        init_fn.__name__ = apply_fn.__name__ = kernel_fn.__name__ = name
        return init_fn, apply_fn, kernel_fn

    return new_layer_fns


_REQ_ATTR = "input_req"
_REQ_KEYS = ("diagonal_batch", "diagonal_spatial", "batch_axis", "channel_axis", "use_dropout")


def get_req(f: Callable, default: Any = None):
    """The requirements dict attached to ``f`` by :func:`requires` (``default`` if none)."""
    return getattr(f, _REQ_ATTR, default)


def _set_req(f: Callable, req) -> None:
    setattr(f, _REQ_ATTR, MappingProxyType(dict(req)))


def _has_req(f: Callable) -> bool:
    return hasattr(f, _REQ_ATTR)


def requires(**static_reqs):
    """Returns a decorator attaching input requirements to a ``Kernel -> Kernel`` function.

    When called, the wrapped function checks that its input ``Kernel`` is consistent with the
    requirements (a kernel that is already diagonal cannot feed a layer that needs off-diagonal
    entries; batch/channel axes must agree) and raises ``ValueError`` otherwise.
    """

    def req(kernel_fn: Callable) -> Callable:
        @utils.wraps(kernel_fn)
        def new_kernel_fn(k, **kwargs):
            fused = _fuse_requirements(static_reqs, {}, **kwargs)
            if isinstance(k, Kernel):
                _check_kernel_meets(k, fused, kernel_fn)
            return kernel_fn(k, **kwargs)

        _set_req(new_kernel_fn, static_reqs)
        return new_kernel_fn

    return req


def _check_kernel_meets(k: Kernel, reqs, kernel_fn: Callable) -> None:
    for key, v in reqs.items():
        if v is None:
            continue
        if key in ("diagonal_batch", "diagonal_spatial"):
            needs_full = v is False or (isinstance(v, Diagonal) and v.input == Bool.NO)
            if getattr(k, key) is True and needs_full:
                raise ValueError(
                    f"{kernel_fn} requires `{key} == {v}`, but the input kernel has "
                    f"`{key} == True`, hence does not contain sufficient information. "
                    f"Please recompute the input kernel with `{key} == {v}`."
                )
        elif key in ("batch_axis", "channel_axis"):
            v_pos = v % len(k.shape1)
            if getattr(k, key) != v_pos:
                raise ValueError(
                    f"{kernel_fn} requires `{key} == {v_pos}`, but the input kernel has "
                    f"`{key} == {getattr(k, key)}`, making the infinite limit ill-defined."
                )


def supports_masking(remask_kernel: bool):
    """Returns a decorator adding masking to a layer constructor (apply it below ``@layer``).

    1. ``init_fn`` is unchanged.
    2. ``apply_fn`` accepts ``mask_constant=None``: entries of the inputs equal to it (``nan``
       allowed) are masked; the layer's own ``apply_fn`` receives the boolean ``mask=``, and the
       output is a :class:`MaskedArray` when a mask is present.
    3. ``kernel_fn`` propagates ``Kernel.mask1/mask2`` through the layer's ``mask_fn`` (identity
       if the constructor returns only three functions), and if ``remask_kernel`` zeroes the
       covariance entries involving a masked position.
    """

    def decorator(layer_ctor):
        @utils.wraps(layer_ctor)
        def layer_with_masking(*args, **kwargs):
            fns = layer_ctor(*args, **kwargs)
            if len(fns) == 3:
                init_fn, apply_fn, kernel_fn = fns
                raw_mask_fn = None
            elif len(fns) == 4:
                init_fn, apply_fn, kernel_fn, raw_mask_fn = fns
            else:
                raise ValueError(
                    "Expected 3 (`init_fn`, `apply_fn`, `kernel_fn`) or 4 (..., `mask_fn`) "
                    f"layer functions, got {len(fns)}."
                )

            def mask_fn(mask, input_shape):
                if mask is None:
                    return None
                return mask if raw_mask_fn is None else raw_mask_fn(mask, input_shape)

            def apply_fn_with_masking(params, inputs, *, mask_constant=None, **kw):
                is_arr = lambda x: isinstance(x, (jnp.ndarray, np.ndarray, MaskedArray))
                masked = tree_map(
                    lambda x: _get_masked_array(x, mask_constant), inputs, is_leaf=is_arr
                )
                is_m = lambda x: isinstance(x, MaskedArray)
                values = tree_map(lambda x: x.masked_value, masked, is_leaf=is_m)
                mask = tree_map(lambda x: x.mask, masked, is_leaf=is_m)
                outputs = apply_fn(params, values, mask=mask, **kw)
                shapes = (
                    values.shape
                    if isinstance(values, (jnp.ndarray, np.ndarray))
                    else [v.shape for v in values]
                )
                out_mask = mask_fn(mask, shapes)
                return outputs if out_mask is None else MaskedArray(outputs, out_mask)

            def kernel_fn_with_masking(k, **user_reqs):
                is_k = lambda x: isinstance(x, Kernel)
                mask1 = mask_fn(
                    tree_map(lambda x: x.mask1, k, is_leaf=is_k),
                    tree_map(lambda x: x.shape1, k, is_leaf=is_k),
                )
                mask2 = mask_fn(
                    tree_map(lambda x: x.mask2, k, is_leaf=is_k),
                    tree_map(lambda x: x.shape2, k, is_leaf=is_k),
                )
                k = kernel_fn(k, **user_reqs)
                if remask_kernel:
                    remask = lambda kk, m1, m2: kk.mask(m1, m2)
                else:
                    remask = lambda kk, m1, m2: kk.replace(mask1=m1, mask2=m2)
                return tree_map(remask, k, mask1, mask2, is_leaf=is_k)

            if _has_req(kernel_fn):
                _set_req(kernel_fn_with_masking, get_req(kernel_fn))
            copy_fused_attrs(kernel_fn, kernel_fn_with_masking)
            return init_fn, apply_fn_with_masking, kernel_fn_with_masking

        return layer_with_masking

    return decorator


def unmask_fn(fn: Callable) -> Callable:
    """Wraps ``fn`` so that any :class:`MaskedArray` output becomes an array with masked entries
    zeroed out (useful before ``empirical_kernel_fn`` / ``monte_carlo_kernel_fn``)."""

    def unmask(x):
        return utils.mask(x.masked_value, x.mask) if isinstance(x, MaskedArray) else x

    @utils.wraps(fn)
    def fn_no_mask(*args, **kwargs):
        out = fn(*args, **kwargs)
        return tree_map(unmask, out, is_leaf=lambda x: isinstance(x, (jnp.ndarray, MaskedArray)))

    return fn_no_mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskedArray:
    """An array (or PyTree) ``masked_value`` with a boolean ``mask`` (``True`` = masked).

    Returned by an ``apply_fn`` called with ``mask_constant``; see :func:`unmask_fn`.
    """

    masked_value: PyTree
    mask: PyTree


def _get_masked_array(x, mask_constant=None) -> MaskedArray:
    """``x`` with entries equal to ``mask_constant`` (``nan`` allowed) zeroed, and the mask."""
    if x is None:
        mask = None
    elif isinstance(x, MaskedArray):
        x, mask = x.masked_value, x.mask
    elif isinstance(x, (np.ndarray, jnp.ndarray, float, int)):
        if mask_constant is None:
            mask = None
        else:
            mask = lax.cond(jnp.isnan(mask_constant), jnp.isnan, lambda v: v == mask_constant, x)
    else:
        raise TypeError(f"Expected an array or a MaskedArray as a layer input, got {type(x)}.")
    return MaskedArray(utils.mask(x, mask), mask)


class Bool(enum.IntEnum):
    """Three-valued logic for :class:`Diagonal`: ``NO < MAYBE < YES``; ``&`` is ``min``."""

    NO = 0
    MAYBE = 1
    YES = 2

    def __and__(self, other: Bool) -> Bool:
        return min(self, other)

    __rand__ = __and__


@dataclasses.dataclass(frozen=True)
class Diagonal:
    """Whether a layer allows diagonal-only (batch or spatial) covariances.

    ``input``: may the layer's input kernel be diagonal-only (YES), only if its off-diagonal
    entries are zero (MAYBE), or not (NO). ``output``: may the outputs from here on be
    diagonal-only (YES), yes after this layer but maybe not further (MAYBE), or no (NO).
    ``>>`` composes (``a >> b`` is ``b(a(.))``), ``&`` combines parallel branches, and
    ``bool(d)`` is the ``diagonal_*`` flag to compute with.
    """

    input: Bool = Bool.YES
    output: Bool = Bool.NO

    def __rshift__(self, other: Diagonal) -> Diagonal:
        if self.output == Bool.YES:
            return self
        if self.output > Bool.NO and other.input > Bool.NO:
            inp = self.input
        elif self.output == Bool.NO and other.input < Bool.YES:
            inp = Bool.NO
        else:
            inp = min(self.input, other.input)
        return Diagonal(input=inp, output=other.output)

    def __lshift__(self, other: Diagonal) -> Diagonal:
        return other >> self

    def __and__(self, other: Diagonal) -> Diagonal:
        return Diagonal(input=self.input & other.input, output=self.output & other.output)

    __rand__ = __and__

    def __bool__(self) -> bool:
        return self.input == Bool.YES and self.output > Bool.NO


_DEFAULT_INPUT_REQ = MappingProxyType(
    {
        "diagonal_batch": True,
        "diagonal_spatial": False,
        "batch_axis": 0,
        "use_dropout": False,
        "channel_axis": -1,
        "mask_constant": None,
    }
)


def _fuse_requirements(kernel_fn_reqs, default_reqs, **user_reqs):
    """Layer requirements overridden by non-None user values, then defaults for missing keys.

    Raises if the user asks for a diagonal layout that the network cannot produce.
    """
    fused = dict(kernel_fn_reqs)
    for key, v_user in user_reqs.items():
        if v_user is None:
            continue
        if key in fused:
            v_kernel = fused[key]
            if v_user is True and (
                v_kernel is False or (isinstance(v_kernel, Diagonal) and v_kernel.input == Bool.NO)
            ):
                raise ValueError(
                    f"Asked to compute `kernel_fn` output with `{key} == {v_user}`, while "
                    f"`kernel_fn` requires `{key} == {v_kernel}`."
                )
        fused[key] = v_user
    for key, v in default_reqs.items():
        fused.setdefault(key, v)
    return MappingProxyType(fused)


def _inputs_to_kernel(
    x1,
    x2,
    *,
    diagonal_batch: bool,
    diagonal_spatial,
    compute_ntk: bool,
    batch_axis: int,
    channel_axis: int | None,
    mask_constant: float | None,
    eps: float = 1e-12,
    **kwargs,
) -> Kernel:
    """The input-layer ``Kernel``: second moments ``x·xᵀ / C`` of (batches of) inputs.

    Batch axis moved first, channel axis summed out (its size is the normalizer); spatial axes
    kept in input order, "zipped" (``H, H', W, W'``) unless ``diagonal_spatial``. ``cov1``/``cov2``
    are per-sample (``diagonal_batch``) or full. ``ntk`` starts at 0 (inputs have no parameters).
    ``channel_axis=None`` flattens all non-batch axes into channels.
    """
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None and name == "x2":
            continue
        if not isinstance(x, (np.ndarray, jnp.ndarray)):
            raise TypeError(
                f"`{name}` must be a jnp.ndarray / np.ndarray (`x2` may be None), got {type(x)}."
            )
        if x.ndim < 2:
            raise ValueError(
                f"`{name}` must be at least 2-D (a batch and a channel/feature axis), got shape "
                f"{x.shape}."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"`{name}` must have a real floating dtype to compute a kernel, got {x.dtype} "
                f"(cast it, e.g. `{name}.astype(jnp.float32)`; complex inputs are not supported)."
            )
    if x2 is not None:
        s1 = tuple(d for i, d in enumerate(x1.shape) if i != batch_axis % x1.ndim)
        s2 = tuple(d for i, d in enumerate(x2.shape) if i != batch_axis % x2.ndim)
        if x1.ndim != x2.ndim or s1 != s2:
            raise ValueError(
                f"`x1` and `x2` must have the same shape apart from the batch axis {batch_axis}, "
                f"got `x1.shape == {x1.shape}` and `x2.shape == {x2.shape}`."
            )

    batch_axis %= x1.ndim
    diagonal_spatial = bool(diagonal_spatial)
    if batch_axis != 0:
        warnings.warn(
            f"!!! Non-leading (!= 0) batch dimension in the input layer is not supported for "
            f"batching kernels, got batch_axis = {batch_axis}. !!!"
        )
    if channel_axis is None:

        def flatten(x):
            if x is None:
                return x
            return jnp.moveaxis(x, batch_axis, 0).reshape((x.shape[batch_axis], -1))

        x1, x2 = flatten(x1), flatten(x2)
        batch_axis, channel_axis = 0, 1
        diagonal_spatial = False
    else:
        channel_axis %= x1.ndim

    def masked_f(x):
        if x is None:
            return None, None
        m = _get_masked_array(x, mask_constant)
        return m.masked_value.astype(jax.dtypes.canonicalize_dtype(jnp.float64)), m.mask

    x1, mask1 = masked_f(x1)
    x2, mask2 = masked_f(x2)
    cov1, nngp, cov2 = input_cov(
        x1,
        x2,
        diagonal_batch=diagonal_batch,
        diagonal_spatial=diagonal_spatial,
        batch_axis=batch_axis,
        channel_axis=channel_axis,
    )
    ntk = jnp.zeros((), nngp.dtype) if compute_ntk else None
    return Kernel(
        cov1=cov1,
        cov2=cov2,
        nngp=nngp,
        ntk=ntk,
        x1_is_x2=utils.x1_is_x2(x1, x2, eps=eps),
        is_gaussian=False,
        is_reversed=False,
        is_input=False,
        diagonal_batch=diagonal_batch,
        diagonal_spatial=diagonal_spatial,
        shape1=x1.shape,
        shape2=x1.shape if x2 is None else x2.shape,
        batch_axis=batch_axis,
        channel_axis=channel_axis,
        mask1=mask1,
        mask2=mask2,
    )


def _propagate_shape(init_fn, apply_fn, shaped, **kwargs):
    """Output shape(s) of the layer for input ``ShapeDtypeStruct``(s), evaluated abstractly."""

    def init_and_apply(rng, x):
        _, params = init_fn(rng, tree_map(lambda a: a.shape, x))
        return apply_fn(params, x, rng=rng, **kwargs)

    akey = jax.eval_shape(jax.random.PRNGKey, 0)
    try:
        shaped = jax.eval_shape(init_and_apply, akey, shaped)
    except NotImplementedError:
        pass
    if isinstance(shaped, MaskedArray):
        shaped = shaped.masked_value
    return shaped


def _set_shapes(init_fn, apply_fn, in_kernel, out_kernel, **kwargs):
    """Sets ``shape1``/``shape2`` of the output kernel(s) from the layer's ``apply_fn`` shapes."""
    is_k = lambda k: isinstance(k, Kernel)
    shape1 = tree_map(
        lambda k: jax.ShapeDtypeStruct(k.shape1, k.nngp.dtype), in_kernel, is_leaf=is_k
    )
    shape2 = tree_map(
        lambda k: jax.ShapeDtypeStruct(k.shape2, k.nngp.dtype), in_kernel, is_leaf=is_k
    )
    kwargs1, kwargs2 = utils.split_kwargs(kwargs)
    shape1 = _propagate_shape(init_fn, unmask_fn(apply_fn), shape1, **kwargs1)
    shape2 = _propagate_shape(init_fn, unmask_fn(apply_fn), shape2, **kwargs2)
    return tree_map(
        lambda k, s1, s2: k.replace(shape1=s1.shape, shape2=s2.shape),
        out_kernel,
        shape1,
        shape2,
        is_leaf=is_k,
    )


# Below this many entries fusion across layers is cheap and a boundary only adds dispatch cost
# (FC-3 per kernel entry measured ~10% slower with boundaries on 2x2 arrays).
_MATERIALIZE_MIN = 1 << 14


def _materialize(tree):
    """Each layer's output covariances become fusion boundaries (``lax.optimization_barrier``).

    Without it XLA fuses whole networks: a conv's f shifted reads of the previous nonlinearity
    get the arc-cosine recomputed per tap, and consumers duplicate their producers, so the
    cost grows with depth (CNN-GAP-4 at 16x16 ran 8x slower than its layers run one by one).
    Materializing once per layer costs one memory pass and keeps every op's work O(1) per entry.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    idx = [
        i for i, a in enumerate(leaves) if isinstance(a, jax.Array) and a.size >= _MATERIALIZE_MIN
    ]
    if not idx:
        return tree
    kept = lax.optimization_barrier([leaves[i] for i in idx])
    for i, a in zip(idx, kept):
        leaves[i] = a
    return jax.tree_util.tree_unflatten(treedef, leaves)


# Attributes through which layers describe themselves to the fused conv path (ntfast.stax.fused).
FUSED_ATTRS = ("fused_step", "fused_from_inputs", "nonlin_spec", "dense_affine")


def copy_fused_attrs(src: Callable, dst: Callable) -> None:
    """Carries a layer's fused-path description from ``src`` to its wrapper ``dst``."""
    for attr in FUSED_ATTRS:
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))


def _preprocess_kernel_fn(init_fn, apply_fn, kernel_fn) -> Callable:
    """The public ``kernel_fn``: from inputs or ``Kernel``s, with ``get`` and layout options."""
    if not _has_req(kernel_fn):
        src = kernel_fn
        kernel_fn = requires()(kernel_fn)
        copy_fused_attrs(src, kernel_fn)
    fused = getattr(kernel_fn, "fused_from_inputs", None)

    def kernel_fn_kernel(kernel, **kwargs):
        out = _materialize(kernel_fn(kernel, **kwargs))
        return _set_shapes(init_fn, apply_fn, kernel, out, **kwargs)

    def kernel_fn_x1(x1, x2, get, **kwargs):
        reqs = _fuse_requirements(get_req(kernel_fn), _DEFAULT_INPUT_REQ, **kwargs)
        compute_ntk = get is None or "ntk" in get
        if x2 is None:
            x2 = tree_map(lambda _: None, x1)

        def input_fn(a, b):
            return _inputs_to_kernel(a, b, compute_ntk=compute_ntk, **reqs)

        if fused is not None:
            # Conv networks with a spatial readout: fused per offset tile (ntfast.stax.fused).
            out = fused(x1, x2, get, input_fn, kwargs)
            if out is not None:
                shaped = jax.eval_shape(lambda a, b: tree_map(input_fn, a, b), x1, x2)
                return _set_shapes(init_fn, apply_fn, shaped, out, **kwargs)

        kernel = _materialize(tree_map(input_fn, x1, x2))
        out = _materialize(kernel_fn(kernel, **kwargs))
        return _set_shapes(init_fn, apply_fn, kernel, out, **kwargs)

    @utils.get_namedtuple("AnalyticKernel")
    def kernel_fn_any(
        x1_or_kernel,
        x2=None,
        get=None,
        *,
        pattern=None,
        mask_constant=None,
        diagonal_batch=None,
        diagonal_spatial=None,
        backend=None,
        **kwargs,
    ):
        """Kernel of the layer/network applied to ``x1_or_kernel`` (inputs or ``Kernel``s).

        Args:
          x1_or_kernel: an NTTree of input arrays, or of ``Kernel``s (then ``x2`` must be None).
          x2: optional second batch of inputs; ``None`` means ``x2 == x1``.
          get: None (return the ``Kernel``), a name (``"nngp"``, ``"ntk"``, ``"cov1"``, ...;
            return that field), or a tuple of names (return an ``AnalyticKernel`` namedtuple).
          pattern, mask_constant: as in Neural Tangents.
          diagonal_batch, diagonal_spatial: force a layout of intermediate covariances;
            default is the cheapest layout sufficient for the output.
          backend: ``"auto" | "xla" | "triton" | "native"`` for this call (see ntfast.backend).
        """
        with use_backend(backend):
            if _all_of(x1_or_kernel, Kernel) and x2 is None:
                return kernel_fn_kernel(
                    x1_or_kernel,
                    pattern=pattern,
                    diagonal_batch=diagonal_batch,
                    diagonal_spatial=diagonal_spatial,
                    **kwargs,
                )
            if get is not None:
                _check_get(get)
            return kernel_fn_x1(
                x1_or_kernel,
                x2,
                get,
                pattern=pattern,
                diagonal_batch=diagonal_batch,
                diagonal_spatial=diagonal_spatial,
                mask_constant=mask_constant,
                **kwargs,
            )

    _set_req(kernel_fn_any, get_req(kernel_fn))
    copy_fused_attrs(kernel_fn, kernel_fn_any)
    return kernel_fn_any


_KERNEL_FIELDS = tuple(f.name for f in dataclasses.fields(Kernel))


def _check_get(get) -> None:
    """Names in ``get`` must be Kernel fields (its type was checked by ``canonicalize_get``)."""
    for g in (get,) if isinstance(get, str) else get:
        if g not in _KERNEL_FIELDS:
            raise ValueError(
                f"`get` entry {g!r} is not a Kernel field; expected one of {_KERNEL_FIELDS}."
            )


def _all_of(x, cls: type) -> bool:
    is_leaf = lambda a: isinstance(a, (Kernel, jnp.ndarray, np.ndarray))
    return tree_all(tree_map(lambda a: isinstance(a, cls), x, is_leaf=is_leaf))


def get_diagonal(cov, diagonal_batch: bool, diagonal_spatial: bool):
    """The diagonal of ``cov`` over all (sample, spatial) axes: per-sample, per-location
    variances ``(N, H, W, ...)``, whatever the layout ``cov`` is stored in."""
    if cov is None:
        return cov
    batch_ndim = 1 if diagonal_batch else 2
    start = 2 - batch_ndim
    end = batch_ndim if diagonal_spatial else cov.ndim
    cov = utils.unzip_axes(cov, start, end)
    return utils.diagonal_between(cov, start, end)


def get_diagonal_outer_prods(
    cov1,
    cov2,
    diagonal_batch: bool,
    diagonal_spatial: bool,
    operation: Callable,
    axis: Sequence[int] = (),
    mask1=None,
    mask2=None,
):
    """``operation`` outer products of variance maps: ``(prod11, prod12, prod22)``.

    ``prod12[n1, n2, h1, h2, ...] = op(var1[n1, h1, ...], var2[n2, h2, ...])`` in the layout
    of ``nngp``; ``prod11``/``prod22`` in the layout of ``cov1``/``cov2`` (only the batch
    diagonal when ``diagonal_batch``). Variances are first averaged over ``axis`` (masked).
    """
    axis = utils.canonicalize_axis(axis, cov1)
    cov1 = get_diagonal(cov1, diagonal_batch, diagonal_spatial)
    cov2 = get_diagonal(cov2, diagonal_batch, diagonal_spatial)
    cov1, _ = mean_and_var(cov1, axis=axis, keepdims=True, mask=mask1)
    cov2, _ = mean_and_var(cov2, axis=axis, keepdims=True, mask=mask2)
    if cov1 is None:
        raise ValueError("`cov1` is None.")
    end = 1 if diagonal_spatial else cov1.ndim
    prod12 = utils.outer_prod(cov1, cov2, 0, end, operation)
    start = 1 if diagonal_batch else 0
    prod11 = utils.outer_prod(cov1, cov1, start, end, operation)
    prod22 = utils.outer_prod(cov2, cov2, start, end, operation) if cov2 is not None else prod11
    return prod11, prod12, prod22


def mean_and_var(
    x,
    axis=None,
    dtype=None,
    out=None,
    ddof: int = 0,
    keepdims: bool = False,
    mask=None,
    get_var: bool = False,
):
    """``jnp.mean`` (and ``jnp.var`` if ``get_var``) ignoring masked (``True``) entries."""
    if x is None:
        return x, None
    var = None
    if mask is None:
        mean = jnp.mean(x, axis, dtype, out, keepdims)
        if get_var:
            var = jnp.var(x, axis, dtype, out, ddof, keepdims)
        return mean, var
    axis = tuple(utils.canonicalize_axis(axis, x))
    size = utils.size_at(x, axis)
    mask = jnp.broadcast_to(mask, x.shape)
    n_masked = jnp.count_nonzero(mask, axis)
    for i in axis:
        n_masked = jnp.expand_dims(n_masked, i)
    size = jnp.maximum(size - n_masked, 1)
    mean = jnp.sum(x, axis=axis, keepdims=True) / size
    if get_var:
        var = jnp.sum((x - mean) ** 2, axis=axis, keepdims=True) / (size - ddof)
        if not keepdims:
            var = jnp.squeeze(var, axis)
    if not keepdims:
        mean = jnp.squeeze(mean, axis)
    return mean, var
