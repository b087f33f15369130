/* A 3x3 convolution (stride 1, zero padding 1) to few output channels, its vectors along the
 * pixels of a row (seglab.ops.native):
 *
 *   dst[n, o, y, x] = bias[o] + sum over c, ky, kx of weight[ky, kx, c, o] src[n, y + ky - 1, x + kx - 1, c],
 *
 * src N x H x W x C (channels last), dst N x O x H x W (planar), float32; optionally the ReLU.
 *
 * Why: a direct convolution whose vectors run along the output channels wastes the lanes that
 * pass the last channel. A segmentation head's 21 classes fill 21 of 32 lanes, and oneDNN's
 * kernel ran U-Net's 16 -> 21 head on 512 x 512 maps at 124-188 GFLOP/s where its 16 -> 16
 * convolution ran at 268. Here every lane holds a pixel: each thread takes whole output rows,
 * keeps the three input rows they read in planar form (one row of W pixels per channel, with
 * a zero on either side: transposed from the channels-last map 16 x 16 at a time), and runs
 * register blocks of PLANAR_OUTS output channels x PLANAR_VECTORS vectors of 16 pixels, each
 * input vector feeding PLANAR_OUTS multiply-adds and each broadcast weight PLANAR_VECTORS.
 */

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define PLANAR_OUTS 7 /* output channels per register block: 21 = 3 x 7 */
#define PLANAR_VECTORS 3 /* 16-pixel vectors per register block */
#define PLANAR_SPAN (16 * PLANAR_VECTORS)
/* Zeros before a planar row's first pixel: one vector, so that the transposed blocks are
 * stored whole cache lines at a time and the centre taps' loads are aligned. */
#define PLANAR_LEFT 16

typedef struct {
    const float *src, *weight, *bias; /* weight 3 x 3 x C x outs_padded, bias outs_padded */
    float *dst;
    int64_t height, width, channels, outs, outs_padded;
    int64_t row_floats; /* per channel of a planar row: pixel x at PLANAR_LEFT + x, zeros around */
    int relu;
    int *failed; /* set where a thread's row buffers could not be allocated */
} PlanarConvJob;

#if defined(__AVX512F__)
/* rows[i] <- lane i of each row: the 16 x 16 block transposed (4 x 4 within each 128-bit lane,
 * then the lanes exchanged). */
static inline void transpose16x16(__m512 rows[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* u[4 i + k], lane j: column 4 j + k of rows 4 i .. 4 i + 3 */
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int k = 0; k < 4; k++) {
        const __m512 low = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x44);
        const __m512 high = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xee);
        const __m512 low2 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x44);
        const __m512 high2 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xee);
        rows[k] = _mm512_shuffle_f32x4(low, low2, 0x88);
        rows[4 + k] = _mm512_shuffle_f32x4(low, low2, 0xdd);
        rows[8 + k] = _mm512_shuffle_f32x4(high, high2, 0x88);
        rows[12 + k] = _mm512_shuffle_f32x4(high, high2, 0xdd);
    }
}
#endif

/* planes[c][PLANAR_LEFT + x] = row[x][c]: one channels-last row of W pixels in planar form. */
static void planar_row(const PlanarConvJob *job, const float *row, float *planes) {
    const int64_t W = job->width, C = job->channels, stride = job->row_floats;
    int64_t x0 = 0;
#if defined(__AVX512F__)
    if (C % 16 == 0) {
        for (; x0 + 16 <= W; x0 += 16) {
            for (int64_t c0 = 0; c0 < C; c0 += 16) {
                __m512 block[16];
                for (int i = 0; i < 16; i++) block[i] = _mm512_loadu_ps(row + (x0 + i) * C + c0);
                transpose16x16(block);
                for (int i = 0; i < 16; i++) _mm512_store_ps(planes + (c0 + i) * stride + PLANAR_LEFT + x0, block[i]);
            }
        }
    }
#endif
    for (int64_t x = x0; x < W; x++)
        for (int64_t c = 0; c < C; c++) planes[c * stride + PLANAR_LEFT + x] = row[x * C + c];
}

