"""Target log-probabilities without the whole logits tensor (chunked_logprobs), against the plain computation
log_softmax(logits).gather(targets) (train_sft.sequence_logprobs); which path train_sft.batch_logprobs takes; and a
forward pass that never waits for the device (no host synchronisation)."""

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import model as model_module
import train_sft
from conftest import tiny_config
from data.batching import Example, collate
from lora import apply_lora
import chunked_logprobs
from chunked_logprobs import chunked_head, chunked_token_logprobs


def plain_batch_logprobs(model, batch):
    return train_sft.batch_logprobs(model, batch, path="plain")


def chunked_batch_logprobs(model, batch):
    return train_sft.batch_logprobs(model, batch, path="chunked")


def random_examples(kind, seed):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, 50257, (n,), generator=g).tolist()  # noqa: E731
    if kind == "sonnet":  # no prompt, every token a target; rows of different lengths, so some are padded
        return [Example([], ids(n)) for n in (40, 23, 37, 9)] + [Example(ids(5), ids(30))]
    return [Example(ids(n), ids(1)) for n in (12, 7, 19, 3, 15, 8)]  # paraphrase: a prompt, one answer token


def gradients(model, logps_fn, batch, row_weights, autocast=nullcontext()):
    """Every trainable parameter's gradient of a loss that weighs each row differently (as DPO's does). As in
    train_sft.py, only the forward pass runs under `autocast`."""
    model.zero_grad(set_to_none=True)
    with autocast:
        logps = logps_fn(model, batch)
    (logps * row_weights).sum().div(int(batch.loss_mask.sum())).backward()
    return logps.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


