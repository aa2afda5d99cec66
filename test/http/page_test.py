"""
The upload and download page (ovirt_imageio/http/static/, issue 15) in a
real browser: Debian's headless chromium driven by chromedriver through
Selenium, against our daemon and proxy serving real images (qemu-nbd,
nbdkit, file).

The browser trusts the test CAs the way a user's browser does: they are
in the NSS database of its HOME (certutil), with no certificate error
ignored, so the untrusted-certificate test sees a real TLS failure.

Deterministic stalls come from nbdkit's pause filter: while paused, the
daemon's writes hang in nbdkit, so the page has requests in flight for
as long as the test wants; failures come from nbdkit's error filter,
switched by a file. Nothing waits for time to pass: every wait polls the
page with a deadline.

One browser for the module (starting it costs a second); each test has
its own daemons, whose random ports make a fresh origin, so the page's
sessionStorage and localStorage start empty in every test.
"""

import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.request

import pytest

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.wait import WebDriverWait

import testutil
from ovirt_imageio import checksum

MiB = 1024**2

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Generous: the machine is shared; a wait returns as soon as it can.
TIMEOUT = 60

# How often a wait looks at the page: each look is a round trip to
# chromedriver (a few ms).
POLL = 0.05

TICKET_ID = "page-ticket-secret-0123"


# The browser.

def nss_db(home, ca_files):
    """An NSS database in home/.pki/nssdb trusting ca_files for TLS
    servers, where chromium on Linux reads the user's trusted CAs."""
    db = os.path.join(home, ".pki", "nssdb")
    os.makedirs(db)
    certutil = ["certutil", "-d", f"sql:{db}"]
    subprocess.run(certutil + ["-N", "--empty-password"], check=True,
                   timeout=30)
    for i, ca in enumerate(ca_files):
        subprocess.run(certutil + ["-A", "-n", f"test-ca-{i}", "-t", "C,,",
                                   "-i", ca], check=True, timeout=30)


@pytest.fixture(scope="module")
def browser_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    dirs = {name: str(base / name) for name in ("home", "profile",
                                                 "downloads")}
    for d in dirs.values():
        os.makedirs(d)
    return dirs


@pytest.fixture(scope="module")
def browser(browser_dirs, pki, proxy_pki):
    nss_db(browser_dirs["home"], [pki["ca_file"], proxy_pki["ca_file"]])
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-quic", "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=900,1400",
                f"--user-data-dir={browser_dirs['profile']}"):
        options.add_argument(arg)
    # The console, to see CSP violations and script errors.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option("prefs", {
        "download.default_directory": browser_dirs["downloads"],
        "download.prompt_for_download": False,
    })
    env = dict(os.environ, HOME=browser_dirs["home"])
    service = Service(executable_path=CHROMEDRIVER, env=env)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    yield driver
    driver.quit()


