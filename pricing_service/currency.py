"""ISO-4217 currencies and their minor-unit exponents.

The table is generated from the ``iso4217`` package (the maintenance agency's published list,
pinned in pyproject.toml) by ``scripts/gen_currencies.py``; ``tests/unit/test_currency.py``
fails when the committed table and the pinned package disagree. A code withdrawn from the list
(ANG, BGN) is refused; a new one (XCG, VED) is accepted once the pin moves past its
publication.
"""

from __future__ import annotations

from typing import Final

from pricing_service.iso4217_data import MINOR_UNITS, PUBLISHED, SOURCE

__all__ = ["MAX_AMOUNT_MINOR", "MINOR_UNITS", "PUBLISHED", "SOURCE", "is_known"]

#: Largest amount accepted anywhere (minor units): far above any real price, far below int64.
MAX_AMOUNT_MINOR: Final = 10**15


def is_known(code: str) -> bool:
    return code in MINOR_UNITS
