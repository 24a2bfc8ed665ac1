#include "llama-kvsmooth.h"

#include "llama-arch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache-iswa.h"
#include "llama-memory-hybrid.h"
#include "llama-memory-hybrid-iswa.h"
#include "llama-memory-recurrent.h"
#include "llama-model.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <iterator>
#include <map>
#include <string>

#ifndef LLAMA_KVSMOOTH_VERSION
#define LLAMA_KVSMOOTH_VERSION "0.1.0"
#endif

#ifndef LLAMA_KVSMOOTH_UPSTREAM
#define LLAMA_KVSMOOTH_UPSTREAM "0c1e570"
#endif

// SPEC §1: layers [3, n_layer - 1) unless given
static constexpr int32_t LLAMA_KVSMOOTH_DEFAULT_LAYER_START = 3;

static const char * llama_kvsmooth_mode_name(int32_t mode) {
    switch (mode) {
        case LLAMA_KVSMOOTH_MODE_ADAPTIVE: return "adaptive";
        case LLAMA_KVSMOOTH_MODE_FIXED:    return "fixed";
        case LLAMA_KVSMOOTH_MODE_KEYS:     return "keys";
        default:                           return "?";
    }
}

static bool llama_kvsmooth_type_supported(ggml_type type) {
    return type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16 || type == GGML_TYPE_Q8_0;
}

// logs the reason of a refusal and keeps it for llama_kvsmooth_last_error; always false
static bool llama_kvsmooth_vfail(int32_t * err, std::string * msg, int32_t code, const char * fmt, va_list args) {
    char buf[1024];
    vsnprintf(buf, sizeof(buf), fmt, args);
    LLAMA_LOG_ERROR("llama_kvsmooth: %s\n", buf);
    *msg = buf;
    *err = code;
    return false;
}

static bool llama_kvsmooth_fail(int32_t * err, std::string * msg, int32_t code, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    llama_kvsmooth_vfail(err, msg, code, fmt, args);
    va_end(args);
    return false;
}

// the values that do not depend on the model; the layer range is checked by llama_kvsmooth::create
static bool llama_kvsmooth_check_params(const llama_kvsmooth_params & p, int32_t * err, std::string * msg) {
    if (!std::isfinite(p.lambda_ref) || p.lambda_ref < 0.0f || p.lambda_ref > 1.0f) {
        return llama_kvsmooth_fail(err, msg, LLAMA_KVSMOOTH_ERR_INVALID_PARAM, "invalid lambda_ref = %g: allowed values are [0, 1]", p.lambda_ref);
    }
    if (!std::isfinite(p.window) || p.window < 0.0f) {
        return llama_kvsmooth_fail(err, msg, LLAMA_KVSMOOTH_ERR_INVALID_PARAM, "invalid window = %g: allowed values are >= 0", p.window);
    }
    if (p.queue < 1 || p.queue > LLAMA_KVSMOOTH_MAX_QUEUE) {
        return llama_kvsmooth_fail(err, msg, LLAMA_KVSMOOTH_ERR_INVALID_PARAM, "invalid queue = %d: allowed values are [1, %d]", p.queue, LLAMA_KVSMOOTH_MAX_QUEUE);
    }
    if (!std::isfinite(p.eps) || p.eps < 0.0f || p.eps >= 1.0f) {
        return llama_kvsmooth_fail(err, msg, LLAMA_KVSMOOTH_ERR_INVALID_PARAM, "invalid eps = %g: allowed values are [0, 1)", p.eps);
    }
    if (p.mode != LLAMA_KVSMOOTH_MODE_ADAPTIVE && p.mode != LLAMA_KVSMOOTH_MODE_FIXED && p.mode != LLAMA_KVSMOOTH_MODE_KEYS) {
        return llama_kvsmooth_fail(err, msg, LLAMA_KVSMOOTH_ERR_INVALID_PARAM, "invalid mode = %d: allowed values are %d (adaptive), %d (fixed), %d (keys)", (int) p.mode,
                LLAMA_KVSMOOTH_MODE_ADAPTIVE, LLAMA_KVSMOOTH_MODE_FIXED, LLAMA_KVSMOOTH_MODE_KEYS);
    }
    if (p.impl != LLAMA_KVSMOOTH_IMPL_AUTO && p.impl != LLAMA_KVSMOOTH_IMPL_FUSED && p.impl != LLAMA_KVSMOOTH_IMPL_COMPOSED) {
        return llama_kvsmooth_fail(err, msg, LLAMA_KVSMOOTH_ERR_INVALID_PARAM, "invalid impl = %d: allowed values are %d (auto), %d (fused), %d (composed)", (int) p.impl,
                LLAMA_KVSMOOTH_IMPL_AUTO, LLAMA_KVSMOOTH_IMPL_FUSED, LLAMA_KVSMOOTH_IMPL_COMPOSED);
    }

    return true;
}

// the KV caches of a memory module that hold attention cells, base before sliding window; empty with
// *why set when the memory has none that KVSmooth can smooth
static std::vector<llama_kv_cache *> llama_kvsmooth_caches_of(llama_memory_i * mem, const char ** why) {
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return { kv };
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return { iswa->get_base(), iswa->get_swa() };
    }
    if (auto * hybrid = dynamic_cast<llama_memory_hybrid *>(mem)) {
        return { hybrid->get_mem_attn() };
    }
    if (auto * hybrid = dynamic_cast<llama_memory_hybrid_iswa *>(mem)) {
        return { hybrid->get_mem_attn()->get_base(), hybrid->get_mem_attn()->get_swa() };
    }
    if (dynamic_cast<llama_memory_recurrent *>(mem)) {
        *why = "its memory is purely recurrent: there are no KV cache cells to smooth";
    } else if (mem == nullptr) {
        *why = "the context has no memory";
    } else {
        *why = "its memory module is not a standard KV cache (one of llama.cpp's KV, iSWA or hybrid caches)";
    }
    return {};
}

// the same for a memory context: the contexts of those caches, in the same order
static std::vector<const llama_kv_cache_context *> llama_kvsmooth_contexts_of(const llama_memory_context_i * mctx) {
    if (auto * kv = dynamic_cast<const llama_kv_cache_context *>(mctx)) {
        return { kv };
    }
    if (auto * iswa = dynamic_cast<const llama_kv_cache_iswa_context *>(mctx)) {
        return { iswa->get_base(), iswa->get_swa() };
    }
    if (auto * hybrid = dynamic_cast<const llama_memory_hybrid_context *>(mctx)) {
        return { hybrid->get_attn() };
    }
    if (auto * hybrid = dynamic_cast<const llama_memory_hybrid_iswa_context *>(mctx)) {
        return { hybrid->get_attn()->get_base(), hybrid->get_attn()->get_swa() };
    }
    return {};
}