class Page:
    """The page in the browser, by its stable element ids."""

    def __init__(self, driver, origin):
        self.driver = driver
        self.origin = origin

    def open(self, fragment=""):
        # Drop what earlier tests left in the console.
        self.driver.get_log("browser")
        self.driver.get(self.origin + "/" + fragment)
        self.wait(lambda: self.status() == "idle", "the page's script")
        return self

    def el(self, id):
        return self.driver.find_element(By.ID, id)

    def text(self, id):
        return self.el(id).text

    def status(self):
        return self.text("status")

    def set_url(self, value):
        self.driver.execute_script(
            "const e = arguments[0]; e.value = arguments[1];"
            "e.dispatchEvent(new Event('change'));", self.el("url"), value)

    def set_option(self, id, value):
        self.driver.execute_script("arguments[0].value = arguments[1]",
                                   self.el(id), str(value))

    def choose(self, path, expect="transfer's disk"):
        """Choose a file; wait until the page shows its format and, by
        default, the transfer's size."""
        self.el("file").send_keys(os.path.abspath(path))
        self.wait(lambda: expect in self.text("format"),
                  f"{expect!r} in #format")

    def click(self, id):
        self.wait(lambda: self.el(id).is_enabled(), f"#{id} enabled")
        self.el(id).click()

    def progress(self):
        p = self.el("progress")
        return (int(float(p.get_attribute("value"))),
                int(float(p.get_attribute("max"))))

    def log(self):
        return self.text("log")

    def console_errors(self):
        return [e["message"] for e in self.driver.get_log("browser")
                if e["level"] == "SEVERE"]

    def wait(self, predicate, what, timeout=TIMEOUT):
        try:
            return WebDriverWait(self.driver, timeout,
                                 poll_frequency=POLL).until(
                lambda d: predicate())
        except WebDriverException as e:
            raise AssertionError(
                f"Timeout waiting for {what}: status {self.status()!r}, "
                f"log:\n{self.log()}") from e

    def wait_status(self, *wanted, timeout=TIMEOUT):
        """Wait for one of the wanted statuses; fail at once on an error
        nobody wanted."""
        def check():
            s = self.status()
            if s in wanted:
                return s
            if s.startswith("error") and not any(
                    s.startswith(w) for w in wanted):
                raise AssertionError(
                    f"status {s!r}, waiting for {wanted}; log:\n"
                    f"{self.log()}")
            return None
        return self.wait(check, f"status in {wanted}", timeout)

    def storage(self, kind):
        return self.driver.execute_script(
            f"return Object.assign({{}}, {kind})")

    def upload_records(self):
        return {k: json.loads(v) for k, v in self.storage("localStorage")
                .items() if k.startswith("imageio.upload.")}


@pytest.fixture
def page(browser):
    """page(origin) -> Page, opened; the browser's pending work is dropped
    at teardown."""
    def make(origin, fragment=""):
        return Page(browser, origin).open(fragment)
    yield make
    browser.get("about:blank")


# Servers and images.

def origin(daemon):
    return f"https://localhost:{daemon.remote.server.address()[1]}"


def transfer_url(daemon, ticket_id=TICKET_ID):
    return f"{origin(daemon)}/images/{ticket_id}"


def add_ticket(daemon, url, size, ops=("read", "write"), ticket_id=TICKET_ID,
               **kw):
    ticket = {"uuid": ticket_id, "size": size, "ops": list(ops),
              "timeout": 3000, "inactivity_timeout": 3000, "url": url,
              "transfer_id": "tr-page", **kw}
    resp, data = daemon.api.put(ticket)
    assert resp.status == 200, data
    return ticket


def server_checksum(url, ca_file, algorithm="sha256"):
    ctx = ssl.create_default_context(cafile=ca_file)
    with urllib.request.urlopen(
            f"{url}/checksum?algorithm={algorithm}", context=ctx,
            timeout=TIMEOUT) as resp:
        return json.load(resp)["checksum"]


class FileImage:
    """A local file as checksum.compute() wants an image."""

    def __init__(self, path):
        self.path = path
        self.size = os.path.getsize(path)

    def read_into(self, buf, offset):
        with open(self.path, "rb") as f:
            f.seek(offset)
            assert f.readinto(buf) == len(buf)

    def extents(self, context):
        return []


def file_checksum(path, algorithm="sha256"):
    return checksum.compute(FileImage(path), algorithm)["checksum"]


