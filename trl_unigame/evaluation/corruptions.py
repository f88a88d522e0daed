"""Common image corruptions (noise, blur, JPEG, contrast) at five severities, with PIL and numpy only.

Severities follow ImageNet-C (Hendrycks and Dietterich, 2019). Blur is defined at 224 px there and scaled here with
the image's size, so that a severity means the same relative distortion at any resolution (on images of a few dozen
pixels the mildest blur changes pixels by a level or two).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image


SEVERITIES = (1, 2, 3, 4, 5)
#: Severities run when a corruption is named without one (`"noise"` = `"noise_1"`, `"noise_3"`, `"noise_5"`).
DEFAULT_SEVERITIES = (1, 3, 5)

_NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)  # on pixels in [0, 1]
_BLUR_SIGMA_AT_224 = (1.0, 2.0, 3.0, 4.0, 6.0)
_JPEG_QUALITY = (25, 18, 15, 10, 7)
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)


def _noise(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    noisy = pixels + rng.normal(scale=_NOISE_STD[severity - 1], size=pixels.shape)
    return Image.fromarray((np.clip(noisy, 0, 1) * 255).round().astype(np.uint8))


def _blur(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    # An exact separable Gaussian (PIL's box approximation ignores the sub-pixel sigmas of small images).
    sigma = _BLUR_SIGMA_AT_224[severity - 1] * min(image.size) / 224
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    pixels = np.asarray(image, dtype=np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * pixels.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(pixels, pad, mode="reflect" if pixels.shape[axis] > radius else "edge")
        length = pixels.shape[axis]
        pixels = sum(w * np.take(padded, np.arange(i, i + length), axis=axis) for i, w in enumerate(kernel))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def _jpeg(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=_JPEG_QUALITY[severity - 1])
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert(image.mode)


def _contrast(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    mean = pixels.mean(axis=(0, 1), keepdims=True)
    out = (pixels - mean) * _CONTRAST[severity - 1] + mean
    return Image.fromarray((np.clip(out, 0, 1) * 255).round().astype(np.uint8))


#: The corruptions by name: `(image in mode RGB or L, severity, rng) -> image`.
CORRUPTIONS: dict[str, Callable[[Image.Image, int, np.random.Generator], Image.Image]] = {
    "noise": _noise,
    "blur": _blur,
    "jpeg": _jpeg,
    "contrast": _contrast,
}


def corrupt_image(image: Image.Image, name: str, severity: int, seed: int | list[int] = 0) -> Image.Image:
    r"""
    Returns a corrupted copy of `image` with the same size and mode.

    Args:
        image (`PIL.Image.Image`):
            The image (any mode; modes other than RGB and L are corrupted in RGB and converted back, alpha kept).
        name (`str`):
            One of `"noise"` (Gaussian noise), `"blur"` (Gaussian blur), `"jpeg"` (JPEG compression),
            `"contrast"` (contrast reduction).
        severity (`int`):
            From 1 (mild) to 5 (strong).
        seed (`int` or `list[int]`, *optional*, defaults to `0`):
            Seed of the noise (e.g. `[seed, row_index]`), so that results do not depend on batching.

    Raises:
        ValueError: for an unknown name or a severity outside 1-5.
    """
    check_corruption(name, severity)
    mode = image.mode
    work = image if mode in ("RGB", "L") else image.convert("RGB")
    out = CORRUPTIONS[name](work, severity, np.random.default_rng(seed))
    if out.mode != mode:
        out = out.convert(mode)
        if "A" in mode:
            out.putalpha(image.getchannel("A"))
    return out


def check_corruption(name: str, severity: int) -> None:
    """Raises a `ValueError` for an unknown corruption name or a severity outside 1-5."""
    if name not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption {name!r}; known corruptions: {sorted(CORRUPTIONS)}.")
    if severity not in SEVERITIES:
        raise ValueError(f"Corruption severity must be one of {list(SEVERITIES)}, got {severity!r}.")


def parse_corruptions(specs) -> list[tuple[str, int]]:
    """Parses corruption specs into `(name, severity)` pairs: `"noise_3"` is noise at severity 3, `"blur"` is blur at
    each of the default severities (1, 3, 5), and `("jpeg", 2)` is taken as it is.

    Raises:
        ValueError: for an unknown name or severity, before any work starts.
    """
    if isinstance(specs, str):
        specs = [specs]
    out = []
    for spec in specs or []:
        if isinstance(spec, str):
            name, _, severity = spec.partition("_")
            if severity and not severity.isdigit():
                raise ValueError(
                    f"Cannot read corruption {spec!r}: write `name` or `name_severity` (e.g. 'noise_3'), with name in "
                    f"{sorted(CORRUPTIONS)}."
                )
            pairs = [(name, int(severity))] if severity else [(name, s) for s in DEFAULT_SEVERITIES]
        else:
            name, severity = spec
            pairs = [(name, int(severity))]
        for name, severity in pairs:
            check_corruption(name, severity)
            if (name, severity) not in out:
                out.append((name, severity))
    return out
