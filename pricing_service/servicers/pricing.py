"""PricingService servicer: converts proto <-> domain around :class:`PricingCore`."""

from __future__ import annotations

import grpc

from pricing.v1 import pricing_pb2, pricing_pb2_grpc
from pricing_service.auth import check_bearer
from pricing_service.currency import MAX_AMOUNT_MINOR, is_known
from pricing_service.domain import Money
from pricing_service.engine import Decision
from pricing_service.errors import InvalidArgumentError
from pricing_service.ids import require_id
from pricing_service.pricing import PriceQuery, PricingCore
from pricing_service.servicers.convert import (
    batch_response_bytes,
    money_from_proto,
    money_to_proto,
    ms_to_timestamp,
    price_entry,
)


def _fill_item_price(d: Decision, out: pricing_pb2.ItemPrice) -> None:
    """The price and the applied rule of a decision into ``out`` (not the explanations)."""
    if d.price is not None:
        money_to_proto(d.price, out.price)
    rule = d.rule
    if rule is not None:
        out.discounted = True
        out.rule_id = rule.rule_id
        out.crowd = int(rule.kind)  # type: ignore[assignment]
        out.seller_id = rule.seller_id
        if rule.crowd_id:
            out.crowd_id = rule.crowd_id


#: An answer's memo key: (item,), (item, currency, amount) or (item, currency, amount, rule id,
#: crowd kind, seller, crowd id): every field its ``ItemPrice`` is built from.
_AnswerKey = tuple[str] | tuple[str, str, int] | tuple[str, str, int, str, int, str, str]

#: Entries of each memo of :class:`PricingServicer` before it is cleared: the hot items and
#: list prices fit; a bigger memo mostly holds cold entries (an ItemPrice is ~300 bytes).
MEMO_SIZE = 8_192


