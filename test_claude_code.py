"""Claude Code as it is today (issue 23): the requests recorded from Claude Code 2.1.332 in
../shared/fixtures/claude-code-2.1.332/ replayed through both upstream protocols, and checked on
the body the upstream gets: no text or tool lost, deferred tools loaded the way Anthropic's tool
search loads them, no placeholder tool offered.  (The 2.1.197 recordings stay as older inputs in
test_iflow_proxy.py.)"""

import json

import pytest

import iflow_proxy as ip
from test_iflow_proxy import (KEYS, add_key_account, add_provider_account,  # noqa: F401
                              anthropic_fake, fake, fixture, home, make_config, request,
                              running)

RECORDED = ["claude-code-2.1.332/01-main-first-turn.json",
            "claude-code-2.1.332/02-main-after-toolsearch-tool-reference.json",
            "claude-code-2.1.332/03-websearch-side-request.json",
            "claude-code-2.1.332/04-main-after-websearch-result.json"]
SKIPPED_HEADERS = {"host", "content-length", "connection", "accept-encoding"}


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
