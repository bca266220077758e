"""Grid vectors and GPO (issue 32): prep.py --grid=True keeps the CNN's last feature map as
(N, K, D) grid vectors; the model maps each and pools them ('mean', or GPO, the Generalized
Pooling Operator of VSE∞), and pools a bidirectional GRU's word states with GPO on request;
train.py's --size_augment drops vectors and words, drawn from (seed, iteration) alone, so that a
stopped and resumed run ends bit for bit where an uninterrupted one does. Every input here is
made by the test itself, and small."""
import json
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import assert_user_error, dataset_from_array, image_dataset, make_model, run_here
from test_reliability import assert_same_run

K, DIM = 6, 16
SPLITS = ['train'] * 40 + ['val'] * 10 + ['test'] * 10
# 13 iterations an epoch: validations and checkpoints every 5, a loss line every 4
TRAIN = ['--dataset=x', '--embed_dim=32', '--word_dim=16', '--batch_size=16', '--epochs=2', '--eval_interval=5',
         '--log_interval=4', '--compile=False']
GPO_RECIPE = ['--pooling=gpo', '--caption_pooling=gpo', '--size_augment=0.3']


def grid_features(seed=0):
    """(60, K, D) raw grid vectors: a direction per image plus a different offset per place."""
    rng = np.random.default_rng(seed)
    return (rng.random((len(SPLITS), 1, DIM)) + rng.random((len(SPLITS), K, DIM))).astype(np.float32)


@pytest.fixture(scope='module')
def grids(tmp_path_factory):
    """A dataset.json, an (N, K, D) array and the dataset prepared from it with --grid=True."""
    root = tmp_path_factory.mktemp('grid')
    proc, data = dataset_from_array(root, SPLITS, 'grid.npy', grid_features(), '--grid=True')
    assert proc.returncode == 0 and f'({K} grid vectors each)' in proc.stdout, proc.stderr
    np.save(root / 'flat.npy', grid_features().mean(1))   # the same images, one vector each
    proc = run_here('prep', '--dataset=x', f'--data_dir={root / "flat"}', f'--dataset_json={root / "dataset.json"}',
                    f'--features={root / "flat.npy"}', '--vocab_threshold=1')
    assert proc.returncode == 0, proc.stderr
    return SimpleNamespace(root=root, data=data, json=root / 'dataset.json', npy=root / 'grid.npy')


def run_train(*args, stop_at=None):
    """train.py's main in this process, optionally stopped as Ctrl-C stops it after `stop_at` iterations."""
    def patch(train):
        if stop_at is not None:
            def agreed(self, iteration, world, dev, every):
                if iteration == stop_at:
                    self.signum = signal.SIGINT
                return self.signum is not None
            train.StopRequests.agreed = agreed
    return run_here('train', *args, patch=patch)


# ----------------------------------------------------------------------------- GPO and the pooling

def test_gpo_weights_depend_only_on_k_and_position_and_sum_to_one():
    from model import GPO
    torch.manual_seed(0)
    gpo = GPO()
    sizes = torch.tensor([5, 3, 8, 1])
    weights = gpo.weights(sizes).detach()
    assert weights.shape == (4, 8)
    torch.testing.assert_close(weights.sum(1), torch.ones(4))
    for row, k in enumerate(sizes.tolist()):
        assert (weights[row, k:] == 0).all() and (weights[row, :k] > 0).all()
        torch.testing.assert_close(weights[row, :k], gpo.weights(torch.tensor([k]))[0].detach())  # whatever else is asked
    # pooling: each dimension's real values sorted in descending order, weighted by position;
    # padding (however large) and the order of the vectors change nothing
    features, lengths = torch.randn(4, 8, 3), torch.tensor([5, 3, 8, 3])
    features[1, 3:] = 1e6
    pooled = gpo(features, lengths).detach()
    for row, k in enumerate(lengths.tolist()):
        ranked = features[row, :k].sort(dim=0, descending=True).values
        want = (ranked * gpo.weights(torch.tensor([k]))[0, :, None]).sum(0).detach()
        torch.testing.assert_close(pooled[row], want)
        shuffled = features[row:row + 1, torch.randperm(k)]
        torch.testing.assert_close(gpo(shuffled, torch.tensor([k]))[0].detach(), want)


