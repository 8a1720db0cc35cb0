"""``kernel_fn`` under JAX transformations equals NT 0.6.5's: jit, vmap, grad, jvp (f64).

The networks are small and smooth where derivatives are taken at x1 == x2 (Relu's arc-cosine
kernel has an infinite slope on the diagonal), and every comparison uses the sweep's metric:
max|ntfast - NT| / max|NT| <= 1e-6.
"""

import warnings

import archs
import jax
import jax.numpy as jnp
import numpy as np
import pytest

RTOL = 1e-6


def _cnn(s):
    return s.serial(
        s.Conv(3, (2, 3), padding="SAME", W_std=1.3, b_std=0.2),
        s.Erf(),
        s.AvgPool((2, 2), strides=(1, 2), padding="SAME"),
        s.Conv(2, (3, 2), padding="VALID", W_std=1.1, b_std=0.1),
        s.Gelu(),
        s.GlobalAvgPool(),
        s.Dense(1, W_std=1.5, b_std=0.3),
    )


def _mlp_relu(s):
    return s.serial(
        s.Dense(3, W_std=1.4, b_std=0.1),
        s.Relu(),
        s.Dense(2, W_std=1.2, b_std=0.2),
        s.Relu(),
        s.Dense(1),
    )


def _resnet_nchw(s):
    dn = ("NCHW", "OIHW", "NCHW")
    block = s.serial(s.Sin(), s.Conv(2, (3, 3), padding="CIRCULAR", dimension_numbers=dn))
    return s.serial(
        s.Conv(2, (2, 2), padding="SAME", dimension_numbers=dn, b_std=0.1),
        s.FanOut(2),
        s.parallel(block, s.Identity()),
        s.FanInSum(),
        s.Gelu(),
        s.Flatten(),
        s.Dense(1, parameterization="standard", b_std=0.2),
    )


def _layernorm_1d(s):
    return s.serial(
        s.Conv(2, (3,), padding="SAME", dimension_numbers=("NWC", "WIO", "NWC")),
        s.LayerNorm(axis=(1, 2)),
        s.Erf(a=1.2, b=0.7, c=0.1),
        s.Dense(2, b_std=0.1),
        s.GlobalSumPool(),
        s.Dense(1),
    )


# (id, network, x1 shape, N2, smooth at x1 == x2)
NETS = [
    ("cnn_nhwc", _cnn, (2, 5, 6, 2), 3, True),
    ("mlp_relu", _mlp_relu, (3, 4), 2, False),
    ("resnet_nchw", _resnet_nchw, (2, 2, 4, 5), 3, True),
    ("layernorm_1d", _layernorm_1d, (3, 7, 2), 2, True),
]
IDS = [n[0] for n in NETS]


def _kernel_fns(net, nt_stax, nf_stax):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return net(nf_stax)[2], net(nt_stax)[2]


def _inputs(shape, n2, seed=0):
    rng = np.random.RandomState(seed)
    x1 = jnp.asarray(rng.standard_normal(shape))
    x2 = jnp.asarray(rng.standard_normal((n2,) + shape[1:]))
    return x1, x2


def _assert_close(actual, expected, what):
    problems = archs.compare(actual, expected, rtol=RTOL, path=what)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("net", NETS, ids=IDS)
def test_jit_equals_eager_equals_nt(net, nt_stax, nf_stax):
    _, make, shape, n2, _ = net
    kf, kf_nt = _kernel_fns(make, nt_stax, nf_stax)
    x1, x2 = _inputs(shape, n2)
    expected = jax.jit(kf_nt)(x1, x2)
    eager = kf(x1, x2)
    jitted = jax.jit(kf, static_argnames="get")(x1, x2)
    _assert_close(eager, expected, "eager")
    _assert_close(jitted, expected, "jit")
    # get= is static under jit and selects the namedtuple fields.
    got = jax.jit(kf, static_argnames="get")(x1, None, get=("ntk", "nngp"))
    expected = jax.jit(kf_nt, static_argnames="get")(x1, None, get=("ntk", "nngp"))
    _assert_close(got, expected, "jit get")


@pytest.mark.parametrize("net", NETS, ids=IDS)
def test_vmap_over_batches_of_inputs(net, nt_stax, nf_stax):
    """vmap over a leading axis of independent (x1, x2) batches, and over x1 with x2=None."""
    _, make, shape, n2, _ = net
    kf, kf_nt = _kernel_fns(make, nt_stax, nf_stax)
    rng = np.random.RandomState(1)
    xs1 = jnp.asarray(rng.standard_normal((3,) + shape))
    xs2 = jnp.asarray(rng.standard_normal((3, n2) + shape[1:]))

    def pair(k):
        return lambda a, b: k(a, b, ("nngp", "ntk"))

    expected = jax.jit(jax.vmap(pair(kf_nt)))(xs1, xs2)
    _assert_close(jax.vmap(pair(kf))(xs1, xs2), expected, "vmap(x1,x2)")

    def alone(k):
        return lambda a: k(a, None, "ntk")

    expected = jax.jit(jax.vmap(alone(kf_nt)))(xs1)
    _assert_close(jax.jit(jax.vmap(alone(kf)))(xs1), expected, "vmap(x1)")
    # vmap of ntfast equals ntfast applied batch by batch (one jit, reused for each batch).
    single = jax.jit(lambda a, b: kf(a, b, "ntk"))
    loop = np.stack([np.asarray(single(xs1[i], xs2[i])) for i in range(3)])
    vm = jax.vmap(lambda a, b: kf(a, b, "ntk"))(xs1, xs2)
    assert archs.rel_err(vm, loop) <= RTOL


