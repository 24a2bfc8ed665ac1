"""Models by Hugging Face repository name, as llama.cpp's ``-hf`` takes them.

    kvsmooth-caption photos/ -hf second-state/Llava-v1.5-7B-GGUF:Q4_K_M

``REPO[:QUANT]`` names a model repository and, optionally, a quantization tag. The files
are picked as the pinned llama.cpp picks them (``common/download.cpp``,
``find_best_model`` / ``find_best_mmproj``):

- the model: with a tag, the first GGUF whose path matches ``TAG[.-]`` (any case); without
  one, the first matching ``Q4_K_M``, then ``Q8_0``, then the first GGUF at all. Files
  named ``*mmproj*``, ``*imatrix*``, ``*mtp-*``, ``*eagle3-*``, ``*dflash-*``, ``*dspark-*``
  are never the model; of a split model (``-00001-of-00003``) the first part is picked and
  every part is downloaded. ``--hf-file`` names the file instead.
- the projector: the GGUF with ``mmproj`` in its path in the model's folder or a folder
  above it, the deepest such folder first, then the quantization closest in bits to the
  model's (``f16`` is 16, ``Q4_K_M`` is 4).

Downloads go through ``huggingface_hub`` (its progress bar, its cache under
``HF_HOME``/``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_ENDPOINT``). Offline (``HF_HUB_OFFLINE=1``
or ``--offline``), and when the hub cannot be reached, the files are taken from that cache.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, NoReturn, Optional, Sequence, Tuple

# The model that `kvsmooth-caption photos/` uses when none is named: the paper's LLaVA-1.5
# 7B (its CHAIR numbers are for this model), at llama.cpp's default quantization.
DEFAULT_REPO = "second-state/Llava-v1.5-7B-GGUF:Q4_K_M"
# llama.cpp's order when no tag is given
DEFAULT_TAGS = ("Q4_K_M", "Q8_0")
# llama.cpp's gguf_filename_is_model: files with these in their name are never the model
_NOT_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)


class HubError(RuntimeError):
    """A model could not be found or fetched; the message says what to do."""


@dataclass(frozen=True)
class HubModel:
    """Local paths of a repository's model (its first part, if split) and projector."""

    repo: str
    revision: str
    model_file: str
    mmproj_file: Optional[str]
    model: Path
    mmproj: Optional[Path]


# --- picking files, as common/download.cpp does --------------------------------------------


def split_repo_tag(spec: str) -> Tuple[str, str]:
    """``"user/model:Q4_K_M"`` -> ``("user/model", "Q4_K_M")``; the tag may be empty."""
    repo, _, tag = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if len(repo.split("/")) != 2 or not all(repo.split("/")):
        raise HubError(f"invalid Hugging Face repository {spec!r}: expected <user>/<model>[:quant], "
                       "e.g. second-state/Llava-v1.5-7B-GGUF:Q4_K_M")
    return repo, tag


def _split_info(path: str) -> Tuple[str, str, int, int]:
    """(prefix without .gguf and split suffix, upper-case quant tag, part index, part count)."""
    prefix = path[:-5] if path.endswith(".gguf") else path
    index = count = 1
    m = _SPLIT.match(prefix)
    if m:
        prefix, index, count = m.group(1), int(m.group(2)), int(m.group(3))
    t = _TAG.search(prefix)
    return prefix, (t.group(1).upper() if t else ""), index, count


def _quant_bits(path: str) -> int:
    """``Q4_0`` -> 4, ``F16`` -> 16, ``Q8_K_M`` -> 8; 0 when the name has no tag."""
    m = re.search(r"[0-9]+", _split_info(path)[1])
    return int(m.group()) if m else 0


