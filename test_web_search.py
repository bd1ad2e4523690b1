"""Web search through any provider (issue 25): a search backend answers web-search tools with no
model call; fakes of SearXNG, Tavily, Brave and Exa stand in for the real ones."""

import json
import threading
import urllib.parse

import pytest

import iflow_proxy as ip
from test_iflow_proxy import (KEYS, FakeServer, QuietHandler, add_key_account,  # noqa: F401
                              check_anthropic_grammar, fake, fixture, home, make_config,
                              parse_sse, request, running, serving, write_config)

SIDE_REQUEST = "claude-code-2.1.332/03-websearch-side-request.json"
HEADERS = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
RESULTS = [("iFlow CLI shuts down", "https://news.example.com/iflow-cli-end",
            "The iFlow CLI service ended on 2026-04-17.", "2026-04-18"),
           ("iFlow announcement", "https://iflow.example.cn/notice",
            "Service <b>announcement</b> &amp; FAQ", ""),
           ("Blocked site", "https://spam.example.org/x", "spam", "")]


class FakeSearch(FakeServer):
    """SearXNG (GET /search?format=json; ``json_off``: 403 as when JSON output is not enabled),
    Tavily (POST /search, Bearer), Brave (GET /res/v1/web/search, X-Subscription-Token) and Exa
    (POST /exa, x-api-key), each strict about its key; ``hang`` holds every answer until set."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeSearchHandler)
        self.requests, self.json_off, self.hang = [], False, None
        self.serve_in_thread()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server_address[1]


class FakeSearchHandler(QuietHandler):
    def answer(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_search(self, method):
        srv = self.server
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or
                          b"{}") if method == "POST" else {}
        srv.requests.append((method, parts.path, query, body, dict(self.headers)))
        if srv.hang is not None:
            srv.hang.wait(10)
        rows = [{"title": t, "url": u, "content": s, "publishedDate": a} for t, u, s, a in
                RESULTS]
        if parts.path == "/search" and method == "GET":  # SearXNG
            if srv.json_off or query.get("format") != "json":
                return self.answer(403, {"error": "format not enabled"})
            return self.answer(200, {"query": query["q"], "results": rows})
        if parts.path == "/search":  # Tavily
            if self.headers.get("Authorization") != "Bearer tvly-test":
                return self.answer(401, {"detail": "bad key"})
            return self.answer(200, {"query": body["query"], "results": rows[:body.get(
                "max_results", 5)]})
        if parts.path == "/res/v1/web/search":  # Brave
            if self.headers.get("X-Subscription-Token") != "brave-test":
                return self.answer(401, {"error": "bad token"})
            return self.answer(200, {"web": {"results": [
                {"title": t, "url": u, "description": s, "page_age": a} for t, u, s, a in
                RESULTS]}})
        if parts.path == "/v1/coding_plan/search":  # MiniMax: errors in base_resp, HTTP 200
            ok = self.headers.get("Authorization") == "Bearer sk-provider-1"
            return self.answer(200, {"organic": [
                {"title": t, "link": u, "snippet": s, "date": a} for t, u, s, a in RESULTS]
                if ok else [], "base_resp": {"status_code": 0 if ok else 1004,
                                             "status_msg": "success" if ok else
                                             "login fail: Please carry the API secret key"}})
        if parts.path in ("/v1/tools/search", "/api/paas/v4/web_search"):  # DeepSeek, Zhipu
            if self.headers.get("Authorization") != "Bearer sk-provider-1":
                return self.answer(401, {"error": {"message": "bad key"}})
            if parts.path == "/v1/tools/search":
                return self.answer(200, {"results": [{"title": t, "url": u, "summary": s}
                                                     for t, u, s, _a in RESULTS]})
            return self.answer(200, {"search_result": [
                {"title": t, "link": u, "content": s, "publish_date": a} for t, u, s, a in
                RESULTS]})
        if parts.path == "/exa":
            if self.headers.get("x-api-key") != "exa-test":
                return self.answer(401, {"error": "bad key"})
            return self.answer(200, {"results": [{"title": t, "url": u, "text": s,
                                                  "publishedDate": a} for t, u, s, a in RESULTS]})
        self.answer(404, {"error": "no route"})

    def do_GET(self):
        self.handle_search("GET")

    def do_POST(self):
        self.handle_search("POST")


@pytest.fixture
def search():
    yield from serving(FakeSearch())


def side_request(stream=True):
    recorded = fixture(SIDE_REQUEST)
    headers = {k: v for k, v in recorded["headers"].items()
               if k.lower() not in ("host", "content-length", "connection", "accept-encoding")}
    return dict(recorded["body"], stream=stream), dict(headers, **HEADERS)


# --- pure parts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, settings, env", [
    ("searxng", {"backend": "searxng", "url": "http://s"}, {}),
    ("searxng", {}, {"SEARXNG_URL": "http://s"}),
    ("tavily", {}, {"TAVILY_API_KEY": "k"}),
    ("brave", {"backend": "brave", "api_key": "k"}, {}),
    ("exa", {}, {"EXA_API_KEY": "k"}),
    ("duckduckgo", {"backend": "duckduckgo"}, {}),
    (None, {}, {}),
    (None, {"backend": "tavily"}, {}),          # chosen, but no key anywhere
    (None, {"backend": "none"}, {"TAVILY_API_KEY": "k"}),
])
def test_which_backend_answers(home, name, settings, env):
    config = make_config(home, web_search=settings)
    assert ip.search_settings(config, env)[0] == name


def test_each_backend_is_asked_its_own_way_and_read_back():
    method, url, headers, body = ip.search_request("searxng", "http://s/", "", "a b", 5)
    assert (method, url, body) == ("GET", "http://s/search?q=a+b&format=json", None)
    method, url, headers, body = ip.search_request("tavily", "https://t/search", "K", "q", 3)
    assert headers["Authorization"] == "Bearer K" and json.loads(body) == {"query": "q",
                                                                           "max_results": 3}
    method, url, headers, body = ip.search_request("brave", "https://b", "K", "q", 4)
    assert url == "https://b?q=q&count=4" and headers["X-Subscription-Token"] == "K"
    _m, _u, headers, body = ip.search_request("exa", "https://e", "K", "q", 2)
    assert headers["x-api-key"] == "K" and json.loads(body)["numResults"] == 2
    rows = json.dumps({"results": [{"title": "T", "url": "https://x", "content": "a <b>b</b>",
                                    "publishedDate": "2026"}, {"title": "no url"},
                                   {"title": "not a page", "url": "javascript:alert(1)"}]}).encode()
    assert ip.search_results("searxng", 200, rows) == [ip.SearchResult("T", "https://x", "a b",
                                                                       "2026")]
    with pytest.raises(ip.SearchUnavailable, match="search.formats"):
        ip.search_results("searxng", 403, b"")
    with pytest.raises(ip.SearchUnavailable, match="not JSON"):
        ip.search_results("tavily", 200, b"<html>")
    for web in (1.5, [{"results": []}], "x"):  # (an AttributeError: the search a 500)
        with pytest.raises(ip.SearchUnavailable, match="no results list"):
            ip.search_results("brave", 200, json.dumps({"web": web}).encode())
    page = ('<a rel="nofollow" class="result__a" href="//duckduckgo.com/l/?uddg=https%3A%2F%2F'
            'a.example%2Fp&amp;rut=1">A &amp; B</a> junk <a class="result__snippet" href="x">'
            'the <b>snippet</b></a>')
    assert ip.search_results("duckduckgo", 200, page.encode()) == [
        ip.SearchResult("A & B", "https://a.example/p", "the snippet", "")]
    unreadable = '<a class="result__a" href="//[x">t</a> <a class="result__snippet">s</a>' \
        '<a class="result__a" href="javascript:x()">t</a> <a class="result__snippet">s</a>'
    assert ip.search_results("duckduckgo", 200, (unreadable + page).encode()) == [
        ip.SearchResult("A & B", "https://a.example/p", "the snippet", "")]  # (skipped)
    assert ip.domain_allowed("https://docs.python.org/3", ["python.org"])
    assert not ip.domain_allowed("https://evilpython.org/", ["python.org"])
    assert not ip.domain_allowed("https://a.spam.org/", blocked=["spam.org"])


@pytest.mark.parametrize("bad, fragment", [
    ({"backend": "google"}, "backend must be one of"),
    ({"bogus": 1}, "takes the keys"),
    ({"max_results": 50}, "max_results must be 1 to 20"),
    ({"timeout": 0}, "timeout"),
    ({"url": "ftp://x"}, "url must be an http"),
    ({"api_key": 5}, "api_key must be a str"),
])
def test_web_search_setting_is_checked(home, bad, fragment):
    write_config(home, {"web_search": bad})
    with pytest.raises(ip.ConfigError, match=fragment):
        ip.load_config(home, {}, {})
    write_config(home, {"web_search": {"backend": "tavily", "max_results": 3, "timeout": 2.5}})
    assert ip.load_config(home, {}, {}).web_search["max_results"] == 3


# --- over real sockets ---------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_claude_codes_side_request_is_answered_by_the_backend(home, fake, search, stream):
    add_key_account(home, KEYS[0])
    config = make_config(home, fake, web_search={"backend": "searxng", "url": search.url})
    body, headers = side_request(stream)
    body["tools"] = [dict(body["tools"][0], blocked_domains=["spam.example.org"])]
    with running(config) as server:
        status, _h, data = request(server, "POST", "/v1/messages?beta=true", body, headers)
        assert status == 200, data[:300]
        if stream:
            events = parse_sse(data)
            blocks = check_anthropic_grammar(events)
            names = [n for n, _ in events]
            assert names[-2:] == ["message_delta", "message_stop"]
            usage = events[-2][1]["usage"]
        else:
            message = json.loads(data)
            blocks, usage = message["content"], message["usage"]
            assert message["stop_reason"] == "end_turn"
        rows = server.chat.usage.day_rows()
    assert [b["type"] for b in blocks] == ["server_tool_use", "web_search_tool_result", "text"]
    use, found, text = blocks
    assert use["id"].startswith("srvtoolu_") and use["name"] == "web_search" and \
        use["input"] == {"query": "when did iflow cli shut down"}
    assert found["tool_use_id"] == use["id"]
    assert [r["url"] for r in found["content"]] == [RESULTS[0][1], RESULTS[1][1]]
    assert all(r["type"] == "web_search_result" and r["encrypted_content"] == ""
               for r in found["content"])
    assert "iFlow CLI shuts down — https://news.example.com/iflow-cli-end — The iFlow CLI" in \
        text["text"] and "announcement & FAQ" in text["text"] and "spam" not in text["text"]
    assert usage["server_tool_use"] == {"web_search_requests": 1}
    assert search.requests[0][2] == {"q": "when did iflow cli shut down", "format": "json"}
    assert not fake.chat_requests()  # no model was asked
    assert [(r["account"], r["model"], r["requests"]) for r in rows] == [
        ("web-search", "searxng", 1)]


@pytest.mark.parametrize("backend, settings", [
    ("tavily", {"api_key": "tvly-test", "url": "{url}/search"}),
    ("brave", {"api_key": "brave-test", "url": "{url}/res/v1/web/search"}),
    ("exa", {"api_key": "exa-test", "url": "{url}/exa"}),
])
def test_keyed_backends(home, search, backend, settings):
    settings = dict(settings, backend=backend, url=settings["url"].format(url=search.url))
    body, headers = side_request(False)
    with running(make_config(home, web_search=settings)) as server:
        status, _h, data = request(server, "POST", "/v1/messages", body, headers)
    message = json.loads(data)
    assert status == 200 and [r["url"] for r in message["content"][1]["content"]] == \
        [r[1] for r in RESULTS], message
    assert settings["api_key"] not in json.dumps(message)


def test_no_backend_a_refusing_one_and_a_hanging_one_give_the_error_form(home, search):
    body, headers = side_request(False)
    cases = [({}, "web search is not set up"),
             ({"backend": "searxng", "url": search.url}, "add json to search.formats"),
             ({"backend": "searxng", "url": search.url, "timeout": 0.5}, "could not be reached")]
    for settings, fragment in cases:
        search.json_off = "formats" in fragment
        search.hang = threading.Event() if "reached" in fragment else None
        with running(make_config(home, web_search=settings)) as server:
            status, _h, data = request(server, "POST", "/v1/messages", body, headers)
            still = request(server, "GET", "/healthz")[0]
        if search.hang is not None:
            search.hang.set()
        message = json.loads(data)
        assert status == 200 and still == 200, message
        assert message["content"][1]["content"] == {"type": "web_search_tool_result_error",
                                                    "error_code": "unavailable"}
        assert fragment in message["content"][2]["text"], message["content"][2]["text"]
        assert message["usage"]["server_tool_use"] == {"web_search_requests": 0}


def web_search_responder(asked):
    """Main turns of a session: load WebSearch with ToolSearch, call it, then answer with what
    it returned (the side request never reaches this upstream: the proxy answers it)."""
    def respond(body):
        names = [t["function"]["name"] for t in body.get("tools") or []]
        if "ToolSearch" not in names:
            return {"content": "Search summary"}
        asked.append(body)
        results = [m for m in body["messages"] if m["role"] == "tool"]
        if not results:
            return {"content": "", "tool_call_chunks": [
                {"index": 0, "id": "call_ts", "type": "function", "function": {
                    "name": "ToolSearch", "arguments": json.dumps(
                        {"query": "select:WebSearch", "max_results": 1})}}]}
        if len(results) == 1:
            return {"content": "", "tool_call_chunks": [
                {"index": 0, "id": "call_ws", "type": "function", "function": {
                    "name": "WebSearch", "arguments": json.dumps(
                        {"query": "when did iflow cli shut down"})}}]}
        return {"content": "From the web: " + results[-1]["content"]}
    return respond


def test_real_claude_code_searches_the_web_through_the_proxy(home, fake, search, tmp_path):
    from test_claude_code import run_launcher
    add_key_account(home, KEYS[0])
    write_config(home, {"web_search": {"backend": "searxng", "url": search.url}})
    asked = []
    fake.responder = web_search_responder(asked)
    out, lines = run_launcher(home, fake, tmp_path, "-p", "When did the iFlow CLI shut down? "
                              "Search the web.", "--allowedTools", "ToolSearch,WebSearch")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "https://news.example.com/iflow-cli-end" in out.stdout, out.stdout
    assert "Did 0 searches" not in out.stdout + out.stderr
    assert search.requests and search.requests[0][2]["q"] == "when did iflow cli shut down"
    assert any("web_search (searxng)" in line and "class=auxiliary" in line for line in lines), \
        lines


# --- fetching pages for a client ------------------------------------------------------------------

class FakePages(FakeServer):
    """Pages: /page (HTML), /text, /pdf, /hop (a redirect to ``hop_to``)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakePagesHandler)
        self.hop_to, self.hosts = None, []
        self.serve_in_thread()


