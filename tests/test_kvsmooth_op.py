"""Op-level tests of GGML_OP_KVSMOOTH against the NumPy oracle (SPEC §1, docs/design.md §1).

The native op runs through libkvsmooth-op-runner.so (see op_runner.py) on the backend given
by `pytest --kvsmooth-backend NAME` (default CPU). Cases are a representative sweep of the
dimensions that matter, not their full cross product; each id lists its parameters the way
test-backend-ops' vars() does.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, replace

import numpy as np
import pytest

import kvsmooth_oracle as orc
import op_runner
from kvsmooth_oracle import (
    GGML_TYPE_BF16,
    GGML_TYPE_F16,
    GGML_TYPE_F32,
    GGML_TYPE_Q8_0,
    MODE_ADAPTIVE,
    MODE_FIXED,
    MODE_KEYS,
    OpCase,
)

# ---------------------------------------------------------------------------------------
# tolerances (see the module docstring of kvsmooth_oracle for where f32 is emulated)

Z_RTOL = 1e-5  # entropies: f32 arithmetic over up to 2048 cells
LAMBDA_ATOL = 1e-6
F32_RTOL = 1e-5  # f32 cache rows
# the queue is filled so that no value lies closer than this to any z of the call, so the
# rank k (an integer) does not depend on f32 rounding
RANK_MARGIN = 1e-3


def z_tol(want: np.ndarray) -> np.ndarray:
    return Z_RTOL * np.maximum(1.0, np.abs(want))


# ---------------------------------------------------------------------------------------
# the unit tests of the oracle itself (hand-computed values)


@pytest.mark.parametrize("n", [1, 2, 7, 2048])
def test_oracle_entropy_uniform_is_ln_n(n: int) -> None:
    eps = 1e-10
    h = orc.entropy(np.full(n, 1.0 / n), eps)
    assert h == pytest.approx(-math.log(1.0 / n + eps), rel=1e-12)
    assert h == pytest.approx(math.log(n), abs=n * eps * 1.01 + 1e-15)


def test_oracle_entropy_hand_values() -> None:
    assert orc.entropy(np.array([0.5, 0.25, 0.25]), 0.0) == pytest.approx(1.5 * math.log(2.0), rel=1e-15)
    # zero probabilities contribute nothing (no 0·log 0 NaN); one-hot: −ln(1 + eps)
    h = orc.entropy(np.array([0.0, 1.0, 0.0]), 1e-10)
    assert h == pytest.approx(-math.log1p(1e-10), rel=1e-9)
    # per-head rows, then the mean over heads (paper eq. 5)
    rows = np.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert np.mean(orc.entropy(rows, 0.0)) == pytest.approx(1.5 * math.log(2.0), rel=1e-15)


def test_oracle_alibi_slopes() -> None:
    assert orc.alibi_slopes(8, 8.0) == pytest.approx([2.0**-e for e in range(1, 9)], rel=1e-6)
    # 12 heads: 8 from m0 = 2^-1, then odd powers of m1 = 2^-0.5
    want = [2.0**-e for e in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    assert orc.alibi_slopes(12, 8.0) == pytest.approx(want, rel=1e-6)
    assert np.all(orc.alibi_slopes(5, 0.0) == 1.0)


def test_oracle_scores_to_probs() -> None:
    qk = np.array([[0.0, 0.0, 0.0, 0.0]])
    mask = np.array([0.0, -np.inf, 0.0, 0.0])
    p = orc.scores_to_probs(qk, 1.0, mask=mask)
    assert p[0, 1] == 0.0
    assert p[0] == pytest.approx([1 / 3, 0, 1 / 3, 1 / 3])
    # the sink logit takes a share of the denominator only
    p = orc.scores_to_probs(qk, 1.0, mask=mask, sinks=np.array([0.0]))
    assert p[0] == pytest.approx([1 / 4, 0, 1 / 4, 1 / 4])
    # soft-cap: s = c·tanh(qk·scale/c)
    qk = np.array([[3.0, -1.0]])
    s = 2.0 * np.tanh(qk * 0.5 / 2.0)
    want = np.exp(s) / np.exp(s).sum()
    assert orc.scores_to_probs(qk, 0.5, logit_softcap=2.0) == pytest.approx(want, rel=1e-6)
    # ALiBi: slope_h · mask added after scaling
    qk = np.zeros((2, 3))
    mask = np.array([-2.0, -1.0, 0.0])
    p = orc.scores_to_probs(qk, 1.0, max_bias=8.0, mask=mask)
    slopes = orc.alibi_slopes(2, 8.0)  # n_head_log2 = 2: m0 = 2^(-8/2), slope_h = m0^(h+1)
    assert slopes == pytest.approx([2.0**-4, 2.0**-8])
    for h in range(2):
        e = np.exp(slopes[h] * mask)
        assert p[h] == pytest.approx(e / e.sum(), rel=1e-6)


def test_oracle_fifo_rank_and_lambda() -> None:
    # partly full queue, M = 4: k = 2 → λ̂ = 2/4 (divide by M, not by the count)
    k, q = orc.fifo_rank_push([1.0, 2.0, 3.0], 2.5, 4)
    assert (k, q) == (2, [1.0, 2.0, 3.0, 2.5])
    assert orc.smoothing_lambda(k, 4, MODE_ADAPTIVE, 0.5, 0.5) == np.float32(0.5)
    assert orc.smoothing_lambda(k, 4, MODE_ADAPTIVE, 0.9, 0.2) == np.float32(0.9) - np.float32(0.2)
    # full queue: the oldest leaves; z itself does not count; equal values are not smaller
    k, q = orc.fifo_rank_push([2.0, 1.0, 2.0, 3.0], 2.0, 4)
    assert (k, q) == (1, [1.0, 2.0, 3.0, 2.0])
    # the dropped oldest value (1.0) is not counted: k ≤ M − 1
    k, q = orc.fifo_rank_push([1.0, 2.0, 3.0, 4.0], 5.0, 4)
    assert (k, q) == (3, [2.0, 3.0, 4.0, 5.0])
    assert orc.smoothing_lambda(3, 4, MODE_ADAPTIVE, 0.9, 0.2) == np.float32(0.75)  # inside [0.7, 1.1]
    assert orc.smoothing_lambda(3, 4, MODE_ADAPTIVE, 0.5, 0.2) == np.float32(0.5) + np.float32(0.2)
    # empty queue: k = 0, clipped up to λref − w
    k, q = orc.fifo_rank_push([], 0.3, 15)
    assert (k, q) == (0, [0.3])
    assert orc.smoothing_lambda(0, 15, MODE_KEYS, 0.9, 0.2) == np.float32(0.9) - np.float32(0.2)
    assert orc.smoothing_lambda(0, 15, MODE_ADAPTIVE, 0.5, 0.5) == np.float32(0.0)
    # paper setting, M = 15: 13 of 15 smaller → 13/15 inside [0.7, 1.1]
    assert orc.smoothing_lambda(13, 15, MODE_ADAPTIVE, 0.9, 0.2) == np.float32(13) / np.float32(15)
    # fixed: λref whatever the rank
    assert orc.smoothing_lambda(0, 15, MODE_FIXED, 0.9, 0.2) == np.float32(0.9)
    # M = 1: the previous z leaves before z is ranked, so k is always 0
    k, q = orc.fifo_rank_push([7.0], 8.0, 1)
    assert (k, q) == (0, [8.0])


def test_oracle_blend() -> None:
    got = orc.blend(np.array([1.0, -2.0]), np.array([3.0, 2.0]), np.float32(0.25))
    assert got.dtype == np.float32
    assert list(got) == [1.5, -1.0]


def test_oracle_storage_rounding() -> None:
    x = np.array([[1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -1.0 - 2.0**-8, 3.0]], dtype=np.float32)
    # bf16: ties to even
    got = orc.decode_rows(orc.encode_rows(x, GGML_TYPE_BF16), GGML_TYPE_BF16, 4)
    assert list(got[0]) == [1.0, 1.0 + 2.0**-6, -1.0, 3.0]
    # f16: 1 + 2^-8 is exact
    got = orc.decode_rows(orc.encode_rows(x, GGML_TYPE_F16), GGML_TYPE_F16, 4)
    assert list(got[0]) == list(x[0])
    # q8_0: amax 127 → d = 1, q = roundf(x): halves away from zero
    row = np.zeros((1, 32), dtype=np.float32)
    row[0, :5] = [127.0, 2.5, -2.5, 0.49, -126.6]
    b = orc.encode_rows(row, GGML_TYPE_Q8_0)
    assert b.shape == (1, 34)
    assert orc.q8_0_scales(b, 32)[0, 0] == 1.0
    got = orc.decode_rows(b, GGML_TYPE_Q8_0, 32)
    assert list(got[0, :5]) == [127.0, 3.0, -3.0, 0.0, -127.0]
    # an all-zero block has d = 0 and decodes to zeros
    assert not orc.decode_rows(orc.encode_rows(np.zeros((1, 32)), GGML_TYPE_Q8_0), GGML_TYPE_Q8_0, 32).any()
    assert orc.ulp(np.array([1.0]), GGML_TYPE_F16)[0] == 2.0**-10
    assert orc.ulp(np.array([1.5]), GGML_TYPE_BF16)[0] == 2.0**-7


def _tiny_case(**kw: float) -> OpCase:
    base = dict(
        from_scores=0, n_kv=3, n_tps=2, n_head=1, n_head_kv=1, n_stream=1, d_k=32, d_v=32,
        n_smooth=2, n_slot=1, queue_cap=4, queue=4, mode=MODE_ADAPTIVE, v_trans=0,
        k_type=GGML_TYPE_F32, v_type=GGML_TYPE_F32, mask_kind=0, has_sinks=0,
        lambda_ref=0.5, window=0.5, eps=0.0, scale=1.0, max_bias=0.0, logit_softcap=0.0,
    )  # fmt: skip
    base.update(kw)
    return OpCase(**base)


def test_oracle_reference_hand_case() -> None:
    """Two tokens of one sequence: cells 1 then 2, the first's previous cell is 0."""
    case = _tiny_case()
    kq = np.zeros((1, 1, 2, 3), dtype=np.float32)
    kq[0, 0, 0] = [0.5, 0.5, 0.0]  # z = ln 2 ≈ 0.693
    kq[0, 0, 1] = [0.25, 0.25, 0.5]  # z = 1.5 ln 2 ≈ 1.040
    k = np.zeros((1, 3, 32), dtype=np.float32)
    k[0, :, 0] = [4.0, 2.0, 1.0]
    v = -k
    ids = np.array([[0, 0, 1, 0, 0], [1, 0, 2, 1, 0]], dtype=np.int32)
    state = np.array([[3.0, 0.5, 1.0, 2.0, -9.0]], dtype=np.float32)
    ref = orc.reference(
        case, kq, None, None, orc.encode_rows(k, 0), orc.encode_rows(v, 0), ids, state
    )
    ln2 = math.log(2.0)
    # token 1: queue [0.5, 1, 2], z = ln 2 → k = 1, λ = 1/4 (M = 4); K[1] = 3/4·2 + 1/4·4
    # token 2: queue [0.5, 1, 2, ln 2] is full: 0.5 leaves, z = 1.5 ln 2 ≈ 1.04 joins; of the
    #   others [1, 2, ln 2], two are smaller → k = 2, λ = 2/4; K[2] = 1/2·1 + 1/2·2.5
    assert ref.result[:, 0] == pytest.approx([ln2, 1.5 * ln2])
    assert list(ref.result[:, 1:].ravel()) == [0.25, 1, 1, 0.5, 2, 1]
    assert ref.state[0] == pytest.approx([4.0, 1.0, 2.0, ln2, 1.5 * ln2], rel=1e-6)
    k_out = orc.decode_rows(ref.k, 0, 32)
    v_out = orc.decode_rows(ref.v, 0, 32)
    assert list(k_out[0, :, 0]) == [4.0, 2.5, 1.75]
    assert list(v_out[0, :, 0]) == [-4.0, -2.5, -1.75]
    # keys mode leaves V alone; fixed uses λref; no previous cell: queue only
    ref = orc.reference(
        replace(case, mode=MODE_KEYS), kq, None, None, orc.encode_rows(k, 0), orc.encode_rows(v, 0), ids, state
    )
    assert list(orc.decode_rows(ref.v, 0, 32)[0, :, 0]) == [-4.0, -2.0, -1.0]
    ref = orc.reference(
        replace(case, mode=MODE_FIXED, lambda_ref=0.25),
        kq, None, None, orc.encode_rows(k, 0), orc.encode_rows(v, 0), ids, state,
    )  # fmt: skip
    assert list(orc.decode_rows(ref.k, 0, 32)[0, :, 0]) == [4.0, 2.5, 1.375]
    ids_noprev = ids.copy()
    ids_noprev[0, 3] = -1
    ref = orc.reference(case, kq, None, None, orc.encode_rows(k, 0), orc.encode_rows(v, 0), ids_noprev, state)
    assert list(ref.result[:, 3]) == [0.0, 1.0]
    assert list(orc.decode_rows(ref.k, 0, 32)[0, :, 0]) == [4.0, 2.0, 0.5 * 1.0 + 0.5 * 2.0]


