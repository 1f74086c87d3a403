"""
LoRA, by hand (Hu et al. 2021): the pretrained W stays frozen and the update is B (d_out x r) A (r x d_in), r << d:

    h = W x + (alpha / r) * B A x                                   (Hu et al. 2021, eq. 3)

B starts at zero, so training starts at the pretrained function; B A can then be folded into W ("merged").
rsLoRA (rslora=True; Kalajdzievski 2023) scales by alpha / sqrt(r), so learning does not slow as r grows.

    model = apply_lora(checkpoint.from_pretrained("gpt2"), r=8, alpha=16)  # freezes all but A and B
    save_lora(model, "adapter.safetensors")                        # a few MB, not the whole model
    plain = merged_model(model)                                    # a plain GPT whose weights are W + (alpha/r) B A
"""

import math
import re

import torch
import torch.nn as nn

from fileio import InputError, read_safetensors, write_safetensors

# Every Linear in GPT-2's blocks. The output layer is never adapted: it is tied to the token embedding.
DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LORA_NAMES = (".lora_A", ".lora_B")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus y = W x + b + scaling B A dropout(x), scaling = alpha / r (rsLoRA: alpha / sqrt(r))."""

    def __init__(self, base, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear does for its own weight
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        if self.merged:
            if self.training:
                raise RuntimeError("a merged LoRA layer cannot train: unmerge it with merge_lora(model, False)")
            return self.base(x)
        return self.base(x) + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta_weight(self):  # what merging adds to W: scaling B A, (out_features, in_features)
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}" + (", rslora" if self.rslora else "")


def apply_lora(model, r, alpha, dropout=0.0, targets=DEFAULT_TARGETS, rslora=False):
    """Replace every nn.Linear whose dotted name ends in one of `targets` by a LoRALinear and freeze the rest, in
    place: "c_proj" matches attention's and the MLP's, "attn.c_proj" attention's, "transformer.h.0.attn.c_attn" one."""
    if type(r) is not int or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"LoRA targets must be a non-empty list of module names, got {targets!r}")
    if lora_layers(model):
        raise ValueError("this model already has LoRA layers; apply_lora once per model")
    chosen = {}  # name -> module, in the order found
    for target in targets:
        matches = {name: m for name, m in model.named_modules() if name == target or name.endswith("." + target)}
        if not matches:
            linears = sorted({".".join(name.split(".")[-2:]) for name, m in model.named_modules()
                              if isinstance(m, nn.Linear)})
            raise ValueError(f"LoRA target {target!r} matches no module; the Linear layers are named {linears}")
        for name, module in matches.items():
            if name == "lm_head":
                raise ValueError("lm_head is tied to the token embedding and is never adapted by LoRA")
            if not isinstance(module, nn.Linear):
                raise ValueError(f"LoRA target {target!r} matches {name}, which is {type(module).__name__}, "
                                 f"not nn.Linear")
            chosen[name] = module
    model.requires_grad_(False)  # only the new A and B matrices will train
    for name, module in chosen.items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, LoRALinear(module, r, alpha, dropout, rslora))
    return model


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model, merged=True):
    """Fold every layer's update into its W (W += scaling B A), so a forward pass costs one matmul per layer;
    merged=False takes it back out (W -= scaling B A), to train again."""
    for layer in lora_layers(model).values():
        if layer.merged != merged:
            layer.base.weight += layer.delta_weight() if merged else -layer.delta_weight()
            layer.merged = merged
    return model


# -----------------------------------------------------------------------------
# adapter-only checkpoints, and export to a plain GPT

def lora_state_dict(model):
    """Only the LoRA matrices: everything needed to rebuild the fine-tuned model from the base model."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(LORA_NAMES)}


def save_lora(model, path):
    """Every LoRA layer's A and B, as safetensors, with what load_lora needs to say what does not fit a model."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    write_safetensors(path, lora_state_dict(model), metadata={
        "lora_alpha": layers[0].alpha, "lora_dropout": layers[0].lora_dropout.p, "r": layers[0].r,
        "rslora": layers[0].rslora, "n_layer": model.config.n_layer, "n_embd": model.config.n_embd})