class FakePagesHandler(QuietHandler):
    def do_GET(self):
        self.server.hosts.append(self.headers.get("Host"))
        if self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", self.server.hop_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        kind, body = {"/page": ("text/html; charset=utf-8", b"<html><head><title>Notice</title>"
                                b"<script>var x = 1;</script></head><body><p>iFlow CLI ended"
                                b" on 2026-04-17.</p></body></html>"),
                      "/text": ("text/plain", b"plain words"),
                      "/pdf": ("application/pdf", b"%PDF-1.4")}.get(self.path,
                                                                   ("text/plain", b""))
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def pages():
    yield from serving(FakePages())


def test_fetch_checks_every_address_and_every_redirect(home, pages):
    config = make_config(home)
    port = pages.server_address[1]
    names = {"page.test": "127.0.0.1", "meta.test": "169.254.169.254", "lan.test": "10.1.2.3",
             "mapped.test": "::ffff:127.0.0.1"}

    def resolve(host, port_, *_rest):
        return [(2, 1, 6, "", (names[host], port_))]
    loopback_only = lambda address: address == "127.0.0.1"  # noqa: E731 - the fake's, here
    url, kind, text = ip.fetch_page("http://page.test:%d/page" % port, config, resolve,
                                    loopback_only)
    assert kind == "text/html" and text.startswith("Notice") and "iFlow CLI ended" in text
    assert "var x" not in text and pages.hosts[-1] == "page.test:%d" % port  # Host kept
    for target in ("http://meta.test/latest/meta-data", "http://lan.test/",
                   "http://mapped.test:%d/page" % port):
        with pytest.raises(ip.FetchRefused, match="private, loopback or link-local"):
            ip.fetch_page(target, config, resolve)  # the real policy
    pages.hop_to = "http://meta.test/latest/meta-data"
    with pytest.raises(ip.FetchRefused, match="meta.test resolves to a private"):
        ip.fetch_page("http://page.test:%d/hop" % port, config, resolve, loopback_only)
    with pytest.raises(ip.FetchRefused, match="unsupported content type"):
        ip.fetch_page("http://page.test:%d/pdf" % port, config, resolve, loopback_only)
    for target in ("file:///etc/passwd", "http://[::1/x", "http://page.test:99999/"):
        with pytest.raises(ip.FetchRefused, match="only http and https"):  # (urlsplit raised)
            ip.fetch_page(target, config, resolve)
    assert not ip.domain_allowed("http://[::1/x", ("page.test",))
    assert ip.public_address("93.184.216.34") and not ip.public_address("::1") and \
        not ip.public_address("fe80::1%eth0") and not ip.public_address("0.0.0.0")
    # IPv4 carried in IPv6 is judged as the IPv4 it is delivered to, the same on every Python
    # (6to4 and site-local passed on 3.8-3.12; NAT64's 64:ff9b::/96 passes on 3.13)
    for carried in ("::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "64:ff9b:1::7f00:1",
                    "2002:7f00:1::1", "2002:a9fe:a9fe::", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                    "fec0::1", "192.0.0.8", "100.64.0.1", "198.18.0.1", "::127.0.0.1"):
        assert not ip.public_address(carried), carried
    for public in ("::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111"):
        assert ip.public_address(public), public