//
// llama_kvsmooth
//

llama_kvsmooth::llama_kvsmooth(const llama_kvsmooth_params & params, std::vector<llama_kv_cache *> caches, uint32_t n_slot, bool composed, bool split_simple,
        uint32_t max_columns) :
    params(params),
    id([] {
        // never 0, which stands for "disabled" in llm_graph_params
        static std::atomic<uint64_t> counter { 0 };
        return ++counter;
    }()),
    n_slot(n_slot),
    composed(composed),
    split_simple(split_simple),
    max_columns(max_columns),
    caches(std::move(caches)),
    src_of(n_slot),
    used(n_slot, 0),
    seq_params(n_slot, llama_kvsmooth_seq_params { true, params.lambda_ref, params.window, params.mode }) {
    for (uint32_t s = 0; s < n_slot; ++s) {
        src_of[s] = (int32_t) s;
    }
}

void llama_kvsmooth::set_seq_setting(llama_seq_id seq_id, const llama_kvsmooth_seq_params & setting) {
    seq_params[seq_id] = setting;

    // a queue ranked under another setting says nothing about this one
    reset(seq_id);
}

static bool llama_kvsmooth_same_setting(const llama_kvsmooth_seq_params & a, const llama_kvsmooth_seq_params & b) {
    return a.enabled == b.enabled && a.lambda_ref == b.lambda_ref && a.window == b.window && a.mode == b.mode;
}

int32_t llama_kvsmooth::group_index(const std::vector<group> & groups, const llama_kvsmooth_seq_params & setting) {
    if (!setting.enabled) {
        return -1;
    }
    for (size_t g = 0; g < groups.size(); ++g) {
        if (llama_kvsmooth_same_setting(groups[g].setting, setting)) {
            return (int32_t) g;
        }
    }
    return -1;
}

std::vector<llama_kvsmooth::group> llama_kvsmooth::groups_of(const llama_ubatch & ubatch) const {
    // the sequences with generation-step tokens, lowest first
    // a token of several sequences is a column of each (SPEC §2: it pushes into each of their queues)
    std::vector<int64_t> n_per_seq(n_slot, 0);
    for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
        if (ubatch.output[i]) {
            for (int32_t k = 0; k < ubatch.n_seq_id[i]; ++k) {
                const llama_seq_id seq = ubatch.seq_id[i][k];
                GGML_ASSERT(seq >= 0 && (uint32_t) seq < n_slot);
                n_per_seq[seq]++;
            }
        }
    }

    // a decode gives the composed path at most one output token of a sequence per ubatch (n_ubatch_for,
    // check_batch), at most MAX_ROUNDS in one call of its builder; a worst-case reserve graph asking for
    // more is built that size, so that its buffers are
    if (composed) {
        for (int64_t & n : n_per_seq) {
            n = std::min<int64_t>(n, kvsmooth_composed::MAX_ROUNDS);
        }
    }

    std::vector<group> res;
    for (uint32_t s = 0; s < n_slot; ++s) {
        if (n_per_seq[s] == 0 || !seq_params[s].enabled) {
            continue;
        }
        const int32_t g = group_index(res, seq_params[s]);
        if (g < 0) {
            res.push_back({ seq_params[s], n_per_seq[s], { n_per_seq[s] } });
        } else {
            res[g].n_tokens += n_per_seq[s];
            res[g].seq_counts.push_back(n_per_seq[s]);
        }
    }

    return res;
}

llama_kvsmooth::~llama_kvsmooth() {
    if (connected) {
        for (llama_kv_cache * kv : caches) {
            kv->set_seq_observer(nullptr);
        }
    }
}

