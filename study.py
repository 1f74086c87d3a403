"""
The study in one command: 2 tasks x 3 regimes x 2 methods = 12 conditions, each trained, scored and costed.

    python study.py                                # all 12: the full study (3 seeds) on a CUDA GPU, the reduced preset elsewhere
    python study.py --seeds 3                      # each condition 3 times (seeds 11711, 11712, 11713)
    python study.py --tasks paraphrase --regimes sft,sft_dpo --methods lora
    python study.py --model gpt2-medium            # the same study at another size
    python study.py --jobs 4                       # up to 4 runs at once, each a train_sft.py / train_dpo.py process
    python study.py --smoke                        # a tiny random GPT-2 on data/samples: minutes on a CPU

Regimes: sft = SFT only (train_sft.py, from GPT-2); dpo = DPO only (train_dpo.py, from GPT-2); sft_dpo = DPO
starting from the final weights (last/) of the SFT-only run of the same task, method and seed (that run is its
SFT stage: trained once, used twice). Methods: fft = full fine-tuning; lora = LoRA adapters on a frozen GPT-2.

Every run is one call of train_sft.train or train_dpo.train (--jobs N: one process each), in its own folder
out_dir/<task>-<regime>-<method>-seed<S>/, which keeps one copy of the weights, last/ (--keep_checkpoints also
keeps best/ and checkpoint.pt). A run whose results.json is there is not run again, and one that was
interrupted resumes from its checkpoint.pt, so a study started again goes on where it stopped. Several
machines can share one out_dir, each running a subset (--tasks, --methods, --seeds/--first_seed); a last
`python study.py --report_only` with the whole selection then reads every run and writes the table.
The study reads every run back, prints one table and writes it to out_dir/study.md and out_dir/study.json:

    score          the FINAL epoch's dev accuracy (paraphrase, the course's metric) or chrF (sonnets: mean over
                   --sample_seeds sampling seeds of the final weights), mean +- standard deviation over seeds:
                   every condition gets the same fixed budget, with no selection on the dev set
    95% CI         percentile bootstrap resampling the training seeds (2 or more), the sampling seeds (sonnets)
                   and the dev examples (paraphrase: the dev pairs; sonnets: the held-out sonnets)
    best epoch     the best dev epoch's score, as the course reports it (chosen on the dev set: optimistic)
    vs SFT FFT     the paired difference from SFT-only FFT (same dev examples, seeds and sampling seeds), its
                   95% bootstrap interval and p-value (one seed, paraphrase: McNemar's exact test on per-pair
                   correctness), Holm-corrected over the table's comparisons
    cost           train_seconds, tokens_per_second, peak_memory_bytes (SFT->DPO: both stages), trainable_parameters
"""

import argparse
import ctypes
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import train_dpo
import train_orpo
import train_sft
from checkpoint import load_model
from data.quora import read_quora
from data.sonnets import read_sonnets
from data.tasks import QUORA, SONNETS
from data.tokenizer import get_tokenizer
from eval import check_device, chrf, evaluate_sonnets
from fileio import InputError, atomic_open, read_text, writable_dir, write_json
from model import GPT, PRETRAINED, GPTConfig, default_device
from stats import holm, paired_difference, smallest_detectable, t_test

# -----------------------------------------------------------------------------
# The 12 conditions: each one's training run, in train_sft.SETTINGS / train_dpo.SETTINGS names. Everything
# not named is the training scripts' default: batches of 8 (the course's), AdamW, 5% warm-up then cosine
# decay, dropout 0.1 in SFT and 0 in DPO. The study reports every run's final epoch. LoRA: rank 8, alpha 16, on
# every Linear layer of the blocks, at Hu et al. (2021)'s GPT-2 learning rate. sft_dpo rows are the DPO stage;
# it starts from the sft row's final weights. Every stage of a task trains equally long (paraphrase: 3 passes
# over the ~283k training pairs, a third of the course starter's 10 and a third of its cost; sonnets: the
# course's 10).
CONDITIONS = {
    # task           regime      method     epochs     learning rate  LoRA                      DPO
    ("paraphrase", "sft",     "fft"):  dict(epochs=3,  lr=1e-5),
    ("paraphrase", "sft",     "lora"): dict(epochs=3,  lr=2e-4,       lora_r=8, lora_alpha=16.0),
    ("paraphrase", "dpo",     "fft"):  dict(epochs=3,  lr=1e-5,                                 beta=0.1),
    ("paraphrase", "dpo",     "lora"): dict(epochs=3,  lr=2e-4,       lora_r=8, lora_alpha=16.0, beta=0.1),
    ("paraphrase", "sft_dpo", "fft"):  dict(epochs=3,  lr=1e-5,                                 beta=0.1),
    ("paraphrase", "sft_dpo", "lora"): dict(epochs=3,  lr=2e-4,       lora_r=8, lora_alpha=16.0, beta=0.1),
    ("sonnet",     "sft",     "fft"):  dict(epochs=10, lr=1e-5),
    ("sonnet",     "sft",     "lora"): dict(epochs=10, lr=2e-4,       lora_r=8, lora_alpha=16.0),
    ("sonnet",     "dpo",     "fft"):  dict(epochs=10, lr=1e-5,                                 beta=0.1),
    ("sonnet",     "dpo",     "lora"): dict(epochs=10, lr=2e-4,       lora_r=8, lora_alpha=16.0, beta=0.1),
    ("sonnet",     "sft_dpo", "fft"):  dict(epochs=10, lr=1e-5,                                 beta=0.1),
    ("sonnet",     "sft_dpo", "lora"): dict(epochs=10, lr=2e-4,       lora_r=8, lora_alpha=16.0, beta=0.1),
    # beyond the paper (--regimes all): SFT and preference in one stage, from GPT-2. rpo: DPO + alpha * the
    # chosen answer's NLL (Pang et al. 2024's alpha = 1); orpo: NLL + lambda * odds ratio, no reference model
    # (Hong et al. 2024's lambda = 0.1; train_orpo.py)
    ("paraphrase", "rpo",     "fft"):  dict(epochs=3,  lr=1e-5,                                 beta=0.1, rpo_alpha=1.0),
    ("paraphrase", "rpo",     "lora"): dict(epochs=3,  lr=2e-4,       lora_r=8, lora_alpha=16.0, beta=0.1, rpo_alpha=1.0),
    ("paraphrase", "orpo",    "fft"):  dict(epochs=3,  lr=1e-5,                                 orpo_lambda=0.1),
    ("paraphrase", "orpo",    "lora"): dict(epochs=3,  lr=2e-4,       lora_r=8, lora_alpha=16.0, orpo_lambda=0.1),
    ("sonnet",     "rpo",     "fft"):  dict(epochs=10, lr=1e-5,                                 beta=0.1, rpo_alpha=1.0),
    ("sonnet",     "rpo",     "lora"): dict(epochs=10, lr=2e-4,       lora_r=8, lora_alpha=16.0, beta=0.1, rpo_alpha=1.0),
    ("sonnet",     "orpo",    "fft"):  dict(epochs=10, lr=1e-5,                                 orpo_lambda=0.1),
    ("sonnet",     "orpo",    "lora"): dict(epochs=10, lr=2e-4,       lora_r=8, lora_alpha=16.0, orpo_lambda=0.1),
}
TASKS, REGIMES, METHODS = ("paraphrase", "sonnet"), ("sft", "dpo", "sft_dpo"), ("fft", "lora")  # the paper's 12
ALL_REGIMES = (*REGIMES, "rpo", "orpo")  # --regimes all: 20 conditions
TRAINERS = {"sft": train_sft, "dpo": train_dpo, "sft_dpo": train_dpo, "rpo": train_dpo, "orpo": train_orpo}
FIRST_SEED = 11711  # the course's; --seeds N uses 11711, 11712, ..., 11711 + N - 1
GPU_SEEDS = 3  # --seeds' default on a CUDA GPU: a verdict about methods needs more than one model each

