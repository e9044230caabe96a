"""Class-conditional digits p(image | digit): bits/dim against the unconditional model of the same
CPU budget, the generative classifier, and guided samples scored by a classifier of real digits.

    python bench/bench_conditional_images.py             # 300 CPU s a model (17 CPU minutes)
    python bench/bench_conditional_images.py --seconds 600 --cond-dropout 0.2
    python bench/bench_conditional_images.py --quick     # a smoke run (about a minute)

Two models of sklearn's 8x8 digits (17 levels), each trained from scratch in this process, on one
thread, with ``cnf train``'s image preset (``PRESETS["image-fm"]``: one CNF block over the whole
image, a U-Net field of width 32, flow matching with logit-normal times, batch 128, lr 2e-3 on a
cosine), keeping the weights of their best validation NLL (every 1,000 iterations and at the
end, as ``cnf train`` keeps ``best.pt``). Both train the iterations that ``cnf train --budget``
plans for the conditional model's ``--seconds`` of training CPU time (``TrainConfig.for_data``,
the budget plan, ``fit``): one plan for both, since a plan times 100 iterations and the load
while it does moves its count by ten percent, and the label's embedding adds nothing measurable
to an iteration.

* ``p(x | y)``: ``--condition label``, the digit's embedding added to the U-Net's time
  embedding, with ``--cond-dropout`` (default 0.1) of each batch on the null condition, so that
  classifier-free guidance has an unconditional field to extrapolate from;
* ``p(x)``: the same recipe without the label.

"training CPU s" is the iterations' own CPU time; "total CPU s" adds the setup and the validation
solves (the plan's CPU time is printed).

Measured on the 360 test digits, every density with the preset's evaluation solver (rk4, 16
steps) and the Hutchinson trace, one probe per image, the same probes for every model and class
(:func:`cnf.evaluate.log_probs` with one seed, as :func:`cnf.classifier.class_log_likelihoods`
takes them):

* test bits/dim of ``p(x)``, of ``p(x | y)`` at the true digit, and of the conditional model's
  own marginal ``sum_y p(y) p(x | y)`` (the training digits' class frequencies as ``p(y)``), with
  the paired difference from ``p(x)`` and its standard error. The true densities differ by the
  mutual information ``I(x; y) <= H(y) <= log2(10)`` bits an image, 0.052 bits/dim;
* the generative classifier ``argmax_y log p(x | y) + log p(y)`` (:func:`cnf.classifier.bayes_rule`
  on the ten columns of log-likelihoods): its accuracy and confusion matrix;
* guided sampling: for each ``--guidance`` weight ``w``, ``--per-class`` samples of each digit
  from the field ``(1 + w) f(t, z, y) - w f(t, z, null)`` (:func:`cnf.guidance.guided_flow` of
  the model; at ``w = 0`` exactly the model's samples), from the same noise
  for every ``w``, integrated with rk4 in ``--steps`` steps (default 32, 128 evaluations of the
  field), quantized to the 17 pixel levels and classified by a scikit-learn
  ``LogisticRegression`` trained on the real training digits (pixels / 16; its accuracy on the
  real test digits is the reference). Class agreement is the fraction of samples classified as
  the digit they were drawn for; the best ``w`` is that of the highest agreement (the smallest
  on a tie). At the best ``w`` a solver check draws ``--per-class`` / 4
  samples of each digit from the same noise with dopri5 at atol = rtol = 1e-5 and reports how
  often the two solvers' samples get the same label and how many quantized pixels differ.

The figure (``--figure``, by default figures/conditional_digits.png, none with ``--quick``
unless given) shows ten samples of each digit (a row per digit) at the best ``w`` and the class
agreement against ``w``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import harness
import numpy as np
import torch
from harness import Column
from torch import Tensor

from cnf.classifier import Classification, bayes_rule, class_log_likelihoods
from cnf.evaluate import bits_per_dim, log_probs, mean_and_se
from cnf.guidance import guided_flow
from cnf.runtime import to_tensors
from cnf.solvers import Solver
from cnf.training import KeepBest, TrainConfig, fit, setup
from cnf.training import budget as budgeting

CLASSES = 10
GUIDANCE = (0.0, 0.5, 1.0, 2.0, 4.0)
REFERENCE = Solver("dopri5", atol=1e-5, rtol=1e-5, max_nfe=100_000)  # the solver check's
FIGURE = Path("figures/conditional_digits.png")
QUICK = dict(unet_width=8, eval_every=50)  # a smoke run's model: a narrow U-Net
QUICK_RUN = dict(seconds=4.0, test_n=40, per_class=2, steps=4, guidance=[0.0, 2.0])


@dataclass
class Trained:
    """A trained model, its data and what its training cost."""

    model: torch.nn.Module
    data: object
    iters: int
    cpu: float  # the iterations' own CPU seconds
    total_cpu: float  # setup, iterations and validation


@dataclass(frozen=True)
class Guided:
    """The samples of one guidance weight, their labels and the real-digit classifier's
    predictions."""

    w: float
    images: Tensor
    labels: Tensor
    predicted: np.ndarray
    cpu: float

    @property
    def hits(self) -> np.ndarray:
        return self.predicted == self.labels.numpy()


def recipe(conditional: bool, args: argparse.Namespace) -> TrainConfig:
    """``cnf train``'s image preset for the digits, with or without their label."""
    given = dict(budget=args.seconds, seed=args.seed, threads=1, device="cpu")
    if conditional:
        given.update(condition="label", cond_dropout=args.cond_dropout)
    given.update({k: v for k, v in (("lr", args.lr), ("unet_width", args.unet_width)) if v})
    return TrainConfig.for_data("digits", **given, **(QUICK if args.quick else {}))


