// CUDA kernels of GGML_OP_KVSMOOTH: KVSmooth (arXiv 2602.04268) entropy-adaptive smoothing of
// the KV cache, in place.  Layouts and semantics: ggml_kvsmooth in ggml.h; the CPU kernel
// (ggml-cpu/kvsmooth.cpp) is the reference this file follows step by step.
//
// Launches, all on ctx.stream(), no host synchronisation, scratch from the pool only:
//   1. kvsmooth_scores   (scores path only): s = scale·q·k (soft-cap, ALiBi mask) of every
//      smoothed token, query head and cell into a scratch [n_smooth, n_head, n_kv]; grid
//      (cell chunks, query heads, tokens) so that a long cache is read by the whole GPU;
//   2. kvsmooth_entropy: one block per (smoothed token, query head), H = −Σ α·ln(α + eps)
//      over the probabilities (kq path) or the softmax of the scratch row (scores path);
//   3. kvsmooth_update: one block walks the columns in order: mean entropy z, rank in the
//      slot's FIFO, push, lambda, result row, blend of the token's K/V rows.
//
// Why not one launch: stage 3 must see every entropy of its column and must run the columns
// in order, so it needs a grid-wide "last block" hand-off.  That needs a counter that is zero
// when the kernel starts, and pool memory is not zeroed (a memset node would be a launch as
// well), while a counter in static device memory would be shared by concurrent streams and
// contexts on the same device.  Stage 3 is small (one block, a few microseconds), so two
// launches (three with flash attention) are the clear and safe choice.

#include "kvsmooth.cuh"
#include "convert.cuh"   // ggml_cuda_cast
#include "cpy-utils.cuh" // quantize_f32_q8_0_block, as set_rows stores q8_0 rows

#define KVSMOOTH_SCORES_WARPS   4   // warps per scores block
#define KVSMOOTH_SCORES_ROWS    4   // cells per warp step: K rows loaded together
#define KVSMOOTH_SCORES_CELLS  64   // cells per scores block
#define KVSMOOTH_ENTROPY_THREADS 256
#define KVSMOOTH_UPDATE_THREADS  512
#define KVSMOOTH_BLEND_BATCH      4 // elements (pairs) loaded together per thread

static_assert(KVSMOOTH_SCORES_CELLS % (KVSMOOTH_SCORES_WARPS*KVSMOOTH_SCORES_ROWS) == 0, "cells must fill the warp steps");
// one FIFO value per thread in the queue update
static_assert(KVSMOOTH_UPDATE_THREADS >= GGML_CUDA_KVSMOOTH_MAX_QUEUE, "the update block must hold a full queue");

struct kvsmooth_args {
    // src[0]: kq [n_kv, n_tps, n_head, n_stream] (probabilities) or q [d_k, n_head, n_tps*n_stream]
    const char * src0;
    int64_t nb01, nb02, nb03;

    char * k;       // [d_k, n_head_kv, n_kv, n_stream]
    int64_t nbk1, nbk2, nbk3;

    char * v;       // [d_v, n_head_kv, n_kv, n_stream] or transposed [n_kv, n_head_kv, d_v, n_stream]
    int64_t nbv0, nbv1, nbv2, nbv3;

    const char * mask; // f16/f32 [n_kv, n_tps, ne_m2, ne_m3], may be null
    int64_t nbm1, nbm2, nbm3;
    int32_t ne_m2, ne_m3;
    bool    mask_f16;

    const float   * sinks; // [n_head], scores path only, may be null
    const int32_t * ids;   // [5, n_smooth]
    float         * state; // [1 + queue_cap, n_slot]
    int64_t         state_ld;
    float         * dst;   // [4, n_smooth]

    ggml_type type_k;
    ggml_type type_v;
    bool      v_trans;
    int32_t   mode;
    int32_t   queue;   // M
    int32_t   queue_cap;

    int32_t n_smooth, n_head, n_head_kv, n_rep, n_kv, n_tps, d_k, d_v;

    float lambda_ref, window, eps;
    float scale, logit_softcap, max_bias, m0, m1;
    uint32_t n_head_log2;
};

//
// element access: f32, f16, bf16 through ggml_cuda_cast (ggml-cuda's conversions), q8_0 blocks
//

