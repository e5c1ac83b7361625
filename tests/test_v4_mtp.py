"""DeepSeek-V4's MTP module (`mtp.{k}.*`) and speculative decoding with it.

transformers does not build V4's MTP, so the forward is checked against a slow twin written here from the
equations of DeepSeek's V4 inference code (MTPBlock: enorm / hnorm / e_proj / h_proj, a V4 block with
hyper-connections, its own hc head and norm, the shared head). The twin recomputes the mHC mixing (pre, post,
Sinkhorn comb), the stream head and the norms with plain loops; it calls the attention and MoE sub-layers as
modules, since those are the main layers' and are checked against transformers in test_v4_parity."""

from __future__ import annotations

import json

import pytest
import torch

import dsmoe
from dsmoe.checkpoint import load_pretrained, save_pretrained
from dsmoe.config import ModelConfig
from dsmoe.generate import GenerationStats, generate
from dsmoe.model.v4 import V4Transformer

HUB = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 48, "hidden_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "q_lora_rank": 16,
    "qk_rope_head_dim": 8, "moe_intermediate_size": 16, "n_routed_experts": 4, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "num_hash_layers": 1, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc",
    "norm_topk_prob": True, "routed_scaling_factor": 1.5, "compress_ratios": [0, 4, 128, 0], "compress_rate_hca": 8,
    "compress_rope_theta": 160000, "rope_theta": 10000, "sliding_window": 6, "o_groups": 2, "o_lora_rank": 8,
    "index_n_heads": 2, "index_head_dim": 8, "index_topk": 3, "hc_mult": 3, "hc_sinkhorn_iters": 6,
    "hc_eps": 1e-6, "swiglu_limit": 10.0, "max_position_embeddings": 512, "num_nextn_predict_layers": 1,
    "initializer_range": 0.2, "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 1,
}


