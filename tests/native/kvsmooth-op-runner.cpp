// Runs one GGML_OP_KVSMOOTH node on a named ggml backend, for the Python op tests
// (tests/op_runner.py loads this library with ctypes), or the same computation built from
// stock ggml ops (kvsmooth_op_run_composed: llama-kvsmooth-composed.h, compiled in), or, for a
// scores-path case, flash attention with its entropy side output feeding the op's entropies path
// (kvsmooth_op_run_flash: what llama.cpp builds with flash attention on the CPU).
//
// The K/V tensors are whole layer caches ([n_embd_gqa, kv_size, n_stream], kv_size = n_kv) and
// the op gets views of them made exactly like llama_kv_cache::get_k / get_v, so the strides the
// kernels see (head, cell, stream; transposed V) are those of llama.cpp.
//
// Build: c++ -O2 -shared -fPIC -std=c++17 kvsmooth-op-runner.cpp -I<ggml/include> -lggml -lggml-base
//
// Environment: KVSMOOTH_OP_RUNNER_THREADS sets the thread count of backends that have one (CPU).

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include "llama-kvsmooth-composed.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

extern "C" {

struct kvsmooth_op_case {
    int32_t from_scores;          // 0: kq path (ggml_kvsmooth), 1: q path (ggml_kvsmooth_ext)
    int32_t n_kv, n_tps, n_head, n_head_kv, n_stream, d_k, d_v;
    int32_t n_smooth, n_slot, queue_cap, queue, mode, v_trans;
    int32_t k_type, v_type;       // ggml_type: 0 f32, 1 f16, 8 q8_0, 30 bf16
    int32_t mask_kind;            // 0 none, 1 f32, 2 f16 (data always passed as f32)
    int32_t has_sinks;
    float   lambda_ref, window, eps, scale, max_bias, logit_softcap;
};

enum {
    KVSMOOTH_OP_OK              = 0,
    KVSMOOTH_OP_BAD_ARGUMENTS   = 1,
    KVSMOOTH_OP_NO_BACKEND      = 2,
    KVSMOOTH_OP_NOT_SUPPORTED   = 3,
};

// arrays are host memory, C-contiguous (numpy shapes):
//   kq    f32 [n_stream, n_head, n_tps, n_kv]  (kq path) or  q f32 [n_stream*n_tps, n_head, d_k]
//   mask  f32 [n_stream, 1, n_tps, n_kv] or NULL (q path only)
//   sinks f32 [n_head] or NULL
//   k     bytes [n_stream, n_kv, row_bytes(k_type, n_head_kv*d_k)]                     in/out
//   v     bytes [n_stream, n_kv, row_bytes(v_type, n_head_kv*d_v)], or with v_trans
//         elements [n_stream, n_head_kv*d_v, n_kv]                                     in/out
//   ids   i32 [n_smooth, 5];  state f32 [n_slot, 1+queue_cap] in/out;  result f32 [n_smooth, 4] out
int kvsmooth_op_run(const char * backend, const struct kvsmooth_op_case * c,
                    const float * kq_or_q, const float * mask, const float * sinks,
                    void * k, void * v, const int32_t * ids, float * state, float * result);

// the same, with the composed path instead of the op (same arguments, same effects)
int kvsmooth_op_run_composed(const char * backend, const struct kvsmooth_op_case * c,
                    const float * kq_or_q, const float * mask, const float * sinks,
                    void * k, void * v, const int32_t * ids, float * state, float * result);

// the same for a scores-path case (q, V not transposed, mask none or f16): ggml_flash_attn_ext_entropy
// over q, k, v, mask and sinks, its entropies into ggml_kvsmooth_from_entropies
int kvsmooth_op_run_flash(const char * backend, const struct kvsmooth_op_case * c,
                    const float * kq_or_q, const float * mask, const float * sinks,
                    void * k, void * v, const int32_t * ids, float * state, float * result);

} // extern "C"

