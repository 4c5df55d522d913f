"""Model weights: manifest entries, sha256 checks, lookup, saving and loading.

A model is two files: ``<id>.pt`` (a torch ``state_dict``, float32 or float16) and its manifest
entry ``<id>.json`` (id, version, file, sha256, sizeMB, license, data, recipe, training and
validation figures; ``models.schema.json`` describes it). A folder may also hold ``models.json``
(``{"default": id or null, "models": [entries]}``) listing several models.

Folders searched for a model id, in order:

1. ``$TWINRT_MODELS_DIR`` when set, else ``~/.twinrt/models`` (models a user trained or downloaded);
2. the package folder ``twinrt/dosepredict/models`` (models shipped with TwinRT).

Every load recomputes the sha256 of the weights file and refuses a file that differs from its
manifest entry (:class:`WeightsIntegrityError`): a corrupt download or a swapped file must never
predict silently.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from twinrt.dosepredict.config import DosePredictConfig
from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.io_utils import atomic_path, sha256_file, write_text_atomic  # noqa: F401  (sha256_file re-exported)

MODELS_JSON = "models.json"
SCHEMA_JSON = "models.schema.json"
#: Environment variable that replaces ``~/.twinrt/models``.
MODELS_DIR_ENV = "TWINRT_MODELS_DIR"
#: License of weights trained by TwinRT (TwinRT's own; the training data keep theirs, see ``data``).
WEIGHTS_LICENSE = "BSD-3-Clause"


class WeightsIntegrityError(InvalidInputError):
    """A weights file whose sha256 differs from its manifest entry."""


def package_models_dir() -> Path:
    """``twinrt/dosepredict/models`` (shipped models, ``models.json`` and its schema)."""
    return Path(__file__).resolve().parent / "models"


def user_models_dir() -> Path:
    """``$TWINRT_MODELS_DIR``, else ``~/.twinrt/models`` (read at call time)."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".twinrt" / "models"


def model_dirs() -> list[Path]:
    """The folders searched for models, in order (module docstring)."""
    return [user_models_dir(), package_models_dir()]


# ----------------------------------------------------------------------------- schema


def load_schema() -> dict[str, Any]:
    """The JSON schema of ``models.json`` (``$defs/entry`` describes one model)."""
    return json.loads((package_models_dir() / SCHEMA_JSON).read_text(encoding="utf-8"))


_TYPES = {"string": str, "number": (int, float), "integer": int, "object": dict, "array": list, "boolean": bool,
          "null": type(None)}


