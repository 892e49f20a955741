"""The objective: names -> pytorch-metric-learning losses and miners, checked against hand-worked answers and
brute-force loops on small unit-vector batches; our random miner; repeats skipped; proxies; few-step learning."""

import copy
import math
import random

import pytest
import torch
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.reducers import MeanReducer

import config
from config import ConfigError, load_config
from miners import random_triplets
from objective import LOSSES, MINERS, MetricLearningObjective, check_objective_params

CONFIG_VALUES = {"train.margin": 0.1, "train.contrastive_pos_margin": 0.0, "train.contrastive_neg_margin": 0.5}


def objective(loss="triplet", miner="all", margin=0.1, **kwargs):
    values = {**CONFIG_VALUES, "train.margin": margin}
    return MetricLearningObjective(loss, miner, config_values=values, **kwargs)


def on_circle(angles):
    """Unit vectors at these angles (radians): chord distance 2 sin(|a - b| / 2) grows with the angle gap
    (below pi), so a hand-worked order on a line carries over."""
    angles = torch.tensor(angles, dtype=torch.float32)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def random_unit_batch(seed, size=12, dim=4, classes=3):
    generator = torch.Generator().manual_seed(seed)
    points = torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
    return points, torch.randint(classes, (size,), generator=generator)


def reference_triplets(labels):
    n = len(labels)
    return [(a, p, q) for a in range(n) for p in range(n) for q in range(n)
            if p != a and labels[p] == labels[a] and labels[q] != labels[a]]


def reference_triplet_loss(points, triplets, margin):
    """Mean over the active triplets of relu(d(a, p) - d(a, n) + margin): the loss before PML, unchanged."""
    d = torch.cdist(points.double(), points.double())
    losses = [max(0.0, (d[a, p] - d[a, q]).item() + margin) for a, p, q in triplets]
    active = [loss for loss in losses if loss > 0]
    return sum(active) / len(active) if active else 0.0


def test_config_choices_are_the_registries():
    assert set(config.CHOICES["train.loss"]) == set(LOSSES)
    assert set(config.CHOICES["train.miner"]) == set(MINERS)

# ---------------------------------------------------------------------------------------------------
# Named miners mean what docs/training.md says


def test_batchhard_picks_the_farthest_positive_and_nearest_negative():
    #   index:   0  1  2  3  4  5      label A A A B B B, angle x / 5
    #   x:       0  1  5  2  7  8      (hand-worked on the line, as before PML)
    points = on_circle([x / 5 for x in (0, 1, 5, 2, 7, 8)])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    mined = MINERS["batchhard"].pml_class()(points, labels)
    expected = [(0, 2, 3), (1, 2, 3), (2, 0, 4), (3, 5, 1), (4, 3, 2), (5, 3, 2)]
    assert list(zip(*(t.tolist() for t in mined))) == expected


@pytest.mark.parametrize("seed", range(4))
def test_semihard_is_the_band_between_the_positive_and_the_positive_plus_margin(seed):
    points, labels = random_unit_batch(seed)
    margin = 0.3
    spec = MINERS["semihard"]
    mined = spec.pml_class(margin=margin, **spec.fixed_params)(points, labels)
    d = torch.cdist(points.double(), points.double())
    # PML keeps 0 < d(a,n) - d(a,p) <= margin; the upper end is measure-zero on real data.
    expected = sorted((a, p, q) for a, p, q in reference_triplets(labels.tolist())
                      if 1e-6 < (d[a, q] - d[a, p]).item() <= margin - 1e-6)
    assert set(expected) <= set(zip(*(t.tolist() for t in mined)))


@pytest.mark.parametrize("miner", ["all", "batchhard"])
@pytest.mark.parametrize("seed", range(3))
def test_triplet_loss_is_the_mean_over_active_triplets_as_before(seed, miner):
    points, labels = random_unit_batch(seed)
    loss, stats = objective("triplet", miner, margin=0.2)(points, labels)
    if miner == "all":
        triplets = reference_triplets(labels.tolist())
    else:
        mined = MINERS["batchhard"].pml_class()(points, labels)
        triplets = list(zip(*(t.tolist() for t in mined)))
    assert loss.item() == pytest.approx(reference_triplet_loss(points, triplets, 0.2), abs=1e-5)
    assert stats["tuples"].item() == stats["loss_terms"].item() == len(triplets)


def test_contrastive_over_all_pairs_matches_the_loop():
    points, labels = random_unit_batch(5)
    loss, _ = objective("contrastive", "all")(points, labels)
    d = torch.cdist(points.double(), points.double())
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(len(labels), dtype=torch.bool)
    positive = torch.relu(d[same & off] - 0.0)
    negative = torch.relu(0.5 - d[~same])
    expected = positive[positive > 0].mean() + (negative[negative > 0].mean() if (negative > 0).any() else 0)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)

