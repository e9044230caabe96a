"""A table's log columns (``log_columns="positive"``): the log taken before the affine layer,
its Jacobian in every density, and rows outside the support."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from cnf import CNFDensity
from cnf.solvers import Solver
from cnf.table_flow import Normalizer, TabularCNF
from cnf.training.setup import _check_support


def _data(n: int = 200, seed: int = 0) -> np.ndarray:
    """Two log-normal columns (one of them with a wide range) and one that crosses zero."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    return np.column_stack([np.exp(1.0 + 0.2 * z[:, 0]), np.exp(2.0 * z[:, 1]), z[:, 2] - 0.5])


def _flow(log_columns: str = "positive", preprocess: str = "whiten", seed: int = 0,
          trained: bool = True) -> TabularCNF:  # fmt: skip
    torch.manual_seed(seed)
    flow = TabularCNF(3, preprocess=preprocess, log_columns=log_columns, hidden=(16,),
                      solver=Solver("rk4", step_size=0.1))  # fmt: skip
    if trained:  # a clearly non-identity flow
        for p in flow.parameters():
            p.data.normal_(0, 0.5)
    return flow.eval()


@pytest.mark.parametrize("kind", ["standardize", "whiten", "none"])
def test_log_jacobian_is_the_log_abs_det_of_the_jacobian(float64, kind: str) -> None:
    norm = Normalizer(3, kind, log="positive")
    x = _data()
    norm.fit(x)
    assert norm.log_mask.tolist() == [True, True, False]  # the third column crosses zero
    rows = torch.tensor(x[:5])
    for row, expected in zip(rows, norm.log_jacobian(rows), strict=True):
        jac = torch.autograd.functional.jacobian(lambda v: norm(v[None])[0], row)
        assert expected.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-10)
    u = norm(torch.tensor(x))
    np.testing.assert_allclose(norm.inverse(u).numpy(), x, rtol=1e-10, atol=1e-12)
    if kind == "whiten":  # the logged training rows, whitened: identity covariance
        np.testing.assert_allclose(np.cov(u.numpy().T, bias=True), np.eye(3), atol=1e-6)


def test_the_untrained_flow_of_a_positive_column_is_the_fitted_log_normal(float64) -> None:
    """The field starts at zero: with a log column and standardization, the model is the
    log-normal of the training rows' log mean and sd, whose density is known in closed form."""
    x = _data()[:, :1]
    flow = TabularCNF(1, log_columns="positive", hidden=(8,), solver=Solver("rk4", step_size=0.5))
    flow.fit_preprocessing(x)
    mu, sd = np.log(x).mean(), np.log(x).std()
    grid = np.linspace(0.5, 8.0, 7)[:, None]
    with torch.no_grad():
        logp = flow.eval().log_prob(torch.tensor(grid)).numpy()
    np.testing.assert_allclose(logp, stats.lognorm.logpdf(grid[:, 0], s=sd, scale=np.exp(mu)),
                               rtol=1e-9)  # fmt: skip


def test_nll_changes_by_log_c_when_a_log_column_is_scaled_by_c(float64) -> None:
    """On a log scale, a change of units is a shift, which the normalizer's mean absorbs: each
    row's NLL moves by exactly log c, as for the affine layer alone."""
    x, c = _data(100), np.array([1000.0, 0.01, 3.0])
    a, b = _flow(), _flow()
    a.fit_preprocessing(x)
    b.fit_preprocessing(x * c)
    with torch.no_grad():
        la, lb = a.log_prob(torch.tensor(x[:20])), b.log_prob(torch.tensor(x[:20] * c))
    np.testing.assert_allclose((la - lb).numpy(), np.log(c).sum(), atol=1e-8)


def test_a_trained_density_integrates_to_one_over_the_positive_half_line(float64) -> None:
    x = _data()[:, 1:2]
    torch.manual_seed(0)
    flow = TabularCNF(1, log_columns="positive", hidden=(16,), solver=Solver("rk4", step_size=0.05))
    for p in flow.parameters():
        p.data.normal_(0, 0.5)
    flow.fit_preprocessing(x)
    t = torch.linspace(-12.0, 8.0, 4001, dtype=torch.float64)  # x = e^t covers the support
    with torch.no_grad():
        logp = flow.eval().log_prob(t.exp()[:, None])
    mass = torch.trapezoid((logp + t).exp(), t).item()  # dx = e^t dt
    assert mass == pytest.approx(1.0, abs=2e-3)


def test_samples_are_positive_and_their_log_density_is_log_prob(float64) -> None:
    flow = _flow()
    flow.fit_preprocessing(_data())
    with torch.no_grad():
        x, logp = flow.sample_and_log_prob(50, generator=torch.Generator().manual_seed(1))
        again = flow.log_prob(x, trace="exact")
    assert bool((x[:, :2] > 0).all()) and bool((x[:, 2] < 0).any())
    np.testing.assert_allclose(logp.numpy(), again.numpy(), atol=1e-4)


