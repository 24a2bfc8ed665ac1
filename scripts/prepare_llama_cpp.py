#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source, verify it, and prepare a patched tree.

The source is the copy of llama.cpp vendored in the llama-cpp-python sdist named in
``scripts/llama-cpp-python.lock``.  Steps:

1. ``pip download`` the sdist into a cache directory (outside the source tree) unless a
   copy with the committed sha256 and size is already there.
2. Extract the parts of ``vendor/llama.cpp`` the build needs into ``<cache>/pristine-<commit>``.
3. Copy that tree to ``--out``, apply ``patches/*.patch`` in order with ``git apply`` (no
   fuzz), and link every file under ``native/`` into the same relative place.

Step 3 writes only the files whose content changed, so a rebuild after touching one file
recompiles only what depends on it.  ``--check`` applies the series to a scratch copy and
fails on any hunk that does not apply exactly at its recorded line.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK_FILE = ROOT / "scripts" / "llama-cpp-python.lock"
PATCH_DIR = ROOT / "patches"
NATIVE_DIR = ROOT / "native"

# Top-level entries of vendor/llama.cpp that the build needs; the rest (models, docs,
# media, other tools) is left in the archive.
KEEP = (
    "CMakeLists.txt",
    "LICENSE",
    "cmake",
    "common",
    "ggml",
    "include",
    "licenses",
    "src",
    "vendor",
    "tools/mtmd",
    "tools/server",
    # llama-server's llama-ui library, built without its web assets (no npm, no download)
    "tools/ui/CMakeLists.txt",
    "tools/ui/ui.cpp.in",
    "tools/ui/ui.h.in",
    "scripts/ui-assets.cmake",
    "tests/test-backend-ops.cpp",
)
# Large files inside KEEP that nothing builds from.
DROP_SUFFIXES = (".jpeg", ".jpg", ".mp3", ".mp4", ".png", ".wav")


class PrepareError(RuntimeError):
    pass


def read_lock() -> dict[str, str]:
    lock: dict[str, str] = {}
    for line in LOCK_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            lock[key.strip()] = value.strip()
    for key in ("package", "version", "sha256", "size", "llama_cpp_commit"):
        if key not in lock:
            raise PrepareError(f"{LOCK_FILE}: missing '{key} = ...'")
    return lock


def default_cache_dir() -> Path:
    env = os.environ.get("PYKVSMOOTH_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pykvsmooth"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(path: Path, lock: dict[str, str]) -> None:
    size = path.stat().st_size
    if size != int(lock["size"]):
        raise PrepareError(
            f"checksum failed: {path} is {size} bytes, {LOCK_FILE.name} says {lock['size']}; "
            f"delete it and rebuild to download it again"
        )
    digest = sha256_of(path)
    if digest != lock["sha256"]:
        raise PrepareError(
            f"checksum failed: sha256 of {path} is {digest}, {LOCK_FILE.name} says "
            f"{lock['sha256']}; delete it and rebuild to download it again"
        )


def fetch_archive(cache: Path, lock: dict[str, str]) -> Path:
    name = f"{lock['package'].replace('-', '_')}-{lock['version']}.tar.gz"
    archive = cache / name
    if archive.exists():
        verify_archive(archive, lock)
        return archive
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # --no-build-isolation: pip only reads the sdist's metadata; with isolation it
        # would first build the sdist's build requirements from source (cmake included).
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--no-build-isolation", f"{lock['package']}=={lock['version']}", "-d", tmp,
        ]
        # stderr: stdout carries the paths that --print-archive/--print-pristine answer with
        print("pykvsmooth: " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise PrepareError(
                f"pip download of {lock['package']}=={lock['version']} failed "
                f"(exit {result.returncode}):\n{result.stdout[-2000:]}\n"
                "Without network access, put the sdist into "
                f"{cache} yourself (PYKVSMOOTH_CACHE_DIR chooses that folder)."
            )
        downloaded = Path(tmp) / name
        if not downloaded.exists():
            raise PrepareError(f"pip download did not produce {name} in {tmp}")
        verify_archive(downloaded, lock)
        downloaded.replace(archive)
    return archive


def keep_member(rel: str) -> bool:
    if rel.endswith(DROP_SUFFIXES):
        return False
    return any(rel == k or rel.startswith(k + "/") for k in KEEP)


def extract_pristine(cache: Path, archive: Path, lock: dict[str, str]) -> Path:
    pristine = cache / f"pristine-{lock['llama_cpp_commit'][:12]}"
    stamp = pristine / ".pykvsmooth-complete"
    stamp_text = lock["llama_cpp_commit"] + "\n" + " ".join(KEEP) + "\n"
    if stamp.exists() and stamp.read_text() == stamp_text:
        return pristine
    if pristine.exists():
        shutil.rmtree(pristine)
    prefix = f"{lock['package'].replace('-', '_')}-{lock['version']}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix="pristine-"))
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not member.name.startswith(prefix):
                continue
            rel = member.name[len(prefix):]
            if not rel or not keep_member(rel) or not (member.isfile() or member.isdir()):
                continue
            member.name = rel
            tar.extract(member, tmp, filter="data")
    (tmp / ".pykvsmooth-complete").write_text(stamp_text)
    tmp.replace(pristine)
    return pristine


def patch_files(patch_dir: Path = PATCH_DIR) -> list[Path]:
    return sorted(patch_dir.glob("*.patch"))


def native_files() -> list[Path]:
    if not NATIVE_DIR.exists():
        return []
    return sorted(p for p in NATIVE_DIR.rglob("*") if p.is_file() and p.name != "README.md")


def apply_patches(tree: Path, strict: bool, patch_dir: Path = PATCH_DIR) -> None:
    env = dict(os.environ)
    # Keep git from finding a repository above the tree: inside one, `git apply` takes
    # paths relative to that repository's root and silently skips the rest.
    env["GIT_CEILING_DIRECTORIES"] = str(tree.parent)
    for patch in patch_files(patch_dir):
        result = subprocess.run(
            ["git", "apply", "--verbose", "--whitespace=nowarn", str(patch)],
            cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        if result.returncode != 0:
            raise PrepareError(f"patch {patch.name} does not apply:\n{result.stdout.strip()}")
        if strict:
            inexact = [line for line in result.stdout.splitlines() if "offset" in line or "fuzz" in line]
            if inexact:
                raise PrepareError(f"patch {patch.name} applies only inexactly:\n" + "\n".join(inexact))


def link_native(tree: Path) -> None:
    for src in native_files():
        dst = tree / src.relative_to(NATIVE_DIR)
        if dst.exists() and not dst.is_symlink():
            raise PrepareError(f"native/{src.relative_to(NATIVE_DIR)} would replace a llama.cpp file")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() and os.readlink(dst) == str(src):
            continue
        if dst.is_symlink():
            dst.unlink()
        dst.symlink_to(src)


def sync_tree(src: Path, dst: Path) -> None:
    """Make dst a copy of src, touching only files whose content differs."""
    dst.mkdir(parents=True, exist_ok=True)
    wanted: set[Path] = set()
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        wanted.add(rel)
        target = dst / rel
        if path.is_dir():
            target.mkdir(exist_ok=True)
            continue
        if target.is_file() and not target.is_symlink() and target.read_bytes() == path.read_bytes():
            continue
        if target.is_symlink():
            target.unlink()
        shutil.copy2(path, target)
    for path in sorted(dst.rglob("*"), reverse=True):
        rel = path.relative_to(dst)
        if rel in wanted or path.is_symlink():
            continue  # symlinks are native/ files, managed by link_native
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink()


def series_digest() -> str:
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    for patch in patch_files():
        digest.update(patch.name.encode() + b"\0" + patch.read_bytes())
    return digest.hexdigest()


def prepare(out: Path, cache: Path) -> Path:
    lock = read_lock()
    pristine = extract_pristine(cache, fetch_archive(cache, lock), lock)
    stamp = out / ".pykvsmooth-series"
    digest = series_digest()
    if not (stamp.exists() and stamp.read_text().strip() == digest):
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
            scratch = Path(tmp) / "llama.cpp"
            shutil.copytree(pristine, scratch, symlinks=True)
            apply_patches(scratch, strict=False)
            sync_tree(scratch, out)
        stamp.write_text(digest + "\n")
    # remove links to native files that no longer exist, then (re)link the current ones
    for path in out.rglob("*"):
        if path.is_symlink() and not path.exists():
            path.unlink()
    link_native(out)
    return out


def check(cache: Path) -> None:
    lock = read_lock()
    pristine = extract_pristine(cache, fetch_archive(cache, lock), lock)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "llama.cpp"
        shutil.copytree(pristine, scratch, symlinks=True)
        apply_patches(scratch, strict=True)
        link_native(scratch)
    print(f"pykvsmooth: {len(patch_files())} patches apply exactly to llama.cpp "
          f"{lock['llama_cpp_commit'][:12]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to write the patched tree")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="download/extract cache (default: $PYKVSMOOTH_CACHE_DIR or ~/.cache/pykvsmooth)")
    parser.add_argument("--check", action="store_true",
                        help="apply the series to a scratch copy; fail on any inexact hunk")
    parser.add_argument("--print-pristine", action="store_true",
                        help="fetch and extract only; print the pristine tree's path")
    parser.add_argument("--print-archive", action="store_true",
                        help="fetch and verify only; print the sdist's path")
    args = parser.parse_args()
    cache = (args.cache_dir or default_cache_dir()).resolve()
    try:
        if args.check:
            check(cache)
        elif args.print_archive:
            print(fetch_archive(cache, read_lock()))
        elif args.print_pristine:
            lock = read_lock()
            print(extract_pristine(cache, fetch_archive(cache, lock), lock))
        elif args.out:
            print(prepare(args.out.resolve(), cache))
        else:
            parser.error("one of --out, --check, --print-pristine, --print-archive is required")
    except PrepareError as err:
        print(f"pykvsmooth: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
