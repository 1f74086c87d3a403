"""Shared test set-up: the project root on sys.path, offline tokenizer files, the shared data, tiny models."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# tiktoken downloads GPT-2's BPE on first use; the shared folder holds its cache, so tests run offline.
if (SHARED_DATA / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))

from model import GPT, GPTConfig  # noqa: E402


@pytest.fixture
def shared_data():
    """../shared/data when present (it is in CI); tests that read real course files skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture
def tokenizer(shared_data):
    from data.tokenizer import get_tokenizer
    return get_tokenizer()


def tiny_config(**overrides):
    """2 layers, 64 wide, GPT-2's full vocabulary: fast on a CPU, real in every other respect."""
    return GPTConfig(**{**dict(block_size=128, vocab_size=50257, n_layer=2, n_head=4, n_embd=64), **overrides})


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


@pytest.fixture(scope="session")
def hub_checkpoint(tmp_path_factory):
    """A randomly initialised GPT-2 saved by Hugging Face transformers in the hub's layout
    (config.json + model.safetensors): the reference for weight loading. Returns (directory, hf_model)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1234)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    directory = tmp_path_factory.mktemp("hub_gpt2")
    hf_model.save_pretrained(directory, safe_serialization=True)
    return directory, hf_model
