/* int4 products on an AVX2 CPU, reading PyTorch's int4 operator's tiles (kernels/quant/cpu.py) as they are.

   Why: PyTorch's CPU int4 operator converts every weight to float before multiplying; on a CPU
   without AVX-512 that costs more than reading it, and it runs at a third of the memory's speed. Here,
   as llama.cpp does, the activations are rounded to int8 in blocks of 32 inputs (a float scale per
   block) and the 4-bit codes meet them in integer multiply-adds (vpmaddubsw: 32 products an
   instruction), so a one-token product reads the weights at close to memory speed.

   The math, per output row r, weight group g (scale s, midpoint z, codes q in 0..15) and activation
   block b (scale c_b, codes a):
   y_r = sum_g s_g sum_b c_b sum_{d in b} (q_d - 8) a_d  +  z_g X_g,    X_g = sum_{d in g} x_d
   The codes' midpoint 8 is taken off in integers (sum_d q_d a_d - 8 sum_d a_d), so the rounding of the
   activations meets only the centred codes; X_g is the exact sum of the float activations.

   Tiles ("split" layouts, the ones PyTorch packs in on AVX2 and AVX-512 CPUs): blocks of R = 32 or 64
   output rows; a block holds D inputs of R / 2 bytes, byte j of an input holding row j (low half) and
   row j + R / 2 (high half). A block is split into R / 32 slices of 16 bytes an input (16 rows in the
   low halves, 16 in the high halves).

   Threads: OpenMP over blocks of rows. PyTorch's own OpenMP runtime (libgomp.so.1) is already loaded
   when this library is, so both share one pool of threads. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define ACT_BLOCK 32

/* Round rows of x [M, D] to int8 codes [M, D] with a scale per 32 inputs [M, D / 32] and 8 times the sum of
   each block's codes [M, D / 32], and sum each group of `group` inputs of x [M, D / group]. */
void int4_quantize_activations(const float *x, int M, int D, int group, int8_t *codes, float *scales,
                               int32_t *code_sums, float *sums) {
    for (int m = 0; m < M; m++) {
        const float *row = x + (long)m * D;
        for (int b = 0; b < D / ACT_BLOCK; b++) {
            const float *v = row + b * ACT_BLOCK;
            float amax = 0.f;
            for (int i = 0; i < ACT_BLOCK; i++) amax = fmaxf(amax, fabsf(v[i]));
            float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
            scales[(long)m * (D / ACT_BLOCK) + b] = scale;
            int32_t total = 0;
            for (int i = 0; i < ACT_BLOCK; i++) {
                int8_t a = (int8_t)lrintf(v[i] * inv);
                codes[(long)m * D + b * ACT_BLOCK + i] = a;
                total += a;
            }
            code_sums[(long)m * (D / ACT_BLOCK) + b] = 8 * total;
        }
        for (int g = 0; g < D / group; g++) {
            float s = 0.f;
            for (int i = 0; i < group; i++) s += row[g * group + i];
            sums[(long)m * (D / group) + g] = s;
        }
    }
}

/* bf16 pairs (scale, zero) of 8 rows -> scale and zero as float vectors. */
static inline __attribute__((target("avx2,fma"))) void scales_of_8(const uint16_t *sz, __m256 *s, __m256 *z) {
    __m256i v = _mm256_loadu_si256((const __m256i *)sz);
    *s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000)));
}

/* One 16-byte slice of a block, one group of inputs: the codes of inputs d and d + 1 interleaved a pair
   a row, so that vpmaddubsw with (a_d, a_d+1) gives each row's two products summed. Out: 16 rows (low
   halves) then 16 rows (high halves), `group / 2` pairs of 32 bytes each. */
static inline __attribute__((target("avx2,fma"))) void unpack_slice(const uint8_t *tiles, int stride, int group,
                                                                    uint8_t *out) {
    const __m256i mask = _mm256_set1_epi8(15);
    const __m256i pairs = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,  //
                                           0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    for (int d = 0; d < group; d += 2) {
        __m256i v = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(tiles + (long)d * stride))),
            _mm_loadu_si128((const __m128i *)(tiles + (long)(d + 1) * stride)), 1);
        __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        lo = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(lo, 0xD8), pairs);
        hi = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(hi, 0xD8), pairs);
        _mm256_storeu_si256((__m256i *)(out + d * 16), lo);
        _mm256_storeu_si256((__m256i *)(out + group * 16 + d * 16), hi);
    }
}

