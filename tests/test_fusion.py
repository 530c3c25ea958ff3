"""Fusion: properties that must hold on every architecture, heterogeneous widths, N models and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_state_unchanged, state_copy

import otfx
from otfx import testing as zoo
from otfx.align.config import FusionConfig
from otfx.align.rewrite import aligned_params
from otfx.fuse import compute_maps
from otfx.trace import main_output


def outputs(model, inputs):
    with torch.no_grad():
        return main_output(model(*inputs))


def fresh_inputs(name: str, seed: int = 123) -> tuple:
    return zoo.inputs(name, batch=3, seq=11 if zoo.ZOO[name].varies_seq else 8, seed=seed)


def data_batches(name: str, n: int = 3) -> list[tuple]:
    return [zoo.inputs(name, batch=2, seq=8, seed=100 + i) for i in range(n)]


def assert_same_model(fused, model, name: str, param_atol: float | None) -> None:
    x = fresh_inputs(name)
    torch.testing.assert_close(outputs(fused, x), outputs(model, x), atol=1e-4, rtol=0)
    if param_atol is not None:
        for (k, p), q in zip(fused.named_parameters(), model.parameters()):
            torch.testing.assert_close(p, q, atol=param_atol, rtol=0, msg=k)


@pytest.mark.parametrize("residual", ["mean", "shared"])
def test_fusing_a_permuted_copy_gives_the_model_back(arch, residual):
    model, args = zoo.build(arch)
    before = state_copy(model)
    traced = otfx.trace(model, args)
    permuted = otfx.trace(otfx.random_symmetry(traced, seed=3), args)
    permuted.model.train()  # the caller's training flags survive fusion too
    fused = otfx.fuse(traced, permuted, solver="emd", residual=residual)
    assert_same_model(fused, model, arch, param_atol=1e-5)
    assert type(fused) is type(model)
    assert_state_unchanged(model, before)
    assert permuted.model.training and all(m.training for m in permuted.model.modules())


def test_fusing_a_permuted_copy_by_activations(arch):
    model, args = zoo.build(arch)
    traced = otfx.trace(model, args)
    permuted = otfx.trace(otfx.random_symmetry(traced, seed=4), args)
    fused = otfx.fuse(traced, permuted, cost="activations", solver="emd", data=data_batches(arch),
                      heads="aware", qk="tied")
    assert_same_model(fused, model, arch, param_atol=None)


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
@pytest.mark.parametrize("residual", ["mean", "weighted_scalar", "weighted_matrix", "shared"])
def test_fusing_a_model_with_itself_gives_it_back(solver, residual):
    for arch in ("hf_vit", "gpt2"):
        model, args = zoo.build(arch)
        traced = otfx.trace(model, args)
        data = data_batches(arch) if residual.startswith("weighted") else None
        fused = otfx.fuse(traced, traced, solver=solver, residual=residual, data=data)
        # Sinkhorn's plan between identical rows is soft, so only EMD reproduces every parameter exactly
        if solver == "emd":
            assert_same_model(fused, model, arch, param_atol=1e-5)
        else:
            assert torch.isfinite(outputs(fused, fresh_inputs(arch))).all()


@pytest.mark.parametrize("arch_name", ["bert", "hf_vit", "gpt2", "llama", "timm_vit", "vit_pytorch", "matmul_encoder",
                                       "torch_encoder"])
def test_align_keeps_the_function_of_an_independent_model(arch_name):
    a, args = zoo.build(arch_name, seed=0)
    b, _ = zoo.build(arch_name, seed=9)
    before = state_copy(b)
    aligned = otfx.align(otfx.trace(b, args), to=otfx.trace(a, args), solver="emd", residual="shared")
    x = fresh_inputs(arch_name)
    torch.testing.assert_close(outputs(aligned, x), outputs(b, x), atol=1e-4, rtol=0)
    assert not torch.allclose(outputs(aligned, x), outputs(a, x), atol=1e-2)
    assert_state_unchanged(b, before)


@pytest.mark.parametrize("arch_name", ["hf_vit", "bert", "gpt2", "timm_vit", "llama"])
@pytest.mark.parametrize("heads", ["cross", "aware"])
def test_heterogeneous_fusion_takes_the_anchor_shapes(arch_name, heads):
    anchor, args = zoo.build(arch_name)
    # rotary embeddings fix the query/key head dim, so the wider Llama has more heads, not wider ones
    extra = {"heads": 8, "kv_heads": 4} if arch_name == "llama" else {}
    wide, _ = zoo.build(arch_name, seed=4, hidden=64, mlp=128, **extra)
    ta, tb = otfx.trace(anchor, args), otfx.trace(wide, args)
    fused = otfx.fuse(ta, tb, solver="sinkhorn", reg=0.05, heads=heads)
    for (name, p), q in zip(fused.named_parameters(), anchor.parameters()):
        assert p.shape == q.shape, name
    assert torch.isfinite(outputs(fused, fresh_inputs(arch_name))).all()
    maps = compute_maps(otfx.analyse(ta), otfx.analyse(tb), FusionConfig(solver="sinkhorn", reg=0.05, heads=heads))
    aligned_params(maps)
    assert any(t.shape[0] == 2 * t.shape[1] for t in maps.maps.values())
    for plan in maps.maps.values():
        n_b, n_a = plan.shape
        # uniform marginals, to the solver's tolerance (within 0.1%)
        torch.testing.assert_close(plan.sum(1) * n_b, torch.ones(n_b, dtype=plan.dtype), atol=1e-3, rtol=0)
        torch.testing.assert_close(plan.sum(0) * n_a, torch.ones(n_a, dtype=plan.dtype), atol=1e-3, rtol=0)


def test_three_model_fusion_honours_weights():
    """B and C are permuted copies of A whose norm biases are scaled by 2 and 3 (norm biases take no part in
    the cost, so the maps are still the permutations): the fused biases are (w0 + 2 w1 + 3 w2) x A's."""
    model, args = zoo.build("hf_vit")
    traced = otfx.trace(model, args)
    scaled = []
    for factor in (2.0, 3.0):
        copy = otfx.random_symmetry(traced, seed=int(factor))
        with torch.no_grad():
            for name, p in copy.named_parameters():
                if "layernorm" in name and name.endswith("bias"):
                    p.mul_(factor)
        scaled.append(otfx.trace(copy, args))
    weights = [0.5, 0.3, 0.2]
    fused = otfx.fuse(traced, *scaled, solver="emd", residual="mean", weights=weights)
    expected = weights[0] + 2 * weights[1] + 3 * weights[2]
    originals = dict(model.named_parameters())
    checked = 0
    for name, p in fused.named_parameters():
        if "layernorm" in name and name.endswith("bias"):
            torch.testing.assert_close(p, originals[name] * expected, atol=1e-5, rtol=0)
            checked += 1
        else:
            torch.testing.assert_close(p, originals[name], atol=1e-5, rtol=0)
    assert checked >= 4


