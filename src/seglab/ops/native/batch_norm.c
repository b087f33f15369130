/* BatchNorm in training, with what follows it in a ResNet (a shortcut addition, a ReLU), forward
 * and backward on channels-last maps (seglab.ops.native; seglab.ops.batch_norm).
 *
 * A map is `rows` pixels (N H W) of C contiguous channels. In training BatchNorm normalises
 * with the batch's statistics; with the optional shortcut r and ReLU:
 *
 *   y = relu(a x + b + r),  a = gamma / sqrt(var + eps),  b = beta - a mean
 *
 * and, with g = dy where y > 0 (0 elsewhere) and M rows:
 *
 *   dr = g,  dbeta = sum g,  dgamma = sum g (x - mean) / sqrt(var + eps),
 *   dx = a g - a (sum g) / M - a (x - mean) (sum g (x - mean)) / (M (var + eps)) = a g + k1 x + k0
 *
 * PyTorch runs the norm, the addition and the ReLU as operators of their own: forward the
 * norm's two passes (its statistics; y), the addition (reads two maps, writes one) and relu_
 * (reads and writes one); backward threshold_backward (reads dy and y, writes g) and the norm's
 * two passes. Here the forward is two passes (the statistics; y) and the backward two: the
 * sums of g, reading dy and x (without a shortcut the ReLU's mask is recomputed from a x + b;
 * with one it is read from y, which the next layer keeps anyway, and g is written for the
 * shortcut), then dx. Maps are float32 or bf16, computed in float32.
 *
 * The rows are split into chunks whose sums are kept apart and added in order (in double), so
 * the results do not depend on the threads. Within a chunk the sums are float32, of x less the
 * map's first row (a shift that keeps the sum of squares from cancelling); the statistics take
 * four rows at a time (a quarter of the loads and stores of the sums). */
#define NORM_CHUNKS 64 /* at most: each chunk's 2 C sums are kept apart */

typedef struct {
    const void *x, *shortcut, *dy, *y;
    void *out;                 /* y (forward) or dx (backward) */
    void *g;                   /* backward with a shortcut: g, the shortcut's gradient */
    const float *a, *b;        /* per channel: y = relu(a x + b + r) */
    const float *k1, *k0;      /* per channel: dx = a g + k1 x + k0 */
    const float *center;       /* per channel: the shift of the sums (forward), the mean (backward) */
    float *sums;               /* per chunk: 2 C sums */
    int64_t rows, channels, chunk_rows;
    int relu, bf16;
    const void *dy2;           /* backward with a shortcut: a second output gradient, dy = dy + dy2 */
} NormJob;

static inline float same_float(float value) { return value; }

static inline int64_t norm_rows_end(const NormJob *job, int64_t chunk) {
    const int64_t end = (chunk + 1) * job->chunk_rows;
    return end < job->rows ? end : job->rows;
}

/* Element i of a float32 or bf16 map, through the row's own restrict pointer (a cast to another
 * pointer type would lose restrict, and float32 loads would then alias the float sums: the
 * compiler left that loop scalar, 4x slower). */
static inline float to_float_float(float value) { return value; }
static inline float to_float_uint16_t(uint16_t bits) { return bf16_to_float(bits); }
#define VALUE(TYPE, p, i) to_float_##TYPE((p)[i])

/* The statistics' pass asks for each row's first line AHEAD_ROWS rows ahead where rows are at
 * least AHEAD_MIN_BYTES long: on the Zen 4 KVM guest the hardware prefetcher alone left that pass
 * at 10-14 GB/s where a plain read ran at 31 (4 x 256 x 128 x 128 bf16: 2.96 -> 2.36 ms; 512 and
 * 1,024 channels 10-18% less time; 64 channels, whose 128-byte rows it slowed, go without). */
#define AHEAD_ROWS 4
#define AHEAD_MIN_BYTES 512
#define AHEAD(p, bytes) __builtin_prefetch((const char *)(p) + (bytes))