def _is_model(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return path.endswith(".gguf") and not any(word in name for word in _NOT_MODEL)


def _first_part(files: Sequence[str], accept: "re.Pattern[str] | None") -> Optional[str]:
    for f in files:
        if _is_model(f) and (accept is None or accept.search(f)):
            _, _, index, count = _split_info(f)
            if count <= 1 or index == 1:
                return f
    return None


def find_best_model(files: Sequence[str], tag: str = "") -> Optional[str]:
    for t in ([tag] if tag else DEFAULT_TAGS):
        found = _first_part(files, re.compile(re.escape(t) + "[.-]", re.IGNORECASE))
        if found is not None:
            return found
    return None if tag else _first_part(files, None)


def split_parts(files: Sequence[str], first: str) -> List[str]:
    """Every part of a split model (just ``first`` when it is not split)."""
    prefix, _, _, count = _split_info(first)
    if count <= 1:
        return [first]
    return sorted(f for f in files if _split_info(f)[0] == prefix and _split_info(f)[3] == count)


def find_best_mmproj(files: Sequence[str], model: str) -> Optional[str]:
    model_dirs = model.split("/")[:-1]
    model_bits = _quant_bits(model)
    best: Optional[str] = None
    best_key: Tuple[int, int] = (0, 0)
    for f in files:
        if not f.endswith(".gguf") or "mmproj" not in f:
            continue
        dirs = f.split("/")[:-1]
        if dirs != model_dirs[:len(dirs)]:  # in the model's folder or one above it
            continue
        key = (len(dirs), -abs(_quant_bits(f) - model_bits))
        if best is None or key > best_key:
            best, best_key = f, key
    return best


def select_files(files: Sequence[str], tag: str = "", hf_file: Optional[str] = None,
                 repo: str = "the repository") -> Tuple[List[str], Optional[str]]:
    """(the model's files, first part first; the projector or None). HubError when no model
    file fits, listing the GGUF files there are."""
    ggufs = [f for f in files if f.endswith(".gguf")]
    available = ", ".join(ggufs) if ggufs else "none"
    if hf_file is not None:
        if hf_file not in files:
            raise HubError(f"{repo} has no file {hf_file!r}; its GGUF files: {available}")
        primary: Optional[str] = hf_file
    else:
        primary = find_best_model(files, tag)
    if primary is None:
        wanted = f"GGUF model file with the quantization tag {tag}" if tag else "GGUF model file"
        raise HubError(f"{repo} has no {wanted}; its GGUF files: {available}. "
                       "Name one with REPO:TAG (e.g. :Q8_0) or --hf-file FILE")
    parts = split_parts(files, primary)
    return [primary] + [p for p in parts if p != primary], find_best_mmproj(files, primary)


# --- fetching -------------------------------------------------------------------------------


def _storage(repo: str, cache_dir: Optional[str]) -> Path:
    """huggingface_hub's cache folder of a model repository."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")


def _remember_revision(repo: str, revision: str, commit: str, cache_dir: Optional[str]) -> None:
    """refs/<revision> = commit, as huggingface_hub and llama.cpp keep it, so that an offline
    run finds the snapshot (downloads by commit do not write it)."""
    if revision == commit:
        return
    ref = _storage(repo, cache_dir) / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.tmp")
        tmp.write_text(commit, encoding="utf-8")
        os.replace(tmp, ref)
    except OSError:
        pass  # a read-only cache: offline runs then need the revision's commit


def _cached_listing(repo: str, revision: str, cache_dir: Optional[str]) -> Tuple[str, List[str]]:
    """(commit, files) of the cached snapshot of repo at revision; ("", []) if none."""
    storage = _storage(repo, cache_dir)
    commit = revision
    ref = storage / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        return "", []
    files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    return commit, files


def resolve(spec: str, *, hf_file: Optional[str] = None, token: Optional[str] = None, offline: bool = False,
            want_mmproj: bool = True, revision: str = "main", cache_dir: Optional[str] = None) -> HubModel:
    """Download (or find in the cache) the model and projector that ``REPO[:QUANT]`` names."""
    try:
        from huggingface_hub import HfApi, constants, hf_hub_download
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - a dependency of pykvsmooth
        raise HubError("models by repository name need huggingface_hub: pip install huggingface_hub") from None

    repo, tag = split_repo_tag(spec)
    offline = offline or getattr(constants, "is_offline_mode", lambda: bool(constants.HF_HUB_OFFLINE))()
    commit, files = "", []
    reason = "offline mode is on (HF_HUB_OFFLINE=1 or --offline)"
    if not offline:
        try:
            info = HfApi(token=token).model_info(repo, revision=None if revision == "main" else revision)
            commit, files = info.sha or revision, [s.rfilename for s in info.siblings or []]
        except GatedRepoError:
            raise HubError(f"{repo} is gated: accept its terms on the hub, then set HF_TOKEN or pass "
                           "--hf-token") from None
        except RepositoryNotFoundError:
            raise HubError(f"no model repository {repo} at {constants.ENDPOINT} (a private one needs "
                           "HF_TOKEN or --hf-token)") from None
        except HfHubHTTPError as e:
            raise HubError(f"{repo}: the hub answered: {e}") from None
        except Exception as e:  # noqa: BLE001 - no connection: fall back to the cache, as llama.cpp does
            reason = f"the hub could not be reached ({type(e).__name__}: {e})"
    if not files:
        commit, files = _cached_listing(repo, revision, cache_dir)
        if not files:
            cache = cache_dir or constants.HF_HUB_CACHE
            raise HubError(f"{repo} is not in the Hugging Face cache ({cache}) and {reason}: "
                           "run once with network access, or pass --model and --mmproj")
        offline = True
    model_files, mmproj_file = select_files(files, tag, hf_file, repo)
    if want_mmproj and mmproj_file is None:
        raise HubError(f"{repo} has no mmproj (projector) GGUF file next to {model_files[0]}: "
                       "pass --mmproj FILE")
    if not want_mmproj:
        mmproj_file = None

    def fetch(filename: str) -> Path:
        try:
            return Path(hf_hub_download(repo, filename, revision=commit, token=token,
                                        local_files_only=offline, cache_dir=cache_dir))
        except Exception as e:  # noqa: BLE001 - huggingface_hub's errors name the file and the cause
            raise HubError(f"{repo}: could not get {filename}: {e}") from None

    paths = [fetch(f) for f in model_files]
    mmproj = fetch(mmproj_file) if mmproj_file is not None else None
    if not offline:
        _remember_revision(repo, revision, commit, cache_dir)
    return HubModel(repo, commit, model_files[0], mmproj_file, paths[0], mmproj)


# --- command lines --------------------------------------------------------------------------


def add_hub_arguments(parser: argparse.ArgumentParser, *, default_repo: Optional[str] = None) -> None:
    """-hf/-hfr/--hf-repo, -hff/--hf-file, -hft/--hf-token, --offline (llama.cpp's names)."""
    group = parser.add_argument_group("Models by Hugging Face repository name")
    default = f" (default when no model is given: {default_repo})" if default_repo else ""
    group.add_argument("-hf", "-hfr", "--hf-repo", metavar="USER/MODEL[:QUANT]", dest="hf_repo",
                       help="download the model and its mmproj from this repository, as llama.cpp's -hf: "
                            "QUANT defaults to Q4_K_M, then Q8_0, then the first GGUF" + default)
    group.add_argument("-hff", "--hf-file", metavar="FILE", dest="hf_file",
                       help="the model file in --hf-repo (overrides QUANT)")
    group.add_argument("-hft", "--hf-token", metavar="TOKEN", dest="hf_token",
                       help="Hugging Face access token (default: HF_TOKEN or the saved login)")
    group.add_argument("--offline", action="store_true",
                       help="use only the Hugging Face cache, never the network (as HF_HUB_OFFLINE=1)")


def resolve_args(args: argparse.Namespace, *, model_dest: str = "model", mmproj_dest: str = "mmproj",
                 default_repo: Optional[str] = None,
                 parser: Optional[argparse.ArgumentParser] = None) -> Optional[HubModel]:
    """Fill ``args.<model_dest>`` / ``args.<mmproj_dest>`` from --hf-repo (or ``default_repo``
    when no model is given at all); an explicit mmproj is kept. Returns what was fetched, or
    None. With ``parser``, a HubError ends the program through it (exit status 1)."""
    spec = getattr(args, "hf_repo", None)
    if spec is None and getattr(args, "hf_file", None) is not None:
        _fail(parser, HubError("--hf-file needs --hf-repo (the repository it is in)"))
    if spec is not None and getattr(args, model_dest, None):
        _fail(parser, HubError(f"give --model or --hf-repo, not both (got {getattr(args, model_dest)} "
                                      f"and {spec})"))
    if spec is None:
        if getattr(args, model_dest, None) or default_repo is None:
            return None
        spec = default_repo
        prog = parser.prog if parser is not None else "pykvsmooth"
        print(f"{prog}: no model given: using {spec} (pass --model/--mmproj or -hf REPO for another)",
              file=sys.stderr, flush=True)
    try:
        got = resolve(spec, hf_file=getattr(args, "hf_file", None), token=getattr(args, "hf_token", None),
                      offline=bool(getattr(args, "offline", False)),
                      want_mmproj=not getattr(args, mmproj_dest, None))
    except HubError as e:
        _fail(parser, e)
    setattr(args, model_dest, str(got.model))
    if got.mmproj is not None:
        setattr(args, mmproj_dest, str(got.mmproj))
    return got


def _fail(parser: Optional[argparse.ArgumentParser], error: HubError) -> NoReturn:
    if parser is None:
        raise error
    parser.exit(1, f"{parser.prog}: error: {error}\n")
