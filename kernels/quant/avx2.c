/* int4 and int8 products on an AVX2 CPU. int4: PyTorch's int4 operator's tiles (kernels/quant/cpu.py)
   read as they are; int8: our int8 rows as they are stored (at the end of the file).

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

   On CPUs with AVX-512 VNNI and VBMI the products take vpdpbusd (int4: slice_rows_512 for more than a few
   rows, one_row_512 for one; int8: int8_four_rows_512), with the same results bit for bit.

   Activations come and results go in float32 or bfloat16 (a model computing in bf16), read and written
   as they are: a decode step's products then need no dtype conversions around them.

   Threads: OpenMP over blocks of rows. PyTorch's own OpenMP runtime (libgomp.so.1) is already loaded
   when this library is, so both share one pool of threads. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../avx2_math.h"

#define ACT_BLOCK 32
/* The routed experts one *_experts_one_token call takes (kernels/quant/avx2.py MAX_EXPERTS). */
#define MAX_EXPERTS 64
/* Up to this many rows of activations, each row takes the one-row path over a slice while its codes
   are in the core's cache; more pay for unpacking each slice once (int4_linear_avx2). */
#define FEW_ROWS 5
/* Groups ahead whose scales the one-row path prefetches. */
#define PREFETCH_GROUPS 4

/* Round rows of x [M, D] to int8 codes [M, D] with a scale per 32 inputs [M, D / 32] and 8 times the sum of
   each block's codes [M, D / 32], and sum each group of `group` inputs of x [M, D / group] (the int4
   products' zero terms; the int8 ones pass NULL for both). Rounding to nearest (the CPU's default
   mode), as lrintf would. */
static __attribute__((target("avx2,fma"))) void quantize_row(const float *row, int D, int group, int8_t *codes,
                                                             float *scales, int32_t *code_sums, float *sums) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int b = 0; b < D / ACT_BLOCK; b++) {
        const float *v = row + b * ACT_BLOCK;
        __m256 x[4], amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            x[i] = _mm256_loadu_ps(v + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, x[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float top = _mm_cvtss_f32(m4);
        scales[b] = top / 127.f;
        __m256 inv = _mm256_set1_ps(top > 0.f ? 127.f / top : 0.f);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(x[i], inv));
        __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
        if (code_sums) code_sums[b] = 8 * _mm_cvtsi128_si32(t4);
        /* int32 -> int8 in input order: the packs interleave the 128-bit lanes, the permute puts them back */
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(codes + b * ACT_BLOCK), packed);
    }
    for (int g = 0; sums && g < D / group; g++) {
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < group; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(row + g * group + i));
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
        sums[g] = _mm_cvtss_f32(s4);
    }
}

/* quantize_row over the M rows of x [M, D] (float32, or bfloat16 where x_bf16), threads over rows. */
static __attribute__((target("avx2,fma"))) void quantize_rows(const void *x, int x_bf16, int M, int D, int group,
                                                              int8_t *codes, float *scales, int32_t *code_sums,
                                                              float *sums, float *widened, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (M > 1)
    for (int m = 0; m < M; m++)
        quantize_row(row_as_floats(x, x_bf16, m, D, widened + (long)m * D), D, group, codes + (long)m * D,
                     scales + (long)m * (D / ACT_BLOCK), code_sums ? code_sums + (long)m * (D / ACT_BLOCK) : NULL,
                     sums ? sums + (long)m * (D / group) : NULL);
}

/* bf16 pairs (scale, zero) of 8 rows -> scale and zero as float vectors. */
static inline __attribute__((target("avx2,fma"))) void scales_of_8(const uint16_t *sz, __m256 *s, __m256 *z) {
    __m256i v = _mm256_loadu_si256((const __m256i *)sz);
    *s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000)));
}

/* One 32-row slice of a tile, one group of inputs, rearranged for several rows of activations: four
   blocks of 8 rows (rows 0-7 and 8-15 of the low halves, then of the high halves), each a run of 32-byte
   vectors, one per 4 inputs, holding each row's codes of inputs d..d+3 together. One vpmaddubsw with the
   4 activations broadcast to every 32-bit lane then gives each row's sums of inputs (d, d + 1) and
   (d + 2, d + 3) side by side, and the broadcast is a plain load (no shuffle). With `sixteen_rows` (the
   AVX-512 form) each half's rows 0-7 and 8-15 of the same 4 inputs lie side by side instead, one 64-byte
   vector holding 16 rows. */
static inline __attribute__((always_inline, target("avx2,fma"))) void unpack_slice(const uint8_t *tiles, int stride,
                                                                                   int group, uint8_t *out,
                                                                                   const int sixteen_rows) {
    const __m128i mask = _mm_set1_epi8(15);
    int steps = group / 4;
    for (int s = 0; s < steps; s++) {
        const uint8_t *t = tiles + (long)(4 * s) * stride;
        __m128i in[4];
        for (int k = 0; k < 4; k++) in[k] = _mm_loadu_si128((const __m128i *)(t + (long)k * stride));
        for (int half = 0; half < 2; half++) { /* low nibbles: the low half's rows; high: the high half's */
            __m128i c[4];
            for (int k = 0; k < 4; k++)
                c[k] = half ? _mm_and_si128(_mm_srli_epi16(in[k], 4), mask) : _mm_and_si128(in[k], mask);
            __m128i p01lo = _mm_unpacklo_epi8(c[0], c[1]), p23lo = _mm_unpacklo_epi8(c[2], c[3]);
            __m128i p01hi = _mm_unpackhi_epi8(c[0], c[1]), p23hi = _mm_unpackhi_epi8(c[2], c[3]);
            uint8_t *rows0 = sixteen_rows ? out + ((long)half * steps + s) * 64 : out + ((long)(2 * half) * steps + s) * 32;
            uint8_t *rows8 = sixteen_rows ? rows0 + 32 : rows0 + (long)steps * 32;
            _mm_storeu_si128((__m128i *)rows0, _mm_unpacklo_epi16(p01lo, p23lo));
            _mm_storeu_si128((__m128i *)(rows0 + 16), _mm_unpackhi_epi16(p01lo, p23lo));
            _mm_storeu_si128((__m128i *)rows8, _mm_unpacklo_epi16(p01hi, p23hi));
            _mm_storeu_si128((__m128i *)(rows8 + 16), _mm_unpackhi_epi16(p01hi, p23hi));
        }
    }
}

