"""The README and the docs pages, run: so that they cannot drift from the code.

The pages are README.md and docs/**/*.md, without what bench/tables.py generates (docs/benchmarks/
and the README's ``<!-- results: ... -->`` part). Every fenced python block is executed; every
shell command is run (the fenced bash blocks' commands in order, the prose's inline `cnf ...`,
`python ...`, `ruff ...` spans, every bench/ or examples/ script a page names), each once however
many pages show it, and each must succeed as written. What cannot run here is in ``EXEMPT`` with
its reason; a command that is neither run nor exempt, or a stale exemption, fails the suite.

What is changed on the way, and only this: ``cnf train`` and ``cnf animate`` get small settings
appended (``TRAIN_SMALL``, ``FM_SMALL``, ``UNET_SMALL``, ``ANIMATE_SMALL``; argparse lets the last
of a repeated flag win, and a page's ``--iters`` is for real use); scripts get their smallest
options (``SCRIPT_SMALL``) and are ``slow``; python blocks get ``PY_SMALL``'s keyword arguments and
loops of at most ``PY_LOOP`` iterations. Each block runs in an empty directory on one torch
thread, with the inputs it names (``INPUTS``) and the runs it reads without training them, which
the pages' own ``cnf train ... --out RUN`` trains once per session.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
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
GENERATED_DOCS = ROOT / "docs" / "benchmarks"
DOCS_PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if GENERATED_DOCS not in p.parents)
PAGES = [ROOT / "README.md", *DOCS_PAGES]
GENERATED = re.compile(r"<!-- results: [\w-]+ -->.*?<!-- /results -->", re.S)
README_MAX_LINES = 250  # a front door (zuko 99, diffrax 82, nanoGPT 234): guides go in docs/

# What cannot run here, by the command's text (its words as the shell splits them, quotes
# removed, `&&` chains split, comments stripped). Each entry must still be on some page.
FASHION_GPU = (
    "cnf train --data fashion-mnist --device cuda --objective mle --batch-size 200 --lr 1e-3 "
    "--adjoint --hidden 64,64,64 --blocks 2 --conv-layer concat --activation softplus --learn-T "
    "--method dopri5 --atol 1e-5 --rtol 1e-5 --eval-atol 1e-5 --eval-rtol 1e-5"
)
NETWORK = "installs from the network (the suite runs on what is installed)"
EXEMPT = {
    "python3 -m venv .venv": "creates a virtual environment: the suite already runs in one",
    ". .venv/bin/activate": "a shell builtin that activates that environment",
    "pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu": NETWORK,
    "pip install torch==2.13.0": NETWORK,
    "pip install -e .[dev]": NETWORK,
    "pip install -e .[dev,docs]": NETWORK,
    "pip install -e .[docs]": NETWORK,
    "pip install cnf[tensorboard]": NETWORK,
    "pip install cnf[maf]": NETWORK,
    "pip install cnf[mnist5k]": NETWORK,
    "pip install zuko": NETWORK,
    "python -m pytest": "the test suite itself, which runs this file",
    "python -m pytest -m slow": "the test suite itself (this file's slow tests run there)",
    "bash .ci/run": "CI: a fresh venv, the network installs above, then the whole suite",
    "mkdocs serve": "a server that runs until stopped; test_docs_build builds the site",
    "mkdocs build": "writes site/ into the repository; test_docs_build builds it elsewhere",
    "sudo apt-get install dataset-fashion-mnist": "needs root and the network",
    FASHION_GPU: "needs a CUDA device and the Fashion-MNIST files",
    "cnf eval --validity": "a fragment of prose, no run named: `cnf eval runs/cb --validity` runs",
    "torchrun --standalone --nproc_per_node=2 -m cnf train --data 8gaussians --out runs/8g-ddp": (
        "several processes: tests/test_distributed.py runs torchrun on tiny runs"
    ),
    "torchrun --standalone --nproc_per_node=2 -m cnf train --resume runs/8g-ddp "
    "--finetune-iters 600": ("several processes: tests/test_distributed.py resumes a torchrun job"),
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 "
    "--rdzv-id=job1 -m cnf train --data fashion-mnist --device cuda --out runs/fmnist": (
        "two machines with 8 GPUs each"
    ),
    "torchrun ... .venv/bin/cnf train ...": "a pattern in prose, not a command",
    "python bench/bench_distributed.py": "torchrun jobs of about a minute each: run by hand",
    "python bench/bench_fm_speed.py": "compiles the U-Net with inductor (minutes): run by hand",
    "python bench/tables.py": "rewrites README.md and docs/benchmarks/ from the results files",
}

# `cnf train` in seconds: appended where the command does not give the flag itself (--iters
# always: a page's number of iterations is for real use).
TRAIN_SMALL = {"--iters": "6", "--eval-every": "3", "--test-size": "100",
               "--validity-size": "20", "--batch-size": "64", "--hidden": "16,16",
               "--no-progress": None}  # fmt: skip
IMAGE_SMALL = {"--blocks": "1"}  # image flows (a toy's or a table's refuses the flag)
FM_SMALL = {"--finetune-iters": "3"}  # a run that flow-matches, then fine-tunes (tables' preset)
UNET_SMALL = {"--unet-width": "8"}  # images by flow matching
RESUME_EXTRA = 6  # `--resume RUN --iters N`: N becomes the run's last iteration + this
ANIMATE_SMALL = {"--frames": "4", "--grid": "20", "--particles": "50", "--no-progress": None}

# The smallest options of each script the pages name, appended where the command does not give
# them. bench_toy.py passes what follows `--` to `cnf train` (it gets TRAIN_SMALL there).
SCRIPT_SMALL: dict[str, dict[str, str | None]] = {
    "bench/bench_toy.py": {},
    "bench/bench_core.py": {"--quick": None},
    "bench/bench_threads.py": {"--quick": None},
    "bench/bench_speed.py": {"--quick": None, "--no-baseline": None},
    "bench/bench_tabular.py": {"--quick": None},
    "bench/bench_conditional_images.py": {"--quick": None},
    "bench/bench_conditional.py": {
        "--quick": None,
        "--no-zuko": None,
        "--parts": "toys",
        "--data": "rotating-gaussian",
        "--systems": "cnf fm",
    },
    "bench/bench_images.py": {"--minutes": "0.02", "--eval-n": "10"},
    "bench/bench_image_recipes.py": {"--iters": "2", "--eval-n": "4", "--only": "preset"},
    "bench/bench_image_references.py": {"--minutes": "0.05"},
    "bench/bench_animate.py": {"--quick": None},
    "bench/bench_memory.py": {"--batches": "4"},
    "bench/bench_objectives.py": {"--quick": None, "--data": "8gaussians"},
    "examples/validity_experiment.py": {"--iters": "6"},
    "examples/toy_figures.py": {"--grid": "20"},
    "examples/animate_flows.py": {"--out": "figures"},  # not the repository's figures/
    "examples/ode_sine.py": {"--iters": "5"},
    "examples/ode_vs_resnet.py": {"--iters": "5"},
}
# Scripts that read what another page command writes (the pages say so), which runs first.
PREREQUISITES = {
    "examples/toy_figures.py": "python bench/bench_toy.py",
    "examples/animate_flows.py": "python bench/bench_toy.py",
}

# Python blocks: keyword arguments set on these calls (added, or replacing the page's value).
PY_SMALL = {
    "CNFDensity": {"max_iter": 5, "finetune_iter": 5},  # cnf.CNFDensity(...)
    "for_data": {"iters": 6, "test_size": 100, "validity_size": 20},  # TrainConfig.for_data(...)
    "TrainConfig": {"iters": 6, "test_size": 100, "validity_size": 20},
    "animate": {"frames": 4, "grid": 20},  # viz.animate(...)
}
PY_SMALL_GIVEN = {"replace": {"iters": 6, "finetune_iters": 3}}  # only where given: cfg.replace
FM_FINETUNE = {"finetune_iters": 3}  # a recipe that flow-matches (the tables' preset)
PY_LOOP = 5  # `for ... in range(N)`: at most this many iterations
PY_TRAINS = re.compile(r"\b(?:TrainConfig|CNFDensity)\b|\b(?:train|fit|animate)\(")

COMMAND_WORDS = {"cnf", "python", "python3", "pip", "pip3", "bash", "sh", "ruff", "sudo",
                 "torchrun", "apt-get", "git", "make", "uv", "conda", "mkdocs", "."}  # fmt: skip
SHELL_OPERATORS = {";", "|", "||", "&", ">", ">>", "<", "2>", "2>&1"}
RAW_RST = re.compile(r"``|:(?:mod|func|class|meth|attr|data|ref|obj):`")
LAB_NOTEBOOK = re.compile(
    r"\b(?:busy|quiet|loaded|shared)\b[^.]{0,40}\b(?:machine|day|core)s?\b"
    r"|\bdevelopment machine\b|\bcommit\s+[0-9a-f]{7,40}\b|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])"
    r"[0-9a-f]{7,40}\b",
    re.I,
)
SCRIPT = re.compile(r"(?:bench|examples)/[\w.-]+\.py")
REPO_PATH = re.compile(r"(?<![\w./-])((?:cnf|tests|examples|figures|docs)/[\w./-]*[\w/])")


def _write_mytable(path: Path) -> None:
    """The table of the tables page (`--columns age,income,3 --drop-nan`): named columns, and a
    missing cell of every kind it lists (empty, NA, nan, ?) every 30 rows."""
    rows = np.random.default_rng(0).normal([40, 3e4, 170, 0, 4], [10, 1e4, 8, 1, 2], (240, 5))
    lines = ["age,income,height,score,visits", *(",".join(f"{v:.2f}" for v in r) for r in rows)]
    for k, cell in enumerate(("", "NA", "nan", "?")):
        lines[8 + 30 * k] = cell + lines[8 + 30 * k][lines[8 + 30 * k].index(",") :]
    path.write_text("\n".join(lines) + "\n")


INPUTS = {"mytable.csv": _write_mytable}  # input files the pages name, written where named


# ---------------------------------------------------------------------------------------------
# Reading the pages
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    where: str  # "docs/tables.md:12", the opening fence
    info: str  # the fence's info string: "python", "bash", "text", ""
    line: int
    body: str


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    where: str  # "README.md:25"
    origin: str  # "bash block", "prose", "named script"

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def script(self) -> str | None:
        w = [*self.words, ""]
        return w[1] if w[0] in ("python", "python3") and SCRIPT.fullmatch(w[1]) else None


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*([^\s`]*)[^\n]*\n(.*?)^ {0,3}\1[ \t]*$", re.M | re.S)


def page_text(page: Path) -> str:
    """The page without what bench/tables.py generates (blanked, so line numbers hold)."""
    return GENERATED.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text())


def read_page(page: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced blocks, and the prose's paragraphs (first line, text)."""
    text, name = page_text(page), page.relative_to(ROOT).as_posix()
    blocks = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        blocks.append(Block(f"{name}:{line}", m.group(2).lower(), line, m.group(3)))
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    paragraphs, line = [], 1
    for para in re.split(r"(\n[ \t]*\n)", prose):
        if para.strip() and not para.isspace():
            paragraphs.append((line, para))
        line += para.count("\n")
    return blocks, paragraphs


