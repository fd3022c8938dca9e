"""Rule store locations for tests: a SQLite file in a temp dir, or a fresh PostgreSQL schema.

Each PostgreSQL test gets a schema of its own (``search_path`` set in the connection URL), so
parallel runs never collide; the schema is dropped afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import psycopg

from pricing_service.config import Settings

BACKENDS = ("sqlite", "postgresql")


def with_search_path(pg_url: str, schema: str) -> str:
    sep = "&" if "?" in pg_url else "?"
    return f"{pg_url}{sep}options={quote(f'-csearch_path={schema}')}"


@contextmanager
def pg_schema(pg_url: str, prefix: str = "rules_test_") -> Iterator[str]:
    """A fresh schema (``prefix`` and a random suffix); yields a URL whose connections use it."""
    schema = f"{prefix}{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield with_search_path(pg_url, schema)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def sqlite_url(directory: Path, name: str = "rules.db") -> str:
    return f"sqlite:///{directory / name}"


def settings_for(url: str, **overrides: object) -> Settings:
    return Settings(rule_store_url=url, **overrides)  # type: ignore[arg-type]
