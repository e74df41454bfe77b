"""Image I/O for every part of alseg: header geometry, complete reads, checked label arrays, atomic writes.

One public module (as TorchIO's ``data/io.py``) used by the dataset, the oracles and the backends:

- :class:`Geometry` and :func:`read_geometry`: a voxel grid from an image header (no voxels read);
- :func:`read_sitk`, :func:`check_integrity`, :func:`count_nonfinite`: complete, checked reads (SimpleITK reads
  truncated ``.nii.gz`` files and NaN voxels silently);
- :func:`label_array`, :func:`read_label_array`: an integer label array from a label image;
- :func:`write_label_nifti`, :func:`sha256_file`: atomic label writes and content hashes.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from alseg import durable
from alseg.errors import AlsegError

MAX_PROBLEMS_SHOWN = 20
NIFTI_ENDINGS = (".nii.gz", ".nii")


class DatasetError(AlsegError, ValueError):
    """A problem with a dataset on disk.

    The message names the file, the offending value and what was expected. When raised by
    :func:`validate_dataset`, ``problems`` holds every problem found (the message shows at most
    :data:`MAX_PROBLEMS_SHOWN` of them).
    """

    def __init__(self, message: str, problems: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems is not None else [message]


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v + 0.0:.6g}" for v in values) + ")"


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of an image, read from its header.

    ``shape`` and ``spacing`` are in numpy array order (``z, y, x`` for 3D, as
    ``SimpleITK.GetArrayFromImage`` returns), spacing in mm. ``origin`` (mm) and ``direction`` are in
    SimpleITK order: ``origin`` is the physical (LPS) position of voxel 0 as ``(x, y, z)``;
    ``direction`` is the flattened row-major ``ndim x ndim`` matrix whose column ``j`` is the
    physical direction of SimpleITK index axis ``j`` (``x, y, z``), exactly as ``Image.GetDirection``.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def from_sitk(cls, obj: sitk.Image | sitk.ImageFileReader) -> Geometry:
        """Geometry of a SimpleITK image, or of a reader after ``ReadImageInformation``."""
        size = obj.GetSize()
        return cls(
            shape=tuple(int(s) for s in reversed(size)),
            spacing=tuple(float(s) for s in reversed(obj.GetSpacing())),
            origin=tuple(float(o) for o in obj.GetOrigin()),
            direction=tuple(float(d) for d in obj.GetDirection()),
        )

    def copy_to(self, image: sitk.Image) -> sitk.Image:
        """Set spacing, origin and direction of ``image`` (whose array shape must be ``shape``)."""
        size = tuple(reversed(self.shape))
        if tuple(image.GetSize()) != size:
            raise ValueError(f"image size {image.GetSize()} (x, y, z) does not match geometry {size}")
        image.SetSpacing(tuple(reversed(self.spacing)))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def differences(self, other: Geometry, tol: float = 1e-4) -> list[str]:
        """Human-readable differences to ``other`` (empty when the geometries match)."""
        out: list[str] = []
        if self.shape != other.shape:
            out.append(f"shape {self.shape} vs {other.shape}")
            if len(self.shape) != len(other.shape):
                return out
        for name in ("spacing", "origin", "direction"):
            a = np.asarray(getattr(self, name), dtype=float)
            b = np.asarray(getattr(other, name), dtype=float)
            if a.shape != b.shape or not np.allclose(a, b, rtol=tol, atol=tol):
                out.append(f"{name} {_fmt(a)} vs {_fmt(b)}")
        return out

    def difference(self, other: Geometry, tol: float = 1e-4) -> str:
        """One-line description of the differences to ``other``; ``""`` when they match."""
        return "; ".join(self.differences(other, tol))

    def matches(self, other: Geometry, tol: float = 1e-4) -> bool:
        """Same shape, and spacing/origin/direction equal within ``tol`` (absolute and relative)."""
        return not self.differences(other, tol)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_ENDINGS)


def open_reader(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    if is_nifti(path):
        # Otherwise SimpleITK picks the reader by content: a PNG renamed .nii.gz would be "valid".
        reader.SetImageIO("NiftiImageIO")
    return reader


def _kind(path: Path) -> str:
    return "NIfTI file" if is_nifti(path) else "image file"


def open_error(path: Path, exc: Exception) -> DatasetError:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    detail = lines[-1] if lines else type(exc).__name__
    return DatasetError(f"{path}: cannot be read as a {_kind(path)} ({detail}); expected a valid image")


def read_geometry(path: str | Path) -> Geometry:
    """Geometry of an image file from its header only (no voxel data is read)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file does not exist; expected an image file")
    reader = open_reader(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise open_error(path, exc) from exc
    return Geometry.from_sitk(reader)


def read_sitk(path: Path) -> sitk.Image:
    if not path.is_file():
        raise DatasetError(f"{path}: file does not exist; expected an image file")
    try:
        return open_reader(path).Execute()
    except RuntimeError as exc:
        raise open_error(path, exc) from exc


def check_integrity(path: Path) -> None:
    """Detect truncated or corrupt files that SimpleITK would read silently.

    SimpleITK reads a truncated ``.nii.gz`` without complaint (the missing voxels are garbage), so
    gzip streams are decompressed in full (CRC and end-of-stream checked) and, for NIfTI, the amount
    of data is compared with what the header promises.
    """
    n_bytes: int | None = None
    if path.name.lower().endswith(".gz"):
        dec = zlib.decompressobj(wbits=31)  # gzip container
        n_bytes = 0
        try:
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    n_bytes += len(dec.decompress(chunk))
                    while dec.eof and dec.unused_data:  # concatenated gzip members
                        rest = dec.unused_data
                        dec = zlib.decompressobj(wbits=31)
                        n_bytes += len(dec.decompress(rest))
            n_bytes += len(dec.flush())
        except zlib.error as exc:
            raise DatasetError(
                f"{path}: corrupt gzip data ({exc}); expected a valid gzip-compressed {_kind(path)}"
            ) from exc
        if not dec.eof:
            raise DatasetError(
                f"{path}: gzip stream is truncated after {n_bytes} uncompressed bytes; "
                f"expected a complete gzip-compressed {_kind(path)}"
            )
    if is_nifti(path):
        import nibabel as nib

        try:
            img = nib.load(str(path))
            hdr = img.header
            expected = int(img.dataobj.offset) + int(np.prod(hdr.get_data_shape())) * int(hdr.get_data_dtype().itemsize)
        except Exception as exc:  # nibabel raises many kinds; any failure here means "unreadable"
            raise open_error(path, exc) from exc
        if n_bytes is None:
            n_bytes = path.stat().st_size
        if n_bytes < expected:
            raise DatasetError(
                f"{path}: truncated NIfTI data: {n_bytes} bytes; expected at least {expected} bytes "
                "(header offset + voxels x bytes per voxel)"
            )


def count_nonfinite(path: str | Path) -> int:
    """Number of NaN/inf voxels of an image file (0 for integer data).

    NIfTI files are read with nibabel: SimpleITK (ITK 5.4) reads NaN and inf voxels of NIfTI files as 0.
    """
    path = Path(path)
    if is_nifti(path):
        import nibabel as nib

        try:
            img = nib.load(str(path))
            if img.get_data_dtype().kind != "f":
                return 0
            data = np.asarray(img.dataobj.get_unscaled())
        except Exception as exc:  # nibabel raises many kinds; any failure here means "unreadable"
            raise open_error(path, exc) from exc
    else:
        data = sitk.GetArrayViewFromImage(read_sitk(path))
        if data.dtype.kind != "f":
            return 0
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def label_array(path: Path, image: sitk.Image) -> np.ndarray:
    """Convert a label image to an integer array (uint8 when values fit, else int16)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(
            f"{path}: label has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "expected a scalar label image"
        )
    arr = sitk.GetArrayFromImage(image)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise DatasetError(f"{path}: label contains NaN/inf values; expected integer label values")
        rounded = np.round(arr)
        bad = arr != rounded
        if np.any(bad):
            examples = sorted({float(v) for v in np.unique(arr[bad])[:5]})
            raise DatasetError(f"{path}: label has non-integer values {examples}; expected integer label values")
        arr = rounded
    elif arr.dtype.kind not in "iub":
        raise DatasetError(f"{path}: label has pixel type {arr.dtype}; expected an integer label image")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo >= 0 and hi <= np.iinfo(np.uint8).max:
        return np.asarray(arr, dtype=np.uint8)
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        return np.asarray(arr, dtype=np.int16)
    raise DatasetError(f"{path}: label values range [{lo}, {hi}]; expected values that fit in int16")


def read_label_array(path: str | Path) -> np.ndarray:
    """A label file as an integer array (array order), complete-read checked by SimpleITK only."""
    path = Path(path)
    return label_array(path, read_sitk(path))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_label_nifti(path: str | Path, array: np.ndarray, geometry: Geometry) -> str:
    """Write ``array`` as a NIfTI label in ``geometry``, atomically (temp file, fsync, rename).

    Returns the file's SHA-256.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"label array shape {array.shape} does not match the image shape {geometry.shape}")
    image = geometry.copy_to(sitk.GetImageFromArray(array))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
    sitk.WriteImage(image, str(tmp), useCompression=True)
    durable.replace(tmp, path)
    return sha256_file(path)
