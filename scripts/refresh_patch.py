#!/usr/bin/env python3
"""Regenerate one patch of the series from a development tree.

A development tree is a git repository whose first commit is the pristine llama.cpp
source (``scripts/dev_tree.sh`` makes one).  Edit files there, then:

    scripts/refresh_patch.py --tree ../dev/llama.cpp patches/0003-ggml-cpu-kvsmooth.patch \
        ggml/src/ggml-cpu/ggml-cpu.c ggml/src/ggml-cpu/ops.h

The DEP-3 header of an existing patch is kept; the diff below it is replaced by
``git diff <pristine> -- FILES``.  A new patch gets a header skeleton to fill in.
Each file should belong to exactly one patch so the series applies in any state.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

HEADER_TEMPLATE = """Description: TODO one line: what
 TODO: why, how, how tested.
Author: pykvsmooth developers
Forwarded: no
Last-Update: {date}
---
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, required=True, help="development tree (git)")
    parser.add_argument("patch", type=Path)
    parser.add_argument("files", nargs="+", help="paths relative to the tree")
    args = parser.parse_args()

    tree = args.tree.resolve()
    base = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=tree,
                          check=True, capture_output=True, text=True).stdout.split()[0]
    diff = subprocess.run(
        ["git", "diff", "--no-color", "--no-ext-diff", "--no-renames", base, "--", *args.files],
        cwd=tree, check=True, capture_output=True, text=True,
    ).stdout
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
