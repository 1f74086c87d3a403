"""
The study in one command: 2 tasks x 3 regimes x 2 methods = 12 conditions, each trained, scored and costed.

    python study.py                     # the full study (3 seeds) on a CUDA GPU, the reduced preset elsewhere
    python study.py --tasks paraphrase --regimes sft,sft_dpo --methods lora --seeds 3
    python study.py --regimes all       # also RPO, ORPO and SimPO: 24 conditions
    python study.py --jobs 4            # up to 4 runs at once, each a train_*.py process (jobs.py)
    python study.py --smoke             # a tiny random GPT-2 on data/samples: minutes on a CPU

Each run has its folder out_dir/<task>-<regime>-<method>-seed<S>/; a finished run is not run again and an
interrupted one resumes, so machines can share out_dir and `--report_only` writes the table.
"""

import hashlib
import itertools
import json
import signal
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

import checkpoint
import fileio
import flags
import plot
import train_dpo
import train_orpo
import train_sft
from jobs import Interrupted, finished, interrupt, run_here, run_in_processes
from runlog import read_log
from data.tasks import SONNETS, load_task_data
from data.tokenizer import get_tokenizer
from eval import chrf, evaluate_sonnets
from fileio import InputError, atomic_open, read_json, writable_dir, write_json
from flags import POSITIVE, at_least, one_of
from model import GPT, GPTConfig
from stats import bootstrap_ci, holm, paired_difference, smallest_detectable, t_test


# -----------------------------------------------------------------------------
# The conditions, in the training scripts' SETTINGS names; the rest is their defaults (batches of 8, AdamW, 5%
# warm-up then cosine decay). LoRA: rank 8, alpha 16, every Linear of the blocks, Hu et al. (2021)'s GPT-2 lr.
# Every stage trains equally long: paraphrase 3 passes over the ~283k pairs (the course's 10 / 3), sonnets 10.
# Regimes: SFT only, DPO only (from GPT-2), SFT->DPO (DPO from the SFT-only run's last/, same task, method, seed).
FFT, LORA = dict(lr=1e-5), dict(lr=2e-4, lora_r=8, lora_alpha=16.0)
EPOCHS = {"paraphrase": 3, "sonnet": 10}
TRAINING = {
    "sft": dict(),
    "dpo": dict(beta=0.1),
    "sft_dpo": dict(beta=0.1),
    # beyond the paper (--regimes all), one stage from GPT-2: RPO = DPO + alpha NLL (Pang et al. 2024); ORPO and
    # SimPO have no reference model (Hong et al. 2024's lambda; Meng et al. 2024's recommended beta and gamma)
    "rpo": dict(beta=0.1, rpo_alpha=1.0),
    "orpo": dict(orpo_lambda=0.1),
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0),
}
TASKS, REGIMES, METHODS = ("paraphrase", "sonnet"), ("sft", "dpo", "sft_dpo"), ("fft", "lora")  # the paper's 12
ALL_REGIMES = tuple(TRAINING)  # --regimes all: 24 conditions
CONDITIONS = {(task, regime, method): {"epochs": EPOCHS[task], **(FFT if method == "fft" else LORA), **TRAINING[regime]}
              for task in TASKS for regime in ALL_REGIMES for method in METHODS}
TRAINERS = {"sft": train_sft, "dpo": train_dpo, "sft_dpo": train_dpo, "rpo": train_dpo, "orpo": train_orpo,
            "simpo": train_dpo}
FIRST_SEED = 11711  # the course's; --seeds N uses 11711, 11712, ..., 11711 + N - 1
GPU_SEEDS = 3  # --seeds' default on a CUDA GPU: a verdict about methods needs more than one model each

# What a preset changes on top of CONDITIONS. reduced: about an hour on a 4-core laptop CPU (docs/estimates.md).
# smoke: all of data/samples at an lr a tiny random model moves at; 2 paraphrase epochs, so final and best differ.
PRESETS = {
    "full": {"paraphrase": {}, "sonnet": {}},
    "reduced": {"paraphrase": dict(train_limit=2000, dev_limit=1000, epochs=1),
                "sonnet": dict(train_limit=48, epochs=1)},
    "smoke": {"paraphrase": dict(epochs=2, lr=1e-3), "sonnet": dict(epochs=1, lr=1e-3, max_new_tokens=24)},
}
BOOTSTRAP_RESAMPLES = 1000
ROOT = Path(__file__).resolve().parent
SMOKE_DATA = ROOT / "data" / "samples"  # the course-format samples --smoke trains on
SMOKE_MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=256)  # 256 positions: a whole sonnet fits
NAMES = {"paraphrase": "paraphrase", "sonnet": "sonnets", "sft": "SFT-only", "dpo": "DPO-only", "sft_dpo": "SFT→DPO",
         "rpo": "RPO", "orpo": "ORPO", "simpo": "SimPO", "fft": "FFT", "lora": "LoRA"}


