"""C for the transforms with a known matrix: `L x` as straight-line code, the matrix's values
compiled in (`winograd_tiles.c` keeps the general kernels for any other matrix).

Why: with the matrix read at run time the kernels multiply every entry, zeros included, and
broadcast each from memory first: an F(6x6) window cost about 2,500 cycles for 8 channels.
Winograd's matrices are a third zeros, and their rows come in pairs, one per pair of
interpolation points +p and -p, that share their products: row(-p) is row(+p) with the odd
columns negated, so both are E + O and E - O of the same even part E and odd part O. Their
transposes pair columns the same way: x_c and x_d enter every row as x_c + x_d or x_c - x_d.
F(6x6)'s input transform takes 40 additions and multiplications per column of 8 this way
(fewer once the compiler fuses a product into the next addition), against 64 multiply-adds;
the pairs are found in the matrix itself, not written by hand.

Exact: a term is skipped only where its coefficient is zero, and +-1 are additions. The sums
may round differently from the general kernel's (other order, fused multiply-adds); both are
held to a float64 reference by the tests.
"""
from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]

__all__ = ["fused_maps", "kernels", "linear_map"]


def _literal(value: float) -> str:
    return f"{float(value)!r}f"


def _expression(terms: list[tuple[float, str]], vector: str) -> str:
    """sum(coefficient * name) without zero terms; a zero `vector` when there are none."""
    parts = []
    for coefficient, name in terms:
        if coefficient == 0:
            continue
        magnitude = abs(coefficient)
        product = name if magnitude == 1 else f"{_literal(magnitude)} * {name}"
        sign = "-" if coefficient < 0 else "+"
        parts.append((sign, product))
    if not parts:
        return f"({vector}){{0}}"
    first_sign, first = parts[0]
    text = f"-{first}" if first_sign == "-" else first
    return text + "".join(f" {sign} {product}" for sign, product in parts[1:])


def _mirrored(a: Sequence[float], b: Sequence[float]) -> list[int] | None:
    """+1 / -1 per position where b is a with some signs flipped (the same zeros), with both
    signs present; None otherwise."""
    if len(a) != len(b) or any(abs(x) != abs(y) for x, y in zip(a, b)):
        return None
    signs = [0 if x == 0 else (1 if x == y else -1) for x, y in zip(a, b)]
    return signs if 1 in signs and -1 in signs else None


def _pairs(vectors: list[list[float]]) -> list[tuple[int, int, list[int]]]:
    """Disjoint (i, j, signs) with vectors[j] a sign-flipped vectors[i], first match first."""
    taken: set[int] = set()
    pairs = []
    for i, a in enumerate(vectors):
        if i in taken:
            continue
        for j in range(i + 1, len(vectors)):
            signs = None if j in taken else _mirrored(a, vectors[j])
            if signs is not None:
                pairs.append((i, j, signs))
                taken.update((i, j))
                break
    return pairs


def linear_map(name: str, matrix: Matrix, vector: str = "vec8") -> str:
    """A C function `name(x, xs, y, ys)`: y[r * ys] = sum_c matrix[r][c] x[c * xs] for the
    values of type `vector` (a vector of channels, as winograd_tiles.c names it), with the
    rows' or the columns' sign pairs shared."""
    rows = [[float(v) for v in row] for row in matrix]
    out_size, in_size = len(rows), len(rows[0])
    lines = [f"static inline __attribute__((always_inline)) void {name}(const {vector} *x, int xs, {vector} *y, int ys) {{"]
    # only the inputs some row reads (a transform's column of zeros would be an unused load)
    lines += [f"    const {vector} x{c} = x[{c} * xs];" for c in range(in_size) if any(row[c] for row in rows)]
    row_pairs = _pairs(rows)
    if row_pairs:
        # y_i = E + O, y_j = E - O: E over the columns where the two rows agree, O where not.
        done = set()
        for i, j, signs in row_pairs:
            same = [(rows[i][c], f"x{c}") for c in range(in_size) if signs[c] == 1]
            flipped = [(rows[i][c], f"x{c}") for c in range(in_size) if signs[c] == -1]
            lines.append(f"    const {vector} e{i} = {_expression(same, vector)}, o{i} = {_expression(flipped, vector)};")
            lines.append(f"    y[{i} * ys] = e{i} + o{i};")
            lines.append(f"    y[{j} * ys] = e{i} - o{i};")
            done.update((i, j))
        for r in range(out_size):
            if r not in done:
                lines.append(f"    y[{r} * ys] = {_expression([(v, f'x{c}') for c, v in enumerate(rows[r])], vector)};")
    else:
        # x_c and x_d enter every row as (x_c + x_d) or (x_c - x_d), scaled by the row's entry.
        columns = [[rows[r][c] for r in range(out_size)] for c in range(in_size)]
        column_pairs = _pairs(columns)
        paired = {}
        for c, d, _ in column_pairs:
            lines.append(f"    const {vector} s{c} = x{c} + x{d}, t{c} = x{c} - x{d};")
            paired[c] = d
        seconds = set(paired.values())
        for r in range(out_size):
            terms = []
            for c in range(in_size):
                if c in seconds:
                    continue
                if c in paired:
                    d = paired[c]
                    terms.append((rows[r][c], f"s{c}" if rows[r][d] == rows[r][c] else f"t{c}"))
                else:
                    terms.append((rows[r][c], f"x{c}"))
            lines.append(f"    y[{r} * ys] = {_expression(terms, vector)};")
    lines.append("}")
    return "\n".join(lines)


