"""A hostile user: bad flags, bad files, crafted checkpoints, a full disk, the API misused.

Every CLI case must end with the exit status of the table (1: an error cnf reports; 2: an
argparse usage error), ONE readable line on stderr starting with ``cnf `` that names the
problem (the table's key words), no traceback, and the temporary directory exactly as it was:
every file byte-identical, nothing new (no half-made run directory, no output, no ``PWNED``).
The table cases must also refuse before any ODE solve (a refused option costs no training).
In-process, Python warnings and logged warnings count as extra lines (a shell would print
them); a few cases run ``python -m cnf`` in a subprocess to see stderr exactly as a shell does.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import logging
import math
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, cli_flags

from cnf.checkpoint import load_checkpoint, save_checkpoint
from cnf.cli import main
from cnf.solvers import Solver

S = " ".join(cli_flags(**SMALL)) + " --no-progress"
TRAIN = "train --data 8gaussians --out {tmp}/out " + S


# --- helpers ---------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file (its bytes) and directory ("<dir>") under ``root``, by relative path."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():  # a link is what it names (it may dangle)
            out[rel] = f"<link to {os.readlink(p)}>"
        else:
            out[rel] = "<dir>" if p.is_dir() else p.read_bytes()
    return out


def changes(before: dict, after: dict) -> tuple[list[str], list[str], list[str]]:
    """(changed, removed, new) relative paths."""
    changed = sorted(p for p in before if p in after and after[p] != before[p])
    removed = sorted(p for p in before if p not in after)
    new = sorted(p for p in after if p not in before)
    return changed, removed, new


class Touch:
    """Unpickling this runs ``Path.touch(target)``: a stand-in for arbitrary code."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


class SolveStarted(BaseException):
    """Raised by the guard when a command starts an ODE solve before refusing."""


def guard_solves(monkeypatch) -> list[str]:
    calls: list[str] = []

    def solve(self, *args, **kwargs):
        calls.append(self.describe())
        raise SolveStarted(f"ODE solve {self.describe()} started")

    monkeypatch.setattr(Solver, "solve", solve)
    return calls


@dataclass
class Ctx:
    tmp: Path
    toy: Path  # a copy of the trained toy run, inside tmp
    tab: Path  # a copy of the trained tabular run, inside tmp

    @property
    def pwned(self) -> Path:
        return self.tmp / "PWNED"


# categories a plain `python` process does not print
_HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def invoke(argv: list[str], capsys, caplog) -> tuple[object, str, list[str]]:
    """Run ``cnf argv`` in-process: (exit status, stderr, problems). Python warnings and log
    records of level WARNING go to stderr in a shell, but pytest swallows them here: they are
    reported as problems."""
    capsys.readouterr()
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = main(argv)
        except SystemExit as exc:
            got = exc.code
        except SolveStarted:
            got = "<interrupted: an ODE solve started>"
    err = capsys.readouterr().err
    problems = []
    shown = [w for w in caught if not issubclass(w.category, _HIDDEN)]
    if shown:
        w = shown[0]
        problems.append(f"a {w.category.__name__} would reach stderr ({str(w.message)[:120]!r})")
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    if logged:
        problems.append(f"a logged warning would reach stderr ({logged[0].getMessage()[:120]!r})")
    return got, err, problems


def check_line(err: str, keywords: tuple[str, ...]) -> list[str]:
    problems = []
    if err.count("\n") != 1 or not err.endswith("\n"):
        problems.append(f"stderr is {err.count(chr(10))} lines, not one")
    if not re.match(r"cnf( [a-z]+)?: ", err):  # "cnf train: error: ..." ("cnf: " for usage)
        problems.append("stderr does not start with 'cnf '")
    for bad in ("Traceback", "internal error"):
        if bad in err:
            problems.append(f"stderr has {bad!r}")
    for word in keywords:
        if word not in err:
            problems.append(f"stderr lacks {word!r}")
    return problems


def report(problems: list[str], code, err: str) -> None:
    if problems:
        shown = err if len(err) < 1500 else err[:1500] + "..."
        pytest.fail("; ".join(problems) + f" [exit {code!r}, stderr {shown!r}]", pytrace=False)


def write_csv(path: Path, x: np.ndarray, header: str | None) -> Path:
    np.savetxt(path, x, delimiter=",", header=header or "", comments="", fmt="%.6g")
    return path


def table(rows: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.normal(size=rows), rng.normal(size=rows) * 3 + 1, rng.random(rows)])


