"""The HTTP connector: JSON, JSON Lines or CSV pages from an API, one batch per page.

Pagination by page number, offset, a cursor in the body, or next links (in the body or the Link
header). Connection errors, timeouts, 429 (honouring Retry-After) and 5xx are retried with exponential
backoff and jitter; anything else, or the last failure, is a clear error on the job. `${VAR}` in the
URL, headers and parameters is read from the environment at request time and never stored or shown.
The position after each page is the checkpoint, so a resumed run carries on from the next page.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import time
import zlib
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import pyarrow as pa

from pipelines.core import httpclock
from pipelines.core.retry import retry_after
from pipelines.core.settings import get_settings
from pipelines.ingestion.sources import inflate
from pipelines.ingestion.sources.batches import Piece, RawBatch, dig, json_records, records_table
from pipelines.ingestion.sources.files import read_stream
from pipelines.ingestion.sources.registry import SourceConfig, SourceContentError, SourceError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_RETRY_STATUS = {429, 500, 502, 503, 504}
BACKOFF_BASE, BACKOFF_CAP, RETRY_AFTER_CAP = 0.5, 30.0, 120.0
MAX_REDIRECTS = 5


def expand(source: SourceConfig, value: str) -> str:
    """VALUE with each ${VAR} replaced from the environment; a missing variable is named, never shown."""

    def lookup(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise SourceError(f"source '{source.id}': environment variable {name} is not set")
        return os.environ[name]

    return _VAR.sub(lookup, value)


def shown_url(source: SourceConfig, url: str) -> str:
    """`public_url`, with every value that came from a ${VAR} of the declaration put back as ${VAR}
    (a secret may sit in the URL's path, where the query's removal does not reach)."""
    shown = public_url(url)
    declared = " ".join([source.url or "", *map(str, source.headers.values()), *map(str, source.params.values())])
    for name in set(_VAR.findall(declared)):
        value = os.environ.get(name, "")
        if len(value) >= 4:  # shorter values would mask ordinary text, and are no secret worth the name
            shown = shown.replace(value, "${" + name + "}")
    return shown


def public_url(url: str) -> str:
    """URL without its query string or credentials: what errors and quarantine rows may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