std::unique_ptr<llama_kvsmooth> llama_kvsmooth::create(
        const llama_context & lctx,
        const llama_kvsmooth_params & params_in,
        int32_t * err,
        std::string * msg) {
    const auto fail = [err, msg](int32_t code, const char * fmt, ...) -> std::unique_ptr<llama_kvsmooth> {
        va_list args;
        va_start(args, fmt);
        llama_kvsmooth_vfail(err, msg, code, fmt, args);
        va_end(args);
        return nullptr;
    };

    const llama_model   & model   = lctx.get_model();
    const llama_hparams & hparams = model.hparams;
    const llama_cparams & cparams = lctx.get_cparams();

    const int32_t n_layer = (int32_t) hparams.n_layer();

    llama_kvsmooth_params p = params_in;

    //
    // parameters
    //

    if (!llama_kvsmooth_check_params(p, err, msg)) {
        return nullptr;
    }

    if (p.layer_start < -1 || p.layer_end < -1) {
        return fail(LLAMA_KVSMOOTH_ERR_INVALID_PARAM, "invalid layer range [%d, %d): allowed values are -1 (default) or 0 <= layer_start < layer_end <= n_layer = %d",
                p.layer_start, p.layer_end, n_layer);
    }

    p.layer_start = p.layer_start == -1 ? LLAMA_KVSMOOTH_DEFAULT_LAYER_START : p.layer_start;
    p.layer_end   = p.layer_end   == -1 ? n_layer - 1                        : p.layer_end;

    if (p.layer_start >= p.layer_end || p.layer_end > n_layer) {
        return fail(LLAMA_KVSMOOTH_ERR_INVALID_PARAM, "invalid layer range [layer_start = %d, layer_end = %d) (from %d, %d; -1 selects [%d, n_layer - 1)): "
                "allowed values are 0 <= layer_start < layer_end <= n_layer = %d",
                p.layer_start, p.layer_end, params_in.layer_start, params_in.layer_end,
                LLAMA_KVSMOOTH_DEFAULT_LAYER_START, n_layer);
    }

    //
    // model, memory and cache
    //

    const char * arch_name = llm_arch_name(model.arch);

    if (hparams.is_mla()) {
        return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED, "architecture %s is not supported: multi-head latent attention (MLA) caches have no V rows to smooth", arch_name);
    }
    if (cparams.training) {
        return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED, "not supported on a training context");
    }
    if (cparams.embeddings) {
        return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED, "not supported on an embeddings context: every token has output there, "
                "so there are no generation steps to smooth (SPEC §2)");
    }

    const char * why = nullptr;

    std::vector<llama_kv_cache *> caches = llama_kvsmooth_caches_of(lctx.get_memory(), &why);
    if (caches.empty()) {
        return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED, "architecture %s is not supported: %s", arch_name, why);
    }

    // the cache of each layer (-1: the layer owns no KV cells: a recurrent, convolution or KV-sharing layer)
    std::vector<int32_t> layer_cache(n_layer, -1);

    for (size_t ic = 0; ic < caches.size(); ++ic) {
        for (uint32_t il : caches[ic]->get_layer_ids()) {
            if ((int32_t) il < n_layer) {
                layer_cache[il] = (int32_t) ic;
            }
        }
    }

    std::vector<int32_t> smoothed;
    for (int32_t il = p.layer_start; il < p.layer_end; ++il) {
        if (layer_cache[il] >= 0) {
            smoothed.push_back(il);
        }
    }

    if (smoothed.empty()) {
        return fail(LLAMA_KVSMOOTH_ERR_INVALID_PARAM, "invalid layer range [%d, %d): none of these layers of %s has KV cache cells "
                "(they are recurrent, convolution or KV-sharing layers); choose a range with attention layers",
                p.layer_start, p.layer_end, arch_name);
    }

    for (size_t ic = 0; ic < caches.size(); ++ic) {
        const ggml_type type_k = caches[ic]->type_k();
        const ggml_type type_v = caches[ic]->type_v();

        if (!llama_kvsmooth_type_supported(type_k) || !llama_kvsmooth_type_supported(type_v)) {
            return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED, "KV cache type K = %s, V = %s is not supported: allowed types are f32, f16, bf16, q8_0",
                    ggml_type_name(type_k), ggml_type_name(type_v));
        }
    }

    // the scratch slot is the last state column
    const uint32_t n_slot = cparams.n_seq_max;

    //
    // devices: the computation runs where each layer's cache is, so that device must support the op
    // (fused) or the stock ops of the composed path
    //

    bool need_composed = false;

    for (int32_t il : smoothed) {
        llama_kv_cache * kv = caches[layer_cache[il]];

        const uint32_t n_kv = std::min<uint32_t>(256, kv->get_size());

        llama_kv_cache::slot_info sinfo;
        sinfo.s0 = 0;
        sinfo.s1 = 0;
        sinfo.strm = { 0 };
        sinfo.idxs = { { 0 } };

        ggml_init_params ip = {
            /*.mem_size   =*/ 1024*ggml_tensor_overhead() + ggml_graph_overhead(),
            /*.mem_buffer =*/ nullptr,
            /*.no_alloc   =*/ true,
        };
        ggml_context_ptr ctx { ggml_init(ip) };

        const int64_t n_head = hparams.n_head(il);
        const int64_t d_k    = hparams.n_embd_head_k(il);
        const int64_t d_v    = hparams.n_embd_head_v(il);

        ggml_tensor * k = kv->get_k(ctx.get(), il, n_kv, sinfo);
        ggml_tensor * v = kv->get_v(ctx.get(), il, n_kv, sinfo);

        const bool v_trans = v->nb[1] > v->nb[2];

        if (v_trans && ggml_is_quantized(v->type)) {
            return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED, "a %s V cache needs flash attention", ggml_type_name(v->type));
        }

        ggml_tensor * ids   = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_I32, 5, 1);
        ggml_tensor * state = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, 1 + p.queue, n_slot + 1);
        ggml_tensor * after = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, d_v*n_head, 1);

        const auto mode = (ggml_kvsmooth_mode) p.mode;

        ggml_tensor * op;
        kvsmooth_composed_args ca;
        ca.k = k;
        ca.v = v;
        ca.state = state;
        ca.scale = 1.0f;
        ca.max_bias = hparams.f_max_alibi_bias;
        ca.logit_softcap = hparams.attn_soft_cap ? hparams.f_attn_logit_softcapping : 0.0f;
        ca.queue = p.queue;
        ca.mode = mode;
        ca.v_trans = v_trans;
        ggml_tensor * result = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, 4, 1);
        if (cparams.flash_attn) {
            ggml_tensor * q    = ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, d_k, n_head, 1);
            ggml_tensor * mask = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F16, n_kv, 1, 1, 1);

            op = ggml_kvsmooth_ext(ctx.get(), result, q, k, v, mask, ids, state, after, 1.0f, hparams.f_max_alibi_bias,
                    hparams.attn_soft_cap ? hparams.f_attn_logit_softcapping : 0.0f,
                    p.lambda_ref, p.window, p.queue, p.eps, mode, v_trans);
            ca.q = q;
            ca.mask = mask;
        } else {
            ggml_tensor * kq = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F32, n_kv, 1, n_head, 1);

            op = ggml_kvsmooth(ctx.get(), result, kq, k, v, ids, state, after, p.lambda_ref, p.window, p.queue, p.eps, mode, v_trans);
            ca.kq = kq;
        }

        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(kv->get_k_storage(il)->buffer);

        ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
        if (dev == nullptr) {
            dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        }

        const bool fused_ok = dev != nullptr && ggml_backend_dev_supports_op(dev, op);

        // the composed path's first op that the device lacks, nullptr if none
        const ggml_tensor * composed_missing = nullptr;
        if (!fused_ok || p.impl == LLAMA_KVSMOOTH_IMPL_COMPOSED) {
            ggml_cgraph * gf = ggml_new_graph(ctx.get());
            kvsmooth_composed graph;
            ggml_tensor * res_c = graph.build(ctx.get(), gf, ca, { { 0 } });
            ggml_build_forward_expand(gf, res_c);
            for (int i = 0; i < ggml_graph_n_nodes(gf) && composed_missing == nullptr; ++i) {
                ggml_tensor * node = ggml_graph_node(gf, i);
                if (dev == nullptr || !ggml_backend_dev_supports_op(dev, node)) {
                    composed_missing = node;
                }
            }
        }

        const std::string where = format("the KV cache of layer %d is on device %s (%s) (K %s, V %s%s, flash attention %s)", il,
                dev ? ggml_backend_dev_name(dev) : "?", ggml_backend_buft_name(buft),
                ggml_type_name(k->type), ggml_type_name(v->type), v_trans ? " transposed" : "",
                cparams.flash_attn ? "on" : "off");
        const std::string missing = composed_missing
            ? format("%s (%s)", ggml_op_desc(composed_missing), ggml_type_name(composed_missing->type)) : "";

        if (p.impl == LLAMA_KVSMOOTH_IMPL_FUSED && !fused_ok) {
            return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED, "%s, which has no KVSmooth op; impl = composed (--kvsmooth-impl composed) "
                    "builds it from stock ops%s", where.c_str(), composed_missing ? (", but this device lacks " + missing).c_str() : "");
        }
        if (p.impl == LLAMA_KVSMOOTH_IMPL_COMPOSED && composed_missing) {
            return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED, "%s, which does not support %s, used by the composed path", where.c_str(), missing.c_str());
        }
        if (!fused_ok && composed_missing) {
            return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED, "%s, which supports neither the KVSmooth op nor %s, used by the composed path",
                    where.c_str(), missing.c_str());
        }
        need_composed |= !fused_ok;
    }

    const bool composed = p.impl == LLAMA_KVSMOOTH_IMPL_COMPOSED || need_composed;
    p.impl = composed ? LLAMA_KVSMOOTH_IMPL_COMPOSED : LLAMA_KVSMOOTH_IMPL_FUSED;

    //
    // state: one tensor per smoothed layer, in a buffer of the layer's K cache buffer type
    //

    // llama_kv_cache and llama_kv_cache_iswa use split_simple with one stream; per-sequence streams and the
    // hybrid memories split by sequence (split_equal, split_seq)
    const bool hybrid = dynamic_cast<llama_memory_hybrid *>(lctx.get_memory()) || dynamic_cast<llama_memory_hybrid_iswa *>(lctx.get_memory());
    const bool split_simple = !hybrid && caches[0]->get_n_stream() == 1;

    std::unique_ptr<llama_kvsmooth> res(new llama_kvsmooth(p, caches, n_slot, composed, split_simple, cparams.n_ubatch + n_slot));

    res->states.assign(n_layer, nullptr);
    res->results.assign(n_layer, nullptr);

    std::map<ggml_backend_buffer_type_t, ggml_context_ptr> ctx_map;

    for (int32_t il : smoothed) {
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(caches[layer_cache[il]]->get_k_storage(il)->buffer);

        auto it = ctx_map.find(buft);
        if (it == ctx_map.end()) {
            ggml_init_params ip = {
                /*.mem_size   =*/ 2*size_t(n_layer)*ggml_tensor_overhead(),
                /*.mem_buffer =*/ nullptr,
                /*.no_alloc   =*/ true,
            };
            it = ctx_map.emplace(buft, ggml_context_ptr { ggml_init(ip) }).first;
        }

        ggml_tensor * state = ggml_new_tensor_2d(it->second.get(), GGML_TYPE_F32, 1 + p.queue, n_slot + 1);
        ggml_format_name(state, "kvsmooth_state_l%d", il);

        // the op's result rows of a ubatch live here, beside the state: the op returns a view of them, so
        // the scheduler runs it where its state lives and no graph buffer holds them
        ggml_tensor * result = ggml_new_tensor_2d(it->second.get(), GGML_TYPE_F32, 4, res->max_columns);
        ggml_format_name(result, "kvsmooth_result_l%d", il);

        res->states[il]  = state;
        res->results[il] = result;
    }

    size_t total = 0;

    for (auto & [buft, ctx] : ctx_map) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft);
        if (buf == nullptr) {
            return fail(LLAMA_KVSMOOTH_ERR_ALLOC, "failed to allocate the KVSmooth state in %s", ggml_backend_buft_name(buft));
        }

        // count = 0: every queue starts empty
        ggml_backend_buffer_clear(buf, 0);

        total += ggml_backend_buffer_get_size(buf);

        res->ctxs_bufs.emplace_back(std::move(ctx), buf);
    }

    std::string layers;
    for (int32_t il : smoothed) {
        layers += (layers.empty() ? "" : ",") + std::to_string(il);
    }

    LLAMA_LOG_INFO("%s: impl = %s, mode = %s, lambda_ref = %.3f, window = %.3f, queue = %d, layers = [%d, %d) (smoothed: %s), eps = %g, trace = %d, "
            "%u sequences, %zu KV cache(s), state and result rows = %.1f KiB\n", __func__, composed ? "composed" : "fused",
            llama_kvsmooth_mode_name(p.mode), p.lambda_ref, p.window, p.queue, p.layer_start, p.layer_end, layers.c_str(), p.eps, (int) p.trace,
            n_slot, caches.size(), total/1024.0);

    *err = 0;
    msg->clear();

    return res;
}

