"""Ulysses sequence parallelism for WanTransformer3DModel.

Inside a sequence-parallel (SP) group of p ranks that hold the same samples, each rank keeps 1/p of the video tokens
through every block. Self-attention needs all tokens, so DeepSpeed's DistributedAttention trades the sequence shard
for a head shard by all-to-all (each rank attends over the whole sequence with H/p heads), then trades back.
Everything else in a Wan block (norms, cross-attention to the text, the feed-forward) is per token and stays local.

Where the transformer is cut (forward hooks, so `transformer(hidden_states=, timestep=, encoder_hidden_states=,
return_dict=False)` keeps its signature and returns the full output on every rank of the group):

- `rope` output: the rotary tables are padded and sliced to this rank's tokens; a key mask rides along as a third
  element of the rotary tuple, so a block recomputed by gradient checkpointing sees its own forward's mask.
- `blocks.0` input: the token sequence [B, S, C] is padded to S_pad (a multiple of p) and sliced to [B, S_pad/p, C].
- `attn1` of every block: `UlyssesWanAttnProcessor` (self-attention through DistributedAttention, with padded keys
  masked out so they never reach real tokens).
- `proj_out` output: the shards are all-gathered and the padding dropped, before unpatchify.

Gradients. Every rank of a group computes the same loss on the same gathered output; the gather's backward hands
each rank the gradient of its own tokens (no communication), so each rank's parameter gradient is the contribution of
its token shard, and the **sum over the SP group is the full gradient** (equal to sp_size 1 on the same batch):
- without DeepSpeed, call `sync_sp_gradients(module, sp_group)` after backward (all-reduce SUM in the group);
- under DeepSpeed, whose gradient all-reduce *averages over the whole world* (dp_size * sp_size ranks), multiply
  the loss by `handle.loss_scale` (= sp_size) before `engine.backward` and do not call `sync_sp_gradients`: the world
  mean of shard gradients times sp_size is the mean over data-parallel members of their full gradients.
Both rules assume every trainable parameter sits inside the transformer; a trainable parameter used identically on
every rank of a group (outside the sharded region) would be counted sp_size times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

_ENABLED_ATTR = "_video_branch_sp_handle"


def valid_sp_degrees(num_heads: int, world_size: int) -> list[int]:
    """SP degrees usable with `num_heads` attention heads on `world_size` ranks: divisors of both."""
    if num_heads < 1 or world_size < 1:
        raise ValueError(f"valid_sp_degrees: num_heads and world_size must be >= 1, got {num_heads}, {world_size}")
    return [d for d in range(1, world_size + 1) if world_size % d == 0 and num_heads % d == 0]


def check_sp_degree(num_heads: int, sp_size: int, world_size: int | None = None) -> None:
    """Raise ValueError naming `parallel.sp_size` and the valid degrees unless `sp_size` divides the heads
    (and world)."""
    world = sp_size if world_size is None else world_size
    if sp_size >= 1 and num_heads % sp_size == 0 and world % sp_size == 0:
        return
    raise ValueError(
        f"parallel.sp_size: {sp_size} is not usable with a transformer of {num_heads} attention heads on {world} "
        f"ranks: Ulysses gives every rank of a sequence-parallel group whole heads, so sp_size must divide both the "
        f"head count and the world size; valid degrees: {valid_sp_degrees(num_heads, world)}"
    )


def padded_length(seq_len: int, sp_size: int) -> int:
    """Smallest multiple of `sp_size` that is >= `seq_len`."""
    return -(-seq_len // sp_size) * sp_size


class _GatherSequence(torch.autograd.Function):
    """All-gather shards [B, S/p, ...] along `dim` in rank order; backward keeps this rank's slice of the gradient.

    Every rank computes the same loss from the gathered tensor, so the gradient arriving here is identical on all
    ranks and this rank's slice is exactly the gradient of its shard: no reduction is needed (a reduce-scatter SUM
    would count it p times).
    """

    @staticmethod
    def forward(ctx: Any, shard: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.dim, ctx.rank, ctx.size = dim, rank, shard.shape[dim]
        shard = shard.contiguous()
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard, group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size).contiguous(), None, None


def gather_sequence(shard: torch.Tensor, group: Any, dim: int = 1) -> torch.Tensor:
    """Differentiable all-gather of sequence shards (see `_GatherSequence` for the gradient convention)."""
    return _GatherSequence.apply(shard, group, dim)


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding, as in diffusers' WanAttnProcessor. x: [B, S, H, D]; freqs: [1, S, 1, D]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class UlyssesWanAttnProcessor(WanAttnProcessor):
    """Self-attention of a Wan block on a sequence shard, through DeepSpeed's DistributedAttention.

    Takes `hidden_states` [B, S_pad/p, C] and `rotary_emb` = (cos, sin) [1, S_pad/p, 1, D] or (cos, sin, key_mask)
    with key_mask bool [1, 1, 1, S_pad] (True for real tokens); returns [B, S_pad/p, C].
    """

    def __init__(self, sp_group: Any, attention_backend: Any = None):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self._attention_backend = attention_backend
        # scatter heads (dim 2), gather the sequence (dim 1) of [B, S/p, H, D] tensors.
        self.dist_attn = DistributedAttention(self._local_attention, sp_group, scatter_idx=2, gather_idx=1)

    def _local_attention(self, query, key, value, attn_mask=None):
        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("UlyssesWanAttnProcessor is for Wan self-attention (attn1) only: it got "
                             "encoder_hidden_states or an attention_mask; cross-attention stays local")
        if rotary_emb is None:
            raise ValueError("UlyssesWanAttnProcessor needs the sharded rotary embedding; is sequence parallelism "
                             "enabled through enable_sequence_parallel?")
        freqs_cos, freqs_sin = rotary_emb[0], rotary_emb[1]
        key_mask = rotary_emb[2] if len(rotary_emb) > 2 else None

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)  # RMS over all heads of one token: local to the token, so shard-safe
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query = _apply_rotary_emb(query, freqs_cos, freqs_sin)
        key = _apply_rotary_emb(key, freqs_cos, freqs_sin)

        out = self.dist_attn(query, key, value, 0, None, attn_mask=key_mask)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


@dataclass
class SequenceParallelHandle:
    """What `enable_sequence_parallel` installed; `remove()` (or `disable_sequence_parallel`) undoes it."""

    transformer: Any
    sp_group: Any
    sp_size: int
    sp_rank: int
    _hooks: list = field(default_factory=list, repr=False)
    _processors: dict = field(default_factory=dict, repr=False)
    _seq_len: int | None = field(default=None, repr=False)

    @property
    def loss_scale(self) -> float:
        """Factor on the loss before a DeepSpeed backward (whose all-reduce averages over every rank): sp_size."""
        return float(self.sp_size)

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for block, proc in zip(self.transformer.blocks, self._processors.get("attn1", [])):
            block.attn1.set_processor(proc)
        self._processors.clear()
        if getattr(self.transformer, _ENABLED_ATTR, None) is self:
            delattr(self.transformer, _ENABLED_ATTR)

    # -- hooks -------------------------------------------------------------------------------------------------

    def _check_inputs(self, module, args, kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is not None and torch.is_tensor(timestep) and timestep.ndim > 1:
            raise ValueError(f"sequence parallelism expects one timestep per sample (shape [B]); got per-token "
                             f"timesteps of shape {tuple(timestep.shape)}")
        self._seq_len = None

    def _shard_rope(self, module, args, output):
        freqs_cos, freqs_sin = output
        seq_len = freqs_cos.shape[1]
        self._seq_len = seq_len
        pad = padded_length(seq_len, self.sp_size) - seq_len
        local = (seq_len + pad) // self.sp_size
        shards = tuple(F.pad(f, (0, 0, 0, 0, 0, pad)).narrow(1, self.sp_rank * local, local)
                       for f in (freqs_cos, freqs_sin))
        if not pad:
            return shards
        key_mask = torch.arange(seq_len + pad, device=freqs_cos.device) < seq_len
        return (*shards, key_mask.view(1, 1, 1, -1))

    def _shard_tokens(self, module, args, kwargs):
        in_kwargs = "hidden_states" in kwargs
        hidden = kwargs["hidden_states"] if in_kwargs else args[0]
        seq_len = hidden.shape[1]
        padded = padded_length(seq_len, self.sp_size)
        rope_local = args[3][0].shape[1] if len(args) > 3 else kwargs["rotary_emb"][0].shape[1]
        # Checked against the rope passed alongside, not stored state: a recompute under gradient checkpointing
        # may run after later forwards of other shapes.
        if padded // self.sp_size != rope_local:
            raise RuntimeError(f"sequence parallelism: block 0 got {seq_len} tokens, which do not match the sharded "
                               f"rotary embedding ({rope_local} tokens per rank at sp_size {self.sp_size})")
        local = padded // self.sp_size
        shard = F.pad(hidden, (0, 0, 0, padded - seq_len)).narrow(1, self.sp_rank * local, local)
        if in_kwargs:
            return args, {**kwargs, "hidden_states": shard}
        return (shard, *args[1:]), kwargs

    def _gather_output(self, module, args, output):
        full = gather_sequence(output, self.sp_group, dim=1)
        return full[:, : self._seq_len]


def _unwrap(transformer: Any) -> Any:
    return getattr(transformer, "module", transformer)  # a DeepSpeed engine wraps the model in .module


def enable_sequence_parallel(transformer: Any, sp_group: Any) -> SequenceParallelHandle:
    """Shard a WanTransformer3DModel's token sequence over `sp_group` (Ulysses); returns a handle to undo it.

    `sp_group` None, or a group of one rank, installs nothing (sp_size 1). Raises ValueError naming
    `parallel.sp_size` and the valid degrees when the head count is not divisible by the group size.
    Call it before or after `deepspeed.initialize` (a DeepSpeed engine is unwrapped). Needs `deepspeed.comm`
    initialised (`deepspeed.init_distributed`, as `video_branch.parallel.groups.init_distributed` does).
    """
    model = _unwrap(transformer)
    for name in ("blocks", "rope", "proj_out", "config"):
        if not hasattr(model, name):
            raise TypeError(f"enable_sequence_parallel: {type(model).__name__} is not a WanTransformer3DModel "
                            f"(it has no '{name}')")
    if getattr(model, _ENABLED_ATTR, None) is not None:
        raise RuntimeError("enable_sequence_parallel: sequence parallelism is already enabled on this transformer; "
                           "call disable_sequence_parallel(handle) first")
    sp_size = 1 if sp_group is None else dist.get_world_size(sp_group)
    sp_rank = 0 if sp_group is None else dist.get_rank(sp_group)
    handle = SequenceParallelHandle(transformer=model, sp_group=sp_group, sp_size=sp_size, sp_rank=sp_rank)
    if sp_size == 1:
        return handle
    check_sp_degree(model.config.num_attention_heads, sp_size, dist.get_world_size())
    if len(model.blocks) == 0:
        raise ValueError("enable_sequence_parallel: the transformer has no blocks to shard")
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)

    handle._processors["attn1"] = [block.attn1.processor for block in model.blocks]
    for block, old in zip(model.blocks, handle._processors["attn1"]):
        block.attn1.set_processor(UlyssesWanAttnProcessor(sp_group, getattr(old, "_attention_backend", None)))
    handle._hooks += [
        model.register_forward_pre_hook(handle._check_inputs, with_kwargs=True),
        model.rope.register_forward_hook(handle._shard_rope),
        model.blocks[0].register_forward_pre_hook(handle._shard_tokens, with_kwargs=True),
        model.proj_out.register_forward_hook(handle._gather_output),
    ]
    setattr(model, _ENABLED_ATTR, handle)
    return handle


def disable_sequence_parallel(handle: SequenceParallelHandle) -> None:
    """Remove the hooks and restore the original self-attention processors."""
    handle.remove()


@torch.no_grad()
def sync_sp_gradients(module: torch.nn.Module, sp_group: Any) -> None:
    """All-reduce SUM every parameter gradient over `sp_group`: shard contributions -> the full gradient.

    For training without DeepSpeed. Under DeepSpeed use `handle.loss_scale` instead (see the module docstring).
    Every rank of the group must hold gradients for the same parameters, in the same order.
    """
    if sp_group is None or dist.get_world_size(sp_group) == 1:
        return
    grads = [p.grad for p in _unwrap(module).parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=sp_group)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
