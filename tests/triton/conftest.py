"""Shared setup of the Triton backend tests.

Every test here needs ``triton`` (the interpreter runs on any CPU). Where it is missing the
directory is not collected and the pytest header says why. The runtime's own test kernels
(``tests/triton/_kernels``) are put on the kernel search path so ``runtime.kernels("probe", ...)``
finds them next to ntfast's kernels.
"""

import os

import pytest

HERE = os.path.dirname(__file__)
TEST_KERNELS = os.path.join(HERE, "_kernels")

os.environ["NTFAST_TRITON_KERNELS"] = os.pathsep.join(
    [TEST_KERNELS, *(p for p in os.environ.get("NTFAST_TRITON_KERNELS", "").split(os.pathsep) if p)]
)

collect_ignore = ["_kernels"]

try:
    import triton  # noqa: F401

    _MISSING = None
except ImportError as e:
    _MISSING = f"tests/triton not collected: triton is not installed ({e}); pip install '.[test]'"
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config):
    return _MISSING


@pytest.fixture(autouse=True)
def _quiet_interpreter_warning(request):
    """The once-per-process interpreter warning is tested in test_runtime.py; elsewhere it is noise
    (and with -W error it would fail unrelated tests)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ntfast: backend 'triton' is running")
        yield


# -- networks shared by test_compile (launch coverage), test_lowering and test_networks ---------


def _fc(stax):
    return stax.serial(
        stax.Dense(16, W_std=1.5, b_std=0.1),
        stax.Relu(),
        stax.Dense(16, W_std=1.2, b_std=0.05),
        stax.Erf(),
        stax.Dense(1, W_std=1.0, b_std=0.0),
    )


def _cnn_gap(stax):
    return stax.serial(
        stax.Conv(8, (3, 3), W_std=1.5, b_std=0.1, padding="SAME"),
        stax.Relu(),
        stax.Conv(8, (2, 3), W_std=1.3, b_std=0.05, padding="VALID"),
        stax.Erf(),
        stax.GlobalAvgPool(),
        stax.Dense(1),
    )


def _myrtle5(stax):
    from ntfast.demo import myrtle_network

    return myrtle_network(stax, depth=5, spatial=4)[1]


def _elementwise_zoo(stax):
    """Every nonlinearity with a Triton kernel, on a flattened CNN (diagonal-spatial convs)."""
    return stax.serial(
        stax.Conv(4, (3, 2), W_std=1.2, b_std=0.1, padding="CIRCULAR"),
        stax.Gelu(),
        stax.Conv(4, (2, 2), W_std=1.1, b_std=0.2, strides=(1, 2), padding="SAME"),
        stax.Sin(a=0.8, b=1.5, c=0.3),
        stax.Conv(4, (1, 2), W_std=0.9, b_std=0.1, padding="VALID"),
        stax.LeakyRelu(0.1),
        stax.Flatten(),
        stax.Dense(6, W_std=1.1, b_std=0.1),
        stax.Rbf(0.5),
        stax.Dense(6),
        stax.Exp(a=0.7, b=0.4),
        stax.Dense(6),
        stax.Gaussian(a=1.1, b=-0.5),
        stax.Dense(6),
        stax.Abs(),
        stax.Dense(6),
        stax.ABRelu(-0.3, 0.7),
        stax.Dense(6),
        stax.Sign(),
        stax.Dense(1),
    )


# name -> (make(stax), x1 shape, x2 shape): tiny inputs, N1 != N2; run under the interpreter.
NETWORKS = {
    "fc": (_fc, (3, 5), (2, 5)),
    "cnn_gap": (_cnn_gap, (2, 5, 6, 2), (3, 5, 6, 2)),
    "myrtle5": (_myrtle5, (2, 4, 4, 1), (3, 4, 4, 1)),
    "elementwise_zoo": (_elementwise_zoo, (2, 4, 5, 2), (1, 4, 5, 2)),
}


@pytest.fixture(scope="session")
def networks():
    """``NETWORKS``: name -> (make(stax) -> (init_fn, apply_fn, kernel_fn), x1 shape, x2 shape)."""
    return NETWORKS
