"""A training run's folder (out_dir) and what outlives a step: train.py's loop calls these.

    Run                  the iteration, the best validation, the recent losses; out_dir's files:
                         log.jsonl, last.pt, best.pt, curves.png (rank 0 alone writes them)
    save_checkpoint      a checkpoint: both configs, the vocabulary, the weights, the state
    take_run_folder      one train.py per folder; a new run never overwrites another's results
    resume_from          last.pt back into the model, the optimizer and the random generators
    trim_log             a resumed run's log.jsonl, as if the run had never stopped
    draw_curves          log.jsonl -> curves.png
    StopRequests         Ctrl-C / SIGTERM: stop at the next iteration, save last.pt
    progress             an epoch's progress: a bar on a terminal, a line every log_interval elsewhere

A folder is always one a user can go on from: a run that stopped before its first save left
nothing worth keeping (a new run may start there), and every later stop left last.pt to
continue from with --resume=True.
"""
import dataclasses
import glob
import io
import json
import os
import signal
import sys

import torch
from tqdm import tqdm

from distributed import any_rank, barrier, shutdown
from utils import FolderLock, UserError, atomic_open, file_advice, load_checkpoint

SAME_BATCHES = ('seed', 'batch_size')   # a resumed run must draw the batches the first one drew


class Run:
    def __init__(self, cfg, vocab, model, optimizer, master, dev):
        self.cfg, self.vocab, self.model, self.optimizer, self.master = cfg, vocab, model, optimizer, master
        self.out_dir = cfg.out_dir
        self.last_path, self.best_path = os.path.join(self.out_dir, 'last.pt'), os.path.join(self.out_dir, 'best.pt')
        self.log_path = os.path.join(self.out_dir, 'log.jsonl')
        # each iteration's loss and gradient norm, checked for NaN/inf (and logged) every log_interval
        self.losses = torch.zeros(cfg.log_interval, device=dev)
        self.grad_norms = torch.zeros(cfg.log_interval, device=dev)
        self.iteration, self.best_rsum, self.since_best = 0, -1.0, 0
        self.saved_iteration = None  # the iteration last.pt holds
        self.lock = take_run_folder(self.out_dir, cfg.resume) if master else None
        self.log = None

    def resume(self, iters_per_epoch):
        """Continue from last.pt; True if that run had already finished."""
        state = resume_from(self.last_path, self.cfg, self.vocab, self.model, self.optimizer, self.losses.device)
        self.iteration, self.best_rsum = state['iteration'], state['best_rsum']
        self.since_best, self.saved_iteration = state.get('since_best', 0), self.iteration
        if 'loss_window' in state and state['loss_window'].shape == self.losses.shape:  # same --log_interval
            self.losses.copy_(state['loss_window'])
            self.grad_norms.copy_(state['grad_norm_window'])
        if self.iteration >= self.cfg.epochs * iters_per_epoch or self.patience_exhausted():
            print(f"{self.last_path}: this run already finished ({self.cfg.epochs} epochs, or no improvement "
                  f"for --patience={self.cfg.patience} validations); nothing to do")
            return True
        print(f"resuming from {self.last_path} at iteration {self.iteration} (epoch {self.iteration // iters_per_epoch})")
        if self.master:
            trim_log(self.log_path, self.iteration)
        return False

    def start_log(self):
        if self.master:
            remove_stale_temporaries(self.out_dir)
        try:
            self.log = open(self.log_path if self.master else os.devnull, 'a' if self.cfg.resume else 'w',
                            encoding='utf-8')
        except OSError as e:
            raise UserError(f"{self.log_path}: cannot write it ({e.strerror}); {file_advice(e)}") from None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()
        shutdown()
        if isinstance(error, FloatingPointError):
            self.stop_non_finite(str(error), self.iteration)

    def record(self, loss, grad_norm):
        self.losses[self.iteration % len(self.losses)] = loss
        self.grad_norms[self.iteration % len(self.losses)] = grad_norm
        self.iteration += 1

    def window(self):
        """The entries since the last full window of log_interval iterations."""
        return (self.iteration - 1) % len(self.losses) + 1

    def log_loss(self, lr, iters_per_epoch):
        """log.jsonl's loss line: the mean loss since the last one. Returns it."""
        self.check_finite()
        loss = self.losses[:self.window()].mean().item()
        self.write({'iteration': self.iteration, 'epoch': round(self.iteration / iters_per_epoch, 4),
                    'loss': float(f'{loss:.6g}'), 'lr': lr})
        return loss

    def write(self, record):
        try:
            self.log.write(json.dumps(record) + '\n')
            self.log.flush()
        except OSError as e:
            raise UserError(f"{self.log_path}: cannot write it ({e.strerror or e}); {file_advice(e)}, "
                            f"then {self.how_to_go_on()}") from None

    def how_to_go_on(self):
        if self.saved_iteration is None:
            return "run the same command again (nothing of this run was saved yet, so it starts over)"
        return "continue with --resume=True"

    def check_finite(self):
        """Stop at the first NaN or inf since the last check: in a loss, a gradient norm or, after
        them, the weights."""
        n = self.window()
        window = torch.stack((self.losses[:n], self.grad_norms[:n])).cpu()
        bad = (~torch.isfinite(window)).any(0).nonzero()
        if len(bad):
            k = int(bad[0])
            what, value = ('loss', window[0, k]) if not torch.isfinite(window[0, k]) else ('gradient norm', window[1, k])
            self.stop_non_finite(f"the {what} became {value.item()}", self.iteration - n + 1 + k)
        if not torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all():
            self.stop_non_finite("the weights became NaN or inf", self.iteration)

    def stop_non_finite(self, what, where):
        if self.saved_iteration is None:
            kept = "nothing was saved yet; start again (same --out_dir) with a lower --learning_rate or check the features"
        else:
            kept = (f"{self.last_path} keeps the last good state (iteration {self.saved_iteration}); continue from it "
                    "with --resume=True and a lower --learning_rate, or check the features")
        raise UserError(f"{what} at iteration {where}; training stopped: {kept}")

    def after_validation(self, val, iters_per_epoch):
        """Rank 0's validation (None on the other ranks) on the screen and in log.jsonl, the
        curves redrawn, last.pt (and best.pt) saved; every rank waits for it."""
        if self.master:
            print(f"iteration {self.iteration} (epoch {self.iteration / iters_per_epoch:.2f}) val: "
                  f"i2t R@1 {val['i2t']['r1']:.1f} R@5 {val['i2t']['r5']:.1f} R@10 {val['i2t']['r10']:.1f} | "
                  f"t2i R@1 {val['t2i']['r1']:.1f} R@5 {val['t2i']['r5']:.1f} R@10 {val['t2i']['r10']:.1f} | "
                  f"rsum {val['rsum']:.1f}", flush=True)
            self.write({'iteration': self.iteration, 'epoch': round(self.iteration / iters_per_epoch, 4), 'val': val})
            draw_curves(self.log_path, os.path.join(self.out_dir, 'curves.png'))
        self.save(val)
        if self.master and self.patience_exhausted():
            print(f"validation rsum has not improved for {self.since_best} validations (--patience="
                  f"{self.cfg.patience}); stopping, best.pt keeps the best (rsum {self.best_rsum:.1f})")
        barrier()

    def patience_exhausted(self):
        return 0 < self.cfg.patience <= self.since_best

    def save(self, val=None):
        """last.pt, then best.pt when `val` is the best validation so far (last.pt first: a run
        whose save fails half-way can always continue from it)."""
        self.check_finite()
        if self.master:
            improved = val is not None and val['rsum'] > self.best_rsum
            if val is not None:
                self.best_rsum = max(self.best_rsum, val['rsum'])
                self.since_best = 0 if improved else self.since_best + 1
            state = dict(iteration=self.iteration, best_rsum=self.best_rsum, since_best=self.since_best,
                         loss_window=self.losses.cpu(), grad_norm_window=self.grad_norms.cpu(),
                         rng_state=torch.get_rng_state())
            if self.losses.device.type == 'cuda':  # dropout on a GPU draws from the GPU's own generator
                state['cuda_rng_state'] = torch.cuda.get_rng_state(self.losses.device)
            save_checkpoint(self.last_path, self.cfg, self.vocab, self.model, optimizer=self.optimizer.state_dict(), **state)
            self.saved_iteration = self.iteration
            if improved:
                save_checkpoint(self.best_path, self.cfg, self.vocab, self.model, val=val, **state)

    def stop(self, signum):
        """Ctrl-C or SIGTERM: save last.pt, then exit with the shell's code for that signal, so
        that `train.py && eval.py` stops here."""
        self.save()
        if self.master:
            print(f"stopped at iteration {self.iteration}; {self.last_path} saved: continue with --resume=True")
        raise SystemExit(128 + signum)


