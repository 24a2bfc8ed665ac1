// CPU kernel of GGML_OP_KVSMOOTH: KVSmooth (arXiv 2602.04268) entropy-adaptive smoothing of
// the KV cache, in place.  The layouts of ids, state and the result are those of ggml_kvsmooth
// in ggml.h; the semantics are docs/design.md section 1 of pykvsmooth.
//
// Three phases, separated by barriers:
//   1. entropies H[j][h] of every smoothed token j and query head h, split across threads;
//   2. thread 0 walks the tokens in column order: mean entropy z, rank in the FIFO of the
//      token's slot, push, lambda; writes the result tensor;
//   3. blend of K/V rows, split across threads by KV head, each thread walking the columns in
//      order (a later token of the same sequence may blend with a row smoothed just before).

#include "kvsmooth.h"

#include "ggml-cpu.h"
#include "ggml-cpu-impl.h"
#include "ggml-impl.h"
#include "ops.h"
#include "simd-mappings.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

// floats of work buffer: the entropies, shared by all threads, rounded up to a cache line
int64_t kvsmooth_shared_floats(const ggml_tensor * dst) {
    const int64_t n_smooth = dst->src[3]->ne[1];
    return GGML_PAD(n_smooth*ggml_kvsmooth_n_head(dst), (int64_t) CACHE_LINE_SIZE_F32);
}

// floats of work buffer per thread: the scores of the query heads of one KV head and one f32
// K row (phase 1, scores path only), or two f32 head rows to blend (phase 3)
int64_t kvsmooth_thread_floats(const ggml_tensor * dst) {
    const ggml_kvsmooth_op_params p = ggml_kvsmooth_get_op_params(dst);
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];

    const int64_t d_k   = k->ne[0];
    const int64_t d_v   = p.v_trans ? v->ne[2] : v->ne[0];
    const int64_t n_kv  = k->ne[2];
    const int64_t n_rep = ggml_kvsmooth_n_head(dst)/k->ne[1];

    const int64_t phase1 = p.source == GGML_KVSMOOTH_SOURCE_SCORES ? n_rep*n_kv + d_k : 0;
    const int64_t phase3 = 2*std::max(d_k, d_v);

    return GGML_PAD(std::max(phase1, phase3), (int64_t) CACHE_LINE_SIZE_F32);
}

void kvsmooth_row_to_f32(ggml_type type, const void * src, float * dst, int64_t n) {
    switch (type) {
        case GGML_TYPE_F32:  memcpy(dst, src, n*sizeof(float));                       break;
        case GGML_TYPE_F16:  ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) src, dst, n); break;
        case GGML_TYPE_BF16: ggml_cpu_bf16_to_fp32((const ggml_bf16_t *) src, dst, n); break;
        default:             ggml_get_type_traits(type)->to_float(src, dst, n);         break;
    }
}

float kvsmooth_elem_to_f32(ggml_type type, const char * src) {
    switch (type) {
        case GGML_TYPE_F32:  return *(const float *) src;
        case GGML_TYPE_F16:  return GGML_CPU_FP16_TO_FP32(*(const ggml_fp16_t *) src);
        case GGML_TYPE_BF16: return GGML_BF16_TO_FP32(*(const ggml_bf16_t *) src);
        default:             GGML_ABORT("kvsmooth: unsupported element type %s", ggml_type_name(type));
    }
}

void kvsmooth_elem_from_f32(ggml_type type, float x, char * dst) {
    switch (type) {
        case GGML_TYPE_F32:  *(float *)       dst = x;                        break;
        case GGML_TYPE_F16:  *(ggml_fp16_t *) dst = GGML_CPU_FP32_TO_FP16(x); break;
        case GGML_TYPE_BF16: *(ggml_bf16_t *) dst = GGML_FP32_TO_BF16(x);     break;
        default:             GGML_ABORT("kvsmooth: unsupported element type %s", ggml_type_name(type));
    }
}

