/* Winograd's tile transforms, each fused into a single pass over memory (seglab.ops.native).
 *
 * Two kernels cover the four transforms of a Winograd convolution and their gradients:
 *
 *   gather:  out[p, t, c] = (L D_t L^T)[p] for every tile t of a channels-last map, D_t the
 *            in_side x in_side window at (row m r - pad, column m q - pad), zero outside the
 *            map; out is laid out (out_side^2) x tiles x C, the layout of the batched products,
 *            its planes `plane` values apart (the loader spaces them: see its `_planes`).
 *   scatter: the transpose: per tile, R = L T_t L^T (T_t read from the (in_side^2) x tiles x C
 *            layout, planes `plane` apart), written to (or, for overlapping windows, added
 *            into) the channels-last map at (m r - pad, m q - pad), cropped to the map, plus an
 *            optional bias.
 *
 * The input transform (B^T d B) is a gather, the output one (A^T M A) a scatter; the
 * gradient of each is the other kernel with the transposed matrix. Composed from PyTorch's
 * operators each transform took 5-7 passes over memory (padding, the window copy, one product
 * per axis, the layout copies, the bias); here the window stays in registers and L1.
 *
 * Channels are processed a vector at a time (8 or 16: see LANES), so the compiler vectorises
 * the inner loops; the tile sides are compile-time constants in each instantiation. Threads
 * split the tiles (gather) or
 * the tile rows (scatter; overlapping rows run in two rounds, even then odd rows).
 */
#include <stdint.h>
#include <string.h>

typedef struct {
    const void *src;  /* float, or bf16 (uint16_t) in the _bf16 kernels */
    void *dst;
    const float *matrix;  /* out_side x in_side, row major */
    const float *bias;    /* NULL or C floats (scatter only) */
    const void *residual; /* NULL, or a map like dst added to the written values (scatter only) */
    int64_t n, height, width, channels, rows, cols;
    int64_t dilation; /* d > 1: windows over the map's d x d phases (see `geometry`), rows x cols per phase */
    int64_t plane; /* elements from one plane of the tiles layout to the next (>= tiles x C) */
    int step, pad, accumulate, parity;
    int relu; /* the written values' ReLU (scatter only, not with accumulate) */
} Job;

/* Channels are processed in vectors of L floats (GCC/Clang vector extension): 8 (AVX's
 * register, or two SSE ones) for the 6 x 6 and 8 x 8 windows of F(4x4) and F(6x6); WIDE for
 * the 4 x 4 ones of F(2x2): 16 where the processor has AVX-512's registers (32 of them, so
 * a 4 x 4 window, its half-transformed copy and the result stay in registers). On an
 * AVX-512 BF16 Zen 4, 16 floats instead of 8 took 1.2-1.3x less time in F(2x2)'s gather
 * and 1.9-2x less in its bf16 scatter; F(6x6)'s gather went from 1.28-1.57x faster on large
 * maps to 0.78-0.84x on 64 x 64 and 128 x 128 (spilled registers). */
#if defined(__AVX512F__)
#define WIDE 16
#else
#define WIDE 8
#endif
#define LANES_1 WIDE
#define LANES_2 WIDE
#define LANES_3 WIDE
#define LANES_4 WIDE
#define LANES_5 8
#define LANES_6 8
#define LANES_7 8
#define LANES_8 8
#define LANES(SIDE) LANES_##SIDE /* by the larger side of the kernel's matrix, at most 8 */
#define VECTOR(L) VECTOR_(L)
#define VECTOR_(L) vec##L
#define MEMORY(KIND, TYPE, L) MEMORY_(KIND, TYPE, L)
#define MEMORY_(KIND, TYPE, L) KIND##_##TYPE##_##L

/* Loads and stores of `width` (<= L) channels, zeros beyond them: from float32 memory, or
 * from bfloat16 memory (the upper half of a float32; seglab's bf16 inference, whose
 * transforms run in float32 without a copy of the map or the tiles in float32 first). bf16
 * is rounded to the nearest, ties to even, NaN to the quiet NaN 0x7fc0: PyTorch's float ->
 * bfloat16 conversion, bit for bit but for NaN's bits (PyTorch's differ between its paths). */
