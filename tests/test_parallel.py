"""Expert and data parallelism: 2 (and 4) gloo processes on the CPU against one process on the same batch,
and the EP calculator against an enumeration of every routing case and against the real router.

Each spawned process builds the same full model from the same seed, computes the single-process reference
itself (on the whole global batch), then shards the experts and checks its own share of the parallel run.
Several checks share one spawn: starting gloo processes costs seconds.
"""

from __future__ import annotations

import copy
import itertools
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsmoe import Transformer, load_pretrained, save_pretrained
from dsmoe.calc import arch_stats
from dsmoe.parallel import (ParallelInfo, all_gather_experts, all_reduce_gradients, barrier, broadcast_parameters,
                            clip_grad_norm, ep_plan, full_optimizer_state, global_expert_loads, make_groups,
                            max_ranks_per_token, mean_over_world, rank_hit_probabilities, shard_experts,
                            shard_optimizer_state, split_batch, unshard_experts)
from dsmoe.parallel.expert import ExpertParallelExperts, expert_parameter_names
from dsmoe.presets import get_preset
from dsmoe.ops.capacity import TokenDropping, protected_sequences
from dsmoe.train.objective import BalanceSettings, compute_losses, dropped_fraction, expert_loads, update_biases

T = 12  # tokens per sequence
BATCH = 4  # global batch
V3_SETTINGS = dict(schemes=("aux_free", "seq"))  # both exact under data parallelism (see parallel/data.py)


def _config(name: str):
    return get_preset(name).replace(num_hidden_layers=2, vocab_size=256, max_position_embeddings=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    # A fork server that has imported torch and dsmoe once: each process then starts in milliseconds
    # instead of re-importing torch (seconds each on 2 shared cores), and forks no OpenMP state of pytest's.
    mp.set_forkserver_preload(["torch", "torch.distributed", "dsmoe", "dsmoe.parallel", "dsmoe.train.objective"])
    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True,
                       start_method="forkserver")


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 2e-6, rtol: float = 1e-4) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _grad(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


def _full(name: str, t: torch.Tensor, experts: set[str], info: ParallelInfo) -> torch.Tensor:
    return all_gather_experts(t, info) if name in experts else t


def _loss(model: Transformer, tokens: torch.Tensor, name: str) -> torch.Tensor:
    settings = BalanceSettings(**(V3_SETTINGS if name == "tiny-v3" else {}))
    return compute_losses(model, tokens, T, settings, mtp_weight=0.3)


# ---------------------------------------------------------------------------------------------- (a) forward / backward

def _check_forward_backward(info: ParallelInfo, name: str, skew: bool = False) -> None:
    """Logits and every gradient (experts gathered) of EP on a split batch == one process on the whole."""
    torch.manual_seed(0)
    ref = Transformer(_config(name)).train()
    if skew:  # every token picks rank 0's experts: rank 1 receives nothing, its backward must still run
        for moe in ref.moe_layers(include_mtp=True):
            moe.gate.bias[: moe.gate.n_experts // 2] = 10.0
    tokens = torch.randint(0, ref.config.vocab_size, (BATCH, T + 2))
    model = copy.deepcopy(ref)
    ref_loss = _loss(ref, tokens, name)
    ref_loss.total.backward()
    ref_logits = ref(tokens[:, :T]).detach()

    shard_experts(model, info)
    twin = copy.deepcopy(model)  # a copy shares the process group
    local = split_batch(tokens, info)
    losses = _loss(model, local, name)
    losses.total.backward()
    all_reduce_gradients(model, info)
    rows = split_batch(torch.arange(BATCH), info)
    _close(model(local[:, :T]).detach(), ref_logits[rows], f"{name} logits")
    _close(torch.tensor(mean_over_world(losses.as_floats(), info)["lm_loss"]), ref_loss.lm.detach(), f"{name} lm")
    experts = expert_parameter_names(model)
    ref_params = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        _close(_full(pname, _grad(p), experts, info), _grad(ref_params[pname]), f"{name} grad {pname}")
    if skew and info.ep_rank == 1:
        assert all(float(p.grad.abs().max()) == 0 for n, p in model.named_parameters() if n in experts)
    if not skew:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast: same up to bf16 noise
            _close(model(local[:, :T]), ref(tokens[:, :T])[rows], f"{name} bf16 logits", atol=2e-2, rtol=2e-2)
        twin.set_dispatch("loop")  # the reference loop dispatch behind the all-to-all
        with torch.no_grad():
            _close(twin(local[:, :T]), ref_logits[rows], f"{name} logits (loop dispatch)")


# ---------------------------------------------------------------------------------------------- (b) training

def _batches(steps: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (BATCH, T + 2), generator=g) for _ in range(steps)]


def _step(model, optimizer, tokens, name, info: ParallelInfo | None) -> dict[str, float]:
    """One training step, single-process when info is None."""
    losses = _loss(model, tokens if info is None else split_batch(tokens, info), name)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    if info is None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    else:
        all_reduce_gradients(model, info)
        norm = clip_grad_norm(model, 1.0, info)
    optimizer.step()
    layers = model.moe_layers(include_mtp=True)
    loads = expert_loads(layers)
    if info is not None:
        loads = global_expert_loads(loads, info)
    if name == "tiny-v3":
        update_biases(layers, loads, 0.01)
    values = losses.as_floats() if info is None else mean_over_world(losses.as_floats(), info)
    return {**values, "grad_norm": float(norm)}


def _optimizer(model):
    # eps well above rounding noise of the gradients: with the default 1e-8 Adam turns an element whose
    # gradient is ~0 into a +-lr step decided by its last bits, which no summation order reproduces
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)


