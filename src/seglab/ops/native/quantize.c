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
     * loop takes): here 16 values per instruction. Clamped to [0, 255] while still floats (so
     * that huge values and NaN do not overflow the conversion), then rounded by the processor's
     * default mode, half to even; the zero point is a whole number, so adding it before the
     * rounding gives the same level. */
    const __m512 scale_v = _mm512_set1_ps(inv_scale), zero_v = _mm512_set1_ps(zero_point);
    const __m512 low_v = _mm512_setzero_ps(), high_v = _mm512_set1_ps(255.0f);
    for (; i + 16 <= last; i += 16) {
        __m512 level = _mm512_fmadd_ps(_mm512_loadu_ps(job->x + i), scale_v, zero_v);
        level = _mm512_min_ps(_mm512_max_ps(level, low_v), high_v);  /* max(NaN, 0) is 0 */
        _mm_storeu_si128((__m128i *)(job->out + i), _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(level)));
    }
#endif
    for (; i < last; i++) {
        float level = job->x[i] * inv_scale + zero_point;
        level = level > 0.0f ? level : 0.0f; /* NaN too */
        level = level < 255.0f ? __builtin_rintf(level) : 255.0f;
        job->out[i] = (uint8_t)(int32_t)level;
    }
}

void seglab_quantize_u8(uint8_t *out, const float *x, int64_t count, float inv_scale, int32_t zero_point,
                        int32_t threads) {
    QuantizeJob job = {out, x, count, inv_scale, (float)zero_point};
    parallel_for((count + QUANTIZE_BLOCK - 1) / QUANTIZE_BLOCK, threads, quantize_blocks, &job);
}
