"""What the scripts (prep.py, train.py, eval.py, bench.py) share: the error users can fix
(UserError), safe file writing and folder locks, the prepared-data format, checkpoints, text and
image encoding with a trained model, and the retrieval metrics. The command line is options.py's;
turning image files into features is features.py's."""
import errno
import json
import os
import re
import tempfile
import unicodedata
from contextlib import contextmanager

import numpy as np
import torch

CAPS_PER_IMAGE = 5           # image i owns captions 5i .. 5i+4 in every prepared split
PAD, UNK = '<pad>', '<unk>'  # ids 0 and 1 in every vocab.json


class UserError(Exception):
    """A problem the user can fix (a missing file, a bad option): printed as one line, exit 1."""


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
    return (os.path.join(data_dir, f'{split}_ims.npy'),    # float32 (N, D), kept crops (N, C, D) or float16 grids (N, K, D), rows L2-normalized
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


def load_split(data_dir, split, all_crops=False):
    """(features float32 (N, D), captions list of 5N token strings) of a prepared split. Of a
    dataset that kept each image's crops (meta.json kept_crops): with all_crops the (N, C, D)
    array as it is, else the mean of each image's crops, re-normalized (mean_of_crops). Of a
    grid dataset (meta.json grid): the (N, K, D) grid vectors, each L2-normalized as prep.py
    wrote them (zero where the CNN's map was zero), as float32, always: the model pools them."""
    meta = load_meta(data_dir)
    if split not in meta['splits']:
        raise UserError(f"{data_dir}: split {split!r} was not prepared (its dataset json has no such images); "
                        f"prepared splits: {', '.join(sorted(meta['splits']))}; choose one with --split="
                        f"{'val' if 'val' in meta['splits'] else sorted(meta['splits'])[0]}")
    ims_path, caps_path = split_paths(data_dir, split)
    again = "run prep.py again with --force=True"
    try:
        feats = np.load(ims_path, mmap_mode='r', allow_pickle=False)
        with open(caps_path, encoding='utf-8') as f:
            captions = f.read().splitlines()
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{data_dir}: cannot read split {split!r} ({e}); {again}") from None
    check_real_numbers(feats, ims_path, again)
    if meta.get('grid') and (meta.get('kept_crops') or not isinstance(meta.get('grid_size'), int)):
        raise UserError(f"{os.path.join(data_dir, 'meta.json')}: says grid vectors but "
                        f"{'also kept crops' if meta.get('kept_crops') else 'no grid_size'}; {again}")
    shape = ('images', meta.get('crops'), meta['feature_dim']) if meta.get('kept_crops') else ('images', meta['feature_dim'])
    if meta.get('grid'):
        shape = ('images', meta['grid_size'], meta['feature_dim'])
    if feats.ndim != len(shape) or feats.shape[1:] != shape[1:]:
        raise UserError(f"{ims_path}: shape {feats.shape}, expected ({', '.join(map(str, shape))}) as meta.json says; {again}")
    if len(captions) != CAPS_PER_IMAGE * len(feats):
        raise UserError(f"{caps_path}: {len(captions)} captions for {len(feats)} images (expected 5 each); {again}")
    empty = [n for n, c in enumerate(captions) if not c.split()]
    if empty:
        raise UserError(f"{caps_path}: line {empty[0] + 1} is an empty caption; {again}")
    feats = np.array(feats, dtype=np.float32)  # a private, writable copy
    bad = first_nonfinite_row(feats)
    if bad is not None:
        raise UserError(f"{ims_path}: row {bad} holds NaN or inf; {again}")
    if feats.ndim == 3 and not all_crops and not meta.get('grid'):
        feats = mean_of_crops(feats, ims_path)
    return feats, captions


def mean_of_crops(feats, source):
    """(N, C, D) crops, each L2-normalized -> (N, D): each image's mean crop, L2-normalized,
    what validation and eval.py score an image by."""
    mean = feats.mean(1)
    norms = np.linalg.norm(mean, axis=1, keepdims=True)
    if (norms == 0).any():
        raise UserError(f"{source}: image {int((norms[:, 0] == 0).argmax())}: its crops cancel out (their mean is zero); "
                        "check the features")
    return mean / norms


def normalize_grid(feats, source, block=256):
    """(N, K, D) grid vectors -> each vector L2-normalized, as float16 (half the disk and
    memory of float32; a unit vector's values lose nothing that matters at 3 digits). In
    blocks of images, so that no float32 copy of the whole (COCO: 31 GB) is made. A zero vector
    (a place where a ReLU map saw nothing) stays zero; an image whose vectors are all zero, a
    NaN or an inf is an error that names the image. Each vector is scaled to its largest value
    before its length is taken, so that no length overflows or underflows float32."""
    out = np.empty(feats.shape, dtype=np.float16)
    for start in range(0, len(feats), block):
        x = np.asarray(feats[start:start + block], dtype=np.float32)
        bad = ~np.isfinite(x).reshape(len(x), -1).all(1)
        if bad.any():
            raise UserError(f"{source}: image {start + int(bad.argmax())}: its grid holds NaN or inf; regenerate the features")
        peaks = np.abs(x).max(-1, keepdims=True)
        empty = (peaks[..., 0] == 0).all(1)
        if empty.any():
            raise UserError(f"{source}: image {start + int(empty.argmax())}: every grid vector is zero; regenerate the features")
        x = x / np.where(peaks == 0, 1, peaks)
        norms = np.linalg.norm(x, axis=-1, keepdims=True)
        out[start:start + len(x)] = x / np.where(norms == 0, 1, norms)
    return out


def check_real_numbers(array, path, advice):
    """What np.load or loadmat gave is an array of real numbers (not a .npz archive, complex
    numbers, strings or cells, which a conversion to float32 would fail on or silently change)."""
    if not isinstance(array, np.ndarray):
        kind = 'a .npz archive' if isinstance(array, np.lib.npyio.NpzFile) else f'a {type(array).__name__}'
        raise UserError(f"{path}: {kind}, not an array; {advice}")
    if array.dtype.kind not in 'iuf':
        raise UserError(f"{path}: an array of {array.dtype} values, expected real numbers; {advice}")


def first_nonfinite_row(feats, rows=8192):
    """The index of the first row (an image: all its crops) with a NaN or inf, or None; in
    blocks, to bound the memory."""
    for start in range(0, len(feats), rows):
        block = feats[start:start + rows]
        ok = np.isfinite(block.reshape(len(block), -1)).all(1)
        if not ok.all():
            return start + int(np.argmin(ok))
    return None


def load_tensors(path, device, what, only, damaged):
    """torch.load with weights_only=True: tensors and plain containers, so that a file from
    elsewhere can never run code while it loads. A file holding more (a pickled Python object)
    is refused as such (`only`: what to load instead); an unreadable one says `damaged`."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        code = re.search(r'GLOBAL ([\w.]+)', str(e))
        if type(e).__name__ == 'UnpicklingError':  # weights_only refused a pickled object
            calls = f"; loading it would call {code[1]}" if code else ''
            raise UserError(f"{path}: refused: it holds more than tensors (a pickled Python object{calls}), so it "
                            f"is not loaded; {only}") from None
        first = lines[0].split('. ')[0][:150] if lines else ''   # PyTorch's first sentence; the rest is its advice
        raise UserError(f"{path}: not a readable {what} ({type(e).__name__}: {first}); {damaged}") from None


def load_checkpoint(path, device):
    """A checkpoint train.py wrote. weights_only=True: tensors and plain containers only, so a
    file from elsewhere can never run code while it loads; a torn, foreign or malicious file is
    a UserError, not a traceback."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such checkpoint")
    ckpt = load_tensors(path, device, 'checkpoint', "load only checkpoints written by train.py",
                        "it may be truncated: use another copy, or train again with another --out_dir")
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
    """Image features (N, D), or grid vectors (N, K, D), rows L2-normalized as prep.py writes them
    -> embeddings (N, embed_dim). Grids in batches of about batch_size x 16 vectors (Lite0's
    7 x 7: 334 images, 84 MB of input), so that memory stays bounded whatever N."""
    dev = next(model.parameters()).device
    feats = torch.as_tensor(np.asarray(feats, dtype=np.float32))
    if feats.dim() == 3:
        batch_size = max(1, batch_size * 16 // feats.shape[1])
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
