#include "llama-kvsmooth.h"

#include "llama-arch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-model.h"

#include <algorithm>
#include <atomic>
#include <cmath>
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

//
// llama_kvsmooth
//

llama_kvsmooth::llama_kvsmooth(const llama_kvsmooth_params & params, llama_kv_cache * kv, uint32_t n_slot) :
    params(params),
    id([] {
        // never 0, which stands for "disabled" in llm_graph_params
        static std::atomic<uint64_t> counter { 0 };
        return ++counter;
    }()),
    n_slot(n_slot),
    kv(kv),
    src_of(n_slot),
    used(n_slot, 0) {
    for (uint32_t s = 0; s < n_slot; ++s) {
        src_of[s] = (int32_t) s;
    }
}

llama_kvsmooth::~llama_kvsmooth() {
    if (connected) {
        kv->set_seq_observer(nullptr);
    }
}

std::unique_ptr<llama_kvsmooth> llama_kvsmooth::create(
        const llama_context & lctx,
        const llama_kvsmooth_params & params_in,
        int32_t * err) {
    const auto fail = [err](int32_t code) -> std::unique_ptr<llama_kvsmooth> {
        *err = code;
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

    if (!std::isfinite(p.lambda_ref) || p.lambda_ref < 0.0f || p.lambda_ref > 1.0f) {
        LLAMA_LOG_ERROR("%s: invalid lambda_ref = %g: allowed values are [0, 1]\n", __func__, p.lambda_ref);
        return fail(LLAMA_KVSMOOTH_ERR_INVALID_PARAM);
    }
    if (!std::isfinite(p.window) || p.window < 0.0f) {
        LLAMA_LOG_ERROR("%s: invalid window = %g: allowed values are >= 0\n", __func__, p.window);
        return fail(LLAMA_KVSMOOTH_ERR_INVALID_PARAM);
    }
    if (p.queue < 1 || p.queue > GGML_KVSMOOTH_MAX_QUEUE) {
        LLAMA_LOG_ERROR("%s: invalid queue = %d: allowed values are [1, %d]\n", __func__, p.queue, GGML_KVSMOOTH_MAX_QUEUE);
        return fail(LLAMA_KVSMOOTH_ERR_INVALID_PARAM);
    }
    if (!std::isfinite(p.eps) || p.eps < 0.0f || p.eps >= 1.0f) {
        LLAMA_LOG_ERROR("%s: invalid eps = %g: allowed values are [0, 1)\n", __func__, p.eps);
        return fail(LLAMA_KVSMOOTH_ERR_INVALID_PARAM);
    }
    if (p.mode != LLAMA_KVSMOOTH_MODE_ADAPTIVE && p.mode != LLAMA_KVSMOOTH_MODE_FIXED && p.mode != LLAMA_KVSMOOTH_MODE_KEYS) {
        LLAMA_LOG_ERROR("%s: invalid mode = %d: allowed values are %d (adaptive), %d (fixed), %d (keys)\n", __func__, (int) p.mode,
                LLAMA_KVSMOOTH_MODE_ADAPTIVE, LLAMA_KVSMOOTH_MODE_FIXED, LLAMA_KVSMOOTH_MODE_KEYS);
        return fail(LLAMA_KVSMOOTH_ERR_INVALID_PARAM);
    }
    if (p.layer_start < -1 || p.layer_end < -1) {
        LLAMA_LOG_ERROR("%s: invalid layer range [%d, %d): allowed values are -1 (default) or 0 <= layer_start < layer_end <= n_layer = %d\n",
                __func__, p.layer_start, p.layer_end, n_layer);
        return fail(LLAMA_KVSMOOTH_ERR_INVALID_PARAM);
    }

    p.layer_start = p.layer_start == -1 ? LLAMA_KVSMOOTH_DEFAULT_LAYER_START : p.layer_start;
    p.layer_end   = p.layer_end   == -1 ? n_layer - 1                        : p.layer_end;

    if (p.layer_start >= p.layer_end || p.layer_end > n_layer) {
        LLAMA_LOG_ERROR("%s: invalid layer range [layer_start = %d, layer_end = %d) (from %d, %d; -1 selects [%d, n_layer - 1)): "
                "allowed values are 0 <= layer_start < layer_end <= n_layer = %d\n",
                __func__, p.layer_start, p.layer_end, params_in.layer_start, params_in.layer_end,
                LLAMA_KVSMOOTH_DEFAULT_LAYER_START, n_layer);
        return fail(LLAMA_KVSMOOTH_ERR_INVALID_PARAM);
    }

    //
    // model, memory and cache
    //

    const char * arch_name = llm_arch_name(model.arch);

    // recurrent, hybrid and sliding-window (iSWA) models have other memory modules
    auto * kv = dynamic_cast<llama_kv_cache *>(lctx.get_memory());
    if (kv == nullptr) {
        LLAMA_LOG_ERROR("%s: architecture %s is not supported: KVSmooth needs a model whose memory is a single "
                "standard KV cache (not recurrent, hybrid or sliding-window)\n", __func__, arch_name);
        return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED);
    }
    if (hparams.is_mla()) {
        LLAMA_LOG_ERROR("%s: architecture %s is not supported: multi-head latent attention (MLA) caches have no V rows\n", __func__, arch_name);
        return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED);
    }
    if (hparams.swa_type != LLAMA_SWA_TYPE_NONE) {
        LLAMA_LOG_ERROR("%s: architecture %s is not supported: sliding-window attention\n", __func__, arch_name);
        return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED);
    }
    if (cparams.training) {
        LLAMA_LOG_ERROR("%s: not supported on a training context\n", __func__);
        return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED);
    }

    const ggml_type type_k = kv->type_k();
    const ggml_type type_v = kv->type_v();

    if (!llama_kvsmooth_type_supported(type_k) || !llama_kvsmooth_type_supported(type_v)) {
        LLAMA_LOG_ERROR("%s: KV cache type K = %s, V = %s is not supported: allowed types are f32, f16, bf16, q8_0\n",
                __func__, ggml_type_name(type_k), ggml_type_name(type_v));
        return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED);
    }

    const std::vector<uint32_t> kv_layers = kv->get_layer_ids();

    for (int32_t il = p.layer_start; il < p.layer_end; ++il) {
        if (std::find(kv_layers.begin(), kv_layers.end(), (uint32_t) il) == kv_layers.end()) {
            LLAMA_LOG_ERROR("%s: invalid layer range [%d, %d): layer %d has no KV cache\n", __func__, p.layer_start, p.layer_end, il);
            return fail(LLAMA_KVSMOOTH_ERR_INVALID_PARAM);
        }
    }

    const uint32_t n_slot = cparams.n_seq_max;

    //
    // devices: the op runs where each layer's cache is, so that device must support it
    //

    {
        const uint32_t n_kv = std::min<uint32_t>(256, kv->get_size());

        llama_kv_cache::slot_info sinfo;
        sinfo.s0 = 0;
        sinfo.s1 = 0;
        sinfo.strm = { 0 };
        sinfo.idxs = { { 0 } };

        for (int32_t il = p.layer_start; il < p.layer_end; ++il) {
            ggml_init_params ip = {
                /*.mem_size   =*/ 16*ggml_tensor_overhead(),
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
                LLAMA_LOG_ERROR("%s: a %s V cache needs flash attention\n", __func__, ggml_type_name(v->type));
                return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED);
            }

            ggml_tensor * ids   = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_I32, 5, 1);
            ggml_tensor * state = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, 1 + p.queue, n_slot);
            ggml_tensor * after = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, d_v*n_head, 1);

            const auto mode = (ggml_kvsmooth_mode) p.mode;

            ggml_tensor * op;
            if (cparams.flash_attn) {
                ggml_tensor * q    = ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, d_k, n_head, 1);
                ggml_tensor * mask = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F16, n_kv, 1, 1, 1);

                op = ggml_kvsmooth_ext(ctx.get(), q, k, v, mask, ids, state, after, 1.0f, hparams.f_max_alibi_bias,
                        hparams.attn_soft_cap ? hparams.f_attn_logit_softcapping : 0.0f,
                        p.lambda_ref, p.window, p.queue, p.eps, mode, v_trans);
            } else {
                ggml_tensor * kq = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F32, n_kv, 1, n_head, 1);

                op = ggml_kvsmooth(ctx.get(), kq, k, v, ids, state, after, p.lambda_ref, p.window, p.queue, p.eps, mode, v_trans);
            }

            ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(kv->get_k_storage(il)->buffer);

            ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
            if (dev == nullptr) {
                dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
            }

            if (dev == nullptr || !ggml_backend_dev_supports_op(dev, op)) {
                LLAMA_LOG_ERROR("%s: the KV cache of layer %d is on device %s (%s), which does not support KVSmooth "
                        "(K %s, V %s%s, flash attention %s)\n", __func__, il,
                        dev ? ggml_backend_dev_name(dev) : "?", ggml_backend_buft_name(buft),
                        ggml_type_name(k->type), ggml_type_name(v->type), v_trans ? " transposed" : "",
                        cparams.flash_attn ? "on" : "off");
                return fail(LLAMA_KVSMOOTH_ERR_UNSUPPORTED);
            }
        }
    }

    //
    // state: one tensor per layer, in a buffer of the layer's K cache buffer type
    //

    std::unique_ptr<llama_kvsmooth> res(new llama_kvsmooth(p, kv, n_slot));

    res->states.assign(n_layer, nullptr);

    std::map<ggml_backend_buffer_type_t, ggml_context_ptr> ctx_map;

    for (int32_t il = p.layer_start; il < p.layer_end; ++il) {
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(kv->get_k_storage(il)->buffer);

        auto it = ctx_map.find(buft);
        if (it == ctx_map.end()) {
            ggml_init_params ip = {
                /*.mem_size   =*/ size_t(n_layer)*ggml_tensor_overhead(),
                /*.mem_buffer =*/ nullptr,
                /*.no_alloc   =*/ true,
            };
            it = ctx_map.emplace(buft, ggml_context_ptr { ggml_init(ip) }).first;
        }

        ggml_tensor * state = ggml_new_tensor_2d(it->second.get(), GGML_TYPE_F32, 1 + p.queue, n_slot);
        ggml_format_name(state, "kvsmooth_state_l%d", il);

        res->states[il] = state;
    }

    size_t total = 0;

    for (auto & [buft, ctx] : ctx_map) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft);
        if (buf == nullptr) {
            LLAMA_LOG_ERROR("%s: failed to allocate the KVSmooth state in %s\n", __func__, ggml_backend_buft_name(buft));
            return fail(LLAMA_KVSMOOTH_ERR_ALLOC);
        }

        // count = 0: every queue starts empty
        ggml_backend_buffer_clear(buf, 0);

        total += ggml_backend_buffer_get_size(buf);

        res->ctxs_bufs.emplace_back(std::move(ctx), buf);
    }

    LLAMA_LOG_INFO("%s: mode = %s, lambda_ref = %.3f, window = %.3f, queue = %d, layers = [%d, %d), eps = %g, trace = %d, "
            "%u sequences, state = %.1f KiB\n", __func__,
            llama_kvsmooth_mode_name(p.mode), p.lambda_ref, p.window, p.queue, p.layer_start, p.layer_end, p.eps, (int) p.trace,
            n_slot, total/1024.0);

    *err = 0;

    return res;
}

