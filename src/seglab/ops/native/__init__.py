"""seglab's few native kernels, compiled on first use with the machine's C compiler and loaded
with ctypes: `winograd_tiles.c`, Winograd's tile transforms, one pass over memory each;
`winograd_fused.c`, F(4x4) of few channels, transforms and products in one pass;
`winograd_filters.c`, the filters' transform in training, one pass each way; `polyphase.c`,
the interleave of a polyphase transposed convolution's phases;
`cross_entropy.c`, softmax cross-entropy and its gradient in one pass; `overlap.c`, the
overlap losses' sums from each pixel's softmax and their gradient, with cross-entropy's in the
same passes where a sum of losses shares them; `batch_norm.c`,
training's BatchNorm with the shortcut addition and ReLU after it, two passes each way;
`bilinear.c`, bilinearly upsampled maps added into a map in one pass, and class scores resized;
`mix_ffn.c`, SegFormer's Mix-FFN row by row, and linear layers over tokens; `mlp_head.c`,
SegFormer's decoder head row by row; `planar_conv.c`, 3x3 heads to few classes with vectors
along the pixels; `quantize.c`, float32 to uint8 levels for the int8 convolutions;
`attention.c`, attention of many queries over few keys and its backward (bf16 by AVX-512 BF16's pair products
where the processor has them); `common.c`, the threads they run on and their bf16 conversions.

Why compiled here, not shipped: the kernels are about 2500 lines of portable C that a compiler
vectorises for the processor it runs on (`-march=native`), it builds in a few seconds, once
(5 s on a 2-core Zen 4; then cached), and a package without binary wheels stays one
`pip install`. Where no compiler works the callers keep
their PyTorch path, which computes the same thing: `available()` says which is in use, and
`unavailable_reason()` why not.

The library is cached under `$SEGLAB_CACHE` (default `$XDG_CACHE_HOME/seglab` or
`~/.cache/seglab`), named by a hash of the source, the compiler's command and the processor's
flags, and written under a temporary name then renamed, so processes building it at once
(torchrun's workers) never load a half-written file. Each load marks its library as used (its
modification time); a new build removes the libraries no process has loaded for
`PRUNE_UNUSED_DAYS` (older source versions, other matrices; a cache shared by machines of
different processors keeps each one's library while it is in use). `SEGLAB_NATIVE=0` turns the
kernels off; any other reason they are missing is said once, as a warning.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from seglab.ops.native import specialise as _specialise

__all__ = ["ATTENTION_HEAD_MULTIPLE", "FUSED_CHANNELS_MULTIPLE", "MAX_CLASSES", "MAX_UPSAMPLED",
           "MIX_FFN_CHANNELS_MULTIPLE", "OVERLAP_MAX_CLASSES", "PLANAR_OUTS", "add_upsampled_", "attention",
           "available", "batch_norm_backward", "batch_norm_forward", "bf16_pairs", "compiled_in", "cross_entropy",
           "cross_entropy_overlap_sums", "depthwise_gelu", "depthwise_gelu_backward", "dequantize_rows", "gather_tiles",
           "interleave_phases", "interleave_phases_backward", "linear", "mix_ffn", "mlp_head", "overlap_sums",
           "overlap_sums_backward", "pair_rows", "planar_conv3x3", "quantize_rows_s8", "quantize_u8", "resize_bilinear",
           "resize_bilinear_backward", "scatter_tiles", "specialise", "unavailable_reason", "winograd_filters",
           "winograd_filters_backward", "winograd_fused"]

# Compiled as one translation unit, in this order (the kernels share common.c's threads).
_SOURCES = tuple(Path(__file__).with_name(name) for name in ("common.c", "winograd_tiles.c", "cross_entropy.c",
                                                                "overlap.c", "batch_norm.c", "bilinear.c",
                                                                "winograd_fused.c", "mix_ffn.c", "mlp_head.c",
                                                                "planar_conv.c", "quantize.c", "attention.c",
                                                                "depthwise_gelu.c", "winograd_filters.c",
                                                                "polyphase.c"))
_LIBRARY_PREFIXES = ("seglab_native-", "winograd_tiles-")  # the name, then the name of older versions
_FLAGS = ("-O3", "-fPIC", "-shared", "-pthread")
_NATIVE_FLAGS = ("-march=native",)  # the processor's vector width; dropped where the compiler refuses it
_COMPILE_SECONDS = 120
PRUNE_UNUSED_DAYS = 30
MAX_SIDE = 8  # of a matrix compiled in (winograd_tiles.c's LANES)
MAX_CLASSES = 1024  # cross_entropy.c's
OVERLAP_MAX_CLASSES = 1024  # overlap.c's: cross_entropy.c's MAX_CLASSES
MAX_UPSAMPLED = 8  # bilinear.c's
MIX_FFN_CHANNELS_MULTIPLE = 16  # mix_ffn's channels and hidden channels: whole 16-float vectors
PLANAR_OUTS = 7  # planar_conv3x3: its weights come in register blocks of this many outputs
FUSED_CHANNELS_MULTIPLE = 16  # winograd_fused's output channels: whole vectors (of 16 or 8 floats)
# Modules whose import registers matrices to compile in (`specialise`): imported before the
# first build, so that a process whose first native call is another kernel (cross-entropy,
# from `seglab.losses` alone) still builds Winograd's own kernels.
_REGISTERING_MODULES = ("seglab.ops.winograd", "seglab.ops.winograd_nearest")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None  # why there is no library; None until the first attempt
# Compiled-in matrices: the transforms' kernels' each, and winograd_fused's B^T and A^T.
_known: dict[str, list[tuple[tuple[float, ...], ...]]] = {"gather": [], "scatter": [], "fused": []}


def specialise(gathers: tuple[torch.Tensor, ...] = (), scatters: tuple[torch.Tensor, ...] = (),
               fused: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Compile these matrices into kernels of their own (`specialise.py`: zeros skipped, sign
    pairs shared), used whenever `gather_tiles` / `scatter_tiles` get a matrix with the same
    float32 bits; `fused`, F(4x4)'s B^T (6 x 6) and A^T (4 x 6), into `winograd_fused` (the
    first pair registered). Winograd's transforms register theirs at import. Only matrices
    registered before the library is first built or loaded take effect: each set gets a
    library of its own in the cache."""
    for matrix in (*gathers, *scatters):
        if matrix.dim() != 2 or max(matrix.shape) > MAX_SIDE or min(matrix.shape) < 1:
            raise ValueError(f"a native kernel takes matrices of sides 1 to {MAX_SIDE}, not {tuple(matrix.shape)}")
    if fused is not None and (tuple(fused[0].shape), tuple(fused[1].shape)) != ((6, 6), (4, 6)):
        raise ValueError(f"winograd_fused takes F(4x4)'s 6 x 6 B^T and 4 x 6 A^T, not matrices of shapes "
                         f"{tuple(fused[0].shape)} and {tuple(fused[1].shape)}")
    if _library is not None or _reason is not None:
        return
    for kind, matrices in (("gather", gathers), ("scatter", scatters)):
        for matrix in matrices:
            rows = _rows(matrix)
            if rows not in _known[kind]:
                _known[kind].append(rows)
    if fused is not None and not _known["fused"]:
        _known["fused"] += [_rows(fused[0]), _rows(fused[1])]


def _rows(matrix: torch.Tensor) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(row) for row in matrix.detach().float().tolist())


def _full_source() -> str:
    kernels = "\n".join(source.read_text() for source in _SOURCES)
    fused = _known["fused"] or [None, None]
    return (kernels + "\n" + _specialise.kernels(_known["gather"], _known["scatter"]) + "\n"
            + _specialise.fused_maps(*fused))


def _cache_dir() -> Path:
    if os.environ.get("SEGLAB_CACHE"):
        return Path(os.environ["SEGLAB_CACHE"]) / "native"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seglab" / "native"