# -----------------------------------------------------------------------------
# the command line, checked before any work


def names(value):
    return [name.strip() for name in value.split(",") if name.strip()]


def subset_of(valid, *extra):
    return (lambda v: v.strip() in extra or bool(names(v)) and set(names(v)) <= set(valid),
            f"must be a comma-separated subset of {', '.join(valid)}" + "".join(f", or {e}" for e in extra))


SETTINGS = {
    "tasks": (",".join(TASKS), str, subset_of(TASKS), "which tasks"),
    "regimes": (",".join(REGIMES), str, subset_of(ALL_REGIMES, "all"), "which regimes (default: the paper's three)"),
    "methods": (",".join(METHODS), str, subset_of(METHODS), "which methods"),
    "seeds": (None, int, at_least(1), f"runs per condition (default {GPU_SEEDS} on a CUDA GPU, 1 elsewhere)"),
    "first_seed": (FIRST_SEED, int, at_least(0), "the first seed (a machine's share: --seeds 1 --first_seed 11713)"),
    "sample_seeds": (3, int, at_least(1), "sonnets: score each run's final weights with this many sampling seeds"),
    "model": (None, str, None, "the GPT-2 to start from: a name (gpt2 ... gpt2-xl) or a model directory (gpt2)"),
    "data_dir": (None, str, None, "the course's files (default data/; --smoke: data/samples/)"),
    "out_dir": (None, str, None, "default out/study[-<model>][-<preset>]"),
    "device": (flags.default_device(), str, None, "cpu, cuda, cuda:N or mps"),
    "preset": ("auto", str, one_of("auto", *PRESETS), "auto: full on a CUDA GPU, reduced otherwise (see PRESETS)"),
    "smoke": (False, bool, None, "the smoke preset: a tiny random GPT-2 on data/samples/, no download"),
    "jobs": (1, int, at_least(1), "train up to N runs at once, each a train_*.py process (1: in this process)"),
    "lora_rslora": (False, bool, None, "every LoRA condition scales by alpha/sqrt(r) (rsLoRA); use its own --out_dir"),
    "lora_plus_ratio": (1.0, float, POSITIVE, "LoRA: B's lr = this x A's (LoRA+, Hayou et al.: 16); own --out_dir"),
    "keep_checkpoints": (False, bool, None, "keep each run's best/ and checkpoint.pt too (default: only last/)"),
    "report_only": (False, bool, None, "train nothing: read the finished runs of the selection and write the table"),
}


def check_args(config):
    """The study's plan, checked (several flags, the output folder, the data, the finished runs) before any work."""
    device = flags.check_device(config["device"])
    if config["smoke"] and config["preset"] not in ("auto", "smoke"):
        raise InputError(f"--smoke with --preset {config['preset']}: --smoke is --preset smoke; give one of them")
    preset = "smoke" if config["smoke"] else config["preset"]
    if preset == "auto":
        preset = "full" if device.startswith("cuda") else "reduced"
    if preset == "smoke" and config["model"] is not None:
        raise InputError(f"--model {config['model']}: --smoke trains its own tiny random GPT-2; leave --model out")
    model = config["model"] or "gpt2"
    if preset != "smoke":
        checkpoint.check_source(model, "--model")
    name = Path(model).name if Path(model).is_dir() else model.removeprefix("openai-community/")
    out_dir = Path(config["out_dir"] or "out/study" + ("" if name == "gpt2" else f"-{name}")
                   + ("" if preset == "full" else f"-{preset}"))
    writable_dir(out_dir, "--out_dir")  # every output path is checked before any data is read
    chosen = {flag: [choice for choice in valid if config[flag].strip() == "all" or choice in names(config[flag])]
              for flag, valid in (("tasks", TASKS), ("regimes", ALL_REGIMES), ("methods", METHODS))}
    n_seeds = config["seeds"] or (GPU_SEEDS if device.startswith("cuda") and preset != "smoke" else 1)
    plan = dict(chosen, seeds=[config["first_seed"] + k for k in range(n_seeds)], device=device, preset=preset,
                out_dir=out_dir, model=str(out_dir / "tiny-gpt2") if preset == "smoke" else model, jobs=config["jobs"],
                sample_seeds=config["sample_seeds"], keep_checkpoints=config["keep_checkpoints"],
                report_only=config["report_only"],
                data_dir=Path(config["data_dir"] or (SMOKE_DATA if preset == "smoke" else "data")),
                lora={k: config[k] for k in ("lora_rslora", "lora_plus_ratio") if config[k] != SETTINGS[k][0]})
    get_tokenizer()  # its BPE files: a one-line error now if tiktoken can neither find nor download them
    plan["dev"] = {task: read_dev(plan, task) for task in plan["tasks"]}  # every needed file read (and checked) now
    check_runs(plan)
    return plan


