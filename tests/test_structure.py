"""The shape the code keeps for its readers: one training loop, imports that run one way, short functions and
short training scripts. Each check reads the source with Python's own parser."""

import ast

import pytest

from conftest import ROOT

# The reading order, which is also the only direction imports may run: a module imports only those before it.
ORDER = ["fileio", "stats", "flags", "data", "model", "chunked_logprobs", "lora", "checkpoint", "eval", "runlog",
         "trainer", "train_sft", "preferences", "train_dpo", "train_orpo", "jobs", "plot", "study", "bench"]
SOURCES = sorted([*ROOT.glob("*.py"), *ROOT.glob("data/*.py")])


def project_module(name):
    """'data.quora' -> 'data', 'train_sft' -> 'train_sft'; None for anything not ours (torch, json, ...)."""
    top = name.split(".")[0]
    return top if top in ORDER else None


def imports(tree):
    """(module imported, whether inside a function) for every import statement of a parsed file."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                found.append((child.module, inside))
            visit(child, inside)

    visit(tree, False)
    return found


def module_name(path):
    return "data" if path.parent.name == "data" else path.stem


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way_and_never_from_inside_a_function(path):
    me = module_name(path)
    if me not in ORDER:
        pytest.skip(f"{path.name} is not part of the reading order")
    for name, in_function in imports(ast.parse(path.read_text())):
        theirs = project_module(name)
        if theirs is None or theirs == me:
            continue
        assert ORDER.index(theirs) < ORDER.index(me), f"{path.name} imports {name}, which comes after it"
        assert not in_function, f"{path.name} imports {name} inside a function"


def test_model_imports_nothing_from_the_project():
    assert all(project_module(name) is None for name, _ in imports(ast.parse((ROOT / "model.py").read_text())))


def test_only_flags_declares_a_command_line():
    """One flag mechanism: every script declares rows and calls flags.parse; nothing else builds an argparse parser."""
    for path in SOURCES:
        if path.name != "flags.py":
            assert "ArgumentParser" not in path.read_text(), path.name


def lines(*names):
    return sum(len((ROOT / name).read_text().splitlines()) for name in names)


def test_the_line_budgets_hold():
    """A student reads the core in one sitting: model, LoRA, the loop, SFT and DPO in 1,500 lines; the study and
    the benchmark stay what they measure."""
    assert lines("model.py") <= 420
    assert lines("model.py", "lora.py", "trainer.py", "train_sft.py", "train_dpo.py") <= 1500
    assert lines("study.py") <= 600 and lines("bench.py") <= 550


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_over_100_lines(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno + 1 <= 100, f"{path.name}:{node.lineno} {node.name}"


def test_the_training_loop_exists_once():
    """Only trainer.py takes a backward pass (bench.py times steps on its own, to compare them side by side)."""
    calling = {p.name for p in SOURCES if ".backward(" in p.read_text()}
    assert calling - {"bench.py"} == {"trainer.py"}


def test_the_training_scripts_stay_short_and_dpo_uses_few_sft_names():
    assert len((ROOT / "train_sft.py").read_text().splitlines()) <= 400
    assert len((ROOT / "train_dpo.py").read_text().splitlines()) <= 320
    used = set()
    for node in ast.walk(ast.parse((ROOT / "train_dpo.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "train_sft":
            used |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "train_sft":
            used.add(node.attr)
    assert 0 < len(used) <= 8, sorted(used)
