"""What likelihood models that are not flows reach on the digits benchmark's split, for scale.

    python bench/bench_image_references.py                 # 5 CPU minutes per model (~11 min)
    python bench/bench_image_references.py --minutes 0.1   # a smoke run

The CNFs of ``bench/bench_images.py`` score the dequantized pixels, an upper bound on the code
length of the discrete images. The models here give the discrete images' probability exactly,
so their bits/dim (``-log2 P(k) / D``) need no bound and no dequantization, and a flow that
matched them would score at least as high:

* ``independent``: each pixel its own 17-way categorical, the training frequencies with add-1/2
  smoothing (the code length if pixels were independent).
* ``pixelcnn``: an autoregressive model in raster order (van den Oord et al. 2016,
  arXiv:1601.06759): a 7x7 mask-A convolution, residual blocks of a 3x3 mask-B convolution and a
  1x1 one (``--width`` channels, ``--blocks`` of them, dropout ``--dropout``), a 17-way softmax
  per pixel; AdamW (lr 2e-3, weight decay 1e-4), batches of 64, trained for ``--minutes`` of CPU
  time on one thread. It overfits the 1,257 training images within a minute or two, so it is
  scored every 250 iterations on the 180 validation images, and the test number is that of the
  best of those checks (early stopping), not of the last iteration.

Same splits as the CNFs (``cnf.data``'s ``digits``: 1,257 training, 180 validation, 360 test).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import harness
import torch
from harness import Column
from torch import Tensor, nn

from cnf.data import get_dataset

LEVELS = 17
COLUMNS = [
    Column("model", "model"),
    Column("iters", "iterations"),
    Column("test", "test bits/dim", "{:.3f}", "bits/dim", "exact: -log2 P(k) / D"),
    Column("train", "train bits/dim", "{:.3f}", "bits/dim", "the first 360 training images"),
]


def independent(train: Tensor, test: Tensor) -> float:
    """Bits/dim of ``test`` under per-pixel categoricals fitted to ``train`` (add-1/2)."""
    flat, d = train.flatten(1).long(), train[0].numel()
    counts = torch.zeros(d, LEVELS).scatter_add_(1, flat.T, torch.ones(d, len(flat))) + 0.5
    logp = (counts / counts.sum(1, keepdim=True)).log()
    nll = -logp.gather(1, test.flatten(1).long().T).sum(0)
    return float(nll.mean()) / (d * math.log(2))


class MaskedConv(nn.Conv2d):
    """A convolution that sees only the pixels before the centre in raster order (mask A) or
    those and the centre (mask B)."""

    def __init__(self, cin: int, cout: int, k: int, mask: str) -> None:
        super().__init__(cin, cout, k, padding=k // 2)
        m, c = torch.ones_like(self.weight), k // 2
        m[:, :, c, c + (mask == "B") :] = 0
        m[:, :, c + 1 :] = 0
        self.register_buffer("mask", m)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class Residual(nn.Module):
    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.conv, self.mix = MaskedConv(width, width, 3, "B"), nn.Conv2d(width, width, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mix(self.drop(torch.relu(self.conv(torch.relu(x)))))


def pixelcnn(width: int, blocks: int, dropout: float) -> nn.Module:
    layers = [MaskedConv(1, width, 7, "A"), *(Residual(width, dropout) for _ in range(blocks))]
    return nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(width, LEVELS, 1))


def bits(net: nn.Module, k: Tensor) -> float:
    """Exact bits/dim of the integer images ``k`` (n, 1, H, W) under the autoregressive model."""
    net.eval()
    with torch.no_grad():
        logits = net(k.float() / (LEVELS - 1) - 0.5)
        nll = nn.functional.cross_entropy(logits, k[:, 0].long(), reduction="sum")
    net.train()
    return float(nll) / (k.numel() * math.log(2))


def train_pixelcnn(train: Tensor, val: Tensor, test: Tensor, args) -> dict:
    torch.manual_seed(0)
    net = pixelcnn(args.width, args.blocks, args.dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    best, start, it = (math.inf, None, 0), time.process_time(), 0
    while time.process_time() - start < 60 * args.minutes:
        k = train[torch.randint(len(train), (64,), generator=gen)]
        logits = net(k.float() / (LEVELS - 1) - 0.5)
        loss = nn.functional.cross_entropy(logits, k[:, 0].long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        if it % 250 == 0:
            score = bits(net, val)
            if score < best[0]:
                best = (score, copy.deepcopy(net.state_dict()), it)
            print(f"  pixelcnn {it}: validation {score:.3f}, training {bits(net, train[:360]):.3f}"
                  f" bits/dim, {time.process_time() - start:.0f} CPU s", flush=True)  # fmt: skip
    last = bits(net, test)
    if best[1] is None:  # too short for a check: the last iteration is the one scored
        best = (math.nan, None, it)
    else:
        net.load_state_dict(best[1])
    return dict(iters=it, best_iter=best[2], test=bits(net, test), last=last,
                train=bits(net, train[:360]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="CPU minutes of training")
    parser.add_argument("--width", type=int, default=96, help="PixelCNN channels")
    parser.add_argument("--blocks", type=int, default=6, help="PixelCNN residual blocks")
    parser.add_argument("--dropout", type=float, default=0.5, help="PixelCNN dropout")
    harness.add_arguments(parser)
    args = parser.parse_args()
    results = harness.start(__file__, parser, args)
    torch.set_num_threads(1)
    data = get_dataset("digits")
    train, val, test = data.pixels, data.validation_pixels(), data.test_pixels()
    flat = independent(train, test)
    print(f"  independent: {flat:.3f} bits/dim", flush=True)
    p = train_pixelcnn(train, val, test, args)
    rows = [
        dict(model="independent pixels", test=flat, train=independent(train, train)),
        dict(model=f"PixelCNN, best on validation (iteration {p['best_iter']})", iters=p["iters"],
             test=p["test"], train=p["train"]),
        dict(model="PixelCNN, last iteration", iters=p["iters"], test=p["last"]),
    ]  # fmt: skip
    results.table("references", f"digits, exact discrete likelihood, {args.minutes:g} CPU "
                  "minutes, one thread", COLUMNS, rows)  # fmt: skip
    results.write()


if __name__ == "__main__":
    main()