def _check_training(info: ParallelInfo, name: str, steps: int = 3, save_to: Path | None = None) -> None:
    """A few AdamW steps of EP x DP on a split global batch == one process on it: per-step lm_loss within
    1e-4 (relative), and every weight (experts gathered) and router bias equal afterwards."""
    config = _config(name)
    batches = _batches(steps + 1, config.vocab_size)
    torch.manual_seed(0)
    ref = Transformer(config).train()
    model = copy.deepcopy(ref)
    shard_experts(model, info)
    experts = expert_parameter_names(model)
    with torch.no_grad():  # spoil every copy but the source ones: broadcast_parameters must restore them
        for pname, p in model.named_parameters():
            if info.rank != 0 and (pname not in experts or info.dp_rank != 0):
                p.add_(torch.randn_like(p))
    broadcast_parameters(model, info)
    ref_opt, opt = _optimizer(ref), _optimizer(model)
    for step in range(steps):
        want = _step(ref, ref_opt, batches[step], name, None)
        got = _step(model, opt, batches[step], name, info)
        for key in ("lm_loss", "loss", "grad_norm"):
            gap = abs(got[key] - want[key]) / abs(want[key])
            assert gap < 1e-4, f"{name} step {step + 1} {key}: {got[key]} vs {want[key]} ({info})"
    _check_weights(model, ref, info, name)
    if save_to is not None:
        _check_save_and_resume(model, opt, ref, ref_opt, batches[steps], info, name, save_to)


def _check_weights(model, ref, info: ParallelInfo, name: str) -> None:
    """Equal up to 3% of one step (lr 1e-2): Adam divides each gradient element by its own RMS, so the
    last-bit differences of another summation order grow to ~1e-4 in elements whose gradient is ~0.
    (Adam is blind to a gradient's scale: the per-step grad_norm comparison is what checks that.)"""
    experts = expert_parameter_names(model)
    ref_state = ref.state_dict()
    for key, t in model.state_dict().items():
        _close(_full(key, t, experts, info), ref_state[key], f"{name} weight {key}", atol=3e-4)


# ---------------------------------------------------------------------------------------------- (c) checkpoints

def _check_save_and_resume(model, opt, ref, ref_opt, next_batch, info: ParallelInfo, name: str, out: Path) -> None:
    """Unshard -> save_pretrained on rank 0 -> (1 process loads it: the pytest process, afterwards);
    resume in N processes from that full checkpoint and the full optimizer state == one more reference step."""
    plain = unshard_experts(model, info)
    full_opt = full_optimizer_state(opt, model, info)
    if info.is_main:
        assert plain is not None and not any(isinstance(m, ExpertParallelExperts) for m in plain.modules())
        save_pretrained(plain, out / "ckpt")
        torch.save(full_opt, out / "optimizer.pt")
        torch.save({k: v.clone() for k, v in plain.state_dict().items()}, out / "expected.pt")
        # the gathered optimizer state is the one-process optimizer's
        ref_state = ref_opt.state_dict()["state"]
        for i, entry in full_opt["state"].items():
            for k, v in entry.items():
                _close(v, ref_state[i][k], f"{name} optimizer state {i}.{k}", atol=1e-5)
    else:
        assert plain is None and full_opt is None
    barrier(info)
    resumed = load_pretrained(out / "ckpt", dtype=torch.float32).train()
    shard_experts(resumed, info)
    optimizer = _optimizer(resumed)
    optimizer.load_state_dict(shard_optimizer_state(torch.load(out / "optimizer.pt"), resumed, info, optimizer))
    want = _step(ref, ref_opt, next_batch, name, None)
    got = _step(resumed, optimizer, next_batch, name, info)
    assert abs(got["lm_loss"] - want["lm_loss"]) / want["lm_loss"] < 1e-4, (got, want)
    _check_weights(resumed, ref, info, f"{name} resumed")


