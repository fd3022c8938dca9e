"""CLI commands that talk to a running server: ``price``, ``check``, ``health``, and ``rules``
with ``--target`` (through DiscountAdminService instead of the rule store).

Credentials and transport come from the same settings as the server's (one environment for a
host or a pod): the first token of ``PRICING_READ_TOKEN`` for PricingService, of
``PRICING_ADMIN_TOKEN`` for the admin service, sent as ``authorization: Bearer``; TLS when
``PRICING_TLS_CERT_FILE`` is set (the server there speaks TLS) or a ``--tls*`` flag is given.
What the server's settings cannot say is a flag: the CA to trust (``--tls-ca-file``, default
the system's), a client certificate for mTLS (``--tls-cert-file``/``--tls-key-file``), the name
the certificate carries (``--tls-server-name``), ``--plaintext`` to override.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from pydantic import SecretStr

from pricing.v1 import admin_pb2, admin_pb2_grpc, common_pb2, pricing_pb2, pricing_pb2_grpc
from pricing_service.config import Settings
from pricing_service.domain import CrowdKind, Money, Rule
from pricing_service.errors import InvalidArgumentError
from pricing_service.rules.human_input import decimal_to_minor, rule_from_human

#: What ``health`` checks: the overall status and each service's.
HEALTH_SERVICES = (
    "",
    pricing_pb2.DESCRIPTOR.services_by_name["PricingService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["DiscountAdminService"].full_name,
)


def target_of(settings: Settings, args: argparse.Namespace) -> str:
    if args.target:
        return str(args.target)
    host, _, port = settings.listen.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # a wildcard listen address is reached on loopback
    return f"{host}:{port}"


def first_token(secret: SecretStr | None) -> str | None:
    """The first of a comma-separated token list (the server accepts any of them)."""
    if secret is None:
        return None
    return next((t.strip() for t in secret.get_secret_value().split(",") if t.strip()), None)


def open_channel(settings: Settings, args: argparse.Namespace) -> grpc.Channel:
    """A channel to the server with the TLS the settings and flags ask for."""
    target = target_of(settings, args)
    cert, key = args.tls_cert_file, args.tls_key_file
    if (cert is None) != (key is None):
        raise _usage("--tls-cert-file and --tls-key-file go together")
    tls_flags = bool(args.tls or args.tls_ca_file or cert or args.tls_server_name)
    if args.plaintext and tls_flags:
        raise _usage(
            "--plaintext excludes --tls, --tls-ca-file, --tls-cert-file, --tls-server-name"
        )
    use_tls = not args.plaintext and (tls_flags or settings.tls_cert_file is not None)
    if not use_tls:
        return grpc.insecure_channel(target)

    def read(path: str | None, flag: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise _usage(f"{flag}: cannot read {path}: {exc.strerror}") from None

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(args.tls_ca_file, "--tls-ca-file"),
        private_key=read(key, "--tls-key-file"),
        certificate_chain=read(cert, "--tls-cert-file"),
    )
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(target, creds, options=options)


def _usage(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(message, reason="INVALID_USAGE")


def _bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _print(message: Message) -> None:
    print(json.dumps(json_format.MessageToDict(message), indent=2))


def _call(fn: Callable[[], int]) -> int:
    """Run the calls; a gRPC error is printed as ``CODE: details`` (and, for a refusal, each
    bad field with its reason, from the status's BadRequest) with exit code 1."""
    try:
        return fn()
    except grpc.RpcError as err:
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else str(err)
        print(f"{code.name if code else 'ERROR'}: {details}", file=sys.stderr)
        status = rpc_status.from_call(err) if isinstance(err, grpc.Call) else None
        for d in status.details if status is not None else ():
            if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                d.Unpack(bad)
                for v in bad.field_violations:
                    print(f"  {v.field}: {v.reason}: {v.description}", file=sys.stderr)
        return 1


# --- price / check ---------------------------------------------------------------------------
def run(settings: Settings, args: argparse.Namespace) -> int:
    """``price`` or ``check``."""
    metadata = _bearer(first_token(settings.read_token))
    with open_channel(settings, args) as channel:
        stub = pricing_pb2_grpc.PricingServiceStub(channel)

        def calls() -> int:
            response: Message
            if args.command == "price":
                response = stub.BatchGetLowestPrice(
                    price_request(args), metadata=metadata, timeout=args.timeout
                )
            else:
                response = stub.CheckDiscountStrict(
                    check_request(args), metadata=metadata, timeout=args.timeout
                )
            _print(response)
            return 0

        return _call(calls)


def price_request(args: argparse.Namespace) -> pricing_pb2.BatchGetLowestPriceRequest:
    request = pricing_pb2.BatchGetLowestPriceRequest(user_id=args.user, explain=args.explain)
    for token in filter(None, (t.strip() for t in args.items.split(","))):
        item, _, list_price = token.partition("=")
        q = request.items.add(item_id=item)
        if list_price:
            q.list_price.CopyFrom(
                common_pb2.Money(
                    currency_code=args.currency,
                    amount_minor=decimal_to_minor(list_price, args.currency, "items"),
                )
            )
    return request


def check_request(args: argparse.Namespace) -> pricing_pb2.CheckDiscountStrictRequest:
    check = pricing_pb2.CheckDiscountStrictRequest(user_id=args.user, item_id=args.item)
    if args.expected_price:
        check.expected_price.CopyFrom(
            common_pb2.Money(
                currency_code=args.currency,
                amount_minor=decimal_to_minor(args.expected_price, args.currency, "expected_price"),
            )
        )
    return check


# --- health ----------------------------------------------------------------------------------
def health(settings: Settings, args: argparse.Namespace) -> int:
    """Each service's status, one line each; exit 0 only when all are SERVING.

    Exit codes: 0 all SERVING, 1 some service is not (NOT_SERVING, SERVICE_UNKNOWN, or the
    server could not be reached).
    """
    services: Sequence[str] = args.service or HEALTH_SERVICES
    statuses: dict[str, str] = {}
    with open_channel(settings, args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in services:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=args.timeout)
                statuses[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                statuses[name] = (
                    "SERVICE_UNKNOWN" if code == grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
                )
                if code != grpc.StatusCode.NOT_FOUND:
                    details = err.details() if hasattr(err, "details") else ""
                    print(f"{name or '(overall)'}: {code.name if code else ''} {details}",
                          file=sys.stderr)  # fmt: skip
    width = max(len(n or "(overall)") for n in services)
    for name, status in statuses.items():
        print(f"{(name or '(overall)').ljust(width)}  {status}")
    return 0 if all(s == "SERVING" for s in statuses.values()) else 1


# --- rules through the admin service ---------------------------------------------------------
def rule_to_proto(rule: Rule) -> admin_pb2.DiscountRule:
    m = admin_pb2.DiscountRule(
        rule_id=rule.rule_id,
        seller_id=rule.seller_id,
        item_id=rule.item_id,
        crowd=int(rule.kind),  # type: ignore[arg-type]
        price=common_pb2.Money(
            currency_code=rule.price.currency, amount_minor=rule.price.amount_minor
        ),
    )
    if rule.start_ms is not None:
        m.start_time.FromMilliseconds(rule.start_ms)
    if rule.end_ms is not None:
        m.end_time.FromMilliseconds(rule.end_ms)
    return m


def rule_from_proto(m: admin_pb2.DiscountRule) -> Rule:
    return Rule(
        rule_id=m.rule_id,
        seller_id=m.seller_id,
        item_id=m.item_id,
        kind=CrowdKind(int(m.crowd)),
        price=Money(m.price.currency_code, m.price.amount_minor),
        start_ms=m.start_time.ToMilliseconds() if m.HasField("start_time") else None,
        end_ms=m.end_time.ToMilliseconds() if m.HasField("end_time") else None,
        revision=m.revision,
        create_ms=m.create_time.ToMilliseconds(),
        update_ms=m.update_time.ToMilliseconds(),
    )


def rules(settings: Settings, args: argparse.Namespace) -> int:
    """``rules upsert|list|import --target``: the same input and output as against the store,
    authenticated with the first ``PRICING_ADMIN_TOKEN``; the audit actor is ``--actor``
    (``x-actor``) plus the token's fingerprint."""
    from pricing_service.rules.cli import read_import_file, rule_line  # noqa: PLC0415

    token = first_token(settings.admin_token)
    if token is None:
        raise _usage("rules --target needs PRICING_ADMIN_TOKEN (the admin service's token)")
    metadata: tuple[tuple[str, str], ...] = (*_bearer(token),)
    if getattr(args, "actor", None):
        metadata += (("x-actor", args.actor),)
    with open_channel(settings, args) as channel:
        stub = admin_pb2_grpc.DiscountAdminServiceStub(channel)

        def calls() -> int:
            if args.rules_command == "upsert":
                rule = rule_from_human(
                    {
                        "seller_id": args.seller,
                        "item_id": args.item,
                        "crowd": args.crowd,
                        "price": args.price,
                        "currency": args.currency,
                        "start_time": args.start,
                        "end_time": args.end,
                    },
                    "rule",
                    max_id_length=settings.max_id_length,
                )
                response = stub.UpsertDiscountRule(
                    admin_pb2.UpsertDiscountRuleRequest(rule=rule_to_proto(rule)),
                    metadata=metadata,
                    timeout=args.timeout,
                )
                print(rule_line(rule_from_proto(response.rule)))
                if not response.changed:
                    print("(unchanged: the stored rule already had these values)", file=sys.stderr)
                return 0
            if args.rules_command == "list":
                page_token = ""
                while True:
                    listed = stub.ListDiscountRules(
                        admin_pb2.ListDiscountRulesRequest(
                            seller_id=args.seller,
                            item_id=args.item,
                            page_size=500,
                            page_token=page_token,
                        ),
                        metadata=metadata,
                        timeout=args.timeout,
                    )
                    for m in listed.rules:
                        print(rule_line(rule_from_proto(m)))
                    page_token = listed.next_page_token
                    if not page_token:
                        return 0
            batch = read_import_file(args.file, settings.max_id_length, sys.stdout)
            if batch is None:
                return 1  # refused before sending anything
            written = stub.BatchUpsertDiscountRules(
                admin_pb2.BatchUpsertDiscountRulesRequest(rules=[rule_to_proto(r) for r in batch]),
                metadata=metadata,
                timeout=max(args.timeout, 30.0),
            )
            revision = max((m.revision for m in written.rules), default=0)
            sellers = sorted({m.seller_id for m in written.rules})
            print(
                f"imported {len(written.rules)} rules for seller(s) {', '.join(sellers)}; "
                f"store revision {revision}"
            )
            return 0

        return _call(calls)