/* Several rows of activations: the weights' 16 rows of one half of a slice (two blocks of
   unpack_slice's output, one group) meet MB rows of activations at once, so that each loaded weight
   vector serves MB rows and each broadcast activation two weight vectors. MB = 2: 4 int16 sums, 4 float
   sums, 2 weight vectors and a broadcast stay in AVX2's 16 registers (MB = 3 or 4 spill, and are slower).
   Activation rows go in tiles of M_TILE, so that the tile's codes and outputs stay in the core's caches
   while every slice of the matrix passes over them. */
#define MB 2
#define M_TILE 64

/* Adds to f[j][i] (weight block j, activation row m0 + i) the group's integer sums, each activation
   block's scaled by its scale, the codes' midpoint taken off. */
static inline __attribute__((always_inline, target("avx2,fma"))) void half_times_rows(
    const uint8_t *w, int group, int g, const int8_t *codes, int D, const float *act_scales, const int32_t *code_sums,
    int m0, const int rows_here, __m256 f[2][MB]) {
    const __m256i ones = _mm256_set1_epi16(1);
    int A = D / ACT_BLOCK, per_group = group / ACT_BLOCK, block_stride = group / 4 * 32;
    for (int b = 0; b < per_group; b++) {
        int ab = g * per_group + b;
        const int8_t *a = codes + (long)m0 * D + (long)ab * ACT_BLOCK;
        __m256i acc[2][MB];
        for (int j = 0; j < 2; j++)
            for (int i = 0; i < rows_here; i++) acc[j][i] = _mm256_setzero_si256();
        /* 8 steps of 4 inputs: at most 8 * 2 * 15 * 127 = 30,480 a lane, inside int16. Not unrolled
           further: unrolled whole, GCC computes every product first and spills them. */
#pragma GCC unroll 2
        for (int s = 0; s < ACT_BLOCK / 4; s++) {
            __m256i wv[2];
            for (int j = 0; j < 2; j++)
                wv[j] = _mm256_loadu_si256((const __m256i *)(w + (long)j * block_stride + (long)(b * ACT_BLOCK / 4 + s) * 32));
            for (int i = 0; i < rows_here; i++) {
                __m256i x = _mm256_set1_epi32(*(const int32_t *)(a + (long)i * D + 4 * s));
                for (int j = 0; j < 2; j++) acc[j][i] = _mm256_add_epi16(acc[j][i], _mm256_maddubs_epi16(wv[j], x));
            }
        }
        for (int i = 0; i < rows_here; i++) {
            __m256 c = _mm256_set1_ps(act_scales[(long)(m0 + i) * A + ab]);
            __m256i mid = _mm256_set1_epi32(code_sums[(long)(m0 + i) * A + ab]);
            for (int j = 0; j < 2; j++)
                f[j][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_madd_epi16(acc[j][i], ones), mid)), c,
                                          f[j][i]);
        }
    }
}

/* y[m0 .. m0 + rows_here, the 16 rows from row[0] and row[1]] (+)= s f + z X for one group: the group's
   scale and zero per row, X the activation rows' sums of the group's inputs. */
static inline __attribute__((always_inline, target("avx2,fma"))) void half_to_outputs(
    const uint8_t *w, int group, int g, const int8_t *codes, int D, const float *act_scales, const int32_t *code_sums,
    const float *sums, int m0, const int rows_here, const __m256 *s, const __m256 *z, float *y, int padded_rows,
    const int *row) {
    __m256 f[2][MB];
    for (int j = 0; j < 2; j++)
        for (int i = 0; i < rows_here; i++) f[j][i] = _mm256_setzero_ps();
    half_times_rows(w, group, g, codes, D, act_scales, code_sums, m0, rows_here, f);
    int G = D / group;
    for (int i = 0; i < rows_here; i++) {
        __m256 X = _mm256_set1_ps(sums[(long)(m0 + i) * G + g]);
        for (int j = 0; j < 2; j++) {
            float *ym = y + (long)(m0 + i) * padded_rows + row[j];
            __m256 v = _mm256_fmadd_ps(s[j], f[j][i], _mm256_mul_ps(z[j], X));
            if (g) v = _mm256_add_ps(v, _mm256_loadu_ps(ym));
            _mm256_storeu_ps(ym, v);
        }
    }
}

/* One row of x (a decode step) and one 32-row slice: the codes unpacked in registers and multiplied at
   once, no unpacking pass. Four inputs a step: inputs d and d + 2 in the two
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
        /* The scales of a group lie a whole matrix height apart from the previous group's: a stream the
           hardware does not prefetch, so each would be a miss to memory. */
        if (g + PREFETCH_GROUPS < G) {
            const uint16_t *ahead = sz + ((long)(g + PREFETCH_GROUPS) * padded_rows + row0) * 2;
            _mm_prefetch((const char *)ahead, _MM_HINT_T0);
            _mm_prefetch((const char *)(ahead + 32), _MM_HINT_T0);
            const uint16_t *ahead1 = sz + ((long)(g + PREFETCH_GROUPS) * padded_rows + row1) * 2;
            _mm_prefetch((const char *)ahead1, _MM_HINT_T0);
            _mm_prefetch((const char *)(ahead1 + 32), _MM_HINT_T0);
        }
        __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        float offset = 0.f;
        for (int d0 = g * group; d0 < (g + 1) * group; d0 += ACT_BLOCK) {
            int ab = d0 / ACT_BLOCK;
            offset += act_scales[ab] * (float)code_sums[ab];
            /* rows 0-7 and 8-15 of the low halves, then of the high halves; 8 steps: at most
               8 * 2 * 15 * 127 = 30,480 a lane, inside int16 */
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                              _mm256_setzero_si256()};
#pragma GCC unroll 2 /* unrolled whole, GCC spills the sums and the pointers */
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

/* The many-rows path on a CPU with AVX-512 VNNI (vpdpbusd: 64 byte products summed into 16 int32 lanes
   in one instruction, where AVX2 takes vpmaddubsw, an int16 add and a vpmaddwd for 32). Each of the
   slice's halves is one 64-byte vector of 16 rows x 4 inputs a step (unpack_slice's sixteen_rows), met
   by MB512 rows of activations at once, both halves together: 2 * MB512 int32 sums, 2 * MB512 float
   sums, 2 weight vectors and a broadcast in AVX-512's 32 registers. The integer sums of a block of 32
   inputs are exact in either form, and the float work after them is the AVX2 path's operation for
   operation, so both give the same bits. */
#define MB512 6
#define AVX512_TARGET "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi"

static int use_avx512; /* set by cpu_supported(); use_avx512_products() turns it off for the tests */

/* scales_of_8 for 16 rows: bf16 pairs (scale, zero) -> scale and zero as float vectors. */
static inline __attribute__((always_inline, target(AVX512_TARGET))) void scales_of_16(const uint16_t *sz, __m512 *s,
                                                                                      __m512 *z) {
    __m512i v = _mm512_loadu_si512((const void *)sz);
    *s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *z = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000)));
}

