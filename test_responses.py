"""The Responses API (issue 24): POST /v1/responses from any client (Codex, the openai SDK) to
every account, translated to chat completions or Anthropic Messages and back, in OpenAI's event
grammar, checked event by event; the Codex 0.171.0 recordings replayed."""

import http.client
import json
import threading

import pytest

import iflow_proxy as ip
from test_iflow_proxy import (KEYS, FakeServer, QuietHandler, add_key_account,  # noqa: F401
                              add_provider_account, anthropic_fake, deepseek_fake, fake,
                              fixture, home, make_config, mutations, parse_sse, post_json,
                              request, running, sdk, serving, write_config)

CODEX = ["codex-0.171.0/01-first-turn.json", "codex-0.171.0/02-after-function-call-output.json"]
JSON = {"Content-Type": "application/json"}
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def responses_events(data):
    return [payload for _name, payload in parse_sse(data)]


def check_responses_grammar(events):
    """Assert the Responses stream grammar event by event; returns the final response."""
    kinds = [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events))), kinds
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] in TERMINAL and sum(k in TERMINAL for k in kinds) == 1, kinds
    final = events[-1]["response"]
    items, open_items, text = [], {}, {}
    for event in events[2:-1]:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert event["output_index"] == len(items), event
            items.append(event["item"])
            open_items[event["item"]["id"]] = event["output_index"]
            text[event["item"]["id"]] = ""
            continue
        item_id = event.get("item_id") or event.get("item", {}).get("id")
        assert item_id in open_items, (kind, event)  # only open items get events
        assert event["output_index"] == open_items[item_id], event
        if kind.endswith(".delta"):
            text[item_id] += event["delta"]
        elif kind in ("response.output_text.done", "response.reasoning_summary_text.done"):
            assert event["text"] == text[item_id]
        elif kind == "response.function_call_arguments.done":
            assert event["arguments"] == text[item_id]
        elif kind == "response.custom_tool_call_input.done":
            assert event["input"] == text[item_id]
        elif kind == "response.output_item.done":
            done = event["item"]
            assert done == final["output"][event["output_index"]], done  # whole, as in the end
            assert done.get("status", "completed") == "completed" or done["type"] == "reasoning"
            del open_items[item_id]
    if kinds[-1] != "response.failed":
        assert not open_items and len(items) == len(final["output"]), open_items
        assert final["usage"]["total_tokens"] == final["usage"]["input_tokens"] + \
            final["usage"]["output_tokens"]
    prefixes = {"message": "msg_", "function_call": "fc_", "custom_tool_call": "ctc_",
                "web_search_call": "ws_",
                "reasoning": "rs_"}
    assert final["id"].startswith("resp_")
    assert all(i["id"].startswith(prefixes[i["type"]]) for i in final["output"]), final["output"]
    return final


def post_responses(server, body, headers=None):
    """(status, final response or error body, events) of a POST /v1/responses."""
    status, _h, data = request(server, "POST", "/v1/responses", body, dict(JSON, **(headers or
                                                                                 {})))
    if status != 200 or not body.get("stream"):
        return status, json.loads(data), []
    events = responses_events(data)
    return status, check_responses_grammar(events), events


