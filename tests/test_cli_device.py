"""--device on the command line and dsmoe.device.resolve_device: what is accepted, what is refused and how."""

from __future__ import annotations

import pytest
import torch

from dsmoe.cli import build_parser, main
from dsmoe.device import resolve_device


def test_resolve_device_accepts():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu:0") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("text,match", [("gpu", "unknown device 'gpu'"), ("mps", "unsupported device 'mps'"),
                                        ("cuda:abc", "unknown device 'cuda:abc'")])
def test_resolve_device_refuses(text, match):
    with pytest.raises(ValueError, match=match):
        resolve_device(text)
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        resolve_device("meta", allow_meta=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without CUDA")
def test_resolve_device_cuda_without_cuda():
    with pytest.raises(ValueError, match="device 'cuda:0' requested but"):
        resolve_device("cuda:0")


def test_device_flag_defaults_to_auto_and_says_so():
    parser = build_parser()
    for command in (["generate", "--model", "m", "--prompt", "p"], ["bench"]):
        assert parser.parse_args(command).device == "auto"
    help_text = parser._subparsers._group_actions[0].choices["bench"].format_help()
    assert "cuda:N" in help_text and "default: auto" in help_text


@pytest.mark.parametrize("argv", [["bench", "--device", "gpu0"], ["generate", "--model", ".", "--prompt", "x",
                                                                   "--device", "tpu"]])
def test_bad_device_is_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dsmoe: error: --device: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda"])
    assert "device 'cuda' requested but" in capsys.readouterr().err
