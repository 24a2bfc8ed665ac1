#include "llama-kvsmooth-composed.h"

#include "ggml-backend.h"

#include <cfloat>
#include <cstring>

// column j of ids: (index in stream, stream, cell, previous cell or -1, slot)
enum { ID_I = 0, ID_S = 1, ID_CELL = 2, ID_PREV = 3, ID_SLOT = 4, ID_N = 5 };

static ggml_tensor * new_input(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1, const char * name) {
    ggml_tensor * t = ggml_new_tensor_2d(ctx, type, ne0, ne1);
    ggml_set_input(t);
    ggml_set_name(t, name);
    return t;
}

// x > 0 ? 1 : 0, x integer-valued: [a >= b] and [a < b] for integers as step(a - b + 1/2), step(b - a - 1/2)
static ggml_tensor * at_least(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b) {
    return ggml_step(ctx, ggml_scale_bias(ctx, ggml_sub(ctx, a, b), 1.0f, 0.5f));
}

static ggml_tensor * below(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b) {
    return ggml_step(ctx, ggml_scale_bias(ctx, ggml_sub(ctx, a, b), -1.0f, -0.5f));
}

// a·(1 − w) + b·w for w in {0, 1} (broadcast over rows), exact when a and b are finite
static ggml_tensor * select(ggml_context * ctx, ggml_tensor * a, ggml_tensor * b, ggml_tensor * w) {
    return ggml_add(ctx, ggml_mul(ctx, a, ggml_scale_bias(ctx, w, -1.0f, 1.0f)), ggml_mul(ctx, b, w));
}

std::vector<std::vector<int32_t>> kvsmooth_composed::rounds_of(const std::vector<int32_t> & slots) {
    std::vector<std::vector<int32_t>> res;
    for (size_t j = 0; j < slots.size(); ++j) {
        // the r-th column of its slot, counting the slot's earlier columns
        size_t r = 0;
        for (size_t i = 0; i < j; ++i) {
            r += slots[i] == slots[j];
        }
        if (r >= res.size()) {
            res.resize(r + 1);
        }
        res[r].push_back((int32_t) j);
    }
    return res;
}

// the per-(column, head) attention entropies −Σ a·ln(a + ε), averaged over heads: f32 [1, n]
static ggml_tensor * mean_entropy(ggml_context * ctx, ggml_tensor * p, float eps, int64_t n_head, int64_t n) {
    // p: [n_kv, n*n_head]; masked cells have a == 0 and contribute 0·ln(ε) = 0 (with ε = 0, ln of
    // the smallest normal float instead of −inf, so that 0·ln stays 0)
    ggml_tensor * lg = eps > 0.0f ? ggml_log(ctx, ggml_scale_bias(ctx, p, 1.0f, eps))
                                  : ggml_log(ctx, ggml_clamp(ctx, p, FLT_MIN, 1.0f));
    ggml_tensor * h = ggml_sum_rows(ctx, ggml_mul(ctx, p, lg));            // [1, n*n_head]
    h = ggml_sum_rows(ctx, ggml_reshape_2d(ctx, h, n_head, n));             // [1, n]
    return ggml_scale(ctx, h, -1.0f/(float) n_head);
}

