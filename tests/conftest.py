"""Shared pytest options and fixtures for pykvsmooth's tests."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# the tests import their helpers (kvsmooth_oracle, op_runner, reference_llama) from this
# directory and the fixture generator (make_tiny_llava) from scripts/
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent / "scripts"))

import make_tiny_llava  # noqa: E402


@dataclass(frozen=True)
class TinyLlava:
    """The random-weight LLaVA-1.5-shaped pair of scripts/make_tiny_llava.py (seed 0, f32)
    and a 64x48 test picture, all in one folder."""

    dir: Path
    text: Path
    mmproj: Path
    png: Path


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> TinyLlava:
    d = tmp_path_factory.mktemp("tiny-llava")
    text, mmproj = make_tiny_llava.write_pair(d)
    make_tiny_llava.write_test_image(d / "picture.png", size=(64, 48), seed=0)
    return TinyLlava(d, text, mmproj, d / "picture.png")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kvsmooth-backend",
        default="CPU",
        help="ggml backend device the op tests run on (e.g. CPU, CUDA0, Metal); default CPU",
    )


@pytest.fixture(scope="session")
def kvsmooth_backend(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--kvsmooth-backend"))
