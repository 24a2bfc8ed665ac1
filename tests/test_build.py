"""Build smoke tests: the installed package loads the patched libraries, both CLIs run,
plain llama-cpp-python runs on the same build, and the source preparation refuses a bad
archive or patch with a message naming it."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import TinyLlava

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import prepare_llama_cpp  # noqa: E402


def test_package_loads_patched_libraries() -> None:
    import pykvsmooth
    import llama_cpp.llama_cpp as llama

    assert Path(llama._base_path).resolve() == pykvsmooth.lib_dir()
    info = pykvsmooth.build_info()
    assert info.startswith("pykvsmooth "), info
    assert "0c1e570" in info, info


def test_importing_llama_cpp_first_with_other_libraries_is_refused(tmp_path: Path) -> None:
    import pykvsmooth

    other = tmp_path / "other-libs"
    shutil.copytree(pykvsmooth.lib_dir(), other)
    code = "import llama_cpp\nimport pykvsmooth\n"
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(other), MTMD_CPP_LIB=str(other))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "LibraryConflictError" in result.stderr
    assert "Import pykvsmooth before llama_cpp" in result.stderr


def plain_env() -> Dict[str, str]:
    """The environment of a new process that never heard of pykvsmooth's settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")}
    env.pop("PYKVSMOOTH_LIB_DIR", None)
    return env


def installed_llama_cpp_lib() -> Path:
    """llama_cpp/lib, which must hold the patched build: `make install`'s layout. A source
    checkout run with PYTHONPATH has its libraries in pykvsmooth/lib instead."""
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.submodule_search_locations, "llama_cpp is not installed"
    lib = Path(next(iter(spec.submodule_search_locations))).resolve() / "lib"
    assert (lib / "libllama.so").is_file(), (
        f"{lib} has no libllama.so: this test checks what `make install` installs; run it in the "
        "environment `make install` installed into, not on a source checkout through PYTHONPATH")
    return lib


