/* Kimi Delta Attention's decode step on an AVX2 CPU: from the layer's raw projections to the output
   norm, in one call that advances the convolution windows and the recurrent state in place.

   Why: in PyTorch the step is some fifty small operations a layer (the short convolutions, the q and k
   norms, the gate, beta's sigmoid, the recurrence, the gated norm), each a pass over memory and a few
   microseconds of dispatch, and the recurrence alone reads and writes the float32 state [H, K, V]
   (2 MiB a layer at the 48B shapes) five or six times. Here each head's state is read once from memory
   (the S^T k of the delta rule) and then, while it sits in the core's cache, decayed, updated and
   multiplied by q in one second pass; the exponentials and logarithms of the gate, the SiLUs and the
   sigmoids go 8 at a time in AVX2.

   Per head h and token, with the inputs after their convolutions and SiLU (kimi-linear-spec §3.2):
     q = q / |q| * K^-1/2,  k = k / |k|  (|x| = sqrt(sum x^2 + 1e-6), as fla),
     g = -exp(A_log[h]) softplus(f + dt_bias)  (softplus linear above 20),  beta = sigmoid(b),
     S = diag(exp(g)) S,  u = beta (v - S^T k),  S = S + k u^T,  o = S^T q,
     out = o / sqrt(mean(o^2) + eps) * norm_weight * sigmoid(gate).
   kernels/kda/naive.py (prepare_kda_torch, recurrent_kda_inplace), engine/kda.py's short_conv and
   kernels/norm/naive.py's gated_rms_norm_torch are the same function in PyTorch, and the tests'
   reference.

   Threads: OpenMP over (sequence, head) pairs; a pair's tokens go in order. PyTorch's own OpenMP
   runtime (libgomp.so.1) is already loaded, so both share one pool. */

#include <immintrin.h>
#include <math.h>

#include "../avx2_math.h"

#define MAX_HEAD_DIM 256
#define MAX_CONV 8

/* log(x) for normal x > 0, 8 at a time: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by the classic
   minimax polynomial in m - 1 (relative error about 1e-7). */
static inline __attribute__((target("avx2,fma"))) __m256 log_ps(__m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
    __m256 m = _mm256_castsi256_ps(
        _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
    const __m256 high = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), high);
    e = _mm256_sub_epi32(e, _mm256_castps_si256(high)); /* the mask is -1 where m was halved */
    const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f)), ef = _mm256_cvtepi32_ps(e);
    const float c[9] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                        -1.6668057665e-1f, 2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};
    __m256 p = _mm256_set1_ps(c[0]);
    for (int i = 1; i < 9; i++) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c[i]));
    const __m256 f2 = _mm256_mul_ps(f, f);
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), f2);
    y = _mm256_fmadd_ps(ef, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), f2, y);
    return _mm256_fmadd_ps(ef, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

/* The short convolutions of 8 channels for one token: x times the last tap plus the window times the
   others, the windows shifted to take x; SiLU of the sums. */
static inline __attribute__((target("avx2,fma"))) void conv_8(const float *x, const float *taps, float *windows,
                                                             int W, float *y) {
    float sums[8] __attribute__((aligned(32)));
    for (int c = 0; c < 8; c++) {
        const float *w = taps + c * W;
        float *window = windows + c * (W - 1);
        float sum = x[c] * w[W - 1];
        for (int j = 0; j < W - 1; j++) sum += window[j] * w[j];
        for (int j = 0; j < W - 2; j++) window[j] = window[j + 1];
        window[W - 2] = x[c];
        sums[c] = sum;
    }
    const __m256 s = _mm256_load_ps(sums);
    _mm256_storeu_ps(y, _mm256_mul_ps(s, sigmoid_ps(s)));
}

/* exp(-a softplus(z)) of 8 gate inputs z (softplus linear above 20, as fla's): log1p(exp(z)) as
   max(z, 0) + log1p(exp(-|z|)), and log1p(t) as log(1 + t) t / ((1 + t) - 1), exact where 1 + t rounds. */
static inline __attribute__((target("avx2,fma"))) __m256 decay_8(__m256 z, __m256 a) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    const __m256 t = exp_ps(_mm256_sub_ps(zero, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z)));
    const __m256 u = _mm256_add_ps(one, t), d = _mm256_sub_ps(u, one);
    const __m256 ratio = _mm256_blendv_ps(_mm256_div_ps(t, d), one, _mm256_cmp_ps(d, zero, _CMP_EQ_OQ));
    const __m256 log1p = _mm256_blendv_ps(_mm256_mul_ps(log_ps(u), ratio), t, _mm256_cmp_ps(d, zero, _CMP_EQ_OQ));
    __m256 softplus = _mm256_add_ps(_mm256_max_ps(z, zero), log1p);
    softplus = _mm256_blendv_ps(softplus, z, _mm256_cmp_ps(z, _mm256_set1_ps(20.0f), _CMP_GT_OQ));
    return exp_ps(_mm256_mul_ps(_mm256_sub_ps(zero, a), softplus));
}

static inline __attribute__((target("avx2,fma"))) void to_unit(float *x, int K, float times) {
    float sum = 0.0f;
    for (int i = 0; i < K; i++) sum += x[i] * x[i];
    float inverse = times / sqrtf(sum + 1e-6f);
    for (int i = 0; i < K; i++) x[i] *= inverse;
}

