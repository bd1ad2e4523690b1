"""Claude Code as it is today (issue 23): the requests recorded from Claude Code 2.1.332 in
../shared/fixtures/claude-code-2.1.332/ replayed through both upstream protocols, and checked on
the body the upstream gets: no text or tool lost, deferred tools loaded the way Anthropic's tool
search loads them, no placeholder tool offered.  (The 2.1.197 recordings stay as older inputs in
test_iflow_proxy.py.)"""

import json

import pytest

import iflow_proxy as ip
from test_iflow_proxy import (KEYS, add_key_account, add_provider_account,  # noqa: F401
                              anthropic_fake, fake, fixture, home, make_config, mutations,
                              request, running)

RECORDED = ["claude-code-2.1.332/01-main-first-turn.json",
            "claude-code-2.1.332/02-main-after-toolsearch-tool-reference.json",
            "claude-code-2.1.332/03-websearch-side-request.json",
            "claude-code-2.1.332/04-main-after-websearch-result.json"]
SKIPPED_HEADERS = {"host", "content-length", "connection", "accept-encoding"}


def test_fuzz_every_field_of_the_recorded_requests(home, fake):
    """Each field of Claude Code's own requests (tool references, server tools, thinking,
    cache_control, context_management...) set to a weird value: a 4xx in Anthropic's shape
    or an answer, from /v1/messages and count_tokens, never a 500 (a tool_reference's
    tool_name once was)."""
    import random
    rng = random.Random(20261203)
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake, max_concurrency=0)) as server:
        for name in RECORDED:
            recorded = fixture(name)
            headers = {k: v for k, v in recorded["headers"].items()
                       if k.lower() not in SKIPPED_HEADERS}
            cases = list(mutations(rng, recorded["body"]))
            rng.shuffle(cases)
            for _path, body in cases[:100]:
                for path in ("/v1/messages", "/v1/messages/count_tokens"):
                    status, _h, data = request(server, "POST", path, body, headers)
                    assert status < 500, (name, _path, data[:300])
                    if status >= 400:
                        assert json.loads(data)["type"] == "error", data
        assert request(server, "GET", "/healthz")[0] == 200


def replay(server, recorded, model):
    """POST a recorded request (its headers too) with ``model``: (status, body bytes)."""
    headers = {k: v for k, v in recorded["headers"].items() if k.lower() not in SKIPPED_HEADERS}
    headers["Content-Type"] = "application/json"
    body = dict(recorded["body"], model=model)
    status, _headers, data = request(server, "POST", recorded["path"].split("?")[0], body,
                                     headers)
    return status, data


def texts_of(body):
    """Every text a client sent: the system prompt, text blocks, tool results' texts."""
    out = [b["text"] for b in ip._blocks(body.get("system") or [])
           if not b["text"].startswith("x-anthropic-billing-header:")]
    for message in body["messages"]:
        for block in ip._blocks(message["content"]):
            if block["type"] == "text":
                out.append(block["text"])
            elif block["type"] == "tool_result":
                out.extend(b["text"] for b in ip._blocks(block.get("content") or [])
                           if b.get("type") == "text")
    return [t for t in out if t.strip()]


def offered_names(body):
    """The tools an upstream is offered, by name (either protocol's shape)."""
    return [t.get("name") or t.get("function", {}).get("name") for t in body.get("tools") or []]


def expected_tools(body, server_tools):
    """Tools that must reach the upstream: every one not deferred, and every deferred one a
    tool_reference has loaded; never an unloaded one (the placeholder).  Anthropic's server
    tools (web search) pass to an Anthropic-protocol upstream as they are; an OpenAI one can't
    take them (the web-search work answers them itself)."""
    loaded = ip._referenced_tools(body["messages"])
    return [t["name"] for t in body.get("tools") or []
            if ("input_schema" in t or server_tools) and
            (not t.get("defer_loading") or t["name"] in loaded)]


def upstream_text(body):
    return json.dumps(body, ensure_ascii=False)