#define DEFINE_MEMORY(L)                                                                    \
    typedef float vec##L __attribute__((vector_size(L * sizeof(float))));                   \
    typedef uint16_t bf16x##L __attribute__((vector_size(L * sizeof(uint16_t))));           \
    typedef uint32_t bits##L __attribute__((vector_size(L * sizeof(uint32_t))));            \
    static inline vec##L load_f32_##L(const void *p, int width) {                           \
        vec##L v = {0};                                                                     \
        if (width == L) memcpy(&v, p, sizeof v); /* one load; the general copy is a call */ \
        else memcpy(&v, p, width * sizeof(float));                                          \
        return v;                                                                           \
    }                                                                                       \
    static inline void store_f32_##L(void *p, vec##L v, int width) {                        \
        if (width == L) memcpy(p, &v, sizeof v);                                            \
        else memcpy(p, &v, width * sizeof(float));                                          \
    }                                                                                       \
    static inline vec##L load_bf16_##L(const void *p, int width) {                          \
        bf16x##L h = {0};                                                                   \
        if (width == L) memcpy(&h, p, sizeof h);                                            \
        else memcpy(&h, p, width * sizeof(uint16_t));                                       \
        bits##L wide = __builtin_convertvector(h, bits##L) << 16;                           \
        vec##L v;                                                                           \
        memcpy(&v, &wide, sizeof v);                                                        \
        return v;                                                                           \
    }                                                                                       \
    static inline void store_bf16_##L(void *p, vec##L v, int width) {                       \
        bits##L u;                                                                          \
        memcpy(&u, &v, sizeof u);                                                           \
        bits##L rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;                           \
        bits##L nan = (bits##L)(v != v);                                                    \
        rounded = (rounded & ~nan) | (nan & 0x7fc0u);                                       \
        bf16x##L h = __builtin_convertvector(rounded, bf16x##L);                            \
        if (width == L) memcpy(p, &h, sizeof h);                                            \
        else memcpy(p, &h, width * sizeof(uint16_t));                                       \
    }

#define DEFINE_MEMORY_OF(L) DEFINE_MEMORY(L) /* (expands WIDE first) */
DEFINE_MEMORY_OF(8)
#if WIDE != 8
DEFINE_MEMORY_OF(WIDE)
#endif

/* max(v, 0) in every lane of a VECTOR(L), NaN kept (as torch.relu keeps it). */
#define BITS(L) BITS_(L)
#define BITS_(L) bits##L
#define RELU(L, v)                                           \
    do {                                                     \
        BITS(L) bits_;                                       \
        memcpy(&bits_, &(v), sizeof bits_);                  \
        bits_ &= ~(BITS(L))((v) < 0);                        \
        memcpy(&(v), &bits_, sizeof bits_);                  \
    } while (0)

/* R = L T L^T for a vector of channels at once: T is IN x IN, L is OUT x IN, R is OUT x OUT;
 * the general form, L read at run time (job->matrix). */
#define GENERAL_TRANSFORM(OUT, IN, T, R)                             \
    do {                                                             \
        const float *L_ = job->matrix;                               \
        __typeof__((T)[0][0]) half_[OUT][IN];                        \
        for (int i = 0; i < OUT; i++)                                \
            for (int j = 0; j < IN; j++) {                           \
                __typeof__((T)[0][0]) acc = {0};                     \
                for (int k = 0; k < IN; k++) acc += L_[i * IN + k] * (T)[k][j]; \
                half_[i][j] = acc;                                   \
            }                                                        \
        for (int i = 0; i < OUT; i++)                                \
            for (int j = 0; j < OUT; j++) {                          \
                __typeof__((T)[0][0]) acc = {0};                     \
                for (int k = 0; k < IN; k++) acc += L_[j * IN + k] * half_[i][k]; \
                (R)[i][j] = acc;                                     \
            }                                                        \
    } while (0)

/* The same with L compiled in: MAP(x, xs, y, ys) computes y = L x on strided vectors
 * (generated by specialise.py), applied to T's columns, then to the rows of the result. */
