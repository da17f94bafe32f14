"""Reading and validation: typed rows out, every bad row set aside with its line and reason."""

import codecs
import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core.settings import get_settings
from pipelines.ingestion.sources.files import read_file
from pipelines.ingestion.sources.registry import SourceConfig, SourceError
from pipelines.ingestion.validate import validate


def source(**overrides) -> SourceConfig:
    body = {
        "id": "s",
        "type": "file",
        "path": "x",
        "validation": {
            "required_columns": ["id", "timestamp", "px"],
            "data_types": {"timestamp": "datetime", "px": "float", "qty": "int"},
        },
        "mapping": {"px": "value"},
    }
    body.update(overrides)
    return SourceConfig(**body)


def run(cfg, path, batch_rows=1000):
    batches = [validate(cfg, raw) for raw in read_file(cfg, path, batch_rows)]
    rows, rejects = [], []
    for batch in batches:
        for i in range(batch.num_rows):
            rows.append({
                "line": int(batch.lines[i]),
                "id": batch.ids[i].as_py(),
                **{k: v[i].as_py() for k, v in batch.fields.items()},
                "metadata": {k: v[i].as_py() for k, v in batch.metadata.items()},
            })
        rejects += [(r.line, r.reason, r.raw) for r in batch.rejects]
    return rows, sorted(rejects, key=lambda r: r[0])


