/* MLA's absorbed attention for a decode step on an AVX2 CPU, over a float32 latent cache.

   Why: a decode step attends a few rows (the new tokens times the heads) to every cached latent.
   PyTorch's products with so few rows run at a quarter of the cores' arithmetic and read each block of
   the cache twice (scores, then the weighted sum). Here each key is read once from memory: its scores
   for all rows, then, a block of keys at a time while it sits in the core's caches, its share of the
   weighted sum, with the softmax kept online (a running maximum and sum per row).

   The cached keys are split into `parts` ranges, one task each (OpenMP threads: PyTorch's own
   runtime, already loaded). A part returns per row its maximum score m, the sum of exp(s - m) and the
   weighted sum of the values relative to m; the caller merges the parts (the split-K rule), as it does
   with the new tokens' own keys. */

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../avx2_math.h"

#define KEY_BLOCK 32
#define VALUE_CHUNK 64 /* values accumulated 64 at a time: 8 registers */
#define MAX_ROWS 64    /* rows a call may bring (the caller sends at most 16) */

/* One part: keys [k0, k1) of `cache` (rows of D floats, `stride` floats apart). rows [R, D] (scaled
   queries); out: maxima [R], sums [R], partial [R, V] (V <= D: the first V columns of a key). */
static __attribute__((target("avx2,fma"))) void attend_part(const float *rows, const float *cache, long stride, long k0,
                                                           long k1, int D, int V, int R, float *maxima, float *sums,
                                                           float *partial) {
    float scores[MAX_ROWS * KEY_BLOCK] __attribute__((aligned(32)));
    for (int r = 0; r < R; r++) maxima[r] = -FLT_MAX, sums[r] = 0.f;
    memset(partial, 0, sizeof(float) * (size_t)R * V);
    for (long j0 = k0; j0 < k1; j0 += KEY_BLOCK) {
        int n = (int)(k1 - j0 < KEY_BLOCK ? k1 - j0 : KEY_BLOCK);
        /* scores [R, n] */
        for (int j = 0; j < n; j++) {
            const float *key = cache + (j0 + j) * stride;
            for (int r = 0; r < R; r++) {
                const float *q = rows + (long)r * D;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                int d = 0;
                for (; d + 16 <= D; d += 16) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(key + d), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), _mm256_loadu_ps(key + d + 8), a1);
                }
                for (; d < D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(key + d), a0);
                scores[r * KEY_BLOCK + j] = hsum(_mm256_add_ps(a0, a1));
            }
        }
        for (int r = 0; r < R; r++) {
            float *s = scores + r * KEY_BLOCK, block_max = -FLT_MAX;
            for (int j = 0; j < n; j++) block_max = s[j] > block_max ? s[j] : block_max;
            float *acc = partial + (long)r * V;
            if (block_max > maxima[r]) { /* rescale what was summed so far to the new maximum */
                float c = expf(maxima[r] - block_max);
                sums[r] *= c;
                __m256 cv = _mm256_set1_ps(c);
                for (int v = 0; v < V; v += 8) _mm256_storeu_ps(acc + v, _mm256_mul_ps(_mm256_loadu_ps(acc + v), cv));
                maxima[r] = block_max;
            }
            __m256 m = _mm256_set1_ps(maxima[r]), total = _mm256_setzero_ps();
            int j = 0;
            for (; j + 8 <= n; j += 8) {
                __m256 p = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
                _mm256_storeu_ps(s + j, p);
                total = _mm256_add_ps(total, p);
            }
            float tail = 0.f;
            for (; j < n; j++) s[j] = expf(s[j] - maxima[r]), tail += s[j];
            sums[r] += hsum(total) + tail;
            /* acc += sum_j p_j key_j[:V], 64 values at a time in registers */
            for (int v0 = 0; v0 < V; v0 += VALUE_CHUNK) {
                __m256 a[8];
                for (int i = 0; i < 8; i++) a[i] = _mm256_loadu_ps(acc + v0 + 8 * i);
                for (int jj = 0; jj < n; jj++) {
                    __m256 p = _mm256_set1_ps(s[jj]);
                    const float *key = cache + (j0 + jj) * stride + v0;
                    for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(key + 8 * i), a[i]);
                }
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(acc + v0 + 8 * i, a[i]);
            }
        }
    }
}

/* Keys [0, keys) of one sequence's cache against R rows, in `parts` ranges: maxima, sums [parts, R],
   partials [parts, R, V]. D a multiple of 8, V a multiple of 64, R at most MAX_ROWS (else nothing is
   written and -1 returned). */
int mla_attend_cached(const float *rows, const float *cache, long stride, long keys, int D, int V, int R, int parts,
                       float *maxima, float *sums, float *partials, int threads) {
    if (R > MAX_ROWS) return -1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int p = 0; p < parts; p++) {
        long k0 = keys * p / parts, k1 = keys * (p + 1) / parts;
        attend_part(rows, cache, stride, k0, k1, D, V, R, maxima + (long)p * R, sums + (long)p * R,
                    partials + (long)p * R * V);
    }
    return 0;
}

/* Whether this CPU runs the kernel above. */
int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