void llama_kvsmooth::connect() {
    for (llama_kv_cache * kv : caches) {
        kv->set_seq_observer(this);
    }
    connected = true;
}

void llama_kvsmooth::on_seq_rm(llama_seq_id seq_id) {
    reset(seq_id);
}

void llama_kvsmooth::on_seq_cp(llama_seq_id seq_id_src, llama_seq_id seq_id_dst) {
    if (seq_id_src < 0 || seq_id_dst < 0 || (uint32_t) seq_id_src >= n_slot || (uint32_t) seq_id_dst >= n_slot) {
        return;
    }

    src_of[seq_id_dst] = src_of[seq_id_src];
    pending = true;
}

void llama_kvsmooth::on_seq_keep(llama_seq_id seq_id) {
    for (uint32_t s = 0; s < n_slot; ++s) {
        if ((llama_seq_id) s != seq_id) {
            src_of[s] = -1;
        }
    }
    pending = true;
}

void llama_kvsmooth::reset(llama_seq_id seq_id) {
    if (seq_id < 0) {
        std::fill(src_of.begin(), src_of.end(), -1);
        pending = true;
    } else if ((uint32_t) seq_id < n_slot && src_of[seq_id] != -1) {
        src_of[seq_id] = -1;
        pending = true;
    }
}

// the batch indices of each smoothed sequence's output tokens, in batch order
static std::vector<std::vector<int32_t>> llama_kvsmooth_outputs_of(const llama_batch & batch, const std::vector<llama_kvsmooth_seq_params> & seq_params) {
    std::vector<std::vector<int32_t>> outs(seq_params.size());
    for (int32_t i = 0; i < batch.n_tokens; ++i) {
        if (!batch.logits[i]) {
            continue;
        }
        for (int32_t k = 0; k < batch.n_seq_id[i]; ++k) {
            const llama_seq_id seq = batch.seq_id[i][k];
            if (seq >= 0 && (size_t) seq < seq_params.size() && seq_params[seq].enabled) {
                outs[seq].push_back(i);
            }
        }
    }
    return outs;
}

std::string llama_kvsmooth::check_batch(const llama_batch & batch) const {
    if (paused) {
        return "";
    }

    const std::vector<std::vector<int32_t>> outs = llama_kvsmooth_outputs_of(batch, seq_params);

    // every (output token, smoothed sequence) of a ubatch is a column of a layer's result rows
    size_t n_columns = 0;
    for (const std::vector<int32_t> & o : outs) {
        n_columns += o.size();
    }
    if (n_columns > max_columns) {
        return format("KVSmooth: %zu (output token, sequence) pairs in one decode, more than the %u this context holds "
                "(n_ubatch + n_seq_max): decode in smaller batches", n_columns, max_columns);
    }

    if (!split_simple) {
        for (size_t seq = 0; seq < outs.size(); ++seq) {
            if (outs[seq].size() > 1) {
                return format("KVSmooth smooths several output tokens of one sequence one at a time, which this context's "
                        "memory cannot split a batch into (per-sequence KV streams, or a hybrid model): seq_id %zu has %zu "
                        "output tokens in this decode; request output for at most one token per sequence per llama_decode%s",
                        seq, outs[seq].size(), caches.size() == 1 && caches[0]->get_n_stream() > 1 ? ", or use a unified KV cache (kv_unified)" : "");
            }
        }
    }

    if (composed) {
        // the sequences of one token are columns of one composed node only if they share a setting
        for (int32_t i = 0; i < batch.n_tokens; ++i) {
            const llama_kvsmooth_seq_params * first = nullptr;
            for (int32_t k = 0; batch.logits[i] && k < batch.n_seq_id[i]; ++k) {
                const llama_seq_id seq = batch.seq_id[i][k];
                if (seq < 0 || (uint32_t) seq >= n_slot || !seq_params[seq].enabled) {
                    continue;
                }
                if (first && !llama_kvsmooth_same_setting(*first, seq_params[seq])) {
                    return format("KVSmooth impl composed cannot smooth token %d: its sequences have different KVSmooth "
                            "settings (llama_kvsmooth_set_seq); give them one setting, or use impl fused where the device has the op", i);
                }
                first = first ? first : &seq_params[seq];
            }
        }
    }

    return "";
}

