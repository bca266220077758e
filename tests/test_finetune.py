"""train.py --finetune=True: the CNN trains after the warm-up (batch norm's statistics frozen),
eval.py recomputes the split's features with it (checked against a recomputation written here),
a run stopped while fine-tuning resumes bit for bit, frozen stages stay as they were, and bad
input is one line.

A tiny CNN ('tiny', with a batch norm layer) stands in for the real ones, registered in features.py
for the test's duration, so that prep.py extracts with it and train.py and eval.py rebuild it; the
scripts run in this process (run_here), where the registration holds."""
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import features
from conftest import assert_user_error, image_dataset, run_here
from model import Backbone, ModelConfig, cnn_stages
from test_reliability import assert_same_run
from utils import UserError

TINY_DIM = 32
SPLITS = ['train'] * 16 + ['val'] * 4 + ['test'] * 8
# 80 captions, batches of 8: 10 iterations an epoch; the CNN joins at iteration 10 (epoch 2 of 3)
TRAIN = ['--finetune=True', '--warmup_epochs=1', '--epochs=3', '--batch_size=8', '--embed_dim=16', '--word_dim=8',
         '--log_interval=2', '--eval_interval=4', '--learning_rate=1e-2', '--cnn_learning_rate=1e-2', '--workers=0',
         '--compile=False', '--dtype=float32', '--cnn_frozen_stages=0']


def tiny_net():
    torch.manual_seed(0)  # as build_backbone seeds a 'random' network
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7, stride=4), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())


@pytest.fixture(scope='module')
def tiny_cnn():
    real = features.build_backbone

    def build(cnn, weights, device, dtype='float32', grid=False):
        if cnn != 'tiny':
            return real(cnn, weights, device, dtype, grid)
        assert weights == 'random'
        return tiny_net().to(device).eval(), TINY_DIM

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(features.CNN_DIMS, 'tiny', TINY_DIM)
        patch.setattr(features, 'build_backbone', build)
        yield


@pytest.fixture(scope='module')
def dataset(tiny_cnn, tmp_path_factory):
    folder = tmp_path_factory.mktemp('finetune')
    image_dataset(folder, SPLITS)
    data = folder / 'data'
    proc = run_here('prep', '--dataset=x', f'--data_dir={data}', f'--dataset_json={folder / "dataset.json"}',
                    f'--images_dir={folder / "images"}', '--cnn=tiny', '--weights=random', '--workers=0',
                    '--dtype=float32')
    assert proc.returncode == 0, proc
    return data


def train(data, out, *extra, stop_at=None):
    """train.py's main through run_main (conftest.run_here); stop_at: a Ctrl-C at that iteration."""
    def stop_there(module):
        agreed = module.StopRequests.agreed

        def agreed_or_stop(self, iteration, world, dev, every):
            if iteration == stop_at:
                self.signum = signal.SIGINT
            return agreed(self, iteration, world, dev, every)
        module.StopRequests.agreed = agreed_or_stop
    return run_here('train', '--dataset=x', f'--data_dir={data}', f'--out_dir={out}', *TRAIN, *extra,
                    patch=stop_there if stop_at is not None else None)


@pytest.fixture(scope='module')
def run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp('run') / 'out'
    proc = train(dataset, out)
    assert proc.returncode == 0, proc
    return out


def recomputed_features(ckpt, data, split):
    """The split's features by hand: PIL, shorter side 256, center crop 224, ImageNet's
    normalization, the checkpoint's CNN in eval mode, rows L2-normalized."""
    net = tiny_net()
    net.load_state_dict({k[len('backbone.net.'):]: v for k, v in ckpt['model'].items() if k.startswith('backbone.net.')})
    net.eval()
    files = (data / f'{split}_files.txt').read_text().splitlines()
    folder = json.loads((data / 'meta.json').read_text())['images_dir']
    prepare = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                         T.Normalize(features.IMAGENET_MEAN, features.IMAGENET_STD)])
    x = torch.stack([prepare(Image.open(os.path.join(folder, f)).convert('RGB')) for f in files])
    with torch.no_grad():
        return torch.nn.functional.normalize(net(x), dim=1)


