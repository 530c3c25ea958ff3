"""The conventions layer: main-output selection (and its refusal to guess), eval mode, call kwargs, identity."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import otfx
from otfx.conventions import (
    OutputSelectionError,
    call_kwargs,
    check_selector,
    eval_mode,
    main_output,
    tensor_identity,
    tied_groups,
    unique_parameter_names,
)

torch.set_num_threads(1)

LOGITS = torch.randn(2, 3)
PER_SAMPLE = torch.randn(2)
LOSS = torch.tensor(0.5)
Pair = namedtuple("Pair", "scores aux")


class Head(nn.Module):
    """A linear classifier whose forward returns whatever ``pack(logits)`` makes of its logits."""

    def __init__(self, pack):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.pack = pack

    def forward(self, x: torch.Tensor):
        return self.pack(self.lin(x))


def loss_and_logits(y: torch.Tensor):
    return y.pow(2).mean(), y  # the model: a scalar loss first


def per_sample_and_logits(y: torch.Tensor):
    return y.pow(2).mean(-1), y  # two real candidates


X = (torch.randn(2, 4),)


# ------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("out, output, expected", [
    ({"scores": LOGITS, "aux": PER_SAMPLE}, "scores", LOGITS),  # a key
    (Pair(LOGITS, PER_SAMPLE), "aux", PER_SAMPLE),  # an attribute
    ((PER_SAMPLE, LOGITS), 1, LOGITS),  # an index
    ((PER_SAMPLE, LOGITS), -2, PER_SAMPLE),
    (SequenceClassifierOutput(loss=LOSS, logits=LOGITS), 1, LOGITS),  # a ModelOutput by its tuple
    ((PER_SAMPLE, {"deep": LOGITS}), lambda o: o[1]["deep"], LOGITS),  # a callable
])
def test_selector_picks_exactly_what_it_names(out, output, expected) -> None:
    assert main_output(out, output) is expected


@pytest.mark.parametrize("out", [
    LOGITS, (LOGITS,), [None, LOGITS], {"logits": LOGITS, "hidden": PER_SAMPLE},
    SequenceClassifierOutput(loss=LOSS, logits=LOGITS), (LOSS, LOGITS), {"loss": LOSS, "y": LOGITS},
])
def test_default_takes_a_known_key_or_the_only_non_scalar(out) -> None:
    assert main_output(out) is LOGITS


@pytest.mark.parametrize("out", [(PER_SAMPLE, LOGITS), {"a": LOGITS, "b": PER_SAMPLE}, (LOGITS, (PER_SAMPLE,))])
def test_several_candidates_are_refused_with_their_names(out) -> None:
    with pytest.raises(OutputSelectionError, match="output=") as err:
        main_output(out, name="MyNet")
    text = str(err.value)
    assert "MyNet" in text and "(2, 3)" in text and "(2,)" in text and "logits" in text
    assert text.count("output[") + text.count("output.") >= 2  # each candidate by its path


@pytest.mark.parametrize("out, output", [
    (LOSS, None), ((LOSS,), None), ((LOSS, LOGITS), 0), ((PER_SAMPLE, LOGITS), 2), ((PER_SAMPLE, LOGITS), "x"),
    (Pair(LOGITS, PER_SAMPLE), "nope"), ({"a": LOGITS}, lambda o: "not a tensor"), (None, None),
])
def test_no_scalar_no_missing_field_is_ever_returned(out, output) -> None:
    with pytest.raises(OutputSelectionError):
        main_output(out, output)


@pytest.mark.parametrize("bad", [1.5, True, ["logits"], b"logits"])
def test_bad_selectors_are_type_errors(bad) -> None:
    with pytest.raises(TypeError, match="output="):
        check_selector(bad)


def test_loss_first_model_traces_its_logits_and_keeps_the_class_order() -> None:
    model = Head(loss_and_logits)
    traced = otfx.trace(model, X)
    (out,) = [n for n in traced.graph.nodes if n.op == "output"][0].args[0]
    assert tuple(out.meta["val"].shape) == (2, 3)  # the logits, not the loss, are the graph's output
    moved = otfx.random_symmetry(traced, seed=1)  # would permute the classes if the logits were not the output
    with torch.no_grad():
        torch.testing.assert_close(moved(*X)[1], model(*X)[1])


def test_trace_refuses_ambiguous_outputs_and_stores_the_selector() -> None:
    model = Head(per_sample_and_logits)
    model.train()
    with pytest.raises(OutputSelectionError, match=r"Head returns a tuple with 2 tensors.*output\[1\]"):
        otfx.trace(model, X)
    assert model.training  # restored after the failed export
    traced = otfx.trace(model, X, output=1)
    assert traced.output == 1 and traced.main_output(model(*X)) is not None
    (out,) = [n for n in traced.graph.nodes if n.op == "output"][0].args[0]
    assert tuple(out.meta["val"].shape) == (2, 3)
    with pytest.raises(TypeError, match="output="):
        otfx.trace(model, X, output=1.0)
    assert otfx.trace(traced) is traced and otfx.trace(traced, output=1) is traced
    with pytest.raises(ValueError, match="traced with output=1"):
        otfx.trace(traced, output=0)


@pytest.mark.slow
def test_export_uses_the_same_selector(tmp_path) -> None:
    from otfx.export.onnx import check_onnx, export_onnx

    model = Head(per_sample_and_logits)
    with pytest.raises(OutputSelectionError, match="output="):
        export_onnx(model, X, tmp_path / "m.onnx", dynamic=False)
    path = export_onnx(model, X, tmp_path / "m.onnx", dynamic=False, output=1)
    check = check_onnx(path, model, X, output=1)
    assert check.passed and check.output_shape == (2, 3)


# ------------------------------------------------------------------------------------------- calling


def test_eval_mode_restores_every_flag_even_on_errors() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Sequential(nn.Dropout()))
    model.train()
    model[1].eval()  # a mixed state that model.train() afterwards would not restore
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model) as m:
        assert m is model and not any(x.training for x in model.modules())
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before


def test_call_kwargs_adds_use_cache_only_where_accepted() -> None:
    class Decoder(nn.Module):
        def forward(self, ids, use_cache=True):
            return ids

    assert call_kwargs(Decoder(), None) == {"use_cache": False}
    assert call_kwargs(Decoder(), {"use_cache": True}) == {"use_cache": True}  # the caller's choice wins
    assert call_kwargs(nn.Linear(2, 2), {"a": 1}) == {"a": 1}
    given = {"b": 2}
    call_kwargs(Decoder(), given)
    assert given == {"b": 2}  # the caller's dict is not modified


# ------------------------------------------------------------------------------------------- identity


class TwoLayers(nn.Module):
    def __init__(self, tie: bool, device: str):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False, device=device)
        self.b = nn.Linear(4, 4, bias=False, device=device)
        if tie:
            self.b.weight = self.a.weight


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_identity_is_tensor_identity_on_every_device(device) -> None:
    untied, tied = TwoLayers(False, device), TwoLayers(True, device)
    if device == "meta":  # the trap: every meta tensor has data_ptr() 0
        assert untied.a.weight.data_ptr() == untied.b.weight.data_ptr()
    assert tied_groups(untied) == [] and unique_parameter_names(untied) == ["a.weight", "b.weight"]
    assert tied_groups(tied) == [["a.weight", "b.weight"]] and unique_parameter_names(tied) == ["a.weight"]
    w = untied.a.weight
    # views of one storage are the same tensor only when offset, shape and stride agree
    assert tensor_identity(w[0]) != tensor_identity(w[1]) and tensor_identity(w[1]) == tensor_identity(w[1])
    assert tensor_identity(w) != tensor_identity(w.t())
    pairs = [("x", w), ("y", w.view(4, 4)), ("z", untied.b.weight)]
    assert unique_parameter_names(pairs) == ["x", "z"] and unique_parameter_names(dict(pairs)) == ["x", "z"]


def test_meta_bert_ties_as_on_cpu() -> None:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    with torch.device("meta"):
        meta = BertForMaskedLM(cfg)
    by_object: dict[int, list[str]] = {}
    for name, p in meta.named_parameters(remove_duplicate=False):
        by_object.setdefault(id(p), []).append(name)
    expected = [names for names in by_object.values() if len(names) > 1]
    assert ["bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"] in expected
    assert tied_groups(meta) == expected == tied_groups(BertForMaskedLM(cfg))
    assert len(unique_parameter_names(meta)) == len(list(meta.parameters()))