# What a preset changes on top of the table, per task (the same for all 6 of a task's conditions).
# --preset auto: full with a CUDA GPU, reduced otherwise. reduced is sized to finish in about an hour on a
# 4-core laptop CPU (an estimate): its steps, scoring and sampling, each timed at GPT-2 124M's shape on a 2-core
# machine, add up to 104 min there (89 paraphrase, 15 sonnets); a scaled-down run of the whole study took 20%
# longer than the same sum (loading, saving), so ~2 h on 2 cores, and 1 -> 2 threads ran 1.86x faster.
# smoke: all of data/samples (40 training and 30 dev pairs; 10 training and 4 dev sonnets) at a learning rate
# a tiny random model moves at in a few steps; paraphrase 2 epochs, so that the final and the best epoch differ.
PRESETS = {
    "full": {"paraphrase": {}, "sonnet": {}},
    "reduced": {"paraphrase": dict(train_limit=2000, dev_limit=1000, epochs=1),
                "sonnet": dict(train_limit=48, epochs=1)},
    "smoke": {"paraphrase": dict(epochs=2, lr=1e-3), "sonnet": dict(epochs=1, lr=1e-3, max_new_tokens=24)},
}
BOOTSTRAP_RESAMPLES = 1000
SAMPLE_SEED_STRIDE = 1000  # a run's sampling seeds: its own seed (the one training scored with), +1000, +2000, ...
ROOT = Path(__file__).resolve().parent
SMOKE_DATA = ROOT / "data" / "samples"  # the course-format samples --smoke trains on
SMOKE_MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=256)  # 256 positions: a whole sonnet fits
NAMES = {"paraphrase": "paraphrase", "sonnet": "sonnets", "sft": "SFT-only", "dpo": "DPO-only",
         "sft_dpo": "SFT→DPO", "rpo": "RPO", "orpo": "ORPO", "fft": "FFT", "lora": "LoRA"}


# -----------------------------------------------------------------------------
# the command line, checked before any work


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every script here reports bad input
        sys.exit(f"error: {message} (python study.py --help lists the flags)")


def parse_args(argv=None):
    parser = Parser(description=__doc__.strip().split("\n")[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated subset of "
                        + ", ".join(ALL_REGIMES) + ", or all (the default is the paper's three)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--seeds", type=int, default=None, help=f"runs per condition, seeds --first_seed, "
                        f"--first_seed + 1, ... (default {GPU_SEEDS} on a CUDA GPU, 1 elsewhere and with --smoke)")
    parser.add_argument("--first_seed", type=int, default=FIRST_SEED, help="the first seed (another machine's "
                                                                           "share of the seeds: --seeds 1 --first_seed 11713)")
    parser.add_argument("--sample_seeds", type=int, default=3, help="sonnets: score each run's final weights with "
                                                                    "this many sampling seeds")
    parser.add_argument("--model", default=None, help="the GPT-2 to start from: a name (gpt2 ... gpt2-xl) or a "
                                                       "model directory (default gpt2)")
    parser.add_argument("--data_dir", default=None, help="the course's files (default data/; --smoke: data/samples/)")
    parser.add_argument("--out_dir", default=None, help="default out/study[-<model>][-<preset>]")
    parser.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                        help="auto: full on a CUDA GPU, reduced otherwise (see PRESETS)")
    parser.add_argument("--smoke", action="store_true", help="the smoke preset: a tiny random GPT-2 (2 layers, 64 "
                                                             "wide) on data/samples/, a few steps, no download")
    parser.add_argument("--jobs", type=int, default=1, help="train up to N runs at once, each a train_sft.py / "
                                                            "train_dpo.py process (1: one after the other, in this process)")
    parser.add_argument("--lora_rslora", action="store_true", help="every LoRA condition scales by alpha/sqrt(r) "
                        "(rsLoRA, Kalajdzievski 2023) instead of alpha/r; give the study its own --out_dir")
    parser.add_argument("--lora_plus_ratio", type=float, default=1.0, help="every LoRA condition trains B at this "
                        "times A's learning rate (LoRA+, Hayou et al. 2024 suggest 16); give the study its own --out_dir")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep each run's best/ and checkpoint.pt "
                                                                        "too (default: only last/)")
    parser.add_argument("--report_only", action="store_true", help="train nothing: read the finished runs of the "
                                                                   "selection and write the table")
    return parser.parse_args(argv)


def pick(value, valid, flag):
    chosen = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in valid]
    if unknown or not chosen:
        raise InputError(f"{flag} {value!r}: {'unknown ' + ', '.join(unknown) if unknown else 'names nothing'}; "
                         f"valid: {', '.join(valid)} (comma-separated)")
    return [name for name in valid if name in chosen]  # the table's order


