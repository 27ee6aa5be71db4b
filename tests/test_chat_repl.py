"""`openpcc chat` as people use it: a conversation on a terminal, and the pipes around it.

The interactive chat is driven through a pseudo-terminal (the child's controlling
terminal, so Ctrl-C is the terminal's own SIGINT and readline is live) against the whole
local stack in front of the fake engine (tests/conftest.py ``local_stack``). The fake
engine records every body it gets, each with the node's ``cache_salt``: one salt for the
turns of one conversation is the proof that the history went through one cache scope.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from openpcc import cli, http_client
from openpcc.client.cachescope import CACHE_SECRET_FILE, CacheSecret, derive_salt
from openpcc.devstack.local import LocalStack
from openpcc.lifecycle import die_with_parent
from tests.conftest import FAKE_MODEL, ROOT

ANSWER = "Hello from the fake engine."
TIMEOUT = 20.0  # each wait; a turn takes well under a second here
_ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>]|\r|\x07")


class Terminal:
    """A child on a pseudo-terminal: ``expect`` text on it, ``send`` keys to it."""

    def __init__(self, args: list[str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
        deathsig = die_with_parent()

        def controlling_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # after setsid: Ctrl-C reaches it
            if deathsig is not None:
                deathsig()

        self.proc = subprocess.Popen(
            args,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            env={**os.environ, "TERM": "xterm", "PYTHONFAULTHANDLER": "1"},
            start_new_session=True,
            preexec_fn=controlling_terminal,
        )
        os.close(slave)
        self.master = master
        self.raw = b""
        self.seen = 0  # where the next expect starts, in the cleaned text

    @property
    def text(self) -> str:
        return _ESCAPES.sub(b"", self.raw).decode(errors="replace")

    def _read(self, deadline: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child is gone
            data = b""
        self.raw += data
        return bool(data)

    def expect(self, needle: str, timeout: float = TIMEOUT) -> str:
        """The text from the last match up to and including ``needle``."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text
            at = text.find(needle, self.seen)
            if at >= 0:
                out, self.seen = text[self.seen : at + len(needle)], at + len(needle)
                return out
            gone = not self._read(deadline) and self.proc.poll() is not None
            if gone or time.monotonic() >= deadline:
                raise AssertionError(f"{needle!r} not seen; the terminal shows:\n{text}")

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def line(self, text: str) -> str:
        """Type a line, wait for the next prompt; what was printed in between."""
        self.send(text + "\r")
        self.expect(text)  # readline's echo
        return self.expect("you> ")

    def wait(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(min(deadline, time.monotonic() + 0.2))
        return self.proc.wait(timeout=1)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.master)


@contextlib.contextmanager
def chat_terminal(local_stack: LocalStack, *extra: str) -> Any:
    term = Terminal(
        [sys.executable, "-m", "openpcc.cli", "chat", "--config", str(local_stack.config_path),
         "--max-tokens", "16", *extra]
    )  # fmt: skip
    try:
        term.expect("you> ")
        yield term
    finally:
        term.close()


def _received(fake_engine: str, marker: str) -> list[dict[str, Any]]:
    """The chat bodies the engine got for the conversation that began with ``marker``."""
    with urllib.request.urlopen(fake_engine + "/_control/received", timeout=10) as r:
        recs = json.loads(r.read())
    return [
        x["body"]
        for x in recs
        if x["path"].startswith("/v1/chat/completions")
        and next(m["content"] for m in x["body"]["messages"] if m["role"] == "user") == marker
    ]


def _release(fake_engine: str) -> None:
    req = urllib.request.Request(fake_engine + "/_control/release", data=b"", method="POST")
    urllib.request.urlopen(req, timeout=10).close()


def _scope_digest(local_stack: LocalStack, first: list[dict[str, str]]) -> str:
    secret = CacheSecret(local_stack.config_path.parent / CACHE_SECRET_FILE).current()
    salt = derive_salt(secret, "conversation", model=FAKE_MODEL, messages=first)
    assert salt is not None
    return hashlib.sha256(salt).hexdigest()[:12]


