"""Build tiny models to self-test your own passes: small transformers of many families with random weights.

``build(name)`` returns ``(model, example_inputs)`` for each name in :data:`ZOO` (HF BERT, ViT, GPT-2, Llama with
grouped-query attention, timm ViT, vit-pytorch, hand-written matmul and ``nn.TransformerEncoder`` encoders);
``inputs(name, batch, seq)`` makes fresh inputs of another shape. A pass you register should leave, e.g.,
``otfx.random_symmetry(otfx.trace(model, args))`` computing the same function on all of them. ``timm_vit`` and
``vit_pytorch`` need the optional packages ``timm`` and ``vit-pytorch``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

VOCAB = 97
IMAGE = 16
PATCH = 4


def _optional(module: str, package: str, builder: str) -> ModuleType:
    """Import an optional dependency, or say which pip package the builder needs."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"otfx.testing.{builder} needs the optional package {package!r}: "
                          f"pip install {package}") from err


@dataclass(frozen=True)
class ZooEntry:
    """A model family: how to build it and how to make inputs for it."""

    build: Callable[..., nn.Module]
    make_inputs: Callable[[int, int, int], tuple]
    varies_seq: bool  # whether the sequence length may differ from the traced one


def _token_inputs(batch: int, seq: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (batch, seq), generator=g),)


def _image_inputs(batch: int, seq: int, seed: int, channels: int = 3) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, IMAGE, IMAGE, generator=g),)


def bert(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, mlp: int = 64) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=mlp, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return _randomise(BertForMaskedLM(cfg).eval(), seed)


def hf_vit(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, mlp: int = 64) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=hidden,
                    num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp, num_labels=10,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _randomise(ViTForImageClassification(cfg).eval(), seed)


def gpt2(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, mlp: int = 64) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=mlp, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return _randomise(GPT2LMHeadModel(cfg).eval(), seed)


def llama(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, mlp: int = 64,
          kv_heads: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=mlp, max_position_embeddings=64,
                      use_cache=False, tie_word_embeddings=False)
    return _randomise(LlamaForCausalLM(cfg).eval(), seed)


def timm_vit(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, mlp: int = 64,
             fused_attn: bool = True) -> nn.Module:
    vision_transformer = _optional("timm.models.vision_transformer", "timm", "timm_vit")

    torch.manual_seed(seed)
    model = vision_transformer.VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=hidden, depth=layers, num_heads=heads,
        mlp_ratio=mlp / hidden, num_classes=10)
    for block in model.blocks:
        block.attn.fused_attn = fused_attn
    return _randomise(model.eval(), seed)


def vit_pytorch(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, mlp: int = 64) -> nn.Module:
    vit = _optional("vit_pytorch", "vit-pytorch", "vit_pytorch").ViT

    torch.manual_seed(seed)
    model = vit(image_size=IMAGE, patch_size=PATCH, num_classes=10, dim=hidden, depth=layers, heads=heads,
                mlp_dim=mlp, dim_head=hidden // heads)
    return _randomise(model.eval(), seed)


class _MatmulAttention(nn.Module):
    """Multi-head attention written with explicit matmul + softmax."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d // h)
        out = torch.matmul(scores.softmax(dim=-1), v)
        return self.o(out.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = _MatmulAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class MatmulEncoder(nn.Module):
    """A hand-written pre-LN encoder classifier with explicit matmul + softmax attention and a class token."""

    def __init__(self, dim: int = 32, layers: int = 2, heads: int = 4, mlp: int = 64, classes: int = 10,
                 max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def matmul_encoder(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, mlp: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise(MatmulEncoder(hidden, layers, heads, mlp).eval(), seed)


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder`` (nn.MultiheadAttention's packed in_proj layout) over token embeddings."""

    def __init__(self, dim: int = 32, layers: int = 2, heads: int = 4, mlp: int = 64, classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)))


def torch_encoder(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, mlp: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise(TorchEncoder(hidden, layers, heads, mlp).eval(), seed)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter distinct random values (freshly initialised norms are all ones and zeros)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


ZOO: dict[str, ZooEntry] = {
    "bert": ZooEntry(bert, _token_inputs, True),
    "hf_vit": ZooEntry(hf_vit, _image_inputs, False),
    "gpt2": ZooEntry(gpt2, _token_inputs, True),
    "llama": ZooEntry(llama, _token_inputs, True),
    "timm_vit": ZooEntry(timm_vit, _image_inputs, False),
    "timm_vit_unfused": ZooEntry(lambda **kw: timm_vit(fused_attn=False, **kw), _image_inputs, False),
    "vit_pytorch": ZooEntry(vit_pytorch, _image_inputs, False),
    "matmul_encoder": ZooEntry(matmul_encoder, _token_inputs, True),
    "torch_encoder": ZooEntry(torch_encoder, _token_inputs, True),
}


def build(name: str, seed: int = 0, **config) -> tuple[nn.Module, tuple]:
    """Build a zoo model and example inputs (batch 2, sequence 8)."""
    if name not in ZOO:
        raise KeyError(f"otfx.testing has no model {name!r}; choose one of {sorted(ZOO)}")
    entry = ZOO[name]
    return entry.build(seed=seed, **config), entry.make_inputs(2, 8, seed)


def inputs(name: str, batch: int, seq: int, seed: int = 1) -> tuple:
    """Fresh inputs for a zoo model at another batch size and (where allowed) sequence length."""
    return ZOO[name].make_inputs(batch, seq, seed)
