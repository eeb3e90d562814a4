"""Documents in a conversation: text files and PDFs in a user message, read into text once, at the door.

A ``file`` content part (OpenAI's shape: ``{"type": "file", "file": {"filename", "file_data"}}``, the data a
base64 ``data:`` URL or, from Python, bytes) becomes the text the model reads: the file's name, then its text
in a fenced block. Every backend (transformers, MLX, a remote server) gets that same text, so a document is
counted, cached and reused as text. A PDF's text comes from pypdf, each page marked; a PDF without text (a
scan), a binary file and text in an encoding other than UTF-8 (or UTF-16/32 with a byte-order mark) are
refused with the reason. Reading a PDF costs the server more than its size suggests (a page may draw from a
stream shared with every other page): one PDF is read at a time, for at most MAX_PDF_SECONDS.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import io
import mimetypes
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping

from .images import looks_like_image, read_data_url

MAX_FILES = 16  # per request, the whole conversation: each is read again at every turn (a PDF from memory)
MAX_FILE_BYTES = 16 * 2**20  # one file as sent
MAX_TEXT_CHARS = 512 * 2**10  # one file's text: ~130k tokens, as long as the longest context these models have
MAX_PDF_PAGES = 2000
MAX_PDF_SECONDS = 20.0  # one PDF's reading, checked between pages (pypdf bounds one page's at a few seconds)
MAX_NAME_BYTES = 200  # a file's name, in UTF-8: an imported document is stored under it (filesystems allow 255)
# PDFs' texts kept by owner and digest, so a chat's PDF is not parsed again at every turn (a text file decodes in
# milliseconds); by owner, since a reply that came faster would tell one person that another had sent the same
# file. Each entry is charged its text and a little more, so many tiny ones cannot grow it past the budget.
_CACHE_CHARS = 16 * 2**20
_ENTRY_CHARS = 512
_BOMS = (  # UTF-32 first: its little-endian mark begins with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_BINARY = re.compile(r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")  # control characters no text file holds
_NOT_READ = "is not a text file, a PDF or an image this model reads"

_texts: OrderedDict[tuple, str] = OrderedDict()
_texts_chars = 0
_lock = threading.Lock()
_one_pdf = threading.Lock()  # PDFs are read one at a time: pure Python, they would share the GIL with replies


def clean_name(name) -> str:
    """A file's name as the model and the page see it: its last path component, on one line, at most
    MAX_NAME_BYTES in UTF-8 (cut before its extension, which stays); "file" when there is none (or "." or "..")."""
    name = re.split(r"[/\\]", name)[-1] if isinstance(name, str) else ""
    name = " ".join("".join(c if c.isprintable() else " " for c in name).split())
    if name in ("", ".", ".."):
        return "file"
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    stem, dot, suffix = name.rpartition(".")
    suffix = dot + suffix if stem and len(suffix) <= 16 else ""
    room = MAX_NAME_BYTES - len(suffix.encode())
    return name[: len(name) - len(suffix)].encode()[:room].decode(errors="ignore").rstrip() + suffix


def is_pdf(data: bytes) -> bool:
    return data[:1024].lstrip().startswith(b"%PDF-")


def read(part, where: str, owner: tuple | None = None) -> str:
    """The text the model reads for a ``file`` part's ``file`` object (``filename``, ``file_data``), kept read
    for ``owner`` (a session's space and principal; None: not kept); ValueError naming ``where``, the file and
    what is wrong."""
    name, data = sent_file(part, where)
    return quoted(name, text_of(data, f"{where} ({name})", owner))


def sent_file(part, where: str) -> tuple[str, bytes]:
    """(its clean name, its bytes) of a ``file`` part's ``file`` object; ValueError when it holds no file."""
    if not isinstance(part, Mapping):
        raise ValueError(f"{where}.file must be an object with filename and file_data")
    data = part.get("file_data")
    if data is None:
        if part.get("file_id") is not None:
            raise ValueError(f"{where}: this server has no Files API to look a file_id up in; send file_data")
        raise ValueError(f"{where}.file has no file_data")
    if isinstance(data, str):
        data = read_data_url(data, where, MAX_FILE_BYTES, "file")[1]
    elif isinstance(data, (bytes, bytearray)):
        data = bytes(data)
    else:
        raise ValueError(f"{where}.file.file_data must be a base64 data: URL, not {type(data).__name__}")
    return clean_name(part.get("filename")), data


def data_url(name: str, data: bytes) -> str:
    """A document as a ``data:`` URL (an exported chat's, an upstream's), its type from its content and name."""
    mime = "application/pdf" if is_pdf(data) else mimetypes.guess_type(name)[0] or "text/plain"
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def quoted(name: str, text: str) -> str:
    """A document as the model reads it: its name, then its text in a fence longer than any run of backticks
    the text holds (so the text cannot close it)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"File: {name}\n{fence}\n{text}\n{fence}"


def text_of(data: bytes, where: str, owner: tuple | None = None) -> str:
    """A text file's or a PDF's text (line ends as ``\\n``); ValueError when it is too large, holds no text, or
    is neither. Kept for ``owner`` (None: not kept)."""
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{where} is {len(data) / 2**20:.1f} MiB; files may be at most {MAX_FILE_BYTES >> 20} MiB")
    if not is_pdf(data):
        return _checked(_plain_text(data, where), where)
    key = None if owner is None else (owner, hashlib.sha256(data).digest())
    with _lock:
        if key in _texts:
            _texts.move_to_end(key)
            return _texts[key]
    text = _checked(_pdf_text(data, where), where)
    if key is not None:
        _remember(key, text)
    return text


def _checked(text: str, where: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(
            f"{where} holds more than {MAX_TEXT_CHARS:,} characters of text, the most a file may hold (about as "
            "many tokens as the longest context a model here reads)"
        )
    return text


def _remember(key: tuple, text: str) -> None:
    global _texts_chars
    with _lock:
        if key not in _texts:
            _texts[key] = text
            _texts_chars += len(text) + _ENTRY_CHARS
        while _texts_chars > _CACHE_CHARS and len(_texts) > 1:
            _texts_chars -= len(_texts.popitem(last=False)[1]) + _ENTRY_CHARS


def _plain_text(data: bytes, where: str) -> str:
    if looks_like_image(data):
        raise ValueError(f"{where} is an image: send it as an image_url part, to a model that reads images")
    bom, encoding = next(((bom, name) for bom, name in _BOMS if data.startswith(bom)), (b"", "utf-8"))
    data = data[len(bom) :]
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        if b"\x00" in data[:8192] and not bom:
            raise ValueError(f"{where} {_NOT_READ}") from e
        raise ValueError(
            f"{where} is not {encoding.upper()} text (byte {e.start}); save it as UTF-8 and attach it again"
        ) from e
    text = text.removesuffix("\x1a")  # the end-of-file mark of old DOS text files
    if _BINARY.search(text):
        raise ValueError(f"{where} {_NOT_READ}")
    if not text.strip():
        raise ValueError(f"{where} is empty")
    return text


def _pdf_text(data: bytes, where: str) -> str:
    """A PDF's text, page by page (``[page N]`` before each page that has any)."""
    import pypdf  # imported on the first PDF only

    with _one_pdf:
        return _pdf_pages(pypdf, data, where, time.monotonic() + MAX_PDF_SECONDS)


def _pdf_pages(pypdf, data: bytes, where: str, deadline: float) -> str:
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        locked = reader.is_encrypted and not reader.decrypt("")
        count = 0 if locked else len(reader.pages)
    except Exception as e:  # noqa: BLE001 (a parser's failure on a broken or crafted file is the sender's mistake)
        raise ValueError(f"{where} is a PDF that cannot be read ({type(e).__name__}: {e})") from e
    if locked:
        raise ValueError(f"{where} is a PDF locked with a password: remove the password and attach it again")
    if count > MAX_PDF_PAGES:
        raise ValueError(f"{where} has {count} pages; a PDF may have at most {MAX_PDF_PAGES}")
    try:
        pages, chars = [], 0
        for n, page in enumerate(reader.pages, 1):
            if time.monotonic() > deadline:
                raise TimeoutError
            text = (page.extract_text() or "").strip()
            if text:
                pages.append(f"[page {n}]\n{text}")
                chars += len(pages[-1])
            if chars > MAX_TEXT_CHARS:
                break  # too long already: the caller says so without reading the rest
    except TimeoutError:
        raise ValueError(f"{where} is a PDF that takes more than {MAX_PDF_SECONDS:.0f} s to read") from None
    except Exception as e:  # noqa: BLE001 (a parser's failure on a broken or crafted file is the sender's mistake)
        raise ValueError(f"{where} is a PDF that cannot be read ({type(e).__name__}: {e})") from e
    if not pages:
        raise ValueError(f"{where} is a PDF without text (a scan?): only a PDF's text is read, not its pictures")
    return "\n\n".join(pages)