def qemu_img_compare(a, b, fmt_a="raw", fmt_b="raw"):
    # -U: the daemon's file backend may still hold the image open.
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", fmt_a, "-F", fmt_b,
                        a, b], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def sparse_file(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def allocated(path):
    return os.stat(path).st_blocks * 512


class PauseControl:
    """nbdkit's pause filter: while paused, NBD requests hang."""

    def __init__(self, path):
        self.path = path

    def _send(self, command):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(TIMEOUT)
            s.connect(self.path)
            s.sendall(command)
            assert s.recv(1) == command.upper()

    def pause(self):
        self._send(b"p")

    def resume(self):
        self._send(b"r")


@pytest.fixture
def paused_target(nbdkit, sock_dir, tmp_path):
    """target(path) -> (nbdkit, PauseControl): nbdkit's file plugin
    serving path behind the pause filter. Resumed at teardown so nothing
    hangs."""
    controls = []

    def start(path):
        ctl = os.path.join(sock_dir, f"pause-{len(controls)}.sock")
        srv = nbdkit("file", path, f"pause-control={ctl}",
                     filters=["pause"])
        control = PauseControl(ctl)
        controls.append(control)
        return srv, control

    yield start
    for control in controls:
        try:
            control.resume()
        except OSError:
            pass


def data_image(make_image, name, size, fmt="raw"):
    """An image with data everywhere (no chunk is all zero)."""
    return make_image(name=name, fmt=fmt, size=size,
                      commands=[f"write -P 0x{0x30 + i:02x} {i}M 1M"
                                for i in range(size // MiB)])


# Upload.

def test_upload_raw_data_and_zeros(qemu_nbd, make_daemon, page, make_image,
                                   tmp_path, pki, caplog):
    """64 MiB raw with data and zero regions: PUT the data, PATCH zero the
    zeros (the target stays sparse), PATCH flush; the disk equals the file
    and the page's checksum equals the server's."""
    caplog.set_level("DEBUG")
    size = 64 * MiB
    src = make_image(name="src", size=size, commands=[
        "write -P 0x41 0 3M", "write -P 0x42 20M 1M",
        "write -P 0x43 40M 5M", "write -P 0x44 67104768 4k"])
    target = sparse_file(tmp_path / "target.raw", size)
    export = qemu_nbd(target)
    daemon = make_daemon()
    add_ticket(daemon, f"nbd:unix:{export.socket}", size, sparse=True)

    p = page(origin(daemon), f"#ticket={TICKET_ID}")
    # The fragment became the field, and left the address bar.
    assert p.el("url").get_attribute("value") == TICKET_ID
    assert "#" not in p.driver.current_url
    assert p.storage("sessionStorage")["imageio.url"] == TICKET_ID

    p.choose(src)
    assert "format raw" in p.text("format")
    assert p.text("warning") == ""
    p.set_option("chunk", 1)
    p.click("start")
    p.wait_status("done")
    assert p.progress() == (size, size)
    assert "100%" in p.text("progress-text")

    qemu_img_compare(src, target)
    # 9 MiB of data (in 1 MiB chunks touching it: 10 MiB); the zero
    # chunks went as PATCH zero and punched nothing into being.
    assert allocated(target) <= 11 * MiB
    assert server_checksum(transfer_url(daemon), pki["ca_file"]) == \
        file_checksum(src)
    # Done: nothing left to resume.
    assert p.upload_records() == {}

    p.click("verify")
    p.wait_status("verified")
    assert file_checksum(src) in p.log()
    # No script error, no CSP violation (the page's CSP allows only its
    # own origin, no inline script or style).
    assert p.console_errors() == []

    # The daemon's own log (not Selenium's, which has the page's URL).
    daemon_log = "\n".join(
        f"{r.name} {r.getMessage()}" for r in caplog.records
        if not r.name.startswith(("selenium", "urllib3")))
    assert "tr-page" in daemon_log
    assert TICKET_ID not in daemon_log


def test_upload_qcow2(make_daemon, page, make_image, tmp_path, pki):
    """A qcow2 goes up byte for byte (file backend, as WebAdmin uploads to
    a qcow2 volume); the page sniffs its format and virtual size."""
    src = make_image(name="src", fmt="qcow2", size=64 * MiB, commands=[
        "write -P 0x51 0 1M", "write -P 0x52 30M 2M"])
    size = os.path.getsize(src)
    target = sparse_file(tmp_path / "target.qcow2", size)
    daemon = make_daemon()
    add_ticket(daemon, f"file://{target}", size)

    p = page(origin(daemon))
    p.set_url(transfer_url(daemon))
    p.choose(src)
    assert "format qcow2, virtual size 64.0 MiB" in p.text("format")
    assert p.text("warning") == ""
    p.click("start")
    p.wait_status("done")

    qemu_img_compare(src, target, "qcow2", "qcow2")
    with open(src, "rb") as a, open(target, "rb") as b:
        assert a.read() == b.read()
    p.click("verify")
    p.wait_status("verified")

    # Start again sends it all again, over a spoiled disk.
    with open(target, "r+b") as f:
        f.write(b"spoiled")
    p.click("start")
    p.wait(lambda: p.log().count("upload done") == 2, "the second upload")
    assert p.status() == "done"
    with open(src, "rb") as a, open(target, "rb") as b:
        assert a.read() == b.read()


def test_sniff_iso_and_too_large(make_daemon, page, tmp_path, make_image):
    """An ISO is named; a file larger than the transfer's disk gets a
    warning and Start refuses it before sending anything."""
    iso = tmp_path / "cd.iso"
    with open(iso, "wb") as f:
        f.truncate(2 * MiB)
        f.seek(0x8001)
        f.write(b"CD001")
    target = sparse_file(tmp_path / "small.raw", MiB)
    daemon = make_daemon()
    add_ticket(daemon, f"file://{target}", MiB)

    p = page(origin(daemon))
    p.set_url(TICKET_ID)
    p.choose(iso)
    assert "format iso" in p.text("format")
    assert "does not fit" in p.text("warning")
    p.click("start")
    p.wait_status("error: the file is larger than the transfer's disk "
                  f"({2 * MiB} > {MiB} bytes)")
    assert allocated(target) == 0


def test_pause_resume(paused_target, make_daemon, page, make_image, tmp_path,
                      browser_dirs):
    """Pause lets the chunks in flight finish and sends no more; Resume
    sends the rest. The screenshot shows the page mid-upload."""
    size = 16 * MiB
    src = data_image(make_image, "src", size)
    target = sparse_file(tmp_path / "target.raw", size)
    srv, nbd = paused_target(target)
    daemon = make_daemon()
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size)

    p = page(origin(daemon))
    p.set_url(transfer_url(daemon))
    p.choose(src)
    p.set_option("chunk", 1)
    p.set_option("inflight", 2)

    nbd.pause()
    p.click("start")
    p.wait_status("uploading")
    p.click("pause")
    nbd.resume()
    p.wait_status("paused")
    # Exactly the two chunks in flight when Pause was pressed.
    assert p.progress() == (2 * MiB, size)
    [record] = p.upload_records().values()
    assert record["ranges"] == [[0, 2 * MiB]]
    assert p.el("resume").is_enabled()
    assert not p.el("start").is_enabled()

    nbd.pause()
    p.click("resume")
    p.wait_status("uploading")
    # The rate of what this page sent so far, pauses excluded.
    p.wait(lambda: "MiB/s" in p.text("progress-text"), "the rate")
    shot = os.path.join(browser_dirs["downloads"], "..", "page.png")
    assert p.driver.save_screenshot(shot)
    assert os.path.getsize(shot) > 0
    nbd.resume()
    p.wait_status("done")
    assert p.progress() == (size, size)
    qemu_img_compare(src, target)


def test_reload_resumes(paused_target, make_daemon, page, make_image,
                        tmp_path):
    """A reload mid-upload loses the chunks in flight but not the ones
    done: the tab keeps the ticket (sessionStorage), the page its ranges
    (localStorage), and Start sends only the rest."""
    size = 16 * MiB
    src = data_image(make_image, "src", size)
    target = sparse_file(tmp_path / "target.raw", size)
    srv, nbd = paused_target(target)
    daemon = make_daemon()
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size)

    p = page(origin(daemon))
    p.set_url(transfer_url(daemon))
    p.choose(src)
    p.set_option("chunk", 1)
    p.set_option("inflight", 3)
    nbd.pause()
    p.click("start")
    p.wait_status("uploading")
    p.click("pause")
    nbd.resume()
    p.wait_status("paused")
    assert p.progress() == (3 * MiB, size)
    nbd.pause()
    p.click("resume")
    p.wait_status("uploading")

    # Three more chunks hang in nbdkit when the page goes away.
    p.driver.refresh()
    p.wait(lambda: p.status() == "idle", "the reloaded page")
    nbd.resume()
    assert p.el("url").get_attribute("value") == transfer_url(daemon)
    [record] = p.upload_records().values()
    assert record["ranges"] == [[0, 3 * MiB]]
    # The ticket is not in localStorage, only its hash.
    assert TICKET_ID not in json.dumps(p.storage("localStorage"))
    assert hashlib.sha256(TICKET_ID.encode()).hexdigest() in \
        next(iter(p.upload_records()))

    p.choose(src)
    assert p.progress() == (3 * MiB, size)
    assert "uploaded before" in p.log()
    p.click("start")
    p.wait_status("done")
    qemu_img_compare(src, target)
    assert p.upload_records() == {}


def test_cancel(paused_target, make_daemon, page, make_image, tmp_path):
    """Cancel aborts the requests in flight and forgets the upload."""
    size = 8 * MiB
    src = data_image(make_image, "src", size)
    target = sparse_file(tmp_path / "target.raw", size)
    srv, nbd = paused_target(target)
    daemon = make_daemon()
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size)

    p = page(origin(daemon))
    p.set_url(transfer_url(daemon))
    p.choose(src)
    p.set_option("chunk", 1)
    p.set_option("inflight", 2)
    nbd.pause()
    p.click("start")
    p.wait_status("uploading")
    p.click("cancel")
    p.wait_status("canceled")
    nbd.resume()
    assert p.progress()[0] == 0
    assert p.upload_records() == {}
    assert p.el("start").is_enabled()
    assert not p.el("resume").is_enabled()
    assert not p.el("pause").is_enabled()


def test_cancel_verify(paused_target, make_daemon, page, make_image,
                      tmp_path):
    """Cancel stops a verify whose server checksum hangs."""
    size = 4 * MiB
    src = data_image(make_image, "src", size)
    srv, nbd = paused_target(src)
    daemon = make_daemon()
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size, ops=["read"])

    p = page(origin(daemon))
    p.set_url(transfer_url(daemon))
    p.choose(src)
    nbd.pause()
    p.click("verify")
    p.wait_status("verifying")
    p.click("cancel")
    p.wait_status("canceled")
    nbd.resume()
    assert p.el("verify").is_enabled()
    assert "verify canceled" in p.log()


