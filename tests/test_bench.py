"""bench.py: every figure is written, finite, by a real (tiny) run; its counts against hand computation; bad
flags fail in one line before any work. Never a timed assertion: the figures themselves are not checked."""

import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

import bench
import flags
from conftest import ROOT, tiny_config
from data.batching import Example, collate
from data.sonnets import read_sonnets, split_prompt
from data.tokenizer import END_OF_TEXT, decode
from lora import apply_lora
from model import GPT
from train_sft import batch_logprobs, target_window
from trainer import configure_optimizer

SAMPLES = ROOT / "data" / "samples"  # the repository's own sample of the course's files
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--warmup", "0", "--steps", "1", "--score_pairs", "2",
        "--sonnet_rows", "1", "--new_tokens", "4", "--generate_runs", "1", "--sonnet_batch", "1", "--device", "cpu"]
SONNET_KEYS = {"sonnet_logprob_memory_ratio", "sonnet_step_time_ratio",
               *(f"sonnet_{kind}_{method}_{figure}" for kind in ("sft", "dpo") for method in ("fft", "lora")
                 for figure in ("step_s", "peak_memory_bytes"))}
KEYS = {"ours_over_hf_train_step", "lora_over_fft_step", "lora_over_fft_peak_mem", "dpo_live_over_sft_step",
        "dpo_precomputed_over_sft_step", "kv_cache_speedup", "ours_over_hf_generate", "padding_efficiency", "device",
        *SONNET_KEYS}
HF_KEYS = {"ours_over_hf_train_step", "ours_over_hf_generate"}


def parse_args(argv):
    """bench.py's flags as its main() settles them (--quick's values, --data_dir's files)."""
    return bench.settled(flags.parse(argv, bench.SETTINGS, bench.__doc__), argv)


def test_quick_run_writes_every_key_with_a_finite_value(tmp_path, capsys):
    """From the repository alone: the Quora batch and the sonnets come from data/samples."""
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    bench.main(["--quick", *TINY, "--out", str(out)])
    results = json.loads(out.read_text())
    assert set(results) == KEYS  # a CPU run: no mfu, no paraphrase_epoch_s
    for key in KEYS - {"device"}:
        assert isinstance(results[key], (int, float)) and math.isfinite(results[key]) and results[key] > 0, key
    assert all(isinstance(results[k], int) for k in SONNET_KEYS if k.endswith("_bytes"))
    assert 0 < results["padding_efficiency"] <= 1
    assert results["device"].startswith("cpu")
    printed = capsys.readouterr().out
    assert "peak resident memory" in printed  # says how CPU memory was measured
    assert f"from {SAMPLES / 'quora-train.csv'}" in printed and f"from {SAMPLES / 'sonnets.txt'}" in printed
    assert "sonnet DPO, FFT, plain log-probs" in printed and "n_layer=2" in printed  # --quick: a 2-layer model
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left behind


