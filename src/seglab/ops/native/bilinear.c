/* Sums of bilinearly upsampled maps added into a map in one pass (seglab.ops.native):
 *
 *   dst = act(dst + up(src_1) + ... + up(src_k)),  act = ReLU or nothing,
 *
 * for channels-last maps (N x H x W x C; each src N x h_i x w_i x C), `up` being
 * F.interpolate(mode="bilinear", align_corners=False) to H x W. SegFormer's decoder sums its
 * stages' shares this way at stride 4 (seglab.models.semantic.segformer). With PyTorch's
 * operators each share was upsampled into a map of its own and added in a pass of its own, and
 * the ReLU was one more: for B0 at batch 8 and 512 x 512, ten passes over 134 MB maps where one
 * read and one write of the sum suffice.
 *
 * Positions and weights follow PyTorch's CPU kernel for sizes given (not scale factors): source
 * row (y + 1/2) h / H - 1/2, clamped at 0, between rows y0 and y0 + 1 (y0 itself on the last
 * row), weighted h0 (w0 p00 + w1 p01) + h1 (w0 p10 + w1 p11); the stages are added in order, as
 * repeated `add_` adds them. The results may differ in the last bits (fused multiply-adds).
 * Threads split the output rows (image, row). Float32 maps, or bf16 ones added in float32 and
 * rounded once. Few channels (class scores) are better served by `seglab.ops.bilinear`'s
 * separable passes: positions and partial vectors per pixel cost more than their values. */

#define MAX_UPSAMPLED 8

typedef struct {
    void *dst;
    const void *srcs[MAX_UPSAMPLED];
    int64_t heights[MAX_UPSAMPLED], widths[MAX_UPSAMPLED];
    int count;
    int64_t height, width, channels;
    int relu;
} UpsampleJob;

/* PyTorch's source index and weights along one axis: position `out` of `out_size` read from a
 * side of `in_size`; `first` and `second` the neighbours, `weight` the second's. */
static inline void source_of(int64_t out, int64_t out_size, int64_t in_size, int64_t *first, int64_t *second,
                             float *weight) {
    const float scale = (float)in_size / (float)out_size;
    float position = scale * ((float)out + 0.5f) - 0.5f;
    if (position < 0) position = 0;
    const int64_t index = (int64_t)position;
    *first = index;
    *second = index + (index < in_size - 1);
    *weight = position - (float)index;
}

/* NAME##_row(job, b, y, out): row y of image b, `out` (W x C of OUT), gets the maps (of SRC)
 * added (and the ReLU). */