def test_retry_failed_chunk(nbdkit, make_daemon, page, make_image, tmp_path):
    """A chunk the disk fails (EIO: the daemon answers 500) is retried
    with backoff until it succeeds."""
    size = 4 * MiB
    src = data_image(make_image, "src", size)
    target = sparse_file(tmp_path / "target.raw", size)
    trigger = tmp_path / "fail-writes"
    trigger.touch()
    srv = nbdkit("file", target, "error-pwrite=EIO", "error-pwrite-rate=1",
                 f"error-file={trigger}", filters=["error"])
    daemon = make_daemon()
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size)

    p = page(origin(daemon))
    p.set_url(transfer_url(daemon))
    p.choose(src)
    p.set_option("chunk", 1)
    p.click("start")
    p.wait(lambda: "retry 1 of 5" in p.log(), "a retry")
    assert p.status() == "uploading"
    assert "500" in p.log()
    trigger.unlink()
    p.wait_status("done")
    qemu_img_compare(src, target)


def test_keyboard_only(make_daemon, page, make_image, tmp_path):
    """Everything but the file chooser's dialog by keyboard: the ticket is
    typed, Tab moves on to Test connection, and from the file input Tab
    reaches Start, which Enter presses."""
    size = 2 * MiB
    src = data_image(make_image, "src", size)
    target = sparse_file(tmp_path / "target.raw", size)
    daemon = make_daemon()
    add_ticket(daemon, f"file://{target}", size)

    p = page(origin(daemon))
    keys = ActionChains(p.driver)
    p.el("url").send_keys(TICKET_ID, Keys.TAB)
    assert p.driver.switch_to.active_element.get_attribute("id") == "test"
    keys.send_keys(Keys.ENTER).perform()
    p.wait_status("connected")

    p.choose(src)
    p.driver.execute_script("arguments[0].focus()", p.el("file"))
    # The file input, the options' summary, then Start.
    keys.send_keys(Keys.TAB, Keys.TAB).perform()
    assert p.driver.switch_to.active_element.get_attribute("id") == "start"
    keys.send_keys(Keys.ENTER).perform()
    p.wait_status("done")
    qemu_img_compare(src, target)


