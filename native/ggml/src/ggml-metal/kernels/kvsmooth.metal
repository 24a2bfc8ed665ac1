// GGML_OP_KVSMOOTH: KVSmooth (arXiv 2602.04268) entropy-adaptive smoothing of the KV cache, in
// place.  Same three stages as the CUDA kernels (ggml-cuda/kvsmooth.cu), f32/f16 caches:
//   kernel_kvsmooth_scores_*  (flash attention on): scores into a scratch [n_smooth, n_head, n_kv]
//   kernel_kvsmooth_entropy_* one threadgroup per (smoothed token, query head)
//   kernel_kvsmooth_update_*  one threadgroup: FIFO, lambda, result and blend, columns in order
// Masked cells are kept finite (-FLT_MAX) as in the flash-attention kernels, so that fast math
// never compares against an infinity.

#include "common.h"

#define KVSMOOTH_MASKED (-FLT_MAX/2)

// sum over the threadgroup (at most 32 simdgroups); every thread gets the result
static inline float kvsmooth_tg_sum(float v, threadgroup float * buf, uint sgitg, uint tiisg, uint nsg) {
    v = simd_sum(v);
    if (tiisg == 0) {
        buf[sgitg] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    v = tiisg < nsg ? buf[tiisg] : 0.0f;
    v = simd_sum(v);
    threadgroup_barrier(mem_flags::mem_threadgroup); // buf may be reused
    return v;
}

static inline float kvsmooth_tg_max(float v, threadgroup float * buf, uint sgitg, uint tiisg, uint nsg) {
    v = simd_max(v);
    if (tiisg == 0) {
        buf[sgitg] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    v = tiisg < nsg ? buf[tiisg] : -FLT_MAX;
    v = simd_max(v);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return v;
}

// grid: (cell chunks, n_head, n_smooth), OP_KVSMOOTH_SCORES_NSG simdgroups, q row in threadgroup memory
template <typename TK>
kernel void kernel_kvsmooth_scores(
        constant ggml_metal_kargs_kvsmooth & args,
        device const   char * q,
        device const   char * k,
        device const   char * mask,
        device const    int * ids,
        device        float * scores,
        threadgroup   float * shq [[threadgroup(0)]],
        uint3 tgpig[[threadgroup_position_in_grid]],
        uint3 tpitg[[thread_position_in_threadgroup]],
        uint  sgitg[[simdgroup_index_in_threadgroup]],
        uint  tiisg[[thread_index_in_simdgroup]],
        uint3  tptg[[threads_per_threadgroup]]) {
    const int h = tgpig.y;
    const int j = tgpig.z;

    const int i = ids[5*j + 0];
    const int s = ids[5*j + 1];

    device const float * qrow = (device const float *) (q + ((int64_t) s*args.n_tps + i)*args.nb02 + h*args.nb01);
    for (int d = tpitg.x; d < args.d_k; d += tptg.x) {
        shq[d] = qrow[d];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    float slope = 1.0f;
    if (args.max_bias > 0.0f) {
        const float base = h < (int) args.n_head_log2 ? args.m0 : args.m1;
        const int   e    = h < (int) args.n_head_log2 ? h + 1 : 2*(h - (int) args.n_head_log2) + 1;
        slope = pow(base, e);
    }

    device const char * kbase = k + (h/args.n_rep)*args.nbk1 + s*args.nbk3;
    device const char * mrow  = mask + i*args.nbm1 + (h%args.ne_m2)*args.nbm2 + (s%args.ne_m3)*args.nbm3;
    device float      * out   = scores + ((int64_t) j*args.n_head + h)*args.n_kv;

    const int c0 = tgpig.x*OP_KVSMOOTH_SCORES_CELLS;
    const int c1 = min(c0 + OP_KVSMOOTH_SCORES_CELLS, args.n_kv);

    for (int c = c0 + (int) sgitg; c < c1; c += OP_KVSMOOTH_SCORES_NSG) {
        device const TK * krow = (device const TK *) (kbase + c*args.nbk2);

        float acc = 0.0f;
        for (int d = tiisg; d < args.d_k; d += N_SIMDWIDTH) {
            acc += shq[d]*(float) krow[d];
        }
        acc = simd_sum(acc);

        if (tiisg == 0) {
            // as ggml_flash_attn_ext: scale (already divided by the soft-cap), soft-cap, mask
            float sc = acc*args.scale;
            if (args.logit_softcap != 0.0f) {
                sc = args.logit_softcap*precise::tanh(sc);
            }
            if (args.mask_type == 1) {
                sc += slope*(float) ((device const half *) mrow)[c];
            } else if (args.mask_type == 2) {
                sc += slope*((device const float *) mrow)[c];
            }
            out[c] = max(sc, -FLT_MAX);
        }
    }
}

typedef decltype(kernel_kvsmooth_scores<float>) kernel_kvsmooth_scores_t;

template [[host_name("kernel_kvsmooth_scores_f32")]] kernel kernel_kvsmooth_scores_t kernel_kvsmooth_scores<float>;
template [[host_name("kernel_kvsmooth_scores_f16")]] kernel kernel_kvsmooth_scores_t kernel_kvsmooth_scores<half>;

// grid: (n_head, n_smooth), OP_KVSMOOTH_NTH threads; H[j*n_head + h] = −Σ α·ln(α + eps)
template <bool from_scores>
kernel void kernel_kvsmooth_entropy(
        constant ggml_metal_kargs_kvsmooth & args,
        device const   char * kq,
        device const  float * scores,
        device const  float * sinks,
        device const    int * ids,
        device        float * H,
        threadgroup   float * buf [[threadgroup(0)]],
        uint3 tgpig[[threadgroup_position_in_grid]],
        uint3 tpitg[[thread_position_in_threadgroup]],
        uint  sgitg[[simdgroup_index_in_threadgroup]],
        uint  tiisg[[thread_index_in_simdgroup]],
        uint3  tptg[[threads_per_threadgroup]]) {
    const int h = tgpig.x;
    const int j = tgpig.y;

    const uint nsg = (tptg.x + N_SIMDWIDTH - 1)/N_SIMDWIDTH;

    device const float * row;
    float smax    = 0.0f;
    float inv_sum = 1.0f;

    if (from_scores) {
        row = scores + ((int64_t) j*args.n_head + h)*args.n_kv;

        // online max and sum of e^(s - max) per thread, masked cells skipped
        float m = -FLT_MAX;
        float l = 0.0f;
        for (int c = tpitg.x; c < args.n_kv; c += tptg.x) {
            const float sc = row[c];
            if (sc <= KVSMOOTH_MASKED) {
                continue;
            }
            if (sc > m) {
                l = l*exp(m - sc) + 1.0f;
                m = sc;
            } else {
                l += exp(sc - m);
            }
        }

        smax = kvsmooth_tg_max(m, buf, sgitg, tiisg, nsg);
        float sum = kvsmooth_tg_sum(l == 0.0f ? 0.0f : l*exp(m - smax), buf, sgitg, tiisg, nsg);

        // the sink is one more logit in the denominator, not a cell of the entropy
        if (args.has_sinks) {
            const float sink = sinks[h];
            const float mx   = max(smax, sink);
            sum  = sum*exp(smax - mx) + exp(sink - mx);
            smax = mx;
        }

        if (smax <= KVSMOOTH_MASKED) {
            // every cell masked: no attention, nothing to be uncertain about
            if (tpitg.x == 0) {
                H[j*args.n_head + h] = 0.0f;
            }
            return;
        }
        inv_sum = 1.0f/sum;
    } else {
        row = (device const float *) (kq + ids[5*j + 0]*args.nb01 + h*args.nb02 + ids[5*j + 1]*args.nb03);
    }

    // cells with α == 0 contribute exactly 0, also with eps == 0
    float acc = 0.0f;
    for (int c = tpitg.x; c < args.n_kv; c += tptg.x) {
        const float p = from_scores ? exp(row[c] - smax)*inv_sum : row[c];
        if (p > 0.0f) {
            acc += p*log(p + args.eps);
        }
    }
    acc = kvsmooth_tg_sum(acc, buf, sgitg, tiisg, nsg);

    if (tpitg.x == 0) {
        H[j*args.n_head + h] = -acc;
    }
}

typedef decltype(kernel_kvsmooth_entropy<false>) kernel_kvsmooth_entropy_t;

template [[host_name("kernel_kvsmooth_entropy_kq")]] kernel kernel_kvsmooth_entropy_t kernel_kvsmooth_entropy<false>;
template [[host_name("kernel_kvsmooth_entropy_q")]]  kernel kernel_kvsmooth_entropy_t kernel_kvsmooth_entropy<true>;

// rows ← (1 − λ)·rows + λ·prev rows, n_head_kv head rows of n elements, nb_head bytes apart
template <typename T>
static inline void kvsmooth_blend_rows(device char * dst, device const char * src, uint64_t nb_head,
        int n_head_kv, int n, float lambda, uint tid, uint nth) {
    for (int e = tid; e < n_head_kv*n; e += nth) {
        const int g = e/n;
        device       T * pd = (device       T *) (dst + g*nb_head) + (e - g*n);
        device const T * ps = (device const T *) (src + g*nb_head) + (e - g*n);
        *pd = (T) ((1.0f - lambda)*(float) *pd + lambda*(float) *ps);
    }
}

// transposed V: element (cell, head g, dim d) at cell*nbv0 + g*nbv1 + d*nbv2
template <typename T>
static inline void kvsmooth_blend_trans(constant ggml_metal_kargs_kvsmooth & args, device char * vb,
        int cell, int prev, float lambda, uint tid, uint nth) {
    for (int e = tid; e < args.n_head_kv*args.d_v; e += nth) {
        const int g = e/args.d_v;
        device char * p = vb + g*args.nbv1 + (e - g*args.d_v)*args.nbv2;
        device       T * pd = (device       T *) (p + cell*args.nbv0);
        device const T * ps = (device const T *) (p + prev*args.nbv0);
        *pd = (T) ((1.0f - lambda)*(float) *pd + lambda*(float) *ps);
    }
}

// one threadgroup of OP_KVSMOOTH_NTH (>= the queue, see supports_op) threads, columns in order
template <typename TK, typename TV>
kernel void kernel_kvsmooth_update(
        constant ggml_metal_kargs_kvsmooth & args,
        device        char * k,
        device        char * v,
        device const   int * ids,
        device       float * state,
        device const float * H,
        device       float * dst,
        threadgroup  float * buf [[threadgroup(0)]],
        uint3 tpitg[[thread_position_in_threadgroup]],
        uint  sgitg[[simdgroup_index_in_threadgroup]],
        uint  tiisg[[thread_index_in_simdgroup]],
        uint3  tptg[[threads_per_threadgroup]]) {
    const int  tid = tpitg.x;
    const uint nth = tptg.x;
    const uint nsg = (nth + N_SIMDWIDTH - 1)/N_SIMDWIDTH;
    const int  M   = args.queue;

    for (int j = 0; j < args.n_smooth; ++j) {
        const int s    = ids[5*j + 1];
        const int cell = ids[5*j + 2];
        const int prev = ids[5*j + 3];
        device float * col = state + (int64_t) ids[5*j + 4]*args.state_ld;

        float hsum = 0.0f;
        for (int h = tid; h < args.n_head; h += nth) {
            hsum += H[j*args.n_head + h];
        }
        const float z = kvsmooth_tg_sum(hsum, buf, sgitg, tiisg, nsg)/args.n_head;

        // count is an exact small integer; a column written with a larger queue keeps its
        // newest M values: F[i] = col[1 + off + i], i < count
        const float count_f = col[0];
        const int   count_r = count_f >= 1.0f ? (int) min(count_f, (float) args.queue_cap) : 0;
        const int   off     = max(count_r - M, 0);
        const int   count   = count_r - off;
        const int   drop    = count == M ? 1 : 0;

        // the values that stay; z is ranked among them only (SPEC §1.3: push, then rank)
        const float f_keep = tid < count - drop ? col[1 + off + drop + tid] : 0.0f;

        // exact: at most 255 ones
        const int rank = (int) kvsmooth_tg_sum(tid < count - drop && f_keep < z ? 1.0f : 0.0f, buf, sgitg, tiisg, nsg);
        threadgroup_barrier(mem_flags::mem_device);

        if (tid < count - drop) {
            col[1 + tid] = f_keep;
        }
        if (tid == 0) {
            col[1 + count - drop] = z;
            col[0] = (float) (count - drop + 1);
        }

        float lambda = args.lambda_ref;
        if (args.mode != 1) { // not GGML_KVSMOOTH_MODE_FIXED
            lambda = min(max((float) rank/(float) M, args.lambda_ref - args.window), args.lambda_ref + args.window);
        }

        if (tid == 0) {
            device float * res = dst + 4*j;
            res[0] = z;
            res[1] = lambda;
            res[2] = (float) rank;
            res[3] = prev >= 0 ? 1.0f : 0.0f;
        }

        if (prev >= 0) {
            device char * kb = k + s*args.nbk3;
            kvsmooth_blend_rows<TK>(kb + cell*args.nbk2, kb + prev*args.nbk2, args.nbk1, args.n_head_kv, args.d_k, lambda, tid, nth);

            if (args.mode != 2) { // not GGML_KVSMOOTH_MODE_KEYS
                device char * vb = v + s*args.nbv3;
                if (args.v_trans) {
                    kvsmooth_blend_trans<TV>(args, vb, cell, prev, lambda, tid, nth);
                } else {
                    kvsmooth_blend_rows<TV>(vb + cell*args.nbv2, vb + prev*args.nbv2, args.nbv1, args.n_head_kv, args.d_v, lambda, tid, nth);
                }
            }
        }

        // the next column may read this slot's queue or blend with a row blended just now
        threadgroup_barrier(mem_flags::mem_device);
    }
}

typedef decltype(kernel_kvsmooth_update<float, float>) kernel_kvsmooth_update_t;

template [[host_name("kernel_kvsmooth_update_f32_f32")]] kernel kernel_kvsmooth_update_t kernel_kvsmooth_update<float, float>;
template [[host_name("kernel_kvsmooth_update_f32_f16")]] kernel kernel_kvsmooth_update_t kernel_kvsmooth_update<float, half>;
template [[host_name("kernel_kvsmooth_update_f16_f32")]] kernel kernel_kvsmooth_update_t kernel_kvsmooth_update<half,  float>;
template [[host_name("kernel_kvsmooth_update_f16_f16")]] kernel kernel_kvsmooth_update_t kernel_kvsmooth_update<half,  half>;