class Fetcher:
    """GETs with retries, a timeout and a size limit, for one source, confined to where it was declared.

    Redirects and next-page links are followed only to the origin of the source's `url` or to a host
    its `allowed_hosts` names (so a link can never lead a worker to a host the declaration did not
    name, metadata and private addresses included), and its own headers (API keys) go to its origin
    alone."""

    def __init__(self, source: SourceConfig, client: httpx.Client | None = None):
        self.source = source
        self.limit = source.max_response_bytes or get_settings().http_max_response_bytes
        self.client = client or httpx.Client(timeout=source.timeout, follow_redirects=False,
                                             headers={"Accept-Encoding": inflate.ACCEPT_ENCODING},
                                             transport=httpclock.transport())
        self.origin = _origin(httpx.URL(expand(source, source.url or "")))

    def close(self) -> None:
        self.client.close()

    def _confined(self, url: str) -> bool:
        """Whether URL is the source's own origin (True) or a host it allowed (False); SourceError if neither."""
        target = httpx.URL(url)
        if _origin(target) == self.origin:
            return True
        if target.host not in self.source.allowed_hosts or target.scheme not in ("http", "https"):
            # Never followed, whatever it resolves to: a link may not lead a worker onto other hosts.
            raise SourceError(f"source '{self.source.id}': {shown_url(self.source, url)} is outside the "
                              "source's origin; name its host in allowed_hosts to follow it")
        return False

    def get(self, url: str, params: dict) -> tuple[bytes, httpx.Headers]:
        for _hop in range(MAX_REDIRECTS + 1):
            own = self._confined(url)
            outcome = self._get(url, params, own)
            if isinstance(outcome, str):  # a redirect: where to, checked at the top of the next turn
                url, params = outcome, {}
                continue
            return outcome
        raise SourceError(f"source '{self.source.id}': more than {MAX_REDIRECTS} redirects from "
                          f"{shown_url(self.source, url)}")

    def _get(self, url: str, params: dict, own: bool) -> tuple[bytes, httpx.Headers] | str:
        source, shown = self.source, shown_url(self.source, url)
        headers = {k: expand(source, v) for k, v in source.headers.items()} if own else {}
        params = {k: expand(source, v) if isinstance(v, str) else v for k, v in params.items()}
        attempts = source.retries + 1
        for attempt in range(1, attempts + 1):
            wait = BACKOFF_BASE * 2 ** (attempt - 1) * (0.5 + random.random() / 2)
            try:
                # params=None, not {}: an empty mapping would wipe the query of a next link. The whole
                # page, from connecting to its last byte, within the source's timeout: a server that
                # trickles its headers or its body cannot hold a worker (or a probe's thread) for ever.
                with httpclock.within(source.timeout), \
                        self.client.stream("GET", url, params=params or None, headers=headers) as response:
                    if response.is_redirect and "location" in response.headers:
                        return str(response.url.join(response.headers["location"]))
                    if response.status_code in _RETRY_STATUS:
                        problem = f"HTTP {response.status_code}"
                        wait = retry_after(response, RETRY_AFTER_CAP) or wait
                    elif response.is_error:
                        raise SourceError(f"source '{source.id}': {shown} answered HTTP {response.status_code}")
                    else:
                        return self._read(response, shown), response.headers
            except httpx.TimeoutException:
                problem = f"no whole answer within {source.timeout:g} s"
            except httpx.TransportError as exc:
                problem = f"connection failed ({type(exc).__name__})"
            if attempt < attempts:
                time.sleep(min(wait, BACKOFF_CAP if problem != "HTTP 429" else RETRY_AFTER_CAP))
        raise SourceError(f"source '{source.id}': {shown}: {problem} after {attempts} attempt(s)")

    def _read(self, response: httpx.Response, shown: str) -> bytes:
        """The page's body, unpacked from its Content-Encoding. Its bytes on the wire and its bytes
        unpacked each count against the limit, and the unpacked size is known before it is held."""
        declared = response.headers.get("content-length")
        too_big = f"source '{self.source.id}': the response from {shown} is larger than {self.limit:,} bytes"
        if declared and declared.isdigit() and int(declared) > self.limit:
            raise SourceError(too_big)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity", *inflate.ENCODINGS):
            raise SourceContentError(f"source '{self.source.id}': the response from {shown} is {encoding}-encoded, "
                                     f"which Ingot does not unpack (it asks for {inflate.ACCEPT_ENCODING})")
        body = bytearray()
        for chunk in response.iter_raw():  # as sent: httpx would unpack each chunk whole
            body += chunk
            if len(body) > self.limit:
                raise SourceError(too_big)
        if encoding in ("", "identity"):
            return bytes(body)
        return unpacked(self.source, bytes(body), encoding, self.limit, shown)


def unpacked(source: SourceConfig, data: bytes, encoding: str, limit: int, shown: str, *, keep: bool = True
             ) -> bytes:
    """DATA unpacked (or, KEEP false, DATA itself once checked), refused (SourceContentError) if it
    would come to more than LIMIT bytes: counted first, a megabyte at a time, so a bomb is refused
    without ever being held."""
    try:
        inflate.inflate(data, encoding, limit, keep=False)
        return inflate.inflate(data, encoding, limit) if keep else data
    except inflate.TooLarge:
        raise SourceContentError(f"source '{source.id}': the response from {shown} is larger than {limit:,} bytes "
                                 f"once unpacked ({len(data):,} bytes {encoding}-compressed); raise "
                                 "max_response_bytes if this page is meant to be that large") from None
    except zlib.error as exc:
        raise SourceContentError(f"source '{source.id}': the response from {shown} is not valid {encoding}: "
                                 f"{exc}") from None


def _content(source: SourceConfig, body: bytes, limit: int, shown: str) -> bytes:
    """The page's content. A body that is gzip by its content (a `.csv.gz` served as is) is checked
    against LIMIT once unpacked; JSON is unpacked here, CSV and JSON Lines as they are parsed
    (`lines.open_stream`)."""
    if not body.startswith(inflate.GZIP_MAGIC):
        return body
    return unpacked(source, body, "gzip", limit, shown, keep=source.format not in ("csv", "jsonl"))


def _parse(source: SourceConfig, body: bytes, first_record: int, shown: str) -> RawBatch:
    """One page as a raw batch; records are numbered on from FIRST_RECORD across pages."""
    if source.format not in ("csv", "jsonl"):
        return json_records(source, body, first_record, f"the response from {shown}")
    batches = list(read_stream(source, io.BytesIO(body), len(body) or 1, 10**9))
    offset = first_record - (2 if source.format == "csv" else 1)
    rejects = [r for b in batches for r in b.rejects]
    batches = [b for b in batches if b.table.num_columns]
    for reject in rejects:
        reject.line += offset
    if not batches:
        return RawBatch(records_table([]), np.array([], dtype=np.int64), rejects)
    table = pa.concat_tables([b.table for b in batches], promote_options="permissive")
    return RawBatch(table, np.concatenate([b.lines for b in batches]) + offset, rejects)