/* Per chunk: s = sum (x - center), q = sum (x - center)^2, four rows at a time. */
#define STATISTICS(TYPE)                                                                        \
    {                                                                                           \
        int64_t r = first;                                                                      \
        for (; r + 4 <= last; r += 4) {                                                         \
            const TYPE *restrict x0 = (const TYPE *)job->x + r * C, *restrict x1 = x0 + C;      \
            const TYPE *restrict x2 = x1 + C, *restrict x3 = x2 + C;                            \
            if (ahead) {                                                                        \
                AHEAD(x0, ahead); AHEAD(x1, ahead); AHEAD(x2, ahead); AHEAD(x3, ahead);         \
            }                                                                                   \
            for (int64_t c = 0; c < C; c++) {                                                   \
                const float d0 = VALUE(TYPE, x0, c) - center[c], d1 = VALUE(TYPE, x1, c) - center[c]; \
                const float d2 = VALUE(TYPE, x2, c) - center[c], d3 = VALUE(TYPE, x3, c) - center[c]; \
                s[c] += (d0 + d1) + (d2 + d3);                                                  \
                q[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);                              \
            }                                                                                   \
        }                                                                                       \
        for (; r < last; r++) {                                                                 \
            const TYPE *restrict x0 = (const TYPE *)job->x + r * C;                             \
            for (int64_t c = 0; c < C; c++) {                                                   \
                const float d0 = VALUE(TYPE, x0, c) - center[c];                                \
                s[c] += d0;                                                                     \
                q[c] += d0 * d0;                                                                \
            }                                                                                   \
        }                                                                                       \
    }

/* Per chunk: s = sum g, q = sum g (x - mean); with a shortcut g read past the mask of y and
 * written out, else the mask recomputed from a x + b. */
#define GRADIENT_SUMS(TYPE, STORE)                                                              \
    for (int64_t r = first; r < last; r++) {                                                    \
        const TYPE *restrict xs = (const TYPE *)job->x + r * C;                                 \
        const TYPE *restrict dys = (const TYPE *)job->dy + r * C;                               \
        if (job->y && job->dy2) {                                                               \
            /* autograd's sum of the two gradients, rounded to the maps' dtype as it was */      \
            const TYPE *restrict ys = (const TYPE *)job->y + r * C;                             \
            const TYPE *restrict d2s = (const TYPE *)job->dy2 + r * C;                          \
            TYPE *restrict gs = (TYPE *)job->g + r * C;                                         \
            for (int64_t c = 0; c < C; c++) {                                                   \
                const float dy = to_float_##TYPE(STORE(VALUE(TYPE, dys, c) + VALUE(TYPE, d2s, c))); \
                const float g = VALUE(TYPE, ys, c) > floor_ ? dy : 0.0f;                        \
                gs[c] = STORE(g);                                                               \
                s[c] += g;                                                                      \
                q[c] += g * (VALUE(TYPE, xs, c) - center[c]);                                   \
            }                                                                                   \
        } else if (job->y) {                                                                    \
            const TYPE *restrict ys = (const TYPE *)job->y + r * C;                             \
            TYPE *restrict gs = (TYPE *)job->g + r * C;                                         \
            for (int64_t c = 0; c < C; c++) {                                                   \
                const float dy = VALUE(TYPE, dys, c); /* loaded either way: a select, no branch */ \
                const float g = VALUE(TYPE, ys, c) > floor_ ? dy : 0.0f;                        \
                gs[c] = STORE(g);                                                               \
                s[c] += g;                                                                      \
                q[c] += g * (VALUE(TYPE, xs, c) - center[c]);                                   \
            }                                                                                   \
        } else {                                                                                \
            for (int64_t c = 0; c < C; c++) {                                                   \
                const float x = VALUE(TYPE, xs, c), dy = VALUE(TYPE, dys, c);                   \
                const float g = a[c] * x + b[c] > floor_ ? dy : 0.0f;                           \
                s[c] += g;                                                                      \
                q[c] += g * (x - center[c]);                                                    \
            }                                                                                   \
        }                                                                                       \
    }

