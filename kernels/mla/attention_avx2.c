/* MLA's absorbed attention for a decode step on an AVX2 CPU, over a float32 or bfloat16 latent cache.

   Why: a decode step attends a few rows (the new tokens times the heads) to every cached latent.
   PyTorch's products with so few rows run at a fraction of the cores' arithmetic and read each block of
   the cache twice (scores, then the weighted sum). Here each key is read once from memory: a block of
   keys' scores for all rows, then, while the block sits in the core's caches, its share of the weighted
   sum, with the softmax kept online (a running maximum and sum per row). Both products go 4 rows at a
   time with the sums in registers (4 rows x 3 keys, 4 rows x 16 values), so each load of a key feeds
   4 rows and the multiply-adds, not the loads, set the pace (32 rows, the 48B model's heads, included).

   The cached keys are split into `parts` ranges, one task each (OpenMP threads: PyTorch's own
   runtime, already loaded). A part returns per row its maximum score m, the sum of exp(s - m) and the
   weighted sum of the values relative to m; the caller merges the parts (the split-K rule), as it does
   with the new tokens' own keys.

   A bfloat16 cache (the quantized models' on a float32 CPU: half the bytes a step reads) is widened to
   float32 a block of keys at a time into a buffer of the part's, which the products then read as they
   read a float32 cache: the memory traffic halves, the arithmetic is the same. */

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../avx2_math.h"

#define KEY_BLOCK 32
#define ROW_BLOCK 4  /* rows the micro-kernels take at most */
#define KEYS_AT_ONCE 3 /* keys a scores micro-kernel takes: 4 x 3 sums in 12 registers */
/* From this many rows on, the scores take KEYS_AT_ONCE keys a step (the arithmetic sets the pace);
   below, one key a step: with few rows a step is bound by reading the cache, and several keys' streams
   at once read it 10-25% slower (measured with the demo model's 160-wide latents). */
#define MANY_ROWS 16
#define MAX_ROWS 64  /* rows a call may bring */

/* Scores of `nr` rows (1 to 4, D floats each, D apart) against `nk` keys (1 to 3, `stride` floats apart),
   written to scores[r * KEY_BLOCK + j]. Each step loads nk keys' and nr rows' 8 floats for nr * nk
   multiply-adds: with 4 rows the sums stay in registers and the arithmetic, not the loads, sets the
   pace. Inlined where nr is a constant, so that each row count gets its own unrolled loop. */
static inline __attribute__((always_inline, target("avx2,fma"))) void scores_rows(const float *q, const float *key,
                                                                                 long stride, int nk, int D,
                                                                                 float *scores, const int nr) {
    __m256 a[ROW_BLOCK][KEYS_AT_ONCE];
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < KEYS_AT_ONCE; j++) a[r][j] = _mm256_setzero_ps();
    if (nk == KEYS_AT_ONCE) {
        for (int d = 0; d < D; d += 8) {
            __m256 k[KEYS_AT_ONCE];
            for (int j = 0; j < KEYS_AT_ONCE; j++) k[j] = _mm256_loadu_ps(key + j * stride + d);
            for (int r = 0; r < nr; r++) {
                const __m256 x = _mm256_loadu_ps(q + (long)r * D + d);
                for (int j = 0; j < KEYS_AT_ONCE; j++) a[r][j] = _mm256_fmadd_ps(x, k[j], a[r][j]);
            }
        }
    } else {
        for (int j = 0; j < nk; j++)
            for (int d = 0; d < D; d += 8) {
                const __m256 k = _mm256_loadu_ps(key + j * stride + d);
                for (int r = 0; r < nr; r++)
                    a[r][j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (long)r * D + d), k, a[r][j]);
            }
    }
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < nk; j++) scores[r * KEY_BLOCK + j] = hsum(a[r][j]);
}

/* partial[r] += sum_j p[r, j] key_j[:V] for `nr` rows (1 to 4) and a block of n keys: 8 / nr registers
   of values a row (64 values for one row, 16 for four), each key's values loaded once for the nr rows. */
