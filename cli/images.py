"""Images for ``xpnet predict``: any size and format Pillow reads, made to look like MNIST."""

from __future__ import annotations

import numpy as np

from .run import CLIError


def load_image(path, shape) -> np.ndarray:
    """A float32 image in [0, 1] of ``shape``: grayscale, resized, light strokes on a dark ground.

    MNIST digits are white on black; a photo or drawing of a dark digit on light paper (a bright
    image on average) is inverted to match.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise CLIError("reading images needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as image:
            gray = image.convert("L").resize((shape[1], shape[0]), Image.Resampling.LANCZOS)
    except (UnidentifiedImageError, OSError) as exc:
        raise CLIError(f"{path}: not an image Pillow can read ({exc})") from exc
    pixels = np.asarray(gray, dtype=np.float32) / 255.0
    return 1.0 - pixels if pixels.mean() > 0.5 else pixels
