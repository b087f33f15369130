/* SegFormer's Mix-FFN in one pass over memory (seglab.ops.native):
 *
 *   dst = fc2(GELU(dwconv3x3(fc1(norm(src))))) + residual,
 *
 * src and dst N x H x W x C tokens (row-major, as the Mix Transformer keeps them), norm a
 * LayerNorm over the C channels or nothing, fc1 C -> D, the depthwise 3x3 convolution (zero
 * padding 1) on D channels with its bias, GELU the exact (erf) form, fc2 D -> C; float32. Each
 * thread takes whole rows of tokens and keeps three rows of fc1's output (D per token) in a
 * ring: for output row y it computes fc1 of row y + 1 only (rows y - 1 and y are there from
 * before), the depthwise convolution and GELU of row y into one more row buffer, and fc2 of
 * that row, written with its bias and the residual. Also here: `seglab_linear`, a linear layer
 * over tokens by the same register blocks (`linear_row`).
 *
 * Why: the four operators one after another write and read fc1's and the convolution's
 * outputs, D = 4C channels per token, through memory (67 MB each for MiT-B0's first stage at
 * batch 8 on 512 x 512), and PyTorch's linear layers run few-channel products (C = 32) at a
 * third of the float32 peak. Here the row buffers stay in a core's L2 and the products keep
 * their accumulators in registers (register_products, winograd_fused.c).
 */

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define MIX_TOKENS 4 /* tokens whose products share each load of a weight vector */

typedef struct {
    const void *src, *fc1_weight, *fc2_weight, *residual; /* float32; in bf16 (uint16_t), weights as pairs */
    const float *norm_weight, *norm_bias, *fc1_bias, *dw_weight, *dw_bias, *fc2_bias;
    void *dst;
    int64_t height, width, channels, hidden;
    float eps; /* the LayerNorm's (norm_weight NULL: no LayerNorm) */
    int bf16;  /* tokens, residual and output bf16, the linear layers' weights as pairs (pair_row) */
    int *failed; /* set where a thread's row buffers could not be allocated */
} MixJob;

/* 1 / d for finite d >= 1: AVX-512's 14-bit estimate refined by one Newton step (a division
 * takes several times longer and held GELU's loop back); plain division elsewhere. */
static inline f32x16 reciprocal16(f32x16 d) {
#if defined(__AVX512F__)
    const f32x16 r = (f32x16)_mm512_rcp14_ps((__m512)d);
    return r * (2.0f - d * r);
#else
    return 1.0f / d;
#endif
}

/* GELU(x) = x Phi(x) with Phi(x) = 1 - erfc(x / sqrt 2) / 2 for x >= 0 and erfc(|x| / sqrt 2) / 2
 * below: erfc(z) = 1 / (1 + a1 z + ... + a6 z^6)^16 within 3e-7 (Abramowitz and Stegun 7.1.28;
 * z clamped at 6, where erfc is 2e-17, so that the power stays finite). Its 20-odd vector
 * operations took 6.2 ns per 16 values against 8.9 for 7.1.26's form (the one PyTorch's
 * vectorised erf takes), whose exp costs more than the power; GELU took a third of the
 * Mix-FFN's time at MiT-B0's first stage. Within 7e-7 of GELU for |x| <= 5. Phi alone is
 * GELU's slope's first term (depthwise_gelu.c). */
static inline f32x16 normal_cdf16(f32x16 x) {
    f32x16 z = select_greater(x, -x) * 0.70710678118654752f;
    const i32x16 beyond = z > 6.0f;
    z = (f32x16)(((i32x16)z & ~beyond) | ((i32x16)block_of(6.0f) & beyond));
    f32x16 p = z * 0.0000430638f + 0.0002765672f;
    p = p * z + 0.0001520143f;
    p = p * z + 0.0092705272f;
    p = p * z + 0.0422820123f;
    p = p * z + 0.0705230784f;
    p = p * z + 1.0f;
    p *= p, p *= p, p *= p, p *= p; /* p^16 */
    const f32x16 half_erfc = 0.5f * reciprocal16(p);
    const i32x16 positive = x >= 0;
    return (f32x16)(((i32x16)(1.0f - half_erfc) & positive) | ((i32x16)half_erfc & ~positive));
}

