"""Prepare a dataset once into the arrays that train.py and eval.py read.

    python prep.py                                          # Flickr8k: download, VGG16 features, arrays
    python prep.py --dataset=flickr30k                      # likewise Flickr30k, and COCO (docs/datasets.md)
    python prep.py --dataset=coco --images_dir=/data/coco --dataset_json=dataset_coco.json
    python prep.py --dataset=coco --features=feats.npy      # your own (N, D) features, or (N, C, D): C crops per image
    python prep.py --crops=10 --keep_crops=True             # every crop's features, (N, 10, D): one drawn per training step
    python prep.py --cnn=efficientnet_lite0 --grid=True     # the CNN's last feature map, (N, 49, 1280): train.py pools it
    python prep.py --dataset=synthetic                      # offline, seconds; for trying things out

Features come from, in order: --features=PATH.npy; Karpathy's vgg_feats.mat in data_dir; else
they are extracted from the images (--cnn, --crops, --weights) into data_dir/features_*.npy,
batch by batch, so that an interrupted run continues where it stopped.

Writes into data_dir, for each split (train, val, test): <split>_ims.npy (float32, rows
L2-normalized; with kept crops (N, C, D), each crop L2-normalized; with --grid=True (N, K, D)
float16, each grid vector L2-normalized), <split>_caps.txt (5 captions
per image, image i owns lines 5i..5i+4), <split>_files.txt (image file names); then vocab.json
(train captions only) and meta.json, last, so that a dataset with a meta.json is complete.
"""
import collections
import json
import os
import re
import shutil
import unicodedata
import urllib.parse

import numpy as np
import torch

from download import SOURCES, fetch, images_there
from features import (CNN_DIMS, CNN_GRID_DIMS, DECODERS, build_backbone, check_cnn, default_batch_size, extract_dataset,
                      extract_features, resolve_decode, resolve_dtype, setup_ranks, wait_for_all_ranks)
from options import DEVICE, DTYPES, FOLDER, SEED, at_least, one_of, parse_config, pick_device, run_main
from utils import (CAPS_PER_IMAGE, PAD, UNK, FolderLock, UserError, atomic_open, check_real_numbers, normalize_grid,
                   read_json, split_paths, tokenize, write_json)