def check_replayed(recorded, sent, server_tools=False):
    body = recorded["body"]
    dumped = upstream_text(sent)
    for text in texts_of(body):
        for line in (line.strip() for line in text.splitlines()):
            assert json.dumps(line, ensure_ascii=False)[1:-1] in dumped, line[:80]
    names = offered_names(sent)
    assert sorted(names) == sorted(expected_tools(body, server_tools)), names
    assert "DeferredToolPlaceholder" not in names and "defer_loading" not in dumped
    if ip._referenced_tools(body["messages"]):
        assert "<functions>" in dumped and "tool_reference" not in dumped
        assert '\\"name\\": \\"WebSearch\\"' in dumped and "allowed_domains" in dumped


@pytest.mark.parametrize("name", RECORDED)
def test_recorded_requests_through_an_openai_protocol_account(home, fake, name):
    recorded = fixture(name)
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake)) as server:
        status, data = replay(server, recorded, "glm-4.6")
    assert status == 200, data[:300]
    if ip.web_search_only(recorded["body"]):  # answered by the proxy's search (none set up)
        assert not fake.chat_requests() and b"web_search_tool_result_error" in data
        return
    sent = fake.chat_requests()[-1][2]
    check_replayed(recorded, sent)
    roles = [m["role"] for m in sent["messages"]]
    assert roles.count("system") == 1 and roles[0] == "system"  # mid-conversation ones merged
    if any(m["role"] == "system" for m in recorded["body"]["messages"]):
        assert any("<system-reminder>\n# Environment" in (m.get("content") or "")
                   for m in sent["messages"][1:] if m["role"] == "user")


@pytest.mark.parametrize("name", RECORDED)
def test_recorded_requests_through_an_anthropic_protocol_account(home, anthropic_fake, name):
    recorded = fixture(name)
    add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic", anthropic_fake.url)
    anthropic_fake.max_output = 400000
    anthropic_fake.server_tools = ("web_search_20250305",)  # DeepSeek runs web search itself
    with running(make_config(home)) as server:
        status, data = replay(server, recorded, "deepseek-v4-flash")
    assert status == 200, data[:300]
    sent = anthropic_fake.requests[-1][2]
    check_replayed(recorded, sent, server_tools=True)