def test_the_cnn_trains_and_eval_uses_it(run, dataset):
    import eval as ev
    ckpt = torch.load(run / 'last.pt', weights_only=True)
    start = tiny_net().state_dict()
    tuned = {k[len('backbone.net.'):]: v for k, v in ckpt['model'].items() if k.startswith('backbone.net.')}
    assert tuned.keys() == start.keys()
    for name in ('0.weight', '1.weight', '1.bias'):   # the convolution, batch norm's scale and shift trained ...
        assert not torch.allclose(tuned[name], start[name]), name
    for name in ('1.running_mean', '1.running_var', '1.num_batches_tracked'):   # ... its statistics did not
        assert torch.equal(tuned[name], start[name]), name
    assert {g['name']: g['lr'] for g in ckpt['optimizer']['param_groups']} == {'encoders': 1e-2, 'backbone': 1e-2}
    assert 'backbone.net.0.weight' in torch.load(run / 'best.pt', weights_only=True)['model']

    proc = run_here('eval', f'--out_dir={run}', '--checkpoint=last.pt', '--save_embeddings=True', '--compile=False')
    assert proc.returncode == 0, proc
    written = np.load(run / 'embeddings_test.npz')
    model, _ = ev.load_model(str(run / 'last.pt'), torch.device('cpu'))
    by_hand = ev.encode_images(model, recomputed_features(ckpt, dataset, 'test'))
    frozen = ev.encode_images(model, np.load(dataset / 'test_ims.npy'))
    assert np.allclose(written['images'], by_hand.numpy(), atol=1e-5)
    assert not np.allclose(written['images'], frozen.numpy(), atol=1e-2)
    result = json.loads((run / 'results_test.json').read_text())
    from model import score_matrix
    from utils import retrieval_metrics
    expected = retrieval_metrics(score_matrix(by_hand, torch.from_numpy(written['captions']), 'order'))
    assert abs(result['rsum'] - expected['rsum']) < 1e-6
    # --query ranks the recomputed images too
    proc = run_here('eval', f'--out_dir={run}', '--checkpoint=last.pt', '--query=a picture number 20', '--k=8',
                    '--compile=False')
    listed = [line.split()[-1] for line in proc.stdout.splitlines() if line.strip().split(' ')[0].isdigit()]
    files = (dataset / 'test_files.txt').read_text().splitlines()
    scores, indices = ev.search(model, by_hand, ev.encode_text(model, ckpt['vocab'], ['a picture number 20']), k=8)
    assert listed == [files[i] for i in indices[0].tolist()], proc.stdout
    # --image: a test image's features through the tuned CNN, its captions ranked as by hand
    folder = json.loads((dataset / 'meta.json').read_text())['images_dir']
    proc = run_here('eval', f'--out_dir={run}', '--checkpoint=last.pt', f'--image={os.path.join(folder, files[3])}',
                    '--k=5', '--compile=False')
    listed = [' '.join(line.split()[2 + ('*' in line.split()[1]):]) for line in proc.stdout.splitlines()
              if line.strip().split(' ')[0].isdigit()]
    captions = (dataset / 'test_caps.txt').read_text().splitlines()
    _, indices = ev.search(model, by_hand[3:4], torch.from_numpy(written['captions']), k=5, by='image')
    assert listed == [captions[j] for j in indices[0].tolist()], proc.stdout


def test_an_ensemble_of_a_fine_tuned_run_is_its_evaluation_written_into_the_run(run):
    """The members' features come from their own CNNs; the results still go into the first
    run's folder (not into the folder of the images)."""
    for option in (f'--out_dir={run}', f'--ensemble={run}'):
        proc = run_here('eval', option, '--checkpoint=last.pt', '--split=val', '--compile=False')
        assert proc.returncode == 0, proc
    alone, together = (json.loads((run / f'results_val{tag}.json').read_text()) for tag in ('', '_ensemble'))
    assert {k: together[k] for k in ('i2t', 't2i', 'rsum')} == {k: alone[k] for k in ('i2t', 't2i', 'rsum')}


def test_bfloat16_fine_tuning(dataset, tmp_path):
    """bfloat16 autocast (channels_last on a CPU): the CNN trains and stays finite."""
    proc = train(dataset, tmp_path / 'out', '--dtype=bfloat16', '--epochs=2')
    assert proc.returncode == 0 and 'in bfloat16' in proc.stdout, proc
    tuned = torch.load(tmp_path / 'out' / 'last.pt', weights_only=True)['model']
    assert all(torch.isfinite(v).all() for v in tuned.values())
    assert not torch.allclose(tuned['backbone.net.0.weight'], tiny_net().state_dict()['0.weight'])


def test_a_run_stopped_while_fine_tuning_resumes_bit_for_bit(run, dataset, tmp_path):
    out = tmp_path / 'out'
    proc = train(dataset, out, stop_at=13)   # epoch 2, its 4th batch: the CNN is training
    assert proc.returncode == 130 and 'stopped at iteration 13' in proc.stdout, proc
    proc = train(dataset, out, '--resume=True', '--workers=2')   # the crops do not depend on the workers
    assert proc.returncode == 0 and 'resuming from' in proc.stdout, proc
    assert_same_run(out, run)