def tamper(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of checkpoint ``src`` at ``dst``, edited and written back as one of ours."""
    ckpt = load_checkpoint(src)
    edit(ckpt)
    save_checkpoint(dst, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    return dst


# --- trained runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    toy, tab = root / "toy", root / "tab"
    assert main(f"train --data 8gaussians --out {toy} {S}".split()) == 0
    x = np.column_stack([table(), np.full(200, 7.5)])  # a constant 4th column: dropped
    csv = write_csv(root / "t.csv", x, "a,b,c,k")
    assert main(f"train --data {csv} --out {tab} {S}".split()) == 0
    return {"toy": toy, "tab": tab}


@pytest.fixture
def ctx(trained, tmp_path: Path, monkeypatch) -> Ctx:
    monkeypatch.chdir(tmp_path)  # default outputs (runs/...) land where the snapshot looks
    shutil.copytree(trained["toy"], tmp_path / "toy")
    shutil.copytree(trained["tab"], tmp_path / "tab")
    return Ctx(tmp_path, tmp_path / "toy", tmp_path / "tab")


# --- setups: files a hostile user hands to cnf ------------------------------------------------


def notes_txt(c: Ctx) -> None:
    (c.tmp / "notes.txt").write_text("shopping: milk, eggs\n")


def raw_pickle(c: Ctx) -> None:
    (c.tmp / "x.pt").write_bytes(pickle.dumps({"model": {"w": [1, 2, 3]}, "iteration": 5}))


def zip_not_torch(c: Ctx) -> None:
    with zipfile.ZipFile(c.tmp / "archive.pt", "w") as z:
        z.writestr("readme.txt", "not a model")


def empty_pt(c: Ctx) -> None:
    (c.tmp / "empty.pt").write_bytes(b"")


def dir_without_best(c: Ctx) -> None:
    (c.tmp / "somedir").mkdir()
    (c.tmp / "somedir" / "notes.md").write_text("# my experiments\n")


def best_is_a_directory(c: Ctx) -> None:
    (c.tmp / "odd").mkdir()
    (c.tmp / "odd" / "best.pt").mkdir()


def plain_dict(c: Ctx) -> None:
    torch.save({"model": {"w": torch.zeros(2)}, "config": {}}, c.tmp / "plain.pt")


def truncated(c: Ctx) -> None:
    data = (c.toy / "best.pt").read_bytes()
    (c.tmp / "half.pt").write_bytes(data[: len(data) // 2])


def future_version(c: Ctx) -> None:
    torch.save({"format": "cnf-checkpoint", "version": 99}, c.tmp / "future.pt")


def marker_only(c: Ctx) -> None:
    torch.save({"format": "cnf-checkpoint", "version": 1}, c.tmp / "marker.pt")


def unknown_config_key(c: Ctx) -> None:
    # the model's own arguments: rebuilding the model refuses a key it does not know
    tamper(c.toy / "best.pt", c.tmp / "odd.pt", lambda k: k["model_args"].update(bogus_key=1))


def wrong_shape(c: Ctx) -> None:
    tamper(c.toy / "best.pt", c.tmp / "wrongshape.pt", lambda k: k["data"].update(event_shape=[5]))


def truncate_last(c: Ctx) -> None:
    data = (c.toy / "last.pt").read_bytes()
    (c.toy / "last.pt").write_bytes(data[: len(data) // 2])


def dangling_log_link(c: Ctx) -> None:
    # a run directory someone sent: its log names a file outside it, which does not exist yet
    (c.toy / "log.jsonl").unlink()
    (c.tmp / "outside").mkdir()
    (c.toy / "log.jsonl").symlink_to(c.tmp / "outside" / "log.jsonl")


def best_link(c: Ctx) -> None:
    (c.tmp / "outside").mkdir()
    shutil.move(c.toy / "best.pt", c.tmp / "outside" / "best.pt")
    (c.toy / "best.pt").symlink_to(c.tmp / "outside" / "best.pt")


def board_link(c: Ctx) -> None:
    # --force on a run whose tensorboard/ is a link to someone's directory, and on a link to
    # that run: nothing may be deleted, there or here
    (c.tmp / "theirs").mkdir()
    (c.tmp / "theirs" / "events.out").write_bytes(b"their events\n")
    (c.toy / "tensorboard").symlink_to(c.tmp / "theirs", target_is_directory=True)
    (c.tmp / "linkrun").symlink_to(c.toy, target_is_directory=True)


def corrupt_log_line(c: Ctx) -> None:
    lines = (c.toy / "log.jsonl").read_text().splitlines(keepends=True)
    lines[2] = "garbage\n"
    (c.toy / "log.jsonl").write_text("".join(lines))


def huge_model_ckpt(c: Ctx) -> None:
    # arguments that say a 1.6 GB model beside a small one's weights
    tamper(c.toy / "best.pt", c.tmp / "big.pt",
           lambda k: k["model_args"].update(hidden=[20000, 20000]))  # fmt: skip


def mle_run_csv(c: Ctx) -> None:
    write_csv(c.tmp / "three.csv", np.zeros((5, 3)), "a,b,c")


def existing(name: str, content: bytes = b"precious\n") -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        (c.tmp / name).write_bytes(content)

    setup.__name__ = f"existing_{name}"
    return setup


def directory(name: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        (c.tmp / name).mkdir()
        (c.tmp / name / "keep.txt").write_text("mine\n")

    return setup


def project_folder(c: Ctx) -> None:
    proj = c.tmp / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "config.json").write_text('{"title": "my thesis"}\n')
    (proj / "thesis.tex").write_text("\\documentclass{article}\n")
    (proj / "src" / "main.py").write_text("print('hello')\n")


def photos(c: Ctx) -> None:
    (c.tmp / "photos").mkdir()
    for name in ("beach.jpg", "cat.jpg"):
        (c.tmp / "photos" / name).write_bytes(b"\xff\xd8\xff\xe0 jpeg " + name.encode())


def run_with_notes(c: Ctx) -> None:
    (c.toy / "notes.md").write_text("lr 5e-3 was too high\n")


def run_with_subdir(c: Ctx) -> None:
    (c.toy / "extra").mkdir()
    (c.toy / "extra" / "plot.svg").write_text("<svg/>\n")


def nan_csv(c: Ctx) -> None:
    x = table().astype(object)
    x[17, 1] = "nan"
    np.savetxt(c.tmp / "nan.csv", x, delimiter=",", header="a,b,c", comments="", fmt="%s")


def inf_csv(c: Ctx) -> None:
    x = table()
    x[3, 0] = np.inf
    write_csv(c.tmp / "inf.csv", x, "a,b,c")


def huge_csv(c: Ctx) -> None:
    x = table()
    x[11, 2] = 1e300
    write_csv(c.tmp / "huge.csv", x, "a,b,huge")


def text_cell_csv(c: Ctx) -> None:
    x = table().astype(object)
    x[42, 1] = "abc"
    np.savetxt(
        c.tmp / "text.csv", x, delimiter=",", header="age,income,score", comments="", fmt="%s"
    )


def empty_csv(c: Ctx) -> None:
    (c.tmp / "empty.csv").write_text("")


def header_only_csv(c: Ctx) -> None:
    (c.tmp / "header.csv").write_text("a,b,c\n")


def ragged_csv(c: Ctx) -> None:
    lines = ["a,b,c"] + [f"{i},{i * 2},{i % 7}" for i in range(50)]
    lines[20] = "1,2"
    (c.tmp / "ragged.csv").write_text("\n".join(lines) + "\n")


def one_row_csv(c: Ctx) -> None:
    (c.tmp / "one.csv").write_text("a,b,c\n0.1,0.2,0.3\n")


def npy_1d(c: Ctx) -> None:
    np.save(c.tmp / "vec.npy", np.linspace(0, 1, 200))


def npy_object(c: Ctx) -> None:
    np.save(c.tmp / "obj.npy", np.array([[Touch(c.pwned), 1.0]], dtype=object), allow_pickle=True)


def npz_two(c: Ctx) -> None:
    np.savez(c.tmp / "two.npz", train=table(), extra=table(seed=1))


def parquet(c: Ctx) -> None:
    (c.tmp / "data.parquet").write_bytes(b"PAR1\x00\x00PAR1")


def not_maf_dir(c: Ctx) -> None:
    (c.tmp / "mydata").mkdir()
    write_csv(c.tmp / "mydata" / "part1.csv", table(), "a,b,c")


def const_csv(c: Ctx) -> None:
    write_csv(c.tmp / "const.csv", np.column_stack([table(), np.full(200, 2.0)]), "a,b,c,k")


def empty_run(c: Ctx) -> None:
    (c.tmp / "emptyrun").mkdir()
    (c.tmp / "emptyrun" / "config.json").write_text(json.dumps({"data": "8gaussians"}) + "\n")


def gas_dir(c: Ctx) -> Path:
    """A directory laid out like MAF's GAS whose pickle would create PWNED when read."""
    gas = c.tmp / "gas"
    gas.mkdir(exist_ok=True)
    with open(gas / "ethylene_CO.pickle", "wb") as f:
        pickle.dump(Touch(c.pwned), f)
    return gas


def _point_at_gas(gas: Path, extra: dict | None = None) -> Callable[[dict], None]:
    def edit(ckpt: dict) -> None:
        ckpt["config"]["data"] = str(gas)
        ckpt["data"]["name"] = str(gas)
        ckpt["data"]["source"] = "maf-gas"
        ckpt["dataset"]["name"] = str(gas)  # what eval and resume open
        if extra is not None:
            ckpt["config"]["extra"] = dict(extra)
            ckpt["dataset"]["options"] = dict(extra)

    return edit


def crafted_gas_ckpt(extra: dict | None = None) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        tamper(c.tab / "best.pt", c.tmp / "evil.pt", _point_at_gas(gas_dir(c), extra))

    return setup


def crafted_gas_run(extra: dict | None = None) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        gas = gas_dir(c)
        run = c.tmp / "evilrun"
        shutil.copytree(c.tab, run)
        for name in ("best.pt", "last.pt"):
            tamper(c.tab / name, run / name, _point_at_gas(gas, extra))
        cfg = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**cfg, "data": str(gas)}, indent=2) + "\n")

    return setup