def _split_chain(words: list[str], where: str, origin: str) -> list[Command]:
    """`a && b` is two commands; other shell operators are not supported here."""
    bad = SHELL_OPERATORS & set(words)
    assert not bad, f"{where}: {bad} in `{' '.join(words)}`: teach test_docs.py"
    out, part = [], []
    for w in [*words, "&&"]:
        if w != "&&":
            part.append(w)
        elif part:
            out.append(Command(tuple(part), where, origin))
            part = []
    return out


def bash_commands(block: Block) -> list[Command]:
    """Logical lines (continued by a trailing backslash), comments stripped, `&&` split."""
    out, buf, start = [], "", None
    for k, line in enumerate(block.body.splitlines()):
        start = block.line + 1 + k if start is None else start
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        where = f"{block.where.rsplit(':', 1)[0]}:{start}"
        out += _split_chain(shlex.split(buf + line, comments=True), where, "bash block")
        buf, start = "", None
    assert not buf.strip(), f"{block.where}: a bash block ends in a continued line"
    return out


def subcommands() -> list[str]:
    """The `cnf` command's subcommands, from its own `--help`."""
    rc, out = cli(["--help"], ROOT)
    assert rc == 0, out
    return re.search(r"\{([\w,-]+)\}", out).group(1).split(",")


