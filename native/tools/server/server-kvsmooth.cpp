#include "server-kvsmooth.h"

#include "server-task.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

static const char * const REQUEST_FIELDS = "lambda_ref, window, mode";

static const char * mode_name(enum llama_kvsmooth_mode mode) {
    switch (mode) {
        case LLAMA_KVSMOOTH_MODE_ADAPTIVE: return "adaptive";
        case LLAMA_KVSMOOTH_MODE_FIXED:    return "fixed";
        case LLAMA_KVSMOOTH_MODE_KEYS:     return "keys";
    }
    return "adaptive";
}

// floats as the decimals they were given as (0.9, not 0.8999999761581421)
static double decimal(float x) {
    return std::round((double) x * 1e6) / 1e6;
}

static float unit_number(const json & value, const char * what) {
    if (!value.is_number()) {
        throw std::invalid_argument(string_format("%s must be a number in [0, 1], got %s", what, value.dump().c_str()));
    }
    const double x = value.get<double>();
    if (!(x >= 0.0 && x <= 1.0)) {
        throw std::invalid_argument(string_format("%s must be a number in [0, 1], got %s", what, value.dump().c_str()));
    }
    return (float) x;
}

server_kvsmooth_request server_kvsmooth_parse(const json & value, const common_params & params_base) {
    server_kvsmooth_request req;
    req.given = true;

    // what `true` means: the server's setting, or the flags' values (defaults) on a server
    // started without --kvsmooth
    llama_kvsmooth_seq_params & seq = req.seq;
    seq.enabled    = true;
    seq.lambda_ref = params_base.kvsmooth.lambda_ref > 0.0f ? params_base.kvsmooth.lambda_ref
                                                            : llama_kvsmooth_default_params().lambda_ref;
    seq.window     = params_base.kvsmooth.window;
    seq.mode       = params_base.kvsmooth.mode;

    if (value.is_boolean()) {
        seq.enabled = value.get<bool>();
    } else if (value.is_number()) {
        seq.lambda_ref = unit_number(value, "a number (lambda_ref)");
        seq.enabled    = seq.lambda_ref > 0.0f;
    } else if (value.is_object()) {
        for (const auto & item : value.items()) {
            const std::string & key = item.key();
            const json & v = item.value();
            if (key == "lambda_ref") {
                seq.lambda_ref = unit_number(v, "lambda_ref");
                seq.enabled    = seq.lambda_ref > 0.0f;
            } else if (key == "window") {
                seq.window = unit_number(v, "window");
            } else if (key == "mode") {
                const std::string mode = v.is_string() ? v.get<std::string>() : "";
                if (mode == "adaptive") {
                    seq.mode = LLAMA_KVSMOOTH_MODE_ADAPTIVE;
                } else if (mode == "fixed") {
                    seq.mode = LLAMA_KVSMOOTH_MODE_FIXED;
                } else if (mode == "keys") {
                    seq.mode = LLAMA_KVSMOOTH_MODE_KEYS;
                } else {
                    throw std::invalid_argument(string_format("mode must be one of adaptive, fixed, keys, got %s", v.dump().c_str()));
                }
            } else if (key == "queue" || key == "layer_start" || key == "layer_end" || key == "eps") {
                throw std::invalid_argument(string_format(
                    "%s is set per server (--kvsmooth-queue, --kvsmooth-layers), not per request; allowed fields: %s",
                    key.c_str(), REQUEST_FIELDS));
            } else {
                throw std::invalid_argument(string_format("unknown field %s; allowed fields: %s", json(key).dump().c_str(), REQUEST_FIELDS));
            }
        }
    } else {
        throw std::invalid_argument(string_format(
            "must be false, 0, a number in [0, 1] (lambda_ref), true (the server's setting), null, "
            "or an object with any of %s; got %s", REQUEST_FIELDS, value.dump().c_str()));
    }
    return req;
}

std::string server_kvsmooth::init(llama_context * ctx, const common_params & params_base, int n_slots, bool speculative) {
    this->ctx         = ctx;
    this->speculative = speculative;
    server_enabled    = llama_kvsmooth_enabled(ctx); // common_init_from_params applied --kvsmooth
    params            = params_base.kvsmooth;
    params.trace      = false;
    if (params.lambda_ref <= 0.0f) {
        params.lambda_ref = llama_kvsmooth_default_params().lambda_ref;
    }
    if (server_enabled) {
        llama_kvsmooth_get_params(ctx, &params);
    }
    smoothed_from.assign(std::max(n_slots, 0), -1);

    if (server_enabled && speculative) {
        return "--kvsmooth cannot be combined with speculative decoding (--model-draft, --spec-type): "
               "verifying several drafted tokens of a slot at once and removing the rejected ones would "
               "not give the tokens that KVSmooth gives one step at a time";
    }
    return "";
}

