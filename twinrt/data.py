"""Loaders for the shared research data sets (OpenKBP, TG-119) into :class:`twinrt.model.Case`.

Formats are described in ``../shared/data/README.md``. Neither data set carries patient coordinates,
so the loaders place the image in a documented LPS frame:

* **OpenKBP** arrays are (128, 128, 128) indexed (row, column, slice). Anatomy fixes the axes: the
  row axis runs anterior→posterior (mandible rows < spinal cord rows) = +y LPS; the column axis runs
  patient right→left (right parotid columns < left parotid columns) = +x LPS; the slice axis runs
  superior→inferior (brainstem slices < oesophagus slices) = -z LPS. The loader transposes to
  (k, j, i) = (slice, row, column) and flips the slices so that k increases towards the head,
  giving an identity direction. The grid is centred on (0, 0, 0) mm. CT values are stored as
  HU + 1000 clipped at 0, so HU = value - 1000.
* **TG-119** is already (z, y, x) with origin and spacing given; identity direction.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.geometry import Grid
from twinrt.model import Case, Dose, Image, Prescription, Structure, StructureType, default_color

OPENKBP_CITATION = ("Babier A, et al. OpenKBP: The open-access knowledge-based planning grand challenge and "
                    "data set. Medical Physics 48(9):5549-5561, 2021. doi:10.1002/mp.14845. CT images from "
                    "The Cancer Imaging Archive head-and-neck collections.")
TG119_CITATION = ("AAPM TG-119 C-shape phantom from the CORT data set: Craft D, et al. Shared data for "
                  "intensity modulated radiation therapy (IMRT) optimization research: the CORT dataset. "
                  "GigaScience 3:37, 2014; as shipped with pyRadPlan (BSD-3-Clause).")

#: OpenKBP prescriptions: 35 fractions.
OPENKBP_PRESCRIPTIONS_GY = {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}
OPENKBP_FRACTIONS = 35


def shared_data_dir() -> Path | None:
    """The shared data folder: ``$TWINRT_SHARED_DATA`` or ``../shared/data`` beside the checkout.

    :return: the folder, or ``None`` when it is absent (e.g. on a user's fresh clone).
    """
    env = os.environ.get("TWINRT_SHARED_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent
    candidates += [here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if (c / "openkbp").is_dir() or (c / "tg119").is_dir():
            return c
    return None


def _load_npz(path: str | Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"Data file {path} does not exist; check the path (see ../shared/data/README.md)",
                                path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise InvalidInputError(f"{path} lacks keys {missing}; it is not a file of this data set")
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        if isinstance(exc, InvalidInputError):
            raise
        raise InvalidInputError(f"{path} is not a readable .npz file ({exc}); re-copy it") from exc


def openkbp_patients(split: str = "validation", root: str | Path | None = None) -> list[Path]:
    """Paths of the OpenKBP patients of one split, sorted by patient number.

    :param split: ``"train"`` or ``"validation"``.
    :param root: the ``openkbp`` folder; default from :func:`shared_data_dir`.
    """
    if root is None:
        base = shared_data_dir()
        if base is None:
            raise MissingInputError("Shared data folder not found; set TWINRT_SHARED_DATA to the data folder")
        root = base / "openkbp"
    folder = Path(root) / split
    if not folder.is_dir():
        raise MissingInputError(f"No OpenKBP split folder {folder}", folder)
    files = [p for p in folder.glob("pt_*.npz")]
    return sorted(files, key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))


def openkbp_grid(voxel_mm: np.ndarray, shape: tuple[int, int, int] = (128, 128, 128)) -> Grid:
    """The LPS grid TwinRT gives an OpenKBP patient (see module docstring).

    :param voxel_mm: OpenKBP ``voxel_dimensions`` (row, column, slice) in mm.
    :param shape: (k, j, i) shape after transposition.
    """
    v = np.asarray(voxel_mm, dtype=float)
    spacing = (v[1], v[0], v[2])  # (i=column, j=row, k=slice)
    origin = tuple(-(n - 1) / 2.0 * s for n, s in zip(shape[::-1], spacing))
    return Grid(shape, spacing, origin)


def openkbp_to_kji(array: np.ndarray) -> np.ndarray:
    """OpenKBP (row, column, slice) array → TwinRT (k, j, i) with k increasing towards the head."""
    return np.ascontiguousarray(np.transpose(array, (2, 0, 1))[::-1])


def load_openkbp(path: str | Path) -> Case:
    """Load one OpenKBP patient (``pt_N.npz``) as a case with CT (HU), structures and reference dose.

    :param path: the ``pt_N.npz`` file.
    :return: case with ``doses["reference"]`` in Gy, prescriptions in metadata and the
        possible-dose mask in ``metadata["possible_dose_mask"]`` (bool, CT grid).
    """
    path = Path(path)
    d = _load_npz(path, ("ct", "dose_cgy", "labels", "rois", "voxel_mm"))
    ct_raw = d["ct"]
    if ct_raw.ndim != 3:
        raise InvalidInputError(f"{path}: CT must be 3D, got shape {ct_raw.shape}")
    grid = openkbp_grid(d["voxel_mm"], (ct_raw.shape[2], ct_raw.shape[0], ct_raw.shape[1]))
    hu = openkbp_to_kji(ct_raw).astype(np.int16) - np.int16(1000)
    labels = openkbp_to_kji(d["labels"])
    rois = [str(r) for r in d["rois"]]
    structures: list[Structure] = []
    for bit, name in enumerate(rois):
        mask = ((labels >> bit) & 1).astype(bool)
        if mask.any():
            structures.append(Structure(name, mask, grid, default_color(bit), StructureType.guess(name)))
    dose = Dose(openkbp_to_kji(d["dose_cgy"]).astype(np.float32) / 100.0, grid, name="reference",
                source="OpenKBP reference plan")
    pid = path.stem
    present = {s.name for s in structures}
    prescriptions = [Prescription(n, g, OPENKBP_FRACTIONS) for n, g in OPENKBP_PRESCRIPTIONS_GY.items()
                     if n in present]
    meta = {
        "patient_name": f"OpenKBP^{pid}",
        "source": "OpenKBP",
        "citation": OPENKBP_CITATION,
        "prescriptions": prescriptions,
        "possible_dose_mask": ((labels >> 15) & 1).astype(bool),
        "body_site": "head-and-neck",
    }
    return Case(pid, Image(hu, grid, "CT"), structures, {"reference": dose}, [], meta)


def load_tg119(path: str | Path | None = None) -> Case:
    """Load the TG-119 C-shape phantom (``tg119.npz``): CT in HU and Core, OuterTarget, BODY.

    :param path: the ``tg119.npz`` file; default from :func:`shared_data_dir`.
    """
    if path is None:
        base = shared_data_dir()
        if base is None:
            raise MissingInputError("Shared data folder not found; set TWINRT_SHARED_DATA to the data folder")
        path = base / "tg119" / "tg119.npz"
    d = _load_npz(path, ("ct_hu", "labels", "rois", "spacing_mm_xyz", "origin_mm_xyz"))
    grid = Grid(d["ct_hu"].shape, tuple(d["spacing_mm_xyz"]), tuple(d["origin_mm_xyz"]))
    structures = []
    for bit, name in enumerate(str(r) for r in d["rois"]):
        mask = ((d["labels"] >> bit) & 1).astype(bool)
        stype = StructureType.TARGET if name == "OuterTarget" else StructureType.guess(name)
        structures.append(Structure(name, mask, grid, default_color(bit), stype))
    meta = {"patient_name": "Phantom^TG119", "source": "TG-119", "citation": TG119_CITATION,
            "prescriptions": [Prescription("OuterTarget", 50.0, 25)], "body_site": "phantom"}
    return Case("TG119", Image(d["ct_hu"].astype(np.int16), grid, "CT"), structures, {}, [], meta)
