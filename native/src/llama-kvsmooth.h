#pragma once

// KVSmooth (arXiv 2602.04268) in llama.cpp: the per-context state, the graph input that tells the op
// which tokens to smooth, and the trace. The op itself is GGML_OP_KVSMOOTH (ggml.h); the contract is
// SPEC.md, the layouts are docs/design.md.

#include "llama.h"
#include "llama-graph.h"
#include "llama-kv-cache.h"
#include "llama-kvsmooth-composed.h"

#include "ggml-cpp.h"

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

struct llama_context;

// The KVSmooth state of one context.
//
// The smoothed layers write one or two KV caches: the model's single cache, the attention cache of a
// hybrid memory (recurrent or convolution layers have no KV cells and are never smoothed), or the base
// and sliding-window caches of an iSWA memory (SPEC §4.1). A layer is smoothed when it is in the
// configured range and owns K/V cells in one of them; layers that reuse another layer's cells (Gemma 3n)
// or have none are left alone.
//
// Per smoothed layer an f32 tensor [1 + M, n_slot + 1] holds, per sequence (slot = seq_id), the number of
// queued entropies and the queue, oldest first; the last column is a scratch slot that absorbs the
// output tokens of a paused decode (llama_kvsmooth_pause) without touching any sequence's queue. The
// tensor lives in a buffer of the buffer type of the layer's K cache, so the op runs on the device that
// holds the cache and updates both in place.
//
// The queues follow the KV caches (SPEC §2, "S(l, s) starts empty for every new prompt of s"):
//  - each cache reports seq_rm / clear / seq_keep / state loads (emptied) and seq_cp (copied) through
//    llama_kv_cache::seq_observer; a sliding-window cache dropping cells that left the window is not a
//    sequence edit and reports nothing;
//  - a ubatch token without output is a prompt token, so its sequences start over, and so are all
//    tokens of a paused decode;
//  - llama_kvsmooth_reset() empties them explicitly.
// These edits are recorded on the host and applied to the device tensors just before the next op runs
// (apply_pending), with one synchronisation, and only when a queue that may hold values changes. A
// plain generation step costs no synchronisation.
struct llama_kvsmooth : public llama_kv_cache::seq_observer {
    // validates params against the context (model, memory, cache types, devices) and allocates the
    // state; on failure logs the reason, stores it in *msg, sets *err to a LLAMA_KVSMOOTH_ERR_* code
    // and returns nullptr
    static std::unique_ptr<llama_kvsmooth> create(
            const llama_context & lctx,
            const llama_kvsmooth_params & params,
            int32_t * err,
            std::string * msg);

    ~llama_kvsmooth() override;

    // start following the sequence edits of the KV caches (once the object is attached to the context)
    void connect();

    // llama_kv_cache::seq_observer
    void on_seq_rm  (llama_seq_id seq_id) override;
    void on_seq_cp  (llama_seq_id seq_id_src, llama_seq_id seq_id_dst) override;
    void on_seq_keep(llama_seq_id seq_id) override;

    // empty the queues of seq_id (-1: of every sequence) before its next smoothed token
    void reset(llama_seq_id seq_id);

    // the state tensor of layer il, nullptr if il is not smoothed
    ggml_tensor * get_state(int32_t il) const;

    // f32 [4, max_columns] beside it: the op's result rows (z, lambda, rank, applied) of the last ubatch
    ggml_tensor * get_result(int32_t il) const;

    // llama_context::decode: a new trace per decode, filled after each ubatch; paused: no token of this
    // decode is smoothed
    void decode_begin(bool paused);
    void ubatch_done();

    // bring the state tensors up to date with the recorded edits; called before a graph with op
    // nodes runs. sched: to wait for the previous graph, which may still update the state
    void apply_pending(ggml_backend_sched_t sched);

    // the slot of seq_id received a smoothed token: its queues may now hold values
    void mark_used(llama_seq_id seq_id);

    // "" if this batch can be smoothed, else why not; after decode_begin
    std::string check_batch(const llama_batch & batch) const;

    // the ubatch size to split this batch with: several output tokens of one sequence are smoothed one
    // at a time (SPEC §2), each attending to the earlier ones' smoothed cells, so no ubatch may hold two
    // of them; n_ubatch when none does
    uint32_t n_ubatch_for(const llama_batch & batch, uint32_t n_ubatch) const;

    // graph nodes the composed path adds to a graph of n_tokens tokens, at most (0 when fused)
    size_t graph_nodes(uint32_t n_tokens) const;

    // the setting of seq_id's tokens (llama_kvsmooth_set_seq; the context's by default)
    const llama_kvsmooth_seq_params & seq_setting(llama_seq_id seq_id) const { return seq_params[seq_id]; }
    void set_seq_setting(llama_seq_id seq_id, const llama_kvsmooth_seq_params & setting);

    // The op nodes a ubatch needs in each smoothed layer: one per distinct setting among the sequences of
    // its generation-step tokens (disabled sequences have none), ordered by their lowest sequence id,
    // each with its number of tokens. Part of the graph's topology, so can_reuse compares it.
    struct group {
        llama_kvsmooth_seq_params setting;
        int64_t                   n_tokens;
        std::vector<int64_t>      seq_counts; // tokens of each of its sequences, in order
    };
    std::vector<group> groups_of(const llama_ubatch & ubatch) const;

