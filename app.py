"""The browser chat: Gradio Blocks over llm_backends. UI only: flags, layout and wiring; no model code."""

from __future__ import annotations

import argparse
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import gradio as gr

import chat_history
from chat_history import files_of, openai_messages, page_content, text_of, valid_chat_id
from llm_backends import BackendError, ChatModel, ChatRequest, ChatStream, ModelLoadError, SessionKey, documents
from llm_backends import images as image_input
from llm_backends.default_model import cache_root
from llm_backends.http_api import add_openai_routes
from llm_backends.loading import QUANTIZATIONS
from llm_backends.request import DEFAULT_MAX_NEW_TOKENS, XTC_THRESHOLD
from llm_backends.serving import ModelRegistry

log = logging.getLogger("llm_chat")

ENV = {
    "models": "LLM_MODELS",
    "quantization": "LLM_QUANTIZATION",
    "host": "LLM_HOST",
    "port": "LLM_PORT",
    "share": "LLM_SHARE",
    "auth": "LLM_AUTH",
    "max_cache_gb": "LLM_MAX_CACHE_GB",
    "cache_dir": "LLM_CACHE_DIR",
    "cache_dir_gb": "LLM_CACHE_DIR_GB",
    "host_cache_gb": "LLM_HOST_CACHE_GB",
    "concurrency": "LLM_CONCURRENCY",
    "api_key": "LLM_API_KEY",
    "metrics_key": "LLM_METRICS_KEY",
    "insecure_no_auth": "LLM_INSECURE_NO_AUTH",
    "admins": "LLM_ADMINS",
    "page_secret": "LLM_PAGE_SECRET",
    "models_dir": "LLM_MODELS_DIR",
    "image_urls": "LLM_IMAGE_URLS",
    "exact": "LLM_EXACT",
}
TRUE = {"1", "true", "yes", "on"}
MODEL_WAIT_S = 600  # how long a reply or a page waits for a model that is loading
WATCH_S = 5.0  # how often an open page checks whether the operator switched models (from another tab)


@dataclass
class AppConfig:
    models: list[str | None] = field(default_factory=lambda: [None])
    quantization: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: list[tuple[str, str]] = field(default_factory=list)
    max_cache_gb: float | None = None
    cache_dir: str | None = None
    cache_dir_gb: float | None = None
    host_cache_gb: float | None = None
    concurrency: int = 8
    api_keys: list[str] = field(default_factory=list)
    metrics_key: str | None = None  # reads /metrics (needed where several API keys share the server)
    insecure_no_auth: bool = False
    on_spaces: bool = False
    page_secret: str | None = None  # encrypts the chats saved in browsers; kept in the user cache folder if unset
    admins: list[str] = field(default_factory=list)
    models_dir: str | None = None
    image_urls: bool = False  # /v1 fetches http(s) image URLs (off: a server fetching any address is a risk)
    exact: bool = False  # CUDA: logits bitwise independent of batch neighbours and prompt splits (slower)


def _auth_pairs(values: Sequence[str]) -> list[tuple[str, str]]:
    """user:pass values, or paths of files holding one user:pass per line."""
    pairs = []
    for value in values:
        lines = Path(value).read_text().splitlines() if Path(value).is_file() else [value]
        for line in (raw.strip() for raw in lines):
            if not line or line.startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user or not password:
                raise SystemExit(f"--auth expects user:password (or a file of them), got {line.split(':')[0]!r}:***")
            pairs.append((user, password))
    return pairs


def parse_args(argv: Sequence[str] | None = None, env: dict | None = None) -> AppConfig:
    """Flags win over environment variables (LLM_MODELS, LLM_AUTH, ...), which win over defaults."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        description="A local LLM chat in the browser (Gemma 3, Qwen 3). Each flag has an environment variable "
        "for Hugging Face Spaces, named in its help.",
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="SRC",
        help="a checkpoint folder, a .gguf file, a Hub repo id, mlx:FOLDER (MLX backend) or "
        "openai:BASE_URL#MODEL (a remote OpenAI-compatible server); repeat for more dropdown entries "
        "(default: the embedded Gemma 3 270M) [LLM_MODELS, comma-separated]",
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        help="auto: NF4 on CUDA; on a CPU int8 (packed fp16 where no C++ compiler is found); fp16, nf4, int8, none "
        "[LLM_QUANTIZATION]",
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1) [LLM_HOST]")
    parser.add_argument("--port", type=int, help="port (default 7860) [LLM_PORT]")
    parser.add_argument(
        "--share", action="store_true", default=None, help="make a public gradio.live link; needs --auth [LLM_SHARE]"
    )
    parser.add_argument(
        "--auth",
        action="append",
        metavar="USER:PASS",
        help="a login (repeatable), or a file with one user:pass per line [LLM_AUTH]",
    )
    parser.add_argument(
        "--max-cache-gb",
        type=float,
        help="memory for per-session KV caches (default: a quarter of free RAM, or half of free GPU "
        "memory) [LLM_MAX_CACHE_GB]",
    )
    parser.add_argument(
        "--cache-dir",
        help="a folder where sessions' KV caches go when they leave memory and when the server stops, so a "
        "returning session (also after a restart) is not read again from the start [LLM_CACHE_DIR]",
    )
    parser.add_argument(
        "--cache-dir-gb",
        type=float,
        help="the --cache-dir folder's budget, oldest files out first (default 8) [LLM_CACHE_DIR_GB]",
    )
    parser.add_argument(
        "--host-cache-gb",
        type=float,
        help="on a GPU, host RAM where sessions evicted from GPU memory wait, copied back when they return "
        "instead of being read again (default: a quarter of free RAM; 0: none) [LLM_HOST_CACHE_GB]",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        help="replies generated at once (their decode steps share one batch); later requests wait in the queue "
        "(default 8) [LLM_CONCURRENCY]",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        help="a key for the /v1 API and /metrics (repeatable; each key's sessions are its own) "
        "[LLM_API_KEY, comma-separated]",
    )
    parser.add_argument(
        "--metrics-key",
        help="the key that reads /metrics, which counts every caller's requests: with several --api-key, only it "
        "does [LLM_METRICS_KEY]",
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="allow --share or a non-loopback --host without --auth (trusted networks only) [LLM_INSECURE_NO_AUTH]",
    )
    parser.add_argument(
        "--admin",
        action="append",
        dest="admins",
        metavar="USER",
        help="a login (of --auth) that may load and free models from the page (repeatable); without logins, "
        "the person at a local server may [LLM_ADMINS, comma-separated]",
    )
    parser.add_argument(
        "--models-dir",
        help="the folder the page may load checkpoint folders and .gguf files from (default: none; Hub repo ids "
        "only) [LLM_MODELS_DIR]",
    )
    parser.add_argument(
        "--image-urls",
        action="store_true",
        default=None,
        help="let /v1 requests name images by http(s) URL, which the server then fetches (default: data: URLs "
        "only; a server that fetches any address it is sent can be made to reach places its callers cannot) "
        "[LLM_IMAGE_URLS]",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        default=None,
        help="on CUDA, the exact mode: a session's logits are bitwise the same whichever other sessions share "
        "its decode step and whether its prompt came from the cache (slower; the default mode's last bits "
        "drift) [LLM_EXACT]",
    )
    args = parser.parse_args(argv)

    def pick(name, cast=str):
        value = getattr(args, name)
        if value is None and env.get(ENV[name]):
            raw = env[ENV[name]]
            value = raw.strip().lower() in TRUE if cast is bool else cast(raw)
        return value

    config = AppConfig(on_spaces=bool(env.get("SPACE_ID")))
    models = args.models or [m.strip() for m in env.get(ENV["models"], "").split(",") if m.strip()]
    config.models = [None if m in ("default", "embedded") else m for m in models] or [None]
    config.quantization = pick("quantization") or config.quantization
    config.host = pick("host") or ("0.0.0.0" if config.on_spaces else config.host)
    config.port = pick("port", int) or config.port
    config.share = bool(pick("share", bool))
    config.auth = _auth_pairs(args.auth or [v for v in env.get(ENV["auth"], "").split(",") if v.strip()])
    config.max_cache_gb = pick("max_cache_gb", float)
    config.cache_dir = pick("cache_dir")
    config.cache_dir_gb = pick("cache_dir_gb", float)
    config.host_cache_gb = pick("host_cache_gb", float)
    config.concurrency = pick("concurrency", int) or config.concurrency
    keys = args.api_key or env.get(ENV["api_key"], "").split(",")
    config.api_keys = [k.strip() for k in keys if k.strip()]
    config.metrics_key = pick("metrics_key")
    config.insecure_no_auth = bool(pick("insecure_no_auth", bool))
    config.page_secret = env.get(ENV["page_secret"]) or None  # not a flag: a command line is visible to others
    admins = args.admins or env.get(ENV["admins"], "").split(",")
    config.admins = [a.strip() for a in admins if a.strip()]
    config.models_dir = pick("models_dir")
    config.image_urls = bool(pick("image_urls", bool))
    config.exact = bool(pick("exact", bool))
    if config.admins and not config.auth:
        raise SystemExit("--admin names logins: add them with --auth user:password")
    unknown = set(config.admins) - {user for user, _ in config.auth}
    if unknown:
        raise SystemExit(f"--admin names no login of --auth: {', '.join(sorted(unknown))}")
    if config.models_dir and not Path(config.models_dir).is_dir():
        raise SystemExit(f"--models-dir {config.models_dir} is not a folder")
    if config.concurrency < 1:
        raise SystemExit("--concurrency must be at least 1")
    if config.quantization not in QUANTIZATIONS:
        raise SystemExit(f"LLM_QUANTIZATION must be one of {', '.join(QUANTIZATIONS)}, not {config.quantization!r}")
    return config


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(config: AppConfig) -> None:
    """Refuses to serve beyond this machine without logins; exits with a message saying how to add them."""
    exposed = config.share or not is_loopback(config.host)
    if not exposed or config.auth or config.on_spaces:
        return
    where = "a public share link" if config.share else f"{config.host}, reachable from other machines"
    if config.insecure_no_auth:
        log.warning(
            "WARNING: serving %s WITHOUT authentication (--insecure-no-auth). Anyone who can reach it "
            "can use this chat.",
            where,
        )
        return
    raise SystemExit(
        f"Refusing to serve {where} without authentication.\n"
        "Add a login with --auth user:password (repeatable), or --auth FILE with one user:password per line "
        "(or LLM_AUTH).\nOn a trusted private network, --insecure-no-auth overrides this."
    )


def is_exposed(config: AppConfig) -> bool:
    """Whether people other than the one at this machine can reach the page."""
    return config.share or not is_loopback(config.host) or config.on_spaces


def is_operator(request: gr.Request, config: AppConfig) -> bool:
    """Who may load and free models from the page: with logins, the ones named by --admin; without, the one
    person at a local server (nobody on a server others reach without logins)."""
    if config.auth:
        return bool(request.username) and request.username in config.admins
    return not is_exposed(config)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def page_source(text: str, models_dir: str | None) -> str:
    """What the operator typed as a model source: a checkpoint folder or .gguf file inside the models folder, or a
    Hub repo id. Raises ValueError for anything else (absolute paths, a way out of the folder, backends such as
    openai: that would make the server fetch an address)."""
    text = (text or "").strip()
    if not text:
        raise ValueError("type a folder or .gguf file of the models folder, or a Hub repo id (org/name)")
    if models_dir and not Path(text).is_absolute():
        root = Path(models_dir).resolve()
        candidate = (root / text).resolve()  # links are followed, so one pointing out of the folder is refused
        if candidate.is_relative_to(root) and candidate != root and candidate.exists():
            return str(candidate)
    # A repo id that names an existing path would be loaded from there (relative to the server's folder).
    if HUB_ID.fullmatch(text) and not any(part in (".", "..") for part in text.split("/")) and not Path(text).exists():
        return text
    if models_dir:
        raise ValueError(
            f"{text!r} is neither a folder or .gguf file inside the models folder ({models_dir}) nor a Hub repo id"
        )
    raise ValueError("only Hub repo ids (org/name) load from the page; --models-dir names a folder to load from")


def available_models(models_dir: str | None) -> list[str]:
    """What the operator can load without typing: the models folder's checkpoints and .gguf files, and the
    Hugging Face cache's model repos."""
    names = []
    if models_dir:
        root = Path(models_dir).resolve()
        for path in sorted(Path(models_dir).iterdir()):
            inside = path.resolve().is_relative_to(root)
            if inside and ((path.is_dir() and (path / "config.json").is_file()) or path.suffix == ".gguf"):
                names.append(path.name)
    try:
        from huggingface_hub import scan_cache_dir

        names += sorted(repo.repo_id for repo in scan_cache_dir().repos if repo.repo_type == "model")
    except Exception:  # no cache folder yet, or one it cannot read: nothing cached to offer
        pass
    return names


