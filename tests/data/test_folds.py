"""Cross-validation folds over annotated cases with every class in at least two folds (nnActive's rule).

The checks below count classes per fold themselves (``_class_folds``); they do not use the module's own
``short_classes`` except where that function is the thing under test.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from alseg.data.folds import cross_validation_folds, fold_generator, nnunet_splits, short_classes

# classes 1..4; 1 and 2 common, 3 in two cases only, 4 in one case only
CASES = {
    "a": {1, 2},
    "b": {1},
    "c": {2, 3},
    "d": set(),
    "e": {1, 2},
    "f": {3},
    "g": {2},
    "h": {1, 4},
    "i": set(),
    "j": {1, 2},
    "k": {2},
}


def _class_folds(folds: list[list[str]], cases: dict[str, set[int]]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for j, fold in enumerate(folds):
        for cid in fold:
            for c in cases[cid]:
                out.setdefault(c, set()).add(j)
    return out


def _assert_partition(folds: list[list[str]], cases: dict[str, set[int]], k: int) -> None:
    assert len(folds) == k
    assert all(fold for fold in folds), folds
    assert all(fold == sorted(fold) for fold in folds)
    flat = [cid for fold in folds for cid in fold]
    assert sorted(flat) == sorted(cases)  # every case in exactly one fold
    assert len(flat) == len(set(flat))


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("seed", range(6))
def test_partition_and_every_class_of_two_cases_in_two_folds(k: int, seed: int) -> None:
    folds = cross_validation_folds(CASES, k, fold_generator(seed))
    _assert_partition(folds, CASES, k)
    per_class = _class_folds(folds, CASES)
    for c in (1, 2, 3):  # in >= 2 cases each
        assert len(per_class[c]) >= 2, (c, folds)
    assert len(per_class[4]) == 1  # one case: one fold, no error
    sizes = sorted(len(f) for f in folds)
    assert sizes[-1] - sizes[0] <= 1, sizes  # 11 cases: as equal as possible


def test_member_training_sets_hold_every_class_of_two_cases() -> None:
    folds = cross_validation_folds(CASES, 5, fold_generator(11))
    for k, split in enumerate(nnunet_splits(folds)):
        held = set().union(*(CASES[cid] for cid in split["train"]))
        assert {1, 2, 3} <= held, (k, split)


def test_deterministic_per_seed_and_independent_of_mapping_order() -> None:
    first = cross_validation_folds(CASES, 5, fold_generator(7))
    again = cross_validation_folds(dict(reversed(list(CASES.items()))), 5, fold_generator(7))
    assert first == again
    others = {str(cross_validation_folds(CASES, 5, fold_generator(s))) for s in range(10)}
    assert len(others) > 1  # the seed matters


def test_a_split_the_naive_greedy_misses() -> None:
    """K = 2; classes 1 = {p, q}, 2 = {r, s}, 3 = {p, r}. Apart: p|q, r|s, p|r, so the only split (up to the
    folds' order) is {p, s} | {q, r}."""
    cases = {"p": {1, 3}, "q": {1}, "r": {2, 3}, "s": {2}}
    for seed in range(8):
        folds = cross_validation_folds(cases, 2, fold_generator(seed))
        assert sorted(folds) == [["p", "s"], ["q", "r"]]


def test_an_impossible_rule_gives_a_split_and_names_the_short_class() -> None:
    """K = 2 and three cases, each pair sharing a class of its own: two cases share a fold, so their shared
    class lies in one fold only."""
    cases = {"x": {1, 2}, "y": {1, 3}, "z": {2, 3}}
    folds = cross_validation_folds(cases, 2, fold_generator(0))
    _assert_partition(folds, cases, 2)
    pair = next(f for f in folds if len(f) == 2)
    shared = cases[pair[0]] & cases[pair[1]]
    assert short_classes(folds, cases) == sorted(shared)
    # with three folds every case has its own fold and every class two folds
    folds3 = cross_validation_folds(cases, 3, fold_generator(0))
    assert sorted(folds3) == [["x"], ["y"], ["z"]] and short_classes(folds3, cases) == []


def test_classless_cases_are_dealt_out_evenly() -> None:
    cases = {f"c{i:02d}": set() for i in range(11)}
    folds = cross_validation_folds(cases, 5, fold_generator(1))
    _assert_partition(folds, cases, 5)
    assert sorted(len(f) for f in folds) == [2, 2, 2, 2, 3]


def test_random_sets_meet_the_rule() -> None:
    rng = np.random.default_rng(2024)
    for trial in range(40):
        n, n_classes, k = int(rng.integers(5, 40)), int(rng.integers(1, 8)), int(rng.integers(2, 6))
        cases = {f"c{i:02d}": set(np.flatnonzero(rng.random(n_classes) < 0.15).tolist()) for i in range(n)}
        folds = cross_validation_folds(cases, k, fold_generator(trial))
        _assert_partition(folds, cases, k)
        counts = {c: sum(c in v for v in cases.values()) for c in range(n_classes)}
        per_class = _class_folds(folds, cases)
        for c, n_cases in counts.items():
            if n_cases >= 2:
                assert len(per_class[c]) >= 2, (trial, c, folds)


def test_fewer_cases_than_folds_is_refused_with_what_would_work() -> None:
    with pytest.raises(ValueError, match=r"3 annotated case\(s\) cannot fill 5 .*at least 5 cases.*at most 3 folds"):
        cross_validation_folds({"a": {1}, "b": {1}, "c": set()}, 5, fold_generator(0))
    with pytest.raises(ValueError, match=r"at least 2 cases.*ensemble: seeds"):
        cross_validation_folds({"a": {1}}, 2, fold_generator(0))
    with pytest.raises(ValueError, match="at least 2 folds"):
        cross_validation_folds(CASES, 1, fold_generator(0))


def test_nnunet_splits_train_on_the_complement() -> None:
    folds = [["a", "d"], ["b"], ["c", "e"]]
    assert nnunet_splits(folds) == [
        {"train": ["b", "c", "e"], "val": ["a", "d"]},
        {"train": ["a", "c", "d", "e"], "val": ["b"]},
        {"train": ["a", "b", "d"], "val": ["c", "e"]},
    ]


def test_short_classes_ignores_single_case_classes() -> None:
    cases = {"a": {1, 2}, "b": {1}, "c": {3}}
    assert short_classes([["a", "b"], ["c"]], cases) == [1]  # 1: two cases, one fold; 2, 3: one case each
    assert short_classes([["a"], ["b", "c"]], cases) == []


def test_fold_generator_is_seeded() -> None:
    a = fold_generator(5).random(4)
    assert np.array_equal(a, fold_generator(5).random(4))
    assert not np.array_equal(a, fold_generator(6).random(4))
    assert fold_generator(-3).random() == fold_generator(-3).random()  # negative seeds are fine


def test_every_fold_assignment_counted_by_brute_force_agrees_on_feasibility() -> None:
    """On small sets, the function meets the rule exactly when some assignment does (brute force)."""
    rng = np.random.default_rng(3)
    for trial in range(30):
        n, k = int(rng.integers(3, 7)), int(rng.integers(2, 4))
        if n < k:
            continue
        cases = {f"c{i}": set(np.flatnonzero(rng.random(4) < 0.4).tolist()) for i in range(n)}
        ids = sorted(cases)
        feasible = False
        for assign in itertools.product(range(k), repeat=n):
            if len(set(assign)) < k:
                continue
            folds = [[cid for cid, f in zip(ids, assign, strict=True) if f == j] for j in range(k)]
            per_class = _class_folds(folds, cases)
            if all(len(per_class[c]) >= 2 for c in per_class if sum(c in v for v in cases.values()) >= 2):
                feasible = True
                break
        folds = cross_validation_folds(cases, k, fold_generator(trial))
        _assert_partition(folds, cases, k)
        per_class = _class_folds(folds, cases)
        met = all(len(per_class[c]) >= 2 for c in per_class if sum(c in v for v in cases.values()) >= 2)
        assert met == feasible, (trial, cases, k, folds)
