"""The rule command-line tools against a real SQLite store (and the console entry point)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from pathlib import Path

import pytest

from pricing_service.config import Settings
from pricing_service.domain import CrowdKind, Money
from pricing_service.errors import FailedPreconditionError, InvalidArgumentError
from pricing_service.rules import cli
from pricing_service.rules.factory import open_rule_store
from pricing_service.rules.migrations import LATEST_VERSION
from pricing_testing.rule_stores import settings_for, sqlite_url

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_for(sqlite_url(tmp_path))


async def stored(settings: Settings) -> tuple[dict[str, Money], int]:
    store = await open_rule_store(settings)
    try:
        rules, revision = await store.load_all()
    finally:
        await store.close()
    return {f"{r.item_id}/{r.kind.name.lower()}": r.price for r in rules}, revision


async def test_migrate_is_idempotent(settings: Settings) -> None:
    out = io.StringIO()
    assert await cli.migrate(settings, out) == 0
    assert f"applied migrations [1, 2]; schema version {LATEST_VERSION}" in out.getvalue()
    out = io.StringIO()
    assert await cli.migrate(settings, out) == 0
    assert "up to date" in out.getvalue()


async def test_import_json_lines_sets_one_price_for_many_items(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "prices.jsonl"
    lines = [
        {"seller_id": "42", "item_id": f"sku-{n}", "crowd": "old_fans", "price": "18.88",
         "currency": "CNY"}
        for n in range(250)
    ]  # fmt: skip
    lines[0]["end_time"] = "2030-01-01T00:00:00Z"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = io.StringIO()
    assert await cli.import_rules(settings, path, "ops", out) == 0
    assert "imported 250 rules for seller(s) 42: 250 changed" in out.getvalue()
    prices, revision = await stored(settings)
    assert revision == 250
    assert set(prices.values()) == {Money("CNY", 1888)}
    # again: nothing changes
    out = io.StringIO()
    assert await cli.import_rules(settings, path, "ops", out) == 0
    assert "0 changed, 250 already up to date; store revision 250" in out.getvalue()


async def test_import_csv_and_json_numbers_are_exact(settings: Settings, tmp_path: Path) -> None:
    csv_path = tmp_path / "prices.csv"
    csv_path.write_text(
        "seller_id,item_id,crowd,price,currency\n"
        "42,a,all_fans,0.10,USD\n"
        "42,b,PURCHASED_FANS,1999,JPY\n"
        "42,c,old_fans,1.234,KWD\n"
    )
    assert await cli.import_rules(settings, csv_path, "ops", io.StringIO()) == 0
    json_path = tmp_path / "more.json"
    json_path.write_text(
        '{"seller_id": "42", "item_id": "d", "crowd": 1, "price": 0.29, "currency": "EUR"}\n'
    )
    assert await cli.import_rules(settings, json_path, "ops", io.StringIO()) == 0
    prices, _ = await stored(settings)
    assert prices == {
        "a/all_fans": Money("USD", 10),
        "b/purchased_fans": Money("JPY", 1999),
        "c/old_fans": Money("KWD", 1234),
        "d/all_fans": Money("EUR", 29),  # 0.29 parsed as a decimal, not a float
    }


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("seller_id,item_id,crowd,price,currency\n42,a,all_fans,18.888,CNY\n",
         "line 2.price: PRICE_TOO_PRECISE"),
        ("seller_id,item_id,crowd,price,currency\n42,a,all_fans,18.8,JPY\n",
         "line 2.price: PRICE_TOO_PRECISE"),
        ("seller_id,item_id,crowd,price,currency\n42,a,all_fans,abc,CNY\n",
         "line 2.price: INVALID_PRICE"),
        ("seller_id,item_id,crowd,price,currency\n42,a,all_fans,0,CNY\n",
         "line 2.price.amount_minor: ZERO_PRICE"),
        ("seller_id,item_id,crowd,price,currency\n42,a,all_fans,-1,CNY\n",
         "line 2.price.amount_minor: NEGATIVE_PRICE"),
        ("seller_id,item_id,crowd,price,currency\n42,a,all_fans,1,ABC\n",
         "line 2.currency: UNKNOWN_CURRENCY"),
        ("seller_id,item_id,crowd,price,currency\n42,a,everyone,1,CNY\n",
         "rules[0].crowd_id: CROWD_NOT_FOUND"),  # not built in: the seller has no such crowd
        ("seller_id,item_id,crowd,price,currency\n42,a,Every One,1,CNY\n",
         "line 2.crowd_id: INVALID_CROWD_ID"),
        ("seller_id,item_id,crowd,price,currency\n42,a,CROWD_KIND_EVERYONE,1,CNY\n",
         "line 2.crowd: INVALID_CROWD"),
        ("seller_id,item_id,crowd,price,currency\n42,,all_fans,1,CNY\n",
         "line 2.item_id: MISSING_ID"),
        ("seller_id,item_id,crowd,price,currency,colour\n42,a,all_fans,1,CNY,red\n",
         "line 2.colour: UNKNOWN_FIELD"),
        ("seller_id,item_id,crowd,price,currency\n42,a,all_fans,1,CNY,extra\n",
         "line 2: MALFORMED_ROW"),
        ('{"seller_id": "42", "item_id": "a", "crowd": "all_fans", "price": "1", "currency": "CNY",'
         ' "start_time": "2030-01-01T00:00:00Z", "end_time": "2029-01-01T00:00:00Z"}\n',
         "line 1.end_time: EMPTY_VALIDITY_WINDOW"),
        ('{"seller_id": "42", "item_id": "a", "crowd": "all_fans", "price": "1", "currency": "CNY",'
         ' "start_time": "2030-01-01T00:00:00"}\n',
         "line 1.start_time: INVALID_TIME"),
        ('{"seller_id": "42", "item_id": "a"\n', "line 1: MALFORMED_ROW: not JSON"),
    ],
)  # fmt: skip
async def test_import_refuses_bad_rows_and_writes_nothing(
    settings: Settings, tmp_path: Path, content: str, expected: str
) -> None:
    if content.startswith("seller_id"):  # a valid row after the bad one: still nothing written
        path = tmp_path / "rows.csv"
        extra = ",red" if "colour" in content else ""
        path.write_text(content + f"42,ok,all_fans,1,CNY{extra}\n")
    else:
        path = tmp_path / "rows.jsonl"
        path.write_text(content)
    out = io.StringIO()
    assert await cli.import_rules(settings, path, "ops", out) == 1
    assert "nothing written" in out.getvalue()
    assert expected in out.getvalue(), out.getvalue()
    assert await stored(settings) == ({}, 0)


async def test_import_is_atomic_against_store_preconditions(
    settings: Settings, tmp_path: Path
) -> None:
    await cli.upsert_rule(
        settings, seller_id="7", item_id="taken", crowd="all_fans", price="1", currency="CNY",
        out=io.StringIO(),
    )  # fmt: skip
    path = tmp_path / "rows.csv"
    path.write_text(
        "seller_id,item_id,crowd,price,currency\n"
        + "".join(f"42,free-{n},all_fans,2.50,CNY\n" for n in range(50))
        + "42,taken,old_fans,2.50,CNY\n"
    )
    out = io.StringIO()
    assert await cli.import_rules(settings, path, "ops", out) == 1
    assert "rules[50].item_id: ITEM_OWNED_BY_OTHER_SELLER" in out.getvalue()
    prices, revision = await stored(settings)
    assert revision == 1 and list(prices) == ["taken/all_fans"]


async def test_import_of_a_missing_or_empty_file(settings: Settings, tmp_path: Path) -> None:
    out = io.StringIO()
    assert await cli.import_rules(settings, tmp_path / "nope.csv", "ops", out) == 1
    assert "cannot read" in out.getvalue()
    (tmp_path / "empty.jsonl").write_text("\n")
    out = io.StringIO()
    assert await cli.import_rules(settings, tmp_path / "empty.jsonl", "ops", out) == 1
    assert "holds no rules" in out.getvalue()


async def test_upsert_and_list(settings: Settings) -> None:
    out = io.StringIO()
    code = await cli.upsert_rule(
        settings, seller_id="42", item_id="1234", crowd="all_fans", price="18.88",
        currency="CNY", end="2031-01-01T00:00:00+08:00", actor="me", out=out,
    )  # fmt: skip
    assert code == 0
    printed = json.loads(out.getvalue())
    assert printed["amount_minor"] == 1888 and printed["price"] == "18.88"
    assert printed["end_ms"] == 1924963200000
    with pytest.raises(InvalidArgumentError) as err:
        await cli.upsert_rule(
            settings, seller_id="42", item_id="1234", crowd="all_fans", price="18.885",
            currency="CNY", out=io.StringIO(),
        )  # fmt: skip
    assert err.value.reason == "PRICE_TOO_PRECISE"
    with pytest.raises(FailedPreconditionError):
        await cli.upsert_rule(
            settings, seller_id="9", item_id="1234", crowd="old_fans", price="1",
            currency="CNY", out=io.StringIO(),
        )  # fmt: skip
    await cli.upsert_rule(
        settings, seller_id="42", item_id="1234", crowd="old_fans", price="17",
        currency="CNY", out=io.StringIO(),
    )  # fmt: skip
    out = io.StringIO()
    assert await cli.list_rules(settings, seller_id="42", out=out) == 0
    listed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["crowd"], x["price"]) for x in listed] == [
        ("all_fans", "18.88"),
        ("old_fans", "17.00"),
    ]
    out = io.StringIO()
    await cli.list_rules(settings, seller_id="nobody", out=out)
    assert out.getvalue() == ""
    prices, _ = await stored(settings)
    assert prices["1234/old_fans"] == Money("CNY", 1700)
    assert CrowdKind.OLD_FANS.name == "OLD_FANS"


async def test_console_command_imports_a_file(settings: Settings, tmp_path: Path) -> None:
    """``pricing-service rules import FILE`` as an operator runs it (the lead's entry point)."""
    path = tmp_path / "prices.csv"
    path.write_text("seller_id,item_id,crowd,price,currency\n42,x,all_fans,9.99,USD\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICING_")}
    env["PRICING_RULE_STORE_URL"] = settings.rule_store_url
    env["PRICING_LOG_FORMAT"] = "json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pricing_service", "rules", "import", str(path),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, output.decode()
    assert b"imported 1 rules" in output
    prices, _ = await stored(settings)
    assert prices == {"x/all_fans": Money("USD", 999)}
