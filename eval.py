"""Evaluate a trained model: recall at 1, 5 and 10, median and mean rank, in both directions.

    python eval.py --out_dir=checkpoints/flickr8k                 # test split, best.pt
    python eval.py --out_dir=checkpoints/coco --split=val --save_embeddings=True

image->text ranks each image's best-placed ground-truth caption among all captions of the
split; text->image ranks each caption's image among all images. COCO's test split is also
reported as "1K" (mean over 5 folds of 1,000 images) as well as "5K" (all of it).
Writes results_<split>.json (and embeddings_<split>.npz) into out_dir.
"""
import os

import numpy as np
import torch

from model import JointEmbedding, score_matrix
from utils import (UserError, atomic_open, embed_split, load_checkpoint, load_meta, load_split, parse_config,
                   pick_device, retrieval_metrics, run_main, write_json)

# ----------------------------------------------------------------------------- config
out_dir = 'checkpoints/flickr8k'   # a folder train.py wrote
checkpoint = 'best.pt'             # in out_dir
split = 'test'                     # train | val | test
data_dir = ''                      # default: the data_dir the checkpoint was trained on
save_embeddings = False            # write embeddings_<split>.npz: the vectors that were scored
device = 'auto'
compile = True                     # order scores through torch.compile'd kernels (needs a C++ compiler on a CPU); False: plain PyTorch
CONFIG_KEYS = [k for k, v in globals().items() if k.islower() and not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# -----------------------------------------------------------------------------


def load_model(path, dev):
    """A checkpoint written by train.py -> (model in eval mode, checkpoint dict)."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such checkpoint; train first (python train.py) or pass --out_dir=FOLDER of a run")
    ckpt = load_checkpoint(path, dev)  # weights_only: a torn, foreign or malicious file is refused, never run
    try:
        cfg = ckpt['config']
        model = JointEmbedding(ckpt['feature_dim'], len(ckpt['vocab']), cfg['word_dim'], cfg['embed_dim'], cfg['measure'])
        model.load_state_dict(ckpt['model'])
    except Exception as e:  # e.g. a config that does not match the weights' shapes
        raise UserError(f"{path}: its config does not fit its weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return model.to(dev).eval(), ckpt


def evaluate(model, feats, captions, vocab, dev, folds=False):
    """Metrics of one split; with folds, also the mean over 5 folds of 1,000 images (COCO 1K)."""
    images, caps = embed_split(model, feats, captions, vocab, dev)
    scores = score_matrix(images, caps, model.measure, model.compiled)
    result = retrieval_metrics(scores)
    if folds:
        n = len(images) // 5
        result['folds_1k'] = [retrieval_metrics(scores[f * n:(f + 1) * n, 5 * f * n:5 * (f + 1) * n]) for f in range(5)]
        result['mean_1k'] = {d: {m: float(np.mean([r[d][m] for r in result['folds_1k']])) for m in result['i2t']}
                             for d in ('i2t', 't2i')}
        result['mean_1k']['rsum'] = float(np.mean([r['rsum'] for r in result['folds_1k']]))
    return result, images, caps


def print_table(title, result):
    print(title)
    print(f"{'':12s}{'R@1':>7s}{'R@5':>7s}{'R@10':>7s}{'medr':>7s}{'meanr':>8s}")
    for name, key in (('image->text', 'i2t'), ('text->image', 't2i')):
        r = result[key]
        print(f"{name:12s}{r['r1']:7.1f}{r['r5']:7.1f}{r['r10']:7.1f}{r['medr']:7.0f}{r['meanr']:8.1f}")
    print(f"{'rsum':12s}{result['rsum']:7.1f}")


def main(argv):
    cfg = parse_config({k: globals()[k] for k in CONFIG_KEYS}, argv)
    dev = pick_device(cfg['device'])
    ckpt_path = os.path.join(cfg['out_dir'], cfg['checkpoint'])
    model, ckpt = load_model(ckpt_path, dev)
    model.compiled = cfg['compile']
    data = cfg['data_dir'] or ckpt['config']['data_dir']
    meta = load_meta(data)
    feats, captions = load_split(data, cfg['split'])
    if feats.shape[1] != ckpt['feature_dim']:
        raise UserError(f"{data}: {feats.shape[1]}-d image features, but {ckpt_path} was trained on "
                        f"{ckpt['feature_dim']}-d ones; evaluate on the dataset it was trained on (--data_dir)")
    coco_folds = meta['dataset'] == 'coco' and cfg['split'] == 'test' and len(feats) == 5000
    with torch.no_grad():
        result, images, caps = evaluate(model, feats, captions, ckpt['vocab'], dev, folds=coco_folds)
    result.update(n_images=len(feats), n_captions=len(captions), measure=model.measure,
                  checkpoint=ckpt_path, data_dir=data, split=cfg['split'])

    name = f"{meta['dataset']} {cfg['split']}: {len(feats)} images, {len(captions)} captions, {model.measure} measure"
    if coco_folds:
        print_table(f"{name}, 1K (mean of 5 folds)", result['mean_1k'])
        print()
        print_table(f"{name}, 5K", result)
    else:
        print_table(name, result)
    out = os.path.join(cfg['out_dir'], f"results_{cfg['split']}.json")
    write_json(out, result)
    if cfg['save_embeddings']:
        emb_path = os.path.join(cfg['out_dir'], f"embeddings_{cfg['split']}.npz")
        with atomic_open(emb_path) as f:
            np.savez(f, images=images.cpu().numpy().astype(np.float32), captions=caps.cpu().numpy().astype(np.float32))
        print(f"wrote {out} and {emb_path}")
    else:
        print(f"wrote {out}")


if __name__ == '__main__':
    run_main(main)