def test_phone_width(make_daemon, page, browser):
    """At phone width nothing needs scrolling sideways, even a long URL."""
    daemon = make_daemon()
    size = browser.get_window_size()
    browser.set_window_size(360, 800)
    try:
        p = page(origin(daemon))
        p.set_url(transfer_url(daemon, "x" * 200))
        p.click("test")
        p.wait_status("connected")
        width = p.driver.execute_script(
            "return [document.documentElement.scrollWidth, innerWidth]")
        # Really a phone's viewport, and no wider content.
        assert width[1] <= 400
        assert width[0] <= width[1]
        assert p.el("progress").size["width"] <= width[1]
    finally:
        browser.set_window_size(size["width"], size["height"])


def test_refused_chunk_then_resume(make_daemon, page, make_image,
                                   tmp_path):
    """A refused chunk (403: the ticket is gone) is not retried: the
    upload stops with the server's message, the ticket blanked out of
    it, and Resume sends the rest once the ticket is back."""
    size = 2 * MiB
    src = data_image(make_image, "src", size)
    target = sparse_file(tmp_path / "target.raw", size)
    daemon = make_daemon()
    ticket = add_ticket(daemon, f"file://{target}", size)

    p = page(origin(daemon))
    p.set_url(transfer_url(daemon))
    p.choose(src)
    resp, _ = daemon.api.delete(TICKET_ID)
    assert resp.status == 204
    p.click("start")
    p.wait_status("error: chunk at 0: 403 Forbidden: You are not allowed "
                  "to access this resource: No such ticket …")
    assert TICKET_ID not in p.log()
    assert "retry" not in p.log()
    assert p.progress()[0] == 0

    resp, data = daemon.api.put(ticket)
    assert resp.status == 200, data
    p.click("resume")
    p.wait_status("done")
    qemu_img_compare(src, target)


