/* The sums behind the soft overlap losses (Dice, Jaccard, Tversky; seglab.losses.overlap) and
 * their gradient, from each pixel's softmax in one pass over the logits each way
 * (seglab.ops.native.overlap_sums / overlap_sums_backward):
 *
 *   I[n, c] = sum over image n's counted pixels with target c of p_c     (<Y, P>)
 *   P[n, c] = sum over image n's counted pixels of p_c, or p_c^2 (l2)   (|P|)
 *   Y[n, c] = the number of image n's counted pixels with target c      (|Y|)
 *
 * p = softmax(logits) per pixel in float32; a pixel counts unless its target is `ignore`.
 * Backward, from the gradients gI and gP of the loss with respect to I and P (the loss's own
 * formula on these N x K sums is PyTorch's, on small tensors):
 *
 *   dL/dp_c = gP[n, c] (1, or 2 p_c) + [c = t] gI[n, t],   dL/dlogit_c = p_c (dL/dp_c - sum_k p_k dL/dp_k)
 *
 * the softmax recomputed from the logits rather than kept (one map of the logits' size less).
 * Pixels go 16 at a time with their classes as rows of a block (cross_entropy.c's layout and
 * helpers, this file compiled after it), in chunks of CHUNK pixels within one image; each
 * chunk's sums are float64 and the chunks are added in order, so the sums do not depend on the
 * threads. From ROW_CLASSES classes on (ADE20K's 150), a pixel at a time, its classes in
 * vectors, as cross_entropy.c's rows: the sums of |P| in float32 vectors per chunk, the others
 * in float64 as they come.
 *
 * With cross-entropy (`seglab_overlap_sums` given `ce`: `ce+dice` and the like), the same pass sums
 * cross_entropy.c's loss, w_t (log sum_c exp x_c - x_t) with w_t = weight[t] (1 without class
 * weights), and W = sum w_t; the backward adds its gradient, s w_t (p_c - [c = t]) with s the
 * loss's gradient over W, to the overlap's: one pass each way for both losses, the gradient
 * rounded once to bf16 logits' dtype. Apart, the two losses read the logits three times and
 * write two gradients of their size, which autograd then adds.
 *
 * Why: PyTorch's operators for the same sums (softmax, the masking, a gather, two scatter-adds,
 * a sum; then the backward of each) took about 127 ms on one thread for a 4 x 21 x 512 x 512
 * batch against cross-entropy's 55, and `--loss ce+dice` is `seglab train`'s default. */

typedef struct {
    const void *logits;    /* pixels x classes (all images' pixels in order), float32 or bf16 */
    const int64_t *target; /* pixels */
    const float *grad_i, *grad_p; /* backward: images x classes */
    void *grad;                   /* backward: pixels x classes, the logits' dtype */
    double *partial;              /* forward: per chunk 3 x classes (I, P, Y) */
    int64_t *invalid;             /* forward: per chunk, targets neither a class nor `ignore` */
    const float *weight;          /* with cross-entropy: NULL, or one per class */
    double *ce_partial;           /* forward with cross-entropy: per chunk its loss's sum and W's */
    float ce_scale;               /* backward: cross-entropy's gradient over W; 0: none */
    int64_t image_pixels, chunks_per_image, classes, ignore;
    int bf16, l2;
} OverlapJob;

/* `value` (l2), else ones: the factor of p in |P|'s term (p^2 or p) and its slope (2p or 1). */
static inline block_f squared_or_one(block_f value, int l2) {
    if (l2) return value;
    return block_of(1.0f);
}

/* The softmax of the block at `p0` (x in, p out, K x BLOCK); `t` each lane's target class, -1
 * where it does not count (ignored, or past the image's end). With `nll` (not NULL), each
 * lane's -log p_t too (0 where it does not count). Returns the lanes read. */
static inline int overlap_block(const OverlapJob *job, int64_t p0, int64_t end, block_f *x, block_i *t, block_f *nll) {
    const int64_t K = job->classes;
    const int lanes = end - p0 < BLOCK ? (int)(end - p0) : BLOCK;
    for (int l = 0; l < BLOCK; l++) {
        const int64_t target = l < lanes ? job->target[p0 + l] : -1;
        (*t)[l] = target == job->ignore || target < 0 || target >= K ? -1 : (int32_t)target;
    }
    load_block(x, job->logits, p0 * K, K, lanes, job->bf16);
    block_f true_logit = block_of(0.0f), top;
    if (nll)
        for (int l = 0; l < BLOCK; l++) true_logit[l] = (*t)[l] >= 0 ? x[(*t)[l]][l] : 0.0f;
    const block_f total = block_exps(x, K, &top), inverse = block_of(1.0f) / total;
    if (nll) *nll = (block_f)((block_i)(top + log_at_least_one(total) - true_logit) & (*t >= 0));
    for (int64_t c = 0; c < K; c++) x[c] *= inverse;
    return lanes;
}

