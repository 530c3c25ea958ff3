"""Pretrained checkpoints as users have them: which folder holds the transformer, its weight files, its model type
and class when ``config.json`` does not say, sentence-transformers pipelines, and zip archives.

Loading itself is transformers' ``from_pretrained``; this module only finds what to hand it and says clearly why a
folder cannot be loaded. Nothing here writes to an input.
"""

from __future__ import annotations

import json
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from otfx.io import OtfxInputError

SINGLE = ("model.safetensors", "pytorch_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
FOREIGN = ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index", "model.onnx", "rust_model.ot")
MODULES_FILE = "modules.json"
#: model types of configs written before ``model_type`` existed (transformers < 3), the only ones that may lack it
LEGACY_TYPES = ("bert", "roberta", "albert", "distilbert", "electra", "xlm-roberta", "camembert", "flaubert", "xlm",
                "xlnet", "gpt2", "openai-gpt", "transfo-xl", "ctrl", "t5", "bart")
#: the auto-class tables tried, in order, when the class has to be chosen from the weights' names
HEAD_TABLES = ("MODEL_MAPPING_NAMES", "MODEL_FOR_PRETRAINING_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
               "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
               "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
               "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES")
POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken")
_KEEP_LIMIT = 256 * 2**20  # bytes of sentence-transformers module files kept in memory for saving


# ------------------------------------------------------------------------------------------- weight files


def weight_files(folder: Path) -> list[Path]:
    """The PyTorch weight files of a Hugging Face folder (shards from its index), checked to exist and to be
    readable safetensors; an error names the folder or the file and says what to do."""
    for index_name in INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise OtfxInputError(f"{index} is not a shard index (JSON with a 'weight_map'): {err}") from None
            shards = sorted({str(v) for v in weight_map.values()})
            absent = [s for s in shards if not (folder / s).is_file()]
            if absent:
                raise OtfxInputError(f"{index} names {len(absent)} shard(s) that are not in {folder}: "
                                     f"{', '.join(absent[:3])}; copy the whole checkpoint folder")
            files = [folder / s for s in shards]
            break
    else:
        files = [folder / name for name in SINGLE if (folder / name).is_file()][:1]
    if not files:
        foreign = [name for name in FOREIGN if (folder / name).is_file()]
        if foreign:
            raise OtfxInputError(f"{folder} holds only {', '.join(foreign)}, not PyTorch weights; convert it with "
                                 "transformers (from_pretrained(..., from_tf=True) or from_flax=True) and "
                                 "save_pretrained, then pass the new folder")
        raise OtfxInputError(f"{folder} has config.json but no weights: expected {' or '.join(SINGLE)} or a "
                             f"sharded checkpoint with {' or '.join(INDEXES)}")
    for file in files:
        if file.suffix == ".safetensors":
            _safetensors_names(file)
    return files


def _safetensors_names(file: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as handle:
            return list(handle.keys())
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise OtfxInputError(f"cannot read {file}: not a valid safetensors file ({_first_line(err)}); the file is "
                             "corrupt or truncated: copy or download it again") from None


def tensor_names(files: list[Path]) -> list[str]:
    """The tensor names stored in ``files``, without reading the tensors where the format allows it."""
    names: list[str] = []
    for file in files:
        if file.suffix == ".safetensors":
            names += _safetensors_names(file)
            continue
        try:
            state = torch.load(file, map_location="meta", weights_only=True)
        except Exception as err:  # pickle raises many types
            raise OtfxInputError(f"cannot read {file}: {_first_line(err)}; it must be a torch.save state dict "
                                 "(re-save it with save_pretrained)") from None
        if not isinstance(state, dict):
            raise OtfxInputError(f"{file} is not a state dict (name -> tensor)")
        names += [str(k) for k in state]
    return names


# ------------------------------------------------------------------------------------- config and class


def read_config(folder: Path, names: list[str] | None, overrides: dict) -> tuple[Any, str | None]:
    """The folder's config, with ``overrides`` applied, and a note when its model type had to be inferred.

    The model type is ``overrides['model_type']``, else ``config.json``'s, else the prefix of the weights' names
    (``bert.encoder...``), else the folder's name (transformers' own rule before configs named their type).
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    overrides = dict(overrides)
    model_type = overrides.pop("model_type", None)
    overrides.pop("architecture", None)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise OtfxInputError(f"cannot read {folder / 'config.json'}: {err}") from None
    if not isinstance(raw, dict):
        raise OtfxInputError(f"{folder / 'config.json'} must hold a JSON object")
    note = None
    if model_type is None and "model_type" not in raw:
        model_type, how = _infer_model_type(folder, names)
        note = (f"{folder / 'config.json'} names no model_type; using {model_type!r} ({how}); pass "
                f"model_kwargs={{\"model_type\": ...}} to choose another")
    try:
        if model_type is not None:
            if model_type not in CONFIG_MAPPING_NAMES:
                raise OtfxInputError(f"model type {model_type!r} for {folder} is not one this transformers knows")
            config = CONFIG_MAPPING[model_type].from_pretrained(folder, **overrides)
        else:
            config = AutoConfig.from_pretrained(folder, **overrides)
    except OtfxInputError:
        raise
    except Exception as err:  # transformers raises OSError, ValueError, KeyError for broken configs
        raise OtfxInputError(f"cannot read the Hugging Face config in {folder}: {_first_line(err)}") from None
    return config, note


def _infer_model_type(folder: Path, names: list[str] | None) -> tuple[str, str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    prefixes = {n.split(".", 1)[0] for n in names or () if "." in n}
    found = sorted(p.replace("_", "-") for p in prefixes if p.replace("_", "-") in CONFIG_MAPPING_NAMES)
    if len(found) == 1:
        return found[0], f"the weights' names start with '{found[0]}.'"
    folder_name = folder.resolve().name.lower()
    for model_type in sorted(LEGACY_TYPES, key=len, reverse=True):
        if re.search(rf"(^|[^a-z0-9]){re.escape(model_type)}($|[^a-z0-9])", folder_name):
            return model_type, f"the folder's name {folder.resolve().name!r} says so"
    raise OtfxInputError(f"{folder / 'config.json'} names no model_type, and neither the weights' names nor the "
                         "folder's name tell it; pass model_kwargs={\"model_type\": \"bert\"} (CLI: --model-kwargs "
                         "'{\"model_type\": \"bert\"}') with the right type")


def choose_class(config: Any, names: list[str]) -> tuple[type, list[str], list[str]]:
    """The transformers class of ``config``'s model type whose parameters fit the stored ``names`` best:
    nothing missing first, then the fewest stored tensors left over, then the smallest model. Returns the class
    and its missing and left-over names."""
    import transformers
    from transformers.models.auto import modeling_auto

    model_type = config.model_type
    seen: list[str] = []
    for table in HEAD_TABLES:
        name = getattr(modeling_auto, table, {}).get(model_type)
        for n in [name] if isinstance(name, str) else list(name or ()):
            if n not in seen and hasattr(transformers, n):
                seen.append(n)
    if not seen:
        raise OtfxInputError(f"this transformers ({transformers.__version__}) has no model class for model type "
                             f"{model_type!r}")
    stored = set(names)
    ranked = []
    for n in seen:
        cls = getattr(transformers, n)
        try:
            with torch.device("meta"):
                model = cls(config)
        except Exception:  # a head that this config cannot build (labels, decoder) is simply not a candidate
            continue
        missing, extra = fit(model, stored)
        size = sum(p.numel() for p in model.parameters())
        ranked.append((len(missing), len(extra), size, n, missing, extra))
    if not ranked:
        raise OtfxInputError(f"no {model_type} model class of transformers {transformers.__version__} can be built "
                             "from this config")
    _, _, _, n, missing, extra = min(ranked)
    return getattr(transformers, n), missing, extra


def fit(model: torch.nn.Module, stored: set[str]) -> tuple[list[str], list[str]]:
    """Names of ``model`` that ``stored`` lacks and stored names ``model`` has no place for, with the base-model
    prefix (``bert.``) ignored on both sides as transformers does, and tied copies counted once."""
    prefix = getattr(model, "base_model_prefix", "") or ""

    def norm(name: str) -> str:
        return name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name

    stored_n = {norm(n) for n in stored}
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(norm(name))
    wanted = {norm(n) for n in model.state_dict()}
    missing = []
    for names in groups.values():
        if not any(n in stored_n for n in names):
            missing.append(names[0])
    params = {n for names in groups.values() for n in names}
    missing += [n for n in wanted - params if n not in stored_n]  # persistent buffers
    ignorable = re.compile(r"(^|\.)position_ids$|(^|\.)num_batches_tracked$")
    extra = [n for n in stored_n - wanted if not ignorable.search(n)]
    return sorted(missing), sorted(extra)


# ----------------------------------------------------------------------------------- sentence-transformers


@dataclass
class SentenceModules:
    """A sentence-transformers pipeline around the transformer: where the transformer sits, how token states
    become one vector, and the other modules' files (written back when a fused model is saved like it)."""

    transformer_path: str  # relative to the pipeline's folder; "" when the transformer is at its root
    pooling: str = "mean_tokens"
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    modules: list[dict] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # relative path -> contents, the transformer's excluded
    unfused: list[str] = field(default_factory=list)  # modules with weights of their own (Dense), not fused

    def embed(self, model: torch.nn.Module, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings as sentence-transformers computes them (pooling, then normalisation if the
        pipeline has it); modules after pooling with weights (Dense) are not applied."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        states = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return self.pool(states, attention_mask)

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        if self.pooling == "cls_token":
            vec = states[:, 0]
        elif self.pooling == "max_tokens":
            vec = states.masked_fill(mask == 0, torch.finfo(states.dtype).min).amax(1)
        elif self.pooling == "lasttoken":
            last = attention_mask.sum(1).long() - 1
            vec = states[torch.arange(states.shape[0]), last]
        else:
            total = (states * mask).sum(1)
            count = mask.sum(1).clamp_min(1e-9)
            vec = total / (count.sqrt() if self.pooling == "mean_sqrt_len_tokens" else count)
        return torch.nn.functional.normalize(vec, dim=-1) if self.normalize else vec


def sentence_modules(root: Path) -> SentenceModules:
    """Read ``modules.json`` of a sentence-transformers folder; an error names the file and what is wrong."""
    listing = root / MODULES_FILE
    try:
        modules = json.loads(listing.read_text())
    except (OSError, ValueError) as err:
        raise OtfxInputError(f"cannot read {listing}: {err}") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise OtfxInputError(f"{listing} must be a JSON list of modules (idx, name, path, type)")
    transformers = [m for m in modules if str(m.get("type", "")).rsplit(".", 1)[-1] == "Transformer"]
    if len(transformers) != 1:
        kinds = ", ".join(str(m.get("type")) for m in modules) or "nothing"
        raise OtfxInputError(f"{listing} lists {len(transformers)} Transformer modules (it lists {kinds}); otfx "
                             "loads a sentence-transformers pipeline with exactly one")
    sub = str(transformers[0].get("path", "") or "")
    folder = root / sub
    if not (folder / "config.json").is_file():
        raise OtfxInputError(f"{listing} puts its Transformer module at {folder}, which has no config.json; the "
                             "pipeline folder is incomplete")
    info = SentenceModules(sub, modules=modules)
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        cfg = _json(st_config)
        info.max_seq_length = cfg.get("max_seq_length")
        info.do_lower_case = bool(cfg.get("do_lower_case", False))
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        path = root / str(m.get("path", "") or "")
        if kind == "Pooling":
            cfg = _json(path / "config.json") if (path / "config.json").is_file() else {}
            modes = [mode for mode in POOLING_MODES if cfg.get(f"pooling_mode_{mode}")]
            if cfg.get("pooling_mode_weightedmean_tokens") or len(modes) > 1:
                raise OtfxInputError(f"{path / 'config.json'}: otfx pools with one of {', '.join(POOLING_MODES)}, "
                                     "not weighted-mean or several modes at once")
            info.pooling = modes[0] if modes else "mean_tokens"
        elif kind == "Normalize":
            info.normalize = True
        elif kind != "Transformer" and path.is_dir() and any(
                f.suffix in (".safetensors", ".bin", ".pt") for f in path.iterdir()):
            info.unfused.append(str(m.get("path")))
    info.files = _module_files(root, modules, sub)
    return info


def _module_files(root: Path, modules: list[dict], transformer: str) -> dict[str, bytes]:
    """The pipeline's own files: its listing and settings, the transformer's sentence settings, and every file of
    the other modules' folders. Whatever else the folder holds (the anchor's ONNX or OpenVINO exports, its model
    card) describes the anchor, not a fused model, and is not carried."""
    wanted = [root / MODULES_FILE, root / "config_sentence_transformers.json",
              root / transformer / "sentence_bert_config.json"]
    for m in modules:
        sub = str(m.get("path", "") or "")
        if sub and sub != transformer and (root / sub).is_dir():
            wanted += sorted(f for f in (root / sub).rglob("*") if f.is_file())
    keep: dict[str, bytes] = {}
    total = 0
    for file in wanted:
        if not file.is_file():
            continue
        total += file.stat().st_size
        if total > _KEEP_LIMIT:
            raise OtfxInputError(f"the sentence-transformers modules of {root} hold over 256 MB besides the "
                                 "transformer; otfx does not carry them")
        keep[file.relative_to(root).as_posix()] = file.read_bytes()
    return keep


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OtfxInputError(f"cannot read {path}: {err}") from None
    if not isinstance(value, dict):
        raise OtfxInputError(f"{path} must hold a JSON object")
    return value


def write_sentence_modules(info: SentenceModules, out: Path) -> Path:
    """Write the pipeline's other modules into ``out``; returns the folder the transformer goes into."""
    for rel, data in info.files.items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    folder = out / info.transformer_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ------------------------------------------------------------------------------------------------- zips


def extract_zip(path: Path) -> tuple[tempfile.TemporaryDirectory, Path]:
    """Extract the one model in a zip archive (a folder with ``config.json`` or ``modules.json``, at the top or
    anywhere inside) into a temporary folder; several or none is an error listing what the archive holds."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise OtfxInputError(f"cannot open {path} as a zip archive: {err}") from None
    with archive:
        members = [m for m in archive.namelist() if not m.endswith("/")]
        dirs = {str(PurePosixPath(m).parent) for m in members if PurePosixPath(m).name in ("config.json",
                                                                                             MODULES_FILE)}
        roots = sorted(d for d in dirs if not any(d != o and _under(d, o) and _has(members, o, MODULES_FILE)
                                                  for o in dirs))
        if len(roots) != 1:
            nested = [m for m in members if m.endswith(".zip")]
            if not roots and nested:
                raise OtfxInputError(f"zip archive {path} holds no model folder but the archive {nested[0]}; "
                                     "extract that file and pass it")
            held = f"{len(roots)} model folders ({', '.join(roots[:4])})" if roots else "no config.json or modules.json"
            raise OtfxInputError(f"zip archive {path} must hold one model; it holds {held}. Extract it and pass "
                                 "the model's folder")
        base = roots[0]
        keep = [m for m in members if base == "." or _under(str(PurePosixPath(m).parent), base)]
        tmp = tempfile.TemporaryDirectory(prefix="otfx-zip-")
        for m in keep:
            archive.extract(m, tmp.name)  # zipfile drops absolute and '..' parts of names
    return tmp, Path(tmp.name) / ("" if base == "." else base)


def _under(child: str, parent: str) -> bool:
    return parent == "." or child == parent or child.startswith(parent.rstrip("/") + "/")


def _has(members: list[str], folder: str, name: str) -> bool:
    return (name if folder == "." else f"{folder}/{name}") in members


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:400]