# ----------------------------------------------------------------------------- config
dataset = 'flickr8k'      # flickr8k | flickr30k | coco | synthetic | any name with a dataset.json
data_dir = ''             # default: data/<dataset>
dataset_json = ''         # Karpathy-format json; default: <data_dir>/dataset.json
features = ''             # an (N, D) .npy in dataset.json image order, or (N, C, D) with C crops each: used instead of vgg_feats.mat
images_dir = ''           # default: data_dir/Flicker8k_Dataset (flickr8k), flickr30k-images, data_dir (coco), images
mirror = ''               # flickr8k, flickr30k, coco: fetch every file by its name from this base URL instead of its source
cnn = 'vgg16'             # feature extractor: vgg16 | vgg19 | resnet152 | efficientnet_lite0 (pip extra)
crops = 1                 # 1: resize 256, center crop 224; 10: mean over the 10 crops (the paper's)
keep_crops = False        # with 10 crops (or --features of an (N, C, D) array): store every crop's features, (N, C, D), not their mean
grid = False              # keep the CNN's last feature map as K vectors per image, (N, K, D) float16, for train.py's --pooling (one crop); or --features' (N, K, D) array read as such
weights = 'imagenet'      # imagenet (downloaded and cached by torchvision) | PATH to a state_dict | random (tests only)
batch_size = 0            # images per forward pass; 0: 256 on CUDA, 16 otherwise
workers = min(8, os.cpu_count() or 1)  # processes reading (and with pil decoding) images alongside the network, at most one per core
decode = 'auto'           # pil: PIL in the workers | torch: decode_jpeg on the device (nvjpeg on CUDA) | auto: torch on CUDA
dtype = 'auto'            # float32 | bfloat16 (autocast, channels_last) | auto: bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16
device = 'auto'           # for the feature extraction: auto = cuda, then mps, then cpu
skip_bad = False          # drop images that cannot be read (and their captions) instead of stopping
vocab_threshold = 4       # words seen fewer times in the train captions become <unk> (VSE++ uses 4)
max_len = 100             # a caption longer than this many tokens is an error, not silently cut
force = False             # overwrite a prepared dataset
# synthetic only
synthetic_sizes = '5000,1000,1000'   # train, val, test images
synthetic_dim = 4096      # feature dimension, like VGG fc7
seed = 1234               # the synthetic set's attributes, captions and features
CONFIG_KEYS = [k for k, v in globals().items() if k.islower() and not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# What each option must be, checked before any work (options.check_options); a vocab_threshold that
# leaves no word is found once the captions are read, before the features.
OPTION_RULES = {
    'dataset': (lambda v: v != '', 'a name: flickr8k, flickr30k, coco, synthetic or your own'),
    'data_dir': FOLDER,
    'dataset_json': (lambda v: v == '' or os.path.isfile(v), "'' or an existing file"),
    'features': (lambda v: v == '' or (v.endswith('.npy') and os.path.isfile(v)), "'' or an existing .npy file"),
    'images_dir': (lambda v: v == '' or os.path.isdir(v), "'' or an existing folder"),
    'mirror': (lambda v: v == '' or urllib.parse.urlsplit(v).scheme in ('http', 'https', 'ftp', 'file'),
               "'' or a URL with its scheme, like https://host/path/"),
    'cnn': one_of(*CNN_DIMS),
    'crops': one_of(1, 10),
    'weights': (lambda v: v in ('imagenet', 'random') or os.path.isfile(v), 'imagenet, random or the path of a state_dict file'),
    'batch_size': at_least(0),
    'workers': at_least(0),
    'decode': one_of(*DECODERS),
    'dtype': one_of(*DTYPES),
    'device': DEVICE,
    'vocab_threshold': at_least(1),
    'max_len': at_least(1),
    'synthetic_sizes': (lambda v: re.fullmatch(r'0*[1-9]\d*,0*[1-9]\d*,0*[1-9]\d*', v) is not None,
                        'three positive counts, train,val,test'),
    'synthetic_dim': at_least(1),
    'seed': SEED,
}
# -----------------------------------------------------------------------------

SPLITS = ('train', 'val', 'test')
LOCK_NAME = '.prep.lock'
OUTPUTS = [f'{split}_{kind}' for split in SPLITS for kind in ('ims.npy', 'caps.txt', 'files.txt')] + ['vocab.json']


def read_karpathy_json(path, max_len):
    """Karpathy's dataset_*.json -> list of {'split', 'file', 'captions': [5 token lists]}.
    restval goes to train (as in VSE++ and every COCO paper since); the first 5 captions kept."""
    data = read_json(path, 'dataset json (Karpathy format)')
    if not isinstance(data, dict) or not isinstance(data.get('images'), list) or not data['images']:
        raise UserError(f"{path}: expected Karpathy's format, an object with a non-empty 'images' list")
    images, first_entry = [], {}
    for n, entry in enumerate(data['images']):
        image = read_image_entry(entry, f"{path}: image {n}", max_len)
        if image['file'] in first_entry:  # it could sit in two splits: a test image trained on
            raise UserError(f"{path}: images {first_entry[image['file']]} and {n} are both {image['file']}; "
                            "an image may be listed once: remove or rename one of them")
        first_entry[image['file']] = n
        images.append(image)
    return images


def read_image_entry(entry, where, max_len):
    """One image of the json -> {'split', 'file', 'captions'}, every field checked for its type."""
    if not isinstance(entry, dict) or 'split' not in entry or 'sentences' not in entry:
        raise UserError(f"{where}: needs 'split' and 'sentences' (Karpathy's format)")
    filename, filepath = entry.get('filename'), entry.get('filepath', '')
    if not isinstance(filename, str) or not filename.strip() or not isinstance(filepath, str):
        field, value = ('filepath', filepath) if isinstance(filename, str) and filename.strip() else ('filename', filename)
        raise UserError(f"{where}: its '{field}' is {json.dumps(value)}; expected a file name (a string)")
    where = f"{where} ({filename})"
    split = 'train' if entry['split'] == 'restval' else entry['split']
    if split not in SPLITS:
        raise UserError(f"{where}: unknown split {entry['split']!r} (expected train, restval, val or test)")
    sentences = entry['sentences']
    if not isinstance(sentences, list):
        raise UserError(f"{where}: 'sentences' is {json.dumps(sentences)[:40]}; expected a list of captions")
    if len(sentences) < CAPS_PER_IMAGE:
        raise UserError(f"{where}: {len(sentences)} captions; every image needs at least {CAPS_PER_IMAGE}")
    return {'split': split, 'file': os.path.join(filepath, filename),
            'captions': [read_caption(s, where, max_len) for s in sentences[:CAPS_PER_IMAGE]]}


def read_caption(sentence, where, max_len):
    """A sentence of the json -> its words: its 'tokens' lowercased (NFC, as utils.tokenize
    reads a query), else its 'raw' text tokenized."""
    if isinstance(sentence, dict) and isinstance(sentence.get('tokens'), list):
        not_text = [t for t in sentence['tokens'] if not isinstance(t, str)]
        if not_text:
            raise UserError(f"{where}: a caption's 'tokens' holds {json.dumps(not_text[0])}; tokens are strings")
        words = unicodedata.normalize('NFC', ' '.join(sentence['tokens'])).lower().split()
    elif isinstance(sentence, dict) and isinstance(sentence.get('raw'), str):
        words = tokenize(sentence['raw'])
    else:
        raise UserError(f"{where}: a sentence without 'tokens' (a list of strings) or 'raw' (a string)")
    if not words:
        raise UserError(f"{where}: empty caption; fix or remove it in the json")
    try:
        ' '.join(words).encode('utf-8')
    except UnicodeEncodeError as e:  # e.g. a lone surrogate escaped as \udc80 in the json
        raise UserError(f"{where}: a caption that is not valid Unicode text ({e.reason}); fix it in the json") from None
    if len(words) > max_len:
        raise UserError(f"{where}: a caption of {len(words)} tokens (more than --max_len={max_len}); "
                        "fix it or raise --max_len")
    return words


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
    check_real_numbers(mat['feats'], f"{path}: 'feats'", "it must be a numeric matrix, D x images")
    feats = np.asarray(mat['feats'], dtype=np.float32)
    if feats.ndim != 2 or feats.shape[1] != n_images:
        raise UserError(f"{path}: 'feats' is {'x'.join(map(str, feats.shape))} but the dataset json has "
                        f"{n_images} images (expected D x {n_images}); the two files do not belong together")
    return np.ascontiguousarray(feats.T)


def read_npy_features(cfg, path, n_images):
    """--features: (N, D), or (N, C, D) for C crops per image (as many as --crops, if given);
    with --grid=True (N, K, D), K grid vectors per image, kept as they are (memory-mapped:
    normalize_grid reads them in blocks)."""
    try:
        feats = np.load(path, mmap_mode='r', allow_pickle=False)
    except (OSError, ValueError) as e:
        why = str(e).splitlines()[0][:150] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable .npy file ({why}); save the (N, D) features again with numpy.save "
                        "as an array of numbers") from None
    check_real_numbers(feats, path, "save the (N, D) features with numpy.save")
    if feats.ndim not in (2, 3) or feats.shape[0] != n_images:
        raise UserError(f"{path}: shape {feats.shape}, expected ({n_images}, D): one row per image of the dataset json, "
                        f"in order (or ({n_images}, C, D): C crops per image)")
    if cfg.grid and (feats.ndim != 3 or feats.shape[1] < 1 or feats.shape[2] < 1):
        raise UserError(f"{path}: shape {feats.shape}, but --grid=True reads grid vectors: expected ({n_images}, K, D), "
                        "K vectors of D values per image; leave --grid out for one feature per image")
    if cfg.grid:
        return feats
    if feats.ndim == 3 and feats.shape[1] < 1:
        raise UserError(f"{path}: shape {feats.shape}: no crops per image; expected ({n_images}, C, D) with C at least 1")
    if feats.ndim == 3 and 'crops' in cfg.given and feats.shape[1] != cfg.crops:
        raise UserError(f"{path}: {feats.shape[1]} crops per image (shape {feats.shape}), but --crops={cfg.crops}; "
                        f"pass --crops={feats.shape[1]} or leave --crops out")
    return np.asarray(feats, dtype=np.float32)


