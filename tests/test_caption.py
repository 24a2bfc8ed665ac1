"""``kvsmooth-caption`` end to end on the tiny LLaVA fixture: a folder of three good images in
nested folders and one corrupt file; JSONL records, sidecars, resume, --overwrite, --compare,
exit codes and Ctrl-C. The tool runs as ``python -m pykvsmooth.caption`` (the installed
package), as the console script does."""

from __future__ import annotations

import html
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List

import make_tiny_llava
import pytest
from conftest import TinyLlava

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300
GOOD = ("one.png", "sub/two.jpg", "sub/deeper/three.webp")
CORRUPT = "sub/broken.png"


@pytest.fixture(scope="module")
def models(tiny_llava: TinyLlava) -> Dict[str, Path]:
    return {"model": tiny_llava.text, "mmproj": tiny_llava.mmproj}


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_tiny_llava.write_test_image(path, size=(64, 48), seed=seed)


def write_corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for seed, name in enumerate(GOOD):
        write_image(root / name, seed)
    write_corrupt(root / CORRUPT)
    (root / "sub" / "notes.md").write_text("not an image\n")
    return root


def caption(models: Dict[str, Path], *args: object, cwd: Path, env: Dict[str, str] | None = None,
            with_model: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pykvsmooth.caption", *map(str, args), "--max-tokens", "24", "--quiet"]
    if with_model:
        cmd += ["--model", str(models["model"]), "--mmproj", str(models["mmproj"])]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env if env is not None else os.environ.copy())


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def by_name(records: List[dict], root: Path) -> Dict[str, dict]:
    return {Path(r["path"]).resolve().relative_to(root.resolve()).as_posix(): r for r in records}