#define SEPARABLE_TRANSFORM(OUT, IN, MAP, T, R)                                   \
    do {                                                                          \
        __typeof__((T)[0][0]) half_[OUT][IN];                                     \
        for (int j = 0; j < IN; j++) MAP(&(T)[0][j], IN, &half_[0][j], IN);       \
        for (int i = 0; i < OUT; i++) MAP(&half_[i][0], 1, &(R)[i][0], 1);        \
    } while (0)

/* Where the pixels of one image's windows lie in the channels-last map: pixel (y, x) at
 * `offset` + y `row_stride` + x `column_stride` values, inside the map for 0 <= y < `rows` and
 * 0 <= x < `columns`. Without dilation that is image b itself. With dilation d, b counts
 * (image, phase) pairs, d^2 per image, and phase (p, q) is the sub-map of the pixels
 * (d y + p, d x + q): a d-dilated 3x3 convolution is the undilated one over each phase (zero
 * padding 1 there is padding d in the map), so Winograd's windows are gathered and its outputs
 * scattered in place, without copies of the map in phase order (PSPNet's and DeepLab's dilated
 * stages). Computed once per tile (gather) or tile row (scatter), it costs the per-pixel
 * address no more than plain indexing did. */
typedef struct {
    int64_t offset, row_stride, column_stride, rows, columns;
} Geometry;

static inline Geometry geometry(const Job *job, int64_t b) {
    const int64_t d = job->dilation, C = job->channels;
    if (d == 1) return (Geometry){b * job->height * job->width * C, job->width * C, C, job->height, job->width};
    const int64_t image = b / (d * d), p = (b % (d * d)) / d, q = b % d;
    return (Geometry){((image * job->height + p) * job->width + q) * C, d * job->width * C, d * C,
                      (job->height - p + d - 1) / d, (job->width - q + d - 1) / d};
}

/* The address of pixel (y, x) of the windows' image `g` in the map `base` (float or bf16), or
 * NULL outside the map. */
#define place(g, base, y, x)                                                                     \
    ((y) >= 0 && (y) < (g).rows && (x) >= 0 && (x) < (g).columns                                 \
         ? (base) + (g).offset + (y) * (g).row_stride + (x) * (g).column_stride : NULL)

/* For 4 x 4 windows (F(2x2): ADDRESSES_PER_TILE), the addresses of the window's pixels are
 * computed once per tile; the loop over the channels then only adds the channel offset.
 * Computing them for every vector of channels (multiplications and bounds checks for each
 * pixel) took up to 1.1x as long in a bf16 F(2x2) gather. For F(6x6)'s 8 x 8 windows the
 * array of 64 pointers cost more than it saved (its float32 gather 9-13% slower), and the
 * outputs' addresses the same way: those are computed where they are used (NULL outside the
 * map: zeros read, nothing written). */
#define ADDRESSES_PER_TILE(IN) ((IN) <= 4) /* (a constant: the compiler keeps one branch) */

/* What the gathers with addresses per tile read for a pixel outside the map: a vector of
 * zeros, its channel offset multiplied by 0 (`advance`), so their loop over the channels has
 * no branch per pixel. */
static const float outside_map[16] __attribute__((aligned(64))) = {0};

/* For the 4 x 4 windows (ADDRESSES_PER_TILE) the loop over the channels runs whole vectors
 * first, with the width a constant L, then the last, partial one (C not a multiple of L). With
 * the width a variable in every load and store (the loop as one), GCC kept each access's branch
 * between the whole and the partial copy and passed the vectors through the stack: on an
 * AVX-512 BF16 Zen 4 (2 threads, interleaved medians), bf16 F(2x2) gathers of 64 x 64 maps (256
 * channels at dilation 2, 512 at 4, 1,024, batch 4 of 256) took 1.5-1.8x as long, 4 x 32 x 32 x
 * 512 2.1x, and its scatters 1.05-1.3x. The larger windows keep one loop: split the same way,
 * float32 F(4x4) and F(6x6) gathers moved by 0.92-1.36x, mixed across shapes. */

/* One vector of `width` channels (at c0) of tile t: its window's pixels (at WINDOW_AT(i, j),
 * i and j in scope) transformed and stored into the planes. */