TOOLS = [
    {"type": "function", "name": "exec_command", "description": "Run a command.",
     "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}},
    {"type": "custom", "name": "apply_patch", "description": "Apply a patch.",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
    {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.", "tools": [
        {"type": "function", "name": "close_agent", "description": "Close one.",
         "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}},
        {"type": "function", "name": "exec_command", "description": "Same name as a top one.",
         "parameters": {"type": "object"}}]},
    {"type": "web_search", "external_web_access": True}]


def tool_responder(name, arguments, reasoning=None):
    """A fake chat upstream that calls ``name`` with ``arguments``, then answers in text."""
    def respond(body):
        if body["messages"][-1]["role"] == "tool":
            return {"content": "done: " + body["messages"][-1]["content"]}
        out = {"content": "", "tool_call_chunks": [
            {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": name, "arguments": arguments[:7]}},
            {"index": 0, "function": {"arguments": arguments[7:]}}]}
        if reasoning:
            out["reasoning_chunks"] = [reasoning[:5], reasoning[5:]]
        return out
    return respond


# --- a provider that serves the Responses API itself (DeepSeek's is stateless) ------------------

class FakeResponses(FakeServer):
    """A strict, stateless Responses API (https://api-docs.deepseek.com/guides/responses_api):
    Bearer key, known models only, no previous_response_id or store; answers a text (or a
    scripted function call), streamed in OpenAI's event grammar.  ``script``: "429" or
    "fail" (response.failed after the first event), one per request."""

    def __init__(self, keys=("sk-native-1111", "sk-native-2222"), models=("deepseek-v4-flash",)):
        super().__init__(("127.0.0.1", 0), FakeResponsesHandler)
        self.keys, self.models, self.requests, self.script = keys, models, [], []
        self.call = None  # (name, arguments): answer with a function call instead
        self.gate = threading.Event()  # a "fail" answer's failure waits for it
        self.serve_in_thread()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server_address[1]


class FakeResponsesHandler(QuietHandler):
    def reply(self, status, obj, content_type="application/json"):
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        srv.requests.append((self.path, body))
        action = srv.script.pop(0) if srv.script else None
        problem = None if self.headers.get("Authorization") in ["Bearer " + k for k in srv.keys] \
            else (401, "invalid api key")
        if problem is None and self.path != "/responses":
            problem = (404, "no route " + self.path)
        if problem is None and body.get("model") not in srv.models:
            problem = (400, "Model Not Exist")
        if problem is None and (body.get("previous_response_id") or body.get("store")):
            problem = (400, "store and previous_response_id are not supported")
        if problem is None and action == "429":
            problem = (429, "rate limited")
        if problem:
            kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
                problem[0], "invalid_request_error")
            return self.reply(problem[0], {"error": {"message": problem[1], "type": kind}})
        text = "native: " + json.dumps(body["input"])[-40:]
        item = {"id": "msg_n1", "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
        if srv.call:
            item = {"id": "fc_n1", "type": "function_call", "status": "completed",
                    "call_id": "call_n1", "name": srv.call[0], "arguments": srv.call[1]}
        response = {"id": "resp_n1", "object": "response", "created_at": 1, "model":
                    body["model"], "status": "completed", "output": [item],
                    "usage": {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10},
                              "output_tokens": 4, "output_tokens_details":
                              {"reasoning_tokens": 0}, "total_tokens": 34}}
        if not body.get("stream"):
            return self.reply(200, response)
        opened = dict(item, status="in_progress", content=[]) if not srv.call else \
            dict(item, status="in_progress", arguments="")
        started = dict(response, status="in_progress", output=[], usage=None)
        events = [{"type": "response.created", "response": started},
                  {"type": "response.in_progress", "response": started},
                  {"type": "response.output_item.added", "output_index": 0, "item": opened}]
        if action == "fail":  # the head, then (once the test has seen it) the failure
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(self.events(events, 0))
            self.wfile.flush()
            srv.gate.wait(10)
            self.wfile.write(self.events([{"type": "response.failed", "response": dict(
                response, status="failed", error={"code": "server_error",
                                                  "message": "the model fell over"})}], 3))
            self.close_connection = True
            return
        events += [{"type": "response.output_item.done", "output_index": 0, "item": item},
                   {"type": "response.completed", "response": response}]
        self.reply(200, self.events(events, 0), "text/event-stream")

    @staticmethod
    def events(events, first):
        return b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(
            dict(e, sequence_number=n)).encode()) for n, e in enumerate(events, first))


@pytest.fixture
def native():
    yield from serving(FakeResponses())


