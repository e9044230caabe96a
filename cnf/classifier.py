r"""The generative (Bayes) classifier of a label-conditional flow.

A flow of :math:`p(x \mid y)` for labels :math:`y \in \{0, \dots, C - 1\}`
(``CNF(dim, num_classes=C)``) classifies by Bayes' rule with a prior :math:`p(y)`:

.. math:: \log p(y \mid x) = \log p(x \mid y) + \log p(y)
    - \log \sum_{y'} p(x \mid y')\, p(y'), \qquad
    \hat y(x) = \arg\max_y\, \log p(x \mid y) + \log p(y),

the rule of least expected error when the class densities and the prior are the true ones.
Each class's likelihood is one solve of the flow's exact change of variables; under a Hutchinson
trace every class's solve takes the same probes, so that the estimates' noise is shared and the
comparison between classes is fair (for a linear field it cancels exactly).

References:
    Ng and Jordan, "On Discriminative vs. Generative Classifiers", NeurIPS 2001.
    Fetaya et al., "Understanding the Limitations of Conditional Generative Models", ICLR 2020
    (arXiv:1906.01171).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cnf.context import INTEGER_DTYPES
from cnf.evaluate import log_probs
from cnf.flow import CNF, Flow
from cnf.solvers import Solver


@dataclass(frozen=True)
class Classification:
    """Bayes' rule applied to every row.

    Attributes:
        log_likelihood: ``log p(x | y)``, ``(n, C)`` (float64).
        log_prior: ``log p(y)``, ``(C,)``.
        log_posterior: ``log p(y | x)``, ``(n, C)``; every row's ``logsumexp`` is 0.
        predicted: the most probable class a posteriori, ``(n,)`` (the lowest on a tie).
    """

    log_likelihood: Tensor
    log_prior: Tensor
    log_posterior: Tensor
    predicted: Tensor

    @property
    def classes(self) -> int:
        """The number of classes ``C``."""
        return len(self.log_prior)

    @property
    def posterior(self) -> Tensor:
        """``p(y | x)``, ``(n, C)``; rows sum to 1."""
        return self.log_posterior.exp()

    @property
    def log_evidence(self) -> Tensor:
        """``log p(x) = log sum_y p(x | y) p(y)``, the mixture's density of each row."""
        return torch.logsumexp(self.log_likelihood + self.log_prior, 1)

    def accuracy(self, y: Tensor) -> float:
        """The fraction of rows predicted as their true label ``y``."""
        return accuracy(self.predicted, y)

    def confusion(self, y: Tensor) -> Tensor:
        """The confusion matrix against the true labels ``y`` (:func:`confusion`)."""
        return confusion(self.predicted, y, self.classes)


def check_label_flow(flow: object) -> int:
    """The number of classes of a label-conditional flow (a :class:`~cnf.flow.CNF` or a
    :class:`~cnf.multiscale.MultiscaleCNF` with ``num_classes``)."""
    if not isinstance(flow, Flow) or getattr(flow, "num_classes", None) is None:
        what = type(flow).__name__
        if isinstance(flow, Flow):
            what = f"a {what} of p(x) without conditions"
            if getattr(flow, "context_features", None) is not None:
                what = (f"a {type(flow).__name__} of p(x | c) for {flow.context_features} "
                        "continuous features")  # fmt: skip
        raise ValueError(
            f"flow must be a label-conditional CNF to classify, got {what}: build "
            "CNF(dim, num_classes=C) (or MultiscaleCNF(..., num_classes=C)) and train it on "
            "labelled data"
        )
    return flow.num_classes


def class_log_likelihoods(
    flow: CNF,
    x: Tensor,
    *,
    batch_size: int = 5000,
    solver: Solver | None = None,
    seed: int = 0,
) -> Tensor:
    """``log p(x | y)`` of every row for every class ``y``, in eval mode without gradients.

    Arguments:
        flow: a label-conditional :class:`~cnf.flow.CNF` (``num_classes=C``).
        x: the points, ``(n, *event_shape)``, on the flow's device and in its dtype.
        batch_size: rows per solve (bounds memory).
        solver: overrides the flow's evaluation solver.
        seed: where the Hutchinson probes come from: batch ``i`` of every class draws them
            from the same generator (:func:`cnf.evaluate.log_probs`), so the classes are
            compared under the same probes.

    Returns:
        A float64 tensor ``(n, C)``: column ``y`` holds ``log p(x | y)``.
    """
    classes = check_label_flow(flow)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    x = flow.check_input(x, "x")
    labels = torch.ones(len(x), dtype=torch.long, device=x.device)
    columns = [log_probs(flow, x, seed=seed, batch_size=batch_size, solver=solver,
                         context=labels * y)[0] for y in range(classes)]  # fmt: skip
    return torch.stack(columns, 1)


