"""Triton kernels of the op ``input_cov`` (reference: ``ntfast/ops/dot_general.py``).

The input covariance ``x1·x2ᵀ/C`` runs on the contraction kernels of ``dot_general.py``; this
module only gives them the op's name, so that its launches are the custom calls
``ntfast_input_cov_<variant>`` (the launch machinery ties a call's name to its kernel module).
"""

from .dot_general import cov_matmul_kernel, pixel_cov_kernel, sq_norm_kernel

__all__ = ["cov_matmul_kernel", "pixel_cov_kernel", "sq_norm_kernel"]
