"""
The study in one command: 2 tasks x 3 regimes x 2 methods = 12 conditions, each trained, scored and costed.

    python study.py                                # all 12: the full study on a CUDA GPU, the reduced preset elsewhere
    python study.py --seeds 3                      # each condition 3 times (seeds 11711, 11712, 11713)
    python study.py --tasks paraphrase --regimes sft,sft_dpo --methods lora
    python study.py --model gpt2-medium            # the same study at another size
    python study.py --smoke                        # a tiny random GPT-2 and a few dozen examples: minutes on a CPU

Regimes: sft = SFT only (train_sft.py, from GPT-2); dpo = DPO only (train_dpo.py, from GPT-2); sft_dpo = DPO
starting from the SFT-only run of the same task, method and seed (that run is its SFT stage: trained once,
used twice). Methods: fft = full fine-tuning; lora = LoRA adapters on a frozen GPT-2.

Every run is one call of train_sft.train or train_dpo.train, in its own folder
out_dir/<task>-<regime>-<method>-seed<S>/. A run whose results.json is there is not run again, and one that
was interrupted resumes from its checkpoint.pt, so a study started again goes on where it stopped. Then the
study reads every run back, prints one table and writes it to out_dir/study.md and out_dir/study.json:

    score        dev accuracy (paraphrase) or chrF (sonnets), mean +- standard deviation over seeds
    95% CI       percentile bootstrap over the dev examples of the seed-averaged score: paraphrase resamples
                 the dev pairs, sonnets the 12 held-out sonnets (recomputing corpus chrF each time)
    vs SFT FFT   the paired difference from SFT-only FFT on the same dev examples and seed: paraphrase with
                 McNemar's exact p-value, sonnets with a paired-bootstrap 95% interval
    cost         train_seconds, tokens_per_second, peak_memory_bytes (SFT->DPO: both stages), trainable_parameters
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

import train_dpo
import train_sft
from data.quora import read_quora
from data.tasks import QUORA, SONNETS
from data.sonnets import read_sonnets
from eval import accuracy, bootstrap_ci, check_device, chrf, paired_difference
from fileio import InputError, atomic_open, read_text, writable_dir, write_json
from model import GPT, PRETRAINED, GPTConfig, default_device

# -----------------------------------------------------------------------------
# The 12 conditions: each one's training run, in train_sft.SETTINGS / train_dpo.SETTINGS names. Everything
# not named is the training scripts' default: batches of 8 (the course's), AdamW, 5% warm-up then cosine
# decay, dropout 0.1 in SFT and 0 in DPO, the best dev epoch kept. LoRA: rank 8, alpha 16, on every Linear
# layer of the blocks, at Hu et al. (2021)'s GPT-2 learning rate. sft_dpo rows are the DPO stage; it starts
# from the sft row's run. Every stage of a task trains equally long (paraphrase: 3 passes over the ~283k
# training pairs, a third of the course starter's 10 and a third of its cost; sonnets: the course's 10).
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
}
TASKS, REGIMES, METHODS = ("paraphrase", "sonnet"), ("sft", "dpo", "sft_dpo"), ("fft", "lora")
FIRST_SEED = 11711  # the course's; --seeds N uses 11711, 11712, ..., 11711 + N - 1

# What a preset changes on top of the table, per task (the same for all 6 of a task's conditions).
# --preset auto: full with a CUDA GPU, reduced otherwise. reduced is sized to finish in about an hour on a
# 4-core laptop CPU (an estimate): its steps, scoring and sampling, each timed at GPT-2 124M's shape on a 2-core
# machine, add up to 104 min there (89 paraphrase, 15 sonnets); a scaled-down run of the whole study took 20%
# longer than the same sum (loading, saving), so ~2 h on 2 cores, and 1 -> 2 threads ran 1.86x faster.
PRESETS = {
    "full": {"paraphrase": {}, "sonnet": {}},
    "reduced": {"paraphrase": dict(train_limit=2000, dev_limit=1000, epochs=1),
                "sonnet": dict(train_limit=48, epochs=1)},
    "smoke": {"paraphrase": dict(train_limit=30, dev_limit=30, epochs=1),  # all of the 30-pair samples
              "sonnet": dict(train_limit=8, epochs=1, max_new_tokens=16)},
}
BOOTSTRAP_RESAMPLES = 1000
ROOT = Path(__file__).resolve().parent
SHARED_DATA = ROOT.parent / "shared" / "data"  # the course-format samples --smoke trains on
# --smoke: the course's file names, and the sample each is copied from (relative to SHARED_DATA)
SMOKE_FILES = {"quora-train.csv": "quora_samples/quora-train-30.csv", "quora-dev.csv": "quora_samples/quora-dev-30.csv",
               "sonnets.txt": "sonnets.txt", "sonnets_held_out_dev.txt": "sonnets_held_out_dev.txt",
               "TRUE_sonnets_held_out_dev.txt": "TRUE_sonnets_held_out_dev.txt"}
assert set(SMOKE_FILES) == {QUORA["train"], QUORA["dev"], SONNETS["train"], SONNETS["dev"], SONNETS["dev_true"]}
SMOKE_MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=256)  # 256 positions: a whole sonnet fits
NAMES = {"paraphrase": "paraphrase", "sonnet": "sonnets", "sft": "SFT-only", "dpo": "DPO-only",
         "sft_dpo": "SFT→DPO", "fft": "FFT", "lora": "LoRA"}


# -----------------------------------------------------------------------------
# the command line, checked before any work


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every script here reports bad input
        sys.exit(f"error: {message} (python study.py --help lists the flags)")


def parse_args(argv=None):
    parser = Parser(description=__doc__.strip().split("\n")[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated subset of " + ", ".join(REGIMES))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--seeds", type=int, default=1, help=f"runs per condition, seeds {FIRST_SEED}, {FIRST_SEED + 1}, ...")
    parser.add_argument("--model", default=None, help="the GPT-2 to start from: a name (gpt2 ... gpt2-xl) or a "
                                                       "model directory (default gpt2)")
    parser.add_argument("--data_dir", default=None, help="the course's files (default data/; --smoke: copies of "
                                                         "../shared/data's samples inside out_dir)")
    parser.add_argument("--out_dir", default=None, help="default out/study[-<model>][-<preset>]")
    parser.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                        help="auto: full on a CUDA GPU, reduced otherwise (see PRESETS)")
    parser.add_argument("--smoke", action="store_true", help="the smoke preset: a tiny random GPT-2 (2 layers, 64 "
                                                             "wide), a few dozen examples, 1 epoch, no download")
    return parser.parse_args(argv)


def pick(value, valid, flag):
    chosen = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in valid]
    if unknown or not chosen:
        raise InputError(f"{flag} {value!r}: {'unknown ' + ', '.join(unknown) if unknown else 'names nothing'}; "
                         f"valid: {', '.join(valid)} (comma-separated)")
    return [name for name in valid if name in chosen]  # the table's order


def check_args(args):
    """Every flag, and the data, checked before anything is written or trained. Returns the study's plan."""
    tasks, regimes = pick(args.tasks, TASKS, "--tasks"), pick(args.regimes, REGIMES, "--regimes")
    methods = pick(args.methods, METHODS, "--methods")
    if args.seeds < 1:
        raise InputError(f"--seeds {args.seeds}: must be at least 1 (runs per condition)")
    device = check_device(args.device)
    if args.smoke and args.preset not in ("auto", "smoke"):
        raise InputError(f"--smoke with --preset {args.preset}: --smoke is --preset smoke; give one of them")
    preset = "smoke" if args.smoke else args.preset
    if preset == "auto":
        preset = "full" if device.startswith("cuda") else "reduced"
    if preset == "smoke" and args.model is not None:
        raise InputError(f"--model {args.model}: --smoke trains its own tiny random GPT-2; leave --model out")
    model = args.model or "gpt2"
    if preset != "smoke" and model.removeprefix("openai-community/") not in PRETRAINED and not Path(model).is_dir():
        raise InputError(f"--model {model!r}: neither a GPT-2 name ({', '.join(PRETRAINED)}) nor a directory")
    name = Path(model).name if Path(model).is_dir() else model.removeprefix("openai-community/")
    out_dir = Path(args.out_dir or "out/study" + ("" if name == "gpt2" else f"-{name}")
                   + ("" if preset == "full" else f"-{preset}"))
    writable_dir(out_dir, "--out_dir")
    if preset == "smoke":
        model = str(out_dir / "tiny-gpt2")
        data_dir, copy_from = (Path(args.data_dir), None) if args.data_dir else (out_dir / "data", SHARED_DATA)
        if copy_from is not None:
            missing = [str(SHARED_DATA / f) for f in [*SMOKE_FILES.values(), "tiktoken_cache"] if not (SHARED_DATA / f).exists()]
            if missing:
                raise InputError(f"--smoke trains on the course-format samples in {SHARED_DATA}, which lacks "
                                 f"{', '.join(missing)}; put them there, or pass --data_dir with the course's files")
            os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))  # no download
    else:
        data_dir, copy_from = Path(args.data_dir or "data"), None
    plan = dict(tasks=tasks, regimes=regimes, methods=methods, seeds=[FIRST_SEED + k for k in range(args.seeds)],
                device=device, preset=preset, model=model, out_dir=out_dir, data_dir=data_dir, copy_from=copy_from)
    plan["dev"] = {task: read_dev(plan, task) for task in tasks}  # every needed file read (and checked) now
    for trainer, config in runs(plan):  # a finished run with other settings is an error now, not in an hour
        done = finished(config)
        if done is not None:
            check_same_settings(done, config)
    return plan


