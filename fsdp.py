"""
fsdp.py -- sharding train.py's model over the processes (--fsdp): FSDP2, PyTorch's fully_shard
(torch.distributed.fsdp; Zhao et al. 2023 for FSDP; the recipe of torchtitan and torchtune: each block, then
the root).

fully_shard wraps each transformer block, the embedding and lm_head (each its own group, as torchtitan does,
unless tied), then the root (final norm, adapter_banks: the tensors several blocks share); every parameter is
cut along dim 0 (torch.chunk; an uneven last shard is padded). No process ever holds the whole base:
fsdp_skeleton builds the model on the meta device with zero-byte frozen weights (the adapter's init drawn as
in a 1-process run), shard_model shards it, and load_local_slices copies each process's rows of each base
tensor from the memory-mapped safetensors (safe_open(...).get_slice). For saving, gather_whole / full_state
gather the adapter and the optimizer state whole, so ckpt.pt and adapter.safetensors are the files a
1-process run writes; shard_like / shard_optimizer_state cut a whole checkpoint back into shards on resume.
resident_base_bytes measures what a process holds of the base (the start record's base_bytes_per_process).
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open

import adapters
from model import (LoadError, ModelConfig, Transformer, rope_inv_freq, safetensors_header, weight_files,
                   weights_fingerprint)


def fsdp_skeleton(model_dir, dtype, device):
    """The model with zero-byte frozen weights: built on the meta device, then each base tensor becomes a stride-0
    view of one zero on `device` (no memory), so that adapters.inject draws the adapter's init there from the same
    seeded generator, in the same order, as a 1-process run. shard_model then gives each process its own slices."""
    cfg = ModelConfig.from_hf(model_dir)
    cfg.dtype = str(dtype).removeprefix("torch.")
    with torch.device("meta"):
        model = Transformer(cfg)
    zero = torch.zeros((), dtype=dtype, device=device)
    for name, p in list(model.named_parameters()):  # a tied lm_head appears once
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(zero.expand(p.shape)))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.base_weights = weights_fingerprint(model_dir)  # as from_pretrained records it (save_adapter writes it)
    return model.eval()


def shard_model(model, model_dir, device, param_names):
    """fully_shard each block, the embedding and lm_head, then the root (the rest: final norm, adapter_banks); then each
    process fills its own slices: of the base from the checkpoint, of the adapter from its init. Returns the sharded
    trainable parameters (DTensors: fully_shard replaces every Parameter), in param_names' order.
    Precision as under DDP: the frozen base keeps its dtype and the adapter its fp32 masters (param_dtype None: no
    cast; autocast picks the matmul dtype), gradients are reduce-scattered in fp32 (reduce_dtype), and the optimizer
    state is sharded like its parameters. Every tensor is cut along dim 0 (torch.chunk; an uneven last shard is
    padded), so no world size is refused for a shape.
    Tensors several blocks share (MASA's banks, RaSA's pools, BSLoRA's and VB-LoRA's shared parts, MoELoRA's gate)
    live in model.adapter_banks, outside every block, and layers reach them through a Shared handle at call time,
    so they fall to the root's group: gathered when the root's forward starts, kept whole until backward ends
    (FSDP2 does not reshard the root after forward), their gradient summed over the blocks that used them and
    reduce-scattered once. VeRA's frozen pair is a buffer (FSDP never shards buffers; every process rebuilds it from
    the seed). MoSA's partition is an index table in kernels' cache, whole in every process; its λ and the W0 its
    fused weight is built from belong to the block, gathered whole for the block's forward and again for its backward."""
    from torch.distributed.device_mesh import init_device_mesh  # here: 1.2 s of imports a run without --fsdp skips
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # fully_shard takes contiguous or meta tensors: the zero-byte base goes back to meta; the adapter's init and the
    # buffers are kept whole (adapter-sized) to be cut after to_empty gives every tensor its local memory
    init = {n: p.detach().clone() for n, p in model.named_parameters() if n in set(param_names)}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    for name, p in list(model.named_parameters()):
        if name not in init:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                                   requires_grad=False))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    # the embedding and lm_head get their own groups too (as torchtitan does), so each is whole only while it runs,
    # not for all of forward and backward with the root (Llama 3 70B: 2 x 2.1 GB); tied, they are one tensor: root
    separate = [] if model.config.tie_word_embeddings else [model.model.embed_tokens, model.lm_head]
    for m in [*model.model.layers, *separate]:
        fully_shard(m, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in init.items():
            named[n].to_local().copy_(shard_like(v, named[n]).to_local())
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    load_local_slices(model, Path(model_dir))
    return [named[n] for n in param_names]


def load_local_slices(model, model_dir):
    """Copy each process's rows [lo, hi) of every base tensor (fully_shard's dim-0 torch.chunk split) from the
    memory-mapped safetensors with get_slice: no process reads or holds a whole weight. The file is reopened per
    tensor so that the mapped pages a slice touched leave the process with it (else the map's pages would count
    against the peak). Then DoRA's m = ||W0|| per row, from the rows this process holds (m (d_out,) is cut like
    W0's d_out rows, so the local rows match)."""
    found = {k: (f, shape) for f in weight_files(model_dir)
             for k, (_, shape, _) in safetensors_header(model_dir / f).items()}
    skip = set(adapters.adapter_params(model))
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.no_grad():
        for name, p in model.named_parameters():  # the base's names are the checkpoint's keys
            if name in skip:
                continue
            if name not in found or found[name][1] != tuple(p.shape):
                raise LoadError(f"{model_dir}: {name} is {list(found[name][1]) if name in found else 'missing'} but "
                                f"config.json implies {list(p.shape)}: check that config.json belongs to these weights")
            local, rows = p.to_local(), -(-p.shape[0] // world)
            lo, hi = min(rank * rows, p.shape[0]), min((rank + 1) * rows, p.shape[0])
            assert local.shape[0] == hi - lo, (name, local.shape, lo, hi)  # fully_shard's split, as documented
            with safe_open(model_dir / found[name][0], framework="pt") as f:
                local.copy_(f.get_slice(name)[lo:hi])
        for m in model.modules():
            if isinstance(m, adapters.DoRA):
                m.m.to_local().copy_(m.weight.to_local().float().norm(dim=1))


def gather_whole(t):
    """A sharded tensor (DTensor) gathered whole on every process (a collective), or t itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state(params, optimizer=None):
    """Whole CPU copies of the parameters and of the optimizer's state dict, as a 1-process run saves them."""
    whole = [gather_whole(p.detach()).cpu() for p in params]
    if optimizer is None:
        return whole, None
    sd = optimizer.state_dict()
    return whole, {**sd, "state": {i: {k: gather_whole(v).cpu() for k, v in s.items()} for i, s in sd["state"].items()}}


def shard_like(v, p):
    """This process's shard of whole tensor v, placed like sharded parameter p (a local slice: no communication)."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def shard_optimizer_state(sd, params):
    """A whole optimizer state dict (any run's checkpoint) cut like the sharded parameters; AdamW's step stays."""
    cut = lambda v, p: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
    return {**sd, "state": {i: {k: cut(v, params[i]) for k, v in s.items()} for i, s in sd["state"].items()}}


def resident_base_bytes(model, device):
    """Bytes of frozen base weights this process holds (its shards), the most over the processes."""
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p
    n = torch.tensor(sum(local(p).numel() * p.element_size() for p in model.parameters() if not p.requires_grad),
                     dtype=torch.float64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n.item())
