"""Rule index benchmark: memory held, complete against bounded, and what a miss costs.

    python -m bench.rule_index [--store sqlite|postgresql] [--items 200000] [--max-items 50000]
                               [--pages 5000] [--zipf 1.0]

Writes ``--items`` items with three rules each (one per crowd kind) through the store's own
``upsert_many`` (batches of 1,000), then, in fresh OS processes (so RSS is the index's and the
interpreter's, nothing of the writer's):

1. *complete*: a RuleIndex with ``max_items`` above the catalogue (every rule held, no misses);
2. *bounded*: a RuleIndex with ``--max-items``; pages of 20 items drawn from a Zipf
   distribution over the catalogue (exponent ``--zipf``: a few items are popular, most are
   not) go through lookup + fetch of the misses exactly as BatchGetLowestPrice does; then
   pages of 20 never-seen items (all misses: the cost of one cold page).

Each child reports RSS after start-up and after loading, load time, items held, and (bounded)
hit ratio and page lookup latency (p50/p99) including the store reads of misses. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import time

from bench.harness import percentile, rss_kb
from bench.rules import DEFAULT_PG, rule, store_location
from pricing_service.config import load_settings
from pricing_service.domain import SystemClock
from pricing_service.logging import configure_logging
from pricing_service.rules.factory import open_rule_store
from pricing_service.rules.index import RuleIndex

PAGE = 20


def rss_mb() -> float:
    return rss_kb() / 1024


async def populate(url: str, items: int) -> float:
    store = await open_rule_store(load_settings(rule_store_url=url))
    start = time.perf_counter()
    try:
        rules = items * 3
        for base in range(0, rules, 1000):
            await store.upsert_many(
                [rule(n, 1000 + n % 900) for n in range(base, min(base + 1000, rules))], "bench"
            )
    finally:
        await store.close()
    return time.perf_counter() - start


async def child(url: str, max_items: int, items: int, pages: int, zipf: float) -> dict[str, object]:
    configure_logging("WARNING", "json")
    settings = load_settings(rule_store_url=url, rule_index_max_items=max_items)
    store = await open_rule_store(settings, migrate=False)
    out: dict[str, object] = {"max_items": max_items, "rss_start_mb": round(rss_mb(), 1)}
    index = RuleIndex(store, settings, SystemClock())
    start = time.perf_counter()
    await index.load()
    out |= {
        "load_s": round(time.perf_counter() - start, 2),
        "rss_loaded_mb": round(rss_mb(), 1),
        "items_held": index.items,
        "rules_held": len(index),
        "complete": index.complete,
    }
    if pages:
        rng = random.Random(7)
        weights = list(itertools.accumulate(1 / (k + 1) ** zipf for k in range(items)))
        order = list(range(items))
        rng.shuffle(order)  # popularity is not the id order the start-up load follows

        async def page(ids: list[str]) -> float:
            t = time.perf_counter()
            found = index.lookup(ids)
            missing = [i for i, r in zip(ids, found, strict=True) if r is None]
            if missing:
                await index.fetch(missing)
            return time.perf_counter() - t

        warm = [
            [f"item-{order[k]}" for k in rng.choices(range(items), cum_weights=weights, k=PAGE)]
            for _ in range(pages)
        ]
        for ids in warm[: pages // 5]:  # warm-up: the popular items settle in
            await page(ids)
        hits0, misses0 = index.hits, index.misses
        times = [await page(ids) for ids in warm[pages // 5 :]]
        looked = index.hits - hits0 + index.misses - misses0
        cold = [await page([f"cold-{n}-{k}" for k in range(PAGE)]) for n in range(500)]
        out |= {
            "zipf": zipf,
            "hit_ratio": round((index.hits - hits0) / looked, 4),
            "page_p50_ms": round(percentile(times, 50) * 1000, 3),
            "page_p99_ms": round(percentile(times, 99) * 1000, 3),
            "cold_page_p50_ms": round(percentile(cold, 50) * 1000, 3),
            "cold_page_p99_ms": round(percentile(cold, 99) * 1000, 3),
            "items_held_end": index.items,
            "evictions": index.evictions,
            "rss_end_mb": round(rss_mb(), 1),
        }
    await store.close()
    return out


def run_child(url: str, max_items: int, items: int, pages: int, zipf: float) -> dict[str, object]:
    args = [sys.executable, "-m", "bench.rule_index", "--child", url]
    args += ["--max-items", str(max_items), "--items", str(items), "--pages", str(pages)]
    args += ["--zipf", str(zipf)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--pg-url", default=DEFAULT_PG)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--max-items", type=int, default=50_000)
    ap.add_argument("--pages", type=int, default=5_000)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(asyncio.run(child(a.child, a.max_items, a.items, a.pages, a.zipf))))
        return
    with store_location(a.store, a.pg_url) as url:
        populate_s = asyncio.run(populate(url, a.items))
        print(f"populated {a.items} items ({a.items * 3} rules) in {populate_s:.1f} s", flush=True)
        complete = run_child(url, a.items * 2, a.items, 0, a.zipf)
        print("complete:", json.dumps(complete), flush=True)
        bounded = run_child(url, a.max_items, a.items, a.pages, a.zipf)
        print("bounded:", json.dumps(bounded), flush=True)

    def index_mb(r: dict[str, object]) -> float:
        return float(str(r["rss_loaded_mb"])) - float(str(r["rss_start_mb"]))

    print(
        json.dumps(
            {
                "bench": "rule_index",
                "store": a.store,
                "items": a.items,
                "rules": a.items * 3,
                "max_items": a.max_items,
                "complete_index_mb": round(index_mb(complete), 1),
                "bounded_index_mb": round(index_mb(bounded), 1),
                "bounded_rss_end_mb": bounded["rss_end_mb"],
                "bytes_per_item": round(index_mb(complete) * 2**20 / a.items),
                "hit_ratio": bounded["hit_ratio"],
                "page_p50_ms": bounded["page_p50_ms"],
                "page_p99_ms": bounded["page_p99_ms"],
                "cold_page_p50_ms": bounded["cold_page_p50_ms"],
                "cold_page_p99_ms": bounded["cold_page_p99_ms"],
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
