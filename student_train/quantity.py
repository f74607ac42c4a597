"""Numbers with a unit on the command line: counts such as 30M (decimal), sizes such as 256MB
(binary)."""

from __future__ import annotations

import re
from collections.abc import Mapping

COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}
SIZE_UNITS = {"": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_quantity(text: str, units: Mapping[str, int]) -> tuple[float, str] | None:
    """(the number, its unit: a key of `units`, "" for none) of `text`, or None where `text` is
    not a non-negative number followed by one of `units` (any case)."""
    match = _QUANTITY.match(str(text))
    if match is None or match[2].upper() not in units:
        return None
    return float(match[1]), match[2].upper()
