"""Order-embeddings (Vendrov et al., ICLR 2016) and VSE/VSE++ (Faghri et al., 2018):
the two encoders, the two similarity measures and the contrastive hinge loss."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence


class JointEmbedding(nn.Module):
    """Images (precomputed CNN features) and captions (token ids) into one embed_dim space."""

    def __init__(self, feature_dim, vocab_size, word_dim=300, embed_dim=1024, measure='order'):
        super().__init__()
        if measure not in ('order', 'cosine'):
            raise ValueError(f"measure must be 'order' or 'cosine', not {measure!r}")
        self.measure = measure
        self.image_fc = nn.Linear(feature_dim, embed_dim)
        self.word_embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, embed_dim, batch_first=True)
        # As in the order-embedding and VSE++ code: Xavier for the image map, small uniform words.
        nn.init.xavier_uniform_(self.image_fc.weight)
        nn.init.zeros_(self.image_fc.bias)
        nn.init.uniform_(self.word_embed.weight, -0.1, 0.1)

    def _finish(self, x):
        # The order measure lives in the positive orthant: abs() after normalization.
        x = F.normalize(x.float(), dim=1)
        return x.abs() if self.measure == 'order' else x

    def encode_images(self, feats):
        return self._finish(self.image_fc(feats))

    def encode_captions(self, tokens, lengths):
        """tokens (B, L) padded with 0, lengths (B,): the GRU state at each caption's own last
        token. Packing lets a whole batch of mixed lengths run in one call."""
        packed = pack_padded_sequence(self.word_embed(tokens), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, last = self.gru(packed)        # (1, B, embed_dim), back in the batch's own order
        return self._finish(last[0])

    def scores(self, images, captions):
        return similarity(images, captions, self.measure)


def order_scores(images, captions):
    """S[i, c] = -||max(0, c - i)||^2: zero when caption c lies above image i in the reversed
    product order (the caption is the more general of the two), negative otherwise.
    Computed tile by tile, forward and backward, so that the (images x captions x dims)
    difference is never held whole: the straightforward broadcast needs 64 MB for one batch
    of 128 and ran 14 times slower on a 2-core CPU."""
    return OrderViolation.apply(images, captions)


def order_tiles(images, captions):
    """Yield (rows, cols, relu(c - i)) over tiles small enough to stay in cache on a CPU
    (on a GPU, large enough to keep it busy)."""
    budget = 2 ** 26 if images.is_cuda else 2 ** 17       # elements per (rows x cols x dims) tile
    dim = images.shape[1]
    cols = max(1, min(len(captions), budget // dim))
    rows = max(1, budget // (cols * dim))
    for r in range(0, len(images), rows):
        for c in range(0, len(captions), cols):
            tile = captions[None, c:c + cols] - images[r:r + rows, None]
            yield slice(r, r + rows), slice(c, c + cols), tile.clamp_(min=0)


class OrderViolation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, captions):
        ctx.save_for_backward(images, captions)
        out = images.new_empty(len(images), len(captions))
        for rows, cols, tile in order_tiles(images, captions):
            out[rows, cols] = -torch.linalg.vecdot(tile, tile)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        # dS[i,c]/d images[i] = 2 relu(c - i) and dS[i,c]/d captions[c] = -2 relu(c - i):
        # recompute each tile rather than keep it from the forward pass.
        images, captions = ctx.saved_tensors
        grad_images, grad_captions = torch.zeros_like(images), torch.zeros_like(captions)
        for rows, cols, tile in order_tiles(images, captions):
            g = grad[rows, cols]
            grad_images[rows] += 2 * torch.bmm(g.unsqueeze(1), tile).squeeze(1)
            grad_captions[cols] -= 2 * (g.unsqueeze(-1) * tile).sum(0)
        return grad_images, grad_captions


def cosine_scores(images, captions):
    return images @ captions.t()


def similarity(images, captions, measure):
    return order_scores(images, captions) if measure == 'order' else cosine_scores(images, captions)


def score_matrix(images, captions, measure, chunk_elements=2 ** 26):
    """The full (n_images, n_captions) score matrix, computed in blocks of images so that the
    (images x captions x dims) difference of the order measure never exceeds chunk_elements."""
    out = torch.empty(len(images), len(captions), device=images.device)
    rows = max(1, chunk_elements // max(1, captions.numel()))
    with torch.no_grad():
        for start in range(0, len(images), rows):
            out[start:start + rows] = similarity(images[start:start + rows], captions, measure)
    return out


def contrastive_loss(scores, margin, max_violation=False):
    """Hinge loss on a (B, B) score matrix whose diagonal holds the matching pairs, in both
    directions: each image against the other captions (rows) and each caption against the
    other images (columns). Summed over negatives, or only the hardest one (VSE++)."""
    positive = scores.diag()
    cost_captions = (margin + scores - positive[:, None]).clamp(min=0)
    cost_images = (margin + scores - positive[None, :]).clamp(min=0)
    diagonal = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    cost_captions = cost_captions.masked_fill(diagonal, 0)
    cost_images = cost_images.masked_fill(diagonal, 0)
    if max_violation:
        return cost_captions.max(1).values.sum() + cost_images.max(0).values.sum()
    return cost_captions.sum() + cost_images.sum()
