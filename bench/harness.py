"""What every benchmark under bench/ shares: a CPU timer, the machine record, one Markdown table
printer and one writer of the results file that ``python bench/tables.py`` turns into the docs.

After ``parse_args``: ``results = harness.start(__file__, parser, args)``, then
``results.table(name, title, columns, rows)`` per table (printed, and kept), then
``results.write()``. Where the file goes (never into the repository from another directory) and
its schema: bench/results/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = 1
ENV = "CNF_BENCH_RESULTS"


@dataclass
class Timer:
    """CPU seconds of this process and of its children that ended, and wall seconds."""

    cpu: float = 0.0
    wall: float = 0.0


def _cpu() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


@contextmanager
def timed() -> Iterator[Timer]:
    """``with timed() as t: ...``, then ``t.cpu`` and ``t.wall`` (seconds)."""
    timer, c0, w0 = Timer(), _cpu(), time.perf_counter()
    try:
        yield timer
    finally:
        timer.cpu, timer.wall = _cpu() - c0, time.perf_counter() - w0


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine() -> dict:
    """The machine and software a result was measured with (``Results`` adds the load)."""
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    status = _git("status", "--porcelain", "--untracked-files=no")
    return dict(cpu=model.group(1) if model else platform.processor() or platform.machine(),
                logical_cores=os.cpu_count(), memory_gib=round(memory, 1),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                torch=torch.__version__, torch_threads=torch.get_num_threads(),
                python=platform.python_version(), commit=_git("rev-parse", "--short", "HEAD"),
                dirty=None if status is None else bool(status),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"))  # fmt: skip


@dataclass(frozen=True)
class Column:
    """``key`` of the rows' dicts, header ``label``, ``fmt`` a ``str.format`` template for a
    number, ``unit`` and ``about`` for the reader; ``best`` ("min", "max") bolds a row's best
    value among the columns that have it."""

    key: str
    label: str
    fmt: str = "{}"
    unit: str = ""
    about: str = ""
    best: str | None = None


@dataclass
class Table:
    name: str
    title: str
    columns: list[Column]
    rows: list[dict]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _plain(value: object) -> object:
    """``value`` with NaN and infinities as None: a results file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def format_cell(column: Column, value: object) -> str:
    """None and NaN blank, a list ``a / b``, a bool yes or no, a number by ``column.fmt``."""
    if value is None or value != value:  # NaN is not equal to itself
        return ""
    if isinstance(value, list | tuple):
        return " / ".join(format_cell(column, v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if _number(value):
        return column.fmt.format(value)
    return str(value).replace("|", "\\|")  # a bar would end the cell


def format_table(columns: list[Column], rows: list[dict]) -> str:
    """The rows as a Markdown table: numbers right-aligned, each row's best in bold."""
    right = [any(_number(r.get(c.key)) or isinstance(r.get(c.key), list) for r in rows)
             for c in columns]  # fmt: skip
    lines = ["| " + " | ".join(c.label for c in columns) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]  # fmt: skip
    for row in rows:
        cells = [format_cell(c, row.get(c.key)) for c in columns]
        for pick in (min, max):
            ranked = [(row[c.key], k) for k, c in enumerate(columns)
                      if c.best == pick.__name__ and _number(row.get(c.key))
                      and math.isfinite(row[c.key])]  # fmt: skip
            if ranked:
                k = pick(ranked)[1]
                cells[k] = f"**{cells[k]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variant(settings: dict, defaults: dict) -> str:
    """The settings that differ from their defaults, as a file-name slug ('' for none): a flag by
    its name, words (datasets, rows) as they are, numbers after the option's name."""
    parts = []
    for key, value in settings.items():
        if value == defaults.get(key) or value in ([], None):
            continue
        name, values = key.replace("_", "-"), value if isinstance(value, list) else [value]
        if isinstance(value, bool):
            parts.append(name if value else f"no-{name}")
        else:
            words = all(isinstance(v, str | Path) for v in values)
            parts += [] if words else [name]
            parts += [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
    text = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    if len(text) > 60:  # shortened, and kept unique
        text = text[:51].rstrip("-") + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--results PATH`` and ``--no-results``, for every benchmark."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--results", type=Path, metavar="PATH", help="write the results file "
                       f"here (default: bench/results/, see bench/harness.py; ${ENV})")  # fmt: skip
    where.add_argument("--no-results", action="store_true", help="write no results file")


def _command() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else Path(sys.argv[0])
    return shlex.join(["python", str(shown), *sys.argv[1:]])


@dataclass
class Results:
    """One run of a benchmark: its tables, then ``write()`` (see the module's docstring)."""

    benchmark: str
    settings: dict
    variant: str = ""
    target: Path | None = None
    why_not: str = ""  # why there is no target
    command: str = field(default_factory=_command)
    tables: list[Table] = field(default_factory=list)
    load_before: float = field(default_factory=lambda: round(os.getloadavg()[0], 2))
    clock: tuple[float, float] = field(default_factory=lambda: (_cpu(), time.perf_counter()))

    @property
    def file_name(self) -> str:
        return f"{self.benchmark}{'-' if self.variant else ''}{self.variant}.json"

    def table(self, name: str, title: str, columns: list[Column], rows: list[dict]) -> None:
        """Print the table (after a blank line and its title) and keep it for the file."""
        self.tables.append(Table(name, title, list(columns), rows))
        print(f"\n{title}\n\n{format_table(columns, rows)}", flush=True)

    def record(self) -> dict:
        cpu, wall = _cpu() - self.clock[0], time.perf_counter() - self.clock[1]
        load = dict(load_before=self.load_before, load_after=round(os.getloadavg()[0], 2))
        return dict(schema=SCHEMA, benchmark=self.benchmark, variant=self.variant,
                    command=self.command, settings=self.settings, machine={**machine(), **load},
                    cost=dict(cpu_s=round(cpu, 2), wall_s=round(wall, 2)),
                    tables=[asdict(t) for t in self.tables])  # fmt: skip

    def write(self) -> Path | None:
        """Write the results file atomically (a temporary file, then ``os.replace``)."""
        if self.target is None:
            print(f"results: no file written ({self.why_not})", file=sys.stderr)
            return None
        self.target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_plain(self.record()), indent=1, default=str, allow_nan=False) + "\n"
        with tempfile.NamedTemporaryFile("w", dir=self.target.parent, suffix=".tmp",
                                         delete=False) as tmp:  # fmt: skip
            tmp.write(text)
        os.chmod(tmp.name, 0o644)  # a temporary file is private; a results file is not
        os.replace(tmp.name, self.target)
        print(f"results: {self.target}", file=sys.stderr)
        return self.target


def start(script: str, parser: argparse.ArgumentParser, args: argparse.Namespace, *,
          ignore: Iterable[str] = (), smoke: bool = False) -> Results:  # fmt: skip
    """The run's ``Results``, from the parsed options (before the script changes any); ``ignore``
    names options that say where output goes, not what is measured (``--grids``)."""
    hidden = {a.dest for a in parser._actions if a.help == argparse.SUPPRESS}
    hidden |= {"results", "no_results", "help"}
    settings = {k: v for k, v in vars(args).items() if k not in hidden}
    measured = {k: v for k, v in settings.items() if k not in set(ignore)}
    results = Results(Path(script).stem, settings, variant(measured, vars(parser.parse_args([]))))
    results.target, results.why_not = _target(args, results.file_name, smoke)
    return results


def _target(args: argparse.Namespace, name: str, smoke: bool) -> tuple[Path | None, str]:
    """Where the results file goes, or why nowhere (see the module's docstring)."""
    env, here = os.environ.get(ENV), Path.cwd() / "bench" / "results"
    if args.no_results:
        return None, "--no-results"
    if args.results is not None:
        return args.results, ""
    if smoke:
        return None, "a smoke run: --results PATH keeps one"
    if env or here.is_dir():
        return (Path(env) if env else here) / name, ""
    return None, f"no bench/results/ here and no ${ENV}: --results PATH keeps one"
