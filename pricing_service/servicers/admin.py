"""DiscountAdminService: authenticated rule management over the rule store.

Proto <-> domain conversion only: validation is :mod:`pricing_service.rules.validation`, the
business invariants live in the store's transactions, and every refusal is a
:class:`PricingError` raised here and translated by the server interceptor.
"""

from __future__ import annotations

from typing import Any

import grpc
import structlog
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from pricing.v1 import admin_pb2, admin_pb2_grpc
from pricing_service.auth import check_bearer
from pricing_service.config import Settings
from pricing_service.domain import Clock, Rule
from pricing_service.errors import InvalidArgumentError, UnauthenticatedError
from pricing_service.rules.store import RuleChange, RuleStore
from pricing_service.rules.validation import BatchIn, RuleIn, validate
from pricing_service.servicers.convert import (
    money_to_proto,
    ms_to_timestamp,
    require_id,
    timestamp_to_ms,
)

log = structlog.get_logger("pricing_service.admin")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_TOKEN_LENGTH = 1024


def refuse_unknown_fields(m: Message, field: str) -> None:
    """Fields this server does not know are refused, not silently dropped."""
    unknown = UnknownFieldSet(m)
    if len(unknown):
        numbers = sorted({unknown[i].field_number for i in range(len(unknown))})
        raise InvalidArgumentError.field(
            field,
            f"carries field number(s) {numbers} unknown to this server",
            "UNKNOWN_FIELD",
        )


def rule_to_dict(m: admin_pb2.DiscountRule, field: str = "rule") -> dict[str, Any]:
    """The caller-settable fields of a proto rule (output-only fields are ignored)."""
    refuse_unknown_fields(m, field)
    for sub in ("price", "start_time", "end_time"):
        if m.HasField(sub):
            refuse_unknown_fields(getattr(m, sub), f"{field}.{sub}")
    d: dict[str, Any] = {
        "rule_id": m.rule_id,
        "seller_id": m.seller_id,
        "item_id": m.item_id,
        "crowd": int(m.crowd),
    }
    if m.HasField("price"):
        d["price"] = {"currency_code": m.price.currency_code, "amount_minor": m.price.amount_minor}
    for when in ("start_time", "end_time"):
        if m.HasField(when):
            d[when] = timestamp_to_ms(getattr(m, when), f"{field}.{when}")
    return d


def rule_to_proto(rule: Rule, out: admin_pb2.DiscountRule) -> admin_pb2.DiscountRule:
    out.rule_id = rule.rule_id
    out.seller_id = rule.seller_id
    out.item_id = rule.item_id
    out.crowd = int(rule.kind)  # type: ignore[assignment]
    money_to_proto(rule.price, out.price)
    if rule.start_ms is not None:
        ms_to_timestamp(rule.start_ms, out.start_time)
    if rule.end_ms is not None:
        ms_to_timestamp(rule.end_ms, out.end_time)
    out.revision = rule.revision
    if rule.create_ms:
        ms_to_timestamp(rule.create_ms, out.create_time)
    if rule.update_ms:
        ms_to_timestamp(rule.update_ms, out.update_time)
    return out


def change_to_proto(change: RuleChange, out: admin_pb2.RuleChange) -> None:
    out.revision = change.revision
    out.action = change.action
    rule_to_proto(change.rule, out.rule)
    out.actor = change.actor
    ms_to_timestamp(change.change_ms, out.change_time)


def page_size_of(value: int) -> int:
    """AIP-158: negative is an error, 0 is the default, too large is coerced to the maximum."""
    if value < 0:
        raise InvalidArgumentError.field("page_size", "must not be negative", "INVALID_PAGE_SIZE")
    if value == 0:
        return DEFAULT_PAGE_SIZE
    return min(value, MAX_PAGE_SIZE)


def page_token_of(value: str) -> str:
    if len(value) > MAX_TOKEN_LENGTH:
        raise InvalidArgumentError.field(
            "page_token", "is not a token this service issued", "INVALID_PAGE_TOKEN"
        )
    return value


