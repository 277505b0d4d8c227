/* Kimi Delta Attention's prefill on an AVX2 CPU: the short convolutions of every token (kda_short_conv)
   and the chunked form's inputs of every chunk (kda_chunk_inputs), each in one call.

   The convolutions: in PyTorch (engine/kda.py's short_conv) W shifted multiply-adds, a SiLU and the
   dtype conversions are some ten passes over [T, 3 H K] float32 tensors; here each block of channels
   goes through the tokens once, its window and taps in the core's cache.

   The chunks' inputs: kernels/kda/naive.py's chunk_inputs_torch lays out every chunk's q, k, v and
   gates (copies and dtype conversions), sums the gates, and builds for each chunk of C tokens the
   strictly lower triangle of A_qk[i, j] = sum_d q_i k_j exp(G_i - G_j) and the inverse T of the unit
   lower-triangular (I + beta A_kk) by halving: log2(C) levels, each a dozen PyTorch operations over
   every chunk of every head at once (tensors of megabytes, written and read again between operations),
   then the products' other inputs. Here one chunk is read from the layer's tensors as they are and stays
   in the core's cache through all of it, and the exponentials go 8 at a time.

   The same arithmetic as chunk_inputs_torch's (chunk_kda_torch's docstring says why it is safe for
   unbounded gates): for each diagonal block of b tokens (b = 2, 4, .., C), r the first row of its second
   half, rows i >= r are scaled by exp(G_i - G_r) and columns j < r by exp(G_r - G_j), both <= 1, each
   exponent a float64 difference of the float64 cumulative gates rounded once to float32; the block's
   lower-left quadrant of A_qk and A_kk is then a product of the scaled rows, and T's quadrant is
   -T2 (beta A_kk)21 T1 from the inverses of its halves, already in place from the level below
   (chunk_blocks, for one chunk: qk [C, 2, K] each token's q, already scaled, then its k; beta [C];
   G [C, K] float64; aqk and inverse [C, C] written whole, zeros above the diagonal).

   Threads: OpenMP over channel blocks (the convolutions) and over chunks (PyTorch's own runtime,
   libgomp.so.1, is already loaded: one pool). */

#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

#include "../avx2_math.h"

#define MAX_CHUNK 64
#define MAX_HEAD_DIM 256
#define MAX_CONV 8
#define CONV_BLOCK 64 /* channels a thread takes through the tokens at a time */

/* 8 values at p (float32, or bfloat16 where bf16) as float32. */
static inline __attribute__((target("avx2,fma"))) __m256 load_8(const void *p, int bf16) {
    return bf16 ? load_bf16x8((const uint16_t *)p) : _mm256_loadu_ps((const float *)p);
}

/* The depthwise causal convolutions over time and their SiLU, for B sequences of T tokens: engine/kda.py's
   short_conv of q, k and v side by side.

   inputs: q, k and v before their convolutions, each a matrix of B * T rows of P values, row r at
   inputs[n] + r * strides[n] (elements); taps: the three weights [P, W] float32 (tap W - 1 multiplies
   the current token); windows [B, 3, P, W - 1]: the inputs before these tokens, advanced in place to the
   last W - 1; out [B * T, 3 P]: SiLU(sum), q's then k's then v's channels. Inputs, windows and out are
   float32, or all bfloat16 where `bf16` (the sums in float32, out rounded once; windows hold inputs,
   so they stay exact). Returns -1 when P is not a multiple of 8 or W is outside 2..MAX_CONV, else 0. */
