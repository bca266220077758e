"""Prepare a dataset once into the arrays that train.py and eval.py read.

    python prep.py --dataset=flickr8k                       # data/flickr8k/dataset.json + vgg_feats.mat
    python prep.py --dataset=coco --features=feats.npy      # your own (N, D) features
    python prep.py --dataset=synthetic                      # offline, seconds; for trying things out

Writes into data_dir, for each split (train, val, test): <split>_ims.npy (float32, rows
L2-normalized), <split>_caps.txt (5 captions per image, image i owns lines 5i..5i+4),
<split>_files.txt (image file names); then vocab.json (train captions only) and meta.json,
last, so that a dataset with a meta.json is complete.
"""
import collections
import os
import shutil
import sys

import numpy as np

from utils import (CAPS_PER_IMAGE, PAD, UNK, UserError, atomic_open, parse_config, read_json,
                   run_main, split_paths, tokenize, write_json)

# ----------------------------------------------------------------------------- config
dataset = 'flickr8k'      # flickr8k | flickr30k | coco | synthetic | any name with a dataset.json
data_dir = ''             # default: data/<dataset>
dataset_json = ''         # Karpathy-format json; default: <data_dir>/dataset.json
features = ''             # an (N, D) .npy in dataset.json image order: used instead of vgg_feats.mat
vocab_threshold = 4       # words seen fewer times in the train captions become <unk> (VSE++ uses 4)
max_len = 100             # a caption longer than this many tokens is an error, not silently cut
force = False             # overwrite a prepared dataset
# synthetic only
synthetic_sizes = '5000,1000,1000'   # train, val, test images
synthetic_dim = 4096      # feature dimension, like VGG fc7
seed = 1234
CONFIG_KEYS = [k for k, v in globals().items() if k.islower() and not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# -----------------------------------------------------------------------------

SPLITS = ('train', 'val', 'test')


def read_karpathy_json(path):
    """Karpathy's dataset_*.json -> list of {'split', 'file', 'captions': [5 token lists]}.
    restval goes to train (as in VSE++ and every COCO paper since); the first 5 captions kept."""
    data = read_json(path, 'dataset json (Karpathy format)')
    if not isinstance(data, dict) or not isinstance(data.get('images'), list) or not data['images']:
        raise UserError(f"{path}: expected Karpathy's format, an object with a non-empty 'images' list")
    images = []
    for n, entry in enumerate(data['images']):
        where = f"{path}: image {n}"
        if not isinstance(entry, dict) or 'split' not in entry or 'sentences' not in entry:
            raise UserError(f"{where}: needs 'split' and 'sentences' (Karpathy's format)")
        split = 'train' if entry['split'] == 'restval' else entry['split']
        if split not in SPLITS:
            raise UserError(f"{where}: unknown split {entry['split']!r} (expected train, restval, val or test)")
        sentences = entry['sentences']
        if not isinstance(sentences, list) or len(sentences) < CAPS_PER_IMAGE:
            raise UserError(f"{where} ({entry.get('filename')}): {len(sentences) if isinstance(sentences, list) else 0} "
                            f"captions; every image needs at least {CAPS_PER_IMAGE}")
        captions = []
        for s in sentences[:CAPS_PER_IMAGE]:
            if isinstance(s, dict) and isinstance(s.get('tokens'), list):
                words = ' '.join(str(t) for t in s['tokens']).lower().split()
            elif isinstance(s, dict) and isinstance(s.get('raw'), str):
                words = tokenize(s['raw'])
            else:
                raise UserError(f"{where}: a sentence without 'tokens' or 'raw'")
            if not words:
                raise UserError(f"{where} ({entry.get('filename')}): empty caption; fix or remove it in the json")
            if len(words) > max_len:
                raise UserError(f"{where} ({entry.get('filename')}): a caption of {len(words)} tokens "
                                f"(more than --max_len={max_len}); fix it or raise --max_len")
            captions.append(words)
        file = os.path.join(entry.get('filepath', ''), str(entry.get('filename', f'image_{n}')))
        images.append({'split': split, 'file': file, 'captions': captions})
    return images


def read_mat_features(path, n_images):
    """Karpathy's vgg_feats.mat: variable 'feats', 4096 x N, column i for images[i]."""
    import scipy.io
    try:
        mat = scipy.io.loadmat(path, variable_names=['feats'])
    except NotImplementedError:
        raise UserError(f"{path}: a MATLAB v7.3 file; save it as v5 (save -v7) or convert it to .npy and use --features") from None
    except (ValueError, OSError, TypeError) as e:
        raise UserError(f"{path}: not a readable .mat file ({e}); download it again") from None
    if 'feats' not in mat:
        raise UserError(f"{path}: no variable 'feats' (Karpathy's vgg_feats.mat has one)")
    feats = np.asarray(mat['feats'], dtype=np.float32)
    if feats.ndim != 2 or feats.shape[1] != n_images:
        raise UserError(f"{path}: 'feats' is {'x'.join(map(str, feats.shape))} but the dataset json has "
                        f"{n_images} images (expected D x {n_images}); the two files do not belong together")
    return np.ascontiguousarray(feats.T)


def read_npy_features(path, n_images):
    try:
        feats = np.load(path, mmap_mode='r', allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable .npy file ({e})") from None
    if feats.ndim != 2 or feats.shape[0] != n_images:
        raise UserError(f"{path}: shape {feats.shape}, expected ({n_images}, D): one row per image of the dataset json, in order")
    return np.asarray(feats, dtype=np.float32)


def normalize_rows(feats, source):
    feats = np.asarray(feats, dtype=np.float32)
    bad = ~np.isfinite(feats).all(1)
    if bad.any():
        raise UserError(f"{source}: {int(bad.sum())} rows hold NaN or inf (first: image {int(bad.argmax())}); regenerate the features")
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    if (norms == 0).any():
        raise UserError(f"{source}: image {int((norms[:, 0] == 0).argmax())} has an all-zero feature vector; regenerate the features")
    return feats / norms


def build_vocab(captions, threshold):
    """word -> id from the TRAIN captions only: 0 pads, 1 is <unk>, then by frequency."""
    counts = collections.Counter(w for words in captions for w in words)
    kept = sorted((w for w, c in counts.items() if c >= threshold), key=lambda w: (-counts[w], w))
    return {PAD: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(kept)}}


def write_prepared(out_dir, images, feats, meta):
    """Write the split arrays, then vocab.json, then meta.json (its presence marks a complete dataset)."""
    feats = normalize_rows(feats, meta['source'])
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path):
        os.remove(meta_path)  # only reached with --force: the dataset is incomplete until the end
    meta['splits'] = {}
    for split in SPLITS:
        rows = [i for i, im in enumerate(images) if im['split'] == split]
        if not rows:
            raise UserError(f"{meta['source']}: no images in split {split!r}; every dataset needs train, val and test")
        ims_path, caps_path = split_paths(out_dir, split)
        with atomic_open(ims_path) as f:
            np.save(f, feats[rows])
        with atomic_open(caps_path, 'w') as f:
            f.writelines(' '.join(words) + '\n' for i in rows for words in images[i]['captions'])
        with atomic_open(os.path.join(out_dir, f'{split}_files.txt'), 'w') as f:
            f.writelines(images[i]['file'] + '\n' for i in rows)
        meta['splits'][split] = {'images': len(rows), 'captions': CAPS_PER_IMAGE * len(rows)}
    vocab = build_vocab([w for im in images if im['split'] == 'train' for w in im['captions']], vocab_threshold)
    write_json(os.path.join(out_dir, 'vocab.json'), vocab)
    meta.update(feature_dim=int(feats.shape[1]), caps_per_image=CAPS_PER_IMAGE, vocab_size=len(vocab),
                vocab_threshold=vocab_threshold, max_len=max_len)
    write_json(meta_path, meta)
    return meta


