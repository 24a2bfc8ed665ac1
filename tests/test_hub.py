"""Models by repository name (pykvsmooth.hub) against a loopback stand-in for the Hugging
Face hub: file selection as llama.cpp's -hf does it, ``kvsmooth-caption photos/`` on a fresh
machine (the default model), the cache and offline mode, clear errors, and -hf in the server
and ``kvsmooth-eval generate``. Nothing is downloaded from outside this machine."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import make_tiny_llava
import pytest
from conftest import TinyLlava

from pykvsmooth import hub

TIMEOUT_S = 300
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DEFAULT_REPO = hub.DEFAULT_REPO.split(":")[0]


class FakeHub:
    """The few routes huggingface_hub calls: model info (``/api/models/REPO[/revision/REV]``,
    with ``sha`` and ``siblings``) and ``/REPO/resolve/REV/FILE`` (HEAD and GET, with the
    X-Repo-Commit, ETag and Content-Length headers it checks). Every request is logged."""

    def __init__(self, repos: Dict[str, Dict[str, bytes]]) -> None:
        self.repos = repos
        self.requests: List[Tuple[str, str]] = []
        self.authorization: List[str] = []  # the Authorization headers that came
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub_._answer(self, body=False)

            def do_GET(self) -> None:
                hub_._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?", 1)[0]
        self.requests.append((h.command, path))
        self.authorization.append(h.headers.get("Authorization", ""))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._send(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)
            info = {"id": repo, "modelId": repo, "sha": COMMIT,
                    "siblings": [{"rfilename": f} for f in self.repos[repo]]}
            return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            files = self.repos.get(repo)
            if files is None:
                return self._send(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)
            if name not in files:
                return self._send(h, 404, b'{"error": "Entry not found"}',
                                  {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, body)
            data = files[name]
            return self._send(h, 200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                             "Content-Type": "application/octet-stream"}, body)
        self._send(h, 404, b"{}", {}, body)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: Dict[str, str], body: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def downloads(self) -> List[str]:
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fake_hub(tiny_llava: TinyLlava) -> Iterator[FakeHub]:
    text, mmproj = tiny_llava.text.read_bytes(), tiny_llava.mmproj.read_bytes()
    decoy = b"not a model: must never be downloaded"
    server = FakeHub({
        DEFAULT_REPO: {  # the default model's real file names; the tiny pair in place of the weights
            ".gitattributes": b"*.gguf filter=lfs\n", "README.md": b"# LLaVA\n",
            "llava-v1.5-7b-Q2_K.gguf": decoy, "llava-v1.5-7b-Q4_K_M.gguf": text,
            "llava-v1.5-7b-Q8_0.gguf": decoy, "llava-v1.5-7b-mmproj-model-f16.gguf": mmproj,
        },
        "tester/tiny-GGUF": {"tiny-f32.gguf": text, "nested/mmproj-tiny-f32.gguf": mmproj},
        "tester/no-mmproj-GGUF": {"tiny-Q4_K_M.gguf": text},
    })
    yield server
    server.close()


def hub_env(fake_hub: FakeHub, home: Path, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYKVSMOOTH_M", "LLAMA_ARG_"))}
    env.update(HF_ENDPOINT=fake_hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


def photos(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_tiny_llava.write_test_image(folder / f"p{i}.png", size=(64, 48), seed=i)
    return folder


def run(cmd: List[str], env: Dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def caption_cmd(*args: object) -> List[str]:
    return [sys.executable, "-m", "pykvsmooth.caption", *map(str, args), "--max-tokens", "8"]


# --- choosing files, as common/download.cpp does ------------------------------------------------


def test_select_files_follows_llama_cpp() -> None:
    second_state = ["README.md", "llava-v1.5-7b-Q2_K.gguf", "llava-v1.5-7b-Q4_K_M.gguf", "llava-v1.5-7b-Q8_0.gguf",
                    "llava-v1.5-7b-mmproj-model-f16.gguf"]
    assert hub.select_files(second_state) == (["llava-v1.5-7b-Q4_K_M.gguf"], "llava-v1.5-7b-mmproj-model-f16.gguf")
    assert hub.select_files(second_state, "q8_0")[0] == ["llava-v1.5-7b-Q8_0.gguf"]  # any case
    assert hub.select_files(second_state[:2] + second_state[3:])[0] == ["llava-v1.5-7b-Q8_0.gguf"]
    # neither Q4_K_M nor Q8_0: the first GGUF that is not a projector (mys/ggml_llava-v1.5-7b)
    mys = ["mmproj-model-f16.gguf", "ggml-model-f16.gguf", "ggml-model-q4_k.gguf"]
    assert hub.select_files(mys) == (["ggml-model-f16.gguf"], "mmproj-model-f16.gguf")
    assert hub.select_files(mys, hf_file="ggml-model-q4_k.gguf")[0] == ["ggml-model-q4_k.gguf"]
    # a split model: the first part, then the others; imatrix and mtp files are never the model
    split = ["m-imatrix-Q4_K_M.gguf", "m-Q4_K_M-00002-of-00002.gguf", "m-Q4_K_M-00001-of-00002.gguf"]
    assert hub.select_files(split)[0] == ["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf"]
    # the projector: the deepest folder above the model, then the closest number of bits
    nested = ["Q4/model-Q4_K_M.gguf", "mmproj-Q4_0.gguf", "Q4/mmproj-f16.gguf", "Q4/mmproj-Q8_0.gguf",
              "other/mmproj-Q4_0.gguf"]
    assert hub.select_files(nested) == (["Q4/model-Q4_K_M.gguf"], "Q4/mmproj-Q8_0.gguf")
    assert hub.find_best_mmproj(["x/mmproj-Q4_0.gguf"], "model-Q4_0.gguf") is None  # not above the model
    assert hub.split_repo_tag("a/b:Q4_K_M") == ("a/b", "Q4_K_M") and hub.split_repo_tag("a/b") == ("a/b", "")


@pytest.mark.parametrize("spec", ["justaname", "a/b/c", "/b:Q4"])
def test_bad_repository_names(spec: str) -> None:
    with pytest.raises(hub.HubError, match="expected <user>/<model>"):
        hub.split_repo_tag(spec)


def test_missing_quant_or_file_is_a_clear_error() -> None:
    files = ["x-Q8_0.gguf", "mmproj-x-f16.gguf", "README.md"]
    with pytest.raises(hub.HubError, match=r"a/b has no GGUF model file with the quantization tag Q5_K_M; "
                                           r"its GGUF files: x-Q8_0.gguf, mmproj-x-f16.gguf"):
        hub.select_files(files, "Q5_K_M", repo="a/b")
    with pytest.raises(hub.HubError, match="has no file 'y.gguf'"):
        hub.select_files(files, hf_file="y.gguf")
    with pytest.raises(hub.HubError, match="has no GGUF model file"):
        hub.select_files(["mmproj-only.gguf"])


# --- the captioner on a fresh machine ------------------------------------------------------------


def test_fresh_machine_default_model_then_cache_offline(fake_hub: FakeHub, tmp_path: Path) -> None:
    """`kvsmooth-caption photos/` with nothing but the program: the default model comes from
    the hub into huggingface_hub's cache; later runs take it from there, offline too."""
    script = shutil.which("kvsmooth-caption")
    assert script, "kvsmooth-caption is not on PATH: run `make install`"
    env = hub_env(fake_hub, tmp_path / "hf")
    folder = photos(tmp_path / "photos", 2)
    fake_hub.requests.clear()
    first = run([script, "photos/", "--max-tokens", "8"], env, tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"using {hub.DEFAULT_REPO}" in first.stderr
    assert "2 captioned, 0 skipped, 0 failed" in first.stderr
    for image in folder.glob("*.png"):
        assert image.with_suffix(".txt").read_text(encoding="utf-8").strip()
    assert sorted(fake_hub.downloads()) == sorted(
        f"/{DEFAULT_REPO}/resolve/{COMMIT}/{f}" for f in ("llava-v1.5-7b-Q4_K_M.gguf",
                                                         "llava-v1.5-7b-mmproj-model-f16.gguf"))
    snapshot = tmp_path / "hf" / "hub" / "models--second-state--Llava-v1.5-7B-GGUF" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == ["llava-v1.5-7b-Q4_K_M.gguf",
                                                          "llava-v1.5-7b-mmproj-model-f16.gguf"]

    # the JSONL names the repository and revision
    again = run(caption_cmd(folder / "p0.png", "--out", "c.jsonl", "-hf", hub.DEFAULT_REPO), env, tmp_path)
    assert again.returncode == 0, again.stderr
    record = json.loads((tmp_path / "c.jsonl").read_text(encoding="utf-8"))
    assert record["settings"]["hf_repo"] == DEFAULT_REPO and record["settings"]["hf_revision"] == COMMIT
    assert record["settings"]["model"] == "llava-v1.5-7b-Q4_K_M.gguf"
    assert len(fake_hub.downloads()) == 2  # cached: nothing downloaded again

    # offline: not a single request, the same files
    fake_hub.requests.clear()
    offline = run(caption_cmd(folder / "p1.png", "--out", "d.jsonl"), dict(env, HF_HUB_OFFLINE="1"), tmp_path)
    assert offline.returncode == 0, offline.stderr
    assert fake_hub.requests == []
    flag = run(caption_cmd(folder / "p1.png", "--out", "e.jsonl", "--offline"), env, tmp_path)
    assert flag.returncode == 0 and fake_hub.requests == [], flag.stderr
    assert json.loads((tmp_path / "d.jsonl").read_text())["caption"] == \
        json.loads((tmp_path / "e.jsonl").read_text())["caption"]

    # offline with an empty cache: what to do, not a traceback
    empty = run(caption_cmd(folder / "p1.png"), dict(env, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty")),
                tmp_path)
    assert empty.returncode == 1, empty.stderr
    assert f"{DEFAULT_REPO} is not in the Hugging Face cache" in empty.stderr
    assert "offline mode is on" in empty.stderr and "Traceback" not in empty.stderr


def test_hub_errors_and_hf_file(fake_hub: FakeHub, tmp_path: Path, tiny_llava: TinyLlava) -> None:
    env = hub_env(fake_hub, tmp_path / "hf")
    folder = photos(tmp_path / "photos", 1)
    fake_hub.authorization.clear()
    quant = run(caption_cmd(folder, "-hf", f"{DEFAULT_REPO}:Q5_K_M"), dict(env, HF_TOKEN="hf_fromenv"), tmp_path)
    assert quant.returncode == 1, quant.stderr
    assert fake_hub.authorization == ["Bearer hf_fromenv"]  # HF_TOKEN reaches the hub
    assert "has no GGUF model file with the quantization tag Q5_K_M" in quant.stderr
    assert "llava-v1.5-7b-Q4_K_M.gguf" in quant.stderr  # the list of what there is
    missing = run(caption_cmd(folder, "--hf-repo", "nobody/nothing-GGUF", "-hft", "hf_flag"), env, tmp_path)
    assert missing.returncode == 1 and "no model repository nobody/nothing-GGUF at" in missing.stderr
    assert fake_hub.authorization[-1] == "Bearer hf_flag"
    no_mmproj = run(caption_cmd(folder, "-hf", "tester/no-mmproj-GGUF"), env, tmp_path)
    assert no_mmproj.returncode == 1 and "has no mmproj (projector) GGUF file" in no_mmproj.stderr
    both = run(caption_cmd(folder, "-hf", "tester/tiny-GGUF", "-m", tiny_llava.text), env, tmp_path)
    assert both.returncode == 2 and "give --model or --hf-repo, not both" in both.stderr
    bad = run(caption_cmd(folder, "-hf", "tester"), env, tmp_path)
    assert bad.returncode == 1 and "expected <user>/<model>[:quant]" in bad.stderr
    # -hff names the file; an explicit --mmproj is kept, so no projector is fetched
    fake_hub.requests.clear()
    named = run(caption_cmd(folder, "--out", "n.jsonl", "-hf", "tester/tiny-GGUF", "-hff", "tiny-f32.gguf",
                            "--mmproj", tiny_llava.mmproj), env, tmp_path)
    assert named.returncode == 0, named.stderr
    assert fake_hub.downloads() == [f"/tester/tiny-GGUF/resolve/{COMMIT}/tiny-f32.gguf"]
    assert json.loads((tmp_path / "n.jsonl").read_text())["settings"]["mmproj"] == tiny_llava.mmproj.name
# --- the other tools --------------------------------------------------------------------------


def test_server_takes_hf_repo(fake_hub: FakeHub, tmp_path: Path) -> None:
    code = ("import json, sys\nfrom pykvsmooth.server import parse_args\n"
            "model = parse_args(sys.argv[1:]).models[0]\n"
            "print(json.dumps({'model': model.model, 'clip': model.clip_model_path}))\n")
    env = hub_env(fake_hub, tmp_path / "hf")
    got = run([sys.executable, "-c", code, "-hf", DEFAULT_REPO, "--chat_format", "llava-1-5"], env, tmp_path)
    assert got.returncode == 0, got.stderr
    paths = json.loads(got.stdout.strip().splitlines()[-1])
    assert Path(paths["model"]).name == "llava-v1.5-7b-Q4_K_M.gguf" and Path(paths["model"]).is_file()
    assert Path(paths["clip"]).name == "llava-v1.5-7b-mmproj-model-f16.gguf"
    wrong = run([sys.executable, "-c", code, "-hf", f"{DEFAULT_REPO}:Q5_K_M"], env, tmp_path)
    assert wrong.returncode == 1 and "quantization tag Q5_K_M" in wrong.stderr, wrong.stderr


def test_eval_generate_takes_hf_repo(fake_hub: FakeHub, tmp_path: Path) -> None:
    images = photos(tmp_path / "val2014", 1)
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "p0.png", "width": 64, "height": 48}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1}],
        "categories": [{"id": 1, "name": "dog"}]}), encoding="utf-8")
    env = hub_env(fake_hub, tmp_path / "hf")
    cmd = [sys.executable, "-m", "pykvsmooth.eval", "generate", "--images", str(images), "--instances",
           str(instances), "--out", str(tmp_path / "runs"), "--n-images", "1", "--settings", "baseline",
           "--max-tokens", "4"]
    got = run([*cmd, "-hf", DEFAULT_REPO], env, tmp_path)
    assert got.returncode == 0, got.stderr
    manifest = json.loads((tmp_path / "runs" / "run.json").read_text(encoding="utf-8"))
    assert manifest["model"]["file"] == "llava-v1.5-7b-Q4_K_M.gguf"
    assert manifest["mmproj"]["file"] == "llava-v1.5-7b-mmproj-model-f16.gguf"
    assert (tmp_path / "runs" / "baseline.jsonl").read_text(encoding="utf-8").strip()
    wrong = run([*cmd, "-hf", f"{DEFAULT_REPO}:Q5_K_M"], env, tmp_path)
    assert wrong.returncode == 1 and "quantization tag Q5_K_M" in wrong.stderr, wrong.stderr
    neither = run(cmd, env, tmp_path)
    assert neither.returncode == 1 and "give --model and --mmproj, or -hf" in neither.stderr, neither.stderr
