"""fsmis.data.folds: canonical and legacy folds against the published lists (docs/protocol.md §6).

The expected lists are written out by hand from docs/protocol.md §6:
  sep = [round(k N / 5)]: CHAOS 0,4,8,12,16,20; SABS 0,6,...,30; CMR 0,7,...,35.
  canonical fold k: queries cases[sep[k]:sep[k+1]], support cases[sep[k+1] % N].
  legacy fold k: sorted cases[sep[k]:sep[k+1]+1] (fold 4 wraps to case 0), support = element
  supp_idx (2, 3 or -1) of that list, the others are queries.
"""
from __future__ import annotations

import random

import pytest

from fsmis.data.folds import fold_boundaries, make_folds, split_validation

CHAOS = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39]
SABS = list(range(30))
CMR = list(range(1, 36))

# (queries, support) per fold
CANONICAL = {
    "CHAOS": [
        ([1, 2, 3, 5], 8),
        ([8, 10, 13, 15], 19),
        ([19, 20, 21, 22], 31),
        ([31, 32, 33, 34], 36),
        ([36, 37, 38, 39], 1),
    ],
    "SABS": [
        ([0, 1, 2, 3, 4, 5], 6),
        ([6, 7, 8, 9, 10, 11], 12),
        ([12, 13, 14, 15, 16, 17], 18),
        ([18, 19, 20, 21, 22, 23], 24),
        ([24, 25, 26, 27, 28, 29], 0),
    ],
    "CMR": [
        ([1, 2, 3, 4, 5, 6, 7], 8),
        ([8, 9, 10, 11, 12, 13, 14], 15),
        ([15, 16, 17, 18, 19, 20, 21], 22),
        ([22, 23, 24, 25, 26, 27, 28], 29),
        ([29, 30, 31, 32, 33, 34, 35], 1),
    ],
}

# legacy: fold members (sorted) and the support for supp_idx 2, 3, -1
LEGACY = {
    "CHAOS": [
        ([1, 2, 3, 5, 8], {2: 3, 3: 5, -1: 8}),
        ([8, 10, 13, 15, 19], {2: 13, 3: 15, -1: 19}),
        ([19, 20, 21, 22, 31], {2: 21, 3: 22, -1: 31}),
        ([31, 32, 33, 34, 36], {2: 33, 3: 34, -1: 36}),
        ([1, 36, 37, 38, 39], {2: 37, 3: 38, -1: 39}),
    ],
    "SABS": [
        ([0, 1, 2, 3, 4, 5, 6], {2: 2, 3: 3, -1: 6}),
        ([6, 7, 8, 9, 10, 11, 12], {2: 8, 3: 9, -1: 12}),
        ([12, 13, 14, 15, 16, 17, 18], {2: 14, 3: 15, -1: 18}),
        ([18, 19, 20, 21, 22, 23, 24], {2: 20, 3: 21, -1: 24}),
        ([0, 24, 25, 26, 27, 28, 29], {2: 25, 3: 26, -1: 29}),
    ],
    "CMR": [
        ([1, 2, 3, 4, 5, 6, 7, 8], {2: 3, 3: 4, -1: 8}),
        ([8, 9, 10, 11, 12, 13, 14, 15], {2: 10, 3: 11, -1: 15}),
        ([15, 16, 17, 18, 19, 20, 21, 22], {2: 17, 3: 18, -1: 22}),
        ([22, 23, 24, 25, 26, 27, 28, 29], {2: 24, 3: 25, -1: 29}),
        ([1, 29, 30, 31, 32, 33, 34, 35], {2: 30, 3: 31, -1: 35}),
    ],
}
CASES = {"CHAOS": CHAOS, "SABS": SABS, "CMR": CMR}


def _s(ids):
    return [str(i) for i in ids]


def _shuffled(ids, seed=0):
    ids = [str(i) for i in ids]
    random.Random(seed).shuffle(ids)
    return ids


def test_boundaries():
    assert fold_boundaries(20) == [0, 4, 8, 12, 16, 20]
    assert fold_boundaries(30) == [0, 6, 12, 18, 24, 30]
    assert fold_boundaries(35) == [0, 7, 14, 21, 28, 35]


