/* Winograd's filter transform in training (seglab.ops.winograd.winograd_filters): every 3x3
 * filter g (a C_out x C_in x 3 x 3 float32 weight, any strides) as the R = (m + 2)^2 values of
 * G g G^T, written as the R x C_in x C_out matrices the products take, and its backward, the
 * weight's gradient from theirs. One pass each way.
 *
 * PyTorch's operators take a copy of the weight tap by tap, a product with the R x 9 matrix and
 * casts, and backward the transposed product, a copy into the weight's layout and casts again
 * (autocast's bf16 weight and its gradient). A channels-last 256 -> 256 weight to bf16 F(2x2)
 * filters and back (Zen 4, 2 threads): 2.4-3.2 ms that way, 1.2-1.7 ms here; 512 -> 512:
 * 14-17 ms against 6-7.
 *
 * Each value is the same sum as that product's: the R x 9 matrix (`matrix`, float32, row r for
 * output r) times the filter's taps in tap order, one rounding per multiply-add starting from
 * the first product (backward: the 9 x R transpose times the R gradients in order). With
 * `bf16` the taps are rounded to bf16 first and the outputs written as bf16 (autocast's cast of
 * the weight, then the products in bf16), and backward each tap's gradient is rounded to bf16
 * before it is written as float32 (the gradient of that cast weight). */
#define FILTER_BLOCK 16 /* output channels per vector */

typedef struct {
    const void *in;
    void *out;
    const float *matrix;
    int64_t rows, out_channels, in_channels;
    int64_t o_stride, c_stride, taps[9]; /* the weight's strides (floats): output, input channel, tap */
    int bf16;
} FilterJob;

static inline float round_to_bf16(float value) { return bf16_to_float(float_to_bf16(value)); }

/* Input channel c of the block of `n` output channels from o0: the taps along the output
 * channels (with `bf16` rounded to bf16), then each output's sum. Whole blocks of 16, so that
 * the compiler vectorises the sums; a partial block reads zeros past its end. */
static void filter_block(const FilterJob *job, int64_t c, int64_t o0, int64_t n) {
    const float *weight = (const float *)job->in + o0 * job->o_stride + c * job->c_stride;
    float taps[9][FILTER_BLOCK];
    for (int t = 0; t < 9; t++)
        for (int j = 0; j < FILTER_BLOCK; j++) {
            const float value = j < n ? weight[j * job->o_stride + job->taps[t]] : 0.0f;
            taps[t][j] = job->bf16 ? round_to_bf16(value) : value;
        }
    for (int64_t r = 0; r < job->rows; r++) {
        const float *m = job->matrix + r * 9;
        float sum[FILTER_BLOCK];
        for (int j = 0; j < FILTER_BLOCK; j++) sum[j] = m[0] * taps[0][j];
        for (int t = 1; t < 9; t++)
            for (int j = 0; j < FILTER_BLOCK; j++) sum[j] = fmaf(m[t], taps[t][j], sum[j]);
        const int64_t at = (r * job->in_channels + c) * job->out_channels + o0;
        for (int64_t j = 0; j < n; j++) {
            if (job->bf16) ((uint16_t *)job->out)[at + j] = float_to_bf16(sum[j]);
            else ((float *)job->out)[at + j] = sum[j];
        }
    }
}

static void filter_gradient_block(const FilterJob *job, int64_t c, int64_t o0, int64_t n) {
    float sums[9][FILTER_BLOCK];
    for (int64_t r = 0; r < job->rows; r++) {
        const int64_t at = (r * job->in_channels + c) * job->out_channels + o0;
        float g[FILTER_BLOCK];
        for (int j = 0; j < FILTER_BLOCK; j++) {
            const int64_t i = at + (j < n ? j : 0);
            g[j] = job->bf16 ? bf16_to_float(((const uint16_t *)job->in)[i]) : ((const float *)job->in)[i];
        }
        const float *m = job->matrix + r * 9;
        for (int t = 0; t < 9; t++)
            for (int j = 0; j < FILTER_BLOCK; j++) sums[t][j] = r ? fmaf(m[t], g[j], sums[t][j]) : m[t] * g[j];
    }
    float *gradient = (float *)job->out + o0 * job->o_stride + c * job->c_stride;
    for (int t = 0; t < 9; t++)
        for (int64_t j = 0; j < n; j++)
            gradient[j * job->o_stride + job->taps[t]] = job->bf16 ? round_to_bf16(sums[t][j]) : sums[t][j];
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* Channels-last weights (16 input channels contiguous per output channel and tap) by AVX-512,
 * 16 input channels at a time through a staging block: the weight's rows for the block's 16
 * output channels lie the weight's stride apart, a power of two times 9 floats, which put the
 * 144 lines a gather along them touches into a few of the L1 cache's sets (a 512 -> 512 weight:
 * 6 ms a transform, against 0.15 for a copy of it). Staged, the lines are 9 vectors apart. */
