"""
ovirt-img as a process, for what only a process shows: the password
prompt on a terminal (a pty that is the command's controlling terminal,
as getpass reads /dev/tty), password files, the log file's format, that
the log keeps credentials out, and one line on stderr on failure. Against
the engine simulator (test/enginesim.py) on our daemon.
"""

import os
import re
import select
import subprocess
import sys
import time
import urllib.parse
import uuid

import pytest

import enginesim

MiB = 1 << 20
TIMEOUT = 60
OVIRT_IMG = os.path.join(os.path.dirname(sys.executable), "ovirt-img")
USERNAME = "admin@internal"
# Spaces and punctuation: the SDK sends it form-encoded.
PASSWORD = "Open Sesame-4711!&"

# Run argv[1:] with the pty on stdin as the controlling terminal (the
# child is a session leader: start_new_session).
WITH_CTTY = ("import fcntl, os, sys, termios; "
             "fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
             "os.execv(sys.argv[1], sys.argv[1:])")

LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    r"(DEBUG  |INFO   |WARNING|ERROR  |CRITICAL) "
    r"\([^)]+\) \[[^\]]+\] .*")


class Engine(enginesim.Engine):
    """The simulator, remembering the SSO tokens it gave out (logout
    forgets them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.issued = []

    def login(self, username, password):
        token = super().login(username, password)
        if token is not None:
            self.issued.append(token)
        return token


class Env:

    def __init__(self, engine, pki, tmp):
        self.engine = engine
        self.pki = pki
        self.tmp = tmp
        home = tmp / "home"
        (home / ".config").mkdir(parents=True)
        self.environ = dict(os.environ, HOME=str(home),
                            OVIRT_IMG_VDSM_ID=str(tmp / "no-vdsm.id"))
        self.environ.pop("XDG_CONFIG_HOME", None)

    def password_file(self, text):
        path = self.tmp / f"password-{uuid.uuid4().hex[:8]}"
        path.write_text(text)
        return str(path)

    def argv(self, command, *args, password=PASSWORD):
        argv = [OVIRT_IMG, command, "--engine-url", self.engine.url,
                "--username", USERNAME, "--cafile", self.pki["ca_file"]]
        if password is not None:
            argv += ["--password-file", self.password_file(password)]
        return argv + [str(a) for a in args]

    def run(self, *argv, input=None):
        """Run without a terminal (a new session): never a prompt on the
        terminal of the tests."""
        return subprocess.run(argv, env=self.environ, cwd=self.tmp,
                              input=input or "", stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              timeout=TIMEOUT, start_new_session=True)

    def disk(self, size=MiB):
        """A disk on the engine, holding a known image."""
        image = self.tmp / f"image-{uuid.uuid4().hex[:8]}.raw"
        with open(image, "wb") as f:
            f.write(b"\xa5" * (64 * 1024))
            f.truncate(size)
        return image, self.engine.add_disk_from_image(image, fmt="raw")


@pytest.fixture
def env(tmp_path, make_daemon, pki):
    daemon = make_daemon()
    eng = Engine(tmp_path / "store", daemon.control.server.address(),
                 daemon.remote.server.address()[1], pki, delay=0.02,
                 users={USERNAME: PASSWORD})
    eng.start()
    yield Env(eng, pki, tmp_path)
    eng.stop()


@pytest.fixture
def offline_env(tmp_path, pki):
    """No engine (nothing listens on port 1): for what happens before the
    first request."""
    return Env(NoEngine(), pki, tmp_path)


class NoEngine:
    url = "https://127.0.0.1:1"


# A terminal.

class Terminal:
    """A command on a pty: stdin, stdout and stderr, its controlling
    terminal."""

    def __init__(self, argv, environ, cwd, ctty=True):
        self.fd, slave = os.openpty()
        if ctty:
            argv = [sys.executable, "-c", WITH_CTTY, *argv]
        try:
            self.proc = subprocess.Popen(
                argv, env=environ,
                cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                start_new_session=True)
        finally:
            os.close(slave)
        self.output = b""

    def expect(self, text, timeout=TIMEOUT):
        """Read until text is in the output; return the output up to and
        including it."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if not self._read(deadline):
                raise AssertionError(f"{text!r} not in {self.output!r}")
        return self.output[:self.output.index(text) + len(text)]

    def write(self, data):
        os.write(self.fd, data)

    def wait(self, timeout=TIMEOUT):
        """Read until the command closes the terminal; its exit code."""
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            pass
        return self.proc.wait(max(0, deadline - time.monotonic()))

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        os.close(self.fd)

    def _read(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"Timed out; output: {self.output!r}")
        readable, _, _ = select.select([self.fd], [], [], left)
        if not readable:
            return True
        try:
            data = os.read(self.fd, 4096)
        except OSError:
            # EIO: every slave descriptor is closed.
            return False
        self.output += data
        return bool(data)


