"""Shared pytest options and fixtures for pykvsmooth's tests."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# The NumPy references (tests/reference_*.py) do thousands of small float64 matrix products,
# where OpenBLAS's threads only contend with each other and with libllama's: on the loaded
# 2-core test machine a teacher-forced Qwen2-VL reference run took 2.8 s with them, 0.2 s
# without (measured). Set before numpy is first imported; the environment can still override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

TESTS = Path(__file__).resolve().parent
# the tests import their helpers (kvsmooth_oracle, op_runner, reference_llama) from this
# directory and the fixture generator (make_tiny_llava) from scripts/
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent / "scripts"))

import make_tiny_gemma3  # noqa: E402
import make_tiny_llava  # noqa: E402
import make_tiny_qwen2vl  # noqa: E402


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


@dataclass(frozen=True)
class TinyFamily:
    """A random-weight text model + mmproj pair of another family (scripts/make_tiny_<family>.py,
    seed 0, f32) and a 64x48 test picture, all in one folder."""

    dir: Path
    text: Path
    mmproj: Path
    png: Path


def _tiny_family(tmp_path_factory: pytest.TempPathFactory, maker, name: str) -> TinyFamily:
    d = tmp_path_factory.mktemp(name)
    text, mmproj = maker.write_pair(d)
    make_tiny_llava.write_test_image(d / "picture.png", size=(64, 48), seed=0)
    return TinyFamily(d, text, mmproj, d / "picture.png")


@pytest.fixture(scope="session")
def tiny_qwen2vl(tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    """scripts/make_tiny_qwen2vl.py: arch qwen2vl (M-RoPE), qwen2vl_merger mmproj."""
    return _tiny_family(tmp_path_factory, make_tiny_qwen2vl, "tiny-qwen2vl")


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    """scripts/make_tiny_gemma3.py: arch gemma3 (iSWA, window 8), gemma3 mmproj."""
    return _tiny_family(tmp_path_factory, make_tiny_gemma3, "tiny-gemma3")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kvsmooth-backend",
        default="CPU",
        help="ggml backend device the op tests run on (e.g. CPU, CUDA0, Metal); default CPU",
    )


@pytest.fixture(scope="session")
def kvsmooth_backend(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--kvsmooth-backend"))