def test_folder_with_corrupt_file_then_resume(models: Dict[str, Path], photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "captions.jsonl"
    first = caption(models, photos, "--out", out, "--sidecar", cwd=tmp_path)
    assert first.returncode == 1, first.stderr  # some images failed
    assert "3 captioned, 0 skipped, 1 failed" in first.stderr
    assert f"failed: {photos / CORRUPT}: cannot read image" in first.stderr

    records = by_name(read_jsonl(out), photos)
    assert sorted(records) == sorted([*GOOD, CORRUPT])  # notes.md is not an image
    assert "cannot read image" in records[CORRUPT]["error"] and "caption" not in records[CORRUPT]
    for name in GOOD:
        r = records[name]
        assert "error" not in r and r["caption"], r
        assert r["settings"]["kvsmooth"]["lambda_ref"] == pytest.approx(0.9)
        assert r["settings"]["prompt"] == "Please describe the image in detail."
        assert r["settings"]["max_tokens"] == 24 and r["settings"]["temperature"] == 0
        assert r["timings"]["completion_tokens"] > 0 and r["timings"]["seconds"] > 0
        assert (photos / name).with_suffix(".txt").read_text(encoding="utf-8") == r["caption"] + "\n"
    assert not (photos / CORRUPT).with_suffix(".txt").exists()

    # resume: nothing is captioned again, and no file is touched
    mtimes = {n: (photos / n).with_suffix(".txt").stat().st_mtime_ns for n in GOOD}
    again = caption(models, photos, "--out", out, "--sidecar", cwd=tmp_path)
    assert again.returncode == 1, again.stderr
    assert "0 captioned, 3 skipped, 1 failed" in again.stderr
    assert by_name(read_jsonl(out), photos) == records  # one record per image, still
    assert {n: (photos / n).with_suffix(".txt").stat().st_mtime_ns for n in GOOD} == mtimes

    # the corrupt file is repaired: only it is captioned, and the run succeeds
    write_image(photos / CORRUPT, seed=7)
    fixed = caption(models, photos, "--out", out, "--sidecar", cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert "1 captioned, 3 skipped, 0 failed" in fixed.stderr
    records = by_name(read_jsonl(out), photos)
    assert len(read_jsonl(out)) == 4 and "caption" in records[CORRUPT]
    assert (photos / CORRUPT).with_suffix(".txt").exists()

    # a sidecar deleted by hand is written back from the JSONL, without the model
    (photos / GOOD[0]).with_suffix(".txt").unlink()
    restored = caption(models, photos, "--out", out, "--sidecar", cwd=tmp_path)
    assert restored.returncode == 0 and "0 captioned, 4 skipped" in restored.stderr
    assert (photos / GOOD[0]).with_suffix(".txt").read_text(encoding="utf-8") == records[GOOD[0]]["caption"] + "\n"


def test_existing_captions_are_kept_unless_overwrite(models: Dict[str, Path], photos: Path, tmp_path: Path) -> None:
    mine = (photos / GOOD[1]).with_suffix(".txt")
    mine.write_text("my own caption\n")
    out = tmp_path / "c.jsonl"
    run = caption(models, photos, "--out", out, "--sidecar", cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert mine.read_text() == "my own caption\n"
    model_caption = by_name(read_jsonl(out), photos)[GOOD[1]]["caption"]

    over = caption(models, photos, "--out", out, "--sidecar", "--overwrite", cwd=tmp_path)
    assert over.returncode == 1, over.stderr
    assert "3 captioned, 0 skipped, 1 failed" in over.stderr
    assert mine.read_text(encoding="utf-8") == model_caption + "\n"  # greedy: the same caption
    assert len(read_jsonl(out)) == 4  # replaced, not appended


def test_sidecars_only_resume_and_baseline(models: Dict[str, Path], photos: Path, tmp_path: Path) -> None:
    (photos / CORRUPT).unlink()
    first = caption(models, photos, "--sidecar", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "3 captioned, 0 skipped, 0 failed" in first.stderr
    smoothed = {n: (photos / n).with_suffix(".txt").read_text(encoding="utf-8") for n in GOOD}
    again = caption(models, photos, "--sidecar", cwd=tmp_path)
    assert "0 captioned, 3 skipped" in again.stderr

    base = caption(models, photos, "--sidecar", "--overwrite", "--no-kvsmooth", cwd=tmp_path)
    assert base.returncode == 0, base.stderr
    baseline = {n: (photos / n).with_suffix(".txt").read_text(encoding="utf-8") for n in GOOD}
    assert baseline != smoothed


def test_compare_html(models: Dict[str, Path], photos: Path, tmp_path: Path) -> None:
    page = tmp_path / "report" / "compare.html"
    out = tmp_path / "c.jsonl"
    run = caption(models, photos / "**" / "*.*", "--compare", page, "--out", out, cwd=tmp_path)
    assert run.returncode == 1, run.stderr  # the corrupt file is among the matches
    text = page.read_text(encoding="utf-8")
    records = [r for r in read_jsonl(out) if "error" not in r]
    assert len(records) == 3
    assert text.count("<img src=\"data:image/jpeg;base64,") == 3
    assert any(r["caption"] != r["baseline_caption"] for r in records)
    for r in records:
        assert html.escape(r["caption"]) in text and html.escape(r["baseline_caption"]) in text
        assert r["baseline_timings"]["completion_tokens"] > 0
    # the comparison needs KVSmooth on
    bad = caption(models, photos, "--compare", page, "--no-kvsmooth", cwd=tmp_path)
    assert bad.returncode == 2 and "--compare" in bad.stderr


def test_model_from_environment_and_usage_errors(models: Dict[str, Path], tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", seed=1)
    env = dict(os.environ, PYKVSMOOTH_MODEL=str(models["model"]), LLAMA_ARG_MMPROJ=str(models["mmproj"]))
    env.pop("PYKVSMOOTH_MMPROJ", None)
    ok = caption(models, "a.png", "--out", "a.jsonl", cwd=tmp_path, env=env, with_model=False)
    assert ok.returncode == 0, ok.stderr
    assert read_jsonl(tmp_path / "a.jsonl")[0]["path"] == "a.png"

    env = {k: v for k, v in os.environ.items() if k not in
           ("PYKVSMOOTH_MODEL", "LLAMA_ARG_MODEL", "PYKVSMOOTH_MMPROJ", "LLAMA_ARG_MMPROJ")}
    # no model anywhere: the default one, from the Hugging Face cache only (offline here)
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    missing = caption(models, "a.png", "--out", "b.jsonl", cwd=tmp_path, env=env, with_model=False)
    assert missing.returncode == 1, missing.stderr
    assert "second-state/Llava-v1.5-7B-GGUF is not in the Hugging Face cache" in missing.stderr
    assert "pass --model and --mmproj" in missing.stderr
    no_mmproj = caption(models, "a.png", "--model", models["model"], cwd=tmp_path, env=env, with_model=False)
    assert no_mmproj.returncode == 2 and "--model needs --mmproj" in no_mmproj.stderr
    for args, message in ((("--existing", "append"), "needs --out FILE.jsonl"),
                          (("--out", "c.jsonl", "--existing", "prepend"), "add --sidecar"),
                          (("--out", "c.jsonl", "--kvsmooth", "1.5"), "lambda_ref must be in [0, 1]"),
                          (("--out", "c.jsonl", "--kvsmooth-layers", "3"), "expected START-END")):
        bad = caption(models, "a.png", *args, cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    nothing = caption(models, "nope/*.jpg", "a.png", "--out", "d.jsonl", cwd=tmp_path)
    assert nothing.returncode == 1 and "failed: nope/*.jpg: no such file" in nothing.stderr
    refused = caption(models, "a.png", "--out", "e.jsonl", "--kvsmooth-layers", "2-40", cwd=tmp_path)
    assert refused.returncode == 1 and "layer range" in refused.stderr


def test_ctrl_c_keeps_finished_captions(models: Dict[str, Path], tmp_path: Path) -> None:
    # The third image is a FIFO: the captioner finishes the first two, then blocks reading it
    # until the interrupt comes, so the interrupt lands while an image is in progress however
    # the machine schedules the two processes (it used to race a run of many images).
    n_images = 6
    folder = tmp_path / "many"
    for i in range(n_images):
        write_image(folder / f"img{i:03d}.png", seed=i)
    blocker = folder / "img002.png"
    blocker.unlink()
    os.mkfifo(blocker)
    out = tmp_path / "c.jsonl"
    cmd = [sys.executable, "-m", "pykvsmooth.caption", str(folder), "--out", str(out), "--sidecar",
           "--max-tokens", "200", "--quiet", "--model", str(models["model"]), "--mmproj", str(models["mmproj"])]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer: List[int] = []
    # opening the FIFO's write end returns once the captioner opened it to read the image
    opener = threading.Thread(target=lambda: writer.append(os.open(blocker, os.O_WRONLY)), daemon=True)
    opener.start()
    try:
        opener.join(TIMEOUT_S)
        assert writer, f"the captioner never reached the third image: {proc.poll()=}"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not writer:  # release the opener thread
            os.close(os.open(blocker, os.O_RDONLY | os.O_NONBLOCK))
        for fd in writer:
            os.close(fd)
    assert proc.returncode == 130, stderr
    assert "interrupted:" in stderr
    records = read_jsonl(out)  # every line is valid JSON
    assert [Path(r["path"]).name for r in records] == ["img000.png", "img001.png"]
    for r in records:
        assert Path(r["path"]).with_suffix(".txt").read_text(encoding="utf-8") == r["caption"] + "\n"
    assert sorted(p.name for p in folder.glob("*.txt")) == ["img000.txt", "img001.txt"]
    # and the rest is done by the next run (three of the rest, to keep the test short)
    blocker.unlink()
    write_image(blocker, seed=2)
    for image in sorted(folder.glob("*.png"))[2 + 3:]:
        image.unlink()
    rest = caption(models, folder, "--out", out, "--sidecar", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    assert f"3 captioned, {len(records)} skipped" in rest.stderr


def test_console_script_is_declared() -> None:
    """`kvsmooth-caption` runs pykvsmooth.caption:main (pyproject [project.scripts])."""
    path = shutil.which("kvsmooth-caption")
    assert path, "kvsmooth-caption is not on PATH: run `make install`"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--no-kvsmooth" in result.stdout


# --- prompts, trigger words, sidecar modes ---------------------------------------------------


def test_prompt_variables_trigger_words_and_append(models: Dict[str, Path], photos: Path, tmp_path: Path) -> None:
    (photos / CORRUPT).unlink()
    tagged = photos / GOOD[1]
    tagged.with_suffix(".txt").write_text("tag1, tag2\n", encoding="utf-8")
    out = tmp_path / "c.jsonl"
    template = "Picture {stem} ({filename}) in folder {folder}. Known tags: {existing}. Describe it."
    run = caption(models, photos, "--prompt", template, "--prefix", "ohwx, ", "--suffix", " [end]",
                  "--sidecar", "--existing", "append", "--separator", " | ", "--out", out, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    records = by_name(read_jsonl(out), photos)
    assert records["sub/two.jpg"]["prompt"] == \
        "Picture two (two.jpg) in folder sub. Known tags: tag1, tag2. Describe it."
    assert records["one.png"]["prompt"] == "Picture one (one.png) in folder photos. Known tags: . Describe it."
    for name in GOOD:
        r = records[name]
        assert r["caption"].startswith("ohwx, ") and r["caption"].endswith(" [end]"), r["caption"]
        s = r["settings"]
        assert (s["prompt"], s["prefix"], s["suffix"], s["existing"], s["separator"]) == \
            (template, "ohwx, ", " [end]", "append", " | ")
        expected = ("tag1, tag2 | " if name == GOOD[1] else "") + r["caption"] + "\n"
        assert (photos / name).with_suffix(".txt").read_text(encoding="utf-8") == expected
    # a rerun finds every image in the JSONL and does not append again
    again = caption(models, photos, "--prompt", template, "--sidecar", "--existing", "append", "--out", out,
                    cwd=tmp_path)
    assert again.returncode == 0 and "0 captioned, 3 skipped" in again.stderr, again.stderr
    assert tagged.with_suffix(".txt").read_text(encoding="utf-8").count("ohwx") == 1


def test_prompt_file_prepend_and_default_sidecars(models: Dict[str, Path], photos: Path, tmp_path: Path) -> None:
    (photos / CORRUPT).unlink()
    (photos / GOOD[0]).with_suffix(".txt").write_text("old text", encoding="utf-8")
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Describe {filename} briefly.\n", encoding="utf-8")
    out = tmp_path / "c.jsonl"
    run = caption(models, photos, "--prompt-file", prompt_file, "--sidecar", "--existing", "prepend",
                  "--out", out, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    records = by_name(read_jsonl(out), photos)
    assert records[GOOD[0]]["prompt"] == "Describe one.png briefly."
    assert records[GOOD[0]]["settings"]["prompt_file"] == str(prompt_file)
    assert (photos / GOOD[0]).with_suffix(".txt").read_text(encoding="utf-8") == \
        records[GOOD[0]]["caption"] + ", old text\n"
    # no output named: sidecars, and an existing one is kept (--existing skip)
    for name in GOOD:
        (photos / name).with_suffix(".txt").unlink()
    mine = (photos / GOOD[2]).with_suffix(".txt")
    mine.write_text("mine\n", encoding="utf-8")
    plain = caption(models, photos, cwd=tmp_path)
    assert plain.returncode == 0 and "2 captioned, 1 skipped, 0 failed" in plain.stderr, plain.stderr
    assert "sidecars: IMAGE.txt next to each image" in plain.stderr
    assert mine.read_text(encoding="utf-8") == "mine\n"
    assert (photos / GOOD[0]).with_suffix(".txt").read_text(encoding="utf-8").strip()
    # --existing overwrite replaces it
    over = caption(models, photos, "--existing", "overwrite", cwd=tmp_path)
    assert over.returncode == 0 and "3 captioned, 0 skipped" in over.stderr, over.stderr
    assert mine.read_text(encoding="utf-8") != "mine\n"
    # a bad template is a usage error that names the variables
    for bad, message in (("Describe {nope}.", "unknown variable {nope}; known: {filename}"),
                         ("Describe {filename", "write {{ and }} for literal braces")):
        wrong = caption(models, photos, "--prompt", bad, cwd=tmp_path)
        assert wrong.returncode == 2 and message in wrong.stderr, wrong.stderr


# --- inputs: manifests and shards ------------------------------------------------------------


def test_manifests_and_shards(models: Dict[str, Path], photos: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pykvsmooth import caption as cap

    (photos / CORRUPT).unlink()
    (photos / "list.txt").write_text("# the good ones\none.png\nsub/two.jpg\n\n", encoding="utf-8")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": str(photos / GOOD[2])}) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"path": ["photos/one.png", "photos/sub/deeper/three.webp"]}), tmp_path / "m.parquet")
    found, missing = cap.find_images([str(photos / "list.txt"), str(tmp_path / "m.jsonl"), str(tmp_path / "m.parquet")])
    assert [p.resolve() for p in found] == [(photos / n).resolve() for n in GOOD] and not missing
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object with a \"path\" field"):
        cap.find_images([str(tmp_path / "bad.jsonl")])

    # shards: disjoint, together all images, each its own JSONL (paths as found decide)
    names = [Path(f"many/s{i}.png") for i in range(12)]
    shards = [{p for p in names if cap.in_shard(p, (k, 3))} for k in range(3)]
    assert sum(map(len, shards)) == 12 and set().union(*shards) == set(names) and all(shards)
    both = ("photos/one.png", "photos/sub/two.jpg")
    got = {}
    for k in (0, 1):
        out = tmp_path / f"s{k}.jsonl"
        run = caption(models, "photos/list.txt", "--shard", f"{k}/2", "--out", out, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        got[k] = sorted(r["path"] for r in read_jsonl(out)) if out.exists() else []
        assert got[k] == sorted(n for n in both if cap.in_shard(Path(n), (k, 2)))
        assert all(r["settings"]["shard"] == f"{k}/2" for r in (read_jsonl(out) if out.exists() else []))
    assert sorted(got[0] + got[1]) == sorted(both)
    for bad in ("2/2", "1", "a/b"):
        wrong = caption(models, photos, "--shard", bad, cwd=tmp_path)
        assert wrong.returncode == 2 and "--shard" in wrong.stderr, wrong.stderr


# --- progress ---------------------------------------------------------------------------------


def test_progress_bar_on_a_terminal_quiet_when_piped(models: Dict[str, Path], photos: Path, tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    (photos / CORRUPT).unlink()
    cmd = [sys.executable, "-m", "pykvsmooth.caption", str(photos), "--out", str(tmp_path / "c.jsonl"),
           "--max-tokens", "8", "--model", str(models["model"]), "--mmproj", str(models["mmproj"])]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=follower, timeout=TIMEOUT_S)
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the terminal is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    terminal = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, terminal
    assert "3/3" in terminal and "img/s" in terminal and "tok/s" in terminal, terminal
    assert "3 captioned, 0 skipped, 0 failed in" in terminal
    # piped: no bar, only the summary
    piped = caption(models, photos, "--out", tmp_path / "d.jsonl", cwd=tmp_path)
    assert piped.returncode == 0 and "img/s" not in piped.stderr and "\r" not in piped.stderr, piped.stderr
    assert piped.stderr.splitlines()[0].startswith("3 captioned, 0 skipped, 0 failed in ")


# --- chat handlers -----------------------------------------------------------------------------


def test_chat_format_auto_and_generic_mtmd_handler(models: Dict[str, Path], photos: Path, tmp_path: Path) -> None:
    (photos / CORRUPT).unlink()
    auto = caption(models, photos / GOOD[0], "--out", tmp_path / "a.jsonl", cwd=tmp_path)
    generic = caption(models, photos / GOOD[0], "--out", tmp_path / "g.jsonl", "--chat-format", "mtmd", cwd=tmp_path)
    assert auto.returncode == 0 and generic.returncode == 0, auto.stderr + generic.stderr
    a, g = read_jsonl(tmp_path / "a.jsonl")[0], read_jsonl(tmp_path / "g.jsonl")[0]
    assert a["settings"]["chat_format"] == "llava-1-5"  # the fixture's projector is LLaVA's
    assert g["settings"]["chat_format"] == "mtmd" and g["caption"]
    # the model's own (Vicuna) template is shorter than llama-cpp-python's LLaVA-1.5 prompt
    assert g["timings"]["prompt_tokens"] < a["timings"]["prompt_tokens"]


def test_handler_choice_and_llama_cpp_message_joining(tmp_path: Path, tiny_llava: TinyLlava) -> None:
    import gguf

    from pykvsmooth import handlers

    def write_meta(path: Path, values: Dict[str, str]) -> Path:
        w = gguf.GGUFWriter(str(path), "clip")
        for key, value in values.items():
            w.add_string(key, value)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    gemma = write_meta(tmp_path / "mmproj-gemma.gguf", {"clip.projector_type": "gemma3"})
    no_template = write_meta(tmp_path / "text.gguf", {"general.name": "no template"})
    assert handlers.gguf_metadata(gemma, ["clip.projector_type"]) == {"clip.projector_type": "gemma3"}
    assert handlers.choose_chat_format(tiny_llava.text, tiny_llava.mmproj) == "llava-1-5"
    assert handlers.choose_chat_format(tiny_llava.text, gemma) == "mtmd"  # the GGUF's own template
    with pytest.raises(ValueError, match="has no chat template .* name the prompt format with --chat-format"):
        handlers.choose_chat_format(no_template, gemma)
    (tmp_path / "junk.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        handlers.gguf_metadata(tmp_path / "junk.gguf", ["x"])
    # as llama.cpp's common/chat.cpp: parts joined by newlines, none next to a media marker
    message = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}},
                                           {"type": "text", "text": "b"}, {"type": "text", "text": "c"}]}
    assert handlers._join_parts(dict(message), "<M>")["content"] == "a<M>b\nc"
    text_only = {"role": "user", "content": [{"type": "text", "text": "a"}]}
    assert handlers._join_parts(dict(text_only), "<M>") == text_only  # no image: left as it is
