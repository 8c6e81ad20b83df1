"""`GET /status`: a live status page, and each run's metrics history as JSON.

The page is one static HTML file (`static/status.html`, no external assets: the server may have no
internet) that draws what `GET /status/data` returns and fetches it again every few seconds. A
browser signs in once with a tenant or operator key (a form; the key is kept in an HttpOnly,
SameSite=Strict cookie scoped to /status), or sends the key as a header. A tenant sees its own
sessions and runs; an operator, or anyone on an open loopback server, sees everything.
"""

from __future__ import annotations

import html
import json
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from twinkle.errors import AuthenticationError, NotFoundError
from twinkle.http.common import context, read_body, tenant_of
from twinkle.http.context import ServerContext
from twinkle.http.curves import CurveCache
from twinkle.http.observe import Viewer, model_stats, viewer_for
from twinkle.store.history import HISTORY_KEEP

router = APIRouter()
STATIC = Path(__file__).parent / "static"
COOKIE = "twinkle_status_key"
COOKIE_PATH = "/status"
REFRESH_S = 3
RUNS_SHOWN = 20
CURVE_POINTS = 200
CURVES = CurveCache()  # this ingress replica's copy of the shown runs' loss points


@lru_cache(maxsize=None)
def _template(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def _key_of(request: Request) -> str | None:
    """The key a request carries: X-API-Key or Authorization: Bearer, else the page's cookie."""
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key or request.cookies.get(COOKIE)


def _login_page(message: str, status_code: int) -> HTMLResponse:
    page = _template("status_login.html").replace("{{message}}", html.escape(message))
    return HTMLResponse(page, status_code=status_code)


def _set_key_cookie(response: Response, request: Request, key: str) -> None:
    response.set_cookie(COOKIE, key, httponly=True, samesite="strict", path=COOKIE_PATH,
                        secure=request.url.scheme == "https")


async def _viewer(request: Request) -> Viewer:
    ctx = context(request)
    await ctx.ensure_started()
    return viewer_for(ctx, _key_of(request))


@router.get("/status", include_in_schema=False)
async def status_page(request: Request) -> Response:
    """The page itself, or a sign-in form when the request carries no valid key."""
    try:
        viewer = await _viewer(request)
    except AuthenticationError as exc:
        has_key = bool(_key_of(request))
        message = (f"{exc.message}: sign in again with a tenant or operator key" if has_key else
                   "Sign in with your API key (a tenant key shows your own runs, an operator key everything).")
        response = _login_page(message, 401)
        if request.cookies.get(COOKIE):
            response.delete_cookie(COOKIE, path=COOKIE_PATH)
        return response
    data = await status_data(context(request), viewer)
    initial = json.dumps(data).replace("<", "\\u003c")  # safe inside <script>: no "</script>" can appear
    page = _template("status.html").replace("{{refresh_ms}}", str(REFRESH_S * 1000)).replace("{{initial}}", initial)
    response = HTMLResponse(page, headers={"Cache-Control": "no-store"})
    key = _key_of(request)
    if key and request.cookies.get(COOKIE) != key:  # a key sent as a header: the page's refreshes reuse it
        _set_key_cookie(response, request, key)
    return response


@router.post("/status/login", include_in_schema=False)
async def login(request: Request) -> Response:
    """The sign-in form's POST (application/x-www-form-urlencoded `key`)."""
    form = parse_qs((await read_body(request)).decode("utf-8", "replace"))
    key = (form.get("key") or [""])[0].strip()
    if not key:
        return _login_page("Enter an API key.", 400)
    ctx = context(request)
    await ctx.ensure_started()
    try:
        viewer_for(ctx, key)
    except AuthenticationError:
        return _login_page("That key is not valid on this server: use a tenant's API key or an operator key "
                           "(auth.admin_keys).", 401)
    response = RedirectResponse("/status", status_code=303)
    _set_key_cookie(response, request, key)
    return response


@router.post("/status/logout", include_in_schema=False)
async def logout() -> Response:
    response = RedirectResponse("/status", status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


@router.get("/status/data", include_in_schema=False)
async def status_json(request: Request) -> JSONResponse:
    """What the page shows, as JSON (the page's refreshes fetch this)."""
    viewer = await _viewer(request)
    return JSONResponse(await status_data(context(request), viewer), headers={"Cache-Control": "no-store"})


@router.get("/api/v1/twinkle/runs/{model_id}/metrics")
async def run_metrics(request: Request, model_id: str, after: int = Query(0, ge=0),
                      limit: int = Query(1000, ge=1, le=HISTORY_KEEP),
                      kind: str | None = Query(None, pattern="^(forward_backward|step)$")) -> dict:
    """A training run's recorded metrics, oldest first: one point per forward_backward (its loss
    metrics and tokens) and per optimizer step; page with `after` (the last point_id you have)."""
    tenant = await tenant_of(request)
    ctx = context(request)
    if await ctx.db(ctx.store.get_model, model_id, tenant) is None:
        raise NotFoundError(f"no training run {model_id!r}", field="model_id")
    points = await ctx.db(ctx.store.run_points, model_id, tenant, after=after, limit=limit, kind=kind)
    return {"model_id": model_id, "points": points, "next_after": points[-1]["point_id"] if points else after}


async def status_data(ctx: ServerContext, viewer: Viewer) -> dict:
    """Models with their workers, queues and throughput; sessions; runs with their loss curves —
    only `viewer`'s own unless it is an operator."""
    stats = await model_stats(ctx, viewer)
    rows = await ctx.db(_store_rows, ctx, viewer)
    resident = {m for view in stats.values() if view for m in view.get("resident_models", [])}
    runs = []
    for run in rows["runs"]:
        run.update(rows["totals"].get(run["model_id"], {}), curve=rows["curves"].get(run["model_id"], []),
                   resident=run["model_id"] in resident)
        runs.append(run)
    models = []
    for name, view in stats.items():
        offloaded = rows["offloaded"].get(name, 0)
        models.append({"name": name, "up": view is not None, "offloaded": offloaded, **(view or {})})
    return {"viewer": {"name": viewer.name, "operator": viewer.operator}, "models": models,
            "sessions": rows["sessions"], "runs": runs, "tenants": rows.get("tenants"), "refresh_s": REFRESH_S}


def _store_rows(ctx: ServerContext, viewer: Viewer) -> dict:
    """Every store read of one page refresh, in one worker thread."""
    store, tenant = ctx.store, viewer.tenant
    runs = store.recent_models(tenant, RUNS_SHOWN)
    ids = [r["model_id"] for r in runs]
    return {"runs": runs, "totals": store.run_totals(ids),
            "curves": {i: CURVES.curve(store, i, CURVE_POINTS) for i in ids},
            "sessions": store.recent_sessions(tenant), "offloaded": store.offloaded_counts(tenant),
            "tenants": store.tenant_summary() if viewer.operator else None}
