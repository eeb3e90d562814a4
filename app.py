"""The browser chat: Gradio Blocks over llm_backends. UI only: flags, layout and wiring; no model code."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import gradio as gr

from llm_backends import BackendError, ChatModel, ChatRequest, ChatStream, ModelLoadError, SessionKey
from llm_backends.http_api import add_openai_routes
from llm_backends.loading import QUANTIZATIONS
from llm_backends.request import DEFAULT_MAX_NEW_TOKENS
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
    "concurrency": "LLM_CONCURRENCY",
    "api_key": "LLM_API_KEY",
    "insecure_no_auth": "LLM_INSECURE_NO_AUTH",
}
TRUE = {"1", "true", "yes", "on"}


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
    concurrency: int = 8
    api_keys: list[str] = field(default_factory=list)
    insecure_no_auth: bool = False
    on_spaces: bool = False


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
        help="auto: NF4 on CUDA, packed fp16 weights on x86 CPU; fp16, nf4, int8, none [LLM_QUANTIZATION]",
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
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="allow --share or a non-loopback --host without --auth (trusted networks only) [LLM_INSECURE_NO_AUTH]",
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
    config.concurrency = pick("concurrency", int) or config.concurrency
    keys = args.api_key or env.get(ENV["api_key"], "").split(",")
    config.api_keys = [k.strip() for k in keys if k.strip()]
    config.insecure_no_auth = bool(pick("insecure_no_auth", bool))
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


# --- the page ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatSettings:
    """The page's controls for one reply. Their order here is the order of ChatInterface's
    ``additional_inputs`` (and of the ``/chat`` API's parameters after the message): both are built from it."""

    system_prompt: str
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    repetition_penalty: float
    seed: int | None
    thinking: bool

    @classmethod
    def from_inputs(cls, values: Sequence) -> ChatSettings:
        return cls(**dict(zip((f.name for f in fields(cls)), values, strict=True)))

    def request(self, model: ChatModel, messages: list[dict], session: SessionKey) -> ChatRequest:
        """The reply's request; oldest turns are dropped to fit. A control still at the default the page shows
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
            seed=None if self.seed in (None, "", -1) else int(self.seed),
            thinking=None if thinking == mode_default else thinking,
            fit_context=True,
        )


# What the controls show before a model says otherwise, and for a model whose family is unknown (remote).
PLACEHOLDERS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
    "repetition_penalty": 1.0,
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
        "thinking": bool(request.thinking),
    }


def page_session(request: gr.Request, exposed: bool) -> SessionKey:
    """A browser tab's session, in the page's space, under the person it belongs to: the login that opened
    it; on a local server without logins the one person using it (""); on a server reachable by others
    without logins (a Space without LLM_AUTH, --insecure-no-auth) the tab alone, so tabs share nothing."""
    principal = request.username or (f"tab:{request.session_hash}" if exposed else "")
    return SessionKey("page", principal, request.session_hash)


def text_of(content) -> str:
    """A Gradio message's text: content arrives as a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return ""


def to_messages(system_prompt: str, history: list[dict], message: str) -> list[dict]:
    """The conversation as the model sees it: titled messages (thinking, stats, notices) are the page's own."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    for item in history:
        if (item.get("metadata") or {}).get("title"):
            continue
        if item.get("role") in ("user", "assistant"):
            messages.append({"role": item["role"], "content": text_of(item.get("content"))})
    messages.append({"role": "user", "content": message})
    return messages


def stats_line(stats) -> str:
    if stats.prompt_tokens is None:
        prompt = "prompt size not reported by the server"
    else:
        where = {"disk": " (read from disk)", "shared": " (a shared prefix)"}.get(stats.cache_tier, "")
        reused = f", {stats.cached_tokens} from cache{where}" if stats.cached_tokens else ""
        prompt = f"{stats.prompt_tokens} prompt tokens{reused}"
    return f"{stats.ttft_s:.2f} s to first token · {stats.tokens_per_s:.1f} tok/s · {prompt}"


# A page-only note (stats, notices) is a titled message with nothing to expand: shown as a plain caption, without
# the box and the expand arrow Gradio gives a message with a title. (A thinking message has content, so it keeps
# both.)
PAGE_CSS = """
.message.thought:has(.thought-group > .title:only-child),
.thought-group:has(> .title:only-child) { border: none; background: none; box-shadow: none; padding: 0 4px; }
.thought-group > .title:only-child { pointer-events: none; font-size: var(--text-sm); opacity: 0.8; }
.thought-group > .title:only-child .arrow { display: none; }
"""


def note(title: str) -> gr.ChatMessage:
    """A page-only line in the chat (stats, notices): titled, so it is never sent back to the model."""
    return gr.ChatMessage(role="assistant", content="", metadata={"title": title, "status": "done"})


def reply_messages(notes: list, answer: str, reasoning: str, stats, started: float) -> list[gr.ChatMessage]:
    """One reply as the chat shows it: notices, the collapsible thinking, the answer, the stats line."""
    shown = list(notes)
    if reasoning:
        thought = {"title": "💭 Thinking", "status": "done" if answer else "pending"}
        if answer:
            thought["duration"] = round(time.perf_counter() - started, 1)
        shown.append(gr.ChatMessage(role="assistant", content=reasoning, metadata=thought))
    shown.append(gr.ChatMessage(role="assistant", content=answer))
    if stats is not None:
        shown.append(note(stats_line(stats)))
    return shown


class Replies:
    """Generates the page's replies and keeps each tab's running stream, so Stop and leaving the page close it
    (stopping the model before its next token) instead of waiting for garbage collection."""

    def __init__(self, registry: ModelRegistry, *, exposed: bool = False):
        self.registry = registry
        self.exposed = exposed
        self._streams: dict[SessionKey, ChatStream | None] = {}  # None: a reply is being prepared
        self._stopped: set[SessionKey] = set()
        self._lock = threading.Lock()

    def respond(self, message, history, request: gr.Request, *settings_values):
        """ChatInterface's function: streams the reply as the chat's messages (notices, thinking, answer, stats).
        Gradio inserts ``request`` where its annotation stands; ChatSettings orders the values after it."""
        settings = ChatSettings.from_inputs(settings_values)
        try:
            model = self.registry.wait_ready(timeout=600)
        except RuntimeError as e:
            raise gr.Error(str(e)) from e
        session = page_session(request, self.exposed)
        self._begin(session)
        messages = to_messages(settings.system_prompt, history, message)
        try:
            stream = model.stream(settings.request(model, messages, session))
        except ValueError as e:  # the input is wrong: a message box, and the chat stays as it was
            self._release(session, None)
            raise gr.Error(str(e)) from e
        except Exception as e:
            self._release(session, None)
            log.exception("could not start a reply")
            yield [note(f"⚠️ could not start the reply ({type(e).__name__}); see the server log")]
            return
        stream = self.registry.metrics.track(stream, "page")
        if not self._hold(session, stream):  # Stop was pressed while the reply was being prepared
            stream.close()
            return
        notes = []
        if stream.dropped_turns:
            notes.append(
                note(
                    f"⚠️ {stream.dropped_turns} earlier turn(s) left out: the conversation no longer fits the "
                    f"model's context of {model.info.context_length} tokens"
                )
            )
        answer, reasoning, started = "", "", time.perf_counter()
        try:
            for chunk in stream:
                answer += chunk.text
                reasoning += chunk.reasoning
                yield reply_messages(notes, answer, reasoning, chunk.stats, started)
        except BackendError as e:
            yield reply_messages([*notes, note(f"⚠️ {e}")], answer, reasoning, None, started)
        except Exception as e:  # shown as one line in the chat; the traceback goes to the server log
            log.exception("generation failed")
            failure = note(f"⚠️ internal error while generating ({type(e).__name__}); see the server log")
            yield reply_messages([*notes, failure], answer, reasoning, None, started)
        finally:
            self._release(session, stream)

    def stop(self, request: gr.Request) -> None:
        """Closes the tab's running reply (the Stop button), also one still being prepared."""
        session = page_session(request, self.exposed)
        with self._lock:
            if session in self._streams and self._streams[session] is None:
                self._stopped.add(session)
            stream = self._streams.pop(session, None)
        if stream is not None:
            stream.close()

    def forget(self, request: gr.Request) -> None:
        """Stops the tab's reply and frees its cache (New chat, clearing the chat, leaving the page)."""
        self.stop(request)
        self.registry.clear_session(page_session(request, self.exposed))

    def _begin(self, session: SessionKey) -> None:
        """A new reply for the tab: an earlier one still running is closed."""
        with self._lock:
            previous = self._streams.get(session)
            self._streams[session] = None
            self._stopped.discard(session)
        if previous is not None:
            previous.close()

    def _hold(self, session: SessionKey, stream: ChatStream) -> bool:
        """Records the tab's running reply; False if Stop came while it was being prepared."""
        with self._lock:
            if session in self._stopped:
                self._stopped.discard(session)
                return False
            self._streams[session] = stream
            return True

    def _release(self, session: SessionKey, stream: ChatStream | None) -> None:
        with self._lock:
            if session in self._streams and self._streams[session] is stream:
                del self._streams[session]
        if stream is not None:
            stream.close()


def family_controls(model: ChatModel, thinking: bool | None = None) -> tuple:
    """Updates for temperature, top-p, top-k and the thinking box: the defaults shown for ``model`` in a
    thinking mode (None: its default mode)."""
    shown = shown_defaults(model, thinking)
    return (
        gr.update(value=shown["temperature"]),
        gr.update(value=shown["top_p"]),
        gr.update(value=shown["top_k"]),
        gr.update(visible=model.capabilities.thinking, value=shown["thinking"]),
    )


BASE_MODEL_NOTE = (
    "ℹ️ This is a **base model**: it continues text rather than answering questions, so its replies can wander "
    "or repeat. For a real chat, where the Hugging Face Hub is reachable: "
    "`python app.py --model Qwen/Qwen3-0.6B`"
)


def info_text(registry: ModelRegistry) -> str:
    if registry.model is None:
        return f"⏳ {registry.load_error or f'loading {registry.loading or registry.ids[0]}…'}"
    info = registry.get().info
    weights = {
        "fp16": "weights in fp16, sums in fp32",
        "nf4": "4-bit NF4 weights",
        "int8": "int8 weights, sums in fp32" if info.device == "cpu" else "8-bit weights",
        "none": f"{info.dtype} weights",
    }.get(info.quantization, f"{info.quantization} weights")
    parts = [f"**{info.name}**", info.family or "remote model", weights]
    if info.dtype:
        parts.append(f"on {info.device}")
    if info.memory_footprint_bytes:
        parts.append(f"{info.memory_footprint_bytes / 2**20:.0f} MiB")
    if info.context_length:
        parts.append(f"context {info.context_length}")
    line = " · ".join(parts)
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
            )
        with gr.Column(scale=2, min_width=300):
            info = gr.Markdown(info_text(registry))
    return dropdown, info


