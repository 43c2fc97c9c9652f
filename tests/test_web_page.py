"""The chat page of `nanollada serve`, in a real headless Chromium driven over the DevTools protocol: load it, send
a prompt to an AR and a diffusion model side by side, see both answers (equal to the API's), the denoising canvas
animate (masks filling in), the speed line of each answer; a block-diffusion model with token editing beside AR,
its real edit frames highlighted on the canvas; and no request leaving the server (the page works offline)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import urllib.request

import pytest

from serve_fixtures import require_chromium, trained

CHROMIUM = require_chromium()  # in CI (.ci/run) a missing browser fails the run; locally it skips
websockets_sync = pytest.importorskip("websockets.sync.client")


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        self._connection = websockets_sync.connect(ws_url, max_size=None, open_timeout=30)
        self.ws = self._connection.__enter__()
        self.n = 0
        self.events: list[dict] = []  # the notifications received (Network.requestWillBeSent, ...)

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if "method" in msg:
                self.events.append(msg)
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self):
        self._connection.__exit__(None, None, None)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from nanollada.generate import GenerationSettings
    from nanollada.serve import build_app, start_server
    ck = trained(tmp_path_factory)
    srv = start_server(build_app([f"ar={ck['ar']}", f"dm={ck['dm']}", f"bd={ck['bd']}"],
                                 GenerationSettings(max_new_tokens=24)))
    profile = tmp_path_factory.mktemp("chromium")
    browser = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                                "--disable-sync", "--disable-extensions", f"--user-data-dir={profile}",
                                "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                                "--window-size=1400,900", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tools = None
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None and time.monotonic() < deadline:
            line = browser.stderr.readline()
            if not line and browser.poll() is not None:
                break
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = m and int(m.group(1))
        assert port, "chromium did not start its DevTools endpoint"
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        tools = DevTools(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        tools.call("Page.enable")
        tools.call("Network.enable")  # every request the page makes is recorded (test_page_makes_no_outside_request)
        tools.call("Page.navigate", url=f"{srv.url}/?left=ar&right=dm")
        deadline = time.monotonic() + 30
        while not tools.js("document.querySelectorAll('#model-b option').length > 1"):
            assert time.monotonic() < deadline, "the page did not list the models"
            time.sleep(0.05)
        yield tools, srv
    finally:
        if tools:
            tools.close()
        browser.terminate()
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            browser.kill()
        srv.stop()


def api_reply(srv, model: str, prompt: str, **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "seed": 3, **extra}
    req = urllib.request.Request(srv.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())


def api_answer(srv, model: str, prompt: str, **extra) -> str:
    return api_reply(srv, model, prompt, **extra)["choices"][0]["message"]["content"]


def open_page(tools, srv, query: str) -> None:
    tools.call("Page.navigate", url=f"{srv.url}/?{query}")
    deadline = time.monotonic() + 30
    while not tools.js("document.readyState === 'complete' && document.querySelectorAll('#model-b option').length > 1"
                       " && document.querySelector('#pane-b h2').textContent !== ''"):
        assert time.monotonic() < deadline, "the page did not list the models"
        time.sleep(0.05)


def wait_done(tools, timeout=120) -> list[dict]:
    """STATE sampled until both answers are complete."""
    samples, deadline = [], time.monotonic() + timeout
    while True:
        s = tools.js(STATE)
        samples.append(s)
        if len(s["done"]) == 2 and all(s["done"]):
            return samples
        assert time.monotonic() < deadline, samples[-1]
        time.sleep(0.02)


STATE = """(() => { const c = document.querySelector('#pane-b .msg.assistant:last-of-type .canvas');
  return {done: [...document.querySelectorAll('.pane:not(.hidden) .msg.assistant')].map(m => m.dataset.complete || ''),
          rendered: c ? +(c.dataset.rendered || 0) : -1, frames: c ? +(c.dataset.frames || 0) : -1,
          masks: c ? c.querySelectorAll('.cell.mask').length : -1}; })()"""


def test_page_shows_two_models_side_by_side_and_animates_the_canvas(page, tmp_path):
    tools, srv = page
    heads = tools.js("[...document.querySelectorAll('.pane h2')].map(h => h.textContent)")
    assert heads[0].startswith("ar") and "ar ·" in heads[0] and "temperature 0.7" in heads[0]
    assert heads[1].startswith("dm") and "diffusion" in heads[1] and "threshold + prefix cache, block 32, temperature 1" in heads[1]
    tools.js("""(() => { const set = (id, v) => { document.getElementById(id).value = v; };
      set('seed', 3); set('max-tokens', 24); set('strategy', 'low_confidence'); set('block-length', 24);
      set('frame-delay', 40); document.getElementById('settings').open = true;
      set('prompt', 'Name three colours.'); document.getElementById('send').click(); })()""")
    samples, deadline = [], time.monotonic() + 120
    while True:
        s = tools.js(STATE)
        samples.append(s)
        if len(s["done"]) == 2 and all(s["done"]):
            break
        assert time.monotonic() < deadline, samples[-1]
        time.sleep(0.02)
    shot = tools.call("Page.captureScreenshot", format="png")["data"]
    (tmp_path / "page.png").write_bytes(base64.b64decode(shot))
    texts = tools.js("[...document.querySelectorAll('.msg.assistant .text')].map(t => t.textContent)")
    stats = tools.js("[...document.querySelectorAll('.msg.assistant .stats')].map(t => t.textContent)")
    want_ar = api_answer(srv, "ar", "Name three colours.")
    want_dm = api_answer(srv, "dm", "Name three colours.", nanollada={"strategy": "low_confidence",
                                                                       "block_length": 24})
    empty = "(empty answer: the model ended at once)"
    assert texts == [want_ar or empty, want_dm or empty]
    for line in stats:
        assert re.fullmatch(r"\d+ tokens · [\d.]+ tok/s · \d+ forwards · [\d.]+ tokens/forward · [\d.]+ s.*", line), line
    final = samples[-1]
    assert final["frames"] >= 2 and final["rendered"] == final["frames"] and final["masks"] == 0
    shown = [s["masks"] for s in samples if s["rendered"] > 0]
    assert len(set(shown)) >= 2 and shown == sorted(shown, reverse=True)  # masks fill in, never come back
    assert tools.js("document.querySelector('#pane-a .canvas') === null")  # AR: text only
    assert tools.js("document.querySelector('#pane-b .canvas').dataset.maxMasked") != "0"
    assert tools.js("panes[0].history.length") == 2 and tools.js("panes[1].history.length") == 2


def test_page_highlights_edits_and_reports_errors(page):
    tools, srv = page
    cells = tools.js("""(() => { const c = new Canvas(document.createElement('div'));
      c.shown = 1; c.draw({step: 1, length: 3, masked: 2, changes: [[0, 'a', 'fill']]});
      c.shown = 2; c.draw({step: 2, length: 3, masked: 0, changes: [[0, 'b', 'edit'], [1, 'c', 'fill'],
                                                                    [2, '</s>', 'fill']]});
      return [c.cells.map(x => [x.className, x.textContent]), c.label.textContent]; })()""")
    assert cells[0] == [["cell edit", "b"], ["cell new", "c"], ["cell new special", "∎"]]
    assert cells[1] == "step 2 · 0 masked · 1 edit(s)"
    tools.js("""(() => { document.getElementById('max-tokens').value = 100000;
      document.getElementById('prompt').value = 'x'; document.getElementById('send').click(); })()""")
    deadline = time.monotonic() + 60
    while tools.js("document.querySelectorAll('.msg.assistant.error').length") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    errors = tools.js("[...document.querySelectorAll('.msg.assistant.error .text')].map(t => t.textContent)")
    assert all("maximum context length" in e for e in errors)


def test_page_animates_block_diffusion_with_real_edit_frames_beside_ar(page):
    """A block-diffusion model with LLaDA 2.1 editing (the page's editing control: speedy) beside AR: the canvas
    animates from the server's frames, every edit in them is highlighted when its frame is drawn, the count agrees
    with the server's, and the answer and its edits equal the API's. (At temperature 1 the tiny model's sampled
    commits get rewritten, tau_edit being 0; at its greedy default it makes no edits.)"""
    tools, srv = page
    open_page(tools, srv, "left=ar&right=bd")
    heads = tools.js("[...document.querySelectorAll('.pane h2')].map(h => h.textContent)")
    assert heads[1].startswith("bd") and "block_diffusion" in heads[1] and "editing off" in heads[1], heads
    assert "editing" not in heads[0]
    tools.js("""(() => { window.editCellsDrawn = 0; const draw = Canvas.prototype.draw;
      Canvas.prototype.draw = function (frame) { draw.call(this, frame);
        window.editCellsDrawn += this.body.querySelectorAll('.cell.edit').length; };
      const set = (id, v) => { document.getElementById(id).value = v; };
      set('seed', 3); set('max-tokens', 24); set('temperature', 1); set('editing', 'speedy'); set('frame-delay', 10);
      set('prompt', 'Name three colours.'); document.getElementById('send').click(); })()""")
    samples = wait_done(tools)
    want_bd = api_reply(srv, "bd", "Name three colours.", temperature=1.0, nanollada={"editing": "speedy"})
    stats = want_bd["nanollada"]
    texts = tools.js("[...document.querySelectorAll('.msg.assistant .text')].map(t => t.textContent)")
    empty = "(empty answer: the model ended at once)"
    assert texts == [api_answer(srv, "ar", "Name three colours.", temperature=1.0) or empty,
                     want_bd["choices"][0]["message"]["content"] or empty]
    canvas = tools.js("Object.assign({}, document.querySelector('#pane-b .canvas').dataset)")
    assert int(canvas["frames"]) == stats["forwards"] >= 2 and canvas["rendered"] == canvas["frames"]
    shown = [s["masks"] for s in samples if s["rendered"] > 0]
    assert len(set(shown)) >= 2 and shown == sorted(shown, reverse=True)  # edits never bring a mask back
    assert stats["editing"] == "speedy" and stats["edits"] > 0
    assert int(canvas["edits"]) == tools.js("window.editCellsDrawn") == stats["edits"]  # each one highlighted
    line = tools.js("document.querySelector('#pane-b .msg.assistant .stats').textContent")
    assert f"{stats['edits']} edit(s) (speedy)" in line
    assert tools.js("document.querySelector('#pane-a .canvas') === null")


def test_page_makes_no_outside_request(page):
    """Every request the page made in these tests (documents, scripts, styles, API calls) went to the server."""
    tools, srv = page
    tools.js("0")  # reads the notifications sent so far
    urls = [e["params"]["request"]["url"] for e in tools.events if e["method"] == "Network.requestWillBeSent"]
    assert any(u.endswith("/static/app.js") for u in urls) and any("/v1/chat/completions" in u for u in urls)
    assert [u for u in urls if not u.startswith(srv.url + "/")] == []
