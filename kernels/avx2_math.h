/* Vector math shared by our AVX2 kernels (included by the .c files beside it; kernels/native.py hashes
   this header with each source, so a change to it rebuilds them). */

#ifndef KIMI_DESK_AVX2_MATH_H
#define KIMI_DESK_AVX2_MATH_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* exp(x), 8 at a time: 2^n p(r) with n = round(x / ln 2) and a degree-6 polynomial on the rest, relative
   error below 2e-7; x is clamped to [-87, 88] (beyond, the result would be a denormal or infinite). */
static inline __attribute__((target("avx2,fma"))) __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* 1 / (1 + exp(-x)), 8 at a time. */
static inline __attribute__((target("avx2,fma"))) __m256 sigmoid_ps(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

/* The sum of a vector's 8 lanes. */
static inline __attribute__((target("avx2,fma"))) float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Activations as they come, float32 or bfloat16 (`bf16`), and where they go. A bfloat16 is the top half
   of a float32, so widening is exact; rounding back is to nearest, ties to even, as PyTorch rounds. */
static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* 8 bfloat16 values at p as float32. */
static inline __attribute__((always_inline, target("avx2,fma"))) __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __attribute__((target("avx2,fma"))) void widen_bf16(const uint16_t *src, float *dst, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load_bf16x8(src + i));
    for (; i < n; i++) dst[i] = from_bf16(src[i]);
}

static inline uint16_t round_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Row `m` of `n` values of x (float32, or bfloat16 where bf16) as float32: x's own memory when it is
   float32, else widened into `scratch`. */
static inline __attribute__((target("avx2,fma"))) const float *row_as_floats(const void *x, int bf16, long m, long n,
                                                                            float *scratch) {
    if (!bf16) return (const float *)x + m * n;
    widen_bf16((const uint16_t *)x + m * n, scratch, n);
    return scratch;
}

/* n float32 values into row `m` of y (float32, or bfloat16 where bf16), rows n apart. */
static inline void store_row(const float *src, void *y, int bf16, long m, long n) {
    if (!bf16) {
        memcpy((float *)y + m * n, src, sizeof(float) * n);
        return;
    }
    uint16_t *dst = (uint16_t *)y + m * n;
    for (long i = 0; i < n; i++) dst[i] = round_to_bf16(src[i]);
}

#endif
