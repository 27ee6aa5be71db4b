"""`openpcc chat` on a terminal: a multi-turn private conversation.

Why a loop of its own rather than the one-shot path: a conversation is only useful if its
history is resent every turn, and resent through the SDK's conversation cache scope
(openpcc/client/cachescope.py), so each turn re-prefills only what is new on the node that
answered the last one. The loop keeps that history, streams each answer as it comes, and
stays put when an answer is stopped (Ctrl-C) or fails.

Output: stdout carries only the answers (text, or JSON lines with ``--json``), so
``openpcc chat | tee`` and ``openpcc chat --json | jq`` keep just those; the header, notes,
command replies and errors go to stderr (on a terminal both are the same screen).

History lines typed here stay in memory (readline) and are never written to disk: they are
the very prompts this tool exists to keep private.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import signal
import sys
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar, cast

from openpcc.client.profile import client_from_config
from openpcc.errors import OpenPCCError
from openpcc.files import write_private

PROMPT = "you> "
CONTINUE = "...> "
T = TypeVar("T")


class Interrupted(Exception):
    """Ctrl-C cancelled what the loop was running (an answer, a lookup)."""


HEADER = (
    "Private chat with {model}: only the attested node reads your words, inside its TEE; "
    "the relay sees your IP address, the gateway a one-time token, the issuer your account, "
    "and none of them what you write. /help for commands, Ctrl-C stops an answer, "
    "Ctrl-D leaves."
)

HELP = """\
/reset          start a new conversation (the system message and model stay)
/system TEXT    set the system message (/system alone shows it, /system - removes it)
/model NAME     talk to another attested model (/model alone lists them)
/save FILE      write the conversation as OpenAI JSON: {"model": ..., "messages": [...]}
/status         tokens left, the node and release that answered, the cache scope
/help           this list
/quit           leave (or Ctrl-D)
A line ending in \\ continues on the next line; start a line with // to send a leading /.
Ctrl-C stops the answer being written (what arrived stays in the history) and keeps
the chat open."""

# C0 (but newline and tab), DEL and C1 controls: what a terminal acts on.
_CONTROLS = {c: "\ufffd" for c in [*range(0x20), *range(0x7F, 0xA0)] if c not in (0x09, 0x0A)}


def terminal_safe(text: str) -> str:
    """The model's control characters shown as U+FFFD, never sent to a terminal: an
    answer must not move the cursor, retitle the window or write the clipboard (escape
    sequences). Only for display; the history and pipes keep the text as it came."""
    return text.translate(_CONTROLS)


COMMANDS = ("/reset", "/system", "/model", "/save", "/status", "/help", "/quit", "/exit")


@dataclass
class Conversation:
    """What is resent every turn: the system message, then the turns so far."""

    model: str
    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def saved(self) -> dict[str, Any]:
        """What `/save` writes: the body's two fields an OpenAI SDK call takes back."""
        return {"model": self.model, "messages": self.messages()}


