"""
What evaluation costs: loading, paraphrase scoring and sonnet generation, timed on this machine.

    python bench_inference.py                   # GPT-2 124M's shape, on the best device here
    python bench_inference.py --size gpt2-medium --device cuda

The weights are random (nothing to download; the cost of a forward pass does not depend on the values) and
the prompts are random tokens of the tasks' real lengths (paraphrase prompts: 29-67 tokens, mean 46, on the
course's dev sample; sonnet prompts: 32-37). The KV cache's speed-up is measured side by side in one run,
on the same prompts, and both runs must produce the same tokens.
"""

import argparse
import tempfile
import time

import torch

from data.batching import left_pad
from eval import answers_yes
from model import GPT, PRETRAINED, GPTConfig, default_device


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def random_prompts(n, low, high, generator):
    lengths = torch.randint(low, high + 1, (n,), generator=generator).tolist()
    return [torch.randint(0, 50257, (n_tokens,), generator=generator).tolist() for n_tokens in lengths]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(PRETRAINED), default="gpt2")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--pairs", type=int, default=256, help="paraphrase prompts to score")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as directory:
        GPT(GPTConfig(**PRETRAINED[args.size])).save_pretrained(directory)
        model, load_s = timed(lambda: GPT.from_pretrained(directory).to(args.device).eval(), args.device)
    rows = [("load (from_pretrained, random weights)", f"{load_s:.2f} s")]

    pairs = random_prompts(args.pairs, 29, 67, generator)
    answers_yes(model, pairs[:args.batch_size], args.batch_size, args.device)  # warm-up
    _, score_s = timed(lambda: answers_yes(model, pairs, args.batch_size, args.device), args.device)
    rows.append(("paraphrase scoring", f"{args.pairs / score_s:.0f} pairs/s "
                 f"(the 40,429 dev pairs: {40429 / (args.pairs / score_s) / 60:.1f} min)"))

    input_ids, attention_mask = left_pad(random_prompts(12, 32, 37, generator))
    input_ids, attention_mask = input_ids.to(args.device), attention_mask.to(args.device)
    outputs, seconds = {}, {}
    for use_cache in (True, False):
        outputs[use_cache], seconds[use_cache] = timed(lambda use_cache=use_cache: model.generate(
            input_ids, args.new_tokens, temperature=1.2, top_p=0.9, attention_mask=attention_mask, eos_token_id=None,
            use_cache=use_cache, generator=torch.Generator(device=args.device).manual_seed(0)), args.device)
    assert torch.equal(outputs[True], outputs[False]), "the KV cache changed the generated tokens"
    rows.append((f"12 sonnets x {args.new_tokens} new tokens, KV cache", f"{seconds[True]:.2f} s"))
    rows.append((f"12 sonnets x {args.new_tokens} new tokens, no cache", f"{seconds[False]:.2f} s"))
    rows.append(("KV cache speed-up (same tokens)", f"{seconds[False] / seconds[True]:.1f}x"))

    print(f"{args.size} ({model.num_parameters() / 1e6:.0f}M parameters) on {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for name, value in rows:
        print(f"  {name:<45} {value}")


if __name__ == "__main__":
    main()