# --- the page ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatSettings:
    """The page's controls for one reply, as saved with a chat. Their order here is the order of the chat
    events' inputs after the history (and of the ``/chat`` API's parameters after the message)."""

    system_prompt: str
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    repetition_penalty: float
    seed: int | None
    thinking: bool
    # The later ones have defaults, so older /chat callers (and chats saved before them) still fit.
    thinking_budget: int = 0  # max reasoning tokens, 0 = no limit
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    dry_multiplier: float = 0.0
    xtc_probability: float = 0.0
    xtc_threshold: float = XTC_THRESHOLD

    @classmethod
    def from_inputs(cls, values: Sequence) -> ChatSettings:
        names = [f.name for f in fields(cls)]
        if len(values) > len(names):
            raise ValueError(f"expected at most {len(names)} settings ({', '.join(names)}), got {len(values)}")
        return cls(**dict(zip(names, values, strict=False)))

    def request(
        self, model: ChatModel, messages: list[dict], session: SessionKey, continue_final: bool = False
    ) -> ChatRequest:
        """The reply's request (``continue_final``: going on with the last message, an answer); oldest turns are
        dropped to fit. A control still at the default the page shows
        for it is sent as unset, so the default keeps one owner (build_request, or a remote upstream)."""
        thinking = bool(self.thinking) if model.capabilities.thinking else None
        mode_default = shown_defaults(model, None)["thinking"]
        shown = shown_defaults(model, thinking)

        def changed(name: str, value):
            return None if value == shown[name] else value

        return model.request(
            messages,
            session=session,
            temperature=changed("temperature", float(self.temperature)),
            top_p=changed("top_p", float(self.top_p)),
            top_k=changed("top_k", int(self.top_k)),
            max_new_tokens=changed("max_new_tokens", int(self.max_new_tokens)),
            repetition_penalty=changed("repetition_penalty", float(self.repetition_penalty)),
            min_p=changed("min_p", float(self.min_p)),
            presence_penalty=changed("presence_penalty", float(self.presence_penalty)),
            frequency_penalty=changed("frequency_penalty", float(self.frequency_penalty)),
            dry_multiplier=changed("dry_multiplier", float(self.dry_multiplier)),
            xtc_probability=changed("xtc_probability", float(self.xtc_probability)),
            xtc_threshold=changed("xtc_threshold", float(self.xtc_threshold)),
            seed=None if self.seed in (None, "", -1) else int(self.seed),
            thinking=None if thinking == mode_default else thinking,
            # Remote upstreams have no budget field: a budget left from a local model is not sent to one.
            thinking_budget=int(self.thinking_budget)
            if thinking and model.family is not None and (self.thinking_budget or 0) > 0
            else None,
            fit_context=True,
            continue_final=continue_final or None,
        )


# The types a saved or imported chat's settings may have (anything else is left out: chat_history.clean_settings).
NUMBER = (int, float)
SETTING_KINDS = {
    "system_prompt": (str,),
    "temperature": NUMBER,
    "top_p": NUMBER,
    "top_k": NUMBER,
    "max_new_tokens": NUMBER,
    "repetition_penalty": NUMBER,
    "seed": (*NUMBER, type(None)),
    "thinking": (bool,),
    "thinking_budget": NUMBER,
    "min_p": NUMBER,
    "presence_penalty": NUMBER,
    "frequency_penalty": NUMBER,
    "dry_multiplier": NUMBER,
    "xtc_probability": NUMBER,
    "xtc_threshold": NUMBER,
}
assert set(SETTING_KINDS) == {f.name for f in fields(ChatSettings)}, "each setting has its kinds"

# What the controls show before a model says otherwise, and for a model whose family is unknown (remote).
PLACEHOLDERS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
    "repetition_penalty": 1.0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "dry_multiplier": 0.0,
    "xtc_probability": 0.0,
    "xtc_threshold": XTC_THRESHOLD,
}
PROBE = ({"role": "user", "content": "?"},)


def shown_defaults(model: ChatModel, thinking: bool | None) -> dict:
    """Each control's default for ``model`` in a thinking mode (None: the model's default mode): what
    build_request fills in for the family, or the placeholders where the family is unknown."""
    if model.family is None:
        return {**PLACEHOLDERS, "thinking": model.capabilities.thinking if thinking is None else thinking}
    request = model.request(PROBE, thinking=thinking)
    sampling = request.sampling
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k or 0,
        "max_new_tokens": sampling.max_new_tokens,
        "repetition_penalty": sampling.repetition_penalty or 1.0,
        "min_p": sampling.min_p or 0.0,
        "presence_penalty": sampling.presence_penalty or 0.0,
        "frequency_penalty": sampling.frequency_penalty or 0.0,
        "dry_multiplier": sampling.dry_multiplier or 0.0,
        "xtc_probability": sampling.xtc_probability or 0.0,
        "xtc_threshold": sampling.xtc_threshold,
        "thinking": bool(request.thinking),
    }


def page_session(request: gr.Request, exposed: bool) -> SessionKey:
    """A browser tab's session, in the page's space, under the person it belongs to: the login that opened
    it; on a local server without logins the one person using it (""); on a server reachable by others
    without logins (a Space without LLM_AUTH, --insecure-no-auth) the tab alone, so tabs share nothing."""
    principal = request.username or (f"tab:{request.session_hash}" if exposed else "")
    return SessionKey("page", principal, request.session_hash)


MISSING_IMAGE = "[an image that is no longer on this server]"
TEXT_ONLY_IMAGE = "[an image, left out: the current model reads text only]"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
_imports: Path | None = None  # files of imported chats, one per image or document: a folder of this process's own
# Names an imported file's place by its content under a key of this process: a saved chat naming a place would
# otherwise tell whether someone imported a file with exactly that content.
_IMPORT_KEY = secrets.token_bytes(32)
MAX_ATTACHED = documents.MAX_FILES + image_input.MAX_IMAGES  # files a chat may name: each is read at every turn


def imports_folder() -> Path:
    """Where imported chats' files go: made once per process by ``mkdtemp`` (private, and a name nobody else
    can take first, as they could a fixed one in a shared /tmp)."""
    global _imports
    if _imports is None:
        _imports = Path(tempfile.mkdtemp(prefix="llm-chat-imports-"))
    return _imports


def page_file(path) -> Path | None:
    """``path`` if it names a file the page itself stored (an upload, in Gradio's upload folder, or an imported
    chat's image or document), else None. The saved chats come from the browser, which may name any file: shown
    in the chat as they are, Gradio would serve it (the server's code, a logins file)."""
    from gradio.utils import get_upload_folder

    if not isinstance(path, str) or not path:
        return None
    try:
        resolved = Path(path).resolve()
        ours = [Path(get_upload_folder()).resolve()] + ([_imports.resolve()] if _imports is not None else [])
        if any(resolved.is_relative_to(folder) for folder in ours) and resolved.is_file():
            return resolved
    except (OSError, ValueError):
        pass
    return None


def missing_file(path) -> str:
    """The note that stands for an attached file gone from the server (a restart cleared it), or one the page
    did not store."""
    name = documents.clean_name(path)
    return MISSING_IMAGE if name.lower().endswith(IMAGE_SUFFIXES) else f"[{name}: a file no longer on this server]"


def stored_file(path) -> tuple[Path, bytes] | None:
    found = page_file(path)
    try:
        return (found, found.read_bytes()) if found else None
    except OSError:
        return None


def attached_part(path: str, images: bool = True) -> dict:
    """A file the person attached (in Gradio's upload folder) as a content part: an image (for a model that reads
    text only, a note), or a document (a ``file`` part, read as text at the door); a file gone since becomes a
    note."""
    found = stored_file(path)
    if found is None:
        return {"type": "text", "text": missing_file(path)}
    where, data = found
    if image_input.looks_like_image(data):
        return {"type": "image", "image": data} if images else {"type": "text", "text": TEXT_ONLY_IMAGE}
    return {"type": "file", "file": {"filename": where.name, "file_data": data}}


def exported_part(path: str) -> dict | None:
    """An attached file as an exported chat holds it: an image as an ``image_url`` data: URL part, the file as it
    was sent, a document as a ``file`` part (None when it is gone, or is not one the page stored)."""
    found = stored_file(path)
    if found is None:
        return None
    where, data = found
    if not image_input.looks_like_image(data):
        return {"type": "file", "file": {"filename": where.name, "file_data": documents.data_url(where.name, data)}}
    try:
        picture = image_input.from_bytes(data, "an image")
    except ValueError:
        return None
    return {"type": "image_url", "image_url": {"url": picture.data_url()}}