def check_counts(args):
    for flag, value in (("--seeds", args.seeds), ("--sample_seeds", args.sample_seeds), ("--jobs", args.jobs)):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value}: must be at least 1")
    if args.first_seed < 0:
        raise InputError(f"--first_seed {args.first_seed}: must be 0 or more")
    if not 0 < args.lora_plus_ratio < float("inf"):
        raise InputError(f"--lora_plus_ratio {args.lora_plus_ratio}: must be a positive number such as 16 (1 = plain LoRA)")


def check_model(args, preset):
    if preset == "smoke" and args.model is not None:
        raise InputError(f"--model {args.model}: --smoke trains its own tiny random GPT-2; leave --model out")
    model = args.model or "gpt2"
    if preset != "smoke" and model.removeprefix("openai-community/") not in PRETRAINED and not Path(model).is_dir():
        raise InputError(f"--model {model!r}: neither a GPT-2 name ({', '.join(PRETRAINED)}) nor a directory")
    return model


def check_args(args):
    """Every flag, the output folder, then the data and the finished runs, checked before anything is written
    or trained. Returns the study's plan."""
    regimes = ",".join(ALL_REGIMES) if args.regimes.strip() == "all" else args.regimes
    tasks, regimes = pick(args.tasks, TASKS, "--tasks"), pick(regimes, ALL_REGIMES, "--regimes")
    methods = pick(args.methods, METHODS, "--methods")
    check_counts(args)
    device = check_device(args.device)
    if args.smoke and args.preset not in ("auto", "smoke"):
        raise InputError(f"--smoke with --preset {args.preset}: --smoke is --preset smoke; give one of them")
    preset = "smoke" if args.smoke else args.preset
    if preset == "auto":
        preset = "full" if device.startswith("cuda") else "reduced"
    model = check_model(args, preset)
    name = Path(model).name if Path(model).is_dir() else model.removeprefix("openai-community/")
    out_dir = Path(args.out_dir or "out/study" + ("" if name == "gpt2" else f"-{name}")
                   + ("" if preset == "full" else f"-{preset}"))
    writable_dir(out_dir, "--out_dir")  # every output path is checked before any data is read
    n_seeds = args.seeds or (GPU_SEEDS if device.startswith("cuda") and preset != "smoke" else 1)
    plan = dict(tasks=tasks, regimes=regimes, methods=methods, device=device, preset=preset, out_dir=out_dir,
                seeds=[args.first_seed + k for k in range(n_seeds)], sample_seeds=args.sample_seeds,
                model=str(out_dir / "tiny-gpt2") if preset == "smoke" else model, jobs=args.jobs,
                data_dir=Path(args.data_dir) if args.data_dir else SMOKE_DATA if preset == "smoke" else Path("data"),
                keep_checkpoints=args.keep_checkpoints, report_only=args.report_only,
                lora={k: v for k, v in (("lora_rslora", args.lora_rslora), ("lora_plus_ratio", args.lora_plus_ratio))
                      if v != train_sft.SETTINGS[k][0]})
    get_tokenizer()  # its BPE files: a one-line error now if tiktoken can neither find nor download them
    plan["dev"] = {task: read_dev(plan, task) for task in tasks}  # every needed file read (and checked) now
    check_runs(plan)
    return plan


def read_dev(plan, task):
    """What every run of `task` is scored against: the Quora dev labels, or the held-out sonnets (prompts) and
    {number: true sonnet}. Reads (and so checks) all of the task's files, with the preset's limits, before
    anything is trained."""
    limits, data_dir = PRESETS[plan["preset"]][task], plan["data_dir"]
    if task == "paraphrase":
        read_quora(data_dir / QUORA["train"], limit=limits.get("train_limit"))
        dev = read_quora(data_dir / QUORA["dev"], limit=limits.get("dev_limit"))
        if any(p.label is None for p in dev):
            raise InputError(f"{data_dir / QUORA['dev']}: the Quora dev file needs the is_duplicate column")
        return [p.label for p in dev]
    read_sonnets(data_dir / SONNETS["train"], limit=limits.get("train_limit"))
    held_out = read_sonnets(data_dir / SONNETS["dev"])
    references = {s.number: s for s in read_sonnets(data_dir / SONNETS["dev_true"])}
    missing = [s.number for s in held_out if s.number not in references]
    if missing:
        raise InputError(f"{data_dir / SONNETS['dev_true']}: no true sonnet for held-out sonnet(s) {missing}")
    return {"held_out": held_out, "references": [references[s.number] for s in held_out]}


# -----------------------------------------------------------------------------
# the runs


def run_dir(plan, task, regime, method, seed):
    return plan["out_dir"] / f"{task}-{regime}-{method}-seed{seed}"


def run_config(plan, task, regime, method, seed):
    """What train_sft.train / train_dpo.train get for one run: the table's row, the preset, and the study's flags.
    One copy of the weights per run (last/, the final epoch's: what the study reports and SFT->DPO starts from)."""
    config = {**CONDITIONS[(task, regime, method)], **PRESETS[plan["preset"]][task], "task": task, "seed": seed,
              "init_from": plan["model"], "data_dir": str(plan["data_dir"]), "device": plan["device"],
              "out_dir": str(run_dir(plan, task, regime, method, seed)), "resume": True,
              "save_best": plan["keep_checkpoints"], "keep_checkpoints": plan["keep_checkpoints"]}
    if regime != "sft":  # one cache for the study: DPO-only FFT and LoRA share reference log-probs and samples
        config["cache_dir"] = str(plan["out_dir"] / "cache")
    if regime == "sft_dpo":
        config["init_from"] = str(run_dir(plan, task, "sft", method, seed) / "last")
    if method == "lora":  # --lora_rslora, --lora_plus_ratio: a fairer LoRA, only where they differ from plain LoRA
        config.update(plan.get("lora", {}))
    return config


def runs(plan):
    """(trainer, config) of every run the selected conditions need, in order: seed by seed (so an interrupted
    study has whole seeds done), and an SFT->DPO run after the SFT run it starts from, even if sft is not
    selected."""
    planned = []
    for seed in plan["seeds"]:
        for task in plan["tasks"]:
            for regime in plan["regimes"]:
                for method in plan["methods"]:
                    if regime == "sft_dpo":
                        planned.append((train_sft, run_config(plan, task, "sft", method, seed)))
                    planned.append((TRAINERS[regime], run_config(plan, task, regime, method, seed)))
    unique = {config["out_dir"]: (trainer, config) for trainer, config in planned}
    return list(unique.values())


