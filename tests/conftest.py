"""Shared test helpers: running the scripts as a user would, their error lines, small random
batches; the oracles the fast code is held to (naive_step, reference_ranks) and input makers
(image_dataset); a synthetic dataset, a Flickr8k stand-in served on 127.0.0.1, and the
helpers several test files use (Karpathy-format files, running a script in this process or in
the background, a tiny backbone, photo-like JPEGs)."""
import os

# Under pytest-xdist the workers share the cores: one thread each, inherited by the scripts they
# run (OpenMP threads competing for a core are many times slower than one thread each).
if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ.setdefault('OMP_NUM_THREADS', '1')

import contextlib  # noqa: E402 (after the thread setting, which torch reads when it is imported)
import importlib
import io
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')


def run_script(script, *args, cwd=None, check=True, timeout=600, env=None):
    """Run one of the project's scripts as a user would; returns the CompletedProcess.
    env: variables to set on top of this process's environment."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_user_error(proc, *fragments):
    """A bad input ends with exit 1 and one line on stderr that names the problem, no traceback
    (besides the progress bars, on stderr too, of the steps before it)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if not re.search(r'\d+%\|', line)]
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def make_model(feature_dim, vocab_size, word_dim=300, embed_dim=1024, measure='order', compiled=False, **rest):
    """model.build_model of a ModelConfig with these sizes (rest: its other fields)."""
    from model import ModelConfig, build_model
    return build_model(ModelConfig(feature_dim, vocab_size, word_dim, embed_dim, measure, **rest), compiled=compiled)


def batch_of(feats, tokens, lengths, idx):
    """train.get_batch of the captions idx and their images (image i owns captions 5i .. 5i+4)."""
    import train
    return train.get_batch(SimpleNamespace(feats=feats, tokens=tokens, lengths=lengths), idx, None, 0, 0)


def train_on(model, optimizer, feats, tokens, lengths, idx, cfg):
    """train.py's training step on the captions idx, with the loss cfg.max_violation says."""
    import train
    return train.train_step(model, optimizer, *batch_of(feats, tokens, lengths, idx), cfg, cfg.max_violation)


def loss_of(model, feats, tokens, lengths, idx, cfg):
    """train.py's batch loss of the captions idx."""
    import train
    return train.batch_loss(model, *batch_of(feats, tokens, lengths, idx), cfg, cfg.max_violation)


def caption_batch(n_images, n_captions, length=9, vocab=30, feature_dim=24):
    """Random image features and padded captions (ids 2..vocab-1, 1..length tokens each)."""
    import torch
    feats = torch.randn(n_images, feature_dim)
    lengths = torch.randint(1, length + 1, (n_captions,))
    tokens = torch.randint(2, vocab, (n_captions, length)) * (torch.arange(length)[None] < lengths[:, None])
    return feats, tokens, lengths


# ----------------------------------------------------------------------------- oracles
# Plain computations that the tests hold the project's fast code to; written here, not taken
# from the code under test (nor from bench.py, whose baselines are timed, not trusted).

def naive_step(model, optimizer, features, captions, cfg):
    """One training step written the plain way, for order scores: each caption (a 1-d tensor of
    token ids) through the GRU on its own, unit length and abs() by hand, model.order_scores
    (the broadcast), the hinge loss, clip, and the optimizer's step. Returns the loss."""
    import torch
    from model import contrastive_loss, order_scores
    images = model.encode_images(features)
    hidden = torch.cat([model.gru(model.word_embed(c)[None])[1][0] for c in captions])
    captions = torch.nn.functional.normalize(hidden.float(), dim=1).abs()
    loss = contrastive_loss(order_scores(images, captions), cfg.margin, cfg.max_violation)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=False)
    optimizer.step()
    return loss.detach()


