"""Cross-validation folds over the annotated cases in which every class lies in at least two folds.

nnActive (MIC-DKFZ/nnActive, ``nnactive/loops/cross_validation.py``, ``kfold_cv``) trains its ensemble as the
K models of a K-fold cross-validation over the annotated cases, with a split in which every class lies in the
validation sets of at least two folds. Member k trains on every case outside fold k, so each member's training
set holds every class. Its rule: take the classes rarest first; put two cases of the class into two different
folds, the least filled ones first; then deal the remaining cases out so that the folds are equally filled.

:func:`cross_validation_folds` follows that rule (own implementation; numpy only, no global random state).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

_FOLDS_TAG = 0x666F6C6473  # "folds": keeps the split's random stream apart from any other use of the seed


def fold_generator(seed: int) -> np.random.Generator:
    """The generator the split of one training is drawn from: ``SeedSequence((seed, "folds"))``.

    The loop passes its training seed (experiment seed and round), so a resumed round rebuilds the same folds.
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, _FOLDS_TAG]))


def cross_validation_folds(
    case_classes: Mapping[str, Collection[int]],
    n_folds: int,
    rng: np.random.Generator,
    attempts: int = 20,
) -> list[list[str]]:
    """Split the annotated cases into ``n_folds`` disjoint validation folds (nnActive's rule).

    Args:
        case_classes: per annotated case, the classes its annotated voxels contain (the foreground labels).
        n_folds: K, the number of folds (ensemble members), at least 2.
        rng: the only source of randomness; the same generator state gives the same folds.
        attempts: randomised tries before settling for the best split found (see below).

    Returns:
        K lists of case ids, each sorted and non-empty; every case lies in exactly one of them. Member k
        validates on fold k and trains on all other cases. The folds are filled as equally as the class rule
        allows: cases move from the largest to the smallest fold while the sizes differ by more than one and a
        move keeps every class in as many folds as the rule needs.

    Every class present in at least two cases lies in at least two folds, so every member trains on cases of
    every such class. A class present in only one case cannot be in two folds: it lies in the fold of its one
    case, and the member validated on that fold trains without it (nnActive warns and then its check fails;
    here the split is accepted as it is). The rule can also be impossible to meet, e.g. K = 2 with three cases
    in which every pair of cases shares a class of its own; when no try meets it the split with the fewest
    classes short of two folds is returned (:func:`short_classes` names them).

    Raises:
        ValueError: ``n_folds`` < 2, or fewer annotated cases than folds (a fold would be empty).
    """
    k = int(n_folds)
    if k < 2:
        raise ValueError(f"a cross-validation ensemble needs at least 2 folds, got {k}")
    ids = sorted(case_classes)
    if len(ids) < k:
        fewer = f", use at most {len(ids)} folds (uncertainty.n_samples)" if len(ids) >= 2 else ""
        raise ValueError(
            f"{len(ids)} annotated case(s) cannot fill {k} cross-validation folds (every fold needs a case): "
            f"annotate at least {k} cases before the first training (a larger starting budget){fewer}, "
            "or train the ensemble from seeds (uncertainty.ensemble: seeds)"
        )
    classes = {cid: frozenset(int(c) for c in case_classes[cid]) for cid in ids}
    holders: dict[int, list[str]] = {}
    for cid in ids:
        for c in sorted(classes[cid]):
            holders.setdefault(c, []).append(cid)
    ruled = {c: cases for c, cases in sorted(holders.items()) if len(cases) >= 2}

    best_score: tuple[int, int] | None = None
    best: list[int] = []
    for _ in range(max(1, int(attempts))):
        fold_of = _attempt(ids, classes, ruled, k, rng)
        _repair(fold_of, ids, classes, ruled, k)
        _rebalance(fold_of, ids, classes, ruled, k, rng)
        sizes = np.bincount(fold_of, minlength=k)
        score = (len(_short(fold_of, ids, ruled)), int(sizes.max() - sizes.min()))
        if best_score is None or score < best_score:
            best_score, best = score, fold_of
        if score[0] == 0:
            break
    folds = [[cid for cid, f in zip(ids, best, strict=True) if f == j] for j in range(k)]
    if not all(folds):  # _rebalance fills every empty fold; this guards the invariant
        raise RuntimeError(f"internal error: an empty fold in {folds}")
    return folds


def short_classes(folds: Sequence[Collection[str]], case_classes: Mapping[str, Collection[int]]) -> list[int]:
    """The classes present in at least two cases that lie in fewer than two of ``folds``."""
    cases: dict[int, int] = {}
    in_folds: dict[int, set[int]] = {}
    for j, fold in enumerate(folds):
        for cid in fold:
            for c in {int(v) for v in case_classes.get(cid, ())}:
                cases[c] = cases.get(c, 0) + 1
                in_folds.setdefault(c, set()).add(j)
    return sorted(c for c, n in cases.items() if n >= 2 and len(in_folds[c]) < 2)


