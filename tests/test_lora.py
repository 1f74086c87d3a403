"""lora.py: the LoRA layer, apply_lora, merging, and adapter checkpoints."""

import pytest
import torch
import torch.nn as nn

from conftest import tiny_config
from fileio import InputError, read_safetensors, write_safetensors
from lora import (LoRALinear, apply_lora, load_lora, lora_layers, lora_state_dict, merge_lora, merged_state_dict,
                  save_lora)
from model import GPT


def make_model(seed=0, **lora):
    torch.manual_seed(seed)
    return apply_lora(GPT(tiny_config()), **{**dict(r=4, alpha=8), **lora})


def randomize_lora(model, seed=1):
    """Give B non-zero values, as training would, so merging has something to fold in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


IDS = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))


def test_lora_starts_at_the_pretrained_function():
    torch.manual_seed(0)
    base = GPT(tiny_config()).eval()
    with torch.no_grad():
        before = base(IDS)
        after = apply_lora(base, r=4, alpha=8).eval()(IDS)
    assert torch.equal(before, after)  # B = 0 exactly, so not even rounding differs


def test_lora_layer_computes_the_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=2, alpha=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = x @ base.weight.t() + base.bias + (3 / 2) * x @ (layer.lora_B @ layer.lora_A).t()
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert layer.lora_A.abs().sum() > 0 and not base.weight.requires_grad


def test_merge_and_unmerge_round_trip():
    model = make_model().eval()
    randomize_lora(model)
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(IDS)
        merged = merge_lora(model)(IDS)
        assert torch.allclose(merged, unmerged, atol=1e-5)
        assert not torch.allclose(model.transformer.h[0].attn.c_attn.base.weight,
                                  weights_before["transformer.h.0.attn.c_attn.base.weight"])
        again = merge_lora(model, merged=False)(IDS)
    assert torch.allclose(again, unmerged, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, weights_before[k], atol=1e-5), k


def test_training_a_merged_layer_is_refused():
    model = merge_lora(make_model()).train()
    with pytest.raises(RuntimeError, match="unmerge"):
        model(IDS)


def test_only_lora_parameters_train_and_frozen_weights_get_no_gradient():
    model = make_model().train()
    randomize_lora(model)  # with B = 0, A's gradient would be zero too
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * 4 * 2  # A and B, 4 Linears per block, 2 blocks
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    logits = model(IDS)
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), IDS[:, 1:].reshape(-1))
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    optimizer.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), n


def test_parameter_counts():
    model = make_model(r=4)
    c = tiny_config()
    # per block: c_attn (64 -> 192), attn c_proj (64 -> 64), c_fc (64 -> 256), mlp c_proj (256 -> 64)
    per_block = 4 * (64 + 192) + 4 * (64 + 64) + 4 * (64 + 256) + 4 * (256 + 64)
    assert model.num_parameters(trainable_only=True) == c.n_layer * per_block
    assert model.num_parameters() == GPT(c).num_parameters() + c.n_layer * per_block


def test_targets_select_layers_by_suffix():
    model = make_model(targets=["attn.c_attn"])
    assert sorted(lora_layers(model)) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    model = make_model(targets=["c_proj"])  # both attention's and the MLP's
    assert len(lora_layers(model)) == 4
    model = make_model(targets=["transformer.h.1.mlp.c_fc"])
    assert list(lora_layers(model)) == ["transformer.h.1.mlp.c_fc"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0, alpha=8), "positive integer"),
    (dict(r=-2, alpha=8), "positive integer"),
    (dict(r=2.5, alpha=8), "positive integer"),
    (dict(r=4, alpha=0), "alpha must be positive"),
    (dict(r=4, alpha=8, dropout=1.0), "dropout"),
    (dict(r=4, alpha=8, targets=[]), "non-empty"),
    (dict(r=4, alpha=8, targets="c_attn"), "non-empty list"),
    (dict(r=4, alpha=8, targets=["c_atn"]), "'c_atn' matches no module; the Linear layers are named"),
    (dict(r=4, alpha=8, targets=["attn"]), "matches transformer.h.0.attn, which is CausalSelfAttention"),
    (dict(r=4, alpha=8, targets=["lm_head"]), "tied to the token embedding"),
    (dict(r=4, alpha=8, targets=["wte"]), "which is Embedding, not nn.Linear"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=message):
        apply_lora(GPT(tiny_config()), **kwargs)


def test_applying_twice_is_refused():
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(make_model(), r=2, alpha=2)


def test_adapter_round_trip(tmp_path):
    model = make_model(r=4, alpha=16, targets=["c_attn", "mlp.c_fc"]).eval()
    randomize_lora(model)
    save_lora(model, tmp_path / "adapter.safetensors")
    saved = set(lora_state_dict(model))
    assert saved == {f"transformer.h.{i}.{m}.{ab}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")
                     for ab in ("lora_A", "lora_B")}

    torch.manual_seed(0)
    fresh = GPT(tiny_config())  # the same base weights (seed 0) ...
    load_lora(fresh, tmp_path / "adapter.safetensors").eval()  # ... gets the same LoRA layers and weights
    assert set(lora_layers(fresh)) == set(lora_layers(model))
    assert all(layer.alpha == 16 and layer.r == 4 for layer in lora_layers(fresh).values())
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))


def test_loading_a_mismatched_adapter_is_a_clear_error(tmp_path):
    save_lora(make_model(r=4, targets=["c_attn"]), tmp_path / "a.safetensors")
    with pytest.raises(InputError, match="does not match the model: missing"):
        load_lora(make_model(r=4, targets=["c_fc"]), tmp_path / "a.safetensors")
    with pytest.raises(InputError, match=r"a.safetensors: this adapter does not fit the model: rank r=4, the "
                                         r"model's LoRA layers have r=2$"):
        load_lora(make_model(r=2, targets=["c_attn"]), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="no LoRA layers to save"):
        save_lora(GPT(tiny_config()), tmp_path / "b.safetensors")
    write_safetensors(tmp_path / "c.safetensors", {"x": torch.zeros(2)}, metadata={"lora_alpha": 8})
    with pytest.raises(InputError, match="c.safetensors: not a LoRA adapter written by save_lora"):
        load_lora(GPT(tiny_config()), tmp_path / "c.safetensors")


def save_adapter_of(path, with_metadata=True, **config):
    """An adapter saved from a model of another shape; without metadata, as older files were written."""
    torch.manual_seed(0)
    save_lora(apply_lora(GPT(tiny_config(**config)), r=4, alpha=8), path)
    if not with_metadata:
        tensors, _ = read_safetensors(path)
        write_safetensors(path, tensors, metadata={"lora_alpha": 8})
    return path


@pytest.mark.parametrize("with_metadata", [True, False])
@pytest.mark.parametrize("config, message", [
    (dict(n_layer=3), "depth n_layer=3, the model's is 2"),
    (dict(n_embd=128), "width n_embd=128, the model's is 64"),
    (dict(n_layer=3, n_embd=32, n_head=2), "depth n_layer=3, the model's is 2; width n_embd=32, the model's is 64"),
])
def test_an_adapter_for_another_shape_names_what_differs(tmp_path, config, message, with_metadata):
    path = save_adapter_of(tmp_path / "other.safetensors", with_metadata, **config)
    for model in (GPT(tiny_config()), make_model(r=4)):  # without LoRA layers yet, and with them
        with pytest.raises(InputError, match=rf"other.safetensors: this adapter does not fit the model: {message}$"):
            load_lora(model, path)
        assert not lora_layers(model) or all(layer.lora_B.abs().sum() == 0 for layer in lora_layers(model).values())


def test_a_shallower_models_adapter_is_refused_when_its_depth_is_known(tmp_path):
    """A 1-layer model's adapter names only layer 0, which a 2-layer model has too: only the saved depth tells."""
    with pytest.raises(InputError, match="depth n_layer=1, the model's is 2$"):
        load_lora(GPT(tiny_config()), save_adapter_of(tmp_path / "one.safetensors", n_layer=1))


