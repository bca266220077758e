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
            try:
                ' '.join(words).encode('utf-8')
            except UnicodeEncodeError as e:  # e.g. a lone surrogate escaped as \udc80 in the json
                raise UserError(f"{where} ({entry.get('filename')}): a caption that is not valid Unicode text "
                                f"({e.reason}); fix it in the json") from None
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
    with np.errstate(over='ignore'):
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
    if not np.isfinite(norms).all():
        raise UserError(f"{source}: image {int((~np.isfinite(norms[:, 0])).argmax())}: values so large that the vector's "
                        "length overflows float32; scale the features down")
    if (norms == 0).any():
        raise UserError(f"{source}: image {int((norms[:, 0] == 0).argmax())} has an all-zero feature vector; regenerate the features")
    return feats / norms


def build_vocab(captions, threshold):
    """word -> id from the TRAIN captions only: 0 pads, 1 is <unk>, then by frequency."""
    counts = collections.Counter(w for words in captions for w in words)
    kept = sorted((w for w, c in counts.items() if c >= threshold), key=lambda w: (-counts[w], w))
    return {PAD: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(kept)}}


def write_prepared(out_dir, images, feats, meta):
    """Write the split arrays, vocab.json and meta.json into a staging folder, then move them into
    out_dir, meta.json last (its presence marks a complete dataset). A failure while writing (a
    full disk, a bad input) leaves a previously prepared dataset in out_dir as it was."""
    feats = normalize_rows(feats, meta['source'])
    staging = os.path.join(out_dir, '.prep-staging')
    shutil.rmtree(staging, ignore_errors=True)  # what a killed run left
    try:
        meta = write_staged(staging, images, feats, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path):
        os.remove(meta_path)  # only reached with --force: the dataset is incomplete until the end
    for name in sorted(os.listdir(staging), key=lambda name: name == 'meta.json'):
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)
    return meta


def write_staged(staging, images, feats, meta):
    meta['splits'] = {}
    for split in SPLITS:
        rows = [i for i, im in enumerate(images) if im['split'] == split]
        if not rows:
            raise UserError(f"{meta['source']}: no images in split {split!r}; every dataset needs train, val and test")
        ims_path, caps_path = split_paths(staging, split)
        with atomic_open(ims_path) as f:
            np.save(f, feats[rows])
        with atomic_open(caps_path, 'w') as f:
            f.writelines(' '.join(words) + '\n' for i in rows for words in images[i]['captions'])
        with atomic_open(os.path.join(staging, f'{split}_files.txt'), 'w') as f:
            f.writelines(images[i]['file'] + '\n' for i in rows)
        meta['splits'][split] = {'images': len(rows), 'captions': CAPS_PER_IMAGE * len(rows)}
    vocab = build_vocab([w for im in images if im['split'] == 'train' for w in im['captions']], vocab_threshold)
    write_json(os.path.join(staging, 'vocab.json'), vocab)
    meta.update(feature_dim=int(feats.shape[1]), caps_per_image=CAPS_PER_IMAGE, vocab_size=len(vocab),
                vocab_threshold=vocab_threshold, max_len=max_len)
    write_json(os.path.join(staging, 'meta.json'), meta)
    return meta


def lock_dataset(folder):
    """Only one prep.py writes a dataset at a time: a second one stops at once instead of mixing
    its files with the first one's. The lock lasts as long as the returned file stays open."""
    path = os.path.join(folder, '.prep.lock')
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one prep.py at a time is then up to the user
        return None
    try:
        f = open(path, 'a')
    except OSError as e:
        raise UserError(f"{path}: cannot create the lock file ({e.strerror}); check the folder's permissions") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"{folder}: another prep.py is writing this dataset right now ({path} is locked); "
                        "wait for it to finish, or use another --data_dir") from None
    return f


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


def to_karpathy_json(images, name):
    return {'dataset': name, 'images': [
        {'filename': im['file'], 'split': im['split'], 'imgid': i, **({'attributes': im['attributes']} if 'attributes' in im else {}),
         'sentences': [{'raw': ' '.join(w), 'tokens': w} for w in im['captions']]} for i, im in enumerate(images)]}


# ----------------------------------------------------------------------------- main

def main(argv):
    globals().update(parse_config({k: globals()[k] for k in CONFIG_KEYS}, argv))
    out_dir = data_dir or os.path.join('data', dataset)
    os.makedirs(out_dir, exist_ok=True)
    lock = lock_dataset(out_dir)  # noqa: F841 (held until main returns)
    if os.path.exists(os.path.join(out_dir, 'meta.json')) and not force:
        raise UserError(f"{out_dir}: already prepared (meta.json exists); pass --force=True to prepare it again")

    if dataset == 'synthetic':
        try:
            sizes = [int(x) for x in synthetic_sizes.split(',')]
            assert len(sizes) == 3 and min(sizes) > 0
        except (ValueError, AssertionError):
            raise UserError(f"--synthetic_sizes={synthetic_sizes}: expected three positive counts, train,val,test") from None
        images, feats = make_synthetic(sizes, synthetic_dim, np.random.default_rng(seed))
        write_json(os.path.join(out_dir, 'dataset.json'), to_karpathy_json(images, 'synthetic'))
        meta = {'dataset': 'synthetic', 'source': f'synthetic (seed {seed})'}
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
