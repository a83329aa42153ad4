"""``ctvq train`` end to end: bad inputs fail before any work, naming the key; the run folder; loss drops."""

from __future__ import annotations

import csv
import json

import pytest
from train_helpers import config_dict, write_config, write_data, write_stage1_checkpoint
from train_helpers import train_main as main

from ctvq.train.progress import METRICS_NAME


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), cases=4)


def _args(config, data, out, *extra):
    return ["--config", str(config), "--data", str(data), "--output-dir", str(out), "--no-tensorboard",
            *extra]


@pytest.mark.parametrize("change, key", [
    ({"trainer.args.bogus_knob": 1}, "trainer.args.bogus_knob"),
    ({"trainer.args.training_stage": 2}, "trainer.args.pretrained_vae_path"),
    ({"trainer.args.batch_size_per_gpu": 3, "trainer.args.batch_split": 2}, "trainer.args.batch_split"),
    ({"trainer.args.fp16_mode": "fp8"}, "trainer.args.fp16_mode"),
    ({"trainer.args.optimizer": {"name": "Adagrad", "args": {}}}, "trainer.args.optimizer.name"),
])
def test_bad_config_fails_before_any_work_naming_the_key(tmp_path, data, capsys, change, key):
    cfg = config_dict()
    for dotted, value in change.items():
        section, _, leaf = dotted.rpartition(".")
        node = cfg
        for part in section.split("."):
            node = node[part]
        node[leaf] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert main(_args(path, data, out)) == 2
    assert key in capsys.readouterr().err
    assert not out.exists()


def test_missing_stage1_checkpoint_fails_naming_the_key(tmp_path, data, capsys):
    missing = str(tmp_path / "nope.pt")
    config = write_config(tmp_path / "c.json", training_stage=2, pretrained_vae_path=missing)
    assert main(_args(config, data, tmp_path / "run")) == 2
    assert "trainer.args.pretrained_vae_path" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resolution_flag_trains_a_config_at_the_samples_resolution(tmp_path, data, capsys):
    """The workflow trains one config at each window's resolution: --resolution sets the dataset's cube side
    and the model's latent grid (1/8 of it) together, recorded in the run's config.json."""
    cfg = config_dict(max_steps=1, i_print=1, i_log=1, i_sample=10, i_save=10, disable_snapshot=True)
    cfg["dataset"]["args"]["resolution"], cfg["models"]["vqvae"]["args"]["resolution"] = 128, 16
    config = tmp_path / "at128.json"
    config.write_text(json.dumps(cfg))
    assert main(_args(config, data, tmp_path / "refused")) == 2  # 64³ samples, a 128³ config
    assert "resolution" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(_args(config, data, out, "--resolution", "64", "--threads", "1")) == 0
    ran = json.loads((out / "config.json").read_text())
    assert ran["dataset"]["args"]["resolution"] == 64 and ran["models"]["vqvae"]["args"]["resolution"] == 8
    assert main(_args(config, data, tmp_path / "bad", "--resolution", "100")) == 2
    assert "dataset.args.resolution: 100 is not a multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_stage2_run_writes_its_folder_and_reduces_the_loss(tmp_path, data, capsys):
    ckpt = tmp_path / "s1.pt"
    write_stage1_checkpoint(ckpt)
    config = write_config(tmp_path / "c.json", training_stage=2, pretrained_vae_path=str(ckpt), max_steps=12,
                          batch_size_per_gpu=2, batch_split=1, i_print=3, i_log=2, i_sample=6, i_save=6,
                          ema_rate=[0.9],
                          optimizer={"name": "AdamW", "args": {"lr": 1e-2}},
                          lr_scheduler={"name": "ExponentialLR", "args": {"gamma": 0.99}})
    out = tmp_path / "run"
    assert main(_args(config, data, out, "--threads", "2")) == 0
    console = capsys.readouterr().out
    assert "step 12/12" in console and "steps/s" in console and "ETA" in console and "done:" in console
    for name in ("config.json", "command.txt", "log.txt", METRICS_NAME, "samples/step0000006.png",
                 "ckpts/final.pt", "ckpts/vqvae_step0000006.pt", "ckpts/vqvae_ema0.9_step0000012.pt",
                 "ckpts/misc_step0000012.pt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["trainer"]["args"]["max_steps"] == 12
    rows = list(csv.DictReader((out / METRICS_NAME).open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert last < 0.85 * first, (first, last)  # each row averages 2 steps = all 4 cases
    # the same folder again: already finished, nothing to train; another config is refused
    assert main(_args(config, data, out)) == 0
    other = write_config(tmp_path / "o.json", training_stage=2, pretrained_vae_path=str(ckpt), max_steps=12,
                         batch_size_per_gpu=1, lambda_vq=0.5)
    assert main(_args(other, data, out)) == 2
    assert "trainer.args.lambda_vq" in capsys.readouterr().err
    assert main(_args(config, data, out, "--resume", "never")) == 2