def npy_crops(cfg, feats, meta):
    """--features as they are prepared: (N, D) as they are; (N, C, D) kept with --keep_crops,
    else each image's mean crop (as --crops=10 makes it); with --grid=True (N, K, D) grid vectors
    as they are. Returns (features, meta)."""
    if cfg.grid:
        return feats, {**meta, 'grid': True, 'grid_size': int(feats.shape[1])}
    if feats.ndim == 2:
        if cfg.keep_crops:
            raise UserError(f"--keep_crops=True: {cfg.features} holds one feature per image, shape {feats.shape}; "
                            "keeping crops needs an (N, C, D) array of C crops per image")
        return feats, meta
    n_crops = feats.shape[1]
    if cfg.keep_crops and n_crops == 1:
        raise UserError(f"--keep_crops=True: {cfg.features} holds one crop per image, shape {feats.shape}, nothing to keep apart; "
                        "leave --keep_crops out")
    if not cfg.keep_crops:
        print(f"{cfg.features}: {n_crops} crops per image, prepared as their mean (--keep_crops=True keeps each)")
        return feats.mean(1), {**meta, 'crops': n_crops}
    return feats, {**meta, 'crops': n_crops, 'kept_crops': True}


def check_keep_crops(cfg):
    """--keep_crops=True needs more than one crop per image, said before any work (an (N, C, D)
    --features array is checked once it is read, npy_crops)."""
    if cfg.keep_crops and cfg.dataset == 'synthetic':
        raise UserError("--keep_crops=True: the synthetic set has one feature per image, no crops; leave it out")
    if cfg.keep_crops and cfg.crops == 1 and not cfg.features:
        raise UserError("--keep_crops=True: --crops=1 is one crop per image, nothing to keep apart; pass --crops=10 "
                        "(or --features= of an (N, C, D) array)")