static inline f32x16 gelu16(f32x16 x) { return x * normal_cdf16(x); }

/* normed (count x C) = the LayerNorm of `count` tokens: (x - mean) / sqrt(var + eps) w + b,
 * mean and (biased) variance over the C channels, as nn.LayerNorm computes them. */
static void mix_norm_row(const MixJob *job, const float *tokens, int64_t count, float *normed) {
    const int64_t C = job->channels;
    for (int64_t t = 0; t < count; t++) {
        const float *x = tokens + t * C;
        f32x16 total = {0};
        for (int64_t c = 0; c < C; c += 16) {
            f32x16 value;
            memcpy(&value, x + c, sizeof value);
            total += value;
        }
        float mean = 0.0f;
        for (int l = 0; l < 16; l++) mean += total[l];
        mean /= (float)C;
        f32x16 squares = {0};
        for (int64_t c = 0; c < C; c += 16) {
            f32x16 value;
            memcpy(&value, x + c, sizeof value);
            value -= mean;
            squares += value * value;
        }
        float variance = 0.0f;
        for (int l = 0; l < 16; l++) variance += squares[l];
        const float inverse = 1.0f / sqrtf(variance / (float)C + job->eps);
        for (int64_t c = 0; c < C; c += 16) {
            f32x16 value, weight, bias;
            memcpy(&value, x + c, sizeof value);
            memcpy(&weight, job->norm_weight + c, sizeof weight);
            memcpy(&bias, job->norm_bias + c, sizeof bias);
            value = (value - mean) * inverse * weight + bias;
            memcpy(normed + t * C + c, &value, sizeof value);
        }
    }
}

/* out (count x outputs) = a (count x depth) w (depth x outputs) + bias + add (each NULL: none;
 * add like out): a linear layer over a row of tokens (outputs a multiple of WIDE), by register blocks of
 * MIX_TOKENS tokens x REGISTER_VECTORS vectors of outputs, or twice the tokens where fewer
 * vectors are left (32 outputs: 8 tokens x 2 vectors), so that each weight load serves several
 * tokens and each token's value several vectors. */
static void linear_row(const float *a, int64_t count, int64_t depth, const float *w, int64_t outputs,
                       const float *bias, const float *add, float *out) {
    for (int64_t o0 = 0; o0 < outputs; o0 += REGISTER_VECTORS * WIDE) {
        const int vectors = (outputs - o0) / WIDE < REGISTER_VECTORS ? (int)((outputs - o0) / WIDE) : REGISTER_VECTORS;
        const int step = vectors <= 2 ? REGISTER_ROWS : MIX_TOKENS;
        for (int64_t t0 = 0; t0 < count; t0 += step) {
            const int rows = count - t0 < step ? (int)(count - t0) : step;
            const float *x = a + t0 * depth, *wo = w + o0, *b = bias ? bias + o0 : NULL;
            const float *plus = add ? add + t0 * outputs + o0 : NULL;
            float *o = out + t0 * outputs + o0;
            switch (vectors) { /* a constant number of tokens and vectors in each */
                case 1: register_products(x, depth, wo, outputs, o, outputs, depth, rows, REGISTER_ROWS, 1, b, plus); break;
                case 2: register_products(x, depth, wo, outputs, o, outputs, depth, rows, REGISTER_ROWS, 2, b, plus); break;
                case 3: register_products(x, depth, wo, outputs, o, outputs, depth, rows, MIX_TOKENS, 3, b, plus); break;
                default:
                    register_products(x, depth, wo, outputs, o, outputs, depth, rows, MIX_TOKENS, REGISTER_VECTORS, b,
                                      plus);
            }
        }
    }
}