def source(plan, name):
    """Where the course file `name` is read from now: data_dir, or for --smoke the sample it will be copied from."""
    return plan["copy_from"] / SMOKE_FILES[name] if plan["copy_from"] else plan["data_dir"] / name


def read_dev(plan, task):
    """What every run of `task` is scored against: the Quora dev labels, or {number: true sonnet}. Reads (and
    so checks) all of the task's files, with the preset's limits, before anything is trained."""
    limits = PRESETS[plan["preset"]][task]
    if task == "paraphrase":
        read_quora(source(plan, QUORA["train"]), limit=limits.get("train_limit"))
        dev = read_quora(source(plan, QUORA["dev"]), limit=limits.get("dev_limit"))
        if any(p.label is None for p in dev):
            raise InputError(f"{source(plan, QUORA['dev'])}: the Quora dev file needs the is_duplicate column")
        return [p.label for p in dev]
    read_sonnets(source(plan, SONNETS["train"]), limit=limits.get("train_limit"))
    read_sonnets(source(plan, SONNETS["dev"]))
    return {s.number: s.text for s in read_sonnets(source(plan, SONNETS["dev_true"]))}


# -----------------------------------------------------------------------------
# the runs


def run_dir(plan, task, regime, method, seed):
    return plan["out_dir"] / f"{task}-{regime}-{method}-seed{seed}"


