"""Reading images from disk: one decoder for the data sets and the predictor, one clear error
per bad file.

Images are read as they are shown: a camera's EXIF orientation tag (a photo stored sideways,
with a note to turn it) is applied, as detectron2's and mmcv's readers do, so masks and
predictions line up with the picture a viewer or an annotation tool displays. Masks are read
as stored (`seglab.data.files.read_raw_mask`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image, read_file

__all__ = ["IMAGE_SUFFIXES", "decode_rgb", "image_batch", "images_in", "list_images", "pil_pixels", "read_image", "shown_size",
           "unit_range"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_TORCHVISION_SUFFIXES = (".png", ".jpg", ".jpeg")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# PIL's modes of 16-bit grey (TIFFs, some PNGs); "I" (32-bit integers) is how older Pillow
# versions open 16-bit PNGs, read here in the same 0..65535 range
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


_EXIF_ORIENTATION = 0x0112  # 1 as stored; 2-8 mirrored and / or turned; 5-8 a quarter turn (width and height swap)


def _orientation(picture: Image.Image) -> int:
    return picture.getexif().get(_EXIF_ORIENTATION, 1)


def shown_size(picture: Image.Image) -> tuple[int, int]:
    """An opened image's (width, height) as shown, its EXIF orientation applied (nothing decoded)."""
    width, height = picture.size
    return (height, width) if _orientation(picture) in (5, 6, 7, 8) else (width, height)


def decode_rgb(path: str | Path) -> torch.Tensor:
    """An image file as uint8 3 x H x W, as shown (EXIF orientation applied; grey, palette and
    RGBA become RGB; 16-bit images are scaled to 8 bits, 65535 -> 255).

    torchvision's libpng/libjpeg decoders are used where they apply (measured ~15% faster
    than PIL on CamVid's PNGs); PIL takes every other format and any file they refuse.
    """
    if Path(path).suffix.lower() in _TORCHVISION_SUFFIXES:
        try:
            return _eight_bits(decode_image(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True))
        except RuntimeError:
            pass  # e.g. a CMYK JPEG: PIL knows more variants (or says what is wrong)
    return _decode_with_pil(Path(path), "RGB")


def _eight_bits(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as they are; 16-bit ones (torchvision decodes 16-bit PNGs as uint16) rounded
    to 8 bits, 0..65535 onto 0..255."""
    if pixels.dtype == torch.uint8:
        return pixels
    return torch.div(pixels.to(torch.int32) * 255 + 32767, 65535, rounding_mode="floor").to(torch.uint8)


def unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels as float32 in [0, 1]: uint8 / 255, uint16 / 65535, floats checked to lie in [0, 1]
    (an image still in 0..255, or already normalised, is refused with one line rather than
    read as garbage); other types are refused."""
    if pixels.dtype == torch.uint8:
        return pixels.float() / 255
    if pixels.dtype == torch.uint16:
        return pixels.to(torch.int32).float() / 65535
    if not pixels.is_floating_point():
        raise ValueError(f"image values must be uint8 (0..255), uint16 (0..65535) or float (0..1), not {pixels.dtype}")
    pixels = pixels.float()
    if pixels.numel() == 0:
        return pixels
    if not bool(torch.isfinite(pixels).all()):
        raise ValueError("image contains NaN or infinite values")
    low, high = float(pixels.min()), float(pixels.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"float image values must lie in [0, 1] (got {low:.3g}..{high:.3g}); "
                         "pass uint8 for 0..255, and pass the image before mean/std normalisation")
    return pixels


def read_image(path: str | Path, channels: int = 3) -> torch.Tensor:
    """An image file as float32 C x H x W in [0, 1] (RGB for 3 channels, L for 1, RGBA for 4)."""
    path = Path(path)
    if channels not in _MODES:
        raise ValueError(f"images are read with 1, 3 or 4 channels, not {channels}")
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    return unit_range(decode_rgb(path) if channels == 3 else _decode_with_pil(path, _MODES[channels]))


def pil_pixels(picture: Image.Image, mode: str) -> np.ndarray:
    """A PIL image's pixels in `mode` ("L", "RGB", "RGBA") as uint8 H x W (x C); 16-bit grey is
    scaled to 8 bits (PIL's own convert would clip it at 255: an almost white image)."""
    if picture.mode in _SIXTEEN_BIT_MODES:
        grey = _eight_bits(torch.from_numpy(np.asarray(picture, dtype=np.int32).clip(0, 65535)))
        picture = Image.fromarray(grey.numpy(), mode="L")
    return np.asarray(picture.convert(mode), dtype=np.uint8)


def _decode_with_pil(path: Path, mode: str) -> torch.Tensor:
    try:
        with Image.open(path) as picture:
            turned = _orientation(picture) not in (0, 1)  # exif_transpose copies even an upright image
            array = pil_pixels(ImageOps.exif_transpose(picture) if turned else picture, mode)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path} is not a readable image ({error.__class__.__name__})") from None
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_batch(image: torch.Tensor | np.ndarray | Image.Image | str | Path, channels: int = 3) -> torch.Tensor:
    """An image as a float32 N x C x H x W batch in [0, 1]: a file (read as `read_image` reads
    it: EXIF orientation applied), a PIL image (16-bit
    grey scaled to 8 bits, alpha dropped), an H x W or H x W x C array (grey repeated for a
    3-channel model, alpha dropped) or a C x H x W / N x C x H x W tensor; uint8 values are
    0..255, uint16 0..65535, floats 0..1 (anything else is refused, not scored as garbage)."""
    if isinstance(image, (str, Path)):
        return read_image(image, channels=channels)[None]
    if isinstance(image, Image.Image):
        image = pil_pixels(image, "L" if channels == 1 else "RGB")
    if isinstance(image, np.ndarray):
        array = image[..., None] if image.ndim == 2 else image
        if array.ndim == 3 and channels == 3 and array.shape[2] in (1, 4):
            array = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[..., :3]
        array = np.ascontiguousarray(array) if array.flags.writeable else array.copy()  # PIL's arrays are read-only
        image = torch.from_numpy(array).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"cannot predict on a {type(image).__name__}; give an image file, a PIL image, a numpy array or a tensor")
    batch = image[None] if image.dim() == 3 else image
    if batch.dim() != 4 or batch.shape[1] != channels:
        raise ValueError(f"expected an image with {channels} channels, got a tensor of shape {tuple(image.shape)}")
    return unit_range(batch).float()


def list_images(paths: list[str | Path]) -> list[Path]:
    """Files as given, and the image files inside any folder given (sorted). A folder without
    image files of its own is an error that says so, and names the subfolders that hold some
    (folders are not searched recursively: Cityscapes' val/ holds one folder per city)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = images_in(path)
            if not inside:
                nested = sorted(sub.name for sub in path.iterdir() if sub.is_dir() and images_in(sub))
                hint = (f"; its subfolders {', '.join(nested[:3])}{' ...' if len(nested) > 3 else ''} do: give them "
                        f"(e.g. {path}/*)") if nested else ""
                raise FileNotFoundError(f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)}){hint}")
            found.extend(inside)
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"image {path} does not exist")
    return found