# ---------------------------------------------------------------------------------------------------
# Our random miner (PML has none that draws one positive and one negative per anchor)


def test_random_triplets_are_valid_one_per_eligible_anchor_and_repeat_with_the_seed():
    points, labels = random_unit_batch(3, classes=3)
    labels[-1] = 7  # a class of one: no anchor
    eligible = sorted({a for a, _, _ in reference_triplets(labels.tolist())})
    draws = []
    for seed in (0, 0, 1):
        mined = random_triplets(points, labels, torch.Generator().manual_seed(seed))
        triplets = list(zip(*(t.tolist() for t in mined)))
        assert [a for a, _, _ in triplets] == eligible
        assert all(p != a and labels[p] == labels[a] and labels[q] != labels[a] for a, p, q in triplets)
        draws.append(triplets)
    assert draws[0] == draws[1] != draws[2]


def test_random_triplets_reach_every_positive_and_negative():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    generator = torch.Generator().manual_seed(0)
    seen_positives, seen_negatives = set(), set()
    for _ in range(100):
        anchors, positives, negatives = random_triplets(torch.zeros(7, 2), labels, generator)
        seen_positives.add(positives[0].item())
        seen_negatives.add(negatives[0].item())
    assert seen_positives == {1, 2} and seen_negatives == {3, 4, 5, 6}


@pytest.mark.parametrize("size", [0, 1, 4])
def test_random_triplets_of_a_single_class_are_empty(size):
    triplets = random_triplets(torch.zeros(size, 3), torch.zeros(size, dtype=torch.int64), torch.Generator())
    assert [len(t) for t in triplets] == [0, 0, 0] and all(t.dtype == torch.int64 for t in triplets)

# ---------------------------------------------------------------------------------------------------
# data.repeat_positives=skip


@pytest.mark.parametrize("loss, miner", [("triplet", "all"), ("triplet", "batchhard"), ("contrastive", "all"),
                                         ("multi_similarity", "multi_similarity"), ("supcon", "none")])
def test_skip_repeats_drops_exactly_the_pairs_of_an_image_with_its_repeat(loss, miner, monkeypatch):
    points, labels = random_unit_batch(1, size=8, classes=2)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    sources = torch.tensor([10, 10, 11, 12, 20, 21, 22, 22])  # rows 0/1 and 6/7 show the same file
    seen = []
    target = objective(loss, miner, skip_repeats=True)
    real_loss = target.loss.forward
    monkeypatch.setattr(target.loss, "forward", lambda e, l, t: seen.append(t) or real_loss(e, l, t))
    target(points, labels, sources)
    anchors, positives = seen[0][0], seen[0][1]
    pairs = set(zip(anchors.tolist(), positives.tolist()))
    assert not pairs & {(0, 1), (1, 0), (6, 7), (7, 6)}
    if miner in ("all", "none"):  # every other positive pair is still there
        same = [(a, p) for a in range(8) for p in range(8) if a != p and labels[a] == labels[p]]
        assert pairs == set(same) - {(0, 1), (1, 0), (6, 7), (7, 6)}
        allowed = objective(loss, miner)(points, labels, sources)[0]
        assert allowed.item() != pytest.approx(target(points, labels, sources)[0].item())

# ---------------------------------------------------------------------------------------------------
# Proxy losses: classes mapped to 0..C-1, parameters saved and restored

PROXY_LOSSES = [name for name, spec in LOSSES.items() if spec.takes == "proxies"]


@pytest.mark.parametrize("loss", PROXY_LOSSES)
def test_proxy_losses_map_class_ids_and_round_trip_their_parameters(loss):
    points, _ = random_unit_batch(0, size=6, dim=8)
    labels = torch.tensor([5, 5, 900, 900, 31, 31])  # SOP-style ids, far beyond the number of classes
    torch.manual_seed(0)
    first = objective(loss, "none", class_ids=[900, 5, 31, 77], embedding_dim=8)
    assert sum(p.numel() for p in first.parameters()) >= 4 * 8
    value, _ = first(points, labels)
    torch.manual_seed(1)  # other initial proxies...
    second = objective(loss, "none", class_ids=[900, 5, 31, 77], embedding_dim=8)
    assert second(points, labels)[0].item() != pytest.approx(value.item())
    second.load_state_dict(copy.deepcopy(first.state_dict()))  # ...replaced by the saved ones
    assert second(points, labels)[0].item() == pytest.approx(value.item(), abs=1e-6)
    with pytest.raises(RuntimeError):  # proxies of another number of classes are refused
        objective(loss, "none", class_ids=[1, 2], embedding_dim=8).load_state_dict(first.state_dict())