__attribute__((target("avx2,fma"))) int kda_short_conv(int B, int T, long P, int W, int bf16, const void *const *inputs,
                                                       const long *strides, const float *const *taps, void *windows,
                                                       void *out, int threads) {
    if (P % 8 || W < 2 || W > MAX_CONV) return -1;
    const long blocks = (P + CONV_BLOCK - 1) / CONV_BLOCK, tasks = (long)B * 3 * blocks;
    const int size = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long task = 0; task < tasks; task++) {
        const int b = (int)(task / (3 * blocks)), n = (int)(task / blocks % 3);
        const long first = task % blocks * CONV_BLOCK, count = P - first < CONV_BLOCK ? P - first : CONV_BLOCK;
        /* window[j][c]: the input j + 1 tokens before the last of the window's W - 1; w[j][c] the taps. */
        float window[MAX_CONV - 1][CONV_BLOCK] __attribute__((aligned(32)));
        float w[MAX_CONV][CONV_BLOCK] __attribute__((aligned(32)));
        float y[CONV_BLOCK] __attribute__((aligned(32)));
        char *kept = (char *)windows + ((((long)b * 3 + n) * P + first) * (W - 1)) * size;
        for (long c = 0; c < count; c++) {
            for (int j = 0; j < W; j++) w[j][c] = taps[n][(first + c) * W + j];
            for (int j = 0; j < W - 1; j++)
                window[j][c] = bf16 ? from_bf16(((const uint16_t *)kept)[c * (W - 1) + j])
                                    : ((const float *)kept)[c * (W - 1) + j];
        }
        for (int t = 0; t < T; t++) {
            const long r = (long)b * T + t;
            const char *x = (const char *)inputs[n] + (r * strides[n] + first) * size;
            for (long c = 0; c < count; c += 8) {
                const __m256 now = load_8(x + c * size, bf16);
                __m256 sum = _mm256_mul_ps(now, _mm256_load_ps(w[W - 1] + c));
                for (int j = 0; j < W - 1; j++)
                    sum = _mm256_fmadd_ps(_mm256_load_ps(window[j] + c), _mm256_load_ps(w[j] + c), sum);
                for (int j = 0; j < W - 2; j++) _mm256_store_ps(window[j] + c, _mm256_load_ps(window[j + 1] + c));
                _mm256_store_ps(window[W - 2] + c, now);
                _mm256_store_ps(y + c, _mm256_mul_ps(sum, sigmoid_ps(sum)));
            }
            char *row = (char *)out + (r * 3 * P + n * P + first) * size;
            if (bf16)
                for (long c = 0; c < count; c++) ((uint16_t *)row)[c] = round_to_bf16(y[c]);
            else
                memcpy(row, y, sizeof(float) * count);
        }
        for (long c = 0; c < count; c++)
            for (int j = 0; j < W - 1; j++) {
                if (bf16)
                    ((uint16_t *)kept)[c * (W - 1) + j] = round_to_bf16(window[j][c]);
                else
                    ((float *)kept)[c * (W - 1) + j] = window[j][c];
            }
    }
    return 0;
}

/* exp(x), 8 at a time, 0 below -87 (exp_ps stops at exp(-87) ~ 1.6e-38 there): a decay that far down
   is none left, as PyTorch's exp gives it. */
static inline __attribute__((target("avx2,fma"))) __m256 decay_ps(__m256 x) {
    return _mm256_and_ps(exp_ps(x), _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ));
}

/* exp((float)(a - b)) for 8 consecutive float64 pairs. */
static inline __attribute__((target("avx2,fma"))) __m256 exp_of_difference(const double *a, const double *b) {
    const __m128 low = _mm256_cvtpd_ps(_mm256_sub_pd(_mm256_loadu_pd(a), _mm256_loadu_pd(b)));
    const __m128 high = _mm256_cvtpd_ps(_mm256_sub_pd(_mm256_loadu_pd(a + 4), _mm256_loadu_pd(b + 4)));
    return decay_ps(_mm256_insertf128_ps(_mm256_castps128_ps256(low), high, 1));
}

static inline __attribute__((target("avx2,fma"))) float dot(const float *a, const float *b, int K) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int d = 0;
    for (; d + 16 <= K; d += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), s1);
    }
    if (d < K) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s0);
    return hsum(_mm256_add_ps(s0, s1));
}