def test_a_tool_loaded_by_tool_search_is_offered_with_its_schema():
    body = fixture(RECORDED[1])["body"]
    out = ip.load_deferred_tools(body)
    assert "WebSearch" in offered_names(out) and "DeferredToolPlaceholder" not in \
        offered_names(out)
    result = out["messages"][3]["content"][0]["content"][0]
    assert result["type"] == "text" and result["text"].startswith("<functions>\n<function>")
    schema = json.loads(result["text"].split("<function>")[1].split("</function>")[0])
    assert schema["name"] == "WebSearch" and "query" in schema["parameters"]["properties"]
    openai = ip.anthropic_to_openai(out, "glm-4.6")
    tool_message = next(m for m in openai["messages"] if m["role"] == "tool")
    assert tool_message["content"] == result["text"]  # not "(no output)"
    first = fixture(RECORDED[0])["body"]
    assert "DeferredToolPlaceholder" not in offered_names(ip.load_deferred_tools(first))
    plain = {"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "a"}]}
    assert ip.load_deferred_tools(plain) is plain


# --- request classes ---------------------------------------------------------------------------

def test_three_lanes_main_then_subagents_then_housekeeping(tmp_path):
    from test_iflow_proxy import in_thread, pool_router, wait_for
    router = pool_router(tmp_path, n=1, queue_timeout=30)
    held = router.acquire("m")
    order = []

    def take(name, lane):
        account = router.acquire("m", lane=lane)
        order.append(name)
        router.release(account)
    threads = []
    for count, (name, lane) in enumerate((("title", 2), ("subagent", 1), ("main", 0)), 1):
        threads.append(in_thread(take, name, lane)[0])
        wait_for(lambda: router.waiting() == count, what=name + " queued")
    assert router.waiting_by_lane() == {0: 1, 1: 1, 2: 1}
    router.release(held)
    for thread in threads:
        thread.join(10)
    assert order == ["main", "subagent", "title"]


def test_request_class_routes_logs_and_counts(home, fake, tmp_path):
    import logging
    add_key_account(home, KEYS[0])
    log = tmp_path / "proxy.log"
    config = make_config(home, fake, class_models={"auxiliary": "qwen3-coder-plus"},
                         log_file=str(log))
    body = {"model": "claude-sonnet-4-5", "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}]}
    ip.setup_logging(config)
    try:
        with running(config) as server:
            for headers in ({"x-claude-code-request-class": "auxiliary"},
                            {"x-claude-code-request-class": "subagent"}, {}):
                status, _h, data = request(server, "POST", "/v1/messages", body, dict(
                    headers, **{"Content-Type": "application/json",
                                "anthropic-version": "2023-06-01"}))
                assert status == 200, data
            status, _h, data = request(server, "POST", "/v1/messages",
                                       dict(body, model="claude-haiku-4-5"),
                                       {"Content-Type": "application/json"})
            assert status == 200
            counts = json.loads(request(server, "GET", "/status")[2])["requests_by_class"]
            server.access_log.close()
    finally:
        logging.getLogger("iflow_proxy").handlers[:] = []
    models = [r[2]["model"] for r in fake.chat_requests()]
    assert models == ["qwen3-coder-plus", "glm-4.6", "glm-4.6", "qwen3-coder-plus"]
    assert counts == {"auxiliary": 2, "subagent": 1, "main": 1}
    lines = [line for line in log.read_text().splitlines() if "POST /v1/messages" in line]
    assert [line.split(" class=")[1].split()[0] for line in lines] == \
        ["auxiliary", "subagent", "main", "auxiliary"]


def test_launcher_asks_claude_code_for_its_request_classes(home):
    config = make_config(home)
    variables = ip.claude_env("http://127.0.0.1:1", "t", config)
    assert variables["CLAUDE_CODE_GATEWAY_HINT_HEADERS"] == "1"


def test_class_models_setting_is_checked(home):
    with pytest.raises(ip.ConfigError, match="request classes"):
        make_config_file(home, {"class_models": {"bogus": "x"}})
    config = make_config_file(home, {"class_models": {"compaction": "qwen3-coder-plus"}})
    assert config.class_models == {"compaction": "qwen3-coder-plus"}


def make_config_file(home, data):
    import os
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, "config.json"), "w") as f:
        json.dump(data, f)
    return ip.load_config(home, {}, {})


def test_system_turns_without_text_add_nothing():
    body = {"model": "m", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "assistant", "content": "ok"},
        {"role": "system", "content": []},                      # (an output_config-only turn)
        {"role": "user", "content": "again"}]}
    out = ip.anthropic_to_openai(body, "glm-4.6")
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][0]["content"] == "hi\n\n<system-reminder>\nBe brief.\n</system-reminder>"
    assert out["messages"][2]["content"] == "again"
    assert ip.alternating_turns(body["messages"])[2]["content"] == [
        {"type": "text", "text": "again"}]


# --- mid-conversation instructions: clear_at, per-turn effort, tool changes ---------------------

TOOL_A = {"name": "Alpha", "description": "A.", "input_schema": {"type": "object"}}
TOOL_B = {"name": "Beta", "description": "B.", "input_schema": {"type": "object"},
          "defer_loading": True}
TOOL_C = {"name": "Gamma", "description": "C.", "input_schema": {"type": "object",
          "properties": {"x": {"type": "string"}}}}