def test_providers_that_serve_responses_get_them_as_they_are(home, native):
    """DeepSeek serves the Responses API itself: the request goes there as it came (the model
    mapped, the chain of stored responses inline, store off), the answer comes back as it
    was, failover happens before the first event, and a failure after it is closed."""
    add_provider_account(home, "sk-native-1111", "deepseek", "openai", native.url,
                         nickname="ds")
    add_provider_account(home, "sk-native-2222", "deepseek", "openai", native.url,
                         nickname="ds2")
    with running(make_config(home, strategy="fill-first")) as server:
        status, first, _ = post_responses(server, {"model": "deepseek-v4-flash", "input": "hi",
                                                   "tools": TOOLS})
        assert status == 200 and first["id"] == "resp_n1", first
        path, sent = native.requests[-1]
        assert path == "/responses" and sent["tools"] == TOOLS and sent["store"] is False
        status, events = 0, []
        native.script = ["429"]  # the first account is refused: the second one answers
        status, second, events = post_responses(server, {
            "model": "deepseek-v4-flash", "input": "again", "stream": True,
            "previous_response_id": first["id"]})
        assert status == 200 and second["status"] == "completed", second
        sent = native.requests[-1][1]
        assert "previous_response_id" not in sent and [i.get("content") for i in sent["input"]
                                                       if i.get("type") == "message"][:1] == \
            ["hi"] and sent["input"][1]["id"] == "msg_n1"  # the chain, inline
        native.script = ["fail"]
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        conn.request("POST", "/v1/responses", json.dumps({
            "model": "deepseek-v4-flash", "input": "x", "stream": True}), JSON)
        answer = conn.getresponse()
        head = answer.read1(65536)
        assert b"response.created" in head  # relayed: the failure now comes after it
        native.gate.set()
        events = responses_events(head + answer.read())
        conn.close()
        assert [e["type"] for e in events][-1] == "response.failed"
        assert events[-1]["response"]["error"]["code"] == "server_error"
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        rows = server.chat.usage.day_rows()
        assert sum(r["input_tokens"] for r in rows) >= 60
        openai = sdk("openai")  # the SDK reads the native answer, streamed or not
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        native.call = ("exec_command", '{"cmd": "ls"}')
        created = client.responses.create(model="deepseek-v4-flash", input="go", tools=TOOLS)
        assert created.output[0].type == "function_call" and created.output[0].name == \
            "exec_command"
        native.call = None
        with client.responses.stream(model="deepseek-v4-flash", input="hey") as events:
            for _event in events:
                pass
            assert events.get_final_response().output_text.startswith("native: ")


# --- translation, pure ---------------------------------------------------------------------------

def test_tools_flatten_and_map_back():
    tools = ip.ResponsesTools(TOOLS)
    names = [f["function"]["name"] for f in tools.functions]
    assert names == ["exec_command", "apply_patch", "close_agent",
                     "multi_agent_v1__exec_command"]
    assert tools.dropped == ["web_search"]
    patch = tools.functions[1]["function"]
    assert patch["parameters"]["required"] == ["input"] and "start: /.+/" in \
        patch["description"]
    assert tools.item("apply_patch", "c1", '{"input": "*** Begin Patch"}') == {
        "type": "custom_tool_call", "call_id": "c1", "name": "apply_patch",
        "input": "*** Begin Patch"}
    assert tools.item("multi_agent_v1__exec_command", "c2", "{}") == {
        "type": "function_call", "call_id": "c2", "name": "exec_command", "arguments": "{}",
        "namespace": "multi_agent_v1"}
    assert tools.flat("close_agent", "multi_agent_v1") == "close_agent"
    assert ip.custom_input("not json") == "not json"


@pytest.mark.parametrize("name", CODEX)
def test_codex_recordings_as_chat(name):
    body = fixture(name)["body"]
    ip.validate_responses_request(body)
    chat = ip.responses_to_chat(body)
    messages = chat["messages"]
    developer = [i for i in body["input"] if i.get("role") == "developer"]
    assert messages[0]["role"] == "system" and all(
        d["content"][0]["text"] in messages[0]["content"] for d in developer)
    assert [m["role"] for m in messages[1:2]] == ["user"]
    assert "run echo hi" in messages[1]["content"]
    offered = [t["function"]["name"] for t in chat["tools"]]
    assert "exec_command" in offered and "close_agent" in offered and \
        "web_search" not in offered
    assert chat["stream"] is True and chat["tool_choice"] == "auto"
    calls = [i for i in body["input"] if i.get("type") == "function_call"]
    if calls:
        turn = messages[2]
        assert turn["role"] == "assistant" and turn["tool_calls"][0]["id"] == "call_cap1"
        assert messages[3] == {"role": "tool", "tool_call_id": "call_cap1", "content":
                               body["input"][-1]["output"]}