namespace {

struct ggml_context_deleter { void operator()(ggml_context * ctx) const { ggml_free(ctx); } };
struct backend_deleter      { void operator()(ggml_backend_t b) const { ggml_backend_free(b); } };
struct buffer_deleter       { void operator()(ggml_backend_buffer_t b) const { ggml_backend_buffer_free(b); } };
struct gallocr_deleter      { void operator()(ggml_gallocr_t a) const { ggml_gallocr_free(a); } };

using context_ptr = std::unique_ptr<ggml_context, ggml_context_deleter>;
using backend_ptr = std::unique_ptr<ggml_backend, backend_deleter>;
using buffer_ptr  = std::unique_ptr<ggml_backend_buffer, buffer_deleter>;
using gallocr_ptr = std::unique_ptr<ggml_gallocr, gallocr_deleter>;

// everything the op's constructors would assert on, so that a bad case returns an error
// instead of aborting the test process
bool case_ok(const kvsmooth_op_case * c, const float * kq_or_q, const float * mask, const float * sinks,
             const void * k, const void * v, const int32_t * ids, const float * state, const float * result) {
    if (!c || !kq_or_q || !k || !v || !state) {
        return false;
    }
    if (c->n_kv < 1 || c->n_tps < 1 || c->n_head < 1 || c->n_head_kv < 1 || c->n_stream < 1 ||
        c->d_k < 1 || c->d_v < 1 || c->n_smooth < 0 || c->n_slot < 1) {
        return false;
    }
    if (c->n_smooth > 0 && (!ids || !result)) {
        return false;
    }
    if (c->n_head % c->n_head_kv != 0) {
        return false;
    }
    // a queue longer than a backend's kernels hold is its supports_op's answer
    if (c->queue < 1 || c->queue > c->queue_cap) {
        return false;
    }
    if (c->mode < GGML_KVSMOOTH_MODE_ADAPTIVE || c->mode > GGML_KVSMOOTH_MODE_KEYS) {
        return false;
    }
    // any ggml type gets through here: which cache types a backend handles is its supports_op's answer
    if (c->k_type < 0 || c->k_type >= GGML_TYPE_COUNT || ggml_type_size((ggml_type) c->k_type) == 0 ||
        c->v_type < 0 || c->v_type >= GGML_TYPE_COUNT || ggml_type_size((ggml_type) c->v_type) == 0) {
        return false;
    }
    if (c->d_k % ggml_blck_size((ggml_type) c->k_type) != 0 || c->d_v % ggml_blck_size((ggml_type) c->v_type) != 0) {
        return false;
    }
    if (c->v_trans && ggml_is_quantized((ggml_type) c->v_type)) {
        return false;
    }
    if (c->mask_kind < 0 || c->mask_kind > 2 || (c->mask_kind != 0) != (mask != nullptr)) {
        return false;
    }
    if (c->from_scores && c->max_bias > 0.0f && c->mask_kind == 0) {
        return false;
    }
    if ((c->has_sinks != 0) != (sinks != nullptr)) {
        return false;
    }
    for (int32_t j = 0; j < c->n_smooth; ++j) {
        const int32_t * id = ids + 5*j;
        if (id[0] < 0 || id[0] >= c->n_tps || id[1] < 0 || id[1] >= c->n_stream ||
            id[2] < 0 || id[2] >= c->n_kv || id[3] < -1 || id[3] >= c->n_kv ||
            id[4] < 0 || id[4] >= c->n_slot) {
            return false;
        }
    }
    return true;
}

ggml_backend_dev_t find_device(const char * name) {
    ggml_backend_dev_t dev = ggml_backend_dev_by_name(name);
    if (!dev) {
        // a ggml built with GGML_BACKEND_DL registers its backends only when they are loaded
        ggml_backend_load_all();
        dev = ggml_backend_dev_by_name(name);
    }
    return dev;
}

void set_threads(ggml_backend_dev_t dev, ggml_backend_t backend) {
    const char * env = getenv("KVSMOOTH_OP_RUNNER_THREADS");
    if (!env || atoi(env) < 1) {
        return;
    }
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto set_n_threads = reg ? (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads") : nullptr;
    if (set_n_threads) {
        set_n_threads(backend, atoi(env));
    }
}

} // namespace

enum class impl { fused, composed, flash };

static int run(impl how, const char * backend_name, const struct kvsmooth_op_case * c,
        const float * kq_or_q, const float * mask, const float * sinks,
        void * k, void * v, const int32_t * ids, float * state, float * result) {
    if (!case_ok(c, kq_or_q, mask, sinks, k, v, ids, state, result)) {
        return KVSMOOTH_OP_BAD_ARGUMENTS;
    }
    // flash attention reads V rows and an f16 mask
    if (how == impl::flash && (!c->from_scores || c->v_trans || c->mask_kind == 1)) {
        return KVSMOOTH_OP_BAD_ARGUMENTS;
    }
    const bool composed = how == impl::composed;

    ggml_backend_dev_t dev = find_device(backend_name ? backend_name : "CPU");
    if (!dev) {
        return KVSMOOTH_OP_NO_BACKEND;
    }
    backend_ptr backend(ggml_backend_dev_init(dev, nullptr));
    if (!backend) {
        return KVSMOOTH_OP_NO_BACKEND;
    }
    set_threads(dev, backend.get());

    const ggml_type k_type = (ggml_type) c->k_type;
    const ggml_type v_type = (ggml_type) c->v_type;

    const int64_t n_kv         = c->n_kv;
    const int64_t kv_size      = n_kv;
    const int64_t n_stream     = c->n_stream;
    const int64_t n_tokens     = (int64_t) c->n_tps*n_stream;
    const int64_t n_embd_k_gqa = (int64_t) c->d_k*c->n_head_kv;
    const int64_t n_embd_v_gqa = (int64_t) c->d_v*c->n_head_kv;
    const int64_t n_smooth     = c->n_smooth;

    // persistent tensors: inputs, the layer caches and the queue state
    ggml_init_params ip = { 16*ggml_tensor_overhead(), nullptr, /*no_alloc =*/ true };
    context_ptr ctx_data(ggml_init(ip));

    ggml_tensor * t_in = c->from_scores
        ? ggml_new_tensor_3d(ctx_data.get(), GGML_TYPE_F32, c->d_k, c->n_head, n_tokens)
        : ggml_new_tensor_4d(ctx_data.get(), GGML_TYPE_F32, n_kv, c->n_tps, c->n_head, n_stream);
    ggml_tensor * t_mask = (c->from_scores && c->mask_kind != 0)
        ? ggml_new_tensor_4d(ctx_data.get(), c->mask_kind == 2 ? GGML_TYPE_F16 : GGML_TYPE_F32, n_kv, c->n_tps, 1, n_stream)
        : nullptr;
    ggml_tensor * t_sinks = c->has_sinks ? ggml_new_tensor_1d(ctx_data.get(), GGML_TYPE_F32, c->n_head) : nullptr;
    ggml_tensor * t_k     = ggml_new_tensor_3d(ctx_data.get(), k_type, n_embd_k_gqa, kv_size, n_stream);
    ggml_tensor * t_v     = ggml_new_tensor_3d(ctx_data.get(), v_type, n_embd_v_gqa, kv_size, n_stream);
    ggml_tensor * t_ids   = ggml_new_tensor_2d(ctx_data.get(), GGML_TYPE_I32, 5, n_smooth);
    ggml_tensor * t_state = ggml_new_tensor_2d(ctx_data.get(), GGML_TYPE_F32, 1 + c->queue_cap, c->n_slot);
    ggml_tensor * t_dummy = ggml_new_tensor_1d(ctx_data.get(), GGML_TYPE_F32, 1);
    // the result rows, one spare: the op writes into them and returns a view of its n_smooth rows
    ggml_tensor * t_res   = ggml_new_tensor_2d(ctx_data.get(), GGML_TYPE_F32, 4, n_smooth + 1);

    buffer_ptr buf(ggml_backend_alloc_ctx_tensors(ctx_data.get(), backend.get()));
    if (!buf) {
        return KVSMOOTH_OP_BAD_ARGUMENTS;
    }

    // the graph: views as llama_kv_cache::get_k / get_v make them (sinfo.s0 = 0, all streams)
    ggml_init_params gp = { 1024*ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, /*no_alloc =*/ true };
    context_ptr ctx_graph(ggml_init(gp));
    ggml_context * ctx = ctx_graph.get();

    ggml_tensor * k_view = ggml_view_4d(ctx, t_k,
            c->d_k, c->n_head_kv, n_kv, n_stream,
            ggml_row_size(k_type, c->d_k),
            ggml_row_size(k_type, n_embd_k_gqa),
            ggml_row_size(k_type, n_embd_k_gqa*kv_size),
            0);

    ggml_tensor * v_view = !c->v_trans
        ? ggml_view_4d(ctx, t_v,
                c->d_v, c->n_head_kv, n_kv, n_stream,
                ggml_row_size(v_type, c->d_v),
                ggml_row_size(v_type, n_embd_v_gqa),
                ggml_row_size(v_type, n_embd_v_gqa*kv_size),
                0)
        : ggml_view_4d(ctx, t_v,
                n_kv, c->n_head_kv, c->d_v, n_stream,
                ggml_row_size(v_type, kv_size*c->d_v),
                ggml_row_size(v_type, kv_size),
                ggml_row_size(v_type, kv_size*n_embd_v_gqa),
                0);

    // stands in for the layer's attention output: the op must wait for it
    ggml_tensor * after = ggml_scale(ctx, t_dummy, 1.0f);

    const ggml_kvsmooth_mode mode = (ggml_kvsmooth_mode) c->mode;
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_tensor * out = nullptr;
    kvsmooth_composed comp;

    if (composed) {
        if (n_smooth == 0) {
            return KVSMOOTH_OP_OK;  // nothing to build: no column, no effect
        }
        kvsmooth_composed_args a;
        (c->from_scores ? a.q : a.kq) = t_in;
        a.mask  = t_mask;
        a.sinks = t_sinks;
        a.k = k_view;
        a.v = v_view;
        a.state = t_state;
        a.scale = c->scale;
        a.max_bias = c->max_bias;
        a.logit_softcap = c->logit_softcap;
        a.lambda_ref = c->lambda_ref;
        a.window = c->window;
        a.eps = c->eps;
        a.queue = c->queue;
        a.mode = mode;
        a.v_trans = c->v_trans != 0;
        std::vector<int32_t> slots(n_smooth);
        for (int64_t j = 0; j < n_smooth; ++j) {
            slots[j] = ids[5*j + 4];
        }
        out = comp.build(ctx, gf, a, kvsmooth_composed::rounds_of(slots));
        for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
            if (!ggml_backend_supports_op(backend.get(), ggml_graph_node(gf, i))) {
                return KVSMOOTH_OP_NOT_SUPPORTED;
            }
        }
    } else if (how == impl::flash) {
        // as llm_graph_context::build_attn_mha lays out q, k and v for flash attention
        ggml_tensor * q4 = ggml_view_4d(ctx, t_in, c->d_k, c->n_head, c->n_tps, n_stream,
                t_in->nb[1], t_in->nb[2], t_in->nb[2]*c->n_tps, 0);
        ggml_tensor * fa = ggml_flash_attn_ext_entropy(ctx,
                ggml_permute(ctx, q4, 0, 2, 1, 3), ggml_permute(ctx, k_view, 0, 2, 1, 3), ggml_permute(ctx, v_view, 0, 2, 1, 3),
                t_mask, c->scale, c->max_bias, c->logit_softcap);
        ggml_flash_attn_ext_add_sinks(fa, t_sinks);
        ggml_prec_set_acc(fa, GGML_PREC_F32);
        if (!ggml_backend_supports_op(backend.get(), fa)) {
            return KVSMOOTH_OP_NOT_SUPPORTED;
        }
        out = ggml_kvsmooth_from_entropies(ctx, t_res, ggml_flash_attn_ext_entropy_rows(ctx, fa), k_view, v_view, t_ids, t_state,
                ggml_flash_attn_ext_entropy_output(ctx, fa), c->lambda_ref, c->window, c->queue, mode, false);
    } else {
        out = c->from_scores
            ? ggml_kvsmooth_ext(ctx, t_res, t_in, k_view, v_view, t_mask, t_ids, t_state, after,
                    c->scale, c->max_bias, c->logit_softcap,
                    c->lambda_ref, c->window, c->queue, c->eps, mode, c->v_trans != 0)
            : ggml_kvsmooth(ctx, t_res, t_in, k_view, v_view, t_ids, t_state, after,
                    c->lambda_ref, c->window, c->queue, c->eps, mode, c->v_trans != 0);
        ggml_kvsmooth_add_sinks(out, t_sinks);
    }
    ggml_set_output(out);

