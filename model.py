"""Order-embeddings (Vendrov et al., ICLR 2016) and VSE/VSE++ (Faghri et al., 2018):
the two encoders, the two similarity measures and the contrastive hinge loss."""
import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from utils import UserError

try:  # Triton ships with PyTorch's Linux builds; without it (macOS) the GPU kernel is simply absent
    import triton
    import triton.language as tl
except ImportError:
    triton = None


class JointEmbedding(nn.Module):
    """Images (precomputed CNN features) and captions (token ids) into one embed_dim space."""

    def __init__(self, feature_dim, vocab_size, word_dim=300, embed_dim=1024, measure='order', compiled=False):
        super().__init__()
        if measure not in ('order', 'cosine'):
            raise ValueError(f"measure must be 'order' or 'cosine', not {measure!r}")
        self.measure = measure
        self.compiled = compiled    # order scores through torch.compile'd kernels (order_scores)
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
        token. Packing lets a whole batch of mixed lengths run in one call. A batch sorted
        longest first (as training sorts it) is packed as it is; any other order is sorted and
        unsorted by index on the device."""
        lengths = lengths.cpu()
        longest_first = bool((lengths[:-1] >= lengths[1:]).all())
        packed = pack_padded_sequence(self.word_embed(tokens), lengths, batch_first=True,
                                      enforce_sorted=longest_first)
        _, last = self.gru(packed)        # (1, B, embed_dim), back in the batch's own order
        return self._finish(last[0])

    def scores(self, images, captions):
        return similarity(images, captions, self.measure, self.compiled)


def order_scores(images, captions, compiled=False):
    """S[i, c] = -||max(0, c - i)||^2: zero when caption c lies above image i in the reversed
    product order (the caption is the more general of the two), negative otherwise.
    Never holds the (images x captions x dims) difference whole: the straightforward broadcast
    needs 64 MB for one batch of 128 and ran 14 times slower on a 2-core CPU. compiled=True
    uses kernels that torch.compile fuses into one loop (C++ on a CPU, Triton on a GPU);
    compiled=False computes the same tile by tile in plain PyTorch."""
    if compiled:
        return CompiledOrderViolation.apply(images, captions)
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


# The same two formulas written as broadcasts: torch.compile turns each into one fused loop
# that never materializes the 3-d difference. Shapes are static (dynamic=False): the
# dynamic-shape kernels ran 2-3 times slower on a CPU; a new shape compiles once, then comes
# from inductor's on-disk cache. Compiled on first use: torch.compile costs seconds at import.
def order_forward(images, captions):
    return -(captions[None] - images[:, None]).clamp(min=0).pow(2).sum(-1)


def order_backward(grad, images, captions):
    weighted = (captions[None] - images[:, None]).clamp(min=0) * grad[:, :, None]
    return 2 * weighted.sum(1), -2 * weighted.sum(0)


_compiled = {}


def run_compiled(fn, *args):
    if fn not in _compiled:
        # inductor imports cpp_extension, which warns on stderr about CUDA_HOME on a machine
        # without CUDA: noise that would break the one-line error messages
        logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
        _compiled[fn] = torch.compile(fn, dynamic=False)
    try:
        return _compiled[fn](*args)
    except Exception as e:  # no C++ compiler, no room for inductor's cache, ...
        raise compile_failed('torch.compile', e) from e


def compile_failed(compiler, e):
    first = (str(e).strip().splitlines() or [''])[0][:200]
    return UserError(f"{compiler} could not build the order-score kernel ({type(e).__name__}: {first}); "
                     "pass --compile=False to use the plain PyTorch path")


class CompiledOrderViolation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, captions):
        ctx.save_for_backward(images, captions)
        return run_compiled(order_forward, images, captions)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        images, captions = ctx.saved_tensors
        return run_compiled(order_backward, grad.contiguous(), images, captions)


# On CUDA, ranking a test set takes one hand-tiled Triton kernel: each program keeps a
# (BLOCK_I x BLOCK_C) tile of scores in registers and walks the dimensions once, reading a
# column of images and of captions per step (contiguous, since both come in transposed). The
# (images x captions x dims) difference never exists, and each input is read once per tile
# instead of once per score as in inductor's fused reduction.
if triton is not None:
    @triton.jit
    def order_scores_kernel(images_t, captions_t, out, n_images, n_captions, dim,
                            BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
        i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        i_ok, c_ok = i < n_images, c < n_captions
        total = tl.zeros((BLOCK_I, BLOCK_C), dtype=tl.float32)
        for k in range(0, dim):
            image = tl.load(images_t + k * n_images + i, mask=i_ok, other=0.0)
            caption = tl.load(captions_t + k * n_captions + c, mask=c_ok, other=0.0)
            violation = tl.maximum(caption[None, :] - image[:, None], 0.0)
            total += violation * violation
        tl.store(out + i[:, None].to(tl.int64) * n_captions + c[None, :], -total,
                 mask=i_ok[:, None] & c_ok[None, :])

    # Tile shapes are timed on the GPU at the first call of each problem size (Triton's
    # autotuner). Triton's CPU interpreter (TRITON_INTERPRET=1, the tests) cannot time
    # anything, so there the first shape is used.
    TRITON_TILES = [triton.Config({'BLOCK_I': i, 'BLOCK_C': c}, num_warps=w)
                    for i, c, w in ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8))]
    if os.environ.get('TRITON_INTERPRET') != '1':
        order_scores_kernel = triton.autotune(TRITON_TILES, key=['n_images', 'n_captions', 'dim'])(order_scores_kernel)


def triton_order_scores(images, captions):
    """order_scores(images, captions) for ranking (no gradient), by order_scores_kernel."""
    if triton is None:
        raise UserError("the Triton order kernel needs the triton package (it ships with PyTorch on Linux); "
                        "pass --compile=False")
    n_images, n_captions = len(images), len(captions)
    out = torch.empty(n_images, n_captions, device=images.device, dtype=torch.float32)
    images_t, captions_t = images.float().t().contiguous(), captions.float().t().contiguous()
    tiles = {} if hasattr(order_scores_kernel, 'configs') else TRITON_TILES[0].kwargs
    grid = lambda tile: (triton.cdiv(n_images, tile['BLOCK_I']), triton.cdiv(n_captions, tile['BLOCK_C']))  # noqa: E731
    try:
        order_scores_kernel[grid](images_t, captions_t, out, n_images, n_captions, images.shape[1], **tiles)
    except (triton.CompilationError, triton.OutOfResources) as e:
        raise compile_failed('Triton', e) from e
    return out


def cosine_scores(images, captions):
    return images @ captions.t()


def similarity(images, captions, measure, compiled=False):
    if measure == 'order':
        return order_scores(images, captions, compiled)
    return cosine_scores(images, captions)


def score_matrix(images, captions, measure, compiled=False, chunk_elements=2 ** 26):
    """The full (n_images, n_captions) score matrix in blocks, so that memory stays bounded
    (the tiled path's difference never exceeds chunk_elements). The compiled order kernel
    takes (1,024 images x 512 captions) blocks, which keep the captions in cache (whole rows
    of 25,000 captions ran 2.5 times slower on a 2-core CPU), all of one shape, the last ones
    padded, so that it is compiled once. On CUDA the compiled order path is the Triton kernel,
    whole matrix at once."""
    if measure == 'order' and compiled and images.is_cuda:
        return triton_order_scores(images, captions)
    out = torch.empty(len(images), len(captions), device=images.device)
    with torch.no_grad():
        if measure == 'order' and compiled:
            rows, cols = min(len(images), 1024), min(len(captions), 512)
            images, captions = pad_rows(images, rows), pad_rows(captions, cols)
            for r in range(0, len(out), rows):
                for c in range(0, out.shape[1], cols):
                    block = order_scores(images[r:r + rows], captions[c:c + cols], compiled=True)
                    out[r:r + rows, c:c + cols] = block[:len(out) - r, :out.shape[1] - c]
            return out
        if measure == 'cosine':
            return torch.mm(images, captions.t(), out=out)   # one matmul: blocks of rows re-read the captions
        rows = max(1, chunk_elements // max(1, captions.numel()))
        for r in range(0, len(images), rows):
            out[r:r + rows] = order_scores(images[r:r + rows], captions)
    return out


def pad_rows(x, multiple):
    """x with zero rows appended up to a multiple of `multiple` rows."""
    missing = -len(x) % multiple
    return torch.cat([x, x.new_zeros(missing, *x.shape[1:])]) if missing else x


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
