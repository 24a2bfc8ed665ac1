"""End-to-end tests of `llama-mtmd-cli` and `llama-llava-cli` with KVSmooth.

The programs are taken from PYKVSMOOTH_BIN_DIR when it is set (a development build), else
from the installed pykvsmooth/bin, else PATH (server_process.program). A missing program fails the
tests: it is a broken install, not an optional feature. The model is the tiny random LLaVA
pair of scripts/make_tiny_llava.py, generated once per session; generation is greedy, so
every output is deterministic.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TinyLlava
from server_process import program

REPO = Path(__file__).resolve().parent.parent
CLIS = ("llama-mtmd-cli", "llama-llava-cli")
PROMPT = "Please describe the image in detail."
N_PREDICT = 32
TIMEOUT_S = 120

# the fixture's text model has 6 layers: the default range is [3, n_layer - 1)
DEFAULT_LAYERS = {3, 4}


@dataclass(frozen=True)
class Fixture:
    text: Path
    mmproj: Path
    png: Path
    jpeg: Path
    pdf: Path
    corrupt_png: Path
    corrupt_gguf: Path
    dir: Path


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory, tiny_llava: TinyLlava) -> Fixture:
    from PIL import Image

    d = tmp_path_factory.mktemp("cli")

    # a deterministic picture: a colour gradient with a dark square
    img = Image.new("RGB", (96, 80))
    img.putdata([((x * 5) % 256, (y * 3) % 256, ((x + y) * 2) % 256) for y in range(80) for x in range(96)])
    img.paste((10, 10, 10), (30, 20, 60, 50))
    img.save(d / "picture.png")
    img.save(d / "picture.jpg", quality=90)
    # PDF: a real file Pillow writes that neither stb_image nor ffmpeg decodes as a picture
    img.save(d / "picture.pdf")

    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    # a GGUF header followed by garbage
    (d / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 4096)

    return Fixture(text=tiny_llava.text, mmproj=tiny_llava.mmproj,
                   png=d / "picture.png", jpeg=d / "picture.jpg", pdf=d / "picture.pdf",
                   corrupt_png=d / "corrupt.png", corrupt_gguf=d / "corrupt.gguf", dir=d)


def clean_env() -> dict[str, str]:
    # a LLAMA_ARG_* variable in the caller's environment would change every run
    return {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}


def run(cli: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([program(cli), *args], capture_output=True, text=True, errors="replace",
                          timeout=TIMEOUT_S, env=env if env is not None else clean_env())


def caption_args(fx: Fixture, image: Path | None = None, *extra: str,
                 model: Path | None = None, mmproj: Path | None = None) -> list[str]:
    return ["-m", str(model or fx.text), "--mmproj", str(mmproj or fx.mmproj),
            "--image", str(image or fx.png), "-p", PROMPT,
            "-n", str(N_PREDICT), "--temp", "0", "--seed", "1", "-t", "2", "-c", "1024", *extra]


def caption(cli: str, fx: Fixture, image: Path | None = None, *extra: str) -> str:
    r = run(cli, caption_args(fx, image, *extra))
    assert r.returncode == 0, f"{cli} failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return r.stdout


# --- captions ------------------------------------------------------------------------

@pytest.mark.parametrize("cli", CLIS)
@pytest.mark.parametrize("image", ["png", "jpeg"])
def test_caption_deterministic_and_smoothing_changes_it(cli: str, image: str, fx: Fixture) -> None:
    img = getattr(fx, image)
    off = caption(cli, fx, img)
    on = caption(cli, fx, img, "--kvsmooth", "0.9")
    assert off.strip(), "empty answer"
    assert caption(cli, fx, img) == off
    assert caption(cli, fx, img, "--kvsmooth", "0.9") == on
    assert on != off, "KVSmooth 0.9 did not change the greedy answer"


@pytest.mark.parametrize("cli", CLIS)
def test_kvsmooth_zero_is_off(cli: str, fx: Fixture) -> None:
    # "off" is the unpatched code path: byte-identical output
    assert caption(cli, fx, fx.png, "--kvsmooth", "0") == caption(cli, fx, fx.png)


@pytest.mark.parametrize("cli", CLIS)
def test_env_variables_match_flags(cli: str, fx: Fixture) -> None:
    env = clean_env() | {"LLAMA_ARG_KVSMOOTH": "0.9", "LLAMA_ARG_KVSMOOTH_MODE": "keys"}
    r = run(cli, caption_args(fx), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == caption(cli, fx, fx.png, "--kvsmooth", "0.9", "--kvsmooth-mode", "keys")


@pytest.mark.parametrize("cli", CLIS)
def test_help_lists_flags(cli: str) -> None:
    r = run(cli, ["--help"])
    assert r.returncode == 0
    text = r.stdout + r.stderr
    for flag in ("--kvsmooth ", "--kvsmooth-window", "--kvsmooth-queue", "--kvsmooth-layers",
                 "--kvsmooth-mode", "--kvsmooth-impl", "--kvsmooth-trace", "LLAMA_ARG_KVSMOOTH",
                 "LLAMA_ARG_KVSMOOTH_TRACE", "LLAMA_ARG_KVSMOOTH_IMPL"):
        assert flag in text, flag


def test_llava_cli_prints_only_the_answer(fx: Fixture) -> None:
    # no framing around the answer (the trace test checks it is exactly the generated text)
    out = caption("llama-llava-cli", fx, fx.png)
    assert out.endswith("\n") and not out.endswith("\n\n") and not out.startswith("\n")
    assert "experimental" not in out.lower()


@pytest.mark.parametrize("cli", CLIS)
def test_flash_attention_same_answer(cli: str, fx: Fixture) -> None:
    # the scores path (flash attention) and the probabilities path smooth alike
    on = caption(cli, fx, fx.png, "--kvsmooth", "0.9", "-fa", "on")
    assert on == caption(cli, fx, fx.png, "--kvsmooth", "0.9", "-fa", "off")


@pytest.mark.parametrize("cli", CLIS)
def test_composed_impl_same_answer(cli: str, fx: Fixture) -> None:
    # stock ggml ops (SPEC 4.2) instead of the KVSmooth op: the same greedy answer, both paths
    for fa in ("off", "on"):
        fused = caption(cli, fx, fx.png, "--kvsmooth", "0.9", "-fa", fa, "--kvsmooth-impl", "fused")
        assert caption(cli, fx, fx.png, "--kvsmooth", "0.9", "-fa", fa, "--kvsmooth-impl", "composed") == fused
        env = clean_env() | {"LLAMA_ARG_KVSMOOTH_IMPL": "composed"}
        r = run(cli, caption_args(fx, fx.png, "--kvsmooth", "0.9", "-fa", fa, "-v"), env=env)
        assert r.returncode == 0 and r.stdout == fused, r.stderr[-3000:]
        assert "create: impl = composed, mode = adaptive" in r.stderr  # what the variable chose


# --- trace ---------------------------------------------------------------------------

def chunk_ranges(stderr: str) -> tuple[list[range], list[range]]:
    """Text and media position ranges, from the CLI's 'chunk N: positions [a, b)' log lines."""
    text: list[range] = []
    media: list[range] = []
    for kind, a, b in re.findall(r"(text|media) chunk \d+: positions \[(\d+), (\d+)\)", stderr):
        (text if kind == "text" else media).append(range(int(a), int(b)))
    return text, media


