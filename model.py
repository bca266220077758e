"""The model: order-embeddings (Vendrov et al., ICLR 2016) and VSE/VSE++ (Faghri et al., 2018).

    ModelConfig                    what the architecture is; every checkpoint keeps it
    JointEmbedding                 images and captions into one space; the image side takes prepared
                                   features (one vector or a grid of K per image), or pixels when the
                                   model has a CNN (fine-tuning)
    GPO, positional_encoding       the Generalized Pooling Operator (VSE∞): K vectors -> one, per dimension
    Backbone, cnn_stages           the CNN inside the image encoder: batch norm frozen, its first
                                   stages frozen too (cnn_frozen_stages)
    build_model, load_model        a model from its config; a model from a checkpoint train.py wrote
    order_scores, cosine_scores    the two measures, in their plain form (the definitions)
    similarity, score_matrix       a training batch's scores; a whole test set's (kernels.py)
    contrastive_loss               the hinge loss, summed over negatives or on the hardest one
"""
import contextlib
import dataclasses
import io
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from kernels import Dropout, compiled_order_scores, score_matrix, tiled_order_scores  # noqa: F401 (score_matrix: for the scripts)
from utils import UserError, load_checkpoint


@dataclasses.dataclass
class ModelConfig:
    feature_dim: int              # the image features' size (the CNN's, when there is one)
    vocab_size: int
    word_dim: int = 300
    embed_dim: int = 1024
    measure: str = 'order'        # 'order' or 'cosine'
    word_dropout: float = 0.0     # while training, on the word vectors
    image_dropout: float = 0.0    # while training, on the image features
    cnn: str = ''                 # a CNN inside the image encoder (fine-tuning), e.g. 'efficientnet_lite0'
    cnn_frozen_stages: int = 0    # its first stages keep their weights
    pooling: str = 'mean'         # grid features (B, K, D): image_fc maps each vector, then 'mean' or 'gpo' pools them
    caption_pooling: str = 'last' # 'last': the GRU's state at the last word; 'gpo': GPO over a bidirectional GRU's states


class JointEmbedding(nn.Module):
    """Images and captions into one embed_dim space (the positive orthant, for the order measure)."""

    def __init__(self, config, cnn_weights=None, device='cpu', dtype='float32'):
        super().__init__()
        if config.measure not in ('order', 'cosine'):
            raise ValueError(f"measure must be 'order' or 'cosine', not {config.measure!r}")
        if config.pooling not in ('mean', 'gpo') or config.caption_pooling not in ('last', 'gpo'):
            raise ValueError(f"pooling must be 'mean' or 'gpo' and caption_pooling 'last' or 'gpo', not "
                             f"{config.pooling!r} and {config.caption_pooling!r}")
        self.config, self.measure = config, config.measure
        self.compiled = False   # order scores through kernels.py's torch.compile'd kernels (a speed switch)
        # kernels.Dropout is nn.Dropout with the mask drawn faster on a CPU; model.eval() turns it off.
        self.image_dropout = Dropout(config.image_dropout)
        self.word_dropout = Dropout(config.word_dropout)
        self.backbone = Backbone(config, cnn_weights, device, dtype) if config.cnn else None
        self.image_fc = nn.Linear(config.feature_dim, config.embed_dim)
        self.word_embed = nn.Embedding(config.vocab_size, config.word_dim, padding_idx=0)
        self.gru = nn.GRU(config.word_dim, config.embed_dim, batch_first=True,
                          bidirectional=config.caption_pooling == 'gpo')
        # As in the order-embedding and VSE++ code: Xavier for the image map, small uniform words.
        nn.init.xavier_uniform_(self.image_fc.weight)
        nn.init.zeros_(self.image_fc.bias)
        nn.init.uniform_(self.word_embed.weight, -0.1, 0.1)
        # Made last, and only when asked for: the default model's parameters, state_dict keys and
        # random draws at construction stay those of every checkpoint written before GPO.
        self.image_gpo = GPO() if config.pooling == 'gpo' else None
        self.caption_gpo = GPO() if config.caption_pooling == 'gpo' else None

    def normalize_embedding(self, x):
        # The order measure lives in the positive orthant: abs() after normalization.
        x = F.normalize(x.float(), dim=1)
        return x.abs() if self.measure == 'order' else x

    def encode_images(self, images, lengths=None):
        """(B, D) prepared features, (B, K, D) grid vectors (lengths: how many of each image's K
        are real, the rest padding; None: all K), or (B, 3, H, W) pixels through the CNN ->
        (B, embed_dim). Grid vectors are each mapped by image_fc, then pooled (config.pooling)."""
        if images.dim() == 4:
            if self.backbone is None:
                raise ValueError("this model has no CNN: give it prepared features, not pixels")
            images = self.backbone(images)
        mapped = self.image_fc(self.image_dropout(images))
        if mapped.dim() == 3:
            mapped = self.pool_images(mapped, lengths)
        return self.normalize_embedding(mapped)

    def pool_images(self, mapped, lengths):
        """(B, K, embed_dim) mapped grid vectors -> (B, embed_dim): their mean, or GPO."""
        if lengths is None:
            if self.image_gpo is None:
                return mapped.mean(1)
            lengths = torch.full((len(mapped),), mapped.shape[1], dtype=torch.long)
        if self.image_gpo is not None:
            return self.image_gpo(mapped, lengths)
        lengths = lengths.to(mapped.device)
        real = torch.arange(mapped.shape[1], device=mapped.device) < lengths[:, None]
        return (mapped * real[..., None]).sum(1) / lengths[:, None]

    def encode_captions(self, tokens, lengths):
        """tokens (B, L) padded with 0, lengths (B,): the GRU state at each caption's own last
        token, or (caption_pooling 'gpo') GPO over the words' states of a bidirectional GRU, its
        two directions averaged per word (as VSE∞ does). Packing lets a batch of mixed lengths
        run in one call; a batch sorted longest first (as training sorts it) needs no sort on the device."""
        lengths = lengths.cpu()
        longest_first = bool((lengths[:-1] >= lengths[1:]).all())
        packed = pack_padded_sequence(self.word_dropout(self.word_embed(tokens)), lengths, batch_first=True,
                                      enforce_sorted=longest_first)
        if self.caption_gpo is None:
            _, last = self.gru(packed)        # (1, B, embed_dim), back in the batch's own order
            return self.normalize_embedding(last[0])
        states, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True)   # (B, L, 2 embed_dim), the batch's order
        forward, backward = states.chunk(2, dim=-1)
        return self.normalize_embedding(self.caption_gpo((forward + backward) / 2, lengths))

    def scores(self, images, captions):
        return similarity(images, captions, self.measure, self.compiled)

    def parameter_groups(self):
        """[the encoders' parameters, the CNN's] (the CNN's empty without one): Adam gives each its rate."""
        cnn = list(self.backbone.parameters()) if self.backbone is not None else []
        ids = {id(p) for p in cnn}
        return [[p for p in self.parameters() if id(p) not in ids], cnn]