def check_grid(cfg):
    """--grid=True: the grid of one crop, from a CNN or an (N, K, D) --features array, said before
    any work. Kept crops are C views of an image, one drawn per step; grid vectors are the parts
    of one view, all pooled together: a dataset is one or the other."""
    if not cfg.grid:
        return
    if cfg.keep_crops:
        raise UserError("--grid=True with --keep_crops=True: kept crops are not grid vectors (a step draws one crop; "
                        "the model pools all the grid vectors); give one of the two")
    if cfg.crops != 1:
        raise UserError(f"--grid=True with --crops={cfg.crops}: the grid is the feature map of the center crop; "
                        "leave --crops out (or --crops=1)")
    if cfg.dataset == 'synthetic':
        raise UserError("--grid=True: the synthetic set has one feature per image, no grid; leave it out")


def normalize_rows(feats, source):
    """Each feature vector (each crop's, of (N, C, D) kept crops) to unit length; a NaN, an inf,
    an overflow or a zero vector is an error that names the image."""
    feats = np.asarray(feats, dtype=np.float32)
    def images_where(mask):  # (N,) or (N, C) per vector -> (N,) per image
        return mask.reshape(len(mask), -1).any(1)
    bad = images_where(~np.isfinite(feats).all(-1))
    if bad.any():
        raise UserError(f"{source}: {int(bad.sum())} rows hold NaN or inf (first: image {int(bad.argmax())}); regenerate the features")
    with np.errstate(over='ignore'):
        norms = np.linalg.norm(feats, axis=-1, keepdims=True)
    if images_where(~np.isfinite(norms)).any():
        raise UserError(f"{source}: image {int(images_where(~np.isfinite(norms)).argmax())}: values so large that the "
                        "vector's length overflows float32; scale the features down")
    peaks = np.abs(feats).max(-1, keepdims=True)
    if (peaks == 0).any():
        raise UserError(f"{source}: image {int(images_where(peaks == 0).argmax())} has an all-zero feature vector; regenerate the features")
    tiny = norms[..., 0] < 1e-18   # its squares underflow float32: scaled to its largest value first
    if tiny.any():
        feats = np.array(feats)   # a private copy: the input may be a read-only memory map
        feats[tiny] /= peaks[tiny]
        norms[tiny] = np.linalg.norm(feats[tiny], axis=-1, keepdims=True)
    return feats / norms


def build_vocab(captions, threshold):
    """word -> id from the TRAIN captions only: 0 pads, 1 is <unk>, then by frequency."""
    counts = collections.Counter(w for words in captions for w in words)
    kept = sorted((w for w, c in counts.items() if c >= threshold), key=lambda w: (-counts[w], w))
    return {PAD: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(kept)}}


def check_vocabulary(cfg, images, source):
    """--vocab_threshold leaves at least one word of the train captions, said before the features are made."""
    counts = collections.Counter(w for im in images if im['split'] == 'train' for words in im['captions'] for w in words)
    if counts and max(counts.values()) < cfg.vocab_threshold:
        word, count = counts.most_common(1)[0]
        raise UserError(f"--vocab_threshold={cfg.vocab_threshold}: no word of the train captions of {source} occurs that "
                        f"often (the most frequent, {word!r}, {count} times), so every word would be {UNK}; lower it")


def write_prepared(cfg, out_dir, images, feats, meta):
    """Write everything (the synthetic set's dataset.json and pictures too) into a staging folder,
    then move it into out_dir, meta.json last (its presence marks a complete dataset). A failure
    or a kill while writing (a full disk, a bad input, Ctrl-C) leaves a previously prepared
    dataset in out_dir as it was."""
    feats = normalize_grid(feats, meta['source']) if meta.get('grid') else normalize_rows(feats, meta['source'])
    staging = os.path.join(out_dir, '.prep-staging')
    shutil.rmtree(staging, ignore_errors=True)  # what a killed run left
    try:
        meta = write_staged(cfg, staging, images, feats, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, out_dir)
    return meta


