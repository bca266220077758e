"""Fast paths for model.py, for speed only: the order-violation scores (model.order_scores), each
computing the same numbers as model.order_scores to float rounding, and dropout on a CPU; the
tests hold each to the plain computation (tests/test_speed.py, tests/test_cuda.py).

- tiled_order_scores: plain PyTorch, tile by tile, with its own backward; never holds the
  (images x captions x dims) difference that the plain broadcast builds (and keeps for autograd).
- order_backward_of_few: both paths' backward when the scores' gradient is sparse (the
  hardest-negative loss), over the nonzero pairs only.
- compiled_order_scores: the same through torch.compile, which fuses the broadcast into one
  loop (C++ on a CPU, Triton on a GPU); compiled once per shape, a failure is one clear error.
- triton_order_scores: a hand-tiled Triton kernel with autotuned tile shapes, for ranking a
  test set on CUDA (no gradient).
- score_matrix: a whole evaluation set's (images x captions) scores, for either measure, in
  blocks so that memory stays bounded, by the fastest path asked for.
- Dropout: nn.Dropout with a CPU mask drawn four elements to a 64-bit random draw.
"""
import logging
import os

import torch

from utils import UserError

try:  # Triton ships with PyTorch's Linux builds; without it (macOS) the GPU kernel is simply absent
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# ----------------------------------------------------------------------------- tiled, plain PyTorch

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


class TiledOrderScores(torch.autograd.Function):
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
        if few_nonzero(grad):
            return order_backward_of_few(grad, images, captions)
        grad_images, grad_captions = torch.zeros_like(images), torch.zeros_like(captions)
        for rows, cols, tile in order_tiles(images, captions):
            g = grad[rows, cols]
            grad_images[rows] += 2 * torch.bmm(g.unsqueeze(1), tile).squeeze(1)
            grad_captions[cols] -= 2 * (g.unsqueeze(-1) * tile).sum(0)
        return grad_images, grad_captions


def few_nonzero(grad):
    """True when a CPU gradient of the scores is sparse enough that visiting its nonzero pairs
    beats the dense pass: the hardest-negative loss leaves at most 2 per row and column."""
    return not grad.is_cuda and int(torch.count_nonzero(grad)) * 32 <= grad.numel()


def order_backward_of_few(grad, images, captions):
    """The order scores' backward over the nonzero entries of grad only, with the dense pass's
    formula: each pair (i, c) adds 2 g relu(c - i) to images[i] and subtracts it from captions[c]."""
    rows, cols = grad.nonzero(as_tuple=True)
    weighted = 2 * grad[rows, cols, None] * (captions[cols] - images[rows]).clamp_(min=0)
    grad_images = torch.zeros_like(images).index_add_(0, rows, weighted)
    grad_captions = torch.zeros_like(captions).index_add_(0, cols, weighted, alpha=-1)
    return grad_images, grad_captions


def tiled_order_scores(images, captions):
    """model.order_scores(images, captions), with gradients, tile by tile."""
    return TiledOrderScores.apply(images, captions)


# ----------------------------------------------------------------------------- torch.compile

# model.order_scores and its gradient written as broadcasts, which torch.compile turns into
# fused loops that never materialize the 3-d difference (this file imports nothing from
# model.py, which imports it). Shapes are static (dynamic=False) because the dynamic-shape
# kernels are slower on a CPU; a new shape compiles once, then comes from inductor's on-disk
# cache. Compiled on first use, so that importing this file costs no compilation.
def order_forward(images, captions):
    return -(captions[None] - images[:, None]).clamp(min=0).pow(2).sum(-1)


def order_backward(grad, images, captions):
    weighted = (captions[None] - images[:, None]).clamp(min=0) * grad[:, :, None]
    return 2 * weighted.sum(1), -2 * weighted.sum(0)


compiled_kernels = {}   # order_forward / order_backward -> its torch.compile'd version


def run_compiled(fn, *args):
    if fn not in compiled_kernels:
        # inductor imports cpp_extension, which warns on stderr about CUDA_HOME on a machine
        # without CUDA: noise that would break the one-line error messages
        logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
        compiled_kernels[fn] = torch.compile(fn, dynamic=False)
    try:
        return compiled_kernels[fn](*args)
    except Exception as e:  # no C++ compiler, no room for inductor's cache, ...
        raise compile_failed('torch.compile', e) from e