/* bf16 products by pairs on a processor with AVX-512 BF16: VDPBF16PS multiplies two pairs of
 * bf16 and adds both products to a float32 lane, twice float32's multiply-adds per
 * instruction. Used by the bf16 Mix-FFN below and by attention.c. */
#if defined(__AVX512BF16__)
#define BF16_PAIRS 1

/* out[t][o] (float32, `vectors` vectors of 16) = init[o] + sum_p a_t's pair p . w's pair p of
 * output o: `a` rows of bf16 values (pairs adjacent), `w` per pair `w_step` bf16, each output's
 * pair adjacent; `init` may be NULL. As register_products, rows past `count` repeat the last one
 * unstored. */
static inline __attribute__((always_inline)) void pair_products(const uint16_t *a, int64_t a_step, const uint16_t *w,
                                                                int64_t w_step, float *out, int64_t out_step,
                                                                int64_t pairs, int count, const int rows,
                                                                const int vectors, const float *init) {
    const uint16_t *row[REGISTER_ROWS];
    for (int t = 0; t < rows; t++) row[t] = a + (t < count ? t : count - 1) * a_step;
    __m512 acc[REGISTER_ROWS][REGISTER_VECTORS];
    for (int o = 0; o < vectors; o++) {
        const __m512 start = init ? _mm512_loadu_ps(init + o * 16) : _mm512_setzero_ps();
        for (int t = 0; t < rows; t++) acc[t][o] = start;
    }
    for (int64_t p = 0; p < pairs; p++) {
        __m512i wp[REGISTER_VECTORS];
        for (int o = 0; o < vectors; o++) wp[o] = _mm512_loadu_si512(w + p * w_step + o * 32);
        for (int t = 0; t < rows; t++) {
            uint32_t pair;
            memcpy(&pair, row[t] + 2 * p, sizeof pair);
            const __m512bh x = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int o = 0; o < vectors; o++) acc[t][o] = _mm512_dpbf16_ps(acc[t][o], x, (__m512bh)wp[o]);
        }
    }
    for (int t = 0; t < count && t < rows; t++)
        for (int o = 0; o < vectors; o++) _mm512_storeu_ps(out + t * out_step + o * 16, acc[t][o]);
}

/* out (count x outputs, float32) = bias (outputs; NULL: none) + a (count x 2 pairs, bf16)
 * w (pairs x outputs x 2, bf16): register blocks as linear_row's. */
static void pair_row(const uint16_t *a, int count, int64_t pairs, const uint16_t *w, int64_t outputs,
                     const float *bias, float *out) {
    for (int64_t o0 = 0; o0 < outputs; o0 += REGISTER_VECTORS * 16) {
        const int vectors = (outputs - o0) / 16 < REGISTER_VECTORS ? (int)((outputs - o0) / 16) : REGISTER_VECTORS;
        const int step = vectors <= 2 ? REGISTER_ROWS : MIX_TOKENS;
        const float *b = bias ? bias + o0 : NULL;
        for (int t0 = 0; t0 < count; t0 += step) {
            const int rows = count - t0 < step ? count - t0 : step;
            const uint16_t *x = a + t0 * 2 * pairs, *wo = w + 2 * o0;
            float *o = out + t0 * outputs + o0;
            switch (vectors) {
                case 1: pair_products(x, 2 * pairs, wo, 2 * outputs, o, outputs, pairs, rows, REGISTER_ROWS, 1, b); break;
                case 2: pair_products(x, 2 * pairs, wo, 2 * outputs, o, outputs, pairs, rows, REGISTER_ROWS, 2, b); break;
                case 3: pair_products(x, 2 * pairs, wo, 2 * outputs, o, outputs, pairs, rows, MIX_TOKENS, 3, b); break;
                default:
                    pair_products(x, 2 * pairs, wo, 2 * outputs, o, outputs, pairs, rows, MIX_TOKENS, REGISTER_VECTORS,
                                  b);
            }
        }
    }
}
#else
#define BF16_PAIRS 0
#endif

