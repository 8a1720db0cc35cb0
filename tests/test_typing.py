"""``ntfast.typing``: NT's names, NT's call signatures, and protocols that NT-shaped functions meet."""

import inspect
import typing

import jax.numpy as jnp
import pytest
from nt_oracle import load_nt_stax

from ntfast import typing as nft
from ntfast.kernel import Kernel

load_nt_stax()
from neural_tangents._src.utils import typing as ntt

PROTOCOLS = [
    "InitFn",
    "ApplyFn",
    "MaskFn",
    "LayerKernelFn",
    "AnalyticKernelFn",
    "EmpiricalGetKernelFn",
    "EmpiricalKernelFn",
    "MonteCarloKernelFn",
]
ALIASES = [
    "PyTree", "Axes", "NTTree", "NTTrees", "Shapes", "KernelOrInput", "Get", "KernelFn",
    "InternalLayer", "InternalLayerMasked", "Layer", "Kernels", "VMapAxisTriple", "VMapAxes",
]  # fmt: skip


def _params(fn):
    return [
        (p.name, p.kind, p.default is inspect.Parameter.empty)
        for p in inspect.signature(fn).parameters.values()
    ]


@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_call_signature_matches_nt(name):
    ours, theirs = getattr(nft, name), getattr(ntt, name)
    assert typing.Protocol in ours.__mro__
    assert _params(ours.__call__) == _params(theirs.__call__)
    defaults = {
        p.name: p.default
        for p in inspect.signature(theirs.__call__).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    for p in inspect.signature(ours.__call__).parameters.values():
        if p.name in defaults:
            assert p.default == defaults[p.name]


def test_all_nt_names_exist():
    for name in PROTOCOLS + ALIASES:
        assert hasattr(nft, name), name
        assert hasattr(ntt, name), name
    assert set(nft.__all__) == set(PROTOCOLS + ALIASES)


def test_nt_shaped_functions_satisfy_protocols():
    def init_fn(rng, input_shape, **kwargs):
        return input_shape, ()

    def apply_fn(params, inputs, **kwargs):
        return inputs

    def kernel_fn(x1, x2=None, get=None, **kwargs):
        return x1

    for f, proto in [
        (init_fn, nft.InitFn),
        (apply_fn, nft.ApplyFn),
        (kernel_fn, nft.AnalyticKernelFn),
        (kernel_fn, nft.MonteCarloKernelFn),
        (lambda k: k, nft.LayerKernelFn),
    ]:
        assert isinstance(f, proto)
    # Runtime checks see only callability: data is never a protocol instance.
    assert not isinstance(3, nft.InitFn)
    assert not isinstance((init_fn, apply_fn, kernel_fn), nft.AnalyticKernelFn)


def test_aliases_have_nt_structure():
    assert set(typing.get_args(nft.KernelFn)) == {
        nft.AnalyticKernelFn,
        nft.EmpiricalKernelFn,
        nft.EmpiricalGetKernelFn,
        nft.MonteCarloKernelFn,
    }
    assert set(typing.get_args(nft.Get)) == set(typing.get_args(ntt.Get))
    assert typing.get_args(nft.Layer) == (nft.InitFn, nft.ApplyFn, nft.AnalyticKernelFn)
    assert typing.get_args(nft.InternalLayer) == (nft.InitFn, nft.ApplyFn, nft.LayerKernelFn)
    assert typing.get_args(nft.InternalLayerMasked)[-1] is nft.MaskFn
    # NTTree[X] is "X, or a list/tuple of them", like NT's runtime alias.
    assert set(typing.get_args(nft.NTTree[int])) == set(typing.get_args(ntt.NTTree[int]))
    assert set(typing.get_args(nft.Kernels)) == {list[Kernel], tuple[Kernel, ...]}
    assert typing.get_args(nft.KernelOrInput) == typing.get_args(
        nft.NTTree[Kernel] | nft.NTTree[jnp.ndarray]
    )