def test_web_fetch_tool_refuses_private_pages(home, pages):
    body = {"model": "claude-haiku-4-5", "max_tokens": 100, "tools": [
        {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 1}]}
    with running(make_config(home)) as server:
        for url in ("http://127.0.0.1:%d/page" % pages.server_address[1],
                    "http://10.0.0.1/", "http://169.254.169.254/latest/meta-data",
                    "http://[::1/x", "http://host.test:99999/"):  # (the last two: once a 500)
            asked = dict(body, messages=[{"role": "user", "content": "Fetch %s please" % url}])
            status, _h, data = request(server, "POST", "/v1/messages", asked, HEADERS)
            message = json.loads(data)
            assert status == 200 and message["content"][0]["input"] == {"url": url}
            assert message["content"][1]["content"] == {"type": "web_fetch_tool_error",
                                                        "error_code": "url_not_accessible"}
        status, _h, data = request(server, "POST", "/v1/messages", dict(
            body, stream=True, messages=[{"role": "user", "content": "no url here"}]), HEADERS)
        blocks = check_anthropic_grammar(parse_sse(data))
        assert blocks[1]["content"]["type"] == "web_fetch_tool_error" and \
            "names no http" in blocks[2]["text"]
    assert pages.hosts == []  # nothing was fetched from the private addresses


