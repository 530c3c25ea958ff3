"""The op-pass API: a user's pass for a custom op, explicit override, per-call passes, the cache, errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from otfx.passes import REGISTRY, OpPass, PassError, PassRegistrationError, Pattern
from torch import nn

import otfx
from otfx.infer.kinds import LinkKind, RecordKind

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_op_pass.py"


def _example():
    if "custom_op_pass" not in sys.modules:  # the module defines a torch.library op: import it once
        spec = importlib.util.spec_from_file_location("custom_op_pass", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["custom_op_pass"] = module
        spec.loader.exec_module(module)
    return sys.modules["custom_op_pass"]


ex = _example()
Q_ROWS = ("blocks.0.q.weight", 0)


def outputs(model: nn.Module, args: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*args)


@pytest.fixture
def registered():
    """The example's pass registered from user code, removed afterwards."""
    otfx.passes.register(ex.FUSED_ATTENTION)(ex.fused_attention_pass)
    yield
    otfx.passes.unregister(ex.FUSED_ATTENTION)


def _is_free(inference, fqn: str, axis: int) -> bool:
    return any(not inference.is_fixed(leaf) for leaf in inference.leaves(inference.param_axes[fqn][axis]))


def test_without_a_pass_the_op_is_reported_and_its_spaces_freeze():
    model, args = ex.build()
    inference = otfx.analyse(otfx.trace(model, args))
    report = inference.coverage()
    assert report[str(ex.FUSED_ATTENTION)]["unknown"]
    assert "blocks.0.q.weight axis 0" in report[str(ex.FUSED_ATTENTION)]["params"]
    assert not _is_free(inference, *Q_ROWS)
    permuted = otfx.random_symmetry(inference, seed=1)
    assert torch.equal(permuted.blocks[0].q.bias, model.blocks[0].q.bias)  # q's rows stay (its columns move)
    assert not torch.equal(permuted.blocks[0].fc1.bias, model.blocks[0].fc1.bias)


def test_user_pass_frees_the_spaces_the_op_touches(registered):
    model, args = ex.build()
    traced = otfx.trace(model, args)
    inference = otfx.analyse(traced)
    assert inference.coverage() == {}
    assert any(r.kind == "attention" and r.info.get("form") == "custom op" for r in inference.records)
    for name in ("q", "k", "v"):
        assert _is_free(inference, f"blocks.0.{name}.weight", 0), name
    permuted = otfx.random_symmetry(traced, seed=1)
    for name in ("q", "k", "v"):  # the rows of q/k/v really move (a bias has only the row axis)
        before, after = getattr(model.blocks[0], name).bias, getattr(permuted.blocks[0], name).bias
        assert not torch.equal(before, after), name
    x = (torch.randint(0, 50, (5, 8), generator=torch.Generator().manual_seed(3)),)
    torch.testing.assert_close(outputs(permuted, x), outputs(model, x), atol=1e-5, rtol=0)


def test_fuse_recovers_the_model_and_fuses_two_seeds(registered):
    model, args = ex.build()
    traced = otfx.trace(model, args)
    permuted = otfx.trace(otfx.random_symmetry(traced, seed=2), args)
    fused = otfx.fuse(traced, permuted, solver="emd")
    for name, p in model.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], p, atol=1e-5, rtol=0, msg=name)
    other, _ = ex.build(seed=1)
    two = otfx.fuse(traced, otfx.trace(other, args))
    assert torch.isfinite(outputs(two, args)).all()
    assert not torch.allclose(outputs(two, args), outputs(model, args))


def test_per_call_passes_leave_the_registry_alone():
    model, args = ex.build()
    traced = otfx.trace(model, args)
    version = REGISTRY.version
    handler = ex.fused_attention_pass
    for passes in ({ex.FUSED_ATTENTION: handler}, [OpPass(ex.FUSED_ATTENTION, handler)]):
        inference = otfx.analyse(traced, passes=passes)
        assert inference.coverage() == {} and _is_free(inference, *Q_ROWS)
    assert REGISTRY.version == version and REGISTRY.lookup(ex.FUSED_ATTENTION) is None
    assert not _is_free(otfx.analyse(traced), *Q_ROWS)
    moved = otfx.random_symmetry(otfx.analyse(traced, passes={ex.FUSED_ATTENTION: ex.fused_attention_pass}), seed=4)
    assert not torch.equal(moved.blocks[1].q.weight, model.blocks[1].q.weight)


