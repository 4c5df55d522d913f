"""The four torchvision functions Segment Anything imports, for when torchvision cannot be used.

``segment_anything`` imports ``torchvision.transforms.functional.resize`` and ``to_pil_image``
(``utils/transforms.py``) and ``torchvision.ops.boxes.batched_nms`` and ``box_area``
(``automatic_mask_generator.py``) at import time. PyPI's torchvision wheels fail to load with the
CPU torch TwinRT pins ("operator torchvision::nms does not exist"); in Slicer, SlicerPyTorch brings
a matching torchvision. :func:`ensure_torchvision` keeps a working torchvision and, only when there
is none, registers a minimal stand-in package made of the functions below (nothing else of
torchvision is provided).
"""

from __future__ import annotations

import sys
import types
from typing import Any, Sequence

#: Modules of the stand-in package.
SHIM_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                "torchvision.ops", "torchvision.ops.boxes")
#: Attribute set on the stand-in package, so that code (and tests) can tell it from the real one.
SHIM_MARKER = "__twinrt_shim__"


def to_pil_image(pic: Any, mode: str | None = None) -> Any:
    """An (H, W, C) or (H, W) uint8 array (or a (C, H, W) tensor) as a PIL image."""
    import numpy as np
    from PIL import Image

    if hasattr(pic, "detach"):  # a torch tensor, (C, H, W) like torchvision's
        arr = pic.detach().cpu().numpy()
        if arr.ndim == 3:
            arr = np.transpose(arr, (1, 2, 0))
        if arr.dtype != np.uint8:
            arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    else:
        arr = np.asarray(pic)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)


def resize(img: Any, size: Sequence[int] | int, interpolation: Any = None, max_size: Any = None,
           antialias: Any = True) -> Any:
    """Resize a PIL image or a (..., H, W) tensor to ``size`` = (height, width), bilinear.

    An int ``size`` sets the shorter side, keeping the aspect ratio (torchvision's rule).
    """
    if hasattr(img, "detach"):
        import torch.nn.functional as F

        h, w = int(img.shape[-2]), int(img.shape[-1])
        out_h, out_w = _target(size, h, w)
        x = img.reshape((-1, 1, h, w)).float()
        y = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=bool(antialias))
        return y.reshape(tuple(img.shape[:-2]) + (out_h, out_w)).to(img.dtype)
    from PIL import Image

    w, h = img.size
    out_h, out_w = _target(size, h, w)
    return img.resize((out_w, out_h), Image.BILINEAR)


def _target(size: Sequence[int] | int, h: int, w: int) -> tuple[int, int]:
    if isinstance(size, int) or len(size) == 1:
        s = int(size if isinstance(size, int) else size[0])
        return (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    return int(size[0]), int(size[1])


def box_area(boxes: Any) -> Any:
    """Areas of (N, 4) boxes given as (x1, y1, x2, y2)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _box_iou(a: Any, b: Any) -> Any:
    import torch

    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter).clamp(min=1e-12)


def nms(boxes: Any, scores: Any, iou_threshold: float) -> Any:
    """Greedy non-maximum suppression: indices of the kept boxes, by decreasing score."""
    import torch

    order = torch.argsort(scores, descending=True)
    keep = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    iou = _box_iou(boxes, boxes)
    for idx in order.tolist():
        if suppressed[idx]:
            continue
        keep.append(idx)
        suppressed |= iou[idx] > iou_threshold
    return torch.as_tensor(keep, dtype=torch.long)


def batched_nms(boxes: Any, scores: Any, idxs: Any, iou_threshold: float) -> Any:
    """NMS within each category ``idxs`` (boxes of different categories never suppress each other)."""
    import torch

    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _torchvision_works() -> bool:
    import importlib

    try:
        ops = importlib.import_module("torchvision.ops.boxes")
        functional = importlib.import_module("torchvision.transforms.functional")
        return all(hasattr(m, n) for m, n in ((ops, "batched_nms"), (ops, "box_area"), (functional, "resize"),
                                               (functional, "to_pil_image")))
    except Exception:  # ImportError, or RuntimeError "operator torchvision::nms does not exist"
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def ensure_torchvision() -> bool:
    """Make ``import segment_anything`` possible: True when the real torchvision is used.

    Without a working torchvision, the stand-in modules (:data:`SHIM_MODULES`) are registered in
    ``sys.modules``; they hold only the four functions above (and ``nms``).
    """
    mod = sys.modules.get("torchvision")
    if mod is not None and getattr(mod, SHIM_MARKER, False):
        return False
    if _torchvision_works():
        return True
    import importlib.machinery

    made = {name: types.ModuleType(name) for name in SHIM_MODULES}
    for name, module in made.items():
        # A spec keeps importlib.util.find_spec working; version 0.0.0 fails any minimum-version
        # check, so libraries that probe torchvision (MONAI's optional_import) treat it as absent.
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    made["torchvision"].__version__ = "0.0.0"
    setattr(made["torchvision"], SHIM_MARKER, True)
    made["torchvision"].transforms = made["torchvision.transforms"]
    made["torchvision"].ops = made["torchvision.ops"]
    made["torchvision.transforms"].functional = made["torchvision.transforms.functional"]
    made["torchvision.ops"].boxes = made["torchvision.ops.boxes"]
    made["torchvision.transforms.functional"].resize = resize
    made["torchvision.transforms.functional"].to_pil_image = to_pil_image
    for name in ("batched_nms", "box_area", "nms"):
        setattr(made["torchvision.ops.boxes"], name, globals()[name])
        setattr(made["torchvision.ops"], name, globals()[name])
    sys.modules.update(made)
    return False
