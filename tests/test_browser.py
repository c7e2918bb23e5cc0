"""The extension's front-end (javascript/loratorio.js, style.css) in headless Chromium.

A static page (tests/browser/index.html) imitates the parts of the WebUI's DOM the script
touches: the prompt boxes, the LoRAtorio InputAccordion with its hidden checkbox and header,
the settings in the rows ``host_ui.build_ui`` makes and in gradio 3.41's markup, the
hidden list of known LoRA names, and the WebUI's script.js callbacks. The test types prompts with real key
presses through chromedriver and checks the accordion header's summary, the tooltips, the
theme colours, and that nothing throws when the controls are missing. Screenshots of the
light and dark theme are written to $LORATORIO_ARTIFACTS (default: tests/artifacts/).

Needs Debian's ``chromium`` and ``chromium-driver`` packages; skipped without them unless
the CI environment variable is set, where their absence fails the test.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = "tests/browser/index.html"
APT_HINT = "apt-get install -y chromium chromium-driver"

LABELS = {
    "method": "Composition method",
    "recenter": "Lambda (re-centring)",
    "temperature_scale": "Temperature scale",
    "patch_size": "Patch size",
    "top_k": "Top-k LoRAs per patch",
    "probe_every": "Probe every N steps",
    "pool": "Candidate pool",
    "text_encoder_per_branch": "Text encoder per branch",
    "merge_into_base": "Merge into base instead",
    "composition_map": "Show composition map",
    "max_rows_per_call": "Max rows per model call",
}


def _load_webdriver():
    spec = importlib.util.spec_from_file_location("loratorio_test_webdriver", ROOT / "tests/browser/webdriver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


webdriver = _load_webdriver()


def _tool(env_var: str, names: tuple[str, ...], what: str) -> str:
    path = os.environ.get(env_var) or next((p for p in map(shutil.which, names) if p), None)
    if path:
        return path
    message = f"{what} not found (tried {', '.join(names)}; set {env_var} to override); install: {APT_HINT}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(_QuietHandler, directory=str(ROOT))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = _tool("CHROMIUM_BIN", ("chromium", "chromium-browser"), "Chromium")
    chromedriver = _tool("CHROMEDRIVER_BIN", ("chromedriver",), "chromedriver")
    tmp = tmp_path_factory.mktemp("chromium")
    b = webdriver.Browser(chromium, chromedriver, user_data_dir=str(tmp / "profile"),
                          log_path=str(tmp / "chromedriver.log"))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    path = Path(os.environ.get("LORATORIO_ARTIFACTS") or ROOT / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _open(browser, server, query: str = "") -> None:
    browser.get(f"{server}/{PAGE}{query}")
    browser.wait_for("window.__rendered === true && !!window.loratorio")
    # the WebUI's load callbacks (which add the visible header checkbox) have run
    browser.wait_for("!!document.getElementById('loratorio_txt2img-visible-checkbox')"
                     " || new URLSearchParams(location.search).get('layout') === 'bare'")


def _summary(browser, tab: str = "txt2img") -> dict:
    return browser.execute(
        "const s = document.getElementById(arguments[0]);"
        "if (!s) return null;"
        "const part = c => s.querySelector('.loratorio-summary-' + c).textContent;"
        "return {hidden: s.hidden, visible: s.offsetParent !== null && getComputedStyle(s).display !== 'none',"
        " text: s.textContent, count: part('count'), list: part('list'), note: part('note'),"
        " merged: part('merged'), unknown: part('unknown'), state: s.dataset.state, dataCount: s.dataset.count,"
        " title: s.title, unknownTitle: s.querySelector('.loratorio-summary-unknown').title};",
        f"loratorio_{tab}_summary",
    )


def _wait_summary(browser, text: str, tab: str = "txt2img") -> dict:
    browser.wait_for(f"(document.getElementById('loratorio_{tab}_summary') || {{}}).textContent === {text!r}"
                     f" && !document.getElementById('loratorio_{tab}_summary').hidden")
    return _summary(browser, tab)


def _type_prompt(browser, text: str, tab: str = "txt2img") -> None:
    area = browser.find(f"#{tab}_prompt textarea")
    browser.clear_by_keys(area)
    browser.type(area, text)


def _errors(browser) -> list:
    return browser.execute("return window.__pageErrors;")


def test_header_shows_count_and_names_as_the_prompt_is_typed(browser, server, artifacts):
    _open(browser, server)
    s = _summary(browser)
    assert s is not None, "the summary span was not created in the accordion header"
    assert s["hidden"] is True and s["visible"] is False, "summary must stay hidden while LoRAtorio is off"

    # Tags typed while the accordion is off are picked up once it is switched on.
    _type_prompt(browser, "a knight, <lora:alpha:0.8>, castle")
    assert _summary(browser)["hidden"] is True

    browser.click(browser.find("#loratorio_txt2img-visible-checkbox"))
    assert browser.execute("return document.querySelector('#loratorio_txt2img-checkbox input').checked;") is True
    s = _wait_summary(browser, "1 LoRA:alphacomposition needs 2 or more")
    assert (s["count"], s["list"], s["state"], s["dataCount"]) == ("1 LoRA:", "alpha", "single", "1")
    assert s["visible"] is True

    area = browser.find("#txt2img_prompt textarea")
    browser.type(area, ", <lora:beta:te=1:unet=0.5> and <lyco:gamma:1:0.6>, <hypernet:h:1>, <lora:alpha:0.3>")
    s = _wait_summary(browser, "3 LoRAs:alpha, beta, gamma")
    assert (s["count"], s["list"], s["note"], s["merged"]) == ("3 LoRAs:", "alpha, beta, gamma", "", "")
    assert (s["state"], s["dataCount"]) == ("compose", "3")
    # the tooltip lists the multipliers as the built-in Lora reads them (first tag of a name wins)
    assert "alpha (unet 0.8, te 0.8)" in s["title"]
    assert "beta (unet 0.5, te 1)" in s["title"]
    assert "gamma (unet 0.6, te 1)" in s["title"]

    # The summary sits on the header line between the label and the open/close icon.
    geo = browser.execute(
        "const w = document.querySelector('#loratorio_txt2img .label-wrap');"
        "const r = e => e.getBoundingClientRect();"
        "const label = r(w.firstElementChild), sum = r(document.getElementById('loratorio_txt2img_summary')),"
        " icon = r(w.querySelector('.icon')), wrap = r(w);"
        "return {labelRight: label.right, sumLeft: sum.left, sumRight: sum.right, iconLeft: icon.left,"
        " sumTop: sum.top, sumBottom: sum.bottom, wrapTop: wrap.top, wrapBottom: wrap.bottom,"
        " header: w.innerText};")
    assert geo["labelRight"] <= geo["sumLeft"] < geo["sumRight"] <= geo["iconLeft"]
    assert geo["wrapTop"] - 1 <= geo["sumTop"] and geo["sumBottom"] <= geo["wrapBottom"] + 1
    assert re.match(r"^LoRAtorio\s*3 LoRAs:\s*alpha, beta, gamma", geo["header"]), geo["header"]

    # img2img has its own state: its accordion is still off.
    assert _summary(browser, "img2img")["hidden"] is True

    # The map legend is shown under the accordion for the screenshot.
    path = artifacts / "loratorio_header.png"
    path.write_bytes(browser.screenshot())
    print(f"screenshot: {path}")

    # Switching off hides the summary again.
    browser.click(browser.find("#loratorio_txt2img-visible-checkbox"))
    browser.wait_for("document.getElementById('loratorio_txt2img_summary').hidden === true")
    assert _summary(browser)["state"] == "off"
    assert _errors(browser) == []


def test_merge_into_base_and_pool_change_the_composed_set(browser, server):
    _open(browser, server)
    # opening the accordion by its header also switches LoRAtorio on (the WebUI links both)
    browser.click(browser.find("#loratorio_txt2img .label-wrap > span:first-child"))
    _type_prompt(browser, "<lora:alpha:1> <lora:beta:1> <lora:style:0.6> portrait")
    _wait_summary(browser, "3 LoRAs:alpha, beta, style")

    # a token appears in the "Merge into base instead" multiselect: DOM change only, no input event
    browser.execute("shimSetTokens('loratorio_txt2img_merge_into_base', ['style', 'unused']);")
    s = _wait_summary(browser, "2 LoRAs:alpha, betamerged: style")
    assert (s["count"], s["list"], s["merged"], s["dataCount"]) == ("2 LoRAs:", "alpha, beta", "merged: style", "2")

    browser.execute("shimSetTokens('loratorio_txt2img_pool', ['delta', 'alpha']);")
    s = _wait_summary(browser, "3 LoRAs:alpha, beta + pool: deltamerged: style")
    assert s["dataCount"] == "3"
    assert "delta (candidate pool)" in s["title"]

    # removing a token with a real click on its remove button
    browser.click(browser.find("#loratorio_txt2img_merge_into_base .token-remove"))
    s = _wait_summary(browser, "4 LoRAs:alpha, beta, style + pool: delta")
    assert s["merged"] == ""
    assert _errors(browser) == []


def test_zero_loras_and_img2img(browser, server):
    _open(browser, server)
    browser.click(browser.find("#loratorio_img2img-visible-checkbox"))
    s = _wait_summary(browser, "0 LoRAsno <lora:...> tags: plain generation", tab="img2img")
    assert (s["state"], s["dataCount"]) == ("none", "0")

    _type_prompt(browser, "<lora:one:1>, <lora:two:0.5:0.7>", tab="img2img")
    s = _wait_summary(browser, "2 LoRAs:one, two", tab="img2img")
    assert "two (unet 0.7, te 0.5)" in s["title"]
    # txt2img is untouched
    assert _summary(browser, "txt2img")["hidden"] is True

    # Opening the accordion by its header ticks the checkbox too (the WebUI links both).
    browser.click(browser.find("#loratorio_txt2img .label-wrap > span:first-child"))
    _wait_summary(browser, "0 LoRAsno <lora:...> tags: plain generation", tab="txt2img")
    assert _errors(browser) == []


def test_every_setting_has_a_tooltip(browser, server):
    _open(browser, server)
    hints = browser.execute("return titles;")
    for key, label in LABELS.items():
        assert label in hints, f"no entry for {label!r} in the WebUI's titles map"
        assert len(hints[label]) >= 60, f"hint for {label!r} too short: {hints[label]!r}"
        for tab in ("txt2img", "img2img"):
            titles = browser.execute(
                "const el = document.getElementById(arguments[0]);"
                "const span = [...el.querySelectorAll('span')].find(s => s.textContent.trim() === arguments[1]);"
                "return [el.title, span ? span.title : null];", f"loratorio_{tab}_{key}", label)
            assert titles == [hints[label], hints[label]], (tab, key, titles)
    assert "N of the 2N + 2" in hints["Lambda (re-centring)"]
    assert "VRAM" in hints["Max rows per model call"] and "0 = no limit" in hints["Max rows per model call"]
    assert "0 = all LoRAs blend" in hints["Top-k LoRAs per patch"]
    # the host's own entries are kept
    assert hints["Sampling steps"].startswith("How many times")
    assert _errors(browser) == []


def _rgb(css: str) -> tuple[float, float, float, float]:
    nums = [float(x) for x in re.findall(r"[\d.]+", css)]
    return (nums[0], nums[1], nums[2], nums[3] if len(nums) > 3 else 1.0)


def _luminance(rgb) -> float:
    def channel(c):
        c /= 255.0
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(fg, bg) -> float:
    hi, lo = sorted((_luminance(fg), _luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


_COLOURS_JS = """
const bgOf = el => {
  for (; el; el = el.parentElement) {
    const c = getComputedStyle(el).backgroundColor;
    if (!/rgba\\(.*,\\s*0\\)$/.test(c) && c !== 'transparent') return c;
  }
  return 'rgb(255, 255, 255)';
};
const pick = sel => { const el = document.querySelector(sel); return [getComputedStyle(el).color, bgOf(el)]; };
return {summary: pick('#loratorio_txt2img_summary .loratorio-summary-list'),
        count: pick('#loratorio_txt2img_summary .loratorio-summary-count'),
        note: pick('#loratorio_img2img_summary .loratorio-summary-note'),
        merged: pick('#loratorio_img2img_summary .loratorio-summary-merged'),
        legend: pick('#loratorio_legend_sample .loratorio-legend-name'),
        swatchRing: getComputedStyle(document.querySelector('.loratorio-legend-swatch')).boxShadow};
