"""Order-embeddings (Vendrov et al., ICLR 2016) and VSE/VSE++ (Faghri et al., 2018): the two
encoders (JointEmbedding), the two similarity measures in their plain form (order_scores,
cosine_scores), the scores a training batch takes (similarity) and the contrastive hinge loss.
kernels.py computes order_scores faster; score_matrix (from there) scores a whole test set."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from kernels import Dropout, compiled_order_scores, score_matrix, tiled_order_scores  # noqa: F401 (score_matrix: for train.py, eval.py)


class JointEmbedding(nn.Module):
    """Images (precomputed CNN features) and captions (token ids) into one embed_dim space."""

    def __init__(self, feature_dim, vocab_size, word_dim=300, embed_dim=1024, measure='order', compiled=False,
                 word_dropout=0.0, image_dropout=0.0):
        super().__init__()
        if measure not in ('order', 'cosine'):
            raise ValueError(f"measure must be 'order' or 'cosine', not {measure!r}")
        self.measure = measure
        self.compiled = compiled    # order scores through kernels.py's torch.compile'd kernels
        # Against overfitting (docs/recipe.md): dropout on the image features and on the word
        # vectors while training; model.eval() turns both off. kernels.Dropout is nn.Dropout,
        # with the mask drawn faster on a CPU.
        self.image_dropout = Dropout(image_dropout)
        self.word_dropout = Dropout(word_dropout)
        self.image_fc = nn.Linear(feature_dim, embed_dim)
        self.word_embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, embed_dim, batch_first=True)
        # As in the order-embedding and VSE++ code: Xavier for the image map, small uniform words.
        nn.init.xavier_uniform_(self.image_fc.weight)
        nn.init.zeros_(self.image_fc.bias)
        nn.init.uniform_(self.word_embed.weight, -0.1, 0.1)

    def normalize_embedding(self, x):
        # The order measure lives in the positive orthant: abs() after normalization.
        x = F.normalize(x.float(), dim=1)
        return x.abs() if self.measure == 'order' else x

    def encode_images(self, feats):
        return self.normalize_embedding(self.image_fc(self.image_dropout(feats)))

    def encode_captions(self, tokens, lengths):
        """tokens (B, L) padded with 0, lengths (B,): the GRU state at each caption's own last
        token. Packing lets a whole batch of mixed lengths run in one call. A batch sorted
        longest first (as training sorts it) is packed as it is; any other order is sorted and
        unsorted by index on the device."""
        lengths = lengths.cpu()
        longest_first = bool((lengths[:-1] >= lengths[1:]).all())
        packed = pack_padded_sequence(self.word_dropout(self.word_embed(tokens)), lengths, batch_first=True,
                                      enforce_sorted=longest_first)
        _, last = self.gru(packed)        # (1, B, embed_dim), back in the batch's own order
        return self.normalize_embedding(last[0])

    def scores(self, images, captions):
        return similarity(images, captions, self.measure, self.compiled)


def order_scores(images, captions):
    """S[i, c] = -||max(0, c - i)||^2: zero when caption c lies above image i in the reversed
    product order (the caption is the more general of the two), negative otherwise. The
    definition: every path in kernels.py is tested against it."""
    return -(captions[None, :, :] - images[:, None, :]).clamp(min=0).pow(2).sum(-1)


def cosine_scores(images, captions):
    return images @ captions.t()


def similarity(images, captions, measure, compiled=False):
    """A training batch's (images, captions) score matrix, with gradients."""
    if measure == 'cosine':
        return cosine_scores(images, captions)
    # order_scores as written holds the (images x captions x dims) difference, and autograd
    # keeps copies of it: slow on a CPU and large for a training batch. kernels.py computes the
    # same numbers without it (compiled when asked, else tile by tile in plain PyTorch).
    if compiled:
        return compiled_order_scores(images, captions)
    return tiled_order_scores(images, captions)


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
