"""Small HTTP helpers, table-driven: Retry-After, paths into documents, URLs safe to show."""

import datetime as dt
from email.utils import format_datetime

import httpx
import pytest

from pipelines.core.retry import retry_after
from pipelines.ingestion.sources.batches import dig
from pipelines.ingestion.sources.http import public_url


def _answer(status: int, value: str | None) -> httpx.Response:
    return httpx.Response(status, headers={} if value is None else {"Retry-After": value})


@pytest.mark.parametrize(("status", "value", "expected"), [
    (429, "7", 7.0),
    (503, "7", 7.0),
    (429, " 12 ", 12.0),
    (429, "100000", 60.0),  # capped
    (429, "soon", None),
    (429, None, None),
    (429, "-5", None),
    (500, "7", None),  # only 429 and 503 ask for a pause
    (200, "7", None),
])
def test_retry_after(status, value, expected):
    assert retry_after(_answer(status, value), cap=60) == expected


def test_retry_after_as_an_http_date():
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    assert 25 <= retry_after(_answer(503, format_datetime(later, usegmt=True)), cap=60) <= 30
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    assert retry_after(_answer(503, format_datetime(past, usegmt=True)), cap=60) == 0.0
    assert retry_after(None, cap=60) is None


@pytest.mark.parametrize(("path", "expected"), [
    ("data", [1, 2]),
    ("meta.next", "http://x/2"),
    ("pages.1.url", "b"),
    ("", {"data": [1, 2], "meta": {"next": "http://x/2"}, "pages": [{"url": "a"}, {"url": "b"}]}),
    ("meta.missing", None),
    ("pages.9.url", None),
    ("data.x", None),
])
def test_dig(path, expected):
    document = {"data": [1, 2], "meta": {"next": "http://x/2"}, "pages": [{"url": "a"}, {"url": "b"}]}
    assert dig(document, path) == expected


@pytest.mark.parametrize(("url", "shown"), [
    ("https://api.example.com/v2/series?key=SECRET", "https://api.example.com/v2/series"),
    ("https://user:pass@api.example.com:8443/x#frag", "https://api.example.com:8443/x"),
    ("http://127.0.0.1:9000/records?page=2", "http://127.0.0.1:9000/records"),
])
def test_public_url_hides_query_and_credentials(url, shown):
    assert public_url(url) == shown