def plan_both(args: argparse.Namespace) -> tuple[TrainConfig, TrainConfig, str]:
    """Both recipes with the iterations that the conditional one's budget plan comes to (the
    label's embedding adds nothing measurable to an iteration): one plan, so that the load
    while it is timed cannot give one model a longer budget than the other."""
    cond = recipe(True, args)
    with harness.timed() as t:
        cond, plan = budgeting.plan(cond, setup(cond))
    print(f"  {plan.describe()} ({t.cpu:.0f} CPU s to plan)", file=sys.stderr, flush=True)
    return cond, recipe(False, args).replace(iters=cond.iters), plan.describe()


def train(cfg: TrainConfig) -> Trained:
    """Train ``cfg`` from scratch through ``fit``, keeping its best validation weights."""
    keep = KeepBest()
    with harness.timed() as t:
        run = setup(cfg)
        result = fit(run.state, run.data, run.objective, cfg, hooks=keep, progress=False,
                     quiet=True)  # fmt: skip
    if keep.weights is not None:
        run.model.load_state_dict(keep.weights)
    tag = "p(x | y)" if cfg.condition else "p(x)"
    print(f"  {tag}: {result.iteration:,} iterations, {keep.cpu:.0f} training CPU s "
          f"({t.cpu:.0f} in all)", file=sys.stderr, flush=True)  # fmt: skip
    return Trained(run.model.eval(), run.data, result.iteration, keep.cpu, t.cpu)


def class_prior(labels: Tensor) -> Tensor:
    """The training digits' class frequencies."""
    return torch.bincount(labels, minlength=CLASSES).double() / len(labels)


def density_rows(plain: Trained, cond: Trained, logp: Tensor, result: Classification,
                 y: Tensor) -> list[dict]:  # fmt: skip
    """Test bits/dim of ``p(x)``, ``p(x | y)`` and the conditional model's marginal, each with
    its difference from ``p(x)`` (paired by image)."""
    dim = math.prod(plain.model.event_shape)
    true = result.log_likelihood.gather(1, y[:, None])[:, 0]
    rows = []
    for name, model, values in (("p(x)", plain, logp), ("p(x | y), the true digit", cond, true),
                                ("sum_y p(y) p(x | y)", cond, result.log_evidence)):  # fmt: skip
        nll, se = mean_and_se(-values)
        gap, gap_se = mean_and_se(logp - values) if values is not logp else (None, None)
        rows.append(dict(name=name, iters=model.iters, cpu=model.cpu, total=model.total_cpu,
                         bpd=bits_per_dim(nll, dim), se=bits_per_dim(se, dim),
                         gap=gap if gap is None else bits_per_dim(gap, dim),
                         gap_se=gap_se if gap is None else bits_per_dim(gap_se, dim)))  # fmt: skip
    return rows