# ---------------------------------------------------------------------------------------------- workers

def _check_frozen_experts_keep_their_shards(info: ParallelInfo, name: str) -> None:
    """broadcast_parameters picks expert shards by name: frozen ones must not be overwritten by rank 0's."""
    torch.manual_seed(0)
    full = Transformer(_config(name))
    model = copy.deepcopy(full)
    shard_experts(model, info)
    for moe in model.moe_layers():
        moe.experts.requires_grad_(False)
    broadcast_parameters(model, info)
    C = full.config.n_routed_experts // info.ep_size
    for ours, ref in zip(model.moe_layers(), full.moe_layers(), strict=True):
        assert torch.equal(ours.experts.w1, ref.experts.w1[info.ep_rank * C:(info.ep_rank + 1) * C])


def _check_token_dropping(info: ParallelInfo, name: str) -> None:
    """With a capacity, each rank drops from its own rows: EP == one process on this rank's rows."""
    torch.manual_seed(0)
    ref = Transformer(_config(name)).train()
    rows = split_batch(torch.arange(BATCH), info)
    for moe in ref.moe_layers(include_mtp=True):
        moe.token_dropping = TokenDropping(0.5)
        moe.protected_rows = protected_sequences(rows, 0.5)  # one of this rank's two rows
    model = copy.deepcopy(ref)
    shard_experts(model, info)
    local = split_batch(torch.randint(0, ref.config.vocab_size, (BATCH, T)), info)
    logits = model(local)
    _close(logits, ref(local), f"{name} logits with token dropping")
    assert 0.2 < dropped_fraction(model.moe_layers()) < 0.8
    logits.sum().backward()  # every rank runs the same collectives backwards, with or without rows


def _two_process_worker(rank: int, out: str) -> None:
    ep2 = make_groups(2, n_experts=8)  # ep 2 x dp 1
    dp2 = make_groups(1)  # ep 1 x dp 2: plain data parallelism
    assert (ep2.ep_rank, ep2.ep_size, ep2.dp_size, ep2.ep_ranks()) == (rank, 2, 1, [0, 1])
    assert (dp2.dp_rank, dp2.dp_size, dp2.dp_ranks()) == (rank, 2, [0, 1])
    for name in ("tiny-v3", "tiny-mixtral"):
        _check_forward_backward(ep2, name)
    _check_forward_backward(ep2, "tiny-v3", skew=True)
    _check_frozen_experts_keep_their_shards(ep2, "tiny-mixtral")
    _check_token_dropping(ep2, "tiny-v3")
    _check_training(ep2, "tiny-v3", save_to=Path(out))
    _check_training(ep2, "tiny-mixtral", steps=2)
    _check_training(dp2, "tiny-v3", steps=2)


