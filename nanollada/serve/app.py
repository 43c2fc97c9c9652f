"""The FastAPI application of ``nanollada serve``: OpenAI's ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions`` (streaming as server-sent events), the web page at ``/``, and OpenAI-shaped errors.

Every request body is read and validated here before anything starts (``protocol``), so bad input is a 4xx with
OpenAI's ``{"error": {...}}`` body and the status it deserves; a stream that fails after its headers were sent
ends with an ``{"error": ...}`` event and ``[DONE]``. Each model has a queue: one worker thread of its own takes
its requests in arrival order (and a first-come-first-served lock in ``engine`` guards the model), so different
models answer side by side and one model never runs two requests at once; a client that disconnects stops its
generation at the next step (or, still queued, it never starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanollada.serve.engine import Job, Result, ServedModel
from nanollada.serve.protocol import APIError, ChatRequest, CompletionRequest, parse

MAX_BODY_BYTES = 1 << 20
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(models: list[ServedModel]) -> FastAPI:
    """The server application over ``models`` (ids must be unique)."""
    by_id = {m.id: m for m in models}
    if len(by_id) != len(models):
        raise ValueError(f"model ids must be unique, got {[m.id for m in models]}")
    pools = {m.id: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nanollada-{m.id}") for m in models}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nanollada", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.models, app.state.pools = by_id, pools
    static = {name: resources.files("nanollada.serve").joinpath("static", name).read_bytes() for name in STATIC}

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        msg = {404: f"Unknown URL: {request.method} {request.url.path}",
               405: f"Method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(APIError(e.status_code, msg, code={404: "not_found"}.get(e.status_code)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return error_response(APIError(400, f"Invalid request: {e.errors()[0].get('msg')}"))

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    # ------------------------------------------------------------------ the page
    @app.get("/", include_in_schema=False)
    async def index():
        return Response(static["index.html"], media_type=STATIC["index.html"])

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in static:
            raise APIError(404, f"no static file {name!r}", code="not_found")
        return Response(static[name], media_type=STATIC[name])

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(by_id)}

    # ------------------------------------------------------------------ OpenAI API
    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [m.info() for m in by_id.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        return model_for(model_id).info()

    def model_for(name: str) -> ServedModel:
        if name not in by_id:
            raise APIError(404, f"The model '{name}' does not exist; served: {', '.join(by_id)}", param="model",
                           code="model_not_found")
        return by_id[name]

    async def read_json(request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request ({e}). The body must be valid "
                           "JSON (and UTF-8).", code="invalid_json") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatRequest, await read_json(request))
        model = model_for(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        ids = model.chat_ids(messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await respond(request, model, req, [ids], max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_json(request))
        model = model_for(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if req.stream and len(prompts) > 1:
            raise APIError(400, "stream: true takes one prompt", param="prompt")
        return await respond(request, model, req, [model.completion_ids(p) for p in prompts], req.max_tokens,
                             chat=False)

    async def respond(request: Request, model: ServedModel, req, prompts: list[list[int]], max_tokens, chat: bool):
        fields = {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
        jobs = []
        for ids in prompts:
            settings, canvas = model.settings_for(len(ids), max_tokens, fields, req.nanollada)
            if canvas and not req.stream:
                raise APIError(400, "nanollada.canvas needs stream: true", param="nanollada.canvas")
            jobs.append(Job(ids, settings, req.stops(), canvas))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(model, jobs[0], rid, created, chat, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = []
        for job in jobs:
            result = await run_watching(request, model, job)
            if result is None:  # the client went away; nobody reads this
                return Response(status_code=499)
            results.append(result)
        choices = [{"index": i, "finish_reason": r.finish_reason, "logprobs": None,
                    **({"message": {"role": "assistant", "content": r.text}} if chat else {"text": r.text})}
                   for i, r in enumerate(results)]
        usage = {"prompt_tokens": sum(r.prompt_tokens for r in results),
                 "completion_tokens": sum(r.completion_tokens for r in results)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model.id, "system_fingerprint": None, "choices": choices, "usage": usage,
                "nanollada": results[0].stats if len(results) == 1 else [r.stats for r in results]}

    async def run_watching(request: Request, model: ServedModel, job: Job) -> Result | None:
        """Run a job in its model's queue; cancel it if the client disconnects meanwhile."""
        fut = asyncio.get_running_loop().run_in_executor(pools[model.id], model.run, job)
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=0.25)
                if done:
                    return fut.result()
                if await request.is_disconnected():
                    job.cancelled.set()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        except ValueError as e:  # settings the paradigm refuses (e.g. no room for one block)
            raise APIError(400, str(e)) from None

    async def stream_events(model: ServedModel, job: Job, rid: str, created: int, chat: bool, include_usage: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job.on_event = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
        fut = loop.run_in_executor(pools[model.id], model.run, job)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, {"type": "end"}))
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | None = None, text: str | None = None, finish=None, **extra) -> dict:
            choice = {"index": 0, "finish_reason": finish, "logprobs": None}
            choice.update({"delta": delta or {}} if chat else {"text": text or ""})
            return {"id": rid, "object": obj, "created": created, "model": model.id, "system_fingerprint": None,
                    "choices": [choice], **extra}

        try:
            if chat:
                yield sse(chunk({"role": "assistant", "content": ""}))
            while True:
                ev = await queue.get()
                if ev["type"] == "delta":
                    yield sse(chunk({"content": ev["text"]}) if chat else chunk(text=ev["text"]))
                elif ev["type"] == "canvas":
                    yield sse({"id": rid, "object": "nanollada.canvas", **{k: v for k, v in ev.items()
                                                                          if k != "type"}})
                elif ev["type"] == "end":
                    break
            try:
                result = fut.result()
            except ValueError as e:
                yield sse(APIError(400, str(e)).body())
                yield "data: [DONE]\n\n"
                return
            except Exception as e:  # noqa: BLE001  (the stream has started: report, then end it)
                yield sse(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body())
                yield "data: [DONE]\n\n"
                return
            if result is None:
                return
            usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                     "total_tokens": result.prompt_tokens + result.completion_tokens}
            yield sse(chunk(finish=result.finish_reason, nanollada=result.stats))
            if include_usage:
                yield sse({**chunk(), "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # normal end: no effect; client gone: the generation stops at its next step

    return app