def imported_image(url, where: str) -> str:
    """An imported chat's data: URL image as a file the chat can show (the same image, the same file);
    ValueError if it is none."""
    picture = image_input.read(url, where)
    suffix = {"image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif"}.get(picture.mime, ".png")
    path = imports_folder() / f"{import_name(picture.digest.encode())}{suffix}"
    if not path.exists():
        if picture.encoded is not None:
            path.write_bytes(picture.encoded)
        else:
            picture.pixels.save(path, format="PNG")
    return str(path)


def imported_file(file, where: str) -> str:
    """An imported chat's document (a ``file`` part's ``file``) as a file the chat can show, under its own name;
    ValueError if it is not one a model could read."""
    name, data = documents.sent_file(file, where)
    documents.text_of(data, f"{where} ({name})")
    folder = imports_folder() / import_name(data)
    try:
        folder.mkdir(exist_ok=True)
        path = folder / name
        if not path.exists():
            path.write_bytes(data)
    except OSError as e:
        raise ValueError(f"{where} ({name}) could not be stored: {e.strerror}") from e
    return str(path)


def import_name(content: bytes) -> str:
    return hmac.new(_IMPORT_KEY, content, hashlib.sha256).hexdigest()[:32]


def check_attached(history: list[dict]) -> None:
    """ValueError where the chat names more files than a request may hold, before any is read (the browser
    hands the chat over, and could name one large upload a thousand times)."""
    named = sum(len(files_of(m.get("content"))) for m in history if m.get("role") == "user")
    if named > MAX_ATTACHED:
        raise ValueError(f"the chat holds {named} attached files; at most {MAX_ATTACHED} are allowed")


def to_messages(
    system_prompt: str, history: list[dict], message, images: bool = True, continuing: bool = False
) -> list[dict]:
    """The conversation as the model sees it: titled messages (thinking, stats, notices) are the page's own;
    ``message`` is the new user message's content (text, or parts with images; ``continuing``: none, the history
    ends with an answer to continue). For a model that reads text only (``images`` False) earlier images become
    a note, so a chat that had them goes on after a switch."""
    new = [] if continuing else [{"role": "user", "content": message}]
    read = functools.cache(functools.partial(attached_part, images=images))  # a file named twice is read once
    return [*openai_messages(history, system_prompt, read), *new]


def stats_line(stats, stopped: bool = False) -> str:
    """What the reply cost, and whether its prompt was found in the session's cache or read anew."""
    if stats.prompt_tokens is None:
        prompt = "prompt size not reported by the server"
    elif stats.cached_tokens is None:  # a remote model: its upstream's cache is its own
        prompt = f"{stats.prompt_tokens} prompt tokens"
    elif stats.cached_tokens:
        where = {"host": " (from host RAM)", "disk": " (read from disk)", "shared": " (a shared prefix)"}.get(
            stats.cache_tier, ""
        )
        prompt = f"{stats.prompt_tokens} prompt tokens, {stats.cached_tokens} from cache{where}"
    else:
        prompt = f"{stats.prompt_tokens} prompt tokens, all read anew (nothing cached)"
    line = f"{stats.ttft_s:.2f} s to first token · {stats.tokens_per_s:.1f} tok/s · {prompt}"
    return f"■ Stopped · {line}" if stopped else line


# A page-only note (stats, notices) is a titled message with nothing to expand: shown as a plain caption, without
# the box and the expand arrow Gradio gives a message with a title. A thinking message keeps both: collapsed, it
# too shows only its title, but that title always holds a spinner (while it thinks) or a duration (after).
PAGE_CSS = """
.message.thought:has(.thought-group > .title:only-child):not(:has(.duration, .loading-spinner)),
.thought-group:has(> .title:only-child):not(:has(.duration, .loading-spinner)) {
  border: none; background: none; box-shadow: none; padding: 0 4px;
}
.thought-group > .title:only-child:not(:has(.duration, .loading-spinner)) {
  pointer-events: none; font-size: var(--text-sm); opacity: 0.8;
}
.thought-group > .title:only-child:not(:has(.duration, .loading-spinner)) .arrow { display: none; }
#chat-list .wrap, #chat-found .wrap { flex-direction: column; align-items: stretch; }
#model-picker input, #forks input { text-overflow: ellipsis; padding-right: var(--size-8); }
#versions { flex: 0 0 auto !important; width: max-content !important; flex-wrap: nowrap !important; }
#versions > * { flex-shrink: 0 !important; }
#version { flex: 0 0 auto !important; width: auto; overflow: visible !important; white-space: nowrap; }
#version { align-self: center; }
#version [data-testid="status-tracker"] { display: none; }
"""


THINKING = "💭 Thinking"  # the title of a reply's reasoning in the chat


def note(title: str) -> gr.ChatMessage:
    """A page-only line in the chat (stats, notices): titled, so it is never sent back to the model."""
    return gr.ChatMessage(role="assistant", content="", metadata={"title": title, "status": "done"})


def reply_messages(
    notes: list, answer: str, reasoning: str, stats, thought_s: float | None = None, stopped: bool = False
) -> list[gr.ChatMessage]:
    """One reply as the chat shows it: notices, the collapsible thinking (``thought_s``: how long it thought,
    None while it still does), the answer, the stats line (marked when Stop ended the reply)."""
    shown = list(notes)
    if reasoning:
        thought = {"title": THINKING, "status": "pending"}
        if thought_s is not None:
            thought.update(status="done", duration=max(0.1, round(thought_s, 1)))
        shown.append(gr.ChatMessage(role="assistant", content=reasoning, metadata=thought))
    shown.append(gr.ChatMessage(role="assistant", content=answer))
    if stats is not None:
        shown.append(note(stats_line(stats, stopped)))
    elif stopped:
        shown.append(note("■ Stopped"))
    return shown


class Replies:
    """Generates the page's replies and keeps each tab's running stream, so Stop and leaving the page end it
    (stopping the model before its next token) instead of waiting for garbage collection.

    A tab's running reply is keyed by the tab; the cache a reply reads and extends is keyed by its chat, so a
    chat reopened from the history (in this tab or after a reload) finds its cache while the server holds it."""

    def __init__(self, registry: ModelRegistry, *, exposed: bool = False):
        self.registry = registry
        self.exposed = exposed
        self._streams: dict[SessionKey, ChatStream | None] = {}  # None: a reply is being prepared
        self._stopped: set[SessionKey] = set()
        self._chats: dict[SessionKey, set[SessionKey]] = {}  # a tab's chat caches, freed with it where private
        self._lock = threading.Lock()

    def respond(self, message, history, request: gr.Request, *settings_values):
        """The ``/chat`` API's function: streams the reply's messages (notices, thinking, answer, stats) to
        ``message`` after ``history``. Gradio inserts ``request`` where its annotation stands; ChatSettings
        orders the values after it."""
        tab = page_session(request, self.exposed)
        yield from self._reply(message, history, tab, tab, ChatSettings.from_inputs(settings_values))

    def respond_in_chat(self, history, chat_id, request: gr.Request, *settings_values):
        """The page's turn: ``history`` ends with the person's new message; yields the whole chat as it grows."""
        if not history or history[-1].get("role") != "user":
            return
        tab = page_session(request, self.exposed)
        earlier, message = history[:-1], history[-1]
        try:
            check_attached(history)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        cache = self.chat_session(request, chat_id)
        settings = ChatSettings.from_inputs(settings_values)
        content = page_content(message.get("content"), attached_part)
        for reply in self._reply(content, earlier, tab, cache, settings):
            yield [*earlier, message, *reply]

    def continue_in_chat(self, history, chat_id, request: gr.Request, *settings_values):
        """The page's Continue: the chat's last answer (cut off by the token limit or Stop) goes on where it
        ended, in the same message; its notices and thinking stay, its stats line is the continuation's."""
        found = chat_history.last_answer(history or [])
        if found is None:
            return
        start, at = found
        tab = page_session(request, self.exposed)
        cache = self.chat_session(request, chat_id)
        settings = ChatSettings.from_inputs(settings_values)
        # Its thinking stays; its notices (turns left out, an error) are the old reply's and go.
        earlier = history[:start]
        kept = [m for m in history[start:at] if (m.get("metadata") or {}).get("title") == THINKING]
        answer = text_of(history[at].get("content"))
        for reply in self._reply(None, history[: at + 1], tab, cache, settings, answer=answer):
            yield [*earlier, *kept, *reply]

    def chat_session(self, request: gr.Request, chat_id) -> SessionKey:
        """The cache of a chat the page made, under the person the tab belongs to (the tab's own without one)."""
        tab = page_session(request, self.exposed)
        chat_id = valid_chat_id(chat_id)
        if chat_id is None:
            return tab
        session = SessionKey("page", tab.principal, f"chat:{chat_id}")
        with self._lock:
            self._chats.setdefault(tab, set()).add(session)
        return session

    def _reply(
        self, message, history: list[dict], tab: SessionKey, cache: SessionKey, settings: ChatSettings, answer=None
    ):
        """The reply's messages as they grow: to ``message`` after ``history``, or (``answer`` given) going on
        with that answer, the history's last message."""
        continuing = answer is not None
        try:
            check_attached(history)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        if self.registry.model is None:
            waiting = note("⏳ Waiting for the model to load (the header shows its progress)…")
            yield [waiting, *([gr.ChatMessage(role="assistant", content=answer)] if answer else [])]
        try:
            model = self.registry.wait_ready(timeout=MODEL_WAIT_S)
        except RuntimeError as e:
            raise gr.Error(str(e)) from e
        if not self._begin(tab):  # Stop was pressed before the reply started
            yield reply_messages([], answer or "", "", None, stopped=True)
            return
        messages = to_messages(settings.system_prompt, history, message, model.capabilities.images, continuing)
        try:
            stream = model.stream(settings.request(model, messages, cache, continue_final=continuing))
        except ValueError as e:  # the input is wrong: a message box, and the chat stays as it was
            self._release(tab, None)
            raise gr.Error(str(e)) from e
        except Exception as e:
            self._release(tab, None)
            log.exception("could not start a reply")
            failure = note(f"⚠️ could not start the reply ({type(e).__name__}); see the server log")
            yield reply_messages([failure], answer, "", None) if continuing else [failure]
            return
        stream = self.registry.metrics.track(stream, "page")
        if not self._hold(tab, stream):  # Stop was pressed while the reply was being prepared
            stream.close()
            yield reply_messages([], answer or "", "", None, stopped=True)
            return
        notes = []
        if stream.dropped_turns:
            notes.append(
                note(
                    f"⚠️ {stream.dropped_turns} earlier turn(s) left out: the conversation no longer fits the "
                    f"model's context of {model.info.context_length} tokens"
                )
            )
        answer, reasoning, started, thought_s = answer or "", "", time.perf_counter(), None
        try:
            for chunk in stream:
                answer += chunk.text
                reasoning += chunk.reasoning
                if thought_s is None and (answer or chunk.finish_reason):
                    thought_s = time.perf_counter() - started
                stopped = chunk.finish_reason == "cancelled"
                yield reply_messages(notes, answer, reasoning, chunk.stats, thought_s, stopped)
        except BackendError as e:
            thought_s = thought_s or time.perf_counter() - started
            yield reply_messages([*notes, note(f"⚠️ {e}")], answer, reasoning, None, thought_s)
        except Exception as e:  # shown as one line in the chat; the traceback goes to the server log
            log.exception("generation failed")
            thought_s = thought_s or time.perf_counter() - started
            failure = note(f"⚠️ internal error while generating ({type(e).__name__}); see the server log")
            yield reply_messages([*notes, failure], answer, reasoning, None, thought_s)
        finally:
            self._release(tab, stream)

    def announce(self, request: gr.Request) -> None:
        """The page is about to ask for a reply (it waits in the queue meanwhile): a Stop from now on counts."""
        tab = page_session(request, self.exposed)
        with self._lock:
            self._stopped.discard(tab)
            self._streams.setdefault(tab, None)

    def stop(self, request: gr.Request) -> None:
        """The Stop button: the tab's running reply ends at its next token with its stats (a reply not started
        yet never starts)."""
        self._stop(page_session(request, self.exposed), close=False)

    def end(self, request: gr.Request) -> None:
        """The tab's running reply is closed (its turn was undone, or its chat deleted): it generates no more."""
        self._stop(page_session(request, self.exposed), close=True)

    def forget(self, request: gr.Request) -> None:
        """Leaving the page: the tab's reply is closed and the tab's own cache freed. On a server open to others
        without logins the tab's chats go too, since nobody can reach them again; otherwise a chat's cache
        stays (the chat is saved in the browser) until memory is needed."""
        tab = page_session(request, self.exposed)
        self._stop(tab, close=True)
        with self._lock:
            chats = self._chats.pop(tab, set())
            self._streams.pop(tab, None)
            self._stopped.discard(tab)
        for session in [tab, *(chats if tab.principal.startswith("tab:") else ())]:
            self.registry.clear_session(session)

    def forget_chat(self, request: gr.Request, chat_id) -> None:
        """A chat deleted from the history: its cache is freed."""
        if valid_chat_id(chat_id):
            self.registry.clear_session(self.chat_session(request, chat_id))

    def _stop(self, tab: SessionKey, *, close: bool) -> None:
        with self._lock:
            if tab in self._streams and self._streams[tab] is None:
                self._stopped.add(tab)
            stream = self._streams.get(tab)
        if stream is not None:
            stream.close() if close else stream.cancel()

    def _begin(self, tab: SessionKey) -> bool:
        """A new reply for the tab: an earlier one still running is closed. False if Stop came first."""
        with self._lock:
            previous = self._streams.get(tab)
            stopped = tab in self._stopped
            self._stopped.discard(tab)
            self._streams[tab] = None
        if previous is not None:
            previous.close()
        return not stopped

    def _hold(self, tab: SessionKey, stream: ChatStream) -> bool:
        """Records the tab's running reply; False if Stop came while it was being prepared."""
        with self._lock:
            if tab in self._stopped:
                self._stopped.discard(tab)
                return False
            self._streams[tab] = stream
            return True

    def _release(self, tab: SessionKey, stream: ChatStream | None) -> None:
        with self._lock:
            if tab in self._streams and self._streams[tab] is stream:
                del self._streams[tab]
        if stream is not None:
            stream.close()