def test_rows_outside_the_support_have_density_zero(float64) -> None:
    flow = _flow()
    flow.fit_preprocessing(_data())
    x = torch.tensor(_data(6, seed=1))
    x[1, 0], x[4, 1] = 0.0, -2.0
    with torch.no_grad():
        logp = flow.log_prob(x)
        inside = flow.log_prob(x[[0, 2, 3, 5]])
    assert math.isinf(logp[1]) and math.isinf(logp[4]) and logp[1] < 0
    np.testing.assert_allclose(logp[[0, 2, 3, 5]].numpy(), inside.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match=r"row 1 has 0 in column 0.*log_columns='none'"):
        flow.to_latent(x)
    with pytest.raises(ValueError, match="unknown log_columns 'all'"):
        Normalizer(3, log="all")


def test_training_refuses_held_out_rows_outside_the_support() -> None:
    """Positive on every training row, but a test row at zero: refused before training."""
    flow = _flow(trained=False)
    flow.fit_preprocessing(_data())
    test = _data(10, seed=2)
    data = SimpleNamespace(validation=lambda: _data(10, seed=1), test=lambda: test,
                           columns=("size", "conc", "shift"))  # fmt: skip
    _check_support(flow, data)  # all inside
    test[3, 1] = 0.0
    with pytest.raises(ValueError, match=r"conc is positive .* test split .* --log-columns none"):
        _check_support(flow, data)
    _check_support(_flow("none", trained=False), data)  # without log columns, any value


def test_a_checkpoint_from_before_log_columns_loads(float64) -> None:
    flow = _flow("none")
    flow.fit_preprocessing(_data())
    state = {k: v for k, v in flow.state_dict().items() if not k.endswith("log_mask")}
    other = _flow("none", seed=1)
    other.load_state_dict(state)
    x = torch.tensor(_data(5, seed=3))
    with torch.no_grad():
        np.testing.assert_allclose(other.log_prob(x).numpy(), flow.log_prob(x).numpy())
    assert not bool(other.normalizer.log_mask.any())


def test_the_estimator_scores_rows_outside_the_support_minus_infinity() -> None:
    x = _data(120)
    est = CNFDensity(log_columns="positive", hidden=(8,), max_iter=20, finetune_iter=0,
                     eval_every=10, method="rk4", step_size=0.25, random_state=0)  # fmt: skip
    est.fit(x)
    assert est.model_.normalizer.log_mask.tolist() == [True, True, False]
    rows = _data(4, seed=5)
    rows[2, 0] = -1.0
    scores = est.score_samples(rows)
    assert np.isneginf(scores[2]) and np.isfinite(scores[[0, 1, 3]]).all()
    assert (est.sample(20, random_state=0)[:, :2] > 0).all()


def _auto(x: np.ndarray, **kwargs) -> CNFDensity:
    est = CNFDensity(log_columns="auto", hidden=(8,), max_iter=30, finetune_iter=0,
                     eval_every=10, method="rk4", step_size=0.25, random_state=0,
                     **kwargs)  # fmt: skip
    return est.fit(x)


@pytest.mark.parametrize("validation_fraction", [0.1, 0.0])
def test_auto_takes_the_log_of_log_normal_columns(validation_fraction) -> None:
    """On a log scale these columns are exactly Gaussian: the log wins on the rows the pilots
    are scored on (the training rows alone, where there are no validation rows)."""
    x = np.exp(1.5 * np.random.default_rng(0).normal(size=(300, 3)))
    assert _auto(x, validation_fraction=validation_fraction).log_columns_ == "positive"


def test_auto_scores_the_pilots_on_training_and_validation_rows(monkeypatch) -> None:
    """Each pilot's score is its mean NLL on the validation and training rows together: the
    same number as one evaluation of its weights on those rows, pooled."""
    from cnf.evaluate import evaluate
    from cnf.seeds import VALIDATION
    from cnf.training import choice

    scored, real = [], choice._pooled_nll

    def recording(state, data, cfg):
        nll = real(state, data, cfg)
        rows = np.concatenate([data.validation(), data.train_data()])
        x = torch.as_tensor(rows, dtype=next(state.model.parameters()).dtype)
        solver = choice.validation_solver(state.model.eval_solver, cfg.val_tol)
        with state.averaged(), torch.no_grad():
            expected = evaluate(state.model, x, solver=solver, seed=cfg.seed, stream=VALIDATION)
        scored.append((nll, expected.nll, len(data.validation())))
        return nll

    monkeypatch.setattr(choice, "_pooled_nll", recording)
    _auto(np.exp(np.random.default_rng(0).normal(size=(200, 2))))
    assert len(scored) == 2  # one per scale
    for nll, expected, n_val in scored:
        assert n_val > 0 and nll == pytest.approx(expected, abs=1e-4)