/* Output row y of image n from the planar input rows y - 1, y, y + 1 (`above`, `at`, `below`). */
static void planar_conv_row(const PlanarConvJob *job, const float *const rows[3], int64_t n, int64_t y) {
    const int64_t W = job->width, C = job->channels, O = job->outs, OP = job->outs_padded;
    const int64_t stride = job->row_floats, plane = job->height * W;
    for (int64_t o0 = 0; o0 < OP; o0 += PLANAR_OUTS) {
        for (int64_t x0 = 0; x0 < W; x0 += PLANAR_SPAN) {
            f32x16 acc[PLANAR_OUTS][PLANAR_VECTORS];
            for (int o = 0; o < PLANAR_OUTS; o++)
                for (int v = 0; v < PLANAR_VECTORS; v++) acc[o][v] = (f32x16){0} + job->bias[o0 + o];
            for (int ky = 0; ky < 3; ky++) {
                const float *pixels = rows[ky] + PLANAR_LEFT - 1 + x0;
                for (int64_t c = 0; c < C; c++, pixels += stride) {
                    for (int kx = 0; kx < 3; kx++) {
                        const float *w = job->weight + ((ky * 3 + kx) * C + c) * OP + o0;
                        f32x16 in[PLANAR_VECTORS];
                        for (int v = 0; v < PLANAR_VECTORS; v++) memcpy(&in[v], pixels + kx + 16 * v, sizeof in[v]);
                        for (int o = 0; o < PLANAR_OUTS; o++) {
                            const float tap = w[o];
                            for (int v = 0; v < PLANAR_VECTORS; v++) acc[o][v] += in[v] * tap;
                        }
                    }
                }
            }
            for (int o = 0; o < PLANAR_OUTS && o0 + o < O; o++) {
                float *out = job->dst + (n * O + o0 + o) * plane + y * W + x0;
                for (int v = 0; v < PLANAR_VECTORS && x0 + 16 * v < W; v++) {
                    f32x16 value = acc[o][v];
                    if (job->relu) value = select_greater(value, (f32x16){0});
                    if (x0 + 16 * (v + 1) <= W) memcpy(out + 16 * v, &value, sizeof value);
                    else memcpy(out + 16 * v, &value, (W - x0 - 16 * v) * sizeof(float));
                }
            }
        }
    }
}

/* Rows [begin, end) of the N * H output rows; a ring of three planar input rows, each filled
 * once while the thread walks down an image. */
static void planar_conv_range(const void *arg, int64_t begin, int64_t end) {
    const PlanarConvJob *job = (const PlanarConvJob *)arg;
    const int64_t H = job->height, W = job->width, C = job->channels, row_size = C * job->row_floats;
    /* three rows and one of zeros, on cache lines of their own (row_size is a multiple of 16) */
    float *buffer = aligned_alloc(64, 4 * row_size * sizeof(float));
    if (buffer) memset(buffer, 0, 4 * row_size * sizeof(float));
    if (!buffer) {
        *job->failed = 1;
        return;
    }
    const float *zeros = buffer + 3 * row_size;
    int64_t held[3] = {-1, -1, -1}; /* the global row index each ring slot holds */
    for (int64_t index = begin; index < end; index++) {
        const int64_t n = index / H, y = index % H;
        const float *rows[3];
        for (int k = 0; k < 3; k++) {
            const int64_t source = y + k - 1;
            if (source < 0 || source >= H) {
                rows[k] = zeros;
                continue;
            }
            const int64_t global = n * H + source, slot = global % 3;
            float *planes = buffer + slot * row_size;
            if (held[slot] != global) {
                planar_row(job, job->src + global * W * C, planes);
                held[slot] = global;
            }
            rows[k] = planes;
        }
        planar_conv_row(job, rows, n, y);
    }
    free(buffer);
}

/* dst (N x outs x H x W) = the convolution above of src (N x H x W x C) with weight
 * (3 x 3 x C x outs_padded, outs_padded a multiple of PLANAR_OUTS, the extra outputs' weights
 * anything) and bias (outs_padded), then the ReLU where `relu`. Returns 0, -1 where a
 * thread's row buffers could not be allocated, -2 for outs_padded not such a multiple. */
int seglab_planar_conv3x3(float *dst, const float *src, const float *weight, const float *bias, int64_t n,
                          int64_t height, int64_t width, int64_t channels, int64_t outs, int64_t outs_padded,
                          int relu, int threads) {
    if (outs_padded % PLANAR_OUTS || outs_padded < outs) return -2;
    int failed = 0;
    /* the zeros before, a whole number of register spans of pixels and one more vector: the
     * loads at kx = 2 read a pixel past the span */
    const int64_t spans = (width + PLANAR_SPAN - 1) / PLANAR_SPAN;
    PlanarConvJob job = {src, weight, bias, dst, height, width, channels, outs, outs_padded,
                         PLANAR_LEFT + spans * PLANAR_SPAN + 16, relu, &failed};
    parallel_for(n * height, threads, planar_conv_range, &job);
    return failed ? -1 : 0;
}
