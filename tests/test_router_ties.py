"""The router-tie rule of the bf16 MoE GPU parity tests (``router_ties.flips``): which differing top-k sets count,
their gap in transformers' logits, and which a lower layer's flip explains."""
import torch

from router_ties import ROUTER_NOISE, closest_boundary, flips


def routes(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows)


def test_equal_routing_has_no_flip():
    a = routes([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    assert flips([a, a], [a.clone(), a.clone()], top_k=2) == ([], 0.0)


def test_a_flip_carries_transformers_gap_and_a_lower_layer_explains_later_positions_only():
    theirs0 = routes([[3.0, 2.0, 1.99, 0.0], [3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    ours0 = routes([[3.0, 1.99, 2.0, 0.0], [3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])  # position 0: 2 for 1
    theirs1 = routes([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    ours1 = routes([[3.0, 0.0, 1.0, 2.0], [3.0, 2.0, 1.0, 0.0], [0.0, 2.0, 1.0, 3.0]])  # positions 0 and 2: 3 for 1
    found, noise = flips([ours0, ours1], [theirs0, theirs1], top_k=2)
    assert [(f["layer"], f["position"], f["explained"]) for f in found] == [(0, 0, False), (1, 0, True),
                                                                            (1, 2, True)]
    assert abs(found[0]["gap"] - 0.01) < 1e-5
    assert found[1]["gap"] == 2.0 and found[1]["ours"] == [0, 3] and found[1]["theirs"] == [0, 1]
    # the noise: layer 0 everywhere (0.01), layer 1 nowhere (its every position follows layer 0's flip at 0)
    assert abs(noise - 0.01) < 1e-5 < ROUTER_NOISE


def test_a_flip_before_the_lower_layers_first_is_unexplained():
    same = routes([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    ours0 = routes([[3.0, 2.0, 1.0], [3.0, 1.0, 2.0]])  # layer 0 flips at position 1
    ours1 = routes([[3.0, 1.0, 2.0], [3.0, 2.0, 1.0]])  # layer 1 at position 0: before it, so not explained
    found, noise = flips([ours0, ours1], [same, same.clone()], top_k=2)
    assert [(f["layer"], f["position"], f["explained"]) for f in found] == [(0, 1, False), (1, 0, False)]
    assert all(f["gap"] == 1.0 for f in found) and noise == 1.0 > ROUTER_NOISE  # a planted bug's size


def test_closest_boundary_reads_only_the_generated_positions():
    theirs = [routes([[3.0, 2.0, 2.0], [3.0, 2.5, 1.0], [3.0, 2.0, 1.75]])]
    assert closest_boundary(theirs, top_k=2, start=1) == 0.25
    assert closest_boundary(theirs, top_k=2, start=0) == 0.0
    assert closest_boundary(theirs, top_k=2, start=3) == float("inf")