// the CUDA type of a cache element type
template <ggml_type type> struct kvsmooth_elem;
template <> struct kvsmooth_elem<GGML_TYPE_F32>  { using t = float;         using t2 = float2; };
template <> struct kvsmooth_elem<GGML_TYPE_F16>  { using t = half;          using t2 = half2; };
template <> struct kvsmooth_elem<GGML_TYPE_BF16> { using t = nv_bfloat16;   using t2 = nv_bfloat162; };

template <ggml_type type>
static __device__ __forceinline__ float kvsmooth_get(const char * p) {
    return ggml_cuda_cast<float>(*(const typename kvsmooth_elem<type>::t *) p);
}

template <ggml_type type>
static __device__ __forceinline__ void kvsmooth_set(char * p, const float x) {
    using T = typename kvsmooth_elem<type>::t;
    *(T *) p = ggml_cuda_cast<T>(x);
}

// elements 2i and 2i+1 of a row (the row length is even, see supports_op)
template <ggml_type type>
static __device__ __forceinline__ float2 kvsmooth_get2(const char * row, const int64_t i) {
    if constexpr (type == GGML_TYPE_F32) {
        return ((const float2 *) row)[i];
    } else if constexpr (type == GGML_TYPE_F16) {
        return __half22float2(((const half2 *) row)[i]);
    } else if constexpr (type == GGML_TYPE_BF16) {
        return ggml_cuda_cast<float2>(((const nv_bfloat162 *) row)[i]);
    } else {
        static_assert(type == GGML_TYPE_Q8_0, "unsupported K type");
        const block_q8_0 * b  = (const block_q8_0 *) row + (2*i)/QK8_0;
        const int          iq = (2*i)%QK8_0;
        const float        d  = __half2float(b->d);
        return make_float2(b->qs[iq + 0]*d, b->qs[iq + 1]*d);
    }
}

template <ggml_type type>
static __device__ __forceinline__ void kvsmooth_set2(char * row, const int64_t i, const float2 x) {
    if constexpr (type == GGML_TYPE_F32) {
        ((float2 *) row)[i] = x;
    } else {
        using T2 = typename kvsmooth_elem<type>::t2;
        ((T2 *) row)[i] = ggml_cuda_cast<T2>(x);
    }
}

// (1 − λ)·a + λ·b as the CPU backend computes it: two products and a sum, no FMA contraction
// (this file is built with -use_fast_math), so that f16/bf16/q8_0 rounding matches it
static __device__ __forceinline__ float kvsmooth_mix(const float a, const float b, const float lambda) {
    return __fadd_rn(__fmul_rn(1.0f - lambda, a), __fmul_rn(lambda, b));
}

//
// stage 1: scores (flash attention on)
//

