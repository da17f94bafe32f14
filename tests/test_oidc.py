"""Bearer tokens from an OpenID Connect issuer: a local issuer started here (its own RSA and EC key
pairs, a discovery document and a JWKS on loopback) signs tokens; the API takes the good ones with
the scopes their claim grants, and refuses expired, wrong-audience, wrong-issuer, unknown-key,
unsigned and HMAC-forged ones. A key id it has not seen makes it fetch the JWKS again (rotation)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from testkit.datagen import sources_toml, write_csv
from tests.helpers import watch_until_closed

AUDIENCE = "ingot-api"


class Issuer:
    """An OpenID Connect issuer on loopback: discovery, a JWKS it can rotate, and tokens it signs."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, object]] = {}  # kid -> (alg, private key)
        self.published: list[str] = []  # the kids the JWKS shows
        self.jwks_fetches = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.endswith("/.well-known/openid-configuration"):
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
                elif self.path.endswith("/jwks"):
                    issuer.jwks_fetches += 1
                    body = {"keys": [issuer.public_jwk(kid) for kid in issuer.published]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/realms/ingot"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def add_key(self, kid: str, alg: str, publish: bool = True) -> None:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg == "RS256" \
            else ec.generate_private_key(ec.SECP256R1())
        self.keys[kid] = (alg, private)
        if publish:
            self.published.append(kid)

    def public_jwk(self, kid: str) -> dict:
        alg, private = self.keys[kid]
        algorithm = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
        return {**json.loads(algorithm.to_jwk(private.public_key())), "kid": kid, "alg": alg, "use": "sig"}

    def token(self, kid: str = "rsa-1", **overrides) -> str:
        alg, private = self.keys[kid]
        now = int(time.time())
        claims = {"iss": self.url, "aud": AUDIENCE, "sub": "user-42", "preferred_username": "ada",
                  "iat": now, "exp": now + 300, "realm_access": {"roles": ["read", "write", "offline_access"]}}
        claims.update(overrides)
        return jwt.encode({k: v for k, v in claims.items() if v is not None}, private, algorithm=alg,
                          headers={"kid": kid})

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def issuer(configure):
    found = Issuer()
    found.add_key("rsa-1", "RS256")
    found.add_key("ec-1", "ES256")
    # Keycloak's realm roles as scopes; no cooldown between refetches, so a rotation shows at once.
    configure(oidc_issuer=found.url, oidc_audience=AUDIENCE, oidc_scopes_claim="realm_access.roles",
              oidc_jwks_cooldown_seconds=0)
    yield found
    found.close()


def call(api_url: str, token: str, path: str = "/api/v1/auth/me") -> httpx.Response:
    return httpx.get(f"{api_url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_the_issuers_tokens_are_taken_with_their_scopes(api_url, issuer):
    for kid in ("rsa-1", "ec-1"):
        me = call(api_url, issuer.token(kid))
        assert me.status_code == 200, me.text
        assert me.json()["data"] == {"id": "oidc:user-42", "kind": "user", "name": "ada", "scopes": ["read", "write"]}
    assert call(api_url, issuer.token(), "/api/v1/jobs").status_code == 200
    reader = issuer.token(realm_access={"roles": ["read"]})
    assert httpx.post(f"{api_url}/api/v1/ingestion/start", json={}, timeout=30,
                      headers={"Authorization": f"Bearer {reader}"}).status_code == 403  # read only


@pytest.mark.parametrize("bad", ["expired", "audience", "issuer", "unknown kid", "none", "hmac with the public key",
                                 "tampered"])
def test_bad_tokens_are_refused(api_url, issuer, bad):
    if bad == "expired":
        token = issuer.token(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    elif bad == "audience":
        token = issuer.token(aud="someone-else")
    elif bad == "issuer":
        token = issuer.token(iss="http://127.0.0.1:9/realms/evil")
    elif bad == "unknown kid":
        issuer.add_key("rsa-unpublished", "RS256", publish=False)
        token = issuer.token("rsa-unpublished")
    elif bad == "none":
        token = jwt.encode({"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60}, None,
                           algorithm="none", headers={"kid": "rsa-1"})
    elif bad == "hmac with the public key":  # the classic: the issuer's public key used as an HMAC secret
        public_pem = issuer.keys["rsa-1"][1].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        token = _hmac_token(issuer, public_pem)
    else:
        head, body, signature = issuer.token().split(".")
        token = f"{head}.{body}.{signature[:-6]}AAAAAA"
    answer = call(api_url, token)
    assert answer.status_code == 401, (bad, answer.text)
    assert answer.json()["error"]["code"] == "AUTHENTICATION_ERROR"


def _hmac_token(issuer: Issuer, secret: bytes) -> str:
    """HS256 over the issuer's public key, built by hand (PyJWT refuses to use a PEM as an HMAC key)."""
    import base64
    import hashlib
    import hmac

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = part(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = part(json.dumps({"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60}).encode())
    signature = part(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{signature}"


def test_a_rotated_key_is_fetched_when_a_token_names_it_and_a_retired_one_stops(api_url, issuer):
    assert call(api_url, issuer.token("rsa-1")).status_code == 200
    fetched = issuer.jwks_fetches
    issuer.add_key("rsa-2", "RS256")  # the issuer rotates: a new key, published
    issuer.published.remove("rsa-1")  # and the old one retired
    assert call(api_url, issuer.token("rsa-2")).status_code == 200  # an unknown kid: the JWKS fetched again
    assert issuer.jwks_fetches == fetched + 1
    assert call(api_url, issuer.token("rsa-1")).status_code == 401  # gone from the set it now holds


def test_a_stream_opened_with_the_issuers_token_ends_when_that_token_expires(api_url, issuer, no_worker, write_sources,
                                                                            data_dir):
    """A person from the identity provider logs out there, not here; but their job's event stream lasts
    no longer than the token it was opened with."""
    write_csv(data_dir / "a.csv", 10)
    write_sources(sources_toml("prices", "a.csv"))
    short = {"Authorization": f"Bearer {issuer.token(exp=int(time.time()) + 4)}"}
    with httpx.Client(base_url=api_url, timeout=30) as http:
        started = http.post("/api/v1/ingestion/start", headers=short, json={"sources": ["prices"]})
        assert started.status_code == 202, started.text
        job_id = started.json()["data"]["job_id"]
        states, took = watch_until_closed(http, job_id, short)
    assert states == ["queued"] and took < 12  # ended with the token (4 s), not with the job (still queued)