def changes_body(last_role="user"):
    """A conversation as 2.1.332 shapes one (shapes read from its binary): a turn-scoped
    reminder, per-turn effort, tools added by reference and by definition, one removed."""
    messages = [
        {"role": "user", "content": "start"},
        {"role": "system", "content": [{"type": "text", "text": "Only until the user speaks."}],
         "clear_at": "next_user_message"},
        {"role": "assistant", "content": "ok"},
        {"role": "system", "content": [], "output_config": {"effort": "low"}},
        {"role": "user", "content": "more"},
        {"role": "system", "content": [
            {"type": "text", "text": "New tools."},
            {"type": "tool_addition", "tool": {"type": "tool_reference", "name": "Beta"}},
            {"type": "tool_addition", "tool": {"type": "tool_definition", "definition": TOOL_C}},
            {"type": "tool_removal", "tool": {"type": "tool_reference", "name": "Alpha"}}]},
        {"role": "assistant", "content": "noted"},
        {"role": "system", "content": [], "output_config": {"effort": "max"}},
        {"role": "user", "content": "go"} if last_role == "user" else
        {"role": "system", "content": [{"type": "text", "text": "Says the last word."}],
         "clear_at": "next_user_message"}]
    return {"model": "m", "max_tokens": 100, "messages": messages, "tools": [TOOL_A, TOOL_B],
            "output_config": {"effort": "high"}, "thinking": {"type": "adaptive"}}


def test_tool_changes_clear_at_and_turn_effort_settle_into_one_request():
    out = ip.resolve_turns(changes_body())
    assert offered_names(out) == ["Beta", "Gamma"]
    assert all("defer_loading" not in t for t in out["tools"])
    assert out["output_config"] == {"effort": "max"}  # the last turn's effort holds
    dumped = json.dumps(out)
    assert "Only until the user speaks." not in dumped  # a user turn came after it
    assert "tool_addition" not in dumped and "tool_removal" not in dumped
    assert "Tools now available: Beta, Gamma." in dumped and \
        "Tools no longer available: Alpha." in dumped
    kept = ip.resolve_turns(changes_body(last_role="system"))
    assert "Says the last word." in json.dumps(kept)  # no user turn after it yet
    body = changes_body()
    assert ip.resolve_turns(body) is not body and body["tools"] == [TOOL_A, TOOL_B]  # a copy
    openai = ip.anthropic_to_openai(out, "glm-4.6")
    assert [t["function"]["name"] for t in openai["tools"]] == ["Beta", "Gamma"]
    assert ip.anthropic_thinking(out) == (True, "max")


def test_tool_changes_reach_both_protocols(home, fake, anthropic_fake):
    add_key_account(home, KEYS[0])
    add_provider_account(home, "sk-anthropic-1111", "zhipu", "anthropic", anthropic_fake.url,
                         nickname="zp")
    anthropic_fake.models, anthropic_fake.max_output = ("glm-4.7",), 128000
    anthropic_fake.auth = "bearer"  # as zhipu takes its key
    headers = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    with running(make_config(home, fake)) as server:
        for model in ("api-key/glm-4.6", "zp/glm-4.7"):
            status, _h, data = request(server, "POST", "/v1/messages",
                                       dict(changes_body(), model=model), headers)
            assert status == 200, data[:300]
    openai, anthropic = fake.chat_requests()[-1][2], anthropic_fake.requests[-1][2]
    assert offered_names(openai) == offered_names(anthropic) == ["Beta", "Gamma"]
    for sent in (openai, anthropic):
        dumped = upstream_text(sent)
        assert "Tools now available: Beta, Gamma." in dumped and "clear_at" not in dumped
    # zhipu's page lists neither adaptive thinking nor effort; 100 tokens leave no budget
    assert "output_config" not in anthropic and "thinking" not in anthropic


