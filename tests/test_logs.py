"""The access line, formatted directly, is the line structlog's processors would write."""

import json
import logging
import re
from datetime import UTC, datetime

import structlog

from pipelines.core.logs import ACCESS, JsonFormatter, configure


def test_the_access_line_is_the_line_the_processors_write():
    configure("INFO", "json")
    formatter = logging.getLogger().handlers[0].formatter
    assert isinstance(formatter, JsonFormatter)
    fields = {"method": "GET", "route": "/api/v1/jobs/{job_id}", "status": 200, "duration_ms": 1.5,
              "principal": "key_x", "request_id": "req_1"}
    record = logging.getLogger(ACCESS).makeRecord(ACCESS, logging.INFO, __file__, 0, "%s %s %s",
                                                  ("GET", "/api/v1/jobs/{job_id}", 200), None, extra=fields)
    structlog.contextvars.bind_contextvars(request_id="req_1")
    try:
        direct = json.loads(formatter.format(record))
        processed = json.loads(structlog.stdlib.ProcessorFormatter.format(formatter, record))
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    assert list(direct) == list(processed)  # the same keys, in the same order
    assert {k: v for k, v in direct.items() if k != "timestamp"} == {
        k: v for k, v in processed.items() if k != "timestamp"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", direct["timestamp"])
    when = datetime.strptime(direct["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(when.timestamp() - record.created) < 2e-6  # the moment of the request, in UTC