/* 16 rows x one activation block (16 pairs of inputs): int32 sums of rows 0-7 and rows 8-15. */
static inline __attribute__((target("avx2,fma"))) void dot_block(const uint8_t *w, const int8_t *a, __m256i *r0,
                                                                 __m256i *r1) {
    __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
    for (int half = 0; half < 16; half += 8) {
        __m256i acc = _mm256_setzero_si256();
        for (int p = half; p < half + 8; p++) { /* 8 pairs: at most 8 * 2 * 15 * 127 = 30,480, inside int16 */
            __m256i ap = _mm256_set1_epi16(*(const int16_t *)(a + 2 * p));
            acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(w + p * 32)), ap));
        }
        /* int16 lanes in row order: rows 0-7 in the low 128 bits, 8-15 in the high ones */
        sum0 = _mm256_add_epi32(sum0, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc)));
        sum1 = _mm256_add_epi32(sum1, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc, 1)));
    }
    *r0 = sum0;
    *r1 = sum1;
}

/* One row of x (a decode step): int4_linear_avx2's product with the codes unpacked in registers and
   multiplied at once, the scratch buffer skipped. Four inputs a step: inputs d and d + 2 in the two
   128-bit lanes of one register, d + 1 and d + 3 in another, so that one byte unpack a lane pairs each
   row's codes of two inputs for vpmaddubsw (each lane then holds its own pair of inputs' sums, added
   once per block of 32 inputs in int32). The block's sums are scaled by its activation scale in float;
   the codes' midpoint is taken off once a group, as the scalar sum_b c_b 8 sum_{d in b} a_d (the same
   for every row), times each row's scale. */
static __attribute__((target("avx2,fma"))) void one_row(const uint8_t *tiles, const uint16_t *sz, int rows, int D,
                                                        int padded_rows, int group, const int8_t *codes,
                                                        const float *act_scales, const int32_t *code_sums,
                                                        const float *sums, float *y, int slice) {
    const __m256i mask = _mm256_set1_epi8(15);
    const __m256i lane_pairs = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,  //
                                                2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    int G = D / group, stride = rows / 2, blk = slice / (rows / 32), sl = slice % (rows / 32);
    const uint8_t *tile = tiles + (long)blk * D * stride + sl * 16;
    int row0 = blk * rows + sl * 16, row1 = row0 + rows / 2;
    int base[4] = {row0, row0 + 8, row1, row1 + 8};
    __m256 out[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int g = 0; g < G; g++) {
        __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        float offset = 0.f;
        for (int d0 = g * group; d0 < (g + 1) * group; d0 += ACT_BLOCK) {
            int ab = d0 / ACT_BLOCK;
            offset += act_scales[ab] * (float)code_sums[ab];
            /* rows 0-7 and 8-15 of the low halves, then of the high halves; 8 steps: at most
               8 * 2 * 15 * 127 = 30,480 a lane, inside int16 */
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                              _mm256_setzero_si256()};
            for (int d = d0; d < d0 + ACT_BLOCK; d += 4) {
                const uint8_t *t = tile + (long)d * stride;
                __m256i a = _mm256_loadu2_m128i((const __m128i *)(t + 2 * stride), (const __m128i *)t);
                __m256i b = _mm256_loadu2_m128i((const __m128i *)(t + 3 * stride), (const __m128i *)(t + stride));
                __m256i a_lo = _mm256_and_si256(a, mask), b_lo = _mm256_and_si256(b, mask);
                __m256i a_hi = _mm256_and_si256(_mm256_srli_epi16(a, 4), mask);
                __m256i b_hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
                __m256i ap = _mm256_shuffle_epi8(_mm256_set1_epi32(*(const int32_t *)(codes + d)), lane_pairs);
                acc[0] = _mm256_add_epi16(acc[0], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(a_lo, b_lo), ap));
                acc[1] = _mm256_add_epi16(acc[1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(a_lo, b_lo), ap));
                acc[2] = _mm256_add_epi16(acc[2], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(a_hi, b_hi), ap));
                acc[3] = _mm256_add_epi16(acc[3], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(a_hi, b_hi), ap));
            }
            __m256 c = _mm256_set1_ps(act_scales[ab]);
            for (int i = 0; i < 4; i++) {
                __m256i r = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[i])),
                                             _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[i], 1)));
                f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r), c, f[i]);
            }
        }
        __m256 X = _mm256_set1_ps(sums[g]), off = _mm256_set1_ps(offset);
        for (int i = 0; i < 4; i++) {
            __m256 sc, z;
            scales_of_8(sz + ((long)g * padded_rows + base[i]) * 2, &sc, &z);
            out[i] = _mm256_fmadd_ps(sc, _mm256_sub_ps(f[i], off), _mm256_fmadd_ps(z, X, out[i]));
        }
    }
    for (int i = 0; i < 4; i++) _mm256_storeu_ps(y + base[i], out[i]);
}