template <ggml_type type_k>
static __global__ void __launch_bounds__(KVSMOOTH_SCORES_WARPS*WARP_SIZE)
kvsmooth_scores(const kvsmooth_args a, float * __restrict__ scores) {
    const int h = blockIdx.y;
    const int j = blockIdx.z;

    const int32_t * id = a.ids + 5*j;
    const int i = id[0];
    const int s = id[1];

    // the query row, shared by the block; d_k floats of dynamic shared memory
    extern __shared__ float kvsmooth_q[];
    const float * qrow = (const float *) (a.src0 + ((int64_t) s*a.n_tps + i)*a.nb02 + h*a.nb01);
    for (int d = threadIdx.x; d < a.d_k; d += blockDim.x) {
        kvsmooth_q[d] = qrow[d];
    }
    __syncthreads();

    const float2 * q2 = (const float2 *) kvsmooth_q;
    const int      n2 = a.d_k/2;

    const char * kbase = a.k + (h/a.n_rep)*a.nbk1 + s*a.nbk3;
    const char * mrow  = a.mask ? a.mask + i*a.nbm1 + (h%a.ne_m2)*a.nbm2 + (s%a.ne_m3)*a.nbm3 : nullptr;
    const float  slope = get_alibi_slope(a.max_bias, h, a.n_head_log2, a.m0, a.m1);
    float      * out   = scores + ((int64_t) j*a.n_head + h)*a.n_kv;

    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;

    const int c_end = min((int) (blockIdx.x + 1)*KVSMOOTH_SCORES_CELLS, a.n_kv);

    for (int c0 = blockIdx.x*KVSMOOTH_SCORES_CELLS + warp*KVSMOOTH_SCORES_ROWS; c0 < c_end;
             c0 += KVSMOOTH_SCORES_WARPS*KVSMOOTH_SCORES_ROWS) {
        // several rows at once keep enough loads in flight to stream the cache
        const char * krow[KVSMOOTH_SCORES_ROWS];
#pragma unroll
        for (int r = 0; r < KVSMOOTH_SCORES_ROWS; ++r) {
            krow[r] = kbase + (int64_t) min(c0 + r, c_end - 1)*a.nbk2;
        }

        float acc[KVSMOOTH_SCORES_ROWS] = { 0.0f };
        for (int p = lane; p < n2; p += WARP_SIZE) {
            const float2 qv = q2[p];
#pragma unroll
            for (int r = 0; r < KVSMOOTH_SCORES_ROWS; ++r) {
                const float2 kv = kvsmooth_get2<type_k>(krow[r], p);
                acc[r] += qv.x*kv.x + qv.y*kv.y;
            }
        }

#pragma unroll
        for (int r = 0; r < KVSMOOTH_SCORES_ROWS; ++r) {
            acc[r] = warp_reduce_sum(acc[r]);
        }

#pragma unroll
        for (int r = 0; r < KVSMOOTH_SCORES_ROWS; ++r) {
            const int c = c0 + r;
            if (lane != r || c >= c_end) {
                continue;
            }
            // as ggml_flash_attn_ext: scale (already divided by the soft-cap), soft-cap, mask
            float sc = acc[r]*a.scale;
            if (a.logit_softcap != 0.0f) {
                sc = a.logit_softcap*tanhf(sc);
            }
            if (mrow) {
                const float m = a.mask_f16 ? __half2float(((const half *) mrow)[c]) : ((const float *) mrow)[c];
                sc += slope*m;
            }
            out[c] = sc;
        }
    }
}

//
// stage 2: entropy of one (smoothed token, query head)
//

template <bool from_scores>
static __global__ void __launch_bounds__(KVSMOOTH_ENTROPY_THREADS)
kvsmooth_entropy(const kvsmooth_args a, const float * __restrict__ scores, float * __restrict__ H) {
    const int h = blockIdx.x;
    const int j = blockIdx.y;

    __shared__ float red[WARP_SIZE];

    const float * row;
    float smax    = 0.0f; // probabilities: α = row[c]
    float inv_sum = 1.0f;

    if constexpr (from_scores) {
        row = scores + ((int64_t) j*a.n_head + h)*a.n_kv;

        // online max and Σ e^(s − max) per thread; masked cells (−inf) contribute nothing
        float m = -INFINITY;
        float l = 0.0f;
        for (int c = threadIdx.x; c < a.n_kv; c += blockDim.x) {
            const float sc = row[c];
            if (sc > m) {
                l = l*expf(m - sc) + 1.0f;
                m = sc;
            } else if (sc > -INFINITY) {
                l += expf(sc - m);
            }
        }

        smax = block_reduce<block_reduce_method::MAX>(m, red);
        __syncthreads();
        l = m == -INFINITY ? 0.0f : l*expf(m - smax);
        float sum = block_reduce<block_reduce_method::SUM>(l, red);
        __syncthreads();

        // the sink is one more logit in the denominator, not a cell of the entropy
        if (a.sinks) {
            const float sink = a.sinks[h];
            const float mx   = fmaxf(smax, sink);
            sum  = (smax == -INFINITY ? 0.0f : sum*expf(smax - mx)) + expf(sink - mx);
            smax = mx;
        }

        if (smax == -INFINITY) {
            // every cell masked: no attention, nothing to be uncertain about
            if (threadIdx.x == 0) {
                H[j*a.n_head + h] = 0.0f;
            }
            return;
        }
        inv_sum = 1.0f/sum;
    } else {
        const int32_t * id = a.ids + 5*j;
        row = (const float *) (a.src0 + id[0]*a.nb01 + h*a.nb02 + id[1]*a.nb03);
    }

    // cells with α == 0 contribute exactly 0, also with eps == 0 where 0·ln(0) would be NaN
    float acc = 0.0f;
    for (int c = threadIdx.x; c < a.n_kv; c += blockDim.x) {
        const float p = from_scores ? expf(row[c] - smax)*inv_sum : row[c];
        if (p != 0.0f) {
            acc += p*logf(p + a.eps);
        }
    }
    acc = block_reduce<block_reduce_method::SUM>(acc, red);

    if (threadIdx.x == 0) {
        H[j*a.n_head + h] = -acc;
    }
}

