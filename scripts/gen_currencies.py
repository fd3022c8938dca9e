#!/usr/bin/env python3
"""Regenerates ``pricing_service/iso4217_data.py`` from the ``iso4217`` package (PyPI).

    python scripts/gen_currencies.py          # rewrite the module
    python scripts/gen_currencies.py --check  # exit 1 when the committed module differs

The package ships the ISO 4217 maintenance agency's published list (``table.xml``, "List
One"); its version carries the publication date. The service accepts every code of that list
with a numeric minor unit that is not a fund (``IsFund``: BOV, CHE, CHW, CLF, COU, MXV, USN,
UYI): precious metals, SDR, test and "no currency" codes (minor unit ``N.A.``) are no price
currencies. ``tests/unit/test_currency.py`` checks the committed module against the installed
(pinned) package, so updating the table is: bump the pin in pyproject.toml, run this script,
commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parent.parent / "pricing_service" / "iso4217_data.py"


def minor_units() -> tuple[str, str, dict[str, int]]:
    """(package version, publication date, code -> minor-unit exponent)."""
    import iso4217  # noqa: PLC0415

    table: dict[str, int] = {}
    for entry in iso4217.raw_xml.findall("CcyTbl/CcyNtry"):
        code, name, units = (entry.find(t) for t in ("Ccy", "CcyNm", "CcyMnrUnts"))
        if code is None or name is None or units is None or code.text is None:
            continue  # a territory without a universal currency (Antarctica)
        if name.get("IsFund") or not (units.text or "").strip().isdigit():
            continue
        table[code.text.strip()] = int((units.text or "").strip())
    return iso4217.__version__, iso4217.__published__.isoformat(), dict(sorted(table.items()))


def render() -> str:
    version, published, table = minor_units()
    lines = [
        '"""ISO 4217 currencies and their minor-unit exponents: generated, do not edit.',
        "",
        f"Source: the ``iso4217`` package {version} (PyPI), the maintenance agency's list",
        f"published {published}; funds and codes without a minor unit left out.",
        'Regenerate with ``python scripts/gen_currencies.py``."""',
        "",
        "from typing import Final",
        "",
        f'SOURCE: Final = "iso4217 {version}"',
        f'PUBLISHED: Final = "{published}"',
        "",
        "#: code -> number of decimal places of the minor unit",
        "MINOR_UNITS: Final[dict[str, int]] = {",
    ]
    row: list[str] = []
    for code, exp in table.items():
        row.append(f'"{code}": {exp},')
        if len(row) == 9:
            lines.append("    " + " ".join(row))
            row = []
    if row:
        lines.append("    " + " ".join(row))
    lines.append("}  # fmt: skip")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET} is stale: run python scripts/gen_currencies.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
