#!/usr/bin/env python3
"""Regenerate one patch of the series from a development tree.

A development tree is a git repository whose first commit is the pristine llama.cpp
source (``scripts/dev_tree.sh`` makes one).  Edit files there, then:

    scripts/refresh_patch.py --tree ../dev/llama.cpp patches/0003-ggml-cpu-kvsmooth.patch \
        ggml/src/ggml-cpu/ggml-cpu.c ggml/src/ggml-cpu/ops.h

The DEP-3 header of an existing patch is kept; the diff below it is replaced by the diff
of FILES from the pristine source with the earlier patches of the series applied to the
tree's files with the later patches taken back out (``git apply -R``), so that a file two
patches change (common/arg.cpp: the KVSmooth flags, the server's media flags) keeps each
patch's own hunks.  A new patch gets a header skeleton to fill in.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
from pathlib import Path

HEADER_TEMPLATE = """Description: TODO one line: what
 TODO: why, how, how tested.
Author: pykvsmooth developers
Forwarded: no
Last-Update: {date}
---
"""


def git(cwd: Path, *argv: str, ok: tuple = (0,)) -> str:
    run = subprocess.run(["git", *argv], cwd=cwd, capture_output=True, text=True)
    if run.returncode not in ok:
        sys.exit(f"error: git {' '.join(argv)}: {run.stderr.strip()}")
    return run.stdout


def file_diff(tree: Path, base: str, patch: Path, name: str) -> str:
    """The diff of ``name`` that ``patch`` makes in the series (see the module's docstring)."""
    series = sorted(patch.parent.glob("*.patch"))
    earlier = [p for p in series if p.name < patch.name]
    later = [p for p in series if p.name > patch.name]
    with tempfile.TemporaryDirectory() as tmp:
        before, after = Path(tmp, "a"), Path(tmp, "b")
        for side in (before, after):
            (side / name).parent.mkdir(parents=True, exist_ok=True)
        pristine = subprocess.run(["git", "show", f"{base}:{name}"], cwd=tree, capture_output=True)
        if pristine.returncode == 0:
            (before / name).write_bytes(pristine.stdout)
        if (tree / name).exists():
            (after / name).write_bytes((tree / name).read_bytes())
        for p in earlier:
            if f" b/{name}\n" in p.read_text():
                git(before, "apply", f"--include={name}", str(p))
        for p in reversed(later):
            if f" b/{name}\n" in p.read_text():
                git(after, "apply", "-R", f"--include={name}", str(p))
        out = git(Path(tmp), "diff", "--no-index", "--no-prefix", "--no-color", "--no-ext-diff", "--",
                  f"a/{name}" if (before / name).exists() else "/dev/null",
                  f"b/{name}" if (after / name).exists() else "/dev/null", ok=(0, 1))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, required=True, help="development tree (git)")
    parser.add_argument("patch", type=Path)
    parser.add_argument("files", nargs="+", help="paths relative to the tree")
    args = parser.parse_args()

    tree = args.tree.resolve()
    base = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=tree,
                          check=True, capture_output=True, text=True).stdout.split()[0]
    diff = "".join(file_diff(tree, base, args.patch.resolve(), name) for name in args.files)
    if not diff:
        print(f"error: {', '.join(args.files)} unchanged from pristine", file=sys.stderr)
        return 1
    # drop the "index abc..def" lines: they name blobs of a private repository
    diff = "".join(line for line in diff.splitlines(keepends=True) if not line.startswith("index "))

    date = datetime.date.today().isoformat()
    if args.patch.exists():
        old = args.patch.read_text()
        header, sep, _ = old.partition("\n---\n")
        header = (header + "\n---\n") if sep else HEADER_TEMPLATE.format(date=date)
        lines = [f"Last-Update: {date}" if line.startswith("Last-Update:") else line
                 for line in header.splitlines()]
        header = "\n".join(lines) + "\n"
    else:
        header = HEADER_TEMPLATE.format(date=date)
    args.patch.write_text(header + diff)
    print(f"wrote {args.patch} ({len(diff.splitlines())} diff lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
