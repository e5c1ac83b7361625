"""Expert parallelism (EP) and data parallelism (DP) on torch.distributed, applied from outside the model.

The model code stays single-device; this package patches a built model (`shard_experts` swaps each MoE
layer's experts for an all-to-all version with the same forward signature) and supplies the collectives
a training loop calls around an unchanged forward / backward. gloo for CPU tensors (what dsmoe's CLI uses);
NCCL for callers that keep the model on the GPU (`init_distributed(..., backend="nccl")`, untested here).

A training step under `torchrun --nproc_per_node N -m dsmoe train ... --ep EP`:

    info = init_distributed(ep, n_experts)               # once; EP x DP groups
    model = Transformer(config) / load_pretrained(...)   # full model, same seed or checkpoint on every rank
    plan = shard_experts(model, info)                    # before the optimizer; plan.warnings for the CLI
    broadcast_parameters(model, info)
    optimizer = AdamW(model.parameters(), ...)           # resume: load shard_optimizer_state(full, ...)
    for each step:
        tokens = split_batch(global_tokens, info)        # B / world rows each
        loss = compute_losses(model, tokens, ...)        # local means
        loss.backward()
        all_reduce_gradients(model, info)                # -> gradient of the global-batch mean
        clip_grad_norm(model, max_norm, info)            # norm over the whole unsharded model
        optimizer.step()
        loads = global_expert_loads(expert_loads(layers), info)   # then update_biases(layers, loads, gamma)
        record = mean_over_world(losses.as_floats(), info)
    at save: model_full = unshard_experts(model, info); opt = full_optimizer_state(optimizer, model, info)
             (collective; world rank 0 gets them and writes the checkpoint)

`ep_plan(config, ep)` is the calculator for `dsmoe info --ep`.
"""

from .data import (all_reduce_gradients, broadcast_from_main, broadcast_parameters, clip_grad_norm,
                   global_expert_loads, mean_over_world, split_batch)
from .expert import ExpertParallelExperts, ShardPlan, all_to_all, max_ranks_per_token, shard_experts
from .groups import ParallelInfo, barrier, destroy, init_distributed, make_groups
from .plan import ep_plan, rank_hit_probabilities
from .state import (all_gather_experts, full_optimizer_state, full_state_dict, shard_optimizer_state,
                    unshard_experts)

__all__ = [
    "ParallelInfo", "init_distributed", "make_groups", "barrier", "destroy",
    "ExpertParallelExperts", "ShardPlan", "shard_experts", "all_to_all", "max_ranks_per_token",
    "broadcast_parameters", "all_reduce_gradients", "clip_grad_norm", "global_expert_loads", "split_batch",
    "mean_over_world", "broadcast_from_main",
    "all_gather_experts", "full_state_dict", "unshard_experts", "full_optimizer_state", "shard_optimizer_state",
    "ep_plan", "rank_hit_probabilities",
]