TEXT_ONLY = "Type a message… or attach text files and PDFs with the clip (text only: no images)"
WITH_IMAGES = "Type a message… or attach images, text files and PDFs with the clip"


def family_controls(model: ChatModel, thinking: bool | None = None) -> tuple:
    """Updates for temperature, top-p, top-k, the thinking box and its budget, and the message box (whether it
    takes images): the defaults shown for ``model`` in a thinking mode (None: its default mode)."""
    shown = shown_defaults(model, thinking)
    # A remote model's upstream has no budget field; only a local model that thinks offers one.
    budget = model.capabilities.thinking and model.family is not None
    images = model.capabilities.images
    return (
        gr.update(value=shown["temperature"]),
        gr.update(value=shown["top_p"]),
        gr.update(value=shown["top_k"]),
        gr.update(visible=model.capabilities.thinking, value=shown["thinking"]),
        gr.update(visible=budget),
        gr.update(placeholder=WITH_IMAGES if images else TEXT_ONLY),
    )


BASE_MODEL_NOTE = (
    "ℹ️ This is a **base model**: it continues text rather than following instructions. It is asked in a plain "
    "Question/Answer transcript, which keeps short factual questions on topic; longer requests wander or repeat. "
    "For a real chat, where the Hugging Face Hub is reachable: "
    "`python app.py --model Qwen/Qwen3-0.6B`"
)


def progress_text(registry: ModelRegistry) -> str:
    if registry.progress is None:
        return ""
    fraction, message = registry.progress
    return f" {message} ({fraction:.0%})"


def info_text(registry: ModelRegistry) -> str:
    if registry.unloaded:
        return "⏹ No model is loaded (the operator freed it): choose one in the Model list."
    if registry.model is None:
        return f"⏳ {registry.load_error or f'loading {registry.loading or registry.ids[0]}…{progress_text(registry)}'}"
    info = registry.get().info
    weights = {
        "fp16": "weights in fp16, sums in fp32",
        "nf4": "4-bit NF4 weights",
        "int8": "int8 weights and activations, sums in fp32" if info.device == "cpu" else "8-bit weights",
        "none": f"{info.dtype} weights",
    }.get(info.quantization, f"{info.quantization} weights")
    reads = "reads images" if registry.get().capabilities.images else "text only"
    parts = [f"**{info.name}**", info.family or "remote model", weights, reads]
    if info.dtype:
        parts.append(f"on {info.device}")
    if info.memory_footprint_bytes:
        parts.append(f"{info.memory_footprint_bytes / 2**20:.0f} MiB")
    if info.context_length:
        parts.append(f"context {info.context_length}")
    line = " · ".join(parts)
    if registry.loading and registry.loading != registry.current_id:
        line += f"\n\n⏳ switching to {registry.loading}…{progress_text(registry)}"
    if registry.get().capabilities.base_model:
        line += "\n\n" + BASE_MODEL_NOTE
    return line


def model_header(registry: ModelRegistry) -> tuple[gr.Dropdown, gr.Markdown]:
    # Each side keeps a readable width: on a phone the model info wraps below the dropdown instead of being
    # squeezed beside it.
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            dropdown = gr.Dropdown(
                registry.ids,
                value=registry.current_id,
                label="Model",
                info="Switching loads the model for everyone using this server.",
                elem_id="model-picker",
            )
        with gr.Column(scale=2, min_width=300):
            info = gr.Markdown(info_text(registry), elem_id="model-info")
    return dropdown, info


# The third row of sampling controls: (setting, low, high, step, label, what it does).
PENALTY_CONTROLS = (
    ("min_p", 0, 1, 0.01, "Min-p (0 = off)", "Drops tokens less likely than this share of the likeliest."),
    ("presence_penalty", -2, 2, 0.1, "Presence penalty", "Lowers a token once it is in the answer."),
    ("frequency_penalty", -2, 2, 0.1, "Frequency penalty", "Lowers a token each time it is in the answer."),
)
# The fourth row: llama.cpp's samplers against loops and for variety.
VARIETY_CONTROLS = (
    ("dry_multiplier", 0, 2, 0.05, "DRY (0 = off)", "Lowers words that would repeat an earlier passage (try 0.8)."),
    ("xtc_probability", 0, 1, 0.05, "XTC chance (0 = off)", "How often the likeliest choices are left out."),
    ("xtc_threshold", 0, 0.5, 0.01, "XTC threshold", "Left out: all above this likelihood but the least likely."),
)


def settings_panel(registry: ModelRegistry) -> dict[str, gr.components.Component]:
    """The system prompt, sampling and thinking controls, by ChatSettings field name. Their first values are
    placeholders until the loaded model's family sets them (``family_controls``)."""
    shown = {**PLACEHOLDERS, "thinking": False}
    if registry.model is not None:
        shown = shown_defaults(registry.model, None)
    can_think = registry.model is not None and registry.model.capabilities.thinking
    with gr.Accordion("System prompt and sampling", open=True, elem_id="settings"):
        controls = {"system_prompt": gr.Textbox("", label="System prompt", lines=2)}
        with gr.Row():
            controls["temperature"] = gr.Slider(
                0, 2, value=shown["temperature"], step=0.05, label="Temperature (0 = greedy)"
            )
            controls["top_p"] = gr.Slider(0.05, 1, value=shown["top_p"], step=0.05, label="Top-p")
            controls["top_k"] = gr.Slider(0, 200, value=shown["top_k"], step=1, label="Top-k (0 = off)")
        with gr.Row():
            controls["max_new_tokens"] = gr.Slider(
                16, 4096, value=shown["max_new_tokens"], step=16, label="Max new tokens"
            )
            controls["repetition_penalty"] = gr.Slider(
                1.0, 2.0, value=shown["repetition_penalty"], step=0.05, label="Repetition penalty"
            )
            controls["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
        with gr.Row():
            for name, low, high, step, label, info in PENALTY_CONTROLS:
                controls[name] = gr.Slider(low, high, value=shown[name], step=step, label=label, info=info)
        with gr.Row():
            for name, low, high, step, label, info in VARIETY_CONTROLS:
                controls[name] = gr.Slider(low, high, value=shown[name], step=step, label=label, info=info)
    with gr.Row(equal_height=True):
        controls["thinking"] = gr.Checkbox(
            value=shown["thinking"],
            visible=can_think,
            label="Thinking (reasoning shown collapsed, never sent back to the model)",
            scale=3,
        )
        controls["thinking_budget"] = gr.Number(
            value=0,
            minimum=0,
            precision=0,
            visible=can_think and registry.model.family is not None,
            label="Thinking budget (tokens, 0 = no limit)",
            info="After this many tokens of reasoning the model is told to answer.",
            scale=2,
            min_width=200,
        )
    return controls


# Replies render LaTeX in $$…$$, \(…\) and \[…\] (a single $ is a price); code blocks get a copy button.
LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
]
# Gradio mounts an accordion's contents when it is first opened, and an update sent to a control not mounted yet
# can be lost (a reopened chat's system prompt would silently not apply). So the accordions are built open and
# closed once the page has mounted them. On a phone the chats' panel starts closed (its toggle opens it).
SETTLE_LAYOUT = """() => {
  for (const id of ["settings", "chat-tools"]) document.querySelector(`#${id} .label-wrap.open`)?.click();
  if (window.innerWidth < 768) document.querySelector(".sidebar.open .toggle-button")?.click();
}"""
# The export leaves the server as a file download made in the browser: the chat never touches the server's disk.
DOWNLOAD_JS = """(text, title) => {
  if (!text) return;
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], {type: "application/json"}));
  link.download = (title || "chat").replace(/[^\\w -]+/g, "").trim().slice(0, 60) + ".json";
  document.body.appendChild(link); link.click(); link.remove();
}"""