def _four_process_worker(rank: int) -> None:
    info = make_groups(2)  # ep 2 x dp 2
    assert info.ep_ranks() == [2 * (rank // 2), 2 * (rank // 2) + 1] and info.dp_ranks() == [rank % 2, rank % 2 + 2]
    _check_forward_backward(info, "tiny-v3")
    _check_training(info, "tiny-v3", steps=2)


def test_expert_and_data_parallel_match_one_process(tmp_path):
    """(a) EP forward/backward, (b) EP and DP training, (c) unshard -> save -> load, in 2 gloo processes."""
    _spawn(_two_process_worker, 2, str(tmp_path))
    # (c) the checkpoint written by rank 0 of the 2-process run, loaded in this single process
    loaded = load_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    expected = torch.load(tmp_path / "expected.pt")
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    for key, t in expected.items():
        assert torch.equal(state[key], t), key


def test_expert_times_data_parallel_four_processes():
    """ep 2 x dp 2: expert gradients summed over the EP group, then over the DP group, over world size."""
    _spawn(_four_process_worker, 4)


# ---------------------------------------------------------------------------------------------- single process

def test_single_process_info_and_validation():
    info = make_groups(1)
    assert (info.world_size, info.ep_size, info.dp_size, info.distributed) == (1, 1, 1, False)
    with pytest.raises(ValueError, match="--ep 2 must divide the number of processes"):
        make_groups(2)
    with pytest.raises(ValueError, match="--ep 3 must divide n_routed_experts"):
        ep_plan(_config("tiny-mixtral"), 3)
    model = Transformer(_config("tiny-mixtral"))
    with pytest.raises(ValueError, match="--ep 3 must divide n_routed_experts"):
        shard_experts(model, ParallelInfo(world_size=3, ep_size=3))
    # no-ops in one process
    tokens = torch.zeros(4, 5, dtype=torch.long)
    assert torch.equal(split_batch(tokens, info), tokens)
    assert mean_over_world({"a": 1.5}, info) == {"a": 1.5}


@pytest.mark.parametrize("name", ["tiny-v3", "tiny-mixtral", "deepseek-v3"])
@pytest.mark.parametrize("ep", [2, 4])
def test_ep_plan_parameters_match_a_sharded_model(name, ep):
    config = get_preset(name) if name.startswith("tiny") else get_preset(name).replace(num_hidden_layers=5)
    plan = ep_plan(config, ep)
    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    shard_experts(model, ParallelInfo(world_size=ep, ep_size=ep, ep_rank=ep - 1))
    per_rank = sum(p.numel() for p in model.parameters())
    assert plan["total_params"] == total
    assert plan["params_per_rank"] == per_rank
    assert plan["weight_bytes_per_rank"] == 2 * per_rank
    stats = arch_stats(config)
    assert plan["replicated_params"] + ep * plan["expert_params_per_rank"] == stats.total_params + stats.mtp_params


def _enumerate_remote_ranks(E: int, K: int, ep: int, n_group: int, M: int) -> tuple[float, int]:
    """Exact mean and max of remote ranks reached, over every source rank, group choice and K-subset."""
    G, C = E // n_group, E // ep
    total, count, most = 0, 0, 0
    for source in range(ep):
        for groups in itertools.combinations(range(n_group), M):
            eligible = [e for g in groups for e in range(g * G, (g + 1) * G)]
            for picks in itertools.combinations(eligible, K):
                remote = len({e // C for e in picks} - {source})
                total, count, most = total + remote, count + 1, max(most, remote)
    return total / count, most


def _with_routing(E: int, K: int, n_group: int, M: int):
    method = "group_limited_greedy" if n_group > 1 else "greedy"
    return get_preset("tiny-v2").replace(n_routed_experts=E, num_experts_per_tok=K, topk_method=method,
                                         n_group=n_group, topk_group=M)


@pytest.mark.parametrize("E,K,ep,n_group,M", [
    (8, 2, 2, 1, 1), (8, 3, 4, 1, 1), (12, 3, 3, 1, 1),  # greedy
    (8, 2, 4, 4, 2), (12, 3, 2, 4, 2), (8, 3, 2, 4, 3),  # whole groups per rank
    (8, 2, 4, 2, 1), (16, 3, 8, 4, 2),  # groups spanning ranks
    (12, 3, 3, 4, 2), (12, 2, 4, 3, 2),  # groups straddling ranks
])
def test_expected_remote_ranks_match_enumeration(E, K, ep, n_group, M):
    config = _with_routing(E, K, n_group, M)
    plan = ep_plan(config, ep, dtype_bytes=2)
    mean, most = _enumerate_remote_ranks(E, K, ep, n_group, M)
    assert plan["expected_remote_ranks_per_token"] == pytest.approx(mean, rel=1e-12)
    assert min(plan["max_ranks_per_token"], ep - 1) == most
    assert plan["alltoall_bytes_per_token_per_layer"] == pytest.approx(2 * config.hidden_size * 2 * mean)
    assert bool(plan["warnings"]) == (n_group > 1 and n_group % ep != 0 and ep % n_group != 0)


@pytest.mark.parametrize("name,ep", [("tiny-mixtral", 4), ("tiny-v1", 4), ("tiny-v2", 2), ("tiny-v2", 4),
                                     ("tiny-v3", 4), ("tiny-v3", 8)])
def test_expected_remote_ranks_against_the_router(name, ep):
    """Simulate the real router on random inputs (i.i.d. scores): the cap holds for every token, and the
    uniform-routing expectation is close: exact for greedy routing; with group-limited routing the real
    picks spread a little wider over the chosen groups (a group is chosen for its high-scoring experts,
    so it rarely gets no pick), a few percent more ranks than a uniform subset of the eligible experts."""
    from dsmoe.model.moe import Router

    config = get_preset(name)
    torch.manual_seed(0)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=config.hidden_size ** -0.5)  # logits ~ N(0, 1): no saturation
    with torch.no_grad():
        indices = router(torch.randn(20000, config.hidden_size)).indices  # (N, K)
    ranks = indices // (config.n_routed_experts // ep)
    hit = torch.zeros(len(ranks), ep, dtype=torch.bool).scatter_(1, ranks, True)
    distinct = hit.sum(dim=1).float()
    assert int(distinct.max()) <= max_ranks_per_token(config, ep)
    simulated_remote = float(distinct.mean()) * (ep - 1) / ep
    probs = rank_hit_probabilities(config, ep)
    assert sum(probs) * (ep - 1) / ep == pytest.approx(ep_plan(config, ep)["expected_remote_ranks_per_token"])
    greedy = config.topk_method == "greedy" or config.n_group == 1
    assert simulated_remote == pytest.approx(sum(probs) * (ep - 1) / ep, rel=0.02 if greedy else 0.1)
