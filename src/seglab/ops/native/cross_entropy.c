/* Softmax cross-entropy over each pixel's classes and its gradient, in one pass over the
 * logits (seglab.ops.native.cross_entropy; seglab.losses' CrossEntropyLoss in CPU training).
 *
 * For pixel p with logits x (K classes), target t and weight w = weight[t] (1 without class
 * weights; 0 where t is ignore_index):
 *
 *   loss_p = w (log sum_c exp x_c - x_t)      grad_p,c = w (softmax(x)_c - [c = t]) / W
 *
 * and the loss is sum_p loss_p / W, W = sum_p w (PyTorch's mean reduction). PyTorch computes
 * this in six passes over a 4 x 21 x 512 x 512 map (the bf16 -> float32 copy, log-softmax,
 * nll_loss, then their two backward kernels and the copy back: 48 ms of a 1.7 s FCN-R50
 * training step on a 2-core Zen 4); here one pass reads the logits and writes the gradient,
 * in the logits' dtype, computed in float32.
 *
 * With few classes pixels go 16 at a time: each block's logits are read into a classes x 16
 * array, so that every step (the maximum, exp, the sum, the scaling) is a vector operation
 * across pixels; from ROW_CLASSES classes on, a pixel at a time, its classes in vectors. The
 * pixels are split into chunks of CHUNK, each summed on its own and the chunk sums added in
 * order, so the loss does not depend on the threads.
 */

#define BLOCK 16
#define CHUNK 4096 /* pixels; a multiple of BLOCK */
#define MAX_CLASSES 1024

typedef f32x16 block_f; /* (BLOCK lanes) */
typedef i32x16 block_i;

typedef struct {
    const void *logits;    /* pixels x classes, float32 or bf16 (uint16_t) */
    const int64_t *target; /* pixels */
    const float *weight;   /* NULL, or one per class */
    void *grad;            /* NULL, or pixels x classes in the logits' dtype */
    double *sums;          /* per chunk: W's share (first pass), then the loss's */
    int64_t *invalid;      /* per chunk: targets neither a class nor ignore_index */
    int64_t pixels, classes, ignore;
    float scale;           /* 1 / W */
    int bf16;
} LossJob;

static inline block_f block_of(float value) {
    block_f v;
    for (int l = 0; l < BLOCK; l++) v[l] = value;
    return v;
}

static inline block_f select_greater(block_f a, block_f b) { /* the lane-wise maximum */
    const block_i a_wins = a > b;
    return (block_f)(((block_i)a & a_wins) | ((block_i)b & ~a_wins));
}

/* exp(x) for x <= 0 (a logit minus its pixel's maximum): Cephes' expf, x = n ln 2 + r with
 * |r| <= ln 2 / 2, a degree-7 polynomial in r, the 2^n put into the exponent bits; within
 * 2 ulp of expf. Below -87 (exp < 1.6e-38, nothing beside the maximum's 1) it is clamped. */