def reference_ranks(scores):
    """The field's definitions written the plain way (as in the VSE++ evaluation code), with
    ties broken against the ground truth."""
    import numpy as np
    s = np.asarray(scores, dtype=np.float64)
    n = s.shape[0]
    i2t, t2i = np.zeros(n, int), np.zeros(5 * n, int)
    for i in range(n):
        order = sorted(range(5 * n), key=lambda j: (-s[i, j], j // 5 == i))  # a tie goes against the truth
        i2t[i] = min(order.index(j) for j in range(5 * i, 5 * i + 5))
    for j in range(5 * n):
        order = sorted(range(n), key=lambda i: (-s[i, j], i == j // 5))
        t2i[j] = order.index(j // 5)
    return i2t, t2i


def image_dataset(folder, splits, seed=0):
    """dataset.json (Karpathy's format) and images/ for dataset 'x' in folder."""
    os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
    images = []
    for i, split in enumerate(splits):
        draw_image(os.path.join(folder, 'images', f'{i}.jpg'), seed + i)
        images.append({'filename': f'{i}.jpg', 'split': split, 'sentences': [
            {'tokens': ['a', 'picture', 'number', str(i), 'take', str(k)]} for k in range(5)]})
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'images': images}, f)


@pytest.fixture(scope='session')
def synthetic_dir(tmp_path_factory):
    """A small synthetic dataset, prepared once for the session."""
    path = tmp_path_factory.mktemp('synthetic')
    run_script('prep.py', '--dataset=synthetic', f'--data_dir={path}', '--synthetic_sizes=600,100,100',
               '--synthetic_dim=256')
    return path


# ----------------------------------------------------------------------------- Flickr8k stand-in
# Zips laid out like the real release assets of github.com/jbrownlee/Datasets, and a web server
# on 127.0.0.1 to fetch them from (prep.py --mirror=...).

CAPTION_WORDS = ['child', 'dog', 'pink', 'dress', 'runs', 'on', 'grass', 'two', 'men', 'play', 'ball', 'red']


def draw_image(path, seed, size=(80, 60)):
    import numpy as np
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    im = Image.new('RGB', size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, size[0] - 10)), int(rng.integers(0, size[1] - 10))
        draw.rectangle([x0, y0, x0 + int(rng.integers(5, 40)), y0 + int(rng.integers(5, 30))],
                       fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    im.save(path, 'JPEG', quality=90)


def flickr8k_names(n_train=4, n_dev=2, n_test=2):
    names = [f'{1000268201 + 7 * i}_{i:010x}.jpg' for i in range(n_train + n_dev + n_test)]
    return names[:n_train], names[n_train:n_train + n_dev], names[n_train + n_dev:]


def random_caption(rng):
    words = ['A'] + list(rng.choice(CAPTION_WORDS, size=3)) + [','] + list(rng.choice(CAPTION_WORDS, size=2)) + ['.']
    return ' '.join(words)


def make_flickr8k_zips(folder, splits=None, image_bytes=None):
    """Flickr8k_Dataset.zip (Flicker8k_Dataset/*.jpg, misspelled as in the real one, with
    __MACOSX/ entries) and Flickr8k_text.zip (Flickr8k.token.txt, the three split files).
    image_bytes: {name: bytes} replaces some images (corrupt ones). Returns the captions."""
    import zipfile
    import numpy as np
    train, dev, test = splits or flickr8k_names()
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    captions = {}
    with zipfile.ZipFile(os.path.join(folder, 'Flickr8k_Dataset.zip'), 'w') as zf:
        zf.writestr('Flicker8k_Dataset/', b'')
        for i, name in enumerate(train + dev + test):
            path = os.path.join(folder, name)
            draw_image(path, i)
            data = (image_bytes or {}).get(name) or open(path, 'rb').read()
            os.remove(path)
            zf.writestr(f'Flicker8k_Dataset/{name}', data)
            zf.writestr(f'__MACOSX/Flicker8k_Dataset/._{name}', b'\x00\x05\x16\x07 mac resource fork')
    lines = []
    for name in train + dev + test:
        captions[name] = [random_caption(rng) for _ in range(5)]
        lines += [f'{name}#{k}\t{raw}\n' for k, raw in enumerate(captions[name])]
    lines.append('2258277193_586949ec62.jpg.1#0\tA stray line for an image in no split , as in the real file .\n')
    with zipfile.ZipFile(os.path.join(folder, 'Flickr8k_text.zip'), 'w') as zf:
        zf.writestr('Flickr8k.token.txt', ''.join(lines))
        zf.writestr('Flickr8k.lemma.token.txt', ''.join(lines))
        zf.writestr('__MACOSX/._Flickr8k.token.txt', b'\x00\x05\x16\x07')
        for split, names in (('train', train), ('dev', dev), ('test', test)):
            zf.writestr(f'Flickr_8k.{split}Images.txt', ''.join(n + '\n' for n in names))
        zf.writestr('readme.txt', 'Flickr8k text files\n')
    return captions


@pytest.fixture
def file_server():
    """serve(folder, ranges=True) -> base URL of a threaded HTTP server on 127.0.0.1; the GET
    requests it answered are in serve.log as (path, Range header or None, status), the paths
    of the HEAD requests in serve.heads. ranges=False answers every GET with the whole file,
    as Python's http.server does."""
    import http.server
    import threading
    servers = []

    def serve(folder, ranges=True):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = os.path.join(folder, self.path.lstrip('/'))
                rng = self.headers.get('Range')
                if not os.path.isfile(path):
                    serve.log.append((self.path, rng, 404))
                    self.send_error(404)
                    return
                data = open(path, 'rb').read()
                start = int(rng[len('bytes='):].split('-')[0]) if rng and ranges else 0
                status = 206 if rng and ranges else 200
                serve.log.append((self.path, rng, status))
                self.send_response(status)
                if status == 206:
                    self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
                self.send_header('Content-Length', str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def do_HEAD(self):  # a --mirror's sizes are asked before anything is fetched
                path = os.path.join(folder, self.path.lstrip('/'))
                serve.heads.append(self.path)
                if not os.path.isfile(path):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header('Content-Length', str(os.path.getsize(path)))
                self.end_headers()

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f'http://127.0.0.1:{server.server_address[1]}/'

    serve.log, serve.heads = [], []
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- Flickr30k and COCO stand-ins
# Files with the real ones' names and layout (download.py says where each fact comes from), a
# handful of drawn images each: what a --mirror serves in place of Hugging Face and COCO's site.

def zip_of_drawn_images(path, names, seed):
    """A zip of JPEGs drawn at the given member names, with their folder entry first."""
    import io
    import zipfile
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr(names[0].split('/')[0] + '/', b'')
        for i, name in enumerate(names):
            buffer = io.BytesIO()
            draw_image(buffer, seed + i)
            zf.writestr(name, buffer.getvalue())


def make_flickr30k_files(folder, counts=None):
    """nlphuji/flickr30k's two files: flickr30k-images.zip (flickr30k-images/<id>.jpg, and one photo
    the table leaves out: the real zip has 31,783 photos, the table Karpathy's 31,014) and
    flickr_annotations_30k.csv (raw, sentids, split, filename, img_id; raw and sentids as JSON).
    counts: {split: images}. Returns the table's rows as dicts, raw decoded."""
    import csv
    import json
    import numpy as np
    counts = counts or {'train': 3, 'val': 2, 'test': 2}
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(30)
    rows = []
    for split, n in counts.items():
        for _ in range(n):
            i = len(rows)
            raw = [random_caption(rng) for _ in range(5)]
            raw[0] = f'A man says "hi" to {raw[0]}'  # quotes inside the JSON inside the CSV
            rows.append({'raw': raw, 'sentids': list(range(5 * i, 5 * i + 5)), 'split': split,
                         'filename': f'{1000092795 + 31 * i}.jpg', 'img_id': i})
    names = [f"flickr30k-images/{row['filename']}" for row in rows] + ['flickr30k-images/999999999.jpg']
    zip_of_drawn_images(os.path.join(folder, 'flickr30k-images.zip'), names, seed=300)
    with open(os.path.join(folder, 'flickr_annotations_30k.csv'), 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=['raw', 'sentids', 'split', 'filename', 'img_id'])
        writer.writeheader()
        writer.writerows({**row, 'raw': json.dumps(row['raw']), 'sentids': json.dumps(row['sentids'])} for row in rows)
    return rows


COCO_PARQUET = {'train': 'train-00000-of-00001.parquet', 'restval': 'restval-00000-of-00001.parquet',
                'val': 'validation-00000-of-00001.parquet', 'test': 'test-00000-of-00001.parquet'}


def make_coco_files(folder, counts=None):
    """COCO's train2014.zip (train2014/COCO_train2014_<12 digits>.jpg) and val2014.zip (val2014/...),
    and yerevann/coco-karpathy's four Parquet files, one per Karpathy split, a row per image:
    filepath, sentids, filename, imgid, split, sentences (raw captions), cocoid, url. Karpathy's
    train images are in train2014, restval, val and test in val2014; one image has 6 captions,
    as some of COCO's do. counts: {split: images}. Returns {split: rows}."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    counts = counts or {'train': 2, 'restval': 1, 'val': 2, 'test': 2}
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(2014)
    tables, imgid = {}, 0
    for split, n in counts.items():
        rows = []
        for _ in range(n):
            cocoid = 9 + 7919 * imgid
            filepath = 'train2014' if split == 'train' else 'val2014'
            filename = f'COCO_{filepath}_{cocoid:012d}.jpg'
            sentences = [random_caption(rng) for _ in range(6 if imgid == 1 else 5)]
            rows.append({'filepath': filepath, 'sentids': list(range(7 * imgid, 7 * imgid + len(sentences))),
                         'filename': filename, 'imgid': imgid, 'split': split, 'sentences': sentences,
                         'cocoid': cocoid, 'url': f'http://images.cocodataset.org/{filepath}/{filename}'})
            imgid += 1
        tables[split] = rows
    schema = pa.schema([('filepath', pa.string()), ('sentids', pa.list_(pa.int32())), ('filename', pa.string()),
                        ('imgid', pa.int32()), ('split', pa.string()), ('sentences', pa.list_(pa.string())),
                        ('cocoid', pa.int32()), ('url', pa.string())])
    for split, rows in tables.items():
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(folder, COCO_PARQUET[split]))
    for zip_name in ('train2014', 'val2014'):
        names = [f"{r['filepath']}/{r['filename']}" for rows in tables.values() for r in rows if r['filepath'] == zip_name]
        zip_of_drawn_images(os.path.join(folder, f'{zip_name}.zip'), names, seed=400 if zip_name == 'train2014' else 500)
    return tables


# ----------------------------------------------------------------------------- helpers several test files use

WORDS = ['dog', 'cat', 'runs', 'sits', 'on', 'grass', 'snow', 'red', 'ball', 'man']

def karpathy_dataset(splits, rng, val_only_word=None):
    """A dataset.json in Karpathy's format: `splits` lists each image's split."""
    images = []
    for i, split in enumerate(splits):
        sentences = []
        for k in range(5 + (i % 3 == 0)):  # some images have 6 captions, like COCO's
            tokens = ['a'] + list(rng.choice(WORDS, size=rng.integers(2, 6)))
            if val_only_word and split == 'val':
                tokens.append(val_only_word)
            sentences.append({'raw': ' '.join(tokens).capitalize() + '.', 'tokens': tokens, 'sentid': 10 * i + k})
        images.append({'filename': f'{i}.jpg', 'imgid': i, 'split': split, 'sentences': sentences})
    return {'dataset': 'test', 'images': images}

def dataset_from_array(root, splits, name, array, *options):
    """dataset.json for `splits` in root, `array` saved there as `name` (our own features: no
    vgg_feats.mat), and root/data prepared from it with --features= and `options`; returns
    (prep.py's result, root/data)."""
    write_pair(root, splits)
    os.remove(os.path.join(root, 'vgg_feats.mat'))
    np.save(os.path.join(root, name), array)
    data = os.path.join(root, 'data')
    proc = run_here('prep', '--dataset=x', f'--data_dir={data}', f'--dataset_json={os.path.join(root, "dataset.json")}',
                    f'--features={os.path.join(root, name)}', '--vocab_threshold=1', *options)
    return proc, type(root)(data)


def write_pair(folder, splits, dim=64, seed=0, **kw):
    rng = np.random.default_rng(seed)
    data = karpathy_dataset(splits, rng, **kw)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump(data, f)
    feats = rng.random((dim, len(splits))).astype(np.float32)  # D x N, as in vgg_feats.mat
    scipy.io.savemat(os.path.join(folder, 'vgg_feats.mat'), {'feats': feats})
    return data, feats

def no_outputs(folder):
    return not any(name.endswith(('.npy', 'caps.txt', 'meta.json', 'vocab.json')) and not name.startswith('mine')
                   for name in os.listdir(folder))

ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')

def start(script, *args, **kw):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)

def wait_for(proc, text):
    """Read the process's output until a line contains text; returns the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            break
    return lines

def run_here(script, *args, patch=None):
    """prep/train/eval's main in this process, through run_main as on the command line:
    (returncode, stdout, stderr). The module is reloaded so that its config starts at the defaults;
    patch(module), if given, then changes what the test needs changed."""
    if script == 'train':   # a patch of the run folder's classes (StopRequests) stays with this run
        importlib.reload(importlib.import_module('run_folder'))
    module = importlib.reload(importlib.import_module(script))
    if patch is not None:
        patch(module)
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [f'{script}.py', *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.run_main(module.main)
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())

def tiny_backbone():
    """Any (B, 3, 224, 224) -> (B, D) network will do to check the extraction machinery; a
    small one keeps the test fast (the real backbones are checked on their own below)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7, stride=4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()).eval()

def photo_like(size, seed, gray=False):
    """Smooth colour fields plus pixel noise: compresses and resizes like a photograph."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    small = torch.rand(1, 3, h // 16 + 1, w // 16 + 1, generator=g)
    big = torch.nn.functional.interpolate(small, size=(h, w), mode='bicubic', align_corners=False)[0]
    big = big + 0.05 * torch.randn(big.shape, generator=g)
    im = Image.fromarray((big.permute(1, 2, 0).clamp(0, 1) * 255).to(torch.uint8).numpy())
    return im.convert('L') if gray else im
