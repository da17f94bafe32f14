"""A script written for seed 000 (the Aurum API) runs unchanged: its paths without `/api`, its filter
spellings (`asset_class=NATURAL_GAS`) and its client method names, over the same routes."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest

from testkit.curves import CURVES_SOURCE
from tests.helpers import make_key

pytestmark = pytest.mark.worker


@pytest.fixture
def worker(shared_worker):
    """This module's tests share one worker (tests/conftest.py)."""
    return shared_worker


@pytest.fixture
def curves(client, worker, write_sources, data_dir):
    """Two curves whose dimensions are stored in lower and mixed case."""
    lines = ["curve_key,asof_date,contract_month,tenor_label,value,currency,unit,asset_class,iso,location"]
    for key, asset, iso, where in (("NG_HH", "natural_gas", "Pjm", "West Hub"),
                                   ("PW_PJM", "Natural_Gas", "pjm", "west hub")):
        for month in range(1, 4):
            lines.append(f"{key},2026-01-05,2026-{month:02d},M{month},{3 + month},USD,MMBtu,{asset},{iso},{where}")
    (data_dir / "curves.csv").write_text("\n".join(lines) + "\n")
    write_sources(CURVES_SOURCE.format(glob="curves.csv"))
    job = client.wait(client.start_ingestion(["curves"])["job_id"], timeout=60)
    assert job["state"] == "succeeded", job
    return ["NG_HH", "PW_PJM"]


def test_seed_paths_answer_as_the_api_does(api_url, curves):
    key = make_key(["read"])
    with httpx.Client(base_url=api_url, headers={"X-API-Key": key}, timeout=30) as http:
        for path, params in (("/curves", {"asset_class": "NATURAL_GAS"}),
                             ("/curves/diff", {"curve_key": "NG_HH", "asof_a": "2026-01-05", "asof_b": "2026-01-05"}),
                             ("/metadata/dimensions", {"include_counts": "true"}), ("/locations/iso", {"iso": "PJM"}),
                             ("/scenarios", {})):
            seed, ours = http.get(f"/v1{path}", params=params), http.get(f"/api/v1{path}", params=params)
            assert seed.status_code == ours.status_code == 200, (path, seed.text)
            assert seed.json()["data"] == ours.json()["data"], path
        found = http.get("/v1/curves", params={"asset_class": "NATURAL_GAS", "iso": "PJM", "location": "WEST HUB"})
        assert sorted({p["curve_key"] for p in found.json()["data"]}) == curves  # whatever the letter case
        assert {p["asset_class"] for p in found.json()["data"]} == {"natural_gas", "Natural_Gas"}  # kept as stored
        dims = http.get("/v1/metadata/dimensions", params={"include_counts": "true"}).json()
        assert len(dims["data"]["asset_class"]) == 1 and dims["counts"]["asset_class"][0]["count"] == 2
        assert len(dims["data"]["iso"]) == 1 and len(dims["data"]["location"]) == 1
        assert httpx.get(f"{api_url}/v1/curves").status_code == 401  # the same gate
        document = http.get("/openapi.json").json()
        seed_ops = [op for path, ops in document["paths"].items() if path.startswith("/v1/") for op in ops.values()]
        assert len(seed_ops) >= 14 and all(op["tags"] == ["seed 000 (Aurum) paths"] for op in seed_ops)


def test_the_client_offers_seed_names(client, curves):
    points, _cursor = client.get_curves(asset_class="NATURAL_GAS")
    assert sorted({p["curve_key"] for p in points}) == curves
    diff = client.compare_curves("NG_HH", "2026-01-05", "2026-01-05")
    assert [row["diff_abs"] for row in diff] == [0.0, 0.0, 0.0]
    assert client.get_dimensions()["curve_key"] == curves
    assert client.get_locations(iso="pjm") and client.list_scenarios() == ([], None)
    assert dt.date.fromisoformat(points[0]["asof_date"]) == dt.date(2026, 1, 5)