static inline __attribute__((always_inline, target(AVX512_TARGET))) void slice_times_rows_512(
    const uint8_t *w, int group, int g, const int8_t *codes, int D, const float *act_scales, const int32_t *code_sums,
    const float *sums, int m0, const int rows_here, const __m512 *s, const __m512 *z, float *y, int padded_rows,
    const int *row) {
    int A = D / ACT_BLOCK, G = D / group, per_group = group / ACT_BLOCK, half_stride = group / 4 * 64;
    __m512 f[2][MB512];
    for (int j = 0; j < 2; j++)
        for (int i = 0; i < rows_here; i++) f[j][i] = _mm512_setzero_ps();
    for (int b = 0; b < per_group; b++) {
        int ab = g * per_group + b;
        const int8_t *a = codes + (long)m0 * D + (long)ab * ACT_BLOCK;
        __m512i acc[2][MB512];
        for (int j = 0; j < 2; j++)
            for (int i = 0; i < rows_here; i++) acc[j][i] = _mm512_setzero_si512();
        for (int step = 0; step < ACT_BLOCK / 4; step++) {
            const uint8_t *wb = w + (long)(b * ACT_BLOCK / 4 + step) * 64;
            __m512i w0 = _mm512_loadu_si512((const void *)wb), w1 = _mm512_loadu_si512((const void *)(wb + half_stride));
            for (int i = 0; i < rows_here; i++) {
                __m512i x = _mm512_set1_epi32(*(const int32_t *)(a + (long)i * D + 4 * step));
                acc[0][i] = _mm512_dpbusd_epi32(acc[0][i], w0, x);
                acc[1][i] = _mm512_dpbusd_epi32(acc[1][i], w1, x);
            }
        }
        for (int i = 0; i < rows_here; i++) {
            __m512 c = _mm512_set1_ps(act_scales[(long)(m0 + i) * A + ab]);
            __m512i mid = _mm512_set1_epi32(code_sums[(long)(m0 + i) * A + ab]);
            for (int j = 0; j < 2; j++)
                f[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[j][i], mid)), c, f[j][i]);
        }
    }
    for (int i = 0; i < rows_here; i++) {
        __m512 X = _mm512_set1_ps(sums[(long)(m0 + i) * G + g]);
        for (int j = 0; j < 2; j++) {
            float *ym = y + (long)(m0 + i) * padded_rows + row[j];
            __m512 v = _mm512_fmadd_ps(s[j], f[j][i], _mm512_mul_ps(z[j], X));
            if (g) v = _mm512_add_ps(v, _mm512_loadu_ps(ym));
            _mm512_storeu_ps(ym, v);
        }
    }
}

/* slice_rows' many-rows path in AVX-512 (above), for the slice at `tile` whose halves start at rows
   row[0] and row[1]. */
static __attribute__((target(AVX512_TARGET))) void slice_rows_512(const uint8_t *tile, const uint16_t *sz, int rows,
                                                                 int D, int padded_rows, int group, const int8_t *codes,
                                                                 const float *act_scales, const int32_t *code_sums,
                                                                 const float *sums, int m_first, int m_end, float *y,
                                                                 const int *row) {
    uint8_t unpacked[4 * 32 * 32] __attribute__((aligned(64))); /* 32 rows x a group of up to 128 inputs */
    int G = D / group;
    for (int t_first = m_first; t_first < m_end; t_first += M_TILE) {
        int t_end = t_first + M_TILE < m_end ? t_first + M_TILE : m_end;
        for (int g = 0; g < G; g++) {
            unpack_slice(tile + (long)g * group * (rows / 2), rows / 2, group, unpacked, 1);
            __m512 s[2], z[2];
            for (int j = 0; j < 2; j++) scales_of_16(sz + ((long)g * padded_rows + row[j]) * 2, &s[j], &z[j]);
            int m = t_first;
            for (; m + MB512 <= t_end; m += MB512)
                slice_times_rows_512(unpacked, group, g, codes, D, act_scales, code_sums, sums, m, MB512, s, z, y,
                                     padded_rows, row);
            if (m < t_end) /* the rest, fewer than MB512 rows */
                slice_times_rows_512(unpacked, group, g, codes, D, act_scales, code_sums, sums, m, t_end - m, s, z, y,
                                     padded_rows, row);
        }
    }
}

/* Byte 4 r + j of a row-major vector (row r's codes for inputs d .. d + 3) <- byte 16 j + r of the
   input-major one (16 bytes an input). */
static const uint8_t ROW_MAJOR_ORDER[64] = {0, 16, 32, 48, 1, 17, 33, 49, 2, 18, 34, 50, 3, 19, 35, 51, 4, 20, 36, 52, 5, 21, 37, 53, 6, 22, 38, 54, 7, 23, 39, 55, 8, 24, 40, 56, 9, 25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59, 12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};

/* one_row in AVX-512 VNNI: a row of activations times one 32-row slice, its codes read once as they lie
   in the tile. Four inputs' 16 bytes (32 rows' nibbles each) are one 64-byte vector; vpermb gathers each
   row's four codes into a 32-bit lane, so that one vpdpbusd takes 16 rows x 4 inputs where AVX2's
   vpmaddubsw path takes a quarter of that in three times the instructions. The integer sums of each
   block of 32 inputs are the AVX2 path's, and the float work after them is its, lane for lane: the
   same bits. */