def test_merged_state_dict_is_a_plain_gpt():
    model = make_model().eval()
    randomize_lora(model)
    plain = GPT(tiny_config()).eval()
    plain.load_state_dict(merged_state_dict(model))  # strict: exactly a plain GPT's names
    with torch.no_grad():
        assert torch.allclose(plain(IDS), model(IDS), atol=1e-5)
    merge_lora(model)  # exporting an already merged model must not add the update twice
    plain.load_state_dict(merged_state_dict(model))
    with torch.no_grad():
        assert torch.allclose(plain(IDS), model(IDS), atol=1e-5)


# -----------------------------------------------------------------------------
# rsLoRA (Kalajdzievski 2023): the update scaled by alpha / sqrt(r)


@pytest.mark.parametrize("rslora, scaling", [(False, 12 / 9), (True, 12 / 3)])
def test_rslora_scales_the_update_by_alpha_over_sqrt_r(rslora, scaling):
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=9, alpha=12, rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert layer.scaling == scaling
    x = torch.randn(4, 6, dtype=torch.float64)
    A, B, W, b = (t.detach().double() for t in (layer.lora_A, layer.lora_B, base.weight, base.bias))
    assert torch.allclose(layer.double()(x), x @ W.t() + b + scaling * x @ A.t() @ B.t(), atol=1e-12)


def test_rslora_round_trips_and_merges_with_its_scaling(tmp_path):
    model = make_model(r=4, alpha=8, rslora=True).eval()
    randomize_lora(model)
    assert {layer.scaling for layer in lora_layers(model).values()} == {8 / 2}
    save_lora(model, tmp_path / "rs.safetensors")
    torch.manual_seed(0)
    fresh = load_lora(GPT(tiny_config()), tmp_path / "rs.safetensors").eval()
    assert all(layer.rslora and layer.scaling == 4.0 for layer in lora_layers(fresh).values())
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))
    # merged: W + alpha / sqrt(r) B A, by hand
    layer = model.transformer.h[1].mlp.c_fc
    merged = merged_state_dict(model)["transformer.h.1.mlp.c_fc.weight"]
    assert torch.allclose(merged, layer.base.weight + 4.0 * layer.lora_B @ layer.lora_A, atol=1e-6)
    # into a model whose LoRA layers scale by alpha / r: refused, not silently rescaled
    with pytest.raises(InputError, match=r"rs.safetensors: this adapter does not fit the model: scaling "
                                         r"alpha/sqrt\(r\) \(rsLoRA\), the model's LoRA layers scale by alpha/r$"):
        load_lora(make_model(r=4, alpha=8), tmp_path / "rs.safetensors")


def test_an_adapter_saved_before_rslora_loads_as_alpha_over_r(tmp_path):
    path = save_adapter_of(tmp_path / "old.safetensors", with_metadata=False)  # only lora_alpha in its metadata
    torch.manual_seed(0)
    model = load_lora(GPT(tiny_config()), path)
    assert all(not layer.rslora and layer.scaling == 8 / 4 for layer in lora_layers(model).values())