//
// stage 3: queues, lambdas and blends, columns in order
//

// dst rows ← mix(dst rows, src rows) for n_head_kv head rows of n elements (n even), head
// rows nb_head bytes apart
template <ggml_type type>
static __device__ void kvsmooth_blend_rows(char * dst, const char * src, const int64_t nb_head,
        const int n_head_kv, const int n, const float lambda) {
    const int n2    = n/2;
    const int total = n_head_kv*n2;

    for (int p0 = threadIdx.x; p0 < total; p0 += KVSMOOTH_BLEND_BATCH*blockDim.x) {
        float2 x[KVSMOOTH_BLEND_BATCH];
        float2 y[KVSMOOTH_BLEND_BATCH];
#pragma unroll
        for (int b = 0; b < KVSMOOTH_BLEND_BATCH; ++b) {
            const int p = p0 + b*blockDim.x;
            if (p < total) {
                const int g = p/n2;
                const int i = p - g*n2;
                x[b] = kvsmooth_get2<type>(dst + g*nb_head, i);
                y[b] = kvsmooth_get2<type>(src + g*nb_head, i);
            }
        }
#pragma unroll
        for (int b = 0; b < KVSMOOTH_BLEND_BATCH; ++b) {
            const int p = p0 + b*blockDim.x;
            if (p < total) {
                const int g = p/n2;
                const int i = p - g*n2;
                kvsmooth_set2<type>(dst + g*nb_head, i,
                    make_float2(kvsmooth_mix(x[b].x, y[b].x, lambda), kvsmooth_mix(x[b].y, y[b].y, lambda)));
            }
        }
    }
}

// the same for q8_0 rows: one thread per block of 32, dequantized, blended, and requantized by
// quantize_f32_q8_0_block, the function ggml-cuda's set_rows stores q8_0 cache rows with
static __device__ void kvsmooth_blend_rows_q8_0(char * dst, const char * src, const int64_t nb_head,
        const int n_head_kv, const int n, const float lambda) {
    const int nb    = n/QK8_0;
    const int total = n_head_kv*nb;

    for (int ib = threadIdx.x; ib < total; ib += blockDim.x) {
        const int g = ib/nb;
        block_q8_0       * bd = (block_q8_0 *)       (dst + g*nb_head) + (ib - g*nb);
        const block_q8_0 * bs = (const block_q8_0 *) (src + g*nb_head) + (ib - g*nb);

        const float dd = __half2float(bd->d);
        const float ds = __half2float(bs->d);

        float x[QK8_0];
#pragma unroll
        for (int e = 0; e < QK8_0; ++e) {
            x[e] = kvsmooth_mix(bd->qs[e]*dd, bs->qs[e]*ds, lambda);
        }
        quantize_f32_q8_0_block(x, bd);
    }
}

static __device__ void kvsmooth_blend_head_rows(const ggml_type type, char * dst, const char * src, const int64_t nb_head,
        const int n_head_kv, const int n, const float lambda) {
    switch (type) {
        case GGML_TYPE_F32:  kvsmooth_blend_rows<GGML_TYPE_F32> (dst, src, nb_head, n_head_kv, n, lambda); break;
        case GGML_TYPE_F16:  kvsmooth_blend_rows<GGML_TYPE_F16> (dst, src, nb_head, n_head_kv, n, lambda); break;
        case GGML_TYPE_BF16: kvsmooth_blend_rows<GGML_TYPE_BF16>(dst, src, nb_head, n_head_kv, n, lambda); break;
        case GGML_TYPE_Q8_0: kvsmooth_blend_rows_q8_0           (dst, src, nb_head, n_head_kv, n, lambda); break;
        default: break; // refused by supports_op
    }
}