# Tabs of one browser share one list of saved chats. Each tab holds its own copy (Gradio's BrowserState) and writes
# it whole, so a tab that saved with a stale copy dropped what the others had saved. Now each step that changes
# the chats also gives what it changed, as [id, record or null, version] (``chat_history.changes``, into the hidden
# #chat-changes box); the tab tells the others, and every tab keeps the newest version of each chat it has heard
# of. Whenever its copy lacks one (a change arrived, or a step's result was computed from a copy taken before it
# did), a click on the hidden #chat-sync button lays them over the copy (CHAT_SYNC_JS) and the server lists it,
# and shows the open chat again where another tab changed it and no reply is running here. A chat missing from a
# copy is never taken as deleted; an older version never replaces a newer one. In the page's head: it is there
# before the saved chats are first read.
CHAT_SYNC_HEAD = """<script>
window.llmChats = (() => {
  const name = "llm-chat-saved:" + location.pathname;  // apps behind one origin at other paths stay apart
  const channel = "BroadcastChannel" in window ? new BroadcastChannel(name) : null;
  const known = {};  // id -> [version, record or null (deleted)]: the newest this tab has heard of
  let loaded = false, pending = null;
  const tries = {};
  const version = (record) => (record && typeof record.v === "number" ? record.v : 0);
  const learn = (changes) => {
    let news = false;
    for (const change of Array.isArray(changes) ? changes : []) {
      const [id, record, v] = Array.isArray(change) ? change : [];
      if (typeof id !== "string" || typeof v !== "number" || (record !== null && typeof record !== "object")) continue;
      const [was, held] = known[id] || [-1, undefined];
      if (was < v || (was === v && record === null && held !== null)) { known[id] = [v, record]; news = true; }
    }
    return news;
  };
  const merged = (chats) => {
    const out = {...(chats || {})}, changed = [];
    for (const [id, [v, record]] of Object.entries(known)) {
      const mine = out[id];
      if (record === null) {
        if (mine && version(mine) <= v) { delete out[id]; changed.push(id); }
      } else if (!mine || version(mine) < v) { out[id] = record; changed.push(id); }
    }
    return [out, changed];
  };
  const sync = () => document.querySelector("#chat-sync")?.click();
  if (channel) channel.onmessage = (event) => { if (learn(event.data) && loaded) sync(); };
  return {
    told(text) {  // a step of this tab changed these chats
      let changes = [];
      try { changes = JSON.parse(text || "[]"); } catch (e) { return; }
      if (learn(changes) && channel) channel.postMessage(changes);
    },
    check(chats) {  // this tab's copy was read or replaced: anything newer it lacks? (Looked at once the step's
      loaded = true;  // own changes, which Gradio may hand over just after its copy, are known.)
      clearTimeout(pending);
      pending = setTimeout(() => {
        const changed = merged(chats)[1];
        const key = JSON.stringify(changed.map((id) => [id, known[id][0]]));
        tries[key] = (tries[key] || 0) + 1;  // a copy the server keeps refusing is not sent again and again
        if (changed.length && tries[key] <= 10) sync();
      }, 50);
    },
    apply(chats, chatId) {
      const [out, changed] = merged(chats);
      const stop = document.querySelector("#message button.stop-button");
      const busy = !!stop && stop.offsetParent !== null;
      return [out, chatId, JSON.stringify({ids: changed, busy})];
    },
  };
})();
</script>"""
CHAT_SYNC_JS = "(chats, chatId, _) => window.llmChats ? window.llmChats.apply(chats, chatId) : [chats, chatId, '{}']"
CHAT_CHECK_JS = "(chats) => { window.llmChats?.check(chats); }"
CHAT_TOLD_JS = "(text) => { window.llmChats?.told(text); }"


# The page's own small steps (show a message, save a chat): no queue, no spinner, not part of the API.
QUICK = {"queue": False, "show_progress": "hidden", "api_visibility": "undocumented"}


@dataclass
class ChatPanel:
    """The chat and its saved history. ``chat_id`` is the open chat's id ("" until its first message);
    ``chats`` the saved chats by id (``chat_history`` records), both kept in the browser."""

    chatbot: gr.Chatbot
    textbox: gr.MultimodalTextbox
    go_on: gr.Button  # Continue the answer
    older: gr.Button  # the version before the shown one, at the fork ``fork_at`` (chat_history.fork)
    version: gr.Markdown  # which version is shown
    newer: gr.Button
    forks: gr.Dropdown  # where the chat has several forks: which one the arrows flip
    fork_at: gr.State  # that fork's message index (None, or no fork there: the chat's last fork)
    chat_id: gr.BrowserState
    chats: gr.BrowserState
    picker: gr.Radio
    search: gr.Textbox  # words to find in the saved chats
    found: gr.Radio  # the saved chats that hold them (chat_history.search)
    # What a search reads of the saved chats (chat_history.search_index), made whenever they change (also when the
    # page first reads them): a keystroke sends the words only, not every saved chat (up to MAX_STORED_BYTES each
    # time). None where the server has none for this tab (gone with its session's state): the search then asks
    # for the chats once (reindex, clicked by INDEX_AGAIN_JS).
    searched: gr.State
    reindex: gr.Button
    index_lost: gr.Textbox
    title: gr.Textbox
    new_chat: gr.Button
    rename: gr.Button
    delete: gr.Button
    export: gr.Button
    export_text: gr.Textbox
    importer: gr.UploadButton
    sync: gr.Button  # hidden: clicked by CHAT_SYNC_HEAD's script when this tab's copy lacks a newer version
    changes: gr.Textbox  # hidden: what the last step changed in the chats (JSON), for the other tabs
    incoming: gr.Textbox  # hidden: what CHAT_SYNC_JS laid over the copy, and whether a reply runs here

    @property
    def locked(self) -> list:
        """What may not change while a reply streams into the open chat."""
        return [
            *(self.picker, self.found, self.new_chat, self.rename, self.delete, self.importer),
            *(self.go_on, self.older, self.newer, self.forks),
        ]


def history_panel(secret: str) -> dict:
    """The saved chats (in the browser's storage, encrypted with the server's key): a list to reopen them, and
    rename, delete, export and import."""
    parts = {
        "chat_id": gr.BrowserState("", storage_key="llm_chat_open", secret=secret),
        "chats": gr.BrowserState({}, storage_key="llm_chat_saved", secret=secret),
    }
    with gr.Sidebar(label="Chats", open=True, width=280):
        parts["new_chat"] = gr.Button("+ New chat", variant="primary", size="sm")
        parts["search"] = gr.Textbox(
            placeholder="Search chats",
            show_label=False,
            max_lines=1,
            max_length=200,
            container=False,
            elem_id="chat-search",
        )
        parts["found"] = gr.Radio([], value=None, label="Found", visible=False, elem_id="chat-found")
        parts["searched"] = gr.State(None)
        parts["reindex"] = gr.Button("Index", visible="hidden", elem_id="chat-reindex")
        parts["index_lost"] = gr.Textbox(visible="hidden")
        parts["picker"] = gr.Radio([], value=None, label="Saved in this browser", elem_id="chat-list")
        with gr.Accordion("Rename, delete, export, import", open=True, elem_id="chat-tools"):
            parts["title"] = gr.Textbox(label="Name of the open chat", max_lines=1, max_length=chat_history.MAX_TITLE)
            with gr.Row():
                parts["rename"] = gr.Button("Rename", size="sm")
                parts["delete"] = gr.Button("Delete", size="sm", variant="stop")
            with gr.Row():
                parts["export"] = gr.Button("Export JSON", size="sm")
                parts["importer"] = gr.UploadButton("Import JSON", size="sm", file_types=[".json"], type="binary")
            parts["export_text"] = gr.Textbox(visible=False)
        parts["sync"] = gr.Button("Sync", visible="hidden", elem_id="chat-sync")
        parts["changes"] = gr.Textbox(visible="hidden", elem_id="chat-changes")
        parts["incoming"] = gr.Textbox(visible="hidden")
    return parts


def chat_area() -> dict[str, gr.components.Component]:
    chatbot = gr.Chatbot(
        label="Chat", height=520, buttons=["copy"], editable="user", latex_delimiters=LATEX, elem_id="chat"
    )
    with gr.Row():
        # An answer cut off by the token limit or Stop goes on where it ended (as if the limit had been larger).
        go_on = gr.Button("↪ Continue the answer", size="sm", scale=0, min_width=180, elem_id="continue")
        # Versions of a retried answer or an edited message (shown where the chat has some: version_controls).
        hidden = {"size": "sm", "scale": 0, "min_width": 36, "visible": False}
        with gr.Row(elem_id="versions"):  # kept on one line where the row wraps (a phone)
            older = gr.Button("◀", elem_id="older-version", **hidden)
            version = gr.Markdown("", elem_id="version", visible=False, container=False, scale=0, min_width=100)
            newer = gr.Button("▶", elem_id="newer-version", **hidden)
            forks = gr.Dropdown(
                [], show_label=False, container=False, visible=False, scale=0, min_width=170, elem_id="forks"
            )
    # Any file may be attached: documents (text files of any name, PDFs) are told from images and checked by
    # their content when the message is sent, which refuses the rest with the reason (llm_backends.documents).
    textbox = gr.MultimodalTextbox(
        placeholder="Type a message…",
        show_label=False,
        sources=["upload"],
        file_types=["file"],
        file_count="multiple",
        submit_btn=True,
        stop_btn=False,
        autofocus=True,
        max_lines=8,
        elem_id="message",
    )
    parts = {"chatbot": chatbot, "textbox": textbox, "go_on": go_on, "older": older, "version": version}
    return {**parts, "newer": newer, "forks": forks, "fork_at": gr.State(None)}


def settings_of(values: Sequence) -> dict:
    """The controls' values as saved with a chat."""
    return asdict(ChatSettings.from_inputs(values))


