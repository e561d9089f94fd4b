"""The validation's log-odds (a model whose every slab rounds to probability 1 still ranks them) and
batch norm's statistics recomputed before each validation (`train.precise_bn`): against hand-computed
statistics, and through a training (its resume is a case of test_training_resume.py's resume test)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dicomops.config import TrainConfig
from dicomops.training.data import SlabSet
from dicomops.training.loop import Precision, fit, predict, predict_log_odds, recompute_batch_norm
from tests.toy_slabs import toy_slabs

CFG = TrainConfig(epochs=2, input_size=32, batch_size=16, patience=5, precision="fp32", num_workers=0)
FP32 = Precision(torch.device("cpu"), None)


class _Shifted(torch.nn.Module):
    """Logits (0, shift + mean of the slab): every slab's log-odds is its mean plus `shift`."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positive = self.shift + x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(positive), positive], dim=1)


def _batch_norm_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))


def test_log_odds_rank_slabs_whose_probabilities_all_round_to_one() -> None:
    data = toy_slabs(40, 0)
    y = data.y.numpy()
    saturated = _Shifted(30.0)
    assert (predict(saturated, data.x) == 1.0).all()
    assert roc_auc_score(y, predict(saturated, data.x)) == 0.5
    log_odds = predict_log_odds(saturated, data.x)
    expected = 30.0 + data.x.float().mean(dim=(1, 2, 3)).numpy()
    assert np.allclose(log_odds, expected, atol=1e-5)
    assert roc_auc_score(y, log_odds) == 1.0
    # Where the probabilities do not saturate, the log-odds are their logits.
    moderate = _Shifted(-0.5)
    p = predict(moderate, data.x)
    assert np.allclose(predict_log_odds(moderate, data.x), np.log(p / (1 - p)), atol=1e-4)


def test_the_training_validates_on_log_odds_where_probabilities_round_to_one(tmp_path: Path) -> None:
    train, val = toy_slabs(64, 0), toy_slabs(32, 1)
    # Slabs 1000 times brighter than any it trained on: most of its probabilities come out exactly 1.
    loud = SlabSet((val.x.float() * 1000).half(), val.y, val.series, val.z)
    # Left-right flips only: this seed's one-epoch toy model then saturates at 1 (with front-to-back
    # flips as well, at 0 and just above it, where float32 still ranks most of them).
    result = fit(train, loud, CFG.model_copy(update={"epochs": 1, "flip_axes": (0,)}), tmp_path / "l.pt", seed=1)
    y = val.y.numpy()
    probabilities = predict(result.model, loud.x)
    assert (probabilities == 1.0).mean() > 0.5
    on_log_odds = roc_auc_score(y, predict_log_odds(result.model, loud.x))
    assert result.history[0]["val_slice_auc"] == pytest.approx(on_log_odds, abs=1e-12)
    assert abs(on_log_odds - roc_auc_score(y, probabilities)) > 0.01


def test_recomputed_statistics_are_the_slabs_plain_mean_and_variance() -> None:
    torch.manual_seed(0)
    net = _batch_norm_net()
    bn = net[0]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    net.eval()
    x = toy_slabs(48, 1).x
    recompute_batch_norm(net, x, FP32, batch_size=16)
    # torch's cumulative average: of each batch's mean and unbiased variance, every batch weighing the same.
    batches = [x[i:i + 16].float().permute(1, 0, 2, 3).reshape(3, -1) for i in range(0, 48, 16)]
    assert torch.allclose(bn.running_mean, torch.stack([b.mean(dim=1) for b in batches]).mean(dim=0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack([b.var(dim=1) for b in batches]).mean(dim=0), atol=1e-5)
    assert torch.allclose(bn.running_mean, x.float().mean(dim=(0, 2, 3)), atol=1e-5)  # equal batches
    assert bn.momentum == 0.1 and not net.training
    # A network without batch norm is left as it is.
    plain = _Shifted(1.0)
    recompute_batch_norm(plain, x, FP32, batch_size=16)
    assert float(plain.shift) == 1.0


def test_a_training_validates_and_returns_the_recomputed_statistics(tmp_path: Path) -> None:
    train, val = toy_slabs(64, 0), toy_slabs(32, 1)
    cfg = CFG.model_copy(update={"precise_bn": 64})
    result = fit(train, val, cfg, tmp_path / "p.pt", seed=1)
    again = copy.deepcopy(result.model)
    # The fixed subset: every slab here, in the order of the training seed's own permutation.
    subset = train.x[torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    recompute_batch_norm(again, subset, FP32, batch_size=cfg.batch_size)
    returned, recomputed = result.model.state_dict(), again.state_dict()
    stats = [k for k in returned if k.endswith(("running_mean", "running_var"))]
    assert stats
    assert max(float((returned[k] - recomputed[k]).abs().max()) for k in stats) < 1e-4
    best = result.history[result.best_epoch - 1]["val_slice_auc"]
    assert best == pytest.approx(roc_auc_score(val.y.numpy(), predict_log_odds(result.model, val.x)), abs=1e-12)
    # Without it, the statistics are the training's last batches', not these.
    plain = fit(train, val, CFG, tmp_path / "q.pt", seed=1).model.state_dict()
    assert max(float((plain[k] - recomputed[k]).abs().max()) for k in stats) > 1e-3
