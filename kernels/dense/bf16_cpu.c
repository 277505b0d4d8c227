/* A few rows times a bfloat16 weight on an AVX2 CPU: y [M, O] = x [M, D] @ W^T, W [O, D] bfloat16 as
   stored, x float32 or bfloat16, float32 sums, y float32 or bfloat16 rounded once. PyTorch hands such a
   product to oneDNN, whose call costs a decode step tens of microseconds however small the matrix (the
   embedded model's are 200 KB); here it is the time to read the weight.

   Threads take blocks of four output rows; each block's weights are widened to float32 (exact: a
   bfloat16 is the top half of a float32) eight at a time and multiplied with every row of x while they
   are in the core's registers and caches. Each sum is eight float32 lanes, added in a fixed order: the
   result does not depend on the thread count.

   Beside it, one token through its chosen routed experts in one call (a MoE layer's decode when its
   experts are unquantized, bfloat16 or float32), where PyTorch takes three products and five small
   operators an expert. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../avx2_math.h"

/* Rows r0 .. r0 + n - 1 (n <= 4) of W times the float32 row a [D] (D a multiple of 8): out[r0 .. r0 + n - 1]. */
static inline __attribute__((target("avx2,fma"))) void rows_times(const uint16_t *w, long D, const float *a, int r0,
                                                                  int n, float *out) {
    __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (long i = 0; i < D; i += 8) {
        __m256 av = _mm256_loadu_ps(a + i);
        for (int j = 0; j < n; j++) f[j] = _mm256_fmadd_ps(load_bf16x8(w + (long)(r0 + j) * D + i), av, f[j]);
    }
    for (int j = 0; j < n; j++) out[r0 + j] = hsum(f[j]);
}

/* The same for a float32 W. */
static inline __attribute__((target("avx2,fma"))) void rows_times_f32(const float *w, long D, const float *a, int r0,
                                                                      int n, float *out) {
    __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (long i = 0; i < D; i += 8) {
        __m256 av = _mm256_loadu_ps(a + i);
        for (int j = 0; j < n; j++) f[j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + (long)(r0 + j) * D + i), av, f[j]);
    }
    for (int j = 0; j < n; j++) out[r0 + j] = hsum(f[j]);
}

/* Rows of the e-th matrix of a stack (each `rows` x D), bfloat16 or float32 as `w_bf16` says. */
static inline __attribute__((always_inline, target("avx2,fma"))) void stacked_rows_times(const void *w, int w_bf16,
                                                                                        long e, long rows, long D,
                                                                                        const float *a, int r0,
                                                                                        int n, float *out) {
    if (w_bf16)
        rows_times((const uint16_t *)w + e * rows * D, D, a, r0, n, out);
    else
        rows_times_f32((const float *)w + e * rows * D, D, a, r0, n, out);
}

/* y [M, O] = x [M, D] @ W^T. D a multiple of 8. Returns -1 when its scratch cannot be allocated, else 0. */
__attribute__((target("avx2,fma"))) int bf16_linear_rows(const uint16_t *w, int O, int D, const void *x, int x_bf16,
                                                          int M, void *y, int y_bf16, int threads) {
    float *fbuf = malloc(sizeof(float) * (size_t)M * ((x_bf16 ? D : 0) + (y_bf16 ? O : 0)) + 1);
    if (!fbuf) return -1;
    const float *a = x_bf16 ? fbuf : (const float *)x;
    float *out = y_bf16 ? fbuf + (x_bf16 ? (size_t)M * D : 0) : (float *)y;
    if (x_bf16) widen_bf16((const uint16_t *)x, fbuf, (long)M * D);
#pragma omp parallel for num_threads(threads) schedule(static) if ((long)O * D >= 65536)
    for (int r0 = 0; r0 < O; r0 += 4)
        for (int m = 0; m < M; m++)
            rows_times(w, D, a + (long)m * D, r0, O - r0 < 4 ? O - r0 : 4, out + (long)m * O);
    if (y_bf16)
        for (int m = 0; m < M; m++) store_row(out + (long)m * O, y, 1, m, O);
    free(fbuf);
    return 0;
}

/* One token through k routed experts whose weights are stacked over the experts, bfloat16 as stored (or
   float32 where `w_bf16` is 0): w1 and w3 [E, I, D], w2 [E, D, I]. out [D] = sum_j weights[j] * w2[e]
   (silu(w1[e] x) * (w3[e] x)), e = ids[j] (ids < 0 skipped), all in float32 and rounded once into out
   (float32 or bfloat16). Every chosen expert's products in one parallel region: the threads share the
   experts' blocks of four rows (gate and up, then down), the mix is summed in the order of the choices.
   I and D multiples of 8. Returns -1 when its scratch cannot be allocated, else 0. */
__attribute__((target("avx2,fma"))) int experts_one_token(const void *x, int x_bf16, int D, int I, const void *w1,
                                                           const void *w3, const void *w2, int w_bf16,
                                                           const int64_t *ids, const float *weights, int k,
                                                           void *out, int out_bf16, int threads) {
    int chosen[64], P = 0;
    for (int j = 0; j < k && P < 64; j++)
        if (ids[j] >= 0) chosen[P++] = j;
    float *fbuf = malloc(sizeof(float) * ((size_t)D * 2 + (size_t)P * (2 * (size_t)I + D)));
    if (!fbuf) return -1;
    float *a = fbuf, *mixed = a + D, *gate = mixed + D, *up = gate + (size_t)P * I, *y = up + (size_t)P * I;
    if (x_bf16)
        widen_bf16((const uint16_t *)x, a, D);
    else
        memcpy(a, x, sizeof(float) * (size_t)D);
    const int up_blocks = (I + 3) / 4, down_blocks = (D + 3) / 4;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int item = 0; item < P * up_blocks; item++) {
            int p = item / up_blocks, r0 = 4 * (item % up_blocks), n = I - r0 < 4 ? I - r0 : 4;
            long e = ids[chosen[p]];
            stacked_rows_times(w1, w_bf16, e, I, D, a, r0, n, gate + (long)p * I);
            stacked_rows_times(w3, w_bf16, e, I, D, a, r0, n, up + (long)p * I);
        }
#pragma omp for schedule(static)
        for (long i = 0; i < (long)P * I; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
#pragma omp for schedule(static)
        for (int item = 0; item < P * down_blocks; item++) {
            int p = item / down_blocks, r0 = 4 * (item % down_blocks), n = D - r0 < 4 ? D - r0 : 4;
            stacked_rows_times(w2, w_bf16, ids[chosen[p]], D, I, gate + (long)p * I, r0, n, y + (long)p * D);
        }
#pragma omp for schedule(static)
        for (int d = 0; d < D; d++) {
            float total = 0.0f;
            for (int p = 0; p < P; p++) total += weights[chosen[p]] * y[(long)p * D + d];
            mixed[d] = total;
        }
    }
    store_row(mixed, out, out_bf16, 0, D);
    free(fbuf);
    return 0;
}

/* Whether this CPU runs the kernels above. */
int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