/* One chunk: see the file's comment. */
static __attribute__((target("avx2,fma"))) void chunk_blocks(int C, int K, const float *qk, const float *beta,
                                                             const double *G, float *aqk, float *inverse) {
    /* The scaled rows of one quadrant (q and k of tokens r.., then k of tokens m..r), and its products. */
    float rows_q[MAX_CHUNK / 2][MAX_HEAD_DIM], rows_k[MAX_CHUNK / 2][MAX_HEAD_DIM];
    float cols_k[MAX_CHUNK / 2][MAX_HEAD_DIM];
    float a21[MAX_CHUNK / 2][MAX_CHUNK / 2], t2a21[MAX_CHUNK / 2][MAX_CHUNK / 2];
    const long row = 2L * K;
    for (long n = 0; n < (long)C * C; n++) aqk[n] = inverse[n] = 0.0f;
    for (int i = 0; i < C; i++) {
        aqk[i * C + i] = dot(qk + i * row, qk + i * row + K, K);
        inverse[i * C + i] = 1.0f;
    }
    for (int b = 2; b <= C; b *= 2) {
        const int h = b / 2;
        for (int m = 0; m < C; m += b) {
            const int r = m + h;
            const double *G_r = G + (long)r * K;
            for (int i = 0; i < h; i++) {
                const float *q = qk + (r + i) * row, *k = q + K;
                const double *G_i = G + (long)(r + i) * K;
                for (int d = 0; d < K; d += 8) {
                    const __m256 to_ref = exp_of_difference(G_i + d, G_r + d); /* exp(G_i - G_r) */
                    _mm256_storeu_ps(rows_q[i] + d, _mm256_mul_ps(_mm256_loadu_ps(q + d), to_ref));
                    _mm256_storeu_ps(rows_k[i] + d, _mm256_mul_ps(_mm256_loadu_ps(k + d), to_ref));
                }
            }
            for (int j = 0; j < h; j++) {
                const float *k = qk + (m + j) * row + K;
                const double *G_j = G + (long)(m + j) * K;
                for (int d = 0; d < K; d += 8) {
                    const __m256 from_ref = exp_of_difference(G_r + d, G_j + d); /* exp(G_r - G_j) */
                    _mm256_storeu_ps(cols_k[j] + d, _mm256_mul_ps(_mm256_loadu_ps(k + d), from_ref));
                }
            }
            for (int i = 0; i < h; i++) {
                for (int j = 0; j < h; j++) {
                    aqk[(r + i) * C + m + j] = dot(rows_q[i], cols_k[j], K);
                    a21[i][j] = beta[r + i] * dot(rows_k[i], cols_k[j], K);
                }
            }
            /* T's quadrant: -(T2 a21) T1, T2 = inverse[r.., r..] and T1 = inverse[m.., m..], lower triangular. */
            for (int i = 0; i < h; i++) {
                for (int j = 0; j < h; j++) t2a21[i][j] = 0.0f;
                for (int t = 0; t <= i; t++) {
                    const float s = inverse[(r + i) * C + r + t];
                    for (int j = 0; j < h; j++) t2a21[i][j] += s * a21[t][j];
                }
            }
            for (int i = 0; i < h; i++) {
                float *out = inverse + (r + i) * C + m;
                for (int t = 0; t < h; t++) {
                    const float s = -t2a21[i][t];
                    const float *t1 = inverse + (m + t) * C + m;
                    for (int j = 0; j <= t; j++) out[j] += s * t1[j];
                }
            }
        }
    }
}

/* 8 consecutive float64 values rounded to float32. */
static inline __attribute__((target("avx2,fma"))) __m256 float_8(const double *a) {
    const __m128 low = _mm256_cvtpd_ps(_mm256_loadu_pd(a)), high = _mm256_cvtpd_ps(_mm256_loadu_pd(a + 4));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(low), high, 1);
}

/* One chunk's rhs (its first K columns; the values' V are already in place), kg, qg and last, from its
   q and k (qk: q scaled), beta and G (kda_chunk_inputs says what each is). */
static __attribute__((target("avx2,fma"))) void chunk_products_inputs(int C, int K, long W, const float *qk,
                                                                       const float *bc, const double *G, float *rhs,
                                                                       float *kg, float *qg, float *last) {
    const double *G_last = G + (long)(C - 1) * K;
    for (int i = 0; i < C; i++) {
        const float *qi = qk + (long)i * 2 * K, *ki = qi + K;
        const double *Gi = G + (long)i * K;
        const __m256 beta = _mm256_set1_ps(bc[i]);
        for (int d = 0; d < K; d += 8) {
            const __m256 decay = decay_ps(float_8(Gi + d)), k = _mm256_loadu_ps(ki + d);
            _mm256_storeu_ps(rhs + (long)i * W + d, _mm256_mul_ps(_mm256_mul_ps(decay, k), beta));
            _mm256_storeu_ps(kg + (long)i * K + d, _mm256_mul_ps(k, exp_of_difference(G_last + d, Gi + d)));
            _mm256_storeu_ps(qg + (long)i * K + d, _mm256_mul_ps(_mm256_loadu_ps(qi + d), decay));
        }
    }
    for (int d = 0; d < K; d += 8) _mm256_storeu_ps(last + d, decay_ps(float_8(G_last + d)));
}