@pytest.fixture
def terminal():
    started = []

    def start(argv, env, ctty=True):
        t = Terminal(argv, env.environ, env.tmp, ctty=ctty)
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


PROMPT = f"Password for {USERNAME}: ".encode()


def test_password_prompt(env, terminal, tmp_path):
    image, disk = env.disk()
    dst = tmp_path / "dst.raw"
    term = terminal(env.argv("download-disk", "-f", "raw", disk.id, dst,
                             password=None), env)
    before = term.expect(PROMPT)
    # Asked before anything else is drawn: a progress line would be
    # drawn over the prompt.
    assert before == PROMPT
    term.write(PASSWORD.encode() + b"\n")
    assert term.wait() == 0, term.output
    # Not echoed.
    assert PASSWORD.encode() not in term.output
    assert b"download completed" in term.output
    assert dst.read_bytes() == image.read_bytes()


def test_password_prompt_eof(offline_env, terminal, tmp_path):
    term = terminal(offline_env.argv(
        "download-disk", str(uuid.uuid4()), tmp_path / "dst.raw",
        password=None), offline_env)
    term.expect(PROMPT)
    # ^D: the terminal's end of file.
    term.write(b"\x04")
    assert term.wait() == 1
    out = term.output.decode()
    # The error on a line of its own, the last.
    lines = out.splitlines()
    assert lines[0] == PROMPT.decode()
    assert lines[-1].startswith("ovirt-img: error: No password")
    assert "Traceback" not in out


def test_password_prompt_stdin_terminal(offline_env, terminal, tmp_path):
    # A terminal on stdin that is not the controlling terminal: asked on
    # it all the same, without echo.
    term = terminal(offline_env.argv(
        "download-disk", str(uuid.uuid4()), tmp_path / "dst.raw",
        password=None), offline_env, ctty=False)
    assert term.expect(PROMPT) == PROMPT
    term.write(PASSWORD.encode() + b"\n")
    assert term.wait() == 1
    assert PASSWORD.encode() not in term.output
    lines = term.output.decode().splitlines()
    assert lines[-1].startswith("ovirt-img: error: Cannot ")
    assert "127.0.0.1" in lines[-1]


def test_no_terminal_no_password(offline_env, tmp_path):
    # No terminal, stdin at its end: no password, not a hang.
    p = offline_env.run(*offline_env.argv(
        "download-disk", str(uuid.uuid4()), tmp_path / "dst.raw",
        password=None))
    assert p.returncode == 1
    # No prompt, no getpass warnings: one line.
    line, = p.stderr.splitlines()
    assert line.startswith("ovirt-img: error: No password")


def test_no_terminal_password_on_stdin(env, tmp_path):
    # As with upstream's getpass: a script may give it on stdin.
    image, disk = env.disk()
    dst = tmp_path / "dst.raw"
    p = env.run(*env.argv("download-disk", "-f", "raw", disk.id, dst,
                          password=None), input=PASSWORD + "\n")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert dst.read_bytes() == image.read_bytes()


# Password files.

@pytest.mark.parametrize("text", [PASSWORD, PASSWORD + "\n"])
def test_password_file(env, tmp_path, text):
    image, disk = env.disk()
    dst = tmp_path / "dst.raw"
    p = env.run(*env.argv("download-disk", "-f", "raw", disk.id, dst,
                          password=text))
    assert p.returncode == 0, p.stderr
    assert dst.read_bytes() == image.read_bytes()


@pytest.mark.parametrize("text", [PASSWORD[:-1], PASSWORD + " ",
                                  PASSWORD + "\n\n"])
