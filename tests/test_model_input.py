"""Bad inputs fail early with a message that says what is wrong, instead of an index error deep inside."""

from __future__ import annotations

import pytest
import torch

from dsmoe import ModelConfig, Transformer
from dsmoe.presets import PRESETS

VOCAB, MAX_POS = 64, 16


@pytest.fixture(scope="module", params=["tiny-v1", "tiny-v3"])
def model(request):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**PRESETS[request.param], "vocab_size": VOCAB, "max_position_embeddings": MAX_POS,
                         "num_hidden_layers": 2, "hidden_size": 64})
    return Transformer(cfg).eval()


def _ids(batch=2, length=8):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def test_good_input_runs(model):
    with torch.no_grad():
        assert model(_ids()).shape == (2, 8, VOCAB)
        assert model(_ids(1, MAX_POS)).shape == (1, MAX_POS, VOCAB)  # exactly max_position_embeddings is fine
        assert model(_ids().to(torch.int32)).shape == (2, 8, VOCAB)


@pytest.mark.parametrize("bad,batch,pos", [(VOCAB, 1, 5), (VOCAB + 1000, 0, 0), (-1, 1, 7), (-7, 0, 3)])
def test_token_id_out_of_range(model, bad, batch, pos):
    ids = _ids()
    ids[batch, pos] = bad
    with pytest.raises(ValueError) as err, torch.no_grad():
        model(ids)
    msg = str(err.value)
    assert str(bad) in msg, msg
    assert f"position {pos}" in msg, msg
    assert f"batch {batch}" in msg, msg
    assert str(VOCAB) in msg, msg  # says what the valid range is


def test_token_id_checked_by_hidden_states_too(model):
    ids = _ids()
    ids[0, 2] = VOCAB
    with pytest.raises(ValueError, match="position 2"), torch.no_grad():
        model.hidden_states(ids)


def test_too_long(model):
    with pytest.raises(ValueError, match="max_position_embeddings") as err, torch.no_grad():
        model(_ids(1, MAX_POS + 1))
    assert str(MAX_POS) in str(err.value)


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4), (), (2, 0), (0, 3)])
def test_not_2d(model, shape):
    ids = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids"), torch.no_grad():
        model(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_not_integer(model, dtype):
    with pytest.raises(ValueError, match="input_ids"), torch.no_grad():
        model(_ids().to(dtype))
