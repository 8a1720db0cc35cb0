import os
import sys

import jax

# Parity with the oracle is checked in f64 (brief: "Use f64 for parity").
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(__file__))
