#!/usr/bin/env python3
"""iflow-proxy: one local OpenAI- and Anthropic-compatible endpoint in front of iFlow and every
living OpenAI- or Anthropic-compatible provider (DeepSeek, Zhipu GLM / Z.ai, Kimi, Qwen/DashScope,
MiniMax, SiliconFlow, OpenRouter, ModelScope).  One file, standard library only, CPython 3.8+.

    python iflow_proxy.py login --api-key --provider deepseek [--protocol anthropic]
    python iflow_proxy.py login                # iFlow account in the browser (--no-browser on a
                                               # headless box; --device, --cookie)
    python iflow_proxy.py serve                # http://127.0.0.1:11450 (OpenAI: /v1)
    python iflow_proxy.py claude               # Claude Code through the proxy
    eval "$(python iflow_proxy.py env)"        # ANTHROPIC_* for any Anthropic client

Also: providers, models, accounts, use, rename, logout, refresh, import, status, check (see
--help); a management API under /v0/management/ when a management key is set.

Read top to bottom the file follows a request: constants (the provider presets) -> errors ->
config (every setting declared once, in SETTINGS) -> wire (HTTP/1.1 both ways: framing, the
upstream pool, the server connection) -> storage -> auth -> upstream (signing,
pooled connections, the one upstream reader) -> routing -> translation -> exchange (one
ChatExchange per chat request: resolve, take an account, send, classify, fail over, record) ->
HTTP server (the listening server and the handler) -> CLI.

Files (home: ``--home``, else ``$IFLOW_PROXY_HOME``, else ``~/.iflow-proxy``):

    config.json             optional settings (see the README's config reference)
    accounts.json           the account registry (nicknames, default, per-account settings)
    auth/iflow-<id>.json    one credential file per account (CLIProxyAPI's field names)
    usage.json              usage per account, model, client key, day and hour
    run.json                the running server's address (written by serve, removed at stop)

Security: the server binds 127.0.0.1 by default and refuses a non-loopback address unless client
keys are configured; it refuses cross-site requests and foreign Host names, and scrubs keys from
upstream text.  Credential files are 0600 in 0700 directories, written atomically under a lock
shared with other processes.  Keys and tokens are never printed or logged in full.
"""

import argparse
import base64
import contextlib
import collections
import fnmatch
import hashlib
import hmac
import io
import ipaddress
import itertools
import http
import json
import logging
import os
import random
import re
import secrets
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse

# Modules only some commands or paths need (calendar, email.utils, getpass, http.client,
# http.server, queue, shutil, ssl, subprocess, urllib.request, webbrowser) are imported where they
# are used, each in one place: `serve` starts faster and smaller without them.

try:  # POSIX advisory file locks; Windows falls back to msvcrt below.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

__version__ = "0.1.0"
__all__ = ["main", "Config", "load_config", "AccountRegistry", "UpstreamClient", "Router",
           "ProxyServer", "start_server", "anthropic_to_openai", "openai_to_anthropic",
           "AnthropicStream", "estimate_tokens"]

log = logging.getLogger("iflow_proxy")


# ==================================================================================================
# Constants
# ==================================================================================================

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11450
DEFAULT_API_BASE = "https://apis.iflow.cn/v1"
DEFAULT_OAUTH_BASE = "https://iflow.cn"
DEFAULT_PLATFORM_BASE = "https://platform.iflow.cn"
DEFAULT_USER_AGENT = "iFlow-Cli"
DEFAULT_PROBE_MODEL = "glm-4.6"
# The official CLI's public OAuth client (it ships in the npm package; not a secret of ours).
OAUTH_CLIENT_ID = "10009311001"
OAUTH_CLIENT_SECRET = "4Z3YjXycVsQvyGF1etiNlIBB4RsqSDtW"
ROUTE_PREFIX = "/api/provider/iflow"  # what CCS users already have in ANTHROPIC_BASE_URL
ANTHROPIC_VERSION = "2023-06-01"      # sent to Anthropic-protocol upstreams

# CCS's legacy names -> canonical model.  Tried as asked first ("fallback" mode), see resolve_model.
LEGACY_ALIASES = {
    "iflow-default": "qwen3-coder-plus",
    "kimi-k2.5": "kimi-k2",
    "deepseek-v3.2-chat": "deepseek-v3.2",
    "glm-4.7": "glm-4.6",
    "minimax-m2.5": "qwen3-coder-plus",
}
LEGACY_MODES = ("fallback", "always", "off")
STRATEGIES = ("round-robin", "least-busy", "fill-first")

# Claude Code asks for Claude models; each family maps to an iFlow model (config claude_models).
CLAUDE_FAMILIES = ("opus", "sonnet", "haiku")


def _claude(mapping):
    """{family: model} from "opus=model sonnet=model haiku=model"."""
    return dict(pair.split("=", 1) for pair in mapping.split())


DEFAULT_CLAUDE_MODELS = _claude("opus=glm-4.6 sonnet=glm-4.6 haiku=qwen3-coder-plus")

# What a request is, as Claude Code says with CLAUDE_CODE_GATEWAY_HINT_HEADERS=1 (header
# x-claude-code-request-class), and its queue lane: main turns (and the compaction the user
# waits on) first, then subagents and workflows, then housekeeping (titles, summaries, web
# search side requests).  A lower lane waits for higher ones only for BACKGROUND_WAIT seconds.
REQUEST_LANES = {"main": 0, "compaction": 0, "subagent": 1, "workflow": 1, "auxiliary": 2,
                 "side_reply": 2}

# Per-family default output limit, sent as max_new_tokens like the official CLI; first match wins.
MODEL_OUTPUT_LIMITS = (
    ("glm-", 32000), ("kimi-", 32768), ("minimax-", 64000), ("qwen3-coder", 64000),
    ("deepseek-v3.2", 64000), ("deepseek-r1", 32768), ("deepseek", 8192), ("", 8192),
)

# --- provider presets ----------------------------------------------------------------------------
# One entry per provider: base URL per protocol (None: not offered), how the key is sent to its
# Anthropic endpoint, iFlow signing, the default Claude-family mapping, the fields its Anthropic
# endpoint rejects, and per model: context window, output limit, thinking switch, vision.
# Facts from each provider's own documentation (URL beside each entry); table checked 2026-11-23.
# Models no preset names still work, with conservative limits (UNKNOWN_MODEL).
Model = collections.namedtuple("Model", "window output thinking vision")
Provider = collections.namedtuple("Provider", "title openai anthropic auth signing claude models "
                                              "rejects quirks doc")
UNKNOWN_MODEL = Model(128000, 8192, None, False)
ADAPTIVE_THINKING_BUDGET = 31999  # what Claude Code asks for as enabled thinking (2.1.332)
PROTOCOLS = ("openai", "anthropic")
# What compatible Anthropic endpoints don't take (shape_messages_body): Anthropic-only fields;
# "field.key" removes one key of a field, "field:key,key" keeps only those keys, and
# "thinking.adaptive" sends adaptive thinking as enabled thinking with a budget.  None of the
# presets' pages lists output_config, adaptive thinking or thinking.display among the fields
# its endpoint takes, except DeepSeek's (its entry).
_ANTHROPIC_ONLY = ("context_management", "container", "mcp_servers", "service_tier",
                   "output_config", "thinking.adaptive", "thinking.display")


def _rows(table):
    """The whitespace-separated fields of each line of a text table (# starts a comment)."""
    return [line.split("#")[0].split() for line in table.strip().splitlines()]


def _models(table):
    """{name: Model} from lines "name window output [thinking] [vision]": thinking names the
    request fields that switch it (see provider_thinking), "-" for none."""
    return {name: Model(int(window), int(output), rest[0] if rest and rest[0] != "-" else None,
                        rest[1:] == ["vision"]) for name, window, output, *rest in _rows(table)}


PROVIDERS = {
    # shared/iflow-protocol.md: windows glm-4.6/4.7 200k, glm-5 170k, kimi-k2 128k,
    # kimi-k2.5 262k, qwen3-coder 256k, deepseek 65k-128k, minimax 128k; output limits as the CLI.
    "iflow": Provider(
        "iFlow (service ended 2026-04-17)", DEFAULT_API_BASE, None, "bearer", True,
        DEFAULT_CLAUDE_MODELS, _models("""
            glm-4.6                        200000  32000 iflow
            glm-4.7                        200000  32000 iflow
            glm-5                          170000  32000 iflow
            kimi-k2                        128000  32768 iflow
            kimi-k2-0905                   128000  32768 iflow
            kimi-k2-thinking               128000  32768 iflow
            kimi-k2.5                      262144  32768 iflow
            qwen3-coder-plus               256000  64000 iflow
            qwen3-max                      256000  32768 iflow
            qwen3-vl-plus                  128000   8192 iflow vision
            qwen3-32b                      128000   8192 iflow
            qwen3-235b-a22b-instruct       128000   8192 iflow
            qwen3-235b-a22b-thinking-2507  128000   8192 iflow
            deepseek-v3                     65536   8192 iflow
            deepseek-v3.1                  128000   8192 iflow
            deepseek-v3.2                  128000  64000 iflow
            deepseek-v3.2-chat             128000  64000 iflow
            deepseek-r1                     65536  32768 iflow
            minimax-m2                     128000  64000 iflow
            minimax-m2.1                   128000  64000 iflow
            minimax-m2.5                   128000  64000 iflow
            iFlow-ROME-30BA3B              128000   8192 iflow"""),
        (), (), "shared/iflow-protocol.md"),
    # https://api-docs.deepseek.com/quick_start/pricing (read 2026-12-03): both protocols, 1M
    # context, output up to 384K; deepseek-flash (DeepSeek-V4.1-Flash-1017, vision) replaced
    # deepseek-v4-flash, whose name (and -vision-exp's) is still served by it;
    # https://api-docs.deepseek.com/guides/anthropic_api: claude-opus* -> v4-pro, other
    # claude* -> flash; https://api-docs.deepseek.com/guides/thinking_mode: thinking
    # {"type": "enabled"|"disabled"}, reasoning_content of tool-call turns must be sent back.
    "deepseek": Provider(
        "DeepSeek", "https://api.deepseek.com", "https://api.deepseek.com/anthropic", "x-api-key",
        False, _claude("opus=deepseek-v4-pro sonnet=deepseek-flash haiku=deepseek-flash"),
        _models("""
            deepseek-flash                1048576 393216 deepseek vision
            deepseek-v4-pro               1048576 393216 deepseek
            deepseek-v4-flash             1048576 393216 deepseek vision
            deepseek-v4-flash-vision-exp  1048576 393216 deepseek vision"""),
        # https://api-docs.deepseek.com/guides/anthropic_api: "thinking: Supported
        # (budget_tokens is ignored)", "output_config: Only effort is supported"
        ("context_management", "container", "mcp_servers", "service_tier", "output_config:effort",
         "thinking.adaptive", "thinking.display"),
        # https://api-docs.deepseek.com/guides/responses_api: POST {base}/responses, stateless;
        # its Anthropic endpoint runs web_search itself, billed per search since 2026-11-01 (from
        # third parties' copies of DeepSeek's Search & Fetch guide, e.g.
        # https://www.skills.sh/jpcaparas/skills/deepseek-search)
        ("reasoning_passback", "max_tokens_range", "responses_native", "web_search_native"),
        "https://api-docs.deepseek.com/quick_start/pricing"),
    # https://docs.bigmodel.cn (OpenAI: /api/paas/v4, Anthropic: /api/anthropic); GLM-4.6/4.7/5
    # 200K context, 128K output; GLM-4.5-Air 128K/96K; thinking {"type": "enabled"|"disabled"}.
    "zhipu": Provider(
        "Zhipu GLM (open.bigmodel.cn)", "https://open.bigmodel.cn/api/paas/v4",
        "https://open.bigmodel.cn/api/anthropic", "bearer", False,
        _claude("opus=glm-5 sonnet=glm-4.7 haiku=glm-4.5-air"), _models("""
            glm-4.6      200000 128000 glm
            glm-4.7      200000 128000 glm
            glm-5        200000 128000 glm
            glm-4.5-air  128000  96000 glm
            glm-4.6v     128000  32768 glm vision"""),
        _ANTHROPIC_ONLY, (), "https://docs.bigmodel.cn/cn/guide/develop/claude"),
    # https://docs.z.ai/devpack/tool/claude (Anthropic: https://api.z.ai/api/anthropic) and
    # https://docs.z.ai/guides/overview/quick-start (OpenAI: https://api.z.ai/api/paas/v4).
    # GLM-5.3 (2026-08-19) and GLM-5.3-flash: 1M context, 128K output, thinking always on
    # ("disabled" is a 400) -- from third parties' copies of Z.ai's pages (e.g.
    # https://dev.to/owen_fox/glm-53-api-pricing-endpoints-and-reasoningeffort-40oa); Z.ai's
    # own page was not in the docs we could search.
    "zai": Provider(
        "Z.ai GLM (international)", "https://api.z.ai/api/paas/v4", "https://api.z.ai/api/anthropic",
        "bearer", False, _claude("opus=glm-5.3 sonnet=glm-5.3 haiku=glm-5.3-flash"),
        _models("""
            glm-5.3        1048576 131072 -
            glm-5.3-flash  1048576 131072 -"""),  # and zhipu's (below)
        _ANTHROPIC_ONLY, (), "https://docs.z.ai/guides/overview/quick-start"),
    # https://platform.kimi.ai/docs/models: kimi-k2.6, 256K context; the API speaks OpenAI
    # (/v1) and Anthropic (/anthropic); thinking models take tool_choice auto/none only.
    # kimi-k3 (2026-07-16): 1M context, always thinking -- from third parties' copies (e.g.
    # https://apidog.com/blog/kimi-k3-api/); kimi-k2.5 and kimi-k2-thinking are retired.
    # kimi-k3.1-pro and -highspeed (2026-10-24): 1M context and output, always thinking -- from
    # third parties' copies of its K3.1 Pro quickstart (https://apidog.com/blog/kimi-k3-1-pro-api/,
    # https://vercel.com/ai-gateway/models/kimi-k3.1-pro).
    "moonshot": Provider(
        "Moonshot Kimi", "https://api.moonshot.ai/v1", "https://api.moonshot.ai/anthropic",
        "bearer", False, _claude("opus=kimi-k3.1-pro sonnet=kimi-k3 haiku=kimi-k2.6"),
        _models("""
            kimi-k3.1-pro            1048576 1048576 - vision
            kimi-k3.1-pro-highspeed  1048576 1048576 - vision
            kimi-k3                  1048576  262144 - vision
            kimi-k2.6                 262144  262144 kimi vision"""),
        _ANTHROPIC_ONLY, ("thinking_tool_choice_auto",), "https://platform.kimi.ai/docs/models"),
    # https://www.alibabacloud.com/help/en/model-studio/claude-code (Anthropic:
    # /apps/anthropic) and .../model-studio/compatibility-of-openai-with-dashscope (OpenAI:
    # /compatible-mode/v1); windows from .../model-studio/models.
    "dashscope": Provider(
        "Alibaba DashScope / Bailian (Qwen)", "https://dashscope.aliyuncs.com/compatible-mode/v1",
        "https://dashscope.aliyuncs.com/apps/anthropic", "bearer", False,
        _claude("opus=qwen3.8-max sonnet=qwen3-coder-plus haiku=qwen-flash"), _models("""
            qwen3.8-max       1000000 65536 - vision  # thinking only; a third party's copy
            qwen3-coder-plus  1000000 65536 qwen
            qwen3-max          262144 65536 qwen
            qwen3.5-plus      1000000 65536 qwen
            qwen-plus         1000000 32768 qwen
            qwen-flash        1000000 32768 qwen
            qwen3-vl-plus      262144 32768 qwen vision"""),
        _ANTHROPIC_ONLY, (), "https://www.alibabacloud.com/help/en/model-studio/claude-code"),
    # https://platform.minimax.io/docs/api-reference/text-anthropic-api (Anthropic:
    # https://api.minimax.io/anthropic; OpenAI: https://api.minimax.io/v1); 204,800 context.
    # MiniMax-M3 (2026-06-01): 1M context, 131,072 output, image and video input -- from third
    # parties' copies (https://novita.ai/models/model-detail/minimax-minimax-m3).
    "minimax": Provider(
        "MiniMax", "https://api.minimax.io/v1", "https://api.minimax.io/anthropic", "bearer", False,
        _claude("opus=MiniMax-M3 sonnet=MiniMax-M3 haiku=MiniMax-M2.7-highspeed"),
        _models("""
            MiniMax-M3             1000000 131072 minimax vision
            MiniMax-M2.7            204800 131072 minimax
            MiniMax-M2.7-highspeed  204800 131072 minimax
            MiniMax-M2.5            204800 131072 minimax"""),
        _ANTHROPIC_ONLY, (), "https://platform.minimax.io/docs/api-reference/text-anthropic-api"),
    # https://docs.siliconflow.cn/cn/userguide/quickstart (OpenAI: https://api.siliconflow.cn/v1,
    # Anthropic: https://api.siliconflow.cn); names are org/Model; thinking switched by
    # enable_thinking (its chat-completions API reference).  Windows and output limits from its
    # model pages (siliconflow.com/models/<slug>) as a third party copied them on 2026-09-29
    # (https://github.com/juspay/neurolink docs/getting-started/providers/siliconflow.md): its
    # own pages were not in the docs we could search.
    "siliconflow": Provider(
        "SiliconFlow", "https://api.siliconflow.cn/v1", "https://api.siliconflow.cn", "bearer",
        False, _claude("""opus=deepseek-ai/DeepSeek-V4-Pro sonnet=deepseek-ai/DeepSeek-V4-Flash
                          haiku=Qwen/Qwen3.6-35B-A3B"""), _models("""
            deepseek-ai/DeepSeek-V4-Pro    1048576 393216 qwen
            deepseek-ai/DeepSeek-V4-Flash  1048576 393216 qwen
            deepseek-ai/DeepSeek-V3.2       163840 163840 qwen
            zai-org/GLM-5.1                 204800 131072
            zai-org/GLM-5                   204800 131072
            moonshotai/Kimi-K2.6            262144 262144 - vision
            Qwen/Qwen3.6-35B-A3B            262144 262144 qwen vision"""),
        _ANTHROPIC_ONLY, (), "https://docs.siliconflow.cn/cn/userguide/quickstart"),
    # https://openrouter.ai/docs/quickstart (OpenAI: https://openrouter.ai/api/v1) and
    # https://openrouter.ai/docs/guides/claude-code (Anthropic: https://openrouter.ai/api);
    # thinking {"reasoning": {"enabled": bool}}:
    # https://openrouter.ai/docs/use-cases/reasoning-tokens.  Its model pages (read 2026-12-03):
    # https://openrouter.ai/anthropic/claude-opus-5.5 (Claude 5.5's limits are Anthropic's own:
    # https://platform.claude.com/docs/en/models/haiku-5-5/overview and its siblings; the
    # sonnet and haiku slugs from third parties' copies),
    # https://openrouter.ai/deepseek/deepseek-v4-flash/api,
    # https://openrouter.ai/models/z-ai/glm-5.3 (reasoning always on; 131,072 output on
    # https://openrouter.ai/~z-ai/glm-latest); kimi-k3.1-pro (2026-10-24, always thinking) from
    # third parties' copies (https://vercel.com/ai-gateway/models/kimi-k3.1-pro).
    "openrouter": Provider(
        "OpenRouter", "https://openrouter.ai/api/v1", "https://openrouter.ai/api", "bearer", False,
        _claude("""opus=anthropic/claude-opus-5.5 sonnet=anthropic/claude-sonnet-5.5
                   haiku=anthropic/claude-haiku-5.5"""), _models("""
            anthropic/claude-opus-5.5    1000000 128000 - vision
            anthropic/claude-sonnet-5.5  1000000 128000 openrouter vision
            anthropic/claude-haiku-5.5   1000000 128000 openrouter vision
            anthropic/claude-haiku-4.5    200000  64000 openrouter vision
            deepseek/deepseek-v4-flash   1048576 393216 openrouter
            z-ai/glm-5.3                 1048576 131072 -
            moonshotai/kimi-k3.1-pro     1048576 1048576 - vision
            moonshotai/kimi-k2.6          262144 262144 openrouter vision"""),
        # https://openrouter.ai/docs/api-reference/responses: POST /api/v1/responses (beta)
        (), ("responses_native",), "https://openrouter.ai/docs/quickstart"),
    # https://modelscope.cn/docs/model-service/API-Inference/intro (OpenAI-compatible:
    # https://api-inference.modelscope.cn/v1; Anthropic-compatible since its 2026 version:
    # base_url https://api-inference.modelscope.cn with the Anthropic SDK, which sends the key
    # as x-api-key -- read in a copy of that page, its own site not being in our corpus).
    "modelscope": Provider(
        "ModelScope", "https://api-inference.modelscope.cn/v1",
        "https://api-inference.modelscope.cn", "x-api-key", False,
        _claude("""opus=Qwen/Qwen3-Coder-480B-A35B-Instruct
                   sonnet=Qwen/Qwen3-Coder-480B-A35B-Instruct
                   haiku=Qwen/Qwen3-Coder-30B-A3B-Instruct"""), _models("""
            Qwen/Qwen3-Coder-480B-A35B-Instruct  262144  65536
            Qwen/Qwen3-Coder-30B-A3B-Instruct    262144  65536
            ZhipuAI/GLM-4.6                      200000 128000 glm"""),
        _ANTHROPIC_ONLY, (), "https://modelscope.cn/docs/model-service/API-Inference/intro"),
}

# --- prices ----------------------------------------------------------------------------------
# Per million tokens, in the currency the provider's page quotes, from each provider's own
# pricing page (URL and the day it was read beside each entry; a figure found only in a third
# party's copy of it is marked so).  Used for cost unless config ``models`` / ``prices`` or an
# upstream's /models list (OpenRouter's) name another price.
PRICE_RATES = ("input", "output", "cache_read", "cache_write")
CURRENCIES = ("USD", "CNY")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # (time.gmtime().tm_wday order)


def _price_rows(currency, table, peak=None):
    """{lower-case model: price} from lines "model input output cache_read [cache_write]";
    ``peak`` (factor, [(from, to) UTC], weekdays): every rate times factor in those hours."""
    out = {}
    for name, *rates in _rows(table):
        price = dict(zip(PRICE_RATES, (float(r) for r in rates)))
        if peak:
            factor, hours, days = peak
            price["periods"] = [dict({k: round(v * factor, 6) for k, v in price.items()},
                                     **{"from": start, "to": end, "days": list(days)})
                                for start, end in hours]
        out[name.lower()] = dict(price, currency=currency)
    return out


PROVIDER_PRICES = {
    # https://api-docs.deepseek.com/quick_start/pricing (read 2026-12-03, its 2026-11-15
    # version): off-peak rates here; peak, Beijing 9:00-12:00 and 14:00-18:00 Monday to Friday
    # (01:00-04:00 and 06:00-10:00 UTC), doubles them; Chinese public holidays are off-peak all
    # day (not modelled).  The legacy names are served and billed as deepseek-flash.
    "deepseek": _price_rows("USD", """
        deepseek-flash                0.15  0.6   0.003
        deepseek-v4-flash             0.15  0.6   0.003
        deepseek-v4-flash-vision-exp  0.15  0.6   0.003
        deepseek-v4-pro               0.66  1.98  0.022""",
                            (2, [("01:00", "04:00"), ("06:00", "10:00")], WEEKDAYS[:5])),
    # Z.ai's pay-per-use table as third parties copied it (read 2026-12-03):
    # https://dev.to/owen_fox/glm-53-api-pricing-endpoints-and-reasoningeffort-40oa (GLM-5.3,
    # cache storage free for now), https://github.com/VladoIvankovic/Codeep/releases/tag/v2.25.0
    # (GLM-5.3-Flash, list price without its launch promotion).
    "zai": _price_rows("USD", """
        glm-5.3        1.40  4.40  0.26
        glm-5.3-flash  0.15  0.50"""),
    # Moonshot's own page lists K2.6 and K2 only at https://platform.kimi.ai/docs/pricing/chat;
    # figures from third parties' copies (read 2026-12-03): kimi-k3
    # https://apidog.com/blog/kimi-k3-api/, kimi-k2.6
    # https://developers.cloudflare.com/workers-ai/models/kimi-k2.6/.
    # kimi-k3.1-pro(-highspeed): https://docs.apiyi.com/api-capabilities/kimi-k3-1/overview.md
    # (a reseller's copy of Moonshot's list; 5-minute cache writes).
    "moonshot": _price_rows("USD", """
        kimi-k3.1-pro            2.00  10.00  0.20  2.00
        kimi-k3.1-pro-highspeed  4.00  20.00  0.20  4.00
        kimi-k3    3.00  15.00  0.30
        kimi-k2.6  0.95   4.00  0.16"""),
    # Third parties' copies of MiniMax's pay-as-you-go page (read 2026-12-03):
    # https://dev.to/aiwave/minimax-m3-api-complete-integration-guide-1lba (M3, up to 512K of
    # input; above that twice these, not modelled), https://www.promptfoo.dev/docs/providers/minimax/
    # (M2.7).
    "minimax": _price_rows("USD", """
        MiniMax-M3              0.30  1.20  0.06
        MiniMax-M2.7            0.30  1.20  0.06
        MiniMax-M2.7-highspeed  0.60  2.40  0.06"""),
    # Alibaba Model Studio (international) as a third party copied it (read 2026-12-03):
    # https://dev.to/hassann/how-to-use-the-qwen-38-api-1cgm (flat over the whole context).
    "dashscope": _price_rows("USD", """
        qwen3.8-max  2.00  6.00"""),
    # OpenRouter's own model pages (read 2026-12-03; its /models list, read live, names the
    # price it charges and wins over these): https://openrouter.ai/models/z-ai/glm-5.3,
    # https://openrouter.ai/deepseek/deepseek-v4-flash/api; Claude at Anthropic's own list prices
    # (https://platform.claude.com/docs/en/models/sonnet-5-5/overview, 5-minute cache writes;
    # Haiku 5.5's "from" price, up to 100K tokens of input); kimi-k3.1-pro as Moonshot's above.
    "openrouter": _price_rows("USD", """
        anthropic/claude-opus-5.5    4.00  20.00
        anthropic/claude-sonnet-5.5  2.00  10.00  0.20  2.50
        anthropic/claude-haiku-5.5   0.10   0.50
        deepseek/deepseek-v4-flash   0.14   0.28
        z-ai/glm-5.3                 1.40   4.40  0.26
        moonshotai/kimi-k3.1-pro     2.00  10.00  0.20  2.00"""),
}

PROVIDERS["zai"].models.update(PROVIDERS["zhipu"].models)  # GLM-5.3 first, then the same GLMs

# The official CLI ships its model list built in (the iFlow preset's, in its order);
# /v1/models falls back to it.
BUILTIN_MODELS = tuple(PROVIDERS["iflow"].models)


MODEL_SPECS = {(provider, name.lower()): spec for provider, preset in PROVIDERS.items()
               for name, spec in (preset.models or {}).items()}  # looked up per request


def _model_owners():
    owners = collections.defaultdict(tuple)
    for provider, name in MODEL_SPECS:
        owners[name] += (provider,)
    return dict(owners)


MODEL_OWNERS = _model_owners()  # model name (lower case) -> the presets that list it


# config ``models`` "thinking": how the model's thinking is switched (see provider_thinking)
THINKING_SWITCHES = {"type": "deepseek", "enable_thinking": "qwen", "reasoning": "openrouter",
                     "none": None}
MODEL_FIELDS = ("window", "output", "thinking", "vision")


def custom_model(models, model):
    """The config ``models`` entry for ``model``: its exact name (any case) first, else the
    first glob (in the config's order) that matches; None."""
    name = model.lower()
    for pattern, entry in models.items():
        if pattern.lower() == name:
            return entry
    for pattern, entry in models.items():
        if fnmatch.fnmatchcase(name, pattern.lower()):
            return entry
    return None


def table_spec(model, provider="", reported=None):
    """(Model, where it comes from: "table", "provider list" or "default") of ``model`` on
    ``provider`` (else on any preset that lists it), else what an upstream's /models reported
    (``reported``: lower-case name -> Model), else UNKNOWN_MODEL's conservative limits."""
    name = model.lower()
    for owner in (provider,) + MODEL_OWNERS.get(name, ()):
        spec = MODEL_SPECS.get((owner, name))
        if spec is not None:
            return spec, "table"
    found = reported.get(name) if reported else None
    return (found, "provider list") if found is not None else (UNKNOWN_MODEL, "default")


def model_spec(model, provider="", models=None, reported=None):
    """The Model (window, output, thinking, vision) of ``model`` on ``provider``: see
    table_spec, with what a config ``models`` entry sets on top."""
    spec = table_spec(model, provider, reported)[0]
    entry = custom_model(models, model) if models else None
    changes = {k: THINKING_SWITCHES[entry[k]] if k == "thinking" else entry[k]
               for k in MODEL_FIELDS if k in entry} if entry else None
    return spec._replace(**changes) if changes else spec  # (UNKNOWN_MODEL stays itself)


def model_source(model, provider="", models=None, reported=None):
    """Where model_spec's figures come from: "config", "table", "provider list", "default"."""
    entry = custom_model(models, model) if models else None
    if entry and any(k in entry for k in MODEL_FIELDS):
        return "config"
    return table_spec(model, provider, reported)[1]


MAX_MODEL_NAME = 256
MAX_TOKENS_SETTING = (1 << 31) - 1  # a window or output limit in config: far above any model's
NICKNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,49}$")  # accounts and client keys
HEADER_LIMIT = 100          # request headers per request
SSE_HEAD_LIMIT = 1 << 20    # bytes we read looking for the first SSE event / a JSON error body
MAX_EVENT_BYTES = 16 << 20  # one upstream SSE event (a tool call with a whole file in it fits)


# ==================================================================================================
# Errors: one root, each class carries its HTTP status; rendered in one place (error_body)
# ==================================================================================================

class ProxyError(Exception):
    """Root of every error the proxy reports; ``status`` is the HTTP status sent to the client."""

    status = 500
    code = "internal_error"
    exit_code = 1           # for the CLI: 2 = bad input/usage, 1 = runtime failure

    def __init__(self, message, status=None, code=None, retry_after=None):
        super().__init__(message)
        self.message, self.retry_after = message, retry_after
        self.status, self.code = status or self.status, code or self.code


class BadRequest(ProxyError):
    status, code, exit_code = 400, "invalid_request", 2


class ConfigError(ProxyError):
    """A bad flag, config file, environment variable or stored file."""
    status, code, exit_code = 500, "config_error", 2


class Unauthorized(ProxyError):
    status, code = 401, "invalid_api_key"


class NotFound(ProxyError):
    status, code = 404, "not_found"


class MethodNotAllowed(ProxyError):
    status, code = 405, "method_not_allowed"


class PayloadTooLarge(ProxyError):
    status, code = 413, "request_too_large"


class ModelNotAllowed(ProxyError):
    """A client key's model list does not hold the model a request would be sent to."""
    status, code = 403, "model_not_allowed"


class RateLimited(ProxyError):
    status, code = 429, "rate_limited"


class NoAccount(ProxyError):
    status, code = 503, "no_account"


class ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


class UpstreamError(ProxyError):
    """An upstream answer or failure, classified by ``kind`` (see UPSTREAM_KINDS)."""

    def __init__(self, kind, message, upstream_status=None, trace_id="", retry_after=None):
        status, code, _retry_other = UPSTREAM_KINDS[kind]
        super().__init__(message, status, code, retry_after)
        self.kind, self.upstream_status, self.trace_id = kind, upstream_status, trace_id
        self.tokens = self.window = None  # an input too long: its size and the model's window
        self.said = ""  # upstream's own words (scrubbed), relayed as they are for a 400

    @property
    def retry_other_account(self):
        return UPSTREAM_KINDS[self.kind][2]


# What upstream failures are: kind, status for the client, error code, worth trying another
# account, and the HTTP statuses or iFlow business codes that mean it (see kind_for)
_UPSTREAM_KINDS = _rows("""
    concurrency        429 concurrency_limit        retry  449   # one request per account
    rate_limit         429 rate_limit_exceeded      retry  429 8211
    key_expired        503 upstream_key_expired     retry  439
    key_blocked        503 upstream_key_blocked     retry  434 438  # and "invalid apiKey"
    auth               503 upstream_auth_failed     retry  401 403
    model_unsupported  404 model_not_found          retry  435
    context_length     400 context_length_exceeded  final  511 413  # and 400 "too long"
    model_error        502 upstream_model_error     retry  514
    rejected           502 upstream_rejected        final  406  # headers/signature/reserved
    bad_request        400 invalid_request          final  # other 4xx
    transient          502 upstream_unavailable     retry  # 5xx, resets
    timeout            504 upstream_timeout         retry  408 504
    unreachable        502 upstream_unreachable     retry  # DNS, refused, TLS
    malformed          502 upstream_malformed       retry  # 200 without choices
""")
UPSTREAM_KINDS = {kind: (int(status), code, retry == "retry")
                  for kind, status, code, retry, *_codes in _UPSTREAM_KINDS}
_KIND_OF_CODE = {int(code): row[0] for row in _UPSTREAM_KINDS for code in row[4:]}

# HTTP status -> the error type an OpenAI client gets, and an Anthropic one (Anthropic's types:
# https://docs.anthropic.com/en/api/errors); other statuses: server_error or
# invalid_request_error, and api_error
_ERROR_TYPES = {int(status): (openai, anthropic) for status, openai, anthropic in _rows("""
    400 invalid_request_error  invalid_request_error
    401 authentication_error   authentication_error
    403 permission_error       permission_error
    404 invalid_request_error  not_found_error
    405 invalid_request_error  invalid_request_error
    413 invalid_request_error  request_too_large
    429 rate_limit_error       rate_limit_error
    500 server_error           api_error
    529 server_error           overloaded_error
    503 server_error           overloaded_error
""")}
# Anthropic's error type -> the status it goes with (its first above)
ANTHROPIC_ERROR_STATUS = {kind: status for status, (_openai, kind) in
                          reversed(_ERROR_TYPES.items())}


def error_body(err, api="openai"):
    """The JSON error object for ``err`` in the client's own API format."""
    message = too_long_message(err, api) or err.message
    if getattr(err, "kind", None) == "bad_request" and err.said:
        message = err.said  # clients match a refused feature's words (Claude Code's fallbacks)
    types = _ERROR_TYPES.get(err.status)
    if api == "anthropic":
        return {"type": "error", "error": {"type": types[1] if types else "api_error",
                                           "message": message}}
    etype = types[0] if types else "server_error" if err.status >= 500 else \
        "invalid_request_error"
    return {"error": {"message": message, "type": etype, "param": None, "code": err.code}}


def too_long_message(err, api):
    """An input-too-long error in the words each client acts on: Claude Code compacts on
    Anthropic's "prompt is too long: N tokens > M maximum"; OpenAI clients read
    context_length_exceeded.  None for any other error."""
    tokens, window = getattr(err, "tokens", None), getattr(err, "window", None)
    if not (tokens and window):
        return None
    if api == "anthropic":
        return "prompt is too long: %d tokens > %d maximum (%s)" % (tokens, window, err.message)
    return ("This model's maximum context length is %d tokens. However, your messages resulted "
            "in %d tokens. (%s)" % (window, tokens, err.message))


def mask_secret(value):
    """``sk-abcdef…wxyz`` -> ``sk-ab…yz``: enough to tell keys apart, never enough to use one."""
    value = str(value or "")
    if len(value) <= 8:
        return value[:1] + "…" if value else "(none)"
    return value[:5] + "…" + value[-2:]


def fingerprint(secret):
    """A short stable id for a secret, safe to show and to store as an identity: the start of
    its sha256."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]


# Key-shaped words that upstream error texts echo ("Incorrect API key provided: sk-…").
_SECRET_SHAPES = re.compile(r"\b(?:sk|ak|key|tok)-[A-Za-z0-9_\-]{10,}"           # API keys
                            r"|(?<=Bearer )[A-Za-z0-9._~+/=\-]{10,}"                # tokens
                            r"|\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-.]{8,}")     # JWTs


def scrub_secrets(text, secrets=()):
    """``text`` with every known secret and anything shaped like a key masked.

    Applied to text that came from upstream before it is stored, shown or logged: a provider
    that echoes the key it was sent must not put it into errors, /status or the log.
    """
    text = str(text)
    for secret in secrets:
        if secret and len(secret) >= 6 and secret in text:
            text = text.replace(secret, mask_secret(secret))
    return _SECRET_SHAPES.sub(lambda m: mask_secret(m.group()), text)


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text):
    """``text`` with control characters and lone surrogates escaped (``\\x1b``, ``\\ud83d``).

    Everything that came from a client or upstream goes through this before it reaches a log
    line or a terminal: a newline could forge a line, ESC sequences could rewrite the screen.
    """
    text = text if isinstance(text, str) else str(text)
    if _UNPRINTABLE.search(text) is None:
        return text
    return _UNPRINTABLE.sub(lambda m: ("\\x%02x" if m.group() < "\u0100" else "\\u%04x")
                            % ord(m.group()), text)


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class EscapingFormatter(logging.Formatter):
    """Every log message with control characters escaped: request paths, model names, header
    values and upstream texts come from outside, and a newline or an ESC sequence in them must
    not forge a line or rewrite a terminal.  (Tracebacks, ours, keep their lines.)"""

    def __init__(self, fmt=LOG_FORMAT):
        super().__init__(fmt)
        self.format_string = fmt   # (logging keeps its own copy private)
        self._second = (None, "")  # (second, its local time text): one strftime a second

    def formatMessage(self, record):
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatTime(self, record, datefmt=None):
        return self._time(record.created)

    def _time(self, created):
        second = int(created)
        known = self._second
        if known[0] != second:
            known = self._second = (second, time.strftime(
                "%Y-%m-%d %H:%M:%S", self.converter(second)))
        return "%s,%03d" % (known[1], (created - second) * 1000)

    def info_line(self, message):
        """The text format() gives an INFO record of ``message`` when the format is
        LOG_FORMAT (see log_info_line), without the record."""
        return "%s INFO %s" % (self._time(time.time()), printable(message))


def log_info_line(logger, message, writer=None):
    """``logger.info("%s", message)`` as its handlers would write it, at a fraction of the
    cost: no LogRecord (its caller, thread and process looked up), one clock read, and for a
    stream with a file descriptor the whole line in one write(2) without a lock (log lines are
    far below PIPE_BUF, and FileHandler appends), or handed to ``writer`` (a LineWriter) to
    write with others.  The access log writes a line per request; handlers other than our own
    streams get the record."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handlers = logger.handlers
    if logger.filters or not handlers or not all(
            type(h) in (logging.StreamHandler, logging.FileHandler) and not h.filters and
            h.level <= logging.INFO and isinstance(h.formatter, EscapingFormatter) and
            h.formatter.format_string == LOG_FORMAT for h in handlers):
        logger.info("%s", message)
        return
    for handler in handlers:
        text = handler.formatter.info_line(message) + handler.terminator
        try:  # a whole line in one write(2), no lock: requests don't queue behind the log
            fd = handler.stream.fileno()
            data = text.encode(getattr(handler.stream, "encoding", None) or "utf-8",
                               "backslashreplace")
        except (AttributeError, ValueError, OSError):  # no file descriptor: the stream's lock
            fd = None
        try:
            if fd is None:
                with handler.lock:
                    handler.stream.write(text)
                    handler.stream.flush()
            elif writer is not None:
                writer.add(fd, data)
            else:
                write_fully(fd, data)
        except (OSError, ValueError):  # a closed or broken log stream: as logging, go on
            pass


def trim_oldest(table, size):
    """Drop a dict's oldest entries (first inserted) until it holds at most ``size``."""
    while len(table) > size:
        table.pop(next(iter(table)))


def write_fully(fd, data):
    while data:
        data = data[os.write(fd, data):]


class LineWriter:
    """Log lines written a few at a time by a thread of their own, ``interval`` seconds
    apart at most, each write whole lines of at most PIPE_BUF bytes (so nothing written to
    the same pipe at once can land inside one).

    Why: a request thread that writes its own access line gives the GIL away and has to wait
    for it again behind the other request threads — at 16 concurrent clients that cost a
    tenth of the throughput.  A line waits in memory for at most ``interval`` (gone only if
    the process is killed outright); past ``backlog`` bytes unwritten (a stalled log pipe)
    the thread adding one writes them itself, so a slow reader slows requests as before
    instead of growing the queue."""

    CHUNK = getattr(select, "PIPE_BUF", 512)  # 4096 on Linux, 512 on macOS (POSIX's least)

    def __init__(self, interval=0.05, backlog=1 << 20):
        self.interval, self.backlog = interval, backlog
        self._lines = collections.deque()   # (fd, bytes), oldest first
        self._pending = 0                    # bytes added since the last flush (roughly:
                                             # unlocked, and reset by every flush)
        self._writing = threading.Lock()     # one writer at a time keeps the lines in order
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def add(self, fd, data):
        self._lines.append((fd, data))  # deque.append is atomic: no lock per line
        self._pending += len(data)
        if self._pending > self.backlog or self._stopped.is_set():  # (closed: write it now)
            self.flush()

    def _run(self):
        while not self._stopped.wait(self.interval):
            self.flush()

    def flush(self):
        with self._writing:
            lines = self._lines
            batch = {}  # fd -> [chunks]; each chunk whole lines, at most CHUNK bytes
            while lines:
                fd, data = lines.popleft()
                chunks = batch.setdefault(fd, [bytearray()])
                if chunks[-1] and len(chunks[-1]) + len(data) > self.CHUNK:
                    chunks.append(bytearray())
                chunks[-1] += data
            self._pending = 0
            for fd, chunks in batch.items():
                try:
                    for chunk in chunks:
                        write_fully(fd, chunk)
                except (OSError, ValueError):  # a closed or broken log stream: as logging
                    pass

    def close(self):
        """Stop the thread and write what is left."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        self.flush()


# The one compact JSON encoder (json.dumps builds a new one for every call with options)
_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
def json_bytes(obj):
    """Compact JSON as UTF-8.  Lone UTF-16 surrogates (an upstream that split an emoji's pair
    across two chunks) are joined when they pair up and replaced with U+FFFD when they don't."""
    text = _COMPACT_JSON.encode(obj)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


# ==================================================================================================
# Config: flags > environment > config.json > defaults, validated into one frozen Config
# ==================================================================================================

REQUIRED = object()  # a Record field with no default


class Record:
    """A frozen record of named fields, what a frozen dataclass gives: keyword construction
    with defaults (a dict default copied for each record), equality and hashing by value, a
    repr without secrets, and ``replace``.  Written out because importing dataclasses (and
    inspect with it) and generating their code took 7 ms of every start-up.  A subclass lists
    its fields in ``FIELDS`` (name -> default, or REQUIRED) and may check or convert them in
    ``__post_init__``."""

    FIELDS = {}
    SECRET_FIELDS = ()  # left out of repr()

    def __init__(self, **values):
        fields = self.FIELDS
        if values.keys() - fields.keys():
            raise TypeError("%s has no field %s" % (type(self).__name__, ", ".join(
                sorted(values.keys() - fields.keys()))))
        own = self.__dict__
        for name, default in fields.items():
            if name in values:
                own[name] = values[name]
            elif default is REQUIRED:
                raise TypeError("%s needs a value for %s" % (type(self).__name__, name))
            else:
                own[name] = dict(default) if type(default) is dict else default
        self.__post_init__()

    def __post_init__(self):
        pass

    def _frozen(self, *_name_and_value):
        raise AttributeError("%s is frozen: make another with replace()" % type(self).__name__)

    __setattr__ = __delattr__ = _frozen

    def replace(self, **changes):
        """A copy with ``changes``, checked and converted as a new record is."""
        return type(self)(**dict(self.__dict__, **changes))

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self):
        return hash(tuple(self.__dict__.values()))

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join(
            "%s=%r" % item for item in self.__dict__.items() if item[0] not in self.SECRET_FIELDS))


_NUMBER = (int, float)
Setting = collections.namedtuple("Setting", "types default env doc check")


def _between(low, high):
    return lambda v: None if low <= v <= high else "must be between %d and %d, got %d" % (
        low, high, v)


def _one_of(*choices):
    return lambda v: None if v in choices else "must be one of %s, got %r" % (
        ", ".join(choices), v)


def _positive(v):
    return None if v > 0 else "must be a positive number"


def _not_negative(v):
    return None if v >= 0 else "must not be negative"


def _at_least_one(v):
    return None if v >= 1 else "must be at least 1"


def _http_url(v):
    return None if _is_http_url(v) else "must be an http:// or https:// URL, got %r" % v


def _optional_http_url(v):
    return _http_url(v) if v else None


def _proxy_url(v):
    scheme = _url_scheme(v) if v and v != "direct" else ""
    if scheme not in ("http", "") or scheme == "http" and not _is_http_url(v):
        return "must be an http:// proxy URL (or \"direct\"), got %r" % v
    return None


def _url_scheme(v):
    try:
        return urllib.parse.urlsplit(v).scheme
    except ValueError:  # e.g. "http://[x" (an unclosed bracket)
        return None


def _listed(v):
    """A list setting's items (the environment's form: a comma-separated string)."""
    return [part for part in v.split(",") if part.strip()] if isinstance(v, str) else v


def _key_list(v):
    if not all(isinstance(item, str) and item.strip() for item in _listed(v)):
        return "must be a list of non-empty strings"
    return None


ClientKey = collections.namedtuple("ClientKey", "name key rpm tokens_per_day models expires")
_CLIENT_KEY_FIELDS = {"name": str, "key": str, "rpm": int, "tokens_per_day": int, "models": list,
                      "expires": str}


def _client_key_list(v):
    """Client keys: strings, or objects {"name", "key", "rpm", "tokens_per_day", "models",
    "expires": "YYYY-MM-DD"} (name and key required)."""
    names = []
    for item in _listed(v):
        if isinstance(item, str) and item.strip():
            continue
        if not isinstance(item, dict):
            return "must be a list of keys (strings) or key objects"
        for field, value in item.items():
            kind = _CLIENT_KEY_FIELDS.get(field)
            if kind is None:
                return "objects take %s, not %r" % (", ".join(_CLIENT_KEY_FIELDS), field)
            if not isinstance(value, kind) or isinstance(value, bool) or \
                    kind is int and value < 0:
                return "field %r of a key object must be %s" % (field, _TYPE_NAMES[kind])
        if not item.get("key", "").strip() or not NICKNAME_RE.match(item.get("name", "")):
            return "a key object needs a 'key' and a 'name' (letters, digits, . _ @ + -)"
        if item.get("expires") and not re.match(r"\d{4}-\d{2}-\d{2}$", item["expires"]):
            return "'expires' must be a date, YYYY-MM-DD"
        if not all(isinstance(m, str) for m in item.get("models", ())):
            return "'models' of a key object must be a list of names or globs"
        names.append(item["name"].lower())
    if len(set(names)) != len(names):
        return "key names must be unique"
    return None


def client_key(item):
    """A ClientKey from a config entry; a plain key is named by its fingerprint, never itself."""
    if isinstance(item, ClientKey):
        return item
    if isinstance(item, str):
        return ClientKey("key-" + fingerprint(item)[:8], item, 0, 0, (), "")
    return ClientKey(item["name"], item["key"], item.get("rpm", 0),
                     item.get("tokens_per_day", 0), tuple(item.get("models", ())),
                     item.get("expires", ""))


def _string_list(v):
    return None if all(isinstance(item, str) for item in v) else "must be a list of strings"


def _string_values(v):
    bad = next((k for k, item in v.items() if not isinstance(item, str)), None)
    return None if bad is None else "value for %r must be a string" % bad


def _rate(value):
    return isinstance(value, _NUMBER) and not isinstance(value, bool) and value >= 0 and \
        _finite(value)


def _clock_time(value):
    return isinstance(value, str) and re.match(r"^([01]\d|2[0-3]):[0-5]\d$", value) is not None


def _price_problem(price):
    """What is wrong with a price: {"input", "output", "cache_read", "cache_write" per million
    tokens, "currency", "periods": [{"from": "HH:MM", "to": "HH:MM" (UTC), rates…}]}; None."""
    if not isinstance(price, dict) or not _rate(price.get("input")) or \
            not _rate(price.get("output")):
        return "must hold \"input\" and \"output\" prices (per million tokens)"
    extra = set(price) - set(PRICE_RATES) - {"currency", "periods"}
    if extra:
        return "takes %s, currency and periods, not %r" % (", ".join(PRICE_RATES),
                                                           sorted(extra)[0])
    if any(k in price and not _rate(price[k]) for k in PRICE_RATES):
        return "prices must be numbers of 0 or more"
    if price.get("currency", "USD") not in CURRENCIES:
        return "currency must be one of %s" % ", ".join(CURRENCIES)
    for period in price.get("periods", []) if isinstance(price.get("periods", []), list) \
            else [None]:
        if not isinstance(period, dict) or not _clock_time(period.get("from")) or \
                not _clock_time(period.get("to")) or \
                set(period) - set(PRICE_RATES) - {"from", "to", "days"} or \
                any(k in period and not _rate(period[k]) for k in PRICE_RATES) or \
                not isinstance(period.get("days", []), list) or \
                not all(day in WEEKDAYS for day in period.get("days", [])):
            return "periods must be a list of {\"from\": \"HH:MM\", \"to\": \"HH:MM\"} " \
                "(UTC; \"days\": [\"mon\", …] to limit them) with the prices that differ then"
    return None


def _prices(v):
    for model, price in v.items():
        problem = _price_problem(price)
        if problem:
            return "value for %r %s" % (model, problem)
    return None


def _model_name(name):
    return isinstance(name, str) and 0 < len(name.strip()) and len(name) <= MAX_MODEL_NAME and \
        name.isprintable()


def _model_entries(v):
    aliases = set()
    for name, entry in v.items():
        if not _model_name(name):
            return "model names must be 1 to %d printable characters" % MAX_MODEL_NAME
        if not isinstance(entry, dict):
            return "value for %r must be an object" % name
        extra = set(entry) - set(MODEL_FIELDS) - {"prices", "aliases"}
        problem = "takes %s, prices and aliases, not %r" % (", ".join(MODEL_FIELDS), sorted(
            extra)[0]) if extra else next((
                "%s must be a whole number of tokens from 1 to %d" % (k, MAX_TOKENS_SETTING)
                for k in ("window", "output") if k in entry and (
                    type(entry[k]) is not int or not 0 < entry[k] <= MAX_TOKENS_SETTING)), None)
        if not problem and "vision" in entry and not isinstance(entry["vision"], bool):
            problem = "vision must be true or false"
        thinking = entry.get("thinking", "none")
        if not problem and not (isinstance(thinking, str) and thinking in THINKING_SWITCHES):
            problem = "thinking must be one of %s" % ", ".join(THINKING_SWITCHES)
        if not problem and "prices" in entry:
            problem = _price_problem(entry["prices"])
            problem = problem and "prices " + problem
        if not problem and "aliases" in entry:
            found = entry["aliases"]
            if not isinstance(found, list) or not all(_model_name(a) for a in found):
                problem = "aliases must be a list of model names"
            elif any(c in name for c in "*?["):
                problem = "aliases need an exact model name, not a glob"
            elif aliases & {a.lower() for a in found}:
                problem = "alias %r is given twice" % sorted(aliases & {a.lower() for a in found})[0]
            else:
                aliases |= {a.lower() for a in found}
        if problem:
            return "value for %r: %s" % (name, problem)
    return None


def _fallback_chains(v):
    for model, chain in v.items():
        if not isinstance(chain, list) or not chain or not all(
                isinstance(m, str) and m.strip() for m in chain):
            return "value for %r must be a non-empty list of model names" % model
        if model in chain:
            return "the chain for %r names %r itself" % (model, model)
    return None


def _claude_families(v):
    bad = next((k for k in v if k not in CLAUDE_FAMILIES), None)
    if bad is not None:
        return "takes the families %s, got %r" % (", ".join(CLAUDE_FAMILIES), bad)
    return _string_values(v)


def _class_models(v):
    bad = next((k for k in v if k not in REQUEST_LANES), None)
    if bad is not None:
        return "takes the request classes %s, got %r" % (", ".join(REQUEST_LANES), bad)
    return _string_values(v)


WEB_SEARCH_KEYS = {"backend": str, "url": str, "api_key": str, "max_results": int,
                   "timeout": (int, float)}
WEB_SEARCH_CHOICES = ("auto", "provider", "searxng", "tavily", "brave", "exa", "duckduckgo",
                      "none")


def _web_search(v):
    bad = next((k for k in v if k not in WEB_SEARCH_KEYS), None)
    if bad is not None:
        return "takes the keys %s, got %r" % (", ".join(WEB_SEARCH_KEYS), bad)
    for key, kind in WEB_SEARCH_KEYS.items():
        if key in v and (not isinstance(v[key], kind) or isinstance(v[key], bool)):
            return "%s must be a %s" % (key, "number" if key == "timeout" else kind.__name__)
    if v.get("backend", "auto") not in WEB_SEARCH_CHOICES:
        return "backend must be one of %s" % ", ".join(WEB_SEARCH_CHOICES)
    if "url" in v and not _is_http_url(v["url"]):
        return "url must be an http:// or https:// URL"
    if not 1 <= v.get("max_results", 5) <= 20 or not 0 < v.get("timeout", 10) <= 60:
        return "max_results must be 1 to 20 and timeout more than 0 and at most 60 seconds"
    return None


def _legacy_modes(v):
    bad = next((m for m in (v.values() if isinstance(v, dict) else [v])
                if m not in LEGACY_MODES), None)
    return None if bad is None else "modes must be one of %s, got %r" % (
        ", ".join(LEGACY_MODES), bad)


def _log_level(v):
    return None if v.lower() in ("debug", "info", "warning", "error") else \
        "must be debug, info, warning or error"


# Every setting, declared once: accepted types, default, environment variable (or None), the
# one-line doc (the README's config table is tested against it) and a check beyond the type.
# The Config class, load_config's validation and `--help` texts all derive from this table.
SETTINGS = {
    "host": Setting(str, DEFAULT_HOST, "IFLOW_PROXY_HOST", "address to listen on", None),
    "port": Setting(int, DEFAULT_PORT, "IFLOW_PROXY_PORT", "port to listen on (0 = any free "
                    "port)", _between(0, 65535)),
    "api_base": Setting(str, DEFAULT_API_BASE, "IFLOW_API_BASE", "chat API base URL", _http_url),
    "oauth_base": Setting(str, DEFAULT_OAUTH_BASE, "IFLOW_OAUTH_BASE", "OAuth host", _http_url),
    "platform_base": Setting(str, DEFAULT_PLATFORM_BASE, "IFLOW_PLATFORM_BASE",
                             "platform host (API keys from a cookie)", _http_url),
    "proxy": Setting(str, "", "IFLOW_PROXY_UPSTREAM_PROXY", "outbound HTTP proxy URL; empty = "
                     "HTTPS_PROXY/HTTP_PROXY/NO_PROXY; \"direct\" = none", _proxy_url),
    "ca_file": Setting(str, "", "IFLOW_PROXY_CA_FILE", "extra CA bundle (PEM) for upstream TLS",
                       None),
    "client_keys": Setting(list, [], "IFLOW_PROXY_CLIENT_KEYS", "keys clients must send (Bearer "
                           "or x-api-key): strings, or objects with a name and limits; "
                           "comma-separated in env", _client_key_list),
    "client_keys_file": Setting(str, "", "IFLOW_PROXY_CLIENT_KEYS_FILE", "file with one client "
                                "key per line (keeps keys out of `ps`)", None),
    "api_keys": Setting((list, str), [], "IFLOW_API_KEYS", "pooled iFlow API keys used without "
                        "login (list or comma-separated string)", _key_list),
    "model_aliases": Setting(dict, {}, None, "alias -> model, applied to every request",
                             _string_values),
    "model_fallbacks": Setting(dict, {}, None, "model -> [models to try next] when every "
                               "account for it is cooling, failing or busy", _fallback_chains),
    "legacy_aliases": Setting((str, dict), "fallback", None, "CCS legacy names: \"fallback\", "
                              "\"always\", \"off\", or {name: mode}", _legacy_modes),
    "extra_headers": Setting(dict, {}, None, "headers added to every signed upstream request",
                             _string_values),
    "user_agent": Setting(str, DEFAULT_USER_AGENT, None, "user-agent sent and signed", None),
    "connect_timeout": Setting(_NUMBER, 10, None, "seconds to connect upstream", _positive),
    "first_byte_timeout": Setting(_NUMBER, 300, None, "seconds to wait for upstream's first byte",
                                  _positive),
    "idle_timeout": Setting(_NUMBER, 120, None, "seconds of upstream silence allowed "
                            "mid-response", _positive),
    "responses_store": Setting(int, 1000, None, "Responses API answers kept in memory for "
                               "previous_response_id and GET /v1/responses/{id}; 0 keeps none",
                               _not_negative),
    "cooldown_wait": Setting(_NUMBER, 5, None, "seconds a request waits for an account's "
                             "cooldown to end (within queue_timeout) before answering 429",
                             _not_negative),
    "pool_idle_timeout": Setting(_NUMBER, 4, None, "seconds an idle upstream connection is "
                                 "kept for reuse (below the 5 s after which uvicorn and "
                                 "llama.cpp close theirs)", _positive),
    "send_timeout": Setting(_NUMBER, 60, None, "seconds a write to a client may make no "
                            "progress before the exchange ends (a client that stops reading)",
                            _positive),
    "max_body_bytes": Setting(int, 50 * 1024 * 1024, None, "largest request body accepted",
                              _not_negative),
    "max_inflight_body_bytes": Setting(int, 256 * 1024 * 1024, None, "request body bytes held "
                                       "at once across all requests (more wait, then 503)",
                                       _not_negative),
    "max_connections": Setting(int, 256, None, "client connections served at once (more get "
                               "503)", _at_least_one),
    "client_idle_timeout": Setting(_NUMBER, 120, None, "seconds an idle keep-alive client may "
                                   "wait", _positive),
    "header_timeout": Setting(_NUMBER, 30, None, "seconds a client has to send its request "
                              "headers", _positive),
    "body_timeout": Setting(_NUMBER, 120, None, "seconds a client has to send its request body",
                            _positive),
    "shutdown_grace": Setting(_NUMBER, 10, None, "seconds in-flight requests get to finish on "
                              "SIGTERM", _not_negative),
    "management_key": Setting(str, "", "IFLOW_PROXY_MANAGEMENT_KEY", "key of the management "
                              "API (/v0/management/); empty = the API is off", None),
    "management_allow_remote": Setting(bool, False, None, "accept management calls from other "
                                       "machines (with client keys and TLS in front)", None),
    "prices": Setting(dict, {}, None, "model -> {\"input\": …, \"output\": …} price per million "
                      "tokens, for the dashboard's cost estimate (see models)", _prices),
    "models": Setting(dict, {}, None, "model name or glob -> {window, output, vision, thinking, "
                      "prices, aliases}: what the proxy knows of a model, over the built-in "
                      "table (see Models)", _model_entries),
    "allowed_hosts": Setting(list, [], None, "Host header names accepted besides loopback names, "
                             "IP addresses and the listen address (\"*\" = any)", _string_list),
    "allowed_origins": Setting(list, [], None, "web origins (scheme://host:port) allowed to call "
                               "the API from a browser page", _string_list),
    "models_cache_ttl": Setting(_NUMBER, 300, None, "seconds to cache upstream /models",
                                _not_negative),
    "probe_model": Setting(str, DEFAULT_PROBE_MODEL, None, "model used by check and login "
                           "verification", None),
    "oauth_client_id": Setting(str, OAUTH_CLIENT_ID, None, "OAuth client id", None),
    "oauth_client_secret": Setting(str, OAUTH_CLIENT_SECRET, None, "OAuth client secret", None),
    "device_endpoint": Setting(str, "", "IFLOW_DEVICE_ENDPOINT", "RFC 8628 device authorization "
                               "URL (iFlow has none)", _optional_http_url),
    "callback_port": Setting(int, 11451, None, "local port of the OAuth callback listener",
                             _between(0, 65535)),
    "login_timeout": Setting(_NUMBER, 300, None, "seconds to wait for a browser or device login",
                             _positive),
    "refresh_lead": Setting(_NUMBER, 86400, None, "refresh OAuth tokens this many seconds before "
                            "expiry (at most half their lifetime)", _positive),
    "strategy": Setting(str, "round-robin", "IFLOW_PROXY_STRATEGY", "round-robin, least-busy or "
                        "fill-first", _one_of(*STRATEGIES)),
    "max_concurrency": Setting(int, 1, None, "requests in flight per account unless it sets its "
                               "own (0 = unlimited)", _not_negative),
    "queue_timeout": Setting(_NUMBER, 120, None, "seconds a request waits for a free account",
                             _not_negative),
    "max_attempts": Setting(int, 0, None, "accounts tried per request before giving up (0 = all)",
                            _not_negative),
    "claude_models": Setting(dict, {}, None, "Claude family (opus/sonnet/haiku) -> iFlow model",
                             _claude_families),
    "web_search": Setting(dict, {}, None, "the search backend that answers web-search tools: "
                          "{backend: auto|searxng|tavily|brave|exa|duckduckgo|none, url, "
                          "api_key, max_results, timeout}", _web_search),
    "class_models": Setting(dict, {}, None, "request class (auxiliary, side_reply, subagent, "
                            "workflow, compaction, main) -> model its requests go to, e.g. "
                            "housekeeping on a small fast model, compaction on a long window",
                            _class_models),
    "vision_model": Setting(str, "qwen3-vl-plus", None, "model that describes images for text "
                            "models", None),
    "describe_images": Setting(bool, True, None, "describe images for text-only models (else "
                               "400)", None),
    "vision_models": Setting(list, ["*-vl*"], None, "globs of models that accept images directly",
                             _string_list),
    "ping_interval": Setting(_NUMBER, 10, None, "seconds of upstream silence before an Anthropic "
                             "ping", _positive),
    "log_level": Setting(str, "info", "IFLOW_PROXY_LOG_LEVEL", "debug, info, warning or error",
                         _log_level),
    "log_file": Setting(str, "", "IFLOW_PROXY_LOG_FILE", "also write the log to this file", None),
}

_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object",
               bool: "true or false", _NUMBER: "a number", (str, dict): "a string or an object",
               (list, str): "a list or a comma-separated string"}


class Config(Record):
    """Every setting (see SETTINGS), resolved once in main() and passed down; never mutated."""

    # lists become tuples, so a Config never holds anything mutable
    FIELDS = dict([("home", REQUIRED)] + [(name, tuple(setting.default) if isinstance(
        setting.default, list) else setting.default) for name, setting in SETTINGS.items()])
    SECRET_FIELDS = ("api_keys", "client_keys", "management_key", "oauth_client_secret", "proxy",
                     "extra_headers")  # a proxy URL may hold a password; headers, keys

    def __post_init__(self):  # client keys as ClientKey, always
        self.__dict__["client_keys"] = tuple(client_key(k) for k in self.client_keys)

    @property
    def config_path(self):
        return os.path.join(self.home, "config.json")


def default_home(env=None):
    env = os.environ if env is None else env
    return env.get("IFLOW_PROXY_HOME") or os.path.join(os.path.expanduser("~"), ".iflow-proxy")


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _finite_float(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number %s is out of range" % text[:40])
    return value


# JSON as RFC 8259 has it: no NaN or Infinity (Python's json takes them, and they would reach
# timeouts and prices, or go out again as JSON no browser parses).  Made once: json.loads builds
# a decoder for every call with options.
STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _finite(value):
    return not isinstance(value, float) or value - value == 0  # (inf - inf and NaN are NaN)


def _check_type(value, types, where, key):
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in
                                            (types if isinstance(types, tuple) else (types,)))
    if not ok or not _finite(value):
        raise ConfigError("%s: key %r must be %s, got %s" % (
            where, key, _TYPE_NAMES.get(types, str(types)), json.dumps(value)[:60]))


def _from_env(key, raw, types):
    """Parse one environment variable into the config key's type."""
    name = SETTINGS[key].env
    if types in (list, (list, str)):
        return [part.strip() for part in raw.split(",") if part.strip()]
    if types in (int, _NUMBER):
        try:
            value = int(raw) if types is int else float(raw)
            if _finite(value):
                return value
        except ValueError:
            pass
        raise ConfigError("environment variable %s must be %s, got %r"
                          % (name, _TYPE_NAMES[types], raw))
    return raw


def _validate_value(key, value, where):
    """The setting's own check, shared by file, environment and flags."""
    check = SETTINGS[key].check
    problem = check and check(value)
    if problem:
        raise ConfigError("%s: key %r %s" % (where, key, problem))


def _is_http_url(value):
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # (a port out of range or not a number is a ValueError here, not later)
    except ValueError:  # and e.g. "http://[::1" (an unclosed bracket)
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def read_config_file(path):
    """The settings in ``config.json`` (empty when absent), validated key by key."""
    try:
        with open(path, "rb") as f:
            data = STRICT_JSON.decode(f.read().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError("%s: cannot read: %s" % (path, e.strerror))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError("%s: invalid JSON: %s" % (path, e))
    if not isinstance(data, dict):
        raise ConfigError("%s: must hold a JSON object of settings" % path)
    for key, value in data.items():
        if key.startswith("_"):  # "_comment" and friends
            continue
        if key not in SETTINGS:
            raise ConfigError("%s: unknown key %r (known keys: %s)"
                              % (path, key, ", ".join(sorted(SETTINGS))))
        _check_type(value, SETTINGS[key].types, path, key)
        _validate_value(key, value, path)
    return data


def read_key_file(path):
    """Client keys from a file, one per line (blank lines and # comments skipped)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except OSError as e:
        raise ConfigError("%s: cannot read the client keys file: %s" % (path, e.strerror))
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError("%s: the client keys file is not UTF-8 text" % path)
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def load_config(home=None, flags=None, env=None):
    """Resolve the Config: ``flags`` (dict of set options) > ``env`` > config.json > defaults."""
    env = os.environ if env is None else env
    home = os.path.abspath(os.path.expanduser(home or default_home(env)))
    values = {key: spec.default for key, spec in SETTINGS.items()}
    values.update((k, v) for k, v in read_config_file(os.path.join(home, "config.json")).items()
                  if not k.startswith("_"))
    for key, spec in SETTINGS.items():
        if spec.env and env.get(spec.env, "") != "":
            value = _from_env(key, env[spec.env], spec.types)
            _validate_value(key, value, "environment variable %s" % spec.env)
            values[key] = value
    for key, value in (flags or {}).items():
        if value is not None:
            if key == "client_keys":
                value = list(values[key]) + list(value)
            _validate_value(key, value, "option --%s" % key.replace("_", "-"))
            values[key] = value
    if isinstance(values["api_keys"], str):
        values["api_keys"] = [k.strip() for k in values["api_keys"].split(",") if k.strip()]
    if values["client_keys_file"]:
        values["client_keys"] = list(values["client_keys"]) + read_key_file(
            os.path.expanduser(values["client_keys_file"]))
    values["client_keys"] = [client_key(k) for k in values["client_keys"]]
    for key, spec in SETTINGS.items():
        if isinstance(spec.default, list):
            values[key] = tuple(dict.fromkeys(values[key]))
    values["log_level"] = values["log_level"].lower()
    for key in ("api_base", "oauth_base", "platform_base"):
        values[key] = values[key].rstrip("/")
    return Config(home=home, **values)


def loose_permission_warnings(config):
    """Files holding secrets that other local users can read (ssh warns the same way)."""
    warnings = []
    for path, what in ((config.config_path, "config.json"),
                       (config.client_keys_file, "the client keys file")):
        if not path or os.name != "posix":
            continue
        try:
            mode = os.stat(os.path.expanduser(path)).st_mode
        except OSError:
            continue
        if mode & 0o077 and (what != "config.json" or config.client_keys or config.api_keys):
            warnings.append("%s (%s) holds keys and is readable by other users (mode %03o); "
                            "run: chmod 600 %s" % (what, path, mode & 0o777, path))
    return warnings


def is_loopback(host):
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def select_proxy(url, configured="", env=None):
    """The outbound proxy URL for ``url``, or None (config ``proxy``, else *_PROXY/NO_PROXY)."""
    if configured == "direct":
        return None
    if configured:
        return configured
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if is_loopback(host):
        return None  # an environment proxy can't reach our own loopback
    env = os.environ if env is None else env

    def getenv(name):
        return env.get(name.lower()) or env.get(name.upper()) or ""

    proxy = getenv("%s_proxy" % parts.scheme) or getenv("all_proxy")
    if not proxy:
        return None
    for entry in getenv("no_proxy").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return None
        if "/" in entry:
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return None
            except ValueError:
                pass
            continue
        entry = entry.split(":")[0].lstrip("*").lstrip(".")
        if host == entry or host.endswith("." + entry):
            return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    return proxy


def proxy_auth_header(proxy_parts):
    if not proxy_parts.username:
        return {}
    creds = "%s:%s" % (urllib.parse.unquote(proxy_parts.username),
                       urllib.parse.unquote(proxy_parts.password or ""))
    return {"Proxy-Authorization": "Basic " + base64.b64encode(creds.encode()).decode()}


# ==================================================================================================
# Wire: HTTP/1.1 both ways: sockets, header fields, framing (RFC 9112), upstream pool, server side
# ==================================================================================================

# --- sockets: timeouts the kernel keeps -------------------------------------------------------

_TIMEVAL = struct.Struct("@ll")  # struct timeval {time_t tv_sec; suseconds_t tv_usec}


def _kernel_timeouts(sock):
    """Switch a plain TCP socket to blocking mode with SO_RCVTIMEO/SO_SNDTIMEO; False (and the
    socket left as it was) where the platform won't, or for TLS, whose reads must see Python's
    own timeouts.  CPython polls before every call on a socket that has a timeout, one more
    system call and one more hand-over of the GIL per read or write: the kernel's own timeouts
    keep the timeouts and drop the poll."""
    # An exact type check, not isinstance(sock, ssl.SSLSocket): ssl is imported lazily, and a
    # thread that looked it up while another was still importing it met a half-made module.
    if os.name != "posix" or type(sock) is not socket.socket or \
            not hasattr(socket, "SO_RCVTIMEO"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(1, 0))
        if _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                           _TIMEVAL.size))[0] != 1:
            return False
    except (OSError, struct.error):
        return False
    sock.settimeout(None)
    return True


class Timeouts:
    """A socket's timeouts: reads get one per phase (set(); None waits for ever); a write may
    make no progress for ``send`` seconds (nginx's send_timeout), for the socket's life.  With
    kernel timeouts (see _kernel_timeouts) a phase change is one setsockopt, and SO_SNDTIMEO
    ends only a write that moved nothing for that long; elsewhere Python's settimeout covers
    reads and writes alike, and writes get ``send`` once reading is done."""

    __slots__ = ("sock", "kernel", "seconds", "send")

    def __init__(self, sock, send=None):
        self.sock, self.seconds, self.send = sock, -1, send
        self.kernel = _kernel_timeouts(sock)
        if self.kernel and send:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send))

    def set(self, seconds):
        if seconds == self.seconds:
            return
        self.seconds = seconds
        if self.kernel:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        else:
            self.sock.settimeout(seconds)

    def reading_done(self):
        """No reads until the next set(): from now on writes have the send timeout."""
        if not self.kernel:
            self.set(self.send)


def _timeval(seconds):
    whole = int(seconds or 0)
    micro = int(((seconds or 0) - whole) * 1e6)
    if seconds and not whole and not micro:
        micro = 1  # a zero timeval would mean "no timeout"
    return _TIMEVAL.pack(whole, micro)


class SocketReader(io.RawIOBase):
    """A socket's bytes for io.BufferedReader (as socket.SocketIO), where a kernel timeout
    (EAGAIN on a blocking socket) is reported as socket.timeout, like Python's own.  tell() is
    the bytes received so far, so the reader's own tell() says how many it holds unread."""

    def __init__(self, sock):
        super().__init__()
        self._sock = sock
        self.received = 0

    def readable(self):
        return True

    def tell(self):
        return self.received

    def readinto(self, buffer):
        try:
            count = self._sock.recv_into(buffer)
        except BlockingIOError:
            raise socket.timeout("timed out") from None
        self.received += count
        return count


def send_all(sock, data):
    """sock.sendall, with a kernel timeout reported as socket.timeout."""
    try:
        sock.sendall(data)
    except BlockingIOError:
        raise socket.timeout("timed out") from None


class SocketWriter:
    """A connection's writer: every write goes out at once (no buffer to flush)."""

    closed = False

    def __init__(self, sock):
        self._sock = sock

    def write(self, data):
        send_all(self._sock, data)
        return len(data)

    def flush(self):
        pass

    def close(self):
        pass


def readable_now(socks):
    """The sockets among ``socks`` with something to read (or an EOF), without waiting."""
    if hasattr(select, "poll"):  # no FD_SETSIZE limit
        poller = select.poll()
        by_fd = {}
        for sock in socks:
            try:
                by_fd[sock.fileno()] = sock
                poller.register(sock, select.POLLIN)
            except (OSError, ValueError):
                continue
        return [by_fd[fd] for fd, _event in poller.poll(0) if fd in by_fd]
    try:
        return select.select(socks, [], [], 0)[0]
    except (OSError, ValueError):
        return []


def peers_gone(socks):
    """The sockets among ``socks`` whose peer has closed (or broken) its side, without waiting.
    Where poll has POLLRDHUP (Linux) it sees a peer's FIN even behind bytes not yet read: a
    client that sent one byte more than its request (a CRLF after the body) and left; elsewhere
    a readable socket is peeked for its end of file."""
    rdhup = getattr(select, "POLLRDHUP", 0)
    if not rdhup or not hasattr(select, "poll"):
        return [sock for sock in readable_now(socks) if peer_closed(sock)]
    poller, by_fd = select.poll(), {}
    for sock in socks:
        try:
            by_fd[sock.fileno()] = sock
            poller.register(sock, rdhup)  # (POLLHUP and POLLERR are reported unasked)
        except (OSError, ValueError):
            continue
    return [by_fd[fd] for fd, _event in poller.poll(0) if fd in by_fd]


def peer_closed(sock):
    """True when the peer has closed its side (readable, and a peek reads nothing)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except (BlockingIOError, InterruptedError, socket.timeout):
        return False
    except OSError:
        return True


# --- header fields: one small parser for both directions --------------------------------------

class HeaderError(ValueError):
    """A message head that breaks the limits or the grammar; ``status`` for a client's."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.message, self.status = message, status


class Headers:
    """The header fields of one message, in order: get()/get_all() ignore case, as
    email.message.Message's do (what http.client and http.server hand out), at a fraction of
    the cost — the standard parser goes through the email package for every message."""

    __slots__ = ("_items", "_first")

    def __init__(self, items=()):
        self._items, first = [], {}
        for name, value in items:
            value = value.rstrip(" \t")
            self._items.append((name, value))
            first.setdefault(name.lower(), value)
        self._first = first  # lower-case name -> its first value (what get() answers)

    def get(self, name, default=None):
        """The first value of field ``name`` (any case)."""
        return self._first.get(name.lower(), default)

    def get_all(self, name, default=None):
        key = name.lower()
        if key not in self._first:
            return default
        return [value for field, value in self._items if field.lower() == key]

    def __getitem__(self, name):
        return self.get(name)

    def __contains__(self, name):
        return name.lower() in self._first

    def __iter__(self):
        return (name for name, _value in self._items)

    def __len__(self):
        return len(self._items)

    def keys(self):
        return [name for name, _value in self._items]

    def items(self):
        return list(self._items)

    def __str__(self):
        return "".join("%s: %s\r\n" % item for item in self._items)


_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"  # RFC 9110 token characters
_CONTROL = r"\x00-\x08\x0a-\x1f\x7f"     # control bytes a field value may not hold (tab may)
_TOKEN = re.compile((_TCHAR + r"+\Z").encode())
_FIELD_VALUE_BAD = re.compile(("[%s]" % _CONTROL).encode())
# The whole field section at once: each line a token, a colon, a value without control bytes.
# One match over the block costs less than checking it line by line.
_FIELD_LINES = re.compile(r"(?:%s+:[^%s]*\r?\n)*\Z" % (_TCHAR, _CONTROL))
_FIELD_LINE = re.compile(r"([^:]+):[ \t]*([^\r\n]*)\r?\n")
MAX_HEADER_LINE = 65536


def read_headers(fp, limit=HEADER_LIMIT):
    """The header fields up to the blank line, by RFC 9112 section 5: a field name is a token
    right before its colon, obsolete line folding and control bytes are refused, and the line
    length and field count stay within http.client's limits (65,536 bytes, 100 fields).  The
    same reader takes a chunked body's trailer section."""
    peek = getattr(fp, "peek", None)
    if peek is not None:  # the whole section is usually in the buffer already: take it at once
        buffered = peek()
        end = buffered.find(b"\r\n\r\n")
        head = buffered[:end + 2]  # (with no blank line before it: a bare "\n" may end one)
        if 0 <= end < MAX_HEADER_LINE and head[:1] not in (b"\r", b"\n") and \
                b"\n\n" not in head and b"\n\r\n" not in head:
            block = fp.read(end + 4)[:-2]
            text = block.decode("latin-1")
            if text.count("\n") > limit:
                raise HeaderError("more than %d header fields" % limit, 431)
            if not _FIELD_LINES.match(text):
                _refuse_field_line([line + b"\n" for line in block.split(b"\n")[:-1]])
            return Headers(_FIELD_LINE.findall(text))
    lines, readline = [], fp.readline
    while True:
        line = readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise HeaderError("a header line is longer than %d bytes" % MAX_HEADER_LINE, 431)
        if line in {b"\r\n", b"\n"} or not line:
            break
        if len(lines) >= limit:
            raise HeaderError("more than %d header fields" % limit, 431)
        lines.append(line)
    text = b"".join(lines).decode("latin-1")
    if not _FIELD_LINES.match(text):
        _refuse_field_line(lines)
    return Headers(_FIELD_LINE.findall(text))


def _refuse_field_line(lines):
    """Say which field line is wrong, and how."""
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HeaderError("obsolete line folding in the header")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise HeaderError("malformed header line %r" % line[:60])
        if _FIELD_VALUE_BAD.search(value.rstrip(b"\r\n")) or not value.endswith(b"\n"):
            raise HeaderError("control characters in header %r" % name[:60])
    raise HeaderError("malformed header")


# --- framing: where a message ends, the same rules both ways -----------------------------------

_HTTP_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])\Z")
_DIGITS = re.compile(r"[0-9]{1,18}\Z")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
FRAMING_CODE = "bad_framing"


def http_version(text):
    """(major, minor) of an HTTP-version, RFC 9112 section 2.3's one digit each; else None."""
    m = _HTTP_VERSION.match(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def connection_options(headers):
    """Every option of every Connection field, lower case (RFC 9110 section 7.6.1)."""
    values = headers.get_all("Connection")
    if not values:
        return ()
    return {option.strip().lower() for value in values for option in value.split(",")}


def keeps_alive(version, headers):
    """Whether the connection may carry another message after this one (RFC 9112 9.3)."""
    options = connection_options(headers)
    if "close" in options:
        return False
    return version >= (1, 1) or "keep-alive" in options


def message_framing(headers, version, status=None, method=None):
    """(length, chunked, reusable) of a message body by RFC 9112 section 6.3, for requests
    (``status`` None) and responses alike.  ``length`` is None for a chunked body, and for a
    response read until the connection closes.  Refused (BadRequest "bad_framing"), as curl,
    nginx and Go refuse them: Content-Length values that differ or are not digits, any
    transfer coding but a lone chunked (we never offer others), Transfer-Encoding in HTTP/1.0,
    and in a request Transfer-Encoding beside Content-Length.  A response with both is read as
    chunked (section 6.3) and its connection never used again."""
    request = status is None
    if not request and (status < 200 or status in (204, 304) or method == "HEAD"):
        return 0, False, True
    coding_fields = headers.get_all("Transfer-Encoding")
    length_fields = headers.get_all("Content-Length")
    length = _content_length(length_fields) if length_fields else None
    if coding_fields:
        codings = [c.strip().lower() for value in coding_fields for c in value.split(",")]
        if request and length_fields:
            raise BadRequest("a request may not have both Transfer-Encoding and Content-Length",
                             code=FRAMING_CODE)
        if version < (1, 1) or codings != ["chunked"]:
            raise BadRequest("Transfer-Encoding %r is not supported: send chunked (HTTP/1.1) "
                             "or a Content-Length" % ", ".join(codings), code=FRAMING_CODE)
        return None, True, not length_fields
    if length is not None:
        return length, False, True
    return (0, False, True) if request else (None, False, False)


def _content_length(fields):
    """The one length that every Content-Length field and list member states."""
    values = {v.strip() for field in fields for v in field.split(",")}
    if len(values) != 1 or not _DIGITS.match(next(iter(values))):
        raise BadRequest("invalid Content-Length header%s" % (
            "s (they differ)" if len(values) > 1 else ""), code=FRAMING_CODE)
    return int(values.pop())


class ChunkedBody:
    """A chunked body (RFC 9112 section 7.1) from a buffered reader, piece by piece: read1()
    gives chunk data as it arrives, b"" once the last chunk and its trailer section (read by
    read_headers, with its limits) are in.  Sizes of up to 16 hex digits, extensions ignored,
    CRLF after every size line and every chunk's data; ValueError for anything else,
    ConnectionResetError for a body cut short."""

    __slots__ = ("reader", "left", "done")

    def __init__(self, reader):
        self.reader, self.left, self.done = reader, -1, False  # -1: a chunk-size line next

    def read1(self, most=65536):
        if self.done:
            return b""
        reader = self.reader
        if self.left <= 0:
            if self.left == 0 and reader.read(2) != b"\r\n":  # the end of the last chunk
                raise ValueError("a chunk without its CRLF")
            line = reader.readline(1026)
            size = line[:-2].split(b";", 1)[0].rstrip(b" \t")
            if not line.endswith(b"\r\n") or not _CHUNK_SIZE.match(size):
                if not line:
                    raise ConnectionResetError("the body ended early")
                raise ValueError("a malformed chunk-size line")
            self.left = int(size, 16)
            if self.left == 0:
                read_headers(reader)  # the trailer section, up to the blank line
                self.done = True
                return b""
        data = reader.read1(min(self.left, most))
        if not data:
            raise ConnectionResetError("the body ended early")
        self.left -= len(data)
        return data


# --- upstream: connections, their answers, and the pool -----------------------------------------

def read_status(reader):
    """((major, minor), status, reason, Headers) of an HTTP/1.x answer, interim 1xx answers
    skipped."""
    while True:
        line = reader.readline(MAX_HEADER_LINE + 1)
        if not line:
            raise ConnectionResetError("the server closed the connection without answering")
        parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        version = http_version(parts[0])
        if len(parts) < 2 or version is None or version[0] != 1 or \
                not _STATUS_CODE.match(parts[1]):
            raise HeaderError("malformed status line %r" % line[:60])
        headers = read_headers(reader)
        status = int(parts[1])
        if not 100 <= status < 200 or status == 101:
            return version, status, parts[2] if len(parts) > 2 else "", headers


_STATUS_CODE = re.compile(r"[1-9][0-9][0-9]\Z")
_BAD_OUTGOING = re.compile(r"[\x00\r\n]")


class UpstreamConnection:
    """One keep-alive HTTP/1.1 connection upstream (directly, through a CONNECT tunnel, or to
    a proxy taking absolute-form targets).  A request goes out in one write, head and body;
    the answer's head is read by read_status/read_headers, its body by UpstreamResponse."""

    def __init__(self, sock, host, send_timeout=None):
        self.sock, self.host = sock, host
        self.idle_since = 0.0  # set when it goes back to the pool
        self.timeouts = Timeouts(sock, send_timeout)
        self.raw = SocketReader(sock)
        self.reader = io.BufferedReader(self.raw)
        self.step = None  # every read's own timeout (see expect)

    def expect(self, first_byte, idle):
        """Reads wait at most the smaller of upstream's two timeouts, set once: changing a
        socket's timeout twice per request costs a system call each, with the GIL held.
        wait() stretches a wait to the larger one."""
        self.step = min(first_byte, idle)
        self.timeouts.set(self.step)

    def wait(self, seconds):
        """Until a byte (or the end) is there to read, up to ``seconds``, else socket.timeout.
        A wait no longer than ``step`` is left to the read itself."""
        if self.step is None or seconds <= self.step:
            return
        try:
            self.reader.peek(1)
            return
        except socket.timeout:  # rare and slow already: a system call or two more is nothing
            pass
        self.timeouts.set(seconds - self.step)
        try:
            self.reader.peek(1)
        finally:
            self.timeouts.set(self.step)

    def send(self, method, target, headers, body):
        if _BAD_OUTGOING.search("".join(headers.values())):
            raise ValueError("a header value for upstream holds CR, LF or NUL")
        head = ["%s %s HTTP/1.1\r\nHost: %s\r\nAccept-Encoding: identity" % (method, target,
                                                                           self.host)]
        head.extend("%s: %s" % item for item in headers.items())
        head.append("Content-Length: %d\r\n\r\n" % len(body or b""))
        send_all(self.sock, "\r\n".join(head).encode("latin-1") + (body or b""))

    def buffered(self):
        """Bytes read from the socket and not yet taken from the reader."""
        try:
            return self.raw.received - self.reader.tell()
        except (OSError, ValueError):  # closed
            return -1

    def quiet(self, ask_kernel=True):
        """Nothing left over and nothing arriving: no byte buffered (TLS's own buffer too), no
        byte nor end of file on the socket.  Only such a connection may carry a request: a
        byte there now would be read as the next request's answer (pool poisoning), an end of
        file means the server closed it.  (``ask_kernel`` False: the buffers only.)"""
        if self.buffered() != 0 or getattr(self.sock, "pending", lambda: 0)():
            return False
        if not ask_kernel:
            return True
        try:  # one descriptor: select is the cheapest question (poll needs an object made)
            return not select.select((self.sock,), (), (), 0)[0]
        except (ValueError, OSError):  # a descriptor past FD_SETSIZE: poll
            return not readable_now([self.sock])

    def abort(self):
        """Cut it now, from any thread: whoever waits on it wakes to an error."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.sock.close()


class UpstreamResponse:
    """One upstream answer, its body framed by message_framing (chunked, Content-Length, or
    until the close); its connection goes back to the pool only when the body was read to its
    exact end and the connection may carry another request."""

    def __init__(self, pool, key, conn, head, idle_timeout, method="POST"):
        version, status, _reason, headers = head
        self._pool, self._key, self._conn = pool, key, conn
        self.status, self.headers, self.idle_timeout = status, headers, idle_timeout
        self._lock = threading.Lock()  # abort() from another thread vs. the pool taking it back
        self.trace_id = headers.get("eagleeye-traceid", "") or ""
        self.content_type = (headers.get("content-type", "") or "").lower()
        self.closed = False
        try:
            self._left, chunked, clean = message_framing(headers, version, status, method)
        except ProxyError as e:
            conn.close()
            self.closed = True
            raise UpstreamError("malformed", "upstream answer: %s" % e.message) from None
        # body bytes still to read (None: until the close); the chunked decoder, if chunked
        self._chunks = ChunkedBody(conn.reader) if chunked else None
        self._reusable = clean and (chunked or self._left is not None) and \
            keeps_alive(version, headers)
        if self._left == 0:
            self.finish()

    @property
    def is_event_stream(self):
        return "text/event-stream" in self.content_type

    def read1(self):
        """Whatever bytes have arrived (b"" at the end); waits at most idle_timeout."""
        if self.closed:
            return b""
        try:
            if self._chunks is not None or self._left != 0:  # more to come: wait for it
                self._conn.wait(self.idle_timeout)
            data = self._chunks.read1() if self._chunks is not None else self._read_plain()
        except socket.timeout:
            self.close()
            raise UpstreamError("timeout", "upstream sent nothing for %gs" % self.idle_timeout,
                                trace_id=self.trace_id)
        except (OSError, ValueError) as e:
            self.close()
            raise UpstreamError("transient", "upstream connection broke mid-response: %s"
                                % (e.__class__.__name__,), trace_id=self.trace_id)
        if not data:
            self.finish()
        return data

    def _read_plain(self):
        if self._left is None:  # until the connection closes
            return self._conn.reader.read1(65536)
        if self._left == 0:
            return b""
        # (not min(left, 65536): a read of exactly what is left would leave bytes sent past
        # the length in the socket, unseen; read with the rest, they mark the connection)
        data = self._conn.reader.read1(65536)
        if not data:
            raise ConnectionResetError("the body ended early")
        if len(data) > self._left:  # more than it said: never carries another request
            data, self._reusable = data[:self._left], False
        self._left -= len(data)
        return data

    def read_all(self, limit=None):
        chunks, size = [], 0
        while True:
            data = self.read1()
            if not data:
                return b"".join(chunks)
            chunks.append(data)
            size += len(data)
            if limit is not None and size > limit:
                self.close()
                raise UpstreamError("malformed", "upstream answer larger than %d bytes" % limit)

    def finish(self):
        """The body was read to its end: the connection back to the pool, if it may carry
        another request."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        done = self._chunks.done if self._chunks is not None else self._left == 0
        if self._reusable and done:
            self._pool.release(self._key, self._conn)
        else:
            self._conn.close()

    def close(self):
        """Drop the connection (a half-read response must never go back to the pool)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self._conn.close()

    def abort(self):
        """Cut the connection now, from any thread, unless it went back to the pool (where it
        is no longer this answer's to cut)."""
        with self._lock:
            if not self.closed:
                self._conn.abort()


# A connection idle for less than this is taken back without asking the kernel whether bytes or
# an end of file wait on it (one system call, and a hand-over of the GIL, per request: 15-20 %
# of the requests/s at concurrency 16 in the benchmark).  Leftovers of its last answer were
# looked for in its buffer as it came back (see UpstreamResponse._read_plain, release); a
# server that closed it in that time is met by the resend (UpstreamClient.open).
ASK_KERNEL_AFTER = 0.05


class ConnectionPool:
    """Idle keep-alive connections per (scheme, host, port, proxy); LIFO so warm ones go first.
    A connection comes back only read to its exact end with nothing left over (see
    UpstreamResponse.finish, release); it is dropped once idle for ``idle_limit`` seconds
    (config pool_idle_timeout, below the 5 s after which uvicorn and cpp-httplib close theirs)
    and handed out only while quiet (see UpstreamConnection.quiet)."""

    # 64: at 64 concurrent requests to one upstream, a smaller pool closed and reopened about
    # one connection in a hundred requests
    def __init__(self, config, max_idle_per_host=64, env=None, clock=time.monotonic):
        self.config, self.clock = config, clock
        self.max_idle = max_idle_per_host
        self._env = env
        self._idle = {}
        self._lock = threading.Lock()
        self._ssl_context = None
        self._routes = {}   # url -> route(url); the environment's proxy settings don't change

    def ssl_context(self):
        if self._ssl_context is None:
            self._ssl_context = tls_context(self.config.ca_file)
        return self._ssl_context

    def route(self, url):
        """(pool key, request target, extra headers) for ``url`` (worked out once per URL)."""
        known = self._routes.get(url)
        if known is None:
            known = self._routes[url] = self._route(url)
            trim_oldest(self._routes, 256)
        return known

    def _route(self, url):
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        proxy = select_proxy(url, self.config.proxy, self._env)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        extra = {}
        if proxy and parts.scheme == "http":  # plain HTTP through a proxy: absolute-form target
            target = "http://%s:%d%s" % (parts.hostname, port, target)
            extra = proxy_auth_header(urllib.parse.urlsplit(proxy))
        return (parts.scheme, parts.hostname, port, proxy), target, extra

    def acquire(self, key):
        """(connection, reused): an idle one still fresh and quiet, else a new one."""
        while True:
            with self._lock:  # (the check below waits on a system call: not under the lock)
                idle = self._idle.get(key)
                conn = idle.pop() if idle else None
            if conn is None:
                return self._connect(key), False
            idle_for = self.clock() - conn.idle_since
            if idle_for < self.config.pool_idle_timeout and \
                    conn.quiet(ask_kernel=idle_for >= ASK_KERNEL_AFTER):
                return conn, True
            conn.close()

    def release(self, key, conn):
        """Keep ``conn`` for the next request to ``key``, unless bytes are left over in its
        reader (an answer longer than it said: they would be read as the next one's)."""
        if conn.buffered() != 0:
            conn.close()
            return
        now, stale = self.clock(), []
        with self._lock:
            idle = self._idle.setdefault(key, [])
            while idle and now - idle[0].idle_since >= self.config.pool_idle_timeout:
                stale.append(idle.pop(0))  # the oldest at the bottom: closed, not kept
            if len(idle) < self.max_idle:
                conn.idle_since = now
                idle.append(conn)
                conn = None
        for old in stale + [conn] if conn is not None else stale:
            old.close()

    def close_all(self):
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()

    def _connect(self, key):
        scheme, host, port, proxy = key
        where = "%s://%s:%d%s" % (scheme, host, port, " via proxy %s" % proxy if proxy else "")
        sock = None
        try:
            if proxy:
                p = urllib.parse.urlsplit(proxy)
                sock = socket.create_connection((p.hostname, p.port or 80),
                                                self.config.connect_timeout)
                if scheme == "https":
                    _open_tunnel(sock, host, port, proxy_auth_header(p))
            else:
                sock = socket.create_connection((host, port), self.config.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                sock = self.ssl_context().wrap_socket(sock, server_hostname=host)
        except socket.timeout:
            _close_quietly(sock)
            raise UpstreamError("unreachable", "timed out connecting to %s" % where)
        except (OSError, ValueError) as e:
            _close_quietly(sock)
            if is_tls_error(e):
                raise UpstreamError("unreachable", "TLS error talking to %s: %s (a corporate "
                                    "proxy may need config ca_file)" % (where, e.reason or e))
            raise UpstreamError("unreachable", "cannot connect to %s: %s"
                                % (where, getattr(e, "strerror", None) or e))
        default_port = 443 if scheme == "https" else 80
        name = "[%s]" % host if ":" in host else host
        return UpstreamConnection(sock, name if port == default_port else "%s:%d" % (name, port),
                                  self.config.first_byte_timeout)


def tls_context(ca_file=""):
    """A client TLS context checking certificates (ssl is imported here, its one place: most
    start-ups never need it), with config ca_file's certificates added."""
    import ssl
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(ca_file)
    return context


def is_tls_error(error):
    """Whether ``error`` is ssl's (which is loaded only once a TLS connection was tried)."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(error, ssl.SSLError)


def _close_quietly(sock):
    if sock is not None:
        sock.close()


def _open_tunnel(sock, host, port, headers):
    """Ask an outbound proxy for a tunnel (CONNECT, RFC 9110 section 9.3.6) to host:port."""
    authority = "%s:%d" % ("[%s]" % host if ":" in host else host, port)
    lines = ["CONNECT %s HTTP/1.1" % authority, "Host: " + authority]
    lines.extend("%s: %s" % item for item in headers.items())
    send_all(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    reader = io.BufferedReader(SocketReader(sock), 1)  # nothing past the head may be taken
    _version, status, reason, _headers = read_status(reader)
    if not 200 <= status < 300:
        raise OSError("the proxy refused the tunnel: %d %s" % (status, reason))


class StaleConnection(Exception):
    """A reused connection failed before any byte of the answer came: the server had closed
    it while it sat in the pool, so the request is sent again on a fresh one."""


class UpstreamClient:
    """Sends requests upstream over pooled keep-alive connections."""

    def __init__(self, config, env=None):
        self.config = config
        self.pool = ConnectionPool(config, env=env)

    def open(self, method, url, headers, body=None, watch=None):
        """Send a request and return the UpstreamResponse once its head arrived.

        A request that fails on a reused connection before any byte of its answer arrived is
        sent once more on a fresh connection (as urllib3 and Go's net/http do): a server that
        closed an idle connection never saw it, and that is no failure of the account.
        ``watch(target)`` is told each connection used, then the response, so that another
        thread can cut it (a client that left, a proxy that is stopping) with target.abort()
        while this one waits on it.
        """
        key, target, extra = self.pool.route(url)
        if extra:
            headers = dict(headers, **extra)
        while True:
            conn, reused = self.pool.acquire(key)
            if watch is not None:
                watch(conn)
            try:
                head = self._send(conn, reused, method, target, headers, body)
                break
            except StaleConnection:
                log.debug("upstream %s closed an idle connection; sending again on a new one",
                          conn.host)
        response = UpstreamResponse(self.pool, key, conn, head, self.config.idle_timeout, method)
        if watch is not None:
            watch(response)
        return response

    def _send(self, conn, reused, method, target, headers, body):
        """The request on ``conn``, and its answer's head."""
        received = conn.raw.received
        try:
            conn.expect(self.config.first_byte_timeout, self.config.idle_timeout)
            conn.send(method, target, headers, body)
        except socket.timeout:
            conn.close()
            raise UpstreamError("timeout", "timed out sending the request upstream")
        except OSError as e:
            conn.close()
            if reused and isinstance(e, _STALE_ERRORS):
                raise StaleConnection() from None
            raise UpstreamError("transient", "cannot send upstream: %s" % e)
        try:
            conn.wait(self.config.first_byte_timeout)
            return read_status(conn.reader)
        except socket.timeout:
            conn.close()
            raise UpstreamError("timeout", "no answer from upstream within %gs (config "
                                "first_byte_timeout)" % self.config.first_byte_timeout)
        except (OSError, ValueError) as e:
            conn.close()
            if reused and isinstance(e, _STALE_ERRORS) and conn.raw.received == received:
                raise StaleConnection() from None
            raise UpstreamError("transient", "upstream closed the connection without answering "
                                "(%s)" % e.__class__.__name__)

    def close(self):
        self.pool.close_all()


_STALE_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


# --- the server side: one client connection, request by request -----------------------------------

DRAIN_LIMIT = 1 << 20      # an unread request body up to this size is read and dropped
STATUS_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}
_PLAIN_HEADER_VALUE = re.compile(r"[ -~]*\Z")
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7f) if chr(c) != "%")
# method SP request-target SP HTTP-version (RFC 9112 section 3; HTAB taken as SP), the target
# without controls or spaces; the version is checked on its own (see parse_request)
_REQUEST_LINE = re.compile(r"(%s+)[ \t]+([^\x00-\x20\x7f]+)[ \t]+(\S+)\Z" % _TCHAR)


def header_value(text):
    """``text`` safe for a response header: printable ASCII kept, anything else %-escaped."""
    if _PLAIN_HEADER_VALUE.match(text):
        return text
    return urllib.parse.quote(text, safe=_HEADER_SAFE)


class ServerConnection(socketserver.StreamRequestHandler):
    """One client connection, read the way http.server reads one: wait for a request, its line
    and header fields, then dispatch() (the hook: a subclass checks, routes and answers,
    reading the body with read_body), until a request or an answer closes the connection.
    Bodies are framed by message_framing; answers go out with send_bytes, or start_stream,
    write_chunk and end_stream, each in as few writes as possible.  Deadlines come from the
    server: its watch() cuts a connection still doing the same thing after its time."""

    protocol_version = "HTTP/1.1"
    server_version = "iflow-proxy/" + __version__
    METHODS = frozenset(("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"))

    def setup(self):
        """The connection's reader and writer over the socket itself, with kernel timeouts
        (see Timeouts) in place of Python's per-call poll, and the send timeout."""
        self.connection = self.request
        self.requests_served = 0
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeouts = Timeouts(self.connection, self.server.config.send_timeout)
        self.rfile = io.BufferedReader(SocketReader(self.connection))
        self.wfile = SocketWriter(self.connection)

    def handle(self):
        """Requests on this connection until one closes it."""
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.handle_one_request()

    def handle_one_request(self):
        """Wait for a request — header_timeout for a connection's first, client_idle_timeout
        between kept-alive ones, either cut short when the connection cap needs the slot —
        then give its headers header_timeout in all.  (Socket timeouts change only when their
        value does: a setsockopt per request is measurable.)"""
        config = self.server.config
        self.server.set_idle(self, True)
        try:
            self.timeouts.set(config.client_idle_timeout if self.requests_served
                              else config.header_timeout)
            arrived = self.rfile.peek(1)
        except (OSError, ValueError):
            arrived = b""
        finally:
            self.server.set_idle(self, False)
        if not arrived:
            self.close_connection = True
            return
        self.requests_served += 1  # the watchdog gives the headers header_timeout in all
        self.server.watch(self, config.header_timeout, "sending request headers")
        try:
            self.begin_request()
            if self.parse_request():
                self.server.watch(self, None, None)  # the body has its own deadline
                self.dispatch()
        except socket.timeout:
            log.debug("%s: request timed out", self.client_address[0])
            self.close_connection = True
        except (OSError, ValueError):  # cut by the watchdog, or the client vanished
            self.close_connection = True
        finally:
            self.server.watch(self, None, None)

    def begin_request(self):
        """The wire's state for a new request (dispatch() adds its own)."""
        self.request_id = self.server.request_id()
        self.command, self.path, self.headers, self.requestline = None, "", None, ""
        self.request_version, self.version = "HTTP/0.9", (0, 9)
        self.close_connection = True
        self.api = "openai"    # the format errors are written in (dispatch may say otherwise)
        self.started = time.monotonic()
        self.response_status = self.first_byte = None
        self.body_length, self.body_chunked, self.body_unread = 0, False, False
        self.body_reserved = 0
        self.expect_continue = False   # a 100 Continue is owed before the body is read
        self.log_fields = {}

    def dispatch(self):
        """Answer the request whose line and header fields were read (a subclass's)."""
        raise NotImplementedError

    # --- the request line and header fields ---------------------------------------------------
    def parse_request(self):
        """The request line and header fields, checked; False after answering a bad one."""
        line = self.rfile.readline(65537)
        if len(line) > 65536:
            self.send_error(414, "request line longer than 65,536 bytes")
            return False
        if not line:
            return False
        self.requestline = line.decode("latin-1").rstrip("\r\n")
        if not line.endswith(b"\r\n") and not line.endswith(b"\n"):
            return False  # cut off: the client is gone
        match = _REQUEST_LINE.match(self.requestline)
        if match is None:
            self.send_error(400, "Bad request syntax (%r)" % self.requestline[:200])
            return False
        self.command, self.path, self.request_version = match.groups()
        version = http_version(self.request_version)
        if version is None or version >= (2, 0):
            self.send_error(400, "Bad or unsupported HTTP version (%r): send HTTP/1.1"
                            % self.request_version[:100])
            return False
        self.version = version
        if self.path.startswith("//"):  # gh-87389: never an absolute URI without scheme
            self.path = "/" + self.path.lstrip("/")
        try:
            self.headers = read_headers(self.rfile)
        except HeaderError as e:
            self.send_error(e.status, e.message)
            return False
        return self.check_head()

    def check_head(self):
        """What RFC 9112 asks of every request head: a known method, one Host in HTTP/1.1
        (section 3.2), a body framing two readers can't take differently (section 6)."""
        if self.command not in self.METHODS:
            self.send_error(405, "Unsupported method (%r)" % self.command[:50])
            return False
        hosts = self.headers.get_all("Host") or ()
        if len(hosts) > 1 or not hosts and self.version >= (1, 1):
            self.send_error(400, "an HTTP/1.1 request needs exactly one Host header (it has %d)"
                            % len(hosts))
            return False
        try:
            length, self.body_chunked, _clean = message_framing(self.headers, self.version)
        except BadRequest as e:
            self.send_error(400, e.message, e.code)  # where this body ends is unknowable
            return False
        self.body_length = length or 0
        self.body_unread = self.body_chunked or bool(self.body_length)
        self.close_connection = not keeps_alive(self.version, self.headers)
        self.expect_continue = self.body_unread and self.version >= (1, 1) and \
            (self.headers.get("Expect") or "").lower() == "100-continue"
        return True

    # --- the request body ----------------------------------------------------------------------
    def read_body(self):
        """The whole body, within config max_body_bytes and body_timeout (one deadline for
        all of it); a 100 Continue goes out first if the client waits for one."""
        config = self.server.config
        self.timeouts.set(config.body_timeout)
        self.server.watch(self, config.body_timeout, "sending the request body")
        try:
            return self._read_body(config.max_body_bytes)
        except ProxyError:
            self.close_connection = True  # the rest of the body is unread: can't reuse
            raise
        except (socket.timeout, OSError, ValueError):
            self.close_connection = True
            raise BadRequest("timed out reading the request body", status=408,
                             code="request_timeout")
        finally:
            self.server.watch(self, None, None)
            self.timeouts.reading_done()

    def _read_body(self, limit):
        if not self.body_chunked and self.body_length > limit:
            raise PayloadTooLarge("request body of %d bytes exceeds the limit of %d bytes "
                                  "(config max_body_bytes)" % (self.body_length, limit))
        if self.expect_continue:  # only now: after the checks, and only for a body we want
            self.expect_continue = False
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n", interim=True)
        if self.body_chunked:
            data = self._read_chunked(limit)
        else:
            size = self.body_length
            self._reserve(size)
            data = self.rfile.read(size)
            if len(data) < size:  # the client stopped sending (or the watchdog cut it off)
                raise BadRequest("request body ended after %d of %d bytes" % (len(data), size))
        self.body_unread = False
        return data

    def _reserve(self, size):
        if not self.server.bodies.take(size):
            raise ProxyError("the proxy is holding too many large request bodies (config "
                             "max_inflight_body_bytes); retry shortly", status=503,
                             code="server_busy", retry_after=1)
        self.body_reserved += size

    def _read_chunked(self, limit):
        body, parts, size = ChunkedBody(self.rfile), [], 0
        while True:
            try:
                data = body.read1()
            except ConnectionResetError:
                raise BadRequest("truncated chunked request body") from None
            except HeaderError as e:
                raise BadRequest("malformed trailer in chunked request body: %s" % e.message,
                                 status=e.status) from None
            except ValueError as e:
                raise BadRequest("malformed chunked request body: %s" % e) from None
            if not data:
                return b"".join(parts)
            size += len(data)
            if size > limit:
                raise PayloadTooLarge("request body exceeds the limit of %d bytes (config "
                                      "max_body_bytes)" % limit)
            self._reserve(len(data))
            parts.append(data)

    def end_request(self):
        """After the answer: a body it left unread must not be taken for the next request.
        A small one is read and dropped, within what is left of body_timeout (the watchdog
        cuts a trickle); a large or chunked one, or one the client waits to be asked for,
        closes the connection.  The body budget is given back."""
        self.server.bodies.give(self.body_reserved)
        self.body_reserved = 0
        if not self.body_unread or self.close_connection:
            return
        if self.body_chunked or self.body_length > DRAIN_LIMIT or self.expect_continue:
            self.close_connection = True
            return
        config = self.server.config
        self.server.watch(self, config.body_timeout, "sending a request body nobody reads")
        try:
            self.timeouts.set(config.body_timeout)
            if len(self.rfile.read(self.body_length)) < self.body_length:
                self.close_connection = True
        except (OSError, ValueError):
            self.close_connection = True
        finally:
            self.server.watch(self, None, None)

    # --- answers -------------------------------------------------------------------------------
    def _write(self, data, interim=False):
        if self.first_byte is None and not interim:
            self.first_byte = time.monotonic()
        try:
            self.wfile.write(data)
        except (OSError, ValueError):  # reset, broken pipe, send timeout, closed file
            self.close_connection = True
            raise ClientGone()

    def _head(self, status, headers):
        self.response_status = status
        if self.body_unread and (self.body_chunked or self.body_length > DRAIN_LIMIT or
                                 self.expect_continue):
            self.close_connection = True  # a body we won't read: say so in this answer
        lines = ["HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\nx-request-id: %s" % (
            status, STATUS_PHRASES.get(status, "Unknown"), self.server_version,
            self.server.http_date(), self.request_id)]
        lines.extend("%s: %s" % (name, header_value(value)) for name, value in headers.items())
        if self.close_connection:
            lines.append("Connection: close")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")

    def send_bytes(self, status, body, content_type="application/json", headers=None):
        """One complete response in a single write (no Nagle delay between head and body);
        HEAD gets the head alone (RFC 9110 section 9.3.2)."""
        head = dict(headers or {})
        head["Content-Type"] = content_type
        head["Content-Length"] = str(len(body))
        self._write(self._head(status, head) + (b"" if self.command == "HEAD" else body))

    def send_json(self, status, obj, headers=None):
        self.send_bytes(status, json_bytes(obj), headers=headers)

    def send_error_json(self, err):
        """``err`` in the client's API format, unless an answer already began (a stream's
        relay reports errors itself)."""
        if self.response_status is not None:
            return
        headers = {}
        if err.retry_after is not None:
            headers["Retry-After"] = str(int(err.retry_after))
            headers["x-should-retry"] = "true"  # the Anthropic SDK's word for "wait, then retry"
        if getattr(err, "allow", None):
            headers["Allow"] = err.allow
        self.log_fields.setdefault("error", err.message)
        with contextlib.suppress(ClientGone):
            self.send_json(err.status, error_body(err, self.api), headers)

    def send_error(self, status, message, code="bad_http_request"):
        """A request the wire refuses (its line, head or framing), in JSON too; the
        connection closes after it, as nothing after a bad head can be trusted."""
        self.close_connection = True
        self.send_error_json(ProxyError(message, status=status, code=code))

    def start_stream(self, headers=None):
        head = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
        head.update(headers or {})
        if self.version < (1, 1):
            self.close_connection = True  # no chunked encoding: the close ends the body
        else:
            head["Transfer-Encoding"] = "chunked"
        self._write(self._head(200, head))

    def write_chunk(self, data):
        if data:
            self.last_write = time.monotonic()
            if self.version < (1, 1):
                self._write(data)
            else:
                self._write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_stream(self, last=b""):
        """The last event (if any) and the end of the body, in one write."""
        if self.version < (1, 1):
            self.write_chunk(last)
        else:
            self._write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last) if last else b"0\r\n\r\n")

    def finish(self):
        with contextlib.suppress(OSError):
            super().finish()


# ==================================================================================================
# Storage: atomic private JSON files, an inter-process lock, the account registry
# ==================================================================================================

def ensure_private_dir(path):
    """Create ``path`` (and missing parents) as 0700 directories of ours.

    A directory that already exists is left exactly as it is: it may be /tmp or a user's own
    folder, whose mode is not the proxy's to change.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        ensure_private_dir(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    if os.name == "posix":
        os.chmod(path, 0o700)  # the umask may have taken bits we want; it is ours, just made


def create_private_file(directory, pattern):
    """A new file in ``directory`` named by ``pattern`` with a random part: (fd, path), opened
    for writing, mode 0600, never an existing file or a symlink (what tempfile.mkstemp does,
    without loading tempfile, shutil and their compression modules into every server)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | \
        getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = os.path.join(directory, pattern % os.urandom(6).hex())
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError("no unused temporary file name in %s" % directory)


def atomic_write_json(path, data):
    """Write ``data`` so that ``path`` is always either the old or the new file, mode 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    ensure_private_dir(directory)
    payload = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    fd, tmp = create_private_file(directory, "." + os.path.basename(path) + ".%s.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_json_file(path, what="file"):
    """The JSON object in ``path``; a clear ConfigError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            data = STRICT_JSON.decode(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ConfigError("%s: cannot read %s: %s" % (path, what, e.strerror))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError("%s: %s is not valid JSON: %s" % (path, what, e))
    if not isinstance(data, dict):
        raise ConfigError("%s: %s must hold a JSON object" % (path, what))
    return data


class FileLock:
    """An exclusive lock shared by threads of this process and by other processes (flock)."""

    def __init__(self, path):
        self.path = path
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd = None

    def __enter__(self):
        self._thread_lock.acquire()
        if self._depth == 0:
            try:
                ensure_private_dir(os.path.dirname(self.path))
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                elif msvcrt is not None:  # pragma: no cover - Windows
                    msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
            except BaseException:
                self._thread_lock.release()
                raise
            self._fd = fd
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            fd, self._fd = self._fd, None
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                elif msvcrt is not None:  # pragma: no cover - Windows
                    os.lseek(fd, 0, 0)
                    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            finally:
                os.close(fd)
        self._thread_lock.release()


ACCOUNT_KINDS = ("api-key", "oauth", "cookie", "pool")
ACCOUNT_STATES = ("ok", "needs-login", "disabled")


class Account(Record):
    """One upstream credential as the router sees it (a snapshot; never mutated)."""

    FIELDS = {
        "id": REQUIRED,
        "nickname": REQUIRED,
        "kind": REQUIRED,
        "api_key": REQUIRED,
        "email": "",
        "base_url": "",           # empty: the config's api_base
        "signing": True,          # iFlow headers + HMAC; off for plain OpenAI-compatible APIs
        "default": False,
        "status": "ok",
        "status_reason": "",
        "max_concurrency": None,  # None: the config's max_concurrency; 0 = unlimited
        "priority": 0,
        "models": (),
        "excluded_models": (),
        "expires": "",
        "refresh_error": "",
        "provider": "",           # a PROVIDERS name; "" = a custom OpenAI-compatible upstream
        "protocol": "openai",     # what the upstream speaks: "openai" or "anthropic"
    }
    SECRET_FIELDS = ("api_key",)

    def api_base(self, config):
        return (self.base_url or config.api_base).rstrip("/")

    @property
    def provider_name(self):
        """The preset this account belongs to ("" for a custom upstream of unknown provider)."""
        if self.provider:
            return self.provider
        return "iflow" if self.signing else ""

    @property
    def usable(self):
        return self.status == "ok" and bool(self.api_key)


# registry entry key -> type of the per-account settings a user may edit by hand (defaults:
# Account.FIELDS)
_ENTRY_SETTINGS = {"base_url": str, "signing": bool, "status": str, "status_reason": str,
                   "max_concurrency": int, "priority": int, "models": list,
                   "excluded_models": list, "provider": str, "protocol": str}


def validate_nickname(nickname, taken=()):
    if not NICKNAME_RE.match(nickname or ""):
        raise BadRequest("nickname %r must be 1-50 letters, digits or . _ @ + - (no spaces or /)"
                         % nickname)
    if nickname.lower() in {t.lower() for t in taken}:
        raise BadRequest("nickname %r is already taken" % nickname)
    return nickname


def unique_nickname(base, taken):
    base = re.sub(r"[^A-Za-z0-9._@+-]", "-", base or "account").strip("-._") or "account"
    base = base[:44]
    if not base[0].isalnum():
        base = "a" + base
    lowered = {t.lower() for t in taken}
    candidate, n = base, 1
    while candidate.lower() in lowered:
        n += 1
        candidate = "%s-%d" % (base, n)
    return candidate


def nickname_base(creds, kind):
    """What an account's nickname starts from: the email's user, a phone's end, else the kind."""
    if creds.get("email"):
        return creds["email"].split("@")[0]
    if creds.get("phone"):
        return "phone-" + creds["phone"][-4:]
    return kind


def now_rfc3339(clock=time.time):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock()))


# What atomic_write_json leaves when killed mid-write, and a credential file's name
_LEFTOVER_TEMP = re.compile(r"\..+\.[0-9a-f]{12}\.tmp\Z")
_CREDENTIAL_FILE = re.compile(r"iflow-[^/]+\.json\Z")


class AccountRegistry:
    """``accounts.json`` plus one credential file per account, shared with other processes.

    Reads are cached: the files are re-read only when accounts.json changes (checked at most once
    a second), and every credential write also rewrites accounts.json so that change shows.
    """

    def __init__(self, home, clock=time.monotonic, pool=()):
        self.home = home
        self.pool = tuple(pool)   # accounts from config api_keys: no files, status kept here
        self._pool_status = {}    # pool account id -> (status, reason)
        self._pool_version = 0    # bumped by every pool status change
        self._all = (None, 0, ())  # (accounts snapshot, pool version, all_accounts())
        self.path = os.path.join(home, "accounts.json")
        self.auth_dir = os.path.join(home, "auth")
        self.lock = FileLock(os.path.join(home, ".lock"))
        self._clock = clock
        self._cache_lock = threading.Lock()
        self._snapshot = ()
        self._stamp = None
        self._checked = None
        self.listeners = []  # called (no arguments) after the accounts changed on disk

    # --- reading ---------------------------------------------------------------------------
    def read(self):
        """The registry document, freshly read and validated."""
        try:
            data = read_json_file(self.path, "account registry")
        except FileNotFoundError:
            return {"version": 1, "revision": 0, "default": "", "accounts": []}
        accounts = data.get("accounts")
        if not isinstance(accounts, list):
            raise ConfigError("%s: key 'accounts' must be a list" % self.path)
        for i, entry in enumerate(accounts):
            where = "%s: accounts[%d]" % (self.path, i)
            if not isinstance(entry, dict):
                raise ConfigError("%s must be an object" % where)
            for key in ("id", "nickname", "kind"):
                if not isinstance(entry.get(key), str) or not entry.get(key):
                    raise ConfigError("%s: key %r must be a non-empty string" % (where, key))
            for key, types in _ENTRY_SETTINGS.items():
                if key in entry:
                    _check_type(entry[key], types, where, key)
            if entry.get("base_url") and not _is_http_url(entry["base_url"]):
                raise ConfigError("%s: key 'base_url' must be an http:// or https:// URL" % where)
            for key in ("models", "excluded_models"):
                if not all(isinstance(m, str) for m in entry.get(key, ())):
                    raise ConfigError("%s: key %r must be a list of model names" % (where, key))
            for key, choices in (("kind", ACCOUNT_KINDS), ("status", ACCOUNT_STATES),
                                 ("provider", ("",) + tuple(PROVIDERS)), ("protocol", PROTOCOLS)):
                if entry.get(key, choices[0]) not in choices:  # (the first is the default)
                    raise ConfigError("%s: key %r must be one of %s" % (where, key, ", ".join(
                        c for c in choices if c)))
        if not isinstance(data.setdefault("default", ""), str):
            raise ConfigError("%s: key 'default' must be a string (a nickname)" % self.path)
        revision = data.setdefault("revision", 0)
        if type(revision) is not int or revision < 0:  # (each write adds one to it)
            raise ConfigError("%s: key 'revision' must be a whole number" % self.path)
        return data

    def credential_path(self, entry):
        return os.path.join(self.auth_dir, "iflow-%s.json" % entry["id"])

    def read_credentials(self, entry):
        try:
            return read_json_file(self.credential_path(entry), "credential file")
        except FileNotFoundError:
            return {}

    def _account(self, data, entry):
        creds = self.read_credentials(entry)
        settings = {key: entry.get(key, Account.FIELDS[key]) for key in _ENTRY_SETTINGS}
        status, reason = settings.pop("status"), settings.pop("status_reason")
        api_key = creds.get("api_key") or creds.get("apiKey") or ""
        if not isinstance(api_key, str):
            api_key = ""
        if not api_key and status == "ok":
            status, reason = "needs-login", "no API key in %s" % self.credential_path(entry)
        return Account(
            id=entry["id"], nickname=entry["nickname"], kind=entry["kind"], api_key=api_key,
            refresh_error=str(entry.get("refresh_error") or ""),
            email=str(creds.get("email") or entry.get("email") or ""),
            default=entry["id"] == data.get("default"), status=status, status_reason=reason,
            models=tuple(settings.pop("models")),
            excluded_models=tuple(settings.pop("excluded_models")),
            expires=str(creds.get("expired") or creds.get("expire_time") or ""), **settings)

    def load_accounts(self):
        """Every registered account, read from disk now."""
        data = self.read()
        return tuple(self._account(data, entry) for entry in data["accounts"])

    def load(self, account_id):
        """The account with this id, read from disk now (None if there is none)."""
        return next((a for a in self.load_accounts() if a.id == account_id), None)

    def accounts(self):
        """The cached snapshot; re-read when accounts.json changed (looked at ≤ once a second)."""
        now = self._clock()
        with self._cache_lock:
            if self._checked is not None and now - self._checked < 1.0:
                return self._snapshot
            self._checked = now
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except FileNotFoundError:
                stamp = None
            if stamp == self._stamp and self._stamp is not None:
                return self._snapshot
            try:
                self._snapshot = self.load_accounts()
                self._stamp = stamp
            except ConfigError as e:  # keep serving with what we had
                log.error("%s (keeping the %d accounts loaded before)", e.message,
                          len(self._snapshot))
                return self._snapshot
        for listener in self.listeners:
            listener()
        return self._snapshot

    def all_accounts(self):
        """The registered accounts, then the pooled keys (with any status they were given);
        the same tuple until either changes (asked several times per request)."""
        accounts, version = self.accounts(), self._pool_version
        known = self._all
        if known[0] is accounts and known[1] == version:
            return known[2]
        pool = tuple(a.replace(status=self._pool_status[a.id][0],
                               status_reason=self._pool_status[a.id][1])
                     if a.id in self._pool_status else a for a in self.pool)
        self._all = (accounts, version, accounts + pool)
        return accounts + pool

    def invalidate(self):
        with self._cache_lock:
            self._checked = None

    # --- writing (always under the lock, re-reading first) ---------------------------------
    def _write(self, data):
        data["version"] = 1
        data["revision"] = data.get("revision", 0) + 1
        atomic_write_json(self.path, data)
        self.invalidate()

    def find(self, data, nickname):
        for entry in data["accounts"]:
            if entry["nickname"].lower() == (nickname or "").lower():
                return entry
        names = ", ".join(e["nickname"] for e in data["accounts"]) or "none; run login first"
        raise BadRequest("no account named %r (accounts: %s)" % (nickname, names))

    def upsert(self, identity, kind, credentials, nickname=None, make_default=False,
               settings=None, clock=time.time):
        """Add an account, or update the one with the same identity; returns (entry, created)."""
        with self.lock:
            data = self.read()
            entry = next((e for e in data["accounts"] if e.get("identity") == identity), None)
            others = [e["nickname"] for e in data["accounts"] if e is not entry]
            created = entry is None
            if created:
                taken_ids = {e["id"] for e in data["accounts"]}
                new_id = os.urandom(4).hex()
                while new_id in taken_ids:
                    new_id = os.urandom(4).hex()
                base = nickname_base(credentials, kind)
                entry = {"id": new_id, "identity": identity, "kind": kind,
                         "nickname": nickname or unique_nickname(base, others),
                         "created": now_rfc3339(clock)}
                data["accounts"].append(entry)
            if nickname:
                entry["nickname"] = validate_nickname(nickname, others)
            entry.update(settings or {}, kind=kind, email=credentials.get("email", ""),
                         status="ok", status_reason="", refresh_error="")
            creds = dict(self.read_credentials(entry)) if not created else {}
            creds.update(credentials)
            creds.update({"type": "iflow", "id": entry["id"], "kind": kind,
                          "last_refresh": creds.get("last_refresh") or now_rfc3339(clock)})
            atomic_write_json(self.credential_path(entry), creds)
            if make_default or not data.get("default") or len(data["accounts"]) == 1:
                data["default"] = entry["id"]
            self._write(data)
            return entry, created

    @contextlib.contextmanager
    def edit(self, account_id):
        """Read-modify-write one account's entry and credentials under the lock.

        Yields an AccountEdit (None when there is no such account); accounts.json is written
        once at the end if anything changed, credentials the moment they are saved.
        """
        with self.lock:
            data = self.read()
            entry = next((e for e in data["accounts"] if e["id"] == account_id), None)
            change = AccountEdit(self, entry) if entry is not None else None
            yield change
            if change is not None and change.changed:
                self._write(data)

    def set_status(self, account, status, reason=""):
        """The one writer of account status (ok, needs-login, disabled) and its reason."""
        reason = reason[:300]
        if account.kind == "pool":
            with self._cache_lock:
                self._pool_status[account.id] = (status, reason)
                self._pool_version += 1
            return
        with self.edit(account.id) as change:
            if change is not None:
                change.set_status(status, reason)

    def set_default(self, nickname):
        with self.lock:
            data = self.read()
            entry = self.find(data, nickname)
            data["default"] = entry["id"]
            self._write(data)
            return entry

    def rename(self, old, new):
        with self.lock:
            data = self.read()
            entry = self.find(data, old)
            validate_nickname(new, [e["nickname"] for e in data["accounts"] if e is not entry])
            entry["nickname"] = new
            self._write(data)
            return entry

    def remove(self, nickname=None):
        """Remove one account (or all when ``nickname`` is None) and its credential file."""
        with self.lock:
            data = self.read()
            doomed = list(data["accounts"]) if nickname is None else [self.find(data, nickname)]
            data["accounts"] = [e for e in data["accounts"] if e not in doomed]
            if data.get("default") not in {e["id"] for e in data["accounts"]}:
                data["default"] = data["accounts"][0]["id"] if data["accounts"] else ""
            self._write(data)  # registry first: a crash leaves an orphan file, not a dangling entry
            for entry in doomed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.credential_path(entry))
            self.clean_leftovers()
            return doomed

    def clean_leftovers(self, older_than=60.0, now=None):
        """Remove what a killed process left of this home's own writes: temporary files of
        atomic writes (they may hold API keys) and credential files of accounts the registry
        no longer names (a crash between its two steps, see remove()).  Only files older than
        ``older_than`` seconds: another process may be writing right now.  The names removed."""
        now = time.time() if now is None else now
        removed = []
        with self.lock:
            known = {self.credential_path(e) for e in self.read()["accounts"]}
            for directory in (self.home, self.auth_dir):
                try:
                    names = os.listdir(directory)
                except OSError:
                    continue
                for name in names:
                    path = os.path.join(directory, name)
                    ours = _LEFTOVER_TEMP.match(name) or directory == self.auth_dir and \
                        _CREDENTIAL_FILE.match(name) and path not in known
                    with contextlib.suppress(OSError):
                        if ours and now - os.lstat(path).st_mtime >= older_than:
                            os.unlink(path)
                            removed.append(name)
        if removed:
            log.warning("removed %d file(s) a stopped process left behind: %s", len(removed),
                        ", ".join(sorted(removed)))
        return removed


def _set_entry_status(entry, status, reason):
    entry["status"], entry["status_reason"] = status, reason[:300]


class AccountEdit:
    """One account's registry entry and credential file, open for change in registry.edit()."""

    def __init__(self, registry, entry):
        self.registry, self.entry = registry, entry
        self.changed = False
        self._credentials = None

    @property
    def credentials(self):
        if self._credentials is None:
            self._credentials = dict(self.registry.read_credentials(self.entry))
        return self._credentials

    def save_credentials(self, fields):
        """Merge ``fields`` into the credential file and write it now: a token server may have
        already retired the old refresh token, so the new one must not wait for anything."""
        self.credentials.update(fields)
        atomic_write_json(self.registry.credential_path(self.entry), self.credentials)
        self.changed = True  # rewriting accounts.json too makes every reader notice

    def update(self, **fields):
        self.entry.update(fields)
        self.changed = True

    def set_status(self, status, reason=""):
        _set_entry_status(self.entry, status, reason)
        self.changed = True


def api_key_settings(provider=None, protocol=None, base_url=None, signing=True):
    """The registry settings of an API-key account: the preset's base URL for the protocol
    (``base_url`` overrides it, for mirrors and gateways), signing, provider and protocol."""
    base_url = (base_url or "").rstrip("/")
    if base_url and not _is_http_url(base_url):
        raise BadRequest("--base-url must be an http:// or https:// URL, got %r" % base_url)
    protocol = protocol or "openai"
    if protocol not in PROTOCOLS:
        raise BadRequest("unknown protocol %r: use openai or anthropic" % protocol)
    if not provider:
        return {"base_url": base_url, "signing": signing, "protocol": protocol}
    preset = PROVIDERS.get(provider.lower())
    if preset is None:
        raise BadRequest("unknown provider %r; the presets are: %s (python iflow_proxy.py "
                         "providers)" % (provider, ", ".join(PROVIDERS)))
    preset_base = preset.anthropic if protocol == "anthropic" else preset.openai
    if not preset_base and not base_url:
        raise BadRequest("%s has no %s endpoint; use --protocol %s" % (
            provider, protocol, "openai" if protocol == "anthropic" else "anthropic"))
    if provider.lower() == "iflow" and not base_url:
        preset_base = ""  # iFlow accounts follow config api_base / IFLOW_API_BASE
    return {"base_url": base_url or preset_base, "provider": provider.lower(),
            "protocol": protocol, "signing": preset.signing and signing}


def account_json(a, config):
    return {"id": a.id, "nickname": a.nickname, "email": a.email, "kind": a.kind,
            "default": a.default, "status": a.status, "status_reason": a.status_reason,
            "key": mask_secret(a.api_key), "base_url": a.api_base(config), "signing": a.signing,
            "provider": a.provider_name or "custom", "protocol": a.protocol,
            "expires": a.expires, "refresh_error": a.refresh_error}


def pool_accounts(config):
    """The keys from config ``api_keys`` / ``IFLOW_API_KEYS`` as accounts without login."""
    return tuple(
        Account(id="pool-" + fingerprint(key), nickname="pool-%d" % (i + 1), kind="pool",
                api_key=key)
        for i, key in enumerate(config.api_keys))


# ==================================================================================================
# Auth: OAuth (browser, code display, paste, device code), cookie keys, refresh, import
# ==================================================================================================

class LoginError(ProxyError):
    """A login, refresh or platform call that did not work; ``permanent`` = log in again."""

    code = "login_failed"

    def __init__(self, message, permanent=False, exit_code=1):
        super().__init__(message)
        self.permanent = permanent
        self.exit_code = exit_code


def http_client():
    """The http.client module (imported here, its one place: most start-ups never need it)."""
    import http.client
    return http.client


def http_json(method, url, config, headers=None, form=None, body=None, timeout=30, env=None):
    """(HTTP status, parsed JSON or None) of one OAuth/platform call (proxy and CA honoured)."""
    headers = dict(headers or {})
    data = None
    if form is not None:
        data = urllib.parse.urlencode(form).encode("utf-8")
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    headers.setdefault("Accept", "application/json")
    headers.setdefault("User-Agent", "iflow-proxy/" + __version__)
    from urllib import error as url_error, request as url_request
    proxy = select_proxy(url, config.proxy, env)
    context = tls_context(config.ca_file)
    opener = url_request.build_opener(
        url_request.ProxyHandler({urllib.parse.urlsplit(url).scheme: proxy} if proxy else {}),
        url_request.HTTPSHandler(context=context))
    where = urllib.parse.urlsplit(url).netloc
    try:
        with opener.open(url_request.Request(url, data=data, headers=headers, method=method),
                         timeout=timeout) as resp:
            status, raw = resp.status, resp.read(SSE_HEAD_LIMIT)
    except url_error.HTTPError as e:
        status, raw = e.code, e.read(SSE_HEAD_LIMIT)
    except (url_error.URLError, OSError, http_client().HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise UpstreamError("unreachable", "cannot reach %s: %s" % (where, reason))
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        payload = None
    return status, payload


def pkce_pair():
    """(verifier, S256 challenge); sent even where unsupported, where it is harmless."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def authorize_url(config, redirect, state, challenge):
    """iFlow's authorize URL (the redirect parameter is named ``redirect``)."""
    query = urllib.parse.urlencode({
        "loginMethod": "phone", "type": "phone", "redirect": redirect, "state": state,
        "client_id": config.oauth_client_id, "code_challenge": challenge,
        "code_challenge_method": "S256"})
    return config.oauth_base + "/oauth?" + query


def code_display_uri(config):
    return config.oauth_base + "/oauth/code-display"


def _client_auth(config):
    pair = "%s:%s" % (config.oauth_client_id, config.oauth_client_secret)
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


def _token_answer(status, payload, what):
    """The token response, or LoginError: permanent for invalid_grant, soft otherwise."""
    if isinstance(payload, dict) and isinstance(payload.get("access_token"), str) \
            and payload["access_token"]:
        return payload
    payload = payload if isinstance(payload, dict) else {}
    error = payload.get("error") or ""
    message = payload.get("error_description") or payload.get("message") or error or \
        "HTTP %d" % status
    if error in ("invalid_grant", "invalid_token", "unauthorized_client"):
        raise LoginError("%s refused (%s): log in again" % (what, message), permanent=True)
    raise LoginError("%s failed: %s" % (what, message))


def token_request(config, form, what, env=None):
    form = dict(form, client_id=config.oauth_client_id,
                client_secret=config.oauth_client_secret)
    status, payload = http_json("POST", config.oauth_base + "/oauth/token", config,
                                headers=_client_auth(config), form=form, env=env)
    return status, payload


def exchange_code(config, code, redirect_uri, verifier, env=None):
    status, payload = token_request(config, {"grant_type": "authorization_code", "code": code,
                                             "redirect_uri": redirect_uri,
                                             "code_verifier": verifier}, "code exchange", env)
    return _token_answer(status, payload, "code exchange")


def refresh_tokens(config, refresh_token, env=None):
    status, payload = token_request(config, {"grant_type": "refresh_token",
                                             "refresh_token": refresh_token}, "token refresh", env)
    return _token_answer(status, payload, "token refresh")


def fetch_user_info(config, access_token, sleep=time.sleep, env=None):
    """iFlow's user info: the apiKey that signs and authorises chat, email, phone."""
    url = config.oauth_base + "/api/oauth/getUserInfo?" + urllib.parse.urlencode(
        {"accessToken": access_token})
    problem = "no answer"
    for attempt in range(3):  # as the CLI does: 3 tries, 1/2/3 s apart
        if attempt:
            sleep(attempt)
        try:
            status, payload = http_json("GET", url, config, env=env)
        except UpstreamError as e:
            problem = e.message
            continue
        data = payload.get("data") if isinstance(payload, dict) else None
        if isinstance(data, dict) and isinstance(data.get("apiKey"), str) and data["apiKey"]:
            return data
        problem = (payload or {}).get("message") or "HTTP %d without an apiKey" % status \
            if isinstance(payload, dict) or payload is None else "unexpected answer"
    raise LoginError("cannot read the account's API key from user info: %s" % problem)


def rfc3339(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def parse_time(value):
    """Epoch seconds of an RFC 3339 string, an epoch number (s or ms), or iFlow's
    "2026-03-01 12:00" (China time); None when unknown."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value / 1000.0 if value > 1e11 else float(value)
    if not isinstance(value, str) or not value.strip():
        return None
    import calendar
    text = value.strip()
    for fmt, offset in (("%Y-%m-%d %H:%M:%S", 8), ("%Y-%m-%d %H:%M", 8)):
        try:
            return calendar.timegm(time.strptime(text, fmt)) - offset * 3600
        except ValueError:
            pass
    match = re.match(r"^(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)?$", text)
    if not match:
        return None
    epoch = calendar.timegm(time.strptime(match.group(1) + " " + match.group(2),
                                          "%Y-%m-%d %H:%M:%S"))
    zone = match.group(4) or "Z"
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        epoch -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return float(epoch)


def oauth_token_fields(tokens, clock=time.time):
    """The credential file's token fields (CLIProxyAPI's names) from a token response."""
    now = clock()
    lifetime = tokens.get("expires_in")
    lifetime = lifetime if isinstance(lifetime, (int, float)) and lifetime > 0 else 86400
    return {"access_token": tokens["access_token"],
            "refresh_token": tokens.get("refresh_token") or "",
            "expired": rfc3339(now + lifetime), "last_refresh": rfc3339(now),
            "token_type": tokens.get("token_type") or "Bearer", "scope": tokens.get("scope") or ""}


def oauth_credentials(tokens, info, clock=time.time):
    """A credential file's fields from a token response and iFlow's user info."""
    return dict(oauth_token_fields(tokens, clock), api_key=info["apiKey"],
                email=info.get("email") or "", phone=info.get("phone") or "",
                user_id=str(info.get("userId") or ""), user_name=info.get("userName") or "")


def identity_of(kind, creds, settings=None):
    """Who an account is: email, else phone, else the key's name or fingerprint (with the
    provider and protocol: one key may serve a provider over both)."""
    if settings and settings.get("provider"):
        return "%s:%s/%s" % (identity_of(kind, creds), settings["provider"],
                             settings["protocol"])
    if creds.get("email"):
        return "email:" + creds["email"].lower()
    if creds.get("phone"):
        return "phone:" + creds["phone"]
    if creds.get("key_name"):
        return "keyname:" + creds["key_name"]
    return "key:" + fingerprint(creds.get("api_key") or "")


def is_key_text(value):
    """Printable ASCII without spaces: all an API key is made of (a paste error otherwise)."""
    return all(33 <= ord(c) <= 126 for c in value)


def is_headless(env=None):
    env = os.environ if env is None else env
    if env.get("SSH_CONNECTION") or env.get("SSH_TTY"):
        return True
    return sys.platform.startswith("linux") and not (env.get("DISPLAY") or
                                                     env.get("WAYLAND_DISPLAY"))


_PAGE = ("<!doctype html><meta charset=utf-8><title>iflow-proxy login</title><body style='"
         "font-family:sans-serif;margin:3em'><h2>%s</h2><p>%s</p></body>")


class CallbackListener:
    """A one-shot OAuth redirect listener on 127.0.0.1: checks ``state``, takes one code."""

    def __init__(self, port, state, events):
        import http.server
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                try:
                    parts = urllib.parse.urlsplit(self.path)
                except ValueError:  # e.g. "//[x" (an unclosed bracket)
                    return self._page(400, "Bad request", "That is not a URL this listener reads.")
                query = dict(urllib.parse.parse_qsl(parts.query))
                if parts.path != "/oauth2callback":
                    return self._page(404, "Not found", "This is iflow-proxy's login listener.")
                if listener.done:
                    return self._page(409, "Already used", "This login link was already used; "
                                      "run the login command again if you need to.")
                if not hmac.compare_digest(query.get("state", ""), listener.state):
                    return self._page(400, "Login rejected", "The state parameter does not "
                                      "match this login attempt.")
                if query.get("error"):
                    listener.done = True
                    events.put(("error", "the login was refused: %s" % query["error"]))
                    return self._page(400, "Login failed", "iFlow said: %s" % query["error"])
                if not query.get("code"):
                    return self._page(400, "Login failed", "The callback carried no code.")
                listener.done = True
                events.put(("code", query["code"], listener.redirect_uri))
                return self._page(200, "Logged in", "You can close this tab and return to the "
                                  "terminal.")

            def _page(self, status, title, text):
                body = (_PAGE % (title, text)).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

        self.state, self.done = state, False
        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        except OSError as e:
            raise LoginError("callback port %d is busy (%s): use --callback-port N, or log in "
                             "with --no-browser (code display / paste)" % (port, e.strerror))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.redirect_uri = "http://localhost:%d/oauth2callback" % self.port
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.1,),
                                        daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _read_pasted(stdin, state, redirect_uri, display_uri, events):
    """Read a pasted code (code display) or a pasted callback URL from the terminal."""
    line = stdin.readline(8192) if stdin is not None else ""
    line = line.strip()
    if not line:
        events.put(("error", "no code was entered"))
    elif line.startswith(("http://", "https://")):
        try:
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(line).query))
        except ValueError:  # e.g. "http://[x" (an unclosed bracket)
            query = None
        if query is None:
            events.put(("error", "the pasted URL could not be read"))
        elif not hmac.compare_digest(query.get("state", ""), state):
            events.put(("error", "the pasted URL's state does not match this login attempt"))
        elif query.get("error"):
            events.put(("error", "the login was refused: %s" % query["error"]))
        elif not query.get("code") or redirect_uri is None:
            events.put(("error", "the pasted URL carries no code"))
        else:
            events.put(("code", query["code"], redirect_uri))
    else:
        events.put(("code", line, display_uri))


def login_oauth(config, out, stdin, browser=True, open_browser=None, env=None,
                sleep=time.sleep, clock=time.time):
    """Browser OAuth with a local callback, or (headless) code display / pasted callback URL.

    Returns the credential fields for the new account.
    """
    import queue
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(24)
    headless = not browser or is_headless(env)
    events = queue.Queue()
    listener = None
    try:
        listener = CallbackListener(config.callback_port, state, events)
    except LoginError as e:
        if not headless:
            raise
        out.write("(no local callback: %s)\n" % e.message)
    try:
        if not headless:
            url = authorize_url(config, listener.redirect_uri, state, challenge)
            out.write("Log in to iFlow in your browser. If it does not open, visit:\n  %s\n"
                      % url)
            out.flush()
            if open_browser is None:
                import webbrowser
                open_browser = webbrowser.open
            open_browser(url)
        else:
            url = authorize_url(config, code_display_uri(config), state, challenge)
            out.write("Open this URL on any device, log in, and type the code it shows:\n  %s\n"
                      % url)
            if listener is not None:
                local = authorize_url(config, listener.redirect_uri, state, challenge)
                out.write("Or forward the callback port over SSH (ssh -L %d:127.0.0.1:%d "
                          "<this host>) and open\n  %s\nthen let it finish here, or paste the "
                          "address the browser ends on.\n" % (listener.port, listener.port,
                                                               local))
            out.write("Code (or callback URL): ")
            out.flush()
            threading.Thread(target=_read_pasted, daemon=True, args=(
                stdin, state, listener.redirect_uri if listener else None,
                code_display_uri(config), events)).start()
        try:
            event = events.get(timeout=config.login_timeout)
        except queue.Empty:
            raise LoginError("timed out after %gs waiting for the login" % config.login_timeout)
    finally:
        if listener is not None:
            listener.close()
    if event[0] == "error":
        raise LoginError(event[1])
    _kind, code, redirect_uri = event
    tokens = exchange_code(config, code, redirect_uri, verifier, env)
    info = fetch_user_info(config, tokens["access_token"], sleep, env)
    return oauth_credentials(tokens, info, clock)


DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def login_device(config, out, sleep=time.sleep, clock=time.monotonic, env=None):
    """RFC 8628 device authorization: show the code, poll until approved, denied or expired."""
    if not config.device_endpoint:
        raise LoginError("no device-code endpoint is configured (iFlow never published one): "
                         "set device_endpoint for a gateway that has one, or use `login "
                         "--no-browser` for iFlow's code-display flow", exit_code=2)
    verifier, challenge = pkce_pair()
    status, payload = http_json("POST", config.device_endpoint, config, env=env, form={
        "client_id": config.oauth_client_id, "scope": "openid",
        "code_challenge": challenge, "code_challenge_method": "S256"})
    payload = payload if isinstance(payload, dict) else {}
    if status != 200 or not all(isinstance(payload.get(k), str) and payload[k]
                                for k in ("device_code", "user_code", "verification_uri")):
        raise LoginError("the device endpoint did not start a login (HTTP %d: %s)" % (
            status, payload.get("error_description") or payload.get("error") or "no codes"))
    interval = payload.get("interval") if isinstance(payload.get("interval"), int) else 5
    expires_in = payload.get("expires_in") if isinstance(payload.get("expires_in"), int) \
        else 600
    out.write("To log in, open %s and enter the code:\n\n    %s\n\n" % (
        payload["verification_uri"], payload["user_code"]))
    if payload.get("verification_uri_complete"):
        out.write("(or open %s)\n" % payload["verification_uri_complete"])
    out.write("Waiting for approval (Ctrl-C to stop)...\n")
    out.flush()
    deadline = clock() + expires_in
    expired = LoginError("Device code expired before authorization; run `python "
                         "iflow_proxy.py login --device` again")
    while True:
        if clock() + interval > deadline:
            raise expired
        sleep(interval)
        status, answer = token_request(config, {"grant_type": DEVICE_GRANT,
                                                "device_code": payload["device_code"],
                                                "code_verifier": verifier}, "device login", env)
        if isinstance(answer, dict) and answer.get("access_token"):
            break
        error = (answer or {}).get("error") if isinstance(answer, dict) else None
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5
            continue
        if error == "access_denied":
            raise LoginError("the login was denied on the verification page")
        if error == "expired_token":
            raise expired
        raise LoginError("device login failed: %s" % (error or "HTTP %d" % status))
    tokens = answer
    try:
        info = fetch_user_info(config, tokens["access_token"], sleep, env)
    except LoginError:  # gateways without iFlow's user info: the access token is the key
        info = {"apiKey": tokens["access_token"]}
    return oauth_credentials(tokens, info)


def platform_api_key(config, cookie, env=None):
    """Get and rotate the platform API key for a browser cookie holding BXAuth."""
    if "BXAuth=" not in cookie:
        raise LoginError("the cookie must contain BXAuth=… (copy it from platform.iflow.cn in "
                         "your browser)", exit_code=2)
    url = config.platform_base + "/api/openapi/apikey"
    headers = {"Cookie": cookie if cookie.rstrip().endswith(";") else cookie.strip() + ";"}
    status, payload = http_json("GET", url, config, headers=headers, env=env)
    data = payload.get("data") if isinstance(payload, dict) else None
    if not (isinstance(payload, dict) and payload.get("success") and isinstance(data, dict)
            and isinstance(data.get("name"), str)):
        raise LoginError("the platform did not accept the cookie (HTTP %d: %s); log in to the "
                         "platform in a browser and copy a fresh cookie" % (
                             status, (payload or {}).get("message") if isinstance(payload, dict)
                             else "no JSON"), permanent=True)
    status, payload = http_json("POST", url, config, env=env, body={"name": data["name"]},
                                headers=dict(headers, Origin=config.platform_base,
                                             Referer=config.platform_base + "/"))
    fresh = payload.get("data") if isinstance(payload, dict) else None
    if not (isinstance(fresh, dict) and isinstance(fresh.get("apiKey"), str) and
            fresh["apiKey"]):
        raise LoginError("the platform did not rotate the API key (HTTP %d)" % status)
    expires = parse_time(fresh.get("expireTime")) or time.time() + 7 * 86400
    return {"cookie": cookie.strip(), "api_key": fresh["apiKey"], "key_name": data["name"],
            "expire_time": fresh.get("expireTime") or "", "expired": rfc3339(expires),
            "last_refresh": rfc3339(time.time())}


def refresh_due(kind, creds, config):
    """Epoch when an account's credentials should be renewed, or None (nothing to renew)."""
    expires = parse_time(creds.get("expired"))
    if expires is None:
        return None
    if kind == "oauth" and creds.get("refresh_token"):
        last = parse_time(creds.get("last_refresh"))
        lifetime = expires - last if last is not None and expires > last \
            else config.refresh_lead * 2
        return expires - min(config.refresh_lead, lifetime / 2)
    if kind == "cookie" and creds.get("cookie"):
        return expires - 48 * 3600
    return None


class Refresher:
    """Renews OAuth tokens and cookie-issued keys before they expire, and on demand.

    A refresh holds the registry's file lock and re-reads the credential file first, so two
    processes never refresh one account at once nor lose a rotated refresh token.
    """

    def __init__(self, registry, config, clock=time.time, env=None, sleep=time.sleep):
        self.registry, self.config, self.clock, self.env = registry, config, clock, env
        self.sleep = sleep       # between user-info retries
        self._backoff = {}       # account id -> (next try epoch, delay seconds)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def state(self, account):
        """What /status shows about an account's renewal."""
        entry = {"id": account.id}
        creds = self.registry.read_credentials(entry) if account.kind in ("oauth",
                                                                          "cookie") else {}
        due = refresh_due(account.kind, creds, self.config)
        if due is None:
            return None
        backoff = self._backoff.get(account.id)
        return {"next_refresh": rfc3339(max(due, backoff[0] if backoff else due)),
                "last_refresh": creds.get("last_refresh") or None,
                "error": account.refresh_error or None}

    def refresh(self, account_id, force=False):
        """Renew one account now if due (or ``force``); True when new credentials were stored."""
        with self.registry.edit(account_id) as change:
            if change is None or change.entry["kind"] not in ("oauth", "cookie"):
                return False
            creds = change.credentials
            due = refresh_due(change.entry["kind"], creds, self.config)
            if due is None or (not force and self.clock() < due):
                return False  # nothing to renew, or another process just did
            try:
                fresh = self._renew(change)
            except (LoginError, UpstreamError) as e:
                return self._failed(change, e)
            change.save_credentials({k: v for k, v in fresh.items() if v or k not in creds})
            change.set_status("ok")
            change.update(refresh_error="")
        self._backoff.pop(account_id, None)
        log.info("renewed the credentials of account %s (key %s)", change.entry["nickname"],
                 mask_secret(creds.get("api_key")))
        return True

    def _renew(self, change):
        """New credential fields for the account being edited (rotated tokens saved at once)."""
        creds = change.credentials
        if change.entry["kind"] == "cookie":
            return platform_api_key(self.config, creds["cookie"], self.env)
        tokens = refresh_tokens(self.config, creds["refresh_token"], self.env)
        if not tokens.get("refresh_token"):
            tokens["refresh_token"] = creds["refresh_token"]
        change.save_credentials(oauth_token_fields(tokens, self.clock))
        info = fetch_user_info(self.config, tokens["access_token"], self.sleep, self.env)
        return oauth_credentials(tokens, info, self.clock)

    def _failed(self, change, error):
        permanent = isinstance(error, LoginError) and error.permanent
        account_id, nickname = change.entry["id"], change.entry["nickname"]
        _next, delay = self._backoff.get(account_id, (0, 30))
        delay = min(delay * 2, 1800)
        self._backoff[account_id] = (self.clock() + delay, delay)
        message = scrub_secrets(error.message, [v for v in change.credentials.values()
                                                if isinstance(v, str)])
        change.update(refresh_error=message[:300])
        if permanent:
            change.set_status("needs-login", message)
        log.warning("cannot renew account %s: %s%s", nickname, message,
                    "" if permanent else "; keeping the old credentials, retrying in %ds" % delay)
        return False

    def next_due(self):
        """(epoch, account id) of the next renewal, or (None, None)."""
        best = (None, None)
        for account in self.registry.accounts():
            if account.kind not in ("oauth", "cookie") or account.status == "disabled":
                continue
            due = refresh_due(account.kind, self.registry.read_credentials({"id": account.id}),
                              self.config)
            if due is None:
                continue
            due = max(due, self._backoff.get(account.id, (0, 0))[0])
            if best[0] is None or due < best[0]:
                best = (due, account.id)
        return best

    def run(self):
        """The background loop: sleep until the next renewal is due (or something changes)."""
        while not self._stop.is_set():
            due, account_id = self.next_due()
            now = self.clock()
            if due is not None and due <= now:
                self.refresh(account_id)
                continue
            wait = 300.0 if due is None else min(300.0, due - now)  # 300 s: notice new files
            self._wake.wait(wait)
            self._wake.clear()

    def wake(self):
        self._wake.set()

    def start(self):
        threading.Thread(target=self.run, name="refresher", daemon=True).start()
        return self

    def stop(self):
        self._stop.set()
        self._wake.set()


def _home_path(env, *parts):
    return os.path.join(env.get("HOME") or os.path.expanduser("~"), *parts)


_CREDENTIAL_FIELDS = ("access_token", "refresh_token", "api_key", "email", "phone", "cookie",
                      "expired", "last_refresh", "token_type", "scope")
_CREDENTIAL_NAMES = {"access_token": "oauth_access_token", "refresh_token": "oauth_refresh_token",
                     "api_key": "apiKey", "expired": "expiry_date oauth_expires_at"}


def _creds_from_file(data):
    """Our credential fields from any of the known formats (ours, CLIProxyAPI/CCS, the CLI)."""
    expiry = parse_time(data.get("expiry_date"))  # the CLI's: epoch milliseconds
    data = dict(data, expiry_date=rfc3339(expiry) if expiry else "")
    creds = {}
    for field in _CREDENTIAL_FIELDS:  # ours first, then the other formats' names for it
        value = next((data[n] for n in [field] + _CREDENTIAL_NAMES.get(field, "").split()
                      if data.get(n)), "")
        if isinstance(value, str) and value:
            creds[field] = value
    kind = "oauth" if creds.get("refresh_token") else "cookie" if creds.get("cookie") \
        else "api-key"
    return kind, creds


def find_importable(env=None):
    """[(source, path, kind, creds, nickname)] for every credential other tools left here."""
    env = os.environ if env is None else env
    found = []

    def add(source, path, data, nickname=None, base_url=""):
        kind, creds = _creds_from_file(data)
        if creds.get("api_key") or creds.get("refresh_token") or creds.get("cookie"):
            found.append((source, path, kind, creds, nickname, base_url))

    iflow_home = env.get("IFLOW_HOME") or _home_path(env, ".iflow")
    path = os.path.join(iflow_home, "oauth_creds.json")
    data = _read_import(path)
    if data:
        add("iflow-cli", path, data)
    oauth_key = data.get("apiKey")
    path = os.path.join(iflow_home, "settings.json")
    data = _read_import(path)
    if data.get("apiKey") and data["apiKey"] != oauth_key and \
            data.get("selectedAuthType") != "oauth-iflow":
        base = data.get("baseUrl") if isinstance(data.get("baseUrl"), str) else ""
        add("iflow-cli", path, {"api_key": data["apiKey"]},
            base_url="" if base.rstrip("/") == DEFAULT_API_BASE else base.rstrip("/"))
    ccs_dir = _home_path(env, ".ccs", "cliproxy")
    registry = _read_import(os.path.join(ccs_dir, "accounts.json"))
    accounts = ((registry.get("providers") or {}).get("iflow") or {}).get("accounts") or {}
    nicknames = {os.path.basename(info["tokenFile"]): info.get("nickname")
                 for info in (accounts.values() if isinstance(accounts, dict) else ())
                 if isinstance(info, dict) and info.get("tokenFile")}
    for source, folder in (("ccs", os.path.join(ccs_dir, "auth")),
                           ("cliproxyapi", _home_path(env, ".cli-proxy-api"))):
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.startswith("iflow-") and name.endswith(".json"):
                    data = _read_import(os.path.join(folder, name))
                    if data.get("type", "iflow") == "iflow":
                        add(source, os.path.join(folder, name), data, nicknames.get(name))
    return found


def _read_import(path):
    """The JSON object in ``path``; {} when there is none, with a warning when it is damaged."""
    try:
        return read_json_file(path, "credential file")
    except FileNotFoundError:
        return {}
    except ConfigError as e:
        log.warning("skipping %s: %s", path, e.message)
        return {}


# ==================================================================================================
# Upstream: signing, body shaping, outbound proxies, pooled connections, error classification
# ==================================================================================================

def sign_request(api_key, user_agent, session_id, timestamp_ms):
    """iFlow's x-iflow-signature: hex HMAC-SHA256(apiKey, "<user-agent>:<session-id>:<ts>")."""
    message = "%s:%s:%s" % (user_agent, session_id, timestamp_ms)
    # hmac.new, not hmac.digest: the one-shot digest gives the GIL away around a microsecond's
    # work, and under load the request thread then queues to get it back
    return hmac.new(api_key.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


def random_hex(digits):
    """Random hex digits for an id nobody needs to guess (a message, tool call or completion
    id): from the random module, not os.urandom, whose system call gives the GIL away."""
    return "%0*x" % (digits, random.getrandbits(digits * 4))


def _derived_uuid(*parts):
    raw = bytearray(hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()[:16])
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    h = raw.hex()
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


def conversation_ids(account_id, conversation_key):
    """(session-id, conversation-id) for one client conversation on one account.

    Derived, not stored: the same conversation keeps the same upstream session on an account
    (as the CLI keeps one per session), across requests and restarts, with no table to grow.
    """
    key = conversation_key or secrets.token_hex(16)
    return ("session-" + _derived_uuid("session", account_id, key),
            _derived_uuid("conversation", account_id, key))


def upstream_headers(account, config, session_id, conversation_id, clock=time.time):
    """Headers for one upstream request: iFlow's signed set, or plain OpenAI-compatible ones."""
    headers = {"Content-Type": "application/json"}
    if account.api_key:
        headers["Authorization"] = "Bearer " + account.api_key
    if not account.signing:
        headers["User-Agent"] = "iflow-proxy/" + __version__
        return headers
    headers.update(config.extra_headers)  # before the signed ones, which must stay exact
    timestamp = str(int(clock() * 1000))
    headers.update({"user-agent": config.user_agent, "session-id": session_id,
                    "conversation-id": conversation_id, "x-iflow-timestamp": timestamp})
    if account.api_key:
        headers["x-iflow-signature"] = sign_request(account.api_key, config.user_agent,
                                                    session_id, timestamp)
    return headers


def output_limit(model):
    name = model.lower()
    return next(limit for prefix, limit in MODEL_OUTPUT_LIMITS if name.startswith(prefix))


def thinking_params(model, on, effort=None):
    """The per-family request fields that turn thinking on or off (the official CLI's table)."""
    name = model.lower()
    if name.startswith("glm-5"):
        return {"chat_template_kwargs": {"enable_thinking": on}, "enable_thinking": on,
                "thinking": {"type": "enabled" if on else "disabled"}}
    if name.startswith("glm-4.7"):
        return {"chat_template_kwargs": {"enable_thinking": on}}
    if name.startswith("glm-"):
        return {"chat_template_kwargs": {"enable_thinking": True}} if on else {}
    if name.startswith("deepseek"):
        if not on:
            return {}
        return {"thinking_mode": True} if effort in ("low", "minimal") else \
            {"thinking_mode": True, "reasoning": True}
    if name.startswith("kimi-k2.5"):
        return {"thinking": {"type": "enabled" if on else "disabled"}}
    if "thinking" in name:
        return {"thinking_mode": True} if on else {}
    if name.startswith("minimax-"):
        return {"reasoning_split": True} if on else {}
    return {}


def _merge_missing(target, extra):
    """Add ``extra`` into ``target`` without overriding what the client set itself."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merged = dict(value)
            merged.update(target[key])
            target[key] = merged
        elif key not in target:
            target[key] = value


def shape_chat_body(body, model, signing=True, thinking=None, effort=None):
    """A copy of an OpenAI chat body shaped as the official CLI sends it.

    ``thinking`` is True/False to switch thinking on/off, None to leave the model's default.
    """
    out = dict(body)
    out["model"] = model
    if out.get("stream") is True:
        options = dict(out.get("stream_options") or {})
        options["include_usage"] = True
        out["stream_options"] = options
    else:
        out.pop("stream_options", None)
    if "tools" in out and not out["tools"]:
        out.pop("tools")
        out.pop("tool_choice", None)
    if thinking is None and isinstance(out.get("reasoning_effort"), str):
        effort = out["reasoning_effort"]
        thinking = effort != "none"
    if thinking is not None and signing:
        _merge_missing(out, thinking_params(model, thinking, effort))
        if (thinking and model.lower().startswith("kimi-k2.5")
                and out.get("tool_choice") not in (None, "auto", "none")):
            out["tool_choice"] = "auto"  # kimi-k2.5 thinking accepts only auto/none
    if signing and not any(k in out for k in ("max_tokens", "max_new_tokens",
                                              "max_completion_tokens")):
        out["max_new_tokens"] = output_limit(model)
    return out


def provider_thinking(style, on):
    """The request fields that switch thinking on or off on a provider's own endpoint."""
    if style in ("deepseek", "glm", "kimi"):  # {"thinking": {"type": "enabled"|"disabled"}}
        return {"thinking": {"type": "enabled" if on else "disabled"}}
    if style == "qwen":
        return {"enable_thinking": on}
    if style == "openrouter":  # https://openrouter.ai/docs/use-cases/reasoning-tokens
        return {"reasoning": {"enabled": on}}
    return {}


def clamp_output(body, limit, keys=("max_tokens", "max_completion_tokens", "max_new_tokens")):
    """Lower any output limit in ``body`` (a copy) to what the model allows."""
    for key in keys:
        if isinstance(body.get(key), int) and body[key] > limit:
            body[key] = limit
    return body


def shape_provider_body(body, model, account, thinking=None, effort=None, limit=None,
                        models=None):
    """An OpenAI chat body for ``account``: iFlow's shaping when signed, else the model's
    thinking switch (its preset's or config ``models``'), the provider's quirks, and any output
    limit clamped to what the model allows."""
    out = shape_chat_body(body, model, account.signing, thinking, effort)
    preset = PROVIDERS.get(account.provider_name)
    if not account.signing and (preset is not None or models):
        style = model_spec(model, account.provider_name, models).thinking
        if thinking is not None and style:
            _merge_missing(out, provider_thinking(style, thinking))
        if thinking and preset and "thinking_tool_choice_auto" in preset.quirks and \
                out.get("tool_choice") not in (None, "auto", "none"):
            out["tool_choice"] = "auto"  # thinking models take only auto/none here
    return clamp_output(out, limit) if limit else out


def shape_messages_body(body, model, limit, rejects=(), server_blocks=False):
    """An Anthropic Messages body for an Anthropic-protocol upstream: the model it serves, the
    output limit it allows, turns that alternate, and without the fields it rejects (server
    tools' blocks in the history kept only for an upstream that runs them: ``server_blocks``)."""
    out = {k: v for k, v in body.items() if k not in rejects}
    for rule in rejects:
        field, keep = rule.split(":", 1) if ":" in rule else (rule, None)
        field, _dot, key = field.partition(".")
        value = out.get(field)
        if not isinstance(value, dict) or not (key or keep):
            continue
        if keep is not None:
            value = {k: v for k, v in value.items() if k in keep.split(",")}
        elif key == "adaptive" and value.get("type") == "adaptive":
            value = dict(value, type="enabled", budget_tokens=ADAPTIVE_THINKING_BUDGET)
        else:
            value = {k: v for k, v in value.items() if k != key}
        if value:
            out[field] = value
        else:
            out.pop(field)
    out["model"] = model
    out["messages"] = alternating_turns(body["messages"], server_blocks)
    out = clamp_output(out, limit, ("max_tokens",))
    thinking, most = out.get("thinking"), out.get("max_tokens")
    if isinstance(thinking, dict) and isinstance(thinking.get("budget_tokens"), int) and \
            isinstance(most, int) and thinking["budget_tokens"] >= most:
        if most > 1024:  # a budget is 1024 or more, and less than max_tokens (Anthropic's rule)
            out["thinking"] = dict(thinking, budget_tokens=most - 1)
        elif (body.get("thinking") or {}).get("type") == "adaptive":
            out.pop("thinking")  # adaptive: the model may answer without thinking
    return out


def alternating_turns(messages, server_blocks=False):
    """Messages whose roles alternate, user first, as compatible upstreams demand.

    Claude Code puts ``role: "system"`` messages mid-conversation (since 2.1.154), which only
    Anthropic's own API takes, and some chat templates refuse after the first message: each
    becomes a user-turn <system-reminder> block where it stood (the form Claude Code gives its
    own reminders), so no text is lost, the one system prompt stays first and the prompt's
    prefix stays the same from turn to turn (what providers' prefix caches key on).  A system
    turn with no text (only an output_config, say) adds nothing.  Turns of one role next to
    each other are joined.  A server tool's blocks in an assistant turn (a web search the proxy
    or an upstream ran) become text saying what was searched and found, unless
    ``server_blocks``: an upstream that runs the tool itself gets them as they are.
    """
    turns = []
    for message in messages:
        role, content = message["role"], message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else \
            list(content)
        if role == "assistant" and not server_blocks:
            blocks = server_blocks_as_text(blocks)
        if role == "system":
            text = "\n\n".join(b["text"] for b in blocks
                                if b.get("type") == "text" and b.get("text"))
            if not text:
                continue
            message, role = {"role": "user"}, "user"
            blocks = [{"type": "text", "text": "<system-reminder>\n%s\n</system-reminder>"
                       % text}]
        if turns and turns[-1]["role"] == role:
            turns[-1] = dict(turns[-1], content=turns[-1]["content"] + blocks)
        else:
            turns.append(dict(message, role=role, content=blocks))
    return turns


def server_blocks_as_text(blocks):
    """Assistant blocks with each server tool's call and result (server_tool_use,
    ``*_tool_result``) as the text a model reads: what it searched or fetched, and what came
    back (titles and URLs; a fetched page's text, shortened)."""
    if not any(b.get("type") == "server_tool_use" for b in blocks):
        return blocks
    out = []
    for block in blocks:
        kind = block.get("type")
        if kind == "server_tool_use":
            text = "[%s %s]" % (block.get("name"), json.dumps(block.get("input"),
                                                               ensure_ascii=False))
        elif isinstance(kind, str) and kind.endswith("_tool_result"):
            text = "[result] " + _server_result_text(block.get("content"))
        else:
            out.append(block)
            continue
        out.append({"type": "text", "text": text})
    return out


def _server_result_text(content):
    if isinstance(content, list):  # web search results
        return "\n".join("%s — %s" % (r.get("title"), r.get("url")) for r in content
                         if isinstance(r, dict)) or "(no results)"
    if isinstance(content, dict) and isinstance(content.get("content"), dict):  # a page
        source = content["content"].get("source") or {}
        return "%s\n%s" % (content.get("url"), str(source.get("data") or "")[:4000])
    code = content.get("error_code") if isinstance(content, dict) else None
    return "(failed: %s)" % (code or "no result")


def anthropic_headers(account, preset):
    """Headers for an Anthropic-protocol upstream (the key as x-api-key or a Bearer token)."""
    headers = {"Content-Type": "application/json", "anthropic-version": ANTHROPIC_VERSION,
               "User-Agent": "iflow-proxy/" + __version__}
    if preset is not None and preset.auth == "x-api-key":
        headers["x-api-key"] = account.api_key
    else:
        headers["Authorization"] = "Bearer " + account.api_key
    return headers


# DeepSeek: "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]";
# Anthropic's wording: "max_tokens: 99999 > 8192, which is the maximum allowed number of ..."
_MAX_TOKENS_RANGE = re.compile(r"valid range of max_tokens is \[\s*\d+\s*,\s*(\d+)\s*\]|"
                               r"max_tokens: \d+ > (\d+), which is the maximum", re.I)


def max_tokens_range(message):
    """The largest max_tokens an upstream's range error names ("… is [1, 8192]"), or None."""
    m = _MAX_TOKENS_RANGE.search(message or "")
    return int(m.group(1) or m.group(2)) if m else None


# The longest wait a Retry-After may ask for: one "999999999" must not cool a model for 31
# years (the SDKs cap their own waits at 60 s; a longer outage is met again a minute later)
MAX_RETRY_AFTER = 60


def retry_after_seconds(value, clock=time.time):
    """Seconds from a Retry-After header (delta-seconds or HTTP date), at most
    MAX_RETRY_AFTER, or None."""
    if not value:
        return None
    value = value.strip()
    if _DIGITS.match(value):
        return min(int(value), MAX_RETRY_AFTER)
    import email.utils
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    try:
        return min(max(0, int(when.timestamp() - clock())), MAX_RETRY_AFTER)
    except (OverflowError, ValueError, OSError):
        return None


# --- classification --------------------------------------------------------------------------

def _as_code(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def business_error(payload):
    """(code, message) of an iFlow business error object, or (None, "") for a normal answer."""
    if not isinstance(payload, dict):
        return None, ""
    if isinstance(payload.get("choices"), list) or payload.get("object") == "list":
        return None, ""
    err = payload.get("error")
    message = payload.get("msg") or payload.get("message") or ""
    code = None
    if isinstance(err, dict):
        message = err.get("message") or message
        code = _as_code(err.get("code")) or _as_code(err.get("status")) or \
            ANTHROPIC_ERROR_STATUS.get(err.get("type"))
    elif isinstance(err, str):
        message = message or err
    for key in ("status", "error_code", "code"):
        code = code or _as_code(payload.get(key))
    if code in (0, 200) and err is None and payload.get("success") is not False:
        code = None
    if code is None and err is None and payload.get("success") is not False and not message:
        return None, ""
    return code, str(message)[:500]


# "... 210000 tokens > 200000 maximum" (Anthropic's words), and llama.cpp's server's: "request
# (16464 tokens) exceeds the available context size (16384 tokens)"
_TOO_LONG_FIGURES = re.compile(r"(\d+)\s*tokens?\s*>\s*(\d+)|\((\d+) tokens\) exceeds the "
                               r"available context size \((\d+) tokens\)", re.I)
_TOO_LONG = re.compile(r"prompt is too long|context.length|maximum context|too many (input )?"
                       r"tokens|input (is )?too long|exceeds the available context size", re.I)


def too_long_figures(message):
    """(tokens, window) an input-too-long error names, or None."""
    found = _TOO_LONG_FIGURES.search(message or "")
    if found is None:
        return None
    return int(found.group(1) or found.group(3)), int(found.group(2) or found.group(4))


def kind_for(code, message=""):
    """The UPSTREAM_KINDS entry for an HTTP status or iFlow business code."""
    kind = _KIND_OF_CODE.get(code)
    if kind not in ("concurrency", "rate_limit", "key_expired") and \
            "invalidapikey" in (message or "").lower().replace(" ", ""):
        return "key_blocked"
    if code == 400 and _TOO_LONG.search(message or ""):
        return "context_length"
    if kind is None and code is not None and 400 <= code < 600:
        return "transient" if code >= 500 else "bad_request"
    return kind


def classify_answer(http_status, raw, trace_id="", retry_after=None, secrets=()):
    """Raise UpstreamError for an upstream error answer; return the parsed JSON otherwise.

    Upstream's own words go into the error message scrubbed of ``secrets`` and of anything
    shaped like a key: providers echo the key they were sent.
    """
    text = True  # (JSON is UTF-8: an answer that is not is unreadable, an error still read)
    try:
        payload = json.loads(raw) if raw.strip() else None
    except UnicodeDecodeError:  # still classify an error whose text is not valid UTF-8
        payload, text = _lenient_json(raw), False
    except ValueError:
        payload = None
    code, message = business_error(payload)
    kind = kind_for(code, message)
    if kind in ("bad_request", "context_length") and (http_status == 429 or http_status >= 500):
        kind = None  # the status's "later" beats a body's invalid_request_error or "too many
        # tokens" (a tokens-per-minute limit, on a 429)
    if kind is None and http_status != 200:
        kind = kind_for(http_status, message) or "transient"
        code = http_status
    if kind is None and payload is not None and code is None and message:
        kind = "malformed"
    if kind is None and not isinstance(payload, dict):
        kind, message = "malformed", "not a JSON object: %r" % raw[:120]
    if kind is None and not text:
        kind, message = "malformed", "not UTF-8 text: %r" % raw[:120]
    if kind is None:
        return payload
    detail = scrub_secrets(message or (raw[:200].decode("utf-8", "replace") if raw else
                                       "empty body"), secrets)
    where = "HTTP %d" % http_status + (", code %s" % code if code != http_status else "")
    error = UpstreamError(kind, "upstream: %s (%s)" % (detail, where), upstream_status=code,
                          trace_id=trace_id, retry_after=retry_after)
    error.said = detail if message else ""
    raise error


def _lenient_json(raw):
    try:
        return json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return None


# Sorted keys for hashing (json.dumps builds a new encoder for every call with options)
_SORTED_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, default=str)


# --- server-sent events ----------------------------------------------------------------------

class EventSplitter:
    """Cuts a byte stream into complete SSE events (each ended by a blank line).

    Linear in the bytes fed (only new bytes are searched) and bounded: one event larger than
    ``limit`` raises UpstreamError instead of growing without end.
    """

    def __init__(self, limit=MAX_EVENT_BYTES):
        self.limit = limit
        self._parts, self._size = [], 0
        self._cr = False          # the last read ended in "\r": maybe half of "\r\n"
        self._newline = False     # the pending event ends in "\n": "\n" next ends it

    def feed(self, data):
        """The events completed by ``data``, each as bytes without its blank line."""
        if self._cr:
            data, self._cr = b"\r" + data, False
        if data.endswith(b"\r"):
            data, self._cr = data[:-1], True
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        events, start = [], 0
        if self._newline and data[:1] == b"\n":
            self._add(events, self._take(b"")[:-1])
            start = 1
        while True:
            end = data.find(b"\n\n", start)
            if end < 0:
                break
            piece = data[start:end]
            self._add(events, self._take(piece) if self._parts else piece)
            start = end + 2
        rest = data[start:]
        if rest:
            self._parts.append(rest)
            self._size += len(rest)
            self._newline = rest.endswith(b"\n")
            if self._size > self.limit:
                raise UpstreamError("malformed", "an upstream stream event exceeded %d bytes"
                                    % self.limit)
        elif start:
            self._newline = False
        return events

    @staticmethod
    def _add(events, event):
        if event.strip():
            events.append(event)

    def _take(self, tail):
        if self._size + len(tail) > self.limit:
            raise UpstreamError("malformed", "an upstream stream event exceeded %d bytes"
                                % self.limit)
        event = b"".join(self._parts) + tail
        self._parts, self._size = [], 0
        return event

    @property
    def pending(self):
        """Bytes of an event that has begun but not ended."""
        return self._size

    def rest(self):
        """What is left when the stream ends (an event without its blank line), or b""."""
        return self._take(b"\r" if self._cr else b"")


def event_data(event):
    """The joined ``data:`` lines of one SSE event (bytes), or None."""
    if event.startswith(b"data: ") and b"\n" not in event:  # the usual one-line event
        return event[6:]
    if event.startswith(b"event: "):  # Anthropic's usual two: "event: <type>", "data: {...}"
        data = event[event.find(b"\n") + 1:]
        if data.startswith(b"data: ") and b"\n" not in data:
            return data[6:]
    lines = [line[5:].lstrip(b" ") if line.startswith(b"data:") else None
             for line in event.split(b"\n")]
    lines = [line for line in lines if line is not None]
    return b"\n".join(lines) if lines else None


def sse(data, event=None):
    """One SSE event as bytes; ``data`` is a JSON-able object or already-encoded bytes."""
    if not isinstance(data, bytes):
        data = json_bytes(data)
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + data + b"\n\n"


def completion_to_chunks(completion):
    """An OpenAI chat.completion as the chunks of an equivalent stream (for a JSON answer)."""
    base = {"id": completion.get("id") or "chatcmpl-" + random_hex(24),
            "object": "chat.completion.chunk", "created": completion.get("created") or
            int(time.time()), "model": completion.get("model", "")}
    chunks = []
    for i, choice in enumerate(completion.get("choices") or []):
        message = choice.get("message") or {}
        delta = {"role": message.get("role") or "assistant"}
        for key in ("content", "reasoning_content"):
            if message.get(key):
                delta[key] = message[key]
        if message.get("tool_calls"):
            delta["tool_calls"] = [dict(call, index=n)
                                   for n, call in enumerate(message["tool_calls"])]
        index = choice.get("index", i)
        chunks.append(dict(base, choices=[{"index": index, "delta": delta,
                                           "finish_reason": None}]))
        chunks.append(dict(base, choices=[{"index": index, "delta": {},
                                           "finish_reason": choice.get("finish_reason")
                                           or "stop"}]))
    if completion.get("usage"):
        chunks.append(dict(base, choices=[], usage=completion["usage"]))
    return chunks


def message_to_events(message):
    """An Anthropic message as the events of an equivalent stream (for a JSON answer)."""
    start = dict(message, content=[], stop_reason=None, stop_sequence=None)
    events = [{"type": "message_start", "message": start}]
    for index, block in enumerate(message.get("content") or ()):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            empty, delta = dict(block, text=""), {"type": "text_delta", "text": block["text"]}
        elif kind == "thinking":
            empty = dict(block, thinking="")
            delta = {"type": "thinking_delta", "thinking": block.get("thinking", "")}
        elif kind in ("tool_use", "server_tool_use"):
            empty = dict(block, input={})
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block.get("input"))}
        else:  # (a web_search_tool_result comes whole in its start event)
            empty, delta = block, None
        events.append({"type": "content_block_start", "index": index, "content_block": empty})
        if delta is not None:
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        events.append({"type": "content_block_stop", "index": index})
    usage = message.get("usage") or {}
    events.append({"type": "message_delta", "delta": {
        "stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")},
        "usage": dict({"output_tokens": usage.get("output_tokens", 0)}, **(
            {"server_tool_use": usage["server_tool_use"]} if "server_tool_use" in usage
            else {}))})
    events.append({"type": "message_stop"})
    return events


def message_from_events(chunks):
    """The Anthropic message that stream events (SSE bytes, as written) add up to."""
    message, blocks, partial = None, {}, {}
    for frame in b"".join(chunks).split(b"\n\n"):
        data = next((line[6:] for line in frame.split(b"\n") if line.startswith(b"data: ")),
                    None)
        event = json.loads(data) if data else {}
        kind = event.get("type")
        if kind == "message_start":
            message = dict(event["message"], content=[])
        elif kind == "content_block_start":
            blocks[event["index"]] = dict(event["content_block"])
        elif kind == "content_block_delta":
            block, delta = blocks[event["index"]], event["delta"]
            if delta.get("type") == "input_json_delta":
                partial[event["index"]] = partial.get(event["index"], "") + delta["partial_json"]
            else:
                field = {"text_delta": "text", "thinking_delta": "thinking",
                         "signature_delta": "signature"}.get(delta.get("type"))
                if field:
                    block[field] = block.get(field, "") + delta[field]
        elif kind == "content_block_stop" and event["index"] in partial:
            blocks[event["index"]]["input"] = json.loads(partial.pop(event["index"]) or "{}")
        elif kind == "message_delta" and message is not None:
            message.update(event.get("delta") or {})
            message["usage"] = dict(message.get("usage") or {}, **(event.get("usage") or {}))
    if message is None:
        raise UpstreamError("malformed", "the answer had no message_start")
    message["content"] = [blocks[i] for i in sorted(blocks)]
    return message


def openai_usage(usage):
    """Anthropic usage counted the OpenAI way (prompt tokens include cached ones)."""
    if not isinstance(usage, dict):
        return None
    prompt = sum(usage.get(k) or 0 for k in ("input_tokens", "cache_read_input_tokens",
                                               "cache_creation_input_tokens")
                 if isinstance(usage.get(k), int))
    out = {"prompt_tokens": prompt, "completion_tokens": usage.get("output_tokens") or 0}
    if usage.get("cache_read_input_tokens"):
        out["prompt_tokens_details"] = {"cached_tokens": usage["cache_read_input_tokens"]}
    if usage.get("cache_creation_input_tokens"):  # (OpenRouter's name for them)
        out.setdefault("prompt_tokens_details", {})["cache_write_tokens"] = \
            usage["cache_creation_input_tokens"]
    return out


def chat_usage(usage):
    """A Responses API usage counted the chat-completions way."""
    usage = clean_usage(usage)
    if usage is None:
        return None
    out = {"prompt_tokens": usage.get("input_tokens") or 0,
           "completion_tokens": usage.get("output_tokens") or 0}
    cached = (usage.get("input_tokens_details") or {}).get("cached_tokens")
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    reasoning = (usage.get("output_tokens_details") or {}).get("reasoning_tokens")
    if reasoning:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


# --- the one upstream reader -----------------------------------------------------------------

# What the translations read of an upstream's answer, checked once where it arrives (below):
# a provider that sends a field of another type gets a clear "malformed" error (502, or the
# stream's error event), not a crash in a translation.  The answer's own bytes still go as they
# came to a client of the same protocol; these checks look at the parsed copy only, and tidy
# two shapes real servers send: usage counts (only whole numbers are kept) and a tool call's
# arguments given as an object (Ollama's native form), made the JSON text OpenAI specifies.

def clean_usage(usage):
    """``usage`` with only the counts the translations can add up: whole numbers of 0 or
    more (and the known objects of them); None for what is not an object."""
    if type(usage) is not dict:
        return None
    out = {}
    for key, value in usage.items():
        if key in _USAGE_PARTS:
            if type(value) is dict:
                out[key] = clean_usage(value)
        elif type(value) is int and value >= 0:
            out[key] = value
    return out


_USAGE_PARTS = ("prompt_tokens_details", "completion_tokens_details", "input_tokens_details",
                "output_tokens_details", "server_tool_use", "cache_creation")


def _not_text(value):
    return value is not None and type(value) is not str


def chat_message_problem(message, delta=False):
    """What in an OpenAI chat message (a stream's ``delta`` too) a translation can't read,
    or None.  A tool call's arguments given as an object become their JSON text here."""
    if type(message) is not dict:
        return "is not an object"
    for key in ("content", "reasoning_content", "reasoning", "refusal", "role"):
        if _not_text(message.get(key)):
            return ".%s is not a string" % key
    calls = message.get("tool_calls")
    if calls is None:
        return None
    if type(calls) is not list:
        return ".tool_calls is not a list"
    for j, call in enumerate(calls):
        function = call.get("function") if type(call) is dict else None
        if type(function) is not dict or _not_text(call.get("id")) or \
                (delta and call.get("index") is not None and type(call["index"]) is not int):
            return ".tool_calls[%d] is not a tool call" % j
        if type(function.get("arguments")) is dict:
            function["arguments"] = json.dumps(function["arguments"], ensure_ascii=False)
        if _not_text(function.get("name")) or _not_text(function.get("arguments")) or \
                (not delta and type(function.get("name")) is not str):
            return ".tool_calls[%d].function has no string name and arguments" % j
    return None


def completion_problem(payload, stream=False):
    """What in an OpenAI chat completion (or stream chunk) a translation can't read, or
    None; its usage is cleaned (clean_usage) on the way."""
    for i, choice in enumerate(payload["choices"]):
        if type(choice) is not dict:
            return "choices[%d] is not an object" % i
        if _not_text(choice.get("finish_reason")):
            return "choices[%d].finish_reason is not a string" % i
        key = "delta" if stream else "message"
        if choice.get(key) is not None:  # (none: nothing said, as translations read it)
            problem = chat_message_problem(choice.get(key), stream)
            if problem:  # (".tool_calls[0] is ...", or "is not an object")
                return "choices[%d].%s%s" % (i, key, problem if problem[0] == "." else
                                             " " + problem)
    if "usage" in payload:
        payload["usage"] = clean_usage(payload["usage"])
    return None


_BLOCK_TEXT = {"text": "text", "thinking": "thinking", "redacted_thinking": "data",
               "text_delta": "text", "thinking_delta": "thinking",
               "input_json_delta": "partial_json", "signature_delta": "signature"}


def anthropic_block_problem(block):
    """What in an Anthropic content block (or a stream's delta) a translation can't read."""
    kind = block.get("type") if type(block) is dict else None
    if type(kind) is not str:
        return "is not an object with a string type"
    if kind in _BLOCK_TEXT and type(block.get(_BLOCK_TEXT[kind])) is not str:
        return "(%s) has no string %s" % (kind, _BLOCK_TEXT[kind])
    if kind in ("tool_use", "server_tool_use") and (
            type(block.get("id")) is not str or type(block.get("name")) is not str or
            type(block.get("input", {})) is not dict):
        return "(%s) needs a string id and name and an object input" % kind
    if _not_text(block.get("signature")):
        return "(%s) has a signature that is not a string" % kind
    return None


def anthropic_message_problem(payload):
    """What in an Anthropic message a translation can't read, or None (usage cleaned)."""
    if _not_text(payload.get("id")) or _not_text(payload.get("stop_reason")):
        return "its id or stop_reason is not a string"
    for i, block in enumerate(payload["content"]):
        problem = anthropic_block_problem(block)
        if problem:
            return "content[%d] %s" % (i, problem)
    payload["usage"] = clean_usage(payload.get("usage"))
    return None


def anthropic_event_problem(event):
    """What in one Anthropic stream event a translation can't read, or None."""
    kind = event["type"]
    if kind == "message_start":
        message = event.get("message")
        if type(message) is not dict:
            return "its message is not an object"
        message["usage"] = clean_usage(message.get("usage"))
    elif kind in ("content_block_start", "content_block_delta", "content_block_stop"):
        if type(event.get("index")) is not int:
            return "its index is not a whole number"
        if kind != "content_block_stop":
            key = "content_block" if kind == "content_block_start" else "delta"
            problem = anthropic_block_problem(event.get(key))
            if problem:
                return "%s %s" % (key, problem)
    elif kind == "message_delta":
        delta = event.get("delta")
        if type(delta) is not dict or _not_text(delta.get("stop_reason")):
            return "its delta is not an object with a string stop_reason"
        if "usage" in event:
            event["usage"] = clean_usage(event["usage"])
    return None


class UpstreamAnswer:
    """One upstream chat answer, read and checked for errors in exactly one place.

    open() classifies the head before any byte goes to the client, so failures can still fail
    over: the HTTP status, a JSON body (business errors inside 200s, no choices, a completion
    cut by ``finish_reason: "network_error"``), or the first SSE event.  chunks() is then the
    one iterator that every relay and the non-stream path read.  ``protocol`` says what the
    upstream speaks: OpenAI chat completions, or Anthropic messages (whose events are checked
    by the same rules: errors, a readable event, an end that was reached).
    """

    def __init__(self, response, stream=True, secrets=(), body_limit=None,
                 event_limit=MAX_EVENT_BYTES, protocol="openai", check=None):
        self.response, self.stream = response, stream
        self.secrets = secrets
        self.body_limit = body_limit
        self.protocol = protocol   # openai, anthropic, or responses (the Responses API)
        self.check = check         # Responses: what is wrong in a final response object, or None
        self.anthropic = protocol == "anthropic"
        self.payload = None        # a JSON answer: the checked completion (or message) ...
        self.raw = b""             # ... and its bytes, relayed as they came
        self.finish_reason = None  # (Anthropic: the stop_reason)
        self.usage = None          # always counted the OpenAI way (prompt/completion tokens)
        self.usage_final = False   # the answer's last usage report arrived (see relayed_usage)
        self.relayed = []          # output text seen in stream events, for an estimate
        self.done = False          # [DONE] (Anthropic: message_stop) seen
        self._splitter = EventSplitter(event_limit)
        self._head = []            # data of the events read while opening

    def open(self):
        resp = self.response
        if resp.status != 200 or not (self.stream and resp.is_event_stream):
            self.raw = resp.read_all(self.body_limit)
            payload = classify_answer(resp.status, self.raw, resp.trace_id,
                                      retry_after_seconds(resp.headers.get("Retry-After")),
                                      self.secrets)
            self.payload = self._check_message(payload) if self.anthropic else \
                self._check_response(payload) if self.protocol == "responses" else \
                self._check_completion(payload)
            self.usage_final = self.usage is not None  # a whole answer: its report is all
            return self
        seen = 0
        while not self._head:  # up to the first data event: iFlow may put an error there
            data = resp.read1()
            events = self._splitter.feed(data) if data else [self._splitter.rest()]
            self._head = [d for d in map(event_data, events) if d is not None]
            seen += len(data)
            if not data and not self._head:
                raise UpstreamError("malformed", "upstream ended the stream without any data",
                                    trace_id=resp.trace_id)
            if seen > SSE_HEAD_LIMIT and not self._head and not self._splitter.pending:
                raise UpstreamError("malformed", "no SSE data in the first %d bytes" % seen)
        self._head = [item for item in map(self._item, self._head) if item]
        return self

    def _check_completion(self, payload):
        choices = payload.get("choices")
        if not isinstance(choices, list):
            raise UpstreamError("malformed", "upstream answer has no choices",
                                trace_id=self.response.trace_id)
        self._shape(completion_problem(payload))  # (each choice is an object from here)
        for choice in choices:
            if choice.get("finish_reason") == "network_error":
                raise UpstreamError("transient", "upstream answer ended with finish_reason "
                                    "network_error", trace_id=self.response.trace_id)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if isinstance(payload.get("usage"), dict):
            self.usage = payload["usage"]
        return payload

    def _check_response(self, payload):
        """A Responses API answer: a response object, failed ones raised as what they say."""
        if payload.get("object") != "response" or not isinstance(payload.get("output"), list):
            raise UpstreamError("malformed", "upstream answer is not a Responses API response",
                                trace_id=self.response.trace_id)
        if payload.get("status") == "failed":
            raise self._failed_response(payload)
        self._shape(self.check and self.check(payload))
        status = payload.get("status")
        self.finish_reason = status if type(status) is str else None
        self.usage = chat_usage(payload.get("usage"))
        return payload

    def _failed_response(self, response):
        """The UpstreamError for a Responses ``response.failed`` (its error code's kind)."""
        error = response.get("error") if isinstance(response.get("error"), dict) else {}
        code = error.get("code")
        kind = {"rate_limit_exceeded": "rate_limit", "context_length_exceeded":
                "context_length", "insufficient_quota": "key_blocked"}.get(
                    code if type(code) is str else "", "transient")
        return UpstreamError(kind, "upstream: response failed: %s" % scrub_secrets(
            str(error.get("message") or error.get("code") or "no reason given")[:300],
            self.secrets), trace_id=self.response.trace_id)

    def _check_response_event(self, data, event):
        kind = event.get("type") if type(event) is dict else None
        if type(kind) is not str or kind == "error":
            self._unreadable(data)
        if kind.endswith(".delta") and type(event.get("delta")) is str:
            self.relayed.append(event["delta"])
        elif kind in ("response.completed", "response.incomplete"):
            response = event.get("response") if type(event.get("response")) is dict else {}
            self._shape(self.check and self.check(response))
            status = response.get("status")
            self.finish_reason, self.done = status if type(status) is str else kind, True
            if type(response.get("usage")) is dict:
                self.usage, self.usage_final = chat_usage(response["usage"]), True
        elif kind == "response.failed":
            raise self._failed_response(event.get("response") if type(
                event.get("response")) is dict else {})
        return event

    def _check_message(self, payload):
        if payload.get("type") != "message" or not isinstance(payload.get("content"), list):
            raise UpstreamError("malformed", "upstream answer is not an Anthropic message",
                                trace_id=self.response.trace_id)
        self._shape(anthropic_message_problem(payload))
        self.finish_reason = payload.get("stop_reason")
        self.usage = openai_usage(payload.get("usage"))
        return payload

    def _check_chunk(self, data):
        """One stream event's data parsed and checked: raises for errors inside it."""
        try:
            chunk = json.loads(data)
        except ValueError:  # not JSON, or not UTF-8: still classified (it may be an error)
            chunk = None
        if self.anthropic:
            return self._check_event(data, chunk)
        if self.protocol == "responses":
            return self._check_response_event(data, chunk)
        choices = chunk.get("choices") if type(chunk) is dict else None
        if type(choices) is not list or "error" in chunk:
            code, message = business_error(chunk)
            if type(chunk) is not dict or code is not None or message or "error" in chunk:
                self._unreadable(data)
        if type(choices) is not list:  # (a chunk of usage alone may have none)
            self._shape(choices is not None and "a chunk's choices are not a list")
            chunk["choices"] = choices = []
        self._shape(completion_problem(chunk, stream=True))  # (objects, or no delta, from here)
        for choice in choices:
            reason, delta = choice.get("finish_reason"), choice.get("delta")
            if delta is not None:
                self._note_output(delta.get("content"), delta.get("reasoning_content"),
                                  delta.get("tool_calls"))
            if reason:
                if reason == "network_error":
                    raise UpstreamError("transient", "upstream stream ended with finish_reason "
                                        "network_error", trace_id=self.response.trace_id)
                self.finish_reason = reason
        usage = chunk.get("usage")
        if type(usage) is dict:
            self.usage, self.usage_final = usage, True
        return chunk

    def _note_output(self, *pieces):
        """Keep the output text an event carries (text, reasoning, tool arguments)."""
        for piece in pieces:
            if type(piece) is str:
                self.relayed.append(piece)
            elif type(piece) is list:  # tool-call deltas
                for call in piece:
                    function = call.get("function") if type(call) is dict else None
                    if type(function) is dict and type(function.get("arguments")) is str:
                        self.relayed.append(function["arguments"])

    def relayed_usage(self, prompt_estimate, estimate):
        """The usage to record: upstream's own report when its last one arrived; else (a
        client that left, a stream cut before its end) what was relayed, counted here: the
        prompt as upstream reported it or as ``prompt_estimate()`` counts it, and the output
        text seen as ``estimate(text)`` counts it.  So a budget (tokens_per_day) can't be
        dodged by leaving before the end."""
        if self.usage_final:
            return self.usage
        usage = self.usage or {}
        output = estimate("".join(self.relayed)) if self.relayed else 0
        return {"prompt_tokens": usage.get("prompt_tokens") or prompt_estimate(),
                "completion_tokens": max(usage.get("completion_tokens") or 0, output),
                "estimated": True}

    def _check_event(self, data, event):
        kind = event.get("type") if type(event) is dict else None
        if type(kind) is not str or kind == "error":
            self._unreadable(data)
        self._shape(anthropic_event_problem(event))  # (deltas are objects from here)
        if kind == "content_block_delta":
            delta = event["delta"]
            self._note_output(delta.get("text"), delta.get("thinking"), delta.get("partial_json"))
        elif kind == "message_delta":
            if event["delta"].get("stop_reason"):
                self.finish_reason = event["delta"]["stop_reason"]
            usage = event.get("usage")
            if type(usage) is dict:
                self.usage = openai_usage(dict((self._anthropic_usage or {}), **usage))
                self.usage_final = True
        elif kind == "message_start":
            self._anthropic_usage = event["message"].get("usage")
            self.usage = openai_usage(self._anthropic_usage)
        elif kind == "message_stop":
            self.done = True
        return event

    _anthropic_usage = None

    def _shape(self, problem):
        if problem:
            raise UpstreamError("malformed", "upstream answer can't be read: %s" % problem,
                                trace_id=self.response.trace_id)

    def _unreadable(self, data):
        """Raise for an event that carries an error, or that can't be read at all."""
        classify_answer(200, data, self.response.trace_id, secrets=self.secrets)
        raise UpstreamError("malformed", "upstream sent an unreadable stream event: %r"
                            % data[:80], trace_id=self.response.trace_id)

    def _item(self, data):
        """(data, chunk) for one event's data; None for [DONE] and anything after the end."""
        if self.done:
            return None
        if data == b"[DONE]" and self.protocol == "openai":
            self.done = True
            return None
        return data, self._check_chunk(data)

    def chunks(self):
        """(data bytes, chunk) for each chunk (Anthropic: event) of the answer as it arrives,
        every one checked.

        Raises UpstreamError when upstream breaks off, sends an error or an unreadable event,
        or ends before its end ([DONE] or a finish_reason; Anthropic: message_stop): a cut
        answer is never complete.
        """
        if self.payload is not None:
            for chunk in message_to_events(self.payload) if self.anthropic else \
                    [self.payload] if self.protocol == "responses" else \
                    completion_to_chunks(self.payload):
                yield json_bytes(chunk), chunk
            return
        for item in self._head:
            yield item
        self._head = []
        resp, splitter = self.response, self._splitter
        while True:
            data = resp.read1()
            if not data:
                break
            for event in splitter.feed(data):
                payload = event_data(event)
                item = self._item(payload) if payload is not None else None
                if item is not None:
                    yield item
        rest = event_data(splitter.rest())
        item = self._item(rest) if rest else None
        if item is not None:
            yield item
        if not self.done and (self.finish_reason is None or self.protocol != "openai"):
            raise UpstreamError("transient", "upstream stream ended before the answer was "
                                "complete (%s)" % {"anthropic": "no message_stop", "responses":
                                                   "no response.completed"}.get(
                                    self.protocol, "no finish_reason, no [DONE]"),
                                trace_id=resp.trace_id)

    def close(self):
        """Drop the upstream connection unless the answer was read to its end."""
        self.response.close()


# ==================================================================================================
# Routing: which accounts may serve a request, in what order, and what a failure does to them
# ==================================================================================================

_EFFORT_SUFFIX = re.compile(r"\((none|minimal|low|medium|high|xhigh|max|auto|\d+)\)$", re.I)
_CONTEXT_SUFFIX = re.compile(r"\[1m\]$", re.I)


def split_model_suffix(model):
    """``glm-4.6(high)[1m]`` -> ("glm-4.6", "high"); suffixes are hints no upstream accepts."""
    effort = None
    while True:
        m = _CONTEXT_SUFFIX.search(model) or _EFFORT_SUFFIX.search(model)
        if not m:
            return model.strip(), effort
        if m.re is _EFFORT_SUFFIX:
            effort = m.group(1).lower()
        model = model[:m.start()]


def legacy_mode(config, name):
    modes = config.legacy_aliases
    if isinstance(modes, dict):
        return next((v for k, v in modes.items() if k.lower() == name.lower()), "fallback")
    return modes


def resolve_model(model, config):
    """(model to send, fallback model or None, effort hint or None) for a requested name."""
    base, effort = split_model_suffix(model)
    for alias, target in config.model_aliases.items():  # user aliases are unconditional
        if alias.lower() in (model.lower(), base.lower()):
            target_base, target_effort = split_model_suffix(target)
            return target_base, None, target_effort or effort
    for name, entry in config.models.items():  # (usually none: most configs have no models)
        if base.lower() in (a.lower() for a in entry.get("aliases", ())):
            return name, None, effort
    canonical = LEGACY_ALIASES.get(base.lower())
    mode = legacy_mode(config, base) if canonical else "off"
    if mode == "always":
        return canonical, None, effort
    return base, canonical if mode == "fallback" else None, effort


def matches_any(name, patterns):
    """Whether ``name`` matches one of the glob ``patterns``, case ignored."""
    name = name.lower()
    return any(fnmatch.fnmatchcase(name, p.lower()) for p in patterns)


def model_allowed(account, model):
    return (not account.models or matches_any(model, account.models)) and \
        not matches_any(model, account.excluded_models)


def serves(account, model):
    """An account serves its provider's models and any model no preset claims; a custom
    upstream (no provider) is asked for anything."""
    owners = MODEL_OWNERS.get(model.lower())
    return not owners or not account.provider_name or account.provider_name in owners


def window_of(model, models=None, reported=None):
    """``model``'s context window: a config ``models`` entry's, else the largest any preset
    gives it, else what an upstream's /models reported; None when nothing says."""
    entry = custom_model(models, model) if models else None
    if entry and "window" in entry:
        return entry["window"]
    windows = [model_spec(model, owner).window for owner in MODEL_OWNERS.get(model.lower(), ())]
    found = reported.get(model.lower()) if reported and not windows else None
    return max(windows) if windows else found.window if found else None


def claude_families(accounts, configured):
    """Claude family -> model: the one provider's own mapping when every usable account is of
    that provider (else iFlow's), with config ``claude_models`` on top."""
    providers = {a.provider_name for a in accounts if a.usable and a.provider_name}
    preset = PROVIDERS[providers.pop()] if len(providers) == 1 else PROVIDERS["iflow"]
    return dict(preset.claude, **configured)


def model_chain(model, fallbacks):
    """``model`` then its config ``model_fallbacks``, each once (a chain never loops)."""
    chain = [model]
    for name in fallbacks.get(model, ()):
        if name.lower() not in {c.lower() for c in chain}:
            chain.append(name)
    return chain


BACKGROUND_WAIT = 20.0  # seconds a housekeeping request yields to main turns before it ages
MAX_WAITING = 1000      # requests waiting for an account at once; more get 429 at once


class _Ticket:
    """A request waiting for an account: main turns first come, first served; one in a lower
    lane (see REQUEST_LANES: subagents, then housekeeping) lets those above go first until it
    has waited BACKGROUND_WAIT seconds, then takes its place by arrival — never starved."""

    __slots__ = ("ids", "lane", "since")

    def __init__(self, ids, lane=0, since=0.0):
        self.ids, self.lane, self.since = ids, lane, since

    def rank(self, now):
        return self.lane if now - self.since < BACKGROUND_WAIT else 0


# failure kind -> (cooldown key scope, seconds); rate limits back off exponentially instead
COOLDOWNS = {
    "concurrency": ("account", 3),          # 449: someone else is using this key right now
    "transient": ("model", 60), "timeout": ("model", 60), "unreachable": ("model", 60),
    "model_error": ("model", 60), "malformed": ("model", 60),
    "model_unsupported": ("model", 600),    # 435: this account can't serve this model
}
MAX_BACKOFF = 1800
MAX_COOLDOWNS = 1000   # (account, model) cooldowns kept at once


class Router:
    """Chooses an account for each request and tracks what each account is doing.

    Each account serves at most ``max_concurrency`` requests at once (iFlow allows about one);
    requests beyond that wait in one first-come-first-served queue, up to ``queue_timeout``.
    Failures cool an (account, model) pair down; dead keys leave rotation.
    """

    def __init__(self, registry, config, clock=time.monotonic):
        self.registry = registry
        self.config = config
        self.clock = clock
        self._eligible = (None, {})   # (accounts snapshot, {(model, pinned): eligible})
        self._positions = (None, {})  # (accounts snapshot, account id -> its place)
        self._lock = threading.Lock()  # taken directly: Condition's with is Python code
        self._cond = threading.Condition(self._lock)
        self._inflight = {}      # account id -> requests in flight
        self._queue = []         # _Ticket, oldest first
        self._cooldowns = {}     # (account id, model or "*") -> (until, reason)
        self._strikes = {}       # (account id, model) -> consecutive rate-limit answers
        self._affinity = {}      # conversation key -> account id (insertion-ordered, bounded)
        self._cursor = 0
        self.recent_errors = []  # newest last, bounded

    # --- which accounts ----------------------------------------------------------------------
    def all_accounts(self):
        return self.registry.all_accounts()

    def split_pin(self, model):
        """``work/glm-4.6`` -> ("work", "glm-4.6") when ``work`` is an account's nickname."""
        if "/" in model:
            nick, rest = model.split("/", 1)
            if any(a.nickname.lower() == nick.lower() for a in self.all_accounts()):
                return nick, rest
        return None, model

    def eligible(self, model, pinned=None):
        """Accounts that may serve ``model`` (usable, allowed, pinned), or a clear error;
        remembered per account snapshot (it depends on nothing else)."""
        accounts = self.all_accounts()
        memo = self._eligible
        if memo[0] is not accounts:
            memo = self._eligible = (accounts, {})
        found = memo[1].get((model, pinned))
        if found is None:
            found = self._eligible_now(accounts, model, pinned)
            if len(memo[1]) < 1000:  # clients choose model names
                memo[1][(model, pinned)] = found
        return found

    def _eligible_now(self, accounts, model, pinned):
        if not accounts:
            raise NoAccount("no iFlow account is set up: run `python iflow_proxy.py login` (or "
                            "`login --api-key`, or set IFLOW_API_KEYS) and retry")
        if pinned:
            accounts = tuple(a for a in accounts if a.nickname.lower() == pinned.lower())
        usable = [a for a in accounts if a.usable]
        if not usable:
            reasons = "; ".join("%s: %s" % (a.nickname, a.status_reason or a.status)
                                for a in accounts)
            raise NoAccount("no usable account (%s); run `python iflow_proxy.py login`" % reasons)
        allowed = [a for a in usable if model_allowed(a, model)]
        if not allowed:
            raise NotFound("model %r is not allowed on any account (see the accounts' "
                           "models/excluded_models settings)" % model, code="model_not_found")
        serving = [a for a in allowed if serves(a, model)]
        if not serving:
            owners = MODEL_OWNERS.get(model.lower(), ())
            raise NotFound("model %r is served by %s; no account of %s is set up (python "
                           "iflow_proxy.py login --api-key --provider %s)" % (
                               model, ", ".join(owners), "theirs" if len(owners) > 1 else "it",
                               owners[0]), code="model_not_found")
        return tuple(serving)

    def limit(self, account):
        return self.config.max_concurrency if account.max_concurrency is None \
            else account.max_concurrency

    def cooling_until(self, account, model, now=None):
        now = self.clock() if now is None else now
        until = max(self._cooldowns.get((account.id, model), (0, ""))[0],
                    self._cooldowns.get((account.id, "*"), (0, ""))[0])
        return until if until > now else 0

    # --- taking and giving back a slot ---------------------------------------------------
    def acquire(self, model, pinned=None, affinity=None, exclude=(), cancelled=None, lane=0):
        """An account with a free slot for ``model`` (call release() after), or None when every
        eligible account was excluded.  Raises RateLimited when all are cooling down or the queue
        wait runs out, ClientGone when ``cancelled()`` turns true while waiting."""
        started = time.monotonic()
        deadline = started + self.config.queue_timeout
        # Worked out before the lock is taken (it only reads): the less time spent holding
        # it, the less often 64 threads queue on it behind one the GIL was taken from.
        ready = self._ready_or_wait(model, pinned, exclude, cancelled,
                                    started + min(self.config.cooldown_wait,
                                                  self.config.queue_timeout))
        if ready is None:
            return None
        with self._lock:
            ticket = None
            try:
                while True:
                    if ticket is None and not self._queue:  # nobody waits: no ticket needed
                        account = self._choose(None, ready, affinity)
                        if account is not None:
                            self._inflight[account.id] = self._inflight.get(account.id, 0) + 1
                            return account
                    if ticket is None:
                        if len(self._queue) >= MAX_WAITING:
                            raise RateLimited("%d requests are already waiting for an account; "
                                              "retry shortly" % len(self._queue), retry_after=1)
                        ticket = _Ticket([a.id for a in ready], lane, started)
                        self._queue.append(ticket)
                    ticket.ids = [a.id for a in ready]
                    account = self._choose(ticket, ready, affinity)
                    if account is not None:
                        self._inflight[account.id] = self._inflight.get(account.id, 0) + 1
                        return account
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise RateLimited(
                            "all %d account(s) for model %s stayed busy for %gs (config "
                            "queue_timeout); add accounts or raise max_concurrency"
                            % (len(ready), model, self.config.queue_timeout), retry_after=1)
                    self._cond.wait(min(remaining, 0.25) if cancelled or lane
                                    else remaining)
                    if cancelled is not None and cancelled():
                        raise ClientGone()
                    ready = self._ready(model, pinned, exclude)  # as things are now
                    if ready is None:
                        return None
            finally:
                if ticket is not None:
                    self._queue.remove(ticket)
                    self._cond.notify_all()

    def _ready_or_wait(self, model, pinned, exclude, cancelled, until):
        """_ready(), waiting (until the monotonic time ``until``) for a short cooldown to
        end rather than answering 429 at once: an upstream that still counts an abandoned
        request cools an account for a few seconds (CLIProxyAPI's max-retry-interval)."""
        while True:
            try:
                return self._ready(model, pinned, exclude)
            except RateLimited:
                now = self.clock()
                eligible = [a for a in self.eligible(model, pinned) if a.id not in exclude]
                soonest = min((self.cooling_until(a, model, now) or now) - now
                              for a in eligible)
                left = until - time.monotonic()
                if soonest <= 0 or soonest > left:
                    raise
            with self._lock:
                self._cond.wait(min(soonest, left, 0.25 if cancelled else soonest))
            if cancelled is not None and cancelled():
                raise ClientGone()

    def _ready(self, model, pinned, exclude):
        """The eligible accounts not in ``exclude`` and not cooling down for ``model``; None
        when there is none to try, RateLimited when they are all cooling down."""
        eligible = [a for a in self.eligible(model, pinned) if a.id not in exclude]
        if not eligible:
            return None
        now = self.clock()
        ready = [a for a in eligible if not self.cooling_until(a, model, now)]
        if not ready:
            raise self.cooling_error(model, eligible, now)
        return ready

    def _choose(self, ticket, ready, affinity):
        """The account for ``ticket`` (None: nobody is waiting) once those ahead have picked."""
        if ticket is None and len(ready) == 1 and affinity and \
                self._affinity.get(affinity) == ready[0].id:  # the usual: the same account again
            only = ready[0]
            limit = self.limit(only)
            return only if not limit or self._inflight.get(only.id, 0) < limit else None
        free = {a.id: a for a in ready
                if not self.limit(a) or self._inflight.get(a.id, 0) < self.limit(a)}
        if ticket is not None and len(self._queue) > 1:
            now = time.monotonic()
            order = sorted(range(len(self._queue)), key=lambda i: (self._queue[i].rank(now), i))
            for earlier in (self._queue[i] for i in order):  # those ahead of us pick first
                if earlier is ticket:
                    break
                taken = next((i for i in earlier.ids if i in free), None)
                if taken is not None:
                    del free[taken]
        candidates = [a for a in ready if a.id in free]
        if not candidates:
            return None
        top = max(a.priority for a in candidates)
        candidates = [a for a in candidates if a.priority == top]
        preferred = self._affinity.get(affinity) if affinity else None
        chosen = next((a for a in candidates if a.id == preferred), None)
        if chosen is None:
            chosen = self._by_strategy(candidates)
            if affinity:
                self._affinity.pop(affinity, None)
                self._affinity[affinity] = chosen.id
                trim_oldest(self._affinity, 10000)
        return chosen

    def _by_strategy(self, candidates):
        accounts = self.all_accounts()
        known = self._positions
        if known[0] is not accounts:
            known = self._positions = (accounts, {a.id: i for i, a in enumerate(accounts)})
        position, order = known[1], accounts
        strategy = self.config.strategy
        if strategy == "fill-first":
            return min(candidates, key=lambda a: (not a.default, position.get(a.id, 0)))
        ring = sorted(candidates, key=lambda a: (position.get(a.id, 0) - self._cursor)
                      % max(1, len(order)))
        if strategy == "least-busy":
            ring.sort(key=lambda a: self._inflight.get(a.id, 0) / (self.limit(a) or 1e9))
        chosen = ring[0]
        self._cursor = position.get(chosen.id, 0) + 1
        return chosen

    def release(self, account):
        with self._lock:
            left = self._inflight.get(account.id, 0) - 1
            if left > 0:
                self._inflight[account.id] = left
            else:
                self._inflight.pop(account.id, None)
            if self._queue:  # every waiter holds a ticket there
                self._cond.notify_all()

    def in_flight(self, account):
        return self._inflight.get(account.id, 0)

    def waiting(self):
        return len(self._queue)

    def waiting_by_lane(self):
        """How many requests wait in each lane (see REQUEST_LANES)."""
        lanes = collections.Counter(ticket.lane for ticket in list(self._queue))
        return {lane: lanes.get(lane, 0) for lane in sorted(set(REQUEST_LANES.values()))}

    # --- outcomes --------------------------------------------------------------------------
    def cooling_error(self, model, eligible, now=None):
        """429 naming the model and when its soonest account frees up (404 if none serves it)."""
        now = self.clock() if now is None else now
        reasons = {self._cooldowns.get((a.id, model), (0, ""))[1] for a in eligible}
        if reasons == {"model unsupported"}:
            return NotFound("model %s is not available on any account (upstream answered 435)"
                            % model, code="model_not_found")
        soonest = min(self.cooling_until(a, model, now) or now for a in eligible)
        wait = max(1, int(soonest - now + 0.999))
        return RateLimited("every account for model %s is cooling down after upstream errors; "
                           "the first frees up in %ds (%s)" % (
                               model, wait, time.strftime("%H:%M:%S",
                                                          time.localtime(time.time() + wait))),
                           retry_after=wait)

    def record_success(self, account, model):
        if self._strikes:
            with self._lock:
                self._strikes.pop((account.id, model), None)

    def record_failure(self, account, model, error):
        """Cool the account down, or take it out of rotation, as the failure calls for."""
        now = self.clock()
        with self._lock:
            self.recent_errors.append({"time": time.time(), "account": account.nickname,
                                       "model": model, "status": error.status,
                                       "upstream_status": error.upstream_status,
                                       "kind": error.kind})
            del self.recent_errors[:-50]
            if error.kind == "rate_limit":
                strikes = self._strikes.get((account.id, model), 0)
                self._strikes[(account.id, model)] = strikes + 1
                wait = error.retry_after if error.retry_after is not None else \
                    min(2 ** strikes, MAX_BACKOFF)
                self._cool((account.id, model), now + wait, "rate limited", now)
            elif error.kind in COOLDOWNS:
                scope, wait = COOLDOWNS[error.kind]
                if error.retry_after is not None:
                    wait = error.retry_after
                key = (account.id, "*" if scope == "account" else model)
                self._cool(key, now + wait, error.kind.replace("_", " "), now)
            self._cond.notify_all()
        status = {"key_blocked": "disabled", "key_expired": "needs-login",
                  "auth": "needs-login"}.get(error.kind)
        if status:
            log.warning("account %s is now %s: %s", account.nickname, status, error.message)
            self.registry.set_status(account, status, error.message)

    def _cool(self, key, until, reason, now):
        """Set one cooldown; the table stays bounded whatever model names clients invent."""
        self._cooldowns.pop(key, None)
        self._cooldowns[key] = (until, reason)
        if len(self._cooldowns) > MAX_COOLDOWNS:
            for stale in [k for k, (u, _r) in self._cooldowns.items() if u <= now]:
                del self._cooldowns[stale]
                self._strikes.pop(stale, None)
            while len(self._cooldowns) > MAX_COOLDOWNS:  # oldest set first
                oldest = next(iter(self._cooldowns))
                del self._cooldowns[oldest]
                self._strikes.pop(oldest, None)

    def state(self, account):
        """healthy / busy / cooling / needs-login / disabled, and active cooldowns."""
        now = self.clock()
        cooldowns = [{"model": model, "remaining_s": round(until - now, 1), "reason": reason}
                     for (aid, model), (until, reason) in list(self._cooldowns.items())
                     if aid == account.id and until > now]
        if account.status != "ok" or not account.api_key:
            state = account.status
        elif any(c["model"] == "*" for c in cooldowns):
            state = "cooling"
        elif self.limit(account) and self.in_flight(account) >= self.limit(account):
            state = "busy"
        else:
            state = "cooling" if cooldowns else "healthy"
        return state, cooldowns


MAX_USAGE_ROWS = 300             # (account, model) rows per day before new ones are folded
OTHER_MODELS = "(other models)"


def _row(tables, key, row, account, new):
    """``tables[key][row]``, made with ``new()`` if missing; once that table holds
    MAX_USAGE_ROWS rows new models share the account's OTHER_MODELS row (clients choose model
    names)."""
    table = tables.get(key)
    found = table.get(row) if table is not None else None  # the usual case: both there
    if found is None:
        table = tables.setdefault(key, {})
        if len(table) >= MAX_USAGE_ROWS:
            row = "%s|%s" % (account, OTHER_MODELS)
        found = table.setdefault(row, new())
    return found


def _count(value):
    """A token count from upstream's usage (an int, not a bool), else 0."""
    return value if type(value) is int else 0  # noqa: E721 - bool is not a count


def _new_pair():
    return [0, 0]


def cache_tokens(usage):
    """(cache-read, cache-write) prompt tokens of an OpenAI-style usage: OpenAI's
    prompt_tokens_details.cached_tokens or DeepSeek's prompt_cache_hit_tokens, and
    cache_write_tokens (OpenRouter's; Anthropic's cache_creation_input_tokens as openai_usage
    counts them)."""
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    return (_count(details.get("cached_tokens")) or _count(usage.get("prompt_cache_hit_tokens")),
            _count(details.get("cache_write_tokens")))


def _minute(clock_time):
    return int(clock_time[:2]) * 60 + int(clock_time[3:])


def price_rates(price, when):
    """``price``'s rates at ``when`` (epoch seconds): a period's (UTC) over the others."""
    periods = price.get("periods")
    now = time.gmtime(when) if periods else None
    for period in periods or ():
        minute, start, end = now.tm_hour * 60 + now.tm_min, _minute(period["from"]), \
            _minute(period["to"])
        if period.get("days") and WEEKDAYS[now.tm_wday] not in period["days"]:
            continue
        if (start <= minute < end) if start <= end else (minute >= start or minute < end):
            return dict(price, **{k: period[k] for k in PRICE_RATES if k in period})
    return price


def usage_cost(usage, price, when):
    """What ``usage`` (OpenAI-style) cost at ``price`` (per million tokens) at ``when``: fresh
    input, cache reads and cache writes (each at the input price where ``price`` names none),
    and output."""
    rates = price_rates(price, when)
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get(
        "completion_tokens"))
    read, write = cache_tokens(usage)
    fresh = max(0, prompt - read - write)
    return (fresh * rates["input"] + read * rates.get("cache_read", rates["input"]) +
            write * rates.get("cache_write", rates["input"]) + completion * rates["output"]) / 1e6


def _new_tally():
    return {"requests": 0, "failures": {}, "input_tokens": 0, "output_tokens": 0,
            "reasoning_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0,
            "latency_ms": 0.0}


def _add_cost(tally, cost):
    """Add a (amount, currency, price source) to a tally (the last price's currency and
    source are the row's: one model's price rarely changes currency)."""
    if cost is not None:
        tally["cost"] = round(tally.get("cost", 0.0) + cost[0], 10)
        tally["currency"], tally["price_source"] = cost[1], cost[2]


def _bucket(label, rows):
    """One bar of a usage chart: totals, per account and per model (and cost per model and
    currency, for a day)."""
    out = {"label": label, "requests": 0, "tokens": 0, "accounts": {}, "models": {}}
    for key, counts in rows.items():
        account, model = key.split("|", 1)
        out["requests"] += counts["requests"]
        out["tokens"] += counts["tokens"]
        for group, name in (("accounts", account), ("models", model)):
            mine = out[group].setdefault(name, {"requests": 0, "tokens": 0})
            mine["requests"] += counts["requests"]
            mine["tokens"] += counts["tokens"]
        if counts.get("cost"):
            costs = out.setdefault("cost", {}).setdefault(counts["currency"], {})
            costs[model] = round(costs.get(model, 0) + counts["cost"], 10)
    return out


class UsageBook:
    """Requests, failures by status, tokens and latency per account and model, per day.

    Kept in memory, saved atomically to ``usage.json`` now and then and at shutdown, and read
    back at start, so figures survive restarts.  Days older than ``keep_days`` are dropped.
    """

    def __init__(self, path, clock=time.time, keep_days=31):
        self.path, self.clock, self.keep_days = path, clock, keep_days
        self._lock = threading.Lock()
        self._dirty = False
        self._stamp = (None, "", "")
        try:
            data = read_json_file(path, "usage file")
        except FileNotFoundError:
            data = {}
        except ConfigError as e:  # a damaged usage file must not stop the proxy
            log.error("%s; starting usage figures afresh", e.message)
            data = {}

        def table(key):  # a part of the file that is not a table of tables is dropped
            found = data.get(key)
            return {k: v for k, v in found.items() if isinstance(v, dict)} \
                if isinstance(found, dict) else {}
        self._days = table("days")        # "YYYY-MM-DD" -> {"account|model": tally}
        self._clients = table("clients")  # "YYYY-MM-DD" -> {"client name|model": tally}
        self._hours = table("hours")      # "YYYY-MM-DDTHH" -> {"account|model": [n, tokens]}
        self.extra = table("extra")       # other figures saved with these (token calibration)
        # Client keys' usage since the last save, one line each, so a crash (kill -9) can't
        # reset a tokens_per_day budget: replayed at start (lines past the saved sequence
        # number), emptied by each save
        self.journal_path = os.path.splitext(path)[0] + ".journal"
        saved = data.get("journal_seq")
        self._seq = saved if isinstance(saved, int) and not isinstance(saved, bool) else 0
        self._journal = None
        self._replay()

    def _replay(self):
        try:
            with open(self.journal_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                entry = json.loads(line)
                seq, day, client, model = entry["n"], entry["d"], entry["c"], entry["m"]
                usage = {"prompt_tokens": entry["i"], "completion_tokens": entry["o"]}
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by the crash
            if isinstance(seq, int) and seq > self._seq and isinstance(day, str):
                self._seq = seq
                self._count_client(client, model, usage, day)
                self._dirty = True

    def today(self):
        return self._stamps()[0]

    def _stamps(self):
        """("YYYY-MM-DD", "YYYY-MM-DDTHH") now, local time, worked out once a second."""
        second = int(self.clock())
        known = self._stamp
        if known[0] != second:
            hour = time.strftime("%Y-%m-%dT%H", time.localtime(second))
            known = self._stamp = (second, hour[:10], hour)
        return known[1:]

    def keep(self, key, value):
        """Save ``value`` under ``key`` with the usage figures."""
        with self._lock:
            self.extra[key] = value
            self._dirty = True

    def record(self, account, model, status, usage, latency_ms, client="", cost=None):
        """One finished attempt: ``status`` 200 counts as a success, anything else a failure;
        answers are also counted per client key name (never the key) when there is one, with
        their ``cost`` (amount, currency, price source) when a price is known."""
        usage = usage if isinstance(usage, dict) else {}
        details = usage.get("completion_tokens_details")
        prompt, completion, reasoning = _count(usage.get("prompt_tokens")), \
            _count(usage.get("completion_tokens")), \
            _count(details.get("reasoning_tokens") if isinstance(details, dict) else None)
        row = "%s|%s" % (account, model)
        today, this_hour = self._stamps()
        with self._lock:
            tally = _row(self._days, today, row, account, _new_tally)
            tally["requests"] += 1
            if status != 200:
                failures = tally["failures"]
                failures[str(status)] = failures.get(str(status), 0) + 1
            if prompt:
                tally["input_tokens"] += prompt
            if completion:
                tally["output_tokens"] += completion
            if reasoning:
                tally["reasoning_tokens"] += reasoning
            read, write = cache_tokens(usage) if prompt else (0, 0)
            if read or write:
                tally["cache_read_tokens"] = tally.get("cache_read_tokens", 0) + read
                tally["cache_write_tokens"] = tally.get("cache_write_tokens", 0) + write
            _add_cost(tally, cost)
            tally["latency_ms"] += round(latency_ms, 1)
            if client:
                _add_cost(self._count_client(client, model, usage), cost)
                self._note(today, client, model, prompt, completion)
            counts = _row(self._hours, this_hour, row, account, _new_pair)
            counts[0] += 1
            counts[1] += prompt + completion
            self._dirty = True

    def _count_client(self, client, model, usage, day=None):
        clients = self._clients.setdefault(day or self.today(), {})
        key = "%s|%s" % (client, model)
        if key not in clients and len(clients) >= MAX_USAGE_ROWS:
            key = "%s|%s" % (client, OTHER_MODELS)
        tally = clients.setdefault(key, {"requests": 0, "input_tokens": 0, "output_tokens": 0})
        tally["requests"] += 1
        for field, value in (("input_tokens", usage.get("prompt_tokens")),
                             ("output_tokens", usage.get("completion_tokens"))):
            if isinstance(value, int) and not isinstance(value, bool):
                tally[field] += value
        return tally

    def series(self):
        """Requests and tokens per account and per model, for each of the last 24 hours and
        30 days (oldest first), and the cost per model and day (per currency) where a price
        was known."""
        now = self.clock()
        hours = [time.strftime("%Y-%m-%dT%H", time.localtime(now - h * 3600))
                 for h in range(23, -1, -1)]
        days = [time.strftime("%Y-%m-%d", time.localtime(now - d * 86400))
                for d in range(29, -1, -1)]

        def counts(t):
            tokens_in, tokens_out = t.get("input_tokens", 0), t.get("output_tokens", 0)
            return {"requests": t.get("requests", 0), "tokens": tokens_in + tokens_out,
                    "cost": t.get("cost", 0), "currency": t.get("currency", "USD")}
        with self._lock:
            hourly = [(hour, {k: {"requests": c[0], "tokens": c[1]}
                              for k, c in self._hours.get(hour, {}).items()}) for hour in hours]
            daily = [(day, {k: counts(t) for k, t in self._days.get(day, {}).items()})
                     for day in days]
        return {"hours": [_bucket(label, rows) for label, rows in hourly],
                "days": [_bucket(label, rows) for label, rows in daily]}

    def day_rows(self):
        """[{day, account, model, requests, input_tokens, output_tokens, cache_read_tokens,
        cache_write_tokens, cost, currency, price_source}], oldest day first."""
        with self._lock:
            return [{"day": day, "account": k.split("|", 1)[0], "model": k.split("|", 1)[1],
                     "requests": t.get("requests", 0), "input_tokens": t.get("input_tokens", 0),
                     "output_tokens": t.get("output_tokens", 0),
                     "cache_read_tokens": t.get("cache_read_tokens", 0),
                     "cache_write_tokens": t.get("cache_write_tokens", 0),
                     "cost": t.get("cost"), "currency": t.get("currency"),
                     "price_source": t.get("price_source")}
                    for day, rows in sorted(self._days.items()) for k, t in sorted(rows.items())]

    def costs(self, client=None):
        """What answers cost today and over the last 30 days, per model, account and client
        key ({currency: amount} each; only ``client``'s when one is named), and where each
        model's price came from."""
        today = self.today()
        first = time.strftime("%Y-%m-%d", time.localtime(self.clock() - 29 * 86400))
        out = {span: {"models": {}, "accounts": {}, "clients": {}} for span in ("today", "days")}
        sources = {}

        def add(group, name, tally, day):
            for span in ("today", "days") if day == today else ("days",):
                mine = out[span][group].setdefault(name, {})
                mine[tally["currency"]] = round(mine.get(tally["currency"], 0) + tally["cost"], 10)
        with self._lock:
            for table, groups in ((self._days, ("accounts", "models")),
                                  (self._clients, ("clients", None))):
                for day, rows in table.items():
                    for key, tally in rows.items() if day >= first else ():
                        if not tally.get("cost"):
                            continue
                        who, model = key.split("|", 1)
                        if groups[1] is None and client is not None and who != client:
                            continue
                        add(groups[0], who, tally, day)
                        if groups[1]:
                            add(groups[1], model, tally, day)
                            sources[model] = tally.get("price_source") or ""
        out["price_sources"] = sources
        return out

    def client_tokens(self, client, day=None):
        """Tokens (in + out) a client key used on ``day`` (today)."""
        with self._lock:
            rows = self._clients.get(day or self.today(), {})
            return sum(t["input_tokens"] + t["output_tokens"] for k, t in rows.items()
                       if k.split("|", 1)[0] == client)

    def client_rows(self):
        """[{day, client, model, requests, input_tokens, output_tokens}], oldest day first."""
        with self._lock:
            return [dict(t, day=day, client=k.split("|", 1)[0], model=k.split("|", 1)[1])
                    for day, rows in sorted(self._clients.items())
                    for k, t in sorted(rows.items())]

    def summary(self, day=None):
        """{"today": {...}, "total": {...}} with per-account/model rows and overall sums."""
        with self._lock:
            days = json.loads(json.dumps(self._days))

        def fold(tallies, total=None):
            total = total or _new_tally()
            for tally in tallies:
                for key in ("requests", "input_tokens", "output_tokens", "reasoning_tokens",
                            "latency_ms"):
                    total[key] += tally.get(key, 0)
                for status, n in tally.get("failures", {}).items():
                    total["failures"][status] = total["failures"].get(status, 0) + n
            return total
        today = days.get(day or self.today(), {})
        everything = {}
        for rows in days.values():
            for key, tally in rows.items():
                everything[key] = fold([tally], everything.get(key))

        def rows(table):
            return [dict(tally, account=key.split("|", 1)[0], model=key.split("|", 1)[1])
                    for key, tally in sorted(table.items())]
        return {"today": {"rows": rows(today), "sum": fold(today.values())},
                "total": {"rows": rows(everything), "sum": fold(everything.values()),
                          "since": min(days) if days else None}}

    def close(self):
        """Close the journal (after the last save)."""
        with self._lock:
            if self._journal is not None:
                os.close(self._journal)
                self._journal = None

    def _note(self, day, client, model, prompt, completion):
        """Append a client's usage to the journal (under the lock); never fails a request."""
        self._seq += 1
        line = json.dumps({"n": self._seq, "d": day, "c": client, "m": model, "i": prompt,
                           "o": completion}, ensure_ascii=False) + "\n"
        try:
            if self._journal is None:
                self._journal = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND |
                                        os.O_CREAT, 0o600)
            os.write(self._journal, line.encode("utf-8"))
        except OSError as e:
            log.warning("cannot write the usage journal %s: %s", self.journal_path, e)

    def save(self):
        with self._lock:
            if not self._dirty:
                return
            cutoff = time.strftime("%Y-%m-%d", time.localtime(self.clock() -
                                                              self.keep_days * 86400))
            self._days = {d: v for d, v in self._days.items() if d >= cutoff}
            self._clients = {d: v for d, v in self._clients.items() if d >= cutoff}
            first_hour = time.strftime("%Y-%m-%dT%H", time.localtime(self.clock() - 48 * 3600))
            self._hours = {h: v for h, v in self._hours.items() if h >= first_hour}
            data = {"version": 1, "days": self._days, "clients": self._clients,
                    "hours": self._hours, "extra": self.extra, "journal_seq": self._seq}
            self._dirty = False
            atomic_write_json(self.path, data)
            if self._journal is None and os.path.exists(self.journal_path):
                self._journal = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)
            if self._journal is not None:  # all of it is in the file now
                os.ftruncate(self._journal, 0)


# ==================================================================================================
# Translation: Anthropic Messages <-> OpenAI chat completions (pure functions over dicts)
# ==================================================================================================

def map_families(claude_models, defaults=DEFAULT_CLAUDE_MODELS):
    """Claude family -> the model it maps to."""
    return {family: claude_models.get(family) or defaults[family] for family in CLAUDE_FAMILIES}


def map_claude_model(model, claude_models, defaults=DEFAULT_CLAUDE_MODELS):
    """Claude model names (any version, ``[1m]`` too) -> the configured (else default) model."""
    name = _CONTEXT_SUFFIX.sub("", model.strip()).lower()
    if not name.startswith("claude"):
        return model
    family = next((f for f in CLAUDE_FAMILIES if f in name), "sonnet")
    return claude_models.get(family) or defaults[family]


# --- requests: parsing and validation of both APIs, in one place ----------------------------

_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def parse_json_body(raw):
    """The request's JSON object, or BadRequest saying exactly what is wrong."""
    if not raw.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest("request body is not valid UTF-8 (byte %d)" % e.start)
    try:
        body = STRICT_JSON.decode(text)
    except RecursionError:
        raise BadRequest("request JSON is nested too deeply")
    except ValueError as e:
        raise BadRequest("request body is not valid JSON: %s" % e)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object, got %s" % type(body).__name__)
    if _SURROGATE_ESCAPE.search(raw):  # "\ud800" alone parses, but is no character at all
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("request JSON holds a lone UTF-16 surrogate (\\ud800-\\udfff "
                             "without its pair); send the whole character")
    return body


def _expect(body, key, types, what, required=False):
    value = body.get(key)
    if value is None:
        if required:
            raise BadRequest("missing required field %r (%s)" % (key, what))
        return None
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,))):
        raise BadRequest("field %r must be %s" % (key, what))
    return value


def check_model_name(model):
    """A model name is printable text of bounded length: it reaches headers, logs and tables."""
    if not model.strip():
        raise BadRequest("field 'model' must not be empty")
    if len(model) > MAX_MODEL_NAME or not model.isprintable():
        raise BadRequest("field 'model' must be printable text of at most %d characters"
                         % MAX_MODEL_NAME)
    return model


def _expect_model_and_messages(body):
    """The valid model name and non-empty message list every chat request needs; its messages."""
    check_model_name(_expect(body, "model", str, "a model name string", required=True))
    messages = _expect(body, "messages", list, "a list of messages", required=True)
    if not messages:
        raise BadRequest("field 'messages' must not be empty")
    return messages


def validate_chat_request(body):
    """Check the fields the proxy itself reads; everything else passes through to upstream."""
    messages = _expect_model_and_messages(body)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("messages[%d] must be an object with a string 'role'" % i)
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, list):
                raise BadRequest("messages[%d].content must be a string or a list of parts" % i)
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise BadRequest("messages[%d].content[%d] must be an object with a string "
                                     "'type'" % (i, j))
        if len(message) > 2:  # most messages are a role and a content, and nothing else
            for key, value in message.items():
                spec = _MESSAGE_FIELDS.get(key)
                if spec is not None and value is not None and not isinstance(value, spec[0]):
                    raise BadRequest("messages[%d].%s must be %s" % (i, key, spec[1]))
    for key in body:  # only the fields it has (a request has a few of the many checked)
        spec = _OPENAI_FIELD_TYPES.get(key)
        if spec is not None and _expect(body, key, *spec) is not None and \
                key in _POSITIVE_FIELDS and body[key] < 1:
            raise BadRequest("field %r must be a positive integer" % key)
    for i, tool in enumerate(body.get("tools") or []):
        if not isinstance(tool, dict) or not isinstance(tool.get("function", {}), dict):
            raise BadRequest("tools[%d] must be an object with a 'function' object" % i)
    return body


_MESSAGE_FIELDS = {"name": (str, "a string"), "tool_call_id": (str, "a string"),
                   "tool_calls": (list, "a list"), "reasoning_content": (str, "a string")}
_POSITIVE_FIELDS = ("max_tokens", "max_completion_tokens", "max_new_tokens", "n")


# OpenAI request fields the proxy checks (the rest pass through untouched): field -> (types, what)
_OPENAI_FIELD_TYPES = {name: spec for names, spec in {
    "stream parallel_tool_calls logprobs": (bool, "true or false"),
    "stream_options response_format": (dict, "an object"), "tools": (list, "a list"),
    "tool_choice": ((str, dict), "a string or an object"),
    "reasoning_effort user": (str, "a string"),
    "temperature top_p presence_penalty frequency_penalty": (_NUMBER, "a number"),
    "n max_tokens max_completion_tokens max_new_tokens": (int, "a positive integer"),
    "seed top_logprobs": (int, "an integer"),
    "stop": ((str, list), "a string or a list of strings"),
}.items() for name in names.split()}


def openai_conversation_key(body, headers):
    """One key per client conversation: x-session-id, else a hash of the first messages."""
    explicit = headers.get("x-session-id")
    if explicit:
        return "sid:" + explicit
    return first_messages_key(body.get("messages"), 2)


def first_messages_key(messages, count):
    """"msg:" and a sha256 of a conversation's first ``count`` messages: of their roles and
    texts where they are plain (a role and a string, the usual case: a fraction of the cost),
    else of their canonical JSON."""
    first = messages[:count] if isinstance(messages, list) else []
    parts = []
    for message in first:
        if type(message) is not dict or len(message) != 2:  # noqa: E721 - exactly a dict
            break
        role, content = message.get("role"), message.get("content")
        if type(role) is not str or type(content) is not str:  # noqa: E721
            break
        parts.append(role)
        parts.append(content)
    text = "\x00".join(parts) if len(parts) == 2 * len(first) else _SORTED_JSON.encode(first)
    return "msg:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _blocks(content):
    """Message content as a list of blocks (a plain string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content


def _check_block(block, *where):
    """Check one content block; ``where`` (a format and its numbers) names it in an error,
    formatted only then: a long conversation has thousands of blocks, all of them fine."""
    problem = _block_problem(block)
    if problem is not None:
        raise BadRequest(problem % (where[0] % where[1:]))


def _block_problem(block):
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        return "%s must be an object with a string 'type'"
    kind = block["type"]
    if kind == "text":
        return None if isinstance(block.get("text"), str) else \
            "%s: a text block needs a string 'text'"
    if kind == "tool_use" and not (isinstance(block.get("id"), str) and
                                   isinstance(block.get("name"), str)):
        return "%s: a tool_use block needs string 'id' and 'name'"
    if kind == "tool_use" and not isinstance(block.get("input", {}), dict):
        return "%s: tool_use 'input' must be an object"
    if kind == "tool_result" and not isinstance(block.get("tool_use_id"), str):
        return "%s: a tool_result block needs a string 'tool_use_id'"
    if kind == "tool_result" and not isinstance(block.get("content", ""), (str, list)):
        return "%s: tool_result 'content' must be a string or a list"
    if kind in ("image", "document") and not isinstance(block.get("source"), dict):
        return "%%s: an %s block needs a 'source' object" % kind
    field = _BLOCK_STRING.get(kind)
    if field and not isinstance(block.get(field), str):
        return "%%s: a %s block needs a string '%s'" % (kind, field)
    return None


_BLOCK_STRING = {"thinking": "thinking", "redacted_thinking": "data", "tool_reference": "tool_name"}


def validate_anthropic_request(body):
    """Check the fields the translation reads; unknown fields are ignored, never rejected."""
    messages = _expect_model_and_messages(body)
    max_tokens = _expect(body, "max_tokens", int, "a positive integer")
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest("field 'max_tokens' must be a positive integer")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant",
                                                                          "system"):
            raise BadRequest("messages[%d] must have role 'user', 'assistant' or 'system'" % i)
        content = message.get("content")
        if not isinstance(content, (str, list)):
            raise BadRequest("messages[%d].content must be a string or a list of blocks" % i)
        for j, block in enumerate(_blocks(content)):
            _check_block(block, "messages[%d].content[%d]", i, j)
            if block["type"] == "tool_result" and isinstance(block.get("content"), list):
                for k, inner in enumerate(block["content"]):
                    _check_block(inner, "messages[%d].content[%d].content[%d]", i, j, k)
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise BadRequest("field 'system' must be a string or a list of text blocks")
    for j, block in enumerate(_blocks(system or [])):
        _check_block(block, "system[%d]", j)
    _expect(body, "stream", bool, "true or false")
    _expect(body, "metadata", dict, "an object")
    _expect(body, "thinking", dict, "an object")
    for i, tool in enumerate(_expect(body, "tools", list, "a list of tools") or []):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise BadRequest("tools[%d] must be an object with a string 'name'" % i)
        if not isinstance(tool.get("input_schema", {}), dict):
            raise BadRequest("tools[%d].input_schema must be an object" % i)
    choice = _expect(body, "tool_choice", dict, "an object such as {\"type\": \"auto\"}")
    if choice is not None and choice.get("type") not in ("auto", "any", "tool", "none"):
        raise BadRequest("tool_choice.type must be auto, any, tool or none")
    if choice and choice["type"] == "tool" and not isinstance(choice.get("name"), str):
        raise BadRequest("tool_choice of type 'tool' needs a string 'name'")
    stops = _expect(body, "stop_sequences", list, "a list of strings") or []
    if not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("field 'stop_sequences' must be a list of non-empty strings")
    for key in ("temperature", "top_p"):
        _expect(body, key, _NUMBER, "a number")
    return body


def resolve_turns(body):
    """Claude Code's mid-conversation instructions (2.1.332, read from its binary) settled
    into what any upstream takes: a system turn with ``clear_at: "next_user_message"`` is
    dropped once a user turn follows it; a turn's ``output_config.effort`` is the effort from
    there on, so the last one becomes the request's own; ``tool_addition`` /
    ``tool_removal`` blocks (``{"tool": {"type": "tool_reference", "name"}}`` or
    ``{"type": "tool_definition", "definition"}``, beta mid-conversation-tool-changes) change
    the ``tools`` offered and leave a line where they stood saying so.  Then deferred tools
    are loaded (load_deferred_tools).  A copy; the body itself when there is nothing to do."""
    messages = body["messages"]
    if not any(m.get("role") == "system" for m in messages):
        return load_deferred_tools(body)
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    declared = {t.get("name"): t for t in tools}
    added, removed, effort, kept = {}, set(), None, []
    for i, message in enumerate(messages):
        if message.get("role") != "system":
            kept.append(message)
            continue
        if message.get("clear_at") == "next_user_message" and any(
                m.get("role") == "user" for m in messages[i + 1:]):
            continue
        config = message.get("output_config")
        if isinstance(config, dict) and isinstance(config.get("effort"), str):
            effort = config["effort"]
        blocks, changes = [], {"tool_addition": [], "tool_removal": []}
        for block in _blocks(message["content"]):
            if block.get("type") not in changes:
                blocks.append(block)
                continue
            name, definition = _tool_change(block, declared)
            if name is None:
                continue
            changes[block["type"]].append(name)
            if block["type"] == "tool_addition":
                removed.discard(name)
                added[name] = definition
            else:
                added.pop(name, None)
                removed.add(name)
        for kind, words in (("tool_addition", "now available"),
                            ("tool_removal", "no longer available")):
            if changes[kind]:
                blocks.append({"type": "text", "text": "Tools %s: %s." % (
                    words, ", ".join(changes[kind]))})
        kept.append({"role": "system", "content": blocks})
    out = dict(body, messages=kept)
    if tools or added:
        offered = [dict(t) for t in tools if t.get("name") not in removed]
        for tool in offered:
            if tool.get("name") in added:
                tool.pop("defer_loading", None)
        offered += [dict(d) for n, d in added.items() if d is not None and n not in declared]
        out["tools"] = offered
    if effort is not None:
        out["output_config"] = dict(body.get("output_config") or {}, effort=effort)
    return load_deferred_tools(out)


def _tool_change(block, declared):
    """(name, definition) a tool_addition/tool_removal block names; (None, None) if none."""
    tool = block.get("tool") if isinstance(block.get("tool"), dict) else {}
    if tool.get("type") == "tool_definition" and isinstance(tool.get("definition"), dict):
        definition = tool["definition"]
        name = definition.get("name")
        return (name, definition) if isinstance(name, str) and name else (None, None)
    name = tool.get("name") or tool.get("tool_name")
    if not isinstance(name, str) or not name:
        return None, None
    return name, declared.get(name)


def load_deferred_tools(body):
    """Claude Code's deferred tools (tool search,
    https://platform.claude.com/docs/en/agents-and-tools/tool-use/tool-search-tool) as any
    upstream understands them: a ``defer_loading`` tool is offered only once a
    ``tool_reference`` block in a tool result has loaded it (as Anthropic's own API expands it),
    without the flag, so a tool never loaded (Claude Code's DeferredToolPlaceholder: "never
    call this tool") is not offered at all; and each tool_reference becomes a text block with
    the loaded tool's schema, in the <functions> form ToolSearch's description promises the
    model.  A copy; the body itself when it has neither."""
    tools = body.get("tools") or []
    deferred = [t for t in tools if isinstance(t, dict) and t.get("defer_loading")]
    loaded = _referenced_tools(body["messages"])
    if not deferred and not loaded:
        return body
    schemas = {t.get("name"): t for t in tools if isinstance(t, dict)}
    out = dict(body)
    out["tools"] = [{k: v for k, v in t.items() if k != "defer_loading"} for t in tools
                    if not (isinstance(t, dict) and t.get("defer_loading")) or
                    t.get("name") in loaded]
    if loaded:
        out["messages"] = [_with_references_as_text(m, schemas) for m in body["messages"]]
    return out


def _referenced_tools(messages):
    """The names every tool_reference block in the conversation's tool results loads."""
    names = set()
    for message in messages:
        for block in message["content"] if isinstance(message["content"], list) else ():
            if block.get("type") == "tool_result" and isinstance(block.get("content"), list):
                names.update(inner.get("tool_name") for inner in block["content"]
                             if inner.get("type") == "tool_reference")
    names.discard(None)
    return names


def _with_references_as_text(message, schemas):
    if not isinstance(message["content"], list) or not any(
            b.get("type") == "tool_result" and isinstance(b.get("content"), list)
            for b in message["content"]):
        return message
    blocks = []
    for block in message["content"]:
        if block.get("type") == "tool_result" and isinstance(block.get("content"), list):
            block = dict(block, content=[_reference_text(inner, schemas)
                                         if inner.get("type") == "tool_reference" else inner
                                         for inner in block["content"]])
        blocks.append(block)
    return dict(message, content=blocks)


def _reference_text(reference, schemas):
    """A tool_reference as the text that loads it: the tool's JSON schema in <functions>."""
    name = str(reference.get("tool_name") or "")
    tool = schemas.get(name)
    if tool is None:
        return {"type": "text", "text": "Tool %s was loaded, but its definition is not in "
                "this request." % name}
    definition = {"name": name, "description": tool.get("description") or "",
                  "parameters": tool.get("input_schema") or {"type": "object"}}
    return {"type": "text", "text": "<functions>\n<function>%s</function>\n</functions>"
            % json.dumps(definition, ensure_ascii=False)}


def _text_of(blocks, sep="\n\n"):
    return sep.join(b["text"] for b in blocks if b.get("type") == "text" and b.get("text"))


def system_text(system):
    """The system prompt as one string; cache_control and Claude Code's billing line dropped."""
    blocks = [b for b in _blocks(system or [])
              if not b.get("text", "").startswith("x-anthropic-billing-header:")]
    return _text_of(blocks)


def _image_part(block):
    source = block["source"]
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        media = source.get("media_type") or "image/png"
        return {"type": "image_url", "image_url": {"url": "data:%s;base64,%s"
                                                   % (media, source["data"])}}
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise BadRequest("image source must be base64 data or a url")


def _document_text(block):
    """A document block as text where that is possible; PDFs and the like are refused."""
    source = block["source"]
    kind, media = source.get("type"), source.get("media_type") or ""
    if kind == "text" and isinstance(source.get("data"), str):
        text = source["data"]
    elif kind == "content" and isinstance(source.get("content"), (str, list)):
        text = _text_of(_blocks(source["content"]))
    elif kind == "base64" and (media.startswith("text/") or media == "application/json"):
        import binascii
        try:
            text = base64.b64decode(source.get("data") or "").decode("utf-8")
        except (binascii.Error, ValueError):
            raise BadRequest("document data is not valid base64 UTF-8 text")
    else:
        raise BadRequest("document of type %r (%s) can't be sent to iFlow models as text; "
                         "extract its text first" % (kind, media or "unknown media type"))
    title = block.get("title")
    return ("Document: %s\n\n%s" % (title, text)) if isinstance(title, str) and title else text


def _tool_result_parts(block):
    """(text, image parts) of a tool_result; errors are marked so the model sees them."""
    content = block.get("content", "")
    blocks = _blocks(content) if content else []
    text = _text_of(blocks, "\n")
    images = [_image_part(b) for b in blocks if b.get("type") == "image"]
    if block.get("is_error"):
        text = "Error: " + (text or "the tool failed")
    return text or ("(image result)" if images else "(no output)"), images


def _collapse(parts):
    """Only text -> a plain string (what every upstream accepts); else the parts list."""
    if all(p["type"] == "text" for p in parts):
        return "\n\n".join(p["text"] for p in parts)
    return parts


def translate_tools(tools):
    out = []
    for tool in tools or []:
        if "input_schema" not in tool and tool.get("type") not in (None, "custom"):
            log.debug("dropping Anthropic server tool %s (%s)", tool.get("name"), tool.get("type"))
            continue
        function = {"name": tool["name"],
                    "parameters": tool.get("input_schema") or {"type": "object",
                                                               "properties": {}}}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def translate_tool_choice(choice):
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice["name"]}}
    return {"auto": "auto", "any": "required", "none": "none"}[kind]


def anthropic_thinking(body):
    """(thinking on/off/None, effort) from ``thinking`` and ``output_config.effort``."""
    config, setting = body.get("output_config"), body.get("thinking")
    effort = config.get("effort") if isinstance(config, dict) else None
    effort = effort if isinstance(effort, str) else None
    setting = setting if isinstance(setting, dict) else {}
    if setting.get("type") == "disabled" or setting.get("budget_tokens") == 0:
        return False, effort
    return (True if setting.get("type") in ("enabled", "adaptive") else None), effort


def _assistant_message(blocks):
    """An Anthropic assistant turn as one OpenAI assistant message (thinking as reasoning)."""
    text, reasoning, calls = [], [], []
    for b in blocks:
        if b["type"] == "text":
            text.append(b["text"])
        elif b["type"] == "thinking" and isinstance(b.get("thinking"), str):
            reasoning.append(b["thinking"])
        elif b["type"] == "tool_use":
            calls.append({"id": b["id"], "type": "function", "function": {
                "name": b["name"], "arguments": json.dumps(b.get("input") or {},
                                                           ensure_ascii=False)}})
    out = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if reasoning:
        out["reasoning_content"] = "\n".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out


def _user_messages(blocks):
    """An Anthropic user turn as OpenAI messages: one per tool result, then the user's parts."""
    messages, parts, tool_images = [], [], []
    for b in blocks:
        if b["type"] == "tool_result":
            text, images = _tool_result_parts(b)
            messages.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": text})
            if images:
                tool_images.append({"type": "text", "text": "Image(s) returned by tool call %s:"
                                    % b["tool_use_id"]})
                tool_images.extend(images)
        elif b["type"] == "text":
            parts.append({"type": "text", "text": b["text"]})
        elif b["type"] == "image":
            parts.append(_image_part(b))
        elif b["type"] == "document":
            parts.append({"type": "text", "text": _document_text(b)})
    parts = tool_images + parts
    if parts:
        messages.append({"role": "user", "content": _collapse(parts)})
    return messages


def anthropic_to_openai(body, model, max_output=None):
    """An Anthropic Messages request as an OpenAI chat-completions body for ``model``.

    Stop sequences are not sent upstream: the proxy applies them itself, so it can report
    exactly which one matched (``stop_reason: "stop_sequence"``).
    """
    messages = []
    system = system_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for message in alternating_turns(body["messages"]):  # (system turns: see there)
        role, blocks = message["role"], message["content"]
        if role == "assistant":
            messages.append(_assistant_message(blocks))
        else:
            messages.extend(_user_messages(blocks))
    out = {"model": model, "messages": messages, "stream": body.get("stream") is True}
    limit = max_output or output_limit(model)
    out["max_tokens"] = min(body.get("max_tokens") or limit, limit)
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    tools = translate_tools(body.get("tools"))
    if tools:
        out["tools"] = tools
        if body.get("tool_choice"):
            out["tool_choice"] = translate_tool_choice(body["tool_choice"])
            if body["tool_choice"].get("disable_parallel_tool_use"):
                out["parallel_tool_calls"] = False
    return out


def anthropic_conversation_key(body, headers):
    """Claude Code's session (metadata.user_id may be JSON holding session_id), else a hash."""
    user_id = (body.get("metadata") or {}).get("user_id")
    if isinstance(user_id, str) and user_id:
        try:
            session = json.loads(user_id).get("session_id")
        except (ValueError, AttributeError):
            session = None
        return "user:" + (session if isinstance(session, str) and session else user_id)
    explicit = headers.get("x-claude-code-session-id") or headers.get("x-session-id")
    if explicit:
        return "sid:" + explicit
    return first_messages_key(body.get("messages"), 1)


def anthropic_has_images(body):
    """Whether an Anthropic request holds an image, in a message or a tool result (asked
    before translating it: most hold none)."""
    for message in body["messages"]:
        content = message.get("content")
        for block in content if isinstance(content, list) else ():
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "image" or kind == "tool_result" and isinstance(
                    block.get("content"), list) and any(
                    isinstance(b, dict) and b.get("type") == "image" for b in block["content"]):
                return True
    return False


# --- responses -------------------------------------------------------------------------------

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "function_call": "tool_use", "content_filter": "refusal"}


def tool_input(arguments, tool_name, cut=False):
    """A tool call's arguments as an object, or None when upstream cut them off (``cut``).

    Never repaired: a command cut mid-string ("rm -rf /tmp/x…) must not run as if complete.
    Arguments that are not a JSON object in an answer that was *not* cut are upstream's fault.
    """
    if isinstance(arguments, dict):
        return arguments
    text = arguments if isinstance(arguments, str) else ""
    if cut and not text.strip():
        return None  # cut before its arguments began
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    if cut:
        return None
    raise UpstreamError("malformed", "upstream sent invalid JSON arguments for tool %r"
                        % tool_name)


class JsonObjectEnd:
    """Tells, fragment by fragment and in linear time, when a JSON object's text is complete."""

    __slots__ = ("depth", "in_string", "escaped", "complete")
    _STRUCTURE = re.compile(r'[{}\[\]"]')
    _IN_STRING = re.compile(r'["\\]')

    def __init__(self):
        self.depth, self.in_string, self.escaped, self.complete = 0, False, False, False

    def feed(self, text):
        """True once the top-level value has closed (more fragments are then ignored)."""
        i, n = 0, len(text)
        if self.escaped and n:
            i, self.escaped = 1, False
        while i < n and not self.complete:
            if self.in_string:
                m = self._IN_STRING.search(text, i)
                if m is None:
                    return False
                i = m.end()
                if m.group() == "\\":
                    if i >= n:
                        self.escaped = True
                    i += 1
                else:
                    self.in_string = False
                continue
            m = self._STRUCTURE.search(text, i)
            if m is None:
                return False
            i, ch = m.end(), m.group()
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                self.complete = self.depth <= 0
        return self.complete


def find_stop_sequence(text, stop_sequences):
    """(index, sequence) of the earliest stop sequence in ``text``, or (-1, None)."""
    best = (-1, None)
    for seq in stop_sequences:
        i = text.find(seq)
        if i >= 0 and (best[0] < 0 or i < best[0]):
            best = (i, seq)
    return best


def anthropic_usage(usage, input_estimate=0):
    usage = usage if isinstance(usage, dict) else {}
    out = {"input_tokens": usage.get("prompt_tokens") or input_estimate,
           "output_tokens": usage.get("completion_tokens") or 0}
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if cached:
        out["cache_read_input_tokens"] = cached
        out["input_tokens"] = max(0, out["input_tokens"] - cached)
    return out


def added_usage(earlier, usage):
    """Two OpenAI usage reports (either may be None) as one: the token counts added up."""
    if not isinstance(earlier, dict) or not isinstance(usage, dict):
        return usage if isinstance(usage, dict) else earlier
    out = dict(usage)
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        out[key] = (earlier.get(key) or 0) + (usage.get(key) or 0)
    return out


def new_message_id():
    return "msg_" + random_hex(24)


def openai_to_anthropic(completion, model, stop_sequences=(), input_estimate=0):
    """A non-stream OpenAI chat.completion as an Anthropic message (thinking first).

    An answer cut at the output limit says ``max_tokens`` and leaves out any tool call whose
    arguments were cut: a half tool call is never presented as one to run.
    """
    choice = (completion.get("choices") or [{}])[0] or {}
    message = choice.get("message") or {}
    content, stop_sequence = [], None
    cut = choice.get("finish_reason") == "length"
    stop_reason = _STOP_REASONS.get(choice.get("finish_reason"), "end_turn")
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    text = text if isinstance(text, str) else ""
    calls = message.get("tool_calls") or []
    at, seq = find_stop_sequence(text, stop_sequences)
    if seq is not None:
        text, calls, stop_reason, stop_sequence = text[:at], [], "stop_sequence", seq
    if text:
        content.append({"type": "text", "text": text})
    for call in calls:
        function = call.get("function") or {}
        name = function.get("name") or ""
        arguments = tool_input(function.get("arguments"), name, cut)
        if arguments is None:
            log.warning("left out tool call %s: upstream cut its arguments off", printable(name))
            continue
        content.append({"type": "tool_use", "id": call.get("id") or "toolu_" +
                        random_hex(24), "name": name, "input": arguments})
        stop_reason = "max_tokens" if cut else "tool_use"
    return {"id": new_message_id(), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": anthropic_usage(completion.get("usage"), input_estimate)}


def _is_high_surrogate(ch):
    return "\ud800" <= ch <= "\udbff"


class AnthropicStream:
    """Turns OpenAI chat.completion.chunk objects into Anthropic stream events (bytes).

    Blocks never overlap and are numbered consecutively.  Text and thinking go out as they
    arrive (text near a possible stop sequence is held back only while it could still start
    one; half a UTF-16 surrogate pair waits for its other half).  A tool call goes out as one
    block once its arguments are complete JSON: a call that upstream cut off is never sent as
    if it were whole.
    """

    def __init__(self, model, input_estimate=0, stop_sequences=(), held=()):
        self.model, self.input_estimate = model, input_estimate
        self.held_names = frozenset(held)  # tools run here: their calls kept, not sent
        self.held = []              # this round's held calls: {"id", "name", "args", ...}
        self.server_uses = {}       # server tool name -> times run (usage.server_tool_use)
        self._earlier_usage = None  # the usage of the rounds before this one, added up
        self.stop_sequences = tuple(stop_sequences)
        self._holdback = max((len(s) for s in self.stop_sequences), default=1) - 1
        self._pending = ""          # text held back for stop-sequence matching
        self._carry = ""            # a high surrogate waiting for its low half
        self._block = None          # "text" | "thinking" | "tool" while a block is open
        self._index = -1
        self._tools = {}            # upstream tool index -> {"id", "name", "args", "end"}
        self.tool_called = False
        self.finish_reason = None
        self.stop_sequence = None
        self.usage = None
        self.done = False           # a stop sequence matched: ignore the rest

    @staticmethod
    def _event(name, data):
        data["type"] = name
        return sse(data, name)

    def start(self):
        message = {"id": new_message_id(), "type": "message", "role": "assistant",
                   "model": self.model, "content": [], "stop_reason": None,
                   "stop_sequence": None, "usage": {"input_tokens": self.input_estimate,
                                                    "output_tokens": 0}}
        return self._event("message_start", {"message": message})

    def _open(self, kind, block):
        out = self._close()
        self._index += 1
        self._block = kind
        return out + self._event("content_block_start", {"index": self._index,
                                                         "content_block": block})

    def _delta(self, delta):
        return self._event("content_block_delta", {"index": self._index, "delta": delta})

    def _close(self):
        if self._block is None:
            return b""
        out = b""
        tail, self._carry = self._carry, ""  # a lone half surrogate: json_bytes replaces it
        if self._block == "text" and (self._pending or tail):
            out += self._delta({"type": "text_delta", "text": self._pending + tail})
            self._pending = ""
        elif self._block == "thinking" and tail:
            out += self._delta({"type": "thinking_delta", "thinking": tail})
        self._block = None
        return out + self._event("content_block_stop", {"index": self._index})

    def _whole(self, text):
        """``text`` with a trailing high surrogate held back until its pair arrives."""
        if self._carry:
            text, self._carry = self._carry + text, ""
        if text and _is_high_surrogate(text[-1]):
            text, self._carry = text[:-1], text[-1]
        return text

    def _text(self, text):
        out = b""
        if self._block != "text":
            out += self._open("text", {"type": "text", "text": ""})
        buffered = self._pending + self._whole(text)
        if self.stop_sequences:
            at, seq = find_stop_sequence(buffered, self.stop_sequences)
            if seq is not None:
                self._pending, self._carry = "", ""
                if at:
                    out += self._delta({"type": "text_delta", "text": buffered[:at]})
                self.stop_sequence, self.done = seq, True
                return out
            keep = min(self._holdback, len(buffered))
            buffered, self._pending = buffered[:len(buffered) - keep], buffered[len(buffered) -
                                                                                keep:]
        if buffered:
            out += self._delta({"type": "text_delta", "text": buffered})
        return out

    def _thinking(self, reasoning):
        out = b""
        if self._block != "thinking":
            out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        reasoning = self._whole(reasoning)
        if reasoning:
            out += self._delta({"type": "thinking_delta", "thinking": reasoning})
        return out

    def feed(self, chunk):
        """Events for one upstream chunk (a parsed dict)."""
        if self.done or not isinstance(chunk, dict):
            return b""
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        out = b""
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                out += self._thinking(reasoning)
            text = delta.get("content")
            if isinstance(text, str) and text:
                out += self._text(text)
                if self.done:
                    return out + self._close()
            for call in delta.get("tool_calls") or ():
                out += self._tool_fragment(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out

    def _tool_fragment(self, call):
        """Collect a tool call's argument fragments; send the call once they form an object."""
        if not isinstance(call, dict):
            return b""
        function = call.get("function") or {}
        tool = self._tools.get(call.get("index", 0))
        if tool is None:
            tool = self._tools[call.get("index", 0)] = {
                "id": call.get("id") or "toolu_" + random_hex(24),
                "name": function.get("name") or "", "args": [], "end": JsonObjectEnd(),
                "sent": False}
        fragment = function.get("arguments")
        if not isinstance(fragment, str) or not fragment:
            return b""
        if tool["sent"]:
            if fragment.strip():
                raise UpstreamError("malformed", "upstream sent more arguments for tool %r "
                                    "after they were complete" % tool["name"])
            return b""
        tool["args"].append(fragment)
        return self._send_tool(tool) if tool["end"].feed(fragment) else b""

    def _send_tool(self, tool):
        arguments = "".join(tool["args"])
        tool_input(arguments, tool["name"])  # complete but not an object: upstream's fault
        if tool["name"] in self.held_names:
            tool["sent"] = True
            self.held.append(tool)
            return b""
        tool["sent"] = self.tool_called = True
        out = self._open("tool", {"type": "tool_use", "id": tool["id"], "name": tool["name"],
                                  "input": {}})
        out += self._delta({"type": "input_json_delta", "partial_json": arguments.strip()
                            or "{}"})
        return out + self._close()

    def _close_tools(self):
        """The last open block closed, and the tool calls whose arguments were never seen to
        end sent now (left out when upstream cut them off)."""
        out = self._close()
        cut = self.finish_reason == "length"
        for tool in self._tools.values():
            if tool["sent"]:
                continue
            if tool_input("".join(tool["args"]), tool["name"], cut) is None:
                log.warning("left out tool call %s: upstream cut its arguments off",
                            printable(tool["name"]))
                continue
            out += self._send_tool(tool)
        return out

    def end_round(self):
        """(events, held calls) at the end of one upstream answer when more may follow (the
        results of the held calls given to the model): the round's usage is added up and its
        tool calls forgotten."""
        out, held = self._close_tools(), self.held
        self._earlier_usage = added_usage(self._earlier_usage, self.usage)
        self.held, self._tools, self.usage, self.finish_reason = [], {}, None, None
        return out, held

    def server_tool(self, name, tool_input, result):
        """The blocks of a server tool run here: its server_tool_use, then its result whole
        (counted in usage unless it is the error form: a run that did not happen)."""
        tool_id = "srvtoolu_" + random_hex(24)
        ran = not (isinstance(result, dict) and str(result.get("type")).endswith("error"))
        self.server_uses[name] = self.server_uses.get(name, 0) + ran
        out = self._open("server", {"type": "server_tool_use", "id": tool_id, "name": name,
                                    "input": {}})
        out += self._delta({"type": "input_json_delta",
                            "partial_json": json.dumps(tool_input, ensure_ascii=False)})
        out += self._open("server", {"type": name + "_tool_result", "tool_use_id": tool_id,
                                     "content": result})
        return out + self._close()

    def finish(self):
        """The closing events: last block stop, message_delta (stop reason, usage), message_stop."""
        out = self._close_tools()
        cut = self.finish_reason == "length"
        if self.stop_sequence is not None:
            reason = "stop_sequence"
        elif cut:
            reason = "max_tokens"
        elif self.tool_called:
            reason = "tool_use"
        else:  # (a call held here is no tool_use for the client)
            reason = _STOP_REASONS.get(self.finish_reason, "end_turn").replace(
                "tool_use", "end_turn")
        usage = anthropic_usage(added_usage(self._earlier_usage, self.usage),
                                self.input_estimate)
        if self.server_uses:
            usage["server_tool_use"] = {k + "_requests": n for k, n in self.server_uses.items()}
        out += self._event("message_delta", {"delta": {"stop_reason": reason,
                                                       "stop_sequence": self.stop_sequence},
                                             "usage": usage})
        return out + self._event("message_stop", {})

    @staticmethod
    def error(err):
        return sse(error_body(err, "anthropic"), "error")

    @staticmethod
    def ping():
        return sse({"type": "ping"}, "ping")


# --- OpenAI requests for Anthropic-protocol upstreams, and their answers back ------------------

_FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                   "tool_use": "tool_calls", "refusal": "content_filter",
                   "pause_turn": "stop", "model_context_window_exceeded": "length"}


def _anthropic_image(part):
    """An OpenAI image_url part as an Anthropic image block (data: URLs become base64)."""
    url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) \
        else part.get("image_url")
    if not isinstance(url, str):
        raise BadRequest("an image_url part needs a url")
    m = re.match(r"data:([\w/+.-]+);base64,(.*)$", url, re.S)
    if m:
        return {"type": "image", "source": {"type": "base64", "media_type": m.group(1),
                                            "data": m.group(2)}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _anthropic_blocks(content):
    """OpenAI message content (a string or parts) as Anthropic content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        if part.get("type") == "text" and isinstance(part.get("text"), str) and part["text"]:
            blocks.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            blocks.append(_anthropic_image(part))
    return blocks


def _tool_use_blocks(calls):
    blocks = []
    for call in calls or ():
        function = call.get("function") or {}
        name = function.get("name") or ""
        blocks.append({"type": "tool_use", "id": call.get("id") or "toolu_" +
                       random_hex(24), "name": name,
                       "input": tool_input(function.get("arguments"), name)})
    return blocks


def _anthropic_turns(messages):
    """(system text, turns) from OpenAI messages; consecutive turns of one role are merged,
    tool results become the user's tool_result blocks."""
    system, turns = [], []
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(b["text"] for b in _anthropic_blocks(message.get("content")))
            continue
        if role == "tool":
            text = message.get("content")
            text = text if isinstance(text, str) else _text_of(_anthropic_blocks(text))
            role, blocks = "user", [{"type": "tool_result", "content": text or "(no output)",
                                     "tool_use_id": message.get("tool_call_id") or ""}]
        elif role == "assistant":
            blocks = _anthropic_blocks(message.get("content")) + \
                _tool_use_blocks(message.get("tool_calls"))
        else:
            role, blocks = "user", _anthropic_blocks(message.get("content"))
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return "\n\n".join(system), turns


def _anthropic_tool_choice(choice, parallel):
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        out = {"type": "tool", "name": name} if name else {"type": "auto"}
    else:
        out = {"type": {"required": "any", "none": "none"}.get(choice, "auto")}
    if parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def openai_to_anthropic_request(body, max_output=8192):
    """An OpenAI chat-completions body as an Anthropic Messages request."""
    system, turns = _anthropic_turns(body["messages"])
    out = {"model": body["model"], "messages": turns, "stream": body.get("stream") is True,
           "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or
           body.get("max_new_tokens") or max_output}
    if system:
        out["system"] = system
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    tools = [t.get("function") or {} for t in body.get("tools") or () if isinstance(t, dict)]
    if tools:
        out["tools"] = [{"name": f.get("name") or "", "description": f.get("description") or "",
                         "input_schema": f.get("parameters") or {"type": "object"}}
                        for f in tools]
        if body.get("tool_choice") is not None or body.get("parallel_tool_calls") is False:
            out["tool_choice"] = _anthropic_tool_choice(body.get("tool_choice"),
                                                        body.get("parallel_tool_calls"))
    if body.get("reasoning_effort") == "none":
        out["thinking"] = {"type": "disabled"}
    if body.get("user"):
        out["metadata"] = {"user_id": body["user"]}
    return out


def anthropic_message_to_completion(message, model):
    """An Anthropic message as an OpenAI chat.completion (thinking as reasoning_content)."""
    text, reasoning, calls = [], [], []
    for block in message.get("content") or ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text.append(block.get("text") or "")
        elif kind == "thinking":
            reasoning.append(block.get("thinking") or "")
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name") or "", "arguments": json.dumps(
                    block.get("input") or {}, ensure_ascii=False)}})
    reply = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if reasoning:
        reply["reasoning_content"] = "".join(reasoning)
    if calls:
        reply["tool_calls"] = calls
    completion = {"id": "chatcmpl-" + (message.get("id") or random_hex(24)),
                  "object": "chat.completion", "created": int(time.time()), "model": model,
                  "choices": [{"index": 0, "message": reply, "finish_reason":
                               _FINISH_REASONS.get(message.get("stop_reason"), "stop")}]}
    usage = openai_usage(message.get("usage"))
    if usage:
        completion["usage"] = dict(usage, total_tokens=usage["prompt_tokens"] +
                                   usage["completion_tokens"])
    return completion


class OpenAIChunks:
    """Turns Anthropic stream events into OpenAI chat.completion.chunk SSE events (bytes)."""

    def __init__(self, model):
        self.base = {"id": "chatcmpl-" + random_hex(24), "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": model}
        self._tools = {}      # Anthropic block index -> OpenAI tool call index
        self._usage = {}

    def _chunk(self, delta=None, finish=None, **extra):
        choices = [] if delta is None else [{"index": 0, "delta": delta,
                                             "finish_reason": finish}]
        return [dict(self.base, choices=choices, **extra)]

    def feed(self, event):
        """OpenAI events for one Anthropic event (a parsed dict)."""
        return b"".join(sse(chunk) for chunk in self.chunks(event))

    def chunks(self, event):
        """The chunks (dicts) for one Anthropic event."""
        kind = event.get("type")
        if kind == "message_start":
            self._usage = dict((event.get("message") or {}).get("usage") or {})
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") != "tool_use":
                return []
            index = self._tools[event.get("index")] = len(self._tools)
            return self._chunk({"tool_calls": [{"index": index, "id": block.get("id"),
                                                "type": "function", "function": {
                                                    "name": block.get("name"),
                                                    "arguments": ""}}]})
        if kind == "content_block_delta":
            return self._delta(event.get("index"), event.get("delta") or {})
        if kind == "message_delta":
            self._usage.update(event.get("usage") or {})
            reason = (event.get("delta") or {}).get("stop_reason")
            usage = openai_usage(self._usage)
            return self._chunk({}, _FINISH_REASONS.get(reason, "stop")) + self._chunk(
                usage=dict(usage, total_tokens=usage["prompt_tokens"] +
                           usage["completion_tokens"]))
        return []

    def _delta(self, index, delta):
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return self._chunk({"content": delta["text"]})
        if kind == "thinking_delta" and delta.get("thinking"):
            return self._chunk({"reasoning_content": delta["thinking"]})
        if kind == "input_json_delta" and index in self._tools and delta.get("partial_json"):
            return self._chunk({"tool_calls": [{"index": self._tools[index], "function": {
                "arguments": delta["partial_json"]}}]})
        return []


# --- token estimate (count_tokens) -----------------------------------------------------------

# The 732 CJK characters that Claude's published BPE vocabulary holds as single tokens (the
# commonest ones); any other CJK character takes about two byte-level tokens.
COMMON_CJK = frozenset(
    "一万三上下不与专且业东两个中串临为主么义之乐乘也习书买了事二于云互五些交产京人什"
    "仅今从仓他付代令以们件价任份企优会传似但位体何余作你使例供依保信修個候値值假做停"
    "储像元充先光克入全公共关兴其具典内册再写决况准减几出击分切划列则初利别到制前剧割"
    "力功加务动助動包化北匹区十半华单南博占卡印即历原去县参及双反发取受变口古句只可台"
    "右号司各合吉同名后向否含启告员周命和品哈响商器四回因团围国图土在地场址均坐块型城"
    "域基報場填境增处备変复外多大天太失头夹好如始子字存学宁它安完定实実客害家容密对导"
    "対射将小少尔就尾局层屏展属山峰川州工左差己已市布带常平年并广庆序库应店度建开异式"
    "引张弹归当录形影径待很後得微德心必志态思性总息您情想意感戏成我或截户房所手才打执"
    "扩批找承技把投报拉拟择括持指按损换据掉排接控推描提換搜播支收改放政效教数整數文料"
    "断新方族旗无日时昌明易星映是显時普景曲更替最月有服期未本术机权束条来板构析林果查"
    "标栏树校样核根格框案档检楼概標模次止正此步武段母每比民水永求江池没河治法波注活流"
    "测海消深清游湖源滑满滤点為热然照爬父片版牌物特状率王环现現理生用由申电画界略発登"
    "白百的监盘目直相省看真着知矩短石码确示社神票离种科秒积称移程空突窗立站章端符第等"
    "答策签简算管箱类精系素索結線红约级线练组细终经结绘给络统继续维编缩网罪置群老考者"
    "而联聚股育能自至致色节花若英范获菜藏行表被装西要见规视览角解言計設计订认让训议记"
    "许论设访证评识词试话询该详语误说请读课调象資负责败账质购费资起超足距路跳身輸车转"
    "轮软轴载较辑输边达过运近返还这进连迭述追退送选递通速造遍道那邮部都配采释里重量金"
    "针钮银链销错键长開間関门闭问间闻队防阳阵际陆限院除随隔集零需青非面音页项顺须预频"
    "题颜额飞首马验高黑默齒龙")


_CJK_PUNCT = ("\u3000", "\u303f", "\uff00", "\uffef")
# A pattern, not a compiled one: compiling its wide classes takes some 3 ms that every start-up
# would pay; re compiles it on first use and keeps it in its own cache.
_TOKEN_RUNS = (
    r"[\u3000-\u303f\uff00-\uffef]"                            # CJK / full-width punctuation
    r"|[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]"  # a CJK, kana or hangul char
    r"|[A-Za-z]+|[0-9]+"                                       # a word, a number
    r"|\n[ \t]*|[ \t]+"                                        # a line break with its indent
    r"|[^\sA-Za-z0-9\u3000-\u303f\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\uffef]+")


def estimate_tokens(text):
    """Approximate token count of ``text``, offline (no tokenizer ships with the stdlib).

    Calibrated against Claude's published BPE tokenizer: a word is one token up to 8 letters and
    one more per further 6; a number one per 3 digits; a common CJK character 0.8 (frequent
    pairs merge), a rarer one 1.8; CJK punctuation 1; a line break with its indentation 1; a
    single space 0 (BPE merges it into the next word); a run of other symbols one per 3.
    Within about ±12% for English prose, Chinese text and source code.
    """
    total, cjk = 0.0, 0.0
    for match in re.finditer(_TOKEN_RUNS, text):
        run = match.group()
        first = run[0]
        if first.isascii():
            if first.isalpha():
                total += 1 + max(0, (len(run) - 3) // 6)
            elif first.isdigit():
                total += (len(run) + 2) // 3
            elif first == "\n":
                total += 1
            elif first in " \t":
                total += len(run) > 1
            else:
                total += (len(run) + 2) // 3
        elif _CJK_PUNCT[0] <= first <= _CJK_PUNCT[1] or \
                _CJK_PUNCT[2] <= first <= _CJK_PUNCT[3] or first.isspace():
            total += 1
        else:
            cjk += 0.8 if first in COMMON_CJK else 1.8
    return int(round(total + cjk))


class TokenEstimates:
    """estimate_tokens with a bounded memory of long texts: clients resend the same system
    prompt and tool definitions every turn, and estimating them anew costs milliseconds."""

    def __init__(self, size=1024):
        self._memo, self._size, self._lock = {}, size, threading.Lock()

    def __call__(self, text):
        if len(text) < 512:
            return estimate_tokens(text)
        key = (len(text), hash(text))
        with self._lock:
            known = self._memo.get(key)
        if known is None:
            known = estimate_tokens(text)
            with self._lock:
                self._memo[key] = known
                trim_oldest(self._memo, self._size)
        return known


def count_openai_tokens(body, estimate=estimate_tokens):
    """Estimated input tokens of an OpenAI chat request (messages, tools)."""
    total, texts = 0, []
    for message in body.get("messages") or ():
        total += 4
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p.get("text") or "" for p in content if isinstance(p, dict))
            total += 1600 * sum(1 for p in content if isinstance(p, dict) and
                                p.get("type") == "image_url")
        for key in ("reasoning_content",):
            if isinstance(message.get(key), str):
                texts.append(message[key])
        if message.get("tool_calls"):
            texts.append(json.dumps(message["tool_calls"]))
    if body.get("tools"):
        texts.append(json.dumps(body["tools"]))
    return total + sum(estimate(t) for t in texts if t)


class TokenCalibration:
    """How each model's upstream counts prompts, against the local estimate.

    The estimate is calibrated on Claude's tokenizer; every model counts differently, and the
    translated request carries a chat template the estimate never sees.  Each relayed answer
    that reports its prompt tokens adds a ratio; the factor is the median of the recent ones
    (robust to an odd request), kept per model, bounded, saved with the usage figures.
    """

    def __init__(self, saved=None, keep=32, models=200):
        self.keep, self.models = keep, models
        self._lock = threading.Lock()
        self._ratios = {m: [float(r) for r in rs if isinstance(r, (int, float))][-keep:]
                        for m, rs in (saved or {}).items() if isinstance(rs, list)}
        self.changed = False

    def observe(self, model, estimate, actual):
        if not isinstance(actual, int) or estimate < 50 or actual <= 0:
            return
        ratio = actual / float(estimate)
        if not 0.25 <= ratio <= 4.0:  # a different request entirely (images, truncation)
            return
        with self._lock:
            ratios = self._ratios.pop(model, [])
            ratios.append(round(ratio, 4))
            self._ratios[model] = ratios[-self.keep:]
            trim_oldest(self._ratios, self.models)
            self.changed = True

    def factor(self, model):
        with self._lock:
            ratios = sorted(self._ratios.get(model, ()))
        if len(ratios) < 3:
            return 1.0
        middle = len(ratios) // 2
        return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2

    def snapshot(self):
        with self._lock:
            return {m: list(rs) for m, rs in self._ratios.items()}

    def status(self):
        return {m: {"factor": round(self.factor(m), 3), "samples": len(rs)}
                for m, rs in self.snapshot().items()}


def count_request_tokens(body, estimate=estimate_tokens):
    """Estimated input tokens of an Anthropic request (system, messages, tools)."""
    texts = [system_text(body.get("system"))]
    total = 0
    for message in body.get("messages") or []:
        total += 4  # role and framing
        for block in _blocks(message.get("content") or []):
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text":
                texts.append(block.get("text") or "")
            elif kind == "thinking":
                texts.append(block.get("thinking") or "")
            elif kind == "tool_use":
                texts.append(block.get("name", "") + json.dumps(block.get("input") or {}))
            elif kind == "tool_result":
                content = block.get("content") or ""
                texts.append(content if isinstance(content, str) else _text_of(
                    [b for b in content if isinstance(b, dict)]))
                total += sum(1600 for b in content if isinstance(b, dict) and
                             b.get("type") == "image") if isinstance(content, list) else 0
            elif kind == "image":
                total += 1600  # Anthropic's cost of a ~1.15 megapixel image
            elif kind == "document" and isinstance(block.get("source"), dict):
                texts.append(str(block["source"].get("data") or ""))
    for tool in body.get("tools") or []:
        if isinstance(tool, dict):
            texts.append(json.dumps({k: tool.get(k) for k in ("name", "description",
                                                               "input_schema")}))
    return total + sum(estimate(t) for t in texts if t)


class ChatRequest:
    """One client chat request, in the form each upstream protocol needs (made when needed).

    ``api`` is the client's own API; ``body`` its validated request with the model already
    mapped (a Claude name to the provider's model); ``openai()`` and ``anthropic()`` give it
    in either upstream protocol.
    """

    def __init__(self, api, body, thinking=None, effort=None, estimate=0, request_class="main",
                 client=""):
        self.api, self.body, self.client = api, body, client  # client: the client key's name
        self.model, self.stream = body["model"], body.get("stream") is True
        self.thinking, self.effort, self.estimate = thinking, effort, estimate
        self.request_class = request_class  # see REQUEST_LANES
        self.key = None  # the client key (its model globs), set by the handler
        self.lane = REQUEST_LANES.get(request_class, 0)
        self.size = 0                 # the body's size in bytes, when known
        self.responses = None  # a Responses API body, for upstreams that take it as it is
        self._forms = {api: body}

    def check_model(self, model):
        """ModelNotAllowed unless the client key may use ``model``, the one about to be sent
        upstream (after aliases, Claude families, fallbacks), not the name the client asked."""
        key = self.key
        if key is not None and key.models and not matches_any(model, key.models):
            raise ModelNotAllowed("client key %s may not use model %s (it may use: %s)" % (
                key.name, model, ", ".join(key.models)))

    def tokens(self, estimate=estimate_tokens):
        """The prompt's estimated size in tokens (as given, else counted now)."""
        if not self.estimate:
            self.estimate = count_request_tokens(self.body, estimate) if self.api == "anthropic" \
                else count_openai_tokens(self.body, estimate)
        return self.estimate

    def openai(self):
        if "openai" not in self._forms:
            self._forms["openai"] = anthropic_to_openai(self.body, self.model, 1 << 30)
        return self._forms["openai"]

    def anthropic(self):
        if "anthropic" not in self._forms:
            self._forms["anthropic"] = openai_to_anthropic_request(self.body)
        return self._forms["anthropic"]


# ==================================================================================================
# Responses API: /v1/responses (Codex) as chat completions, and chat answers as Responses events
# ==================================================================================================

# Item types a Responses request may carry that have no chat form (web search calls, image
# generation, compaction, …): skipped, never a 400.
RESPONSES_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what chat upstreams accept


def _expect_text(item, key, where):
    value = item.get(key)
    if not isinstance(value, str):
        raise BadRequest("%s.%s must be a string" % (where, key))
    return value


def validate_responses_request(body):
    """A Responses request's own checks (https://platform.openai.com/docs/api-reference/
    responses/create): a 400 naming the field for what can't be read; unknown fields and item
    or tool types ignored."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"].strip():
        raise BadRequest("field 'model' must be a non-empty string")
    items = body.get("input")
    if items is None and not body.get("previous_response_id"):
        raise BadRequest("field 'input' is required (a string or a list of items)")
    if items is not None and not isinstance(items, (str, list)):
        raise BadRequest("field 'input' must be a string or a list of items")
    for i, item in enumerate(items if isinstance(items, list) else ()):
        _check_response_item(item, "input[%d]" % i)
    for i, tool in enumerate(_expect(body, "tools", list, "a list of tools") or ()):
        where = "tools[%d]" % i
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise BadRequest("%s must be an object with a string 'type'" % where)
        if tool["type"] in ("function", "custom", "namespace"):
            _expect_text(tool, "name", where)
        if tool["type"] == "namespace":
            inner = tool.get("tools")
            if not isinstance(inner, list) or not all(
                    isinstance(t, dict) and isinstance(t.get("name"), str) for t in inner):
                raise BadRequest("%s.tools must be a list of named tools" % where)
    most = _expect(body, "max_output_tokens", int, "a positive integer")
    if most is not None and most < 1:
        raise BadRequest("field 'max_output_tokens' must be a positive integer")
    _expect(body, "instructions", str, "a string")
    _expect(body, "previous_response_id", str, "a string")
    _expect(body, "stream", bool, "true or false")
    _expect(body, "store", bool, "true or false")
    _expect(body, "reasoning", dict, "an object")
    _expect(body, "text", dict, "an object")
    for key in ("temperature", "top_p"):
        _expect(body, key, _NUMBER, "a number")
    return body


def _check_response_item(item, where):
    if not isinstance(item, dict):
        raise BadRequest("%s must be an object" % where)
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind == "message":
        if item.get("role") not in ("user", "assistant", "system", "developer"):
            raise BadRequest("%s.role must be user, assistant, system or developer" % where)
        content = item.get("content")
        if not isinstance(content, (str, list)):
            raise BadRequest("%s.content must be a string or a list of parts" % where)
        _check_response_parts(content, where + ".content")
    elif kind in ("function_call", "custom_tool_call"):
        _expect_text(item, "call_id", where)
        _expect_text(item, "name", where)
        _expect_text(item, "arguments" if kind == "function_call" else "input", where)
    elif kind in ("function_call_output", "custom_tool_call_output"):
        _expect_text(item, "call_id", where)
        if not isinstance(item.get("output"), (str, list)):
            raise BadRequest("%s.output must be a string or a list of parts" % where)
        _check_response_parts(item["output"], where + ".output")
    elif kind == "reasoning":
        for key in ("summary", "content"):
            if item.get(key) is not None and not isinstance(item[key], list):
                raise BadRequest("%s.%s must be a list of parts" % (where, key))
    elif kind is None:
        raise BadRequest("%s needs a 'type' (or a 'role' for a message)" % where)


def _check_response_parts(parts, where):
    for j, part in enumerate(parts if isinstance(parts, list) else ()):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise BadRequest("%s[%d] must be an object with a string 'type'" % (where, j))
        if part["type"] in ("input_text", "output_text"):
            _expect_text(part, "text", "%s[%d]" % (where, j))


def response_problem(response):
    """What in a Responses API response object (a native upstream's) can't be stored and
    continued from, or None: its output items become the next turn's input items."""
    if type(response.get("id")) is not str:
        return "its id is not a string"
    if type(response.get("output")) is not list:
        return "its output is not a list"
    for i, item in enumerate(response["output"]):
        try:
            _check_response_item(item, "output[%d]" % i)
        except BadRequest as e:
            return e.message
    return None


class ResponsesTools:
    """The client's Responses tools as chat functions, and the way back: a ``custom`` tool
    (freeform input, e.g. Codex's apply_patch) is a function with one string argument,
    ``input``; a ``namespace``'s tools are functions under their own name where no other tool
    has it, else ``namespace__name``.  A hosted ``web_search`` tool is a function with one
    argument, ``query``, that the proxy runs itself (``search_name``, when ``search`` says a
    backend can); other hosted tools have no chat form."""

    def __init__(self, tools, search=False):
        self.functions, self.custom, self.by_flat, self.dropped = [], set(), {}, []
        self.search_name, entries = None, []
        for tool in tools or ():
            if tool.get("type") == "namespace":
                entries += [(tool["name"], inner, tool.get("description") or "")
                            for inner in tool.get("tools") or ()]
            elif tool.get("type") in ("function", "custom"):
                entries.append((None, tool, ""))
            elif search and str(tool.get("type")).startswith("web_search"):
                self.search_name = "web_search"
            else:
                self.dropped.append(str(tool.get("type")))
        counts = collections.Counter(t["name"] for _ns, t, _d in entries)
        for namespace, tool, about in entries:
            flat = tool["name"] if namespace is None or counts[tool["name"]] == 1 else \
                "%s__%s" % (namespace, tool["name"])
            if not RESPONSES_TOOL_NAME.match(flat):
                flat = re.sub(r"[^A-Za-z0-9_-]", "_", flat)[:55] + "_" + \
                    hashlib.sha256(flat.encode()).hexdigest()[:8]
            self.by_flat[flat] = (namespace, tool["name"])
            if tool.get("type") == "custom":
                self.custom.add(flat)
            self.functions.append(self._function(flat, tool, about))
        if self.search_name in self.by_flat:  # a client function of that name comes first
            self.search_name = "web_search_" + random_hex(6)
        if self.search_name:
            self.functions.append({"type": "function", "function": {
                "name": self.search_name, "description": "Search the web. Returns the titles, "
                "URLs and snippets of the pages found; cite the URLs you use.", "parameters": {
                    "type": "object", "properties": {"query": {"type": "string"}},
                    "required": ["query"]}}})

    @staticmethod
    def _function(flat, tool, about):
        description = tool.get("description") or ""
        if about:
            description = ("%s\n\n%s" % (about, description)).strip()
        if tool.get("type") != "custom":
            function = {"name": flat, "description": description,
                        "parameters": tool.get("parameters") or {"type": "object",
                                                                 "properties": {}}}
            return {"type": "function", "function": function}
        form = tool.get("format") if isinstance(tool.get("format"), dict) else {}
        if form.get("type") == "grammar" and isinstance(form.get("definition"), str):
            description += "\n\nThe input follows this %s grammar:\n%s" % (
                form.get("syntax") or "", form["definition"])
        schema = {"type": "object", "properties": {"input": {
            "type": "string", "description": "The tool's whole input, as free text."}},
                  "required": ["input"]}
        return {"type": "function", "function": {"name": flat, "description": description,
                                                 "parameters": schema}}

    def flat(self, name, namespace=None):
        """The chat name of a tool a client names (with its namespace, if any)."""
        for flat, (ns, tool) in self.by_flat.items():
            if tool == name and (namespace is None or ns == namespace):
                return flat
        return "%s__%s" % (namespace, name) if namespace else name

    def item(self, flat, call_id, arguments):
        """A chat tool call as a Responses output item (without its id)."""
        namespace, name = self.by_flat.get(flat, (None, flat))
        if flat in self.custom:
            item = {"type": "custom_tool_call", "call_id": call_id, "name": name,
                    "input": custom_input(arguments)}
        else:
            item = {"type": "function_call", "call_id": call_id, "name": name,
                    "arguments": arguments}
        if namespace:
            item["namespace"] = namespace
        return item


def custom_input(arguments):
    """A custom tool's input from the arguments of the function standing in for it."""
    try:
        parsed = json.loads(arguments) if arguments else {}
    except ValueError:
        return arguments
    return parsed["input"] if isinstance(parsed, dict) and isinstance(parsed.get("input"),
                                                                        str) else arguments


def responses_to_chat(body, history=(), tools=None):
    """A Responses request (after ``history``, the items of the responses it continues) as an
    OpenAI chat-completions body."""
    tools = tools or ResponsesTools(body.get("tools"))
    items = list(history)
    given = body.get("input")
    items += [{"type": "message", "role": "user", "content": given}] if isinstance(given, str) \
        else list(given or ())
    system = [body["instructions"]] if body.get("instructions") else []
    out = {"model": body["model"], "messages": _chat_messages(items, tools, system)}
    if tools.functions:
        out["tools"] = tools.functions
        choice = _chat_tool_choice(body.get("tool_choice"), tools)
        if choice is not None:
            out["tool_choice"] = choice
        if isinstance(body.get("parallel_tool_calls"), bool):
            out["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body.get("max_output_tokens"):
        out["max_tokens"] = body["max_output_tokens"]
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    effort = (body.get("reasoning") or {}).get("effort")
    if isinstance(effort, str):
        out["reasoning_effort"] = effort
    form = (body.get("text") or {}).get("format")
    if isinstance(form, dict) and form.get("type") == "json_schema":
        out["response_format"] = {"type": "json_schema", "json_schema": {
            k: form[k] for k in ("name", "schema", "strict", "description") if k in form}}
    elif isinstance(form, dict) and form.get("type") == "json_object":
        out["response_format"] = {"type": "json_object"}
    if body.get("stream") is True:
        out["stream"], out["stream_options"] = True, {"include_usage": True}
    return out


def _chat_tool_choice(choice, tools):
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom") and \
            isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": tools.flat(choice["name"])}}
    return None  # allowed_tools, hosted tools: the upstream's own choice


def _chat_messages(items, tools, system):
    """Responses items as chat messages: system and developer messages before the first other
    item join the system prompt, later ones become a <system-reminder> in a user turn (chat
    templates refuse a system message after the first); a function call joins the assistant
    turn before it; a reasoning item's text goes with the assistant turn after it."""
    messages, reasoning = [], None
    for item in items:
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "reasoning":
            reasoning = _reasoning_text(item) or reasoning
        elif kind == "message" and item.get("role") in ("system", "developer"):
            text = _part_text(item.get("content"))
            if not messages:
                system.append(text)
            elif text:
                _add_user(messages, "<system-reminder>\n%s\n</system-reminder>" % text)
        elif kind == "message" and item.get("role") == "user":
            _add_user(messages, _user_content(item.get("content")))
        elif kind == "message":
            _assistant(messages, reasoning)["content"] = _part_text(item.get("content"))
            reasoning = None
        elif kind in ("function_call", "custom_tool_call"):
            arguments = item.get("arguments") if kind == "function_call" else \
                json.dumps({"input": item.get("input")}, ensure_ascii=False)
            turn = _assistant(messages, reasoning, calls=True)
            turn.setdefault("tool_calls", []).append({
                "id": item["call_id"], "type": "function", "function": {
                    "name": tools.flat(item["name"], item.get("namespace")),
                    "arguments": arguments or "{}"}})
            reasoning = None
        elif kind in ("function_call_output", "custom_tool_call_output"):
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _part_text(item.get("output")) or "(no output)"})
    system = "\n\n".join(s for s in system if s)
    return ([{"role": "system", "content": system}] if system else []) + messages


def _assistant(messages, reasoning, calls=False):
    """The assistant turn to add to: the last one when it is still open for tool calls."""
    last = messages[-1] if messages else None
    if not (calls and last is not None and last["role"] == "assistant"):
        last = {"role": "assistant", "content": None}
        messages.append(last)
    if reasoning:
        last["reasoning_content"] = reasoning
    return last


def _add_user(messages, content):
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "user" and isinstance(content, str) and \
            isinstance(last["content"], str):
        last["content"] += "\n\n" + content
    else:
        messages.append({"role": "user", "content": content})


_PART_TEXT = {"input_text": "text", "output_text": "text", "text": "text",
              "summary_text": "text", "refusal": "refusal"}  # (a refusal's text is "refusal")


def _part_text(content):
    if isinstance(content, str):
        return content
    texts = []
    for part in content or ():
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get(_PART_TEXT[kind]) if isinstance(kind, str) and kind in _PART_TEXT \
            else None
        if isinstance(text, str):
            texts.append(text)
    return "\n".join(texts)


def _user_content(content):
    """A user message's parts: text alone as a string, with images as chat parts."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type")
        if kind in ("input_text", "output_text"):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise BadRequest("input_image needs an image_url (a URL or a data: URL); "
                                 "file_id is not supported")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "input_file":
            raise BadRequest("input_file parts are not supported; send the file's text as "
                             "input_text")
    if all(p["type"] == "text" for p in parts):
        return "\n\n".join(p["text"] for p in parts)
    return parts


def _reasoning_text(item):
    """A reasoning item's text: its reasoning_text content (whole), else its summary."""
    for key in ("content", "summary"):
        parts = [p.get("text") for p in item.get(key) or ()
                 if isinstance(p, dict) and isinstance(p.get("text"), str) and p.get("text")]
        if parts:
            return "\n".join(parts)
    return ""


def responses_thinking(body):
    """(thinking on/off/None, effort) from a Responses request's ``reasoning.effort``."""
    effort = (body.get("reasoning") or {}).get("effort")
    if not isinstance(effort, str):
        return None, None
    return effort not in ("none", "minimal"), effort


def responses_conversation_key(body, chat_body, headers):
    """One key per client conversation: Codex's session-id header or prompt_cache_key (its
    session), else a hash of the first messages."""
    explicit = headers.get("session-id") or headers.get("x-session-id") or \
        body.get("prompt_cache_key")
    if isinstance(explicit, str) and explicit:
        return "sid:" + explicit
    return first_messages_key(chat_body.get("messages"), 2)


def responses_usage(usage):
    """OpenAI chat usage as a Responses usage object."""
    usage = usage if isinstance(usage, dict) else {}
    prompt = usage.get("prompt_tokens") or 0
    output = usage.get("completion_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or \
        usage.get("prompt_cache_hit_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + output}


class ResponsesStream:
    """OpenAI chat chunks (dicts) as Responses API events (bytes), in its grammar
    (https://platform.openai.com/docs/api-reference/responses-streaming): response.created,
    response.in_progress, per output item ``response.output_item.added`` … ``.done`` (the
    ``.done`` item whole: Codex reads items only there), then exactly one of
    response.completed, response.incomplete (max_output_tokens) or response.failed; every
    event numbered by ``sequence_number``.  ``complete()`` builds a non-streamed response the
    same way."""

    def __init__(self, body, tools, model, clock=time.time, searcher=None):
        self.tools, self.searcher = tools, searcher  # searcher(query) -> (urls, text)
        self.searched = []    # this round's searches: (chat tool call, result text)
        self.response = {
            "id": "resp_" + random_hex(32), "object": "response", "created_at": int(clock()),
            "status": "in_progress", "model": model, "output": [], "usage": None,
            "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
            "store": body.get("store", True), "temperature": body.get("temperature"),
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "top_p": body.get("top_p"), "truncation": "disabled",
            "metadata": body.get("metadata") or {}}
        self.sequence = 0
        self.open = None      # the text or reasoning item being written: [item, index, text]
        self.calls = {}       # chat tool-call index -> [item, output index, argument pieces]
        self.finish_reason = self.usage = None

    def _event(self, kind, **fields):
        fields["type"], fields["sequence_number"] = kind, self.sequence
        self.sequence += 1
        return sse(fields, kind)

    def _snapshot(self):
        return dict(self.response, output=list(self.response["output"]))

    def start(self):
        return self._event("response.created", response=self._snapshot()) + \
            self._event("response.in_progress", response=self._snapshot())

    def _add(self, item):
        index = len(self.response["output"])
        self.response["output"].append(item)
        return index, self._event("response.output_item.added", output_index=index,
                                  item=dict(item))

    def feed(self, chunk):
        """The events for one chat chunk."""
        out = []
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(thought, str) and thought:
                out.append(self._write("reasoning", thought))
            if isinstance(delta.get("content"), str) and delta["content"]:
                out.append(self._write("message", delta["content"]))
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    out.append(self._call(call))
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return b"".join(out)

    def _write(self, kind, text):
        out = b""
        if self.open is None or self.open[0]["type"] != kind:
            out = self._close_open()
            if kind == "message":
                item = {"id": "msg_" + random_hex(32), "type": "message",
                        "status": "in_progress", "role": "assistant", "content": []}
            else:
                item = {"id": "rs_" + random_hex(32), "type": "reasoning", "summary": []}
            index, added = self._add(item)
            self.open = [item, index, []]
            part = {"type": "output_text", "text": "", "annotations": []} \
                if kind == "message" else {"type": "summary_text", "text": ""}
            out += added + (self._event("response.content_part.added", item_id=item["id"],
                                        output_index=index, content_index=0, part=part)
                            if kind == "message" else
                            self._event("response.reasoning_summary_part.added",
                                        item_id=item["id"], output_index=index,
                                        summary_index=0, part=part))
        item, index, pieces = self.open
        pieces.append(text)
        if kind == "message":
            return out + self._event("response.output_text.delta", item_id=item["id"],
                                     output_index=index, content_index=0, delta=text,
                                     logprobs=[])
        return out + self._event("response.reasoning_summary_text.delta", item_id=item["id"],
                                 output_index=index, summary_index=0, delta=text)

    def _close_open(self):
        if self.open is None:
            return b""
        (item, index, pieces), self.open = self.open, None
        text, at = "".join(pieces), {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            item.update(content=[part], status="completed")
            out = self._event("response.output_text.done", content_index=0, text=text,
                              logprobs=[], **at) + \
                self._event("response.content_part.done", content_index=0, part=part, **at)
        else:
            part = {"type": "summary_text", "text": text}
            item.update(summary=[part], content=[{"type": "reasoning_text", "text": text}])
            out = self._event("response.reasoning_summary_text.done", summary_index=0,
                              text=text, **at) + \
                self._event("response.reasoning_summary_part.done", summary_index=0,
                            part=part, **at)
        return out + self._event("response.output_item.done", output_index=index,
                                 item=dict(item))

    def _call(self, call):
        function = call.get("function") or {}
        state, out = self.calls.get(call.get("index", 0)), b""
        if state is None:
            out = self._close_open()
            name, call_id = function.get("name") or "", call.get("id") or "call_" + \
                random_hex(24)
            if name and name == self.tools.search_name:
                item = {"id": "ws_" + random_hex(32), "type": "web_search_call",
                        "action": {"type": "search", "query": ""}, "call_id": call_id}
            else:
                item = self.tools.item(name, call_id, "")
                item["id"] = ("ctc_" if item["type"] == "custom_tool_call" else "fc_") + \
                    random_hex(32)
            item["status"] = "in_progress"
            index, added = self._add(item)
            state = self.calls[call.get("index", 0)] = [item, index, []]
            out += added
        item, index, pieces = state
        piece = function.get("arguments")
        if isinstance(piece, str) and piece:
            pieces.append(piece)
            if item["type"] == "function_call":
                out += self._event("response.function_call_arguments.delta",
                                   item_id=item["id"], output_index=index, delta=piece)
        return out

    def _close_calls(self):
        out = []
        for item, index, pieces in sorted(self.calls.values(), key=lambda s: s[1]):
            arguments, at = "".join(pieces), {"item_id": item["id"], "output_index": index}
            if item["type"] == "web_search_call":
                out.append(self._search(item, arguments, at))
                continue
            if item["type"] == "function_call":
                item["arguments"] = arguments
                out.append(self._event("response.function_call_arguments.done",
                                       arguments=arguments, **at))
            else:
                item["input"] = custom_input(arguments)
                out.append(self._event("response.custom_tool_call_input.delta",
                                       delta=item["input"], **at) +
                           self._event("response.custom_tool_call_input.done",
                                       input=item["input"], **at))
            item["status"] = "completed"
            out.append(self._event("response.output_item.done", output_index=index,
                                   item=dict(item)))
        self.calls = {}
        return b"".join(out)

    def _search(self, item, arguments, at):
        """Run a web_search call the model made, as the hosted tool's events and item."""
        try:
            query = json.loads(arguments).get("query") or arguments
        except (ValueError, AttributeError):
            query = arguments
        out = self._event("response.web_search_call.in_progress", **at) + \
            self._event("response.web_search_call.searching", **at)
        urls, text = self.searcher(str(query)) if self.searcher else ([], "no search backend")
        call_id = item.pop("call_id")
        item.update(status="completed", action={"type": "search", "query": str(query),
                                                "sources": [{"type": "url", "url": u}
                                                            for u in urls]})
        self.searched.append(({"id": call_id, "type": "function", "function": {
            "name": self.tools.search_name, "arguments": arguments or "{}"}}, text))
        return out + self._event("response.web_search_call.completed", **at) + \
            self._event("response.output_item.done", output_index=at["output_index"],
                        item=dict(item))

    def end_round(self):
        """Close this upstream answer's items; the searches to answer (chat tool calls and
        their results) when the model asked only to search, else None.  Events to write."""
        others = [s for s in self.calls.values() if s[0]["type"] != "web_search_call"]
        out = self._close_open() + self._close_calls()
        searched, self.searched = self.searched, []
        return out, (searched if searched and not others and
                     self.finish_reason in ("tool_calls", "stop", None) else None)

    def finish(self):
        """The closing events: response.completed, or response.incomplete for an answer cut
        at its output limit."""
        out = self._close_open() + self._close_calls()
        self.response["usage"] = responses_usage(self.usage)
        reason = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(
            self.finish_reason)
        if reason:
            self.response.update(status="incomplete", incomplete_details={"reason": reason})
            return out + self._event("response.incomplete", response=self._snapshot())
        self.response["status"] = "completed"
        return out + self._event("response.completed", response=self._snapshot())

    def failed(self, error):
        """response.failed for an error after the first event, with the codes Codex acts on
        (context_length_exceeded; rate_limit_exceeded, whose "try again in Ns" it waits)."""
        code, message = "server_error", error.message
        if getattr(error, "kind", None) == "context_length":
            code = "context_length_exceeded"
        elif error.status == 429:
            code = "rate_limit_exceeded"
            message += " Please try again in %ss." % (error.retry_after or 1)
        self.response.update(status="failed", error={"code": code, "message": message},
                             usage=responses_usage(self.usage))
        return self._event("response.failed", response=self._snapshot())

    def complete(self, completion):
        """A whole chat.completion as the final response object (not streamed)."""
        for chunk in completion_to_chunks(completion):
            self.feed(chunk)
        self.finish()
        return self.response


class ResponseStore:
    """The last ``size`` responses stored (``store``, true unless the client says false), for
    ``previous_response_id`` and ``GET /v1/responses/{id}``: in memory, each readable only by
    the client key that made it, gone on restart."""

    def __init__(self, size):
        self.size, self._lock = size, threading.Lock()
        self._responses = collections.OrderedDict()  # id -> (owner, response, input items)

    def put(self, owner, response, items):
        if self.size <= 0:
            return
        with self._lock:
            self._responses[response["id"]] = (owner, response, list(items))
            while len(self._responses) > self.size:
                self._responses.popitem(last=False)

    def get(self, owner, response_id):
        """(response, its input items), or NotFound naming the id."""
        with self._lock:
            found = self._responses.get(response_id)
        if found is None or not hmac.compare_digest(found[0].encode(), owner.encode()):
            raise NotFound("no stored response with id %r (responses are kept in memory, the "
                           "last %d, and only with store: true)" % (response_id, self.size))
        return found[1], found[2]

    def history(self, owner, response_id):
        """The items a response continues from: its input and its output."""
        if not response_id:
            return []
        try:
            response, items = self.get(owner, response_id)
        except NotFound as e:
            raise BadRequest("previous_response_id: " + e.message)
        return items + [dict(item) for item in response["output"]]


# ==================================================================================================
# Web search: a search backend answers web-search tools for upstreams that have none
# ==================================================================================================

# Backends: how each is asked and where its key comes from (config web_search.api_key, else the
# environment variable here).  Facts from each one's documentation:
#   searxng     https://docs.searxng.org/dev/search_api: GET {url}/search?q=…&format=json;
#               a format not enabled in settings.yml answers 403
#   tavily      https://help.tavily.com/articles/4840311948-tavily-search-api: POST
#               https://api.tavily.com/search with a Bearer key (results' fields title, url,
#               content, published_date: from a third party's client, not Tavily's page)
#   brave       https://github.com/brave/brave-search-skills (Brave's own): GET
#               https://api.search.brave.com/res/v1/web/search?q=…&count=…, header
#               X-Subscription-Token; web.results[] title, url, description, page_age/age
#   exa         https://exa.ai/docs/reference/search: POST https://api.exa.ai/search, header
#               x-api-key, {query, numResults, contents: {text: {maxCharacters}}}
#   duckduckgo  no documented API: its HTML results page, read only when chosen explicitly
# Providers' own search, with an account's key (backend "provider", or "auto" when no other
# backend is set up; see preset quirk search_api):
#   deepseek    https://api-docs.deepseek.com/guides/search: POST {base}/v1/tools/search,
#               Bearer, {query, count} -> results[] title, url, summary
#   zhipu       https://docs.bigmodel.cn/api-reference/%E5%B7%A5%E5%85%B7-api/%E7%BD%91%E7%BB%9C%E6%90%9C%E7%B4%A2:
#               POST {base}/web_search, Bearer, {search_query, search_engine: search_std,
#               count} -> search_result[] title, link, content, publish_date
#   minimax     MiniMax's own Coding Plan MCP server (github.com/MiniMax-AI/MiniMax-Coding-Plan-MCP,
#               minimax_mcp/server.py; a Coding Plan key only): POST {host}/v1/coding_plan/search,
#               Bearer, {q} -> organic[] title, link, snippet, date; base_resp.status_code not 0
#               is an error (status_msg says why)
SearchBackend = collections.namedtuple("SearchBackend", "url key_env needs_key")
SEARCH_BACKENDS = {
    "searxng": SearchBackend(None, None, False),
    "tavily": SearchBackend("https://api.tavily.com/search", "TAVILY_API_KEY", True),
    "brave": SearchBackend("https://api.search.brave.com/res/v1/web/search", "BRAVE_API_KEY",
                           True),
    "exa": SearchBackend("https://api.exa.ai/search", "EXA_API_KEY", True),
    "duckduckgo": SearchBackend("https://html.duckduckgo.com/html/", None, False),
}
SEARCH_AUTO_ORDER = ("searxng", "tavily", "brave", "exa")  # auto: the first one configured
SearchResult = collections.namedtuple("SearchResult", "title url snippet page_age")


class SearchUnavailable(ProxyError):
    """No backend could answer a search: the client gets the tool's error form, not a 5xx."""

    status, code = 503, "web_search_unavailable"


PROVIDER_SEARCH = {"deepseek": ("deepseek", "/v1/tools/search"),  # (after the OpenAI base)
                   "zhipu": ("zhipu", "/web_search"), "zai": ("zhipu", "/web_search"),
                   "minimax": ("minimax", "/coding_plan/search")}


def provider_search(config, accounts):
    """(backend, url, key) of the first usable account whose provider has a search API of its
    own, or None."""
    for account in accounts:
        found = PROVIDER_SEARCH.get(account.provider_name)
        if account.usable and account.api_key and found:
            base = account.api_base(config)
            if account.protocol == "anthropic":  # the same host's OpenAI-protocol base
                base = PROVIDERS[account.provider_name].openai
            return found[0], base.rstrip("/") + found[1], account.api_key
    return None


def search_settings(config, env, accounts=()):
    """(backend name, url, key, max results, timeout) of config ``web_search``, its key from
    the environment when the config has none, a provider's own search for "provider" (and for
    "auto" when nothing else is set up); backend None when none can answer."""
    settings = config.web_search or {}
    chosen = settings.get("backend") or "auto"
    count, timeout = settings.get("max_results") or 5, settings.get("timeout") or 10
    if chosen == "provider" or chosen == "auto" and search_configured(config, env) is None:
        found = provider_search(config, accounts)
        return (found + (count, timeout)) if found else (None, None, "", 0, 0)
    return search_configured(config, env) or (None, None, "", 0, 0)


def search_configured(config, env):
    """search_settings' answer from the config and environment alone, or None."""
    settings = config.web_search or {}
    chosen = settings.get("backend") or "auto"
    url = settings.get("url") or (env.get("SEARXNG_URL") if chosen in ("auto", "searxng")
                                  else None)
    candidates = SEARCH_AUTO_ORDER if chosen in ("auto", "provider") else (chosen,)
    for name in candidates:
        backend = SEARCH_BACKENDS.get(name)
        if backend is None:
            continue
        key = settings.get("api_key") or (env.get(backend.key_env) if backend.key_env else "")
        if name == "searxng" and not url or backend.needs_key and not key:
            continue
        return (name, url or backend.url, key or "", settings.get("max_results") or 5,
                settings.get("timeout") or 10)
    return None


def search_request(name, url, key, query, count):
    """(method, url, headers, body bytes or None) that asks backend ``name``."""
    quote = urllib.parse.quote_plus
    if name == "searxng":
        return "GET", "%s/search?q=%s&format=json" % (url.rstrip("/"), quote(query)), {}, None
    if name == "brave":
        return "GET", "%s?q=%s&count=%d" % (url, quote(query), count), {
            "X-Subscription-Token": key, "Accept": "application/json"}, None
    if name == "duckduckgo":
        return "GET", "%s?q=%s" % (url, quote(query)), {"Accept": "text/html"}, None
    body = {"tavily": {"query": query, "max_results": count},
            "deepseek": {"query": query, "count": count},
            "zhipu": {"search_query": query, "search_engine": "search_std", "count": count},
            "minimax": {"q": query}}.get(name) or {"query": query, "numResults": count,
                            "contents": {"text": {"maxCharacters": 500}}}
    headers = {"Content-Type": "application/json"}
    headers.update({"x-api-key": key} if name == "exa" else {"Authorization": "Bearer " + key})
    return "POST", url, headers, json_bytes(body)


def search_results(name, status, raw):
    """The SearchResults in a backend's answer; SearchUnavailable saying why there are none."""
    if status == 403 and name == "searxng":
        raise SearchUnavailable("SearXNG refused format=json (403): add json to search.formats "
                                "in its settings.yml")
    if status != 200:
        raise SearchUnavailable("%s answered HTTP %d" % (name, status))
    if name == "duckduckgo":
        return duckduckgo_results(raw.decode("utf-8", "replace"))
    try:
        payload = json.loads(raw)
    except ValueError:
        raise SearchUnavailable("%s answered something that is not JSON" % name) from None
    refused = payload.get("base_resp") if isinstance(payload, dict) else None
    if isinstance(refused, dict) and refused.get("status_code") not in (0, None):
        raise SearchUnavailable("%s refused the search: %s" % (name, printable(str(
            refused.get("status_msg") or refused.get("status_code")))[:200]))
    web = payload.get("web") if isinstance(payload, dict) else None
    rows = ((web if isinstance(web, dict) else {}).get("results") if name == "brave" else
            payload.get("search_result") if name == "zhipu" else
            payload.get("organic") if name == "minimax" else
            payload.get("results")) if isinstance(payload, dict) else None
    if not isinstance(rows, list):
        raise SearchUnavailable("%s's answer has no results list" % name)
    out = []
    for row in rows:
        url = row.get("url") or row.get("link") if isinstance(row, dict) else None
        if not isinstance(url, str) or not _is_http_url(url):  # (a result is a web page)
            continue
        snippet = row.get("content") or row.get("description") or row.get("text") or \
            row.get("summary") or row.get("snippet") or ""
        age = row.get("publishedDate") or row.get("published_date") or row.get("page_age") \
            or row.get("age") or row.get("publish_date") or row.get("date") or ""
        out.append(SearchResult(str(row.get("title") or url), url,
                                html_text(str(snippet))[:500], str(age)))
    return out


_DDG_RESULT = re.compile(r'class="result__a"[^>]*href="([^"]+)"[^>]*>(.*?)</a>.*?'
                         r'class="result__snippet"[^>]*>(.*?)</a>', re.S)


def duckduckgo_results(page):
    """Results read off DuckDuckGo's HTML page (its links go through a redirect: uddg=)."""
    out = []
    for href, title, snippet in _DDG_RESULT.findall(page):
        href = html_text(href)
        try:
            target = urllib.parse.parse_qs(urllib.parse.urlsplit(href).query).get("uddg")
        except ValueError:  # e.g. "//[x": a page's link we can't read is no result
            continue
        url = target[0] if target else href
        if url.startswith("//"):
            url = "https:" + url
        if _is_http_url(url):  # (an ad's or a script's link is no result)
            out.append(SearchResult(html_text(title), url, html_text(snippet), ""))
    return out


def html_text(fragment):
    """Text of an HTML fragment: tags dropped, entities decoded, spaces collapsed."""
    import html
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def domain_allowed(url, allowed=(), blocked=()):
    """Whether ``url``'s host is one of (or under) ``allowed`` and none of ``blocked``."""
    try:
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
    except ValueError:  # not a URL (fetch_page says so): under no domain
        host = ""

    def under(domains):
        return any(host == d or host.endswith("." + d) for d in
                   (str(d).lower().lstrip(".") for d in domains))
    return (not allowed or under(allowed)) and not under(blocked)


class WebSearch:
    """Runs searches on the configured backend, bounded in time; every failure a
    SearchUnavailable whose message never holds the key."""

    def __init__(self, config, env=None, accounts=lambda: ()):
        self.config, self.env = config, os.environ if env is None else env
        self.accounts = accounts  # () -> the accounts (for a provider's own search)

    def settings(self):
        return search_settings(self.config, self.env, self.accounts())

    def configured(self):
        """Whether a backend of the config or environment (not a provider's) is set up."""
        return search_configured(self.config, self.env) is not None

    def search(self, query, allowed=(), blocked=()):
        """(backend name, [SearchResult]) for ``query``, filtered by domain."""
        name, url, key, count, timeout = self.settings()
        if name is None:
            raise SearchUnavailable(
                "web search is not set up in iflow-proxy: set web_search in config.json, e.g. "
                "{\"web_search\": {\"backend\": \"searxng\", \"url\": \"http://127.0.0.1:8888\"}}"
                " or a TAVILY_API_KEY / BRAVE_API_KEY / EXA_API_KEY")
        method, target, headers, body = search_request(name, url, key, query, count)
        client = UpstreamClient(self.config.replace(
            connect_timeout=timeout, first_byte_timeout=timeout, idle_timeout=timeout))
        try:
            response = client.open(method, target, headers, body)
            raw = response.read_all(4 << 20)
        except ProxyError as e:
            raise SearchUnavailable("%s could not be reached: %s" % (
                name, scrub_secrets(e.message, [key]))) from None
        finally:
            client.close()
        results = [r for r in search_results(name, response.status, raw)
                   if domain_allowed(r.url, allowed, blocked)]
        return name, results[:count]


def web_search_only(body):
    """Whether every tool a Messages request offers is a server web-search tool
    (``web_search_*``, any date): Claude Code's WebSearch side request is such a request."""
    tools = body.get("tools") or []
    return bool(tools) and all(isinstance(t, dict) and str(t.get("type") or "").startswith(
        "web_search_") for t in tools)


_SEARCH_ASK = re.compile(r"^\s*Perform a web search for the query:\s*", re.I)


def search_query(body):
    """What a web-search request asks for: the text of its last user turn (Claude Code's
    "Perform a web search for the query: …" without the words before the query)."""
    for message in reversed(body["messages"]):
        if message.get("role") == "user":
            text = _text_of(_blocks(message["content"]), "\n").strip()
            if text:
                return _SEARCH_ASK.sub("", text).strip()
    raise BadRequest("a web search needs a user message saying what to search for")


def web_search_message(model, query, results=None, error=None, estimate=0):
    """The Anthropic message a web search tool answers with: the server_tool_use, its
    web_search_tool_result (or the error form), and a text listing title — url — snippet (the
    calling model sees only text, titles and URLs)."""
    found, text = search_blocks(query, results, error)
    return server_tool_message(model, "web_search", {"query": query}, found, text, estimate,
                               error is None)


def search_blocks(query, results, error, code="unavailable"):
    """(the web_search_tool_result's content, the text for the model) of one search: its
    results, or the error form with ``code`` and why."""
    if error is None:
        found = [{"type": "web_search_result", "url": r.url, "title": r.title,
                  "page_age": r.page_age or None, "encrypted_content": ""} for r in results]
        text = "Web search results for %r:\n\n%s" % (query, "\n".join(
            "- %s — %s%s" % (r.title, r.url, " — " + r.snippet if r.snippet else "")
            for r in results) or "(no results)")
    else:
        found = {"type": "web_search_tool_result_error", "error_code": code}
        text = "The web search could not run: %s" % error
    return found, text


def server_tool_message(model, name, tool_input, result, text, estimate, ran):
    """The Anthropic message of a server tool the proxy ran: its server_tool_use, its
    ``<name>_tool_result``, a text for the calling model, and the run counted in usage."""
    tool_id = "srvtoolu_" + random_hex(24)
    content = [{"type": "server_tool_use", "id": tool_id, "name": name, "input": tool_input},
               {"type": name + "_tool_result", "tool_use_id": tool_id, "content": result},
               {"type": "text", "text": text}]
    return {"id": new_message_id(), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": estimate, "output_tokens": max(1, len(text) // 4),
                      "server_tool_use": {name + "_requests": 1 if ran else 0}}}


def write_message(handler, body, message):
    """A whole Anthropic message, as events when the request asked for a stream."""
    if body.get("stream") is True:
        handler.start_stream({})
        handler.end_stream(b"".join(sse(e, e["type"]) for e in message_to_events(message)))
    else:
        handler.send_json(200, message)


def answer_web_search(handler, body):
    """Answer a web-search-only Messages request with no model call (see web_search_message),
    streamed in Anthropic's grammar when asked; counted per backend and client key."""
    chat, query = handler.server.chat, search_query(body)
    tool = next(iter(body["tools"]))
    backend, results, error = counted_search(
        chat, query, handler.client_name(), tool.get("allowed_domains") or (),
        tool.get("blocked_domains") or (),
        "the tool allows no searches (max_uses 0)" if tool.get("max_uses") == 0 else None)
    if error is not None:
        log.warning("web search failed: %s", error)
    message = web_search_message(body["model"], query, results, error,
                                 count_request_tokens(body, chat.token_estimates))
    handler.log_fields["model"] = "web_search (%s)" % backend
    write_message(handler, body, message)


def counted_search(chat, query, client="", allowed=(), blocked=(), refused=None):
    """(backend, results, error) of one search (none when ``refused`` says why not), counted
    in usage per backend ("none" when it failed) and client key."""
    started, backend, results, error = time.monotonic(), "none", None, refused
    if refused is None:
        try:
            backend, results = chat.web_search.search(query, allowed, blocked)
        except SearchUnavailable as e:
            error = e.message
    chat.usage.record("web-search", backend, 200 if error is None else 503, None,
                      (time.monotonic() - started) * 1000, client)
    return backend, results, error


def result_lines(results):
    """Search results as the numbered lines a model reads: title — url — snippet."""
    return "\n".join("%d. %s — %s%s" % (n, r.title, r.url, " — " + r.snippet if r.snippet
                                         else "") for n, r in enumerate(results, 1))


def search_context(body, query, results, error):
    """An OpenAI chat body with ``web_search_options`` answered: the search's results (or why
    there are none) in a system message before the last user turn, the option removed."""
    if error is None:
        listing = result_lines(results) or "(no results)"
        text = ("Web search results for %r (cite the pages you use by their URLs):\n\n%s"
                % (query, listing))
    else:
        text = "A web search for %r could not run: %s" % (query, error)
    messages = list(body["messages"])
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=0)
    messages.insert(last_user, {"role": "system", "content": text})
    out = {k: v for k, v in body.items() if k != "web_search_options"}
    out["messages"] = messages
    return out


def url_citations(text, results):
    """OpenAI ``annotations`` for the results whose URLs the answer ``text`` cites."""
    out = []
    for r in results or ():
        start = text.find(r.url)
        if start >= 0:
            out.append({"type": "url_citation", "url_citation": {
                "start_index": start, "end_index": start + len(r.url), "url": r.url,
                "title": r.title}})
    return out


def chat_with_search(chat, body, client=""):
    """(results, body with them as context) for a chat request's ``web_search_options``: the
    last user turn searched, the search counted like the others."""
    query = ""
    for message in reversed(body["messages"]):
        if message.get("role") == "user":
            content = message.get("content")
            query = content if isinstance(content, str) else " ".join(
                p.get("text") or "" for p in content or () if isinstance(p, dict))
            break
    query = query.strip()[:400]
    _backend, results, error = counted_search(chat, query, client)
    return results, search_context(body, query, results, error)


SEARCH_ROUNDS = 5  # searches a model may run in one answer before it must answer


def model_searcher(chat, client=""):
    """A search a model asked for (a hosted web_search tool run here): query -> (URLs, the
    text the model is given), failures as text; counted like every search."""
    def search(query):
        _backend, results, error = counted_search(chat, query, client)
        if error is not None:
            return [], "The web search could not run: %s" % error
        return [r.url for r in results], result_lines(results) or "No results."
    return search


# --- fetching a page for a client: public addresses only ------------------------------------------

FETCH_MAX_BYTES = 2 << 20   # a fetched page is cut here
FETCH_REDIRECTS = 5


# IPv6 prefixes that carry an IPv4 address in their last 32 bits, delivered to it: NAT64's
# (RFC 6052 and RFC 8215).  Mapped (::ffff:a.b.c.d) and 6to4 (2002:AABB:CCDD::) have their own
# properties; Teredo's 2001::/32 is never global.
_NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
# IETF protocol assignments (RFC 6890), not globally reachable: Python's tables before 3.13
# call some of them global.
_IETF_V4 = ipaddress.ip_network("192.0.0.0/24")


def public_address(address):
    """Whether a fetch may connect to ``address``: a global one, not private, shared (CGNAT),
    loopback, link-local (cloud metadata at 169.254.169.254), multicast, reserved, site-local
    or unspecified; for IPv6 that carries an IPv4 address (mapped, 6to4, NAT64), that one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6:
        if ip.is_site_local:
            return False
        ip = ip.ipv4_mapped or ip.sixtofour or next(
            (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) for net in _NAT64_PREFIXES
             if ip in net), ip)
    return ip.is_global and ip not in _IETF_V4 and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or
        ip.is_reserved or ip.is_unspecified)


class FetchRefused(ProxyError):
    """A page the proxy will not fetch for a client (or could not): the tool's error form."""

    status, code = 400, "url_not_accessible"


def fetch_page(url, config, resolve=None, permitted=public_address, timeout=10):
    """(final url, content type, text) of a web page fetched for a client: http(s) only, every
    address checked after DNS resolution and connected to as checked (no second lookup), every
    redirect checked again, FETCH_MAX_BYTES and ``timeout`` at most; HTML reduced to text."""
    resolve = resolve or socket.getaddrinfo
    for _hop in range(FETCH_REDIRECTS + 1):
        if not _is_http_url(url):  # (and a URL urlsplit can't read, or a port out of range)
            raise FetchRefused("only http and https URLs can be fetched: %r" % url[:200])
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = [info[4][0] for info in resolve(parts.hostname, port, 0,
                                                         socket.SOCK_STREAM)]
        except (OSError, UnicodeError) as e:
            raise FetchRefused("cannot resolve %s: %s" % (parts.hostname, e)) from None
        if not addresses or not all(permitted(a) for a in addresses):
            raise FetchRefused("%s resolves to a private, loopback or link-local address; "
                               "only public pages are fetched" % parts.hostname)
        status, location, kind, raw = _fetch_once(parts, addresses[0], port, config, timeout)
        if 300 <= status < 400 and location:
            url = urllib.parse.urljoin(url, location)
            continue
        if status != 200:
            raise FetchRefused("%s answered HTTP %d" % (parts.hostname, status))
        return url, kind, page_text(kind, raw)
    raise FetchRefused("more than %d redirects" % FETCH_REDIRECTS)


def _fetch_once(parts, address, port, config, timeout):
    """(status, Location, content type, body) of one GET to ``address`` (already checked),
    naming the host in Host and, for https, in TLS's server name and certificate check."""
    client = http_client()

    class Pinned(client.HTTPConnection):
        def connect(self):
            sock = socket.create_connection((address, port), timeout)
            if parts.scheme == "https":
                sock = tls_context(config.ca_file).wrap_socket(
                    sock, server_hostname=parts.hostname)
            self.sock = sock
    connection = Pinned(parts.hostname, port, timeout=timeout)
    try:
        connection.request("GET", (parts.path or "/") + ("?" + parts.query if parts.query
                                                         else ""),
                           headers={"User-Agent": "iflow-proxy/" + __version__,
                                    "Accept": "text/html, text/plain, */*"})
        answer = connection.getresponse()
        kind = (answer.getheader("Content-Type") or "").split(";")[0].strip().lower()
        raw = answer.read(FETCH_MAX_BYTES) if answer.status == 200 else b""
        return answer.status, answer.getheader("Location"), kind, raw
    except (OSError, client.HTTPException) as e:
        raise FetchRefused("fetching %s failed: %s" % (parts.hostname, e)) from None
    finally:
        connection.close()


def page_text(kind, raw):
    """A fetched body as text: HTML without its scripts, styles and tags; text as it is."""
    text = raw.decode("utf-8", "replace")
    if kind in ("text/html", "application/xhtml+xml"):
        text = re.sub(r"(?is)<(script|style|noscript)\b.*?</\1\s*>", " ", text)
        title = re.search(r"(?is)<title[^>]*>(.*?)</title>", text)
        body = html_text(re.sub(r"(?i)<(br|/p|/div|/h[1-6]|/li|/tr)\b[^>]*>", "\n", text))
        return ("%s\n\n%s" % (html_text(title.group(1)), body)).strip() if title else body
    if kind.startswith("text/") or kind in ("application/json", "application/xml", ""):
        return text
    raise FetchRefused("unsupported content type %s" % kind)


def web_fetch_only(body):
    """Whether every tool a Messages request offers is a server web-fetch tool
    (``web_fetch_*``)."""
    tools = body.get("tools") or []
    return bool(tools) and all(isinstance(t, dict) and str(t.get("type") or "").startswith(
        "web_fetch_") for t in tools)


_URL = re.compile(r"https?://[^\s<>\"')\]]+")


def web_fetch_message(model, url, fetched=None, error=None, estimate=0):
    """The Anthropic message a web fetch tool answers with: server_tool_use, then its
    web_fetch_tool_result (the page as a text document, or the error form), then the text."""
    result, summary = fetch_blocks(fetched, error)
    return server_tool_message(model, "web_fetch", {"url": url}, result, summary, estimate,
                               error is None)


def fetch_blocks(fetched, error, code=None):
    """(the web_fetch_tool_result's content, the text for the model) of one fetch: the page as
    a text document, or the error form (``code``, else one that fits ``error``)."""
    if error is None:
        final, _kind, text = fetched
        result = {"type": "web_fetch_result", "url": final, "retrieved_at":
                  time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "content": {
                      "type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                     "data": text}}}
        return result, text[:4000]
    code = code or ("unsupported_content_type" if "content type" in error else
                    "url_not_accessible")
    return ({"type": "web_fetch_tool_error", "error_code": code},
            "The page could not be fetched: %s" % error)


def counted_fetch(chat, config, url, client="", allowed=(), blocked=(), refused=None,
                  resolve=None):
    """(page, error) of one fetch for a client (none when ``refused`` says why not), counted
    in usage per client key."""
    started, fetched, error = time.monotonic(), None, refused
    if error is None and not domain_allowed(url, allowed, blocked):
        error = "the tool's allowed_domains / blocked_domains rule out %s" % url
    if error is None:
        try:
            if not url:
                raise FetchRefused("the request names no http(s) URL to fetch")
            fetched = fetch_page(url, config, resolve=resolve)
        except FetchRefused as e:
            error = e.message
            log.info("web fetch refused: %s", error)
    chat.usage.record("web-fetch", "fetch", 200 if error is None else 400, None,
                      (time.monotonic() - started) * 1000, client)
    return fetched, error


def answer_web_fetch(handler, body, resolve=None):
    """Answer a web-fetch-only Messages request by fetching the URL its last user turn names."""
    chat, tool = handler.server.chat, next(iter(body["tools"]))
    found = _URL.search(search_query(body))
    url = found.group(0) if found else ""
    fetched, error = counted_fetch(
        chat, handler.server.config, url, handler.client_name(),
        tool.get("allowed_domains") or (), tool.get("blocked_domains") or (),
        "the tool allows no fetches (max_uses 0)" if tool.get("max_uses") == 0 else None,
        resolve)
    message = web_fetch_message(body["model"], url, fetched, error,
                                count_request_tokens(body, chat.token_estimates))
    handler.log_fields["model"] = "web_fetch"
    write_message(handler, body, message)


# --- server tools beside the client's own: offered upstream as functions, run here ---------------

SERVER_TOOL_FUNCTIONS = {  # kind -> (description, input schema) of the function offered upstream
    "web_search": ("Search the web. Returns the title, URL and a snippet of each page found; "
                   "cite the pages you use by their URLs.",
                   {"type": "object", "properties": {"query": {
                       "type": "string", "description": "what to search for"}},
                    "required": ["query"]}),
    "web_fetch": ("Fetch a web page by its http(s) URL and return its text.",
                  {"type": "object", "properties": {"url": {
                      "type": "string", "description": "the page's URL"}}, "required": ["url"]}),
}


def server_tool_kind(tool):
    """"web_search" or "web_fetch" for such a server tool (``web_search_*``, any date)."""
    kind = str(tool.get("type") or "") if isinstance(tool, dict) else ""
    return next((k for k in SERVER_TOOL_FUNCTIONS if kind.startswith(k + "_")), None)


class ServerTools:
    """The server tools (web search, web fetch) of a Messages request that offers other tools
    too: each is offered upstream as a function of its name, and each call the model makes is
    run here (at most the tool's ``max_uses`` times) and counted like the others, so the model
    goes on with the results (see write_anthropic_served)."""

    # server-tool calls one answer may make whatever the tools' max_uses (a model that asks
    # for a hundred searches at once gets the error form past these)
    MAX_CALLS = 20

    def __init__(self, tools, native_search=False):
        self.tools = {}  # function name -> (kind, the client's tool)
        for tool in tools or ():
            kind = server_tool_kind(tool)
            if kind and not (kind == "web_search" and native_search):
                self.tools[str(tool.get("name") or kind)] = (kind, tool)
        self.used = collections.Counter()

    def offered(self, body):
        """``body`` with each server tool run here offered as a function tool."""
        tools = []
        for tool in body["tools"]:
            name = str(tool.get("name") or server_tool_kind(tool))
            if server_tool_kind(tool) and name in self.tools:
                description, schema = SERVER_TOOL_FUNCTIONS[self.tools[name][0]]
                tool = {"name": name, "description": description, "input_schema": schema}
            tools.append(tool)
        return dict(body, tools=tools)

    def run(self, chat, config, name, arguments, client="", resolve=None):
        """(kind, input, result content, text for the model) of one call the model made."""
        kind, tool = self.tools[name]
        args = tool_input(arguments, name) or {}
        self.used[name] += 1
        limit = tool.get("max_uses")
        limit = min(limit, self.MAX_CALLS) if isinstance(limit, int) else self.MAX_CALLS
        over = "this answer may use %s at most %d times" % (kind, limit) \
            if self.used[name] > limit or sum(self.used.values()) > self.MAX_CALLS else None
        allowed, blocked = tool.get("allowed_domains") or (), tool.get("blocked_domains") or ()
        if kind == "web_search":
            query = str(args.get("query") or "")[:400]
            _backend, results, error = counted_search(chat, query, client, allowed, blocked,
                                                      over)
            return (kind, {"query": query}) + search_blocks(
                query, results, error, "max_uses_exceeded" if over else "unavailable")
        url = str(args.get("url") or "")
        fetched, error = counted_fetch(chat, config, url, client, allowed, blocked, over,
                                       resolve)
        return (kind, {"url": url}) + fetch_blocks(fetched, error,
                                                   "max_uses_exceeded" if over else None)


def served_tools(chat, body, model):
    """(ServerTools, the body with them offered as functions) for a Messages request for
    ``model`` with server tools that run here, else (None, the body): no such tool, or only a
    web search and an upstream that serves the model runs it."""
    if not any(server_tool_kind(t) for t in body.get("tools") or ()):
        return None, body
    served = ServerTools(body["tools"], chat.searches_upstream(model))
    return (served, served.offered(body)) if served.tools else (None, body)


# ==================================================================================================
# Exchange: one chat exchange end to end (resolve, account, send, classify, fail over, record)
# ==================================================================================================

class ChatExchange:
    """One chat exchange, from the client's request to the recorded outcome.

        exchange = service.exchange(ChatRequest(api, body), conversation, cancelled=...)
        try:
            exchange.open()                      # resolve, acquire, send, classify, fail over
            for data, chunk in exchange.chunks(): ...          # or exchange.answer.payload
        finally:
            exchange.close()                     # release the account, record usage

    open() tries the model's accounts — of any provider and either protocol — until one answers
    well (failover happens only here, before any byte reached the client); a key that upstream
    rejects is renewed once; a legacy model name is retried once as its canonical name; an
    output limit upstream names is learnt and retried once; when no account is left the next
    model of the ``model_fallbacks`` chain is tried.  close() records the outcome exactly once.
    """

    def __init__(self, service, request, conversation, cancelled=None):
        self.service, self.request, self.conversation = service, request, conversation
        self.thinking, self.effort, self.cancelled = request.thinking, request.effort, cancelled
        self.stream = request.stream
        self.asked = request.model
        self.account = None        # holds a router slot from open() until close()
        self.model = None          # the model that answered
        self.protocol = None       # what the answering upstream speaks
        self.attempts = 0
        self.answer = None         # the UpstreamAnswer being relayed
        self.error = None          # what went wrong after the answer began
        self.abort_reason = None
        self.started = time.monotonic()
        self._connection = None    # the upstream connection, then response, in use (abort())
        self._closed = self._released = self._settled = False

    # --- opening ---------------------------------------------------------------------------
    def open(self):
        """Send the request upstream and classify the answer's head; returns self."""
        chain = model_chain(self.asked, self.service.config.model_fallbacks)
        failure = None
        for i, asked in enumerate(chain):
            try:
                return self._open_model(asked)
            except ModelNotAllowed:
                if failure is None:  # the model asked for: the client hears why
                    raise
                log.info("fallback %s is not allowed for this client key; skipped", asked)
            except (RateLimited, NotFound, NoAccount, UpstreamError) as e:
                later = chain[i + 1:]
                if not later or isinstance(e, UpstreamError) and not e.retry_other_account:
                    raise
                failure = e
                log.info("model %s can't answer now (%s); trying %s", asked, e.message, later[0])
        raise failure  # every later model was one the client key may not use

    def _open_model(self, requested):
        pinned, model, fallback, hint = self.service.resolve(requested)
        if hint is not None:  # an explicit model suffix wins
            self.effort, self.thinking = hint, hint != "none"
        self.request.check_model(model)
        if fallback is not None:
            try:
                self.request.check_model(fallback)
            except ModelNotAllowed:
                fallback = None  # a canonical name the key may not use is not tried
        self._check_size(model)
        tried, last = set(), None
        limit = self.service.config.max_attempts or None
        while limit is None or len(tried) < limit:
            try:
                account = self.service.router.acquire(model, pinned, self.conversation, tried,
                                                      self.cancelled, self.request.lane)
            except (RateLimited, NotFound):
                if not fallback:
                    raise
                log.info("model %s is cooling down on every account; using %s", model, fallback)
                model, fallback, tried = fallback, None, set()
                continue
            if account is None:
                break
            tried.add(account.id)
            try:
                self.answer = self._try_account(account, [model] + ([fallback] if fallback
                                                                    else []))
                self.service.opened(self)
                if self.answer.payload is not None:  # read whole: settled before it is written
                    self.settle()
                return self
            except UpstreamError as e:
                if self.cancelled is not None and self.cancelled():
                    raise ClientGone()
                last = e
                if not e.retry_other_account:
                    break
        raise self._give_up(last, model, pinned)

    def _try_account(self, account, names):
        """Answer on one account: each model name in turn (a legacy name's canonical one after
        a refusal), renewing a rejected key once and learning an output limit upstream names
        once.  The slot is released unless it answered."""
        renewed = relimited = False
        try:
            while True:
                name = names[0]
                try:
                    answer = self._send(account, name)
                except UpstreamError as e:
                    if self.abort_reason is not None:  # the client left: not the account's fault
                        raise ClientGone()
                    self._failed(account, name, e)
                    if not relimited and e.kind == "bad_request" and \
                            self.service.learn_output_limit(account, name, e.message):
                        relimited = True
                        continue
                    if not renewed and e.kind in ("key_expired", "auth") and \
                            account.kind in ("oauth", "cookie"):
                        renewed, fresh = True, self.service.renew(account)
                        if fresh is not None:  # same account, new key: once more
                            account = fresh
                            continue
                    if e.kind != "bad_request":
                        self.service.router.record_failure(account, name, e)
                    if e.kind == "context_length":
                        self._too_long(e, name, account.provider_name)
                    if len(names) > 1 and e.kind in ("model_unsupported", "rejected"):
                        log.info("model %s unavailable upstream; retrying once as %s", name,
                                 names[1])
                        names = names[1:]
                        continue
                    raise
                self.service.router.record_success(account, name)
                self.account, self.model, account = account, name, None
                self.protocol = answer.protocol
                return answer
        finally:
            if account is not None:
                self.service.router.release(account)

    def _send(self, account, model):
        """One attempt: shape (and sign) the body for the account's provider and protocol, send
        it, read and check the answer's head."""
        self.attempts += 1
        config, service = self.service.config, self.service
        preset = PROVIDERS.get(account.provider_name)
        protocol = "responses" if self._native(account, preset) else account.protocol
        url, headers, body = self._shape(account, model, preset, protocol)
        response = service.upstream.open("POST", url, headers, json_bytes(body),
                                         watch=self._watch)
        if protocol == "responses" and response.status in (404, 405):
            response.close()  # this base URL has no Responses endpoint: chat from now on
            log.info("account %s has no Responses endpoint (%s); translating to chat",
                     account.nickname, response.status)
            service.without_responses.add(account.id)
            protocol = account.protocol
            url, headers, body = self._shape(account, model, preset, protocol)
            response = service.upstream.open("POST", url, headers, json_bytes(body),
                                             watch=self._watch)
        if response.trace_id:
            log.debug("upstream eagleeye-traceid %s", printable(response.trace_id))
        answer = UpstreamAnswer(response, self.stream, (account.api_key,), config.max_body_bytes,
                                protocol=protocol, check=response_problem).open()
        if answer.payload is not None and preset is not None and \
                "reasoning_passback" in preset.quirks and protocol == "openai":
            service.reasoning.remember_completion(answer.payload)
        return answer

    def _native(self, account, preset):
        """Send a Responses request as it is: the provider serves the Responses API itself
        (its preset says so) at this account's base URL, as far as we know."""
        return self.request.responses is not None and account.protocol == "openai" and \
            preset is not None and "responses_native" in preset.quirks and \
            not account.signing and account.id not in self.service.without_responses

    def _shape(self, account, model, preset, protocol):
        """(url, headers, body) of one attempt in ``protocol``."""
        config, service = self.service.config, self.service
        limit = service.output_limit(account, model)
        base = account.api_base(config)
        if protocol == "responses":
            body = clamp_output(dict(self.request.responses, model=model), limit,
                                ("max_output_tokens",))
            return base + "/responses", upstream_headers(account, config, "", "",
                                                         clock=service.clock), body
        if protocol == "anthropic":
            body = shape_messages_body(self.request.anthropic(), model, limit,
                                       preset.rejects if preset else (),
                                       "web_search_native" in preset.quirks if preset
                                       else False)
            return base + "/v1/messages", anthropic_headers(account, preset), body
        body = shape_provider_body(self.request.openai(), model, account, self.thinking,
                                   self.effort, limit, config.models)
        if preset is not None and "reasoning_passback" in preset.quirks:
            body["messages"] = service.reasoning.restore(body["messages"])
        session, conversation = service.session_ids(account.id, self.conversation) \
            if account.signing else ("", "")  # only iFlow's signed requests carry them
        return base + "/chat/completions", upstream_headers(account, config, session,
                                                            conversation,
                                                            clock=service.clock), body

    def _check_size(self, model):
        """Answer "too long" at once, with no upstream call, when the estimate is far over the
        model's window (beyond any error of the estimate)."""
        window = self.service.window(model)
        if not window or self.request.size and self.request.size < window:
            return  # fewer bytes than the window has tokens: it can't be far over
        tokens = self.service.prompt_tokens(self.request, model)
        if tokens > window * 1.2 + 1000:
            raise self._too_long(UpstreamError(
                "context_length", "the request is about %d tokens, far over the %d-token window "
                "of %s; not sent upstream" % (tokens, window, model)), model)

    def _too_long(self, error, model, provider=""):
        """Give an input-too-long error its size and the model's window (see too_long_message):
        upstream's own figures when it names them, else the estimate and the table."""
        found = too_long_figures(error.message)
        tokens = found[0] if found else self.service.prompt_tokens(self.request, model)
        window = found[1] if found else \
            self.service.spec(model, provider).window if provider else \
            self.service.window(model) or UNKNOWN_MODEL.window
        error.tokens, error.window = max(tokens, window + 1), window  # upstream said: over
        return error

    def _watch(self, connection):
        self._connection = connection
        if self.abort_reason is not None:
            self.abort(self.abort_reason)

    def _failed(self, account, model, error):
        error.message = "account %s: %s" % (account.nickname, error.message)
        if error.kind == "bad_request":  # the request's fault (a feature this upstream lacks)
            log.info("upstream refused the request (model %s): %s", model, error.message)
            return
        log.warning("upstream error (%s, model %s): %s%s", error.kind, model, error.message,
                    " [eagleeye-traceid %s]" % error.trace_id if error.trace_id else "")
        self.service.usage.record(account.nickname, model, error.upstream_status or error.status,
                                  None, (time.monotonic() - self.started) * 1000)

    def _give_up(self, last, model, pinned):
        """The error for the client once no account is left to try."""
        if last is None:
            return NoAccount("no account left to try for model %s" % model)
        router = self.service.router
        if last.status == 429:  # every account said "later": say when the soonest frees up
            eligible, now = router.eligible(model, pinned), router.clock()
            if all(router.cooling_until(a, model, now) for a in eligible):
                return router.cooling_error(model, eligible, now)
        return last

    # --- reading, aborting, closing --------------------------------------------------------
    def chunks(self):
        """The answer's chunks, ``(data bytes, chunk)``, each checked (UpstreamAnswer.chunks)."""
        preset = PROVIDERS.get(self.account.provider_name) if self.account else None
        heard = ReasoningHeard() if preset is not None and self.protocol == "openai" and \
            "reasoning_passback" in preset.quirks and self.answer.payload is None else None
        try:
            for item in self.answer.chunks():
                if heard is not None:
                    heard.feed(item[1])
                yield item
            if heard is not None:
                self.service.reasoning.remember(heard.tool_ids, "".join(heard.reasoning))
        except UpstreamError:
            if self.cancelled is not None and self.cancelled():
                raise ClientGone()
            if self.abort_reason is not None:
                raise UpstreamError("transient", self.abort_reason)
            raise

    def abort(self, reason):
        """Cut the upstream connection now, from any thread (client gone, proxy stopping)."""
        self.abort_reason = reason
        target = self._connection
        if target is not None:
            target.abort()

    def fail(self, error):
        """Note a failure after the answer began (the relay reports it to the client)."""
        self.error = error.message
        log.warning("stream failed mid-way: %s", error.message)

    def close(self):
        """Drop an unfinished upstream answer, free the account, record the outcome; once."""
        if self._closed:
            return
        self._closed = True
        if self.answer is not None:
            self.answer.close()
        self.settle()

    def settle(self):
        """Free the account and record the outcome, once: as soon as a JSON answer was read
        whole, or before a stream's end is written (so a client's next request already sees
        this one counted), else at close()."""
        if self.account is not None and not self._settled:
            self._settled = True
            self.service.closed(self)
            self._release()
            usage = self.usage  # (worked out once: an estimate when upstream's never came)
            if self.request.api == "anthropic" and usage and not self.error and \
                    not usage.get("estimated"):
                self.service.calibration.observe(self.model, self.request.tokens(),
                                                 usage.get("prompt_tokens"))
            self.service.usage.record(self.account.nickname, self.model,
                                      502 if self.error else 200, usage,
                                      (time.monotonic() - self.started) * 1000,
                                      self.request.client,
                                      self.service.cost(self.account, self.model, usage))

    def _release(self):
        if not self._released:
            self._released = True
            self.service.router.release(self.account)

    @property
    def usage(self):
        answer = self.answer
        return answer.relayed_usage(self.request.tokens, self.service.token_estimates) \
            if answer is not None else None


class ProbeResult:
    """What one tiny signed request says about an account's upstream."""

    def __init__(self, account, latency_ms=None, error=None, http_status=None):
        self.account, self.latency_ms, self.error, self.http_status = \
            account, latency_ms, error, http_status

    @property
    def reachable(self):
        return self.error is None or self.error.kind not in ("unreachable", "timeout")

    @property
    def key_verdict(self):
        kind = self.error.kind if self.error else None
        if not self.reachable:
            return "not checked"
        return {"key_expired": "expired (439): log in again or use a fresh key",
                "key_blocked": "blocked or invalid (434/438): this key cannot be used",
                "auth": "rejected (HTTP %s)" % (self.error.upstream_status if self.error else ""),
                "rejected": "unknown (request refused with 406)",
                "transient": "unknown (upstream server error)"}.get(kind, "accepted")

    @property
    def key_ok(self):
        return self.key_verdict == "accepted"

    @property
    def signature_verdict(self):
        if not self.account.signing:
            return "off (plain OpenAI-compatible upstream)"
        kind = self.error.kind if self.error else None
        if not self.reachable or kind in ("key_expired", "key_blocked", "auth", "transient"):
            return "not checked"
        return "rejected (406): check user_agent/extra_headers" if kind == "rejected" \
            else "accepted"


def probe_model(account, config):
    """The model a probe asks for: config probe_model for iFlow and custom upstreams, else the
    provider's small (haiku-family) model."""
    preset = PROVIDERS.get(account.provider_name)
    return config.probe_model if preset is None or account.provider_name == "iflow" \
        else preset.claude["haiku"]


def probe_account(account, config, upstream, clock=time.monotonic):
    """Send the smallest possible chat request with ``account`` and classify the answer."""
    body = {"model": probe_model(account, config), "max_tokens": 1, "stream": False,
            "messages": [{"role": "user", "content": "ping"}]}
    base = account.api_base(config)
    if account.protocol == "anthropic":
        url, headers = base + "/v1/messages", anthropic_headers(
            account, PROVIDERS.get(account.provider_name))
    else:
        sid, cid = conversation_ids(account.id, "probe")
        url, headers = base + "/chat/completions", upstream_headers(account, config, sid, cid)
    started = clock()
    try:
        resp = upstream.open("POST", url, headers, json.dumps(body).encode("utf-8"))
        latency = (clock() - started) * 1000
        UpstreamAnswer(resp, False, (account.api_key,), SSE_HEAD_LIMIT,
                       protocol=account.protocol).open()
        return ProbeResult(account, latency, None, resp.status)
    except UpstreamError as e:
        return ProbeResult(account, (clock() - started) * 1000, e, e.upstream_status)


def service_verdict(result):
    """A plain word on an upstream that is gone, or None."""
    message = result.error.message if result.error else ""
    live = ", ".join(p for p in PROVIDERS if p != "iflow")
    if result.account.provider_name == "iflow" and not result.reachable:
        return ("iFlow's CLI service ended on 2026-04-17 and its API has not answered since; "
                "providers that live: %s (python iflow_proxy.py providers)" % live)
    if re.search(r"name or service not known|nodename nor servname|getaddrinfo|"
                 r"temporary failure in name resolution|no address associated", message, re.I):
        return "the host name does not resolve (DNS): check the base URL and your network"
    if re.search(r"deprecat|no longer supported|discontinued", message, re.I):
        return "upstream says this auth method or API is deprecated; providers that live: " + live
    return None


class ReasoningHeard:
    """What a streamed answer said in reasoning_content, and the ids of its tool calls."""

    def __init__(self):
        self.reasoning, self.tool_ids = [], []

    def feed(self, chunk):
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if type(choice) is dict else None
            if type(delta) is not dict:
                continue
            if isinstance(delta.get("reasoning_content"), str):
                self.reasoning.append(delta["reasoning_content"])
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    self.tool_ids.append(call["id"])


class ReasoningMemory:
    """The reasoning behind tool calls that answers carried, to send back when a client drops it.

    DeepSeek's thinking mode answers 400 unless every later request carries the
    reasoning_content of each assistant turn that made tool calls, and most OpenAI clients drop
    that field.  Keyed by tool-call id, bounded.
    """

    def __init__(self, size=4096):
        self._by_call, self._size, self._lock = {}, size, threading.Lock()

    def remember(self, tool_ids, reasoning):
        if not reasoning or not tool_ids:
            return
        with self._lock:
            for tool_id in tool_ids:
                self._by_call[tool_id] = reasoning
            trim_oldest(self._by_call, self._size)

    def remember_completion(self, completion):
        for choice in completion.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
                self.remember([c.get("id") for c in message["tool_calls"]
                               if isinstance(c, dict) and isinstance(c.get("id"), str)],
                              message.get("reasoning_content"))

    def restore(self, messages):
        """``messages`` with the remembered reasoning put back where a client left it out."""
        out = []
        for message in messages:
            calls = message.get("tool_calls") if message.get("role") == "assistant" else None
            if calls and not message.get("reasoning_content"):
                with self._lock:
                    found = next((self._by_call[c.get("id")] for c in calls
                                  if isinstance(c, dict) and c.get("id") in self._by_call), None)
                if found:
                    message = dict(message, reasoning_content=found)
            out.append(message)
        return out


MODELS_LIST_TIMEOUT = 15  # seconds a provider's /models list may take to answer


class ModelCatalog:
    """Every usable account's /models, cached per base URL for models_cache_ttl: the models it
    serves (its preset's table, or iFlow's built-in list, when upstream can't say), the limits
    it reports of models no table knows (``reported``) and the prices it lists."""

    def __init__(self, config, router, clock=time.monotonic):
        self.config, self.router, self._clock = config, router, clock
        self._cache = {}
        self._lock = threading.Lock()
        self.reported = {}         # lower-case model -> Model an upstream's list gave
        self.reported_prices = {}  # lower-case model -> a price an upstream's list gave

    def ids(self):
        """The models of the usable accounts (default first), then the config's own models
        and aliases; the built-in list when there is no account."""
        accounts = [a for a in sorted(self.router.all_accounts(), key=lambda a: not a.default)
                    if a.usable]
        ids = [] if accounts else list(BUILTIN_MODELS)
        for account in accounts:
            ids.extend(self.listed(account))
        models = self.config.models
        ids.extend(n for n in models if not any(c in n for c in "*?["))
        ids.extend(a for entry in models.values() for a in entry.get("aliases", ()))
        ids.extend(self.config.model_aliases)
        return list(dict.fromkeys(ids))

    def listed(self, account):
        """The models ``account`` serves: what its upstream lists, else its preset's table."""
        found = self.fetch(account)
        if found is not None:
            return found
        preset = PROVIDERS.get(account.provider_name)
        return tuple((preset.models if preset else None) or BUILTIN_MODELS)

    def fetch(self, account, fresh=False):
        """The model ids ``account``'s upstream lists (cached), or None when it can't say."""
        base = account.api_base(self.config)
        now = self._clock()
        with self._lock:
            cached = self._cache.get(base)
            if cached and cached[0] > now and not fresh:
                return cached[1]
        ttl = self.config.models_cache_ttl
        try:
            entries = self._entries(account, base)
        except UpstreamError as e:
            log.info("account %s: upstream /models failed (%s); using the table's list",
                     account.nickname, e.message)
            entries = None  # (and not asked again before the ttl is over)
        ids = None
        if entries is not None:
            ids = tuple(e["id"] for e in entries)
            with self._lock:
                for entry in entries:
                    name = entry["id"].lower()
                    spec, price = listed_model(entry)
                    # the table's limits stand, but the price the one who bills lists is newer
                    if spec is not None and (account.provider_name, name) not in MODEL_SPECS:
                        self.reported[name] = spec
                    if price is not None:
                        self.reported_prices[name] = price
                trim_oldest(self.reported, 5000)
                trim_oldest(self.reported_prices, 5000)
        with self._lock:
            self._cache[base] = (now + ttl, ids)
        return ids

    def _entries(self, account, base):
        """The entries (dicts with a usable id) of the account's /models answer."""
        if account.protocol == "anthropic":
            url, headers = base + "/v1/models", anthropic_headers(
                account, PROVIDERS.get(account.provider_name))
        else:
            sid, cid = conversation_ids(account.id, "models")
            url, headers = base + "/models", upstream_headers(account, self.config, sid, cid)
        # a list may be read in a client's request (see ChatService.output_limit): it gets
        # MODELS_LIST_TIMEOUT, not the minutes an answer may take
        bound = min(MODELS_LIST_TIMEOUT, self.config.first_byte_timeout)
        client = UpstreamClient(self.config.replace(
            first_byte_timeout=bound, idle_timeout=min(bound, self.config.idle_timeout)))
        try:
            resp = client.open("GET", url, headers)
            payload = classify_answer(resp.status, resp.read_all(MAX_EVENT_BYTES),
                                      resp.trace_id, secrets=(account.api_key,))
        finally:
            client.close()
        entries = [m for m in payload.get("data", []) if isinstance(m, dict) and
                   isinstance(m.get("id"), str) and 0 < len(m["id"]) <= MAX_MODEL_NAME and
                   m["id"].isprintable()] if isinstance(payload.get("data"), list) else []
        if not entries:
            raise UpstreamError("malformed", "upstream /models listed no models")
        return entries


def _listed_int(*values):
    return next((v for v in values if type(v) is int and v > 0), None)


def listed_model(entry):
    """(Model or None, price or None) that one /models entry reports.  OpenRouter's
    (https://openrouter.ai/docs/models): context_length, top_provider.max_completion_tokens,
    architecture.input_modalities, pricing in USD per token (prompt, completion,
    input_cache_read, input_cache_write); vLLM's max_model_len; the like-named fields others
    use.  A Model only when a window is reported."""
    top = entry.get("top_provider") if isinstance(entry.get("top_provider"), dict) else {}
    window = _listed_int(entry.get("context_length"), top.get("context_length"),
                         entry.get("context_window"), entry.get("max_model_len"),
                         entry.get("max_context_length"), entry.get("max_input_tokens"))
    output = _listed_int(top.get("max_completion_tokens"), entry.get("max_completion_tokens"),
                         entry.get("max_output_tokens"), entry.get("max_tokens"))
    architecture = entry.get("architecture") if isinstance(entry.get("architecture"),
                                                           dict) else {}
    modalities = architecture.get("input_modalities") or entry.get("input_modalities") or ()
    spec = Model(window, min(output or UNKNOWN_MODEL.output, window), None,
                 "image" in modalities if isinstance(modalities, list) else False) \
        if window else None
    pricing = entry.get("pricing") if isinstance(entry.get("pricing"), dict) else {}
    price = {}
    for rate, field in (("input", "prompt"), ("output", "completion"),
                        ("cache_read", "input_cache_read"), ("cache_write", "input_cache_write")):
        try:
            value = float(pricing[field]) * 1e6
        except (KeyError, TypeError, ValueError):
            continue
        if 0 <= value <= 1e6:  # (not NaN or infinite: a list is upstream's to get wrong)
            price[rate] = round(value, 6)
    return spec, (dict(price, currency="USD") if "input" in price and "output" in price
                  else None)


def model_description(model, accounts, spec_of=model_spec):
    """"deepseek-v4-flash — DeepSeek, 1048576-token window" for a model list; ``spec_of(model,
    provider)`` gives the model's figures."""
    provider = next((a.provider_name for a in accounts if a.usable and serves(a, model)), "")
    spec = spec_of(model, provider)
    title = PROVIDERS[provider].title if provider in PROVIDERS else "custom upstream"
    return "%s — %s, %d-token context window" % (model, title, spec.window)


def models_response(ids, api, accounts=(), families=None, spec_of=model_spec):
    """The model list in the client's format, each with its window.  Anthropic's carries a
    description naming the provider and window, and one entry per Claude family (Claude
    Code's /model picker offers only names that start with "claude"), each saying which model
    it maps to; OpenAI's the window and output limit as OpenRouter's list names them."""
    if api != "anthropic":
        return {"object": "list", "data": [dict({"id": i, "object": "model", "created": 0,
                                                 "owned_by": "iflow-proxy"}, **_limits(
                                                     spec_of(i, ""))) for i in ids]}
    data = [{"type": "model", "id": "claude-%s" % family, "display_name": "%s → %s" % (
        family.title(), model), "description": model_description(model, accounts, spec_of),
        "created_at": "1970-01-01T00:00:00Z"} for family, model in (families or {}).items()]
    data += [{"type": "model", "id": i, "display_name": i,
              "description": model_description(i, accounts, spec_of),
              "created_at": "1970-01-01T00:00:00Z"} for i in ids]
    return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def _limits(spec):
    return {"context_length": spec.window, "max_completion_tokens": spec.output}


class ChatService:
    """What every exchange shares: accounts, routing, the upstream pool, usage and caches.

    The server owns one; each chat request gets a ChatExchange from exchange().
    """

    def __init__(self, config, registry=None, upstream=None, env=None, clock=time.time,
                 router_clock=time.monotonic):
        self.config, self.clock = config, clock
        self.registry = registry or AccountRegistry(config.home, pool=pool_accounts(config))
        self.upstream = upstream or UpstreamClient(config, env=env)
        self.router = Router(self.registry, config, clock=router_clock)
        self.usage = UsageBook(os.path.join(config.home, "usage.json"))
        self.refresher = Refresher(self.registry, config, env=env)
        self.registry.listeners.append(self.refresher.wake)
        self.catalog = ModelCatalog(config, self.router)
        self.token_estimates = TokenEstimates()
        self.started_at = time.time()
        self.class_counts = collections.Counter()  # requests by class since start-up
        self._class_lock = threading.Lock()
        self._images = {}           # sha256 of an image -> its description (bounded)
        self._limits = {}           # (account id, model) -> output limit upstream named
        self.reasoning = ReasoningMemory()
        self.responses = ResponseStore(config.responses_store)
        self.web_search = WebSearch(config, env, lambda: self.router.all_accounts())
        self.without_responses = set()  # accounts whose Responses endpoint answered 404
        self.calibration = TokenCalibration(self.usage.extra.get("calibration"))
        self._lock = threading.Lock()
        self._open = set()          # exchanges relaying an answer (stopped at shutdown)
        self._sessions = {}         # (account id, conversation) -> conversation_ids (bounded)
        self._families = (None, {})  # (accounts, claude_families of them)

    def exchange(self, request, conversation, cancelled=None):
        return ChatExchange(self, request, conversation, cancelled)

    def searches_upstream(self, model):
        """Whether a web-search request for ``model`` goes upstream as it is: no search
        backend is set up here (web_search backend auto) and an account that serves the model
        speaks to an Anthropic endpoint that runs the tool itself (preset quirk
        web_search_native)."""
        if (self.config.web_search or {}).get("backend", "auto") != "auto" or \
                self.web_search.configured():
            return False
        return any(a.usable and a.protocol == "anthropic" and serves(a, model) and
                   "web_search_native" in getattr(PROVIDERS.get(a.provider_name), "quirks", ())
                   for a in self.router.all_accounts())

    def session_ids(self, account_id, conversation):
        """conversation_ids(), remembered for the latest 4,096 conversations (two hashes a
        request otherwise)."""
        key = (account_id, conversation)
        ids = self._sessions.get(key)
        if ids is None:
            ids = conversation_ids(account_id, conversation)
            if conversation:  # without one the ids are random: never asked for again
                self._sessions[key] = ids
                if len(self._sessions) > 4096:
                    self._sessions.pop(next(iter(self._sessions)), None)
        return ids

    def prompt_tokens(self, request, model):
        """The request's size in tokens, as the model's upstream has been seen to count."""
        return int(request.tokens(self.token_estimates) * self.calibration.factor(model))

    def apply_config(self, config):
        self.config = self.router.config = self.catalog.config = self.refresher.config = config

    def claude_defaults(self):
        """Claude family -> model for the accounts configured now (see claude_families),
        worked out again only when the accounts change."""
        accounts = self.router.all_accounts()
        known = self._families
        if known[0] is not accounts:
            known = self._families = (accounts, claude_families(accounts, {}))
        return dict(known[1])

    def output_limit(self, account, model):
        """The largest output this account's model allows: learnt from upstream, else the
        config's ``models``, the provider table or what the account's /models reports (read
        on the first request for a model none of them knows), else iFlow's per-family
        limits."""
        with self._lock:
            learnt = self._limits.get((account.id, model))
        if learnt:
            return learnt
        spec = self.spec(model, account.provider_name)
        if spec is UNKNOWN_MODEL and not account.signing and \
                self.catalog.fetch(account) is not None:  # (cached) its list may say
            spec = self.spec(model, account.provider_name)
        if spec is UNKNOWN_MODEL and account.provider_name == "iflow":
            return output_limit(model)
        return spec.output

    def price(self, provider, model):
        """(price, where it comes from) of ``model`` served by ``provider``: a config
        ``models`` entry's, config ``prices``', an upstream list's, the provider table's;
        (None, "") when none says."""
        config = self.config
        entry = custom_model(config.models, model) if config.models else None
        if entry and "prices" in entry:
            return entry["prices"], "config"
        found = config.prices.get(model) if config.prices else None
        if found:
            return found, "config"
        name = model.lower()
        found = self.catalog.reported_prices.get(name)
        if found:
            return found, "provider list"
        found = PROVIDER_PRICES.get(provider, {}).get(name)
        return (found, "table") if found else (None, "")

    def cost(self, account, model, usage):
        """(amount, currency, price source) of an answer's ``usage``, or None (no price)."""
        if not usage:
            return None
        price, source = self.price(account.provider_name, model)
        if price is None:
            return None
        return usage_cost(usage, price, self.clock()), price.get("currency", "USD"), source

    def spec(self, model, provider=""):
        """model_spec with the config's ``models`` and what upstreams' /models reported."""
        return model_spec(model, provider, self.config.models, self.catalog.reported)

    def window(self, model):
        """window_of with the config's ``models`` and what upstreams' /models reported."""
        return window_of(model, self.config.models, self.catalog.reported)

    def learn_output_limit(self, account, model, message):
        """Remember the max_tokens range an upstream error names; True if it named one."""
        limit = max_tokens_range(message)
        if not limit:
            return False
        log.info("account %s: model %s allows at most %d output tokens; retrying with that",
                 account.nickname, model, limit)
        with self._lock:
            self._limits[(account.id, model)] = limit
            trim_oldest(self._limits, 1000)
        return True

    def resolve(self, requested):
        """(pinned nickname, model, fallback model, effort hint) for a requested model name."""
        pinned, name = self.router.split_pin(requested)
        return (pinned,) + resolve_model(name, self.config)

    def renew(self, account):
        """Refresh an account's credentials at once; its new snapshot, or None."""
        log.info("account %s: key rejected upstream; renewing its credentials now",
                 account.nickname)
        if not self.refresher.refresh(account.id, force=True):
            return None
        self.registry.invalidate()
        fresh = self.registry.load(account.id)
        return fresh if fresh is not None and fresh.usable else None

    def opened(self, exchange):
        with self._lock:
            self._open.add(exchange)

    def closed(self, exchange):
        with self._lock:
            self._open.discard(exchange)

    def abort_all(self, reason):
        """Cut every answer still being relayed; each client gets an error event."""
        with self._lock:
            exchanges = list(self._open)
        for exchange in exchanges:
            exchange.abort(reason)
        return len(exchanges)

    def in_flight(self):
        with self._lock:
            return len(self._open)

    # --- images for text-only models -----------------------------------------------------
    def describe_images(self, body, conversation):
        """Replace each image in an OpenAI body with a vision model's description (cached)."""
        for message in body["messages"]:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for i, part in enumerate(content):
                if part.get("type") == "image_url":
                    content[i] = {"type": "text", "text": "[Image, described by %s: %s]" % (
                        self.config.vision_model,
                        self._description(part["image_url"]["url"], conversation))}
            message["content"] = _collapse(content)
        return body

    def _description(self, url, conversation):
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
        with self._lock:
            text = self._images.get(digest)
        if text is None:
            text = self._describe(url, conversation)
            with self._lock:
                self._images[digest] = text
                trim_oldest(self._images, 256)  # history resends old images
        return text

    def _describe(self, url, conversation):
        prompt = ("Describe this image in full detail for someone who cannot see it: all text "
                  "in it verbatim, layout, code, diagrams, numbers, colours and anything notable.")
        request = {"model": self.config.vision_model, "stream": False, "messages": [
            {"role": "user", "content": [{"type": "text", "text": prompt},
                                         {"type": "image_url", "image_url": {"url": url}}]}]}
        exchange = self.exchange(ChatRequest("openai", request), conversation)
        try:
            payload = exchange.open().answer.payload
        finally:
            exchange.close()
        message = ((payload.get("choices") or [{}])[0] or {}).get("message") or {}
        text = message.get("content")
        if not isinstance(text, str) or not text.strip():
            raise UpstreamError("malformed", "vision model %s returned no description"
                                % self.config.vision_model)
        log.info("described an image with %s (%d characters)", self.config.vision_model,
                 len(text))
        return text.strip()

    # --- lifecycle and status ------------------------------------------------------------
    def start(self, stopping, every=60.0):
        """Save usage figures every ``every`` seconds until ``stopping`` is set; renew keys."""
        def loop():
            while not stopping.wait(every):
                self.save_state()
        threading.Thread(target=loop, name="usage-saver", daemon=True).start()
        self.refresher.start()

    def stop(self):
        self.refresher.stop()

    def close(self):
        self.upstream.close()
        self.save_state()
        self.usage.close()

    def save_state(self):
        if self.calibration.changed:
            self.calibration.changed = False
            self.usage.keep("calibration", self.calibration.snapshot())
        try:
            self.usage.save()
        except OSError as e:
            log.error("cannot save usage figures to %s: %s", self.usage.path, e)

    def count_class(self, request_class):
        """One more request of ``request_class`` (shown in /status)."""
        with self._class_lock:
            self.class_counts[request_class] += 1

    def status(self, listen, client_key=None):
        """Everything /status, the dashboard and `status` show; never a secret.  For a
        ``client_key`` of the per-key figures only its own."""
        usage = self.usage.summary()
        today = today_by_account(usage)
        accounts = [self._account_status(a, today) for a in self.router.all_accounts()]
        return {"version": __version__, "uptime_s": int(time.time() - self.started_at),
                "listen": listen, "strategy": self.config.strategy,
                "waiting": self.router.waiting(), "accounts": accounts, "usage": usage,
                "waiting_by_lane": dict(zip(("main", "subagent", "auxiliary"),
                                            self.router.waiting_by_lane().values())),
                "requests_by_class": dict(self.class_counts),
                "token_calibration": self.calibration.status(),
                "series": self.usage.series(),
                "costs": self.usage.costs(client_key.name if client_key else None),
                "clients_today": [r for r in self.usage.client_rows() if r["day"] ==
                                  self.usage.today() and (client_key is None or
                                                          r["client"] == client_key.name)],
                "recent_errors": list(reversed(self.router.recent_errors[-20:]))}

    def _account_status(self, a, today):
        state, cooldowns = self.router.state(a)
        return {"nickname": a.nickname, "kind": a.kind, "email": a.email,
                "key": mask_secret(a.api_key), "default": a.default, "state": state,
                "status_reason": a.status_reason, "in_flight": self.router.in_flight(a),
                "max_concurrency": self.router.limit(a), "priority": a.priority,
                "upstream": a.api_base(self.config), "signing": a.signing,
                "cooldowns": cooldowns, "key_expires": a.expires or None,
                "refresh": self.refresher.state(a), "today": today[a.nickname]}


def today_by_account(summary):
    """Today's requests, failures and tokens per account name (zeros for one with none),
    from UsageBook.summary()."""
    today = collections.defaultdict(lambda: dict.fromkeys(
        ("requests", "failures", "input_tokens", "output_tokens"), 0))
    for row in summary["today"]["rows"]:
        mine = today[row["account"]]
        for key in ("requests", "input_tokens", "output_tokens"):
            mine[key] += row[key]
        mine["failures"] += sum(row["failures"].values())
    return today


# ==================================================================================================
# HTTP server: the listening server, request checks, endpoints, relaying answers to the client
# ==================================================================================================

def check_bind_safety(config):
    if not is_loopback(config.host) and not config.client_keys:
        raise ConfigError("refusing to listen on %s without client keys: anyone who can reach "
                          "it could use your accounts. Set --client-key, IFLOW_PROXY_CLIENT_KEYS "
                          "or config client_keys, or listen on 127.0.0.1" % config.host)


def host_allowed(host_header, config, bound_host):
    """Is ``Host`` a name this server answers to?  (A DNS-rebinding page sends its own.)

    Loopback names, any IP address (rebinding needs a name), the listen address and the names
    in config ``allowed_hosts`` are; a request without Host (HTTP/1.0) is too.
    """
    if not host_header:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in ("localhost", bound_host.lower()) or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    allowed = [h.lower() for h in config.allowed_hosts]
    return "*" in allowed or host in allowed


def cross_site_reason(headers, config):
    """Why a request comes from another site's page, or None (same origin, or no browser).

    Browsers say where a request comes from (``Sec-Fetch-Site``, ``Origin``); SDKs, curl and
    Claude Code send neither.  A form or a ``fetch`` with ``text/plain`` needs no CORS
    preflight, so this check is what keeps a web page from using the user's accounts.
    """
    origin = headers.get("Origin")
    if origin and origin in config.allowed_origins:
        return None
    site = (headers.get("Sec-Fetch-Site") or "").lower()
    if site in ("cross-site", "same-site"):
        return "Sec-Fetch-Site: %s" % site
    if origin:
        try:
            netloc = urllib.parse.urlsplit(origin).netloc
        except ValueError:  # e.g. "http://[x" (an unclosed bracket)
            raise BadRequest("malformed Origin header %r" % origin[:100]) from None
        if origin == "null" or netloc.lower() != (headers.get("Host") or "").lower():
            return "Origin %s" % origin[:100]
    return None


def is_json_content_type(value):
    """Only JSON (or no type at all) reaches the API: the types a page may send without a CORS
    preflight (text/plain, forms) are refused."""
    if not value:
        return True
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and
                                            media.endswith("+json"))


class ClientLimits:
    """Each named client key's own limits: expiry, the models it may use, requests per minute
    and tokens per day (counted by its name in the usage figures)."""

    def __init__(self, usage, clock=time.time):
        self.usage, self.clock = usage, clock
        self._recent = {}   # key name -> times of its requests in the last minute
        self._reserved = {}  # key name -> tokens its requests in flight are expected to use
        self._lock = threading.Lock()

    def check_expiry(self, key):
        """Unauthorized once ``key``'s expiry day has passed (every use of a key asks)."""
        if key.expires and key.expires < time.strftime("%Y-%m-%d",
                                                       time.localtime(self.clock())):
            raise Unauthorized("client key %s expired on %s" % (key.name, key.expires))

    def admit(self, key, model, estimate=lambda: 0):
        """Let a request of ``key`` in, or raise; returns the tokens reserved for it (release
        them with settle() once its usage is recorded).  A tokens_per_day budget counts what
        the key's requests in flight are expected to use (``estimate()``: the prompt), so
        requests sent at once cannot overshoot it."""
        now = self.clock()
        self.check_expiry(key)  # (its model list is checked against the model sent: see
        # ChatRequest.check_model, at every step of the exchange)
        reserved = 0
        if key.tokens_per_day:
            reserved = estimate()
            with self._lock:
                ahead = self._reserved.get(key.name, 0)
                spent = self.usage.client_tokens(key.name) + ahead
                if spent >= key.tokens_per_day or ahead and \
                        spent + reserved > key.tokens_per_day:
                    tomorrow = time.mktime(time.localtime(now)[:3] + (24, 0, 0, 0, 0, -1))
                    raise RateLimited("client key %s used its %d tokens for today%s" % (
                        key.name, key.tokens_per_day, " (counting its requests in flight)"
                        if ahead else ""), retry_after=max(1, int(tomorrow - now)))
                self._reserved[key.name] = ahead + reserved
        if key.rpm:
            try:
                self._count(key, now)
            except RateLimited:
                self.settle(key, reserved)
                raise
        return reserved

    def settle(self, key, reserved):
        """Release what admit() reserved for a finished request (its usage is recorded)."""
        if reserved:
            with self._lock:
                left = self._reserved.get(key.name, 0) - reserved
                if left > 0:
                    self._reserved[key.name] = left
                else:
                    self._reserved.pop(key.name, None)

    def _count(self, key, now):
        with self._lock:
            times = [t for t in self._recent.get(key.name, ()) if t > now - 60]
            if len(times) >= key.rpm:
                self._recent[key.name] = times
                raise RateLimited("client key %s may send %d requests a minute" % (
                    key.name, key.rpm), retry_after=max(1, int(times[0] + 60 - now + 0.999)))
            times.append(now)
            self._recent[key.name] = times


class ManagementGuard:
    """Who may use the management API: the management key, from this machine unless config
    management_allow_remote.

    A request without a key (and, checked before this, one from another site's page) is
    refused without counting as a guess: any web page can send those.  Wrong keys are slowed
    for everyone at once: past the first TRIES in GUESS_WINDOW seconds each one is answered
    after a delay that doubles with every further one (up to MAX_DELAY), one wrong guess at a
    time, so guessing from many addresses gains nothing.  An address of another machine is
    banned for BAN_SECONDS after TRIES wrong keys; this machine's never are, so the owner with
    the right key always gets in."""

    BAN_SECONDS, TRIES, GUESS_WINDOW, MAX_DELAY = 1800, 5, 900, 30.0
    MAX_TRACKED = 1000  # other machines' addresses whose failures are remembered

    def __init__(self, clock=time.time, sleep=time.sleep):
        self.clock, self.sleep = clock, sleep
        self._recent = collections.deque(maxlen=10000)  # times of wrong keys, from anywhere
        self._remote = {}   # another machine's address -> (wrong keys, banned until)
        self._lock = threading.Lock()
        self._guessing = threading.Lock()  # wrong guesses are answered one at a time

    def check(self, config, address, presented):
        if not config.management_key:
            raise NotFound("no such endpoint (the management API is off: set "
                           "management_key or IFLOW_PROXY_MANAGEMENT_KEY)")
        remote = not is_loopback(address)
        if remote and not config.management_allow_remote:
            raise ProxyError("the management API answers only on this machine (config "
                             "management_allow_remote)", status=403, code="remote_refused")
        if not presented:
            raise Unauthorized("missing management key (Authorization: Bearer <key> or "
                               "X-Management-Key)")
        now = self.clock()
        with self._lock:
            until = self._remote.get(address, (0, 0))[1] if remote else 0
        if until > now:
            raise ProxyError("too many wrong management keys from %s; try again in %ds"
                             % (address, until - now), status=403, code="banned",
                             retry_after=int(until - now) + 1)
        if hmac.compare_digest(presented.encode("latin-1", "replace"),
                               config.management_key.encode("utf-8")):
            if remote:
                with self._lock:
                    self._remote.pop(address, None)
            return
        self._wrong_key(address if remote else None, now)
        raise Unauthorized("wrong management key (Authorization: Bearer <key> or "
                           "X-Management-Key)")

    def _wrong_key(self, remote_address, now):
        """Count a wrong key (and ban another machine's address after TRIES), then wait the
        delay that all recent wrong keys together call for."""
        with self._guessing:
            with self._lock:
                while self._recent and self._recent[0] <= now - self.GUESS_WINDOW:
                    self._recent.popleft()
                self._recent.append(now)
                recent = len(self._recent)
                if remote_address is not None:
                    self._count_remote(remote_address, now)
            if recent > self.TRIES:
                self.sleep(min(self.MAX_DELAY, 0.25 * 2 ** min(recent - self.TRIES - 1, 16)))

    def _count_remote(self, address, now):
        failures, until = self._remote.pop(address, (0, 0))
        if until and until <= now:
            failures = 0  # a ban that lapsed starts again from nothing
        failures += 1
        self._remote[address] = (failures, now + self.BAN_SECONDS
                                 if failures >= self.TRIES else 0)
        if len(self._remote) > self.MAX_TRACKED:  # forget counts first, never a ban in force
            for stale in [a for a, (_f, u) in self._remote.items() if u <= now]:
                del self._remote[stale]
                if len(self._remote) <= self.MAX_TRACKED:
                    break


# settings the management API may change while the proxy runs
RUNTIME_SETTINGS = ("claude_models", "class_models", "model_aliases", "model_fallbacks",
                    "legacy_aliases", "strategy", "queue_timeout", "max_concurrency", "models",
                    "prices")
_ACCOUNT_PATCH = {"nickname": str, "default": bool, "enabled": bool, "max_concurrency": int,
                  "priority": int, "models": list, "excluded_models": list}


class ManagementAPI:
    """The /v0/management/ routes: accounts, settings, client keys and usage, JSON in and out.
    Every change goes to the files (atomically, 0600) and is logged (never a secret)."""

    def __init__(self, server):
        self.server = server

    @property
    def chat(self):
        return self.server.chat

    def route(self, method, parts, body, query, who="?"):
        """(status, JSON object or (content type, bytes)) for one call from ``who``."""
        self.who = who
        table = {("GET", "accounts"): self.list_accounts, ("POST", "accounts"): self.add_account,
                 ("GET", "settings"): self.settings, ("PATCH", "settings"): self.change_settings,
                 ("GET", "client-keys"): self.list_keys, ("POST", "client-keys"): self.add_key,
                 ("GET", "usage"): self.usage}
        if len(parts) == 1 and (method, parts[0]) in table:
            return table[(method, parts[0])](body, query)
        if len(parts) >= 2 and parts[0] == "accounts":
            entry = self.account_entry(parts[1])
            action = {("PATCH", 2): self.patch_account, ("DELETE", 2): self.remove_account,
                      ("POST", 3): {"refresh": self.refresh, "check": self.check}.get(
                          parts[2] if len(parts) == 3 else "")}.get((method, len(parts)))
            if action:
                return action(entry, body)
        if len(parts) == 2 and parts[0] == "client-keys" and method in ("PATCH", "DELETE"):
            return self.change_key(parts[1], None if method == "DELETE" else body)
        known = [p for p in ("accounts", "settings", "client-keys", "usage") if parts[:1] == [p]]
        raise (MethodNotAllowed if known else NotFound)(
            "no management route %s /v0/management/%s" % (method, "/".join(parts)))

    # --- accounts --------------------------------------------------------------------------
    def list_accounts(self, body, query):
        config = self.server.config
        return 200, {"accounts": [dict(account_json(a, config), state=self.chat.router.state(a)[0])
                                  for a in self.chat.router.all_accounts()]}

    def add_account(self, body, query):
        key = body.get("api_key")
        if not isinstance(key, str) or len(key.strip()) < 8 or not is_key_text(key.strip()):
            raise BadRequest("field 'api_key' must be the key: 8 or more printable characters")
        for field in ("nickname", "provider", "protocol", "base_url"):
            if body.get(field) is not None and not isinstance(body[field], str):
                raise BadRequest("field %r must be a string" % field)
        if body.get("nickname"):
            validate_nickname(body["nickname"])
        settings = api_key_settings(body.get("provider"), body.get("protocol"),
                                    body.get("base_url"))
        account = Account(id="new", nickname="new", kind="api-key", api_key=key.strip(),
                          **settings)
        if body.get("verify", True):
            result = probe_account(account, self.server.config, self.chat.upstream)
            if not (result.reachable and result.key_ok):
                raise BadRequest("upstream did not accept the key %s: %s" % (
                    mask_secret(key), result.error.message if result.error else
                    result.key_verdict))
        creds = {"api_key": key.strip()}
        entry, created = self.chat.registry.upsert(
            identity_of("api-key", creds, settings), "api-key", creds,
            nickname=body.get("nickname"), settings=settings)
        self.changed("added account %s" % entry["nickname"])
        return (201 if created else 200), self.account_view(entry["id"])

    def account_entry(self, nickname):
        data = self.chat.registry.read()
        entry = next((e for e in data["accounts"]
                      if e["nickname"].lower() == nickname.lower()), None)
        if entry is None:
            raise NotFound("no account named %r (accounts: %s)" % (nickname, ", ".join(
                e["nickname"] for e in data["accounts"]) or "none"))
        return entry

    def account_view(self, account_id):
        account = self.chat.registry.load(account_id)
        return account_json(account, self.server.config)

    def patch_account(self, entry, body):
        for field, value in body.items():
            kind = _ACCOUNT_PATCH.get(field)
            if kind is None or not isinstance(value, kind) or \
                    isinstance(value, bool) and kind is not bool:
                raise BadRequest("PATCH takes %s; %r is not one of them (or not %s)" % (
                    ", ".join(_ACCOUNT_PATCH), field, _TYPE_NAMES.get(kind, "valid")))
        registry = self.chat.registry
        if "nickname" in body:
            registry.rename(entry["nickname"], body["nickname"])
        if body.get("default"):
            registry.set_default(body.get("nickname", entry["nickname"]))
        if "enabled" in body:
            account = registry.load(entry["id"])
            registry.set_status(account, "ok" if body["enabled"] else "disabled",
                                "" if body["enabled"] else "disabled by the management API")
        fields = {k: body[k] for k in ("max_concurrency", "priority", "models",
                                       "excluded_models") if k in body}
        if fields:
            with registry.edit(entry["id"]) as change:
                change.update(**fields)
        self.changed("changed account %s: %s" % (entry["nickname"], ", ".join(sorted(body))))
        return 200, self.account_view(entry["id"])

    def remove_account(self, entry, body):
        self.chat.registry.remove(entry["nickname"])
        self.changed("removed account %s" % entry["nickname"])
        return 200, {"removed": entry["nickname"]}

    def refresh(self, entry, body):
        renewed = self.chat.refresher.refresh(entry["id"], force=True)
        self.changed("refreshed account %s: %s" % (entry["nickname"], renewed))
        view = self.account_view(entry["id"])
        return 200, {"renewed": renewed, "refresh_error": view["refresh_error"] or None}

    def check(self, entry, body):
        account = self.chat.registry.load(entry["id"])
        result = probe_account(account, self.server.config, self.chat.upstream)
        return 200, {"nickname": account.nickname, "reachable": result.reachable,
                     "key": result.key_verdict, "signature": result.signature_verdict,
                     "latency_ms": round(result.latency_ms or 0, 1),
                     "error": result.error.message if result.error else None,
                     "service": service_verdict(result)}

    # --- settings and client keys ----------------------------------------------------------
    def settings(self, body, query):
        config = self.server.config
        return 200, {key: getattr(config, key) for key in RUNTIME_SETTINGS}

    def change_settings(self, body, query):
        wrong = [k for k in body if k not in RUNTIME_SETTINGS]
        if wrong:
            raise BadRequest("these settings can't change at run time: %s (the ones that can: "
                             "%s)" % (", ".join(wrong), ", ".join(RUNTIME_SETTINGS)))
        where = "management PATCH /settings"
        try:
            for key, value in body.items():
                _check_type(value, SETTINGS[key].types, where, key)
                _validate_value(key, value, where)
        except ConfigError as e:
            raise BadRequest(e.message)
        with self.chat.registry.lock:  # file and running config change together, in order
            self.write_config(body)
            self.server.apply_config(**body)
        self.changed("changed settings: %s" % ", ".join(sorted(body)))
        return self.settings(None, None)

    def list_keys(self, body, query):
        return 200, {"client_keys": [self.key_view(k) for k in self.server.config.client_keys]}

    @staticmethod
    def key_view(key):
        return {"name": key.name, "key": mask_secret(key.key), "rpm": key.rpm,
                "tokens_per_day": key.tokens_per_day, "models": list(key.models),
                "expires": key.expires or None}

    def add_key(self, body, query):
        item = {k: v for k, v in body.items() if k != "key"}
        item["key"] = "ck-" + secrets.token_urlsafe(24)
        with self.chat.registry.lock:  # read, change and write the list whole (see change_key)
            self._save_keys(self._stored_keys() + [item])
        self.changed("created client key %s" % item.get("name"))
        return 201, dict(self.key_view(client_key(item)), key=item["key"],
                         note="shown once: store it now")

    def change_key(self, name, body):
        # The whole read-modify-write under the lock, the file read inside it: two changes at
        # once each read the list the other was writing, and one lost the other's revocation
        # or creation although both were acknowledged.
        with self.chat.registry.lock:
            keys = self._stored_keys()
            found = next((k for k in keys if k.get("name", "").lower() == name.lower()), None)
            if found is None:
                raise NotFound("no client key named %r in config.json" % name)
            if body is None:
                keys.remove(found)
            else:
                if "key" in body or "name" in body and body["name"] != found["name"]:
                    raise BadRequest("a key's secret and name can't be changed; revoke it and "
                                     "create another")
                found.update(body)
            self._save_keys(keys)
        self.changed("%s client key %s" % ("revoked" if body is None else "changed", name))
        return 200, {"client_keys": [self.key_view(k) for k in self.server.config.client_keys]}

    def _stored_keys(self):
        """The config file's client keys, as objects (a plain key gets its fingerprint name)."""
        stored = read_config_file(self.server.config.config_path).get("client_keys") or []
        return [k if isinstance(k, dict) else dict(client_key(k)._asdict(),
                                                   models=[]) for k in stored]

    def _save_keys(self, keys):
        problem = _client_key_list(keys)
        if problem:
            raise BadRequest("client key %s" % problem)
        stored = {k["key"] for k in self._stored_keys()}
        others = tuple(k for k in self.server.config.client_keys if k.key not in stored)
        self.write_config({"client_keys": keys})  # keys from env, flags or a file stay as well
        self.server.apply_config(client_keys=tuple(client_key(k) for k in keys) + others)

    def write_config(self, changes):
        """Merge ``changes`` into config.json, atomically, under the registry's lock."""
        path = self.server.config.config_path
        with self.chat.registry.lock:
            data = read_config_file(path)
            data.update(changes)
            atomic_write_json(path, data)

    # --- usage -----------------------------------------------------------------------------
    def usage(self, body, query):
        usage = self.chat.usage
        rows = [dict(r, kind="account") for r in usage.day_rows()] + \
            [dict(r, kind="client key") for r in usage.client_rows()]
        if (query.get("format") or [""])[0] == "csv":
            fields = ("day", "kind", "account", "client", "model", "requests", "input_tokens",
                      "output_tokens", "cache_read_tokens", "cache_write_tokens", "cost",
                      "currency", "price_source")
            lines = [",".join(fields)] + [",".join(_csv_cell(
                "" if r.get(f) is None else r[f]) for f in fields) for r in rows]
            return 200, ("text/csv; charset=utf-8", ("\r\n".join(lines) + "\r\n").encode())
        return 200, {"usage": rows, "costs": usage.costs()}

    def changed(self, what):
        log.warning("management: %s (from %s)", what, getattr(self, "who", "?"))


def _csv_cell(value):
    text = str(value)
    if text[:1] in ("=", "+", "-", "@"):  # never a formula in a spreadsheet
        text = "'" + text
    return '"%s"' % text.replace('"', '""') if any(c in text for c in ',"\r\n') else text


class BodyBudget:
    """Request-body bytes held at once across all requests (0 = unlimited), so that many large
    bodies arriving together can't take the machine's memory."""

    def __init__(self, limit):
        self.limit, self.held = limit, 0
        self._cond = threading.Condition()
        self._waiting = 0  # takers waiting for room (only they need waking)

    def take(self, size, timeout=5.0):
        """Reserve ``size`` bytes, waiting up to ``timeout`` for others to finish; True if so."""
        if not self.limit or size <= 0:
            return True
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.held and self.held + size > self.limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1
            self.held += size
            return True

    def give(self, size):
        if self.limit and size > 0:
            with self._cond:
                self.held -= size
                if self._waiting:
                    self._cond.notify_all()


class ProxyServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The listening socket and its connections: the cap, deadlines, idle connections, the
    watch on clients whose answer is being relayed, and the lifecycle.  Chat work goes to
    ``self.chat`` (a ChatService); HTTP in and out is ProxyHandler's."""

    daemon_threads = True
    allow_reuse_address = True  # restart at once on the same port (as http.server does)
    request_queue_size = 512  # socketserver's 5 resets bursts of connecting clients

    def __init__(self, config, **chat_options):
        check_bind_safety(config)
        self.config = config
        limits_clock = chat_options.pop("limits_clock", time.time)
        guard_clock = chat_options.pop("guard_clock", time.time)
        guard_sleep = chat_options.pop("guard_sleep", time.sleep)
        self.chat = ChatService(config, **chat_options)
        self.bodies = BodyBudget(config.max_inflight_body_bytes)
        self.limits = ClientLimits(self.chat.usage, limits_clock)
        self.guard = ManagementGuard(guard_clock, guard_sleep)
        self.management = ManagementAPI(self)
        self._stopping = threading.Event()
        self._gate = threading.Lock()
        self.connections = 0          # client connections being served
        self.active_requests = 0      # requests between their first byte and their response
        self._deadlines = {}          # handler -> (monotonic deadline, what it is waiting for)
        self._idle = {}               # handler waiting for a request -> None, oldest first
        self._evicted = set()         # sockets of idle connections dropped to admit new ones
        self._watched = {}            # handler -> the exchange it relays (client checked)
        self._heartbeats = {}         # Heartbeat of a stream being relayed -> None
        self._request_ids = itertools.count(1)  # x-request-id: this run's prefix, then a count
        self._request_prefix = "req_%s" % os.urandom(4).hex()
        self.status_token = "st-" + secrets.token_urlsafe(24)  # see serve_until_stopped
        self._date = (None, "")       # (second, its HTTP Date text), for response heads
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((config.host.strip("[]"), config.port), ProxyHandler)
        except OSError as e:
            raise ProxyError("cannot listen on %s:%d: %s" % (config.host, config.port,
                                                             e.strerror or e))
        threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()
        self.access_log = LineWriter()

    # --- connections -----------------------------------------------------------------------
    def process_request(self, request, client_address):
        """One thread per connection, up to max_connections (an idle one is dropped to make
        room; with none idle, a JSON 503)."""
        with self._gate:
            if self.connections >= self.config.max_connections and self._idle:
                self._evict(next(iter(self._idle)))
            admitted = self.connections < self.config.max_connections
            if admitted:
                self.connections += 1
        if admitted:
            try:
                return super().process_request(request, client_address)
            except BaseException:
                with self._gate:
                    self.connections -= 1
                raise
        self._refuse(request)

    def _evict(self, handler):
        """Drop an idle connection (under the gate): its slot is free from now on."""
        del self._idle[handler]
        self._evicted.add(handler.request)
        self.connections -= 1
        log.info("dropping an idle connection from %s to admit a new one",
                 handler.client_address[0])
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)

    def _refuse(self, request):
        body = json_bytes(error_body(ProxyError(
            "too many connections (config max_connections=%d); retry shortly"
            % self.config.max_connections, status=503, code="too_many_connections")))
        try:
            request.settimeout(1)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                            b"\r\nContent-Length: %d\r\nRetry-After: 1\r\nConnection: close"
                            b"\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._gate:
                if request in self._evicted:
                    self._evicted.discard(request)
                else:
                    self.connections -= 1

    def set_idle(self, handler, idle):
        """Mark a connection as waiting for its next request (the first to go at the cap)."""
        with self._gate:
            if idle:
                self._idle[handler] = None
            else:
                self._idle.pop(handler, None)

    def request_id(self):
        """A new x-request-id: unique in this run and across runs, without a system call."""
        return "%s%08x" % (self._request_prefix, next(self._request_ids))

    def http_date(self):
        """Now as an HTTP Date (RFC 9110 section 5.6.7), worked out once a second."""
        now = int(time.time())
        known = self._date
        if known[0] != now:
            known = self._date = (now, time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                                     time.gmtime(now)))
        return known[1]

    # --- deadlines and the client watch ----------------------------------------------------
    def watch(self, handler, seconds, what):
        """Close ``handler``'s connection if it is still ``what`` after ``seconds``."""
        if seconds is None and handler not in self._deadlines:
            return  # nothing to cancel (a dict lookup is atomic: no lock needed to ask)
        with self._gate:
            if seconds is None:
                self._deadlines.pop(handler, None)
            else:
                self._deadlines[handler] = (time.monotonic() + seconds, what)

    def watch_client(self, handler, exchange):
        """While ``exchange`` runs, notice at once if ``handler``'s client hangs up (even while
        upstream is silent) and cut the exchange, so its account slot is freed."""
        with self._gate:
            if exchange is None:
                self._watched.pop(handler, None)
            else:
                self._watched[handler] = exchange

    def watch_silence(self, heartbeat, watching=True):
        """Start ``heartbeat`` (its pings) once its stream has been silent for its interval."""
        with self._gate:
            if watching:
                self._heartbeats[heartbeat] = None
            else:
                self._heartbeats.pop(heartbeat, None)

    def _watchdog(self):
        """Slow clients (slowloris) can't hold a thread; clients that left free their slot;
        streams gone quiet get their pings."""
        while not self._stopping.wait(0.2):
            self._cut_overdue()
            self._check_clients()
            self._start_heartbeats()

    def _start_heartbeats(self):
        now = time.monotonic()
        with self._gate:
            quiet = [h for h in self._heartbeats if h.silent_since(now)]
        for heartbeat in quiet:
            heartbeat.start()

    def _cut_overdue(self):
        now = time.monotonic()
        with self._gate:
            overdue = [(h, what) for h, (deadline, what) in self._deadlines.items()
                       if deadline < now]
            for handler, _what in overdue:
                del self._deadlines[handler]
        for handler, what in overdue:
            log.info("closing a connection from %s: too slow %s", handler.client_address[0],
                     what)
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)

    def _check_clients(self):
        with self._gate:
            watched = {h.connection: (h, ex) for h, ex in self._watched.items()}
        for sock in peers_gone(list(watched)) if watched else ():
            handler, exchange = watched[sock]
            handler.client_left = True
            exchange.abort("the client disconnected")

    # --- requests and lifecycle ------------------------------------------------------------
    def request_started(self):
        with self._gate:
            self.active_requests += 1

    def request_finished(self):
        with self._gate:
            self.active_requests -= 1

    def drain(self, grace):
        """Wait up to ``grace`` seconds for in-flight requests; True when none is left."""
        deadline = time.monotonic() + grace
        while self.active_requests > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.active_requests <= 0

    def stop_streams(self, grace=2.0):
        """Cut the answers still being relayed (each client gets an error event), then wait
        up to ``grace`` for their last words and usage records."""
        if self.chat.abort_all("iflow-proxy is shutting down"):
            self.drain(grace)

    def apply_config(self, **changes):
        """Run on with some settings changed (from the management API), everywhere they are
        read, without a restart."""
        self.config = self.config.replace(**changes)
        self.chat.apply_config(self.config)

    @property
    def url(self):
        host, port = self.server_address[:2]
        return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)

    def start_background(self, every=60.0):
        self.chat.start(self._stopping, every)

    def shutdown(self):
        self._stopping.set()
        self.chat.stop()
        super().shutdown()

    def server_close(self):
        super().server_close()
        self.chat.close()
        self.access_log.close()


# path -> {HTTP method: (handler method name, needs a client key)}, from lines
# "methods path handler open|key"
# (every GET route answers HEAD too: the same head without the body, RFC 9110 section 9.3.2)
ROUTES = {path: dict.fromkeys(methods.split(",") + ["HEAD"] * ("GET" in methods),
                              ("handle_" + name, guard == "key"))
          for methods, path, name, guard in _rows("""
    GET       /healthz                   healthz           open
    GET       /api/hello                 healthz           open
    GET       /                          dashboard         open
    GET       /status                    status            key
    GET       /v1/models                 models            key
    POST      /v1/chat/completions       chat_completions  key
    POST      /v1/messages               messages          key
    POST      /v1/messages/count_tokens  count_tokens      key
    POST      /v1/responses              responses         key
    POST      /v1/responses/input_tokens response_tokens   key
    GET       /v1/responses/*            stored_response   key
""")}
ROUTE_ALIASES = {"/models": "/v1/models", "/chat/completions": "/v1/chat/completions",
                 "/health": "/healthz", "/messages": "/v1/messages",
                 "/messages/count_tokens": "/v1/messages/count_tokens",
                 "/responses": "/v1/responses", "/responses/input_tokens":
                 "/v1/responses/input_tokens"}


def route_target(target):
    """The path of a request target (origin form is the usual one: no parsing needed)."""
    if target[:1] == "/" and "?" not in target and "#" not in target:
        return target
    try:
        return urllib.parse.urlsplit(target).path
    except ValueError:  # e.g. "http://[::1" (an unclosed bracket)
        raise BadRequest("malformed request target %r" % target[:100]) from None


def route_path(target):
    """The ROUTES path a request target names (prefix and aliases resolved)."""
    path = route_target(target)
    if path.startswith(ROUTE_PREFIX):
        path = path[len(ROUTE_PREFIX):] or "/"
    path = ROUTE_ALIASES.get(path, path)
    if path.startswith(("/v1/responses/", "/responses/")) and path.count("/") == \
            path.startswith("/v1/") + 2 and not path.endswith("/input_tokens"):
        return "/v1/responses/*"  # one stored response, by id
    return path


class ProxyHandler(ServerConnection):
    """One request after the wire has read its head: check → translate → exchange → write.
    (The request loop, bodies and answer framing are ServerConnection's.)"""

    def dispatch(self):
        self.server.request_started()
        self.api = "anthropic" if self.headers.get("anthropic-version") else "openai"
        self.exchange = self.client_key = None
        self.client_left, self.reserved = False, 0
        try:
            getattr(self, self.check_request())()
        except ProxyError as e:
            self.send_error_json(e)
        except ClientGone:
            log.info("%s client disconnected", self.request_id)
        except RecursionError:
            self.send_error_json(BadRequest("request JSON is nested too deeply"))
        except Exception:  # a bug: answer 500, keep serving
            log.exception("%s internal error", self.request_id)
            if self.response_status is not None:  # an answer began: end it by closing, as a
                self.close_connection = True      # cut (not an open stream the client awaits)
            self.send_error_json(ProxyError("internal error in iflow-proxy; see its log"))
        finally:
            if self.reserved:
                self.server.limits.settle(self.client_key, self.reserved)
            self.end_request()
            self.server.request_finished()
            self.log_access()

    def end_stream(self, last=b""):
        if self.exchange is not None:  # recorded before the client has the end (see settle)
            self.exchange.settle()
        super().end_stream(last)

    def send_error(self, status, message, code="bad_http_request"):
        """A request the wire refused: answered, and in the access log too."""
        super().send_error(status, message, code)
        self.exchange = None
        self.log_access()

    def check_request(self):
        """The handler method for this request, after every check that needs no body."""
        config = self.server.config
        if not host_allowed(self.headers.get("Host"), config, self.server.server_address[0]):
            raise ProxyError("Host %r is not served here (add it to config allowed_hosts)"
                             % self.headers.get("Host")[:100], status=403, code="host_not_allowed")
        path = self.route = route_path(self.path)
        if path == "/v0/management" or path.startswith("/v0/management/"):
            return self.check_management()
        if path.startswith("/v1/messages"):
            self.api = "anthropic"
        methods = ROUTES.get(path)
        if methods is None:
            raise NotFound("no such endpoint: %s %s" % (self.command, path[:200]))
        if self.command not in methods:
            err = MethodNotAllowed("%s is not allowed on %s (use %s)"
                                   % (self.command, path, ", ".join(sorted(methods))))
            err.allow = ", ".join(sorted(methods))
            raise err
        name, guarded = methods[self.command]
        if guarded:
            self.check_same_site()
            self.check_client_key()
        return name

    def check_same_site(self):
        """Refuse other sites' pages; only JSON bodies (what a page can't send unasked)."""
        reason = cross_site_reason(self.headers, self.server.config)
        if reason:
            raise ProxyError("cross-site request refused (%s); add the origin to config "
                             "allowed_origins to allow it" % reason, status=403,
                             code="cross_site_request")
        if self.command in ("POST", "PATCH", "PUT") and not is_json_content_type(
                self.headers.get("Content-Type")):
            raise ProxyError("Content-Type must be application/json", status=415,
                             code="unsupported_media_type")

    def presented_key(self, header):
        """The key a client sent in ``header``, else as ``Authorization: Bearer <key>``."""
        auth = self.headers.get("Authorization") or ""
        return self.headers.get(header) or (auth[7:].strip() if auth[:7].lower() == "bearer "
                                            else "")

    def check_management(self):
        self.check_same_site()  # another site's page is refused before its key can count
        self.server.guard.check(self.server.config, self.client_address[0],
                                self.presented_key("X-Management-Key"))
        return "handle_management"

    def handle_management(self):
        parts = [urllib.parse.unquote(p) for p in route_path(self.path)[len(
            "/v0/management"):].strip("/").split("/") if p]
        body = self.read_json() if self.command in ("POST", "PATCH") and self.body_unread \
            else {}
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        status, result = self.server.management.route(self.command, parts, body, query,
                                                      self.client_address[0])
        if isinstance(result, tuple):
            return self.send_bytes(status, result[1], result[0])
        self.send_json(status, result)

    # --- client authentication --------------------------------------------------------------
    def check_client_key(self):
        keys = self.server.config.client_keys
        if not keys:
            return
        # header values are decoded as Latin-1: encode back to the bytes that were sent, which
        # for a non-ASCII key are its UTF-8 (the encoding our configured keys use)
        sent = self.presented_key("x-api-key").encode("latin-1", "replace")
        token = getattr(self.server, "status_token", None)
        if token and self.route == "/status" and self.command in ("GET", "HEAD") \
                and hmac.compare_digest(sent, token.encode("ascii")):
            self.log_fields["client"] = "home owner"  # the token in this home's run.json
            return
        matched = None
        for key in keys:  # compare with every key: timing reveals nothing about which matched
            if hmac.compare_digest(sent, key.key.encode("utf-8")) and matched is None:
                matched = key
        if matched is None:
            raise Unauthorized("missing or invalid client key: send it as 'Authorization: "
                               "Bearer <key>' or 'x-api-key: <key>'")
        self.client_key = matched
        self.log_fields["client"] = matched.name
        self.server.limits.check_expiry(matched)  # on every route a key opens, not only chat

    def admit(self, model, estimate=lambda: 0):
        """The client key's own limits, once the model is known (see ClientLimits); what it
        reserves is released when the request ends (dispatch)."""
        if self.client_key is not None:
            self.reserved = self.server.limits.admit(self.client_key, model, estimate)

    # --- request bodies ---------------------------------------------------------------------
    def read_json(self):
        raw = self.read_body()
        self.body_size = len(raw)
        return parse_json_body(raw)


    # --- logging ----------------------------------------------------------------------------
    def log_access(self):
        """One line per request; every field from outside is escaped by the log formatter."""
        if not log.isEnabledFor(logging.INFO):
            return
        exchange, mine = self.exchange, self.log_fields
        total = (time.monotonic() - self.started) * 1000
        first = (self.first_byte - self.started) * 1000 if self.first_byte else total
        if exchange is None:
            model, account, attempts, usage, error = mine.get("model") or "", None, 0, None, None
        else:
            model = mine.get("model") or exchange.asked or ""
            if exchange.model and exchange.model != model:
                model += " -> " + exchange.model
            account = exchange.account.nickname if exchange.account else None
            attempts, usage, error = exchange.attempts, exchange.usage, exchange.error
        usage = usage or {}
        line = "%s %s %s %s %s model=%s account=%s attempts=%s status=%s first_byte=%.0fms " \
            "total=%.0fms tokens=%s/%s" % (
                self.request_id, self.api, self.command or "-", (self.path.split("?", 1)[0]
                                                             or self.requestline)[:300],
                self.client_address[0], model[:300] or "-", account or "-", attempts,
                self.response_status or "-", first, total, usage.get("prompt_tokens", "-"),
                usage.get("completion_tokens", "-"))
        if mine.get("class"):
            line += " class=" + mine["class"]
        if mine.get("client"):
            line += " client=" + mine["client"]
        if error:
            line += " error=%r" % error[:200]
        log_info_line(log, line, self.server.access_log)

    # --- endpoints --------------------------------------------------------------------------
    def handle_healthz(self):
        self.send_json(200, {"status": "ok"})

    def handle_status(self):
        """The proxy's state; a client key sees of the per-key figures only its own (the
        home's owner, with run.json's status token, and the management API see every key's)."""
        self.send_json(200, self.server.chat.status(self.server.url, self.client_key))

    def handle_dashboard(self):
        """A static page; its script fetches /status with the key kept in the browser."""
        self.send_bytes(200, DASHBOARD_HTML.encode("utf-8"), "text/html; charset=utf-8",
                        {"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                         "Content-Security-Policy": "default-src 'none'; script-src "
                         "'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"})

    def handle_models(self):
        chat = self.server.chat
        families = map_families(self.server.config.claude_models, chat.claude_defaults())
        self.send_json(200, models_response(chat.catalog.ids(), self.api,
                                            chat.router.all_accounts(), families, chat.spec))

    def handle_count_tokens(self):
        """A local estimate, calibrated by what the model's upstream has counted before."""
        chat = self.server.chat
        body = self.read_json()
        _expect(body, "messages", list, "a list of messages", required=True)
        validate_anthropic_request(dict(body, model=body.get("model") or "counting"))
        body = resolve_turns(body)  # counted as it would be sent
        model = chat.resolve(map_claude_model(body.get("model") or "", self.server.config
                                              .claude_models, chat.claude_defaults()))[1]
        self.send_json(200, {"input_tokens": chat.prompt_tokens(
            ChatRequest("anthropic", dict(body, model=model)), model)})

    def handle_chat_completions(self):
        body = validate_chat_request(self.read_json())
        request_class = self.request_class(body["model"])
        self.admit(body["model"], lambda: count_openai_tokens(
            body, self.server.chat.token_estimates))
        body = dict(body, model=self.class_model(request_class, body["model"]))
        chat, results = self.server.chat, None
        if isinstance(body.get("web_search_options"), dict):  # search first, answer with it
            results, body = chat_with_search(chat, body, self.client_name())
        request = ChatRequest("openai", body, request_class=request_class,
                              client=self.client_name())
        request.size, request.key = self.body_size, self.client_key
        self.relay(chat.exchange(request, openai_conversation_key(body, self.headers),
                                 cancelled=self.has_left),
                   lambda ex: self.write_openai(ex, results))

    def request_class(self, model):
        """What the request is (see REQUEST_LANES): as Claude Code says (its gateway hint
        header), else as a client says with x-iflow-proxy-priority (background/interactive),
        else housekeeping for Claude Code's small/fast (haiku) family and main for the rest."""
        said = (self.headers.get("x-claude-code-request-class") or "").strip().lower()
        if said not in REQUEST_LANES:
            priority = (self.headers.get("x-iflow-proxy-priority") or "").strip().lower()
            said = {"background": "auxiliary", "interactive": "main"}.get(priority) or (
                "auxiliary" if model.lower().startswith("claude") and "haiku" in model.lower()
                else "main")
        self.log_fields["class"] = said
        self.server.chat.count_class(said)
        return said

    def class_model(self, request_class, model):
        """The model config class_models sends this class of request to, else ``model``."""
        return self.server.config.class_models.get(request_class) or model

    def handle_messages(self):
        config, chat = self.server.config, self.server.chat
        request = resolve_turns(validate_anthropic_request(self.read_json()))
        request_class = self.request_class(request["model"])
        self.admit(request["model"], lambda: count_request_tokens(request,
                                                                   chat.token_estimates))
        self.log_fields["model"] = request["model"]
        mapped = self.class_model(request_class, map_claude_model(
            request["model"], config.claude_models, chat.claude_defaults()))
        _pinned, model, _fallback, _effort = chat.resolve(mapped)
        if web_search_only(request) and not chat.searches_upstream(model):
            return answer_web_search(self, request)  # e.g. Claude Code's WebSearch side request
        if web_fetch_only(request):
            return answer_web_fetch(self, request)
        served, request = served_tools(chat, request, model)  # (beside the client's tools)
        thinking, effort = anthropic_thinking(request)
        chat_request = ChatRequest("anthropic", dict(request, model=mapped), thinking, effort,
                                   count_request_tokens(request, chat.token_estimates),
                                   request_class, self.client_name())
        chat_request.size, chat_request.key = self.body_size, self.client_key
        conversation = anthropic_conversation_key(request, self.headers)
        if anthropic_has_images(request) and not (matches_any(model, config.vision_models) or
                                                  chat.spec(model).vision):
            if not config.describe_images:
                raise BadRequest("model %s cannot see images and describe_images is off; use a "
                                 "vision model such as %s" % (model, config.vision_model))
            chat.describe_images(chat_request.openai(), conversation)
        exchange = chat.exchange(chat_request, conversation, cancelled=self.has_left)
        self.relay(exchange, (lambda ex: write_anthropic(self, ex, request)) if served is None
                   else (lambda ex: write_anthropic_served(self, ex, request, served)))

    def handle_responses(self):
        """POST /v1/responses (Codex, the SDKs' responses API): as chat completions through the
        same routing, queue, limits and usage, answered as a Responses stream or object."""
        self.api = "responses"
        chat, owner = self.server.chat, self.client_name()
        body = validate_responses_request(self.read_json())
        request_class = self.request_class(body["model"])
        self.admit(body["model"], lambda: estimate_tokens(json.dumps(body.get("input"))))
        history = chat.responses.history(owner, body.get("previous_response_id"))
        tools = ResponsesTools(body.get("tools"),  # a hosted web search runs here, if it can
                               search=chat.web_search.settings()[0] is not None)
        if tools.dropped:
            log.info("%s tools with no chat form left out: %s", self.request_id,
                     ", ".join(tools.dropped))
        chat_body = responses_to_chat(body, history, tools)
        chat_body["model"] = self.class_model(request_class, body["model"])
        thinking, effort = responses_thinking(body)
        request = ChatRequest("openai", chat_body, thinking, effort, request_class=request_class,
                              client=owner)
        request.size, request.key = self.body_size, self.client_key
        given = body.get("input")
        items = history + ([{"type": "message", "role": "user", "content": given}]
                           if isinstance(given, str) else list(given or ()))
        # as it is for upstreams that serve the Responses API (stateless: the history inline)
        request.responses = dict({k: v for k, v in body.items() if k != "previous_response_id"},
                                 input=items, store=False)
        conversation = responses_conversation_key(body, chat_body, self.headers)
        self.relay(chat.exchange(request, conversation, cancelled=self.has_left),
                   lambda ex: write_responses(self, ex, body, tools, items))

    def handle_response_tokens(self):
        """POST /v1/responses/input_tokens: the local estimate of a Responses request."""
        self.api, chat = "responses", self.server.chat
        body = validate_responses_request(self.read_json())
        history = chat.responses.history(self.client_name(), body.get("previous_response_id"))
        chat_body = responses_to_chat(body, history)
        model = chat.resolve(body["model"])[1]
        self.send_json(200, {"object": "response.input_tokens", "input_tokens":
                             chat.prompt_tokens(ChatRequest("openai", chat_body), model)})

    def handle_stored_response(self):
        """GET /v1/responses/{id}: a stored response, to the client key that made it."""
        self.api = "responses"
        response_id = urllib.parse.unquote(route_target(self.path).rstrip("/").rsplit("/", 1)[1])
        self.send_json(200, self.server.chat.responses.get(self.client_name(), response_id)[0])

    def has_left(self):
        return self.client_left

    def client_name(self):
        return self.client_key.name if self.client_key is not None else ""

    def relay(self, exchange, write):
        """Open the exchange and write its answer; it is closed (and recorded) whatever happens."""
        self.exchange = exchange
        self.server.watch_client(self, exchange)
        try:
            exchange.open()
            write(exchange)
        finally:
            self.server.watch_client(self, None)
            exchange.close()

    def write_openai(self, exchange, results=None):
        """The answer for an OpenAI client: relayed as it came from an OpenAI upstream (event by
        event), translated from an Anthropic one; with the url_citation annotations of a web
        search's ``results`` it cites."""
        headers = {}
        if exchange.model != self.server.chat.router.split_pin(exchange.asked)[1]:
            headers["x-iflow-proxy-model"] = exchange.model
        translator = OpenAIChunks(exchange.model) if exchange.protocol == "anthropic" else None
        if not exchange.stream:
            if translator is None and results is None:
                self.send_bytes(200, exchange.answer.raw, headers=headers)
                return
            completion = exchange.answer.payload if translator is None else \
                anthropic_message_to_completion(exchange.answer.payload, exchange.model)
            for choice in completion.get("choices") or () if results is not None else ():
                message = choice.get("message") or {}
                message["annotations"] = url_citations(message.get("content") or "", results)
            self.send_json(200, completion, headers)
            return
        self.start_stream(headers)
        try:
            for data, chunk in exchange.chunks():
                self.write_chunk(translator.feed(chunk) if translator else
                                 b"data: " + data + b"\n\n")
            tail = b"data: [DONE]\n\n"
            if results is not None:  # the citations, once the whole text is known
                tail = sse({"object": "chat.completion.chunk", "model": exchange.model,
                            "choices": [{"index": 0, "finish_reason": None, "delta": {
                                "annotations": url_citations("".join(
                                    exchange.answer.relayed), results)}}]}) + tail
        except UpstreamError as e:
            exchange.fail(e)
            tail = sse(error_body(e, "openai")) + b"data: [DONE]\n\n"
        self.end_stream(tail)


def write_responses(handler, exchange, body, tools, items):
    """A Responses client's answer, written by ``handler``: built from the chat answer
    (translated first from an Anthropic upstream's); a hosted web_search the model calls is run
    here and the model asked again with the results (up to SEARCH_ROUNDS times); then stored
    unless the client said ``store: false``."""
    headers = {"x-iflow-proxy-model": exchange.model}
    if exchange.protocol == "responses":
        return relay_responses(handler, exchange, body, items, headers)
    chat = handler.server.chat
    stream = ResponsesStream(body, tools, body["model"],
                             searcher=model_searcher(chat, handler.client_name()))
    write = (lambda data: data and handler.write_chunk(data)) if exchange.stream else \
        (lambda _data: None)
    if exchange.stream:
        handler.start_stream(headers)
        write(stream.start())
    current, rounds = exchange, 0
    try:
        while True:
            for piece in answer_chunks(current):
                write(stream.feed(piece))
            out, searched = stream.end_round()
            write(out)
            if not searched or rounds >= SEARCH_ROUNDS:
                break
            rounds += 1
            current.close()  # its account slot, before the next round takes one
            current = search_round(chat, current, searched)
        tail = stream.finish()
    except UpstreamError as e:
        current.fail(e)
        tail = stream.failed(e)
    finally:
        if current is not exchange:
            current.close()
    if stream.response["status"] != "failed":  # stored before the client can ask for it
        store_response(handler, body, stream.response, items)
    if exchange.stream:
        handler.end_stream(tail)
    else:
        handler.send_json(200, stream.response, headers)


def write_anthropic(handler, exchange, request):
    """The answer for an Anthropic client: relayed event by event from an Anthropic upstream,
    translated from an OpenAI one (pinging in silences either way)."""
    headers = {"x-iflow-proxy-model": exchange.model}
    stops = request.get("stop_sequences") or ()
    relayed = exchange.protocol == "anthropic"  # else translated, with a token estimate
    estimate = None if relayed else \
        handler.server.chat.prompt_tokens(exchange.request, exchange.model)
    if not exchange.stream:
        if relayed:
            handler.send_bytes(200, exchange.answer.raw, headers=headers)
        else:
            handler.send_json(200, openai_to_anthropic(exchange.answer.payload,
                                                       request["model"], stops, estimate),
                              headers)
        return
    translator = None if relayed else AnthropicStream(request["model"], estimate, stops)
    lock = threading.Lock()
    handler.start_stream(headers)
    with Heartbeat(handler, handler.server.config.ping_interval, lock):
        if translator is not None:
            with lock:
                handler.write_chunk(translator.start())
        try:
            for data, event in exchange.chunks():
                out = translator.feed(event) if translator else \
                    sse(data, str(event.get("type")))
                with lock:
                    handler.write_chunk(out)
                if translator is not None and translator.done:  # a stop sequence matched
                    break
            out = translator.finish() if translator else b""
        except UpstreamError as e:
            exchange.fail(e)
            out = AnthropicStream.error(e)
        with lock:
            handler.end_stream(out)


def write_anthropic_served(handler, exchange, request, served):
    """An Anthropic client's answer when server tools of its request run here (``served``, a
    ServerTools): the model's answer translated as in write_anthropic, but each call of a
    served tool run here, written as its server_tool_use and result blocks, and the model
    asked to go on with the results (up to SEARCH_ROUNDS times, and not once it has called a
    client tool: the client runs that and asks again).  A client that asked for no stream gets
    the same events as one message."""
    chat, config = handler.server.chat, handler.server.config
    stream = AnthropicStream(request["model"], chat.prompt_tokens(exchange.request,
                                                                 exchange.model),
                             request.get("stop_sequences") or (), held=served.tools)
    events, lock = [], threading.Lock()

    def write(data):
        if data and exchange.stream:
            with lock:
                handler.write_chunk(data)
        elif data:
            events.append(data)
    if exchange.stream:
        handler.start_stream({"x-iflow-proxy-model": exchange.model})
    write(stream.start())
    current = exchange
    with Heartbeat(handler, config.ping_interval, lock) if exchange.stream else \
            contextlib.nullcontext():
        try:
            for rounds in itertools.count(1):
                said = []
                for chunk in answer_chunks(current):
                    said.append(chunk_text(chunk))
                    write(stream.feed(chunk))
                    if stream.done:
                        break
                out, calls = stream.end_round()
                write(out)
                searched = [] if stream.done or rounds > SEARCH_ROUNDS else \
                    run_served(handler, served, stream, calls, write)
                if not searched or stream.tool_called:
                    break
                current.close()  # its account slot, before the next round takes one
                current = search_round(chat, current, searched, "".join(said))
            tail = stream.finish()
        except UpstreamError as e:
            current.fail(e)
            if not exchange.stream:
                raise
            tail = AnthropicStream.error(e)
        finally:
            if current is not exchange:
                current.close()
    if exchange.stream:
        with lock:
            handler.end_stream(tail)
    else:
        handler.send_json(200, message_from_events(events + [tail]),
                          {"x-iflow-proxy-model": exchange.model})


def chunk_text(chunk):
    """The answer text in an OpenAI chat chunk."""
    return "".join(c["delta"]["content"] for c in chunk.get("choices") or ()
                   if isinstance(c, dict) and isinstance(c.get("delta"), dict)
                   and isinstance(c["delta"].get("content"), str))


def run_served(handler, served, stream, calls, write):
    """Run the calls the model made of server tools that run here, writing each one's blocks;
    [(the call as a chat tool call, the text of its result)] to continue the model with."""
    chat, searched = handler.server.chat, []
    for call in calls:
        kind, tool_input, result, text = served.run(
            chat, handler.server.config, call["name"], "".join(call["args"]),
            handler.client_name())
        write(stream.server_tool(kind, tool_input, result))
        searched.append(({"id": call["id"], "type": "function", "function": {
            "name": call["name"], "arguments": json.dumps(tool_input)}}, text))
    return searched


def store_response(handler, body, response, items):
    """Keep a finished response for previous_response_id and GET, unless store is false."""
    if body.get("store", True) and isinstance(response, dict) and response.get("id"):
        handler.server.chat.responses.put(handler.client_name(), response, items)


def answer_chunks(exchange):
    """An exchange's answer as OpenAI chat chunks (dicts), whatever its upstream spoke."""
    translator = OpenAIChunks(exchange.model) if exchange.protocol == "anthropic" else None
    if not exchange.stream:
        payload = exchange.answer.payload if translator is None else \
            anthropic_message_to_completion(exchange.answer.payload, exchange.model)
        yield from completion_to_chunks(payload)
        return
    for _data, chunk in exchange.chunks():
        yield from translator.chunks(chunk) if translator else (chunk,)


def search_round(chat, previous, searched, said=None):
    """The exchange that continues an answer after the searches (or fetches) it asked for:
    the same request with what the model ``said``, its calls and their results added, opened."""
    request = previous.request
    body = request.openai()
    messages = body["messages"] + [{"role": "assistant", "content": said or None, "tool_calls": [
        call for call, _text in searched]}] + [
        {"role": "tool", "tool_call_id": call["id"], "content": text} for call, text in searched]
    follow = ChatRequest("openai", dict(body, messages=messages), request.thinking,
                         request.effort, request_class=request.request_class,
                         client=request.client)
    follow.key = request.key
    return chat.exchange(follow, previous.conversation, cancelled=previous.cancelled).open()


def relay_responses(handler, exchange, body, items, headers):
    """An upstream's own Responses answer, relayed event by event (a failure after the
    first event closed with response.failed), and stored like a translated one."""
    if not exchange.stream:
        store_response(handler, body, exchange.answer.payload, items)
        handler.send_bytes(200, exchange.answer.raw, headers=headers)
        return
    handler.start_stream(headers)
    sequence = 0
    try:
        for data, event in exchange.chunks():
            sequence = event.get("sequence_number", sequence) if isinstance(
                event.get("sequence_number"), int) else sequence
            if event.get("type") in ("response.completed", "response.incomplete"):
                store_response(handler, body, event.get("response"), items)
            handler.write_chunk(sse(data, str(event.get("type"))))
        tail = b""
    except UpstreamError as e:
        exchange.fail(e)
        closing = ResponsesStream(body, ResponsesTools(()), body["model"])
        closing.sequence = sequence + 1
        tail = closing.failed(e)
    handler.end_stream(tail)


class Heartbeat:
    """Sends ``ping`` events on a stream while upstream is silent, so clients don't time out.

    Its thread starts only once the stream has been silent for ``interval`` (the server's
    watchdog looks every 0.2 s): most streams never are, and a thread started and joined per
    stream cost a tenth of the Anthropic streams' throughput."""

    def __init__(self, handler, interval, lock):
        self.handler, self.interval, self.lock = handler, interval, lock
        self._stop = threading.Event()
        self._starting = threading.Lock()  # start() and __exit__: no thread after the end
        self._thread = None

    def __enter__(self):
        self.handler.last_write = time.monotonic()
        self.handler.server.watch_silence(self)
        return self

    def __exit__(self, *exc):
        self.handler.server.watch_silence(self, False)
        with self._starting:
            self._stop.set()
            thread = self._thread
        if thread is not None:
            thread.join()

    def silent_since(self, now):
        return self._thread is None and now - self.handler.last_write >= self.interval

    def start(self):
        with self._starting:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, daemon=True, name="ping")
                self._thread.start()

    def _run(self):
        while True:
            with self.lock:
                if self._stop.is_set():
                    return
                if time.monotonic() - self.handler.last_write >= self.interval:
                    try:
                        self.handler.write_chunk(AnthropicStream.ping())
                    except ClientGone:
                        return
            if self._stop.wait(min(1.0, self.interval)):
                return


DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>iflow-proxy</title>
<style>
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;
color:#1d2329}
header{background:#1d2329;color:#fff;padding:10px 16px}header h1{font-size:17px;margin:0}
header p{margin:2px 0 0;color:#b9c2cc;font-size:12px}
main{padding:12px;max-width:1100px;margin:auto}
section{background:#fff;border:1px solid #dde2e7;border-radius:8px;margin:0 0 12px;
padding:10px 12px}
h2{font-size:15px;margin:0 0 8px}.wrap{overflow-x:auto}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:5px 8px;
border-bottom:1px solid #edf0f3;white-space:nowrap}th{font-size:12px;color:#5b6772}
.badge{display:inline-block;border-radius:10px;padding:1px 8px;font-size:12px;color:#fff}
.healthy{background:#2e8540}.busy{background:#2f6fb3}.cooling{background:#c77800}
.needs-login,.disabled{background:#b3261e}.muted{color:#6b7781;font-size:12px}
form{display:flex;gap:8px;flex-wrap:wrap;margin:4px 0}input,select{flex:1;min-width:120px;
padding:6px}button{padding:5px 10px;margin:1px;cursor:pointer}
#login,.manage{display:none}body.managed .manage{display:block}
body.managed form.manage{display:flex}body.managed th.manage{display:table-cell}.charts{display:grid;grid-template-columns:repeat(auto-fit,
minmax(300px,1fr));gap:10px}figure{margin:0;min-width:0}figcaption{font-size:13px;
display:flex;justify-content:space-between;gap:6px;align-items:baseline}
figcaption b{font-weight:600}svg{display:block;width:100%;height:170px;background:#fafbfc}
svg text{font-size:11px;fill:#5b6772}svg .bar:focus{outline:none}
svg .bar:focus rect.hit,svg .bar:hover rect.hit{fill:#1d2329;fill-opacity:.08}
.tip{font-size:12px;min-height:17px;color:#1d2329}.legend span{display:inline-block;
margin-right:10px;font-size:12px}.legend i{display:inline-block;width:10px;height:10px;
margin-right:4px}figure table{font-size:12px;margin-top:4px}figure .wrap{max-height:220px}
textarea{width:100%;box-sizing:border-box;font:12px/1.4 ui-monospace,monospace}
code{background:#eef1f4;padding:2px 4px;word-break:break-all}
</style></head><body>
<header><h1>iflow-proxy</h1><p id="summary">loading…</p></header>
<main>
<section id="login"><h2>Client key</h2><form id="keyform"><input id="key" type="password"
 autocomplete="off" placeholder="client key"><button>Show status</button></form>
<p class="muted">Kept in this browser tab only; never sent in a URL.</p></section>
<section><h2>Accounts</h2><div class="wrap"><table id="accounts"><thead><tr><th>Account</th>
<th>State</th><th>Kind</th><th>Key</th><th>In flight</th><th>Cooldown</th><th>Key expires</th>
<th>Today</th><th class="manage">Actions</th></tr></thead><tbody></tbody></table></div>
<form id="addform" class="manage"><input id="newkey" type="password" autocomplete="off"
 placeholder="API key"><input id="newnick" placeholder="nickname"><input id="newprovider"
 placeholder="provider (deepseek, zhipu…)"><select id="newprotocol"><option>openai</option>
<option>anthropic</option></select><button>Add account</button></form></section>
<section><h2>Usage</h2><div class="charts">
<figure id="c-hours-req" data-title="Requests, last 24 hours, by account"></figure>
<figure id="c-hours-tok" data-title="Tokens, last 24 hours, by model"></figure>
<figure id="c-days-req" data-title="Requests, last 30 days, by account"></figure>
<figure id="c-days-tok" data-title="Tokens, last 30 days, by model"></figure>
<figure id="c-days-cost" data-title="Cost, last 30 days, by model"></figure></div>
<div class="wrap"><table id="usage"><thead><tr><th>Account</th>
<th>Model</th><th>Requests</th><th>Failures</th><th>Input tokens</th><th>Output tokens</th>
<th>Avg latency</th></tr></thead><tbody></tbody></table></div>
<div class="wrap"><table id="clients"><thead><tr><th>Client key</th><th>Model</th>
<th>Requests today</th><th>Input tokens</th><th>Output tokens</th></tr></thead><tbody></tbody>
</table></div>
<div class="wrap"><table id="costs"><thead><tr><th>Cost of</th><th>Name</th><th>Today</th>
<th>Last 30 days</th><th>Price from</th></tr></thead><tbody></tbody></table></div></section>
<section><h2>Management</h2><form id="mgmtform"><input id="mgmtkey" type="password"
 autocomplete="off" placeholder="management key"><button>Use</button></form>
<p class="muted" id="mgmtnote">Actions appear with the management key (kept in this tab
 only).</p>
<div class="manage"><h2>Claude Code models</h2><form id="familyform"><input id="f-opus"
 placeholder="opus"><input id="f-sonnet" placeholder="sonnet"><input id="f-haiku"
 placeholder="haiku"><button>Save mapping</button></form>
<h2>Models: limits and prices</h2><form id="modelsform" style="display:block"><textarea
 id="modelsjson" rows="6" spellcheck="false" aria-label="config models as JSON"
 placeholder='{"my-model": {"window": 131072, "output": 16384, "prices": {"input": 0.3, "output": 1.2}}}'></textarea>
<button>Save models</button></form>
<h2>Client keys</h2><div class="wrap"><table id="clientkeys"><thead><tr><th>Name</th>
<th>Key</th><th>Requests/min</th><th>Tokens/day</th><th>Models</th><th>Expires</th><th></th>
</tr></thead><tbody></tbody></table></div><form id="newclient"><input id="cname"
 placeholder="name"><input id="crpm" placeholder="requests/min" inputmode="numeric"><input
 id="ctokens" placeholder="tokens/day" inputmode="numeric"><button>Create key</button></form>
<p id="created" class="muted"></p></div></section>
<section><h2>Recent errors</h2><div class="wrap"><table id="errors"><thead><tr><th>Time</th>
<th>Account</th><th>Model</th><th>Status</th><th>Kind</th></tr></thead><tbody></tbody></table>
</div></section>
</main>
<script>
"use strict";
var fragment = new URLSearchParams(location.hash.slice(1));
var key = fragment.get("key") || sessionStorage.getItem("iflowProxyKey") || "";
var mkey = sessionStorage.getItem("iflowProxyMgmtKey") || "";
if (fragment.get("key")) { sessionStorage.setItem("iflowProxyKey", key);
  history.replaceState(null, "", location.pathname); }
var palette = ["#2f6fb3", "#2e8540", "#c77800", "#8e44ad", "#b3261e", "#16a085", "#7f8c8d"];
function $(id) { return document.getElementById(id); }
function cell(row, text, cls) { var td = document.createElement("td");
  if (cls) { var b = document.createElement("span"); b.className = "badge " + cls;
    b.textContent = text; td.appendChild(b); } else { td.textContent = text; }
  row.appendChild(td); return td; }
function fill(id, rows, empty) { var body = document.querySelector("#" + id + " tbody");
  body.textContent = ""; rows.forEach(function (cells) { var tr = document.createElement("tr");
    cells.forEach(function (c) { if (c instanceof Node) { var td = document.createElement("td");
      td.appendChild(c); tr.appendChild(td); } else if (Array.isArray(c)) { cell(tr, c[0], c[1]);
      } else { cell(tr, c); } }); body.appendChild(tr); });
  if (!rows.length) { var tr = document.createElement("tr"); cell(tr, empty);
    body.appendChild(tr); } }
function duration(s) { var h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60);
  return h ? h + "h " + m + "m" : m ? m + "m " + (s % 60) + "s" : s + "s"; }
function manage(method, path, body) {
  return fetch("v0/management/" + path, {method: method, headers: {"X-Management-Key": mkey,
    "Content-Type": "application/json"}, body: body ? JSON.stringify(body) : undefined})
    .then(function (r) { return r.json().then(function (j) { if (!r.ok) {
      var why = (j.error && j.error.message) || ("HTTP " + r.status);
      if (r.status === 401 || r.status === 403) { refused(why); } else { alert(why); }
      throw r; } return j; }); });
}
function refused(why) { mkey = ""; sessionStorage.removeItem("iflowProxyMgmtKey");
  document.body.classList.remove("managed");
  $("mgmtnote").textContent = "The management key was refused (" + why + "). This page " +
    "stopped asking with it; enter the key again to retry."; }
function button(text, action) { var b = document.createElement("button"); b.textContent = text;
  b.addEventListener("click", function () { action().then(load, function () {}); });
  return b; }
function actions(a) { var span = document.createElement("span");
  var nick = encodeURIComponent(a.nickname);
  if (a.kind !== "pool") {
    span.appendChild(button("Make default", function () {
      return manage("PATCH", "accounts/" + nick, {"default": true}); }));
    span.appendChild(button("Rename", function () { var n = prompt("New nickname", a.nickname);
      return n ? manage("PATCH", "accounts/" + nick, {nickname: n}) : Promise.reject(); }));
    span.appendChild(button(a.state === "disabled" ? "Enable" : "Disable", function () {
      return manage("PATCH", "accounts/" + nick, {enabled: a.state === "disabled"}); }));
    span.appendChild(button("Remove", function () {
      return confirm("Remove account " + a.nickname + " and its credentials?") ?
        manage("DELETE", "accounts/" + nick) : Promise.reject(); })); }
  return span; }
var NS = "http://www.w3.org/2000/svg";
function svgEl(parent, name, attrs, text) { var e = document.createElementNS(NS, name);
  Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
  if (text !== undefined) e.textContent = text; parent.appendChild(e); return e; }
function compact(v) { var a = Math.abs(v);
  return a >= 1e9 ? +(v / 1e9).toFixed(1) + "G" : a >= 1e6 ? +(v / 1e6).toFixed(1) + "M" :
    a >= 1e3 ? +(v / 1e3).toFixed(1) + "K" : String(+v.toFixed(2)); }
function money(currency) { var sign = {USD: "$", CNY: "¥"}[currency] || currency + " ";
  return function (v) { return sign + (!v ? "0" : v >= 1 ? v.toFixed(2) : v >= 0.01 ? v.toFixed(3) :
    v.toPrecision(2)); }; }
function niceTop(max) { if (max <= 0) return 1; var p = Math.pow(10, Math.floor(Math.log10(max)));
  var top = [1, 2, 5, 10].map(function (m) { return m * p; }).find(function (t) {
    return t >= max; }); return top; }
function tickLabel(label, i, n) {  // counted back from now: every 6th hour, every 7th day
  if (label.length > 10) return (n - 1 - i) % 6 === 0 ? label.slice(11) + ":00" : null;
  return (n - 1 - i) % 7 === 0 ? label.slice(5) : null; }
// One stacked-bar chart in a <figure>: its total in the title, a value scale, a time axis,
// each bar's values on hover and keyboard focus (and read out), and a table view.
function chart(id, buckets, metric, group, fmt) {
  var fig = $(id), names = [], max = 0, total = 0;
  buckets.forEach(function (b) { var v = b[metric] || 0; total += v; max = Math.max(max, v);
    Object.keys(b[group] || {}).forEach(function (n) { if (names.indexOf(n) < 0) names.push(n);
    }); });
  fig.textContent = "";
  var cap = document.createElement("figcaption"), t = document.createElement("span");
  t.textContent = fig.getAttribute("data-title") + " — "; var b = document.createElement("b");
  b.textContent = fmt(total) + " total"; t.appendChild(b); cap.appendChild(t);
  var toggle = document.createElement("button"); toggle.type = "button";
  toggle.textContent = "Table"; toggle.setAttribute("aria-expanded", "false"); cap.appendChild(toggle);
  fig.appendChild(cap);
  var svg = svgEl(fig, "svg", {role: "group", "aria-label": fig.getAttribute("data-title")});
  var top = niceTop(max), scale = [0, 0.5, 1].map(function (f) { return fmt(top * f); }),
    W = Math.max(260, Math.round(svg.getBoundingClientRect().width) || 600), H = 170,
    L = 10 + 6.5 * Math.max.apply(null, scale.map(function (x) { return x.length; })),
    R = 8, T = 8, B = 20, pw = W - L - R, ph = H - T - B;
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  [0, 0.5, 1].forEach(function (f, k) { var y = T + ph * (1 - f);
    svgEl(svg, "line", {x1: L, x2: W - R, y1: y, y2: y, stroke: "#e3e7eb"});
    svgEl(svg, "text", {x: L - 4, y: y + 4, "text-anchor": "end"}, scale[k]); });
  var tip = document.createElement("div"); tip.className = "tip"; tip.setAttribute("aria-live",
    "polite"); tip.textContent = names.length ? "Hover or focus a bar for its values." :
    "Nothing yet.";
  var w = pw / buckets.length, rows = [];
  buckets.forEach(function (bk, i) {
    var parts = names.filter(function (n) { return ((bk[group] || {})[n] || {})[metric]; })
      .map(function (n) { return n + " " + fmt(bk[group][n][metric]); });
    var when = bk.label.length > 10 ? bk.label.slice(0, 10) + " " + bk.label.slice(11) + ":00"
      : bk.label, text = when + ": " + fmt(bk[metric] || 0) + (parts.length ? " (" +
      parts.join(", ") + ")" : "");
    rows.push([when, fmt(bk[metric] || 0)].concat(names.map(function (n) {
      return fmt(((bk[group] || {})[n] || {})[metric] || 0); })));
    var g = svgEl(svg, "g", {"class": "bar", tabindex: names.length ? "0" : "-1",
      "aria-label": text}); svgEl(g, "title", {}, text);
    svgEl(g, "rect", {"class": "hit", x: L + i * w, y: T, width: w, height: ph,
      fill: "transparent"});
    var y = T + ph;
    names.forEach(function (n, j) { var v = ((bk[group] || {})[n] || {})[metric] || 0;
      if (!v) return; var h = v / top * ph;
      svgEl(g, "rect", {x: L + i * w + 1, y: y - h, width: Math.max(1, w - 2), height: h,
        fill: palette[j % palette.length]}); y -= h; });
    ["mouseenter", "focus"].forEach(function (ev) { g.addEventListener(ev, function () {
      tip.textContent = text; }); });
    var tick = tickLabel(bk.label, i, buckets.length);
    var last = i === buckets.length - 1;  // (the newest bar's label ends at the edge)
    if (tick) svgEl(svg, "text", {x: last ? W - R : L + i * w + w / 2, y: H - 5,
      "text-anchor": last ? "end" : "middle"}, tick); });
  fig.appendChild(tip);
  var legend = document.createElement("div"); legend.className = "legend";
  names.forEach(function (n, j) { var sp = document.createElement("span"),
    i = document.createElement("i"); i.style.background = palette[j % palette.length];
    sp.appendChild(i); sp.appendChild(document.createTextNode(n)); legend.appendChild(sp); });
  fig.appendChild(legend);
  var wrap = document.createElement("div"); wrap.className = "wrap"; wrap.hidden = true;
  var table = document.createElement("table"), head = document.createElement("tr");
  ["Time", "Total"].concat(names).forEach(function (h) { var th = document.createElement("th");
    th.textContent = h; head.appendChild(th); });
  var thead = document.createElement("thead"); thead.appendChild(head); table.appendChild(thead);
  var body = document.createElement("tbody"); rows.forEach(function (r) {
    var tr = document.createElement("tr"); r.forEach(function (c) { cell(tr, c); });
    body.appendChild(tr); }); table.appendChild(body); wrap.appendChild(table);
  fig.appendChild(wrap);
  toggle.addEventListener("click", function () { wrap.hidden = !wrap.hidden;
    toggle.setAttribute("aria-expanded", String(!wrap.hidden)); openTables[id] = !wrap.hidden; });
  if (openTables[id]) { wrap.hidden = false; toggle.setAttribute("aria-expanded", "true"); }
}
var openTables = {};
function costChart(days) {  // the currency with the most cost, per model and day
  var sums = {}; days.forEach(function (d) { Object.keys(d.cost || {}).forEach(function (c) {
    Object.keys(d.cost[c]).forEach(function (m) { sums[c] = (sums[c] || 0) + d.cost[c][m]; });
  }); });
  var currency = Object.keys(sums).sort(function (a, b) { return sums[b] - sums[a]; })[0] ||
    "USD";
  chart("c-days-cost", days.map(function (d) { var models = {}, total = 0;
    Object.keys((d.cost || {})[currency] || {}).forEach(function (m) {
      models[m] = {cost: d.cost[currency][m]}; total += d.cost[currency][m]; });
    return {label: d.label, cost: total, models: models}; }), "cost", "models", money(currency));
}
function amounts(byCurrency) { return Object.keys(byCurrency || {}).map(function (c) {
  return money(c)(byCurrency[c]); }).join(" + ") || "–"; }
function costs(c) { var rows = [];
  [["models", "model"], ["accounts", "account"], ["clients", "client key"]].forEach(function (k) {
    Object.keys(c.days[k[0]]).forEach(function (name) { rows.push([k[1], name,
      amounts(c.today[k[0]][name]), amounts(c.days[k[0]][name]),
      k[0] === "models" ? c.price_sources[name] || "–" : ""]); }); });
  fill("costs", rows, "no priced usage yet: models without a price in the table, config " +
    "models/prices or the provider's list have no cost"); }
function render(s) {
  $("login").style.display = "none";
  var t = s.usage.today.sum;
  $("summary").textContent = "v" + s.version + " · " + s.listen + " · up " +
    duration(s.uptime_s) + " · " + s.strategy + " · " + s.waiting + " waiting · today " +
    t.requests + " requests, " + t.input_tokens + "/" + t.output_tokens + " tokens";
  fill("accounts", s.accounts.map(function (a) {
    var cool = a.cooldowns.map(function (c) { return (c.model === "*" ? "all" : c.model) + " " +
      Math.ceil(c.remaining_s) + "s"; }).join(", ");
    var row = [a.nickname + (a["default"] ? " (default)" : ""), [a.state, a.state], a.kind,
      a.key, a.in_flight + "/" + (a.max_concurrency || "∞"), cool || a.status_reason || "–",
      a.key_expires || "–", a.today.requests + " req, " + a.today.failures + " failed"];
    if (mkey) row.push(actions(a));
    return row; }), "no accounts: run python iflow_proxy.py login");
  fill("usage", s.usage.today.rows.map(function (r) { return [r.account, r.model, r.requests,
    Object.keys(r.failures).map(function (k) { return k + "×" + r.failures[k]; }).join(" ") || 0,
    r.input_tokens, r.output_tokens, r.requests ? Math.round(r.latency_ms / r.requests) + " ms"
    : "–"]; }), "no requests today");
  chart("c-hours-req", s.series.hours, "requests", "accounts", compact);
  chart("c-hours-tok", s.series.hours, "tokens", "models", compact);
  chart("c-days-req", s.series.days, "requests", "accounts", compact);
  chart("c-days-tok", s.series.days, "tokens", "models", compact);
  costChart(s.series.days);
  costs(s.costs);
  fill("clients", (s.clients_today || []).map(function (r) { return [r.client, r.model,
    r.requests, r.input_tokens, r.output_tokens]; }), "no client keys used today");
  fill("errors", s.recent_errors.map(function (e) { return [new Date(e.time * 1000)
    .toLocaleTimeString(), e.account, e.model, e.upstream_status || e.status, e.kind]; }),
    "none");
}
function loadManagement() {
  document.body.classList.toggle("managed", !!mkey);
  if (!mkey) return;
  manage("GET", "settings").then(function (s) { ["opus", "sonnet", "haiku"].forEach(
    function (f) { $("f-" + f).value = (s.claude_models || {})[f] || ""; }); $("mgmtnote")
    .textContent = "Management key accepted.";
    if (document.activeElement !== $("modelsjson")) $("modelsjson").value =
      Object.keys(s.models || {}).length ? JSON.stringify(s.models, null, 1) : ""; });
  manage("GET", "client-keys").then(function (k) { fill("clientkeys", k.client_keys.map(
    function (c) { return [c.name, c.key, c.rpm || "–", c.tokens_per_day || "–",
      (c.models || []).join(", ") || "all", c.expires || "–", button("Revoke", function () {
        return confirm("Revoke client key " + c.name + "?") ? manage("DELETE", "client-keys/" +
          encodeURIComponent(c.name)) : Promise.reject(); })]; }), "no client keys"); });
}
function load() {
  fetch("status", {headers: key ? {"Authorization": "Bearer " + key} : {}})
    .then(function (r) { if (r.status === 401) { $("login").style.display = "block";
      $("summary").textContent = "client key required"; return; }
      return r.json().then(render); })
    .catch(function (e) { $("summary").textContent = "proxy unreachable"; });
  loadManagement();
}
$("keyform").addEventListener("submit", function (ev) {
  ev.preventDefault(); key = $("key").value; sessionStorage.setItem("iflowProxyKey", key);
  load(); });
$("mgmtform").addEventListener("submit", function (ev) {
  ev.preventDefault(); mkey = $("mgmtkey").value; $("mgmtkey").value = "";
  sessionStorage.setItem("iflowProxyMgmtKey", mkey); load(); });
$("addform").addEventListener("submit", function (ev) { ev.preventDefault();
  var body = {api_key: $("newkey").value, protocol: $("newprotocol").value};
  if ($("newnick").value) body.nickname = $("newnick").value;
  if ($("newprovider").value) body.provider = $("newprovider").value;
  manage("POST", "accounts", body).then(function () { $("newkey").value = ""; load(); },
    function () {}); });
$("familyform").addEventListener("submit", function (ev) { ev.preventDefault(); var m = {};
  ["opus", "sonnet", "haiku"].forEach(function (f) { if ($("f-" + f).value) m[f] =
    $("f-" + f).value; });
  manage("PATCH", "settings", {claude_models: m}).then(load, function () {}); });
$("modelsform").addEventListener("submit", function (ev) { ev.preventDefault(); var models;
  try { models = JSON.parse($("modelsjson").value.trim() || "{}"); } catch (e) {
    alert("Not JSON: " + e.message); return; }
  manage("PATCH", "settings", {models: models}).then(function () { $("modelsjson").blur();
    load(); }, function () {}); });
$("newclient").addEventListener("submit", function (ev) { ev.preventDefault();
  var body = {name: $("cname").value};
  if ($("crpm").value) body.rpm = parseInt($("crpm").value, 10);
  if ($("ctokens").value) body.tokens_per_day = parseInt($("ctokens").value, 10);
  manage("POST", "client-keys", body).then(function (k) { $("created").textContent =
    "New key for " + k.name + " (shown once): " + k.key; load(); }, function () {}); });
load(); setInterval(load, 5000);
</script></body></html>
"""


def start_server(config, **kwargs):
    """Start a ProxyServer in a daemon thread; returns it (call shutdown() + server_close())."""
    server = ProxyServer(config, **kwargs)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="iflow-proxy",
                              daemon=True)
    thread.start()
    server.thread = thread
    return server


# ==================================================================================================
# CLI: argparse subcommands, one cmd_<name>(args, config) each, and main()
# ==================================================================================================

def format_probe(result, config):
    a = result.account
    lines = ["%s (%s, key %s) %s" % (a.nickname, a.kind, mask_secret(a.api_key),
                                     a.api_base(config))]
    if result.reachable:
        lines.append("  reachable   yes (%.0f ms%s)" % (
            result.latency_ms, ", HTTP %s" % result.http_status if result.http_status else ""))
    else:
        lines.append("  reachable   NO: %s" % result.error.message)
    lines.append("  key         " + result.key_verdict)
    lines.append("  signature   " + result.signature_verdict)
    if result.error is None:
        lines.append("  model       %s answered" % probe_model(a, config))
    elif result.reachable:
        lines.append("  answer      %s" % result.error.message)
    verdict = service_verdict(result)
    if verdict:
        lines.append("  service     " + verdict)
    return printable("\n".join(lines)).replace("\\x0a", "\n")


def read_hidden(prompt, stdin, what="key", limit=4096):
    """A line from stdin (piped) or a hidden prompt (terminal) — a secret never comes from argv."""
    if stdin is None:
        raise BadRequest("no %s given: pipe it on stdin or run in a terminal" % what)
    if stdin.isatty():
        import getpass
        return getpass.getpass(prompt).strip()
    return stdin.readline(limit).strip()


def read_secret(prompt, stdin):
    """An API key from stdin or a hidden prompt, checked for paste errors."""
    value = read_hidden(prompt, stdin)
    if not value:
        raise BadRequest("no key given on stdin")
    if not is_key_text(value):
        raise BadRequest("the key on stdin has spaces or non-ASCII characters; paste only the key")
    if len(value) < 8:
        raise BadRequest("the key on stdin is too short to be an API key")
    return value


def write_json(obj, out):
    """``obj`` as indented JSON on its own lines (every command's --json); exit code 0."""
    json.dump(obj, out, indent=2)
    out.write("\n")
    return 0


def _print_table(rows, out):
    """Aligned columns; every cell escaped (account reasons and names may hold upstream text)."""
    rows = [[printable(c) for c in row] for row in rows]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")


def cmd_serve(args, config):
    for warning in loose_permission_warnings(config):
        log.warning("%s", warning)
    # Run as a script, CPython keeps the file's whole syntax tree (some 17 MB here) until the
    # script's own code returns.  So on POSIX the server runs in a thread of its own and main()
    # returns: the interpreter frees the tree, then waits for that thread.  The signals below
    # must then reach the main thread (only it runs Python's handlers, and it sleeps in that
    # wait): every other thread is started with them blocked.
    elsewhere = getattr(args, "script", False) and os.name == "posix"
    stop_signals = {getattr(signal, name) for name in ("SIGINT", "SIGTERM")
                    if hasattr(signal, name)}
    if elsewhere:
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        server = ProxyServer(config)
        server.chat.registry.clean_leftovers()  # what a kill -9 left of this home's writes
        return _serve(server, config, elsewhere, stop_signals)
    finally:
        if elsewhere:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)


def _serve(server, config, elsewhere, stop_signals):
    accounts = server.chat.router.all_accounts()
    log.warning("iflow-proxy %s listening on %s (OpenAI base URL: %s/v1; %d account%s%s)",
                __version__, server.url, server.url, len(accounts),
                "" if len(accounts) == 1 else "s",
                ", client keys required" if config.client_keys else "")
    if not accounts:
        log.warning("no account yet: run `python iflow_proxy.py login` (or `login --api-key`) "
                    "in another shell; the server picks it up without a restart")
    signals = []

    def stop(signum, frame):
        signals.append(signum)
        if len(signals) > 1:  # a second signal: leave now
            log.warning("second signal: exiting at once")
            os._exit(1)
        log.warning("signal %d: no new connections; letting in-flight requests finish "
                    "(up to %gs; a second signal exits at once)", signum, config.shutdown_grace)
        if elsewhere:
            server.shutdown()  # waits for the serving thread's loop to end
        else:
            threading.Thread(target=server.shutdown, daemon=True).start()

    for signum in stop_signals:
        signal.signal(signum, stop)
    server.start_background()
    if not elsewhere:
        release_free_memory()
        return serve_until_stopped(server, config)
    when_script_returns(release_free_memory)  # (registered here, in the main thread: now)
    threading.Thread(target=serve_until_stopped, args=(server, config, True),
                     name="serve").start()
    return 0


def serve_until_stopped(server, config, detached=False):
    """Serve until shutdown(), let in-flight requests finish, clean up; the exit code."""
    run_file = os.path.join(config.home, "run.json")  # how `status` finds this server
    atomic_write_json(run_file, {"url": server.url, "pid": os.getpid(),
                                 "started": now_rfc3339(),
                                 # GET /status for whoever can read this home (0600 in 0700):
                                 # its owner, who may not hold a client key
                                 "status_token": server.status_token})
    try:
        server.serve_forever()
        server.socket.close()  # stop accepting while the in-flight requests finish
        if not server.drain(config.shutdown_grace):
            log.warning("%d request(s) still running after %gs; closing them",
                        server.active_requests, config.shutdown_grace)
            server.stop_streams()
    except Exception:
        if not detached:
            raise
        log.exception("the server failed")
        server.access_log.flush()
        os._exit(1)
    finally:
        server.server_close()  # saves usage figures
        with contextlib.suppress(OSError):
            os.unlink(run_file)
    log.warning("stopped")
    return 0


def when_script_returns(func):
    """Call ``func`` half a second from now: by then this script's top level has returned
    and CPython has freed its syntax tree."""
    timer = threading.Timer(0.5, func)
    timer.daemon = True
    timer.start()


def release_free_memory():
    """Hand the C heap's free pages back to the system (glibc's malloc_trim).  Compiling this
    file at start-up takes about 20 MB that Python frees at once but the C library keeps;
    a long-running server need not hold them.  A no-op where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (ImportError, OSError, AttributeError):  # musl, no ctypes: nothing to give back
        pass


def read_cookie(stdin):
    """A browser cookie string from stdin (piped) or a hidden prompt."""
    value = read_hidden("Cookie from platform.iflow.cn (input hidden): ", stdin, "cookie", 65536)
    if "BXAuth=" not in value:
        raise BadRequest("the cookie must contain BXAuth=… (copy the Cookie header of "
                         "platform.iflow.cn from your browser's developer tools)")
    return value


def cmd_login(args, config):
    if args.api_key + args.device + args.cookie > 1:
        raise BadRequest("choose one of --api-key, --device, --cookie")
    if args.nickname:
        validate_nickname(args.nickname)
    settings = {}
    if (args.provider or args.protocol) and not args.api_key:
        raise BadRequest("--provider and --protocol go with --api-key")
    if args.api_key:
        settings = api_key_settings(args.provider, args.protocol, args.base_url,
                                    not args.no_signing)
        kind, creds = "api-key", login_api_key(args, config, settings)
    elif args.cookie:
        kind, creds = "cookie", platform_api_key(config, read_cookie(args.stdin))
    elif args.device:
        kind, creds = "oauth", login_device(config, args.stdout)
    else:
        kind, creds = "oauth", login_oauth(config, args.stdout, args.stdin,
                                           browser=not args.no_browser)
    registry = AccountRegistry(config.home)
    identity, nickname = identity_of(kind, creds, settings), args.nickname
    accounts = registry.read()["accounts"]
    if settings.get("provider") and not nickname and not any(e.get("identity") == identity for e in accounts):
        nickname = unique_nickname(settings["provider"] + (
            "-anthropic" if settings["protocol"] == "anthropic" else ""),
            [e["nickname"] for e in accounts])
    entry, created = registry.upsert(identity, kind, creds, nickname=nickname,
                                     make_default=args.default, settings=settings)
    default = registry.read().get("default") == entry["id"]
    who = creds.get("email") or creds.get("phone") or creds.get("key_name") or ""
    where = " on %s (%s)" % (settings["provider"], settings["protocol"]) \
        if settings.get("provider") else ""
    args.stdout.write("%s account %s%s%s (%s, key %s)%s%s\n" % (
        "added" if created else "updated", entry["nickname"], " <%s>" % who if who else "",
        where, kind, mask_secret(creds.get("api_key")), ", the default" if default else "",
        ", verified" if kind == "api-key" and not args.no_verify else ""))
    return 0


def login_api_key(args, config, settings):
    preset = PROVIDERS.get(settings.get("provider"))
    key = read_secret("%s API key (input hidden): " % (preset.title if preset else "API"),
                      args.stdin)
    account = Account(id="login-" + fingerprint(key), nickname=args.nickname or "new",
                      kind="api-key", api_key=key, **settings)
    if not args.no_verify:
        upstream = UpstreamClient(config)
        result = probe_account(account, config, upstream)
        upstream.close()
        if not result.reachable:
            raise ProxyError("cannot verify the key: %s (use --no-verify to save it anyway)"
                             % result.error.message)
        if not result.key_ok:
            raise ProxyError("upstream did not accept the key %s: %s; not saved"
                             % (mask_secret(key), result.key_verdict))
    return {"api_key": key}


def cmd_refresh(args, config):
    registry = AccountRegistry(config.home)
    refresher = Refresher(registry, config)
    accounts = [a for a in registry.load_accounts() if a.kind in ("oauth", "cookie")]
    if args.nickname:
        accounts = [a for a in accounts if a.nickname.lower() == args.nickname.lower()]
        if not accounts:
            raise BadRequest("no OAuth or cookie account named %r" % args.nickname)
    failed = 0
    for account in accounts:
        renewed = refresher.refresh(account.id, force=args.force)
        after = registry.load(account.id)
        if renewed:
            args.stdout.write("%s: renewed (key %s, valid until %s)\n" % (
                after.nickname, mask_secret(after.api_key), after.expires))
        elif after.refresh_error and after.refresh_error != account.refresh_error or \
                after.status != "ok":
            failed += 1
            args.stdout.write("%s: NOT renewed: %s\n" % (after.nickname, after.refresh_error or
                                                          after.status_reason))
        else:
            args.stdout.write("%s: still fresh (valid until %s)\n" % (after.nickname,
                                                                       after.expires))
    if not accounts:
        args.stdout.write("no OAuth or cookie accounts to renew\n")
    return 1 if failed else 0


def cmd_import(args, config):
    if args.file:
        if not os.path.exists(args.file):
            raise BadRequest("no such file: %s" % args.file)
        kind, creds = _creds_from_file(read_json_file(os.path.abspath(args.file),
                                                      "credential file"))
        if not (creds.get("api_key") or creds.get("refresh_token") or creds.get("cookie")):
            raise BadRequest("%s holds no api_key, refresh_token or cookie" % args.file)
        found = [("file", args.file, kind, creds, None, "")]
    else:
        found = find_importable(args.env)
    registry = AccountRegistry(config.home)
    known = {e.get("identity"): e["nickname"] for e in registry.read()["accounts"]}
    if not found:
        args.stdout.write("nothing to import: no credentials of the iFlow CLI, CCS or "
                          "CLIProxyAPI found\n")
    for source, path, kind, creds, nickname, base_url in found:
        identity = identity_of(kind, creds)
        who = creds.get("email") or creds.get("phone") or "key " + mask_secret(
            creds.get("api_key"))
        if identity in known:
            args.stdout.write("skip    %-11s %s (%s): already here as %s\n" % (
                source, path, who, known[identity]))
            continue
        if args.dry_run:
            args.stdout.write("would   %-11s %s (%s, %s)\n" % (source, path, who, kind))
            known[identity] = "(this run)"
            continue
        taken = [e["nickname"] for e in registry.read()["accounts"]]
        nick = nickname if nickname and NICKNAME_RE.match(nickname) and \
            nickname.lower() not in {t.lower() for t in taken} else None
        entry, _created = registry.upsert(identity, kind, creds, nickname=nick,
                                          settings={"base_url": base_url} if base_url else None)
        known[identity] = entry["nickname"]
        args.stdout.write("import  %-11s %s (%s, %s) as %s\n" % (source, path, who, kind,
                                                                 entry["nickname"]))
    return 0


def account_rows(config):
    registry = AccountRegistry(config.home)
    return list(registry.load_accounts()) + list(pool_accounts(config))


def cmd_providers(args, config):
    if args.check:
        return check_providers(args, config)
    rows = [{"name": name, "title": p.title, "openai": p.openai, "anthropic": p.anthropic,
             "docs": p.doc, "claude": p.claude,
             "models": [{"id": m, "window": spec.window, "output": spec.output}
                        for m, spec in (p.models or {}).items()]}
            for name, p in PROVIDERS.items()]
    if args.json:
        return write_json(rows, args.stdout)
    for row in rows:
        protocols = [p for p in PROTOCOLS if row[p]]
        args.stdout.write("%s — %s (%s)\n" % (row["name"], row["title"], ", ".join(protocols)))
        for protocol in protocols:
            args.stdout.write("  %-9s %s\n" % (protocol, row[protocol]))
        args.stdout.write("  models    %s\n" % ", ".join(
            "%s (%s)" % (m["id"], _tokens(m["window"])) for m in row["models"]))
    args.stdout.write("\nAdd one: python iflow_proxy.py login --api-key --provider NAME "
                      "[--protocol openai|anthropic]\n")
    return 0


def _tokens(n):
    return "%dM" % (n // 1048576) if n % 1048576 == 0 else "%dK" % round(n / 1000.0) \
        if n < 1000000 else "%gM" % round(n / 1000000.0, 2)


def model_rows(accounts, config, catalog=None):
    """The models the accounts serve, then the config's own: {id, provider, window, output,
    source, accounts}; with a ``catalog`` what each upstream lists (limits it reports
    included), else the presets' tables."""
    served, models = {}, config.models
    reported = catalog.reported if catalog else None
    for a in accounts:
        preset = PROVIDERS.get(a.provider_name)
        listed = catalog.fetch(a) if catalog else None
        names = list(listed) if listed is not None else \
            list(preset.models or ()) if preset else ["*"]
        for name in names:
            spec = model_spec(name, a.provider_name, models, reported) if name != "*" else None
            row = served.setdefault((name.lower(), a.provider_name or "custom"), {
                "id": name, "provider": a.provider_name or "custom",
                "window": spec.window if spec else None, "output": spec.output if spec else None,
                "source": model_source(name, a.provider_name, models, reported)
                if spec else "", "accounts": []})
            row["accounts"].append(a.nickname)
    known = {name for name, _provider in served}
    for name in models:
        if not any(c in name for c in "*?[") and name.lower() not in known:
            spec = model_spec(name, "", models, reported)
            served[(name.lower(), "")] = {"id": name, "provider": "(config)",
                                          "window": spec.window, "output": spec.output,
                                          "source": "config", "accounts": []}
    return list(served.values())


def cmd_models(args, config):
    rows = model_rows([a for a in account_rows(config) if a.usable], config,
                      ModelCatalog(config, None))
    if args.json:
        return write_json(rows, args.stdout)
    if not rows:
        args.stdout.write("no usable accounts: add one with python iflow_proxy.py login "
                          "--api-key --provider NAME\n")
        return 0
    table = [("MODEL", "PROVIDER", "WINDOW", "OUTPUT", "FROM", "ACCOUNTS")]
    for r in rows:
        table.append(("any model (custom upstream)" if r["id"] == "*" else r["id"], r["provider"],
                      _tokens(r["window"]) if r["window"] else "-",
                      _tokens(r["output"]) if r["output"] else "-", r["source"] or "-",
                      ", ".join(r["accounts"])))
    _print_table(table, args.stdout)
    unknown = [r["id"] for r in rows if r["source"] == "default"]
    if unknown:
        args.stdout.write(
            "\n%d model(s) no table or list gives limits for (%s): %s window and %s output "
            "assumed. Set them in config.json, e.g. \"models\": {\"%s\": {\"window\": 131072, "
            "\"output\": 16384}}\n" % (len(unknown), ", ".join(unknown[:5]) + (
                ", …" if len(unknown) > 5 else ""), _tokens(UNKNOWN_MODEL.window),
                _tokens(UNKNOWN_MODEL.output), unknown[0]))
    return 0


def check_providers(args, config):
    """`providers --check`: each usable preset account's /models against its preset's table;
    1 when a list differs from the table (models gone, models new) or can't be read."""
    accounts = [a for a in account_rows(config) if a.usable and a.provider_name in PROVIDERS]
    if not accounts:
        raise BadRequest("no usable account of a provider preset to check: add one with "
                         "python iflow_proxy.py login --api-key --provider NAME")
    catalog, out = ModelCatalog(config, None), []
    for account in accounts:
        table = {m.lower(): m for m in PROVIDERS[account.provider_name].models or ()}
        listed = catalog.fetch(account, fresh=True)
        row = {"provider": account.provider_name, "account": account.nickname}
        if listed is None:
            out.append(dict(row, error="its /models could not be read (see the log)"))
            continue
        names = {m.lower(): m for m in listed}
        out.append(dict(row, gone=sorted(table[m] for m in set(table) - set(names)),
                        new=sorted(names[m] for m in set(names) - set(table)), listed=len(names)))
    if not args.json:
        for row in out:
            head = "%s (account %s)" % (row["provider"], row["account"])
            if "error" in row:
                args.stdout.write("%s: %s\n" % (head, row["error"]))
            elif not row["gone"] and not row["new"]:
                args.stdout.write("%s: the table and the list agree (%d models)\n"
                                  % (head, row["listed"]))
            for label, key in (("in the table, no longer listed", "gone"),
                               ("listed, not in the table", "new")):
                if row.get(key):
                    args.stdout.write("%s: %s: %s\n" % (head, label, ", ".join(row[key])))
    differ = sum(1 for row in out if "error" in row or row["gone"] or row["new"])
    if args.json:
        write_json(out, args.stdout)
    return 1 if differ else 0


def cmd_accounts(args, config):
    accounts = account_rows(config)
    if args.json:
        return write_json([account_json(a, config) for a in accounts], args.stdout)
    if not accounts:
        args.stdout.write("no accounts: run `python iflow_proxy.py login` (or `login --api-key`)\n")
        return 0
    rows = [("", "NICKNAME", "IDENTITY", "KIND", "KEY", "STATUS", "UPSTREAM")]
    for a in accounts:
        status = a.status + (": " + a.status_reason[:60] if a.status_reason else "") + \
            (" (renewal failing: %s)" % a.refresh_error[:60] if a.refresh_error else "")
        upstream = "" if a.api_base(config) == config.api_base and a.signing else \
            a.api_base(config) + ("" if a.signing else " (unsigned)")
        rows.append(("*" if a.default else "", a.nickname, a.email or "-", a.kind,
                     mask_secret(a.api_key), status, upstream))
    _print_table(rows, args.stdout)
    return 0


def cmd_use(args, config):
    entry = AccountRegistry(config.home).set_default(args.nickname)
    args.stdout.write("default account: %s\n" % entry["nickname"])
    return 0


def cmd_rename(args, config):
    entry = AccountRegistry(config.home).rename(args.old, args.new)
    args.stdout.write("renamed %s to %s\n" % (args.old, entry["nickname"]))
    return 0


def cmd_logout(args, config):
    registry = AccountRegistry(config.home)
    if args.all == bool(args.nickname):
        raise BadRequest("logout takes either a NICKNAME or --all")
    if args.all and not args.yes:
        count = len(registry.read()["accounts"])
        if not args.stdin or not args.stdin.isatty():
            raise BadRequest("logout --all removes %d account(s); add --yes to confirm" % count)
        args.stdout.write("Remove all %d accounts and their credential files? [y/N] " % count)
        args.stdout.flush()
        if args.stdin.readline().strip().lower() not in ("y", "yes"):
            args.stdout.write("nothing removed\n")
            return 1
    removed = registry.remove(None if args.all else args.nickname)
    args.stdout.write("removed %s\n" % (", ".join(e["nickname"] for e in removed) or "nothing"))
    return 0


def cmd_check(args, config):
    accounts = account_rows(config)
    if args.nickname:
        accounts = [a for a in accounts if a.nickname.lower() == args.nickname.lower()]
        if not accounts:
            raise BadRequest("no account named %r" % args.nickname)
    if not accounts:
        raise BadRequest("no accounts to check: run `python iflow_proxy.py login --api-key`")
    upstream, failed = UpstreamClient(config), 0
    for account in accounts:
        if not account.api_key:
            args.stdout.write("%s: no key stored (%s)\n" % (account.nickname,
                                                            account.status_reason))
            failed += 1
            continue
        result = probe_account(account, config, upstream)
        failed += not (result.reachable and result.key_ok)
        args.stdout.write(format_probe(result, config) + "\n")
    upstream.close()
    return 1 if failed else 0


# Claude Code (2.1.332) knows Claude models only.  For any other id it prints
# "[claude-code:unrecognized_model]", turns every feature on and takes its window from
# CLAUDE_CODE_MAX_CONTEXT_TOKENS; a settings ``modelPicker.options`` row with ``behavesAs``
# names a model it knows whose handling applies instead (read from its settings schema), and
# then the window is that model's: 200K, or 1M for an id ending in "[1m]" (never sent
# upstream).  The proxy settles everything sonnet-4-6's handling sends (adaptive thinking,
# effort, system turns, tool changes) for every upstream, so every model behaves as it, and
# CLAUDE_CODE_AUTO_COMPACT_WINDOW compacts before the real window fills.
CLAUDE_CODE_BEHAVES_AS = "claude-sonnet-4-6"
CLAUDE_CODE_WINDOWS = (200000, 1000000)  # the windows a behavesAs row can give
CLAUDE_CODE_OUTPUT = 32000  # the output Claude Code asks for unless told less


def launcher_models(config, model=None, accounts=()):
    """{family: (model as the launcher names it, its Model)} for Claude Code's three tiers."""
    families = claude_families(accounts, config.claude_models)
    chosen = {"opus": model or families["opus"], "sonnet": model or families["sonnet"],
              "haiku": families["haiku"]}
    out = {}
    for family, name in chosen.items():
        bare = name.split("/", 1)[1] if "/" in name and any(
            a.nickname == name.split("/", 1)[0] for a in accounts) else name
        providers = [a.provider_name for a in accounts if a.usable and serves(a, bare)]
        spec = model_spec(split_model_suffix(bare)[0], providers[0] if providers else "",
                          config.models)
        out[family] = (name, spec)
    return out


def claude_window(spec):
    """The window Claude Code works with for a model behaving as CLAUDE_CODE_BEHAVES_AS."""
    return CLAUDE_CODE_WINDOWS[1] if spec.window > CLAUDE_CODE_WINDOWS[0] else \
        CLAUDE_CODE_WINDOWS[0]


def claude_model_id(name, spec):
    """The id the launcher gives Claude Code: "[1m]" asks for the 1M window."""
    return name + "[1m]" if claude_window(spec) > CLAUDE_CODE_WINDOWS[0] and \
        not name.endswith("]") else name


def claude_capabilities(models):
    """CLAUDE_CODE_MODEL_CAPABILITIES ("glob=cap,-cap;…"): what each model can do through the
    proxy, for a Claude Code without the settings rows (``env``).  Context management is
    Anthropic's server-side clearing, which no other upstream does; effort and adaptive
    thinking need a thinking switch."""
    rules = []
    for name, spec in dict(models.values()).items():
        caps = ["mid_conv_system", "mid_conv_tool_change", "-context_management"]
        caps += ["adaptive_thinking", "effort", "per_turn_effort"] if spec.thinking else \
            ["-adaptive_thinking", "-effort", "-per_turn_effort"]
        rules.append("%s=%s" % (name, ",".join(caps)))
    return ";".join(rules)


def claude_env(base_url, token, config, model=None, accounts=(), rows=False):
    """The variables that point Claude Code (or any Anthropic client) at this proxy: the
    model of each tier, the window from the provider table (CLAUDE_CODE_MAX_CONTEXT_TOKENS,
    for a Claude Code without claude_settings' ``rows``) and when to compact, what each model
    can do, and request classes on every request."""
    models = launcher_models(config, model, accounts)
    ids = {family: claude_model_id(name, spec) if rows else name
           for family, (name, spec) in models.items()}
    spec = models["sonnet"][1]
    return {"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_AUTH_TOKEN": token,
            "ANTHROPIC_MODEL": ids["sonnet"],
            "ANTHROPIC_DEFAULT_OPUS_MODEL": ids["opus"],
            "ANTHROPIC_DEFAULT_SONNET_MODEL": ids["sonnet"],
            "ANTHROPIC_DEFAULT_HAIKU_MODEL": ids["haiku"],
            "ANTHROPIC_SMALL_FAST_MODEL": ids["haiku"],
            "CLAUDE_CODE_MAX_CONTEXT_TOKENS": str(spec.window),
            "CLAUDE_CODE_AUTO_COMPACT_WINDOW": str(compact_window(spec)),
            # answers no longer than the model allows (Claude Code asks for 32000 by default)
            "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(min(spec.output, CLAUDE_CODE_OUTPUT)),
            "CLAUDE_CODE_MODEL_CAPABILITIES": claude_capabilities(models),
            "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1",
            # every request says what it is (x-claude-code-request-class): see REQUEST_LANES
            "CLAUDE_CODE_GATEWAY_HINT_HEADERS": "1"}


def claude_settings(config, model=None, accounts=()):
    """Settings for ``claude --settings``: a /model row per model, behaving as a Claude model
    Claude Code knows (see CLAUDE_CODE_BEHAVES_AS)."""
    rows, seen = [], set()
    for name, spec in launcher_models(config, model, accounts).values():
        if name not in seen:
            seen.add(name)
            rows.append({"model": claude_model_id(name, spec), "behavesAs": CLAUDE_CODE_BEHAVES_AS,
                         "label": name, "description": "%s via iflow-proxy (%dK window)"
                         % (name, spec.window // 1000)})
    # WebFetch first asks api.anthropic.com whether a domain may be fetched, which fails
    # behind a gateway; this settings key (read from the 2.1.332 binary) skips that check
    return {"modelPicker": {"options": rows}, "skipWebFetchPreflight": True}


def compact_window(spec):
    """When Claude Code should compact: the window less room for an answer and the summary."""
    return max(spec.window // 2, spec.window - min(spec.output, 32000) - 8000)


def format_env(variables, shell):
    """``variables`` as assignments for sh/bash/zsh, fish or PowerShell."""
    lines = []
    for key, value in variables.items():
        if shell == "fish":
            lines.append("set -gx %s '%s'" % (key, value.replace("\\", "\\\\").replace("'", "\\'")))
        elif shell == "powershell":
            lines.append("$env:%s = '%s'" % (key, value.replace("'", "''")))
        else:
            lines.append("export %s='%s'" % (key, value.replace("'", "'\"'\"'")))
    return "\n".join(lines) + "\n"


def _local_url(config):
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    return "http://%s:%d" % ("[%s]" % host if ":" in host else host, config.port)


def _client_token(config):
    return config.client_keys[0].key if config.client_keys else "iflow-proxy"


def cmd_env(args, config):
    token = _client_token(config)
    if config.client_keys and not args.reveal_key:
        token = "<client key: add --reveal-key to print it>"
        sys.stderr.write("iflow_proxy: client keys are configured; --reveal-key prints one "
                         "into the output\n")
    accounts = account_rows(config)
    if args.codex:
        model, spec = codex_models(config, args.model, accounts)[0]
        args.stdout.write(codex_toml(_local_url(config), model, spec))
        return 0
    variables = claude_env(_local_url(config), token, config, args.model, accounts)
    args.stdout.write(format_env(variables, args.shell))
    return 0


def ask_local_proxy(config, url, headers=None, timeout=1.0):
    """(status, body) of a GET to an iflow-proxy on this machine, or None when nothing, or
    something else, answers there."""
    client = UpstreamClient(config.replace(proxy="direct", connect_timeout=timeout,
                                           first_byte_timeout=timeout, idle_timeout=timeout))
    try:
        response = client.open("GET", url, headers or {})
        body = response.read_all(SSE_HEAD_LIMIT)
    except ProxyError:
        return None
    finally:
        client.close()
    if not (response.headers.get("Server") or "").startswith("iflow-proxy/"):
        return None
    return response.status, body


def running_proxy_url(config, timeout=1.0):
    """The URL of an iflow-proxy already serving this config's port, or None."""
    url = _local_url(config)
    return url if ask_local_proxy(config, url + "/healthz", timeout=timeout) else None


def find_agent(explicit, variable, name, package):
    """The path of an agent's executable: given, from ``variable``, or on PATH."""
    import shutil
    executable = explicit or os.environ.get(variable) or shutil.which(name)
    if not executable or not os.path.exists(executable):
        raise ProxyError("%s is not installed (no `%s` on PATH): install it with `npm install "
                         "-g %s`, or pass --%s-bin" % (name.title(), name, package, name))
    return executable


def start_launcher_proxy(config):
    """(url, server or None): a proxy already serving this config's port, else one started
    in-process on a free loopback port, its log kept off the agent's terminal."""
    url = running_proxy_url(config)
    if url is not None:
        return url, None
    for handler in log.handlers:
        if isinstance(handler, logging.StreamHandler) and \
                not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)
    server = start_server(config.replace(host=DEFAULT_HOST, port=0))
    return server.url, server


def run_agent(argv, env, server):
    """Run an agent with Ctrl-C its own; returns its exit code; stops ``server`` after."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return run_program(argv, env)
    except OSError as e:
        raise ProxyError("cannot run %s: %s" % (argv[0], e.strerror or e))
    finally:
        signal.signal(signal.SIGINT, previous)
        if server is not None:
            server.shutdown()
            server.server_close()


def cmd_claude(args, config):
    executable = find_agent(args.claude_bin, "IFLOW_PROXY_CLAUDE_BIN", "claude",
                            "@anthropic-ai/claude-code")
    url, server = start_launcher_proxy(config)
    accounts, extra = account_rows(config), list(args.claude_args)
    rows = not any(a == "--settings" or a.startswith("--settings=") for a in extra)
    if rows:  # the user's own --settings stand alone
        extra = ["--settings", json.dumps(claude_settings(config, args.model, accounts))] + extra
    ours = claude_env(url, _client_token(config), config, args.model, accounts, rows)
    kept = [k for k in ours if k.startswith("CLAUDE_CODE_") and os.environ.get(k)]
    for key in kept:  # the user's own settings win over the ones derived from the table
        ours.pop(key)
    return run_agent([executable] + extra, dict(os.environ, **ours), server)


# --- Codex ---------------------------------------------------------------------------------------
# Codex (0.171) speaks only the Responses API.  The launcher points it at the proxy with `-c`
# overrides (a model provider with wire_api "responses", its key from an environment variable,
# never on the command line) and a model catalog (config model_catalog_json): Codex has no model
# discovery and, for a model missing from its catalog, warns "Model metadata for … not found"
# and assumes generic limits.  A catalog entry needs Codex's own instructions; they are taken,
# when it runs, from the catalog bundled with the installed Codex (`codex debug models
# --bundled`), from the newest entry that is not code-mode only, so nothing of Codex's is
# copied here and the prompt stays the one that Codex version ships.
CODEX_PROVIDER = "iflow_proxy"
CODEX_KEY_VARIABLE = "IFLOW_PROXY_CODEX_KEY"
CODEX_DROPPED = ("max_context_window", "comp_hash", "upgrade", "availability_nux",
                 "additional_speed_tiers", "service_tiers", "tool_mode", "multi_agent_version",
                 "multi_agent_reasoning_effort", "use_responses_lite")


def codex_models(config, model=None, accounts=()):
    """[(model, Model)] for Codex's catalog: the chosen model first, then every model the
    usable accounts' providers list (iFlow's for iFlow accounts), each once."""
    chosen = model or launcher_models(config, None, accounts)["sonnet"][0]
    names = [chosen]
    for account in accounts:
        if account.usable:
            preset = PROVIDERS.get(account.provider_name or "iflow")
            names += list((preset.models if preset else None) or ())
    out, seen = [], set()
    for name in names:
        if name.lower() not in seen:
            seen.add(name.lower())
            bare = split_model_suffix(name.split("/", 1)[1] if name.split("/", 1)[0] in {
                a.nickname for a in accounts} else name)[0]
            owner = next((a.provider_name for a in accounts if a.usable and serves(a, bare)),
                         "")
            out.append((name, model_spec(bare, owner, config.models)))
    return out


def codex_template(bundled):
    """The entry of Codex's bundled catalog whose instructions and tool setup a proxied model
    takes: the first (newest) that is not code-mode only, else the first; None if none."""
    entries = [m for m in (bundled or {}).get("models") or () if isinstance(m, dict) and
               (m.get("base_instructions") or (m.get("model_messages") or {}).get(
                   "instructions_template"))]
    plain = [m for m in entries if m.get("tool_mode") in (None, "")]
    return (plain or entries or [None])[0]


def codex_catalog(template, models):
    """A Codex model catalog (its /models shape) for ``models``: each from ``template`` with
    the model's own name, window, compaction point, reasoning levels and input kinds."""
    out = []
    for priority, (name, spec) in enumerate(models, 1):
        entry = {k: v for k, v in template.items() if k not in CODEX_DROPPED}
        efforts = [{"effort": e, "description": "%s thinking" % e.title()}
                   for e in ("low", "medium", "high")] if spec.thinking else []
        entry.update(slug=name, display_name=name, priority=priority, visibility="list",
                     description="%s through iflow-proxy (%dK window)" % (name,
                                                                         spec.window // 1000),
                     context_window=spec.window, auto_compact_token_limit=compact_window(spec),
                     effective_context_window_percent=95, supported_in_api=True,
                     supported_reasoning_levels=efforts,
                     default_reasoning_level="medium" if efforts else None,
                     supports_reasoning_summaries=bool(efforts), support_verbosity=False,
                     default_verbosity=None, experimental_supported_tools=[],
                     supports_search_tool=False, supports_reasoning_effort_updates=False,
                     input_modalities=["text", "image"] if spec.vision else ["text"])
        out.append(entry)
    return {"models": out}


def codex_overrides(url, model, spec, catalog_path=None):
    """Codex's `-c key=value` overrides (TOML values) that send it through the proxy."""
    provider = "{name=\"iflow-proxy\", base_url=%s, env_key=\"%s\", wire_api=\"responses\"}" % (
        json.dumps(url + "/v1"), CODEX_KEY_VARIABLE)
    pairs = [("model_providers." + CODEX_PROVIDER, provider),
             ("model_provider", json.dumps(CODEX_PROVIDER)), ("model", json.dumps(model)),
             ("model_context_window", str(spec.window)),
             ("model_auto_compact_token_limit", str(compact_window(spec)))]
    if catalog_path:
        pairs.append(("model_catalog_json", json.dumps(catalog_path)))
    return [arg for key, value in pairs for arg in ("-c", "%s=%s" % (key, value))]


def codex_toml(url, model, spec):
    """The same as a config.toml block (``env --codex``)."""
    return ("# in ~/.codex/config.toml; export %s=<a client key, or anything without keys>\n"
            "model_provider = \"%s\"\nmodel = %s\nmodel_context_window = %d\n"
            "model_auto_compact_token_limit = %d\n\n[model_providers.%s]\n"
            "name = \"iflow-proxy\"\nbase_url = %s\nenv_key = \"%s\"\nwire_api = \"responses\"\n"
            % (CODEX_KEY_VARIABLE, CODEX_PROVIDER, json.dumps(model), spec.window,
               compact_window(spec), CODEX_PROVIDER, json.dumps(url + "/v1"),
               CODEX_KEY_VARIABLE))


def bundled_codex_catalog(executable, env, timeout=60):
    """The catalog bundled with the installed Codex (`codex debug models --bundled`), or None
    when this Codex can't say."""
    try:
        out = run_program([executable, "debug", "models", "--bundled"], env, timeout)
        return json.loads(out.stdout.decode("utf-8")) if out.returncode == 0 else None
    except (OSError, ValueError):
        return None


def run_program(argv, env, timeout=None):
    """Run a program: with a ``timeout``, its output captured (a completed process; an
    overrun is a TimeoutError), else attached to this terminal (its exit code)."""
    import subprocess
    if timeout is None:
        return subprocess.call(argv, env=env)
    try:
        return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise TimeoutError("%s did not finish in %ss" % (argv[0], timeout)) from e


def cmd_codex(args, config):
    executable = find_agent(args.codex_bin, "IFLOW_PROXY_CODEX_BIN", "codex", "@openai/codex")
    accounts = account_rows(config)
    models = codex_models(config, args.model, accounts)
    env = dict(os.environ, **{CODEX_KEY_VARIABLE: _client_token(config)})
    template = codex_template(bundled_codex_catalog(executable, env))
    catalog_path = None
    if template is not None:
        catalog_path = os.path.join(config.home, "codex-models.json")
        atomic_write_json(catalog_path, codex_catalog(template, models))
    else:
        log.warning("this Codex can't list its bundled models; it will warn that it has no "
                    "metadata for %s", models[0][0])
    url, server = start_launcher_proxy(config)
    overrides = codex_overrides(url, models[0][0], models[0][1], catalog_path)
    return run_agent([executable] + overrides + list(args.codex_args), env, server)


def running_url(config):
    """The URL of the server of this home (its run.json), else of the configured port."""
    url = run_file(config).get("url")
    return url if isinstance(url, str) and _is_http_url(url) else _local_url(config)


def run_file(config):
    """What the server of this home wrote in run.json ({} when none runs)."""
    try:
        return read_json_file(os.path.join(config.home, "run.json"), "run file")
    except (FileNotFoundError, ConfigError):
        return {}


def fetch_status(config, timeout=2.0):
    """/status of a proxy running for this home (whatever its port), or None."""
    url = running_url(config)
    token = run_file(config).get("status_token")
    answer = ask_local_proxy(config, url + "/status", {"Authorization": "Bearer " + (
        token if isinstance(token, str) and token else _client_token(config))}, timeout)
    if answer is None:
        return None
    status, body = answer
    if status == 401:
        raise ProxyError("the running proxy at %s wants a client key this config doesn't "
                         "have" % url)
    try:
        return json.loads(body.decode("utf-8")) if status == 200 else None
    except ValueError:
        return None


def offline_status(config):
    """The status we can tell from files alone (no server running)."""
    summary = UsageBook(os.path.join(config.home, "usage.json")).summary()
    today = today_by_account(summary)
    accounts = [dict(account_json(a, config), state=a.status, in_flight=0, cooldowns=[],
                     key_expires=a.expires or None, today=today[a.nickname])
                for a in account_rows(config)]
    return {"version": __version__, "listen": None, "accounts": accounts, "usage": summary,
            "recent_errors": []}


def format_status(status):
    lines = []
    if status.get("listen"):
        lines.append("iflow-proxy %s at %s, up %ds, strategy %s, %d waiting" % (
            status["version"], status["listen"], status["uptime_s"], status["strategy"],
            status["waiting"]))
    else:
        lines.append("iflow-proxy is not running here; from the files in its home:")
    rows = [("", "NICKNAME", "KIND", "KEY", "STATE", "IN-FLIGHT", "COOLDOWN", "TODAY")]
    for a in status["accounts"]:
        cooldown = ", ".join("%s %ds" % ("all" if c["model"] == "*" else c["model"],
                                         c["remaining_s"]) for c in a["cooldowns"])
        rows.append(("*" if a["default"] else "", a["nickname"], a["kind"], a["key"],
                     a["state"] + (": " + a["status_reason"][:40] if a.get("status_reason")
                                   and a["state"] != "ok" else ""),
                     str(a["in_flight"]), cooldown or "-", "%d req, %d failed" % (
                         a["today"]["requests"], a["today"]["failures"])))
    out = io.StringIO()
    if len(rows) > 1:
        _print_table(rows, out)
    else:
        out.write("no accounts\n")
    lines.append(out.getvalue().rstrip("\n"))
    today = status["usage"]["today"]["sum"]
    lines.append("today: %d requests, %d failures, %d input / %d output tokens" % (
        today["requests"], sum(today["failures"].values()), today["input_tokens"],
        today["output_tokens"]))
    clients = {}
    for row in status.get("clients_today", []):
        mine = clients.setdefault(row["client"], [0, 0, 0])
        mine[0] += row["requests"]
        mine[1] += row["input_tokens"]
        mine[2] += row["output_tokens"]
    for name, (requests, tokens_in, tokens_out) in sorted(clients.items()):
        lines.append(printable("  client key %s: %d requests, %d input / %d output tokens today"
                               % (name, requests, tokens_in, tokens_out)))
    for e in status.get("recent_errors", [])[:5]:
        lines.append(printable("  error %s %s %s: %s (%s)" % (
            time.strftime("%H:%M:%S", time.localtime(e["time"])), e["account"], e["model"],
            e.get("upstream_status") or e["status"], e["kind"])))
    return "\n".join(lines) + "\n"


def cmd_status(args, config):
    status = fetch_status(config) or offline_status(config)
    if args.json:
        return write_json(status, args.stdout)
    args.stdout.write(format_status(status))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``iflow_proxy: error: ...`` and exit code 2."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", _help_formatter)
        super().__init__(**kwargs)

    def error(self, message):
        raise BadRequest("%s (see %s --help)" % (message, self.prog))


def _help_formatter(prog):
    """argparse's help formatter at the width it would ask shutil for (COLUMNS, else the
    terminal's, else 80), without importing shutil, which loads the bz2 and lzma modules into
    every server."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
        except (AttributeError, ValueError, OSError):
            columns = 80
    return argparse.HelpFormatter(prog, width=max(columns, 12) - 2)


def build_parser():
    parser = _Parser(prog="iflow_proxy.py", description="One local OpenAI- and Anthropic-"
                     "compatible endpoint for iFlow and every OpenAI- or Anthropic-compatible "
                     "provider (see the providers command).")
    parser.add_argument("--version", action="version", version="iflow-proxy " + __version__)
    parser.add_argument("--home", help="state directory (default $IFLOW_PROXY_HOME or "
                        "~/.iflow-proxy)")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    noise.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(func, text, *switches):
        """The subcommand cmd_<name> (``func``) with its on/off ``switches``: (flag, help)."""
        p = sub.add_parser(func.__name__[4:], help=text)
        p.set_defaults(func=func)
        for flag, doc in switches:
            p.add_argument(flag, action="store_true", help=doc)
        return p

    as_json = ("--json", "machine-readable output")
    p = command(cmd_serve, "run the proxy")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 11450)")
    p.add_argument("--client-key", action="append", dest="client_keys", metavar="KEY",
                   help="require this client key (repeatable; visible in `ps`: prefer "
                   "IFLOW_PROXY_CLIENT_KEYS or --client-keys-file)")
    p.add_argument("--client-keys-file", metavar="PATH",
                   help="require the client keys in this file, one per line")
    p.add_argument("--log-file", help="also write logs to this file")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    p = command(cmd_login, "add an account (browser OAuth by default)",
                ("--api-key", "store an API key read from stdin or a hidden prompt"),
                ("--no-browser", "headless: iFlow's code-display flow, or paste the callback URL"),
                ("--device", "RFC 8628 device-code login"),
                ("--cookie", "get a platform API key with a browser cookie (BXAuth) from stdin"),
                ("--no-signing", "plain OpenAI-compatible upstream: no iFlow headers or signature"),
                ("--no-verify", "store without checking upstream"),
                ("--default", "make it the default account"))
    p.add_argument("--callback-port", type=int, metavar="N",
                   help="port of the local OAuth callback (default 11451)")
    p.add_argument("--nickname", help="name for the account")
    p.add_argument("--provider", metavar="NAME",
                   help="with --api-key: a provider preset (see the providers command)")
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="with --provider: the upstream's API (default openai)")
    p.add_argument("--base-url", help="this account's own base URL (overrides the preset's)")

    command(cmd_providers, "list the provider presets, their URLs and models", as_json,
            ("--check", "compare each preset account's /models with the table (1: they "
             "differ)"))
    command(cmd_models, "list the models the configured accounts can serve", as_json)
    command(cmd_accounts, "list accounts", as_json)
    command(cmd_use, "set the default account").add_argument("nickname")
    p = command(cmd_rename, "rename an account")
    p.add_argument("old")
    p.add_argument("new")
    command(cmd_logout, "remove an account (or --all)", ("--all", "remove every account"),
            ("--yes", "don't ask for confirmation")).add_argument("nickname", nargs="?")

    p = command(cmd_env, "print ANTHROPIC_* variables that point clients here",
                ("--reveal-key", "print a configured client key as ANTHROPIC_AUTH_TOKEN"))
    p.add_argument("--shell", choices=("sh", "bash", "zsh", "fish", "powershell"), default="sh")
    p.add_argument("--model", help="model for ANTHROPIC_MODEL (default: config claude_models)")

    p.add_argument("--codex", action="store_true",
                   help="print a Codex config.toml block instead")

    p = command(cmd_claude, "run Claude Code through the proxy")
    p.add_argument("--model", help="model for Claude Code (default: config claude_models)")
    p.add_argument("--claude-bin", help="path of the claude executable (default: on PATH)")
    p.add_argument("claude_args", nargs="*", metavar="CLAUDE_ARG",
                   help="arguments for claude (everything after this command's own options)")

    p = command(cmd_codex, "run Codex through the proxy (the Responses API)")
    p.add_argument("--model", help="model for Codex (default: config claude_models' sonnet)")
    p.add_argument("--codex-bin", help="path of the codex executable (default: on PATH)")
    p.add_argument("codex_args", nargs="*", metavar="CODEX_ARG",
                   help="arguments for codex (everything after this command's own options)")

    command(cmd_refresh, "renew OAuth tokens and cookie keys that are due",
            ("--force", "renew even if not due yet")).add_argument("nickname", nargs="?")
    p = command(cmd_import, "import credentials of the iFlow CLI, CCS, CLIProxyAPI",
                ("--dry-run", "show what would be imported"))
    p.add_argument("file", nargs="?", help="one credential file to import")
    command(cmd_status, "show accounts, cooldowns and usage", as_json)
    command(cmd_check, "probe each account's upstream").add_argument("nickname", nargs="?")
    return parser


def setup_logging(config, verbose=False, quiet=False, stream=None):
    level = logging.DEBUG if verbose else logging.WARNING if quiet else \
        getattr(logging, config.log_level.upper())
    log.handlers[:] = []
    log.propagate = False
    log.setLevel(level)
    # What our format never shows, logging need not work out per line (the logging HOWTO's
    # "Optimization" section): thread and process names.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(EscapingFormatter())
    log.addHandler(handler)
    if config.log_file:
        log.addHandler(open_log_file(config.log_file, handler.formatter))


def open_log_file(path, formatter):
    """A handler appending to ``path``: created 0600 (with missing directories 0700); nothing
    that exists already has its mode changed, but a log others can read gets a warning."""
    path = os.path.abspath(os.path.expanduser(path))
    ensure_private_dir(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        loose = os.name == "posix" and os.fstat(fd).st_mode & 0o077
    finally:
        os.close(fd)
    if loose:
        log.warning("the log file %s is readable by other users; run: chmod 600 %s", path, path)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(formatter)
    return file_handler


AGENTS = ("claude", "codex")  # the launcher commands: the rest of the line is the agent's


def split_agent_argv(argv):
    """(argv for our parser, argv for the agent, the agent): a launcher's own options come
    first, the rest is the agent's (claude's or codex's)."""
    argv = list(argv)
    for i, token in enumerate(argv):
        if token in AGENTS and (i == 0 or argv[i - 1] != "--home"):
            break
    else:
        return argv, None, None
    agent, own = argv[i], ("--model", "--%s-bin" % argv[i])
    ours, rest, j = argv[:i + 1], argv[i + 1:], 0
    while j < len(rest):
        token = rest[j]
        if token in own and j + 1 < len(rest):
            ours += rest[j:j + 2]
            j += 2
        elif token.startswith(tuple(o + "=" for o in own)):
            ours.append(token)
            j += 1
        else:
            break
    theirs = rest[j:]
    return ours, theirs[1:] if theirs[:1] == ["--"] else theirs, agent


def print_traceback(stream):
    """The exception being handled, with its traceback (for --verbose)."""
    import traceback
    traceback.print_exc(file=stream)


def main(argv=None, stdin=None, stdout=None, stderr=None, env=None, script=False):
    """Run one CLI command; returns the exit code (0 ok, 1 runtime failure, 2 bad input).
    ``script``: this file runs as a script (see cmd_serve)."""
    stderr = stderr or sys.stderr
    ours, agent_args, agent = split_agent_argv(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(ours)
        if agent is not None:
            setattr(args, agent + "_args", agent_args)
    except BadRequest as e:
        stderr.write("iflow_proxy: error: %s\n" % e.message)
        return 2
    except SystemExit as e:  # --help, --version
        return e.code or 0
    args.stdin = stdin if stdin is not None else sys.stdin
    args.stdout = stdout or sys.stdout
    args.env = os.environ if env is None else env
    args.script = script
    flags = {key: getattr(args, key, None)
             for key in ("host", "port", "client_keys", "client_keys_file", "log_file",
                         "log_level", "callback_port")}
    try:
        config = load_config(args.home, flags, env)
        setup_logging(config, args.verbose, args.quiet, stderr)
        return args.func(args, config)
    except ProxyError as e:
        if args.verbose:
            print_traceback(stderr)
        stderr.write("iflow_proxy: error: %s\n" % e.message)
        return e.exit_code
    except KeyboardInterrupt:
        stderr.write("iflow_proxy: interrupted\n")
        return 130
    except OSError as e:
        if args.verbose:
            print_traceback(stderr)
        stderr.write("iflow_proxy: error: %s%s\n" % (e.strerror or e, ": " + e.filename
                                                      if getattr(e, "filename", None) else ""))
        return 1


if __name__ == "__main__":
    sys.exit(main(script=True))