// dst ← (1 − λ)·dst + λ·src for one head row of n elements, blended in f32 and rounded once;
// quantized rows are rounded with the same from_float that ggml_set_rows uses to store them
void kvsmooth_blend_row(ggml_type type, char * dst, const char * src, int64_t n, float lambda, float * tmp) {
    if (type == GGML_TYPE_F32) {
        float       * d = (float *)       dst;
        const float * s = (const float *) src;
        for (int64_t i = 0; i < n; ++i) {
            d[i] = (1.0f - lambda)*d[i] + lambda*s[i];
        }
        return;
    }

    float * d = tmp;
    float * s = tmp + n;
    kvsmooth_row_to_f32(type, dst, d, n);
    kvsmooth_row_to_f32(type, src, s, n);
    for (int64_t i = 0; i < n; ++i) {
        d[i] = (1.0f - lambda)*d[i] + lambda*s[i];
    }
    ggml_get_type_traits_cpu(type)->from_float(d, dst, n);
}

// H = −Σ a·ln(a + eps) with a = e[c]·inv_sum; cells with a == 0 (masked) contribute exactly 0,
// also with eps == 0 where 0·ln(0) would be NaN
float kvsmooth_entropy(const float * e, int64_t n, float inv_sum, float eps) {
    ggml_float acc = 0.0;
    for (int64_t c = 0; c < n; ++c) {
        const float a = e[c]*inv_sum;
        if (a != 0.0f) {
            acc += (ggml_float) a*logf(a + eps);
        }
    }
    return (float) -acc;
}

// ALiBi slope of query head h, as ggml_soft_max_ext and ggml_flash_attn_ext compute it
float kvsmooth_alibi_slope(float max_bias, uint32_t n_head, uint32_t h) {
    if (max_bias <= 0.0f) {
        return 1.0f;
    }
    const uint32_t n_head_log2 = 1u << (uint32_t) floor(log2(n_head));
    const float m0 = powf(2.0f, -(max_bias       ) / n_head_log2);
    const float m1 = powf(2.0f, -(max_bias / 2.0f) / n_head_log2);
    return h < n_head_log2 ? powf(m0, h + 1) : powf(m1, 2*(h - n_head_log2) + 1);
}

struct kvsmooth_id {
    int32_t i;     // token index inside its stream
    int32_t s;     // stream
    int32_t cell;  // the token's cell
    int32_t prev;  // previous position's cell, -1 if none
    int32_t slot;  // state column
};

kvsmooth_id kvsmooth_get_id(const ggml_tensor * ids, int64_t j) {
    const int32_t * col = (const int32_t *) ((const char *) ids->data + j*ids->nb[1]);
    return { col[0], col[1], col[2], col[3], col[4] };
}

// phase 1, probabilities path: work item = (token j, query head h)
void kvsmooth_entropies_kq(const ggml_compute_params * params, const ggml_tensor * dst, float * H) {
    const ggml_kvsmooth_op_params p = ggml_kvsmooth_get_op_params(dst);
    const ggml_tensor * kq  = dst->src[0];
    const ggml_tensor * ids = dst->src[3];

    const int64_t n_kv     = kq->ne[0];
    const int64_t n_tps    = kq->ne[1];
    const int64_t n_head   = kq->ne[2];
    const int64_t n_stream = kq->ne[3];
    const int64_t n_items  = ids->ne[1]*n_head;

    const int64_t dr  = (n_items + params->nth - 1)/params->nth;
    const int64_t ir0 = dr*params->ith;
    const int64_t ir1 = std::min(ir0 + dr, n_items);

    for (int64_t ir = ir0; ir < ir1; ++ir) {
        const int64_t j = ir/n_head;
        const int64_t h = ir%n_head;
        const kvsmooth_id id = kvsmooth_get_id(ids, j);
        GGML_ASSERT(id.i >= 0 && id.i < n_tps && id.s >= 0 && id.s < n_stream);

        const float * a = (const float *) ((const char *) kq->data + id.i*kq->nb[1] + h*kq->nb[2] + id.s*kq->nb[3]);
        H[ir] = kvsmooth_entropy(a, n_kv, 1.0f, p.eps);
    }
}

// phase 1, entropies path: the row entropies of the flash-attention kernel, gathered
void kvsmooth_entropies_rows(const ggml_compute_params * params, const ggml_tensor * dst, float * H) {
    const ggml_tensor * h   = dst->src[0];
    const ggml_tensor * ids = dst->src[3];

    const int64_t n_head   = h->ne[0];
    const int64_t n_tps    = h->ne[1];
    const int64_t n_stream = h->ne[2];

    for (int64_t j = params->ith; j < ids->ne[1]; j += params->nth) {
        const kvsmooth_id id = kvsmooth_get_id(ids, j);
        GGML_ASSERT(id.i >= 0 && id.i < n_tps && id.s >= 0 && id.s < n_stream);

        const float * row = (const float *) ((const char *) h->data + id.i*h->nb[1] + id.s*h->nb[2]);
        memcpy(H + j*n_head, row, n_head*sizeof(float));
    }
}

