"""One place decides how a refusal is answered: the domain raises a kind of `pipelines.core.errors`,
`api.envelope.refusal` maps each kind to the contract's status and code, and routes neither catch
domain errors nor commit (the request's session does, before the answer is sent)."""

from __future__ import annotations

import ast
import importlib
import pkgutil

import pytest

import api.routes
from api.envelope import refusal
from pipelines.auth.quotas import QuotaExceeded
from pipelines.core import errors
from pipelines.core.netguard import UnsafeUrl
from pipelines.core.pagination import BadCursor
from pipelines.curves.queries import NoCurve
from pipelines.exports.admission import DiskFull
from pipelines.ingestion.catalog import InvalidSources, NoEnabledSource, UnknownSources
from pipelines.jobs.control import NoSuchJob, SourcesBusy
from pipelines.jobs.machine import NotCancellable
from pipelines.scenarios.definitions import ScenarioBusy, UnknownCurves
from pipelines.scenarios.runs import StateNotAllowed
from pipelines.webhooks.endpoints import TooManyWebhooks


@pytest.mark.parametrize(("error", "status", "code"), [
    (NoSuchJob("job_1"), 404, "NOT_FOUND"),
    (UnknownSources(["a"]), 404, "NOT_FOUND"),
    (NoCurve("no curve"), 404, "NOT_FOUND"),
    (SourcesBusy(["a"]), 409, "CONFLICT"),
    (NotCancellable("ended"), 409, "CONFLICT"),
    (StateNotAllowed("running"), 409, "CONFLICT"),
    (ScenarioBusy("a run"), 409, "CONFLICT"),
    (TooManyWebhooks("10"), 409, "CONFLICT"),
    (NoEnabledSource(), 409, "CONFLICT"),
    (InvalidSources({"a": "bad"}), 422, "VALIDATION_ERROR"),
    (UnknownCurves(["X"]), 422, "VALIDATION_ERROR"),
    (UnsafeUrl("private"), 422, "VALIDATION_ERROR"),
    (BadCursor("cursor is not valid"), 422, "VALIDATION_ERROR"),
    (DiskFull("full"), 503, "SERVICE_UNAVAILABLE"),
    (QuotaExceeded("exports", 3, 3, retry_after=10), 429, "QUOTA_EXCEEDED"),
    (errors.TooExpensive("slow"), 422, "QUERY_TOO_EXPENSIVE"),
])
def test_each_kind_of_refusal_has_one_answer(error, status, code):
    assert refusal(error) == (status, code)


def test_a_refusal_carries_what_a_program_acts_on():
    assert SourcesBusy(["b", "a"]).details == {"sources": ["b", "a"]}
    assert UnknownCurves(["X"]).details == {"curve_keys": ["X"]}
    quota = QuotaExceeded("exports queued or running", 3, 3, retry_after=10)
    assert quota.details == {"quota": "exports queued or running", "used": 3, "allowed": 3}
    assert quota.retry_after == 10 and "3 of 3" in str(quota)
    assert str(NoSuchJob("job_1", "ingestion job")) == "no ingestion job 'job_1'"
    # Callers that knew the old bases still catch them: lookups are LookupErrors, bad input ValueErrors.
    assert isinstance(NoSuchJob("x"), LookupError) and isinstance(InvalidSources({}), ValueError)


def _route_modules():
    for info in pkgutil.iter_modules(api.routes.__path__):
        module = importlib.import_module(f"api.routes.{info.name}")
        yield module, ast.parse(open(module.__file__).read())


def test_routes_neither_catch_domain_errors_nor_commit():
    caught, commits = [], []
    for module, tree in _route_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                named = eval(compile(ast.Expression(node.type), module.__file__, "eval"), vars(module))  # noqa: S307
                for kind in named if isinstance(named, tuple) else (named,):
                    if issubclass(kind, errors.DomainError):
                        caught.append(f"{module.__name__}:{node.lineno} catches {kind.__name__}")
            if isinstance(node, ast.Attribute) and node.attr == "commit":
                commits.append(f"{module.__name__}:{node.lineno}")
    assert not caught, caught
    assert not commits, commits
