"""Reading images into RGB, the way a classifier expects them, with one clear error per bad input."""

from __future__ import annotations

import http.client
import io
import logging
import math
import os
import socket
import stat
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Callable

from resnetcli.errors import InputError
from resnetcli.urls import is_url, redact_url, split_credentials

log = logging.getLogger(__name__)

#: Background that transparent pixels are composited on: mid-grey, which the ImageNet
#: normalisation maps close to zero, so transparency neither brightens nor darkens an image.
TRANSPARENCY_BACKGROUND = (128, 128, 128)

#: The largest image download accepted: a URL that streams without end must not exhaust memory.
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024


#: A JPEG codes at least one bit for every 8x8 block of its luma plane (the DC coefficient, with the
#: shortest Huffman code libjpeg can make): a file smaller than that cannot hold the image its header
#: declares, although libjpeg would decode it to grey fill without an error when it ends with a
#: proper end marker. (Arithmetic-coded JPEGs, which could go lower, are practically never seen.)
JPEG_MIN_BITS_PER_BLOCK = 1


class ImageRefused(ValueError):
    """A decoded image that preprocessing refuses (its reason is the message); the pipeline makes it
    an `InputError` of the input."""


def load_image(
    source: str | Path, *, offline: bool = False, timeout: float = 30.0, draft_short_side: int | None = None
):
    """Open an image file or http(s) URL as an upright RGB `PIL.Image`, or raise `InputError` naming it.

    The format is recognised from the content, not the extension. EXIF orientation is applied;
    grayscale, 16-bit, palette, CMYK and transparent images become RGB (transparency composited
    on a fixed background); animated files give their first frame. Pillow's decompression-bomb
    guard stays on: an image over `PIL.Image.MAX_IMAGE_PIXELS` is refused. `offline` refuses
    URLs; `timeout` bounds each network wait in seconds. `draft_short_side` (opt-in, see
    `resnetcli.fastpath.draft_short_side`) decodes a JPEG at a reduced scale (1/2, 1/4 or 1/8) as
    long as its short side stays at least that many pixels: much faster for large photos, at the
    cost of probabilities that move by up to about 1e-2.
    """
    name = str(source)
    if is_url(name):
        if offline:
            raise InputError(redact_url(name), "not fetched: downloads are off (offline mode)")
        data = fetch_bytes(name, timeout)
        return _decode(redact_url(name), lambda: io.BytesIO(data), draft_short_side)
    return _decode(name, lambda: open_regular_file(name), draft_short_side)


