"""The rule store's interface: the protocol every backend satisfies, and its records.

:class:`RuleStore` is what the service, the rule and crowd indexes and the tools use;
:class:`RuleChange` and :class:`CrowdChange` are the entries of its two change feeds (which are
also its audit trails). The modules behind it, each with one concern:

* :mod:`pricing_service.rules.sql` - the SQL implementation's base (transactions, revision
  lock, schema), with its crowd half :mod:`~pricing_service.rules.crowd_store` and rule half
  :mod:`~pricing_service.rules.sql_store` (``SqlRuleStore``), shared by both backends;
* :mod:`pricing_service.rules.sqlite`, :mod:`pricing_service.rules.postgres` - the backends
  (transactions only);
* :mod:`pricing_service.rules.tokens` - page tokens of the listings;
* :mod:`pricing_service.rules.factory` - :func:`~pricing_service.rules.factory.open_rule_store`,
  the backend a URL names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from pricing_service.crowds import CrowdDef
from pricing_service.domain import CrowdKey, Rule

#: Actions of the rule feed.
UPSERT: Final = "UPSERT"
DELETE: Final = "DELETE"
#: Actions of the crowd feed (and ``DELETE``). ``MEMBERS``: a batch of list changes.
CREATE: Final = "CREATE"
MEMBERS: Final = "MEMBERS"


@dataclass(frozen=True, slots=True)
class RuleChange:
    """One entry of the change feed / audit trail.

    ``rule`` is the rule as written (UPSERT) or as it was when deleted (DELETE).
    """

    revision: int
    action: str
    rule: Rule
    actor: str
    change_ms: int

    @property
    def deleted(self) -> bool:
        return self.action == DELETE

    @property
    def rule_id(self) -> str:
        return self.rule.rule_id

    @property
    def item_id(self) -> str:
        return self.rule.item_id


@dataclass(frozen=True, slots=True)
class CrowdChange:
    """One entry of the crowds' change feed / audit trail. ``MEMBERS``: a batch of list
    changes through the API (``added``, ``removed`` buyers)."""

    revision: int
    action: str
    crowd: CrowdDef
    actor: str
    change_ms: int
    added: int = 0
    removed: int = 0


class RuleStore(Protocol):
    """Durable discount rules with a store-wide revision and a change feed."""

    async def migrate(self) -> list[int]:
        """Apply pending schema migrations; return the versions applied (idempotent)."""
        ...

    async def schema_version(self) -> int: ...

    async def upsert(self, rule: Rule, actor: str) -> tuple[Rule, bool]:
        """Create or replace the rule of (item, crowd); ``changed`` False for a no-op."""
        ...

    async def upsert_many(self, rules: Sequence[Rule], actor: str) -> list[Rule]:
        """Upsert all in one transaction: all or none."""
        ...

    async def get(self, rule_id: str) -> Rule: ...

    async def delete(self, rule_id: str, actor: str) -> int:
        """Delete; return the revision of the deletion (NotFoundError if unknown)."""
        ...

    async def list_rules(
        self, seller_id: str, item_id: str, page_size: int, page_token: str
    ) -> tuple[list[Rule], str]: ...

    async def rules_for_item(self, item_id: str) -> tuple[list[Rule], int]: ...

    async def current_revision(self) -> int: ...

    async def changes_since(self, revision: int, limit: int) -> list[RuleChange]: ...

    async def rules_for_items(self, item_ids: Sequence[str]) -> tuple[list[Rule], int]:
        """The rules of every named item and the revision they reflect (one snapshot)."""
        ...

    async def load_all(self, max_items: int | None = None) -> tuple[list[Rule], int]:
        """Every rule (or those of the first ``max_items + 1`` items by id) and the revision
        they reflect, from one snapshot: more than ``max_items`` items back means "there are
        more"."""
        ...

    async def history(
        self, seller_id: str, item_id: str, page_size: int, page_token: str
    ) -> tuple[list[RuleChange], str]: ...

    async def rules_with_crowds(
        self, item_id: str
    ) -> tuple[list[Rule], dict[CrowdKey, CrowdDef], int]: ...

    # seller-defined crowds (pricing_service.rules.crowd_store)
    async def create_crowd(self, crowd: CrowdDef, actor: str) -> CrowdDef: ...

    async def get_crowd(self, seller_id: str, crowd_id: str) -> CrowdDef: ...

    async def list_crowds(
        self, seller_id: str, page_size: int, page_token: str
    ) -> tuple[list[CrowdDef], str]: ...

    async def delete_crowd(self, seller_id: str, crowd_id: str, actor: str) -> int: ...

    async def record_member_change(
        self, seller_id: str, crowd_id: str, added: int, removed: int, actor: str
    ) -> int: ...

    async def crowd_history(
        self, seller_id: str, page_size: int, page_token: str
    ) -> tuple[list[CrowdChange], str]: ...

    async def crowd_revision(self) -> int: ...

    async def crowd_changes_since(self, revision: int, limit: int) -> list[CrowdChange]: ...

    async def load_crowds(self) -> tuple[list[CrowdDef], int]: ...

    async def close(self) -> None: ...
