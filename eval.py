"""Evaluate a trained model: recall at 1, 5 and 10, median and mean rank, in both directions;
and use it: search a split's images with a sentence, its captions with an image, draw the results.

    python eval.py --out_dir=checkpoints/flickr8k                 # test split, best.pt
    python eval.py --out_dir=checkpoints/coco --split=val --save_embeddings=True
    python eval.py --out_dir=checkpoints/flickr8k --save_ranks=True            # per-query ranks, top-10
    python eval.py --out_dir=checkpoints/flickr8k --query="a dog runs through the snow" --k=10
    python eval.py --out_dir=checkpoints/coco --image=photo.jpg               # needs a dataset prepared from images
    python eval.py --out_dir=checkpoints/synthetic --gallery=gallery.png      # 4 captions of the split and their top-k
    python eval.py --compare=checkpoints/a,checkpoints/b                      # results side by side, Markdown
    python eval.py --ensemble=checkpoints/a,checkpoints/b                     # the mean of the runs' score matrices

image->text ranks each image's best-placed ground-truth caption among all captions of the
split; text->image ranks each caption's image among all images. COCO's test split is also
reported as "1K" (mean over 5 folds of 1,000 images) as well as "5K" (all of it).
Writes results_<split>.json (and embeddings_<split>.npz, ranks_<split>.json) into out_dir;
--ensemble writes results_<split>_ensemble.json (ranks_<split>_ensemble.json) into its first run.
In a notebook: load_model (from model), encode_text, encode_images (from utils), search and
image_features below (docs/evaluation.md).
The pictures of --gallery are drawn by gallery.py.
A checkpoint of train.py --finetune=True holds its CNN: the split's features (and --image's)
are then computed from the images with it (center crop) instead of read from <split>_ims.npy.
"""
import json
import os
from types import SimpleNamespace

import numpy as np
import torch

from finetune import split_features
from gallery import draw_image_gallery, draw_text_gallery
from model import load_model, score_matrix
from options import DEVICE, at_least, at_most, one_of, parse_config, pick_device, run_main
from utils import (UNK, UserError, atomic_open, encode_images, encode_text, load_meta, load_split,
                   mean_of_crops, normalize_grid, read_json, retrieval_metrics, retrieval_ranks, tokenize, write_json)

