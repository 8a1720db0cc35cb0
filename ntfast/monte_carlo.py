"""Monte Carlo estimates of the NNGP and NTK: averages of empirical kernels over random inits.

Same public name, signature and output conventions as Neural Tangents 0.6.5
``neural_tangents.monte_carlo_kernel_fn``; the code is ours.

``K_MC(n) = (1/n) Σ_{s=1..n} K_emp(params_s)``, ``params_s = init_fn(key_s, x1 shapes)``, where
``K_emp`` is :func:`ntfast.empirical.empirical_kernel_fn` of ``apply_fn``. For a network in NT's
parameterization ``K_MC`` converges to the analytic (infinite-width) kernel as the width and ``n``
grow. The sample keys follow NT's scheme (``key, key_s = split(key)`` per sample, then
``init_key, dropout_key = split(key_s)``), so the same ``key`` draws the same networks as NT.

The returned function is jitted internally (no need to ``jax.jit`` it or ``apply_fn``) and can
compute each sample in blocks of ``x1`` × ``x2`` rows (``batch_size``) and across devices
(``device_count``: rows of ``x1`` are sharded, ``x2`` and the parameters replicated).
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Callable, Generator, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, random
from jax.sharding import Mesh, PartitionSpec
from jax.tree_util import tree_leaves, tree_map

from . import _utils as utils
from .empirical import (
    _DEFAULT_NTK_FWD,
    _DEFAULT_NTK_J_RULES,
    _DEFAULT_NTK_S_RULES,
    DEFAULT_NTK_IMPLEMENTATION,
    NtkImplementation,
    empirical_kernel_fn,
)
from .typing import ApplyFn, Axes, InitFn, MonteCarloKernelFn, PyTree, VMapAxes

__all__ = ["monte_carlo_kernel_fn"]

_SHARD_AXIS = "x1_rows"


# ------------------------------------------------------------------------------------------------
# Argument checks.


def _canonicalize_n_samples(n_samples: int | Iterable[int]) -> tuple[set[int], bool]:
    """``(sizes at which to report, whether to return a generator)``, as NT."""
    if isinstance(n_samples, numbers.Integral) and not isinstance(n_samples, bool):
        sizes, as_generator = {int(n_samples)}, False
    elif hasattr(n_samples, "__iter__") and not isinstance(n_samples, (str, bytes)):
        sizes, as_generator = set(n_samples), True
        if not sizes:
            raise ValueError("`n_samples` must not be empty.")
        if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in sizes):
            raise ValueError(f"`n_samples` must contain only integers, got {sizes}.")
        sizes = {int(n) for n in sizes}
    else:
        raise TypeError(
            f"`n_samples` must be either an integer or an iterable of integers, got "
            f"{type(n_samples)}."
        )
    if any(n <= 0 for n in sizes):
        raise ValueError(f"`n_samples` must be positive, got {sorted(sizes)}.")
    return sizes, as_generator


def _check_key(key: Any) -> None:
    """A single PRNG key: a typed key of shape ``()`` or a raw uint32 key (``(2,)`` threefry)."""
    if not utils.is_array(key):
        raise TypeError(f"`key` must be a PRNG key (jax.random.key or PRNGKey), got {type(key)}.")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"`key` must be a single PRNG key, got shape {key.shape}.")
    elif key.dtype != jnp.uint32 or key.ndim != 1:
        raise ValueError(
            f"`key` must be a single PRNG key (e.g. uint32 of shape (2,)), got {key.dtype} of "
            f"shape {key.shape}."
        )


def _resolve_device_count(device_count: int) -> int:
    """Number of devices to shard ``x1`` rows over (1: no sharding)."""
    if not isinstance(device_count, numbers.Integral) or device_count < -1:
        raise ValueError(f"`device_count` must be an integer >= -1, got {device_count!r}.")
    available = jax.local_device_count()
    if device_count == -1:
        return available
    if device_count > available:
        raise ValueError(
            f"`device_count={device_count}` exceeds the {available} local device(s) available."
        )
    return max(int(device_count), 1)


# ------------------------------------------------------------------------------------------------
# One sample, jitted, optionally in blocks and across devices.


def _is_array_tree(v: Any) -> bool:
    leaves = tree_leaves(v)
    return bool(leaves) and all(utils.is_array(leaf) for leaf in leaves)


def _static_cache_key(static: dict[str, Any]) -> tuple:
    """Hashable key for non-array kwargs; unhashable values are keyed by identity."""
    items = []
    for k, v in sorted(static.items()):
        try:
            hash(v)
            items.append((k, v))
        except TypeError:
            items.append((k, ("id", id(v))))
    return tuple(items)


def _leading_size(tree: PyTree, name: str) -> int:
    leaves = tree_leaves(tree)
    if not leaves:
        raise ValueError(f"`{name}` has no arrays.")
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"Batching needs all arrays of `{name}` to share a leading batch axis, got shapes "
            f"{[leaf.shape for leaf in leaves]}."
        )
    return sizes.pop()


def _block_sizes(n1: int, n2: int, batch_size: int, n_devices: int) -> tuple[int, int]:
    """Rows of ``x1`` and ``x2`` per block (NT's rule): ``x2`` blocks of ``b``, ``x1`` blocks of
    ``b · n_devices``; ``b`` is ``batch_size`` reduced (with a warning) to fit both inputs."""
    if not batch_size:
        if n1 % n_devices and n1 > n_devices:
            raise ValueError(
                f"`x1` has {n1} rows, which is not divisible by the {n_devices} devices used "
                f"(`device_count`)."
            )
        return n1, n2
    largest = math.gcd(n1, n2) // n_devices
    if largest < 1:
        raise ValueError(
            f"Cannot split {n1} x {n2} rows into blocks over {n_devices} devices; use a smaller "
            f"`device_count` or more rows."
        )
    b = min(batch_size, largest)
    if b != batch_size:
        warnings.warn(
            f"Batch size is reduced from requested {batch_size} to effective {b} to fit the "
            f"dataset ({n1} x {n2} rows over {n_devices} device(s))."
        )
    if n1 % (b * n_devices):
        raise ValueError(
            f"`x1` has {n1} rows, not divisible by the block size {b * n_devices} "
            f"(`batch_size` {b} x {n_devices} device(s))."
        )
    if n2 % b:
        raise ValueError(f"`x2` has {n2} rows, not divisible by `batch_size` {b}.")
    return b * n_devices, b


class _SampleOnce:
    """``(x1, x2, key, get, **kwargs) -> one empirical kernel`` of a freshly initialized network,
    jitted, computed in ``x1`` × ``x2`` blocks and/or across devices when asked.

    Blocks / devices need kernels whose two leading axes are the ``x1`` and ``x2`` batch axes,
    i.e. output axis 0 neither traced nor diagonal (checked).
    """

    def __init__(
        self,
        init_fn: InitFn,
        apply_fn: ApplyFn,
        kernel_fn: Callable,
        trace_axes: Axes,
        diagonal_axes: Axes,
        batch_size: int,
        device_count: int,
        store_on_device: bool,
    ):
        self.init_fn = init_fn
        self.apply_fn = apply_fn
        self.kernel_fn = kernel_fn
        self.trace_axes = trace_axes
        self.diagonal_axes = diagonal_axes
        self.batch_size = batch_size
        self.device_count = device_count
        self.store_on_device = store_on_device
        self._cache: dict[tuple, Callable] = {}
        self._keep_alive: list[Any] = []  # static kwargs keyed by id() in `_cache` stay alive
        self._checked: set[tuple] = set()

    def _sample(self, x1, x2, key, get, kwargs):
        init_key, dropout_key = random.split(key)
        shapes = tree_map(lambda x: x.shape, x1)
        _, params = self.init_fn(init_key, shapes)
        return self.kernel_fn(x1, x2, get, params, rng=dropout_key, **kwargs)

    def _compiled(self, get, static: dict[str, Any], n_devices: int, blocks=None) -> Callable:
        """Jitted ``(x1, x2, key, pairs1, pairs2, shared, i, j) -> kernel``.

        ``blocks=(b1, b2)``: the kernel of rows ``i : i + b1`` of ``x1`` (and of the ``pairs1``
        halves) against rows ``j : j + b2`` of ``x2``, sliced inside the program so that every
        block reuses one compilation. ``n_devices > 1``: the ``x1`` rows are sharded.
        """
        cache_key = (get, _static_cache_key(static), n_devices, blocks)
        fn = self._cache.get(cache_key)
        if fn is not None:
            return fn
        self._keep_alive.append(static)

        def sample(x1, x2, key, pairs1, pairs2, shared):
            kwargs = {**static, **shared, **{k: (pairs1[k], pairs2[k]) for k in pairs1}}
            return self._sample(x1, x2, key, get, kwargs)

        if n_devices > 1:
            mesh = Mesh(np.asarray(jax.local_devices()[:n_devices]), (_SHARD_AXIS,))
            rows, whole = PartitionSpec(_SHARD_AXIS), PartitionSpec()
            sample = jax.shard_map(
                sample,
                mesh=mesh,
                in_specs=(rows, whole, whole, rows, whole, whole),
                out_specs=rows,
                check_vma=False,
            )

        def run(x1, x2, key, pairs1, pairs2, shared, i, j):
            if blocks is not None:
                b1, b2 = blocks

                def take(tree, start, size):
                    return tree_map(lambda x: lax.dynamic_slice_in_dim(x, start, size), tree)

                x1, pairs1 = take(x1, i, b1), take(pairs1, i, b1)
                x2, pairs2 = take(x2, j, b2), take(pairs2, j, b2)
            return sample(x1, x2, key, pairs1, pairs2, shared)

        fn = self._cache[cache_key] = jax.jit(run)
        return fn

    def _check_batch_axis_free(self, x1, key, pairs1, shared, static) -> None:
        kwargs = {**static, **shared, **pairs1}

        def forward(k):
            _, params = self.init_fn(k, tree_map(lambda x: x.shape, x1))
            return self.apply_fn(params, x1, rng=k, **kwargs)

        for fx in tree_leaves(jax.eval_shape(forward, key)):
            axes = set(utils.canonicalize_axis(self.trace_axes, fx.ndim))
            axes |= set(utils.canonicalize_axis(self.diagonal_axes, fx.ndim))
            if 0 in axes:
                raise ValueError(
                    "`batch_size` > 0 or several devices need the output batch axis 0 to be "
                    "neither in `trace_axes` nor in `diagonal_axes`; use batch_size=0 and "
                    "device_count=0 for such kernels."
                )

    def __call__(self, x1, x2, key, get, **kwargs):
        pairs1, pairs2, shared, static = {}, {}, {}, {}
        for k, v in kwargs.items():
            if isinstance(v, tuple) and len(v) == 2 and _is_array_tree(v):
                pairs1[k], pairs2[k] = v
            elif _is_array_tree(v):
                shared[k] = v
            else:
                static[k] = v

        n_devices = _resolve_device_count(self.device_count)
        if not self.batch_size and n_devices == 1:
            fn = self._compiled(get, static, 1)
            return fn(x1, x2, key, pairs1, pairs2, shared, 0, 0)

        if utils.all_none(x2):
            # As NT's batching: blocks need explicit x2 rows.
            x2, pairs2 = x1, dict(pairs1)
        n1, n2 = _leading_size(x1, "x1"), _leading_size(x2, "x2")
        n_devices = min(n_devices, n1)
        b1, b2 = _block_sizes(n1, n2, self.batch_size, n_devices)
        signature = (
            jax.tree_util.tree_structure(x1),
            tuple(leaf.shape for leaf in tree_leaves(x1)),
            _static_cache_key(static),
        )
        if signature not in self._checked:
            # Once per input signature: tracing the network costs as much as a small sample.
            self._check_batch_axis_free(x1, key, pairs1, shared, static)
            self._checked.add(signature)
        fn = self._compiled(get, static, n_devices, (b1, b2))

        block_rows = []
        for i in range(0, n1, b1):
            block_cols = []
            for j in range(0, n2, b2):
                block = fn(x1, x2, key, pairs1, pairs2, shared, i, j)
                if not self.store_on_device:
                    block = jax.device_put(block, jax.devices("cpu")[0])
                block_cols.append(block)
            block_rows.append(tree_map(lambda *bs: jnp.concatenate(bs, axis=1), *block_cols))
        return tree_map(lambda *bs: jnp.concatenate(bs, axis=0), *block_rows)


# ------------------------------------------------------------------------------------------------
# Public entry point.


def monte_carlo_kernel_fn(
    init_fn: InitFn,
    apply_fn: ApplyFn,
    key: jax.Array,
    n_samples: int | Iterable[int],
    batch_size: int = 0,
    device_count: int = -1,
    store_on_device: bool = True,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes | None = None,
    implementation: int | NtkImplementation = DEFAULT_NTK_IMPLEMENTATION,
    _j_rules: bool = _DEFAULT_NTK_J_RULES,
    _s_rules: bool = _DEFAULT_NTK_S_RULES,
    _fwd: bool | None = _DEFAULT_NTK_FWD,
    *,
    progress: bool = False,
) -> MonteCarloKernelFn:
    """Returns a Monte Carlo estimator ``kernel_fn(x1, x2, get=None, **apply_fn_kwargs)``.

    The estimate with ``n`` samples is ``(1/n) Σ_s K_emp(x1, x2; params_s)``, each
    ``params_s = init_fn(key_s, x1 shapes)`` and ``K_emp`` the empirical NNGP / NTK of ``apply_fn``
    (same shapes and ``get`` conventions as :func:`ntfast.empirical.empirical_kernel_fn`; a tuple
    ``get`` gives a ``MonteCarloKernel`` namedtuple, ``get=None`` an ``EmpiricalKernel`` one).

    Args:
      init_fn: ``init_fn(key, input_shape) -> (output_shape, params)``.
      apply_fn: ``apply_fn(params, x, **kwargs)``; receives ``rng=`` (a dropout key) too.
      key: PRNG key the networks are drawn from; the same key gives the same estimates.
      n_samples: an int: ``kernel_fn`` returns the estimate with that many samples. An iterable
        of ints: ``kernel_fn`` returns a generator of the running estimates at those counts
        (ascending), computing ``max(n_samples)`` samples in total.
      batch_size: compute each sample in blocks of ``batch_size`` rows of ``x2`` (and
        ``batch_size · devices`` rows of ``x1``); ``0``: in one piece. Must divide the row counts
        (it is reduced, with a warning, to ``gcd(n1, n2) / devices`` if larger).
      device_count: devices to shard ``x1`` rows over; ``-1`` all local devices, ``0`` none.
      store_on_device: if False, blocks are moved to host memory as they are computed (only when
        computing in blocks).
      trace_axes, diagonal_axes, vmap_axes, implementation: as in
        :func:`ntfast.empirical.empirical_kernel_fn`. Every ``implementation`` computes the
        Jacobian contraction here. ``_j_rules``, ``_s_rules``, ``_fwd``: ignored (NT debugging).
      progress: keyword-only (not in NT): show a tqdm progress bar over samples. Off by default.

    Raises:
      TypeError / ValueError: malformed ``n_samples``, ``key``, ``batch_size``, ``device_count``;
        ``rng`` passed to ``kernel_fn``; rows not divisible by the block size.
    """
    sizes, as_generator = _canonicalize_n_samples(n_samples)
    _check_key(key)
    if not isinstance(batch_size, numbers.Integral) or batch_size < 0:
        raise ValueError(f"`batch_size` must be a non-negative integer, got {batch_size!r}.")
    _resolve_device_count(device_count)

    kernel_fn = empirical_kernel_fn(
        apply_fn, trace_axes, diagonal_axes, vmap_axes, implementation, _j_rules, _s_rules, _fwd
    )
    sample_once = _SampleOnce(
        init_fn,
        apply_fn,
        kernel_fn,
        trace_axes,
        diagonal_axes,
        int(batch_size),
        device_count,
        store_on_device,
    )
    n_max = max(sizes)

    def running_sums(x1, x2, get, kwargs) -> Generator[tuple[int, PyTree], None, None]:
        # Samples are computed for the sorted set of names: every spelling of the same request
        # (None, "ntk" vs ("ntk",), any order) shares one compilation; `get_namedtuple` then
        # selects and orders the fields as asked. None keeps NT's EmpiricalKernel(nngp, ntk).
        get = ("nngp", "ntk") if get is None else tuple(sorted(get))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_max, desc="monte_carlo_kernel_fn", unit="sample")
        sample_key, total = key, None
        try:
            for n in range(1, n_max + 1):
                sample_key, subkey = random.split(sample_key)
                sample = sample_once(x1, x2, subkey, get, **kwargs)
                total = sample if total is None else tree_map(operator.add, total, sample)
                if bar is not None:
                    bar.update(1)
                yield n, total
        finally:
            if bar is not None:
                bar.close()

    def mean(total: PyTree, n: int) -> PyTree:
        return tree_map(lambda t: t / n, total)

    def check_call(get, kwargs) -> None:
        # Here, not in `running_sums`, so that a generator fails at the call, not at `next`.
        unknown = [g for g in (get or ()) if g not in ("nngp", "ntk")]
        if unknown:
            raise ValueError(f"`get` entries must be among ('nngp', 'ntk'), got {unknown}.")
        if "rng" in kwargs:
            raise ValueError(
                "Do not pass `rng` to a Monte Carlo kernel function: dropout keys are drawn "
                "from its `key`."
            )

    if as_generator:

        @utils.get_namedtuple("MonteCarloKernel")
        def mc_kernel_fn(x1: PyTree, x2: PyTree | None, get: Any = None, **apply_fn_kwargs):
            check_call(get, apply_fn_kwargs)
            return (
                mean(total, n)
                for n, total in running_sums(x1, x2, get, apply_fn_kwargs)
                if n in sizes
            )

    else:

        @utils.get_namedtuple("MonteCarloKernel")
        def mc_kernel_fn(x1: PyTree, x2: PyTree | None, get: Any = None, **apply_fn_kwargs):
            check_call(get, apply_fn_kwargs)
            for n, total in running_sums(x1, x2, get, apply_fn_kwargs):
                pass
            return mean(total, n)

    return mc_kernel_fn
