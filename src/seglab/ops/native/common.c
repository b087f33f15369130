/* What seglab's native kernels share (seglab.ops.native): the threads they run on, and the
 * conversions between float32 and bf16. The loader compiles common.c, winograd_tiles.c and
 * cross_entropy.c as one translation unit, in that order: the kernels after this file call
 * `parallel_for` with a job struct of their own. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64

/* A kernel's share of the work: items [begin, end) of `job` (the kernel's own struct). */
typedef void (*RangeFn)(const void *job, int64_t begin, int64_t end);

typedef struct {
    RangeFn fn;
    const void *job;
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
    const void *job;
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
static void parallel_for(int64_t count, int threads, RangeFn fn, const void *job) {
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

/* 16 lanes (GCC/Clang vector extension): one AVX-512 register, or two AVX ones. May alias
 * their lanes' type, as the processor vendors' own vector types do (cross_entropy.c reads a
 * row of vectors through a float pointer). */
typedef float f32x16 __attribute__((vector_size(16 * sizeof(float)), __may_alias__));
typedef int32_t i32x16 __attribute__((vector_size(16 * sizeof(int32_t)), __may_alias__));

/* bf16 is the upper half of a float32. */
static inline float bf16_to_float(uint16_t bits) {
    const uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline uint16_t float_to_bf16(float value) { /* round to nearest, ties to even */
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
