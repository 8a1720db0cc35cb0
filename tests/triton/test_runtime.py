"""ntfast/_triton/runtime.py: kernel loading, launch (interpreter on CPU, jax-triton on cuda),
transformations (jit, grad, jvp, vmap), the canary guard and the once-per-process warning.

Uses the probe kernels in tests/triton/_kernels (put on the kernel path by conftest.py).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

triton = pytest.importorskip("triton", reason="needs triton: pip install 'triton>=3.7,<3.10'")

from ntfast._triton import runtime
from ntfast.backend import BackendError

BLOCK = 16


def scale_add(x, y, *, c=1.5):
    """c·x + 2·y through the probe kernel."""
    return runtime.launch(
        "probe",
        "scale_add_kernel",
        x,
        y,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(-(-x.size // BLOCK),),
        name="ntfast_probe_scale_add",
        n=x.size,
        c=c,
        BLOCK=BLOCK,
    )


def scale_add_ref(x, y, *, c=1.5):
    return c * x + 2 * y


def _xy(n, dtype, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return (jax.random.normal(k1, (n,), dtype), jax.random.normal(k2, (n,), dtype))


# -- kernel sources ------------------------------------------------------------------------------


def test_kernels_two_copies_with_their_own_helpers():
    compiled = runtime.kernels("probe", interpret=False)
    interp = runtime.kernels("probe", interpret=True)
    assert compiled is not interp
    assert compiled is runtime.kernels("probe", interpret=False)  # imported once
    assert type(compiled.scale_add_kernel).__name__ == "JITFunction"
    assert type(interp.scale_add_kernel).__name__ == "InterpretedFunction"
    # The relative import resolved inside each copy, with the matching decorator.
    assert type(compiled.twice).__name__ == "JITFunction"
    assert type(interp.twice).__name__ == "InterpretedFunction"
    assert not triton.knobs.runtime.interpret  # the knob was scoped to the import


def test_kernels_dir_is_the_source_tree_or_installed_copy():
    d = runtime.kernels_dir()
    assert d.name == "triton" and d.parent.name in ("kernels", "_kernels")
    assert runtime.kernels_path()[-1] == d
    assert any(p.name == "_kernels" and p.parent.name == "triton" for p in runtime.kernels_path())


def test_kernels_bad_names():
    with pytest.raises(FileNotFoundError, match="no_such_op.py"):
        runtime.kernels("no_such_op", interpret=True)
    with pytest.raises(ValueError, match="op"):
        runtime.kernels("../probe", interpret=True)
    with pytest.raises(AttributeError, match="no kernel 'missing_kernel'"):
        runtime._kernel_fn("probe", "missing_kernel", interpret=True)


# -- launch in the interpreter -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("n", [1, 37, 64])
def test_launch_numerics_guarded(dtype, n):
    x, y = _xy(n, dtype)
    with runtime.canary_guard() as violations:
        eager = scale_add(x, y).block_until_ready()
        jitted = jax.jit(scale_add)(x, y).block_until_ready()
    assert violations == []
    assert eager.dtype == dtype and eager.shape == (n,)
    want = np.asarray(scale_add_ref(x, y))
    rtol = 1e-15 if dtype == jnp.float64 else 1e-6
    np.testing.assert_allclose(eager, want, rtol=rtol, atol=rtol)
    np.testing.assert_array_equal(eager, jitted)


def test_launch_two_outputs_zero_initialised_and_grid_callable():
    x = jnp.arange(1.0, 38.0, dtype=jnp.float64)

    def f(x):
        return runtime.launch(
            "probe",
            "two_outputs_kernel",
            x,
            out_shape=[jax.ShapeDtypeStruct((1,), x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype)],
            grid=lambda meta: (-(-meta["n"] // meta["BLOCK"]),),
            name="ntfast_probe_two_outputs",
            n=x.size,
            BLOCK=8,
        )

    with runtime.canary_guard() as violations:
        total, sq = jax.jit(f)(x)
        total.block_until_ready()
    assert violations == []
    # Five programs add into `total` atomically: right only if the output started at zero.
    np.testing.assert_allclose(total, [x.sum()], rtol=1e-15)
    np.testing.assert_allclose(sq, x * x, rtol=1e-15)


def test_canary_guard_catches_out_of_bounds_writes():
    x = jnp.arange(10.0, dtype=jnp.float32)  # 10 % 8 != 0: the unmasked kernel runs past the end

    def f(x):
        return runtime.launch(
            "probe",
            "unmasked_kernel",
            x,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            grid=(2,),
            name="ntfast_probe_unmasked",
            n=x.size,
            BLOCK=8,
        )

    with (
        runtime.canary_guard(pad=64) as violations,
        pytest.raises(Exception, match="wrote out of bounds"),
    ):
        jax.jit(f)(x).block_until_ready()
    assert len(violations) == 1 and "output 0" in violations[0]
    assert "ntfast_probe_unmasked" in violations[0]
    # In bounds (10 -> 16 entries, 2 full blocks) the same kernel passes the guard.
    x16 = jnp.arange(16.0, dtype=jnp.float32)
    with runtime.canary_guard() as violations:
        np.testing.assert_array_equal(jax.jit(f)(x16).block_until_ready(), x16)
    assert violations == []


def test_interpreter_warns_once_per_process(monkeypatch):
    monkeypatch.setattr(runtime, "_warned", [False])
    x, y = _xy(5, jnp.float32)
    with pytest.warns(RuntimeWarning, match="Triton interpreter"):
        scale_add(x, y).block_until_ready()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        scale_add(x, y).block_until_ready()
    assert not [w for w in seen if "Triton interpreter" in str(w.message)]


def test_launch_checks_its_name_and_kernel_parameters():
    x, y = _xy(3, jnp.float32)
    with pytest.raises(ValueError, match="ntfast_probe_"):
        runtime.launch(
            "probe",
            "scale_add_kernel",
            x,
            y,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            grid=(1,),
            name="scale_add",
            n=3,
            c=1.0,
            BLOCK=BLOCK,
        )
    with pytest.raises(TypeError, match=r"no parameter\(s\) \['C'\]"):
        runtime.launch(
            "probe",
            "scale_add_kernel",
            x,
            y,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            grid=(1,),
            name="ntfast_probe_scale_add",
            n=3,
            C=1.0,
            BLOCK=BLOCK,
        )


# -- differentiable: grad, jvp, vmap -------------------------------------------------------------

f_diff = runtime.differentiable(scale_add, scale_add_ref)


def test_differentiable_grad_and_jvp_follow_the_reference():
    x, y = _xy(11, jnp.float64)
    loss = lambda x, y: jnp.sum(jnp.sin(f_diff(x, y)))
    ref_loss = lambda x, y: jnp.sum(jnp.sin(scale_add_ref(x, y)))
    for got, want in zip(jax.grad(loss, (0, 1))(x, y), jax.grad(ref_loss, (0, 1))(x, y)):
        np.testing.assert_allclose(got, want, rtol=1e-13)
    out, tan = jax.jit(lambda x, y: jax.jvp(f_diff, (x, y), (y, x)))(x, y)
    np.testing.assert_allclose(out, scale_add_ref(x, y), rtol=1e-14)
    np.testing.assert_allclose(tan, scale_add_ref(y, x), rtol=1e-14)


def test_differentiable_vmap_default_rule():
    x, y = _xy(7, jnp.float64)
    xs, ys = jnp.stack([x, 2 * x, -x]), jnp.stack([y, y, 3 * y])
    want = scale_add_ref(xs, ys)
    np.testing.assert_allclose(jax.vmap(f_diff)(xs, ys), want, rtol=1e-14)
    np.testing.assert_allclose(
        jax.vmap(f_diff, (0, None))(xs, y), scale_add_ref(xs, y[None]), rtol=1e-14
    )
    np.testing.assert_allclose(
        jax.vmap(f_diff, (1, None), 1)(xs.T, y), scale_add_ref(xs, y[None]).T, rtol=1e-14
    )
    # Nested vmap and vmap of grad under jit.
    nested = jax.vmap(jax.vmap(f_diff, (0, None)), (None, 0))(xs, ys)
    np.testing.assert_allclose(nested, scale_add_ref(xs[None], ys[:, None]), rtol=1e-14)
    g = jax.jit(jax.vmap(jax.grad(lambda x, y: jnp.sum(f_diff(x, y) ** 2))))(xs, ys)
    np.testing.assert_allclose(g, 2 * scale_add_ref(xs, ys) * 1.5, rtol=1e-13)


def test_differentiable_custom_batch_rule_and_none_passthrough():
    calls = []

    def impl(x, y, z):
        assert z is None
        return scale_add(x, y)

    def ref(x, y, z):
        assert z is None
        return scale_add_ref(x, y)

    def rule(axis_size, in_batched, x, y, z):
        # Fold the batch into the kernel's 1-D grid: one launch for the whole batch.
        calls.append((axis_size, tuple(in_batched)))
        assert z is None and in_batched[2] is False
        x = x if in_batched[0] else jnp.broadcast_to(x, (axis_size, *x.shape))
        y = y if in_batched[1] else jnp.broadcast_to(y, (axis_size, *y.shape))
        return scale_add(x.reshape(-1), y.reshape(-1)).reshape(x.shape), True

    f = runtime.differentiable(impl, ref, batch_rule=rule)
    x, y = _xy(6, jnp.float32)
    xs = jnp.stack([x, -x])
    got = jax.jit(jax.vmap(f, (0, None, None)))(xs, y, None)
    assert calls == [(2, (True, False, False))]
    np.testing.assert_allclose(got, scale_add_ref(xs, y[None]), rtol=1e-6)
    gx = jax.grad(lambda x: jnp.sum(f(x, y, None)))(x)
    np.testing.assert_allclose(gx, jnp.full_like(x, 1.5))


def test_differentiable_keeps_static_args_bound_with_partial():
    f = runtime.differentiable(
        functools.partial(scale_add, c=-0.5), functools.partial(scale_add_ref, c=-0.5)
    )
    x, y = _xy(9, jnp.float64)
    np.testing.assert_allclose(f(x, y), -0.5 * x + 2 * y, rtol=1e-14)
    np.testing.assert_allclose(jax.grad(lambda x: f(x, y).sum())(x), jnp.full_like(x, -0.5))


# -- cuda lowering ---------------------------------------------------------------------------------


def test_cpu_lowering_never_needs_jax_triton():
    x, y = _xy(5, jnp.float32)
    text = jax.jit(scale_add).trace(x, y).lower(lowering_platforms=("cpu",)).as_text()
    assert "triton_kernel_call" not in text and "callback" in text


def test_cuda_lowering_carries_our_name_or_fails_clearly():
    x, y = _xy(33, jnp.float32)
    reason = runtime.jax_triton_unavailable_reason()
    if reason is not None:
        # jax 0.10 (no jax-triton): only an actual cuda lowering fails, naming what is missing.
        with pytest.raises(BackendError, match="jax-triton"):
            jax.jit(scale_add).trace(x, y).lower(lowering_platforms=("cuda",))
        return
    lowered = jax.jit(scale_add).trace(x, y).lower(lowering_platforms=("cuda",))
    assert runtime.kernel_call_names(lowered) == ["ntfast_probe_scale_add"]

    # jit runs dead-code elimination through the launch (jax-triton's rule, patched for jax 0.12);
    # with one of two outputs unused the launch stays, whole.
    def half_used(x):
        _total, sq = runtime.launch(
            "probe",
            "two_outputs_kernel",
            x,
            out_shape=[jax.ShapeDtypeStruct((1,), x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype)],
            grid=(3,),
            name="ntfast_probe_two_outputs",
            n=x.size,
            BLOCK=BLOCK,
        )
        return sq + 1

    lowered = jax.jit(half_used).trace(x).lower(lowering_platforms=("cuda",))
    assert runtime.kernel_call_names(lowered) == ["ntfast_probe_two_outputs"]
    # Under grad and vmap the launch stays (the map rule runs it in a loop body).
    g = jax.jit(jax.vmap(jax.grad(lambda x, y: jnp.sum(f_diff(x, y) ** 2))))
    lowered = g.trace(jnp.stack([x, x]), jnp.stack([y, y])).lower(lowering_platforms=("cuda",))
    assert runtime.kernel_call_names(lowered) == ["ntfast_probe_scale_add"]


def test_compile_specialization_of_a_probe_kernel():
    spec = {
        "op": "probe",
        "kernel": "scale_add_kernel",
        "signature": {
            "x_ptr": "*fp64",
            "y_ptr": "*fp64",
            "out_ptr": "*fp64",
            "n": "i32",
            "c": "fp64",
        },
        "constexprs": {"BLOCK": 128},
    }
    compiled = runtime.compile_specialization(spec, 80)
    assert ".target sm_80" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0
    with pytest.raises(ValueError, match="lacks types"):
        runtime.compile_specialization({**spec, "signature": {"x_ptr": "*fp64"}}, 80)
