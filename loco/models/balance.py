"""``model.split=balanced:K``: cut a backbone into K local modules of even cost.

A local method's memory is set by its largest module (LoCo: its largest adjacent pair), so
the cuts that matter are the ones that make the modules even, not the architecture's
stages. Each block's cost is measured once with a fixed recipe, so every rank (and a
resumed run) computes the same cuts without talking to the others:

* fp32, on CPU, batch :data:`MEASURE_BATCH` of the config's image size, train mode;
* ``saved``: bytes the block's forward saves for backward (each storage counted once, for
  the block that saved it first), as in ``loco bench``'s saved-activation profile;
* ``flops``: the block's forward FLOPs (``torch.utils.flop_counter``).

BatchNorm running statistics and the global random state are left as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from loco.profiling import SavedTensorTracker, count_flops

MEASURE_BATCH = 2


def measure_blocks(
    forward_block: Callable[[int, torch.Tensor], torch.Tensor],
    n_blocks: int,
    image_size: int,
    metric: str,
    exclude: Sequence[torch.Tensor] = (),
) -> list[int]:
    """Per block: saved-activation bytes or forward FLOPs, running blocks in order."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(MEASURE_BATCH, 3, image_size, image_size, generator=g)
    costs: list[int] = []
    with torch.random.fork_rng(devices=[]):
        if metric == "flops":
            with torch.no_grad():
                for k in range(n_blocks):
                    costs.append(count_flops(lambda k=k, x=x: forward_block(k, x)))
                    x = forward_block(k, x)
            return costs
        current = ["0"]
        with torch.enable_grad(), SavedTensorTracker(exclude, owner=lambda: current[0]) as t:
            outs = []  # kept, so that nothing saved is freed before the count is read
            for k in range(n_blocks):
                current[0] = str(k)
                x = forward_block(k, x if k == 0 else x.detach().requires_grad_(True))
                outs.append(x)
            by_block = dict(t.peak_by_owner)
        del outs
    return [by_block.get(str(k), 0) for k in range(n_blocks)]


def balanced_cuts(costs: Sequence[float], k: int) -> list[int]:
    """Cut points (indices where modules 2..K start) splitting ``costs`` into ``k`` contiguous,
    non-empty groups with the smallest possible largest group; among those, the smallest sum
    of squares (the most even). Dynamic programming over prefixes, exact in the largest."""
    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} blocks into {k} non-empty modules")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = (float("inf"), float("inf"))
    # best[j][i]: (largest, sum of squares) of the first i blocks in j groups; arg: last cut
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = (0.0, 0.0)
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for c in range(j - 1, i):
                prev = best[j - 1][c]
                if prev == inf:
                    continue
                group = prefix[i] - prefix[c]
                cand = (max(prev[0], group), prev[1] + group * group)
                if cand < best[j][i]:
                    best[j][i], arg[j][i] = cand, c
    cuts, i = [], n
    for j in range(k, 1, -1):
        i = arg[j][i]
        cuts.append(i)
    return cuts[::-1]