def run_config(plan, task, regime, method, seed):
    """What train_sft.train / train_dpo.train get for one run: the table's row, the preset, and the study's flags."""
    config = {**CONDITIONS[(task, regime, method)], **PRESETS[plan["preset"]][task], "task": task, "seed": seed,
              "init_from": plan["model"], "data_dir": str(plan["data_dir"]), "device": plan["device"],
              "out_dir": str(run_dir(plan, task, regime, method, seed)), "resume": True}
    if regime != "sft":  # one cache for the study: DPO-only FFT and LoRA share reference log-probs and samples
        config["cache_dir"] = str(plan["out_dir"] / "cache")
    if regime == "sft_dpo":
        config["init_from"] = str(run_dir(plan, task, "sft", method, seed))
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
                    planned.append((train_sft if regime == "sft" else train_dpo,
                                    run_config(plan, task, regime, method, seed)))
    unique = {config["out_dir"]: (trainer, config) for trainer, config in planned}
    return list(unique.values())


def finished(config):
    """The run's results.json as a dict if it has finished, else None."""
    path = Path(config["out_dir"]) / "results.json"
    return read_json(path) if path.exists() else None


def check_same_settings(results, config):
    """A finished run is reused only if it was trained as this study would train it. Paths compare by their
    last component (a study folder may have moved; SFT->DPO's start is always its own task's SFT run)."""
    saved = results.get("config", {})
    for key in [k for k in config if k not in ("data_dir", "out_dir", "device", "resume", "cache_dir")]:
        mine, theirs = config[key], saved.get(key)
        if key == "init_from":
            mine, theirs = Path(mine).name, Path(str(theirs)).name
        if mine != theirs:
            raise InputError(f"{config['out_dir']}/results.json: that run was trained with {key}={saved.get(key)!r}, "
                             f"this study asks for {key}={config[key]!r}; use another --out_dir, or delete "
                             f"{config['out_dir']} to train it again")


def read_json(path):
    try:
        return json.loads(read_text(path))
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e}); delete its folder to run it again") from None