def compile_failed(compiler, e):
    first = (str(e).strip().splitlines() or [''])[0][:200]
    return UserError(f"{compiler} could not build the order-score kernel ({type(e).__name__}: {first}); "
                     "pass --compile=False to use the plain PyTorch path")


class CompiledOrderScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, captions):
        ctx.save_for_backward(images, captions)
        return run_compiled(order_forward, images, captions)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        images, captions = ctx.saved_tensors
        if few_nonzero(grad):
            return order_backward_of_few(grad, images, captions)
        return run_compiled(order_backward, grad.contiguous(), images, captions)


def compiled_order_scores(images, captions):
    """model.order_scores(images, captions), with gradients, by torch.compile'd kernels."""
    return CompiledOrderScores.apply(images, captions)


# ----------------------------------------------------------------------------- Triton (CUDA)

# Ranking a test set on CUDA takes one hand-tiled kernel: each program keeps a
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
    """model.order_scores(images, captions) for ranking (no gradient), by order_scores_kernel."""
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


# ----------------------------------------------------------------------------- evaluation

def score_matrix(images, captions, measure, compiled=False, chunk_elements=2 ** 26):
    """The full (n_images, n_captions) score matrix of an evaluation set, without gradients.
    Order scores: compiled on CUDA, the Triton kernel, whole matrix at once; compiled elsewhere,
    torch.compile'd blocks (blocked_compiled_order_scores); else the tiled path on chunks of
    rows, whose difference never exceeds chunk_elements. Cosine: one matrix product."""
    if measure == 'order' and compiled and images.is_cuda:
        return triton_order_scores(images, captions)
    out = torch.empty(len(images), len(captions), device=images.device)
    with torch.no_grad():
        if measure == 'order' and compiled:
            return blocked_compiled_order_scores(images, captions, out)
        if measure == 'cosine':
            return torch.mm(images, captions.t(), out=out)   # one matmul: blocks of rows re-read the captions
        rows = max(1, chunk_elements // max(1, captions.numel()))
        for r in range(0, len(images), rows):
            out[r:r + rows] = tiled_order_scores(images[r:r + rows], captions)
    return out


def blocked_compiled_order_scores(images, captions, out):
    """The compiled order kernel over (1,024 images x 512 captions) blocks, written into out.
    Blocks of a few hundred captions stay in cache where whole rows of a test set's captions
    do not; all blocks have one shape, the last ones padded, so that it is compiled once."""
    rows, cols = min(len(images), 1024), min(len(captions), 512)
    images, captions = pad_rows(images, rows), pad_rows(captions, cols)
    for r in range(0, len(out), rows):
        for c in range(0, out.shape[1], cols):
            block = compiled_order_scores(images[r:r + rows], captions[c:c + cols])
            out[r:r + rows, c:c + cols] = block[:len(out) - r, :out.shape[1] - c]
    return out


def pad_rows(x, multiple):
    """x with zero rows appended up to a multiple of `multiple` rows."""
    missing = -len(x) % multiple
    return torch.cat([x, x.new_zeros(missing, *x.shape[1:])]) if missing else x


# ----------------------------------------------------------------------------- dropout on a CPU

class Dropout(torch.nn.Dropout):
    """nn.Dropout, faster on a CPU: there bernoulli_ draws one random number per element, and the
    drawing is most of a training step's dropout time. Here each element takes 16 bits of the
    process's RNG (4 elements to a 64-bit draw): it is zeroed with probability p rounded to a
    multiple of 1/65536 (0.5 exactly) and otherwise scaled by 1 / (1 - p), as F.dropout does. The
    same generator, so seeded runs and exact resume stay as they were. On other devices, and for
    p = 0 or 1: nn.Dropout itself."""

    def forward(self, x):
        if not self.training or x.device.type != 'cpu' or not 0 < self.p < 1:
            return super().forward(x)
        return x * cpu_dropout_mask(x, self.p)


def cpu_dropout_mask(x, p):
    """A tensor shaped as x, in x's dtype: 0 with probability p (to 1/65536), else 1 / (1 - p)."""
    draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)   # all 64 bits random
    bits = draws.view(torch.int16)[:x.numel()].view(x.shape)   # uniform on [-32768, 32767]
    keep = bits >= round(p * 65536) - 32768
    return keep.to(x.dtype) * (1 / (1 - p))