# Download.

def test_download(qemu_nbd, make_daemon, page, make_image, browser_dirs):
    """The link saves the disk under the ticket's file name; Verify then
    checks the saved file against the disk."""
    size = 8 * MiB
    src = make_image(name="src", size=size, commands=[
        "write -P 0x61 0 1M", "write -P 0x62 5M 64k"])
    export = qemu_nbd(src, read_only=True)
    daemon = make_daemon()
    name = "page-download.raw"
    add_ticket(daemon, f"nbd:unix:{export.socket}", size, ops=["read"],
               filename=name)

    p = page(origin(daemon))
    p.set_url(transfer_url(daemon))
    saved = os.path.join(browser_dirs["downloads"], name)
    p.wait(lambda: p.text("download") == f"Download {name}",
           "the link named after the ticket's file name")
    p.click("download")
    p.wait(lambda: os.path.exists(saved)
           and os.path.getsize(saved) == size
           and not os.path.exists(saved + ".crdownload"), "the download")
    qemu_img_compare(src, saved)

    p.choose(saved)
    p.click("verify")
    p.wait_status("verified")

    # One byte changed: not the disk.
    other = make_image(name="other", size=size, commands=[
        "write -P 0x61 0 1M", "write -P 0x62 5M 64k", "write -P 1 7M 1"])
    p.choose(other)
    p.click("verify")
    p.wait_status("error: checksum mismatch: the disk differs from the file")


# Through the proxy.

@pytest.fixture
def make_proxy_daemon(make_daemon):
    return lambda: make_daemon(local={"enable": "false"})


def test_upload_through_proxy(qemu_nbd, make_proxy_daemon, make_proxy, page,
                              make_image, tmp_path):
    """The page served by the proxy uploads through it to the daemon."""
    size = 8 * MiB
    src = make_image(name="src", size=size, commands=[
        "write -P 0x71 0 2M", "write -P 0x72 6M 1M"])
    target = sparse_file(tmp_path / "target.raw", size)
    export = qemu_nbd(target)
    daemon = make_proxy_daemon()
    proxy = make_proxy()
    add_ticket(daemon, f"nbd:unix:{export.socket}", size)
    add_ticket(proxy, transfer_url(daemon), size)

    p = page(origin(proxy))
    p.set_url(proxy.url(TICKET_ID))
    p.choose(src)
    p.set_option("chunk", 1)
    p.click("start")
    p.wait_status("done")
    qemu_img_compare(src, target)
    p.click("verify")
    p.wait_status("verified")