// phase 1, scores path: work item = (token j, KV head g), so that every K row is read and
// converted once for the n_rep query heads that share it
void kvsmooth_entropies_q(const ggml_compute_params * params, const ggml_tensor * dst, float * H, float * scratch) {
    const ggml_kvsmooth_op_params p = ggml_kvsmooth_get_op_params(dst);
    const ggml_tensor * q     = dst->src[0];
    const ggml_tensor * k     = dst->src[1];
    const ggml_tensor * ids   = dst->src[3];
    const ggml_tensor * mask  = dst->src[6];
    const ggml_tensor * sinks = dst->src[7];

    const int64_t d_k       = k->ne[0];
    const int64_t n_head_kv = k->ne[1];
    const int64_t n_kv      = k->ne[2];
    const int64_t n_stream  = k->ne[3];
    const int64_t n_head    = q->ne[1];
    const int64_t n_tps     = q->ne[2]/n_stream;
    const int64_t n_rep     = n_head/n_head_kv;
    const int64_t n_items   = ids->ne[1]*n_head_kv;

    // as ggml_flash_attn_ext: the soft-cap divides the scale, then s = softcap·tanh(s)
    float scale = p.scale;
    if (p.logit_softcap != 0.0f) {
        scale /= p.logit_softcap;
    }

    float * S  = scratch;           // [n_rep][n_kv] scores, then exp(s − max)
    float * kf = S + n_rep*n_kv;    // [d_k] one K row in f32

    const int64_t dr  = (n_items + params->nth - 1)/params->nth;
    const int64_t ir0 = dr*params->ith;
    const int64_t ir1 = std::min(ir0 + dr, n_items);

    for (int64_t ir = ir0; ir < ir1; ++ir) {
        const int64_t j = ir/n_head_kv;
        const int64_t g = ir%n_head_kv;
        const kvsmooth_id id = kvsmooth_get_id(ids, j);
        GGML_ASSERT(id.i >= 0 && id.i < n_tps && id.s >= 0 && id.s < n_stream);

        // start each score at its mask bias, so masked cells (−inf) skip the dot product
        for (int64_t r = 0; r < n_rep; ++r) {
            const int64_t h = g*n_rep + r;
            float * Sr = S + r*n_kv;
            if (!mask) {
                std::fill(Sr, Sr + n_kv, 0.0f);
                continue;
            }
            const float slope = kvsmooth_alibi_slope(p.max_bias, (uint32_t) n_head, (uint32_t) h);
            const char * mrow = (const char *) mask->data + id.i*mask->nb[1] + (h%mask->ne[2])*mask->nb[2] + (id.s%mask->ne[3])*mask->nb[3];
            if (mask->type == GGML_TYPE_F16) {
                const ggml_fp16_t * m = (const ggml_fp16_t *) mrow;
                for (int64_t c = 0; c < n_kv; ++c) {
                    Sr[c] = slope*GGML_CPU_FP16_TO_FP32(m[c]);
                }
            } else {
                const float * m = (const float *) mrow;
                for (int64_t c = 0; c < n_kv; ++c) {
                    Sr[c] = slope*m[c];
                }
            }
        }

        const char * kbase = (const char *) k->data + g*k->nb[1] + id.s*k->nb[3];
        for (int64_t c = 0; c < n_kv; ++c) {
            bool any = false;
            for (int64_t r = 0; r < n_rep && !any; ++r) {
                any = S[r*n_kv + c] != -INFINITY;
            }
            if (!any) {
                continue;
            }

            const char  * krow = kbase + c*k->nb[2];
            const float * kc   = (const float *) krow;
            if (k->type != GGML_TYPE_F32) {
                kvsmooth_row_to_f32(k->type, krow, kf, d_k);
                kc = kf;
            }

            for (int64_t r = 0; r < n_rep; ++r) {
                float & sc = S[r*n_kv + c];
                if (sc == -INFINITY) {
                    continue;
                }
                const int64_t h = g*n_rep + r;
                const float * qh = (const float *) ((const char *) q->data + (id.s*n_tps + id.i)*q->nb[2] + h*q->nb[1]);

                float s;
                ggml_vec_dot_f32((int) d_k, &s, 0, kc, 0, qh, 0, 1);
                s *= scale;
                if (p.logit_softcap != 0.0f) {
                    s = p.logit_softcap*tanhf(s);
                }
                sc += s;
            }
        }

        for (int64_t r = 0; r < n_rep; ++r) {
            const int64_t h  = g*n_rep + r;
            float *       Sr = S + r*n_kv;

            float max = -INFINITY;
            ggml_vec_max_f32((int) n_kv, &max, Sr);
            const float sink = sinks ? ((const float *) sinks->data)[h] : -INFINITY;
            max = std::max(max, sink);

            if (max == -INFINITY) {
                // every cell masked: no attention, nothing to be uncertain about
                H[j*n_head + h] = 0.0f;
                continue;
            }

            // the sink is one more logit in the denominator, not a cell of the entropy
            ggml_float sum = ggml_vec_soft_max_f32((int) n_kv, Sr, Sr, max);
            if (sinks) {
                sum += (ggml_float) expf(sink - max);
            }
            H[j*n_head + h] = kvsmooth_entropy(Sr, n_kv, (float) (1.0/sum), p.eps);
        }
    }
}