def swap_in(staging, out_dir):
    """Move the staged files over the old ones, meta.json last. An old folder (the synthetic
    set's images/) cannot be renamed over: it is moved into the staging folder, deleted with it."""
    replaced = os.path.join(staging, '.replaced')
    os.makedirs(replaced)
    meta_path = os.path.join(out_dir, 'meta.json')
    if os.path.exists(meta_path):  # only reached with --force: the dataset is incomplete until the end
        os.replace(meta_path, os.path.join(replaced, 'meta.json'))
    for name in sorted(set(os.listdir(staging)) - {'.replaced'}, key=lambda name: name == 'meta.json'):
        target = os.path.join(out_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            os.replace(target, os.path.join(replaced, name))
        os.replace(os.path.join(staging, name), target)
    shutil.rmtree(staging)


def write_staged(cfg, staging, images, feats, meta):
    os.makedirs(staging)
    if meta['dataset'] == 'synthetic':
        write_json(os.path.join(staging, 'dataset.json'), to_karpathy_json(images, 'synthetic'))
        write_synthetic_pictures(images, os.path.join(staging, 'images'))
    meta['splits'] = {}
    split_source = meta.get('dataset_json', meta['source'])  # the file that assigns images to splits
    for split in SPLITS:
        rows = [i for i, im in enumerate(images) if im['split'] == split]
        if not rows and split == 'test':  # a test set held back (as ../shared's Flickr8k): train and val suffice
            print(f"note: {split_source} has no test images; preparing train and val only")
            continue
        if not rows:
            raise UserError(f"{split_source}: no images in split {split!r}; every dataset needs train and val")
        ims_path, caps_path = split_paths(staging, split)
        with atomic_open(ims_path) as f:
            np.save(f, feats[rows])
        with atomic_open(caps_path, 'w') as f:
            f.writelines(' '.join(words) + '\n' for i in rows for words in images[i]['captions'])
        with atomic_open(os.path.join(staging, f'{split}_files.txt'), 'w') as f:
            f.writelines(images[i]['file'] + '\n' for i in rows)
        meta['splits'][split] = {'images': len(rows), 'captions': CAPS_PER_IMAGE * len(rows)}
    vocab = build_vocab([w for im in images if im['split'] == 'train' for w in im['captions']], cfg.vocab_threshold)
    write_json(os.path.join(staging, 'vocab.json'), vocab)
    meta.update(feature_dim=int(feats.shape[-1]), caps_per_image=CAPS_PER_IMAGE, vocab_size=len(vocab),
                vocab_threshold=cfg.vocab_threshold, max_len=cfg.max_len, options=recorded_options(cfg))
    write_json(os.path.join(staging, 'meta.json'), meta)
    return meta


def recorded_options(cfg):
    """The options meta.json records: those that decide what prep.py writes. --grid only when
    given: a dataset prepared before it existed is still 'prepared with these options'."""
    return {k: getattr(cfg, k) for k in CONFIG_KEYS
            if k not in ('force', 'device', 'workers', 'batch_size') and not (k == 'grid' and not cfg.grid)}


def prepared_with(out_dir):
    """The options a complete prepared dataset in out_dir was made with; None if there is none."""
    path = os.path.join(out_dir, 'meta.json')
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f).get('options')
    except (OSError, ValueError, AttributeError):
        return None


def refuse_to_overwrite(cfg, out_dir):
    """prep.py replaces only a dataset it prepared itself (one with a meta.json), and that only
    with --force=True; files it would write that are there without a meta.json are someone
    else's (or a killed run's) and are replaced only with --force=True too."""
    if os.path.exists(os.path.join(out_dir, 'meta.json')) and not cfg.force:
        raise UserError(f"{out_dir}: already prepared, with other options (meta.json's 'options'); pass --force=True "
                        "to prepare it again with these, or choose another --data_dir")
    ours = OUTPUTS + (['dataset.json', 'images'] if cfg.dataset == 'synthetic' else [])
    found = [name for name in ours if os.path.lexists(os.path.join(out_dir, name))]
    if found and not cfg.force and not os.path.exists(os.path.join(out_dir, 'meta.json')):
        raise UserError(f"{out_dir}: holds {', '.join(found)} but no meta.json, so prep.py did not prepare them; "
                        "prepare into another --data_dir, or pass --force=True to replace them")


def lock_dataset(folder):
    """Only one prep.py writes a dataset at a time (utils.FolderLock)."""
    return FolderLock(folder, LOCK_NAME, 'prep.py', 'dataset')