class PricingServicer(pricing_pb2_grpc.PricingServiceServicer):
    def __init__(
        self,
        core: PricingCore,
        *,
        max_batch_items: int,
        max_id_length: int,
        read_tokens: frozenset[str] = frozenset(),
    ) -> None:
        self.core = core
        self.max_items = max_batch_items
        self.max_id = max_id_length
        self.read_tokens = read_tokens
        # Memos of the page loop (bounded; cleared when full). A page repeats the same list
        # prices and the same answers across buyers and requests: building a Money or an
        # ItemPrice field by field costs more than looking one up (bench.hotpath).
        self._money: dict[tuple[str, int], Money] = {}
        self._answers: dict[_AnswerKey, bytes] = {}

    async def BatchGetLowestPrice(  # type: ignore[override]  # may answer serialised bytes
        self,
        request: pricing_pb2.BatchGetLowestPriceRequest,
        context: grpc.aio.ServicerContext,
    ) -> pricing_pb2.BatchGetLowestPriceResponse | bytes:
        """The page's prices; without ``explain`` as the serialised response (the method's
        response serialiser passes bytes through, see ``interceptors``)."""
        if self.read_tokens:
            check_bearer(context.invocation_metadata(), self.read_tokens)
        max_id = self.max_id
        user_id = request.user_id
        if len(user_id) > max_id:
            raise InvalidArgumentError.field(
                "user_id", f"longer than {max_id} characters", "ID_TOO_LONG"
            )
        items = request.items
        n = len(items)
        if n == 0:
            raise InvalidArgumentError.field("items", "must not be empty", "EMPTY_BATCH")
        if n > self.max_items:
            raise InvalidArgumentError.field(
                "items", f"{n} items exceed the limit of {self.max_items}", "BATCH_TOO_LARGE"
            )
        queries: list[PriceQuery] = []
        monies = self._money
        new = tuple.__new__  # PriceQuery(...) without the NamedTuple's Python-level __new__
        for i, q in enumerate(items):
            item_id = q.item_id
            if not item_id or len(item_id) > max_id:
                require_id(item_id, f"items[{i}].item_id", max_id)
            list_price = None
            m = q.list_price
            code = m.currency_code
            # a list price with a currency was set; without one, HasField tells unset (no list
            # price) from set-but-empty (refused below): HasField costs ~0.5 us, so only then
            if code or q.HasField("list_price"):
                key = (code, m.amount_minor)
                list_price = monies.get(key)
                if list_price is None:
                    amount = key[1]
                    if not (is_known(code) and 0 <= amount <= MAX_AMOUNT_MINOR):
                        money_from_proto(m, f"items[{i}].list_price", allow_zero=True)  # raises
                    if len(monies) >= MEMO_SIZE:
                        monies.clear()
                    list_price = monies[key] = Money(code, amount)
            queries.append(new(PriceQuery, (item_id, list_price)))
        result = await self.core.batch(
            user_id, queries, explain=request.explain, time_remaining_s=context.time_remaining()
        )
        if not request.explain:
            # each ItemPrice memoised, serialised as an element of the response's ``prices``
            # (the loop inline: a method call per item costs more than the lookup)
            answers = self._answers
            entries: list[bytes] = []
            add = entries.append
            for query, d in zip(queries, result.decisions, strict=True):
                price, rule = d.price, d.rule
                item_id = query.item_id
                memo_key: _AnswerKey = (
                    (item_id,)
                    if price is None
                    else (item_id, price.currency, price.amount_minor)
                    if rule is None
                    else (
                        item_id,
                        price.currency,
                        price.amount_minor,
                        rule.rule_id,
                        int(rule.kind),
                        rule.seller_id,
                        rule.crowd_id,
                    )
                )
                entry = answers.get(memo_key)
                if entry is None:
                    entry = self._answer(memo_key, item_id, d)
                add(entry)
            return batch_response_bytes(
                entries, degraded=result.degraded, rule_revision=result.rule_revision
            )
        response = pricing_pb2.BatchGetLowestPriceResponse(
            degraded=result.degraded, rule_revision=result.rule_revision
        )
        prices = response.prices
        for query, d in zip(queries, result.decisions, strict=True):
            out = prices.add(item_id=query.item_id)
            _fill_item_price(d, out)
            for ev in d.evaluations:
                e = out.evaluations.add(
                    rule_id=ev.rule.rule_id,
                    seller_id=ev.rule.seller_id,
                    crowd=int(ev.rule.kind),
                    outcome=int(ev.outcome),
                    crowd_id=ev.rule.crowd_id,
                    reason=ev.reason,
                )
                money_to_proto(ev.rule.price, e.price)
        return response

    def _answer(self, key: _AnswerKey, item_id: str, d: Decision) -> bytes:
        """The ``ItemPrice`` of a decision without explanations, serialised as an element of
        the response's ``prices`` (:func:`price_entry`), memoised under ``key`` (every field
        of it: the item, the price, and the applied rule's id, crowd, seller and crowd id)."""
        out = pricing_pb2.ItemPrice(item_id=item_id)
        _fill_item_price(d, out)
        answers = self._answers
        if len(answers) >= MEMO_SIZE:
            answers.clear()
        entry = answers[key] = price_entry(out)
        return entry

    async def CheckDiscountStrict(
        self,
        request: pricing_pb2.CheckDiscountStrictRequest,
        context: grpc.aio.ServicerContext,
    ) -> pricing_pb2.CheckDiscountStrictResponse:
        if self.read_tokens:
            check_bearer(context.invocation_metadata(), self.read_tokens)
        user_id = require_id(request.user_id, "user_id", self.max_id)
        item_id = require_id(request.item_id, "item_id", self.max_id)
        if request.rule_id:
            require_id(request.rule_id, "rule_id", self.max_id)
        expected = (
            money_from_proto(request.expected_price, "expected_price", allow_zero=False)
            if request.HasField("expected_price")
            else None
        )
        result = await self.core.strict(
            user_id, item_id, expected, request.rule_id, time_remaining_s=context.time_remaining()
        )
        response = pricing_pb2.CheckDiscountStrictResponse(
            eligible=result.eligible,
            verdict=result.verdict,  # type: ignore[arg-type]
            rule_revision=result.rule_revision,
        )
        if result.price is not None:
            money_to_proto(result.price, response.price)
        if result.rule is not None:
            response.rule_id = result.rule.rule_id
            response.crowd = int(result.rule.kind)  # type: ignore[assignment]
            response.crowd_id = result.rule.crowd_id
        if result.membership_as_of_ms:
            ms_to_timestamp(result.membership_as_of_ms, response.membership_as_of)
        return response
