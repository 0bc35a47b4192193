"""Parity with kronfluence 1.0.1 (skipped when it is not installed).

kronfluence's scores are ``g_qᵀ (C + λI)⁻¹ g_z`` (positive = helpful); curvlab's carry
the minus sign of the influence on the query loss, so ``curvlab = −kronfluence``. Both
use the empirical Fisher here (observed labels; kronfluence's ``use_empirical_fisher``),
the same damping on the mean-loss scale, and for EK-FAC an eigenbasis of the whole data
set's factors.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import curvlab
from curvlab.influence import Influence

kronfluence = pytest.importorskip("kronfluence")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task as KronfluenceTask  # noqa: E402

DAMPING = 1e-3
BATCH = 16


class ClassificationTask(KronfluenceTask):
    def compute_train_loss(self, batch, model, sample=False) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="sum")

    def compute_measurement(self, batch, model) -> Tensor:
        return self.compute_train_loss(batch, model)


def _model_and_data(kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    if kind == "conv":
        model: nn.Module = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(36, 5),
        )
        X = torch.randn(64, 1, 8, 8)
    else:
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))
        X = torch.randn(64, 8)
    return model, X, torch.randint(0, 5, (64,))


def _pearson(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


@pytest.mark.parametrize(
    ("kind", "strategy"),
    [
        ("mlp", "ekfac"),
        # K-FAC on Linear layers only: kronfluence's convolution G averages over the
        # output positions (1/(N·T) Σ g gᵀ), KFC sums them (1/N Σ g gᵀ), so its conv
        # blocks are |T| times smaller and the same λ damps them differently
        ("mlp", "kfac"),
        # 1-11 s on 2 shared cores (kronfluence's convolution statistics): `make test-slow`
        pytest.param("conv", "ekfac", marks=pytest.mark.slow),
    ],
)
def test_scores_match_kronfluence(kind: str, strategy: str, tmp_path) -> None:
    model, X, y = _model_and_data(kind)
    Xq, yq = X[:6] + 0.1 * torch.randn_like(X[:6]), y[:6]
    train = [(X[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(X), BATCH)]

    backend = curvlab.make(strategy, model, nn.CrossEntropyLoss(), fisher_type="empirical")
    influence = Influence(backend, damping=DAMPING, progress=False).fit(train)
    ours = influence.pairwise((Xq, yq), train).scores
    ours_self = influence.self_influence(train).scores

    task = ClassificationTask()
    analyzer = Analyzer(
        "parity",
        prepare_model(copy.deepcopy(model), task),
        task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(tmp_path),
        log_level=logging.WARNING,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its GradScaler on the CPU
        analyzer.fit_all_factors(
            "factors",
            TensorDataset(X, y),
            per_device_batch_size=BATCH,
            factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=True),
        )
        score_args = ScoreArguments(damping_factor=DAMPING)
        analyzer.compute_pairwise_scores(
            "pairwise",
            "factors",
            TensorDataset(Xq, yq),
            TensorDataset(X, y),
            per_device_query_batch_size=len(Xq),
            per_device_train_batch_size=BATCH,
            score_args=score_args,
        )
        analyzer.compute_self_scores(
            "self",
            "factors",
            TensorDataset(X, y),
            per_device_train_batch_size=BATCH,
            score_args=score_args,
        )
    theirs = analyzer.load_pairwise_scores("pairwise")["all_modules"]
    theirs_self = analyzer.load_self_scores("self")["all_modules"]

    assert _pearson(ours, -theirs) >= 0.999
    assert _pearson(ours_self, -theirs_self) >= 0.999
    # beyond correlation: the same numbers up to float32 rounding
    torch.testing.assert_close(ours, -theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))