# ----------------------------------------------------------------------------- features from images
WHERE_IMAGES = {  # what a user puts where, and where it is published
    'flickr8k': ('Flicker8k_Dataset', "Flickr8k's images (Flickr8k_Dataset.zip; python prep.py fetches it)"),
    'flickr30k': ('flickr30k-images', "Flickr30k's images (flickr30k-images/, from the form at https://shannon.cs.illinois.edu/DenotationGraph/)"),
    'coco': ('', "COCO 2014's train2014/ and val2014/ folders (https://cocodataset.org/#download: 2014 Train and Val images)"),
}


def find_images(cfg, images, out_dir):
    """The folder that holds the dataset json's images, or a UserError that says what to put
    where when none or (without --skip_bad) some of them are missing."""
    folder, what = WHERE_IMAGES.get(cfg.dataset, ('images', 'the images named in the dataset json'))
    folder = cfg.images_dir or os.path.join(out_dir, folder)
    paths = [os.path.join(folder, im['file']) for im in images]
    missing = [p for p in paths if not os.path.exists(p)]
    if not os.path.isdir(folder) or len(missing) == len(paths):
        raise UserError(f"{folder}: none of the {len(paths)} images of the dataset json are there (e.g. {missing[0]}); "
                        f"put {what} there or pass --images_dir=FOLDER; or give features: Karpathy's vgg_feats.mat "
                        f"in {out_dir}, or --features=PATH.npy")
    if missing and not cfg.skip_bad:
        raise UserError(f"{folder}: {len(missing)} of {len(paths)} images are missing ({', '.join(missing[:5])}"
                        f"{', ...' if len(missing) > 5 else ''}); put them there, or pass --skip_bad=True to drop them and their captions")
    return folder


def image_features(cfg, images, out_dir, rank=0, world=1):
    """Extract features of every image of the dataset json into out_dir/features_<cnn>_<crops>crop.npy,
    resuming a run that was interrupted. Returns (features, bad, extraction): bad lists (index,
    path, reason); extraction is what meta.json records of it. Under torchrun each rank fills
    its own shard of rows and only rank 0 returns the result."""
    folder = find_images(cfg, images, out_dir)
    dev = pick_device(cfg.device)
    if dev.type == 'cuda' and world > 1:
        dev = torch.device('cuda', int(os.environ['LOCAL_RANK']))
    decoder, precision = resolve_decode(cfg.decode, dev), resolve_dtype(cfg.dtype, dev, cfg.cnn)
    kind = '_kept' if cfg.keep_crops else '_grid' if cfg.grid else ''
    feats_path = os.path.join(out_dir, f"features_{cfg.cnn}_{cfg.crops}crop{kind}.npy")
    feats, bad = extract_dataset(folder, [im['file'] for im in images], feats_path, cnn=cfg.cnn, crops=cfg.crops, weights=cfg.weights,
                                 decode=decoder, dtype=precision, batch_size=cfg.batch_size or default_batch_size(dev),
                                 workers=cfg.workers, device=dev, rank=rank, world=world, keep_crops=cfg.keep_crops,
                                 grid=cfg.grid)
    if rank != 0:
        return None, None, None
    if bad and not cfg.skip_bad:
        listed = '; '.join(f"{p} ({reason})" for _, p, reason in bad[:10]) + ('; ...' if len(bad) > 10 else '')
        raise UserError(f"{folder}: {len(bad)} images cannot be read: {listed}; replace them, or pass "
                        "--skip_bad=True to drop them and their captions (the other features are kept)")
    return feats, bad, {'features_file': feats_path, 'images_dir': folder, 'decode': decoder, 'dtype': precision}


