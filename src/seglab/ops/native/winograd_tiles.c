/* Winograd's tile transforms, each fused into a single pass over memory (seglab.ops.native).
 *
 * Two kernels cover the four transforms of a Winograd convolution and their gradients:
 *
 *   gather:  out[p, t, c] = (L D_t L^T)[p] for every tile t of a channels-last map, D_t the
 *            in_side x in_side window at (row m r - pad, column m q - pad), zero outside the
 *            map; out is laid out (out_side^2) x tiles x C, the layout of the batched products.
 *   scatter: the transpose: per tile, R = L T_t L^T (T_t read from the (in_side^2) x tiles x C
 *            layout), written to (or, for overlapping windows, added into) the channels-last
 *            map at (m r - pad, m q - pad), cropped to the map, plus an optional bias.
 *
 * The input transform (B^T d B) is a gather, the output one (A^T M A) a scatter; the
 * gradient of each is the other kernel with the transposed matrix. Composed from PyTorch's
 * operators each transform took 5-7 passes over memory (padding, the window copy, one product
 * per axis, the layout copies, the bias); here the window stays in registers and L1.
 *
 * Channels are processed VEC at a time, so the compiler vectorises the inner loops; the tile
 * sides are compile-time constants in each instantiation. Threads split the tiles (gather) or
 * the tile rows (scatter; overlapping rows run in two rounds, even then odd rows).
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define VEC 8
#define MAX_THREADS 64

typedef struct {
    const float *src;
    float *dst;
    const float *matrix;  /* out_side x in_side, row major */
    const float *bias;    /* NULL or C floats (scatter only) */
    int64_t n, height, width, channels, rows, cols;
    int step, pad, accumulate, parity;
} Job;

typedef void (*RangeFn)(const Job *, int64_t, int64_t);

typedef struct {
    RangeFn fn;
    const Job *job;
    int64_t begin, end;
} Range;

static void *run_range(void *arg) {
    Range *r = (Range *)arg;
    r->fn(r->job, r->begin, r->end);
    return NULL;
}

/* The OpenMP runtime PyTorch runs its own operators on, when the loader found it
 * (seglab_use_openmp). Its workers spin for a while after each of PyTorch's parallel regions;
 * threads of our own competed with them for the cores (UNet-R34's inference ran 14% slower
 * with the native transforms on pthreads than with PyTorch's operators, and 12-16% faster with
 * them when OMP_WAIT_POLICY=PASSIVE put the workers to sleep). Running on the same workers
 * through GNU OpenMP's entry point (which LLVM's and Intel's runtimes also export) avoids it. */
typedef void (*GompParallel)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*OmpQuery)(void);
static GompParallel gomp_parallel;
static OmpQuery omp_thread_num, omp_num_threads;

void seglab_use_openmp(void *parallel, void *thread_num, void *num_threads) {
    gomp_parallel = (GompParallel)parallel;
    omp_thread_num = (OmpQuery)thread_num;
    omp_num_threads = (OmpQuery)num_threads;
}

typedef struct {
    RangeFn fn;
    const Job *job;
    int64_t count;
} Region;

static void run_region(void *arg) {
    const Region *region = (const Region *)arg;
    const int64_t threads = omp_num_threads(), t = omp_thread_num();
    const int64_t chunk = (region->count + threads - 1) / threads;
    const int64_t begin = t * chunk, end = begin + chunk < region->count ? begin + chunk : region->count;
    if (begin < end) region->fn(region->job, begin, end);
}

/* fn(job, begin, end) over [0, count) split in `threads` contiguous ranges: on PyTorch's
 * OpenMP workers, or else on POSIX threads, the calling thread running the first range
 * (threads that fail to start leave their range to the caller). */
static void parallel_for(int64_t count, int threads, RangeFn fn, const Job *job) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > count) threads = (int)count;
    if (threads <= 1) {
        if (count > 0) fn(job, 0, count);
        return;
    }
    if (gomp_parallel) {
        Region region = {fn, job, count};
        gomp_parallel(run_region, &region, (unsigned)threads, 0);
        return;
    }
    pthread_t ids[MAX_THREADS];
    Range ranges[MAX_THREADS];
    int started[MAX_THREADS];
    int64_t chunk = (count + threads - 1) / threads;
    for (int t = 0; t < threads; t++) {
        int64_t begin = t * chunk, end = begin + chunk < count ? begin + chunk : count;
        ranges[t] = (Range){fn, job, begin, end < begin ? begin : end};
        started[t] = t > 0 && pthread_create(&ids[t], NULL, run_range, &ranges[t]) == 0;
    }
    run_range(&ranges[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run_range(&ranges[t]);
    }
}