/* Each lane's cross-entropy weight: weight[t] (1 without class weights), 0 where it does not count. */
static inline block_f ce_weights(const OverlapJob *job, block_i t) {
    block_f w;
    for (int l = 0; l < BLOCK; l++) w[l] = t[l] < 0 ? 0.0f : job->weight ? job->weight[t[l]] : 1.0f;
    return w;
}

/* The first and one past the last pixel of chunk `chunk` (all images' pixels numbered in order). */
static inline void overlap_chunk(const OverlapJob *job, int64_t chunk, int64_t *first, int64_t *end) {
    const int64_t image = chunk / job->chunks_per_image, within = chunk % job->chunks_per_image;
    const int64_t start = within * CHUNK, stop = start + CHUNK < job->image_pixels ? start + CHUNK : job->image_pixels;
    *first = image * job->image_pixels + start;
    *end = image * job->image_pixels + stop;
}

/* Chunk `chunk`'s pixels [*first, *end) and its sums zeroed; its targets that are neither a
 * class nor `ignore` counted into job->invalid. Returns whether there are none. */
static inline int start_chunk(const OverlapJob *job, int64_t chunk, int64_t *first, int64_t *end) {
    const int64_t K = job->classes;
    memset(job->partial + chunk * 3 * K, 0, 3 * K * sizeof(double));
    overlap_chunk(job, chunk, first, end);
    int64_t invalid = 0;
    for (int64_t p = *first; p < *end; p++) {
        const int64_t t = job->target[p];
        if (t != job->ignore && (t < 0 || t >= K)) invalid++;
    }
    job->invalid[chunk] = invalid;
    return invalid == 0;
}

static void overlap_sum_chunks(const void *job_, int64_t begin, int64_t end_chunk) {
    const OverlapJob *job = (const OverlapJob *)job_;
    const int64_t K = job->classes;
    block_f x[K], masses[K], shares[K], counts[K]; /* per class: |P|, <Y, P> and |Y| by lanes */
    for (int64_t chunk = begin; chunk < end_chunk; chunk++) {
        double *intersection = job->partial + chunk * 3 * K, *predicted = intersection + K, *actual = predicted + K;
        int64_t first, end;
        if (!start_chunk(job, chunk, &first, &end)) continue;
        for (int64_t c = 0; c < K; c++) masses[c] = shares[c] = counts[c] = block_of(0.0f);
        double ce_loss = 0.0, ce_counted = 0.0;
        for (int64_t p0 = first; p0 < end; p0 += BLOCK) {
            block_i t;
            block_f nll;
            overlap_block(job, p0, end, x, &t, job->ce_partial ? &nll : NULL);
            if (job->ce_partial) {
                const block_f w = ce_weights(job, t);
                for (int l = 0; l < BLOCK; l++) {
                    ce_loss += w[l] * nll[l];
                    ce_counted += w[l];
                }
            }
            const block_f counted = (block_f)((block_i)block_of(1.0f) & (t >= 0));
            for (int64_t c = 0; c < K; c++) {
                const block_i is_target = t == (int)c; /* all ones or zero per lane */
                masses[c] += squared_or_one(x[c], job->l2) * x[c] * counted;
                shares[c] += (block_f)((block_i)x[c] & is_target);
                counts[c] += (block_f)((block_i)block_of(1.0f) & is_target);
            }
        }
        for (int64_t c = 0; c < K; c++)
            for (int l = 0; l < BLOCK; l++) {
                predicted[c] += masses[c][l];
                intersection[c] += shares[c][l];
                actual[c] += counts[c][l];
            }
        if (job->ce_partial) {
            job->ce_partial[2 * chunk] = ce_loss;
            job->ce_partial[2 * chunk + 1] = ce_counted;
        }
    }
}