def test_a_conversation_keeps_its_history_and_one_cache_scope_across_turns(
    local_stack: LocalStack, fake_engine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = "first question " + os.urandom(4).hex()
    with chat_terminal(local_stack) as term:
        header = term.text
        assert "only the attested node reads your words" in header
        assert "relay sees your IP address" in header and "gateway a one-time token" in header
        assert "1 attested node serves fake-model (release dev" in header

        for said in (first, "second question", "third question"):
            assert term.line(said).strip().endswith(ANSWER + "\nyou>")

        status = term.line("/status")
        assert re.search(r"tokens left\s+\d+ in the wallet", status)
        assert re.search(r"node\s+[0-9a-f]{32} answered the last turn", status)
        assert re.search(r"release\s+dev in release manifest serial \d+", status)
        assert re.search(r"verified\s+yes: its attestation verified", status)
        digest = _scope_digest(local_stack, [{"role": "user", "content": first}])
        assert f"cache scope   conversation {digest} " in status

        saved = tmp_path / "conversation.json"
        assert "saved 6 message(s)" in term.line(f"/save {saved}")

        second = "after reset " + os.urandom(4).hex()
        assert "new conversation (6 message(s) forgotten)" in term.line("/reset")
        assert ANSWER in term.line(second)
        term.send("\x04")  # Ctrl-D leaves
        assert term.wait() == 0

    # Three turns, each carrying the whole history so far, in one cache scope.
    bodies = _received(fake_engine, first)
    assert [len(b["messages"]) for b in bodies] == [1, 3, 5]
    assert bodies[2]["messages"][1] == {"role": "assistant", "content": ANSWER}
    assert len({b["cache_salt"] for b in bodies}) == 1
    # After /reset: history gone, and a conversation of its own.
    (after,) = _received(fake_engine, second)
    assert after["messages"] == [{"role": "user", "content": second}]
    assert after["cache_salt"] != bodies[0]["cache_salt"]

    # /save: what the OpenAI SDK sends back as it is (mode 0600: the private conversation),
    # and, from the same profile, in the same cache scope as the chat's turns.
    doc = json.loads(saved.read_text())
    assert saved.stat().st_mode & 0o777 == 0o600
    assert doc["model"] == FAKE_MODEL
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant"] * 3
    assert doc["messages"][-1] == {"role": "assistant", "content": ANSWER}
    doc["messages"].append({"role": "user", "content": "one more, from the SDK"})
    monkeypatch.setenv("OPENPCC_CLIENT_CONFIG", str(local_stack.config_path))
    with OpenAI(base_url="http://openpcc.local/v1", api_key="-", http_client=http_client()) as oai:
        reply = oai.chat.completions.create(**doc, max_tokens=8)
    assert reply.choices[0].message.content == ANSWER
    resumed = _received(fake_engine, first)[-1]
    assert len(resumed["messages"]) == 7 and resumed["cache_salt"] == bodies[0]["cache_salt"]


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(
    local_stack: LocalStack, fake_engine: str
) -> None:
    first = "GATE hold this answer " + os.urandom(4).hex()
    with chat_terminal(local_stack, "--system", "be brief") as term:
        term.send(first + "\r")
        term.expect(first)
        term.expect("Hello from the fake engine")  # all but the held last word
        term.send("\x03")
        stopped = term.expect("you> ")
        assert "[stopped: the partial answer stays in the history]" in stopped
        assert "Traceback" not in term.text
        _release(fake_engine)  # the engine's handler waits on the gate: let it finish

        # The history still says GATE, so the engine holds this answer's last word too.
        term.send("and then?\r")
        term.expect("and then?")
        term.expect("Hello from the fake engine")
        _release(fake_engine)
        assert term.expect("you> ") == ".\nyou> "
        assert "system message: 'be brief'" in term.line("/system")
        assert "no attested node serves 'nope'" in term.line("/model nope")
        help_text = term.line("/help")
        assert all(c in help_text for c in ("/reset", "/system", "/model", "/save", "/status"))
        # At the prompt: the line is dropped, the chat stays. A Ctrl-C in the instant the
        # prompt is being drawn can be lost (seen once in a CI run, left as a known
        # limitation): a second press must work.
        term.send("\x03")
        try:
            term.expect("(Ctrl-D or /quit leaves)", timeout=3)
        except AssertionError:
            term.send("\x03")
            term.expect("(Ctrl-D or /quit leaves)")
        term.send("/quit\r")
        assert term.wait() == 0
    assert "Traceback" not in term.text

    stopped_turn, next_turn = _received(fake_engine, first)
    # The partial answer was kept: the next turn resent it, in the same cache scope.
    assert next_turn["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": first},
        {"role": "assistant", "content": "Hello from the fake engine"},
        {"role": "user", "content": "and then?"},
    ]
    assert next_turn["cache_salt"] == stopped_turn["cache_salt"]