class ChatLoop:
    """The read-answer loop; one event loop (``runner``) for the whole session, so the
    client's verified nodes, wallet and node affinity carry over from turn to turn."""

    def __init__(
        self,
        runner: asyncio.Runner,
        client: Any,
        wallet: Any,
        conversation: Conversation,
        *,
        params: dict[str, Any],
        as_json: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
        stdin: TextIO | None = None,
    ) -> None:
        self.runner = runner
        self.client = client
        self.wallet = wallet
        self.conv = conversation
        self.params = params
        self.as_json = as_json
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.stdin = stdin or sys.stdin
        self.turns_answered = 0
        self._at_prompt = False
        self._active: asyncio.Task[Any] | None = None
        # readline edits and remembers lines only when both ends are the terminal
        # (Python's input()); otherwise the prompt goes to stderr, not into a pipe.
        self.line_editing = self.stdin.isatty() and self.out.isatty()
        if self.line_editing:
            _setup_readline()

    # ------------------------------------------------------------------ output

    def say(self, text: str = "") -> None:
        print(text, file=self.err, flush=True)

    # -------------------------------------------------------------------- loop

    def run(self, first: str | None = None) -> int:
        """Chat until Ctrl-D or /quit; 0 then."""
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            return self._loop(first)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _loop(self, first: str | None) -> int:
        self.say(HEADER.format(model=self.conv.model))
        with contextlib.suppress(Interrupted):
            self.call(self._greet())
        if first:
            self.turn(first)
        while True:
            try:
                line = self.read()
            except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
                self.say("\n(Ctrl-D or /quit leaves)")
                continue
            except EOFError:
                self.say()
                return 0
            if line.startswith("//"):
                self.turn(line[1:])
            elif line.startswith("/"):
                if not self.command(line):
                    return 0
            elif line.strip():
                self.turn(line)

    def _on_sigint(self, _signum: int, _frame: Any) -> None:
        """Ctrl-C: at the prompt, drop the line; otherwise cancel what runs on the loop
        (an answer: its stream closes inside the task) and nothing else. Never raising
        outside the prompt is what makes a second Ctrl-C, or one while the stop is being
        recorded, unable to leave the loop half way."""
        if self._at_prompt:
            raise KeyboardInterrupt
        task = self._active
        if task is not None and not task.done():
            task.cancel()
            self.runner.get_loop().call_soon_threadsafe(lambda: None)  # wake its select()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the session's loop; Interrupted if Ctrl-C cancelled it."""

        async def tracked() -> T:
            self._active = asyncio.current_task()
            return await coro

        try:
            return self.runner.run(tracked())
        except asyncio.CancelledError:
            raise Interrupted from None
        finally:
            self._active = None

    def read(self) -> str:
        self._at_prompt = True
        try:
            lines = [self._input(PROMPT)]
            while lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1]
                lines.append(self._input(CONTINUE))
        finally:
            self._at_prompt = False
        return "\n".join(lines)

    def _input(self, prompt: str) -> str:
        if self.line_editing:
            return input(prompt)
        self.err.write(prompt)
        self.err.flush()
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    async def _greet(self) -> None:
        """Check the attestations once up front, so the first turn is not the one to say
        that no node can be trusted."""
        try:
            nodes = await self.client.verified_nodes()
        except OpenPCCError as exc:
            self.say(f"error: {exc}")
            return
        serving = [n for n in nodes if self.conv.model in n.models]
        releases = sorted({n.release_id for n in serving if n.release_id})
        what = (
            f"{len(serving)} attested node{'s serve' if len(serving) > 1 else ' serves'} "
            f"{self.conv.model}"
        )
        if releases:
            what += f" (release {', '.join(releases)}{self._manifest_note()})"
        self.say(what if serving else f"warning: no attested node serves {self.conv.model} yet")

    def _manifest_note(self) -> str:
        manifest = getattr(self.client.trust, "manifest", None)
        if manifest is None:
            return ""
        note = f", manifest serial {manifest.serial}"
        if getattr(self.client.trust, "development", False):
            note += "; development manifest: simulated TEEs trusted"
        return note

    # -------------------------------------------------------------------- turns

    def turn(self, text: str) -> None:
        """One question and its streamed answer. Interrupted (Ctrl-C): what arrived stays in
        the history, as the reader saw it; nothing arrived, or an error: the question is
        dropped, so the history holds only answered turns (up-arrow sends it again)."""
        self.conv.turns.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            self.call(self._stream(self.conv.messages(), pieces))
        except Interrupted:
            partial = "".join(pieces)
            if partial:
                self.conv.turns.append({"role": "assistant", "content": partial})
                self._end_answer(partial)
                self.say("[stopped: the partial answer stays in the history]")
            else:
                self.conv.turns.pop()
                self._end_answer(partial)
                self.say("[stopped before the answer began: your message is not kept]")
            return
        except OpenPCCError as exc:
            self.conv.turns.pop()
            self._end_answer("".join(pieces))
            self.say(f"error: {exc}\n(your message is not kept; up-arrow sends it again)")
            return
        answer = "".join(pieces)
        self.conv.turns.append({"role": "assistant", "content": answer})
        self.turns_answered += 1
        self._end_answer(answer)

    def _shown(self, text: str) -> str:
        return terminal_safe(text) if self.out.isatty() else text

    def _end_answer(self, text: str) -> None:
        if not self.as_json and text and not text.endswith("\n"):
            self.out.write("\n")
            self.out.flush()

    async def _stream(self, messages: list[dict[str, str]], pieces: list[str]) -> None:
        if self.wallet.count() == 0:
            self.say("(fetching a batch of unlinkable tokens from the issuer…)")
        stream = cast(
            AsyncGenerator[dict[str, Any], None],
            self.client.chat_completions_stream(self.conv.model, messages, **self.params),
        )
        # Closed here, on Ctrl-C too (the task's cancellation arrives inside it): the
        # connection to the relay ends now rather than whenever the generator is collected.
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                if self.as_json:
                    self.out.write(json.dumps(chunk) + "\n")
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    pieces.append(piece)
                    if piece and not self.as_json:
                        self.out.write(self._shown(piece))
                self.out.flush()

    # ----------------------------------------------------------------- commands

    def command(self, line: str) -> bool:
        """Run one /command; False to leave."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        handlers: dict[str, Callable[[str], None]] = {
            "/reset": self._reset,
            "/system": self._system,
            "/model": self._model,
            "/save": self._save,
            "/status": lambda _: self._status(),
            "/help": lambda _: self.say(HELP),
        }
        if name in ("/quit", "/exit"):
            return False
        handler = handlers.get(name)
        if handler is None:
            self.say(f"unknown command {name}; /help lists them")
        else:
            handler(rest)
        return True

    def _reset(self, _: str) -> None:
        n = len(self.conv.turns)
        self.conv.turns.clear()
        self.say(
            f"new conversation ({n} message(s) forgotten); its first message starts a new "
            "cache scope"
        )

    def _system(self, text: str) -> None:
        if not text:
            self.say(f"system message: {self.conv.system!r}" if self.conv.system else "none")
            return
        self.conv.system = None if text == "-" else text
        said = "removed" if self.conv.system is None else "set"
        note = (
            " (the history stays; its cache scope changes with its start)"
            if self.conv.turns
            else ""
        )
        self.say(f"system message {said}{note}")

    def _model(self, name: str) -> None:
        try:
            models = self.call(self.client.models())
        except Interrupted:
            return
        except OpenPCCError as exc:
            self.say(f"error: {exc}")
            return
        listed = ", ".join(models) or "none"
        if not name:
            self.say(f"model: {self.conv.model} (attested nodes serve: {listed})")
        elif name not in models:
            self.say(f"no attested node serves {name!r} (they serve: {listed}); model unchanged")
        else:
            self.conv.model = name
            self.say(f"model: {name} (the history stays; its cache scope is per model)")

    def _save(self, path: str) -> None:
        if not path:
            self.say("usage: /save FILE")
            return
        target = Path(path).expanduser()
        doc = json.dumps(self.conv.saved(), indent=1, ensure_ascii=False) + "\n"
        try:
            # 0600: a saved conversation is as private as the chat itself.
            write_private(target, doc.encode())
        except OSError as exc:
            self.say(f"cannot save to {target}: {exc.strerror or exc}")
            return
        self.say(f"saved {len(self.conv.messages())} message(s) to {target} (mode 0600)")

    def _status(self) -> None:
        for key, value in status_lines(self.client, self.wallet, self.conv, self.turns_answered):
            self.say(f"{key:13} {value}")


def status_lines(
    client: Any, wallet: Any, conv: Conversation, turns_answered: int
) -> list[tuple[str, str]]:
    """What `/status` shows, from what the client and wallet already know (sends nothing)."""
    rows = [("tokens left", f"{wallet.count()} in the wallet (one is spent per turn)")]
    rows.append(("model", conv.model))
    node = client.last_node
    trust = client.trust
    manifest = getattr(trust, "manifest", None)
    if client.last_node_id is None:
        rows += [("node", "none yet: no turn answered"), ("verified", "-")]
    else:
        rows.append(("node", f"{client.last_node_id.hex()} answered the last turn"))
        if node is not None:
            release = node.release_id or "?"
            if manifest is not None:
                until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(manifest.expires_at))
                release += f" in release manifest serial {manifest.serial} (until {until})"
            rows.append(("release", release))
            verified = (
                "yes: its attestation verified under that manifest, and the answer came "
                "sealed from its attested key"
            )
            if getattr(trust, "development", False):
                verified += " (simulated TEE: a development manifest)"
            rows.append(("verified", verified))
        else:
            rows.append(("verified", "NO: the answer named a node it was not sealed to"))
    if any(m["role"] == "user" for m in conv.turns):
        salt = client.cache_salt(conv.model, conv.messages())
        digest = hashlib.sha256(salt).hexdigest()[:12] if salt else "none"
        scope = (
            f"conversation {digest} (one scope for every turn of this conversation; shown as "
            "a digest: the scope itself goes to the node alone)"
        )
        rows.append(("cache scope", scope))
    else:
        rows.append(("cache scope", "conversation (begins with your first message)"))
    rows.append(
        ("history", f"{len(conv.messages())} message(s), {turns_answered} turn(s) answered")
    )
    return rows


def _setup_readline() -> None:
    """Line editing, in-memory history and /command completion (stdlib readline)."""
    try:
        import readline
    except ImportError:  # Python built without it: plain input() still works
        return

    def complete(text: str, state: int) -> str | None:
        if not readline.get_line_buffer().startswith("/"):
            return None
        options = [c + " " for c in COMMANDS if c.startswith(text)]
        return options[state] if state < len(options) else None

    readline.set_completer_delims(" \t\n")
    readline.set_completer(complete)
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")


def _no_sigint_here() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def run_interactive(
    config_path: Path,
    *,
    model: str | None = None,
    system: str | None = None,
    params: dict[str, Any] | None = None,
    as_json: bool = False,
    first: str | None = None,
) -> int:
    """The interactive `openpcc chat`; its exit status."""

    async def open_client() -> tuple[Any, Any, str, Any]:
        return client_from_config(config_path)  # its HTTP sessions need a running loop

    with asyncio.Runner() as runner:
        # The loop's worker threads (the wallet's blinding, DNS) never take Ctrl-C: a
        # SIGINT the kernel hands to one of them would not wake the prompt's select(),
        # and would surface only at the next key pressed.
        runner.get_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(initializer=_no_sigint_here)
        )
        client, wallet, default_model, session = runner.run(open_client())

        async def close() -> None:
            await client.aclose()
            await wallet.aclose()
            if session is not None:
                await session.close()

        try:
            chat = ChatLoop(
                runner,
                client,
                wallet,
                Conversation(model or default_model, system),
                params=params or {},
                as_json=as_json,
            )
            return chat.run(first)
        finally:
            runner.run(close())
