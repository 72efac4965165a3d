"""The V4 tokenizer and chat encoding (common/chat.py) against the official encoding_dsv4.py's rules."""

from __future__ import annotations

import json

import pytest

from common.chat import (
    BOS,
    EOS,
    ChatFormatError,
    StreamSplitter,
    encode_messages,
    encode_text,
    load_v4_tokenizer,
    parse_completion,
    render_tool_calls,
)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tok():
    return load_v4_tokenizer()


def test_release_tokenizer(tok):
    assert tok.get_vocab_size() == 129280
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    for t, i in (("<｜User｜>", 128803), ("<｜Assistant｜>", 128804), ("<think>", 128821), ("</think>", 128822),
                 ("｜DSML｜", 128825)):
        assert tok.token_to_id(t) == i


def test_non_thinking_single_turn_matches_official_form(tok):
    # the form the HF integration test uses for DeepSeek-V4 (spec/deepseek_v4_model.md, encoding_dsv4.py)
    text = encode_messages([{"role": "user", "content": "Hi"}])
    assert text == f"{BOS}<｜User｜>Hi<｜Assistant｜></think>"
    ids = encode_text(tok, text)
    assert ids[0] == 0 and ids[1] == 128803 and ids[-2:] == [128804, 128822]


def test_thinking_multi_turn_drops_old_reasoning():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "reasoning_content": "r"}, {"role": "user", "content": "c"}]
    assert encode_messages(msgs, thinking=True) == (
        f"{BOS}S<｜User｜>a<｜Assistant｜></think>b{EOS}<｜User｜>c<｜Assistant｜><think>")
    # chat mode: the same turns, every assistant turn opened with </think>
    assert encode_messages(msgs) == f"{BOS}S<｜User｜>a<｜Assistant｜></think>b{EOS}<｜User｜>c<｜Assistant｜></think>"


def test_reasoning_effort_max_prefix():
    text = encode_messages([{"role": "user", "content": "x"}], thinking=True, reasoning_effort="max")
    assert text.startswith(BOS + "Reasoning Effort: Absolute maximum")
    assert encode_messages([{"role": "user", "content": "x"}], thinking=True, reasoning_effort="high") == \
        f"{BOS}<｜User｜>x<｜Assistant｜><think>"


def test_tool_call_round_trip():
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})}}
    msgs = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = encode_messages(msgs, tools=TOOLS)
    # tools go to a system section in front; the call is DSML; the result is a user turn
    assert text.startswith(BOS + "\n\n## Tools\n")
    assert '{"name": "get_weather", "description": "Weather of a city"' in text
    block = render_tool_calls([call])
    assert block == ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
                     '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
                     '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
                     '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    assert text.endswith(f"<｜Assistant｜></think>{block}{EOS}<｜User｜><tool_result>sunny</tool_result>"
                         f"<｜Assistant｜></think>")
    reply = parse_completion("Let me check." + block + EOS, thinking=False)
    assert reply.content == "Let me check."
    assert reply.tool_calls == [{"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})}]


def test_tool_results_follow_call_order():
    calls = [{"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in ("a", "b")]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "b", "content": "B"},
            {"role": "tool", "tool_call_id": "a", "content": "A"}]
    assert encode_messages(msgs).endswith("<｜User｜><tool_result>A</tool_result>\n\n<tool_result>B</tool_result>"
                                          "<｜Assistant｜></think>")


def test_thinking_parse_and_stream_split():
    text = "step one</think>The answer."
    r = parse_completion(text, thinking=True)
    assert (r.reasoning_content, r.content, r.tool_calls) == ("step one", "The answer.", [])
    split = StreamSplitter(thinking=True)
    reasoning = content = ""
    for ch in text:  # one character at a time: markers split across deltas
        a, b = split.feed(ch)
        reasoning, content = reasoning + a, content + b
    a, b, calls = split.finish()
    assert (reasoning + a, content + b, calls) == ("step one", "The answer.", [])


def test_bad_messages_are_named():
    with pytest.raises(ChatFormatError, match=r"messages\[0\]\.role"):
        encode_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatFormatError, match="non-empty list"):
        encode_messages([])
