"""Opening the rule store: the backend ``PRICING_RULE_STORE_URL`` names, migrated.

The one module that knows both backends. Each is imported only when its URL is given, so a
SQLite deployment never loads the PostgreSQL driver (nothing below imports this module).
"""

from __future__ import annotations

from pricing_service.config import Settings
from pricing_service.domain import Clock
from pricing_service.errors import ConfigError
from pricing_service.rules.sql_store import SqlRuleStore


async def open_rule_store(
    settings: Settings, *, clock: Clock | None = None, migrate: bool = True
) -> SqlRuleStore:
    """Open the backend named by ``settings.rule_store_url``; apply migrations unless told not."""
    url = settings.rule_store_url
    store: SqlRuleStore
    if url.startswith("sqlite:///"):
        from pricing_service.rules.sqlite import SqliteRuleStore  # noqa: PLC0415 (see above)

        store = await SqliteRuleStore.open(settings, clock)
    elif url.startswith(("postgresql://", "postgres://")):
        from pricing_service.rules.postgres import PostgresRuleStore  # noqa: PLC0415 (see above)

        store = await PostgresRuleStore.open(settings, clock)
    else:
        raise ConfigError(f"PRICING_RULE_STORE_URL: unsupported scheme in {url!r}")
    if migrate:
        try:
            await store.migrate()
        except BaseException:
            await store.close()
            raise
    return store
