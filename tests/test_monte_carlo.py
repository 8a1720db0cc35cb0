"""ntfast.monte_carlo_kernel_fn: convergence to the analytic kernels, NT's sampling scheme, API.

Truth for convergence: the analytic (infinite-width) NNGP / NTK of the same architecture, from
Neural Tangents' stax (the oracle) and, for ntfast.stax networks, from ntfast's own kernel_fn.
Truth for the sampling scheme: ntfast.empirical_kernel_fn (tested against explicit Jacobians in
``test_empirical.py``) on parameters drawn with NT's key splitting.
"""

import os
import subprocess
import sys
import textwrap
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nt_oracle import load_nt_stax

import ntfast
from ntfast.empirical import NtkImplementation

nt_stax = load_nt_stax()

try:
    import ntfast.stax as ntfast_stax
except ImportError:  # the lead's framework; every layer used here is part of its contract
    ntfast_stax = None

LIBS = ["nt", "ntfast"]


def _stax(lib):
    if lib == "nt":
        return nt_stax
    if ntfast_stax is None:
        pytest.skip("ntfast.stax does not import yet; un-skips when `import ntfast.stax` works")
    return ntfast_stax


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _rel_err(estimate, exact):
    """max |estimate − exact| / max |exact| over all kernel entries."""
    estimate, exact = np.asarray(estimate), np.asarray(exact)
    assert estimate.shape == exact.shape, (estimate.shape, exact.shape)
    return float(np.max(np.abs(estimate - exact)) / np.max(np.abs(exact)))


# ------------------------------------------------------------------------------------------------
# Convergence to the analytic kernels.

WIDTH = 512
STD = {"W_std": 1.5, "b_std": 0.1}


def _mlp(stax, width, readout):
    return stax.serial(
        stax.Dense(width, **STD),
        stax.Relu(),
        stax.Dense(width, **STD),
        stax.Relu(),
        stax.Dense(readout, **STD),
    )


def _cnn(stax, width, readout, pool, filter_shape):
    return stax.serial(
        stax.Conv(width, (3, 3), padding="SAME", **STD),
        stax.Relu(),
        stax.Conv(width, filter_shape, padding="SAME", **STD),
        stax.Relu(),
        pool(),
        stax.Dense(readout, **STD),
    )


def _arch(name, stax, width, readout):
    if name == "mlp":
        return _mlp(stax, width, readout)
    if name == "cnn":
        return _cnn(stax, width, readout, stax.Flatten, (2, 2))
    # A 1x1 second layer keeps the parameter draw per sample 4x cheaper.
    return _cnn(stax, width, readout, stax.GlobalAvgPool, (1, 1))


def _inputs(name):
    shape = (8,) if name == "mlp" else (4, 5, 2)
    return _normal(1, (3, *shape)), _normal(2, (2, *shape))


# Readout widths. The NNGP of a readout of width k is an average of k products, so its sampling
# noise falls like 1/sqrt(k): a wide readout makes it converge in few samples, at the cost of one
# forward pass. The NTK averages over all parameters and is accurate with k = 1, while its
# Jacobian costs k backward passes: k = 1. (The analytic kernels do not depend on k.)
# The Flatten CNN's readout is narrower only to keep its parameter draw cheap.
NNGP_READOUT = {"mlp": 512, "cnn": 64, "cnn_gap": 512}
N_SAMPLES = {"mlp": 64, "cnn": 32, "cnn_gap": 32}  # MLP samples are cheap; its NTK is noisier
# Bound: the estimate's error is sampling noise ~ c / sqrt(n_samples) (no bias is visible: with
# 300 samples of the width-512 MLP every NTK entry is within 1 standard error of the analytic
# value; finite-width bias is O(1/width)). Per sample, these kernels deviate by ≈ 10-30 %
# (MLP NTK with one readout: 13-16 % per entry), so 32-64 samples give a few percent; measured
# with this key: 0.012-0.051 (identical for NT's and ntfast's stax, which draw the same networks).
# 0.1 leaves a 2x margin over the worst case while catching O(1) mistakes (wrong scale of the
# parameterization, a lost layer or nonlinearity). It is a sanity bound: the exactness of the
# empirical kernels is tested in test_empirical.py, the analytic kernels by the parity tests.
BOUND = 0.1


