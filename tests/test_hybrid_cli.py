"""`llama-mtmd-cli` captioning with the tiny LFM2-VL pair (hybrid text model + lfm2 projector).

The programs are found as in test_cli.py (PYKVSMOOTH_BIN_DIR, else pykvsmooth/bin, else PATH). The pair is
scripts/make_tiny_lfm2.py's; the prompt is rendered by the GGUF's own LFM2-VL chat template
(ChatML turns) and mtmd frames the image as <|image_start|> (70 image embeddings for the
64x48 picture) <|image_end|>. Generation is greedy with --ignore-eos, so every run decodes
exactly N_PREDICT generated tokens and is deterministic. One thread: ggml's thread pool spins
at its barriers, which on a loaded two-core machine turns a 0.2 s run into tens of seconds.

SPEC §2 and §4.1 at the command line: the smoothed positions are exactly the final prompt
token and the generated tokens (none of the image's), and only the attention layers of the
range appear in the trace; a range of conv layers only is refused with an error that names
the flag.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import make_tiny_lfm2 as maker  # scripts/ is on sys.path: conftest.py
import make_tiny_llava
from server_process import program
from test_cli import TIMEOUT_S, assert_fails, chunk_ranges, clean_env

CLI = "llama-mtmd-cli"
PROMPT = "Describe the image."
N_PREDICT = 24
ATTN = [il for il, t in enumerate(maker.LAYER_TYPES) if t == "attn"]   # 1, 4, 5
DEFAULT_LAYERS = [il for il in ATTN if 3 <= il < len(maker.LAYER_TYPES) - 1]  # [3, 5) -> 4


@dataclass(frozen=True)
class Pair:
    text: Path
    mmproj: Path
    png: Path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    d = tmp_path_factory.mktemp("tiny-lfm2-vl")
    text, mmproj = maker.write_pair(d)
    make_tiny_llava.write_test_image(d / "picture.png", size=(64, 48), seed=0)
    return Pair(text, mmproj, d / "picture.png")


def run(pair: Pair, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["-m", str(pair.text), "--mmproj", str(pair.mmproj), "--image", str(pair.png), "-p", PROMPT,
            "-n", str(N_PREDICT), "--ignore-eos", "--temp", "0", "--seed", "1", "-t", "1", "-c", "1024", *extra]
    return subprocess.run([program(CLI), *args], capture_output=True, text=True, errors="replace",
                          timeout=TIMEOUT_S, env=clean_env())


def caption(pair: Pair, *extra: str) -> str:
    r = run(pair, *extra)
    assert r.returncode == 0, f"{CLI} failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return r.stdout


def traced(pair: Pair, trace: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    r = run(pair, "--kvsmooth", "0.9", "--kvsmooth-trace", str(trace), *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert records, "empty trace"
    return r, records


def test_caption_off_is_deterministic(pair: Pair) -> None:
    """The pair works in llama-mtmd-cli without KVSmooth: an image chunk between two text chunks,
    the same answer twice, and --kvsmooth 0 is the same as no flag."""
    r = run(pair)
    assert r.returncode == 0, r.stderr[-3000:]
    text, media = chunk_ranges(r.stderr)
    assert len(media) == 1 and len(media[0]) >= 64, media  # LFM2-VL: at least 64 image tokens
    assert text[0].stop == media[0].start and media[0].stop == text[-1].start
    assert r.stdout.strip()
    assert caption(pair) == r.stdout
    assert caption(pair, "--kvsmooth", "0") == r.stdout


@pytest.mark.parametrize("layers,want", [(None, DEFAULT_LAYERS), ("0-6", ATTN)], ids=["default-3-5", "all-0-6"])
def test_trace_positions_and_layers(pair: Pair, tmp_path: Path, layers: str | None, want: list[int]) -> None:
    trace = tmp_path / "trace.jsonl"
    r, records = traced(pair, trace, *(["--kvsmooth-layers", layers] if layers else []))
    text, media = chunk_ranges(r.stderr)
    last_prompt = text[-1].stop - 1

    # exactly the final prompt token ("\n" after "<|im_start|>assistant") and the N_PREDICT
    # generated tokens, each once in every smoothed (attention) layer, in order
    assert [(rec["pos"], rec["layer"]) for rec in records] == \
           [(pos, il) for pos in range(last_prompt, last_prompt + 1 + N_PREDICT) for il in want]
    assert records[0]["token"] == "\n"
    assert not any(rec["pos"] in m for rec in records for m in media)
    for rec in records:
        assert rec["seq_id"] == 0 and rec["applied"] is True and rec["z"] >= 0.0
        assert 0.7 - 1e-6 <= rec["lambda"] <= 1.1 + 1e-6

    # the generated tokens are the answer that was printed
    answer = "".join(rec["token"] for rec in records if rec["pos"] > last_prompt and rec["layer"] == want[0])
    if "\ufffd" not in answer:
        assert answer in r.stdout


def test_smoothing_changes_the_answer(pair: Pair) -> None:
    on = caption(pair, "--kvsmooth", "0.9", "--kvsmooth-layers", "0-6")
    assert on == caption(pair, "--kvsmooth", "0.9", "--kvsmooth-layers", "0-6")
    assert on != caption(pair), "KVSmooth 0.9 did not change the greedy answer"


def test_conv_only_range_is_refused(pair: Pair) -> None:
    # layers 2 and 3 are short-conv layers: nothing to smooth (SPEC §4.1)
    assert_fails(run(pair, "--kvsmooth", "0.9", "--kvsmooth-layers", "2-4"), "--kvsmooth")


def test_flash_attention_same_answer(pair: Pair) -> None:
    # the scores path (flash attention) and the probabilities path smooth alike
    on = caption(pair, "--kvsmooth", "0.9", "--kvsmooth-layers", "0-6", "-fa", "on")
    assert on == caption(pair, "--kvsmooth", "0.9", "--kvsmooth-layers", "0-6", "-fa", "off")