def read_dev(plan, task):
    """What `task`'s runs are scored against: the Quora dev labels, or the held-out sonnets and their true ones."""
    _, dev = load_task_data({"task": task, "data_dir": plan["data_dir"], **PRESETS[plan["preset"]][task]})
    if task == "paraphrase":
        return [p.label for p in dev]
    held_out, references = dev[0], {s.number: s for s in dev[1]}
    missing = [s.number for s in held_out if s.number not in references]
    if missing:
        raise InputError(f"{plan['data_dir'] / SONNETS['dev_true']}: no true sonnet for held-out sonnet(s) {missing}")
    return {"held_out": held_out, "references": [references[s.number] for s in held_out]}


# -----------------------------------------------------------------------------
# the runs


def run_dir(plan, task, regime, method, seed):
    return plan["out_dir"] / f"{task}-{regime}-{method}-seed{seed}"


def run_config(plan, task, regime, method, seed):
    """What train_*.train gets for one run: the condition, the preset, and the study's flags. Only last/ is kept
    (the final epoch's weights: what the study reports and SFT->DPO starts from) unless --keep_checkpoints."""
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


def selection(plan):
    """The selected conditions, (task, regime, method), in the table's order."""
    return list(itertools.product(plan["tasks"], plan["regimes"], plan["methods"]))


def stages_of(regime):
    return ["sft", "sft_dpo"] if regime == "sft_dpo" else [regime]  # SFT->DPO: its SFT run, then its DPO run


def runs(plan):
    """(trainer, config) of every run the selection needs, seed by seed (an interrupted study has whole seeds done),
    an SFT->DPO run after the SFT run it starts from (selected or not)."""
    planned = {}
    for seed, (task, regime, method) in itertools.product(plan["seeds"], selection(plan)):
        for stage in stages_of(regime):
            config = run_config(plan, task, stage, method, seed)
            planned.setdefault(config["out_dir"], (TRAINERS[stage], config))
    return list(planned.values())


def start_name(path):
    path = Path(str(path))
    return f"{path.parent.name}/{path.name}" if path.name in ("last", "best") else path.name


def check_same_settings(results, config):
    """A finished run is reused only if it was trained as this study would train it (what checkpoint.trained_with
    compares; init_from by name, an SFT run's weights as <run>/last: a study folder may have moved), under the
    results.json contract the table reads (score = the final epoch's, best_score = the best epoch's)."""
    if "best_score" not in results:
        raise InputError(f"{config['out_dir']}/results.json: written by an older train_sft/train_dpo, whose score is "
                         f"the best epoch's, not the final one's; delete {config['out_dir']} to train it again")
    saved = results.get("config", {})
    for key in checkpoint.trained_with(config):
        mine, theirs = config[key], saved.get(key)
        if key == "init_from":
            mine, theirs = start_name(mine), start_name(theirs)
        if mine != theirs:
            raise InputError(f"{config['out_dir']}/results.json: that run was trained with {key}={saved.get(key)!r}, "
                             f"this study asks for {key}={config[key]!r}; use another --out_dir, or delete "
                             f"{config['out_dir']} to train it again")


def check_runs(plan):
    """A finished run trained with other settings is an error now, not in an hour; with --report_only, so is one
    that has not finished."""
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


