"""Files as the world writes them, each ingested through the real API and a real worker, checked row
by row: the values stored, and the exact line of every quarantined row.

The worker reads in 64-byte chunks, so every case also crosses chunk boundaries everywhere.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field

import pytest
from sqlalchemy import text

from cli.client import Client
from pipelines.core.db import get_engine
from tests.helpers import WorkerProcess, make_key

pytestmark = pytest.mark.worker  # starts worker processes of its own

HEADER = "id,timestamp,px,note"
T = "2026-01-01T00:00:00Z"


@dataclass
class Case:
    file: str
    content: bytes
    rows: dict[str, tuple[float, str | None]]  # id -> (value, note)
    rejects: dict[int, str] = field(default_factory=dict)  # line -> a phrase of the reason
    declaration: str = ""
    fmt: str = "csv"
    notes: list[str] = field(default_factory=list)


def csv(*lines: str, end: str = "\n", final: bool = True) -> bytes:
    return (end.join(lines) + (end if final else "")).encode()


CASES = {
    "no_final_newline": Case("a.csv", csv(HEADER, f"a,{T},1.5,x", f"b,{T},2.5,y", final=False),
                             {"a": (1.5, "x"), "b": (2.5, "y")}),
    "no_final_newline_long": Case(
        "a.csv", csv(HEADER, *[f"r{i:03d},{T},{i},n{i}" for i in range(200)], final=False),
        {f"r{i:03d}": (float(i), f"n{i}") for i in range(200)}),
    "crlf": Case("a.csv", csv(HEADER, f"a,{T},1,x", f"b,{T},oops,y", f"c,{T},3,z", end="\r\n"),
                 {"a": (1.0, "x"), "c": (3.0, "z")}, {3: "cannot parse 'oops' as float"}),
    "bare_cr": Case("a.csv", csv(HEADER, f"a,{T},1,x", f"b,{T},2,y", end="\r"), {"a": (1.0, "x"), "b": (2.0, "y")}),
    "bom": Case("a.csv", b"\xef\xbb\xbf" + csv(HEADER, f"a,{T},1,x", end="\r\n"), {"a": (1.0, "x")}),
    "trailing_blank_lines": Case("a.csv", csv(HEADER, f"a,{T},1,x", "", f"b,{T},2,y", "", "", ""),
                                 {"a": (1.0, "x"), "b": (2.0, "y")}),
    "header_only": Case("a.csv", csv(HEADER), {}),
    "empty": Case("a.csv", b"", {}, notes=["data/empty/a.csv: the file is empty"]),
    "quoted": Case("a.csv", csv(
        HEADER,
        f'a,{T},1,"has, comma"',
        f'b,{T},2,"doubled ""quotes"" inside"',
        f'c,{T},3,"two',
        'line breaks',
        'inside"',
        f"d,{T},bad,after the multi-line row",
        f'"e",{T},"5",plain',
    ), {"a": (1.0, "has, comma"), "b": (2.0, 'doubled "quotes" inside'), "c": (3.0, "two\nline breaks\ninside"),
        "e": (5.0, "plain")}, {7: "cannot parse 'bad' as float"}),
    "quoted_crlf": Case("a.csv", csv(HEADER, f'a,{T},1,"x\r\ny"', f"b,{T},nope,z", f"c,{T},3,w", end="\r\n"),
                        {"a": (1.0, "x\r\ny"), "c": (3.0, "w")}, {4: "cannot parse 'nope' as float"}),
    "wrong_columns": Case("a.csv", csv(HEADER, f"a,{T},1,x", f"b,{T},2", f"c,{T},3,z,extra", f"d,{T},4,w"),
                          {"a": (1.0, "x"), "d": (4.0, "w")},
                          {3: "wrong number of columns", 4: "wrong number of columns"}),
    "semicolon": Case("a.csv", csv(HEADER.replace(",", ";"), f"a;{T};1,5;x", f"b;{T};2;y"),
                      {"b": (2.0, "y")}, {2: "cannot parse '1,5' as float"}, 'delimiter = ";"'),
    "tab": Case("a.tsv", csv(HEADER.replace(",", "\t"), f"a\t{T}\t1\tx, y", f"b\t{T}\t2\ty"),
                {"a": (1.0, "x, y"), "b": (2.0, "y")}, declaration='delimiter = "\\t"'),
    "latin1": Case("a.csv", f"{HEADER}\na,{T},1,café\nb,{T},2,Zürich\n".encode("latin-1"),
                   {"a": (1.0, "café"), "b": (2.0, "Zürich")}, declaration='encoding = "latin-1"'),
    "cp1252": Case("a.csv", f"{HEADER}\na,{T},1,€ price\n".encode("cp1252") + f"b,{T},2,x".encode() + b"\x81\n"
                   + f"c,{T},3,“quoted”\n".encode("cp1252"),
                   {"a": (1.0, "€ price"), "c": (3.0, "“quoted”")}, {3: "not valid cp1252"}, 'encoding = "cp1252"'),
    "bad_utf8": Case("a.csv", csv(HEADER, f"a,{T},1,ok") + f"b,{T},2,caf".encode() + b"\xe9\n",
                     {"a": (1.0, "ok")}, {3: "not valid utf-8"}),
    "gzip_csv": Case("a.csv.gz", gzip.compress(csv(HEADER, *[f"g{i},{T},{i},n" for i in range(50)], f"bad,{T},x,n")),
                     {f"g{i}": (float(i), "n") for i in range(50)}, {52: "cannot parse 'x' as float"}),
    "long_line": Case("a.csv", csv(HEADER, f"a,{T},1,{'x' * 500}", f"b,{T},2,y", f"c,{T},3,{'z' * 90}"),
                      {"b": (2.0, "y"), "c": (3.0, "z" * 90)}, {2: "line longer than 200 bytes"},
                      "max_line_bytes = 200"),
    "jsonl": Case("a.jsonl", (
        json.dumps({"id": "a", "timestamp": T, "px": 1.5, "note": "x"}) + "\r\n\r\n"
        + "{not json}\n"
        + json.dumps({"id": "b", "timestamp": T, "px": 2, "note": "y", "big": 123456789012345678901234567}) + "\n"
        + "[1, 2]\n"
        + json.dumps({"id": "c", "timestamp": T, "px": 3, "note": "2026-02-03T04:05:06"})
    ).encode(), {"a": (1.5, "x"), "b": (2.0, "y"), "c": (3.0, "2026-02-03T04:05:06")},
        {3: "invalid JSON", 5: "not a JSON object"}, fmt="jsonl"),
    "gzip_jsonl": Case("a.jsonl.gz", gzip.compress("\n".join(
        json.dumps({"id": f"j{i}", "timestamp": T, "px": i, "note": "n"}) for i in range(30)).encode()),
        {f"j{i}": (float(i), "n") for i in range(30)}, fmt="jsonl"),
}


def declaration(name: str, case: Case) -> str:
    return (f'[sources.{name}]\ntype = "file"\nformat = "{case.fmt}"\npath = "data/{name}/{case.file}"\n'
            f"{case.declaration}\n[sources.{name}.validation]\nrequired_columns = [\"id\", \"timestamp\", \"px\"]\n"
            f'data_types = {{ timestamp = "datetime", px = "float" }}\n[sources.{name}.mapping]\npx = "value"\n')


@pytest.fixture(scope="module")
def ingested(api_url, session_work):
    """Every case as a source of its own, all ingested by one job; what landed, read back."""
    home = session_work
    for name, case in CASES.items():
        folder = home / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / case.file).write_bytes(case.content)
    (home / "sources.toml").write_text("".join(declaration(n, c) for n, c in CASES.items()))
    worker = WorkerProcess(env={"INGOT_READ_CHUNK_BYTES": "64"}).wait_ready()
    try:
        with Client(api_url, make_key(["admin"])) as client:
            job = client.wait(client.start_ingestion(list(CASES))["job_id"], timeout=120)
    finally:
        worker.discard()
    with get_engine().connect() as conn:
        rows = conn.execute(text("SELECT source, id, value, metadata->>'note' FROM observations")).all()
        rejects = conn.execute(text("SELECT source, file, line, reason, raw FROM quarantine")).all()
    (home / "sources.toml").write_text("")
    return job, rows, rejects


def test_the_job_succeeds_with_every_dialect(ingested):
    job, _rows, _rejects = ingested
    assert job["state"] == "succeeded", job["error"]
    per_source = job["result"]["sources"]
    assert all(stats["error"] is None for stats in per_source.values()), per_source


@pytest.mark.parametrize("name", list(CASES))
def test_each_row_lands_exactly_and_each_reject_at_its_line(ingested, name):
    job, rows, rejects = ingested
    case = CASES[name]
    stored = {r.id: (r.value, r[3]) for r in rows if r.source == name}
    assert stored == case.rows
    held = {r.line: r.reason for r in rejects if r.source == name}
    assert sorted(held) == sorted(case.rejects), held
    for line, phrase in case.rejects.items():
        assert phrase in held[line]
    assert all(r.file == f"data/{name}/{case.file}" for r in rejects if r.source == name)
    stats = job["result"]["sources"][name]
    assert (stats["records"], stats["failed"]) == (len(case.rows), len(case.rejects))
    assert stats.get("notes", []) == case.notes


def test_a_long_line_is_held_as_an_excerpt_not_whole(ingested):
    _job, _rows, rejects = ingested
    (held,) = [r for r in rejects if r.source == "long_line"]
    assert held.raw["bytes"] == len(f"a,{T},1,") + 500
    assert held.raw["excerpt"] == f"a,{T},1,{'x' * 500}"[:200]