/* The chunked form's inputs, straight from the layer's prepared tensors: for each chunk x of C tokens
   (chunk-major, then sequence, then head: x = (n B + b) H + h, as naive.py's chunk_kda_torch orders
   them; tokens past T are zeros, which are inert), with G the float64 sum of g from the chunk's start:
     aqk, inverse [X, C, C]: chunk_blocks' A_qk and T;
     rhs [X, C, K + V]: (exp(G_i) k_i) beta_i, then v_i beta_i;
     kg [X, C, K]: k_i exp(G_last - G_i);  qg [X, C, K]: (scale q_i) exp(G_i);  last [X, K]: exp(G_last),
   each exponent a float64 difference (or value) rounded once to float32, as chunk_kda_torch's.
   q, k [B * T rows, H * K], v [B * T rows, H * V]: float32, or bfloat16 where bf16, row r at
   x + r * stride (elements); g [B * T rows, H * K] and beta [B * T rows, H] float32, likewise.
   Returns 1 when C, K or V is beyond this file's buffers, 2 when scratch cannot be allocated. */
int kda_chunk_inputs(int B, int T, int H, int K, int V, int C, int bf16, const void *q, long q_stride,
                     const void *k, long k_stride, const void *v, long v_stride, const float *g, long g_stride,
                     const float *beta, long beta_stride, float scale, float *aqk, float *inverse, float *rhs,
                     float *kg, float *qg, float *last, int threads) {
    if (C < 1 || C > MAX_CHUNK || (C & (C - 1)) || K < 8 || K > MAX_HEAD_DIM || K % 8 || V < 1 || V > MAX_HEAD_DIM)
        return 1;
    const long N = (T + C - 1) / C, X = N * B * H, W = (long)K + V;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *qk = malloc(sizeof(float) * (size_t)C * 2 * K), *bc = malloc(sizeof(float) * (size_t)C);
        double *G = malloc(sizeof(double) * (size_t)C * K);
        failed = !qk || !bc || !G;
#pragma omp for schedule(static)
        for (long x = 0; x < X; x++) {
            if (failed) continue;
            const int h = (int)(x % H), b = (int)(x / H % B);
            const long n = x / ((long)H * B);
            float *rhs_x = rhs + x * C * W, *kg_x = kg + x * C * K, *qg_x = qg + x * C * K;
            for (int i = 0; i < C; i++) {
                const long t = n * C + i, r = (long)b * T + t;
                float *qi = qk + (long)i * 2 * K, *ki = qi + K, *ri = rhs_x + (long)i * W;
                double *Gi = G + (long)i * K;
                if (t >= T) { /* padding: g = 0 keeps the sums, beta = 0, q = k = v = 0 */
                    for (int d = 0; d < K; d++) qi[d] = ki[d] = 0.0f, Gi[d] = i ? Gi[d - K] : 0.0;
                    for (int d = 0; d < V; d++) ri[K + d] = 0.0f;
                    bc[i] = 0.0f;
                    continue;
                }
                const long hq = (long)h * K, hv = (long)h * V;
                for (int d = 0; d < K; d++) {
                    qi[d] = (bf16 ? from_bf16(((const uint16_t *)q)[r * q_stride + hq + d]) : ((const float *)q)[r * q_stride + hq + d]) * scale;
                    ki[d] = bf16 ? from_bf16(((const uint16_t *)k)[r * k_stride + hq + d]) : ((const float *)k)[r * k_stride + hq + d];
                    Gi[d] = (i ? Gi[d - K] : 0.0) + (double)g[r * g_stride + hq + d];
                }
                const float beta_i = beta[r * beta_stride + h];
                for (int d = 0; d < V; d++)
                    ri[K + d] = (bf16 ? from_bf16(((const uint16_t *)v)[r * v_stride + hv + d]) : ((const float *)v)[r * v_stride + hv + d]) * beta_i;
                bc[i] = beta_i;
            }
            chunk_blocks(C, K, qk, bc, G, aqk + x * C * C, inverse + x * C * C);
            chunk_products_inputs(C, K, W, qk, bc, G, rhs_x, kg_x, qg_x, last + x * K);
        }
        free(qk);
        free(bc);
        free(G);
    }
    return failed ? 2 : 0;
}

int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