#define DEFINE_ADD_UPSAMPLED_ROW(NAME, OUT, OUT_MEM, SRC, SRC_MEM)                                  \
    static void NAME##_row(const UpsampleJob *job, int64_t b, int64_t y, OUT *out) {                \
        const int64_t C = job->channels, H = job->height, W = job->width;                           \
        const SRC *rows[MAX_UPSAMPLED][2];                                                          \
        float row_weight[MAX_UPSAMPLED][2];                                                         \
        for (int k = 0; k < job->count; k++) {                                                      \
            int64_t y0, y1;                                                                         \
            float h1;                                                                               \
            source_of(y, H, job->heights[k], &y0, &y1, &h1);                                        \
            const SRC *image = (const SRC *)job->srcs[k] + b * job->heights[k] * job->widths[k] * C; \
            rows[k][0] = image + y0 * job->widths[k] * C;                                           \
            rows[k][1] = image + y1 * job->widths[k] * C;                                           \
            row_weight[k][0] = 1.0f - h1;                                                           \
            row_weight[k][1] = h1;                                                                  \
        }                                                                                           \
        for (int64_t x = 0; x < W; x++, out += C) {                                                 \
            const SRC *p[MAX_UPSAMPLED][4];                                                         \
            float w[MAX_UPSAMPLED][2];                                                              \
            for (int k = 0; k < job->count; k++) {                                                  \
                int64_t x0, x1;                                                                     \
                float w1;                                                                           \
                source_of(x, W, job->widths[k], &x0, &x1, &w1);                                     \
                p[k][0] = rows[k][0] + x0 * C;                                                      \
                p[k][1] = rows[k][0] + x1 * C;                                                      \
                p[k][2] = rows[k][1] + x0 * C;                                                      \
                p[k][3] = rows[k][1] + x1 * C;                                                      \
                w[k][0] = 1.0f - w1;                                                                \
                w[k][1] = w1;                                                                       \
            }                                                                                       \
            for (int64_t c = 0; c < C; c += WIDE) {                                                 \
                const int width = C - c < WIDE ? (int)(C - c) : WIDE;                               \
                VECTOR(WIDE) sum = MEMORY(load, OUT_MEM, WIDE)(out + c, width);                     \
                for (int k = 0; k < job->count; k++) {                                              \
                    const VECTOR(WIDE) top = w[k][0] * MEMORY(load, SRC_MEM, WIDE)(p[k][0] + c, width) \
                                           + w[k][1] * MEMORY(load, SRC_MEM, WIDE)(p[k][1] + c, width); \
                    const VECTOR(WIDE) bottom = w[k][0] * MEMORY(load, SRC_MEM, WIDE)(p[k][2] + c, width) \
                                              + w[k][1] * MEMORY(load, SRC_MEM, WIDE)(p[k][3] + c, width); \
                    sum += row_weight[k][0] * top + row_weight[k][1] * bottom;                      \
                }                                                                                   \
                if (job->relu) RELU(WIDE, sum);                                                     \
                MEMORY(store, OUT_MEM, WIDE)(out + c, sum, width);                                  \
            }                                                                                       \
        }                                                                                           \
    }

/* NAME##_row as above for maps of TYPE added into TYPE; NAME(job, begin, end): rows [begin, end)
 * of dst, in place. */
#define DEFINE_ADD_UPSAMPLED(NAME, TYPE, MEM)                                                       \
    DEFINE_ADD_UPSAMPLED_ROW(NAME, TYPE, MEM, TYPE, MEM)                                            \
    static void NAME(const void *job_, int64_t begin, int64_t end) {                                \
        const UpsampleJob *job = (const UpsampleJob *)job_;                                         \
        for (int64_t u = begin; u < end; u++)                                                       \
            NAME##_row(job, u / job->height, u % job->height,                                       \
                       (TYPE *)job->dst + u * job->width * job->channels);                          \
    }

DEFINE_ADD_UPSAMPLED(add_upsampled_f32, float, f32)
DEFINE_ADD_UPSAMPLED(add_upsampled_bf16, uint16_t, bf16)

/* The job that adds the `count` (<= MAX_UPSAMPLED) maps srcs[i] (heights[i] x widths[i]), upsampled
 * to height x width, into dst (NULL: rows handed to the row function instead). */
static UpsampleJob upsample_job(void *dst, const void *const *srcs, const int64_t *heights, const int64_t *widths,
                                int count, int64_t height, int64_t width, int64_t channels, int relu) {
    UpsampleJob job = {dst, {0}, {0}, {0}, count, height, width, channels, relu};
    for (int k = 0; k < count; k++) {
        job.srcs[k] = srcs[k];
        job.heights[k] = heights[k];
        job.widths[k] = widths[k];
    }
    return job;
}

/* dst (n x height x width x channels) += the `count` maps srcs[i] (n x heights[i] x widths[i] x
 * channels, each side at least 1) bilinearly upsampled, then the ReLU with `relu`. Returns 0, or
 * -1 for more than MAX_UPSAMPLED maps. */
int seglab_add_upsampled(void *dst, const void *const *srcs, const int64_t *heights, const int64_t *widths,
                         int count, int64_t n, int64_t height, int64_t width, int64_t channels, int relu,
                         int threads, int bf16) {
    if (count < 0 || count > MAX_UPSAMPLED) return -1;
    const UpsampleJob job = upsample_job(dst, srcs, heights, widths, count, height, width, channels, relu);
    parallel_for(n * height, threads, bf16 ? add_upsampled_bf16 : add_upsampled_f32, &job);
    return 0;
}