def features_network(cfg, images, feats, crops, out_dir, checked=8):
    """--features= with --cnn= (and --images_dir=): what meta.json records of the network that
    made the given features from the dataset's photos, so that eval.py --image, --gallery and
    fine-tuning can use them. Checked first on a few photos: the network's features of each must
    point where its given row does (cosine 0.9 or more: a photo saved again as JPEG moves them a
    little, to 0.93-0.98 for Lite0 on Flickr8k, while another photo's row is near 0.3-0.5), and
    nearer its own row than any other photo's."""
    folder = find_images(cfg, images, out_dir)
    dev = pick_device(cfg.device)
    decoder, precision = resolve_decode(cfg.decode, dev), resolve_dtype(cfg.dtype, dev, cfg.cnn)
    dims = CNN_GRID_DIMS if cfg.grid else CNN_DIMS
    if feats.shape[-1] != dims[cfg.cnn]:
        raise UserError(f"--features={cfg.features}: {feats.shape[-1]}-d features, but --cnn={cfg.cnn} gives "
                        f"{dims[cfg.cnn]}-d ones{' (its grid)' if cfg.grid else ''}; give the --cnn that made them, or leave --cnn out")
    rows = np.unique(np.linspace(0, len(images) - 1, checked).round().astype(int))
    backbone, _ = build_backbone(cfg.cnn, cfg.weights, dev, precision, grid=cfg.grid)
    made = extract_features(backbone, [os.path.join(folder, images[i]['file']) for i in rows], cfg.cnn, crops, dev,
                            workers=0, progress=False, decode=decoder, dtype=precision, grid=cfg.grid)
    if cfg.grid and made.shape[1:] != feats.shape[1:]:
        raise UserError(f"--features={cfg.features}: {feats.shape[1]} grid vectors per image, but --cnn={cfg.cnn} makes "
                        f"{made.shape[1]}; give the --cnn that made them, or leave --cnn out")
    # a grid is compared whole: its vectors flattened into one
    given = feats[rows].reshape(len(rows), -1) if cfg.grid else feats[rows].mean(1) if feats.ndim == 3 else feats[rows]
    made = made.reshape(len(rows), -1)
    unit = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-30)  # noqa: E731
    pairs = unit(made) @ unit(given).T
    cosines = pairs.diagonal()
    if cosines.min() < 0.9 or (pairs.argmax(1) != np.arange(len(rows))).any():
        worst = int(np.argmin(cosines - (pairs.argmax(1) != np.arange(len(rows)))))
        raise UserError(f"--features={cfg.features}: --cnn={cfg.cnn} with --weights={cfg.weights} and --crops={crops} "
                        f"does not make them from {images[rows[worst]]['file']} (cosine {cosines[worst]:.3f} to the given "
                        "row); give the --cnn, --weights and --crops that made them, or leave --cnn out")
    print(f"{cfg.features}: {cfg.cnn} makes them from the photos in {folder} (cosine at least {cosines.min():.4f} "
          f"on {len(rows)} of them); recorded in meta.json")
    return {'cnn': cfg.cnn, 'crops': crops, 'weights': cfg.weights, 'images_dir': os.path.abspath(folder), 'decode': decoder,
            'dtype': precision}


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
    """All pictures into a new `folder` (in the staging folder: write_prepared moves it in place)."""
    os.makedirs(folder)
    for im in images:
        draw_synthetic(im['attributes']).save(os.path.join(folder, im['file']), compress_level=1)


def to_karpathy_json(images, name):
    return {'dataset': name, 'images': [
        {'filename': im['file'], 'split': im['split'], 'imgid': i, **({'attributes': im['attributes']} if 'attributes' in im else {}),
         'sentences': [{'raw': ' '.join(w), 'tokens': w} for w in im['captions']]} for i, im in enumerate(images)]}


# ----------------------------------------------------------------------------- main

def main(argv):
    cfg = parse_config({k: globals()[k] for k in CONFIG_KEYS}, argv, OPTION_RULES)
    cfg.given = {arg[2:].split('=', 1)[0] for arg in argv if arg.startswith('--')}  # --crops is checked against an (N, C, D) array only if given
    check_grid(cfg)
    check_keep_crops(cfg)
    out_dir = cfg.data_dir or os.path.join('data', cfg.dataset)
    if not cfg.force and prepared_with(out_dir) == recorded_options(cfg):
        print(f"{out_dir}: already prepared with these options; nothing to do (--force=True prepares it again)")
        return
    if not os.path.exists(os.path.join(out_dir, LOCK_NAME)):  # else the lock, below, names a prep.py at work first
        refuse_to_overwrite(cfg, out_dir)  # before the folder and its lock file are made: a refusal changes nothing
    new_folder = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rank, world = setup_ranks()  # under torchrun, only rank 0 downloads and writes; all ranks extract
    if rank != 0:
        return prepare(cfg, out_dir, rank, world)
    try:
        with lock_dataset(out_dir):
            refuse_to_overwrite(cfg, out_dir)  # again under the lock: another prep.py may have finished meanwhile
            prepare(cfg, out_dir, rank, world)
    except BaseException:
        if new_folder and os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)  # a prep that stopped before writing anything leaves no trace
        raise