class VocabMatmuls(TorchDispatchMode):
    """Records the dtypes of every matrix product one of whose operands has a vocabulary-sized dimension."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.dtypes = vocab_size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            operands = [a for a in args if isinstance(a, torch.Tensor)]
            if any(self.vocab_size in a.shape for a in operands):
                self.dtypes.append(tuple(a.dtype for a in operands))
        return func(*args, **(kwargs or {}))


# -----------------------------------------------------------------------------
# the function alone, against hand computation

@pytest.mark.parametrize("chunk_size", [1, 3, 14, 100])
def test_chunked_token_logprobs_by_hand(chunk_size):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 7), generator=g)
    got = chunked_token_logprobs(hidden, weight, targets, chunk_size)
    assert got.shape == (2, 7) and got.dtype == torch.float32
    h, w = hidden.tolist(), weight.tolist()
    for b in range(2):
        for k in range(7):  # log p(t) = h . w_t - log sum_v exp(h . w_v)
            z = [sum(x * y for x, y in zip(h[b][k], w[v])) for v in range(11)]
            expected = z[targets[b, k]] - math.log(math.fsum(math.exp(zv) for zv in z))
            assert got[b, k].item() == pytest.approx(expected, abs=1e-6)

    upstream = torch.randn(2, 7, generator=g, dtype=torch.float64)
    grad_h, grad_w = torch.autograd.grad((got.double() * upstream).sum(), (hidden, weight))
    plain = F.log_softmax(hidden @ weight.t(), -1).gather(2, targets[..., None]).squeeze(2)
    want_h, want_w = torch.autograd.grad((plain * upstream).sum(), (hidden, weight))
    assert torch.allclose(grad_h, want_h, atol=1e-6) and torch.allclose(grad_w, want_w, atol=1e-6)


def test_only_what_needs_a_gradient_gets_one():
    hidden = torch.randn(3, 4, requires_grad=True)
    weight = torch.randn(9, 4)  # frozen, as LoRA freezes the output layer
    logps = chunked_token_logprobs(hidden, weight, torch.tensor([0, 8, 3]), 2)
    logps.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():  # DPO's reference model: no graph, the same numbers
        assert torch.equal(chunked_token_logprobs(hidden, weight, torch.tensor([0, 8, 3]), 2), logps.detach())
    weight.requires_grad_(True)
    nothing = chunked_token_logprobs(hidden[:0], weight, torch.tensor([], dtype=torch.long), 2)
    assert nothing.shape == (0,)
    nothing.sum().backward()  # no positions: no gradient, and no error
    assert weight.grad is None or not weight.grad.any()


# -----------------------------------------------------------------------------
# through GPT.forward, against train_sft.sequence_logprobs on the full logits

@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("kind", ["sonnet", "paraphrase"])
def test_logprobs_and_gradients_match_the_plain_path(tiny_model, monkeypatch, kind, lora):
    monkeypatch.setattr(chunked_logprobs, "CHUNK", 16)  # a sonnet batch then spans many chunks
    model = tiny_model.train()  # dropout is 0: the same function both times
    if lora:
        apply_lora(model, r=4, alpha=8)
        with torch.no_grad():  # B = 0 at the start would leave LoRA out of the numbers
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.02)
    batch = collate(random_examples(kind, seed=1))
    row_weights = torch.randn(len(batch.lengths), generator=torch.Generator().manual_seed(2))
    got, got_grads = gradients(model, chunked_batch_logprobs, batch, row_weights)
    want, want_grads = gradients(model, plain_batch_logprobs, batch, row_weights)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == list(got_grads) == list(want_grads)
    assert ("transformer.wte.weight" in names) != lora  # the tied embedding / output layer trains without LoRA
    for name in names:
        assert torch.allclose(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-5), \
            (name, (got_grads[name] - want_grads[name]).abs().max())


def test_without_logits_at_every_position_is_scored(tiny_model):
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = F.log_softmax(tiny_model(ids), -1).gather(2, targets[..., None]).squeeze(2)
        assert torch.allclose(tiny_model(ids, head=chunked_head(targets)), plain, atol=1e-5)


def test_under_bf16_autocast_it_matches_the_plain_path(tiny_model, monkeypatch):
    """Under autocast, every matmul with the output layer runs in bfloat16, forward and backward, and the
    reductions in float32, as on the plain path: the two agree far more closely than either agrees with float32."""
    monkeypatch.setattr(chunked_logprobs, "CHUNK", 16)
    batch = collate(random_examples("sonnet", seed=5))
    row_weights = torch.ones(len(batch.lengths))
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    exact, exact_grads = gradients(tiny_model, plain_batch_logprobs, batch, row_weights)
    want, want_grads = gradients(tiny_model, plain_batch_logprobs, batch, row_weights, autocast())
    with VocabMatmuls(tiny_model.config.vocab_size) as matmuls:
        got, got_grads = gradients(tiny_model, chunked_batch_logprobs, batch, row_weights, autocast())
    assert len(matmuls.dtypes) > 3 and set(matmuls.dtypes) == {(torch.bfloat16, torch.bfloat16)}, matmuls.dtypes
    assert got.dtype == want.dtype == torch.float32
    bf16_error = (want - exact).abs().max()
    assert bf16_error > 1e-3  # autocast really ran the matmul in bfloat16
    assert (got - want).abs().max() < bf16_error / 10
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.wpe.weight"):
        assert got_grads[name].dtype == torch.float32
        assert (got_grads[name] - exact_grads[name]).norm() < 2 * (want_grads[name] - exact_grads[name]).norm(), name


def test_auto_takes_the_plain_path_on_a_paraphrase_batch_and_the_chunked_one_on_sonnets(monkeypatch):
    torch.manual_seed(0)
    tiny_model = model_module.GPT(tiny_config(block_size=256))
    calls = []
    real = chunked_logprobs.chunked_token_logprobs
    monkeypatch.setattr(chunked_logprobs, "chunked_token_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    paraphrase = collate(random_examples("paraphrase", seed=7) + random_examples("paraphrase", seed=8)[:2])
    train_sft.batch_logprobs(tiny_model, paraphrase)  # 8 rows, as a training batch of the course's size
    assert calls == []
    sonnets = collate([Example([], torch.randint(0, 50257, (181,)).tolist()) for _ in range(32)])
    train_sft.batch_logprobs(tiny_model, sonnets)  # a 16-sonnet DPO batch: 32 rows of 181 tokens
    assert calls == [1]


# -----------------------------------------------------------------------------
# no host synchronisation in the forward pass

SYNCING_METHODS = ("item", "tolist", "any", "all", "nonzero", "numpy", "__bool__", "__int__", "__float__",
                   "__index__")


def forward_inputs(device):
    """A padded batch, its loss window and its attention mask, on `device`: built before anything is timed."""
    batch = collate(random_examples("sonnet", seed=6))
    positions, input_ids, _ = train_sft.target_window(batch)
    return [t.to(device) for t in (batch.input_ids, positions, input_ids, batch.attention_mask)]


def forward_passes(model, inputs):
    """Every way training, scoring and generation call the model's forward pass."""
    ids, positions, input_ids, attention_mask = inputs
    model(ids)
    model(ids, logits_at=positions)
    model(ids, logits_at=positions[:, :-1], head=chunked_head(input_ids[:, 1:]))
    model(ids, attention_mask=attention_mask)
    cache = [None] * model.config.n_layer
    model.hidden_states(ids[:, :5], attention_mask[:, :5], kv_cache=cache)
    model.hidden_states(ids[:, 5:6], attention_mask[:, :6], kv_cache=cache)


def test_forward_does_not_wait_for_the_device(tiny_model, monkeypatch):
    """On the CPU: every tensor method that reads a value back to Python raises during the forward passes.
    On a GPU (when there is one), also under torch.cuda.set_sync_debug_mode("error")."""
    def refuse(*args, **kwargs):
        raise AssertionError("the forward pass read a tensor's value back to Python (a host sync on a GPU)")

    inputs = forward_inputs("cpu")
    with monkeypatch.context() as patched:
        for method in SYNCING_METHODS:
            patched.setattr(torch.Tensor, method, refuse)
        with pytest.raises(AssertionError, match="read a tensor's value"):
            bool(torch.ones(1))  # the patch is in force
        forward_passes(tiny_model, inputs)
    if torch.cuda.is_available():
        model, inputs = tiny_model.cuda(), forward_inputs("cuda")
        forward_passes(model, inputs)  # warm up: first calls may sync while loading kernels
        torch.cuda.set_sync_debug_mode("error")
        try:
            forward_passes(model, inputs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
