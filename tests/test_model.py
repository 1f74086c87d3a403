"""model.py against Hugging Face transformers' GPT-2 (the oracle), and its own invariants."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
from conftest import ROOT, always_predict, tiny_config
from fileio import InputError
from model import GPT, GPTConfig, attention_inputs, manual_attention, top_p_filter


def random_ids(batch, length, seed=0, vocab=50257):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# model.py stands alone


def test_model_py_runs_alone_in_an_empty_folder(tmp_path):
    """Copied alone into a folder (a notebook, say), model.py imports and generates: it needs only torch."""
    shutil.copy(ROOT / "model.py", tmp_path / "model.py")
    code = ("import torch, model\n"
            "gpt = model.GPT(model.GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=8))\n"
            "assert gpt.generate(torch.tensor([[1, 2]]), 3, temperature=0).shape == (1, 5)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the project is not on the path
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# -----------------------------------------------------------------------------
# parity with transformers

def test_logits_match_transformers(hub_checkpoint):
    directory, hf_model = hub_checkpoint
    ours = checkpoint.from_pretrained(directory).eval()
    ids = random_ids(3, 50)
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ours(ids)
    assert got.shape == (3, 50, 50257)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()


def test_greedy_generation_matches_transformers(hub_checkpoint):
    directory, hf_model = hub_checkpoint
    ours = checkpoint.from_pretrained(directory).eval()
    prompt = random_ids(1, 8, seed=1)
    expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                                 do_sample=False, pad_token_id=50256, eos_token_id=None)
    got = ours.generate(prompt, max_new_tokens=20, temperature=0, eos_token_id=None)
    assert got.shape == (1, 28)
    assert got.tolist() == expected.tolist()


def test_transformers_loads_what_save_pretrained_writes(hub_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    directory, _ = hub_checkpoint
    ours = checkpoint.from_pretrained(directory).eval()
    checkpoint.save_pretrained(ours, tmp_path)
    hf_again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ours_again = checkpoint.from_pretrained(tmp_path).eval()
    ids = random_ids(2, 20)
    with torch.no_grad():
        assert torch.allclose(hf_again(ids).logits, ours(ids), atol=1e-4, rtol=0)
        assert torch.equal(ours_again(ids), ours(ids))


# -----------------------------------------------------------------------------
# padding and positions

def test_right_padding_gives_each_sequence_its_own_logits(tiny_model):
    lengths = [7, 12, 3]
    seqs = [random_ids(1, n, seed=n)[0] for n in lengths]
    ids = torch.full((3, 12), 50256)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    with torch.no_grad():
        padded = tiny_model(ids, attention_mask=mask)
        unmasked = tiny_model(ids)  # causal attention alone never looks right, so right padding is harmless
        for i, s in enumerate(seqs):
            alone = tiny_model(s[None])[0]
            assert torch.allclose(padded[i, :len(s)], alone, atol=1e-5)
            assert torch.allclose(unmasked[i, :len(s)], alone, atol=1e-5)


def test_left_padding_shifts_positions_and_matches_unpadded(tiny_model):
    seqs = [random_ids(1, n, seed=10 + n)[0] for n in (5, 9)]
    ids = torch.full((2, 9), 50256)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, 9 - len(s):], mask[i, 9 - len(s):] = s, 1
    with torch.no_grad():
        padded = tiny_model(ids, attention_mask=mask)
        assert torch.isfinite(padded).all()  # padding rows see themselves, so no NaN anywhere
        for i, s in enumerate(seqs):
            assert torch.allclose(padded[i, 9 - len(s):], tiny_model(s[None])[0], atol=1e-5)


def test_attention_inputs_positions_and_mask():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    positions, attn = attention_inputs(mask, 2, 4, 0, "cpu")
    assert positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert attn.shape == (2, 1, 4, 4)
    assert attn[0, 0].tolist() == [[True, False, False, False], [False, True, False, False],
                                   [False, False, True, False], [False, False, True, True]]
    assert attn[1, 0].tolist() == torch.ones(4, 4).tril().bool().tolist()
    assert attention_inputs(None, 2, 4, 0, "cpu")[1] is None  # no padding, no cache: plain causal kernel
    positions, attn = attention_inputs(torch.tensor([[0, 1, 1, 1, 1]]), 1, 2, 3, "cpu")  # 2 new after 3 cached
    assert positions.tolist() == [[2, 3]]
    assert attn[0, 0].tolist() == [[False, True, True, True, False], [False, True, True, True, True]]
    with pytest.raises(ValueError, match="attention_mask has shape"):
        attention_inputs(torch.ones(2, 3), 2, 4, 0, "cpu")


def test_sequence_longer_than_block_size_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="longer than block_size=128"):
        tiny_model(random_ids(1, 129))


@pytest.mark.parametrize("bad_id", [50257, 99999, -1])
@pytest.mark.parametrize("entry", ["collate", "left_pad"])
def test_token_id_outside_the_vocabulary_is_a_clear_error(bad_id, entry):
    """Checked on the CPU where batches are built: collate (training, scoring) and left_pad (generation)."""
    from data.batching import Example, collate, left_pad
    ids = [5, 50256, bad_id, 7]
    call = {"collate": lambda: collate([Example([1, 2], [3]), Example(ids[:2], ids[2:])]),
            "left_pad": lambda: left_pad([[1, 2], ids])}[entry]
    with pytest.raises(ValueError, match=rf"token id {bad_id} is outside the vocabulary: ids must be in "
                                         rf"\[0, vocab_size=50257\)"):
        call()


@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=65, n_head=4), r"n_embd=65 is not divisible by n_head=4"),
    (dict(n_layer=0), r"n_layer must be a positive whole number, got 0"),
    (dict(n_head=-2), r"n_head must be a positive whole number, got -2"),
    (dict(block_size=0), r"block_size must be a positive whole number, got 0"),
    (dict(vocab_size=2.5), r"vocab_size must be a positive whole number, got 2.5"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(layer_norm_epsilon=0.0), r"layer_norm_epsilon must be positive, got 0.0"),
    (dict(attention="flash"), r"attention must be 'sdpa' or 'manual', got 'flash'"),
])
def test_config_values_that_make_no_gpt_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=64), **overrides})


# -----------------------------------------------------------------------------
# the written-out attention: the reference beside the fused kernel

def test_manual_attention_by_hand():
    """With all-zero queries every visible key scores the same, so each query averages the values it sees."""
    v = torch.arange(12.0).view(1, 1, 4, 3)  # 4 tokens, head size 3
    q, k = torch.zeros(1, 1, 4, 3), torch.randn(1, 1, 4, 3)
    expected = torch.stack([v[0, 0, :t + 1].mean(0) for t in range(4)])  # causal: token t sees 0..t
    assert torch.allclose(manual_attention(q, k, v)[0, 0], expected)
    mask = torch.tensor([[False, True, True, True]]).expand(4, 4).tril().clone()  # token 0 is padding ...
    mask[0, 0] = True  # ... which sees itself, as attention_inputs arranges
    expected = torch.stack([v[0, 0, 0]] + [v[0, 0, 1:t + 1].mean(0) for t in range(1, 4)])
    assert torch.allclose(manual_attention(q, k, v, mask[None, None])[0, 0], expected)


def run_both(model, fn):
    """fn() with the fused kernel, then with the written-out attention."""
    results = []
    for attention in ("sdpa", "manual"):
        model.config.attention = attention  # every layer reads the one shared config
        results.append(fn())
    model.config.attention = "sdpa"
    return results


def test_manual_attention_matches_sdpa_under_padding(tiny_model):
    ids, mask = random_ids(3, 12, seed=4), torch.ones(3, 12, dtype=torch.long)
    mask[0, 7:] = 0  # right padding
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        for attention_mask in (None, mask):
            fused, manual = run_both(tiny_model, lambda: tiny_model(ids, attention_mask=attention_mask))
            assert torch.allclose(fused, manual, atol=1e-5, rtol=0), (fused - manual).abs().max()

    def gradient():  # the backward pass agrees too: the manual path can be stepped through in training
        tiny_model.zero_grad()
        logits = tiny_model(ids, attention_mask=mask)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50257), ids[:, 1:].reshape(-1)).backward()
        return tiny_model.transformer.h[0].attn.c_attn.weight.grad.clone()
    fused, manual = run_both(tiny_model, gradient)
    assert fused.abs().sum() > 0 and torch.allclose(fused, manual, atol=1e-6, rtol=1e-4)


def test_manual_attention_matches_sdpa_with_the_kv_cache(tiny_model):
    from data.batching import left_pad
    ids, mask = left_pad([random_ids(1, n, seed=30 + n)[0].tolist() for n in (3, 9, 6)])
    fused, manual = run_both(tiny_model, lambda: tiny_model.generate(ids, 12, temperature=0, attention_mask=mask,
                                                                     eos_token_id=None))
    assert fused.shape == (3, 21) and fused.tolist() == manual.tolist()


# -----------------------------------------------------------------------------
# generation

def test_kv_cache_generates_the_same_tokens(tiny_model):
    prompt = random_ids(1, 6, seed=3)
    for temperature, top_p in ((0, 1.0), (1.0, 0.9)):
        runs = [tiny_model.generate(prompt, 30, temperature=temperature, top_p=top_p, eos_token_id=None,
                                    use_cache=use_cache, generator=torch.Generator().manual_seed(7))
                for use_cache in (True, False)]
        assert runs[0].shape == (1, 36)
        assert runs[0].tolist() == runs[1].tolist()


def test_batched_left_padded_generation_matches_one_at_a_time(tiny_model):
    from data.batching import left_pad
    prompts = [random_ids(1, n, seed=20 + n)[0].tolist() for n in (4, 10, 7)]
    ids, mask = left_pad(prompts)
    batched = tiny_model.generate(ids, 15, temperature=0, attention_mask=mask, eos_token_id=None)
    for i, p in enumerate(prompts):
        alone = tiny_model.generate(torch.tensor([p]), 15, temperature=0, eos_token_id=None)
        assert batched[i, ids.size(1) - len(p):].tolist() == alone[0].tolist()


def test_generation_stops_at_end_of_text(tiny_model):
    always_predict(tiny_model, 42)  # call token 42 the end-of-text token
    out = tiny_model.generate(random_ids(2, 5), 20, temperature=0, eos_token_id=42)
    assert out.shape == (2, 6) and (out[:, -1] == 42).all()


def test_generate_rejects_right_padding_and_overlong_requests(tiny_model):
    with pytest.raises(ValueError, match="left-padded"):
        tiny_model.generate(random_ids(1, 4), 3, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny_model.generate(random_ids(1, 100), 29)
    for bad in (-1.0, -1e-9, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=re.escape(f"temperature must be a finite number >= 0 (0 picks the most "
                                                       f"likely token), got {bad!r}")):
            tiny_model.generate(random_ids(1, 4), 3, temperature=bad)
    for bad in (0.0, -0.5, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=re.escape(f"top_p must be in (0, 1], got {bad!r}")):
            tiny_model.generate(random_ids(1, 4), 3, top_p=bad)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"max_new_tokens must be a positive whole number, got {bad}"):
            tiny_model.generate(random_ids(1, 4), bad)


def test_top_p_keeps_the_smallest_nucleus():
    """By hand, with every top_p well away from a boundary of the cumulative mass (0.5, 0.8, 0.95, 1)."""
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))  # noqa: E731
    assert kept(0.45)[0].tolist() == [False, True, False, False]  # 0.5 >= 0.45
    assert kept(0.6)[0].tolist() == [False, True, True, False]  # 0.5 < 0.6 <= 0.5 + 0.3
    assert kept(0.9)[0].tolist() == [False, True, True, True]  # 0.8 < 0.9 <= 0.95
    assert kept(0.97)[0].tolist() == [True, True, True, True]
    assert kept(0.01)[0].tolist() == [False, True, False, False]  # the top token is always kept
    assert kept(0.0)[0].tolist() == [False, True, False, False]
    # four equally likely tokens: which ones is arbitrary, how many is not
    assert [kept(p)[1].sum().item() for p in (0.1, 0.3, 0.6, 0.9)] == [1, 2, 3, 4]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_matches_transformers():
    """Against transformers' TopPLogitsWarper, an independent implementation (it sorts ascending and removes
    tokens whose cumulative mass is at most 1 - top_p), on random logits with no boundary near top_p."""
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    for top_p in (0.05, 0.3, 0.5, 0.9, 0.99):
        sorted_probs = logits.softmax(-1).sort(descending=True).values
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        assert (mass_before - top_p).abs().min() > 1e-9  # no near-tie that float64 rounding could decide
        expected = transformers.TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(torch.isfinite(top_p_filter(logits, top_p)), torch.isfinite(expected)), top_p
        assert torch.equal(top_p_filter(logits, top_p)[torch.isfinite(expected)], logits[torch.isfinite(expected)])


def test_sampling_is_seeded_and_follows_the_nucleus(tiny_model):
    prompt = random_ids(4, 5)
    a = tiny_model.generate(prompt, 10, temperature=1.2, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = tiny_model.generate(prompt, 10, temperature=1.2, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert a.tolist() == b.tolist()
    # with a tiny nucleus, sampling is greedy decoding
    tight = tiny_model.generate(prompt, 10, temperature=1.0, top_p=1e-6, eos_token_id=None)
    assert tight.tolist() == tiny_model.generate(prompt, 10, temperature=0, eos_token_id=None).tolist()


def test_num_parameters_counts_the_tied_embedding_once(tiny_model):
    c = tiny_config()
    per_block = 12 * c.n_embd ** 2 + 13 * c.n_embd  # attention + MLP weights and biases, two LayerNorms
    expected = c.vocab_size * c.n_embd + c.block_size * c.n_embd + c.n_layer * per_block + 2 * c.n_embd
    assert tiny_model.num_parameters() == expected
    tiny_model.transformer.wpe.weight.requires_grad_(False)
    assert tiny_model.num_parameters(trainable_only=True) == expected - c.block_size * c.n_embd


# -----------------------------------------------------------------------------
# from_pretrained's errors: each one says what failed and where

def copy_checkpoint(hub_checkpoint, tmp_path):
    directory, _ = hub_checkpoint
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    return tmp_path


def test_missing_directory_or_unknown_name(tmp_path):
    with pytest.raises(InputError, match="neither a GPT-2 name"):
        checkpoint.from_pretrained(tmp_path / "nope")
    with pytest.raises(InputError, match="config.json: no such file"):
        checkpoint.from_pretrained(tmp_path)


def test_missing_weights_file(hub_checkpoint, tmp_path):
    copy_checkpoint(hub_checkpoint, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(InputError, match="model.safetensors: no such file.*never opens"):
        checkpoint.from_pretrained(tmp_path)


@pytest.mark.parametrize("cut", ["to 0 bytes", "to 5 bytes", "inside the header", "by its last 1000 bytes"])
def test_truncated_weights(hub_checkpoint, tmp_path, cut):
    path = copy_checkpoint(hub_checkpoint, tmp_path) / "model.safetensors"
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")  # the format: 8 bytes of header length, the header, the data
    data_len = len(data) - 8 - header_len
    kept, message = {
        "to 0 bytes": (data[:0], "the file is only 0 bytes long: truncated"),
        "to 5 bytes": (data[:5], "the file is only 5 bytes long: truncated"),
        "inside the header": (data[:100], f"its header claims {header_len} bytes but the file has 100"),
        "by its last 1000 bytes": (data[:-1000], f"the tensors need {data_len} bytes of data but the file holds "
                                                 f"{data_len - 1000}"),
    }[cut]
    path.write_bytes(kept)
    with pytest.raises(InputError, match=re.escape(f"model.safetensors: not a valid safetensors file: {message}")):
        checkpoint.from_pretrained(tmp_path)


def test_corrupted_header(hub_checkpoint, tmp_path):
    path = copy_checkpoint(hub_checkpoint, tmp_path) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{]"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="header is not JSON"):
        checkpoint.from_pretrained(tmp_path)


def test_shape_mismatch(hub_checkpoint, tmp_path):
    copy_checkpoint(hub_checkpoint, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embd"] = 32  # the file's tensors are 64 wide
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"tensor transformer\.\S+ has shape .* expects"):
        checkpoint.from_pretrained(tmp_path)


def test_missing_layers(hub_checkpoint, tmp_path):
    copy_checkpoint(hub_checkpoint, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"n_layer=3: missing \['transformer.h.2"):
        checkpoint.from_pretrained(tmp_path)


def test_bad_config(hub_checkpoint, tmp_path):
    copy_checkpoint(hub_checkpoint, tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    with pytest.raises(InputError, match="missing the GPT-2 setting"):
        checkpoint.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        checkpoint.from_pretrained(tmp_path)
    config = json.loads((hub_checkpoint[0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_head": 5}))
    with pytest.raises(InputError, match=r"config.json: GPTConfig n_embd=64 is not divisible by n_head=5"):
        checkpoint.from_pretrained(tmp_path)


def test_offline_download_says_how_to_supply_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(checkpoint, "HUB_URL", "http://127.0.0.1:9/{name}/model.safetensors")  # refused
    with pytest.raises(InputError, match="could not download .*pass that directory instead"):
        checkpoint.from_pretrained("gpt2")
    with pytest.raises(InputError, match="could not download http://127.0.0.1:9/gpt2-medium/"):
        checkpoint.from_pretrained("openai-community/gpt2-medium")  # the hub's full name works too
    assert not (tmp_path / "gpt2" / "model.safetensors").exists()


def test_loads_the_openai_hub_layout(hub_checkpoint, tmp_path):
    """openai-community/gpt2's file names tensors without "transformer." and carries causal-mask buffers."""
    from fileio import read_safetensors, write_safetensors
    directory, hf_model = hub_checkpoint
    copy_checkpoint(hub_checkpoint, tmp_path)
    tensors, _ = read_safetensors(directory / "model.safetensors")
    hub_style = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    for i in range(2):
        hub_style[f"h.{i}.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
    write_safetensors(tmp_path / "model.safetensors", hub_style)
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert torch.allclose(checkpoint.from_pretrained(tmp_path)(ids), hf_model(ids).logits, atol=1e-4, rtol=0)


def test_gpt2_124m_shape_matches_transformers(tmp_path):
    """Once at the real size (12 layers, 12 heads, 768 wide, 1024 positions), random weights: what the tiny
    configs cannot catch (head splitting at 12 heads, the full position table, a 500 MB file)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    hf_model.save_pretrained(tmp_path)
    ours = checkpoint.from_pretrained(tmp_path).eval()
    assert ours.num_parameters() == 124_439_808  # GPT-2 "124M"
    ids = random_ids(2, 40, seed=5)
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf_model(ids).logits, atol=1e-4, rtol=0)
    expected = hf_model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=8,
                                 do_sample=False, pad_token_id=50256, eos_token_id=None)
    assert ours.generate(ids[:1], 8, temperature=0, eos_token_id=None).tolist() == expected.tolist()


# -----------------------------------------------------------------------------
# save_pretrained into a place that cannot be a folder


def test_save_pretrained_into_or_under_a_file_is_a_clear_error(tiny_model, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(InputError) as error:
        checkpoint.save_pretrained(tiny_model, a_file)
    assert str(error.value) == (f"{a_file}: is a file, not a folder; save_pretrained writes config.json and "
                                f"model.safetensors into a folder")
    with pytest.raises(InputError) as error:
        checkpoint.save_pretrained(tiny_model, a_file / "run" / "best")
    assert str(error.value) == (f"{a_file / 'run' / 'best'}: lies under {a_file}, which is a file, not a folder; "
                                f"save_pretrained writes config.json and model.safetensors into a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"] and a_file.read_text() == "x"  # nothing left behind
    checkpoint.save_pretrained(tiny_model, tmp_path / "new" / "deeper")  # a folder that is not there yet is made
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == ["config.json", "model.safetensors"]


# -----------------------------------------------------------------------------
# model_context: the positions of what load_model would load, from JSON alone


def adapter_folder(directory, base, block_size):
    """A LoRA run's folder as train_sft writes it: adapter.safetensors and adapter_config.json naming its base."""
    from lora import apply_lora, save_lora
    torch.manual_seed(0)
    model = apply_lora(GPT(tiny_config(block_size=block_size)), r=2, alpha=4)
    directory.mkdir(parents=True)
    save_lora(model, directory / checkpoint.ADAPTER_FILE)
    (directory / checkpoint.ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": str(base)}))
    return directory


def test_model_context_is_the_block_size_load_model_gives(tmp_path):
    torch.manual_seed(0)
    checkpoint.save_pretrained(GPT(tiny_config(block_size=96)), tmp_path / "hub")
    adapter = adapter_folder(tmp_path / "lora-run", tmp_path / "hub", 96)
    on_adapter = adapter_folder(tmp_path / "lora-on-lora", adapter, 96)
    checkpoint.save_pretrained(GPT(tiny_config(block_size=48)), tmp_path / "fft-run" / "best")
    adapter_folder(tmp_path / "run-of-adapter" / "best", on_adapter, 96)
    expected = {"hub": 96, "lora-run": 96, "lora-on-lora": 96, "fft-run": 48, "run-of-adapter": 96}
    for name, block_size in expected.items():
        assert checkpoint.model_context(tmp_path / name) == block_size, name
        assert checkpoint.load_model(tmp_path / name).config.block_size == block_size, name


def test_model_context_of_the_gpt2_names_reads_no_weights(monkeypatch, tmp_path):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path))  # nothing downloaded, nothing read
    monkeypatch.setattr(checkpoint, "read_safetensors", None)
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-community/gpt2"):
        assert checkpoint.model_context(name) == transformers.GPT2Config().n_positions == 1024
    # a hub directory: config.json's n_positions, or n_ctx in older configs; the weights are never opened
    config = {"model_type": "gpt2", "vocab_size": 50257, "n_layer": 2, "n_head": 4, "n_embd": 64}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps({**config, "n_ctx": 64}))
    assert checkpoint.model_context(tmp_path / "old") == 64
    (tmp_path / "run" / "last").mkdir(parents=True)  # a run folder with no best/ yet: its last checkpoint
    (tmp_path / "run" / "last" / "config.json").write_text(json.dumps({**config, "n_positions": 32}))
    assert checkpoint.model_context(tmp_path / "run") == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "run"]  # nothing was downloaded


def test_model_context_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(InputError, match=r"'nope': neither a GPT-2 name \(gpt2, gpt2-medium"):
        checkpoint.model_context("nope")
    with pytest.raises(InputError, match=r"config.json: no such file"):
        checkpoint.model_context(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"config.json:1: not valid JSON"):
        checkpoint.model_context(tmp_path)
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / checkpoint.ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": str(loop)}))
    with pytest.raises(InputError, match=r"adapter_config.json: its base_model_name_or_path leads back to .*loop"):
        checkpoint.model_context(loop)
    (loop / checkpoint.ADAPTER_CONFIG).write_text(json.dumps({"base": "gpt2"}))
    with pytest.raises(InputError, match=r"adapter_config.json: not an adapter config with a base_model_name_or_path"):
        checkpoint.model_context(loop)
