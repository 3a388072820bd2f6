"""The web console in real headless Chromium against ``twinhub up`` with simulated devices
(issue 15, items 1 and 2): the browser connects to NATS over the websocket listener with the
user's token, through the same auth callout as every application.

Chromium is Debian's (``apt-get install chromium``; ``./scripts/setup`` installs it as root),
driven by Playwright for Python without a browser download. In CI (``CI`` set) a missing
Chromium, Playwright or console bundle fails the test; elsewhere it skips with the fix.
Screenshots are kept under ``tests/artifacts/console/`` (or ``$TWINHUB_TEST_ARTIFACTS``),
printed at the end of each test.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from devicesim.config import DeviceConfig, parse_gateway_uri
from devicesim.device import DeviceState, SimDevice
from tests.integration.twinhub_cli.cli import start
from twinhub_cli.console import default_assets
from twinhub_cli.datadir import DataDir

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

pytestmark = pytest.mark.servers

WAIT = 60.0
UI_WAIT_MS = 30_000
FREE = (
    *("--nats-port", "0", "--mongo-port", "0", "--tcp-port", "0", "--tls-port", "0"),
    *("--gateway-metrics", "", "--twin-metrics", "", "--callout-metrics", ""),
    *("--console", "127.0.0.1:0", "--nats-ws-port", "0"),
)
SETTINGS = {"TWINHUB_GATEWAY_UDP": "127.0.0.1:0", "TWINHUB_GATEWAY_DTLS": "127.0.0.1:0"}
ARTIFACTS = Path(
    os.environ.get("TWINHUB_TEST_ARTIFACTS") or Path(__file__).parents[1] / "artifacts"
)


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI runs the browser tests: ./scripts/setup installs it)")
    pytest.skip(what)


def _chromium() -> str:
    path = os.environ.get("TWINHUB_CHROMIUM") or shutil.which("chromium")
    if path is None:
        _missing("no chromium on PATH: apt-get install chromium")
    assert path is not None
    return path


@pytest_asyncio.fixture(loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    executable = _chromium()
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _missing("Playwright is not installed: pip install -e '.[dev]'")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=executable, headless=True)
        try:
            yield b
        finally:
            await b.close()


@dataclass
class Up:
    """A running ``twinhub up``: its data dir and what it wrote to ``stack.json``."""

    data: DataDir
    info: dict[str, Any]

    @property
    def console(self) -> str:
        return str(self.info["console_url"])

    def token(self, owner: str) -> str:
        return self.data.issuer().issue(owner, now=time.time(), ttl=600)

    def device(self, owner: str, n: int) -> SimDevice:
        gw = parse_gateway_uri(str(self.info["coap_tcp"]))
        device_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{owner}/{n}"))
        token = self.token(owner)
        cfg = DeviceConfig(
            gateway=gw, device_id=device_id, token=token, owner=owner, resources=2, name=f"sim{n}"
        )
        return SimDevice(cfg)


@pytest_asyncio.fixture(loop_scope="session")
async def up(tmp_path: Path) -> AsyncIterator[Up]:
    if not (default_assets() / "app.js").is_file():
        _missing(f"the console is not built ({default_assets()}): ./scripts/setup")
    data = DataDir(tmp_path / "data")
    args = ("--log-level", "WARNING", "up", "--data-dir", str(data.root), *FREE)
    proc = await start(*args, settings=SETTINGS)
    try:
        async with asyncio.timeout(WAIT):
            while True:
                if proc.returncode is not None:
                    err = await proc.stderr.read() if proc.stderr else b""
                    pytest.fail(f"twinhub up exited {proc.returncode}: {err.decode()}")
                try:
                    info = json.loads(data.stack_file.read_text())
                except (OSError, ValueError):
                    info = {}
                if "console_url" in info:
                    break
                await asyncio.sleep(0.1)
        yield Up(data, info)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(WAIT):
                    await proc.communicate()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _shots(name: str) -> Path:
    d = ARTIFACTS / "console" / name
    d.mkdir(parents=True, exist_ok=True)
    return d


async def _online(*devices: SimDevice) -> None:
    for d in devices:
        await d.wait_until(lambda x: x.state is DeviceState.ONLINE and x.published, WAIT)


def _row(device: str) -> str:
    return f'#device-rows tr[data-device="{device}"]'


async def _text(page: Page, selector: str, expected: str) -> None:
    await page.locator(selector).filter(has_text=expected).first.wait_for(timeout=UI_WAIT_MS)


async def test_console_lists_devices_live_shows_changes_and_runs_an_update(
    up: Up, browser: Browser
) -> None:
    shots = _shots("owner")
    owner = "c" + uuid.uuid4().hex[:8]
    d1, d2 = up.device(owner, 1), up.device(owner, 2)
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    async with d1, d2:
        await _online(d1, d2)
        # the one-time link of `twinhub up`: the token in the fragment, gone from the URL
        await page.goto(f"{up.console}#token={up.token(owner)}")
        await _text(page, f"{_row(d1.device_id)} [data-field=online]", "online")
        await _text(page, f"{_row(d2.device_id)} [data-field=online]", "online")
        assert "token" not in page.url
        await _text(page, "#whoami", f"owner {owner}")
        await page.screenshot(path=shots / "1-devices-online.png", full_page=True)

        # live in the list: the device goes offline, its row says so without a reload
        await d2.stop()
        await _text(page, f"{_row(d2.device_id)} [data-field=online]", "offline")

        await page.click(f"{_row(d1.device_id)} a")
        await page.locator('#resources tr[data-href="/light/1"]').wait_for(timeout=UI_WAIT_MS)
        await _text(page, "#device-online", "online")

        # a simulated change appears live: in the events, in the twin, in the plot
        before = await page.locator("#events li[data-kind=resource-changed]").count()
        rep = d1.change("/light/1")
        assert rep is not None
        await page.wait_for_function(
            "n => document.querySelectorAll('#events li[data-kind=resource-changed]').length > n",
            arg=before,
            timeout=UI_WAIT_MS,
        )
        reported = page.locator('#resources tr[data-href="/light/1"] [data-field=content]')
        await reported.filter(has_text=f'"seq": {rep["seq"]}').wait_for(timeout=UI_WAIT_MS)
        await page.wait_for_function(
            "() => Number(document.getElementById('plot').dataset.points) > 0",
            timeout=UI_WAIT_MS,
        )
        await page.screenshot(path=shots / "2-device-live-change.png", full_page=True)

        # an update from the form reaches the device, and its outcome is shown
        form = page.locator("#form-update")
        await form.locator("input[name=href]").fill("/light/2")
        await form.locator("input[name=content]").fill('{"state": true, "power": 7}')
        await form.locator("button").click()
        await page.locator("#outcome [data-state=succeeded]").wait_for(timeout=UI_WAIT_MS)
        await _text(page, "#outcome", "update /light/2: succeeded")
        assert d1.model.representation("/light/2")["power"] == 7
        assert d1.model.representation("/light/2")["state"] is True
        content = page.locator('#resources tr[data-href="/light/2"] [data-field=content]')
        await content.filter(has_text='"power": 7').wait_for(timeout=UI_WAIT_MS)
        await page.screenshot(path=shots / "3-update-succeeded.png", full_page=True)

        # errors as the API names them
        form = page.locator("#form-desired")
        await form.locator("input[name=href]").fill("/light/1")
        await form.locator("input[name=content]").fill("[1, 2]")
        await form.locator("button").click()
        await page.locator("#outcome .error[data-code=bad_request]").wait_for(timeout=UI_WAIT_MS)
        await page.goto(f"{up.console}#/device/no-such-device")
        await page.locator("#device .error[data-code=not_found]").wait_for(timeout=UI_WAIT_MS)
        await page.screenshot(path=shots / "4-not-found.png", full_page=True)
    await context.close()
    assert errors == []
    print(f"screenshots: {shots}")


async def test_another_owners_token_sees_none_of_it(up: Up, browser: Browser) -> None:
    shots = _shots("other-owner")
    owner, other = "c" + uuid.uuid4().hex[:8], "x" + uuid.uuid4().hex[:8]
    device = up.device(owner, 1)
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    async with device:
        await _online(device)
        await page.goto(up.console)
        # signing in by pasting a token
        await page.locator("#signin textarea").fill(up.token(other))
        await page.locator("#signin button").click()
        await _text(page, "#list-status", "0 devices")
        await _text(page, "#whoami", f"owner {other}")
        # live events of the owner do not reach the other owner's list
        device.change("/light/1")
        await device.stop()
        probe = up.device(other, 1)  # an event of the other owner: the list is live
        async with probe:
            await _online(probe)
            await _text(page, f"{_row(probe.device_id)} [data-field=online]", "online")
        assert await page.locator("#device-rows tr").count() == 1
        await page.screenshot(path=shots / "1-own-devices-only.png", full_page=True)
        # the owner's device is not the other owner's to see
        await page.goto(f"{up.console}#/device/{device.device_id}")
        failed = page.locator("#device .error")
        await failed.wait_for(timeout=UI_WAIT_MS)
        assert await failed.get_attribute("data-code") == "forbidden"
        await page.screenshot(path=shots / "2-forbidden.png", full_page=True)
        # a bad token gets no connection at all
        await page.locator("#signout").click()
        await page.locator("#signin textarea").fill(up.token(other)[:-4] + "AAAA")
        await page.locator("#signin button").click()
        refused = page.locator("#signin-status .error[data-code=unauthorized]")
        await refused.wait_for(timeout=UI_WAIT_MS)
        assert "NATS refused the connection" in await refused.inner_text()  # the callout's no
        await page.screenshot(path=shots / "3-bad-token.png", full_page=True)
    await context.close()
    print(f"screenshots: {shots}")
