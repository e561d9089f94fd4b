"""DDP equivalence: two gloo processes under torchrun train the same segmenter as one process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    import numpy as np, torch
    import torch.distributed as dist
    from dicomops.config import SegmentConfig
    from dicomops.segmentation.data import read_volume
    from dicomops.segmentation.loop import fit
    from dicomops.segmentation.metrics import NoduleRef

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rng = np.random.default_rng(0)
    volumes = []
    for i in range(3):
        image = rng.uniform(0.3, 0.4, (24, 24, 16)).astype(np.float16)
        mask = np.zeros(image.shape, np.uint8)
        c = 6 + 4 * i
        mask[c - 2:c + 2, c - 2:c + 2, 6:10] = 1
        image[mask > 0] = 0.9
        path = out / f"v{i}-{os.environ.get('RANK', '0')}.npz"  # each process its own file
        np.savez(path, image=image, mask=mask)
        volumes.append(read_volume(path, f"s{i}", "v", [NoduleRef(1, 4.0)], (16, 16, 16)))
    cfg = SegmentConfig(channels=(4, 8), strides=(2,), patch=(16, 16, 16), roi=(16, 16, 16), batch_size=4,
                        patches_per_epoch=16, epochs=2, precision="fp32", learning_rate=1e-2)
    result = fit(volumes, cfg, out / "checkpoint.pt", seed=3)
    # Trained channels-last, returned in the default layout that inference and export expect.
    assert all(p.is_contiguous() for p in result.model.parameters())
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(result.model.state_dict(), out / "model.pt")
        torch.save(result.history, out / "history.pt")
    if dist.is_initialized():
        dist.destroy_process_group()
''')


def _train(tmp: Path, processes: int) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    tmp.mkdir()
    script = tmp / "train.py"
    script.write_text(SCRIPT)
    if processes == 1:
        command = [sys.executable, str(script), str(tmp)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script), str(tmp)]
    # Its own process group: on a timeout torchrun's workers go with it, not left waiting on a peer.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    return torch.load(tmp / "model.pt"), torch.load(tmp / "history.pt")


@pytest.mark.timeout(600)
def test_two_gloo_processes_train_what_one_process_trains(tmp_path: Path) -> None:
    one, history_one = _train(tmp_path / "one", 1)
    two, history_two = _train(tmp_path / "two", 2)
    assert one.keys() == two.keys()
    # Same patches, same global batches, gradient averaging = the mean over the whole batch: the
    # weights agree up to the order floating-point sums run in. Measured: 6e-8. Not the biases of
    # convolutions followed by instance normalisation: the norm removes them, so their gradient is
    # zero plus rounding noise, which Adam scales to full-size steps of either sign; they change
    # no output, which is compared instead.
    weights = [k for k in one if one[k].dim() > 1]
    assert len(weights) >= 6
    assert max(float((one[k] - two[k]).abs().max()) for k in weights) < 1e-5
    assert _outputs(one) == pytest.approx(_outputs(two), abs=1e-5)
    assert [h["train_loss"] for h in history_one] == pytest.approx([h["train_loss"] for h in history_two], abs=1e-6)
    # And training moved the weights: equal because both learned the same, not because neither did.
    fresh = _fresh_model().state_dict()
    assert max(float((one[k] - fresh[k]).abs().max()) for k in weights) > 1e-3


def _outputs(state: dict[str, torch.Tensor]) -> list[float]:
    model = _fresh_model()
    model.load_state_dict(state)
    model.eval()
    x = torch.rand((2, 1, 16, 16, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return [float(v) for v in model(x).flatten()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fresh_model() -> torch.nn.Module:
    from dicomops.config import SegmentConfig
    from dicomops.segmentation.model import build_segmenter
    from dicomops.training.loop import seed_everything

    seed_everything(3)
    return build_segmenter(SegmentConfig(channels=(4, 8), strides=(2,), patch=(16, 16, 16), roi=(16, 16, 16)))
