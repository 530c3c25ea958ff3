"""Shared fixtures: one thread (a shared 2-core machine stalls with two), quiet transformers, zoo models."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from otfx import testing as zoo  # noqa: E402

ARCHITECTURES = list(zoo.ZOO)


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"input model was modified: {k}"


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param
