/* A MoE router's choice for a few tokens (decode) on an AVX2 CPU, in one call: the logits x W^T in
   float32, then kernels/moe/naive.py's route_topk_torch on each row. PyTorch takes some fifteen operators
   for this (a widening of x, the float32 product, sigmoid, the bias add, topk, gather, the
   renormalisation, the shared expert's column), and a decode step pays for them in dispatch far more than
   in arithmetic: the product reads 2.4 MB at the 48B shapes, the rest is a few hundred values a row.

   Per row x [D] (float32, or bfloat16 where `bf16`), with the router's weight W [E, D] and the correction
   bias [E], both float32:
     logits = W x (float32 sums);  scores = sigmoid(logits), or softmax over the E logits;
     biased = scores + bias;  the top_k experts by biased score, ties to the lowest id, in choice order;
     weights = the chosen scores (or the biased ones), divided by their sum + 1e-20 where asked, times
     the scaling; where `append` >= 0, one more column: that expert, weight 1 (the shared expert). */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "../avx2_math.h"

/* One logit: the dot product of x and a weight row, D a multiple of 8 or not. */
static inline __attribute__((target("avx2,fma"))) float dot(const float *x, const float *w, long D) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    long i = 0;
    for (; i + 32 <= D; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(w + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(w + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), _mm256_loadu_ps(w + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), _mm256_loadu_ps(w + i + 24), a3);
    }
    for (; i + 8 <= D; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(w + i), a0);
    float total = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < D; i++) total += x[i] * w[i];
    return total;
}

/* Whether a ranks above b: NaN above any number, as torch.topk orders them. */
static inline int ranks_above(float a, float b) { return (isnan(a) && !isnan(b)) || a > b; }

/* The choice for one row from its logits [E] (overwritten by the scores); `biased` [E] and `taken` [E]
   are scratch. Writes k_out ids and weights. */
static void choose(float *scores, float *biased, unsigned char *taken, const float *bias, long E, int top_k,
                   int sigmoid, int renormalize, float scaling, int weights_from_biased, long append, int64_t *ids,
                   float *weights) {
    if (sigmoid) {
        for (long e = 0; e < E; e++) scores[e] = 1.0f / (1.0f + expf(-scores[e]));
    } else {
        float largest = -INFINITY, total = 0.0f;
        for (long e = 0; e < E; e++) largest = scores[e] > largest ? scores[e] : largest;
        for (long e = 0; e < E; e++) total += scores[e] = expf(scores[e] - largest);
        for (long e = 0; e < E; e++) scores[e] /= total;
    }
    for (long e = 0; e < E; e++) {
        biased[e] = scores[e] + bias[e];
        taken[e] = 0;
    }
    float sum = 0.0f;
    for (int j = 0; j < top_k; j++) {
        long best = -1;
        for (long e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || ranks_above(biased[e], biased[best]))) best = e;
        taken[best] = 1;
        ids[j] = best;
        weights[j] = weights_from_biased ? biased[best] : scores[best];
        sum += weights[j];
    }
    for (int j = 0; j < top_k; j++) weights[j] = (renormalize ? weights[j] / (sum + 1e-20f) : weights[j]) * scaling;
    if (append >= 0) {
        ids[top_k] = append;
        weights[top_k] = 1.0f;
    }
}

/* N rows of x [N, D] -> ids [N, k_out] int64 and weights [N, k_out] float32, k_out = top_k (+ 1 with
   `append` >= 0). The logits are computed on `threads` threads, experts split among them; the choices
   row by row. Returns -1 when its scratch cannot be allocated, else 0. */
__attribute__((target("avx2,fma"))) int route_rows(const void *x, int bf16, long N, long D, const float *weight,
                                                   long E, const float *bias, int top_k, int sigmoid,
                                                   int renormalize, float scaling, int weights_from_biased,
                                                   long append, int64_t *ids, float *weights, int threads) {
    float *rows = malloc(sizeof(float) * (size_t)(N * D + N * E + E));
    unsigned char *taken = malloc((size_t)E);
    if (!rows || !taken) {
        free(rows);
        free(taken);
        return -1;
    }
    float *logits = rows + N * D, *biased = logits + N * E;
    for (long n = 0; n < N; n++) {
        if (bf16)
            widen_bf16((const uint16_t *)x + n * D, rows + n * D, D);
        else
            for (long i = 0; i < D; i++) rows[n * D + i] = ((const float *)x)[n * D + i];
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (E * D >= 65536)
    for (long e = 0; e < E; e++)
        for (long n = 0; n < N; n++) logits[n * E + e] = dot(rows + n * D, weight + e * D, D);
    const long k_out = top_k + (append >= 0);
    for (long n = 0; n < N; n++)
        choose(logits + n * E, biased, taken, bias, E, top_k, sigmoid, renormalize, scaling, weights_from_biased,
               append, ids + n * k_out, weights + n * k_out);
    free(rows);
    free(taken);
    return 0;
}

/* Whether this CPU runs the kernel above. */
int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