def test_csv_bad_rows_are_quarantined_with_line_and_reason(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(
        b"id,timestamp,px,qty,note\n"
        b"a,2026-01-01T00:00:00Z,1.5,10,ok\n"           # 2
        b"b,2026-01-01T01:00:00,abc,11,bad float\n"     # 3
        b"c,2026-01-01T02:00:00,2.5,12\n"               # 4 too few columns
        b"\n"                                            # 5 empty line: no data, skipped
        b"d,,3.5,13,no timestamp\n"                      # 6
        b"e,yesterday,4.5,14,bad time\n"                 # 7
        b"f,2026-01-01T03:00:00+02:00,5.5,1.2,bad int\n" # 8
        b"g,2026-01-01T04:00:00,6.5,15,caf\xe9\n"        # 9 latin-1 byte in UTF-8
        b'h,2026-01-01T05:00:00,7.5,16,"quoted, with comma"\n'  # 10
        b"i,2026-01-01T06:00:00,8.5,17,x,extra\n"        # 11 too many columns
    )
    rows, rejects = run(source(), path)
    assert [r["id"] for r in rows] == ["a", "h"]
    assert rows[0]["line"] == 2 and rows[1]["line"] == 10
    assert rows[0]["value"] == 1.5 and rows[0]["metadata"] == {"qty": 10, "note": "ok"}
    assert rows[1]["metadata"]["note"] == "quoted, with comma"
    reasons = {line: reason for line, reason, _ in rejects}
    assert sorted(reasons) == [3, 4, 6, 7, 8, 9, 11]
    assert reasons[3] == "column 'px': cannot parse 'abc' as float"
    assert reasons[4].startswith("wrong number of columns") and reasons[11].startswith("wrong number of columns")
    assert reasons[6] == "missing required value for 'timestamp'"
    assert reasons[7] == "column 'timestamp': cannot parse 'yesterday' as datetime"
    assert reasons[8] == "column 'qty': cannot parse '1.2' as int"
    assert "bad encoding in column 'note'" in reasons[9]
    raw3 = next(raw for line, _, raw in rejects if line == 3)
    assert raw3 == {"id": "b", "timestamp": "2026-01-01T01:00:00", "px": "abc", "qty": "11", "note": "bad float"}


def test_times_as_numbers_need_their_unit_and_read_alike_from_every_format(tmp_path):
    """Epoch times, as exchange APIs and Parquet files from other tools hold them. Arrow alone would take
    any number for microseconds (1735689600 seconds became 1970-01-01T00:28:55): without a declared
    unit each such row is quarantined saying what to declare; with one, text and numbers of every
    format read the same."""
    at = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    (tmp_path / "a.jsonl").write_text('{"id": "a", "ts": 1735689600, "px": 1}\n'
                                      '{"id": "b", "ts": 1735689660, "px": 2}\n')
    (tmp_path / "a.csv").write_text("id,ts,px\na,1735689600,1\nb,1735689660.0,2\n")
    pq.write_table(pa.table({"id": ["a", "b"], "ts": pa.array([1735689600000, 1735689660000], pa.int64()),
                             "px": [1.0, 2.0]}), tmp_path / "a.parquet")
    (tmp_path / "ns.jsonl").write_text('{"id": "a", "ts": 1735689600000000123, "px": 1}\n')

    def declared(fmt, unit):
        rules = {"required_columns": ["id", "ts"], "data_types": {"ts": "datetime", "px": "float"}}
        return source(format=fmt, mapping={"ts": "timestamp", "px": "value"},
                      validation={**rules, "formats": {"ts": unit} if unit else {}})

    for name, fmt, unit in (("a.jsonl", "jsonl", "epoch_s"), ("a.csv", "csv", "epoch_s"),
                            ("a.parquet", "parquet", "epoch_ms")):
        rows, rejects = run(declared(fmt, unit), tmp_path / name)
        assert rejects == [] and [r["timestamp"] for r in rows] == [at, at + dt.timedelta(minutes=1)], name
        rows, rejects = run(declared(fmt, None), tmp_path / name)
        assert rows == [] and len(rejects) == 2, name
        assert "(a number: declare its unit in formats, ts = one of epoch_s, epoch_ms" in rejects[0][1], name
    [row], _ = run(declared("jsonl", "epoch_ns"), tmp_path / "ns.jsonl")
    assert row["timestamp"] == at  # to the microsecond PostgreSQL keeps


def test_local_times_in_a_declared_zone_across_both_clock_changes(tmp_path):
    """Power and gas trade in local time. With `timezone`, times written without a zone are that zone's
    wall-clock times, through both of its clock changes: the hour skipped in spring and the hour gone
    through twice in autumn are quarantined saying which, and a time with its offset is exact."""
    utc = dt.UTC
    expected = [("a", dt.datetime(2026, 3, 29, 0, 30, tzinfo=utc)), ("c", dt.datetime(2026, 3, 29, 1, 30, tzinfo=utc)),
                ("e", dt.datetime(2026, 10, 25, 1, 30, tzinfo=utc)), ("f", dt.datetime(2026, 7, 1, 12, tzinfo=utc))]
    skipped = "column 'timestamp': 2026-03-29 02:30:00 does not exist in Europe/Berlin: the clocks went forward over it"
    twice = ("column 'timestamp': 2026-10-25 02:30:00 happens twice in Europe/Berlin (the clocks went back): "
             "write it with its offset")
    (tmp_path / "iso.csv").write_text("id,timestamp,px\n"
                                      "a,2026-03-29 01:30,1\nb,2026-03-29 02:30,1\nc,2026-03-29 03:30,1\n"
                                      "d,2026-10-25 02:30,1\ne,2026-10-25 02:30+01:00,1\nf,2026-07-01T12:00:00Z,1\n")
    rows, rejects = run(source(timezone="Europe/Berlin"), tmp_path / "iso.csv")
    assert [(r["id"], r["timestamp"]) for r in rows] == expected
    assert [(line, reason) for line, reason, _ in rejects] == [(3, skipped), (5, twice)]

    (tmp_path / "eu.csv").write_text("id,timestamp,px\na,29.03.2026 01:30,1\nb,29.03.2026 02:30,1\n")
    rules = {"data_types": {"timestamp": "datetime", "px": "float"}, "formats": {"timestamp": "%d.%m.%Y %H:%M"}}
    rows, rejects = run(source(timezone="Europe/Berlin", validation=rules), tmp_path / "eu.csv")
    assert [(r["id"], r["timestamp"]) for r in rows] == expected[:1] and [r[0] for r in rejects] == [3]

    local = pa.array([dt.datetime(2026, 3, 29, 1, 30), dt.datetime(2026, 3, 29, 3, 30)], pa.timestamp("ms"))
    pq.write_table(pa.table({"id": ["a", "c"], "px": [1.0, 2.0], "timestamp": local}), tmp_path / "a.parquet")
    rows, _ = run(source(format="parquet", timezone="Europe/Berlin"), tmp_path / "a.parquet")
    assert [(r["id"], r["timestamp"]) for r in rows] == expected[:2]

    with pytest.raises(ValueError, match="unknown time zone 'Europe/Berlln'"):
        source(timezone="Europe/Berlln")


@pytest.mark.parametrize("chunk", [16, 1 << 20])
def test_lines_before_the_header_are_skipped_and_rows_keep_their_own_line_numbers(tmp_path, monkeypatch,
                                                                                  fresh_settings, chunk):
    """An exchange's report: a title and notes above the header (`skip_lines`), however the file is read."""
    monkeypatch.setenv("INGOT_READ_CHUNK_BYTES", str(chunk))
    path = tmp_path / "a.csv"
    path.write_text("Daily settlement report\nGenerated 2026-01-02, prices in EUR/MWh\n\n"
                    "id,timestamp,px\na,2026-01-01T00:00:00Z,1.5\nb,2026-01-01T00:00:00Z,oops\n")
    rows, rejects = run(source(skip_lines=3), path)
    assert [(r["id"], r["value"], r["line"]) for r in rows] == [("a", 1.5, 5)]
    assert [(line, reason) for line, reason, _ in rejects] == [(6, "column 'px': cannot parse 'oops' as float")]
    with pytest.raises(SourceError, match="missing required column"):
        run(source(), path)  # without it, the title is the header


def test_numbers_written_with_a_decimal_comma_and_grouped_thousands(tmp_path):
    """A spreadsheet's CSV from much of Europe: semicolons, decimal commas, dots between thousands,
    day-first dates. Declared so, its numbers read as meant; a number that still does not parse is
    quarantined with the text as the file had it."""
    path = tmp_path / "a.csv"
    path.write_text("id;timestamp;px;qty\n"
                    "a;01.02.2026 06:00;1.234,5;1.000\n"
                    "b;01.02.2026 07:00;-0,25;7\n"
                    "c;01.02.2026 08:00;1,2,3;8\n", encoding="latin-1")
    cfg = source(delimiter=";", decimal=",", thousands=".", encoding="latin-1",
                 validation={"required_columns": ["id", "px"], "formats": {"timestamp": "%d.%m.%Y %H:%M"},
                             "data_types": {"timestamp": "datetime", "px": "float", "qty": "int"}})
    rows, rejects = run(cfg, path)
    assert [(r["id"], r["timestamp"], r["value"], r["metadata"]) for r in rows] == [
        ("a", dt.datetime(2026, 2, 1, 6, tzinfo=dt.UTC), 1234.5, {"qty": 1000}),
        ("b", dt.datetime(2026, 2, 1, 7, tzinfo=dt.UTC), -0.25, {"qty": 7})]
    assert [(line, reason) for line, reason, _ in rejects] == [(4, "column 'px': cannot parse '1,2,3' as float")]
    with pytest.raises(ValueError, match="'thousands' and 'decimal' are both ','"):
        source(decimal=",", thousands=",")


def test_an_integer_past_64_bits_is_quarantined_not_a_failed_file(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("id,timestamp,px,qty\n"
                    "a,2026-01-01T00:00:00Z,1,99999999999999999999\n"
                    "b,2026-01-01T00:00:00Z,2,-9223372036854775808\n")
    rows, rejects = run(source(), path)
    assert [(r["id"], r["metadata"]["qty"]) for r in rows] == [("b", -(2**63))]
    assert [(line, reason) for line, reason, _ in rejects] == [
        (2, "column 'qty': cannot parse '99999999999999999999' as int")]


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be"])
def test_a_utf16_file_is_read_as_excel_writes_it(tmp_path, monkeypatch, fresh_settings, codec):
    """Excel's "Unicode Text" (UTF-16 with a byte order mark, tabs), read in blocks that split its
    characters anywhere, gzipped too; its header was read as noise with NUL bytes."""
    import gzip

    monkeypatch.setenv("INGOT_READ_CHUNK_BYTES", "7")
    text = "id\ttimestamp\tpx\tplace\r\na\t2026-01-01T00:00:00Z\t1.5\tZürich\r\nb\t2026-01-01T00:00:00Z\tx\t€\r\n"
    data = (codecs.BOM_UTF16_BE + text.encode(codec)) if codec == "utf-16-be" else text.encode(codec)
    (tmp_path / "a.txt").write_bytes(data)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(data))
    for name in ("a.txt", "a.txt.gz"):
        rows, rejects = run(source(delimiter="\t"), tmp_path / name)
        assert [(r["id"], r["value"], r["metadata"]) for r in rows] == [("a", 1.5, {"place": "Zürich"})], name
        assert [(line, reason) for line, reason, _ in rejects] == [(3, "column 'px': cannot parse 'x' as float")]


def test_a_byte_order_mark_outranks_a_declared_single_byte_encoding(tmp_path):
    """A source declared cp1252 that is sent a UTF-16 file (its byte order mark says so) or a UTF-16 JSON
    document: read as UTF-16, its non-ASCII characters intact, not recoded a second time as cp1252."""
    (tmp_path / "a.txt").write_bytes("id,timestamp,px,place\na,2026-01-01T00:00:00Z,1.5,Zürich €\n".encode("utf-16"))
    (tmp_path / "a.json").write_bytes(json.dumps([{"id": "a", "timestamp": "2026-01-01T00:00:00Z", "px": 1.5,
                                                   "place": "Zürich €"}], ensure_ascii=False).encode("utf-16"))
    for name, fmt in (("a.txt", "csv"), ("a.json", "json")):
        rows, rejects = run(source(format=fmt, encoding="cp1252"), tmp_path / name)
        assert [(r["id"], r["value"], r["metadata"]) for r in rows] == [("a", 1.5, {"place": "Zürich €"})], name
        assert rejects == [], name


def test_a_missing_column_whose_name_differs_only_in_case_or_spacing_is_pointed_at(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("ID,Time Stamp,px\na,2026-01-01T00:00:00Z,1\n")
    with pytest.raises(SourceError) as raised:
        run(source(validation={"required_columns": ["id", "time_stamp", "px"]}, mapping={}), path)
    assert str(raised.value) == (
        "source 's': missing required column(s) ['id', 'time_stamp']; found ['ID', 'Time Stamp', 'px']; "
        "did you mean 'ID' for 'id', 'Time Stamp' for 'time_stamp'? (names must match exactly)")


def test_a_batchs_bad_rows_come_in_the_files_order(tmp_path):
    """Rows the reader could not split and rows that failed a rule are found apart; quarantine gets them
    (and lists them) in line order all the same."""
    path = tmp_path / "a.csv"
    path.write_bytes(b"id,timestamp,px\n"
                     b"a,2026-01-01T00:00:00Z,x\n"    # 2: a rule
                     b"b,2026-01-01T00:00:00Z\n"      # 3: the reader
                     b"c,,1\n"                        # 4: a rule
                     b"d,2026-01-01T00:00:00Z,1,2\n") # 5: the reader
    cfg = source()
    [batch] = [validate(cfg, raw) for raw in read_file(cfg, path, 100)]
    assert [reject.line for reject in batch.rejects] == [2, 3, 4, 5]


def test_infinities_are_quarantined_and_nan_is_a_missing_value(tmp_path):
    """JSON has no Infinity or NaN: an infinite price, or one past the largest double, is set aside with
    its reason; NaN (pandas' and Arrow's missing float) is a missing value, refused where required."""
    path = tmp_path / "a.csv"
    path.write_bytes(b"id,timestamp,px,size\n"
                     b"a,2026-01-01T00:00:00Z,inf,1\n"        # 2
                     b"b,2026-01-01T00:00:00Z,-Infinity,2\n"  # 3
                     b"c,2026-01-01T00:00:00Z,1e400,3\n"      # 4
                     b"d,2026-01-01T00:00:00Z,NaN,4\n"        # 5: px is required
                     b"e,2026-01-01T00:00:00Z,2.5,nan\n"      # 6: size is not
                     b"f,2026-01-01T00:00:00Z,1e300,inf\n")   # 7
    cfg = source(validation={"required_columns": ["id", "px"],
                             "data_types": {"timestamp": "datetime", "px": "float", "size": "float"}})
    rows, rejects = run(cfg, path)
    assert [(r["id"], r["value"], r["metadata"]) for r in rows] == [("e", 2.5, {"size": None})]
    assert rejects == [
        (2, "column 'px': 'inf' is not a finite number", {"id": "a", "timestamp": "2026-01-01T00:00:00Z",
                                                          "px": "inf", "size": "1"}),
        (3, "column 'px': '-Infinity' is not a finite number", rejects[1][2]),
        (4, "column 'px': '1e400' is not a finite number", rejects[2][2]),
        (5, "missing required value for 'px' (NaN)", rejects[3][2]),
        (7, "column 'size': 'inf' is not a finite number", rejects[4][2]),
    ]

    # The same from Parquet's own doubles, which no text parse sees.
    table = pa.table({"id": ["a", "b", "c"], "timestamp": pa.array([dt.datetime(2026, 1, 1)] * 3),
                      "px": [float("inf"), float("nan"), 4.0], "size": [1.0, 2.0, float("nan")]})
    pq.write_table(table, tmp_path / "a.parquet")
    rows, rejects = run(source(format="parquet", validation=cfg.validation.model_dump()), tmp_path / "a.parquet")
    assert [(r["id"], r["value"], r["metadata"]) for r in rows] == [("c", 4.0, {"size": None})]
    assert [(line, reason) for line, reason, _ in rejects] == [
        (1, "column 'px': inf is not a finite number"), (2, "missing required value for 'px' (NaN)")]


def test_timezones_are_normalised_to_utc_and_formats_honoured(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,timestamp,px\na,2026-03-01 10:30,1\nb,2026-03-01 23:59,2\n")
    cfg = source(validation={"required_columns": ["id"], "data_types": {"timestamp": "datetime"},
                             "formats": {"timestamp": "%Y-%m-%d %H:%M"}})
    rows, rejects = run(cfg, path)
    assert not rejects
    assert [r["timestamp"].isoformat() for r in rows] == ["2026-03-01T10:30:00+00:00", "2026-03-01T23:59:00+00:00"]
    path.write_text("id,timestamp,px\na,2026-03-01T10:30:00+01:00,1\n")
    rows, _ = run(source(), path)
    assert rows[0]["timestamp"].isoformat() == "2026-03-01T09:30:00+00:00"


def test_missing_required_column_fails_the_file_clearly(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("id,px\n1,2\n")
    with pytest.raises(SourceError, match=r"missing required column\(s\) \['timestamp'\]"):
        run(source(), path)


def test_composite_key_builds_the_id_and_keeps_key_columns_in_metadata(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("symbol,date,price\nAAPL,2026-01-02,190.5\nMSFT,2026-01-02,410\n")
    cfg = source(primary_key=["symbol", "date"], mapping={"date": "timestamp", "price": "value"},
                 validation={"required_columns": ["symbol"], "data_types": {"date": "datetime"}})
    rows, rejects = run(cfg, path)
    assert not rejects
    assert rows[0]["id"].startswith("AAPL|2026-01-02") and rows[0]["value"] == 190.5
    assert rows[0]["metadata"] == {"symbol": "AAPL"}


@pytest.fixture
def fresh_settings():
    """Settings read again from the environment (as a new process would), and again afterwards."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_batches_keep_exact_line_numbers_across_chunks(tmp_path, monkeypatch, fresh_settings):
    monkeypatch.setenv("INGOT_READ_CHUNK_BYTES", "64")
    get_settings.cache_clear()
    path = tmp_path / "a.csv"
    lines = ["id,timestamp,px"] + [f"r{i},2026-01-01T00:00:00,{'x' if i % 7 == 0 else i}" for i in range(1, 101)]
    path.write_text("\n".join(lines) + "\n")
    rows, rejects = run(source(), path, batch_rows=9)
    assert len(rows) + len(rejects) == 100
    assert all(r["line"] == int(r["id"][1:]) + 1 for r in rows)
    assert [line for line, _, _ in rejects] == [i + 1 for i in range(7, 101, 7)]


def test_small_reads_are_loaded_in_full_batches(tmp_path, monkeypatch, fresh_settings):
    """A file read a few hundred bytes at a time still comes out in batches of exactly batch_rows rows
    (the last fewer), every line once and in order, every reject once; a JSON Lines block whose types
    differ from the rows held starts a batch of its own."""
    monkeypatch.setenv("INGOT_READ_CHUNK_BYTES", "300")
    get_settings.cache_clear()
    path = tmp_path / "a.csv"
    lines = ["id,timestamp,px"] + [f"r{i},2026-01-01T00:00:00,{'x' if i % 7 == 0 else i}" for i in range(1, 401)]
    path.write_text("\n".join(lines) + "\n")
    raws = list(read_file(source(), path, 50))
    assert [len(r.lines) for r in raws[:-1]] == [50] * (len(raws) - 1) and 0 < len(raws[-1].lines) <= 50
    assert [int(n) for r in raws for n in r.lines] == list(range(2, 402))  # before validation: every line
    rows, rejects = run(source(), path, batch_rows=50)
    assert [r["line"] for r in rows] == [i + 1 for i in range(1, 401) if i % 7]
    assert sorted(line for line, _, _ in rejects) == [i + 1 for i in range(7, 401, 7)]

    jsonl = tmp_path / "a.jsonl"
    records = [{"id": f"j{i}", "timestamp": "2026-01-01T00:00:00Z", "px": i} for i in range(40)]
    records += [{"id": f"k{i}", "timestamp": "2026-01-01T00:00:00Z", "px": f"{i}.5"} for i in range(40)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows, rejects = run(source(format="jsonl", validation={"required_columns": ["id"]}), jsonl, batch_rows=1000)
    assert [r["value"] for r in rows] == [float(i) for i in range(40)] + [i + 0.5 for i in range(40)] and not rejects


def test_a_resumed_read_carries_on_after_the_last_committed_line_however_it_is_batched(tmp_path, monkeypatch,
                                                                                        fresh_settings):
    """A checkpoint names the last line it committed, so an attempt that resumes with other batches
    (batch_size changed meanwhile, another read block, another release) reads exactly the rest; a
    checkpoint from before lines were recorded resumes by its batch, as it was made."""
    from pipelines.ingestion.sources import files
    from pipelines.ingestion.sources.registry import load_registry

    lines = ["id,timestamp,px"] + [f"r{i},2026-01-01T00:00:00,{i}" if i % 50 else "r" * 200
                                   for i in range(1, 301)]  # every 50th line too long: rejected as it is read
    (tmp_path / "a.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "sources.toml").write_text('[sources.s]\ntype = "file"\npath = "a.csv"\nmax_line_bytes = 100\n')
    registry = load_registry(tmp_path / "sources.toml")
    src = registry.get("s")

    def numbers(resume, chunk, batch_rows=40):
        monkeypatch.setenv("INGOT_READ_CHUNK_BYTES", str(chunk))
        get_settings.cache_clear()
        pieces = list(files.stream(src, registry, batch_rows, resume))
        return pieces, [int(n) for p in pieces for n in p.raw.lines], [r.line for p in pieces for r in p.raw.rejects]

    first, _, _ = numbers(None, 300)
    committed = first[2].position  # the worker died after committing three batches
    assert committed["line"] == int(first[2].raw.lines[-1])
    _, rows, rejects = numbers(committed, 64, batch_rows=64)  # batched differently (batch_size changed)
    after = range(committed["line"] + 1, 302)
    assert rows == [n for n in after if (n - 1) % 50] and rejects == [n for n in after if not (n - 1) % 50]
    _, rows, _ = numbers({"file": 0, "batch": 3}, 300)  # an older checkpoint: by batch
    assert rows[0] == int(first[3].raw.lines[0])


def test_parquet_records_are_numbered_and_cast(tmp_path):
    path = tmp_path / "a.parquet"
    table = pa.table({"id": ["a", "b", "c"], "timestamp": pa.array([1, 2, 3], pa.timestamp("s")),
                      "px": ["1.5", "oops", "3"]})
    pq.write_table(table, path)
    rows, rejects = run(source(format="parquet", validation={"required_columns": ["id"]}), path, batch_rows=2)
    assert [(r["id"], r["value"], r["line"]) for r in rows] == [("a", 1.5, 1), ("c", 3.0, 3)]
    assert rejects == [(2, "column 'px': cannot parse 'oops' as float",
                        {"id": "b", "timestamp": "1970-01-01 00:00:02", "px": "oops"})]


def test_a_json_document_file_is_read_for_its_records(tmp_path):
    """A `.json` file as APIs and tools export them: one array of records, or records under a key.
    Each record is numbered from 1; one that is not an object is set aside. A JSON Lines file declared
    `json` is still read line by line, and an array declared `jsonl` as the array it is."""
    import gzip

    records = [{"id": f"r{i}", "timestamp": f"2026-01-01T0{i}:00:00Z", "px": i + 0.5, "venue": {"code": "X"}}
               for i in range(5)]
    array = json.dumps([*records[:2], "oops", *records[2:]]).encode()
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf\n  " + array)  # a BOM and a blank line first
    (tmp_path / "b.json.gz").write_bytes(gzip.compress(array))
    (tmp_path / "c.json").write_bytes(json.dumps({"meta": {"n": 5}, "data": {"rows": records}}).encode())
    (tmp_path / "d.json").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records))
    (tmp_path / "e.json").write_text(json.dumps(records, indent=2))  # pretty-printed, over many lines
    expected = [(f"r{i}", i + 0.5, {"venue": '{"code":"X"}'}) for i in range(5)]

    for name, fmt, extra in (("a.json", "json", {}), ("b.json.gz", "json", {}), ("a.json", "jsonl", {}),
                             ("c.json", "json", {"records_path": "data.rows"}), ("d.json", "json", {}),
                             ("e.json", "json", {})):
        rows, rejects = run(source(format=fmt, **extra), tmp_path / name, batch_rows=2)
        assert [(r["id"], r["value"], r["metadata"]) for r in rows] == expected, name
        if name in ("a.json", "b.json.gz"):
            assert [r["line"] for r in rows] == [1, 2, 4, 5, 6]
            assert rejects == [(3, "record is not a JSON object", {"record": '"oops"'})]
        else:
            assert rejects == [], name

    with pytest.raises(SourceError, match=r"a.json is one JSON document of more than .* write it as JSON Lines"):
        run(source(format="json", max_response_bytes=100), tmp_path / "a.json")
    (tmp_path / "g.json").write_text(json.dumps(records)[:-1])  # cut short
    with pytest.raises(SourceError, match=r"g.json is not valid JSON: expected ',' or '\]' after a record"):
        run(source(format="json"), tmp_path / "g.json")
    (tmp_path / "f.json").write_text(json.dumps({"data": {"rows": records}}, indent=2))
    with pytest.raises(SourceError, match=r"f.json has no list of records at the top level \(name where"):
        run(source(format="json"), tmp_path / "f.json")
    (tmp_path / "h.json").write_text(json.dumps(records)[:-1] + ", ]")  # a trailing comma: not JSON
    with pytest.raises(SourceError, match=r"h.json is not valid JSON: a ',' with no record after it"):
        run(source(format="json"), tmp_path / "h.json")
    (tmp_path / "i.json").write_bytes(json.dumps(records).encode().replace(b"X", b"\xff"))  # not UTF-8
    with pytest.raises(SourceError, match=r"i.json is not valid JSON: 'utf-8' codec can't decode byte 0xff"):
        run(source(format="json"), tmp_path / "i.json")


def test_parquet_nested_columns_are_kept_as_json_text(tmp_path):
    """Lists, records and maps, as other tools write them, are kept in metadata as JSON text, as a JSON
    Lines file's nested values are; times and bytes inside them as text."""
    path = tmp_path / "nested.parquet"
    table = pa.table({
        "id": ["a", "b"], "px": [1.5, 2.5],
        "tags": pa.array([["x", "y"], []], pa.large_list(pa.string())),
        "leg": pa.array([{"at": dt.datetime(2026, 1, 1, 6), "raw": b"\xff"}, None],
                        pa.struct([("at", pa.timestamp("ms")), ("raw", pa.binary())])),
        "limits": pa.array([[("lo", 1)], [("hi", 2)]], pa.map_(pa.string(), pa.int64())),
    })
    pq.write_table(table, path)
    rows, rejects = run(source(format="parquet", validation={"required_columns": ["id", "tags"]}), path)
    assert rejects == []
    assert [r["metadata"] for r in rows] == [
        {"tags": '["x","y"]', "leg": '{"at":"2026-01-01T06:00:00","raw":"\\\\xff"}', "limits": '[["lo",1]]'},
        {"tags": "[]", "leg": None, "limits": '[["hi",2]]'},
    ]


@pytest.mark.parametrize(("head", "said"), [(b"PAR1\x15\x04", 'a Parquet file (declare format = "parquet")'),
                                           (b"PK\x03\x04\x14\x00", "a ZIP archive (an Excel .xlsx workbook"),
                                           (b"\xd0\xcf\x11\xe0\xa1\xb1", "an Excel .xls workbook")])
def test_a_file_of_another_format_is_named_as_such(tmp_path, head, said):
    path = tmp_path / "prices.csv"
    path.write_bytes(head + bytes(range(256)) * 8)
    with pytest.raises(SourceError, match=r"prices\.csv is not CSV: it is ") as raised:
        run(source(), path)
    assert said in str(raised.value)


def test_jsonl_bad_lines_are_quarantined(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a", "timestamp": "2026-01-01T00:00:00Z", "px": 1.25, "tags": ["x"]}),
        "{not json",
        "[1, 2]",
        json.dumps({"id": "b", "timestamp": "2026-01-01T00:00:00Z", "px": "2"}),
    ]) + "\n")
    rows, rejects = run(source(format="jsonl", validation={"required_columns": ["id"]}), path)
    assert [(r["id"], r["value"], r["line"]) for r in rows] == [("a", 1.25, 1), ("b", 2.0, 4)]
    assert rows[0]["metadata"] == {"tags": '["x"]'}
    assert [(line, reason.split(":")[0]) for line, reason, _ in rejects] == [
        (2, "invalid JSON"), (3, "record is not a JSON object")]


CHUNK_SIZES = [1, 2, 3, 5, 8, 13, 64, 4096]
QUOTED = (b'id,timestamp,px,note\r\n'
          b'a,2026-01-01T00:00:00Z,1,"x, ""y""\r\nz"\r\n'
          b'b,2026-01-01T00:00:00Z,oops,w\r\n'
          b'\r\n'
          b'c,2026-01-01T00:00:00Z,3,last')  # no line break at the end


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_every_chunk_boundary_keeps_rows_and_lines_exact(tmp_path, monkeypatch, fresh_settings, chunk):
    monkeypatch.setenv("INGOT_READ_CHUNK_BYTES", str(chunk))
    path = tmp_path / "a.csv"
    path.write_bytes(QUOTED)
    rows, rejects = run(source(), path, batch_rows=2)
    assert [(r["id"], r["line"], r["value"], r["metadata"]["note"]) for r in rows] == [
        ("a", 2, 1.0, 'x, "y"\r\nz'), ("c", 6, 3.0, "last")]
    assert [(line, reason) for line, reason, _ in rejects] == [(4, "column 'px': cannot parse 'oops' as float")]

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b'{"id": "a", "timestamp": "2026-01-01T00:00:00Z", "px": 1}\r\n\n'
                      b'{"id": "b", "timestamp": "2026-01-01T00:00:00Z", "px": 2}')
    rows, rejects = run(source(format="jsonl"), jsonl)
    assert [(r["id"], r["line"], r["value"]) for r in rows] == [("a", 1, 1.0), ("b", 3, 2.0)] and not rejects


@pytest.mark.parametrize("chunk", [7, 100, 4096])
def test_a_line_over_the_limit_is_skipped_to_its_end(tmp_path, monkeypatch, fresh_settings, chunk):
    monkeypatch.setenv("INGOT_READ_CHUNK_BYTES", str(chunk))
    path = tmp_path / "a.csv"
    long = "x" * 3000
    path.write_text(f"id,timestamp,px\na,2026-01-01T00:00:00,1\nb,2026-01-01T00:00:00,{long}\n"
                    f"c,2026-01-01T00:00:00,3\nd,2026-01-01T00:00:00,{long}")
    rows, rejects = run(source(max_line_bytes=100), path)
    assert [(r["id"], r["line"]) for r in rows] == [("a", 2), ("c", 4)]
    assert [(line, raw["bytes"], len(raw["excerpt"])) for line, _, raw in rejects] == [(3, 3022, 100), (5, 3022, 100)]


def test_an_encoding_ingot_cannot_split_lines_in_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        source(encoding="utf-16")
    with pytest.raises(ValueError, match="unknown encoding"):
        source(encoding="klingon")


def test_a_spreadsheet_export_loads(tmp_path):
    """Excel's "CSV UTF-8": a byte order mark, a quoted header, CRLF, a delimiter ending every line."""
    path = tmp_path / "a.csv"
    path.write_bytes(b'\xef\xbb\xbf"id";"timestamp";"px";;\r\n'
                     b'a;2026-01-01 10:00;"1,5";;\r\n'
                     b'b;2026-01-01 11:00;2;x;\r\n')
    cfg = source(delimiter=";", validation={"required_columns": ["id", "timestamp"],
                                            "data_types": {"timestamp": "datetime"},
                                            "formats": {"timestamp": "%Y-%m-%d %H:%M"}})
    rows, rejects = run(cfg, path)
    assert [(r["id"], r["line"], r["value"]) for r in rows] == [("b", 3, 2.0)]
    assert rows[0]["metadata"] == {"column_4": "x", "column_5": None}
    assert [(line, reason) for line, reason, _ in rejects] == [(2, "column 'px': cannot parse '1,5' as float")]
