"""decode='torch' (torchvision's decode_jpeg, nvjpeg on CUDA; here its CPU twin) against the
reference decode='pil': the same crops to rounding, the same features, the same bad files."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import features
from conftest import assert_user_error, image_dataset, photo_like, run_script, tiny_backbone
from features import (build_backbone, decode_jpeg_can_take, extract_features, image_transform, read_for_torch,
                      tensor_crops)
from utils import UserError

CPU = torch.device('cpu')
# On CUDA (nvjpeg) where there is one: the same checks, with nvjpeg's own rounding
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA'))]
# (width, height): landscape, portrait, nearly square, wide, and a grayscale one (last)
SIZES = [(300, 260), (240, 330), (257, 256), (500, 300), (280, 280)]


def jpeg_bytes(im, **kw):
    buffer = io.BytesIO()
    im.save(buffer, 'JPEG', quality=90, **kw)
    return buffer.getvalue()


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp('photos')
    paths = []
    for i, size in enumerate(SIZES):
        path = str(folder / f'{i}.jpg')
        photo_like(size, i, gray=i == len(SIZES) - 1).save(path, quality=90)
        paths.append(path)
    return paths


def pil_crops(paths, cnn, crops):
    transform = image_transform(cnn, crops)
    return torch.stack([transform(Image.open(p).convert('RGB')) for p in paths]).reshape(len(paths), -1)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('cnn,crops', [('vgg16', 1), ('vgg16', 10), ('efficientnet_lite0', 1)])
def test_torch_crops_equal_pil_crops_to_rounding(photos, cnn, crops, device):
    """Same resize (bilinear, or bicubic for efficientnet_lite0, with antialias), crop order,
    channel order and normalization. Measured on the CPU: mean |difference| below 1e-4 and at
    most one uint8 level (1 / 255 / std = 0.018) anywhere; a crop one pixel off gives ~0.2.
    nvjpeg decodes with its own rounding (not measured yet): a looser bound on CUDA, still ten
    times below that."""
    reference = pil_crops(photos, cnn, crops)
    got = tensor_crops([read_for_torch(p) for p in photos], [''] * len(photos), cnn, crops, torch.device(device))
    assert got.shape == (len(photos) * crops, 3, 224, 224) and got.device.type == device
    diff = (got.cpu().reshape(len(photos), -1) - reference).abs()
    mean_bound, max_bound = (2e-3, 0.05) if device == 'cpu' else (0.01, 1.0)
    print(f"{device} {cnn} {crops} crops: mean |diff| per image {diff.mean(1).tolist()}, max {diff.max(1).values.tolist()}")
    assert diff.mean(1).max() < mean_bound and diff.max() < max_bound, (diff.mean(1), diff.max(1).values)
    # the bound catches a crop one pixel off (so it catches a wrong resize, crop, channel or scale too)
    shifted = torch.roll(got.cpu().reshape(len(photos), crops, 3, 224, 224), 1, dims=-1).reshape(len(photos), -1)
    assert (shifted - reference).abs().mean(1).min() > 5 * mean_bound


def cosines(a, b):
    return torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b))


@pytest.mark.parametrize('device', DEVICES)
@torch.no_grad()
def test_torch_and_pil_features_agree(photos, device):
    device = torch.device(device)
    net = build_backbone('vgg16', 'random', device)[0]
    feats = {d: extract_features(net, photos[:3], 'vgg16', 1, device, batch_size=2, workers=0, progress=False,
                                 decode=d) for d in ('pil', 'torch')}
    assert cosines(feats['pil'], feats['torch']).min() > 0.99, cosines(feats['pil'], feats['torch'])
    net = tiny_backbone().to(device)
    ten = {d: extract_features(net, photos, 'vgg16', 10, device, batch_size=3, workers=2, progress=False, decode=d)
           for d in ('pil', 'torch')}
    if device.type == 'cpu':
        np.testing.assert_allclose(ten['torch'], ten['pil'], rtol=1e-2, atol=1e-3)
    assert cosines(ten['pil'], ten['torch']).min() > 0.99


def test_decode_jpeg_can_take_needs_the_whole_file():
    """Only complete 8-bit Huffman JPEGs of 1 or 3 components go to decode_jpeg; everything else
    to PIL. A GPU decoder may gray-fill a truncated file instead of failing, so the end-of-image
    marker is looked for by walking the markers (an EXIF thumbnail has one of its own)."""
    photo = photo_like((120, 90), 0)
    whole = jpeg_bytes(photo)
    assert decode_jpeg_can_take(whole) and decode_jpeg_can_take(jpeg_bytes(photo, progressive=True))
    assert decode_jpeg_can_take(jpeg_bytes(photo.convert('L')))
    assert decode_jpeg_can_take(whole + b'\0' * 7)   # trailing bytes: fine
    for cut in (1, 2, 3, 100, len(whole) // 2, len(whole) - 200):
        assert not decode_jpeg_can_take(whole[:-cut]), cut
    assert not decode_jpeg_can_take(jpeg_bytes(photo.convert('CMYK')))
    png = io.BytesIO()
    photo.save(png, 'PNG')
    for other in (png.getvalue(), b'<html>not found</html>', b''):
        assert not decode_jpeg_can_take(other)
    thumbnail = jpeg_bytes(photo.resize((16, 12)))
    exif = Image.Exif()
    photo_with_thumbnail = jpeg_bytes(photo, exif=exif.tobytes() + thumbnail)   # APP1 payload holding a whole JPEG
    assert thumbnail in photo_with_thumbnail and decode_jpeg_can_take(photo_with_thumbnail)
    assert not decode_jpeg_can_take(photo_with_thumbnail[:-300])


def broken_files(folder):
    """A good photo, and files the decoders must refuse: truncated, not an image, a JPEG whose
    Huffman table is broken (it passes the marker walk; decode_jpeg itself fails on it), missing."""
    good = jpeg_bytes(photo_like((200, 150), 1))
    dht = good.index(b'\xff\xc4')
    bad_table = good[:dht + 5] + b'\xff' * 16 + good[dht + 21:]   # code counts that overflow the code space
    assert decode_jpeg_can_take(bad_table)
    files = {'good.jpg': good, 'cut.jpg': good[:len(good) // 2], 'text.jpg': b'<html>not found</html>',
             'table.jpg': bad_table, 'good2.jpg': jpeg_bytes(photo_like((150, 200), 2))}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [str(folder / n) for n in ('good.jpg', 'cut.jpg', 'text.jpg', 'gone.jpg', 'table.jpg', 'good2.jpg')]


@pytest.mark.parametrize('device', DEVICES)
@torch.no_grad()
def test_bad_files_are_reported_as_with_pil(tmp_path, device):
    device = torch.device(device)
    paths, net = broken_files(tmp_path), tiny_backbone().to(device)
    result = {}
    for d in ('pil', 'torch'):
        bad = []
        result[d] = extract_features(net, paths, 'vgg16', 1, device, batch_size=6, workers=0, progress=False,
                                     bad=bad, decode=d), bad
    (pil, pil_bad), (torch_feats, torch_bad) = result['pil'], result['torch']
    assert [b[:2] for b in torch_bad] == [(i, paths[i]) for i in (1, 2, 3, 4)]
    assert torch_bad == pil_bad, (torch_bad, pil_bad)   # the same reasons, word for word
    assert 'truncated' in torch_bad[0][2] and 'UnidentifiedImageError' in torch_bad[1][2] and torch_bad[2][2] == 'missing'
    assert (torch_feats[1:5] == 0).all() and (torch_feats[[0, 5]] != 0).any(1).all()
    assert cosines(torch_feats[[0, 5]], pil[[0, 5]]).min() > 0.99
    for k in (1, 2, 4):   # without bad=[]: a UserError naming the file, in a batch with a good one
        with pytest.raises(UserError, match=f'{os.path.basename(paths[k])}: cannot read the image'):
            extract_features(net, [paths[0], paths[k]], 'vgg16', 1, device, batch_size=2, workers=0, progress=False,
                             decode='torch')


def test_a_jpeg_the_device_decoder_refuses_is_read_by_pil(photos, monkeypatch):
    """nvjpeg does not take every JPEG libjpeg does: the batch fails, the file is found by
    decoding one at a time, and PIL reads it; only a file PIL cannot read either is bad."""
    import torchvision.io
    real = torchvision.io.decode_jpeg
    refused = bytes(read_for_torch(photos[1]))

    def picky(data, **kw):
        if isinstance(data, list) or bytes(data.numpy()) == refused:
            raise RuntimeError('nvjpeg: not supported')
        return real(data, **kw)
    monkeypatch.setattr(torchvision.io, 'decode_jpeg', picky)
    reasons = [''] * 3
    got = tensor_crops([read_for_torch(p) for p in photos[:3]], reasons, 'vgg16', 1, CPU)
    assert reasons == [''] * 3
    assert (got.reshape(3, -1) - pil_crops(photos[:3], 'vgg16', 1)).abs().max() < 0.05


def test_non_jpeg_images_decode_in_torch_mode(tmp_path):
    """PNG (RGB, grayscale, palette with transparency) and CMYK JPEG, decoded by PIL in the worker."""
    photo = photo_like((230, 240), 3)
    paths = []
    for name, im, fmt in (('rgb.png', photo, 'PNG'), ('gray.png', photo.convert('L'), 'PNG'),
                          ('palette.png', photo.convert('P'), 'PNG'), ('cmyk.jpg', photo.convert('CMYK'), 'JPEG')):
        im.save(tmp_path / name, fmt)
        paths.append(str(tmp_path / name))
    assert all(isinstance(read_for_torch(p), np.ndarray) for p in paths)
    got = tensor_crops([read_for_torch(p) for p in paths], [''] * 4, 'vgg16', 1, CPU)
    assert (got.reshape(4, -1) - pil_crops(paths, 'vgg16', 1)).abs().max() < 0.05


def test_prep_with_torch_decode_gives_the_pil_dataset_and_never_mixes_them(tmp_path):
    args = ['--dataset=x', '--weights=random', '--batch_size=2', '--workers=0', '--device=cpu']
    for d, option in (('pil', []), ('torch', ['--decode=torch'])):   # decode='auto' is 'pil' on a CPU
        image_dataset(tmp_path / d, ['train', 'train', 'val', 'test'])
        run_script('prep.py', *args, f'--data_dir={tmp_path / d}', *option)
        assert json.load(open(tmp_path / d / 'meta.json'))['decode'] == d
    for split in ('train', 'val', 'test'):
        a, b = (np.load(tmp_path / d / f'{split}_ims.npy') for d in ('pil', 'torch'))
        assert a.shape == b.shape and ((a * b).sum(1) > 0.99).all()   # rows are L2-normalized: cosines
        assert open(tmp_path / 'pil' / f'{split}_caps.txt').read() == open(tmp_path / 'torch' / f'{split}_caps.txt').read()
    # The decoder is part of the job: one decoder's features file is not reused for the other
    # (the network is built again, which prints the warning), and a bad file stops either with
    # the same line.
    job = tmp_path / 'torch' / 'features_vgg16_1crop.npy.job.json'
    assert json.load(open(job))['decode'] == 'torch'
    whole = (tmp_path / 'torch' / 'images' / '1.jpg').read_bytes()
    (tmp_path / 'torch' / 'images' / '1.jpg').write_bytes(whole[:len(whole) // 2])
    errors = {}
    for d in ('pil', 'torch'):
        errors[d] = run_script('prep.py', *args, f'--data_dir={tmp_path / "torch"}', f'--decode={d}', '--force=True',
                               check=False)
        assert 'warning: --weights=random' in errors[d].stdout and json.load(open(job))['decode'] == d
        assert_user_error(errors[d], '1 images cannot be read', '1.jpg (OSError: ', '--skip_bad=True')
    assert errors['torch'].stderr.splitlines()[-1] == errors['pil'].stderr.splitlines()[-1]
    assert_user_error(run_script('prep.py', *args, f'--data_dir={tmp_path / "pil"}', '--decode=gpu', '--force=True',
                                 check=False), '--decode=gpu', 'auto, pil, torch')


def test_resolve_decode():
    assert features.resolve_decode('auto', torch.device('cuda')) == 'torch'
    assert features.resolve_decode('auto', CPU) == 'pil' and features.resolve_decode('torch', CPU) == 'torch'