def test_oracle_q_path_matches_probabilities() -> None:
    """The scores path of the oracle is the probabilities path fed with its own softmax."""
    rng = np.random.default_rng(3)
    n_kv, d, n_head, n_head_kv = 9, 32, 4, 2
    case = _tiny_case(
        from_scores=1, n_kv=n_kv, n_tps=1, n_head=n_head, n_head_kv=n_head_kv, d_k=d, d_v=d, n_smooth=1,
        mask_kind=1, has_sinks=1, scale=0.3, max_bias=4.0, logit_softcap=5.0, eps=1e-10,
    )  # fmt: skip
    q = rng.standard_normal((1, n_head, d)).astype(np.float32)
    k = rng.standard_normal((1, n_kv, n_head_kv * d)).astype(np.float32)
    mask = np.where(rng.random((1, 1, 1, n_kv)) < 0.3, -np.inf, -rng.random((1, 1, 1, n_kv))).astype(np.float32)
    sinks = rng.standard_normal(n_head).astype(np.float32)
    ids = np.array([[0, 0, 0, -1, 0]], dtype=np.int32)
    kb = orc.encode_rows(k, 0)
    z_q, alphas = orc.column_entropies(case, q, mask, sinks, kb, ids)
    kh = k.reshape(n_kv, n_head_kv, d)
    for h in range(n_head):
        qk = kh[:, h // 2, :].astype(np.float64) @ q[0, h].astype(np.float64)
        s = 5.0 * np.tanh(qk * (0.3 / 5.0)) + orc.alibi_slopes(n_head, 4.0)[h] * np.where(
            np.isneginf(mask[0, 0, 0]), 0.0, mask[0, 0, 0]
        )
        e = np.where(np.isneginf(mask[0, 0, 0]), 0.0, np.exp(s))
        assert alphas[0][h] == pytest.approx(e / (e.sum() + np.exp(sinks[h])), rel=1e-5)
    kq = np.stack(alphas)[None].transpose(0, 2, 1, 3).astype(np.float32)  # [1, n_head, 1, n_kv]
    z_kq, _ = orc.column_entropies(replace(case, from_scores=0), kq, None, None, kb, ids)
    assert z_q == pytest.approx(z_kq, rel=1e-6)


# ---------------------------------------------------------------------------------------
# op cases


@dataclass(frozen=True)
class Spec:
    path: str = "kq"  # "kq": probabilities (flash attention off), "q": scores (on)
    type_k: int = GGML_TYPE_F16
    type_v: int = GGML_TYPE_F16
    v_trans: int = 0
    n_head_kv: int = 2
    gqa: int = 4
    d: int = 128
    n_kv: int = 256
    n_stream: int = 1
    n_seq: int = 2  # sequences (state slots) smoothed in the call; sequence i lives in stream i % n_stream
    n_tok: int = 2  # smoothed tokens per sequence, in position order
    fill: str = "part"  # queue contents before the call: empty, part, full, or mixed (per slot)
    mode: int = MODE_ADAPTIVE
    prev: str = "yes"  # first token of a sequence has a previous cell: yes, no, mixed
    queue: int = 15
    lam: tuple[float, float] = (0.9, 0.2)
    mask: int = 1  # q path: 0 none, 1 f32, 2 f16
    softcap: float = 0.0
    max_bias: float = 0.0
    sinks: int = 0
    rows: int = 1  # query rows per stream that are not smoothed (the ubatch's other tokens)
    fa: int = 0  # q rounded to K's vec_dot type, as flash attention converts it (impl flash)
    seed: int = 0

    def vars(self) -> str:
        t = orc.TYPE_NAMES
        parts = [
            f"path={self.path}", f"type_k={t[self.type_k]}", f"type_v={t[self.type_v]}", f"v_trans={self.v_trans}",
            f"hkv={self.n_head_kv}", f"gqa={self.gqa}", f"d={self.d}", f"n_kv={self.n_kv}",
            f"ns={self.n_stream}", f"seqs={self.n_seq}", f"toks={self.n_tok}", f"fill={self.fill}",
            f"mode={orc.MODE_NAMES[self.mode]}", f"prev={self.prev}", f"M={self.queue}",
            f"lam={self.lam[0]}+-{self.lam[1]}",
        ]  # fmt: skip
        if self.path == "q":
            parts += [f"mask={['none', 'f32', 'f16'][self.mask]}", f"softcap={self.softcap}",
                      f"max_bias={self.max_bias}", f"sinks={self.sinks}"]  # fmt: skip
        if self.rows != 1:
            parts.append(f"rows={self.rows}")
        return ",".join(parts)


LAMS = [(0.9, 0.2), (0.5, 0.5), (0.5, 0.2), (0.7, 0.2)]
TYPES = [GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0]


def build_specs() -> list[Spec]:
    specs: list[Spec] = []
    # cache types × V layout × path
    for t in TYPES:
        for vt in (0, 1) if t != GGML_TYPE_Q8_0 else (0,):
            for path in ("kq", "q"):
                specs.append(Spec(path=path, type_k=t, type_v=t, v_trans=vt))
    specs.append(Spec(type_k=GGML_TYPE_Q8_0, type_v=GGML_TYPE_F16, v_trans=1))
    specs.append(Spec(path="q", type_k=GGML_TYPE_F16, type_v=GGML_TYPE_Q8_0))
    specs.append(Spec(path="q", type_k=GGML_TYPE_BF16, type_v=GGML_TYPE_F32, v_trans=1))
    # head sizes × GQA ratio, rotating types and paths
    for i, (d, gqa) in enumerate((d, g) for d in (64, 80, 96, 128, 256) for g in (1, 4, 8)):
        t = TYPES[i % 4]
        if t == GGML_TYPE_Q8_0 and d % orc.QK8_0 != 0:
            t = GGML_TYPE_F16  # a q8_0 block must not straddle two heads' rows
        specs.append(Spec(path=("kq", "q")[i % 2], type_k=t, type_v=t, v_trans=int(i % 3 == 0 and t != GGML_TYPE_Q8_0),
                          d=d, gqa=gqa, n_head_kv=(4, 2, 1)[i % 3], n_kv=(64, 300)[i % 2]))  # fmt: skip
    # cache lengths, with masked holes on the q path
    for i, n_kv in enumerate((1, 2, 7, 33, 255, 1000, 2048)):
        one = n_kv < 8
        for path in ("kq", "q"):
            t = TYPES[(i + (path == "q")) % 4]
            specs.append(Spec(path=path, type_k=t, type_v=t, n_kv=n_kv, n_seq=1 if one else 2,
                              n_tok=1 if n_kv == 1 else 2, prev="no" if n_kv <= 2 else "yes",
                              d=64 if n_kv >= 1000 else 128))  # fmt: skip
    # modes × queue fill × previous cell
    for i, (mode, fill) in enumerate((m, f) for m in (0, 1, 2) for f in ("empty", "part", "full", "mixed")):
        t = TYPES[i % 4]
        specs.append(Spec(path=("kq", "q")[i % 2], type_k=t, type_v=t, v_trans=int(i % 4 == 1), mode=mode,
                          fill=fill, prev=("yes", "no", "mixed")[i % 3], lam=LAMS[i % 4],
                          n_seq=3, n_tok=2))  # fmt: skip
    # streams × sequences × tokens per sequence
    for i, (ns, nseq, ntok) in enumerate([(1, 1, 1), (1, 1, 3), (1, 4, 2), (2, 2, 2), (2, 4, 3), (2, 3, 1)]):
        for path in ("kq", "q"):
            t = TYPES[(i + (path == "q")) % 4]
            specs.append(Spec(path=path, type_k=t, type_v=t, n_stream=ns, n_seq=nseq, n_tok=ntok,
                              fill=("mixed", "full")[i % 2], prev=("mixed", "yes")[i % 2],
                              lam=LAMS[i % 4]))  # fmt: skip
    # q path: mask types, soft-cap, ALiBi, sinks
    extras = [
        dict(mask=0), dict(mask=2), dict(mask=2, max_bias=8.0), dict(softcap=30.0), dict(softcap=2.0, mask=2),
        dict(sinks=1), dict(sinks=1, mask=0), dict(max_bias=8.0, sinks=1, softcap=20.0), dict(max_bias=0.5, gqa=3),
    ]  # fmt: skip
    for i, kw in enumerate(extras):
        t = TYPES[i % 4]
        specs.append(Spec(path="q", type_k=t, type_v=t, lam=LAMS[i % 4], **kw))
    # queue capacities and λ windows
    queues = [(1, (0.5, 0.5)), (2, (0.5, 0.5)), (7, (0.3, 0.3)), (256, (0.5, 0.5)), (15, (1.0, 0.0))]
    for i, (m, lam) in enumerate(queues):
        specs.append(Spec(path=("kq", "q")[i % 2], queue=m, lam=lam, fill=("full", "mixed")[i % 2], n_tok=3))
    return [replace(s, seed=1000 + i) for i, s in enumerate(specs)]


SPECS = build_specs()


@dataclass
class Inputs:
    case: OpCase
    kq_or_q: np.ndarray
    mask: np.ndarray | None
    sinks: np.ndarray | None
    k: np.ndarray
    v: np.ndarray
    ids: np.ndarray
    state: np.ndarray
    referenced_slots: list[int]


def _interleave(rng: np.random.Generator, per_seq: list[list[int]]) -> list[int]:
    """Random interleaving of the sequences' token lists that keeps each list in order."""
    order = np.concatenate([[s] * len(toks) for s, toks in enumerate(per_seq)]).astype(int)
    rng.shuffle(order)
    pos = [0] * len(per_seq)
    out = []
    for s in order:
        out.append(per_seq[s][pos[s]])
        pos[s] += 1
    return out


def make_inputs(spec: Spec, attempt: int = 0) -> Inputs:
    rng = np.random.default_rng(spec.seed + 7919 * attempt)
    n_head = spec.n_head_kv * spec.gqa
    seq_stream = [s % spec.n_stream for s in range(spec.n_seq)]
    per_stream = [seq_stream.count(st) for st in range(spec.n_stream)]
    n_tps = max(per_stream) * spec.n_tok + spec.rows

    # tokens: (row, stream, cell, prev, slot) in position order per sequence
    per_seq: list[list[tuple[int, int, int, int, int]]] = []
    free_cells = [list(rng.permutation(spec.n_kv)) for _ in range(spec.n_stream)]
    free_rows = [list(rng.permutation(n_tps)) for _ in range(spec.n_stream)]
    for s in range(spec.n_seq):
        st = seq_stream[s]
        has_prev = {"yes": True, "no": False, "mixed": s % 2 == 0}[spec.prev]
        prev = int(free_cells[st].pop()) if has_prev else -1
        toks = []
        for _ in range(spec.n_tok):
            cell = int(free_cells[st].pop())
            toks.append((int(free_rows[st].pop()), st, cell, prev, s))
            prev = cell
        per_seq.append(toks)
    ids = np.array(_interleave(rng, per_seq), dtype=np.int32).reshape(-1, 5)
    n_smooth = ids.shape[0]

    n_slot = spec.n_seq + 1  # the last slot is never referenced
    queue_cap = spec.queue + 3
    lambda_ref, window = spec.lam
    case = OpCase(
        from_scores=int(spec.path == "q"), n_kv=spec.n_kv, n_tps=n_tps, n_head=n_head, n_head_kv=spec.n_head_kv,
        n_stream=spec.n_stream, d_k=spec.d, d_v=spec.d, n_smooth=n_smooth, n_slot=n_slot, queue_cap=queue_cap,
        queue=spec.queue, mode=spec.mode, v_trans=spec.v_trans, k_type=spec.type_k, v_type=spec.type_v,
        mask_kind=spec.mask if spec.path == "q" else 0, has_sinks=spec.sinks if spec.path == "q" else 0,
        lambda_ref=lambda_ref, window=window, eps=1e-10, scale=1.0 / math.sqrt(spec.d), max_bias=spec.max_bias,
        logit_softcap=spec.softcap,
    )  # fmt: skip

    # caches hold values of their own type
    n_k, n_v = spec.n_head_kv * spec.d, spec.n_head_kv * spec.d
    k = orc.encode_rows(rng.standard_normal((spec.n_stream, spec.n_kv, n_k)), spec.type_k)
    if spec.v_trans:
        v_f = rng.standard_normal((spec.n_stream, n_v, spec.n_kv)).astype(np.float32)
        v = orc.encode_v_trans_elems(v_f, case)
    else:
        v = orc.encode_rows(rng.standard_normal((spec.n_stream, spec.n_kv, n_v)), spec.type_v)

    # mask: holes (-inf) anywhere but on a token's own cell; ALiBi-style distances or a few
    # non-integer biases (rounded when the mask is f16)
    own = np.full((spec.n_stream, n_tps), -1)
    for row, st, cell, _, _ in ids:
        own[st, row] = cell
    mask_full = np.zeros((spec.n_stream, 1, n_tps, spec.n_kv), dtype=np.float32)
    for st in range(spec.n_stream):
        for row in range(n_tps):
            centre = own[st, row] if own[st, row] >= 0 else int(rng.integers(spec.n_kv))
            m = np.zeros(spec.n_kv, dtype=np.float32)
            if spec.max_bias > 0:
                m = -np.abs(np.arange(spec.n_kv) - centre).astype(np.float32)
            else:
                bias = rng.random(spec.n_kv) < 0.1
                m[bias] = -3.0 * rng.random(int(bias.sum()))
            m[rng.random(spec.n_kv) < 0.25] = -np.inf
            m[centre] = 0.0
            mask_full[st, 0, row] = m

    sharp = float(rng.choice([0.5, 1.0, 2.0, 4.0]))
    sinks = None
    if spec.path == "q":
        q = (rng.standard_normal((spec.n_stream * n_tps, n_head, spec.d)) * sharp).astype(np.float32)
        if spec.fa:
            # flash attention multiplies Q converted to K's vec_dot type (ggml-cpu's type traits:
            # each of these cache types is its own); the oracle then sees the same Q
            q = orc.decode_rows(orc.encode_rows(q, spec.type_k), spec.type_k, spec.d).reshape(q.shape)
        mask = mask_full if spec.mask else None
        if spec.sinks:
            sinks = rng.standard_normal(n_head).astype(np.float32) * 2.0
        kq_or_q = q
    else:
        # soft_max output: rows of random logits with the holes at probability 0
        mask = None
        logits = rng.standard_normal((spec.n_stream, n_head, n_tps, spec.n_kv)) * sharp
        holes = np.isneginf(mask_full)  # [ns, 1, n_tps, n_kv], broadcast over heads
        logits = np.where(holes, -np.inf, logits)
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        kq_or_q = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)

    # the queues: values kept RANK_MARGIN away from every z of the call, so that k is exact
    z, _ = orc.column_entropies(case, kq_or_q, mask, sinks, k, ids)
    for slot in range(spec.n_seq):
        zs = np.sort(z[ids[:, 4] == slot])
        if np.any(np.diff(zs) < RANK_MARGIN):
            if attempt >= 20:
                raise RuntimeError(f"cannot draw well-separated entropies for {spec.vars()}")
            return make_inputs(spec, attempt + 1)
    state = np.zeros((n_slot, 1 + queue_cap), dtype=np.float32)
    lo, hi = float(z.min()) - 1.0, float(z.max()) + 1.0
    for slot in range(n_slot):
        fill = spec.fill if spec.fill != "mixed" else ("empty", "part", "full")[slot % 3]
        count = {"empty": 0, "part": max(1, spec.queue // 2), "full": spec.queue}[fill]
        count = min(count, spec.queue)
        vals: list[float] = []
        while len(vals) < count:
            x = float(np.float32(rng.uniform(lo, hi)))
            if np.all(np.abs(z - x) >= RANK_MARGIN):
                vals.append(x)
        state[slot, 0] = count
        state[slot, 1 : 1 + count] = vals
        # a value below every z past the count: counting it would raise k
        state[slot, 1 + count :] = -1e30
    return Inputs(case, kq_or_q, mask, sinks, k, v, ids, state, list(range(spec.n_seq)))


# ---------------------------------------------------------------------------------------
# comparison of one run with the oracle


def _worst(got: np.ndarray, want: np.ndarray) -> str:
    i = int(np.argmax(np.abs(got - want)))
    g, w = got.flat[i], want.flat[i]
    return f"max |got - want| = {abs(g - w):.3g} at {i} (got {g!r}, want {w!r})"


def _check_rows(
    label: str,
    ggml_type: int,
    n: int,
    got_rows: np.ndarray,
    orig_rows: np.ndarray,
    blends: list[tuple[int, int, int, float]],
    decode,
    encode,
) -> None:
    """Blended rows within one rounding of the f32 blend, every other row bit-identical.

    got_rows / orig_rows: [n_stream, n_rows, ...] in storage form, row r of stream s being
    what cell r of the cache holds. The blend of each (stream, cell, prev, λ) takes the cell's
    value as handed in and the previous cell's value as the op left it (equal to the input
    unless an earlier column of this call blended it), so a one-ulp rounding difference in
    an earlier row does not propagate into a false failure here.
    """
    touched = np.zeros(got_rows.shape[:2], dtype=bool)
    for s, cell, prev, lam in blends:
        touched[s, cell] = True
        cur = decode(orig_rows[s, cell]).astype(np.float64)
        prv = decode(got_rows[s, prev]).astype(np.float64)
        want = orc.blend(cur, prv, lam).astype(np.float64)
        got = decode(got_rows[s, cell]).astype(np.float64)
        scale = (1.0 - lam) * np.abs(cur) + lam * np.abs(prv)  # f32 arithmetic error scale
        if ggml_type == GGML_TYPE_F32:
            tol = F32_RTOL * scale + 1e-30
        elif ggml_type == GGML_TYPE_Q8_0:
            d = orc.q8_0_scales(encode(want.astype(np.float32)), n).astype(np.float64)
            tol = np.repeat(d, orc.QK8_0) * (1.0 + 1e-3) + 1e-6 * scale
        else:
            tol = np.maximum(orc.ulp(want, ggml_type), orc.ulp(got, ggml_type)) + 1e-6 * scale
        bad = np.abs(got - want) > tol
        worst = int(np.argmax(np.abs(got - want)))
        assert not bad.any(), (
            f"{label}: blended row (stream {s}, cell {cell}, prev {prev}, lambda {lam}) differs in "
            f"{int(bad.sum())} of {n} values; {_worst(got, want)}, tolerance there {tol[worst]:.3g}"
        )
    untouched = ~touched
    diff = np.any((got_rows != orig_rows).reshape(*got_rows.shape[:2], -1), axis=-1) & untouched
    assert not diff.any(), f"{label}: rows that must not change did: (stream, cell) {np.argwhere(diff)[:8].tolist()}"


def check_run(inp: Inputs, out: op_runner.RunOutput, ref: orc.OpResult, label: str) -> None:
    case = inp.case
    assert out.rc == op_runner.RC_OK, (
        f"{label}: kvsmooth_op_run returned {out.rc} ({op_runner.RC_NAMES.get(out.rc)})"
    )
    res = out.result.astype(np.float64)
    want = ref.result.astype(np.float64)
    assert not np.isnan(res).any(), f"{label}: result entries not written: {np.argwhere(np.isnan(res)).tolist()}"
    dz = np.abs(res[:, 0] - ref.z)
    assert np.all(dz <= z_tol(ref.z)), f"{label}: z (entropy) {_worst(res[:, 0], ref.z)}"
    assert np.array_equal(res[:, 2], want[:, 2]), (
        f"{label}: rank k got {res[:, 2].tolist()}, want {want[:, 2].tolist()}"
    )
    assert np.all(np.abs(res[:, 1] - want[:, 1]) <= LAMBDA_ATOL), f"{label}: lambda {_worst(res[:, 1], want[:, 1])}"
    assert np.array_equal(res[:, 3], want[:, 3]), (
        f"{label}: applied got {res[:, 3].tolist()}, want {want[:, 3].tolist()}"
    )

    # state: unreferenced slots and the capacity past M untouched; the live queue as the oracle's
    st, st_want = out.state, ref.state
    for slot in range(case.n_slot):
        if slot not in inp.referenced_slots:
            assert np.array_equal(st[slot].view(np.uint32), inp.state[slot].view(np.uint32)), (
                f"{label}: state slot {slot} is not referenced but changed"
            )
            continue
        count = int(st_want[slot, 0])
        assert st[slot, 0] == count, f"{label}: state slot {slot} count {st[slot, 0]}, want {count}"
        live = st[slot, 1 : 1 + count].astype(np.float64)
        live_want = st_want[slot, 1 : 1 + count].astype(np.float64)
        assert np.all(np.abs(live - live_want) <= z_tol(live_want)), (
            f"{label}: state slot {slot} FIFO {_worst(live, live_want)}"
        )
        tail = slice(1 + case.queue, None)
        assert np.array_equal(st[slot, tail].view(np.uint32), inp.state[slot, tail].view(np.uint32)), (
            f"{label}: state slot {slot} changed past the queue length M={case.queue}"
        )

    # caches, with the λ the oracle used
    lam_of = {j: float(ref.result[j, 1]) for j in range(case.n_smooth)}
    blends = [(int(s), int(c), int(p), lam_of[j]) for j, (_, s, c, p, _) in enumerate(inp.ids) if p >= 0]
    n_k, n_v = case.n_head_kv * case.d_k, case.n_head_kv * case.d_v
    _check_rows(
        f"{label}: K", case.k_type, n_k, out.k, inp.k, blends,
        lambda b: orc.decode_rows(b, case.k_type, n_k), lambda x: orc.encode_rows(x, case.k_type),
    )  # fmt: skip
    v_blends = [] if case.mode == MODE_KEYS else blends
    if case.v_trans:
        # transposed: cell c of stream s is the column v[s, :, c]
        _check_rows(
            f"{label}: V (transposed)", case.v_type, n_v, out.v.transpose(0, 2, 1), inp.v.transpose(0, 2, 1), v_blends,
            lambda b: orc.decode_v_trans(b, case), lambda x: orc.encode_v_trans_elems(x, case),
        )  # fmt: skip
    else:
        _check_rows(
            f"{label}: V", case.v_type, n_v, out.v, inp.v, v_blends,
            lambda b: orc.decode_rows(b, case.v_type, n_v), lambda x: orc.encode_rows(x, case.v_type),
        )  # fmt: skip

    # f32 caches: the whole chain of blends against the oracle alone, too
    if case.k_type == GGML_TYPE_F32:
        got, want_k = orc.decode_rows(out.k, 0, n_k), orc.decode_rows(ref.k, 0, n_k)
        assert np.allclose(got, want_k, rtol=F32_RTOL, atol=1e-6), f"{label}: K vs oracle chain {_worst(got, want_k)}"


def run(backend: str, case: OpCase, *args: np.ndarray | None, impl: str = "fused") -> op_runner.RunOutput:
    """op_runner.run_case; a missing library fails the test (it is never a reason to skip)."""
    try:
        return op_runner.run_case(backend, case, *args, impl=impl)  # type: ignore[arg-type]
    except op_runner.RunnerNotFound as e:
        pytest.fail(str(e), pytrace=False)


@pytest.mark.parametrize("impl", op_runner.IMPLS)
@pytest.mark.parametrize("spec", SPECS, ids=[s.vars() for s in SPECS])
def test_kvsmooth_op(spec: Spec, impl: str, kvsmooth_backend: str) -> None:
    """The op (impl fused) and the same computation from stock ggml ops (composed, SPEC §4.2)
    against the oracle, in every case."""
    inp = make_inputs(spec)
    args = (inp.kq_or_q, inp.mask, inp.sinks, inp.k, inp.v, inp.ids, inp.state)
    ref = orc.reference(inp.case, *args)
    out = run(kvsmooth_backend, inp.case, *args, impl=impl)
    if out.rc == op_runner.RC_NOT_SUPPORTED:
        pytest.fail(f"backend {kvsmooth_backend} does not support this case with impl {impl} (SPEC §4 requires it)")
    check_run(inp, out, ref, f"{kvsmooth_backend} {impl} {spec.path} path")

    if spec.path == "q":
        # the probabilities path fed with the same scores' softmax gives the same entropies
        _, alphas = orc.column_entropies(inp.case, *args[:3], inp.k, inp.ids)
        kq = np.zeros((inp.case.n_stream, inp.case.n_head, inp.case.n_tps, inp.case.n_kv), dtype=np.float32)
        for j, (i, s, _, _, _) in enumerate(inp.ids):
            kq[s, :, i, :] = alphas[j]
        case_kq = replace(inp.case, from_scores=0, mask_kind=0, has_sinks=0)
        inp_kq = replace(inp, case=case_kq, kq_or_q=kq, mask=None, sinks=None)
        args_kq = (kq, None, None, inp.k, inp.v, inp.ids, inp.state)
        out_kq = run(kvsmooth_backend, case_kq, *args_kq, impl=impl)
        label = f"{kvsmooth_backend} {impl} kq path on the q path's scores"
        check_run(inp_kq, out_kq, orc.reference(case_kq, *args_kq), label)
        z_q, z_kq = out.result[:, 0].astype(np.float64), out_kq.result[:, 0].astype(np.float64)
        assert np.all(np.abs(z_q - z_kq) <= z_tol(z_kq)), f"z of the q path vs the kq path: {_worst(z_q, z_kq)}"


def build_flash_specs() -> list[Spec]:
    """Every scores-path case flash attention can take (V rows, mask none or f16), and the cases
    that reach the CPU kernel's other two paths: tiled (64 or more query rows of f32/f16 K and
    V) and split over the cells (one query row, 512 or more cells, f32/f16 K = V)."""
    specs = [replace(s, fa=1, mask=2 if s.mask == 1 else s.mask) for s in SPECS if s.path == "q" and not s.v_trans]
    for t in (GGML_TYPE_F16, GGML_TYPE_F32):
        for kw in (dict(), dict(sinks=1), dict(softcap=30.0, max_bias=8.0), dict(n_head_kv=1, gqa=8, sinks=1, mask=0)):
            base = {"path": "q", "type_k": t, "type_v": t, "fa": 1, "mask": 2, **kw}
            specs.append(Spec(**{**base, "n_seq": 2, "n_tok": 2, "rows": 70, "n_kv": 300}))  # tiled
            specs.append(Spec(**{**base, "n_seq": 1, "n_tok": 1, "rows": 0, "n_kv": 1000}))  # split-KV
    specs.append(Spec(path="q", type_k=GGML_TYPE_F16, type_v=GGML_TYPE_F16, fa=1, mask=2, n_seq=1, n_tok=1, rows=0,
                      n_kv=2048, d=64, fill="full"))  # fmt: skip
    return [replace(s, seed=5000 + i) for i, s in enumerate(specs)]


FLASH_SPECS = build_flash_specs()


@pytest.mark.parametrize("spec", FLASH_SPECS, ids=[s.vars() for s in FLASH_SPECS])
def test_flash_attn_entropy_into_op(spec: Spec, kvsmooth_backend: str) -> None:
    """ggml_flash_attn_ext_entropy's row entropies fed to ggml_kvsmooth_from_entropies, what llama.cpp
    builds with flash attention on the CPU: the oracle's results on each of the kernel's paths. A
    backend without the side output must refuse it (supports_op), not compute something else."""
    inp = make_inputs(spec)
    args = (inp.kq_or_q, inp.mask, inp.sinks, inp.k, inp.v, inp.ids, inp.state)
    ref = orc.reference(inp.case, *args)
    out = run(kvsmooth_backend, inp.case, *args, impl=op_runner.FLASH)
    if not kvsmooth_backend.startswith("CPU"):
        assert out.rc == op_runner.RC_NOT_SUPPORTED, (
            f"{kvsmooth_backend}: the side output is a CPU kernel's, got rc {out.rc}"
        )
        return
    check_run(inp, out, ref, f"{kvsmooth_backend} flash attention entropy path")


def test_flash_attn_entropy_refuses_bad_layouts() -> None:
    """Transposed V and an f32 mask are not flash attention's inputs: bad arguments, no crash."""
    for spec in (replace(SPECS[1], v_trans=1), Spec(path="q", mask=1), Spec(path="kq")):
        inp = make_inputs(spec)
        args = (inp.kq_or_q, inp.mask, inp.sinks, inp.k, inp.v, inp.ids, inp.state)
        out = run("CPU", inp.case, *args, impl=op_runner.FLASH)
        assert out.rc == op_runner.RC_BAD_ARGUMENTS, (spec.vars(), out.rc)


@pytest.mark.parametrize("ggml_type", [GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0], ids=orc.TYPE_NAMES.get)
def test_oracle_storage_matches_ggml(ggml_type: int) -> None:
    """encode_rows is bit-identical to ggml's own reference conversion (ggml_quantize_chunk).

    libggml-base is the one the runner library was linked against, already loaded with it.
    """
    try:
        op_runner.load_library()
    except op_runner.RunnerNotFound as e:
        pytest.fail(str(e), pytrace=False)
    # next to the runner in a llama.cpp build (versioned) or a source checkout; where its RPATH
    # points in the installed package (llama_cpp/lib, unversioned)
    runner_dir = op_runner.find_library().parent
    places = [runner_dir, runner_dir / "bin", runner_dir.parent.parent / "llama_cpp" / "lib"]
    base_path = next(p for d in places for p in sorted(d.glob("libggml-base.*")))
    base = ctypes.CDLL(str(base_path))
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((64, 256)) * np.exp2(rng.integers(-24, 10, (64, 1)))).astype(np.float32)
    x[0, :32] = np.arange(32) - 15.5  # ties
    x[1, :32] = 0.0
    want = np.zeros((64, orc.row_bytes(ggml_type, 256)), dtype=np.uint8)
    base.ggml_quantize_chunk(ggml_type, x.ctypes.data, want.ctypes.data, 0, 64, 256, None)
    assert np.array_equal(orc.encode_rows(x, ggml_type), want)


def test_unknown_backend_returns_2() -> None:
    spec = SPECS[0]
    inp = make_inputs(spec)
    out = run(
        "NoSuchBackend42", inp.case, inp.kq_or_q, inp.mask, inp.sinks, inp.k, inp.v, inp.ids, inp.state
    )
    assert out.rc == op_runner.RC_NO_BACKEND
    assert np.array_equal(out.k, inp.k) and np.array_equal(out.state, inp.state)
