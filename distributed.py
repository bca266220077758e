"""torchrun for train.py: one process per GPU (NCCL) or per CPU slot (gloo), each taking its
share of every global batch; a plain `python train.py` is rank 0 of 1 and none of this acts.

    setup_distributed      (rank, world size, device) from torchrun's environment
    broadcast_weights      every rank starts from rank 0's initial weights
    gather                 every rank's embeddings, gradients flowing back to their owner
    average_gradients      the single-process gradient of the global batch, on every rank
    any_rank               a flag agreed by all ranks (to stop, or to leave the loop together)
"""
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn

from options import pick_device


def setup_distributed(device_name):
    """Under torchrun (WORLD_SIZE > 1): one process per GPU with NCCL, or per CPU slot with gloo.
    Returns (rank, world_size, device)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    dev = pick_device(device_name)
    if world == 1:
        return 0, 1, dev
    if dev.type == 'cuda':
        dev = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(dev)
    dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    return dist.get_rank(), world, dev


def broadcast_weights(model):
    if dist.is_initialized():
        for p in model.parameters():
            dist.broadcast(p.data, 0)


def gather(x):
    """Every rank's rows in rank order, with gradients flowing back to the rank that owns them,
    so that each query is contrasted with the whole global batch, not only its own shard."""
    if not dist.is_initialized():
        return x
    with warnings.catch_warnings():  # torch 2.14 calls it deprecated; it is still the autograd-aware gather
        warnings.simplefilter('ignore', FutureWarning)
        return torch.cat(torch.distributed.nn.functional.all_gather(x))


def average_gradients(model):
    """Every rank computed the same global loss, and the all_gather backward summed the world's
    identical copies of each embedding gradient: summing the parameter gradients over ranks and
    dividing by the world size gives exactly the single-process gradient of the global batch."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def any_rank(flag, dev):
    """True on every rank when it is True on any: ranks must agree before leaving the loop."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([float(bool(flag))], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