def test_tiny_sinkhorn_regulariser_is_handled():
    a, args = zoo.build("hf_vit")
    b, _ = zoo.build("hf_vit", seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = otfx.fuse(otfx.trace(a, args), otfx.trace(b, args), solver="sinkhorn", reg=1e-4)
    assert any("sinkhorn" in str(w.message).lower() or "fall" in str(w.message).lower() for w in caught)
    for p in fused.parameters():
        assert torch.isfinite(p).all()
        assert p.abs().sum() > 0
    assert torch.isfinite(outputs(fused, fresh_inputs("hf_vit"))).all()


def test_vanilla_fusion_and_ensemble():
    a, args = zoo.build("bert")
    b, _ = zoo.build("bert", seed=1)
    avg = otfx.vanilla_fuse(a, b)
    for (k, p), q, r in zip(avg.named_parameters(), a.parameters(), b.parameters()):
        torch.testing.assert_close(p, (q + r) / 2, msg=k)
    ens = otfx.ensemble(a, b, weights=[3, 1])
    x = fresh_inputs("bert")
    torch.testing.assert_close(outputs(ens, x), 0.75 * outputs(a, x) + 0.25 * outputs(b, x))


def test_plain_modules_are_traced_with_args():
    model, args = zoo.build("matmul_encoder")
    copy = otfx.random_symmetry(otfx.trace(model, args), seed=2)
    fused = otfx.fuse(model, copy, args=args, solver="emd", residual="mean")
    assert_same_model(fused, model, "matmul_encoder", param_atol=1e-5)
    rotated = otfx.fuse(model, copy, args=args, solver="emd")  # the default: the stream rotated, gains folded
    assert_same_model(rotated, model, "matmul_encoder", param_atol=None)


def test_token_filters_run():
    model, args = zoo.build("hf_vit")
    other, _ = zoo.build("hf_vit", seed=1)
    ta, tb = otfx.trace(model, args), otfx.trace(other, args)
    for tokens in ("cls", ("window", 2), "window:3"):
        fused = otfx.fuse(ta, tb, cost="activations", data=data_batches("hf_vit"), tokens=tokens)
        assert torch.isfinite(outputs(fused, fresh_inputs("hf_vit"))).all()


def test_fixed_space_of_another_width_is_refused():
    anchor, args = zoo.build("llama")
    wide_heads, _ = zoo.build("llama", seed=1, hidden=64, mlp=128)  # head dim 16 instead of 8
    with pytest.raises(otfx.FusionError, match="only free spaces may differ in width"):
        otfx.fuse(otfx.trace(anchor, args), otfx.trace(wide_heads, args))


def test_bad_input_gets_clear_errors():
    bert, args = zoo.build("bert")
    deeper, _ = zoo.build("bert", layers=3)
    gpt2, _ = zoo.build("gpt2")
    vit, vit_args = zoo.build("hf_vit")
    tb = otfx.trace(bert, args)
    with pytest.raises(otfx.FusionError, match="different architectures or depths"):
        otfx.fuse(tb, otfx.trace(deeper, args))
    with pytest.raises(otfx.FusionError, match="different architectures"):
        otfx.fuse(tb, otfx.trace(gpt2, args))
    with pytest.raises(otfx.FusionError, match="at least two models"):
        otfx.fuse(tb)
    with pytest.raises(otfx.FusionError, match="needs data"):
        otfx.fuse(tb, tb, cost="activations")
    with pytest.raises(otfx.FusionError, match="solver"):
        otfx.fuse(tb, tb, solver="hungarian")
    with pytest.raises(otfx.FusionError, match="only the batch size may differ"):
        otfx.fuse(tb, tb, cost="activations", data=[zoo.inputs("bert", 2, 5)])
    with pytest.raises(otfx.FusionError, match="not traced"):
        otfx.fuse(bert, bert)
    with pytest.raises((otfx.FusionError, otfx.TraceError)):
        otfx.fuse(vit, vit, args=args)  # token ids do not fit an image model
    # a classifier with another number of classes: the output axis cannot be aligned
    import transformers

    cfg = {k: v for k, v in vit.config.to_dict().items() if k not in ("id2label", "label2id")}
    five = transformers.ViTForImageClassification(transformers.ViTConfig(**cfg | {"num_labels": 5})).eval()
    with pytest.raises(otfx.FusionError, match="cannot be aligned"):
        otfx.fuse(otfx.trace(vit, vit_args), otfx.trace(five, vit_args))


class _ZeroWidthBranch(torch.nn.Module):
    """An MLP with a zero-width layer beside it (what MobileBERT's head becomes when its hidden size equals its
    embedding size): the empty branch's output is concatenated to the hidden units."""

    def __init__(self):
        super().__init__()
        self.fc1, self.empty = torch.nn.Linear(8, 16), torch.nn.Linear(8, 0)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.nn.functional.gelu(self.fc1(x)), self.empty(x)], dim=-1)
        return self.fc2(h)


