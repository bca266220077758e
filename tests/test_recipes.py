"""Recipe files (recipes/*.py): read as `name = value` literals, never executed, given first on
the command line, overridden by the options after them, and kept in the checkpoint."""
import ast
import os

import pytest
import torch

from conftest import ROOT, assert_user_error, run_here

SMALL = ['--embed_dim=32', '--word_dim=16', '--epochs=1', '--compile=False']


def recipe_values(name):
    tree = ast.parse(open(os.path.join(ROOT, 'recipes', name)).read())
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)}


@pytest.mark.parametrize('name, measure, hardest', [('vsepp.py', 'cosine', True), ('paper.py', 'order', False)])
def test_a_recipe_trains_and_its_checkpoint_keeps_its_values(synthetic_dir, tmp_path, name, measure, hardest):
    out = tmp_path / 'run'
    proc = run_here('train', os.path.join(ROOT, 'recipes', name), '--dataset=synthetic', f'--data_dir={synthetic_dir}',
                    f'--out_dir={out}', *SMALL)
    assert proc.returncode == 0, proc
    ckpt = torch.load(out / 'last.pt', weights_only=True)
    values = recipe_values(name)
    overridden = {'embed_dim': 32, 'word_dim': 16, 'epochs': 1}
    for key, value in values.items():
        assert ckpt['config'][key] == overridden.get(key, value), key
    assert ckpt['model_config']['measure'] == measure == values['measure']
    assert ckpt['config']['max_violation'] is hardest and ckpt['config']['warmup_epochs'] == 0
    assert ckpt['model_config']['embed_dim'] == 32   # the option after the recipe wins


def test_a_recipe_is_read_never_run(synthetic_dir, tmp_path):
    marker = tmp_path / 'MARKER'
    recipe = tmp_path / 'evil.py'
    recipe.write_text(f"epochs = 1\nopen({str(marker)!r}, 'w')\n")
    proc = run_here('train', str(recipe), '--dataset=synthetic', f'--data_dir={synthetic_dir}', f'--out_dir={tmp_path / "r"}')
    assert_user_error(proc, 'line 2: a recipe holds only `name = value` lines')
    assert not marker.exists()
    recipe.write_text("epochs = 2 ** 3\n")
    assert_user_error(run_here('train', str(recipe)), 'line 1: the value of epochs is not a literal')
    recipe.write_text("epoch = 3\n")
    assert_user_error(run_here('train', str(recipe)), 'unknown option --epoch; did you mean --epochs?')
    assert_user_error(run_here('train', str(tmp_path / 'none.py')), 'not a recipe file')
