"""The web interface against a real controller: sign-in links, sessions, CSRF and the
Content-Security-Policy over plain HTTPS, then the pages in a real headless Chromium
(Debian's, driven by selenium) with two real agents: the fleet live, an instance created
from the form, running without a reload, migrated with its progress shown and listed on
the migrations page, its console followed as it grows, stopped and deleted. Each page's
screenshot is a test artefact in build/screenshots/ (with KUMO_SCREENSHOTS=docs/screenshots
they refresh the README's tour), and each page passes
axe-core's accessibility rules with no serious or critical violation."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.harness import CACHE_DIR, free_port, require
from tests.harness.agents import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
AXE = CACHE_DIR / "axe-core-4.14.1" / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOTS = Path(os.environ.get("KUMO_SCREENSHOTS", REPO / "build" / "screenshots"))
PY = "/usr/bin/python3"
# Its console grows by a line every half second, which a followed console shows.
SLEEPER = ("import time\nprint('hello from webby', flush=True)\nn = 0\nwhile True:\n    time.sleep(0.5)\n"
           "    n += 1\n    print(f'tick {n}', flush=True)\n")


@pytest.fixture
def ui_controller(controller_factory):
    ctl = controller_factory(ui_listen=f"127.0.0.1:{free_port()}")
    config = __import__("yaml").safe_load(ctl.config_path.read_text())
    ctl.ui_port = int(config["ui_listen"].rpartition(":")[2])
    return ctl


def kumoctl(ctl: Any, *args: str) -> str:
    argv = [sys.executable, "-m", "controller.kumoctl", "--config", str(ctl.kumoctl_config), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603
    assert result.returncode == 0, result.stderr
    return result.stdout


def signin_url(ctl: Any) -> str:
    url = kumoctl(ctl, "ui", "--no-open").strip()
    assert url.startswith(f"https://127.0.0.1:{ctl.ui_port}/signin/"), url
    return url


def request(ctl: Any, method: str, path: str, cookie: str | None = None, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPSConnection("127.0.0.1", ctl.ui_port, context=ctl.context(), timeout=30)
    sent = {"Content-Type": "application/json", **(headers or {})}
    if cookie:
        sent["Cookie"] = f"kumo_session={cookie}"
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=sent)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        data = json.loads(text)
    except ValueError:
        data = text
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def sign_in(ctl: Any) -> tuple[str, str]:
    """(cookie, CSRF token) of a new session."""
    status, headers, _ = request(ctl, "GET", urlsplit(signin_url(ctl)).path)
    assert status == 200
    cookie = headers["set-cookie"]
    for attribute in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
        assert attribute in cookie, cookie
    secret = cookie.partition("kumo_session=")[2].partition(";")[0]
    status, _, session = request(ctl, "GET", "/ui/session", secret)
    assert status == 200
    return secret, session["csrf"]


def test_sign_in_sessions_csrf_and_policy(ui_controller):
    ctl = ui_controller
    # Without a session nothing is served but the sign-in page.
    assert request(ctl, "GET", "/v1/nodes")[0] == 401
    assert request(ctl, "GET", "/")[0] == 401
    assert request(ctl, "GET", "/v1/nodes", cookie="forged")[0] == 401

    path = urlsplit(signin_url(ctl)).path
    status, headers, _ = request(ctl, "GET", path)
    assert status == 200 and "kumo_session=" in headers["set-cookie"]
    status, _, page = request(ctl, "GET", path)
    assert status == 403 and "already used" in page, "a sign-in link works once"

    expired = urlsplit(signin_url(ctl)).path
    ctl.sql("UPDATE ui_sessions SET expires_at = ? WHERE kind = 'signin' AND used_at IS NULL RETURNING id", time.time() - 1)
    status, headers, page = request(ctl, "GET", expired)
    assert status == 403 and "expired" in page and "set-cookie" not in headers

    cookie, csrf = sign_in(ctl)
    status, headers, _ = request(ctl, "GET", "/", cookie)
    assert status == 200
    policy = headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
    assert request(ctl, "GET", "/v1/nodes", cookie)[0] == 200

    # A change needs the CSRF token; with it, the admin API's own answer (no node: 409).
    create = {"name": "web", "kind": "process", "options": {"command": [PY, "-c", SLEEPER]}}
    status, _, answer = request(ctl, "POST", "/v1/instances", cookie, create)
    assert status == 403 and "CSRF" in answer["error"]
    for wrong in ("0" * 64, "\u00e9t\u00e9"):
        status, _, answer = request(ctl, "POST", "/v1/instances", cookie, create, {"X-Kumo-CSRF": wrong})
        assert status == 403, answer
    status, _, answer = request(ctl, "POST", "/v1/instances", cookie, create, {"X-Kumo-CSRF": csrf})
    assert status == 409 and "no node is enrolled" in answer["error"]
    # Sessions do not make sessions; API-only routes of other roles are not served.
    assert request(ctl, "POST", "/v1/ui/signin", cookie, {}, {"X-Kumo-CSRF": csrf})[0] == 404
    assert request(ctl, "GET", "/v1/prometheus/targets", cookie)[0] == 404

    # The same validation as the node's, through the API.
    status, _, check = request(ctl, "POST", "/v1/cloud-config/check", cookie,
                               {"user_data": "#cloud-config\npackages: [vim]\nrunmcd: [ls]\n"}, {"X-Kumo-CSRF": csrf})
    assert status == 200 and not check["valid"] and check["line"] == 3 and "runcmd" in check["error"]

    sessions = json.loads(kumoctl(ctl, "ui", "sessions", "--output", "json"))
    mine = next(s for s in sessions if s["kind"] == "session" and s["revoked_at"] is None and s["remote"])
    entry = next(e for e in ctl.admin("GET", "/v1/audit")["entries"] if e["path"] == "/v1/instances")
    assert entry["name"].endswith("(web)") and entry["serial"].startswith("s-") and entry["status"] == 409
    assert "ADMIN" in kumoctl(ctl, "ui", "sessions")
    for session in sessions:
        if session["kind"] == "session":
            kumoctl(ctl, "ui", "revoke", session["id"])
    assert mine
    assert request(ctl, "GET", "/v1/nodes", cookie)[0] == 401, "a revoked session is refused at once"


def test_bench_ui_loads_and_documents_its_options() -> None:
    """bench/bench_ui.py seeds 10,000 nodes and takes a minute: here it is only kept loadable."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bench_ui.py"), "--help"],  # noqa: S603
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "--nodes" in result.stdout and "--views" in result.stdout


