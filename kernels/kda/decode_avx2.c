/* Kimi Delta Attention's decode step on an AVX2 CPU: from the layer's raw projections to the output
   norm, in one call that advances the convolution windows and the recurrent state in place.

   Why: in PyTorch the step is some fifty small operations a layer (the short convolutions, the q and k
   norms, the gate, beta's sigmoid, the recurrence, the gated norm), each a pass over memory and a few
   microseconds of dispatch, and the recurrence alone reads and writes the float32 state [H, K, V]
   (2 MiB a layer at the 48B shapes) five or six times. Here each head's state is read once from memory
   (the S^T k of the delta rule) and then, while it sits in the core's cache, decayed, updated and
   multiplied by q in one second pass.

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

#include <math.h>
#include <string.h>

#define MAX_HEAD_DIM 256
#define MAX_CONV 8

/* The short convolution of one channel for one token: x times the last tap plus the window times the
   others, the window shifted to take x; SiLU of the sum. */
static inline float conv_channel(float x, const float *taps, float *window, int W) {
    float y = x * taps[W - 1];
    for (int j = 0; j < W - 1; j++) y += window[j] * taps[j];
    for (int j = 0; j < W - 2; j++) window[j] = window[j + 1];
    window[W - 2] = x;
    return y / (1.0f + expf(-y));
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
   inputs[n] + r * strides[n] (floats). taps: the three convolutions' weights [H * K, W]; windows:
   [B, 3, H * K, W - 1], the inputs before these tokens (advanced in place); A_log [H], dt_bias [H * K],
   norm_weight [K]; state [B, H, K, K] (advanced in place); out [B, T, H, K]. Returns -1 when K or W is
   beyond what the buffers hold, else 0. */
__attribute__((target("avx2,fma"))) int kda_decode_step(int B, int T, int H, int K, int W, const float *const *inputs,
                                                        const long *strides, const float *const *taps,
                                                        float *windows, const float *A_log, const float *dt_bias,
                                                        const float *norm_weight, float eps, float *state, float *out,
                                                        int threads) {
    if (K > MAX_HEAD_DIM || W > MAX_CONV || W < 2) return -1;
    const long P = (long)H * K;
    const float scale = 1.0f / sqrtf((float)K);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int pair = 0; pair < B * H; pair++) {
        const int b = pair / H, h = pair % H;
        float qkv[3][MAX_HEAD_DIM] __attribute__((aligned(32)));
        float decay[MAX_HEAD_DIM] __attribute__((aligned(32)));
        float *S = state + (long)pair * K * K;
        const float a = expf(A_log[h]);
        for (int t = 0; t < T; t++) {
            const long r = (long)b * T + t;
            for (int n = 0; n < 3; n++) {
                const float *x = inputs[n] + r * strides[n] + (long)h * K;
                const float *w = taps[n] + (long)h * K * W;
                float *window = windows + (((long)b * 3 + n) * P + (long)h * K) * (W - 1);
                for (int i = 0; i < K; i++) qkv[n][i] = conv_channel(x[i], w + (long)i * W, window + (long)i * (W - 1), W);
            }
            to_unit(qkv[0], K, scale);
            to_unit(qkv[1], K, 1.0f);
            const float *f = inputs[3] + r * strides[3] + (long)h * K;
            const float *bias = dt_bias + (long)h * K;
            for (int i = 0; i < K; i++) {
                const float z = f[i] + bias[i];
                decay[i] = expf(-a * (z > 20.0f ? z : log1pf(expf(z))));
            }
            const float beta = 1.0f / (1.0f + expf(-inputs[5][r * strides[5] + h]));
            float *o = out + (r * H + h) * K;
            delta_rule(S, qkv[0], qkv[1], qkv[2], decay, beta, K, o);
            float sum = 0.0f;
            for (int j = 0; j < K; j++) sum += o[j] * o[j];
            const float inverse = 1.0f / sqrtf(sum / K + eps);
            const float *gate = inputs[4] + r * strides[4] + (long)h * K;
            for (int j = 0; j < K; j++) o[j] = o[j] * inverse * norm_weight[j] / (1.0f + expf(-gate[j]));
        }
    }
    return 0;
}

/* Whether this CPU runs the kernel above. */
int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