def finished(config):
    """The run's results.json as a dict if it has finished, else None."""
    path = Path(config["out_dir"]) / "results.json"
    return read_json(path) if path.exists() else None


def read_json(path):
    try:
        return json.loads(read_text(path))
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e}); delete its folder to run it again") from None


# settings that do not change what a run trains: a finished run is reused whatever they were
NOT_COMPARED = ("data_dir", "out_dir", "device", "resume", "cache_dir", "save_best", "keep_checkpoints")


def start_name(path):
    """init_from as compared between studies: a GPT-2 name or model folder by its name, an SFT run's weights as
    <run>/last (a study folder may have moved)."""
    path = Path(str(path))
    return f"{path.parent.name}/{path.name}" if path.name in ("last", "best") else path.name


def check_same_settings(results, config):
    """A finished run is reused only if it was trained as this study would train it, under the results.json
    contract the table reads (score = the final epoch's, best_score = the best epoch's)."""
    if "best_score" not in results:
        raise InputError(f"{config['out_dir']}/results.json: written by an older train_sft/train_dpo, whose score is "
                         f"the best epoch's, not the final one's; delete {config['out_dir']} to train it again")
    saved = results.get("config", {})
    for key in [k for k in config if k not in NOT_COMPARED]:
        mine, theirs = config[key], saved.get(key)
        if key == "init_from":
            mine, theirs = start_name(mine), start_name(theirs)
        if mine != theirs:
            raise InputError(f"{config['out_dir']}/results.json: that run was trained with {key}={saved.get(key)!r}, "
                             f"this study asks for {key}={config[key]!r}; use another --out_dir, or delete "
                             f"{config['out_dir']} to train it again")


def check_runs(plan):
    """Finished runs trained with other settings are an error now, not in an hour; with --report_only, so is a
    run that has not finished."""
    missing = []
    for _, config in runs(plan):
        done = finished(config)
        if done is not None:
            check_same_settings(done, config)
        else:
            missing.append(Path(config["out_dir"]).name)
    if plan["report_only"] and missing:
        raise InputError(f"--report_only: {len(missing)} run(s) of the selection have not finished in "
                         f"{plan['out_dir']}: {', '.join(missing)}; train them (the same command without "
                         f"--report_only) or narrow --tasks/--regimes/--methods/--seeds")


# -----------------------------------------------------------------------------
# training: one run after the other in this process (--jobs 1), or up to N processes at once


def make_smoke_model(plan):
    """--smoke: the tiny random GPT-2 every run starts from, inside out_dir."""
    model_dir = Path(plan["model"])
    if not (model_dir / "model.safetensors").exists():
        torch.manual_seed(0)
        GPT(GPTConfig(**SMOKE_MODEL)).save_pretrained(model_dir)


def run_all(plan):
    """Train every run that has not finished; returns {out_dir: results}."""
    if plan["preset"] == "smoke":
        make_smoke_model(plan)
    if plan["jobs"] > 1:
        return run_in_processes(plan, runs(plan), plan["jobs"])
    planned, results = runs(plan), {}
    for i, (trainer, config) in enumerate(planned, 1):
        what = f"[{i}/{len(planned)}] {Path(config['out_dir']).name}"
        done = finished(config)
        if done is not None:
            print(f"{what}: done already ({config['out_dir']}/results.json)")
            results[config["out_dir"]] = done
            continue
        print(f"{what}: {trainer.__name__}.train from {config['init_from']}", flush=True)
        results[config["out_dir"]] = trainer.train(dict(config))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the finished run's cached blocks back
    return results


def command(trainer, config):
    """The run as a command line: every setting a flag (--name value; booleans true/false; None left out)."""
    flags = []
    for name, value in config.items():
        if value is not None:
            flags += [f"--{name}", ("true" if value else "false") if isinstance(value, bool) else str(value)]
    return [sys.executable, str(ROOT / f"{trainer.__name__}.py"), *flags]


def gpus(device):
    """The GPUs --jobs spreads runs over: with --device cuda every visible one, else none (the CPU, MPS, or
    one named GPU, which the processes then share)."""
    if device != "cuda":
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [g.strip() for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]


def child_environment(jobs, gpu):
    """Each process's share of the machine: one GPU (round-robin), and max(1, cores // jobs) CPU threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = str(max(1, cores // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def die_with_parent():
    """In the child, before it runs: Linux sends it SIGTERM if the study process dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start(trainer, config, env):
    """The run as a process in its own process group, its stdout and stderr appended to <run>/train.log."""
    out_dir = Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "train.log", "a") as log:
        return subprocess.Popen(command(trainer, config), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=die_with_parent if sys.platform == "linux" else None)


def interrupt(signum, frame):
    raise KeyboardInterrupt  # a kill (SIGTERM) stops the study as Ctrl-C does


@contextmanager
def children_stopped(running):
    """On the way out (finished, Ctrl-C, kill, an error) every process still running is stopped, with
    everything it started: SIGTERM to its process group, SIGKILL after 10 seconds."""
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in running:
            with_group(proc, signal.SIGTERM)
        deadline = time.time() + 10
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                with_group(proc, signal.SIGKILL)
                proc.wait()


def with_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def ready(waiting, running, failed, free):
    """Up to `free` waiting runs that can start now: an SFT->DPO run only once its SFT run has finished. A run
    whose SFT run failed moves to `failed`."""
    busy = {config["out_dir"] for _, config in waiting} | {config["out_dir"] for _, config in running.values()}
    chosen = []
    for trainer, config in list(waiting):
        needs = str(Path(config["init_from"]).parent)
        if needs in failed:
            waiting.remove((trainer, config))
            failed.append(config["out_dir"])
        elif needs not in busy - {config["out_dir"]} and len(chosen) < free:
            waiting.remove((trainer, config))
            chosen.append((trainer, config))
    return chosen


