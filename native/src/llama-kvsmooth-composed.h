#pragma once

// KVSmooth built from stock ggml ops (SPEC §4.2): the computation of GGML_OP_KVSMOOTH
// (ggml.h) for backends without its kernel, from ops every backend implements and upstream
// tests on every backend (get_rows, set_rows, mul_mat, soft_max_ext, log, mul, sum_rows,
// step, clamp, concat, ...). Same inputs, same in-place effect on the K/V cache rows and the
// queue state, same result tensor [4, n] (z, lambda, rank, applied) as the fused op, so
// llama.cpp's graph and the op tests use either.
//
// The fused kernel walks the columns in order; here the columns are cut into rounds, round r
// holding the r-th column of every slot (the columns of one slot are consecutive). Each
// round gathers its slots' queues and its cells, updates them and scatters them back with
// set_rows, and the next round reads what the previous one wrote (through set_rows' view),
// so a later token of a slot ranks against the entropy of the earlier one and blends with
// its smoothed row, as in the kernel. The entropies of all columns are computed first, from
// the attention probabilities (flash attention off) or from Q·K recomputed with the mask,
// scale, soft-cap, ALiBi and sinks (on), as the kernel does.
//
// The indices the ops need (rows of the probabilities, cells, element indices of a
// transposed V) are small input tensors computed on the host from the same ids the fused op
// reads (kvsmooth_composed::fill), which set_input has on the host anyway.
//
// Assumed, as llama.cpp lays out its caches: K (and V not transposed) rows of one cell are
// contiguous across KV heads, streams are kv_size cells apart, and a queue's count is at most
// the op's queue length M (the state capacity equals M in llama.cpp).

#include "ggml.h"

#include <cstdint>
#include <vector>

struct kvsmooth_composed_args {
    ggml_tensor * kq    = nullptr; // flash attention off: f32 [n_kv, n_tps, n_head, n_stream] probabilities
    ggml_tensor * q     = nullptr; // on: f32 [d_k, n_head, n_tps*n_stream]
    ggml_tensor * mask  = nullptr; // on: f16/f32 [n_kv, >= n_tps, 1, n_stream], or null
    ggml_tensor * sinks = nullptr; // on: f32 [n_head], or null
    ggml_tensor * k     = nullptr; // [d_k, n_head_kv, n_kv, n_stream] view of the K cache
    ggml_tensor * v     = nullptr; // [d_v, n_head_kv, n_kv, n_stream], or [n_kv, n_head_kv, d_v, n_stream] transposed
    ggml_tensor * state = nullptr; // f32 [1 + cap, n_slot] queues, count first
    float   scale         = 1.0f;
    float   max_bias      = 0.0f;
    float   logit_softcap = 0.0f;
    float   lambda_ref    = 0.9f;
    float   window        = 0.2f;
    float   eps           = 1e-10f;
    int32_t queue         = 15;
    ggml_kvsmooth_mode mode = GGML_KVSMOOTH_MODE_ADAPTIVE;
    bool    v_trans       = false;
};

class kvsmooth_composed {
public:
    // rounds per build: a decode gives the composed path at most this many output tokens of one
    // sequence (llama_kvsmooth::check_batch); more rounds (a worst-case reserve graph) are built
    // as the last one
    static constexpr int32_t MAX_ROUNDS = 8;

    // graph nodes of one build, at most: per round, and for the rest
    static constexpr size_t NODES_PER_ROUND = 128;
    static constexpr size_t NODES_PER_BUILD = 64;

    // the rounds of columns whose slots are slots[j] (see the header comment)
    static std::vector<std::vector<int32_t>> rounds_of(const std::vector<int32_t> & slots);

    // build the computation of the columns in `rounds` (every column 0..n-1 exactly once) into
    // gf; the writes to the caches and the state are expanded into gf, the result is returned
    // (f32 [4, n], not yet expanded). The index inputs are created in ctx and marked as inputs.
    ggml_tensor * build(ggml_context * ctx, ggml_cgraph * gf, const kvsmooth_composed_args & args,
            const std::vector<std::vector<int32_t>> & rounds);

    // fill the index inputs from ids (host, i32 [n][5] as for the fused op) once they are allocated
    void fill(const int32_t * ids) const;

private:
    struct round {
        std::vector<int32_t> cols;
        ggml_tensor * cols_t   = nullptr; // i32 [n_r] the round's columns (when there are several rounds)
        ggml_tensor * slots    = nullptr; // i32 [n_r]
        ggml_tensor * cells    = nullptr; // i32 [n_r] row of the cell in the K (V) row view
        ggml_tensor * prevs    = nullptr; // i32 [n_r] row of the previous cell, the cell itself if none
        ggml_tensor * has_prev = nullptr; // f32 [1, n_r] 1: blended, 0: written back unchanged
        ggml_tensor * w_src    = nullptr; // i32 [n_r] the column whose blend weight a column's row takes: itself,
                                          //   or, for a column of a token of several sequences that does not
                                          //   blend, the round's column that blends the same cell (one value written twice)
        ggml_tensor * v_cells  = nullptr; // i32 [d_v*n_r] transposed V: elements of the cell
        ggml_tensor * v_prevs  = nullptr; // i32 [d_v*n_r] and of the previous cell
    };

    int64_t n        = 0;
    int64_t n_head   = 0;
    int64_t n_tps    = 0;
    int64_t n_stream = 0;
    int64_t kv_size  = 0;  // cells per stream
    int64_t mask_tps = 0;  // mask rows per stream
    int64_t d_v_all  = 0;  // n_head_kv*d_v, transposed V
    int32_t queue    = 0;
    bool    from_scores = false;

    ggml_tensor * rows_tok  = nullptr; // i32 [n] Q row of each column (flash attention on)
    ggml_tensor * rows_mask = nullptr; // i32 [n] mask row of each column (on, with a mask)
    ggml_tensor * rows_head = nullptr; // i32 [n*n_head] probability row of (column j, head h) at j*n_head + h
    ggml_tensor * iota      = nullptr; // f32 [M] 0, 1, ..., M-1
    ggml_tensor * queue_len = nullptr; // f32 [1] M (not in the graph in fixed mode)
    ggml_tensor * perm      = nullptr; // i32 [n] position of each column in round order (several rounds)
    std::vector<round> rounds;
};
