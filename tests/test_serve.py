"""`dsv4 serve` through the `openai` client on 127.0.0.1: a CLI server in a subprocess (tiny-chat preset with the
release tokenizer), and in-process servers (a thread) for the API edges that need a fixed script or tight limits."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from common.chat import EOS, encode_messages, encode_text, load_v4_tokenizer, render_tool_calls
from common.generate import SamplingParams
from tools.cli import main as dsv4_main
from tools.serve import api
from tools.serve.api import ApiError, ServeConfig, create_app
from tools.serve.budget import SERVE_BLOCK_SIZE, BlockBudget, serve_pools
from tools.serve.engine import Engine, Options
from tools.serve.runner import TokenResult

MODEL = "tiny-chat"
MAX_LEN = 512
START_TIMEOUT = 120.0


def start_cli_server(*extra: str) -> tuple[subprocess.Popen, int, queue.Queue]:
    cmd = [sys.executable, "-m", "tools.cli", "serve", "--model", MODEL, "--port", "0", "--max-model-len",
           str(MAX_LEN), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            wait_healthy(port)
            return proc, port, lines
    stop(proc)
    raise AssertionError("the server did not start")


def wait_healthy(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError("/health did not turn 200")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


@pytest.fixture(scope="module")
def server():
    proc, port, _ = start_cli_server("--max-num-seqs", "4")
    try:
        yield port
    finally:
        assert stop(proc) == 0  # SIGTERM: a clean shutdown


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="none", timeout=120.0, max_retries=0)


@pytest.fixture(scope="module")
def tok():
    return load_v4_tokenizer()


def generate_ids(capsys, *args: str) -> list[int]:
    assert dsv4_main(["generate", "--model", MODEL, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)["output_ids"]


def metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0).text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


# ---- the CLI server -----------------------------------------------------------------------------------------

def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"http://127.0.0.1:{server}/health").json()["status"] == "ok"


def test_chat_greedy_equals_generate(client, capsys, tok):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                       temperature=0)
    expected = generate_ids(capsys, "--prompt", "Hello", "--chat", "--max-new-tokens", "6")
    assert r.choices[0].token_ids == expected
    assert r.choices[0].message.content == tok.decode(expected, skip_special_tokens=False)
    prompt = encode_text(tok, encode_messages([{"role": "user", "content": "Hello"}]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 6)
    assert r.usage.total_tokens == len(prompt) + 6
    assert r.choices[0].finish_reason == "length"


def test_completion_ids_and_seeded_sampling_equal_generate(client, capsys):
    ids = [0, 400, 19923, 3000, 77]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert r.choices[0].token_ids == generate_ids(capsys, "--prompt-ids", "0,400,19923,3000,77",
                                                  "--max-new-tokens", "5")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=1.0, seed=11)
    assert r.choices[0].token_ids == generate_ids(capsys, "--prompt-ids", "0,400,19923,3000,77",
                                                  "--max-new-tokens", "5", "--temperature", "1", "--seed", "11")


def test_streaming_equals_whole_and_reports_usage(client):
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    text, usage, finish = "", None, None
    for ch in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                                        stream=True, stream_options={"include_usage": True}):
        if ch.choices:
            text += ch.choices[0].text
            finish = ch.choices[0].finish_reason or finish
        if ch.usage is not None:
            usage = ch.usage
    assert text == whole.choices[0].text and finish == "length"
    assert usage is not None and usage.completion_tokens == 8 and usage.prompt_tokens == whole.usage.prompt_tokens


def test_stop_string(client):
    whole = client.completions.create(model=MODEL, prompt="The", max_tokens=12, temperature=0).choices[0].text
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    assert stop
    for stream in (False, True):
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt="The", max_tokens=12, temperature=0, stop=[stop], stream=True) if c.choices)
        else:
            r = client.completions.create(model=MODEL, prompt="The", max_tokens=12, temperature=0, stop=[stop])
            text = r.choices[0].text
            assert r.choices[0].finish_reason == "stop"
        assert text == whole[:whole.index(stop)]


def test_stop_token_ids(client):
    ids = [0, 400, 19923, 3000, 77]
    whole = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0).choices[0].token_ids
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                  extra_body={"stop_token_ids": [whole[3]]})
    assert r.choices[0].token_ids == whole[:whole.index(whole[3])] and r.choices[0].finish_reason == "stop"


def test_thinking_on_and_off(client, tok):
    msgs = [{"role": "user", "content": "Why?"}]
    off = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    assert off.usage.prompt_tokens == len(encode_text(tok, encode_messages(msgs)))
    assert getattr(off.choices[0].message, "reasoning_content", None) is None and off.choices[0].message.content
    on = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0,
                                        extra_body={"chat_template_kwargs": {"thinking": True}})
    assert on.usage.prompt_tokens == len(encode_text(tok, encode_messages(msgs, thinking=True)))
    # a random model never closes </think>: the whole reply is reasoning
    assert on.choices[0].message.reasoning_content == tok.decode(on.choices[0].token_ids, skip_special_tokens=False)
    assert on.choices[0].message.content == ""
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in
                       client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0,
                                                      stream=True, extra_body={"chat_template_kwargs":
                                                                               {"thinking": True}}))
    assert streamed == on.choices[0].message.reasoning_content


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_tool_request_round_trip_prompt(client, tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "cold"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == len(encode_text(tok, encode_messages(msgs, tools=tools)))


@pytest.mark.parametrize("body,param", [
    ({"model": "nope", "prompt": "x"}, "model"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": 2.5}, "temperature"),
    ({"model": MODEL, "prompt": list(range(5, 5 + MAX_LEN + 1))}, "prompt"),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {str(10**9): 1}}, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    ({"model": MODEL, "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": MODEL, "prompt": "x", "echo": True}, "echo"),
    ({"model": MODEL, "prompt": "x", "best_of": 2}, "best_of"),
    ({"model": MODEL, "prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
    # one row per SamplingParams check: the API refuses first and names the request field
    ({"model": MODEL, "prompt": "x", "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -0.5}, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_k": -2}, "top_k"),
    ({"model": MODEL, "prompt": "x", "seed": -1}, "seed"),
    ({"model": MODEL, "prompt": "x", "seed": 2**63}, "seed"),
])
def test_bad_requests_answer_400(server, body, param):
    r = httpx.post(f"http://127.0.0.1:{server}/v1/completions", json=body, timeout=30.0)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_bad_requests_through_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * MAX_LEN}])


def test_neutral_values_of_unsupported_parameters_are_accepted(client):
    """What the openai client or a UI sends by default (zero penalties, text format, tool_choice auto) is fine."""
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                                       response_format={"type": "text"}, temperature=0)
    assert r.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       tool_choice="required", tools=[{"type": "function",
                                                                       "function": {"name": "f"}}])
    assert e.value.body["param"] == "tool_choice"


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty",
                                   "repetition_penalty"])
@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_non_finite_sampling_numbers_answer_400(server, field, value):
    """json.loads reads NaN / Infinity; they are a 400 naming the field, not a SamplingParams ValueError (500)."""
    body = f'{{"model": "{MODEL}", "prompt": [0, 5], "max_tokens": 1, "{field}": {value}}}'.encode()
    r = httpx.post(f"http://127.0.0.1:{server}/v1/completions", content=body, timeout=30.0,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_largest_seed_is_served(client, server):
    """The top of the seed range the API accepts is one the per-request sampler takes (the engine stays up)."""
    r = client.completions.create(model=MODEL, prompt=[0, 5], max_tokens=2, temperature=1.0, seed=2**63 - 1)
    assert r.usage.completion_tokens >= 1
    assert httpx.get(f"http://127.0.0.1:{server}/health", timeout=10.0).status_code == 200


def test_malformed_json_answers_400(server):
    r = httpx.post(f"http://127.0.0.1:{server}/v1/chat/completions", content=b'{"model": ', timeout=30.0,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_concurrent_greedy_is_batch_independent(client):
    prompts = [[0, 5 + i, 900 + 7 * i, 33] + [100 + i] * (i * 9) for i in range(4)]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].token_ids
             for p in prompts]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=6,
                                               temperature=0).choices[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(4)] == alone


# ---- in-process servers ------------------------------------------------------------------------------------

class ScriptedRunner:
    """Answers every sampling step with the next token of a fixed script (the HTTP layer's parsing under test);
    keeps the runner interface of tools/serve/runner.py."""

    world = 1

    def __init__(self, script: list[int], delay: float = 0.0):
        self.script, self.delay, self.pos = script, delay, {}

    def owner_for(self, loads, ranks):
        return 0

    def step(self, plan):
        time.sleep(self.delay)
        for sid in plan.release:
            self.pos.pop(sid, None)
        out = {}
        for it in plan.items:
            if it.sample:
                k = self.pos.get(it.seq_id, 0)
                self.pos[it.seq_id] = k + 1
                out[it.seq_id] = TokenResult(self.script[min(k, len(self.script) - 1)])
        return out

    def heartbeat(self):
        pass

    def close(self):
        pass


def fixed_pools(max_num_seqs: int, max_batched_tokens: int, cache_tokens: int | None = None) -> dict[str, int]:
    """The pools `dsv4 serve` gives tiny-chat for these limits."""
    from common.config import load_preset

    return serve_pools(load_preset(MODEL)[0], cache_tokens or max_num_seqs * MAX_LEN, MAX_LEN, max_batched_tokens,
                       max_num_seqs)


@contextlib.contextmanager
def app_server(runner, tokenizer, max_num_seqs=4, max_waiting=None, api_key=None, max_batched_tokens=512,
               manager=None, cache_tokens=None):
    """`manager`: the served model's fixed-pool cache manager (default: tiny-chat's, for scripted runners)."""
    if manager is None:
        from ascend.backends import get_backend
        from common.config import load_preset
        from common.paged_cache import PagedCacheManager

        manager = PagedCacheManager(load_preset(MODEL)[0], get_backend("cpu"), block_size=SERVE_BLOCK_SIZE,
                                    num_blocks=fixed_pools(max_num_seqs, max_batched_tokens, cache_tokens))
    budget = BlockBudget(manager, max_batched_tokens, 1, cache_tokens or max_num_seqs * MAX_LEN)
    engine = Engine(runner, budget, tokenizer, [1], max_num_seqs, MAX_LEN,
                    max_batched_tokens=max_batched_tokens, max_waiting=max_waiting)
    app = create_app(engine, tokenizer, ServeConfig(MODEL, MAX_LEN, 129280, 0, api_key))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    engine.start()
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    port = sock.getsockname()[1]
    try:
        wait_healthy(port)
        yield port, engine
    finally:
        server.should_exit = True
        th.join(30)
        engine.stop()
        sock.close()


def test_tool_call_reply_parsed(tok):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 3}'}}
    script = encode_text(tok, "Checking." + render_tool_calls([call]) + EOS)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with app_server(ScriptedRunner(script), tok) as (port, _):
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=60.0, max_retries=0)
        msgs = [{"role": "user", "content": "Weather in Oslo?"}]
        r = c.chat.completions.create(model=MODEL, messages=msgs, tools=tools, max_tokens=100, temperature=0)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content == "Checking."
        [tc] = ch.message.tool_calls
        assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Oslo", "days": 3}
        # streamed: the same call arrives whole in the last chunk
        content, calls, finish = "", [], None
        for chunk in c.chat.completions.create(model=MODEL, messages=msgs, tools=tools, max_tokens=100,
                                               temperature=0, stream=True):
            d = chunk.choices[0].delta
            content += d.content or ""
            calls += d.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
        assert content == "Checking." and finish == "tool_calls"
        assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == \
            [("get_weather", {"city": "Oslo", "days": 3})]
        # the round trip: the call and its result go back in, as the official encoding lays them out
        msgs += [{"role": "assistant", "content": "Checking.", "tool_calls": [tc.model_dump()]},
                 {"role": "tool", "tool_call_id": tc.id, "content": "cold"}]
        r2 = c.chat.completions.create(model=MODEL, messages=msgs, tools=tools, max_tokens=3, temperature=0)
        assert r2.usage.prompt_tokens == len(encode_text(tok, encode_messages(msgs, tools=tools)))


def test_api_key_and_queue_full(tok):
    with app_server(ScriptedRunner([5] * 10, delay=0.05), tok, max_num_seqs=1, max_waiting=1, api_key="k") as (port, e):
        bad = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", timeout=60.0, max_retries=0)
        first = c.completions.create(model=MODEL, prompt=[0, 5], max_tokens=150, stream=True)
        next(iter(first))  # admitted and decoding before the second arrives (else both would wait: a race)
        streams = [first, c.completions.create(model=MODEL, prompt=[0, 5], max_tokens=150, stream=True)]
        with pytest.raises(openai.RateLimitError):  # one running, one waiting, the third is refused
            c.completions.create(model=MODEL, prompt=[0, 5], max_tokens=1)
        for s in streams:
            s.close()


def test_disconnect_frees_the_slot(tok):
    with app_server(ScriptedRunner([5] * 10, delay=0.02), tok, max_num_seqs=1) as (port, engine):
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=60.0, max_retries=0)
        s = c.completions.create(model=MODEL, prompt=[0, 5], max_tokens=180, stream=True)
        next(iter(s))
        assert engine.stats()["running"] == 1
        s.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 30
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["running"] == 0 and engine.stats()["cache_used_tokens"] == 0
        assert metric(port, "dsv4_requests_cancelled_total") == 1
        # the freed slot serves the next request
        r = c.completions.create(model=MODEL, prompt=[0, 5], max_tokens=3)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_chunked_prefill_beside_decode_equals_generate(tok):
    """8 tokens per step: a long prompt is prefilled in chunks while another request decodes; both equal
    `common.generate.generate` run alone (one full prefill)."""
    from ascend.backends import get_backend
    from common.generate import SamplingParams, generate
    from common.loading import load_model
    from common.model import Model
    from tools.serve.runner import LocalRunner

    lm = load_model(MODEL)
    model = Model(lm.cfg, lm.weights, get_backend("cpu"), block_size=SERVE_BLOCK_SIZE, num_blocks=fixed_pools(4, 8))
    short, long_ = [0, 19923, 400], [0] + list(range(1000, 1061))
    expect = [generate(model, [p], SamplingParams(max_new_tokens=12, stop_on_eos=False)).output_ids[0]
              for p in (short, long_)]
    with app_server(LocalRunner(model), tok, max_batched_tokens=8, manager=model.caches) as (port, engine):
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=120.0, max_retries=0)
        s = c.completions.create(model=MODEL, prompt=short, max_tokens=12, temperature=0, stream=True,
                                 extra_body={"ignore_eos": True})
        it = iter(s)
        first = next(it).choices[0].token_ids  # the short request is decoding now
        r = c.completions.create(model=MODEL, prompt=long_, max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
        rest = [t for ch in it if ch.choices for t in ch.choices[0].token_ids]
        assert first + rest == expect[0]
        assert r.choices[0].token_ids == expect[1]
        assert metric(port, "dsv4_processed_tokens_total") >= len(short) + len(long_) + 22


# ---- request -> Options ------------------------------------------------------------------------------------

CFG = ServeConfig(MODEL, MAX_LEN, 1000, 0)


def test_request_options_are_sampling_params():
    """A request's sampling fields land in SamplingParams' own fields (one set for generate and serve)."""
    body = {"max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": -1, "seed": 3, "ignore_eos": True,
            "stop": "x", "stop_token_ids": [7]}
    o = api._options(body, CFG, 10, None, 2)
    assert isinstance(o, SamplingParams)
    assert (o.max_new_tokens, o.temperature, o.top_p, o.top_k, o.seed, o.stop_on_eos) == (5, 0.5, 0.9, 0, 3, False)
    assert (o.stop, o.stop_token_ids, o.logprobs) == (["x"], [7], 2)
    assert api._options({"max_completion_tokens": 4}, CFG, 10, 16, None).max_new_tokens == 4
    assert api._options({}, CFG, 10, 16, None).max_new_tokens == 16  # /v1/completions' default
    assert api._options({}, CFG, 10, None, None).max_new_tokens == MAX_LEN - 10  # chat: the room left
    assert api._options({}, CFG, 10, None, None).stop_on_eos
    with pytest.raises(ValueError, match="seed"):  # SamplingParams' checks hold for Options too
        Options(seed=-1)


@pytest.mark.parametrize("body,param", [({"top_k": 60}, "top_k"), ({"max_tokens": 60}, "max_tokens"),
                                        ({"max_completion_tokens": 60}, "max_completion_tokens")])
def test_a_sampling_check_the_api_misses_is_still_a_400(monkeypatch, body, param):
    """Should SamplingParams gain a check the API does not make, its ValueError becomes a 400 naming the request
    field, never a 500."""
    class Stricter(Options):
        def __post_init__(self) -> None:
            super().__post_init__()
            for name in ("top_k", "max_new_tokens"):
                if getattr(self, name) > 50:
                    raise ValueError(f"{name} must be <= 50, got {getattr(self, name)}")

    monkeypatch.setattr(api, "Options", Stricter)
    with pytest.raises(ApiError) as e:
        api._options(body, CFG, 10, None, None)
    assert (e.value.status, e.value.param, e.value.message) == (400, param, f"'{param}' must be <= 50, got 60")