/* The delta rule for one head and token, the state S [K, V = K] row-major, in two passes over it. */
static inline __attribute__((target("avx2,fma"))) void delta_rule(float *restrict S, const float *restrict q,
                                                                 const float *restrict k, const float *restrict v,
                                                                 const float *restrict decay, float beta, int K,
                                                                 float *restrict o) {
    float u[MAX_HEAD_DIM] __attribute__((aligned(32)));
    for (int j = 0; j < K; j++) u[j] = 0.0f;
    for (int i = 0; i < K; i++) { /* u = (diag(decay) S)^T k */
        const float c = k[i] * decay[i];
        const float *row = S + (long)i * K;
        for (int j = 0; j < K; j++) u[j] += c * row[j];
    }
    for (int j = 0; j < K; j++) u[j] = beta * (v[j] - u[j]);
    for (int j = 0; j < K; j++) o[j] = 0.0f;
    for (int i = 0; i < K; i++) { /* S = diag(decay) S + k u^T, o = S^T q */
        const float d = decay[i], ki = k[i], qi = q[i];
        float *row = S + (long)i * K;
        for (int j = 0; j < K; j++) {
            const float s = d * row[j] + ki * u[j];
            row[j] = s;
            o[j] += qi * s;
        }
    }
}

/* One decode step of a KDA layer for B sequences of T tokens (T small: the tokens go one after another).

   inputs: q, k, v (before their convolutions), f (the forget gate's input, H * K), gate (the output
   gate's input, H * K) and b (beta's logits, H) of every token, each a matrix of B * T rows, row r at
   inputs[n] + r * strides[n] (elements). taps: the three convolutions' weights [H * K, W]; windows:
   [B, 3, H * K, W - 1], the inputs before these tokens (advanced in place); A_log [H], dt_bias [H * K],
   norm_weight [K]; state [B, H, K, K] (advanced in place); out [B, T, H, K]. The inputs, the windows and
   out are float32, or all bfloat16 where `bf16` (widened here, the sums in float32; the windows rounded
   back exactly, since they hold inputs, and out rounded once). Returns -1 when K or W is beyond what the
   buffers hold or K is not a multiple of 8, else 0. */
__attribute__((target("avx2,fma"))) int kda_decode_step(int B, int T, int H, int K, int W, int bf16,
                                                        const void *const *inputs, const long *strides,
                                                        const float *const *taps, void *windows, const float *A_log,
                                                        const float *dt_bias, const float *norm_weight, float eps,
                                                        float *state, void *out, int threads) {
    if (K > MAX_HEAD_DIM || K % 8 || W > MAX_CONV || W < 2) return -1;
    const long P = (long)H * K, span = (long)K * (W - 1);
    const float scale = 1.0f / sqrtf((float)K);
    const int size = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int pair = 0; pair < B * H; pair++) {
        const int b = pair / H, h = pair % H;
        float qkv[3][MAX_HEAD_DIM] __attribute__((aligned(32)));
        float decay[MAX_HEAD_DIM] __attribute__((aligned(32)));
        float widened[5][MAX_HEAD_DIM] __attribute__((aligned(32)));
        float widened_windows[3][MAX_HEAD_DIM * (MAX_CONV - 1)];
        float o_row[MAX_HEAD_DIM] __attribute__((aligned(32)));
        float *S = state + (long)pair * K * K;
        float *window[3];
        for (int n = 0; n < 3; n++) {
            long first = ((long)b * 3 + n) * P * (W - 1) + (long)h * span;
            window[n] = bf16 ? widened_windows[n] : (float *)windows + first;
            if (bf16) widen_bf16((const uint16_t *)windows + first, widened_windows[n], span);
        }
        const float a = expf(A_log[h]);
        for (int t = 0; t < T; t++) {
            const long r = (long)b * T + t;
            const float *in[5];
            for (int n = 0; n < 5; n++) {
                const char *row = (const char *)inputs[n] + (r * strides[n] + (long)h * K) * size;
                in[n] = bf16 ? widened[n] : (const float *)row;
                if (bf16) widen_bf16((const uint16_t *)row, widened[n], K);
            }
            const float beta_logit = bf16 ? from_bf16(((const uint16_t *)inputs[5])[r * strides[5] + h])
                                          : ((const float *)inputs[5])[r * strides[5] + h];
            for (int n = 0; n < 3; n++) {
                const float *w = taps[n] + (long)h * K * W;
                for (int i = 0; i < K; i += 8) conv_8(in[n] + i, w + (long)i * W, window[n] + (long)i * (W - 1), W, qkv[n] + i);
            }
            to_unit(qkv[0], K, scale);
            to_unit(qkv[1], K, 1.0f);
            const float *bias = dt_bias + (long)h * K;
            for (int i = 0; i < K; i += 8)
                _mm256_store_ps(decay + i, decay_8(_mm256_add_ps(_mm256_loadu_ps(in[3] + i), _mm256_loadu_ps(bias + i)),
                                                   _mm256_set1_ps(a)));
            const float beta = 1.0f / (1.0f + expf(-beta_logit));
            float *o = bf16 ? o_row : (float *)out + (r * H + h) * K;
            delta_rule(S, qkv[0], qkv[1], qkv[2], decay, beta, K, o);
            float sum = 0.0f;
            for (int j = 0; j < K; j++) sum += o[j] * o[j];
            const float inverse = 1.0f / sqrtf(sum / K + eps);
            for (int j = 0; j < K; j += 8) {
                const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(o + j), _mm256_set1_ps(inverse));
                const __m256 weighted = _mm256_mul_ps(scaled, _mm256_loadu_ps(norm_weight + j));
                _mm256_storeu_ps(o + j, _mm256_mul_ps(weighted, sigmoid_ps(_mm256_loadu_ps(in[4] + j))));
            }
            if (bf16) store_row(o, out, 1, r * H + h, K);
        }
        for (int n = 0; bf16 && n < 3; n++)
            store_row(widened_windows[n], (uint16_t *)windows + ((long)b * 3 + n) * P * (W - 1) + (long)h * span, 1, 0,
                      span);
    }
    return 0;
}

/* Whether this CPU runs the kernel above. */
int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