/* Whether bf16 products run by pairs here (1: AVX-512 BF16) or are not built (0). */
int seglab_bf16_pairs(void) { return BF16_PAIRS; }

/* The depthwise convolution at column x of a row whose rows above, at and below are `rows`
 * (a zero row beyond the map), 16 channels from c0: `taps` its 9 weights, `bias` its bias. */
static inline __attribute__((always_inline)) f32x16 mix_depthwise_at(const float *const rows[3], const f32x16 taps[9],
                                                                     f32x16 bias, int64_t x, int64_t c0,
                                                                     int64_t W, int64_t D) {
    f32x16 acc = bias;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) {
            const int64_t at = x + j - 1;
            if (at < 0 || at >= W) continue;
            f32x16 value;
            memcpy(&value, rows[i] + at * D + c0, sizeof value);
            acc += value * taps[3 * i + j];
        }
    return acc;
}

#define MIX_COLUMNS 4 /* columns whose sums (chains of 9 dependent multiply-adds) run interleaved */

/* out (W x D) = GELU(the depthwise convolution of the row whose rows above, at and below are
 * `rows`): the convolution 16 channels at a time with their 9 taps in registers, MIX_COLUMNS
 * columns at once inside the map, then GELU over the row (apart: together the two loops'
 * constants spilled out of the registers). */
static void mix_depthwise_row(const MixJob *job, const float *const rows_[3], float *out) {
    const int64_t W = job->width, D = job->hidden;
    const float *const rows[3] = {rows_[0], rows_[1], rows_[2]}; /* (locals: the stores cannot alias them) */
    for (int64_t c0 = 0; c0 < D; c0 += 16) {
        f32x16 taps[9], bias;
        for (int k = 0; k < 9; k++) memcpy(&taps[k], job->dw_weight + k * D + c0, sizeof(f32x16));
        memcpy(&bias, job->dw_bias + c0, sizeof bias);
        f32x16 first = mix_depthwise_at(rows, taps, bias, 0, c0, W, D);
        memcpy(out + c0, &first, sizeof first);
        int64_t x = 1;
        for (; x + MIX_COLUMNS < W; x += MIX_COLUMNS) { /* every neighbour inside the map */
            f32x16 value[MIX_COLUMNS];
            for (int k = 0; k < MIX_COLUMNS; k++) value[k] = bias;
            for (int i = 0; i < 3; i++)
                for (int j = 0; j < 3; j++)
                    for (int k = 0; k < MIX_COLUMNS; k++) {
                        f32x16 source;
                        memcpy(&source, rows[i] + (x + k + j - 1) * D + c0, sizeof source);
                        value[k] += source * taps[3 * i + j];
                    }
            for (int k = 0; k < MIX_COLUMNS; k++) memcpy(out + (x + k) * D + c0, &value[k], sizeof(f32x16));
        }
        for (; x < W; x++) {
            const f32x16 value = mix_depthwise_at(rows, taps, bias, x, c0, W, D);
            memcpy(out + x * D + c0, &value, sizeof value);
        }
    }
    for (int64_t i = 0; i < W * D; i += 16) {
        f32x16 value;
        memcpy(&value, out + i, sizeof value);
        value = gelu16(value);
        memcpy(out + i, &value, sizeof value);
    }
}

#if BF16_PAIRS
/* bf16 (count values, a multiple of 16) from float32. */
static inline void mix_to_bf16(const float *from, int64_t count, uint16_t *to) {
    for (int64_t i = 0; i < count; i += 16) {
        f32x16 value;
        memcpy(&value, from + i, sizeof value);
        MEMORY(store, bf16, 16)(to + i, value, 16);
    }
}
#endif