#define GATHER_VECTOR(OUT, IN, TRANSFORM, L, MEM, width, WINDOW_AT)                            \
    do {                                                                                       \
        for (int i = 0; i < IN; i++)                                                           \
            for (int j = 0; j < IN; j++) window[i][j] = (WINDOW_AT);                           \
        TRANSFORM(OUT, IN, window, result);                                                    \
        for (int i = 0; i < OUT; i++)                                                          \
            for (int j = 0; j < OUT; j++)                                                      \
                MEMORY(store, MEM, L)(dst + (int64_t)(i * OUT + j) * job->plane + t * C + c0,  \
                                      result[i][j], width);                                    \
    } while (0)

/* A pixel of the window for `width` channels at c0, located on the spot: zeros outside. */
#define LOCATED_PIXEL(L, TYPE, MEM, width)                                                     \
    ({                                                                                         \
        const TYPE *p_ = place(g, src, y0 + i, x0 + j);                                        \
        p_ ? MEMORY(load, MEM, L)(p_ + c0, width) : (VECTOR(L)){0};                            \
    })

#define DEFINE_GATHER(NAME, OUT, IN, TRANSFORM, L, TYPE, MEM)                                  \
    static void NAME(const void *job_, int64_t begin, int64_t end) {                           \
        const Job *job = (const Job *)job_;                                                    \
        const int64_t C = job->channels;                                                       \
        const TYPE *src = (const TYPE *)job->src;                                              \
        TYPE *dst = (TYPE *)job->dst;                                                          \
        const TYPE *pixel[IN][IN];                                                             \
        int64_t advance[IN][IN]; /* 1, or 0 for `outside_map` */                               \
        VECTOR(L) window[IN][IN], result[OUT][OUT];                                            \
        for (int64_t t = begin; t < end; t++) {                                                \
            const int64_t q = t % job->cols, r = (t / job->cols) % job->rows;                  \
            const int64_t b = t / (job->cols * job->rows);                                     \
            const int64_t y0 = r * job->step - job->pad, x0 = q * job->step - job->pad;        \
            const Geometry g = geometry(job, b);                                               \
            int64_t c0 = 0;                                                                    \
            if (ADDRESSES_PER_TILE(IN)) {                                                      \
                for (int i = 0; i < IN; i++)                                                   \
                    for (int j = 0; j < IN; j++) {                                             \
                        const TYPE *p = place(g, src, y0 + i, x0 + j);                         \
                        pixel[i][j] = p ? p : (const TYPE *)outside_map;                       \
                        advance[i][j] = p != NULL;                                             \
                    }                                                                          \
                for (; c0 + L <= C; c0 += L)                                                   \
                    GATHER_VECTOR(OUT, IN, TRANSFORM, L, MEM, L,                               \
                                  MEMORY(load, MEM, L)(pixel[i][j] + c0 * advance[i][j], L));  \
            }                                                                                  \
            for (; c0 < C; c0 += L) { /* all of them for larger windows: see ADDRESSES_PER_TILE */ \
                const int width = C - c0 < L ? (int)(C - c0) : L;                              \
                GATHER_VECTOR(OUT, IN, TRANSFORM, L, MEM, width, LOCATED_PIXEL(L, TYPE, MEM, width)); \
            }                                                                                  \
        }                                                                                      \
    }

/* One vector of `width` channels (at c0) of tile t: its entries (at ENTRY_AT(i, j))
 * transformed and written (or added) onto the map's pixels (at PIXEL_AT(i, j); NULL: cropped
 * off). */
