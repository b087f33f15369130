/* float32 -> uint8 levels in one pass, for the int8 convolutions' inputs (seglab.engine.int8):
 * level = clamp(round(x / scale) + zero_point, 0, 255), rounding half to even like
 * torch.quantize_per_tensor; NaN gives 0. PyTorch's quantize_per_tensor followed by int_repr took two passes
 * (1.2 ms for 2M values); this one reads the floats and writes the bytes once. */

#define QUANTIZE_BLOCK 16384 /* values per work item: a thread's range is whole blocks */

typedef struct {
    uint8_t *out;
    const float *x;
    int64_t count;
    float inv_scale, zero_point;
} QuantizeJob;

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static void quantize_blocks(const void *arg, int64_t begin, int64_t end) {
    const QuantizeJob *job = (const QuantizeJob *)arg;
    const int64_t first = begin * QUANTIZE_BLOCK;
    const int64_t last = end * QUANTIZE_BLOCK < job->count ? end * QUANTIZE_BLOCK : job->count;
    const float inv_scale = job->inv_scale, zero_point = job->zero_point;
    int64_t i = first;
#if defined(__AVX512F__)
    /* The compiler's own loop converted lane by lane (0.7 ns a value, a quarter of what this
     * loop takes): here 16 values per instruction. The product x / scale is rounded to a float
     * and then to the nearest whole number, half to even, before the zero point is added, as
     * PyTorch does: a fused multiply-add of the zero point skipped the product's rounding and
     * put about one value in 100,000 (those within a unit in the last place of a half) one
     * level off. Then clamped to [0, 255] while still floats (so that huge values and NaN do
     * not overflow the conversion). */
    const __m512 scale_v = _mm512_set1_ps(inv_scale), zero_v = _mm512_set1_ps(zero_point);
    const __m512 low_v = _mm512_setzero_ps(), high_v = _mm512_set1_ps(255.0f);
    for (; i + 16 <= last; i += 16) {
        const __m512 product = _mm512_mul_ps(_mm512_loadu_ps(job->x + i), scale_v);
        __m512 level = _mm512_add_ps(_mm512_roundscale_ps(product, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zero_v);
        level = _mm512_min_ps(_mm512_max_ps(level, low_v), high_v);  /* max(NaN, 0) is 0 */
        _mm_storeu_si128((__m128i *)(job->out + i), _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(level)));
    }
#endif
    for (; i < last; i++) {
        float level = __builtin_rintf(job->x[i] * inv_scale) + zero_point; /* as above: no fused add */
        level = level > 0.0f ? level : 0.0f; /* NaN too */
        level = level < 255.0f ? level : 255.0f;
        job->out[i] = (uint8_t)(int32_t)level;
    }
}

void seglab_quantize_u8(uint8_t *out, const float *x, int64_t count, float inv_scale, int32_t zero_point,
                        int32_t threads) {
    QuantizeJob job = {out, x, count, inv_scale, (float)zero_point};
    parallel_for((count + QUANTIZE_BLOCK - 1) / QUANTIZE_BLOCK, threads, quantize_blocks, &job);
}

/* Row-wise symmetric int8, for training's int8 products (seglab.ops.int8_products): each row of a
 * rows x columns float32 matrix gets its own scale, absmax / 127, and levels
 * round(x * 127 / absmax) in -127..127, half to even; a row of zeros gets scale 0 and levels 0.
 * One pass over memory: a row (at most a few thousand floats) is read for its largest magnitude
 * and read again, from the cache, for its levels. NaN is not looked for: training's own checks
 * (the loss) see it. */

#define ROWS_BLOCK 64

typedef struct {
    int8_t *out;
    float *scales;
    const float *x;
    int64_t rows, columns, row_stride;
} RowsJob;

