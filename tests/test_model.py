"""model.py by hand: the plain order and cosine scores, the contrastive loss, the encoders
(kernels.py's fast paths are held to these in test_speed.py)."""
import torch
import pytest

from conftest import make_model, train_on
from model import contrastive_loss, cosine_scores, order_scores


def test_order_scores_by_hand():
    images = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    captions = torch.tensor([[0.2, 0.3], [0.6, 0.1], [0.3, 0.95]])
    expected = torch.tensor([
        [0.0, -(0.1 ** 2), -(0.45 ** 2)],                 # image 0 dominates caption 0 in both dims
        [-(0.1 ** 2), -(0.5 ** 2), -(0.2 ** 2 + 0.05 ** 2)],
    ])
    torch.testing.assert_close(order_scores(images, captions), expected)


def test_contrastive_loss_by_hand_sum_and_max():
    scores = torch.tensor([[0.9, 0.8, 0.1],
                           [0.5, 0.4, 0.7],
                           [0.2, 0.6, 0.3]])
    m = 0.2
    # rows: an image against the other captions; columns: a caption against the other images
    rows = [[max(0, m + 0.8 - 0.9), max(0, m + 0.1 - 0.9)],
            [max(0, m + 0.5 - 0.4), max(0, m + 0.7 - 0.4)],
            [max(0, m + 0.2 - 0.3), max(0, m + 0.6 - 0.3)]]
    cols = [[max(0, m + 0.5 - 0.9), max(0, m + 0.2 - 0.9)],
            [max(0, m + 0.8 - 0.4), max(0, m + 0.6 - 0.4)],
            [max(0, m + 0.1 - 0.3), max(0, m + 0.7 - 0.3)]]
    total = sum(map(sum, rows)) + sum(map(sum, cols))
    hardest = sum(map(max, rows)) + sum(map(max, cols))
    assert contrastive_loss(scores, m).item() == pytest.approx(total, abs=1e-6)
    assert contrastive_loss(scores, m, max_violation=True).item() == pytest.approx(hardest, abs=1e-6)
    assert total == pytest.approx(3.1)
    assert hardest == pytest.approx(2.3)


def test_contrastive_loss_on_order_and_cosine_scores_by_hand():
    images = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    captions = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    m = 0.05
    # cosine: [[1, .8], [.6, 0]]; order: [[0, -(.2^2)], [-(.8^2), -1]]
    cos = cosine_scores(images, captions)
    torch.testing.assert_close(cos, torch.tensor([[1.0, 0.8], [0.6, 0.0]]))
    expected_cos = max(0, m + .8 - 1) + max(0, m + .6 - 0) + max(0, m + .6 - 1) + max(0, m + .8 - 0)
    assert contrastive_loss(cos, m).item() == pytest.approx(expected_cos)
    order = order_scores(images, captions)
    torch.testing.assert_close(order, torch.tensor([[0.0, -0.04], [-0.64, -1.0]]))
    expected_order = max(0, m - .04 - 0) + max(0, m - .64 + 1) + max(0, m - .64 - 0) + max(0, m - .04 + 1)
    assert contrastive_loss(order, m).item() == pytest.approx(expected_order)


def test_encoders_batch_equals_one_at_a_time():
    torch.manual_seed(0)
    model = make_model(feature_dim=16, vocab_size=30, word_dim=8, embed_dim=12, measure='order').eval()
    lengths = torch.tensor([3, 7, 1, 5])
    tokens = torch.zeros(4, 7, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, :n] = torch.randint(2, 30, (int(n),))
    batch = model.encode_captions(tokens, lengths)
    for row, n in enumerate(lengths):
        _, h = model.gru(model.word_embed(tokens[row:row + 1, :n]))
        single = torch.nn.functional.normalize(h[0], dim=1).abs()
        torch.testing.assert_close(batch[row:row + 1], single, rtol=1e-5, atol=1e-6)
    assert (batch >= 0).all() and torch.allclose(batch.norm(dim=1), torch.ones(4))
    images = model.encode_images(torch.randn(5, 16))
    assert (images >= 0).all() and torch.allclose(images.norm(dim=1), torch.ones(5))
    cosine = make_model(16, 30, 8, 12, measure='cosine')
    assert (cosine.encode_images(torch.randn(50, 16)) < 0).any()  # no abs() for cosine


def test_dropout_acts_in_training_only():
    """word_dropout and image_dropout change the training embeddings (a different draw each
    call), and model.eval() turns them off: then the embeddings are those of a model without."""
    torch.manual_seed(0)
    feats, tokens, lengths = torch.rand(6, 10), torch.randint(1, 20, (6, 5)), torch.tensor([5, 5, 4, 3, 3, 2])
    plain = make_model(10, 20, 8, 12, 'order')
    dropped = make_model(10, 20, 8, 12, 'order', word_dropout=0.3, image_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    for encode in (lambda m: m.encode_images(feats), lambda m: m.encode_captions(tokens, lengths)):
        first, second = encode(dropped), encode(dropped)
        assert not torch.allclose(first, second)
        assert not torch.allclose(first, encode(plain))
        dropped.eval()
        torch.testing.assert_close(encode(dropped), encode(plain))
        dropped.train()


def test_weight_decay_is_decoupled():
    """train.make_optimizer's weight_decay, AdamW's: with no gradient from the loss Adam's step is
    zero, so a step multiplies every weight by 1 - lr * decay (a coupled L2 penalty would move
    each weight by about lr instead); without it, nothing moves."""
    import train
    for decay in (0.0, 0.5):
        torch.manual_seed(0)
        layer = make_model(4, 5, word_dim=2, embed_dim=3)
        before = [p.detach().clone() for p in layer.parameters()]
        optimizer = train.make_optimizer(layer, 1e-2, decay)
        for p in layer.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for p, q in zip(layer.parameters(), before):
            torch.testing.assert_close(p.detach(), q * (1 - 1e-2 * decay), rtol=1e-6, atol=0)
            assert torch.equal(p, q) == (decay == 0 or not q.any())   # a zero bias stays zero


def test_a_zero_dropout_rate_draws_nothing_from_the_rng():
    """At rate 0 (the default) the encoders draw no random numbers: a default run's RNG, which
    last.pt saves, moves as it did before dropout existed."""
    torch.manual_seed(0)
    model = make_model(10, 20, 8, 12, 'order')
    feats, tokens, lengths = torch.rand(6, 10), torch.randint(1, 20, (3, 4)), torch.tensor([4, 3, 2])
    state = torch.get_rng_state()
    model.encode_images(feats), model.encode_captions(tokens, lengths)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize('option', [{'word_dropout': 0.3}, {'image_dropout': 0.5}])
def test_dropout_changes_training(option):
    """A few train.train_step calls from the same start on the same batches: without dropout they
    repeat bit for bit; with either option the weights end elsewhere."""
    import train
    from types import SimpleNamespace
    from conftest import caption_batch
    settings = SimpleNamespace(margin=0.05, grad_clip=2.0, dtype='float32', max_violation=False)

    def trained(**rates):
        torch.manual_seed(0)
        feats, tokens, lengths = caption_batch(n_images=8, n_captions=40, feature_dim=24)
        model = make_model(24, 30, word_dim=8, embed_dim=12, **rates)
        optimizer = train.make_optimizer(model, 1e-2)
        for step in range(4):
            train_on(model, optimizer, feats, tokens, lengths, torch.arange(10 * step, 10 * step + 10), settings)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    off = trained()
    assert torch.equal(off, trained())
    assert not torch.allclose(trained(**option), off)