@pytest.mark.parametrize("stream", [False, True])
def test_openai_web_search_options_search_first_and_cite(home, fake, search, stream):
    add_key_account(home, KEYS[0])
    fake.responder = lambda b: {"content": "It ended, see https://news.example.com/iflow-cli-end"
                                           " for details."}
    body = {"model": "glm-4.6", "stream": stream, "web_search_options": {},
            "messages": [{"role": "user", "content": "When did the iFlow CLI end?"}]}
    config = make_config(home, fake, web_search={"backend": "searxng", "url": search.url})
    with running(config) as server:
        status, _h, data = request(server, "POST", "/v1/chat/completions", body,
                                   {"Content-Type": "application/json"})
    assert status == 200, data[:300]
    sent = fake.chat_requests()[-1][2]
    assert "web_search_options" not in sent and sent["messages"][-2]["role"] == "system"
    assert "https://news.example.com/iflow-cli-end" in sent["messages"][-2]["content"]
    assert search.requests[0][2]["q"] == "When did the iFlow CLI end?"
    if stream:
        chunks = [json.loads(p) for p in (e.split("data: ", 1)[1] for e in data.decode().split(
            "\n\n") if e.startswith("data: ")) if p != "[DONE]"]
        annotations = [a for c in chunks for ch in c.get("choices") or ()
                       for a in ch["delta"].get("annotations") or ()]
    else:
        annotations = json.loads(data)["choices"][0]["message"]["annotations"]
    assert annotations == [{"type": "url_citation", "url_citation": {
        "start_index": 14, "end_index": 14 + len(RESULTS[0][1]), "url": RESULTS[0][1],
        "title": RESULTS[0][0]}}]


