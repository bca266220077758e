"""Dataset downloads for prep.py: Flickr8k, Flickr30k and COCO from their public sources (or from a
--mirror that serves the same file names), unzipped safely, with Karpathy's split written as
dataset.json in his format.

    fetch(dataset, out_dir, mirror='')   # what prep.py calls; SOURCES lists the datasets it knows

Holds: SOURCES (each dataset's files: URL, documented size, checksum, where it unzips);
plan_downloads / check_disk (what will be fetched, its size and the free space, said before
anything is fetched); download (HTTP with a progress bar and Range resume); safe_members /
extract_zip (safe unzip); the readers that write Karpathy's json from each release:
flickr8k_json (text files), flickr30k_json (CSV), coco_json (Parquet, pip extra).
"""
import collections
import csv
import json
import os
import shutil

from utils import CAPS_PER_IMAGE, UserError, tokenize, write_json

# One entry per file. size: bytes as documented by the source (for the disk check before
# anything is fetched). sha256: where one is recorded (None: not published), it is checked
# together with the size; else the SHA-256 seen is printed and kept in download.json.
# unzip_to: the folder (relative to the data folder) a zip is extracted into; None: not a zip.
Remote = collections.namedtuple('Remote', 'url size sha256 unzip_to')

# Flickr8k: the release assets of github.com/jbrownlee/Datasets, the two zips today's tutorials
# use; their sizes as those tutorials give them ("1 Gigabyte", "2.2 Megabytes").
FLICKR8K_URL = 'https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/'
# Flickr30k: the Hugging Face dataset nlphuji/flickr30k. Its file list (huggingface.co/datasets/
# nlphuji/flickr30k/tree/main) shows flickr30k-images.zip, 4.39 GB, and flickr_annotations_30k.csv,
# 12.9 MB; its loading script flickr30k.py reads the CSV with pandas.read_csv, decodes the columns
# 'raw' and 'sentids' as JSON, and finds each image at flickr30k-images/<filename> in the zip.
HF_URL = 'https://huggingface.co/datasets/'
FLICKR30K_URL = HF_URL + 'nlphuji/flickr30k/resolve/main/'
# COCO: the 2014 image zips from COCO's own site (cocodataset.org/#download); their byte counts
# are the Content-Length that server sends (quoted in many download logs). Karpathy's split: the
# Hugging Face dataset yerevann/coco-karpathy, one Parquet file per split under data/ (its tree
# at huggingface.co/datasets/yerevann/coco-karpathy/tree/main/data: train 17 MB, validation and
# test 1.07 MB each, restval 6.32 MB); each row an image with the columns filepath (train2014 or
# val2014), filename, sentences (its raw captions, a list of strings), cocoid (as read by the
# code that loads it with datasets.load_dataset, and by select_columns calls that name them).
COCO_URL = 'http://images.cocodataset.org/zips/'
COCO_SPLITS_URL = HF_URL + 'yerevann/coco-karpathy/resolve/main/data/'
COCO_SPLIT_FILES = {'train': 'train-00000-of-00001.parquet', 'restval': 'restval-00000-of-00001.parquet',
                    'val': 'validation-00000-of-00001.parquet', 'test': 'test-00000-of-00001.parquet'}

SOURCES = {
    'flickr8k': {
        'Flickr8k_Dataset.zip': Remote(FLICKR8K_URL + 'Flickr8k_Dataset.zip', 1_100_000_000, None, '.'),  # Flicker8k_Dataset/ (sic)
        'Flickr8k_text.zip': Remote(FLICKR8K_URL + 'Flickr8k_text.zip', 2_200_000, None, 'text'),
    },
    'flickr30k': {
        'flickr30k-images.zip': Remote(FLICKR30K_URL + 'flickr30k-images.zip', 4_390_000_000, None, '.'),
        'flickr_annotations_30k.csv': Remote(FLICKR30K_URL + 'flickr_annotations_30k.csv', 12_900_000, None, None),
    },
    'coco': {
        'train2014.zip': Remote(COCO_URL + 'train2014.zip', 13_510_573_713, None, '.'),
        'val2014.zip': Remote(COCO_URL + 'val2014.zip', 6_645_013_297, None, '.'),
        **{name: Remote(COCO_SPLITS_URL + name, size, None, None) for name, size in zip(
            COCO_SPLIT_FILES.values(), (17_000_000, 6_320_000, 1_070_000, 1_070_000))},
    },
}
IMAGE_FOLDERS = {'flickr8k': ['Flicker8k_Dataset'], 'flickr30k': ['flickr30k-images'], 'coco': ['train2014', 'val2014']}
PARQUET_EXTRA = 'pip install -r requirements-parquet.txt'