/* y [M, padded_rows] = x @ W^T for W in tiles of `rows` (32 or 64) rows, from x's int8 codes [M, D], block
   scales [M, D / 32] and group sums [M, D / group]. sz: [D / group, padded_rows, 2] bf16 (scale, zero).
   `group` is 32, 64 or 128 and divides D. */
__attribute__((target("avx2,fma"))) void int4_linear_avx2(const uint8_t *tiles, const uint16_t *sz, int rows, int D,
                                                          int padded_rows, int group, const int8_t *codes,
                                                          const float *act_scales, const int32_t *code_sums,
                                                          const float *sums, int M, float *y, int threads) {
    int slices = padded_rows / 16, G = D / group, A = D / ACT_BLOCK, per_group = group / ACT_BLOCK;
    if (M == 1) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int slice = 0; slice < slices / 2; slice++)
            one_row(tiles, sz, rows, D, padded_rows, group, codes, act_scales, code_sums, sums, y, slice);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        uint8_t unpacked[2 * 16 * 128] __attribute__((aligned(32)));
#pragma omp for schedule(static)
        for (int slice = 0; slice < slices / 2; slice++) {
            int blk = slice / (rows / 32), sl = slice % (rows / 32);
            const uint8_t *tile = tiles + (long)blk * D * (rows / 2) + sl * 16;
            int row0 = blk * rows + sl * 16, row1 = row0 + rows / 2; /* the low and high halves' rows */
            int base[4] = {row0, row0 + 8, row1, row1 + 8};
            for (int g = 0; g < G; g++) {
                unpack_slice(tile + (long)g * group * (rows / 2), rows / 2, group, unpacked);
                __m256 s[4], z[4];
                for (int i = 0; i < 4; i++) scales_of_8(sz + ((long)g * padded_rows + base[i]) * 2, &s[i], &z[i]);
                for (int m = 0; m < M; m++) {
                    __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
                    for (int b = 0; b < per_group; b++) {
                        int ab = g * per_group + b;
                        const int8_t *a = codes + (long)m * D + ab * ACT_BLOCK;
                        __m256 c = _mm256_set1_ps(act_scales[(long)m * A + ab]);
                        __m256i mid = _mm256_set1_epi32(code_sums[(long)m * A + ab]);
                        __m256i r[4];
                        dot_block(unpacked + b * 16 * 32, a, &r[0], &r[1]);
                        dot_block(unpacked + group * 16 + b * 16 * 32, a, &r[2], &r[3]);
                        for (int i = 0; i < 4; i++) f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(r[i], mid)), c, f[i]);
                    }
                    __m256 X = _mm256_set1_ps(sums[(long)m * G + g]);
                    float *ym = y + (long)m * padded_rows;
                    for (int i = 0; i < 4; i++) {
                        __m256 v = _mm256_fmadd_ps(s[i], f[i], _mm256_mul_ps(z[i], X));
                        if (g) v = _mm256_add_ps(v, _mm256_loadu_ps(ym + base[i]));
                        _mm256_storeu_ps(ym + base[i], v);
                    }
                }
            }
        }
    }
}

/* Whether this CPU runs the kernels above. */
int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