def test_auto_keeps_a_sum_and_its_parts_on_their_own_scale() -> None:
    """A total beside its parts lies on a plane, which the log bends: no log wins."""
    rng = np.random.default_rng(0)
    parts = rng.normal(10.0, 1.0, size=(300, 2))
    x = np.column_stack([parts, parts.sum(1) + 0.01 * rng.normal(size=300)])
    assert _auto(x).log_columns_ == "none"


def test_auto_without_a_positive_column_takes_no_log() -> None:
    assert _auto(np.random.default_rng(0).normal(size=(100, 2))).log_columns_ == "none"


def test_cnf_train_saves_the_choice_and_refuses_held_out_rows_outside(tmp_path, capsys) -> None:
    from cnf.cli import main
    from cnf.data.tabular import split_indices

    rng = np.random.default_rng(0)
    x = np.exp(1.5 * rng.normal(size=(200, 2)))
    np.savetxt(tmp_path / "pos.csv", x, delimiter=",", header="a,b", comments="")
    flags = ["--iters", "20", "--eval-every", "10", "--hidden", "8", "--no-progress"]
    assert main(["train", "--data", str(tmp_path / "pos.csv"), "--out", str(tmp_path / "r"),
                 *flags]) == 0  # fmt: skip
    table = json.loads((tmp_path / "r" / "config.json").read_text())["model"]["table"]
    assert table["log_columns"] == "positive"  # chosen, so that a resume needs no choice
    _, _, test = split_indices(len(x), 0.1, 0.1, 0)
    x[test[0], 1] = 0.0  # positive on every training row, zero in a test row
    np.savetxt(tmp_path / "zero.csv", x, delimiter=",", header="a,b", comments="")
    capsys.readouterr()
    for option, code in (("positive", 1), ("auto", 0)):  # auto takes no log there
        out = tmp_path / option
        argv = ["train", "--data", str(tmp_path / "zero.csv"), "--out", str(out),
                "--log-columns", option, *flags]  # fmt: skip
        assert main(argv) == code
    err = capsys.readouterr().err
    assert "b is positive on every training row" in err and "--log-columns none" in err
    assert not (tmp_path / "positive").exists()  # refused before the directory was made
    table = json.loads((tmp_path / "auto" / "config.json").read_text())["model"]["table"]
    assert table["log_columns"] == "none"


def test_a_loaded_model_takes_the_log_of_the_columns_it_was_fitted_with(float64) -> None:
    flow = _flow()
    flow.fit_preprocessing(_data())
    fresh = _flow(seed=1)  # never fitted: no log columns of its own
    fresh.load_state_dict(flow.state_dict())
    x = torch.tensor(_data(5, seed=3))
    with torch.no_grad():
        np.testing.assert_allclose(fresh.log_prob(x).numpy(), flow.log_prob(x).numpy())
        np.testing.assert_allclose(fresh.normalizer.inverse(fresh.normalizer(x)).numpy(), x)


def test_a_conditional_run_from_before_log_columns_loads(tmp_path) -> None:
    """Both of a conditional table model's normalizers gained a log mask; a checkpoint without
    either loads as a model without log columns, with the densities it was saved with."""
    from cnf.cli import main
    from cnf.runs import load_run

    out = tmp_path / "run"
    assert main(["train", "--data", "wine", "--condition", "target", "--iters", "4",
                 "--eval-every", "2", "--hidden", "8", "--log-columns", "none", "--out",
                 str(out), "--no-progress"]) == 0  # fmt: skip
    before = load_run(out)
    ckpt = torch.load(out / "best.pt", weights_only=True)
    dropped = [k for k in ckpt["model"] if k.endswith("log_mask")]
    assert sorted(dropped) == ["context_normalizer.log_mask", "normalizer.log_mask"]
    for key in dropped:
        del ckpt["model"][key]
    torch.save(ckpt, out / "best.pt")
    after = load_run(out)
    assert not after.model.normalizer.has_log and not after.model.context_normalizer.has_log
    saved = before.model.state_dict()
    for key, value in after.model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_auto_chooses_for_a_regressors_target_on_its_pairs() -> None:
    """``CNFRegressor``'s ``y`` given ``X``: a log-normal target (its log linear in ``X``) is
    taken on a log scale, the pilots scored on the (X, y) pairs."""
    from cnf import CNFRegressor

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 2))
    y = np.exp(X @ [0.5, -0.3] + 1.2 * rng.normal(size=300))
    est = CNFRegressor(log_columns="auto", hidden=(8,), max_iter=30, finetune_iter=0,
                       eval_every=10, method="rk4", step_size=0.25, random_state=0)  # fmt: skip
    assert est.fit(X, y).log_columns_ == "positive"
