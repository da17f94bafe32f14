"""What a rule of the domain can refuse, as types: the domain raises one of these, and one handler
(`api.envelope`) turns each kind into the contract's status and code; the CLI and the workers read
the same types. A refusal's message is for the caller; DETAILS is what a program may act on (the
unknown sources, the quota's figures).

| kind | meaning | HTTP |
|---|---|---|
| NotFound | no such thing, or not the caller's to see | 404 NOT_FOUND |
| Conflict | not in the state this asks for (ended, busy with a run, one too many) | 409 CONFLICT |
| Invalid | the request's content breaks a rule | 422 VALIDATION_ERROR |
| Busy | cannot take it now; the same request may succeed later | 503 SERVICE_UNAVAILABLE |
| OverQuota | the caller's share is used up | 429 QUOTA_EXCEEDED |
| TooExpensive | a read the service will not run at this cost | 422 QUERY_TOO_EXPENSIVE |
"""

from __future__ import annotations


class DomainError(Exception):
    def __init__(self, message: str, details: dict | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.details = details or {}
        self.retry_after = retry_after  # seconds, when the refusal ends by itself


class NotFound(DomainError, LookupError):
    pass


class Conflict(DomainError):
    pass


class Invalid(DomainError, ValueError):
    pass


class Busy(DomainError):
    pass


class OverQuota(DomainError):
    pass


class TooExpensive(DomainError):
    pass