    if (!ggml_backend_supports_op(backend.get(), out)) {
        return KVSMOOTH_OP_NOT_SUPPORTED;
    }

    ggml_build_forward_expand(gf, out);

    gallocr_ptr galloc(ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend.get())));
    if (!ggml_gallocr_alloc_graph(galloc.get(), gf)) {
        return KVSMOOTH_OP_BAD_ARGUMENTS;
    }

    ggml_backend_tensor_set(t_in, kq_or_q, 0, ggml_nbytes(t_in));
    if (t_mask) {
        if (t_mask->type == GGML_TYPE_F16) {
            std::vector<ggml_fp16_t> m16(ggml_nelements(t_mask));
            ggml_fp32_to_fp16_row(mask, m16.data(), (int64_t) m16.size());
            ggml_backend_tensor_set(t_mask, m16.data(), 0, ggml_nbytes(t_mask));
        } else {
            ggml_backend_tensor_set(t_mask, mask, 0, ggml_nbytes(t_mask));
        }
    }
    if (t_sinks) {
        ggml_backend_tensor_set(t_sinks, sinks, 0, ggml_nbytes(t_sinks));
    }
    ggml_backend_tensor_set(t_k, k, 0, ggml_nbytes(t_k));
    ggml_backend_tensor_set(t_v, v, 0, ggml_nbytes(t_v));
    if (n_smooth > 0) {
        ggml_backend_tensor_set(t_ids, ids, 0, ggml_nbytes(t_ids));
    }
    ggml_backend_tensor_set(t_state, state, 0, ggml_nbytes(t_state));
    const float one = 1.0f;
    ggml_backend_tensor_set(t_dummy, &one, 0, sizeof(one));
    if (composed) {
        comp.fill(ids);
    }

    if (ggml_backend_graph_compute(backend.get(), gf) != GGML_STATUS_SUCCESS) {
        return KVSMOOTH_OP_NOT_SUPPORTED;
    }

    ggml_backend_tensor_get(t_k, k, 0, ggml_nbytes(t_k));
    ggml_backend_tensor_get(t_v, v, 0, ggml_nbytes(t_v));
    ggml_backend_tensor_get(t_state, state, 0, ggml_nbytes(t_state));
    if (n_smooth > 0) {
        ggml_backend_tensor_get(out, result, 0, ggml_nbytes(out));
    }

    return KVSMOOTH_OP_OK;
}

extern "C" int kvsmooth_op_run(const char * backend, const struct kvsmooth_op_case * c,
        const float * kq_or_q, const float * mask, const float * sinks,
        void * k, void * v, const int32_t * ids, float * state, float * result) {
    return run(impl::fused, backend, c, kq_or_q, mask, sinks, k, v, ids, state, result);
}

extern "C" int kvsmooth_op_run_composed(const char * backend, const struct kvsmooth_op_case * c,
        const float * kq_or_q, const float * mask, const float * sinks,
        void * k, void * v, const int32_t * ids, float * state, float * result) {
    return run(impl::composed, backend, c, kq_or_q, mask, sinks, k, v, ids, state, result);
}

extern "C" int kvsmooth_op_run_flash(const char * backend, const struct kvsmooth_op_case * c,
        const float * kq_or_q, const float * mask, const float * sinks,
        void * k, void * v, const int32_t * ids, float * state, float * result) {
    return run(impl::flash, backend, c, kq_or_q, mask, sinks, k, v, ids, state, result);
}