static void sums_chunks(const void *job_, int64_t begin, int64_t end, int gradient) {
    const NormJob *job = (const NormJob *)job_;
    const int64_t C = job->channels;
    const int64_t row_bytes = C * (job->bf16 ? 2 : 4), ahead = row_bytes >= AHEAD_MIN_BYTES ? AHEAD_ROWS * row_bytes : 0;
    const float *restrict center = job->center, *restrict a = job->a, *restrict b = job->b;
    const float floor_ = job->relu ? 0.0f : -INFINITY; /* g = 0 where y is not above it */
    for (int64_t chunk = begin; chunk < end; chunk++) {
        float *restrict s = job->sums + chunk * 2 * C, *restrict q = s + C;
        for (int64_t c = 0; c < C; c++) s[c] = q[c] = 0.0f;
        const int64_t first = chunk * job->chunk_rows, last = norm_rows_end(job, chunk);
        if (!gradient) {
            if (job->bf16) STATISTICS(uint16_t)
            else STATISTICS(float)
        } else if (job->bf16) {
            GRADIENT_SUMS(uint16_t, float_to_bf16)
        } else {
            GRADIENT_SUMS(float, same_float)
        }
    }
}

static void statistics_chunks(const void *job, int64_t begin, int64_t end) { sums_chunks(job, begin, end, 0); }
static void gradient_sums_chunks(const void *job, int64_t begin, int64_t end) { sums_chunks(job, begin, end, 1); }

/* y = relu(a x + b + r) (or without r, without the ReLU) for the rows of chunks [begin, end). */
#define NORMALISE(TYPE, STORE)                                                                  \
    for (int64_t r = first; r < last; r++) {                                                    \
        const TYPE *restrict xs = (const TYPE *)job->x + r * C;                                 \
        TYPE *restrict ys = (TYPE *)job->out + r * C;                                           \
        if (job->shortcut) {                                                                    \
            const TYPE *restrict rs = (const TYPE *)job->shortcut + r * C;                      \
            for (int64_t c = 0; c < C; c++) {                                                   \
                const float y = a[c] * VALUE(TYPE, xs, c) + b[c] + VALUE(TYPE, rs, c);          \
                ys[c] = STORE(y > floor_ ? y : floor_);                                         \
            }                                                                                   \
        } else {                                                                                \
            for (int64_t c = 0; c < C; c++) {                                                   \
                const float y = a[c] * VALUE(TYPE, xs, c) + b[c];                               \
                ys[c] = STORE(y > floor_ ? y : floor_);                                         \
            }                                                                                   \
        }                                                                                       \
    }

static void normalise_chunks(const void *job_, int64_t begin, int64_t end) {
    const NormJob *job = (const NormJob *)job_;
    const int64_t C = job->channels;
    const float *restrict a = job->a, *restrict b = job->b;
    const float floor_ = job->relu ? 0.0f : -INFINITY;
    const int64_t first = begin * job->chunk_rows, last = norm_rows_end(job, end - 1);
    if (job->bf16) NORMALISE(uint16_t, float_to_bf16)
    else NORMALISE(float, same_float)
}

/* dx = a g + k1 x + k0 for the rows of chunks [begin, end): g read as written by the sums (with a
 * shortcut; job->dy then points at it), or dy past the mask recomputed from a x + b. */
#define INPUT_GRADIENT(TYPE, STORE)                                                             \
    for (int64_t r = first; r < last; r++) {                                                    \
        const TYPE *restrict xs = (const TYPE *)job->x + r * C;                                 \
        const TYPE *restrict gs = (const TYPE *)job->dy + r * C;                                \
        TYPE *restrict dxs = (TYPE *)job->out + r * C;                                          \
        if (masked) {                                                                           \
            for (int64_t c = 0; c < C; c++) {                                                   \
                const float x = VALUE(TYPE, xs, c), dy = VALUE(TYPE, gs, c);                    \
                const float g = a[c] * x + b[c] > floor_ ? dy : 0.0f;                           \
                dxs[c] = STORE(a[c] * g + k1[c] * x + k0[c]);                                   \
            }                                                                                   \
        } else {                                                                                \
            for (int64_t c = 0; c < C; c++)                                                     \
                dxs[c] = STORE(a[c] * VALUE(TYPE, gs, c) + k1[c] * VALUE(TYPE, xs, c) + k0[c]); \
        }                                                                                       \
    }

