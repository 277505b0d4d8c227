/* A few rows times a bfloat16 weight on an AVX2 CPU: y [M, O] = x [M, D] @ W^T, W [O, D] bfloat16 as
   stored, x float32 or bfloat16, float32 sums, y float32 or bfloat16 rounded once. PyTorch hands such a
   product to oneDNN, whose call costs a decode step tens of microseconds however small the matrix (the
   embedded model's are 200 KB); here it is the time to read the weight.

   Threads take blocks of four output rows; each block's weights are widened to float32 (exact: a
   bfloat16 is the top half of a float32) eight at a time and multiplied with every row of x while they
   are in the core's registers and caches. Each sum is eight float32 lanes, added in a fixed order: the
   result does not depend on the thread count. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../avx2_math.h"

/* Eight bfloat16 values as eight float32 (exact). */
static inline __attribute__((target("avx2,fma"))) __m256 load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Rows r0 .. r0 + n - 1 (n <= 4) of W times the float32 row a [D] (D a multiple of 8): out[r0 .. r0 + n - 1]. */
static inline __attribute__((target("avx2,fma"))) void rows_times(const uint16_t *w, long D, const float *a, int r0,
                                                                  int n, float *out) {
    __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (long i = 0; i < D; i += 8) {
        __m256 av = _mm256_loadu_ps(a + i);
        for (int j = 0; j < n; j++) f[j] = _mm256_fmadd_ps(load_bf16(w + (long)(r0 + j) * D + i), av, f[j]);
    }
    for (int j = 0; j < n; j++) out[r0 + j] = hsum(f[j]);
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

/* Whether this CPU runs the kernel above. */
int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
