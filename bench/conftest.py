"""pytest setup for ``bench/``: collects ``bench_*.py``, puts ``tests/`` on sys.path (NT oracle).

``python -m pytest tests`` never sees these files (``testpaths = ["tests"]`` and the default
``test_*.py`` pattern); ``python -m pytest bench/`` collects ``bench_*.py`` through the hook below.
Benchmarks run in f32: unlike ``tests/conftest.py`` nothing here enables ``jax_enable_x64``.
"""

from __future__ import annotations

import os
import sys

import pytest

from bench.shapes import DEFAULT_OP_SHAPE, DEFAULT_SHAPE, OP_SHAPES, OP_SMOKE_SHAPE, SHAPES

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))


def pytest_addoption(parser):
    parser.addoption(
        "--bench-shape",
        default=None,
        choices=sorted(SHAPES),
        help=f"named input shape of the kernel benchmarks (bench/shapes.py; default "
        f"{DEFAULT_SHAPE}, or 'smoke' when benchmarks are disabled)",
    )
    parser.addoption(
        "--op-shape",
        default=None,
        choices=sorted(OP_SHAPES),
        help=f"named op shape of the op benchmarks (bench/shapes.py OP_SHAPES; default "
        f"{DEFAULT_OP_SHAPE}, or '{OP_SMOKE_SHAPE}' when benchmarks are disabled)",
    )


def pytest_collect_file(file_path, parent):
    # Files named on the command line are already collected by pytest itself.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
