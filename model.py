"""
GPT-2 (Radford et al. 2019) in one file, after Karpathy's nanoGPT. It imports only torch: it runs copied alone.

    logits = model(input_ids, attention_mask=None)        # (B, T, vocab): a prediction at every position
    logits = model(input_ids, logits_at=pos)              # (B, K, vocab): only where a loss reads
    model = checkpoint.from_pretrained("gpt2")            # OpenAI's weights (checkpoint.py reads the hub's files)
    tokens = model.generate(prompt_ids, max_new_tokens=128, temperature=1.2, top_p=0.9)

attention_mask (B, T) marks real tokens 1 and padding 0: positions count real tokens only and nothing attends to
padding, so each row gets the logits it would get alone (training pads right; generation left, so prompts end level).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

END_OF_TEXT = 50256  # GPT-2's <|endoftext|>: generate's default end-of-sequence token


@dataclass
class GPTConfig:
    block_size: int = 1024  # the longest sequence, i.e. the number of learned positions
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # GPT-2 was pretrained with 0.1; fine-tuning often uses 0.0 or 0.1
    layer_norm_epsilon: float = 1e-5
    attention: str = "sdpa"  # "sdpa": PyTorch's fused kernel; "manual": the same equation written out, to step through

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"GPTConfig {name} must be a positive whole number, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"GPTConfig layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")
        if self.attention not in ("sdpa", "manual"):
            raise ValueError(f"GPTConfig attention must be 'sdpa' or 'manual', got {self.attention!r}")


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config  # shared by every layer: model.config.attention = "manual" switches them all
        self.layer_idx = layer_idx  # which slot of a KV cache this layer reads and writes
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, kv_cache=None):
        B, T, C = x.size()
        n_head = self.config.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, n_head, T, head_size): split into heads
        k = k.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, n_head, T, head_size)
        v = v.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, n_head, T, head_size)
        if kv_cache is not None:  # prepend the keys and values of the tokens already seen, and keep them all
            if kv_cache[self.layer_idx] is not None:
                k, v = (torch.cat([seen, new], dim=2) for seen, new in zip(kv_cache[self.layer_idx], (k, v)))
            kv_cache[self.layer_idx] = (k, v)  # (B, n_head, tokens seen, head_size) each
        # Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V        (Vaswani et al. 2017, eq. 1)
        # M is -inf on the future and on padding; attn_mask=None means causal only (PyTorch's fastest kernels)
        dropout_p = self.config.dropout if self.training else 0.0
        if self.config.attention == "manual":
            y = manual_attention(q, k, v, attn_mask, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                               dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


def manual_attention(q, k, v, attn_mask=None, dropout_p=0.0):
    """What scaled_dot_product_attention computes, fused. q: (B, n_head, T, head_size) for T new tokens; k, v:
    (B, n_head, S, head_size) for all S seen; attn_mask: (B, 1, T, S), True = may attend, or None: causal."""
    if attn_mask is None:  # causal: query t sees keys 0..t (None comes only without a cache, so S == T)
        attn_mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, n_head, T, S): Q K^T / sqrt(d_k)
    scores = scores.masked_fill(~attn_mask, float("-inf"))  # + M
    weights = F.dropout(F.softmax(scores, dim=-1), dropout_p)  # (B, n_head, T, S): each row sums to 1
    return weights @ v  # (B, n_head, T, head_size): a weighted mean of the values


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU; the exact erf form differs in the 4th decimal
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache)  # pre-LayerNorm residual blocks
        x = x + self.mlp(self.ln_2(x))
        return x


def attention_inputs(attention_mask, batch_size, seq_len, past_len, device):
    """Positions (B or 1, seq_len) and mask (B, 1, seq_len, past_len + seq_len), True = may attend, for seq_len
    new tokens after past_len cached ones. attention_mask (B, past_len + seq_len): 1 = real, 0 = padding, or
    None. The mask is None when plain causal attention is exact (no padding, no cache)."""
    if attention_mask is None:
        if past_len == 0:
            return torch.arange(seq_len, device=device).unsqueeze(0), None
        attention_mask = torch.ones(batch_size, past_len + seq_len, dtype=torch.long, device=device)
    if attention_mask.shape != (batch_size, past_len + seq_len):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                         f"{(batch_size, past_len + seq_len)} (cached + new tokens)")
    real = attention_mask.bool()
    # a token's position = how many real tokens precede it, so left padding does not shift positions
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
    query = torch.arange(past_len, past_len + seq_len, device=device).view(-1, 1)
    key = torch.arange(past_len + seq_len, device=device).view(1, -1)
    # causal, and no padding key; but a padding query would then see nothing (softmax of all -inf = NaN): it sees itself
    return positions, (key <= query) & (real[:, None, None, :] | (key == query))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one matrix embeds and un-embeds
        # GPT-2's initialisation, for training from scratch (checkpoint.from_pretrained skips it and loads every weight)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # scale residual projections by 1/sqrt(number of residual adds)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def num_parameters(self, trainable_only=False):
        """Parameters counted once each (the tied embedding too); trainable_only counts requires_grad ones."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def hidden_states(self, input_ids, attention_mask=None, kv_cache=None):
        """The final (post-LayerNorm) hidden state at every position: (B, T, n_embd). kv_cache ([None] * n_layer to
        start): each layer keeps its (keys, values) there, so a later call runs only the tokens not yet seen."""
        B, T = input_ids.size()  # token ids are checked where batches are built, on the CPU (data/batching.py)
        past_len = kv_cache[0][0].size(2) if kv_cache and kv_cache[0] is not None else 0
        if past_len + T > self.config.block_size:
            raise ValueError(f"sequence of {past_len + T} tokens is longer than block_size={self.config.block_size}")
        positions, attn_mask = attention_inputs(attention_mask, B, T, past_len, input_ids.device)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x, attn_mask, kv_cache)
        return self.transformer.ln_f(x)

    def forward(self, input_ids, attention_mask=None, logits_at=None, head=None):
        """Logits for the next token at every position: (B, T, vocab_size); with logits_at (B, K) long, only at those
        positions, (B, K, vocab_size), as the output layer is much of GPT-2's compute. head: a function (hidden
        states, output weight) -> result run instead of the output layer (chunked_logprobs passes one)."""
        h = self.hidden_states(input_ids, attention_mask)  # (B, T, n_embd)
        if logits_at is not None:
            h = h.gather(1, logits_at.unsqueeze(-1).expand(-1, -1, h.size(-1)))  # (B, K, n_embd)
        return self.lm_head(h) if head is None else head(h, self.lm_head.weight)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_p=1.0, attention_mask=None,
                 eos_token_id=END_OF_TEXT, use_cache=True, generator=None):
        """Continue each (B, T) prompt, left-padded under attention_mask, by up to max_new_tokens: (B, T + new).
        temperature=0 is greedy, else sample softmax(logits / temperature) in the top-p nucleus (a seeded generator
        reproduces it). A row that emits eos_token_id then emits only that; once every row has, generation stops."""
        B, T = input_ids.size()
        if type(max_new_tokens) is not int or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive whole number, got {max_new_tokens!r}")
        if not 0 <= temperature < math.inf:  # also refuses nan
            raise ValueError(f"temperature must be a finite number >= 0 (0 picks the most likely token), "
                             f"got {temperature!r}")
        if not 0 < top_p <= 1:  # also refuses nan
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {T} + {max_new_tokens} new tokens exceeds block_size={self.config.block_size}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif not attention_mask[:, -1].all():
            raise ValueError("generate() needs left-padded prompts: every row must end with a real token")
        kv_cache = [None] * self.config.n_layer if use_cache else None
        tokens, new_tokens = input_ids, input_ids
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            # with the cache, feed only what the model has not seen yet; without it, the whole sequence
            h = self.hidden_states(new_tokens if use_cache else tokens, attention_mask, kv_cache)
            logits = self.lm_head(h[:, -1, :])  # (B, vocab): only the last position predicts what comes next
            if temperature == 0:
                next_token = logits.argmax(dim=-1)
            else:
                probs = F.softmax(top_p_filter(logits / temperature, top_p), dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
            if eos_token_id is not None:
                next_token = torch.where(finished, eos_token_id, next_token)
                finished |= next_token == eos_token_id
            new_tokens = next_token.unsqueeze(1)
            tokens = torch.cat([tokens, new_tokens], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(new_tokens)], dim=1)
            if finished.all():
                break
        return tokens


def top_p_filter(logits, top_p):
    """Nucleus filtering (Holtzman et al. 2020): -inf for every logit outside the smallest set of most likely
    tokens whose probability adds up to at least top_p (never the most likely one)."""
    if top_p >= 1.0:
        return logits
    sorted_probs, sorted_idx = F.softmax(logits, dim=-1).sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the more likely tokens
    remove_sorted = mass_before >= top_p  # the nucleus is already full without this token
    remove_sorted[..., 0] = False  # however small top_p is, keep the most likely token
    return logits.masked_fill(remove_sorted.scatter(-1, sorted_idx, remove_sorted), float("-inf"))  # vocab order


PRETRAINED = {  # OpenAI's four sizes (vocab_size=50257, block_size=1024 for all)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
