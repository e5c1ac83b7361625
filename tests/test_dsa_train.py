"""Training DeepSeek-V3.2's lightning indexer: the KL target against a direct per-head computation, the dense
warm-up (only the indexer learns, its KL falls), the sparse stage (the indexer learns from its KL only, the model
from the LM loss only), and `dsmoe train --preset tiny-v3.2 --indexer-warmup-steps N` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dsmoe
from dsmoe.train import checkpoint as ckpt_module
from dsmoe.train import indexer as ix
from dsmoe.train.metrics import read_metrics


def _model(seed: int = 0, topk: int = 8) -> dsmoe.Transformer:
    # initializer_range 0.1: peaked attention, so the target distribution is far from the indexer's at start
    config = dsmoe.get_preset("tiny-v3.2").replace(num_hidden_layers=2, vocab_size=64, index_topk=topk,
                                                   initializer_range=0.1, num_nextn_predict_layers=0)
    torch.manual_seed(seed)
    return dsmoe.Transformer(config)


def _reference_kl(attn, x, rope, keys_visible):
    """KL(p || softmax(I)) with p from per-head keys decompressed the naive way, each head's softmax summed
    and L1-normalised, torch's kl_div; mean over queries."""
    cos, sin = rope
    q_lat = attn.q_norm(attn.wq_a(x))
    q_nope, q_pe = attn.query(x, cos, sin, q_lat)
    c_kv, k_pe = attn.latent(x, cos, sin)
    B, T, H, _ = q_nope.shape
    k_nope = attn.wkv_b(c_kv).view(B, T, H, -1)[..., :attn.nope_dim]
    q = torch.cat((q_nope, q_pe), -1)  # (B, T, H, N + R)
    k = torch.cat((k_nope, k_pe[:, :, None].expand(-1, -1, H, -1)), -1)  # (B, S, H, N + R)
    logits = torch.einsum("bthd,bshd->bhts", q, k) * attn.scale
    p = logits.masked_fill(~keys_visible[:, None], float("-inf")).softmax(-1).sum(1)
    p = p / p.sum(-1, keepdim=True)
    keys = attn.indexer.key(x, cos, sin)
    scores = attn.indexer.scores(x, q_lat, cos, sin, keys, keys_visible)
    log_q = scores.log_softmax(-1).clamp(min=-1e30)
    return F.kl_div(log_q.flatten(0, 1), p.flatten(0, 1), reduction="batchmean")


@pytest.mark.parametrize("stage", [ix.WARMUP, ix.SPARSE])
def test_kl_matches_a_direct_computation(stage):
    model = _model()
    ids = torch.randint(0, 64, (2, 24))
    ix.set_stage(model, stage)
    with torch.no_grad():
        model(ids)
        got = model.layers[0].attn.indexer.last_loss
        x = model.layers[0].attn_norm(model.embed(ids))
        rope = model.rope(torch.arange(24), x.dtype)
        visible = torch.ones(24, 24, dtype=torch.bool).tril()[None].expand(2, -1, -1)
        if stage == ix.SPARSE:  # the selected keys only: the same top-8 the model picked
            attn = model.layers[0].attn
            cos, sin = rope
            q_lat = attn.q_norm(attn.wq_a(x))
            scores = attn.indexer.scores(x, q_lat, cos, sin, attn.indexer.key(x, cos, sin), visible)
            top = scores.topk(8, dim=-1)
            visible = torch.zeros_like(visible).scatter(-1, top.indices, top.values > float("-inf"))
        want = _reference_kl(model.layers[0].attn, x, rope, visible)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert got > 0.05


def test_dense_warmup_trains_only_the_indexer_and_its_kl_falls():
    model = _model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".indexer." not in n}
    ix.set_stage(model, ix.WARMUP)
    assert all(block.attn.indexer.dense for block in model.layers)
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for i in ix.indexers(model) for p in i.parameters()}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    kls = []
    for _ in range(30):
        model(ids)
        loss = ix.indexer_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        kls.append(float(loss))
    assert kls[-1] < 0.5 * kls[0], kls
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_sparse_stage_keeps_the_two_losses_apart():
    """LM loss -> no gradient into the indexer (top-k is a selection, and its inputs are detached);
    indexer KL -> gradients into the indexer only."""
    model = _model()
    ix.set_stage(model, ix.SPARSE)
    assert all(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, 64, (2, 32))
    logits = model(ids[:, :-1])
    lm = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    kl = ix.indexer_loss(model)
    lm.backward(retain_graph=True)
    for name, p in model.named_parameters():
        if ".indexer." in name:
            assert p.grad is None or not p.grad.any(), name
    assert model.layers[0].attn.wkv_b.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    kl.backward()
    for name, p in model.named_parameters():
        if ".indexer." not in name:
            assert p.grad is None or not p.grad.any(), name
    assert model.layers[1].attn.indexer.wq_b.weight.grad.abs().sum() > 0
    ix.set_stage(model, None)
    assert all(not i.dense and i.loss_mode is None for i in ix.indexers(model))


def test_cli_refuses_warmup_for_a_model_without_dsa(tmp_path, capsys):
    from dsmoe.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "tiny-v3", "--indexer-warmup-steps", "2", "--out", str(tmp_path / "x")])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsmoe: error: --indexer-warmup-steps"), err
    assert not (tmp_path / "x").exists()


def test_set_stage_refuses_models_without_dsa():
    with pytest.raises(ValueError, match="deepseek_v32"):
        ix.set_stage(dsmoe.Transformer(dsmoe.get_preset("tiny-v3").replace(num_hidden_layers=1)), ix.WARMUP)


def test_cli_warmup_then_sparse_run_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    import inspect
    import signal

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for module in (json, os, signal, subprocess):
        (corpus / f"{module.__name__}.py").write_text(inspect.getsource(module))
    out = tmp_path / "run"
    env = dict(os.environ, DSMOE_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "dsmoe", "train", "--preset", "tiny-v3.2", "--data", str(corpus),
                             "--out", str(out), "--steps", "8", "--indexer-warmup-steps", "4", "--batch-size", "2",
                             "--seq-len", "80", "--eval-every", "8", "--lr", "1e-2"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["indexer_loss"] >= 0 for r in records)
    warm, sparse = records[:4], records[4:]
    assert all(r["loss"] == r["indexer_loss"] for r in warm)  # the warm-up trains the indexers' KL alone
    assert sparse[-1]["lm_loss"] < warm[-1]["lm_loss"]  # then the model itself learns
    assert warm[-1]["indexer_loss"] < warm[0]["indexer_loss"]
    assert (out / "loss.png").is_file()


    ckpt = (out / ckpt_module.CURRENT).resolve()
    ours = dsmoe.load_pretrained(ckpt, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)