ggml_tensor * kvsmooth_composed::build(ggml_context * ctx, ggml_cgraph * gf, const kvsmooth_composed_args & a,
        const std::vector<std::vector<int32_t>> & col_rounds_in) {
    // past MAX_ROUNDS, the columns join the last round (only a reserve graph has them: its values
    // are never used; a decode with more is refused before its graph is built)
    std::vector<std::vector<int32_t>> col_rounds = col_rounds_in;
    if (col_rounds.size() > (size_t) MAX_ROUNDS) {
        for (size_t r = MAX_ROUNDS; r < col_rounds.size(); ++r) {
            col_rounds[MAX_ROUNDS - 1].insert(col_rounds[MAX_ROUNDS - 1].end(), col_rounds[r].begin(), col_rounds[r].end());
        }
        col_rounds.resize(MAX_ROUNDS);
    }

    GGML_ASSERT((a.kq == nullptr) != (a.q == nullptr));
    GGML_ASSERT(a.k && a.v && a.state && a.state->type == GGML_TYPE_F32);
    GGML_ASSERT(a.queue >= 1 && a.queue <= a.state->ne[0] - 1);

    from_scores = a.q != nullptr;
    queue       = a.queue;

    ggml_tensor * k = a.k;
    ggml_tensor * v = a.v;

    const int64_t d_k       = k->ne[0];
    const int64_t n_head_kv = k->ne[1];
    const int64_t n_kv      = k->ne[2];
    n_stream = k->ne[3];

    // cell rows: the KV heads of a cell are contiguous, streams kv_size cells apart
    GGML_ASSERT(k->nb[2] == k->nb[1]*n_head_kv && k->nb[3] % k->nb[2] == 0);
    kv_size = (int64_t) (k->nb[3]/k->nb[2]);

    n = 0;
    for (const auto & r : col_rounds) {
        n += (int64_t) r.size();
    }
    GGML_ASSERT(n > 0);

    const int64_t M = a.queue;

    //
    // 1. entropies of every column
    //

    ggml_tensor * probs;    // [n_kv, rows], rows_head picks (column, head)

    if (!from_scores) {
        n_head = a.kq->ne[2];
        n_tps  = a.kq->ne[1];
        GGML_ASSERT(a.kq->ne[3] == n_stream && ggml_is_contiguous(a.kq));
        probs = ggml_reshape_2d(ctx, a.kq, a.kq->ne[0], n_tps*n_head*n_stream);
    } else {
        ggml_tensor * q = a.q;
        n_head = q->ne[1];
        GGML_ASSERT(q->ne[2] % n_stream == 0 && n_head % n_head_kv == 0 && q->ne[0] == d_k);
        n_tps = q->ne[2]/n_stream;

        // the columns' queries [d_k, n, n_head], against every stream's cells (a column's own
        // stream is picked below)
        rows_tok = new_input(ctx, GGML_TYPE_I32, n, 1, "kvsmooth_c_rows_tok");
        ggml_tensor * qc = ggml_is_contiguous(q) ? q : ggml_cont(ctx, q);
        ggml_tensor * qs = ggml_get_rows(ctx, ggml_reshape_2d(ctx, qc, d_k*n_head, q->ne[2]), rows_tok);
        qs = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, qs, d_k, n_head, n), 0, 2, 1, 3));
        if (n_stream > 1) {
            qs = ggml_repeat_4d(ctx, qs, d_k, n, n_head, n_stream);
        }

        // the dot products in f32, as the kernel computes them (mul_mat would round Q to an f16
        // or q8_0 K's vec_dot type), of contiguous operands (the matrix product every backend
        // implements in its plainest form)
        ggml_tensor * kf = ggml_cont(ctx, ggml_permute(ctx, k->type == GGML_TYPE_F32 ? k : ggml_cast(ctx, k, GGML_TYPE_F32), 0, 2, 1, 3));
        ggml_tensor * s = ggml_mul_mat(ctx, kf, qs);  // [n_kv, n, n_head, n_stream]
        ggml_prec_set_acc(s, GGML_PREC_F32);

        float scale = a.scale;
        if (a.logit_softcap != 0.0f) {
            // as ggml_flash_attn_ext: s = softcap·tanh(s·scale/softcap), then the softmax unscaled
            s = ggml_scale(ctx, ggml_tanh(ctx, ggml_scale(ctx, s, a.scale/a.logit_softcap)), a.logit_softcap);
            scale = 1.0f;
        }

        ggml_tensor * mask = nullptr;
        if (a.mask) {
            GGML_ASSERT(a.mask->ne[0] == n_kv && a.mask->ne[2] == 1 && a.mask->ne[3] == n_stream && a.mask->ne[1] >= n_tps);
            mask_tps  = a.mask->ne[1];
            rows_mask = new_input(ctx, GGML_TYPE_I32, n, 1, "kvsmooth_c_rows_mask");
            ggml_tensor * mc = ggml_is_contiguous(a.mask) ? a.mask : ggml_cont(ctx, a.mask);
            mask = ggml_get_rows(ctx, ggml_reshape_2d(ctx, mc, n_kv, mask_tps*n_stream), rows_mask);
            mask = ggml_reshape_4d(ctx, mask, n_kv, n, 1, 1);
        }

        probs = ggml_soft_max_ext(ctx, s, mask, scale, a.max_bias);
        if (a.sinks) {
            ggml_soft_max_add_sinks(probs, a.sinks);
        }
        probs = ggml_reshape_2d(ctx, probs, n_kv, n*n_head*n_stream);
    }

    rows_head = new_input(ctx, GGML_TYPE_I32, n*n_head, 1, "kvsmooth_c_rows_head");

    ggml_tensor * z = mean_entropy(ctx, ggml_get_rows(ctx, probs, rows_head), a.eps, n_head, n);  // [1, n]

    //
    // 2. per round: queues, lambda, blend
    //

    iota      = new_input(ctx, GGML_TYPE_F32, M, 1, "kvsmooth_c_iota");
    queue_len = new_input(ctx, GGML_TYPE_F32, 1, 1, "kvsmooth_c_queue_len");

    const bool    several = col_rounds.size() > 1;
    const int64_t cap     = a.state->ne[0] - 1;
    const int64_t d_v     = a.v_trans ? v->ne[2] : v->ne[0];

    ggml_tensor * state_cur = a.state;
    ggml_tensor * k_rows    = ggml_view_2d(ctx, k, d_k*n_head_kv, (n_stream - 1)*kv_size + n_kv, k->nb[2], 0);
    ggml_tensor * v_rows    = nullptr;
    if (a.v_trans) {
        // one row per element: cell c, element e of stream s is row s*kv_size*d_v_all + e*kv_size + c
        GGML_ASSERT(v->nb[2] == ggml_type_size(v->type)*kv_size && v->nb[1] == v->nb[2]*d_v);
        d_v_all = n_head_kv*d_v;
        v_rows = ggml_view_2d(ctx, v, 1, (n_stream - 1)*kv_size*d_v_all + (d_v_all - 1)*kv_size + n_kv,
                ggml_type_size(v->type), 0);
    } else {
        GGML_ASSERT(v->nb[2] == v->nb[1]*n_head_kv && v->nb[3] == (size_t) kv_size*v->nb[2]);
        v_rows = ggml_view_2d(ctx, v, d_v*n_head_kv, (n_stream - 1)*kv_size + n_kv, v->nb[2], 0);
    }

    const float lo = a.lambda_ref - a.window;
    const float hi = a.lambda_ref + a.window;

    ggml_tensor * z_all = several ? ggml_reshape_2d(ctx, z, 1, n) : nullptr;

    std::vector<ggml_tensor *> lambdas, ranks, applied;

    rounds.clear();
    for (const auto & cols : col_rounds) {
        round r;
        r.cols = cols;

        const int64_t n_r = (int64_t) cols.size();

        ggml_tensor * z_r = z;
        if (several) {
            r.cols_t = new_input(ctx, GGML_TYPE_I32, n_r, 1, "kvsmooth_c_cols");
            z_r = ggml_reshape_2d(ctx, ggml_get_rows(ctx, z_all, r.cols_t), 1, n_r);
        }

        // queues [1 + cap, n_r]: count, then the values oldest first
        r.slots = new_input(ctx, GGML_TYPE_I32, n_r, 1, "kvsmooth_c_slots");
        ggml_tensor * st    = ggml_get_rows(ctx, state_cur, r.slots);
        ggml_tensor * count = ggml_cont(ctx, ggml_view_2d(ctx, st, 1, n_r, st->nb[1], 0));
        ggml_tensor * vals  = ggml_cont(ctx, ggml_view_2d(ctx, st, M, n_r, st->nb[1], sizeof(float)));
        ggml_tensor * pos   = ggml_repeat(ctx, iota, vals);                                    // i, [M, n_r]

        // a full queue drops its oldest value first; the others smaller than z count (SPEC §1.3)
        ggml_tensor * full = ggml_step(ctx, ggml_scale_bias(ctx, count, 1.0f, -((float) M - 0.5f)));  // [1, n_r]
        ggml_tensor * live = ggml_mul(ctx, at_least(ctx, pos, full), below(ctx, pos, count));
        ggml_tensor * less = ggml_step(ctx, ggml_scale(ctx, ggml_sub(ctx, vals, z_r), -1.0f));
        ggml_tensor * rank = ggml_sum_rows(ctx, ggml_mul(ctx, live, less));

        // push: z at position count, or shifted in at the end of a full queue
        ggml_tensor * at_count = ggml_mul(ctx, at_least(ctx, pos, count), below(ctx, pos, ggml_scale_bias(ctx, count, 1.0f, 1.0f)));
        ggml_tensor * placed   = select(ctx, vals, ggml_repeat(ctx, z_r, vals), at_count);
        ggml_tensor * shifted  = M > 1
            ? ggml_concat(ctx, ggml_cont(ctx, ggml_view_2d(ctx, vals, M - 1, n_r, vals->nb[1], sizeof(float))), z_r, 0)
            : z_r;
        ggml_tensor * pushed = select(ctx, placed, shifted, full);
        ggml_tensor * count_new = ggml_sub(ctx, ggml_scale_bias(ctx, count, 1.0f, 1.0f), full);

        ggml_tensor * row = ggml_concat(ctx, count_new, pushed, 0);
        if (cap > M) {
            row = ggml_concat(ctx, row, ggml_cont(ctx, ggml_view_2d(ctx, st, cap - M, n_r, st->nb[1], (1 + M)*sizeof(float))), 0);
        }
        state_cur = ggml_set_rows(ctx, state_cur, row, r.slots);
        ggml_build_forward_expand(gf, state_cur);

        // eq. 13/14
        ggml_tensor * lambda = a.mode == GGML_KVSMOOTH_MODE_FIXED
            ? ggml_clamp(ctx, count, a.lambda_ref, a.lambda_ref)
            : ggml_clamp(ctx, ggml_div(ctx, rank, queue_len), lo, hi);  // k/M rounded once, as the kernel

        // blend: (1 − λ)·cur + λ·prev, λ = 0 where there is no previous cell (written back as it was)
        r.cells    = new_input(ctx, GGML_TYPE_I32, n_r, 1, "kvsmooth_c_cells");
        r.prevs    = new_input(ctx, GGML_TYPE_I32, n_r, 1, "kvsmooth_c_prevs");
        r.has_prev = new_input(ctx, GGML_TYPE_F32, 1, n_r, "kvsmooth_c_has_prev");
        r.w_src    = new_input(ctx, GGML_TYPE_I32, n_r, 1, "kvsmooth_c_w_src");

        ggml_tensor * w   = ggml_get_rows(ctx, ggml_mul(ctx, lambda, r.has_prev), r.w_src);
        ggml_tensor * w_1 = ggml_scale_bias(ctx, w, -1.0f, 1.0f);

        const auto blend = [&](ggml_tensor * rows, ggml_tensor * cells, ggml_tensor * prevs, int64_t width) {
            ggml_tensor * cur  = ggml_get_rows(ctx, rows, cells);
            ggml_tensor * prev = ggml_get_rows(ctx, rows, prevs);
            ggml_tensor * b = ggml_add(ctx,
                    ggml_mul(ctx, ggml_reshape_2d(ctx, cur,  width, n_r), w_1),
                    ggml_mul(ctx, ggml_reshape_2d(ctx, prev, width, n_r), w));
            ggml_tensor * out = ggml_set_rows(ctx, rows, ggml_reshape_2d(ctx, b, rows->ne[0], cells->ne[0]), cells);
            ggml_build_forward_expand(gf, out);
            return out;
        };

        k_rows = blend(k_rows, r.cells, r.prevs, d_k*n_head_kv);

        if (a.mode != GGML_KVSMOOTH_MODE_KEYS) {
            if (a.v_trans) {
                r.v_cells = new_input(ctx, GGML_TYPE_I32, d_v_all*n_r, 1, "kvsmooth_c_v_cells");
                r.v_prevs = new_input(ctx, GGML_TYPE_I32, d_v_all*n_r, 1, "kvsmooth_c_v_prevs");
                v_rows = blend(v_rows, r.v_cells, r.v_prevs, d_v_all);
            } else {
                v_rows = blend(v_rows, r.cells, r.prevs, d_v*n_head_kv);
            }
        }

        lambdas.push_back(lambda);
        ranks.push_back(rank);
        applied.push_back(r.has_prev);
        rounds.push_back(std::move(r));
    }

    //
    // 3. the result, f32 [4, n]: z, lambda, rank, applied per column
    //

    const auto columns = [&](const std::vector<ggml_tensor *> & parts) {
        ggml_tensor * t = parts[0];
        for (size_t i = 1; i < parts.size(); ++i) {
            t = ggml_concat(ctx, t, parts[i], 1);
        }
        if (several) {
            t = ggml_reshape_2d(ctx, ggml_get_rows(ctx, ggml_reshape_2d(ctx, t, 1, n), perm), 1, n);
        }
        return t;
    };

    if (several) {
        perm = new_input(ctx, GGML_TYPE_I32, n, 1, "kvsmooth_c_perm");
    }

    ggml_tensor * res = ggml_concat(ctx, ggml_concat(ctx, z, columns(lambdas), 0), ggml_concat(ctx, columns(ranks), columns(applied), 0), 0);
    return res;
}