@pytest.mark.parametrize("arch", ["mlp", "cnn", "cnn_gap"])
@pytest.mark.parametrize("lib", LIBS)
def test_converges_to_analytic_kernel(lib, arch):
    stax = _stax(lib)
    x1, x2 = _inputs(arch)
    key = jax.random.PRNGKey(0)
    exact = None
    errors = {}
    for get, readout in (("nngp", NNGP_READOUT[arch]), ("ntk", 1)):
        init_fn, apply_fn, kernel_fn = _arch(arch, stax, WIDTH, readout)
        if exact is None:
            exact = jax.jit(kernel_fn, static_argnames="get")(x1, x2, get=("nngp", "ntk"))
        mc_fn = ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, N_SAMPLES[arch], vmap_axes=0)
        errors[get] = _rel_err(mc_fn(x1, x2, get), getattr(exact, get))
    assert max(errors.values()) < BOUND, errors

    if arch == "mlp":
        # The error shrinks as width and samples grow. Compare with single samples of a width-32
        # net: 8 independent ones, read off the running means (s_n = n·m_n − (n−1)·m_{n−1}) so
        # that one compiled sampler serves. Sampling noise ∝ 1/sqrt(width · n_samples) predicts
        # a ratio of ~20 between their mean error and the wide estimate's; we ask for 3.
        init_fn, apply_fn, _ = _arch(arch, stax, 32, 1)
        counts = list(range(1, 9))
        mc_fn = ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, counts, vmap_axes=0)
        means = [np.asarray(m) for m in mc_fn(x1, x2, "ntk")]
        singles = [means[0]] + [n * means[n - 1] - (n - 1) * means[n - 2] for n in counts[1:]]
        narrow = float(np.mean([_rel_err(s, exact.ntk) for s in singles]))
        assert errors["ntk"] < narrow / 3, (errors["ntk"], narrow)
        errors["narrow single-sample ntk"] = narrow
    print(f"{lib}-{arch}: {errors}")


# ------------------------------------------------------------------------------------------------
# Semantics, on a small network.


def _small():
    init_fn, apply_fn, _ = nt_stax.serial(
        nt_stax.Dense(16, **STD), nt_stax.Erf(), nt_stax.Dense(3, **STD)
    )
    return init_fn, apply_fn


X1, X2 = _normal(3, (4, 6)), _normal(4, (2, 6))


def test_samples_follow_nts_key_scheme():
    """Sample s uses ``key, k_s = split(key)``, then ``init_key, dropout_key = split(k_s)``."""
    init_fn, apply_fn = _small()
    key = jax.random.PRNGKey(7)
    empirical = jax.jit(ntfast.empirical_kernel_fn(apply_fn), static_argnames="get")

    @jax.jit
    def nt_params(key):
        keys = []
        for _ in range(3):
            key, k_s = jax.random.split(key)
            init_key, _ = jax.random.split(k_s)
            keys.append(init_fn(init_key, X1.shape)[1])
        return keys

    samples = [empirical(X1, X2, ("nngp", "ntk"), p) for p in nt_params(key)]
    mc_fn = ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, [1, 3])
    first, mean3 = list(mc_fn(X1, X2, ("nngp", "ntk")))
    for kind in ("nngp", "ntk"):
        np.testing.assert_allclose(getattr(first, kind), getattr(samples[0], kind), rtol=1e-12)
        want = sum(getattr(s, kind) for s in samples) / 3
        np.testing.assert_allclose(getattr(mean3, kind), want, rtol=1e-12)