void llama_kvsmooth::connect() {
    kv->set_seq_observer(this);
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

void llama_kvsmooth::mark_used(llama_seq_id seq_id) {
    used[seq_id] = 1;
}

ggml_tensor * llama_kvsmooth::get_state(int32_t il) const {
    if (il < params.layer_start || il >= params.layer_end) {
        return nullptr;
    }

    return states[il];
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

void llama_kvsmooth::decode_begin() {
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

    // a token without output is a prompt token: its sequences start over (SPEC §2)
    for (uint32_t i = 0; i < ubatch->n_tokens; ++i) {
        if (!ubatch->output[i]) {
            for (int32_t j = 0; j < ubatch->n_seq_id[i]; ++j) {
                ks->reset(ubatch->seq_id[i][j]);
            }
        }
    }

    col_seq.clear();
    col_pos.clear();

    if (ids == nullptr || ids->buffer == nullptr) {
        // no op node in this graph; the resets wait for the next one
        return;
    }

    GGML_ASSERT(ggml_backend_buffer_is_host(ids->buffer));

    const llama_kv_cache            * kv    = mctx->get_kv();
    const llama_kv_cache::slot_info & sinfo = mctx->get_sinfo();

    const uint32_t n_stream = sinfo.n_stream();
    const uint32_t n_tokens = ubatch->n_tokens;
    const uint32_t n_kv     = mctx->get_n_kv();

    GGML_ASSERT(n_tokens % n_stream == 0);

    // tokens per stream: token i is the (i % n_tps)-th token of stream i / n_tps, as in the KQ mask
    const uint32_t n_tps = n_tokens/n_stream;

    struct column {
        llama_seq_id seq;
        llama_pos    pos;
        int32_t      ii;
        int32_t      strm;
        int32_t      cell;
        int32_t      prev;
    };

    std::vector<column> cols;
    cols.reserve(ids->ne[1]);

    for (uint32_t i = 0; i < n_tokens; ++i) {
        if (!ubatch->output[i]) {
            continue;
        }

        const llama_seq_id seq = ubatch->seq_id[i][0];
        const llama_pos    pos = ubatch->pos[i];

        GGML_ASSERT(seq >= 0 && (uint32_t) seq < ks->n_slot);

        const uint32_t s  = i / n_tps;
        const uint32_t ii = i % n_tps;

        // apply_ubatch() has stored this ubatch already, so an earlier token of the same ubatch counts
        const auto & seq_pos = kv->get_cells(seq).seq_pos_get(seq);

        auto it = seq_pos.lower_bound({ pos, 0 });

        int32_t prev = -1;
        if (it != seq_pos.begin()) {
            prev = (int32_t) std::prev(it)->second;
        }

        // every occupied cell is below n_kv (get_n_kv covers used_max_p1)
        GGML_ASSERT(prev < (int32_t) n_kv);

        cols.push_back({ seq, pos, (int32_t) ii, (int32_t) s, (int32_t) sinfo.idxs[s][ii], prev });
    }

    GGML_ASSERT((int64_t) cols.size() == ids->ne[1]);

    // the op updates a slot column by column: a sequence's tokens go in position order
    std::stable_sort(cols.begin(), cols.end(), [](const column & a, const column & b) {
        return a.seq != b.seq ? a.seq < b.seq : a.pos < b.pos;
    });

    ks->apply_pending(sched);

    int32_t * data = (int32_t *) ids->data;

    for (size_t j = 0; j < cols.size(); ++j) {
        const auto & c = cols[j];

        data[5*j + 0] = c.ii;
        data[5*j + 1] = c.strm;
        data[5*j + 2] = c.cell;
        data[5*j + 3] = c.prev;
        data[5*j + 4] = c.seq;

        ks->mark_used(c.seq);

        col_seq.push_back(c.seq);
        col_pos.push_back(c.pos);
    }
}

bool llm_graph_input_kvsmooth::can_reuse(const llm_graph_params & params) {
    mctx  = static_cast<const llama_kv_cache_context *>(params.mctx);
    sched = params.sched;

    return params.kvsmooth == ks;
}

void llm_graph_input_kvsmooth::read_trace() {
    if (results.empty() || col_seq.empty()) {
        return;
    }

    // the only synchronisation KVSmooth adds to a step, and only with tracing on
    ggml_backend_sched_synchronize(sched);

    const size_t n = col_seq.size();

    std::vector<std::vector<float>> data(results.size());

    for (size_t l = 0; l < results.size(); ++l) {
        ggml_tensor * t = results[l].second;

        GGML_ASSERT((size_t) t->ne[1] == n);

        data[l].resize(4*n);
        ggml_backend_tensor_get(t, data[l].data(), 0, 4*n*sizeof(float));
    }

    for (size_t j = 0; j < n; ++j) {
        for (size_t l = 0; l < results.size(); ++l) {
            const float * r = data[l].data() + 4*j;

            llama_kvsmooth_trace_record rec;
            rec.seq_id  = col_seq[j];
            rec.pos     = col_pos[j];
            rec.layer   = results[l].first;
            rec.z       = r[0];
            rec.lambda  = r[1];
            rec.rank    = (int32_t) r[2];
            rec.applied = r[3] != 0.0f;

            ks->trace.push_back(rec);
        }
    }
}

//
// graph
//

void llm_graph_context::build_kvsmooth(
        llm_graph_input_attn_kv * inp,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * v,
        ggml_tensor * kq,
        ggml_tensor * sinks,
        ggml_tensor * kqv_out,
              float   kq_scale,
                int   il) const {
    GGML_ASSERT(kvsmooth != nullptr);

    // the input takes part in every graph while KVSmooth is on, op nodes or not: its set_input also
    // sees the prompt tokens that reset the queues
    if (inp_kvsmooth == nullptr) {
        auto inp_ks = std::make_unique<llm_graph_input_kvsmooth>(kvsmooth, inp->mctx, sched);

        inp_kvsmooth = (llm_graph_input_kvsmooth *) res->add_input(std::move(inp_ks));
    }

    ggml_tensor * state = kvsmooth->get_state(il);

    if (state == nullptr || n_outputs == 0) {
        return;
    }

    if (inp_kvsmooth->ids == nullptr) {
        inp_kvsmooth->ids = ggml_new_tensor_2d(ctx0, GGML_TYPE_I32, 5, n_outputs);
        ggml_set_input(inp_kvsmooth->ids);
        cb(inp_kvsmooth->ids, "kvsmooth_ids", -1);
    }

    const auto & p = kvsmooth->params;

    const auto mode    = (ggml_kvsmooth_mode) p.mode;
    const bool v_trans = v->nb[1] > v->nb[2];

    ggml_tensor * cur;

    if (kq) {
        cur = ggml_kvsmooth(ctx0, kq, k, v, inp_kvsmooth->ids, state, kqv_out,
                p.lambda_ref, p.window, p.queue, p.eps, mode, v_trans);
    } else {
        // flash attention: the op recomputes the scores of the smoothed rows as ggml_flash_attn_ext does
        cur = ggml_kvsmooth_ext(ctx0, q, k, v, inp->get_kq_mask(), inp_kvsmooth->ids, state, kqv_out,
                kq_scale, hparams.f_max_alibi_bias, hparams.attn_soft_cap ? hparams.f_attn_logit_softcapping : 0.0f,
                p.lambda_ref, p.window, p.queue, p.eps, mode, v_trans);
        ggml_kvsmooth_add_sinks(cur, sinks);
    }

    cb(cur, "kvsmooth", il);

    if (p.trace) {
        ggml_set_output(cur);
    }

    // the op writes the cache rows and the state in place, so it must run on a backend that uses
    // their buffer directly: a copy on another backend would be updated and thrown away
    {
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(state->buffer);

        ggml_backend_t backend = nullptr;
        for (int i = 0; i < ggml_backend_sched_get_n_backends(sched); ++i) {
            ggml_backend_t b = ggml_backend_sched_get_backend(sched, i);
            if (ggml_backend_supports_buft(b, buft) && ggml_backend_supports_op(b, cur)) {
                backend = b;
                break;
            }
        }

        // llama_kvsmooth::create() checked the device
        GGML_ASSERT(backend != nullptr);

        ggml_backend_sched_set_tensor_backend(sched, cur, backend);
    }

    ggml_build_forward_expand(gf, cur);

    inp_kvsmooth->results.emplace_back(il, cur);
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
    };

    return result;
}

int32_t llama_kvsmooth_set(llama_context * ctx, const llama_kvsmooth_params * params) {
    if (ctx == nullptr || params == nullptr) {
        LLAMA_LOG_ERROR("%s: ctx and params must not be NULL\n", __func__);
        return LLAMA_KVSMOOTH_ERR_INVALID_PARAM;
    }

    int32_t err = 0;

    std::unique_ptr<llama_kvsmooth> ks = llama_kvsmooth::create(*ctx, *params, &err);
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