static void input_gradient_chunks(const void *job_, int64_t begin, int64_t end) {
    const NormJob *job = (const NormJob *)job_;
    const int64_t C = job->channels;
    const float *restrict a = job->a, *restrict b = job->b, *restrict k1 = job->k1, *restrict k0 = job->k0;
    const float floor_ = job->relu ? 0.0f : -INFINITY;
    const int masked = job->relu && !job->y; /* g not yet masked */
    const int64_t first = begin * job->chunk_rows, last = norm_rows_end(job, end - 1);
    if (job->bf16) INPUT_GRADIENT(uint16_t, float_to_bf16)
    else INPUT_GRADIENT(float, same_float)
}

static int64_t norm_chunks(NormJob *job) {
    job->chunk_rows = (job->rows + NORM_CHUNKS - 1) / NORM_CHUNKS;
    if (job->chunk_rows < 16) job->chunk_rows = 16;
    return (job->rows + job->chunk_rows - 1) / job->chunk_rows;
}

/* Runs `fn` over the chunks, each summing into its own 2 C floats, and adds those in order, in
 * double, into `totals`. Returns 0, or -3 when out of memory. */
static int run_sums(NormJob *job, RangeFn fn, int threads, double *totals) {
    const int64_t C = job->channels, chunks = norm_chunks(job);
    job->sums = malloc(chunks * 2 * C * sizeof(float));
    if (!job->sums) return -3;
    parallel_for(chunks, threads, fn, job);
    for (int64_t i = 0; i < 2 * C; i++) totals[i] = 0.0;
    for (int64_t chunk = 0; chunk < chunks; chunk++)
        for (int64_t i = 0; i < 2 * C; i++) totals[i] += job->sums[chunk * 2 * C + i];
    free(job->sums);
    job->sums = NULL;
    return 0;
}

/* Few channels make short rows, which the compiler's vector loops leave to scalar code (16
 * channels on 512 x 512, bf16, forward and backward: 77 ms against PyTorch's 20). G rows in a
 * row are the same computation with each per-channel vector repeated G times (and the sums of
 * the G repeats added), so short rows are grouped up to WIDE_ROW values where the row count
 * allows. */
#define WIDE_ROW 64

static int64_t row_group(int64_t rows, int64_t channels) {
    int64_t group = 1;
    while (group * channels < WIDE_ROW && rows % (2 * group) == 0) group *= 2;
    return group;
}

/* wide[j C + c] = vector[c] for the G repeats (vector may be wide's first repeat itself). */
static void repeat(float *wide, const float *vector, int64_t channels, int64_t group) {
    for (int64_t j = wide == vector ? 1 : 0; j < group; j++) memcpy(wide + j * channels, vector, channels * sizeof(float));
}

/* The 2 x C totals from the 2 x (G C) totals of the grouped rows. */
static void fold(double *totals, const double *wide, int64_t channels, int64_t group) {
    for (int64_t half = 0; half < 2; half++)
        for (int64_t c = 0; c < channels; c++) {
            double sum = 0.0;
            for (int64_t j = 0; j < group; j++) sum += wide[half * group * channels + j * channels + c];
            totals[half * channels + c] = sum;
        }
}

/* Forward. x (and the shortcut, if not NULL) rows x C; gamma, beta float32 (NULL: 1 and 0);
 * running_mean, running_var updated as nn.BatchNorm2d does (exponential average with
 * `momentum`, of the unbiased variance) unless NULL. Writes y, and per channel the batch's mean
 * and 1 / sqrt(var + eps) and a, b for the backward. Returns 0, -1 without rows, -3 when out of
 * memory. */
