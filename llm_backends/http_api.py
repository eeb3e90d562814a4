"""The HTTP door on the app's own FastAPI server: OpenAI's /v1/chat/completions, /v1/completions and
/v1/models, vLLM's and llama.cpp's /tokenize and /detokenize, plus /health and Prometheus' /metrics.

Errors leave in OpenAI's shape: {"error": {"message", "type", "param", "code"}}. A model id is only ever a
registered id, never a path to load. Whatever ends a streamed response (its end, an error, a client that
disconnects) closes its ChatStream, which stops the model before its next token.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from functools import partial

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from . import openai_api
from .backend import ChatStream
from .errors import BackendError, ModelLoadError
from .remote import RemoteError
from .serving import ModelRegistry

log = logging.getLogger(__name__)

# A request body's limit: room for a few images as data: URLs (each at most images.MAX_IMAGE_BYTES).
MAX_BODY_BYTES = 64 * 2**20
MAX_DEPTH = 64  # nesting of the JSON body (tool parameters and schemas included): deeper is refused
# Events of a streamed reply computed ahead of the client reading them.
SSE_AHEAD = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def fingerprint(api_key: str) -> str:
    """An API key's principal: sessions under one key are that key's alone."""
    return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]


def add_openai_routes(
    app: FastAPI,
    registry: ModelRegistry,
    *,
    api_key: str | Sequence[str] | None,
    exposed: bool,
    image_urls: bool = False,
    metrics_key: str | None = None,
) -> None:
    """Adds ``/health``, ``/metrics`` and the ``/v1`` routes. With ``exposed`` (a share link or a non-loopback
    host) ``/v1`` and ``/metrics`` need an API key; ``/health`` is public and says only whether a model is ready.
    ``/metrics`` counts everyone's requests, so where several keys share the server it is read with
    ``metrics_key`` alone (no key of theirs tells one caller of another's traffic); with ``metrics_key`` set, only
    with it.

    API sessions live in their own space, under the fingerprint of the key that sent the request as principal,
    so no field or header of a /v1 request can reach a page session's cache, a Python caller's, or another
    key's. Image parts come as data: URLs; http(s) image URLs are fetched only with ``image_urls``.
    """
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    metrics = registry.metrics

    def authorize(request: Request) -> str:
        """The caller's principal; APIError 401 without a valid key where one is needed."""
        if not keys:
            if exposed:
                raise APIError(
                    401,
                    "this server is reachable beyond localhost: start it with --api-key to use /v1",
                    type_="authentication_error",
                    code="invalid_api_key",
                )
            return ""
        given = request.headers.get("authorization", "").encode()
        for key in keys:
            if hmac.compare_digest(given, f"Bearer {key}".encode()):
                return fingerprint(key)
        raise APIError(
            401,
            "invalid or missing API key (send Authorization: Bearer <key>)",
            type_="authentication_error",
            code="invalid_api_key",
        )

    def authorize_metrics(request: Request) -> None:
        if metrics_key is None and len(keys) < 2:
            authorize(request)
            return
        given = request.headers.get("authorization", "").encode()
        if metrics_key is not None and hmac.compare_digest(given, f"Bearer {metrics_key}".encode()):
            return
        raise APIError(
            403 if metrics_key is None else 401,
            "/metrics counts every caller's requests: read it with the metrics key (start the server with "
            "--metrics-key where several API keys share it)",
            type_="authentication_error" if metrics_key is not None else "permission_error",
            code="metrics_key_needed",
        )

    def openai_errors(route):
        """Turns every failure into an OpenAI-shaped response. (Routes are added after Gradio's server has
        started, when app-wide exception handlers can no longer be registered.)"""

        @functools.wraps(route)
        async def wrapped(request: Request):
            try:
                return await route(request)
            except APIError as error:
                metrics.http_errors.labels(str(error.status)).inc()
                return error.response()
            except Exception as error:  # the traceback goes to the log, one line to the client
                failure = server_error(error)
                metrics.http_errors.labels(str(failure.status)).inc()
                return failure.response()

        return wrapped

    def model_for(model_id):
        if model_id is not None and not isinstance(model_id, str):
            raise APIError(400, "model must be a string", param="model")
        model_id = registry.resolve(model_id) if model_id is not None else None
        if model_id is not None and model_id not in registry.entries:
            raise APIError(
                404,
                f"the model {model_id!r} does not exist; GET /v1/models lists the served ones",
                param="model",
                code="model_not_found",
            )
        if registry.loading is not None:
            raise APIError(
                503,
                f"the model {registry.loading} is loading; retry shortly",
                type_="server_error",
                code="model_loading",
            )
        if model_id is not None and model_id != registry.current_id:
            try:
                registry.switch(model_id)
            except (ModelLoadError, ValueError) as e:
                raise APIError(503, f"could not load {model_id}: {e}", type_="server_error") from e
        try:
            return registry.get(), model_id or registry.current_id
        except RuntimeError as e:
            raise APIError(503, str(e), type_="server_error", code="model_loading") from e

    @app.get("/health")
    async def health():
        ready = registry.model is not None and registry.loading is None
        return JSONResponse({"status": "ok" if ready else "loading"}, status_code=200 if ready else 503)

    @app.get("/metrics")
    @openai_errors
    async def prometheus(request: Request):
        authorize_metrics(request)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    @openai_errors
    async def list_models(request: Request):
        authorize(request)
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "local"} for i in registry.ids]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    @openai_errors
    async def retrieve_model(request: Request):
        authorize(request)
        model_id = registry.resolve(request.path_params["model_id"])
        if model_id not in registry.entries:
            raise APIError(
                404,
                f"the model {model_id!r} does not exist; GET /v1/models lists the served ones",
                param="model",
                code="model_not_found",
            )
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "local"}

    async def tokens(request: Request, shape) -> dict:
        """/tokenize or /detokenize (``shape(model, body, principal)``) with the loaded model's tokenizer: naming
        another model is a 400, never a load (which would free the served model and every session's cache)."""
        principal = authorize(request)
        body = await read_body(request)
        named = body.get("model")
        if named is not None and (not isinstance(named, str) or registry.resolve(named) != registry.current_id):
            raise APIError(
                400,
                f"{request.url.path} reads the loaded model's tokenizer ({registry.current_id}); name it or no model",
                param="model",
            )
        model, _ = await anyio.to_thread.run_sync(model_for, None)
        try:
            return await anyio.to_thread.run_sync(shape, model, body, principal)
        except ValueError as e:
            raise APIError(400, str(e), param=_param_of(str(e))) from e

    @app.post("/tokenize")
    @openai_errors
    async def tokenize(request: Request):
        def shape(model, body, principal):  # a PDF read here is kept for this caller, as in a chat
            return openai_api.tokenized(model, body, fetch_image_urls=image_urls, owner=("api", principal))

        return await tokens(request, shape)

    @app.post("/detokenize")
    @openai_errors
    async def detokenize(request: Request):
        return await tokens(request, lambda model, body, _: openai_api.detokenized(model, body))

    async def serve(request: Request, kind: str):
        principal = authorize(request)
        body = await read_body(request)
        if "session_id" in body:
            raise APIError(
                400,
                "session_id is not accepted: name your session with user or the X-Session-Id header",
                param="session_id",
            )
        if kind == "chat":
            if not isinstance(body.get("messages"), list):
                raise APIError(400, "messages is required and must be a list", param="messages")
        named = body.get("model")
        target = registry.resolve(named) if isinstance(named, str) else None
        if target in registry.entries.keys() - {registry.current_id}:
            # Loading another model frees this one and every session's cache: only for a request that is sound.
            if kind == "chat":
                check = partial(openai_api.chat_request, fetch_image_urls=image_urls, owner=("api", principal))
            else:
                check = openai_api.completion_request
            try:
                await anyio.to_thread.run_sync(check, openai_api.AnyModel(registry.vocab_size(target)), body)
            except ValueError as e:
                raise APIError(400, str(e), param=_param_of(str(e))) from e
        model, model_id = await anyio.to_thread.run_sync(model_for, named)
        try:
            session = openai_api.session_for("api", principal, request.headers.get("x-session-id") or body.get("user"))
            if kind == "chat":
                opener = partial(openai_api.open_chat, fetch_image_urls=image_urls, owner=("api", principal))
            else:
                opener = openai_api.open_completion
            call = await anyio.to_thread.run_sync(lambda: opener(model, body, session=session, model_name=model_id))
        except ValueError as e:
            raise APIError(400, str(e), param=_param_of(str(e))) from e
        call = replace(call, stream=metrics.track(call.stream, f"/v1/{kind}"))
        shape = {"chat": (openai_api.chat_events, openai_api.chat_completion)}.get(
            kind, (openai_api.text_events, openai_api.text_completion)
        )
        if openai_api.wants_stream(body):
            return ClosingStreamingResponse(call.stream, _sse(shape[0](call), request))
        return await _whole(call, shape[1], request)

    @app.post("/v1/chat/completions")
    @openai_errors
    async def chat_completions(request: Request):
        return await serve(request, "chat")

    @app.post("/v1/completions")
    @openai_errors
    async def completions(request: Request):
        return await serve(request, "text")


