"""Images in a conversation: read and checked once at the door, turned into image tokens by the backend.

A message's image part becomes an ``Image``: its pixels (RGB) and a digest of them. In a prompt's token ids
each image token is a negative pseudo id that names the image and the token's place in it, so a session
cache's ledger tells one image from another: the same image sent again matches and its tokens are reused, a
different one does not. Only the runner turns pseudo ids back into the model's image token (and runs the
vision tower for the images it has to read).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image as PILImage

MAX_IMAGES = 8  # per request, the whole conversation
MAX_IMAGE_BYTES = 16 * 2**20  # one image as sent (encoded)
MAX_IMAGE_PIXELS = 64 * 2**20  # width x height, checked before decoding (no decompression bombs; 50 MP photos pass)
MAX_SIDE = 2048  # pixels kept per side once the image is named (vision processors read 896 or fewer)
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what Pillow may decode: no format that runs other programs (EPS)
FETCH_TIMEOUT_S = 10
_PLACE_BITS = 16  # a pseudo id's low bits: the token's place in its image
_KEY_BITS = 46  # its high bits name the image (with the place bits, the id fits an int64)


@dataclass(frozen=True, eq=False)
class Image:
    """One image of a conversation: ``pixels`` (a PIL image in RGB, at most MAX_SIDE per side), ``digest``
    (sha256 of the image's full size and pixels), which names it in the session ledger, and the file it came
    as (``encoded``, of type ``mime``; None for a PIL image)."""

    pixels: PILImage.Image = field(repr=False)
    digest: str
    encoded: bytes | None = field(default=None, repr=False)
    mime: str = "image/png"

    @property
    def key(self) -> int:
        return int(self.digest[:12], 16) >> (48 - _KEY_BITS)

    def data_url(self) -> str:
        """The image as a ``data:`` URL: the file it came as, or PNG (what an OpenAI-compatible upstream, or an
        exported chat, is given)."""
        data = self.encoded
        if data is None:
            out = io.BytesIO()
            self.pixels.save(out, format="PNG")
            data = out.getvalue()
        return f"data:{self.mime};base64," + base64.b64encode(data).decode()


def from_pil(picture: PILImage.Image, where: str, encoded: bytes | None = None, mime: str = "image/png") -> Image:
    """An ``Image`` from a PIL image; ValueError when it has too many pixels. Only a copy of at most MAX_SIDE
    per side is kept."""
    _check_size(picture.width, picture.height, where)
    rgb = picture.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height};".encode() + rgb.tobytes()).hexdigest()
    if max(rgb.size) > MAX_SIDE:  # convert() made a copy: the caller's image is left as it is
        rgb.thumbnail((MAX_SIDE, MAX_SIDE), PILImage.Resampling.LANCZOS)
    return Image(rgb, digest, encoded, mime)


def from_bytes(data: bytes, where: str) -> Image:
    """An ``Image`` from an encoded file (PNG, JPEG, WebP, GIF's first frame); ValueError when it is too large
    or not such an image."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{where} is {len(data) / 2**20:.1f} MiB; images may be at most {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        picture = PILImage.open(io.BytesIO(data), formats=FORMATS)
        _check_size(picture.width, picture.height, where)
        picture.load()
    except ValueError:
        raise
    except PILImage.UnidentifiedImageError as e:  # its message names our BytesIO object, nothing of the sender's
        raise ValueError(f"{where} is not an image that can be read (PNG, JPEG, WebP or GIF)") from e
    except Exception as e:  # noqa: BLE001 (a decoder's failure on crafted input is the sender's mistake)
        raise ValueError(f"{where} is not an image that can be read (PNG, JPEG, WebP or GIF): {e}") from e
    return from_pil(picture, where, data, PILImage.MIME.get(picture.format or "", "image/png"))


def read(value, where: str, *, fetch_urls: bool = False) -> Image:
    """An ``Image`` from what a caller sent: a PIL image, encoded bytes, a ``data:`` URL, or an http(s) URL
    (fetched only with ``fetch_urls``, since a server that fetches any address it is given can be made to
    reach places its callers cannot). Raises ValueError naming ``where`` and what is wrong."""
    if isinstance(value, PILImage.Image):
        return from_pil(value, where)
    if isinstance(value, (bytes, bytearray)):
        return from_bytes(bytes(value), where)
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a data: URL, not {type(value).__name__}")
    if value.startswith("data:"):
        return from_bytes(read_data_url(value, where, MAX_IMAGE_BYTES)[1], where)
    if value.startswith(("http://", "https://")):
        if not fetch_urls:
            raise ValueError(
                f"{where}: this server does not fetch image URLs (start it with --image-urls to allow that); "
                "send the image itself as a data: URL"
            )
        return from_bytes(_fetch(value, where), where)
    raise ValueError(f"{where} must be a data: URL (or an http(s) URL where the server allows them)")


def read_data_url(value: str, where: str, limit: int, kind: str = "image") -> tuple[str, bytes]:
    """(media type, bytes) of a base64 ``data:`` URL of at most ``limit`` bytes; ValueError naming ``where``
    (and what is wrong with the ``kind`` of file it should hold: "image" or "file")."""
    head, comma, payload = value.partition(",")
    if not value.startswith("data:") or not comma or not head.endswith(";base64"):
        example = "data:image/png;base64,..." if kind == "image" else "data:text/plain;base64,..."
        raise ValueError(f"{where} must be a base64 data: URL ({example})")
    if len(payload) > limit * 4 // 3 + 4:
        raise ValueError(f"{where} is larger than {limit >> 20} MiB; send a smaller {kind}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{where} is not valid base64: {e}") from e
    return head[len("data:") : -len(";base64")].split(";")[0], data


def looks_like_image(data: bytes) -> bool:
    """Whether ``data`` begins as a file of one of FORMATS does (PNG, JPEG, WebP, GIF)."""
    return data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")) or (
        data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    )


def _fetch(url: str, where: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 (http(s) only, checked)
            data = response.read(MAX_IMAGE_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ValueError(f"{where}: could not fetch {url}: {getattr(e, 'reason', e)}") from e
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{where} is larger than {MAX_IMAGE_BYTES >> 20} MiB; send a smaller image")
    return data


def _check_size(width: int, height: int, where: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{where} is {width}x{height} pixels; images may have at most {MAX_IMAGE_PIXELS >> 20} million pixels"
        )


def by_key(pictures: Sequence[Image]) -> dict[int, Image]:
    """The images by the key their tokens carry; ValueError if two different images share one (a 1 in 2^46
    chance), since their tokens could not be told apart."""
    out: dict[int, Image] = {}
    for picture in pictures:
        if out.setdefault(picture.key, picture).digest != picture.digest:
            raise ValueError("two different images of this conversation share a key: send one of them re-encoded")
    return out


def images_of(messages) -> list[Image]:
    """The images of checked messages (``request.check_messages``), in order."""
    return [
        part
        for message in messages
        if isinstance(message["content"], tuple)
        for part in message["content"]
        if isinstance(part, Image)
    ]


def token(key: int, place: int) -> int:
    """The pseudo id of the image token at ``place`` in the image named ``key``: negative, so it never
    collides with a vocabulary id."""
    return -((key << _PLACE_BITS) | place) - 1


def place(pseudo_id: int) -> int:
    """Where an image token sits in its image (0 for its first)."""
    return (-pseudo_id - 1) & ((1 << _PLACE_BITS) - 1)


def key_of(pseudo_id: int) -> int:
    return (-pseudo_id - 1) >> _PLACE_BITS


def cut_before(ids: Sequence[int], length: int) -> int:
    """``length``, moved back to where an image begins if a cut there would split the image."""
    if 0 < length < len(ids) and ids[length] < 0:
        return length - place(ids[length])
    return length


def cut_after(ids: Sequence[int], length: int) -> int:
    """``length``, moved forward to where an image ends if a cut there would split the image."""
    while 0 < length < len(ids) and ids[length] < 0 and place(ids[length]) > 0:
        length += 1
    return length


@dataclass(frozen=True)
class ImageFormat:
    """How a vision model's prompt holds an image: its chat template writes ``placeholder`` (Gemma 3:
    ``<start_of_image>``) where an image goes, which becomes ``expanded``, the processor's text holding
    ``length`` image tokens (vocabulary id ``token_id``)."""

    placeholder: str
    expanded: str
    token_id: int
    length: int

    @classmethod
    def of(cls, processor) -> ImageFormat:
        tokenizer = processor.tokenizer
        return cls(
            processor.boi_token, processor.full_image_sequence, tokenizer.image_token_id, processor.image_seq_length
        )

    def expand(self, pieces: list[tuple[str, bool]], count: int) -> list[tuple[str, bool]]:
        """The rendered prompt's (text, typed) pieces (``special_tokens.ControlTokens.pieces``) with each of the
        ``count`` image placeholders the template wrote expanded (a typed one is the caller's text); ValueError
        when the template placed another number of them."""
        found = sum(text.count(self.placeholder) for text, typed in pieces if not typed)
        if found != count:
            raise ValueError(f"the model's chat template placed {found} of the conversation's {count} images")
        return [(text if typed else text.replace(self.placeholder, self.expanded), typed) for text, typed in pieces]

    def mark(self, ids: list[int], pictures: Sequence[Image]) -> list[int]:
        """The prompt's ids with each image's run of image tokens replaced by its pseudo ids, in order."""
        places = [i for i, t in enumerate(ids) if t == self.token_id]
        if len(places) != len(pictures) * self.length:
            raise ValueError(f"the prompt holds {len(places)} image tokens for {len(pictures)} image(s)")
        out = list(ids)
        for n, picture in enumerate(pictures):
            for k in range(self.length):
                out[places[n * self.length + k]] = token(picture.key, k)
        return out