def test_items_in_order_reasoning_with_the_next_turn():
    body = {"model": "m", "instructions": "Be brief.", "input": [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Think."}]},
        {"type": "function_call", "call_id": "a", "name": "exec_command", "arguments": "{}"},
        {"type": "custom_tool_call", "call_id": "b", "name": "apply_patch", "input": "P"},
        {"type": "function_call_output", "call_id": "a", "output": "out a"},
        {"type": "custom_tool_call_output", "call_id": "b", "output": [
            {"type": "input_text", "text": "out b"}]},
        {"role": "developer", "content": "Later rule."},
        {"role": "user", "content": [{"type": "input_text", "text": "look"}, {
            "type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
        {"type": "web_search_call", "status": "completed"}],
        "tools": TOOLS, "max_output_tokens": 100, "reasoning": {"effort": "high"},
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}
    chat = ip.responses_to_chat(body)
    roles = [m["role"] for m in chat["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "user", "user"]
    turn = chat["messages"][2]
    assert turn["reasoning_content"] == "Think." and [c["function"]["name"] for c in
                                                      turn["tool_calls"]] == [
        "exec_command", "apply_patch"]
    assert json.loads(turn["tool_calls"][1]["function"]["arguments"]) == {"input": "P"}
    assert chat["messages"][4]["content"] == "out b"
    assert chat["messages"][5]["content"] == "<system-reminder>\nLater rule.\n</system-reminder>"
    assert chat["messages"][6]["content"][1]["image_url"]["url"].startswith("data:image/png")
    assert chat["max_tokens"] == 100 and chat["reasoning_effort"] == "high"
    assert chat["response_format"]["json_schema"]["name"] == "x"
    assert ip.responses_thinking(body) == (True, "high")
    refused = ip.responses_to_chat({"model": "m", "input": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": [
            {"type": "output_text", "text": "Well."}, {"type": "refusal", "refusal": "No."}]}]})
    assert refused["messages"][1]["content"] == "Well.\nNo."  # (a refusal's text was lost)


@pytest.mark.parametrize("bad, field", [
    ({"model": "m"}, "'input'"),
    ({"model": "", "input": "x"}, "'model'"),
    ({"model": "m", "input": 5}, "'input'"),
    ({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input[0].call_id"),
    ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text"}]}]},
     "input[0].content[0].text"),
    ({"model": "m", "input": [{"content": "no type"}]}, "input[0]"),
    ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"model": "m", "input": "x", "tools": [{"type": "namespace", "name": "n", "tools": 3}]},
     "tools[0].tools"),
    ({"model": "m", "input": "x", "max_output_tokens": 0}, "'max_output_tokens'"),
    ({"model": "m", "input": [{"type": "reasoning", "summary": 1.5}]}, "input[0].summary"),
    ({"model": "m", "input": [{"type": "reasoning", "content": True}]}, "input[0].content"),
])
def test_malformed_requests_name_the_field(bad, field):
    with pytest.raises(ip.BadRequest) as e:
        ip.validate_responses_request(bad)
    assert field in e.value.message


# --- over real sockets ---------------------------------------------------------------------------

FULL_REQUEST = {
    "model": "glm-4.6", "instructions": "be brief", "max_output_tokens": 50, "temperature": 0.5,
    "reasoning": {"effort": "low", "summary": "auto"}, "store": False, "tool_choice": "auto",
    "parallel_tool_calls": True, "include": ["reasoning.encrypted_content"],
    "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
    "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}},
              {"type": "custom", "name": "apply_patch"},
              {"type": "namespace", "name": "n", "tools": [{"type": "function", "name": "g"}]}],
    "input": [
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "hi"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}],
         "encrypted_content": "x"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        {"type": "custom_tool_call", "call_id": "c2", "name": "apply_patch", "input": "x"},
        {"type": "custom_tool_call_output", "call_id": "c2", "output": [
            {"type": "input_text", "text": "y"}]}]}


def test_fuzz_every_field_of_a_full_request_gets_a_4xx_or_an_answer(home, fake):
    """Each field (top-level or nested) of a full Responses request, and of Codex's own, set
    to a weird value: a 4xx in OpenAI's shape or an answer, never a 500 (a reasoning item's
    summary, a text part of a tool's output once were)."""
    import random
    rng = random.Random(20261203)
    add_key_account(home, KEYS[0])
    cases = [("/v1/responses", dict(body, stream=stream)) for stream in (False, True)
             for _path, body in mutations(rng, FULL_REQUEST)]
    cases += [("/v1/responses/input_tokens", body)
              for _path, body in mutations(rng, FULL_REQUEST)]
    rng.shuffle(cases)
    cases = cases[:300]
    for name in CODEX:  # and Codex's own requests
        recorded = list(mutations(rng, fixture(name)["body"]))
        rng.shuffle(recorded)
        cases += [("/v1/responses", body) for _path, body in recorded[:100]]
    with running(make_config(home, fake, max_concurrency=0)) as server:
        for path, body in cases:
            status, _h, data = request(server, "POST", path, body, JSON)
            assert status < 500, (path, body, data[:300])
            if status >= 400:
                assert json.loads(data)["error"]["message"], data
        assert request(server, "GET", "/healthz")[0] == 200

