"""Segment Anything prompts and propagation (twinrt.autocontour.sam) and the torchvision stand-in.

No SAM or MedSAM checkpoint can be downloaded here, so the full code path (checkpoint file →
sha256 → state dict → SamPredictor → mask) runs on a *tiny, randomly initialised SAM built from
segment-anything's own classes* (ImageEncoderViT, PromptEncoder, MaskDecoder, TwoWayTransformer):
its masks are meaningless, so those tests check shapes, types, provenance and errors, not
segmentation quality. Propagation is tested with an oracle slice segmenter on a synthetic sphere.
"""

import json

import numpy as np
import pytest

from twinrt.autocontour import tv_compat

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'twinrt[ai]')")
tv_compat.ensure_torchvision()  # segment_anything imports torchvision when imported
pytest.importorskip("segment_anything", reason="segment-anything is not installed (pip install 'twinrt[ai]')")

from twinrt.autocontour import sam as samlib  # noqa: E402
from twinrt.errors import InvalidInputError, MissingInputError  # noqa: E402


def tiny_sam(embed_dim=32):
    """A tiny, randomly initialised SAM from segment-anything's classes (twinrt's test builder)."""
    return samlib.build_tiny_sam(embed_dim)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(tiny_sam().state_dict(), path)
    return path


def test_torchvision_stand_in_functions():
    from PIL import Image

    img = tv_compat.to_pil_image(np.zeros((10, 20, 3), np.uint8))
    assert img.size == (20, 10)  # PIL: (width, height)
    assert tv_compat.resize(img, (5, 8)).size == (8, 5)  # torchvision: size is (height, width)
    assert isinstance(tv_compat.resize(img, (5, 8)), Image.Image)
    t = torch.rand(2, 3, 10, 20)
    assert tuple(tv_compat.resize(t, (5, 8)).shape) == (2, 3, 5, 8)
    assert tuple(tv_compat.resize(t, 5).shape) == (2, 3, 5, 10)  # shorter side 5, aspect kept
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert tv_compat.box_area(boxes).tolist() == [100.0, 100.0, 100.0, 100.0]
    # Boxes 0 and 1 overlap (IoU 0.68): 1 is suppressed; box 3 is box 0 but of another category: kept.
    keep = tv_compat.batched_nms(boxes, scores, torch.tensor([0, 0, 0, 1]), 0.5)
    assert sorted(keep.tolist()) == [0, 2, 3]
    assert tv_compat.batched_nms(boxes, scores, torch.tensor([0, 0, 0, 0]), 0.5).tolist() == [0, 2]


def test_window_to_rgb():
    rgb = samlib.window_to_rgb(np.array([[-1000.0, 40.0, 240.0, 3000.0]]), (400.0, 40.0))
    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, :, 0].tolist() == [0, 128, 255, 255]
    with pytest.raises(InvalidInputError, match="window width"):
        samlib.window_to_rgb(np.zeros((2, 2)), (0.0, 40.0))


def test_tiny_sam_full_path_from_checkpoint_to_mask(tiny_checkpoint):
    # Randomly initialised tiny SAM: the mask is meaningless; shape, type and provenance are checked.
    loaded = samlib.load_sam(tiny_checkpoint, "vit_b", builder=tiny_sam)
    assert loaded.sha256 == samlib.sha256_file(tiny_checkpoint) and not loaded.model.training
    seg = samlib.SliceSegmenter(loaded)
    slice_hu = np.full((40, 56), -1000.0, np.float32)  # non-square (the prompts' (i, j) order is checked by the
    # propagation, CLI and Logic tests, which know where the structure is; this random model cannot)
    slice_hu[10:30, 20:40] = 50.0
    mask, score = seg.segment(slice_hu, points=[(30.0, 20.0)], labels=[1], box=(18, 8, 42, 32))
    assert mask.shape == (40, 56) and mask.dtype == bool and np.isfinite(score)
    mask2, _ = seg.segment(slice_hu, box=(18, 8, 42, 32))
    assert mask2.shape == (40, 56)
    with pytest.raises(InvalidInputError, match="outside"):
        seg.segment(slice_hu, points=[(56.0, 5.0)])
    with pytest.raises(InvalidInputError, match="at least one point or a box"):
        seg.segment(slice_hu)
    with pytest.raises(InvalidInputError, match="labels"):
        seg.segment(slice_hu, points=[(3.0, 3.0)], labels=[2])
    for box in ((42, 8, 18, 32), (18, 8, 60, 32), (-1, 8, 42, 32)):  # reversed, past the edge, negative
        with pytest.raises(InvalidInputError, match="box"):
            seg.segment(slice_hu, box=box)