#define STAGE_ROW (9 * 16) /* floats per output channel in the staging block: 9 taps x 16 inputs */

static inline __m512 round_vector_to_bf16(__m512 value) { /* as float_to_bf16, lane by lane */
    const __m512i bits = _mm512_castps_si512(value);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_srli_epi32(rounded, 16), 16));
}

static inline __m512i stage_offsets(void) { /* output channel j's row in the staging block */
    return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                              _mm512_set1_epi32(STAGE_ROW));
}

static void filter_block_staged(const FilterJob *job, int64_t c0, int64_t o0, int blocks) {
    float stage[2][FILTER_BLOCK * STAGE_ROW] __attribute__((aligned(64)));
    for (int b = 0; b < blocks; b++) {
        const float *weight = (const float *)job->in + (o0 + b * FILTER_BLOCK) * job->o_stride + c0;
        for (int j = 0; j < FILTER_BLOCK; j++)
            for (int t = 0; t < 9; t++)
                _mm512_store_ps(stage[b] + j * STAGE_ROW + t * 16, _mm512_loadu_ps(weight + j * job->o_stride + job->taps[t]));
    }
    const __m512i along = stage_offsets();
    for (int ci = 0; ci < 16; ci++)
        for (int b = 0; b < blocks; b++) { /* both halves of each output line, one after the other */
            __m512 taps[9];
            for (int t = 0; t < 9; t++) {
                const __m512 value = _mm512_i32gather_ps(along, stage[b] + t * 16 + ci, 4);
                taps[t] = job->bf16 ? round_vector_to_bf16(value) : value;
            }
            for (int64_t r = 0; r < job->rows; r++) {
                const float *m = job->matrix + r * 9;
                __m512 sum = _mm512_mul_ps(_mm512_set1_ps(m[0]), taps[0]);
                for (int t = 1; t < 9; t++) sum = _mm512_fmadd_ps(_mm512_set1_ps(m[t]), taps[t], sum);
                const int64_t at = (r * job->in_channels + c0 + ci) * job->out_channels + o0 + b * FILTER_BLOCK;
                if (job->bf16)
                    _mm256_storeu_si256((__m256i *)((uint16_t *)job->out + at),
                                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_vector_to_bf16(sum)), 16)));
                else
                    _mm512_storeu_ps((float *)job->out + at, sum);
            }
        }
}

static void filter_gradient_block_staged(const FilterJob *job, int64_t c0, int64_t o0, int blocks) {
    float stage[2][FILTER_BLOCK * STAGE_ROW] __attribute__((aligned(64)));
    const __m512i along = stage_offsets();
    for (int ci = 0; ci < 16; ci++)
        for (int b = 0; b < blocks; b++) {
            __m512 sums[9];
            for (int64_t r = 0; r < job->rows; r++) {
                const int64_t at = (r * job->in_channels + c0 + ci) * job->out_channels + o0 + b * FILTER_BLOCK;
                const __m512 g = job->bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                                 _mm256_loadu_si256((const __m256i *)((const uint16_t *)job->in + at))), 16))
                                           : _mm512_loadu_ps((const float *)job->in + at);
                const float *m = job->matrix + r * 9;
                for (int t = 0; t < 9; t++)
                    sums[t] = r ? _mm512_fmadd_ps(_mm512_set1_ps(m[t]), g, sums[t]) : _mm512_mul_ps(_mm512_set1_ps(m[t]), g);
            }
            for (int t = 0; t < 9; t++)
                _mm512_i32scatter_ps(stage[b] + t * 16 + ci, along, job->bf16 ? round_vector_to_bf16(sums[t]) : sums[t], 4);
        }
    for (int b = 0; b < blocks; b++) {
        float *gradient = (float *)job->out + (o0 + b * FILTER_BLOCK) * job->o_stride + c0;
        for (int j = 0; j < FILTER_BLOCK; j++)
            for (int t = 0; t < 9; t++)
                _mm512_storeu_ps(gradient + j * job->o_stride + job->taps[t], _mm512_load_ps(stage[b] + j * STAGE_ROW + t * 16));
    }
}
#endif

