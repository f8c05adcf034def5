"""Decode an uploaded image, refusing anything that is not one."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from retrieval.serving.errors import NotAnImageError


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image.

    The bytes are first checked with Pillow's `verify()` (which catches truncated and
    corrupt files without decoding the pixels), then decoded fully; RGB because uploads
    come in any mode (palette, RGBA, 16-bit grey) while the models take three channels.

    Args:
        data: the uploaded file's bytes.

    Returns:
        The decoded image in mode ``"RGB"``.

    Raises:
        NotAnImageError: empty bytes, an unknown or corrupt format, or an image so large
            that Pillow treats it as a decompression bomb.
    """
    if not data:
        raise NotAnImageError("the upload is empty, expected an image file (PNG, JPEG, ...)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise NotAnImageError(f"the uploaded image is too large to decode: {error}") from None
    except UnidentifiedImageError:
        raise NotAnImageError(f"the upload ({len(data)} bytes) is not an image format Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as error:
        # Pillow reports truncated or corrupt files with these (SyntaxError from verify()).
        raise NotAnImageError(f"the uploaded image is corrupt: {error}") from None