"""


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_theme_colours_are_readable(browser, server, artifacts, theme):
    _open(browser, server, "?__theme=dark" if theme == "dark" else "")
    assert browser.execute("return document.body.classList.contains('dark');") is (theme == "dark")
    browser.click(browser.find("#loratorio_txt2img-visible-checkbox"))
    _type_prompt(browser, "<lora:alpha:1>, <lora:beta:0.7>, <lora:gamma:0.5> a city at night")
    _wait_summary(browser, "3 LoRAs:alpha, beta, gamma")
    # img2img in the single-LoRA state with a merged one, so the screenshot shows both looks
    browser.click(browser.find("#loratorio_img2img .label-wrap > span:first-child"))
    browser.execute("shimSetTokens('loratorio_img2img_merge_into_base', ['detail']);")
    _type_prompt(browser, "<lora:portrait:0.9> <lora:detail:0.4>", tab="img2img")
    _wait_summary(browser, "1 LoRA:portraitcomposition needs 2 or moremerged: detail", tab="img2img")
    colours = browser.execute(_COLOURS_JS)
    for part in ("summary", "count", "note", "merged", "legend"):
        fg, bg = (_rgb(c) for c in colours[part])
        ratio = _contrast(fg, bg)
        assert ratio >= 4.5, f"{theme}: {part} text {colours[part][0]} on {colours[part][1]} has contrast {ratio:.2f}"
    bg_lum = _luminance(_rgb(colours["summary"][1]))
    assert (bg_lum > 0.5) if theme == "light" else (bg_lum < 0.1), colours["summary"]
    path = artifacts / f"loratorio_theme_{theme}.png"
    path.write_bytes(browser.screenshot())
    print(f"screenshot: {path}")
    assert _errors(browser) == []


_PARSE_JS = """
const out = {};
for (const p of arguments[0]) {
  const all = loratorio.loraTags(p), seen = new Set(), valid = [];
  for (const t of all) {
    if (t.valid && !seen.has(t.name)) { seen.add(t.name); valid.push([t.name, t.te, t.unet, t.dyn]); }
  }
  out[p] = {valid: valid, invalid: all.filter(t => !t.valid).map(t => t.text)};
}
return out;
"""

# prompt -> LoRAs composed as (name, te, unet, dyn), in the built-in Lora's reading
PARSE_CASES = {
    "<lora:a>": [("a", 1, 1, None)],
    "<lora:a:0.8>": [("a", 0.8, 0.8, None)],
    "<lora:a:0.5:0.9>": [("a", 0.5, 0.9, None)],
    "<lora:a:unet=0.5:te=0.25>": [("a", 0.25, 0.5, None)],
    "<lora:a:0.7:unet=0.2>": [("a", 0.7, 0.2, None)],
    "<lora:a:1:1:dyn=8>": [("a", 1, 1, 8)],
    "<lora:a:1:0.5:16>": [("a", 1, 0.5, 16)],
    "<lyco:b:0.3>": [("b", 0.3, 0.3, None)],
    "x <LORA:c:1> <hypernet:d:1> <lora:e:1e-1> <lora:f: 2_0 >": [("e", 0.1, 0.1, None), ("f", 20, 20, None)],
    "<lora:with space:1><lora:näme_2:0.5>": [("with space", 1, 1, None), ("näme_2", 0.5, 0.5, None)],
    # `a=b=c` is not a named argument (split('=', 2) gives 3 parts): it stays positional
    "<lora:x=y=z:1>": [("x=y=z", 1, 1, None)],
    # Python's \w is Unicode: the whole `<é:...>` is one tag of another network
    "<é:<lora:f:1>": [],
    "<lora:g:1": [],
    "<lora:h:1>\n<lora:i:\n0.5>": [("h", 1, 1, None), ("i", 0.5, 0.5, None)],
    # a name twice: the first valid tag counts
    "<lora:k:0.2> <lora:k:0.9>": [("k", 0.2, 0.2, None)],
    "<lora:m:abc> <lora:m:0.4>": [("m", 0.4, 0.4, None)],
    # invalid: no name, not a number, not finite, a fractional rank limit
    "<lora:te=1> <lora::1> <lora:n:inf> <lora:o:1:nan> <lora:q:1:1:8.5> <lora:r:0x1>": [],
}


def test_tag_parser_follows_the_webui_syntax(browser, server):
    from loratorio.tags import parse_lora_tags

    _open(browser, server)
    got = browser.execute(_PARSE_JS, list(PARSE_CASES))
    for prompt, expected in PARSE_CASES.items():
        assert [tuple(t) for t in got[prompt]["valid"]] == expected, (prompt, got[prompt])
        # the same reading as the server's parser, including which tags it rejects
        py = parse_lora_tags(prompt)
        assert [(t.name, t.te, t.unet, t.dyn) for t in py.tags] == expected, prompt
        assert got[prompt]["invalid"] == [text for text, _ in py.invalid], prompt
    assert len(got["<lora:te=1> <lora::1> <lora:n:inf> <lora:o:1:nan> <lora:q:1:1:8.5> <lora:r:0x1>"]["invalid"]) == 6

    raw = browser.execute("return loratorio.parseTags(arguments[0]);", "<lora:a:te=1:0.5> <b_2:x>")
    assert [(t["type"], t["positional"], t["named"]) for t in raw] == [
        ("lora", ["a", "0.5"], {"te": "1"}), ("b_2", ["x"], {})]


def test_invalid_tags_are_shown_as_skipped(browser, server):
    _open(browser, server)
    browser.click(browser.find("#loratorio_txt2img-visible-checkbox"))
    _type_prompt(browser, "<lora:a:1> <lora:b:strong> <lora:c:0.5>")
    s = _wait_summary(browser, "2 LoRAs:a, cskipped: <lora:b:strong>")
    assert 'Skipped <lora:b:strong>: text-encoder multiplier "strong" is not a number' in s["title"]
    assert _errors(browser) == []


def test_missing_elements_never_throw(browser, server):
    # A layout without any LoRAtorio control (the script disabled, another host layout).
    _open(browser, server, "?layout=bare")
    result = browser.execute("return loratorio.refresh();")
    assert result == {"txt2img": None, "img2img": None}
    area = browser.find("#txt2img_prompt textarea")
    browser.type(area, "<lora:a:1> <lora:b:1>")
    assert browser.execute("return loratorio.state('txt2img').names;") == ["a", "b"]
    assert browser.execute("return document.querySelector('.loratorio-summary');") is None

    # Controls that vanish after load (a UI reload) are tolerated as well.
    _open(browser, server)
    runs = browser.execute("return window.__afterUpdateRuns || 0;")
    browser.execute("document.getElementById('loratorio_img2img').remove();"
                    "document.getElementById('img2img_prompt').remove();"
                    "document.getElementById('loratorio_txt2img_merge_into_base').remove();")
    # the WebUI's after-update callbacks (ours among them) have run on the changed page
    browser.wait_for(f"(window.__afterUpdateRuns || 0) > {runs}")
    browser.click(browser.find("#loratorio_txt2img-visible-checkbox"))
    _type_prompt(browser, "<lora:a:1> <lora:b:1>")
    _wait_summary(browser, "2 LoRAs:a, b")
    assert browser.execute("return loratorio.refresh().img2img;") is None
    assert _errors(browser) == []


def test_unknown_names_are_marked_and_merged_ones_are_not_counted(browser, server, artifacts):
    """A tag the LoRA list does not know is marked and not counted; a merged one is listed as merged."""
    _open(browser, server)
    browser.click(browser.find("#loratorio_txt2img .label-wrap > span:first-child"))
    browser.execute("shimSetTokens('loratorio_txt2img_merge_into_base', ['style']);")
    # "corrupt" is in the LoRA list: whether its file loads is known only when generating
    _type_prompt(browser, "<lora:alpha:1> <lora:ghost:0.8> <lora:corrupt:1> <lora:style:0.5> a street")
    s = _wait_summary(browser, "2 LoRAs:alpha, corruptmerged: stylenot found: ghost")
    assert (s["count"], s["list"], s["merged"], s["unknown"], s["dataCount"]) == (
        "2 LoRAs:", "alpha, corrupt", "merged: style", "not found: ghost", "2")
    assert "Not found in the LoRA list, skipped: ghost" in s["title"]
    assert "ghost (unet" not in s["title"]
    assert s["unknownTitle"].startswith("Not in the LoRA list: LoRAtorio skips these tags.")
    header = browser.execute("return document.querySelector('#loratorio_txt2img .label-wrap').innerText;")
    assert re.match(r"^LoRAtorio\s*2 LoRAs:\s*alpha, corrupt", header), header
    path = artifacts / "loratorio_header_unknown.png"
    path.write_bytes(browser.screenshot())
    print(f"screenshot: {path}")

    # The refresh button makes the server render the list again (a DOM change, no input event).
    browser.execute(
        "const el = document.querySelector('#loratorio_txt2img_known_loras .prose');"
        "const names = ['alpha', 'corrupt', 'ghost', 'style'];"
        "el.innerHTML = '<div data-loratorio-loras=\"' + JSON.stringify(names).replace(/\"/g, '&quot;') + '\"></div>';")
    s = _wait_summary(browser, "3 LoRAs:alpha, ghost, corruptmerged: style")
    assert s["unknown"] == "" and s["dataCount"] == "3"

    # only merged and unknown tags: nothing to compose
    _type_prompt(browser, "<lora:style:1> <lora:nobody:1>")
    browser.execute("document.querySelector('#loratorio_txt2img_known_loras .prose').innerHTML ="
                    " '<div data-loratorio-loras=\"[&quot;style&quot;]\"></div>';")
    s = _wait_summary(browser, "0 LoRAsnothing to compose: plain generationmerged: stylenot found: nobody")
    assert s["state"] == "none"
    assert _errors(browser) == []


def test_without_a_list_of_names_no_tag_is_marked(browser, server):
    """An older page without the hidden list (or a broken one) counts every tag, as before."""
    _open(browser, server)
    browser.execute("document.getElementById('loratorio_txt2img_known_loras').remove();"
                    "document.querySelector('#loratorio_img2img_known_loras [data-loratorio-loras]')"
                    ".setAttribute('data-loratorio-loras', 'not json');")
    browser.click(browser.find("#loratorio_txt2img-visible-checkbox"))
    _type_prompt(browser, "<lora:alpha:1> <lora:ghost:1>")
    _wait_summary(browser, "2 LoRAs:alpha, ghost")
    browser.click(browser.find("#loratorio_img2img-visible-checkbox"))
    _type_prompt(browser, "<lora:alpha:1> <lora:ghost:1>", tab="img2img")
    _wait_summary(browser, "2 LoRAs:alpha, ghost", tab="img2img")
    assert _errors(browser) == []


_LAYOUT_JS = """
const acc = document.getElementById('loratorio_txt2img');
const box = e => e.getBoundingClientRect();
const rows = [...acc.querySelectorAll('.row')].map(row => [...row.children].map(block => {
  const label = block.querySelector('[data-testid=block-info]') || block.querySelector('label span');
  const range = block.querySelector('input[type=range]');
  const headLabel = block.querySelector('.head label');
  return {id: block.id, top: box(block).top, bottom: box(block).bottom,
          rangeTop: range ? box(range).top : null,
          labelHeight: label ? box(label).height : null,
          fontSize: label ? parseFloat(getComputedStyle(label).fontSize) : null,
          cut: headLabel ? headLabel.scrollWidth > headLabel.clientWidth : false,
          numberRight: block.querySelector('.head input') ? box(block.querySelector('.head input')).right : null,
          right: box(block).right};
}));
const title = acc.querySelector('.label-wrap > span:first-child');
const count = document.querySelector('#loratorio_txt2img_summary .loratorio-summary-count');
const list = document.querySelector('#loratorio_txt2img_summary .loratorio-summary-list');
return {rows: rows, titleSize: parseFloat(getComputedStyle(title).fontSize),
        countSize: parseFloat(getComputedStyle(count).fontSize),
        listSize: parseFloat(getComputedStyle(list).fontSize),
        known: getComputedStyle(document.getElementById('loratorio_txt2img_known_loras')).display};