def run_in_processes(plan, planned, jobs):
    """--jobs N: up to N runs at once, each `python train_sft.py ...` / `python train_dpo.py ...` with the same
    settings as in-process; one line per finished run. Returns {out_dir: results}."""
    results = {c["out_dir"]: done for _, c in planned if (done := finished(c)) is not None}
    waiting = [(t, c) for t, c in planned if c["out_dir"] not in results]
    running, failed, devices, total, count = {}, [], gpus(plan["device"]), len(waiting), 0
    print(f"{len(results)} run(s) done already; training {total}, up to {jobs} at a time "
          f"({'GPUs ' + ','.join(devices) if devices else plan['device']}); each logs to <run>/train.log", flush=True)
    with children_stopped(running):
        while waiting or running:
            for trainer, config in ready(waiting, running, failed, jobs - len(running)):
                load = {gpu: sum(g == gpu for g, _ in running.values()) for gpu in devices}
                gpu = min(devices, key=load.get) if devices else None  # the least busy GPU
                running[start(trainer, config, child_environment(jobs, gpu))] = (gpu, config)
            proc = next(iter(p for p in running if p.poll() is not None), None)
            if proc is None:
                time.sleep(0.2)
                continue
            _, config = running.pop(proc)
            done, count = finished(config) if proc.returncode == 0 else None, count + 1
            if done is None:
                failed.append(config["out_dir"])
            else:
                results[config["out_dir"]] = done
            print(finished_line(config, done, proc.returncode, count, total), flush=True)
    if failed:
        raise InputError(f"{len(failed)} run(s) failed or could not start: {', '.join(Path(f).name for f in failed)}; "
                         f"see each one's train.log, then run the same command again")
    return results


def finished_line(config, results, returncode, count, total):
    name, log = Path(config["out_dir"]).name, Path(config["out_dir"]) / "train.log"
    if results is None:
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        return f"[{count}/{total}] {name}: FAILED (exit code {returncode}): {lines[-1] if lines else ''} ({log})"
    return (f"[{count}/{total}] {name}: {results['score_name']} {results['score']:.4f} (final epoch), "
            f"{results['train_seconds']:.1f} s training ({log})")


# -----------------------------------------------------------------------------
# sonnets: each run's final weights, sampled with several seeds


def sample_seeds(plan, seed):
    """A run's sampling seeds: its own seed first (the one training scored with), then +1000, +2000, ..."""
    return [seed + SAMPLE_SEED_STRIDE * k for k in range(plan["sample_seeds"])]


def sampled_sonnets(plan, out_dir):
    """[[text of each held-out dev sonnet] per sampling seed], written by the run's final weights (last/) with
    eval.evaluate_sonnets and the run's own generation settings. Cached in <run>/study_sonnets.json under a hash
    of its results.json, so a run trained again is sampled again; only missing seeds are sampled."""
    out_dir = Path(out_dir)
    finished_bytes = (out_dir / "results.json").read_bytes()
    config = json.loads(finished_bytes)["config"]
    settings = {k: config[k] for k in ("temperature", "top_p", "max_new_tokens", "eval_batch_size")}
    made_for = hashlib.sha256(finished_bytes).hexdigest()[:16]
    path = out_dir / "study_sonnets.json"
    cached = read_json(path) if path.exists() else {}
    texts = cached["sonnets"] if (cached.get("made_for"), cached.get("settings")) == (made_for, settings) else {}
    seeds = sample_seeds(plan, config["seed"])
    missing = [seed for seed in seeds if str(seed) not in texts]
    if missing:
        texts.update(sample(plan, out_dir / "last", settings, missing))
        write_json(path, {"made_for": made_for, "settings": settings, "sonnets": texts})
    numbers = [s.number for s in plan["dev"]["sonnet"]["held_out"]]
    if any([number for number, _ in texts[str(seed)]] != numbers for seed in seeds):
        raise InputError(f"{path}: not the held-out dev sonnets {numbers}; delete it to sample them again")
    return [[text for _, text in texts[str(seed)]] for seed in seeds]


def sample(plan, weights, settings, seeds):
    """{str(seed): [(number, text), ...]}: the held-out sonnets continued by the model in `weights`."""
    dev = plan["dev"]["sonnet"]
    print(f"{weights.parent.name}: sampling the {len(dev['held_out'])} dev sonnets from {weights.name}/ with seed(s) "
          f"{', '.join(map(str, seeds))}", flush=True)
    model = load_model(weights).to(plan["device"])
    return {str(seed): evaluate_sonnets(model, dev["held_out"], dev["references"], device=plan["device"], seed=seed,
                                        temperature=settings["temperature"], top_p=settings["top_p"],
                                        max_new_tokens=settings["max_new_tokens"],
                                        batch_size=settings["eval_batch_size"])["sonnets"] for seed in seeds}


# -----------------------------------------------------------------------------
# statistics: the seed is the unit of replication (stats.py); one seed compares two trained models, not methods


def run_items(plan, task, out_dir):
    """A run's final-epoch dev outcomes, [per sampling seed][per dev example]: paraphrase one row (scoring is
    deterministic) of per-pair correctness under the course's metric, from dev_predictions.json; sonnets the
    texts sampled from last/."""
    if task == "sonnet":
        return sampled_sonnets(plan, out_dir)
    path = Path(out_dir) / "dev_predictions.json"
    if not path.exists():
        raise InputError(f"{path}: missing; delete {path.parent} to train that run again")
    correct = read_json(path).get("correct")
    if correct is None or len(correct) != len(plan["dev"]["paraphrase"]):
        raise InputError(f"{path}: needs 'correct', one 0/1 per dev pair ({len(plan['dev']['paraphrase'])}); was it "
                         f"trained with another dev_limit or an older train_sft.py? Delete {path.parent} to train it again")
    return [np.asarray(correct, dtype=np.float64)]


def score_of(task, outcomes, references, samples, examples):
    """One run's dev score on the given examples (indices, repeats allowed), averaged over the given sampling
    seeds; outcomes[sample][example]. Accuracy is the mean per-pair correctness, chrF the corpus chrF of the
    chosen sonnets against their references."""
    if task == "paraphrase":
        return float(np.mean([outcomes[k][examples].mean() for k in samples]))
    return float(np.mean([chrf([outcomes[k][i] for i in examples], [references[i] for i in examples])
                          for k in samples]))


def seed_scores(task, items, references):
    """[per training seed] the score on the whole dev set, averaged over sampling seeds (items[seed][sample][example])."""
    return [score_of(task, outcomes, references, range(len(outcomes)), np.arange(len(outcomes[0])))
            for outcomes in items]


def bootstrap(statistic, n_samples, n_examples, n_resamples=BOOTSTRAP_RESAMPLES, seed=0):
    """One seed: statistic(samples, examples) on n_resamples draws of n_examples dev examples and n_samples
    sampling seeds, with replacement. Examples are drawn first, so with one sampling seed the draws are
    stats.bootstrap_ci's; every call makes the same draws, so a difference of two runs is paired."""
    rng = np.random.default_rng(seed)
    examples = rng.integers(0, n_examples, size=(n_resamples, n_examples))
    samples = rng.integers(0, n_samples, size=(n_resamples, n_samples))
    return np.array([statistic(k, e) for k, e in zip(samples, examples)])