def searching_responder(prefix):
    """A model that searches for "iflow cli end" first, then answers ``prefix`` and the first
    result's URL from what the search gave it."""
    def respond(body):
        results = [m for m in body["messages"] if m["role"] == "tool"]
        if not results:
            return {"content": "", "tool_call_chunks": [
                {"index": 0, "id": "call_s1", "type": "function", "function": {
                    "name": "web_search", "arguments": '{"query": "iflow cli end"}'}}]}
        return {"content": prefix + results[-1]["content"].split(" — ")[1]}
    return respond


@pytest.mark.parametrize("stream", [True, False])
def test_codex_web_search_tool_is_run_by_the_proxy(home, fake, search, stream):
    """Codex offers a hosted web_search tool: the model gets it as a function, its call is run
    here (a web_search_call item with the query and sources), and the model is asked again
    with the results, in the same response."""
    from test_responses import check_responses_grammar, responses_events

    respond = searching_responder("Per ")
    add_key_account(home, KEYS[0])
    fake.responder = respond
    body = dict(fixture("codex-0.171.0/01-first-turn.json")["body"], model="glm-4.6",
                stream=stream)
    config = make_config(home, fake, web_search={"backend": "searxng", "url": search.url})
    with running(config) as server:
        status, _h, data = request(server, "POST", "/v1/responses", body,
                                   {"Content-Type": "application/json"})
        rows = server.chat.usage.day_rows()
    assert status == 200, data[:300]
    response = check_responses_grammar(responses_events(data)) if stream else json.loads(data)
    assert [i["type"] for i in response["output"]] == ["web_search_call", "message"]
    call = response["output"][0]
    assert call["status"] == "completed" and call["action"]["query"] == "iflow cli end"
    assert [s["url"] for s in call["action"]["sources"]] == [r[1] for r in RESULTS]
    assert response["output"][1]["content"][0]["text"] == "Per " + RESULTS[0][1]
    first, second = [r[2] for r in fake.chat_requests()]
    assert "web_search" in [t["function"]["name"] for t in first["tools"]]
    assert second["messages"][-1]["role"] == "tool" and RESULTS[0][1] in \
        second["messages"][-1]["content"]
    assert ("web-search", "searxng", 1) in [(r["account"], r["model"], r["requests"])
                                            for r in rows]


def test_real_codex_searches_the_web_through_the_proxy(home, fake, search, tmp_path):
    from test_responses import run_codex

    respond = searching_responder("Found: ")
    add_key_account(home, KEYS[0])
    write_config(home, {"web_search": {"backend": "searxng", "url": search.url}})
    fake.responder = respond
    out, events, lines = run_codex(home, {"IFLOW_API_BASE": fake.url + "/v1"}, tmp_path,
                                   "exec", "--skip-git-repo-check", "--json",
                                   "When did the iFlow CLI end? Search the web.")
    assert out.returncode == 0, out.stdout + out.stderr
    done = [e["item"] for e in events if e["type"] == "item.completed"]
    assert any(i["type"] == "web_search" and "iflow cli end" in json.dumps(i) for i in done), done
    assert any(i["type"] == "agent_message" and RESULTS[0][1] in i["text"] for i in done), done
    assert search.requests and search.requests[0][2]["q"] == "iflow cli end"


@pytest.mark.parametrize("provider, base, asked", [
    ("deepseek", "", {"query": "when did iflow cli shut down", "count": 5}),
    ("zhipu", "/api/paas/v4", {"search_query": "when did iflow cli shut down",
                               "search_engine": "search_std", "count": 5}),
    ("minimax", "/v1", {"q": "when did iflow cli shut down"}),
])
def test_a_providers_own_search_with_the_accounts_key(home, search, provider, base, asked):
    """backend auto with nothing else set up: the provider's own search API answers, with the
    key of the account (DeepSeek's /v1/tools/search, Zhipu's /web_search, MiniMax's Coding
    Plan search)."""
    from test_iflow_proxy import add_provider_account
    if provider == "minimax":  # a key its search refuses: the reason, in the error form
        add_provider_account(home, "sk-wrong-1", provider, "openai", search.url + base)
        body, headers = side_request(False)
        with running(make_config(home)) as server:
            status, _h, data = request(server, "POST", "/v1/messages", body, headers)
        message = json.loads(data)
        assert status == 200 and message["content"][1]["content"]["error_code"] == \
            "unavailable" and "login fail" in message["content"][2]["text"], message
        ip.AccountRegistry(home).remove()  # (every account)
    add_provider_account(home, "sk-provider-1", provider, "openai", search.url + base)
    body, headers = side_request(False)
    with running(make_config(home)) as server:
        status, _h, data = request(server, "POST", "/v1/messages", body, headers)
        rows = server.chat.usage.day_rows()
    message = json.loads(data)
    assert status == 200 and [r["url"] for r in message["content"][1]["content"]] == \
        [r[1] for r in RESULTS], message
    assert search.requests[-1][3] == asked and "sk-provider-1" not in json.dumps(message)
    assert provider in [r["model"] for r in rows]