/* VEC channels in one vector register (GCC/Clang vector extension: AVX's 8 floats, or two
 * SSE registers). */
typedef float vec __attribute__((vector_size(VEC * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* R = L T L^T for VEC channels at once: T is IN x IN, L is OUT x IN, R is OUT x OUT; the
 * general form, L read at run time (job->matrix). */
#define GENERAL_TRANSFORM(OUT, IN, T, R)                             \
    do {                                                             \
        const float *L_ = job->matrix;                               \
        vec half_[OUT][IN];                                          \
        for (int i = 0; i < OUT; i++)                                \
            for (int j = 0; j < IN; j++) {                           \
                vec acc = {0};                                       \
                for (int k = 0; k < IN; k++) acc += L_[i * IN + k] * (T)[k][j]; \
                half_[i][j] = acc;                                   \
            }                                                        \
        for (int i = 0; i < OUT; i++)                                \
            for (int j = 0; j < OUT; j++) {                          \
                vec acc = {0};                                       \
                for (int k = 0; k < IN; k++) acc += L_[j * IN + k] * half_[i][k]; \
                (R)[i][j] = acc;                                     \
            }                                                        \
    } while (0)

/* The same with L compiled in: MAP(x, xs, y, ys) computes y = L x on strided vectors
 * (generated by specialise.py), applied to T's columns, then to the rows of the result. */
#define SEPARABLE_TRANSFORM(OUT, IN, MAP, T, R)                                   \
    do {                                                                          \
        vec half_[OUT][IN];                                                       \
        for (int j = 0; j < IN; j++) MAP(&(T)[0][j], IN, &half_[0][j], IN);       \
        for (int i = 0; i < OUT; i++) MAP(&half_[i][0], 1, &(R)[i][0], 1);        \
    } while (0)

#define DEFINE_GATHER(NAME, OUT, IN, TRANSFORM)                                                 \
    static void NAME(const Job *job, int64_t begin, int64_t end) {                             \
        const int64_t C = job->channels, tiles = job->n * job->rows * job->cols;               \
        vec window[IN][IN], result[OUT][OUT];                                                  \
        for (int64_t t = begin; t < end; t++) {                                                \
            const int64_t q = t % job->cols, r = (t / job->cols) % job->rows;                  \
            const int64_t b = t / (job->cols * job->rows);                                     \
            const int64_t y0 = r * job->step - job->pad, x0 = q * job->step - job->pad;        \
            for (int64_t c0 = 0; c0 < C; c0 += VEC) {                                          \
                const int width = C - c0 < VEC ? (int)(C - c0) : VEC;                          \
                for (int i = 0; i < IN; i++) {                                                 \
                    const int64_t y = y0 + i;                                                  \
                    for (int j = 0; j < IN; j++) {                                             \
                        const int64_t x = x0 + j;                                              \
                        if (y < 0 || y >= job->height || x < 0 || x >= job->width) {           \
                            window[i][j] = (vec){0};                      \
                            continue;                                                          \
                        }                                                                      \
                        const float *p = job->src + ((b * job->height + y) * job->width + x) * C + c0; \
                        if (width == VEC) window[i][j] = load(p);        \
                        else { window[i][j] = (vec){0}; memcpy(&window[i][j], p, width * sizeof(float)); } \
                    }                                                                          \
                }                                                                              \
                TRANSFORM(OUT, IN, window, result);                                            \
                for (int i = 0; i < OUT; i++)                                                  \
                    for (int j = 0; j < OUT; j++) {                                            \
                        float *p = job->dst + ((int64_t)(i * OUT + j) * tiles + t) * C + c0;   \
                        if (width == VEC) store(p, result[i][j]);        \
                        else memcpy(p, &result[i][j], width * sizeof(float));                   \
                    }                                                                          \
            }                                                                                  \
        }                                                                                      \
    }

/* Scatter works on whole tile rows, `begin`/`end` counting the (image, tile row) pairs of one
 * parity when windows overlap (job->parity >= 0), all of them otherwise. */
#define DEFINE_SCATTER(NAME, OUT, IN, TRANSFORM)                                                \
    static void NAME(const Job *job, int64_t begin, int64_t end) {                             \
        const int64_t C = job->channels, tiles = job->n * job->rows * job->cols;               \
        vec tile[IN][IN], result[OUT][OUT];                                                    \
        for (int64_t u = begin; u < end; u++) {                                                \
            int64_t b, r;                                                                      \
            if (job->parity >= 0) {                                                            \
                const int64_t per_image = (job->rows - job->parity + 1) / 2;                   \
                b = u / per_image;                                                             \
                r = 2 * (u % per_image) + job->parity;                                         \
            } else {                                                                           \
                b = u / job->rows;                                                             \
                r = u % job->rows;                                                             \
            }                                                                                  \
            const int64_t y0 = r * job->step - job->pad;                                       \
            for (int64_t q = 0; q < job->cols; q++) {                                          \
                const int64_t t = (b * job->rows + r) * job->cols + q;                         \
                const int64_t x0 = q * job->step - job->pad;                                   \
                for (int64_t c0 = 0; c0 < C; c0 += VEC) {                                      \
                    const int width = C - c0 < VEC ? (int)(C - c0) : VEC;                      \
                    for (int i = 0; i < IN; i++)                                               \
                        for (int j = 0; j < IN; j++) {                                         \
                            const float *p = job->src + ((int64_t)(i * IN + j) * tiles + t) * C + c0; \
                            if (width == VEC) tile[i][j] = load(p);        \
                            else { tile[i][j] = (vec){0}; memcpy(&tile[i][j], p, width * sizeof(float)); } \
                        }                                                                      \
                    TRANSFORM(OUT, IN, tile, result);                                          \
                    for (int i = 0; i < OUT; i++) {                                            \
                        const int64_t y = y0 + i;                                              \
                        if (y < 0 || y >= job->height) continue;                               \
                        for (int j = 0; j < OUT; j++) {                                        \
                            const int64_t x = x0 + j;                                          \
                            if (x < 0 || x >= job->width) continue;                            \
                            float *p = job->dst + ((b * job->height + y) * job->width + x) * C + c0; \
                            vec value = result[i][j];                                          \
                            if (job->accumulate) {                                             \
                                for (int v = 0; v < width; v++) p[v] += value[v];              \
                                continue;                                                      \
                            }                                                                  \
                            if (job->bias)                                                     \
                                for (int v = 0; v < width; v++) value[v] += job->bias[c0 + v]; \
                            if (width == VEC) store(p, value); \
                            else memcpy(p, &value, width * sizeof(float));                     \
                        }                                                                      \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

DEFINE_GATHER(gather_4_4, 4, 4, GENERAL_TRANSFORM)  /* F(2x2) input transform */
DEFINE_GATHER(gather_6_6, 6, 6, GENERAL_TRANSFORM)  /* F(4x4) input transform */
DEFINE_GATHER(gather_8_8, 8, 8, GENERAL_TRANSFORM)  /* F(6x6) input transform */
DEFINE_GATHER(gather_4_2, 4, 2, GENERAL_TRANSFORM)  /* F(2x2) output transform's gradient */
DEFINE_GATHER(gather_6_4, 6, 4, GENERAL_TRANSFORM)  /* F(4x4) output transform's gradient */
DEFINE_GATHER(gather_8_6, 8, 6, GENERAL_TRANSFORM)  /* F(6x6) output transform's gradient */
DEFINE_SCATTER(scatter_2_4, 2, 4, GENERAL_TRANSFORM) /* F(2x2) output transform */
DEFINE_SCATTER(scatter_4_6, 4, 6, GENERAL_TRANSFORM) /* F(4x4) output transform */
DEFINE_SCATTER(scatter_6_8, 6, 8, GENERAL_TRANSFORM) /* F(6x6) output transform */
DEFINE_SCATTER(scatter_4_4, 4, 4, GENERAL_TRANSFORM) /* F(2x2) input transform's gradient */
DEFINE_SCATTER(scatter_6_6, 6, 6, GENERAL_TRANSFORM) /* F(4x4) input transform's gradient */
DEFINE_SCATTER(scatter_8_8, 8, 8, GENERAL_TRANSFORM) /* F(6x6) input transform's gradient */

static RangeFn gather_kernel(int out_side, int in_side) {
    if (out_side == 4 && in_side == 4) return gather_4_4;
    if (out_side == 4 && in_side == 2) return gather_4_2;
    if (out_side == 6 && in_side == 6) return gather_6_6;
    if (out_side == 8 && in_side == 8) return gather_8_8;
    if (out_side == 6 && in_side == 4) return gather_6_4;
    if (out_side == 8 && in_side == 6) return gather_8_6;
    return NULL;
}

static RangeFn scatter_kernel(int out_side, int in_side) {
    if (out_side == 2 && in_side == 4) return scatter_2_4;
    if (out_side == 4 && in_side == 4) return scatter_4_4;
    if (out_side == 4 && in_side == 6) return scatter_4_6;
    if (out_side == 6 && in_side == 8) return scatter_6_8;
    if (out_side == 6 && in_side == 6) return scatter_6_6;
    if (out_side == 8 && in_side == 8) return scatter_8_8;
    return NULL;
}

/* The kernels with `matrix` compiled in, or NULL: defined by the code specialise.py generates,
 * which the loader appends to this file, for the matrices seglab registered (seglab.ops.native
 * .specialise), each found by comparing the matrix's bits. */
static RangeFn specialised_gather(int out_side, int in_side, const float *matrix);
static RangeFn specialised_scatter(int out_side, int in_side, const float *matrix);

/* Returns 0, or -1 for sides without a kernel. `specialised` = 0 keeps the general kernel
 * even for a matrix compiled in (the tests compare the two). */
int seglab_gather(const float *src, float *dst, const float *matrix, int out_side, int in_side,
                  int64_t n, int64_t height, int64_t width, int64_t channels, int step, int pad,
                  int threads, int specialised) {
    RangeFn fn = specialised ? specialised_gather(out_side, in_side, matrix) : NULL;
    if (!fn) fn = gather_kernel(out_side, in_side);
    if (!fn) return -1;
    Job job = {src, dst, matrix, NULL, n, height, width, channels,
               (height + step - 1) / step, (width + step - 1) / step, step, pad, 0, -1};
    parallel_for(n * job.rows * job.cols, threads, fn, &job);
    return 0;
}

/* dst is n x height x width x channels; with `accumulate` the results are added to it (it must
 * hold the starting values, zeros for a gradient), else written, plus `bias` when not NULL.
 * `rows` x `cols` tiles per image (the loader passes gather's ceil(height / step) x
 * ceil(width / step)). */
int seglab_scatter(const float *src, float *dst, const float *matrix, const float *bias,
                   int out_side, int in_side, int64_t n, int64_t height, int64_t width,
                   int64_t channels, int64_t rows, int64_t cols, int step, int pad, int accumulate,
                   int threads, int specialised) {
    RangeFn fn = specialised ? specialised_scatter(out_side, in_side, matrix) : NULL;
    if (!fn) fn = scatter_kernel(out_side, in_side);
    if (!fn) return -1;
    Job job = {src, dst, matrix, bias, n, height, width, channels, rows, cols, step, pad,
               accumulate, -1};
    const int overlap = out_side > step;
    if (!overlap) {
        parallel_for(n * rows, threads, fn, &job);
        return 0;
    }
    for (int parity = 0; parity < 2; parity++) {
        job.parity = parity;
        parallel_for(n * ((rows - parity + 1) / 2), threads, fn, &job);
    }
    return 0;
}

/* 1 when `matrix` has a kernel of its own (`scatter` = 0: among the gathers, 1: the scatters). */
int seglab_compiled_in(int scatter, int out_side, int in_side, const float *matrix) {
    return (scatter ? specialised_scatter(out_side, in_side, matrix)
                    : specialised_gather(out_side, in_side, matrix)) != NULL;
}