def test_password_file_wrong(env, tmp_path, text):
    p = env.run(*env.argv("download-disk", str(uuid.uuid4()),
                          tmp_path / "dst.raw", password=text))
    assert p.returncode == 1
    line, = p.stderr.splitlines()
    assert "invalid username or password" in line
    assert PASSWORD not in p.stderr


def test_password_file_unreadable(env, tmp_path):
    path = env.password_file("\xff")
    with open(path, "wb") as f:
        f.write(b"\xff\xfe")
    argv = env.argv("download-disk", str(uuid.uuid4()), tmp_path / "dst",
                    password=None)
    p = env.run(*argv, "--password-file", path)
    assert p.returncode == 1
    line, = p.stderr.splitlines()
    assert line.startswith(f"ovirt-img: error: Cannot read password file "
                           f"{path}")


# Logging.

def test_debug_log_keeps_credentials_out(env, tmp_path):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(b"\x5a" * MiB)
        f.truncate(2 * MiB)
    log = tmp_path / "ovirt-img.log"
    p = env.run(*env.argv("upload-disk", "-s", "nfs", "-f", "raw",
                          "--log-file", log, "--log-level", "debug", src))
    assert p.returncode == 0, p.stderr
    # The log goes to the file: nothing on stderr.
    assert p.stderr == ""

    text = log.read_text()
    lines = text.splitlines()
    assert lines
    for line in lines:
        assert LOG_LINE.fullmatch(line), line
    # The SDK's wire log is there...
    assert any("[ovirtsdk]" in line and "Authorization: Bearer" in line
               for line in lines)
    assert any("/ovirt-engine/api/imagetransfers" in line for line in lines)
    # ...without the credentials.
    transfer, = env.engine.transfers.values()
    assert transfer.phase == "finished_success"
    secrets = {
        "password": PASSWORD,
        "encoded password": urllib.parse.quote_plus(PASSWORD),
        "ticket": transfer.ticket_uuid,
    }
    assert env.engine.issued
    for i, token in enumerate(env.engine.issued):
        secrets[f"token {i}"] = token
    for name, secret in secrets.items():
        assert secret not in text, f"{name} in the log"


def test_failure_is_one_line(env, tmp_path):
    disk_id = str(uuid.uuid4())
    p = env.run(*env.argv("download-disk", disk_id, tmp_path / "dst.raw"))
    assert p.returncode == 1
    line, = p.stderr.splitlines()
    assert line.startswith(f"ovirt-img: error: Cannot get disk {disk_id}: ")
    assert "Not Found" in line


def test_failure_with_debug_log(env, tmp_path):
    disk_id = str(uuid.uuid4())
    log = tmp_path / "ovirt-img.log"
    p = env.run(*env.argv("download-disk", "--log-file", log,
                          "--log-level", "debug", disk_id,
                          tmp_path / "dst.raw"))
    assert p.returncode == 1
    line, = p.stderr.splitlines()
    assert line.startswith(f"ovirt-img: error: Cannot get disk {disk_id}")
    text = log.read_text()
    # The traceback is in the log, the message too.
    assert "Traceback (most recent call last)" in text
    assert f"Command failed: Cannot get disk {disk_id}" in text
    assert PASSWORD not in text


def test_password_prompt_interrupted(offline_env, terminal, tmp_path):
    term = terminal(offline_env.argv(
        "download-disk", str(uuid.uuid4()), tmp_path / "dst.raw",
        password=None), offline_env)
    term.expect(PROMPT)
    # ^C: SIGINT to the terminal's foreground process group.
    term.write(b"\x03")
    assert term.wait() == 130
    lines = term.output.decode().splitlines()
    assert lines[0] == PROMPT.decode()
    assert lines[-1] == "ovirt-img: interrupted"


def test_log_file_cannot_be_opened(offline_env, tmp_path):
    log = tmp_path / "no-such-dir" / "ovirt-img.log"
    p = offline_env.run(*offline_env.argv(
        "download-disk", "--log-file", log, str(uuid.uuid4()),
        tmp_path / "dst.raw"))
    assert p.returncode == 1
    line, = p.stderr.splitlines()
    assert line == (f"ovirt-img: error: Cannot open log file {log}: No such "
                    f"file or directory")