uint32_t llama_kvsmooth::n_ubatch_for(const llama_batch & batch, uint32_t n_ubatch) const {
    if (paused || !split_simple) {
        return n_ubatch;
    }

    const std::vector<std::vector<int32_t>> outs = llama_kvsmooth_outputs_of(batch, seq_params);
    if (std::all_of(outs.begin(), outs.end(), [](const std::vector<int32_t> & o) { return o.size() < 2; })) {
        return n_ubatch;
    }

    // split_simple cuts [0, k), [k, 2k), ...: the largest k that keeps two output tokens of one sequence apart
    for (uint32_t k = n_ubatch; k > 1; --k) {
        bool apart = true;
        for (const std::vector<int32_t> & o : outs) {
            for (size_t t = 1; t < o.size() && apart; ++t) {
                apart = o[t - 1]/(int32_t) k != o[t]/(int32_t) k;
            }
        }
        if (apart) {
            return k;
        }
    }
    return 1;
}

size_t llama_kvsmooth::graph_nodes(uint32_t n_tokens) const {
    if (!composed) {
        return 0;
    }
    const size_t n_layers = (size_t) std::count_if(states.begin(), states.end(), [](const ggml_tensor * t) { return t != nullptr; });
    // every output column is in one round of one group; groups are at most one per sequence
    const size_t n_rounds = std::min<size_t>(n_tokens, (size_t) n_slot*kvsmooth_composed::MAX_ROUNDS);
    const size_t n_groups = std::min<size_t>(n_tokens, n_slot);
    return n_layers*(n_rounds*kvsmooth_composed::NODES_PER_ROUND + n_groups*kvsmooth_composed::NODES_PER_BUILD);
}

void llama_kvsmooth::mark_used(llama_seq_id seq_id) {
    used[seq_id] = 1;
}

ggml_tensor * llama_kvsmooth::get_state(int32_t il) const {
    if (il < params.layer_start || il >= params.layer_end) {
        return nullptr;
    }

    return states[il];
}

ggml_tensor * llama_kvsmooth::get_result(int32_t il) const {
    return get_state(il) ? results[il] : nullptr;
}

void llama_kvsmooth::apply_pending(ggml_backend_sched_t sched) {
    if (!pending) {
        return;
    }

    pending = false;

    // what each slot becomes; a queue known to be empty needs no write
    std::vector<uint8_t> used_new(n_slot, 0);

    bool work = false;

    for (uint32_t s = 0; s < n_slot; ++s) {
        const int32_t t = src_of[s];

        if (t == (int32_t) s) {
            used_new[s] = used[s];
        } else if (t < 0 || !used[t]) {
            work = work || used[s];
        } else {
            used_new[s] = 1;
            work = true;
        }
    }

    if (work) {
        // the previous graph may still be updating the state
        ggml_backend_sched_synchronize(sched);

        const float zero = 0.0f;

        std::vector<std::vector<float>> src(n_slot);

        for (ggml_tensor * state : states) {
            if (state == nullptr) {
                continue;
            }

            const size_t nb1 = state->nb[1];

            // read every copied slot before writing any
            for (uint32_t s = 0; s < n_slot; ++s) {
                const int32_t t = src_of[s];
                if (t >= 0 && t != (int32_t) s && used[t] && src[t].empty()) {
                    src[t].resize(state->ne[0]);
                    ggml_backend_tensor_get(state, src[t].data(), t*nb1, nb1);
                }
            }

            for (uint32_t s = 0; s < n_slot; ++s) {
                const int32_t t = src_of[s];

                if (t == (int32_t) s) {
                    continue;
                }

                if (t < 0 || !used[t]) {
                    if (used[s]) {
                        ggml_backend_tensor_set(state, &zero, s*nb1, sizeof(float));
                    }
                } else {
                    ggml_backend_tensor_set(state, src[t].data(), s*nb1, nb1);
                }
            }

            for (auto & v : src) {
                v.clear();
            }
        }
    }

    used = std::move(used_new);

    for (uint32_t s = 0; s < n_slot; ++s) {
        src_of[s] = (int32_t) s;
    }
}

void llama_kvsmooth::decode_begin(bool paused) {
    this->paused = paused;
    trace.clear();
    cur_input = nullptr;
}

void llama_kvsmooth::ubatch_done() {
    if (params.trace && cur_input) {
        cur_input->read_trace();
    }

    cur_input = nullptr;
}

//
// llm_graph_input_kvsmooth
//