# What a user without the download can do instead: said with every failed download.
OFFLINE = "offline: --dataset=synthetic, or your own dataset.json with --features=PATH.npy or --images_dir=FOLDER"


def images_there(dataset, out_dir, images_dir=''):
    """Whether a dataset's images are in place: --images_dir if given, else the folders its zips make."""
    if images_dir:
        return os.path.isdir(images_dir)
    return all(os.path.isdir(os.path.join(out_dir, folder)) for folder in IMAGE_FOLDERS[dataset])


def fetch(dataset, out_dir, mirror=''):
    """Download, verify and unzip a dataset into out_dir; write out_dir/dataset.json unless there
    is one (e.g. Karpathy's own, kept), and out_dir/download.json: URL, size and SHA-256 of each file."""
    if dataset == 'coco':
        parquet_reader()  # a missing pip extra is said before gigabytes are fetched, not after
    plan = plan_downloads(dataset, out_dir, mirror)
    check_disk(dataset, out_dir, plan, mirror)
    fetched = {}
    for name, url, _, _ in plan:
        remote = SOURCES[dataset][name]
        path = os.path.join(out_dir, name)
        # a mirror is the user's choice: the checksums of the default source do not apply to it
        recorded = (remote.size, remote.sha256) if remote.sha256 and not mirror else (None, None)
        digest = download(url, path, *recorded)
        if remote.unzip_to is not None:
            extract_zip(path, os.path.join(out_dir, remote.unzip_to))
        fetched[name] = {'url': url, 'bytes': os.path.getsize(path), 'sha256': digest}
    json_path = os.path.join(out_dir, 'dataset.json')
    if not os.path.exists(json_path):
        write_json(json_path, karpathy_json(dataset, out_dir))
    write_json(os.path.join(out_dir, 'download.json'), fetched)


def karpathy_json(dataset, out_dir):
    if dataset == 'flickr8k':
        return flickr8k_json(os.path.join(out_dir, 'text'))
    if dataset == 'flickr30k':
        return flickr30k_json(os.path.join(out_dir, 'flickr_annotations_30k.csv'))
    return coco_json({split: os.path.join(out_dir, name) for split, name in COCO_SPLIT_FILES.items()})


# ----------------------------------------------------------------------------- disk space

def plan_downloads(dataset, out_dir, mirror=''):
    """[(name, url, bytes still to fetch, bytes to unzip)]; a size not known is None. Sizes are the
    documented ones, or with a mirror what it answers to HEAD (its files may be other builds)."""
    import zipfile
    plan = []
    for name, remote in SOURCES[dataset].items():
        url = mirror.rstrip('/') + '/' + name if mirror else remote.url
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            size, to_fetch = os.path.getsize(path), 0
        else:
            size = remote_size(url) if mirror else remote.size
            part = path + '.part'
            to_fetch = None if size is None else max(0, size - (os.path.getsize(part) if os.path.exists(part) else 0))
        to_unzip = 0
        if remote.unzip_to is not None and not os.path.exists(extraction_marker(path, os.path.join(out_dir, remote.unzip_to))):
            to_unzip = size  # JPEGs barely compress: about the zip's size again
            if os.path.exists(path):
                try:
                    with zipfile.ZipFile(path) as zf:
                        to_unzip = sum(info.file_size for info in zf.infolist())
                except (zipfile.BadZipFile, OSError):
                    pass  # extract_zip says so, with what to do
        plan.append((name, url, to_fetch, to_unzip))
    return plan