def real_digit_classifier(data, seed: int):
    """A logistic regression of the real training digits (pixels / 16), and its accuracy on the
    real test digits."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=5000, random_state=seed)
    clf.fit(_features(data.pixels), data.labels.numpy())
    _, y = to_tensors(data.test(), torch.device("cpu"), torch.float32)
    return clf, float(clf.score(_features(data.test_pixels()), y.numpy()))


def _features(pixels: Tensor) -> np.ndarray:
    return pixels.flatten(1).double().numpy() / 16


@torch.no_grad()
def guided_digits(model, labels: Tensor, w: float, solver: Solver, seed: int) -> Tensor:
    """Samples of ``p_w(x | y)`` from :func:`cnf.guidance.guided_flow` of the model, from the
    same noise for every ``w`` (at ``w = 0`` the model's own samples)."""
    gen = torch.Generator().manual_seed(seed)
    return guided_flow(model, w).sample(len(labels), context=labels, solver=solver, generator=gen)


def guide(model, clf, w: float, per_class: int, solver: Solver, seed: int) -> Guided:
    """``per_class`` guided samples of each digit at weight ``w``, and their labels under the
    real-digit classifier."""
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    with harness.timed() as t:
        images = guided_digits(model, labels, w, solver, seed)
    pixels = model.dequantization.quantize(images)
    return Guided(w, images, labels, clf.predict(_features(pixels)), t.cpu)


def guidance_row(g: Guided) -> dict:
    agree = float(g.hits.mean())
    per_class = [float(g.hits[g.labels.numpy() == c].mean()) for c in range(CLASSES)]
    return dict(w=g.w, agreement=agree, se=math.sqrt(agree * (1 - agree) / len(g.hits)),
                worst=min(per_class), worst_digit=int(np.argmin(per_class)), n=len(g.hits),
                cpu=g.cpu)  # fmt: skip


def best_weight(rows: list[dict]) -> float:
    """The weight of the highest agreement (the smallest such weight on a tie)."""
    return max(rows, key=lambda r: (r["agreement"], -r["w"]))["w"]


def solver_check(model, clf, g: Guided, per_class: int, steps: int, seed: int) -> dict:
    """``per_class`` samples of each digit at ``g.w`` by rk4 and by dopri5 at 1e-5 from the same
    noise: how often the two solvers' samples get the same label, the share of their quantized
    pixels that differ, and the agreement under each."""
    ref = guide(model, clf, g.w, per_class, REFERENCE, seed)
    ours = guide(model, clf, g.w, per_class, Solver("rk4", step_size=1 / steps), seed)
    q_ref, q_ours = (model.dequantization.quantize(x.images) for x in (ref, ours))
    same = float((ref.predicted == ours.predicted).mean())
    return dict(w=g.w, n=len(ref.labels), same_label=same,
                pixels=float((q_ref != q_ours).double().mean()),
                agreement=[float(ours.hits.mean()), float(ref.hits.mean())],
                cpu=[ours.cpu, ref.cpu])  # fmt: skip


def confusion_rows(confusion: Tensor) -> list[dict]:
    return [dict(true=i, **{str(j): int(v) for j, v in enumerate(row)}, total=int(row.sum()))
            for i, row in enumerate(confusion)]  # fmt: skip


def draw(path: Path, best: Guided, rows: list[dict], real: float, levels: int) -> None:
    """Ten samples of each digit at the best weight (a row per digit), and agreement against
    the weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cnf.viz import image_grid

    per_class = len(best.labels) // CLASSES
    shown = min(per_class, 10)
    keep = (torch.arange(len(best.labels)) % per_class) < shown
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.6), width_ratios=(1, 1.1))
    left.imshow(image_grid(best.images[keep], levels, columns=shown), cmap="gray",
                interpolation="nearest")  # fmt: skip
    h = best.images.shape[-2] + 1  # a row of the grid: an image and its border
    left.set(title=f"guided samples, w = {best.w:g}", xticks=[], ylabel="digit",
             yticks=[1 + h * c + h // 2 for c in range(CLASSES)],
             yticklabels=range(CLASSES))  # fmt: skip
    ws = [r["w"] for r in rows]
    right.errorbar(ws, [r["agreement"] for r in rows], yerr=[r["se"] for r in rows], marker="o",
                   capsize=3, label="samples")  # fmt: skip
    right.axhline(real, color="C2", ls="--", lw=1, label="real test digits")
    right.axhline(0.95, color="C3", ls=":", lw=1, label="floor 0.95")
    right.set(xlabel="guidance weight w", ylabel="class agreement (logistic regression)",
              title="agreement with the conditioning digit")  # fmt: skip
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


DENSITY = [
    Column("name", "model"),
    Column("iters", "iterations", "{:,}"),
    Column("cpu", "training CPU s", "{:.0f}", "s", "the iterations' own CPU time"),
    Column("total", "total CPU s", "{:.0f}", "s", "setup, iterations and validation"),
    Column("bpd", "test bits/dim", "{:.4f}", "bits/dim", "360 test digits, one dequantization"),
    Column("se", "± SE", "{:.4f}", "bits/dim"),
    Column("gap", "minus p(x)", "{:+.4f}", "bits/dim", "paired by image (negative: better)"),
    Column("gap_se", "± SE", "{:.4f}", "bits/dim"),
]
CLASSIFIER = [
    Column("name", "classifier"),
    Column("accuracy", "test accuracy", "{:.4f}", about="on the 360 test digits"),
    Column("n", "test digits"),
]
GUIDANCE_COLUMNS = [
    Column("w", "w", "{:g}"),
    Column("agreement", "class agreement", "{:.4f}", about="samples classified as their digit"),
    Column("se", "± SE", "{:.4f}", about="binomial"),
    Column("worst", "worst digit's", "{:.3f}"),
    Column("worst_digit", "worst digit"),
    Column("n", "samples"),
    Column("cpu", "sampling CPU s", "{:.0f}", "s"),
]
SOLVER_CHECK = [
    Column("w", "w", "{:g}"),
    Column("n", "samples"),
    Column("same_label", "same label", "{:.3f}", about="rk4's and dopri5's sample, same noise"),
    Column("pixels", "pixels that differ", "{:.4f}", about="share of quantized pixels"),
    Column("agreement", "agreement: rk4 / dopri5", "{:.3f}"),
    Column("cpu", "CPU s: rk4 / dopri5", "{:.0f}", "s"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="training CPU seconds per model")  # fmt: skip
    parser.add_argument("--cond-dropout", type=float, default=0.1,
                        help="share of each batch on the null condition")  # fmt: skip
    parser.add_argument("--lr", type=float, help="both models' learning rate (default: preset)")
    parser.add_argument("--unet-width", type=int, help="both U-Nets' width (default: preset)")
    parser.add_argument("--guidance", nargs="+", type=float, default=list(GUIDANCE))
    parser.add_argument("--per-class", type=int, default=40, help="guided samples per digit")
    parser.add_argument("--steps", type=int, default=32, help="rk4 steps of guided sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, help=f"default {FIGURE} (none with --quick)")
    parser.add_argument("--quick", action="store_true", help="narrow U-Nets, 4 s budgets")
    harness.add_arguments(parser)
    args = parser.parse_args()
    results = harness.start(__file__, parser, args, ignore=("figure",), smoke=args.quick)
    test_n = None
    if args.quick:
        args.seconds, test_n, args.per_class, args.steps, args.guidance = QUICK_RUN.values()
    figure = args.figure or (None if args.quick else FIGURE)
    torch.set_num_threads(1)

    # 1. the two models, the same budget each
    cond_cfg, plain_cfg, plan = plan_both(args)
    cond, plain = train(cond_cfg), train(plain_cfg)

    # 2. test densities and the generative classifier, every column under the same probes
    x, y = to_tensors(cond.data.test(test_n), torch.device("cpu"), torch.float32)
    with harness.timed() as t:
        likelihoods = class_log_likelihoods(cond.model, x, seed=args.seed)
        logp = log_probs(plain.model, x, seed=args.seed)[0]
    print(f"  test densities: {t.cpu:.0f} CPU s", file=sys.stderr, flush=True)
    result = bayes_rule(likelihoods, class_prior(cond.data.labels))
    density = density_rows(plain, cond, logp, result, y)
    results.table("density", f"Test bits/dim of the digits after {args.seconds:g} training CPU s "
                  "per model, one thread", DENSITY, density)  # fmt: skip
    clf, real = real_digit_classifier(cond.data, args.seed)
    results.table("classifier", "Classifying the test digits", CLASSIFIER, [
        dict(name="generative: argmax_y log p(x | y) + log p(y)", accuracy=result.accuracy(y),
             n=len(y)),
        dict(name="logistic regression on the pixels (the samples' judge)", accuracy=real,
             n=len(cond.data.test_pixels())),
    ])  # fmt: skip
    confusion = [Column("true", "true digit"), *(Column(str(j), str(j)) for j in range(CLASSES)),
                 Column("total", "total")]  # fmt: skip
    results.table("confusion", "The generative classifier's confusion (rows: the true digit)",
                  confusion, confusion_rows(result.confusion(y)))  # fmt: skip

    # 3. guided samples, judged by the real-digit classifier
    solver = Solver("rk4", step_size=1 / args.steps)
    guided = [guide(cond.model, clf, w, args.per_class, solver, args.seed) for w in args.guidance]
    rows = [guidance_row(g) for g in guided]
    results.table("guidance", f"Class agreement of {args.per_class} guided samples per digit "
                  f"(rk4, {args.steps} steps) under a logistic regression of real digits "
                  f"(test accuracy {real:.4f})", GUIDANCE_COLUMNS, rows)  # fmt: skip
    best = guided[[g.w for g in guided].index(best_weight(rows))]
    check = solver_check(cond.model, clf, best, max(1, args.per_class // 4), args.steps,
                         args.seed)  # fmt: skip
    results.table("solver_check", "Guided samples at the best w: rk4 against dopri5 at 1e-5 "
                  "from the same noise", SOLVER_CHECK, [check])  # fmt: skip
    results.settings.update(seconds=args.seconds, per_class=args.per_class, steps=args.steps,
                            guidance=args.guidance, best_w=best.w, plan=plan)  # fmt: skip
    if figure is not None:
        draw(figure, best, rows, real, cond.model.levels)
    results.write()


if __name__ == "__main__":
    main()
