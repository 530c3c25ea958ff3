"""Real data that installs offline: digits, Fashion-MNIST, Jane Austen's novels, plus MLM batching.

Every image loader returns a :class:`Split` of float tensors ``[N, 1, H, W]`` standardised with the training
set's (scalar) mean and standard deviation, with a validation set held out of the training set for choosing
hyper-parameters; the test set is never to be used for choices.

Downloads go through the ordinary Debian client (``apt-get download`` + ``dpkg-deb -x``, no root needed) into
the cache, ``$OTFX_CACHE/data`` or ``~/.cache/otfx/data``.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import json
import os
import shutil
import struct
import subprocess
import tempfile
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataUnavailable", "Split", "TextSplit", "cache_root", "load_digits_split", "load_fashion_mnist",
    "load_austen_books", "load_austen_text", "austen_split", "train_wordpiece_tokenizer", "tokenize_blocks",
    "mask_tokens", "mlm_batches",
]

FASHION_PKG = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
AUSTEN_PKG = "r-cran-janeaustenr"
AUSTEN_SYSTEM_DIR = Path("/usr/lib/R/site-library/janeaustenr")
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
                "persuasion")


class DataUnavailable(RuntimeError):
    """The data set cannot be obtained here; the message says what to install."""


@dataclass
class Split:
    """Train / validation / test tensors of one image classification data set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float
    std: float
    num_classes: int
    name: str = ""
    indices: dict[str, np.ndarray] = field(default_factory=dict)  # rows of the source files, per part

    def part(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if which not in ("train", "val", "test"):
            raise ValueError(f"unknown part {which!r}: use 'train', 'val' or 'test'")
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")

    def __repr__(self) -> str:
        return (f"Split({self.name!r}, train={tuple(self.x_train.shape)}, val={tuple(self.x_val.shape)}, "
                f"test={tuple(self.x_test.shape)}, classes={self.num_classes})")


@dataclass
class TextSplit:
    """Training and validation text."""

    train: str
    val: str


def cache_root() -> Path:
    """Root of otfx's caches: ``$OTFX_CACHE`` if set, else ``~/.cache/otfx``."""
    return Path(os.environ.get("OTFX_CACHE") or Path.home() / ".cache" / "otfx").expanduser()


def _data_dir() -> Path:
    d = cache_root() / "data"
    d.mkdir(parents=True, exist_ok=True)
    return d


# ----------------------------------------------------------------------------------------------- images


def _standardise(x_train: np.ndarray, *others: np.ndarray) -> tuple[list[torch.Tensor], float, float]:
    mean, std = float(x_train.mean()), float(x_train.std())
    out = [torch.from_numpy(((a - mean) / std).astype(np.float32)) for a in (x_train, *others)]
    return out, mean, std


def _holdout(n: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def load_digits_split(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> Split:
    """scikit-learn's 1,797 8x8 digits as ``[N, 1, 8, 8]`` standardised floats, stratified split.

    ``seed`` fixes the split only (keep it the same for all parents that are to be fused).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float64)[:, None]
    y = d.target.astype(np.int64)
    rest, test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    train, val = train_test_split(rest, test_size=val_fraction, random_state=seed, stratify=y[rest])
    (xt, xv, xs), mean, std = _standardise(x[train], x[val], x[test])
    return Split(xt, torch.from_numpy(y[train]), xv, torch.from_numpy(y[val]), xs, torch.from_numpy(y[test]),
                 mean, std, 10, "digits", {"train": train, "val": val, "test": test})


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _apt_extract(package: str, dest: Path) -> Path:
    """``apt-get download`` ``package`` and ``dpkg-deb -x`` it into ``dest``; return ``dest``."""
    hint = (f"cannot fetch Debian package {package!r}. Install it (as root: `apt-get update && "
            f"apt-get install -y {package}`), or make `apt-get download {package}` work, then retry")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DataUnavailable(f"{hint} (apt-get/dpkg-deb not found: not a Debian-like system)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp_path = Path(tmp)
        r = _run(["apt-get", "download", package], tmp_path)
        if r.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            _run(["apt-get", "update"], tmp_path)
            r = _run(["apt-get", "download", package], tmp_path)
        debs = sorted(tmp_path.glob(f"{package}_*.deb"))
        if r.returncode != 0 or not debs:
            raise DataUnavailable(f"{hint}: {r.stderr.strip()[-500:]}")
        out = tmp_path / "root"
        r = _run(["dpkg-deb", "-x", str(debs[-1]), str(out)], tmp_path)
        if r.returncode != 0:
            raise DataUnavailable(f"{hint}: dpkg-deb failed: {r.stderr.strip()[-500:]}")
        if dest.exists():  # another process won the race
            return dest
        out.rename(dest)
    return dest


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def fashion_mnist_dir(root: str | Path | None = None) -> Path:
    """Folder with the four Fashion-MNIST IDX files, fetching the Debian package into the cache if needed."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
    candidates = [Path(root)] if root is not None else [
        FASHION_SYSTEM_DIR, _data_dir() / FASHION_PKG / FASHION_SYSTEM_DIR.relative_to("/")]
    for c in candidates:
        if all((c / n).is_file() for n in names):
            return c
    if root is not None:
        raise DataUnavailable(f"no Fashion-MNIST IDX files ({', '.join(names)}) under {root}")
    _apt_extract(FASHION_PKG, _data_dir() / FASHION_PKG)
    if not all((candidates[1] / n).is_file() for n in names):
        raise DataUnavailable(f"package {FASHION_PKG} has no IDX files under {FASHION_SYSTEM_DIR}")
    return candidates[1]


def load_fashion_mnist(root: str | Path | None = None, val_size: int = 5000, seed: int = 0) -> Split:
    """Fashion-MNIST (Debian ``dataset-fashion-mnist``) as ``[N, 1, 28, 28]`` standardised floats.

    ``val_size`` training images (chosen by ``seed``) are held out as the validation set; the official
    10,000 test images are the test set.
    """
    d = fashion_mnist_dir(root)
    x_all = _read_idx(d / "train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    y_all = _read_idx(d / "train-labels-idx1-ubyte.gz", 8).astype(np.int64)
    x_test = _read_idx(d / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    y_test = _read_idx(d / "t10k-labels-idx1-ubyte.gz", 8).astype(np.int64)
    tr, va = _holdout(len(y_all), val_size, seed)
    x_tr = x_all[tr].astype(np.float32) / 255.0
    (xt, xv, xs), mean, std = _standardise(x_tr, x_all[va].astype(np.float32) / 255.0,
                                           x_test.astype(np.float32) / 255.0)
    # mean / std are reported in raw 0-255 pixel units
    return Split(xt, torch.from_numpy(y_all[tr]), xv, torch.from_numpy(y_all[va]), xs,
                 torch.from_numpy(y_test), mean * 255.0, std * 255.0, 10, "fashion-mnist",
                 {"train": tr, "val": va, "test": np.arange(len(y_test))})


# ----------------------------------------------------------------------------------------------- text


def _rdata_parse(raw: bytes):
    try:
        import rdata
    except ImportError as e:
        raise DataUnavailable("parsing R's lazy-load database needs the PyPI package `rdata`: "
                              "pip install rdata") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": a bare serialised object
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def _read_lazyload(rdx: Path, rdb: Path) -> dict[str, list[str]]:
    """Objects of an R lazy-load database: ``.rdx`` is a gzip'd index, ``.rdb`` blobs are length + zlib."""
    index = _rdata_parse(gzip.decompress(rdx.read_bytes()))
    blob_all = rdb.read_bytes()
    out: dict[str, list[str]] = {}
    for name, (offset, length) in index["variables"].items():
        blob = blob_all[int(offset):int(offset) + int(length)]
        (n,) = struct.unpack(">I", blob[:4])
        raw = zlib.decompress(blob[4:])
        if len(raw) != n:
            raise ValueError(f"corrupt blob {name!r} in {rdb}: {len(raw)} bytes, header says {n}")
        out[str(name)] = [str(s) for s in _rdata_parse(raw)]
    return out


def load_austen_books() -> dict[str, str]:
    """Jane Austen's six novels (Debian ``r-cran-janeaustenr``), one string per book, cached as JSON."""
    cached = _data_dir() / "austen.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    data = AUSTEN_SYSTEM_DIR / "data"
    if not (data / "Rdata.rdx").is_file():
        data = _data_dir() / AUSTEN_PKG / AUSTEN_SYSTEM_DIR.relative_to("/") / "data"
        if not (data / "Rdata.rdx").is_file():
            _apt_extract(AUSTEN_PKG, _data_dir() / AUSTEN_PKG)
        if not (data / "Rdata.rdx").is_file():
            raise DataUnavailable(f"package {AUSTEN_PKG} did not contain {AUSTEN_SYSTEM_DIR}/data/Rdata.rdx")
    vectors = _read_lazyload(data / "Rdata.rdx", data / "Rdata.rdb")
    books = {b: "\n".join(vectors[b]) for b in AUSTEN_BOOKS if b in vectors}
    if len(books) != len(AUSTEN_BOOKS):
        raise DataUnavailable(f"{AUSTEN_PKG}: expected books {AUSTEN_BOOKS}, found {sorted(vectors)}")
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(books), encoding="utf-8")
    tmp.replace(cached)
    return books


def load_austen_text() -> str:
    """All six novels as one string (books separated by blank lines)."""
    return "\n\n\n".join(load_austen_books().values())


def austen_split(val_fraction: float = 0.05) -> TextSplit:
    """Hold out the last ``val_fraction`` of each novel (cut at a paragraph break) as validation text."""
    train, val = [], []
    for text in load_austen_books().values():
        cut = int(len(text) * (1 - val_fraction))
        brk = text.find("\n\n", cut)
        cut = brk if brk != -1 else cut
        train.append(text[:cut])
        val.append(text[cut:])
    return TextSplit("\n\n\n".join(train), "\n\n\n".join(val))


# ----------------------------------------------------------------------------------------------- tokens / MLM

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _learn_wordpiece_vocab(text: str, vocab_size: int, lowercase: bool, min_frequency: int = 2) -> list[str]:
    """BERT-style WordPiece vocabulary by BPE merges over word counts, ties broken by the strings.

    The ``tokenizers`` trainer breaks ties in hash-map order, so its vocabulary changes from run to run; this
    one is a pure function of the text (about 4 s on the Austen corpus).
    """
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(lowercase=lowercase)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(line)))
    items = sorted(counts.items())
    words = [[w[0]] + ["##" + c for c in w[1:]] for w, _ in items]
    freq = [c for _, c in items]
    vocab = list(SPECIAL_TOKENS) + sorted({s for w in words for s in w})
    pair_count: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for p in pairwise(w):
            pair_count[p] += freq[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, p = heapq.heappop(heap)
        if pair_count.get(p, 0) != -neg:
            continue  # stale entry
        if -neg < min_frequency:
            break
        a, b = p
        new = a + b[2:]
        vocab.append(new)
        changed: set[tuple[str, str]] = set()
        for i in list(where[p]):
            w, f = words[i], freq[i]
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            old_pairs, new_pairs = list(pairwise(w)), list(pairwise(out))
            words[i] = out
            for q in old_pairs:
                pair_count[q] -= f
            for q in new_pairs:
                pair_count[q] += f
            for q in set(old_pairs) - set(new_pairs):
                where[q].discard(i)
            for q in new_pairs:
                where[q].add(i)
            changed.update(old_pairs, new_pairs)
        for q in changed:
            if pair_count[q] > 0:
                heapq.heappush(heap, (-pair_count[q], q))
            else:
                del pair_count[q]
    return vocab


def train_wordpiece_tokenizer(text: str, vocab_size: int = 8192, *, lowercase: bool = True,
                              min_frequency: int = 2, cache_dir: str | Path | None = None):
    """A BERT-style WordPiece tokenizer learnt on ``text``: a ``PreTrainedTokenizerFast`` for BertForMaskedLM.

    Built with ``tokenizers`` (BERT normaliser, pre-tokeniser, WordPiece model, ``[CLS] $A [SEP]`` template);
    the vocabulary is learnt deterministically (see :func:`_learn_wordpiece_vocab`). Special tokens take ids
    0-4: ``[PAD] [UNK] [CLS] [SEP] [MASK]``. With ``cache_dir`` the tokenizer is saved there (keyed by a hash
    of text and settings) and reloaded.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kwargs = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                  mask_token="[MASK]")
    path = None
    if cache_dir is not None:
        settings = f"{vocab_size}|{lowercase}|{min_frequency}|".encode()
        key = hashlib.sha256(settings + text.encode()).hexdigest()
        path = Path(cache_dir) / f"wordpiece-{vocab_size}-{key[:16]}.json"
        if path.is_file():
            return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path)), **kwargs)
    vocab = _learn_wordpiece_vocab(text, vocab_size, lowercase, min_frequency)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = SPECIAL_TOKENS.index("[CLS]"), SPECIAL_TOKENS.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tok.save(str(tmp))
        tmp.replace(path)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def tokenize_blocks(text: str, tokenizer, block: int = 128) -> torch.Tensor:
    """Tokenise ``text`` as one stream and cut it into ``[CLS] ... [SEP]`` blocks of ``block`` tokens.

    Returns a ``LongTensor [n_blocks, block]``; the tail that does not fill a block is dropped.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = block - 2
    n = len(ids) // body
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one block of {body}")
    x = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    cls = torch.full((n, 1), tokenizer.cls_token_id, dtype=torch.long)
    sep = torch.full((n, 1), tokenizer.sep_token_id, dtype=torch.long)
    return torch.cat([cls, x, sep], dim=1)


def mask_tokens(input_ids: torch.Tensor, *, mask_id: int, vocab_size: int, special_ids: Sequence[int],
                mask_prob: float = 0.15, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``mask_prob`` of the non-special tokens; of those 80% -> [MASK], 10% -> random
    token, 10% unchanged. Returns ``(masked_ids, labels)``, ``labels = -100`` where nothing is predicted."""
    ids = input_ids.clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for s in special_ids:
        special |= ids == s
    chosen = (torch.rand(ids.shape, generator=generator) < mask_prob) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (r < 0.8)
    to_rand = chosen & (r >= 0.8) & (r < 0.9)
    ids[to_mask] = mask_id
    # random replacements avoid the special tokens when they are the first ids of the vocabulary (ours are)
    low = len(special_ids) if set(special_ids) == set(range(len(special_ids))) else 0
    ids[to_rand] = torch.randint(low, vocab_size, (int(to_rand.sum()),), generator=generator)
    return ids, labels


def mlm_batches(blocks: torch.Tensor, tokenizer, *, batch_size: int = 32, mask_prob: float = 0.15,
                seed: int = 0, shuffle: bool = True, repeat: bool = True
                ) -> Iterator[dict[str, torch.Tensor]]:
    """Masked-LM batches ``{"input_ids", "attention_mask", "labels"}`` from ``blocks`` ([n, block] ids).

    Training: ``shuffle=True, repeat=True`` (an endless stream with fresh masks each epoch). Evaluation:
    ``shuffle=False, repeat=False`` gives the same batches and masks for the same ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    special = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    n = blocks.shape[0]
    while True:
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            x = blocks[order[i:i + batch_size]]
            ids, labels = mask_tokens(x, mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                      special_ids=special, mask_prob=mask_prob, generator=g)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if not repeat:
            return