std::string server_kvsmooth::launch(int slot_id, const server_kvsmooth_request & req_in, int n_prompt_tokens, bool generates) {
    if (ctx == nullptr || slot_id < 0 || slot_id >= (int) smoothed_from.size()) {
        return "";
    }
    smoothed_from[slot_id] = -1;

    server_kvsmooth_request req = req_in;
    if (!generates) {
        if (req.given && req.seq.enabled) {
            return "kvsmooth applies to completions only (the tokens a request generates)";
        }
        req.given       = true;
        req.seq.enabled = false;
    }

    const bool want = req.given ? req.seq.enabled : server_enabled;
    if (want && speculative) {
        return "kvsmooth is not available on a server with speculative decoding (--model-draft, --spec-type); "
               "send \"kvsmooth\": false or leave it out";
    }

    llama_kvsmooth_seq_params off = {};
    off.enabled    = false;
    off.lambda_ref = params.lambda_ref;
    off.window     = params.window;
    off.mode       = params.mode;

    if (!llama_kvsmooth_enabled(ctx)) {
        if (!want) {
            return ""; // nothing is smoothed anywhere
        }
        // the first request that asks for KVSmooth on a server started without --kvsmooth:
        // enable it on the context with the flags' parameters, every other slot off
        if (llama_kvsmooth_set(ctx, &params) != 0) {
            return std::string("kvsmooth: ") + llama_kvsmooth_last_error(ctx);
        }
        for (int i = 0; i < (int) smoothed_from.size(); i++) {
            if (i != slot_id) {
                llama_kvsmooth_set_seq(ctx, i, &off);
            }
        }
    }

    const llama_kvsmooth_seq_params * seq = nullptr; // the context's setting (--kvsmooth)
    if (req.given) {
        seq = req.seq.enabled ? &req.seq : &off;
    } else if (!server_enabled) {
        seq = &off;
    }
    if (llama_kvsmooth_set_seq(ctx, slot_id, seq) != 0) {
        return std::string("kvsmooth: ") + llama_kvsmooth_last_error(ctx);
    }
    if (want) {
        // the final prompt token and everything generated after it (SPEC §2)
        smoothed_from[slot_id] = std::max(0, n_prompt_tokens - 1);
    }
    return "";
}

void server_kvsmooth::release(int slot_id, server_prompt & prompt) {
    if (ctx == nullptr || slot_id < 0 || slot_id >= (int) smoothed_from.size()) {
        return;
    }
    const int from = smoothed_from[slot_id];
    smoothed_from[slot_id] = -1;
    if (from < 0 || (size_t) from >= prompt.tokens.size()) {
        return; // nothing smoothed was stored (off, or released before the end of the prompt)
    }

    llama_memory_t mem = llama_get_memory(ctx);
    const llama_pos p0 = prompt.tokens.pos_next(from);
    bool kept = from > 0 && llama_memory_seq_rm(mem, slot_id, p0, -1);
    if (kept) {
        try {
            prompt.tokens.keep_first(from);
        } catch (const std::exception &) {
            kept = false; // inside a media chunk: drop the whole prompt
        }
    }
    if (!kept) {
        llama_memory_seq_rm(mem, slot_id, -1, -1);
        prompt.clear();
        return;
    }
    prompt.checkpoints.remove_if([&](const common_prompt_checkpoint & ckpt) {
        return ckpt.pos_max >= p0 || ckpt.n_tokens > from;
    });
}

void server_kvsmooth::shift(int slot_id, int n_keep, int n_discard) {
    if (ctx == nullptr || slot_id < 0 || slot_id >= (int) smoothed_from.size()) {
        return;
    }
    // SPEC §2: the cells were removed, the queues start again
    if (llama_kvsmooth_enabled(ctx)) {
        llama_kvsmooth_reset(ctx, slot_id);
    }
    int & from = smoothed_from[slot_id];
    if (from >= n_keep + n_discard) {
        from -= n_discard;
    } else if (from >= n_keep) {
        from = n_keep;
    }
}

json server_kvsmooth_props(const common_params & params_base) {
    // from the flags (this is answered while the model sleeps, too); layers -1: the default
    // range [3, n_layer - 1)
    const llama_kvsmooth_params & p = params_base.kvsmooth;
    return json {
        {"enabled",     params_base.kvsmooth_enabled},
        {"lambda_ref",  decimal(p.lambda_ref > 0.0f ? p.lambda_ref : llama_kvsmooth_default_params().lambda_ref)},
        {"window",      decimal(p.window)},
        {"mode",        mode_name(p.mode)},
        {"queue",       p.queue},
        {"layer_start", p.layer_start},
        {"layer_end",   p.layer_end},
    };
}
