/* Attention of many queries over few keys (SegFormer's efficient self-attention, whose keys and
 * values come from the map shrunk R x R; seglab.ops.native):
 *
 *   dst[b, i, h D + d] = sum_j softmax_j(scale q[b, i, h D + .] . k[b, j, h D + .]) v[b, j, h D + d],
 *
 * q and dst N x L x C tokens (C = heads x D, heads side by side, as the query projection writes
 * them), kv N x S x 2C (the key/value projection's output: keys in the first C channels, values
 * in the last C); float32 or bf16. Each item of work is a block of ATTENTION_QUERIES queries of
 * one (image, head): the head's keys and values are laid out once per (image, head) a thread
 * meets, the block's scores (queries x S) stay in a core's cache, the softmax runs row by row
 * in float32 vectors (cross_entropy.c's `exp_nonpositive`), and each row of the values'
 * weighted sum is divided by its sum of exps as it is stored. The two products: float32
 * register blocks (mix_ffn.c's `linear_row`) on float32 values, or on bf16 read into float32;
 * on a processor with AVX-512 BF16, bf16 by pairs (`pair_row`, below), the exps rounded to bf16
 * once for the second product.
 *
 * Why: PyTorch's CPU flash attention runs MiT-B0's first stage at batch 8 (16,384 queries over
 * 256 keys, D = 32) in bf16 slower than in float32 (44.6 against 33.0 ms, Zen 4), a quarter of
 * the bf16 kernel's rate; the scores of a block of queries fit in L2 whole, so no running
 * maximum or rescaling (flash attention's) is needed.
 */

#define ATTENTION_QUERIES 64 /* queries per item of work: their scores (64 x S floats) stay in L2 */

typedef struct {
    const void *q, *kv;
    void *dst;
    void *probabilities; /* NULL, or the softmax written out (N x heads x L x S, dst's dtype) */
    int64_t queries, keys, heads, head_dim, blocks; /* blocks of ATTENTION_QUERIES per (image, head) */
    int64_t padded_keys;                            /* keys rounded up to whole vectors of 16 */
    float scale;
    int bf16;
    int *failed; /* set where a thread's buffers could not be allocated */
} AttentionJob;

