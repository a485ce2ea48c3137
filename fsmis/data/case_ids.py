"""The one ordering of case ids used everywhere (dataset discovery, folds, preparation)."""
from __future__ import annotations


def sort_case_ids(case_ids) -> list[str]:
    """Case ids as strings, sorted numerically when every id is all digits ("2" < "10"),
    otherwise as strings."""
    ids = [str(c) for c in case_ids]
    if all(i.isdigit() for i in ids):
        return sorted(ids, key=int)
    return sorted(ids)
