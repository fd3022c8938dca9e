"""Configuration: ``PRICING_`` environment variables, shared by both processes.

Loaded once in each ``__main__`` (:func:`load_settings`) and passed down explicitly.
Invalid configuration fails at start-up with a :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import unquote

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from pricing_service.errors import ConfigError

ENV_PREFIX = "PRICING_"
#: The membership value encoding keeps at most this many seconds between a fact and its expiry
#: (see ``pricing_service.membership.layout``).
MAX_TTL_S = 4_999_999
#: ``PRICING_REDIS_URL`` schemes of a Redis Cluster (seed nodes); ``rediss+cluster://`` is TLS.
CLUSTER_SCHEMES: Final = ("redis+cluster://", "rediss+cluster://")
REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://", *CLUSTER_SCHEMES)


@dataclass(frozen=True, slots=True)
class ClusterSeeds:
    """A parsed cluster URL: ``redis[s]+cluster://[user[:password]@]host:port[,host:port...]``."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    #: ``rediss+cluster://``: TLS to every node, with the ``PRICING_REDIS_TLS_*`` files
    tls: bool = False


def parse_cluster_seeds(url: str) -> ClusterSeeds:
    """The seed nodes and credentials of a cluster URL (``ValueError`` when malformed)."""
    scheme = next((s for s in CLUSTER_SCHEMES if url.startswith(s)), None)
    if scheme is None:
        raise ValueError(f"not a cluster URL ({' or '.join(CLUSTER_SCHEMES)})")
    rest = url[len(scheme) :].rstrip("/")
    username = password = None
    if "@" in rest:
        cred, _, rest = rest.rpartition("@")
        user, sep, pw = cred.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    nodes: list[tuple[str, int]] = []
    for raw in rest.split(","):
        item = raw.strip()
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"cluster seed {item!r} is not HOST:PORT "
                f"(expected {scheme}host:port[,host:port...])"
            )
        nodes.append((host, int(port)))
    return ClusterSeeds(tuple(nodes), username, password, tls=scheme.startswith("rediss"))


