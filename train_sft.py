"""
Supervised fine-tuning (SFT) of GPT-2 on one of the two tasks, by full fine-tuning (FFT) or LoRA.

    python train_sft.py --task paraphrase                                # FFT of gpt2, the course's settings
    python train_sft.py --task sonnet --lora_r 8 --lora_alpha 16         # LoRA: only A and B train
    python train_sft.py --task paraphrase --checkpoint_every 500 --resume   # resumable; run again to continue
    torchrun --nproc_per_node 4 train_sft.py --task paraphrase           # several GPUs (DistributedDataParallel)

SFT maximises the likelihood of the target tokens given the prompt: with N target tokens in a batch,

    L_SFT = -(1/N) * sum over target tokens t of log p_theta(x_t | x_<t)

Paraphrase: the target is "yes" or "no" after the course's prompt. Sonnets: the whole sonnet and end-of-text.
Prompt and padding tokens are never in the loss (the batch's loss_mask). The loop is trainer.py's.
"""

import torch
import torch.nn.functional as F

import flags
import trainer
from chunked_logprobs import chunked_head
from data.batching import VOCAB_SIZE, batch_indices, collate
from data.quora import paraphrase_example
from data.sonnets import continuation_examples, sonnet_example
from data.tasks import load_task_data
from eval import answer_tokens, check_task_lengths, eval_mode, evaluate_paraphrase, evaluate_sonnets

SETTINGS = trainer.SETTINGS  # SFT adds none of its own
CHUNKED_ABOVE = 2**26  # --logprobs auto: chunked above 256 MiB of float32 logits (a 16-sonnet DPO batch has 5x)


# -----------------------------------------------------------------------------
# the loss


def sequence_logprobs(logits, input_ids, loss_mask):
    """log p(target tokens | what precedes them), summed per sequence: (B,) float32. logits (B, T, V); input_ids,
    loss_mask (B, T). Position t's logits predict token t + 1; loss_mask is 1 on target tokens, 0 elsewhere."""
    logps = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V): float32 even under bf16 autocast
    token_logps = logps.gather(2, input_ids[:, 1:].unsqueeze(2)).squeeze(2)  # (B, T-1): log p(the next token)
    return (token_logps * loss_mask[:, 1:]).sum(-1)  # (B,): prompt and padding count 0


def target_window(batch):
    """(positions, input_ids, loss_mask), each (B, W): the stretch of each row a loss reads, from the position
    before its first target token to its last. A paraphrase row's is 2 wide (the last prompt token and the
    answer), so the output layer runs on 2 positions, not ~50."""
    B, T = batch.input_ids.shape
    first = batch.loss_mask.float().argmax(1)  # (B,) the first target token of each row
    start = (first - 1).clamp(min=0)  # the position that predicts it (a sonnet's first token has none)
    width = int((batch.lengths - start).max())
    positions = start[:, None] + torch.arange(width, device=start.device)[None, :]  # (B, W)
    inside = positions < batch.lengths[:, None]  # past a row's end: padding
    positions = positions.clamp(max=T - 1)
    input_ids = batch.input_ids.gather(1, positions)
    loss_mask = batch.loss_mask.gather(1, positions) * inside
    return positions, input_ids, loss_mask


def batch_logprobs(model, batch, device=None, path="auto"):
    """sequence_logprobs of each row of a right-padded batch (no attention mask: causal attention never looks
    right, where the padding is), the output layer run only on the target window. path "plain": logits, then
    sequence_logprobs; "chunked": chunked_logprobs, which never holds the window's logits; "auto": chunked only
    when those would be large. The batch may stay on the CPU; what the model reads moves to `device`."""
    device = device or next(model.parameters()).device
    positions, input_ids, loss_mask = (t.to(device) for t in target_window(batch))
    if path == "auto":
        path = "chunked" if positions.numel() * VOCAB_SIZE > CHUNKED_ABOVE else "plain"
    if path == "plain":
        return sequence_logprobs(model(batch.input_ids.to(device), logits_at=positions), input_ids, loss_mask)
    head = chunked_head(input_ids.roll(-1, dims=1))  # position w predicts w + 1; the last, wrapped, is dropped
    logps = model(batch.input_ids.to(device), logits_at=positions, head=head)  # (B, W)
    return (logps[:, :-1] * loss_mask[:, 1:]).sum(-1)