static __attribute__((target(AVX512_TARGET))) void one_row_512(const uint8_t *tiles, const uint16_t *sz, int rows,
                                                               int D, int padded_rows, int group, const int8_t *codes,
                                                               const float *act_scales, const int32_t *code_sums,
                                                               const float *sums, float *y, int slice) {
    const __m512i mask = _mm512_set1_epi8(15);
    const __m512i by_row = _mm512_loadu_si512((const void *)ROW_MAJOR_ORDER);
    int G = D / group, stride = rows / 2, blk = slice / (rows / 32), sl = slice % (rows / 32);
    const uint8_t *tile = tiles + (long)blk * D * stride + sl * 16;
    int row0 = blk * rows + sl * 16, row1 = row0 + rows / 2;
    __m512 out[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int g = 0; g < G; g++) {
        if (g + PREFETCH_GROUPS < G) {
            _mm_prefetch((const char *)(sz + ((long)(g + PREFETCH_GROUPS) * padded_rows + row0) * 2), _MM_HINT_T0);
            _mm_prefetch((const char *)(sz + ((long)(g + PREFETCH_GROUPS) * padded_rows + row1) * 2), _MM_HINT_T0);
        }
        __m512 f[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        float offset = 0.f;
        for (int d0 = g * group; d0 < (g + 1) * group; d0 += ACT_BLOCK) {
            int ab = d0 / ACT_BLOCK;
            offset += act_scales[ab] * (float)code_sums[ab];
            __m512i acc[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
            for (int d = d0; d < d0 + ACT_BLOCK; d += 4) {
                const uint8_t *t = tile + (long)d * stride;
                __m512i v = stride == 16 ? _mm512_loadu_si512((const void *)t)
                                         : _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu2_m128i(
                                                                  (const __m128i *)(t + stride), (const __m128i *)t)),
                                                              _mm256_loadu2_m128i((const __m128i *)(t + 3 * stride),
                                                                                  (const __m128i *)(t + 2 * stride)),
                                                              1);
                __m512i low = _mm512_permutexvar_epi8(by_row, _mm512_and_si512(v, mask));
                __m512i high = _mm512_permutexvar_epi8(by_row, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask));
                __m512i x = _mm512_set1_epi32(*(const int32_t *)(codes + d));
                acc[0] = _mm512_dpbusd_epi32(acc[0], low, x);
                acc[1] = _mm512_dpbusd_epi32(acc[1], high, x);
            }
            __m512 c = _mm512_set1_ps(act_scales[ab]);
            for (int h = 0; h < 2; h++) f[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[h]), c, f[h]);
        }
        __m512 X = _mm512_set1_ps(sums[g]), off = _mm512_set1_ps(offset);
        const int half_rows[2] = {row0, row1};
        for (int h = 0; h < 2; h++) {
            __m512 sc, z;
            scales_of_16(sz + ((long)g * padded_rows + half_rows[h]) * 2, &sc, &z);
            out[h] = _mm512_fmadd_ps(sc, _mm512_sub_ps(f[h], off), _mm512_fmadd_ps(z, X, out[h]));
        }
    }
    _mm512_storeu_ps(y + row0, out[0]);
    _mm512_storeu_ps(y + row1, out[1]);
}

/* A row of activations times one 32-row slice: VNNI where the CPU has it, else AVX2. */
static __attribute__((target("avx2,fma"))) void row_times_slice(const uint8_t *tiles, const uint16_t *sz, int rows,
                                                                int D, int padded_rows, int group, const int8_t *codes,
                                                                const float *act_scales, const int32_t *code_sums,
                                                                const float *sums, float *y, int slice) {
    if (use_avx512)
        one_row_512(tiles, sz, rows, D, padded_rows, group, codes, act_scales, code_sums, sums, y, slice);
    else
        one_row(tiles, sz, rows, D, padded_rows, group, codes, act_scales, code_sums, sums, y, slice);
}

/* Rows m_first .. m_end of y [M, padded_rows] for one 32-row slice of W, from x's int8 codes [M, D] etc.:
   each row alone over the slice's codes in registers for a few rows, else the slice unpacked a group at
   a time and met by the rows in tiles of M_TILE. */
static __attribute__((target("avx2,fma"))) void slice_rows(const uint8_t *tiles, const uint16_t *sz, int rows, int D,
                                                           int padded_rows, int group, const int8_t *codes,
                                                           const float *act_scales, const int32_t *code_sums,
                                                           const float *sums, int m_first, int m_end, float *y,
                                                           int slice) {
    int A = D / ACT_BLOCK, G = D / group;
    if (m_end - m_first <= FEW_ROWS) {
        /* A few rows: the slice's codes read once from memory by the first row, from the core's cache by
           the others, no unpacking pass. */
        for (int m = m_first; m < m_end; m++)
            row_times_slice(tiles, sz, rows, D, padded_rows, group, codes + (long)m * D, act_scales + (long)m * A,
                    code_sums + (long)m * A, sums + (long)m * G, y + (long)m * padded_rows, slice);
        return;
    }
    int blk = slice / (rows / 32), sl = slice % (rows / 32);
    const uint8_t *tile = tiles + (long)blk * D * (rows / 2) + sl * 16;
    int row0 = blk * rows + sl * 16, row1 = row0 + rows / 2; /* the low and high halves' rows */
    int base[4] = {row0, row0 + 8, row1, row1 + 8};
    if (use_avx512) {
        const int halves[2] = {row0, row1};
        slice_rows_512(tile, sz, rows, D, padded_rows, group, codes, act_scales, code_sums, sums, m_first, m_end, y,
                       halves);
        return;
    }
    uint8_t unpacked[4 * 32 * 32] __attribute__((aligned(32))); /* 32 rows x a group of up to 128 inputs */
    for (int t_first = m_first; t_first < m_end; t_first += M_TILE) {
        int t_end = t_first + M_TILE < m_end ? t_first + M_TILE : m_end;
        for (int g = 0; g < G; g++) {
            unpack_slice(tile + (long)g * group * (rows / 2), rows / 2, group, unpacked, 0);
            for (int h = 0; h < 2; h++) { /* the low half's 16 rows, then the high half's */
                const uint8_t *w = unpacked + (long)(2 * h) * (group / 4) * 32;
                __m256 s[2], z[2];
                for (int j = 0; j < 2; j++) scales_of_8(sz + ((long)g * padded_rows + base[2 * h + j]) * 2, &s[j], &z[j]);
                int m = t_first;
                for (; m + MB <= t_end; m += MB)
                    half_to_outputs(w, group, g, codes, D, act_scales, code_sums, sums, m, MB, s, z, y, padded_rows,
                                    base + 2 * h);
                if (m < t_end)
                    half_to_outputs(w, group, g, codes, D, act_scales, code_sums, sums, m, 1, s, z, y, padded_rows,
                                    base + 2 * h);
            }
        }
    }
}

/* y [M, padded_rows] = x @ W^T for W in tiles of `rows` (32 or 64) rows, from x's int8 codes [M, D], block
   scales [M, D / 32] and group sums [M, D / group] (quantize_row). sz: [D / group, padded_rows, 2] bf16
   (scale, zero). `group` is 32, 64 or 128 and divides D. */
static __attribute__((target("avx2,fma"))) void int4_product(const uint8_t *tiles, const uint16_t *sz, int rows, int D,
                                                             int padded_rows, int group, const int8_t *codes,
                                                             const float *act_scales, const int32_t *code_sums,
                                                             const float *sums, int M, float *y, int threads) {
    /* Rows in tiles of M_TILE, the threads over the slices within a tile: a tile's codes stay in each
       core's cache while the slices stream past. */
#pragma omp parallel num_threads(threads)
    for (int m_first = 0; m_first < M; m_first += M_TILE) {
        int m_end = m_first + M_TILE < M ? m_first + M_TILE : M;
#pragma omp for schedule(static)
        for (int slice = 0; slice < padded_rows / 32; slice++)
            slice_rows(tiles, sz, rows, D, padded_rows, group, codes, act_scales, code_sums, sums, m_first, m_end, y,
                       slice);
    }
}