/* fc1(norm(row r)) into `out` (W x D): the float32 row, or the bf16 one (read into float32,
 * normalised, rounded to bf16 for the pair products). */
static void mix_fc1_row(const MixJob *job, const void *image, int64_t r, float *normed, uint16_t *halves,
                        float *out) {
    const int64_t W = job->width, C = job->channels, D = job->hidden;
    if (!job->bf16) {
        const float *tokens = (const float *)image + r * W * C;
        if (job->norm_weight) mix_norm_row(job, tokens, W, normed), tokens = normed;
        linear_row(tokens, W, C, job->fc1_weight, D, job->fc1_bias, NULL, out);
        return;
    }
#if BF16_PAIRS
    const uint16_t *tokens = (const uint16_t *)image + r * W * C;
    for (int64_t i = 0; i < W * C; i += 16)
        MEMORY(store, f32, 16)(normed + i, MEMORY(load, bf16, 16)(tokens + i, 16), 16);
    if (job->norm_weight) mix_norm_row(job, normed, W, normed);
    mix_to_bf16(normed, W * C, halves);
    pair_row(halves, (int)W, C / 2, job->fc1_weight, D, job->fc1_bias, out);
#else
    (void)halves;
#endif
}

/* fc2 of the activated row (W x D) plus its bias and the residual, written at `at`. */
static void mix_fc2_row(const MixJob *job, const float *activated, int64_t at, uint16_t *halves, float *out) {
    const int64_t W = job->width, C = job->channels, D = job->hidden;
    if (!job->bf16) {
        linear_row(activated, W, D, job->fc2_weight, C, job->fc2_bias,
                   job->residual ? (const float *)job->residual + at : NULL, (float *)job->dst + at);
        return;
    }
#if BF16_PAIRS
    mix_to_bf16(activated, W * D, halves);
    pair_row(halves, (int)W, D / 2, job->fc2_weight, C, job->fc2_bias, out);
    for (int64_t i = 0; i < W * C; i += 16) {
        f32x16 value;
        memcpy(&value, out + i, sizeof value);
        if (job->residual) value += MEMORY(load, bf16, 16)((const uint16_t *)job->residual + at + i, 16);
        MEMORY(store, bf16, 16)((uint16_t *)job->dst + at + i, value, 16);
    }
#else
    (void)halves, (void)out;
#endif
}

static void mix_rows(const void *job_, int64_t begin, int64_t end) {
    const MixJob *job = (const MixJob *)job_;
    const int64_t H = job->height, W = job->width, C = job->channels, D = job->hidden;
    const int64_t element = job->bf16 ? 2 : 4; /* bytes per token channel */
    /* fc1's rows r in ring[r % 3], the depthwise convolution's row, a row of zeros (beyond the
     * map), a row of normalised tokens, in bf16: fc2's output row, and a row of D halves */
    float *buffer = malloc(sizeof(float) * (5 * W * D + 2 * W * C) + sizeof(uint16_t) * W * (C > D ? C : D));
    if (!buffer) {
        *job->failed = 1;
        return;
    }
    float *ring[3] = {buffer, buffer + W * D, buffer + 2 * W * D}, *activated = buffer + 3 * W * D;
    float *zeros = buffer + 4 * W * D, *normed = buffer + 5 * W * D, *fc2_out = normed + W * C;
    uint16_t *halves = (uint16_t *)(fc2_out + W * C);
    memset(zeros, 0, sizeof(float) * W * D);
    int64_t ready_image = -1, ready_row = -2; /* the ring holds rows ready_row - 1 .. ready_row + 1 */
    for (int64_t u = begin; u < end; u++) {
        const int64_t b = u / H, y = u % H;
        const void *image = (const char *)job->src + b * H * W * C * element;
        const int64_t first = b == ready_image && y == ready_row + 1 ? y + 1 : y - 1;
        for (int64_t r = first < 0 ? 0 : first; r <= y + 1 && r < H; r++) /* fc1(norm(row r)) */
            mix_fc1_row(job, image, r, normed, halves, ring[r % 3]);
        ready_image = b, ready_row = y;
        const float *const rows[3] = {y > 0 ? ring[(y - 1) % 3] : zeros, ring[y % 3],
                                      y + 1 < H ? ring[(y + 1) % 3] : zeros};
        mix_depthwise_row(job, rows, activated);
        mix_fc2_row(job, activated, (b * H + y) * W * C, halves, fc2_out);
    }
    free(buffer);
}