static void quantize_row_blocks(const void *arg, int64_t begin, int64_t end) {
    const RowsJob *job = (const RowsJob *)arg;
    const int64_t last = end * ROWS_BLOCK < job->rows ? end * ROWS_BLOCK : job->rows;
    const int64_t columns = job->columns;
    for (int64_t r = begin * ROWS_BLOCK; r < last; r++) {
        const float *x = job->x + r * job->row_stride;
        int8_t *out = job->out + r * columns;
        float largest = 0.0f;
        int64_t c = 0;
#if defined(__AVX512F__)
        __m512 largest_v = _mm512_setzero_ps();
        for (; c + 16 <= columns; c += 16)
            largest_v = _mm512_max_ps(largest_v, _mm512_abs_ps(_mm512_loadu_ps(x + c)));
        largest = _mm512_reduce_max_ps(largest_v);
#endif
        for (; c < columns; c++) {
            const float magnitude = __builtin_fabsf(x[c]);
            largest = magnitude > largest ? magnitude : largest;
        }
        job->scales[r] = largest / 127.0f;
        const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
        c = 0;
#if defined(__AVX512F__)
        const __m512 inverse_v = _mm512_set1_ps(inverse);
        for (; c + 16 <= columns; c += 16) {
            /* |x| * 127 / absmax <= 127 up to a rounding: the saturating conversion keeps it in range */
            const __m512i level = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + c), inverse_v));
            _mm_storeu_si128((__m128i *)(out + c), _mm512_cvtsepi32_epi8(level));
        }
#endif
        for (; c < columns; c++) {
            float level = __builtin_rintf(x[c] * inverse);
            level = level > 127.0f ? 127.0f : (level < -127.0f ? -127.0f : level);
            out[c] = (int8_t)(int32_t)level;
        }
    }
}

void seglab_quantize_rows_s8(int8_t *out, float *scales, const float *x, int64_t rows, int64_t columns,
                             int64_t row_stride, int32_t threads) {
    RowsJob job = {out, scales, x, rows, columns, row_stride};
    parallel_for((rows + ROWS_BLOCK - 1) / ROWS_BLOCK, threads, quantize_row_blocks, &job);
}

/* The int32 products back to float32: out[r][c] = products[r][c] * row_scales[r] *
 * column_scales[c] (+ bias[c]), in one pass; with `accumulate`, added to what out holds (a
 * sum over a kernel's taps, each tap's products with scales of their own). */

typedef struct {
    float *out;
    const int32_t *products;
    const float *row_scales, *column_scales, *bias;
    int64_t rows, columns;
    int32_t accumulate;
} DequantizeJob;

static void dequantize_row_blocks(const void *arg, int64_t begin, int64_t end) {
    const DequantizeJob *job = (const DequantizeJob *)arg;
    const int64_t last = end * ROWS_BLOCK < job->rows ? end * ROWS_BLOCK : job->rows;
    const int64_t columns = job->columns;
    for (int64_t r = begin * ROWS_BLOCK; r < last; r++) {
        const int32_t *products = job->products + r * columns;
        float *out = job->out + r * columns;
        const float row_scale = job->row_scales[r];
        int64_t c = 0;
#if defined(__AVX512F__)
        const __m512 row_v = _mm512_set1_ps(row_scale);
        for (; c + 16 <= columns; c += 16) {
            const __m512 scale = _mm512_mul_ps(row_v, _mm512_loadu_ps(job->column_scales + c));
            const __m512 value = _mm512_cvtepi32_ps(_mm512_loadu_si512(products + c));
            __m512 start = job->accumulate ? _mm512_loadu_ps(out + c) : _mm512_setzero_ps();
            if (job->bias)
                start = _mm512_add_ps(start, _mm512_loadu_ps(job->bias + c));
            _mm512_storeu_ps(out + c, _mm512_fmadd_ps(value, scale, start));
        }
#endif
        for (; c < columns; c++) {
            const float value = (float)products[c], scale = row_scale * job->column_scales[c];
            const float start = (job->accumulate ? out[c] : 0.0f) + (job->bias ? job->bias[c] : 0.0f);
            out[c] = __builtin_fmaf(value, scale, start);
        }
    }
}

void seglab_dequantize_rows(float *out, const int32_t *products, const float *row_scales, const float *column_scales,
                            const float *bias, int64_t rows, int64_t columns, int32_t accumulate, int32_t threads) {
    DequantizeJob job = {out, products, row_scales, column_scales, bias, rows, columns, accumulate};
    parallel_for((rows + ROWS_BLOCK - 1) / ROWS_BLOCK, threads, dequantize_row_blocks, &job);
}
