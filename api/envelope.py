"""The response envelope, error codes and request ids of the HTTP contract."""

from __future__ import annotations

import logging
import re
import secrets
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

import psycopg
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, PlainSerializer
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout  # every connection busy past pool_timeout
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.metrics import route_template
from pipelines.core.clock import utc_z
from pipelines.core.pagination import BadCursor

log = logging.getLogger("ingot.api")
access = logging.getLogger("ingot.access")
T = TypeVar("T")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_CODES = {
    400: "VALIDATION_ERROR",
    401: "AUTHENTICATION_ERROR",
    403: "AUTHORIZATION_ERROR",
    404: "NOT_FOUND",
    405: "NOT_FOUND",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    422: "VALIDATION_ERROR",
    429: "RATE_LIMIT_EXCEEDED",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
}


def iso(value: datetime | None) -> str | None:
    return None if value is None else utc_z(value)


UTCDateTime = Annotated[datetime, PlainSerializer(iso, return_type=str)]


class Meta(BaseModel):
    next_cursor: str | None = None


class Envelope(BaseModel, Generic[T]):
    success: bool = True
    data: T
    message: str | None = None
    timestamp: str
    request_id: str
    meta: Meta | None = None


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorEnvelope(BaseModel):
    success: bool = False
    error: ErrorBody
    timestamp: str
    request_id: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": code} for status, code in _CODES.items() if status != 405
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, details: dict | None = None, headers: dict | None = None):
        self.status = status
        self.code = _CODES.get(status, "INTERNAL_ERROR")
        self.message = message
        self.details = details or {}
        self.headers = headers


def found(value: T | None, missing: str) -> T:
    """VALUE, or a 404 saying what is MISSING."""
    if value is None:
        raise ApiError(404, missing)
    return value


def now_iso() -> str:
    return utc_z(datetime.now(UTC))


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or new_request_id()


def new_request_id() -> str:
    return f"req_{secrets.token_hex(10)}"


def ok(request: Request, data: Any, *, message: str | None = None, next_cursor: str | None | bool = False) -> dict:
    """The success envelope; pass NEXT_CURSOR (None on the last page) for list endpoints."""
    body = {
        "success": True,
        "data": data,
        "message": message,
        "timestamp": now_iso(),
        "request_id": request_id(request),
    }
    if next_cursor is not False:
        body["meta"] = {"next_cursor": next_cursor}
    return body


def error_response(request: Request, status: int, message: str, details: dict | None = None, headers=None):
    rid = request_id(request)
    body = {
        "success": False,
        "error": {"code": _CODES.get(status, "INTERNAL_ERROR"), "message": message, "details": details or {}},
        "timestamp": now_iso(),
        "request_id": rid,
    }
    response = JSONResponse(body, status_code=status, headers=headers)
    response.headers["X-Request-ID"] = rid
    return response


def install(app: FastAPI) -> None:
    @app.middleware("http")
    async def request_ids(request: Request, call_next):
        supplied = request.headers.get("x-request-id", "")
        rid = supplied if _REQUEST_ID.match(supplied) else new_request_id()
        request.state.request_id = rid
        structlog.contextvars.bind_contextvars(request_id=rid)
        began = time.perf_counter()
        try:
            response = await call_next(request)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
        # One access line per request, JSON like every other line (never a query string: it may hold a cursor).
        access.info("%s %s %s", request.method, route_template(request), response.status_code, extra={
            "method": request.method, "route": route_template(request), "status": response.status_code,
            "duration_ms": round((time.perf_counter() - began) * 1000, 1),
            "principal": getattr(request.state, "api_key_id", None), "request_id": rid})
        response.headers["X-Request-ID"] = rid
        # The rate limit's figures on every answer: errors and downloads included (see api.limits).
        shown = getattr(request.state, "rate_limit_headers", None)
        if shown is None and request.url.path.startswith("/api/v1/"):
            from api.limits import address_headers  # api.limits depends on this module

            shown = await run_in_threadpool(address_headers, request)
        response.headers.update(shown or {})
        return response

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request, exc.status, exc.message, exc.details, exc.headers)

    @app.exception_handler(BadCursor)
    async def _bad_cursor(request: Request, exc: BadCursor):
        return error_response(request, 422, "cursor is not valid")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        status = 404 if exc.status_code == 405 else exc.status_code
        return error_response(request, status, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        malformed = any(e.get("type") == "json_invalid" for e in errors)
        problems = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg", "")}
            for e in errors
        ]
        message = "request body is not valid JSON" if malformed else "request is not valid"
        return error_response(request, 400 if malformed else 422, message, {"errors": problems})

    @app.exception_handler(OperationalError)
    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _database_unavailable(request: Request, exc: Exception):
        # The database is down or restarting: say so, and when to try again; the pool reconnects by itself.
        log.warning("database unavailable: %s", type(exc).__name__)
        return error_response(request, 503, "the database is unavailable; try again shortly",
                              headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return error_response(request, 500, "internal error; quote the request id when reporting it")