#define SCATTER_VECTOR(OUT, IN, TRANSFORM, L, TYPE, MEM, width, ENTRY_AT, PIXEL_AT)            \
    do {                                                                                       \
        for (int i = 0; i < IN; i++)                                                           \
            for (int j = 0; j < IN; j++) tile[i][j] = MEMORY(load, MEM, L)((ENTRY_AT) + c0, width); \
        TRANSFORM(OUT, IN, tile, result);                                                      \
        VECTOR(L) bias = {0};                                                                  \
        if (job->bias) bias = MEMORY(load, f32, L)(job->bias + c0, width);                     \
        for (int i = 0; i < OUT; i++)                                                          \
            for (int j = 0; j < OUT; j++) {                                                    \
                TYPE *p = (PIXEL_AT);                                                          \
                if (!p) continue;                                                              \
                if (job->accumulate) {                                                         \
                    MEMORY(store, MEM, L)(p + c0, MEMORY(load, MEM, L)(p + c0, width) + result[i][j], width); \
                    continue;                                                                  \
                }                                                                              \
                VECTOR(L) value = result[i][j] + bias;                                         \
                if (job->residual)                                                             \
                    value += MEMORY(load, MEM, L)((const TYPE *)job->residual + (p - dst) + c0, width); \
                if (job->relu) RELU(L, value);                                                 \
                MEMORY(store, MEM, L)(p + c0, value, width);                                   \
            }                                                                                  \
    } while (0)

/* Scatter works on whole tile rows, `begin`/`end` counting the (image, tile row) pairs of one
 * parity when windows overlap (job->parity >= 0), all of them otherwise; addresses as in
 * gather. */
