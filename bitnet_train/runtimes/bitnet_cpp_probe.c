/* Logits of a GGUF model in bitnet.cpp (or any llama.cpp build), for `bitnet-train export` to
 * compare with the trainer's forward.
 *
 *   bitnet_cpp_probe MODEL.gguf IDS.bin OUT.bin N_THREADS [TEXT.txt TOKENS.bin]
 *
 * IDS.bin: int32 token ids. OUT.bin: one float32 row of n_vocab logits per id (all positions,
 * one batch). With TEXT.txt, also writes the file's tokenization (int32, BOS/EOS as the GGUF
 * says) to TOKENS.bin. Compiled on demand by bitnet_train/runtimes/bitnetcpp.py against the build's
 * own llama.h and libllama; it uses only API calls that bitnet.cpp's llama.cpp forks share, and
 * llama_tokenize in the form the build has (PROBE_TOKENIZE: 1 = takes the model, as in 2024
 * llama.cpp; 2 = takes the vocabulary, 2025 on; 0 = no tokenization). */
#include <stdio.h>
#include <stdlib.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void * user) {
    (void) user;
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

#ifndef PROBE_TOKENIZE
#define PROBE_TOKENIZE 0
#endif

static int tokenize(const struct llama_model * model, const char * text_path, const char * out_path) {
#if PROBE_TOKENIZE == 0
    (void) model; (void) text_path; (void) out_path;
    fprintf(stderr, "this probe was built without llama_tokenize\n");
    return 1;
#else
    FILE * f = fopen(text_path, "rb");
    if (!f) { fprintf(stderr, "cannot read %s\n", text_path); return 1; }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char * text = malloc(len + 1);
    if (fread(text, 1, len, f) != (size_t) len) { fprintf(stderr, "short read\n"); return 1; }
    text[len] = 0;
    fclose(f);
    int32_t cap = (int32_t) len + 16;
    llama_token * toks = malloc(sizeof(llama_token) * cap);
#if PROBE_TOKENIZE == 1
    int32_t n = llama_tokenize(model, text, (int32_t) len, toks, cap, true, false);
#else
    int32_t n = llama_tokenize(llama_model_get_vocab(model), text, (int32_t) len, toks, cap, true, false);
#endif
    if (n < 0) { fprintf(stderr, "llama_tokenize failed (%d)\n", n); return 1; }
    FILE * out = fopen(out_path, "wb");
    if (!out) { fprintf(stderr, "cannot write %s\n", out_path); return 1; }
    fwrite(toks, sizeof(llama_token), n, out);
    fclose(out);
    free(toks);
    free(text);
    return 0;
#endif
}

int main(int argc, char ** argv) {
    if (argc != 5 && argc != 7) {
        fprintf(stderr, "usage: %s MODEL.gguf IDS.bin OUT.bin N_THREADS [TEXT.txt TOKENS.bin]\n", argv[0]);
        return 2;
    }
    FILE * f = fopen(argv[2], "rb");
    if (!f) { fprintf(stderr, "cannot read %s\n", argv[2]); return 2; }
    fseek(f, 0, SEEK_END);
    long n = ftell(f) / (long) sizeof(llama_token);
    fseek(f, 0, SEEK_SET);
    if (n < 1) { fprintf(stderr, "%s holds no token ids\n", argv[2]); return 2; }
    llama_token * ids = malloc(sizeof(llama_token) * n);
    if (fread(ids, sizeof(llama_token), n, f) != (size_t) n) { fprintf(stderr, "short read\n"); return 2; }
    fclose(f);

    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model * model = llama_load_model_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "bitnet.cpp could not load %s\n", argv[1]); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) (n + 16);
    cp.n_batch = (uint32_t) n;
    cp.n_ubatch = (uint32_t) n;
    cp.n_threads = atoi(argv[4]);
    cp.n_threads_batch = cp.n_threads;
    struct llama_context * ctx = llama_new_context_with_model(model, cp);
    if (!ctx) { fprintf(stderr, "could not create a context\n"); return 1; }

    struct llama_batch batch = llama_batch_init((int32_t) n, 0, 1);
    for (long i = 0; i < n; i++) {
        batch.token[i] = ids[i];
        batch.pos[i] = (llama_pos) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = (int32_t) n;
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }

    const int n_vocab = llama_n_vocab(model);
    FILE * out = fopen(argv[3], "wb");
    if (!out) { fprintf(stderr, "cannot write %s\n", argv[3]); return 2; }
    for (long i = 0; i < n; i++) {
        const float * row = llama_get_logits_ith(ctx, (int32_t) i);
        if (!row) { fprintf(stderr, "no logits at position %ld\n", i); return 1; }
        fwrite(row, sizeof(float), n_vocab, out);
    }
    fclose(out);
    if (argc == 7 && tokenize(model, argv[5], argv[6]) != 0) {
        return 1;
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_free_model(model);
    llama_backend_free();
    free(ids);
    return 0;
}
