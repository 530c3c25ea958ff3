"""Read data for activation costs, sweeps and evaluation, as batches shaped like a model's example inputs.

Accepted: an image folder (class subfolders give labels), ``.npy`` / ``.npz`` arrays (``x`` and optional ``y``),
a ``.txt`` file (tokenised with the model's tokenizer and cut into blocks of the example sequence length) and a
folder written by ``datasets.save_to_disk``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from otfx.io import OtfxInputError
from otfx.io.models import LoadedModel, example_inputs

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_LABEL_KEYS = ("y", "labels", "label", "targets")
_INPUT_KEYS = ("x", "input_ids", "pixel_values", "inputs", "images", "data")

Labelled = list[tuple[tuple, torch.Tensor | None]]


def load_data(path: str | Path, anchor: LoadedModel, batch_size: int = 8, limit: int | None = None,
              example: tuple | None = None) -> list[tuple]:
    """Input batches (tuples, like ``example``) read from ``path``; at most ``limit`` samples."""
    return [inputs for inputs, _ in load_labelled(path, anchor, batch_size, limit, example)]


def load_labelled(path: str | Path, anchor: LoadedModel, batch_size: int = 8, limit: int | None = None,
                  example: tuple | None = None) -> Labelled:
    """Batches of ``(inputs, labels or None)`` read from ``path``; at most ``limit`` samples."""
    path = Path(path)
    if not path.exists():
        raise OtfxInputError(f"data {path} does not exist")
    if batch_size <= 0:
        raise OtfxInputError(f"batch size must be positive, got {batch_size}")
    example = example if example is not None else example_inputs(anchor)
    x, y = _read(path, anchor, example)
    x = _conform(x, example[0], path, anchor)
    if y is not None and len(y) != len(x):
        raise OtfxInputError(f"data {path} has {len(x)} inputs but {len(y)} labels")
    if limit is not None:
        x, y = x[:limit], (y[:limit] if y is not None else None)
    if len(x) == 0:
        raise OtfxInputError(f"data {path} holds no samples")
    return [((x[i:i + batch_size],), y[i:i + batch_size] if y is not None else None)
            for i in range(0, len(x), batch_size)]


def _read(path: Path, anchor: LoadedModel, example: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return _read_datasets(path, anchor, example)
        return _read_images(path, anchor, example)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return _read_numpy(path)
    if suffix == ".txt":
        return _read_text(path, anchor, example), None
    if suffix in IMAGE_SUFFIXES:
        return _images([path], anchor, example), None
    raise OtfxInputError(f"data {path}: unknown format {suffix or '(no suffix)'}; give an image folder, .npy, .npz "
                         "(arrays x and y), .txt or a datasets.save_to_disk folder")


def _read_numpy(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise OtfxInputError(f"cannot read data {path}: {err}") from None
    if isinstance(loaded, np.ndarray):
        return _tensor(loaded, path), None
    with loaded:
        keys = list(loaded.files)
        x_key = next((k for k in _INPUT_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        if x_key is None:
            raise OtfxInputError(f"data {path} holds arrays {keys}; name the inputs 'x' (and labels 'y')")
        y_key = next((k for k in _LABEL_KEYS if k in keys and k != x_key), None)
        x = _tensor(loaded[x_key], path)
        y = _tensor(loaded[y_key], path).long() if y_key else None
    return x, y


def _tensor(array: np.ndarray, path: Path) -> torch.Tensor:
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise OtfxInputError(f"data {path} holds {array.dtype} arrays; numbers are needed")
    return torch.from_numpy(np.ascontiguousarray(array))


def _conform(x: torch.Tensor, like: torch.Tensor, path: Path, anchor: LoadedModel) -> torch.Tensor:
    """Cast and reshape ``x`` (samples first) to the layout of the example input ``like``."""
    if x.ndim == like.ndim - 1 and like.ndim == 4 and like.shape[1] == 1:
        x = x.unsqueeze(1)  # grayscale images without a channel axis
    if x.ndim == like.ndim == 4 and x.shape[1] != like.shape[1] and x.shape[-1] == like.shape[1]:
        x = x.permute(0, 3, 1, 2)  # channels last
    if x.ndim != like.ndim:
        raise OtfxInputError(f"data {path} has samples of shape {tuple(x.shape[1:])}; {anchor.source} takes "
                             f"{tuple(like.shape[1:])} (batch axis first)")
    if like.dtype.is_floating_point:
        if like.ndim == 4 and tuple(x.shape[1:]) != tuple(like.shape[1:]):
            raise OtfxInputError(f"data {path} has images of shape {tuple(x.shape[1:])}; {anchor.source} takes "
                                 f"{tuple(like.shape[1:])}")
        return x.to(like.dtype)
    if x.is_floating_point() and not torch.equal(x, x.round()):
        raise OtfxInputError(f"data {path} holds fractional numbers; {anchor.source} takes integer ids")
    x = x.to(like.dtype)
    vocab = getattr(getattr(anchor.model, "config", None), "vocab_size", None) or (
        anchor.inputs.high if anchor.inputs else None)
    if x.numel() and (int(x.min()) < 0 or (vocab and int(x.max()) >= vocab)):
        raise OtfxInputError(f"data {path} has ids in [{int(x.min())}, {int(x.max())}]; {anchor.source} takes "
                             f"ids in [0, {vocab or 'vocab'})")
    return x


# ---------------------------------------------------------------------------------------------- images


def _read_images(folder: Path, anchor: LoadedModel, example: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise OtfxInputError(f"data folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and is "
                             "not a datasets.save_to_disk folder")
    classes = sorted({p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1})
    labels = None
    if classes and all(len(p.relative_to(folder).parts) > 1 for p in files):
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[p.relative_to(folder).parts[0]] for p in files])
    return _images(files, anchor, example), labels


def _images(items: list, anchor: LoadedModel, example: tuple) -> torch.Tensor:
    """Image files (or PIL images) resized to the model's size, scaled to [0, 1] and normalised."""
    from PIL import Image, UnidentifiedImageError

    like = example[0]
    if like.ndim != 4 or not like.dtype.is_floating_point:
        raise OtfxInputError(f"{anchor.source} does not take images (its inputs are {like.dtype} of shape "
                             f"{tuple(like.shape)}); give .npy/.npz arrays or text instead")
    channels, h, w = like.shape[1:]
    if channels not in (1, 3):
        raise OtfxInputError(f"{anchor.source} takes {channels}-channel images; give .npy/.npz arrays instead")
    mean, std = _normalisation(anchor, channels)
    out = []
    for item in items:
        try:
            img = Image.open(item) if isinstance(item, Path) else item
            with img:
                img = img.convert("RGB" if channels == 3 else "L").resize((w, h), Image.BILINEAR)
                array = np.asarray(img, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise OtfxInputError(f"cannot read image {item}: {err}") from None
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        out.append((torch.from_numpy(np.ascontiguousarray(array)) - mean) / std)
    return torch.stack(out).to(like.dtype)


def _normalisation(anchor: LoadedModel, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std: the HF image processor's, timm's pretrained config's, else 0.5 (ViT's default)."""
    mean = std = None
    source = Path(anchor.source)
    processor = source / "preprocessor_config.json"
    if processor.is_file():
        try:
            cfg = json.loads(processor.read_text())
            mean, std = cfg.get("image_mean"), cfg.get("image_std")
        except (OSError, json.JSONDecodeError):
            mean = std = None
    cfg = getattr(anchor.model, "pretrained_cfg", None) or {}
    mean = mean or cfg.get("mean") or [0.5] * channels
    std = std or cfg.get("std") or [0.5] * channels
    mean, std = list(mean)[:channels], list(std)[:channels]
    if len(mean) != channels:
        mean, std = [float(np.mean(mean))] * channels, [float(np.mean(std))] * channels
    return torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)


# ------------------------------------------------------------------------------------------------ text


def _read_text(path: Path, anchor: LoadedModel, example: tuple) -> torch.Tensor:
    if anchor.tokenizer is None:
        raise OtfxInputError(f"data {path} is text, but {anchor.source} has no tokenizer; save the tokenizer "
                             "with the model (tokenizer.save_pretrained into its folder) or give token ids as "
                             ".npy/.npz")
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise OtfxInputError(f"cannot read text data {path}: {err}") from None
    return _tokenise(lines, anchor, example, path)


def _tokenise(lines: list[str], anchor: LoadedModel, example: tuple, path: Path) -> torch.Tensor:
    """Token ids of all lines, concatenated and cut into blocks of the example's sequence length."""
    like = example[0]
    if like.ndim != 2 or like.dtype.is_floating_point:
        raise OtfxInputError(f"data {path} is text, but {anchor.source} takes {like.dtype} inputs of shape "
                             f"{tuple(like.shape)}")
    seq = like.shape[1]
    ids = [i for line in lines for i in anchor.tokenizer(line)["input_ids"]]
    n = len(ids) // seq
    if n == 0:
        raise OtfxInputError(f"data {path} has {len(ids)} tokens, fewer than one sequence of {seq}")
    return torch.tensor(ids[: n * seq]).view(n, seq)


# -------------------------------------------------------------------------------------------- datasets


def _read_datasets(folder: Path, anchor: LoadedModel, example: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        import datasets
    except ImportError:
        raise OtfxInputError(f"data {folder} is a datasets.save_to_disk folder, but the datasets package is not "
                             "installed; 'pip install datasets' or convert it to .npz") from None
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as err:  # datasets raises many types for broken folders
        raise OtfxInputError(f"cannot read datasets folder {folder}: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    columns = ds.column_names
    label = next((c for c in _LABEL_KEYS if c in columns), None)
    y = torch.tensor(ds[label]).long() if label else None
    if "input_ids" in columns or "pixel_values" in columns or "x" in columns:
        key = next(c for c in ("input_ids", "pixel_values", "x") if c in columns)
        try:
            return torch.tensor(np.asarray(ds[key])), y
        except ValueError:
            raise OtfxInputError(f"datasets column {key!r} in {folder} has ragged rows; pad or cut them") from None
    if "image" in columns or "img" in columns:
        key = "image" if "image" in columns else "img"
        return _images(list(ds[key]), anchor, example), y
    if "text" in columns:
        return _tokenise(list(ds["text"]), anchor, example, folder), None
    raise OtfxInputError(f"datasets folder {folder} has columns {columns}; expected input_ids, pixel_values, x, "
                         "image or text")
