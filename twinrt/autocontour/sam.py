"""Segment Anything prompts on CT slices, propagated through the neighbouring slices (research use only).

For targets and organs no network knows: the user clicks points (inside = 1, outside = 0) and/or
draws a box on one axial slice; Segment Anything (SAM, Kirillov et al. 2023; or MedSAM, Ma et al.
2024, a SAM vit_b fine-tuned on medical images) turns the prompt into a mask, and
:func:`propagate` carries it slice by slice: each next slice is prompted with the previous
slice's mask (its bounding box widened by :data:`PROPAGATION_MARGIN_PX` and its innermost point).

Coordinates: a slice is ``volume[k]`` of a (k, j, i) array; points and boxes are in voxel index
units on that slice, ``(i, j)`` = (column, row) = SAM's ``(x, y)``. The Slicer Logic converts
markups (RAS, mm) to these indices.

Checkpoints are files the user supplies (nothing is downloaded): SAM ``vit_b``/``vit_l``/``vit_h``
or MedSAM (``vit_b``). Every checkpoint runs through ``segment_anything.SamPredictor`` (SAM's
pixel normalisation, multimask output with the best-scored mask); MedSAM's own inference scales
the image to [0, 1] and prompts with a box only, so MedSAM may do worse here than in its paper. :func:`register_checkpoint` copies one into the models folder with a
manifest entry (id, model type, sha256); :func:`load_sam` checks the sha256 against it and that
the file's weights fit the declared model type, and says plainly when they do not.

Propagation stops on a slice where the mask is smaller than ``min_area_px``, grows more than
:data:`MAX_GROWTH` times, or overlaps the previous slice's mask by less than :data:`MIN_OVERLAP`
of its area: the signs that the structure has ended or the prompt leaked.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.io_utils import sha256_file, write_text_atomic
from twinrt.progress import CancelToken, ProgressCallback, report

#: SAM model types → image-encoder embedding width (how a checkpoint's type is recognised).
SAM_MODEL_TYPES = {"vit_b": 768, "vit_l": 1024, "vit_h": 1280}
#: Key of the image encoder's patch embedding in a SAM state dict (its first dimension is the width).
_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
#: Default CT window (width, level) in HU for the image SAM sees: soft tissue.
DEFAULT_WINDOW_HU = (400.0, 40.0)
#: Propagation: margin added to the previous mask's bounding box (pixels), growth and overlap limits.
PROPAGATION_MARGIN_PX = 3
MAX_GROWTH = 1.8
MIN_OVERLAP = 0.3
#: Sub-folder of the models folder that holds registered SAM checkpoints.
SAM_SUBDIR = "sam"


class SamCheckpointError(InvalidInputError):
    """A checkpoint that is not a SAM state dict of the declared model type."""


def window_to_rgb(slice_hu: np.ndarray, window_hu: Sequence[float] = DEFAULT_WINDOW_HU) -> np.ndarray:
    """A CT slice (j, i) in HU as the (H, W, 3) uint8 RGB image SAM expects (grey, windowed)."""
    width, level = float(window_hu[0]), float(window_hu[1])
    if not width > 0:
        raise InvalidInputError(f"The CT window width must be > 0 HU, got {width}")
    g = np.clip((np.asarray(slice_hu, dtype=np.float32) - (level - width / 2.0)) / width, 0.0, 1.0)
    g = np.round(g * 255.0).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def detect_model_type(state_dict: dict[str, Any]) -> Optional[str]:
    """The SAM model type a state dict's image encoder has, or ``None`` when it is not a known one."""
    w = state_dict.get(_PATCH_KEY)
    if w is None:
        return None
    width = int(w.shape[0])
    return next((t for t, d in SAM_MODEL_TYPES.items() if d == width), None)


@dataclass
class LoadedSam:
    """A SAM model ready to prompt: the torch module, its model type, weights sha256 and file."""

    model: Any
    model_type: str
    sha256: str
    path: Path
    model_id: str = ""


def _read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip or torch errors: not a torch checkpoint
        raise SamCheckpointError(f"{path.name} is not a readable PyTorch checkpoint ({exc.__class__.__name__}: "
                                 f"{exc}); choose the SAM or MedSAM .pth file") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # some fine-tuning scripts wrap the weights
    if not isinstance(state, dict) or not state:
        raise SamCheckpointError(f"{path.name} holds no state dict; choose the SAM or MedSAM .pth file")
    return state


