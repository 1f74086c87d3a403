"""
Training runs, one after another in this process (run_here) or up to N at once as train_*.py processes
(run_in_processes): what study.py --jobs does. Both return {out_dir: results.json's dict} and skip a run whose
results.json exists. SIGINT or SIGTERM to the study (Interrupted) is passed on: every live run saves a checkpoint
and exits 128 + the signal, and the study names them; run again, each resumes.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import torch

from fileio import InputError, read_json

ROOT = Path(__file__).resolve().parent


def finished(config):
    """The run's results.json as a dict if it has finished, else None."""
    path = Path(config["out_dir"]) / "results.json"
    return read_json(path) if path.exists() else None


class Interrupted(Exception):
    """SIGINT or SIGTERM reached the study: the signal, and the runs it stopped (each saved a checkpoint)."""

    def __init__(self, signum, stopped=()):
        super().__init__(signum)
        self.signum, self.stopped = signum, list(stopped)


def interrupt(signum, frame):
    raise Interrupted(signum)


def run_here(planned):
    """--jobs 1: each run a call of its trainer's train(config) in this process."""
    results = {}
    for i, (trainer, config) in enumerate(planned, 1):
        what, done = f"[{i}/{len(planned)}] {Path(config['out_dir']).name}", finished(config)
        if done is not None:
            print(f"{what}: done already ({config['out_dir']}/results.json)")
            results[config["out_dir"]] = done
            continue
        print(f"{what}: {trainer.__name__}.train from {config['init_from']}", flush=True)
        try:
            results[config["out_dir"]] = trainer.train(dict(config))
        except (Interrupted, KeyboardInterrupt) as e:
            raise Interrupted(getattr(e, "signum", signal.SIGINT), [config["out_dir"]]) from None
        except SystemExit as e:  # a run stopped by a signal saves a checkpoint and exits with 128 + its number
            if e.code not in (128 + signal.SIGINT, 128 + signal.SIGTERM):
                raise
            raise Interrupted(e.code - 128, [config["out_dir"]]) from None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the finished run's cached blocks back
    return results


def command(trainer, config):
    """The run as a command line: every setting a flag (--name value; booleans true/false; None left out)."""
    argv = []
    for name, value in config.items():
        if value is not None:
            argv += [f"--{name}", ("true" if value else "false") if isinstance(value, bool) else str(value)]
    return [sys.executable, str(ROOT / f"{trainer.__name__}.py"), *argv]


def launch(trainer, config, env):
    """The run as a process in its own process group, appending to <run>/train.log. On Linux it gets SIGTERM if
    the study dies, even by SIGKILL (prctl 1 = PR_SET_PDEATHSIG)."""
    Path(config["out_dir"]).mkdir(parents=True, exist_ok=True)
    die_with_parent = (lambda: ctypes.CDLL(None).prctl(1, signal.SIGTERM)) if sys.platform == "linux" else None
    with open(Path(config["out_dir"]) / "train.log", "a") as log:
        return subprocess.Popen(command(trainer, config), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=die_with_parent)


def stop(running, sig, grace=60):
    """`sig` to every live run's process group, then SIGKILL to any still running after `grace` seconds. Returns
    the out_dirs of the runs that were live."""
    live = [proc for proc in running if proc.poll() is None]
    deadline = time.time() + grace
    for proc in live:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    for proc in live:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return [running[proc][1]["out_dir"] for proc in live]


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


def run_in_processes(planned, jobs, device):
    """--jobs N: up to N runs at once, each `python train_sft.py ...` etc. with its share of the machine (the least
    busy GPU with --device cuda, cores / N threads), one line per finished run. On the way out every live run is
    stopped: with the signal that interrupted the study (Interrupted), else SIGTERM. Returns {out_dir: results}."""
    results = {c["out_dir"]: done for _, c in planned if (done := finished(c)) is not None}
    waiting = [(t, c) for t, c in planned if c["out_dir"] not in results]
    visible = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    # with --device cuda every visible GPU; else none (the CPU, MPS or one named GPU, which all share)
    gpus = (visible or [str(i) for i in range(torch.cuda.device_count())]) if device == "cuda" else []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = str(max(1, cores // jobs))
    running, failed, total, count = {}, [], len(waiting), 0
    print(f"{len(results)} run(s) done already; training {total}, up to {jobs} at a time "
          f"({'GPUs ' + ','.join(gpus) if gpus else device}); each logs to <run>/train.log", flush=True)
    try:
        while waiting or running:
            for trainer, config in ready(waiting, running, failed, jobs - len(running)):
                gpu = min(gpus, key=lambda g: [held for held, _ in running.values()].count(g)) if gpus else None
                env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                       **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
                running[launch(trainer, config, env)] = (gpu, config)
            proc = next(iter(p for p in running if p.poll() is not None), None)
            if proc is None:
                time.sleep(0.2)
                continue
            _, config = running.pop(proc)
            done, count = finished(config) if proc.returncode == 0 else None, count + 1
            what, log = f"[{count}/{total}] {Path(config['out_dir']).name}", Path(config["out_dir"]) / "train.log"
            if done is None:
                failed.append(config["out_dir"])
                last = log.read_text(errors="replace").strip().split("\n")[-1] if log.exists() else ""
                print(f"{what}: FAILED (exit code {proc.returncode}): {last} ({log})", flush=True)
            else:
                results[config["out_dir"]] = done
                print(f"{what}: {done['score_name']} {done['score']:.4f} (final epoch), "
                      f"{done['train_seconds']:.1f} s training ({log})", flush=True)
    except Interrupted as e:
        raise Interrupted(e.signum, stop(running, e.signum)) from None
    finally:
        stop(running, signal.SIGTERM)
    if failed:
        raise InputError(f"{len(failed)} run(s) failed or could not start: {', '.join(Path(f).name for f in failed)}; "
                         f"see each one's train.log, then run the same command again")
    return results
