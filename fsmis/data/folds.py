"""Cross-validation folds and the support volume (docs/protocol.md §6).

Cases are sorted by id (:func:`~fsmis.data.case_ids.sort_case_ids`); boundaries
``sep[k] = round(k * N / n_folds)`` (Python's round, half to even; for the benchmark sizes
20, 30, 35 every boundary is an integer).

- canonical (SSL-ALPNet, corrected RPT): fold k queries ``cases[sep[k]:sep[k+1]]``; support
  ``cases[sep[k+1] % N]``; training = every case not queried in fold k (support included).
- legacy (ADNet family): fold k is the sorted set ``cases[sep[k]:sep[k+1]+1]`` (the last fold
  wraps to case 0); support = element ``supp_idx`` of that list (the published codes use 2:
  Q-Net, RPT, PAMI, GMRD, FAMNet; 3: CATNet; -1: ADNet); queries = the others; training
  excludes the whole fold.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .case_ids import sort_case_ids


@dataclass(frozen=True)
class Fold:
    fold: int
    support: str
    queries: tuple
    train: tuple
    protocol: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["queries"] = list(self.queries)
        d["train"] = list(self.train)
        return d


def fold_boundaries(n: int, n_folds: int = 5) -> list[int]:
    return [int(round(k * n / n_folds)) for k in range(n_folds + 1)]


def make_folds(case_ids, protocol: str = "canonical", supp_idx: int = 2, n_folds: int = 5) -> list[Fold]:
    cases = sort_case_ids(case_ids)
    n = len(cases)
    if n < 2:
        raise ValueError(f"need at least 2 cases for folds, got {n}")
    n_folds = min(n_folds, n)
    sep = fold_boundaries(n, n_folds)
    folds = []
    for k in range(n_folds):
        if protocol == "canonical":
            queries = cases[sep[k]:sep[k + 1]]
            support = cases[sep[k + 1] % n]
            train = [c for c in cases if c not in queries]
        elif protocol == "legacy":
            members = cases[sep[k]:sep[k + 1] + 1]
            if k == n_folds - 1:
                members = members + [cases[0]]
            members = sort_case_ids(set(members))
            if not -len(members) <= supp_idx < len(members):
                raise ValueError(f"supp_idx {supp_idx} is outside fold {k} of {len(members)} cases")
            support = members[supp_idx]
            queries = [c for c in members if c != support]
            train = [c for c in cases if c not in members]
        else:
            raise ValueError(f"unknown fold protocol {protocol!r} (canonical | legacy)")
        folds.append(Fold(k, support, tuple(queries), tuple(train), protocol))
    return folds


def split_validation(train_cases, support: str | None = None, n_val: int = 1) -> tuple[list, list]:
    """Hold ``n_val`` training cases out for checkpoint selection.

    The validation cases are the last ``n_val`` training cases in sorted order, never the fold's
    support case, so the choice is deterministic and documented. Returns (train, val).
    """
    cases = sort_case_ids(train_cases)
    if n_val <= 0:
        return cases, []
    pool = [c for c in cases if c != support]
    if len(pool) <= n_val:
        raise ValueError(f"cannot hold out {n_val} validation case(s) from {len(cases)} training cases")
    val = pool[-n_val:]
    return [c for c in cases if c not in val], val
