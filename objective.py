"""The training objective: a miner picks index tuples from the batch, a loss scores them."""

from __future__ import annotations

import torch

from losses import contrastive_loss, triplet_margin_loss
from miners import MINERS, triplets_to_pairs


class MetricLearningObjective:
    """`objective(embeddings, labels) -> (loss, num_triplets)`.

    loss `triplet`: triplet margin loss over the mined triplets.
    loss `contrastive`: the mined triplets become (anchor, positive) and (anchor, negative) pairs.
    The miner's random draws (miner `random`) use a generator seeded once, so runs repeat.
    """

    def __init__(self, loss: str, miner: str, margin: float, positive_margin: float, negative_margin: float,
                 seed: int):
        if loss not in ("triplet", "contrastive"):
            raise ValueError(f"unknown loss {loss!r}")
        if miner not in MINERS:
            raise ValueError(f"unknown miner {miner!r}")
        self.loss, self.margin = loss, margin
        self.positive_margin, self.negative_margin = positive_margin, negative_margin
        self.mine = MINERS[miner]
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        triplets = self.mine(embeddings.detach(), labels, self.margin, self.generator)
        if self.loss == "triplet":
            loss = triplet_margin_loss(embeddings, triplets, self.margin)
        else:
            positive_pairs, negative_pairs = triplets_to_pairs(triplets)
            loss = contrastive_loss(embeddings, positive_pairs, negative_pairs, self.positive_margin, self.negative_margin)
        return loss, len(triplets[0])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