def load_sam(checkpoint: str | Path, model_type: str, expected_sha256: Optional[str] = None,
             builder: Optional[Callable[[], Any]] = None, model_id: str = "") -> LoadedSam:
    """Build a SAM of ``model_type`` and load ``checkpoint`` into it (CPU, eval mode).

    :param checkpoint: the ``.pth`` file (SAM or MedSAM weights).
    :param model_type: ``vit_b``, ``vit_l`` or ``vit_h`` (:data:`SAM_MODEL_TYPES`).
    :param expected_sha256: the manifest's sha256; a different file is refused.
    :param builder: builds the empty model instead of ``segment_anything.sam_model_registry``
        (tests build a tiny SAM from segment-anything's own classes this way).
    :param model_id: the registered id, recorded with the result.
    :raises MissingInputError: no such file.
    :raises WeightsIntegrityError: the sha256 differs from ``expected_sha256``.
    :raises SamCheckpointError: not a SAM state dict, or one of another model type.
    :raises InvalidInputError: an unknown model type.
    """
    from twinrt.dosepredict.weights import WeightsIntegrityError

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise MissingInputError(f"SAM checkpoint {path} does not exist; point to the vit_b/vit_l/vit_h (or MedSAM) "
                                ".pth file you downloaded", path)
    if builder is None and model_type not in SAM_MODEL_TYPES:
        raise InvalidInputError(f"Unknown SAM model type {model_type!r}; use one of {', '.join(SAM_MODEL_TYPES)} "
                                "(MedSAM is vit_b)")
    sha = sha256_file(path)
    if expected_sha256 and sha != expected_sha256.lower():
        raise WeightsIntegrityError(f"SAM checkpoint {path.name} has sha256 {sha} but its manifest entry says "
                                    f"{expected_sha256}; the file was changed or swapped: register it again")
    state = _read_state_dict(path)
    found = detect_model_type(state)
    if builder is None and found is not None and found != model_type:
        raise SamCheckpointError(f"{path.name} is a {found} checkpoint, not {model_type}; declare it as {found}")
    from twinrt.autocontour.tv_compat import ensure_torchvision

    ensure_torchvision()
    if builder is None:
        from segment_anything import sam_model_registry

        sam = sam_model_registry[model_type]()
    else:
        sam = builder()
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise SamCheckpointError(f"{path.name} does not match the declared model type {model_type} "
                                 f"({first}); check the model type, or that the file is a SAM/MedSAM checkpoint") from exc
    sam.eval()
    return LoadedSam(sam, model_type, sha, path, model_id)


def build_tiny_sam(embed_dim: int = 32) -> Any:
    """A SAM with a 64-pixel, one-block ViT and a one-layer decoder, randomly initialised (seed 0).

    Built from segment-anything's own classes, so it exercises the real checkpoint, registry and
    prompt code paths in seconds; its masks are meaningless. For tests and smoke runs only.

    :param embed_dim: image-encoder width (another width gives a checkpoint that does not fit).
    """
    import torch

    from twinrt.autocontour.tv_compat import ensure_torchvision

    ensure_torchvision()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    return Sam(image_encoder=ImageEncoderViT(img_size=64, patch_size=16, embed_dim=embed_dim, depth=1, num_heads=2,
                                             out_chans=32),
               prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                            mask_in_chans=4),
               mask_decoder=MaskDecoder(transformer_dim=32, num_multimask_outputs=3, iou_head_depth=1,
                                        iou_head_hidden_dim=16,
                                        transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64,
                                                                      num_heads=2)))


# ------------------------------------------------------------------------------- registry
def sam_models_dir(models_dir: str | Path | None = None) -> Path:
    """Where registered SAM checkpoints live: ``<models folder>/sam`` (models folder as dose prediction's)."""
    from twinrt.dosepredict.weights import user_models_dir

    return Path(models_dir).expanduser() / SAM_SUBDIR if models_dir else user_models_dir() / SAM_SUBDIR