def prepare(cfg, out_dir, rank, world):
    """The dataset's images, captions and features, written into out_dir."""
    if cfg.dataset == 'synthetic':
        if rank != 0:
            return
        sizes = [int(x) for x in cfg.synthetic_sizes.split(',')]
        images, feats = make_synthetic(sizes, cfg.synthetic_dim, np.random.default_rng(cfg.seed))
        # images_dir is relative to data_dir; the features are not computed from these pixels
        meta = {'dataset': 'synthetic', 'source': f'synthetic (seed {cfg.seed})', 'images_dir': 'images'}
        check_vocabulary(cfg, images, meta['source'])
    else:
        images, feats, meta = dataset_from_files(cfg, out_dir, rank, world)
        if rank != 0:
            return
    meta = write_prepared(cfg, out_dir, images, feats, meta)
    counts = ', '.join(f"{s} {v['images']} images / {v['captions']} captions" for s, v in meta['splits'].items())
    kept = f" ({meta['crops']} crops each, kept)" if meta.get('kept_crops') else ''
    kept = f" ({meta['grid_size']} grid vectors each)" if meta.get('grid') else kept
    print(f"prepared {out_dir}: {counts}; {meta['feature_dim']}-d features{kept}; vocabulary {meta['vocab_size']} words")


def dataset_from_files(cfg, out_dir, rank, world):
    """(images, features, meta) of a dataset json and its features: --features, vgg_feats.mat, or
    extracted from the images; downloaded first where the dataset is one prep.py knows.
    Under torchrun the ranks other than 0 return (None, None, None) once their share is done."""
    check_cnn(cfg.cnn, cfg.crops)
    json_path = cfg.dataset_json or os.path.join(out_dir, 'dataset.json')
    mat_path = os.path.join(out_dir, 'vgg_feats.mat')
    if rank == 0 and cfg.dataset in SOURCES and not cfg.dataset_json and (not os.path.exists(json_path) or (
            not cfg.features and not os.path.exists(mat_path) and not images_there(cfg.dataset, out_dir, cfg.images_dir))):
        fetch(cfg.dataset, out_dir, cfg.mirror)
    wait_for_all_ranks()
    if not os.path.exists(json_path):
        raise UserError(f"{json_path}: not found; put Karpathy's dataset_{cfg.dataset}.json there (from his split file "
                        "caption_datasets.zip, mirrored on Kaggle as 'Karpathy splits') or pass --dataset_json=PATH")
    images = read_karpathy_json(json_path, cfg.max_len)
    check_vocabulary(cfg, images, json_path)
    meta = {'dataset': cfg.dataset, 'dataset_json': json_path}
    if os.path.exists(os.path.join(out_dir, 'download.json')):
        meta['downloads'] = read_json(os.path.join(out_dir, 'download.json'))
    if cfg.keep_crops and not cfg.features and os.path.exists(mat_path):
        raise UserError(f"{mat_path}: Karpathy's features, one per image, come before the images, so --keep_crops=True has "
                        f"no crops to keep; move the file out of {out_dir} to extract the crops from the images")
    if cfg.grid and not cfg.features and os.path.exists(mat_path):
        raise UserError(f"{mat_path}: Karpathy's features, one per image, come before the images, so --grid=True has "
                        f"no grid to keep; move the file out of {out_dir} to extract the grid from the images")
    if rank != 0 and (cfg.features or os.path.exists(mat_path)):
        return None, None, None
    if cfg.features:
        feats, meta = npy_crops(cfg, read_npy_features(cfg, cfg.features, len(images)), {**meta, 'source': cfg.features})
        if 'cnn' in cfg.given:   # which network made them, from which photos: checked, then recorded
            meta.update(features_network(cfg, images, feats, meta.get('crops', cfg.crops), out_dir))
        return images, feats, meta
    if os.path.exists(mat_path):
        return images, read_mat_features(mat_path, len(images)), {**meta, 'source': mat_path}
    feats, bad, extraction = image_features(cfg, images, out_dir, rank, world)
    if rank != 0:
        return None, None, None
    meta.update(extraction, source=extraction['features_file'], cnn=cfg.cnn, crops=cfg.crops, weights=cfg.weights)
    if cfg.keep_crops:
        meta['kept_crops'] = True
    if cfg.grid:
        meta.update(grid=True, grid_size=int(feats.shape[1]))
    if cfg.weights == 'random':
        meta['warning'] = 'features of an untrained network (--weights=random): for tests only'
    if bad:
        meta['skipped_images'] = [{'file': images[i]['file'], 'reason': reason} for i, _, reason in bad]
        dropped = {i for i, _, _ in bad}
        keep = [i for i in range(len(images)) if i not in dropped]
        images, feats = [images[i] for i in keep], feats[keep]
        print(f"skipped {len(bad)} unreadable images and their {CAPS_PER_IMAGE * len(bad)} captions "
              f"(--skip_bad=True; listed in meta.json): " + ', '.join(p for _, p, _ in bad[:10]))
    return images, feats, meta


if __name__ == '__main__':
    run_main(main)