def interval(values):
    """The 95% percentile interval of bootstrap values (numpy's linear interpolation, as stats.bootstrap_ci)."""
    low, high = np.quantile(values, [0.025, 0.975])
    return [float(low), float(high)]


def score_interval(task, items, references):
    """A condition's 95% interval: across seeds, the t interval of the per-seed scores (S - 1 degrees of freedom);
    with one seed, a bootstrap over the run's dev examples and sampling seeds."""
    if len(items) > 1:
        return t_test(seed_scores(task, items, references))["ci95"]
    outcomes = items[0]
    return interval(bootstrap(lambda k, e: score_of(task, outcomes, references, k, e), len(outcomes), len(outcomes[0])))


def versus_baseline(task, items, baseline, references):
    """The condition's score minus another's (`baseline`) on the same dev examples, seed by seed (sonnets: each
    the mean over sampling seeds): the per-seed differences, their mean, and with S >= 2 seeds the paired t-test's
    95% interval and p-value (S - 1 degrees of freedom). One seed is two trained models: the interval is a paired
    bootstrap over dev examples (and sampling seeds), p_value is None (no verdict about methods), and paraphrase
    adds McNemar's exact test of the two models under "mcnemar"."""
    differences = [a - b for a, b in zip(seed_scores(task, items, references), seed_scores(task, baseline, references))]
    result = {**t_test(differences), "per_seed": differences,
              "test": f"paired t-test over {len(items)} seeds ({len(items) - 1} degrees of freedom)"}
    if len(items) == 1:
        mine, theirs = items[0], baseline[0]

        def difference(samples, examples):
            return score_of(task, mine, references, samples, examples) - score_of(task, theirs, references, samples, examples)

        result.update(ci95=interval(bootstrap(difference, len(mine), len(mine[0]))),
                      test="one seed: two trained models, no test of the methods")
        if task == "paraphrase":
            result["mcnemar"] = {**paired_difference(mine[0].astype(int).tolist(), theirs[0].astype(int).tolist()),
                                 "test": "McNemar's exact test of these two trained models (not of the methods)"}
    return result


def questions(regimes, methods):
    """The paper's questions as (question, condition a, condition b), each condition (regime, method): is LoRA as
    good as FFT within each regime; does SFT->DPO add to SFT-only, and does DPO-only match it, within each method."""
    asked = [(f"LoRA vs FFT, {NAMES[r]}", (r, "lora"), (r, "fft")) for r in regimes if {"fft", "lora"} <= set(methods)]
    for regime in ("sft_dpo", "dpo"):
        asked += [(f"{NAMES[regime]} vs SFT-only, {NAMES[m]}", (regime, m), ("sft", m)) for m in methods
                  if {regime, "sft"} <= set(regimes)]
    return asked


def contrasts(plan, items):
    """Every question of every task, paired by seed, with Holm's correction over the task's family (those with a
    p-value: none with one seed), and for each the smallest difference the design could have detected: 80% power
    at Holm's first threshold 0.05 / m, from the observed spread of the per-seed differences."""
    found = []
    for task in plan["tasks"]:
        family = [{"task": task, "question": question, "a": f"{NAMES[a[0]]} {NAMES[a[1]]}",
                   "b": f"{NAMES[b[0]]} {NAMES[b[1]]}",
                   **versus_baseline(task, items[(task, *a)], items[(task, *b)], references_of(plan, task))}
                  for question, a, b in questions(plan["regimes"], plan["methods"])]
        tested = [c for c in family if c["p_value"] is not None]
        for c, adjusted in zip(tested, holm([c["p_value"] for c in tested])):
            spread = float(np.std(c["per_seed"], ddof=1))
            c.update(p_holm=adjusted, told_apart=adjusted < 0.05, comparisons=len(tested),
                     smallest_detectable=smallest_detectable(spread, len(c["per_seed"]), 0.05 / len(tested)))
        found += family
    return found


# -----------------------------------------------------------------------------
# the table's rows: means over seeds, intervals, paired differences


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def references_of(plan, task):
    return [s.text for s in plan["dev"]["sonnet"]["references"]] if task == "sonnet" else None


def condition_row(plan, results, task, regime, method):
    """One row of the table from the condition's runs over seeds, read back from their folders; and the runs'
    dev outcomes (items[seed][sample][example]) for the paired comparisons."""
    seeds, references = plan["seeds"], references_of(plan, task)
    stages = [[results[str(run_dir(plan, task, r, method, s))] for r in (["sft", "sft_dpo"] if regime == "sft_dpo" else [regime])]
              for s in seeds]
    own = [runs_of_seed[-1] for runs_of_seed in stages]  # the condition's own run (SFT->DPO: its DPO stage)
    items = [run_items(plan, task, run_dir(plan, task, regime, method, s)) for s in seeds]
    examples = np.arange(len(items[0][0]))
    per_sample = [[score_of(task, outcomes, references, [k], examples) for k in range(len(outcomes))]
                  for outcomes in items]  # [seed][sampling seed]
    scores = [statistics.fmean(values) for values in per_sample]
    score, std = mean_std(scores)
    row = {"task": task, "regime": regime, "method": method, "score_name": own[0]["score_name"], "score": score,
           "score_std": std, "scores": scores, "run_scores": [r["score"] for r in own],
           "ci95": score_interval(task, items, references), "best_score": statistics.fmean(r["best_score"] for r in own),
           "best_scores": [r["best_score"] for r in own], "best_epochs": [r["best_epoch"] for r in own],
           "epochs": len(own[0]["history"]),
           "metrics": {k: statistics.fmean(r["metrics"][k] for r in own) for k in own[0]["metrics"]},
           **costs(stages), "reference": reference_pass(own[0]), "trainable_parameters": own[0]["trainable_parameters"],
           "total_parameters": own[0]["total_parameters"], "seeds": seeds, "device": own[0]["device"],
           "runs": [str(run_dir(plan, task, regime, method, s)) for s in seeds],
           # per seed, epoch by epoch; SFT->DPO's DPO stage continues after its SFT stage's epochs
           "history": [[{**h, "epoch": h["epoch"] + (len(st[0]["history"]) if i else 0)}
                        for i, r in enumerate(st) for h in r["history"]] for st in stages]}
    if task == "paraphrase":
        row["f1"], row["f1_std"] = mean_std([r["metrics"]["f1"] for r in own])
    else:
        row["sample_seeds"] = [sample_seeds(plan, s) for s in seeds]
        row["sampled_scores"] = per_sample
    if "rejections" in own[0]:
        row["rejections"] = [r["rejections"] for r in own]
    return row, items