def test_cache_sees_a_pass_registered_later():
    model, args = ex.build()
    traced = otfx.trace(model, args)
    first = otfx.analyse(traced)
    assert otfx.analyse(traced) is first  # cached while the registry is unchanged
    otfx.passes.register(ex.FUSED_ATTENTION)(ex.fused_attention_pass)
    try:
        assert _is_free(otfx.analyse(traced), *Q_ROWS) and not _is_free(first, *Q_ROWS)
    finally:
        otfx.passes.unregister(ex.FUSED_ATTENTION)
    assert not _is_free(otfx.analyse(traced), *Q_ROWS)


def test_replacing_a_built_in_needs_replace_true():
    aten = torch.ops.aten
    original = REGISTRY.lookup(aten.gelu.default)

    def my_gelu(ctx, node):
        ctx.fix_node(node, "my gelu", unknown=False)

    with pytest.raises(PassRegistrationError, match=r"built-in pass otfx\.passes\.elementwise\.unary.*replace=True"):
        otfx.passes.register(aten.gelu.default)(my_gelu)
    assert REGISTRY.lookup(aten.gelu.default) is original
    model, args = ex.build()
    traced = otfx.trace(model, args)
    otfx.passes.register(aten.gelu.default, replace=True)(my_gelu)
    try:  # the MLP units are frozen by the replacement, and the cache does not hide it
        assert not _is_free(otfx.analyse(traced), "blocks.0.fc1.weight", 0)
    finally:
        otfx.passes.register(aten.gelu.default, replace=True, view=original.view)(original.handler)
    assert _is_free(otfx.analyse(traced), "blocks.0.fc1.weight", 0)
    with pytest.raises(PassRegistrationError, match="pattern 'rms_norm'"):
        otfx.passes.register_pattern("rms_norm", aten.mul.Tensor)(my_gelu)


def test_a_failing_pass_names_the_node_and_the_op():
    def broken(ctx, node):
        raise KeyError("oops")

    model, args = ex.build()
    with pytest.raises(PassError, match=r"failed on node 'fused_attention(_\d+)?' \(op otfx_example\.fused_attention"
                                        r"\.default in module '(model\.)?blocks\.0'\): KeyError"):
        otfx.analyse(otfx.trace(model, args), passes={ex.FUSED_ATTENTION: broken})


def test_conflicts_appear_in_coverage():
    def confused(ctx, node):  # links the head dim with the sequence: sizes differ
        ex.fused_attention_pass(ctx, node)
        ctx.link(ctx.axes_of(node.args[0])[3], ctx.axes_of(node.args[0])[1])

    model, args = ex.build()
    report = otfx.analyse(otfx.trace(model, args), passes={ex.FUSED_ATTENTION: confused}).coverage()
    entry = report[str(ex.FUSED_ATTENTION)]
    assert any("size mismatch" in why for why in entry["conflicts"]) and entry["nodes"]


def test_patterns_are_registered_like_op_passes():
    seen = []

    def every_gelu(ctx, node):
        seen.append(node.name)
        return True

    model, args = ex.build()
    inference = otfx.analyse(otfx.trace(model, args), passes=[Pattern("gelus", frozenset({torch.ops.aten.gelu}),
                                                                      every_gelu)])
    assert len(seen) == 2 and inference.coverage().keys() == {str(ex.FUSED_ATTENTION)}


def test_kinds_are_typed_and_read_as_strings():
    model, args = ex.build()
    inference = otfx.analyse(otfx.trace(model, args))
    kinds = {r.kind for r in inference.records}
    assert all(isinstance(k, RecordKind) for k in kinds) and "layer" in kinds and RecordKind.norm in kinds
    assert {kind for _, _, kind in inference.spaces.soft_links} <= set(LinkKind)
    with pytest.raises(ValueError, match="unknown LinkKind 'residul'"):
        inference.spaces.link(0, 1, "residul")


class _RMSNorm(nn.Module):
    """Gemma's form: x * rsqrt(mean(x^2) + eps) * (1 + w), computed in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + self.weight.float())).type_as(x)


def test_rms_norm_pattern_finds_the_one_plus_w_form():
    model = nn.Sequential(nn.Linear(6, 8), _RMSNorm(8), nn.Linear(8, 3))
    inference = otfx.analyse(model, (torch.randn(2, 6),))
    norms = [r for r in inference.records if r.kind == "norm"]
    assert len(norms) == 1 and norms[0].info["form"] == "rms"
    assert [n for n, d in inference.flow_graph.nodes(data=True) if d["kind"] == "norm"] == [f"norm:{norms[0].node}"]
