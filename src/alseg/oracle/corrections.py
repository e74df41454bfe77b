"""``alseg import --round N --replace``: when the labels of a finished round may be corrected.

A correction replaces the labels of cases of a finished round N while a later round waits for labels: that
round's annotate stage rebuilds the corrected cases' training labels, so the next training uses them
(:mod:`alseg.oracle.importer` does the import; :meth:`alseg.oracle.human.HumanOracle.annotate` the rebuild).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from alseg.oracle.label_files import AnnotationImportError
from alseg.store.state import ExperimentState


def rounds_text(rounds: Sequence[int]) -> str:
    return ", ".join(map(str, rounds)) if rounds else "none"


def check_correction(
    exp_dir: Path, state: ExperimentState, n: int, replace: bool, waiting: int | None, rounds_planned: int
) -> None:
    """``--round N``: refuse (changing nothing) unless N is a finished round, ``--replace`` is given and a later
    round waits for labels (its annotate stage is the next one, which rebuilds the corrected training labels)."""
    rounds = sorted({g.round for g in state.regions()})
    finished = [k for k in rounds if state.stage_done(k, "annotate")]
    if n not in rounds:
        raise AnnotationImportError(
            f"--round {n}: {exp_dir} has no round {n} (rounds with regions: {rounds_text(rounds)}); "
            f"finished rounds whose labels can be corrected: {rounds_text(finished)}"
        )
    if n not in finished:
        raise AnnotationImportError(
            f"--round {n}: round {n} is not finished: its regions wait for labels; import its files without "
            f"--round (`alseg import {exp_dir} LABELS_DIR`, with --replace for a changed file)"
        )
    if not replace:
        raise AnnotationImportError(
            f"--round {n}: round {n} is finished; correcting its labels replaces them: pass --replace as well "
            f"(`alseg import {exp_dir} LABELS_DIR --round {n} --replace`)"
        )
    if waiting is None:
        if state.stage_done(rounds_planned - 1, "evaluate"):
            why = "the experiment is complete"
        else:
            why = f"no round waits for labels (an interrupted `alseg query`? run `alseg query {exp_dir}` first)"
        raise AnnotationImportError(
            f"--round {n}: {why}; a correction is used by the next round's training, so it is imported while a "
            "later round waits for labels"
        )
