"""The command line every script shares: constants overridden as --name=value, each checked
against the script's rule table (OPTION_RULES) before any work, --help, and run_main, which
turns a UserError into one line on stderr and exit status 1.

    parse_config, check_options   the options of a script (a recipe file, then --name=value), parsed and checked
    read_recipe                   a recipe file's `name = value` lines, read as literals
    at_least, at_most, non_negative, one_of, SEED, FOLDER, DEVICE   rules the tables are made of
    available_devices, pick_device   --device
    DTYPES, cpu_runs_bfloat16, pick_dtype   --dtype: float32, or bfloat16 where it is native
    print_help, run_main          --help, and running a script's main(argv)
    keep_freed_memory             run_main's allocator setting: freed buffers stay for reuse (glibc)
"""
import ast
import ctypes
import difflib
import math
import os
import re
import sys
from types import SimpleNamespace

import torch

from utils import UserError, file_advice


def parse_config(defaults, argv, rules=None):
    """The script's configuration: its defaults (the constants at its top), then a recipe file
    if the first argument names one (recipes/), then `--name=value` options, each checked
    against its rule (check_options) so that a bad value stops before any work. Returns a
    SimpleNamespace, the one object the script's functions are given."""
    config = dict(defaults)
    argv = [a for a in argv if a != '--debug']
    if argv and not argv[0].startswith('--'):
        for name, (value, where) in read_recipe(argv[0]).items():
            config[name] = option_value(config, name, value, where)
        argv = argv[1:]
    for arg in argv:
        if not arg.startswith('--') or '=' not in arg:
            raise UserError(f"argument {arg!r}: options are written --name=value (a recipe file goes first)")
        key, text = arg[2:].split('=', 1)
        config[key] = option_value(config, key, parse_literal(text, config.get(key)), f"--{key}={text}")
    check_options(config, rules or {})
    return SimpleNamespace(**config)


def parse_literal(text, default):
    """An option's text as the value its default's type calls for: text options as they are,
    numbers and True/False as Python literals (anything else stays text, and is refused)."""
    if isinstance(default, str) or len(text) > 40:   # no number or True/False is longer
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def option_value(config, key, value, where):
    """`value` for option `key`, checked against the default's type (an int is taken for a float)."""
    if key not in config:
        close = difflib.get_close_matches(key, config, n=1)
        hint = f"did you mean --{close[0]}? " if close else ''
        raise UserError(f"{where}: unknown option --{key}; {hint}--help lists the options")
    default = config[key]
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        kind = type(default).__name__
        shown = where if len(where) < 80 else where[:60] + '...'
        raise UserError(f"{shown}: expected {'an' if kind == 'int' else 'a'} {kind} like {default!r}")
    return value


def read_recipe(path):
    """A recipe file: `name = value` lines of the options (Python literals; comments and a
    docstring allowed), read with ast, never executed. Returns name -> (value, where)."""
    if not path.endswith('.py') or not os.path.isfile(path):
        raise UserError(f"{path}: not a recipe file (a .py file of `name = value` lines, e.g. recipes/paper.py); "
                        "options are written --name=value")
    try:
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read(), path)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the recipe ({e}); check the path") from None
    except SyntaxError as e:
        raise UserError(f"{path}: line {e.lineno}: not valid Python; a recipe holds `name = value` lines") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the recipe's docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{path}: line {node.lineno}: a recipe holds only `name = value` lines")
        name = node.targets[0].id
        try:
            values[name] = (ast.literal_eval(node.value), f"{path}: line {node.lineno}: {name}")
        except ValueError:
            raise UserError(f"{path}: line {node.lineno}: the value of {name} is not a literal (a number, a string, "
                            "True or False); recipes are read, never run") from None
    return values


def check_options(config, rules):
    """Each option against what it must be, before any work: rules maps a name to (predicate,
    what it must be), the text a function when it depends on the machine (see DEVICE)."""
    for name, (ok, what) in rules.items():
        if not ok(config[name]):
            raise UserError(f"--{name}={config[name]}: must be {what() if callable(what) else what}")


# Rules that several scripts' option tables use.
def at_least(n, why=''):
    return (lambda value: value >= n, f"at least {n}{why}")


def at_most(n, rule):
    """`rule`, and at most n: a size bound, so that a typo cannot ask for more memory than any machine has."""
    ok, what = rule
    what = re.sub(r'^at least (\S+?)(:|$)', rf'from \1 to {n}\2', what) if what.startswith('at least') else f"{what}; at most {n}"
    return (lambda value: ok(value) and value <= n, what)


def probability():
    return (lambda value: math.isfinite(value) and 0 <= value < 1, "a probability in [0, 1)")


def non_negative(zero_means=''):
    """A finite number of at least 0; zero_means: what 0 stands for, where it is allowed as 'off'."""
    return (lambda value: math.isfinite(value) and value >= 0,
            'a finite number of at least 0' + (f' (0: {zero_means})' if zero_means else ''))


def one_of(*choices):
    return (lambda value: value in choices, 'one of ' + ', '.join(map(str, choices)))


