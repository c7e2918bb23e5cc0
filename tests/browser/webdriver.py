"""A minimal W3C WebDriver client over HTTP (standard library only) for chromedriver.

chromedriver speaks the W3C WebDriver protocol as plain HTTP + JSON, so driving headless
Chromium needs no Python dependency: this module starts chromedriver, opens a session on
a given Chromium binary, and offers the few commands the browser tests use. Typing and
clicking go through WebDriver's element commands, which Chromium turns into real key and
mouse events (so the page sees genuine ``keydown``/``input``/``click`` events).
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"

# WebDriver key codes (W3C "keyboard actions" table)
CONTROL = "\ue009"
BACKSPACE = "\ue003"

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--force-device-scale-factor=1",
    "--window-size=1000,800",
)


class WebDriverError(RuntimeError):
    """chromedriver answered a command with an error."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One chromedriver process with one headless Chromium session."""

    def __init__(self, chromium: str, chromedriver: str, user_data_dir: str, log_path: str,
                 timeout: float = 60.0):
        self.port = _free_port()
        self._log = open(log_path, "wb")  # noqa: SIM115 -- chromedriver writes to it until close()
        self._driver = subprocess.Popen(
            [chromedriver, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.session = None
        try:
            self._wait_ready(timeout)
            caps = {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": [*CHROMIUM_ARGS, f"--user-data-dir={user_data_dir}"],
                },
            }
            value = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}}, timeout=timeout)
            self.session = value["sessionId"]
        except BaseException:
            self.close()
            raise

    # -- protocol ----------------------------------------------------------------------

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._driver.poll() is not None:
                raise WebDriverError(f"chromedriver exited with code {self._driver.returncode}")
            try:
                if self._call("GET", "/status", timeout=2).get("ready"):
                    return
            except (OSError, WebDriverError):
                pass
            time.sleep(0.1)
        raise WebDriverError(f"chromedriver not ready after {timeout:.0f} s")

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json; charset=utf-8"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = json.loads(resp.read().decode() or "{}")
        except urllib.error.HTTPError as e:
            try:
                value = json.loads(e.read().decode()).get("value", {})
            except ValueError:
                value = {}
            raise WebDriverError(f"{method} {path}: {value.get('error', e.code)}: {value.get('message', '')}") from e
        return payload.get("value")

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    # -- commands ----------------------------------------------------------------------

    def get(self, url: str) -> None:
        self._call("POST", self._s("/url"), {"url": url})

    def find(self, css: str) -> str:
        """The element id of the first match of a CSS selector (WebDriverError if none)."""
        return self._call("POST", self._s("/element"), {"using": "css selector", "value": css})[ELEMENT_KEY]

    def click(self, element: str) -> None:
        self._call("POST", self._s(f"/element/{element}/click"), {})

    def type(self, element: str, text: str) -> None:
        """Type ``text`` into the element as key presses."""
        self._call("POST", self._s(f"/element/{element}/value"), {"text": text})

    def clear_by_keys(self, element: str) -> None:
        """Select all and delete with the keyboard (fires real input events, unlike Element Clear)."""
        self.type(element, CONTROL + "a" + CONTROL)
        self.type(element, BACKSPACE)

    def execute(self, script: str, *args):
        """Run a function body in the page; ``arguments[i]`` are ``args``; returns its value."""
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.05):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.execute(f"return ({expression});")
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"not true after {timeout} s: {expression} (last value {value!r})")

    def screenshot(self, element: str | None = None) -> bytes:
        path = f"/element/{element}/screenshot" if element else "/screenshot"
        return base64.b64decode(self._call("GET", self._s(path)))

    def close(self) -> None:
        try:
            if self.session is not None:
                self._call("DELETE", self._s(""), timeout=10)
        except (OSError, WebDriverError):
            pass
        finally:
            self.session = None
            if self._driver.poll() is None:
                self._driver.terminate()
                try:
                    self._driver.wait(10)
                except subprocess.TimeoutExpired:
                    self._driver.kill()
                    self._driver.wait()
            self._log.close()
