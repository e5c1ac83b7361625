"""DeepSeek-V4 calculator: parameter counts against transformers' modules and ours on the meta device, the
published totals, and the KV cache per layer type."""

from __future__ import annotations

import pytest
import torch

from dsmoe.calc import arch_stats
from dsmoe.calc_v4 import kv_cache_rows, layer_cache_elements, total_params
from dsmoe.model.v4 import V4Transformer
from dsmoe.presets import get_preset

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["deepseek-v4-flash", "deepseek-v4-pro", "tiny-v4"])
def test_total_equals_transformers_and_ours_on_meta(name):
    config = get_preset(name)
    hf_config = transformers.DeepseekV4Config(**{k: v for k, v in config.to_hf().items() if k != "architectures"})
    with torch.device("meta"):
        hf = transformers.DeepseekV4ForCausalLM(hf_config)
        ours = V4Transformer(config)
    want = sum(p.numel() for p in hf.parameters())
    assert total_params(config) == want == sum(p.numel() for p in ours.parameters())
    assert arch_stats(config).total_params == want


def test_published_totals_and_activated():
    """V4-Flash 284B / 13B activated, V4-Pro 1.6T / 49B (activated without the embedding lookup, as V2-Lite)."""
    flash, pro = arch_stats(get_preset("deepseek-v4-flash")), arch_stats(get_preset("deepseek-v4-pro"))
    assert round(flash.total_params / 1e9) == 284 and round(flash.activated_nonembedding_params / 1e9) == 13
    assert round(pro.total_params / 1e11) / 10 == 1.6 and round(pro.activated_nonembedding_params / 1e9) == 49


def test_kv_cache_per_layer_type_closed_form():
    c = get_preset("deepseek-v4-flash")  # window 128, D 512, CSA m=4 (+ indexer keys of 128), HCA m'=128
    L = 128 * 1024
    assert layer_cache_elements(c, "sliding_attention", L) == 128 * 512
    assert layer_cache_elements(c, "compressed_sparse_attention", L) == 128 * 512 + (L // 4) * (512 + 128)
    assert layer_cache_elements(c, "heavily_compressed_attention", L) == 128 * 512 + (L // 128) * 512
    rows = {r.kind: r for r in kv_cache_rows(c, L)}
    assert rows["compressed_sparse_attention"].layers == 21 and rows["heavily_compressed_attention"].layers == 20
    # the point of the compression: far below V3's latent cache with as many layers, and MHA
    assert rows["total"].elements < rows["V3 MLA latent (576 / token / layer)"].elements / 4
    assert rows["MHA of the same heads"].elements / rows["total"].elements > 100


def test_cli_info_shows_totals_and_cache_per_layer_type():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dsmoe", "info", "deepseek-v4-flash"], capture_output=True,
                         text=True, check=True, env={**__import__("os").environ, "COLUMNS": "160"}).stdout
    assert "284.3B" in out and "13.3B" in out
    for label in ("sliding x2 layers", "CSA (m=4) x21 layers", "HCA (m=128) x20 layers", "V3 MLA latent",
                  "MHA of the same heads", "@ 128K", "@ 1M"):
        assert label in out, label