def remote_size(url):
    """The Content-Length a server answers to HEAD, or None where it says nothing (then the
    download itself finds out)."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method='HEAD'), timeout=60) as response:
            length = response.headers.get('Content-Length')
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return int(length) if length and length.isdigit() else None


def human(n):
    for unit in ('bytes', 'kB', 'MB', 'GB'):
        if n < 1000 or unit == 'GB':
            return f"{n:.0f} {unit}" if unit == 'bytes' else f"{n:.1f} {unit}"
        n /= 1000


def check_disk(dataset, out_dir, plan, mirror=''):
    """Print what will be fetched and unzipped, and the free space; refuse when it does not fit."""
    print(f"{dataset}: into {out_dir}, from {mirror or 'its public sources'}"
          f"{' (sizes as the mirror gives them)' if mirror else ' (sizes as documented)'}:")
    for name, url, to_fetch, to_unzip in plan:
        fetch_text = 'already here' if to_fetch == 0 else ('size unknown' if to_fetch is None else human(to_fetch))
        unzip_text = '' if not to_unzip else f", then unzipped: about {human(to_unzip)}"
        print(f"  {name}: {fetch_text}{unzip_text}")
    need = sum((to_fetch or 0) + (to_unzip or 0) for _, _, to_fetch, to_unzip in plan)
    free = shutil.disk_usage(out_dir).free
    unknown = any(to_fetch is None for _, _, to_fetch, _ in plan)
    print(f"  needed: {human(need)}{' and the files of unknown size' if unknown else ''}; free on this disk: {human(free)}")
    if need > free:
        raise UserError(f"{out_dir}: {dataset} needs {human(need)} of disk space (downloads and unzipped images) but "
                        f"{human(free)} is free; free some space or pass --data_dir=FOLDER on a larger disk")


# ----------------------------------------------------------------------------- download and unzip

def download(url, path, size=None, sha256=None):
    """Fetch url into path with a progress bar; returns the file's SHA-256. A partial download
    (path.part) resumes with an HTTP Range request; a server that answers 200 instead sends
    the whole file, which then starts over. A file already at `path` is not fetched again."""
    import hashlib
    import urllib.error
    import urllib.request
    from tqdm import tqdm
    name = os.path.basename(path)
    sha = hashlib.sha256()
    if os.path.exists(path):
        with open(path, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                sha.update(chunk)
    else:
        part = path + '.part'
        have = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {'Range': f'bytes={have}-'} if have else {}
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the part is no prefix of what the server has: start over
                os.remove(part)
                return download(url, path, size, sha256)
            raise UserError(f"{url}: HTTP {e.code} {e.reason}; check the address (--mirror) or try again later "
                            f"({OFFLINE})") from None
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"{url}: cannot download ({getattr(e, 'reason', e)}); check the network or use --mirror=BASE_URL "
                            f"({OFFLINE})") from None
        with response:
            if response.status != 206:
                have = 0  # the server ignored the Range: it sends everything, from the start
            if have:
                with open(part, 'rb') as f:
                    for chunk in iter(lambda: f.read(1 << 20), b''):
                        sha.update(chunk)
            length = response.headers.get('Content-Length')
            total = have + int(length) if length else None
            with open(part, 'ab' if have else 'wb') as f, \
                    tqdm(total=total, initial=have, unit='B', unit_scale=True, desc=name, disable=None) as bar:
                try:
                    for chunk in iter(lambda: response.read(1 << 20), b''):
                        f.write(chunk)
                        sha.update(chunk)
                        bar.update(len(chunk))
                except OSError as e:
                    raise UserError(f"{url}: download interrupted ({e}); run prep.py again to resume") from None
        if total is not None and os.path.getsize(part) != total:
            raise UserError(f"{url}: download stopped at {os.path.getsize(part)} of {total} bytes; run prep.py again to resume")
        os.replace(part, path)
    digest = sha.hexdigest()
    if size is not None and os.path.getsize(path) != size or sha256 is not None and digest != sha256:
        raise UserError(f"{path}: {os.path.getsize(path)} bytes, SHA-256 {digest}; expected {size} bytes, "
                        f"SHA-256 {sha256}; delete it and run prep.py again")
    if sha256 is None:
        print(f"{name}: SHA-256 {digest} ({os.path.getsize(path)} bytes; no published checksum to compare with)")
    return digest


def safe_members(zf, zip_path):
    """The members of an open zip to extract: everything but macOS's __MACOSX/ and ._ files.
    A member that would land outside the target folder (.., an absolute path: zip-slip) or
    that is a symbolic link is refused, before anything is written."""
    members = []
    for info in zf.infolist():
        name = info.filename
        parts = name.replace('\\', '/').split('/')
        if parts[0] == '__MACOSX' or parts[-1].startswith('._'):
            continue
        if name.startswith(('/', '\\')) or (len(name) > 1 and name[1] == ':') or '..' in parts:
            raise UserError(f"{zip_path}: member {name!r} points outside the folder it is extracted to; refusing this zip")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise UserError(f"{zip_path}: member {name!r} is a symbolic link; refusing this zip")
        members.append(info)
    return members


def extraction_marker(zip_path, dest):
    """The file that records a finished extraction of zip_path into dest."""
    return os.path.join(dest, f'.{os.path.basename(zip_path)}.extracted')


def extract_zip(zip_path, dest):
    """Unzip safely into dest, once: a marker file records a finished extraction."""
    import zipfile
    import zlib
    from tqdm import tqdm
    marker = extraction_marker(zip_path, dest)
    if os.path.exists(marker):
        return
    corrupt = f"{zip_path}: not a complete zip file (truncated or corrupt download); delete it and run prep.py again"
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = safe_members(zf, zip_path)
            for info in tqdm(members, desc=f'unzip {os.path.basename(zip_path)}', unit='file', disable=None):
                target = os.path.join(dest, *info.filename.replace('\\', '/').split('/'))
                if info.is_dir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with zf.open(info) as src, open(target, 'wb') as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError):
        raise UserError(corrupt) from None
    write_json(marker, {'zip': zip_path, 'members': len(members)})


# ----------------------------------------------------------------------------- Karpathy's json from each release

def karpathy_image(where, filename, split, imgid, captions, **fields):
    """One image of Karpathy's json: its captions as 'raw' and as tokens (lowercased, punctuation dropped)."""
    if len(captions) < CAPS_PER_IMAGE:
        raise UserError(f"{where}: {len(captions)} captions for {filename}; expected {CAPS_PER_IMAGE}")
    return {'filename': filename, 'split': split, 'imgid': imgid, **fields,
            'sentences': [{'raw': raw, 'tokens': tokenize(raw)} for raw in captions]}