// transposed V: element (cell, head g, dim d) at cell*nbv0 + g*nbv1 + d*nbv2
template <ggml_type type>
static __device__ void kvsmooth_blend_trans(const kvsmooth_args & a, char * vb, const int cell, const int prev, const float lambda) {
    const int total = a.n_head_kv*a.d_v;

    for (int e0 = threadIdx.x; e0 < total; e0 += KVSMOOTH_BLEND_BATCH*blockDim.x) {
        float x[KVSMOOTH_BLEND_BATCH];
        float y[KVSMOOTH_BLEND_BATCH];
#pragma unroll
        for (int b = 0; b < KVSMOOTH_BLEND_BATCH; ++b) {
            const int e = e0 + b*blockDim.x;
            if (e < total) {
                const int g = e/a.d_v;
                const char * p = vb + g*a.nbv1 + (e - g*a.d_v)*a.nbv2;
                x[b] = kvsmooth_get<type>(p + cell*a.nbv0);
                y[b] = kvsmooth_get<type>(p + prev*a.nbv0);
            }
        }
#pragma unroll
        for (int b = 0; b < KVSMOOTH_BLEND_BATCH; ++b) {
            const int e = e0 + b*blockDim.x;
            if (e < total) {
                const int g = e/a.d_v;
                char * p = vb + g*a.nbv1 + (e - g*a.d_v)*a.nbv2;
                kvsmooth_set<type>(p + cell*a.nbv0, kvsmooth_mix(x[b], y[b], lambda));
            }
        }
    }
}

static __global__ void __launch_bounds__(KVSMOOTH_UPDATE_THREADS)
kvsmooth_update(const kvsmooth_args a, const float * __restrict__ H) {
    __shared__ float red_f[WARP_SIZE];
    __shared__ int   red_i[WARP_SIZE];

    const int tid = threadIdx.x;
    const int M   = a.queue;

    for (int j = 0; j < a.n_smooth; ++j) {
        const int32_t * id   = a.ids + 5*j;
        const int       s    = id[1];
        const int       cell = id[2];
        const int       prev = id[3];
        float         * col  = a.state + (int64_t) id[4]*a.state_ld;

        // z: mean entropy over the query heads
        float hsum = 0.0f;
        for (int h = tid; h < a.n_head; h += blockDim.x) {
            hsum += H[(int64_t) j*a.n_head + h];
        }
        const float z = __fdiv_rn(block_reduce<block_reduce_method::SUM>(hsum, red_f), (float) a.n_head);

        // count is an exact small integer; a column written with a larger queue keeps its
        // newest M values: F[i] = col[1 + off + i], i < count
        const float count_f = col[0];
        const int   count_r = count_f >= 1.0f ? (int) fminf(count_f, (float) a.queue_cap) : 0;
        const int   off     = max(count_r - M, 0);
        const int   count   = count_r - off;
        const int   drop    = count == M ? 1 : 0; // a full queue drops its oldest value

        // the values that stay, read before any of them is moved; z is ranked among them
        // only (SPEC §1.3: push first, then rank, so rank <= M - 1)
        const float f_keep = tid < count - drop ? col[1 + off + drop + tid] : 0.0f;

        const int rank = block_reduce<block_reduce_method::SUM>((int) (tid < count - drop && f_keep < z), red_i);
        __syncthreads();

        if (tid < count - drop) {
            col[1 + tid] = f_keep;
        }
        if (tid == 0) {
            col[1 + count - drop] = z;
            col[0] = (float) (count - drop + 1);
        }

        // eq. 13/14: rank over the capacity M (also while filling), clipped to λref ± w
        float lambda = a.lambda_ref;
        if (a.mode != GGML_KVSMOOTH_MODE_FIXED) {
            lambda = fminf(fmaxf(__fdiv_rn((float) rank, (float) M), a.lambda_ref - a.window), a.lambda_ref + a.window);
        }

        if (tid == 0) {
            float * res = a.dst + 4*j;
            res[0] = z;
            res[1] = lambda;
            res[2] = (float) rank;
            res[3] = prev >= 0 ? 1.0f : 0.0f;
        }

        if (prev >= 0) {
            char * kb = a.k + s*a.nbk3;
            kvsmooth_blend_head_rows(a.type_k, kb + cell*a.nbk2, kb + prev*a.nbk2, a.nbk1, a.n_head_kv, a.d_k, lambda);

            if (a.mode != GGML_KVSMOOTH_MODE_KEYS) {
                char * vb = a.v + s*a.nbv3;
                if (!a.v_trans) {
                    kvsmooth_blend_head_rows(a.type_v, vb + cell*a.nbv2, vb + prev*a.nbv2, a.nbv1, a.n_head_kv, a.d_v, lambda);
                } else {
                    switch (a.type_v) {
                        case GGML_TYPE_F32:  kvsmooth_blend_trans<GGML_TYPE_F32> (a, vb, cell, prev, lambda); break;
                        case GGML_TYPE_F16:  kvsmooth_blend_trans<GGML_TYPE_F16> (a, vb, cell, prev, lambda); break;
                        case GGML_TYPE_BF16: kvsmooth_blend_trans<GGML_TYPE_BF16>(a, vb, cell, prev, lambda); break;
                        default: break; // refused by supports_op
                    }
                }
            }
        }

        // the next column may read this slot's queue or blend with a row blended just now
        __syncthreads();
    }
}