def traced_run(cli: str, fx: Fixture, trace: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    r = run(cli, caption_args(fx, fx.png, "--kvsmooth", "0.9", "--kvsmooth-trace", str(trace), *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert records, "empty trace"
    return r, records


@pytest.mark.parametrize("cli", CLIS)
def test_trace_records(cli: str, fx: Fixture, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    r, records = traced_run(cli, fx, trace)

    for rec in records:
        assert {"seq_id", "pos", "token", "layer", "z", "lambda", "rank", "applied"} <= rec.keys()
        assert rec["seq_id"] == 0
        assert 0.9 - 0.2 - 1e-6 <= rec["lambda"] <= 0.9 + 0.2 + 1e-6
        assert rec["z"] >= 0.0
        assert rec["applied"] is True

    text, media = chunk_ranges(r.stderr)
    assert media, "no media chunk logged"
    last_prompt = text[-1].stop - 1
    assert last_prompt > max(m.stop for m in media)

    # the first smoothed token is the last prompt token; then one per generated token
    assert records[0]["pos"] == last_prompt
    positions = sorted({rec["pos"] for rec in records})
    assert positions == list(range(last_prompt, last_prompt + len(positions)))
    assert 1 < len(positions) <= N_PREDICT + 1
    assert "ASSISTANT:".endswith(records[0]["token"])
    for m in media:
        assert not any(rec["pos"] in m for rec in records), "an image position was smoothed"

    # every smoothed token is traced in every default layer, in token order
    by_pos: dict[int, set[int]] = {}
    for rec in records:
        by_pos.setdefault(rec["pos"], set()).add(rec["layer"])
    assert all(layers == DEFAULT_LAYERS for layers in by_pos.values())
    assert [rec["pos"] for rec in records] == sorted(rec["pos"] for rec in records)

    if cli == "llama-llava-cli":
        # the generated tokens' texts are the answer
        pieces = {rec["pos"]: rec["token"] for rec in records if rec["pos"] > last_prompt}
        answer = "".join(pieces[p] for p in sorted(pieces))
        if "\ufffd" not in answer:
            assert r.stdout.rstrip("\n") == answer


def test_trace_parameters(fx: Fixture, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    _, records = traced_run("llama-mtmd-cli", fx, trace, "--kvsmooth-window", "0.05", "--kvsmooth-queue", "4",
                            "--kvsmooth-layers", "1-3")
    assert {rec["layer"] for rec in records} == {1, 2}
    assert all(0.85 - 1e-6 <= rec["lambda"] <= 0.95 + 1e-6 for rec in records)
    assert all(0 <= rec["rank"] < 4 for rec in records)

    _, records = traced_run("llama-mtmd-cli", fx, trace, "--kvsmooth-mode", "fixed")
    assert all(abs(rec["lambda"] - 0.9) < 1e-6 for rec in records)


# --- bad input -----------------------------------------------------------------------

def assert_fails(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode > 0, f"expected a failure exit code, got {r.returncode}\n{r.stderr[-3000:]}"
    lines = [line for line in r.stderr.splitlines() if all(n in line for n in needles)]
    assert lines, f"no stderr line names {needles}:\n{r.stderr[-3000:]}"


BAD_FLAGS = [
    (["--kvsmooth", "1.5"], "--kvsmooth"),
    (["--kvsmooth", "-0.1"], "--kvsmooth"),
    (["--kvsmooth", "abc"], "--kvsmooth"),
    (["--kvsmooth", "0.9", "--kvsmooth-window", "2"], "--kvsmooth-window"),
    (["--kvsmooth", "0.9", "--kvsmooth-queue", "0"], "--kvsmooth-queue"),
    (["--kvsmooth", "0.9", "--kvsmooth-queue", "x"], "--kvsmooth-queue"),
    (["--kvsmooth", "0.9", "--kvsmooth-layers", "5-3"], "--kvsmooth-layers"),
    (["--kvsmooth", "0.9", "--kvsmooth-layers", "3"], "--kvsmooth-layers"),
    (["--kvsmooth", "0.9", "--kvsmooth-layers", "a-b"], "--kvsmooth-layers"),
    (["--kvsmooth", "0.9", "--kvsmooth-mode", "bogus"], "--kvsmooth-mode"),
    (["--kvsmooth", "0.9", "--kvsmooth-impl", "bogus"], "--kvsmooth-impl"),
    # valid syntax, but the fixture has 6 layers: refused when the context is set up
    (["--kvsmooth", "0.9", "--kvsmooth-layers", "3-99"], "--kvsmooth"),
    # a KV cache type KVSmooth does not blend (SPEC 4): refused, not a crash
    (["--kvsmooth", "0.9", "-ctk", "q4_0", "-ctv", "q4_0", "-fa", "on"], "--kvsmooth"),
]


@pytest.mark.parametrize("cli", CLIS)
@pytest.mark.parametrize("extra,flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag(cli: str, extra: list[str], flag: str, fx: Fixture) -> None:
    assert_fails(run(cli, caption_args(fx, fx.png, *extra)), flag)


@pytest.mark.parametrize("cli", CLIS)
def test_bad_env_value(cli: str, fx: Fixture) -> None:
    r = run(cli, caption_args(fx), env=clean_env() | {"LLAMA_ARG_KVSMOOTH_MODE": "bogus"})
    assert_fails(r, "LLAMA_ARG_KVSMOOTH_MODE")


@pytest.mark.parametrize("cli", CLIS)
@pytest.mark.parametrize("case", ["missing-model", "corrupt-model", "missing-mmproj", "corrupt-mmproj",
                                  "missing-image", "corrupt-image", "unreadable-format", "trace-dir"])
def test_bad_file(cli: str, case: str, fx: Fixture) -> None:
    missing = fx.dir / "does-not-exist.gguf"
    model, mmproj, image, extra, needle = None, None, fx.png, [], ""
    if case == "missing-model":
        model, needle = missing, str(missing)
    elif case == "corrupt-model":
        model, needle = fx.corrupt_gguf, str(fx.corrupt_gguf)
    elif case == "missing-mmproj":
        mmproj, needle = missing, str(missing)
    elif case == "corrupt-mmproj":
        mmproj, needle = fx.corrupt_gguf, str(fx.corrupt_gguf)
    elif case == "missing-image":
        image, needle = fx.dir / "nope.png", str(fx.dir / "nope.png")
    elif case == "corrupt-image":
        image, needle = fx.corrupt_png, str(fx.corrupt_png)
    elif case == "unreadable-format":
        image, needle = fx.pdf, str(fx.pdf)
    else:
        extra = ["--kvsmooth", "0.9", "--kvsmooth-trace", str(fx.dir / "no-dir" / "t.jsonl")]
        needle = "--kvsmooth-trace"
    r = run(cli, caption_args(fx, image, *extra, model=model, mmproj=mmproj))
    assert_fails(r, needle)


@pytest.mark.parametrize("drop", ["--image", "-p"])
def test_llava_cli_needs_image_and_prompt(drop: str, fx: Fixture) -> None:
    args = caption_args(fx)
    i = args.index(drop)
    del args[i:i + 2]
    assert_fails(run("llama-llava-cli", args), drop)


# --- plot ----------------------------------------------------------------------------

def test_plot_trace(fx: Fixture, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    from PIL import Image

    trace = tmp_path / "trace.jsonl"
    traced_run("llama-llava-cli", fx, trace)
    out = tmp_path / "sinkmap.png"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_trace.py"), str(trace), "-o", str(out)],
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 5000
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.width >= 400 and im.height >= 300


def test_plot_trace_without_matplotlib(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"seq_id": 0, "pos": 5, "token": "a", "layer": 3, "z": 1.0, "lambda": 0.9}\n')
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['plot_trace.py', {str(trace)!r}, '-o', {str(tmp_path / 'x.png')!r}]; "
            f"runpy.run_path({str(REPO / 'scripts' / 'plot_trace.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode != 0
    assert "matplotlib" in r.stderr and "Traceback" not in r.stderr