static void overlap_grad_chunks(const void *job_, int64_t begin, int64_t end_chunk) {
    const OverlapJob *job = (const OverlapJob *)job_;
    const int64_t K = job->classes;
    block_f x[K], dp[K];
    for (int64_t chunk = begin; chunk < end_chunk; chunk++) {
        const int64_t image = chunk / job->chunks_per_image;
        const float *grad_i = job->grad_i + image * K, *grad_p = job->grad_p + image * K;
        int64_t first, end;
        overlap_chunk(job, chunk, &first, &end);
        for (int64_t p0 = first; p0 < end; p0 += BLOCK) {
            block_i t;
            const int lanes = overlap_block(job, p0, end, x, &t, NULL);
            const block_f counted = (block_f)((block_i)block_of(1.0f) & (t >= 0));
            block_f weighted = block_of(0.0f); /* sum_k p_k dL/dp_k */
            for (int64_t c = 0; c < K; c++) {
                dp[c] = block_of(grad_p[c]) * squared_or_one(2.0f * x[c], job->l2) * counted
                        + (block_f)((block_i)block_of(grad_i[c]) & (t == (int)c));
                weighted += x[c] * dp[c];
            }
            if (job->ce_scale != 0.0f) { /* + s w_t (p_c - [c = t]) */
                const block_f share = block_of(job->ce_scale) * ce_weights(job, t);
                for (int64_t c = 0; c < K; c++) x[c] *= dp[c] - weighted + share;
                for (int l = 0; l < BLOCK; l++)
                    if (t[l] >= 0) x[t[l]][l] -= share[l];
            } else {
                for (int64_t c = 0; c < K; c++) x[c] *= dp[c] - weighted;
            }
            store_block(job->grad, x, p0 * K, K, lanes, job->bf16);
        }
    }
}

/* Many classes: pixel p's softmax into x (vectors of BLOCK, 0 past the K classes), and with
 * `nll` its -log p_t (target t >= 0). */
static inline void overlap_row(const OverlapJob *job, int64_t p, int64_t t, block_f *x, float *nll) {
    const int64_t vectors = (job->classes + BLOCK - 1) / BLOCK;
    float top, true_score;
    const float total = row_exps(x, job->logits, p, job->classes, job->bf16, t, &top, &true_score);
    if (nll) *nll = t >= 0 ? top + logf(total) - true_score : 0.0f;
    const block_f inverse = block_of(1.0f / total);
    for (int64_t v = 0; v < vectors; v++) x[v] *= inverse;
}

static inline int64_t counted_target(const OverlapJob *job, int64_t p) { /* -1: not counted */
    const int64_t t = job->target[p];
    return t == job->ignore || t < 0 || t >= job->classes ? -1 : t;
}

static void overlap_sum_rows(const void *job_, int64_t begin, int64_t end_chunk) {
    const OverlapJob *job = (const OverlapJob *)job_;
    const int64_t K = job->classes, vectors = (K + BLOCK - 1) / BLOCK;
    block_f x[vectors], masses[vectors];
    const float *mass = (const float *)masses;
    for (int64_t chunk = begin; chunk < end_chunk; chunk++) {
        double *intersection = job->partial + chunk * 3 * K, *predicted = intersection + K, *actual = predicted + K;
        int64_t first, end;
        if (!start_chunk(job, chunk, &first, &end)) continue;
        for (int64_t v = 0; v < vectors; v++) masses[v] = block_of(0.0f);
        double ce_loss = 0.0, ce_counted = 0.0;
        for (int64_t p = first; p < end; p++) {
            const int64_t t = counted_target(job, p);
            if (t < 0) continue;
            float nll;
            overlap_row(job, p, t, x, job->ce_partial ? &nll : NULL);
            for (int64_t v = 0; v < vectors; v++) masses[v] += squared_or_one(x[v], job->l2) * x[v];
            intersection[t] += ((const float *)x)[t];
            actual[t] += 1.0;
            if (job->ce_partial) {
                const float w = job->weight ? job->weight[t] : 1.0f;
                ce_loss += w * nll;
                ce_counted += w;
            }
        }
        for (int64_t c = 0; c < K; c++) predicted[c] = mass[c];
        if (job->ce_partial) {
            job->ce_partial[2 * chunk] = ce_loss;
            job->ce_partial[2 * chunk + 1] = ce_counted;
        }
    }
}

static void overlap_grad_rows(const void *job_, int64_t begin, int64_t end_chunk) {
    const OverlapJob *job = (const OverlapJob *)job_;
    const int64_t K = job->classes, vectors = (K + BLOCK - 1) / BLOCK;
    const size_t value_size = job->bf16 ? 2 : 4;
    block_f x[vectors], dp[vectors], grad_p[vectors];
    float *probabilities = (float *)x, *slope = (float *)dp;
    for (int64_t chunk = begin; chunk < end_chunk; chunk++) {
        const int64_t image = chunk / job->chunks_per_image;
        const float *grad_i = job->grad_i + image * K;
        memset(grad_p, 0, sizeof grad_p);
        memcpy(grad_p, job->grad_p + image * K, K * sizeof(float));
        int64_t first, end;
        overlap_chunk(job, chunk, &first, &end);
        for (int64_t p = first; p < end; p++) {
            const int64_t t = counted_target(job, p);
            if (t < 0) { /* counts nowhere: no gradient */
                memset((char *)job->grad + p * K * value_size, 0, K * value_size);
                continue;
            }
            overlap_row(job, p, t, x, NULL);
            block_f weighted = block_of(0.0f); /* sum_k p_k dL/dp_k */
            for (int64_t v = 0; v < vectors; v++) dp[v] = squared_or_one(2.0f * x[v], job->l2) * grad_p[v];
            slope[t] += grad_i[t];
            for (int64_t v = 0; v < vectors; v++) weighted += x[v] * dp[v];
            const float share = job->ce_scale * (job->weight ? job->weight[t] : 1.0f); /* + s w_t (p_c - [c = t]) */
            const block_f offset = block_of(share - lanes_sum(weighted));
            for (int64_t v = 0; v < vectors; v++) x[v] *= dp[v] + offset;
            probabilities[t] -= share;
            if (job->bf16) {
                uint16_t *row = (uint16_t *)job->grad + p * K;
                for (int64_t c = 0; c < K; c++) row[c] = float_to_bf16(probabilities[c]);
            } else {
                memcpy((float *)job->grad + p * K, probabilities, K * sizeof(float));
            }
        }
    }
}

