"""Reading images into RGB, the way a classifier expects them, with one clear error per bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

from resnetcli.errors import InputError

#: Background that transparent pixels are composited on: mid-grey, which the ImageNet
#: normalisation maps close to zero, so transparency neither brightens nor darkens an image.
TRANSPARENCY_BACKGROUND = (128, 128, 128)


def load_image(source: str | Path):
    """Open an image file as an upright RGB `PIL.Image`, or raise `InputError` naming the file.

    The format is recognised from the content, not the extension. EXIF orientation is applied;
    grayscale, 16-bit, palette, CMYK and transparent images become RGB (transparency composited
    on a fixed background); animated files give their first frame. Pillow's decompression-bomb
    guard stays on.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(source)
    name = str(source)
    if path.is_dir():
        raise InputError(name, "is a directory, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise InputError(name, "no such file") from None
    except PermissionError:
        raise InputError(name, "permission denied") from None
    except UnidentifiedImageError:
        raise InputError(name, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(name, f"refused as a possible decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow reports truncated and corrupt files as OSError/SyntaxError with its own text.
        raise InputError(name, f"cannot decode image: {error}") from None


def to_rgb(image):
    """Convert any Pillow image mode to 8-bit RGB."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16- and 32-bit integer grey: scale to 8 bits instead of clipping at 255.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "L" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, TRANSPARENCY_BACKGROUND)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")