/* y [M, out_features] = x [M, D] @ W^T in one call: x float32 or bfloat16 (x_bf16), y likewise (y_bf16),
   the activations rounded to int8 codes here, the tiles' padding rows dropped. One call a product, so
   that a decode step's small products do not each pay for the scratch tensors and dtype conversions of
   a host-side wrapper. Returns 0, or -1 when its scratch cannot be allocated. */
__attribute__((target("avx2,fma"))) int int4_linear(const void *x, int x_bf16, int M, int D, const uint8_t *tiles,
                                                    const uint16_t *sz, int rows, int padded_rows, int group, void *y,
                                                    int y_bf16, int out_features, int threads) {
    long A = D / ACT_BLOCK, G = D / group;
    int direct = !y_bf16 && out_features == padded_rows;
    int8_t *codes = malloc((size_t)M * D);
    int32_t *code_sums = malloc(sizeof(int32_t) * (size_t)M * A);
    float *fbuf = malloc(sizeof(float) * ((size_t)M * (A + G + (x_bf16 ? D : 0) + (direct ? 0 : padded_rows))));
    if (!codes || !code_sums || !fbuf) {
        free(codes);
        free(code_sums);
        free(fbuf);
        return -1;
    }
    float *act_scales = fbuf, *sums = act_scales + (size_t)M * A, *widened = sums + (size_t)M * G;
    float *out = direct ? (float *)y : widened + (x_bf16 ? (size_t)M * D : 0);
    quantize_rows(x, x_bf16, M, D, group, codes, act_scales, code_sums, sums, widened, threads);
    int4_product(tiles, sz, rows, D, padded_rows, group, codes, act_scales, code_sums, sums, M, out, threads);
    if (!direct) {
#pragma omp parallel for num_threads(threads) schedule(static) if (M > 1)
        for (int m = 0; m < M; m++) store_row(out + (long)m * padded_rows, y, y_bf16, m, out_features);
    }
    free(codes);
    free(code_sums);
    free(fbuf);
    return 0;
}

/* An expert's hidden activations, in place over the gate half of h [2 I] (gate, then up). */
static inline __attribute__((target("avx2,fma"))) void silu_times_up(float *h, int I) {
    const __m256 one = _mm256_set1_ps(1.f);
    int i = 0;
    for (; i + 8 <= I; i += 8) { /* exp_ps: within 2e-7 of expf */
        __m256 g = _mm256_loadu_ps(h + i);
        __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(h + I + i)));
    }
    for (; i < I; i++) h[i] = h[i] / (1.f + expf(-h[i])) * h[I + i];
}

/* out [D] = sum_p weights[chosen[p]] * y[p] (rows `stride` apart): the experts' outputs mixed, shared
   out over the threads of the enclosing parallel region. */
static void mix_experts(const float *y, int stride, const float *weights, const int *chosen, int P, int D, float *out) {
#pragma omp for schedule(static)
    for (int d0 = 0; d0 < D; d0 += 64) {
        for (int d = d0; d < d0 + 64 && d < D; d++) {
            float total = 0.f;
            for (int p = 0; p < P; p++) total += weights[chosen[p]] * y[(long)p * stride + d];
            out[d] = total;
        }
    }
}

/* One token through k routed experts, whole: out [D] = sum_j weights[j] * w2_e (silu(w1_e x) * w3_e x),
   e = ids[j] (ids < 0 skipped), for experts stacked in tiles (one stride apart): the joined gate-up
   matrix (w1's rows then w3's, 2 * I rows, groups of gu_group over D inputs) and the down matrix (D rows,
   groups of dn_group over I inputs). One call and one parallel region for the whole layer, so that the k
   experts' products share the threads instead of each paying a region's start and end: at one token a
   product is a few microseconds of work a thread. Returns 0, or -1 when its scratch cannot be allocated
   (as do int8_linear_avx2 and int8_experts_one_token). */
__attribute__((target("avx2,fma"))) int int4_experts_one_token(
    const void *x, int x_bf16, int D, int I, int rows, const uint8_t *gu_tiles, long gu_tiles_stride, const uint16_t *gu_sz,
    long gu_sz_stride, int gu_group, int gu_padded, const uint8_t *dn_tiles, long dn_tiles_stride,
    const uint16_t *dn_sz, long dn_sz_stride, int dn_group, int dn_padded, const int64_t *ids, const float *weights,
    int k, void *out, int out_bf16, int threads) {
    int chosen[MAX_EXPERTS], P = 0;
    for (int j = 0; j < k && P < MAX_EXPERTS; j++)
        if (ids[j] >= 0) chosen[P++] = j;
    int A = D / ACT_BLOCK, AI = I / ACT_BLOCK;
    int8_t *codes = malloc((size_t)D + (size_t)P * I);
    int8_t *hidden_codes = codes + D;
    float *fbuf = malloc(sizeof(float) *
                         ((size_t)A + D / gu_group + (size_t)P * (gu_padded + AI + I / dn_group + dn_padded) + 2 * (size_t)D));
    int32_t *ibuf = malloc(sizeof(int32_t) * ((size_t)A + (size_t)P * AI));
    if (!codes || !fbuf || !ibuf) {
        free(codes);
        free(fbuf);
        free(ibuf);
        return -1;
    }
    float *act_scales = fbuf, *sums = act_scales + A, *h = sums + D / gu_group;
    float *h_scales = h + (size_t)P * gu_padded, *h_sums = h_scales + (size_t)P * AI, *y = h_sums + (size_t)P * (I / dn_group);
    float *widened = y + (size_t)P * dn_padded, *mixed = widened + D;
    int32_t *code_sums = ibuf, *h_code_sums = ibuf + A;
    quantize_row(row_as_floats(x, x_bf16, 0, D, widened), D, gu_group, codes, act_scales, code_sums, sums);
    int gu_slices = gu_padded / 32, dn_slices = dn_padded / 32;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int item = 0; item < P * gu_slices; item++) {
            int p = item / gu_slices;
            long e = ids[chosen[p]];
            row_times_slice(gu_tiles + e * gu_tiles_stride, gu_sz + e * gu_sz_stride, rows, D, gu_padded, gu_group, codes,
                    act_scales, code_sums, sums, h + (long)p * gu_padded, item % gu_slices);
        }
