"""
Examples into padded tensors.

An Example is a prompt (tokens the model reads) and a target (tokens the model is trained to write).
A batch lays each example out as prompt + target, right-padded to the longest one:

    input_ids       [ p p p p t t | pad pad ]
    attention_mask  [ 1 1 1 1 1 1 |  0   0  ]
    loss_mask       [ 0 0 0 0 1 1 |  0   0  ]    1 exactly on target tokens

GPT-2 pads with its end-of-text token, which is also a real token (a sonnet target ends with it), so the
masks are built from positions and lengths, never by comparing token ids with the pad id.
The logits at position t predict the token at t + 1, so a loss uses logits[:, :-1] against
input_ids[:, 1:] weighted by loss_mask[:, 1:].
"""

import random
from dataclasses import dataclass

import torch

from data import check_count
from data.tokenizer import END_OF_TEXT

VOCAB_SIZE = END_OF_TEXT + 1  # GPT-2's 50257 tokens: end-of-text is the last one


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    target: list[int]

    def __len__(self):
        return len(self.prompt) + len(self.target)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long: 1 = real token, 0 = padding
    loss_mask: torch.Tensor  # (B, T) long: 1 = a target token
    lengths: torch.Tensor  # (B,) long: real tokens per row; lengths - 1 is each row's last real position

    def to(self, device):
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask, self.lengths)))


def collate(examples, pad_id=END_OF_TEXT, max_len=1024, vocab_size=VOCAB_SIZE):
    """Right-pad a list of Examples into a Batch (every token id checked to be in [0, vocab_size))."""
    if not examples:
        raise ValueError("collate needs at least one example")
    for i, ex in enumerate(examples):
        if len(ex) == 0 or len(ex) > max_len:
            raise ValueError(f"example {i} has {len(ex)} tokens; each needs 1 to max_len={max_len}")
    lengths = torch.tensor([len(ex) for ex in examples])
    target_starts = torch.tensor([len(ex.prompt) for ex in examples])
    position = torch.arange(lengths.max())
    input_ids = torch.full((len(examples), len(position)), pad_id)
    for i, ex in enumerate(examples):
        input_ids[i, :len(ex)] = torch.tensor(ex.prompt + ex.target)
    # checked here, on the CPU, so that the model's forward pass never stops to ask the GPU (an id out of range
    # would fail there as a device assert)
    outside = (input_ids < 0) | (input_ids >= vocab_size)
    if outside.any():
        raise ValueError(f"token id {input_ids[outside][0].item()} is outside the vocabulary: ids must be in "
                         f"[0, vocab_size={vocab_size})")
    attention_mask = (position < lengths[:, None]).long()
    loss_mask = attention_mask * (position >= target_starts[:, None])
    return Batch(input_ids, attention_mask, loss_mask, lengths)


def left_pad(prompts, pad_id=END_OF_TEXT, vocab_size=VOCAB_SIZE):
    """Left-pad token lists for batched generation: (input_ids, attention_mask), every row ending at column -1.
    That is the right-padded batch of the reversed prompts, flipped."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(f"left_pad needs one or more prompts, none empty; got {[len(p) for p in prompts]} tokens")
    batch = collate([Example(list(reversed(p)), []) for p in prompts], pad_id, max(map(len, prompts)), vocab_size)
    return batch.input_ids.flip(1), batch.attention_mask.flip(1)


def batch_indices(lengths, batch_size, shuffle=False, seed=0, pool_batches=50):
    """Split range(len(lengths)) into batches of similar length, so little compute goes to padding.

    Without shuffle: sorted by length, longest first (an out-of-memory error then shows up at once).
    With shuffle: shuffle (seeded), sort within pools of pool_batches * batch_size examples, cut into
    batches, and shuffle the batches, so batch order and composition still change from epoch to epoch.
    """
    check_count("batch_size", batch_size)
    check_count("pool_batches", pool_batches)
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: -lengths[i])
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    pool = pool_batches * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
