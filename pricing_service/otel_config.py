"""Tracing configuration: the OpenTelemetry SDK's standard ``OTEL_*`` variables.

Read once by ``pricing-service serve`` (:func:`load_otel_settings`) and passed down, as the
``PRICING_*`` settings of :mod:`pricing_service.config` are; invalid values stop the server at
start-up naming the variable. :mod:`pricing_service.tracing` builds the tracer provider.
"""

from __future__ import annotations

import os
from typing import Final
from urllib.parse import unquote, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pricing_service.config import config_error

#: Prefix of the OpenTelemetry SDK's standard variables (:class:`OtelSettings`).
OTEL_PREFIX = "OTEL_"
#: ``OTEL_TRACES_EXPORTER`` values this service exports with (``none``: no exporter).
OTEL_EXPORTERS: Final = ("otlp", "console")
#: ``OTEL_TRACES_SAMPLER`` values (the SDK's built-in samplers); the ratio ones read
#: ``OTEL_TRACES_SAMPLER_ARG``.
OTEL_SAMPLERS: Final = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
#: ``OTEL_PROPAGATORS`` values accepted: the W3C trace context (``traceparent`` /
#: ``tracestate``) is what callers' traces are continued from; ``baggage`` is accepted (the
#: SDK's default list names it) and has no effect; ``none`` starts every call's own trace.
OTEL_PROPAGATORS: Final = ("tracecontext", "baggage", "none")
#: The OTLP transport (``OTEL_EXPORTER_OTLP_PROTOCOL``): OTLP/HTTP with protobuf bodies.
OTLP_PROTOCOL = "http/protobuf"
DEFAULT_OTLP_ENDPOINT = "http://localhost:4318"
DEFAULT_SERVICE_NAME = "pricing-service"