def test_checkpoint_errors(tiny_checkpoint, tmp_path):
    from twinrt.dosepredict.weights import WeightsIntegrityError

    with pytest.raises(MissingInputError, match="does not exist"):
        samlib.load_sam(tmp_path / "nope.pth", "vit_b")
    with pytest.raises(InvalidInputError, match="Unknown SAM model type"):
        samlib.load_sam(tiny_checkpoint, "vit_x")
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        samlib.load_sam(tiny_checkpoint, "vit_b", expected_sha256="0" * 64, builder=tiny_sam)
    # The weights of a 32-wide encoder do not fit a 48-wide one: refused, naming the declared type.
    with pytest.raises(samlib.SamCheckpointError, match="does not match the declared model type"):
        samlib.load_sam(tiny_checkpoint, "vit_b", builder=lambda: tiny_sam(embed_dim=48))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(samlib.SamCheckpointError, match="not a readable PyTorch checkpoint"):
        samlib.load_sam(bad, "vit_b")
    # A vit_l checkpoint declared as vit_b is recognised from its encoder width before building anything.
    fake = tmp_path / "vit_l_like.pth"
    torch.save({samlib._PATCH_KEY: torch.zeros(1024, 3, 16, 16)}, fake)
    with pytest.raises(samlib.SamCheckpointError, match="is a vit_l checkpoint, not vit_b"):
        samlib.load_sam(fake, "vit_b")
    assert samlib.detect_model_type({samlib._PATCH_KEY: torch.zeros(1280, 3, 16, 16)}) == "vit_h"
    assert samlib.detect_model_type({}) is None


def test_register_and_load_by_id(tiny_checkpoint, tmp_path):
    entry = samlib.register_checkpoint(tiny_checkpoint, "vit_b", "tiny-test", tmp_path, builder=tiny_sam)
    assert entry["sha256"] == samlib.sha256_file(tiny_checkpoint) and entry["model_type"] == "vit_b"
    stored = json.loads((tmp_path / "sam" / "tiny-test.json").read_text())
    assert stored == entry and (tmp_path / "sam" / "tiny-test.pth").is_file()
    assert [e["id"] for e in samlib.list_checkpoints(tmp_path)] == ["tiny-test"]
    loaded = samlib.load_registered("tiny-test", tmp_path, builder=tiny_sam)
    assert loaded.model_id == "tiny-test" and loaded.sha256 == entry["sha256"]
    # A swapped file is refused by its manifest sha256.
    torch.save(tiny_sam(embed_dim=32).state_dict() | {"extra": torch.zeros(1)}, tmp_path / "sam" / "tiny-test.pth")
    from twinrt.dosepredict.weights import WeightsIntegrityError

    with pytest.raises(WeightsIntegrityError):
        samlib.load_registered("tiny-test", tmp_path, builder=tiny_sam)
    with pytest.raises(MissingInputError, match="register"):
        samlib.load_registered("absent", tmp_path)
    (tmp_path / "sam" / "damaged.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="damaged"):
        samlib.load_registered("damaged", tmp_path)
    # A broken file is refused before anything is written.
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"\0" * 10)
    with pytest.raises(samlib.SamCheckpointError):
        samlib.register_checkpoint(bad, "vit_b", "broken", tmp_path)
    assert not (tmp_path / "sam" / "broken.json").exists()


def _sphere_volume():
    k, j, i = np.meshgrid(np.arange(30), np.arange(40), np.arange(50), indexing="ij")
    sphere = (k - 14) ** 2 + (j - 20) ** 2 + (i - 24) ** 2 <= 9 ** 2
    vol = np.where(sphere, 60.0, -20.0).astype(np.float32)
    vol[:, 30:, :] = 400.0  # a bright slab the oracle must not leak into (it is outside every box)
    return vol, sphere


def oracle(slice_hu, points=None, labels=None, box=None):
    """A perfect slice segmenter: voxels inside the box brighter than 30 HU and darker than 200 HU."""
    i0, j0, i1, j1 = (int(round(v)) for v in box)
    m = np.zeros(slice_hu.shape, bool)
    m[j0:j1 + 1, i0:i1 + 1] = (slice_hu[j0:j1 + 1, i0:i1 + 1] > 30) & (slice_hu[j0:j1 + 1, i0:i1 + 1] < 200)
    i, j = points[0]
    assert m[int(j), int(i)], "the propagation prompt point must lie inside the structure"
    return m, 1.0


def test_propagation_recovers_a_sphere_and_stops_at_its_ends():
    vol, sphere = _sphere_volume()
    out, rep = samlib.propagate(oracle, vol, 14, sphere[14])
    assert np.array_equal(out[8:21], sphere[8:21])  # radius 9: slices 5..23; tiny end caps stop it
    assert out.sum() >= 0.97 * sphere.sum() and not (out & ~sphere).any()
    assert "vanished" in rep["stopped"]["superior (+k)"] and "vanished" in rep["stopped"]["inferior (-k)"]
    limited, rep2 = samlib.propagate(oracle, vol, 14, sphere[14], max_slices=2)
    assert np.nonzero(limited.any(axis=(1, 2)))[0].tolist() == [12, 13, 14, 15, 16]
    assert rep2["slices"] == {"superior (+k)": 2, "inferior (-k)": 2}


