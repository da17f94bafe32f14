"""The response envelope, error codes and request ids of the HTTP contract."""

from __future__ import annotations

import logging
import re
import secrets
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Annotated, Any, Generic, TypeVar

import psycopg
import psycopg.errors
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, BeforeValidator, PlainSerializer
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout  # every connection busy past pool_timeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.core import errors
from pipelines.core.clock import utc_z
from pipelines.core.settings import get_settings

log = logging.getLogger("ingot.api")
T = TypeVar("T")
_CODES = {
    400: "VALIDATION_ERROR",
    401: "AUTHENTICATION_ERROR",
    403: "AUTHORIZATION_ERROR",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
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
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def _iso_only(value: Any) -> Any:
    """Only ISO 8601 text (or a date already parsed) gets through: pydantic would otherwise read a
    number, or text like "0.5", as seconds since 1970. A date alone is its midnight, UTC."""
    if isinstance(value, str) and _ISO_DATE.match(value):
        return f"{value}T00:00:00Z" if len(value) == 10 else value
    if isinstance(value, datetime):
        return value
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    raise ValueError("must be an ISO 8601 date (2026-01-31, its midnight UTC) or date and time with a zone "
                     "(2026-01-31T00:00:00Z)")


IsoDateTime = Annotated[AwareDatetime, BeforeValidator(_iso_only)]


def _json_integer(value: Any) -> Any:
    """An integer as JSON means one: 3 or 3.0, never true, "3" or 3.5 (pydantic's lax mode takes all
    but the last; its strict mode refuses 3.0)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (isinstance(value, float)
                                                                        and not value.is_integer()):
        raise ValueError("must be an integer")
    return int(value)


# Constraints go before it in the same Annotated (Field(ge=...), JSON_INTEGER), or the schema loses them.
JSON_INTEGER = BeforeValidator(_json_integer)
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,2000}$"  # what pipelines.core.pagination.encode writes
# A page's cursor, as a query parameter: opaque, the `next_cursor` of the page before.
Cursor = Annotated[str | None, Query(pattern=CURSOR_PATTERN, description="the next_cursor of the previous page")]
IsoDate = Annotated[date, BeforeValidator(_iso_only)]


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
    def __init__(self, status: int, message: str, details: dict | None = None, headers: dict | None = None,
                 code: str | None = None):
        self.status = status
        self.code = code or _CODES.get(status, "INTERNAL_ERROR")
        self.message = message
        self.details = details or {}
        self.headers = headers


# Each kind of refusal the domain raises (pipelines.core.errors), as the contract answers it.
_REFUSALS: list[tuple[type[errors.DomainError], int, str | None]] = [
    (errors.NotFound, 404, None), (errors.Conflict, 409, None), (errors.Invalid, 422, None),
    (errors.Busy, 503, None), (errors.OverQuota, 429, "QUOTA_EXCEEDED"),
    (errors.TooExpensive, 422, "QUERY_TOO_EXPENSIVE"),
]


def refusal(exc: errors.DomainError) -> tuple[int, str]:
    """The status and code of the contract for EXC's kind."""
    for kind, status, code in _REFUSALS:
        if isinstance(exc, kind):
            return status, code or _CODES[status]
    return 500, _CODES[500]


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


def error_response(request: Request, status: int, message: str, details: dict | None = None, headers=None,
                   code: str | None = None):
    rid = request_id(request)
    body = {
        "success": False,
        "error": {"code": code or _CODES.get(status, "INTERNAL_ERROR"), "message": message, "details": details or {}},
        "timestamp": now_iso(),
        "request_id": rid,
    }
    response = JSONResponse(body, status_code=status, headers=headers)
    response.headers["X-Request-ID"] = rid
    return response


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method the OpenAPI document gives PATH, over all the routes that share its template."""
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        if _template(template).fullmatch(path):
            methods |= {method.upper() for method in operations}
    if "GET" in methods:  # every GET route answers HEAD too (api.head)
        methods.add("HEAD")
    return sorted(methods)


@lru_cache(maxsize=512)
def _template(path: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)))


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request, exc.status, exc.message, exc.details, exc.headers, exc.code)

    @app.exception_handler(errors.DomainError)
    async def _refused(request: Request, exc: errors.DomainError):
        status, code = refusal(exc)
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return error_response(request, status, str(exc), exc.details, headers, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # a known path, a method it does not have
            message = f"{request.method} is not allowed on {request.url.path}"
            allowed = allowed_methods(request.app, request.url.path)
            if allowed:  # Starlette names only the methods of the first route on the path; these are all of them
                headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return error_response(request, exc.status_code, message, headers=headers)

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
        if isinstance(getattr(exc, "orig", exc), psycopg.errors.QueryCanceled):
            limit = get_settings().api_statement_timeout_ms
            return await _refused(request, errors.TooExpensive(
                f"the query ran past the API's time limit ({limit} ms); narrow the filters, or use an export "
                "for large reads"))
        # The database is down or restarting: say so, and when to try again; the pool reconnects by itself.
        log.warning("database unavailable: %s", type(exc).__name__)
        return error_response(request, 503, "the database is unavailable; try again shortly",
                              headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return error_response(request, 500, "internal error; quote the request id when reporting it")