@pytest.mark.parametrize("stream", [False, True])
def test_openai_sdk_create_and_stream_through_both_protocols(home, fake, anthropic_fake, stream):
    openai = sdk("openai")
    add_key_account(home, KEYS[0])
    add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic", anthropic_fake.url,
                         nickname="ds")
    anthropic_fake.responder = lambda b: {"text": "Hello from Anthropic", "thinking": "Hmm."}
    with running(make_config(home, fake)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        for model, expected in (("glm-4.6", "echo: hello"),
                                ("ds/deepseek-v4-flash", "Hello from Anthropic")):
            args = dict(model=model, input="hello", instructions="Be kind.",
                        max_output_tokens=64)
            if stream:
                with client.responses.stream(**args) as events:
                    kinds = [e.type for e in events]
                    response = events.get_final_response()
                assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
            else:
                response = client.responses.create(**args)
            assert response.output_text == expected and response.status == "completed"
            assert response.usage.input_tokens > 0 and response.id.startswith("resp_")
        assert fake.chat_requests()[-1][2]["messages"][0] == {"role": "system",
                                                              "content": "Be kind."}
        assert anthropic_fake.requests[-1][2]["system"] in ("Be kind.", [
            {"type": "text", "text": "Be kind."}])


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_function_custom_and_namespace_tool_round_trips(home, fake, anthropic_fake, protocol):
    if protocol == "openai":
        add_key_account(home, KEYS[0])
        model, upstream = "glm-4.6", fake
    else:
        add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic",
                             anthropic_fake.url)
        model, upstream = "deepseek-v4-flash", anthropic_fake
    cases = [("exec_command", '{"cmd": "echo hi"}', "function_call", {"arguments":
                                                                       '{"cmd": "echo hi"}'}),
             ("apply_patch", json.dumps({"input": "*** Begin Patch\n*** End Patch"}),
              "custom_tool_call", {"input": "*** Begin Patch\n*** End Patch"}),
             ("multi_agent_v1__exec_command", '{"x": 1}', "function_call",
              {"namespace": "multi_agent_v1", "name": "exec_command"})]
    with running(make_config(home, fake)) as server:
        for flat, arguments, kind, expected in cases:
            if protocol == "openai":
                fake.responder = tool_responder(flat, arguments)
            else:
                anthropic_fake.responder = lambda b, f=flat, a=arguments: {
                    "tool": {"name": f, "input": json.loads(a)}} \
                    if b["messages"][-1]["role"] == "user" and not any(
                        isinstance(c, dict) and c.get("type") == "tool_result"
                        for c in b["messages"][-1]["content"]) else {"text": "done"}
            body = {"model": model, "input": "go", "tools": TOOLS, "stream": True}
            status, response, _events = post_responses(server, body)
            assert status == 200, response
            call = response["output"][-1]
            assert call["type"] == kind and all(
                call[k] == v if k != "arguments" else json.loads(call[k]) == json.loads(v)
                for k, v in expected.items()), call
            output = {"type": kind + "_output", "call_id": call["call_id"], "output": "ok"}
            body = dict(body, input=[{"role": "user", "content": "go"}, call, output],
                        stream=False)
            status, response, _ = post_responses(server, body)
            assert status == 200 and response["output"][-1]["type"] == "message", response
            sent = upstream.requests[-1][2] if protocol == "anthropic" else \
                fake.chat_requests()[-1][2]
            dumped = json.dumps(sent)
            assert call["call_id"] in dumped and flat in dumped


def test_reasoning_passback_to_a_deepseek_like_upstream(home, fake):
    """DeepSeek's thinking mode refuses a tool-call turn without its reasoning: the reasoning
    item Codex sends back (or the proxy's memory of it) goes with the turn."""
    deepseek_fake(fake)
    add_provider_account(home, KEYS[0], "deepseek", "openai", fake.url + "/v1")
    fake.responder = tool_responder("exec_command", '{"cmd": "ls"}', reasoning="List files.")
    with running(make_config(home)) as server:
        body = {"model": "deepseek-v4-flash", "input": "go", "tools": TOOLS, "stream": True,
                "store": False, "include": ["reasoning.encrypted_content"]}
        status, response, _ = post_responses(server, body)
        assert [i["type"] for i in response["output"]] == ["reasoning", "function_call"]
        assert response["output"][0]["summary"][0]["text"] == "List files."
        for kept in (response["output"], response["output"][1:]):  # with and without the item
            follow = dict(body, input=[{"role": "user", "content": "go"}] + kept + [
                {"type": "function_call_output", "call_id": "call_1", "output": "a b"}])
            status, answer, _ = post_responses(server, follow)
            assert status == 200 and answer["output"][-1]["content"][0]["text"] == "done: a b"
            sent = fake.chat_requests()[-1][2]["messages"]
            assert sent[1]["reasoning_content"] == "List files."
    # DeepSeek serves the Responses API itself; this base URL had none (404): asked once, then
    # translated to chat for this account from there on
    assert [r[0] for r in fake.requests if r[0].endswith("/responses")] == ["/v1/responses"]


