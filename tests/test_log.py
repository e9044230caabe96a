"""The training log: a row per ``log_every`` iterations (seconds summed, losses averaged, the
settings and the evaluation of the row's last iteration, every step-size check kept), each
iteration in exactly one row, through evaluations, phases, interruptions and resumes."""

import math
import os
import signal
from pathlib import Path

import pytest
from conftest import config

from cnf.options import ConfigError
from cnf.runs import adaptation_checks, read_log
from cnf.training import MaximumLikelihood, TrainConfig, train
from cnf.training.logrows import LogRows, aggregate, log_interval
from cnf.viz.figures import plot_solver, plot_training

# 45 iterations, evaluations at 20, 40 and 45, step-size checks at 25 and 50 (past the end)
RUN = dict(data="8gaussians", iters=45, batch_size=64, eval_every=20, hidden=(16, 16),
           method="rk4", step_size=0.25, eval_method="rk4", eval_step_size=0.25, test_size=100,
           validity_size=50, adapt_every=25)  # fmt: skip
SECONDS = ("time", "cpu", "val_cpu")  # the columns that differ between two runs


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same run logged a row per 10 iterations (``every10``) and per iteration (``every1``),
    with the per-iteration rows the recorder of ``every10`` was given (``given``)."""
    root, given = tmp_path_factory.mktemp("log"), []
    real = LogRows.add

    def add(self, row):
        given.append(dict(row))
        return real(self, row)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(LogRows, "add", add)
        train(config(**RUN, log_every=10), root / "every10", progress=False)
    train(config(**RUN, log_every=1), root / "every1", progress=False)
    return {"every10": root / "every10", "every1": root / "every1", "given": given}


def _rows(run: Path) -> list[dict]:
    return read_log(run / "log.jsonl").rows


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in SECONDS} for row in rows]


def _covers_each_iteration_once(rows: list[dict], last: int) -> None:
    assert sum(r["iters"] for r in rows) == last == rows[-1]["iter"]
    starts = [r["iter"] - r["iters"] + 1 for r in rows]
    assert starts == [1] + [r["iter"] + 1 for r in rows[:-1]]  # no gap, no overlap


def test_a_row_per_interval_ends_at_evaluations_and_the_last_iteration(runs) -> None:
    rows = _rows(runs["every10"])
    assert [(r["iter"], r["iters"]) for r in rows] == [(10, 10), (20, 10), (30, 10), (40, 10),
                                                       (45, 5)]  # fmt: skip
    _covers_each_iteration_once(rows, 45)
    assert [r["iter"] for r in rows if "val_nll" in r] == [20, 40, 45]
    given = runs["given"]  # the iterations' own rows, as the loop gave them
    for key in ("time", "cpu"):  # the log's sum is the training's
        assert math.fsum(r[key] for r in rows) == pytest.approx(math.fsum(g[key] for g in given))


def test_rows_average_the_losses_of_the_same_run_logged_every_iteration(runs) -> None:
    rows, each = _rows(runs["every10"]), {r["iter"]: r for r in _rows(runs["every1"])}
    assert len(each) == 45 and all(r["iters"] == 1 for r in each.values())
    for row in rows:
        covered = [each[i] for i in range(row["iter"] - row["iters"] + 1, row["iter"] + 1)]
        for key in ("loss", "nll", "nfe", "grad_norm"):
            mean = math.fsum(r[key] for r in covered) / len(covered)
            assert row[key] == pytest.approx(mean, abs=1e-6), (row["iter"], key)
        for key in ("lr", "step_size", "atol", "objective", "val_nll", "val_nll_se"):
            assert row.get(key) == covered[-1].get(key), (row["iter"], key)
    assert [c["iter"] for r in rows for c in r.get("adapt", [])] == [25]
    log, every1 = read_log(runs["every10"] / "log.jsonl"), read_log(runs["every1"] / "log.jsonl")
    assert log.iterations == every1.iterations == 45  # what the benchmarks read
    assert log.mean("loss") == pytest.approx(every1.mean("loss"), abs=1e-6)
    assert log.total("cpu") == pytest.approx(math.fsum(r["cpu"] for r in runs["given"]))
    assert rows[2]["adapt"][0]["event"] == each[25]["adapt"][0]["event"]


def test_the_figures_draw_an_aggregated_log(runs, tmp_path: Path) -> None:
    log = runs["every10"] / "log.jsonl"
    plot_training(log, tmp_path / "training.png")
    plot_solver(log, tmp_path / "solver.png")
    assert all((tmp_path / name).stat().st_size > 0 for name in ("training.png", "solver.png"))


def _kill_at_loss(m: pytest.MonkeyPatch, call: int, action) -> None:
    real, calls = MaximumLikelihood.loss, [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            action()
        return real(*args, **kwargs)

    m.setattr(MaximumLikelihood, "loss", loss)


def _die() -> None:
    raise Killed


def test_a_killed_run_resumes_to_the_same_log(runs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as m:
        _kill_at_loss(m, 37, _die)  # iteration 37: the last checkpoint is of iteration 20
        with pytest.raises(Killed):
            train(config(**RUN, log_every=10), run, progress=False)
    train(TrainConfig(), run, resume=True, progress=False)
    rows = _rows(run)
    _covers_each_iteration_once(rows, 45)
    assert _without_seconds(rows) == _without_seconds(_rows(runs["every10"]))


def test_a_stopped_run_writes_its_partial_row_and_resumes_from_there(runs, tmp_path) -> None:
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as m:  # Ctrl-C during iteration 33: it stops after it
        _kill_at_loss(m, 33, lambda: os.kill(os.getpid(), signal.SIGINT))
        result = train(config(**RUN, log_every=10), run, progress=False)
    assert result.interrupted == signal.SIGINT and result.iteration == 33
    assert _rows(run)[-1]["iter"] == 33  # on disk before the checkpoint of iteration 33
    train(TrainConfig(), run, resume=True, progress=False, changes={"log_every": 10})
    rows, straight = _rows(run), _rows(runs["every10"])
    _covers_each_iteration_once(rows, 45)
    assert [(r["iter"], r["iters"]) for r in rows] == [(10, 10), (20, 10), (30, 10), (33, 3),
                                                       (40, 7), (45, 5)]  # fmt: skip
    same = [0, 1, 2, 5]  # the rows that do not straddle the stop
    assert _without_seconds([rows[i] for i in same]) == _without_seconds(
        [straight[i] for i in (0, 1, 2, 4)]
    )
    parts, whole = rows[3:5], straight[3]  # the straddling row, in two parts
    mean = sum(r["loss"] * r["iters"] for r in parts) / 10
    assert mean == pytest.approx(whole["loss"], abs=1e-6)
    assert parts[1]["val_nll"] == whole["val_nll"]


def test_a_phase_ends_a_row_and_its_checks_stay_in_the_log(tmp_path: Path) -> None:
    cfg = config(data="8gaussians", objective="fm", iters=25, finetune_iters=10, log_every=10,
                 batch_size=64, eval_every=100, hidden=(8,), test_size=100,
                 validity_size=50)  # fmt: skip
    train(cfg, tmp_path / "run", progress=False)
    rows = _rows(tmp_path / "run")
    assert [(r["iter"], r["iters"], r["objective"]) for r in rows] == [
        (10, 10, "fm"), (20, 10, "fm"), (25, 5, "fm"), (30, 5, "mle"), (35, 5, "mle"),
    ]  # fmt: skip
    # maximum likelihood starts at the largest valid step, then checks 1, 2, 4, 8 iterations on
    checks = [(c["iter"], c["event"]) for c in read_log(tmp_path / "run" / "log.jsonl").checks()]
    assert checks[0] == (26, "start") and [i for i, _ in checks] == [26, 27, 28, 30, 34]
    assert [len(r.get("adapt", [])) for r in rows] == [0, 0, 0, 4, 1]


def test_the_automatic_interval_makes_about_a_thousand_rows() -> None:
    assert TrainConfig().log_every == 0
    assert [log_interval(0, n) for n in (1, 999, 1999, 2000, 75_000, 10**6)] == [
        1, 1, 1, 2, 75, 1000,
    ]  # fmt: skip
    assert log_interval(7, 75_000) == 7  # given: as given
    for n in (500, 1000, 1500, 2000, 3001, 75_000, 123_457, 10**7):
        rows = -(-n // log_interval(0, n))  # the multiples, and the last iteration
        assert min(n, 1000) <= rows < 2000, n


def test_log_every_is_an_integer_at_least_zero_and_may_change_on_resume() -> None:
    from cnf.training import RESUMABLE

    for bad in (-1, 2.5, "10"):
        with pytest.raises(ConfigError, match="log_every"):
            config(log_every=bad)
    assert "log_every" in RESUMABLE and config(log_every=5).flat_options()["log_every"] == 5


def _row(it: int, **more) -> dict:
    """An iteration's row as the loop makes it (numbers that tell the iterations apart)."""
    return {"iter": it, "loss": float(it), "nll": 2.0 * it, "nfe": 16, "nfe_backward": 16,
            "grad_norm": 1.0, "lr": 1 / it, "step_size": 0.25, "atol": 1e-5, "rtol": 1e-5,
            "time": 0.5, "cpu": 0.25, **more}  # fmt: skip