def inline_spans(name: str, paragraphs) -> list[tuple[str, str]]:
    """Inline code spans of the prose, (where, text), a span broken over lines joined."""
    spans = []
    for line, para in paragraphs:
        for m in re.finditer(r"(`+)(.+?)\1", para, re.S):
            at = line + para.count("\n", 0, m.start())
            spans.append((f"{name}:{at}", " ".join(m.group(2).split())))
    return spans


@dataclass(frozen=True)
class Docs:
    blocks: list[Block]
    paragraphs: dict[str, list[tuple[int, str]]]  # page name -> its prose
    # every command: each distinct bash block's steps, then each prose command and named script
    # that no block has, once
    commands: list[Command]
    mentions: list[tuple[str, str]]  # (where, subcommand): `cnf animate` named in prose
    scripts: set[str]  # every bench/ or examples/ script named anywhere


def read_docs() -> Docs:
    blocks, paragraphs, inline, mentions, named = [], {}, [], [], {}
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        page_blocks, paragraphs[name] = read_page(page)
        blocks += page_blocks
        for where, span in inline_spans(name, paragraphs[name]):
            words = span.split()
            if len(words) < 2 or words[0] not in COMMAND_WORDS:
                continue
            words = shlex.split(span)
            if words[0] == "cnf" and len(words) == 2 and words[1] in SUBCOMMANDS:
                mentions.append((where, words[1]))  # names the subcommand; its blocks run it
            else:
                inline += _split_chain(words, where, "prose")
        for m in re.finditer(rf"(?<![\w/.])({SCRIPT.pattern})\b", page_text(page)):
            named.setdefault(
                m.group(1), f"{name}:{page_text(page).count(chr(10), 0, m.start()) + 1}"
            )
    commands, bodies = [], set()
    for block in blocks:
        if block.info == "bash" and block.body not in bodies:
            bodies.add(block.body)
            commands += bash_commands(block)  # a block's repeats run: they are its steps
    seen = {c.text for c in commands}
    for c in inline:
        if c.text not in seen:
            seen.add(c.text)
            commands.append(c)
    invoked = {c.script for c in commands}
    for script, where in named.items():
        if script not in invoked:  # named without a command line: run it as `python SCRIPT`
            commands.append(Command(("python", script), where, "named script"))
    return Docs(blocks, paragraphs, commands, mentions, set(named))