class DiscountAdminServicer(admin_pb2_grpc.DiscountAdminServiceServicer):
    def __init__(self, store: RuleStore, settings: Settings, clock: Clock) -> None:
        self.store = store
        self.tokens = settings.admin_tokens()
        self.max_id = settings.max_id_length
        self.max_batch = settings.max_rule_batch
        self.clock = clock

    def _actor(self, context: grpc.aio.ServicerContext) -> str:
        if not self.tokens:
            raise UnauthenticatedError(
                "the admin service is disabled: no PRICING_ADMIN_TOKEN is configured",
                reason="ADMIN_DISABLED",
            )
        return check_bearer(context.invocation_metadata(), self.tokens)

    def _optional_id(self, value: str, field: str) -> str:
        return require_id(value, field, self.max_id) if value else value

    async def UpsertDiscountRule(
        self, request: admin_pb2.UpsertDiscountRuleRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UpsertDiscountRuleResponse:
        actor = self._actor(context)
        refuse_unknown_fields(request, "request")
        if not request.HasField("rule"):
            raise InvalidArgumentError.field("rule", "is required", "MISSING_FIELD")
        rule = validate(
            RuleIn, rule_to_dict(request.rule), prefix="rule", max_id_length=self.max_id
        ).to_domain()
        written, changed = await self.store.upsert(rule, actor)
        log.info(
            "rule_upserted",
            actor=actor,
            rule_id=written.rule_id,
            seller_id=written.seller_id,
            item_id=written.item_id,
            revision=written.revision,
            changed=changed,
        )
        response = admin_pb2.UpsertDiscountRuleResponse(changed=changed)
        rule_to_proto(written, response.rule)
        return response

    async def GetDiscountRule(
        self, request: admin_pb2.GetDiscountRuleRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetDiscountRuleResponse:
        self._actor(context)
        rule = await self.store.get(require_id(request.rule_id, "rule_id", self.max_id))
        response = admin_pb2.GetDiscountRuleResponse()
        rule_to_proto(rule, response.rule)
        return response

    async def DeleteDiscountRule(
        self, request: admin_pb2.DeleteDiscountRuleRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DeleteDiscountRuleResponse:
        actor = self._actor(context)
        rule_id = require_id(request.rule_id, "rule_id", self.max_id)
        revision = await self.store.delete(rule_id, actor)
        log.info("rule_deleted", actor=actor, rule_id=rule_id, revision=revision)
        return admin_pb2.DeleteDiscountRuleResponse(revision=revision)

    async def ListDiscountRules(
        self, request: admin_pb2.ListDiscountRulesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListDiscountRulesResponse:
        self._actor(context)
        seller_id = self._optional_id(request.seller_id, "seller_id")
        item_id = self._optional_id(request.item_id, "item_id")
        if not seller_id and not item_id:
            raise InvalidArgumentError.field(
                "seller_id", "give seller_id, item_id or both", "MISSING_FILTER"
            )
        rules, token = await self.store.list_rules(
            seller_id, item_id, page_size_of(request.page_size), page_token_of(request.page_token)
        )
        response = admin_pb2.ListDiscountRulesResponse(next_page_token=token)
        for r in rules:
            rule_to_proto(r, response.rules.add())
        return response

    async def BatchUpsertDiscountRules(
        self,
        request: admin_pb2.BatchUpsertDiscountRulesRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.BatchUpsertDiscountRulesResponse:
        actor = self._actor(context)
        refuse_unknown_fields(request, "request")
        batch = validate(
            BatchIn,
            {"rules": [rule_to_dict(r, f"rules[{i}]") for i, r in enumerate(request.rules)]},
            max_id_length=self.max_id,
            max_rule_batch=self.max_batch,
        )
        written = await self.store.upsert_many([r.to_domain() for r in batch.rules], actor)
        log.info(
            "rules_batch_upserted",
            actor=actor,
            rules=len(written),
            revision=max((r.revision for r in written), default=0),
        )
        response = admin_pb2.BatchUpsertDiscountRulesResponse()
        for r in written:
            rule_to_proto(r, response.rules.add())
        return response

    async def ListRuleHistory(
        self, request: admin_pb2.ListRuleHistoryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListRuleHistoryResponse:
        self._actor(context)
        seller_id = require_id(request.seller_id, "seller_id", self.max_id)
        item_id = self._optional_id(request.item_id, "item_id")
        changes, token = await self.store.history(
            seller_id, item_id, page_size_of(request.page_size), page_token_of(request.page_token)
        )
        response = admin_pb2.ListRuleHistoryResponse(next_page_token=token)
        for c in changes:
            change_to_proto(c, response.changes.add())
        return response