#pragma omp for schedule(static)
        for (int p = 0; p < P; p++) {
            float *hp = h + (long)p * gu_padded; /* silu(gate) * up, in place over the gate half */
            silu_times_up(hp, I);
            quantize_row(hp, I, dn_group, hidden_codes + (long)p * I, h_scales + (long)p * AI, h_code_sums + (long)p * AI,
                         h_sums + (long)p * (I / dn_group));
        }
#pragma omp for schedule(static)
        for (int item = 0; item < P * dn_slices; item++) {
            int p = item / dn_slices;
            long e = ids[chosen[p]];
            row_times_slice(dn_tiles + e * dn_tiles_stride, dn_sz + e * dn_sz_stride, rows, I, dn_padded, dn_group,
                    hidden_codes + (long)p * I, h_scales + (long)p * AI, h_code_sums + (long)p * AI,
                    h_sums + (long)p * (I / dn_group), y + (long)p * dn_padded, item % dn_slices);
        }
        mix_experts(y, dn_padded, weights, chosen, P, D, mixed);
    }
    store_row(mixed, out, out_bf16, 0, D);
    free(codes);
    free(fbuf);
    free(ibuf);
    return 0;
}

/* Members of the experts (token rows) one pass of int4_experts_grouped takes at most (more where one
   expert alone has more): its scratch is about 20 KB a member at the 48B shapes. */
#define ROUND_MEMBERS 1024

/* Inside a parallel region: the members of groups g0 .. g1 - 1 (rows of the round's quantized activations
   [members, D], the round starting at member `first`) times their experts' matrix (tiles and scales
   stacked `*_stride` apart, `padded` rows, groups of `group` inputs), into y [members, padded]; the
   threads share the (group, tile) items. A tile's 32-row slices go to one thread: they interleave in
   memory (16 bytes of each 32 or 64), so slices of one tile on two threads would each bring its cache
   lines from memory, twice the traffic of the bytes used. Guided scheduling hands out runs of
   consecutive tiles (long streams for the prefetcher: 5-25% faster than one item at a time) that
   shorten towards the end, so that an expert chosen by many tokens does not hold up the others. */
static __attribute__((target("avx2,fma"))) void groups_times_matrix(
    int g0, int g1, const int64_t *group_expert, const int64_t *group_start, long first, const uint8_t *tiles,
    long tiles_stride, const uint16_t *sz, long sz_stride, int rows, int D, int padded, int group, const int8_t *codes,
    const float *scales, const int32_t *code_sums, const float *sums, float *y) {
    long A = D / ACT_BLOCK, G = D / group;
    int blocks = padded / rows, per_block = rows / 32;
#pragma omp for schedule(guided)
    for (long item = 0; item < (long)(g1 - g0) * blocks; item++) {
        int g = g0 + (int)(item / blocks);
        long e = group_expert[g], r0 = group_start[g] - first, n = group_start[g + 1] - group_start[g];
        int first_slice = (int)(item % blocks) * per_block;
        for (int slice = first_slice; slice < first_slice + per_block; slice++)
            slice_rows(tiles + e * tiles_stride, sz + e * sz_stride, rows, D, padded, group, codes + r0 * D,
                       scales + r0 * A, code_sums + r0 * A, sums + r0 * G, 0, (int)n, y + r0 * padded, slice);
    }
}

/* Many tokens through their chosen experts (a reading chunk) in one call: out [N, D] (float32, or bf16
   where out_bf16) = for each token the sum over its chosen experts of weight * w2_e (silu(w1_e x) * w3_e x),
   the experts stacked as for int4_experts_one_token. The choices come grouped by expert: group g is
   expert group_expert[g], its members group_start[g] .. group_start[g + 1] - 1, member j being token
   member_token[j] with weight member_weight[j]. Every token's row is rounded to int8 once for all its
   experts, and the members go in rounds of about ROUND_MEMBERS: in each, the threads share one pass over
   the (group, slice) items of the gate-up products, one over the hidden rows, one over the down
   products' items, and one over the output's columns, adding each token's members in order (so the
   sums do not depend on the number of threads). Where a call per expert would be a parallel region a
   few microseconds long for each of a layer's 256 experts, this is four a round. Returns 0, or -1 when
   its scratch cannot be allocated. */
__attribute__((target("avx2,fma"))) int int4_experts_grouped(
    const void *x, int x_bf16, int N, int D, int I, int rows, const uint8_t *gu_tiles, long gu_tiles_stride,
    const uint16_t *gu_sz, long gu_sz_stride, int gu_group, int gu_padded, const uint8_t *dn_tiles,
    long dn_tiles_stride, const uint16_t *dn_sz, long dn_sz_stride, int dn_group, int dn_padded, int G,
    const int64_t *group_expert, const int64_t *group_start, const int64_t *member_token,
    const float *member_weight, void *out, int out_bf16, int threads) {
    long A = D / ACT_BLOCK, AI = I / ACT_BLOCK, GU = D / gu_group, GD = I / dn_group;
    long R = ROUND_MEMBERS;
    for (int g = 0; g < G; g++)
        if (group_start[g + 1] - group_start[g] > R) R = group_start[g + 1] - group_start[g];
    int8_t *x_codes = malloc((size_t)N * D + (size_t)R * (D + I));
    int32_t *ibuf = malloc(sizeof(int32_t) * ((size_t)N * A + (size_t)R * (A + AI)));
    size_t floats = (size_t)N * (A + GU + D + (x_bf16 ? D : 0)) + (size_t)R * (A + GU + gu_padded + AI + GD + dn_padded);
    float *fbuf = malloc(sizeof(float) * floats);
    if (!x_codes || !ibuf || !fbuf) {
        free(x_codes);
        free(ibuf);
        free(fbuf);
        return -1;
    }
    int8_t *codes = x_codes + (size_t)N * D, *h_codes = codes + (size_t)R * D;
    int32_t *x_code_sums = ibuf, *code_sums = x_code_sums + (size_t)N * A, *h_code_sums = code_sums + (size_t)R * A;
    float *x_scales = fbuf, *x_sums = x_scales + (size_t)N * A, *acc = x_sums + (size_t)N * GU;
    float *widened = acc + (size_t)N * D, *scales = widened + (x_bf16 ? (size_t)N * D : 0);
    float *sums = scales + (size_t)R * A, *h = sums + (size_t)R * GU, *h_scales = h + (size_t)R * gu_padded;
    float *h_sums = h_scales + (size_t)R * AI, *y = h_sums + (size_t)R * GD;
    quantize_rows(x, x_bf16, N, D, gu_group, x_codes, x_scales, x_code_sums, x_sums, widened, threads);
    memset(acc, 0, sizeof(float) * (size_t)N * D);
    for (int g0 = 0; g0 < G;) {
        int g1 = g0 + 1;
        while (g1 < G && group_start[g1 + 1] - group_start[g0] <= R) g1++;
        const long first = group_start[g0], members = group_start[g1] - first;
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static)
            for (long j = 0; j < members; j++) { /* each member's token row, gathered */
                long t = member_token[first + j];
                memcpy(codes + j * D, x_codes + t * D, (size_t)D);
                memcpy(scales + j * A, x_scales + t * A, sizeof(float) * A);
                memcpy(code_sums + j * A, x_code_sums + t * A, sizeof(int32_t) * A);
                memcpy(sums + j * GU, x_sums + t * GU, sizeof(float) * GU);
            }
            groups_times_matrix(g0, g1, group_expert, group_start, first, gu_tiles, gu_tiles_stride, gu_sz, gu_sz_stride,
                                rows, D, gu_padded, gu_group, codes, scales, code_sums, sums, h);
#pragma omp for schedule(static)
            for (long j = 0; j < members; j++) {
                float *hj = h + j * gu_padded; /* silu(gate) * up, in place over the gate half */
                silu_times_up(hj, I);
                quantize_row(hj, I, dn_group, h_codes + j * I, h_scales + j * AI, h_code_sums + j * AI, h_sums + j * GD);
            }
            groups_times_matrix(g0, g1, group_expert, group_start, first, dn_tiles, dn_tiles_stride, dn_sz, dn_sz_stride,
                                rows, I, dn_padded, dn_group, h_codes, h_scales, h_code_sums, h_sums, y);
#pragma omp for schedule(static)
            for (int d0 = 0; d0 < D; d0 += 64) { /* the outputs, threads over columns, members in order */
                int d1 = d0 + 64 < D ? d0 + 64 : D;
                for (long j = 0; j < members; j++) {
                    float w = member_weight[first + j], *row = acc + member_token[first + j] * D;
                    const float *yj = y + j * dn_padded;
                    for (int d = d0; d < d1; d++) row[d] += w * yj[d];
                }
            }
        }
        g0 = g1;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < N; t++) store_row(acc + (long)t * D, out, out_bf16, t, D);
    free(x_codes);
    free(ibuf);
    free(fbuf);
    return 0;
}