def find_file(root, name):
    for folder, _, files in os.walk(root):
        if name in files and '__MACOSX' not in folder.split(os.sep):
            return os.path.join(folder, name)
    raise UserError(f"{root}: no {name} in the extracted Flickr8k_text.zip; delete the zip and the folder and run prep.py again")


def flickr8k_json(text_dir):
    """Flickr8k.token.txt + Flickr_8k.{train,dev,test}Images.txt -> Karpathy's dataset json
    (dev is Karpathy's val)."""
    captions = collections.defaultdict(list)
    token_path = find_file(text_dir, 'Flickr8k.token.txt')
    with open(token_path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, sep, raw = line.rstrip('\n').partition('\t')
            if not sep or '#' not in key:
                raise UserError(f"{token_path}: line {n} is not 'image.jpg#k<TAB>caption'")
            captions[key.rsplit('#', 1)[0]].append(raw.strip())
    images = []
    for split, name in (('train', 'train'), ('val', 'dev'), ('test', 'test')):
        split_path = find_file(text_dir, f'Flickr_8k.{name}Images.txt')
        with open(split_path, encoding='utf-8') as f:
            for filename in f.read().split():
                where = f"{token_path} (for {os.path.basename(split_path)})"
                images.append(karpathy_image(where, filename, split, len(images), captions[filename]))
    return {'dataset': 'flickr8k', 'images': images}


def flickr30k_json(csv_path):
    """nlphuji/flickr30k's flickr_annotations_30k.csv -> Karpathy's dataset json. One row per image:
    'raw' its captions (a JSON list), 'split' Karpathy's (train, val, test), 'filename', 'img_id'."""
    images = []
    with open(csv_path, encoding='utf-8', newline='') as f:
        reader = csv.DictReader(f)
        missing = [c for c in ('raw', 'split', 'filename') if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{csv_path}: no column {', '.join(missing)} (nlphuji/flickr30k's has raw, sentids, split, "
                            "filename, img_id); delete it and run prep.py again")
        for row in reader:
            where = f"{csv_path}: line {reader.line_num}"
            try:
                captions = json.loads(row['raw'])
            except (json.JSONDecodeError, TypeError):
                captions = None
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise UserError(f"{where}: column 'raw' is not a JSON list of captions; delete the file and run prep.py again")
            images.append(karpathy_image(where, row['filename'], row['split'], len(images), captions))
    return {'dataset': 'flickr30k', 'images': images}


def parquet_reader():
    """pyarrow.parquet, an optional extra: only --dataset=coco's download needs it."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise UserError("--dataset=coco reads Karpathy's split from Parquet files (yerevann/coco-karpathy), which needs "
                        f"pyarrow: {PARQUET_EXTRA}") from None
    return pyarrow.parquet


def coco_json(split_paths):
    """yerevann/coco-karpathy's Parquet files, {Karpathy split: path} -> Karpathy's dataset json.
    Each row an image: filepath (train2014 or val2014), filename, sentences (raw captions), cocoid."""
    parquet = parquet_reader()
    columns = ['filepath', 'filename', 'sentences', 'cocoid']
    images = []
    for split, path in split_paths.items():
        try:
            rows = parquet.read_table(path, columns=columns).to_pylist()
        except (ValueError, OSError, TypeError, KeyError) as e:  # pyarrow's errors derive from these
            raise UserError(f"{path}: not a Parquet file with the columns {', '.join(columns)} ({str(e).splitlines()[0]}); "
                            "delete it and run prep.py again") from None
        for n, row in enumerate(rows):
            where = f"{path}: row {n}"
            if not isinstance(row['sentences'], list) or not all(isinstance(c, str) for c in row['sentences']):
                raise UserError(f"{where}: 'sentences' is not a list of captions; delete the file and run prep.py again")
            images.append(karpathy_image(where, row['filename'], split, len(images), row['sentences'],
                                         filepath=row['filepath'], cocoid=row['cocoid']))
    return {'dataset': 'coco', 'images': images}