// phase 2, one thread: queues and lambdas in column order
void kvsmooth_update_queues(const ggml_tensor * dst, const float * H) {
    const ggml_kvsmooth_op_params p = ggml_kvsmooth_get_op_params(dst);
    const ggml_tensor * ids   = dst->src[3];
    const ggml_tensor * state = dst->src[4];

    const int64_t n_smooth  = ids->ne[1];
    const int64_t n_head    = ggml_kvsmooth_n_head(dst);
    const int64_t queue_cap = state->ne[0] - 1;
    const int64_t n_slot    = state->ne[1];
    const int64_t M         = p.queue;

    for (int64_t j = 0; j < n_smooth; ++j) {
        const kvsmooth_id id = kvsmooth_get_id(ids, j);
        GGML_ASSERT(id.slot >= 0 && id.slot < n_slot);

        ggml_float zsum = 0.0;
        for (int64_t h = 0; h < n_head; ++h) {
            zsum += H[j*n_head + h];
        }
        const float z = (float) (zsum/n_head);

        float * col = (float *) ((char *) state->data + id.slot*state->nb[1]);

        // count is an exact small integer; a column written with a larger queue keeps its newest M
        const float count_f = col[0];
        int64_t count = count_f >= 1.0f ? (int64_t) std::min(count_f, (float) queue_cap) : 0;
        if (count > M) {
            memmove(col + 1, col + 1 + (count - M), M*sizeof(float));
            count = M;
        }

        // SPEC §1.3: z is pushed first (a full queue drops its oldest value), then ranked
        // among the other values, so rank <= M - 1 (paper eq. 13)
        int64_t rank = 0;
        for (int64_t i = count == M ? 1 : 0; i < count; ++i) {
            rank += col[1 + i] < z;
        }

        if (count == M) {
            memmove(col + 1, col + 2, (M - 1)*sizeof(float));
            col[M] = z;
        } else {
            col[1 + count] = z;
            count++;
        }
        col[0] = (float) count;

        // eq. 13/14: rank over the capacity M (also while filling), clipped to λref ± w
        float lambda = p.lambda_ref;
        if (p.mode != GGML_KVSMOOTH_MODE_FIXED) {
            lambda = std::min(std::max((float) rank/(float) M, p.lambda_ref - p.window), p.lambda_ref + p.window);
        }

        float * res = (float *) ((char *) dst->data + j*dst->nb[1]);
        res[0] = z;
        res[1] = lambda;
        res[2] = (float) rank;
        res[3] = id.prev >= 0 ? 1.0f : 0.0f;
    }
}