def costs(stages):
    """Means over seeds of each seed's cost; SFT->DPO's include its SFT stage, its peak memory the larger one."""
    return {"train_seconds": statistics.fmean(sum(r["train_seconds"] for r in st) for st in stages),
            "tokens_per_second": statistics.fmean(sum(r["real_tokens"] for r in st) / max(sum(r["train_seconds"] for r in st), 1e-9)
                                                  for st in stages),
            "peak_memory_bytes": max(r["peak_memory_bytes"] for st in stages for r in st)}


def table_rows(plan, results):
    """Every selected condition's row, each with its paired difference from its task's SFT-only FFT when that is
    among the results (a description: the verdicts are the paper's questions, contrasts()); and the contrasts."""
    rows, items = [], {}
    for task in plan["tasks"]:
        for regime in plan["regimes"]:
            for method in plan["methods"]:
                row, items[(task, regime, method)] = condition_row(plan, results, task, regime, method)
                rows.append(row)
    for row in rows:
        task, baseline = row["task"], (row["task"], "sft", "fft")
        if (row["regime"], row["method"]) == ("sft", "fft") or not all(
                str(run_dir(plan, *baseline, s)) in results for s in plan["seeds"]):
            continue
        if baseline not in items:
            items[baseline] = [run_items(plan, task, run_dir(plan, *baseline, s)) for s in plan["seeds"]]
        row["vs_sft_fft"] = versus_baseline(task, items[(task, row["regime"], row["method"])], items[baseline],
                                            references_of(plan, task))
    return rows, contrasts(plan, items)


def label(row):
    return f"{NAMES[row['task']]} {NAMES[row['regime']]} {NAMES[row['method']]}"


def answer(c):
    """One contrast in words: told apart or not, the per-seed differences, and what "not" could have seen."""
    signed = ", ".join(fmt_score(c["task"], d, "+") for d in c["per_seed"])
    if c["told_apart"]:
        return (f"{c['question']}: told apart, {fmt_score(c['task'], c['difference'], '+')} "
                f"(per seed {signed}; Holm p={c['p_holm']:.2g})")
    return (f"{c['question']}: not told apart (per seed {signed}; this design detects a difference of "
            f"{fmt_score(c['task'], c['smallest_detectable'])} or more with 80% power)")


def verdict(contrasts, plan):
    """The paper's questions answered in words, task by task; with one seed, why there is no answer."""
    if not contrasts:
        return ("No paired differences: the paper's questions compare LoRA with FFT in a regime, or SFT->DPO and DPO-only with "
                "SFT-only in a method, and no such pair of conditions is among the selected ones.")
    if len(plan["seeds"]) == 1:
        return (f"One seed per condition: each row is one trained model, so no method is told apart from another; "
                f"comparing methods needs --seeds 2 or more ({GPU_SEEDS} by default on a GPU). McNemar's exact test "
                f"of each pair of trained models is in study.json (\"mcnemar\").")
    sentences = []
    for task in dict.fromkeys(c["task"] for c in contrasts):
        family = [c for c in contrasts if c["task"] == task]
        sentences.append(f"{NAMES[task].capitalize()}, {len(plan['seeds'])} seeds, paired t-tests with Holm's "
                         f"correction over {len(family)} questions: " + "; ".join(map(answer, family)) + ".")
    return " ".join(sentences)


# -----------------------------------------------------------------------------
# writing it out


def fmt_score(task, value, sign=""):
    return f"{value:{sign}.4f}" if task == "paraphrase" else f"{value:{sign}.2f}"


def table_cells(row):
    task, metrics = row["task"], row["metrics"]
    score = fmt_score(task, row["score"]) + (f" ± {fmt_score(task, row['score_std'])}" if row["score_std"] is not None else "")
    epochs = ",".join(map(str, row["best_epochs"]))
    yes_no = f"{metrics['yes_no_accuracy']:.4f}, {metrics['yes_no_share']:.2f}" if task == "paraphrase" else "—"
    return [task, row["regime"], row["method"], f"{row['score_name']} {score}",
            f"[{fmt_score(task, row['ci95'][0])}, {fmt_score(task, row['ci95'][1])}]",
            f"{fmt_score(task, row['best_score'])} (epoch {epochs} of {row['epochs']})", yes_no,
            f"{row['train_seconds']:.1f}", row["reference"], f"{row['tokens_per_second']:,.0f}",
            f"{row['peak_memory_bytes'] / 2 ** 20:,.0f} MiB", f"{row['trainable_parameters']:,}", str(len(row["seeds"]))]


def contrast_cells(c):
    task = c["task"]
    ci = f" [{fmt_score(task, c['ci95'][0], '+')}, {fmt_score(task, c['ci95'][1], '+')}]"
    if c["p_value"] is None:
        mcnemar = c.get("mcnemar")
        said = f"two trained models: McNemar p={mcnemar['p_value']:.2g}" if mcnemar else "two trained models: no test"
        return [c["question"], task, fmt_score(task, c["difference"], "+"), fmt_score(task, c["difference"], "+") + ci,
                "—", "—", said]
    said = "told apart" if c["told_apart"] else f"not told apart (detects ≥ {fmt_score(task, c['smallest_detectable'])})"
    return [c["question"], task, ", ".join(fmt_score(task, d, "+") for d in c["per_seed"]),
            fmt_score(task, c["difference"], "+") + ci, f"{c['p_value']:.2g}", f"{c['p_holm']:.2g}", said]


def reference_pass(results):
    """What the run paid for a reference model: SFT, ORPO and SimPO have none; DPO and RPO compute its
    log-probabilities once before training (or, with --live_reference, at every step)."""
    return {"precomputed": "once", "live": "every step"}.get(results.get("reference", "none"), "none")


HEADER = ["task", "regime", "method", "score, final epoch (mean ± std)", "95% CI",
          "best dev epoch (as the course reports it; sonnets: 1 sampling seed)", "yes/no accuracy, share",
          "train_seconds", "reference pass", "tokens_per_second", "peak_memory", "trainable_parameters", "seeds"]