def open_regular_file(name: str):
    """A binary file object for `name`, or `InputError` when it is not a regular file.

    The file is opened without blocking and its type checked on the open descriptor, so a FIFO,
    socket or device never blocks a worker (opening a FIFO for reading waits for a writer) and
    cannot be swapped in between a check and the open.
    """
    try:
        descriptor = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(name, "no such file") from None
    except PermissionError:
        raise InputError(name, "permission denied") from None
    except OSError as error:
        if error.errno == getattr(os, "ENXIO", None):  # a socket, or a FIFO opened this way elsewhere
            raise InputError(name, "not a regular file") from None
        raise InputError(name, f"cannot open: {error.strerror or error}") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise InputError(name, "is a directory, not an image")
        if not stat.S_ISREG(mode):
            raise InputError(name, "not a regular file")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def fetch_bytes(url: str, timeout: float) -> bytes:
    """The body of an http(s) URL, or `InputError` for an HTTP error, no answer or an oversized body."""
    shown = redact_url(url)
    bare, authorization = split_credentials(url)
    headers = {"User-Agent": "resnetcli"}
    if authorization:
        headers["Authorization"] = authorization
    try:
        request = urllib.request.Request(bare, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as error:
        raise InputError(shown, f"cannot fetch: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise InputError(shown, f"cannot fetch: no answer within {timeout:g} s") from None
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        raise InputError(shown, f"cannot fetch: {text}") from None
    except TimeoutError:
        raise InputError(shown, f"cannot fetch: no answer within {timeout:g} s") from None
    except http.client.HTTPException as error:
        # Not an HTTP server, a status line or header that is too long, too many headers, a body
        # cut short: http.client's own exceptions, outside OSError.
        raise InputError(shown, f"cannot fetch: not a valid HTTP answer ({type(error).__name__}: {error})") from None
    except (OSError, ValueError) as error:
        raise InputError(shown, f"cannot fetch: {error}") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise InputError(shown, f"refused: larger than {MAX_DOWNLOAD_BYTES // (1024 * 1024)} MiB")
    return data


def decode_bytes(name: str, data: bytes, *, draft_short_side: int | None = None):
    """Decode an image held in memory (`data`, e.g. read from an object store) as `load_image` decodes
    a file: an upright RGB `PIL.Image`, or `InputError` naming the input `name`."""
    return _decode(name, lambda: io.BytesIO(data), draft_short_side)


def _decode(name: str, opener: Callable[[], object], draft_short_side: int | None = None):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with opener() as stream, Image.open(stream) as image:
            refuse_oversized(image, name)
            image.seek(0)
            if image.format == "JPEG":
                refuse_truncated_jpeg(image, name)
            if draft_short_side and image.format == "JPEG":
                _draft(image, draft_short_side)
            image.load()
            # In place: the default returns a copy even of an upright photo (0.3 core-s per 256
            # photos of 0.1-10 MP here, 7% of decoding and preprocessing).
            ImageOps.exif_transpose(image, in_place=True)
            return to_rgb(image)
    except FileNotFoundError:
        raise InputError(name, "no such file") from None
    except PermissionError:
        raise InputError(name, "permission denied") from None
    except IsADirectoryError:
        raise InputError(name, "is a directory, not an image") from None
    except UnidentifiedImageError:
        raise InputError(name, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(name, f"refused as a possible decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow reports truncated and corrupt files as OSError/SyntaxError with its own text.
        raise InputError(name, f"cannot decode image: {error}") from None


def _draft(image, short_side: int) -> None:
    # draft() picks the largest DCT scale (1/8, 1/4, 1/2) whose result is still at least the size
    # asked for (or none), so asking for the photo's aspect ratio at `short_side` keeps both sides at
    # or above it. EXIF rotation only swaps the sides: the short side is the same after it.
    width, height = image.size
    scale = short_side / min(width, height)
    image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))


def refuse_truncated_jpeg(image, name: str) -> None:
    """Raise `InputError` for a JPEG file too small to hold the blocks its header declares.

    Pillow's `LOAD_TRUNCATED_IMAGES` stays off, but a truncated JPEG that still ends with an end
    marker decodes without error to grey fill; the size of the file tells it apart.
    """
    stream = image.fp
    try:
        size = os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        size = len(stream.getbuffer()) if isinstance(stream, io.BytesIO) else None
    if size is None:
        return
    width, height = image.size
    blocks = math.ceil(width / 8) * math.ceil(height / 8)
    needed = blocks * JPEG_MIN_BITS_PER_BLOCK // 8
    if size < needed:
        raise InputError(
            name,
            f"cannot decode image: truncated (a {width}x{height} JPEG needs at least {needed} bytes, "
            f"the file has {size})",
        )


def check_resize(size: tuple[int, int], short_side: int) -> None:
    """Raise `ImageRefused` when resizing an image of `size` so that its shorter side is `short_side`
    would make an image over Pillow's pixel limit (`PIL.Image.MAX_IMAGE_PIXELS`).

    A 207-byte PNG of 20000x2 pixels would become 2560000x256 (655 million pixels, about 2 GB) on
    the way to a 224x224 crop. Such inputs are refused rather than resized in pieces: an image a
    thousand times longer than wide is not a photo a classifier was trained on.
    """
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    shorter, longer = min(width, height), max(width, height)
    if limit is None or shorter == 0:
        return
    resized_long = math.ceil(longer * short_side / shorter)
    if resized_long * short_side > limit:
        raise ImageRefused(
            f"refused: resizing {width}x{height} to a shorter side of {short_side} would make "
            f"{resized_long * short_side} pixels (limit {limit}); the aspect ratio is too extreme"
        )


def refuse_oversized(image, name: str) -> None:
    """Raise `InputError` for an image larger than Pillow's decompression-bomb limit.

    Pillow itself only raises above twice the limit and merely warns between one and two times
    it; warnings are process-wide state that worker threads cannot change safely, so the limit is
    enforced here explicitly.
    """
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise InputError(
            name,
            f"refused as a possible decompression bomb ({width}x{height} = {width * height} pixels, limit {limit})",
        )


@lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """File name extensions (lower case, with the dot) of the formats Pillow can open."""
    from PIL import Image

    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_image_file(path: str) -> bool:
    """Whether a file should be classified when found in a folder.

    Files with an image extension are taken as images (a broken one is then reported when it is
    decoded); any other file is opened and taken only if Pillow recognises its content.
    """
    from PIL import Image

    if Path(path).suffix.lower() in image_extensions():
        return True
    try:
        with Image.open(path):
            return True
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return True
    except Exception as error:
        log.debug("%s is not taken as an image: %s: %s", path, type(error).__name__, error)
        return False


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