def random_v4(seed: int = 0, with_mtp: bool = True) -> V4Transformer:
    """Every parameter random (norm weights and hc bases/scales too), so each one matters."""
    torch.manual_seed(seed)
    model = V4Transformer(ModelConfig.from_hf(HUB), with_mtp=with_mtp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".scale"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.is_floating_point() and not name.endswith("ffn.gate.bias"):
                p.copy_(0.3 * torch.randn_like(p)) if p.ndim < 2 else None
    return model.eval()


def test_mtp_tensors_round_trip_with_the_hub_names(tmp_path):
    model = random_v4()
    save_pretrained(model, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for hub in ("mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.enorm.weight", "mtp.0.hnorm.weight",
                "mtp.0.norm.weight", "mtp.0.hc_head_fn", "mtp.0.hc_head_base", "mtp.0.hc_head_scale",
                "mtp.0.hc_attn_fn", "mtp.0.hc_ffn_scale", "mtp.0.attn.wq_a.weight", "mtp.0.attn.attn_sink",
                "mtp.0.attn_norm.weight", "mtp.0.ffn.gate.weight", "mtp.0.ffn.gate.bias",
                "mtp.0.ffn.experts.3.w2.weight", "mtp.0.ffn.shared_experts.w1.weight"):
        assert hub in names, hub
    assert not any(n.startswith("model.layers.3.") for n in names)  # no V3-style copy of the layer
    assert not any(n.startswith("mtp.0.embed") or n.startswith("mtp.0.head") for n in names)  # shared
    loaded = load_pretrained(tmp_path / "m")
    assert len(loaded.mtp) == 1
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_original_layout_loads_and_a_checkpoint_without_mtp_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model = random_v4(1)
    save_pretrained(model, tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    glob = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
            "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
            "model.hc_head.hc_scale": "hc_head_scale"}
    (tmp_path / "orig").mkdir()
    save_file({glob.get(k, k.removeprefix("model.")): v for k, v in state.items()},
              tmp_path / "orig" / "model.safetensors")
    (tmp_path / "orig" / "config.json").write_text(json.dumps(HUB))
    loaded = load_pretrained(tmp_path / "orig")
    assert len(loaded.mtp) == 1
    assert torch.equal(loaded.mtp[0].e_proj.weight, model.mtp[0].e_proj.weight)
    (tmp_path / "plain").mkdir()
    save_file({k: v for k, v in state.items() if not k.startswith("mtp.")}, tmp_path / "plain" / "model.safetensors")
    (tmp_path / "plain" / "config.json").write_text(json.dumps(HUB))
    plain = load_pretrained(tmp_path / "plain")
    assert len(plain.mtp) == 0
    ids = torch.randint(0, 48, (1, 9))
    with torch.no_grad():
        assert torch.equal(plain(ids), loaded(ids))


def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _twin_hyper(hc, h, sublayer, eps, norm_eps, iters):
    """DeepSeek's hc_pre / hc_post per token with loops: h (T, N, D)."""
    T, N, D = h.shape
    out = torch.empty_like(h)
    for t in range(T):
        flat = h[t].reshape(-1)
        flat = flat / torch.sqrt((flat * flat).mean() + norm_eps)
        mix = hc.fn @ flat
        s, b = hc.scale, hc.base
        pre = torch.sigmoid(mix[:N] * s[0] + b[:N]) + eps
        post = 2 * torch.sigmoid(mix[N:2 * N] * s[1] + b[N:2 * N])
        comb = (mix[2 * N:] * s[2] + b[2 * N:]).view(N, N)
        comb = torch.stack([torch.softmax(comb[i], 0) for i in range(N)]) + eps
        for it in range(iters):
            if it > 0:
                comb = torch.stack([comb[i] / (comb[i].sum() + eps) for i in range(N)])
            comb = torch.stack([comb[:, j] / (comb[:, j].sum() + eps) for j in range(N)], dim=1)
        out[t] = torch.stack([sum(comb[j, k] * h[t, j] for j in range(N)) for k in range(N)])
        x = sum(pre[j] * h[t, j] for j in range(N))
        out[t] += post[:, None] * sublayer(t, x)[None]
    return out


def test_mtp_forward_equals_a_plain_twin():
    model = random_v4(2)
    c, mtp = model.config, model.mtp[0]
    assert c.hc_mult == 3 and mtp.layer_type == "sliding_attention" and not mtp.ffn.gate.hashed
    torch.manual_seed(3)
    T = 11  # longer than the window (6)
    ids = torch.randint(0, c.vocab_size, (1, T + 1))
    with torch.no_grad():
        streams = model.streams(ids[:, :T])
        got = model.mtp_logits(0, model.mtp_hidden(0, streams, ids[:, 1:]))
        # the twin, from MTPBlock.forward: e = enorm(embed(ids)); x = e_proj(e)[:, :, None] + h_proj(hnorm(h))
        e = _rms(model.embed.weight[ids[0, 1:]], mtp.enorm.weight, c.rms_norm_eps)
        hn = _rms(streams[0], mtp.hnorm.weight, c.rms_norm_eps)
        x = (e @ mtp.e_proj.weight.T)[:, None] + hn @ mtp.h_proj.weight.T  # (T, N, D)
        pos = torch.arange(T)[None]
        cos, sin = model.rope(pos, "main", x.dtype)
        whole = {}

        def attn(t, xt):  # the sub-layer over all positions, computed once from the collapsed inputs
            whole.setdefault("x", []).append(xt)
            return whole["y"][t]

        # attention sees every position: collapse first, run the sub-layer on the sequence, then mix
        pres = _collapse_inputs(mtp.hc_attn, x, c)
        whole["y"] = mtp.attn(mtp.attn_norm(pres[None]), cos, sin, None, pos, None)[0]
        x = _twin_hyper(mtp.hc_attn, x, attn, c.hc_eps, c.rms_norm_eps, c.hc_sinkhorn_iters)
        pres = _collapse_inputs(mtp.hc_ffn, x, c)
        ffn_out = mtp.ffn(mtp.ffn_norm(pres[None]), ids[:, 1:])[0]
        x = _twin_hyper(mtp.hc_ffn, x, lambda t, xt: ffn_out[t], c.hc_eps, c.rms_norm_eps, c.hc_sinkhorn_iters)
        # own hc head: sigmoid weights, then own norm, then the shared head
        flat = x.reshape(T, -1)
        flat = flat / torch.sqrt((flat * flat).mean(-1, keepdim=True) + c.rms_norm_eps)
        pre = torch.sigmoid((flat @ mtp.hc_head.fn.T) * mtp.hc_head.scale + mtp.hc_head.base) + c.hc_eps
        y = (pre[..., None] * x).sum(1)
        want = _rms(y, mtp.norm.weight, c.rms_norm_eps) @ model.head.weight.T
    assert (got[0] - want).abs().max().item() <= 1e-4
    assert (want - model.head(model.norm(model.hc_head(streams)))[0]).abs().max().item() > 1e-2  # not the main head


def _collapse_inputs(hc, h, c):
    """pre-weighted sums of the streams, per token (the sub-layer's input), with loops."""
    T, N, _ = h.shape
    rows = []
    for t in range(T):
        flat = h[t].reshape(-1)
        flat = flat / torch.sqrt((flat * flat).mean() + c.rms_norm_eps)
        pre = torch.sigmoid((hc.fn[:N] @ flat) * hc.scale[0] + hc.base[:N]) + c.hc_eps
        rows.append(sum(pre[j] * h[t, j] for j in range(N)))
    return torch.stack(rows)


def test_speculative_equals_plain_greedy_and_counts_acceptance():
    model = random_v4(4)
    torch.manual_seed(5)
    for T in (3, 10):
        ids = torch.randint(2, model.config.vocab_size, (1, T))
        stats = GenerationStats()
        with torch.no_grad():
            want = generate(model, ids, max_new_tokens=40)
            got = generate(model, ids, max_new_tokens=40, speculative=True, stats=stats)
        assert torch.equal(got, want)
        assert stats.drafted > 0 and 0 <= stats.accepted <= stats.drafted


def test_speculative_accepts_when_the_draft_is_right(monkeypatch):
    """A drafter that proposes the main model's own greedy token: every draft is accepted and the output is
    unchanged (this exercises the accept branch, two tokens per step, deterministically)."""
    import dsmoe.generate_v4 as g4

    model = random_v4(6)
    torch.manual_seed(7)
    ids = torch.randint(2, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        want = generate(model, ids, max_new_tokens=25)
    truth = want[0].tolist() + [0, 0]
    emitted = [0]  # tokens the generator has yielded when it asks for its next draft

    def oracle(depth, h):  # the draft is the token after the one about to be emitted
        logits = torch.zeros(1, h.shape[1], model.config.vocab_size)
        logits[:, -1, truth[ids.shape[1] + emitted[0] + 1]] = 1.0
        return logits

    real = g4.speculative_v4

    def counting(*args):
        for step in real(*args):
            emitted[0] += step.shape[1]
            yield step

    monkeypatch.setattr(model, "mtp_logits", oracle)
    monkeypatch.setattr(g4, "speculative_v4", counting)
    stats = GenerationStats()
    with torch.no_grad():
        got = generate(model, ids, max_new_tokens=25, speculative=True, stats=stats)
    assert torch.equal(got, want)
    assert stats.drafted >= 10 and stats.accepted == stats.drafted


def test_cli_generate_speculative_reports_acceptance(tmp_path):
    import subprocess
    import sys

    from tiny_assets import build_tokenizer

    tok = build_tokenizer(tmp_path)
    torch.manual_seed(0)
    config = ModelConfig.from_hf(dict(HUB, vocab_size=tok.get_vocab_size()))
    dsmoe.save_pretrained(V4Transformer(config, with_mtp=True), tmp_path)
    out = subprocess.run([sys.executable, "-m", "dsmoe", "generate", "--model", str(tmp_path), "--prompt", "def ",
                          "--max-new-tokens", "12", "--speculative"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MTP draft acceptance" in out.stdout + out.stderr


def test_tiny_v4_trains_its_mtp_and_transformers_still_loads_it(tmp_path, tmp_path_factory, monkeypatch):
    """`dsmoe train --preset tiny-v4 --set num_nextn_predict_layers=1`: mtp_loss is logged and falls, the
    checkpoint holds mtp.0.* (our loader builds the module), and transformers (which drops mtp.*) gives the
    same main logits."""
    import inspect
    import os

    from dsmoe.train.loop import TrainConfig, train
    from dsmoe.train.metrics import read_metrics

    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for module in (json, os):
        (corpus / f"{module.__name__}.py").write_text(inspect.getsource(module))
    out = tmp_path / "run"
    train(TrainConfig(preset="tiny-v4", overrides={"num_nextn_predict_layers": 1}, steps=6, save_every=6,
                      data=corpus, out=out, batch_size=4, seq_len=48, eval_every=6, eval_batches=1, vocab_size=300,
                      lr=3e-3))
    records = read_metrics(out / "metrics.jsonl")
    assert "mtp_loss" in records[0]
    assert records[-1]["mtp_loss"] < records[0]["mtp_loss"] - 0.3
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 0.3
    model = dsmoe.load_pretrained(out, dtype=torch.float32)
    assert len(model.mtp) == 1 and model.mtp[0].ffn.gate.bias.abs().sum() > 0  # its router balanced too
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids), atol=1e-4, rtol=0)
        assert torch.equal(generate(model, ids, 10, speculative=True), generate(model, ids, 10))