static inline __attribute__((always_inline, target("avx2,fma"))) void values_rows(const float *cache, long stride,
                                                                                 int n, int V, const float *p,
                                                                                 float *partial, const int nr) {
    const int width = 8 / nr; /* registers a row */
    for (int v0 = 0; v0 < V; v0 += 8 * width) {
        __m256 a[ROW_BLOCK][8];
        for (int r = 0; r < nr; r++)
            for (int i = 0; i < width; i++) a[r][i] = _mm256_loadu_ps(partial + (long)r * V + v0 + 8 * i);
        for (int j = 0; j < n; j++) {
            const float *key = cache + j * stride + v0;
            __m256 x[8];
            for (int i = 0; i < width; i++) x[i] = _mm256_loadu_ps(key + 8 * i);
            for (int r = 0; r < nr; r++) {
                const __m256 w = _mm256_broadcast_ss(p + r * KEY_BLOCK + j);
                for (int i = 0; i < width; i++) a[r][i] = _mm256_fmadd_ps(w, x[i], a[r][i]);
            }
        }
        for (int r = 0; r < nr; r++)
            for (int i = 0; i < width; i++) _mm256_storeu_ps(partial + (long)r * V + v0 + 8 * i, a[r][i]);
    }
}

/* The two products of a block for rows [r0, r0 + nr), nr a constant in each case. */
static __attribute__((target("avx2,fma"))) void block_scores(const float *q, const float *key, long stride, int n,
                                                             int D, float *scores, int nr, int keys_at_once) {
    for (int j = 0; j < n; j += keys_at_once) {
        const int nk = n - j < keys_at_once ? n - j : keys_at_once;
        switch (nr) {
        case 4: scores_rows(q, key + j * stride, stride, nk, D, scores + j, 4); break;
        case 3: scores_rows(q, key + j * stride, stride, nk, D, scores + j, 3); break;
        case 2: scores_rows(q, key + j * stride, stride, nk, D, scores + j, 2); break;
        default: scores_rows(q, key + j * stride, stride, nk, D, scores + j, 1);
        }
    }
}

static __attribute__((target("avx2,fma"))) void block_values(const float *cache, long stride, int n, int V,
                                                             const float *p, float *partial, int nr) {
    switch (nr) {
    case 4: values_rows(cache, stride, n, V, p, partial, 4); break;
    case 3: values_rows(cache, stride, n, V, p, partial, 3); break;
    case 2: values_rows(cache, stride, n, V, p, partial, 2); break;
    default: values_rows(cache, stride, n, V, p, partial, 1);
    }
}

/* n bfloat16 keys of D values (`stride` apart) as float32 rows D apart in `out`: a bfloat16 is the top
   half of the float32 it rounds. */
static __attribute__((target("avx2,fma"))) void widen_keys(const uint16_t *keys, long stride, int n, int D,
                                                          float *out) {
    for (int j = 0; j < n; j++)
        for (int d = 0; d < D; d += 8) _mm256_storeu_ps(out + (long)j * D + d, load_bf16x8(keys + j * stride + d));
}

/* One part: keys [k0, k1) of the cache, float32 (`cache`) or bfloat16 (`half`, with `widened` room for
   KEY_BLOCK keys), rows of D values `stride` apart. rows [R, D] (scaled queries); out: maxima [R], sums
   [R], partial [R, V] (V <= D: the first V columns of a key). */
static __attribute__((target("avx2,fma"))) void attend_part(const float *rows, const float *cache, const uint16_t *half,
                                                           float *widened, long stride, long k0, long k1, int D,
                                                           int V, int R, float *maxima, float *sums, float *partial) {
    float scores[MAX_ROWS * KEY_BLOCK] __attribute__((aligned(32)));
    for (int r = 0; r < R; r++) maxima[r] = -FLT_MAX, sums[r] = 0.f;
    memset(partial, 0, sizeof(float) * (size_t)R * V);
    for (long j0 = k0; j0 < k1; j0 += KEY_BLOCK) {
        int n = (int)(k1 - j0 < KEY_BLOCK ? k1 - j0 : KEY_BLOCK);
        const float *keys = half ? widened : cache + j0 * stride;
        const long key_stride = half ? D : stride;
        if (half) widen_keys(half + j0 * stride, stride, n, D, widened);
        /* scores [R, n], 4 rows by 3 keys (or 1) at a time; the block's keys stay in the core's cache */
        for (int r0 = 0; r0 < R; r0 += ROW_BLOCK)
            block_scores(rows + (long)r0 * D, keys, key_stride, n, D, scores + r0 * KEY_BLOCK,
                         R - r0 < ROW_BLOCK ? R - r0 : ROW_BLOCK, R >= MANY_ROWS ? KEYS_AT_ONCE : 1);
        /* the softmax online: each row's weights p = exp(s - m) in place of its scores */
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
        }
        /* partial += p key[:V], 4 rows by 16 values at a time (a last row alone by 64) */
        for (int r0 = 0; r0 < R; r0 += ROW_BLOCK)
            block_values(keys, key_stride, n, V, scores + r0 * KEY_BLOCK, partial + (long)r0 * V,
                         R - r0 < ROW_BLOCK ? R - r0 : ROW_BLOCK);
    }
}

