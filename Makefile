# pykvsmooth: `make install` builds and installs everything into the active Python
# environment; `make test` runs the tests.  GPU=cuda, GPU=metal or GPU=vulkan selects a GPU backend.

PYTHON ?= python3
PIP    := $(PYTHON) -m pip
GPU    ?=

ifeq ($(GPU),cuda)
  BACKEND_SETTINGS := --config-settings=cmake.define.GGML_CUDA=ON
else ifeq ($(GPU),metal)
  BACKEND_SETTINGS := --config-settings=cmake.define.GGML_METAL=ON
else ifeq ($(GPU),vulkan)
  BACKEND_SETTINGS := --config-settings=cmake.define.GGML_VULKAN=ON
else ifeq ($(GPU),)
  BACKEND_SETTINGS :=
else
  $(error GPU must be empty, cuda, metal or vulkan, not '$(GPU)')
endif

.PHONY: install test lint cuda-check check-patches bench clean

install:
	$(PIP) install "scikit-build-core>=0.10" "cmake>=3.21" ninja
	@# llama-cpp-python is the Python binding layer only: its own native build is off.
	@# pykvsmooth's one native build installs the patched libraries into llama_cpp/lib,
	@# where a plain `import llama_cpp` finds them (CMakeLists.txt).
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) install --no-build-isolation \
	    "$$($(PYTHON) scripts/prepare_llama_cpp.py --print-archive)"
	$(PIP) install --no-build-isolation $(BACKEND_SETTINGS) .

test:
	@# the test, server, eval and ray extras of pyproject.toml (the package itself is already installed)
	$(PIP) install "pytest>=7" "gguf>=0.10" "matplotlib>=3.5" \
	    "uvicorn>=0.22" "fastapi>=0.100" "pydantic-settings>=2.0.1" "sse-starlette>=1.6.1" \
	    "starlette-context>=0.3.6,<0.4" "nltk>=3.9.1" "openai>=1.0" \
	    "ray[data]>=2.10"
	@# from tests/: `python -m pytest` puts the working folder on sys.path, and the source
	@# tree's pykvsmooth/ (without the built libraries) must not shadow the installed one
	cd tests && $(PYTHON) -m pytest

# ruff on the Python sources, mypy --strict on the package (settings: pyproject.toml)
lint:
	$(PIP) install "ruff>=0.6" "mypy>=1.11"
	$(PYTHON) -m ruff check pykvsmooth tests scripts
	$(PYTHON) -m mypy

# Compile (only) every CUDA source the series adds or changes, for sm_75/86/89.
cuda-check:
	$(PYTHON) scripts/prepare_llama_cpp.py --out build/cuda-check/llama.cpp >/dev/null
	scripts/cuda_check.sh $(CUDA_CHECK_FLAGS) build/cuda-check/llama.cpp

check-patches:
	$(PYTHON) scripts/prepare_llama_cpp.py --check

bench:
	$(PYTHON) scripts/bench.py

clean:
	rm -rf build dist *.egg-info