def test_anthropic_endpoints_get_only_the_fields_their_pages_list():
    body = dict(fixture(RECORDED[0])["body"], max_tokens=64000)
    deepseek = ip.shape_messages_body(body, "deepseek-v4-pro", 384000,
                                      ip.PROVIDERS["deepseek"].rejects)
    assert deepseek["output_config"] == {"effort": "high"}  # "only effort is supported"
    assert deepseek["thinking"] == {"type": "enabled", "budget_tokens": 31999}
    assert "context_management" not in deepseek
    kimi = ip.shape_messages_body(dict(body, output_config={"effort": "low", "format": {}}),
                                  "kimi-k2.6", 32000, ip.PROVIDERS["moonshot"].rejects)
    assert "output_config" not in kimi and kimi["max_tokens"] == 32000 and \
        kimi["thinking"] == {"type": "enabled", "budget_tokens": 31999}
    assert all(m["role"] in ("user", "assistant") for m in kimi["messages"])


def test_a_feature_the_upstream_refuses_is_the_requests_fault(home, anthropic_fake):
    """An Anthropic-protocol upstream's 400 reaches the client in the upstream's own words
    (Claude Code matches them to fall back, e.g. "Invalid effort level"), and the account
    stays healthy: no cooldown, no error in its usage."""
    add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic", anthropic_fake.url,
                         nickname="ds")
    anthropic_fake.script = [{"status": 400, "message": "Invalid effort level"}]
    body = {"model": "deepseek-v4-flash", "max_tokens": 50, "output_config": {"effort": "max"},
            "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    with running(make_config(home)) as server:
        status, _h, data = request(server, "POST", "/v1/messages", body, headers)
        assert status == 400 and json.loads(data) == {"type": "error", "error": {
            "type": "invalid_request_error", "message": "Invalid effort level"}}
        body.pop("output_config")  # Claude Code's fallback: the same turn without it
        status, _h, data = request(server, "POST", "/v1/messages", body, headers)
        assert status == 200, data
        account = server.chat.router.all_accounts()[0]
        assert server.chat.router.state(account)[0] == "healthy"
        assert not server.chat.router.recent_errors
        rows = server.chat.usage.day_rows()
        assert sum(r["requests"] for r in rows) == 1  # the refused attempt is not the account's


# --- the real Claude Code -----------------------------------------------------------------------

def run_launcher(home, fake, tmp_path, *claude_args, model=None):
    """`python iflow_proxy.py claude …` with the real Claude Code, its own proxy in-process
    on the fake, a log file: (completed process, access log lines)."""
    import os
    import subprocess
    import sys
    from test_iflow_proxy import HERE, find_claude_code
    claude = find_claude_code()
    if claude is None:
        pytest.skip("Claude Code is not installed (.ci/run installs it with npm into .cache)")
    log = tmp_path / "proxy.log"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "h"),
           "IFLOW_PROXY_HOME": home, "IFLOW_API_BASE": fake.url + "/v1",
           "IFLOW_PROXY_PORT": "1", "IFLOW_PROXY_LOG_FILE": str(log), "DISABLE_TELEMETRY": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    work = tmp_path / "project"
    work.mkdir(exist_ok=True)
    out = subprocess.run([sys.executable, os.path.join(HERE, "iflow_proxy.py"), "claude"] +
                         (["--model", model] if model else []) + ["--claude-bin", claude] +
                         list(claude_args), cwd=str(work), env=env, capture_output=True,
                         text=True, timeout=300)
    lines = log.read_text().splitlines() if log.exists() else []
    return out, [line for line in lines if " POST /v1/messages" in line]


@pytest.mark.parametrize("model", ["kimi-k2", "qwen3-coder-plus"])
def test_claude_code_knows_every_model_the_launcher_gives_it(home, fake, tmp_path, model):
    """No "[claude-code:unrecognized_model]" from the real Claude Code for the launcher's
    models, and the window it works with holds the provider table's window with compaction
    set before the table's window fills."""
    from test_iflow_proxy import claude_code_responder
    add_key_account(home, KEYS[0])
    fake.responder = claude_code_responder()
    out, lines = run_launcher(home, fake, tmp_path, "-p", "say hi", "--output-format", "json",
                              model=model)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "unrecognized_model" not in out.stderr and "doesn't recognize" not in out.stderr, \
        out.stderr
    spec = ip.model_spec(model, "iflow")
    usage = json.loads(out.stdout)["modelUsage"][ip.claude_model_id(model, spec)]
    told = ip.claude_env("http://x", "t", make_config(home), model, ip.account_rows(
        make_config(home)), rows=True)
    assert usage["contextWindow"] == ip.claude_window(spec) >= min(spec.window, 10 ** 6)
    assert int(told["CLAUDE_CODE_AUTO_COMPACT_WINDOW"]) < spec.window  # compacts in time
    assert lines and all("class=" in line for line in lines), lines


