"""The ``OTEL_*`` variables: when tracing is on, what each means, and the refusals naming the
variable; the sampler and provider built from them; the W3C header parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import sampling
from opentelemetry.trace import get_current_span

from pricing_service.errors import ConfigError
from pricing_service.otel_config import OtelSettings, load_otel_settings
from pricing_service.tracing import (
    build_tracer_provider,
    caller_context,
    make_sampler,
    redis_attributes,
)


def otel(monkeypatch: pytest.MonkeyPatch, **env: str) -> OtelSettings:
    """The settings of an environment with exactly these ``OTEL_*`` variables."""
    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_otel_settings()


def refused(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        otel(monkeypatch, **env)
    return caught.value.message


def test_off_unless_an_exporter_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not otel(monkeypatch).enabled
    # an endpoint alone (a fleet-wide setting) does not switch tracing on
    assert not otel(monkeypatch, OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318").enabled
    assert not otel(monkeypatch, OTEL_TRACES_EXPORTER="none").enabled
    assert not otel(monkeypatch, OTEL_TRACES_EXPORTER="").enabled
    on = otel(monkeypatch, OTEL_TRACES_EXPORTER="otlp")
    assert on.enabled and on.exporters == ("otlp",)
    assert otel(monkeypatch, OTEL_TRACES_EXPORTER="otlp, Console").exporters == ("otlp", "console")
    assert not otel(monkeypatch, OTEL_TRACES_EXPORTER="otlp", OTEL_SDK_DISABLED="TRUE").enabled
    assert otel(monkeypatch, OTEL_TRACES_EXPORTER="otlp", OTEL_SDK_DISABLED="false").enabled
    disabled = otel(monkeypatch, OTEL_TRACES_EXPORTER="otlp", OTEL_SDK_DISABLED="true")
    assert build_tracer_provider(disabled) is None


def test_endpoint_headers_timeout_compression(monkeypatch: pytest.MonkeyPatch) -> None:
    o = otel(monkeypatch, OTEL_TRACES_EXPORTER="otlp")
    assert o.traces_endpoint() == "http://localhost:4318/v1/traces"
    assert o.traces_timeout_s() == 10.0 and o.traces_compression() == "none"
    o = otel(
        monkeypatch,
        OTEL_EXPORTER_OTLP_ENDPOINT="https://collector.example:4318/",
        OTEL_EXPORTER_OTLP_HEADERS="api-key=a%3Db,x-tenant = crowd",
        OTEL_EXPORTER_OTLP_TIMEOUT="2500",
        OTEL_EXPORTER_OTLP_COMPRESSION="gzip",
    )
    assert o.traces_endpoint() == "https://collector.example:4318/v1/traces"
    assert o.traces_headers() == {"api-key": "a=b", "x-tenant": "crowd"}
    assert o.traces_timeout_s() == 2.5  # milliseconds, as the specification says
    assert o.traces_compression() == "gzip"
    # the traces-specific variables win (the endpoint is used as is)
    o = otel(
        monkeypatch,
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://traces:9999/custom",
        OTEL_EXPORTER_OTLP_TRACES_HEADERS="k=v",
        OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="100",
        OTEL_EXPORTER_OTLP_TRACES_COMPRESSION="none",
    )
    assert o.traces_endpoint() == "http://traces:9999/custom"
    assert o.traces_headers() == {"k": "v"}
    assert o.traces_timeout_s() == 0.1 and o.traces_compression() == "none"


def test_service_name_and_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    assert otel(monkeypatch).resource() == {"service.name": "pricing-service"}
    o = otel(monkeypatch, OTEL_RESOURCE_ATTRIBUTES="service.name=from-attrs,team=pricing%20core")
    assert o.resource() == {"service.name": "from-attrs", "team": "pricing core"}
    o = otel(monkeypatch, OTEL_SERVICE_NAME="checkout-pricing")
    assert o.resource()["service.name"] == "checkout-pricing"


def test_refusals_name_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cases = {
        "OTEL_TRACES_EXPORTER": {"OTEL_TRACES_EXPORTER": "zipkin"},
        "OTEL_EXPORTER_OTLP_PROTOCOL": {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
        "OTEL_EXPORTER_OTLP_ENDPOINT": {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"},
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "ftp://x"},
        "OTEL_EXPORTER_OTLP_HEADERS": {"OTEL_EXPORTER_OTLP_HEADERS": "api-key"},
        "OTEL_EXPORTER_OTLP_TIMEOUT": {"OTEL_EXPORTER_OTLP_TIMEOUT": "10s"},
        "OTEL_EXPORTER_OTLP_COMPRESSION": {"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"},
        "OTEL_EXPORTER_OTLP_CERTIFICATE": {
            "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path / "missing.pem")
        },
        "OTEL_TRACES_SAMPLER": {"OTEL_TRACES_SAMPLER": "jaeger_remote"},
        "OTEL_TRACES_SAMPLER_ARG": {
            "OTEL_TRACES_SAMPLER": "traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "1.5",
        },
        "OTEL_RESOURCE_ATTRIBUTES": {"OTEL_RESOURCE_ATTRIBUTES": "=x"},
        "OTEL_PROPAGATORS": {"OTEL_PROPAGATORS": "b3"},
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": {
            "OTEL_BSP_MAX_QUEUE_SIZE": "10",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "20",
        },
        "OTEL_BSP_SCHEDULE_DELAY": {"OTEL_BSP_SCHEDULE_DELAY": "0"},
    }
    for variable, env in cases.items():
        message = refused(monkeypatch, **env)
        assert f"{variable}:" in message, (variable, message)
    # 'none' is no exporter: with another it is a contradiction
    assert "OTEL_TRACES_EXPORTER" in refused(monkeypatch, OTEL_TRACES_EXPORTER="otlp,none")


def test_samplers(monkeypatch: pytest.MonkeyPatch) -> None:
    default = make_sampler(otel(monkeypatch))
    assert isinstance(default, sampling.ParentBased)
    assert "AlwaysOnSampler" in default.get_description()  # type: ignore[no-untyped-call]
    ratio = make_sampler(
        otel(
            monkeypatch,
            OTEL_TRACES_SAMPLER="parentbased_traceidratio",
            OTEL_TRACES_SAMPLER_ARG="0.01",
        )
    )
    assert isinstance(ratio, sampling.ParentBased) and "0.01" in ratio.get_description()  # type: ignore[no-untyped-call]
    plain = make_sampler(otel(monkeypatch, OTEL_TRACES_SAMPLER="traceidratio"))
    assert isinstance(plain, sampling.TraceIdRatioBased) and plain.rate == 1.0
    assert make_sampler(otel(monkeypatch, OTEL_TRACES_SAMPLER="always_off")) is sampling.ALWAYS_OFF
    # the argument of a sampler that takes none is ignored (as the specification says)
    assert (
        make_sampler(
            otel(monkeypatch, OTEL_TRACES_SAMPLER="always_on", OTEL_TRACES_SAMPLER_ARG="x")
        )
        is sampling.ALWAYS_ON
    )


def test_propagators(monkeypatch: pytest.MonkeyPatch) -> None:
    assert otel(monkeypatch).propagate
    assert otel(monkeypatch, OTEL_PROPAGATORS="tracecontext,baggage").propagate
    assert not otel(monkeypatch, OTEL_PROPAGATORS="none").propagate
    assert not otel(monkeypatch, OTEL_PROPAGATORS="baggage").propagate


def test_the_provider_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = build_tracer_provider(
        otel(
            monkeypatch,
            OTEL_TRACES_EXPORTER="otlp,console",
            OTEL_SERVICE_NAME="svc",
            OTEL_TRACES_SAMPLER="always_off",
        )
    )
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "svc"
        assert provider.resource.attributes["telemetry.sdk.language"] == "python"
        assert provider.sampler is sampling.ALWAYS_OFF
        processors = provider._active_span_processor._span_processors
        exporters = sorted(type(p.span_exporter).__name__ for p in processors)  # type: ignore[attr-defined]
        assert exporters == ["ConsoleSpanExporter", "OTLPSpanExporter"]
    finally:
        provider.shutdown()


def test_caller_context_from_metadata() -> None:
    tid, sid = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    ctx = caller_context((("x-request-id", "r"), ("traceparent", f"00-{tid}-{sid}-01")))
    assert ctx is not None
    parent = get_current_span(ctx).get_span_context()
    assert f"{parent.trace_id:032x}" == tid and f"{parent.span_id:016x}" == sid
    assert parent.is_remote and parent.trace_flags.sampled
    assert caller_context(()) is None
    assert caller_context((("tracestate", "a=b"),)) is None  # no traceparent: no caller trace
    assert caller_context((("traceparent", b"\x00"),)) is None  # a binary value is no header
    bad = caller_context((("traceparent", "00-xyz-00f067aa0ba902b7-01"),))
    assert bad is not None and not get_current_span(bad).get_span_context().is_valid


def test_redis_attributes() -> None:
    assert redis_attributes("redis://10.0.0.5:6380/2") == {
        "db.system.name": "redis",
        "server.address": "10.0.0.5",
        "server.port": 6380,
        "db.namespace": "2",
    }
    assert redis_attributes("redis://localhost")["server.port"] == 6379
    assert redis_attributes("redis+cluster://a:1,b:2") == {"db.system.name": "redis"}
    assert redis_attributes("unix:///run/redis.sock")["server.address"] == "/run/redis.sock"


def test_the_bench_tracing_environments_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.serving import otel_env  # noqa: PLC0415

    endpoint = "http://127.0.0.1:4318"
    assert otel_env("off", endpoint) == {}
    one = otel(monkeypatch, **otel_env("1%", endpoint))
    assert one.enabled and one.sampling_ratio == 0.01
    assert one.traces_endpoint() == endpoint + "/v1/traces"
    every = otel(monkeypatch, **otel_env("100%", endpoint))
    assert every.enabled and every.traces_sampler == "parentbased_always_on"