def test_piped_stdin_stays_one_shot_and_dash_i_reads_turns_from_it(
    local_stack: LocalStack,
) -> None:
    cfg = str(local_stack.config_path)
    cmd = [sys.executable, "-m", "openpcc.cli", "chat", "--config", cfg]
    one = subprocess.run(cmd, input="just once\n", capture_output=True, text=True, timeout=60)
    assert (one.returncode, one.stdout) == (0, ANSWER + "\n"), one.stderr
    turns = subprocess.run(
        [*cmd, "-i"], input="one\ntwo\n/status\n", capture_output=True, text=True, timeout=60
    )
    assert turns.returncode == 0, turns.stderr
    # stdout: the answers alone; the header, prompts and /status went to stderr.
    assert turns.stdout == (ANSWER + "\n") * 2
    assert "Private chat with fake-model" in turns.stderr
    assert "2 turn(s) answered" in turns.stderr


def test_chat_json_into_head_ends_quietly(local_stack: LocalStack, fake_engine: str) -> None:
    """`openpcc chat --json | head -3`: head leaves while the answer still streams (the
    engine holds the last word until head is gone), and chat ends with 0, silently."""
    chat = subprocess.Popen(
        [sys.executable, "-m", "openpcc.cli", "chat", "--config", str(local_stack.config_path),
         "--json", "GATE stream into head"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert chat.stdout is not None and chat.stderr is not None
    head = subprocess.Popen(["head", "-3"], stdin=chat.stdout, stdout=subprocess.PIPE)
    chat.stdout.close()  # head holds the only reader now
    try:
        lines, _ = head.communicate(timeout=60)
        assert len(lines.splitlines()) == 3
        assert all("choices" in json.loads(x) for x in lines.splitlines())
        _release(fake_engine)  # the rest of the answer now meets a closed pipe
        assert chat.wait(timeout=60) == 0
        err = chat.stderr.read().decode()
        assert "Traceback" not in err and "Exception ignored" not in err, err
    finally:
        if chat.poll() is None:
            chat.kill()
        chat.wait()
        chat.stderr.close()


def test_any_command_into_a_closed_pipe_ends_quietly(local_stack: LocalStack) -> None:
    """`openpcc status | head -1` with head already gone: the whole report meets a closed
    pipe, once, at exit (where Python would otherwise print "Exception ignored")."""
    read_end, write_end = os.pipe()
    head = subprocess.Popen(["head", "-1"], stdin=read_end, stdout=subprocess.PIPE)
    os.close(read_end)
    os.write(write_end, b"a line for head\n")
    assert head.communicate(timeout=30)[0] == b"a line for head\n"  # head has left
    try:
        out = subprocess.run(
            [sys.executable, "-m", "openpcc.cli", "status", "--config",
             str(local_stack.config_path)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    help_out = subprocess.run(
        f"{sys.executable} -m openpcc.cli --help | head -1", shell=True, capture_output=True,
        text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert help_out.stdout.startswith("usage: openpcc") and help_out.stderr == ""


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a closed stdout is a quiet ending: a socket's EPIPE (a service's peer gone)
    still surfaces, and SIGPIPE stays ignored, so no service dies of it."""

    def broken(_argv: Any) -> int:
        raise BrokenPipeError("a socket, not stdout")

    monkeypatch.setattr(cli, "_run", broken)
    with pytest.raises(BrokenPipeError):
        cli.main([])
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN


def test_answers_cannot_drive_the_terminal() -> None:
    """An answer's escape sequences (cursor moves, window title, OSC 52 clipboard) are
    shown, not obeyed, on a terminal; text, newlines and tabs pass as they are."""
    from openpcc.chat import terminal_safe

    evil = "ok\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07\x1b[2J\r\x9b1A\tend\n"
    shown = terminal_safe(evil)
    assert not any((ord(c) < 0x20 and c not in "\t\n") or 0x7F <= ord(c) < 0xA0 for c in shown)
    assert shown.startswith("ok\ufffd]52;c;") and shown.endswith("\tend\n")
    assert terminal_safe("héllo wörld ✓") == "héllo wörld ✓"