def register_checkpoint(checkpoint: str | Path, model_type: str, model_id: Optional[str] = None,
                        models_dir: str | Path | None = None, builder: Optional[Callable[[], Any]] = None
                        ) -> dict[str, Any]:
    """Import a user-supplied checkpoint (offline: a local file is copied): check it, then record it.

    The file is loaded once (so a wrong type or a broken file is refused before anything is
    written), copied to ``<id>.pth`` and described by ``<id>.json`` (id, model_type, file, sha256,
    sizeMB, source file name, licence note).

    :return: the manifest entry.
    """
    loaded = load_sam(checkpoint, model_type, builder=builder)
    mid = model_id or Path(checkpoint).stem
    if not mid.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise InvalidInputError(f"A SAM model id may hold letters, digits, '-', '_' and '.', got {mid!r}")
    folder = sam_models_dir(models_dir)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{mid}.pth"
    if dest.resolve() != loaded.path.resolve():
        tmp = folder / f".{mid}.pth.part"
        shutil.copyfile(loaded.path, tmp)
        tmp.replace(dest)
    entry = {"id": mid, "model_type": model_type, "file": dest.name, "sha256": loaded.sha256,
             "sizeMB": round(dest.stat().st_size / 1e6, 2), "source": loaded.path.name,
             "license": "user-supplied checkpoint: SAM (Meta AI) and MedSAM are Apache-2.0; check the source"}
    write_text_atomic(folder / f"{mid}.json", json.dumps(entry, indent=1) + "\n")
    return entry