# ----------------------------------------------------------------------------- config
out_dir = 'checkpoints/flickr8k'   # a folder train.py wrote
checkpoint = 'best.pt'             # in out_dir
split = 'test'                     # train | val | test
data_dir = ''                      # default: the data_dir the checkpoint was trained on
save_embeddings = False            # write embeddings_<split>.npz: the vectors that were scored
save_ranks = False                 # write ranks_<split>.json: each query's rank of its ground truth and its top 10
device = 'auto'                    # auto = cuda, then mps, then cpu
compile = True                     # order scores through torch.compile'd kernels (needs a C++ compiler on a CPU); False: plain PyTorch
# using the model (instead of the metrics)
query = ''                         # a sentence: print the split's top-k images for it
image = ''                         # an image file: print the split's top-k captions for it
k = 10                             # how many results per query
gallery = ''                       # a .png to draw the results into, ground truth outlined in green
gallery_queries = 4                # without --query / --image: this many queries spread over the split
gallery_by = 'text'                # ... 'text': captions find images; 'image': images find captions
images_dir = ''                    # the folder the split's files are in; default: meta.json's images_dir, else the dataset json's folder
compare = ''                       # run folders, comma-separated: print their results_<split>.json as one Markdown table
ensemble = ''                      # run folders, comma-separated, trained on one dataset: score the split with the mean of their score matrices
force = False                      # overwrite an existing --gallery file
CONFIG_KEYS = [k for k, v in globals().items() if k.islower() and not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# What each option must be, checked before any work (options.check_options); --split is checked
# against the splits the dataset has, --query/--image against each other in check_use_options.
OPTION_RULES = {
    'out_dir': (lambda v: v != '' and not os.path.isfile(v), 'a folder train.py wrote, not a file'),
    'checkpoint': (lambda v: v != '', 'a checkpoint file name in out_dir, like best.pt'),
    'device': DEVICE,
    'k': at_most(100000, at_least(1)),
    'gallery': (lambda v: v == '' or v.lower().endswith('.png'), "'' or a file name ending in .png (the gallery is a PNG)"),
    'gallery_queries': at_most(100, at_least(1)),
    'gallery_by': one_of('text', 'image'),
    'images_dir': (lambda v: v == '' or os.path.isdir(v), "'' or an existing folder"),
    'ensemble': (lambda v: v == '' or (any(v.split(',')) and all(os.path.isdir(r) for r in v.split(',') if r)),
                 "'' or run folders, comma-separated, each an existing folder"),
}
# -----------------------------------------------------------------------------


# ----------------------------------------------------------------------------- using the model

def top_k(scores, k):
    """(scores, indices) of each row's k best columns, best first; equal scores in index order,
    so that a listing is the same on every run. Sorted in blocks of rows to bound memory."""
    k = min(k, scores.shape[1])
    rows = max(1, 2 ** 24 // max(1, scores.shape[1]))
    parts = [torch.sort(scores[r:r + rows], dim=1, descending=True, stable=True) for r in range(0, len(scores), rows)]
    return torch.cat([p.values[:, :k] for p in parts]), torch.cat([p.indices[:, :k] for p in parts])


def search(model, images, captions, k=10, by='text'):
    """Embedded images (N, E) and captions (M, E) -> (scores, indices), best first.
    by='text': each caption's k best images (M, k); by='image': each image's k best captions (N, k)."""
    if by not in ('text', 'image'):
        raise ValueError(f"by must be 'text' or 'image', not {by!r}")
    scores = score_matrix(images, captions, model.measure)
    return top_k(scores.t() if by == 'text' else scores, k)


def image_features(paths, meta, dev, model=None):
    """Image files -> the features `model` takes, computed as prep.py computed the dataset's (same
    CNN, crops, weights, decoder and dtype), rows L2-normalized; of a dataset that kept its crops,
    the mean of the normalized crops, as load_split scores its images; of a grid dataset the
    (N, K, D) grid vectors, each normalized and rounded to float16 as prep.py stores them. Only for datasets whose
    features prep.py extracted itself. A model with a CNN of its own (fine-tuned) computes them
    with it instead (center crop)."""
    if model is not None and model.backbone is not None:
        return split_features(model.backbone, paths, dev, meta.get('decode', 'pil'), meta.get('dtype', 'float32'))
    if 'cnn' not in meta:
        raise UserError(f"{meta.get('source', 'dataset')}: these features were not extracted from images by prep.py "
                        f"({meta['dataset']}), so a new image cannot be put beside them; --image needs a dataset "
                        "prepared from its images (prep.py --images_dir=...)")
    from features import build_backbone, extract_features
    # the dataset's decoder and dtype too: they agree only to rounding (older datasets: PIL, float32)
    dtype = meta.get('dtype', 'float32')
    grid = bool(meta.get('grid'))
    backbone, _ = build_backbone(meta['cnn'], meta['weights'], dev, dtype, grid=grid)
    kept = bool(meta.get('kept_crops'))
    feats = np.asarray(extract_features(backbone, paths, meta['cnn'], meta['crops'], dev, workers=0, progress=False,
                                        decode=meta.get('decode', 'pil'), dtype=dtype, keep_crops=kept, grid=grid),
                       dtype=np.float32)
    if grid:
        return normalize_grid(feats, paths[0]).astype(np.float32)
    feats = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    return mean_of_crops(feats, paths[0]) if kept else feats


def find_images_dir(option, data, meta, files):
    """The folder that holds the split's image files: --images_dir, else meta.json's images_dir
    (relative to data_dir for the synthetic set, else as prep.py was given it), else the folder
    of the dataset json (Karpathy's filepath/filename are relative to it)."""
    if option:
        candidates = [option]
    else:
        candidates = []
        if meta.get('images_dir'):
            candidates += [os.path.join(data, meta['images_dir']), meta['images_dir']]
        if meta.get('dataset_json'):
            candidates.append(os.path.dirname(meta['dataset_json']) or '.')
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, f)) for f in files):
            return folder
    missing = files[0] if not candidates else next(f for f in files if not os.path.isfile(os.path.join(candidates[0], f)))
    raise UserError(f"{data}: the split's images are not on disk (looked for {missing} in "
                    f"{', '.join(candidates) or 'no known folder'}); pass --images_dir=FOLDER that holds the files "
                    "named in <split>_files.txt")


