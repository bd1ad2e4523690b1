"""Model tables that stay current (issue 26): config ``models`` over the built-in table for every
use, discovery from the providers' /models, `providers --check`, and cost priced with cache hits.
"""

import calendar
import json

import pytest

import iflow_proxy as ip
from test_iflow_proxy import (CHAT, KEYS, FakeIFlow, add_key_account,  # noqa: F401
                              add_provider_account, anthropic_fake, fake, home, make_config,
                              post_json, request, run_cli, running, serving, write_config)

LOCAL = {"gemma-3-270m": {"window": 8192, "output": 256, "aliases": ["gemma"]},
         "my-local-*": {"window": 32768, "output": 4096, "thinking": "enable_thinking",
                        "vision": True}}


# --- pure parts ----------------------------------------------------------------------------------

def test_a_models_entry_overrides_and_extends_the_table():
    assert ip.model_spec("gemma-3-270m", "", LOCAL) == ip.Model(8192, 256, None, False)
    assert ip.model_spec("GEMMA-3-270M", "", LOCAL).window == 8192  # (names: any case)
    assert ip.model_spec("my-local-coder", "", LOCAL) == ip.Model(32768, 4096, "qwen", True)
    assert ip.model_spec("my-local-coder") is ip.UNKNOWN_MODEL
    glm = ip.model_spec("glm-4.6", "zhipu", {"glm-4.6": {"output": 1000}})
    assert glm.window == 200000 and glm.output == 1000 and glm.thinking == "glm"  # the rest kept
    assert ip.model_source("glm-4.6", "zhipu", {"glm-4.6": {"output": 1}}) == "config"
    assert ip.model_source("glm-4.6", "zhipu", {"glm-4.6": {"prices": {
        "input": 1, "output": 2}}}) == "table"  # (a price alone changes no limit)
    assert ip.model_source("other") == "default"
    assert ip.model_spec("other", "", {"other": {"prices": {"input": 1, "output": 2}}}) is \
        ip.UNKNOWN_MODEL  # a price alone: still unknown (iFlow's family limits, discovery)
    reported = {"vendor/new": ip.Model(65536, 4096, None, False)}
    assert ip.model_source("vendor/new", "", None, reported) == "provider list"
    assert ip.window_of("gemma-3-270m", LOCAL) == 8192 and ip.window_of("nothing") is None


@pytest.mark.parametrize("bad, fragment", [
    ({"m": {"window": 0}}, "window must be a whole number"),
    ({"m": {"window": "1M"}}, "window must be a whole number"),
    ({"m": {"bogus": 1}}, "not 'bogus'"),
    ({"m": {"vision": "yes"}}, "vision must be true or false"),
    ({"m": {"thinking": "always"}}, "thinking must be one of"),
    ({"m": {"thinking": ["type"]}}, "thinking must be one of"),
    ({"m": {"window": 1 << 31}}, "window must be a whole number of tokens from 1 to"),
    ({"m\x1b[31m": {"window": 5}}, "printable"),
    ({"m": {"aliases": ["two\nlines"]}}, "aliases must be a list of model names"),
    ({"m": {"aliases": ["x" * 257]}}, "aliases must be a list of model names"),
    ({"m": {"prices": {"input": 1}}}, "prices must hold"),
    ({"m": {"prices": {"input": 1, "output": 2, "currency": "EUR"}}}, "currency"),
    ({"m": {"prices": {"input": 1, "output": 2, "periods": [{"from": "25:00", "to": "02:00"}]}}},
     "periods must be"),
    ({"m": {"prices": {"input": 1, "output": 2, "periods": [
        {"from": "01:00", "to": "02:00", "days": ["someday"]}]}}}, "periods must be"),
    ({"m": {"prices": {"input": 1, "output": 2, "periods": [
        {"from": "01:00", "to": "02:00", "days": [["mon"]]}]}}}, "periods must be"),
    ({"m-*": {"aliases": ["x"]}}, "aliases need an exact model name"),
    ({"a": {"aliases": ["x"]}, "b": {"aliases": ["X"]}}, "alias 'x' is given twice"),
    ({"m": []}, "must be an object"),
])
def test_the_models_setting_is_checked(home, bad, fragment):
    write_config(home, {"models": bad})
    with pytest.raises(ip.ConfigError, match=fragment):
        ip.load_config(home, {}, {})
    write_config(home, {"models": LOCAL, "prices": {"glm-4.6": {
        "input": 1, "output": 2, "cache_read": 0.1, "currency": "CNY"}}})
    assert ip.load_config(home, {}, {}).models == LOCAL


