"""Build smoke tests: the installed package loads the patched libraries, both CLIs run,
and the source preparation refuses a bad archive or patch with a message naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("program", ["llama-mtmd-cli", "llama-llava-cli"])
def test_cli_help(program: str) -> None:
    path = shutil.which(program)
    assert path, f"{program} is not on PATH; run `make install`"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--kvsmooth" in result.stdout + result.stderr


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