def saved_settings(controls: dict, settings: dict | None) -> list:
    """Updates putting a saved chat's settings back in the controls (left as they are where it has none, or
    where the browser's copy holds a value of the wrong type). A chat saved before the later settings existed
    was made with them at their defaults, which it gets back."""
    later = {f.name: f.default for f in fields(ChatSettings) if f.default is not MISSING}
    settings = {**later, **settings_in_range(controls, settings)} if settings else {}
    return [gr.update(value=settings[f.name]) if f.name in settings else gr.update() for f in fields(ChatSettings)]


def settings_in_range(controls: dict, settings) -> dict:
    """The saved or imported settings of the right type and within their controls' ranges (the browser's copy
    may hold anything; a value out of range would fail every reply until changed)."""
    clean = chat_history.clean_settings(settings, SETTING_KINDS)
    for name, value in list(clean.items()):
        low, high = getattr(controls[name], "minimum", None), getattr(controls[name], "maximum", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (low is not None and value < low) or (high is not None and value > high):
                del clean[name]
    return clean


def wire_chat(panel: ChatPanel, replies: Replies, controls: dict, config: AppConfig) -> None:
    """The chat's events: send, edit, retry, undo, Stop, clear; each turn ends by saving the chat."""
    settings = [controls[f.name] for f in fields(ChatSettings)]
    quick = QUICK
    go = gr.State(False)  # whether the turn's first step asked for a reply

    def reply(asked: bool, history, chat_id, request: gr.Request, *values):
        if asked:
            yield from replies.respond_in_chat(history, chat_id, request, *values)

    def go_on_reply(asked: bool, history, chat_id, request: gr.Request, *values):
        if asked:
            yield from replies.continue_in_chat(history, chat_id, request, *values)

    if config.on_spaces and os.environ.get("SPACE_ID"):
        try:
            import spaces

            reply, go_on_reply = spaces.GPU(duration=120)(reply), spaces.GPU(duration=120)(go_on_reply)
        except ImportError:
            pass

    def busy(yes: bool, **textbox) -> list:
        """While a reply streams nothing else may start a turn: the box offers Stop only."""
        box = gr.update(submit_btn=not yes, stop_btn=yes, interactive=not yes, **textbox)
        return [box, *[gr.update(interactive=not yes)] * len(panel.locked)]

    def begin(
        request: gr.Request, history: list, chat_id, chats, values, text, files=(), forks=None, **textbox
    ) -> tuple:
        """The turn's first step: the person's message (text, then attached images) shown at once and saved (a
        reload or a closed tab during the reply keeps it), Stop offered; nothing if it is empty. ``forks``: the
        chat's versions where a retry or an edit set one aside (None: as saved)."""
        text = text_of(text).strip()
        if not text and not files:  # nothing to send: the page stays as it is (a turn under way keeps its flag)
            return (*[gr.skip()] * (len(panel.locked) + 5), gr.skip(), gr.skip())
        flips = len(history) if forks is not None else gr.skip()  # a retry or an edit: the arrows flip its fork
        replies.announce(request)
        chat_id = valid_chat_id(chat_id) or chat_history.new_chat_id()
        content = [*({"path": path} for path in files), text] if files else text
        history = [*history, {"role": "user", "content": content}]
        chats, shown, changed = store(history, chat_id, chats, values, forks)
        box, picker, *locked = busy(True, **textbox)
        return (box, {**picker, **shown}, *locked, history, chat_id, chats, changed, True, flips)

    def send(message, history, chat_id, chats, request: gr.Request, *values):
        message = message or {}
        # The box gives its files as paths in Gradio's upload folder.
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        text = message.get("text", "")
        return begin(request, history, chat_id, chats, values, text, [f for f in files if f], value=None)

    def set_aside(chat_id, chats, at: int) -> list | None:
        """The chat's versions with its saved tail from message ``at`` on kept as an earlier one (the page's own
        copy of the message already holds an edit's new text)."""
        record = chat_history.record_of(chats, chat_id)
        return None if record is None else chat_history.fork(record["messages"], chat_history.forks_of(record), at)

    def edit(history, chat_id, chats, data: gr.EditData, request: gr.Request, *values):
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        kept = files_of(history[index].get("content")) if index < len(history) else []  # the text is what changed
        forks = set_aside(chat_id, chats, index)
        return begin(request, history[:index], chat_id, chats, values, data.value, kept, forks)

    def retry(history, chat_id, chats, data: gr.RetryData, request: gr.Request, *values):
        users = [i for i, m in enumerate(history[: data.index + 1]) if m.get("role") == "user"]
        last = users[-1] if users else len(history)
        content = history[last].get("content") if users else ""
        forks = set_aside(chat_id, chats, last) if users else None
        return begin(request, history[:last], chat_id, chats, values, content, files_of(content), forks)

    def undo(history, request: gr.Request):
        replies.end(request)  # a reply still running for the undone turn would go on to its token limit
        users = [i for i, m in enumerate(history) if m.get("role") == "user"]
        if not users:
            return history, gr.update()
        content = history[users[-1]].get("content")
        return history[: users[-1]], {"text": text_of(content), "files": files_of(content)}

    def save(history, chat_id, chats, *values):
        return store(history, chat_id, chats, values)

    def store(history, chat_id, chats, values, forks=None):
        """The chats with the open chat saved (deleted where it has no message left), their list, and what
        changed (for the other tabs). ``forks``: its versions (None: those saved that still fit)."""
        before, chat_id = chats, valid_chat_id(chat_id)
        if chat_id and any(m.get("role") == "user" for m in history):
            chats = chat_history.upsert(chats, chat_id, history, settings_of(values), forks=forks)
        elif chat_id:
            chats = chat_history.delete(chats, chat_id)
        return chats, listing(chats, chat_id), changes_text(before, chats)

    def finish(asked: bool, history, chat_id, chats, *values):
        if not asked:
            return [gr.skip()] * (len(panel.locked) + 4)
        return (*busy(False), *save(history, chat_id, chats, *values))

    def recover(asked: bool, history, chat_id, chats, *values):
        """After a reply that failed (its error shown): the page unlocked, the unanswered message back in the box
        to change or send again, and the chat saved as it was before it: a failed retry or edit shows the version
        it would have replaced (and leaves the box empty where that version asks the same)."""
        if not asked:
            return [gr.skip()] * (len(panel.locked) + 5)
        users = [i for i, m in enumerate(history) if m.get("role") == "user"]
        last = users[-1] if users else len(history)
        content = history[last].get("content") if users else ""
        box = {"text": text_of(content), "files": files_of(content)}
        record = chat_history.record_of(chats, chat_id)
        back = chat_history.drop_shown(history, chat_history.forks_of(record, history), last) if record else None
        if back is None:
            history, forks = history[:last], None
        else:
            history, forks = back
            again = history[last].get("content")
            if (text_of(again), files_of(again)) == (box["text"], box["files"]):
                box = {"text": "", "files": []}
            history = chat_history.shown_messages(history, page_file, missing_file)
        return (*busy(False, value=box), history, *store(history, chat_id, chats, values, forks))

    turn = [panel.textbox, *panel.locked, panel.chatbot, panel.chat_id, panel.chats, panel.changes, go, panel.fork_at]
    saved = [panel.chatbot, panel.chat_id, panel.chats, *settings]
    finished = [panel.textbox, *panel.locked, panel.chats, panel.picker, panel.changes]  # what a turn's end sets
    for trigger, fn, inputs in (
        (panel.textbox.submit, send, [panel.textbox, *saved]),
        (panel.chatbot.edit, edit, saved),
        (panel.chatbot.retry, retry, saved),
    ):
        answered = trigger(fn, inputs, turn, **quick).then(
            reply,
            [go, panel.chatbot, panel.chat_id, *settings],
            [panel.chatbot],
            concurrency_limit=config.concurrency,
            api_visibility="undocumented",
        )
        answered.success(finish, [go, *saved], finished, **quick)
        # Without this a failed reply (a bad setting, a prompt too long, no model) left the page locked, Stop only.
        unlocked = [panel.textbox, *panel.locked, panel.chatbot, panel.chats, panel.picker, panel.changes]
        answered.failure(recover, [go, *saved], unlocked, **quick)
    going = gr.State(False)  # whether Continue's first step found an answer to continue

    def go_on(history, request: gr.Request):
        """Continue's first step: Stop offered, nothing if the chat does not end with an answer."""
        found = chat_history.last_answer(history or [])
        if found is None or not text_of(history[found[1]].get("content")).strip():
            gr.Warning("Nothing to continue: the chat does not end with an answer.")
            return [gr.skip()] * (len(panel.locked) + 1) + [False]
        replies.announce(request)
        return [*busy(True), True]

    # Queued (unlike the page's other quick steps) so that its warning reaches the page.
    warned = {**quick, "queue": True, "concurrency_limit": None}
    continued = panel.go_on.click(go_on, [panel.chatbot], [panel.textbox, *panel.locked, going], **warned).then(
        go_on_reply,
        [going, panel.chatbot, panel.chat_id, *settings],
        [panel.chatbot],
        concurrency_limit=config.concurrency,
        api_visibility="undocumented",
    )
    # Saved as it ends, failed or not (a failed start changed nothing in the chat).
    continued.then(finish, [going, *saved], finished, **quick)
    panel.textbox.stop(replies.stop, None, None, **quick)
    panel.chatbot.undo(undo, [panel.chatbot], [panel.chatbot, panel.textbox], **quick).then(
        save, saved, [panel.chats, panel.picker, panel.changes], **quick
    )

    def flip(step: int, fork_at, chat_id, chats, *values):
        """The open chat showing another version at the fork the arrows flip, saved so."""
        record = chat_history.record_of(chats, chat_id)
        forks = chat_history.forks_of(record)
        place = chat_history.versions(forks, fork_at)
        try:
            messages, forks = chat_history.switch(record["messages"], forks, place[0], step)
        except (TypeError, ValueError):  # no fork (another tab changed the chat), or none that way
            return [gr.skip()] * 5
        messages = chat_history.shown_messages(messages, page_file, missing_file)
        # The arrows stay on this fork, also where the version shown now holds later forks.
        return messages, *store(messages, chat_id, chats, values, forks), place[0]

    flipped = [panel.chatbot, panel.chats, panel.picker, panel.changes, panel.fork_at]
    for button, step in ((panel.older, -1), (panel.newer, 1)):
        inputs = [panel.fork_at, panel.chat_id, panel.chats, *settings]
        button.click(lambda *a, step=step: flip(step, *a), inputs, flipped, **quick)
    shown = [panel.older, panel.version, panel.newer, panel.forks]
    # The arrows flip the fork picked in the menu; after a retry or an edit (which sets fork_at) or in another
    # chat, the last one.
    pick = lambda at, chat_id, chats: (at, *version_controls(chat_id, chats, at))  # noqa: E731
    panel.forks.input(pick, [panel.forks, panel.chat_id, panel.chats], [panel.fork_at, *shown], **quick)
    panel.chats.change(version_controls, [panel.chat_id, panel.chats, panel.fork_at], shown, **quick)
    panel.chat_id.change(lambda *a: pick(None, *a), [panel.chat_id, panel.chats], [panel.fork_at, *shown], **quick)
    wire_history(panel, replies, controls)


def version_controls(chat_id, chats, fork_at) -> list:
    """The version arrows, which version is shown, and where the chat has several forks a menu of them (the
    arrows flip ``fork_at``'s, or the last); all hidden where it has none."""
    record = chat_history.record_of(chats, chat_id)
    forks = chat_history.forks_of(record)
    place = chat_history.versions(forks, fork_at)
    if place is None:
        return [gr.update(visible=False)] * 4
    at, shown, total = place
    messages = record["messages"]
    label = f"version {shown} of {total}"
    if len(forks) == 1 and any(isinstance(m, dict) and m.get("role") == "user" for m in messages[at + 1 :]):
        label += f" from {quoted(messages[at])}"  # versions of an earlier message than the last
    menu = gr.update(visible=len(forks) > 1, choices=[(f"of {quoted(messages[f['at']])}", f["at"]) for f in forks])
    return [
        gr.update(visible=True),
        gr.update(visible=True, value=label),
        gr.update(visible=True),
        {**menu, "value": at},
    ]


def quoted(message: dict, size: int = 24) -> str:
    """A message's first words, quoted (where a chat's versions part)."""
    words = " ".join(text_of(message.get("content")).split())
    return f"“{words[:size]}…”" if len(words) > size else f"“{words}”"


def changes_text(before, after) -> str:
    """What a step changed in the saved chats, as the page's other tabs take it (CHAT_SYNC_HEAD)."""
    return json.dumps(chat_history.changes(before, after), ensure_ascii=False)


# Run after a search: where the server had no index for this tab, the chats are sent once (reindex).
INDEX_AGAIN_JS = "(lost) => { if (lost) document.querySelector('#chat-reindex')?.click(); return []; }"


def found(query: str, index) -> dict:
    """The search's list: the saved chats (``chat_history.search_index``) holding the words typed (shown while
    there are words), none selected (a click on one opens it, as a link would, also where it is the open chat
    already)."""
    matches = chat_history.find(index, query, limit=chat_history.MAX_FOUND + 1)
    if not matches:
        label = "No saved chat holds these words"
    elif len(matches) > chat_history.MAX_FOUND:
        label, matches = f"The newest {chat_history.MAX_FOUND} found", matches[: chat_history.MAX_FOUND]
    else:
        label = f"Found {len(matches)}"
    return gr.update(choices=matches, value=None, visible=bool(query and query.strip()), label=label)


def listing(chats: dict, chat_id) -> dict:
    """The saved chats' list, with the open one selected."""
    return gr.update(choices=chat_history.choices(chats), value=chat_id if chat_id in chats else None)


def opened_chat(controls: dict, chat_id, chats) -> tuple:
    """Updates opening a saved chat: its id, messages, place in the list, name and settings (an empty chat where
    it is no longer saved, e.g. deleted in another tab)."""
    chats = chat_history.saved(chats)
    record = chats.get(chat_id)
    if record is None:
        return "", [], listing(chats, None), "", *saved_settings(controls, None)
    settings = saved_settings(controls, record.get("settings"))
    messages = chat_history.shown_messages(record["messages"], page_file, missing_file)
    return chat_id, messages, listing(chats, chat_id), record.get("title", ""), *settings


def wire_history(panel: ChatPanel, replies: Replies, controls: dict) -> None:
    """New chat, reopen, rename, delete (also the chat's trash button), export, import."""
    settings = [controls[f.name] for f in fields(ChatSettings)]
    quick = QUICK
    # Through the queue, since only queued events can show a warning (a bad file, a bad name); never waiting.
    told = {**quick, "queue": True, "concurrency_limit": None}

    def delete(chat_id, chats, request: gr.Request):
        replies.end(request)  # the open chat's reply, if one is running, writes into the cache freed here
        replies.forget_chat(request, chat_id)
        before, chats = chats, chat_history.delete(chats, chat_id)
        return "", chats, listing(chats, None), [], "", changes_text(before, chats)

    def rename(chat_id, title, chats):
        try:
            before, chats = chats, chat_history.rename(chats, chat_id, title)
        except ValueError as e:
            gr.Warning(f"Could not rename the chat: {e}")
            return gr.skip(), gr.skip(), gr.skip()
        return chats, listing(chats, chat_id), changes_text(before, chats)

    def export(chat_id, history, chats, *values):
        if not history:
            gr.Warning("The open chat is empty: nothing to export.")
            return "", gr.skip()
        record = chat_history.record_of(chats, chat_id) or {}
        title = record.get("title") or chat_history.title_for(history)
        record = {"title": title, "messages": history, "settings": settings_of(values)}
        body = chat_history.export_chat(record, exported_part)
        return body, title

    def import_(data, chats):
        try:
            title, messages, imported = chat_history.import_chat(
                data,
                SETTING_KINDS,
                imported_image,
                max_images=image_input.MAX_IMAGES,
                store_file=imported_file,
                max_files=documents.MAX_FILES,
            )
        except ValueError as e:
            gr.Warning(f"Could not import the chat: {e}")
            return [gr.skip()] * (len(opened) + 2)
        chat_id = chat_history.new_chat_id()
        before, chats = chats, chat_history.upsert(chats, chat_id, messages, imported, title=title)
        shown = listing(chats, chat_id)
        return chats, chat_id, messages, shown, title, *saved_settings(controls, imported), changes_text(before, chats)

    opened = [panel.chat_id, panel.chatbot, panel.picker, panel.title, *settings]
    panel.new_chat.click(lambda: ("", [], gr.update(value=None), ""), None, opened[:4], **quick)
    reopen = lambda chat_id, chats: opened_chat(controls, chat_id, chats)  # noqa: E731
    panel.picker.input(reopen, [panel.picker, panel.chats], opened, **quick)
    panel.found.input(reopen, [panel.found, panel.chats], opened, **quick).then(
        lambda: gr.update(value=None), None, panel.found, **quick
    )

    def search(query, index):
        if index is None:  # the tab's index is gone (its session's state expired): the chats are asked for
            return gr.skip(), "lost"
        return found(query, index), ""

    panel.search.change(
        search, [panel.search, panel.searched], [panel.found, panel.index_lost], trigger_mode="always_last", **quick
    ).then(None, [panel.index_lost], None, js=INDEX_AGAIN_JS, **quick)
    # Kept to date as chats are saved, renamed or deleted (here or in another tab), keeping what is selected.
    for event in (panel.chats.change, panel.reindex.click):
        event(chat_history.search_index, [panel.chats], panel.searched, **quick).then(
            found, [panel.search, panel.searched], panel.found, **quick
        )
    renamed = [panel.chats, panel.picker, panel.changes]
    panel.rename.click(rename, [panel.chat_id, panel.title, panel.chats], renamed, **told)
    removed = [panel.chat_id, panel.chats, panel.picker, panel.chatbot, panel.title, panel.changes]
    panel.delete.click(delete, [panel.chat_id, panel.chats], removed, **quick)
    panel.chatbot.clear(delete, [panel.chat_id, panel.chats], removed, **quick)
    panel.export.click(
        export, [panel.chat_id, panel.chatbot, panel.chats, *settings], [panel.export_text, panel.title], **told
    ).then(None, [panel.export_text, panel.title], None, js=DOWNLOAD_JS, **quick)
    panel.importer.upload(import_, [panel.importer, panel.chats], [panel.chats, *opened, panel.changes], **told)

    def synced(chats, chat_id, incoming, request: gr.Request):
        """The copy with the newer versions laid over it (CHAT_SYNC_JS), its list, and the open chat shown again
        where another tab changed it and no reply runs in this one, or closed where another tab deleted it (its
        reply ended: saved again, it would come back in every tab)."""
        chats = chat_history.saved(chats)
        try:
            incoming = json.loads(incoming or "{}")
        except ValueError:
            incoming = {}
        record = chats.get(chat_id) if valid_chat_id(chat_id) else None
        incoming = incoming if isinstance(incoming, dict) else {}
        changed = valid_chat_id(chat_id) is not None and chat_id in (incoming.get("ids") or ())
        if changed and record is None:
            replies.end(request)
            return chats, listing(chats, None), [], "", ""
        if changed and not incoming.get("busy"):
            shown = chat_history.shown_messages(record["messages"], page_file, missing_file)
            return chats, listing(chats, chat_id), shown, gr.skip(), gr.skip()
        return chats, listing(chats, chat_id), gr.skip(), gr.skip(), gr.skip()

    # Newer versions from other tabs laid over this tab's copy; this tab's changes told to the others (CHAT_SYNC_HEAD).
    synced_to = [panel.chats, panel.picker, panel.chatbot, panel.chat_id, panel.title]
    panel.sync.click(synced, [panel.chats, panel.chat_id, panel.incoming], synced_to, js=CHAT_SYNC_JS, **quick)
    panel.chats.change(None, [panel.chats], None, js=CHAT_CHECK_JS, **quick)
    panel.changes.change(None, [panel.changes], None, js=CHAT_TOLD_JS, **quick)


def operator_panel(config: AppConfig) -> dict:
    """Loading and freeing models from the page: shown only to the operator (``is_operator``), who is checked
    again by every handler."""
    parts = {}
    with gr.Accordion("Models (operator)", open=True, visible=False, elem_id="operator") as parts["panel"]:
        # Empty until the operator opens the page: what a component is built with reaches every visitor.
        parts["source"] = gr.Dropdown([], value=None, allow_custom_value=True, label="Load a model")
        with gr.Row():
            parts["load"] = gr.Button("Load", size="sm", variant="primary")
            parts["unload"] = gr.Button("Free the current model", size="sm")
    return parts


def wire_operator(parts: dict, registry: ModelRegistry, config: AppConfig, header: list) -> None:
    """``header``: the model dropdown, sampling controls, thinking controls and info, as switch_model updates
    them."""
    told = {"api_visibility": "private", "concurrency_limit": 1}
    unchanged = [gr.skip()] * (len(header) + 1)

    def refuse(request: gr.Request) -> bool:
        if is_operator(request, config):
            return False
        gr.Warning("Only the operator of this server can load or free models.")
        return True

    def load(text, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
        if refuse(request):
            return unchanged
        try:
            source = page_source(text, config.models_dir)
        except ValueError as e:
            gr.Warning(f"Could not load: {e}")
            return unchanged
        known = set(registry.ids)
        model_id = registry.add(source)
        try:
            model = registry.switch(model_id, progress=lambda f, msg: progress(f, desc=msg))
        except Exception as e:  # ModelLoadError, ValueError, a download that failed: the current model serves on
            if model_id not in known:  # an entry this load made; a configured one stays in the list
                registry.remove(model_id)
            serving = registry.current_id or "nothing"
            gr.Warning(f"Could not load {text}: {e}. Still serving {serving}.")
            return (gr.update(choices=registry.ids, value=registry.current_id), *unchanged[1:])
        gr.Info(f"Now serving {model_id}")
        listed = gr.update(choices=available_models(config.models_dir), value=None)
        return (gr.update(choices=registry.ids, value=model_id), *family_controls(model), info_text(registry), listed)

    def unload(request: gr.Request):
        if refuse(request):
            return unchanged
        try:
            freed = registry.unload()
        except RuntimeError as e:
            gr.Warning(str(e))
            return unchanged
        gr.Info(f"Freed {freed}" if freed else "No model was loaded")
        return (gr.update(value=None), *[gr.update()] * (len(header) - 2), info_text(registry), gr.skip())

    outputs = [*header, parts["source"]]
    parts["load"].click(load, [parts["source"]], outputs, **told)
    parts["unload"].click(unload, None, outputs, **told)


def api_chat(replies: Replies, settings: list, concurrency: int) -> None:
    """The ``/chat`` endpoint for gradio_client: the message and the settings in; the reply's messages out,
    streamed. The conversation so far is kept per client (in its Gradio session)."""
    message = gr.Textbox(visible=False)
    history = gr.State([])
    response = gr.JSON(visible=False)

    def chat(text, earlier, request: gr.Request, *values):
        for reply in replies.respond(text, earlier, request, *values):
            shown = [{"role": m.role, "content": m.content, "metadata": m.metadata or {}} for m in reply]
            yield shown, [*earlier, {"role": "user", "content": text}, *shown]

    gr.Button(visible=False).click(
        chat, [message, history, *settings], [response, history], api_name="chat", concurrency_limit=concurrency
    )


SAMPLING = ("temperature", "top_p", "top_k")


def build_app(registry: ModelRegistry, config: AppConfig) -> gr.Blocks:
    """The page: saved chats at the side; model dropdown, chat, sampling accordion, thinking toggle, stats under
    each reply."""
    replies = Replies(registry, exposed=is_exposed(config))
    hidden = {"queue": False, "api_visibility": "undocumented"}

    def switch_model(model_id, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
        if not is_operator(request, config):  # it frees every session's cache: never one visitor's choice for all
            gr.Warning(f"Only the operator switches models. Still serving {registry.current_id or 'nothing'}.")
            return (gr.update(value=registry.current_id), *[gr.update()] * 6, info_text(registry))
        try:
            model = registry.switch(model_id, progress=lambda f, msg: progress(f, desc=msg))
        except (ModelLoadError, ValueError, KeyError) as e:
            gr.Warning(f"Could not load {model_id}: {e}. Still serving {registry.current_id or 'nothing'}.")
            return (gr.update(value=registry.current_id), *[gr.update()] * 6, info_text(registry))
        gr.Info(f"Now serving {model_id}")
        return (gr.update(value=model_id), *family_controls(model), info_text(registry))

    def show_operator(request: gr.Request):
        if not is_operator(request, config):  # nor may they switch models (switch_model checks again)
            return gr.update(visible=False), gr.update(), gr.update(interactive=False)
        if config.models_dir:
            hint = f"A checkpoint folder or .gguf file of {config.models_dir}, or a Hub repo id (org/name)"
        else:
            hint = "A Hub repo id (org/name); start the server with --models-dir to load local folders and .gguf files"
        listed = gr.update(choices=available_models(config.models_dir), info=f"{hint}. Loads with progress.")
        return gr.update(visible=True), listed, gr.update()

    def on_load(chat_id, chats):
        """Once the model is ready: its family's defaults, then the open chat's own settings over them."""
        try:
            model = registry.wait_ready(timeout=MODEL_WAIT_S)
        except RuntimeError:
            return (gr.update(), *[gr.update()] * 6, info_text(registry), gr.Timer(active=True))
        shown = controls_for(model, chat_id, chats)
        return (gr.update(value=registry.current_id), *shown, info_text(registry), gr.Timer(active=True))

    def controls_for(model, chat_id, chats) -> list:
        """The family's defaults for ``model``, with the open chat's own settings over them."""
        own = settings_in_range(controls, (chat_history.record_of(chats, chat_id) or {}).get("settings"))
        defaults = family_controls(model)
        shown = [
            gr.update(value=own[name]) if name in own else update
            for name, update in zip(SAMPLING, defaults[:3], strict=True)
        ]
        thinking = defaults[3]
        if "thinking" in own and model.capabilities.thinking:
            thinking = gr.update(visible=True, value=bool(own["thinking"]))
        return [*shown, thinking, *defaults[4:]]

    built_with = list(registry.ids)  # what every visitor's list offers (the operator's own tab lists more)

    def watch(shown):
        """What another tab's operator did, shown here as a switch in the operator's tab shows it: another model
        (its family's defaults), none, or one loading (its progress). Only the model's id travels each tick."""
        if registry.loading is not None:
            return (*[gr.skip()] * 7, info_text(registry))
        if shown == registry.current_id:
            return [gr.skip()] * 8
        model = registry.model
        offered = [*dict.fromkeys([*built_with, *([registry.current_id] if registry.current_id else [])])]
        listed = gr.update(choices=offered, value=registry.current_id)
        return (listed, *(family_controls(model) if model else [gr.skip()] * 6), info_text(registry))

    with gr.Blocks(title="Local LLM chat", fill_height=True) as demo:
        history = history_panel(config.page_secret or chat_history.page_secret(cache_root()))
        dropdown, info = model_header(registry)
        chat = chat_area()
        textbox = chat["textbox"]
        controls = settings_panel(registry)
        operator = operator_panel(config)
        panel = ChatPanel(**chat, **history)
        wire_chat(panel, replies, controls, config)
        settings = [controls[f.name] for f in fields(ChatSettings)]
        api_chat(replies, settings, config.concurrency)
        sampling = [controls[name] for name in SAMPLING]
        mode = [controls["thinking"], controls["thinking_budget"], textbox]  # what family_controls sets
        dropdown.input(switch_model, [dropdown], [dropdown, *sampling, *mode, info], concurrency_limit=1)
        wire_operator(operator, registry, config, [dropdown, *sampling, *mode, info])
        mode_defaults = lambda thinking: family_controls(registry.get(), bool(thinking))[:3]  # noqa: E731
        controls["thinking"].input(mode_defaults, [controls["thinking"]], sampling, **hidden)
        # Started once this tab shows the model (on_load): a model switched or freed meanwhile, in another tab,
        # then reaches this one within WATCH_S.
        watcher = gr.Timer(WATCH_S, active=False)
        watcher.tick(watch, [dropdown], [dropdown, *sampling, *mode, info], **hidden)
        demo.load(
            lambda chat_id, chats: opened_chat(controls, chat_id, chats),
            [panel.chat_id, panel.chats],
            [panel.chat_id, panel.chatbot, panel.picker, panel.title, *settings],
            **hidden,
        ).then(
            on_load,
            [panel.chat_id, panel.chats],
            [dropdown, *sampling, *mode, info, watcher],
            api_visibility="undocumented",
            concurrency_limit=None,
        )
        demo.load(None, None, None, js=SETTLE_LAYOUT, **hidden)
        demo.load(show_operator, None, [operator["panel"], operator["source"], dropdown], **hidden)
        # While a model loads (the embedded one converts once, ~90 s) the header shows its progress each second.
        ticker = gr.Timer(1.0)
        ticker.tick(
            lambda: (info_text(registry), gr.Timer(active=registry.loading is not None)),
            None,
            [info, ticker],
            **hidden,
        )
        demo.unload(replies.forget)
    demo.queue(default_concurrency_limit=config.concurrency, max_size=256)
    return demo


def registry_for(config: AppConfig) -> ModelRegistry:
    """The models the flags name, each loaded with the flags' precision, cache budgets and mode."""
    options = {"max_cache_bytes": int(config.max_cache_gb * 2**30) if config.max_cache_gb else None}
    if config.host_cache_gb is not None:
        options["host_cache_bytes"] = int(config.host_cache_gb * 2**30)
    if config.cache_dir_gb is not None:
        options["disk_cache_bytes"] = int(config.cache_dir_gb * 2**30)
    if config.exact:
        options["exact"] = True
    return ModelRegistry(config.models, quantization=config.quantization, cache_dir=config.cache_dir, **options)


def serve(config: AppConfig, registry: ModelRegistry | None = None, **launch_kwargs):
    """Builds and launches the app, loading the first model in the background if none is loaded yet;
    returns the Blocks (launched with ``prevent_thread_lock`` by tests)."""
    check_exposure(config)
    if registry is None:
        registry = registry_for(config)
    if registry.model is None and registry.loading is None:
        registry.load_in_background(registry.ids[0])  # the page opens while the model loads
    demo = build_app(registry, config)
    block = not launch_kwargs.pop("prevent_thread_lock", False)
    launch_kwargs.setdefault("quiet", True)  # Gradio's hints would suggest share=True, which needs --auth here
    demo.launch(
        server_name=config.host,
        server_port=config.port,
        share=config.share,
        auth=config.auth or None,
        show_error=True,
        prevent_thread_lock=True,
        css=PAGE_CSS,
        head=CHAT_SYNC_HEAD,
        # Uploads are images and documents (each at most 16 MiB) and exported chats (a few of them as data: URLs).
        max_file_size=chat_history.MAX_IMPORT_BYTES,
        **launch_kwargs,
    )
    exposed = config.share or not is_loopback(config.host)
    add_openai_routes(
        demo.app,
        registry,
        api_key=config.api_keys,
        exposed=exposed,
        image_urls=config.image_urls,
        metrics_key=config.metrics_key,
    )
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    log.info(
        "Ready at http://%s:%d (OpenAI API at /v1)%s",
        host,
        config.port,
        f", shared at {demo.share_url}" if demo.share_url else "",
    )
    if block:
        demo.block_thread()
    return demo


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per HTTP request
    config = parse_args(argv)
    # A stop by SIGTERM (systemd, docker, Spaces) exits like Ctrl-C, so exit handlers run: with --cache-dir
    # they write the sessions still in memory to disk.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(config)
    except ModelLoadError as e:
        sys.exit(f"Could not load the model: {e}")


if __name__ == "__main__":
    main()
