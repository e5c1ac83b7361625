"""Chat templates render exactly as transformers' apply_chat_template renders them on the same files."""

from __future__ import annotations

import json

import pytest
from chat_templates import DEEPSEEK_V2_LITE_CHAT, DEEPSEEK_V3, MIXTRAL_INSTRUCT, MULTILINE
from tiny_assets import build_tokenizer
from tokenizers import AddedToken

from dsmoe.serve.chat import ChatTemplate, ChatTemplateError

SPECIAL = {
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                 ["<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
                  "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
                  "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]),
    "mistral": ("<s>", "</s>", []),
}

CASES = {  # name -> (template as stored, token family, how it is stored)
    "deepseek-v3": (DEEPSEEK_V3, "deepseek", "string"),
    "deepseek-v2-lite-chat": (DEEPSEEK_V2_LITE_CHAT, "deepseek", "string"),
    "mixtral-instruct": (MIXTRAL_INSTRUCT, "mistral", "named-list"),
    "multiline": (MULTILINE, "mistral", "jinja-file"),
}

CONVERSATIONS = [
    [{"role": "user", "content": "def add(a, b):"}],
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "for i in range(10):"}],
    [{"role": "user", "content": "class Point:"}, {"role": "assistant", "content": "  pass  "},
     {"role": "user", "content": "print(i) ünïcode 你好"}],
    [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "x"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
         {"type": "function", "function": {"name": "g", "arguments": "{}"}}]},
     {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}],
]


def _checkpoint(directory, name):
    template, family, storage = CASES[name]
    bos, eos, extra = SPECIAL[family]
    tok = build_tokenizer(directory)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (bos, eos, *extra)])
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
              "eos_token": {"__type": "AddedToken", "content": eos, "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False}}
    if storage == "string":
        config["chat_template"] = template
    elif storage == "named-list":
        config["chat_template"] = [{"name": "default", "template": template},
                                   {"name": "other", "template": "{{ 'unused' }}"}]
    else:
        (directory / "chat_template.jinja").write_text(template)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return tok


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendering_matches_transformers(tmp_path, name):
    from transformers import AutoTokenizer

    tok = _checkpoint(tmp_path, name)
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = ChatTemplate.from_directory(tmp_path)
    compared = 0
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            for tools in (None, [{"type": "function", "function": {"name": "f", "parameters": {}}}]):
                try:
                    expected = reference.apply_chat_template(messages, tools=tools, tokenize=False,
                                                             add_generation_prompt=add_generation_prompt)
                except Exception as err:  # the template refuses this conversation: so must ours, same words
                    with pytest.raises(ChatTemplateError, match=str(err)[:40].replace("(", ".").replace(")", ".")):
                        ours.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
                    continue
                text = ours.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
                assert text == expected
                # and the ids the server feeds the model are transformers' tokenize=True ids
                ids = reference.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                    tokenize=True, return_dict=False)
                assert tok.encode(text, add_special_tokens=False).ids == list(ids)
                compared += 1
    assert compared >= 4


def test_no_template_and_bad_templates(tmp_path):
    build_tokenizer(tmp_path)
    assert ChatTemplate.from_directory(tmp_path) is None  # a `dsmoe train` run directory has none
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate.from_directory(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use",
                                                                                   "template": "x"}]}))
    with pytest.raises(ValueError, match="none named 'default'"):
        ChatTemplate.from_directory(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        ChatTemplate.from_directory(tmp_path)


def test_sandbox_blocks_python_internals():
    escape = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        escape.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([])
