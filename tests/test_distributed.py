"""Several processes (torchrun, DistributedDataParallel over gloo on the CPU) end with the same weights as one
process on the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import checkpoint
from conftest import ROOT, tiny_config
from fileio import read_safetensors
from model import GPT
from test_train import write_learnable_quora

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this PyTorch has no gloo backend")


def run(args, nproc=None):
    command = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                  if nproc else []) + [str(ROOT / args[0]), *args[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("script, extra", [("train_sft.py", []), ("train_dpo.py", ["--lora_r", "4"])])
def test_two_processes_match_one(script, extra, tmp_path):
    torch.manual_seed(0)
    checkpoint.save_pretrained(GPT(tiny_config()), tmp_path / "tiny")
    data = tmp_path / "data"
    data.mkdir()
    write_learnable_quora(data / "quora-train.csv", 32, seed=5)
    write_learnable_quora(data / "quora-dev.csv", 8, seed=6)
    args = [script, "--task", "paraphrase", "--init_from", str(tmp_path / "tiny"), "--data_dir", str(data),
            "--device", "cpu", "--epochs", "1", "--batch_size", "8", "--lr", "1e-3", "--dropout", "0", *extra]
    one = run(args + ["--out_dir", str(tmp_path / "one")])
    # 2 ranks x 2 micro-batches of 2
    two = run(args + ["--out_dir", str(tmp_path / "two"), "--grad_accum", "2"], nproc=2)
    assert two.count("epoch 1, step") == 1, two  # only rank 0 prints and writes
    name = "adapter.safetensors" if extra else "model.safetensors"
    a = read_safetensors(tmp_path / "one" / "last" / name)[0]
    b = read_safetensors(tmp_path / "two" / "last" / name)[0]
    start = read_safetensors(tmp_path / "tiny" / "model.safetensors")[0]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    if not extra:
        assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4  # it trained
    assert '"world_size": 2' in (tmp_path / "two" / "results.json").read_text()
    assert one.count("epoch 1, step") == 1