# ----------------------------------------------------------------------------- synthetic data
# Pictures of one shape with five attributes; captions name the shape and some of the others.
# An image's feature is the sum of one random direction per attribute value plus noise, so the
# words of a caption determine where its image lies, as in real data, but learnable in minutes.
ATTRIBUTES = {
    'size': ['small', 'medium', 'big'],
    'color': ['red', 'green', 'blue', 'yellow', 'purple', 'orange', 'black', 'white', 'pink', 'brown'],
    'shape': ['circle', 'square', 'triangle', 'star', 'cross', 'ring', 'diamond', 'bar'],
    'place': ['left', 'right', 'top', 'bottom', 'middle'],
    'background': ['gray', 'sand', 'sky', 'grass', 'night', 'snow'],
}
OPENINGS = [[], [], ['there', 'is'], ['a', 'picture', 'of'], ['we', 'see'], ['an', 'image', 'showing']]


def synthetic_caption(rng, attrs):
    words = list(OPENINGS[rng.integers(len(OPENINGS))]) + ['a']
    mention = [a for a in ('size', 'color', 'place', 'background') if rng.random() < 0.6] or ['color']
    words += [attrs[a] for a in ('size', 'color') if a in mention] + [attrs['shape']]
    if 'place' in mention:
        words += ['on', 'the', attrs['place']]
    if 'background' in mention:
        words += ['against', 'a', attrs['background'], 'background']
    return words