def test_failover_before_the_first_event_and_failed_after_it(home, fake):
    add_key_account(home, KEYS[0], nickname="one")
    add_key_account(home, KEYS[1], nickname="two")
    body = {"model": "glm-4.6", "input": "hi", "stream": True}
    with running(make_config(home, fake, strategy="fill-first")) as server:
        fake.push(KEYS[0], ("http", 500))
        status, response, _ = post_responses(server, body)
        assert status == 200 and response["status"] == "completed"
        fake.responder = lambda b: {"content": "partial answer", "cut": True}
        status, _h, data = request(server, "POST", "/v1/responses", body, JSON)
        events = responses_events(data)
        final = check_responses_grammar(events)
        assert events[-1]["type"] == "response.failed" and final["status"] == "failed"
        assert "response.completed" not in [e["type"] for e in events]
        fake.responder = None
        fake.push(KEYS[0], ("http", 429))
        fake.push(KEYS[1], ("http", 429))
        status, error, _ = post_responses(server, body)
        assert status == 429 and error["error"]["type"] == "rate_limit_error" or \
            error["error"]["code"] == "rate_limit_exceeded", error


def test_output_limit_is_incomplete(home, fake):
    add_key_account(home, KEYS[0])
    fake.responder = lambda b: {"content": "cut short", "finish_reason": "length"}
    with running(make_config(home, fake)) as server:
        for stream in (True, False):
            status, response, events = post_responses(server, {
                "model": "glm-4.6", "input": "hi", "stream": stream, "max_output_tokens": 3})
            assert response["status"] == "incomplete" and response["incomplete_details"] == {
                "reason": "max_output_tokens"}
            if stream:
                assert events[-1]["type"] == "response.incomplete"


def test_stored_responses_chain_and_belong_to_their_key(home, fake):
    add_key_account(home, KEYS[0])
    write_config(home, {"client_keys": [{"name": "alice", "key": "ck-alice-123456"},
                                        {"name": "bob", "key": "ck-bob-1234567"}],
                        "responses_store": 2})
    alice, bob = {"Authorization": "Bearer ck-alice-123456"}, \
        {"Authorization": "Bearer ck-bob-1234567"}
    with running(make_config(home, fake)) as server:
        status, first, _ = post_responses(server, {"model": "glm-4.6", "input": "one"}, alice)
        assert status == 200
        status, second, _ = post_responses(server, {"model": "glm-4.6", "input": "two",
                                                    "previous_response_id": first["id"]}, alice)
        assert status == 200
        assert [m["content"] for m in fake.chat_requests()[-1][2]["messages"]] == [
            "one", "echo: one", "two"]
        status, _h, data = request(server, "GET", "/v1/responses/" + second["id"], None, alice)
        assert status == 200 and json.loads(data) == second
        status, _h, data = request(server, "GET", "/v1/responses/" + second["id"], None, bob)
        assert status == 404  # another key's response is not there for bob
        status, error, _ = post_responses(server, {"model": "glm-4.6", "input": "x",
                                                   "previous_response_id": "resp_nope"}, alice)
        assert status == 400 and "resp_nope" in error["error"]["message"]
        status, unstored, _ = post_responses(server, {"model": "glm-4.6", "input": "x",
                                                      "store": False}, alice)
        status, _h, _data = request(server, "GET", "/v1/responses/" + unstored["id"], None,
                                    alice)
        assert status == 404
        for text in ("three", "four"):  # the store keeps the last 2
            post_responses(server, {"model": "glm-4.6", "input": text}, alice)
        status, _h, _data = request(server, "GET", "/v1/responses/" + first["id"], None, alice)
        assert status == 404
        status, _h, data = request(server, "POST", "/v1/responses/input_tokens",
                                   {"model": "glm-4.6", "input": "count me"},
                                   dict(JSON, **alice))
        assert status == 200 and json.loads(data)["input_tokens"] > 0