def settings_panel(registry: ModelRegistry) -> dict[str, gr.components.Component]:
    """The system prompt, sampling and thinking controls, by ChatSettings field name. Their first values are
    placeholders until the loaded model's family sets them (``family_controls``)."""
    shown = {**PLACEHOLDERS, "thinking": False}
    if registry.model is not None:
        shown = shown_defaults(registry.model, None)
    can_think = registry.model is not None and registry.model.capabilities.thinking
    with gr.Accordion("System prompt and sampling", open=False):
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
    controls["thinking"] = gr.Checkbox(
        value=shown["thinking"],
        visible=can_think,
        label="Thinking (reasoning shown collapsed, never sent back to the model)",
    )
    return controls


def chat_panel(replies: Replies, controls: dict, config: AppConfig) -> gr.ChatInterface:
    respond = replies.respond
    if config.on_spaces and os.environ.get("SPACE_ID"):
        try:
            import spaces

            respond = spaces.GPU(duration=120)(respond)
        except ImportError:
            pass
    chatbot = gr.Chatbot(label="Chat", height=520, buttons=["copy"])
    return gr.ChatInterface(
        respond,
        chatbot=chatbot,
        additional_inputs=[controls[f.name] for f in fields(ChatSettings)],
        editable=True,
        api_name="chat",
        concurrency_limit=config.concurrency,
        fill_height=True,
    )