void llm_graph_input_kvsmooth::set_input(const llama_ubatch * ubatch) {
    ks->cur_input = this;

    // a token without output is a prompt token, and so is every token of a paused decode: its
    // sequences start over (SPEC §2)
    for (uint32_t i = 0; i < ubatch->n_tokens; ++i) {
        if (!ubatch->output[i] || ks->paused) {
            for (int32_t j = 0; j < ubatch->n_seq_id[i]; ++j) {
                ks->reset(ubatch->seq_id[i][j]);
            }
        }
    }

    col_seq.assign(groups.size(), {});
    col_pos.assign(groups.size(), {});

    const bool any_ids = !composed.empty() || std::any_of(parts.begin(), parts.end(), [](const cache_ids & part) {
        return part.ids->buffer != nullptr;
    });

    if (!any_ids) {
        // no op node in this graph; the resets wait for the next one
        return;
    }

    const uint32_t n_tokens = ubatch->n_tokens;

    // the columns of each group: one per (generation-step token, smoothed sequence of it), in the order the
    // op updates a slot: by sequence, then position. A token of several sequences pushes into each queue;
    // its one cell is blended once, by the column of its lowest smoothed sequence
    struct column {
        uint32_t     i;
        llama_seq_id seq;
        bool         blend;
    };
    std::vector<std::vector<column>> outputs(groups.size());
    for (uint32_t i = 0; i < n_tokens; ++i) {
        if (!ubatch->output[i]) {
            continue;
        }
        llama_seq_id blend_seq = -1;
        for (int32_t k = 0; k < ubatch->n_seq_id[i]; ++k) {
            const llama_seq_id seq = ubatch->seq_id[i][k];
            if (ks->seq_setting(seq).enabled && (blend_seq < 0 || seq < blend_seq)) {
                blend_seq = seq;
            }
        }
        for (int32_t k = 0; k < ubatch->n_seq_id[i]; ++k) {
            const llama_seq_id seq = ubatch->seq_id[i][k];
            const int32_t g = llama_kvsmooth::group_index(groups, ks->seq_setting(seq));
            if (g >= 0) {
                outputs[g].push_back({ i, seq, seq == blend_seq });
            }
        }
    }

    for (size_t g = 0; g < groups.size(); ++g) {
        // can_reuse compared the groups with this ubatch's
        GGML_ASSERT((int64_t) outputs[g].size() == groups[g].n_tokens);

        std::stable_sort(outputs[g].begin(), outputs[g].end(), [ubatch](const column & a, const column & b) {
            return a.seq != b.seq ? a.seq < b.seq : ubatch->pos[a.i] < ubatch->pos[b.i];
        });
    }

    ks->apply_pending(sched);

    for (size_t ip = 0; ip < parts.size(); ++ip) {
        const cache_ids & part = parts[ip];

        const bool in_graph = part.ids->buffer != nullptr;
        if (!in_graph && composed.empty()) {
            continue;
        }

        const std::vector<column> & outs = outputs[part.group];

        GGML_ASSERT((int64_t) outs.size() == part.ids->ne[1]);

        const llama_kv_cache            * kv    = part.mctx->get_kv();
        const llama_kv_cache::slot_info & sinfo = part.mctx->get_sinfo();

        const uint32_t n_stream = sinfo.n_stream();
        const uint32_t n_kv     = part.mctx->get_n_kv();

        GGML_ASSERT(n_tokens % n_stream == 0);

        // tokens per stream: token i is the (i % n_tps)-th token of stream i / n_tps, as in the KQ mask
        const uint32_t n_tps = n_tokens/n_stream;

        std::vector<int32_t> data(5*outs.size());

        for (size_t j = 0; j < outs.size(); ++j) {
            const uint32_t i = outs[j].i;

            const llama_seq_id seq = outs[j].seq;
            const llama_pos    pos = ubatch->pos[i];

            const uint32_t strm = i / n_tps;
            const uint32_t ii   = i % n_tps;

            int32_t prev = -1;

            if (!ks->paused && outs[j].blend) {
                // apply_ubatch() has stored this ubatch already, so an earlier token of the same ubatch counts
                const auto & seq_pos = kv->get_cells(seq).seq_pos_get(seq);

                auto it = seq_pos.lower_bound({ pos, 0 });
                if (it != seq_pos.begin()) {
                    prev = (int32_t) std::prev(it)->second;
                }

                // every occupied cell is below n_kv (get_n_kv covers used_max_p1)
                GGML_ASSERT(prev < (int32_t) n_kv);
            }

            data[5*j + 0] = (int32_t) ii;
            data[5*j + 1] = (int32_t) strm;
            data[5*j + 2] = (int32_t) sinfo.idxs[strm][ii];
            data[5*j + 3] = prev;
            data[5*j + 4] = ks->paused ? (int32_t) ks->n_slot : seq;
        }

        if (in_graph) {
            ggml_backend_tensor_set(part.ids, data.data(), 0, ggml_nbytes(part.ids));
        }
        for (const composed_node & node : composed) {
            if (node.part == ip) {
                node.graph->fill(data.data());
            }
        }
    }

    if (ks->paused) {
        return;
    }

    for (size_t g = 0; g < groups.size(); ++g) {
        for (const column & col : outputs[g]) {
            ks->mark_used(col.seq);

            col_seq[g].push_back(col.seq);
            col_pos[g].push_back(ubatch->pos[col.i]);
        }
    }
}

bool llm_graph_input_kvsmooth::can_reuse(const llm_graph_params & params) {
    sched = params.sched;

    if (params.kvsmooth != ks) {
        return false;
    }

    const std::vector<llama_kvsmooth::group> groups_new = ks->groups_of(params.ubatch);

    if (groups_new.size() != groups.size()) {
        return false;
    }
    for (size_t g = 0; g < groups.size(); ++g) {
        if (!llama_kvsmooth_same_setting(groups[g].setting, groups_new[g].setting) || groups[g].n_tokens != groups_new[g].n_tokens) {
            return false;
        }
        // the composed path's rounds follow which columns share a sequence
        if (ks->composed && groups[g].seq_counts != groups_new[g].seq_counts) {
            return false;
        }
    }
    if (ks->composed && paused != ks->paused) {
        return false;
    }

    const std::vector<const llama_kv_cache_context *> mctxs = llama_kvsmooth_contexts_of(params.mctx);

    for (cache_ids & part : parts) {
        auto it = std::find_if(mctxs.begin(), mctxs.end(), [&part](const llama_kv_cache_context * mctx) {
            return mctx->get_kv() == part.mctx->get_kv();
        });

        if (it == mctxs.end()) {
            return false;
        }

        part.mctx = *it;
    }

    return true;
}

size_t llm_graph_input_kvsmooth::part_of(const ggml_tensor * ids) const {
    for (size_t ip = 0; ip < parts.size(); ++ip) {
        if (parts[ip].ids == ids) {
            return ip;
        }
    }
    GGML_ABORT("kvsmooth: ids tensor of no part");
}

ggml_tensor * llm_graph_input_kvsmooth::get_ids(ggml_context * ctx0, const llama_kv_cache_context * mctx_cur, size_t g) {
    for (const cache_ids & part : parts) {
        if (part.group == g && part.mctx->get_kv() == mctx_cur->get_kv()) {
            return part.ids;
        }
    }

    ggml_tensor * ids = ggml_new_tensor_2d(ctx0, GGML_TYPE_I32, 5, groups[g].n_tokens);
    ggml_set_input(ids);
    ggml_format_name(ids, "kvsmooth_ids-%zu", parts.size());

    parts.push_back({ mctx_cur, g, ids });

    return ids;
}

