#pragma once

// KVSmooth in llama-server: the `kvsmooth` field of completion requests, the per-slot
// settings (llama_kvsmooth_set_seq) and SPEC §2's rule that a slot's cells that hold
// smoothed K/V (its final prompt token and its answer) are never reused as prompt cells.

#include "server-common.h"

#include "llama.h"

#include <string>
#include <vector>

struct common_params;
struct server_prompt;

// a request's `kvsmooth` field, resolved against the server's setting by the schema
struct server_kvsmooth_request {
    bool given = false;                  // false: the field was absent or null (the server's setting)
    llama_kvsmooth_seq_params seq = {};  // when given
};

// parse the field's value: false/0 = off, a number in (0, 1] = lambda_ref, true = the server's
// setting (its flags' values when it was started without --kvsmooth), or an object with any of
// lambda_ref, window, mode; throws std::invalid_argument naming the problem
server_kvsmooth_request server_kvsmooth_parse(const json & value, const common_params & params_base);

// the server's setting (its flags), for /props
json server_kvsmooth_props(const common_params & params_base);

class server_kvsmooth {
public:
    // after the context and the speculative decoding context are made; returns "" or the
    // reason the server cannot start (it then exits with that message)
    std::string init(llama_context * ctx, const common_params & params_base, int n_slots, bool speculative);

    // when a task is launched on a slot: apply the request's setting to the slot's sequence
    // (enabling KVSmooth on the context the first time a request asks for it on a server
    // started without --kvsmooth) and remember that tokens from n_prompt_tokens - 1 on are
    // smoothed; a task that generates nothing (embeddings, rerank) runs with the slot off;
    // returns "" or an error for the client (the task is then refused with 400)
    std::string launch(int slot_id, const server_kvsmooth_request & req, int n_prompt_tokens, bool generates);

    // when the slot is released: drop its smoothed cells (and the tokens that name them)
    // from the slot's cache, so that the next request re-evaluates them as prompt tokens
    void release(int slot_id, server_prompt & prompt);

    // after a context shift of the slot's sequence (n_discard tokens removed after n_keep)
    void shift(int slot_id, int n_keep, int n_discard);

private:
    llama_context * ctx = nullptr;
    bool speculative = false;
    bool server_enabled = false;          // started with --kvsmooth
    llama_kvsmooth_params params = {};    // the context's parameters (the flags)
    std::vector<int> smoothed_from;       // per slot: index of its first smoothed token, -1: none
};