def sft_loss(model, batch, normalizer=None, path="auto"):
    """(loss, number of target tokens): the targets' summed cross-entropy over `normalizer` (default: their count).
    fit passes the whole batch's count, so every target token weighs the same however the batch is split."""
    n_targets = int(batch.loss_mask[:, 1:].sum())
    return -batch_logprobs(model, batch, path=path).sum() / (normalizer or n_targets), n_targets


def predicted_targets(example):
    """How many target tokens the loss reads: all but a first token with no prompt (nothing predicts it)."""
    return len(example.target) - (len(example.prompt) == 0)


# -----------------------------------------------------------------------------
# the dev score


@torch.no_grad()
def mean_token_nll(model, examples, batch_size, device):
    """-log p(target) per target token over `examples` (in eval mode): the dev loss."""
    total, n = 0.0, 0
    with eval_mode(model):
        for idx in batch_indices([len(e) for e in examples], batch_size):
            batch = collate([examples[i] for i in idx])
            total -= batch_logprobs(model, batch, device).sum().item()
            n += int(batch.loss_mask[:, 1:].sum())
    return total / n


def evaluate(model, task, dev, config, device):
    """eval.py's dev figures, and per-example lists for dev_predictions.json. 'score' is the course's accuracy or
    chrF; 'selection', what best/ is chosen by, is accuracy or, for sonnets, minus the dev loss: chrF of a dozen
    sampled sonnets moves by about a point with the sampling seed alone, so choosing by it would choose noise."""
    if task == "paraphrase":  # accuracy and f1 are the course's (whole-vocabulary argmax); see eval.py
        result = evaluate_paraphrase(model, dev, config["eval_batch_size"], device)
        correct = [int(t == a) for t, a in zip(result["predicted_tokens"], answer_tokens([p.label for p in dev]))]
        return {"score": result["accuracy"], "selection": result["accuracy"], **result, "correct": correct}
    held_out, references = dev
    result = evaluate_sonnets(model, held_out, references, device=device, temperature=config["temperature"],
                              top_p=config["top_p"], max_new_tokens=config["max_new_tokens"], seed=config["seed"],
                              batch_size=config["eval_batch_size"])
    numbers = {s.number for s in held_out}
    dev_loss = mean_token_nll(model, continuation_examples([s for s in references if s.number in numbers]),
                              config["eval_batch_size"], device)
    return {"score": result["chrf"], "selection": -dev_loss, "chrf": result["chrf"], "dev_loss": dev_loss,
            "sonnets": result["sonnets"]}


# -----------------------------------------------------------------------------
# training


def train(config):
    """Run SFT as `config` (a dict of SETTINGS) says; returns what it writes to out_dir/results.json."""
    config = trainer.check_config(config, SETTINGS, prefix="sft")
    records, dev = load_task_data(config)  # before the model: a missing file fails in a second
    examples = [paraphrase_example(r) if config["task"] == "paraphrase" else sonnet_example(r) for r in records]
    check_task_lengths(config, examples, dev)  # before the model (and before out_dir is made), too
    run = trainer.start(config)
    model = trainer.load_policy(config).to(run.device)

    def loss_fn(model, micro_batch, batch):
        n_targets = sum(predicted_targets(examples[i]) for i in batch)
        return sft_loss(model, collate([examples[i] for i in micro_batch]), n_targets, config["logprobs"])[0], {}

    def dev_metrics(model):
        return evaluate(model, config["task"], dev, config, run.device)

    title = f"{config['task']} SFT ({trainer.describe(config)}) of {config['init_from']}"
    return trainer.fit(run, model, [len(e) for e in examples], loss_fn, dev_metrics, "sft", title)


def main(argv=None):
    flags.main(train, SETTINGS, __doc__, argv)


if __name__ == "__main__":
    main()