def available_devices():
    """The --device names this machine can run on."""
    names = ['auto', 'cpu']
    if torch.cuda.is_available():
        names += ['cuda'] + [f'cuda:{i}' for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        names.append('mps')
    return names


SEED = (lambda value: 0 <= value < 2 ** 32, 'from 0 to 2**32 - 1 (what every random generator here takes)')
FOLDER = (lambda value: not os.path.isfile(value), 'a folder, not a file')
DEVICE = (lambda value: value in available_devices(), lambda: "one of this machine's devices: " + ', '.join(available_devices()))


def print_help(module):
    """--help: the script's first docstring line, then each option with its default and the
    comment on its line at the top of the script."""
    with open(module.__file__, encoding='utf-8') as f:
        source = f.read()
    lines = source.splitlines()
    comments = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            rest = lines[node.end_lineno - 1][node.end_col_offset:].strip()
            comments[node.targets[0].id] = rest[1:].strip() if rest.startswith('#') else ''
    for key, (_, what) in getattr(module, 'OPTION_RULES', {}).items():
        bound = re.search(r'(?:to|at most) (\d+)', what) if isinstance(what, str) else None
        if bound:
            comments[key] = f"{comments.get(key, '')} (at most {bound[1]})".strip()
    name = os.path.basename(module.__file__)
    summary = ' '.join((module.__doc__ or '').strip().split('\n\n')[0].split())
    shown = {key: f"--{key}={getattr(module, key) if getattr(module, key) != '' else repr('')}" for key in module.CONFIG_KEYS}
    width = max(map(len, shown.values()))
    recipe = ' [recipes/NAME.py]' if name == 'train.py' else ''
    print(f"{name}: {summary}\n\nusage: python {name}{recipe} [--name=value ...]\n\n"
          + '\n'.join(f"  {shown[key]:{width}s}  {comments.get(key, '')}".rstrip() for key in module.CONFIG_KEYS))


def run_main(main):
    """Run a script's main(argv). A UserError is one line on stderr and exit 1; with --debug
    the traceback is shown instead. --help (or -h) lists the options instead of running."""
    argv = sys.argv[1:]
    keep_freed_memory()
    if '--help' in argv or '-h' in argv:
        try:
            print_help(sys.modules[main.__module__])
        except BrokenPipeError:  # `--help | head`: the reader has all it wanted
            sys.stdout = open(os.devnull, 'w')
        return
    try:
        main(argv)
    except UserError as e:
        if '--debug' in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `train.py | head`: the reader has gone, as a shell tool would stop
        sys.stdout = open(os.devnull, 'w')
        sys.exit(141)
    except OSError as e:  # the last net for a file system error no check above turned into a UserError
        if '--debug' in argv:
            raise
        print(f"error: {e.filename or 'a file'}: {e.strerror or e}; {file_advice(e)}", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:  # the allocator's refusal, for sizes no option bound could foresee
        if '--debug' in argv or not out_of_memory(e):
            raise
        print(f"error: out of memory ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); use smaller sizes "
              "(--batch_size, --embed_dim, --word_dim, --val_images, --k) or a machine with more memory", file=sys.stderr)
        sys.exit(1)


def out_of_memory(e):
    text = str(e)
    return isinstance(e, MemoryError) or "can't allocate memory" in text or 'out of memory' in text.lower()


def keep_freed_memory():
    """Make glibc's malloc keep freed blocks of up to 32 MB in the process for reuse, instead of
    mapping each anew from the OS and unmapping it when freed (its default above a threshold it
    moves as it goes). A training step frees and allocates the same large buffers every step (the
    GRU's gradients: about 19 MB at Flickr8k's sizes), and memory fresh from the OS is zeroed page
    by page when first touched: docs/speed.md measures what that cost. True where it applied;
    elsewhere (no glibc) nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3   # glibc's malloc.h
    # 32 MB is the largest mmap threshold glibc accepts; freed memory at the top of the heap is
    # returned to the OS only past 1 GB.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def pick_device(name):
    if name not in available_devices():
        raise UserError(f"--device={name}: must be {DEVICE[1]()}")
    if name != 'auto':
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


# bfloat16 autocast: matrix products and convolutions in bfloat16, accumulated in float32. Fast on
# CUDA, and on a CPU only where the processor computes in bfloat16 itself; elsewhere oneDNN
# emulates it with float32 arithmetic and conversions, slower than float32 (docs/speed.md).
DTYPES = ('auto', 'float32', 'bfloat16')


def cpu_runs_bfloat16():
    """AMX (Intel Xeon since Sapphire Rapids) or AVX512-BF16 (AMD Zen 4 and later, Intel Cooper
    Lake), with oneDNN in this PyTorch."""
    capabilities = torch.cpu.get_capabilities()
    native = capabilities.get('amx_bf16', False) or capabilities.get('avx512_bf16', False)
    return bool(native) and torch.backends.mkldnn.is_available()


def pick_dtype(name, device, float32_on_cpu=False):
    """--dtype for training and extraction: 'auto' -> 'bfloat16' on CUDA and on a CPU that runs it
    natively (unless float32_on_cpu), 'float32' elsewhere (MPS included)."""
    if name not in DTYPES:
        raise UserError(f"--dtype={name}: expected one of {', '.join(DTYPES)}")
    if name != 'auto':
        return name
    native = device.type == 'cuda' or (device.type == 'cpu' and cpu_runs_bfloat16() and not float32_on_cpu)
    return 'bfloat16' if native else 'float32'
