"""
LoRA, by hand (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Full fine-tuning learns a whole new d_out x d_in matrix for every layer. LoRA freezes the pretrained W and
learns the update as a product of two thin matrices, B (d_out x r) and A (r x d_in) with r << d:

    h = W x + (alpha / r) * B A x                                   (Hu et al. 2021, eq. 3)

A starts random and B starts at zero, so B A = 0 and training starts exactly at the pretrained function.
alpha / r keeps the update's scale steady when you change r. After training, B A can be folded into W
("merged"), so the adapted model runs as fast as the original one.

rsLoRA (rslora=True; Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA")
scales by alpha / sqrt(r) instead: with alpha / r a larger rank learns slower (the update shrinks as 1/r
while its variance grows only as r), so ranks above ~16 gain nothing; alpha / sqrt(r) keeps the learning
speed steady in r. (LoRA+, B's own learning rate, is the optimizer's: trainer.configure_optimizer.)

    model = apply_lora(checkpoint.from_pretrained("gpt2"), r=8, alpha=16)  # freezes all but A and B
    ... train ...
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
    """A frozen nn.Linear plus a trainable low-rank update: y = W x + b + scaling B A dropout(x), where scaling
    is alpha / r (rsLoRA: alpha / sqrt(r))."""

    def __init__(self, base, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
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
                raise RuntimeError("this LoRA layer is merged into its base weight; call unmerge_lora before training")
            return self.base(x)
        return self.base(x) + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta_weight(self):
        """The update this layer adds to W: scaling B A, shape (out_features, in_features)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}" + (", rslora" if self.rslora else "")


def apply_lora(model, r, alpha, dropout=0.0, targets=DEFAULT_TARGETS, rslora=False):
    """Replace every nn.Linear whose name is, or ends in, one of `targets` by a LoRALinear; freeze the rest.
    Returns the model (changed in place).

    Targets match by dotted suffix: "c_proj" matches attention's and the MLP's c_proj, "attn.c_proj" only
    attention's, "transformer.h.0.attn.c_attn" one layer.
    """
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
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
def merge_lora(model):
    """Fold every layer's update into its W (W += scaling B A), so a forward pass costs one matmul per layer."""
    for layer in lora_layers(model).values():
        if not layer.merged:
            layer.base.weight += layer.delta_weight()
            layer.merged = True
    return model


@torch.no_grad()
def unmerge_lora(model):
    """Undo merge_lora (W -= scaling B A), to train again."""
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.base.weight -= layer.delta_weight()
            layer.merged = False
    return model


# -----------------------------------------------------------------------------
# adapter-only checkpoints, and export to a plain GPT

def lora_state_dict(model):
    """Only the LoRA matrices: everything needed to rebuild the fine-tuned model from the base model."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(LORA_NAMES)}


def save_lora(model, path):
    """Write the adapter (A, B of every LoRA layer, plus alpha, dropout, whether it is rsLoRA, and the model's
    depth, width and rank, so load_lora can say what does not fit) as a small safetensors file."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    write_safetensors(path, lora_state_dict(model), metadata={
        "lora_alpha": layers[0].alpha, "lora_dropout": layers[0].lora_dropout.p, "r": layers[0].r,
        "rslora": layers[0].rslora, "n_layer": model.config.n_layer, "n_embd": model.config.n_embd})


def load_lora(model, path):
    """Load an adapter written by save_lora. A model without LoRA layers gets them first, on exactly the
    layers the file adapts, with the file's rank, alpha and scaling (files written before rsLoRA are alpha / r).
    Returns the model. An adapter that does not fit the model (its depth, width, rank, scaling or layers) is an
    InputError naming the file and each mismatch."""
    tensors, metadata = read_safetensors(path)
    names = sorted(k.removesuffix(".lora_A") for k in tensors if k.endswith(".lora_A"))
    if not names or "lora_alpha" not in metadata or any(
            not re.fullmatch(r"transformer\.h\.\d+\..+", name) or name + ".lora_B" not in tensors for name in names):
        raise InputError(f"{path}: not a LoRA adapter written by save_lora (it needs lora_A and lora_B tensors "
                         f"named transformer.h.<i>.<layer>, and lora_alpha)")
    try:
        mismatches = adapter_mismatches(model, names, tensors, metadata)
        if mismatches:
            raise InputError(f"{path}: this adapter does not fit the model: {'; '.join(mismatches)}")
        if not lora_layers(model):
            apply_lora(model, r=tensors[names[0] + ".lora_A"].shape[0], alpha=float(metadata["lora_alpha"]),
                       dropout=float(metadata.get("lora_dropout", 0.0)), targets=names, rslora=saved_rslora(metadata))
        expected = lora_state_dict(model)
        missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(f"LoRA state dict does not match the model: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        for key, tensor in tensors.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(f"LoRA tensor {key} has shape {tuple(tensor.shape)}, the model has "
                                 f"{tuple(expected[key].shape)}")
    except ValueError as e:  # targets this model does not have, shapes that differ, a damaged file
        raise InputError(f"{path}: {e}") from None
    model.load_state_dict(tensors, strict=False)
    return model


def saved_rslora(metadata):
    """Whether save_lora wrote an rsLoRA adapter (safetensors metadata is text: "True" or "False")."""
    return metadata.get("rslora", "False") == "True"


def adapter_mismatches(model, names, tensors, metadata):
    """What about an adapter does not fit `model`: its depth, width, rank or scaling, e.g. ["depth n_layer=3, the
    model's is 2"]. Adapters saved without that metadata are measured from their names and shapes."""
    c, A = model.config, tensors[names[0] + ".lora_A"]  # A: (r, in_features)
    deepest = 1 + max(int(name.split(".")[2]) for name in names)  # names are transformer.h.{i}.<module>
    depth = int(metadata.get("n_layer", deepest))
    # width: what every adapted layer reads is n_embd wide, except the MLP's c_proj (4 n_embd), whose B is n_embd
    width = int(metadata.get("n_embd", tensors[names[0] + ".lora_B"].shape[0] if names[0].endswith("mlp.c_proj")
                                       else A.shape[1]))
    rslora = saved_rslora(metadata)
    model_ranks = sorted({layer.r for layer in lora_layers(model).values()})
    model_rslora = {layer.rslora for layer in lora_layers(model).values()}
    mismatches = []
    if depth != c.n_layer and (depth > c.n_layer or "n_layer" in metadata):
        mismatches.append(f"depth n_layer={depth}, the model's is {c.n_layer}")
    if width != c.n_embd:
        mismatches.append(f"width n_embd={width}, the model's is {c.n_embd}")
    if model_ranks and model_ranks != [A.shape[0]]:
        mismatches.append(f"rank r={A.shape[0]}, the model's LoRA layers have r={', '.join(map(str, model_ranks))}")
    if model_rslora and model_rslora != {rslora}:
        mismatches.append(f"scaling {'alpha/sqrt(r) (rsLoRA)' if rslora else 'alpha/r'}, the model's "
                          f"LoRA layers scale by {'alpha/sqrt(r)' if True in model_rslora else 'alpha/r'}")
    return mismatches


def merged_state_dict(model):
    """A plain GPT state dict (no LoRA names) whose weights are W + scaling B A. The model is unchanged."""
    # a LoRA layer's W and b are named <layer>.base.weight and <layer>.base.bias; a plain GPT's <layer>.weight, .bias
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