class Settings(BaseSettings):
    """Every knob of the service; the environment variable is ``PRICING_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore", frozen=True
    )

    # --- stores -------------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis holding crowd membership (redis://, rediss://, unix://), or a Redis "
        "Cluster: redis+cluster://host:port[,host:port...] (seed nodes), rediss+cluster:// "
        "for TLS to every node",
    )
    redis_namespace: str = Field(
        "",
        description="Prefix of every Redis key this deployment owns (isolation of tenants/tests)",
    )
    redis_socket_timeout_ms: int = Field(2000, ge=10, description="Redis socket read timeout")
    redis_connect_timeout_ms: int = Field(1000, ge=10, description="Redis connect timeout")
    redis_max_connections: int = Field(64, ge=1, description="Redis connection pool size")
    redis_wait_replicas: int = Field(
        1,
        ge=0,
        le=16,
        description="sync-worker: replicas that must acknowledge membership writes (WAIT) before "
        "stream entries are acknowledged, on primaries that have replicas (0 = do not wait)",
    )
    redis_wait_timeout_ms: int = Field(
        1000, ge=1, description="sync-worker: WAIT timeout; a shorter ack is retried"
    )
    redis_tls_ca_file: str | None = Field(
        None, description="CA bundle for rediss:// and rediss+cluster:// (default: system CAs)"
    )
    redis_tls_cert_file: str | None = Field(
        None, description="Client certificate for rediss:// and rediss+cluster:// (mutual TLS)"
    )
    redis_tls_key_file: str | None = Field(
        None, description="Client key for rediss:// and rediss+cluster:// (mutual TLS)"
    )
    rule_store_url: str = Field(
        "sqlite:///./pricing.db", description="Rule store: sqlite:///path or postgresql://..."
    )
    rule_store_pool_size: int = Field(8, ge=1, description="PostgreSQL pool size")
    rule_store_busy_timeout_ms: int = Field(
        5000, ge=0, description="SQLite busy timeout / PostgreSQL lock wait for rule writes"
    )
    max_rules_per_item: int = Field(
        8, ge=1, description="Rules one item may carry (one per crowd at most)"
    )
    max_crowds_per_seller: int = Field(
        100, ge=1, le=100_000, description="Crowds one seller may define"
    )
    max_crowd_batch: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Buyers added to or removed from a list crowd per BatchUpdateCrowdMembers "
        "call (bigger lists: a list file, sync-worker load-list)",
    )
    max_rule_batch: int = Field(
        1000, ge=1, le=100_000, description="Rules per BatchUpsertDiscountRules call"
    )

    # --- server ---------------------------------------------------------------------------
    listen: str = Field("127.0.0.1:50051", description="gRPC listen address host:port")
    server_runtime: Literal["grpcio-aio", "native"] = Field(
        "native",
        description="gRPC server runtime: grpcio-aio (grpcio's asyncio server; TLS) or native "
        "(pygrpc-native: HTTP/2 and call handling in Rust outside the GIL; no TLS)",
    )
    native_io_threads: int = Field(
        1, ge=1, le=64, description="native runtime: Rust I/O threads per server process"
    )
    native_io_policy: Literal["batch", "normal"] = Field(
        "batch",
        description="native runtime: Linux scheduling policy of the Rust I/O threads; batch = "
        "SCHED_BATCH (they do not preempt the event loop when an answer wakes them)",
    )
    native_pump: Literal["loop", "thread"] = Field(
        "loop",
        description="native runtime: how calls reach the event loop; loop = the loop takes them "
        "itself between its own work and a thread wakes it only when idle; thread = a thread "
        "hands every batch over (measured slower under load: docs/BENCHMARKS.md)",
    )
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus port (0 = off)")
    metrics_addr: str = Field(
        "",
        description="Address the Prometheus endpoint binds (an IP such as 0.0.0.0 or ::, or a "
        "host name); empty = 127.0.0.1 when PRICING_LISTEN is a loopback address, else 0.0.0.0",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token(s) for DiscountAdminService, comma-separated to rotate"
    )
    read_token: SecretStr | None = Field(
        None, description="Bearer token(s) required by PricingService (unset = open)"
    )
    tls_cert_file: str | None = Field(
        None, description="PEM server certificate: serve gRPC over TLS"
    )
    tls_key_file: str | None = Field(None, description="PEM private key of the server certificate")
    tls_client_ca_file: str | None = Field(
        None,
        description="PEM CA bundle: when set, clients must present a certificate it signed (mTLS)",
    )
    workers: int = Field(1, ge=1, le=256, description="Server processes sharing the port")
    grace_period_s: float = Field(10.0, ge=0, description="SIGTERM drain time for in-flight RPCs")
    max_batch_items: int = Field(200, ge=1, le=10_000, description="Items per BatchGetLowestPrice")
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Max gRPC message size")
    max_concurrent_rpcs: int = Field(
        1000, ge=1, description="In-flight RPCs per process; RESOURCE_EXHAUSTED beyond"
    )
    rate_limit_rps: float = Field(
        0, ge=0, description="Requests/s per caller (bearer token, else peer host); 0 = unbounded"
    )
    rate_limit_burst: float = Field(
        0, ge=0, description="Burst per caller above the rate (0 = one second's worth)"
    )
    max_id_length: int = Field(128, ge=1, le=1024, description="Max length of any id")

    # --- serving path ---------------------------------------------------------------------
    rule_refresh_interval_ms: int = Field(200, ge=10, description="Rule index change-feed poll")
    rule_index_max_items: int = Field(
        200_000,
        ge=1,
        description="Items (with rules, or known to have none) the rule index holds; beyond it "
        "the least recently used are dropped and read again from the rule store on the next miss",
    )
    rule_fetch_budget_ms: int = Field(
        100,
        ge=1,
        description="Time a page may wait for a rule-index miss to be read from the rule store "
        "before those items are answered at list price (degraded)",
    )
    membership_budget_ms: int = Field(
        50, ge=1, description="Time a page's membership lookup may take before degrading"
    )
    breaker_failure_threshold: int = Field(5, ge=1, description="Failures that open the breaker")
    breaker_reset_ms: int = Field(1000, ge=10, description="Open breaker probe interval")
    strict_budget_ms: int = Field(
        1000,
        ge=1,
        description="Time each CheckDiscountStrict dependency (rule store, Redis) may take before UNAVAILABLE",
    )
    strict_max_lag_ms: int = Field(
        2000, ge=0, description="CheckDiscountStrict refuses when the sync watermark is older"
    )

    # --- membership -----------------------------------------------------------------------
    membership_ttl_s: int = Field(48 * 3600, ge=60, le=MAX_TTL_S, description="Membership TTL")
    tombstone_ttl_s: int = Field(
        48 * 3600, ge=60, le=MAX_TTL_S, description="Unfollow tombstone TTL"
    )
    snapshot_max_age_s: int = Field(
        36 * 3600, ge=60, description="Oldest snapshot (age of its cut) the loader accepts"
    )
    old_fan_min_days: int = Field(30, ge=0, le=3650, description="Days of following for old_fans")

    # --- sync worker ----------------------------------------------------------------------
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="sync-worker consume: Prometheus port (0 = off)"
    )
    worker_metrics_addr: str = Field(
        "127.0.0.1",
        description="sync-worker consume: address the Prometheus endpoint binds (0.0.0.0 or :: "
        "in a container, to be scraped from outside it)",
    )
    events_stream: str = Field("pricing:relation-events", description="Relation event stream")
    event_partitions: int = Field(
        1,
        ge=1,
        le=1024,
        description="Relation event stream partitions: 1 = the stream EVENTS_STREAM; N > 1 = "
        "EVENTS_STREAM:{k}, k = crc32(user_id) % N (never change it while events are in flight)",
    )
    consumer_group: str = Field("pricing-sync", description="Stream consumer group")
    consumer_name: str = Field("", description="Consumer name (default: host-pid)")
    stream_batch_size: int = Field(500, ge=1, le=100_000, description="XREADGROUP COUNT")
    stream_block_ms: int = Field(1000, ge=0, description="XREADGROUP BLOCK")
    stream_claim_idle_ms: int = Field(
        30_000, ge=100, description="Reclaim pending entries idle this long"
    )
    stream_max_deliveries: int = Field(5, ge=1, description="Deliveries before dead-lettering")
    dead_letter_stream: str = Field(
        "pricing:relation-events:dead", description="Where poison entries go"
    )
    snapshot_batch_rows: int = Field(5000, ge=1, description="Rows per snapshot write batch")
    snapshot_max_error_rate: float = Field(
        0.01, ge=0, le=1, description="Malformed-row share that stops a load"
    )

    # --- logs -----------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto = console on a terminal, JSON otherwise"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(REDIS_SCHEMES):
            raise ValueError("must start with " + ", ".join(REDIS_SCHEMES))
        if v.startswith(CLUSTER_SCHEMES):
            parse_cluster_seeds(v)  # the seeds' syntax, at start-up
        return v

    @field_validator("rule_store_url")
    @classmethod
    def _store_scheme(cls, v: str) -> str:
        if not v.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must be sqlite:///PATH or postgresql://...")
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:50051 or [::]:50051")
        return v

    @field_validator("metrics_addr", "worker_metrics_addr")
    @classmethod
    def _bind_host(cls, v: str, info: ValidationInfo) -> str:
        if v == "" and info.field_name == "metrics_addr":
            return v
        if not is_bind_host(v):
            raise ValueError(
                f"{v!r} is not an address to bind: an IP address (0.0.0.0, ::, 10.0.0.5) or a "
                "host name, without a port"
            )
        return v.strip("[]")

    def metrics_host(self) -> str:
        """Where the server's metrics endpoint binds (``PRICING_METRICS_ADDR``, else derived
        from ``PRICING_LISTEN``: loopback stays on loopback)."""
        if self.metrics_addr:
            return self.metrics_addr
        host = self.listen.rpartition(":")[0].strip("[]")
        return "127.0.0.1" if host.startswith("127.") or host in ("localhost", "::1") else "0.0.0.0"

    @model_validator(mode="after")
    def _tls_files(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("PRICING_TLS_CERT_FILE and PRICING_TLS_KEY_FILE go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("PRICING_TLS_CLIENT_CA_FILE needs PRICING_TLS_CERT_FILE (mTLS is TLS)")
        for name in (
            "tls_cert_file",
            "tls_key_file",
            "tls_client_ca_file",
            "redis_tls_ca_file",
            "redis_tls_cert_file",
            "redis_tls_key_file",
        ):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: no such file: {path}")
        return self

    @model_validator(mode="after")
    def _tombstones_outlive_snapshots(self) -> Settings:
        if self.tombstone_ttl_s < self.snapshot_max_age_s:
            raise ValueError(
                f"PRICING_TOMBSTONE_TTL_S ({self.tombstone_ttl_s}s) is shorter than "
                f"PRICING_SNAPSHOT_MAX_AGE_S ({self.snapshot_max_age_s}s): a snapshot cut before "
                "an unfollow could be loaded after the unfollow's tombstone expired and bring "
                "the relation back. Raise the tombstone TTL or lower the snapshot max age."
            )
        return self

    def admin_tokens(self) -> frozenset[str]:
        return _tokens(self.admin_token)

    def read_tokens(self) -> frozenset[str]:
        return _tokens(self.read_token)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_bind_host(value: str) -> bool:
    """An IP address (IPv6 optionally in brackets) or a syntactically valid host name."""
    host = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if host != value or not host or len(host) > 253:
        return False
    return all(_HOST_LABEL.fullmatch(label) for label in host.removesuffix(".").split("."))


def _tokens(secret: SecretStr | None) -> frozenset[str]:
    if secret is None:
        return frozenset()
    return frozenset(t.strip() for t in secret.get_secret_value().split(",") if t.strip())


def load_settings(**overrides: object) -> Settings:
    """Read the environment (plus ``overrides``); raise :class:`ConfigError` naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise config_error(exc, ENV_PREFIX) from None


def config_error(exc: ValidationError, prefix: str) -> ConfigError:
    """A :class:`ConfigError` naming each bad variable (``prefix`` + the field's name)."""
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if p != "__root__"]
        name = prefix + loc[0].upper() if loc else "configuration"
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{name}: {msg}" if loc else msg)
    return ConfigError("invalid configuration: " + "; ".join(problems))
