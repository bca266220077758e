"""--dtype: bfloat16 autocast with channels_last against float32 through the real extraction,
the choice of 'auto' for extraction and training (bfloat16 only where the processor runs it
natively), and a resumed extraction that never mixes the two."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch

import options
from conftest import image_dataset, photo_like, run_script
from features import build_backbone, extract_features, resolve_dtype
from options import pick_dtype
from utils import UserError

CPU = torch.device('cpu')


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize('crops', [1, 10])
def test_bfloat16_features_agree_with_float32(tmp_path, crops):
    """The same images through extract_features both ways: bfloat16 rounds every convolution's
    inputs to 8 bits of mantissa, so the two agree in direction (cosine), not digit by digit.
    Runs everywhere: where bfloat16 is not native it is emulated, slower but the same numbers."""
    paths = []
    for i, size in enumerate([(300, 260), (240, 330), (500, 300)]):
        paths.append(str(tmp_path / f'{i}.jpg'))
        photo_like(size, i).save(paths[-1], quality=90)
    feats = {}
    for dtype in ('float32', 'bfloat16'):
        with contextlib.redirect_stdout(io.StringIO()):   # the random-weights warning
            net = build_backbone('vgg16', 'random', CPU, dtype)[0]
        assert net.features[0].weight.is_contiguous(memory_format=torch.channels_last) == (dtype == 'bfloat16')
        feats[dtype] = extract_features(net, paths, 'vgg16', crops, CPU, batch_size=2, workers=0, progress=False,
                                        dtype=dtype)
    assert feats['bfloat16'].dtype == np.float32 and not np.array_equal(feats['bfloat16'], feats['float32'])
    assert cosines(feats['float32'], feats['bfloat16']).min() > 0.999


def test_auto_takes_bfloat16_only_where_the_cpu_runs_it_natively(monkeypatch):
    # the detection itself, on simulated processors
    avx512 = {'avx512_f': True, 'avx512_bw': True, 'avx512_vl': True}
    for capabilities, native in (({**avx512, 'avx512_bf16': False, 'amx_bf16': False}, False),
                                 ({'avx2': True}, False),
                                 ({**avx512, 'avx512_bf16': True, 'amx_bf16': False}, True),
                                 ({**avx512, 'avx512_bf16': True, 'amx_bf16': True, 'amx_tile': True}, True)):
        monkeypatch.setattr(torch.cpu, 'get_capabilities', lambda: capabilities)
        assert options.cpu_runs_bfloat16() == (native and torch.backends.mkldnn.is_available()), capabilities
    # and what 'auto' makes of it, for training (pick_dtype) and for extraction (resolve_dtype)
    for native in (False, True):
        monkeypatch.setattr(options, 'cpu_runs_bfloat16', lambda: native)
        assert pick_dtype('auto', CPU) == ('bfloat16' if native else 'float32')
        assert pick_dtype('auto', torch.device('cuda')) == 'bfloat16'
        assert pick_dtype('auto', torch.device('mps')) == 'float32'
        assert pick_dtype('float32', CPU) == 'float32' and pick_dtype('bfloat16', CPU) == 'bfloat16'
        assert resolve_dtype('auto', CPU) == ('bfloat16' if native else 'float32')
        assert resolve_dtype('auto', torch.device('cuda')) == 'bfloat16'
        assert resolve_dtype('auto', CPU, 'efficientnet_lite0') == 'float32'  # its features moved too far
        assert resolve_dtype('auto', torch.device('mps')) == 'float32'
        assert resolve_dtype('float32', CPU) == 'float32' and resolve_dtype('bfloat16', CPU) == 'bfloat16'
    for resolve in (pick_dtype, resolve_dtype):
        with pytest.raises(UserError, match='--dtype=half'):
            resolve('half', CPU)


def test_resumed_extraction_with_another_dtype_starts_again(tmp_path):
    image_dataset(tmp_path, ['train', 'val', 'test'])
    args = ['--dataset=x', f'--data_dir={tmp_path}', '--weights=random', '--batch_size=1', '--workers=0']
    feats_path = tmp_path / 'features_vgg16_1crop.npy'
    run_script('prep.py', *args, '--dtype=float32')
    meta = json.load(open(tmp_path / 'meta.json'))
    assert meta['dtype'] == 'float32' and json.load(open(str(feats_path) + '.job.json'))['dtype'] == 'float32'
    float32 = np.load(feats_path)
    # mark a row: a run that reuses the file keeps the mark, one that extracts again overwrites it
    rows = np.load(feats_path, mmap_mode='r+')
    rows[0] = 1.0
    rows.flush()
    del rows
    proc = run_script('prep.py', *args, '--dtype=float32', '--force=True')
    assert 'warning' not in proc.stdout and (np.load(feats_path)[0] == 1).all()   # no network built: reused
    proc = run_script('prep.py', *args, '--dtype=bfloat16', '--force=True')
    bfloat16 = np.load(feats_path)
    assert 'resuming' not in proc.stdout and not (bfloat16[0] == 1).all()
    assert json.load(open(tmp_path / 'meta.json'))['dtype'] == 'bfloat16'
    assert json.load(open(str(feats_path) + '.job.json'))['dtype'] == 'bfloat16'
    assert not np.array_equal(bfloat16[1:], float32[1:]) and cosines(bfloat16, float32).min() > 0.999
    # the default: what this machine runs natively, recorded
    run_script('prep.py', *args, '--force=True')
    assert json.load(open(tmp_path / 'meta.json'))['dtype'] == resolve_dtype('auto', CPU)