def truth_rank(scores, truth):
    """0-based rank of the best-placed ground truth in one row of scores, ties counted against
    it (as the metrics count them)."""
    best = max(scores[t] for t in truth)
    return int((scores >= best).sum()) - sum(int(scores[t] >= best) for t in truth)


def use_model(run, cfg, dev):
    """--query, --image, --gallery: print each query's top-k, and draw them if asked."""
    model, feats, captions, files, k = run.model, run.feats, run.captions, run.files, cfg.k
    by = 'text' if cfg.query else 'image' if cfg.image else cfg.gallery_by
    # Check the pictures before the work, so that a missing folder costs nothing.
    folder = find_images_dir(cfg.images_dir, run.data, run.meta, files) if cfg.gallery and not cfg.image else None
    if by == 'text':
        results, scores = text_queries(model, run.ckpt['vocab'], feats, captions, cfg.query, cfg.gallery_queries)
        what = f"{len(feats)} images"
    else:
        results, scores, query_paths = image_queries(run, cfg, folder, dev)
        what = f"{len(captions)} captions"
    top_scores, top_indices = top_k(scores, k)
    for r, s, i in zip(results, top_scores.tolist(), top_indices.tolist()):
        r.update(scores=s, indices=i, texts=[captions[j] for j in i] if by == 'image' else [files[j] for j in i])
    title = f"{run.meta['dataset']} {cfg.split} ({what}), {model.measure} measure, {run.ckpt['config'].get('out_dir', '')}"
    print(f"{title}: top {k} (higher score = better; * = ground truth)")
    for r in results:
        print(f"\nquery: {r['query']!r} {r['note']}".rstrip())
        for rank, (score, index, text) in enumerate(zip(r['scores'], r['indices'], r['texts'])):
            print(f"{rank + 1:4d} {'*' if index in r['truth'] else ' '} {score:10.4f}  {text}")
    if cfg.gallery:
        if by == 'text':
            draw_text_gallery(results, [os.path.join(folder, f) for f in files], title, cfg.gallery)
        else:
            draw_image_gallery(results, query_paths, title, cfg.gallery)
        print(f"\nwrote {cfg.gallery}")
    return results


def check_use_options(cfg):
    """--query, --image, --gallery, before any work."""
    if cfg.query and cfg.image:
        raise UserError("--query and --image: give one of the two")
    if cfg.save_ranks or cfg.save_embeddings:
        raise UserError("--save_ranks and --save_embeddings belong to the evaluation; run them without --query/--image/--gallery")
    if cfg.query and not tokenize(cfg.query):
        raise UserError(f"--query={cfg.query[:60]!r}: no words in it (letters and digits are what counts); "
                        "give a sentence, like --query='a dog runs through the snow'")
    if cfg.image:
        check_image_option(cfg.image)
    if cfg.gallery and os.path.exists(cfg.gallery) and not cfg.force:
        raise UserError(f"--gallery={cfg.gallery}: the file exists; pass --force=True to overwrite it, or choose "
                        "another file name")
    if cfg.gallery and os.path.isdir(cfg.gallery):
        raise UserError(f"--gallery={cfg.gallery}: a folder; give a file name ending in .png")


def check_image_option(path):
    if '://' in path:
        raise UserError(f"--image={path}: a URL; download the image first and give its file")
    if os.path.isdir(path):
        raise UserError(f"--image={path}: a folder; give one image file")
    if not os.path.isfile(path):
        raise UserError(f"--image={path}: no such image file; check the path")


