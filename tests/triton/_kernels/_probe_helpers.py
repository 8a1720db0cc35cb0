"""A jitted helper imported relatively by probe.py (both copies must resolve it in their own copy).

The interpreter insists that every module defining a ``@triton.jit`` function has
``triton.language`` in its globals, even one that does not use it.
"""

import triton
import triton.language as tl  # noqa: F401 - required by the interpreter (see above)


@triton.jit
def twice(y):
    return y + y
