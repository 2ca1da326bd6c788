"""The web client in a real Chromium against a real `sharechat serve` process."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Playwright, Route, expect, sync_playwright

from tests.browser_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    EchoHold,
    Server,
    SocketSwitch,
    Watch,
    new_page,
    run_server,
    wait_until,
)

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
XSS = "<img src=x onerror=alert(1)>"
UUID_PATH = re.compile(r"/r/[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
CSP_DIRECTIVES = (
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "connect-src 'self'",
)

expect.set_options(timeout=10_000)

OpenPage = Callable[..., Page]


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("server") / "serve.log") as server:
        yield server


@pytest.fixture
def watch() -> Iterator[Watch]:
    watch = Watch()
    yield watch
    # Whatever the test did, no page may have broken, been blocked by the CSP,
    # or opened a dialog (the XSS payload calls alert()).
    assert watch.errors == []
    assert watch.csp_violations == []
    assert watch.dialogs == []


@pytest.fixture
def open_page(browser: Browser, watch: Watch) -> Iterator[OpenPage]:
    """A fresh browser context (a separate visitor) per call."""
    pages: list[Page] = []

    def open_(**context_options: Any) -> Page:
        page = new_page(browser, watch, **context_options)
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.context.close()


def enter_room(page: Page, url: str) -> str:
    """Open a room and wait until this member is live; answer its name."""
    page.goto(url)
    expect(page.locator("#room")).to_be_visible()
    expect(page.locator("#send")).to_be_enabled()
    name = page.locator("#my-name").text_content()
    assert name is not None
    assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", name), name
    return name


def say(page: Page, text: str) -> None:
    """Type a message and send it with Enter, keyboard only (Shift+Enter for its newlines)."""
    page.locator("#input").focus()
    for i, line in enumerate(text.split("\n")):
        if i:
            page.keyboard.press("Shift+Enter")
        page.keyboard.type(line)
    page.keyboard.press("Enter")


def chat_texts(page: Page) -> Any:
    return page.locator("#messages li.chat:not(.failed) .text")


def reconnect_now(page: Page) -> None:
    """The banner's "Reconnect now": skips the backoff wait, if the page is in one.

    Clicked from script because the button hides while an attempt is under way,
    which a test cannot time.
    """
    page.locator("#reconnect-now").evaluate("button => button.click()")


def assert_no_duplicates(page: Page) -> None:
    ids = page.locator("#messages li[data-id]").evaluate_all("els => els.map(e => e.dataset.id)")
    assert len(ids) == len(set(ids)), ids


# ---------------------------------------------------------------- tests


def test_landing_page_creates_a_room(server: Server, open_page: OpenPage) -> None:
    page = open_page()
    response = page.goto(server.base + "/")
    assert response is not None
    assert response.ok
    csp = response.headers.get("content-security-policy", "")
    assert all(d in csp for d in CSP_DIRECTIVES), csp
    expect(page.get_by_role("heading", level=1)).to_have_text("sharechat")

    page.get_by_role("button", name="New room").click()
    page.wait_for_url(UUID_PATH)
    room_id = page.url.rsplit("/", 1)[1]
    status, room = server.api("GET", f"/api/room/{room_id}")
    assert status == 200
    expect(page.locator("#room-name")).to_have_text(room["roomName"])
    expect(page).to_have_title(f"{room['roomName']} — sharechat")
    expect(page.locator("#share-link")).to_have_value(page.url)
    expect(page.locator("#send")).to_be_enabled()


def test_room_page_has_the_csp_and_no_inline_code(server: Server, open_page: OpenPage) -> None:
    page = open_page()
    room = server.create_room()
    response = page.goto(server.room_url(room["roomId"]))
    assert response is not None
    csp = response.headers.get("content-security-policy", "")
    assert all(d in csp for d in CSP_DIRECTIVES), csp
    expect(page.locator("#send")).to_be_enabled()  # the websocket got through connect-src 'self'
    inline = page.evaluate(
        """() => [...document.scripts].filter(s => !s.src).length
               + document.querySelectorAll('style, [style]').length
               + [...document.querySelectorAll('*')].filter(
                   e => [...e.attributes].some(a => a.name.startsWith('on'))).length"""
    )
    assert inline == 0


def test_two_members_chat_and_see_each_other(server: Server, open_page: OpenPage) -> None:
    room = server.create_room()
    url = server.room_url(room["roomId"])
    alice, bob = open_page(), open_page()
    alice_name = enter_room(alice, url)
    bob_name = enter_room(bob, url)
    assert alice_name != bob_name

    for page in (alice, bob):
        expect(page.locator("#room-name")).to_have_text(room["roomName"])
        expect(page.locator("#members li")).to_have_count(2)
        expect(page.locator("#member-count")).to_have_text("2")
    expect(alice.locator("#members li.mine")).to_have_text(f"{alice_name} (you)")
    expect(alice.locator("#messages li.notice").last).to_contain_text(f"{bob_name} joined")
    expect(alice.locator("#announcer")).to_contain_text(f"{bob_name} joined")

    say(alice, "hello from alice")
    for page in (alice, bob):
        expect(chat_texts(page)).to_have_text(["hello from alice"])
    expect(alice.locator("#messages li.chat.mine")).to_have_count(1)
    expect(bob.locator("#messages li.chat.mine")).to_have_count(0)
    expect(bob.locator("#messages li.chat .author")).to_have_text([alice_name])
    expect(alice.locator("#outbox li")).to_have_count(0)  # the echo replaced the pending copy

    # Shift+Enter is a new line, Enter sends.
    bob.locator("#input").focus()
    bob.keyboard.type("line one")
    bob.keyboard.press("Shift+Enter")
    bob.keyboard.type("line two")
    expect(bob.locator("#input")).to_have_value("line one\nline two")
    bob.keyboard.press("Enter")
    expect(bob.locator("#input")).to_have_value("")
    for page in (alice, bob):
        expect(chat_texts(page)).to_have_text(["hello from alice", "line one\nline two"])
    expect(alice.locator("#announcer")).to_contain_text(f"{bob_name}: line one")

    # A late comer gets the history, each message once.
    carol = open_page()
    enter_room(carol, url)
    expect(chat_texts(carol)).to_have_text(["hello from alice", "line one\nline two"])
    expect(carol.locator("#members li")).to_have_count(3)

    # Leaving is seen by the others.
    bob.context.close()
    for page in (alice, carol):
        expect(page.locator("#messages li.notice").last).to_contain_text(f"{bob_name} left")
        expect(page.locator("#members li")).to_have_count(2)
        expect(page.locator("#members")).not_to_contain_text(bob_name)
        assert_no_duplicates(page)


def test_copy_link_button(server: Server, open_page: OpenPage) -> None:
    room = server.create_room()
    page = open_page(permissions=["clipboard-read", "clipboard-write"])
    url = server.room_url(room["roomId"])
    enter_room(page, url)
    page.get_by_role("button", name="Copy link").click()
    expect(page.locator("#copy-status")).to_have_text("Link copied")
    assert page.evaluate("navigator.clipboard.readText()") == url


def test_reload_makes_a_new_member(server: Server, open_page: OpenPage) -> None:
    room = server.create_room()
    url = server.room_url(room["roomId"])
    alice, bob = open_page(), open_page()
    enter_room(alice, url)
    first = enter_room(bob, url)
    say(alice, "before the reload")
    expect(chat_texts(bob)).to_have_text(["before the reload"])

    bob.reload()
    expect(bob.locator("#send")).to_be_enabled()
    expect(bob.locator("#my-name")).not_to_have_text(first)
    second = bob.locator("#my-name").text_content()
    assert second
    assert second != first

    expect(chat_texts(bob)).to_have_text(["before the reload"])  # history, once
    expect(alice.locator("#messages")).to_contain_text(f"{first} left")
    expect(alice.locator("#messages")).to_contain_text(f"{second} joined")
    expect(alice.locator("#members li")).to_have_count(2)
    expect(alice.locator("#members")).to_contain_text(second)
    expect(alice.locator("#members")).not_to_contain_text(first)


def test_dropped_connection_recovers_without_duplicates(
    server: Server, open_page: OpenPage
) -> None:
    room = server.create_room()
    url = server.room_url(room["roomId"])
    alice, bob = open_page(), open_page()
    switch = SocketSwitch(alice)
    requests: list[str] = []
    alice.on("request", lambda request: requests.append(request.url))
    first = enter_room(alice, url)
    enter_room(bob, url)
    say(bob, "before the drop")
    expect(chat_texts(alice)).to_have_text(["before the drop"])

    switch.cut()
    expect(alice.locator("#connection")).to_contain_text(re.compile("Connection lost|Reconnecting"))
    expect(alice.locator("#send")).to_be_disabled()
    expect(bob.locator("#members")).not_to_contain_text(first)

    gap = ["gap one", "gap two", "gap three"]
    for text in gap:
        say(bob, text)
    expect(chat_texts(bob)).to_have_text(["before the drop", *gap])  # stored and echoed

    # The first catch-up request fails: the page must not go live with a gap,
    # but drop that connection and catch up on the next one.
    failures = [503]

    def flaky(route: Route) -> None:
        if failures:
            route.fulfill(status=failures.pop(), json={"error": "service unavailable"})
        else:
            route.continue_()

    alice.route("**/messages?after=*", flaky)
    switch.restore()
    reconnect_now(alice)
    expect(alice.locator("#connection")).to_be_hidden()
    assert failures == []
    expect(alice.locator("#send")).to_be_enabled()
    expect(alice.locator("#my-name")).not_to_have_text(first)  # a new member, per the contract
    expect(chat_texts(alice)).to_have_text(["before the drop", *gap])
    expect(alice.locator("#messages")).to_contain_text(f"{first} left")
    # The gap came from the API: the failed catch-up, then the good one.
    assert sum("/messages?after=" in u for u in requests) >= 2, requests

    say(bob, "after the return")
    say(alice, "back again")
    expected = ["before the drop", *gap, "after the return", "back again"]
    for page in (alice, bob):
        expect(chat_texts(page)).to_have_text(expected)
        assert_no_duplicates(page)
    expect(alice.locator("#members li")).to_have_count(2)


def test_untrusted_text_is_rendered_as_text(
    server: Server, open_page: OpenPage, watch: Watch
) -> None:
    room = server.create_room()
    url = server.room_url(room["roomId"])
    alice, bob = open_page(), open_page()
    enter_room(alice, url)
    enter_room(bob, url)
    say(bob, XSS)
    for page in (alice, bob):
        expect(chat_texts(page)).to_have_text([XSS])
        assert page.locator("img").count() == 0
        assert (
            page.locator("#messages li.chat .text").inner_html()
            == "&lt;img src=x onerror=alert(1)&gt;"
        )
    # and after a reload, from the history API
    alice.reload()
    expect(chat_texts(alice)).to_have_text([XSS])
    assert alice.locator("img").count() == 0
    assert watch.dialogs == []


def test_rejected_message_is_marked_failed(server: Server, open_page: OpenPage) -> None:
    room = server.create_room()
    url = server.room_url(room["roomId"])
    alice, bob = open_page(), open_page()
    enter_room(alice, url)
    enter_room(bob, url)
    too_big = "x" * 5000  # over the default --max-message-bytes 4096
    alice.locator("#input").fill(too_big)
    alice.locator("#input").press("Enter")

    failed = alice.locator("#messages li.chat.failed")
    expect(failed).to_have_count(1)
    expect(failed.locator(".text")).to_have_text(too_big)
    expect(failed.locator(".reason")).to_contain_text("Not sent:")
    expect(failed.get_by_role("button", name="Retry")).to_be_visible()
    expect(alice.locator("#outbox li")).to_have_count(0)

    say(alice, "a normal one")
    expect(chat_texts(bob)).to_have_text(["a normal one"])
    expect(chat_texts(alice)).to_have_text(["a normal one"])
    expect(bob.locator("#messages")).not_to_contain_text("xxxxxxxx")


def send_burst(page: Page, texts: list[str]) -> None:
    """Send every text from one task of the page: none is answered before the last goes."""
    page.evaluate(
        """(texts) => {
            const input = document.getElementById('input');
            const composer = document.getElementById('composer');
            for (const text of texts) {
                input.value = text;
                composer.requestSubmit();
            }
        }""",
        texts,
    )


def test_failures_in_a_burst_mark_exactly_their_messages(
    open_page: OpenPage, tmp_path: Path
) -> None:
    """Each `failed` names its message by ref: in a burst, the failed ones are marked,
    wherever they are in it, and only they, even while earlier ones await their echo."""
    flags = ("--max-message-bytes", "40", "--rate-burst", "8", "--rate-limit", "0.01")
    with run_server(tmp_path / "serve.log", *flags, "--ip-rate-limit", "0") as server:
        room = server.create_room()
        url = server.room_url(room["roomId"])
        alice, bob = open_page(), open_page()
        hold = EchoHold(alice)
        enter_room(alice, url)
        enter_room(bob, url)

        long = "x" * 41
        texts = [f"{n} {long}" if n in (1, 2, 5) else f"short {n}" for n in range(12)]
        # The first 8 are within the burst: 1, 2 and 5 are too long. The rest are over it.
        too_long = [texts[n] for n in (1, 2, 5)]
        over_rate = texts[8:]
        sent = [text for n, text in enumerate(texts[:8]) if n not in (1, 2, 5)]
        send_burst(alice, texts)

        # Every failure is in, no echo yet: the failed ones are marked, the others pending.
        failed = alice.locator("#messages li.chat.failed")
        expect(failed.locator(".text")).to_have_text(too_long + over_rate)
        reasons = failed.locator(".reason").all_text_contents()
        assert all("too long" in reason for reason in reasons[:3]), reasons
        assert all("rate limited" in reason for reason in reasons[3:]), reasons
        expect(chat_texts(bob)).to_have_text(sent)
        expect(alice.locator("#outbox li .text")).to_have_text(sent)

        hold.release()
        expect(chat_texts(alice)).to_have_text(sent)
        expect(alice.locator("#outbox li")).to_have_count(0)  # every message answered
        expect(failed).to_have_count(len(too_long + over_rate))
        expect(bob.locator("#messages li.failed")).to_have_count(0)


def test_missing_room_offers_a_new_one(server: Server, open_page: OpenPage) -> None:
    page = open_page()
    page.goto(server.base + "/r/not-a-room")
    expect(page.locator("#missing")).to_be_visible()
    expect(page.get_by_role("heading", level=1)).to_have_text("This room does not exist")
    page.get_by_role("button", name="Start a new room").click()
    page.wait_for_url(UUID_PATH)
    expect(page.locator("#send")).to_be_enabled()


def test_expired_room_shows_404_state(open_page: OpenPage, tmp_path: Path) -> None:
    with run_server(tmp_path / "serve.log", "--room-idle-ttl", "2") as server:
        # A room nobody entered expires.
        room_id = server.create_room()["roomId"]
        wait_until(
            lambda: server.api("GET", f"/api/room/{room_id}")[0] == 404, "the idle room to expire"
        )
        page = open_page()
        page.goto(server.room_url(room_id))
        expect(page.locator("#missing")).to_be_visible()
        expect(page.locator("#room")).to_be_hidden()

        # A room that expires while its only member is cut off: on the way back
        # the page says so instead of retrying forever.
        member = open_page()
        switch = SocketSwitch(member)
        room_id = server.create_room()["roomId"]
        enter_room(member, server.room_url(room_id))
        switch.cut()
        expect(member.locator("#connection")).to_be_visible()
        wait_until(
            lambda: server.api("GET", f"/api/room/{room_id}")[0] == 404, "the left room to expire"
        )
        switch.restore()
        reconnect_now(member)
        expect(member.locator("#missing")).to_be_visible()
        expect(member.locator("#room")).to_be_hidden()

        member.get_by_role("button", name="Start a new room").click()
        member.wait_for_url(lambda url: room_id not in url and UUID_PATH.search(url) is not None)
        expect(member.locator("#send")).to_be_enabled()


def test_phone_width_and_dark_scheme(server: Server, open_page: OpenPage) -> None:
    room = server.create_room()
    url = server.room_url(room["roomId"])
    phone = open_page(
        viewport={"width": 360, "height": 740}, color_scheme="dark", has_touch=True, is_mobile=True
    )
    laptop = open_page(color_scheme="light")
    enter_room(phone, url)
    enter_room(laptop, url)
    say(laptop, "a-very-long-word-" * 30)
    say(laptop, "short")
    expect(chat_texts(phone)).to_have_count(2)

    assert phone.evaluate("document.documentElement.scrollWidth") <= 360
    for selector in ("#input", "#send", "#copy-link", "#room-name"):
        box = phone.locator(selector).bounding_box()
        assert box is not None, selector
        assert 0 <= box["x"] <= box["x"] + box["width"] <= 360, (selector, box)
    send = phone.locator("#send").bounding_box()
    assert send is not None
    assert send["y"] + send["height"] <= 740

    def background(page: Page) -> Any:
        return page.evaluate(
            "() => getComputedStyle(document.body).backgroundColor"
            ".match(/\\d+/g).slice(0, 3).map(Number)"
        )

    assert sum(background(phone)) < 3 * 80  # dark
    assert sum(background(laptop)) > 3 * 200  # light


def test_screenshot_of_two_browsers(server: Server, open_page: OpenPage, browser: Browser) -> None:
    """The README picture: a laptop (light) and a phone (dark) in one room."""
    room = server.create_room()
    url = server.room_url(room["roomId"])
    laptop = open_page(viewport={"width": 900, "height": 620}, color_scheme="light")
    phone = open_page(
        viewport={"width": 360, "height": 620}, color_scheme="dark", device_scale_factor=1
    )
    enter_room(laptop, url)
    enter_room(phone, url)
    say(laptop, "Hi! Anyone with this link can join.")
    expect(chat_texts(phone)).to_have_count(1)
    say(phone, "Joined from my phone, no app needed.")
    expect(chat_texts(laptop)).to_have_count(2)
    say(laptop, "Close the tab and you are gone:\nthe next visit gets a new name.")
    for page in (laptop, phone):
        expect(chat_texts(page)).to_have_count(3)
        page.locator("#input").blur()

    shots = [base64.b64encode(p.screenshot()).decode() for p in (laptop, phone)]
    sheet = browser.new_page(viewport={"width": 1340, "height": 700})
    try:
        sheet.set_content(
            "<body style='margin:0;background:#8892a0;display:flex;gap:24px;padding:40px;"
            "align-items:flex-start'>"
            + "".join(
                "<img style='border-radius:8px;box-shadow:0 6px 24px #0006' "
                f"src='data:image/png;base64,{s}'>"
                for s in shots
            )
            + "</body>"
        )
        ARTIFACTS.mkdir(exist_ok=True)
        target = ARTIFACTS / "two-browsers.png"
        sheet.screenshot(path=str(target), full_page=True)
        assert target.stat().st_size > 10_000
    finally:
        sheet.close()