def text_queries(model, vocab, feats, captions, query='', gallery_queries=4):
    """--query, or gallery_queries captions of the split: (results, scores (queries, images))."""
    if query:
        texts, truths = [query], [set()]
        unknown = sorted({w for w in tokenize(query) if w not in vocab})
        note = f"(not in the vocabulary, read as {UNK}: {', '.join(unknown)})" if unknown else ''
        queries = encode_text(model, vocab, texts)
    else:
        picks = np.linspace(0, len(captions) - 1, gallery_queries).round().astype(int)
        texts, truths, note = [captions[j] for j in picks], [{int(j) // 5} for j in picks], ''
        queries = encode_text(model, vocab, texts, tokenized=True)
    scores = score_matrix(encode_images(model, feats), queries, model.measure).t()
    results = [{'query': text, 'truth': truth, 'note': f"(its image at rank {truth_rank(row, truth) + 1})" if truth else note}
               for text, truth, row in zip(texts, truths, scores)]
    return results, scores


def image_queries(run, cfg, folder, dev):
    """--image, or --gallery_queries images of the split: (results, scores (queries, captions), paths)."""
    model, feats, files = run.model, run.feats, run.files
    caps = encode_text(model, run.ckpt['vocab'], run.captions, tokenized=True)
    if cfg.image:
        query_paths = [cfg.image]
        try:  # an image of the split has ground-truth captions; a new one has none
            folder = find_images_dir(cfg.images_dir, run.data, run.meta, files)
        except UserError:
            folder = None
        mine = [i for i, f in enumerate(files) if folder and os.path.samefile(os.path.join(folder, f), cfg.image)]
        truths = [set(range(5 * mine[0], 5 * mine[0] + 5)) if mine else set()]
        images = encode_images(model, image_features(query_paths, run.meta, dev, model))
    else:
        picks = np.linspace(0, len(feats) - 1, cfg.gallery_queries).round().astype(int)
        query_paths = [os.path.join(folder, files[i]) for i in picks]
        truths = [set(range(5 * i, 5 * i + 5)) for i in picks]
        images = encode_images(model, feats[picks])
    scores = score_matrix(images, caps, model.measure)
    results = [{'query': os.path.basename(p), 'truth': truth,
                'note': f"best ground-truth caption at rank {truth_rank(row, truth) + 1}" if truth else
                'not an image of the split: no ground truth'} for p, truth, row in zip(query_paths, truths, scores)]
    return results, scores, query_paths


def write_ranks(path, scores, files, captions):
    """Per query: the 0-based rank of its ground truth (as the metrics count it) and its top 10.
    One query per line, so that the file can be read with grep as well as json."""
    i2t, t2i = retrieval_ranks(scores)
    _, i2t_top = top_k(scores, 10)
    _, t2i_top = top_k(scores.t(), 10)
    with atomic_open(path, 'w') as f:
        f.write('{"i2t": [\n')
        f.write(',\n'.join(json.dumps({'image': i, 'file': files[i], 'rank': int(i2t[i]), 'top10': top,
                                        'top10_captions': [captions[j] for j in top]})
                           for i, top in enumerate(i2t_top.tolist())))
        f.write('\n],\n"t2i": [\n')
        f.write(',\n'.join(json.dumps({'caption': j, 'text': captions[j], 'image': j // 5, 'rank': int(t2i[j]),
                                        'top10': top, 'top10_files': [files[i] for i in top]})
                           for j, top in enumerate(t2i_top.tolist())))
        f.write('\n]}\n')


def compare_runs(runs, split):
    """Several runs' results_<split>.json as one Markdown table, in the form papers use."""
    results = []
    for run in runs:
        path = os.path.join(run, f'results_{split}.json')
        if not os.path.exists(path):
            raise UserError(f"{path}: no results; evaluate that run first: python eval.py --out_dir={run} --split={split}")
        results.append(read_json(path, 'results file'))
        check_results(path, results[-1])
    columns = ['R@1', 'R@5', 'R@10', 'medr']
    tables = [('', [r for r in results])]
    if any('mean_1k' in r for r in results):
        tables.append(('1K test (mean of 5 folds)', [r.get('mean_1k') for r in results]))
    for name, rows in tables:
        if name:
            print(f"\n{name}\n")
        print('| run | measure | images | ' + ' | '.join(f'i2t {c}' for c in columns) + ' | '
              + ' | '.join(f't2i {c}' for c in columns) + ' | rsum |')
        print('|---|---|---:|' + '---:|' * (2 * len(columns) + 1))
        for run, full, r in zip(runs, results, rows):
            if r is None:
                print(f"| {run} | {full.get('measure', '')} | | " + ' | ' * (2 * len(columns)) + ' |')
                continue
            cells = [f"{r[d][m]:.1f}" if m != 'medr' else f"{r[d][m]:.0f}" for d in ('i2t', 't2i')
                     for m in ('r1', 'r5', 'r10', 'medr')]
            print(f"| {run} | {full.get('measure', '')} | {full.get('n_images', '')} | " + ' | '.join(cells)
                  + f" | {r['rsum']:.1f} |")


def is_table(table, fields):
    return isinstance(table, dict) and all(isinstance(table.get(f), (int, float)) for f in fields)


def check_results(path, result):
    """A results_<split>.json as write_outputs writes it: what compare_runs reads from it."""
    recalls = ('r1', 'r5', 'r10', 'medr')
    for r in [result] + ([result['mean_1k']] if isinstance(result, dict) and 'mean_1k' in result else []):
        if not (is_table(r, ['rsum']) and is_table(r.get('i2t'), recalls) and is_table(r.get('t2i'), recalls)):
            raise UserError(f"{path}: not a results file eval.py writes (i2t and t2i, each with r1, r5, r10 and medr, "
                            "and rsum, all numbers); evaluate that run again")


def trained_data_dir(ckpt, run_folder):
    """The prepared dataset a checkpoint was trained on. train.py stores it as an absolute path;
    older checkpoints as it was given, relative to the folder train.py ran in, which is found
    from out_dir as stored (relative to that same folder) and the run folder found now."""
    stored, stored_out = ckpt['config']['data_dir'], ckpt['config'].get('out_dir', '')
    candidates = [stored]
    if not os.path.isabs(stored) and isinstance(stored_out, str) and stored_out and not os.path.isabs(stored_out):
        run, tail = os.path.abspath(run_folder), os.sep + os.path.normpath(stored_out)
        if run.endswith(tail):
            candidates.append(os.path.join(run[:-len(tail)], stored))
    for folder in candidates:
        if os.path.exists(os.path.join(folder, 'meta.json')):
            return folder
    raise UserError(f"{run_folder}: the dataset it was trained on is not prepared where it was (looked in "
                    f"{', '.join(os.path.abspath(f) for f in candidates)}); pass --data_dir=FOLDER of that dataset, "
                    "or prepare it there with prep.py")


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, feats, captions, vocab, folds=False):
    """Metrics of one split; with folds, also the mean over 5 folds of 1,000 images (COCO 1K)."""
    images, caps, scores = embed_and_score(model, feats, captions, vocab)
    return split_metrics(scores, folds), images, caps, scores


def embed_and_score(model, feats, captions, vocab):
    """A split's embeddings and their (images, captions) score matrix, as the metrics score them."""
    images, caps = encode_images(model, feats), encode_text(model, vocab, captions, tokenized=True)
    return images, caps, score_matrix(images, caps, model.measure, model.compiled)


def split_metrics(scores, folds=False):
    """The metrics of an (images, captions) score matrix; with folds, also COCO's 1K folds and their mean."""
    result = retrieval_metrics(scores)
    if folds:
        n = len(scores) // 5
        result['folds_1k'] = [retrieval_metrics(scores[f * n:(f + 1) * n, 5 * f * n:5 * (f + 1) * n]) for f in range(5)]
        result['mean_1k'] = {d: {m: float(np.mean([r[d][m] for r in result['folds_1k']])) for m in result['i2t']}
                             for d in ('i2t', 't2i')}
        result['mean_1k']['rsum'] = float(np.mean([r['rsum'] for r in result['folds_1k']]))
    return result


def print_table(title, result):
    print(title)
    print(f"{'':12s}{'R@1':>7s}{'R@5':>7s}{'R@10':>7s}{'medr':>7s}{'meanr':>8s}")
    for name, key in (('image->text', 'i2t'), ('text->image', 't2i')):
        r = result[key]
        print(f"{name:12s}{r['r1']:7.1f}{r['r5']:7.1f}{r['r10']:7.1f}{r['medr']:7.0f}{r['meanr']:8.1f}")
    print(f"{'rsum':12s}{result['rsum']:7.1f}")


def main(argv):
    cfg = parse_config({name: globals()[name] for name in CONFIG_KEYS}, argv, OPTION_RULES)
    runs = [r for r in (cfg.ensemble or cfg.compare).split(',') if r]
    if cfg.compare:
        if cfg.ensemble:
            raise UserError("--compare and --ensemble: give one of the two")
        compare_runs(runs, cfg.split)
        return
    if cfg.ensemble:
        check_ensemble_options(cfg)
    elif cfg.query or cfg.image or cfg.gallery:
        check_use_options(cfg)
    dev = pick_device(cfg.device)
    if cfg.ensemble:
        evaluate_ensemble(runs, cfg, dev)
        return
    run = load_run(cfg.out_dir, cfg, dev)
    with torch.no_grad():
        if cfg.query or cfg.image or cfg.gallery:
            use_model(run, cfg, dev)
            return
        coco_folds = is_coco_test(run.meta, run.feats, cfg.split)
        result, images, caps, scores = evaluate(run.model, run.feats, run.captions, run.ckpt['vocab'], folds=coco_folds)
    result.update(n_images=len(run.feats), n_captions=len(run.captions), measure=run.model.measure,
                  checkpoint=run.ckpt_path, data_dir=run.data, split=cfg.split)
    report(result, run.meta, coco_folds, cfg.split)
    write_outputs(result, images, caps, scores, run.files, run.captions, cfg, cfg.out_dir)


def load_run(folder, cfg, dev):
    """A run folder's --checkpoint and the --split it is evaluated on: model, ckpt, ckpt_path,
    data (the prepared folder), meta, feats (what the model takes for each image), captions, files."""
    ckpt_path = os.path.join(folder, cfg.checkpoint)
    if not os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path}: no such checkpoint; train first (python train.py) or pass --out_dir=FOLDER of a run")
    model, ckpt = load_model(ckpt_path, dev, compiled=cfg.compile)
    data_folder = cfg.data_dir or trained_data_dir(ckpt, folder)
    meta = load_meta(data_folder)
    feats, captions = load_split(data_folder, cfg.split)
    if feats.shape[-1] != ckpt['feature_dim']:
        raise UserError(f"{data_folder}: {feats.shape[-1]}-d image features, but {ckpt_path} was trained on "
                        f"{ckpt['feature_dim']}-d ones; evaluate on the dataset it was trained on (--data_dir)")
    files_path = os.path.join(data_folder, f"{cfg.split}_files.txt")
    files = open(files_path, encoding='utf-8').read().splitlines() if os.path.exists(files_path) else []
    if len(files) != len(feats):
        raise UserError(f"{files_path}: {len(files)} file names for {len(feats)} images; run prep.py again with --force=True")
    if model.backbone is not None:  # a fine-tuned CNN of its own: the split's images through it, not prep.py's features
        split_images = find_images_dir(cfg.images_dir, data_folder, meta, files)
        feats = image_features([os.path.join(split_images, f) for f in files], meta, dev, model)
    return SimpleNamespace(folder=folder, model=model, ckpt=ckpt, ckpt_path=ckpt_path, data=data_folder, meta=meta,
                           feats=feats, captions=captions, files=files)


