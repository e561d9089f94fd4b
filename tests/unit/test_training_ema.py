"""The moving average of the weights (`train.ema_decay`): its update against hand-computed values, the
weights a training validates and returns, and a checkpoint without an average (the resumed average is
one case of test_training_resume.py's resume test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score

from dicomops.config import TrainConfig
from dicomops.training.loop import ema_update, fit, load_checkpoint, predict_log_odds
from tests.toy_slabs import toy_slabs

CFG = TrainConfig(epochs=3, input_size=32, batch_size=16, patience=5, precision="fp32", num_workers=0,
                  ema_decay=0.9)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())


def test_the_update_warms_up_then_holds_the_decay_and_copies_integer_buffers() -> None:
    update = ema_update(0.99)
    averaged, current = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    # After 0 updates the decay is min(0.99, 1/10) = 0.1: 90 % of the step's weights.
    update(averaged, current, torch.tensor(0))
    assert torch.allclose(averaged[0], torch.tensor([1.0 + 0.9 * 2.0, 2.0 + 0.9 * 4.0]))
    # After 1000, min(0.99, 1001/1010) = 0.99.
    averaged = [torch.tensor([1.0, 2.0])]
    update(averaged, current, torch.tensor(1000))
    assert torch.allclose(averaged[0], torch.tensor([1.0 + 0.01 * 2.0, 2.0 + 0.01 * 4.0]))
    counters = [torch.tensor(5)]
    update(counters, [torch.tensor(17)], torch.tensor(3))
    assert int(counters[0]) == 17


def test_a_training_returns_the_averaged_weights_not_the_last_steps(tmp_path: Path) -> None:
    result = fit(toy_slabs(64, 0), None, CFG, tmp_path / "c.pt", seed=1)
    state = load_checkpoint(tmp_path / "c.pt")
    assert state is not None
    averaged = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    returned = result.model.state_dict()
    assert _max_difference(averaged, returned) == 0.0
    assert _max_difference(state["model"], returned) > 1e-4
    # Without the setting, the last step's weights.
    plain = fit(toy_slabs(64, 0), None, CFG.model_copy(update={"ema_decay": 0.0}), tmp_path / "d.pt", seed=1)
    plain_state = load_checkpoint(tmp_path / "d.pt")
    assert plain_state is not None and "ema" not in plain_state
    assert _max_difference(plain_state["model"], plain.model.state_dict()) == 0.0


def test_the_validation_auc_is_the_averaged_models(tmp_path: Path) -> None:
    train, val = toy_slabs(64, 0), toy_slabs(32, 1)
    cfg = CFG.model_copy(update={"epochs": 1})
    result = fit(train, val, cfg, tmp_path / "v.pt", seed=1)
    expected = roc_auc_score(val.y.numpy(), predict_log_odds(result.model, val.x))
    assert result.history[0]["val_slice_auc"] == pytest.approx(expected, abs=1e-12)


def test_a_checkpoint_without_an_average_is_not_resumed_with_one(tmp_path: Path) -> None:
    train, val = toy_slabs(64, 0), toy_slabs(32, 1)
    with pytest.raises(InterruptedError):
        fit(train, val, CFG.model_copy(update={"ema_decay": 0.0}), tmp_path / "b.pt", seed=1, stop_after=1)
    state = load_checkpoint(tmp_path / "b.pt")
    assert state is not None and "ema" not in state
    with pytest.raises(ValueError, match=r"without train\.ema_decay"):
        fit(train, val, CFG, tmp_path / "b.pt", seed=1)