int seglab_batch_norm_forward(const void *x, const void *shortcut, void *y, const float *gamma, const float *beta,
                              float *running_mean, float *running_var, double momentum, double eps, int64_t rows,
                              int64_t channels, int relu, int bf16, int threads, float *mean, float *inverse_std,
                              float *a, float *b) {
    const int64_t C = channels;
    if (rows < 1) return -1;
    const int64_t G = row_group(rows, C), W = G * C;
    float *wide = malloc(3 * W * sizeof(float)); /* per grouped channel: the sums' shift, a, b */
    double *totals = malloc((2 * C + 2 * W) * sizeof(double));
    if (!wide || !totals) {
        free(wide);
        free(totals);
        return -3;
    }
    float *center = wide, *wide_a = wide + W, *wide_b = wide + 2 * W;
    for (int64_t i = 0; i < W; i++) center[i] = bf16 ? bf16_to_float(((const uint16_t *)x)[i % C]) : ((const float *)x)[i % C];
    NormJob job = {x, shortcut, NULL, NULL, y, NULL, wide_a, wide_b, NULL, NULL, center, NULL, rows / G, W, 0, relu, bf16};
    int status = run_sums(&job, statistics_chunks, threads, totals + 2 * C);
    if (status == 0) {
        fold(totals, totals + 2 * C, C, G);
        for (int64_t c = 0; c < C; c++) {
            const double shifted_mean = totals[c] / rows, batch_mean = center[c] + shifted_mean;
            double variance = totals[C + c] / rows - shifted_mean * shifted_mean;
            if (variance < 0.0) variance = 0.0;
            const double inverse = 1.0 / sqrt(variance + eps), scale = (gamma ? gamma[c] : 1.0) * inverse;
            a[c] = (float)scale;
            b[c] = (float)((beta ? beta[c] : 0.0) - batch_mean * scale);
            mean[c] = (float)batch_mean;
            inverse_std[c] = (float)inverse;
            if (running_mean && running_var) {
                const double unbiased = rows > 1 ? variance * rows / (rows - 1) : variance;
                running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * batch_mean);
                running_var[c] = (float)((1.0 - momentum) * running_var[c] + momentum * unbiased);
            }
        }
        repeat(wide_a, a, C, G);
        repeat(wide_b, b, C, G);
        parallel_for(norm_chunks(&job), threads, normalise_chunks, &job);
    }
    free(wide);
    free(totals);
    return status;
}

/* Backward, from the forward's a, b, mean and inverse_std. With y (the forward's output, when it
 * had a shortcut) the ReLU's mask is read from y and g written to `g`; without, recomputed.
 * With y, dy2 (NULL: none) is a second gradient of the output, added to dy (rounded to the maps'
 * dtype) as the sums read them: the output's two uses' gradients, which autograd would have
 * added in a pass of its own. dx (NULL: not wanted), dgamma and dbeta (each NULL: not wanted).
 * Returns 0, or -3 when out of memory. */
int seglab_batch_norm_backward(const void *dy, const void *dy2, const void *x, const void *y, void *dx, void *g,
                               const float *a, const float *b, const float *mean, const float *inverse_std, int64_t rows,
                               int64_t channels, int relu, int bf16, int threads, float *dgamma, float *dbeta) {
    const int64_t C = channels, G = row_group(rows, C), W = G * C;
    float *wide = malloc(5 * W * sizeof(float)); /* per grouped channel: a, b, the mean, k1, k0 */
    double *totals = malloc((2 * C + 2 * W) * sizeof(double));
    if (!wide || !totals) {
        free(wide);
        free(totals);
        return -3;
    }
    float *wide_a = wide, *wide_b = wide + W, *wide_mean = wide + 2 * W, *k1 = wide + 3 * W, *k0 = wide + 4 * W;
    repeat(wide_a, a, C, G);
    repeat(wide_b, b, C, G);
    repeat(wide_mean, mean, C, G);
    NormJob job = {x, NULL, dy, y, NULL, g, wide_a, wide_b, NULL, NULL, wide_mean, NULL, rows / G, W, 0, relu, bf16,
                   y ? dy2 : NULL};
    int status = run_sums(&job, gradient_sums_chunks, threads, totals + 2 * C);
    if (status == 0) {
        fold(totals, totals + 2 * C, C, G);
        for (int64_t c = 0; c < C; c++) {
            const double inverse = inverse_std[c], sum_g = totals[c], sum_gx = totals[C + c];
            const double slope = -(double)a[c] * inverse * inverse * sum_gx / rows;
            k1[c] = (float)slope;
            k0[c] = (float)(-(double)a[c] * sum_g / rows - slope * mean[c]);
            if (dgamma) dgamma[c] = (float)(sum_gx * inverse);
            if (dbeta) dbeta[c] = (float)sum_g;
        }
        if (dx) {
            repeat(k1, k1, C, G);
            repeat(k0, k0, C, G);
            job.k1 = k1;
            job.k0 = k0;
            job.out = dx;
            if (y) job.dy = g; /* already masked */
            parallel_for(norm_chunks(&job), threads, input_gradient_chunks, &job);
        }
    }
    free(wide);
    free(totals);
    return status;
}
