"""Signs that a run is going wrong, per training step and per epoch: the embeddings' spread, the fraction of the
loss's terms that still teach anything, the gradient norm, and a one-line warning when one of them collapses.

Collapse is the usual failure of metric learning from a random start: every image maps to nearly the same
point, a margin loss then sits at its margin (every triplet active, none separable) and retrieval is no
better than chance, while the loss curve looks merely flat.
"""

from __future__ import annotations

import math

import torch

# An epoch whose batches' mean pairwise distance falls below this fraction of the first epoch's and whose
# effective rank falls below this many dimensions has collapsed: the embeddings crowd onto about two directions.
# Both, because contraction alone is how a margin loss learns from a random start: every triplet run of
# configs/demo.yaml on cub100 photos fell to 0.10-0.23 of its first spread, the best one (+0.067 Recall@1)
# included, while keeping a rank of 3-5; the earlier lr 3e-4 recipe fell to 0.2 and a rank of 2.1
# (docs/recipes.md). The demo's run keeps >= 0.37 of its first spread and a rank >= 3.9.
SPREAD_COLLAPSE_FRACTION = 0.25
EFFECTIVE_RANK_COLLAPSE = 2.5
# Fewer active loss terms than this fraction: the miner or the margin leaves (almost) nothing to learn from.
ACTIVE_FRACTION_COLLAPSE = 0.01


@torch.no_grad()
def embedding_spread(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean pairwise distance, effective rank) of a batch of L2-normalised embeddings, as 0-d float32 tensors.

    Args:
        embeddings: (B, D) unit vectors, B >= 2.

    mean pairwise distance: the mean of ||e_i - e_j|| over i != j; in [0, 2], 0 when all rows coincide.
    effective rank (Roy & Vetterli 2007): exp of the entropy of the normalised singular values of the (B, D)
    matrix; between 1 (all rows on one line) and min(B, D) (as spread as the batch allows).

    Corner cases: B < 2 gives (nan, nan); no sync with the host.
    """
    if len(embeddings) < 2:
        nan = torch.tensor(math.nan, device=embeddings.device)
        return nan, nan
    x = embeddings.float()
    with torch.autocast(device_type=x.device.type, enabled=False):
        gram = x @ x.T  # (B, B)
        singular_values = torch.linalg.svdvals(x)  # (min(B, D),)
    squared = (gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram).clamp_min(0)
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    mean_distance = squared[off_diagonal].sqrt().mean()
    p = singular_values / singular_values.sum().clamp_min(1e-12)
    effective_rank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return mean_distance, effective_rank


class EpochSignals:
    """Sums of the per-step signals over an epoch, kept on the device; `summary()` syncs once."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value.to(self.sums[name].device) if name in self.sums else value
        self.steps += 1

    def summary(self) -> dict[str, float]:
        """train/embedding_spread, train/effective_rank, train/grad_norm (means over steps), train/active_fraction
        (active loss terms over all of them); nan where there was no step."""
        if not self.steps:
            return {}
        sums = {name: value.item() for name, value in self.sums.items()}
        terms = sums.get("loss_terms", 0.0)
        return {"train/embedding_spread": sums["spread"] / self.steps,
                "train/effective_rank": sums["effective_rank"] / self.steps,
                "train/active_fraction": sums["active_terms"] / terms if terms else math.nan,
                "train/grad_norm": sums["grad_norm"] / self.steps}


def collapse_warning(record: dict, first: dict, proxy_loss: bool = False) -> str | None:
    """One line saying what collapsed in this epoch's `record` and what to try, or None.

    Collapse: an effective rank below `EFFECTIVE_RANK_COLLAPSE` together with a spread below
    `SPREAD_COLLAPSE_FRACTION` of the first epoch's (the first epoch itself, `record is first`, by its rank
    alone); or under `ACTIVE_FRACTION_COLLAPSE` of the loss's terms active. A signal missing from the record
    (nan) never warns by itself: without a rank, no collapse; without a spread, the rank alone decides.
    `first`: the first epoch's record (the reference spread). `proxy_loss`: the loss already learns proxies, so
    the advice is not to use one."""
    spread, rank = record.get("train/embedding_spread", math.nan), record.get("train/effective_rank", math.nan)
    active = record.get("train/active_fraction", math.nan)
    first_spread = first.get("train/embedding_spread", math.nan)
    epoch = record.get("epoch")
    # The first epoch has no reference but itself: its rank alone decides (so does a record without a spread).
    contracted = record is first or not spread >= SPREAD_COLLAPSE_FRACTION * first_spread
    if rank < EFFECTIVE_RANK_COLLAPSE and contracted:
        return (f"warning: epoch {epoch}: the embeddings are collapsing (mean pairwise distance {spread:.3f}, "
                f"epoch 1: {first_spread:.3f}; effective rank {rank:.1f}): try a lower train.lr or a longer "
                f"train.warmup_fraction, " + ("or a lower train.loss_lr (the proxies' learning rate)" if proxy_loss
                                              else "train.miner=all or semihard instead of batchhard, or a proxy "
                                                   "loss (train.loss=proxy_anchor)"))
    if active < ACTIVE_FRACTION_COLLAPSE:
        return (f"warning: epoch {epoch}: only {100 * active:.2f}% of the loss's terms are active, so almost "
                f"nothing is learned: try a larger train.margin, train.miner=batchhard or all, or bigger batches")
    return None
