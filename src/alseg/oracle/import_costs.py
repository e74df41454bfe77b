"""The annotation cost an ``alseg import`` records beside the labels: who imported them, the minutes they spent
(when given) and each region's correction measures (:mod:`alseg.evaluation.correction`) against the prefill of
the round's work package.

The prefill a person started from is the package's ``prefill/{case}.nii.gz``; a package without one (round 0,
``prefill: false``, or exported before alseg made prefills) means background everywhere. A package that declares
a prefill whose file is gone is measured against background too, with a warning.
"""

from __future__ import annotations

import getpass
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alseg.data.images import DatasetError, read_label_array
from alseg.data.prefill import PREFILL_MODEL, PREFILL_NONE
from alseg.evaluation.correction import RegionCost, correction_cost
from alseg.oracle.label_files import AnnotationImportError
from alseg.oracle.package import package_prefill, prefill_path
from alseg.store.state import StoredRegion

UNKNOWN_ANNOTATOR = "unknown"


def annotator_name(annotator: str | None) -> str:
    """``annotator`` stripped, or the login name (``getpass.getuser()``) when None; an empty name is refused."""
    if annotator is None:
        try:
            return getpass.getuser() or UNKNOWN_ANNOTATOR
        except (KeyError, OSError):  # no login name in the environment nor in the password database
            return UNKNOWN_ANNOTATOR
    name = str(annotator).strip()
    if not name or any(not c.isprintable() for c in name):
        raise AnnotationImportError(
            f"--annotator {annotator!r}: expected the annotator's name (printable text, not empty); nothing imported"
        )
    return name


def check_minutes(minutes: float | None) -> float | None:
    """The minutes spent on an import: None (not given) or a finite number >= 0."""
    if minutes is None:
        return None
    try:
        value = float(minutes)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise AnnotationImportError(
            f"--minutes {minutes!r}: expected the minutes spent on the files of this import, a number >= 0 "
            "(e.g. --minutes 12.5); nothing imported"
        )
    return value


def measure_regions(
    exp_dir: Path, round_index: int, case_id: str, source: Path, label: np.ndarray, regions: Sequence[StoredRegion]
) -> tuple[dict[int, RegionCost], str | None]:
    """The correction measures of a case's regions of a round: the imported ``label`` (from ``source``) against
    the work package's prefill of the case. Returns ``{region id: cost}`` and a warning when the package declares a
    prefill that cannot be read (then measured against background)."""
    warning = None
    prefill = None
    if package_prefill(exp_dir, round_index) == PREFILL_MODEL:
        path = prefill_path(exp_dir, round_index, case_id)
        try:
            prefill = read_label_array(path)
            if prefill.shape != label.shape:
                raise DatasetError(f"shape {prefill.shape}, expected the label's {label.shape}")
        except (OSError, DatasetError) as err:
            prefill = None
            warning = (
                f"{source}: the prefill {path} of the round-{round_index} work package cannot be read ({err}); the "
                f"corrected voxels and strokes of case {case_id!r} are measured against background instead"
            )
    kind = PREFILL_MODEL if prefill is not None else PREFILL_NONE
    return {g.id: correction_cost(label, prefill, g.region.box, kind) for g in regions}, warning