def test_the_sign_in_url_names_a_reachable_host() -> None:
    from controller.ui import base_url

    class Settings:
        url = "https://ctl.example.org:8443"
        ui_listen = "0.0.0.0:8445"

    assert base_url(Settings) == "https://ctl.example.org:8445"
    Settings.ui_listen = "127.0.0.1:9000"
    assert base_url(Settings) == "https://127.0.0.1:9000"
    Settings.ui_listen = "[::1]:9000"
    assert base_url(Settings) == "https://[::1]:9000"


def test_off_without_ui_listen(controller):
    status, answer = controller.call("POST", "/v1/ui/signin", {}, cert=controller.admin_cert)
    assert status == 409 and "ui_listen" in answer["error"]


def test_a_page_hears_of_changes_another_controller_makes(postgres, controller_factory, kumo_agent):
    """One event stream per page, fed by the store's events: a node joining through controller
    B reaches a page served by controller A, and B revoking the session closes it."""
    database = postgres.database()
    a = controller_factory(init_args=["--database", database], ui_listen=f"127.0.0.1:{free_port()}")
    a.ui_port = int(__import__("yaml").safe_load(a.config_path.read_text())["ui_listen"].rpartition(":")[2])
    b = controller_factory(init_args=["--database", database, "--ca-from", str(a.pki)])
    cookie, _ = sign_in(a)
    session_id = request(a, "GET", "/ui/session", cookie)[2]["id"]
    conn = http.client.HTTPSConnection("127.0.0.1", a.ui_port, context=a.context(), timeout=30)
    conn.request("GET", "/ui/events", headers={"Cookie": f"kumo_session={cookie}"})
    stream = conn.getresponse()
    assert stream.status == 200 and stream.getheader("Content-Type") == "text/event-stream"
    assert stream.readline() == b"retry: 2000\n"

    kumo_agent(controller=b)
    topics: set[str] = set()
    while "nodes" not in topics:
        line = stream.readline()
        assert line, "the stream ended before the node's change arrived"
        if line.startswith(b"data: "):
            topics |= set(json.loads(line[6:])["topics"])

    b.admin("DELETE", f"/v1/ui/sessions/{session_id}")
    while line := stream.readline():
        pass  # what was on its way; then the end
    conn.close()
    assert request(a, "GET", "/ui/events", cookie)[0] == 401


# The browser.


