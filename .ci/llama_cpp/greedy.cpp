// Greedy generation from given token ids, for checking a GGUF against transformers' greedy tokens.
// llama.cpp's own tools take a text prompt and add a BOS to it; this one takes the ids, so both sides read
// the same prompt. One prompt per stdin line (comma-separated ids); prints the generated ids, one line each.
// End-of-generation tokens are held off (as transformers' min_new_tokens and vLLM's min_tokens do): the
// comparison is over a fixed number of tokens.
// CACHE_TYPE (f16, llama.cpp's default, or f32) is the K and V cache's type: f32 keeps the check free of f16
// rounding on models whose top logits are close.
//   usage: uptrain-greedy MODEL.gguf N_CTX N_PREDICT [CACHE_TYPE] < prompts
#include "llama.h"
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

static void set_tokens(llama_batch_ext * batch, const llama_token * tokens, int32_t n, llama_pos pos_0) {
    llama_batch_ext_clear(batch);
    for (int32_t i = 0; i < n; ++i) {
        const int32_t idx = llama_batch_ext_add_token(batch, 0, tokens[i]);
        const llama_pos pos = pos_0 + i;
        llama_batch_ext_set_pos(batch, idx, &pos);
    }
    llama_batch_ext_set_output_logits(batch, n - 1, true);
}

int main(int argc, char ** argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s MODEL.gguf N_CTX N_PREDICT [f16|f32] < prompts (one line of comma-separated ids each)\n", argv[0]);
        return 2;
    }
    const int n_ctx = atoi(argv[2]);
    const int n_predict = atoi(argv[3]);
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (model == NULL) {
        fprintf(stderr, "error: unable to load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = n_ctx;
    cparams.n_batch = n_ctx;
    cparams.n_ubatch = n_ctx;
    cparams.n_threads = 1;
    if (argc == 5 && strcmp(argv[4], "f32") == 0) {
        cparams.type_k = GGML_TYPE_F32;
        cparams.type_v = GGML_TYPE_F32;
    }
    cparams.n_threads_batch = 1;
    if (const char * t = getenv("OMP_NUM_THREADS")) {
        cparams.n_threads = cparams.n_threads_batch = atoi(t) > 0 ? atoi(t) : 1;
    }
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (ctx == NULL) {
        fprintf(stderr, "error: failed to create the llama_context\n");
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    std::vector<llama_logit_bias> no_eog;
    for (llama_token t = 0; t < llama_vocab_n_tokens(vocab); ++t) {
        if (llama_vocab_is_eog(vocab, t)) {
            no_eog.push_back({t, -INFINITY});
        }
    }
    llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_logit_bias(llama_vocab_n_tokens(vocab), (int32_t) no_eog.size(), no_eog.data()));
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    std::string line;
    while (std::getline(std::cin, line)) {
        if (line.empty()) {
            continue;
        }
        std::vector<llama_token> prompt;
        std::stringstream ss(line);
        std::string item;
        while (std::getline(ss, item, ',')) {
            prompt.push_back((llama_token) atoi(item.c_str()));
        }
        if ((int) prompt.size() + n_predict > n_ctx) {
            fprintf(stderr, "error: %zu prompt tokens + %d new ones exceed n_ctx %d\n", prompt.size(), n_predict, n_ctx);
            return 1;
        }
        llama_memory_clear(llama_get_memory(ctx), true);
        llama_sampler_reset(smpl);
        set_tokens(batch, prompt.data(), (int32_t) prompt.size(), 0);
        llama_pos n_pos = (llama_pos) prompt.size();
        for (int i = 0; i < n_predict; ++i) {
            if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) {
                fprintf(stderr, "error: llama_process failed\n");
                return 1;
            }
            llama_token id = llama_sampler_sample(smpl, ctx, -1);
            printf(i ? " %d" : "%d", id);
            set_tokens(batch, &id, 1, n_pos++);
        }
        printf("\n");
        fflush(stdout);
    }
    llama_batch_ext_free(batch);
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