void llm_graph_input_kvsmooth::read_trace() {
    if (results.empty() || ks->paused) {
        return;
    }

    // the only synchronisation KVSmooth adds to a step, and only with tracing on
    ggml_backend_sched_synchronize(sched);

    std::vector<llama_kvsmooth_trace_record> recs;

    for (size_t g = 0; g < groups.size(); ++g) {
        const size_t n = col_seq[g].size();
        if (n == 0) {
            continue;
        }

        std::vector<std::pair<int32_t, std::vector<float>>> data;

        for (const result & r : results) {
            if (r.group != g) {
                continue;
            }

            GGML_ASSERT((size_t) r.t->ne[1] == n);

            std::vector<float> d(4*n);
            ggml_backend_tensor_get(r.t, d.data(), 0, 4*n*sizeof(float));
            data.emplace_back(r.layer, std::move(d));
        }

        for (size_t j = 0; j < n; ++j) {
            for (const auto & [layer, d] : data) {
                const float * r = d.data() + 4*j;

                llama_kvsmooth_trace_record rec;
                rec.seq_id  = col_seq[g][j];
                rec.pos     = col_pos[g][j];
                rec.layer   = layer;
                rec.z       = r[0];
                rec.lambda  = r[1];
                rec.rank    = (int32_t) r[2];
                rec.applied = r[3] != 0.0f;

                recs.push_back(rec);
            }
        }
    }

    // by token (sequence, position), then layer, whatever the groups
    std::stable_sort(recs.begin(), recs.end(), [](const llama_kvsmooth_trace_record & a, const llama_kvsmooth_trace_record & b) {
        return a.seq_id != b.seq_id ? a.seq_id < b.seq_id : a.pos < b.pos;
    });

    ks->trace.insert(ks->trace.end(), recs.begin(), recs.end());
}

//
// graph
//

// the graph's KVSmooth input, created by the first smoothed layer: it takes part in every graph while
// KVSmooth is on, op nodes or not, since its set_input also sees the prompt tokens that reset the queues
static llm_graph_input_kvsmooth * kvsmooth_input(
        llm_graph_input_kvsmooth *& inp, llm_graph_result * res, llama_kvsmooth * ks, ggml_backend_sched_t sched, const llama_ubatch & ubatch) {
    if (inp == nullptr) {
        auto inp_ks = std::make_unique<llm_graph_input_kvsmooth>(ks, sched, ks->groups_of(ubatch));

        inp = (llm_graph_input_kvsmooth *) res->add_input(std::move(inp_ks));
    }
    return inp;
}

bool llm_graph_context::kvsmooth_wants_entropy(int il) const {
    ggml_tensor * state = kvsmooth ? kvsmooth->get_state(il) : nullptr;
    if (state == nullptr || kvsmooth->composed || !cparams.flash_attn) {
        return false;
    }

    // a ubatch without generation-step tokens (a prompt chunk) runs plain flash attention
    if (kvsmooth_input(inp_kvsmooth, res, kvsmooth, sched, ubatch)->groups.empty()) {
        return false;
    }

    // the layer's cache, and so its attention, is in memory the CPU backend reads: the one backend whose
    // flash-attention kernel has the side output (the others refuse it in supports_op, and a cache on a
    // device keeps the op's recompute there). The state lives in the buffer type of the layer's K cache.
    return backend_cpu != nullptr && ggml_backend_supports_buft(backend_cpu, ggml_backend_buffer_get_type(state->buffer));
}

void llm_graph_context::build_kvsmooth(
        const llama_kv_cache_context * mctx_cur,
        ggml_tensor * kq_mask,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * v,
        ggml_tensor * kq,
        ggml_tensor * ent,
        ggml_tensor * sinks,
        ggml_tensor * kqv_out,
              float   kq_scale,
                int   il) const {
    GGML_ASSERT(kvsmooth != nullptr);

    kvsmooth_input(inp_kvsmooth, res, kvsmooth, sched, ubatch);

    ggml_tensor * state = kvsmooth->get_state(il);

    if (state == nullptr) {
        return;
    }

    const auto & p = kvsmooth->params;

    const bool v_trans = v->nb[1] > v->nb[2];

    // the groups' result rows, one after the other in the layer's result tensor
    ggml_tensor * result  = kvsmooth->get_result(il);
    int64_t       row_off = 0;

    for (size_t g = 0; g < inp_kvsmooth->groups.size(); ++g) {
        const llama_kvsmooth_seq_params & setting = inp_kvsmooth->groups[g].setting;

        ggml_tensor * ids = inp_kvsmooth->get_ids(ctx0, mctx_cur, g);

        const auto mode = (ggml_kvsmooth_mode) setting.mode;

        ggml_tensor * cur;

        if (kvsmooth->composed && inp_kvsmooth->paused) {
            // nothing is blended and the scratch slot's queue is never read: no nodes
            continue;
        }
        if (kvsmooth->composed) {
            // stock ops (SPEC §4.2); the attention that reads the raw rows is in the graph first
            ggml_build_forward_expand(gf, kqv_out);

            kvsmooth_composed_args a;
            a.kq            = kq;
            a.q             = kq ? nullptr : q;
            a.mask          = kq ? nullptr : kq_mask;
            a.sinks         = kq ? nullptr : sinks;
            a.k             = k;
            a.v             = v;
            a.state         = state;
            a.scale         = kq_scale;
            a.max_bias      = hparams.f_max_alibi_bias;
            a.logit_softcap = hparams.attn_soft_cap ? hparams.f_attn_logit_softcapping : 0.0f;
            a.lambda_ref    = setting.lambda_ref;
            a.window        = setting.window;
            a.eps           = p.eps;
            a.queue         = p.queue;
            a.mode          = mode;
            a.v_trans       = v_trans;

            // the columns of one sequence are consecutive (set_input orders them by sequence)
            std::vector<int32_t> col_seq;
            for (size_t is = 0; is < inp_kvsmooth->groups[g].seq_counts.size(); ++is) {
                col_seq.insert(col_seq.end(), inp_kvsmooth->groups[g].seq_counts[is], (int32_t) is);
            }

            auto graph = std::make_unique<kvsmooth_composed>();
            cur = graph->build(ctx0, gf, a, kvsmooth_composed::rounds_of(col_seq));

            inp_kvsmooth->composed.push_back({ inp_kvsmooth->part_of(ids), std::move(graph) });
        } else {
            // the group's result rows; check_batch refuses a decode with more columns than there are rows
            const int64_t n_cols = inp_kvsmooth->groups[g].n_tokens;
            GGML_ASSERT(row_off + n_cols <= result->ne[1]);
            ggml_tensor * res_g = ggml_view_2d(ctx0, result, 4, n_cols, result->nb[1], row_off*result->nb[1]);
            row_off += n_cols;

            if (kq) {
                cur = ggml_kvsmooth(ctx0, res_g, kq, k, v, ids, state, kqv_out,
                        setting.lambda_ref, setting.window, p.queue, p.eps, mode, v_trans);
            } else if (ent) {
                // flash attention gave the row entropies: nothing to recompute
                cur = ggml_kvsmooth_from_entropies(ctx0, res_g, ent, k, v, ids, state, kqv_out,
                        setting.lambda_ref, setting.window, p.queue, mode, v_trans);
            } else {
                // flash attention: the op recomputes the scores of the smoothed rows as ggml_flash_attn_ext does
                cur = ggml_kvsmooth_ext(ctx0, res_g, q, k, v, kq_mask, ids, state, kqv_out,
                        kq_scale, hparams.f_max_alibi_bias, hparams.attn_soft_cap ? hparams.f_attn_logit_softcapping : 0.0f,
                        setting.lambda_ref, setting.window, p.queue, p.eps, mode, v_trans);
                ggml_kvsmooth_add_sinks(cur, sinks);
            }
        }

        cb(cur, "kvsmooth", il);

        // the op's result is a view of the layer's result rows, in the buffer of its state and K cache:
        // the scheduler runs it on the backend of that buffer, which writes the cache rows and the state
        // in place (the composed path's set_rows write into views of those buffers likewise)
        if (p.trace && kvsmooth->composed) {
            ggml_set_output(cur);
        }

        ggml_build_forward_expand(gf, cur);

        inp_kvsmooth->results.push_back({ il, g, cur });
    }
}

