"""Train the segmenter on more than one process: ``torchrun`` starts this module once per process.

    torchrun --nproc-per-node 2 -m dicomops.segmentation.ddp --work work --fold 0
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m dicomops.segmentation.ddp --work /shared/work --final

Each process joins the group torchrun describes in its environment (gloo on CPU, NCCL on GPU),
trains on its share of every global batch (:func:`dicomops.segmentation.loop.fit`) and rank 0
writes the checkpoint and the weights. The work directory must be the same path on every node
(a shared volume on the Kubernetes work pool; see the README).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from dicomops.config import PipelineConfig
from dicomops.layout import WorkLayout
from dicomops.segmentation.data import load_volumes
from dicomops.segmentation.loop import fit


def init_process_group() -> None:
    """Join torchrun's group: NCCL where each process has a GPU, gloo otherwise."""
    if "RANK" not in os.environ:
        raise SystemExit("run this module under torchrun (it reads RANK, WORLD_SIZE and MASTER_ADDR from it)")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dicomops.segmentation.ddp", description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="Work directory of an earlier preprocess.")
    parser.add_argument("--config", type=Path, help="PipelineConfig YAML (its segment section applies).")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--fold", type=int, help="Train this cross-validation fold's model.")
    which.add_argument("--final", action="store_true", help="Train the final model on every labelled series.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = (PipelineConfig.from_yaml(args.config) if args.config else PipelineConfig()).segment
    layout = WorkLayout(args.work)
    init_process_group()
    try:
        if args.final:
            ids, out, seed = list(layout.labelled_series().SeriesInstanceUID), layout.segment.final, cfg.seed + 1000
        else:
            ids, out, seed = layout.read_folds().train(args.fold), layout.segment.fold(args.fold), cfg.seed + args.fold
        result = fit(load_volumes(layout, ids, cfg.patch, cfg.border_share), cfg, out / "checkpoint.pt", seed=seed)
        if dist.get_rank() == 0:
            torch.save(result.model.state_dict(), out / "model.pt")
            print(f"rank 0 of {dist.get_world_size()}: {result.epochs_run} epochs, weights in {out / 'model.pt'}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