def test_int_and_generator_forms_and_get(capfd):
    init_fn, apply_fn = _small()
    key = jax.random.PRNGKey(8)
    gen = ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, [3, 1, 3])(X1, X2, ("nngp", "ntk"))
    assert isinstance(gen, types.GeneratorType)
    estimates = list(gen)
    assert len(estimates) == 2  # one per distinct count, ascending
    assert type(estimates[0]).__name__ == "MonteCarloKernel"

    mc_fn = ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, 3)
    pair = mc_fn(X1, X2, ("ntk", "nngp"))
    assert type(pair).__name__ == "MonteCarloKernel" and pair._fields == ("ntk", "nngp")
    np.testing.assert_allclose(pair.ntk, estimates[-1].ntk, rtol=1e-12)
    np.testing.assert_allclose(pair.nngp, estimates[-1].nngp, rtol=1e-12)
    # get=None gives NT's EmpiricalKernel namedtuple (NT passes the empirical result through).
    both = mc_fn(X1, X2)
    assert type(both).__name__ == "EmpiricalKernel" and both._fields == ("nngp", "ntk")
    np.testing.assert_allclose(both.ntk, pair.ntk, rtol=1e-12)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ntk = mc_fn(X1, X2, "ntk")
    assert isinstance(ntk, jax.Array) and ntk.shape == (4, 2)
    np.testing.assert_allclose(ntk, pair.ntk, rtol=1e-12)
    np.testing.assert_array_equal(mc_fn(X1, X2, "ntk"), ntk)  # same key, same estimate
    captured = capfd.readouterr()  # a library: no output by default
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("x2", [X2, None], ids=["x2", "x2=None"])
def test_batching_matches_unbatched(x2):
    init_fn, apply_fn = _small()
    key = jax.random.PRNGKey(9)
    want = ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2)(X1, x2, ("nngp", "ntk"))
    batched = ntfast.monte_carlo_kernel_fn(
        init_fn, apply_fn, key, 2, batch_size=1, store_on_device=False
    )
    got = batched(X1, x2, ("nngp", "ntk"))
    np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-12)
    np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-12)
    assert got.ntk.devices() == {jax.devices("cpu")[0]}
    if x2 is None:
        np.testing.assert_allclose(got.nngp, got.nngp.T, rtol=1e-12)
        return
    # A batch size that does not fit (gcd(4, 2) = 2) is reduced, as NT does.
    too_big = ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, batch_size=3)
    with pytest.warns(UserWarning, match="reduced from requested 3 to effective 2"):
        got = too_big(X1, x2, ("nngp", "ntk"))
    np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-12)


def test_trace_and_diagonal_axes_pass_through():
    init_fn, apply_fn = _small()
    key = jax.random.PRNGKey(10)
    full = ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, trace_axes=())(X1, None, "ntk")
    assert full.shape == (4, 4, 3, 3)
    var = ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, diagonal_axes=(0,))(
        X1, None, "ntk"
    )
    want = np.einsum("iikk->i", np.asarray(full)) / 3
    np.testing.assert_allclose(var, want, rtol=1e-10)
    # Blocks need the batch axis in the kernel: a diagonal batch axis cannot be batched.
    batched = ntfast.monte_carlo_kernel_fn(
        init_fn, apply_fn, key, 2, diagonal_axes=(0,), batch_size=2
    )
    with pytest.raises(ValueError, match="batch axis"):
        batched(X1, None, "ntk")


def _shifted_init(key, input_shape):
    k1, k2 = jax.random.split(key)
    return input_shape[:-1] + (2,), (
        jax.random.normal(k1, (input_shape[-1], 5)),
        jax.random.normal(k2, (5, 2)),
    )


def _shifted_apply(params, x, scale=1.0, shift=0.0, **kwargs):
    w1, w2 = params
    return scale * jnp.tanh(x @ w1 + shift) @ w2


