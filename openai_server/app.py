"""The HTTP side: a Starlette app whose endpoints turn OpenAI requests into the worker's generate requests.

Every HTTP request is sent to the worker at once (the worker queues or batches them: PROTOCOL.md, Concurrency).
A client that goes away (its connection closes) gets its generate cancelled in the worker at once; a worker
that dies is restarted by the client (openai_server/client.py), the model loaded again, and until then every
request is answered 503.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from openai_server import errors, requests as inbound
from openai_server.client import AsyncWorker, WorkerError
from openai_server.responses import Turn

log = logging.getLogger("mlx_worker.openai")


@dataclass
class Config:
    model: str  # the model directory
    name: str  # the model's id in the API
    load_options: dict = field(default_factory=dict)
    api_key: str | None = None
    worker_cmd: tuple = ()
    local_files: bool = True


class Service:
    """The worker process and its one loaded model."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        cmd = list(cfg.worker_cmd) or None
        self.worker = AsyncWorker(**({"cmd": cmd} if cmd else {}), on_restart=self._load)
        self.loaded_at = -1  # worker.restarts when the model was last loaded
        self.info = None

    async def start(self):
        await self.worker.start()
        await self._load(self.worker)

    async def _load(self, worker):
        done = await worker.load(self.cfg.model, **self.cfg.load_options)
        self.info, self.loaded_at = done["model"], worker.restarts
        log.info("model %s loaded (%s)", self.cfg.name, self.cfg.model)

    @property
    def available(self) -> bool:
        return self.worker.alive and self.loaded_at == self.worker.restarts

    def check(self):
        if not self.available:
            raise errors.unavailable("the worker is restarting; retry in a moment")


async def _disconnected(request: Request) -> None:
    """Return when the client has closed its connection (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class EventStream(StreamingResponse):
    """Server-sent events that stop (closing the body iterator, which cancels the generate) when the client
    disconnects, whatever ASGI version the server speaks."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        streaming = asyncio.ensure_future(self._stream(send))
        watching = asyncio.ensure_future(self.listen_for_disconnect(receive))
        await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        for task in (streaming, watching):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await streaming
        await self.body_iterator.aclose()

    async def _stream(self, send):
        with contextlib.suppress(OSError):
            await self.stream_response(send)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class Generation:
    """One generate in the worker, from its first event to its terminal one; ``cancel`` if it is left early."""

    def __init__(self, service: Service, job: inbound.Job, rid: str):
        self.service, self.job, self.rid = service, job, rid
        self.events = service.worker.request({**job.generate, "id": rid})
        self.finished = False

    async def next(self) -> dict:
        try:
            ev = await self.events.__anext__()
        except (WorkerError, ConnectionError) as e:
            self.finished = True
            raise errors.unavailable(f"the worker stopped: {str(e).splitlines()[0]}") from e
        if ev["type"] in ("done", "error"):
            self.finished = True
        if ev["type"] == "error":
            raise errors.from_worker(ev, self.job.max_tokens_name)
        if ev["type"] == "done" and ev.get("stop_reason") == "cancelled":
            raise errors.unavailable("the request was cancelled by the worker (it is shutting down)")
        return ev

    def cancel(self):
        if not self.finished:
            self.finished = True
            self.service.worker.send_nowait({"type": "cancel", "id": f"cancel-{self.rid}", "target": self.rid})


async def _body(request: Request):
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.bad(None, f"the request body is not JSON: {e}", "invalid_json") from e


def _check_model(service: Service, body: dict):
    name = body.get("model") if isinstance(body, dict) else None
    if name is None:
        raise errors.bad("model", "'model' is required", "missing_required_parameter")
    if name not in (service.cfg.name, service.cfg.model):
        raise errors.ApiError(404, f"The model '{name}' does not exist; this server serves '{service.cfg.name}'",
                              "invalid_request_error", "model", "model_not_found")


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def _until_disconnect(request: Request, coro, on_disconnect):
    """Await ``coro``; if the client disconnects first, cancel it, call ``on_disconnect`` and raise ClientGone."""
    task, watch = asyncio.ensure_future(coro), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            on_disconnect()
            raise ClientGone()
    return task.result()