def _check(value: Any, schema: dict[str, Any], root: dict[str, Any], where: str) -> None:
    """Validate against the subset of JSON Schema the manifest schema uses
    (``$ref``, ``type``, ``required``, ``properties``, ``items``, ``pattern``, ``minimum``, ``enum``)."""
    import re

    if "$ref" in schema:
        ref = schema["$ref"]
        node: Any = root
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        schema = node
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        ok = any(isinstance(value, _TYPES[t]) and not (t in ("number", "integer") and isinstance(value, bool))
                 for t in names)
        if not ok:
            raise InvalidInputError(f"{where} must be {' or '.join(names)}, got {type(value).__name__}")
    if "enum" in schema and value not in schema["enum"]:
        raise InvalidInputError(f"{where} must be one of {schema['enum']}, got {value!r}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        raise InvalidInputError(f"{where} = {value!r} does not match {schema['pattern']}")
    if isinstance(value, (int, float)) and "minimum" in schema and value < schema["minimum"]:
        raise InvalidInputError(f"{where} must be >= {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise InvalidInputError(f"{where} lacks the required key '{key}'")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _check(value[key], sub, root, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], root, f"{where}[{i}]")


def validate_manifest(manifest: dict[str, Any], source: str = "models.json") -> None:
    """Check a ``models.json`` document against the schema; :class:`InvalidInputError` on a mismatch."""
    schema = load_schema()
    _check(manifest, schema, schema, source)
    ids = [m["id"] for m in manifest["models"]]
    if len(set(ids)) != len(ids):
        raise InvalidInputError(f"{source} lists a model id twice: {ids}")
    if manifest.get("default") is not None and manifest["default"] not in ids:
        raise InvalidInputError(f"{source}: default model '{manifest['default']}' is not in its models")


def validate_entry(entry: dict[str, Any], source: str = "manifest entry") -> None:
    """Check one model's manifest entry against ``$defs/entry`` of the schema."""
    schema = load_schema()
    _check(entry, {"$ref": "#/$defs/entry"}, schema, source)


# ----------------------------------------------------------------------------- lookup


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path} is not readable JSON ({exc}); fix or remove it") from exc


def _entries_in(folder: Path) -> list[tuple[dict[str, Any], Path]]:
    """(entry, folder) for every model described in ``folder`` (models.json first, then <id>.json)."""
    out: list[tuple[dict[str, Any], Path]] = []
    if not folder.is_dir():
        return out
    seen = set()
    manifest_path = folder / MODELS_JSON
    if manifest_path.is_file():
        manifest = _read_json(manifest_path)
        validate_manifest(manifest, str(manifest_path))
        for entry in manifest["models"]:
            out.append((entry, folder))
            seen.add(entry["id"])
    for p in sorted(folder.glob("*.json")):
        if p.name in (MODELS_JSON, SCHEMA_JSON) or p.name.endswith(".config.json"):
            continue
        entry = _read_json(p)
        if isinstance(entry, dict) and "sha256" in entry and "id" in entry and entry["id"] not in seen:
            out.append((entry, folder))
            seen.add(entry["id"])
    return out


def list_models() -> list[dict[str, Any]]:
    """Every model found (module docstring), each entry with ``"folder"`` added; first folder wins per id."""
    found: dict[str, dict[str, Any]] = {}
    for folder in model_dirs():
        for entry, where in _entries_in(folder):
            found.setdefault(entry["id"], {**entry, "folder": str(where)})
    return list(found.values())


def _default_id() -> Optional[str]:
    for folder in model_dirs():
        path = folder / MODELS_JSON
        if path.is_file():
            default = _read_json(path).get("default")
            if default:
                return str(default)
    models = list_models()
    return models[0]["id"] if len(models) == 1 else None


def resolve_model(model: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """The manifest entry and weights path of a model id, a ``.pt``/``.json`` path, or the default.

    :raises MissingInputError: no such model (the message lists the installed ones and how to get one).
    """
    if model is not None and (Path(model).suffix in (".pt", ".json") or Path(model).exists()):
        path = Path(model)
        if path.suffix == ".json":
            entry_path = path
        else:
            entry_path = path.with_suffix(".json")
        if not entry_path.is_file():
            raise MissingInputError(f"Model {path} needs its manifest entry {entry_path.name} beside it "
                                    "(train writes both); without it the network cannot be rebuilt", entry_path)
        entry = _read_json(entry_path)
        validate_entry(entry, str(entry_path))
        weights = entry_path.parent / entry["file"]
        if path.suffix == ".pt" and weights.resolve() != path.resolve():
            weights = path
        return entry, weights
    wanted = str(model) if model is not None else _default_id()
    installed = list_models()
    if wanted is None:
        if installed:
            raise MissingInputError(f"Several dose-prediction models are installed "
                                    f"({', '.join(m['id'] for m in installed)}) and none is the default; "
                                    "choose one by id", None)
        raise MissingInputError("No dose-prediction model is installed: train one with 'twinrt dose-predict train "
                                "--config twinrt/dosepredict/configs/openkbp_unet_cpu.json --out DIR' and register "
                                "it ('twinrt dose-predict register DIR/<id>.json'), or put <id>.pt and <id>.json in "
                                f"{user_models_dir()} (${MODELS_DIR_ENV})", user_models_dir())
    for entry in installed:
        if entry["id"] == wanted:
            folder = Path(entry.pop("folder"))
            validate_entry(entry, f"{folder}/{entry['id']}")
            return entry, folder / entry["file"]
    raise MissingInputError(f"No dose-prediction model '{wanted}' in {', '.join(str(d) for d in model_dirs())}; "
                            f"installed: {', '.join(m['id'] for m in installed) or 'none'}", None)


# ----------------------------------------------------------------------------- save / load


@dataclass
class LoadedModel:
    """A network with verified weights.

    :param net: the ``torch.nn.Module`` in evaluation mode.
    :param config: its recipe.
    :param entry: its manifest entry.
    :param weights_path: the ``.pt`` file.
    :param sha256: the verified sha256 of that file.
    """

    net: Any
    config: DosePredictConfig
    entry: dict[str, Any]
    weights_path: Path
    sha256: str

    @property
    def model_id(self) -> str:
        """The model's id."""
        return str(self.entry["id"])


def write_weights(net: Any, path: str | Path, dtype: str = "float32") -> tuple[str, float]:
    """Save ``net.state_dict()`` (floating tensors cast to ``dtype``) atomically.

    :return: ``(sha256, size in MB)`` of the written file.
    """
    import torch

    cast = torch.float16 if dtype == "float16" else torch.float32
    state = {k: (v.detach().to("cpu", cast) if v.is_floating_point() else v.detach().cpu())
             for k, v in net.state_dict().items()}
    # Serialise in memory: torch.save(path) names the zip records after the (temporary) file name,
    # which would give the same weights a different sha256 on every save.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return sha256_file(path), path.stat().st_size / 1e6


def save_model(net: Any, config: DosePredictConfig, out_dir: str | Path, data: Optional[dict[str, Any]] = None,
               validation: Optional[dict[str, Any]] = None, **extra: Any) -> tuple[dict[str, Any], Path]:
    """Write ``<out_dir>/<model_id>.pt`` and its manifest entry ``<out_dir>/<model_id>.json``.

    :param net: the network (its ``state_dict`` is saved as ``config.predict.weights_dtype``).
    :param config: its recipe (stored in the entry as ``recipe``).
    :param data: the training data description (``name``, ``citation``, ...); default "untrained".
    :param validation: validation figures; default none yet.
    :param extra: further entry fields (``training``, ``command``, ...).
    :return: the entry and the path of its JSON file.
    """
    import twinrt

    out = Path(out_dir)
    weights_path = out / f"{config.model_id}.pt"
    sha, size_mb = write_weights(net, weights_path, config.predict.weights_dtype)
    entry: dict[str, Any] = {
        "id": config.model_id,
        "version": config.version,
        "file": weights_path.name,
        "sha256": sha,
        "sizeMB": round(size_mb, 3),
        "license": WEIGHTS_LICENSE,
        "data": data or {"name": "none (untrained network)", "citation": ""},
        "recipe": config.to_dict(),
        "validation": validation or {"dose_score": None, "dvh_score": None, "n_patients": 0},
        "research_use_only": twinrt.RESEARCH_USE_ONLY,
        **extra,
    }
    entry_path = out / f"{config.model_id}.json"
    validate_entry(entry, str(entry_path))
    write_text_atomic(entry_path, json.dumps(entry, indent=1) + "\n")
    return entry, entry_path


def load_weights_file(path: str | Path, expected_sha256: str) -> dict[str, Any]:
    """Read a state dict after checking its sha256 (:class:`WeightsIntegrityError` on a mismatch)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"Weights file {path} does not exist; reinstall the model or retrain it", path)
    actual = sha256_file(path)
    if actual != str(expected_sha256).lower():
        raise WeightsIntegrityError(f"Weights file {path} has sha256 {actual} but its manifest entry says "
                                    f"{expected_sha256}: the file is corrupt or was replaced. Download or train it "
                                    "again; do not edit the manifest to match")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise InvalidInputError(f"Weights file {path} cannot be read by torch ({exc}); retrain the model") from exc
    if not isinstance(state, dict):
        raise InvalidInputError(f"Weights file {path} does not hold a state_dict")
    return state


def load_model(model: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Build the network of a model and load its verified weights.

    :param model: model id, path of a ``.pt`` (with its ``.json`` beside it) or of a manifest
        entry ``.json``; ``None`` for the default model.
    :param device: torch device (``"cpu"``, ``"cuda"``).
    :raises WeightsIntegrityError: the weights' sha256 differs from the manifest.
    :raises MissingInputError: no such model.
    """
    import torch

    from twinrt.dosepredict.model import build_network

    entry, weights = resolve_model(model)
    config = DosePredictConfig.from_dict(entry["recipe"], f"recipe of model {entry['id']} ({weights})")
    state = load_weights_file(weights, entry["sha256"])
    net = build_network(config)
    try:
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        raise InvalidInputError(f"Weights {weights} do not fit the recipe of model {entry['id']} ({exc}); "
                                "the manifest and the weights belong to different models") from exc
    net.to(torch.device(device)).eval()
    return LoadedModel(net, config, entry, weights, entry["sha256"])


def register_model(entry_path: str | Path, dest_dir: str | Path | None = None, make_default: bool = False
                   ) -> Path:
    """Install a trained model (``<id>.json`` + its weights) into ``dest_dir``'s ``models.json``.

    :param entry_path: the manifest entry written by :func:`twinrt.dosepredict.train.train`.
    :param dest_dir: default :func:`user_models_dir`; the package folder ships a model with TwinRT.
    :param make_default: make it the folder's default model.
    :return: the updated ``models.json``.
    """
    entry_path = Path(entry_path)
    if not entry_path.is_file():
        raise MissingInputError(f"Manifest entry {entry_path} does not exist", entry_path)
    entry = _read_json(entry_path)
    validate_entry(entry, str(entry_path))
    src = entry_path.parent / entry["file"]
    if sha256_file(src) != entry["sha256"]:
        raise WeightsIntegrityError(f"{src} does not match the sha256 in {entry_path}; retrain the model")
    dest = Path(dest_dir) if dest_dir is not None else user_models_dir()
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / entry["file"]
    if src.resolve() != target.resolve():
        with atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)
    manifest_path = dest / MODELS_JSON
    manifest = _read_json(manifest_path) if manifest_path.is_file() else {"default": None, "models": []}
    manifest["models"] = [m for m in manifest["models"] if m["id"] != entry["id"]] + [entry]
    if make_default or manifest.get("default") is None:
        manifest["default"] = entry["id"]
    validate_manifest(manifest, str(manifest_path))
    write_text_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return manifest_path