def test_a_zero_width_layer_is_left_alone_and_the_rest_recovered():
    torch.manual_seed(0)
    model = _ZeroWidthBranch().eval()
    x = torch.randn(4, 8)
    ta = otfx.trace(model, (x,))
    copy = otfx.random_symmetry(ta, seed=2)
    assert not torch.equal(copy.fc1.weight, model.fc1.weight), "the symmetry did not move the hidden units"
    fused = otfx.fuse(ta, otfx.trace(copy, (x,)), solver="emd")
    for (name, p), q in zip(fused.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=name)
    aligned = otfx.align(otfx.trace(copy, (x,)), to=ta)
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), copy(x), atol=1e-5, rtol=1e-5)


def test_the_anchor_inputs_run_through_another_model_only_when_it_was_traced_on_other_inputs():
    """A model traced on the anchor's very inputs is not run again to check that they fit; one traced on other
    inputs is, and the fused model is the same either way."""
    model, args = zoo.build("bert")
    other = zoo.build("bert", seed=1)[0]
    calls = []
    hook = other.register_forward_hook(lambda *_: calls.append(1))
    ta, tb = otfx.trace(model, args), otfx.trace(other, tuple(t.clone() for t in args))
    traced_calls = len(calls)
    same = otfx.fuse(ta, tb)
    assert len(calls) == traced_calls  # equal inputs: no forward pass
    tc = otfx.trace(other, zoo.inputs("bert", batch=2, seq=8, seed=7))
    traced_calls = len(calls)
    checked = otfx.fuse(ta, tc)
    assert len(calls) == traced_calls + 1
    hook.remove()
    for (name, p), q in zip(same.named_parameters(), checked.parameters(), strict=True):
        assert torch.equal(p, q), name
