r"""Pairs ``(x, c)`` held in memory as a dataset for the trainer: the rows that a model of
:math:`p(x \mid c)` is fitted on (:class:`cnf.regressor.CNFRegressor` fits ``x = y`` given the
features ``c = X``).

Batches, the validation set and the rows that fit the model's standardizations are
:class:`~cnf.data.conditional.Pairs`. They are drawn as :class:`~cnf.data.tabular.TabularData`
draws a table's rows: an endless sequence of seeded epochs (each a permutation of the training
pairs), the integer-valued columns of ``x`` dequantized on request (``c`` is a condition, not a
density: it is never dequantized).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import numpy as np

from cnf.data.base import content_hash
from cnf.data.columns import check_range, check_rows, dequantize, integer_columns, warn_integer
from cnf.data.conditional import Pairs
from cnf.data.tabular import Splits

logger = logging.getLogger("cnf")


class PairData:
    """Training and validation pairs as a dataset of :math:`p(x \\mid c)`, continuous ``c``.

    Arguments:
        name: what messages call the data (``"y | X"``).
        train: the training pairs: ``x`` of shape ``(n, d)``, ``c`` of shape ``(n, K)``, float64.
        validation: the held-out pairs (may be empty); ``test``: a test set (default none).
        columns: the names of the columns of ``x``; ``features``: those of ``c``.
        seed: the run's seed; batch order and dequantization noise are functions of it.
        dequantize: add ``U[0, 1)`` noise to the integer-valued columns of ``x``.
        note: where the warning about integer columns of ``x`` goes, and ``dequantize_hint``
            how it tells to dequantize.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> c = rng.normal(size=(20, 3))
        >>> data = PairData("y | X", Pairs(c[:16, :1] + 1, c[:16]), Pairs(c[16:, :1], c[16:]),
        ...                 columns=["y"], features=["a", "b", "c"])
        >>> batch = data.train_batch(8, 1)
        >>> batch.x.shape, batch.c.shape, data.meta()["context"]
        ((8, 1), (8, 3), {'kind': 'continuous', 'features': 3})
    """

    kind = "tabular"  # the model: a TabularCNF, its standardizations fitted on train_data()
    entropy = None  # unknown: a sample from an unknown density
    support = None

    def __init__(
        self,
        name: str,
        train: Pairs,
        validation: Pairs,
        *,
        test: Pairs | None = None,
        columns: Sequence[str],
        features: Sequence[str],
        seed: int = 0,
        dequantize: bool = False,
        note: Callable[[str], None] = logger.warning,
        dequantize_hint: str = "--dequantize",
    ) -> None:
        self.name, self.seed = name, seed
        self.columns, self.features = tuple(columns), tuple(features)
        test = test or Pairs(train.x[:0], train.c[:0])
        self.parts = {"train": train, "validation": validation, "test": test}
        for part, pairs in self.parts.items():
            _check_pairs(name, part, pairs, len(self.columns), len(self.features))
        check_rows(name, train.x)
        self.event_shape = (train.x.shape[1],)
        self._orders: dict[int, np.ndarray] = {}
        integer = integer_columns(train.x)
        self.integer = integer if dequantize else np.zeros_like(integer)
        if not dequantize:
            warn_integer(name, self.columns, integer, note, dequantize_hint)

    def _noisy(self, pairs: Pairs, *stream: int) -> Pairs:
        rng = np.random.default_rng([self.seed, *stream])
        return Pairs(dequantize(pairs.x, self.integer, rng), pairs.c)

    def train_batch(self, batch_size: int, iteration: int) -> Pairs:
        """Pairs ``(iteration - 1) * batch_size ...`` of an endless sequence of seeded epochs,
        freshly dequantized."""
        n = len(self.parts["train"].x)
        start = (iteration - 1) * batch_size
        first, last = start // n, (start + batch_size - 1) // n
        order = np.concatenate([self._epoch(e) for e in range(first, last + 1)])
        rows = order[start - first * n : start - first * n + batch_size]
        train = self.parts["train"]
        return self._noisy(Pairs(train.x[rows], train.c[rows]), 1, iteration)

    def _epoch(self, epoch: int) -> np.ndarray:
        """The order of the training pairs in ``epoch`` (the last two are cached)."""
        if epoch not in self._orders:
            n = len(self.parts["train"].x)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = np.random.default_rng([self.seed, 0, epoch]).permutation(n)
        return self._orders[epoch]

    def train_data(self) -> Pairs:
        """The training pairs, dequantized once (they fit the model's standardizations)."""
        return self._train_data

    @cached_property
    def _train_data(self) -> Pairs:
        return self._noisy(self.parts["train"], 4)

    @cached_property
    def _validation(self) -> Pairs:
        return self._noisy(self.parts["validation"], 2)

    def validation(self) -> Pairs:
        return self._validation

    def test(self, n: int | None = None) -> Pairs:
        """The test pairs (the first ``n`` if ``n`` is given)."""
        x, c = self._noisy(self.parts["test"], 3)
        return Pairs(x, c) if n is None else Pairs(x[:n], c[:n])

    def check_range(self, dtype: str) -> None:
        """Refuse values of ``x`` or ``c`` that training in ``dtype`` cannot represent
        (:func:`~cnf.data.columns.check_range`: the model standardizes both)."""
        for names, field in ((self.columns, "x"), (self.features, "c")):
            parts = [getattr(p, field) for p in self.parts.values()]
            check_range(self.name, names, Splits(*parts), dtype)

    def to(self, device: Any) -> PairData:
        return self  # batches are numpy arrays, moved by the trainer

    def fingerprint(self) -> str:
        """A hash of the training and validation pairs, the names and the dequantized columns."""
        train, val = self.parts["train"], self.parts["validation"]
        return content_hash(self.name, list(self.columns), list(self.features), train.x,
                            train.c, val.x, val.c, self.integer)  # fmt: skip

    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "event_shape": list(self.event_shape),
            "context": {"kind": "continuous", "features": len(self.features)},
            "columns": list(self.columns), "features": list(self.features),
            "rows": [len(p.x) for p in self.parts.values()],
            "dequantized": [c for c, i in zip(self.columns, self.integer, strict=True) if i],
        }  # fmt: skip


def _check_pairs(name: str, part: str, pairs: Pairs, width: int, features: int) -> None:
    """``x`` of shape ``(n, width)`` and ``c`` of shape ``(n, features)``, the same ``n``."""
    x, c = np.asarray(pairs.x), np.asarray(pairs.c)
    if x.ndim != 2 or x.shape[1] != width or c.ndim != 2 or c.shape[1] != features:
        raise ValueError(
            f"{name}: expected {part} pairs of x (n, {width}) and c (n, {features}), got "
            f"{x.shape} and {c.shape}"
        )
    if len(x) != len(c):
        raise ValueError(f"{name}: the {part} pairs have {len(x)} rows of x but {len(c)} of c")