def make_smoke_assets(plan):
    """--smoke: the tiny random GPT-2, and the samples under the course's file names, inside out_dir."""
    model_dir = Path(plan["model"])
    if not (model_dir / "model.safetensors").exists():
        torch.manual_seed(0)
        GPT(GPTConfig(**SMOKE_MODEL)).save_pretrained(model_dir)
    if plan["copy_from"] is not None:
        for name, sample in SMOKE_FILES.items():
            if not (plan["data_dir"] / name).exists():
                with atomic_open(plan["data_dir"] / name, "wb") as f:
                    f.write((plan["copy_from"] / sample).read_bytes())


def run_all(plan):
    """Train every run that has not finished; returns {out_dir: results}."""
    if plan["preset"] == "smoke":
        make_smoke_assets(plan)
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


# -----------------------------------------------------------------------------
# the table: means over seeds, bootstrap intervals, paired differences


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def predictions(plan, task, regime, method, seed):
    """The run's best-epoch dev predictions, in dev-file order: 0/1 per Quora pair, or the 12 sonnets' texts."""
    path = run_dir(plan, task, regime, method, seed) / "best_dev_predictions.json"
    if not path.exists():
        raise InputError(f"{path}: missing; delete {path.parent} to train that run again")
    saved = read_json(path)
    if task == "paraphrase":
        return saved["predictions"]
    return [(int(number), text) for number, text in saved["sonnets"]]


def seed_averaged(metric, n_seeds):
    """metric over examples whose hypotheses are tuples (one entry per seed): the mean of the per-seed scores."""
    def averaged(hypotheses, references):
        return statistics.fmean(metric([h[s] for h in hypotheses], references) for s in range(n_seeds))
    return averaged


def score_interval(task, per_seed, references):
    """95% bootstrap interval of the seed-averaged dev score, resampling dev examples (paired across seeds)."""
    metric = accuracy if task == "paraphrase" else chrf
    return bootstrap_ci(seed_averaged(metric, len(per_seed)), list(zip(*per_seed)), references,
                        n_resamples=BOOTSTRAP_RESAMPLES)


def versus_baseline(task, per_seed, baseline_per_seed, references):
    """Difference from SFT-only FFT on the same dev examples, seed by seed. Paraphrase: accuracy difference and
    McNemar's exact p per seed (told apart when every p < 0.05). Sonnets: chrF difference, and a paired
    bootstrap interval of the seed-averaged difference (told apart when it excludes 0)."""
    if task == "paraphrase":
        tests = [paired_difference([p == y for p, y in zip(mine, references)], [p == y for p, y in zip(base, references)])
                 for mine, base in zip(per_seed, baseline_per_seed)]
        p_values = [t["p_value"] for t in tests]
        return {"difference": statistics.fmean(t["difference"] for t in tests), "p_values": p_values,
                "tests": tests, "told_apart": max(p_values) < 0.05}
    n = len(per_seed)

    def difference(hypotheses, refs):  # each hypothesis: (this condition's sonnet per seed..., baseline's per seed...)
        return (seed_averaged(chrf, n)([h[:n] for h in hypotheses], refs)
                - seed_averaged(chrf, n)([h[n:] for h in hypotheses], refs))

    paired = list(zip(*per_seed, *baseline_per_seed))
    low, high = bootstrap_ci(difference, paired, references, n_resamples=BOOTSTRAP_RESAMPLES)
    return {"difference": difference(paired, references), "ci95": [low, high], "told_apart": not low <= 0 <= high}


