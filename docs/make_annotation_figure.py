"""Render the README's annotation figure: an exported work-package mask over its image, on a real demo case.

It creates a small annotation-mode experiment on 6 bundled Hippocampus cases (round 0 only: uniform random
regions, no training), then draws three orthogonal slices through the first region of one case: the image with
the mask of the regions to label, and the same slices with what an annotator returns (here: the ground truth
inside the region).

    python docs/make_annotation_figure.py --out docs/annotation_round.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
from matplotlib.colors import ListedColormap

from alseg.config import ExperimentConfig
from alseg.data.dataset import demo_dataset_path
from alseg.loop.drivers import run_experiment


def make_dataset(dst: Path, n_cases: int) -> Path:
    src = demo_dataset_path()
    meta = json.loads((src / "dataset.json").read_text())
    training = sorted(meta["training"], key=lambda e: e["image"])[:n_cases]
    for entry in training:
        for key in ("image", "label"):
            (dst / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / entry[key], dst / entry[key])
    meta.update(training=training, numTraining=len(training))
    (dst / "dataset.json").write_text(json.dumps(meta, indent=1))
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("annotation_round.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp) / "Hippocampus", 6)
        cfg = ExperimentConfig(
            dataset=dataset,
            strategy="entropy",
            oracle="human",
            rounds=2,
            query_size=6,
            seed=1,
            profile="cpu",
            device="cpu",
        )
        exp = run_experiment(cfg, Path(tmp) / "exp")  # stops after exporting round 0's work package
        package = exp / "rounds" / "000" / "to_annotate"
        manifest = json.loads((package / "manifest.json").read_text())
        case = max(manifest["cases"], key=lambda c: len(c["regions"]))
        region = next(e for e in manifest["regions"] if e["region_id"] == case["regions"][0])
        image = sitk.ReadImage(str(package / case["images"][0]))
        img = sitk.GetArrayFromImage(image).astype(np.float32)
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(package / case["mask"])))
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "labelsTr" / f"{case['case_id']}.nii.gz")))
        returned = np.where(mask > 0, gt, 0)
        spacing = image.GetSpacing()[::-1]  # array order
        centre = [a + s // 2 for a, s in zip(region["start"], region["size"], strict=True)]

        lo, hi = np.percentile(img, [1, 99.5])
        mask_cmap = ListedColormap([(0, 0, 0, 0), (1.0, 0.8, 0.0, 0.45)] + [(0.0, 0.8, 1.0, 0.45)] * 254)
        label_cmap = ListedColormap([(0, 0, 0, 0), (0.9, 0.2, 0.2, 0.65), (0.2, 0.5, 1.0, 0.65)])
        views = [("axial (z)", 0), ("coronal (y)", 1), ("sagittal (x)", 2)]
        fig, axes = plt.subplots(2, 3, figsize=(10, 6.6), constrained_layout=True)
        for col, (name, axis) in enumerate(views):
            sl = [slice(None)] * 3
            sl[axis] = centre[axis]
            other = [a for a in range(3) if a != axis]
            aspect = spacing[other[0]] / spacing[other[1]]
            for row, (overlay, cmap, vmax) in enumerate([(mask, mask_cmap, 255), (returned, label_cmap, 2)]):
                ax = axes[row, col]
                ax.imshow(img[tuple(sl)], cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin="lower")
                ax.imshow(
                    overlay[tuple(sl)],
                    cmap=cmap,
                    vmin=0,
                    vmax=vmax,
                    aspect=aspect,
                    origin="lower",
                    interpolation="nearest",
                )
                ax.contour(mask[tuple(sl)] > 0, levels=[0.5], colors=["#ffcc00"], linewidths=1.0, origin="lower")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{name} slice {centre[axis]}", fontsize=9)
        axes[0, 0].set_ylabel("exported mask\n(regions to label)", fontsize=9)
        axes[1, 0].set_ylabel("label returned\n(inside the box)", fontsize=9)
        fig.suptitle(
            f"{case['case_id']}: region {region['region_id']} (mask value {region['mask_value']}), "
            f"voxels (x, y, z) {region['index_min_xyz']} to {region['index_max_xyz']}, "
            f"centre {region['centre_lps_mm']} mm (LPS)",
            fontsize=9,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
