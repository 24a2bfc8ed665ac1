"""Shared pytest options and fixtures for pykvsmooth's tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# the op tests import their helpers (kvsmooth_oracle, op_runner) from this directory
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kvsmooth-backend",
        default="CPU",
        help="ggml backend device the op tests run on (e.g. CPU, CUDA0, Metal); default CPU",
    )


@pytest.fixture(scope="session")
def kvsmooth_backend(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--kvsmooth-backend"))