def build_app(registry: ModelRegistry, config: AppConfig) -> gr.Blocks:
    """The page: model dropdown, chat, sampling accordion, thinking toggle, stats under each reply."""
    replies = Replies(registry, exposed=config.share or not is_loopback(config.host) or config.on_spaces)
    hidden = {"queue": False, "api_visibility": "undocumented"}

    def switch_model(model_id, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
        try:
            model = registry.switch(model_id, progress=lambda f, msg: progress(f, desc=msg))
        except (ModelLoadError, ValueError, KeyError) as e:
            gr.Warning(f"Could not load {model_id}: {e}. Still serving {registry.current_id}.")
            return (gr.update(value=registry.current_id), *[gr.update()] * 4, info_text(registry))
        gr.Info(f"Now serving {model_id}")
        return (gr.update(value=model_id), *family_controls(model), info_text(registry))

    def on_load():
        try:
            model = registry.wait_ready(timeout=600)
        except RuntimeError:
            return (gr.update(), *[gr.update()] * 4, info_text(registry))
        return (gr.update(value=registry.current_id), *family_controls(model), info_text(registry))

    with gr.Blocks(title="Local LLM chat", fill_height=True) as demo:
        dropdown, info = model_header(registry)
        controls = settings_panel(registry)
        chat = chat_panel(replies, controls, config)
        new_chat = gr.Button("New chat", variant="secondary", size="sm")
        new_chat.click(replies.forget, None, None, **hidden).then(
            lambda: ([], []), None, [chat.chatbot, chat.chatbot_state], **hidden
        )
        chat.chatbot.clear(replies.forget, None, None, **hidden)
        chat.textbox.stop(replies.stop, None, None, **hidden)
        sampling = [controls["temperature"], controls["top_p"], controls["top_k"]]
        dropdown.input(switch_model, [dropdown], [dropdown, *sampling, controls["thinking"], info], concurrency_limit=1)
        mode_defaults = lambda thinking: family_controls(registry.get(), bool(thinking))[:3]  # noqa: E731
        controls["thinking"].change(mode_defaults, [controls["thinking"]], sampling, **hidden)
        demo.load(
            on_load,
            None,
            [dropdown, *sampling, controls["thinking"], info],
            api_visibility="undocumented",
            concurrency_limit=None,
        )
        demo.unload(replies.forget)
    demo.queue(default_concurrency_limit=config.concurrency, max_size=256)
    return demo


def serve(config: AppConfig, registry: ModelRegistry | None = None, **launch_kwargs):
    """Builds and launches the app, loading the first model in the background if none is loaded yet;
    returns the Blocks (launched with ``prevent_thread_lock`` by tests)."""
    check_exposure(config)
    if registry is None:
        cache = int(config.max_cache_gb * 2**30) if config.max_cache_gb else None
        registry = ModelRegistry(
            config.models, quantization=config.quantization, max_cache_bytes=cache, cache_dir=config.cache_dir
        )
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
        **launch_kwargs,
    )
    exposed = config.share or not is_loopback(config.host)
    add_openai_routes(demo.app, registry, api_key=config.api_keys, exposed=exposed)
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