def test_bad_input_is_a_400_and_the_server_keeps_serving(home, fake):
    add_key_account(home, KEYS[0])
    with running(make_config(home, fake)) as server:
        for bad in ({"model": "glm-4.6", "input": [{"type": "function_call_output"}]},
                    {"model": "glm-4.6", "input": [{"role": "user", "content": [
                        {"type": "input_image", "file_id": "f"}]}]}):
            status, error, _ = post_responses(server, bad)
            assert status == 400 and error["error"]["type"] == "invalid_request_error", error
        status, _h, data = request(server, "POST", "/v1/responses", raw=b"{nope",
                                   headers=JSON)
        assert status == 400
        status, response, _ = post_responses(server, {"model": "glm-4.6", "input": "fine",
                                                      "unknown_field": {"x": 1}})
        assert status == 200 and response["output"][0]["content"][0]["text"] == "echo: fine"


@pytest.mark.parametrize("name", CODEX)
def test_codex_recordings_replayed_through_both_protocols(home, fake, anthropic_fake, name):
    recorded = fixture(name)
    add_key_account(home, KEYS[0])
    add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic", anthropic_fake.url,
                         nickname="ds")
    anthropic_fake.max_output = 400000
    headers = {k: v for k, v in recorded["headers"].items()
               if k.lower() not in ("host", "content-length", "accept-encoding")}
    with running(make_config(home, fake)) as server:
        for model in ("glm-4.6", "ds/deepseek-v4-pro"):
            status, response, _ = post_responses(server, dict(recorded["body"], model=model),
                                                 headers)
            assert status == 200 and response["status"] == "completed", response
    openai_body, anthropic_body = fake.chat_requests()[-1][2], anthropic_fake.requests[-1][2]
    for text in ("run echo hi", "You are a coding agent running in the Codex CLI"):
        assert text in json.dumps(openai_body) and text in json.dumps(anthropic_body)
    assert {t["name"] for t in anthropic_body["tools"]} == {
        t["function"]["name"] for t in openai_body["tools"]}


# --- the real Codex ------------------------------------------------------------------------------