static OverlapJob overlap_job(const void *logits, const int64_t *target, int64_t image_pixels, int64_t classes,
                              int64_t ignore, int bf16, int l2) {
    OverlapJob job = {logits, target, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0.0f, image_pixels,
                      (image_pixels + CHUNK - 1) / CHUNK, classes, ignore, bf16, l2};
    return job;
}

/* sums (images x 3 x classes, float64: I, P, Y above) of logits (images x image_pixels x
 * classes) against target (images x image_pixels); with `ce` (not NULL), cross-entropy's summed
 * loss and W into ce[0] and ce[1], `weight` its class weights (NULL: none). Returns 0; -1 for
 * classes outside [1, MAX_CLASSES]; -2 when a target is neither a class nor `ignore` (nothing
 * written); -3 when out of memory. */
int seglab_overlap_sums(const void *logits, const int64_t *target, const float *weight, int64_t images,
                        int64_t image_pixels, int64_t classes, int64_t ignore, int bf16, int l2, int threads,
                        double *sums, double *ce) {
    if (classes < 1 || classes > MAX_CLASSES) return -1;
    OverlapJob job = overlap_job(logits, target, image_pixels, classes, ignore, bf16, l2);
    const int64_t chunks = images * job.chunks_per_image, allocated = chunks > 0 ? chunks : 1;
    job.weight = weight;
    job.partial = malloc(allocated * 3 * classes * sizeof(double));
    job.invalid = malloc(allocated * sizeof(int64_t));
    job.ce_partial = ce ? malloc(allocated * 2 * sizeof(double)) : NULL;
    if (!job.partial || !job.invalid || (ce && !job.ce_partial)) {
        free(job.partial), free(job.invalid), free(job.ce_partial);
        return -3;
    }
    parallel_for(chunks, threads, classes < ROW_CLASSES ? overlap_sum_chunks : overlap_sum_rows, &job);
    int64_t bad = 0;
    for (int64_t chunk = 0; chunk < chunks; chunk++) bad += job.invalid[chunk];
    if (!bad) {
        memset(sums, 0, images * 3 * classes * sizeof(double));
        for (int64_t chunk = 0; chunk < chunks; chunk++) {
            double *out = sums + (chunk / job.chunks_per_image) * 3 * classes;
            for (int64_t i = 0; i < 3 * classes; i++) out[i] += job.partial[chunk * 3 * classes + i];
        }
        if (ce) {
            ce[0] = ce[1] = 0.0;
            for (int64_t chunk = 0; chunk < chunks; chunk++) {
                ce[0] += job.ce_partial[2 * chunk];
                ce[1] += job.ce_partial[2 * chunk + 1];
            }
        }
    }
    free(job.partial), free(job.invalid), free(job.ce_partial);
    return bad ? -2 : 0;
}

/* grad (like logits) = the gradient above from grad_i and grad_p (images x classes, float32),
 * plus cross-entropy's scaled by `ce_scale` (its loss's gradient over W; 0: none) with class
 * weights `weight` (NULL: none), for targets that `seglab_overlap_sums` accepted. Returns 0;
 * -1 for classes outside [1, MAX_CLASSES]. */
int seglab_overlap_sums_backward(const void *logits, const int64_t *target, const float *grad_i, const float *grad_p,
                                 const float *weight, float ce_scale, void *grad, int64_t images, int64_t image_pixels,
                                 int64_t classes, int64_t ignore, int bf16, int l2, int threads) {
    if (classes < 1 || classes > MAX_CLASSES) return -1;
    OverlapJob job = overlap_job(logits, target, image_pixels, classes, ignore, bf16, l2);
    job.grad_i = grad_i, job.grad_p = grad_p, job.grad = grad, job.weight = weight, job.ce_scale = ce_scale;
    parallel_for(images * job.chunks_per_image, threads, classes < ROW_CLASSES ? overlap_grad_chunks : overlap_grad_rows,
                 &job);
    return 0;
}
