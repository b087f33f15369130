/* The interleave of a polyphase transposed convolution (seglab.ops.polyphase): its phase map,
 * N x (H + 1) x (W + 1) pixels of s x s x C values (row phase, column phase, channel; channels
 * last), into the N x sH x sW x C output, cropped by s/2 phases on each border, and the
 * reverse for the gradient. Values of any size, copied as bytes.
 *
 * Output row s q + t comes from phase row q' = q, phase ty = t + s/2 for t < s/2, else from
 * q' = q + 1, ty = t - s/2; columns alike. So along an output row each half of a block of s
 * pixels is one contiguous run of s/2 x C values of one phase pixel: the copies go run by run
 * (84 bf16 values for FCN's x8 of 21 classes). PyTorch's four strided copies took 8.1 ms
 * forward and 6.5 backward (after zeroing the whole phase map) on FCN-8s' 4 x 21 x 512 x 512
 * scores in bf16 (Zen 4, 2 threads). */

typedef struct {
    char *phases, *out;
    int64_t n, height, width, stride, run; /* the phase map's H and W; run: s/2 x C values, in bytes */
    int to_phases;                         /* 0: phases -> out; 1: out -> phases (zeros where uncovered) */
} PhaseJob;

/* Phase row (n, q', ty) for items n ((H + 1) s) + q' s + ty: its 2 (W + 1) half-runs to or from
 * the output row they make, or (backward) zeros where the crop dropped them. */
static void phase_rows(const void *job_, int64_t begin, int64_t end) {
    const PhaseJob *job = (const PhaseJob *)job_;
    const int64_t s = job->stride, half = s / 2, run = job->run, H = job->height, W = job->width;
    const int64_t pixel = 2 * s * run; /* bytes of one phase pixel: s row phases x s column phases x C */
    const int64_t out_pixel = 2 * run / s, out_row = s * W * out_pixel; /* C values; s W pixels */
    for (int64_t item = begin; item < end; item++) {
        const int64_t n = item / ((H + 1) * s), qp = item / s % (H + 1), ty = item % s;
        const int64_t y = ty >= half ? s * qp + ty - half : s * (qp - 1) + ty + half;
        const int covered = ty >= half ? qp < H : qp >= 1;
        char *phase_row = job->phases + ((n * (H + 1) + qp) * (W + 1)) * pixel + ty * 2 * run;
        char *out = covered ? job->out + (n * H * s + y) * out_row : NULL;
        for (int64_t rp = 0; rp <= W; rp++) {
            char *left = phase_row + rp * pixel, *right = left + run; /* tx < s/2, tx >= s/2 */
            /* tx < s/2 makes output pixels s (r' - 1) + s/2 ...; tx >= s/2 makes s r' ... */
            const int left_in = covered && rp >= 1, right_in = covered && rp < W;
            char *left_out = left_in ? out + (s * (rp - 1) + half) * out_pixel : NULL;
            char *right_out = right_in ? out + s * rp * out_pixel : NULL;
            if (job->to_phases) {
                if (left_in) memcpy(left, left_out, run);
                else memset(left, 0, run);
                if (right_in) memcpy(right, right_out, run);
                else memset(right, 0, run);
            } else {
                if (left_in) memcpy(left_out, left, run);
                if (right_in) memcpy(right_out, right, run);
            }
        }
    }
}

/* phases -> out (to_phases 0) or out -> phases (1): n maps, the phase map's height and width,
 * stride s (even), `channels` values of `value_bytes` each per phase. */
void seglab_interleave_phases(void *phases, void *out, int64_t n, int64_t height, int64_t width, int64_t stride,
                              int64_t channels, int64_t value_bytes, int32_t to_phases, int32_t threads) {
    PhaseJob job = {(char *)phases, (char *)out, n, height, width, stride, stride / 2 * channels * value_bytes,
                    to_phases};
    parallel_for(n * (height + 1) * stride, threads, phase_rows, &job);
}
