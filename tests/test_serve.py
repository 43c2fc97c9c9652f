"""`nanollada serve`: the OpenAI-compatible API through the official `openai` client (streaming and not), raw HTTP
for every kind of bad input (4xx in OpenAI's error shape), client disconnects, concurrent requests that must not
mix, several models at once, and the command itself as a subprocess."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import cli_env
from serve_fixtures import BD_BLOCK, MAX_SEQ_LEN, trained

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from nanollada.generate import GenerationSettings
    from nanollada.serve import build_app, start_server
    ck = trained(tmp_path_factory)
    app = build_app([f"ar={ck['ar']}", f"dm={ck['dm']}", f"bd={ck['bd']}", f"pre={ck['pre']}"],
                    GenerationSettings(max_new_tokens=24))
    srv = start_server(app)
    yield srv, app, ck
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def raw(server, method: str, path: str, body: bytes | str | dict | None = None, headers=None):
    """(status, parsed JSON or text) of one raw HTTP request."""
    srv = server[0]
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body.encode() if isinstance(body, str) \
        else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode("utf-8")
    conn.close()
    try:
        return r.status, json.loads(text)
    except json.JSONDecodeError:
        return r.status, text


MSG = [{"role": "user", "content": "Name three colours."}]


def test_models_lists_every_checkpoint_with_its_paradigm(server, client):
    from nanollada.generate import GenerationSettings
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"ar", "dm", "bd", "pre"}
    status, body = raw(server, "GET", "/v1/models")
    info = {m["id"]: m["nanollada"] for m in body["data"]}
    assert [info[k]["paradigm"] for k in ("ar", "dm", "bd")] == ["ar", "diffusion", "block_diffusion"]
    assert info["bd"]["canvas"] and info["bd"]["editing"] and not info["dm"]["editing"] and not info["ar"]["editing"]
    bd = server[1].state.models["bd"].iface
    assert info["bd"]["defaults"]["block_length"] == BD_BLOCK and info["bd"]["defaults"]["editing"] == "off"
    assert info["bd"]["defaults"]["threshold"] == GenerationSettings().resolve(bd.default_generation()).threshold
    assert info["ar"]["chat"] and not info["pre"]["chat"] and info["dm"]["canvas"] and not info["ar"]["canvas"]
    assert info["ar"]["defaults"]["temperature"] == 0.7 and info["dm"]["defaults"]["strategy"] == "threshold"
    assert info["dm"]["defaults"]["use_prefix_cache"] is True and info["dm"]["defaults"]["temperature"] == 1.0
    assert info["ar"]["max_seq_len"] == MAX_SEQ_LEN and info["ar"]["defaults"]["repetition_penalty"] == 1.1
    assert raw(server, "GET", "/v1/models/dm")[1]["id"] == "dm"


@pytest.mark.parametrize("model", ["ar", "dm"])
def test_chat_streaming_equals_non_streaming_and_usage_counts_tokens(server, client, model):
    extra = {"nanollada": {"block_length": 8}} if model == "dm" else {}
    full = client.chat.completions.create(model=model, messages=MSG, max_tokens=16, seed=5, extra_body=extra)
    text = full.choices[0].message.content
    tok = server[1].state.models[model].tok
    assert full.usage.prompt_tokens == len(tok.render_chat(MSG, add_generation_prompt=True)[0])
    assert 0 <= full.usage.completion_tokens <= 16
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.choices[0].finish_reason in ("stop", "length") and full.object == "chat.completion"
    stats = full.model_dump()["nanollada"]
    assert stats["forwards"] >= 1 and stats["tokens_per_second"] > 0 and stats["paradigm"] in ("ar", "diffusion")
    chunks = list(client.chat.completions.create(model=model, messages=MSG, max_tokens=16, seed=5, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=extra))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    other = client.chat.completions.create(model=model, messages=MSG, max_tokens=16, seed=6, extra_body=extra,
                                           temperature=1.0)
    again = client.chat.completions.create(model=model, messages=MSG, max_tokens=16, seed=5, extra_body=extra)
    assert again.choices[0].message.content == text  # seeded
    u = other.usage  # another seed: a valid answer within max_tokens, counted consistently
    assert u.completion_tokens <= 16 and u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_raw_stream_is_server_sent_events_ending_in_done(server):
    srv = server[0]
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "pre", "prompt": "Once upon a time",
                                                             "max_tokens": 6, "stream": True}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and chunks[-1]["choices"][0]["finish_reason"]


def test_completions_plain_continuation_and_prompt_lists(server, client):
    one = client.completions.create(model="pre", prompt="Once upon a time", max_tokens=8, seed=1)
    both = client.completions.create(model="pre", prompt=["Once upon a time", "The dog"], max_tokens=8, seed=1)
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == one.choices[0].text
    tok = server[1].state.models["pre"].tok
    assert one.usage.prompt_tokens == 1 + len(tok.encode("Once upon a time"))
    from nanollada.generate import GenerationSettings, generate_text
    ref = generate_text(server[1].state.models["pre"].iface, "Once upon a time",
                        GenerationSettings(max_new_tokens=8, seed=1, block_length=8))
    assert one.choices[0].text == ref["completion"]  # the server decodes exactly as predict does
    # a pretraining checkpoint on the chat endpoint: the messages' text, continued
    chat = client.chat.completions.create(model="pre", messages=[{"role": "user", "content": "Once upon a time"}],
                                          max_tokens=8, seed=1)
    assert chat.choices[0].message.content == one.choices[0].text


@pytest.mark.parametrize("model", ["ar", "dm"])
def test_stop_strings_and_max_tokens(server, client, model):
    greedy = {"nanollada": {"greedy": True, **({"block_length": 8} if model == "dm" else {})}}
    base = client.completions.create(model=model, prompt="the quick brown fox", max_tokens=16, extra_body=greedy)
    text = base.choices[0].text
    if len(text.strip()) >= 4:
        k = len(text) // 2
        stop = text[k:k + 2]
        cut = client.completions.create(model=model, prompt="the quick brown fox", max_tokens=16, stop=[stop],
                                        extra_body=greedy)
        assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt="the quick brown fox", max_tokens=16, stop=stop, stream=True, extra_body=greedy))
        assert streamed == text[:text.find(stop)]
    short = client.completions.create(model=model, prompt="the quick brown fox", max_tokens=3, extra_body=greedy)
    assert short.usage.completion_tokens <= 3
    if short.choices[0].finish_reason == "length":
        assert short.usage.completion_tokens == 3


def test_nanollada_fields_reach_the_decoder(server, client):
    r = client.chat.completions.create(model="dm", messages=MSG, max_tokens=16, extra_body={"nanollada": {
        "strategy": "low_confidence", "steps": 4, "block_length": 8, "greedy": True}})
    stats = r.model_dump()["nanollada"]
    assert stats["settings"]["strategy"] == "low_confidence" and stats["settings"]["steps"] == 4
    assert 1 <= stats["forwards"] <= 8 and stats["block_length"] == 8  # 2 blocks x 4 steps at most
    a = client.chat.completions.create(model="ar", messages=MSG, max_tokens=12, seed=1,
                                       extra_body={"nanollada": {"greedy": True}})
    b = client.chat.completions.create(model="ar", messages=MSG, max_tokens=12, seed=2,
                                       extra_body={"nanollada": {"greedy": True}})
    assert a.choices[0].message.content == b.choices[0].message.content  # greedy ignores the seed
    assert a.model_dump()["nanollada"]["settings"]["temperature"] == 0.0


def sse_events(body: str) -> list[dict]:
    """The JSON events of a server-sent-events body (``[DONE]`` left out)."""
    return [json.loads(e[6:]) for e in body.split("\n\n") if e.startswith("data: ") and e != "data: [DONE]"]


def test_streaming_is_incremental_token_by_token_and_block_by_block(server, client):
    """AR streams an answer token by token (many content chunks, not one at the end); diffusion streams it block by
    block while later blocks are still being denoised: with the canvas frames as a clock, text of the first blocks
    arrives before the last frame, while the canvas still has masks."""
    chunks = list(client.chat.completions.create(model="ar", messages=MSG, max_tokens=16, seed=5, stream=True,
                                                 stream_options={"include_usage": True}))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    n = chunks[-1].usage.completion_tokens
    assert n >= 8 and len(contents) >= max(2, n // 3), (n, contents)
    for model in ("dm", "bd"):  # 24 tokens in blocks of 8, no eos before the third block: three blocks of text
        status, body = raw(server, "POST", "/v1/chat/completions", {
            "model": model, "messages": MSG, "max_tokens": 24, "seed": 5, "stream": True,
            "nanollada": {"canvas": True, "block_length": BD_BLOCK, "min_new_tokens": 2 * BD_BLOCK + 1}})
        assert status == 200
        events = sse_events(body)
        last_frame = max(i for i, e in enumerate(events) if e["object"] == "nanollada.canvas")
        deltas = [(i, e["choices"][0]["delta"]["content"]) for i, e in enumerate(events)
                  if e["object"] != "nanollada.canvas" and e["choices"] and e["choices"][0]["delta"].get("content")]
        early = [i for i, _ in deltas if i < last_frame]
        assert len(early) >= 2, (model, len(deltas), last_frame)  # blocks 1 and 2, before decoding ended
        frame_before = next(events[j] for j in range(early[0], -1, -1) if events[j]["object"] == "nanollada.canvas")
        assert frame_before["masked"] >= BD_BLOCK  # the first text came while a whole block was still masked
        full = client.chat.completions.create(model=model, messages=MSG, max_tokens=24, seed=5, extra_body={
            "nanollada": {"block_length": BD_BLOCK, "min_new_tokens": 2 * BD_BLOCK + 1}})
        assert "".join(t for _, t in deltas) == full.choices[0].message.content


def test_block_diffusion_with_editing_streams_edit_frames_and_editing_stats(server, client):
    """Block diffusion served with LLaDA 2.1 token editing (``nanollada: {"editing": "speedy"}``): the canvas frames
    carry the edits (kind ``edit`` with the new token's text), as many as the decoder counts, and the answer's stats
    name the preset and its (tau_mask, tau_edit). At temperature 1 the tiny model's sampled commits are rewritten
    often (tau_edit 0); at its greedy default it makes none."""
    from nanollada.generate import EDITING_PRESETS
    body = {"model": "bd", "messages": MSG, "max_tokens": 24, "seed": 3, "temperature": 1.0, "stream": True,
            "nanollada": {"editing": "speedy", "canvas": True}}
    status, text = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and text.rstrip().endswith("data: [DONE]")
    events = sse_events(text)
    frames = [e for e in events if e["object"] == "nanollada.canvas"]
    edits = [c for f in frames for c in f["changes"] if c[2] == "edit"]
    stats = next(e["nanollada"] for e in events if e.get("choices") and e["choices"][0]["finish_reason"])
    assert stats["paradigm"] == "block_diffusion" and stats["editing"] == "speedy"
    assert (stats["tau_mask"], stats["tau_edit"]) == EDITING_PRESETS["speedy"]
    assert stats["edits"] == len(edits) > 0 and all(isinstance(c[1], str) and c[1] for c in edits)
    assert sum(stats["steps_per_block"]) == stats["forwards"] == len(frames)
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                       if e["object"] != "nanollada.canvas" and e["choices"])
    full = client.chat.completions.create(model="bd", messages=MSG, max_tokens=24, seed=3, temperature=1.0,
                                          extra_body={"nanollada": {"editing": "speedy"}})
    assert full.choices[0].message.content == streamed and full.model_dump()["nanollada"]["edits"] == stats["edits"]
    off = client.chat.completions.create(model="bd", messages=MSG, max_tokens=24, seed=3, temperature=1.0)
    off_stats = off.model_dump()["nanollada"]
    assert "edits" not in off_stats and off_stats["settings"]["editing"] == "off"


BAD = [
    # (what, path, body, status, param or None, message part)
    ("malformed JSON", "/v1/chat/completions", '{"model": "ar", "messages": [', 400, None, "could not parse"),
    ("not UTF-8", "/v1/completions", b'{"model": "ar", "prompt": "\xff"}', 400, None, "could not parse"),
    ("body not an object", "/v1/chat/completions", [1, 2], 400, None, "JSON object"),
    ("unknown model", "/v1/chat/completions", {"model": "nope", "messages": MSG}, 404, "model", "does not exist"),
    ("missing messages", "/v1/chat/completions", {"model": "ar"}, 400, "messages", "Missing required"),
    ("empty messages", "/v1/chat/completions", {"model": "ar", "messages": []}, 400, "messages", "at least 1"),
    ("bad role", "/v1/chat/completions", {"model": "ar", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages.0.role", "Invalid value"),
    ("messages not a list", "/v1/chat/completions", {"model": "ar", "messages": "hi"}, 400, "messages", ""),
    ("temperature as a string", "/v1/chat/completions", {"model": "ar", "messages": MSG, "temperature": "0.5"},
     400, "temperature", "valid number"),
    ("temperature out of range", "/v1/chat/completions", {"model": "ar", "messages": MSG, "temperature": 3}, 400,
     "temperature", "less than or equal to 2"),
    ("stream as a number", "/v1/chat/completions", {"model": "ar", "messages": MSG, "stream": 1}, 400, "stream",
     "valid boolean"),
    ("max_tokens 0", "/v1/chat/completions", {"model": "ar", "messages": MSG, "max_tokens": 0}, 400, "max_tokens",
     "greater than or equal to 1"),
    ("max_tokens a float", "/v1/completions", {"model": "ar", "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens",
     "valid integer"),
    ("max_tokens past the context", "/v1/chat/completions", {"model": "ar", "messages": MSG, "max_tokens": 10_000},
     400, "max_tokens", "maximum context length is 256"),
    ("prompt too long", "/v1/chat/completions",
     {"model": "dm", "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages",
     "maximum context length"),
    ("prompt too long (stream)", "/v1/completions", {"model": "pre", "prompt": "word " * 400, "stream": True}, 400,
     "messages", "maximum context length"),
    ("empty prompt", "/v1/completions", {"model": "pre", "prompt": ""}, 400, "prompt", "empty"),
    ("unknown field", "/v1/chat/completions", {"model": "ar", "messages": MSG, "temprature": 0.5}, 400,
     "temprature", "Unrecognized request argument"),
    ("n > 1", "/v1/chat/completions", {"model": "ar", "messages": MSG, "n": 2}, 400, "n", "only n=1"),
    ("presence penalty", "/v1/chat/completions", {"model": "ar", "messages": MSG, "presence_penalty": 1.0}, 400,
     "presence_penalty", "repetition_penalty"),
    ("unknown nanollada key", "/v1/chat/completions", {"model": "dm", "messages": MSG, "nanollada": {"blocks": 2}},
     400, "nanollada", "unknown generation setting 'blocks'"),
    ("nanollada wrong type", "/v1/chat/completions", {"model": "dm", "messages": MSG,
                                                      "nanollada": {"threshold": "high"}}, 400,
     "nanollada.threshold", "wrong type"),
    ("nanollada out of range", "/v1/chat/completions", {"model": "dm", "messages": MSG,
                                                        "nanollada": {"threshold": 1.5}}, 400,
     "nanollada.threshold", "out of range"),
    ("nanollada unknown strategy", "/v1/chat/completions", {"model": "dm", "messages": MSG,
                                                            "nanollada": {"strategy": "best"}}, 400,
     "nanollada.strategy", "wrong type"),
    ("greedy with a temperature", "/v1/chat/completions", {"model": "ar", "messages": MSG, "temperature": 0.9,
                                                           "nanollada": {"greedy": True}}, 400, None, "conflicts"),
    ("canvas without stream", "/v1/chat/completions", {"model": "dm", "messages": MSG,
                                                       "nanollada": {"canvas": True}}, 400, "nanollada.canvas",
     "stream"),
    ("max_new_tokens under nanollada", "/v1/chat/completions", {"model": "ar", "messages": MSG,
                                                                "nanollada": {"max_new_tokens": 5}}, 400,
     "nanollada.max_new_tokens", "use max_tokens"),
    ("too many stops", "/v1/chat/completions", {"model": "ar", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]},
     400, "stop", ""),
    ("stream with two prompts", "/v1/completions", {"model": "pre", "prompt": ["a", "b"], "stream": True}, 400,
     "prompt", "one prompt"),
    ("logit_bias", "/v1/chat/completions", {"model": "ar", "messages": MSG, "logit_bias": {"5": 1}}, 400,
     "logit_bias", "not supported"),
    ("image content", "/v1/chat/completions", {"model": "ar", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None, ""),
    ("budget below the blocks (found while decoding)", "/v1/chat/completions", {
        "model": "dm", "messages": MSG, "max_tokens": 16, "nanollada": {"strategy": "threshold_topk", "budget": 1,
                                                                       "block_length": 8}}, 400, None, "budget"),
]


@pytest.mark.parametrize("what,path,body,status,param,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_shaped_4xx(server, what, path, body, status, param, message):
    got, resp = raw(server, "POST", path, body)
    assert got == status, (what, resp)
    err = resp["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert message in err["message"], err
    if param is not None:
        assert err["param"] == param, err


def test_an_error_found_while_streaming_ends_the_stream_with_an_error_event(server, client):
    status, body = raw(server, "POST", "/v1/chat/completions", {
        "model": "dm", "messages": MSG, "max_tokens": 16, "stream": True,
        "nanollada": {"strategy": "threshold_topk", "budget": 1, "block_length": 8}})
    events = [e[6:] for e in body.split("\n\n") if e.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert "budget" in err["message"] and err["type"] == "invalid_request_error"
    with pytest.raises(openai.APIError, match="budget"):  # the openai client raises it
        list(client.chat.completions.create(model="dm", messages=MSG, max_tokens=16, stream=True, extra_body={
            "nanollada": {"strategy": "threshold_topk", "budget": 1, "block_length": 8}}))


def test_wrong_methods_urls_and_sizes(server, client):
    assert raw(server, "GET", "/v1/chat/completions")[0] == 405
    status, resp = raw(server, "GET", "/v2/nothing")
    assert status == 404 and resp["error"]["code"] == "not_found"
    status, resp = raw(server, "POST", "/v1/completions", b"{" + b" " * (1 << 20) + b"}")
    assert status == 413 and "request body" in resp["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="missing", messages=MSG)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="ar", messages=MSG, max_tokens=100_000, stream=True)
    # the server is still fine after all of that
    assert client.chat.completions.create(model="ar", messages=MSG, max_tokens=2).choices


def wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_the_generation(server, stream):
    srv, app, _ = server
    model = app.state.models["dm"]
    before = model.counters["cancelled"]
    body = {"model": "dm", "messages": MSG, "max_tokens": 200, "stream": stream,
            "nanollada": {"strategy": "low_confidence", "block_length": 200, "use_prefix_cache": False,
                          **({"canvas": True} if stream else {})}}
    sock = socket.create_connection((srv.host, srv.port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    if stream:
        got = b""
        while b"nanollada.canvas" not in got:  # the first denoising frames arrived: generation is under way
            got += sock.recv(65536)
    else:
        time.sleep(0.5)
    sock.close()
    assert wait_for(lambda: model.counters["cancelled"] > before), "the generation did not stop"
    assert model.counters["cancelled_forwards"][-1] < 200  # 200 steps were asked for
    assert wait_for(lambda: not model.lock.locked())


def test_concurrent_requests_never_mix_their_outputs(server, client):
    """16 requests over 3 models, streaming and not, sent 8 at a time: each text equals the same request's
    text run alone (same seed), so nothing leaked between requests."""
    specs = [(model, f"Tell me about {topic}.", seed, stream)
             for model, topic, seed, stream in [("ar", "cats", 1, False), ("ar", "dogs", 2, True),
                                                ("dm", "the sea", 3, False), ("dm", "rain", 4, True),
                                                ("pre", "Once upon a time", 5, False), ("ar", "cats", 6, True),
                                                ("dm", "cats", 1, True), ("pre", "The dog", 2, True)]] * 2

    def ask(spec):
        model, prompt, seed, stream = spec
        kw = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=20, seed=seed,
                  temperature=1.0, extra_body={"nanollada": {"block_length": 10}} if model == "dm" else None)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        return client.chat.completions.create(**kw).choices[0].message.content

    alone = {spec: ask(spec) for spec in dict.fromkeys(specs)}
    assert len(set(alone.values())) > 3  # different requests, different texts: a mix-up would show
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, specs))
    assert together == [alone[s] for s in specs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_runs_the_server(server, tmp_path):
    ck = server[2]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanollada", "serve", "--ckpt", str(ck["ar"]), "--ckpt",
                             f"dm={ck['dm']}", "--port", str(port), "--max_new_tokens", "8"], cwd=tmp_path,
                            env=cli_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                return False
        assert wait_for(up, timeout=120), proc.stdout.read() if proc.poll() is not None else "not up"
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        assert {m.id for m in c.models.list().data} == {"ar", "dm"}  # ar: the run directory's name
        r = c.chat.completions.create(model="ar", messages=MSG)
        assert r.usage.completion_tokens <= 8  # the server's --max_new_tokens is the default max_tokens
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "<title>nanollada chat</title>" in page and "/static/app.js" in page
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "[serve] model 'ar': ar, chat" in out and f"http://127.0.0.1:{port}/" in out
    from nanollada.commands import COMMANDS
    with pytest.raises(SystemExit, match="checkpoint not found"):  # one line, no traceback
        COMMANDS["serve"](["--ckpt", str(tmp_path / "missing.ckpt")])


def test_load_test_script_runs_bounded_and_clean(server, tmp_path):
    import importlib.util
    from conftest import REPO
    spec = importlib.util.spec_from_file_location("serve_load", REPO / "benchmarks" / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--url", server[0].url, "--clients", "3", "--requests", "2", "--max-tokens", "6",
                    "--json", str(tmp_path / "load.json")])
    assert out["requests"] == 6 and out["errors"] == 0 and out["mixed_outputs"] == 0
    assert out["requests_per_s"] > 0 and out["p95_s"] >= out["p50_s"] > 0
    assert set(out["models"]) == {"ar", "dm", "bd", "pre"}
    with pytest.raises(SystemExit, match="loopback"):
        mod.main(["--url", "http://10.0.0.1:8000"])


def test_web_page_test_fails_in_ci_without_chromium_and_skips_locally_with_a_reason():
    """tests/test_web_page.py needs a browser: in CI (``CI`` set, as .ci/run does before pytest) a missing chromium
    fails the run, never a silent skip; locally it is a skip whose reason is also a warning (printed without -rs).
    .ci/run exports CI before pytest and warns on stderr when it cannot install chromium."""
    from conftest import REPO
    from serve_fixtures import require_chromium
    run = (REPO / ".ci" / "run").read_text().splitlines()
    pytest_line = next(i for i, line in enumerate(run) if line.startswith("python -m pytest"))
    export = [i for i, line in enumerate(run) if re.match(r"export CI=1\b", line)]
    assert export and export[0] < pytest_line, "CI is not exported before pytest"
    assert any(re.search(r"echo \"warning: .*chromium.*>&2", line) for line in run), "no warning on stderr"
    assert require_chromium({}, which=lambda name: f"/usr/bin/{name}") == "/usr/bin/chromium"
    with pytest.raises(pytest.fail.Exception, match="CI is set but no chromium"):
        require_chromium({"CI": "1"}, which=lambda name: None)
    with pytest.warns(pytest.PytestWarning, match="needs Debian's chromium"), pytest.raises(pytest.skip.Exception):
        require_chromium({}, which=lambda name: None)


EXTERNAL = re.compile(r"""(?ix) (?:https?|wss?|ftp):// | (?:src|href|action)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:|//)
                      | url\(\s*["']?\s*(?:[a-z][a-z0-9+.-]*:|//) | @import | \bimport\s*\(
                      | (?:fetch|EventSource|WebSocket)\(\s*["'`](?!/)""")
LOCAL_REF = re.compile(r"""(?i)(?:src|href)\s*=\s*["']([^"']*)["']""")


def external_references(folder) -> list[str]:
    """Everything in the files of ``folder`` that would reach beyond the server: absolute URLs, protocol-relative
    or scheme-qualified src/href/url(), CSS @import, dynamic import(), fetch of a non-root-relative address, and any
    src/href not under /static/ (or relative)."""
    found = []
    for f in sorted(folder.iterdir()):
        text = f.read_text(encoding="utf-8")
        found += [f"{f.name}: {m.group(0)}" for m in EXTERNAL.finditer(text)]
        found += [f"{f.name}: {ref}" for ref in LOCAL_REF.findall(text)
                  if not (ref.startswith("/static/") or not re.match(r"[a-z][a-z0-9+.-]*:|//|/", ref, re.I))]
    return found


def test_the_page_works_offline_no_external_url_or_reference(tmp_path):
    """The page's files (nanollada/serve/static) reference only the server itself: no CDN, no font or script from
    elsewhere (the page must work offline). The checker itself finds each kind of outside reference."""
    from importlib import resources
    static = resources.files("nanollada.serve") / "static"
    names = sorted(p.name for p in static.iterdir())
    assert names == ["app.js", "index.html", "style.css"]
    assert external_references(static) == []
    bad = {"a.html": '<script src="https://cdn.example.org/x.js"></script>', "b.html": "<link href='//fonts.x/y'>",
           "c.css": "@import 'theme.css';", "d.css": "body { background: url(http://x/y.png) }",
           "e.js": 'fetch("api.example.org/v1")', "f.html": '<img src="/elsewhere/a.png">',
           "g.js": "const u = 'wss://x/socket';"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    assert {hit.split(":")[0] for hit in external_references(tmp_path)} == set(bad)
    (tmp_path / "ok.html").write_text('<script src="/static/app.js"></script><a href="#top">x</a>')
    assert not [h for h in external_references(tmp_path) if h.startswith("ok.html")]