def tool_search_responder(asked):
    """Scripted turns: load CronList with ToolSearch, call it once it is offered, then say
    what it answered.  ``asked`` collects the bodies of the main turns."""
    def respond(body):
        messages = body["messages"]
        names = [t["function"]["name"] for t in body.get("tools") or []]
        if "ToolSearch" not in names:  # a side request (title, summary)
            return {"content": "Cron check"}
        asked.append(body)
        results = [m for m in messages if m["role"] == "tool"]
        if not results:
            return {"content": "", "tool_call_chunks": [
                {"index": 0, "id": "call_ts_1", "type": "function", "function": {
                    "name": "ToolSearch",
                    "arguments": json.dumps({"query": "select:CronList", "max_results": 1})}}]}
        if len(results) == 1:
            return {"content": "", "tool_call_chunks": [
                {"index": 0, "id": "call_cl_1", "type": "function", "function": {
                    "name": "CronList", "arguments": "{}"}}]}
        return {"content": "CronList answered: " + results[-1]["content"][:60]}
    return respond


def test_real_claude_code_loads_a_deferred_tool_and_calls_it(home, fake, tmp_path):
    asked = []
    add_key_account(home, KEYS[0])
    fake.responder = tool_search_responder(asked)
    out, lines = run_launcher(home, fake, tmp_path, "-p", "List my scheduled cron jobs.",
                              "--allowedTools", "ToolSearch,CronList")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "CronList answered" in out.stdout and "unrecognized_model" not in out.stderr
    assert len(asked) == 3, [offered_names(b) for b in asked]
    first, second, third = asked
    assert "CronList" not in offered_names(first) and "DeferredToolPlaceholder" not in \
        offered_names(first)
    loaded = next(m for m in second["messages"] if m["role"] == "tool")["content"]
    assert "<functions>" in loaded and '"name": "CronList"' in loaded  # not "(no output)"
    assert "CronList" in offered_names(second)
    assert [m["tool_call_id"] for m in third["messages"] if m["role"] == "tool"] == \
        ["call_ts_1", "call_cl_1"]
    assert any("class=main" in line for line in lines), lines


def test_real_claude_code_falls_back_when_an_upstream_refuses_a_feature(home, anthropic_fake,
                                                                       tmp_path):
    """DeepSeek's Anthropic endpoint takes output_config.effort; one that answers "Invalid
    effort level" (Anthropic's words for an effort a model lacks) has the real Claude Code
    send the turn again on its own, and the account stays healthy."""
    add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic", anthropic_fake.url,
                         nickname="ds")
    anthropic_fake.max_output = 400000
    anthropic_fake.script = [{"status": 400, "message": "Invalid effort level"}]
    out, lines = run_launcher(home, anthropic_fake, tmp_path, "-p", "say hi",
                              model="deepseek-v4-flash")
    assert out.returncode == 0, out.stdout + out.stderr + "\n".join(lines)
    sent = [r[2] for r in anthropic_fake.requests if r[0].endswith("/v1/messages")]
    assert sent[0]["output_config"]["effort"], sent[0].get("output_config")
    assert len(sent) >= 2 and sent[1].get("output_config") != sent[0]["output_config"]
    assert [line.split(" status=")[1].split()[0] for line in lines][:2] == ["400", "200"], lines
    assert "account=ds" in lines[1] and "attempts=1" in lines[1]  # not cooled: served at once
