"""Chroma-style `where` filters on metadata dicts, as `VectorIndex.search` takes them.

>>> match = compile_where({"team": "hr", "year": {"$gte": 2024}})
>>> match({"team": "hr", "year": 2025}), match({"team": "hr"})
(True, False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin")


def compile_where(where: dict) -> Callable[[dict], bool]:
    """Turn a Chroma-style filter into a predicate on a metadata dict.

    ``{"field": value}``, ``{"field": {"$eq|$ne|$gt|$gte|$lt|$lte|$in|$nin": v}}``, ``{"$and": [...]}``,
    ``{"$or": [...]}``; several fields in one dict must all match. A record without the field never matches.

    >>> compile_where({"$or": [{"year": {"$gte": 2024}}, {"team": "hr"}]})({"year": 2023, "team": "hr"})
    True
    """
    if not isinstance(where, dict) or not where:
        raise ValueError(f"a where filter must be a non-empty dict, got {where!r}")
    parts = []
    for key, cond in where.items():
        if key in ("$and", "$or"):
            if not isinstance(cond, list) or not cond:
                raise ValueError(f"{key} needs a non-empty list of filters, got {cond!r}")
            subs = [compile_where(c) for c in cond]
            combine = all if key == "$and" else any
            parts.append(lambda m, subs=subs, combine=combine: combine(s(m) for s in subs))
        elif key.startswith("$"):
            raise ValueError(f"unknown operator {key!r} at the top of a where filter: use $and or $or")
        elif isinstance(cond, dict):
            if len(cond) != 1:
                raise ValueError(f"give exactly one operator for field {key!r}, got {cond!r}")
            ((op, value),) = cond.items()
            parts.append(_field_test(key, op, value))
        else:
            parts.append(_field_test(key, "$eq", cond))
    return parts[0] if len(parts) == 1 else lambda m: all(p(m) for p in parts)


def _field_test(field: str, op: str, value: Any) -> Callable[[dict], bool]:
    if op not in OPERATORS:
        raise ValueError(f"unknown operator {op!r} for field {field!r}; known: {', '.join(OPERATORS)}")
    missing = object()
    if op in ("$in", "$nin"):
        if not isinstance(value, (list, tuple, set)):
            raise ValueError(f"{op} needs a list of values for field {field!r}, got {value!r}")
        values = list(value)
        if op == "$in":
            return lambda m: (v := m.get(field, missing)) is not missing and v in values
        return lambda m: (v := m.get(field, missing)) is not missing and v not in values
    if op == "$eq":
        return lambda m: (v := m.get(field, missing)) is not missing and v == value
    if op == "$ne":
        return lambda m: (v := m.get(field, missing)) is not missing and v != value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{op} compares numbers or strings; got {value!r} for field {field!r}")
    compare = {"$gt": float.__gt__, "$gte": float.__ge__, "$lt": float.__lt__, "$lte": float.__le__}[op]
    if isinstance(value, str):
        compare = {"$gt": str.__gt__, "$gte": str.__ge__, "$lt": str.__lt__, "$lte": str.__le__}[op]
        return lambda m: isinstance(v := m.get(field), str) and compare(v, value)
    value = float(value)
    return lambda m: (
        isinstance(v := m.get(field), (int, float)) and not isinstance(v, bool) and compare(float(v), value)
    )