def test_on_a_cpu_the_cnn_trains_in_passes_of_a_few_rows_with_the_same_features_and_gradients(tiny_cnn, monkeypatch):
    x = torch.rand(40, 3, 64, 64)
    results, calls = [], []
    for rows in (1000, features.CPU_PASS_ROWS):   # one pass, then passes of 16
        monkeypatch.setattr(features, 'CPU_PASS_ROWS', rows)
        backbone = Backbone(ModelConfig(TINY_DIM, 10, cnn='tiny'), None, 'cpu', 'float32')
        hook = backbone.net.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
        out = backbone(x)
        hook.remove()
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        grads = torch.autograd.grad((out * weights).sum(), list(backbone.parameters()))
        results.append((out.detach(), grads))
    assert calls == [40, 16, 16, 8]
    (one_pass, one_pass_grads), (passes, passes_grads) = results
    torch.testing.assert_close(passes, one_pass, rtol=1e-5, atol=1e-6)
    for a, b in zip(passes_grads, one_pass_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_frozen_stages_keep_their_weights_and_the_rest_trains(dataset, tmp_path):
    """The tiny network's stages are its modules: freezing the first keeps the convolution as it
    was, while batch norm's scale and shift after it still train."""
    proc = train(dataset, tmp_path / 'out', '--cnn_frozen_stages=1', '--epochs=2')
    assert proc.returncode == 0, proc
    tuned = torch.load(tmp_path / 'out' / 'last.pt', weights_only=True)
    start = tiny_net().state_dict()
    assert torch.equal(tuned['model']['backbone.net.0.weight'], start['0.weight'])
    assert torch.equal(tuned['model']['backbone.net.0.bias'], start['0.bias'])
    assert not torch.allclose(tuned['model']['backbone.net.1.weight'], start['1.weight'])


@pytest.mark.parametrize('cnn, count', [('efficientnet_lite0', 9), ('vgg16', 7), ('resnet152', 5)])
def test_the_stages_of_each_cnn_hold_all_its_weights_in_order(cnn, count):
    net = Backbone(ModelConfig(features.CNN_DIMS[cnn], 10, cnn=cnn, cnn_frozen_stages=2), None, 'cpu', 'float32').net
    stages = cnn_stages(net, cnn)
    assert len(stages) == count
    in_stages = [id(p) for stage in stages for module in stage for p in module.parameters()]
    assert in_stages == [id(p) for p in net.parameters()]   # every weight once, from the input on
    assert [p.requires_grad for p in net.parameters()] == [i >= 2 for i, stage in enumerate(stages)
                                                           for module in stage for p in module.parameters()]
    with pytest.raises(UserError, match=f'--cnn_frozen_stages={count}: {cnn} has {count} stages'):
        Backbone(ModelConfig(features.CNN_DIMS[cnn], 10, cnn=cnn, cnn_frozen_stages=count), None, 'cpu', 'float32')


@pytest.mark.parametrize('case', ['features', 'missing_image'])
def test_bad_input_is_one_line(tiny_cnn, dataset, tmp_path, case):
    if case == 'features':   # prepared from --features=: no CNN to fine-tune
        image_dataset(tmp_path, SPLITS)
        np.save(tmp_path / 'mine.npy', np.random.default_rng(0).random((len(SPLITS), 24)).astype(np.float32))
        data = tmp_path / 'data'
        assert run_here('prep', '--dataset=x', f'--data_dir={data}', f'--dataset_json={tmp_path / "dataset.json"}',
                        f'--features={tmp_path / "mine.npy"}').returncode == 0
        fragments = ['not extracted from images by prep.py', '--finetune=True needs a dataset prepared from its images']
    else:
        data = tmp_path / 'data'
        shutil.copytree(dataset, data)
        meta = json.loads((data / 'meta.json').read_text())
        images = tmp_path / 'images'
        shutil.copytree(meta['images_dir'], images)
        (data / 'meta.json').write_text(json.dumps({**meta, 'images_dir': str(images)}))
        name = (data / 'train_files.txt').read_text().splitlines()[5]
        os.remove(images / name)
        fragments = [f'{images / name}: missing image file', '1 of the 16 train images']
    assert_user_error(train(data, tmp_path / 'run'), *fragments)
    assert not (tmp_path / 'run' / 'last.pt').exists()