# --- server tools beside the client's own tools ---------------------------------------------------

WEATHER = {"name": "weather", "description": "Weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SEARCH_TOOL = {"type": "web_search_20250305", "name": "web_search", "max_uses": 8}


def main_loop_request(stream, *tools, messages=None):
    return {"model": "glm-4.6", "max_tokens": 2000, "stream": stream,
            "tools": [WEATHER] + list(tools), "messages": messages or [
                {"role": "user", "content": "When did the iFlow CLI end?"}]}


def tool_results(body):
    """The tool results an upstream request carries, whichever protocol it speaks."""
    if "system" in body or any(isinstance(m.get("content"), list) and any(
            b.get("type") == "tool_result" for b in m["content"]) for m in body["messages"]):
        return [b["content"] for m in body["messages"] if isinstance(m.get("content"), list)
                for b in m["content"] if b.get("type") == "tool_result"]
    return [m["content"] for m in body["messages"] if m["role"] == "tool"]


def server_tool_model(protocol, plan):
    """A model for either protocol that follows ``plan(results so far)``: a (name, input) call to
    make, or the text to answer."""
    def respond(body):
        step = plan(tool_results(body))
        if isinstance(step, str):
            return {"text": step} if protocol == "anthropic" else {"content": step}
        name, arguments = step
        if protocol == "anthropic":
            return {"text": "Let me look.", "tool": {"name": name, "input": arguments}}
        return {"content": "Let me look.", "tool_call_chunks": [
            {"index": 0, "id": "call_%d" % len(tool_results(body)), "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments)}}]}
    return respond


def served_answer(status, data, stream):
    assert status == 200, data[:400]
    if stream:
        events = parse_sse(data)
        blocks = check_anthropic_grammar(events)
        assert [n for n, _ in events][-2:] == ["message_delta", "message_stop"]
        return blocks, events[-2][1]["delta"]["stop_reason"], events[-2][1]["usage"]
    message = json.loads(data)
    return message["content"], message["stop_reason"], message["usage"]


@pytest.fixture(params=["openai", "anthropic"])
def upstream(request, home, fake, anthropic_fake):
    """An account of either protocol serving glm-4.6 (the Anthropic one a Zhipu endpoint)."""
    from test_iflow_proxy import add_provider_account
    if request.param == "openai":
        add_key_account(home, KEYS[0])
        return "openai", fake
    anthropic_fake.models = ("glm-4.6",)
    add_provider_account(home, "sk-anthropic-1111", "zhipu", "anthropic", anthropic_fake.url)
    return "anthropic", anthropic_fake


@pytest.fixture
def anthropic_fake():
    from test_iflow_proxy import FakeAnthropic
    yield from serving(FakeAnthropic(auth="Bearer"))


@pytest.mark.parametrize("stream", [False, True])
def test_a_web_search_beside_client_tools_is_run_by_the_proxy(home, upstream, search, stream):
    """A main-loop request offering a client tool and the web_search server tool, to upstreams
    of both protocols with no search of their own: the search goes up as a function, the
    model's call of it is run here (server_tool_use + web_search_tool_result in the answer),
    and the model goes on with the results in the same answer."""
    protocol, model = upstream
    model.responder = server_tool_model(protocol, lambda results: (
        "web_search", {"query": "iflow cli end"}) if not results else
        "It ended, per " + results[-1].split(" — ")[1])
    config = make_config(home, upstream[1] if protocol == "openai" else None,
                         web_search={"backend": "searxng", "url": search.url})
    with running(config) as server:
        status, _h, data = request(server, "POST", "/v1/messages",
                                   main_loop_request(stream, SEARCH_TOOL), HEADERS)
        rows = server.chat.usage.day_rows()
    blocks, stop, usage = served_answer(status, data, stream)
    assert [b["type"] for b in blocks] == ["text", "server_tool_use", "web_search_tool_result",
                                           "text"], blocks
    assert blocks[0]["text"] == "Let me look."
    assert blocks[1]["name"] == "web_search" and blocks[1]["input"] == {
        "query": "iflow cli end"} and blocks[1]["id"].startswith("srvtoolu_")
    assert blocks[2]["tool_use_id"] == blocks[1]["id"]
    assert [r["url"] for r in blocks[2]["content"]] == [r[1] for r in RESULTS]
    assert blocks[3]["text"] == "It ended, per " + RESULTS[0][1]
    assert stop == "end_turn" and usage["server_tool_use"] == {"web_search_requests": 1}
    sent = [r[2] for r in (model.chat_requests() if protocol == "openai" else model.requests)]
    assert len(sent) == 2 and search.requests[0][2]["q"] == "iflow cli end"
    offered = [t.get("function", t) for t in sent[0]["tools"]]
    assert [t["name"] for t in offered] == ["weather", "web_search"]
    assert offered[1]["input_schema" if protocol == "anthropic" else "parameters"][
        "required"] == ["query"]
    assert RESULTS[0][1] in tool_results(sent[1])[-1]
    assert ("web-search", "searxng", 1) in [(r["account"], r["model"], r["requests"])
                                            for r in rows]


def test_max_uses_rounds_and_a_client_tool_in_the_same_turn(home, upstream, search):
    """max_uses 1: the second search is the error form (max_uses_exceeded) and the model goes
    on; a model that never stops searching is cut off after SEARCH_ROUNDS rounds; a turn that
    also calls a client tool ends there (tool_use) with the search shown, and the client's
    next request, holding those blocks, reaches a strict upstream as text."""
    protocol, model = upstream
    config = make_config(home, upstream[1] if protocol == "openai" else None,
                         web_search={"backend": "searxng", "url": search.url})
    sent = (lambda: [r[2] for r in model.chat_requests()]) if protocol == "openai" else \
        (lambda: [r[2] for r in model.requests])
    with running(config) as server:
        model.responder = server_tool_model(protocol, lambda results: (
            "web_search", {"query": "q%d" % len(results)}) if len(results) < 2 else
            "done: " + results[-1][:60])
        status, _h, data = request(server, "POST", "/v1/messages", main_loop_request(
            False, dict(SEARCH_TOOL, max_uses=1)), HEADERS)
        blocks, stop, usage = served_answer(status, data, False)
        errors = [b["content"] for b in blocks if b["type"] == "web_search_tool_result"]
        assert isinstance(errors[0], list) and errors[1] == {
            "type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}
        assert blocks[-1]["text"].startswith("done: The web search could not run") and \
            stop == "end_turn" and len(search.requests) == 1

        before = len(sent())
        model.responder = server_tool_model(protocol, lambda results: (
            "web_search", {"query": "again"}))
        status, _h, data = request(server, "POST", "/v1/messages", main_loop_request(
            True, SEARCH_TOOL), HEADERS)
        blocks, stop, usage = served_answer(status, data, True)
        assert len(sent()) - before == ip.SEARCH_ROUNDS + 1 and stop == "end_turn"
        assert usage["server_tool_use"] == {"web_search_requests": ip.SEARCH_ROUNDS}

        if protocol == "openai":  # one turn calling both tools
            model.responder = lambda body: {"content": "", "tool_call_chunks": [
                {"index": 0, "id": "call_a", "type": "function", "function": {
                    "name": "web_search", "arguments": '{"query": "both"}'}},
                {"index": 1, "id": "call_b", "type": "function", "function": {
                    "name": "weather", "arguments": '{"city": "Oslo"}'}}]} \
                if not tool_results(body) else {"content": "rainy, and " + tool_results(
                    body)[0][:40]}
        else:
            model.responder = lambda body: {"tool": {"name": "weather", "input": {
                "city": "Oslo"}}} if not tool_results(body) else {
                "text": "rainy, and " + tool_results(body)[0][:40]}
        before = len(sent())
        status, _h, data = request(server, "POST", "/v1/messages", main_loop_request(
            False, SEARCH_TOOL), HEADERS)
        blocks, stop, usage = served_answer(status, data, False)
        assert stop == "tool_use" and len(sent()) - before == 1
        calls = [b for b in blocks if b["type"] == "tool_use"]
        assert [c["name"] for c in calls] == ["weather"]
        assert ("server_tool_use" in [b["type"] for b in blocks]) is (protocol == "openai")
        call = calls[0]
        history = [{"role": "user", "content": "When did the iFlow CLI end?"},
                   {"role": "assistant", "content": blocks},
                   {"role": "user", "content": [{"type": "tool_result",
                                                 "tool_use_id": call["id"], "content": "rain"}]}]
        if protocol == "anthropic":  # a history holding search blocks, as any client keeps it
            history[1]["content"] = [
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
                 "input": {"query": "x"}},
                {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
                    {"type": "web_search_result", "url": RESULTS[0][1], "title": "T",
                     "encrypted_content": ""}]}] + blocks
        status, _h, data = request(server, "POST", "/v1/messages", main_loop_request(
            False, SEARCH_TOOL, messages=history), HEADERS)
        blocks, stop, _usage = served_answer(status, data, False)
        assert stop == "end_turn" and blocks[-1]["text"].startswith("rainy"), blocks
        last = sent()[-1]
        assert RESULTS[0][1] in json.dumps(last["messages"][1])  # the search, as text
        assert "server_tool_use" not in json.dumps(last)


def test_a_model_asking_for_many_searches_at_once_gets_a_bounded_number(home, fake, search):
    """25 search calls in one turn and no max_uses: ServerTools.MAX_CALLS of them run, the
    rest get the error form, and the model goes on."""
    add_key_account(home, KEYS[0])
    fake.responder = lambda body: {"content": "", "tool_call_chunks": [
        {"index": n, "id": "call_%d" % n, "type": "function", "function": {
            "name": "web_search", "arguments": json.dumps({"query": "q%d" % n})}}
        for n in range(25)]} if not tool_results(body) else {"content": "enough"}
    config = make_config(home, fake, web_search={"backend": "searxng", "url": search.url})
    with running(config) as server:
        status, _h, data = request(server, "POST", "/v1/messages", main_loop_request(
            False, {"type": "web_search_20250305", "name": "web_search"}), HEADERS)
    blocks, stop, usage = served_answer(status, data, False)
    found = [b["content"] for b in blocks if b["type"] == "web_search_tool_result"]
    assert len(found) == 25 and len(search.requests) == ip.ServerTools.MAX_CALLS
    assert found[-1] == {"type": "web_search_tool_result_error",
                         "error_code": "max_uses_exceeded"}
    assert blocks[-1]["text"] == "enough" and stop == "end_turn"
    assert usage["server_tool_use"] == {"web_search_requests": ip.ServerTools.MAX_CALLS}


def test_a_web_fetch_beside_client_tools_refuses_private_pages(home, fake, pages):
    """A web_fetch server tool beside a client tool: the model's fetch of a loopback page is
    refused here (the error form) and the model goes on; nothing is fetched."""
    add_key_account(home, KEYS[0])
    url = "http://127.0.0.1:%d/page" % pages.server_address[1]
    fake.responder = server_tool_model("openai", lambda results: (
        "web_fetch", {"url": url}) if not results else "could not: " + results[-1])
    with running(make_config(home, fake)) as server:
        status, _h, data = request(server, "POST", "/v1/messages", main_loop_request(
            True, {"type": "web_fetch_20250910", "name": "web_fetch"}), HEADERS)
    blocks, stop, usage = served_answer(status, data, True)
    assert [b["type"] for b in blocks] == ["text", "server_tool_use", "web_fetch_tool_result",
                                           "text"]
    assert blocks[2]["content"] == {"type": "web_fetch_tool_error",
                                    "error_code": "url_not_accessible"}
    assert blocks[3]["text"].startswith("could not: The page could not be fetched")
    assert usage["server_tool_use"] == {"web_fetch_requests": 0} and pages.hosts == []  # (refused)


def test_deepseeks_anthropic_endpoint_runs_the_search_itself(home, search):
    """backend auto, nothing set up here, a DeepSeek Anthropic account: the web_search tool
    goes upstream as it is (DeepSeek runs it), in the side request and beside other tools."""
    from test_iflow_proxy import FakeAnthropic, add_provider_account
    deepseek = FakeAnthropic()
    deepseek.server_tools = ("web_search_20250305",)
    try:
        add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic", deepseek.url)
        with running(make_config(home)) as server:
            body, headers = side_request(False)
            status, _h, data = request(server, "POST", "/v1/messages",
                                       dict(body, model="deepseek-v4-flash"), headers)
            assert status == 200, data[:300]
            status, _h, data = request(server, "POST", "/v1/messages", dict(main_loop_request(
                False, SEARCH_TOOL), model="deepseek-v4-flash"), HEADERS)
            assert status == 200, data[:300]
        kinds = [[t.get("type") for t in r[2]["tools"]] for r in deepseek.requests]
        # (the side request's max_tokens 32000 is refused once: over the fake's 8192)
        assert kinds == [["web_search_20250305"]] * 2 + [[None, "web_search_20250305"]]
        assert search.requests == []
    finally:
        deepseek.stop()


def test_the_anthropic_sdk_reads_a_search_run_beside_its_tools(home, fake, search):
    """The newest Anthropic SDK, streamed and not, offering a tool of its own and the web
    search tool: the answer it parses holds the server_tool_use, the results and the text."""
    from test_iflow_proxy import sdk
    anthropic = sdk("anthropic")
    add_key_account(home, KEYS[0])
    fake.responder = server_tool_model("openai", lambda results: (
        "web_search", {"query": "iflow cli end"}) if not results else
        "It ended, per " + results[-1].split(" — ")[1])
    config = make_config(home, fake, web_search={"backend": "searxng", "url": search.url})
    with running(config) as server:
        client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
        args = dict(model="glm-4.6", max_tokens=500, tools=[WEATHER, SEARCH_TOOL], messages=[
            {"role": "user", "content": "When did the iFlow CLI end?"}])
        message = client.messages.create(**args)
        with client.messages.stream(**args) as stream:
            streamed = stream.get_final_message()
    for answer in (message, streamed):
        kinds = [b.type for b in answer.content]
        assert kinds == ["text", "server_tool_use", "web_search_tool_result", "text"], kinds
        assert answer.content[1].input == {"query": "iflow cli end"}
        assert [r.url for r in answer.content[2].content] == [r[1] for r in RESULTS]
        assert answer.content[3].text == "It ended, per " + RESULTS[0][1]
        assert answer.usage.server_tool_use.web_search_requests == 1
