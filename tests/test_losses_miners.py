"""Miners and losses against brute-force loops over Python lists, on small hand-placed embeddings."""

import math
import random

import pytest
import torch

from losses import contrastive_loss, pairwise_distances, triplet_margin_loss
from miners import (MINERS, all_triplets, batch_hard_triplets, random_triplets, semihard_triplets,
                    triplets_to_pairs)

# ---------------------------------------------------------------------------------------------------
# Brute-force references: plain Python, float64 distances, one loop per index.


def reference_distances(points):
    return [[math.dist(p, q) for q in points] for p in points]


def reference_all_triplets(labels):
    n = len(labels)
    return [(a, p, q) for a in range(n) for p in range(n) for q in range(n)
            if p != a and labels[p] == labels[a] and labels[q] != labels[a]]


def reference_semihard_triplets(points, labels, margin):
    d = reference_distances(points)
    return [(a, p, q) for a, p, q in reference_all_triplets(labels) if d[a][p] < d[a][q] < d[a][p] + margin]


def reference_batch_hard_triplets(points, labels):
    d = reference_distances(points)
    triplets = []
    for a in range(len(labels)):
        positives = [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        negatives = [q for q in range(len(labels)) if labels[q] != labels[a]]
        if not positives or not negatives:
            continue
        hardest_positive = min(positives, key=lambda p: (-d[a][p], p))  # farthest, then smallest index
        hardest_negative = min(negatives, key=lambda q: (d[a][q], q))  # nearest, then smallest index
        triplets.append((a, hardest_positive, hardest_negative))
    return triplets


def as_list(triplets):
    for indices in triplets:
        assert indices.dtype == torch.int64
    return list(zip(*(indices.tolist() for indices in triplets)))


def mine(miner, points, labels, margin=1.0, generator=None):
    return as_list(miner(torch.tensor(points, dtype=torch.float32), torch.tensor(labels), margin, generator))


def random_integer_batch(seed, size=9, classes=3):
    """2-D points on a small integer grid: distances are exact in float32 and ties are frequent."""
    rng = random.Random(seed)
    points = [[float(rng.randint(-3, 3)), float(rng.randint(-3, 3))] for _ in range(size)]
    return points, [rng.randrange(classes) for _ in range(size)]


def random_unit_batch(seed, size=10, dim=4, classes=3):
    generator = torch.Generator().manual_seed(seed)
    points = torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
    labels = torch.randint(classes, (size,), generator=generator)
    return points.tolist(), labels.tolist()


# 1-D points on a line, answers worked out by hand below.
#   index:   0  1  2  3  4  5
#   label:   A  A  A  B  B  B
#   x:       0  1  5  2  7  8
LINE_POINTS = [[0.0], [1.0], [5.0], [2.0], [7.0], [8.0]]
LINE_LABELS = [0, 0, 0, 1, 1, 1]

# ---------------------------------------------------------------------------------------------------
# pairwise_distances


def test_pairwise_distances_match_math_dist():
    points, _ = random_unit_batch(0)
    distances = pairwise_distances(torch.tensor(points))
    assert distances.dtype == torch.float32
    assert torch.allclose(distances, torch.tensor(reference_distances(points)), atol=1e-5)
    assert torch.equal(distances.diagonal(), torch.zeros(len(points)))


def test_pairwise_distances_of_duplicate_rows_are_zero_with_finite_gradient():
    embeddings = torch.tensor([[0.6, 0.8], [0.6, 0.8], [1.0, 0.0]], requires_grad=True)
    distances = pairwise_distances(embeddings)
    assert distances[0, 1] == 0 and distances[1, 0] == 0
    distances.sum().backward()
    assert torch.isfinite(embeddings.grad).all()


def test_pairwise_distances_cast_low_precision_up_to_float32():
    points, _ = random_unit_batch(1)
    embeddings = torch.tensor(points)
    assert pairwise_distances(embeddings.bfloat16()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = pairwise_distances(embeddings)
    assert under_autocast.dtype == torch.float32
    assert torch.allclose(under_autocast, pairwise_distances(embeddings), atol=1e-6)


def test_pairwise_distances_of_an_empty_batch():
    assert pairwise_distances(torch.empty(0, 4)).shape == (0, 0)

# ---------------------------------------------------------------------------------------------------
# Miners: hand-worked answers


def test_all_triplets_obvious_case():
    # Anchor 2 is the only B: it has no positive, so it anchors nothing.
    assert mine(all_triplets, [[0.0], [1.0], [3.0]], [0, 0, 1]) == [(0, 1, 2), (1, 0, 2)]


def test_batch_hard_on_a_line():
    # a=0 (x=0): positives 1 (d=1), 2 (d=5) -> 2;  negatives 3 (d=2), 4 (7), 5 (8) -> 3
    # a=1 (x=1): positives 0 (1), 2 (4) -> 2;      negatives 3 (1), 4 (6), 5 (7) -> 3
    # a=2 (x=5): positives 0 (5), 1 (4) -> 0;      negatives 3 (3), 4 (2), 5 (3) -> 4
    # a=3 (x=2): positives 4 (5), 5 (6) -> 5;      negatives 0 (2), 1 (1), 2 (3) -> 1
    # a=4 (x=7): positives 3 (5), 5 (1) -> 3;      negatives 0 (7), 1 (6), 2 (2) -> 2
    # a=5 (x=8): positives 3 (6), 4 (1) -> 3;      negatives 0 (8), 1 (7), 2 (3) -> 2
    expected = [(0, 2, 3), (1, 2, 3), (2, 0, 4), (3, 5, 1), (4, 3, 2), (5, 3, 2)]
    assert mine(batch_hard_triplets, LINE_POINTS, LINE_LABELS) == expected


def test_semihard_on_a_line_excludes_both_boundaries():
    # margin 2, keep d(a,p) < d(a,n) < d(a,p) + 2:
    # a=0, p=1 (d=1): n=3 (d=2) is inside (1, 3).       a=0, p=2 (d=5): n=4 at d=7 sits on the boundary.
    # a=4, p=3 (d=5): n=1 (d=6) inside (5, 7), n=0 at 7 on the boundary.   a=4, p=5 (d=1): n=2 (d=2).
    # a=5, p=3 (d=6): n=1 (d=7) inside (6, 8), n=0 at 8 on the boundary.   a=5, p=4 (d=1): n=2 at d=3 on it.
    # Every other anchor's negatives are nearer than its positives or beyond the margin.
    expected = [(0, 1, 3), (4, 3, 1), (4, 5, 2), (5, 3, 1)]
    assert mine(semihard_triplets, LINE_POINTS, LINE_LABELS, margin=2.0) == expected


def test_batch_hard_ties_and_duplicates_go_to_the_smallest_index():
    #   index:  0  1  2   3  4   5
    #   label:  A  A  A   B  B   B
    #   x:      0  2  -2  1  1  -1      (3 and 4 are identical rows)
    # a=0: positives 1, 2 both at 2 -> 1; negatives 3, 4, 5 all at 1 -> 3
    # a=3: positive 4 is a duplicate (d=0), 5 at 2 -> 5; negatives 0 (1), 1 (1), 2 (3) -> 0
    # a=4: the same as a=3 -> (4, 5, 0);  a=5: positives 3, 4 both at 2 -> 3; negatives 0 (1), 2 (1) -> 0
    points = [[0.0], [2.0], [-2.0], [1.0], [1.0], [-1.0]]
    labels = [0, 0, 0, 1, 1, 1]
    expected = [(0, 1, 3), (1, 2, 3), (2, 1, 5), (3, 5, 0), (4, 5, 0), (5, 3, 0)]
    assert mine(batch_hard_triplets, points, labels) == expected
    assert expected == reference_batch_hard_triplets(points, labels)


def test_batch_hard_when_every_positive_duplicates_the_anchor():
    # All positives at distance 0 tie: the smallest index wins. Anchor 3 has no positive.
    points = [[5.0], [5.0], [5.0], [0.0]]
    assert mine(batch_hard_triplets, points, [0, 0, 0, 1]) == [(0, 1, 3), (1, 0, 3), (2, 0, 3)]


@pytest.mark.parametrize("miner", [all_triplets, semihard_triplets, batch_hard_triplets, random_triplets])
def test_anchors_without_positives_are_skipped(miner):
    # Labels 1 and 2 each appear once: only anchors 0 and 1 can form triplets.
    points = [[0.0], [1.0], [0.5], [3.0]]
    triplets = mine(miner, points, [0, 0, 1, 2], margin=10.0, generator=torch.Generator().manual_seed(0))
    assert triplets and {a for a, _, _ in triplets} <= {0, 1}


@pytest.mark.parametrize("miner", list(MINERS.values()))
@pytest.mark.parametrize("size", [0, 1, 4])
def test_a_single_class_gives_empty_triplets_and_a_zero_loss_that_backpropagates(miner, size):
    embeddings = torch.randn(size, 3, requires_grad=True)
    triplets = miner(embeddings.detach(), torch.zeros(size, dtype=torch.int64), 0.5, torch.Generator())
    assert [len(indices) for indices in triplets] == [0, 0, 0]
    assert all(indices.dtype == torch.int64 for indices in triplets)
    loss = triplet_margin_loss(embeddings, triplets, 0.5)
    loss = loss + contrastive_loss(embeddings, *triplets_to_pairs(triplets), 0.0, 1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def test_miners_table():
    assert MINERS == {"all": all_triplets, "semihard": semihard_triplets,
                      "batchhard": batch_hard_triplets, "random": random_triplets}

# ---------------------------------------------------------------------------------------------------
# Miners: random batches against the brute-force loops

SEEDS = range(6)


@pytest.mark.parametrize("make_batch", [random_integer_batch, random_unit_batch])
@pytest.mark.parametrize("seed", SEEDS)
def test_all_triplets_match_the_loop(make_batch, seed):
    points, labels = make_batch(seed)
    assert mine(all_triplets, points, labels) == reference_all_triplets(labels)


@pytest.mark.parametrize("margin", [0.5, 1.0])
@pytest.mark.parametrize("make_batch", [random_integer_batch, random_unit_batch])
@pytest.mark.parametrize("seed", SEEDS)
def test_semihard_triplets_match_the_loop(make_batch, seed, margin):
    points, labels = make_batch(seed)
    expected = reference_semihard_triplets(points, labels, margin)
    assert mine(semihard_triplets, points, labels, margin) == expected


@pytest.mark.parametrize("make_batch", [random_integer_batch, random_unit_batch])
@pytest.mark.parametrize("seed", SEEDS)
def test_batch_hard_triplets_match_the_loop(make_batch, seed):
    points, labels = make_batch(seed)
    assert mine(batch_hard_triplets, points, labels) == reference_batch_hard_triplets(points, labels)


def test_integer_batches_contain_ties_so_the_tie_break_is_exercised():
    # Guards the test above: without ties among candidates it would not test tie-breaking at all.
    points, labels = random_integer_batch(0)
    d = reference_distances(points)
    negative_distances = [[d[a][q] for q in range(len(labels)) if labels[q] != labels[a]]
                          for a in range(len(labels))]
    assert any(len(row) != len(set(row)) for row in negative_distances)


@pytest.mark.parametrize("seed", SEEDS)
def test_triplets_to_pairs_match_the_loop(seed):
    points, labels = random_unit_batch(seed)
    triplets = semihard_triplets(torch.tensor(points), torch.tensor(labels), 1.0)
    (pos_i, pos_j), (neg_i, neg_j) = triplets_to_pairs(triplets)
    listed = as_list(triplets)
    assert list(zip(pos_i.tolist(), pos_j.tolist())) == sorted({(a, p) for a, p, _ in listed})
    assert list(zip(neg_i.tolist(), neg_j.tolist())) == sorted({(a, q) for a, _, q in listed})

# ---------------------------------------------------------------------------------------------------
# random_triplets


def test_random_triplets_are_valid_one_per_eligible_anchor():
    points, labels = random_integer_batch(3, size=12)
    for seed in range(5):
        triplets = mine(random_triplets, points, labels, generator=torch.Generator().manual_seed(seed))
        eligible = sorted({a for a, _, _ in reference_all_triplets(labels)})
        assert [a for a, _, _ in triplets] == eligible
        for a, p, q in triplets:
            assert p != a and labels[p] == labels[a] and labels[q] != labels[a]


def test_random_triplets_repeat_with_the_seed_and_differ_across_seeds():
    points, labels = random_unit_batch(0, size=12, classes=2)  # several positives and negatives each

    def draw(seed):
        return mine(random_triplets, points, labels, generator=torch.Generator().manual_seed(seed))

    assert draw(7) == draw(7)
    assert len({tuple(draw(seed)) for seed in range(4)}) == 4


def test_random_triplets_reach_every_positive_and_negative():
    # A miner that always took the first candidate would pass the validity test; this one would not.
    labels = [0, 0, 0, 1, 1, 1, 1]
    generator = torch.Generator().manual_seed(0)
    seen_positives, seen_negatives = set(), set()
    for _ in range(100):
        for a, p, q in mine(random_triplets, [[0.0]] * len(labels), labels, generator=generator):
            if a == 0:
                seen_positives.add(p)
                seen_negatives.add(q)
    assert seen_positives == {1, 2} and seen_negatives == {3, 4, 5, 6}

# ---------------------------------------------------------------------------------------------------
# Losses against per-triplet / per-pair loops


def reference_triplet_loss(points, triplets, margin):
    d = reference_distances(points)
    losses = [max(0.0, d[a][p] - d[a][q] + margin) for a, p, q in triplets]
    active = [loss for loss in losses if loss > 0]
    return sum(active) / len(active) if active else 0.0


def reference_contrastive_loss(points, positive_pairs, negative_pairs, positive_margin, negative_margin):
    d = reference_distances(points)
    positive = [max(0.0, d[i][j] - positive_margin) for i, j in positive_pairs]
    negative = [max(0.0, negative_margin - d[i][j]) for i, j in negative_pairs]
    positive, negative = [x for x in positive if x > 0], [x for x in negative if x > 0]
    return ((sum(positive) / len(positive) if positive else 0.0)
            + (sum(negative) / len(negative) if negative else 0.0))


def as_index_tensors(tuples):
    return tuple(torch.tensor(column, dtype=torch.int64) for column in zip(*tuples))


def test_triplet_loss_obvious_case_averages_only_active_triplets():
    # x = 0, 1, 3 with labels A, A, B. Triplet (0, 1, 2): 1 - 3 + 1.5 < 0, inactive.
    # Triplet (1, 0, 2): 1 - 2 + 1.5 = 0.5. The mean is over the one active triplet: 0.5, not 0.25.
    embeddings = torch.tensor([[0.0], [1.0], [3.0]])
    triplets = as_index_tensors([(0, 1, 2), (1, 0, 2)])
    assert triplet_margin_loss(embeddings, triplets, 1.5).item() == pytest.approx(0.5)
    assert triplet_margin_loss(embeddings, triplets, 2.5).item() == pytest.approx((0.5 + 1.5) / 2)


@pytest.mark.parametrize("margin", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("seed", SEEDS)
def test_triplet_loss_matches_the_loop(seed, margin):
    points, labels = random_unit_batch(seed)
    triplets = all_triplets(torch.tensor(points), torch.tensor(labels), margin)
    loss = triplet_margin_loss(torch.tensor(points), triplets, margin)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_triplet_loss(points, as_list(triplets), margin), abs=1e-5)


def test_triplet_loss_with_no_active_triplet_is_a_connected_zero():
    embeddings = torch.tensor([[0.0], [1.0], [10.0]], requires_grad=True)
    loss = triplet_margin_loss(embeddings, as_index_tensors([(0, 1, 2)]), 0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def test_contrastive_loss_obvious_case():
    # x = 0, 1, 3. Positive (0, 1): d = 1, margin 0.25 -> 0.75. Positive (1, 0): the same, 0.75.
    # Negatives (0, 2): d = 3, margin 2 -> inactive; (1, 2): d = 2 -> 0 (inactive); so 0.75 + 0.
    embeddings = torch.tensor([[0.0], [1.0], [3.0]])
    positives = as_index_tensors([(0, 1), (1, 0)])
    negatives = as_index_tensors([(0, 2), (1, 2)])
    assert contrastive_loss(embeddings, positives, negatives, 0.25, 2.0).item() == pytest.approx(0.75)
    # Negative margin 2.5: (0, 2) still inactive, (1, 2) gives 0.5; averaged over its one active pair.
    assert contrastive_loss(embeddings, positives, negatives, 0.25, 2.5).item() == pytest.approx(0.75 + 0.5)


@pytest.mark.parametrize("margins", [(0.0, 1.0), (0.3, 0.8), (0.5, 1.5)])
@pytest.mark.parametrize("seed", SEEDS)
def test_contrastive_loss_matches_the_loop(seed, margins):
    points, labels = random_unit_batch(seed)
    positive_pairs, negative_pairs = triplets_to_pairs(all_triplets(torch.tensor(points), torch.tensor(labels), 0))
    loss = contrastive_loss(torch.tensor(points), positive_pairs, negative_pairs, *margins)
    expected = reference_contrastive_loss(points, as_list(positive_pairs), as_list(negative_pairs), *margins)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_gradients_are_finite_with_duplicate_rows():
    # Rows 0 and 1 are identical with the same label, rows 2 and 3 identical with different labels:
    # both losses then see distance-0 positive and negative pairs.
    embeddings = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [3.0, 0.0, 1.0]]), dim=1)
    embeddings.requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 2, 2])
    triplets = all_triplets(embeddings.detach(), labels, 0.5)
    loss = triplet_margin_loss(embeddings, triplets, 0.5)
    loss = loss + contrastive_loss(embeddings, *triplets_to_pairs(triplets), 0.1, 0.9)
    loss.backward()
    assert loss.item() > 0
    assert torch.isfinite(embeddings.grad).all() and embeddings.grad.abs().sum() > 0


def test_bf16_embeddings_give_a_float32_loss_close_to_the_float32_one():
    points, labels = random_unit_batch(2, size=16, dim=8)
    embeddings = torch.tensor(points)
    triplets = all_triplets(embeddings, torch.tensor(labels), 0.5)
    full = triplet_margin_loss(embeddings, triplets, 0.5)
    low = triplet_margin_loss(embeddings.bfloat16(), triplets, 0.5)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(full.item(), abs=2e-2)
    pairs = triplets_to_pairs(triplets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = contrastive_loss(embeddings, *pairs, 0.2, 1.0)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(contrastive_loss(embeddings, *pairs, 0.2, 1.0).item(), abs=1e-5)
