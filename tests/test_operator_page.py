"""The operator web page in a real browser: headless Chromium, driven by Selenium, signs in
with an operator key, claims a request from the queue and answers it by typing, while an
openai SDK client receives the text as it is typed. llproxy runs in this test's event
loop; every Selenium call runs in a thread so that it keeps serving meanwhile."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import struct
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from llproxy.server.operator import close_operator_sockets
from llproxy.stores.sqlite import KeyStore

from .conftest import ProxyFactory
from .operator_client import WEATHER, Desk, open_desk

ARTIFACTS = Path(__file__).parent / "artifacts"
WAIT = 20  # seconds: the longest any wait for the page may take
T = TypeVar("T")


def png_square(size: int = 40, rgb: tuple[int, int, int] = (70, 130, 180)) -> str:
    """A small PNG of one colour, as a data: URL."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\x00" + bytes(rgb) * size for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
    png += chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


HOSTILE = "<img src=x onerror=alert(1)><b>not bold</b>"
CONVERSATION: list[Any] = [
    {"role": "system", "content": "You are a weather desk. Answer briefly."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is the sky like in Bergen? Here is a photo:"},
            {"type": "image_url", "image_url": {"url": png_square()}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_bergen",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_bergen", "content": "Bergen: rain, 9 °C"},
    {"role": "assistant", "content": "Rainy in Bergen, 9 °C."},
    {"role": "user", "content": f"And Oslo, for two days? {HOSTILE}"},
]


@pytest.fixture
async def desk(start_proxy: ProxyFactory, tmp_path: Path) -> Desk:
    endpoint = {"operator": "human", "tags": ["support"]}
    return await open_desk(start_proxy, tmp_path / "state", [endpoint])


@pytest.fixture(scope="module")
def driver() -> Iterator[webdriver.Chrome]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and chromedriver, (
        "chromium and chromium-driver are needed (scripts/system-deps installs them)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: Chromium's sandbox refuses to run as root, as in CI's containers.
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(chromedriver))
    try:
        yield browser
    finally:
        browser.quit()


class Page:
    """The operator page of one llproxy in the browser. Selenium blocks: each call runs in
    a thread, and each wait is bounded."""

    def __init__(self, driver: webdriver.Chrome, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(call, *args)

    async def until(self, condition: Callable[[WebDriver], T | None], what: str) -> T:
        wait = WebDriverWait(self.driver, WAIT, poll_frequency=0.05)
        return cast(T, await self.run(wait.until, condition, f"waited {WAIT} s for {what}"))

    async def find(self, css: str) -> WebElement:
        return await self.until(lambda d: d.find_element(By.CSS_SELECTOR, css), css)

    async def text(self, css: str) -> str:
        return await self.run(lambda: self.driver.find_element(By.CSS_SELECTOR, css).text)

    async def shows(self, css: str, text: str) -> str:
        """Waits until the element's visible text contains `text`; its text."""

        def showing(d: WebDriver) -> str | None:
            found = [e.text for e in d.find_elements(By.CSS_SELECTOR, css)]
            return next((t for t in found if text.lower() in t.lower()), None)

        return await self.until(showing, f"{text!r} in {css}")

    async def click(self, css: str) -> None:
        element = await self.until(
            lambda d: next(
                (e for e in d.find_elements(By.CSS_SELECTOR, css) if e.is_enabled()), None
            ),
            f"an enabled {css}",
        )
        await self.run(element.click)

    async def type(self, css: str, keys: str) -> None:
        element = await self.find(css)
        await self.run(element.send_keys, keys)

    async def value(self, css: str) -> str:
        element = await self.find(css)
        return str(await self.run(element.get_property, "value"))

    async def script(self, source: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, source, *args)

    async def sign_in(self, key: str) -> None:
        await self.type("#token", key)
        await self.click("#login-form button[type=submit]")

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        assert await self.run(self.driver.save_screenshot, str(path))
        return path

    async def console(self) -> list[str]:
        entries = await self.run(self.driver.get_log, "browser")
        return [str(entry.get("message")) for entry in entries]


@pytest.fixture
async def page(driver: webdriver.Chrome, desk: Desk) -> AsyncIterator[Page]:
    page = Page(driver, desk.proxy.url)
    await page.console()  # what earlier tests left in the log
    await page.run(driver.get, f"{desk.proxy.url}/operator/")
    await page.find("#token")
    yield page
    await page.run(driver.get, "about:blank")  # closes the page's socket


class Received:
    """A client's stream read as it arrives, in the background."""

    def __init__(self, stream: openai.AsyncStream[ChatCompletionChunk]) -> None:
        self.chunks: list[ChatCompletionChunk] = []
        self.reading = asyncio.ensure_future(self._read(stream))

    async def _read(self, stream: openai.AsyncStream[ChatCompletionChunk]) -> None:
        async for chunk in stream:
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return "".join(c.choices[0].delta.content or "" for c in self.chunks if c.choices)

    async def until_text(self, want: str) -> None:
        async with asyncio.timeout(WAIT):
            while self.text != want:
                assert not self.reading.done() and want.startswith(self.text), (self.text, want)
                await asyncio.sleep(0.02)


async def test_an_operator_answers_from_the_page(desk: Desk, page: Page) -> None:
    await page.sign_in(desk.keys["alice"])
    await page.shows("#connection", "Connected as alice")
    await page.shows("#queue-empty", "No requests are waiting")
    stream = await desk.client().chat.completions.create(
        model="human:support", messages=CONVERSATION, tools=[WEATHER], stream=True
    )
    received = Received(stream)

    # The queue shows it, with a countdown that ticks.
    row = await page.shows("#queue-list li.request", "human:support")
    assert "client · openai · stream" in row and "waiting" in row
    first = await page.text("#queue-list [data-countdown]")
    assert re.fullmatch(r"[45]:\d\d", first), first
    await page.until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#queue-list [data-countdown]").text != first,
        "the countdown to tick",
    )
    await page.click("#queue-list li.request button.primary")  # Claim

    # The conversation, readable by role, as text: the hostile message is not markup.
    await page.shows("#messages .role-user", "And Oslo, for two days?")
    messages = await page.text("#messages")
    for shown in (
        "System",
        "You are a weather desk.",
        "Tool call get_weather (call_bergen)",
        '"city": "Bergen"',
        "Tool result for get_weather, call_bergen",
        "Bergen: rain, 9 °C",
        HOSTILE,
    ):
        assert shown in messages, shown
    assert await page.script("return document.querySelectorAll('#messages b').length") == 0
    thumbnail = await page.find("#messages figure.image img")
    assert str(await page.run(thumbnail.get_attribute, "src")).startswith("data:image/png")
    assert await page.script("return arguments[0].naturalWidth", thumbnail) == 40
    # After the claim the countdown is the idle timeout's (120 s), renewed by each action.
    assert re.fullmatch(r"[12]:\d\d", await page.text("#request-countdown"))

    # Typing streams: each character reaches the client before the next is typed.
    await page.until(
        lambda d: d.find_element(By.ID, "answer-text").get_property("readOnly") is False,
        "the answer box to open",
    )
    typed = ""
    for character in "Oslo:":
        await page.type("#answer-text", character)
        typed += character
        await received.until_text(typed)
    assert len([c for c in received.chunks if c.choices and c.choices[0].delta.content]) == 5
    # Characters are code points: an emoji (two UTF-16 units) keeps the offsets right.
    # ChromeDriver types only the Basic Multilingual Plane; this is what an emoji picker does.
    await page.script(
        "const box = document.getElementById('answer-text'); box.focus();"
        "document.execCommand('insertText', false, ' ☀️🌤 ');"
    )
    typed += " ☀️🌤 "
    await received.until_text(typed)
    await page.type("#answer-text", "sunny, 21 °C.")
    typed += "sunny, 21 °C."
    await received.until_text(typed)
    await page.shows("#answer-info", f"{len(typed)} characters sent")
    # Sent text cannot be taken back: a deletion is undone and the page says why.
    await page.type("#answer-text", Keys.BACKSPACE * 3)
    await page.shows("#answer-notice", "Sent text cannot be taken back")
    assert await page.value("#answer-text") == typed
    await page.type("#answer-text", Keys.HOME + "X")  # typing inside it: the same
    assert await page.value("#answer-text") == typed and received.text == typed
    assert "resent" not in await page.text("#notices")  # no offset went wrong

    # The tool-call form is built from the tool's schema; the server judges the arguments.
    form = await page.text("#tool-form")
    assert "city (required)" in form and "days" in form and "units" in form
    assert await page.script("return document.querySelector('[data-property=days]').type") == (
        "number"
    )
    await page.type("[data-property=days]", "2")
    await page.click("#tool-form button[type=submit]")
    await page.shows("#tool-error", "'city' is a required property")
    await page.screenshot("operator-page.png")
    await page.type("[data-property=city]", "Oslo")
    await page.click("#tool-form button[type=submit]")
    await page.shows("#tool-sent", "Sent get_weather")
    await page.shows("#sent-calls", '"city": "Oslo"')
    assert await page.text("#tool-error") == ""

    await page.click("#finish-form button[type=submit]")
    await page.shows("#notices", "Finished: the answer reached the client")
    await asyncio.wait_for(received.reading, WAIT)
    assert received.text == typed
    calls = [c.choices[0].delta.tool_calls for c in received.chunks if c.choices]
    call = next(each[0] for each in calls if each)
    assert call.function is not None and call.function.name == "get_weather"
    assert json.loads(call.function.arguments or "") == {"city": "Oslo", "days": 2}
    assert received.chunks[-1].choices[0].finish_reason == "tool_calls"
    await page.shows("#queue-empty", "No requests are waiting")
    # Nothing the page does breaks its Content-Security-Policy (no inline script or style),
    # and the browser has nothing to complain about.
    assert await page.console() == []


async def test_edits_inside_sent_text_send_nothing_and_leave_the_caret(
    desk: Desk, page: Page
) -> None:
    """Typing inside the text already sent (a click into a typo, Ctrl+Home) is undone key
    by key with the caret where the operator put it: nothing reaches the client, and only
    what is then typed at the end is sent."""
    stream = await desk.client().chat.completions.create(
        model="human:support", messages=CONVERSATION, stream=True
    )
    received = Received(stream)
    await page.sign_in(desk.keys["alice"])
    await page.shows("#connection", "Connected as alice")
    # The server's numbers of the queue come with the snapshot.
    stats = await page.shows("#queue-stats", "1 waiting")
    assert re.fullmatch(r"1 waiting · oldest \d:\d\d · 1 operator online", stats), stats
    await page.click("#queue-list li.request button.primary")  # Claim
    await page.until(
        lambda d: d.find_element(By.ID, "answer-text").get_property("readOnly") is False,
        "the answer box to open",
    )
    typed = "I will send teh parcel today"
    await page.type("#answer-text", typed)
    await received.until_text(typed)
    caret = "return document.getElementById('answer-text').selectionStart"
    # The caret after "te" of "teh", moved there by real arrow keys; then "the" typed.
    inside = typed.index("teh") + 2
    await page.type("#answer-text", Keys.ARROW_LEFT * (len(typed) - inside))
    assert await page.script(caret) == inside
    await page.type("#answer-text", "the")
    assert await page.value("#answer-text") == typed
    assert await page.script(caret) == inside  # left where it was
    await page.shows("#answer-notice", "Sent text cannot be taken back")
    await page.type("#answer-text", Keys.CONTROL + Keys.HOME + Keys.NULL + "x")
    assert await page.value("#answer-text") == typed
    assert await page.script(caret) == 0
    # Only an addition at the end goes out: had "he" or "x" been sent, the client's text
    # would no longer be a beginning of this.
    await page.type("#answer-text", Keys.CONTROL + Keys.END + Keys.NULL + ", not Monday.")
    typed += ", not Monday."
    await received.until_text(typed)
    await page.click("#finish-form button[type=submit]")
    await asyncio.wait_for(received.reading, WAIT)
    assert received.text == typed
    assert await page.console() == []


async def test_a_key_that_is_no_operator_key_is_told(desk: Desk, page: Page) -> None:
    for key in ("llp-not-a-key", desk.keys["client"]):
        await page.sign_in(key)
        await page.shows("#login-error", "not an operator key")
        await page.shows("#connection", "Signed out")
    await page.screenshot("operator-login.png")
    # The key is kept nowhere but in the page's memory, and never in the URL.
    await page.sign_in(desk.keys["alice"])
    await page.shows("#connection", "Connected as alice")
    kept = await page.script(
        "return [location.href, sessionStorage.length, localStorage.length, "
        "document.getElementById('token').value]"
    )
    assert kept == [f"{desk.proxy.url}/operator/", 0, 0, ""]
    async with aiohttp.ClientSession() as session, session.get(f"{desk.proxy.url}/operator/") as r:
        policy = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy


async def test_the_page_reconnects_and_tells_when_the_client_left(desk: Desk, page: Page) -> None:
    await page.sign_in(desk.keys["alice"])
    await page.shows("#connection", "Connected as alice")
    body = {"model": "human:support", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {desk.keys['client']}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{desk.proxy.url}/v1/chat/completions", json={**body, "stream": True}, headers=headers
        ) as response,
    ):

        async def read_text(want: str) -> None:
            text = ""
            async with asyncio.timeout(WAIT):
                while text != want:
                    line = (await response.content.readline()).decode()
                    if line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        text += delta.get("content") or ""

        await page.click("#queue-list li.request button.primary")
        await page.shows("#request-status", "You hold it")
        await page.type("#answer-text", "Hi")
        await read_text("Hi")
        # A retiring worker closes the socket with 1001: the page reconnects at once, and
        # claims its request again, which went back to the queue meanwhile.
        await close_operator_sockets(desk.proxy.state)
        await page.shows("#notices", "retiring")
        await page.shows("#notices", "claiming your request again")
        await page.shows("#request-status", "You hold it")
        await page.shows("#connection", "Connected as alice")
        notices = await page.text("#notices")
        assert "claimed the request you were answering" not in notices
        assert "sent already" not in notices
        await page.type("#answer-text", " there")
        await read_text(" there")
    # The client went away.
    await page.shows("#notices", "The client left")
    await page.shows("#request-status", "The client left")
    await page.screenshot("operator-page-ended.png")
    box = await page.find("#answer-text")
    assert await page.run(box.get_property, "readOnly") is True
    assert await page.value("#answer-text") == "Hi there"


