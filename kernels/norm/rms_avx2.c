/* The model's RMS norms of a CPU step on an AVX2 CPU (kernels/norm/naive.py's formulas, with its casts):
   a row, or a residual add and then the row's norm, in one call instead of seven to ten PyTorch
   operations, each of which costs a decode step more in dispatch than in arithmetic.

   Per row x of D values (float32, or bfloat16 where `bf16`): y = w * cast(x / sqrt(mean(x^2) + eps)),
   the cast to x's dtype before the weight as naive.py does, the product rounded to x's dtype; with a
   residual add, x = cast(residual + delta) first, written out as well. Sums in float32. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "../avx2_math.h"

static inline float rounded(float v, int bf16) { return bf16 ? from_bf16(round_to_bf16(v)) : v; }

static inline float value(const void *p, int bf16, long i) {
    return bf16 ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void put(void *p, int bf16, long i, float v) {
    if (bf16)
        ((uint16_t *)p)[i] = round_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* y[first + i] = weight[i] * cast(row[i] / sqrt(mean(row^2) + eps)) for the D float32 values of row. */
static inline __attribute__((always_inline, target("avx2,fma"))) void normed_row(const float *row, int D,
                                                                                 const void *weight, float eps,
                                                                                 int bf16, void *y, long first) {
    __m256 squares = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= D; i += 8) {
        __m256 v = _mm256_loadu_ps(row + i);
        squares = _mm256_fmadd_ps(v, v, squares);
    }
    float total = hsum(squares);
    for (; i < D; i++) total += row[i] * row[i];
    const float inverse = 1.0f / sqrtf(total / D + eps);
    for (i = 0; i < D; i++) put(y, bf16, first + i, value(weight, bf16, i) * rounded(row[i] * inverse, bf16));
}

/* M rows of D: y = norm(x) times weight [D]; where delta is not NULL, x = residual + delta first, written
   to `summed`. All tensors in one dtype. Returns -1 when its scratch cannot be allocated, else 0. */
__attribute__((target("avx2,fma"))) int rms_norm_rows(const void *x, const void *delta, void *summed,
                                                      const void *weight, int M, int D, float eps, int bf16, void *y,
                                                      int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) if (M > 1)
    {
        float *row = malloc(sizeof(float) * (size_t)D);
        if (!row) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) {
            if (!row) continue;
            long first = (long)m * D;
            if (delta) {
                for (int i = 0; i < D; i++) {
                    row[i] = rounded(value(x, bf16, first + i) + value(delta, bf16, first + i), bf16);
                    put(summed, bf16, first + i, row[i]);
                }
            } else if (bf16) {
                widen_bf16((const uint16_t *)x + first, row, D);
            } else {
                memcpy(row, (const float *)x + first, sizeof(float) * (size_t)D);
            }
            normed_row(row, D, weight, eps, bf16, y, first);
        }
        free(row);
    }
    return failed ? -1 : 0;
}

/* MLA's new latents into the cache: of M rows of x (`x_stride` values apart), the first D normed as above
   and the `tail` values after them copied, into rows *at, *at + 1, ... of y (`y_stride` apart). The row
   is read from memory, so that a recorded decode step (engine/cpu_replay.py) writes wherever the cache
   has reached when it replays. Returns -1 when its scratch cannot be allocated, else 0. */
__attribute__((target("avx2,fma"))) int rms_norm_into_rows(const void *x, long x_stride, const void *weight, int M,
                                                           int D, int tail, float eps, int bf16, void *y,
                                                           long y_stride, const long *at) {
    float *row = malloc(sizeof(float) * (size_t)D);
    if (!row) return -1;
    for (int m = 0; m < M; m++) {
        const long source = (long)m * x_stride, target = (*at + m) * y_stride;
        for (int i = 0; i < D; i++) row[i] = value(x, bf16, source + i);
        normed_row(row, D, weight, eps, bf16, y, target);
        for (int i = D; i < D + tail; i++) put(y, bf16, target + i, value(x, bf16, source + i));
    }
    free(row);
    return 0;
}

/* Whether this CPU runs the kernel above. */
int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
