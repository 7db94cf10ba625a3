"""The plumbing of distributed runs: the gradient sync of DDP and FSDP2 modules, and FSDP2
sharding of a GPT."""

import torch


def set_grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Turn the gradient all-reduce of a DDP or FSDP2 module on or off, so that only the
    last of several backward passes pays for it; a plain module is left alone."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2's fully_shard
        model.set_requires_gradient_sync(enabled)


def shard_model(model: torch.nn.Module, device_type: str, world_size: int, compile_blocks: bool = False) -> None:
    """FSDP2 for a model.GPT, in place: each transformer block is one unit and the root holds
    the rest. The tied wte/lm_head weight is one tensor, so it belongs to the root's unit (with
    wpe and ln_f). The parameters become DTensor shards over a 1-D mesh of all ranks; build the
    optimizer afterwards. With compile_blocks, each block is compiled before it is sharded
    (the pattern torch documents for FSDP2: FSDP2's all-gathers stay between the compiled
    graphs); the root is then not compiled."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device_type, (world_size,))
    for block in model.transformer.h:
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
