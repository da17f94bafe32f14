"""A client generated from the OpenAPI document by a standard generator (openapi-python-client, which
`make test` installs in a venv of its own) authenticates with either credential the document declares:
an API key in `X-API-Key`, or a bearer token from logging in. The generator reads the security
requirements: the job routes take only an authenticated client."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from tests.helpers import ROOT, make_key

TOOLS = ROOT / ".venv" / "tools" / "bin"
CALLS = """
import json, sys
from ingot_client import AuthenticatedClient, Client
from ingot_client.api.jobs import list_jobs_api_v1_jobs_get as list_jobs
url, key, token = sys.argv[1:4]
by_key = AuthenticatedClient(base_url=url, token=key, prefix="", auth_header_name="X-API-Key")
by_token = AuthenticatedClient(base_url=url, token=token)
answers = {
    "key": list_jobs.sync_detailed(client=by_key).status_code,
    "token": list_jobs.sync_detailed(client=by_token).status_code,
    "nothing": list_jobs.sync_detailed(client=Client(base_url=url)).status_code,
}
parsed = list_jobs.sync(client=by_key)
answers["jobs"] = type(parsed.data.jobs).__name__
print(json.dumps(answers))
"""


def test_a_generated_client_authenticates_with_a_key_or_a_token(api_url, tmp_path):
    generator = TOOLS / "openapi-python-client"
    if not generator.exists():
        pytest.skip("openapi-python-client is not installed: `make test` installs it in .venv/tools")
    from pipelines.auth import users
    from pipelines.core.db import session_scope

    name = f"generated_{time.time_ns()}"
    with session_scope() as session:
        users.create_user(session, name, "a long password", ["read"])
    token = httpx.post(f"{api_url}/api/v1/auth/login", json={"username": name, "password": "a long password"}
                       ).json()["data"]["access_token"]
    (tmp_path / "openapi.json").write_text(httpx.get(f"{api_url}/openapi.json").text)
    subprocess.run([generator, "generate", "--path", "openapi.json", "--meta", "none", "--output-path",
                    "ingot_client"], cwd=tmp_path, check=True, capture_output=True, timeout=120,
                   env={"PATH": f"{TOOLS}:/usr/bin:/bin"})
    source = (tmp_path / "ingot_client" / "api" / "jobs" / "list_jobs_api_v1_jobs_get.py").read_text()
    assert "client: AuthenticatedClient," in source  # from the operation's security requirement
    done = subprocess.run([TOOLS / "python", "-c", CALLS, api_url, make_key(["read"]), token], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"key": 200, "token": 200, "nothing": 401, "jobs": "list"}