async def read_body(request: Request) -> dict:
    if "json" not in request.headers.get("content-type", ""):
        raise APIError(400, "send the request body as JSON (Content-Type: application/json)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body says no length: read no further than the limit
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep") from e
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if _depth(body) > MAX_DEPTH:  # templates, schemas and grammars walk it recursively
        raise APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep")
    return body


def _depth(value) -> int:
    """How deeply lists and objects nest in ``value`` (without recursion: the value may be deep)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                todo.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


FIELD_NAMES = (
    openai_api.CHAT_FIELDS
    | openai_api.COMPLETION_FIELDS
    | set(openai_api.COMPLETION_NEUTRAL)
    | openai_api.TOKENIZE_FIELDS
    | {
        "max_new_tokens",
        "user",
        "tokens",
    }
)


def _param_of(message: str) -> str | None:
    """The request field a validation message is about, for the error's ``param`` (None when it names none)."""
    if message.startswith("unsupported field(s): "):
        return message.removeprefix("unsupported field(s): ").split(",")[0]
    first = message.split(" ", 1)[0].split("[", 1)[0].split(".", 1)[0].rstrip(":,")
    if first == "max_new_tokens":
        return "max_tokens"
    return first if first in FIELD_NAMES else None


def server_error(error: Exception) -> APIError:
    """An error raised while generating, as the APIError a client sees (the traceback stays in the log)."""
    if isinstance(error, RemoteError):
        return APIError(502, str(error), type_="server_error", code="upstream_error")
    if isinstance(error, BackendError):
        return APIError(500, str(error), type_="server_error")
    log.error("generation failed", exc_info=error)
    return APIError(
        500, f"internal error while generating ({type(error).__name__}); see the server log", type_="server_error"
    )


async def _whole(call, shape, request: Request) -> dict:
    """The whole reply; a client that disconnects meanwhile closes the stream, which stops the model."""
    outcome: dict = {}

    async def read() -> None:
        try:
            outcome["reply"] = await anyio.to_thread.run_sync(shape, call)
        except Exception as e:  # raised below, outside the task group (which would wrap it)
            outcome["error"] = e
        group.cancel_scope.cancel()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        await anyio.to_thread.run_sync(call.stream.close)

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        group.start_soon(read)
    if "error" in outcome:
        raise server_error(outcome["error"]) from outcome["error"]
    return outcome["reply"]


class ClosingStreamingResponse(StreamingResponse):
    """Server-sent events that close their ChatStream however the response ends (finished, failed, or the
    client gone before or during a send), so the model stops before its next token."""

    def __init__(self, stream: ChatStream, content):
        super().__init__(content, media_type="text/event-stream")
        self._chat = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._chat.close)


