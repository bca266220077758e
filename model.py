"""The model: order-embeddings (Vendrov et al., ICLR 2016) and VSE/VSE++ (Faghri et al., 2018).

    ModelConfig                    what the architecture is; every checkpoint keeps it
    JointEmbedding                 images and captions into one space; the image side takes prepared
                                   features, or pixels when the model has a CNN (fine-tuning)
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

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

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


class JointEmbedding(nn.Module):
    """Images and captions into one embed_dim space (the positive orthant, for the order measure)."""

    def __init__(self, config, cnn_weights=None, device='cpu', dtype='float32'):
        super().__init__()
        if config.measure not in ('order', 'cosine'):
            raise ValueError(f"measure must be 'order' or 'cosine', not {config.measure!r}")
        self.config, self.measure = config, config.measure
        self.compiled = False   # order scores through kernels.py's torch.compile'd kernels (a speed switch)
        # kernels.Dropout is nn.Dropout with the mask drawn faster on a CPU; model.eval() turns it off.
        self.image_dropout = Dropout(config.image_dropout)
        self.word_dropout = Dropout(config.word_dropout)
        self.backbone = Backbone(config, cnn_weights, device, dtype) if config.cnn else None
        self.image_fc = nn.Linear(config.feature_dim, config.embed_dim)
        self.word_embed = nn.Embedding(config.vocab_size, config.word_dim, padding_idx=0)
        self.gru = nn.GRU(config.word_dim, config.embed_dim, batch_first=True)
        # As in the order-embedding and VSE++ code: Xavier for the image map, small uniform words.
        nn.init.xavier_uniform_(self.image_fc.weight)
        nn.init.zeros_(self.image_fc.bias)
        nn.init.uniform_(self.word_embed.weight, -0.1, 0.1)

    def normalize_embedding(self, x):
        # The order measure lives in the positive orthant: abs() after normalization.
        x = F.normalize(x.float(), dim=1)
        return x.abs() if self.measure == 'order' else x

    def encode_images(self, images):
        """(B, D) prepared features, or (B, 3, H, W) pixels through the CNN -> (B, embed_dim)."""
        if images.dim() == 4:
            if self.backbone is None:
                raise ValueError("this model has no CNN: give it prepared features, not pixels")
            images = self.backbone(images)
        return self.normalize_embedding(self.image_fc(self.image_dropout(images)))

    def encode_captions(self, tokens, lengths):
        """tokens (B, L) padded with 0, lengths (B,): the GRU state at each caption's own last
        token. Packing lets a batch of mixed lengths run in one call; a batch sorted longest
        first (as training sorts it) needs no sort on the device."""
        lengths = lengths.cpu()
        longest_first = bool((lengths[:-1] >= lengths[1:]).all())
        packed = pack_padded_sequence(self.word_dropout(self.word_embed(tokens)), lengths, batch_first=True,
                                      enforce_sorted=longest_first)
        _, last = self.gru(packed)        # (1, B, embed_dim), back in the batch's own order
        return self.normalize_embedding(last[0])

    def scores(self, images, captions):
        return similarity(images, captions, self.measure, self.compiled)

    def parameter_groups(self):
        """[the encoders' parameters, the CNN's] (the CNN's empty without one): Adam gives each its rate."""
        cnn = list(self.backbone.parameters()) if self.backbone is not None else []
        ids = {id(p) for p in cnn}
        return [[p for p in self.parameters() if id(p) not in ids], cnn]


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