static inline block_f exp_nonpositive(block_f x) {
    x = select_greater(x, block_of(-87.0f));
    const block_f shift = block_of(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const block_f n = (x * 1.44269504088896341f + shift) - shift;
    const block_f r = x - n * 0.693359375f + n * 2.12194440e-4f;
    block_f p = block_of(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const block_i two_to_n = (__builtin_convertvector(n, block_i) + 127) << 23;
    return p * (block_f)two_to_n;
}

/* log(s) for s >= 1 (a sum of exps whose largest is 1): Cephes' logf, s = 2^e m with m in
 * [sqrt(1/2), sqrt(2)), a degree-8 polynomial in m - 1; within 2 ulp of logf. */
static inline block_f log_at_least_one(block_f s) {
    const block_i bits = (block_i)s;
    block_i exponent = ((bits >> 23) & 0xff) - 127;
    block_f m = (block_f)((bits & 0x007fffff) | 0x3f800000); /* in [1, 2) */
    const block_i halve = m > 1.41421356f;
    m = (block_f)(((block_i)(m * 0.5f) & halve) | ((block_i)m & ~halve));
    exponent -= halve; /* (true is -1) */
    const block_f e = __builtin_convertvector(exponent, block_f), f = m - 1.0f, z = f * f;
    block_f p = block_of(7.0376836292e-2f);
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    return f + (p * f * z - 2.12194440e-4f * e - 0.5f * z) + 0.693359375f * e;
}

/* x[c][l] = logit c of pixel l of the block at `offset` (row-major pixels x K), for the first
 * `lanes` pixels (0 for the others). A full block goes class by class (16 strided reads, one vector written):
 * 1.3x faster for the whole kernel than pixel by pixel. */
static inline void load_block(block_f *x, const void *logits, int64_t offset, int64_t K, int lanes, int bf16) {
    if (bf16) {
        const uint16_t *rows = (const uint16_t *)logits + offset;
        if (lanes == BLOCK)
            for (int64_t c = 0; c < K; c++)
                for (int l = 0; l < BLOCK; l++) x[c][l] = bf16_to_float(rows[l * K + c]);
        else
            for (int l = 0; l < lanes; l++)
                for (int64_t c = 0; c < K; c++) x[c][l] = bf16_to_float(rows[l * K + c]);
    } else {
        const float *rows = (const float *)logits + offset;
        if (lanes == BLOCK)
            for (int64_t c = 0; c < K; c++)
                for (int l = 0; l < BLOCK; l++) x[c][l] = rows[l * K + c];
        else
            for (int l = 0; l < lanes; l++)
                for (int64_t c = 0; c < K; c++) x[c][l] = rows[l * K + c];
    }
    for (int l = lanes; l < BLOCK; l++)
        for (int64_t c = 0; c < K; c++) x[c][l] = 0.0f;
}

/* The transpose of load_block: the block's first `lanes` pixels written to `grad`. */
static inline void store_block(void *grad, const block_f *x, int64_t offset, int64_t K, int lanes, int bf16) {
    if (bf16) {
        uint16_t *rows = (uint16_t *)grad + offset;
        if (lanes == BLOCK)
            for (int64_t c = 0; c < K; c++)
                for (int l = 0; l < BLOCK; l++) rows[l * K + c] = float_to_bf16(x[c][l]);
        else
            for (int l = 0; l < lanes; l++)
                for (int64_t c = 0; c < K; c++) rows[l * K + c] = float_to_bf16(x[c][l]);
    } else {
        float *rows = (float *)grad + offset;
        if (lanes == BLOCK)
            for (int64_t c = 0; c < K; c++)
                for (int l = 0; l < BLOCK; l++) rows[l * K + c] = x[c][l];
        else
            for (int l = 0; l < lanes; l++)
                for (int64_t c = 0; c < K; c++) rows[l * K + c] = x[c][l];
    }
}

/* x[c] <- exp(x[c] - the lane's maximum) for the K rows of a block; the maximum into `top`.
 * Returns the sums of exps (each at least 1). */
static inline block_f block_exps(block_f *x, int64_t K, block_f *top) {
    *top = x[0];
    for (int64_t c = 1; c < K; c++) *top = select_greater(x[c], *top);
    block_f total = block_of(0.0f);
    for (int64_t c = 0; c < K; c++) {
        x[c] = exp_nonpositive(x[c] - *top);
        total += x[c];
    }
    return total;
}

/* One past the last pixel of `chunk`. */
static inline int64_t chunk_end(const LossJob *job, int64_t chunk) {
    return (chunk + 1) * CHUNK < job->pixels ? (chunk + 1) * CHUNK : job->pixels;
}

/* First pass: W's share and the invalid targets of chunks [begin, end). */
static void count_chunks(const void *job_, int64_t begin, int64_t end) {
    const LossJob *job = (const LossJob *)job_;
    for (int64_t chunk = begin; chunk < end; chunk++) {
        const int64_t first = chunk * CHUNK, last = chunk_end(job, chunk);
        double counted = 0.0;
        int64_t invalid = 0;
        for (int64_t p = first; p < last; p++) {
            const int64_t t = job->target[p];
            if (t == job->ignore) continue;
            if (t < 0 || t >= job->classes) invalid++;
            else counted += job->weight ? job->weight[t] : 1.0f;
        }
        job->sums[chunk] = counted;
        job->invalid[chunk] = invalid;
    }
}

/* Second pass: the loss of chunks [begin, end) and, when job->grad is set, their gradient. */
static void loss_chunks(const void *job_, int64_t begin, int64_t end) {
    const LossJob *job = (const LossJob *)job_;
    const int64_t K = job->classes;
    block_f x[K]; /* a block's logits, then their exp, then their gradient (at most 64 KB) */
    for (int64_t chunk = begin; chunk < end; chunk++) {
        const int64_t first = chunk * CHUNK, last = chunk_end(job, chunk);
        double loss = 0.0;
        for (int64_t p0 = first; p0 < last; p0 += BLOCK) {
            const int lanes = last - p0 < BLOCK ? (int)(last - p0) : BLOCK;
            float w[BLOCK], true_logit[BLOCK];
            int64_t t[BLOCK];
            for (int l = 0; l < BLOCK; l++) { /* lanes past the end: logits 0, weight 0 */
                t[l] = l < lanes ? job->target[p0 + l] : job->ignore;
                const int counted = t[l] != job->ignore && t[l] >= 0 && t[l] < K;
                w[l] = counted ? (job->weight ? job->weight[t[l]] : 1.0f) : 0.0f;
                if (!counted) t[l] = -1;
            }
            load_block(x, job->logits, p0 * K, K, lanes, job->bf16);
            for (int l = 0; l < BLOCK; l++) true_logit[l] = t[l] >= 0 ? x[t[l]][l] : 0.0f;

            block_f top;
            const block_f total = block_exps(x, K, &top);
            const block_f log_of_sum = log_at_least_one(total);
            for (int l = 0; l < lanes; l++)
                if (w[l] != 0.0f) loss += w[l] * (top[l] + log_of_sum[l] - true_logit[l]);
            if (!job->grad) continue;

            block_f share;
            for (int l = 0; l < BLOCK; l++) share[l] = w[l] * job->scale / total[l];
            for (int64_t c = 0; c < K; c++) x[c] *= share;
            for (int l = 0; l < BLOCK; l++)
                if (t[l] >= 0) x[t[l]][l] -= w[l] * job->scale;
            store_block(job->grad, x, p0 * K, K, lanes, job->bf16);
        }
        job->sums[chunk] = loss;
    }
}

/* Many classes: one pixel at a time, its classes in vectors of BLOCK (the row padded to whole
 * vectors). The block layout above reads and writes each score alone to transpose it, about 5
 * cycles per score, which with 150 classes cost as much as PyTorch's passes; here a row is
 * read and written in vectors, but each pixel pays about 300 cycles of its own (the sums
 * across a vector's lanes, the logarithm, the padding). bf16, 131,072 pixels, 2 threads,
 * blocks / rows: 32 classes 2.6 / 4.4 ms, 64 5.1 / 5.8, 96 8.7 / 6.9, 128 12.2 / 7.8, 192
 * 20.5 / 9.8 (Zen 4): rows from ROW_CLASSES on. */
#define ROW_CLASSES 80

static inline float lanes_max(block_f v) {
    float top = v[0];
    for (int l = 1; l < BLOCK; l++) top = v[l] > top ? v[l] : top;
    return top;
}

static inline float lanes_sum(block_f v) {
    float total = 0.0f;
    for (int l = 0; l < BLOCK; l++) total += v[l];
    return total;
}

/* Pixel p's K scores (row-major pixels x K, float32 or bf16) into x as vectors of BLOCK, then
 * their exp after subtracting the maximum (0 past the K classes). Returns the sum of exps; the
 * maximum into *top and the score of class t (0 for t < 0) into *true_score. */
static inline float row_exps(block_f *x, const void *logits, int64_t p, int64_t K, int bf16, int64_t t, float *top,
                             float *true_score) {
    const int64_t vectors = (K + BLOCK - 1) / BLOCK;
    float *scores = (float *)x;
    if (bf16) {
        const uint16_t *row = (const uint16_t *)logits + p * K;
        for (int64_t c = 0; c < K; c++) scores[c] = bf16_to_float(row[c]);
    } else {
        memcpy(scores, (const float *)logits + p * K, K * sizeof(float));
    }
    for (int64_t c = K; c < vectors * BLOCK; c++) scores[c] = scores[0]; /* not above the maximum */
    block_f tops = x[0];
    for (int64_t v = 1; v < vectors; v++) tops = select_greater(x[v], tops);
    *top = lanes_max(tops);
    *true_score = t >= 0 ? scores[t] : 0.0f;
    const block_f shift = block_of(*top);
    for (int64_t v = 0; v < vectors; v++) x[v] = exp_nonpositive(x[v] - shift);
    for (int64_t c = K; c < vectors * BLOCK; c++) scores[c] = 0.0f;
    block_f totals = block_of(0.0f);
    for (int64_t v = 0; v < vectors; v++) totals += x[v];
    return lanes_sum(totals);
}

static void loss_rows_chunks(const void *job_, int64_t begin, int64_t end) {
    const LossJob *job = (const LossJob *)job_;
    const int64_t K = job->classes, vectors = (K + BLOCK - 1) / BLOCK;
    block_f x[vectors]; /* a pixel's scores, then their exp, then their gradient */
    float *scores = (float *)x;
    for (int64_t chunk = begin; chunk < end; chunk++) {
        const int64_t first = chunk * CHUNK, last = chunk_end(job, chunk);
        double loss = 0.0;
        for (int64_t p = first; p < last; p++) {
            const int64_t t = job->target[p]; /* a class or ignore: the first pass checked */
            if (t == job->ignore) {
                if (job->grad) memset((char *)job->grad + p * K * (job->bf16 ? 2 : 4), 0, K * (job->bf16 ? 2 : 4));
                continue;
            }
            const float w = job->weight ? job->weight[t] : 1.0f;
            float top, true_score;
            const float total = row_exps(x, job->logits, p, K, job->bf16, t, &top, &true_score);
            loss += w * (top + logf(total) - true_score);
            if (!job->grad) continue;

            const block_f share = block_of(w * job->scale / total);
            for (int64_t v = 0; v < vectors; v++) x[v] *= share;
            scores[t] -= w * job->scale;
            if (job->bf16) {
                uint16_t *row = (uint16_t *)job->grad + p * K;
                for (int64_t c = 0; c < K; c++) row[c] = float_to_bf16(scores[c]);
            } else {
                memcpy((float *)job->grad + p * K, scores, K * sizeof(float));
            }
        }
        job->sums[chunk] = loss;
    }
}

/* The mean loss into result[0] and W into result[1]; the gradient into `grad` when it is not
 * NULL. Returns 0; -1 for more than MAX_CLASSES classes; -2 when a target is neither a class
 * nor `ignore` (nothing written); -3 when out of memory. With W = 0 (every pixel ignored) the
 * loss and the gradient are 0. */
int seglab_cross_entropy(const void *logits, const int64_t *target, const float *weight, void *grad,
                         int64_t pixels, int64_t classes, int64_t ignore, int bf16, int threads,
                         double *result) {
    if (classes < 1 || classes > MAX_CLASSES) return -1;
    const int64_t chunks = (pixels + CHUNK - 1) / CHUNK;
    double *sums = malloc((chunks > 0 ? chunks : 1) * sizeof *sums);
    int64_t *invalid = malloc((chunks > 0 ? chunks : 1) * sizeof *invalid);
    if (!sums || !invalid) {
        free(sums);
        free(invalid);
        return -3;
    }
    LossJob job = {logits, target, weight, grad, sums, invalid, pixels, classes, ignore, 0.0f, bf16};
    parallel_for(chunks, threads, count_chunks, &job);
    double counted = 0.0;
    int64_t bad = 0;
    for (int64_t chunk = 0; chunk < chunks; chunk++) {
        counted += sums[chunk];
        bad += invalid[chunk];
    }
    if (bad) {
        free(sums);
        free(invalid);
        return -2;
    }
    job.scale = counted > 0.0 ? (float)(1.0 / counted) : 0.0f;
    parallel_for(chunks, threads, classes < ROW_CLASSES ? loss_chunks : loss_rows_chunks, &job);
    double loss = 0.0;
    for (int64_t chunk = 0; chunk < chunks; chunk++) loss += sums[chunk];
    result[0] = counted > 0.0 ? loss / counted : 0.0;
    result[1] = counted;
    free(sums);
    free(invalid);
    return 0;
}