def bayes_rule(
    log_likelihood: Tensor, prior: Sequence[float] | Tensor | None = None
) -> Classification:
    """Classify rows from their class log-likelihoods ``(n, C)`` and a prior (probabilities
    ``(C,)``, non-negative, summing to 1; by default uniform), without solving again: one set
    of likelihoods serves any number of priors.

    Example:
        >>> result = bayes_rule(torch.tensor([[0.0, -1.0], [-3.0, -2.0]]), prior=[0.9, 0.1])
        >>> result.predicted.tolist()
        [0, 0]
    """
    if not isinstance(log_likelihood, Tensor) or log_likelihood.ndim != 2:
        shape = tuple(log_likelihood.shape) if isinstance(log_likelihood, Tensor) else None
        raise ValueError(
            f"log_likelihood must be a tensor (n, C) of log p(x | y), got "
            f"{shape or type(log_likelihood).__name__}: class_log_likelihoods gives one"
        )
    log_prior = check_prior(prior, log_likelihood.shape[1]).to(log_likelihood)
    joint = log_likelihood + log_prior
    log_posterior = joint - torch.logsumexp(joint, 1, keepdim=True)
    return Classification(log_likelihood, log_prior, log_posterior, joint.argmax(1))


def classify(
    flow: CNF,
    x: Tensor,
    *,
    prior: Sequence[float] | Tensor | None = None,
    batch_size: int = 5000,
    solver: Solver | None = None,
    seed: int = 0,
) -> Classification:
    r"""Classify ``x`` with a label-conditional flow by Bayes' rule,
    :math:`\hat y = \arg\max_y \log p(x \mid y) + \log p(y)`.

    Arguments:
        flow: a label-conditional :class:`~cnf.flow.CNF` (``num_classes=C``).
        x: the points, ``(n, *event_shape)``.
        prior: the class probabilities :math:`p(y)`, ``C`` non-negative numbers summing to 1;
            by default uniform (then the rule is maximum likelihood).
        batch_size: rows per solve.
        solver: overrides the flow's evaluation solver.
        seed: where the Hutchinson probes come from (:func:`class_log_likelihoods`).

    Returns:
        A :class:`Classification`: log-likelihoods, log-posteriors and predicted labels.

    Example:
        >>> from cnf import Solver
        >>> flow = CNF(2, hidden=(8,), num_classes=3, solver=Solver("rk4", step_size=0.25))
        >>> result = classify(flow, torch.zeros(4, 2), prior=[0.5, 0.25, 0.25])
        >>> result.log_posterior.shape, result.predicted.shape
        (torch.Size([4, 3]), torch.Size([4]))
    """
    classes = check_label_flow(flow)
    check_prior(prior, classes)  # before the solves, which cost C passes over x
    likelihoods = class_log_likelihoods(flow, x, batch_size=batch_size, solver=solver, seed=seed)
    return bayes_rule(likelihoods, prior)


def check_prior(prior: Sequence[float] | Tensor | None, classes: int) -> Tensor:
    """``log p(y)`` (float64, ``(C,)``) of the prior probabilities ``prior``; uniform if
    ``None``."""
    if prior is None:
        return torch.full((classes,), -math.log(classes), dtype=torch.float64)
    try:
        p = torch.as_tensor(prior, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"prior must be {classes} class probabilities (a sequence or tensor of numbers), "
            f"got {type(prior).__name__}"
        ) from None
    if p.shape != (classes,):
        raise ValueError(
            f"prior must hold one probability per class, shape ({classes},), got "
            f"{tuple(p.shape)}: this flow has {classes} classes"
        )
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError(f"prior must hold non-negative probabilities, got {p.tolist()}")
    if abs(float(p.sum()) - 1) > 1e-6:
        raise ValueError(
            f"prior must sum to 1, got {p.tolist()} (sum {float(p.sum()):.6g}): normalize it "
            "with p / sum(p)"
        )
    return p.log()


def accuracy(pred: Tensor, y: Tensor) -> float:
    """The fraction of ``pred`` equal to the true labels ``y`` (both integer ``(n,)``, n >= 1).

    Example:
        >>> accuracy(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))
        0.75
    """
    _check_labels(pred, y)
    if len(y) == 0:
        raise ValueError("accuracy of no rows is undefined: pass at least one label")
    return float((pred == y).double().mean())


def confusion(pred: Tensor, y: Tensor, classes: int) -> Tensor:
    """The ``(C, C)`` confusion matrix: entry ``[i, j]`` counts the rows of true class ``i``
    predicted as ``j`` (rows: true class). Its sum is ``n`` and its trace over ``n`` the
    accuracy.

    Example:
        >>> confusion(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3).tolist()
        [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    """
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise ValueError(f"classes must be a positive integer, got {classes!r}")
    _check_labels(pred, y)
    for name, labels in (("pred", pred), ("y", y)):
        bad = (labels < 0) | (labels >= classes)
        if bool(bad.any()):
            raise ValueError(
                f"{name} holds labels outside [0, {classes}): {labels[bad][:5].tolist()}; "
                f"pass classes= the number of classes"
            )
    counts = torch.bincount(y.long() * classes + pred.long(), minlength=classes * classes)
    return counts.reshape(classes, classes)


def _check_labels(pred: object, y: object) -> None:
    for name, labels in (("pred", pred), ("y", y)):
        if not isinstance(labels, Tensor) or labels.dtype not in INTEGER_DTYPES:
            kind = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
            raise TypeError(
                f"{name} must be an integer tensor of class labels, got {kind}: convert "
                f"with torch.as_tensor({name}).long()"
            )
    if pred.ndim != 1 or pred.shape != y.shape:
        raise ValueError(
            f"pred and y must be label vectors of one shape (n,), got {tuple(pred.shape)} and "
            f"{tuple(y.shape)}: one prediction per true label"
        )
    if pred.device != y.device:
        raise ValueError(f"pred is on {pred.device} but y on {y.device}: move one to the other")
