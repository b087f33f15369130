/* The middle of SegFormer's Mix-FFN in training, forward and backward (seglab.ops.mix_ffn's
 * `native_depthwise_gelu`):
 *
 *   pre = dwconv3x3(src) + bias,   out = GELU(pre)
 *
 * on tokens N x H x W x D (fc1's output as it comes, channels contiguous; out goes to fc2 as
 * it is), zero padding 1, the exact (erf) GELU, float32 or bf16 tokens with float32 weights
 * (9 x D, tap by tap) and arithmetic. In bf16, pre is rounded before GELU and both are
 * stored, where autocast's convolution and GELU round and keep the same two maps; the
 * backward takes GELU's slope at the rounded pre as PyTorch's gelu_backward does, but keeps
 * the gradient through GELU in float32 for the convolution's backward.
 *
 * Backward, with g = d out:  d pre = g GELU'(pre),  GELU'(x) = Phi(x) + x phi(x);
 *   d src[y][x] = sum over taps (ky, kx) of w[ky][kx] d pre[y - ky + 1][x - kx + 1],
 *   d w[ky][kx] = sum over pixels of d pre[y][x] src[y + ky - 1][x + kx - 1],  d bias = sum d pre.
 * Each part of the rows keeps d pre for three rows in a ring (row y + 1 computed once, when
 * row y's turn comes) and its own float32 sums of the weights' gradients (parts x 10 x D: the
 * nine taps, then the bias), which the caller adds: the sums do not depend on the threads.
 *
 * Why: PyTorch runs the convolution, GELU and their two backward kernels as four passes over
 * D = 4C channels per token, the backward ones at about 30 GFLOP/s (MiT-B0's first stage, batch
 * 4 at 512 x 512: 4 x 128 x 128 x 128 values, 40-48 ms of a 0.55-0.75 s bf16 training step on
 * a 2-core Zen 4). The three rows a pass needs stay in a core's L2, and each loop over a row
 * slides a window of three values along it per input row (`Window`), loading each value once
 * where the taps would load it three times (the forward 7.1 -> 4.4 ms on that stage). Forward
 * and backward 1.6-2x PyTorch's four kernels on each of MiT-B0's stages.
 */

typedef uint16_t dw_u16x16 __attribute__((vector_size(16 * sizeof(uint16_t))));
typedef uint32_t dw_u32x16 __attribute__((vector_size(16 * sizeof(uint32_t))));

typedef struct {
    const void *src;      /* N x H x W x D tokens */
    const float *weight;  /* 9 x D */
    const float *bias;    /* D */
    const void *grad_out; /* backward: d out */
    void *pre, *out;      /* forward: written; backward: pre read */
    void *grad_src;       /* backward */
    float *parts;         /* backward: parts x 10 x D */
    int64_t images, height, width, channels, part_count;
    int bf16;
    int *failed;          /* set where a part's ring could not be allocated */
} DepthwiseJob;

static inline f32x16 dw_load(const void *base, int64_t index, int bf16) {
    f32x16 value;
    if (bf16) {
        dw_u16x16 half;
        memcpy(&half, (const uint16_t *)base + index, sizeof half);
        const dw_u32x16 wide = __builtin_convertvector(half, dw_u32x16) << 16;
        memcpy(&value, &wide, sizeof value);
    } else {
        memcpy(&value, (const float *)base + index, sizeof value);
    }
    return value;
}

/* Stores `value` in the tokens' dtype (bf16: float_to_bf16 lane by lane) and returns what was
 * stored, as float32, for GELU to take. Not winograd_tiles.c's 16-lane loads and stores: with
 * them (their store maps every NaN to one NaN, and the rounded value had to be read back) the
 * forward on MiT-B0's first stage ran 4.5-5.5 -> 5.5-6.6 ms, with their loads alone 4-5% slower
 * (alternating with this version in one process, thirty-third session). */