async def _collect(gen: Generation, turn: Turn):
    while not gen.finished:
        turn.add(await gen.next())
    return turn.response()


async def _stream(gen: Generation, turn: Turn, held: list):
    try:
        first = turn.first_chunk()
        if first:
            yield _sse(first)
        pending = list(held)
        while pending or not gen.finished:
            ev = pending.pop(0) if pending else await gen.next()
            for chunk in turn.add(ev):
                yield _sse(chunk)
        yield _sse(turn.last_chunk())
        if gen.job.include_usage:
            yield _sse(turn.usage_chunk())
    except errors.ApiError as e:
        yield _sse(e.body())  # headers are sent: the error goes in the stream, as OpenAI's API does
    finally:
        gen.cancel()  # a no-op once the terminal event came; else the client is gone
    yield b"data: [DONE]\n\n"


async def _generate(request: Request, job: inbound.Job, prefix: str, chat: bool) -> Response:
    service: Service = request.app.state.service
    service.check()
    rid = f"{prefix}-{uuid.uuid4().hex[:24]}"
    gen = Generation(service, job, rid)
    turn = Turn(rid, service.cfg.name, chat, job.logprobs)
    if not job.stream:
        return JSONResponse(await _until_disconnect(request, _collect(gen, turn), gen.cancel))
    first = await _until_disconnect(request, gen.next(), gen.cancel)  # an error before any event: a plain 4xx/5xx
    return EventStream(_stream(gen, turn, [first]), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def chat_completions(request: Request) -> Response:
    body = await _body(request)
    _check_model(request.app.state.service, body)
    return await _generate(request, inbound.chat_job(body, request.app.state.service.cfg.local_files),
                           "chatcmpl", True)


async def completions(request: Request) -> Response:
    body = await _body(request)
    _check_model(request.app.state.service, body)
    return await _generate(request, inbound.completion_job(body), "cmpl", False)


def _model_object(service: Service) -> dict:
    info = service.info or {}
    return {"id": service.cfg.name, "object": "model", "created": int(time.time()), "owned_by": "mlx-worker",
            "context_length": info.get("context_length")}


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_object(request.app.state.service)]})


async def model(request: Request) -> Response:
    service = request.app.state.service
    name = request.path_params["name"]
    if name != service.cfg.name:
        raise errors.ApiError(404, f"The model '{name}' does not exist", "invalid_request_error", "model",
                              "model_not_found")
    return JSONResponse(_model_object(service))


async def health(request: Request) -> Response:
    service: Service = request.app.state.service
    ok = service.available
    body = {"status": "ok" if ok else "unavailable", "model": service.cfg.name,
            "worker_pid": service.worker.proc.pid if service.worker.alive else None,
            "restarts": service.worker.restarts}
    if ok:  # the worker answers status at once, even mid-generation
        try:
            status = await asyncio.wait_for(service.worker.result({"type": "status"}), 5)
            body.update(running=status.get("running", []), queue=status.get("queue", []))
        except (WorkerError, ConnectionError, asyncio.TimeoutError):
            body["status"], ok = "unavailable", False  # a worker that does not answer status is hung
    return JSONResponse(body, status_code=200 if ok else 503)


async def _api_error(request: Request, exc: errors.ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it: nginx's code for a client that closed the request


async def _internal(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error")
    return JSONResponse(errors.ApiError(500, f"internal error: {exc}", "server_error", None, "internal_error").body(),
                        status_code=500)


class _Auth:
    """``Authorization: Bearer <key>`` on /v1/*, when the server has a key."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                err = errors.ApiError(401, "Incorrect API key provided", "invalid_request_error", None,
                                      "invalid_api_key")
                return await JSONResponse(err.body(), status_code=401)(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(cfg: Config) -> Starlette:
    service = Service(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.worker.close()

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], exception_handlers={errors.ApiError: _api_error, ClientGone: _client_gone, Exception: _internal}, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(_Auth, key=cfg.api_key)
    return app