void kvsmooth_composed::fill(const int32_t * ids) const {
    const auto id = [ids](int64_t j, int f) { return ids[ID_N*j + f]; };

    std::vector<int32_t> v_tok(n), v_mask(n), v_head(n*n_head);
    for (int64_t j = 0; j < n; ++j) {
        const int64_t i = id(j, ID_I);
        const int64_t s = id(j, ID_S);
        GGML_ASSERT(i >= 0 && i < n_tps && s >= 0 && s < n_stream);
        v_tok[j]  = (int32_t) (s*n_tps + i);
        v_mask[j] = (int32_t) (s*mask_tps + i);
        for (int64_t h = 0; h < n_head; ++h) {
            // recomputed probabilities: [n_kv, n, n_head, n_stream]; the graph's: [n_kv, n_tps, n_head, n_stream]
            v_head[j*n_head + h] = (int32_t) (from_scores ? j + n*(h + n_head*s) : i + n_tps*(h + n_head*s));
        }
    }
    if (rows_tok) {
        ggml_backend_tensor_set(rows_tok, v_tok.data(), 0, ggml_nbytes(rows_tok));
    }
    if (rows_mask) {
        ggml_backend_tensor_set(rows_mask, v_mask.data(), 0, ggml_nbytes(rows_mask));
    }
    ggml_backend_tensor_set(rows_head, v_head.data(), 0, ggml_nbytes(rows_head));

    std::vector<float> v_iota(queue);
    for (int32_t i = 0; i < queue; ++i) {
        v_iota[i] = (float) i;
    }
    ggml_backend_tensor_set(iota, v_iota.data(), 0, ggml_nbytes(iota));
    if (queue_len->buffer) {
        const float m = (float) queue;
        ggml_backend_tensor_set(queue_len, &m, 0, sizeof(m));
    }

    std::vector<int32_t> v_perm(n);
    int32_t at = 0;
    for (const round & r : rounds) {
        const int64_t n_r = (int64_t) r.cols.size();
        std::vector<int32_t> slots(n_r), cells(n_r), prevs(n_r), w_src(n_r), v_cells, v_prevs;
        std::vector<float>   has_prev(n_r);
        for (int64_t t = 0; t < n_r; ++t) {
            const int64_t j    = r.cols[t];
            const int64_t row0 = id(j, ID_S)*kv_size;
            const int32_t prev = id(j, ID_PREV);
            slots[t]    = id(j, ID_SLOT);
            cells[t]    = (int32_t) (row0 + id(j, ID_CELL));
            prevs[t]    = (int32_t) (row0 + (prev >= 0 ? prev : id(j, ID_CELL)));
            has_prev[t] = prev >= 0 ? 1.0f : 0.0f;
            w_src[t]    = (int32_t) t;
            v_perm[j]   = at++;
        }
        // a cell that two columns of this round write (a token of several sequences: one blends, the
        // others only push) gets the same value from both, so that set_rows' order does not matter
        for (int64_t t = 0; t < n_r; ++t) {
            for (int64_t u = 0; u < n_r && has_prev[t] == 0.0f; ++u) {
                if (u != t && cells[u] == cells[t] && has_prev[u] != 0.0f) {
                    prevs[t] = prevs[u];
                    w_src[t] = (int32_t) u;
                    break;
                }
            }
        }
        ggml_backend_tensor_set(r.slots, slots.data(), 0, ggml_nbytes(r.slots));
        ggml_backend_tensor_set(r.cells, cells.data(), 0, ggml_nbytes(r.cells));
        ggml_backend_tensor_set(r.prevs, prevs.data(), 0, ggml_nbytes(r.prevs));
        ggml_backend_tensor_set(r.has_prev, has_prev.data(), 0, ggml_nbytes(r.has_prev));
        ggml_backend_tensor_set(r.w_src, w_src.data(), 0, ggml_nbytes(r.w_src));
        if (r.cols_t) {
            ggml_backend_tensor_set(r.cols_t, r.cols.data(), 0, ggml_nbytes(r.cols_t));
        }
        if (r.v_cells) {
            v_cells.resize(d_v_all*n_r);
            v_prevs.resize(d_v_all*n_r);
            for (int64_t t = 0; t < n_r; ++t) {
                const int64_t j    = r.cols[w_src[t]]; // the blend's previous cell (see above)
                const int64_t base = id(j, ID_S)*kv_size*d_v_all;
                const int32_t prev = id(j, ID_PREV);
                for (int64_t e = 0; e < d_v_all; ++e) {
                    v_cells[t*d_v_all + e] = (int32_t) (base + e*kv_size + id(j, ID_CELL));
                    v_prevs[t*d_v_all + e] = (int32_t) (base + e*kv_size + (prev >= 0 ? prev : id(j, ID_CELL)));
                }
            }
            ggml_backend_tensor_set(r.v_cells, v_cells.data(), 0, ggml_nbytes(r.v_cells));
            ggml_backend_tensor_set(r.v_prevs, v_prevs.data(), 0, ggml_nbytes(r.v_prevs));
        }
    }
    if (perm) {
        ggml_backend_tensor_set(perm, v_perm.data(), 0, ggml_nbytes(perm));
    }
}