def save_checkpoint(path, cfg, vocab, model, **state):
    """Everything eval.py needs: the model's config and weights, the vocabulary, the options."""
    buffer = io.BytesIO()  # serialized first: torch.save into a full disk fails with an obscure RuntimeError
    torch.save({'config': vars(cfg), 'model_config': dataclasses.asdict(model.config), 'vocab': vocab,
                'feature_dim': model.config.feature_dim, 'model': model.state_dict(), **state}, buffer)
    with atomic_open(path) as f:
        f.write(buffer.getbuffer())


# ----------------------------------------------------------------------------- starting and resuming

def take_run_folder(out_dir, resume):
    """Lock out_dir for this run (one writer per run folder) and check what is in it. A folder
    no train.py is at work in is checked before its lock file is made, so that a refusal leaves
    it as it was; then again under the lock, where a run in progress is named first."""
    lock_path = os.path.join(out_dir, '.train.lock')
    if not os.path.exists(lock_path):
        refuse_used_folder(out_dir, resume)
    lock = FolderLock(out_dir, os.path.basename(lock_path), 'train.py', 'run folder')
    try:
        refuse_used_folder(out_dir, resume)
    except UserError:
        lock.release()
        raise
    return lock


def refuse_used_folder(out_dir, resume):
    """A new run never overwrites another run's results (a checkpoint or an evaluation); a log
    without a checkpoint is of a run that stopped before its first save, with nothing to keep.
    A resumed run needs the last.pt it continues from."""
    last = os.path.join(out_dir, 'last.pt')
    kept = [name for name in ('last.pt', 'best.pt') if os.path.exists(os.path.join(out_dir, name))]
    kept += sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(out_dir), 'results_*.json')))
    if resume and not os.path.exists(last):
        if kept:
            raise UserError(f"{last}: missing, so there is nothing to resume ({out_dir} holds {', '.join(kept)}); "
                            "choose another --out_dir for a new run")
        raise UserError(f"{last}: no checkpoint to resume from (the run stopped before its first save, or none ran "
                        "here); drop --resume=True to start it again in this folder")
    if kept and not resume:
        raise UserError(f"{out_dir} holds another run ({', '.join(kept)}): pass --resume=True to continue it, "
                        "or choose another --out_dir")