def test_each_key_is_summed_averaged_or_the_last() -> None:
    check = {"gap": 0.1, "threshold": 0.01, "event": "shrink"}
    row = aggregate([_row(1, objective="mle", from_best=True), _row(2, objective="mle"),
                     _row(3, objective="mle", adapt=check, step_size=0.125),
                     _row(4, objective="mle", step_size=0.125, val_nll=1.5,
                          val_nll_se=float("nan"))])  # fmt: skip
    assert (row["iter"], row["iters"], row["time"], row["cpu"]) == (4, 4, 2.0, 1.0)
    assert (row["loss"], row["nll"], row["nfe"], row["grad_norm"]) == (2.5, 5.0, 16, 1.0)
    assert (row["lr"], row["step_size"], row["objective"]) == (0.25, 0.125, "mle")
    assert row["val_nll"] == 1.5 and math.isnan(row["val_nll_se"]) and row["from_best"] is True
    assert row["adapt"] == [{"iter": 3, **check, "step_size": 0.125, "atol": 1e-5}]
    assert adaptation_checks(row) == row["adapt"]
    one = _row(7, adapt=check)  # a log of a row per iteration, from before --log-every
    assert adaptation_checks(one) == [{"iter": 7, **check, "step_size": 0.25, "atol": 1e-5}]
    assert aggregate([_row(5)]) == {"iters": 1, **_row(5)}  # one iteration: as it was