def list_checkpoints(models_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The registered SAM checkpoints (manifest entries), by id."""
    folder = sam_models_dir(models_dir)
    out = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return out


def load_registered(model_id: str, models_dir: str | Path | None = None,
                    builder: Optional[Callable[[], Any]] = None) -> LoadedSam:
    """Load a registered checkpoint by id, checking its sha256 against the manifest."""
    folder = sam_models_dir(models_dir)
    entry_path = folder / f"{model_id}.json"
    if not entry_path.is_file():
        have = ", ".join(e["id"] for e in list_checkpoints(models_dir)) or "none"
        raise MissingInputError(f"No SAM checkpoint '{model_id}' is registered in {folder} (registered: {have}); "
                                "register the .pth file first", entry_path)
    try:
        entry = json.loads(entry_path.read_text(encoding="utf-8"))
        weights, model_type, sha = folder / entry["file"], entry["model_type"], entry["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"The manifest {entry_path} is damaged ({exc.__class__.__name__}: {exc}); register "
                                "the checkpoint again") from exc
    return load_sam(weights, model_type, sha, builder, model_id)


# ------------------------------------------------------------------------------- prompting
class SliceSegmenter:
    """Prompts → mask on one CT slice with a loaded SAM (``segment_anything.SamPredictor``)."""

    def __init__(self, sam: LoadedSam, window_hu: Sequence[float] = DEFAULT_WINDOW_HU) -> None:
        from twinrt.autocontour.tv_compat import ensure_torchvision

        ensure_torchvision()
        from segment_anything import SamPredictor

        self.sam = sam
        self.window_hu = tuple(float(v) for v in window_hu)
        self.predictor = SamPredictor(sam.model)

    def segment(self, slice_hu: np.ndarray, points: Optional[Sequence[Sequence[float]]] = None,
                labels: Optional[Sequence[int]] = None, box: Optional[Sequence[float]] = None) -> tuple[np.ndarray, float]:
        """The mask (bool, (j, i)) SAM gives for the prompts, and its predicted IoU score.

        :param slice_hu: the slice (j, i) in HU.
        :param points: ``(i, j)`` voxel positions; ``labels``: 1 inside, 0 outside (default all 1).
        :param box: ``(i0, j0, i1, j1)`` voxel bounds.
        :raises InvalidInputError: no prompt, or prompts outside the slice.
        """
        import torch

        img = np.asarray(slice_hu)
        if img.ndim != 2:
            raise InvalidInputError(f"A slice must be 2D (j, i), got shape {img.shape}")
        h, w = img.shape
        pts = None if points is None or len(points) == 0 else np.asarray(points, dtype=np.float32).reshape(-1, 2)
        if pts is None and box is None:
            raise InvalidInputError("Give at least one point or a box to prompt Segment Anything")
        if pts is not None:
            if ((pts[:, 0] < 0) | (pts[:, 0] > w - 1) | (pts[:, 1] < 0) | (pts[:, 1] > h - 1)).any():
                raise InvalidInputError(f"Prompt points {pts.tolist()} lie outside the {w} x {h} slice")
            lab = np.ones(len(pts), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
            if lab.shape != (len(pts),) or not np.isin(lab, (0, 1)).all():
                raise InvalidInputError("Point labels must be one 0 (outside) or 1 (inside) per point")
        else:
            lab = None
        bx = None
        if box is not None:
            bx = np.asarray(box, dtype=np.float32).reshape(4)
            if not (0 <= bx[0] < bx[2] <= w - 1 + 1e-3 and 0 <= bx[1] < bx[3] <= h - 1 + 1e-3):
                raise InvalidInputError(f"The box {bx.tolist()} (i0, j0, i1, j1) must lie inside the {w} x {h} slice "
                                        "with i0 < i1 and j0 < j1")
        self.predictor.set_image(window_to_rgb(img, self.window_hu))
        with torch.no_grad():
            masks, scores, _ = self.predictor.predict(point_coords=pts, point_labels=lab, box=bx,
                                                      multimask_output=True)
        best = int(np.argmax(scores))
        return np.asarray(masks[best], dtype=bool), float(scores[best])


def prompts_on_slice(grid: Any, points_lps: Sequence[Sequence[float]] = (), labels: Sequence[int] = (),
                     box_corners_lps: Optional[Sequence[Sequence[float]]] = None,
                     box_center_lps: Optional[Sequence[float]] = None
                     ) -> tuple[int, list[tuple[float, float]], list[int], Optional[tuple[float, float, float, float]]]:
    """Patient-space prompts (LPS, mm) → voxel prompts on one axial slice of ``grid``.

    :param grid: the CT's :class:`~twinrt.geometry.Grid`.
    :param points_lps: prompt points; ``labels`` one 1 (inside) or 0 (outside) each.
    :param box_corners_lps: the box's corners (e.g. the 8 of a rotated ROI); its voxel extent
        (min/max i and j over the corners) is the box prompt, on the slice of ``box_center_lps``.
    :return: ``(k, points (i, j), labels, box (i0, j0, i1, j1) or None)``.
    :raises InvalidInputError: no prompt, prompts on several slices, or a slice outside the CT.
    """
    ijk = grid.lps_to_index(np.asarray(points_lps, dtype=float).reshape(-1, 3))
    box = None
    slices = {int(round(float(p[2]))) for p in ijk}
    if box_corners_lps is not None:
        c = grid.lps_to_index(np.asarray(box_corners_lps, dtype=float).reshape(-1, 3))
        box = (float(c[:, 0].min()), float(c[:, 1].min()), float(c[:, 0].max()), float(c[:, 1].max()))
        slices.add(int(round(float(grid.lps_to_index(np.asarray(box_center_lps, dtype=float))[2]))))
    if not len(ijk) and box is None:
        raise InvalidInputError("Place at least one point (or a box) on the structure to prompt Segment Anything")
    if len(slices) > 1:
        raise InvalidInputError(f"The prompts lie on slices {', '.join(map(str, sorted(slices)))}; place them all on "
                                "one axial slice")
    k = slices.pop()
    if not 0 <= k < grid.shape[0]:
        raise InvalidInputError(f"The prompts lie outside the CT (slice {k} of {grid.shape[0]})")
    return k, [(float(p[0]), float(p[1])) for p in ijk], [int(v) for v in labels], box


def _inner_point(mask: np.ndarray) -> tuple[float, float]:
    """The ``(i, j)`` of the mask's voxel farthest from its edge (inside even for a crescent)."""
    from scipy import ndimage

    d = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    j, i = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(i), float(j)


def _box(mask: np.ndarray, margin: int) -> tuple[float, float, float, float]:
    jj, ii = np.nonzero(mask)
    h, w = mask.shape
    return (float(max(ii.min() - margin, 0)), float(max(jj.min() - margin, 0)),
            float(min(ii.max() + margin, w - 1)), float(min(jj.max() + margin, h - 1)))


def propagate(segment: Callable[..., tuple[np.ndarray, float]], volume_hu: np.ndarray, k0: int, mask0: np.ndarray,
              max_slices: Optional[int] = None, min_area_px: int = 4, progress: Optional[ProgressCallback] = None,
              cancel: Optional[CancelToken] = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Carry a slice mask through the neighbouring slices, both ways (module docstring).

    :param segment: ``segment(slice_hu, points=, labels=, box=) -> (mask, score)``, e.g.
        :meth:`SliceSegmenter.segment`.
    :param volume_hu: the CT (k, j, i) in HU.
    :param k0: the prompted slice; ``mask0`` its mask (j, i).
    :param max_slices: at most this many slices each way (default: to the volume's ends).
    :param min_area_px: a mask smaller than this ends the propagation.
    :return: (mask (k, j, i), report: ``slices`` per direction, ``stopped`` reason per direction).
    """
    vol = np.asarray(volume_hu)
    if vol.ndim != 3:
        raise InvalidInputError(f"The CT must be 3D (k, j, i), got shape {vol.shape}")
    nk = vol.shape[0]
    if not 0 <= int(k0) < nk:
        raise InvalidInputError(f"Slice {k0} is outside the CT's {nk} slices")
    m0 = np.asarray(mask0, dtype=bool)
    if m0.shape != vol.shape[1:]:
        raise InvalidInputError(f"The slice mask {m0.shape} does not match the CT slices {vol.shape[1:]}")
    if m0.sum() < min_area_px:
        raise InvalidInputError("The prompted slice's mask is empty (or tiny): prompt again before propagating")
    out = np.zeros(vol.shape, dtype=bool)
    out[k0] = m0
    rep: dict[str, Any] = {"slices": {}, "stopped": {}}
    limit = nk if max_slices is None else int(max_slices)
    done, total = 0, min(limit, nk - 1 - k0) + min(limit, k0)
    for step, name in ((1, "superior (+k)"), (-1, "inferior (-k)")):
        prev, k, n = m0, int(k0) + step, 0
        reason = "reached the end of the volume"
        while 0 <= k < nk:
            if n >= limit:
                reason = f"reached the limit of {limit} slice(s)"
                break
            report(progress, done / max(total, 1), f"Propagating: slice {k}", cancel)
            m, _ = segment(vol[k], points=[_inner_point(prev)], labels=[1], box=_box(prev, PROPAGATION_MARGIN_PX))
            m = np.asarray(m, dtype=bool)
            area, prev_area = int(m.sum()), int(prev.sum())
            if area < min_area_px:
                reason = f"slice {k}: the mask vanished ({area} px)"
                break
            if area > MAX_GROWTH * prev_area:
                reason = f"slice {k}: the mask grew {area / prev_area:.1f}x (leak)"
                break
            if (m & prev).sum() < MIN_OVERLAP * area:
                reason = f"slice {k}: the mask left the previous one"
                break
            out[k] = m
            prev, k, n, done = m, k + step, n + 1, done + 1
        rep["slices"][name] = n
        rep["stopped"][name] = reason
    report(progress, 1.0, "Propagation done", cancel)
    return out, rep


def segment_structure(ct_hu: np.ndarray, segmenter: Any, k: int, points: Optional[Sequence[Sequence[float]]] = None,
                      labels: Optional[Sequence[int]] = None, box: Optional[Sequence[float]] = None,
                      propagate_slices: bool = True, max_slices: Optional[int] = None,
                      progress: Optional[ProgressCallback] = None,
                      cancel: Optional[CancelToken] = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Prompt slice ``k`` of a CT and (by default) propagate: the structure's mask (k, j, i).

    :param ct_hu: the CT (k, j, i) in HU.
    :param segmenter: a :class:`SliceSegmenter` (or anything with its ``segment`` method).
    :param k: the prompted slice; ``points``/``labels``/``box`` as :meth:`SliceSegmenter.segment`.
    :param propagate_slices: carry the mask through the neighbouring slices (:func:`propagate`).
    :return: (mask, report with ``prompt_slice``, ``prompt_score``, ``slices`` and ``stopped``).
    :raises InvalidInputError: a slice outside the CT, bad prompts, or an empty mask on slice ``k``.
    """
    vol = np.asarray(ct_hu)
    if vol.ndim != 3 or not 0 <= int(k) < vol.shape[0]:
        raise InvalidInputError(f"Slice {k} is not a slice of the CT (shape {vol.shape}, k from 0)")
    report(progress, 0.0, f"Segment Anything on slice {k}", cancel)
    mask0, score = segmenter.segment(vol[int(k)], points, labels, box)
    rep: dict[str, Any] = {"prompt_slice": int(k), "prompt_score": float(score)}
    if not propagate_slices:
        out = np.zeros(vol.shape, dtype=bool)
        out[int(k)] = mask0
        return out, {**rep, "slices": {}, "stopped": {}}
    sub = None if progress is None else (lambda f, text: progress(0.1 + 0.9 * f, text))
    out, prop = propagate(segmenter.segment, vol, int(k), mask0, max_slices, progress=sub, cancel=cancel)
    return out, {**rep, **prop}
