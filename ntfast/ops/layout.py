"""Layout helpers shared by the XLA references of the hot ops."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def materialized_transpose(x: jax.Array, perm: Sequence[int]) -> jax.Array:
    """``jnp.transpose(x, perm)`` performed once, as a physical copy into row-major order.

    Left alone, XLA's layout assignment turns a big transpose into a non-default physical layout
    that every later op inherits, and fusion re-reads it with strided gathers in each consumer.
    In a whole network (NT's ``is_reversed`` convention flips the stored order of the spatial
    pairs at every conv) the cost then grows with depth: CNN-GAP-4 at 16x16 ran 5x slower than
    its layers run one by one. Routing the result through a 1-D reshape behind an
    ``optimization_barrier`` forces one row-major copy and keeps later ops on contiguous data.
    """
    perm = tuple(int(p) for p in perm)
    if perm == tuple(range(x.ndim)):
        return x
    y = jnp.transpose(x, perm)
    return lax.optimization_barrier(y.reshape(-1)).reshape(y.shape)
