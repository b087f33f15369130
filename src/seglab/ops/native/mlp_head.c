/* SegFormer's all-MLP decoder head at stride 4 in one pass (seglab.ops.native):
 *
 *   scores = classifier(ReLU(first(x) + up(part_2) + ... + up(part_k))),
 *
 * x the first stage's map (N x H x W x C_in), `first` its share of the fused map (a linear layer
 * C_in -> D: projection, fusing layer and BatchNorm composed, seglab.models.semantic.segformer),
 * part_i the other stages' shares (N x h_i x w_i x D) bilinearly upsampled to H x W (bilinear.c's
 * positions and order), the classifier a linear layer D -> K; channels-last float32 (or bf16,
 * below). Each thread takes rows (image, row): the first share of a row into a buffer, the
 * upsampled shares added with the ReLU, the classifier's products, and the row's K scores
 * written.
 *
 * Why: three operators in a row wrote and read the fused map, D = 256 channels at stride 4
 * (134 MB for MiT-B0 at batch 8 on 512 x 512), where the scores, 21 channels, are all that is
 * kept. A row of it (W x D floats) stays in a core's L2.
 */

typedef struct {
    const void *src, *first_weight, *classifier_weight; /* float32, or bf16 with the weights as pairs */
    const float *first_bias, *classifier_bias;
    UpsampleJob parts; /* the other shares, added to a row by add_upsampled_f32_row (or the bf16 one below) */
    void *dst;
    int64_t in_channels, channels, classes, padded; /* padded: the classes in whole vectors */
    int bf16;
    int *failed;
} HeadJob;

#if BF16_PAIRS
/* bf16 shares added into a float32 row: the fused row stays float32 until the classifier's
 * products, where PyTorch's bf16 operators round the first share and the sum each to bf16. */
DEFINE_ADD_UPSAMPLED_ROW(add_bf16_upsampled_to_f32, float, f32, uint16_t, bf16)

/* The bf16 head's row u: the first share and the classifier by pair products (the fused row
 * rounded to bf16 for them), the K scores rounded to bf16. */
static void head_row_bf16(const HeadJob *job, int64_t u, float *fused, float *scores, uint16_t *halves) {
    const int64_t H = job->parts.height, W = job->parts.width, C = job->in_channels, D = job->channels;
    const int64_t K = job->classes, P = job->padded;
    pair_row((const uint16_t *)job->src + u * W * C, (int)W, C / 2, job->first_weight, D, job->first_bias, fused);
    add_bf16_upsampled_to_f32_row(&job->parts, u / H, u % H, fused);
    mix_to_bf16(fused, W * D, halves);
    pair_row(halves, (int)W, D / 2, job->classifier_weight, P, job->classifier_bias, scores);
    uint16_t *out = (uint16_t *)job->dst + u * W * K;
    for (int64_t x = 0; x < W; x++)
        for (int64_t k = 0; k < K; k += 16) {
            f32x16 value;
            memcpy(&value, scores + x * P + k, sizeof value);
            MEMORY(store, bf16, 16)(out + x * K + k, value, K - k < 16 ? (int)(K - k) : 16);
        }
}
#endif

static void head_rows(const void *job_, int64_t begin, int64_t end) {
    const HeadJob *job = (const HeadJob *)job_;
    const int64_t H = job->parts.height, W = job->parts.width, C = job->in_channels, D = job->channels;
    const int64_t K = job->classes, P = job->padded;
    float *fused = malloc(sizeof(float) * W * (D + P) + (job->bf16 ? sizeof(uint16_t) * W * D : 0));
    if (!fused) {
        *job->failed = 1;
        return;
    }
    float *scores = fused + W * D;
    for (int64_t u = begin; u < end; u++) {
        if (job->bf16) {
#if BF16_PAIRS
            head_row_bf16(job, u, fused, scores, (uint16_t *)(scores + W * P));
#endif
            continue;
        }
        linear_row((const float *)job->src + u * W * C, W, C, job->first_weight, D, job->first_bias, NULL, fused);
        add_upsampled_f32_row(&job->parts, u / H, u % H, fused);
        linear_row(fused, W, D, job->classifier_weight, P, job->classifier_bias, NULL, scores);
        float *out = (float *)job->dst + u * W * K;
        for (int64_t x = 0; x < W; x++) memcpy(out + x * K, scores + x * P, sizeof(float) * K);
    }
    free(fused);
}

/* dst (n x height x width x classes) = the head above of src (n x height x width x in_channels):
 * first_weight in_channels x channels and first_bias channels, the `count` shares parts[i]
 * (n x heights[i] x widths[i] x channels), classifier_weight channels x padded and
 * classifier_bias padded (zero beyond the classes; padded the classes rounded up to a multiple
 * of 16). With `bf16`, on a processor with pair products: src, the shares and dst bf16, the two
 * weights bf16 as pairs (in_channels / 2 x channels x 2 and channels / 2 x padded x 2, in_channels
 * even), the biases float32. Returns 0; -1 where memory ran out; -2 for channels or padded not
 * whole 16-float vectors, more than MAX_UPSAMPLED shares, or bf16 without pair products. */
int seglab_mlp_head(void *dst, const void *src, const void *first_weight, const float *first_bias,
                    const void *const *parts, const int64_t *heights, const int64_t *widths, int count,
                    const void *classifier_weight, const float *classifier_bias, int64_t n, int64_t height,
                    int64_t width, int64_t in_channels, int64_t channels, int64_t classes, int64_t padded,
                    int bf16, int threads) {
    if (channels % 16 || padded % 16 || padded < classes || count < 0 || count > MAX_UPSAMPLED) return -2;
    if (bf16 && (!BF16_PAIRS || in_channels % 2)) return -2;
    int failed = 0;
    const HeadJob job = {src, first_weight, classifier_weight, first_bias, classifier_bias,
                         upsample_job(NULL, parts, heights, widths, count, height, width, channels, 1),
                         dst, in_channels, channels, classes, padded, bf16, &failed};
    parallel_for(n * height, threads, head_rows, &job);
    return failed ? -1 : 0;
}
