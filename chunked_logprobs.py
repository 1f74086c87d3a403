"""
Per-token log-probabilities without ever holding every position's logits: the memory-saving path beside the
plain one (train_sft.sequence_logprobs: logits, log_softmax, gather), as nanoGPT keeps a manual attention
beside the fused kernel. train_sft.batch_logprobs takes it only when a batch's logits would be large (a
16-sonnet DPO batch's take 32 x 181 x 50257 x 4 bytes = 1.2 GB per copy, and the plain path holds several).

    logps = model(input_ids, logits_at=positions, head=chunked_head(targets))    # (B, K) float32

The derivation. With z = W h the logits of one position and p = softmax(z),

    log p(t | h) = h . w_t - log sum_v exp(h . w_v)
    d log p(t | h) / d z_v = 1[v = t] - p_v
    d log p(t | h) / d h   = w_t - sum_v p_v w_v         (the target's row of W minus the expected row)

so for an incoming gradient g per position, dL/dh = g (w_t - sum_v p_v w_v) and dL/dW = sum g (onehot(t) - p) h^T.
The logits are computed CHUNK positions at a time; the forward pass, which has each chunk's p at hand, already
computes d log p / d h. dL/dW needs every position's p again, so when W trains (not under LoRA) the backward pass
recomputes each chunk's logits and adds its g (onehot(t) - p) h^T into one float32 dL/dW: four matmuls with W
where the plain path has three, and never more than one chunk's (n, vocab) numbers.
"""

import torch

# Positions whose logits are computed at once: their float32 logits take 512 x 50257 x 4 bytes = 98 MiB, whatever
# the batch, where a 16-sonnet DPO batch's window logits take 32 x 132 x 50257 x 4 = 810 MiB per copy and the plain
# path holds several. bench.py's sonnet_logprob_memory_ratio: 0.28 at 512 (0.31 at 1024; 256 saves no more).
CHUNK = 512


def chunked_token_logprobs(hidden, weight, targets, chunk_size=None):
    """log p(target | h) for each hidden state, with logits z = W h computed for chunk_size positions at a time:

        log p(t | h) = h . w_t - log sum_v exp(h . w_v)

    hidden (..., n_embd), weight (vocab, n_embd), targets (...) long -> (...) float32. The same numbers as
    log_softmax(hidden @ weight.T).gather(targets), and under autocast the same precision as that plain path:
    the matmul in the autocast dtype (bfloat16), the logsumexp in float32. Only one chunk's (n, vocab) numbers
    exist at a time, forward or backward, so that memory does not grow with the batch.
    """
    assert hidden.shape[:-1] == targets.shape, (hidden.shape, targets.shape)
    return ChunkedTokenLogprobs.apply(hidden, weight, targets, chunk_size or CHUNK, torch.is_grad_enabled())


class ChunkedTokenLogprobs(torch.autograd.Function):
    """chunked_token_logprobs' forward and backward passes (the derivation is the module's docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, grad_enabled):
        dtype = matmul_dtype(hidden)
        want_hidden = grad_enabled and ctx.needs_input_grad[0]
        h, w, t = hidden.reshape(-1, hidden.size(-1)).to(dtype), weight.to(dtype), targets.reshape(-1)
        logps = torch.empty(t.shape, dtype=torch.float32, device=hidden.device)
        logsumexp = torch.empty_like(logps)
        dlogp_dh = torch.empty_like(h) if want_hidden else None
        for rows in chunks(len(t), chunk_size):
            logps[rows], logsumexp[rows], dlogp_dz = chunk_logprobs(h[rows], w, t[rows], want_hidden)
            if want_hidden:
                dlogp_dh[rows] = dlogp_dz.to(dtype) @ w
            del dlogp_dz  # free this chunk's (n, vocab) numbers before computing the next
        ctx.save_for_backward(hidden, weight, targets, logsumexp, dlogp_dh)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return logps.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets, logsumexp, dlogp_dh = ctx.saved_tensors
        g = grad_logps.reshape(-1, 1).float()  # dL / d log p, one per position
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = (g * dlogp_dh.float()).to(hidden.dtype).view(hidden.shape)
        if ctx.needs_input_grad[1]:
            h, w, t = hidden.reshape(-1, hidden.size(-1)).to(ctx.dtype), weight.to(ctx.dtype), targets.reshape(-1)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # summed in float32
            for rows in chunks(len(t), ctx.chunk_size):  # the chunk's logits again, instead of having kept them all
                softmax = (h[rows] @ w.t()).float().sub_(logsumexp[rows, None]).exp_()  # exp(z - logsumexp(z))
                scaled = onehot_minus_(softmax, t[rows]).mul_(g[rows]).to(ctx.dtype)  # g (onehot(t) - p)
                if scaled.dtype == torch.float32:
                    grad_w.addmm_(scaled.t(), h[rows])  # in place: no second (vocab, n_embd) tensor
                else:
                    grad_w.add_(scaled.t() @ h[rows])  # the product in the autocast dtype, as on the plain path
                del softmax, scaled  # free this chunk's before computing the next
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def chunk_logprobs(h, w, targets, with_gradient):
    """For one chunk's logits z = h W^T (n, vocab): log p(targets), logsumexp(z) and, with_gradient,
    d log p(t) / d z = onehot(t) - softmax(z). The matmul runs in h's and w's dtype, the rest in float32."""
    z = (h @ w.t()).float()
    target_logits = z.gather(1, targets[:, None]).squeeze(1)
    logsumexp = softmax_(z)  # z now holds softmax(z)
    return target_logits - logsumexp, logsumexp, onehot_minus_(z, targets) if with_gradient else None


def softmax_(z):
    """Overwrite logits z (n, vocab) with softmax(z) and return logsumexp(z) (n,): one pass of exp, no second
    (n, vocab) tensor. logsumexp(z) = m + log sum_v exp(z_v - m) with m = max_v z_v, so no exp overflows."""
    m = z.amax(-1, keepdim=True)
    total = z.sub_(m).exp_().sum(-1, keepdim=True)
    z.div_(total)
    return (m + total.log()).squeeze(-1)


def onehot_minus_(p, targets):
    """onehot(targets) - p for probabilities p (n, vocab), overwriting p: d log p(t) / d z."""
    return p.neg_().scatter_add_(1, targets[:, None], torch.ones_like(p[:, :1]))


def matmul_dtype(x):
    """The dtype a matmul of x runs in: autocast's (bfloat16 in training on a GPU) when it is on, else x's own."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def chunks(n, size):
    """Slices that cut range(n) into pieces of `size` (the last one shorter when size does not divide n)."""
    return [slice(start, start + size) for start in range(0, n, size)]


def chunked_head(targets):
    """A GPT.forward head: log p(targets | each hidden state) by chunked_token_logprobs instead of logits."""
    return lambda hidden, weight: chunked_token_logprobs(hidden, weight, targets, CHUNK)