def is_coco_test(meta, feats, split):
    return meta['dataset'] == 'coco' and split == 'test' and len(feats) == 5000


# ----------------------------------------------------------------------------- ensembles

def check_ensemble_options(cfg):
    if cfg.query or cfg.image or cfg.gallery:
        raise UserError("--ensemble scores a split; --query, --image and --gallery search with one run "
                        "(--out_dir=RUN): give them without --ensemble")
    if cfg.save_embeddings:
        raise UserError("--save_embeddings: an ensemble has no one set of embeddings (each run has its own); "
                        "save them run by run with --out_dir=RUN")


def evaluate_ensemble(folders, cfg, dev):
    """--ensemble: the split scored with the mean of the runs' score matrices, each computed as a
    single run's evaluation computes it; the results go into the first run's folder. All the
    runs are loaded and checked against the first before any scoring."""
    seen = set()
    for folder in folders:
        if os.path.realpath(folder) in seen:
            raise UserError(f"--ensemble: {folder} is listed twice; list each run once")
        seen.add(os.path.realpath(folder))
    runs = [load_run(folder, cfg, dev) for folder in folders]
    for run in runs[1:]:
        check_same_data(runs[0], run, cfg.split)
    first, total = runs[0], None
    with torch.no_grad():
        for run in runs:
            scores = embed_and_score(run.model, run.feats, run.captions, run.ckpt['vocab'])[2]
            total = scores if total is None else total + scores
        scores = total / len(runs)
        coco_folds = is_coco_test(first.meta, first.feats, cfg.split)
        result = split_metrics(scores, folds=coco_folds)
    result.update(n_images=len(first.feats), n_captions=len(first.captions), measure=first.model.measure,
                  checkpoint=[run.ckpt_path for run in runs], ensemble=folders, data_dir=first.data, split=cfg.split)
    report(result, first.meta, coco_folds, cfg.split)
    write_outputs(result, None, None, scores, first.files, first.captions, cfg, first.folder, tag='_ensemble')


