"""Distributed data parallel under torchrun: two gloo processes on the CPU.

The ranks train on disjoint shards of every epoch (each epoch gathers the sample
indices every rank trained on into metrics.csv), only rank 0 writes and logs, the
validation predictions come back in dataset order, and a SIGTERM to torchrun mid-epoch
resumes to the same weights as an unbroken run.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.config import FinetuneConfig
from finetune.distributed import Dist, from_environment, interleave, setup, shard_overlap
from tests.conftest import make_image_folder
from tests.test_interrupt import SLOW_DRIVER, heartbeat_reached, subprocess_env, wait_for
from zoo.errors import UserInputError

TRAIN = 45  # odd: the distributed sampler drops one image so that both ranks get 22


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def run_args(data: Path, out: Path) -> list[str]:
    return ["finetune", "test_resnet", "--data", str(data), "--out", str(out), "--no-pretrained", "--epochs", "3",
            "--batch-size", "4", "--input-size", "32", "--workers", "0", "--auto-augment", "none", "--patience", "0",
            "--device", "cpu", "--scale-lr", "--unfreeze-at", "1", "--drop-path", "0.1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "data", per_class=(15, 4, 0))


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = subprocess.run(torchrun("-m", "zoo", *run_args(data, out)), capture_output=True, text=True, timeout=180,
                          env=subprocess_env())
    return out, proc


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_processes_train_disjoint_shards_and_write_a_valid_run(data, unbroken):
    from finetune.inference import predict_run
    from zoo.predictions import read_predictions

    run, proc = unbroken
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["distributed"] == {"world_size": 2, "backend": "gloo", "sync_bn": False}
    assert config["effective_batch_size"] == 8 and config["lr"] == pytest.approx(2e-3) and config["options"]["lr"] == 1e-3
    # Only rank 0 logs: each message once. The start message says the world, the batch and the rate used.
    assert proc.stderr.count("2 processes (gloo), this is rank 0: effective batch size 8 (4 per step x 2 processes); "
                             "head lr 0.002 (--lr 0.001 x 2 processes, --scale-lr)") == 1
    assert proc.stderr.count("epoch 2: unfreezing") == 1 and proc.stderr.count("epoch 3/3:") == 1  # DDP wrapped again
    rows = metrics(run)
    assert len(rows) == 3
    for row in rows:
        assert int(row["train_images"]) == (TRAIN // 2) * 2 and int(row["shard_overlap"]) == 0
    # The best weights load with plain timm and give the validation predictions the run wrote,
    # which the ranks computed on interleaved shards and gathered back into dataset order.
    written = read_predictions(run / "predictions" / "val.safetensors")
    assert written.ids == json.loads((run / "splits.json").read_text())["val"] and len(written.ids) == 12
    again = predict_run(run, data, split="val")
    assert again.ids == written.ids
    np.testing.assert_allclose(again.logits, written.logits, rtol=1e-4, atol=1e-5)
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and state["epoch"] == 3


def test_sigterm_to_torchrun_mid_epoch_resumes_to_the_unbroken_weights(tmp_path, data, unbroken):
    reference, first = unbroken
    assert first.returncode == 0, first.stderr[-3000:]
    driver = tmp_path / "slow_zoo.py"
    driver.write_text(SLOW_DRIVER)
    run, beat = tmp_path / "run", tmp_path / "heartbeat"
    proc = subprocess.Popen(torchrun(str(driver), *run_args(data, run)), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=subprocess_env(ZOO_TEST_HEARTBEAT=str(beat), ZOO_TEST_DELAY="0.1"))
    wait_for(heartbeat_reached(beat, epoch=2, batch=2), proc, timeout=120)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("SIGTERM: stopped ") == 1 and f"zoo finetune --resume --out {run}" in err, err[-3000:]
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["world_size"] == 2
    if state["partial"] is not None:  # stopped mid-epoch: each rank's place in its shard was saved
        assert len(state["partials"]) == 2 and state["partials"][0]["batches"] == state["partials"][1]["batches"]
        assert not torch.equal(state["partials"][0]["rng"]["torch"], state["partials"][1]["rng"]["torch"])

    resumed = subprocess.run(torchrun("-m", "zoo", "finetune", "--resume", "--out", str(run)), capture_output=True, text=True,
                             timeout=180, env=subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in rows]
    assert strip(metrics(run)) == strip(metrics(reference))


def test_without_torchrun_it_is_one_process_whose_collectives_return_their_input(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert from_environment() is None
    dist = setup("cpu")
    assert not dist.enabled and dist.is_main and dist.world_size == 1 and dist.device == torch.device("cpu")
    assert dist.sum([1, 2.5]) == [1.0, 2.5] and dist.max([0, 3]) == [0, 3] and dist.gather({"a": 1}) == [{"a": 1}]
    model = torch.nn.Linear(2, 2)
    assert dist.wrap(model) is model
    dist.barrier()
    dist.cleanup()


def test_torchrun_environment_is_read_and_checked(monkeypatch):
    for name, value in {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert from_environment() == (1, 1, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UserInputError, match=r"RANK=4 must be in \[0, WORLD_SIZE=4\)"):
        from_environment()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(UserInputError, match="must hold integers"):
        from_environment()


def test_shard_overlap_and_interleave():
    assert shard_overlap([[0, 2, 4], [1, 3, 5]]) == 0
    assert shard_overlap([[0, 1, 2], [2, 3, 1], [7]]) == 2
    assert shard_overlap([[0, 0, 1]]) == 0  # a rank drawing an index twice is not an overlap between ranks
    items = np.arange(7 * 2).reshape(7, 2)
    shards = [items[r::3] for r in range(3)]  # uneven: 3, 2, 2 rows
    np.testing.assert_array_equal(interleave(shards), items)
    np.testing.assert_array_equal(interleave([np.arange(5)]), np.arange(5))


@pytest.mark.parametrize("options,world,device,message", [
    ({"balance": "sampler"}, 2, "cpu", r"--balance sampler does not work with torchrun \(2 processes\).*use --balance loss"),
    ({"sync_bn": True}, 2, "cpu", "--sync-bn needs CUDA"),
])
def test_options_that_cannot_work_distributed_are_refused_in_one_line(options, world, device, message):
    from finetune.train import check_distributed_options

    cfg = FinetuneConfig(backbone="test_resnet", data="d", out="o", **options)
    with pytest.raises(UserInputError, match=message):
        check_distributed_options(cfg, Dist(world_size=world, enabled=True, backend="gloo", device=torch.device(device)))
    check_distributed_options(cfg, Dist())  # one process: fine


def test_distributed_sampler_shards_are_disjoint_and_even(tmp_path):
    from finetune.loaders import train_loader
    from zoo.data import Sample

    samples = [Sample(tmp_path / f"{i}.png", str(i), i % 2) for i in range(11)]
    shards = []
    for rank in range(3):
        loader = train_loader(samples, None, batch_size=2, workers=0, generator=torch.Generator().manual_seed(rank),
                              num_classes=2, balanced=False, drop_last=False, pin_memory=False, shard=(rank, 3), seed=5,
                              epoch=1)
        shards.append(list(loader.sampler))
    assert [len(s) for s in shards] == [3, 3, 3] and shard_overlap(shards) == 0
    again = train_loader(samples, None, batch_size=2, workers=0, generator=torch.Generator(), num_classes=2, balanced=False,
                         drop_last=False, pin_memory=False, shard=(0, 3), seed=5, epoch=2)
    assert list(again.sampler) != shards[0]  # another epoch, another order

