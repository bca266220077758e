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