def check_same_data(first, run, split):
    """A member of an ensemble must score the split as the first does: the same dataset, feature
    size, vocabulary, measure, and the same images and captions of the split."""
    pair = f"--ensemble: {run.folder} and {first.folder}"
    one_dataset = "an ensemble's runs must be trained on one prepared dataset: list runs of one dataset"
    if run.meta['dataset'] != first.meta['dataset']:
        raise UserError(f"{pair} were trained on different datasets ({run.meta['dataset']}, {first.meta['dataset']}); "
                        f"{one_dataset}")
    if run.ckpt['feature_dim'] != first.ckpt['feature_dim']:
        raise UserError(f"{pair} take image features of different sizes ({run.ckpt['feature_dim']}-d, "
                        f"{first.ckpt['feature_dim']}-d); {one_dataset}")
    if run.ckpt['vocab'] != first.ckpt['vocab']:
        raise UserError(f"{pair} have different vocabularies; {one_dataset}")
    same_folder = os.path.realpath(run.data) == os.path.realpath(first.data)
    if not same_folder and (run.files != first.files or run.captions != first.captions
                            or not np.array_equal(run.feats, first.feats)):
        raise UserError(f"{pair} were trained on different data ({run.data} and {first.data} hold different "
                        f"{split} splits); {one_dataset}")
    if run.model.measure != first.model.measure:
        raise UserError(f"{pair} use different measures ({run.model.measure}, {first.model.measure}); the mean "
                        "of order and cosine scores is no score: list runs of one measure")


