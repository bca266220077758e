import numpy as np
import pytest
import torch

from conftest import reference_ranks
from utils import recall_table, retrieval_metrics, retrieval_ranks


def test_perfect_scores_rank_first():
    n = 4
    scores = -torch.ones(n, 5 * n)
    for i in range(n):
        scores[i, 5 * i:5 * i + 5] = 1
    m = retrieval_metrics(scores)
    for d in ('i2t', 't2i'):
        assert m[d] == {'r1': 100.0, 'r5': 100.0, 'r10': 100.0, 'medr': 1.0, 'meanr': 1.0}
    assert m['rsum'] == 600.0


def test_reversed_scores_rank_last():
    n = 20
    scores = torch.ones(n, 5 * n)
    for i in range(n):
        scores[i, 5 * i:5 * i + 5] = -1  # the truth scores worst of all
    i2t, t2i = retrieval_ranks(scores)
    assert (i2t == 5 * n - 5).all()      # behind every other caption
    assert (t2i == n - 1).all()          # behind every other image
    m = retrieval_metrics(scores)
    assert m['t2i']['r10'] == 0.0 and m['t2i']['medr'] == n and m['t2i']['meanr'] == n
    assert m['i2t']['medr'] == 5 * n - 4


def test_ties_count_against_the_truth():
    n = 12
    i2t, t2i = retrieval_ranks(torch.zeros(n, 5 * n))  # a model that says nothing
    assert (i2t == 5 * n - 5).all() and (t2i == n - 1).all()
    assert retrieval_metrics(torch.zeros(n, 5 * n))['rsum'] == 0.0


def test_ranks_match_reference_on_random_scores_with_ties():
    rng = np.random.default_rng(0)
    for n in (1, 3, 17):
        scores = rng.integers(-3, 4, size=(n, 5 * n)).astype(np.float32)  # many ties
        i2t, t2i = retrieval_ranks(torch.from_numpy(scores))
        ref_i2t, ref_t2i = reference_ranks(scores)
        np.testing.assert_array_equal(i2t.numpy(), ref_i2t)
        np.testing.assert_array_equal(t2i.numpy(), ref_t2i)


def test_recall_table_definitions():
    ranks = torch.tensor([0, 0, 1, 4, 5, 9, 10, 30])  # 0-based
    t = recall_table(ranks)
    assert t['r1'] == pytest.approx(25.0) and t['r5'] == pytest.approx(50.0) and t['r10'] == pytest.approx(75.0)
    assert t['medr'] == np.floor(np.median(ranks.numpy())) + 1 == 5.0
    assert t['meanr'] == pytest.approx(ranks.double().mean().item() + 1)


def test_non_finite_scores_are_refused():
    from utils import UserError
    scores = torch.zeros(2, 10)
    scores[0, 3] = float('nan')
    with pytest.raises(UserError):
        retrieval_ranks(scores)