// phase 3: blend of the KV heads [g0, g1), columns in order
void kvsmooth_blend(const ggml_compute_params * params, const ggml_tensor * dst, float * tmp) {
    const ggml_kvsmooth_op_params p = ggml_kvsmooth_get_op_params(dst);
    const ggml_tensor * k   = dst->src[1];
    const ggml_tensor * v   = dst->src[2];
    const ggml_tensor * ids = dst->src[3];

    const int64_t d_k       = k->ne[0];
    const int64_t n_head_kv = k->ne[1];
    const int64_t n_kv      = k->ne[2];
    const int64_t n_smooth  = ids->ne[1];
    const int64_t d_v       = p.v_trans ? v->ne[2] : v->ne[0];
    const bool    blend_v   = p.mode != GGML_KVSMOOTH_MODE_KEYS;

    const int64_t dg = (n_head_kv + params->nth - 1)/params->nth;
    const int64_t g0 = dg*params->ith;
    const int64_t g1 = std::min(g0 + dg, n_head_kv);
    if (g0 >= g1) {
        return;
    }

    const size_t v_ts = ggml_type_size(v->type);

    for (int64_t j = 0; j < n_smooth; ++j) {
        const kvsmooth_id id = kvsmooth_get_id(ids, j);
        if (id.prev < 0) {
            continue;
        }
        GGML_ASSERT(id.cell >= 0 && id.cell < n_kv && id.prev < n_kv);

        const float lambda = ((const float *) ((const char *) dst->data + j*dst->nb[1]))[1];

        for (int64_t g = g0; g < g1; ++g) {
            char * kb = (char *) k->data + g*k->nb[1] + id.s*k->nb[3];
            kvsmooth_blend_row(k->type, kb + id.cell*k->nb[2], kb + id.prev*k->nb[2], d_k, lambda, tmp);

            if (!blend_v) {
                continue;
            }

            char * vb = (char *) v->data + g*v->nb[1] + id.s*v->nb[3];
            if (!p.v_trans) {
                kvsmooth_blend_row(v->type, vb + id.cell*v->nb[2], vb + id.prev*v->nb[2], d_v, lambda, tmp);
                continue;
            }

            // transposed V: one element per (dim, cell), cells adjacent
            for (int64_t d = 0; d < d_v; ++d) {
                char * pc = vb + d*v->nb[2] + id.cell*v_ts;
                char * pp = vb + d*v->nb[2] + id.prev*v_ts;
                const float x = (1.0f - lambda)*kvsmooth_elem_to_f32(v->type, pc) + lambda*kvsmooth_elem_to_f32(v->type, pp);
                kvsmooth_elem_from_f32(v->type, x, pc);
            }
        }
    }
}

} // namespace

size_t ggml_kvsmooth_work_size(const struct ggml_tensor * dst, int n_tasks) {
    return sizeof(float)*(kvsmooth_shared_floats(dst) + n_tasks*kvsmooth_thread_floats(dst));
}

void ggml_compute_forward_kvsmooth(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const ggml_kvsmooth_op_params p = ggml_kvsmooth_get_op_params(dst);
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];

    GGML_ASSERT(dst->type == GGML_TYPE_F32 && ggml_is_contiguous(dst));
    GGML_ASSERT(!p.v_trans || !ggml_is_quantized(v->type));
    GGML_ASSERT(k->type == GGML_TYPE_F32 || ggml_get_type_traits(k->type)->to_float);
    GGML_ASSERT(v->type == GGML_TYPE_F32 || ggml_get_type_traits(v->type)->to_float);

    if (dst->src[3]->ne[1] == 0) {
        return;
    }

    GGML_ASSERT(params->wsize >= ggml_kvsmooth_work_size(dst, params->nth));

    float * H       = (float *) params->wdata;
    float * scratch = H + kvsmooth_shared_floats(dst) + params->ith*kvsmooth_thread_floats(dst);

    switch (p.source) {
        case GGML_KVSMOOTH_SOURCE_PROBS:     kvsmooth_entropies_kq(params, dst, H);          break;
        case GGML_KVSMOOTH_SOURCE_SCORES:    kvsmooth_entropies_q(params, dst, H, scratch);  break;
        case GGML_KVSMOOTH_SOURCE_ENTROPIES: kvsmooth_entropies_rows(params, dst, H);        break;
        default:                             GGML_ABORT("kvsmooth: unknown entropy source %d", (int) p.source);
    }

    ggml_barrier(params->threadpool);

    if (params->ith == 0) {
        kvsmooth_update_queues(dst, H);
    }

    ggml_barrier(params->threadpool);

    kvsmooth_blend(params, dst, scratch);
}