def report(result, meta, coco_folds, split):
    name = f"{meta['dataset']} {split}: {result['n_images']} images, {result['n_captions']} captions, {result['measure']} measure"
    if 'ensemble' in result:
        runs = len(result['ensemble'])
        name += f", ensemble of {runs} run{'s' if runs > 1 else ''}"
    if coco_folds:
        print_table(f"{name}, 1K (mean of 5 folds)", result['mean_1k'])
        print()
        print_table(f"{name}, 5K", result)
    else:
        print_table(name, result)


def write_outputs(result, images, caps, scores, files, captions, cfg, folder, tag=''):
    """results_<split><tag>.json, and with --save_embeddings / --save_ranks the vectors and the
    ranks, into the run's folder."""
    split = cfg.split
    results_path = os.path.join(folder, f"results_{split}{tag}.json")
    write_json(results_path, result)
    if cfg.save_embeddings:
        emb_path = os.path.join(folder, f"embeddings_{split}{tag}.npz")
        with atomic_open(emb_path) as f:
            np.savez(f, images=images.cpu().numpy().astype(np.float32), captions=caps.cpu().numpy().astype(np.float32))
        print(f"wrote {emb_path}")
    if cfg.save_ranks:
        ranks_path = os.path.join(folder, f"ranks_{split}{tag}.json")
        write_ranks(ranks_path, scores, files, captions)
        print(f"wrote {ranks_path}")
    print(f"wrote {results_path}")


if __name__ == '__main__':
    run_main(main)