static int attend_parts(const float *rows, const float *cache, const uint16_t *half, long stride, long keys, int D,
                        int V, int R, int parts, float *maxima, float *sums, float *partials, int threads) {
    if (R > MAX_ROWS) return -1;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(| : failed)
    for (int p = 0; p < parts; p++) {
        long k0 = keys * p / parts, k1 = keys * (p + 1) / parts;
        float *widened = half ? malloc(sizeof(float) * KEY_BLOCK * (size_t)D) : NULL;
        if (half && !widened) {
            failed = 1;
            continue;
        }
        attend_part(rows, cache, half, widened, stride, k0, k1, D, V, R, maxima + (long)p * R, sums + (long)p * R,
                    partials + (long)p * R * V);
        free(widened);
    }
    return failed ? -2 : 0;
}

/* Keys [0, keys) of one sequence's cache against R rows, in `parts` ranges: maxima, sums [parts, R],
   partials [parts, R, V]. D a multiple of 8, V a multiple of 64, R at most MAX_ROWS (else nothing is
   written and -1 returned; -2: no memory for a bfloat16 cache's widened keys). */
int mla_attend_cached(const float *rows, const float *cache, long stride, long keys, int D, int V, int R, int parts,
                      float *maxima, float *sums, float *partials, int threads) {
    return attend_parts(rows, cache, NULL, stride, keys, D, V, R, parts, maxima, sums, partials, threads);
}

/* The same over a bfloat16 cache (its rows `stride` values apart). */
int mla_attend_cached_bf16(const float *rows, const uint16_t *cache, long stride, long keys, int D, int V, int R,
                           int parts, float *maxima, float *sums, float *partials, int threads) {
    return attend_parts(rows, NULL, cache, stride, keys, D, V, R, parts, maxima, sums, partials, threads);
}

/* A decode step's token: its R query rows (float32, scaled here by `scale`) against every key up to its
   own, keys [0, *cached + 1) (its own row
   written into the cache already, so no mask), split into parts as the caller's rule would (at most 4
   per thread, each at least `min_keys` keys and `min_work` multiply-adds), then merged by the split-K
   rule into out [R, V]. The count is read from memory, so that a recorded step (engine/cpu_replay.py)
   replays at whatever length the cache has reached. `bf16`: the cache holds bfloat16. Returns 0; -1 for
   more rows than MAX_ROWS, -2 where the scratch cannot be allocated. */
int mla_attend_new_token(const float *queries, float scale, const void *cache, int bf16, long stride,
                         const long *cached, int D, int V, int R, long min_work, long min_keys, float *out,
                         int threads) {
    if (R > MAX_ROWS) return -1;
    const long keys = *cached + 1;
    long parts = keys / min_keys;
    const long by_work = keys * R * (D + V) / min_work;
    if (by_work < parts) parts = by_work;
    if (4L * threads < parts) parts = 4L * threads;
    if (parts < 1) parts = 1;
    float *maxima = malloc(sizeof(float) * ((size_t)parts * R * (V + 2) + (size_t)R * D));
    if (!maxima) return -2;
    float *sums = maxima + parts * R, *partials = sums + parts * R, *rows = partials + parts * R * V;
    for (long i = 0; i < (long)R * D; i++) rows[i] = queries[i] * scale;
    int status = attend_parts(rows, bf16 ? NULL : cache, bf16 ? cache : NULL, stride, keys, D, V, R, (int)parts,
                              maxima, sums, partials, threads);
    for (int r = 0; status == 0 && r < R; r++) {
        float top = -FLT_MAX, total = 0.f, *y = out + (long)r * V;
        for (long p = 0; p < parts; p++) top = maxima[p * R + r] > top ? maxima[p * R + r] : top;
        for (int v = 0; v < V; v++) y[v] = 0.f;
        for (long p = 0; p < parts; p++) {
            const float weight = expf(maxima[p * R + r] - top), *partial = partials + (p * R + r) * V;
            total += sums[p * R + r] * weight;
            for (int v = 0; v < V; v++) y[v] += partial[v] * weight;
        }
        for (int v = 0; v < V; v++) y[v] /= total;
    }
    free(maxima);
    return status;
}

