"""One Settings class, read once, from INGOT_* environment variables (and `.env`)."""

from __future__ import annotations

import os
import secrets
import tempfile
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INGOT_", env_file=".env", extra="ignore")

    home: Path = Path(".ingot")
    database_url: str | None = None
    redis_url: str | None = None
    # The Celery broker when it is not Redis: `amqp://user:password@host:5672/vhost` for RabbitMQ (quorum
    # queues, publisher confirms). None: the Redis above carries the work too. Redis stays for rate
    # limits, caches and login counts either way.
    broker_url: str | None = None
    sources_file: Path = Path("sources.toml")
    data_roots: str = ""

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    flower_port: int = 5555
    worker_concurrency: int = Field(default_factory=lambda: os.cpu_count() or 2)

    jwt_secret: SecretStr | None = None
    jwt_expiry_seconds: int = 3600
    login_rate_limit_per_minute: int = 10
    auth_disabled: bool = False
    # Bearer tokens from an OpenID Connect issuer (pipelines.auth.oidc); none by default.
    oidc_issuer: str = ""
    oidc_audience: str = ""
    oidc_scopes_claim: str = "scope"  # a dotted path: `realm_access.roles` for Keycloak's realm roles
    oidc_jwks_cooldown_seconds: float = Field(default=10.0, ge=0)  # at most one refetch for unknown key ids
    rate_limit_per_minute: int = 1000  # the `basic` tier's rate: every key's unless it has another
    rate_limit_burst: int | None = Field(default=None, ge=1)  # the basic tier's burst; none: a minute's worth
    # The other tiers a key may have, `name=rate/burst` each (`unlimited` is always there).
    rate_limit_tiers: str = "premium=10000/2000"
    unauthenticated_rate_limit_per_minute: int = Field(default=100, ge=1)  # per address, without a valid key
    max_body_bytes: int = 1024 * 1024
    # Database connections per process (and as many more on demand). The API lets in at most
    # api_concurrency requests at once (capped at the pool size); the rest wait up to api_queue_seconds
    # for a turn, then get 503 (api.admission).
    db_pool_size: int = Field(default=10, ge=1)
    # Ask the server to probe idle client connections (pipelines.core.db.DEAD_PEER); off behind a
    # pooler that refuses startup options, such as pgbouncer without ignore_startup_parameters.
    db_server_keepalives: bool = True
    api_concurrency: int = Field(default=4, ge=1)
    api_queue_seconds: float = 5.0
    # Of those, the heavy reads (data query, curves, scenario outputs) at once (api.admission.HEAVY);
    # none: half the cores, at least one.
    api_heavy_concurrency: int | None = Field(default=None, ge=1)
    # Every statement a request runs is cut off after this long: the caller gets QUERY_TOO_EXPENSIVE
    # (422) and the connection goes back to the pool, instead of one reader holding a slot.
    api_statement_timeout_ms: int = Field(default=5000, ge=100)
    # Every request is answered within this long, whatever the database does (503 past it).
    api_request_timeout_seconds: float = Field(default=10.0, gt=0)
    cors_origins: str = ""  # comma-separated origins a browser may call the API from; none by default
    # Comma-separated addresses or networks (10.0.0.0/8) of the proxies in front of the API: only a
    # connection from one of them may say, in X-Forwarded-For, whom it forwards. None by default.
    trusted_proxies: str = ""
    metrics_key_labels: bool = False  # label HTTP request metrics by API key id (one series per key)
    retention_days: int = 30  # finished jobs, events, webhook attempts, resolved quarantine; 0 keeps all
    retention_interval_seconds: float = 3600
    # Every enabled source without a `schedule` of its own is ingested this often; 0: only on request.
    ingestion_interval_seconds: int = Field(default=0, ge=0, le=7 * 86400)
    export_retention_days: int = 7
    export_rate_limit_per_minute: int = 10
    source_test_rate_limit_per_minute: int = 10
    max_webhooks_per_key: int = 25
    max_exports_per_key: int = 3
    max_export_bytes_per_key: int = 20 * 1024**3  # export files kept (not yet expired), per key
    max_scenario_runs_per_key: int = 10_000  # queued or running, per key
    max_event_streams_per_key: int = Field(default=100, ge=1)  # job event streams open at once, per API process
    export_min_free_bytes: int = 256 * 1024 * 1024
    export_expiry_interval_seconds: float = 3600
    webhook_allow_private: bool = False
    webhook_retry_schedule: str = "0,5,300,1800,7200,18000,36000,36000"
    webhook_timeout_seconds: float = 15.0
    webhook_relay_interval_seconds: float = 30.0  # the safety net: the outbox listener relays at once
    webhook_batch_size: int = Field(default=50, ge=1)  # deliveries handed to one task
    webhook_concurrency: int = Field(default=4, ge=1)  # requests in flight at once within one worker process
    # A delivery handed to a task that was lost (its host vanished) is handed out again after this; its
    # advisory lock, not the claim, keeps two tasks from sending it at once.
    webhook_claim_seconds: float = 30.0
    webhook_disable_after_seconds: float = 5 * 24 * 3600
    # Neighbours: an endpoint that has never answered gets 2 deliveries in flight at once, one failing
    # 1 (its backlog waits in its own line); after webhook_pause_after_failures failed attempts in a row
    # it is paused, and probed with one attempt after webhook_probe_seconds, then twice as long each
    # time, up to an hour.
    webhook_hand_off_seconds: float = Field(default=0.5, ge=0)  # a batch's slow attempts left to threads after this
    webhook_pause_after_failures: int = Field(default=5, ge=1)
    webhook_probe_seconds: float = Field(default=30.0, gt=0)
    secret_key: SecretStr | None = None
    flower_basic_auth: SecretStr | None = None
    log_level: str = "INFO"
    log_format: str = "json"

    # Jobs: how long a running attempt may go quiet before the reaper takes it back, how often the
    # reaper looks, how many attempts a job gets, and how long a job may run at all.
    batch_size: int = 50_000
    max_line_bytes: int = 1024 * 1024  # a longer line in a file is quarantined with an excerpt
    read_chunk_bytes: int = 1024 * 1024  # how much of a file is read at a time (batches are regrouped to batch_size)
    worker_flat_memory: bool = False  # allocators that hand freed memory back (see pipelines.core.memory)
    worker_task_events: bool = True  # task events from the start (Flower turns them on itself when it runs)
    http_max_response_bytes: int = 64 * 1024 * 1024
    heartbeat_seconds: float = 2.0
    heartbeat_stale_seconds: float = 20.0
    reaper_interval_seconds: float = 30.0
    queued_grace_seconds: float = 10.0
    max_job_attempts: int = 5
    job_timeout_seconds: int = 6 * 3600

    @field_validator("home", "sources_file")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def trusted_proxy_list(self) -> list[str]:
        return [p.strip() for p in self.trusted_proxies.split(",") if p.strip()]

    @property
    def data_root_paths(self) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in self.data_roots.split(":") if p.strip()]

    def jwt_key(self) -> str:
        """INGOT_JWT_SECRET, or one generated under INGOT_HOME on first start."""
        if self.jwt_secret:
            return self.jwt_secret.get_secret_value()
        return self.secret_file("jwt_secret", lambda: secrets.token_urlsafe(48))

    def encryption_key(self) -> str:
        """The key that protects stored secrets: INGOT_SECRET_KEY, or one generated under INGOT_HOME."""
        if self.secret_key:
            return self.secret_key.get_secret_value()
        return self.secret_file("secret_key", lambda: secrets.token_urlsafe(32))

    @property
    def visibility_timeout(self) -> int:
        # Longer than the longest job: the reaper, not the broker, recovers work from dead workers.
        return self.job_timeout_seconds + 3600

    def ensure_home(self) -> Path:
        """INGOT_HOME, made private to its user (0700) when this process creates it."""
        if not self.home.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            self.home.chmod(0o700)
        return self.home

    def secret_file(self, name: str, generate) -> str:
        """Read a secret kept under INGOT_HOME, generating it (mode 0600) on first use. The new value
        is written whole to a private temporary file, then linked into place: a process racing this
        one reads either nothing or the whole secret, and both end with the same one."""
        path = self.home / name
        if path.exists():
            return path.read_text().strip()
        self.ensure_home()
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=self.home)  # mode 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(generate())
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process got there first: its secret is the one
        finally:
            os.unlink(temporary)
        return path.read_text().strip()

    def flower_credentials(self) -> str:
        if self.flower_basic_auth:
            return self.flower_basic_auth.get_secret_value()
        return self.secret_file("flower_basic_auth", lambda: f"ingot:{secrets.token_urlsafe(18)}")


@lru_cache
def get_settings() -> Settings:
    # The tests set INGOT_IGNORE_ENV_FILE so a developer's own .env never leaks into them.
    if os.environ.get("INGOT_IGNORE_ENV_FILE"):
        return Settings(_env_file=None)  # type: ignore[call-arg]  # pydantic-settings' init-only option
    return Settings()
