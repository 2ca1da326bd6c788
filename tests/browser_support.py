"""A real `sharechat serve` process and a Chromium for the browser tests.

Synchronous, because Playwright's sync API refuses to run while an event loop runs
in the thread: the server is started and polled with blocking calls, but with the
command line and the clean environment of tests/servers.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, WebSocketRoute

from tests.helpers import free_port
from tests.servers import clean_environ, serve_command

CHROMIUM = os.environ.get("SHARECHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_DEADLINE = 30.0
STOP_DEADLINE = 15.0


@dataclass
class Server:
    base: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, method: str, path: str) -> tuple[int, Any]:
        request = urllib.request.Request(self.base + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read())

    def create_room(self) -> dict[str, str]:
        status, body = self.api("POST", "/api/room")
        assert status == 200, body
        room: dict[str, str] = body
        return room

    def room_url(self, room_id: str) -> str:
        return f"{self.base}/r/{room_id}"


@contextmanager
def run_server(log_path: Path, *flags: str) -> Iterator[Server]:
    """`python -m sharechat serve` on a free port, in-memory, until the block ends."""
    port = free_port()
    env = clean_environ(PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            serve_command(port, *flags), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_healthy(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_DEADLINE)


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + START_DEADLINE
    while True:
        if server.process.poll() is not None:
            raise AssertionError(
                f"sharechat serve exited {server.process.returncode}:\n{server.log()}"
            )
        try:
            if server.api("GET", "/api/healthz")[0] == 200:
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(
                f"sharechat serve not healthy after {START_DEADLINE}s:\n{server.log()}"
            )
        time.sleep(0.05)  # poll interval, not a wait for an outcome


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll a condition outside the browser (the API) until it holds, or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Watch:
    """What a page did that a test must not let pass silently."""

    errors: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", self._console)
        page.on("dialog", self._dialog)

    def _console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.csp_violations.append(message.text)

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()


class SocketSwitch:
    """Routes a page's websockets through Playwright so a test can cut them.

    While off, every new connection is closed as soon as it opens, so the page
    stays disconnected (and keeps retrying) until the switch is turned on.
    """

    def __init__(self, page: Page) -> None:
        self.on = True
        self.routes: list[tuple[WebSocketRoute, WebSocketRoute]] = []
        page.route_web_socket("**/api/serve/*", self._route)

    def _route(self, ws: WebSocketRoute) -> None:
        if not self.on:
            ws.close(code=1011, reason="test: network down")
            return
        self.routes.append((ws, ws.connect_to_server()))

    def cut(self) -> None:
        """Drop every open connection, both ways, and refuse new ones."""
        self.on = False
        for page_side, server_side in self.routes:
            server_side.close()
            page_side.close(code=1011, reason="test: network down")
        self.routes.clear()

    def restore(self) -> None:
        self.on = True


class EchoHold:
    """Holds back the echoes of the page's own messages while everything else reaches
    it: the answers of a burst then come in an order that makes pairing by position
    go wrong, the failures before the echoes of earlier messages.
    """

    def __init__(self, page: Page) -> None:
        self.holding = True
        self.held: list[str | bytes] = []
        self._pages: list[WebSocketRoute] = []
        page.route_web_socket("**/api/serve/*", self._route)

    def _route(self, ws: WebSocketRoute) -> None:
        self._pages.append(ws)
        member: list[str] = []  # this connection's member, from its first frame (`joined`)

        def from_server(message: str | bytes) -> None:
            frame = json.loads(message)
            if not member:
                member.append(frame["memberId"])
            if self.holding and frame["type"] == "chat" and frame["memberId"] == member[0]:
                self.held.append(message)
            else:
                ws.send(message)

        ws.connect_to_server().on_message(from_server)

    def release(self) -> None:
        """Deliver what was held, in order, and stop holding."""
        self.holding = False
        held, self.held = self.held, []
        for message in held:
            self._pages[-1].send(message)


def new_page(browser: Browser, watch: Watch, **context_options: Any) -> Page:
    context = browser.new_context(**context_options)
    page = context.new_page()
    watch.attach(page)
    return page
