/* SegFormer's all-MLP decoder head at stride 4 in one pass (seglab.ops.native):
 *
 *   scores = classifier(ReLU(first(x) + up(part_2) + ... + up(part_k))),
 *
 * x the first stage's map (N x H x W x C_in), `first` its share of the fused map (a linear layer
 * C_in -> D: projection, fusing layer and BatchNorm composed, seglab.models.semantic.segformer),
 * part_i the other stages' shares (N x h_i x w_i x D) bilinearly upsampled to H x W (bilinear.c's
 * positions and order), the classifier a linear layer D -> K; channels-last float32. Each thread
 * takes rows (image, row): the first share of a row into a buffer, the upsampled shares added
 * with the ReLU, the classifier's products, and the row's K scores written.
 *
 * Why: three operators in a row wrote and read the fused map, D = 256 channels at stride 4
 * (134 MB for MiT-B0 at batch 8 on 512 x 512), where the scores, 21 channels, are all that is
 * kept. A row of it (W x D floats) stays in a core's L2.
 */

typedef struct {
    const float *src, *first_weight, *first_bias, *classifier_weight, *classifier_bias;
    UpsampleJob parts; /* the other shares, added to a row by add_upsampled_f32_row */
    float *dst;
    int64_t in_channels, channels, classes, padded; /* padded: the classes in whole vectors */
    int *failed;
} HeadJob;

static void head_rows(const void *job_, int64_t begin, int64_t end) {
    const HeadJob *job = (const HeadJob *)job_;
    const int64_t H = job->parts.height, W = job->parts.width, C = job->in_channels, D = job->channels;
    const int64_t K = job->classes, P = job->padded;
    float *fused = malloc(sizeof(float) * W * (D + P));
    if (!fused) {
        *job->failed = 1;
        return;
    }
    float *scores = fused + W * D;
    for (int64_t u = begin; u < end; u++) {
        linear_row(job->src + u * W * C, W, C, job->first_weight, D, job->first_bias, NULL, fused);
        add_upsampled_f32_row(&job->parts, u / H, u % H, fused);
        linear_row(fused, W, D, job->classifier_weight, P, job->classifier_bias, NULL, scores);
        float *out = job->dst + u * W * K;
        for (int64_t x = 0; x < W; x++) memcpy(out + x * K, scores + x * P, sizeof(float) * K);
    }
    free(fused);
}

/* dst (n x height x width x classes) = the head above of src (n x height x width x in_channels):
 * first_weight in_channels x channels and first_bias channels, the `count` shares parts[i]
 * (n x heights[i] x widths[i] x channels), classifier_weight channels x padded and
 * classifier_bias padded (zero beyond the classes; padded the classes rounded up to a multiple
 * of 16). Returns 0; -1 where memory ran out; -2 for channels or padded not whole 16-float
 * vectors, or more than MAX_UPSAMPLED shares. */
int seglab_mlp_head(float *dst, const float *src, const float *first_weight, const float *first_bias,
                    const float *const *parts, const int64_t *heights, const int64_t *widths, int count,
                    const float *classifier_weight, const float *classifier_bias, int64_t n, int64_t height,
                    int64_t width, int64_t in_channels, int64_t channels, int64_t classes, int64_t padded,
                    int threads) {
    if (channels % 16 || padded % 16 || padded < classes || count < 0 || count > MAX_UPSAMPLED) return -2;
    int failed = 0;
    const HeadJob job = {src, first_weight, first_bias, classifier_weight, classifier_bias,
                         upsample_job(NULL, (const void *const *)parts, heights, widths, count, height, width,
                                      channels, 1),
                         dst, in_channels, channels, classes, padded, &failed};
    parallel_for(n * height, threads, head_rows, &job);
    return failed ? -1 : 0;
}