RUN = ("cnf", "script", "ruff")
SLUG = re.compile(r"[^\w.,=-]+")


def plan(cmd: Command) -> str | None:
    """How a command runs: "exempt", "cnf" (in-process), "script" (subprocess, slow), "ruff"
    (on the repository), or None: not handled, which test_every_command_is_run_or_exempt
    reports."""
    if cmd.text in EXEMPT:
        return "exempt"
    if cmd.words[0] == "cnf":
        return "cnf"
    if cmd.script is not None:
        return "script" if cmd.script in SCRIPT_SMALL else None
    return "ruff" if cmd.words[0] == "ruff" else None


def units(docs: Docs) -> list:
    """What each test_shell runs: a bash block's commands in order, or one prose command."""
    runs, bodies = [], set()
    for block in docs.blocks:
        if block.info == "bash" and block.body not in bodies:
            bodies.add(block.body)
            runs.append((block.where, [c for c in bash_commands(block) if plan(c) in RUN]))
    runs += [(c.where, [c]) for c in docs.commands if c.origin != "bash block" and plan(c) in RUN]
    slow = [pytest.mark.slow]
    return [pytest.param(cmds, marks=slow if any(plan(c) == "script" for c in cmds) else [],
                         id=f"{where}:{re.sub(SLUG, '_', cmds[0].text)[:50]}")
            for where, cmds in runs if cmds]  # fmt: skip


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