async def _sse(events, request: Request):
    """Server-sent events from a blocking iterator, read in a thread of its own: the reply's next token is
    computed while the event loop sends this one, instead of waiting for the loop to ask for it (with several
    sessions decoding in one batch, each round trip through the loop delayed everyone's next step). At most
    ``SSE_AHEAD`` events wait here unsent: once a client that stops reading has filled the connection's buffers,
    the model waits for it. A client that leaves cancels this at once, and the thread closes the stream, which
    stops the model before its next token (so does ClosingStreamingResponse)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue = asyncio.Queue()
    room, gone = threading.Semaphore(SSE_AHEAD), threading.Event()
    end = object()

    def hand(item) -> bool:
        try:
            loop.call_soon_threadsafe(lines.put_nowait, item)
            return True
        except RuntimeError:  # the loop is gone (server shutdown): nobody reads on
            return False

    def produce() -> None:
        last = end
        try:
            for event in events:
                room.acquire()
                if gone.is_set() or not hand(f"data: {json.dumps(event, ensure_ascii=False)}\n\n"):
                    return
        except BaseException as e:  # handed to the response, which reports it in-band
            last = e
        finally:
            events.close()  # however the thread ends, the reply's stream is closed
            hand(last)

    threading.Thread(target=produce, name="sse", daemon=True).start()
    try:
        while (line := await lines.get()) is not end:
            if isinstance(line, BaseException):
                raise line
            yield line
            room.release()
            if await request.is_disconnected():
                return
        yield "data: [DONE]\n\n"
    except Exception as e:  # an error mid-stream can only be reported in-band
        error = server_error(e)
        body = {"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}}
        yield f"data: {json.dumps(body)}\n\n"
    finally:
        gone.set()
        room.release()  # a producer waiting for room sees that nobody reads on