def condition_row(plan, results, task, regime, method):
    """One row of the table: the condition's runs over seeds, read back from their folders."""
    seeds = plan["seeds"]
    stage_results = [[results[str(run_dir(plan, task, r, method, s))] for r in (["sft", "sft_dpo"] if regime == "sft_dpo" else [regime])]
                     for s in seeds]
    own = [stages[-1] for stages in stage_results]  # the condition's own run (SFT->DPO: its DPO stage)
    scores = [r["score"] for r in own]
    references, per_seed = dev_references(plan, task, [predictions(plan, task, regime, method, s) for s in seeds])
    score, std = mean_std(scores)
    row = {"task": task, "regime": regime, "method": method, "score_name": own[0]["score_name"], "score": score,
           "score_std": std, "scores": scores, "ci95": list(score_interval(task, per_seed, references)),
           "train_seconds": statistics.fmean(sum(r["train_seconds"] for r in st) for st in stage_results),
           "tokens_per_second": statistics.fmean(sum(r["real_tokens"] for r in st) / max(sum(r["train_seconds"] for r in st), 1e-9)
                                                 for st in stage_results),
           "peak_memory_bytes": max(r["peak_memory_bytes"] for st in stage_results for r in st),
           "trainable_parameters": own[0]["trainable_parameters"], "total_parameters": own[0]["total_parameters"],
           "seeds": seeds, "best_epochs": [r["best_epoch"] for r in own], "device": own[0]["device"],
           "runs": [str(run_dir(plan, task, regime, method, s)) for s in seeds],
           # per seed, epoch by epoch; SFT->DPO's DPO stage continues after its SFT stage's epochs
           "history": [[{**h, "epoch": h["epoch"] + (len(st[0]["history"]) if i else 0)}
                        for i, r in enumerate(st) for h in r["history"]] for st in stage_results]}
    if task == "paraphrase":
        row["f1"], row["f1_std"] = mean_std([r["metrics"]["f1"] for r in own])
    baseline = (task, "sft", "fft")
    if (task, regime, method) != baseline and all(str(run_dir(plan, task, "sft", "fft", s)) in results for s in seeds):
        _, baseline_per_seed = dev_references(plan, task, [predictions(plan, *baseline, s) for s in seeds])
        row["vs_sft_fft"] = versus_baseline(task, per_seed, baseline_per_seed, references)
    return row


def dev_references(plan, task, per_seed):
    """(references, per-seed hypotheses) in the same order: Quora labels, or the true sonnets by number."""
    dev = plan["dev"][task]
    if task == "paraphrase":
        for predicted in per_seed:
            if len(predicted) != len(dev):
                raise InputError(f"a run has {len(predicted)} dev predictions but the dev set has {len(dev)} pairs "
                                 f"(was it trained with another dev_limit?); delete its folder to run it again")
        return dev, per_seed
    numbers = [number for number, _ in per_seed[0]]
    if any([number for number, _ in predicted] != numbers for predicted in per_seed) or any(n not in dev for n in numbers):
        raise InputError("the runs' dev sonnets are not the same held-out sonnets; delete the runs to train them again")
    return [dev[n] for n in numbers], [[text for _, text in predicted] for predicted in per_seed]


def verdict(rows, plan):
    """One sentence: which differences from SFT-only FFT these dev sets can tell apart, and which not."""
    compared = [row for row in rows if "vs_sft_fft" in row]
    if not compared:
        return ("No paired differences: SFT-only FFT (each task's baseline) is not among the selected conditions, "
                "so nothing was compared with it.")

    def label(r):
        return f"{NAMES[r['task']]} {NAMES[r['regime']]} {NAMES[r['method']]}"

    apart = [label(r) for r in compared if r["vs_sft_fft"]["told_apart"]]
    not_apart = [label(r) for r in compared if not r["vs_sft_fft"]["told_apart"]]
    sizes = []
    if "paraphrase" in plan["dev"]:
        sizes.append(f"{len(plan['dev']['paraphrase']):,} dev pairs")
    if "sonnet" in plan["dev"]:
        sizes.append(f"{len(plan['dev']['sonnet'])} dev sonnets")
    every = " on every seed" if len(plan["seeds"]) > 1 else ""
    return (f"Against SFT-only FFT on the same {' and '.join(sizes)}, the data can tell apart "
            f"{', '.join(apart) or 'no condition'} (paraphrase: McNemar p < 0.05{every}; sonnets: the paired 95% "
            f"interval of the chrF difference excludes 0)"
            + (f", but not {', '.join(not_apart)}: differences that small are within what the choice of dev "
               f"examples alone produces." if not_apart else "."))


# -----------------------------------------------------------------------------
# writing it out


def fmt_score(task, value):
    return f"{value:.4f}" if task == "paraphrase" else f"{value:.2f}"


