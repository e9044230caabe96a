"""The benchmarks' harness (bench/harness.py) and the tables' generator (bench/tables.py): the
results file and its schema, the one table printer, where a file goes, and the regeneration of
the docs' pages and of the README's marked block alone. No benchmark is run here but one smoke
run of the conditional benchmark (bench/bench_conditional.py --quick), where zuko is installed."""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
import tables  # noqa: E402
from harness import Column  # noqa: E402

SCHEMA = {"schema", "benchmark", "variant", "command", "settings", "machine", "cost", "tables"}
MACHINE = {"cpu", "logical_cores", "memory_gib", "gpu", "torch", "torch_threads", "python",
           "commit", "dirty", "date", "load_before", "load_after"}  # fmt: skip
COLUMN = {"key", "label", "fmt", "unit", "about", "best"}
COLUMNS = [
    Column("name", "model"),
    Column("nll", "NLL", "{:.2f}", "nats", "test NLL", best="min"),
    Column("base", "baseline", "{:.2f}", "nats", best="min"),
    Column("times", "CPU s", "{:.0f}", "s"),
    Column("ok", "valid"),
]
ROWS = [
    dict(name="cnf", nll=1.234, base=2.0, times=[3.2, 40.0], ok=True),
    dict(name="a | b", nll=math.nan, base=1.5, times=None, ok=False),
]
TABLE = """| model | NLL | baseline | CPU s | valid |
|---|---:|---:|---:|---|
| cnf | **1.23** | 2.00 | 3 / 40 | yes |
| a \\| b |  | **1.50** |  | no |"""