def load_lora(model, path):
    """Load save_lora's adapter (into the file's LoRA layers, made first if the model has none); one that does not
    fit is an InputError naming each mismatch. Older files lack metadata: measured from the tensors, alpha / r."""
    tensors, metadata = read_safetensors(path)
    names = sorted(k.removesuffix(".lora_A") for k in tensors if k.endswith(".lora_A"))
    if not names or "lora_alpha" not in metadata or any(
            not re.fullmatch(r"transformer\.h\.\d+\..+", name) or name + ".lora_B" not in tensors for name in names):
        raise InputError(f"{path}: not a LoRA adapter written by save_lora (it needs lora_A and lora_B tensors "
                         f"named transformer.h.<i>.<layer>, and lora_alpha)")
    c, layers = model.config, list(lora_layers(model).values())
    try:
        (r, d_in), d_out = tensors[names[0] + ".lora_A"].shape, tensors[names[0] + ".lora_B"].shape[0]
        depth = int(metadata.get("n_layer", 1 + max(int(name.split(".")[2]) for name in names)))
        # every adapted layer reads n_embd numbers, except the MLP's c_proj (4 n_embd), which writes n_embd
        width = int(metadata.get("n_embd", d_out if names[0].endswith("mlp.c_proj") else d_in))
        rslora = metadata.get("rslora", "False") == "True"  # safetensors metadata is text
        ranks, scalings = sorted({layer.r for layer in layers}), {layer.rslora for layer in layers}
        mismatches = []
        if depth > c.n_layer or (depth != c.n_layer and "n_layer" in metadata):  # unsaved: it may skip the last
            mismatches.append(f"depth n_layer={depth}, the model's is {c.n_layer}")
        if width != c.n_embd:
            mismatches.append(f"width n_embd={width}, the model's is {c.n_embd}")
        if ranks and ranks != [r]:
            mismatches.append(f"rank r={r}, the model's LoRA layers have r={', '.join(map(str, ranks))}")
        if scalings and scalings != {rslora}:
            mismatches.append(f"scaling {'alpha/sqrt(r) (rsLoRA)' if rslora else 'alpha/r'}, the model's "
                              f"LoRA layers scale by {'alpha/sqrt(r)' if True in scalings else 'alpha/r'}")
        if mismatches:
            raise InputError(f"{path}: this adapter does not fit the model: {'; '.join(mismatches)}")
        if not layers:
            apply_lora(model, r, float(metadata["lora_alpha"]), float(metadata.get("lora_dropout", 0.0)), names,
                       rslora)
        expected = {key: tuple(value.shape) for key, value in lora_state_dict(model).items()}
        got = {key: tuple(value.shape) for key, value in tensors.items()}
        if got != expected:
            missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
            shapes = [f"{key} {got[key]}, the model's {expected[key]}" for key in sorted(got.keys() & expected.keys())
                      if got[key] != expected[key]]
            raise ValueError(f"LoRA state dict does not match the model: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}, shapes {shapes[:4]}")
    except ValueError as e:  # targets this model does not have, shapes that differ, a damaged file
        raise InputError(f"{path}: {e}") from None
    model.load_state_dict(tensors, strict=False)
    return model


def merged_state_dict(model):
    """A plain GPT state dict (<layer>.base.weight is <layer>.weight) whose weights are W + scaling B A."""
    plain = {key.replace(".base.", "."): value.detach().clone()
             for key, value in model.state_dict().items() if not key.endswith(LORA_NAMES)}
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            plain[name + ".weight"] += layer.delta_weight().detach()
    return plain


def merged_model(model):
    """A new plain GPT (no LoRA layers) whose weights are W + scaling B A: what checkpoint.save_pretrained writes."""
    plain = type(model)(model.config).to(next(model.parameters()).device)
    plain.load_state_dict(merged_state_dict(model))
    return plain.train(model.training)