/* int8 weights, a float scale per output row (kernels/quant/naive.py's int8 rows, codes [O, D] as they
   are stored), times activations rounded to int8 in blocks of 32. vpmaddubsw multiplies unsigned bytes
   by signed ones, so each product is taken as |q| times a with q's sign (llama.cpp's Q8 products do the
   same); a block's 32 products summed in int32, scaled by the block's activation scale in float. */

/* Rows r0 .. r0 + n - 1 (n <= 4) of q times one activation row (codes a, block scales c): y[r0 .. r0 + n - 1].
   Each row's sum is its own: a row comes out the same bits whatever n. */
static inline __attribute__((target("avx2,fma"))) void int8_four_rows(const int8_t *q, const float *row_scales, int D,
                                                                      const int8_t *a, const float *c, float *y,
                                                                      int r0, int n) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < D / ACT_BLOCK; b++) {
        __m256i av = _mm256_loadu_si256((const __m256i *)(a + b * ACT_BLOCK));
        __m256 cb = _mm256_set1_ps(c[b]);
        for (int j = 0; j < n; j++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(q + (long)(r0 + j) * D + b * ACT_BLOCK));
            __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(av, w));
            f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), cb, f[j]);
        }
    }
    for (int j = 0; j < n; j++) y[r0 + j] = hsum(f[j]) * row_scales[r0 + j];
}

/* int8_four_rows in AVX-512 VNNI, two blocks of 32 inputs a vector, the same bits. vpdpbusd multiplies
   unsigned bytes by signed ones: the codes become unsigned as q + 128 (an exclusive or), and the 128 times
   the activations' sums each lane thereby gains starts its accumulator negated, so each int32 lane holds
   exactly the four products vpmaddwd's lane holds in int8_four_rows. Each block's lanes then meet its
   scale in the same float operations, in the same order. */
static __attribute__((target(AVX512_TARGET))) void int8_four_rows_512(
    const int8_t *q, const float *row_scales, int D, const int8_t *a, const float *c, float *y, int r0) {
    const __m512i offset = _mm512_set1_epi8((char)0x80);
    __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int A = D / ACT_BLOCK, b = 0;
    for (; b + 1 < A; b += 2) {
        __m512i av = _mm512_loadu_si512((const void *)(a + b * ACT_BLOCK));
        __m512i start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, av));
        __m256 c0 = _mm256_set1_ps(c[b]), c1 = _mm256_set1_ps(c[b + 1]);
        for (int j = 0; j < 4; j++) {
            __m512i w = _mm512_loadu_si512((const void *)(q + (long)(r0 + j) * D + b * ACT_BLOCK));
            __m512 p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, _mm512_xor_si512(w, offset), av));
            f[j] = _mm256_fmadd_ps(_mm512_castps512_ps256(p), c0, f[j]);
            f[j] = _mm256_fmadd_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1)), c1, f[j]);
        }
    }
    if (b < A) {
        const __m256i offset8 = _mm512_castsi512_si256(offset);
        __m256i av = _mm256_loadu_si256((const __m256i *)(a + b * ACT_BLOCK));
        __m256i start = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_dpbusd_epi32(_mm256_setzero_si256(), offset8, av));
        __m256 cb = _mm256_set1_ps(c[b]);
        for (int j = 0; j < 4; j++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(q + (long)(r0 + j) * D + b * ACT_BLOCK));
            __m256i p = _mm256_dpbusd_epi32(start, _mm256_xor_si256(w, offset8), av);
            f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), cb, f[j]);
        }
    }
    for (int j = 0; j < 4; j++) {
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(f[j]), _mm256_extractf128_ps(f[j], 1));
        s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
        y[r0 + j] = _mm_cvtss_f32(s4) * row_scales[r0 + j];
    }
}

/* n <= 4 output rows from r0: four in VNNI where the CPU has it, else (and fewer) AVX2. */
static inline __attribute__((target("avx2,fma"))) void int8_rows(const int8_t *q, const float *row_scales, int D,
                                                                 const int8_t *a, const float *c, float *y, int r0,
                                                                 int n) {
    if (use_avx512 && n == 4)
        int8_four_rows_512(q, row_scales, D, a, c, y, r0);
    else
        int8_four_rows(q, row_scales, D, a, c, y, r0, n);
}

/* y [M, O] = x [M, D] @ (Q s)^T for a few rows of x: threads over blocks of 4 output rows (the last
   block O % 4 rows where O is not a multiple of 4), a block's codes kept in the core's cache while each row of x passes over
   them. */