/* Eight values of W from index i, W bfloat16 (`bf16`) or float32. */
static inline __attribute__((always_inline, target("avx2,fma"))) __m256 load_w8(const void *w, int bf16, long i) {
    return bf16 ? load_bf16x8((const uint16_t *)w + i) : _mm256_loadu_ps((const float *)w + i);
}

/* The products around the attention, on kv_b_proj's weight W [H, n + v, L] as stored, bfloat16 (`w_bf16`)
   or float32 (each head's first n rows W_UK, then v rows W_UV), read once a step in its own dtype: a
   float32 copy of a bfloat16 W would be twice the bytes every step reads. Rows of T tokens x H heads, float32 in and out, float32
   sums; threads over heads (a head's block of W, 2 (n + v) L bytes, serves its T rows from the core's
   caches). L a multiple of 64, v of 4.

   Absorbed queries: out [T, H, L] = q_nope [T, H, n] through W_UK, out[t, h] = sum_i q[t, h, i] W[h, i],
   each (t, h) row of out `out_stride` values after the last (L, or more where the rope part follows). */
__attribute__((target("avx2,fma"))) int mla_absorb_queries(const float *q, const void *w, int w_bf16, int T, int H,
                                                             int n, int v, int L, float *out, int out_stride,
                                                             int threads) {
    if (L % 64) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int h = 0; h < H; h++) {
        const long block = (long)h * (n + v) * L;
        for (int t = 0; t < T; t++) {
            const float *row = q + ((long)t * H + h) * n;
            float *y = out + ((long)t * H + h) * out_stride;
            for (int l0 = 0; l0 < L; l0 += 64) {
                __m256 acc[8];
                for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
                for (int i = 0; i < n; i++) {
                    const __m256 qi = _mm256_set1_ps(row[i]);
                    const long wi = block + (long)i * L + l0;
                    for (int k = 0; k < 8; k++) acc[k] = _mm256_fmadd_ps(qi, load_w8(w, w_bf16, wi + 8 * k), acc[k]);
                }
                for (int k = 0; k < 8; k++) _mm256_storeu_ps(y + l0 + 8 * k, acc[k]);
            }
        }
    }
    return 0;
}

/* The heads' values: out [T, H, v] = the attended latents a [T, H, L] through W_UV,
   out[t, h, j] = sum_l a[t, h, l] W[h, n + j, l]; four of W's rows a pass over a row of a. */
__attribute__((target("avx2,fma"))) int mla_values(const float *a, const void *w, int w_bf16, int T, int H, int n,
                                                     int v, int L, float *out, int threads) {
    if (L % 64 || v % 4) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int h = 0; h < H; h++) {
        const long w_uv = ((long)h * (n + v) + n) * L;
        for (int t = 0; t < T; t++) {
            const float *row = a + ((long)t * H + h) * L;
            float *y = out + ((long)t * H + h) * v;
            for (int j = 0; j < v; j += 4) {
                __m256 acc[4];
                for (int k = 0; k < 4; k++) acc[k] = _mm256_setzero_ps();
                for (int l = 0; l < L; l += 8) {
                    const __m256 x = _mm256_loadu_ps(row + l);
                    for (int k = 0; k < 4; k++)
                        acc[k] = _mm256_fmadd_ps(x, load_w8(w, w_bf16, w_uv + (long)(j + k) * L + l), acc[k]);
                }
                for (int k = 0; k < 4; k++) y[j + k] = hsum(acc[k]);
            }
        }
    }
    return 0;
}

/* Whether this CPU runs the kernel above. */
int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