def test_cost_prices_cache_reads_and_writes_and_the_time_of_day():
    price = {"input": 2.0, "output": 8.0, "cache_read": 0.2, "cache_write": 2.5, "periods": [
        {"from": "22:00", "to": "02:00", "input": 1.0, "output": 4.0, "cache_read": 0.1},
        {"from": "09:00", "to": "10:00", "days": ["sat"], "output": 0}]}
    noon = calendar.timegm((2026, 12, 2, 12, 0, 0))           # a Wednesday
    night = calendar.timegm((2026, 12, 2, 23, 30, 0))          # across midnight: the period
    saturday = calendar.timegm((2026, 12, 5, 9, 30, 0))
    openai = {"prompt_tokens": 1000000, "completion_tokens": 100000,
              "prompt_tokens_details": {"cached_tokens": 600000}}
    deepseek = {"prompt_tokens": 1000000, "completion_tokens": 100000,
                "prompt_cache_hit_tokens": 600000, "prompt_cache_miss_tokens": 400000}
    for usage in (openai, deepseek):  # 0.4M fresh x 2 + 0.6M read x 0.2 + 0.1M out x 8
        assert ip.usage_cost(usage, price, noon) == pytest.approx(0.8 + 0.12 + 0.8)
        assert ip.usage_cost(usage, price, night) == pytest.approx(0.4 + 0.06 + 0.4)
        assert ip.usage_cost(usage, price, saturday) == pytest.approx(0.8 + 0.12)
    anthropic = ip.openai_usage({"input_tokens": 100000, "output_tokens": 0,
                                 "cache_read_input_tokens": 600000,
                                 "cache_creation_input_tokens": 300000})
    assert ip.cache_tokens(anthropic) == (600000, 300000)
    assert ip.usage_cost(anthropic, price, noon) == pytest.approx(0.2 + 0.12 + 0.75)
    assert ip.usage_cost(anthropic, {"input": 2.0, "output": 8.0}, noon) == pytest.approx(2.0)
    peak = ip.PROVIDER_PRICES["deepseek"]["deepseek-flash"]
    monday_peak, monday_off = (calendar.timegm((2026, 11, 30, h, 0, 0)) for h in (2, 12))
    assert ip.price_rates(peak, monday_peak)["input"] == 2 * ip.price_rates(
        peak, monday_off)["input"]


def test_listed_models_report_their_limits_and_prices():
    openrouter = {"id": "vendor/model-x", "context_length": 262144, "architecture": {
        "input_modalities": ["text", "image"]}, "top_provider": {
        "context_length": 262144, "max_completion_tokens": 65536}, "pricing": {
        "prompt": "0.0000012", "completion": "0.000004", "input_cache_read": "0.0000003"}}
    spec, price = ip.listed_model(openrouter)
    assert spec == ip.Model(262144, 65536, None, True)
    assert price == {"input": 1.2, "output": 4.0, "cache_read": 0.3, "currency": "USD"}
    assert ip.listed_model({"id": "local", "max_model_len": 32768})[0] == \
        ip.Model(32768, 8192, None, False)  # vLLM
    assert ip.listed_model({"id": "plain", "object": "model"}) == (None, None)
    assert ip.listed_model({"id": "bad", "pricing": {"prompt": "inf", "completion": "nan"}}) \
        == (None, None)  # a list's nonsense never becomes a price


# --- over real sockets ---------------------------------------------------------------------------

