"""The dashboard's web side: a Starlette app (pages, JSON API, server-sent events) served by uvicorn.

Read-only: every route is a GET over FleetState. With a token configured every request must carry it,
as `Authorization: Bearer TOKEN` or `?token=TOKEN` (the page passes it on to its API and event calls).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .state import FleetState

STATIC = Path(__file__).parent / "static"
EVENT_MIN_INTERVAL_S = 1.0  # at most one snapshot a second per open page, however busy the fleet
EVENT_POLL_S = 0.25
KEEPALIVE_S = 15.0  # a comment line, so proxies and browsers keep an idle stream open


class _BearerToken(BaseHTTPMiddleware):
    def __init__(self, app, token: str) -> None:
        super().__init__(app)
        self._token = token.encode()

    async def dispatch(self, request: Request, call_next):
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), self._token):
            return JSONResponse({"error": "a bearer token is required (Authorization: Bearer TOKEN or ?token=)"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)


def build_app(state: FleetState, token: str | None = None) -> Starlette:
    def page(name: str):
        async def endpoint(request: Request) -> Response:
            return FileResponse(STATIC / name, headers={"Cache-Control": "no-store"})
        return endpoint

    async def api_status(request: Request) -> Response:
        return JSONResponse(state.status())

    async def api_devices(request: Request) -> Response:
        return JSONResponse({"devices": state.device_list()})

    async def api_device(request: Request) -> Response:
        device = state.device(request.path_params["device_id"])
        if device is None:
            return JSONResponse({"error": f"no device {request.path_params['device_id']!r} has been seen"},
                                status_code=404)
        return JSONResponse(device)

    async def api_rounds(request: Request) -> Response:
        return JSONResponse({"rounds": state.round_list(), "current": state.round_view()})

    async def events(request: Request) -> Response:
        return StreamingResponse(_snapshots(state), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    routes = [
        Route("/", page("index.html")),
        Route("/devices/{device_id}", page("device.html")),
        Route("/api/status", api_status),
        Route("/api/devices", api_devices),
        Route("/api/devices/{device_id}", api_device),
        Route("/api/rounds", api_rounds),
        Route("/events", events),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(_BearerToken, token=token)] if token else []
    return Starlette(routes=routes, middleware=middleware)


async def _snapshots(state: FleetState):
    """`data: <status JSON>` whenever the state changed (at most once per EVENT_MIN_INTERVAL_S)."""
    loop = asyncio.get_running_loop()
    sent, last = -1, 0.0
    while True:
        now = loop.time()
        if state.version != sent:
            sent = state.version
            yield f"event: status\ndata: {json.dumps(state.status(), separators=(',', ':'))}\n\n"
            last = now
            await asyncio.sleep(EVENT_MIN_INTERVAL_S)
            continue
        if now - last >= KEEPALIVE_S:
            yield ": keepalive\n\n"
            last = now
        await asyncio.sleep(EVENT_POLL_S)


class WebServer:
    """uvicorn on its own thread; stop() ends it."""

    def __init__(self, app: Starlette, host: str, port: int, ssl: dict | None = None) -> None:
        import uvicorn

        # Open event streams never end by themselves: give them a second at shutdown, then close them.
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                     lifespan="off", timeout_graceful_shutdown=1, **(ssl or {}))
        self.server = uvicorn.Server(self.config)
        self._thread = threading.Thread(target=self.server.run, name="dashboard-http", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.server.started:
            raise OSError(f"the dashboard could not listen on {self.config.host}:{self.config.port}")

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the OS chose for port 0)."""
        return self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
