"""A training step's random draws, each a function of (seed, iteration) alone, so that a run
stopped and resumed draws exactly what an uninterrupted one would, with any number of workers.

    step_features, DrawnCrops    of kept crops (N, C, D), one crop of each image per step
    drop_for_size, kept_first    size augmentation (VSE∞): grid vectors and words dropped per item
    mix32                        the generators' seeds from (seed, iteration)
"""
import torch


def step_features(feats, iteration, seed):
    """What a step takes its image rows from: the (N, D) features themselves, or of kept crops
    (N, C, D) one crop of each image, drawn uniformly on the device as a function of (seed,
    iteration) alone, so that a resumed run draws exactly the crops an uninterrupted one would."""
    if feats.dim() == 2:
        return feats
    generator = torch.Generator(device=feats.device).manual_seed(mix32(iteration ^ mix32(seed)))
    return DrawnCrops(feats, torch.randint(feats.shape[1], (len(feats),), generator=generator, device=feats.device))


def mix32(x):
    """MurmurHash3's finalizer, a bijection of 32-bit integers: the crop draws' generator seeds
    differ for every iteration of a run and look unrelated across seeds. 32 bits, because a CPU
    generator keeps only the low 32 bits of its seed (seed * 2**32 + iteration would ignore the seed)."""
    x &= 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


class DrawnCrops:
    """(N, C, D) crops and a crop per image, indexed like the (N, D) rows of those crops: the
    rows a step takes are gathered in one indexing on the device, never all N."""

    def __init__(self, feats, crop):
        self.feats, self.crop, self.device = feats, crop, feats.device

    def __getitem__(self, rows):
        return self.feats[rows, self.crop[rows]]


def drop_for_size(images, tokens, lengths, fraction, iteration, seed):
    """Size augmentation (VSE∞): each grid vector of each image ((B, K, D) images; one vector
    per image has none to drop) and each word of each caption is dropped with probability
    `fraction`, at least one of each kept (the one with the largest draw), so that the pooling
    meets sets of many sizes. The kept ones move to the front, in their order, padding after.
    Drawn on the CPU from (seed, iteration) alone, as the crops are, so that a resumed run drops
    exactly what an uninterrupted one would, on any device. Returns (images, image_lengths or
    None, tokens, lengths); the captions are no longer sorted by length (packing sorts them)."""
    generator = torch.Generator().manual_seed(mix32(mix32(iteration ^ mix32(seed)) ^ SIZE_AUGMENT_STREAM))
    image_lengths = None
    if images.dim() == 3:
        full = torch.full((len(images),), images.shape[1], dtype=torch.long)
        where, image_lengths = kept_first(full, images.shape[1], fraction, generator)
        where = where.to(images.device, non_blocking=True)
        images = images.gather(1, where[..., None].expand(-1, -1, images.shape[2]))
    where, lengths = kept_first(lengths, tokens.shape[1], fraction, generator)
    tokens = tokens.gather(1, where.to(tokens.device, non_blocking=True))[:, :int(lengths.max())]
    padding = torch.arange(tokens.shape[1]) >= lengths[:, None]
    return images, image_lengths, tokens.masked_fill(padding.to(tokens.device), 0), lengths


SIZE_AUGMENT_STREAM = 0x5A17E   # keeps the size draws' generators apart from the crop draws' (same seed, iteration)


def kept_first(lengths, width, fraction, generator):
    """Which of each row's first lengths[b] items survive a drop with probability `fraction`
    (at least one: the largest draw): (an index (B, width) that puts them first, in their order,
    the rest after; how many each row keeps (B,)). On the CPU."""
    draws = torch.rand(len(lengths), width, generator=generator)
    draws = draws.masked_fill(torch.arange(width) >= lengths[:, None], -1.0)   # padding is never kept
    keep = (draws >= fraction) | (draws == draws.max(1, keepdim=True).values)
    return (~keep).to(torch.uint8).argsort(dim=1, stable=True), keep.sum(1)