static inline float attention_value(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* The head's keys transposed (D x Sp) and values (Sp x D) in float32, zero beyond S. */
static void attention_head(const AttentionJob *job, int64_t b, int64_t h, float *keys_t, float *values) {
    const int64_t S = job->keys, Sp = job->padded_keys, D = job->head_dim, C = job->heads * D;
    const int64_t start = b * S * 2 * C + h * D;
    memset(keys_t, 0, sizeof(float) * D * Sp);
    memset(values + S * D, 0, sizeof(float) * (Sp - S) * D);
    for (int64_t j = 0; j < S; j++)
        for (int64_t d = 0; d < D; d++) {
            keys_t[d * Sp + j] = attention_value(job->kv, start + j * 2 * C + d, job->bf16);
            values[j * D + d] = attention_value(job->kv, start + j * 2 * C + C + d, job->bf16);
        }
}

/* Each row of `scores` (count x Sp) becomes exp(scale (score - the row's maximum)) over the S
 * keys (scale > 0), zero over the padding: in place, or where `exps` is given written there as
 * bf16 (count x Sp) for the second product, rounded by one instruction (VCVTNEPS2BF16, to
 * nearest, ties to even), and in place too with `keep`; `sums` gets each row's total. */
static void attention_softmax(float *scores, int count, int64_t S, int64_t Sp, float scale, uint16_t *exps,
                              int keep, float *sums) {
    const int64_t vectors = Sp / 16, last = S - (vectors - 1) * 16; /* keys in the last vector */
    for (int t = 0; t < count; t++) {
        float *row = scores + t * Sp;
        for (int64_t j = S; j < Sp; j++) row[j] = -INFINITY; /* (no maximum; their exps are zeroed below) */
        f32x16 top, value;
        memcpy(&top, row, sizeof top);
        for (int64_t v = 1; v < vectors; v++) {
            memcpy(&value, row + v * 16, sizeof value);
            top = select_greater(value, top);
        }
        const float maximum = lanes_max(top);
        f32x16 total = {0};
        for (int64_t v = 0; v < vectors; v++) {
            memcpy(&value, row + v * 16, sizeof value);
            value = exp_nonpositive((value - maximum) * scale);
            if (v == vectors - 1)
                for (int l = (int)last; l < 16; l++) value[l] = 0.0f;
            total += value;
#if defined(__AVX512BF16__)
            if (exps) {
                _mm256_storeu_si256((__m256i *)(exps + t * Sp + v * 16), (__m256i)_mm512_cvtneps_pbh((__m512)value));
                if (!keep) continue;
            }
#else
            (void)exps, (void)keep;
#endif
            memcpy(row + v * 16, &value, sizeof value);
        }
        sums[t] = lanes_sum(total);
    }
}

/* The block's softmax rows (exps in `exps`, count x Sp, over their `sums`) written out at query
 * i0 of (image, head) `pair`, rounded once where bf16. */
static void attention_probabilities(const AttentionJob *job, int64_t pair, int64_t i0, int count, const float *exps,
                                    const float *sums) {
    const int64_t S = job->keys, Sp = job->padded_keys;
    for (int t = 0; t < count; t++) {
        const float inverse = 1.0f / sums[t];
        const int64_t at = (pair * job->queries + i0 + t) * S;
        for (int64_t j = 0; j < S; j += 16) {
            f32x16 value;
            memcpy(&value, exps + t * Sp + j, sizeof value);
            const int width = S - j < 16 ? (int)(S - j) : 16;
            if (job->bf16) MEMORY(store, bf16, 16)((uint16_t *)job->probabilities + at + j, value * inverse, width);
            else MEMORY(store, f32, 16)((float *)job->probabilities + at + j, value * inverse, width);
        }
    }
}

static void attention_blocks(const void *job_, int64_t begin, int64_t end) {
    const AttentionJob *job = (const AttentionJob *)job_;
    const int64_t L = job->queries, S = job->keys, Sp = job->padded_keys, D = job->head_dim;
    const int64_t H = job->heads, C = H * D, Q = ATTENTION_QUERIES;
    /* keys transposed, values, the block's queries, scores, weighted sums, row sums */
    float *buffer = malloc(sizeof(float) * (2 * D * Sp + Q * D + Q * Sp + Q * D + Q));
    if (!buffer) {
        *job->failed = 1;
        return;
    }
    float *keys_t = buffer, *values = keys_t + D * Sp, *queries = values + Sp * D, *scores = queries + Q * D;
    float *sums_v = scores + Q * Sp, *sums = sums_v + Q * D;
    int64_t ready = -1; /* the (image, head) whose keys and values are in the buffer */
    for (int64_t u = begin; u < end; u++) {
        const int64_t pair = u / job->blocks, b = pair / H, h = pair % H, i0 = (u % job->blocks) * Q;
        const int count = (int)(L - i0 < Q ? L - i0 : Q);
        if (pair != ready) attention_head(job, b, h, keys_t, values), ready = pair;
        const int64_t first = (b * L + i0) * C + h * D; /* the block's first query, and its output */
        for (int t = 0; t < count; t++)
            for (int64_t d = 0; d < D; d++) queries[t * D + d] = attention_value(job->q, first + t * C + d, job->bf16);
        linear_row(queries, count, D, keys_t, Sp, NULL, NULL, scores);
        attention_softmax(scores, count, S, Sp, job->scale, NULL, 0, sums);
        if (job->probabilities) attention_probabilities(job, pair, i0, count, scores, sums);
        linear_row(scores, count, Sp, values, D, NULL, NULL, sums_v);
        for (int t = 0; t < count; t++) {
            const float inverse = 1.0f / sums[t];
            for (int64_t d = 0; d < D; d += WIDE) {
                fvec value;
                memcpy(&value, sums_v + t * D + d, sizeof value);
                value *= inverse;
                if (job->bf16) MEMORY(store, bf16, WIDE)((uint16_t *)job->dst + first + t * C + d, value, WIDE);
                else MEMORY(store, f32, WIDE)((float *)job->dst + first + t * C + d, value, WIDE);
            }
        }
    }
    free(buffer);
}

#if BF16_PAIRS
/* One head's D channels of the S keys (or values) in `rows` (2C apart) as pairs along D
 * (D / 2 x Sp x 2), zero beyond S: the matrix a row of D values (a query, or a row of dO)
 * multiplies by pairs into Sp products. */
static void pairs_along_channels(const uint16_t *rows, int64_t S, int64_t Sp, int64_t C, int64_t D, uint16_t *out) {
    memset(out, 0, sizeof(uint16_t) * D * Sp);
    for (int64_t j = 0; j < S; j++)
        for (int64_t d = 0; d < D; d++) out[((d / 2) * Sp + j) * 2 + d % 2] = rows[j * 2 * C + d];
}

/* One head's D channels of the S keys (or values) in `rows` (2C apart) as pairs along the keys
 * (Sp / 2 x D x 2), zero beyond S: the matrix a row of Sp weights (a row of exps, or of dS)
 * multiplies by pairs into D products. */
static void pairs_along_keys(const uint16_t *rows, int64_t S, int64_t Sp, int64_t C, int64_t D, uint16_t *out) {
    memset(out, 0, sizeof(uint16_t) * D * Sp);
    for (int64_t j = 0; j < S; j++)
        for (int64_t d = 0; d < D; d++) out[((j / 2) * D + d) * 2 + j % 2] = rows[j * 2 * C + d];
}

/* The head's keys as pairs along D (D / 2 x Sp x 2) and values as pairs along the keys
 * (Sp / 2 x D x 2), bf16 as they are, zero beyond S. */
static void attention_head_pairs(const AttentionJob *job, int64_t b, int64_t h, uint16_t *keys_p, uint16_t *values_p) {
    const int64_t S = job->keys, Sp = job->padded_keys, D = job->head_dim, C = job->heads * D;
    const uint16_t *kv = (const uint16_t *)job->kv + b * S * 2 * C + h * D;
    pairs_along_channels(kv, S, Sp, C, D, keys_p);
    pairs_along_keys(kv + C, S, Sp, C, D, values_p);
}

static void attention_blocks_pairs(const void *job_, int64_t begin, int64_t end) {
    const AttentionJob *job = (const AttentionJob *)job_;
    const int64_t L = job->queries, S = job->keys, Sp = job->padded_keys, D = job->head_dim;
    const int64_t H = job->heads, C = H * D, Q = ATTENTION_QUERIES;
    /* keys and values as pairs, the block's queries, their exps in bf16 (uint16_t); scores,
     * weighted sums, row sums (float) */
    uint16_t *halves = malloc(sizeof(uint16_t) * (2 * D * Sp + Q * D + Q * Sp));
    float *floats = malloc(sizeof(float) * (Q * Sp + Q * D + Q));
    if (!halves || !floats) {
        free(halves), free(floats);
        *job->failed = 1;
        return;
    }
    uint16_t *keys_p = halves, *values_p = keys_p + D * Sp, *queries = values_p + D * Sp, *exps = queries + Q * D;
    float *scores = floats, *sums_v = scores + Q * Sp, *sums = sums_v + Q * D;
    int64_t ready = -1;
    for (int64_t u = begin; u < end; u++) {
        const int64_t pair = u / job->blocks, b = pair / H, h = pair % H, i0 = (u % job->blocks) * Q;
        const int count = (int)(L - i0 < Q ? L - i0 : Q);
        if (pair != ready) attention_head_pairs(job, b, h, keys_p, values_p), ready = pair;
        const int64_t first = (b * L + i0) * C + h * D;
        const uint16_t *q = (const uint16_t *)job->q + first;
        for (int t = 0; t < count; t++) memcpy(queries + t * D, q + t * C, sizeof(uint16_t) * D);
        pair_row(queries, count, D / 2, keys_p, Sp, NULL, scores);
        attention_softmax(scores, count, S, Sp, job->scale, exps, job->probabilities != NULL, sums);
        if (job->probabilities) attention_probabilities(job, pair, i0, count, scores, sums);
        pair_row(exps, count, Sp / 2, values_p, D, NULL, sums_v);
        for (int t = 0; t < count; t++) {
            const float inverse = 1.0f / sums[t];
            for (int64_t d = 0; d < D; d += 16) {
                fvec value;
                memcpy(&value, sums_v + t * D + d, sizeof value);
                MEMORY(store, bf16, 16)((uint16_t *)job->dst + first + t * C + d, value * inverse, 16);
            }
        }
    }
    free(halves), free(floats);
}
#endif

/* dst (n x queries x heads * head_dim) = the attention above of q (like dst) over kv (n x keys x
 * 2 heads * head_dim), all float32 or all bf16 (bf16 nonzero), contiguous; scale multiplies the
 * scores. Where `probabilities` is not NULL, the softmax too (n x heads x queries x keys, like
 * dst; a gradient's backward pass multiplies by it). Returns 0; -1 where memory ran out; -2 for
 * head_dim not a whole number of 16-float vectors or no keys. */
int seglab_attention(void *dst, void *probabilities, const void *q, const void *kv, int64_t n, int64_t queries,
                     int64_t keys, int64_t heads, int64_t head_dim, float scale, int bf16, int threads) {
    if (head_dim % 16 || keys < 1) return -2;
    int failed = 0;
    const int64_t blocks = (queries + ATTENTION_QUERIES - 1) / ATTENTION_QUERIES;
    AttentionJob job = {q, kv, dst, probabilities, queries, keys, heads, head_dim, blocks,
                        (keys + 15) / 16 * 16, scale, bf16, &failed};
    RangeFn blocks_of = attention_blocks;
#if BF16_PAIRS
    if (bf16) blocks_of = attention_blocks_pairs;
#endif
    parallel_for(n * heads * blocks, threads, blocks_of, &job);
    return failed ? -1 : 0;
}

/* The softmax's gradient for attention's backward pass (seglab.ops.token_attention), per head:
 *
 *   ds[b, h, i, j] = p_ij (dp_ij - sum_k p_ik dp_ik / sum_k p_ik),  dp_ij = dO_i . v_j,
 *
 * dO the output's gradient (N x L x C tokens, heads side by side), v_j the values (kv's last C
 * channels, kv N x S x 2C), p the softmax the forward pass wrote (N x heads x L x S); bf16, on a
 * processor with pair products. dp by pairs into float32, the row's weighted mean in float32,
 * each value of ds rounded to bf16 once.
 * Why: dp - (the p-weighted mean of dp) cancels where a row's values are alike (SegFormer's few
 * keys pooled from neighbouring pixels), leaving only the spread of dp. PyTorch's bf16 operators
 * round dp before the difference, and flash attention takes the mean as dO . o from the bf16
 * output: either puts an error of 2^-8 of dp itself into the difference, which can exceed the
 * spread. Dividing by the stored weights' own sum makes the mean exact for a constant dp, so the
 * error left is 2^-8 of the spread.
 *
 * Where asked, the queries' gradient too, dq_i = scale sum_j ds_ij k_j, from the block's rows of
 * ds as they were rounded (by pairs into float32, rounded once, written as tokens like q): the
 * rows are still in cache, where a batched product would read ds back from memory and its
 * result would need scaling and a transpose to tokens, two more passes. And where asked, the
 * keys' and values' sums over the queries, sum_i ds_ij q_i and sum_i p_ij dO_i, as float32
 * partial sums per range of blocks (the caller adds a head's ranges): the block's rows of ds
 * and p, interleaved as pairs along the queries, multiply the block's q and dO read across.
 * Then ds itself need not be written out at all. */
typedef struct {
    const uint16_t *grad, *kv, *probabilities, *q; /* q: the queries, where key_value_sums is asked */
    uint16_t *dst, *query_grads; /* dst: NULL (not written), or ds; query_grads: NULL, or N x L x C */
    float *key_value_sums; /* NULL, or per (image, head) x split: the keys' then the values' D x Sp sums */
    int64_t queries, keys, heads, head_dim, blocks, padded_keys;
    int64_t splits; /* ranges of blocks per (image, head), one item of work each */
    float scale;
    int *failed;
} ScoreGradJob;

#if BF16_PAIRS
/* Rows [0, count) of `rows` (bf16, `stride` apart, S values each) as pairs along the rows:
 * out (Q / 2 x Sp x 2), row 2r's value j beside row 2r + 1's; zero past S and past count. */
static void interleave_rows(const uint16_t *rows, int64_t stride, int count, int64_t S, int64_t Sp, uint16_t *out) {
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int t = 0; t < ATTENTION_QUERIES; t += 2)
        for (int64_t j = 0; j < Sp; j += 16) {
            const __mmask16 mask = (__mmask16)(S - j < 16 ? (1u << (S - j)) - 1 : 0xFFFFu);
            const __m256i even = t < count ? _mm256_maskz_loadu_epi16(mask, rows + t * stride + j)
                                           : _mm256_setzero_si256();
            const __m256i odd = t + 1 < count ? _mm256_maskz_loadu_epi16(mask, rows + (t + 1) * stride + j)
                                              : _mm256_setzero_si256();
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(even), odd, 1);
            _mm512_storeu_si512(out + (t / 2) * Sp * 2 + j * 2, _mm512_permutexvar_epi16(order, both));
        }
}

