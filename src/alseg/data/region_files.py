"""Regions as files: user-given round-0 regions (JSON or CSV) and the JSON the state keeps of them."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alseg.data.dataset import Dataset
from alseg.data.regions import Box, Region


def _ints(value: Any, what: str, source: str) -> tuple[int, ...]:
    if isinstance(value, str):
        value = value.replace(",", " ").replace(";", " ").split()
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{source}: {what} is {value!r}; expected a list of integers")
    out = []
    for v in value:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {what} is {value!r}; expected integers") from None
        if not f.is_integer() or isinstance(v, bool):
            raise ValueError(f"{source}: {what} is {value!r}; expected integers")
        out.append(int(f))
    return tuple(out)


def load_starting_regions(
    path: Path, ds: Dataset, pool: Sequence[str], box_sizes: dict[str, tuple[int, ...]]
) -> list[Region]:
    """Read and check user-given round-0 regions (JSON or CSV, boxes in voxels, array order ``z, y, x``).

    JSON: a list (or ``{"regions": [...]}``) of ``{"case_id": ..., "start": [z, y, x], "size": [...]}``.
    CSV: columns ``case_id``, ``start`` and optionally ``size`` (integers separated by spaces), e.g.
    ``hippocampus_001,10 12 8,20 20 20``. ``size`` defaults to the experiment's region size. Every region must
    lie in a pool case, inside the image, and overlap no other region.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"starting_regions file {path} does not exist; expected a JSON or CSV list of regions")
    text = path.read_text(encoding="utf-8", errors="replace")
    rows: list[dict[str, Any]]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err}); expected a list of regions") from None
        if isinstance(data, dict):
            data = data.get("regions")
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise ValueError(f"{path}: expected a list of {{'case_id', 'start', 'size'}} objects")
        rows = data
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or not {"case_id", "start"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: CSV columns {reader.fieldnames}; expected case_id, start and optionally size")
        rows = [dict(r) for r in reader]
    else:
        raise ValueError(f"{path}: starting_regions must be a .json or .csv file")
    if not rows:
        raise ValueError(f"{path}: no regions; expected at least one")
    pool_set = set(pool)
    regions: list[Region] = []
    for i, row in enumerate(rows):
        where = f"{path} region {i + 1}"
        case_id = str(row.get("case_id", ""))
        if case_id not in pool_set:
            kind = "a held-out test case" if case_id in ds.case_ids else "not a case of the dataset"
            raise ValueError(f"{where}: case {case_id!r} is {kind}; expected a pool case")
        shape = ds.geometry(case_id).shape
        start = _ints(row.get("start"), "start", where)
        size = _ints(row["size"], "size", where) if row.get("size") not in (None, "") else box_sizes[case_id]
        if len(start) != len(shape) or len(size) != len(shape):
            raise ValueError(f"{where}: start {start} / size {size} must have {len(shape)} entries (z, y, x)")
        try:
            box = Box(start, size)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if not box.inside(shape):
            raise ValueError(f"{where}: box start {start} size {size} lies outside {case_id} of shape {shape}")
        for other in regions:
            if other.case_id == case_id and other.box.overlaps(box):
                raise ValueError(f"{where}: box {box} overlaps {other.box} in {case_id}; expected disjoint regions")
        regions.append(Region(case_id, box, float("nan"), {"strategy": "starting_regions", "round": 0, "row": i + 1}))
    return regions


def regions_to_json(regions: Sequence[Region]) -> str:
    return json.dumps([{"case_id": g.case_id, **g.box.to_json(), "info": g.info} for g in regions])


def regions_from_json(text: str) -> list[Region]:
    return [Region(d["case_id"], Box.from_json(d), float("nan"), d["info"]) for d in json.loads(text)]