def train_all(plan):
    """{out_dir: results} of every run, training those not finished; SIGINT and SIGTERM raise Interrupted."""
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with fileio.lock_dir(plan["out_dir"]):
            if plan["preset"] == "smoke" and not (Path(plan["model"]) / "model.safetensors").exists():
                torch.manual_seed(0)  # --smoke: the tiny random GPT-2 every run starts from, inside out_dir
                checkpoint.save_pretrained(GPT(GPTConfig(**SMOKE_MODEL)), plan["model"])
            planned = runs(plan)
            return run_in_processes(planned, plan["jobs"], plan["device"]) if plan["jobs"] > 1 else run_here(planned)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -----------------------------------------------------------------------------
# each run's dev outcomes (sonnets: its final weights sampled with several seeds), and the statistics on them; the
# seed is the unit of replication (stats.py), and one seed compares two trained models, not methods


def sample_seeds(plan, seed):
    """A run's sampling seeds: its own seed first (the one training scored with), then +1000, +2000, ..."""
    return [seed + 1000 * k for k in range(plan["sample_seeds"])]


def sampled_sonnets(plan, out_dir):
    """[[text of each held-out dev sonnet] per sampling seed] from the run's last/ with its own generation settings,
    cached in <run>/study_sonnets.json under a hash of its results.json (a run trained again is sampled again)."""
    out_dir = Path(out_dir)
    finished_bytes = (out_dir / "results.json").read_bytes()
    config = json.loads(finished_bytes)["config"]
    settings = {"temperature": config["temperature"], "top_p": config["top_p"],
                "max_new_tokens": config["max_new_tokens"], "batch_size": config["eval_batch_size"]}
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
    print(f"{weights.parent.name}: sampling the dev sonnets from {weights.name}/, seed(s) {seeds}", flush=True)
    model = checkpoint.load_model(weights).to(plan["device"])
    return {str(seed): evaluate_sonnets(model, dev["held_out"], dev["references"], device=plan["device"], seed=seed,
                                        **settings)["sonnets"] for seed in seeds}


def run_items(plan, task, out_dir):
    """A run's final dev outcomes [per sampling seed][per dev example]: per-pair correctness, or sampled sonnets."""
    if task == "sonnet":
        return sampled_sonnets(plan, out_dir)
    path = Path(out_dir) / "dev_predictions.json"
    if not path.exists():
        raise InputError(f"{path}: missing; delete {path.parent} to train that run again")
    correct = read_json(path).get("correct")
    if correct is None or len(correct) != len(plan["dev"]["paraphrase"]):
        raise InputError(f"{path}: needs 'correct', one 0/1 per dev pair ({len(plan['dev']['paraphrase'])}); was it "
                         f"trained with another dev_limit or an older train_sft.py? Delete {path.parent} to retrain")
    return [np.asarray(correct, dtype=np.float64)]


def run_score(task, outcomes, references):
    """A run's dev score from outcomes[sample][example]: accuracy, or corpus chrF averaged over sampling seeds."""
    if task == "paraphrase":
        return float(np.mean(outcomes))
    return statistics.fmean(chrf(list(texts), references) for texts in outcomes)


def one_seed_interval(task, outcomes, references, other=()):
    """One seed: stats.bootstrap_ci's 95% interval of a run's score over its dev examples, or of its difference
    from the `other` run's on the same examples (paired: each draw keeps an example's outcomes together)."""
    examples, k = list(zip(*outcomes, *other)), len(outcomes)

    def statistic(chosen, chosen_references):
        columns = list(zip(*chosen))
        mine = run_score(task, columns[:k], chosen_references)
        return mine - run_score(task, columns[k:], chosen_references) if other else mine

    return list(bootstrap_ci(statistic, examples, references or examples, n_resamples=BOOTSTRAP_RESAMPLES))


def versus_baseline(task, items, baseline, references):
    """items[seed][sample][example] against `baseline`'s, seed by seed: the paired t-test on the per-seed differences.
    One seed is two trained models: a paired bootstrap interval, no p_value, and for paraphrase McNemar's test."""
    differences = [run_score(task, mine, references) - run_score(task, theirs, references)
                   for mine, theirs in zip(items, baseline)]
    result = {**t_test(differences), "per_seed": differences,
              "test": f"paired t-test over {len(items)} seeds ({len(items) - 1} degrees of freedom)"}
    if len(items) == 1:
        result.update(ci95=one_seed_interval(task, items[0], references, baseline[0]),
                      test="one seed: two trained models, no test of the methods")
        if task == "paraphrase":
            mcnemar = paired_difference(items[0][0].astype(int).tolist(), baseline[0][0].astype(int).tolist())
            result["mcnemar"] = {**mcnemar, "test": "McNemar's exact test of these two trained models (not of methods)"}
    return result


