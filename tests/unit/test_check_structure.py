"""The structure check of CI (``scripts/check_structure.py``) on in-memory modules: cycles (a
function-local one too), upward and cross-layer imports, forbidden imports, entry points, size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "check_structure", ROOT / "scripts" / "check_structure.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_structure", module)
    spec.loader.exec_module(module)
    return module


cs = _load()
LAYERS = ("app.top", "app.middle | app.side", "app.bottom", "app")


def mod(name: str, source: str = "", *, package: bool = False) -> object:
    return cs.Module(name, source, package)


def test_a_top_level_cycle_is_found() -> None:
    graph = cs.build_graph([mod("app.a", "import app.b\n"), mod("app.b", "from app import a\n")])
    (comp,) = cs.cycles(graph)
    assert comp == ["app.a", "app.b"]
    assert cs.cycle_path(graph, comp) == ["app.a", "app.b", "app.a"]


def test_a_cycle_through_a_function_local_import_is_found() -> None:
    graph = cs.build_graph(
        [
            mod(
                "app.store",
                "def open_store():\n    from app.sqlite import Sqlite\n    return Sqlite\n",
            ),
            mod("app.sqlite", "from app.store import RuleStore\n"),
        ]
    )
    assert cs.cycles(graph) == [["app.sqlite", "app.store"]]


def test_a_relative_and_a_type_checking_import_count() -> None:
    graph = cs.build_graph(
        [
            mod(
                "app.x",
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .y import Y\n",
            ),
            mod("app.y", "from . import x\n"),
            mod("app", "", package=True),
        ]
    )
    assert cs.cycles(graph) == [["app.x", "app.y"]]


def test_a_package_reexporting_its_submodules_is_no_cycle() -> None:
    graph = cs.build_graph(
        [
            mod("app.pkg", "from app.pkg.part import f\n", package=True),
            mod("app.pkg.part", "from app.pkg.other import g\n"),
            mod("app.pkg.other", "import app.pkg\n"),
        ]
    )
    assert cs.cycles(graph) == []


def test_no_cycle_in_a_layered_graph() -> None:
    graph = cs.build_graph(
        [
            mod("app.top", "import app.middle\n"),
            mod("app.middle", "from app.bottom import f\n"),
            mod("app.bottom"),
        ]
    )
    assert cs.cycles(graph) == []
    assert cs.layer_violations(graph, LAYERS) == []


def test_an_upward_import_is_flagged() -> None:
    graph = cs.build_graph(
        [mod("app.top"), mod("app.middle"), mod("app.bottom", "def f():\n    import app.top\n")]
    )
    (finding,) = cs.layer_violations(graph, LAYERS)
    assert "app.bottom (line 2) imports app.top, a layer above it" in finding


def test_independent_modules_of_one_layer_may_not_import_each_other() -> None:
    graph = cs.build_graph([mod("app.middle", "from app.side import s\n"), mod("app.side")])
    (finding,) = cs.layer_violations(graph, LAYERS)
    assert "independent" in finding


def test_a_module_that_no_layer_names_is_flagged() -> None:
    graph = cs.build_graph(
        [mod("app", package=True), mod("app.top"), mod("app.bottom.x"), mod("app.new_thing")]
    )
    # the last entry (the package itself) names only its __init__, not every module in it
    assert cs.layer_violations(graph, LAYERS) == ["layers: app.new_thing is in no layer"]


def test_forbidden_imports_are_flagged_even_to_modules_outside_the_scan() -> None:
    graph = cs.build_graph(
        [
            mod("pricing_service.pricing", "def f():\n    from sync_worker.consumer import C\n"),
            mod("sync_worker.consumer"),
            mod("pricing_testing.load", "from tests.conftest import x\n"),
            mod("bench.soak", "from pricing_testing.load import Load\n"),
        ]
    )
    found = cs.forbidden_imports(graph)
    assert any("pricing_service.pricing (line 2) imports sync_worker.consumer" in f for f in found)
    assert any("pricing_testing.load (line 1) imports tests.conftest" in f for f in found)
    assert not any(f.startswith("forbidden: bench.soak") for f in found)


def test_importing_an_entry_point_is_flagged() -> None:
    graph = cs.build_graph(
        [mod("w.__main__", "import w.parallel\n"), mod("w.parallel", "from w.__main__ import x\n")]
    )
    (finding,) = cs.entry_point_imports(graph)
    assert finding == "entry point: w.parallel (line 1) imports w.__main__"


@pytest.mark.parametrize(
    ("doc", "flagged"),
    [
        ('"""A module."""\n', True),
        ('"""A module.\n\nSize: one state machine, kept whole.\n"""\n', False),
    ],
)
def test_an_oversized_module_is_flagged_unless_its_docstring_says_why(
    doc: str, flagged: bool
) -> None:
    big = doc + "x = 1\n" * 600
    small = '"""Small."""\n' + "x = 1\n" * 10
    found = cs.oversized([cs.Module("app.big", big), cs.Module("app.small", small)], limit=500)
    assert [f.split(" has ")[0] for f in found] == (["size: app.big"] if flagged else [])