def _next_state(source: SourceConfig, state: dict, body: bytes, headers: httpx.Headers, count: int) -> dict | None:
    """Where the next page is, or None when this was the last."""
    pagination = source.pagination
    record = state["record"] + count
    if pagination.type == "none" or state["pages"] + 1 >= pagination.max_pages:
        return None
    if pagination.type in ("page", "offset"):
        if count == 0 or (pagination.size and count < pagination.size):
            return None
        step = 1 if pagination.type == "page" else (pagination.size or count)
        return {**state, "value": state["value"] + step, "record": record, "pages": state["pages"] + 1}
    if pagination.type == "cursor":
        cursor = dig(json.loads(body), pagination.cursor_path)
        if cursor in (None, "") or count == 0:
            return None
        return {**state, "value": cursor, "record": record, "pages": state["pages"] + 1}
    # link: a next URL in the body, or in the Link header
    url = dig(json.loads(body), pagination.next_path) if pagination.next_path else None
    if not pagination.next_path:
        match = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', headers.get("link", ""))
        url = match.group(1) if match else None
    if not url:
        return None
    return {**state, "url": str(httpx.URL(state["url"] or source.url or "").join(url)), "record": record,
            "pages": state["pages"] + 1}


def _request(source: SourceConfig, state: dict) -> tuple[str, dict]:
    pagination = source.pagination
    params = dict(source.params)
    if state.get("url"):  # a next link carries its own query
        return state["url"], {}
    if pagination.type in ("page", "offset", "cursor") and pagination.param and state["value"] is not None:
        params[pagination.param] = state["value"]
    if pagination.size_param and pagination.size:
        params[pagination.size_param] = pagination.size
    return expand(source, source.url or ""), params


def _same_page(source: SourceConfig, state: dict, shown: str) -> str:
    """Why a run stops when a page comes back the same as the one before: an API that does not read the
    declared page parameter (a misspelt name) sends its first page for every request, and would be asked
    for it `max_pages` times over."""
    pagination = source.pagination
    asked = ("the next link" if pagination.type == "link"
             else f"`{pagination.param}` = {state['value']!r}")
    return (f"source '{source.id}': {shown} sent the same page for {asked} as for the page before it, so "
            f"it does not seem to page by it; the run stopped after {state['pages'] + 1} page(s) rather than "
            f"ask again (check `pagination` in sources.toml against the API's documentation)")


def first_state(source: SourceConfig) -> dict:
    pagination = source.pagination
    value = None
    if pagination.type == "page":
        value = 1 if pagination.start is None else pagination.start
    elif pagination.type == "offset":
        value = pagination.start or 0
    return {"url": None, "value": value, "record": 1, "pages": 0}


def stream(
    source: SourceConfig, resume: dict | None, since: str | None = None, fetcher: Fetcher | None = None
) -> Iterator[Piece]:
    """The pages of SOURCE from the position RESUME (or the first page), one Piece each; with SINCE
    (the committed cursor value) and a `cursor_param`, the API is asked only for what is new."""
    if (resume or {}).get("done"):
        return
    fetcher = fetcher or Fetcher(source)
    state = (resume or {}).get("http") or first_state(source)
    try:
        while state is not None:
            url, params = _request(source, state)
            if since is not None and source.cursor_param:
                params[source.cursor_param] = since  # the API itself sends only what is new
            shown = shown_url(source, url)
            body, headers = fetcher.get(url, params)
            body = _content(source, body, fetcher.limit, shown)
            digest = hashlib.blake2b(body, digest_size=16).hexdigest()
            if state.get("digest") == digest:
                raise SourceError(_same_page(source, state, shown))
            raw = _parse(source, body, state["record"], shown)
            try:
                state = _next_state(source, state, body, headers, raw.rows_seen)
            except json.JSONDecodeError as exc:
                raise SourceError(f"source '{source.id}': the response from {shown} is not valid JSON: {exc}") from None
            if state is not None:
                state["digest"] = digest  # a page the same as the one before stops the run (`_same_page`)
            yield Piece(raw, shown, {"http": state} if state else {"done": True}, None)
    finally:
        fetcher.close()