def test_a_custom_models_limits_reach_the_clamp_the_preflight_and_the_lists(home, fake):
    """A local model the table doesn't know: its entry's output clamps max_tokens, its window
    answers a far-too-long prompt at once, its alias resolves, /v1/models lists both with the
    window, and `models` says where each figure comes from."""
    add_key_account(home, KEYS[0])
    fake.models.append("gemma-3-270m")
    write_config(home, {"models": LOCAL})
    config = ip.load_config(home, {}, {"IFLOW_API_BASE": fake.url + "/v1"})
    with running(config) as server:
        status, _h, answer = post_json(server, "/v1/chat/completions",
                                       dict(CHAT, model="gemma", max_tokens=99999))
        sent = fake.chat_requests()[-1][2]
        assert status == 200 and sent["model"] == "gemma-3-270m" and sent["max_tokens"] == 256
        asked = len(fake.chat_requests())
        huge = dict(CHAT, model="gemma-3-270m",
                    messages=[{"role": "user", "content": "word " * 20000}])
        status, _h, answer = post_json(server, "/v1/chat/completions", huge)
        assert status == 400 and "8192-token window" in answer["error"]["message"], answer
        assert len(fake.chat_requests()) == asked  # not sent upstream
        listed = {m["id"]: m for m in json.loads(request(server, "GET", "/v1/models")[2])["data"]}
        assert listed["gemma-3-270m"]["context_length"] == 8192 and "gemma" in listed
        assert listed["gemma-3-270m"]["max_completion_tokens"] == 256
        status, _h, data = request(server, "GET", "/v1/models", None,
                                   {"anthropic-version": "2023-06-01"})
        described = {m["id"]: m["description"] for m in json.loads(data)["data"]}
        assert "8192-token context window" in described["gemma-3-270m"]
    code, out, _err = run_cli("models", "--json", home=home,
                              env={"IFLOW_API_BASE": fake.url + "/v1"})
    rows = {r["id"]: r for r in json.loads(out)}
    assert rows["gemma-3-270m"]["source"] == "config" and rows["gemma-3-270m"]["window"] == 8192
    assert rows["glm-4.6"]["source"] == "table"