def resume_from(path, cfg, vocab, model, optimizer, dev):
    """Load last.pt into the model, the optimizer and the RNG; returns the checkpoint."""
    from model import model_config_of
    ckpt = load_checkpoint(path, dev)
    saved, now = dataclasses.asdict(model_config_of(ckpt)), dataclasses.asdict(model.config)
    changed = {k: (saved[k], now[k]) for k in now if saved.get(k) != now[k]}
    changed.update({k: (ckpt['config'].get(k), getattr(cfg, k)) for k in SAME_BATCHES if ckpt['config'].get(k) != getattr(cfg, k)})
    if changed or ckpt['vocab'] != vocab:
        what = [f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()]
        what += ["its vocabulary is not this dataset's"] if ckpt['vocab'] != vocab and 'vocab_size' not in changed else []
        again = {option_of(k, a, ckpt['config']) for k, (a, _) in changed.items()}
        again |= {option_of('vocab_size', None, ckpt['config'])} if ckpt['vocab'] != vocab else set()
        raise UserError(f"{path}: cannot resume with other options ({', '.join(what)}); resume with "
                        f"{' '.join(sorted(again))}, or start a new run with another --out_dir")
    try:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        for group in optimizer.param_groups:  # the saved groups' decay would override --weight_decay
            group.update(weight_decay=cfg.weight_decay, decoupled_weight_decay=True)
        ckpt['iteration'], ckpt['best_rsum'] = int(ckpt['iteration']), float(ckpt['best_rsum'])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: does not fit this model ({type(e).__name__}: {str(e).splitlines()[0][:150]}); "
                        "resume with the options it was trained with, or use a new --out_dir") from None
    if 'rng_state' in ckpt:
        torch.set_rng_state(ckpt['rng_state'].cpu())
    if 'cuda_rng_state' in ckpt and dev.type == 'cuda':
        torch.cuda.set_rng_state(ckpt['cuda_rng_state'].cpu(), dev)
    notes = [f"{k} {v!r} -> {getattr(cfg, k)!r}" for k, v in ckpt['config'].items()
             if k != 'resume' and hasattr(cfg, k) and v != getattr(cfg, k)]
    if notes:
        print("note: resuming with " + ', '.join(notes))
    return ckpt