def _float_array(name: str, matrix: Matrix) -> str:
    """A C array `name` of the matrix's values row by row, written exactly (hexadecimal floats)."""
    values = ", ".join(f"{float(v).hex()}f" for row in matrix for v in row)
    return f"static const float {name}[{sum(len(row) for row in matrix)}] = {{{values}}};"


def kernels(gathers: Sequence[Matrix], scatters: Sequence[Matrix]) -> str:
    """C appended to `winograd_tiles.c`: a gather kernel for each matrix of `gathers` and a
    scatter kernel for each of `scatters` with the matrix compiled in (each for float32 and for
    bf16 memory, in the vectors winograd_tiles.c's LANES gives the matrix's larger side), and
    the lookups `specialised_gather` / `specialised_scatter` that find them by the matrix's
    bits."""
    parts, lookups = ["/* Generated by seglab.ops.native.specialise. */"], {"gather": [], "scatter": []}
    for kind, matrices in (("gather", gathers), ("scatter", scatters)):
        for index, matrix in enumerate(matrices):
            rows = [[float(v) for v in row] for row in matrix]
            out_size, in_size = len(rows), len(rows[0])
            name = f"{kind}_known_{index}"
            side = max(out_size, in_size)
            parts += [linear_map(f"map_{name}", rows, f"VECTOR(LANES({side}))"),
                      f"#define TRANSFORM_{name}(OUT, IN, T, R) SEPARABLE_TRANSFORM(OUT, IN, map_{name}, T, R)",
                      f"DEFINE_{kind.upper()}S({name}, {out_size}, {in_size}, {side}, TRANSFORM_{name})",
                      _float_array(f"matrix_{name}", rows)]
            lookups[kind].append((out_size, in_size, name))
    for kind, known in lookups.items():
        parts.append(f"static RangeFn specialised_{kind}(int out_side, int in_side, const float *matrix, int bf16) {{")
        parts.append("    (void)out_side; (void)in_side; (void)matrix; (void)bf16;")
        for out_size, in_size, name in known:
            parts.append(f"    if (out_side == {out_size} && in_side == {in_size} && "
                         f"memcmp(matrix, matrix_{name}, sizeof matrix_{name}) == 0) return KERNEL({name});")
        parts += ["    return NULL;", "}"]
    return "\n".join(parts) + "\n"


def fused_maps(b_t: Matrix | None, a_t: Matrix | None) -> str:
    """C appended for `winograd_fused.c`: its maps with F(4x4)'s B^T (6 x 6) and A^T (4 x 6)
    compiled in and `fused_matrices_are`, which tells whether given matrices are those; with
    no matrices, maps that are never called and a `fused_matrices_are` that says no."""
    if b_t is None or a_t is None:
        stub = "(const fvec *x, int xs, fvec *y, int ys) { (void)x; (void)xs; (void)y; (void)ys; }"
        return "\n".join([f"static inline __attribute__((always_inline)) void fused_input_map{stub}",
                          f"static inline __attribute__((always_inline)) void fused_output_map{stub}",
                          "static int fused_matrices_are(const float *b_t, const float *a_t) { (void)b_t; (void)a_t; return 0; }",
                          ""])
    return "\n".join([linear_map("fused_input_map", b_t, "fvec"), linear_map("fused_output_map", a_t, "fvec"),
                      _float_array("fused_b_t", b_t), _float_array("fused_a_t", a_t),
                      "static int fused_matrices_are(const float *b_t, const float *a_t) {",
                      "    return memcmp(b_t, fused_b_t, sizeof fused_b_t) == 0 && memcmp(a_t, fused_a_t, sizeof fused_a_t) == 0;",
                      "}", ""])
