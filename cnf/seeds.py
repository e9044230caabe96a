"""Random streams: every random number a run draws is a function of ``(seed, stream, index)``.

Training batches, Hutchinson probes, the step adapter's probes and every evaluation's probes are
drawn from generators seeded by :func:`stream_seed`, never from a generator's running position.
So a resumed run repeats an uninterrupted one exactly, an evaluation gives the same number every
time it is made, and a distributed job draws what one process would (each process then takes
its rows of the whole draw).
"""

from __future__ import annotations

import numpy as np
import torch

# the streams of a run (the datasets draw their batches from streams of their own)
PROBES, ADAPT, VALIDATION, TEST, VALIDITY = 1, 2, 3, 4, 5


def stream_seed(seed: int, stream: int, index: int) -> int:
    """A 32-bit seed for ``(seed, stream, index)``, by numpy's SeedSequence.

    Example:
        >>> stream_seed(0, PROBES, 7) == stream_seed(0, PROBES, 7) != stream_seed(0, ADAPT, 7)
        True
    """
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0])


def generator(device: torch.device | str, seed: int, stream: int, index: int) -> torch.Generator:
    """A generator on ``device`` seeded for ``(seed, stream, index)``."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, stream, index))