#define DEFINE_SCATTER(NAME, OUT, IN, TRANSFORM, L, TYPE, MEM)                                 \
    static void NAME(const void *job_, int64_t begin, int64_t end) {                           \
        const Job *job = (const Job *)job_;                                                    \
        const int64_t C = job->channels;                                                       \
        const TYPE *src = (const TYPE *)job->src;                                              \
        TYPE *dst = (TYPE *)job->dst;                                                          \
        const TYPE *entry[IN][IN];                                                             \
        TYPE *pixel[OUT][OUT];                                                                 \
        VECTOR(L) tile[IN][IN], result[OUT][OUT];                                              \
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
            const Geometry g = geometry(job, b);                                               \
            for (int64_t q = 0; q < job->cols; q++) {                                          \
                const int64_t t = (b * job->rows + r) * job->cols + q;                         \
                const int64_t x0 = q * job->step - job->pad;                                   \
                int64_t c0 = 0;                                                                \
                if (ADDRESSES_PER_TILE(IN)) {                                                  \
                    for (int i = 0; i < IN; i++)                                               \
                        for (int j = 0; j < IN; j++) entry[i][j] = src + (int64_t)(i * IN + j) * job->plane + t * C; \
                    for (int i = 0; i < OUT; i++)                                              \
                        for (int j = 0; j < OUT; j++) pixel[i][j] = place(g, dst, y0 + i, x0 + j); \
                    for (; c0 + L <= C; c0 += L)                                               \
                        SCATTER_VECTOR(OUT, IN, TRANSFORM, L, TYPE, MEM, L, entry[i][j], pixel[i][j]); \
                }                                                                              \
                for (; c0 < C; c0 += L) { /* all of them for larger windows: see ADDRESSES_PER_TILE */ \
                    const int width = C - c0 < L ? (int)(C - c0) : L;                          \
                    SCATTER_VECTOR(OUT, IN, TRANSFORM, L, TYPE, MEM, width,                    \
                                   src + (int64_t)(i * IN + j) * job->plane + t * C,           \
                                   place(g, dst, y0 + i, x0 + j));                             \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

/* Each kernel in float32 (`NAME`) and with bf16 memory (`NAME_bf16`), in vectors of
 * LANES(SIDE) channels, SIDE the larger side of its matrix. */
#define DEFINE_GATHERS(NAME, OUT, IN, SIDE, TRANSFORM)                                    \
    DEFINE_GATHER(NAME, OUT, IN, TRANSFORM, LANES(SIDE), float, f32)                      \
    DEFINE_GATHER(NAME##_bf16, OUT, IN, TRANSFORM, LANES(SIDE), uint16_t, bf16)
#define DEFINE_SCATTERS(NAME, OUT, IN, SIDE, TRANSFORM)                                   \
    DEFINE_SCATTER(NAME, OUT, IN, TRANSFORM, LANES(SIDE), float, f32)                     \
    DEFINE_SCATTER(NAME##_bf16, OUT, IN, TRANSFORM, LANES(SIDE), uint16_t, bf16)

DEFINE_GATHERS(gather_4_4, 4, 4, 4, GENERAL_TRANSFORM)  /* F(2x2) input transform */
DEFINE_GATHERS(gather_6_6, 6, 6, 6, GENERAL_TRANSFORM)  /* F(4x4) input transform */
DEFINE_GATHERS(gather_8_8, 8, 8, 8, GENERAL_TRANSFORM)  /* F(6x6) input transform */
DEFINE_GATHERS(gather_4_2, 4, 2, 4, GENERAL_TRANSFORM)  /* F(2x2) output transform's gradient */
/* gather_6_4 also serves F(4x4)'s input transform of a 2x nearest-upsampled map, scatter_4_6
 * its gradient (seglab.ops.winograd_nearest). */
DEFINE_GATHERS(gather_6_4, 6, 4, 6, GENERAL_TRANSFORM)  /* F(4x4) output transform's gradient */
DEFINE_GATHERS(gather_8_6, 8, 6, 8, GENERAL_TRANSFORM)  /* F(6x6) output transform's gradient */
DEFINE_GATHERS(gather_8_5, 8, 5, 8, GENERAL_TRANSFORM)  /* F(6x6) input transform, 2x upsampled map */
DEFINE_GATHERS(gather_5_5, 5, 5, 5, GENERAL_TRANSFORM)  /* F(3x3) input transform */
DEFINE_GATHERS(gather_5_3, 5, 3, 5, GENERAL_TRANSFORM)  /* F(3x3) output transform's gradient */
DEFINE_SCATTERS(scatter_2_4, 2, 4, 4, GENERAL_TRANSFORM) /* F(2x2) output transform */
DEFINE_SCATTERS(scatter_4_6, 4, 6, 6, GENERAL_TRANSFORM) /* F(4x4) output transform */
DEFINE_SCATTERS(scatter_6_8, 6, 8, 8, GENERAL_TRANSFORM) /* F(6x6) output transform */
DEFINE_SCATTERS(scatter_4_4, 4, 4, 4, GENERAL_TRANSFORM) /* F(2x2) input transform's gradient */
DEFINE_SCATTERS(scatter_6_6, 6, 6, 6, GENERAL_TRANSFORM) /* F(4x4) input transform's gradient */
DEFINE_SCATTERS(scatter_8_8, 8, 8, 8, GENERAL_TRANSFORM) /* F(6x6) input transform's gradient */
DEFINE_SCATTERS(scatter_5_8, 5, 8, 8, GENERAL_TRANSFORM) /* the gradient of gather_8_5's */
DEFINE_SCATTERS(scatter_3_5, 3, 5, 5, GENERAL_TRANSFORM) /* F(3x3) output transform */
DEFINE_SCATTERS(scatter_5_5, 5, 5, 5, GENERAL_TRANSFORM) /* F(3x3) input transform's gradient */

/* KERNEL(name) picks name or name_bf16 by the caller's `bf16`. */
#define KERNEL(NAME) (bf16 ? NAME##_bf16 : NAME)

static RangeFn gather_kernel(int out_side, int in_side, int bf16) {
    if (out_side == 4 && in_side == 4) return KERNEL(gather_4_4);
    if (out_side == 4 && in_side == 2) return KERNEL(gather_4_2);
    if (out_side == 6 && in_side == 6) return KERNEL(gather_6_6);
    if (out_side == 8 && in_side == 8) return KERNEL(gather_8_8);
    if (out_side == 6 && in_side == 4) return KERNEL(gather_6_4);
    if (out_side == 8 && in_side == 6) return KERNEL(gather_8_6);
    if (out_side == 8 && in_side == 5) return KERNEL(gather_8_5);
    if (out_side == 5 && in_side == 5) return KERNEL(gather_5_5);
    if (out_side == 5 && in_side == 3) return KERNEL(gather_5_3);
    return NULL;
}

static RangeFn scatter_kernel(int out_side, int in_side, int bf16) {
    if (out_side == 2 && in_side == 4) return KERNEL(scatter_2_4);
    if (out_side == 4 && in_side == 4) return KERNEL(scatter_4_4);
    if (out_side == 4 && in_side == 6) return KERNEL(scatter_4_6);
    if (out_side == 6 && in_side == 8) return KERNEL(scatter_6_8);
    if (out_side == 6 && in_side == 6) return KERNEL(scatter_6_6);
    if (out_side == 8 && in_side == 8) return KERNEL(scatter_8_8);
    if (out_side == 5 && in_side == 8) return KERNEL(scatter_5_8);
    if (out_side == 3 && in_side == 5) return KERNEL(scatter_3_5);
    if (out_side == 5 && in_side == 5) return KERNEL(scatter_5_5);
    return NULL;
}

/* The kernels with `matrix` compiled in, or NULL: defined by the code specialise.py generates,
 * which the loader appends to this file, for the matrices seglab registered (seglab.ops.native
 * .specialise), each found by comparing the matrix's bits. */
static RangeFn specialised_gather(int out_side, int in_side, const float *matrix, int bf16);
static RangeFn specialised_scatter(int out_side, int in_side, const float *matrix, int bf16);

/* Returns 0, or -1 for sides without a kernel. `specialised` = 0 keeps the general kernel
 * even for a matrix compiled in (the tests compare the two). With `bf16` src and dst hold
 * bfloat16 values (uint16_t), the transform runs in float32 all the same. `plane`: the values
 * from one plane of dst's tiles layout to the next, at least tiles x channels. */
int seglab_gather(const void *src, void *dst, const float *matrix, int out_side, int in_side,
                  int64_t n, int64_t height, int64_t width, int64_t channels, int step, int pad,
                  int64_t dilation, int64_t plane, int threads, int specialised, int bf16) {
    RangeFn fn = specialised ? specialised_gather(out_side, in_side, matrix, bf16) : NULL;
    if (!fn) fn = gather_kernel(out_side, in_side, bf16);
    if (!fn || dilation < 1) return -1;
    const int64_t phase_height = (height + dilation - 1) / dilation, phase_width = (width + dilation - 1) / dilation;
    Job job = {src, dst, matrix, NULL, NULL, n, height, width, channels, (phase_height + step - 1) / step,
               (phase_width + step - 1) / step, dilation, plane, step, pad, 0, -1, 0};
    parallel_for(n * dilation * dilation * job.rows * job.cols, threads, fn, &job);
    return 0;
}

/* dst is n x height x width x channels; with `accumulate` the results are added to it (it must
 * hold the starting values, zeros for a gradient), else written, plus `bias` when not NULL,
 * plus `residual` (NULL, or a map laid out like dst) and then their ReLU with `relu`: a
 * convolution's epilogue in the same pass (inference).
 * `rows` x `cols` tiles per image (the loader passes gather's ceil(height / step) x
 * ceil(width / step)), src's planes `plane` values apart; `bias` is float32 whatever `bf16` says. */
int seglab_scatter(const void *src, void *dst, const float *matrix, const float *bias,
                   const void *residual, int relu, int out_side, int in_side, int64_t n,
                   int64_t height, int64_t width, int64_t channels, int64_t rows, int64_t cols,
                   int64_t dilation, int64_t plane, int step, int pad, int accumulate, int threads,
                   int specialised, int bf16) {
    RangeFn fn = specialised ? specialised_scatter(out_side, in_side, matrix, bf16) : NULL;
    if (!fn) fn = scatter_kernel(out_side, in_side, bf16);
    if (!fn || dilation < 1) return -1;
    Job job = {src, dst, matrix, bias, residual, n, height, width, channels, rows, cols, dilation, plane,
               step, pad, accumulate, -1, relu};
    const int64_t images = n * dilation * dilation; /* (image, phase) pairs: their outputs never meet */
    const int overlap = out_side > step;
    if (!overlap) {
        parallel_for(images * rows, threads, fn, &job);
        return 0;
    }
    for (int parity = 0; parity < 2; parity++) {
        job.parity = parity;
        parallel_for(images * ((rows - parity + 1) / 2), threads, fn, &job);
    }
    return 0;
}

/* 1 when `matrix` has a kernel of its own (`scatter` = 0: among the gathers, 1: the scatters). */
int seglab_compiled_in(int scatter, int out_side, int in_side, const float *matrix) {
    return (scatter ? specialised_scatter(out_side, in_side, matrix, 0)
                    : specialised_gather(out_side, in_side, matrix, 0)) != NULL;
}
