"""Two CPU processes (gloo): a torchrun run passes i_ddpcheck at every step; a diverged rank is caught."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from train_helpers import load, write_config, write_data, write_stage1_checkpoint

from ctvq.train.checkpoint import final_path, load_file
from ctvq.train.distributed import ReplicaMismatchError, check_replicas

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_gloo_processes_train_and_pass_ddpcheck(tmp_path):
    data = write_data(tmp_path / "data", cases=4)
    ckpt = tmp_path / "s1.pt"
    write_stage1_checkpoint(ckpt)
    config = write_config(tmp_path / "cfg.json", training_stage=2, pretrained_vae_path=str(ckpt), max_steps=3,
                          i_ddpcheck=1, i_save=3, batch_split=2)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ctvq", "train", "--config", str(config), "--data", str(data), "--output-dir", str(out),
           "--threads", "1", "--device", "cpu", "--no-tensorboard"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    log = (out / "log.txt").read_text()
    assert "2 process(es)" in log and "step 3/3" in log
    # 4 cases over 2 ranks with batch 2: one step per epoch, 3 steps
    assert load_file(final_path(out))["ctvq"]["step"] == 3


def _diverge_worker(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        from ctvq.models import SparseSDFVQVAE

        model = SparseSDFVQVAE(**load().model.to_dict()["args"])
        check_replicas(model, step=5)  # identical replicas pass
        if rank == 1:
            with torch.no_grad():
                model.decoder.out_layer.bias.add_(1e-3)
        try:
            check_replicas(model, step=6)
            message = "no error"
        except ReplicaMismatchError as exc:
            message = str(exc)
        Path(result_dir, f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddpcheck_catches_a_diverged_rank_on_every_rank(tmp_path):
    mp.spawn(_diverge_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "i_ddpcheck at step 6" in message
        assert "rank 1 differs from rank 0" in message and "decoder.out_layer.bias" in message