def contrasts(plan, items):
    """The paper's questions per task, a - b paired by seed: LoRA vs FFT within each regime; SFT->DPO vs SFT-only
    and DPO-only vs SFT-only within each method. Holm over the task's family (none with one seed), and for each the
    smallest difference detected with 80% power at Holm's first threshold 0.05 / m, from the observed spread."""
    regimes, methods, found = plan["regimes"], plan["methods"], []
    asked = [(f"LoRA vs FFT, {NAMES[r]}", (r, "lora"), (r, "fft")) for r in regimes if {"fft", "lora"} <= set(methods)]
    for regime in ("sft_dpo", "dpo"):
        asked += [(f"{NAMES[regime]} vs SFT-only, {NAMES[m]}", (regime, m), ("sft", m)) for m in methods
                  if {regime, "sft"} <= set(regimes)]
    for task in plan["tasks"]:
        family = [{"task": task, "question": question, "a": f"{NAMES[a[0]]} {NAMES[a[1]]}",
                   "b": f"{NAMES[b[0]]} {NAMES[b[1]]}",
                   **versus_baseline(task, items[(task, *a)], items[(task, *b)], references_of(plan, task))}
                  for question, a, b in asked]
        tested = [c for c in family if c["p_value"] is not None]
        for c, adjusted in zip(tested, holm([c["p_value"] for c in tested])):
            spread = float(np.std(c["per_seed"], ddof=1))
            c.update(p_holm=adjusted, told_apart=adjusted < 0.05, comparisons=len(tested),
                     smallest_detectable=smallest_detectable(spread, len(c["per_seed"]), 0.05 / len(tested)))
        found += family
    return found


# -----------------------------------------------------------------------------
# the table's rows: means over seeds, intervals, paired differences


def references_of(plan, task):
    return [s.text for s in plan["dev"]["sonnet"]["references"]] if task == "sonnet" else None


def condition_row(plan, results, task, regime, method):
    """(the condition's row over seeds, its dev outcomes items[seed][sample][example]). Costs: means over seeds
    (SFT->DPO: both stages; peak memory the largest); reference: what a run paid for one."""
    seeds, references = plan["seeds"], references_of(plan, task)
    stages = [[results[str(run_dir(plan, task, r, method, s))] for r in stages_of(regime)] for s in seeds]
    own = [runs_of_seed[-1] for runs_of_seed in stages]  # the condition's own run (SFT->DPO: its DPO stage)
    items = [run_items(plan, task, run_dir(plan, task, regime, method, s)) for s in seeds]
    per_sample = [[run_score(task, [texts], references) for texts in outcomes] for outcomes in items]  # [seed][sample]
    scores = [statistics.fmean(values) for values in per_sample]
    seconds = [sum(r["train_seconds"] for r in st) for st in stages]
    row = {"task": task, "regime": regime, "method": method, "score_name": own[0]["score_name"],
           "score": statistics.fmean(scores), "score_std": statistics.stdev(scores) if len(seeds) > 1 else None,
           "scores": scores, "run_scores": [r["score"] for r in own],
           "ci95": t_test(scores)["ci95"] if len(seeds) > 1 else one_seed_interval(task, items[0], references),
           "best_score": statistics.fmean(r["best_score"] for r in own), "best_scores": [r["best_score"] for r in own],
           "best_epochs": [r["best_epoch"] for r in own], "epochs": len(own[0]["history"]),
           "metrics": {k: statistics.fmean(r["metrics"][k] for r in own) for k in own[0]["metrics"]},
           "train_seconds": statistics.fmean(seconds),
           "tokens_per_second": statistics.fmean(sum(r["real_tokens"] for r in st) / max(t, 1e-9)
                                                 for st, t in zip(stages, seconds)),
           "peak_memory_bytes": max(r["peak_memory_bytes"] for st in stages for r in st),
           "reference": {"precomputed": "once", "live": "every step"}.get(own[0].get("reference"), "none"),
           "trainable_parameters": own[0]["trainable_parameters"], "total_parameters": own[0]["total_parameters"],
           "seeds": seeds, "device": own[0]["device"],
           "runs": [str(run_dir(plan, task, regime, method, s)) for s in seeds],
           # per seed, epoch by epoch; SFT->DPO's DPO stage continues after its SFT stage's epochs
           "history": [[{**h, "epoch": h["epoch"] + (len(st[0]["history"]) if i else 0)}
                        for i, r in enumerate(st) for h in r["history"]] for st in stages]}
    if task == "paraphrase":
        row["f1"] = statistics.fmean(r["metrics"]["f1"] for r in own)
        row["f1_std"] = statistics.stdev(r["metrics"]["f1"] for r in own) if len(seeds) > 1 else None
    else:
        row["sample_seeds"] = [sample_seeds(plan, s) for s in seeds]
        row["sampled_scores"] = per_sample
    if "rejections" in own[0]:
        row["rejections"] = [r["rejections"] for r in own]
    return row, items