/* Rows [0, count) of `rows` (bf16, `stride` apart, D values each) across: out (D x Q), zero
 * past count. */
static void transpose_rows(const uint16_t *rows, int64_t stride, int count, int64_t D, uint16_t *out) {
    memset(out, 0, sizeof(uint16_t) * D * ATTENTION_QUERIES);
    for (int t = 0; t < count; t++)
        for (int64_t d = 0; d < D; d++) out[d * ATTENTION_QUERIES + t] = rows[t * stride + d];
}

/* sums (D x Sp) += across (D x Q) times pairs (Q / 2 x Sp x 2), by pairs into float32. */
static void add_pair_products(const uint16_t *across, const uint16_t *pairs, int64_t D, int64_t Sp, float *scratch,
                              float *sums) {
    pair_row(across, (int)D, ATTENTION_QUERIES / 2, pairs, Sp, NULL, scratch);
    for (int64_t i = 0; i < D * Sp; i += 16) {
        fvec sum, more;
        memcpy(&sum, sums + i, sizeof sum);
        memcpy(&more, scratch + i, sizeof more);
        sum += more;
        memcpy(sums + i, &sum, sizeof sum);
    }
}

static void score_grad_blocks(const void *job_, int64_t begin, int64_t end) {
    const ScoreGradJob *job = (const ScoreGradJob *)job_;
    const int64_t L = job->queries, S = job->keys, Sp = job->padded_keys, D = job->head_dim;
    const int64_t H = job->heads, C = H * D, Q = ATTENTION_QUERIES;
    /* the head's values as pairs along D (D / 2 x Sp x 2) and keys as pairs along the keys
     * (Sp / 2 x D x 2), the block's rows of dO and of ds; the products dO v^T and ds k. For the
     * keys' and values' sums: the block's p and ds as pairs along the queries, its dO and q
     * across, and one block's products (D x Sp) */
    const int sums = job->key_value_sums != NULL;
    uint16_t *halves = malloc(sizeof(uint16_t) * (2 * D * Sp + Q * D + Q * Sp + sums * 2 * (Q * Sp + D * Q)));
    float *products = malloc(sizeof(float) * (Q * Sp + Q * D + sums * D * Sp));
    if (!halves || !products) {
        free(halves), free(products);
        *job->failed = 1;
        return;
    }
    uint16_t *values_p = halves, *keys_p = values_p + D * Sp, *rows = keys_p + D * Sp, *ds_rows = rows + Q * D;
    uint16_t *p_pairs = ds_rows + Q * Sp, *ds_pairs = p_pairs + Q * Sp, *grad_across = ds_pairs + Q * Sp;
    uint16_t *q_across = grad_across + D * Q;
    float *query_products = products + Q * Sp, *scratch = query_products + Q * D;
    int64_t ready = -1;
    for (int64_t unit = begin; unit < end; unit++) {
        const int64_t pair = unit / job->splits, split = unit % job->splits, b = pair / H, h = pair % H;
        /* this range's own sums (zero on entry) */
        float *key_sums = sums ? job->key_value_sums + unit * 2 * D * Sp : NULL;
        float *value_sums = sums ? key_sums + D * Sp : NULL;
        const int64_t first_block = split * job->blocks / job->splits;
        for (int64_t block = first_block; block < (split + 1) * job->blocks / job->splits; block++) {
            const int64_t i0 = block * Q;
            const int count = (int)(L - i0 < Q ? L - i0 : Q);
            if (pair != ready) { /* the values, as the forward lays out its keys, and the keys as its values */
                const uint16_t *kv = job->kv + b * S * 2 * C + h * D;
                pairs_along_channels(kv + C, S, Sp, C, D, values_p);
                if (job->query_grads) pairs_along_keys(kv, S, Sp, C, D, keys_p);
                ready = pair;
            }
            const int64_t first = (b * L + i0) * C + h * D;
            for (int t = 0; t < count; t++) memcpy(rows + t * D, job->grad + first + t * C, sizeof(uint16_t) * D);
            pair_row(rows, count, D / 2, values_p, Sp, NULL, products);
            for (int t = 0; t < count; t++) {
                const uint16_t *p = job->probabilities + (pair * L + i0 + t) * S;
                f32x16 weighted = {0}, weights = {0};
                for (int64_t j = 0; j < S; j += 16) {
                    const int width = S - j < 16 ? (int)(S - j) : 16;
                    f32x16 dp;
                    memcpy(&dp, products + t * Sp + j, sizeof dp);
                    const f32x16 w = MEMORY(load, bf16, 16)(p + j, width); /* (zero past the keys) */
                    weighted += w * dp;
                    weights += w;
                }
                const float mean = lanes_sum(weighted) / lanes_sum(weights);
                uint16_t *ds = job->dst ? job->dst + (pair * L + i0 + t) * S : NULL;
                for (int64_t j = 0; j < Sp; j += 16) {
                    const int width = S - j < 16 ? (int)(S - j) : 16;
                    f32x16 dp;
                    memcpy(&dp, products + t * Sp + j, sizeof dp);
                    /* zero past the keys: p is loaded as zero there and dp is zero (the values' pairs are) */
                    const f32x16 value = MEMORY(load, bf16, 16)(p + j, width) * (dp - mean);
                    /* rounded by one instruction, as the forward's exps */
                    const __m256i rounded = (__m256i)_mm512_cvtneps_pbh((__m512)value);
                    if (job->dst) _mm256_mask_storeu_epi16(ds + j, (__mmask16)((1u << width) - 1), rounded);
                    _mm256_storeu_si256((__m256i *)(ds_rows + t * Sp + j), rounded);
                }
            }
            if (job->query_grads) {
                pair_row(ds_rows, count, Sp / 2, keys_p, D, NULL, query_products);
                for (int t = 0; t < count; t++)
                    for (int64_t d = 0; d < D; d += 16) {
                        fvec value;
                        memcpy(&value, query_products + t * D + d, sizeof value);
                        MEMORY(store, bf16, 16)(job->query_grads + first + t * C + d, value * job->scale, 16);
                    }
            }
            if (sums) {
                interleave_rows(job->probabilities + (pair * L + i0) * S, S, count, S, Sp, p_pairs);
                interleave_rows(ds_rows, Sp, count, S, Sp, ds_pairs);
                transpose_rows(rows, D, count, D, grad_across);
                transpose_rows(job->q + first, C, count, D, q_across);
                add_pair_products(q_across, ds_pairs, D, Sp, scratch, key_sums);
                add_pair_products(grad_across, p_pairs, D, Sp, scratch, value_sums);
            }
        }
    }
    free(halves), free(products);
}
#endif