"""


@pytest.mark.parametrize("width", [860, 600])
def test_controls_line_up_and_the_summary_is_as_large_as_the_title(browser, server, artifacts, width):
    """Sliders of a row keep their tracks in line, no label is cut or wraps, and the summary is readable."""
    _open(browser, server, f"?width={width}")
    browser.click(browser.find("#loratorio_txt2img .label-wrap > span:first-child"))
    _type_prompt(browser, "<lora:alpha:1> <lora:beta:1>")
    _wait_summary(browser, "2 LoRAs:alpha, beta")
    geo = browser.execute(_LAYOUT_JS)
    assert geo["known"] == "none"
    sliders = [c for row in geo["rows"] for c in row if c["rangeTop"] is not None]
    assert {c["id"].removeprefix("loratorio_txt2img_") for c in sliders} == {
        "recenter", "temperature_scale", "patch_size", "top_k", "probe_every", "max_rows_per_call"}
    for row in geo["rows"]:
        blocks = [c for c in row if c["top"] is not None and c["labelHeight"] is not None]
        assert len({round(c["top"]) for c in blocks}) == 1, row  # one line of controls, nothing wrapped below
        tracks = [c["rangeTop"] for c in blocks if c["rangeTop"] is not None]
        assert max(tracks, default=0) - min(tracks, default=0) <= 1, row
        for c in blocks:
            assert not c["cut"], c
            assert c["labelHeight"] < 2 * c["fontSize"], c  # the label is one line
            if c["numberRight"] is not None:
                assert c["right"] - c["numberRight"] < 20, c  # the number box sits at the block's right
    assert geo["countSize"] == geo["listSize"] == geo["titleSize"], geo
    path = artifacts / f"loratorio_layout_{width}.png"
    path.write_bytes(browser.screenshot())
    print(f"screenshot: {path}")
    assert _errors(browser) == []
