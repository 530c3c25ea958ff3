"""Recovery of a model from a random symmetry of itself (zoo issue 14): ``fuse(A, symmetry of A, EMD)`` must give
A back. Two mechanisms broke it on the zoo's tiny configs:

* rows of one value (a class token that alone produces the class-token stream, one attention sink per head)
  scaled one by one to unit norm keep only their sign, so neurons of one sign look the same to the solver
  (timm CaiT, Flint);
* a class whose only producers are parameters added to it as they are (IBert's LayerNorm bias written out as
  ``x * w + b``, GraniteSWA's zero-initialised sinks) was solved from those rows instead of taking the plan the
  graph gives it (the residual add before the norm, the heads of the query projection).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import otfx
from otfx.align.config import FusionConfig
from otfx.align.costs.weights import sq_dists, unit_rows
from otfx.align.maps import TransportMaps
from otfx.align.solvers import solve
from otfx.trace import main_output

VOCAB, SEQ, IMAGE = 97, 8, 32
#: the zoo sweep's tiny widths (benchmarks/zoo_sweep.py)
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)


def _tokens(seed: int = 100) -> tuple:
    return (torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed)),)


def cait():
    timm = pytest.importorskip("timm")
    model = timm.create_model("cait_xxs24_224", pretrained=False, num_classes=3, img_size=IMAGE, patch_size=8,
                              embed_dim=32, depth=2, num_heads=4)
    return model, (torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(100)),)


def flint():
    from transformers import FlintConfig, FlintForCausalLM

    config = FlintConfig(**TINY, num_key_value_heads=2, head_dim=8, mlp_only_layers=[0, 1])
    return FlintForCausalLM(config), _tokens()


def granite_swa():
    from transformers import GraniteSWAConfig, GraniteSWAForCausalLM

    return GraniteSWAForCausalLM(GraniteSWAConfig(**TINY, num_key_value_heads=2, head_dim=8)), _tokens()


def ibert():
    from transformers import IBertConfig, IBertForMaskedLM

    return IBertForMaskedLM(IBertConfig(**TINY, type_vocab_size=2)), _tokens()


MODELS = {"timm_cait": cait, "flint": flint, "granite_swa": granite_swa, "ibert": ibert}


def build(name: str):
    torch.manual_seed(0)
    model, args = MODELS[name]()
    return model.eval(), args


@pytest.mark.parametrize("name", list(MODELS))
def test_fuse_with_own_symmetry_recovers_the_model(name):
    model, args = build(name)
    traced = otfx.trace(model, args)
    sym = otfx.random_symmetry(traced, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = otfx.fuse(traced, otfx.trace(sym, args), solver="emd")
    state = fused.state_dict()
    off = {k: float((state[k].float() - v.float()).abs().max()) for k, v in model.state_dict().items()
           if v.is_floating_point()}
    assert max(off.values()) <= 1e-4, {k: f"{v:.1e}" for k, v in off.items() if v > 1e-4}
    with torch.no_grad():
        diff = (main_output(fused(*args)).float() - main_output(model(*args)).float()).abs().max()
    assert diff <= 1e-4


def test_one_value_rows_keep_their_values():
    """Rows of one value are scaled by one common factor (unit mean square), so the cost still tells the
    neurons apart and EMD finds the permutation; scaled one by one they would all be +-1."""
    values = torch.randn(12, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    scaled = unit_rows(values)
    assert len(scaled.unique()) == 12
    torch.testing.assert_close(scaled.square().mean(), torch.tensor(1.0, dtype=torch.float64))
    plan, _ = solve(sq_dists(values[perm], values, unit=True).clamp_min(0).sqrt(), method="emd")
    assert torch.equal(plan.argmax(1), perm)


@pytest.mark.parametrize("name, described", [("ibert", "output.LayerNorm.bias"), ("granite_swa", "self_attn.sinks")])
def test_written_only_classes_take_the_graphs_plan(name, described):
    """A class whose only producers are written parameters, and whose plan a residual add or a produced
    product gives anyway, keeps those rows as a description only: the map graph does not solve it from them."""
    model, args = build(name)
    inference = otfx.analyse(otfx.trace(model, args))
    maps = TransportMaps(inference, inference, FusionConfig(solver="emd", residual="mean"))
    kept = {p.fqn for ps in maps.structure.described.values() for p in ps}
    assert any(fqn.endswith(described) for fqn in kept), kept
    graph = maps.graph
    for root in maps.structure.described:
        if root in graph:
            assert graph.nodes[root]["kind"] not in ("solve", "heads")