@pytest.mark.parametrize("bench", sorted(CASES))
def test_canonical_folds_equal_published_lists(bench):
    cases = CASES[bench]
    folds = make_folds(_shuffled(cases), "canonical")
    assert len(folds) == 5
    for k, (fold, (queries, support)) in enumerate(zip(folds, CANONICAL[bench])):
        assert fold.fold == k and fold.protocol == "canonical"
        assert list(fold.queries) == _s(queries)
        assert fold.support == str(support)
        # training: every case not queried in this fold, support included
        assert list(fold.train) == _s([c for c in cases if c not in queries])
        assert fold.support in fold.train
        assert not set(fold.train) & set(fold.queries)
    # every case queried exactly once
    queried = [q for f in folds for q in f.queries]
    assert sorted(queried, key=int) == _s(cases)
    assert len(queried) == len(set(queried))


@pytest.mark.parametrize("bench", sorted(CASES))
@pytest.mark.parametrize("supp_idx", [2, 3, -1])
def test_legacy_folds_equal_published_lists(bench, supp_idx):
    cases = CASES[bench]
    folds = make_folds(_shuffled(cases, seed=1), "legacy", supp_idx=supp_idx)
    assert len(folds) == 5
    for k, (fold, (members, supports)) in enumerate(zip(folds, LEGACY[bench])):
        assert fold.fold == k and fold.protocol == "legacy"
        assert fold.support == str(supports[supp_idx])
        assert list(fold.queries) == _s([m for m in members if m != supports[supp_idx]])
        # training excludes the whole fold (support included)
        assert list(fold.train) == _s([c for c in cases if c not in members])
        assert fold.support not in fold.train


def test_legacy_queries_some_cases_twice_and_some_never():
    folds = make_folds(_s(CHAOS), "legacy", supp_idx=2)
    counts = {c: 0 for c in _s(CHAOS)}
    for f in folds:
        for q in f.queries:
            counts[q] += 1
    assert {c for c, n in counts.items() if n == 0} == {"3", "13", "21", "33", "37"}
    assert {c for c, n in counts.items() if n == 2} == {"1", "8", "19", "31", "36"}


def test_int_and_string_ids_give_the_same_folds():
    a = make_folds(CHAOS, "canonical")
    b = make_folds(_shuffled(CHAOS, 5), "canonical")
    assert [f.to_dict() for f in a] == [f.to_dict() for f in b]
    assert a[4].to_dict()["queries"] == ["36", "37", "38", "39"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_folds(_s(CHAOS), "sideways")
    with pytest.raises(ValueError):
        make_folds(_s(CHAOS), "legacy", supp_idx=5)  # folds have 5 members: 0..4
    with pytest.raises(ValueError):
        make_folds(["1"])


def test_split_validation_holds_out_a_non_support_case_deterministically():
    fold = make_folds(_s(CMR), "canonical")[4]  # support 1, train 1..28
    assert fold.support == "1"
    train, val = split_validation(_shuffled(fold.train, 3), support=fold.support)
    assert val == ["28"]
    assert train == _s(range(1, 28))
    again = split_validation(_shuffled(fold.train, 9), support=fold.support)
    assert again == (train, val)

    # the last case is the support: the case before it is held out instead
    fold0 = make_folds(_s(SABS), "canonical")[3]  # queries 18..23, support 24, train 0..17 + 24..29
    train, val = split_validation(fold0.train, support="29")
    assert val == ["28"] and "29" in train
    train, val = split_validation(fold0.train, support=fold0.support, n_val=2)
    assert val == ["28", "29"]
    assert fold0.support in train
    assert sorted(train + val, key=int) == sorted(fold0.train, key=int)
    assert not set(train) & set(val)

    assert split_validation(["3", "1", "2"], support="2", n_val=0) == (["1", "2", "3"], [])
    with pytest.raises(ValueError):
        split_validation(["1"], support="1", n_val=1)  # nothing but the support


def test_sort_case_ids_numeric_only_when_all_digits():
    from fsmis.data.case_ids import sort_case_ids

    assert sort_case_ids([10, "2", "1"]) == ["1", "2", "10"]
    assert sort_case_ids(["10", "2", "a"]) == ["10", "2", "a"]
    assert sort_case_ids([]) == []