/* A few-channel map (class scores) bilinearly upsampled into a fresh one:
 *
 *   dst = F.interpolate(src, (H, W), mode="bilinear", align_corners=False),
 *
 * float32, channels-last. Each output row blends two rows of the source upsampled along the
 * width, (1 - h1) wide(y0) + h1 wide(y1), the product order of `add_upsampled` above. A
 * thread keeps the last two wide rows it computed, so consecutive output rows (which read the
 * same source rows) reuse them, and every output row is then one contiguous blend of two
 * cached rows: written once, nothing else of the output's size read or written. The separable
 * passes of PyTorch's operators wrote the wide map and read it back (2-3 passes of the output's
 * size); `add_upsampled`'s per-pixel vectors over 21 channels ran 2.3-3.2x slower than those. */
typedef struct {
    const float *src;
    float *dst;
    int64_t in_height, in_width, height, width, channels;
    int *failed; /* set where a thread's buffers could not be allocated */
} ResizeJob;

static void widen_row(const ResizeJob *job, const float *row, const int64_t *first, const int64_t *second,
                      const float *weight, float *wide) {
    const int64_t C = job->channels;
    for (int64_t x = 0; x < job->width; x++, wide += C) {
        const float *a = row + first[x] * C, *b = row + second[x] * C, w1 = weight[x], w0 = 1.0f - w1;
        for (int64_t c = 0; c < C; c++) wide[c] = w0 * a[c] + w1 * b[c];
    }
}

static void resize_rows(const void *job_, int64_t begin, int64_t end) {
    const ResizeJob *job = (const ResizeJob *)job_;
    const int64_t C = job->channels, H = job->height, W = job->width, h = job->in_height, w = job->in_width;
    const int64_t row_size = W * C;
    int64_t *columns = malloc(2 * W * sizeof(int64_t));
    float *weights = malloc(W * sizeof(float)), *cache = malloc(2 * row_size * sizeof(float));
    if (!columns || !weights || !cache) {
        *job->failed = 1;
        free(columns), free(weights), free(cache);
        return;
    }
    for (int64_t x = 0; x < W; x++) source_of(x, W, w, &columns[x], &columns[W + x], &weights[x]);
    int64_t cached[2] = {-1, -1}; /* the source rows (image * h + row) in the two cache slots */
    for (int64_t u = begin; u < end; u++) {
        const int64_t b = u / H, y = u % H;
        int64_t y0, y1;
        float h1;
        source_of(y, H, h, &y0, &y1, &h1);
        const float *wide[2];
        const int64_t wanted[2] = {b * h + y0, b * h + y1};
        for (int k = 0; k < 2; k++) {
            int slot = cached[0] == wanted[k] ? 0 : cached[1] == wanted[k] ? 1 : -1;
            if (slot < 0) { /* the slot that does not hold the other row this output row reads */
                slot = cached[0] == wanted[1 - k] ? 1 : 0;
                widen_row(job, job->src + wanted[k] * w * C, columns, columns + W, weights, cache + slot * row_size);
                cached[slot] = wanted[k];
            }
            wide[k] = cache + slot * row_size;
        }
        const float h0 = 1.0f - h1;
        float *out = job->dst + u * row_size;
        for (int64_t i = 0; i < row_size; i++) out[i] = h0 * wide[0][i] + h1 * wide[1][i];
    }
    free(columns), free(weights), free(cache);
}

/* dst (n x height x width x channels) = src (n x in_height x in_width x channels, each side at
 * least 1) bilinearly resized; float32. Returns 0, or -1 where memory ran out. */
int seglab_resize_bilinear(float *dst, const float *src, int64_t n, int64_t in_height, int64_t in_width,
                           int64_t height, int64_t width, int64_t channels, int threads) {
    int failed = 0;
    ResizeJob job = {src, dst, in_height, in_width, height, width, channels, &failed};
    parallel_for(n * height, threads, resize_rows, &job);
    return failed ? -1 : 0;
}

