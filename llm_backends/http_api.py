"""The OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models) on the app's own FastAPI server.

Errors leave in OpenAI's shape: {"error": {"message", "type", "param", "code"}}. A model id is only ever a
registered id, never a path to load. Whatever ends a streamed response (its end, an error, a client that
disconnects) closes its ChatStream, which stops the model before its next token.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import openai_api
from .backend import ChatStream
from .errors import BackendError, ModelLoadError
from .remote import RemoteError
from .serving import ModelRegistry

log = logging.getLogger(__name__)
FIELDS = {"messages", "model", "stream", "user"} | openai_api.FIELDS


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def openai_errors(route):
    """Turns APIError into its JSON response. (Routes are added after Gradio's server has started, when app-wide
    exception handlers can no longer be registered.)"""

    @functools.wraps(route)
    async def wrapped(request: Request):
        try:
            return await route(request)
        except APIError as error:
            return error.response()

    return wrapped


def text_content(content, index: int) -> str:
    """OpenAI content (a string or a list of text parts) as one string; other part types are refused."""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{index}].content: only text parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    return content


def add_openai_routes(app: FastAPI, registry: ModelRegistry, *, api_key: str | None, exposed: bool) -> None:
    """Adds /v1 routes. With ``exposed`` (a share link or a non-loopback host) they need ``api_key``.

    API sessions live in their own space, under the key's fingerprint as principal, so no field or header of
    a /v1 request can reach a page session's cache or a Python caller's.
    """
    principal = "" if api_key is None else "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]

    def authorize(request: Request) -> None:
        if api_key is None:
            if exposed:
                raise APIError(
                    401,
                    "this server is reachable beyond localhost: start it with --api-key to use /v1",
                    type_="authentication_error",
                    code="invalid_api_key",
                )
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(
                401,
                "invalid or missing API key (send Authorization: Bearer <key>)",
                type_="authentication_error",
                code="invalid_api_key",
            )

    def model_for(model_id):
        if model_id is not None and not isinstance(model_id, str):
            raise APIError(400, "model must be a string", param="model")
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

    @app.get("/v1/models")
    @openai_errors
    async def list_models(request: Request):
        authorize(request)
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "local"} for i in registry.ids]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    @openai_errors
    async def chat_completions(request: Request):
        authorize(request)
        if "json" not in request.headers.get("content-type", ""):
            raise APIError(400, "send the request body as JSON (Content-Type: application/json)")
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if not isinstance(body.get("messages"), list):
            raise APIError(400, "messages is required and must be a list", param="messages")
        if "session_id" in body:
            raise APIError(
                400,
                "session_id is not accepted: name your session with user or the X-Session-Id header",
                param="session_id",
            )
        messages = [
            {**m, "content": text_content(m.get("content"), i)} if isinstance(m, dict) else m
            for i, m in enumerate(body["messages"])
        ]
        ignored = set(body) - FIELDS
        if ignored:
            log.info("ignoring unsupported request fields: %s", ", ".join(sorted(ignored)))
        fields = {k: v for k, v in body.items() if k in openai_api.FIELDS}
        stream = bool(body.get("stream", False))
        model, model_id = await anyio.to_thread.run_sync(model_for, body.get("model"))
        try:
            session = openai_api.session_for("api", principal, request.headers.get("x-session-id") or body.get("user"))
            wants_usage = openai_api.include_usage(fields)
            chat_request = openai_api.chat_request(model, messages, fields, session=session, stream=stream)
            chat = await anyio.to_thread.run_sync(model.stream, chat_request)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        head = openai_api.head(model, model_id)
        if stream:
            events = openai_api.chunk_events(chat, head, wants_usage)
            return StreamingResponse(_sse(chat, events, request), media_type="text/event-stream")
        try:
            return await anyio.to_thread.run_sync(openai_api.completion, chat, head)
        except Exception as e:
            raise server_error(e) from e


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


async def _sse(chat: ChatStream, events, request: Request):
    """Server-sent events from a blocking iterator. Closing ``chat`` (whatever ends the response: the end of
    the reply, an error, a client that left) stops the model before its next token."""
    sentinel = object()
    try:
        while True:
            event = await anyio.to_thread.run_sync(next, events, sentinel)
            if event is sentinel:
                break
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            if await request.is_disconnected():
                break
        yield "data: [DONE]\n\n"
    except Exception as e:  # an error mid-stream can only be reported in-band
        error = server_error(e)
        body = {"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}}
        yield f"data: {json.dumps(body)}\n\n"
    finally:
        with anyio.CancelScope(shield=True):  # a client that left cancels this task: close all the same
            await anyio.to_thread.run_sync(chat.close)