__attribute__((target("avx2,fma"))) int int8_linear_avx2(const int8_t *q, const float *row_scales, int O, int D,
                                                          const void *x, int x_bf16, int M, void *y, int y_bf16,
                                                          int threads) {
    int A = D / ACT_BLOCK;
    int8_t *codes = malloc((size_t)M * D);
    float *fbuf = malloc(sizeof(float) * (size_t)M * (A + (x_bf16 ? D : 0) + (y_bf16 ? O : 0)));
    if (!codes || !fbuf) {
        free(codes);
        free(fbuf);
        return -1;
    }
    float *act_scales = fbuf, *widened = fbuf + (size_t)M * A;
    float *out = y_bf16 ? widened + (x_bf16 ? (size_t)M * D : 0) : (float *)y;
    quantize_rows(x, x_bf16, M, D, ACT_BLOCK, codes, act_scales, NULL, NULL, widened, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r0 = 0; r0 < O; r0 += 4)
        for (int m = 0; m < M; m++)
            int8_rows(q, row_scales, D, codes + (long)m * D, act_scales + (long)m * A, out + (long)m * O, r0,
                      O - r0 < 4 ? O - r0 : 4);
    if (y_bf16)
        for (int m = 0; m < M; m++) store_row(out + (long)m * O, y, 1, m, O);
    free(codes);
    free(fbuf);
    return 0;
}

/* One token through k int8 routed experts, as int4_experts_one_token does for int4: the experts stacked
   as stored, w1 and w3 [E, I, D], w2 [E, D, I], their row scales s1, s3 [E, I] and s2 [E, D]. */
__attribute__((target("avx2,fma"))) int int8_experts_one_token(const void *x, int x_bf16, int D, int I, const int8_t *w1,
                                                                const int8_t *w3, const int8_t *w2, const float *s1,
                                                                const float *s3, const float *s2,
                                                                const int64_t *ids, const float *weights, int k,
                                                                void *out, int out_bf16, int threads) {
    int chosen[MAX_EXPERTS], P = 0;
    for (int j = 0; j < k && P < MAX_EXPERTS; j++)
        if (ids[j] >= 0) chosen[P++] = j;
    int A = D / ACT_BLOCK, AI = I / ACT_BLOCK;
    int8_t *codes = malloc((size_t)D + (size_t)P * I), *hidden_codes = codes + D;
    float *fbuf = malloc(sizeof(float) * ((size_t)A + (size_t)P * (2 * I + AI + D) + 2 * (size_t)D));
    if (!codes || !fbuf) {
        free(codes);
        free(fbuf);
        return -1;
    }
    float *act_scales = fbuf, *h = fbuf + A, *h_scales = h + (size_t)P * 2 * I, *y = h_scales + (size_t)P * AI;
    float *widened = y + (size_t)P * D, *mixed = widened + D;
    quantize_row(row_as_floats(x, x_bf16, 0, D, widened), D, ACT_BLOCK, codes, act_scales, NULL, NULL);
    int up_blocks = 2 * (I / 4), down_blocks = D / 4;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int item = 0; item < P * up_blocks; item++) {
            int p = item / up_blocks, r = item % up_blocks;
            long e = ids[chosen[p]];
            int up = r >= I / 4; /* w1's rows first, then w3's */
            const int8_t *w = (up ? w3 : w1) + e * I * (long)D;
            const float *s = (up ? s3 : s1) + e * I;
            int8_rows(w, s, D, codes, act_scales, h + (long)p * 2 * I + (up ? I : 0), 4 * (r - up * (I / 4)), 4);
        }
#pragma omp for schedule(static)
        for (int p = 0; p < P; p++) {
            float *hp = h + (long)p * 2 * I; /* silu(gate) * up, in place over the gate half */
            silu_times_up(hp, I);
            quantize_row(hp, I, ACT_BLOCK, hidden_codes + (long)p * I, h_scales + (long)p * AI, NULL, NULL);
        }
#pragma omp for schedule(static)
        for (int item = 0; item < P * down_blocks; item++) {
            int p = item / down_blocks;
            long e = ids[chosen[p]];
            int8_rows(w2 + e * D * (long)I, s2 + e * D, I, hidden_codes + (long)p * I, h_scales + (long)p * AI,
                      y + (long)p * D, 4 * (item % down_blocks), 4);
        }
        mix_experts(y, D, weights, chosen, P, D, mixed);
    }
    store_row(mixed, out, out_bf16, 0, D);
    free(codes);
    free(fbuf);
    return 0;
}


/* Q * s[:, None] for int8 codes Q [O, D] and float32 row scales s [O], into out [O, D] in float32 or
   bfloat16 (out_bf16): the weight a many-row product multiplies on the CPU. Each value is the float32
   product rounded once to the output's dtype, as kernels/quant/naive.py's dequantize_rows gives it, in
   one pass over the codes where PyTorch's cast and scaling take two over the wider output. Threads over
   rows. */
__attribute__((target("avx2,fma"))) void int8_dequantize_rows(const int8_t *q, const float *scale, long O, long D,
                                                              void *out, int out_bf16, int threads) {
    /* a few rows (a decode step's embedding) are done before a sleeping pool of threads would wake */
#pragma omp parallel for num_threads(threads) schedule(static) if (O * D >= 65536)
    for (long r = 0; r < O; r++) {
        const int8_t *row = q + r * D;
        const __m256 s = _mm256_set1_ps(scale[r]);
        long d = 0;
        for (; d + 8 <= D; d += 8) {
            __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + d)))), s);
            if (!out_bf16) {
                _mm256_storeu_ps((float *)out + r * D + d, v);
                continue;
            }
            /* round to nearest even on the top 16 bits (the values are finite) */
            __m256i u = _mm256_castps_si256(v);
            __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
            u = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
            __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
            _mm_storeu_si128((__m128i *)((uint16_t *)out + r * D + d), packed);
        }
        for (; d < D; d++) {
            float v = (float)row[d] * scale[r];
            if (out_bf16)
                ((uint16_t *)out)[r * D + d] = round_to_bf16(v);
            else
                ((float *)out)[r * D + d] = v;
        }
    }
}

/* Whether this CPU runs the kernels above; notes whether it has AVX-512 VNNI for the many-rows path. */
int cpu_supported(void) {
    __builtin_cpu_init();
    use_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                 __builtin_cpu_supports("avx512vbmi");
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* The products' instructions: AVX-512 VNNI where `on` and the CPU has it, else AVX2 (the tests compare
   the two); `on` < 0 changes nothing. Returns whether AVX-512 is used. */
int use_avx512_products(int on) {
    if (on >= 0) {
        cpu_supported();
        use_avx512 = use_avx512 && on;
    }
    return use_avx512;
}