def test_launchers_take_a_custom_models_window_and_output(home):
    config = ip.load_config(home, {}, {}).replace(models=LOCAL)
    env = ip.claude_env("http://127.0.0.1:1", "k", config, "gemma-3-270m")
    assert env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == "8192"
    assert env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "256"
    assert int(env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"]) < 8192
    assert ip.codex_models(config, "my-local-coder")[0][1].window == 32768
    assert ip.claude_env("http://127.0.0.1:1", "k", ip.load_config(home, {}, {}), "glm-4.6")[
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "32000"  # (Claude Code's own default: not raised)


def test_a_custom_models_thinking_switch_reaches_a_plain_upstream(home):
    upstream = FakeIFlow(signing=False)
    upstream.models.append("my-local-coder")
    try:
        add_provider_account(home, KEYS[0], "", "openai", upstream.url + "/v1")
        write_config(home, {"models": LOCAL})
        with running(ip.load_config(home, {}, {})) as server:
            status, _h, _a = post_json(server, "/v1/messages", {
                "model": "my-local-coder", "max_tokens": 2000, "thinking": {
                    "type": "enabled", "budget_tokens": 1024},
                "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and upstream.chat_requests()[-1][2]["enable_thinking"] is True
    finally:
        upstream.stop()



def test_openrouter_switches_thinking_its_own_way_and_its_list_price_wins(home):
    """OpenRouter takes {"reasoning": {"enabled": ...}} (a preset model's switch, and config's
    "reasoning"); a price its /models list names wins over the table's."""
    upstream = FakeIFlow(signing=False)
    upstream.models = ["anthropic/claude-sonnet-5.5", "vendor/mine",
                       {"id": "z-ai/glm-5.3", "pricing": {"prompt": "0.000003",
                                                          "completion": "0.000009"}}]
    try:
        add_provider_account(home, KEYS[0], "openrouter", "openai", upstream.url + "/v1",
                             nickname="or")
        write_config(home, {"models": {"vendor/*": {"thinking": "reasoning"}}})
        with running(ip.load_config(home, {}, {})) as server:
            for model, on in (("anthropic/claude-sonnet-5.5", True), ("vendor/mine", False)):
                thinking = {"type": "enabled", "budget_tokens": 1024} if on else {
                    "type": "disabled"}
                status, _h, _a = post_json(server, "/v1/messages", {
                    "model": model, "max_tokens": 2000, "thinking": thinking,
                    "messages": [{"role": "user", "content": "hi"}]})
                sent = upstream.chat_requests()[-1][2]
                assert status == 200 and sent["reasoning"] == {"enabled": on}, sent
                assert "thinking" not in sent and "enable_thinking" not in sent
            assert request(server, "GET", "/v1/models")[0] == 200  # (its list read)
            assert post_json(server, "/v1/chat/completions",
                             dict(CHAT, model="z-ai/glm-5.3"))[0] == 200
            usage = server.chat.usage.day_rows()
        assert ip.PROVIDER_PRICES["openrouter"]["z-ai/glm-5.3"]["input"] == 1.40  # the table's
        row = next(r for r in usage if r["model"] == "z-ai/glm-5.3")
        assert row["price_source"] == "provider list"  # 11 prompt, 5 completion tokens
        assert row["cost"] == pytest.approx((11 * 3 + 5 * 9) / 1e6)
    finally:
        upstream.stop()

OPENROUTER_LIST = [
    {"id": "anthropic/claude-opus-4.5", "context_length": 200000},
    {"id": "vendor/fresh-model", "context_length": 524288, "top_provider": {
        "max_completion_tokens": 32768}, "pricing": {"prompt": "0.000002",
                                                     "completion": "0.000006"}},
    {"id": "vendor/quiet-model", "object": "model"}]


def test_discovery_serves_and_shows_what_the_providers_list(home):
    """A provider lists models no table knows: they are served and shown with the limits
    (and the price) the list reports, or the conservative default and a line saying so."""
    upstream = FakeIFlow(signing=False)
    upstream.models = OPENROUTER_LIST
    try:
        add_provider_account(home, KEYS[0], "openrouter", "openai", upstream.url + "/v1",
                             nickname="or")
        code, out, _err = run_cli("models", home=home)
        assert code == 0, out
        line = next(l for l in out.splitlines() if l.startswith("vendor/fresh-model"))
        assert "524K" in line and "33K" in line and "provider list" in line
        assert "vendor/quiet-model" in out and "1 model(s) no table or list gives limits" in out
        with running(ip.load_config(home, {}, {})) as server:  # (its list read on first use)
            status, _h, _a = post_json(server, "/v1/chat/completions",
                                       dict(CHAT, model="vendor/fresh-model", max_tokens=99999))
            assert status == 200 and upstream.chat_requests()[-1][2]["max_tokens"] == 32768
            listed = json.loads(request(server, "GET", "/v1/models")[2])["data"]
            assert "vendor/fresh-model" in [m["id"] for m in listed]
            usage = server.chat.usage.day_rows()
        row = next(r for r in usage if r["model"] == "vendor/fresh-model")
        # the fake answers 11 prompt and 5 completion tokens: $2 and $6 per million
        assert row["cost"] == pytest.approx((11 * 2 + 5 * 6) / 1e6)
        assert row["price_source"] == "provider list" and row["currency"] == "USD"
    finally:
        upstream.stop()


def test_a_list_that_hangs_delays_a_request_only_so_long(home, monkeypatch):
    """The first request for a model no table knows reads the account's /models: one that
    does not answer is given up after MODELS_LIST_TIMEOUT (not first_byte_timeout's minutes),
    the request goes on with the default limits, and the list is not asked again at once."""
    import threading
    monkeypatch.setattr(ip, "MODELS_LIST_TIMEOUT", 0.5)
    upstream = FakeIFlow(signing=False)
    upstream.models.append("vendor/fresh-model")
    upstream.models_hold = threading.Event()
    try:
        add_provider_account(home, KEYS[0], "", "openai", upstream.url + "/v1")
        with running(ip.load_config(home, {}, {})) as server:  # (first_byte_timeout: 300 s)
            for _ in range(2):
                status, _h, _a = post_json(server, "/v1/chat/completions", dict(
                    CHAT, model="vendor/fresh-model", max_tokens=99999))
                assert status == 200
                assert upstream.chat_requests()[-1][2]["max_tokens"] == ip.UNKNOWN_MODEL.output
        assert [r[0] for r in upstream.requests].count("/v1/models") == 1
    finally:
        upstream.models_hold.set()
        upstream.stop()


def test_providers_check_compares_the_table_with_each_accounts_list(home):
    upstream = FakeIFlow(signing=False)
    upstream.models = list(ip.PROVIDERS["moonshot"].models)
    try:
        add_provider_account(home, KEYS[0], "moonshot", "openai", upstream.url + "/v1",
                             nickname="kimi")
        code, out, _err = run_cli("providers", "--check", home=home)
        assert code == 0 and "the table and the list agree" in out, out
        upstream.models = ["kimi-k3", "kimi-k3.1-pro", "kimi-k3.1-pro-highspeed", "kimi-k3.2-code",
                           "kimi-k3.2-pro"]
        code, out, _err = run_cli("providers", "--check", home=home)
        assert code == 1, out
        assert "no longer listed: kimi-k2.6" in out and \
            "not in the table: kimi-k3.2-code, kimi-k3.2-pro" in out
        code, out, _err = run_cli("providers", "--check", "--json", home=home)
        assert code == 1 and json.loads(out) == [{"provider": "moonshot", "account": "kimi",
                                                  "gone": ["kimi-k2.6"],
                                                  "new": ["kimi-k3.2-code", "kimi-k3.2-pro"],
                                                  "listed": 5}]
        upstream.models_endpoint = False
        code, out, _err = run_cli("providers", "--check", home=home)
        assert code == 1 and "could not be read" in out
        code, out, _err = run_cli("providers", "--check", "--json", home=home)
        assert code == 1 and "could not be read" in json.loads(out)[0]["error"]  # still JSON
    finally:
        upstream.stop()
    code, out, err = run_cli("providers", "--check", home=home + "/none")
    assert code == 2 and "no usable account" in err


def test_cost_with_cache_hits_per_model_account_and_client_key(home, anthropic_fake):
    """An Anthropic-protocol DeepSeek account reports cache reads: the cost uses the table's
    cache-hit price, is kept per model, account and client key, and the management API and
    /status show it with where the price came from; a config price wins over the table."""
    from test_iflow_proxy import manage
    add_provider_account(home, "sk-anthropic-1111", "deepseek", "anthropic", anthropic_fake.url,
                         nickname="ds")
    write_config(home, {"management_key": "mk-secret-123", "client_keys": [
        {"name": "alice", "key": "ck-alice-123456"}, {"name": "bob", "key": "ck-bob-1234567"}]})
    body = {"model": "deepseek-v4-pro", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}]}
    with running(ip.load_config(home, {}, {})) as server:
        clock = server.chat.clock
        for key in ("ck-alice-123456", "ck-bob-1234567"):
            status, _h, data = request(server, "POST", "/v1/messages", body, {
                "x-api-key": key, "anthropic-version": "2023-06-01",
                "content-type": "application/json"})
            assert status == 200, data
        status, _h, usage = manage(server, "GET", "usage")
        alice = request(server, "GET", "/status", None, {"x-api-key": "ck-alice-123456"})[2]
    # FakeAnthropic: 21 fresh + 3 cache-read input tokens, 7 output tokens
    rates = ip.price_rates(ip.PROVIDER_PRICES["deepseek"]["deepseek-v4-pro"], clock())
    each = (21 * rates["input"] + 3 * rates["cache_read"] + 7 * rates["output"]) / 1e6
    row = next(r for r in usage["usage"] if r["kind"] == "account")
    assert row["cache_read_tokens"] == 6 and row["cost"] == pytest.approx(2 * each)
    assert row["price_source"] == "table" and row["currency"] == "USD"
    costs = usage["costs"]
    assert costs["today"]["models"]["deepseek-v4-pro"]["USD"] == pytest.approx(2 * each)
    assert costs["days"]["accounts"]["ds"]["USD"] == pytest.approx(2 * each)
    assert set(costs["today"]["clients"]) == {"alice", "bob"}
    assert costs["price_sources"] == {"deepseek-v4-pro": "table"}
    assert list(json.loads(alice)["costs"]["today"]["clients"]) == ["alice"]  # only its own
    write_config(home, {"prices": {"deepseek-v4-pro": {"input": 10, "output": 10}}})
    with running(ip.load_config(home, {}, {})) as server:
        request(server, "POST", "/v1/messages", body, {"anthropic-version": "2023-06-01",
                                                       "content-type": "application/json"})
        rows = server.chat.usage.day_rows()
    assert rows[-1]["price_source"] == "config"
    assert rows[-1]["cost"] == pytest.approx(2 * each + 31 * 10 / 1e6)


def test_dashboard_charts_and_costs_in_chromium(home, fake, tmp_path):
    """Traffic in several models from two client keys: every chart has its total in the title,
    a value scale and a time axis, shows a bar's values on keyboard focus and opens as a
    table; cost has its own chart and a table per model, account and client key with the price
    source; the models editor saves config.json (screenshots at desktop and phone size)."""
    import os
    import shutil
    from test_iflow_proxy import (conversation, enter_management_key, require_selenium,
                                  selenium_chrome, wait_for)
    require_selenium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    add_key_account(home, KEYS[0], nickname="work")
    fake.models.append("my-local-coder")
    write_config(home, {"management_key": "mk-dash-123", "client_keys": [
        {"name": "alice", "key": "ck-alice-123456"}, {"name": "bob", "key": "ck-bob-1234567"}],
        "prices": {"glm-4.6": {"input": 3.0, "output": 15.0}},
        "models": {"my-local-coder": {"prices": {"input": 1, "output": 2, "currency": "CNY"}}}})
    config = ip.load_config(home, {}, {"IFLOW_API_BASE": fake.url + "/v1"})
    with running(config) as server:
        for i, (model, key) in enumerate([("glm-4.6", "ck-alice-123456"),
                                          ("kimi-k2", "ck-alice-123456"),
                                          ("my-local-coder", "ck-bob-1234567"),
                                          ("glm-4.6", "ck-bob-1234567")] * 2):
            body = dict(conversation(i), model=model)
            assert post_json(server, "/v1/chat/completions", body, {"x-api-key": key})[0] == 200
        for width, height in ((1280, 1800), (412, 915)):
            driver = selenium_chrome(tmp_path, width, height)
            try:
                driver.get(server.url + "/#key=ck-alice-123456")
                wait_for(lambda: "total" in driver.find_element(By.ID, "c-days-tok").text,
                         what="charts drawn")
                for chart in ("c-hours-req", "c-hours-tok", "c-days-req", "c-days-tok",
                              "c-days-cost"):
                    figure = driver.find_element(By.ID, chart)
                    labels = [t.text for t in figure.find_elements(By.CSS_SELECTOR, "svg text")]
                    assert len(labels) >= 5, (chart, labels)  # a scale (3) and a time axis
                    assert "total" in figure.find_element(By.TAG_NAME, "figcaption").text
                hours = [t.text for t in driver.find_elements(By.CSS_SELECTOR,
                                                              "#c-hours-req svg text")]
                assert any(t.endswith(":00") for t in hours), hours
                assert "8 total" in driver.find_element(By.ID, "c-days-req").text
                assert driver.find_element(By.ID, "c-days-cost").text.count("$") >= 1
                bar = driver.find_elements(By.CSS_SELECTOR, "#c-days-tok .bar")[-1]
                driver.execute_script("arguments[0].focus()", bar)
                tip = driver.find_element(By.CSS_SELECTOR, "#c-days-tok .tip").text
                assert "glm-4.6" in tip and "kimi-k2" in tip, tip
                bars = driver.find_elements(By.CSS_SELECTOR, "#c-days-tok .bar")
                bars[-2].send_keys(Keys.TAB)  # keyboard focus moves along the bars
                toggle = driver.find_element(By.CSS_SELECTOR, "#c-days-req figcaption button")
                toggle.click()
                table = driver.find_element(By.CSS_SELECTOR, "#c-days-req table")
                wait_for(table.is_displayed, what="the table view")
                assert "work" in table.text and "Total" in table.text
                costs = driver.find_element(By.ID, "costs").text
                assert "glm-4.6" in costs and "config" in costs and "¥" in costs
                assert "alice" in costs and "bob" not in costs  # a client key sees its own
                enter_management_key(driver, "mk-dash-123")
                wait_for(lambda: driver.find_element(By.ID, "modelsjson").is_displayed(),
                         what="the models editor")
                if width == 1280:
                    box = driver.find_element(By.ID, "modelsjson")
                    wait_for(lambda: "my-local-coder" in box.get_attribute("value"),
                             what="the models loaded")
                    box.clear()
                    box.send_keys('{"gemma-3-270m": {"window": 8192, "output": 256}}')
                    driver.find_element(By.CSS_SELECTOR, "#modelsform button").click()
                    wait_for(lambda: "gemma-3-270m" in json.load(open(os.path.join(
                        home, "config.json"))).get("models", {}), what="config.json saved")
                    wait_for(lambda: server.config.models.get("gemma-3-270m") == {
                        "window": 8192, "output": 256}, what="the running config")
                driver.execute_script("window.scrollTo(0, document.getElementById("
                                      "'c-hours-req').offsetTop - 10)")
                driver.save_screenshot(str(tmp_path / ("charts-%d.png" % width)))
                logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"] \
                    if hasattr(driver, "get_log") else []
                assert logs == [], logs
            finally:
                driver.quit()
    if os.environ.get("IFLOW_PROXY_KEEP_SCREENSHOT"):
        for width in (1280, 412):
            shutil.copy(str(tmp_path / ("charts-%d.png" % width)),
                        os.environ["IFLOW_PROXY_KEEP_SCREENSHOT"] + "-charts-%d.png" % width)
