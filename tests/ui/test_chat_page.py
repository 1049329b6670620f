"""The chat page at `/` in a headless Chromium (Debian's, driven by Playwright 1.65.2) against a
running `herd serve` (started by crates/herd-cli/tests/openai_client.rs).
Usage: test_chat_page.py BASE_URL MODEL API_KEY SCREENSHOT_PATH

The browser is /usr/bin/chromium, or $HERD_CHROMIUM; Playwright never downloads one.
Every check raises on failure; the script prints one line per check.
"""
import json
import os
import re
import sys
import time
import urllib.request

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sys.exit("no playwright in this Python: run tests/fixtures/fetch.sh (it pins playwright 1.65.2)")

base, model, key, screenshot = sys.argv[1:5]
base = base.rstrip("/")
chromium = os.environ.get("HERD_CHROMIUM", "/usr/bin/chromium")


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print("ok:", name, flush=True)


def get(path, auth=True):
    req = urllib.request.Request(base + path)
    if auth:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, dict(r.headers), r.read().decode()


def post(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def metrics():
    """The unlabelled samples and the herd_requests_total counters from /metrics."""
    text = get("/metrics")[2]
    values = {}
    for line in text.splitlines():
        m = re.fullmatch(r'(herd_\w+(?:\{outcome="\w+"\})?) (\S+)', line)
        if m:
            values[m[1]] = float(m[2])
    return values


# 1a. The page itself, outside the browser.
status, headers, html = get("/", auth=False)
headers = {k.lower(): v for k, v in headers.items()}
check("GET / is 200 text/html", status == 200 and headers["content-type"].startswith("text/html"),
      (status, headers.get("content-type")))
csp = headers.get("content-security-policy", "")
check("GET / sends the CSP", "default-src 'none'" in csp and "script-src 'self'" in csp
      and "connect-src 'self'" in csp, csp)
check("the page has no inline script, style or handler",
      not re.search(r"<script(?![^>]*\bsrc=)|<style|\sstyle=|\son\w+=", html), html)

console, failed, foreign = [], [], []
phase = ["no key"]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium, headless=True)
    context = browser.new_context(viewport={"width": 1100, "height": 750})
    page = context.new_page()
    page.on("console", lambda m: console.append((phase[0], m.type, m.text)))
    page.on("pageerror", lambda e: console.append((phase[0], "pageerror", str(e))))
    page.on("requestfailed", lambda r: failed.append((phase[0], r.url, r.failure)))
    page.on("request", lambda r: None if r.url.startswith(base + "/")
            else foreign.append(r.url))

    def errors(in_phase):
        return [c for c in console if c[0] == in_phase and c[1] in ("error", "pageerror")]

    def text(selector):
        return page.eval_on_selector(selector, "e => e.textContent")

    # 2. Without the key: the 401 is said plainly; with it, the model's name shows.
    page.goto(base + "/")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('API key')")
    check("without a key the page asks for it", "API key" in text("#status"), text("#status"))
    # The browser logs the refused /v1/models itself; nothing else may be logged.
    unexpected = [c for c in errors("no key") if "status of 401" not in c[2]]
    check("no console errors but the 401", not unexpected, unexpected)
    page.fill("#api-key", key)
    page.wait_for_function(f"() => document.getElementById('status').textContent.includes({model!r})")
    check("with the key the model name shows", model in text("#status"), text("#status"))

    # 1b. Reloaded with the key (kept in localStorage): no console errors, no failed requests.
    phase[0] = "loaded"
    page.reload()
    page.wait_for_function(f"() => document.getElementById('status').textContent.includes({model!r})")
    check("the key is kept across a reload", page.input_value("#api-key") == key)
    check("the page loads with no console errors", not errors("loaded"), errors("loaded"))
    check("no failed requests on load", not failed, failed)
    check("every request goes to this server", not foreign, foreign)

    # 3. A greedy reply through the keyboard, streamed; equal to the same request made directly.
    phase[0] = "chat"
    system = "You tell short stories."
    page.fill("#system", system)
    for field, value in [("#temperature", "0"), ("#max-tokens", "24"), ("#top-p", ""),
                         ("#top-k", ""), ("#min-p", ""), ("#seed", "")]:
        page.fill(field, value)
    # Record the reply's length at every change, with whether it was still generating.
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            const b = [...document.querySelectorAll('.bubble.assistant')].at(-1);
            window.__seen.push([b ? b.textContent.length : 0,
                                !document.getElementById('stop').disabled]);
        }).observe(document.getElementById('messages'),
                   {childList: true, subtree: true, characterData: true});
    }""")
    prompt = "Once upon a time"
    page.focus("#message")
    page.keyboard.type(prompt)
    page.keyboard.press("Enter")
    page.wait_for_selector(".assistant-turn .stats", timeout=120_000)
    seen = page.evaluate("window.__seen")
    streaming = [n for n, generating in seen if n > 0 and generating]
    check("the reply shows text before the stream ends", streaming, seen)
    check("the reply grows as it streams", len(set(streaming)) >= 2, seen)
    reply = text(".bubble.assistant")
    stats = text(".stats")
    check("Stop is disabled after the reply", page.is_disabled("#stop"))
    direct = post("/v1/chat/completions", {
        "model": model, "max_tokens": 24, "temperature": 0, "stream": False,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
    })
    content = direct["choices"][0]["message"]["content"]
    check("the streamed reply equals the same request made directly", reply == content,
          f"{reply!r} vs {content!r}")
    tokens = direct["usage"]["completion_tokens"]
    check("the stats line gives tokens, tokens/s and first-token time",
          re.search(rf"^{tokens} tokens, [\d.]+ tokens/s, first token [\d.]+ s", stats), stats)
    check("the message box was cleared", page.input_value("#message") == "")
    page.keyboard.type("a")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("b")
    check("Shift+Enter adds a line", page.input_value("#message") == "a\nb",
          page.input_value("#message"))
    page.fill("#message", "")

    # 4. Stop: the request is cancelled on the server and its KV blocks are freed.
    phase[0] = "stop"
    before = metrics()
    page.fill("#max-tokens", "1500")
    page.fill("#message", "Tell me a very long story about a lighthouse.")
    page.click("#send")
    page.wait_for_function("""() => {
        const b = [...document.querySelectorAll('.bubble.assistant')];
        return b.length === 2 && b[1].textContent.length > 20;
    }""", timeout=120_000)
    check("Stop is enabled while generating", page.is_enabled("#stop"))
    page.click("#stop")
    page.wait_for_selector(".assistant-turn.stopped .stats")
    length = len(page.eval_on_selector_all(".bubble.assistant", "b => b[1].textContent"))
    time.sleep(1.5)
    partial = page.eval_on_selector_all(".bubble.assistant", "b => b[1].textContent")
    check("the stopped reply stops growing and keeps its text", 20 < len(partial) == length,
          (length, len(partial)))
    stopped_stats = page.eval_on_selector_all(".stats", "s => s[1].textContent")
    check("the stopped reply is marked and counted",
          re.search(r"^Stopped, ≈\d+ tokens, ≈[\d.]+ tokens/s", stopped_stats), stopped_stats)
    check("Stop is disabled again, Send enabled",
          page.is_disabled("#stop") and page.is_enabled("#send"))
    deadline = time.time() + 10
    while True:
        after = metrics()
        if after["herd_requests_running"] == 0 and after["herd_kv_blocks_used"] == 0:
            break
        assert time.time() < deadline, f"the cancelled request still holds the engine: {after}"
        time.sleep(0.2)
    check("the server freed the request's sequence and KV blocks", True)
    cancelled = 'herd_requests_total{outcome="cancelled"}'
    check("the server counted one cancelled request", after[cancelled] == before[cancelled] + 1,
          (before[cancelled], after[cancelled]))
    aborted = [f for f in failed if f[0] == "stop"]
    check("the only failed request is the aborted chat",
          [f for f in failed if f[0] != "stop"] == [] and len(aborted) == 1
          and aborted[0][1] == base + "/v1/chat/completions", failed)

    # The conversation goes on after a stop: a short reply that answers it.
    page.fill("#max-tokens", "12")
    page.fill("#message", "And then?")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('.assistant-turn .stats').length === 3",
                           timeout=120_000)
    check("the conversation continues after a stop",
          len(page.eval_on_selector_all(".bubble.assistant", "b => b[2].textContent")) > 0)

    # Stopped at once, before any text (as a stop while a long prompt is processed is): the
    # unanswered turn leaves the history, so the next message still alternates with replies
    # (two user turns in a row would break the chat template).
    phase[0] = "stop at once"
    count = lambda selector: page.eval_on_selector_all(selector, "e => e.length")
    turns = count(".assistant-turn")
    # A long message, so that the prompt's processing leaves time to stop after the response
    # has started (the reply's bubble is there) and before its first token.
    long_message = "The keeper counted the waves and wrote each one down. " * 60
    page.fill("#message", long_message)
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => document.querySelectorAll('.assistant-turn').length > {turns}",
                           timeout=120_000)
    page.keyboard.press("Escape")
    page.wait_for_function("() => !document.getElementById('send').disabled", timeout=120_000)
    stopped_empty = page.eval_on_selector_all(".bubble.assistant", "b => b.at(-1).textContent")
    check("a stop before the first token leaves an empty reply", stopped_empty == "",
          stopped_empty)
    check("and gives the message back to the box", page.input_value("#message") == long_message)
    stats_before, errors_before = count(".assistant-turn .stats"), count(".error-msg")
    page.fill("#message", "Go on.")
    page.keyboard.press("Enter")
    page.wait_for_function(
        f"() => document.querySelectorAll('.assistant-turn .stats').length > {stats_before}"
        f" || document.querySelectorAll('.error-msg').length > {errors_before}",
        timeout=120_000)
    check("after a stop at once the conversation goes on",
          count(".error-msg") == errors_before
          and count(".assistant-turn .stats") == stats_before + 1,
          page.eval_on_selector_all(".error-msg", "e => e.map(x => x.textContent)"))

    # A refused request: the server's JSON error is shown, the text goes back to the box.
    phase[0] = "wrong key"
    page.fill("#api-key", "not-the-key")
    page.fill("#message", "Hello?")
    errors_before = count(".error-msg")
    page.click("#send")
    page.wait_for_function(f"() => document.querySelectorAll('.error-msg').length > {errors_before}")
    error = page.eval_on_selector_all(".error-msg", "e => e.at(-1).textContent")
    check("a 401 while chatting shows the server's message",
          "401" in error and "valid API key is required" in error, error)
    check("the unsent message goes back to the box", page.input_value("#message") == "Hello?",
          page.input_value("#message"))
    page.fill("#api-key", key)
    page.wait_for_function(f"() => document.getElementById('status').textContent.includes({model!r})")
    page.fill("#message", "")
    page.click("#new-chat")
    check("New chat clears the conversation", text("#messages") == "", text("#messages"))

    # 5. Keyboard and labels: Tab reaches the message box, Send and the settings.
    phase[0] = "keyboard"
    if not page.eval_on_selector("#settings", "d => d.open"):
        page.eval_on_selector("#settings", "d => d.open = true")
    page.evaluate("document.activeElement.blur()")
    reached = []
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
    for target in ["message", "send", "new-chat", "api-key", "system", "temperature",
                   "max-tokens"]:
        check(f"Tab reaches #{target}", target in reached, reached)
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, textarea, select')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                     && !e.getAttribute('aria-labelledby'))
        .map(e => e.id || e.outerHTML)""")
    check("every input has a label", not unlabelled, unlabelled)
    check("the conversation is a live log",
          page.eval_on_selector("#messages", "m => m.getAttribute('role') === 'log' "
                                "&& m.getAttribute('aria-live') === 'polite'"))
    check("no console errors while chatting", not errors("chat") and not errors("stop")
          and not errors("stop at once")
          and not [c for c in errors("wrong key") if "status of 401" not in c[2]], console)
    check("every request went to this server", not foreign, foreign)

    # 6. A screenshot of the page after a short exchange.
    phase[0] = "screenshot"
    page.fill("#max-tokens", "60")
    page.fill("#message", "Tell me a story about a lighthouse keeper.")
    page.keyboard.press("Enter")
    page.wait_for_selector(".assistant-turn .stats", timeout=120_000)
    check("no console errors at the end", not errors("screenshot"), errors("screenshot"))
    page.evaluate("document.activeElement.blur()")
    page.screenshot(path=screenshot)
    check("screenshot written", os.path.getsize(screenshot) > 10_000, screenshot)
    browser.close()

print("all checks passed")