SUBCOMMANDS = subcommands()
DOCS = read_docs()
UNITS = units(DOCS)
PY_BLOCKS = list({b.body: b for b in DOCS.blocks if b.info == "python"}.values())


def _value(words, flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words[:-1] else None


def _append(words: list[str], small: dict[str, str | None], always=()) -> list[str]:
    extra = []
    for flag, value in small.items():
        if flag in always or flag not in words:
            extra += [flag] if value is None else [flag, value]
    return words + extra


def _small_extras(words) -> dict[str, str | None]:
    """A short fine-tuning where the recipe has one, a narrow U-Net where it trains one."""
    from cnf.training import TrainConfig

    given = {"objective": _value(words, "--objective")} if "--objective" in words else {}
    try:
        cfg = TrainConfig.for_data(_value(words, "--data") or TrainConfig().data, **given)
    except ValueError:  # an unknown dataset: the command itself says so
        return {}
    extra: dict[str, str | None] = {}
    if cfg.objective == "fm" and (cfg.finetune_iters or "--finetune-iters" in words):
        extra.update(FM_SMALL)
    if not {"--objective", "--iters", "--finetune-iters", "--budget"} & set(words):
        extra.update({"--objective": cfg.objective})  # the quick recipe, at the small lengths
    if cfg.model.image is not None:
        extra.update(IMAGE_SMALL)
    if cfg.model.image is not None and cfg.model.image.field.kind == "unet":
        extra.update(UNET_SMALL)
    return extra


def cnf_argv(words: list[str], cwd: Path) -> list[str]:
    """A page's `cnf ...` arguments (after `cnf`), with small settings appended."""
    if "--help" in words or "-h" in words:
        return words
    if words[0] == "train" and "--resume" in words:
        extra: dict[str, str | None] = {"--no-progress": None}
        run = cwd / _value(words, "--resume")
        done = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["iter"]
        if "--iters" in words:  # "or further than planned": past what the run has done
            extra = {"--iters": str(done + RESUME_EXTRA), **extra}
        if "--finetune-iters" in words:  # the same, in the maximum-likelihood phase
            first = json.loads((run / "config.json").read_text())["iters"]
            extra = {"--finetune-iters": str(done - first + RESUME_EXTRA), **extra}
        return _append(words, extra, always=("--iters", "--finetune-iters"))
    if words[0] == "train":
        small = {**TRAIN_SMALL, **_small_extras(words)}
        if "--budget" in words:  # a budget plans its own iterations: one second of them
            small = {k: v for k, v in small.items() if k not in ("--iters", "--finetune-iters")}
            small["--budget"] = "1"
        return _append(words, small, always=("--iters", "--finetune-iters", "--budget"))
    return _append(words, ANIMATE_SMALL) if words[0] == "animate" else words


def script_argv(words: list[str]) -> list[str]:
    """`python SCRIPT ARGS` with the script's smallest options, as a subprocess's argv."""
    script, args = words[1], list(words[2:])
    if script == "bench/bench_toy.py":  # what follows `--` goes to each `cnf train`
        cut = args.index("--") + 1 if "--" in args else len(args)
        head, tail = args[:cut] + ([] if "--" in args else ["--"]), args[cut:]
        args = head + _append(tail, TRAIN_SMALL, always=("--iters",))
    else:
        args = _append(args, SCRIPT_SMALL[script])
    return [sys.executable, str(ROOT / script), *args]


def read_runs(words) -> list[str]:
    """The run directories (`runs/...`) a command reads, not those it writes."""
    outputs = {"--out", "--runs", "-o", "--output", "--figure", "--grids"}
    return [w for k, w in enumerate(words) if w.startswith("runs/")
            and (k == 0 or words[k - 1] not in outputs)]  # fmt: skip


def write_inputs(text: str, cwd: Path) -> None:
    for name, write in INPUTS.items():
        if name in text and not (cwd / name).exists():
            write(cwd / name)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CNF_BENCH_RESULTS"}  # write nothing
    return {**env, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class Session:
    """What the tests share: runs trained once, and the scripts' runs (slow, run once)."""

    def __init__(self, root: Path) -> None:
        self.root, self.runs = root, root / "runs-made"
        self.runs.mkdir()
        self.scripts: dict[str, tuple[int, str, Path]] = {}

    @staticmethod
    def trainer(run: str) -> list[str] | None:
        """The pages' own `cnf train ... --out RUN` (its words after `cnf`)."""
        return next((list(c.words[1:]) for c in DOCS.commands if c.words[:2] == ("cnf", "train")
                     and _value(c.words, "--out") == run and plan(c) == "cnf"), None)  # fmt: skip

    def provide(self, run: str, cwd: Path) -> None:
        """Copy run directory ``run`` into ``cwd``, training it first if need be."""
        argv = self.trainer(run)
        assert argv is not None, f"no page trains {run} (`cnf train ... --out {run}`)"
        if not (self.runs / run).is_dir():
            write_inputs(" ".join(argv), self.runs)
            rc, out = cli(cnf_argv(argv, self.runs), self.runs)
            assert rc == 0, f"training {run} for the pages failed:\n$ cnf {' '.join(argv)}\n{out}"
        shutil.copytree(self.runs / run, cwd / run)

    def keep(self, words: tuple[str, ...], cwd: Path) -> None:
        """A run a test just trained as `provide` would: keep it instead of training it again."""
        run = _value(words, "--out")
        if run and self.trainer(run) == list(words[1:]) and not (self.runs / run).exists():
            shutil.copytree(cwd / run, self.runs / run)

    def script(self, cmd: Command) -> tuple[int, str, Path]:
        """Run a script command once per session, in its own directory."""
        if cmd.text not in self.scripts:
            cwd = Path(tempfile.mkdtemp(prefix="script-", dir=self.root))
            before = PREREQUISITES.get(cmd.script)
            if before is not None:
                rc, out, made = self.script(Command(tuple(shlex.split(before)), "", "named"))
                assert rc == 0, f"`{before}`, which `{cmd.text}` reads, failed:\n{out}"
                shutil.copytree(made / "runs", cwd / "runs", dirs_exist_ok=True)
            write_inputs(cmd.text, cwd)
            for run in read_runs(cmd.words):
                if not (cwd / run).exists():
                    self.provide(run, cwd)
            argv = script_argv(list(cmd.words))
            proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True)
            self.scripts[cmd.text] = (proc.returncode, f"{proc.stdout}\n{proc.stderr}", cwd)
        return self.scripts[cmd.text]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One torch thread (conftest restores the count): these tests are about what the pages'
    code does, not its speed, and two threads beside other work run slower than one."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def session(tmp_path_factory) -> Session:
    return Session(tmp_path_factory.mktemp("docs"))


def _failed(cmd: Command, argv, rc: int, out: str) -> str:
    tail = "\n".join(out.strip().splitlines()[-30:])
    return f"{cmd.where}: `{cmd.text}`\nran as: {' '.join(map(str, argv))}\nexit {rc}:\n{tail}"


def run_command(cmd: Command, cwd: Path, session: Session, made: set[str]) -> None:
    write_inputs(cmd.text, cwd)
    how = plan(cmd)
    if how == "cnf":
        for run in read_runs(cmd.words):
            if run not in made and not (cwd / run).exists():
                session.provide(run, cwd)  # read before this block trains it: made elsewhere
        argv = cnf_argv(list(cmd.words[1:]), cwd)
        assert argv[: len(cmd.words) - 1] == list(cmd.words[1:]), f"shrinking lost flags: {argv}"
        rc, out = cli(argv, cwd)
        assert rc == 0, _failed(cmd, ["cnf", *argv], rc, out)
        out_dir = _value(argv, "--resume") or _value(argv, "--out")
        if argv[0] == "train" and out_dir is not None:
            made.add(out_dir)
            assert (cwd / out_dir / "report.json").is_file(), _failed(cmd, argv, rc, out)
            session.keep(cmd.words, cwd)
        written = _value(argv, "-o") or _value(argv, "--output")
        assert written is None or (cwd / written).is_file(), _failed(cmd, argv, rc, out)
    elif how == "script":
        rc, out, _ = session.script(cmd)
        assert rc == 0, _failed(cmd, script_argv(list(cmd.words)), rc, out)
    else:  # ruff lints the repository, where the page's `.` is
        exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
        proc = subprocess.run([exe, *cmd.words[1:]], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, _failed(
            cmd, cmd.words, proc.returncode, proc.stdout + proc.stderr
        )


class _Shrink(ast.NodeTransformer):
    """Sets PY_SMALL's keywords on the calls it names (PY_SMALL_GIVEN's where given), and cuts
    `for ... in range(N)` to PY_LOOP iterations."""

    def __init__(self) -> None:
        self.applied: list[str] = []

    def visit_For(self, node: ast.For) -> ast.For:
        self.generic_visit(node)
        it = node.iter
        if isinstance(it, ast.Call) and getattr(it.func, "id", "") == "range" and len(it.args) == 1:
            n = it.args[0]
            if isinstance(n, ast.Constant) and isinstance(n.value, int) and n.value > PY_LOOP:
                it.args[0] = ast.copy_location(ast.Constant(PY_LOOP), n)
                self.applied.append(f"range({PY_LOOP})")
        return node

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
            value = given["objective"].value
            return isinstance(value, ast.Constant) and value.value == "fm"
        data = node.args[0] if node.args else getattr(given.get("data"), "value", None)
        if not (isinstance(data, ast.Constant) and isinstance(data.value, str)):
            return False
        lengths = {k: 1 for k in ("iters", "finetune_iters", "budget") if k in given}
        return TrainConfig.for_data(data.value, **lengths).objective == "fm"  # the quick recipe


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------
def test_fences_are_known_and_plain_blocks_hold_no_commands() -> None:
    """Blocks are python, bash, or plain text (diagrams, formulas); a plain block with a command
    line in it, or an indented code block, would go untested."""
    for block in DOCS.blocks:
        assert block.info in ("python", "bash", "", "text"), (
            f"{block.where}: a ```{block.info} block: teach test_docs.py to run it"
        )
        for k, line in enumerate(block.body.splitlines() if block.info in ("", "text") else []):
            words = line.lstrip("$ ").split()
            assert not (len(words) > 1 and words[0] in COMMAND_WORDS - {"."}), (
                f"{block.where} +{k + 1}: {line.strip()!r}: mark the block ```bash so that it runs"
            )
    for name, paragraphs in DOCS.paragraphs.items():
        for line, para in paragraphs:
            for k, text in enumerate(para.strip("\n").splitlines()):
                words = text.split()
                assert not (text.startswith("    ") and len(words) > 1
                            and words[0] in COMMAND_WORDS), (
                    f"{name}:{line + k}: {text.strip()!r} is an indented code block: "
                    "make it a ```bash block so that it runs"
                )  # fmt: skip


def test_every_command_is_run_or_exempt() -> None:
    """Every command on the pages is run by a test of this file, or is in EXEMPT; nothing in
    EXEMPT, SCRIPT_SMALL or PREREQUISITES is stale; every subcommand the prose names is run."""
    problems = [
        f"{c.where} ({c.origin}): `{c.text}` is neither run nor exempt"
        + (f": add {c.script}'s smallest options to SCRIPT_SMALL" if c.script else "")
        for c in DOCS.commands
        if plan(c) is None
    ]
    texts = {c.text for c in DOCS.commands}
    problems += [f"EXEMPT has `{t}`, which no page has" for t in EXEMPT if t not in texts]
    problems += [f"SCRIPT_SMALL has {s}, which no page names"
                 for s in SCRIPT_SMALL if s not in DOCS.scripts]  # fmt: skip
    problems += [f"PREREQUISITES: `{t}` is not a page command that runs"
                 for t in PREREQUISITES.values() if t not in texts or t in EXEMPT]  # fmt: skip
    ran = {c for u in UNITS for c in u.values[0]}
    problems += [f"{c.where}: `{c.text}` is in no test"
                 for c in DOCS.commands if plan(c) in RUN and c not in ran]  # fmt: skip
    subs = {c.words[1] for c in ran if c.words[0] == "cnf" and len(c.words) > 1}
    problems += [f"{where}: `cnf {sub}` is named, but no command on the pages runs it"
                 for where, sub in DOCS.mentions if sub not in subs]  # fmt: skip
    assert DOCS.commands and not problems, "\n".join(problems)


@pytest.mark.parametrize("commands", UNITS)
def test_shell(commands: list[Command], tmp_path: Path, session: Session) -> None:
    """A bash block's commands in order (or one prose command), in an empty directory; each
    exits 0."""
    made: set[str] = set()
    for cmd in commands:
        run_command(cmd, tmp_path, session, made)


@pytest.mark.parametrize("block", PY_BLOCKS, ids=[b.where for b in PY_BLOCKS])
def test_python_block(block: Block, tmp_path: Path, session: Session) -> None:
    """A python block runs as written (in a fresh namespace and an empty directory, with the
    runs it loads), its training shrunk by PY_SMALL and PY_LOOP."""
    tree = ast.increment_lineno(ast.parse(block.body), block.line)
    shrink = _Shrink()
    tree = ast.fix_missing_locations(shrink.visit(tree))
    assert shrink.applied or not PY_TRAINS.search(block.body), (
        f"{block.where}: this block trains, and nothing of PY_SMALL applies to it: add its call"
    )
    write_inputs(block.body, tmp_path)
    for run in sorted(set(re.findall(r"""["'](runs/[^"']+)["']""", block.body))):
        if session.trainer(run) is not None:  # loaded; one the block trains itself is not
            session.provide(run, tmp_path)
    code = compile(tree, str(ROOT / block.where.rsplit(":", 1)[0]), "exec")
    with inside(tmp_path):
        exec(code, {"__name__": "__docs__"})


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help_is_plain_text(sub: str | None, tmp_path: Path) -> None:
    """`cnf --help` and `cnf SUB --help` exit 0 and print no raw reStructuredText."""
    argv = ["--help"] if sub is None else [sub, "--help"]
    rc, out = cli(argv, tmp_path)
    assert rc == 0 and "usage:" in out, out
    assert not RAW_RST.search(out), f"raw RST in `cnf {' '.join(argv)}`: {RAW_RST.search(out)}"


def test_pages_are_not_a_lab_notebook() -> None:
    """The README is a front door (short, its results table generated between the markers that
    bench/tables.py fills); no page says how busy a machine was or quotes a commit hash; every
    path of the repository a page names exists."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES, "README.md: move the guide to docs/"
    assert readme.count("<!-- results: headline -->") == 1 == readme.count("<!-- /results -->")
    problems = []
    for page in PAGES:
        name, text = page.relative_to(ROOT).as_posix(), page_text(page)
        for m in LAB_NOTEBOOK.finditer(text):
            problems.append(f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}")
        for m in REPO_PATH.finditer(text):
            if not (ROOT / m.group(1).rstrip(".")).exists():
                problems.append(f"{name}: names {m.group(1)}, which does not exist")
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="needs cnf[docs]")
def test_docs_build(tmp_path: Path) -> None:
    """`mkdocs build --strict` (as CI runs it): no broken link, anchor or API reference."""
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
