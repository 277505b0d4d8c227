// kimi-logits: the logits llama.cpp computes for given token ids, for comparing with kimi-desk's engine
// on exactly the same ids (no tokenizer involved).
//
// Usage: kimi-logits MODEL.gguf TOKENS.i32 OUT.f32 [--threads N] [--batch N] [--prefill K]
//   TOKENS.i32  token ids, int32 little-endian, one sequence
//   OUT.f32     float32 logits [n_tokens, n_vocab], row t = the distribution after token t
//   --batch N   tokens per llama_decode call (default 512); the context is sized to the sequence
//   --prefill K the first K tokens in batches, the rest one token per call (llama.cpp's recurrent
//               decode path instead of its chunked one); default: all tokens in batches
// Built by build.sh beside llama.cpp's tools (linked to the libllama it builds).

#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

static void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN) {
        fputs(text, stderr);
    }
}

static std::vector<int32_t> read_tokens(const char * path) {
    FILE * f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "kimi-logits: cannot open %s\n", path);
        exit(1);
    }
    std::vector<int32_t> ids;
    int32_t id;
    while (fread(&id, sizeof id, 1, f) == 1) {
        ids.push_back(id);
    }
    fclose(f);
    return ids;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: kimi-logits MODEL.gguf TOKENS.i32 OUT.f32 [--threads N] [--batch N] [--prefill K]\n");
        return 2;
    }
    int threads = 2, batch_size = 512, prefill = -1;
    for (int i = 4; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--batch")) batch_size = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--prefill")) prefill = atoi(argv[i + 1]);
        else { fprintf(stderr, "kimi-logits: unknown option %s\n", argv[i]); return 2; }
    }
    const std::vector<int32_t> ids = read_tokens(argv[2]);
    const int n = (int) ids.size();
    if (n == 0) { fprintf(stderr, "kimi-logits: no tokens in %s\n", argv[2]); return 1; }
    if (prefill < 0 || prefill > n) prefill = n;

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params mparams = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) { fprintf(stderr, "kimi-logits: cannot load %s\n", argv[1]); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    for (int32_t id : ids) {
        if (id < 0 || id >= n_vocab) { fprintf(stderr, "kimi-logits: token %d outside the vocabulary\n", id); return 1; }
    }

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = n + 16;
    cparams.n_batch = batch_size;
    cparams.n_ubatch = batch_size;
    cparams.n_threads = threads;
    cparams.n_threads_batch = threads;
    cparams.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) { fprintf(stderr, "kimi-logits: cannot create a context\n"); return 1; }

    FILE * out = fopen(argv[3], "wb");
    if (!out) { fprintf(stderr, "kimi-logits: cannot write %s\n", argv[3]); return 1; }
    llama_batch batch = llama_batch_init(batch_size, 0, 1);
    int pos = 0;
    while (pos < n) {
        const int step = pos < prefill ? std::min(batch_size, prefill - pos) : 1;
        batch.n_tokens = step;
        for (int j = 0; j < step; ++j) {
            batch.token[j] = ids[pos + j];
            batch.pos[j] = pos + j;
            batch.n_seq_id[j] = 1;
            batch.seq_id[j][0] = 0;
            batch.logits[j] = 1;
        }
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "kimi-logits: llama_decode failed at %d\n", pos); return 1; }
        for (int j = 0; j < step; ++j) {
            fwrite(llama_get_logits_ith(ctx, j), sizeof(float), n_vocab, out);
        }
        pos += step;
    }
    fclose(out);
    fprintf(stderr, "kimi-logits: %d tokens x %d logits -> %s\n", n, n_vocab, argv[3]);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