def evil_pickle_pt(c: Ctx) -> None:
    with open(c.tmp / "evil_pickle.pt", "wb") as f:
        pickle.dump(Touch(c.pwned), f)


def evil_torch_pt(c: Ctx) -> None:
    torch.save(Touch(c.pwned), c.tmp / "evil_torch.pt")


def combine(*setups: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        for s in setups:
            s(c)

    return setup


# --- the table: (id, setup, argv, exit status, key words) -------------------------------------


def case(id: str, argv: str, code: int, *keywords: str, setup=None):
    return pytest.param(setup, argv, code, keywords, id=id)


CASES = [
    # checkpoints that are not ours
    case("eval-text-file", "eval {tmp}/notes.txt", 1, "not a cnf checkpoint", setup=notes_txt),
    case("eval-raw-pickle", "eval {tmp}/x.pt", 1, "x.pt", "checkpoint", setup=raw_pickle),
    case("eval-zip-not-torch", "eval {tmp}/archive.pt", 1, "archive.pt", setup=zip_not_torch),
    case("eval-empty-file", "eval {tmp}/empty.pt", 1, "empty.pt", setup=empty_pt),
    case("eval-dir-without-best", "eval {tmp}/somedir", 1, "best.pt", setup=dir_without_best),
    case("eval-best-pt-is-a-dir", "eval {tmp}/odd", 1, "best.pt", setup=best_is_a_directory),
    case(
        "eval-torch-plain-dict", "eval {tmp}/plain.pt", 1, "not a cnf checkpoint", setup=plain_dict
    ),
    case("eval-truncated-half", "eval {tmp}/half.pt", 1, "half.pt", setup=truncated),
    case("eval-future-version", "eval {tmp}/future.pt", 1, "version", setup=future_version),
    case("eval-marker-only", "eval {tmp}/marker.pt", 1, "marker.pt", setup=marker_only),
    case("eval-unknown-config-key", "eval {tmp}/odd.pt", 1, "bogus_key", setup=unknown_config_key),
    case(
        "eval-wrong-event-shape", "eval {tmp}/wrongshape.pt", 1, "wrongshape.pt", setup=wrong_shape
    ),
    case("eval-missing-run", "eval {tmp}/norun", 1, "norun"),
    case("eval-n-zero", "eval {toy} --n 0", 1, "--n"),
    case("eval-n-negative", "eval {toy} --n -3", 1, "--n"),
    case("eval-device-tpu", "eval {toy} --device tpu", 1, "tpu"),
    case("eval-n-not-a-number", "eval {toy} --n many", 2, "--n"),
    # cnf animate: refused before the solve, no file
    case("animate-dpi-0", "animate {toy} -o {tmp}/x.gif --dpi 0", 1, "--dpi"),
    case("animate-dpi-nan", "animate {toy} -o {tmp}/x.gif --dpi nan", 1, "--dpi"),
    case("animate-frames-1", "animate {toy} -o {tmp}/x.gif --frames 1", 1, "--frames"),
    case("animate-frames-0", "animate {toy} -o {tmp}/x.gif --frames 0", 1, "--frames"),
    case("animate-fps-0", "animate {toy} -o {tmp}/x.gif --fps 0", 1, "--fps"),
    case("animate-fps-nan", "animate {toy} -o {tmp}/x.gif --fps nan", 1, "--fps"),
    case("animate-grid-1", "animate {toy} -o {tmp}/x.gif --grid 1", 1, "--grid"),
    case("animate-particles-0", "animate {toy} -o {tmp}/x.gif --particles 0", 1, "--particles"),
    case("animate-trails-negative", "animate {toy} -o {tmp}/x.gif --trails -1", 1, "--trails"),
    case("animate-lim-0", "animate {toy} -o {tmp}/x.gif --lim 0", 1, "--lim"),
    case("animate-atol-negative", "animate {toy} -o {tmp}/x.gif --atol -1", 1, "--atol"),
    case("animate-txt-output", "animate {toy} -o {tmp}/x.txt", 1, ".txt"),
    case("animate-tabular-run", "animate {tab} -o {tmp}/x.gif", 1, "2-D"),
    case(
        "animate-existing-output",
        "animate {toy} -o {tmp}/x.gif",
        1,
        "--force",
        setup=existing("x.gif", b"GIF89a my old animation"),
    ),
    case(
        "animate-trajectories-jpg",
        "animate {toy} -o {tmp}/x.gif --trajectories {tmp}/t.jpg",
        1,
        ".png",
    ),
    case(
        "animate-output-is-a-dir",
        "animate {toy} -o {tmp}/out.gif --force",
        1,
        "out.gif",
        setup=directory("out.gif"),
    ),
    case(
        "animate-direction-bogus",
        "animate {toy} -o {tmp}/x.gif --direction sideways",
        2,
        "--direction",
    ),
    # cnf sample
    case("sample-n-0", "sample {toy} -n 0 -o {tmp}/s.npy", 1, "-n"),
    case("sample-n-negative", "sample {toy} -n -5 -o {tmp}/s.npy", 1, "-n"),
    case("sample-n-not-a-number", "sample {toy} -n lots -o {tmp}/s.npy", 2, "-n"),
    case(
        "sample-under-a-file",
        "sample {toy} -n 5 -o {tmp}/afile/x.npy",
        1,
        "afile",
        "not a directory",
        setup=existing("afile"),
    ),
    case(
        "sample-existing-no-force",
        "sample {toy} -n 5 -o {tmp}/existing.npy",
        1,
        "--force",
        setup=existing("existing.npy"),
    ),
    case(
        "sample-output-is-a-dir",
        "sample {toy} -n 5 -o {tmp}/some_dir",
        1,
        "some_dir",
        setup=directory("some_dir"),
    ),
    case(
        "sample-dir-named-npy-force",
        "sample {toy} -n 5 -o {tmp}/d.npy --force",
        1,
        "d.npy",
        setup=directory("d.npy"),
    ),
    case(
        "sample-into-a-missing-directory",
        "sample {toy} -n 5 -o {tmp}/nodir/x.npy",
        1,
        "nodir",
        "does not exist",
    ),
    case("sample-png-on-toy", "sample {toy} -n 4 -o {tmp}/x.png", 1, "image"),
    case(
        "sample-log-prob-png",
        "sample {toy} -n 4 -o {tmp}/x.png --with-log-prob",
        1,
        "--with-log-prob",
    ),
    case("sample-npz-output", "sample {toy} -n 4 -o {tmp}/s.npz", 1, ".npz"),
    case("sample-missing-run", "sample {tmp}/norun -n 5 -o {tmp}/s.npy", 1, "norun"),
    # cnf train: options
    case("train-T-nan", TRAIN + " --T nan", 1, "--T"),
    case("train-T-negative", TRAIN + " --T -1", 1, "--T"),
    case("train-T-0", TRAIN + " --T 0", 1, "--T"),
    case("train-lr-inf", TRAIN + " --lr inf", 1, "--lr"),
    case("train-lr-nan", TRAIN + " --lr nan", 1, "--lr"),
    case("train-lr-negative", TRAIN + " --lr -1e-3", 1, "--lr"),
    case("train-lr-0", TRAIN + " --lr 0", 1, "--lr"),
    case("train-weight-decay-inf", TRAIN + " --weight-decay inf", 1, "--weight-decay"),
    case("train-kinetic-inf", TRAIN + " --kinetic inf", 1, "--kinetic"),
    case("train-jacobian-nan", TRAIN + " --jacobian nan", 1, "--jacobian"),
    case("train-grad-clip-inf", TRAIN + " --grad-clip inf", 1, "--grad-clip"),
    case("train-adapt-threshold-nan", TRAIN + " --adapt-threshold nan", 1, "--adapt-threshold"),
    case("train-alpha-nan", TRAIN + " --alpha nan", 1, "--alpha"),
    case("train-seed-negative", TRAIN + " --seed -1", 1, "--seed"),
    case("train-seed-huge", TRAIN + " --seed 12345678901234567890123", 1, "--seed"),
    case("train-iters-0", TRAIN + " --iters 0", 1, "--iters"),
    case("train-batch-size-0", TRAIN + " --batch-size 0", 1, "--batch-size"),
    case("train-eval-every-negative", TRAIN + " --eval-every -1", 1, "--eval-every"),
    case("train-test-size-0", TRAIN + " --test-size 0", 1, "--test-size"),
    case("train-max-nfe-0", TRAIN + " --max-nfe 0", 1, "--max-nfe"),
    case("train-patience-negative", TRAIN + " --patience -1", 1, "--patience"),
    case("train-threads-negative", TRAIN + " --threads -1", 1, "--threads"),
    case("train-step-size-0", TRAIN + " --step-size 0", 1, "--step-size"),
    case("train-hidden-zero-width", TRAIN + " --hidden 0,16", 1, "--hidden"),
    case("train-hidden-negative", TRAIN + " --hidden 16,-2", 1, "--hidden"),
    case("train-hidden-abc", TRAIN + " --hidden abc", 2, "--hidden"),
    case("train-method-rk5", TRAIN + " --method rk5", 1, "rk5"),
    case("train-trace-exakt", TRAIN + " --trace exakt", 1, "exakt"),
    case("train-schedule-linear", TRAIN + " --schedule linear", 1, "linear"),
    case("train-dtype-float16", TRAIN + " --dtype float16", 1, "float16"),
    case("train-activation-gelu", TRAIN + " --activation gelu", 1, "gelu"),
    case("train-device-tpu", TRAIN + " --device tpu", 1, "tpu"),
    case("train-unknown-flag", TRAIN + " --learning-rate 0.1", 2, "--learning-rate"),
    case(
        "train-out-is-a-file",
        TRAIN + " --out {tmp}/out.txt",
        1,
        "out.txt",
        setup=existing("out.txt"),
    ),
    case(
        "train-force-over-a-file",
        TRAIN + " --out {tmp}/out.txt --force",
        1,
        "out.txt",
        setup=existing("out.txt"),
    ),
    # cnf train --resume
    case("resume-with-force", "train --resume {toy} --force", 1, "--force"),
    case("resume-iters-0", "train --resume {toy} --iters 0", 1, "--iters"),
    case("resume-iters-negative", "train --resume {toy} --iters -5", 1, "--iters"),
    case("resume-iters-fewer-than-done", "train --resume {toy} --iters 6", 1, "--iters"),
    case("resume-change-hidden", "train --resume {toy} --hidden 8", 1, "--hidden"),
    case("resume-dir-without-last", "train --resume {tmp}/emptyrun", 1, "last.pt", setup=empty_run),
    case("resume-missing-dir", "train --resume {tmp}/nope", 1, "nope"),
    case("resume-other-out", "train --resume {toy} --out {tmp}/other", 1, "--out"),
    case("resume-truncated-last", "train --resume {toy}", 1, "last.pt", setup=truncate_last),
    # --force never destroys what is not a cnf run, and validates everything first
    case(
        "force-project-folder",
        TRAIN + " --out {tmp}/proj --force",
        1,
        "thesis.tex",
        setup=project_folder,
    ),
    case("force-photos", TRAIN + " --out {tmp}/photos --force", 1, "photos", setup=photos),
    case(
        "force-run-with-notes", TRAIN + " --out {toy} --force", 1, "notes.md", setup=run_with_notes
    ),
    case(
        "force-run-with-subdir", TRAIN + " --out {toy} --force", 1, "extra", setup=run_with_subdir
    ),
    case(
        "force-missing-csv",
        TRAIN + " --out {toy} --force --data {tmp}/missing.csv",
        1,
        "missing.csv",
    ),
    case("force-bogus-method", TRAIN + " --out {toy} --force --method bogus", 1, "bogus"),
    case(
        "force-nan-csv",
        TRAIN + " --out {toy} --force --data {tmp}/nan.csv",
        1,
        "--drop-nan",
        setup=nan_csv,
    ),
    case("force-lr-inf", TRAIN + " --out {toy} --force --lr inf", 1, "--lr"),
    # tables
    case(
        "table-huge-value-standardize",
        TRAIN + " --data {tmp}/huge.csv --preprocess standardize",
        1,
        "huge",
        "scale",
        setup=huge_csv,
    ),
    case(
        "table-huge-value-whiten",
        TRAIN + " --data {tmp}/huge.csv --preprocess whiten",
        1,
        "huge",
        "scale",
        setup=huge_csv,
    ),
    case("table-inf-cell", TRAIN + " --data {tmp}/inf.csv", 1, "--drop-nan", setup=inf_csv),
    case("table-text-cell", TRAIN + " --data {tmp}/text.csv", 1, "income", setup=text_cell_csv),
    case("table-empty-csv", TRAIN + " --data {tmp}/empty.csv", 1, "empty.csv", setup=empty_csv),
    case(
        "table-header-only",
        TRAIN + " --data {tmp}/header.csv",
        1,
        "header.csv",
        setup=header_only_csv,
    ),
    case(
        "table-ragged-rows", TRAIN + " --data {tmp}/ragged.csv", 1, "ragged.csv", setup=ragged_csv
    ),
    case("table-single-row", TRAIN + " --data {tmp}/one.csv", 1, "row", setup=one_row_csv),
    case("table-npy-1d", TRAIN + " --data {tmp}/vec.npy", 1, "vec.npy", setup=npy_1d),
    case(
        "table-npy-object-pickle", TRAIN + " --data {tmp}/obj.npy", 1, "obj.npy", setup=npy_object
    ),
    case("table-npz-two-arrays", TRAIN + " --data {tmp}/two.npz", 1, "two.npz", setup=npz_two),
    case(
        "table-npz-missing-key", TRAIN + " --data {tmp}/two.npz:nosuch", 1, "nosuch", setup=npz_two
    ),
    case(
        "table-columns-nosuch",
        TRAIN + " --data {tmp}/const.csv --columns nosuch",
        1,
        "nosuch",
        setup=const_csv,
    ),
    case(
        "table-columns-twice",
        TRAIN + " --data {tmp}/const.csv --columns 0,0",
        1,
        "0,0",
        setup=const_csv,
    ),
    case(
        "table-columns-99", TRAIN + " --data {tmp}/const.csv --columns 99", 1, "99", setup=const_csv
    ),
    case(
        "table-only-constant-column",
        TRAIN + " --data {tmp}/const.csv --columns k",
        1,
        "constant",
        setup=const_csv,
    ),
    case(
        "table-fractions-leave-nothing",
        TRAIN + " --data {tmp}/const.csv --val-fraction 0.5 --test-fraction 0.5",
        1,
        "fraction",
        setup=const_csv,
    ),
    case("table-parquet", TRAIN + " --data {tmp}/data.parquet", 1, "data.parquet", setup=parquet),
    case("table-dir-not-maf", TRAIN + " --data {tmp}/mydata", 1, "mydata", setup=not_maf_dir),
    # image data without its files; data options on the wrong kind of data
    case("images-mnist-without-data-dir", TRAIN + " --data mnist", 1, "--data-dir"),
    case(
        "images-fashion-mnist-nonexistent",
        TRAIN + " --data fashion-mnist --data-dir /nonexistent",
        1,
        "/nonexistent",
    ),
    case("toy-with-data-dir", TRAIN + " --data moons --data-dir {tmp}", 1, "--data-dir"),
    # crafted files must never run code
    case(
        "eval-crafted-gas-checkpoint",
        "eval {tmp}/evil.pt",
        1,
        "--trust-pickle",
        setup=crafted_gas_ckpt(),
    ),
    case(
        "resume-crafted-gas-run",
        "train --resume {tmp}/evilrun",
        1,
        "--trust-pickle",
        setup=crafted_gas_run(),
    ),
    case("train-gas-dir-direct", TRAIN + " --data {tmp}/gas", 1, "--trust-pickle", setup=gas_dir),
    case(
        "eval-crafted-extra-trust-pickle",
        "eval {tmp}/evil.pt",
        1,
        "trust",
        setup=crafted_gas_ckpt({"trust_pickle": True}),
    ),
    case(
        "resume-crafted-extra-trust-pickle",
        "train --resume {tmp}/evilrun",
        1,
        "trust",
        setup=crafted_gas_run({"trust_pickle": True}),
    ),
    case(
        "eval-evil-pickle-pt",
        "eval {tmp}/evil_pickle.pt",
        1,
        "evil_pickle.pt",
        setup=evil_pickle_pt,
    ),
    case(
        "eval-evil-torch-save-pt",
        "eval {tmp}/evil_torch.pt",
        1,
        "evil_torch.pt",
        setup=evil_torch_pt,
    ),
    # run directories that are not all their own: nothing written through a link
    case(
        "resume-log-is-a-dangling-link",
        "train --resume {toy} --iters 20",
        1,
        "log.jsonl",
        "symbolic link",
        setup=dangling_log_link,
    ),
    case(
        "resume-best-is-a-link",
        "train --resume {toy} --iters 20",
        1,
        "best.pt",
        "symbolic link",
        setup=best_link,
    ),
    case(
        "force-tensorboard-is-a-link",
        TRAIN.replace("{tmp}/out", "{toy}") + " --force",
        1,
        "tensorboard",
        "symbolic link",
        setup=board_link,
    ),
    case(
        "force-link-to-run-with-board-link",
        TRAIN.replace("{tmp}/out", "{tmp}/linkrun") + " --force",
        1,
        "tensorboard",
        setup=board_link,
    ),
    case(
        "resume-corrupt-log-line",
        "train --resume {toy} --iters 20",
        1,
        "log.jsonl",
        "line 3",
        setup=corrupt_log_line,
    ),
    case("plot-corrupt-log-line", "plot {toy}", 1, "line 3", setup=corrupt_log_line),
    case(
        "resume-mle-run-finetune-iters",
        "train --resume {toy} --finetune-iters 5",
        1,
        "--finetune-iters",
        "maximum likelihood throughout",
    ),
    case(  # a config's message names the flags of the fields it mentions
        "train-eval-atol-with-rk4",
        TRAIN + " --eval-atol 1e-5",
        1,
        "--eval-atol has no effect",
        "--eval-method",
        "--eval-step-size",
    ),
    # sizes checked before any work
    case("train-test-size-huge", TRAIN + " --test-size 1000000000000", 1, "--test-size", "memory"),
    case(
        "train-validity-size-huge",
        TRAIN + " --validity-size 1000000000000",
        1,
        "--validity-size",
        "memory",
    ),
    case(
        "train-model-too-big",
        TRAIN.replace("--hidden 16,16", "--hidden 300000,300000"),
        1,
        "parameters",
        "memory",
    ),
    case("eval-n-huge", "eval {toy} --n 1000000000000", 1, "--n", "memory"),
    case("eval-steps-huge", "eval {toy} --method rk4 --steps 1000000000", 1, "--steps", "max_nfe"),
    case(
        "sample-step-size-tiny",
        "sample {toy} -n 10 -o {tmp}/s.npy --method euler --step-size 1e-9",
        1,
        "--step-size",
        "max_nfe",
    ),
    case(
        "eval-checkpoint-says-huge-model",
        "eval {tmp}/big.pt",
        1,
        "big.pt",
        "size mismatch",
        setup=huge_model_ckpt,
    ),
    # cnf eval on rows of the user's own
    case(
        "eval-data-abbreviated", "eval {toy} --dat {tmp}/three.csv", 2, "--dat", setup=mle_run_csv
    ),
    case("eval-per-row-without-data", "eval {toy} --per-row {tmp}/o.csv", 1, "--per-row", "--data"),
    case("eval-data-missing-file", "eval {tab} --data {tmp}/nowhere.csv", 1, "nowhere.csv"),
    case(
        "eval-data-wrong-columns",
        "eval {toy} --data {tmp}/three.csv",
        1,
        "3 columns",
        setup=mle_run_csv,
    ),
    case(
        "eval-data-with-n", "eval {tab} --data {tmp}/three.csv --n 5", 1, "--n", setup=mle_run_csv
    ),
    case(
        "eval-per-row-not-csv",
        "eval {tab} --data {tmp}/three.csv --per-row {tmp}/o.txt",
        1,
        ".csv",
        setup=mle_run_csv,
    ),
    case(
        "eval-per-row-exists",
        "eval {tab} --data {tmp}/three.csv --per-row {tmp}/three.csv",
        1,
        "--force",
        setup=mle_run_csv,
    ),
    # usage
    case("no-arguments", "", 2, "required"),
    case("unknown-subcommand", "frobnicate", 2, "frobnicate"),
    case("datasets-extra-argument", "datasets now", 2, "now"),
    case("eval-without-run", "eval", 2, "run"),
]


def _argv(template: str, c: Ctx) -> list[str]:
    return template.format(tmp=c.tmp, toy=c.toy, tab=c.tab).split()


@pytest.mark.parametrize(("setup", "argv", "code", "keywords"), CASES)
def test_hostile_cli(ctx: Ctx, capsys, caplog, monkeypatch, setup, argv, code, keywords) -> None:
    if setup is not None:
        setup(ctx)
    argv = _argv(argv, ctx)
    keywords = tuple(k.format(tmp=ctx.tmp) for k in keywords)
    solves = guard_solves(monkeypatch)
    before = snapshot(ctx.tmp)
    got, err, problems = invoke(argv, capsys, caplog)
    after = snapshot(ctx.tmp)

    changed, removed, new = changes(before, after)
    if ctx.pwned.exists():
        problems.append("PWNED exists: a crafted file ran code")
    if changed or removed:
        problems.append(f"files changed {changed} / removed {removed}")
    if new:
        problems.append(f"new files {new[:6]}")
    if solves:
        problems.append(f"started an ODE solve ({solves[0]}) before refusing")
    if got != code:
        problems.append(f"exit {got!r}, expected {code}")
    problems += check_line(err, keywords)
    report(problems, got, err)


# --- from a shell: no warning or traceback gets past the one line ------------------------------


SHELL_CASES = [
    case("shell-eval-raw-pickle", "eval {tmp}/x.pt", 1, "checkpoint", setup=raw_pickle),
    case(
        "shell-eval-evil-torch-save",
        "eval {tmp}/evil_torch.pt",
        1,
        "evil_torch.pt",
        setup=evil_torch_pt,
    ),
    case("shell-sample-n-huge", "sample {toy} -n 1000000000000 -o {tmp}/s.npy", 1, "-n"),
    case(
        "shell-table-huge-value-standardize",
        TRAIN + " --data {tmp}/huge.csv --preprocess standardize",
        1,
        "huge",
        "scale",
        setup=huge_csv,
    ),
    case("shell-train-gas-dir", TRAIN + " --data {tmp}/gas", 1, "--trust-pickle", setup=gas_dir),
    case(
        "shell-table-header-only",
        TRAIN + " --data {tmp}/header.csv",
        1,
        "header.csv",
        setup=header_only_csv,
    ),
]


@pytest.mark.parametrize(("setup", "argv", "code", "keywords"), SHELL_CASES)
def test_hostile_shell(ctx: Ctx, setup, argv, code, keywords) -> None:
    if setup is not None:
        setup(ctx)
    env = {k: v for k, v in os.environ.items() if k != "CNF_DEBUG"}
    before = snapshot(ctx.tmp)
    proc = subprocess.run(
        [sys.executable, "-m", "cnf", *_argv(argv, ctx)],
        cwd=ctx.tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    after = snapshot(ctx.tmp)
    err = proc.stderr
    problems = []
    changed, removed, new = changes(before, after)
    if ctx.pwned.exists():
        problems.append("PWNED exists: a crafted file ran code")
    if changed or removed or new:
        problems.append(f"files changed {changed} / removed {removed} / new {new[:6]}")
    if proc.returncode != code:
        problems.append(f"exit {proc.returncode}, expected {code}")
    if "Warning" in err:
        problems.append("a warning reached stderr")
    problems += check_line(err, keywords)
    report(problems, proc.returncode, err)


# --- resume on data that changed under the run -------------------------------------------------


@pytest.mark.parametrize("how", ["values-changed", "rows-added", "file-deleted"])
def test_data_changed_under_a_run(tmp_path: Path, monkeypatch, capsys, caplog, how: str) -> None:
    monkeypatch.chdir(tmp_path)
    csv = write_csv(tmp_path / "data.csv", np.column_stack([table(), np.full(200, 3.0)]), "a,b,c,k")
    run = tmp_path / "run"
    assert main(f"train --data {csv} --out {run} {S}".split()) == 0
    x = np.loadtxt(csv, delimiter=",", skiprows=1)
    if how == "values-changed":  # same shape, same header, some values edited
        x[5:9, 1] += 10.0
        write_csv(csv, x, "a,b,c,k")
        argv, keywords = f"train --resume {run} --finetune-iters 3000", ("changed",)
    elif how == "rows-added":
        write_csv(csv, np.vstack([x, x[:20] + 0.5]), "a,b,c,k")
        argv, keywords = f"train --resume {run} --finetune-iters 3000", ("changed",)
    else:
        csv.unlink()
        argv, keywords = f"eval {run}", ("data.csv",)
    solves = guard_solves(monkeypatch)
    before = snapshot(tmp_path)
    got, err, problems = invoke(argv.split(), capsys, caplog)
    changed, removed, new = changes(before, snapshot(tmp_path))
    if changed or removed or new:
        problems.append(f"files changed {changed} / removed {removed} / new {new[:6]}")
    if solves:
        problems.append(f"started an ODE solve ({solves[0]}) before refusing")
    if got != 1:
        problems.append(f"exit {got!r}, expected 1")
    problems += check_line(err, keywords)
    report(problems, got, err)


# --- a full disk --------------------------------------------------------------------------------

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
PARTIAL = 10  # bytes a file gets before the disk is full


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


class _FullFile:
    """A file on a full disk: the first PARTIAL bytes go in, then ENOSPC."""

    def __init__(self, f) -> None:
        self._f, self._left = f, PARTIAL

    def write(self, data):
        if len(data) <= self._left:
            self._left -= len(data)
            return self._f.write(data)
        if self._left:
            self._f.write(data[: self._left])
            self._left = 0
        raise OSError(errno.ENOSPC, "No space left on device")

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def fill_disk(monkeypatch, root: Path, name: Callable[[str], bool] = lambda n: True) -> None:
    """Make writes under ``root`` to files whose name passes ``name`` fail with ENOSPC: every
    Python-level way of writing a file (open, Path.write_*, os.fdopen, os.write, torch.save to a
    path, numpy's savetxt, shutil's copies)."""
    root_text = str(root.resolve())

    def hit(path) -> bool:
        if path is None:
            return False
        if isinstance(path, int):
            path = _fd_path(path)
            if path is None:
                return False
        try:
            full = str(Path(os.fsdecode(path)).resolve())
        except (TypeError, ValueError):
            return False
        return full.startswith(root_text) and name(Path(full).name)

    real_open, real_write, real_save = io.open, os.write, torch.save

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and hit(file):
            return _FullFile(f)
        return f

    left: dict[int, int] = {}

    def full_write(fd, data):
        if not hit(fd):
            return real_write(fd, data)
        budget = left.setdefault(fd, PARTIAL)
        if budget and len(data):
            n = min(budget, len(data))
            left[fd] = budget - n
            return real_write(fd, bytes(data[:n]))
        raise OSError(errno.ENOSPC, "No space left on device")

    def full_save(obj, f, *args, **kwargs):
        if isinstance(f, str | os.PathLike):
            with full_open(f, "wb") as fh:
                return real_save(obj, fh, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)
    monkeypatch.setattr(io, "open", full_open)
    monkeypatch.setattr(os, "write", full_write)
    monkeypatch.setattr(torch, "save", full_save)
    monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False, raising=False)
    openers = getattr(getattr(np.lib, "_datasource", None), "_file_openers", None)
    if openers is not None and None in getattr(openers, "_file_openers", {}):
        monkeypatch.setitem(openers._file_openers, None, full_open)


def _incomplete(root: Path, rel: str) -> str | None:
    """Why a file left behind after a failed write is not a whole file (None: it is)."""
    p = root / rel
    if p.is_dir():
        return "a temporary directory" if re.search(r"\.(new|old)-", p.name) else None
    if p.stat().st_size == 0:
        return "empty"
    if ".tmp" in p.name:
        return "a temporary file"
    try:
        if p.suffix == ".json" or p.name == ".cnf-run":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            for line in p.read_text().splitlines():
                json.loads(line)
        elif p.suffix == ".pt":
            load_checkpoint(p)
        elif p.suffix in (".npy", ".csv", ".gif", ".png"):
            return "an output of a command that failed"
    except Exception as err:
        return f"partial ({type(err).__name__})"
    return None


DISK_CASES = [
    pytest.param("sample {toy} -n 50 -o {tmp}/out.npy", None, None, id="sample-npy"),
    pytest.param("sample {toy} -n 50 -o {tmp}/out.csv", None, None, id="sample-csv"),
    pytest.param(
        "sample {toy} -n 50 -o {tmp}/out.npy --force",
        b"my old samples\n",
        None,
        id="sample-npy-over-existing-force",
    ),
    pytest.param(
        "animate {toy} -o {tmp}/out.gif --frames 2 --grid 8 --particles 20 --no-progress",
        None,
        None,
        id="animate-gif",
    ),
    pytest.param(TRAIN, None, None, id="train-full-from-the-start"),
    pytest.param(TRAIN, None, lambda n: "last" in n or "best" in n, id="train-full-at-checkpoint"),
]


@pytest.mark.parametrize(("argv", "old", "names"), DISK_CASES)
def test_full_disk(ctx: Ctx, capsys, caplog, monkeypatch, argv: str, old, names) -> None:
    if old is not None:
        (ctx.tmp / "out.npy").write_bytes(old)
    before = snapshot(ctx.tmp)
    fill_disk(monkeypatch, ctx.tmp, names or (lambda n: True))
    got, err, problems = invoke(_argv(argv, ctx), capsys, caplog)
    monkeypatch.undo()
    after = snapshot(ctx.tmp)
    changed, removed, new = changes(before, after)
    if changed or removed:
        problems.append(f"files changed {changed} / removed {removed}")
    broken = [(rel, why) for rel in new if (why := _incomplete(ctx.tmp, rel))]
    if broken:
        problems.append(f"left behind {broken[:4]}")
    if got != 1:
        problems.append(f"exit {got!r}, expected 1")
    # training may have logged its evaluations ("iter 6: val NLL ...") before the disk filled
    line = "".join(ln for ln in err.splitlines(True) if not re.match(r"iter \d+: ", ln))
    problems += check_line(line, ("space",))
    report(problems, got, err)


# --- the Python API -----------------------------------------------------------------------------


def test_log_prob_of_no_rows_is_empty() -> None:
    from cnf import CNF

    out = CNF(2, hidden=(8,)).log_prob(torch.zeros(0, 2))
    assert out.shape == (0,)


def _api(fn: Callable[[], object], exc: type, match: str, absent: str = "", id: str = ""):
    return pytest.param(fn, exc, match, absent, id=id)


def _cnf(*args, **kwargs):
    from cnf import CNF

    return CNF(*args, **kwargs)


def _write_bytes(path: str, data: bytes) -> None:
    from cnf.io import write_bytes

    write_bytes(path, data)


def _config(**kwargs):
    from cnf.training import TrainConfig

    return TrainConfig.plain(**kwargs)


API_CASES = [
    _api(
        lambda: _cnf(2).log_prob(torch.zeros(3, 2, dtype=torch.int64)),
        TypeError,
        "float",
        "flow.to(torch.int64)",
        id="log-prob-int64",
    ),
    _api(
        lambda: _cnf(2).log_prob(torch.zeros(3, 2, dtype=torch.bool)),
        TypeError,
        "float",
        "flow.to(torch.bool)",
        id="log-prob-bool",
    ),
    _api(
        lambda: _cnf(2).log_prob(torch.zeros(3, 2, dtype=torch.complex64)),
        TypeError,
        "float",
        "flow.to(torch.complex64)",
        id="log-prob-complex",
    ),
    _api(lambda: _cnf(2).log_prob(np.zeros((3, 2))), TypeError, "Tensor", id="log-prob-numpy"),
    _api(lambda: _cnf(2.5), ValueError, "dim", "not iterable", id="dim-float"),
    _api(lambda: _cnf("2"), ValueError, "dim", id="dim-string"),
    _api(lambda: _cnf(2, hidden=(0,)), ValueError, "hidden", id="hidden-zero"),
    _api(lambda: _cnf(2, hidden=(16, -2)), ValueError, "hidden", id="hidden-negative"),
    _api(lambda: _cnf(2, T=float("nan")), ValueError, r"\bT\b", id="T-nan"),
    _api(lambda: _cnf(2, T=float("inf")), ValueError, r"\bT\b", id="T-inf"),
    _api(
        lambda: _cnf(2, solver=Solver("rk4")).log_prob(torch.zeros(1, 2)),
        ValueError,
        "give it a step_size",
        id="solver-rk4-without-step",
    ),
    _api(lambda: Solver("dopri5", atol=-1), ValueError, "atol", id="solver-negative-atol"),
    _api(lambda: Solver("dopri5", rtol=float("nan")), ValueError, "rtol", id="solver-nan-rtol"),
    _api(
        lambda: Solver("rk4", step_size=float("inf")), ValueError, "step_size", id="solver-inf-step"
    ),
    _api(lambda: _cnf(2).sample(0), ValueError, r"\bn\b", id="sample-zero"),
    _api(lambda: _config(T=float("nan")), ValueError, r"\bT\b", id="config-T-nan"),
    _api(lambda: _config(T=0.0), ValueError, r"\bT\b", id="config-T-0"),
    _api(lambda: _config(lr=float("inf")), ValueError, r"\blr\b", id="config-lr-inf"),
    _api(lambda: _config(seed=-1), ValueError, "seed", id="config-seed-negative"),
    _api(lambda: _config(seed=2**70), ValueError, "seed", id="config-seed-huge"),
    _api(lambda: _config(hidden=(0, 16)), ValueError, "hidden", id="config-hidden-zero"),
    _api(
        lambda: _config(weight_decay=math.inf),
        ValueError,
        "weight_decay",
        id="config-weight-decay-inf",
    ),
    _api(lambda: _config(ema=1.0), ValueError, r"\bema\b", id="config-ema-one"),
    _api(lambda: _config(ema=-0.5), ValueError, r"\bema\b", id="config-ema-negative"),
    _api(lambda: _config(method="rk5"), ValueError, "rk5", id="config-method-rk5"),
    _api(
        lambda: _write_bytes("/nonexistent-cnf-dir/x.bin", b"data"),
        FileNotFoundError,
        "directory /nonexistent-cnf-dir does not exist",
        ".tmp",
        id="write-into-a-missing-directory",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "match", "absent"), API_CASES)
def test_api_misuse(fn, exc: type, match: str, absent: str) -> None:
    with pytest.raises(exc, match=match) as info:
        fn()
    if absent:
        assert absent not in str(info.value)
