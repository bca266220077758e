"""Shared test helpers: running the scripts as a user would, their error lines, small random
batches; the oracles the fast code is held to (naive_step, reference_ranks) and input makers
(image_dataset); a synthetic dataset, and a Flickr8k stand-in served on 127.0.0.1."""
import json
import os
import re
import subprocess
import sys

import pytest

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
        captions[name] = []
        for k in range(5):
            words = ['A'] + list(rng.choice(CAPTION_WORDS, size=3)) + [','] + list(rng.choice(CAPTION_WORDS, size=2)) + ['.']
            raw = ' '.join(words)
            captions[name].append(raw)
            lines.append(f'{name}#{k}\t{raw}\n')
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
    """serve(folder, ranges=True) -> base URL of a threaded HTTP server on 127.0.0.1; the
    requests it answered are in serve.log as (path, Range header or None, status).
    ranges=False answers every request with the whole file, as Python's http.server does."""
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

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f'http://127.0.0.1:{server.server_address[1]}/'

    serve.log = []
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()