/* dst (n x heads x queries x keys) = ds above of grad (n x queries x heads * head_dim), kv
 * (n x keys x 2 heads * head_dim) and probabilities (like dst), all bf16, contiguous; dst NULL:
 * not written. Where query_grads is not NULL, dq above there (like grad), scale its factor.
 * Where key_value_sums is not NULL (float32, zeros, n x heads x splits x 2 x head_dim x padded
 * keys, padded keys = keys rounded up to 16), the keys' sums sum_i ds_ij q_i (q like grad, unscaled)
 * and the values' sum_i p_ij dO_i, across, for each of `splits` ranges of the query blocks
 * (1 <= splits <= the blocks of 64 queries). Returns 0; -1 where memory ran out; -2 for
 * head_dim not a whole number of 16-float vectors, no keys, splits out of range, or a processor
 * without pair products. */
int seglab_attention_score_grads(void *dst, void *query_grads, void *key_value_sums, const void *q, const void *grad,
                                 const void *kv, const void *probabilities, int64_t n, int64_t queries, int64_t keys,
                                 int64_t heads, int64_t head_dim, float scale, int64_t splits, int threads) {
    const int64_t blocks = (queries + ATTENTION_QUERIES - 1) / ATTENTION_QUERIES;
    if (!key_value_sums) splits = blocks;
    if (head_dim % 16 || keys < 1 || !BF16_PAIRS || splits < 1 || splits > blocks) return -2;
    int failed = 0;
    const ScoreGradJob job = {grad, kv, probabilities, q, dst, query_grads, key_value_sums, queries, keys, heads,
                              head_dim, blocks, (keys + 15) / 16 * 16, splits, scale, &failed};
#if BF16_PAIRS
    parallel_for(n * heads * splits, threads, score_grad_blocks, &job);
#else
    (void)job, (void)n, (void)threads;
#endif
    return failed ? -1 : 0;
}