# ----------------------------------------------------------------------------- GPO (VSE∞)

class GPO(nn.Module):
    """The Generalized Pooling Operator of VSE∞ (Chen et al., CVPR 2021): of K vectors, each
    dimension's K values sorted in descending order and summed with weights that depend only on
    the position in that order and on K. The weights: a bidirectional GRU over a sine/cosine
    encoding of the positions 0..K-1, its two directions averaged, a linear map to one score per
    position, and a softmax at temperature 0.1 over the K positions. With one weight of 1 at
    position 0 it would be max pooling, with all equal the mean: it learns where in between."""

    def __init__(self, d_pe=32, d_hidden=32, temperature=0.1):
        super().__init__()
        self.d_pe, self.temperature = d_pe, temperature
        self.gru = nn.GRU(d_pe, d_hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(d_hidden, 1, bias=False)

    def weights(self, sizes):
        """sizes (S,) distinct K, on the CPU -> (S, max K) float32: row s the weights of the
        positions 0..sizes[s]-1, summing to 1, and zero beyond. All sizes in one packed GRU call."""
        longest = int(sizes.max())
        device = self.score.weight.device
        codes = positional_encoding(longest, self.d_pe, device).expand(len(sizes), -1, -1)
        packed = pack_padded_sequence(codes, sizes, batch_first=True, enforce_sorted=False)
        states, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=longest)
        forward, backward = states.chunk(2, dim=-1)
        scores = self.score((forward + backward) / 2)[..., 0].float()
        real = torch.arange(longest, device=device) < sizes.to(device)[:, None]
        return torch.softmax(scores.masked_fill(~real, -math.inf) / self.temperature, dim=1)

    def forward(self, features, lengths):
        """features (B, K, D), lengths (B,) on the CPU: how many of each row's K vectors are real
        (the rest padding, which gets no weight) -> (B, D)."""
        sizes, which = torch.unique(lengths.cpu(), return_inverse=True)
        weights = self.weights(sizes)[which.to(features.device)]               # (B, max size)
        real = (torch.arange(features.shape[1]) < lengths.cpu()[:, None]).to(features.device)[..., None]
        # padding sorts last (-inf), then counts as 0 so that 0 weight x -inf makes no NaN
        ranked = features.masked_fill(~real, -math.inf).sort(dim=1, descending=True).values.masked_fill(~real, 0)
        return (ranked[:, :weights.shape[1]] * weights[..., None]).sum(1)


