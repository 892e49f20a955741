"""The training objective: a miner picks index tuples from the batch, a loss scores them.

Both come from pytorch-metric-learning (PML), chosen by name from the registries below; the one miner PML
lacks, the reference's random triplets, is ours (miners.py). A miner returns triplets `(a, p, n)` or pairs
`(a1, p, a2, n)` of batch indices; a tuple loss scores them (triplets become pairs and back as PML does), a
proxy loss weighs each image by how often it was mined. Miner `none` (or `all`) hands over the whole batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import loss_and_miner_utils

from config import ConfigError
from miners import random_triplets


@dataclass(frozen=True)
class LossSpec:
    """A loss: its PML class, the PML parameters that config keys set, and what it is built from.

    takes: `triplets` or `pairs` (it scores mined tuples), or `proxies` (it learns one or more vectors per
    training class and needs the number of classes). loss_lr_ratio: the learning rate of its own parameters
    over the backbone's, as its authors trained it (see docs/training.md for the sources).
    """

    pml_class: type
    takes: str
    config_params: dict[str, str] = field(default_factory=dict)
    loss_lr_ratio: float = 0.0


LOSSES: dict[str, LossSpec] = {
    "triplet": LossSpec(losses.TripletMarginLoss, "triplets", {"margin": "train.margin"}),
    "contrastive": LossSpec(losses.ContrastiveLoss, "pairs", {"pos_margin": "train.contrastive_pos_margin",
                                                              "neg_margin": "train.contrastive_neg_margin"}),
    "multi_similarity": LossSpec(losses.MultiSimilarityLoss, "pairs"),
    "circle": LossSpec(losses.CircleLoss, "pairs"),
    "supcon": LossSpec(losses.SupConLoss, "pairs"),
    "proxy_anchor": LossSpec(losses.ProxyAnchorLoss, "proxies", loss_lr_ratio=100.0),  # Kim et al. 2020, code
    "normalized_softmax": LossSpec(losses.NormalizedSoftmaxLoss, "proxies", loss_lr_ratio=1.0),  # Roth et al. 2020
    "arcface": LossSpec(losses.ArcFaceLoss, "proxies", loss_lr_ratio=50.0),  # Roth et al. 2020, code
    "subcenter_arcface": LossSpec(losses.SubCenterArcFaceLoss, "proxies", loss_lr_ratio=50.0),
}


@dataclass(frozen=True)
class MinerSpec:
    """A miner: its PML class (None: ours or no miner), the parameters config keys set, those fixed here."""

    pml_class: type | None
    config_params: dict[str, str] = field(default_factory=dict)
    fixed_params: dict[str, Any] = field(default_factory=dict)


MINERS: dict[str, MinerSpec] = {
    "batchhard": MinerSpec(miners.BatchHardMiner),
    "semihard": MinerSpec(miners.TripletMarginMiner, {"margin": "train.margin"}, {"type_of_triplets": "semihard"}),
    "multi_similarity": MinerSpec(miners.MultiSimilarityMiner),
    "random": MinerSpec(None),  # miners.random_triplets: PML has no per-anchor random triplet miner
    "all": MinerSpec(None),  # every tuple: what a tuple loss takes when given no indices
    "none": MinerSpec(None),
}

# Built by us, never by the config: the loss's shape, and PML's pluggable parts (objects, not numbers).
_NOT_CONFIGURABLE = {"num_classes", "embedding_size"}


def accepted_params(pml_class: type | None) -> dict[str, Any]:
    """{name: default} of the numbers, bools and strings a PML class takes, its parents' included, up to the
    first class that names its parameters without passing *args on (SubCenterArcFace -> ArcFace)."""
    if pml_class is None:
        return {}
    params: dict[str, Any] = {}
    for klass in pml_class.__mro__:
        if "__init__" not in vars(klass):
            continue
        signature = inspect.signature(klass.__init__)
        for name, parameter in signature.parameters.items():
            if parameter.kind is parameter.KEYWORD_ONLY or parameter.kind is parameter.POSITIONAL_OR_KEYWORD:
                if name != "self" and name not in _NOT_CONFIGURABLE:
                    params.setdefault(name, parameter.default)
        if not any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
            break
    return params


def _checked_params(kind: str, name: str, pml_class: type | None, given: dict, config_params: dict[str, str],
                    fixed_params: dict[str, Any]) -> dict[str, Any]:
    """`given` (train.loss_params or train.miner_params) checked against what the class accepts, values typed."""
    key = f"train.{kind}_params"
    accepted = {n: d for n, d in accepted_params(pml_class).items() if n not in config_params and n not in fixed_params}
    checked = {}
    for param, value in given.items():
        if param in config_params:
            raise ConfigError(f"config key '{key}.{param}': {kind} {name}'s {param} is set by {config_params[param]}")
        if param not in accepted:
            valid = ", ".join(sorted(accepted)) or "none"
            raise ConfigError(f"config key '{key}.{param}': {kind} {name} has no parameter '{param}'; valid: {valid}")
        default = accepted[param]
        if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (isinstance(default, bool) and not isinstance(value, bool)) or (
                isinstance(default, (int, float)) and not isinstance(default, bool) and not numeric):
            raise ConfigError(f"config key '{key}.{param}' expects {type(default).__name__} like its default "
                              f"{default!r}, got {value!r}")
        checked[param] = value
    return checked


def check_objective_params(train) -> tuple[dict, dict]:
    """(loss parameters, miner parameters), typed; ConfigError (one line) unless train.loss_params and
    train.miner_params name parameters that the chosen loss and miner accept, with values of their defaults'
    types. `train`: the config's train section."""
    loss, miner = LOSSES[train.loss], MINERS[train.miner]
    return (_checked_params("loss", train.loss, loss.pml_class, dict(train.loss_params), loss.config_params, {}),
            _checked_params("miner", train.miner, miner.pml_class, dict(train.miner_params), miner.config_params,
                            miner.fixed_params))


