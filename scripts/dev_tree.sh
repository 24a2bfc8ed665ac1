#!/bin/sh
# Make a development tree for editing the patch series: the pristine llama.cpp source as
# the first commit of a git repository, the current patches applied on top (uncommitted)
# and native/ linked in.  Regenerate a patch from it with scripts/refresh_patch.py.
#   usage: scripts/dev_tree.sh DIR
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:?usage: scripts/dev_tree.sh DIR}
[ ! -e "$dir" ] || { echo "error: $dir exists" >&2; exit 1; }
pristine=$(python3 "$here/scripts/prepare_llama_cpp.py" --print-pristine)
cp -a "$pristine" "$dir"
cd "$dir"
git init -q && git add -A && git -c user.name=pristine -c user.email=none commit -qm pristine
for p in "$here"/patches/*.patch; do [ -e "$p" ] && git apply --whitespace=nowarn "$p"; done
python3 - "$here" "$dir" <<'PY'
import sys; from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/scripts")
import prepare_llama_cpp as p
p.link_native(Path(sys.argv[2]).resolve())
PY
echo "$dir"
