"""The FastAPI application and its Ray Serve deployment."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from twinkle.config import ServerConfig
from twinkle.errors import NotFoundError, TwinkleError
from twinkle.http import native_routes, openai_routes, rest_routes, tinker_futures, tinker_routes, tinker_sampling
from twinkle.http import metrics_routes, status_page
from twinkle.http.common import context, install_context, tenant_of
from twinkle.http.context import ServerContext
from twinkle.http.timing import ServerTimingMiddleware

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json",
                   "config.json", "preprocessor_config.json", "processor_config.json")  # + a VL model's image processor


def _tokenizer_payload(ctx: ServerContext, base_model: str) -> dict:
    info = ctx.info(base_model)
    folder = Path(info["model_path"])
    if not folder.is_dir():
        raise NotFoundError(f"{base_model} loads its tokenizer from the Hub id {info['model_path']!r}",
                            field="base_model")
    files = {name: base64.b64encode((folder / name).read_bytes()).decode()
             for name in TOKENIZER_FILES if (folder / name).is_file()}
    return {"base_model": base_model, "files": files}


def _error_body(error: TwinkleError) -> dict:
    body = error.to_dict()
    body["detail"] = body["error"]
    return body


def create_app() -> FastAPI:
    app = FastAPI(title="Twinkle", version="0.1.0", docs_url="/api/v1/docs", openapi_url="/api/v1/openapi.json")
    app.include_router(tinker_routes.router)  # Tinker routes first, in this order: matching stays as it was
    app.include_router(tinker_sampling.router)
    app.include_router(tinker_futures.router)
    app.include_router(rest_routes.router)
    app.include_router(native_routes.router)
    app.include_router(status_page.router)  # GET /status (a live page) and /api/v1/twinkle/runs/{id}/metrics
    metrics_routes.install(app)  # GET /metrics, and the middleware that counts every request
    app.add_middleware(ServerTimingMiddleware)  # Server-Timing: where each request's time went
    app.include_router(openai_routes.router)  # OpenAI-compatible sampling under /v1

    @app.exception_handler(TwinkleError)
    async def twinkle_error(request: Request, exc: TwinkleError) -> JSONResponse:
        retry = getattr(exc, "retry_after_s", None)
        headers = {"Retry-After": str(max(1, round(retry)))} if retry is not None else None
        return JSONResponse(_error_body(exc), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(_error_body(TwinkleError(first.get("msg", "invalid request"), field=field))
                            | {"category": "user", "type": "InvalidInputError"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def no_such_route(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown paths and methods answer in the same JSON shape as every other error."""
        if exc.status_code == 404:
            message = (f"this server has no route {request.method} {request.url.path}; the routes it serves "
                       "are listed at /api/v1/docs")
        elif exc.status_code == 405:
            message = f"{request.url.path} does not accept {request.method}; see /api/v1/docs"
        else:
            message = str(exc.detail)
        return JSONResponse({"error": message, "detail": message, "field": "path", "category": "user",
                             "type": "NotFoundError" if exc.status_code == 404 else "InvalidInputError"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": f"internal server error ({type(exc).__name__}); the server log has details",
                             "detail": "internal server error", "category": "server", "type": "TwinkleError"},
                            status_code=500)

    @app.get("/api/v1/twinkle/tokenizer/{base_model:path}")
    async def tokenizer_files(base_model: str, request: Request) -> dict:
        """The tokenizer files of a hosted model, for clients that cannot reach the Hub."""
        await tenant_of(request)
        return _tokenizer_payload(context(request), base_model)

    @app.get("/api/v1/readyz")
    async def readyz() -> JSONResponse:
        """Readiness (healthz is liveness): 503 while a model's workers are being replaced after a
        crash; requests sent meanwhile wait for them."""
        ctx = context()
        await ctx.ensure_started()
        rebuilding = [name for name, handle in ctx.schedulers.items() if (await handle.stats.remote())["rebuilding"]]
        if rebuilding:
            return JSONResponse({"status": "degraded", "rebuilding": rebuilding}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/api/v1/admin/status")
    async def operator_status(request: Request) -> dict:
        """The operator's view: every model, queue and tenant (needs an operator key)."""
        ctx = context(request)
        await ctx.ensure_started()
        ctx.keys.operator_for(request.headers)
        models = {name: await handle.stats.remote(operator=True) for name, handle in ctx.schedulers.items()}
        return {"models": models, "tenants": await ctx.db(ctx.store.tenant_summary)}

    @app.get("/api/v1/twinkle/status")
    async def status(request: Request) -> dict:
        """Each model's queues and batching figures; the model ids shown are the caller's own."""
        tenant = await tenant_of(request)
        ctx = context(request)
        return {"models": {name: await handle.stats.remote(tenant) for name, handle in ctx.schedulers.items()}}

    return app


app = create_app()


@serve.deployment(name="TwinkleIngress", max_ongoing_requests=10_000)
@serve.ingress(app)
class TwinkleIngress:
    """The ingress replica: stateless apart from caches; restarts lose nothing."""

    def __init__(self, config: dict) -> None:
        logging.basicConfig(level=logging.INFO)
        self._ctx = ServerContext(ServerConfig.model_validate(config))
        install_context(self._ctx)

    async def ray_client_call(self, api_key: str | None, op: str, payload: bytes) -> bytes:
        """Twinkle's API for Ray-client callers (no HTTP): the same handlers and tenant checks.

        Returns msgpack {"ok": result} or {"error": {...}} (errors travel as data, not exceptions).
        """
        from twinkle import wire
        from twinkle.http.native import NativeAPI

        try:
            await self._ctx.ensure_started()
            tenant = self._ctx.tenant_for({"x-api-key": api_key} if api_key else {})
            body = wire.loads(payload) if payload else {}
            api = NativeAPI(self._ctx)
            if op == "submit":
                result = await api.submit(tenant, body["method"], body.get("target_id"), body.get("seq_id"),
                                          body.get("args") or {}, wait=body.get("wait"))
            elif op == "retrieve":
                result = await api.retrieve(tenant, body["request_id"], body.get("timeout"))
            elif op == "session":
                result = await api.create_session(tenant, body.get("metadata"))
            elif op == "heartbeat":
                result = await api.heartbeat(tenant, body["session_id"])
            elif op == "finish":
                result = await api.finish(tenant, body["session_id"])
            elif op == "tokenizer":
                result = _tokenizer_payload(self._ctx, body["base_model"])
            else:
                raise NotFoundError(f"unknown operation {op!r}", field="op")
            return wire.dumps({"ok": result})
        except TwinkleError as exc:
            return wire.dumps({"error": {**exc.to_dict(), "status_code": exc.status_code}})