class OtelSettings(BaseSettings):
    """OpenTelemetry tracing: the SDK's standard ``OTEL_*`` variables, read once at start-up.

    Off by default. Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``,
    ``console``, or both comma-separated) and ``OTEL_SDK_DISABLED`` is not ``true``; unset or
    ``none`` is off. (The specification's default exporter is ``otlp``: here it must be asked
    for, so that a fleet-wide ``OTEL_EXPORTER_OTLP_ENDPOINT`` does not switch tracing on by
    itself.) Spans go over OTLP/HTTP (``http/protobuf``) to ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
    (used as is) or ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces``. Durations are in
    milliseconds, as the specification says (the Python SDK reads its own timeout variables as
    seconds; here they are parsed once and passed to it explicitly).
    """

    model_config = SettingsConfigDict(
        env_prefix=OTEL_PREFIX,
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        env_ignore_empty=True,
    )

    sdk_disabled: str = Field("", description="'true' turns tracing off whatever else is set")
    traces_exporter: str = Field(
        "", description="otlp, console, otlp,console, or none (unset = none: tracing off)"
    )
    exporter_otlp_protocol: str = Field("", description="OTLP transport: http/protobuf only")
    exporter_otlp_traces_protocol: str = Field(
        "", description="OTLP transport of traces (overrides OTEL_EXPORTER_OTLP_PROTOCOL)"
    )
    exporter_otlp_endpoint: str = Field(
        "", description="OTLP/HTTP base URL; /v1/traces is appended (default localhost:4318)"
    )
    exporter_otlp_traces_endpoint: str = Field(
        "", description="OTLP/HTTP URL of traces, used as is (overrides the base URL)"
    )
    exporter_otlp_headers: str = Field(
        "", description="Headers of every export request: key=value,key2=value2 (URL-encoded)"
    )
    exporter_otlp_traces_headers: str = Field(
        "", description="Headers of trace export requests (overrides OTEL_EXPORTER_OTLP_HEADERS)"
    )
    exporter_otlp_timeout: int = Field(10_000, ge=1, description="Export request timeout, ms")
    exporter_otlp_traces_timeout: int | None = Field(
        None, ge=1, description="Trace export request timeout, ms (overrides the general one)"
    )
    exporter_otlp_compression: str = Field("", description="gzip or none")
    exporter_otlp_traces_compression: str = Field("", description="gzip or none (traces)")
    exporter_otlp_certificate: str | None = Field(
        None, description="CA bundle to verify an https:// collector (default: system CAs)"
    )
    exporter_otlp_traces_certificate: str | None = Field(None, description="CA bundle (traces)")
    exporter_otlp_client_certificate: str | None = Field(
        None, description="Client certificate for mutual TLS to the collector"
    )
    exporter_otlp_traces_client_certificate: str | None = Field(
        None, description="Client certificate (traces)"
    )
    exporter_otlp_client_key: str | None = Field(
        None, description="Client key for mutual TLS to the collector"
    )
    exporter_otlp_traces_client_key: str | None = Field(None, description="Client key (traces)")
    traces_sampler: str = Field(
        "parentbased_always_on", description="Sampler: " + ", ".join(OTEL_SAMPLERS)
    )
    traces_sampler_arg: str = Field(
        "", description="Sampling ratio 0..1 of the traceidratio samplers (default 1.0)"
    )
    service_name: str = Field("", description=f"service.name (default {DEFAULT_SERVICE_NAME})")
    resource_attributes: str = Field(
        "", description="Resource attributes: key=value,key2=value2 (URL-encoded values)"
    )
    propagators: str = Field(
        "tracecontext", description="tracecontext (W3C traceparent; baggage accepted) or none"
    )
    bsp_schedule_delay: int = Field(
        5000, ge=1, description="Batch span processor: export every N ms"
    )
    bsp_export_timeout: int = Field(
        30_000, ge=1, description="Batch span processor: export timeout, ms"
    )
    bsp_max_queue_size: int = Field(
        2048, ge=1, description="Spans queued for export; beyond, new spans are dropped"
    )
    bsp_max_export_batch_size: int = Field(512, ge=1, description="Spans per export request")

    @field_validator("traces_exporter")
    @classmethod
    def _exporters(cls, v: str) -> str:
        names = _otel_list(v)
        unknown = [n for n in names if n not in (*OTEL_EXPORTERS, "none")]
        if unknown:
            raise ValueError(
                f"unsupported exporter {unknown[0]!r}: one of otlp (OTLP/HTTP), console, "
                "otlp,console, or none"
            )
        if "none" in names and len(names) > 1:
            raise ValueError("'none' cannot be combined with an exporter")
        return v

    @field_validator("exporter_otlp_protocol", "exporter_otlp_traces_protocol")
    @classmethod
    def _protocol(cls, v: str) -> str:
        if v and v.strip() != OTLP_PROTOCOL:
            raise ValueError(
                f"{v!r} is not supported: this service exports OTLP over HTTP ({OTLP_PROTOCOL}; "
                "the OpenTelemetry Collector's otlp receiver listens for it on port 4318)"
            )
        return v.strip()

    @field_validator("exporter_otlp_endpoint", "exporter_otlp_traces_endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        v = v.strip()
        if v:
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{v!r} is not an http:// or https:// URL")
        return v

    @field_validator("exporter_otlp_headers", "exporter_otlp_traces_headers", "resource_attributes")
    @classmethod
    def _pairs(cls, v: str) -> str:
        _otel_pairs(v)
        return v

    @field_validator("exporter_otlp_compression", "exporter_otlp_traces_compression")
    @classmethod
    def _compression(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in ("", "gzip", "none"):
            raise ValueError(f"{v!r}: must be gzip or none")
        return v

    @field_validator(
        "exporter_otlp_certificate",
        "exporter_otlp_traces_certificate",
        "exporter_otlp_client_certificate",
        "exporter_otlp_traces_client_certificate",
        "exporter_otlp_client_key",
        "exporter_otlp_traces_client_key",
    )
    @classmethod
    def _file(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isfile(v):
            raise ValueError(f"no such file: {v}")
        return v

    @field_validator("traces_sampler")
    @classmethod
    def _sampler(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in OTEL_SAMPLERS:
            raise ValueError(f"unknown sampler {v!r}; one of {', '.join(OTEL_SAMPLERS)}")
        return v

    @field_validator("propagators")
    @classmethod
    def _propagators(cls, v: str) -> str:
        unknown = [n for n in _otel_list(v) if n not in OTEL_PROPAGATORS]
        if unknown:
            raise ValueError(
                f"unsupported propagator {unknown[0]!r}: callers' traces are continued from the "
                "W3C trace context (tracecontext); none starts a trace per call"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> OtelSettings:
        if self.traces_sampler.endswith("traceidratio") and self.traces_sampler_arg:
            try:
                ratio = float(self.traces_sampler_arg)
            except ValueError:
                ratio = -1.0
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(
                    f"OTEL_TRACES_SAMPLER_ARG: {self.traces_sampler_arg!r} is not a sampling "
                    "ratio between 0 and 1"
                )
        if self.bsp_max_export_batch_size > self.bsp_max_queue_size:
            raise ValueError(
                f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE: {self.bsp_max_export_batch_size} exceeds "
                f"OTEL_BSP_MAX_QUEUE_SIZE ({self.bsp_max_queue_size})"
            )
        return self

    # --- what the settings mean ---------------------------------------------------------------
    @property
    def exporters(self) -> tuple[str, ...]:
        """The exporters asked for (empty: none)."""
        return tuple(n for n in _otel_list(self.traces_exporter) if n != "none")

    @property
    def enabled(self) -> bool:
        """Whether this process traces (see the class docstring)."""
        return bool(self.exporters) and self.sdk_disabled.strip().lower() != "true"

    @property
    def propagate(self) -> bool:
        """Whether a caller's ``traceparent`` continues its trace."""
        return "tracecontext" in _otel_list(self.propagators)

    @property
    def sampling_ratio(self) -> float:
        return float(self.traces_sampler_arg) if self.traces_sampler_arg else 1.0

    def traces_endpoint(self) -> str:
        if self.exporter_otlp_traces_endpoint:
            return self.exporter_otlp_traces_endpoint
        base = self.exporter_otlp_endpoint or DEFAULT_OTLP_ENDPOINT
        return base.rstrip("/") + "/v1/traces"

    def traces_headers(self) -> dict[str, str]:
        return _otel_pairs(self.exporter_otlp_traces_headers or self.exporter_otlp_headers)

    def traces_timeout_s(self) -> float:
        ms = self.exporter_otlp_traces_timeout or self.exporter_otlp_timeout
        return ms / 1000

    def traces_compression(self) -> str:
        return self.exporter_otlp_traces_compression or self.exporter_otlp_compression or "none"

    def traces_tls_files(self) -> tuple[str | None, str | None, str | None]:
        """(CA bundle, client certificate, client key) for an https:// collector."""
        return (
            self.exporter_otlp_traces_certificate or self.exporter_otlp_certificate,
            self.exporter_otlp_traces_client_certificate or self.exporter_otlp_client_certificate,
            self.exporter_otlp_traces_client_key or self.exporter_otlp_client_key,
        )

    def resource(self) -> dict[str, str]:
        """``OTEL_RESOURCE_ATTRIBUTES`` with ``service.name`` (``OTEL_SERVICE_NAME`` first)."""
        attrs = _otel_pairs(self.resource_attributes)
        attrs["service.name"] = (
            self.service_name or attrs.get("service.name") or DEFAULT_SERVICE_NAME
        )
        return attrs


def _otel_list(value: str) -> list[str]:
    return [n.strip().lower() for n in value.split(",") if n.strip()]


def _otel_pairs(value: str) -> dict[str, str]:
    """``key=value,key2=value2`` (W3C baggage-like, values URL-encoded) as a dict."""
    out: dict[str, str] = {}
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item.strip()!r} is not key=value (expected key=value,key2=value2)")
        out[unquote(key.strip())] = unquote(raw.strip())
    return out


def load_otel_settings(**overrides: object) -> OtelSettings:
    """The ``OTEL_*`` variables (plus ``overrides``), validated: :class:`ConfigError` naming the
    variable (read by ``pricing-service serve`` only: the other commands do not trace)."""
    try:
        return OtelSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise config_error(exc, OTEL_PREFIX) from None