/* dst = the Mix-FFN above of src, both n x height x width x channels; norm_weight and norm_bias
 * (channels; NULL: no LayerNorm) with eps, fc1_weight channels x hidden and fc2_weight hidden x
 * channels (nn.Linear's weights transposed), dw_weight 9 x hidden (the taps row by row), the
 * biases and residual (like dst, optional) as named. With bf16 nonzero, src, dst and residual
 * are bf16 and the two weights bf16 pairs along their first side (channels / 2 x hidden x 2,
 * hidden / 2 x channels x 2; the rest float32), where the processor multiplies bf16 by pairs.
 * Returns 0; -1 where memory ran out; -2 for channels or hidden not a whole number of 16-float
 * vectors, or bf16 without the pair products. */
int seglab_mix_ffn(void *dst, const void *src, const float *norm_weight, const float *norm_bias, float eps,
                   const void *fc1_weight, const float *fc1_bias, const float *dw_weight, const float *dw_bias,
                   const void *fc2_weight, const float *fc2_bias, const void *residual, int64_t n, int64_t height,
                   int64_t width, int64_t channels, int64_t hidden, int bf16, int threads) {
    if (channels % 16 || hidden % 16 || (bf16 && !BF16_PAIRS)) return -2;
    int failed = 0;
    MixJob job = {src, fc1_weight, fc2_weight, residual, norm_weight, norm_bias, fc1_bias, dw_weight, dw_bias,
                  fc2_bias, dst, height, width, channels, hidden, eps, bf16, &failed};
    parallel_for(n * height, threads, mix_rows, &job);
    return failed ? -1 : 0;
}

/* A linear layer over rows of tokens: job->dst = a w + bias (+ residual), rows in blocks. */
typedef struct {
    const float *src, *weight, *bias, *residual;
    float *dst;
    int64_t rows, in_features, out_features;
} LinearJob;

#define LINEAR_BLOCK 64 /* rows per item of work */

static void linear_blocks(const void *job_, int64_t begin, int64_t end) {
    const LinearJob *job = (const LinearJob *)job_;
    const int64_t C = job->in_features, O = job->out_features;
    for (int64_t u = begin; u < end; u++) {
        const int64_t r0 = u * LINEAR_BLOCK, count = job->rows - r0 < LINEAR_BLOCK ? job->rows - r0 : LINEAR_BLOCK;
        linear_row(job->src + r0 * C, count, C, job->weight, O, job->bias, job->residual ? job->residual + r0 * O : NULL,
                   job->dst + r0 * O);
    }
}

/* dst (rows x out_features) = src (rows x in_features) weight (in_features x out_features, nn.Linear's
 * weight transposed) + bias + residual (like dst; NULL: none). Returns 0, or -2 for out_features
 * not a whole number of 16-float vectors. */
int seglab_linear(float *dst, const float *src, const float *weight, const float *bias, const float *residual,
                  int64_t rows, int64_t in_features, int64_t out_features, int threads) {
    if (out_features % 16) return -2;
    LinearJob job = {src, weight, bias, residual, dst, rows, in_features, out_features};
    parallel_for((rows + LINEAR_BLOCK - 1) / LINEAR_BLOCK, threads, linear_blocks, &job);
    return 0;
}