    // the group of seq_id in groups, -1 if its tokens are not smoothed
    static int32_t group_index(const std::vector<group> & groups, const llama_kvsmooth_seq_params & setting);

    const llama_kvsmooth_params params;  // layer range resolved
    const uint64_t              id;      // unique per configuration, part of the graph reuse key
    const uint32_t              n_slot;  // sequence slots (n_seq_max); state column n_slot is the scratch slot
    const bool                  composed; // the computation is built from stock ops (params.impl resolved)
    const bool                  split_simple; // the memory cuts a batch into consecutive ubatches (one KV stream, no recurrent part)
    const uint32_t              max_columns;  // (output token, sequence) pairs a decode may smooth: n_ubatch + n_slot

    // the caches whose cells are smoothed
    const std::vector<llama_kv_cache *> caches;

    // the current decode is paused (decode_begin)
    bool paused = false;

    // the kvsmooth input of the graph that was set up last, for the trace
    llm_graph_input_kvsmooth * cur_input = nullptr;

    std::vector<llama_kvsmooth_trace_record> trace;

private:
    llama_kvsmooth(const llama_kvsmooth_params & params, std::vector<llama_kv_cache *> caches, uint32_t n_slot, bool composed, bool split_simple,
            uint32_t max_columns);

    std::vector<ggml_tensor *> states;  // [n_layer], nullptr for layers that are not smoothed
    std::vector<ggml_tensor *> results; // [n_layer], likewise

    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> ctxs_bufs;

    // the recorded edits, composed: src_of[s] == s: unchanged, -1: emptied, t: a copy of slot t as it
    // is on the device now. composing keeps the record bounded and the order of edits exact
    std::vector<int32_t> src_of;
    bool pending = false;

    // used[s]: the device column of slot s may hold values (false: its count is known to be 0)
    std::vector<uint8_t> used;

    std::vector<llama_kvsmooth_seq_params> seq_params; // [n_slot]

    bool connected = false;
};

// Per ubatch: which tokens are smoothed, in which cells, and the previous cell of each.
//
// The generation-step tokens of SPEC §2 are the ubatch tokens with output requested. They are grouped by
// their sequence's setting (llama_kvsmooth::groups_of): each group is one op node per layer with its own
// lambda_ref, window and mode. For each token of a group, in the order (sequence, position), column j of
// the group's ids for a cache is (index in its stream, stream, cell, previous cell or -1, slot = seq_id).
// The previous cell holds the sequence's greatest position below the token's in that cache (pos - 1 for
// ordinary positions; M-RoPE caches store the sequential position, dimension 0), read from the cache's
// cell metadata on the host: set_input costs no device synchronisation. A token that belongs to several
// sequences is a column of each (its entropy enters each queue); only the column of its lowest smoothed
// sequence has the previous cell, so its one cell is blended once. Several output tokens of one sequence
// never share a ubatch (llama_kvsmooth::n_ubatch_for). In a paused decode every column goes to the
// scratch slot with no previous cell: nothing is blended.
//
// One ids tensor per (KV cache, group): iSWA memory has two caches with their own cells; the columns of
// a group are the same tokens in the same order in each, so every layer's result column j of a group is
// the same token.
class llm_graph_input_kvsmooth : public llm_graph_input_i {
public:
    llm_graph_input_kvsmooth(
            llama_kvsmooth * ks,
            ggml_backend_sched_t sched,
            std::vector<llama_kvsmooth::group> groups) : ks(ks), sched(sched), groups(std::move(groups)), paused(ks->paused) {}

    ~llm_graph_input_kvsmooth() = default;

    void set_input(const llama_ubatch * ubatch) override;

    // the configuration is compared through llm_graph_params::kvsmooth_id and the groups (settings and
    // token counts) here; the cache contexts are taken from the new memory context
    bool can_reuse(const llm_graph_params & params) override;

    // copy the op results of the graph that just ran into ks->trace
    void read_trace();

    // the ids of group g in the layers whose cache mctx_cur is a context of, created on first use
    ggml_tensor * get_ids(ggml_context * ctx0, const llama_kv_cache_context * mctx_cur, size_t g);

    struct cache_ids {
        const llama_kv_cache_context * mctx;
        size_t                         group;
        ggml_tensor                  * ids; // I32 [5, groups[group].n_tokens]
    };

    struct result {
        int32_t       layer;
        size_t        group;
        ggml_tensor * t;     // F32 [4, groups[group].n_tokens]
    };

    std::vector<cache_ids> parts;

    // the index of the part whose ids tensor this is
    size_t part_of(const ggml_tensor * ids) const;

    // composed path (llama_kvsmooth::composed): one node per (layer, group), filled from its part's ids
    struct composed_node {
        size_t                              part;
        std::unique_ptr<kvsmooth_composed> graph;
    };

    std::vector<composed_node> composed;

    std::vector<result> results;

    llama_kvsmooth * ks;

    ggml_backend_sched_t sched;

    const std::vector<llama_kvsmooth::group> groups;

    // built for a paused decode: the composed path then has no nodes (a paused decode blends nothing)
    const bool paused;

    // sequence and position of each column of each group's ids, as of the last set_input; empty when paused
    std::vector<std::vector<llama_seq_id>> col_seq;
    std::vector<std::vector<llama_pos>>    col_pos;
};