static inline f32x16 dw_store(void *base, int64_t index, f32x16 value, int bf16) {
    if (!bf16) {
        memcpy((float *)base + index, &value, sizeof value);
        return value;
    }
    dw_u32x16 bits;
    memcpy(&bits, &value, sizeof bits);
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const dw_u16x16 half = __builtin_convertvector(bits, dw_u16x16);
    memcpy((uint16_t *)base + index, &half, sizeof half);
    bits <<= 16;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline f32x16 dw_vector(const float *p) {
    f32x16 value;
    memcpy(&value, p, sizeof value);
    return value;
}

/* GELU'(x) = Phi(x) + x exp(-x^2 / 2) / sqrt(2 pi). */
static inline f32x16 gelu_slope16(f32x16 x) {
    return normal_cdf16(x) + x * 0.39894228040143268f * exp_nonpositive(-0.5f * x * x);
}

/* The three values of a row under a 3-wide window at x - 1, x, x + 1, slid one step right: the
 * loop over a row loads each value once (zero outside the row, or for a row outside the map). */
typedef struct {
    f32x16 left, middle, right;
} Window;

static inline __attribute__((always_inline)) Window window_start(const void *row, int64_t W, int64_t D, int valid,
                                                                  const int bf16) {
    const f32x16 zero = {0};
    Window w = {zero, zero, zero};
    if (valid) {
        w.middle = dw_load(row, 0, bf16);
        if (W > 1) w.right = dw_load(row, D, bf16);
    }
    return w;
}

static inline __attribute__((always_inline)) void window_slide(Window *w, const void *row, int64_t x, int64_t W,
                                                               int64_t D, int valid, const int bf16) {
    const f32x16 zero = {0};
    w->left = w->middle;
    w->middle = w->right;
    w->right = valid && x + 2 < W ? dw_load(row, (x + 2) * D, bf16) : zero;
}

static inline __attribute__((always_inline)) void forward_rows(const DepthwiseJob *job, int64_t begin, int64_t end,
                                                               const int bf16) {
    const int64_t H = job->height, W = job->width, D = job->channels;
    const size_t size = bf16 ? sizeof(uint16_t) : sizeof(float);
    for (int64_t r = begin; r < end; r++) {
        const int64_t n = r / H, y = r % H;
        int valid[3];
        const char *rows[3];
        for (int ky = 0; ky < 3; ky++) {
            const int64_t sy = y + ky - 1;
            valid[ky] = sy >= 0 && sy < H;
            rows[ky] = (const char *)job->src + (valid[ky] ? (n * H + sy) * W * D * size : 0);
        }
        for (int64_t c = 0; c < D; c += 16) {
            f32x16 w[9];
            for (int t = 0; t < 9; t++) w[t] = dw_vector(job->weight + t * D + c);
            const f32x16 bias = dw_vector(job->bias + c);
            Window in[3];
            for (int ky = 0; ky < 3; ky++) in[ky] = window_start(rows[ky] + c * size, W, D, valid[ky], bf16);
            for (int64_t x = 0; x < W; x++) {
                f32x16 sum = bias;
                for (int ky = 0; ky < 3; ky++)
                    sum += w[ky * 3] * in[ky].left + w[ky * 3 + 1] * in[ky].middle + w[ky * 3 + 2] * in[ky].right;
                const int64_t at = (r * W + x) * D + c;
                dw_store(job->out, at, gelu16(dw_store(job->pre, at, sum, bf16)), bf16);
                for (int ky = 0; ky < 3; ky++) window_slide(&in[ky], rows[ky] + c * size, x, W, D, valid[ky], bf16);
            }
        }
    }
}

static void depthwise_gelu_rows(const void *job_, int64_t begin, int64_t end) {
    const DepthwiseJob *job = (const DepthwiseJob *)job_;
    if (job->bf16) forward_rows(job, begin, end, 1);
    else forward_rows(job, begin, end, 0);
}

/* ring[y % 3] = d pre of row y of image n (W x D floats). */
static inline __attribute__((always_inline)) void slope_row(const DepthwiseJob *job, int64_t n, int64_t y, float *ring,
                                                            const int bf16) {
    const int64_t W = job->width, D = job->channels, first = ((n * job->height + y) * W) * D;
    float *row = ring + (y % 3) * W * D;
    for (int64_t i = 0; i < W * D; i += 16) {
        const f32x16 slope = dw_load(job->grad_out, first + i, bf16) * gelu_slope16(dw_load(job->pre, first + i, bf16));
        memcpy(row + i, &slope, sizeof slope);
    }
}

static inline __attribute__((always_inline)) void backward_part(const DepthwiseJob *job, int64_t part, float *ring,
                                                                const int bf16) {
    const int64_t H = job->height, W = job->width, D = job->channels, rows = job->images * H;
    const int64_t first = part * rows / job->part_count, last = (part + 1) * rows / job->part_count;
    const size_t size = bf16 ? sizeof(uint16_t) : sizeof(float);
    float *sums = job->parts + part * 10 * D;
    memset(sums, 0, 10 * D * sizeof(float));
    for (int64_t r = first; r < last; r++) {
        const int64_t n = r / H, y = r % H;
        if (r == first || y == 0) {
            if (y > 0) slope_row(job, n, y - 1, ring, bf16);
            slope_row(job, n, y, ring, bf16);
        }
        if (y + 1 < H) slope_row(job, n, y + 1, ring, bf16);
        const float *here = ring + (y % 3) * W * D;
        /* Row y + ky - 1 of the inputs (ky = 0, 1, 2), and row y - ky + 1 of d pre. */
        int valid[3], slope_valid[3];
        const char *inputs[3];
        const float *slopes[3];
        for (int ky = 0; ky < 3; ky++) {
            const int64_t sy = y + ky - 1, gy = y - ky + 1;
            valid[ky] = sy >= 0 && sy < H;
            slope_valid[ky] = gy >= 0 && gy < H;
            inputs[ky] = (const char *)job->src + (valid[ky] ? (n * H + sy) * W * D * size : 0);
            slopes[ky] = ring + (slope_valid[ky] ? (gy % 3) * W * D : 0);
        }
        for (int64_t c = 0; c < D; c += 16) {
            f32x16 w[9];
            for (int t = 0; t < 9; t++) w[t] = dw_vector(job->weight + t * D + c);
            Window g[3];
            for (int ky = 0; ky < 3; ky++) g[ky] = window_start(slopes[ky] + c, W, D, slope_valid[ky], 0);
            for (int64_t x = 0; x < W; x++) { /* d src: the taps read d pre backwards */
                f32x16 sum = {0};
                for (int ky = 0; ky < 3; ky++)
                    sum += w[ky * 3] * g[ky].right + w[ky * 3 + 1] * g[ky].middle + w[ky * 3 + 2] * g[ky].left;
                dw_store(job->grad_src, (r * W + x) * D + c, sum, bf16);
                for (int ky = 0; ky < 3; ky++) window_slide(&g[ky], slopes[ky] + c, x, W, D, slope_valid[ky], 0);
            }
            f32x16 tap[9] = {{0}}, bias = {0};
            Window in[3];
            for (int ky = 0; ky < 3; ky++) in[ky] = window_start(inputs[ky] + c * size, W, D, valid[ky], bf16);
            for (int64_t x = 0; x < W; x++) { /* d w, d bias: row y's d pre against the inputs under each tap */
                const f32x16 slope = dw_vector(here + x * D + c);
                bias += slope;
                for (int ky = 0; ky < 3; ky++) {
                    tap[ky * 3] += slope * in[ky].left;
                    tap[ky * 3 + 1] += slope * in[ky].middle;
                    tap[ky * 3 + 2] += slope * in[ky].right;
                }
                for (int ky = 0; ky < 3; ky++) window_slide(&in[ky], inputs[ky] + c * size, x, W, D, valid[ky], bf16);
            }
            for (int t = 0; t < 9; t++) {
                const f32x16 total = dw_vector(sums + t * D + c) + tap[t];
                memcpy(sums + t * D + c, &total, sizeof total);
            }
            const f32x16 total = dw_vector(sums + 9 * D + c) + bias;
            memcpy(sums + 9 * D + c, &total, sizeof total);
        }
    }
}

static void depthwise_gelu_backward_parts(const void *job_, int64_t begin, int64_t end) {
    const DepthwiseJob *job = (const DepthwiseJob *)job_;
    float *ring = malloc(3 * job->width * job->channels * sizeof(float));
    if (!ring) {
        *job->failed = 1;
        return;
    }
    for (int64_t part = begin; part < end; part++) {
        if (job->bf16) backward_part(job, part, ring, 1);
        else backward_part(job, part, ring, 0);
    }
    free(ring);
}

/* The forward: pre and out, N x H x W x D like src (D a multiple of 16). Returns 0. */
int seglab_depthwise_gelu(const void *src, const float *weight, const float *bias, void *pre, void *out,
                          int64_t images, int64_t height, int64_t width, int64_t channels, int bf16, int threads) {
    DepthwiseJob job = {src, weight, bias, NULL, pre, out, NULL, NULL, images, height, width, channels, 0, bf16, NULL};
    parallel_for(images * height, threads, depthwise_gelu_rows, &job);
    return 0;
}

/* The backward: grad_src like src, and parts x 10 x D float32 sums of the weights' gradients
 * (1 <= parts <= N H). Returns 0, or -1 where a ring could not be allocated. */
int seglab_depthwise_gelu_backward(const void *grad_out, const void *pre, const void *src, const float *weight,
                                   void *grad_src, float *parts, int64_t part_count, int64_t images, int64_t height,
                                   int64_t width, int64_t channels, int bf16, int threads) {
    int failed = 0;
    DepthwiseJob job = {src, weight, NULL, grad_out, (void *)pre, NULL, grad_src, parts, images, height, width,
                        channels, part_count, bf16, &failed};
    parallel_for(part_count, threads, depthwise_gelu_backward_parts, &job);
    return failed ? -1 : 0;
}
