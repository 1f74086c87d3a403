"""
Command-line flags, declared one way in every script (train_*.py, eval.py, study.py, bench.py): a table of rows

    SETTINGS = {"epochs": (10, int, at_least(1), "why this default"), ...}     name -> (default, type, valid, why)

and one function that turns argv into a checked dict:

    config = flags.parse(argv, SETTINGS, __doc__)     # --epochs 3, --epochs=3; a bool: --resume or --resume false

`valid` is None or (predicate, what it must be); a bad value is one line, "--epochs 0: must be at least 1",
before any work. A default of REQUIRED makes the flag required. flags.main runs a script's entry point and turns
every InputError (a bad flag, file or folder) into that one line and exit status 1, with no traceback.
"""

import argparse
import math
import sys

import torch

from fileio import InputError

REQUIRED = "(required)"


def at_least(low):
    return lambda v: v >= low, f"must be at least {low}"


def between(low, high):
    return lambda v: low <= v <= high, f"must be between {low} and {high}"


def one_of(*choices):
    return lambda v: v in choices, f"must be {', '.join(map(str, choices[:-1]))} or {choices[-1]}"


POSITIVE = (lambda v: v > 0 and math.isfinite(v), "must be a positive number")
NON_NEGATIVE = (lambda v: v >= 0 and math.isfinite(v), "must be 0 or more")
LIMIT = (lambda v: v >= 1, "must be at least 1 (leave it out to use every example)")


def parse_bool(value):
    if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value.lower() in ("1", "true", "yes", "on")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every error here is, instead of argparse's usage block
        sys.exit(f"error: {message} ({self.prog} --help lists the flags)")


def parse(argv, settings, doc):
    parser = OneLineParser(description=doc.strip().split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, (default, kind, _, why) in settings.items():
        names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        if kind is bool:
            parser.add_argument(*names, type=parse_bool, nargs="?", const=True, default=default, help=why)
        else:
            parser.add_argument(*names, type=kind, default=None if default is REQUIRED else default, help=why,
                                required=default is REQUIRED)
    return check(vars(parser.parse_args(argv)), settings)


def defaults(settings):
    return {name: row[0] for name, row in settings.items()}


def check(config, settings):
    """Every row's default filled in where `config` lacks it, and every value held against its row's `valid`."""
    config = {**defaults(settings), **config}
    for name, (default, _, valid, _) in settings.items():
        if config[name] is REQUIRED:
            raise InputError(f"--{name}: required")
        if valid is not None and config[name] is not None and not valid[0](config[name]):
            raise InputError(f"--{name} {config[name]}: {valid[1]}")
    return config


def default_device():
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def check_device(device, flag="--device"):
    """`device` if this machine has it (cpu, cuda, cuda:N, mps); else an InputError naming the devices there are."""
    here = ["cpu"]
    if torch.cuda.is_available():
        here += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        here += ["mps"]
    if str(device) not in here:
        kind = str(device).split(":")[0]
        why = (f"this machine has {torch.cuda.device_count()} CUDA device(s)" if kind == "cuda" and "cuda" in here
               else f"{kind.upper()} is not available on this machine" if kind in ("cuda", "mps")
               else "not a device name")
        raise InputError(f"{flag} {device!r}: {why}; valid here: {', '.join(here)}")
    return str(device)


def main(entry, settings, doc, argv=None):
    try:
        return entry(parse(argv, settings, doc))
    except InputError as e:
        sys.exit(f"error: {e}")