# ---------------------------------------------------------------------------------------------------
# A few steps on tiny data lower the loss


def few_steps(loss, miner, steps=8, measure_with=None):
    """(loss before, loss after) `steps` Adam steps of a linear embedder on fixed random features, measured by
    the objective itself or by `measure_with(embeddings, labels) -> loss`."""
    torch.manual_seed(0)
    features = torch.randn(16, 12)
    labels = torch.arange(16) // 4
    model = torch.nn.Linear(12, 8)
    target = objective(loss, miner, margin=0.2, class_ids=range(4), embedding_dim=8)
    optimizer = torch.optim.Adam([*model.parameters(), *target.parameters()], lr=0.05)

    def embed():
        return torch.nn.functional.normalize(model(features), dim=1)

    state = target.generator.get_state()
    measure = measure_with or (lambda embeddings, labels: target(embeddings, labels)[0])
    before = measure(embed(), labels).item()
    for _ in range(steps):
        optimizer.zero_grad()
        target(embed(), labels)[0].backward()
        optimizer.step()
    target.generator.set_state(state)  # the random miner: the same draws as for `before`
    return before, measure(embed(), labels).item()


@pytest.mark.parametrize("loss", list(LOSSES))
def test_a_few_steps_of_each_loss_lower_it(loss):
    before, after = few_steps(loss, "none")
    assert after < before


@pytest.mark.parametrize("miner", list(MINERS))
def test_a_few_steps_with_each_miner_lower_the_triplet_loss_over_all_triplets(miner):
    # Averaged over all triplets, not over the active ones: that mean rises as easy triplets drop out.
    all_triplets_mean = TripletMarginLoss(margin=0.2, reducer=MeanReducer())
    before, after = few_steps("triplet", miner, measure_with=all_triplets_mean)
    assert after < before

# ---------------------------------------------------------------------------------------------------
# train.loss_params / train.miner_params


def train_section(*overrides):
    return load_config(None, list(overrides)).train


def test_loss_params_are_checked_against_the_loss_and_typed():
    loss_params, miner_params = check_objective_params(train_section(
        "train.loss=multi_similarity", "train.loss_params={alpha: 2, beta: 40}", "train.loss_params.base=1e-1",
        "train.miner=multi_similarity", "train.miner_params.epsilon=0.2"))
    assert loss_params == {"alpha": 2, "beta": 40, "base": 0.1} and miner_params == {"epsilon": 0.2}
    made = MetricLearningObjective("multi_similarity", "multi_similarity", loss_params, miner_params)
    assert (made.loss.alpha, made.loss.beta, made.loss.base, made.miner.epsilon) == (2, 40, 0.1, 0.2)


@pytest.mark.parametrize("overrides, named", [
    (["train.loss=multi_similarity", "train.loss_params.alpah=2"], ["'train.loss_params.alpah'", "alpha, base, beta"]),
    (["train.loss=triplet", "train.loss_params.margin=0.3"], ["train.margin"]),
    (["train.miner=batchhard", "train.miner_params.epsilon=0.1"], ["valid: none"]),
    (["train.loss=proxy_anchor", "train.loss_params.alpha=many"], ["train.loss_params.alpha", "many"]),
])
def test_a_wrong_parameter_is_a_one_line_error_naming_it(overrides, named):
    with pytest.raises(ConfigError) as error:
        check_objective_params(train_section(*overrides))
    assert "\n" not in str(error.value) and all(text in str(error.value) for text in named)


def test_an_unknown_loss_parameter_stops_train_before_any_data_is_read(tmp_path, capsys):
    import main

    code = main.main(["--mode", "train", "train.loss=circle", "train.loss_params.gama=80",
                      f"data.root={tmp_path / 'absent'}", f"output.dir={tmp_path / 'run'}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0
    assert "gama" in error and "gamma, m" in error and "data.root" not in error
    assert not (tmp_path / "run").exists()


def test_a_proxy_loss_with_the_miner_left_unset_gets_no_miner():
    from objective import resolve_objective_config

    assert resolve_objective_config(load_config(None, ["train.loss=proxy_anchor"])).train.miner == "none"
    explicit = load_config(None, ["train.loss=proxy_anchor", "train.miner=batchhard"])
    assert resolve_objective_config(explicit).train.miner == "batchhard"
    assert resolve_objective_config(load_config(None, [])).train.miner == "batchhard"