def find_codex():
    import os
    import shutil
    from test_iflow_proxy import HERE
    for candidate in (os.environ.get("IFLOW_PROXY_TEST_CODEX_BIN"),
                      os.path.join(HERE, ".cache", "codex", "node_modules", ".bin", "codex"),
                      shutil.which("codex")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def run_codex(home, upstream_env, tmp_path, *codex_args, model=None):
    """`python iflow_proxy.py codex …` with the real Codex: (process, JSON events, log lines)."""
    import os
    import subprocess
    import sys
    from test_iflow_proxy import HERE
    codex = find_codex()
    if codex is None:
        pytest.skip("Codex is not installed (.ci/run installs it with npm into .cache)")
    log = tmp_path / "proxy.log"
    work = tmp_path / "project"
    work.mkdir(exist_ok=True)
    env = dict({"PATH": os.environ.get("PATH", ""), "HOME": str(work / "h"),
                "CODEX_HOME": str(work / "codex-home"), "IFLOW_PROXY_HOME": home,
                "IFLOW_PROXY_PORT": "1", "IFLOW_PROXY_LOG_FILE": str(log)}, **upstream_env)
    os.makedirs(env["CODEX_HOME"], exist_ok=True)
    out = subprocess.run([sys.executable, os.path.join(HERE, "iflow_proxy.py"), "codex"] +
                         (["--model", model] if model else []) + ["--codex-bin", codex] +
                         list(codex_args), cwd=str(work), env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=600)
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    lines = log.read_text().splitlines() if log.exists() else []
    return out, events, [line for line in lines if " POST /v1/responses" in line]


def test_real_codex_runs_a_tool_through_the_codex_command(home, fake, tmp_path):
    """`codex exec` through the launcher on the fake: its exec_command call is run and the
    result goes back; Codex knows the model (its catalog came from the launcher) and the
    proxy logs every request as a Responses one."""
    add_key_account(home, KEYS[0])
    fake.responder = tool_responder("exec_command", '{"cmd": "echo hi from codex"}')
    out, events, lines = run_codex(home, {"IFLOW_API_BASE": fake.url + "/v1"}, tmp_path,
                                   "exec", "--skip-git-repo-check", "--json",
                                   "--dangerously-bypass-approvals-and-sandbox", "run echo hi")
    assert out.returncode == 0, out.stdout + out.stderr
    kinds = [e.get("item", {}).get("type") for e in events if e["type"] == "item.completed"]
    assert "error" not in kinds, events  # e.g. "Model metadata for … not found"
    ran = [e["item"] for e in events if e["type"] == "item.completed" and
           e["item"]["type"] == "command_execution"]
    assert ran and "hi from codex" in ran[0]["aggregated_output"] and ran[0]["exit_code"] == 0
    sent = [r[2] for r in fake.chat_requests()]
    assert len(sent) == 2 and sent[1]["messages"][-1]["role"] == "tool" and \
        "hi from codex" in sent[1]["messages"][-1]["content"]
    assert "You are Codex" in sent[0]["messages"][0]["content"]  # Codex's own instructions
    assert len(lines) == 2 and all(" responses POST " in line and "status=200" in line
                                   for line in lines), lines


def test_codex_catalog_overrides_and_config_block(home):
    template = {"slug": "gpt-x", "base_instructions": "You are Codex.", "tool_mode": None,
                "shell_type": "unified_exec", "apply_patch_tool_type": "freeform",
                "truncation_policy": {"mode": "tokens", "limit": 10000}, "comp_hash": "1",
                "max_context_window": 999}
    code_only = dict(template, slug="gpt-y", tool_mode="code_mode_only")
    assert ip.codex_template({"models": [code_only, template]}) is template
    assert ip.codex_template({"models": [code_only]}) is code_only
    assert ip.codex_template(None) is None and ip.codex_template({"models": [{}]}) is None
    kimi, qwen = ip.model_spec("kimi-k2", "iflow"), ip.model_spec("qwen3-vl-plus", "iflow")
    catalog = ip.codex_catalog(template, [("kimi-k2", kimi), ("qwen3-vl-plus", qwen),
                                          ("local", ip.UNKNOWN_MODEL)])["models"]
    assert [m["slug"] for m in catalog] == ["kimi-k2", "qwen3-vl-plus", "local"]
    first = catalog[0]
    assert first["base_instructions"] == "You are Codex." and "comp_hash" not in first and \
        "max_context_window" not in first
    assert first["context_window"] == 128000 and first["auto_compact_token_limit"] == \
        ip.compact_window(kimi) < 128000
    assert [e["effort"] for e in first["supported_reasoning_levels"]] == ["low", "medium",
                                                                          "high"]
    assert catalog[1]["input_modalities"] == ["text", "image"] and \
        catalog[0]["input_modalities"] == ["text"]
    assert catalog[2]["supported_reasoning_levels"] == [] and \
        catalog[2]["default_reasoning_level"] is None
    args = ip.codex_overrides("http://127.0.0.1:5", "kimi-k2", kimi, "/h/codex-models.json")
    pairs = dict(a.split("=", 1) for a in args[1::2])
    assert args[::2] == ["-c"] * len(pairs)
    assert pairs["model_provider"] == '"iflow_proxy"' and pairs["model"] == '"kimi-k2"'
    assert 'wire_api="responses"' in pairs["model_providers.iflow_proxy"] and \
        'env_key="IFLOW_PROXY_CODEX_KEY"' in pairs["model_providers.iflow_proxy"] and \
        '"http://127.0.0.1:5/v1"' in pairs["model_providers.iflow_proxy"]
    assert pairs["model_catalog_json"] == '"/h/codex-models.json"'
    from test_iflow_proxy import run_cli
    code, out, _ = run_cli("env", "--codex", "--model", "kimi-k2", home=home)
    assert code == 0 and 'model = "kimi-k2"' in out and "model_context_window = 128000" in out
    assert 'base_url = "http://127.0.0.1:11450/v1"' in out and 'wire_api = "responses"' in out
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        return
    parsed = tomllib.loads(out)
    assert parsed["model_providers"]["iflow_proxy"]["env_key"] == "IFLOW_PROXY_CODEX_KEY"


def test_codex_argv_split():
    assert ip.split_agent_argv(["codex", "--model", "m", "exec", "--json", "hi"]) == (
        ["codex", "--model", "m"], ["exec", "--json", "hi"], "codex")
    assert ip.split_agent_argv(["--home", "codex", "status"]) == (
        ["--home", "codex", "status"], None, None)
    assert ip.split_agent_argv(["claude", "--codex-bin", "x"]) == (["claude"],
                                                                   ["--codex-bin", "x"],
                                                                   "claude")
