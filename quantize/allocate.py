"""Bit allocation under a budget (`athena quantize --target-bits B`): one recipe per linear layer from a
menu, so that the linear layers' stored bytes are at most B bits per weight on average and the expected
loss Σ_l ½ tr(F_l) · mse_l(recipe) (`sensitivity.py`) is as small as the greedy below finds.

The menu varies the codebook shape (d, n); the rest of the recipe (k, codebook storage, low rank, row
scales) is the base recipe's. Each option's cost is its exact stored bytes (`AthenaRecipe.stored_bytes`:
packed indices, codebooks and their scales, low-rank factors, row scales).

Multiple-choice knapsack, greedy on the lower convex hull: every layer starts at its cheapest option;
upgrades are taken in order of loss saved per extra byte while they fit; a last pass spends what is left
on any single upgrade that still fits, best saving first.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass

from .recipe import AthenaRecipe

# (d, n) shapes offered per layer: index bits log2(n)/d from 1.5 to 4.
DEFAULT_MENU: tuple[tuple[int, int], ...] = (
    (1, 4),
    (1, 8),
    (1, 16),
    (2, 8),
    (2, 16),
    (2, 32),
    (2, 64),
    (2, 128),
    (2, 256),
    (3, 32),
    (3, 64),
    (3, 128),
    (3, 256),
    (4, 256),
)


@dataclass(frozen=True)
class BitBudget:
    """`--target-bits`: the budget and how the allocation measures sensitivity."""

    target_bits: float  # average stored bits per linear weight, upper bound
    menu: tuple[tuple[int, int], ...] = DEFAULT_MENU  # (d, n) options per layer
    sensitivity_windows: int = 8  # calibration windows back-propagated for the Fisher traces
    sample_groups: int = 8  # column groups per layer k-means'd to measure each option's error

    def __post_init__(self) -> None:
        if (
            isinstance(self.target_bits, bool)
            or not isinstance(self.target_bits, (int, float))
            or not self.target_bits > 0
        ):
            raise ValueError(f"--target-bits must be a positive number, got {self.target_bits!r}")
        if not self.menu or any(len(o) != 2 or o[0] < 1 or o[1] < 2 or o[1] & (o[1] - 1) for o in self.menu):
            raise ValueError(f"BitBudget.menu must be (d, n) pairs with n a power of two, got {self.menu!r}")
        if self.sensitivity_windows < 1 or self.sample_groups < 1:
            raise ValueError("BitBudget.sensitivity_windows and sample_groups must be >= 1")

    def recipes(self, base: AthenaRecipe, N: int) -> list[AthenaRecipe]:
        """The menu for an [N, ·] layer: base with each (d, n); shapes with more centroids than rows are left out."""
        return [dataclasses.replace(base, d=d, n=n) for d, n in self.menu if n <= N]


@dataclass(frozen=True)
class Option:
    recipe: AthenaRecipe
    bytes: int  # stored bytes of the layer with this recipe
    loss: float  # expected loss increase, ½ tr(F) · mse


def _hull(options: list[Option]) -> list[Option]:
    """Options on the lower convex hull of (bytes, loss), cheapest first (dominated ones dropped)."""
    pts = sorted(options, key=lambda o: (o.bytes, o.loss))
    frontier: list[Option] = []
    for o in pts:
        if frontier and o.loss >= frontier[-1].loss:
            continue  # more bytes, no less loss
        while len(frontier) >= 2:
            a, b = frontier[-2], frontier[-1]
            # drop b if it lies on or above the segment a -> o
            if (b.loss - a.loss) * (o.bytes - a.bytes) >= (o.loss - a.loss) * (b.bytes - a.bytes):
                frontier.pop()
            else:
                break
        frontier.append(o)
    return frontier


def allocate(options: dict[str, list[Option]], numel: dict[str, int], target_bits: float) -> dict[str, Option]:
    """One option per layer with Σ bytes <= target_bits · Σ numel / 8, greedy on loss saved per byte.

    Raises ValueError when even the cheapest options exceed the budget (naming the least it can be)."""
    if set(options) != set(numel) or any(not o for o in options.values()):
        raise ValueError("allocate: every layer needs at least one option and its weight count")
    total = sum(numel.values())
    budget = int(target_bits * total / 8.0 + 1e-9)  # bytes; floor so the average is <= target_bits
    choice = {name: min(opts, key=lambda o: (o.bytes, o.loss)) for name, opts in options.items()}
    used = sum(o.bytes for o in choice.values())
    if used > budget:
        raise ValueError(
            f"--target-bits {target_bits:g} is below what the menu can store: the cheapest recipes "
            f"take {8.0 * used / total:.3f} bits per linear weight"
        )
    hulls = {name: _hull(opts) for name, opts in options.items()}
    pos = {name: 0 for name in options}
    for name, h in hulls.items():  # the hull's first point may beat the raw cheapest on loss at equal bytes
        if h[0].bytes == choice[name].bytes:
            choice[name] = h[0]
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        h, i = hulls[name], pos[name]
        if i + 1 < len(h):
            a, b = h[i], h[i + 1]
            heapq.heappush(heap, (-(a.loss - b.loss) / (b.bytes - a.bytes), name))

    for name in sorted(options):
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        a, b = hulls[name][pos[name]], hulls[name][pos[name] + 1]
        if used + b.bytes - a.bytes <= budget:
            used += b.bytes - a.bytes
            choice[name] = b
            pos[name] += 1
            push(name)
    while True:  # spend the rest: the single best-saving upgrade that still fits, until none does
        best = None
        for name in sorted(options):
            cur = choice[name]
            for o in options[name]:
                extra = o.bytes - cur.bytes
                if o.loss < cur.loss and used + extra <= budget and (best is None or cur.loss - o.loss > best[0]):
                    best = (cur.loss - o.loss, name, o, extra)
        if best is None:
            break
        _, name, o, extra = best
        choice[name], used = o, used + extra
    return choice