def test_without_transformers_it_says_so_in_one_line_and_skips_those_ratios(tmp_path, capsys, monkeypatch):
    """--data_dir: the course's file names inside it."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    course = tmp_path / "course"
    course.mkdir()
    for name in ("quora-train.csv", "sonnets.txt"):
        shutil.copy(SAMPLES / name, course / name)
    out = tmp_path / "bench.json"
    bench.main([*TINY, "--data_dir", str(course), "--out", str(out)])
    results = json.loads(out.read_text())
    assert set(results) == KEYS - HF_KEYS
    assert all(math.isfinite(v) for k, v in results.items() if k != "device")
    printed = capsys.readouterr().out
    assert len([line for line in printed.splitlines() if "transformers is not installed" in line]) == 1
    assert f"from {course / 'quora-train.csv'}" in printed and f"from {course / 'sonnets.txt'}" in printed


def test_data_files_come_from_data_dir_unless_given():
    assert parse_args([])["quora"] == SAMPLES / "quora-train.csv"
    assert parse_args([])["sonnets"] == SAMPLES / "sonnets.txt"
    args = parse_args(["--data_dir", "d", "--quora", "q.csv"])
    assert str(args["quora"]) == "q.csv" and str(args["sonnets"]) == "d/sonnets.txt"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "error: --steps 0: must be at least 1"),
    (["--batch_size", "-1"], "error: --batch_size -1: must be at least 1"),
    (["--dtype", "float16"], "error: --dtype float16: must be auto, float32 or bfloat16"),
    (["--size", "gpt3"], "error: --size gpt3: must be gpt2, gpt2-medium, gpt2-large or gpt2-xl"),
    (["--steps", "many"], "error: argument --steps: invalid int value: 'many'"),
    (["--device", "tpu"], "error: --device 'tpu'"),
    (["--n_embd", "30", "--n_head", "4"], "error: --n_head/--n_embd: GPTConfig n_embd=30 is not divisible"),
    (["--lora_alpha", "nan"], "error: --lora_alpha nan: must be a positive number"),
    (["--new_tokens", "1000"], "error: --new_tokens 1000"),
    (["--quora", "no/such/file.csv"], "error: --quora no/such/file.csv: no such file"),
    (["--sonnets", "no/such/file.txt"], "error: --sonnets no/such/file.txt: no such file"),
    (["--data_dir", "no/such/dir"], "error: --data_dir no/such/dir: no such directory"),
    (["--sonnet_batch", "0"], "error: --sonnet_batch 0: must be at least 1"),
    (["--sonnet_layers", "-1"], "error: --sonnet_layers -1: must be 0 or more"),
    (["--threads", "-2"], "error: --threads -2: must be 0 or more"),
    (["--bogus"], "error: unrecognized arguments: --bogus"),
])
def test_bad_flags_fail_in_one_line_before_any_work(argv, message, tmp_path, monkeypatch):
    def no_work(args):
        raise AssertionError("run() started despite a bad flag")

    monkeypatch.setattr(bench, "run", no_work)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*argv, "--out", str(out)])
    assert str(exit_info.value.code).startswith(message)
    assert "\n" not in str(exit_info.value.code)
    assert not out.exists()


def test_out_that_is_a_directory_is_refused_before_any_data_is_looked_at(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("run() started"))
    with pytest.raises(SystemExit, match=r"error: --out .*: is a directory"):
        bench.main(["--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"error: --out .*: is a directory"):
        bench.main(["--data_dir", str(tmp_path / "missing"), "--out", str(tmp_path)])


@pytest.mark.parametrize("flag, text, message", [
    ("--quora", "id\tsentence1\tsentence2\n1\tIs it?\tIs it so?\n", "error: --quora .*needs labelled pairs"),
    ("--sonnets", "\n 1 \nOne\nTwo\nThree\nFour\n\n 2 \nOne\nTwo\nThree\n",
     "error: --sonnets .*: sonnet 2: a sonnet of 3 lines has nothing after its first 3"),
])
def test_unusable_data_is_an_error_before_any_model(flag, text, message, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "GPT", None)  # building a model would now fail otherwise
    path = tmp_path / "data"
    path.write_text(text)
    with pytest.raises(SystemExit, match=message):
        bench.main([*TINY, flag, str(path)])


def test_quick_fills_in_only_the_flags_not_given():
    args = parse_args(["--quick", "--steps", "5"])
    assert args["steps"] == 5 and args["warmup"] == bench.QUICK["warmup"]
    assert args["sonnet_rows"] == bench.QUICK["sonnet_rows"]
    assert parse_args(["--quick", "--sonnet-rows=4"])["sonnet_rows"] == 4  # either spelling, with =
    assert parse_args([])["steps"] == bench.SETTINGS["steps"][0]


# -----------------------------------------------------------------------------
# the counts that explain the figures, against hand computation


def test_padding_efficiency_by_hand():
    lengths = [2, 4, 3, 3]
    # batch [0, 1] computes 2 x 4 = 8 positions for 6 real tokens; batch [2, 3] 2 x 3 = 6 for 6
    assert bench.padding_efficiency(lengths, [[0, 1], [2, 3]]) == pytest.approx(12 / 14)
    assert bench.padding_efficiency(lengths, [[2, 3], [0], [1]]) == 1.0


def test_the_flops_count_n_as_the_blocks_linear_weights():
    model = GPT(tiny_config())
    linear_weights = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.")
                         and n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")))
    assert linear_weights == 12 * 2 * 64 ** 2
    assert bench.train_flops(model.config, [1], 0) == 6 * linear_weights + 12 * 2 * 64  # one token, no target


def test_train_flops_by_hand():
    config = tiny_config()  # L = 2, d = 64, V = 50257; N = 12 L d^2 = 98,304
    lengths, n_targets = [3, 5], 2
    attention = 12 * 2 * 64 * (9 + 25)
    head = 6 * 64 * 50257 * 2
    assert bench.train_flops(config, lengths, n_targets) == 6 * 98304 * 8 + attention + head
    assert bench.train_flops(config, lengths, n_targets, lora=True) == 4 * 98304 * 8 + attention + head


def test_state_bytes_count_gradients_and_adamw_state_for_trainable_weights_only():
    torch.manual_seed(0)
    examples = [Example([1, 2, 3], [4]), Example([5, 6], [7])]
    for lora in (False, True):
        model = GPT(tiny_config())
        if lora:
            apply_lora(model, r=2, alpha=4)
        optimizer = configure_optimizer(model, 1e-3, 0.0, "cpu")
        no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
        bench.train_step(model, optimizer, bench.sft_step_loss(examples, "cpu"), no_autocast, "cpu")
        step_s = bench.train_step(model, optimizer, bench.sft_step_loss(examples, "cpu"), no_autocast, "cpu",
                                  split=False)  # the whole step at once, as a GPU's step time is taken
        assert isinstance(step_s, float) and step_s > 0
        weights, grads, adam = bench.state_bytes(model, optimizer)
        trainable = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert weights == 4 * sum(p.numel() for p in model.parameters())
        assert grads == trainable and adam == 2 * trainable  # AdamW: two moments per trainable weight
        if lora:  # A and B only: 2 layers x 4 Linears x r (d_in + d_out)
            assert trainable == 4 * 2 * 2 * (64 + 192 + 64 + 64 + 64 + 256 + 256 + 64)


def test_saved_activations_exclude_weights_and_grow_with_the_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config()).train()
    small = [Example([1, 2, 3, 4], [5])] * 2
    big = small * 4
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    saved_small = bench.saved_activation_bytes(model, bench.sft_step_loss(small, "cpu"), no_autocast)
    saved_big = bench.saved_activation_bytes(model, bench.sft_step_loss(big, "cpu"), no_autocast)
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert 0 < saved_small < saved_big < weight_bytes  # the tied 50257 x 64 embedding alone is 12.9 MB


# -----------------------------------------------------------------------------
# the sonnet steps: their rows, and the plain log-probabilities they are compared with


def test_sonnet_rows_are_whole_sonnets_and_prompt_plus_rest_pairs():
    sonnets = read_sonnets(SAMPLES / "sonnets.txt")
    n = len(sonnets) + 2  # more than the file holds: it starts again from the first
    examples, pairs = bench.sonnet_training_rows(sonnets, n)
    assert len(examples) == len(pairs) == n
    for i, (example, pair) in enumerate(zip(examples, pairs)):
        sonnet, following = sonnets[i % len(sonnets)], sonnets[(i + 1) % len(sonnets)]
        assert example.prompt == [] and example.target[-1] == END_OF_TEXT  # SFT: every token a target
        assert decode(example.target[:-1]) == sonnet.text
        prompt, _ = split_prompt(sonnet.text)
        assert pair.chosen.prompt == pair.rejected.prompt and decode(pair.chosen.prompt) == prompt
        assert decode(pair.chosen.prompt + pair.chosen.target[:-1]) == sonnet.text  # chosen: the true rest
        assert decode(pair.rejected.target) == split_prompt(following.text)[1]  # rejected: the next one's
        assert pair.chosen.target[-1] == END_OF_TEXT  # the rejected rest ends where it was cut (no end-of-text)


def test_plain_logprobs_equal_the_chunked_and_cross_entropy_values_and_gradients():
    """The two paths bench compares (train_sft.batch_logprobs' plain and chunked): right-padded rows, every token
    a target (as a sonnet's) or only the last few (as DPO's answer)."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    rows = [Example([], [5, 6, 7, 8, 9, 10]), Example([11, 12, 13], [14, 15]), Example([16], [17, 18, 19])]
    batch = collate(rows)
    grads = []
    for path in ("plain", "chunked"):
        model.zero_grad()
        value = batch_logprobs(model, batch, path=path)
        value.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        for i, row in enumerate(rows):  # the oracle: cross-entropy of each target, predicted by what precedes it
            ids = torch.tensor([row.prompt + row.target])
            first = max(len(row.prompt), 1)
            with torch.no_grad():
                expected = -F.cross_entropy(model(ids)[0, first - 1:-1], ids[0, first:], reduction="sum")
            assert value[i].item() == pytest.approx(expected.item(), rel=1e-5)
    for plain, ours in zip(*grads):
        torch.testing.assert_close(plain, ours, rtol=1e-4, atol=1e-6)


def test_the_plain_log_probabilities_hold_the_whole_logits():
    """What the plain computation costs, counted: autograd keeps its (B, W-1, V) float32 log-softmax."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).train()
    batch = collate([Example([], list(range(1, 41)))] * 3)
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    saved = bench.saved_activation_bytes(model, lambda m: batch_logprobs(m, batch, path="plain").sum(), no_autocast)
    assert saved >= 3 * 39 * 50257 * 4


def test_peak_memory_of_the_sonnet_log_probabilities_is_measured_for_both():
    """Run here, not in a fresh process: the plain one's growth holds at least its window's float32 logits."""
    pairs = bench.sonnet_training_rows(read_sonnets(SAMPLES / "sonnets.txt"), 2)[1]
    args = parse_args(["--device", "cpu", "--dtype", "float32"])
    rows, width = target_window(collate([p.chosen for p in pairs] + [p.rejected for p in pairs]))[0].shape
    plain = bench.peak_memory_of_logprobs(tiny_config(block_size=256), pairs, args, "plain")
    chunked = bench.peak_memory_of_logprobs(tiny_config(block_size=256), pairs, args, "chunked")
    assert plain >= rows * (width - 1) * 50257 * 4 and chunked > 0


# -----------------------------------------------------------------------------
# the GPU's code paths, run on the CPU so they cannot rot unseen


def test_the_gpu_figures_run_on_the_cpu(capsys):
    """throughput() is what a GPU run adds (MFU and epoch seconds at a large batch), with bf16 autocast and fused
    AdamW, here on the CPU; measure_peak_flops too."""
    from data.quora import paraphrase_example, read_quora

    args = parse_args([*TINY, "--big_batch_size", "4", "--dtype", "bfloat16", "--peak_tflops", "1"])
    examples = [paraphrase_example(p) for p in read_quora(SAMPLES / "quora-train.csv")]
    config = bench.model_config(args)
    torch.manual_seed(0)
    model = GPT(config).train()
    fft = (model, configure_optimizer(model, 1e-5, 0.0, "cpu"))
    assert fft[1].defaults["fused"]  # the fused AdamW the GPU uses
    figures = bench.throughput(config, fft, examples, args)  # bf16 autocast: --dtype bfloat16
    assert set(figures) == {"mfu", "paraphrase_epoch_s"}
    assert all(math.isfinite(v) and v > 0 for v in figures.values())
    assert "MFU" in capsys.readouterr().out
    assert math.isfinite(bench.measure_peak_flops("cpu", n=64, repeats=2, dtype=torch.float32))


def test_a_compiled_step_runs_on_the_cpu():
    """--compile (torch.compile, as train_sft.py's) on a 1-layer model: the phases are timed, the weights move."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=1)).train()
    optimizer = configure_optimizer(model, 1e-3, 0.0, "cpu")
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    compiled = bench.wrap_model(model, {"compile": True}, 1)
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    phases = bench.train_step(compiled, optimizer, bench.sft_step_loss([Example([1, 2, 3], [4])] * 2, "cpu"),
                              no_autocast, "cpu")
    assert len(phases) == 3 and all(math.isfinite(t) and t >= 0 for t in phases)
    assert not torch.equal(before, model.transformer.h[0].mlp.c_fc.weight)
