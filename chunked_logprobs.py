"""
Per-token log-probabilities that never hold every position's logits, beside the plain train_sft.sequence_logprobs
(as nanoGPT keeps a manual attention beside the fused one) for batches whose logits are large (docs/costs.md).

    logps = model(input_ids, logits_at=positions, head=chunked_head(targets))    # (B, K) float32

With z = W h the logits of one position and p = softmax(z),

    log p(t | h) = h . w_t - log sum_v exp(h . w_v)
    d log p(t | h) / d z_v = 1[v = t] - p_v
    d log p(t | h) / d h   = w_t - sum_v p_v w_v         (the target's row of W minus the expected row)

so for an incoming gradient g per position, dL/dh = g (w_t - sum_v p_v w_v) and dL/dW = sum g (onehot(t) - p) h^T.
The forward pass computes CHUNK positions' logits at a time, and d log p / d h while it has their p. When W trains
(not under LoRA), backward recomputes each chunk's logits to add g (onehot(t) - p) h^T into one float32 dL/dW.
"""

import torch

CHUNK = 512  # positions at once: their float32 logits are 512 x 50257 x 4 bytes = 98 MiB, whatever the batch


def chunked_head(targets):
    """A GPT.forward head: log p(targets | each hidden state) by chunked_token_logprobs instead of logits."""
    return lambda hidden, weight: chunked_token_logprobs(hidden, weight, targets, CHUNK)


def chunked_token_logprobs(hidden, weight, targets, chunk_size):
    """log_softmax(hidden @ weight.T).gather(targets), chunk_size positions at a time: hidden (..., n_embd), weight
    (vocab, n_embd), targets (...) long -> (...) float32. Under autocast, as on the plain path, the matmuls run in
    its dtype (bfloat16) and the rest in float32."""
    assert hidden.shape[:-1] == targets.shape, (hidden.shape, targets.shape)
    return ChunkedTokenLogprobs.apply(hidden, weight, targets, chunk_size, torch.is_grad_enabled())


class ChunkedTokenLogprobs(torch.autograd.Function):  # the derivation is the module's docstring

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, grad_enabled):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype  # the matmuls'
        want_hidden = grad_enabled and ctx.needs_input_grad[0]
        h, w, t = hidden.reshape(-1, hidden.size(-1)).to(dtype), weight.to(dtype), targets.reshape(-1)
        logps = torch.empty(t.shape, dtype=torch.float32, device=hidden.device)
        logsumexp = torch.empty_like(logps)
        dlogp_dh = torch.empty_like(h) if want_hidden else None
        for rows in (slice(i, i + chunk_size) for i in range(0, len(t), chunk_size)):
            z = (h[rows] @ w.t()).float()  # this chunk's logits (n, vocab)
            target_logits = z.gather(1, t[rows, None]).squeeze(1)
            # z becomes softmax(z) in place; logsumexp(z) = m + log sum_v exp(z_v - m), m = max_v z_v: no overflow
            m = z.amax(-1, keepdim=True)
            total = z.sub_(m).exp_().sum(-1, keepdim=True)
            z.div_(total)
            logsumexp[rows] = (m + total.log()).squeeze(-1)
            logps[rows] = target_logits - logsumexp[rows]
            if want_hidden:
                dlogp_dh[rows] = onehot_minus_(z, t[rows]).to(dtype) @ w  # (onehot(t) - p) W
            del z  # free this chunk's (n, vocab) numbers before computing the next
        ctx.save_for_backward(hidden, weight, targets, logsumexp, dlogp_dh)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return logps.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets, logsumexp, dlogp_dh = ctx.saved_tensors
        g = grad_logps.reshape(-1, 1).float()  # dL / d log p, one per position
        grad_h = (g * dlogp_dh.float()).to(hidden.dtype).view(hidden.shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            h, w, t = hidden.reshape(-1, hidden.size(-1)).to(ctx.dtype), weight.to(ctx.dtype), targets.reshape(-1)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # summed in float32
            for rows in (slice(i, i + ctx.chunk_size) for i in range(0, len(t), ctx.chunk_size)):  # logits again
                softmax = (h[rows] @ w.t()).float().sub_(logsumexp[rows, None]).exp_()  # exp(z - logsumexp(z))
                scaled = onehot_minus_(softmax, t[rows]).mul_(g[rows]).to(ctx.dtype)  # g (onehot(t) - p)
                if scaled.dtype == torch.float32:
                    grad_w.addmm_(scaled.t(), h[rows])  # in place: no second (vocab, n_embd) tensor
                else:
                    grad_w.add_(scaled.t() @ h[rows])  # the product in the autocast dtype, as on the plain path
                del softmax, scaled  # free this chunk's before computing the next
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def onehot_minus_(p, targets):
    """onehot(targets) - p for probabilities p (n, vocab), overwriting p: d log p(t) / d z."""
    return p.neg_().scatter_add_(1, targets[:, None], torch.ones_like(p[:, :1]))