def run_python(code: str, timeout: float = 300) -> str:
    result = subprocess.run([sys.executable, "-c", code], env=plain_env(), capture_output=True, text=True,
                            timeout=timeout, cwd=Path(__file__).resolve().parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_plain_import_llama_cpp_loads_the_patched_build() -> None:
    """`import llama_cpp` on its own, first, with no variable set: llama_cpp finds the one
    native build in its own lib folder, and pykvsmooth, imported after it, uses the same."""
    lib = installed_llama_cpp_lib()
    out = run_python(
        "import llama_cpp, llama_cpp.llama_cpp as l, llama_cpp.mtmd_cpp as m, json\n"
        "info = dict(llama=l._lib._name, mtmd=m._libmtmd._name,\n"
        "            patched=hasattr(l._lib, 'llama_kvsmooth_build_info'))\n"
        "import pykvsmooth\n"
        "info.update(lib_dir=str(pykvsmooth.lib_dir()), build=pykvsmooth.build_info())\n"
        "print(json.dumps(info))\n")
    info = json.loads(out)
    assert info["patched"], info
    assert info["build"].startswith("pykvsmooth "), info
    assert Path(info["llama"]).resolve().parent == Path(info["lib_dir"]) == lib, info
    assert Path(info["mtmd"]).resolve().parent == Path(info["lib_dir"]), info


def test_libraries_are_installed_once() -> None:
    """One copy of each library, in llama_cpp/lib; pykvsmooth/lib holds only the op runner."""
    import pykvsmooth

    pkg = Path(pykvsmooth.__file__).resolve().parent
    libs = sorted(p.name for p in pykvsmooth.lib_dir().iterdir())
    assert "libllama.so" in libs and "libmtmd.so" in libs and "libggml.so" in libs, libs
    if pykvsmooth.lib_dir() != (pkg / "lib").resolve():  # installed, not a source checkout
        assert sorted(p.name for p in (pkg / "lib").iterdir()) == ["libkvsmooth-op-runner.so"]
    hooks = re.compile("pykvsmooth|LLAMA_CPP_LIB_PATH|MTMD_CPP_LIB")
    pth = [p for p in pkg.parent.glob("*.pth") if hooks.search(p.read_text())]
    assert not pth, pth  # no start-up hooks
    assert (pkg / "py.typed").is_file()


def test_kvsmooth_off_is_bit_identical_through_plain_llama_cpp(tiny_llava: TinyLlava) -> None:
    """llama_cpp.Llama and pykvsmooth.Llama(kvsmooth=None) in one process that imported
    llama_cpp first: the same greedy tokens and bit-identical logits."""
    installed_llama_cpp_lib()
    out = run_python(
        "import json, llama_cpp, numpy as np\n"
        "import pykvsmooth\n"
        f"path = {str(tiny_llava.text)!r}\n"
        "prompt = [1] + [int(t) for t in np.random.default_rng(7).integers(3, 400, 40)]\n"
        "def run(cls, **kw):\n"
        "    llm = cls(model_path=path, n_ctx=256, n_batch=16, n_threads=2, logits_all=True, seed=0,\n"
        "              verbose=False, **kw)\n"
        "    out = []\n"
        "    for t in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):\n"
        "        out.append(int(t))\n"
        "        if len(out) == 12: break\n"
        "    return out, llm.scores[:llm.n_tokens].copy()\n"
        "a, sa = run(llama_cpp.Llama)\n"
        "b, sb = run(pykvsmooth.Llama, kvsmooth=None)\n"
        "c, _ = run(pykvsmooth.Llama, kvsmooth=0.9)\n"
        "print(json.dumps(dict(a=a, b=b, c=c, same=bool(np.array_equal(sa, sb)), n=int(sa.shape[0]))))\n")
    r = json.loads(out)
    assert r["a"] == r["b"] and len(r["a"]) == 12, r
    assert r["same"] and r["n"] == 41 + 11, r
    assert r["c"] != r["a"], r  # and KVSmooth on, in the same process, does change them


def test_llama_cpp_server_serves_on_the_patched_build(tiny_llava: TinyLlava) -> None:
    """`python -m llama_cpp.server`, untouched, starts and answers /v1/models on loopback."""
    installed_llama_cpp_lib()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_llava.text), "--host", "127.0.0.1",
         "--port", "0", "--n_ctx", "256"],
        env=plain_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    assert proc.stderr is not None
    stderr = proc.stderr
    threading.Thread(target=lambda: [lines.put(line) for line in stderr], daemon=True).start()
    seen: List[str] = []
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("llama_cpp.server did not start within 120 s:\n" + "".join(seen[-40:]))
            seen.append(line)
            match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            url = match.group(1) if match else None
            assert proc.poll() is None or url, "llama_cpp.server exited:\n" + "".join(seen[-40:])
        with urllib.request.urlopen(url + "/v1/models", timeout=60) as response:
            models = json.load(response)
        assert [m["id"] for m in models["data"]] == [str(tiny_llava.text)], models
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.parametrize("program", ["llama-mtmd-cli", "llama-llava-cli", "llama-server"])
def test_cli_help(program: str) -> None:
    path = shutil.which(program)
    assert path, f"{program} is not on PATH; run `make install`"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--kvsmooth" in result.stdout + result.stderr


def test_backend_ops_is_on_path() -> None:
    path = shutil.which("test-backend-ops")
    assert path, "test-backend-ops is not on PATH; run `make install`"
    result = subprocess.run([path, "perf", "-o", "KVSMOOTH", "-b", "CPU"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "KVSMOOTH(source=2" in result.stdout, result.stdout[-2000:]


def test_archive_with_wrong_checksum_is_refused(tmp_path: Path) -> None:
    lock = prepare_llama_cpp.read_lock()
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"\0" * int(lock["size"]))
    with pytest.raises(prepare_llama_cpp.PrepareError, match="checksum failed: sha256 of .*llama_cpp_python"):
        prepare_llama_cpp.verify_archive(fake, lock)
    fake.write_bytes(b"short")
    with pytest.raises(prepare_llama_cpp.PrepareError, match="is 5 bytes"):
        prepare_llama_cpp.verify_archive(fake, lock)


def test_patch_that_does_not_apply_is_named(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("one\ntwo\nthree\n")
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-broken.patch").write_text(
        "Description: does not apply\n---\n"
        "--- a/a.txt\n+++ b/a.txt\n@@ -1,3 +1,3 @@\n one\n-TWO\n+2\n three\n"
    )
    with pytest.raises(prepare_llama_cpp.PrepareError, match="patch 0001-broken.patch does not apply"):
        prepare_llama_cpp.apply_patches(tree, strict=True, patch_dir=patches)
    assert (tree / "a.txt").read_text() == "one\ntwo\nthree\n"


def test_series_applies_exactly() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_llama_cpp.py"), "--check"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "apply exactly" in result.stdout