def test_propagation_stops_at_a_leak():
    vol, sphere = _sphere_volume()
    vol[17, 0, 0] = 123.0  # marks slice 17 for the segmenter below

    def leaky(slice_hu, points=None, labels=None, box=None):
        m, s = oracle(slice_hu, points, labels, box)
        if slice_hu[0, 0] == 123.0:
            m = np.ones_like(m)  # the prompt leaked over the whole slice
        return m, s

    out, rep = samlib.propagate(leaky, vol, 14, sphere[14])
    assert not out[17:].any() and out[16].any()
    assert "leak" in rep["stopped"]["superior (+k)"]


def test_propagation_bad_input():
    vol, sphere = _sphere_volume()
    with pytest.raises(InvalidInputError, match="outside the CT"):
        samlib.propagate(oracle, vol, 30, sphere[14])
    with pytest.raises(InvalidInputError, match="does not match"):
        samlib.propagate(oracle, vol, 14, sphere[14, :, :10])
    with pytest.raises(InvalidInputError, match="empty"):
        samlib.propagate(oracle, vol, 14, np.zeros_like(sphere[14]))


def test_cli_registers_a_checkpoint_and_contours_from_a_prompt(tiny_checkpoint, tmp_path, monkeypatch):
    """CLI wiring end to end (register → load by id → prompt → propagate → RTSTRUCT + audit entry).

    The tiny random SAM stands in for vit_b; its masks are meaningless, so the slice segmenter is
    replaced by a disk around the prompt point (the SAM forward pass is tested above).
    """
    import segment_anything

    from test_autocontour_classical import thorax
    from twinrt.audit import AuditLog
    from twinrt.cli import main
    from twinrt.dicom.folder import export_case, import_case
    from twinrt.model import Case

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: tiny_sam())
    models = tmp_path / "models"
    assert main(["contour", "sam-register", str(tiny_checkpoint), "--model-type", "vit_b", "--id", "tiny",
                 "--models-dir", str(models)]) == 0

    def disk(self, slice_hu, points=None, labels=None, box=None):
        jj, ii = np.mgrid[:slice_hu.shape[0], :slice_hu.shape[1]]
        i, j = points[0]
        return (ii - i) ** 2 + (jj - j) ** 2 <= 16, 0.9

    monkeypatch.setattr(samlib.SliceSegmenter, "segment", disk)
    ct, _ = thorax()
    src, out = tmp_path / "in", tmp_path / "out"
    export_case(Case("THORAX", ct, [], {}, [], {"patient_name": "Thorax^Synthetic"}), src)
    args = ["contour", "sam", str(src), "--out", str(out), "--model", "tiny", "--models-dir", str(models),
            "--slice", "20", "--point", "48", "30", "--name", "Lesion", "--max-slices", "3"]
    assert main(args) == 0
    back = import_case(out)
    lesion = back.structure("Lesion").mask
    assert np.nonzero(lesion.any(axis=(1, 2)))[0].tolist() == list(range(17, 24))  # slice 20 ± 3
    assert lesion[20, 30, 48] and not lesion[20, 30, 60]  # (i, j) = (48, 30): column 48, row 30
    entry = AuditLog.of_case(back).entries[-1]
    assert entry["details"]["model_id"] == "tiny" and entry["details"]["sha256"] == samlib.sha256_file(tiny_checkpoint)
    # The same name again is refused (the patient's structure is kept) unless --replace.
    assert main(args[:4] + [str(tmp_path / "again")] + args[5:]) == 0  # the input folder has no Lesion
    src2 = out
    assert main(["contour", "sam", str(src2), "--out", str(tmp_path / "x")] + args[5:]) == 2
    assert not (tmp_path / "x").exists()
    assert main(["contour", "sam", str(src2), "--out", str(tmp_path / "y")] + args[5:] + ["--replace"]) == 0


def test_prompts_on_slice_converts_patient_points_to_voxels():
    from twinrt.geometry import Grid

    grid = Grid((10, 20, 30), (2.0, 2.5, 3.0), (-10.0, -20.0, -5.0))  # (i, j, k) spacing, LPS origin
    lps = grid.index_to_lps(np.array([[12.0, 4.0, 6.0], [3.0, 15.0, 6.0]]))
    k, pts, labels, box = samlib.prompts_on_slice(grid, lps, [1, 0])
    assert k == 6 and pts == [pytest.approx((12.0, 4.0)), pytest.approx((3.0, 15.0))] and labels == [1, 0]
    corners = grid.index_to_lps(np.array([[2.0, 3.0, 5.6], [9.0, 8.0, 6.4]]))
    k, pts, _, box = samlib.prompts_on_slice(grid, box_corners_lps=corners, box_center_lps=corners.mean(axis=0))
    assert k == 6 and pts == [] and box == pytest.approx((2.0, 3.0, 9.0, 8.0))
    with pytest.raises(InvalidInputError, match="at least one point"):
        samlib.prompts_on_slice(grid)
    with pytest.raises(InvalidInputError, match="slices 2, 6"):
        samlib.prompts_on_slice(grid, grid.index_to_lps(np.array([[1.0, 1.0, 6.0], [1.0, 1.0, 2.0]])), [1, 1])
    with pytest.raises(InvalidInputError, match="outside the CT"):
        samlib.prompts_on_slice(grid, grid.index_to_lps(np.array([[1.0, 1.0, 12.0]])), [1])
