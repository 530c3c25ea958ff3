"""Data loaders and parent training of the examples' helpers, examples/common (a few seconds; real data tests skip
if the data is unavailable)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from common import data as D  # noqa: E402
from common import train as T  # noqa: E402

torch.set_num_threads(1)

_WORDS = (["old", "young", "tall", "quiet", "merry"], ["bennet", "darcy", "elliot", "woodhouse"],
          ["park", "abbey", "house", "village", "church"], ["three", "two", "many", "a"],
          ["birds", "carriages", "ladies", "officers", "letters"])
SYNTHETIC = "\n".join(
    "the {} {} walked to the {} and saw {} {} there, said miss {}.".format(
        *(w[i % len(w)] for w in _WORDS), _WORDS[1][i % 4])
    for i in range(200))


def tiny_vit(seed: int = 0):
    return T.build_vit(T.vit_config("digits", hidden=32, mlp=64, layers=1, heads=2), seed)


@pytest.fixture(scope="module")
def digits() -> D.Split:
    return D.load_digits_split()


def test_digits_split_disjoint_and_standardised(digits: D.Split) -> None:
    parts = [set(digits.indices[p].tolist()) for p in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 1797
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.x_train.dtype == torch.float32
    assert abs(float(digits.x_train.mean())) < 1e-4 and abs(float(digits.x_train.std()) - 1) < 1e-3
    assert abs(float(digits.x_test.mean())) < 0.1  # same statistics applied to the held-out parts
    assert len(digits.y_val) > 0 and set(digits.y_test.tolist()) == set(range(10))
    again = D.load_digits_split()
    assert torch.equal(again.x_val, digits.x_val) and torch.equal(again.y_test, digits.y_test)


def test_train_tiny_vit_beats_chance_and_is_deterministic(digits: D.Split) -> None:
    m = T.train_classifier(tiny_vit(), digits, epochs=8, seed=0, lr=5e-3, progress=False)
    acc = T.evaluate_accuracy(m, digits.x_test, digits.y_test)
    assert acc > 0.3, acc  # chance is 0.1; about 0.45 here
    a, b = (T.train_classifier(tiny_vit(), digits, epochs=1, seed=0, progress=False) for _ in range(2))
    c = T.train_classifier(tiny_vit(), digits, epochs=1, seed=1, progress=False)
    same = [torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)]
    assert all(same)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)  # batch order depends on the seed


def test_finetune_curve(digits: D.Split) -> None:
    _, curve = T.finetune(tiny_vit(), digits, steps=6, seed=1, eval_at=(0, 3, 6), progress=False)
    assert curve.steps == [0, 3, 6]
    assert set(curve.acc) == {"val", "test"} and all(len(v) == 3 for v in curve.acc.values())
    assert all(0.0 <= a <= 1.0 for v in curve.acc.values() for a in v)


def test_cached_parent_trains_once(tmp_path, digits: D.Split) -> None:
    calls = []

    def train_fn(model):
        calls.append(1)
        return T.train_classifier(model, digits, epochs=0.2, seed=0, progress=False)

    a = T.cached_parent("vit-digits-tiny", lambda: tiny_vit(0), train_fn, tmp_path, seed=0, extra={"epochs": 0.2})
    b = T.cached_parent("vit-digits-tiny", lambda: tiny_vit(0), train_fn, tmp_path, seed=0, extra={"epochs": 0.2})
    assert len(calls) == 1
    assert list(tmp_path.glob("*/model.safetensors"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    T.cached_parent("vit-digits-tiny", lambda: tiny_vit(1), train_fn, tmp_path, seed=1, extra={"epochs": 0.2})
    assert len(calls) == 2  # another seed is another parent


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return D.train_wordpiece_tokenizer(SYNTHETIC, vocab_size=120)


def test_wordpiece_tokenizer_is_deterministic(tiny_tokenizer) -> None:
    again = D.train_wordpiece_tokenizer(SYNTHETIC, vocab_size=120)
    assert tiny_tokenizer.get_vocab() == again.get_vocab()
    assert [tiny_tokenizer.convert_ids_to_tokens(i) for i in range(5)] == list(D.SPECIAL_TOKENS)
    ids = tiny_tokenizer("miss darcy walked")["input_ids"]
    assert ids[0] == tiny_tokenizer.cls_token_id and ids[-1] == tiny_tokenizer.sep_token_id
    assert tiny_tokenizer.unk_token_id not in ids


def test_mask_rates() -> None:
    g = torch.Generator().manual_seed(0)
    vocab = 1000
    ids = torch.randint(5, vocab, (400, 128), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS], [SEP]
    masked, labels = D.mask_tokens(ids, mask_id=4, vocab_size=vocab, special_ids=range(5), generator=g)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    n = int(chosen.sum())
    assert abs(n / ids[:, 1:-1].numel() - 0.15) < 0.005
    to_mask = (masked == 4) & chosen
    unchanged = (masked == ids) & chosen
    to_rand = chosen & ~to_mask & ~unchanged
    assert abs(int(to_mask.sum()) / n - 0.8) < 0.015
    assert abs(int(to_rand.sum()) / n - 0.1) < 0.015  # a random draw equal to the original counts as unchanged
    assert abs(int(unchanged.sum()) / n - 0.1) < 0.015
    assert int((masked[to_rand] < 5).sum()) == 0  # random replacements are never special tokens


def test_mlm_batches(tiny_tokenizer) -> None:
    blocks = D.tokenize_blocks(SYNTHETIC, tiny_tokenizer, block=32)
    assert blocks.shape[1] == 32 and (blocks[:, 0] == tiny_tokenizer.cls_token_id).all()
    val = list(D.mlm_batches(blocks, tiny_tokenizer, batch_size=8, seed=3, shuffle=False, repeat=False))
    assert sum(len(b["input_ids"]) for b in val) == len(blocks)
    val2 = list(D.mlm_batches(blocks, tiny_tokenizer, batch_size=8, seed=3, shuffle=False, repeat=False))
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(val, val2, strict=True))
    labels = torch.cat([b["labels"] for b in val])
    assert 0.08 < float((labels != -100).float().mean()) < 0.22


def test_mlm_training_step(tiny_tokenizer) -> None:
    cfg = T.bert_mlm_config(len(tiny_tokenizer), hidden=32, layers=1, heads=2, mlp=64, max_positions=32)
    model = T.build_bert_mlm(cfg, seed=0)
    blocks = D.tokenize_blocks(SYNTHETIC, tiny_tokenizer, block=32)
    val = list(D.mlm_batches(blocks, tiny_tokenizer, batch_size=16, seed=1, shuffle=False, repeat=False))
    with torch.no_grad():  # masked-only projection gives the stock model's loss
        loss, n = T.mlm_loss(model.eval(), val[0])
        assert n > 0 and torch.allclose(loss, model(**val[0]).loss, atol=1e-5)
    before = T.evaluate_mlm_loss(model, val)
    log: list[float] = []
    T.train_mlm(model, D.mlm_batches(blocks, tiny_tokenizer, batch_size=16, seed=0), steps=30, seed=0, lr=3e-3,
                progress=False, log=log)
    assert len(log) == 30 and np.isfinite(log).all()
    assert T.evaluate_mlm_loss(model, val) < before


def test_fashion_mnist_loader() -> None:
    try:
        s = D.load_fashion_mnist()
    except D.DataUnavailable as e:
        pytest.skip(f"Fashion-MNIST unavailable here: {e}")
    assert s.x_train.shape == (55000, 1, 28, 28) and s.x_val.shape == (5000, 1, 28, 28)
    assert s.x_test.shape == (10000, 1, 28, 28) and s.y_test.max() == 9
    assert not set(s.indices["train"].tolist()) & set(s.indices["val"].tolist())
    assert abs(float(s.x_train.mean())) < 1e-3 and abs(float(s.x_train.std()) - 1) < 1e-3


def test_austen_loader() -> None:
    try:
        books = D.load_austen_books()
    except D.DataUnavailable as e:
        pytest.skip(f"janeaustenr text unavailable here: {e}")
    assert set(books) == set(D.AUSTEN_BOOKS)
    assert "Elizabeth" in books["prideprejudice"] and "Emma Woodhouse" in books["emma"]
    split = D.austen_split(val_fraction=0.05)
    assert 0.03 < len(split.val) / (len(split.train) + len(split.val)) < 0.07
    assert 600_000 < len(D.load_austen_text().split()) < 800_000