def table_cells(row):
    task = row["task"]
    score = fmt_score(task, row["score"]) + (f" ± {fmt_score(task, row['score_std'])}" if row["score_std"] is not None else "")
    versus = "baseline" if (row["regime"], row["method"]) == ("sft", "fft") else "—"
    if "vs_sft_fft" in row:
        v = row["vs_sft_fft"]
        if task == "paraphrase":
            p = max(v["p_values"])
            versus = f"{v['difference']:+.4f} (p={p:.2g}{', max over seeds' if len(v['p_values']) > 1 else ''})"
        else:
            versus = f"{v['difference']:+.2f} [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}]"
    return [task, row["regime"], row["method"], f"{row['score_name']} {score}",
            f"[{fmt_score(task, row['ci95'][0])}, {fmt_score(task, row['ci95'][1])}]", versus,
            f"{row['train_seconds']:.1f}", f"{row['tokens_per_second']:,.0f}",
            f"{row['peak_memory_bytes'] / 2 ** 20:,.0f} MiB", f"{row['trainable_parameters']:,}", str(len(row["seeds"]))]


HEADER = ["task", "regime", "method", "score (mean ± std)", "95% CI", "vs SFT-only FFT", "train_seconds",
          "tokens_per_second", "peak_memory", "trainable_parameters", "seeds"]


def markdown_table(rows):
    cells = [HEADER] + [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


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
        if "max_new_tokens" in s:
            what.append(f"at most {s['max_new_tokens']} generated tokens")
        parts.append(f"{NAMES[task]}: {', '.join(what)}")
    kind = {"reduced": "REDUCED preset (the default without a CUDA GPU; --preset full runs the whole study)",
            "smoke": "SMOKE test: a tiny random 2-layer GPT-2, so the scores mean nothing"}[preset]
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


ERROR_BARS = """How to read the error bars. "mean ± std" is over seeds: how much the score moves when only the
random seed (initialisation of LoRA, data order, dropout, sampling) changes. "95% CI" is a bootstrap over
the dev examples: resample them with replacement 1,000 times and recompute the (seed-averaged) score; it says
how much the score would move on another dev set of the same size. "vs SFT-only FFT" compares each condition
with SFT-only FFT on the same dev examples and seed: for paraphrase, the accuracy difference and McNemar's
exact test, which uses only the pairs the two models answer differently (p < 0.05: unlikely to be chance);
for sonnets, the chrF difference with a paired bootstrap interval (excluding 0: told apart). Costs are means
over seeds; SFT→DPO's include its SFT stage, and its peak memory is the larger of the two stages'."""


def write_study(plan, rows, plots):
    header = (f"# The study: {Path(plan['model']).name if plan['preset'] == 'smoke' else plan['model']}, "
              f"{len(rows)} conditions x {len(plan['seeds'])} seed(s) on {rows[0]['device'] if rows else plan['device']}")
    sentence = verdict(rows, plan)
    if plots is None:
        pictures = ("Plots: `pip install matplotlib`, then run the same command again: nothing is retrained, and "
                    "study-<task>.png (dev score and training loss per epoch) are drawn from the runs' histories.")
    else:
        pictures = "\n".join(f"![{name}]({name})" for name in plots)
    markdown = "\n\n".join([header, describe_preset(plan), markdown_table(rows), sentence, ERROR_BARS, pictures]) + "\n"
    with atomic_open(plan["out_dir"] / "study.md") as f:
        f.write(markdown)
    summary = [{k: v for k, v in row.items() if k != "history"} for row in rows]
    write_json(plan["out_dir"] / "study.json", {
        "model": plan["model"], "preset": plan["preset"], "preset_description": describe_preset(plan),
        "preset_settings": {task: PRESETS[plan["preset"]][task] for task in plan["tasks"]},
        "conditions": {f"{t}-{r}-{m}": CONDITIONS[(t, r, m)] for t, r, m in CONDITIONS if t in plan["tasks"]
                       and r in plan["regimes"] and m in plan["methods"]},
        "seeds": plan["seeds"], "bootstrap_resamples": BOOTSTRAP_RESAMPLES, "verdict": sentence,
        "plots": plots, "rows": summary})
    return markdown


def study(plan):
    results = run_all(plan)
    rows = [condition_row(plan, results, task, regime, method)
            for task in plan["tasks"] for regime in plan["regimes"] for method in plan["methods"]]
    markdown = write_study(plan, rows, plot(rows, plan["out_dir"]))
    print("\n" + markdown.split("\n\n" + ERROR_BARS)[0])
    print(f"\nwritten: {plan['out_dir'] / 'study.md'} and {plan['out_dir'] / 'study.json'}")
    return rows


def main(argv=None):
    args = parse_args(argv)
    try:
        return study(check_args(args))
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