//
// launch
//

template <ggml_type type_k>
static void kvsmooth_launch_scores(const kvsmooth_args & a, float * scores, cudaStream_t stream) {
    const dim3   blocks((a.n_kv + KVSMOOTH_SCORES_CELLS - 1)/KVSMOOTH_SCORES_CELLS, a.n_head, a.n_smooth);
    const dim3   threads(KVSMOOTH_SCORES_WARPS*WARP_SIZE, 1, 1);
    const size_t smem = a.d_k*sizeof(float);
    kvsmooth_scores<type_k><<<blocks, threads, smem, stream>>>(a, scores);
}

void ggml_cuda_op_kvsmooth(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * src0  = dst->src[0]; // kq or q
    const ggml_tensor * k     = dst->src[1];
    const ggml_tensor * v     = dst->src[2];
    const ggml_tensor * ids   = dst->src[3];
    const ggml_tensor * state = dst->src[4];
    const ggml_tensor * mask  = dst->src[6];
    const ggml_tensor * sinks = dst->src[7];

    const ggml_kvsmooth_op_params p = ggml_kvsmooth_get_op_params(dst);

    const int32_t mode        = p.mode;
    const int32_t queue       = p.queue;
    const bool    v_trans     = p.v_trans;
    const bool    from_scores = p.source == GGML_KVSMOOTH_SOURCE_SCORES;

    // the flash-attention entropy side output is a CPU kernel's (supports_op refuses it here)
    GGML_ASSERT(p.source == GGML_KVSMOOTH_SOURCE_PROBS || p.source == GGML_KVSMOOTH_SOURCE_SCORES);

    GGML_ASSERT(dst->type == GGML_TYPE_F32 && ggml_is_contiguous(dst));
    GGML_ASSERT(src0->type == GGML_TYPE_F32 && src0->nb[0] == sizeof(float));
    GGML_ASSERT(ids->type == GGML_TYPE_I32 && ggml_is_contiguous(ids));
    GGML_ASSERT(state->type == GGML_TYPE_F32 && ggml_is_contiguous(state));
    GGML_ASSERT(queue >= 1 && queue <= GGML_CUDA_KVSMOOTH_MAX_QUEUE && queue <= state->ne[0] - 1);
    GGML_ASSERT(!v_trans || !ggml_is_quantized(v->type));

    const int64_t n_smooth = ids->ne[1];
    if (n_smooth == 0) {
        return;
    }

    kvsmooth_args a = {};

    a.src0 = (const char *) src0->data;
    a.nb01 = src0->nb[1];
    a.nb02 = src0->nb[2];
    a.nb03 = src0->nb[3];

    a.k    = (char *) k->data;
    a.nbk1 = k->nb[1];
    a.nbk2 = k->nb[2];
    a.nbk3 = k->nb[3];

    a.v    = (char *) v->data;
    a.nbv0 = v->nb[0];
    a.nbv1 = v->nb[1];
    a.nbv2 = v->nb[2];
    a.nbv3 = v->nb[3];

    if (from_scores && mask) {
        GGML_ASSERT(mask->type == GGML_TYPE_F16 || mask->type == GGML_TYPE_F32);
        a.mask     = (const char *) mask->data;
        a.nbm1     = mask->nb[1];
        a.nbm2     = mask->nb[2];
        a.nbm3     = mask->nb[3];
        a.ne_m2    = (int32_t) mask->ne[2];
        a.ne_m3    = (int32_t) mask->ne[3];
        a.mask_f16 = mask->type == GGML_TYPE_F16;
    }
    // on the probabilities path the sinks are already in the soft_max output
    a.sinks = from_scores && sinks ? (const float *) sinks->data : nullptr;

    a.ids      = (const int32_t *) ids->data;
    a.state    = (float *) state->data;
    a.state_ld = state->nb[1]/sizeof(float);
    a.dst      = (float *) dst->data;

    a.type_k    = k->type;
    a.type_v    = v->type;
    a.v_trans   = v_trans;
    a.mode      = mode;
    a.queue     = queue;
    a.queue_cap = (int32_t) (state->ne[0] - 1);

    a.n_smooth  = (int32_t) n_smooth;
    a.n_head    = (int32_t) ggml_kvsmooth_n_head(dst);
    a.n_head_kv = (int32_t) k->ne[1];
    a.n_rep     = a.n_head/a.n_head_kv;
    a.n_kv      = (int32_t) k->ne[2];
    a.n_tps     = (int32_t) ggml_kvsmooth_n_tps(dst);
    a.d_k       = (int32_t) k->ne[0];
    a.d_v       = (int32_t) (v_trans ? v->ne[2] : v->ne[0]);

    a.lambda_ref    = p.lambda_ref;
    a.window        = p.window;
    a.eps           = p.eps;
    a.scale         = p.scale;
    a.max_bias      = p.max_bias;
    a.logit_softcap = p.logit_softcap;

    // as ggml_flash_attn_ext: the soft-cap divides the scale, then s = softcap·tanh(s)
    if (a.logit_softcap != 0.0f) {
        a.scale /= a.logit_softcap;
    }
    a.n_head_log2 = 1u << (uint32_t) floorf(log2f((float) a.n_head));
    a.m0          = powf(2.0f, -(a.max_bias       ) / a.n_head_log2);
    a.m1          = powf(2.0f, -(a.max_bias / 2.0f) / a.n_head_log2);

    GGML_ASSERT(a.n_head % a.n_head_kv == 0);
    GGML_ASSERT(a.d_k % 2 == 0 && (v_trans || a.d_v % 2 == 0));
    GGML_ASSERT(n_smooth <= 65535); // grid y/z

    cudaStream_t stream = ctx.stream();

    ggml_cuda_pool_alloc<float> H(ctx.pool(), n_smooth*a.n_head);
    ggml_cuda_pool_alloc<float> scores(ctx.pool());

    if (from_scores) {
        scores.alloc(n_smooth*a.n_head*a.n_kv);
        switch (k->type) {
            case GGML_TYPE_F32:  kvsmooth_launch_scores<GGML_TYPE_F32> (a, scores.get(), stream); break;
            case GGML_TYPE_F16:  kvsmooth_launch_scores<GGML_TYPE_F16> (a, scores.get(), stream); break;
            case GGML_TYPE_BF16: kvsmooth_launch_scores<GGML_TYPE_BF16>(a, scores.get(), stream); break;
            case GGML_TYPE_Q8_0: kvsmooth_launch_scores<GGML_TYPE_Q8_0>(a, scores.get(), stream); break;
            default: GGML_ABORT("kvsmooth: unsupported K type %s", ggml_type_name(k->type));
        }
        kvsmooth_entropy<true><<<dim3(a.n_head, a.n_smooth, 1), KVSMOOTH_ENTROPY_THREADS, 0, stream>>>(a, scores.get(), H.get());
    } else {
        kvsmooth_entropy<false><<<dim3(a.n_head, a.n_smooth, 1), KVSMOOTH_ENTROPY_THREADS, 0, stream>>>(a, nullptr, H.get());
    }

    kvsmooth_update<<<1, KVSMOOTH_UPDATE_THREADS, 0, stream>>>(a, H.get());
}