def nnunet_splits(folds: Sequence[Collection[str]]) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` for ``folds``: entry k validates on fold k and trains on the rest."""
    return [
        {
            "train": sorted(cid for j, other in enumerate(folds) if j != k for cid in other),
            "val": sorted(fold),
        }
        for k, fold in enumerate(folds)
    ]


# ----------------------------------------------------------------------------------------------- internals
def _attempt(
    ids: list[str],
    classes: Mapping[str, frozenset[int]],
    ruled: Mapping[int, list[str]],
    k: int,
    rng: np.random.Generator,
) -> list[int]:
    """One randomised greedy split: classes rarest first, then the rest dealt out to the smallest folds."""
    index = {cid: i for i, cid in enumerate(ids)}
    fold_of = [-1] * len(ids)
    sizes = np.zeros(k, dtype=np.int64)
    present: dict[int, set[int]] = {c: set() for c in ruled}
    tie = {c: t for c, t in zip(ruled, rng.permutation(len(ruled)).tolist(), strict=True)}

    def unplaced(c: int) -> list[str]:
        return [cid for cid in ruled[c] if fold_of[index[cid]] < 0]

    while True:
        open_classes = [c for c in ruled if len(present[c]) < 2 and unplaced(c)]
        if not open_classes:
            break
        c = min(open_classes, key=lambda v: (len(unplaced(v)), tie[v]))  # the rarest class still short
        candidates = unplaced(c)
        cid = candidates[int(rng.integers(len(candidates)))]
        # a fold new to the class; then the most other short classes of the case served; then the smallest
        noise = rng.random(k)
        key = [
            (
                j not in present[c],
                sum(1 for v in classes[cid] if v in present and len(present[v]) < 2 and j not in present[v]),
                -int(sizes[j]),
                noise[j],
            )
            for j in range(k)
        ]
        j = max(range(k), key=lambda f: key[f])
        fold_of[index[cid]] = j
        sizes[j] += 1
        for v in classes[cid]:
            if v in present:
                present[v].add(j)

    rest = [i for i, f in enumerate(fold_of) if f < 0]
    for i in rng.permutation(rest).tolist() if rest else []:
        smallest = np.flatnonzero(sizes == sizes.min())
        j = int(smallest[int(rng.integers(len(smallest)))])
        fold_of[i] = j
        sizes[j] += 1
    return fold_of


def _folds_of(fold_of: Sequence[int], ids: Sequence[str], ruled: Mapping[int, list[str]]) -> dict[int, dict[int, int]]:
    """Per ruled class: fold -> number of its cases there."""
    index = {cid: i for i, cid in enumerate(ids)}
    out: dict[int, dict[int, int]] = {}
    for c, cases in ruled.items():
        counts: dict[int, int] = {}
        for cid in cases:
            f = fold_of[index[cid]]
            counts[f] = counts.get(f, 0) + 1
        out[c] = counts
    return out


def _short(fold_of: Sequence[int], ids: Sequence[str], ruled: Mapping[int, list[str]]) -> list[int]:
    return [c for c, counts in _folds_of(fold_of, ids, ruled).items() if len(counts) < 2]


def _repair(
    fold_of: list[int], ids: list[str], classes: Mapping[str, frozenset[int]], ruled: Mapping[int, list[str]], k: int
) -> None:
    """Move single cases between folds while that lowers the number of classes short of two folds.

    A move never empties a fold and never takes a class that lies in two folds down to one.
    """
    index = {cid: i for i, cid in enumerate(ids)}
    for _ in range(len(ids) * k):
        counts = _folds_of(fold_of, ids, ruled)
        short = [c for c, per_fold in counts.items() if len(per_fold) < 2]
        if not short:
            return
        sizes = np.bincount(fold_of, minlength=k)
        moved = False
        for c in short:
            for cid in ruled[c]:
                i = index[cid]
                src = fold_of[i]
                if sizes[src] < 2:
                    continue
                for dst in sorted(range(k), key=lambda f: int(sizes[f])):
                    if dst == src:
                        continue
                    fold_of[i] = dst
                    after = _folds_of(fold_of, ids, ruled)
                    if all(len(after[v]) >= min(2, len(counts[v])) for v in classes[cid] if v in after) and len(
                        [v for v in after if len(after[v]) < 2]
                    ) < len(short):
                        moved = True
                        break
                    fold_of[i] = src
                if moved:
                    break
            if moved:
                break
        if not moved:
            return


def _rebalance(
    fold_of: list[int],
    ids: list[str],
    classes: Mapping[str, frozenset[int]],
    ruled: Mapping[int, list[str]],
    k: int,
    rng: np.random.Generator,
) -> None:
    """Move cases from a largest to a smallest fold while the sizes differ by more than one.

    A move is taken only if every class of the moved case stays in at least min(2, its folds before) folds; a
    move into an empty fold always qualifies (the case's classes gain that fold), so no fold stays empty.
    """
    for _ in range(len(ids) * k):
        sizes = np.bincount(fold_of, minlength=k)
        if sizes.max() - sizes.min() <= 1:
            return
        counts = _folds_of(fold_of, ids, ruled)
        dst = int(np.argmin(sizes))
        moved = False
        for src in np.flatnonzero(sizes == sizes.max()).tolist():
            members = [i for i, f in enumerate(fold_of) if f == src]
            for i in rng.permutation(members).tolist():
                fold_of[i] = dst
                after = _folds_of(fold_of, ids, ruled)
                if all(len(after[v]) >= min(2, len(counts[v])) for v in classes[ids[i]] if v in after):
                    moved = True
                    break
                fold_of[i] = src
            if moved:
                break
        if not moved:
            return
