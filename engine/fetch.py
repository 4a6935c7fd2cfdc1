"""Images named by an http(s) URL (model cards' examples use them): task.inputs and the
Python API take one where they take an image file.

The download is bounded: at most MAX_BYTES are read, and it gives up after TIMEOUT_S; only
http and https are fetched (no file://, ftp:// ...). The bytes are decoded as an image and
nothing else.
"""

import io
import urllib.error
import urllib.request

from PIL import Image, ImageOps

from data.images import to_rgb

MAX_BYTES = 50 * 1024 * 1024  # a photo is a few MB; more is not an image worth the memory
TIMEOUT_S = 30


def is_url(value) -> bool:
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def fetch_image(url: str, max_bytes: int = MAX_BYTES, timeout_s: float = TIMEOUT_S) -> Image.Image:
    """The image at `url` as 8-bit RGB, turned as its EXIF orientation says (as
    data.images.load_image reads files); OSError naming the URL if the download fails or is too
    large, ValueError if the bytes are not an image."""
    if not is_url(url):
        raise ValueError(f"{url!r} is not an http(s) URL")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # scheme checked above
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise OSError(f"could not download {url!r} ({err}); check the URL and the network") from err
    if len(data) > max_bytes:
        raise OSError(
            f"{url!r} is larger than {max_bytes // 2**20} MB; download it and give the file"
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            return to_rgb(ImageOps.exif_transpose(image))
    except Exception as err:
        raise ValueError(
            f"{url!r} did not give an image ({len(data)} bytes, {type(err).__name__}: {err})"
        ) from err
