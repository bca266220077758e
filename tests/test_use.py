"""Using a trained model: the synthetic pictures, --query, --gallery, --save_ranks, --compare,
the training curves; the pictures are read back and checked against search()."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import gallery
import prep
from conftest import assert_user_error, run_script
from utils import load_meta, load_split

SMALL = ['--embed_dim=64', '--word_dim=32', '--batch_size=64']


@pytest.fixture(scope='module')
def run(synthetic_dir, tmp_path_factory):
    """A small trained run, validated several times so that the curves have several points, and
    trained enough (3 epochs without image dropout: text->image R@10 near 95 on test, rsum ~440;
    with the default's dropout ~290 after 3 epochs) that a gallery of two queries shows some
    ground truth whatever the processor's rounding and the random draws."""
    out = tmp_path_factory.mktemp('use') / 'run'
    run_script('train.py', '--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={out}',
               '--epochs=3', '--eval_interval=24', '--log_interval=5', '--image_dropout=0', *SMALL)
    return out


def load(run, synthetic_dir):
    model, ckpt = ev.load_model(os.path.join(run, 'best.pt'), torch.device('cpu'))
    feats, captions = load_split(synthetic_dir, 'test')
    files = open(os.path.join(synthetic_dir, 'test_files.txt')).read().splitlines()
    return model, ckpt['vocab'], feats, captions, files


def pixels(picture, box):
    return np.asarray(picture.crop(box))


def test_synthetic_pictures_show_their_attributes(synthetic_dir):
    meta = load_meta(synthetic_dir)
    folder = os.path.join(synthetic_dir, meta['images_dir'])
    data = json.load(open(os.path.join(synthetic_dir, 'dataset.json')))
    assert sorted(os.listdir(folder)) == sorted(im['filename'] for im in data['images'])
    for im in data['images'][:50]:
        attrs = im['attributes']
        picture = np.asarray(Image.open(os.path.join(folder, im['filename'])).convert('RGB'))
        assert picture.shape == (64, 64, 3)
        assert tuple(picture[0, 0]) == prep.BACKGROUNDS[attrs['background']]
        x, y = prep.CENTRES[attrs['place']]
        if attrs['shape'] != 'ring':  # filled shapes hold their colour at their centre
            assert tuple(picture[y, x]) == prep.RGB[attrs['color']], (im['filename'], attrs)
        # the same attributes draw the same pixels
        assert (np.asarray(prep.draw_synthetic(attrs)) == picture).all()


def test_curves_drawn_at_each_validation(run):
    log = [json.loads(line) for line in open(run / 'log.jsonl')]
    assert sum('val' in r for r in log) >= 3
    picture = Image.open(run / 'curves.png').convert('RGB')
    assert picture.size == (1140, 300)
    colours = {c for _, c in picture.getcolors(1 << 20)}
    for rgb in ((214, 39, 40), (31, 119, 180), (44, 160, 44), (40, 40, 40)):  # R@1, R@5, R@10, loss
        assert rgb in colours


def test_query_prints_the_order_search_returns(run, synthetic_dir):
    sentence = 'a big red star on the left against a snow background'
    proc = run_script('eval.py', f'--out_dir={run}', f'--query={sentence}', '--k=7')
    listed = [line.split() for line in proc.stdout.splitlines() if line.strip().split(' ')[0].isdigit()]
    model, vocab, feats, captions, files = load(run, synthetic_dir)
    scores, indices = ev.search(model, ev.encode_images(model, feats), ev.encode_text(model, vocab, [sentence]), k=7)
    assert [row[-1] for row in listed] == [files[i] for i in indices[0].tolist()]
    assert np.allclose([float(row[-2]) for row in listed], scores[0].numpy(), atol=1e-4)
    assert (scores[0][:-1] >= scores[0][1:]).all()
    # a query the vocabulary does not know is read as <unk>, and said so
    proc = run_script('eval.py', f'--out_dir={run}', '--query=a zebra star', '--k=3')
    assert 'not in the vocabulary' in proc.stdout and 'zebra' in proc.stdout


def test_text_gallery_draws_search_order_and_outlines_ground_truth(run, synthetic_dir, tmp_path):
    out = tmp_path / 'gallery.png'
    run_script('eval.py', f'--out_dir={run}', f'--gallery={out}', '--gallery_queries=4', '--k=10')
    model, vocab, feats, captions, files = load(run, synthetic_dir)
    picks = np.linspace(0, len(captions) - 1, 4).round().astype(int)
    _, indices = ev.search(model, ev.encode_images(model, feats),
                           ev.encode_text(model, vocab, [captions[j] for j in picks], tokenized=True), k=10)
    picture = Image.open(out).convert('RGB')
    assert picture.size == (2 * gallery.MARGIN + 10 * gallery.THUMB + 9 * gallery.GAP, gallery.HEADER + 4 * gallery.text_row_height())
    folder = os.path.join(synthetic_dir, 'images')
    outlined = 0
    for row, (j, ranked) in enumerate(zip(picks, indices.tolist())):
        for rank, i in enumerate(ranked):
            box = gallery.thumb_box(row, rank)
            assert (pixels(picture, box) == np.asarray(gallery.thumbnail(os.path.join(folder, files[i])))).all(), (row, rank)
            frame = picture.getpixel((box[0] - 2, (box[1] + box[3]) // 2))
            assert frame == (gallery.GROUND_TRUTH if i == j // 5 else (255, 255, 255)), (row, rank, frame)
            outlined += i == j // 5
    assert outlined >= 1  # a trained model finds some of them


def test_image_gallery_lists_search_order_and_marks_ground_truth(run, synthetic_dir, tmp_path):
    out = tmp_path / 'images.png'
    proc = run_script('eval.py', f'--out_dir={run}', f'--gallery={out}', '--gallery_by=image', '--gallery_queries=2', '--k=8')
    model, vocab, feats, captions, files = load(run, synthetic_dir)
    picks = np.linspace(0, len(feats) - 1, 2).round().astype(int)
    _, indices = ev.search(model, ev.encode_images(model, feats[picks]),
                           ev.encode_text(model, vocab, captions, tokenized=True), k=8, by='image')
    picture = Image.open(out).convert('RGB')
    assert picture.size[1] == gallery.HEADER + 2 * gallery.image_row_height(8)
    marked = 0
    for row, (i, ranked) in enumerate(zip(picks, indices.tolist())):
        query = (gallery.MARGIN, gallery.HEADER + row * gallery.image_row_height(8))
        expected = np.asarray(gallery.thumbnail(os.path.join(synthetic_dir, 'images', files[i]), 2 * gallery.THUMB))
        assert (pixels(picture, (*query, query[0] + 2 * gallery.THUMB, query[1] + 2 * gallery.THUMB)) == expected).all()
        for rank, j in enumerate(ranked):
            box = gallery.caption_box(row, 8, rank)
            mark = picture.getpixel((box[0] + 2, box[1] + 4))
            assert mark == (gallery.GROUND_TRUTH if j // 5 == i else (255, 255, 255)), (row, rank, mark)
            assert captions[j] in proc.stdout
            marked += j // 5 == i
    assert marked >= 1


# eval.py ranks with the compiled order kernel, search() with the plain tiled path: two float
# paths that round differently (test_speed.py holds them within 1e-4 relative, 1e-5 absolute).
# A score within NEAR_TIE of the ground truth's may fall on either side of it, so a rank is
# checked against the interval that such near-ties allow, not for equality.
NEAR_TIE = 1e-4


def rank_bounds(scores, truth_scores, truth):
    """Per query row: the fewest and the most other items (not marked in `truth`) that score at
    least the ground truth's score when scores within NEAR_TIE of it may fall either way."""
    tol = NEAR_TIE * (1 + truth_scores.abs())[:, None]
    low = ((scores > truth_scores[:, None] + tol) & ~truth).sum(1)
    high = ((scores >= truth_scores[:, None] - tol) & ~truth).sum(1)
    return low, high


def assert_same_up_to_near_ties(listed, expected, scores):
    """Two top-k lists of the same query agree where their scores are not near-ties."""
    a, b = scores[listed], scores[expected]
    assert torch.allclose(a, b, rtol=NEAR_TIE, atol=NEAR_TIE), (listed, expected)


def test_save_ranks_agree_with_metrics_and_search(run, synthetic_dir):
    run_script('eval.py', f'--out_dir={run}', '--save_ranks=True', '--save_embeddings=True')
    ranks = json.load(open(run / 'ranks_test.json'))
    result = json.load(open(run / 'results_test.json'))
    assert len(ranks['i2t']) == 100 and len(ranks['t2i']) == 500
    emb = np.load(run / 'embeddings_test.npz')
    model, vocab, feats, captions, files = load(run, synthetic_dir)
    images, caps = torch.from_numpy(emb['images']), torch.from_numpy(emb['captions'])
    scores = ev.score_matrix(images, caps, model.measure)  # the plain path: see NEAR_TIE
    truth = torch.arange(500)[None, :] // 5 == torch.arange(100)[:, None]  # (image, caption): written for it
    best_own = scores.masked_fill(~truth, -torch.inf).max(1).values
    low, high = rank_bounds(scores, best_own, truth)
    got = torch.tensor([r['rank'] for r in ranks['i2t']])
    assert ((low <= got) & (got <= high)).all(), (got, low, high)
    caption_truth = scores.t()[torch.arange(500), torch.arange(500) // 5]
    low, high = rank_bounds(scores.t(), caption_truth, truth.t())
    got = torch.tensor([r['rank'] for r in ranks['t2i']])
    assert ((low <= got) & (got <= high)).all(), (got, low, high)
    # the ranks file and the metrics come from the same scores in eval.py: exactly equal
    assert abs(100 * np.mean([r['rank'] < 1 for r in ranks['t2i']]) - result['t2i']['r1']) < 1e-6
    _, top = ev.search(model, images, caps, k=10, by='image')
    for query, entry in enumerate(ranks['i2t']):
        assert_same_up_to_near_ties(entry['top10'], top[query].tolist(), scores[query])
    assert ranks['i2t'][3]['top10_captions'] == [captions[j] for j in ranks['i2t'][3]['top10']]
    _, top = ev.search(model, images, caps, k=10, by='text')
    for query, entry in enumerate(ranks['t2i']):
        assert_same_up_to_near_ties(entry['top10'], top[query].tolist(), scores[:, query])
    assert ranks['t2i'][7]['top10_files'] == [files[i] for i in ranks['t2i'][7]['top10']] and ranks['t2i'][7]['image'] == 1
    # the bound is tight: the two paths agree within it on these very scores
    compiled = ev.score_matrix(images, caps, model.measure, compiled=True)
    torch.testing.assert_close(compiled, scores, rtol=NEAR_TIE, atol=NEAR_TIE)


def test_compare_prints_one_markdown_table(run, synthetic_dir, tmp_path):
    other = tmp_path / 'cosine'
    run_script('train.py', '--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={other}', '--epochs=1',
               '--measure=cosine', *SMALL, '--batch_size=256')
    for r in (run, other):
        run_script('eval.py', f'--out_dir={r}')
    proc = run_script('eval.py', f'--compare={run},{other}')
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith('| run |') and lines[1].startswith('|---')
    for line, r in zip(lines[2:], (run, other)):
        result = json.load(open(r / 'results_test.json'))
        cells = [c.strip() for c in line.strip('|').split('|')]
        assert cells[:3] == [str(r), result['measure'], '100']
        assert cells[3:7] == [f"{result['i2t'][m]:.1f}" for m in ('r1', 'r5', 'r10')] + [f"{result['i2t']['medr']:.0f}"]
        assert cells[7:11] == [f"{result['t2i'][m]:.1f}" for m in ('r1', 'r5', 'r10')] + [f"{result['t2i']['medr']:.0f}"]
        assert cells[11] == f"{result['rsum']:.1f}"
    assert_user_error(run_script('eval.py', f'--compare={run},{tmp_path / "none"}', check=False), 'results_test.json', 'evaluate')


def test_use_errors(run, synthetic_dir, tmp_path):
    picture = os.path.join(synthetic_dir, 'images', 'synth_000700.png')
    assert_user_error(run_script('eval.py', f'--out_dir={run}', f'--image={picture}', check=False),
                      'not extracted from images', '--image')
    out = tmp_path / 'g.png'
    assert_user_error(run_script('eval.py', f'--out_dir={run}', f'--gallery={out}', f'--images_dir={tmp_path}', check=False),
                      'not on disk', '--images_dir')
    assert not out.exists()
    assert_user_error(run_script('eval.py', f'--out_dir={run}', '--gallery=g.jpg', check=False), 'PNG')
    assert_user_error(run_script('eval.py', f'--out_dir={run}', '--query=...', check=False), 'no words')


def test_image_query_uses_the_datasets_cnn(synthetic_dir, tmp_path):
    """A dataset prepared from pictures (a few synthetic ones, VGG16 with seeded random weights):
    --image computes the same features prep.py did, so the split's own image finds its captions."""
    data = json.load(open(os.path.join(synthetic_dir, 'dataset.json')))
    data['images'] = [im for s, n in (('train', 4), ('val', 2), ('test', 3)) for im in
                      [im for im in data['images'] if im['split'] == s][:n]]
    with open(tmp_path / 'dataset.json', 'w') as f:
        json.dump(data, f)
    folder = os.path.join(synthetic_dir, 'images')
    run_script('prep.py', '--dataset=pictures', f'--data_dir={tmp_path / "data"}', f'--dataset_json={tmp_path / "dataset.json"}',
               f'--images_dir={folder}', '--cnn=vgg16', '--weights=random', '--workers=0', '--vocab_threshold=1')
    out = tmp_path / 'run'
    run_script('train.py', '--dataset=pictures', f'--data_dir={tmp_path / "data"}', f'--out_dir={out}', '--epochs=1', *SMALL)
    meta = load_meta(tmp_path / 'data')
    feats, captions = load_split(tmp_path / 'data', 'test')
    query = os.path.join(folder, data['images'][-2]['filename'])        # the test split's second image
    again = ev.image_features([query], meta, torch.device('cpu'))
    assert np.abs(again[0] - feats[1]).max() < 1e-5
    # and with the decoder meta.json names: decode_jpeg's resize rounds differently from PIL's
    other = ev.image_features([query], {**meta, 'decode': 'torch'}, torch.device('cpu'))
    assert meta['decode'] == 'pil' and 0 < np.abs(other[0] - feats[1]).max() and other[0] @ feats[1] > 0.99
    picture_path = tmp_path / 'image.png'
    proc = run_script('eval.py', f'--out_dir={out}', f'--image={query}', '--k=15', f'--gallery={picture_path}')
    marked = [line for line in proc.stdout.splitlines() if line[5:6] == '*']
    assert sorted(line.split(None, 3)[3] for line in marked) == sorted(captions[5:10])   # all 15 listed, its 5 marked
    assert Image.open(picture_path).size[1] == gallery.HEADER + gallery.image_row_height(15)


def test_curves_survive_a_torn_log_line(tmp_path):
    """A killed run can leave half a line at the end of log.jsonl; a resumed run appends to it."""
    from run_folder import draw_curves
    val = {d: {'r1': 10.0, 'r5': 30.0, 'r10': 50.0} for d in ('i2t', 't2i')}
    with open(tmp_path / 'log.jsonl', 'w') as f:
        f.write(json.dumps({'iteration': 5, 'loss': 2.0}) + '\n' + json.dumps({'iteration': 10, 'val': val}) + '\n')
        f.write('{"iteration": 15, "lo')
        f.write(json.dumps({'iteration': 15, 'loss': 1.0}) + '\n' + json.dumps({'iteration': 20, 'val': val}) + '\n')
    draw_curves(tmp_path / 'log.jsonl', tmp_path / 'curves.png')
    assert Image.open(tmp_path / 'curves.png').size == (1140, 300)


NOTEBOOK = '''
import sys
sys.path.insert(0, {root!r})      # docs/evaluation.md: the repository on the path, from anywhere
import json, torch, eval as ev
from utils import load_split, encode_text, encode_images
model, ckpt = ev.load_model({ckpt!r}, torch.device('cpu'))
feats, captions = load_split({data!r}, 'test')
images = encode_images(model, feats)
queries = encode_text(model, ckpt['vocab'], [{sentence!r}])
scores, indices = ev.search(model, images, queries, k=5, by='text')
caps = encode_text(model, ckpt['vocab'], captions, tokenized=True)
_, by_image = ev.search(model, images, caps, by='image')
print(json.dumps({{'top': indices[0].tolist(), 'scores': scores[0].tolist(), 'by_image': by_image[0].tolist()}}))
'''


def test_the_notebook_api_works_from_a_folder_outside_the_repository(run, synthetic_dir, tmp_path):
    """docs/evaluation.md's notebook lines, run by a fresh python in another folder, give what
    eval.py --query prints."""
    import subprocess
    import sys
    from conftest import ROOT
    sentence = 'a small blue circle on the right'
    code = NOTEBOOK.format(root=ROOT, ckpt=str(run / 'best.pt'), data=str(synthetic_dir), sentence=sentence)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    files = open(os.path.join(synthetic_dir, 'test_files.txt')).read().splitlines()
    proc = run_script('eval.py', f'--out_dir={run}', f'--query={sentence}', '--k=5', cwd=tmp_path)
    listed = [line.split()[-1] for line in proc.stdout.splitlines() if line.strip().split(' ')[0].isdigit()]
    assert listed == [files[i] for i in got['top']]
    assert len(got['by_image']) == 10 and all(0 <= j < 5 * len(files) for j in got['by_image'])


def test_a_gallery_never_overwrites_a_file_without_force(run, tmp_path):
    photo = tmp_path / 'mine.png'
    Image.new('RGB', (8, 8), (1, 2, 3)).save(photo)
    before = photo.read_bytes()
    proc = run_script('eval.py', f'--out_dir={run}', f'--gallery={photo}', '--gallery_queries=1', check=False)
    assert_user_error(proc, f'--gallery={photo}: the file exists', '--force=True')
    assert photo.read_bytes() == before
    run_script('eval.py', f'--out_dir={run}', f'--gallery={photo}', '--gallery_queries=1', '--force=True')
    assert photo.read_bytes() != before and Image.open(photo).size[0] > 8