def test_phases_and_skipped_iterations_end_a_row() -> None:
    rows = LogRows(10, ends=lambda it: it in (25, 35))  # flow matching to 25, the run to 35
    written = []
    for it in range(1, 36):
        written += rows.add(_row(it, objective="fm" if it <= 25 else "mle"))
    assert [(r["iter"], r["iters"], r["objective"]) for r in written] == [
        (10, 10, "fm"), (20, 10, "fm"), (25, 5, "fm"), (30, 5, "mle"), (35, 5, "mle"),
    ]  # fmt: skip
    rows = LogRows(10)
    written = rows.add(_row(1)) + rows.add(_row(2)) + rows.add(_row(8))  # a phase ended early
    assert [(r["iter"], r["iters"]) for r in written + rows.flush()] == [(2, 2), (8, 1)]
    assert rows.flush() == []


def test_a_long_run_logs_a_bounded_number_of_rows() -> None:
    total = 100_000  # a long toy run: the loop's rows, an evaluation every 250, a check every 50
    rows = LogRows(log_interval(0, total), ends=lambda it: it == total)
    written = []
    for it in range(1, total + 1):
        more = {"val_nll": 1.0} if it % 250 == 0 else {}
        if it % 50 == 0:
            more["adapt"] = {"gap": 0.0, "threshold": 0.01, "event": "grow"}
        written += rows.add(_row(it, **more))
    assert len(written) == 1200 and rows.flush() == []  # 200 cut at 250, 750, ... (evaluations)
    assert sum(r["iters"] for r in written) == total
    assert sum(len(r["adapt"]) for r in written) == total // 50  # no check lost
    assert sum(len(str(r)) for r in written) < 2_000_000  # 100,000 rows made 25 MB
