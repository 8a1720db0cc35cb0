import os
import sys

import jax

# Parity with the oracle is checked in f64 (brief: "Use f64 for parity").
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(__file__))


import pytest
from nt_oracle import load_nt_stax


@pytest.fixture(scope="session")
def nt_stax():
    """Neural Tangents 0.6.5's stax (the oracle)."""
    return load_nt_stax()


@pytest.fixture(scope="session")
def nf_stax():
    """ntfast's stax."""
    import ntfast.stax

    return ntfast.stax