def option_of(field, saved, config):
    """The train.py option that gives a ModelConfig field (or a SAME_BATCHES option) its saved value."""
    if field == 'cnn':
        return f"--finetune={bool(saved)}"
    if field in ('feature_dim', 'vocab_size'):
        return f"--data_dir={config.get('data_dir', '?')}"
    return f"--{field}={saved}"


def trim_log(path, iteration):
    """A resumed run repeats the iterations after its checkpoint: drop their lines (and a line
    torn by a kill) from log.jsonl, so that it reads as if the run had never stopped."""
    if not os.path.exists(path):
        return
    with open(path, encoding='utf-8', errors='replace') as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if line.endswith('\n') and json.loads(line)['iteration'] <= iteration:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if kept != lines:
        with atomic_open(path, 'w') as f:
            f.writelines(kept)


def remove_stale_temporaries(out_dir):
    """The temporary files (.<name>.<random>.tmp) of atomic writes that a kill interrupted:
    checkpoints can be large, and any file of the run folder may have been mid-write."""
    for path in glob.glob(os.path.join(glob.escape(out_dir), '.*.tmp')):
        os.remove(path)


def draw_curves(log_path, png_path):
    """log.jsonl -> a PNG of three panels against iterations: the training loss (log scale: it
    falls by orders of magnitude), then the validation R@1/R@5/R@10 of image->text and of
    text->image. A resumed run's log repeats iterations; the last record of each counts."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    loss, val = {}, {}
    with open(log_path, encoding='utf-8') as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the torn last line of a killed run, before a resume
                continue
            (loss if 'loss' in record else val)[record['iteration']] = record.get('loss', record.get('val'))
    figure, axes = plt.subplots(1, 3, figsize=(11.4, 3), dpi=100, layout='constrained')
    axes[0].plot(sorted(loss), [loss[i] for i in sorted(loss)], color='#282828', label='loss')
    axes[0].set(title='training loss (mean over log_interval)', xlabel='iteration', yscale='log')
    for ax, (key, name) in zip(axes[1:], (('i2t', 'image->text'), ('t2i', 'text->image'))):
        for k, colour in ((1, 'tab:red'), (5, 'tab:blue'), (10, 'tab:green')):
            ax.plot(sorted(val), [val[i][key][f'r{k}'] for i in sorted(val)], 'o-', color=colour, label=f'R@{k}', ms=3)
        ax.set(title=f'validation {name} recall (%)', xlabel='iteration', ylim=(0, 100))
        ax.legend(loc='lower right', fontsize='small')
    with atomic_open(png_path) as f:
        figure.savefig(f, format='png')
    plt.close(figure)


class StopRequests:
    """SIGINT / SIGTERM while training: the loop stops at the next iteration boundary and saves
    last.pt. A second Ctrl-C stops at once (all writes are atomic, so nothing is torn)."""

    def __enter__(self):
        self.signum = None
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, iteration, world, dev, every):
        """Whether to stop here; under torchrun all ranks agree, every `every` iterations."""
        if world > 1 and iteration % every:
            return False
        return any_rank(self.signum is not None, dev)

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


class progress:
    """An epoch's progress, from iteration `start` of `total`: on a terminal a tqdm bar (gone when
    the epoch ends, or when an error ends it, so that an error stays one line); elsewhere (a job
    log, nohup) a line per loss logged, as nanoGPT prints. Silent on ranks other than 0."""

    def __init__(self, title, start, total, shown):
        self.terminal, self.shown = sys.stderr.isatty(), shown
        self.bar = tqdm(desc=title, initial=start, total=total, leave=False, disable=not (shown and self.terminal))

    def update(self, n):
        self.bar.update(n)

    def show(self, iteration, loss):
        if self.terminal:
            self.bar.set_postfix(loss=f"{loss:.3f}")
        elif self.shown:
            print(f"step {iteration}: loss {loss:.4f}", flush=True)

    def close(self):
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
