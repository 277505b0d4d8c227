/* A token's choice on the CPU, as engine/generate.py's choose_token makes it, bit for bit: greedy (the
   first largest logit, torch.argmax's answer) in two vectorized passes, and under top-p naive.py's
   definition (integer masses, the threshold, the draw in vocabulary order) in three passes and no sort.

   Why greedy: PyTorch's argmax over a row runs element by element, 0.3-0.45 ms for the 48B model's
   163,840 logits, where reading them takes tens of microseconds.

   Why top-p: PyTorch does it in some twenty operators over the 163,840 weights of the 48B model (masses,
   bins, a sort of the heaviest, cumulative sums, a search), 2-6 ms of a CPU decode step of 10-40 ms,
   where the arithmetic is a few hundred microseconds.

   1. Every weight's mass m = floor(w 2^40) (exact in float32), the total M, and the masses binned by the
      weight's power of two (bin b holds [2^-b, 2^(1-b)); weights are in [0, 1]).
   2. target = max(1, floor(M p)); the bins summed from the heaviest down give the bin b where the
      running mass reaches the target: the threshold t is a weight of bin b, every heavier bin is kept.
   3. t among bin b's weights by a radix select over their mantissa bits (the exponent is the bin's, so
      the bits order them as their values do): 8, 8 and 7 bits a round, the buckets summed from the
      heaviest down to the one where the running mass reaches the target. The kept mass K comes with it:
      the heavier bins' mass plus bin b's at least t.
   4. r = min(floor(u K), K - 1); the token is the first, in vocabulary order, whose running kept mass
      exceeds r. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BINS 64

static inline uint32_t bits_of(float w) {
    uint32_t u;
    memcpy(&u, &w, sizeof u);
    return u;
}

static inline int64_t mass_of(float w) { return (int64_t)floorf(w * 1099511627776.0f); /* 2^40 */ }

static inline int bin_of(float w) {
    int b = 127 - (int)(bits_of(w) >> 23);
    return b < 0 ? 0 : b > BINS - 1 ? BINS - 1 : b;
}

/* The token of naive.py's choose_sampled_torch(weights [V], p, u) (p >= 1 keeps every token), or -1 when
   the scratch memory could not be had. */
static long choice(const float *weights, long V, float p, double u) {
    int64_t total = 0, bin_mass[BINS] = {0};
    for (long i = 0; i < V; i++) {
        int64_t m = mass_of(weights[i]);
        total += m;
        bin_mass[bin_of(weights[i])] += m;
    }
    float threshold = 0.f;
    int64_t kept = total;
    if (p < 1.f) {
        int64_t target = (int64_t)floor((double)total * (double)p);
        if (target < 1) target = 1;
        int b = 0;
        int64_t heavier = 0; /* the mass of the bins before b */
        while (b < BINS - 1 && heavier + bin_mass[b] < target) heavier += bin_mass[b++];
        uint32_t *members = malloc(sizeof(uint32_t) * (size_t)V);
        if (!members) return -1;
        long n = 0;
        for (long i = 0; i < V; i++)
            if (bin_of(weights[i]) == b) members[n++] = bits_of(weights[i]);
        /* Radix select: each round fixes the next bits of the threshold (the members left share the bits
           fixed so far); `heavier` is the mass of the weights above every member left. */
        static const int widths[3] = {8, 8, 7};
        int shift = 23;
        for (int round = 0; round < 3; round++) {
            int width = widths[round];
            shift -= width;
            int64_t bucket_mass[256] = {0};
            for (long j = 0; j < n; j++) {
                float w;
                memcpy(&w, &members[j], sizeof w);
                bucket_mass[(members[j] >> shift) & ((1u << width) - 1)] += mass_of(w);
            }
            int k = (1 << width) - 1;
            /* bin b's members hold at least target - heavier, so some bucket reaches it, and holds mass */
            while (k > 0 && heavier + bucket_mass[k] < target) heavier += bucket_mass[k--];
            kept = heavier + bucket_mass[k]; /* after the last round: the weights of at least the threshold */
            long kept_members = 0;
            for (long j = 0; j < n; j++)
                if ((long)((members[j] >> shift) & ((1u << width) - 1)) == k) members[kept_members++] = members[j];
            n = kept_members;
        }
        /* every member left has the same bits: the threshold */
        memcpy(&threshold, &members[0], sizeof threshold);
        free(members);
    }
    int64_t draw = (int64_t)floor(u * (double)kept);
    if (draw > kept - 1) draw = kept - 1;
    int64_t running = 0;
    long last = 0;
    for (long i = 0; i < V; i++) {
        if (weights[i] < threshold) continue;
        running += mass_of(weights[i]);
        last = i;
        if (running > draw) return i;
    }
    return last;
}

/* *token = choice(...), the draw read from *u; returns 0, or -1 as choice does. */
int top_p_choice(const float *weights, long V, float p, const double *u, int64_t *token) {
    long chosen = choice(weights, V, p, *u);
    if (chosen < 0) return -1;
    *token = chosen;
    return 0;
}

/* *token = the first index of the largest of x [n], or of the first NaN where there is one (torch.argmax's
   answer): the largest in one pass of 8 lanes (NaNs noted apart, as the lanes' max ignores them), then
   the first lane equal to it. */
__attribute__((target("avx2"))) void first_largest(const float *x, long n, int64_t *token) {
    __m256 top = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        top = _mm256_max_ps(top, v);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8], largest = -INFINITY;
    _mm256_storeu_ps(lanes, top);
    for (int k = 0; k < 8; k++)
        if (lanes[k] > largest) largest = lanes[k];
    int nan = _mm256_movemask_ps(unordered);
    for (long j = i; j < n; j++) {
        if (isnan(x[j])) nan = 1;
        else if (x[j] > largest) largest = x[j];
    }
    if (nan) {
        for (long j = 0; j < n; j++)
            if (isnan(x[j])) {
                *token = j;
                return;
            }
    }
    const __m256 target = _mm256_set1_ps(largest);
    for (i = 0; i + 8 <= n; i += 8) {
        int equal = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
        if (equal) {
            *token = i + __builtin_ctz(equal);
            return;
        }
    }
    for (; i < n; i++)
        if (x[i] == largest) break;
    *token = i;
}

/* kernels/native.py asks every library this. */
int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}
