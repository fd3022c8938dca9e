"""DiscountAdminService: authenticated rule and crowd management over the rule store.

Proto <-> domain conversion only: validation is :mod:`pricing_service.rules.validation`, the
business invariants live in the store's transactions, and every refusal is a
:class:`PricingError` raised here and translated by the server interceptor. List members are
written to Redis through the membership store (:meth:`BatchUpdateCrowdMembers`).
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
from pricing_service.crowds import CrowdDef
from pricing_service.domain import Clock, Rule
from pricing_service.errors import InvalidArgumentError, UnauthenticatedError, UnavailableError
from pricing_service.ids import require_id
from pricing_service.membership.derive import Ttls
from pricing_service.membership.writer import MembershipWriter
from pricing_service.rules.crowd_members import member_changes, publish_list, update_members
from pricing_service.rules.store import CrowdChange, RuleChange, RuleStore
from pricing_service.rules.validation import BatchIn, CrowdIn, RuleIn, validate
from pricing_service.servicers.convert import (
    money_to_proto,
    ms_to_timestamp,
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
        "crowd_id": m.crowd_id,
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
    out.crowd_id = rule.crowd_id
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


def crowd_to_dict(m: admin_pb2.Crowd, field: str = "crowd") -> dict[str, Any]:
    """The caller-settable fields of a proto crowd (output-only fields are ignored)."""
    refuse_unknown_fields(m, field)
    d: dict[str, Any] = {
        "seller_id": m.seller_id,
        "crowd_id": m.crowd_id,
        "display_name": m.display_name,
    }
    form = m.WhichOneof("definition")
    if form == "predicate":
        p = m.predicate
        refuse_unknown_fields(p, f"{field}.predicate")
        d["predicate"] = {
            name: getattr(p, name)
            for name in (
                "min_follow_days",
                "max_follow_days",
                "min_purchases",
                "purchased_within_days",
            )
            if p.HasField(name)
        }
    elif form == "list":
        refuse_unknown_fields(m.list, f"{field}.list")
        d["list"] = True
    return d


def crowd_to_proto(c: CrowdDef, out: admin_pb2.Crowd) -> admin_pb2.Crowd:
    out.seller_id = c.seller_id
    out.crowd_id = c.crowd_id
    out.display_name = c.display_name
    out.name = c.name
    p = c.predicate
    if p is None:
        out.list.SetInParent()
    else:
        out.predicate.SetInParent()
        if p.min_follow_days:
            out.predicate.min_follow_days = p.min_follow_days
        if p.max_follow_days is not None:
            out.predicate.max_follow_days = p.max_follow_days
        if p.min_purchases:
            out.predicate.min_purchases = p.min_purchases
        if p.purchased_within_days is not None:
            out.predicate.purchased_within_days = p.purchased_within_days
    out.revision = c.revision
    if c.create_ms:
        ms_to_timestamp(c.create_ms, out.create_time)
    return out


def crowd_change_to_proto(change: CrowdChange, out: admin_pb2.CrowdChange) -> None:
    out.revision = change.revision
    out.action = change.action
    crowd_to_proto(change.crowd, out.crowd)
    out.actor = change.actor
    ms_to_timestamp(change.change_ms, out.change_time)
    out.added = change.added
    out.removed = change.removed


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
    def __init__(
        self,
        store: RuleStore,
        settings: Settings,
        clock: Clock,
        membership: MembershipWriter | None = None,
    ) -> None:
        self.store = store
        self.tokens = settings.admin_tokens()
        self.max_id = settings.max_id_length
        self.max_batch = settings.max_rule_batch
        self.max_crowd_batch = settings.max_crowd_batch
        self.clock = clock
        #: where list members are written (None: BatchUpdateCrowdMembers is UNAVAILABLE)
        self.membership = membership
        self.ttls = Ttls.from_seconds(
            settings.membership_ttl_s, settings.tombstone_ttl_s, settings.old_fan_min_days
        )

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

    # --- crowds -------------------------------------------------------------------------------
    def _crowd_ref(self, seller_id: str, crowd_id: str) -> tuple[str, str]:
        return require_id(seller_id, "seller_id", self.max_id), require_id(
            crowd_id, "crowd_id", self.max_id
        )

    async def CreateCrowd(
        self, request: admin_pb2.CreateCrowdRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateCrowdResponse:
        actor = self._actor(context)
        refuse_unknown_fields(request, "request")
        if not request.HasField("crowd"):
            raise InvalidArgumentError.field("crowd", "is required", "MISSING_FIELD")
        crowd = validate(
            CrowdIn, crowd_to_dict(request.crowd), prefix="crowd", max_id_length=self.max_id
        ).to_domain()
        written = await self.store.create_crowd(crowd, actor)
        log.info(
            "crowd_created",
            actor=actor,
            crowd=written.name,
            definition=written.describe(),
            revision=written.revision,
        )
        if written.is_list and self.membership is not None:
            failed = await publish_list(self.membership, written, listed=True)
            if failed is not None:
                log.warning("crowd_list_registry_failed", crowd=written.name, error=repr(failed))
        response = admin_pb2.CreateCrowdResponse()
        crowd_to_proto(written, response.crowd)
        return response

    async def GetCrowd(
        self, request: admin_pb2.GetCrowdRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetCrowdResponse:
        self._actor(context)
        crowd = await self.store.get_crowd(*self._crowd_ref(request.seller_id, request.crowd_id))
        response = admin_pb2.GetCrowdResponse()
        crowd_to_proto(crowd, response.crowd)
        return response

    async def ListCrowds(
        self, request: admin_pb2.ListCrowdsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListCrowdsResponse:
        self._actor(context)
        crowds, token = await self.store.list_crowds(
            require_id(request.seller_id, "seller_id", self.max_id),
            page_size_of(request.page_size),
            page_token_of(request.page_token),
        )
        response = admin_pb2.ListCrowdsResponse(next_page_token=token)
        for c in crowds:
            crowd_to_proto(c, response.crowds.add())
        return response

    async def DeleteCrowd(
        self, request: admin_pb2.DeleteCrowdRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DeleteCrowdResponse:
        actor = self._actor(context)
        seller_id, crowd_id = self._crowd_ref(request.seller_id, request.crowd_id)
        crowd = await self.store.get_crowd(seller_id, crowd_id)
        revision = await self.store.delete_crowd(seller_id, crowd_id, actor)
        log.info("crowd_deleted", actor=actor, crowd=crowd.name, revision=revision)
        if crowd.is_list and self.membership is not None:
            failed = await publish_list(self.membership, crowd, listed=False)
            if failed is not None:
                log.warning("crowd_list_registry_failed", crowd=crowd.name, error=repr(failed))
        return admin_pb2.DeleteCrowdResponse(revision=revision)

    async def BatchUpdateCrowdMembers(
        self,
        request: admin_pb2.BatchUpdateCrowdMembersRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.BatchUpdateCrowdMembersResponse:
        actor = self._actor(context)
        refuse_unknown_fields(request, "request")
        seller_id, crowd_id = self._crowd_ref(request.seller_id, request.crowd_id)
        changes = member_changes(
            list(request.add_user_ids),
            list(request.remove_user_ids),
            max_batch=self.max_crowd_batch,
            max_id_length=self.max_id,
        )
        if self.membership is None:
            raise UnavailableError("list members cannot be written here", reason="NO_MEMBERSHIP")
        done = await update_members(
            self.store, self.membership, self.ttls, seller_id, crowd_id, changes, actor
        )
        log.info(
            "crowd_members_updated",
            actor=actor,
            crowd=done.crowd.name,
            added=done.added,
            removed=done.removed,
            revision=done.revision,
        )
        response = admin_pb2.BatchUpdateCrowdMembersResponse(
            added=done.added, removed=done.removed, revision=done.revision
        )
        ms_to_timestamp(done.version_ms, response.change_time)
        return response

    async def ListCrowdHistory(
        self, request: admin_pb2.ListCrowdHistoryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListCrowdHistoryResponse:
        self._actor(context)
        changes, token = await self.store.crowd_history(
            require_id(request.seller_id, "seller_id", self.max_id),
            page_size_of(request.page_size),
            page_token_of(request.page_token),
        )
        response = admin_pb2.ListCrowdHistoryResponse(next_page_token=token)
        for c in changes:
            crowd_change_to_proto(c, response.changes.add())
        return response