def long_conversation(turns: int) -> list[Any]:
    messages: list[Any] = [{"role": "system", "content": "You are the support desk."}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: " + "words " * 30})
        messages.append({"role": "assistant", "content": f"Answer {turn}: " + "more " * 30})
    messages.append({"role": "user", "content": "The latest question, to answer now."})
    return messages


async def test_a_full_queue_and_a_long_conversation_at_1400_by_900(desk: Desk, page: Page) -> None:
    """15 requests waiting: at least 12 show at once, the filter finds them by model or
    text; a long conversation opens at its latest message; reject and hand off ask once
    more, and their fields clear for another request; notices vanish by themselves; a
    new request rings once ringing is on. Screenshots in tests/artifacts."""
    # The page's own viewport at 1400 by 900, whatever the browser window's frame takes.
    metrics = {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False}
    await page.run(page.driver.execute_cdp_cmd, "Emulation.setDeviceMetricsOverride", metrics)
    try:
        await full_queue_and_long_conversation(desk, page)
    finally:
        await page.run(page.driver.execute_cdp_cmd, "Emulation.clearDeviceMetricsOverride", {})


async def full_queue_and_long_conversation(desk: Desk, page: Page) -> None:
    client = desk.client()
    asking = [
        asyncio.ensure_future(
            client.chat.completions.create(
                model="human:support",
                messages=[{"role": "user", "content": f"Parcel {n} is late, where is it?"}],
            )
        )
        for n in range(14)
    ]
    asking.append(
        asyncio.ensure_future(
            client.chat.completions.create(model="human:support", messages=long_conversation(25))
        )
    )
    await page.sign_in(desk.keys["alice"])
    await page.shows("#queue-count", "(15)")
    visible = """
        const height = window.innerHeight;
        return [...document.querySelectorAll('#queue-list li.request')]
            .filter((row) => row.getBoundingClientRect().bottom <= height).length;
    """
    await page.screenshot("operator-queue-15.png")
    assert await page.script(visible) >= 12

    # The filter: by text, then by model.
    await page.type("#queue-filter", "parcel 1")
    await page.shows("#queue-count", "(5 of 15)")  # parcels 1 and 10 to 13
    await page.run(lambda: page.driver.find_element(By.ID, "queue-filter").clear())
    await page.type("#queue-filter", "latest question")
    await page.shows("#queue-count", "(1 of 15)")
    await page.click("#queue-list li.request button.quiet")  # View the long one

    # It opens at its latest message.
    latest = await page.shows("#messages .role-user", "The latest question")
    assert latest
    in_view = """
        const messages = document.querySelectorAll('#messages > *');
        const last = messages[messages.length - 1].getBoundingClientRect();
        return last.top >= 0 && last.bottom <= window.innerHeight + 1;
    """
    assert await page.script(in_view)
    await page.screenshot("operator-long-conversation.png")

    # Reject asks once more; its message clears when another request is chosen.
    await page.type("#reject-message", "Wrong desk")
    await page.click("#reject-form button[type=submit]")
    await page.shows("#reject-form button", "Confirm reject")
    assert len(desk.proxy.state.services.desk.tickets) == 15  # type: ignore[attr-defined]
    await page.run(lambda: page.driver.find_element(By.ID, "queue-filter").clear())
    await page.type("#queue-filter", "parcel 3")
    await page.click("#queue-list li.request button.quiet")
    await page.shows("#request-title", "")
    assert await page.value("#reject-message") == ""
    assert await page.text("#reject-form button") == "Reject"
    await page.type("#handoff-model", "fake-model")
    await page.click("#handoff-form button[type=submit]")
    await page.shows("#handoff-form button", "Confirm hand-off")
    button = await page.find("#handoff-form button")
    title = await page.run(button.get_attribute, "title")
    assert title == "Click again to hand the request off to fake-model"
    await page.type("#reject-message", "Not ours")
    await page.click("#reject-form button[type=submit]")
    await page.click("#reject-form button[type=submit]")  # confirmed
    await page.shows("#notices", "rejected")
    await page.shows("#queue-unmatched", "No request matches the filter")
    await page.screenshot("operator-notice.png")
    with pytest.raises(openai.BadRequestError):
        await asyncio.wait_for(asking[3], WAIT)
    # Notices vanish by themselves.
    await page.until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, "#notices li"), "the notices to vanish"
    )

    # Ringing, once turned on, rings for a new request.
    await page.click("#ring")
    await page.shows("#ring", "Ring: on")
    asking.append(
        asyncio.ensure_future(
            client.chat.completions.create(model="human:support", messages=CONVERSATION)
        )
    )
    await page.until(lambda d: d.execute_script("return state.rings") == 1, "a ring")
    assert await page.console() == []
    for each in asking:
        each.cancel()


async def test_a_key_revoked_while_signed_in_signs_out_with_the_reason(
    desk: Desk, page: Page
) -> None:
    await page.sign_in(desk.keys["alice"])
    await page.shows("#connection", "Connected as alice")
    with KeyStore(desk.state) as store:
        assert store.revoke("alice") is not None
    await page.shows("#login-error", "Signed out: the operator key was revoked.")
    assert await page.console() == []