def _weights(shape, seed=2):
    return jnp.asarray(np.random.RandomState(seed).standard_normal(shape))


@pytest.mark.parametrize("net", NETS, ids=IDS)
def test_grad_wrt_inputs(net, nt_stax, nf_stax):
    """grad of a weighted sum of nngp and ntk, w.r.t. x1 and w.r.t. x2 (jitted; eager once)."""
    _, make, shape, n2, _ = net
    kf, kf_nt = _kernel_fns(make, nt_stax, nf_stax)
    x1, x2 = _inputs(shape, n2)
    w1, w2 = _weights((shape[0], n2)), _weights((shape[0], n2), seed=5)

    def loss(k, wrt):
        def scalar(a, b):
            out = k(a, b, ("nngp", "ntk"))
            return jnp.sum(w1 * out.nngp) + jnp.sum(w2 * out.ntk)

        if wrt == "x1":
            return lambda a: scalar(a, x2)
        return lambda b: scalar(x1, b)

    for wrt, x in (("x1", x1), ("x2", x2)):
        expected = jax.jit(jax.grad(loss(kf_nt, wrt)))(x)
        assert np.all(np.isfinite(np.asarray(expected))), f"NT grad not finite ({wrt})"
        jitted = jax.jit(jax.grad(loss(kf, wrt)))(x)
        _assert_close(jitted, expected, f"jit(grad) wrt {wrt}")
    if net[0] == "mlp_relu":  # eager (un-jitted) grad: op-by-op, so on the cheapest network
        _assert_close(
            jax.grad(loss(kf, "x1"))(x1),
            jax.jit(jax.grad(loss(kf_nt, "x1")))(x1),
            "eager grad wrt x1",
        )


@pytest.mark.parametrize("net", [n for n in NETS if n[4]], ids=[n[0] for n in NETS if n[4]])
def test_grad_with_x2_none(net, nt_stax, nf_stax):
    """d/dx of kernel_fn(x, None): both arguments move together (self-similarity terms)."""
    _, make, shape, _, _ = net
    kf, kf_nt = _kernel_fns(make, nt_stax, nf_stax)
    x1, _ = _inputs(shape, 1)
    w = _weights((shape[0], shape[0]), seed=3)

    def loss(k):
        return lambda a: jnp.sum(w * k(a, None, "ntk"))

    expected = jax.jit(jax.grad(loss(kf_nt)))(x1)
    assert np.all(np.isfinite(np.asarray(expected)))
    _assert_close(jax.jit(jax.grad(loss(kf)))(x1), expected, "grad x2=None")


JVP_NETS = [NETS[0], NETS[3]]


@pytest.mark.parametrize("net", JVP_NETS, ids=[n[0] for n in JVP_NETS])
def test_jvp_wrt_inputs(net, nt_stax, nf_stax):
    """Forward mode (jvp) too: a custom_vjp without a jvp rule would break jacfwd users."""
    _, make, shape, n2, _ = net
    kf, kf_nt = _kernel_fns(make, nt_stax, nf_stax)
    x1, x2 = _inputs(shape, n2)
    t = _weights(shape, seed=4)

    def f(k):
        return lambda a: k(a, x2, "nngp")

    expected = jax.jit(lambda a, b: jax.jvp(f(kf_nt), (a,), (b,)))(x1, t)
    actual = jax.jit(lambda a, b: jax.jvp(f(kf), (a,), (b,)))(x1, t)
    _assert_close(actual[0], expected[0], "jvp primal")
    _assert_close(actual[1], expected[1], "jvp tangent")


def test_grad_of_sweep_sample(nt_stax, nf_stax):
    """grad w.r.t. x1 on a few generated architectures (smooth layers, x2 given, no masks)."""
    smooth = {"Erf", "Gelu", "Sin", "Cos", "Rbf", "Gaussian", "Exp", "Sigmoid_like", "Gabor"}
    rough = set(archs.ELEMENTWISE) - smooth
    picked = [
        s
        for s in archs.make_archs(128, seed=0)
        if isinstance(s.n2, int)
        and not s.tree
        and not s.kernel_kwargs
        and not (s.layer_names() & rough)
        and "Dropout" not in s.layer_names()
    ][:2]
    assert len(picked) >= 2, "too few smooth specs in the sweep"
    for spec in picked:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kf = archs.build(spec, nf_stax)[2]
            kf_nt = archs.build(spec, nt_stax)[2]
        x1, x2 = archs.make_inputs(spec)

        def loss(k, x2=x2):
            return lambda a: jnp.sum(k(a, x2, "ntk") ** 2)

        expected = jax.jit(jax.grad(loss(kf_nt)))(x1)
        actual = jax.jit(jax.grad(loss(kf)))(x1)
        _assert_close(actual, expected, f"{spec.name} grad")