def table_rows(plan, results):
    """Every selected condition's row, with its difference from SFT-only FFT (a description; verdicts: contrasts)."""
    rows, items = [], {}
    for condition in selection(plan):
        row, items[condition] = condition_row(plan, results, *condition)
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


def fmt_score(task, value, sign=""):
    return f"{value:{sign}.4f}" if task == "paraphrase" else f"{value:{sign}.2f}"


def answer(c):
    """One question in words: told apart or not, the per-seed differences, and what "not" could have seen."""
    seeds = ", ".join(fmt_score(c["task"], d, "+") for d in c["per_seed"])
    if c["told_apart"]:
        return (f"{c['question']}: told apart, {fmt_score(c['task'], c['difference'], '+')} (per seed {seeds}; "
                f"Holm p={c['p_holm']:.2g})")
    return (f"{c['question']}: not told apart (per seed {seeds}; Holm p={c['p_holm']:.2g}; this design detects a "
            f"difference of {fmt_score(c['task'], c['smallest_detectable'])} or more with 80% power)")


def verdict(contrasts, plan):
    """The paper's questions answered in words, task by task; with one seed, why there is no answer."""
    if not contrasts:
        return ("No paired differences: no pair the paper's questions compare (LoRA and FFT in a regime; SFT->DPO or "
                "DPO-only and SFT-only in a method) is among the selected conditions.")
    if len(plan["seeds"]) == 1:
        return ("One seed per condition: each row is one trained model, so no method is told apart from another; "
                "that needs --seeds 2 or more. study.json (contrasts) has McNemar's test of each pair of models.")
    sentences = []
    for task in dict.fromkeys(c["task"] for c in contrasts):
        family = [c for c in contrasts if c["task"] == task]
        sentences.append(f"{NAMES[task].capitalize()}, {len(plan['seeds'])} seeds, paired t-tests with Holm's "
                         f"correction over {len(family)} questions: " + "; ".join(map(answer, family)) + ".")
    return "\n\n".join(sentences)


# -----------------------------------------------------------------------------
# writing it out

HEADER = ["task", "regime", "method", "score, final epoch (mean ± std)", "95% CI",
          "best dev epoch (as the course reports it; sonnets: 1 sampling seed)", "yes/no accuracy, share",
          "train_seconds", "reference pass", "tokens_per_second", "peak_memory", "trainable_parameters", "seeds"]
LEGEND = """score: the FINAL epoch's dev score (paraphrase: the course's accuracy; sonnets: chrF, the mean over sampling
seeds), mean ± std over seeds. 95% CI: the t interval of the per-seed scores (S − 1 degrees of freedom); with one
seed a bootstrap over dev examples, of one trained model. best dev epoch: chosen on dev, so optimistic. yes/no:
the accuracy of logit("yes") > logit("no"), and the share of argmax answers that are "yes" or "no" (the course's
accuracy needs both). Verdict: each question a − b paired by seed, a paired t-test, Holm over the task's questions,
and for one not told apart the smallest difference found with 80% power. Costs: means over seeds (peak memory: the
largest); SFT→DPO's include its SFT stage."""


def table_cells(row):
    task, metrics = row["task"], row["metrics"]
    spread = f" ± {fmt_score(task, row['score_std'])}" if len(row["seeds"]) > 1 else ""
    yes_no = f"{metrics['yes_no_accuracy']:.4f}, {metrics['yes_no_share']:.2f}" if task == "paraphrase" else "—"
    return [task, row["regime"], row["method"], f"{row['score_name']} {fmt_score(task, row['score'])}{spread}",
            f"[{fmt_score(task, row['ci95'][0])}, {fmt_score(task, row['ci95'][1])}]",
            f"{fmt_score(task, row['best_score'])} (epoch {','.join(map(str, row['best_epochs']))} of {row['epochs']})",
            yes_no, f"{row['train_seconds']:.1f}", row["reference"], f"{row['tokens_per_second']:,.0f}",
            f"{row['peak_memory_bytes'] / 2 ** 20:,.0f} MiB", f"{row['trainable_parameters']:,}",
            str(len(row["seeds"]))]