/* The gradient of `seglab_resize_bilinear` (what upsample_bilinear2d's backward computes):
 *
 *   grad_src[b, r, i] = sum over output pixels (y, x) of weight(y -> r) weight(x -> i) grad[b, y, x]
 *
 * float32, channels-last. Each output row is first narrowed along the width (its W pixels
 * added into the w source columns they read, with their weights) into a thread's buffer, and
 * the narrow row then added into the one or two source rows it read, weighted h0 and h1. A
 * thread owns a range of source rows and narrows every output row that reads one of them, so
 * no two threads write the same row; output rows that read two sources split between threads
 * are narrowed by both (one row per thread boundary). The gradient's map is read once, in order,
 * and only the small source-sized result is written: 7.9-8.3 ms for 4 x 21 class scores, 128 x
 * 128 -> 512 x 512, where PyTorch's CPU backward took 11.8-18.8 ms (2 threads, Zen 4). */
static void narrow_row(const ResizeJob *job, const float *grad_row, const int64_t *first, const int64_t *second,
                       const float *weight, float *narrow) {
    const int64_t C = job->channels;
    memset(narrow, 0, (size_t)(job->in_width * C) * sizeof(float));
    for (int64_t x = 0; x < job->width; x++, grad_row += C) {
        float *a = narrow + first[x] * C, *b = narrow + second[x] * C;
        const float w1 = weight[x], w0 = 1.0f - w1;
        for (int64_t c = 0; c < C; c++) a[c] += w0 * grad_row[c];
        for (int64_t c = 0; c < C; c++) b[c] += w1 * grad_row[c];
    }
}

static void resize_backward_rows(const void *job_, int64_t begin, int64_t end) {
    const ResizeJob *job = (const ResizeJob *)job_;  /* src: the output's gradient; dst: the source's */
    const int64_t C = job->channels, H = job->height, W = job->width, h = job->in_height, w = job->in_width;
    const int64_t narrow_size = w * C;
    int64_t *columns = malloc(2 * W * sizeof(int64_t));
    float *weights = malloc(W * sizeof(float)), *narrow = malloc(narrow_size * sizeof(float));
    if (!columns || !weights || !narrow) {
        *job->failed = 1;
        free(columns), free(weights), free(narrow);
        return;
    }
    for (int64_t x = 0; x < W; x++) source_of(x, W, w, &columns[x], &columns[W + x], &weights[x]);
    memset(job->dst + begin * narrow_size, 0, (size_t)((end - begin) * narrow_size) * sizeof(float));
    for (int64_t b = begin / h; b * h < end; b++) {
        /* this thread's source rows of image b: [low, high) */
        const int64_t low = begin > b * h ? begin - b * h : 0, high = end < (b + 1) * h ? end - b * h : h;
        float *image = job->dst + b * h * narrow_size;
        for (int64_t y = 0; y < H; y++) {
            int64_t y0, y1;
            float h1;
            source_of(y, H, h, &y0, &y1, &h1);
            if (y1 < low) continue;
            if (y0 >= high) break;  /* source rows grow with y */
            narrow_row(job, job->src + (b * H + y) * W * C, columns, columns + W, weights, narrow);
            if (y0 >= low) {
                float *row = image + y0 * narrow_size, h0 = 1.0f - h1;
                for (int64_t i = 0; i < narrow_size; i++) row[i] += h0 * narrow[i];
            }
            if (y1 < high) {
                float *row = image + y1 * narrow_size;
                for (int64_t i = 0; i < narrow_size; i++) row[i] += h1 * narrow[i];
            }
        }
    }
    free(columns), free(weights), free(narrow);
}

/* grad_src (n x in_height x in_width x channels) = the gradient of `seglab_resize_bilinear` for
 * grad (n x height x width x channels); float32. Returns 0, or -1 where memory ran out. */
int seglab_resize_bilinear_backward(float *grad_src, const float *grad, int64_t n, int64_t in_height,
                                    int64_t in_width, int64_t height, int64_t width, int64_t channels, int threads) {
    int failed = 0;
    ResizeJob job = {grad, grad_src, in_height, in_width, height, width, channels, &failed};
    parallel_for(n * in_height, threads, resize_backward_rows, &job);
    return failed ? -1 : 0;
}