@pytest.mark.parametrize('image_dropout', [0.0, 0.5])
def test_mean_and_gpo_of_k_copies_of_a_vector_give_its_embedding(image_dropout):
    """pooling='mean' (and 'gpo', whose weights sum to 1) over K copies of one vector, in eval
    mode: that vector's own embedding; padding beyond an image's length is left out."""
    torch.manual_seed(0)
    vectors = torch.randn(5, DIM)
    for pooling in ('mean', 'gpo'):
        model = make_model(DIM, 30, 8, 12, pooling=pooling, image_dropout=image_dropout).eval()
        own = model.encode_images(vectors)
        copies = vectors[:, None].expand(-1, K, -1).clone()
        torch.testing.assert_close(model.encode_images(copies), own)
        copies[:, 2:] = torch.randn(5, K - 2, DIM)   # padding after 2 real copies
        torch.testing.assert_close(model.encode_images(copies, torch.full((5,), 2)), own)
        assert (model.encode_images(copies) >= 0).all()   # the positive orthant, after pooling


def test_default_model_is_the_one_before_gpo_and_caption_gpo_leaves_out_padding():
    """The defaults add no parameter (checkpoints of before load as they were); caption_pooling
    'gpo' pools each caption's own words: in a batch padded to 7 as alone."""
    names = ['image_fc.weight', 'image_fc.bias', 'word_embed.weight', 'gru.weight_ih_l0', 'gru.weight_hh_l0',
             'gru.bias_ih_l0', 'gru.bias_hh_l0']
    assert list(make_model(DIM, 30, 8, 12).state_dict()) == names
    torch.manual_seed(0)
    model = make_model(DIM, 30, 8, 12, caption_pooling='gpo').eval()
    assert model.gru.bidirectional and model.caption_gpo is not None and model.image_gpo is None
    lengths = torch.tensor([3, 7, 1, 5])
    tokens = torch.zeros(4, 7, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        tokens[row, :n] = torch.randint(2, 30, (n,))
    batch = model.encode_captions(tokens, lengths)
    for row, n in enumerate(lengths.tolist()):
        alone = model.encode_captions(tokens[row:row + 1, :n], lengths[row:row + 1])
        torch.testing.assert_close(batch[row:row + 1], alone, rtol=1e-5, atol=1e-6)
    assert (batch >= 0).all() and torch.allclose(batch.norm(dim=1), torch.ones(4))


# ----------------------------------------------------------------------------- size augmentation

def test_size_augment_draw_is_seeded_keeps_one_and_keeps_order():
    import train
    images = torch.randn(200, 10, 4)
    lengths = torch.randint(1, 9, (200,)).sort(descending=True).values
    tokens = torch.zeros(200, 8, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        tokens[row, :n] = torch.arange(2, 2 + n)   # increasing ids: the kept words' order shows
    def drawn(seed, iteration):
        return train.drop_for_size(images, tokens, lengths, 0.3, iteration, seed)
    first = drawn(1, 7)
    assert all(torch.equal(a, b) for a, b in zip(first, drawn(1, 7)))
    assert not torch.equal(first[1], drawn(2, 7)[1]) and not torch.equal(first[1], drawn(1, 8)[1])
    kept_images, image_lengths, kept_tokens, kept_lengths = first
    assert image_lengths.min() >= 1 and kept_lengths.min() >= 1 and (kept_lengths <= lengths).all()
    assert abs(image_lengths.float().mean().item() / 10 - 0.7) < 0.05   # 2,000 draws: a few sigma
    for row in range(200):
        k, n = int(image_lengths[row]), int(kept_lengths[row])
        where = [int((images[row] == v).all(1).nonzero()) for v in kept_images[row, :k]]
        assert where == sorted(set(where))                     # real vectors, each once, in order
        words = kept_tokens[row, :n]
        assert (words[1:] > words[:-1]).all() and (kept_tokens[row, n:] == 0).all()
    # without size augmentation a batch is as before: every vector, every word
    data = SimpleNamespace(feats=images, tokens=tokens, lengths=lengths, grid=True)
    plain = train.get_batch(data, torch.arange(20), None, 3, 1)
    assert plain[1] is None and torch.equal(plain[0], images[torch.arange(20) // 5])


def test_stopped_and_resumed_gpo_run_draws_the_same(grids, tmp_path):
    """A grid run with GPO on both sides and size augmentation, stopped after iteration 9 (mid
    epoch, between checkpoints) and resumed: the same weights, Adam state, best.pt and log as the
    uninterrupted run; and a run without size augmentation ends elsewhere."""
    args = [*TRAIN, f'--data_dir={grids.data}', *GPO_RECIPE]
    whole = run_train(*args, f'--out_dir={tmp_path / "whole"}')
    assert whole.returncode == 0 and f'({K} grid vectors each, pooled by gpo)' in whole.stdout, whole.stderr
    stopped = run_train(*args, f'--out_dir={tmp_path / "stopped"}', stop_at=9)
    assert stopped.returncode == 130 and 'stopped at iteration 9' in stopped.stdout, stopped
    resumed = run_train(*args, f'--out_dir={tmp_path / "stopped"}', '--resume=True')
    assert resumed.returncode == 0 and 'at iteration 9' in resumed.stdout, resumed
    assert_same_run(tmp_path / 'stopped', tmp_path / 'whole')
    plain = run_train(*args, '--size_augment=0', f'--out_dir={tmp_path / "plain"}')
    assert plain.returncode == 0, plain.stderr
    flat = run_train(*TRAIN, f'--data_dir={grids.root / "flat"}', '--pooling=gpo', '--epochs=1',
                     f'--out_dir={tmp_path / "flat_run"}')
    assert flat.returncode == 0 and 'note: --pooling=gpo' in flat.stdout and 'nothing to pool' in flat.stdout, flat
    last = {name: torch.load(tmp_path / name / 'last.pt', weights_only=True) for name in ('whole', 'plain')}
    assert last['whole']['model_config']['pooling'] == 'gpo' and last['whole']['model_config']['caption_pooling'] == 'gpo'
    assert not torch.equal(last['whole']['model']['image_gpo.score.weight'], last['plain']['model']['image_gpo.score.weight'])
    other = run_train(*args, f'--out_dir={tmp_path / "whole"}', '--resume=True', '--pooling=mean', '--epochs=3')
    assert_user_error(other, 'pooling', 'resume with --pooling=gpo')


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('case', ['features_2d', 'keep_crops', 'ten_crops'])
def test_prep_refuses_what_is_no_grid(grids, tmp_path, case):
    np.save(tmp_path / 'flat.npy', grid_features()[:, 0])
    extra = {'features_2d': [f'--features={tmp_path / "flat.npy"}'],
             'keep_crops': [f'--features={grids.npy}', '--keep_crops=True'],
             'ten_crops': [f'--features={grids.npy}', '--crops=10']}[case]
    want = {'features_2d': '--grid=True reads grid vectors: expected (60, K, D)',
            'keep_crops': 'kept crops are not grid vectors',
            'ten_crops': '--grid=True with --crops=10'}[case]
    proc = run_here('prep', '--dataset=x', f'--data_dir={tmp_path / "data"}', f'--dataset_json={grids.json}',
                    '--grid=True', '--vocab_threshold=1', *extra)
    assert_user_error(proc, want)
    assert not (tmp_path / 'data' / 'meta.json').exists()


@pytest.mark.parametrize('case', ['train_other_k', 'val_2d', 'kept_crops_as_grid', 'finetune'])
def test_grid_data_of_the_wrong_shape_is_one_line(grids, tmp_path, case):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(grids.data, data)
    extra = []
    if case == 'train_other_k':
        np.save(data / 'train_ims.npy', np.load(data / 'train_ims.npy')[:, :K - 1])
        want = ['train_ims.npy: shape', f'expected (images, {K}, {DIM}) as meta.json says']
    elif case == 'val_2d':
        np.save(data / 'val_ims.npy', np.load(data / 'val_ims.npy')[:, 0])
        want = ['val_ims.npy: shape', f'expected (images, {K}, {DIM}) as meta.json says']
    elif case == 'kept_crops_as_grid':   # a kept-crops dataset whose meta.json also says grid
        meta = json.loads((data / 'meta.json').read_text())
        (data / 'meta.json').write_text(json.dumps({**meta, 'kept_crops': True, 'crops': K}))
        want = ['meta.json: says grid vectors but also kept crops', '--force=True']
    else:
        extra, want = ['--finetune=True'], ['--finetune=True', 'holds grid vectors']
    proc = run_train(*TRAIN, f'--data_dir={data}', f'--out_dir={tmp_path / "run"}', *extra)
    assert_user_error(proc, *want)


# ----------------------------------------------------------------------------- from images, end to end

class TinyGrid(torch.nn.Module):
    """A small convolution to a 7 x 7 map of 8 channels, as (B, 49, 8): the grid machinery
    without a real network's cost (GridOf on the real ones is checked below)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 7, stride=4)
        self.pool = torch.nn.AdaptiveAvgPool2d(7)

    def forward(self, x):
        return self.pool(self.conv(x)).flatten(2).transpose(1, 2)


def test_prep_grid_from_images_resumes_and_a_gpo_model_trains_and_is_used(tmp_path, monkeypatch):
    """prep.py --grid=True from drawn photos: (N, 49, 8) float16 grid vectors, each unit length,
    written batch by batch into features_vgg16_1crop_grid.npy; interrupted after two images it
    resumes there; meta.json says grid. A GPO model trains on it, and eval.py scores the split,
    searches it by --image (computed as prep.py computed the split's own) and by --query, and
    draws a --gallery; --ensemble of two runs scores too."""
    import features
    monkeypatch.setattr(features, 'build_backbone', lambda cnn, weights, device, dtype='float32', grid=False:
                        (TinyGrid().eval(), 8))
    monkeypatch.setitem(features.CNN_GRID_DIMS, 'vgg16', 8)
    image_dataset(tmp_path, ['train'] * 4 + ['val'] * 2 + ['test'] * 2)
    args = ['--dataset=x', '--grid=True', '--batch_size=1', '--workers=0', '--dtype=float32', f'--data_dir={tmp_path}',
            '--vocab_threshold=1']
    write_progress = features.write_progress

    def killed_after_two(out, progress_path, job, rows, bad, done):
        write_progress(out, progress_path, job, rows, bad, done)
        if done == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(features, 'write_progress', killed_after_two)
    assert run_here('prep', *args).returncode == 130 and not (tmp_path / 'meta.json').exists()
    monkeypatch.setattr(features, 'write_progress', write_progress)
    raw = tmp_path / 'features_vgg16_1crop_grid.npy'
    assert np.load(raw).shape == (8, 49, 8) and np.load(raw).dtype == np.float16
    assert json.load(open(f'{raw}.job.json'))['grid'] is True
    proc = run_here('prep', *args)
    assert proc.returncode == 0 and 'resuming at image 2 of 8' in proc.stdout and '(49 grid vectors each)' in proc.stdout, proc
    meta = json.loads((tmp_path / 'meta.json').read_text())
    assert (meta['grid'], meta['grid_size'], meta['feature_dim'], meta['cnn']) == (True, 49, 8, 'vgg16')
    # the raw map as --features, with the --cnn that made it: checked on the photos, recorded
    np.save(tmp_path / 'mine.npy', np.load(raw).astype(np.float32))
    again = run_here('prep', *args[:2], '--workers=0', '--dtype=float32', f'--data_dir={tmp_path / "again"}',
                     f'--dataset_json={tmp_path / "dataset.json"}', f'--features={tmp_path / "mine.npy"}', '--cnn=vgg16',
                     f'--images_dir={tmp_path / "images"}', '--vocab_threshold=1')
    assert again.returncode == 0 and 'vgg16 makes them from the photos' in again.stdout, again
    assert json.loads((tmp_path / 'again' / 'meta.json').read_text())['grid_size'] == 49
    train_ims = np.load(tmp_path / 'train_ims.npy')
    assert train_ims.shape == (4, 49, 8) and train_ims.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(train_ims.astype(np.float32), axis=-1), 1, atol=2e-3)
    with torch.no_grad():   # the stored rows are the network's map, normalized per vector
        from features import image_transform
        from PIL import Image
        x = image_transform('vgg16', 1)(Image.open(tmp_path / 'images' / '0.jpg').convert('RGB'))[None]
        want = torch.nn.functional.normalize(TinyGrid()(x)[0], dim=-1).numpy()
    np.testing.assert_allclose(train_ims[0].astype(np.float32), want, atol=2e-3)
    runs = [tmp_path / 'run1', tmp_path / 'run2']
    for seed, run in enumerate(runs):
        proc = run_train('--dataset=x', f'--data_dir={tmp_path}', f'--out_dir={run}', '--embed_dim=16', '--word_dim=8',
                         '--batch_size=10', '--epochs=2', '--compile=False', f'--seed={seed}', *GPO_RECIPE)
        assert proc.returncode == 0, proc.stderr
    scored = run_here('eval', f'--out_dir={runs[0]}', '--compile=False')
    assert scored.returncode == 0 and 'rsum' in scored.stdout, scored.stderr
    assert json.loads((runs[0] / 'results_test.json').read_text())['n_images'] == 2
    from eval import image_features
    from utils import load_meta, load_split
    got = image_features([str(tmp_path / 'images' / '6.jpg'), str(tmp_path / 'images' / '7.jpg')],
                         load_meta(str(tmp_path)), torch.device('cpu'))
    np.testing.assert_allclose(got, load_split(str(tmp_path), 'test')[0], atol=1e-3)
    found = run_here('eval', f'--out_dir={runs[0]}', '--compile=False', f'--image={tmp_path / "images" / "7.jpg"}')
    assert found.returncode == 0 and 'best ground-truth caption at rank' in found.stdout, found.stderr
    queried = run_here('eval', f'--out_dir={runs[0]}', '--compile=False', '--query=a picture number 6',
                       f'--gallery={tmp_path / "g.png"}')
    assert queried.returncode == 0 and (tmp_path / 'g.png').exists(), queried.stderr
    both = run_here('eval', f'--ensemble={runs[0]},{runs[1]}', '--compile=False')
    assert both.returncode == 0 and 'ensemble of 2 runs' in both.stdout, both.stderr


def test_grid_of_efficientnet_lite0_is_its_7x7_map_whose_mean_is_its_feature():
    """GridOf on a real network (random weights): Lite0's head at 224 is 49 vectors of 1,280,
    and their mean is the pooled feature prep.py extracts without --grid."""
    pytest.importorskip('timm')
    from features import build_backbone
    x = torch.randn(1, 3, 224, 224)
    grid, dim = build_backbone('efficientnet_lite0', 'random', torch.device('cpu'), grid=True)
    pooled, _ = build_backbone('efficientnet_lite0', 'random', torch.device('cpu'))
    with torch.no_grad():
        vectors = grid(x)
        assert vectors.shape == (1, 49, 1280) and dim == 1280
        torch.testing.assert_close(vectors.mean(1), pooled(x), rtol=1e-4, atol=1e-5)
