"""Flat numeric encoding of a ``fused_cnn`` plan for compiled backends (C++/CUDA FFI, Triton).

:func:`encode` turns ``(plan, image size)`` into two flat arrays, ``ints`` (int64) and
``floats`` (float64), with every static quantity a kernel needs already resolved (segment grids,
valid sizes after every step, conv pads), so a kernel never re-derives the plan analysis of
:func:`ntfast.ops.fused_cnn.segments`. The same arrays are the XLA FFI attributes ``plan_i`` and
``plan_f`` of the native target ``ntfast_fused_cnn``; ``kernels/common/plan.h`` decodes them.

Layout (version 1)::

    ints[0:4]   = VERSION, n_segments, n_steps, 0
    then per segment (SEG_INTS ints, segments in order):
        Lh, Lw           periodic grid of the packed offset layout (image + zero margin)
        hv_in, wv_in     valid size entering the segment
        circular         1: CIRCULAR convs (grid == image, box filters wrap), else 0
        first_step       index of the segment's first step record
        n_steps          its number of steps
        end              END_POOL | END_GAP | END_GSP | END_FLATTEN
        pool_wh, pool_ww, pool_sh, pool_sw           window / strides  (END_POOL only, else 0)
        pool_padding     PAD_VALID | PAD_SAME | PAD_CIRCULAR          (END_POOL only)
        pool_sum         1: SumPool, 0: AvgPool                       (END_POOL only)
        normalize_edges  AvgPool SAME normalize_edges                  (END_POOL only)
        hv_out, wv_out   valid size after the segment's last step (before the pooling)
    then per step (STEP_INTS ints; steps of all segments in order):
        type             STEP_CONV | STEP_DENSE | STEP_NONLIN
        hv, wv           valid size after the step
        lo_h, fh, lo_w, fw   conv pads: out[i] = 1/f Σ_{a<f} in[(i + a − lo) mod L]  (1, 0 otherwise)
        has_b            the affine step has a bias
        standard         1: standard parameterization (NTK uses ntk_scale), 0: NTK parameterization
        nonlin           NONLIN_* code (STEP_NONLIN only, else -1)
    floats, per step (STEP_FLOATS): w_var, b_var (0 if none), ntk_scale (0 if NTK param),
        p0, p1, p2  nonlinearity parameters (abrelu: a, b; erf: a, b, c; gelu: none)

Math of each step: ``ntfast/ops/fused_cnn.py`` (the XLA reference is the definition).
"""

from __future__ import annotations

import numpy as np

from ntfast.ops import fused_cnn as fc
from ntfast.ops.conv import padding_name

VERSION = 1
HEADER_INTS = 4
SEG_INTS = 17
STEP_INTS = 10
STEP_FLOATS = 6

END_POOL, END_GAP, END_GSP, END_FLATTEN = 0, 1, 2, 3
PAD_VALID, PAD_SAME, PAD_CIRCULAR = 0, 1, 2
STEP_CONV, STEP_DENSE, STEP_NONLIN = 0, 1, 2
NONLIN_ABRELU, NONLIN_ERF, NONLIN_GELU = 0, 1, 2

# Nonlinearity kinds a compiled kernel may implement, with their parameter names (in order).
NONLIN_CODES = {
    "abrelu": (NONLIN_ABRELU, ("a", "b")),
    "erf": (NONLIN_ERF, ("a", "b", "c")),
    "gelu": (NONLIN_GELU, ()),
}
_END = {"GAP": END_GAP, "GSP": END_GSP, "FLATTEN": END_FLATTEN}
_PAD = {"VALID": PAD_VALID, "SAME": PAD_SAME, "CIRCULAR": PAD_CIRCULAR}


def _defaults(kind: str) -> dict:
    """Keyword defaults of the nonlinearity's XLA expectation (e.g. erf's ``a=1, b=1, c=0``)."""
    import inspect

    from ntfast.ops.nonlin import KINDS

    sig = inspect.signature(KINDS[kind][0])
    return {
        k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty
    }


def unsupported_reason(plan, kinds=tuple(NONLIN_CODES)) -> str | None:
    """None if every step of ``plan`` is encodable with nonlinearities among ``kinds``."""
    for s in plan:
        if isinstance(s, fc.NonlinStep):
            if s.kind not in NONLIN_CODES or s.kind not in kinds:
                return f"nonlinearity {s.kind!r} has no compiled fused kernel (have: {list(kinds)})"
            names = NONLIN_CODES[s.kind][1]
            params = dict(s.params)
            if set(params) - set(names):
                return f"nonlinearity {s.kind!r} has parameters {sorted(params)} beyond {names}"
            missing = set(names) - set(params) - set(_defaults(s.kind))
            if missing:
                return f"nonlinearity {s.kind!r} lacks parameters {sorted(missing)}"
    return None


def encode(plan, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(ints, floats)`` of ``plan`` for images of spatial ``size`` (see the module docstring).

    Raises ValueError for a plan :func:`unsupported_reason` rejects or that
    :func:`ntfast.ops.fused_cnn.segments` rejects.
    """
    reason = unsupported_reason(plan)
    if reason is not None:
        raise ValueError(reason)
    segs = fc.segments(plan, tuple(size))
    seg_rows, step_rows, float_rows = [], [], []
    for seg in segs:
        first = len(step_rows)
        for s, hw, pad in zip(seg.steps, seg.sizes, seg.pads):
            ints = [0] * STEP_INTS
            flts = [0.0] * STEP_FLOATS
            ints[1:3] = hw
            ints[3:7] = (0, 1, 0, 1)
            ints[9] = -1
            if isinstance(s, (fc.ConvStep, fc.DenseStep)):
                ints[0] = STEP_CONV if isinstance(s, fc.ConvStep) else STEP_DENSE
                if pad is not None:
                    (lo_h, fh), (lo_w, fw) = pad
                    ints[3:7] = (lo_h, fh, lo_w, fw)
                ints[7] = int(s.b_var is not None)
                ints[8] = int(s.ntk_scale is not None)
                flts[0] = float(s.w_var)
                flts[1] = 0.0 if s.b_var is None else float(s.b_var)
                flts[2] = 0.0 if s.ntk_scale is None else float(s.ntk_scale)
            else:
                code, names = NONLIN_CODES[s.kind]
                ints[0] = STEP_NONLIN
                ints[9] = code
                params = {**_defaults(s.kind), **dict(s.params)}
                for k, name in enumerate(names):
                    flts[3 + k] = float(params[name])
            step_rows.append(ints)
            float_rows.append(flts)
        end = seg.end
        row = [*seg.grid, *seg.size_in, int(seg.circular), first, len(seg.steps)]
        if isinstance(end, fc.PoolStep):
            row += [
                END_POOL,
                *end.window_shape,
                *end.strides,
                _PAD[padding_name(end.padding)],
                int(end.pool_type == "SUM"),
                int(bool(end.normalize_edges)),
            ]
        else:
            row += [_END[end.kind]] + [0] * 7
        row += list(seg.sizes[-1] if seg.sizes else seg.size_in)
        assert len(row) == SEG_INTS
        seg_rows.append(row)
    ints = [VERSION, len(segs), len(step_rows), 0]
    for r in seg_rows:
        ints += r
    for r in step_rows:
        ints += r
    floats = [v for r in float_rows for v in r]
    return np.asarray(ints, np.int64), np.asarray(floats, np.float64)