/* Work items of FILTER_ITEM output channels: two blocks, so that a 64-byte line of bf16 filters
 * is written whole (a block wrote half of each line, and the next block the other half after
 * the line had left the cache). */
#define FILTER_ITEM (2 * FILTER_BLOCK)

static void filter_items(const void *job_, int64_t begin, int64_t end, int gradient) {
    const FilterJob *job = (const FilterJob *)job_;
    for (int64_t item = begin; item < end; item++) {
        const int64_t o0 = item * FILTER_ITEM;
        const int64_t count = job->out_channels - o0 < FILTER_ITEM ? job->out_channels - o0 : FILTER_ITEM;
#if defined(__AVX512F__)
        if (job->c_stride == 1 && job->in_channels % 16 == 0 && count % FILTER_BLOCK == 0) {
            for (int64_t c0 = 0; c0 < job->in_channels; c0 += 16) {
                if (gradient) filter_gradient_block_staged(job, c0, o0, (int)(count / FILTER_BLOCK));
                else filter_block_staged(job, c0, o0, (int)(count / FILTER_BLOCK));
            }
            continue;
        }
#endif
        for (int64_t c = 0; c < job->in_channels; c++)
            for (int64_t b = 0; b < count; b += FILTER_BLOCK) {
                const int64_t n = count - b < FILTER_BLOCK ? count - b : FILTER_BLOCK;
                if (gradient) filter_gradient_block(job, c, o0 + b, n);
                else filter_block(job, c, o0 + b, n);
            }
    }
}

static void filter_forward_items(const void *job, int64_t begin, int64_t end) { filter_items(job, begin, end, 0); }
static void filter_gradient_items(const void *job, int64_t begin, int64_t end) { filter_items(job, begin, end, 1); }

/* Forward: `out` R x C_in x C_out (bf16 with `bf16`, else float32) from the float32 `weight`
 * (element (o, c, kh, kw) at o o_stride + c c_stride + kh h_stride + kw w_stride floats). */
void seglab_winograd_filters(void *out, const float *weight, const float *matrix, int64_t rows,
                             int64_t out_channels, int64_t in_channels, int64_t o_stride, int64_t c_stride,
                             int64_t h_stride, int64_t w_stride, int32_t bf16, int32_t threads) {
    FilterJob job = {weight, out, matrix, rows, out_channels, in_channels, o_stride, c_stride, {0}, bf16};
    for (int t = 0; t < 9; t++) job.taps[t] = (t / 3) * h_stride + (t % 3) * w_stride;
    parallel_for((out_channels + FILTER_ITEM - 1) / FILTER_ITEM, threads, filter_forward_items, &job);
}

/* Backward: the float32 `gradient` (the weight's strides) from `grad`, R x C_in x C_out. */
void seglab_winograd_filters_backward(float *gradient, const void *grad, const float *matrix, int64_t rows,
                                      int64_t out_channels, int64_t in_channels, int64_t o_stride,
                                      int64_t c_stride, int64_t h_stride, int64_t w_stride, int32_t bf16,
                                      int32_t threads) {
    FilterJob job = {grad, gradient, matrix, rows, out_channels, in_channels, o_stride, c_stride, {0}, bf16};
    for (int t = 0; t < 9; t++) job.taps[t] = (t / 3) * h_stride + (t % 3) * w_stride;
    parallel_for((out_channels + FILTER_ITEM - 1) / FILTER_ITEM, threads, filter_gradient_items, &job);
}