def resolve_objective_config(config):
    """The config with its objective keys checked (before any data is read), and the miner default adapted:
    a proxy loss with `train.miner` left unset gets no miner (every image counts once)."""
    check_objective_params(config.train)
    if LOSSES[config.train.loss].takes == "proxies" and not config.is_explicit("train.miner"):
        return config.updated({"train.miner": "none"})
    return config


def loss_learning_rate(train) -> float:
    """train.loss_lr, or (0) train.lr times the ratio the loss's authors used for its own parameters."""
    return train.loss_lr or train.lr * LOSSES[train.loss].loss_lr_ratio


class _ActiveTermCounter(torch.nn.Module):
    """Wraps a PML loss's reducer: counts the loss terms (per triplet, pair, image or proxy) it reduces and how
    many of them are non-zero ("active"), as tensors (no CPU-GPU sync)."""

    def __init__(self, reducer: torch.nn.Module, loss_names: list[str]):
        super().__init__()
        self.reducer, self.loss_names = reducer, loss_names
        self.num_terms = self.num_active = torch.zeros(())

    def forward(self, loss_dict, embeddings, labels):
        terms = [entry["losses"].detach().flatten() for name, entry in loss_dict.items()
                 if name in self.loss_names and torch.is_tensor(entry["losses"]) and entry["losses"].ndim >= 1]
        self.num_terms = torch.tensor(float(sum(len(t) for t in terms)))
        self.num_active = sum(((t > 0).sum() for t in terms), torch.zeros((), device=embeddings.device)).float()
        return self.reducer(loss_dict, embeddings, labels)


