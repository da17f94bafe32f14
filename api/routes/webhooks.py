"""Webhook endpoints and their delivery log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.deps import Reader, SessionDep, Writer
from api.envelope import Cursor, Envelope, UTCDateTime, found, ok
from pipelines.auth.principal import Principal
from pipelines.core.models import Webhook
from pipelines.webhooks import endpoints
from worker.dispatch import relay_webhooks

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000, pattern=r"^[Hh][Tt][Tt][Pp][Ss]?://[^/?#\s]+")
    events: list[str] = Field(min_length=1, max_length=len(endpoints.EVENTS),
                              json_schema_extra={"items": {"type": "string", "enum": list(endpoints.EVENTS)}})
    secret: str | None = Field(default=None, max_length=200)

    @field_validator("events")
    @classmethod
    def _known(cls, events: list[str]) -> list[str]:
        unknown = sorted(set(events) - set(endpoints.EVENTS))
        if unknown:
            raise ValueError(f"unknown event(s) {unknown}; known: {list(endpoints.EVENTS)}")
        return events


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    enabled: bool
    created_at: UTCDateTime
    disabled_at: UTCDateTime | None = None
    disabled_reason: str | None = None
    failing_since: UTCDateTime | None = None
    # The circuit breaker: paused after failing attempts in a row, probed with one attempt now and then.
    paused: bool = False
    paused_at: UTCDateTime | None = None
    next_probe_at: UTCDateTime | None = None
    consecutive_failures: int = 0


class WebhookCreated(WebhookOut):
    secret: str


class WebhookList(BaseModel):
    webhooks: list[WebhookOut]


class Attempt(BaseModel):
    attempt: int
    attempted_at: UTCDateTime
    status_code: int | None
    duration_ms: float | None
    error: str | None
    response_excerpt: str | None
    next_retry_at: UTCDateTime | None


class Delivery(BaseModel):
    id: str
    event_id: str
    event_type: str
    state: str
    attempts: int
    status_code: int | None
    error: str | None
    next_retry_at: UTCDateTime | None
    created_at: UTCDateTime
    completed_at: UTCDateTime | None
    attempt_log: list[Attempt]


class DeliveryList(BaseModel):
    deliveries: list[Delivery]


def _view(hook: Webhook) -> dict:
    shown = {k: getattr(hook, k) for k in WebhookOut.model_fields if hasattr(Webhook, k)}
    return {**shown, "paused": hook.paused_at is not None, "next_probe_at": hook.probe_at}


def _hook(session, webhook_id: str, caller: Principal) -> Webhook:
    return found(endpoints.get(session, webhook_id, caller.owner), f"no webhook '{webhook_id}'")


@router.post("", status_code=201, response_model=Envelope[WebhookCreated])
def create(body: WebhookIn, request: Request, session: SessionDep, caller: Writer) -> dict:
    """Register an endpoint. The secret (generated when none is given) is shown only in this answer."""
    hook, secret = endpoints.create(session, body.url, body.events, body.secret, caller.id)
    return ok(request, {**_view(hook), "secret": secret}, message="store the secret now: it is not shown again")


@router.get("", response_model=Envelope[WebhookList])
def list_webhooks(request: Request, session: SessionDep, caller: Reader) -> dict:
    return ok(request, {"webhooks": [_view(h) for h in endpoints.listing(session, caller.owner)]},
              next_cursor=None)


@router.get("/{webhook_id}", response_model=Envelope[WebhookOut])
def get_webhook(webhook_id: str, request: Request, session: SessionDep, caller: Reader) -> dict:
    return ok(request, _view(_hook(session, webhook_id, caller)))


@router.delete("/{webhook_id}", response_model=Envelope[WebhookOut])
def delete_webhook(webhook_id: str, request: Request, session: SessionDep, caller: Writer) -> dict:
    hook = _hook(session, webhook_id, caller)
    endpoints.delete(session, hook)
    return ok(request, _view(hook), message="webhook deleted")


@router.get("/{webhook_id}/deliveries", response_model=Envelope[DeliveryList])
def deliveries(
    webhook_id: str,
    request: Request,
    session: SessionDep,
    caller: Reader,
    state: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Cursor = None,
) -> dict:
    """Every delivery to this endpoint, newest first, each with every attempt."""
    _hook(session, webhook_id, caller)
    data, next_cursor = endpoints.deliveries(session, webhook_id, state=state, cursor=cursor, limit=limit)
    return ok(request, {"deliveries": data}, next_cursor=next_cursor)


@router.post("/{webhook_id}/deliveries/{delivery_id}/redeliver", status_code=202,
             response_model=Envelope[dict])
def redeliver(webhook_id: str, delivery_id: str, request: Request, session: SessionDep, caller: Writer) -> dict:
    """Send a delivery again (same `webhook-id`), from the start of the retry schedule."""
    endpoints.redeliver(session, _hook(session, webhook_id, caller), delivery_id, relay_webhooks)
    return ok(request, {"delivery_id": delivery_id, "status": "pending"}, message="redelivery queued")