def test_apply_fn_kwargs_static_and_per_input_pairs():
    """A static kwarg is closed over; a 2-tuple of arrays is (for x1 rows, for x2 rows) and is
    sliced with the blocks when batching."""
    key = jax.random.PRNGKey(11)
    s1, s2 = _normal(5, (4, 5)), _normal(6, (2, 5))
    whole = ntfast.monte_carlo_kernel_fn(_shifted_init, _shifted_apply, key, 2)
    batched = ntfast.monte_carlo_kernel_fn(_shifted_init, _shifted_apply, key, 2, batch_size=1)
    want = whole(X1, X2, "nngp", scale=0.5, shift=(s1, s2))
    got = batched(X1, X2, "nngp", scale=0.5, shift=(s1, s2))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # The static scale enters squared; the shift changes the kernel.
    np.testing.assert_allclose(whole(X1, X2, "nngp", scale=1.0, shift=(s1, s2)), want / 0.25)
    assert _rel_err(whole(X1, X2, "nngp", scale=0.5), want) > 1e-3


def test_bad_arguments_raise_clear_errors():
    init_fn, apply_fn = _small()
    key = jax.random.PRNGKey(0)
    for bad in (0, -2, [1, 0]):
        with pytest.raises(ValueError, match="n_samples"):
            ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, bad)
    with pytest.raises(ValueError, match="n_samples"):
        ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, [1, 2.5])
    for bad in (1.5, "10", None):
        with pytest.raises(TypeError, match="n_samples"):
            ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, bad)
    for bad in (jnp.zeros((2,)), jnp.zeros((2, 2), jnp.uint32), jax.random.split(key, 2)):
        with pytest.raises(ValueError, match="key"):
            ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, bad, 1)
    with pytest.raises(TypeError, match="key"):
        ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, 0, 1)
    with pytest.raises(ValueError, match="batch_size"):
        ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, 1, batch_size=-1)
    with pytest.raises(ValueError, match="device_count"):
        ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, 1, device_count=1000)
    with pytest.raises(ValueError, match="implementation"):
        ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, 1, implementation=9)
    mc_fn = ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, [1, 2])
    with pytest.raises(ValueError, match="rng"):
        mc_fn(X1, X2, "ntk", rng=key)
    with pytest.raises(ValueError, match="get"):
        mc_fn(X1, X2, "cov1")  # at the call, not at the generator's first `next`


def test_new_style_keys_implementations_and_progress(capfd):
    """A typed key and any NtkImplementation work; tqdm output only with ``progress=True``."""
    init_fn, apply_fn = _small()
    mc_fn = ntfast.monte_carlo_kernel_fn(
        init_fn,
        apply_fn,
        jax.random.key(0),
        2,
        implementation=NtkImplementation.AUTO,
        progress=True,
    )
    got = mc_fn(X1, X2, "ntk")
    assert got.shape == (4, 2) and bool(jnp.all(jnp.isfinite(got)))
    assert "2/2" in capfd.readouterr().err


_MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    assert jax.local_device_count() == 2, jax.devices()
    from nt_oracle import load_nt_stax
    import ntfast
    stax = load_nt_stax()
    init_fn, apply_fn, _ = stax.serial(stax.Dense(16), stax.Erf(), stax.Dense(3))
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((4, 6)), rng.standard_normal((2, 6))
    key = jax.random.PRNGKey(3)
    def mc(**kw):
        fn = ntfast.monte_carlo_kernel_fn(init_fn, apply_fn, key, 2, **kw)
        return fn(x1, x2, ("nngp", "ntk"))
    want = mc(device_count=0)
    for kw in (dict(device_count=-1), dict(device_count=2, batch_size=1)):
        got = mc(**kw)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-12)
    print("OK")
    """
)


def test_device_count_shards_rows_of_x1():
    """Two host devices (``--xla_force_host_platform_device_count=2``) in a subprocess."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    tests_dir = os.path.dirname(__file__)
    env["PYTHONPATH"] = os.pathsep.join(
        [tests_dir, os.path.dirname(tests_dir), env.get("PYTHONPATH", "")]
    )
    result = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE_SCRIPT],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