class MetricLearningObjective:
    """`objective(embeddings, labels, sources) -> (loss, stats)`.

    Args:
        loss, miner: names in LOSSES and MINERS.
        loss_params, miner_params: their checked parameters (train.loss_params, train.miner_params).
        config_values: values of the config keys named in the specs' config_params (e.g. train.margin).
        class_ids: the training split's class labels (proxy losses: one proxy set per class, labels mapped to
            0..C-1 here). embedding_dim: the embedding width (proxy losses).
        seed: the random miner's generator.
        skip_repeats: drop positive pairs of an image with its own repeat (data.repeat_positives=skip);
            needs `sources`, the dataset index of each row.

    stats: {"tuples": number of tuples scored, "loss_terms", "active_terms"} as 0-d tensors.
    The loss's own parameters (proxies) are `parameters()`, saved and restored with `state_dict()`.
    """

    def __init__(self, loss: str = "triplet", miner: str = "batchhard", loss_params: dict | None = None,
                 miner_params: dict | None = None, config_values: dict | None = None, class_ids=None,
                 embedding_dim: int = 0, seed: int = 0, skip_repeats: bool = False):
        self.spec, miner_spec = LOSSES[loss], MINERS[miner]
        config_values = config_values or {}
        loss_kwargs = {param: config_values[key] for param, key in self.spec.config_params.items()}
        loss_kwargs.update(loss_params or {})
        self.class_ids = None
        if self.spec.takes == "proxies":
            self.class_ids = torch.as_tensor(sorted({int(c) for c in class_ids}), dtype=torch.int64)
            loss_kwargs.update(num_classes=len(self.class_ids), embedding_size=embedding_dim)
        self.loss = self.spec.pml_class(**loss_kwargs)
        own_terms = [n for n in self.loss.sub_loss_names() if n not in self.loss.all_regularization_loss_names()]
        self.loss.reducer = self.counter = _ActiveTermCounter(self.loss.reducer, own_terms)
        self.miner_name = miner
        self.miner = None
        if miner_spec.pml_class is not None:
            miner_kwargs = {param: config_values[key] for param, key in miner_spec.config_params.items()}
            self.miner = miner_spec.pml_class(**miner_kwargs, **miner_spec.fixed_params, **(miner_params or {}))
        self.skip_repeats = skip_repeats
        self.generator = torch.Generator().manual_seed(seed)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.loss.parameters())

    def to(self, device: torch.device) -> "MetricLearningObjective":
        self.loss.to(device)
        if self.class_ids is not None:
            self.class_ids = self.class_ids.to(device)
        return self

    def _mine(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """Index tuples, or None for the whole batch."""
        if self.miner_name == "random":
            return random_triplets(embeddings, labels, self.generator)
        if self.miner is not None:
            return self.miner(embeddings, labels)
        return None

    def _drop_repeat_positives(self, tuples, labels: torch.Tensor, sources: torch.Tensor):
        """Tuples without a positive pair of one image with itself (another view of the same file)."""
        if self.spec.takes == "proxies":
            return tuples
        if tuples is None:  # the whole batch, spelled out so that it can be filtered
            tuples = (loss_and_miner_utils.get_all_triplets_indices(labels) if self.spec.takes == "triplets"
                      else loss_and_miner_utils.get_all_pairs_indices(labels))
        keep = sources[tuples[0]] != sources[tuples[1]]
        if len(tuples) == 3:
            return tuple(t[keep] for t in tuples)
        return tuples[0][keep], tuples[1][keep], tuples[2], tuples[3]

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor,
                 sources: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        labels = labels.to(embeddings.device)
        if self.class_ids is not None:
            labels = torch.searchsorted(self.class_ids, labels)  # class ids -> 0..C-1, the proxies' rows
        with torch.no_grad():
            tuples = self._mine(embeddings.detach(), labels)
            if self.skip_repeats and sources is not None:
                tuples = self._drop_repeat_positives(tuples, labels, sources.to(embeddings.device))
        loss = self.loss(embeddings, labels, tuples)
        if tuples is not None:
            num_tuples = len(tuples[0]) + (len(tuples[2]) if len(tuples) == 4 else 0)
        else:  # proxies: one image is one term; pairs: every ordered pair; triplets: each triplet a term
            num_tuples = {"proxies": len(labels), "pairs": len(labels) * (len(labels) - 1)}.get(self.spec.takes)
        num_tuples = self.counter.num_terms if num_tuples is None else torch.tensor(float(num_tuples))
        return loss, {"tuples": num_tuples, "loss_terms": self.counter.num_terms,
                      "active_terms": self.counter.num_active}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "loss": self.loss.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.loss.load_state_dict(state.get("loss", {}))  # strict: proxies must match in number and width


def objective_from_config(train, repeat_positives: str, class_ids, embedding_dim: int) -> MetricLearningObjective:
    """The objective of a config's train section (checked by check_objective_params)."""
    config_keys = {key for spec in (LOSSES[train.loss], MINERS[train.miner]) for key in spec.config_params.values()}
    config_values = {key: getattr(train, key.split(".")[1]) for key in config_keys}
    loss_params, miner_params = check_objective_params(train)
    return MetricLearningObjective(train.loss, train.miner, loss_params, miner_params, config_values, class_ids,
                                   embedding_dim, train.seed, skip_repeats=repeat_positives == "skip")