def positional_encoding(n, dim, device='cpu'):
    """(n, dim) sine/cosine codes of the positions 0..n-1 (Vaswani et al.): sines in the even
    columns, cosines in the odd ones, wavelengths from 2 pi to 10000 x 2 pi."""
    position = torch.arange(n, dtype=torch.float32, device=device)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    codes = torch.zeros(n, dim, device=device)
    codes[:, 0::2] = torch.sin(position * rate)
    codes[:, 1::2] = torch.cos(position * rate)[:, :dim // 2]
    return codes


# ----------------------------------------------------------------------------- the CNN (fine-tuning)

class Backbone(nn.Module):
    """A features.build_backbone network inside the image encoder. Batch norm stays in eval mode,
    as in VSE++: its running statistics are ImageNet's (a batch of one caption set's images would
    replace them); its scale and shift still train. The output is L2-normalized, as prep.py
    writes the features that the warm-up trains on."""

    def __init__(self, config, weights, device, dtype):
        super().__init__()
        import features
        device = torch.device(device)
        # weights None: the architecture only, quietly, for a checkpoint's weights to replace;
        # the global RNG is left alone either way (a 'random' network seeds it).
        quiet = contextlib.redirect_stdout(io.StringIO()) if weights is None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[]), quiet:
            self.net, dim = features.build_backbone(config.cnn, weights or 'random', device, dtype)
        if dim != config.feature_dim:
            raise UserError(f"--finetune=True: {config.cnn} gives {dim}-d features, the model takes {config.feature_dim}-d")
        self.cnn, self.channels_last = config.cnn, features.uses_channels_last(device, dtype)
        stages = cnn_stages(self.net, config.cnn)
        if config.cnn_frozen_stages >= len(stages):
            raise UserError(f"--cnn_frozen_stages={config.cnn_frozen_stages}: {config.cnn} has {len(stages)} stages, "
                            f"so at most {len(stages) - 1} can stay frozen for the rest to train")
        # Frozen stages get no gradient, so autograd stops before them and skips their backward.
        for stage in stages[:config.cnn_frozen_stages]:
            for module in stage:
                module.requires_grad_(False)
        self.train()

    def train(self, mode=True):
        super().train(mode)
        for m in self.net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x):
        from features import in_cpu_passes
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Batch norm is frozen, so an image's features do not depend on the others in its pass.
        return F.normalize(in_cpu_passes(self.net, x).float(), dim=1)


def cnn_stages(net, cnn):
    """The network's stages from the input on, each a list of modules: EfficientNet-Lite0 its
    stem, 7 block stages and head (9); VGG its 5 conv blocks, fc6 and fc7 (7); ResNet its stem
    and 4 layers (5); any other network its top-level modules."""
    if cnn == 'efficientnet_lite0':
        return [[net.conv_stem, net.bn1], *[[block] for block in net.blocks], [net.conv_head, net.bn2]]
    if cnn.startswith('vgg'):
        stages, stage = [], []
        for layer in net.features:
            stage.append(layer)
            if isinstance(layer, nn.MaxPool2d):
                stages, stage = stages + [stage], []
        return stages + [[net.classifier[0]], [net.classifier[3]]]
    if cnn.startswith('resnet'):
        return [[net.conv1, net.bn1], [net.layer1], [net.layer2], [net.layer3], [net.layer4]]
    return [[module] for module in net.children()]


# ----------------------------------------------------------------------------- building and loading

def build_model(config, device='cpu', dtype='float32', cnn_weights=None, compiled=False):
    """A JointEmbedding on `device`; cnn_weights: the weights its CNN starts from (None: the
    architecture only, for a checkpoint's weights to replace)."""
    model = JointEmbedding(config, cnn_weights, device, dtype).to(device)
    model.compiled = compiled
    return model


def model_config_of(ckpt):
    """The ModelConfig a checkpoint keeps; from the options of one written before it kept one."""
    if 'model_config' in ckpt:
        return ModelConfig(**ckpt['model_config'])
    c = ckpt['config']
    return ModelConfig(ckpt['feature_dim'], len(ckpt['vocab']), c['word_dim'], c['embed_dim'], c['measure'],
                       cnn=c.get('cnn', '') if c.get('finetune') else '')


def load_model(path, device, compiled=False):
    """A checkpoint train.py wrote -> (the model it holds, in eval mode, on device; the checkpoint dict)."""
    ckpt = load_checkpoint(path, device)  # weights_only: a torn, foreign or malicious file is refused, never run
    try:
        model = build_model(model_config_of(ckpt), device, compiled=compiled)
        model.load_state_dict(ckpt['model'])
    except UserError:
        raise
    except Exception as e:  # e.g. a config that does not match the weights' shapes
        raise UserError(f"{path}: its config does not fit its weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); use a checkpoint written by train.py") from None
    return model.eval(), ckpt


# ----------------------------------------------------------------------------- the measures and the loss

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