//
// C API
//

struct llama_kvsmooth_params llama_kvsmooth_default_params(void) {
    llama_kvsmooth_params result = {
        /*.lambda_ref  =*/ 0.9f,
        /*.window      =*/ 0.2f,
        /*.queue       =*/ 15,
        /*.layer_start =*/ -1,
        /*.layer_end   =*/ -1,
        /*.eps         =*/ 1e-10f,
        /*.mode        =*/ LLAMA_KVSMOOTH_MODE_ADAPTIVE,
        /*.trace       =*/ false,
        /*.impl        =*/ LLAMA_KVSMOOTH_IMPL_AUTO,
    };

    return result;
}

int32_t llama_kvsmooth_set(llama_context * ctx, const llama_kvsmooth_params * params) {
    if (ctx == nullptr || params == nullptr) {
        LLAMA_LOG_ERROR("%s: ctx and params must not be NULL\n", __func__);
        if (ctx) {
            ctx->kvsmooth_error = "params must not be NULL";
        }
        return LLAMA_KVSMOOTH_ERR_INVALID_PARAM;
    }

    int32_t err = 0;

    std::unique_ptr<llama_kvsmooth> ks = llama_kvsmooth::create(*ctx, *params, &err, &ctx->kvsmooth_error);
    if (!ks) {
        return err;
    }

    // the previous state stops observing the cache when it is destroyed here
    ctx->kvsmooth_attach(std::move(ks));
    ctx->get_kvsmooth()->connect();

    return 0;
}

void llama_kvsmooth_disable(llama_context * ctx) {
    if (ctx->get_kvsmooth()) {
        ctx->kvsmooth_attach(nullptr);
    }
}

bool llama_kvsmooth_enabled(const llama_context * ctx) {
    return ctx->get_kvsmooth() != nullptr;
}

bool llama_kvsmooth_get_params(const llama_context * ctx, llama_kvsmooth_params * out) {
    const llama_kvsmooth * ks = ctx->get_kvsmooth();
    if (ks == nullptr) {
        return false;
    }

    *out = ks->params;

    return true;
}

int32_t llama_kvsmooth_set_seq(llama_context * ctx, llama_seq_id seq_id, const llama_kvsmooth_seq_params * params) {
    llama_kvsmooth * ks = ctx->get_kvsmooth();

    const auto fail = [ctx](const std::string & text) {
        LLAMA_LOG_ERROR("llama_kvsmooth_set_seq: %s\n", text.c_str());
        ctx->kvsmooth_error = text;
        return LLAMA_KVSMOOTH_ERR_INVALID_PARAM;
    };

    if (ks == nullptr) {
        return fail("KVSmooth is not enabled on this context: call llama_kvsmooth_set first");
    }
    if (seq_id < 0 || (uint32_t) seq_id >= ks->n_slot) {
        return fail("invalid seq_id = " + std::to_string(seq_id) + ": allowed values are [0, n_seq_max = " + std::to_string(ks->n_slot) + ")");
    }

    llama_kvsmooth_seq_params setting { true, ks->params.lambda_ref, ks->params.window, ks->params.mode };

    if (params) {
        setting = *params;

        // the same checks as llama_kvsmooth_set, for the fields a sequence may choose
        llama_kvsmooth_params full = ks->params;
        full.lambda_ref = setting.lambda_ref;
        full.window     = setting.window;
        full.mode       = setting.mode;

        int32_t err = 0;
        if (setting.enabled && !llama_kvsmooth_check_params(full, &err, &ctx->kvsmooth_error)) {
            return err;
        }
    }

    ks->set_seq_setting(seq_id, setting);
    ctx->kvsmooth_error.clear();

    return 0;
}

bool llama_kvsmooth_get_seq(const llama_context * ctx, llama_seq_id seq_id, llama_kvsmooth_seq_params * out) {
    const llama_kvsmooth * ks = ctx->get_kvsmooth();
    if (ks == nullptr || seq_id < 0 || (uint32_t) seq_id >= ks->n_slot || out == nullptr) {
        return false;
    }

    *out = ks->seq_setting(seq_id);

    return true;
}

void llama_kvsmooth_pause(llama_context * ctx, bool paused) {
    ctx->kvsmooth_paused = paused;
}

bool llama_kvsmooth_paused(const llama_context * ctx) {
    return ctx->kvsmooth_paused;
}

const char * llama_kvsmooth_last_error(const llama_context * ctx) {
    return ctx->kvsmooth_error.c_str();
}

void llama_kvsmooth_reset(llama_context * ctx, llama_seq_id seq_id) {
    llama_kvsmooth * ks = ctx->get_kvsmooth();
    if (ks) {
        ks->reset(seq_id);
    }
}

int32_t llama_kvsmooth_trace_n(const llama_context * ctx) {
    const llama_kvsmooth * ks = ctx->get_kvsmooth();

    return ks ? (int32_t) ks->trace.size() : 0;
}

bool llama_kvsmooth_trace_get(const llama_context * ctx, int32_t i, llama_kvsmooth_trace_record * out) {
    const llama_kvsmooth * ks = ctx->get_kvsmooth();
    if (ks == nullptr || i < 0 || (size_t) i >= ks->trace.size() || out == nullptr) {
        return false;
    }

    *out = ks->trace[i];

    return true;
}

const char * llama_kvsmooth_build_info(void) {
    return "pykvsmooth " LLAMA_KVSMOOTH_VERSION " (llama.cpp " LLAMA_KVSMOOTH_UPSTREAM ")";
}
