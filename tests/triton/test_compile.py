"""Proof 2 (DESIGN.md §3): every Triton kernel specialization the dispatcher can pick compiles for
the GPU — ``triton.compile`` for sm_80 (A100) and sm_90 (H100), no GPU needed (ptxas ships with
the Triton wheel). Catches what the interpreter allows and the GPU rejects (tl.dot tile limits,
dtype rules, libdevice calls).

The specializations come from each op launcher's ``SPECIALIZATIONS`` (ntfast/_triton/<op>.py).
That list is checked against the launches whole networks actually trace, so a kernel variant
the dispatcher picks but the list forgets fails here.
"""

import importlib

import jax
import numpy as np
import pytest

pytest.importorskip("triton", reason="needs triton: pip install 'triton>=3.7,<3.10'")

import ntfast._triton as nt_triton
from ntfast import stax
from ntfast._triton import runtime
from ntfast.stax.fused import fused_options

ARCHS = (80, 90)
_TYPES = {"*fp32": np.float32, "*fp64": np.float64, "*i32": np.int32, "*i64": np.int64}


def _launchers():
    mods = {}
    for name in nt_triton.LAUNCHERS:
        if importlib.util.find_spec(f"ntfast._triton.{name}") is not None:
            mods[name] = importlib.import_module(f"ntfast._triton.{name}")
    return mods


LAUNCHERS = _launchers()
SPECS = [
    (mod_name, i, spec)
    for mod_name, mod in LAUNCHERS.items()
    for i, spec in enumerate(getattr(mod, "SPECIALIZATIONS", ()))
]


def _spec_id(mod_name, i, spec):
    cx = ",".join(f"{k}={v}" for k, v in spec.get("constexprs", {}).items())
    return f"{mod_name}[{i}]-{spec['kernel']}-{spec.get('dtype', '')}-{cx}"


def test_every_launcher_lists_its_specializations():
    assert LAUNCHERS, "no Triton launcher module exists under ntfast/_triton"
    for name, mod in LAUNCHERS.items():
        specs = getattr(mod, "SPECIALIZATIONS", None)
        assert specs, f"ntfast/_triton/{name}.py has no SPECIALIZATIONS list"
        for spec in specs:
            assert {"kernel", "signature"} <= set(spec), spec
            assert all(n.startswith("ntfast_") for n in spec.get("names", ())), spec


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("mod_name", "index", "spec"), SPECS, ids=[_spec_id(*s) for s in SPECS] or None
)
def test_compiles_for_gpu(mod_name, index, spec, arch):
    compiled = runtime.compile_specialization(spec, arch, op=mod_name)
    ptx = compiled.asm["ptx"]
    assert f".target sm_{arch}" in ptx
    assert f".entry {spec['kernel']}" in ptx or f".globl\t{spec['kernel']}" in ptx
    assert len(compiled.asm["cubin"]) > 0
    assert compiled.metadata.num_warps == spec.get("num_warps", 4)


def _matches(record, spec, kernel_params) -> bool:
    if spec.get("op", None) not in (None, record["op"]) or spec["kernel"] != record["kernel"]:
        return False
    meta = record["metaparams"]
    if any(meta.get(k, _UNSET) != v for k, v in spec.get("constexprs", {}).items()):
        return False
    # Pointer parameters in kernel order: the arrays, then the outputs (jax-triton convention).
    pointer_types = [spec["signature"][p] for p in kernel_params if p in spec["signature"]]
    pointer_types = [t for t in pointer_types if t.startswith("*")]
    dtypes = [np.dtype(_TYPES.get(t, object)) for t in pointer_types]
    return dtypes == [*record["in_dtypes"], *record["out_dtypes"]]


_UNSET = object()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("network", ["fc", "cnn_gap", "myrtle5", "elementwise_zoo"])
@pytest.mark.parametrize("x2_none", [False, True])
# CNN networks take the fused path (ntfast_fused_cnn_*) by default; with it disabled the same
# networks launch the per-layer kernels, whose coverage this test also proves.
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "layers"])
def test_specializations_cover_the_launches_of_whole_networks(
    networks, network, dtype, x2_none, fused
):
    make, s1, s2 = networks[network]
    x1 = np.random.RandomState(0).randn(*s1).astype(dtype)
    x2 = None if x2_none else np.random.RandomState(1).randn(*s2).astype(dtype)
    kernel_fn = make(stax)[2]
    with runtime.record_launches() as log, fused_options(enabled=fused):
        jax.jit(lambda a, b: kernel_fn(a, b, ("nngp", "ntk"), backend="triton")).trace(x1, x2)
    assert log, f"{network} launched no Triton kernel under backend='triton'"
    specs = [(m, s) for m, _, s in SPECS]
    for rec in log:
        params = runtime._kernel_fn(rec["op"], rec["kernel"], interpret=False).arg_names
        ok = [s for m, s in specs if _matches(rec, {"op": m, **s}, params)]
        assert ok, (
            f"launch {rec['name']} ({rec['op']}.{rec['kernel']}, constexprs from "
            f"{rec['metaparams']}, dtypes {rec['in_dtypes']} -> {rec['out_dtypes']}) is not in "
            "any SPECIALIZATIONS list, so its GPU compilation is unproven"
        )