def _processor_flags() -> str:
    """What `-march=native` compiles for: the processor's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, source: str, target: Path) -> str | None:
    """Builds the library at `target` (atomically); returns None, or why it could not."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in (_FLAGS + _NATIVE_FLAGS, _FLAGS):
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, "-o", partial, "-x", "c", "-"], input=source,
                                  capture_output=True, text=True, timeout=_COMPILE_SECONDS)
            if done.returncode == 0:
                os.replace(partial, target)
                return None
            errors.append(done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"])
        except (OSError, subprocess.SubprocessError) as error:
            errors.append([str(error)])
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return f"{compiler} failed: {errors[0][0]}"


def _prune(directory: Path, keep: Path) -> None:
    """Removes the libraries beside `keep` that no process loaded for `PRUNE_UNUSED_DAYS`."""
    cutoff = time.time() - PRUNE_UNUSED_DAYS * 86400
    for library in (library for prefix in _LIBRARY_PREFIXES for library in directory.glob(f"{prefix}*.so")):
        try:
            if library != keep and library.stat().st_mtime < cutoff:
                library.unlink()
        except OSError:  # another process's, or removed meanwhile
            pass


def _load() -> ctypes.CDLL | None:
    library = _library
    if library is not None:  # every Winograd call asks: no lock once loaded
        return library
    with _lock:
        first = _reason is None
        library = _load_once()
    if library is None and first and not _reason.startswith("turned off"):
        warnings.warn(f"seglab's native kernels are not available ({_reason}); PyTorch's operators compute "
                      "the same instead (Winograd's transforms, cross-entropy), more slowly", RuntimeWarning,
                      stacklevel=3)
    return library


def _load_once() -> ctypes.CDLL | None:
    """Builds (or finds in the cache) and loads the library, once; the caller holds the lock."""
    global _library, _reason
    if _library is not None or _reason is not None:
        return _library
    if os.environ.get("SEGLAB_NATIVE", "1") == "0":
        _reason = "turned off by SEGLAB_NATIVE=0"
        return None
    for module in _REGISTERING_MODULES:
        importlib.import_module(module)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        _reason = "no C compiler found (set CC)"
        return None
    source = _full_source()
    key = hashlib.sha256("\n".join([source, compiler, " ".join(_FLAGS + _NATIVE_FLAGS),
                                    platform.machine(), _processor_flags()]).encode()).hexdigest()[:16]
    try:
        target = _cache_dir() / f"{_LIBRARY_PREFIXES[0]}{key}.so"
        if not target.exists():
            _reason = _compile(compiler, source, target)
            if _reason is None:
                _prune(target.parent, target)
        else:
            with contextlib.suppress(OSError):  # (a read-only cache: nothing to prune there either)
                os.utime(target)  # in use: kept by the pruning of other builds
    except (OSError, RuntimeError) as error:  # an unwritable cache, no home directory
        _reason = f"cannot build in the cache ({error}; set SEGLAB_CACHE)"
    if _reason is not None:
        return None
    try:
        library = ctypes.CDLL(str(target))
    except OSError as error:
        _reason = f"cannot load {target}: {error}"
        return None
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.seglab_gather.argtypes = [pointer, pointer, pointer, i32, i32, i64, i64, i64, i64, i32, i32, i64, i64,
                                      i32, i32, i32]
    library.seglab_scatter.argtypes = [pointer, pointer, pointer, pointer, pointer, i32, i32, i32, i64, i64, i64,
                                       i64, i64, i64, i64, i64, i32, i32, i32, i32, i32, i32]
    library.seglab_compiled_in.argtypes = [i32, i32, i32, pointer]
    library.seglab_cross_entropy.argtypes = [pointer, pointer, pointer, pointer, i64, i64, i64, i32, i32, pointer]
    library.seglab_cross_entropy.restype = i32
    library.seglab_overlap_sums.argtypes = [pointer, pointer, pointer, i64, i64, i64, i64, i32, i32, i32, pointer,
                                            pointer]
    library.seglab_overlap_sums_backward.argtypes = [pointer] * 5 + [ctypes.c_float, pointer] + [i64] * 4 + [i32] * 3
    library.seglab_overlap_sums.restype = library.seglab_overlap_sums_backward.restype = i32
    library.seglab_batch_norm_forward.argtypes = [pointer, pointer, pointer, pointer, pointer, pointer, pointer,
                                                  ctypes.c_double, ctypes.c_double, i64, i64, i32, i32, i32, pointer,
                                                  pointer, pointer, pointer]
    library.seglab_batch_norm_backward.argtypes = [pointer, pointer, pointer, pointer, pointer, pointer, pointer,
                                                   pointer, pointer, pointer, i64, i64, i32, i32, i32, pointer, pointer]
    library.seglab_batch_norm_forward.restype = library.seglab_batch_norm_backward.restype = i32
    library.seglab_add_upsampled.argtypes = [pointer, pointer, pointer, pointer, i32, i64, i64, i64, i64, i32, i32,
                                             i32]
    library.seglab_add_upsampled.restype = i32
    library.seglab_resize_bilinear.argtypes = [pointer, pointer, i64, i64, i64, i64, i64, i64, i32]
    library.seglab_resize_bilinear_backward.argtypes = library.seglab_resize_bilinear.argtypes
    library.seglab_resize_bilinear.restype = library.seglab_resize_bilinear_backward.restype = i32
    library.seglab_winograd_fused.argtypes = [pointer] * 7 + [i32, i64, i64, i64, i64, i64, i32]
    library.seglab_winograd_fused.restype = i32
    library.seglab_mix_ffn.argtypes = [pointer] * 4 + [ctypes.c_float] + [pointer] * 7 + [i64] * 5 + [i32, i32]
    library.seglab_mix_ffn.restype = i32
    library.seglab_linear.argtypes = [pointer] * 5 + [i64, i64, i64, i32]
    library.seglab_linear.restype = i32
    library.seglab_attention.argtypes = [pointer] * 4 + [i64] * 5 + [ctypes.c_float, i32, i32]
    library.seglab_attention.restype = library.seglab_bf16_pairs.restype = i32
    library.seglab_attention_score_grads.argtypes = [pointer] * 7 + [i64] * 5 + [ctypes.c_float, i64, i32]
    library.seglab_attention_score_grads.restype = i32
    library.seglab_bf16_pairs.argtypes = []
    library.seglab_depthwise_gelu.argtypes = [pointer] * 5 + [i64] * 4 + [i32, i32]
    library.seglab_depthwise_gelu_backward.argtypes = [pointer] * 6 + [i64] * 5 + [i32, i32]
    library.seglab_depthwise_gelu.restype = library.seglab_depthwise_gelu_backward.restype = i32
    library.seglab_mlp_head.argtypes = [pointer] * 7 + [i32, pointer, pointer, i64, i64, i64, i64, i64, i64, i64,
                                                        i32, i32]
    library.seglab_mlp_head.restype = i32
    library.seglab_planar_conv3x3.argtypes = [pointer] * 4 + [i64] * 6 + [i32, i32]
    library.seglab_planar_conv3x3.restype = i32
    library.seglab_gather.restype = library.seglab_scatter.restype = library.seglab_compiled_in.restype = i32
    library.seglab_quantize_u8.argtypes = [pointer, pointer, i64, ctypes.c_float, i32, i32]
    library.seglab_quantize_rows_s8.argtypes = [pointer] * 3 + [i64] * 3 + [i32]
    library.seglab_dequantize_rows.argtypes = [pointer] * 5 + [i64, i64, i32, i32]
    library.seglab_interleave_phases.argtypes = [pointer] * 2 + [i64] * 6 + [i32, i32]
    library.seglab_winograd_filters.argtypes = [pointer] * 3 + [i64] * 7 + [i32, i32]
    library.seglab_winograd_filters_backward.argtypes = [pointer] * 3 + [i64] * 7 + [i32, i32]
    library.seglab_use_openmp.argtypes = [pointer, pointer, pointer]
    openmp = _torch_openmp()
    if openmp is not None:
        library.seglab_use_openmp(*openmp)
    _library = library
    return library


def _torch_openmp() -> tuple[int, int, int] | None:
    """The addresses of GOMP_parallel, omp_get_thread_num and omp_get_num_threads in the OpenMP
    runtime this process's PyTorch runs on (found among the loaded libraries), or None: then
    the kernels start threads of their own."""
    if "OpenMP" not in torch.__config__.parallel_info().split("parallel backend:")[-1]:
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:  # not Linux
        return None
    # PyTorch's own copy first, where another library loaded a second runtime.
    torch_dir = str(Path(torch.__file__).parent)
    for path in sorted(paths, key=lambda path: (not path.startswith(torch_dir), path)):
        if Path(path).name.startswith(("libgomp", "libomp", "libiomp5")):
            try:
                runtime = ctypes.CDLL(path)  # already loaded: the same instance
                return tuple(ctypes.cast(getattr(runtime, name), ctypes.c_void_p).value
                             for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads"))
            except (OSError, AttributeError):
                continue
    return None


def available() -> bool:
    """Whether the native kernels are built and loaded (building them on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why the native kernels are not in use, or None when they are."""
    _load()
    return _reason


def _required() -> ctypes.CDLL:
    """The library, for the kernels' wrappers: a RuntimeError saying why where there is none."""
    library = _load()
    if library is None:
        raise RuntimeError(f"seglab's native kernels are not available: {_reason}")
    return library


def _check(tensor: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...] = (torch.float32,), *,
           contiguous: bool = True) -> None:
    if tensor.device.type != "cpu" or tensor.dtype not in dtypes or (contiguous and not tensor.is_contiguous()):
        kinds = " or ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        layout = "contiguous " if contiguous else ""
        raise ValueError(f"{name} must be a {layout}{kinds} CPU tensor, not {tensor.dtype} on "
                         f"{tensor.device} with strides {tensor.stride()}")


# The maps and tiles the kernels read and write: float32, or bf16 (transformed in float32).
_VALUES = (torch.float32, torch.bfloat16)


def _planes(count: int, windows: int, channels: int, like: torch.Tensor) -> torch.Tensor:
    """An empty count x windows x channels tensor like `like`, each plane's rows contiguous (as
    `torch.bmm` takes them) and, in float32, the planes a whole number of cache lines apart,
    that number 2 modulo 4; bf16 planes are contiguous.

    Why not contiguous: `gather_tiles` writes all its planes at once, a few channels of one
    window in each. Contiguous planes of a power-of-two size (64 windows of 256 channels, 16
    of 512: a U-Net's or a ResNet's deep stages) start at addresses equal modulo 4 KiB, so the
    36 or 64 lines being written fall in one set of the L1 cache, which holds 8 to 12, and evict
    each other; sizes of a few lines modulo 64 lines crowd a few sets the same way. Planes 2
    (mod 4) lines apart spread over 32 sets. On a 2-core Xeon (AVX-512), interleaved medians of
    the input transform: F(4x4) on 32 x 32 x 256 and 16 x 16 x 512 1.22-1.60x faster, 4 x 64 x
    64 x 256 1.22x; F(6x6) on 128 x 128 x 64 1.02-1.11x, 64 x 64 x 128 1.04-1.18x; bf16 F(2x2)
    (16 planes) 4 x 32 x 32 x 256 1.32x, 4 x 64 x 64 x 256 1.46x, 32 x 32 x 512 1.65x. An odd
    number of lines (all 64 sets) gained as much on the powers of two but lost up to 0.8x on
    F(6x6)'s 64 planes of 64 x 64 x 128. Whole float32 models moved within noise (UNet-R34
    1.01-1.02x, DeepLabV3+-R34 0.99x).

    Why not in bf16: oneDNN's bf16 batched products read planes at any other distance apart
    slowly. On an AVX-512 BF16 Zen 4 the filters' gradient of 16 planes of 4,096 windows x 256
    channels (`torch.bmm` of the transposed tiles) took 55-62 ms spaced against 24-26 ms
    contiguous, and bf16 training steps at 512 x 512 ran PSPNet-R34 at output stride 8 1.13x
    faster with contiguous planes (DeepLabV3+-R34 1.03x, UNet-R34 1.02x, FCN-R50 and
    DeepLabV3-R50 1.00x), inference 1.00-1.06x (docs/bench.md)."""
    if like.dtype == torch.bfloat16:
        return like.new_empty(count, windows, channels)
    line = 64 // like.element_size()
    lines = -(-(windows * channels) // line)
    stride = (lines + (2 - lines) % 4) * line
    storage = like.new_empty(max((count - 1) * stride + windows * channels, 0))
    return storage.as_strided((count, windows, channels), (stride, channels, 1))


def _check_planes(tiles: torch.Tensor) -> None:
    """Tiles as `_planes` lays them out (or contiguous): each plane's rows contiguous."""
    if tiles.dim() != 3:
        raise ValueError(f"the tiles must be planes x windows x channels, not of shape {tuple(tiles.shape)}")
    _, windows, channels = tiles.shape
    if tiles.stride(2) != 1 or tiles.stride(1) != channels or tiles.stride(0) < windows * channels:
        raise ValueError(f"the tiles' planes must each be contiguous, not of strides {tiles.stride()}")


def compiled_in(matrix: torch.Tensor, kind: str = "gather") -> bool:
    """Whether `kind` ("gather" or "scatter") runs `matrix` by a kernel with it compiled in."""
    library = _load()
    if library is None:
        return False
    _check(matrix, "the matrix")
    out_side, in_side = matrix.shape
    return bool(library.seglab_compiled_in(int(kind == "scatter"), out_side, in_side, matrix.data_ptr()))


def _phase_grid(height: int, width: int, step: int, dilation: int) -> tuple[int, int]:
    """Windows per (image, phase) along each axis: ceil(ceil(side / dilation) / step), the
    largest phase's (ceil(side / dilation) pixels) at a stride of `step`."""
    if dilation < 1:
        raise ValueError(f"the dilation must be at least 1, not {dilation}")

    def ceil_div(a: int, b: int) -> int:
        return -(-a // b)

    return ceil_div(ceil_div(height, dilation), step), ceil_div(ceil_div(width, dilation), step)


def gather_tiles(nhwc: torch.Tensor, matrix: torch.Tensor, step: int, pad: int, *, dilation: int = 1,
                 specialised: bool = True) -> torch.Tensor:
    """`L D L^T` for every in_side x in_side window D of the channels-last map `nhwc`
    (N x H x W x C) at a stride of `step`, starting `pad` pixels before the map (zeros outside
    it), over ceil(H / step) x ceil(W / step) windows per image; `matrix` L is out_side x
    in_side. With `dilation` d the windows are those of each of the map's d x d phases (the
    pixels (d y + p, d x + q) of phase (p, q), ceil(H / d) x ceil(W / d) of them, zeros beyond
    the map), ordered by image, phase, window: a d-dilated convolution's. Returns
    out_side^2 x windows x C in `nhwc`'s dtype: float32, or bf16 (read, transformed in float32
    and rounded to bf16 in one pass), its planes apart in memory (`_planes`; `torch.bmm` and
    `scatter_tiles` take them as they are). A matrix registered with `specialise` runs by its
    own kernel unless `specialised` is False."""
    library = _required()
    _check(nhwc, "the map", _VALUES)
    _check(matrix, "the matrix")
    n, height, width, channels = nhwc.shape
    out_side, in_side = matrix.shape
    rows, cols = _phase_grid(height, width, step, dilation)
    windows = n * dilation * dilation * rows * cols
    out = _planes(out_side * out_side, windows, channels, nhwc)
    if library.seglab_gather(nhwc.data_ptr(), out.data_ptr(), matrix.data_ptr(), out_side, in_side, n, height,
                             width, channels, step, pad, dilation, out.stride(0), torch.get_num_threads(),
                             int(specialised), int(nhwc.dtype == torch.bfloat16)) != 0:
        raise ValueError(f"no native kernel for {out_side} x {in_side} transforms")
    return out


def scatter_tiles(tiles: torch.Tensor, matrix: torch.Tensor, shape: tuple[int, int, int], step: int, pad: int,
                  bias: torch.Tensor | None = None, accumulate_into: torch.Tensor | None = None, *,
                  residual: torch.Tensor | None = None, relu: bool = False, dilation: int = 1,
                  specialised: bool = True) -> torch.Tensor:
    """The transpose of `gather_tiles`' layout: `L T L^T` for every tile T of `tiles`
    (in_side^2 x windows x C, over the same ceil(H / step) x ceil(W / step) windows per image;
    contiguous, or each plane contiguous as `gather_tiles` returns them) placed on an N x H x W x C
    channels-last map (`shape` = (N, H, W)) at (step r - pad, step q - pad), cropped to the map.
    Written to a new map plus `bias` (float32) plus `residual` (a contiguous N x H x W x C map
    of the tiles' dtype), then their ReLU with `relu` (a convolution's epilogue in the same
    pass); or, where windows overlap, added into `accumulate_into`. The map has the tiles' dtype
    (float32 or bf16, transformed in float32). `dilation` and `specialised` as for
    `gather_tiles` (with dilation d, the windows of each of the map's d x d phases)."""
    library = _required()
    _check(tiles, "the tiles", _VALUES, contiguous=False)
    _check_planes(tiles)
    _check(matrix, "the matrix")
    out_side, in_side = matrix.shape
    n, height, width = shape
    grid = _phase_grid(height, width, step, dilation)
    if tuple(tiles.shape[:2]) != (in_side * in_side, n * dilation * dilation * grid[0] * grid[1]):
        phases = f" x {dilation * dilation} phases" if dilation > 1 else ""
        raise ValueError(f"tiles of shape {tuple(tiles.shape)} do not fit {in_side} x {in_side} tiles on a "
                         f"{n}{phases} x {grid[0]} x {grid[1]} grid")
    if out_side > step and accumulate_into is None:
        raise ValueError("overlapping windows are added into a map (accumulate_into)")
    if accumulate_into is not None and (residual is not None or relu):
        raise ValueError("a residual or a ReLU goes with written values, not with accumulate_into")
    if residual is not None:
        _check(residual, "the residual", (tiles.dtype,))
        if tuple(residual.shape) != (n, height, width, tiles.shape[-1]):
            raise ValueError(f"a residual of shape {tuple(residual.shape)} does not fit the "
                             f"{n} x {height} x {width} x {tiles.shape[-1]} map")
    if accumulate_into is not None:
        _check(accumulate_into, "the map to add into", (tiles.dtype,))
        if tuple(accumulate_into.shape) != (n, height, width, tiles.shape[-1]):
            raise ValueError(f"cannot add {tiles.shape[-1]}-channel tiles into a map of shape "
                             f"{tuple(accumulate_into.shape)}")
        out = accumulate_into
    else:
        out = tiles.new_empty(n, height, width, tiles.shape[-1])
    if bias is not None:
        _check(bias, "the bias")
    if library.seglab_scatter(tiles.data_ptr(), out.data_ptr(), matrix.data_ptr(),
                              None if bias is None else bias.data_ptr(), _pointer(residual), int(relu),
                              out_side, in_side, n, height, width,
                              tiles.shape[-1], grid[0], grid[1], dilation, tiles.stride(0), step, pad,
                              int(accumulate_into is not None),
                              torch.get_num_threads(), int(specialised), int(tiles.dtype == torch.bfloat16)) != 0:
        raise ValueError(f"no native kernel for {out_side} x {in_side} transforms")
    return out


def _even_stride(stride: int) -> None:
    if stride < 2 or stride % 2:
        raise ValueError(f"the phases interleave at an even stride, not {stride}")


def _phase_map_shape(phases: torch.Tensor, stride: int) -> tuple[int, int, int, int]:
    """N, C, H, W of a polyphase convolution's phase map (N x s*s*C x (H + 1) x (W + 1)), checked
    as `interleave_phases` reads it: channels-last, an even stride of at least 2."""
    _even_stride(stride)
    if (phases.dim() != 4 or phases.shape[1] % (stride * stride) or min(phases.shape[2:]) < 2
            or phases.shape[1] == 0 or phases.device.type != "cpu"):
        raise ValueError(f"a phase map of stride {stride} is N x {stride * stride}*C x (H + 1) x (W + 1) on the CPU, "
                         f"not of shape {tuple(phases.shape)} on {phases.device}")
    if not phases.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"the phase map must be channels-last, not of strides {phases.stride()}")
    return phases.shape[0], phases.shape[1] // (stride * stride), phases.shape[2] - 1, phases.shape[3] - 1


def interleave_phases(phases: torch.Tensor, stride: int) -> torch.Tensor:
    """The N x C x sH x sW output (channels-last, phases' dtype) of a polyphase transposed
    convolution from its phase map (`seglab.ops.polyphase`), cropped by s/2 phases on each
    border, in one pass of contiguous runs (`polyphase.c`)."""
    library = _required()
    n, channels, height, width = _phase_map_shape(phases, stride)
    out = torch.empty(n, channels, height * stride, width * stride, dtype=phases.dtype,
                      memory_format=torch.channels_last)
    library.seglab_interleave_phases(phases.data_ptr(), out.data_ptr(), n, height, width, stride, channels,
                                     phases.element_size(), 0, torch.get_num_threads())
    return out


def interleave_phases_backward(grad: torch.Tensor, stride: int) -> torch.Tensor:
    """The phase map's gradient from the output's (`interleave_phases`, reversed): each phase's
    values where the output has them, zeros where the crop dropped them; channels-last."""
    library = _required()
    _even_stride(stride)
    if grad.dim() != 4 or grad.shape[2] % stride or grad.shape[3] % stride or grad.device.type != "cpu":
        raise ValueError(f"an output of stride {stride} is N x C x {stride}H x {stride}W on the CPU, "
                         f"not of shape {tuple(grad.shape)} on {grad.device}")
    if not grad.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"the output's gradient must be channels-last, not of strides {grad.stride()}")
    n, channels, height, width = grad.shape[0], grad.shape[1], grad.shape[2] // stride, grad.shape[3] // stride
    phases = torch.empty(n, stride * stride * channels, height + 1, width + 1, dtype=grad.dtype,
                         memory_format=torch.channels_last)
    library.seglab_interleave_phases(phases.data_ptr(), grad.data_ptr(), n, height, width, stride, channels,
                                     grad.element_size(), 1, torch.get_num_threads())
    return phases


def _filter_inputs(function: str, weight_shape: torch.Size | tuple[int, ...], matrix: torch.Tensor) -> tuple[int, int]:
    """The output and input channels of a C_out x C_in x 3 x 3 weight, checked with Winograd's
    R x 9 filter matrix (float32, contiguous)."""
    _check(matrix, "the filter matrix")
    if len(weight_shape) != 4 or tuple(weight_shape[2:]) != (3, 3) or min(weight_shape) < 1:
        raise ValueError(f"{function} takes a C_out x C_in x 3 x 3 weight, not of shape {tuple(weight_shape)}")
    if matrix.dim() != 2 or matrix.shape[1] != 9:
        raise ValueError(f"{function} takes an R x 9 filter matrix, not of shape {tuple(matrix.shape)}")
    return weight_shape[0], weight_shape[1]


def winograd_filters(weight: torch.Tensor, matrix: torch.Tensor, *, bf16: bool = False) -> torch.Tensor:
    """Winograd's filters `matrix @ taps` of every 3x3 filter of the float32 `weight` (C_out x
    C_in x 3 x 3, any strides; `matrix` R x 9), as R x C_in x C_out, in one pass
    (`winograd_filters.c`): float32, or with `bf16` from taps rounded to bf16, written as bf16
    (what the product of autocast's bf16 weight gives)."""
    library = _required()
    out_channels, in_channels = _filter_inputs("winograd_filters", weight.shape, matrix)
    _check(weight, "the weight", contiguous=False)
    out = weight.new_empty(matrix.shape[0], in_channels, out_channels, dtype=torch.bfloat16 if bf16 else torch.float32)
    library.seglab_winograd_filters(out.data_ptr(), weight.data_ptr(), matrix.data_ptr(), matrix.shape[0],
                                    out_channels, in_channels, *weight.stride(), int(bf16), torch.get_num_threads())
    return out


def winograd_filters_backward(grad: torch.Tensor, matrix: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The gradient of `winograd_filters`'s weight from `grad` (R x C_in x C_out, contiguous;
    bf16 when the filters were), written to `out` (float32, the weight's shape, any strides)
    and returned, in one pass: each tap's `matrix^T @ grad`, rounded to bf16 for bf16 filters
    (the gradient of the bf16 weight they came from)."""
    library = _required()
    out_channels, in_channels = _filter_inputs("winograd_filters_backward", out.shape, matrix)
    _check(out, "the weight's gradient", contiguous=False)
    _check(grad, "the filters' gradient", _VALUES)
    if tuple(grad.shape) != (matrix.shape[0], in_channels, out_channels):
        raise ValueError(f"the filters' gradient must be {matrix.shape[0]} x {in_channels} x {out_channels}, "
                         f"not of shape {tuple(grad.shape)}")
    library.seglab_winograd_filters_backward(out.data_ptr(), grad.data_ptr(), matrix.data_ptr(), matrix.shape[0],
                                             out_channels, in_channels, *out.stride(),
                                             int(grad.dtype == torch.bfloat16), torch.get_num_threads())
    return out


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_index: int = -100, *, gradient: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax cross-entropy of `logits` (pixels x classes, float32 or bf16) against `target`
    (pixels, int64), PyTorch's mean reduction (weighted by `weight[target]` when given, pixels
    whose target is `ignore_index` left out; 0 when none is left), computed in float32.
    Returns the loss (a float32 scalar) and, with `gradient`, its gradient with respect to the
    logits, in their dtype, from the same pass."""
    library = _required()
    _check(logits, "the logits", _VALUES)
    _check(target, "the target", (torch.int64,))
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"cross-entropy takes pixels x classes logits and one target per pixel, not "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if weight is not None:
        _check(weight, "the class weights")
        if weight.shape != logits.shape[1:]:
            raise ValueError(f"{weight.numel()} class weights for {logits.shape[1]} classes")
    grad = torch.empty_like(logits) if gradient else None
    result = (ctypes.c_double * 2)()
    status = library.seglab_cross_entropy(logits.data_ptr(), target.data_ptr(),
                                          None if weight is None else weight.data_ptr(),
                                          None if grad is None else grad.data_ptr(), logits.shape[0],
                                          logits.shape[1], ignore_index, int(logits.dtype == torch.bfloat16),
                                          torch.get_num_threads(), result)
    if status == -1:
        raise ValueError(f"the native cross-entropy takes 1 to {MAX_CLASSES} classes, not {logits.shape[1]}")
    if status == -2:
        raise ValueError(f"target class outside 0..{logits.shape[1] - 1} (and not ignore_index={ignore_index})")
    if status != 0:
        raise MemoryError("the native cross-entropy could not allocate its chunk sums")
    return torch.tensor(result[0], dtype=torch.float32), grad



def _overlap_inputs(function: str, logits: torch.Tensor, target: torch.Tensor,
                    weight: torch.Tensor | None = None) -> tuple[int, int, int]:
    """(images, pixels per image, classes) of `overlap.c`'s N x S x K logits, N x S target and
    class weights (K float32, or None), checked."""
    _check(logits, "the logits", _VALUES)
    _check(target, "the target", (torch.int64,))
    if weight is not None:
        _check(weight, "the class weights")
        if tuple(weight.shape) != (logits.shape[-1],):
            raise ValueError(f"{function} takes one class weight per class ({logits.shape[-1]}), not shape "
                             f"{tuple(weight.shape)}")
    if logits.dim() != 3 or tuple(target.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"{function} takes N x S x K logits and an N x S target, not {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    images, pixels, classes = logits.shape
    if not 1 <= classes <= OVERLAP_MAX_CLASSES:
        raise ValueError(f"{function} takes 1 to {OVERLAP_MAX_CLASSES} classes, not {classes}")
    return images, pixels, classes


def overlap_sums(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None, *,
                 squared: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The soft overlap losses' sums per image and class from `logits` (N x S x K: each image's
    pixels, each pixel's K classes contiguous; float32 or bf16) and `target` (N x S, int64),
    by `overlap.c` in one pass: <Y, P> (each counted pixel's softmax probability of its target
    class, added to that class), |P| (the probabilities summed, squared first with `squared`)
    and |Y| (counted pixels per class), each N x K float32, summed in float64. Pixels whose
    target is `ignore_index` are not counted; any other target outside 0..K-1 is refused."""
    return _overlap_pass("overlap_sums", logits, target, ignore_index, squared)[:3]


def cross_entropy_overlap_sums(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                               ignore_index: int | None = None, *, squared: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`overlap_sums` and, in the same pass, softmax cross-entropy's mean loss and W (the
    summed weights of the counted pixels; `weight` float32, one per class, or None for 1s), as
    `cross_entropy` computes them: (loss, W, <Y, P>, |P|, |Y|), the first two float64 scalars,
    the loss 0 where W is 0."""
    return _overlap_pass("cross_entropy_overlap_sums", logits, target, ignore_index, squared, weight, True)


def _overlap_pass(function: str, logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None,
                  squared: bool, weight: torch.Tensor | None = None, cross_entropy: bool = False
                  ) -> tuple[torch.Tensor, ...]:
    images, pixels, classes = _overlap_inputs(function, logits, target, weight)
    sums = torch.zeros(images, 3, classes, dtype=torch.float64)
    loss_and_counted = torch.zeros(2, dtype=torch.float64)
    if logits.numel():
        status = _required().seglab_overlap_sums(logits.data_ptr(), target.data_ptr(), _pointer(weight), images,
                                                 pixels, classes, _ignored_target(ignore_index),
                                                 int(logits.dtype == torch.bfloat16), int(squared),
                                                 torch.get_num_threads(), sums.data_ptr(),
                                                 loss_and_counted.data_ptr() if cross_entropy else None)
        if status == -2:
            suffix = "" if ignore_index is None else f" (and not ignore_index={ignore_index})"
            raise ValueError(f"target class outside 0..{classes - 1}{suffix}")
        if status != 0:
            raise MemoryError(f"{function} could not allocate its chunk sums")
    intersection, predicted, actual = (term.contiguous() for term in sums.float().unbind(1))
    if not cross_entropy:
        return intersection, predicted, actual
    total, counted = loss_and_counted.unbind()
    loss = total / counted if counted > 0 else total.new_zeros(())
    return loss, counted, intersection, predicted, actual


def overlap_sums_backward(logits: torch.Tensor, target: torch.Tensor, grad_intersection: torch.Tensor,
                          grad_predicted: torch.Tensor, ignore_index: int | None = None, *,
                          squared: bool = False, cross_entropy_scale: float = 0.0,
                          weight: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of `overlap_sums`' <Y, P> and |P| with respect to the logits, from theirs
    (`grad_intersection`, `grad_predicted`: N x K), the softmax recomputed from the logits (one
    pass, `overlap.c`): N x S x K in the logits' dtype, computed in float32. With
    `cross_entropy_scale` s (not 0), plus the gradient of s W times cross-entropy's mean loss
    (`cross_entropy_overlap_sums`; class weights `weight`): s w_t (p - onehot(t)) per pixel,
    rounded once with the rest."""
    function = "overlap_sums_backward"
    images, pixels, classes = _overlap_inputs(function, logits, target, weight)
    gradients = [g.detach().to(torch.float32).contiguous() for g in (grad_intersection, grad_predicted)]
    for g in gradients:
        if tuple(g.shape) != (images, classes):
            raise ValueError(f"{function} takes {images} x {classes} gradients of the sums, not {tuple(g.shape)}")
    grad = torch.empty_like(logits)
    if logits.numel():
        _required().seglab_overlap_sums_backward(logits.data_ptr(), target.data_ptr(), gradients[0].data_ptr(),
                                                 gradients[1].data_ptr(), _pointer(weight), float(cross_entropy_scale),
                                                 grad.data_ptr(), images, pixels, classes,
                                                 _ignored_target(ignore_index), int(logits.dtype == torch.bfloat16),
                                                 int(squared), torch.get_num_threads())
    return grad


def _ignored_target(ignore_index: int | None) -> int:
    """overlap.c's `ignore`: a target value no pixel has where nothing is ignored (below -2^62)."""
    return -(2 ** 63) if ignore_index is None else int(ignore_index)


# BatchNorm in training on channels-last maps, as rows (N H W) x channels (batch_norm.c).

def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _norm_maps(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    _check(x, "the map", _VALUES)
    if x.dim() != 2:
        raise ValueError(f"the map must be rows x channels, not of shape {tuple(x.shape)}")
    for name, tensor in others.items():
        if tensor is not None:
            _check(tensor, name, (x.dtype,))
            if tensor.shape != x.shape:
                raise ValueError(f"{name} must be rows x channels like the map, not of shape {tuple(tensor.shape)}")


def _norm_vectors(channels: int, **vectors: torch.Tensor | None) -> None:
    for name, vector in vectors.items():
        if vector is not None:
            _check(vector, name)
            if vector.shape != (channels,):
                raise ValueError(f"{name} must have one entry per channel ({channels}), not shape {tuple(vector.shape)}")


def batch_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, *,
                       shortcut: torch.Tensor | None = None, relu: bool = False,
                       running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
                       momentum: float = 0.1, eps: float = 1e-5, out: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(BatchNorm(x) + shortcut) with the batch's statistics (without `relu`, without a
    `shortcut`: those left out), for `x` of rows x channels (float32 or bf16, at least one row;
    the shortcut alike), the norm's `weight` and `bias` float32 (None: 1 and 0). The running
    statistics, when given, are updated in place as nn.BatchNorm2d updates them with
    `momentum`. Returns y (x's dtype; written to `out` when given) and the 4 x channels float32
    rows the backward takes: the batch's mean, 1 / sqrt(var + eps), and the scale and shift of
    y = a x + b (+ shortcut)."""
    library = _required()
    _norm_maps(x, shortcut=shortcut, out=out)
    rows, channels = x.shape
    if rows < 1:
        raise ValueError("BatchNorm's statistics of a map without rows")
    _norm_vectors(channels, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    if (running_mean is None) != (running_var is None):
        raise ValueError("the running mean and variance go together")
    y = torch.empty_like(x) if out is None else out
    saved = torch.empty(4, channels)
    status = library.seglab_batch_norm_forward(
        x.data_ptr(), _pointer(shortcut), y.data_ptr(), _pointer(weight), _pointer(bias), _pointer(running_mean),
        _pointer(running_var), momentum, eps, rows, channels, int(relu), int(x.dtype == torch.bfloat16),
        torch.get_num_threads(), *(row.data_ptr() for row in saved))
    if status != 0:
        raise MemoryError("the native batch norm could not allocate its chunk sums")
    return y, saved


def batch_norm_backward(grad: torch.Tensor, x: torch.Tensor, saved: torch.Tensor, *, relu: bool = False,
                        y: torch.Tensor | None = None, input_gradient: bool = True,
                        out: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                        grad2: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The gradients of `batch_norm_forward` from `grad` (the output's), `x` and `saved` (its
    4 x channels rows). `y`, the forward's output, is given when it had a shortcut: the ReLU's
    mask is then read from y, else recomputed from x; with y, `grad2` is a second gradient of
    the output (its second use's), added to `grad` as the kernel reads them and rounded to the
    maps' dtype, as autograd's sum would be. Returns the gradients of x (None without
    `input_gradient`), of the shortcut (None without `y`), of the weight and of the bias; those
    of x and of the shortcut written to `out`'s tensors where given."""
    library = _required()
    _norm_maps(x, grad=grad, y=y, out=out[0], out_shortcut=out[1], grad2=grad2)
    if grad2 is not None and y is None:
        raise ValueError("a second output gradient goes with the forward's output y (a shortcut)")
    rows, channels = x.shape
    if saved.shape != (4, channels):
        raise ValueError(f"the forward's saved rows must be 4 x {channels}, not {tuple(saved.shape)}")
    _check(saved, "the forward's saved rows")
    grad_x = (torch.empty_like(x) if out[0] is None else out[0]) if input_gradient else None
    grad_shortcut = (torch.empty_like(x) if out[1] is None else out[1]) if y is not None else None
    grad_weight, grad_bias = torch.empty(2, channels)
    mean, inverse_std, scale, shift = (row.data_ptr() for row in saved)
    status = library.seglab_batch_norm_backward(
        grad.data_ptr(), _pointer(grad2), x.data_ptr(), _pointer(y), _pointer(grad_x), _pointer(grad_shortcut), scale,
        shift, mean, inverse_std, rows, channels, int(relu), int(x.dtype == torch.bfloat16), torch.get_num_threads(),
        grad_weight.data_ptr(), grad_bias.data_ptr())
    if status != 0:
        raise MemoryError("the native batch norm could not allocate its chunk sums")
    return grad_x, grad_shortcut, grad_weight, grad_bias


def _upsampled_parts(parts: list[torch.Tensor] | tuple[torch.Tensor, ...], n: int, channels: int,
                     dtype: torch.dtype) -> tuple[ctypes.Array, ctypes.Array, ctypes.Array]:
    """bilinear.c's maps to upsample, checked (at most `MAX_UPSAMPLED`, each n x h x w x
    `channels`, contiguous, of `dtype`): their addresses, heights and widths as C arrays."""
    if len(parts) > MAX_UPSAMPLED:
        raise ValueError(f"at most {MAX_UPSAMPLED} maps are added in one pass, not {len(parts)}")
    for index, part in enumerate(parts):
        _check(part, f"map {index} to upsample", (dtype,))
        if part.dim() != 4 or part.shape[0] != n or part.shape[3] != channels or min(part.shape[1:3]) < 1:
            raise ValueError(f"map {index} to upsample must be {n} x h x w x {channels}, not of shape "
                             f"{tuple(part.shape)}")
    return ((ctypes.c_void_p * MAX_UPSAMPLED)(*(part.data_ptr() for part in parts)),
            (ctypes.c_int64 * MAX_UPSAMPLED)(*(part.shape[1] for part in parts)),
            (ctypes.c_int64 * MAX_UPSAMPLED)(*(part.shape[2] for part in parts)))


def add_upsampled_(out: torch.Tensor, parts: list[torch.Tensor] | tuple[torch.Tensor, ...], *,
                   relu: bool = False) -> torch.Tensor:
    """out += the sum of `parts`, each bilinearly upsampled to out's size as
    `F.interpolate(part, size, mode="bilinear", align_corners=False)` upsamples it, then
    out = relu(out) with `relu`; in place, in one pass over `out` (`bilinear.c`). All are
    channels-last maps given as N x H x W x C tensors (contiguous), float32 or bf16 alike (bf16
    summed in float32 and rounded once), at most `MAX_UPSAMPLED` parts of out's N and C.
    Returns out."""
    library = _required()
    _check(out, "the map to add into", _VALUES)
    if out.dim() != 4:
        raise ValueError(f"the map to add into must be N x H x W x C, not of shape {tuple(out.shape)}")
    n, height, width, channels = out.shape
    sources, heights, widths = _upsampled_parts(parts, n, channels, out.dtype)
    if out.numel():
        library.seglab_add_upsampled(out.data_ptr(), sources, heights, widths, len(parts), n, height, width,
                                     channels, int(relu), torch.get_num_threads(), int(out.dtype == torch.bfloat16))
    return out


def resize_bilinear(nhwc: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """A channels-last float32 map (N x h x w x C, contiguous) bilinearly resized to `size` as
    `F.interpolate(map, size, mode="bilinear", align_corners=False)` resizes it (`bilinear.c`:
    one pass writing the result, made for few channels such as class scores): N x H x W x C,
    contiguous."""
    library = _required()
    _check(nhwc, "the map to resize", (torch.float32,))
    height, width = (int(side) for side in size)
    if nhwc.dim() != 4 or min(nhwc.shape[1:3]) < 1 or height < 0 or width < 0:
        raise ValueError(f"resize_bilinear takes an N x h x w x C map (h, w >= 1) and a size of two sides >= 0, "
                         f"not {tuple(nhwc.shape)} and {tuple(size)}")
    n, in_height, in_width, channels = nhwc.shape
    out = nhwc.new_empty(n, height, width, channels)
    if out.numel() and library.seglab_resize_bilinear(out.data_ptr(), nhwc.data_ptr(), n, in_height, in_width,
                                                      height, width, channels, torch.get_num_threads()):
        raise MemoryError("resize_bilinear: no memory for a thread's row buffers")
    return out


def resize_bilinear_backward(grad: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """The gradient of `resize_bilinear` from a map of `size` (h, w): for `grad` (N x H x W x C,
    float32, contiguous) the N x h x w x C map that `F.interpolate`'s backward gives (the same
    sums, added in another order; `bilinear.c`), reading `grad` once."""
    library = _required()
    _check(grad, "the gradient to resize back", (torch.float32,))
    in_height, in_width = (int(side) for side in size)
    if grad.dim() != 4 or in_height < 1 or in_width < 1:
        raise ValueError(f"resize_bilinear_backward takes an N x H x W x C gradient and a source size of two sides "
                         f">= 1, not {tuple(grad.shape)} and {tuple(size)}")
    n, height, width, channels = grad.shape
    if not grad.numel():  # nothing upsampled: no gradient reaches the source
        return grad.new_zeros(n, in_height, in_width, channels)
    out = grad.new_empty(n, in_height, in_width, channels)
    if library.seglab_resize_bilinear_backward(out.data_ptr(), grad.data_ptr(), n, in_height, in_width, height, width,
                                               channels, torch.get_num_threads()):
        raise MemoryError("resize_bilinear_backward: no memory for a thread's row buffers")
    return out



def winograd_fused(nhwc: torch.Tensor, filters: torch.Tensor, b_t: torch.Tensor, a_t: torch.Tensor, *,
                   bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                   relu: bool = False) -> torch.Tensor:
    """The stride-1 3x3 convolution (zero padding 1) of the channels-last float32 map `nhwc`
    (N x H x W x C_in, contiguous) by F(4x4, 3x3) in one pass (`winograd_fused.c`): `filters`
    in Winograd's domain (36 x C_in x C_out, contiguous, C_out a multiple of
    `FUSED_CHANNELS_MULTIPLE`), B^T `b_t` and A^T `a_t` the matrices registered with
    `specialise(fused=...)`, plus `bias` (C_out) and `residual` (N x H x W x C_out, contiguous),
    then the ReLU with `relu`. Returns N x H x W x C_out, contiguous."""
    library = _required()
    _check(nhwc, "the map")
    _check(filters, "the filters")
    _check(b_t, "B^T")
    _check(a_t, "A^T")
    if nhwc.dim() != 4 or filters.dim() != 3 or filters.shape[:2] != (36, nhwc.shape[-1]):
        raise ValueError(f"winograd_fused takes an N x H x W x C map and 36 x C x C_out filters, not shapes "
                         f"{tuple(nhwc.shape)} and {tuple(filters.shape)}")
    n, height, width, _ = nhwc.shape
    out_channels = filters.shape[-1]
    if out_channels % FUSED_CHANNELS_MULTIPLE:
        raise ValueError(f"winograd_fused takes a multiple of {FUSED_CHANNELS_MULTIPLE} output channels, "
                         f"not {out_channels}")
    if bias is not None:
        _check(bias, "the bias")
        if bias.shape != (out_channels,):
            raise ValueError(f"a bias of shape {tuple(bias.shape)} does not fit {out_channels} output channels")
    out = nhwc.new_empty(n, height, width, out_channels)
    if residual is not None:
        _check(residual, "the residual")
        if residual.shape != out.shape:
            raise ValueError(f"a residual of shape {tuple(residual.shape)} does not fit the output's {tuple(out.shape)}")
    if not out.numel():
        return out
    code = library.seglab_winograd_fused(out.data_ptr(), nhwc.data_ptr(), filters.data_ptr(), b_t.data_ptr(),
                                         a_t.data_ptr(), _pointer(bias), _pointer(residual), int(relu), n, height,
                                         width, nhwc.shape[-1], out_channels, torch.get_num_threads())
    if code == -1:
        raise MemoryError("winograd_fused: no memory for a thread's buffers")
    if code == -3:
        raise ValueError("winograd_fused: B^T and A^T are not the matrices compiled in (specialise(fused=...))")
    if code:
        raise ValueError(f"winograd_fused: {out_channels} output channels are not whole vectors")
    return out


def pair_rows(matrix: torch.Tensor) -> torch.Tensor:
    """A K x O matrix (K even) as the pair products read it: K / 2 x O x 2, each output's pair of
    consecutive rows adjacent, contiguous."""
    if matrix.dim() != 2 or matrix.shape[0] % 2:
        raise ValueError(f"pair_rows takes a matrix of an even number of rows, not shape {tuple(matrix.shape)}")
    return matrix.reshape(matrix.shape[0] // 2, 2, matrix.shape[1]).transpose(1, 2).contiguous()


def mix_ffn(tokens: torch.Tensor, height: int, width: int, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
            dw_weight: torch.Tensor, dw_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, *,
            norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None, eps: float = 1e-5,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """SegFormer's Mix-FFN, `fc2(GELU(dwconv3x3(fc1(norm(tokens))))) (+ residual)`, in one pass
    (`mix_ffn.c`): `tokens` N x (height * width) x C float32, contiguous (a map's rows one after
    another); norm the LayerNorm over C with `norm_weight`, `norm_bias` and `eps` where given;
    `fc1_weight` C x D and `fc2_weight` D x C (nn.Linear's weights transposed), `dw_weight`
    9 x D (the depthwise convolution's 3 x 3 taps row by row), biases D, D and C, C and D
    multiples of `MIX_FFN_CHANNELS_MULTIPLE`; `residual` like `tokens`. GELU is the exact (erf)
    one. Returns N x (height * width) x C, contiguous.

    bf16 `tokens` (and `residual`), where `bf16_pairs()`: the two weights bf16 as `pair_rows`
    lays them out (C / 2 x D x 2 and D / 2 x C x 2), the other parameters float32; the norm, the
    depthwise convolution and GELU in float32, the linear layers' inputs rounded to bf16 for
    their pair products, the output rounded once."""
    library = _required()
    bf16 = tokens.dtype == torch.bfloat16
    if bf16 and not bf16_pairs():
        raise ValueError("mix_ffn on bf16 tokens needs a processor with AVX-512 BF16's pair products")
    weights = (torch.bfloat16,) if bf16 else (torch.float32,)
    named = {"the tokens": tokens, "fc1's weight": fc1_weight, "fc1's bias": fc1_bias,
             "the depthwise weight": dw_weight, "the depthwise bias": dw_bias, "fc2's weight": fc2_weight,
             "fc2's bias": fc2_bias, "the norm's weight": norm_weight, "the norm's bias": norm_bias,
             "the residual": residual}
    kinds = {"the tokens": _VALUES, "the residual": (tokens.dtype,), "fc1's weight": weights, "fc2's weight": weights}
    for name, tensor in named.items():
        if tensor is not None:
            _check(tensor, name, kinds.get(name, (torch.float32,)))
    if tokens.dim() != 3 or tokens.shape[1] != height * width:
        raise ValueError(f"mix_ffn takes N x (height * width) x C tokens, not shape {tuple(tokens.shape)} "
                         f"for a {height} x {width} map")
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("mix_ffn takes the norm's weight and bias together")
    channels, hidden = tokens.shape[-1], fc1_bias.shape[-1]
    expected = {"fc1's weight": (channels // 2, hidden, 2) if bf16 else (channels, hidden), "fc1's bias": (hidden,),
                "the depthwise weight": (9, hidden), "the depthwise bias": (hidden,),
                "fc2's weight": (hidden // 2, channels, 2) if bf16 else (hidden, channels), "fc2's bias": (channels,),
                "the norm's weight": (channels,), "the norm's bias": (channels,), "the residual": tuple(tokens.shape)}
    for name, shape in expected.items():
        if named[name] is not None and tuple(named[name].shape) != shape:
            raise ValueError(f"{name} of shape {tuple(named[name].shape)} does not fit {channels} channels and "
                             f"{hidden} hidden ones (expected {shape})")
    if channels % MIX_FFN_CHANNELS_MULTIPLE or hidden % MIX_FFN_CHANNELS_MULTIPLE:
        raise ValueError(f"mix_ffn takes multiples of {MIX_FFN_CHANNELS_MULTIPLE} channels, not {channels} "
                         f"and {hidden} hidden")
    out = torch.empty_like(tokens)
    if out.numel() and library.seglab_mix_ffn(out.data_ptr(), tokens.data_ptr(), _pointer(norm_weight),
                                              _pointer(norm_bias), eps, fc1_weight.data_ptr(), fc1_bias.data_ptr(),
                                              dw_weight.data_ptr(), dw_bias.data_ptr(), fc2_weight.data_ptr(),
                                              fc2_bias.data_ptr(), _pointer(residual), tokens.shape[0], height,
                                              width, channels, hidden, int(bf16), torch.get_num_threads()):
        raise MemoryError("mix_ffn: no memory for a thread's row buffers")
    return out


def _depthwise_gelu_inputs(tokens: torch.Tensor, height: int, width: int, weight: torch.Tensor,
                           **others: torch.Tensor) -> None:
    _check(tokens, "the tokens", _VALUES)
    _check(weight, "the depthwise weight")
    if tokens.dim() != 3 or tokens.shape[1] != height * width:
        raise ValueError(f"depthwise_gelu takes N x (height * width) x D tokens, not shape {tuple(tokens.shape)} "
                         f"for a {height} x {width} map")
    channels = tokens.shape[-1]
    if channels % MIX_FFN_CHANNELS_MULTIPLE:
        raise ValueError(f"depthwise_gelu takes multiples of {MIX_FFN_CHANNELS_MULTIPLE} channels, not {channels}")
    if tuple(weight.shape) != (9, channels):
        raise ValueError(f"the depthwise weight must be 9 x {channels} (the 3 x 3 taps row by row), not "
                         f"{tuple(weight.shape)}")
    for name, tensor in others.items():
        _check(tensor, name, (tokens.dtype,))
        if tensor.shape != tokens.shape:
            raise ValueError(f"{name} must be shaped like the tokens, {tuple(tokens.shape)}, not {tuple(tensor.shape)}")


def depthwise_gelu(tokens: torch.Tensor, height: int, width: int, weight: torch.Tensor,
                   bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU(dwconv3x3(tokens) + bias) (`depthwise_gelu.c`, zero padding 1, the exact GELU):
    `tokens` N x (height * width) x D, float32 or bf16, contiguous, D a multiple of
    `MIX_FFN_CHANNELS_MULTIPLE`; `weight` 9 x D float32 (the 3 x 3 taps row by row), `bias` D.
    Returns (pre, out), both like `tokens`: the convolution with its bias, rounded to the
    tokens' dtype, and GELU of that (the backward's input)."""
    library = _required()
    _depthwise_gelu_inputs(tokens, height, width, weight)
    _check(bias, "the depthwise bias")
    if tuple(bias.shape) != (tokens.shape[-1],):
        raise ValueError(f"the depthwise bias must have {tokens.shape[-1]} values, not shape {tuple(bias.shape)}")
    pre, out = torch.empty_like(tokens), torch.empty_like(tokens)
    if tokens.numel():
        library.seglab_depthwise_gelu(tokens.data_ptr(), weight.data_ptr(), bias.data_ptr(), pre.data_ptr(),
                                      out.data_ptr(), tokens.shape[0], height, width, tokens.shape[-1],
                                      int(tokens.dtype == torch.bfloat16), torch.get_num_threads())
    return pre, out


def depthwise_gelu_backward(grad_out: torch.Tensor, pre: torch.Tensor, tokens: torch.Tensor, height: int, width: int,
                            weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `depthwise_gelu` given d out (`grad_out`) and its `pre`, all like
    `tokens`: (d tokens, like `tokens`; d weight, 9 x D float32; d bias, D float32). The
    gradient through GELU stays float32 inside; each thread's share of the rows sums its own
    weight gradients, added here in order."""
    library = _required()
    _depthwise_gelu_inputs(tokens, height, width, weight, **{"the gradient": grad_out, "pre": pre})
    channels = tokens.shape[-1]
    grad_tokens = torch.empty_like(tokens)
    parts = max(1, min(torch.get_num_threads(), tokens.shape[0] * height))
    sums = torch.zeros(parts, 10, channels)
    if tokens.numel() and library.seglab_depthwise_gelu_backward(
            grad_out.data_ptr(), pre.data_ptr(), tokens.data_ptr(), weight.data_ptr(), grad_tokens.data_ptr(),
            sums.data_ptr(), parts, tokens.shape[0], height, width, channels, int(tokens.dtype == torch.bfloat16),
            torch.get_num_threads()):
        raise MemoryError("depthwise_gelu_backward: no memory for a thread's rows")
    total = sums.sum(0)
    return grad_tokens, total[:9].contiguous(), total[9].contiguous()


def mlp_head(nhwc: torch.Tensor, first_weight: torch.Tensor, first_bias: torch.Tensor,
             parts: list[torch.Tensor] | tuple[torch.Tensor, ...], classifier_weight: torch.Tensor,
             classifier_bias: torch.Tensor) -> torch.Tensor:
    """SegFormer's decoder head, `classifier(ReLU(first(nhwc) + sum of the parts bilinearly
    upsampled))`, in one pass (`mlp_head.c`; the upsampling as `add_upsampled_`'s): `nhwc`
    N x H x W x C_in, contiguous; `first_weight` C_in x D and `classifier_weight` D x K
    (1x1 convolutions' weights transposed), biases D and K; `parts` at most `MAX_UPSAMPLED` maps
    N x h x w x D, D a multiple of 16. Returns the scores, N x H x W x K, contiguous.

    float32 throughout, or bf16 (where `bf16_pairs()`, C_in even): the map, the parts, the
    weights and the scores bf16 (the biases either); the linear layers by pair products, the
    fused row summed in float32 and rounded once for the classifier's."""
    library = _required()
    bf16 = nhwc.dtype == torch.bfloat16
    if bf16 and not bf16_pairs():
        raise ValueError("mlp_head on a bf16 map needs a processor with AVX-512 BF16's pair products")
    for tensor, name in ((nhwc, "the map"), (first_weight, "the first weight"), (first_bias, "the first bias"),
                         (classifier_weight, "the classifier's weight"), (classifier_bias, "the classifier's bias")):
        _check(tensor, name, (nhwc.dtype,) if name.endswith("weight") else _VALUES)  # biases either
    if nhwc.dim() != 4 or first_weight.dim() != 2 or classifier_weight.dim() != 2:
        raise ValueError(f"mlp_head takes an N x H x W x C map and two weight matrices, not shapes "
                         f"{tuple(nhwc.shape)}, {tuple(first_weight.shape)} and {tuple(classifier_weight.shape)}")
    n, height, width, in_channels = nhwc.shape
    channels, classes = first_weight.shape[1], classifier_weight.shape[1]
    if (first_weight.shape[0] != in_channels or first_bias.shape != (channels,)
            or classifier_weight.shape[0] != channels or classifier_bias.shape != (classes,)):
        raise ValueError(f"mlp_head's weights {tuple(first_weight.shape)}, {tuple(first_bias.shape)}, "
                         f"{tuple(classifier_weight.shape)} and {tuple(classifier_bias.shape)} do not chain from "
                         f"{in_channels} channels")
    if channels % 16:
        raise ValueError(f"mlp_head takes a multiple of 16 fused channels, not {channels}")
    if bf16 and in_channels % 2:
        raise ValueError(f"mlp_head in bf16 takes an even number of input channels, not {in_channels}")
    sources, heights, widths = _upsampled_parts(parts, n, channels, nhwc.dtype)
    padded = -(-classes // 16) * 16  # whole vectors of classes, zeros beyond them
    weight = classifier_weight.new_zeros(channels, padded)
    weight[:, :classes] = classifier_weight
    bias = classifier_bias.new_zeros(padded, dtype=torch.float32)
    bias[:classes] = classifier_bias
    first_bias = first_bias.float()
    if bf16:  # the pair products' layout
        first_weight, weight = pair_rows(first_weight), pair_rows(weight)
    out = nhwc.new_empty(n, height, width, classes)
    if out.numel() and library.seglab_mlp_head(out.data_ptr(), nhwc.data_ptr(), first_weight.data_ptr(),
                                               first_bias.data_ptr(), sources, heights, widths, len(parts),
                                               weight.data_ptr(), bias.data_ptr(), n, height, width, in_channels,
                                               channels, classes, padded, int(bf16), torch.get_num_threads()):
        raise MemoryError("mlp_head: no memory for a thread's row buffers")
    return out


def planar_conv3x3(nhwc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, outs: int, *,
                   relu: bool = False) -> torch.Tensor:
    """The 3x3 convolution (stride 1, zero padding 1) of `nhwc` (N x H x W x C float32,
    contiguous) to `outs` channels, its vectors along each row's pixels (`planar_conv.c`):
    `weight` 3 x 3 x C x P (the taps' C x P matrices, P a multiple of `PLANAR_OUTS` and at least
    `outs`; outputs past `outs` are not written), `bias` P; the ReLU after it with `relu`.
    Returns N x outs x H x W, contiguous (planar)."""
    library = _required()
    for tensor, name in ((nhwc, "the map"), (weight, "the weight"), (bias, "the bias")):
        _check(tensor, name)
    if nhwc.dim() != 4 or weight.dim() != 4 or weight.shape[:3] != (3, 3, nhwc.shape[-1]):
        raise ValueError(f"planar_conv3x3 takes an N x H x W x C map and 3 x 3 x C x P weights, not shapes "
                         f"{tuple(nhwc.shape)} and {tuple(weight.shape)}")
    padded = weight.shape[-1]
    if padded % PLANAR_OUTS or not 0 < outs <= padded or bias.shape != (padded,):
        raise ValueError(f"planar_conv3x3 takes weights and a bias for a multiple of {PLANAR_OUTS} outputs, at least "
                         f"{outs}, not shapes {tuple(weight.shape)} and {tuple(bias.shape)}")
    n, height, width, channels = nhwc.shape
    out = nhwc.new_empty(n, outs, height, width)
    if out.numel() and library.seglab_planar_conv3x3(out.data_ptr(), nhwc.data_ptr(), weight.data_ptr(),
                                                     bias.data_ptr(), n, height, width, channels, outs, padded,
                                                     int(relu), torch.get_num_threads()):
        raise MemoryError("planar_conv3x3: no memory for a thread's row buffers")
    return out


def quantize_u8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """`x` (float32, contiguous in its memory format: NCHW or channels-last) as uint8 levels
    clamp(round(x / scale) + zero_point, 0, 255), half to even, in one pass (`quantize.c`);
    the result has x's shape and strides."""
    library = _required()
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"quantize_u8 takes a float32 CPU tensor, not {x.dtype} on {x.device}")
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    if not dense:
        raise ValueError("quantize_u8 takes a tensor contiguous in its memory format (NCHW or channels-last)")
    if not 0 <= zero_point <= 255 or not scale > 0:
        raise ValueError(f"quantize_u8 takes a positive scale and a zero point in 0..255, not {scale} and {zero_point}")
    out = torch.empty_like(x, dtype=torch.uint8)  # the same strides: both are read as one flat array
    if x.numel():
        library.seglab_quantize_u8(out.data_ptr(), x.data_ptr(), x.numel(), 1.0 / scale, zero_point,
                                   torch.get_num_threads())
    return out


def quantize_rows_s8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A rows x columns float32 matrix (rows may be strided, columns contiguous) as int8 levels
    round(x * 127 / absmax), half to even, with absmax the largest magnitude in the row, and
    the rows' scales absmax / 127 (0 for a row of zeros, whose levels are 0), in one pass
    (`quantize.c`). Returns (levels: rows x columns int8, contiguous; scales: rows float32)."""
    library = _required()
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_rows_s8 takes a 2-d float32 CPU matrix with contiguous rows, not {x.dtype} "
                         f"{tuple(x.shape)} with strides {x.stride()} on {x.device}")
    rows, columns = x.shape
    levels = torch.empty(rows, columns, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    if x.numel():
        library.seglab_quantize_rows_s8(levels.data_ptr(), scales.data_ptr(), x.data_ptr(), rows, columns,
                                        x.stride(0), torch.get_num_threads())
    return levels, scales


def dequantize_rows(products: torch.Tensor, row_scales: torch.Tensor, column_scales: torch.Tensor,
                    bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 products (rows x columns, contiguous) as float32 products[r, c] * row_scales[r] *
    column_scales[c] (+ bias[c]), in one pass (`quantize.c`); with `out` (float32, the products'
    shape, contiguous) added to it in the same pass, and returned."""
    library = _required()
    if products.dtype != torch.int32 or products.dim() != 2 or not products.is_contiguous():
        raise ValueError(f"dequantize_rows takes contiguous 2-d int32 products, not {products.dtype} {tuple(products.shape)}")
    rows, columns = products.shape
    for tensor, size, name in ((row_scales, rows, "row scales"), (column_scales, columns, "column scales"),
                               (bias, columns, "bias")):
        if tensor is not None and (tensor.dtype != torch.float32 or tensor.shape != (size,) or not tensor.is_contiguous()):
            raise ValueError(f"dequantize_rows takes {size} contiguous float32 {name}, not {tensor.dtype} {tuple(tensor.shape)}")
    if out is not None and (out.dtype != torch.float32 or out.shape != products.shape or not out.is_contiguous()):
        raise ValueError(f"dequantize_rows adds to a contiguous float32 {tuple(products.shape)} out, "
                         f"not {out.dtype} {tuple(out.shape)}")
    accumulate = out is not None
    out = torch.empty(rows, columns, dtype=torch.float32) if out is None else out
    if products.numel():
        library.seglab_dequantize_rows(out.data_ptr(), products.data_ptr(), row_scales.data_ptr(),
                                       column_scales.data_ptr(), 0 if bias is None else bias.data_ptr(), rows, columns,
                                       int(accumulate), torch.get_num_threads())
    return out


ATTENTION_HEAD_MULTIPLE = 16  # attention's head width: whole 16-float vectors
ATTENTION_QUERIES = 64  # attention.c's block of queries, one item of work


def bf16_pairs() -> bool:
    """Whether the kernels multiply bf16 by pairs (AVX-512 BF16's VDPBF16PS, where the build's
    processor has it): `attention` on bf16 (else in float32 arithmetic), `mix_ffn` on bf16 (else
    refused)."""
    library = _load()
    return library is not None and bool(library.seglab_bf16_pairs())


def _head_width(function: str, channels: int, heads: int, keys: int) -> int:
    """The width of each of `heads` heads side by side in `channels`, checked as attention.c takes
    them: whole `ATTENTION_HEAD_MULTIPLE`-channel vectors, at least one key."""
    if heads < 1 or channels % heads or (channels // heads) % ATTENTION_HEAD_MULTIPLE or keys < 1:
        raise ValueError(f"{function} takes heads of a multiple of {ATTENTION_HEAD_MULTIPLE} channels and at least "
                         f"one key, not {channels} channels in {heads} heads over {keys} keys")
    return channels // heads


def attention(queries: torch.Tensor, keys_values: torch.Tensor, heads: int, scale: float | None = None, *,
              probabilities: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention of `queries` (N x L x C tokens, the heads' C / heads channels side
    by side) over `keys_values` (N x S x 2C: keys, then values, as one linear layer writes them)
    by `attention.c`: softmax(scale q k^T) v per head, with `scale` 1 / sqrt(C / heads) unless
    given, in float32 arithmetic on float32 or bf16 tensors (both of one dtype, contiguous),
    C / heads a multiple of `ATTENTION_HEAD_MULTIPLE`, S at least 1. Returns N x L x C in the
    queries' dtype, contiguous: `F.scaled_dot_product_attention` of the heads, transposed back
    to tokens. With `probabilities` (N x heads x L x S of the queries' dtype, contiguous) the
    softmax is written there too, each value rounded once (a backward pass multiplies by it)."""
    library = _required()
    _check(queries, "the queries", _VALUES)
    _check(keys_values, "the keys and values", (queries.dtype,))
    if queries.dim() != 3 or keys_values.dim() != 3 or keys_values.shape[0] != queries.shape[0] \
            or keys_values.shape[2] != 2 * queries.shape[2]:
        raise ValueError(f"attention takes N x L x C queries and N x S x 2C keys and values, not shapes "
                         f"{tuple(queries.shape)} and {tuple(keys_values.shape)}")
    n, length, channels = queries.shape
    head_dim = _head_width("attention", channels, heads, keys_values.shape[1])
    if scale is not None and not scale > 0:
        raise ValueError(f"attention takes a positive scale, not {scale}")
    if probabilities is not None:
        _check(probabilities, "the probabilities", (queries.dtype,))
        if tuple(probabilities.shape) != (n, heads, length, keys_values.shape[1]):
            raise ValueError(f"attention's probabilities must be {(n, heads, length, keys_values.shape[1])}, not "
                             f"{tuple(probabilities.shape)}")
    out = torch.empty_like(queries)
    if out.numel():
        status = library.seglab_attention(out.data_ptr(), _pointer(probabilities), queries.data_ptr(),
                                          keys_values.data_ptr(), n, length,
                                          keys_values.shape[1], heads, head_dim,
                                          head_dim ** -0.5 if scale is None else float(scale),
                                          int(queries.dtype == torch.bfloat16), torch.get_num_threads())
        if status == -1:
            raise MemoryError("attention: out of memory for a thread's buffers")
    return out


def _attention_grad_inputs(function: str, grad: torch.Tensor, keys_values: torch.Tensor,
                           probabilities: torch.Tensor, heads: int, scale: float | None) -> tuple[int, int, int, float]:
    """Checks what the backward kernel takes (one line each); returns n, length, head_dim, scale."""
    _required()
    if not bf16_pairs():
        raise ValueError(f"{function} needs a processor with AVX-512 BF16's pair products")
    for tensor, name in ((grad, "the output's gradient"), (keys_values, "the keys and values"),
                         (probabilities, "the probabilities")):
        _check(tensor, name, (torch.bfloat16,))
    if grad.dim() != 3 or keys_values.dim() != 3 or keys_values.shape[0] != grad.shape[0] \
            or keys_values.shape[2] != 2 * grad.shape[2] \
            or tuple(probabilities.shape) != (grad.shape[0], heads, grad.shape[1], keys_values.shape[1]):
        raise ValueError(f"{function} takes N x L x C gradients, N x S x 2C keys and values and "
                         f"N x heads x L x S probabilities, not shapes {tuple(grad.shape)}, "
                         f"{tuple(keys_values.shape)} and {tuple(probabilities.shape)} for {heads} heads")
    n, length, channels = grad.shape
    head_dim = _head_width(function, channels, heads, keys_values.shape[1])
    if scale is not None and not scale > 0:
        raise ValueError(f"{function} takes a positive scale, not {scale}")
    return n, length, head_dim, head_dim ** -0.5 if scale is None else float(scale)


def attention_score_grads(grad: torch.Tensor, keys_values: torch.Tensor, probabilities: torch.Tensor,
                          heads: int) -> torch.Tensor:
    """The gradient of `attention`'s scores (after the scale, before the softmax) from the
    gradient of its output, by `attention.c`: p (dp - the p-weighted mean of dp) per head and
    query, dp = grad v^T, p the softmax `attention` wrote to its `probabilities`. `grad` N x L x C
    tokens, `keys_values` N x S x 2C, `probabilities` N x heads x L x S; all bf16 and contiguous,
    on a processor with pair products (`bf16_pairs()`). dp by pairs into float32, the mean in
    float32 over the stored weights' own sum, each value rounded once. Returns N x heads x L x S
    bf16 (`attention_grads` takes the inputs' gradients from it without writing it out)."""
    n, length, head_dim, scale = _attention_grad_inputs("attention_score_grads", grad, keys_values, probabilities,
                                                        heads, None)
    grads = torch.empty_like(probabilities)
    if grads.numel():
        status = _required().seglab_attention_score_grads(grads.data_ptr(), None, None, None,
                                                          grad.data_ptr(), keys_values.data_ptr(),
                                                          probabilities.data_ptr(), n, length, keys_values.shape[1],
                                                          heads, head_dim, scale, 0, torch.get_num_threads())
        if status == -1:
            raise MemoryError("attention_score_grads: out of memory for a thread's buffers")
    return grads


def attention_grads(grad: torch.Tensor, queries: torch.Tensor, keys_values: torch.Tensor,
                    probabilities: torch.Tensor, heads: int, scale: float | None = None, *,
                    keys_values_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradients of `attention`'s queries and of its keys and values (N x L x C and N x S x 2C,
    bf16, as the inputs) from the gradient of its output, all in `attention.c`'s one pass over
    each block of queries, with the same inputs as `attention_score_grads` plus the `queries`:
    ds as there, never written out; dq = scale ds k as there; dk = scale ds^T q and dv = p^T grad
    from each block's rows of ds (as rounded) and p while in cache, by pairs into float32 sums per
    range of blocks, added here in float32 and rounded once. `keys_values_grad=False`: only the
    queries' gradient (None for the other)."""
    function = "attention_grads"
    n, length, head_dim, scale = _attention_grad_inputs(function, grad, keys_values, probabilities, heads, scale)
    _check(queries, "the queries", (torch.bfloat16,))
    if queries.shape != grad.shape:
        raise ValueError(f"{function} takes queries shaped as the gradient, {tuple(grad.shape)}, not "
                         f"{tuple(queries.shape)}")
    keys, padded = keys_values.shape[1], (keys_values.shape[1] + 15) // 16 * 16
    blocks = -(-length // ATTENTION_QUERIES)
    # ranges of blocks per (image, head): enough items for the threads, one partial sum each
    splits = max(1, min(blocks, -(-4 * torch.get_num_threads() // max(1, n * heads))))
    query_grads = torch.empty_like(queries)
    sums = torch.zeros(n, heads, splits, 2, head_dim, padded) if keys_values_grad else None
    if query_grads.numel():
        status = _required().seglab_attention_score_grads(None, query_grads.data_ptr(), _pointer(sums),
                                                          queries.data_ptr(), grad.data_ptr(),
                                                          keys_values.data_ptr(), probabilities.data_ptr(), n, length,
                                                          keys, heads, head_dim, scale, splits,
                                                          torch.get_num_threads())
        if status == -1:
            raise MemoryError(f"{function}: out of memory for a thread's buffers")
    if sums is None:
        return query_grads, None
    sums = sums.sum(2)[..., :keys]  # N x heads x 2 x D x S
    sums[:, :, 0] *= scale
    # back to the projection's layout: N x S x (keys' C, then values' C)
    key_value_grads = sums.permute(0, 4, 2, 1, 3).to(torch.bfloat16, memory_format=torch.contiguous_format)
    return query_grads, key_value_grads.view(n, keys, 2 * heads * head_dim)


def linear(tokens: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, *,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """`tokens @ weight_t + bias (+ residual)` (`mix_ffn.c`'s register blocks): tokens ... x C
    float32, contiguous; `weight_t` C x O (nn.Linear's weight transposed), O a multiple of
    `MIX_FFN_CHANNELS_MULTIPLE`; `residual` of the output's shape. Returns ... x O, contiguous."""
    library = _required()
    for tensor, name in ((tokens, "the tokens"), (weight_t, "the weight"), (bias, "the bias"), (residual, "the residual")):
        if tensor is not None:
            _check(tensor, name)
    in_features, out_features = weight_t.shape
    if tokens.dim() < 1 or tokens.shape[-1] != in_features or bias.shape != (out_features,):
        raise ValueError(f"linear takes ... x {in_features} tokens and a bias of {out_features}, not shapes "
                         f"{tuple(tokens.shape)} and {tuple(bias.shape)}")
    if out_features % MIX_FFN_CHANNELS_MULTIPLE:
        raise ValueError(f"linear takes a multiple of {MIX_FFN_CHANNELS_MULTIPLE} outputs, not {out_features}")
    out = tokens.new_empty(*tokens.shape[:-1], out_features)
    if residual is not None and residual.shape != out.shape:
        raise ValueError(f"the residual of shape {tuple(residual.shape)} does not fit the output's {tuple(out.shape)}")
    if out.numel():
        library.seglab_linear(out.data_ptr(), tokens.data_ptr(), weight_t.data_ptr(), bias.data_ptr(),
                              _pointer(residual), out.numel() // out_features, in_features, out_features,
                              torch.get_num_threads())
    return out