def parser_for(*extra: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", nargs="+", default=["8gaussians", "rings"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[30, 60])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--figure", type=Path, default=Path("figures/x.png"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    harness.add_arguments(parser)
    return parser


def start(argv: list[str], **kwargs) -> harness.Results:
    parser = parser_for()
    return harness.start("bench/bench_fake.py", parser, parser.parse_args(argv), **kwargs)


def test_the_table_printer() -> None:
    """Numbers by their format and right-aligned, a row's best in bold, a list `a / b`, None
    and NaN blank, a bool yes or no, a bar in a cell escaped."""
    assert harness.format_table(COLUMNS, ROWS) == TABLE


def test_a_results_file_has_every_field_of_the_schema(tmp_path: Path, capsys) -> None:
    target = tmp_path / "out" / "fake.json"
    results = start(["--data", "rings", "--results", str(target)])
    results.table("kl", "A title", COLUMNS, ROWS)
    assert results.write() == target
    assert capsys.readouterr().out == f"\nA title\n\n{TABLE}\n"
    record = json.loads(target.read_text(), parse_constant=pytest.fail)  # strict: no NaN
    assert set(record) == SCHEMA and record["schema"] == harness.SCHEMA
    assert record["benchmark"] == "bench_fake" and record["variant"] == "rings"
    assert record["command"].startswith("python ")
    assert set(record["machine"]) == MACHINE
    assert isinstance(record["machine"]["load_before"], float)
    assert set(record["cost"]) == {"cpu_s", "wall_s"} and record["cost"]["cpu_s"] >= 0
    assert record["settings"] == {"data": ["rings"], "budgets": [30, 60], "quick": False,
                                  "figure": "figures/x.png"}  # fmt: skip
    (table,) = record["tables"]
    assert (table["name"], table["title"]) == ("kl", "A title")
    assert all(set(c) == COLUMN for c in table["columns"])
    assert table["rows"] == [ROWS[0], {**ROWS[1], "nll": None}]
    assert list(target.parent.iterdir()) == [target]  # written through a temporary, replaced


def test_a_timer_counts_cpu_seconds() -> None:
    with harness.timed() as t:
        sum(i * i for i in range(200_000))
    assert t.cpu > 0 and t.wall > 0


def test_the_file_name_names_the_options_that_differ_from_their_defaults() -> None:
    assert start([]).file_name == "bench_fake.json"
    assert start(["--data", "8gaussians"]).file_name == "bench_fake-8gaussians.json"
    assert start(["--budgets", "30", "0.5"]).variant == "budgets-30-0-5"
    assert start(["--quick"]).variant == "quick"
    ignored = start(["--figure", "elsewhere.png"], ignore=("figure",))
    assert ignored.variant == "" and ignored.settings["figure"] == Path("elsewhere.png")
    assert len(start(["--data", *(["checkerboard"] * 20)]).variant) <= 60


def test_where_results_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nowhere from a directory without bench/results/ (the README's tests run the scripts in
    one), there from the repository's root, where $CNF_BENCH_RESULTS or --results says, and
    nowhere for a smoke run or --no-results."""
    monkeypatch.delenv(harness.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert start([]).target is None and "--results PATH" in start([]).why_not
    (tmp_path / "bench" / "results").mkdir(parents=True)
    assert start([]).target == tmp_path / "bench" / "results" / "bench_fake.json"
    assert start(["--quick"], smoke=True).target is None
    assert start(["--quick", "--results", "x.json"], smoke=True).target == Path("x.json")
    assert start(["--no-results"]).target is None
    monkeypatch.setenv(harness.ENV, str(tmp_path / "env"))
    assert start(["--data", "rings"]).target == tmp_path / "env" / "bench_fake-rings.json"
    start([]).write()
    assert (tmp_path / "env" / "bench_fake.json").is_file()


SCRIPT = '''"""{summary}

    python bench/{name}.py             # the default run
    python bench/{name}.py --quick     # a smoke run

How it measures: with :func:`cnf.evaluate.evaluate` and ``exact`` traces.
"""
'''


def fake_repo(tmp_path: Path, readme: bytes) -> tuple[Path, list[str]]:
    bench, results = tmp_path / "bench", tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    for name, summary in (("bench_core", "Core speed."), ("bench_new", "Something new.")):
        (bench / f"{name}.py").write_text(SCRIPT.format(name=name, summary=summary))
    record = start([], ignore=())
    record.benchmark, record.command = "bench_core", "python bench/bench_core.py"
    record.table("speed", "Speed", COLUMNS, ROWS)
    record.target = results / "bench_core.json"
    record.write()
    (tmp_path / "README.md").write_bytes(readme)
    argv = ["--results", str(results), "--docs", str(tmp_path / "docs"), "--bench", str(bench),
            "--readme", str(tmp_path / "README.md")]  # fmt: skip
    return tmp_path, argv


def test_tables_regenerates_the_pages_and_the_marked_block_alone(tmp_path: Path) -> None:
    before = "# Title\r\nSome text, `python x.py`.\r\n\r\n<!-- results: headline -->\n"
    after = (
        "<!-- /results -->\r\nThe rest | stays\n<!-- results: bench_core -->old<!-- /results -->\n"
    )
    root, argv = fake_repo(tmp_path, (before + "*old table*\n" + after).encode())
    tables.HEADLINE, old = ("bench_core", "speed", ("name",)), tables.HEADLINE
    try:
        assert tables.main(argv) == 0
        assert tables.main([*argv, "--check"]) == 0  # what it wrote is what it would write
    finally:
        tables.HEADLINE = old
    text = (root / "README.md").read_bytes().decode()
    assert text.startswith(before) and "*old table*" not in text
    block = text[len(before) : text.index("<!-- /results -->")]
    assert "| cnf | **1.23** | 2.00 |" in block and "CPU s" not in block  # the kept columns
    assert text[text.index("<!-- /results -->") :].startswith(after.split("<!-- results")[0])
    assert "python bench/bench_core.py" in text.split("results: bench_core -->")[1]
    index = (root / "docs" / "index.md").read_text()
    assert index.startswith("<!-- Generated by `python bench/tables.py`")
    assert TABLE in index and "load average" in index
    assert "Not yet measured on this machine: run `python bench/bench_new.py`." in index
    page = (root / "docs" / "bench_core.md").read_text()
    assert "`cnf.evaluate.evaluate`" in page and "`exact`" in page and ":func:" not in page
    assert "python bench/bench_core.py --quick     # a smoke run" in page


def test_tables_check_finds_a_stale_page_and_leaves_a_readme_without_markers(tmp_path) -> None:
    readme = b"# No markers\r\n| a | b |\n"
    root, argv = fake_repo(tmp_path, readme)
    assert tables.main([*argv, "--check"]) == 1 and not (root / "docs").exists()
    assert tables.main(argv) == 0
    (root / "docs" / "index.md").write_text("edited by hand\n")
    assert tables.main([*argv, "--check"]) == 1
    assert (root / "README.md").read_bytes() == readme


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("bench_*.py")), ids=lambda p: p.stem)
def test_every_benchmark_uses_the_harness(path: Path) -> None:
    """Its results through the harness, no table printed by hand, a command to run first."""
    source = path.read_text()
    assert "harness.start(__file__, parser, args" in source and "results.write()" in source
    assert "harness.add_arguments(parser)" in source
    assert not re.search(r"""print\(f?["']\|""", source), "a hand-rolled table printer"
    assert re.fullmatch(r"python bench/bench_\w+\.py( [\w./-]+)*", tables.read_script(path).command)


def test_the_benchmark_pages_are_generated_from_the_results_files() -> None:
    """docs/benchmarks/ is what `python bench/tables.py` makes of bench/results/ and the scripts'
    docstrings: rerun it after a benchmark, or after editing a script's docstring."""
    made = tables.outputs(ROOT / "bench" / "results", ROOT / "docs" / "benchmarks", None,
                          ROOT / "bench")  # fmt: skip
    stale = [str(p.relative_to(ROOT)) for p, text in made.items()
             if not p.is_file() or p.read_text() != text]  # fmt: skip
    assert not stale, f"out of date: {stale}: run `python bench/tables.py`"


def test_the_conditional_benchmark_runs_a_smoke_run_against_zuko(tmp_path: Path) -> None:
    """bench/bench_conditional.py --quick on one toy and the smallest simulation budget: its
    tables, cnf and zuko's NSF each trained for the (1 s) budget and scored by a finite KL, and
    the tables' systems by a finite test log-likelihood; skipped without zuko, which it
    compares with."""
    assert "bench_conditional" in tables.ORDER  # its place in docs/benchmarks/
    pytest.importorskip("zuko")
    target = tmp_path / "conditional.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_conditional.py"), "--quick", "--data",
           "rotating-gaussian", "--simulations", "1000", "--systems", "cnf fm", "--results",
           str(target)]  # fmt: skip
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=120)
    record = json.loads(target.read_text(), parse_constant=pytest.fail)
    assert record["benchmark"] == "bench_conditional" and record["settings"]["zuko"] is True
    toys, posterior, tables_ = record["tables"]
    assert (toys["name"], posterior["name"]) == ("toys", "gaussian_linear")
    assert {row["dataset"] for row in tables_["rows"]} == {"diabetes", "wine"}
    assert all(math.isfinite(row["loglik"]) for row in tables_["rows"]), tables_["rows"]
    (toy,), (sims,) = toys["rows"], posterior["rows"]
    assert toy["dataset"] == "rotating-gaussian" and sims["simulations"] == 1000
    for row in (toy, sims):
        assert all(math.isfinite(row[m]) for m in ("cnf fm", "NSF")), row
        assert all(s > 0 for s in row["se"]) and all(i > 0 for i in row["iters"])
        assert all(0.5 < cpu < 5 for cpu in row["cpu"]), row  # the budget, 1 CPU s
