"""Decode an uploaded image, refusing anything that is not one, or too big to decode, before decoding it.

An upload's byte size says little about its decoded size: a 10.8 KB PNG can decode to
9400 x 9400 RGB (~337 MB), and the embedder decodes every image of a batch. So:

- only the formats of ``formats`` are tried (Pillow would otherwise try every format it knows,
  EPS included, which runs Ghostscript where it is installed);
- the width and height are read from the header, and an image of more than ``max_pixels`` is
  refused (413) before a pixel is decoded;
- Pillow's own bomb check stays as a second line (it warns between 1x and 2x its limit: refused too).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

from PIL import Image, UnidentifiedImageError

from retrieval.serving.errors import NotAnImageError, PayloadTooLargeError

# What uploads may be: the formats a browser or a camera produces.
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# 25 million pixels: a 5000 x 5000 image, 75 MB decoded as RGB; a 12 MP phone photo fits.
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    formats: Sequence[str] = DEFAULT_IMAGE_FORMATS,
) -> Image.Image:
    """Decode image bytes to an RGB PIL image.

    The header is read first (format and size, no pixels), then the file is checked with
    Pillow's `verify()` (which catches truncated and corrupt files without decoding the
    pixels), then decoded; RGB because uploads come in any mode (palette, RGBA, 16-bit grey)
    while the models take three channels.

    Args:
        data: the uploaded file's bytes.
        max_pixels: the most pixels (width x height) an image may have.
        formats: the Pillow format names accepted, e.g. ``("PNG", "JPEG")``.

    Returns:
        The decoded image in mode ``"RGB"``.

    Raises:
        NotAnImageError: empty bytes, a format not accepted or unknown, a corrupt file.
        PayloadTooLargeError: more than ``max_pixels`` pixels (read from the header).
    """
    if not data:
        raise NotAnImageError("the upload is empty, expected an image file (PNG, JPEG, ...)")
    accepted = [name.upper() for name in formats]
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=accepted) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise PayloadTooLargeError(
                        f"the uploaded image is {width} x {height} = {width * height:,} pixels, "
                        f"the limit is {max_pixels:,}"
                    )
                probe.verify()
            with Image.open(io.BytesIO(data), formats=accepted) as image:
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise PayloadTooLargeError(f"the uploaded image is too large to decode: {error}") from None
    except UnidentifiedImageError:
        raise NotAnImageError(
            f"the upload ({len(data)} bytes) is not an image in an accepted format ({', '.join(accepted)})"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        # Pillow reports truncated or corrupt files with these (SyntaxError from verify()).
        raise NotAnImageError(f"the uploaded image is corrupt: {error}") from None