def test_upload_to_other_daemon(qemu_nbd, make_daemon, page, make_image,
                                tmp_path):
    """The page of one daemon uploads to and verifies against another
    (CORS: preflights for PUT with Content-Range and for PATCH, OPTIONS,
    /extents, /checksum)."""
    size = 8 * MiB
    src = make_image(name="src", size=size, commands=[
        "write -P 0x81 0 1M", "write -P 0x82 5M 2M"])
    target = sparse_file(tmp_path / "target.raw", size)
    export = qemu_nbd(target)
    own = make_daemon()
    other = make_daemon()
    add_ticket(other, f"nbd:unix:{export.socket}", size, sparse=True)

    p = page(origin(own))
    p.set_url(transfer_url(other))
    # The size comes from the other daemon's /extents.
    p.choose(src, expect="the transfer's disk is 8.0 MiB")
    p.set_option("chunk", 1)
    p.click("start")
    p.wait_status("done")
    qemu_img_compare(src, target)
    assert allocated(target) <= 3 * MiB
    p.click("verify")
    p.wait_status("verified")


# Test connection.

@pytest.fixture(scope="module")
def untrusted_pki(tmp_path_factory):
    """A PKI the browser does not trust."""
    return testutil.make_pki(tmp_path_factory.mktemp("untrusted-pki"))


def test_connection_own(make_daemon, page):
    daemon = make_daemon()
    p = page(origin(daemon))
    p.set_url("any-ticket")
    p.click("test")
    p.wait_status("connected")
    assert origin(daemon) in p.text("connection")


def test_connection_other_daemon_trusted(make_daemon, page):
    """The transfer URL names another daemon (CORS on /info/)."""
    own = make_daemon()
    other = make_daemon()
    p = page(origin(own))
    p.set_url(transfer_url(other))
    p.click("test")
    p.wait_status("connected")
    assert origin(other) in p.text("connection")


def test_connection_other_daemon_untrusted(make_daemon, page, pki,
                                           untrusted_pki):
    """A daemon whose certificate the browser does not trust: WebAdmin's
    message, and the link to the CA this page's daemon offers."""
    own = make_daemon(remote={"offer_ca_file": pki["ca_file"]})
    other = make_daemon(tls=dict(untrusted_pki))
    p = page(origin(own))
    p.set_url(transfer_url(other))
    p.click("test")
    p.wait_status("error: connection to ovirt-imageio service has failed")
    assert "registered as a valid CA in the browser" in p.text("connection")
    link = p.el("ca-link")
    assert link.get_attribute("href") == origin(own) + "/ca.pem"
    # The link serves the CA.
    ctx = ssl.create_default_context(cafile=pki["ca_file"])
    with urllib.request.urlopen(origin(own) + "/ca.pem", context=ctx,
                                timeout=TIMEOUT) as resp:
        with open(pki["ca_file"], "rb") as f:
            assert resp.read() == f.read()


# The checksum construction against ovirt_imageio/checksum.py.

@pytest.mark.parametrize("size,block_size", [
    (0, MiB), (1, MiB), (3 * MiB, MiB), (3 * MiB + 12345, MiB),
    (5 * MiB, 4 * MiB),
])
def test_blkhash_matches_checksum_module(make_daemon, page, tmp_path, size,
                                         block_size):
    path = tmp_path / "image"
    data = bytearray(size)
    # Data, a zero block, more data, an unaligned tail.
    for offset in range(0, size, 97 * 1024):
        data[offset:offset + 1000] = b"x" * min(1000, size - offset)
    if size >= 2 * MiB:
        data[MiB:2 * MiB] = bytes(MiB)
    path.write_bytes(data)
    daemon = make_daemon()
    p = page(origin(daemon))
    p.el("file").send_keys(str(path))
    got = p.driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const file = document.getElementById("file").files[0];
        window.imageioPage.blkhash(file, file.size, arguments[0])
            .then(done, (e) => done("error: " + e));
    """, block_size)
    want = checksum.compute(FileImage(str(path)), "sha256", block_size)
    assert got == want["checksum"]