@pytest.fixture
def browser(tmp_path):
    require(shutil.which("chromium") is not None and shutil.which("chromedriver") is not None,
            "Debian's chromium and chromium-driver (scripts/deps/80-chromium.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    # This machine's network is closed: without these Chromium keeps trying Google's services.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}",
                 "--ignore-certificate-errors"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def shot(driver: Any, name: str) -> None:
    """Save the page's screenshot, and hold it to axe-core's accessibility rules: no serious
    or critical violation."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    require(AXE.is_file(), f"axe-core at {AXE} (scripts/deps/80-chromium.sh)")
    driver.execute_script(AXE.read_text())  # through WebDriver, which the page's CSP does not govern
    found = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations), e => done(String(e)));")
    assert isinstance(found, list), f"axe-core failed on the {name} page: {found}"
    serious = [f"{v['id']} ({v['impact']}): {v['help']}: " + ", ".join(n["target"][0] for n in v["nodes"][:5])
               for v in found if v["impact"] in ("serious", "critical")]
    assert not serious, f"accessibility violations on the {name} page:\n" + "\n".join(serious)


def fresh(action: Any, limit: float = 10.0) -> Any:
    """``action()``, again while what it touched was replaced or not yet ready for input:
    live pages render anew on every change."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        ElementNotInteractableException,
        StaleElementReferenceException,
    )

    deadline = time.monotonic() + limit
    while True:
        try:
            return action()
        except (StaleElementReferenceException, ElementNotInteractableException, ElementClickInterceptedException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def until(predicate: Any, what: str, limit: float) -> Any:
    return wait_for(lambda: fresh(predicate), what, limit=limit)


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def state_of(driver: Any, name: str) -> str | None:
    rows = css(driver, f'tr[data-instance="{name}"]')
    return rows[0].get_attribute("data-state") if rows else None


def last_tick(console: str) -> int:
    return max((int(line[5:]) for line in console.splitlines() if line.startswith("tick ")), default=0)


def test_the_fleet_in_a_browser(ui_controller, kumo_agent, browser, criu_required, tmp_path):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    ctl = ui_controller
    url = signin_url(ctl)
    browser.get(url)
    until(lambda: "Fleet" in browser.title, "the sign-in page to move on to the fleet", limit=20)
    # The nodes join with the page open: they appear and turn ready without a reload.
    a, b = kumo_agent(controller=ctl), kumo_agent(controller=ctl)
    until(lambda: [r.get_attribute("data-state") for r in css(browser, "tr[data-node]")] == ["ready", "ready"],
             "both nodes ready on the fleet page", limit=30)
    shot(browser, "fleet")
    # The filter is the controller's, over the whole fleet.
    browser.find_element("id", "filter").send_keys(a.node_id)
    until(lambda: [r.get_attribute("data-node") for r in css(browser, "tr[data-node]")] == [a.node_id],
          "the filter to keep one node", limit=20)
    browser.get(url)
    assert "already used" in browser.page_source

    browser.get(f"https://127.0.0.1:{ctl.ui_port}/instances")
    until(lambda: css(browser, "#kind option[value=process]"), "the kinds the fleet runs", limit=20)
    form = {e.get_attribute("name"): e for e in css(browser, "#create [name]")}
    form["name"].send_keys("webby")
    fresh(lambda: Select(form["kind"]).select_by_value("process"))
    form["memory_mib"].clear()
    form["memory_mib"].send_keys("64")
    form["options"].clear()
    form["options"].send_keys(json.dumps({"command": [PY, "-c", SLEEPER]}))
    # A typo in the user data is shown with its line before anything is sent.
    form["user_data"].send_keys("#cloud-config\nruncmd: [ls]\npackagez: [vim]\n")
    until(lambda: "Line 3" in browser.find_element("id", "user_data_check").text, "the user-data error", limit=10)
    assert "packages" in browser.find_element("id", "user_data_check").text
    assert not browser.find_element("id", "create-submit").is_enabled()
    shot(browser, "create-user-data-error")
    form["user_data"].send_keys(Keys.CONTROL, "a")
    form["user_data"].send_keys(Keys.DELETE)
    until(lambda: browser.find_element("id", "create-submit").is_enabled(), "the form to be sendable", limit=10)
    # By keyboard: from the user data, TAB to the Create button and press ENTER.
    form["user_data"].send_keys(Keys.TAB)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    until(lambda: state_of(browser, "webby") == "running", "webby running without a reload", limit=60)
    node = fresh(lambda: next(r.text for r in css(browser, 'tr[data-instance="webby"] a')
                              if "/nodes/" in r.get_attribute("href")))
    other = b.node_id if node == a.node_id else a.node_id
    shot(browser, "instances")

    def migrate() -> None:
        Select(browser.find_element("id", "to-webby")).select_by_value(other)
        css(browser, 'tr[data-instance="webby"] button[data-action=migrate]')[0].click()

    fresh(migrate)
    until(lambda: css(browser, ".migration"), "the migration's progress", limit=20)
    until(lambda: css(browser, '.migration[data-state="succeeded"]'), "the migration to succeed", limit=120)
    until(lambda: any(other == e.text for e in css(browser, 'tr[data-instance="webby"] a')),
             "webby shown on its new node", limit=30)
    shot(browser, "migrated")
    browser.get(f"https://127.0.0.1:{ctl.ui_port}/migrations")
    row = 'tr[data-state="succeeded"]'
    until(lambda: css(browser, row), "the migration listed as succeeded", limit=20)
    listed = fresh(lambda: css(browser, row)[0].text)
    assert "webby" in listed and other in listed and f"instance webby runs on node {other}" in listed, listed
    shot(browser, "migrations")

    # Its own page: where it runs, its console (read by keyboard) and whether it could move.
    browser.get(f"https://127.0.0.1:{ctl.ui_port}/instances/webby")
    until(lambda: browser.find_element("id", "main").get_attribute("data-state") == "running", "webby's page", limit=20)
    until(lambda: "Possible" in browser.find_element("id", "migrate-why").text, "the migration check", limit=20)
    fresh(lambda: browser.find_element("id", "console-follow").send_keys(Keys.ENTER))
    until(lambda: "hello from webby" in browser.find_element("id", "console").text, "webby's console", limit=30)
    # Followed: its new lines arrive with no further click.
    first = last_tick(browser.find_element("id", "console").text)
    until(lambda: last_tick(browser.find_element("id", "console").text) > first, "the console to grow", limit=30)
    fresh(lambda: css(browser, "#actions button[data-action=checkpoint]")[0].send_keys(Keys.ENTER))
    until(lambda: any("checkpoint.dump" in r.text and "succeeded" in r.text for r in css(browser, "#tasks tr")),
          "the checkpoint's task to succeed", limit=60)
    shot(browser, "instance")
    browser.get(f"https://127.0.0.1:{ctl.ui_port}/instances")
    until(lambda: state_of(browser, "webby") == "running", "the instances page again", limit=20)

    fresh(lambda: css(browser, 'tr[data-instance="webby"] button[data-action=stop]')[0].click())
    until(lambda: state_of(browser, "webby") == "stopped", "webby stopped", limit=60)
    fresh(lambda: css(browser, 'tr[data-instance="webby"] button[data-action=delete]')[0].click())
    browser.switch_to.alert.accept()
    until(lambda: state_of(browser, "webby") is None, "webby gone from the list", limit=60)

    browser.get(f"https://127.0.0.1:{ctl.ui_port}/nodes/{a.node_id}")
    until(lambda: css(browser, "#plugins tr"), "the node's plugins", limit=20)
    # Keyboard again: a focused button takes ENTER.
    fresh(lambda: next(e for e in css(browser, "#actions button") if e.text == "Drain").send_keys(Keys.ENTER))
    until(lambda: "drained" in browser.find_element("id", "node-state").text, "the node drained", limit=30)
    shot(browser, "node")
    fresh(lambda: next(e for e in css(browser, "#actions button") if e.text == "Undrain").send_keys(Keys.ENTER))
    until(lambda: "drained" not in browser.find_element("id", "node-state").text, "the node undrained", limit=30)

    browser.get(f"https://127.0.0.1:{ctl.ui_port}/tokens")
    until(lambda: css(browser, "#token button"), "the tokens page", limit=20)
    fresh(lambda: css(browser, "#token button")[0].click())
    command = until(lambda: css(browser, "#join-command") and browser.find_element("id", "join-command").text,
                    "the join command", limit=20)
    assert command.startswith("kumo-agent join --token ")
    shot(browser, "tokens")
    browser.get(f"https://127.0.0.1:{ctl.ui_port}/logging")
    until(lambda: len(css(browser, "#effective tr")) == 2, "each node's log forwarding", limit=20)
    shot(browser, "logging")
    browser.get(f"https://127.0.0.1:{ctl.ui_port}/alerts")
    until(lambda: css(browser, "#alerts tr"), "the alerts", limit=20)
    shot(browser, "alerts")

    browser.get(f"https://127.0.0.1:{ctl.ui_port}/tasks")
    until(lambda: css(browser, "#tasks tr"), "the tasks", limit=20)
    shot(browser, "tasks")
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
                and "Content Security Policy" in entry["message"]]
