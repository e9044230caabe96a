"""Shared fixtures: small fields with known mathematics."""

import pytest
import torch
from torch import nn


class LinearField(nn.Module):
    """f(t, z) = z A^T (each row z -> A z): the flow is z(t) = expm(A t) z(0), log-det t tr(A)."""

    def __init__(self, A: torch.Tensor, learn: bool = False) -> None:
        super().__init__()
        self.A = nn.Parameter(A.clone()) if learn else A.clone()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# A run small enough for tests: a few seconds on one CPU core.
def cli_flags(**kw) -> list[str]:
    """``cnf train`` flags for config values: ``hidden=(16, 16)`` -> ``--hidden 16,16``."""
    flags = []
    for k, v in kw.items():
        flags += [
            f"--{k.replace('_', '-')}",
            ",".join(map(str, v)) if isinstance(v, tuple) else str(v),
        ]
    return flags


SMALL = dict(
    iters=12, batch_size=64, eval_every=6, hidden=(16, 16), method="rk4", step_size=0.25,
    eval_method="rk4", eval_step_size=0.25, test_size=300, validity_size=300,
)  # fmt: skip


def config(**kw):
    """A TrainConfig from flat options (model fields such as ``hidden`` included), without the
    presets that ``TrainConfig.for_data`` adds."""
    from cnf.training import TrainConfig

    return TrainConfig.plain(**kw)