CONTRAST_HEADER = ["question (a − b)", "task", "per-seed differences", "mean [95% CI]", "p", "Holm p", "verdict"]


def markdown_table(header, lines):
    cells = [header] + lines
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    text.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(text)


LEGEND = """How to read the tables. score: the FINAL epoch's dev score (paraphrase: the course's accuracy; sonnets:
chrF, the mean over the sampling seeds), mean ± std over training seeds. 95% CI: with 2 or more seeds the t interval
of the per-seed scores (S − 1 degrees of freedom: the seed is the unit of replication); with one seed a bootstrap
over the dev examples (and sampling seeds), which describes one trained model. best dev epoch: chosen on the dev
set, as the course reports it, so optimistic. yes/no accuracy, share (paraphrase): the restricted answer
logit("yes") > logit("no") against the label, and the share of whole-vocabulary argmax answers that are "yes" or
"no" at all; the course's accuracy needs both. Contrasts: the paper's questions, a − b paired by seed, the paired
t-test (S − 1 degrees of freedom) and Holm's correction over each task's questions; "detects ≥" is the smallest
difference this design finds with 80% power (per-seed spread as observed, at Holm's first threshold). Costs:
means over seeds (peak memory: the largest); SFT→DPO's include its SFT stage."""


def describe_preset(plan):
    preset = plan["preset"]
    if preset == "full":
        return "full study: every training pair and sonnet, every dev pair, the epochs of the table in study.py"
    parts = []
    for task in plan["tasks"]:
        s = PRESETS[preset][task]
        unit = "pairs" if task == "paraphrase" else "sonnets"
        what = [f"the first {s['train_limit']:,} training {unit}" if "train_limit" in s else f"all training {unit}"]
        if task == "paraphrase":
            what.append(f"the first {s['dev_limit']:,} dev pairs" if "dev_limit" in s else "every dev pair")
        if "epochs" in s:
            what.append(f"{s['epochs']} epoch{'s' if s['epochs'] > 1 else ''} per stage")
        if "lr" in s:
            what.append(f"learning rate {s['lr']:g} in every condition")
        if "max_new_tokens" in s:
            what.append(f"at most {s['max_new_tokens']} generated tokens")
        parts.append(f"{NAMES[task]}: {', '.join(what)}")
    kind = {"reduced": "REDUCED preset (the default without a CUDA GPU; --preset full runs the whole study)",
            "smoke": "SMOKE test: a tiny random 2-layer GPT-2 on data/samples, so the scores mean nothing"}[preset]
    return f"{kind}; {'; '.join(parts)}"


def plot(rows, out_dir):
    """A PNG per task: dev score and training loss per epoch, each condition's mean over seeds (SFT->DPO: its
    SFT stage, then its DPO stage). Returns the file names, or None without matplotlib (an optional extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    files = []
    for task in dict.fromkeys(row["task"] for row in rows):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for row in [r for r in rows if r["task"] == task]:
            histories = row["history"]  # per seed
            epochs = [h["epoch"] for h in histories[0]]
            style = dict(marker="o", linestyle="--" if row["method"] == "lora" else "-",
                         label=f"{NAMES[row['regime']]} {NAMES[row['method']]}")
            for axis, key in ((left, "score"), (right, "train_loss")):
                axis.plot(epochs, [statistics.fmean(h[i][key] for h in histories) for i in range(len(epochs))], **style)
        left.set(xlabel="epoch", ylabel="dev accuracy" if task == "paraphrase" else "dev chrF",
                 title=f"{NAMES[task]}: dev score")
        right.set(xlabel="epoch", ylabel="training loss (SFT: cross-entropy, DPO: DPO loss)",
                  title=f"{NAMES[task]}: training loss (last batch of each epoch)")
        for axis in (left, right):
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        left.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"study-{task}.png"
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def write_study(plan, rows, contrasts, plots):
    title = (f"# The study: {Path(plan['model']).name if plan['preset'] == 'smoke' else plan['model']}, "
             f"{len(rows)} conditions x {len(plan['seeds'])} seed(s) on {rows[0]['device'] if rows else plan['device']}")
    sentence = verdict(contrasts, plan)
    if plots is None:
        pictures = ("Plots: `pip install matplotlib`, then run the same command again: nothing is retrained, and "
                    "study-<task>.png (dev score and training loss per epoch) are drawn from the runs' histories.")
    else:
        pictures = "\n".join(f"![{name}]({name})" for name in plots)
    tables = [markdown_table(HEADER, [table_cells(row) for row in rows])]
    if contrasts:
        tables.append(markdown_table(CONTRAST_HEADER, [contrast_cells(c) for c in contrasts]))
    markdown = "\n\n".join([title, describe_preset(plan), *tables, sentence, LEGEND, pictures]) + "\n"
    with atomic_open(plan["out_dir"] / "study.md") as f:
        f.write(markdown)
    summary = [{k: v for k, v in row.items() if k != "history"} for row in rows]
    write_json(plan["out_dir"] / "study.json", {
        "model": plan["model"], "preset": plan["preset"], "preset_description": describe_preset(plan),
        "preset_settings": {task: PRESETS[plan["preset"]][task] for task in plan["tasks"]},
        "conditions": {f"{t}-{r}-{m}": CONDITIONS[(t, r, m)] for t, r, m in CONDITIONS if t in plan["tasks"]
                       and r in plan["regimes"] and m in plan["methods"]},
        "seeds": plan["seeds"], "sample_seeds": plan["sample_seeds"], "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "multiple_comparisons": "Holm", "verdict": sentence, "legend": LEGEND, "plots": plots, "rows": summary,
        "contrasts": contrasts})
    return markdown


def study(plan):
    results = run_all(plan) if not plan["report_only"] else {c["out_dir"]: finished(c) for _, c in runs(plan)}
    rows, contrasts = table_rows(plan, results)
    markdown = write_study(plan, rows, contrasts, plot(rows, plan["out_dir"]))
    print("\n" + markdown.split("\n\n" + LEGEND)[0])
    print(f"\nwritten: {plan['out_dir'] / 'study.md'} and {plan['out_dir'] / 'study.json'}")
    return rows


def main(argv=None):
    args = parse_args(argv)
    try:
        return study(check_args(args))
    except InputError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: every run stopped; run the same command again to go on where the study stopped")


if __name__ == "__main__":
    main()