def markdown_table(rows):
    cells = [HEADER] + [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADER))]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    text.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(text)


def figures(plan, rows):
    """plot.study_figures' data per condition: the dev score per evaluation (mean over seeds), the first seed's loss
    per logged step (SFT->DPO: its SFT stage, then its DPO stage), score, interval and cost."""
    data = []
    for row in rows:
        history = row["history"]
        dev = [[h["epoch"], statistics.fmean(seed[i]["score"] for seed in history)] for i, h in enumerate(history[0])]
        train, offset = [], 0
        for regime in stages_of(row["regime"]):
            log = run_dir(plan, row["task"], regime, row["method"], plan["seeds"][0]) / "log.jsonl"
            train += [[offset + line["step"], line["loss"]] for line in read_log(log) if "loss" in line]
            offset = train[-1][0] if train else 0
        data.append({"label": f"{NAMES[row['task']]} {NAMES[row['regime']]} {NAMES[row['method']]}",
                     "task": row["task"], "regime": row["regime"], "method": row["method"], "score": row["score"],
                     "ci": row["ci95"], "train_seconds": row["train_seconds"], "dev_curve": dev, "train_curve": train})
    return data


def study(plan):
    """Train (or, with --report_only, read) the runs; write study.md and study.json and print the table."""
    results = {c["out_dir"]: finished(c) for _, c in runs(plan)} if plan["report_only"] else train_all(plan)
    rows, contrasts = table_rows(plan, results)
    data = figures(plan, rows)
    plots = [Path(p).name for p in plot.study_figures(data, plan["out_dir"])]
    preset = {"full": "FULL study: every training pair and sonnet, every dev pair, the epochs of CONDITIONS",
              "reduced": "REDUCED preset (the default without a CUDA GPU; --preset full runs the whole study)",
              "smoke": "SMOKE test: a tiny random GPT-2 on data/samples; the scores mean nothing"}[plan["preset"]]
    settings = {task: PRESETS[plan["preset"]][task] for task in plan["tasks"]}
    model = Path(plan["model"]).name if plan["preset"] == "smoke" else plan["model"]
    title = f"# The study: {model}, {len(rows)} conditions x {len(plan['seeds'])} seed(s) on {plan['device']}"
    sentence = verdict(contrasts, plan)
    pictures = "\n".join(f"![{name}]({name})" for name in plots) if plots else (
        "Plots (dev curves, loss per step, cost against quality): `pip install matplotlib`, then run the same "
        "command again; nothing is retrained. Their data is in study.json (figures_data).")
    printed = [title, f"{preset}; on top of CONDITIONS: {json.dumps(settings)}", markdown_table(rows), sentence]
    with atomic_open(plan["out_dir"] / "study.md") as f:
        f.write("\n\n".join(printed + [LEGEND, pictures]) + "\n")
    write_json(plan["out_dir"] / "study.json", {
        "model": plan["model"], "preset": plan["preset"], "preset_description": preset, "preset_settings": settings,
        "conditions": {"-".join(condition): CONDITIONS[condition] for condition in selection(plan)},
        "seeds": plan["seeds"], "sample_seeds": plan["sample_seeds"], "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "multiple_comparisons": "Holm", "verdict": sentence, "legend": LEGEND, "plots": plots,
        "rows": [{k: v for k, v in row.items() if k != "history"} for row in rows], "contrasts": contrasts,
        "figures_data": data})
    print("\n" + "\n\n".join(printed))
    print(f"\nwritten: {plan['out_dir'] / 'study.md'} and {plan['out_dir'] / 'study.json'}")
    return rows


def main(argv=None):
    try:
        return flags.main(lambda config: study(check_args(config)), SETTINGS, __doc__, argv)
    except Interrupted as e:
        stopped = ", ".join(Path(d).name for d in e.stopped) or "none was training"
        print(f"interrupted: every run stopped; {len(e.stopped)} run(s) interrupted ({stopped}), each resumable: run "
              f"the same command again to go on where the study stopped", file=sys.stderr)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    main()