def make_synthetic(sizes, dim, rng):
    directions = {(a, v): rng.standard_normal(dim) / np.sqrt(dim) for a, vs in ATTRIBUTES.items() for v in vs}
    images, feats = [], np.empty((sum(sizes), dim), dtype=np.float32)
    splits = [s for s, n in zip(SPLITS, sizes) for _ in range(n)]
    for i, split in enumerate(splits):
        attrs = {a: vs[rng.integers(len(vs))] for a, vs in ATTRIBUTES.items()}
        feats[i] = sum(directions[a, v] for a, v in attrs.items()) + 0.5 * rng.standard_normal(dim) / np.sqrt(dim)
        images.append({'split': split, 'file': f'synth_{i:06d}.png', 'attributes': attrs,
                       'captions': [synthetic_caption(rng, attrs) for _ in range(CAPS_PER_IMAGE)]})
    return images, feats


# What the words look like: RGB colours, backgrounds, shape radii and centres on a 64-pixel canvas.
PICTURE_SIZE = 64
RGB = {'red': (220, 30, 30), 'green': (30, 160, 50), 'blue': (40, 70, 220), 'yellow': (250, 220, 30),
       'purple': (140, 40, 170), 'orange': (250, 140, 20), 'black': (15, 15, 15), 'white': (250, 250, 250),
       'pink': (250, 150, 190), 'brown': (120, 70, 30)}
BACKGROUNDS = {'gray': (150, 150, 150), 'sand': (225, 200, 150), 'sky': (150, 200, 245),
               'grass': (110, 180, 90), 'night': (20, 25, 70), 'snow': (235, 240, 250)}
RADII = {'small': 8, 'medium': 13, 'big': 19}
CENTRES = {'left': (20, 32), 'right': (44, 32), 'top': (32, 20), 'bottom': (32, 44), 'middle': (32, 32)}


def draw_synthetic(attrs):
    """The picture a synthetic image's captions describe: one shape on a plain background.
    A function of the attributes alone, so the same attributes always give the same pixels."""
    from PIL import Image, ImageDraw
    picture = Image.new('RGB', (PICTURE_SIZE, PICTURE_SIZE), BACKGROUNDS[attrs['background']])
    draw = ImageDraw.Draw(picture)
    (x, y), r = CENTRES[attrs['place']], RADII[attrs['size']]
    fill = RGB[attrs['color']]
    edge = (128, 128, 128) if attrs['color'] in ('black', 'white') else (0, 0, 0)  # visible on night and snow
    box = [x - r, y - r, x + r, y + r]
    shape = attrs['shape']
    if shape == 'circle':
        draw.ellipse(box, fill=fill, outline=edge)
    elif shape == 'ring':
        draw.ellipse(box, outline=fill, width=max(3, r // 3))
    elif shape == 'square':
        draw.rectangle([x - 0.8 * r, y - 0.8 * r, x + 0.8 * r, y + 0.8 * r], fill=fill, outline=edge)
    elif shape == 'bar':
        draw.rectangle([x - r, y - r / 3, x + r, y + r / 3], fill=fill, outline=edge)
    elif shape == 'cross':
        t = r / 3
        draw.polygon([(x - t, y - r), (x + t, y - r), (x + t, y - t), (x + r, y - t), (x + r, y + t), (x + t, y + t),
                      (x + t, y + r), (x - t, y + r), (x - t, y + t), (x - r, y + t), (x - r, y - t), (x - t, y - t)],
                     fill=fill, outline=edge)
    else:  # triangle, diamond, star: regular polygons around the centre
        corners = {'triangle': 3, 'diamond': 4, 'star': 10}[shape]
        radius = [r, 0.45 * r] if shape == 'star' else [r]
        draw.polygon([(x + radius[n % len(radius)] * np.sin(2 * np.pi * n / corners),
                       y - radius[n % len(radius)] * np.cos(2 * np.pi * n / corners)) for n in range(corners)],
                     fill=fill, outline=edge)
    return picture


def write_synthetic_pictures(images, folder):
    """All pictures into `folder`, written beside it first and renamed at the end, so that a
    folder of that name is always complete."""
    tmp = folder + '.tmp'
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    for im in images:
        draw_synthetic(im['attributes']).save(os.path.join(tmp, im['file']), compress_level=1)
    if os.path.exists(folder):
        shutil.rmtree(folder)  # only reached with --force
    os.replace(tmp, folder)


def to_karpathy_json(images, name):
    return {'dataset': name, 'images': [
        {'filename': im['file'], 'split': im['split'], 'imgid': i, **({'attributes': im['attributes']} if 'attributes' in im else {}),
         'sentences': [{'raw': ' '.join(w), 'tokens': w} for w in im['captions']]} for i, im in enumerate(images)]}


# ----------------------------------------------------------------------------- main

def main(argv):
    globals().update(parse_config({k: globals()[k] for k in CONFIG_KEYS}, argv))
    out_dir = data_dir or os.path.join('data', dataset)
    if os.path.exists(os.path.join(out_dir, 'meta.json')) and not force:
        raise UserError(f"{out_dir}: already prepared (meta.json exists); pass --force=True to prepare it again")
    os.makedirs(out_dir, exist_ok=True)

    if dataset == 'synthetic':
        try:
            sizes = [int(x) for x in synthetic_sizes.split(',')]
            assert len(sizes) == 3 and min(sizes) > 0
        except (ValueError, AssertionError):
            raise UserError(f"--synthetic_sizes={synthetic_sizes}: expected three positive counts, train,val,test") from None
        images, feats = make_synthetic(sizes, synthetic_dim, np.random.default_rng(seed))
        write_json(os.path.join(out_dir, 'dataset.json'), to_karpathy_json(images, 'synthetic'))
        write_synthetic_pictures(images, os.path.join(out_dir, 'images'))
        # images_dir is relative to data_dir; the features are not computed from these pixels
        meta = {'dataset': 'synthetic', 'source': f'synthetic (seed {seed})', 'images_dir': 'images'}
    else:
        json_path = dataset_json or os.path.join(out_dir, 'dataset.json')
        if not os.path.exists(json_path):
            raise UserError(f"{json_path}: not found; put Karpathy's dataset_{dataset}.json there "
                            "(from the Karpathy split zips, e.g. caption_datasets.zip) or pass --dataset_json=PATH")
        images = read_karpathy_json(json_path)
        mat_path = os.path.join(out_dir, 'vgg_feats.mat')
        if features:
            feats, source = read_npy_features(features, len(images)), features
        elif os.path.exists(mat_path):
            feats, source = read_mat_features(mat_path, len(images)), mat_path
        else:
            raise UserError(f"{out_dir}: no image features; put Karpathy's vgg_feats.mat there or pass --features=PATH.npy")
        meta = {'dataset': dataset, 'source': source, 'dataset_json': json_path}
    meta = write_prepared(out_dir, images, feats, meta)
    counts = ', '.join(f"{s} {v['images']} images / {v['captions']} captions" for s, v in meta['splits'].items())
    print(f"prepared {out_dir}: {counts}; {meta['feature_dim']}-d features; vocabulary {meta['vocab_size']} words")


if __name__ == '__main__':
    run_main(main)
