#!/usr/bin/env python3
"""Tests for the Python keyhole client (protocol version 2), written from
``proto-spec.md`` alone.

Run with the Rust binaries in the environment::

    KEYHOLED_BIN=target/debug/keyholed KEYHOLE_BIN=target/debug/keyhole \\
        KEYHOLE_CONFORMANCE_BIN=target/debug/keyhole-conformance \\
        python3 clients/python/tests/test_client.py

This tests the package in the source tree (``clients/python`` is put first
on ``sys.path``). With ``KEYHOLE_EXPECT_INSTALLED=1`` it tests the installed
package instead: the source tree is left off ``sys.path`` and a test checks
that ``keyhole_client`` was imported from the running interpreter's
site-packages (``.ci/run`` does this in a fresh virtual environment).

The script checks the client's encoders and decoders against
``tests/vectors/golden.json`` and the vector blocks of ``proto-spec.md``,
plays scripted fake daemons to check the client's protocol-error rules, and
starts its own ``keyholed`` daemons in temporary directories to drive the real
daemon (and the Rust CLI) through every behaviour the spec documents. It uses
the standard library only, exits non-zero on any failure, and ends with a line
``N passed, N failed``.
"""

from __future__ import annotations

import ast
import asyncio
import faulthandler
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import unittest
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(HERE)  # clients/python: holds the keyhole_client package
EXPECT_INSTALLED = os.environ.get("KEYHOLE_EXPECT_INSTALLED") == "1"
if HERE in sys.path:
    sys.path.remove(HERE)
if not EXPECT_INSTALLED:
    sys.path.insert(0, PACKAGE_ROOT)
sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree

import keyhole_client as kc  # noqa: E402

REPO = os.path.abspath(os.path.join(PACKAGE_ROOT, "..", ".."))
GOLDEN_PATH = os.path.join(REPO, "tests", "vectors", "golden.json")
SPEC_PATH = os.path.join(REPO, "proto-spec.md")
README_PATH = os.path.join(REPO, "README.md")
KEYHOLED = os.environ.get("KEYHOLED_BIN", "")
KEYHOLE = os.environ.get("KEYHOLE_BIN", "")
KEYHOLE_CONFORMANCE = os.environ.get("KEYHOLE_CONFORMANCE_BIN", "")

with open(GOLDEN_PATH, encoding="utf-8") as _f:
    GOLDEN: Dict[str, Any] = json.load(_f)
with open(SPEC_PATH, encoding="utf-8") as _f:
    SPEC: str = _f.read()
VECTORS: Dict[str, Dict[str, Any]] = {v["name"]: v for v in GOLDEN["vectors"]}
NEGATIVE: Dict[str, Dict[str, Any]] = {v["name"]: v for v in GOLDEN["negative"]}
TEST_TOKEN = bytes.fromhex(GOLDEN["test_token_hex"])

IO_TIMEOUT = 10.0
"""Upper bound for any single wait on a socket or a process."""

# Section 8's table, copied by hand: code -> (name, id present, closes).
SECTION_8 = {
    0: ("HandshakeExpected", False, True), 1: ("BadMagic", False, True), 2: ("UnsupportedVersion", False, True),
    3: ("BadToken", False, True), 4: ("AuthTimeout", False, True), 5: ("PeerNotAllowed", False, True),
    6: ("TooManyUnauthenticated", False, True), 7: ("TooManyConnections", False, True),
    8: ("FrameTooLarge", False, True), 9: ("Malformed", False, True), 10: ("UnknownRequest", True, False),
    11: ("BadRequest", True, False), 12: ("NotPermitted", True, False), 13: ("ShuttingDown", False, True),
    14: ("Internal", True, False), 15: ("OverBudget", False, True), 16: ("WrongService", False, True),
    17: ("DescriptorsNotAccepted", True, False), 18: ("DescriptorMismatch", False, True),
    19: ("TooManyDescriptors", False, True),
}


# --------------------------------------------------------------------------
# Helpers: JSON forms of the golden file, raw connections, daemons
# --------------------------------------------------------------------------


def _failure_from_json(obj: Any) -> kc.Failure:
    (name, fields), = obj.items()
    if name == "ReplyTooLarge":
        return kc.FailureReplyTooLarge(fields["len"])
    if name == "Failed":
        return kc.FailureFailed(fields["message"])
    raise AssertionError(f"unknown Failure in golden.json: {obj!r}")


def hub_request_from_json(call: Any) -> kc.HubRequest:
    """A hub request from golden.json's externally tagged serde form."""
    if call == "Status":
        return kc.StatusRequest()
    if call == "Topics":
        return kc.TopicsRequest()
    (name, f), = call.items()
    if name == "Subscribe":
        return kc.Subscribe(f["sid"], f["pattern"], kc.Lag[f["lag"]])
    if name == "Unsubscribe":
        return kc.Unsubscribe(f["sid"])
    if name == "Publish":
        return kc.Publish(f["topic"], bytes(f["payload"]))
    if name == "Serve":
        return kc.Serve(f["name"])
    if name == "Unserve":
        return kc.Unserve(f["name"])
    if name == "Request":
        return kc.RequestTo(f["name"], f["timeout_ms"], bytes(f["payload"]))
    if name == "Respond":
        return kc.Respond(f["token"], bytes(f["payload"]))
    if name == "Fail":
        return kc.Fail(f["token"], _failure_from_json(f["failure"]))
    if name == "PublishMemfd":
        return kc.PublishMemfd(f["topic"])
    raise AssertionError(f"unknown hub request in golden.json: {call!r}")


def request_from_json(obj: Dict[str, Any]) -> kc.Request:
    """A transport request from golden.json's ``request`` object."""
    kind = kc.RequestKind[obj["kind"]]
    has_call = kind in (kc.RequestKind.Call, kc.RequestKind.CallFds)
    call = hub_request_from_json(obj["call"]) if has_call else None
    expect = None
    if kind == kc.RequestKind.Expect:
        expect = kc.Expect(obj["expect"]["service"], obj["expect"]["service_version"])
    # A CallFds's "fds" is the u32 count of its frame; the descriptors are not
    # in the bytes (section 15): the Request announces them without holding any.
    announced = obj["fds"] if kind == kc.RequestKind.CallFds else None
    assert ("call" in obj) == has_call and ("fds" in obj) == (kind == kc.RequestKind.CallFds), obj
    return kc.Request(obj["id"], kind, call, expect=expect, announced=announced)


def hub_reply_to_json(reply: Any) -> Any:
    if isinstance(reply, kc.Status):
        return {"Status": {"authenticated": reply.authenticated, "pending": reply.pending, "topics": reply.topics,
                           "subscriptions": reply.subscriptions, "names": reply.names,
                           "requests_in_flight": reply.requests_in_flight, "uptime_ms": reply.uptime_ms,
                           "version": reply.version}}
    if isinstance(reply, kc.Published):
        return {"Published": {"receivers": reply.receivers}}
    if isinstance(reply, kc.Responded):
        return {"Responded": {"delivered": reply.delivered}}
    if isinstance(reply, kc.TopicList):
        return {"Topics": {"patterns": [[t, n] for t, n in reply.patterns], "names": [[t, n] for t, n in reply.names],
                           "truncated": reply.truncated}}
    return type(reply).__name__  # unit variants are strings


def hub_event_to_json(ev: Any) -> Any:
    if isinstance(ev, kc.Message):
        return {"Message": {"topic": ev.topic, "sequence": ev.sequence, "payload": list(ev.payload)}}
    if isinstance(ev, kc.IncomingRequest):
        return {"Request": {"token": ev.token, "name": ev.name, "uid": ev.uid, "pid": ev.pid,
                            "payload": list(ev.payload)}}
    if isinstance(ev, kc.Response):
        o = ev.outcome
        outcome: Any
        if isinstance(o, kc.OutcomeReply):
            outcome = {"Reply": {"payload": list(o.payload)}}
        elif isinstance(o, kc.OutcomeReplyTooLarge):
            outcome = {"ReplyTooLarge": {"len": o.len}}
        elif isinstance(o, kc.OutcomeFailed):
            outcome = {"Failed": {"message": o.message}}
        else:
            outcome = type(o).__name__[len("Outcome"):]  # ResponderGone, Timeout
        return {"Response": {"request": ev.request, "outcome": outcome}}
    if isinstance(ev, kc.MessageMemfd):
        return {"MessageMemfd": {"topic": ev.topic, "sequence": ev.sequence, "len": ev.len}}
    raise AssertionError(f"not a hub event: {ev!r}")


def frame_to_json(f: kc.DaemonFrame) -> Dict[str, Any]:
    """The externally tagged serde form of a decoded daemon frame (golden.json's ``frame``)."""
    if isinstance(f, kc.Welcome):
        return {"Welcome": {"protocol_version": f.protocol_version, "service": f.service,
                            "service_version": f.service_version, "software_version": f.software_version,
                            "instance_id": f.instance_id, "connection_id": f.connection_id,
                            "max_frame_len": f.max_frame_len}}
    # ReplyFds and EventFds are subclasses of Reply and Event: test them first.
    if isinstance(f, kc.ReplyFds):
        return {"ReplyFds": {"id": f.id, "fds": f.fds, "reply": hub_reply_to_json(f.reply)}}
    if isinstance(f, kc.EventFds):
        return {"EventFds": {"stream": f.stream, "fds": f.fds, "event": hub_event_to_json(f.event)}}
    if isinstance(f, kc.Reply):
        return {"Reply": {"id": f.id, "reply": hub_reply_to_json(f.reply)}}
    if isinstance(f, kc.Event):
        return {"Event": {"stream": f.stream, "event": hub_event_to_json(f.event)}}
    if isinstance(f, kc.Ack):
        return {"Ack": {"id": f.id}}
    if isinstance(f, kc.Error):
        return {"Error": {"id": f.id, "code": f.code, "message": f.message}}
    if isinstance(f, kc.Closing):
        return {"Closing": f.reason.name}
    if isinstance(f, kc.Lagged):
        return {"Lagged": {"stream": f.stream, "missed": f.missed}}
    raise AssertionError(f"not a daemon frame: {f!r}")


def spec_matches(pattern: str, topic: str) -> bool:
    """Section 14's matching rules, written here independently of the client
    and the daemon: tokens are split on ``.`` and compared byte for byte;
    ``*`` matches exactly one token; a final ``>`` matches one or more."""
    p = pattern.encode("utf-8").split(b".")
    t = topic.encode("utf-8").split(b".")
    for i, token in enumerate(p):
        if token == b">" and i == len(p) - 1:
            return len(t) > i  # one or more tokens left
        if i >= len(t):
            return False
        if token != b"*" and token != t[i]:
            return False
    return len(t) == len(p)


def read_to_close(sock: socket.socket, timeout: float = IO_TIMEOUT) -> Tuple[List[kc.DaemonFrame], str]:
    """Read every frame until the daemon ends the stream.

    Returns the decoded frames and how the stream ended: ``"EOF"``,
    ``"ECONNRESET"`` or ``"TIMEOUT"`` (the connection stayed open). A partial
    frame at the end or an undecodable frame fails the calling test.
    """
    sock.settimeout(timeout)
    buf = bytearray()
    end = "TIMEOUT"
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            end = "ECONNRESET"
            break
        except socket.timeout:
            break
        if not chunk:
            end = "EOF"
            break
        buf += chunk
    frames: List[kc.DaemonFrame] = []
    while buf:
        payload, rest = kc.split_frame(bytes(buf))
        frames.append(kc.decode_daemon_frame(payload))
        buf = bytearray(rest)
    return frames, end


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Receive exactly n bytes or fail."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"end of stream after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def read_frames(sock: socket.socket, count: int, timeout: float = IO_TIMEOUT) -> List[kc.DaemonFrame]:
    """Read exactly ``count`` frames (no byte more than they need)."""
    sock.settimeout(timeout)
    out = []
    for _ in range(count):
        (length,) = struct.unpack("<I", recv_exactly(sock, 4))
        out.append(kc.decode_daemon_frame(recv_exactly(sock, length)))
    return out


def ping_frame(rid: int) -> bytes:
    return kc.encode_request(kc.Request(rid, kc.RequestKind.Ping))


def call_frame(rid: int, call: kc.HubRequest, extra: bytes = b"") -> bytes:
    return kc.encode_request(kc.Request(rid, kc.RequestKind.Call, call, extra))


class Daemon:
    """A ``keyholed`` started in its own temporary runtime directory."""

    def __init__(self, *flags: str, socket_path: Optional[str] = None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="khpy-")
        self.dir = os.path.join(self.tmp, "rt")
        self._socket_path = socket_path
        self.flags = flags if socket_path is None else ("--socket", socket_path, *flags)
        self.log_path = os.path.join(self.tmp, "keyholed.log")
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    @property
    def socket_path(self) -> str:
        return self._socket_path or os.path.join(self.dir, "keyhole.sock")

    @property
    def token_path(self) -> str:
        return os.path.join(self.dir, "session-token")

    @property
    def env(self) -> Dict[str, str]:
        """A client environment that points at this daemon only."""
        if self._socket_path:
            return {"KEYHOLE_DIR": self.dir, "KEYHOLE_SOCKET": self._socket_path}
        return {"KEYHOLE_DIR": self.dir}

    def start(self) -> None:
        """Start the daemon and wait until it serves a ping."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([KEYHOLED, "--dir", self.dir, *self.flags],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        _RUNNING.add(self)
        deadline = time.monotonic() + IO_TIMEOUT
        while not (os.path.exists(self.token_path) and os.path.exists(self.socket_path)):
            if self.proc.poll() is not None:
                raise AssertionError(f"keyholed exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError("keyholed did not create its socket and token file in time")
            time.sleep(0.005)
        # Serve one ping before returning, so that a signal sent right after
        # start() finds the daemon's handlers installed.
        with self.client() as c:
            self.instance_id = c.welcome.instance_id
            c.ping()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-3000:]

    def token(self) -> bytes:
        return bytes(kc.read_token_file(self.token_path))

    def client(self, **kw: Any) -> kc.KeyholeClient:
        return kc.KeyholeClient.connect(env=self.env, timeout=IO_TIMEOUT, **kw)

    def raw(self) -> socket.socket:
        """A connected socket on which nothing has been sent."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(IO_TIMEOUT)
        s.connect(self.socket_path)
        return s

    def authenticated_raw(self) -> Tuple[socket.socket, kc.Welcome]:
        """A raw socket past the handshake, with ``Welcome`` consumed."""
        s = self.raw()
        s.sendall(bytes(kc.encode_handshake(self.token())))
        (welcome,) = read_frames(s, 1)
        assert isinstance(welcome, kc.Welcome), welcome
        return s, welcome

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the daemon and wait for it; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(IO_TIMEOUT)
        _RUNNING.discard(self)
        return rc

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_RUNNING: "set[Daemon]" = set()


def _kill_leftovers() -> None:
    for d in list(_RUNNING):
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


class FakeDaemon:
    """A scripted keyhole daemon on a real socket path (so the client's peer
    check passes: it runs as our uid). ``script(conn, handshake)`` is called in
    a thread with the accepted connection and the 44 bytes it read; whatever
    the client sends afterwards is collected in ``received`` until the client
    closes, unless the script returns ``"close"`` (then the fake closes).
    With ``connections`` > 1 it serves that many connections one after the
    other (``accepted`` counts them); ``backlog`` is the listen queue's."""

    def __init__(self, script: Callable[[socket.socket, bytes], Any], connections: int = 1,
                 backlog: int = 8) -> None:
        self.tmp = tempfile.mkdtemp(prefix="khpy-fake-")
        self.path = os.path.join(self.tmp, "fake.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(backlog)
        self.listener.settimeout(IO_TIMEOUT)
        self.script = script
        self.connections = connections
        self.accepted = 0
        self.handshakes: List[bytes] = []
        self.received = bytearray()
        self.ended = threading.Event()
        self.errors: List[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for _ in range(self.connections):
                try:
                    conn, _ = self.listener.accept()
                except (socket.timeout, OSError):
                    return
                self.accepted += 1
                with conn:
                    self._serve(conn)
        finally:
            self.ended.set()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(IO_TIMEOUT)
            hs = recv_exactly(conn, 44)
            self.handshakes.append(hs)
            if self.script(conn, hs) == "close":
                return
            while True:  # collect what the client sends until it closes
                try:
                    chunk = conn.recv(65536)
                except (ConnectionResetError, socket.timeout, OSError):
                    break
                if not chunk:
                    break
                self.received += chunk
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.errors.append(err)

    @property
    def env(self) -> Dict[str, str]:
        return {"KEYHOLE_SOCKET": self.path, "KEYHOLE_TOKEN": TEST_TOKEN.hex()}

    def close(self) -> None:
        self.listener.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "FakeDaemon":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_and_close(data: bytes) -> Callable[[socket.socket, bytes], Any]:
    """A FakeDaemon script: send ``data`` after the handshake, then close."""
    def script(conn: socket.socket, hs: bytes) -> Any:
        conn.sendall(data)
        return "close"
    return script


class Responder:
    """A responder on its own connection, in a thread: it serves ``name`` and
    answers every request it is given with ``answer(request)``: bytes are
    sent with ``Respond``, a :data:`kc.Failure` with ``Fail``; None closes
    the connection without an answer (a responder that goes away). ``seen`` lists
    the requests, ``delivered`` what each ``Responded`` said. For requesters
    that run in another process (a CLI) or block this thread."""

    def __init__(self, daemon: "Daemon", name: str, answer: Callable[[kc.IncomingRequest], Any]) -> None:
        self.client = daemon.client()
        self.client.serve(name)
        self.answer = answer
        self.seen: List[kc.IncomingRequest] = []
        self.delivered: List[bool] = []
        self.errors: List[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    incoming = self.client.next_request(timeout=0.05)
                except kc.KeyholeTimeout:
                    continue
                self.seen.append(incoming)
                out = self.answer(incoming)
                if out is None:
                    self.client.close()
                    return
                if isinstance(out, (kc.FailureFailed, kc.FailureReplyTooLarge)):
                    self.delivered.append(self.client.call(kc.Fail(incoming.token, out)).delivered)
                else:
                    self.delivered.append(self.client.call(kc.Respond(incoming.token, bytes(out))).delivered)
        except kc.ConnectionClosed:
            pass
        except BaseException as err:  # noqa: BLE001 - reported by close()
            self.errors.append(err)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(IO_TIMEOUT)
        self.client.close()
        if self.errors:
            raise AssertionError(f"the responder failed: {self.errors[0]!r}")

    def __enter__(self) -> "Responder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def welcome_bytes(service: str = "hub", service_version: int = 2, protocol_version: int = 2,
                  max_frame_len: int = 16777216) -> bytes:
    return kc.encode_daemon_frame(kc.Welcome(protocol_version, service, service_version, "9.9.9",
                                             0x1122334455667788, 42, max_frame_len))


def cli(args: Sequence[str], env: Dict[str, str], input_: Optional[bytes] = None,
        timeout: float = IO_TIMEOUT) -> subprocess.CompletedProcess:
    """Run the Rust ``keyhole`` CLI with only ``env`` (plus PATH) as its environment."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    return subprocess.run([KEYHOLE, *args], env=full_env, input=input_, capture_output=True, timeout=timeout)


def py_env(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` plus what a child Python needs to import the package under
    test: the source tree on PYTHONPATH, unless the installed one is tested
    (then the interpreter, that of a virtual environment, finds it itself)."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1", **env}
    if not EXPECT_INSTALLED:
        full_env["PYTHONPATH"] = PACKAGE_ROOT
    return full_env


PY_CLI = [sys.executable, "-m", "keyhole_client"]
"""This client's own command line."""


def py_cli(args: Sequence[str], env: Dict[str, str], input_: Optional[bytes] = None) -> subprocess.CompletedProcess:
    """Run this client's own command line (``python3 -m keyhole_client``) with only ``env``."""
    return subprocess.run([*PY_CLI, *args], env=py_env(env), input=input_, capture_output=True,
                          timeout=IO_TIMEOUT)


def wait_for(predicate: Any, what: str, timeout: float = IO_TIMEOUT) -> None:
    """Poll ``predicate`` until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def run_as_uid(uid: int, fn: Any) -> Any:
    """Run ``fn()`` in a forked child switched to ``uid`` (root only); returns
    its JSON-serialisable result, or raises with the child's error text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = json.dumps({"ok": fn()})
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            out = json.dumps({"err": f"{type(err).__name__}: {err}"})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result = json.loads(data)
    if "err" in result:
        raise AssertionError(f"child as uid {uid} failed: {result['err']}")
    return result["ok"]


def classify_handshake(data: bytes, token: bytes) -> Tuple[int, int]:
    """Section 4 steps 2-3 as a function: (error code or -1 for Welcome,
    bytes needed for the verdict)."""
    (length,) = struct.unpack_from("<I", data, 0)
    if length != 40:
        return kc.ErrorCode.HandshakeExpected, 4
    if data[4:8] != b"KYHL":
        return kc.ErrorCode.BadMagic, 44
    if struct.unpack_from("<I", data, 8)[0] != 2:
        return kc.ErrorCode.UnsupportedVersion, 44
    if data[12:44] != token:
        return kc.ErrorCode.BadToken, 44
    return -1, 44


def spec_dumps() -> List[Tuple[str, bytes, List[str]]]:
    """Every ``text vector=NAME`` block of proto-spec.md: (name, bytes, annotations)."""
    out = []
    for name, body in re.findall(r"```text vector=(\S+)\n(.*?)```", SPEC, re.S):
        data = bytearray()
        notes = []
        for line in body.splitlines():
            m = re.match(r"^((?:[0-9a-f]{2} )*[0-9a-f]{2})(?: {2,}(.*))?$", line)
            if m is None:
                raise AssertionError(f"{name}: unparsable dump line {line!r}")
            data += bytes.fromhex(m.group(1).replace(" ", ""))
            notes.append(m.group(2) or "")
        out.append((name, bytes(data), notes))
    return out


# --------------------------------------------------------------------------
# 1. Vectors, encoders, decoders (no daemon)
# --------------------------------------------------------------------------


class VectorTests(unittest.TestCase):
    """The client's bytes against tests/vectors/golden.json and proto-spec.md."""

    def test_handshake_vector_byte_for_byte(self) -> None:
        v = VECTORS["handshake"]
        self.assertEqual(v["handshake"]["magic"].encode(), kc.MAGIC)
        self.assertEqual(v["handshake"]["protocol_version"], kc.PROTOCOL_VERSION)
        self.assertEqual(kc.PROTOCOL_VERSION, 2)
        token = kc.parse_token_text(v["handshake"]["token_hex"].encode())
        hs = kc.encode_handshake(token)
        self.assertEqual(bytes(hs).hex(), v["hex"])
        self.assertEqual(len(hs), 44)
        kc.wipe(hs)
        kc.wipe(token)
        self.assertEqual(bytes(hs), bytes(44), "wipe() must zero the handshake buffer")
        self.assertEqual(bytes(token), bytes(32))

    def test_every_request_vector_encodes_and_decodes(self) -> None:
        names = [n for n, v in VECTORS.items() if v["direction"] == "client_to_daemon"]
        self.assertEqual(sorted(names), ["accept_fds", "call_fds_publish_memfd", "expect", "fail",
                                         "fail_reply_too_large", "ping", "publish", "request",
                                         "respond", "serve", "shutdown", "status", "subscribe",
                                         "subscribe_drop_oldest", "topics", "unserve", "unsubscribe"])
        expect = request_from_json(VECTORS["expect"]["request"])
        self.assertEqual(expect, kc.Request(0, kc.RequestKind.Expect, expect=kc.Expect("hub", 2)),
                         "the Expect the client sends behind the handshake (id 0, the hub, version 2)")
        hub_requests = set()
        kinds = set()
        for name in names:
            with self.subTest(name):
                v = VECTORS[name]
                req = request_from_json(v["request"])
                # A CallFds vector is its bytes only (section 15): the request
                # announces its fds without holding descriptors, so what is
                # encoded and decoded here is exactly the frame's bytes.
                self.assertEqual(req.fds, ())
                self.assertEqual(kc.encode_request(req).hex(), v["hex"])
                payload, rest = kc.split_frame(bytes.fromhex(v["hex"]))
                self.assertEqual(rest, b"")
                self.assertEqual(kc.decode_request(payload), req)
                kinds.add(kc.RequestKind(req.kind).name)
                if req.call is not None:
                    hub_requests.add(type(req.call).__name__)
                    if isinstance(req.call, kc.Fail):
                        hub_requests.add(type(req.call.failure).__name__)
        self.assertEqual(hub_requests, {"StatusRequest", "Subscribe", "Unsubscribe", "Publish", "Serve", "Unserve",
                                        "RequestTo", "Respond", "Fail", "TopicsRequest", "FailureFailed",
                                        "FailureReplyTooLarge", "PublishMemfd"}, "a vector for every hub request")
        self.assertEqual(kinds, {k.name for k in kc.RequestKind}, "a vector for every request kind")
        self.assertEqual(hub_request_from_json(VECTORS["subscribe_drop_oldest"]["request"]["call"]).lag,
                         kc.Lag.DropOldest)
        # Section 15.2: AcceptFds, id 15, a bare header (no body, section 6).
        self.assertEqual(request_from_json(VECTORS["accept_fds"]["request"]),
                         kc.Request(15, kc.RequestKind.AcceptFds))
        self.assertEqual(len(bytes.fromhex(VECTORS["accept_fds"]["hex"])), 16)
        # Section 15.3: the CallFds of PublishMemfd, id 16, fds 1, topic "news.local":
        # the header (12), the u32 fds count (4), then the hub request (tag 10, the topic).
        memfd = bytes.fromhex(VECTORS["call_fds_publish_memfd"]["hex"])
        self.assertEqual(memfd, struct.pack("<IQII", 38, 16, kc.RequestKind.CallFds, 1)
                         + struct.pack("<I", kc.HubRequestTag.PublishMemfd) + kc._string("news.local"))
        self.assertEqual(len(memfd), 42, "the frame's 42 bytes (section 15.3); the payload is in the memfd")
        self.assertEqual(kc.decode_request(memfd[4:]),
                         kc.Request(16, kc.RequestKind.CallFds, kc.PublishMemfd("news.local"), announced=1))
        # Encoding it with the descriptor it carries gives the same bytes: fds
        # travel beside them (section 19.2); the count comes from the descriptors.
        self.assertEqual(kc.encode_request(kc.Request(16, kc.RequestKind.CallFds, kc.PublishMemfd("news.local"),
                                                      fds=(99,))), memfd)

    @staticmethod
    def decode_vector_frame(payload: bytes) -> kc.DaemonFrame:
        """A daemon vector decoded from its bytes alone (its descriptors, if it
        announces any, are not in them: section 15). A ``ReplyFds`` is decoded
        at the transport level (section 7: tag, id, fds, then the service's
        reply to the end of the payload) and its body with the hub's reply
        decoder: section 13 lets a hub client (this one does) refuse a
        ``ReplyFds``, since the hub never sends one, so the ``reply_fds``
        vector is only a transport-level example."""
        (tag,) = struct.unpack_from("<I", payload, 0)
        if tag != kc.FrameTag.ReplyFds:
            return kc.decode_daemon_frame(payload)
        raw = kc.decode_daemon_frame(payload, kc.RAW)
        assert isinstance(raw, kc.ReplyFds), raw
        return kc.ReplyFds(raw.id, kc.HUB.decode_reply(memoryview(raw.reply)), raw.fds)

    def test_every_daemon_vector_decodes_to_its_json_frame(self) -> None:
        names = [n for n, v in VECTORS.items() if v["direction"] == "daemon_to_client"]
        codes_seen = set()
        kinds_seen = set()
        hub_seen = set()
        for name in names:
            with self.subTest(name):
                v = VECTORS[name]
                payload, rest = kc.split_frame(bytes.fromhex(v["hex"]))
                self.assertEqual(rest, b"")
                f = self.decode_vector_frame(payload)
                self.assertEqual(frame_to_json(f), v["frame"])
                self.assertEqual(kc.encode_daemon_frame(f).hex(), v["hex"])
                kinds_seen.add(type(f).__name__)
                if isinstance(f, (kc.ReplyFds, kc.EventFds)):
                    self.assertEqual(f.fds, 1)
                    self.assertEqual(f.descriptors, (), "decoded from bytes alone: no descriptor")
                if isinstance(f, kc.ReplyFds):
                    self.assertEqual(f.id, 16, "the reply to the CallFds of call_fds_publish_memfd")
                    with self.assertRaises(kc.ProtocolError):  # the hub never sends ReplyFds (section 13)
                        kc.decode_daemon_frame(payload)
                elif isinstance(f, kc.Reply):
                    hub_seen.add(type(f.reply).__name__)
                if isinstance(f, kc.EventFds):
                    self.assertIsInstance(f.event, kc.MessageMemfd)
                    self.assertEqual(f.event.fd, -1, "no descriptor attributed to bytes alone")
                    self.assertEqual((f.event.topic, f.event.sequence, f.event.len), ("news.local", 2, 1 << 20))
                if isinstance(f, kc.Event):
                    hub_seen.add(type(f.event).__name__)
                    if isinstance(f.event, kc.Response):
                        hub_seen.add(type(f.event.outcome).__name__)
                        self.assertEqual(f.stream, 0, "a Response is an event of no stream")
                    elif isinstance(f.event, kc.IncomingRequest):
                        self.assertEqual(f.stream, 0, "a Request is an event of no stream")
                    else:
                        self.assertEqual(f.stream, 1, "the Message of subscription 1")
                if isinstance(f, kc.Lagged):
                    self.assertEqual((f.stream, f.missed), (2, 17))
                if isinstance(f, kc.Error):
                    codes_seen.add(f.code)
                    self.assertEqual(f.id is not None, not f.closes)
                    self.assertLessEqual(len(f.message.encode()), kc.MAX_ERROR_MESSAGE_LEN)
                if isinstance(f, kc.Welcome):
                    kc.check_welcome(f)  # the example Welcome is acceptable to a hub client
        self.assertEqual(kinds_seen, {"Welcome", "Reply", "Event", "Ack", "Error", "Closing", "Lagged",
                                      "ReplyFds", "EventFds"}, "a vector for every daemon frame")
        # One Error vector per code: section 8's 0 to 19 and the hub's 1000 to 1008.
        self.assertEqual(codes_seen, set(SECTION_8) | set(range(1000, 1009)), "one Error vector per code")
        self.assertEqual(hub_seen, {"Status", "Subscribed", "Unsubscribed", "Published", "Serving", "Unserved",
                                    "Requested", "Responded", "TopicList", "Message", "IncomingRequest", "Response",
                                    "OutcomeReply", "OutcomeResponderGone", "OutcomeTimeout", "OutcomeReplyTooLarge",
                                    "OutcomeFailed", "MessageMemfd"}, "a vector for every hub reply, event and outcome")
        # The plain replies (reply_fds is the one ReplyFds): unit variants are
        # strings, the others objects.
        replies = {frame_to_json(kc.decode_daemon_frame(kc.split_frame(bytes.fromhex(v["hex"]))[0]))["Reply"]["reply"]
                   .__class__.__name__ for v in VECTORS.values()
                   if v["name"].startswith("reply_") and v["name"] != "reply_fds"}
        self.assertEqual(replies, {"dict", "str"})
        self.assertEqual([n for n in names if "ReplyFds" in VECTORS[n]["frame"]], ["reply_fds"])

    def test_negative_handshake_and_request_vectors_follow_sections_4_and_6(self) -> None:
        """For every vector a client sends, the rules of sections 4 and 6
        (as implemented by kc.decode_request and classify_handshake) give the
        error code, id, close and "decided after" that golden.json states."""
        names = [n for n, v in NEGATIVE.items() if v["direction"] != "daemon_to_client"]
        self.assertEqual(len(names), 14)
        for name in names:
            v = NEGATIVE[name]
            data = bytes.fromhex(v["hex"])
            with self.subTest(name):
                if v["direction"] == "handshake":
                    code, decided = classify_handshake(data, TEST_TOKEN)
                    self.assertEqual((code, None, True), (v["error_code"], v["error_id"], v["closes"]))
                    self.assertEqual(decided, v["decided_after"])
                    continue
                (length,) = struct.unpack_from("<I", data, 0)
                if length > kc.PROTOCOL_MAX_FRAME_LEN:
                    with self.assertRaises(kc.FrameTooLargeError):
                        kc.split_frame(data[:4])  # decided on the prefix alone
                    self.assertEqual((v["error_code"], v["decided_after"]), (kc.ErrorCode.FrameTooLarge, 4))
                    continue
                payload, rest = kc.split_frame(data)
                self.assertEqual(rest, b"")
                self.assertEqual(v["decided_after"], len(data), "the verdict needs the whole frame")
                try:
                    req = kc.decode_request(payload)
                except kc.RequestRejected as rej:
                    self.assertEqual((rej.code, rej.id, rej.closes),
                                     (v["error_code"], v["error_id"], v["closes"]))
                else:  # decodes, but the hub refuses the topic
                    self.assertEqual(req, kc.Request(7, kc.RequestKind.Call, kc.Publish("", b"")))
                    self.assertEqual((v["error_code"], v["error_id"], v["closes"]), (1000, 7, False))
                    with self.assertRaises(kc.TopicError):
                        kc.check_topic(req.call.topic)

    def test_negative_daemon_vectors_are_protocol_errors(self) -> None:
        names = [n for n, v in NEGATIVE.items() if v["direction"] == "daemon_to_client"]
        self.assertEqual(sorted(names), ["server_bad_option_tag", "server_reply_trailing_byte",
                                         "server_unknown_close_reason", "server_unknown_error_code",
                                         "server_unknown_tag"])
        for name in names:
            with self.subTest(name):
                v = NEGATIVE[name]
                self.assertIsNone(v["error_code"])
                self.assertTrue(v["closes"])
                raw = bytes.fromhex(v["hex"])
                after = bytes.fromhex(VECTORS["ack"]["hex"])  # the bytes of a next frame
                data = bytearray(raw + after)
                fills: List[int] = []
                with self.assertRaises(kc.ProtocolError):
                    kc.read_frame(data, kc.PROTOCOL_MAX_FRAME_LEN, lambda: fills.append(1))
                self.assertEqual(fills, [], "the verdict needs no byte past the frame")
                self.assertEqual(bytes(data), after, "exactly the frame was consumed")
                self.assertEqual(len(raw), v["decided_after"])

    def test_spec_dumps_match_golden_json(self) -> None:
        every = {**VECTORS, **NEGATIVE}
        dumps = spec_dumps()
        self.assertEqual(sorted(n for n, _, _ in dumps), sorted(every), "one dump per golden vector")
        for name, data, notes in dumps:
            with self.subTest(name):
                self.assertEqual(data.hex(), every[name]["hex"])
                m = re.match(r"length prefix \(u32\): (\d+)", notes[0])
                self.assertIsNotNone(m, notes[0])
                announced = int(m.group(1))  # type: ignore[union-attr]
                self.assertEqual(struct.unpack_from("<I", data, 0)[0], announced)
                if announced <= kc.PROTOCOL_MAX_FRAME_LEN and name not in ("handshake_wrong_length",
                                                                          "request_before_handshake"):
                    if name not in ("frame_too_large",):
                        self.assertEqual(len(data), 4 + announced, "a dump shows the whole frame")

    def test_spec_negative_table_matches_golden_json(self) -> None:
        section = SPEC[SPEC.index("### 15.6"):SPEC.index("## 16.")]
        rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| (\d+) \| ([^|]+) \|$", section, re.M)
        self.assertEqual(sorted(r[0] for r in rows), sorted(NEGATIVE))
        for name, decided, outcome in rows:
            with self.subTest(name):
                v = NEGATIVE[name]
                self.assertEqual(int(decided), v["decided_after"])
                self.assertEqual("stays open" not in outcome, v["closes"])
                if v["error_code"] is None:
                    self.assertIn("protocol error", outcome)
                elif v["error_code"] < 1000:
                    self.assertIn(f"`Error {SECTION_8[v['error_code']][0]}`", outcome)
                else:
                    self.assertIn(f"hub error {v['error_code']}", outcome)
                if v["error_id"] is not None:
                    self.assertIn(f"with id {v['error_id']}", outcome)

    def test_section_8_table_matches_the_client(self) -> None:
        section = SPEC[SPEC.index("## 8. Error codes"):SPEC.index("## 9.")]
        rows = re.findall(r"^\| (\d+) \| `(\w+)` \| (absent|the request's) \| (yes|no) \|", section, re.M)
        parsed = {int(c): (n, i == "the request's", cl == "yes") for c, n, i, cl in rows}
        self.assertEqual(parsed, SECTION_8)
        for code, (name, has_id, closes) in SECTION_8.items():
            with self.subTest(name):
                self.assertEqual(kc.ErrorCode(code).name, name)
                self.assertEqual(code in kc.TRANSPORT_ERRORS_WITH_ID, has_id)
                self.assertEqual(kc.Error(1 if has_id else None, code, "").closes, closes)
                cls = kc.ERROR_CLASSES[kc.ErrorCode(code)]
                # WrongServiceError is the client's own check of Welcome; the
                # daemon's refusal of an Expect is a subclass of it.
                self.assertEqual(cls.__name__, name + ("DaemonError" if code == 16 else "Error"))
                err = kc.KeyholeError.from_frame(kc.Error(5 if has_id else None, code, "text"))
                self.assertIsInstance(err, cls)
                self.assertEqual((err.code, err.name, err.message, err.closes), (code, name, "text", closes))
                self.assertFalse(err.is_service_error)
                kc.check_error_frame(kc.Error(5 if has_id else None, code, ""))
                with self.assertRaises(kc.ProtocolError):  # id presence contradicting the table
                    kc.check_error_frame(kc.Error(None if has_id else 5, code, ""))
        self.assertEqual(max(SECTION_8), 19)
        for code in (20, 21, 500, 999):  # the first code past the table: server_unknown_error_code
            with self.assertRaises(kc.ProtocolError):
                kc.check_error_frame(kc.Error(None, code, ""))
        for code in (0, 1, 2, 3, 4, 5, 6, 7, 13):
            self.assertTrue(issubclass(kc.ERROR_CLASSES[kc.ErrorCode(code)], kc.HandshakeRefused))
        for code in (8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19):  # authenticated connections only
            self.assertFalse(issubclass(kc.ERROR_CLASSES[kc.ErrorCode(code)], kc.HandshakeRefused))
        self.assertEqual(kc.BUSY_ERRORS, {kc.ErrorCode.TooManyUnauthenticated, kc.ErrorCode.TooManyConnections})
        err = kc.KeyholeError.from_frame(kc.Error(None, 15, "budget"))
        self.assertIsInstance(err, kc.OverBudgetError)
        self.assertEqual((err.code, err.name, err.id, err.closes), (15, "OverBudget", None, True))
        err = kc.KeyholeError.from_frame(kc.Error(None, 16, "another service"))
        self.assertIsInstance(err, kc.WrongServiceDaemonError)
        self.assertIsInstance(err, kc.WrongServiceError, "one except catches both ways of learning it")
        self.assertEqual((err.code, err.name, err.id, err.closes), (16, "WrongService", None, True))

    def test_hub_error_codes(self) -> None:
        """Section 13's table of hub errors: 1000 + n, always with the id, never closing."""
        table = {1000: (kc.InvalidTopicError, "InvalidTopic"), 1001: (kc.HubShuttingDownError, "ShuttingDown"),
                 1002: (kc.TooManySubscriptionsError, "TooManySubscriptions"),
                 1003: (kc.SidInUseError, "SidInUse"), 1004: (kc.NoRespondersError, "NoResponders"),
                 1005: (kc.BusyError, "Busy"), 1006: (kc.TooManyNamesError, "TooManyNames"),
                 1007: (kc.TooLargeError, "TooLarge"), 1008: (kc.BadMemfdError, "BadMemfd")}
        section = SPEC[SPEC.index("**Errors** (service codes"):SPEC.index("Byte layout of the hub's request frames")]
        rows = re.findall(r"^\| (\d+) \| (\d+) \| `(\w+)` \|", section, re.M)
        self.assertEqual({int(c): (int(n), name) for c, n, name in rows},
                         {c: (c - 1000, name) for c, (_, name) in table.items()})
        for code, (cls, name) in table.items():
            with self.subTest(name):
                e = kc.KeyholeError.from_frame(kc.Error(13, code, "m"))
                self.assertIs(type(e), cls)
                self.assertEqual((e.code, e.service_code, e.id, e.closes, e.is_service_error, e.name),
                                 (code, code - 1000, 13, False, True, name))
                self.assertEqual(kc.HubErrorCode(code - 1000).name, name)
                with self.assertRaises(kc.ProtocolError):  # a service's errors always carry the id
                    kc.check_error_frame(kc.Error(None, code, ""))
        self.assertNotIsInstance(kc.KeyholeError.from_frame(kc.Error(14, 1001, "m")), kc.ShuttingDownError)
        # The two refusals of a Request are RequestErrors, like the outcomes of its Response.
        for code in (1004, 1005):
            self.assertIsInstance(kc.KeyholeError.from_frame(kc.Error(1, code, "")), kc.RequestError)
        for code in (1000, 1001, 1002, 1003, 1006, 1007, 1008):
            self.assertNotIsInstance(kc.KeyholeError.from_frame(kc.Error(1, code, "")), kc.RequestError)
        self.assertEqual((kc.MAX_SUBSCRIPTIONS, kc.MAX_NAMES, kc.MAX_IN_FLIGHT_PER_RESPONDER), (4096, 256, 256))
        e = kc.KeyholeError.from_frame(kc.Error(3, 1009, "m"))  # unknown to this client: reported
        self.assertIs(type(e), kc.ServiceError)
        self.assertEqual((e.service_code, e.id, e.closes), (9, 3, False))
        self.assertIn("service error 9", str(e))
        kc.check_error_frame(kc.Error(1, 0xFFFFFFFF, ""))

    def test_outcomes_are_distinct_exceptions(self) -> None:
        """Each outcome of a Response maps to its own RequestError; a reply is returned."""
        def outcome(o: Any) -> Any:
            try:
                return kc.outcome_result(kc.Response(10, o), "svc.clock")
            except kc.RequestError as err:
                return err
        self.assertEqual(outcome(kc.OutcomeReply(b"12:00")), b"12:00")
        gone, timeout = outcome(kc.OutcomeResponderGone()), outcome(kc.OutcomeTimeout())
        big, failed = outcome(kc.OutcomeReplyTooLarge(20000000)), outcome(kc.OutcomeFailed("no clock"))
        classes = [kc.ResponderGoneError, kc.RequestTimeout, kc.ReplyTooLargeError, kc.RequestFailed]
        for err, cls in zip((gone, timeout, big, failed), classes):
            self.assertIs(type(err), cls)
            self.assertEqual((err.request_id, err.requested_name), (10, "svc.clock"))
            for other in classes + [kc.NoRespondersError, kc.BusyError]:
                if other is not cls:
                    self.assertNotIsInstance(err, other)
        self.assertEqual(big.len, 20000000)
        self.assertEqual(failed.message, "no clock")
        self.assertNotIsInstance(timeout, kc.KeyholeTimeout, "the hub's Timeout is not the client giving up")

    def test_hub_layout_sizes(self) -> None:
        """Section 13's byte layout tables, requests and the events they cause."""
        size = lambda call: len(kc.encode_request_payload(kc.Request(1, kc.RequestKind.Call, call)))  # noqa: E731
        ev_size = lambda stream, ev: len(kc.encode_daemon_frame_payload(kc.Event(stream, ev)))  # noqa: E731
        self.assertEqual(size(kc.StatusRequest()), 16)
        self.assertEqual(size(kc.TopicsRequest()), 16)
        self.assertEqual(size(kc.Unsubscribe(2 ** 64 - 1)), 24)
        for t in ("a", "news", "é" * 100, "x" * 255):
            n = len(t.encode())
            for lag in kc.Lag:
                self.assertEqual(size(kc.Subscribe(7, t, lag)), 36 + n)
            self.assertEqual(size(kc.Serve(t)), 24 + n)
            self.assertEqual(size(kc.Unserve(t)), 24 + n)
            for p in (b"", b"hello", bytes(1000)):
                self.assertEqual(size(kc.Publish(t, p)), 32 + n + len(p))
                self.assertEqual(ev_size(3, kc.Message(t, 2 ** 64 - 1, p)), 40 + n + len(p))
                self.assertEqual(ev_size(3, kc.Message(t, 1, p)) - size(kc.Publish(t, p)), kc.MESSAGE_EVENT_OVERHEAD)
                self.assertEqual(size(kc.RequestTo(t, 2000, p)), 36 + n + len(p))
                self.assertEqual(ev_size(0, kc.IncomingRequest(5, t, 1000, 4242, p)), 48 + n + len(p))
                self.assertEqual(ev_size(0, kc.IncomingRequest(5, t, 1, 2, p)) - size(kc.RequestTo(t, 0, p)),
                                 kc.REQUEST_EVENT_OVERHEAD)
        for p in (b"", b"12:00", bytes(1000)):
            self.assertEqual(size(kc.Respond(5, p)), 32 + len(p))
            self.assertEqual(ev_size(0, kc.Response(10, kc.OutcomeReply(p))), 36 + len(p))
            self.assertEqual(ev_size(0, kc.Response(10, kc.OutcomeReply(p))) - size(kc.Respond(5, p)),
                             kc.RESPONSE_EVENT_OVERHEAD)
        self.assertEqual(size(kc.Fail(5, kc.FailureReplyTooLarge(1))), 36)
        for m in ("", "no clock", "é" * 300):
            self.assertEqual(size(kc.Fail(5, kc.FailureFailed(m))), 36 + len(m.encode()))
        self.assertEqual(len(kc.encode_daemon_frame_payload(kc.Lagged(2, 17))), 20)
        self.assertEqual(len(kc.encode_request_payload(kc.Request(1, kc.RequestKind.Ping))), 12)
        self.assertEqual(len(kc.encode_request_payload(kc.Request(1, kc.RequestKind.Shutdown))), 12)

    def test_integers_are_little_endian(self) -> None:
        self.assertEqual(kc.frame(b"x" * 40)[:4], bytes.fromhex("28000000"))
        self.assertEqual(kc._u32(16777216), bytes.fromhex("00000001"))
        self.assertEqual(kc._u64(61000), bytes.fromhex("48ee000000000000"))
        self.assertEqual(kc._string("news"), bytes.fromhex("04000000000000006e657773"))
        self.assertEqual(kc._option_u64(9), bytes.fromhex("010900000000000000"))
        self.assertEqual(kc._option_u64(None), b"\x00")
        with self.assertRaises(ValueError):
            kc._u64(2 ** 64)
        with self.assertRaises(ValueError):
            kc._u32(-1)

    def test_decoder_rejects_what_section_5_says(self) -> None:
        good = kc.encode_daemon_frame_payload(kc.Event(1, kc.Message("news", 1, b"hello")))
        self.assertEqual(kc.decode_daemon_frame(good), kc.Event(1, kc.Message("news", 1, b"hello")))
        ev = lambda body: struct.pack("<IQ", 2, 0) + body  # noqa: E731  (an Event of stream 0)
        responded = struct.pack("<IQI", 1, 11, 7)
        topics_head = struct.pack("<IQI", 1, 14, 8)
        cases = {
            "trailing byte": good + b"\x00",
            "truncated": good[:-1],
            "unknown frame tag": struct.pack("<I", 9),
            "unknown hub event tag": struct.pack("<IQI", 2, 1, 4) + good[16:],
            "event without its stream": struct.pack("<II", 2, 0),
            "bad UTF-8 topic": struct.pack("<IQIQ", 2, 1, 0, 2) + b"\xc3\x28" + struct.pack("<QQ", 1, 0),
            "bad option byte": struct.pack("<IB", 4, 2) + struct.pack("<IQ", 0, 0),
            "huge length": struct.pack("<IQIQ", 2, 1, 0, 2 ** 63) + b"x",
            "unknown hub reply tag": struct.pack("<IQI", 1, 1, 9),
            "reply without body": struct.pack("<IQ", 1, 1),
            "event without body": struct.pack("<IQ", 2, 0),
            "Ack with a trailing byte": struct.pack("<IQ", 3, 1) + b"\x00",
            "Ack truncated": struct.pack("<I", 3) + b"\x01\x00",
            "Closing reason 2": struct.pack("<II", 5, 2),
            "Closing trailing": struct.pack("<III", 5, 0, 0),
            "Welcome truncated": bytes.fromhex(VECTORS["welcome"]["hex"])[4:-1],
            "Welcome trailing": bytes.fromhex(VECTORS["welcome"]["hex"])[4:] + b"\x00",
            "Error trailing": bytes.fromhex(VECTORS["error_bad_token"]["hex"])[4:] + b"!",
            "Error bad UTF-8 message": struct.pack("<IBIQ", 4, 0, 3, 1) + b"\xff",
            "empty payload": b"",
            "Lagged truncated": struct.pack("<IQ", 6, 2) + b"\x11",
            "Lagged trailing": struct.pack("<IQQ", 6, 2, 17) + b"\x00",
            "Published without receivers": struct.pack("<IQI", 1, 6, 3),
            "Responded bool 2": responded + b"\x02",
            "Responded bool missing": responded,
            "Topics bool 2": topics_head + struct.pack("<QQ", 0, 0) + b"\x02",
            "Topics count past the end": topics_head + struct.pack("<Q", 2 ** 40) + bytes(16),
            "Topics entry truncated": topics_head + struct.pack("<QQ", 1, 3) + b"ab",
            "Status without the v2 fields": bytes.fromhex(VECTORS["reply_status"]["hex"])[4:20] + bytes(32)
            + struct.pack("<Q", 0),
            "unknown outcome tag": ev(struct.pack("<IQI", 2, 10, 5)),
            "Timeout outcome with a field": ev(struct.pack("<IQIQ", 2, 10, 2, 0)),
            "Request event truncated": bytes.fromhex(VECTORS["event_request"]["hex"])[4:-1],
        }
        for what, payload in cases.items():
            with self.subTest(what), self.assertRaises(kc.ProtocolError):
                kc.decode_daemon_frame(payload)
        t0 = time.monotonic()
        for _ in range(1000):  # a short frame announcing a long string (or list) costs nothing
            with self.assertRaises(kc.DecodeError):
                kc.decode_daemon_frame(struct.pack("<IQIQ", 2, 1, 0, 2 ** 63 - 1))
            with self.assertRaises(kc.DecodeError):
                kc.decode_daemon_frame(topics_head + struct.pack("<Q", 2 ** 64 - 1))
        self.assertLess(time.monotonic() - t0, 1.0)
        with self.assertRaises(kc.FrameTooLargeError):
            kc.split_frame(struct.pack("<I", kc.PROTOCOL_MAX_FRAME_LEN + 1))
        # A byte-order mark is part of the text, not stripped.
        bom = struct.pack("<IQIQ", 2, 1, 0, 4) + b"\xef\xbb\xbfa" + struct.pack("<QQ", 1, 0)
        self.assertEqual(kc.decode_daemon_frame(bom).event.topic, "\ufeffa")  # type: ignore[union-attr]
        # An Error message over 512 bytes is not one of section 7's protocol errors.
        long = kc.Error(None, 9, "x" * 600)
        self.assertEqual(kc.decode_daemon_frame(kc.encode_daemon_frame_payload(long)), long)

    def test_events_on_the_wrong_stream_and_impossible_lagged_are_protocol_errors(self) -> None:
        """Section 13's event table gives each event its stream (a Message:
        its subscription's sid, never 0; a Request or Response: 0); section 7
        says a Lagged counts at least 1 event, and events of stream 0 are never
        dropped (section 9: policy Disconnect)."""
        for f in (kc.Event(0, kc.Message("t", 1, b"")), kc.Event(3, kc.IncomingRequest(1, "n", 0, 0, b"")),
                  kc.Event(3, kc.Response(1, kc.OutcomeTimeout())), kc.Lagged(0, 1), kc.Lagged(2, 0)):
            with self.subTest(f=f), self.assertRaises(kc.ProtocolError):
                kc.decode_daemon_frame(kc.encode_daemon_frame_payload(f))
        for f in (kc.Event(2 ** 64 - 1, kc.Message("t", 1, b"")), kc.Event(0, kc.IncomingRequest(1, "n", 0, 0, b"")),
                  kc.Event(0, kc.Response(1, kc.OutcomeTimeout())), kc.Lagged(2 ** 64 - 1, 2 ** 64 - 1)):
            self.assertEqual(kc.decode_daemon_frame(kc.encode_daemon_frame_payload(f)), f)
        # A generic client knows no service, so any event on any stream is fine.
        raw = kc.encode_daemon_frame_payload(kc.Event(0, b"\x00\x01"), kc.RAW)
        self.assertEqual(kc.decode_daemon_frame(raw, kc.RAW), kc.Event(0, b"\x00\x01"))

    def test_welcome_checks(self) -> None:
        w = kc.decode_daemon_frame(bytes.fromhex(VECTORS["welcome"]["hex"])[4:])
        assert isinstance(w, kc.Welcome)
        kc.check_welcome(w)
        self.assertEqual((w.service, w.service_version), ("hub", 2))
        for field, value in (("protocol_version", 1), ("protocol_version", 3), ("max_frame_len", 1023),
                             ("max_frame_len", 0), ("max_frame_len", 16777217), ("max_frame_len", 2 ** 32 - 1)):
            with self.subTest(f"{field}={value}"), self.assertRaises(kc.ProtocolError):
                kc.check_welcome(kc.Welcome(**{**w.__dict__, field: value}))
        for value in (1024, 4096, 16777216):
            kc.check_welcome(kc.Welcome(**{**w.__dict__, "max_frame_len": value}))
        with self.assertRaises(kc.WrongServiceError) as ctx:
            kc.check_welcome(kc.Welcome(**{**w.__dict__, "service": "notes", "service_version": 1}))
        self.assertEqual(str(ctx.exception), "the daemon serves `notes` version 1, not `hub` version 2")
        self.assertEqual((ctx.exception.service, ctx.exception.service_version), ("notes", 1))
        with self.assertRaises(kc.WrongServiceError) as ctx:
            kc.check_welcome(kc.Welcome(**{**w.__dict__, "service_version": 1}))  # the hub of version 1
        self.assertEqual(str(ctx.exception), "the daemon serves `hub` version 1, not `hub` version 2")
        kc.check_welcome(kc.Welcome(**{**w.__dict__, "service": "notes", "service_version": 7}), kc.RAW)
        with self.assertRaises(kc.ProtocolError):  # a generic client still checks the transport's fields
            kc.check_welcome(kc.Welcome(**{**w.__dict__, "protocol_version": 1}), kc.RAW)

    def test_request_decoding_rules_of_section_6(self) -> None:
        def rejected(payload: bytes) -> Tuple[int, Optional[int], bool]:
            with self.assertRaises(kc.RequestRejected) as ctx:
                kc.decode_request(payload)
            return ctx.exception.code, ctx.exception.id, ctx.exception.closes

        self.assertEqual(rejected(b""), (kc.ErrorCode.Malformed, None, True))
        self.assertEqual(rejected(bytes(11)), (kc.ErrorCode.Malformed, None, True))
        self.assertEqual(rejected(struct.pack("<QI", 4, 6)), (kc.ErrorCode.UnknownRequest, 4, False))
        # AcceptFds (kind 4): no body; CallFds (kind 5): fds 1 to 8, then a Call's body (section 19).
        self.assertEqual(kc.decode_request(struct.pack("<QI", 4, 4)), kc.Request(4, kc.RequestKind.AcceptFds))
        self.assertEqual(rejected(struct.pack("<QI", 4, 4) + b"\x00"), (kc.ErrorCode.BadRequest, 4, False))
        self.assertEqual(rejected(struct.pack("<QI", 4, 5)), (kc.ErrorCode.BadRequest, 4, False))
        memfd_body = kc._u32(10) + kc._string("t")
        self.assertEqual(kc.decode_request(struct.pack("<QII", 4, 5, 1) + memfd_body),
                         kc.Request(4, kc.RequestKind.CallFds, kc.PublishMemfd("t"), announced=1))
        for n in (0, 9):
            self.assertEqual(rejected(struct.pack("<QII", 4, 5, n) + memfd_body),
                             (kc.ErrorCode.TooManyDescriptors, None, True))
        self.assertEqual(rejected(struct.pack("<QI", 4, 0xFFFFFFFF) + b"junk"), (kc.ErrorCode.UnknownRequest, 4, False))
        self.assertEqual(rejected(struct.pack("<QI", 5, 2) + b"\x00"), (kc.ErrorCode.BadRequest, 5, False))
        self.assertEqual(rejected(struct.pack("<QI", 6, 0)), (kc.ErrorCode.BadRequest, 6, False))  # Call, no body
        self.assertEqual(rejected(struct.pack("<QII", 7, 0, 3) + struct.pack("<Q", 1) + b"t"),
                         (kc.ErrorCode.BadRequest, 7, False))  # Publish without its payload
        # Expect (kind 3): a String and a u32, nothing else; else BadRequest, open.
        good = struct.pack("<QI", 8, 3) + kc._string("hub") + kc._u32(2)
        self.assertEqual(kc.decode_request(good), kc.Request(8, kc.RequestKind.Expect, expect=kc.Expect("hub", 2)))
        for bad in (struct.pack("<QI", 8, 3), good[:-1], good + b"\x00",
                    struct.pack("<QI", 8, 3) + struct.pack("<Q", 2) + b"\xc3\x28" + kc._u32(2)):
            with self.subTest(bad=bad.hex()):
                self.assertEqual(rejected(bad), (kc.ErrorCode.BadRequest, 8, False))

    def test_token_text_rules(self) -> None:
        good = GOLDEN["test_token_hex"].encode()
        self.assertEqual(bytes(kc.parse_token_text(good)), TEST_TOKEN)
        self.assertEqual(bytes(kc.parse_token_text(good + b"\n")), TEST_TOKEN)
        for bad in (good.upper(), good + b"\r\n", good + b"\n\n", good[:-1], good + b"0", b" " + good,
                    good[:-1] + b"g", b"", good[:-1] + b"\n", TEST_TOKEN):
            with self.subTest(bad=bad[:8]), self.assertRaises(kc.TokenFormatError) as ctx:
                kc.parse_token_text(bad)
            self.assertNotIn(good[:16].decode(), str(ctx.exception), "errors must not quote the token")

    def test_runtime_directory_and_defaults(self) -> None:
        self.assertEqual(kc.runtime_dir({"KEYHOLE_DIR": "/a", "XDG_RUNTIME_DIR": "/x", "HOME": "/h"}), "/a")
        self.assertEqual(kc.runtime_dir({"KEYHOLE_DIR": "", "XDG_RUNTIME_DIR": "/x", "HOME": "/h"}), "/x/keyhole")
        self.assertEqual(kc.runtime_dir({"XDG_RUNTIME_DIR": "", "HOME": "/h"}), "/h/.keyhole")
        self.assertEqual(kc.runtime_dir({"KEYHOLE_DIR": "rel"}), "rel")  # relative to the working directory
        with self.assertRaises(kc.ConfigError) as ctx:
            kc.runtime_dir({"HOME": "", "XDG_RUNTIME_DIR": "", "KEYHOLE_DIR": ""})
        self.assertIn("KEYHOLE_DIR", str(ctx.exception))
        self.assertIn("KEYHOLE_SOCKET", str(ctx.exception))
        env = {"KEYHOLE_DIR": "/a"}
        self.assertEqual(kc.socket_path(env), "/a/keyhole.sock")
        self.assertEqual(kc.token_file_path(env), "/a/session-token")
        env = {"KEYHOLE_DIR": "/a", "KEYHOLE_SOCKET": "/s.sock", "KEYHOLE_TOKEN_FILE": "/t"}
        self.assertEqual((kc.socket_path(env), kc.token_file_path(env)), ("/s.sock", "/t"))
        self.assertEqual(kc.socket_path({"KEYHOLE_SOCKET": "", "KEYHOLE_DIR": "/a"}), "/a/keyhole.sock")
        # KEYHOLE_SOCKET and the token need no runtime directory at all.
        self.assertEqual(kc.socket_path({"KEYHOLE_SOCKET": "/s"}), "/s")
        self.assertEqual(kc.token_file_path({"KEYHOLE_TOKEN_FILE": "/t"}), "/t")
        self.assertEqual(bytes(kc.load_token({"KEYHOLE_TOKEN": GOLDEN["test_token_hex"]})), TEST_TOKEN)
        self.assertEqual(bytes(kc.load_token({"KEYHOLE_TOKEN": GOLDEN["test_token_hex"] + "\n"})), TEST_TOKEN)

    def test_keyhole_daemon_uid_parsing(self) -> None:
        self.assertEqual(kc.daemon_uid({}), os.geteuid())
        self.assertEqual(kc.daemon_uid({"KEYHOLE_DAEMON_UID": ""}), os.geteuid())
        self.assertEqual(kc.daemon_uid({"KEYHOLE_DAEMON_UID": "1000"}), 1000)
        self.assertEqual(kc.daemon_uid({"KEYHOLE_DAEMON_UID": "0"}), 0)
        self.assertEqual(kc.daemon_uid({"KEYHOLE_DAEMON_UID": "4294967295"}), 4294967295)
        for bad in ("+1000", "-1", " 1000", "1000 ", "1000\n", "0x10", "1_000", "１０００", "abc", "1e3",
                    "4294967296", "99999999999"):
            with self.subTest(bad=bad), self.assertRaises(kc.ConfigError) as ctx:
                kc.daemon_uid({"KEYHOLE_DAEMON_UID": bad})
            self.assertIn("KEYHOLE_DAEMON_UID", str(ctx.exception))

    def test_subject_checks(self) -> None:
        """Section 14's subjects, checked before sending (section 16 step 14)."""
        table = [  # text, valid as a topic / a name, valid as a pattern
            ("a", True, True), ("a.b.c", True, True), ("t" * 255, True, True), ("é" * 127, True, True),
            ("news/sub topic", True, True), ("Case.A", True, True), ("a b", True, True),
            ("*", False, True), (">", False, True), ("a.*", False, True), ("a.>", False, True),
            ("*.>", False, True), ("a.*.c", False, True), ("*.*", False, True),
            ("", False, False), ("t" * 256, False, False), ("é" * 128, False, False), ("\ud800", False, False),
            ("a..b", False, False), (".a", False, False), ("a.", False, False), (".", False, False),
            ("a*", False, False), ("a>", False, False), ("*a", False, False), ("a.b*", False, False),
            (">.a", False, False), ("a.>.b", False, False), ("**", False, False), ("*>", False, False),
            (">>", False, False), ("a.*b", False, False),
        ]
        for text, literal, pattern in table:
            for kind, valid in (("topic", literal), ("name", literal), ("pattern", pattern)):
                with self.subTest(text=text[:8], kind=kind):
                    if valid:
                        kc.check_subject(text, kind)
                    else:
                        with self.assertRaises(kc.TopicError):
                            kc.check_subject(text, kind)
        kc.check_topic("a.b")
        with self.assertRaises(kc.TopicError):
            kc.check_topic("a.*")
        with self.assertRaises(ValueError):
            kc.check_subject("a", "stream")

    def test_the_tests_matcher_follows_section_14s_examples(self) -> None:
        """The independent matcher used against the daemon, on the spec's own examples."""
        for pattern, topic, expected in (("a.*", "a.b", True), ("a.*", "a", False), ("a.*", "a.b.c", False),
                                         ("a.>", "a.b", True), ("a.>", "a.b.c", True), ("a.>", "a", False),
                                         (">", "a", True), (">", "a.b.c", True), ("a.b", "a.b", True),
                                         ("a.b", "a.B", False), ("a.b", "a.b.c", False)):
            with self.subTest(pattern=pattern, topic=topic):
                self.assertEqual(spec_matches(pattern, topic), expected)

    def test_request_timeouts(self) -> None:
        """``timeout_ms``: 0 means 30 s, more than an hour is cut to an hour (section 14)."""
        self.assertEqual(kc.timeout_ms_for(None), 0)
        self.assertEqual(kc.timeout_ms_for(2.0), 2000)
        self.assertEqual(kc.timeout_ms_for(0.0001), 1, "never 0, which would mean 30 s")
        self.assertEqual(kc.timeout_ms_for(0), 1)
        self.assertEqual(kc.timeout_ms_for(10 ** 9), 3_600_000)
        with self.assertRaises(ValueError):
            kc.timeout_ms_for(-1)
        self.assertEqual([kc.effective_timeout_ms(t) for t in (0, 1, 2000, 3_600_000, 3_600_001, 2 ** 32 - 1)],
                         [30_000, 1, 2000, 3_600_000, 3_600_000, 3_600_000])


# --------------------------------------------------------------------------
# 2. The connection logic against scripted daemon bytes
# --------------------------------------------------------------------------


class FakeDaemonTests(unittest.TestCase):
    """Section 7's protocol-error rules, events and their routing, errors and
    the end of the connection, against scripted daemon bytes on a socketpair."""

    def make(self, max_frame_len: int = 4096, sub: bool = False, lag: kc.Lag = kc.Lag.Disconnect,
             **kw: Any) -> Tuple[kc.KeyholeClient, socket.socket]:
        """A client on one end of a socketpair, the scripted daemon on the
        other. With ``sub``, the client first subscribes to "t" (sid 1, the
        stream of :meth:`ev`, with the policy ``lag``), so that the request
        ids that follow start at 2."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(IO_TIMEOUT)
        theirs.settimeout(IO_TIMEOUT)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        welcome = kc.Welcome(2, "hub", 2, "fake", 1, 1, max_frame_len)
        c = kc.KeyholeClient(ours, welcome, bytearray(), **kw)
        if sub:
            theirs.sendall(self.reply(1, kc.Subscribed()))
            s = c.subscribe("t", lag)
            self.assertEqual((s.sid, s.pattern, s.lag, s.confirmed), (1, "t", lag, True))
            expected = call_frame(1, kc.Subscribe(1, "t", lag))
            self.assertEqual(len(expected), 4 + 36 + 1, "section 13: a Subscribe's payload is 36 + t")
            self.assertEqual(recv_exactly(theirs, len(expected)), expected)
        return c, theirs

    @staticmethod
    def ev(seq: int, topic: str = "t", payload: bytes = b"x", stream: int = 1) -> bytes:
        return kc.encode_daemon_frame(kc.Event(stream, kc.Message(topic, seq, payload)))

    @staticmethod
    def msg(seq: int, topic: str = "t", payload: bytes = b"x", stream: int = 1) -> kc.Event:
        return kc.Event(stream, kc.Message(topic, seq, payload))

    @staticmethod
    def reply(rid: int, r: Any) -> bytes:
        return kc.encode_daemon_frame(kc.Reply(rid, r))

    @staticmethod
    def ack(rid: int) -> bytes:
        return kc.encode_daemon_frame(kc.Ack(rid))

    @staticmethod
    def err(rid: Optional[int], code: int) -> bytes:
        return kc.encode_daemon_frame(kc.Error(rid, code, "scripted"))

    @staticmethod
    def frame(f: kc.DaemonFrame) -> bytes:
        return kc.encode_daemon_frame(f)

    def assert_protocol_error(self, c: kc.KeyholeClient, fn: Callable[[], Any]) -> None:
        with self.assertRaises(kc.ProtocolError):
            fn()
        self.assertTrue(c.closed, "a protocol error closes the connection")
        with self.assertRaises(kc.ConnectionClosed):
            c.next_event()

    def test_requests_on_the_wire(self) -> None:
        c, d = self.make()
        ids = c.send_many([kc.RequestKind.Ping, kc.StatusRequest(), kc.Publish("t", b"p"), kc.RequestKind.Shutdown])
        self.assertEqual(ids, [1, 2, 3, 4])
        expected = (ping_frame(1) + call_frame(2, kc.StatusRequest()) + call_frame(3, kc.Publish("t", b"p"))
                    + kc.encode_request(kc.Request(4, kc.RequestKind.Shutdown)))
        self.assertEqual(recv_exactly(d, len(expected)), expected)

    def test_high_level_hub_calls_on_the_wire(self) -> None:
        """Each high-level call sends the request section 13 describes and
        returns what its reply carries."""
        c, d = self.make(max_frame_len=4096)
        d.sendall(self.reply(1, kc.Subscribed()) + self.reply(2, kc.Subscribed()) + self.reply(3, kc.Unsubscribed())
                  + self.reply(4, kc.Published(7)) + self.reply(5, kc.Serving()) + self.reply(6, kc.Unserved())
                  + self.reply(7, kc.Responded(True)) + self.reply(8, kc.Responded(False))
                  + self.reply(9, kc.Responded(True))
                  + self.reply(10, kc.TopicList((("a.*", 2),), (("svc", 1),), True))
                  + self.reply(11, kc.Status(1, 2, 3, 4, 5, 6, 7, "v")) + self.reply(12, kc.Responded(True)))
        a = c.subscribe("news.*")
        b = c.subscribe("sensors.>", kc.Lag.DropOldest, sid=77)
        c.unsubscribe(a)
        self.assertEqual(c.publish("news.local", b"hello"), 7)
        c.serve("svc.clock")
        c.unserve("svc.clock")
        self.assertTrue(c.respond(5, b"12:00"))
        self.assertFalse(c.fail(5, "no clock"))
        self.assertTrue(c.fail_reply_too_large(6, 20000000))
        self.assertEqual(c.topics(), kc.TopicList((("a.*", 2),), (("svc", 1),), True))
        self.assertEqual(c.status(), kc.Status(1, 2, 3, 4, 5, 6, 7, "v"))
        self.assertTrue(c.respond(8, bytes(4096 - 36)), "the largest reply whose Response fits is a Respond")
        expected = [kc.Subscribe(1, "news.*", kc.Lag.Disconnect), kc.Subscribe(77, "sensors.>", kc.Lag.DropOldest),
                    kc.Unsubscribe(1), kc.Publish("news.local", b"hello"), kc.Serve("svc.clock"),
                    kc.Unserve("svc.clock"), kc.Respond(5, b"12:00"), kc.Fail(5, kc.FailureFailed("no clock")),
                    kc.Fail(6, kc.FailureReplyTooLarge(20000000)), kc.TopicsRequest(), kc.StatusRequest(),
                    kc.Respond(8, bytes(4096 - 36))]
        wire = b"".join(call_frame(i + 1, r) for i, r in enumerate(expected))
        self.assertEqual(recv_exactly(d, len(wire)), wire)
        self.assertEqual((a.active, b.active, b.sid, sorted(c.subscriptions)), (False, True, 77, [77]))
        self.assertEqual(c.served, set())
        # The bytes of section 15.3, from the high-level calls.
        c, d = self.make()
        c._next_id = 10
        d.sendall(self.reply(10, kc.Requested()) + bytes.fromhex(VECTORS["event_response"]["hex"]))
        self.assertEqual(c.request("svc.clock", b"now?", timeout=2.0), b"12:00")
        self.assertEqual(recv_exactly(d, 53).hex(), VECTORS["request"]["hex"])

    def test_respond_sends_fail_reply_too_large_for_a_reply_that_does_not_fit(self) -> None:
        """Section 16 step 14: a reply whose Response (36 + p) would be over
        the frame limit is sent as Fail{ReplyTooLarge{len: p}}."""
        c, d = self.make(max_frame_len=1024)
        d.sendall(self.reply(1, kc.Responded(True)) + self.reply(2, kc.Responded(True)))
        self.assertFalse(c.reply_fits(1024 - 35))
        self.assertTrue(c.reply_fits(1024 - 36))
        self.assertTrue(c.respond(9, bytes(1024 - 35)))  # its Respond would fit (1021 bytes), its Response not
        self.assertTrue(c.respond(9, bytes(5000)))  # not even its Respond fits
        wire = (call_frame(1, kc.Fail(9, kc.FailureReplyTooLarge(1024 - 35)))
                + call_frame(2, kc.Fail(9, kc.FailureReplyTooLarge(5000))))
        self.assertEqual(recv_exactly(d, len(wire)), wire)

    def test_subjects_and_sids_are_checked_before_sending(self) -> None:
        c, d = self.make(sub=True)
        for fn in (lambda: c.subscribe("a..b"), lambda: c.subscribe("a*"), lambda: c.publish("a.*", b""),
                   lambda: c.publish("", b""), lambda: c.serve("svc.>"), lambda: c.unserve(""),
                   lambda: c.request("a.*", b""), lambda: c.request("x" * 256, b"")):
            with self.assertRaises(kc.TopicError):
                fn()
        for sid in (0, 1):  # 0, and the sid of the live subscription
            with self.assertRaises(kc.SidError):
                c.subscribe("b", sid=sid)
        d.settimeout(0.05)
        with self.assertRaises(socket.timeout):
            d.recv(1)  # nothing was sent
        self.assertEqual(sorted(c.subscriptions), [1])

    def test_sids_come_from_a_counter_that_skips_live_ones(self) -> None:
        """Section 16 step 14 and 17.3 (``next_sid``): each subscription made
        without a sid takes the counter's next value, skipping sids still
        live (one taken explicitly included); an ended subscription's sid
        does not come back before the counter does. After Unsubscribed
        nothing of a sid arrives, so the route is dropped at the reply."""
        c, d = self.make()
        replies = [kc.Subscribed(), kc.Unsubscribed(), kc.Subscribed(), kc.Subscribed(), kc.Subscribed(),
                   kc.Subscribed()]
        d.sendall(b"".join(self.reply(i + 1, r) for i, r in enumerate(replies)) + self.err(7, 1002)
                  + b"".join(self.reply(8 + i, r) for i, r in enumerate(
                      [kc.Subscribed(), kc.Unsubscribed(), kc.Unsubscribed(), kc.Subscribed(), kc.Subscribed(),
                       kc.Subscribed()])))
        self.assertEqual(c.next_subscription_id, 1)
        a = c.subscribe("a")
        c.unsubscribe(a)
        self.assertFalse(a.active)
        b = c.subscribe("b")
        self.assertEqual((a.sid, b.sid), (1, 2), "the counter goes on past an ended sid")
        e = c.subscribe("e", sid=3)
        f = c.subscribe("f")
        g = c.subscribe("g")
        self.assertEqual((e.sid, f.sid, g.sid), (3, 4, 5), "new sids skip one taken explicitly")
        with self.assertRaises(kc.TooManySubscriptionsError):
            c.subscribe("h")  # sid 6, refused: it made no subscription
        h = c.subscribe("h")
        self.assertEqual(h.sid, 7)
        c.unsubscribe(e)
        c.unsubscribe(f)
        self.assertEqual([c.subscribe(x).sid for x in ("i", "j", "k")], [8, 9, 10])
        self.assertEqual(c.next_subscription_id, 11)
        for sid in (0, 2, 7):  # 0, and sids of live subscriptions
            with self.assertRaises(kc.SidError):
                c.subscribe("z", sid=sid)
        wire = b"".join(call_frame(i + 1, r) for i, r in enumerate(
            [kc.Subscribe(1, "a"), kc.Unsubscribe(1), kc.Subscribe(2, "b"), kc.Subscribe(3, "e"),
             kc.Subscribe(4, "f"), kc.Subscribe(5, "g"), kc.Subscribe(6, "h"), kc.Subscribe(7, "h"),
             kc.Unsubscribe(3), kc.Unsubscribe(4), kc.Subscribe(8, "i"), kc.Subscribe(9, "j"),
             kc.Subscribe(10, "k")]))
        self.assertEqual(recv_exactly(d, len(wire)), wire)
        self.assertEqual(sorted(c.subscriptions), [2, 5, 7, 8, 9, 10])

    def test_request_ids_wrap_from_2_64_minus_1_to_0(self) -> None:
        """Section 6: every u64 is an id; a counter follows 2^64 - 1 with 0,
        nothing refused or skipped. Replies are matched by id through the
        wrap, and Responses routed by their Call's id (17.6,
        request_ids_in_responses)."""
        top = 2 ** 64 - 1
        c, d = self.make()
        c._set_counters(top - 1, None)
        self.assertEqual(c.next_request_id, top - 1)
        self.assertEqual(c.send_many([kc.RequestKind.Ping] * 4), [top - 1, top, 0, 1])
        self.assertEqual(recv_exactly(d, 4 * 16), b"".join(ping_frame(i) for i in (top - 1, top, 0, 1)))
        d.sendall(b"".join(self.ack(i) for i in (top - 1, top, 0, 1)))
        self.assertEqual([c.wait_reply(i) for i in (1, 0, top, top - 1)],
                         [kc.Ack(1), kc.Ack(0), kc.Ack(top), kc.Ack(top - 1)])
        self.assertEqual(c.next_request_id, 2)
        # Two Requests across the wrap, their Responses in the other order.
        c._set_counters(top, None)
        r1 = c.send(kc.RequestTo("svc.a", 1000, b"1"))
        r2 = c.send(kc.RequestTo("svc.a", 1000, b"2"))
        self.assertEqual((r1, r2), (top, 0))
        wire = call_frame(top, kc.RequestTo("svc.a", 1000, b"1")) + call_frame(0, kc.RequestTo("svc.a", 1000, b"2"))
        self.assertEqual(recv_exactly(d, len(wire)), wire)
        d.sendall(self.reply(top, kc.Requested()) + self.reply(0, kc.Requested())
                  + self.frame(kc.Event(0, kc.Response(0, kc.OutcomeReply(b"two"))))
                  + self.frame(kc.Event(0, kc.Response(top, kc.OutcomeReply(b"one")))))
        self.assertEqual((c.result(r1), c.result(r2)), (kc.Requested(), kc.Requested()))
        self.assertEqual(kc.outcome_result(c.wait_response(r1)), b"one")
        self.assertEqual(kc.outcome_result(c.wait_response(r2)), b"two")

    def test_sids_wrap_from_2_64_minus_1_to_1_skipping_live_ones(self) -> None:
        """Sections 16 step 14 and 17.3: the sid counter follows 2^64 - 1
        with 1 (0 is never a sid) and skips sids still live; events and
        Lagged frames are routed by sid through the wrap."""
        top = 2 ** 64 - 1
        c, d = self.make()
        c._set_counters(None, top - 1)
        d.sendall(b"".join(self.reply(i, kc.Subscribed()) for i in range(1, 5)))
        low = c.subscribe("low", sid=2)  # live: the counter skips it after the wrap
        a = c.subscribe("a")
        b = c.subscribe("b", kc.Lag.DropOldest)
        x = c.subscribe("x")
        self.assertEqual((low.sid, a.sid, b.sid, x.sid), (2, top - 1, top, 1))
        self.assertEqual(c.next_subscription_id, 2)
        d.sendall(self.reply(5, kc.Subscribed()))
        y = c.subscribe("y")
        self.assertEqual(y.sid, 3, "2 is live: skipped")
        wire = b"".join(call_frame(i + 1, r) for i, r in enumerate(
            [kc.Subscribe(2, "low"), kc.Subscribe(top - 1, "a"), kc.Subscribe(top, "b", kc.Lag.DropOldest),
             kc.Subscribe(1, "x"), kc.Subscribe(3, "y")]))
        self.assertEqual(recv_exactly(d, len(wire)), wire)
        d.sendall(self.ev(1, "x", stream=1) + self.frame(kc.Lagged(top, 2)) + self.ev(5, "b", stream=top))
        self.assertEqual(x.next().topic, "x")
        self.assertEqual(b.next(), kc.Lagged(top, 2))
        self.assertEqual(b.next().sequence, 5)
        # The counter wraps again past sids in use: 0 is never taken.
        c._set_counters(None, top)
        d.sendall(self.reply(6, kc.Unsubscribed()) + self.reply(7, kc.Subscribed()))
        c.unsubscribe(b)
        z = c.subscribe("z")
        self.assertEqual(z.sid, top, "free again after its Unsubscribed")
        d.sendall(self.reply(8, kc.Subscribed()))
        self.assertEqual(c.subscribe("w").sid, 4, "1, 2 and 3 are live")
        wire = b"".join(call_frame(i + 6, r) for i, r in enumerate(
            [kc.Unsubscribe(top), kc.Subscribe(top, "z"), kc.Subscribe(4, "w")]))
        self.assertEqual(recv_exactly(d, len(wire)), wire)

    def test_events_interleaved_with_replies_are_queued(self) -> None:
        c, d = self.make(sub=True)
        ids = c.send_many([kc.RequestKind.Ping, kc.StatusRequest()])
        status = kc.Status(1, 0, 1, 1, 0, 0, 5, "fake")
        d.sendall(self.ev(8) + self.ack(ids[0]) + self.ev(9) + self.reply(ids[1], status))
        self.assertEqual(c.result(ids[1]), status)  # the Ack is kept for its own waiter
        self.assertEqual(c.wait_reply(ids[0]), kc.Ack(ids[0]))
        self.assertEqual(c.queued_events, 2)
        self.assertEqual([c.next_event(), c.next_event()], [self.msg(8), self.msg(9)])

    def test_next_event_keeps_replies_that_arrive_meanwhile(self) -> None:
        c, d = self.make()
        rid = c.send(kc.Subscribe(5, "t"))
        d.sendall(self.ev(1, stream=5) + self.reply(rid, kc.Subscribed()))  # the event may come first
        self.assertEqual(c.next_event(), self.msg(1, stream=5))
        self.assertEqual(c.result(rid), kc.Subscribed())
        self.assertTrue(c.subscriptions[5].confirmed)

    def test_messages_and_lagged_are_routed_by_stream(self) -> None:
        """Section 16 step 14: each subscription gets its own copy on its own
        stream, and its Lagged, in order; a loss is handed to the application."""
        c, d = self.make()
        d.sendall(self.reply(1, kc.Subscribed()) + self.reply(2, kc.Subscribed()))
        news = c.subscribe("news.*")
        local = c.subscribe("news.local", kc.Lag.DropOldest)
        d.sendall(self.ev(1, "news.local", b"a", 1) + self.ev(1, "news.local", b"a", 2)
                  + self.frame(kc.Lagged(2, 17)) + self.ev(2, "news.other", b"b", 1)
                  + self.ev(19, "news.local", b"c", 2))
        self.assertEqual(local.next(), kc.Message("news.local", 1, b"a"))
        self.assertEqual(local.next(), kc.Lagged(2, 17))
        self.assertEqual(local.next(), kc.Message("news.local", 19, b"c"))
        self.assertEqual((local.received, local.missed, local.lagged), (2, 17, 1))
        self.assertEqual(c.queued_events, 2)
        self.assertEqual([news.next(), news.next()], [kc.Message("news.local", 1, b"a"),
                                                      kc.Message("news.other", 2, b"b")])
        self.assertEqual((news.received, news.missed), (2, 0))
        self.assertEqual(c.queued_events, 0)
        # Arrival order across routes through next_event; taking there takes from the route.
        d.sendall(self.ev(3, "news.x", b"", 1) + self.frame(kc.Lagged(2, 1)) + self.ev(4, "news.y", b"", 1))
        self.assertEqual(c.next_event(), self.msg(3, "news.x", b"", 1))
        self.assertEqual(c.next_event(), kc.Lagged(2, 1))
        self.assertEqual(news.next(), kc.Message("news.y", 4, b""))
        self.assertEqual((news.queued, local.queued, c.queued_events), (0, 0, 0))

    def test_a_route_lives_until_the_unsubscribed_reply(self) -> None:
        """Section 14: events of a subscription written before its
        Unsubscribed reply arrive before it (they are still its own), and
        nothing of its sid arrives after it: the route ends at the reply, its
        items not taken with it, and a Message of that sid after the reply
        is a protocol error (section 13 allows treating it so)."""
        c, d = self.make(sub=True)
        sub = c.subscriptions[1]
        d.sendall(self.ev(1) + self.ev(2) + self.ack(2))
        self.assertIsNone(c.result(c.send(kc.RequestKind.Ping)))  # both events are read and queued
        self.assertEqual(sub.next(), kc.Message("t", 1, b"x"))
        rid = c.send(kc.Unsubscribe(1))
        self.assertTrue(sub.active, "the route stays until the reply")
        self.assertEqual(sub.queued, 1)
        d.sendall(self.ev(3) + self.reply(rid, kc.Unsubscribed()))
        self.assertEqual(c.result(rid), kc.Unsubscribed())
        self.assertEqual((sub.active, sub.received, sub.queued, c.queued_events), (False, 3, 0, 0),
                         "the event before the reply was its own; its items end with it")
        self.assertEqual(c.subscriptions, {})
        with self.assertRaises(ValueError):
            sub.next()
        d.sendall(self.ev(4) + self.ack(rid + 1))
        self.assert_protocol_error(c, c.ping)

    def test_events_of_no_subscription_of_ours_are_protocol_errors(self) -> None:
        """Section 13: a Lagged for a stream that is not one of our DropOldest
        subscriptions is never sent, and nothing of a sid arrives that is not
        (or no longer) a subscription (section 14): a client MAY treat them
        as protocol errors, and this one does. A Lagged for a DropOldest
        subscription whose Subscribed reply has not come yet is its own."""
        for bad in (self.ev(1, stream=99), self.frame(kc.Lagged(99, 1)), self.frame(kc.Lagged(1, 4))):
            with self.subTest(bad=bad.hex()):
                c, d = self.make(sub=True)  # sid 1: Lag.Disconnect
                d.sendall(bad + self.ack(2))
                self.assert_protocol_error(c, c.ping)
        c, d = self.make()
        rid = c.send(kc.Subscribe(7, "t", kc.Lag.DropOldest))
        d.sendall(self.frame(kc.Lagged(7, 4)) + self.ev(9, stream=7) + self.reply(rid, kc.Subscribed()))
        self.assertEqual(c.result(rid), kc.Subscribed())
        sub = c.subscriptions[7]
        self.assertEqual([sub.next(), sub.next()], [kc.Lagged(7, 4), kc.Message("t", 9, b"x")])
        self.assertEqual((sub.received, sub.missed, sub.lagged), (1, 4, 1))

    def test_pipelined_unsubscribe_and_subscribe_of_one_sid(self) -> None:
        """Section 14: the id may be used again by the very next request.
        With Unsubscribe(1) and Subscribe(1) in one write, what arrives on
        stream 1 before the Unsubscribed reply is the old subscription's,
        what arrives after it the new one's. Told apart here by their lag
        policies: a Lagged is only valid for the DropOldest one."""
        for lagged_before, ok in ((False, True), (True, False)):
            with self.subTest(lagged_before=lagged_before):
                c, d = self.make(sub=True)  # sid 1 on "t", Disconnect
                old = c.subscriptions[1]
                rids = c.send_many([kc.Unsubscribe(1), kc.Subscribe(1, "u", kc.Lag.DropOldest)])
                new = c.subscriptions[1]
                self.assertIsNot(new, old)
                lagged = self.frame(kc.Lagged(1, 3))
                d.sendall(self.ev(5) + (lagged if lagged_before else b"") + self.reply(rids[0], kc.Unsubscribed())
                          + (b"" if lagged_before else lagged) + self.ev(1, "u") + self.reply(rids[1], kc.Subscribed()))
                if not ok:
                    with self.assertRaises(kc.ProtocolError):
                        c.result(rids[1])
                    self.assertTrue(c.closed, "a protocol error closes the connection")
                    continue
                self.assertEqual([c.result(r) for r in rids], [kc.Unsubscribed(), kc.Subscribed()])
                self.assertEqual((old.active, old.received, old.missed), (False, 1, 0))
                self.assertEqual((new.active, new.confirmed, new.received, new.missed), (True, True, 1, 3))
                self.assertEqual([new.next(), new.next()], [kc.Lagged(1, 3), kc.Message("u", 1, b"x")])
                self.assertEqual(c.subscriptions, {1: new})
        # An Unsubscribe of a sid whose only Subscribe was sent after it ends nothing.
        c, d = self.make()
        rids = c.send_many([kc.Unsubscribe(4), kc.Subscribe(4, "v")])
        d.sendall(self.reply(rids[0], kc.Unsubscribed()) + self.ev(2, "v", stream=4) + self.reply(rids[1], kc.Subscribed()))
        self.assertEqual(c.result(rids[1]), kc.Subscribed())
        self.assertEqual(c.subscriptions[4].next(), kc.Message("v", 2, b"x"))

    def test_a_refused_subscribe_takes_its_route_back(self) -> None:
        c, d = self.make(sub=True)
        d.sendall(self.err(2, 1002))
        with self.assertRaises(kc.TooManySubscriptionsError):
            c.subscribe("u")
        self.assertEqual(sorted(c.subscriptions), [1])
        # A Subscribe of the low-level path with a sid in use: refused, and the live route stays.
        rid = c.send(kc.Subscribe(1, "v"))
        d.sendall(self.err(rid, 1003) + self.ev(7))
        with self.assertRaises(kc.SidInUseError):
            c.result(rid)
        self.assertEqual(c.subscriptions[1].next(), kc.Message("t", 7, b"x"))
        self.assertEqual(c.subscriptions[1].pattern, "t")

    def test_request_ends_with_its_response(self) -> None:
        """The Requested reply first, then the Response event routed to its
        request by the Call id; each outcome its own exception."""
        outcomes = [(kc.OutcomeReply(b"12:00"), None), (kc.OutcomeResponderGone(), kc.ResponderGoneError),
                    (kc.OutcomeTimeout(), kc.RequestTimeout), (kc.OutcomeReplyTooLarge(20000000), kc.ReplyTooLargeError),
                    (kc.OutcomeFailed("no clock"), kc.RequestFailed)]
        for outcome, cls in outcomes:
            with self.subTest(outcome=outcome):
                c, d = self.make(sub=True)
                # Another request's Response and a message arrive first: they wait for their own takers.
                d.sendall(self.reply(2, kc.Requested()) + self.ev(1)
                          + self.frame(kc.Event(0, kc.Response(2, outcome))))
                if cls is None:
                    self.assertEqual(c.request("svc.clock", b"now?", timeout=2), b"12:00")
                else:
                    with self.assertRaises(cls) as ctx:
                        c.request("svc.clock", b"now?", timeout=2)
                    self.assertEqual((ctx.exception.request_id, ctx.exception.requested_name), (2, "svc.clock"))
                self.assertEqual(c.queued_events, 1)
                self.assertEqual(c.subscriptions[1].next(), kc.Message("t", 1, b"x"))
                self.assertEqual(recv_exactly(d, 53), call_frame(2, kc.RequestTo("svc.clock", 2000, b"now?")))

    def test_requests_in_flight_are_told_apart_by_call_id(self) -> None:
        c, d = self.make()
        ids = c.send_many([kc.RequestTo("a", 0, b"1"), kc.RequestTo("b", 0, b"2"), kc.RequestTo("c", 0, b"3")])
        d.sendall(self.reply(ids[0], kc.Requested()) + self.reply(ids[1], kc.Requested())
                  + self.err(ids[2], 1004)
                  + self.frame(kc.Event(0, kc.Response(ids[1], kc.OutcomeReply(b"two"))))
                  + self.frame(kc.Event(0, kc.Response(ids[0], kc.OutcomeReply(b"one")))))
        with self.assertRaises(kc.NoRespondersError):
            c.result(ids[2])
        for rid in ids[:2]:
            self.assertIsInstance(c.result(rid), kc.Requested)
        self.assertEqual(c.wait_response(ids[0]), kc.Response(ids[0], kc.OutcomeReply(b"one")))
        self.assertEqual(c.wait_response(ids[1]), kc.Response(ids[1], kc.OutcomeReply(b"two")))
        with self.assertRaises(ValueError):
            c.wait_response(ids[2])  # refused: no Response will come

    def test_refused_requests(self) -> None:
        for code, cls in ((1004, kc.NoRespondersError), (1005, kc.BusyError), (1007, kc.TooLargeError),
                          (1001, kc.HubShuttingDownError), (1000, kc.InvalidTopicError)):
            with self.subTest(code=code):
                c, d = self.make()
                d.sendall(self.err(1, code))
                with self.assertRaises(cls) as ctx:
                    c.request("svc", b"")
                if issubclass(cls, kc.RequestError):
                    self.assertEqual((ctx.exception.request_id, ctx.exception.requested_name), (1, "svc"))
                self.assertEqual(c._awaiting, {}, "no Response is awaited after a refusal")

    def test_a_response_before_its_requested_reply_is_a_protocol_error(self) -> None:
        """Section 14: the Requested reply is always sent before the Response."""
        c, d = self.make()
        rid = c.send(kc.RequestTo("svc", 0, b""))
        d.sendall(self.frame(kc.Event(0, kc.Response(rid, kc.OutcomeTimeout()))) + self.reply(rid, kc.Requested()))
        self.assert_protocol_error(c, lambda: c.result(rid))

    def test_responses_to_no_request_of_ours_are_ignored(self) -> None:
        c, d = self.make()
        d.sendall(self.frame(kc.Event(0, kc.Response(42, kc.OutcomeTimeout()))) + self.ack(1))
        c.ping()
        self.assertEqual((c.ignored_events, c.queued_events), (1, 0))

    def test_the_client_gives_up_a_request_the_daemon_never_ends(self) -> None:
        c, d = self.make()
        c.timeout = 0.3
        d.sendall(self.reply(1, kc.Requested()))
        t0 = time.monotonic()
        with self.assertRaises(kc.KeyholeTimeout) as ctx:
            c.request("svc", b"", timeout=0.2)
        self.assertNotIsInstance(ctx.exception, kc.RequestError)
        self.assertGreater(time.monotonic() - t0, 0.45)
        d.sendall(self.frame(kc.Event(0, kc.Response(1, kc.OutcomeReply(b"late")))) + self.ack(2))
        c.ping()
        self.assertEqual((c.queued_events, c.ignored_events), (0, 1), "the late Response is ignored")

    def test_incoming_requests_for_a_responder(self) -> None:
        c, d = self.make(sub=True)
        d.sendall(bytes.fromhex(VECTORS["event_request"]["hex"]) + self.ev(1)
                  + self.frame(kc.Event(0, kc.IncomingRequest(6, "svc.other", 0, 0, b""))) + self.ack(2))
        self.assertIsNone(c.result(c.send(kc.RequestKind.Ping)))  # every frame before the Ack is read
        self.assertEqual((c.queued_requests, c.queued_events), (2, 3))
        self.assertEqual(c.next_request(), kc.IncomingRequest(5, "svc.clock", 1000, 4242, b"now?"))
        self.assertEqual(c.queued_requests, 1)
        self.assertEqual(c.next_request(), kc.IncomingRequest(6, "svc.other", 0, 0, b""))
        self.assertEqual(c.subscriptions[1].next(), kc.Message("t", 1, b"x"))

    def test_a_wait_times_out_and_the_connection_stays(self) -> None:
        c, d = self.make(sub=True)
        t0 = time.monotonic()
        for fn in (lambda: c.next_event(timeout=0.1), lambda: c.subscriptions[1].next(timeout=0.1),
                   lambda: c.next_request(timeout=0.1)):
            with self.assertRaises(kc.KeyholeTimeout):
                fn()
        self.assertLess(time.monotonic() - t0, 1.5)
        d.sendall(self.ev(1))
        self.assertEqual(c.next_event(timeout=1), self.msg(1))
        self.assertFalse(c.closed)

    def test_reply_for_another_id_is_a_protocol_error(self) -> None:
        c, d = self.make()
        ids = c.send_many([kc.RequestKind.Ping, kc.RequestKind.Ping])
        d.sendall(self.ack(ids[1]))
        self.assert_protocol_error(c, lambda: c.wait_reply(ids[1]))

    def test_reply_with_no_request_outstanding_is_a_protocol_error(self) -> None:
        for data in (self.ack(1), self.reply(1, kc.Published(0)), self.err(1, 1000), self.err(1, 11)):
            with self.subTest(data=data.hex()):
                c, d = self.make()
                d.sendall(data)
                self.assert_protocol_error(c, c.next_event)

    def test_reply_of_the_wrong_kind_is_a_protocol_error(self) -> None:
        for spec, reply in ((kc.StatusRequest(), None),
                            (kc.RequestKind.Ping, kc.Published(1)),
                            (kc.RequestKind.Shutdown, kc.Subscribed()),
                            (kc.StatusRequest(), kc.Published(1)),
                            (kc.Subscribe(1, "t"), kc.Unsubscribed()),
                            (kc.Publish("t", b""), kc.Subscribed()),
                            (kc.Serve("s"), kc.Unserved()),
                            (kc.Unserve("s"), kc.Serving()),
                            (kc.RequestTo("s", 0, b""), kc.Responded(True)),
                            (kc.Respond(1, b""), kc.Requested()),
                            (kc.Fail(1, kc.FailureFailed("")), kc.Published(0)),
                            (kc.TopicsRequest(), kc.Status(0, 0, 0, 0, 0, 0, 0, "")),
                            (kc.StatusRequest(), kc.TopicList((), (), False))):
            with self.subTest(spec=spec, reply=reply):
                c, d = self.make()
                rid = c.send(spec)
                d.sendall(self.ack(rid) if reply is None else self.reply(rid, reply))
                self.assert_protocol_error(c, lambda: c.wait_reply(rid))

    def test_a_second_welcome_is_a_protocol_error(self) -> None:
        c, d = self.make()
        rid = c.send(kc.RequestKind.Ping)
        d.sendall(welcome_bytes() + self.ack(rid))
        self.assert_protocol_error(c, lambda: c.wait_reply(rid))

    def test_error_id_presence_contradicting_section_8_is_a_protocol_error(self) -> None:
        for code, with_id in ((9, True), (3, True), (11, False), (10, False), (1000, False), (1001, False),
                              (1002, False), (1003, False), (1004, False), (1007, False), (15, True), (16, True),
                              (17, False), (18, True), (19, True), (20, False), (20, True)):
            with self.subTest(code=code, with_id=with_id):
                c, d = self.make()
                rid = c.send(kc.RequestKind.Ping)
                d.sendall(self.err(rid if with_id else None, code))
                self.assert_protocol_error(c, lambda: c.wait_reply(rid))

    def test_an_event_the_hub_decoder_rejects_is_a_protocol_error(self) -> None:
        bad_events = (struct.pack("<IQI", 2, 1, 4) + self.ev(1)[20:],  # hub event tag 4
                      self.ev(1)[4:] + b"\x00",                        # trailing byte
                      struct.pack("<IQ", 2, 1),                        # no event at all
                      struct.pack("<I", 2),                            # not even a stream
                      kc.encode_daemon_frame_payload(kc.Event(0, kc.Message("t", 1, b""))),  # Message on stream 0
                      kc.encode_daemon_frame_payload(kc.Event(4, kc.Response(1, kc.OutcomeTimeout()))),
                      kc.encode_daemon_frame_payload(kc.Lagged(0, 3)),
                      kc.encode_daemon_frame_payload(kc.Lagged(1, 0)))
        for payload in bad_events:
            with self.subTest(payload=payload.hex()):
                c, d = self.make(sub=True)
                d.sendall(kc.frame(payload))
                self.assert_protocol_error(c, c.next_event)

    def test_negative_daemon_vectors_close_the_connection(self) -> None:
        for name in ("server_unknown_tag", "server_bad_option_tag", "server_unknown_error_code",
                     "server_unknown_close_reason", "server_reply_trailing_byte"):
            with self.subTest(name):
                c, d = self.make()
                rid = c.send(kc.Publish("news", b"hello"), id=6)
                d.sendall(bytes.fromhex(NEGATIVE[name]["hex"]))
                self.assert_protocol_error(c, lambda: c.wait_reply(rid))

    def test_frame_over_max_frame_len_is_refused_before_its_payload(self) -> None:
        c, d = self.make(max_frame_len=1024)
        d.sendall(struct.pack("<I", 1025))  # the payload never comes: it must not be awaited
        self.assert_protocol_error(c, c.next_event)
        c, d = self.make(max_frame_len=1024)
        d.sendall(kc.frame(struct.pack("<IQI", 2, 1, 0) + bytes(1008)))  # exactly 1024: read (and decoded)
        with self.assertRaises(kc.DecodeError):
            c.next_event()

    def test_an_error_with_an_id_fails_that_request_only(self) -> None:
        c, d = self.make()
        ids = c.send_many([kc.Subscribe(1, "a"), kc.RequestKind.Shutdown, kc.Publish("b", b""), kc.RequestKind.Ping,
                           kc.Request(50, 9)])
        d.sendall(self.err(ids[0], 1000) + self.err(ids[1], 12) + self.err(ids[2], 1001) + self.ack(ids[3])
                  + self.err(50, 10))
        with self.assertRaises(kc.InvalidTopicError) as ctx:
            c.result(ids[0])
        self.assertEqual((ctx.exception.id, ctx.exception.closes), (ids[0], False))
        with self.assertRaises(kc.NotPermittedError):
            c.result(ids[1])
        with self.assertRaises(kc.HubShuttingDownError):
            c.result(ids[2])
        self.assertIsNone(c.result(ids[3]))
        with self.assertRaises(kc.UnknownRequestError):
            c.result(50)
        self.assertFalse(c.closed)
        rid = c.send(kc.StatusRequest())
        d.sendall(self.err(rid, 1009))  # a hub code this client does not know: reported, not fatal
        with self.assertRaises(kc.ServiceError) as ctx2:
            c.result(rid)
        self.assertEqual(ctx2.exception.service_code, 9)
        self.assertFalse(c.closed)

    def test_an_error_without_id_is_the_last_frame(self) -> None:
        c, d = self.make()
        ids = c.send_many([kc.RequestKind.Ping, kc.RequestKind.Ping, kc.RequestKind.Ping])
        d.sendall(self.ack(ids[0]) + bytes.fromhex(VECTORS["error_malformed"]["hex"]))
        d.close()
        with self.assertRaises(kc.MalformedError) as ctx:
            c.wait_reply(ids[1])
        self.assertIsNone(ctx.exception.id)
        self.assertTrue(ctx.exception.closes)
        self.assertTrue(c.closed)
        self.assertIsInstance(c.final_frame, kc.Error)
        self.assertEqual(c.wait_reply(ids[0]), kc.Ack(ids[0]), "a reply received before the end is kept")
        with self.assertRaises(kc.ConnectionClosed) as ctx2:
            c.wait_reply(ids[2])
        self.assertEqual(ctx2.exception.final_frame, c.final_frame)
        with self.assertRaises(kc.ConnectionClosed):
            c.send(kc.RequestKind.Ping)

    def test_over_budget_is_the_last_frame(self) -> None:
        """Section 8, code 15: id absent, closes; events already received are
        kept, requests outstanding get no reply."""
        c, d = self.make(sub=True)
        ids = c.send_many([kc.RequestKind.Ping, kc.StatusRequest()])
        d.sendall(self.ev(1) + self.ack(ids[0]) + bytes.fromhex(VECTORS["error_over_budget"]["hex"]))
        d.close()
        with self.assertRaises(kc.OverBudgetError) as ctx:
            c.wait_reply(ids[1])
        self.assertEqual((ctx.exception.code, ctx.exception.id, ctx.exception.closes), (15, None, True))
        self.assertNotIsInstance(ctx.exception, kc.HandshakeRefused)
        self.assertTrue(c.closed)
        self.assertEqual(c.final_frame, kc.decode_daemon_frame(bytes.fromhex(VECTORS["error_over_budget"]["hex"])[4:]))
        self.assertIsNone(c.result(ids[0]))
        self.assertEqual(c.subscriptions[1].next(), kc.Message("t", 1, b"x"))
        with self.assertRaises(kc.ConnectionClosed) as ctx2:
            c.next_event()
        self.assertEqual(ctx2.exception.final_frame.code, 15)  # type: ignore[union-attr]

    def test_a_request_waiting_when_the_connection_ends(self) -> None:
        c, d = self.make()
        d.sendall(self.reply(1, kc.Requested()) + bytes.fromhex(VECTORS["closing_shutdown"]["hex"]))
        with self.assertRaises(kc.DaemonClosing):
            c.request("svc", b"", timeout=5)

    def test_closing_shutdown_with_requests_outstanding(self) -> None:
        c, d = self.make(sub=True)
        ids = c.send_many([kc.RequestKind.Shutdown, kc.RequestKind.Ping])
        d.sendall(self.ack(ids[0]) + self.ev(3) + bytes.fromhex(VECTORS["closing_shutdown"]["hex"]))
        self.assertIsNone(c.result(ids[0]))
        with self.assertRaises(kc.DaemonClosing) as ctx:
            c.wait_reply(ids[1])
        self.assertEqual(ctx.exception.reason, kc.CloseReason.Shutdown)
        self.assertEqual(ctx.exception.unanswered, [ids[1]])
        self.assertEqual(c.next_event(), self.msg(3), "events before Closing are kept")
        with self.assertRaises(kc.DaemonClosing):
            c.next_event()

    def test_closing_slow_consumer(self) -> None:
        c, d = self.make(sub=True)
        d.sendall(self.ev(1) + bytes.fromhex(VECTORS["closing_slow_consumer"]["hex"]))
        self.assertEqual(list(zip(range(1), c.subscriptions[1])), [(0, kc.Message("t", 1, b"x"))])
        with self.assertRaises(kc.DaemonClosing) as ctx:
            c.next_event()
        self.assertEqual(ctx.exception.reason, kc.CloseReason.SlowConsumer)

    def test_end_of_stream_without_a_final_frame(self) -> None:
        c, d = self.make(sub=True)
        d.sendall(bytes.fromhex(VECTORS["event"]["hex"]))
        d.close()
        self.assertEqual(c.next_event(), kc.Event(1, kc.Message("news.local", 1, b"hello")))
        with self.assertRaises(kc.ConnectionClosed) as ctx:
            c.next_event()
        self.assertIsNone(ctx.exception.final_frame)
        self.assertFalse(isinstance(ctx.exception, kc.DaemonClosing))

    def test_connection_dropped_in_the_middle_of_a_frame(self) -> None:
        c, d = self.make(sub=True)
        d.sendall(bytes.fromhex(VECTORS["event"]["hex"])[:20])
        d.close()
        with self.assertRaises(kc.ConnectionClosed) as ctx:
            c.next_event()
        self.assertIsNone(ctx.exception.final_frame)

    def test_econnreset_after_the_final_error_is_the_end_of_the_connection(self) -> None:
        c, d = self.make()
        c.send_many([kc.RequestKind.Ping] * 3)  # left unread: closing now makes our recv see ECONNRESET
        time.sleep(0.05)
        d.sendall(bytes.fromhex(VECTORS["error_frame_too_large"]["hex"]))
        d.close()
        with self.assertRaises(kc.FrameTooLargeDaemonError):
            c.next_event()
        with self.assertRaises(kc.ConnectionClosed):
            c.next_event()
        # And without any frame: reset is reported as the end too.
        c, d = self.make()
        c.send(kc.RequestKind.Ping)
        time.sleep(0.05)
        d.close()
        with self.assertRaises(kc.ConnectionClosed) as ctx:
            c.next_event()
        self.assertTrue(ctx.exception.reset)

    def test_write_fails_because_the_daemon_closed(self) -> None:
        c, d = self.make(max_frame_len=16777216)
        d.sendall(bytes.fromhex(VECTORS["error_malformed"]["hex"]))
        d.shutdown(socket.SHUT_WR)
        d.close()
        with self.assertRaises(kc.MalformedError):  # what the daemon said, not a bare EPIPE
            c.send(kc.Publish("t", bytes(4_000_000)))

    def test_a_write_that_fails_after_the_final_frame_keeps_it(self) -> None:
        """Section 9, "Keeping the final frame when a write fails" (17.6,
        write_fails_after_final_frame): the daemon reads the start of a
        large Publish, writes Error OverBudget and closes with the rest
        unread, so the write fails (EPIPE or ECONNRESET); the client reports
        the Error, and so does every later request."""
        c, d = self.make(max_frame_len=16777216)
        d.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

        def daemon() -> None:
            recv_exactly(d, 64)
            d.sendall(bytes.fromhex(VECTORS["error_over_budget"]["hex"]))
            d.close()  # the rest unread: the client sees ECONNRESET

        thread = threading.Thread(target=daemon)
        thread.start()
        self.addCleanup(thread.join)
        with self.assertRaises(kc.KeyholeError) as ctx:
            c.publish("big", bytes(4 * 1024 * 1024))
        self.assertEqual(ctx.exception.code, kc.ErrorCode.OverBudget)
        self.assertIsInstance(c.final_frame, kc.Error)
        self.assertEqual(c.final_frame.code, kc.ErrorCode.OverBudget)
        self.assertTrue(c.closed)
        with self.assertRaises(kc.ConnectionClosed) as later:
            c.ping()
        self.assertEqual(later.exception.final_frame, c.final_frame)

    def test_event_queue_is_bounded(self) -> None:
        c, d = self.make(sub=True, max_queued_event_bytes=100)
        rid = c.send(kc.RequestKind.Ping)
        d.sendall(self.ev(1) + self.ev(2) + self.ev(3) + self.ack(rid))  # 3 x 46 bytes: over 100 after the third
        self.assertIsNone(c.result(rid), "a reply right behind the events is still read")
        self.assertEqual(c.queued_events, 3)
        rid = c.send(kc.RequestKind.Ping)
        d.sendall(self.ev(4) + self.ack(rid))
        with self.assertRaises(kc.EventQueueFull):
            c.wait_reply(rid)
        self.assertFalse(c.closed)
        self.assertEqual(c.queued_events, 3, "the event was left unread")
        self.assertEqual([c.subscriptions[1].next().sequence for _ in range(4)], [1, 2, 3, 4])
        self.assertIsNone(c.result(rid))

    def test_a_full_queue_still_lets_in_what_is_awaited(self) -> None:
        """With the queue full, the Response a request waits for, a Lagged,
        or an event of the route being read are still read; anything else
        stays unread (EventQueueFull)."""
        c, d = self.make(sub=True, lag=kc.Lag.DropOldest, max_queued_event_bytes=100)
        d.sendall(self.ev(1) + self.ev(2) + self.ev(3) + self.reply(2, kc.Requested())
                  + self.frame(kc.Lagged(1, 5)) + self.frame(kc.Event(0, kc.Response(2, kc.OutcomeReply(b"r")))))
        self.assertEqual(c.request("svc", b"", timeout=1), b"r")
        self.assertEqual(c.queued_events, 4)  # three messages and the Lagged
        d.sendall(self.ev(9) + self.frame(kc.Event(0, kc.IncomingRequest(1, "n", 0, 0, b""))))
        with self.assertRaises(kc.EventQueueFull):
            c.next_request()  # the next frame is a message, not what this wait is for
        self.assertEqual(c.next_event(), self.msg(1))
        sub = c.subscriptions[1]
        self.assertEqual([sub.next(), sub.next(), sub.next(), sub.next()],
                         [kc.Message("t", 2, b"x"), kc.Message("t", 3, b"x"), kc.Lagged(1, 5), kc.Message("t", 9, b"x")])
        self.assertEqual(c.next_request(), kc.IncomingRequest(1, "n", 0, 0, b""))

    def test_refuses_to_send_over_max_frame_len(self) -> None:
        c, d = self.make(max_frame_len=1024)
        with self.assertRaises(kc.RequestTooLarge):
            c.send(kc.Publish("t", b"x" * (1024 - 33 + 1)))
        with self.assertRaises(kc.RequestTooLarge):  # all or nothing
            c.send_many([kc.RequestKind.Ping, kc.Publish("t", b"x" * 2000)])
        rid = c.send(kc.Publish("t", b"x" * (1024 - 33)))  # exactly 1024
        self.assertEqual(rid, 1)
        (length,) = struct.unpack("<I", recv_exactly(d, 4))
        self.assertEqual(length, 1024)

    def test_duplicate_ids(self) -> None:
        c, d = self.make()
        c.send_many([kc.RequestKind.Ping, kc.StatusRequest()], ids=[5, 5])
        d.sendall(self.ack(5) + self.reply(5, kc.Status(0, 0, 0, 0, 0, 0, 0, "")))
        self.assertEqual(c.wait_reply(5), kc.Ack(5))
        self.assertIsInstance(c.wait_reply(5), kc.Reply)
        with self.assertRaises(ValueError):
            c.wait_reply(5)  # nothing outstanding any more: would wait forever


class FakeHandshakeTests(unittest.TestCase):
    """connect() against scripted daemons on a real socket: Welcome checks,
    the service check, refusals."""

    def run_fake(self, script: Callable[[socket.socket, bytes], None], **kw: Any) -> Tuple[FakeDaemon, Any]:
        fake = FakeDaemon(script)
        self.addCleanup(fake.close)
        try:
            result: Any = kc.KeyholeClient.connect(env=fake.env, timeout=IO_TIMEOUT, **kw)
        except kc.KeyholeException as err:
            result = err
        return fake, result

    def test_welcome_is_accepted_and_bytes_after_it_are_kept(self) -> None:
        def script(conn: socket.socket, hs: bytes) -> None:
            conn.sendall(welcome_bytes() + kc.encode_daemon_frame(kc.Ack(1)))
        fake, c = self.run_fake(script, early=[kc.RequestKind.Ping])
        self.assertIsInstance(c, kc.KeyholeClient)
        self.assertEqual(fake.handshakes[0].hex(), VECTORS["handshake"]["hex"])
        self.assertEqual(c.welcome.instance_id, 0x1122334455667788)
        self.assertIsNone(c.result(1))
        c.close()

    def test_another_service_is_refused_naming_both(self) -> None:
        def script(conn: socket.socket, hs: bytes) -> None:
            conn.sendall(welcome_bytes("notes", 1))
        fake, err = self.run_fake(script)
        self.assertIsInstance(err, kc.WrongServiceError)
        self.assertEqual(str(err), "the daemon serves `notes` version 1, not `hub` version 2")
        self.assertTrue(fake.ended.wait(IO_TIMEOUT), "the client closes the connection")
        self.assertEqual(bytes(fake.received), b"", "nothing after the handshake")
        fake, err = self.run_fake(lambda conn, hs: conn.sendall(welcome_bytes("hub", 1)))  # the hub of version 1
        self.assertIsInstance(err, kc.WrongServiceError)
        self.assertEqual(str(err), "the daemon serves `hub` version 1, not `hub` version 2")

    def test_a_generic_client_talks_to_any_service(self) -> None:
        def script(conn: socket.socket, hs: bytes) -> None:
            conn.sendall(welcome_bytes("notes", 3))
            (length,) = struct.unpack("<I", recv_exactly(conn, 4))
            rid, kind = struct.unpack("<QI", recv_exactly(conn, length))
            assert kind == kc.RequestKind.Ping and length == 12, (kind, length)
            conn.sendall(kc.encode_daemon_frame(kc.Ack(rid)))
        fake, c = self.run_fake(script, service=kc.RAW)
        self.assertIsInstance(c, kc.KeyholeClient, c)
        self.assertEqual((c.welcome.service, c.welcome.service_version), ("notes", 3))
        c.ping()
        c.close()

    def test_bad_welcomes_are_protocol_errors(self) -> None:
        for data in (welcome_bytes(protocol_version=1), welcome_bytes(protocol_version=3),
                     welcome_bytes(max_frame_len=1023), welcome_bytes(max_frame_len=16777217),
                     kc.encode_daemon_frame(kc.Ack(1)), bytes.fromhex(VECTORS["closing_shutdown"]["hex"]),
                     kc.encode_daemon_frame(kc.Error(1, 3, "an id before authentication")),
                     # Error codes a pending connection cannot get (section 4: only 0 to 7 and 13).
                     bytes.fromhex(VECTORS["error_over_budget"]["hex"]),
                     bytes.fromhex(VECTORS["error_malformed"]["hex"]),
                     bytes.fromhex(VECTORS["error_frame_too_large"]["hex"]),
                     welcome_bytes()[:-1] + b"\x00\x00",
                     struct.pack("<I", 16777217)):
            with self.subTest(data=data[:12].hex()):
                fake, err = self.run_fake(lambda conn, hs, data=data: conn.sendall(data))
                self.assertIsInstance(err, kc.ProtocolError)
                self.assertTrue(fake.ended.wait(IO_TIMEOUT), "the client closes the connection")

    def test_refusals(self) -> None:
        for name, cls in (("error_bad_token", kc.BadTokenError), ("error_auth_timeout", kc.AuthTimeoutError),
                          ("error_unsupported_version", kc.UnsupportedVersionError),
                          ("error_shutting_down", kc.ShuttingDownError),
                          ("error_peer_not_allowed", kc.PeerNotAllowedError),
                          ("error_too_many_unauthenticated", kc.TooManyUnauthenticatedError),
                          ("error_too_many_connections", kc.TooManyConnectionsError)):
            with self.subTest(name):
                data = bytes.fromhex(VECTORS[name]["hex"])
                t0 = time.monotonic()
                # connect_timeout=0: no time for a retry of the busy refusals.
                fake, err = self.run_fake(lambda conn, hs, data=data: conn.sendall(data),
                                          early=[kc.RequestKind.Ping] * 5, connect_timeout=0)
                self.assertIsInstance(err, cls)
                self.assertIsInstance(err, kc.HandshakeRefused, "reported as a refused handshake")
                self.assertIsNone(err.id)
                self.assertEqual((err.attempts, fake.accepted), (1, 1))
                self.assertLess(time.monotonic() - t0, 2.0)
        fake, err = self.run_fake(lambda conn, hs: "close")  # the end of the connection with no frame
        self.assertIsInstance(err, kc.RefusedWithoutFrame)
        self.assertIsInstance(err, kc.HandshakeRefused)

    def test_final_refusals_are_not_retried(self) -> None:
        """Only "busy" is retried (section 9, "Admission"): a bad token, say,
        fails at once, however long the connect timeout."""
        for name in ("error_bad_token", "error_auth_timeout", "error_shutting_down"):
            with self.subTest(name):
                data = bytes.fromhex(VECTORS[name]["hex"])
                fake = FakeDaemon(send_and_close(data),
                                  connections=2)
                self.addCleanup(fake.close)
                t0 = time.monotonic()
                with self.assertRaises(kc.HandshakeRefused) as ctx:
                    kc.KeyholeClient.connect(env=fake.env, timeout=IO_TIMEOUT, connect_timeout=5)
                self.assertLess(time.monotonic() - t0, 2.0)
                self.assertEqual((ctx.exception.attempts, fake.accepted, len(fake.handshakes)), (1, 1, 1))

    def test_busy_refusals_are_retried_on_a_new_connection(self) -> None:
        """TooManyUnauthenticated and TooManyConnections mean "busy": the
        client SHOULD retry within its connect timeout (section 9,
        "Admission"). Each attempt is a new connection with the whole
        handshake, and the early requests are sent again (the refused
        connection discarded them)."""
        refusals = [bytes.fromhex(VECTORS["error_too_many_unauthenticated"]["hex"]),
                    bytes.fromhex(VECTORS["error_too_many_connections"]["hex"])]
        early_seen: List[bytes] = []
        fake: FakeDaemon

        def script(conn: socket.socket, hs: bytes) -> Any:
            if fake.accepted <= len(refusals):
                conn.sendall(refusals[fake.accepted - 1])
                return "close"
            conn.sendall(welcome_bytes())
            early = recv_exactly(conn, 2 * 16)
            early_seen.append(early)
            conn.sendall(kc.encode_daemon_frame(kc.Ack(1)) + kc.encode_daemon_frame(kc.Ack(2)))
            return None

        fake = FakeDaemon(script, connections=3)
        self.addCleanup(fake.close)
        c = kc.KeyholeClient.connect(env=fake.env, timeout=IO_TIMEOUT, connect_timeout=5,
                                     early=[kc.RequestKind.Ping, kc.RequestKind.Ping])
        with c:
            self.assertEqual((c.attempts, fake.accepted), (3, 3))
            self.assertEqual(fake.handshakes, [bytes.fromhex(VECTORS["handshake"]["hex"])] * 3,
                             "the whole handshake on every attempt")
            self.assertEqual([c.wait_reply(1), c.wait_reply(2)], [kc.Ack(1), kc.Ack(2)])
            self.assertEqual(early_seen, [ping_frame(1) + ping_frame(2)])  # read before the Acks were sent
            self.assertEqual(c.send(kc.RequestKind.Ping), 3, "ids go on after the early requests")

    def test_busy_retries_stop_at_the_connect_timeout(self) -> None:
        data = bytes.fromhex(VECTORS["error_too_many_connections"]["hex"])
        fake = FakeDaemon(send_and_close(data), connections=1000)
        self.addCleanup(fake.close)
        token = bytearray(TEST_TOKEN)
        t0 = time.monotonic()
        with self.assertRaises(kc.TooManyConnectionsError) as ctx:
            kc.KeyholeClient.connect(fake.path, token, timeout=IO_TIMEOUT, connect_timeout=0.5)
        elapsed = time.monotonic() - t0
        self.assertGreaterEqual(elapsed, 0.45)
        self.assertLess(elapsed, 2.0)
        self.assertGreater(ctx.exception.attempts, 2)
        self.assertEqual(ctx.exception.attempts, fake.accepted)
        self.assertEqual(token, bytearray(32), "the token is wiped once connect gives up")

    def test_busy_retry_pauses_and_giving_up_follow_section_9(self) -> None:
        """Section 9, "Admission": every pause, from reading a busy refusal to
        the next connect, is 1 ms to 1 s; no connect starts after the
        connect timeout; the last refusal is reported at about the connect
        timeout (the last pause cut to end there), with the token wiped."""
        data = bytes.fromhex(VECTORS["error_too_many_unauthenticated"]["hex"])
        refused_at: List[float] = []
        accepted_at: List[float] = []

        def script(conn: socket.socket, hs: bytes) -> Any:
            accepted_at.append(time.monotonic())
            refused_at.append(time.monotonic())
            conn.sendall(data)
            return "close"

        fake = FakeDaemon(script, connections=1000)
        self.addCleanup(fake.close)
        token = bytearray(TEST_TOKEN)
        t0 = time.monotonic()
        with self.assertRaises(kc.TooManyUnauthenticatedError) as ctx:
            kc.KeyholeClient.connect(fake.path, token, timeout=IO_TIMEOUT, connect_timeout=1.0)
        elapsed = time.monotonic() - t0
        self.assertGreaterEqual(elapsed, 0.99, "gives up at the connect timeout, not a pause earlier")
        self.assertLess(elapsed, 1.5)
        self.assertEqual(ctx.exception.attempts, fake.accepted)
        self.assertGreater(fake.accepted, 5)
        self.assertEqual(token, bytearray(32))
        pauses = [b - a for a, b in zip(refused_at, accepted_at[1:])]
        self.assertGreaterEqual(min(pauses), 0.001)
        self.assertLessEqual(max(pauses), 1.0)
        self.assertLessEqual(accepted_at[-1], t0 + 1.0, "no attempt after the connect timeout")
        self.assertLessEqual(kc.RETRY_MAX_DELAY, 1.0)
        self.assertGreaterEqual(kc.RETRY_FIRST_DELAY, 0.001)

    def test_connect_options_set_the_first_request_id_and_sid(self) -> None:
        """``next_request_id`` and ``next_subscription_id`` (section 17.3):
        the early requests and every later one count from the first id,
        wrapping 2^64 - 1 -> 0; the Expect sent with the handshake (id 0) is
        outside the count; sids wrap 2^64 - 1 -> 1."""
        top = 2 ** 64 - 1
        got: Dict[str, bytes] = {}

        def script(conn: socket.socket, hs: bytes) -> Any:
            conn.sendall(welcome_bytes())
            expect = kc.encode_request(kc.Request(0, kc.RequestKind.Expect, expect=kc.Expect("hub", 2)))
            first = expect + call_frame(top, kc.StatusRequest()) + ping_frame(0)
            got["early"] = recv_exactly(conn, len(first))
            status = kc.Status(1, 0, 0, 0, 0, 0, 5, "x")
            conn.sendall(kc.encode_daemon_frame(kc.Ack(0)) + kc.encode_daemon_frame(kc.Reply(top, status))
                         + kc.encode_daemon_frame(kc.Ack(0)))
            got["later"] = b""
            for rid, sid, pattern in ((1, top, "a"), (2, 1, "b")):  # one Subscribe at a time
                frame = call_frame(rid, kc.Subscribe(sid, pattern))
                got["later"] += recv_exactly(conn, len(frame))
                conn.sendall(kc.encode_daemon_frame(kc.Reply(rid, kc.Subscribed())))
            return None

        fake = FakeDaemon(script)
        self.addCleanup(fake.close)
        with kc.KeyholeClient.connect(env=fake.env, timeout=IO_TIMEOUT, next_request_id=top,
                                      next_subscription_id=top,
                                      early=[kc.StatusRequest(), kc.RequestKind.Ping]) as c:
            self.assertEqual(c.early_ids, [top, 0])
            self.assertEqual(c.result(top).uptime_ms, 5)
            self.assertIsNone(c.result(0))
            self.assertEqual((c.subscribe("a").sid, c.subscribe("b").sid), (top, 1))
            self.assertEqual(c.expect_reply, kc.Ack(0))
        expect = kc.encode_request(kc.Request(0, kc.RequestKind.Expect, expect=kc.Expect("hub", 2)))
        self.assertEqual(got["early"], expect + call_frame(top, kc.StatusRequest()) + ping_frame(0))
        self.assertEqual(got["later"], call_frame(1, kc.Subscribe(top, "a")) + call_frame(2, kc.Subscribe(1, "b")))

    def test_connect_options_are_checked_before_connecting(self) -> None:
        fake = FakeDaemon(lambda conn, hs: None)
        self.addCleanup(fake.close)
        for kw in ({"next_request_id": -1}, {"next_request_id": 2 ** 64}, {"next_request_id": 1.5},
                   {"next_subscription_id": 0}, {"next_subscription_id": 2 ** 64},
                   {"next_subscription_id": True}):
            with self.subTest(kw), self.assertRaises(ValueError):
                kc.KeyholeClient.connect(env=fake.env, timeout=IO_TIMEOUT, **kw)
            with self.subTest(kw, api="asyncio"), self.assertRaises(ValueError):
                arun(kc.AsyncKeyholeClient.connect(env=fake.env, timeout=IO_TIMEOUT, **kw))
        self.assertEqual(fake.accepted, 0, "nothing was connected")

    def test_asyncio_connect_takes_the_same_options(self) -> None:
        top = 2 ** 64 - 1

        def script(conn: socket.socket, hs: bytes) -> Any:
            conn.sendall(welcome_bytes())
            wire = ping_frame(top) + ping_frame(0) + call_frame(1, kc.Subscribe(top, "a"))
            self.assertEqual(recv_exactly(conn, len(wire)), wire)
            conn.sendall(kc.encode_daemon_frame(kc.Ack(top)) + kc.encode_daemon_frame(kc.Ack(0))
                         + kc.encode_daemon_frame(kc.Reply(1, kc.Subscribed())))
            return None

        fake = FakeDaemon(script)
        self.addCleanup(fake.close)

        async def main() -> None:
            c = await kc.AsyncKeyholeClient.connect(env=fake.env, timeout=IO_TIMEOUT, next_request_id=top,
                                                    next_subscription_id=top, connect_timeout=2)
            async with c:
                self.assertEqual(await c.send_many([kc.RequestKind.Ping] * 2), [top, 0])
                sub = await c.subscribe("a")
                self.assertEqual([await c.wait_reply(top), await c.wait_reply(0), sub.sid],
                                 [kc.Ack(top), kc.Ack(0), top])
                self.assertEqual(c.next_subscription_id, 1)
        arun(main())
        self.assertEqual(fake.errors, [])

    def test_eagain_on_connect_is_retried_as_busy(self) -> None:
        """A full listen queue makes a non-blocking connect fail with EAGAIN;
        the client treats it as "busy" and retries within its connect
        timeout (section 9, "Admission")."""
        tmp = tempfile.mkdtemp(prefix="khpy-eagain-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "full.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen(0)  # room for one connection waiting to be accepted
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(filler.close)
        filler.connect(path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        with self.assertRaises(BlockingIOError):  # the queue is full: the premise of this test
            probe.connect(path)
        probe.close()
        # Given up at the connect timeout: DaemonBusy, a timeout; nothing sent.
        token = bytearray(TEST_TOKEN)
        t0 = time.monotonic()
        with self.assertRaises(kc.DaemonBusy) as ctx:
            kc.KeyholeClient.connect(path, token, timeout=IO_TIMEOUT, connect_timeout=0.4)
        self.assertGreaterEqual(time.monotonic() - t0, 0.35)
        self.assertGreater(ctx.exception.attempts, 2)
        self.assertIsInstance(ctx.exception, kc.KeyholeTimeout)
        self.assertEqual(token, bytearray(32))
        r = py_cli(["--timeout", "0.3", "ping"], {"KEYHOLE_SOCKET": path, "KEYHOLE_TOKEN": TEST_TOKEN.hex()})
        self.assertEqual(r.returncode, 6, r.stderr)  # the timeout exit code
        self.assertIn(b"EAGAIN", r.stderr)
        # Admitted once the queue has room again.
        result: Dict[str, Any] = {}

        def connect() -> None:
            try:
                result["client"] = kc.KeyholeClient.connect(path, bytearray(TEST_TOKEN), timeout=IO_TIMEOUT,
                                                            connect_timeout=5)
            except BaseException as err:  # noqa: BLE001 - reported below
                result["error"] = err

        t0 = time.monotonic()
        thread = threading.Thread(target=connect)
        thread.start()
        time.sleep(0.3)
        listener.settimeout(IO_TIMEOUT)
        first, _ = listener.accept()  # the filler: makes room in the queue
        first.close()
        conn, _ = listener.accept()   # the client's next attempt
        self.addCleanup(conn.close)
        conn.settimeout(IO_TIMEOUT)
        self.assertEqual(recv_exactly(conn, 44).hex(), VECTORS["handshake"]["hex"])
        conn.sendall(welcome_bytes())
        thread.join(IO_TIMEOUT)
        self.assertNotIn("error", result)
        c = result["client"]
        self.assertGreater(c.attempts, 2)
        self.assertGreaterEqual(time.monotonic() - t0, 0.3)
        c.close()


# --------------------------------------------------------------------------
# 3. Against the real daemon: requests, replies, events
# --------------------------------------------------------------------------


class DaemonTests(unittest.TestCase):
    """Welcome, Ping, the hub's requests, events, pipelining."""

    daemon: Daemon

    @classmethod
    def setUpClass(cls) -> None:
        cls.daemon = Daemon()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.close()

    def test_welcome(self) -> None:
        with self.daemon.client() as c, self.daemon.client() as c2:
            w = c.welcome
            self.assertEqual((w.protocol_version, w.service, w.service_version), (2, "hub", 2))
            self.assertEqual(w.max_frame_len, 16777216)
            self.assertTrue(w.software_version)
            self.assertEqual(c.status().version, w.software_version)
            self.assertEqual(c2.welcome.instance_id, w.instance_id, "one instance id per daemon start")
            self.assertEqual(w.instance_id, self.daemon.instance_id)
            self.assertNotEqual(c2.welcome.connection_id, w.connection_id)

    def test_ping_and_raw_ack(self) -> None:
        with self.daemon.client() as c:
            self.assertGreaterEqual(c.ping(), 0.0)
            self.assertEqual(c.wait_reply(c.send(kc.RequestKind.Ping, id=2 ** 64 - 1)), kc.Ack(2 ** 64 - 1))
        s, _ = self.daemon.authenticated_raw()
        s.sendall(bytes.fromhex(VECTORS["ping"]["hex"]))
        self.assertEqual(recv_exactly(s, 16).hex(), VECTORS["ack"]["hex"])
        s.close()

    def test_status_fields(self) -> None:
        """Section 13's Status figures: patterns (distinct, with a
        subscription), subscriptions, names served, requests in flight."""
        with Daemon() as d, d.client() as a, d.client() as b:
            wait_for(lambda: a.status().authenticated == 2, "start()'s connection to go")
            s0 = a.status()
            self.assertEqual((s0.authenticated, s0.pending, s0.topics, s0.subscriptions, s0.names,
                              s0.requests_in_flight), (2, 0, 0, 0, 0, 0))
            x1 = a.subscribe("t1")
            a.subscribe("t1")  # twice: two subscriptions of one pattern
            x2 = a.subscribe("t2.*")
            y1 = b.subscribe("t1")
            a.serve("svc.a")
            b.serve("svc.a")
            b.serve("svc.b")
            a.serve("svc.a")  # serving a name already served changes nothing
            pending = d.raw()
            wait_for(lambda: a.status().pending == 1, "the pending connection to be counted")
            time.sleep(0.02)
            s1 = a.status()
            self.assertEqual((s1.authenticated, s1.pending, s1.topics, s1.subscriptions, s1.names,
                              s1.requests_in_flight), (2, 1, 2, 4, 2, 0))
            self.assertGreater(s1.uptime_ms, s0.uptime_ms)
            pending.close()
            rid = b.send(kc.RequestTo("svc.b", 5000, b"hold"))  # b serves svc.b itself
            self.assertEqual(b.result(rid), kc.Requested())
            wait_for(lambda: a.status().requests_in_flight == 1, "the request in flight")
            incoming = b.next_request()
            self.assertEqual((incoming.name, incoming.payload, incoming.uid, incoming.pid),
                             ("svc.b", b"hold", os.geteuid(), os.getpid()))
            self.assertTrue(b.respond(incoming.token, b"done"))
            self.assertEqual(kc.outcome_result(b.wait_response(rid)), b"done")
            self.assertEqual(a.status().requests_in_flight, 0)
            b.unsubscribe(y1)
            a.unsubscribe(x2)  # its last subscription ends: the pattern ceases to exist
            a.unsubscribe(12345)  # an unknown sid: answered Unsubscribed too
            b.unserve("svc.b")
            b.unserve("never-served")  # answered Unserved too
            s2 = b.status()
            self.assertEqual((s2.topics, s2.subscriptions, s2.names), (1, 2, 1))
            a.unsubscribe(x1)
            # The raw replies, as in section 15.4.
            rids = a.send_many([kc.Subscribe(500, "t1"), kc.Unsubscribe(501), kc.Publish("zz", b""),
                                kc.Serve("svc.c"), kc.Unserve("svc.c")])
            self.assertEqual([a.wait_reply(r) for r in rids],
                             [kc.Reply(rids[0], kc.Subscribed()), kc.Reply(rids[1], kc.Unsubscribed()),
                              kc.Reply(rids[2], kc.Published(0)), kc.Reply(rids[3], kc.Serving()),
                              kc.Reply(rids[4], kc.Unserved())])
            st = a.status()
            self.assertEqual((st.topics, st.subscriptions), (1, 2), "t1: a's remaining one and sid 500")
            # A connection's subscriptions and names go with it.
            b.close()
            wait_for(lambda: a.status().authenticated == 1, "b to go")
            st = a.status()
            self.assertEqual((st.topics, st.subscriptions, st.names), (1, 2, 1))

    def test_topics_lists_patterns_and_names_sorted_with_counts(self) -> None:
        with Daemon() as d, d.client() as a, d.client() as b:
            self.assertEqual(a.topics(), kc.TopicList((), (), False))
            for pattern in ("news.*", "b", "B", "a.>", "é", "news.*"):
                a.subscribe(pattern)
            b.subscribe("news.*")
            b.subscribe(">")
            for name in ("svc.clock", "svc.a", "Z"):
                a.serve(name)
            b.serve("svc.clock")
            t = a.topics()
            self.assertEqual(t.patterns, ((">", 1), ("B", 1), ("a.>", 1), ("b", 1), ("news.*", 3), ("é", 1)))
            self.assertEqual(t.names, (("Z", 1), ("svc.a", 1), ("svc.clock", 2)))
            self.assertFalse(t.truncated)
            self.assertEqual([p for p, _ in t.patterns], sorted((p for p, _ in t.patterns), key=str.encode),
                             "sorted by text, byte for byte")
            st = a.status()
            self.assertEqual((st.topics, st.subscriptions, st.names), (len(t.patterns), 8, len(t.names)))
            # The bytes of section 15.4's reply_topics, from a daemon in that state.
            with Daemon() as d2, d2.client() as x, d2.client() as y:
                x.subscribe("news.*")
                y.subscribe("news.*")
                y.serve("svc.clock")
                s, _ = d2.authenticated_raw()
                s.sendall(bytes.fromhex(VECTORS["topics"]["hex"]))
                self.assertEqual(recv_exactly(s, 84).hex(), VECTORS["reply_topics"]["hex"])
                s.close()

    def test_subscribe_publish_unsubscribe(self) -> None:
        with self.daemon.client() as sub, self.daemon.client() as pub:
            news = sub.subscribe("news")
            other = sub.subscribe("other")
            payloads = [b"hello", b"", bytes(range(256)), "ünïcødé ✓".encode(), b"x" * 100000]
            for p in payloads:
                self.assertEqual(pub.publish("news", p), 1)
            self.assertEqual(pub.publish("nobody-listens", b"lost"), 0)
            events = [news.next() for _ in payloads]
            self.assertEqual([e.payload for e in events], payloads)
            self.assertEqual({e.topic for e in events}, {"news"})
            seqs = [e.sequence for e in events]
            self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(payloads))))
            # Own publication on a subscribed topic: the event and the reply in either order.
            self.assertEqual(sub.publish("news", b"mine"), 1)
            self.assertEqual(news.next(), kc.Message("news", seqs[-1] + 1, b"mine"))
            sub.unsubscribe(news)
            self.assertFalse(news.active)
            self.assertEqual(pub.publish("news", b"after"), 0)
            self.assertEqual(pub.publish("other", b"still"), 1)
            self.assertEqual(sub.next_event(), kc.Event(other.sid, kc.Message("other", 1, b"still")))
            self.assertEqual((news.received, other.received), (len(payloads) + 1, 1))

    def test_nothing_of_a_sid_arrives_after_its_unsubscribed_reply(self) -> None:
        """Section 14, raw: a subscriber that read nothing while 1000 events
        of 1 kB were published (more than the socket buffers hold, so most
        wait in the daemon's queue) sends Unsubscribe(1) and Subscribe(1) in
        one write, while another connection keeps publishing on the topic.
        The events before the Unsubscribed reply are the first k of the old
        subscription, in order, with no gap; the rest of its queue was
        dropped; after the reply only the new subscription's events come,
        on the same sid, in order, with no gap."""
        with self.daemon.client() as pub:
            topic = "reuse.hot"
            s, _ = self.daemon.authenticated_raw()
            self.addCleanup(s.close)
            s.sendall(call_frame(1, kc.Subscribe(1, topic)))
            self.assertEqual(read_frames(s, 1), [kc.Reply(1, kc.Subscribed())])
            n = 1000
            for i in range(n):
                self.assertEqual(pub.publish(topic, b"%06d" % (i + 1) + bytes(1000)), 1)
            published = [n]
            stop = threading.Event()
            errors: List[BaseException] = []

            def publisher() -> None:
                try:
                    with self.daemon.client() as p:
                        while not stop.is_set() and published[0] < n + 4000:
                            p.publish(topic, b"%06d" % (published[0] + 1))
                            published[0] += 1
                except BaseException as err:  # noqa: BLE001 - reported below
                    errors.append(err)

            t = threading.Thread(target=publisher, daemon=True)
            t.start()
            wait_for(lambda: published[0] >= n + 200, "the publisher to get going")
            s.sendall(call_frame(2, kc.Unsubscribe(1)) + call_frame(3, kc.Subscribe(1, topic)))
            frames: List[kc.DaemonFrame] = []
            while kc.Reply(3, kc.Subscribed()) not in frames:
                frames.extend(read_frames(s, 1))
            t.join(IO_TIMEOUT)
            stop.set()
            self.assertEqual(errors, [])
            self.assertEqual(pub.publish(topic, b"marker"), 1)
            while not (isinstance(frames[-1], kc.Event) and frames[-1].event.payload == b"marker"):  # type: ignore
                frames.extend(read_frames(s, 1))
            s.settimeout(0.3)
            with self.assertRaises(socket.timeout):
                s.recv(1)  # and nothing after
            cut = frames.index(kc.Reply(2, kc.Unsubscribed()))
            before, after = frames[:cut], [f for f in frames[cut + 1:] if f != kc.Reply(3, kc.Subscribed())]
            self.assertEqual(len(after), len(frames) - cut - 2)
            for f in before + after:
                self.assertIsInstance(f, kc.Event)
                self.assertEqual((f.stream, f.event.topic), (1, topic))  # type: ignore[union-attr]
            old = [f.event.sequence for f in before]  # type: ignore[union-attr]
            new = [f.event.sequence for f in after]  # type: ignore[union-attr]
            k = len(old)
            self.assertEqual(old, list(range(1, k + 1)), "the old subscription's first k events, in order")
            self.assertGreater(k, 0)
            self.assertLess(k, n, "the events still queued were dropped")
            self.assertEqual(new, list(range(new[0], new[0] + len(new))), "the new one's events, in order")
            self.assertTrue(new[0] == 1 or new[0] > n, f"none of the old subscription's after the reply: {new[0]}")
            self.assertGreater(len(new), 1)

    def test_a_sid_is_used_again_right_after_unsubscribe(self) -> None:
        """Section 16 step 14 through the client: the route ends at the
        Unsubscribed reply and the freed sid may be given to the next
        subscription at once; a late event of the old one would be a protocol error
        (it would close the connection), and the new one gets exactly its own."""
        with self.daemon.client() as sub, self.daemon.client() as pub:
            old = sub.subscribe("again.old")
            n = 1000
            for i in range(n):
                pub.publish("again.old", b"%06d" % (i + 1) + bytes(1000))
            sub.unsubscribe(old)
            self.assertFalse(old.active)
            self.assertGreater(old.received, 0)
            self.assertLess(old.received, n, "what was still queued at the daemon was dropped")
            self.assertEqual(sub.queued_events, 0)
            new = sub.subscribe("again.>", sid=old.sid)
            self.assertEqual(new.sid, old.sid, "the freed sid is used again at once")
            self.assertEqual(pub.publish("again.new", b"mine"), 1)
            self.assertEqual(pub.publish("again.old", b"the new subscription's"), 1)
            self.assertEqual(new.next(), kc.Message("again.new", 1, b"mine"))
            self.assertEqual(new.next(), kc.Message("again.old", n + 1, b"the new subscription's"),
                             "the topic's numbering goes on (every publish reached someone)")
            with self.assertRaises(kc.KeyholeTimeout):
                sub.next_event(timeout=0.3)
            self.assertEqual((new.received, sub.queued_events, sub.closed), (2, 0, False))
            # The very next request: Unsubscribe and Subscribe of one sid pipelined.
            for i in range(n):
                pub.publish("again.new", b"%06d" % (i + 2) + bytes(1000))
            rids = sub.send_many([kc.Unsubscribe(new.sid), kc.Subscribe(new.sid, "again.third")])
            third = sub.subscriptions[new.sid]
            self.assertEqual([sub.result(r) for r in rids], [kc.Unsubscribed(), kc.Subscribed()])
            self.assertFalse(new.active)
            self.assertLess(new.received, 2 + n, "what was still queued at the daemon was dropped")
            self.assertEqual(pub.publish("again.third", b"3"), 1)
            self.assertEqual(pub.publish("again.new", b"nobody"), 0)
            self.assertEqual(third.next(), kc.Message("again.third", 1, b"3"))
            self.assertEqual((third.sid, third.received, sub.closed), (new.sid, 1, False))

    def test_the_spec_bytes_against_the_daemon(self) -> None:
        """Section 15's Subscribe, Publish and Unsubscribe, raw: the replies
        and the Event are the vectors' bytes (but for the sequence, which
        depends on what was published on the topic before)."""
        with Daemon() as d:
            s, _ = d.authenticated_raw()
            s.sendall(bytes.fromhex(VECTORS["subscribe"]["hex"]))
            expected = VECTORS["reply_subscribed"]["hex"]
            self.assertEqual(recv_exactly(s, len(expected) // 2).hex(), expected)
            s.sendall(bytes.fromhex(VECTORS["publish"]["hex"]))
            frames = read_frames(s, 2)  # the Event and the Reply, in either order
            published = kc.decode_daemon_frame(bytes.fromhex(VECTORS["reply_published"]["hex"])[4:])
            expected_event = kc.decode_daemon_frame(bytes.fromhex(VECTORS["event"]["hex"])[4:])
            self.assertIn(expected_event, frames)
            self.assertIn(kc.Reply(6, kc.Published(1)), frames, "one subscription reached")
            self.assertEqual(published, kc.Reply(6, kc.Published(2)))
            s.sendall(bytes.fromhex(VECTORS["subscribe_drop_oldest"]["hex"]) + bytes.fromhex(VECTORS["unsubscribe"]["hex"])
                      + bytes.fromhex(VECTORS["serve"]["hex"]) + bytes.fromhex(VECTORS["unserve"]["hex"]))
            self.assertEqual(read_frames(s, 4), [kc.Reply(7, kc.Subscribed()), kc.Reply(5, kc.Unsubscribed()),
                                                 kc.Reply(8, kc.Serving()), kc.Reply(9, kc.Unserved())])
            s.sendall(bytes.fromhex(VECTORS["status"]["hex"]))
            (st,) = read_frames(s, 1)
            self.assertEqual(st.id, 3)  # type: ignore[union-attr]
            self.assertEqual(st.reply.subscriptions, 1, "sid 2 (sensors.>) is left")  # type: ignore[union-attr]
            s.sendall(bytes.fromhex(VECTORS["request"]["hex"]))  # nobody serves svc.clock
            (err,) = read_frames(s, 1)
            self.assertEqual((err.id, err.code), (10, 1004))  # type: ignore[union-attr]
            s.sendall(bytes.fromhex(VECTORS["respond"]["hex"]) + bytes.fromhex(VECTORS["fail"]["hex"])
                      + bytes.fromhex(VECTORS["fail_reply_too_large"]["hex"]))
            self.assertEqual(read_frames(s, 3), [kc.Reply(11, kc.Responded(False)), kc.Reply(12, kc.Responded(False)),
                                                 kc.Reply(13, kc.Responded(False))],
                             "no request with tokens 5 and 6 was given to this connection")
            s.close()

    def test_topics_compared_byte_for_byte(self) -> None:
        with self.daemon.client() as sub, self.daemon.client() as pub:
            subs = [sub.subscribe(t) for t in ("Case", "t" * 255, "é" * 127, "a/b", "a b.c")]
            counts = [pub.publish(t, t.encode()) for t in ("case", "a/b ", "a", "a b.c", "Case", "é" * 127, "t" * 255)]
            self.assertEqual(counts, [0, 0, 0, 1, 1, 1, 1])
            got = [sub.next_event() for _ in range(4)]
            self.assertEqual(sorted((f.stream, f.event.topic) for f in got),  # type: ignore[union-attr]
                             sorted([(subs[4].sid, "a b.c"), (subs[0].sid, "Case"), (subs[2].sid, "é" * 127),
                                     (subs[1].sid, "t" * 255)]))

    def test_pipelining_1000_requests_in_one_write(self) -> None:
        with self.daemon.client() as c:
            c.subscribe("pipe")
            kinds: List[Any] = [kc.RequestKind.Ping, kc.StatusRequest(), kc.Publish("pipe", b"p"),
                                kc.Subscribe(0, "pipe"), kc.Subscribe(99, ""), kc.Unsubscribe(2 ** 64 - 1),
                                kc.TopicsRequest(), kc.RequestTo("nobody.serves", 0, b""), kc.Unserve("nope")]
            specs = [kinds[i % len(kinds)] for i in range(1000)]
            ids = [(i * 7919 + 12345) * 1_000_003 % (2 ** 64) for i in range(1000)]  # distinct, scrambled
            self.assertEqual(len(set(ids)), 1000)
            c.send_many(specs, ids)  # the low-level path checks neither subjects nor sids
            replies = [c.wait_reply(rid) for rid in ids]
            expected = {kc.StatusRequest: kc.Status, kc.Publish: kc.Published, kc.Unsubscribe: kc.Unsubscribed,
                        kc.TopicsRequest: kc.TopicList, kc.Unserve: kc.Unserved}
            errors = {kc.Subscribe(0, "pipe"): 1003, kc.Subscribe(99, ""): 1000,
                      kc.RequestTo("nobody.serves", 0, b""): 1004}
            for rid, spec, reply in zip(ids, specs, replies):
                self.assertEqual(reply.id, rid)  # type: ignore[union-attr]
                if spec == kc.RequestKind.Ping:
                    self.assertIsInstance(reply, kc.Ack)
                elif spec in errors:
                    self.assertIsInstance(reply, kc.Error)
                    self.assertEqual(reply.code, errors[spec])  # type: ignore[union-attr]
                else:
                    self.assertIsInstance(reply.reply, expected[type(spec)])  # type: ignore[union-attr]
                    if isinstance(spec, kc.Publish):
                        self.assertEqual(reply.reply.receivers, 1)  # type: ignore[union-attr]
            n_pub = sum(isinstance(s, kc.Publish) for s in specs)
            sub = c.subscriptions[1]
            seqs = [sub.next().sequence for _ in range(n_pub)]
            self.assertEqual(seqs, list(range(seqs[0], seqs[0] + n_pub)))
            c.ping()

    def test_long_pipeline_reads_while_it_writes(self) -> None:
        """30000 pings (360 kB) in one write, 360 kB of Acks back: more than
        both socket buffers hold, so the client must read while it writes."""
        with self.daemon.client() as c:
            t0 = time.monotonic()
            ids = c.send_many([kc.RequestKind.Ping] * 30000)
            for rid in ids:
                self.assertEqual(c.wait_reply(rid), kc.Ack(rid))
            self.assertLess(time.monotonic() - t0, 20)

    def test_duplicate_ids_are_allowed(self) -> None:
        with self.daemon.client() as c:
            c.send_many([kc.RequestKind.Ping, kc.StatusRequest(), kc.RequestKind.Ping], ids=[7, 7, 7])
            self.assertEqual(c.wait_reply(7), kc.Ack(7))
            self.assertIsInstance(c.wait_reply(7), kc.Reply)
            self.assertEqual(c.wait_reply(7), kc.Ack(7))

    def test_handshake_and_requests_in_one_write(self) -> None:
        s = self.daemon.raw()
        s.sendall(bytes(kc.encode_handshake(self.daemon.token())) + ping_frame(1) + call_frame(2, kc.StatusRequest()))
        w, ack, rep = read_frames(s, 3)
        self.assertIsInstance(w, kc.Welcome)
        self.assertEqual(ack, kc.Ack(1))
        self.assertIsInstance(rep, kc.Reply)
        self.assertIsInstance(rep.reply, kc.Status)  # type: ignore[union-attr]
        s.close()
        with self.daemon.client(early=[kc.RequestKind.Ping, kc.StatusRequest(), kc.Subscribe(4, "early")]) as c:
            self.assertIsNone(c.result(1))
            self.assertIsInstance(c.result(2), kc.Status)
            self.assertEqual(c.result(3), kc.Subscribed())
            self.assertEqual(sorted(c.subscriptions), [4], "an early Subscribe's route is in place")
            self.assertEqual(c.send(kc.RequestKind.Ping), 4)
            with self.assertRaises(kc.RequestTooLarge):  # early requests must fit the smallest limit, 1024
                self.daemon.client(early=[kc.Publish("t", bytes(1024))])

    def test_subject_limits(self) -> None:
        with self.daemon.client() as c:
            c.subscribe("t" * 255)
            c.subscribe("é" * 127)  # 254 bytes of UTF-8
            for call in (c.subscribe, lambda t: c.publish(t, b"x"), c.serve, c.unserve, lambda t: c.request(t)):
                for topic in ("", "t" * 256, "é" * 128, "a..b", "a*"):
                    with self.assertRaises(kc.TopicError):
                        call(topic)  # refused before sending
            for call in (kc.Subscribe(1000, "t" * 256), kc.Publish("é" * 128, b"x"), kc.Serve(""),
                         kc.Publish("", b""), kc.Publish("a.*", b""), kc.Serve("svc.>"),
                         kc.RequestTo("", 0, b""), kc.RequestTo("svc.*", 0, b""), kc.Subscribe(1001, "a.>.b"),
                         # Section 14: Unserve refuses a name that is not a valid subject, as Serve does.
                         kc.Unserve("a..b"), kc.Unserve(""), kc.Unserve("a.*"), kc.Unserve("svc.>"),
                         kc.Unserve("x" * 300), kc.Unserve("é" * 128), kc.Unserve("a*")):
                with self.subTest(call=call):
                    # The low-level path sends it: the hub answers 1000 with the id.
                    f = c.wait_reply(c.send(call))
                    self.assertIsInstance(f, kc.Error)
                    err = kc.KeyholeError.from_frame(f)  # type: ignore[arg-type]
                    self.assertIsInstance(err, kc.InvalidTopicError)
                    self.assertEqual((err.code, err.closes, err.id), (1000, False, f.id))
            # A valid name it does not serve is answered Unserved.
            for name in ("never.served", "t" * 255, "é" * 127):
                with self.subTest(unserve=name[:8]):
                    self.assertEqual(c.call(kc.Unserve(name)), kc.Unserved())
            self.assertEqual(sorted(c.subscriptions), [1, 2], "refused subscriptions leave no route")
            c.ping()

    def test_subjects_agree_with_the_daemon(self) -> None:
        """The client's check_subject and the hub's InvalidTopic agree on
        every entry of a table (each text sent as a topic, a pattern and a name)."""
        texts = ["a", "a.b", "*", ">", "a.*", "a.>", "*.>", "a.*.c", "*.*.*", "a*", "a>", ">.a", "a.>.b",
                 "a..b", ".a", "a.", ".", "", "x" * 255, "x" * 256, "é" * 127, "é" * 128, "a b", "a/b",
                 "**", "*>", "a.**", ">>", "a.*b", "a.b*", "$SYS.x", "\ufeff", "a\tb", "A.B"]
        sid = 10_000
        with self.daemon.client() as c:
            for text in texts:
                for kind in kc.SUBJECT_KINDS:
                    sid += 1
                    call = {"topic": kc.Publish(text, b""), "pattern": kc.Subscribe(sid, text),
                            "name": kc.Serve(text)}[kind]
                    f = c.wait_reply(c.send(call))
                    try:
                        kc.check_subject(text, kind)
                        ours = True
                    except kc.TopicError:
                        ours = False
                    with self.subTest(text=text[:12], kind=kind):
                        self.assertEqual(isinstance(f, kc.Reply), ours, f)
                        if not ours:
                            self.assertEqual(f.code, 1000)  # type: ignore[union-attr]

    def test_errors_with_an_id_keep_the_connection(self) -> None:
        with self.daemon.client() as c:
            cases = [(kc.Request(100, kc.RequestKind.Ping, extra=b"\x00"), kc.BadRequestError),
                     (kc.Request(101, kc.RequestKind.Shutdown, extra=b"junk"), kc.BadRequestError),
                     (kc.Request(102, kc.RequestKind.Call), kc.BadRequestError),
                     (kc.Request(103, kc.RequestKind.Call, kc.StatusRequest(), b"\x00"), kc.BadRequestError),
                     (kc.Request(104, 6), kc.UnknownRequestError),
                     (kc.Request(105, 7, extra=b"anything at all"), kc.UnknownRequestError),
                     (kc.Request(106, 0xFFFFFFFF), kc.UnknownRequestError),
                     (kc.Request(107, kc.RequestKind.Call, kc.Subscribe(1, "")), kc.InvalidTopicError),
                     (kc.Request(108, kc.RequestKind.Call, kc.Subscribe(0, "a")), kc.SidInUseError),
                     (kc.Request(109, kc.RequestKind.Call, kc.Serve("a.*")), kc.InvalidTopicError),
                     (kc.Request(110, kc.RequestKind.Call, kc.RequestTo("x.>", 0, b"")), kc.InvalidTopicError),
                     (kc.Request(111, kc.RequestKind.Call, kc.RequestTo("nobody.serves.this", 0, b"")),
                      kc.NoRespondersError),
                     (kc.Request(112, kc.RequestKind.AcceptFds, extra=b"\x00"), kc.BadRequestError),
                     # Before AcceptFds, a CallFds is 17 whatever its fds field says (section 19.1).
                     (kc.Request(113, kc.RequestKind.CallFds, kc.StatusRequest(), announced=0),
                      kc.DescriptorsNotAcceptedError),
                     (kc.Request(114, kc.RequestKind.CallFds, kc.StatusRequest(), announced=1),
                      kc.DescriptorsNotAcceptedError)]
            c.send_many([r for r, _ in cases])
            for req, cls in cases:
                with self.subTest(req=req), self.assertRaises(cls) as ctx:
                    c.result(req.id)
                self.assertEqual(ctx.exception.id, req.id)
                self.assertFalse(ctx.exception.closes)
            self.assertIsInstance(c.status(), kc.Status)
            self.assertIsNone(self.daemon.proc.poll(), "a Shutdown with a body shuts nothing down")  # type: ignore

    def test_malformed_closes_and_the_client_reports_it(self) -> None:
        with self.daemon.client() as c:
            c.sock.sendall(bytes.fromhex(NEGATIVE["malformed_too_short"]["hex"]))
            with self.assertRaises(kc.MalformedError) as ctx:
                # The daemon may have closed before the Ping is written: then
                # the failed write reads and raises its Error (section 9).
                c.wait_reply(c.send(kc.RequestKind.Ping))
            self.assertTrue(ctx.exception.closes)
            self.assertIsNone(ctx.exception.id)
            with self.assertRaises(kc.ConnectionClosed) as ctx2:
                c.next_event()
            self.assertEqual(ctx2.exception.final_frame.code, kc.ErrorCode.Malformed)  # type: ignore[union-attr]

    def test_client_event_queue_bound_against_the_daemon(self) -> None:
        with self.daemon.client(max_queued_event_bytes=1000) as sub, self.daemon.client() as pub:
            s = sub.subscribe("bounded")
            for i in range(60):
                self.assertEqual(pub.publish("bounded", b"%03d" % i + bytes(40)), 1)
            with self.assertRaises(kc.EventQueueFull):
                sub.ping()
            self.assertFalse(sub.closed)
            got = [s.next() for _ in range(60)]
            self.assertEqual([e.payload[:3] for e in got], [b"%03d" % i for i in range(60)])
            sub.ping()  # its Ack was waiting behind the events


class HubLimitTests(unittest.TestCase):
    """Section 14: at most 4096 subscriptions and 256 names per connection;
    sids are not 0 and unique among a connection's subscriptions."""

    def test_the_4097th_subscription_is_refused_with_1002(self) -> None:
        with Daemon() as d, d.client() as c, d.client() as other:
            n = kc.MAX_SUBSCRIPTIONS
            replies = c.pipeline([kc.Subscribe(i + 1, f"t{i}") for i in range(n)])
            self.assertEqual({type(r.reply) for r in replies}, {kc.Subscribed})  # type: ignore[union-attr]
            # Raw frames: 1002 with the request's id, and the connection stays open.
            rids = c.send_many([kc.Subscribe(n + 1, f"t{n}"), kc.Subscribe(n + 2, "t5"), kc.RequestKind.Ping],
                               ids=[15, 16, 17])
            err, again, ack = [c.wait_reply(r) for r in rids]
            self.assertIsInstance(err, kc.Error)
            self.assertEqual((err.code, err.id), (1002, 15))  # type: ignore[union-attr]
            self.assertEqual((again.code, again.id), (1002, 16),  # type: ignore[union-attr]
                             "a pattern already subscribed is one more subscription too")
            self.assertEqual(ack, kc.Ack(17))
            # The high-level call raises the hub's error class; nothing changed.
            with self.assertRaises(kc.TooManySubscriptionsError) as ctx:
                c.subscribe("one-more")
            self.assertEqual((ctx.exception.code, ctx.exception.service_code, ctx.exception.closes), (1002, 2, False))
            self.assertIsNotNone(ctx.exception.id)
            self.assertFalse(c.closed)
            self.assertEqual(len(c.subscriptions), n)
            st = other.status()
            self.assertEqual((st.topics, st.subscriptions), (n, n))
            self.assertEqual(other.publish("one-more", b"nobody"), 0, "c did not get the subscription")
            self.assertEqual(other.publish("t7", b"seven"), 1)
            self.assertEqual(c.subscriptions[8].next().payload, b"seven")
            # The cap is per connection, and unsubscribing makes room.
            other.subscribe("one-more")
            c.unsubscribe(1)
            c.subscribe("one-more")
            with self.assertRaises(kc.TooManySubscriptionsError):
                c.subscribe("t0")
            st = other.status()
            self.assertEqual((st.topics, st.subscriptions), (n, n + 1))
            # When a connection closes, its subscriptions go with it.
            c.close()
            wait_for(lambda: other.status().subscriptions == 1, "c's subscriptions to go")
            self.assertEqual(other.status().topics, 1)

    def test_sid_in_use_is_refused_with_1003(self) -> None:
        with Daemon() as d, d.client() as c, d.client() as other:
            a = c.subscribe("a", sid=1)
            rids = c.send_many([kc.Subscribe(0, "b"), kc.Subscribe(1, "b"), kc.Subscribe(1, "a")], ids=[16, 17, 18])
            for rid in rids:
                f = c.wait_reply(rid)
                self.assertEqual((f.code, f.id), (1003, rid))  # type: ignore[union-attr]
            with self.assertRaises(kc.SidInUseError):
                c.call(kc.Subscribe(1, "c"))
            self.assertEqual(other.status().subscriptions, 1, "nothing changed")
            self.assertEqual(other.publish("b", b""), 0)
            self.assertEqual(other.publish("a", b"one"), 1)
            self.assertEqual(a.next(), kc.Message("a", 1, b"one"), "the live subscription still has its route")
            # Another connection may use the same sid: sids are per connection.
            o = other.subscribe("a", sid=1)
            self.assertEqual(c.publish("a", b"two"), 2)
            self.assertEqual((a.next().payload, o.next().payload), (b"two", b"two"))
            # Once ended, a sid may be used again.
            c.unsubscribe(a)
            b = c.subscribe("b", sid=1)
            self.assertEqual(other.publish("b", b"bee"), 1)
            self.assertEqual(b.next(), kc.Message("b", 1, b"bee"))

    def test_the_257th_name_is_refused_with_1006(self) -> None:
        with Daemon() as d, d.client() as c, d.client() as other:
            replies = c.pipeline([kc.Serve(f"svc.{i}") for i in range(kc.MAX_NAMES)])
            self.assertEqual({type(r.reply) for r in replies}, {kc.Serving})  # type: ignore[union-attr]
            self.assertEqual(c.call(kc.Serve("svc.0")), kc.Serving(), "serving a name it serves changes nothing")
            with self.assertRaises(kc.TooManyNamesError) as ctx:
                c.serve("svc.one-more")
            self.assertEqual((ctx.exception.code, ctx.exception.closes), (1006, False))
            self.assertEqual(other.status().names, kc.MAX_NAMES)
            with self.assertRaises(kc.NoRespondersError):
                other.request("svc.one-more", b"")
            c.unserve("svc.0")
            c.serve("svc.one-more")
            self.assertEqual(other.status().names, kc.MAX_NAMES)


class RequestReplyTests(unittest.TestCase):
    """Section 14, request/reply, between Python clients on one daemon (a
    fresh one per test, with a 4096-byte frame limit so that replies can be
    too large): every outcome of a Request, what the responder sees, the
    hub's limits on requests."""

    LIMIT = 4096

    def setUp(self) -> None:
        self.d = Daemon("--max-frame-len", str(self.LIMIT))
        self.addCleanup(self.d.close)

    def clients(self, n: int) -> List[kc.KeyholeClient]:
        out = [self.d.client() for _ in range(n)]
        for c in out:
            self.addCleanup(c.close)
        return out

    def in_flight(self) -> int:
        with self.d.client() as observer:
            return observer.status().requests_in_flight

    def given(self, requester: kc.KeyholeClient, responder: kc.KeyholeClient, name: str,
              payload: bytes = b"", timeout_ms: int = 10_000) -> Tuple[int, kc.IncomingRequest]:
        """Send a Request; return its Call id and the request as the responder got it."""
        rid = requester.send(kc.RequestTo(name, timeout_ms, payload))
        self.assertEqual(requester.result(rid), kc.Requested())
        incoming = responder.next_request()
        self.assertEqual((incoming.name, incoming.payload), (name, payload))
        return rid, incoming

    def test_reply_with_the_requesters_uid_and_pid(self) -> None:
        responder, requester = self.clients(2)
        responder.serve("svc.clock")
        # The spec's Request (section 15.3), raw: Requested, then the Request
        # event on stream 0 for the responder, then the Response on stream 0.
        rid = requester.send(kc.RequestTo("svc.clock", 2000, b"now?"), id=10)
        self.assertEqual(requester.wait_reply(rid), kc.Reply(10, kc.Requested()))
        f = responder.next_event()
        assert isinstance(f, kc.Event) and isinstance(f.event, kc.IncomingRequest), f
        self.assertEqual(f.stream, 0)
        incoming = f.event
        self.assertEqual((incoming.name, incoming.uid, incoming.pid, incoming.payload),
                         ("svc.clock", os.geteuid(), os.getpid(), b"now?"), "the requester's uid and pid")
        self.assertEqual(self.in_flight(), 1)
        self.assertEqual(responder.call(kc.Respond(incoming.token, b"12:00")), kc.Responded(True))
        self.assertEqual(requester.next_event(), kc.Event(0, kc.Response(10, kc.OutcomeReply(b"12:00"))))
        self.assertEqual(self.in_flight(), 0)
        # Another process's request: the responder sees that process's pid.
        proc = subprocess.Popen([KEYHOLE, "req", "svc.clock", "now?"], env={**os.environ, **self.d.env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            incoming = responder.next_request()
            self.assertEqual((incoming.uid, incoming.pid, incoming.payload), (os.geteuid(), proc.pid, b"now?"))
            self.assertTrue(responder.respond(incoming.token, b"12:00"))
            out, err = proc.communicate(timeout=IO_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.assertEqual((proc.returncode, out), (0, b"12:00"), err)
        # The high-level call, with the responder in a thread: requests up to
        # the largest whose event fits (48 + t + p bytes), replies up to the
        # largest whose Response fits (36 + p bytes).
        def pattern(n: int) -> bytes:
            return bytes(i % 251 for i in range(n))

        largest_request = self.LIMIT - 48 - len("svc.sized")
        asked = [b"00000", b"00001" + bytes(100), b"01000" + bytes(largest_request - 5),
                 b"%05d" % (self.LIMIT - 36)]  # the first 5 bytes: the size of the reply asked for
        with Responder(self.d, "svc.sized", lambda q: pattern(int(q.payload[:5]))) as sized:
            for payload in asked:
                self.assertEqual(requester.request("svc.sized", payload, timeout=5), pattern(int(payload[:5])))
        self.assertEqual([q.payload for q in sized.seen], asked)
        self.assertEqual(sized.delivered, [True] * len(asked))
        self.assertEqual(len({q.token for q in sized.seen}), len(asked), "one token per request")

    def test_no_responders_is_answered_at_once(self) -> None:
        requester, responder = self.clients(2)
        t0 = time.monotonic()
        with self.assertRaises(kc.NoRespondersError) as ctx:
            requester.request("svc.nobody", b"anyone?", timeout=30)
        self.assertLess(time.monotonic() - t0, 1.0, "not after the request's timeout")
        e = ctx.exception
        self.assertEqual((e.code, e.closes, e.request_id, e.requested_name), (1004, False, e.id, "svc.nobody"))
        responder.serve("svc.gone")
        responder.unserve("svc.gone")
        with self.assertRaises(kc.NoRespondersError):
            requester.request("svc.gone", b"")
        responder.serve("svc.gone")
        responder.close()
        wait_for(lambda: requester.topics().names == (), "the responder's names to go with it")
        with self.assertRaises(kc.NoRespondersError):
            requester.request("svc.gone", b"")
        with self.assertRaises(kc.KeyholeTimeout):
            requester.next_event(timeout=0.2)  # a refused request gets no Response
        self.assertFalse(requester.closed)

    def test_responder_gone_before_it_answers(self) -> None:
        requester, responder, other = self.clients(3)
        responder.serve("svc.gone")
        rid, _ = self.given(requester, responder, "svc.gone")
        t0 = time.monotonic()
        responder.close()
        self.assertEqual(requester.wait_response(rid), kc.Response(rid, kc.OutcomeResponderGone()))
        self.assertLess(time.monotonic() - t0, 2.0, "at once, not at the request's timeout (10 s)")
        self.assertEqual(self.in_flight(), 0)
        # Requests given before an Unserve are still the responder's: it
        # leaving ends them with ResponderGone too; the high-level call raises.
        other.serve("svc.gone")
        rid, _ = self.given(requester, other, "svc.gone")
        other.unserve("svc.gone")
        with Responder(self.d, "svc.bye", lambda q: None):  # it hangs up instead of answering
            with self.assertRaises(kc.ResponderGoneError) as ctx:
                requester.request("svc.bye", b"", timeout=10)
        self.assertEqual(ctx.exception.requested_name, "svc.bye")
        other.close()
        self.assertEqual(requester.wait_response(rid), kc.Response(rid, kc.OutcomeResponderGone()))

    def test_timeout(self) -> None:
        requester, responder = self.clients(2)
        responder.serve("svc.slow")
        t0 = time.monotonic()
        rid, incoming = self.given(requester, responder, "svc.slow", b"q", timeout_ms=300)
        t1 = time.monotonic()  # the Requested reply: the daemon handled the Request by now
        self.assertEqual(requester.wait_response(rid), kc.Response(rid, kc.OutcomeTimeout()))
        elapsed = time.monotonic() - t0
        self.assertGreaterEqual(elapsed, 0.3, "counted from when the daemon handles the Request")
        self.assertLess(time.monotonic() - t1, 0.3 + 0.25, "sent within a few milliseconds of the deadline")
        self.assertEqual(self.in_flight(), 0)
        # The late answer reaches nobody: delivered false, and no second Response.
        self.assertFalse(responder.respond(incoming.token, b"late"))
        self.assertFalse(responder.fail(incoming.token, "late"))
        with self.assertRaises(kc.KeyholeTimeout):
            requester.next_event(timeout=0.2)
        # The high-level call raises the outcome, not the client's own timeout.
        t0 = time.monotonic()
        with self.assertRaises(kc.RequestTimeout) as ctx:
            requester.request("svc.slow", b"q", timeout=0.25)
        self.assertNotIsInstance(ctx.exception, kc.KeyholeTimeout)
        self.assertGreaterEqual(time.monotonic() - t0, 0.25)
        self.assertEqual(responder.next_request().payload, b"q", "the responder did get it")
        # timeout_ms 0 means 30 seconds, not "at once".
        rid, incoming = self.given(requester, responder, "svc.slow", b"zero", timeout_ms=0)
        with self.assertRaises(kc.KeyholeTimeout):
            requester.wait_response(rid, timeout=0.5)
        self.assertEqual(self.in_flight(), 1)
        self.assertTrue(responder.respond(incoming.token, b"in time"))
        self.assertEqual(requester.wait_response(rid), kc.Response(rid, kc.OutcomeReply(b"in time")))

    def test_reply_too_large(self) -> None:
        """A reply whose Response (36 + p bytes) would be over the frame
        limit: a Respond of it is refused with TooLarge (1007) and the
        requester gets ReplyTooLarge with the reply's length; or the
        responder says so itself with Fail{ReplyTooLarge}."""
        requester, responder = self.clients(2)
        responder.serve("svc.big")
        largest = self.LIMIT - 36
        rid, incoming = self.given(requester, responder, "svc.big")
        self.assertTrue(responder.respond(incoming.token, bytes(largest)))
        self.assertEqual(requester.wait_response(rid), kc.Response(rid, kc.OutcomeReply(bytes(largest))))
        for p in (largest + 1, largest + 4):  # a Respond of 32 + p bytes still fits the frame limit
            rid, incoming = self.given(requester, responder, "svc.big")
            with self.assertRaises(kc.TooLargeError) as ctx:
                responder.call(kc.Respond(incoming.token, bytes(p)))
            self.assertEqual((ctx.exception.code, ctx.exception.closes), (1007, False))
            self.assertEqual(requester.wait_response(rid), kc.Response(rid, kc.OutcomeReplyTooLarge(p)))
            self.assertEqual(self.in_flight(), 0, "the request has ended")
            self.assertFalse(responder.respond(incoming.token, b"small"), "the request has ended")
            self.assertEqual(responder.call(kc.Respond(incoming.token, bytes(p))), kc.Responded(False),
                             "an ended request: the token is checked first, no 1007")
        # The token is checked first: a too-large Respond to a request given to
        # another connection, or to no request at all, is Responded{false}.
        other = self.d.client()
        self.addCleanup(other.close)
        rid, incoming = self.given(requester, responder, "svc.big")
        for who, token in ((other, incoming.token), (requester, incoming.token), (responder, incoming.token ^ 0xFFFF)):
            self.assertEqual(who.call(kc.Respond(token, bytes(largest + 1))), kc.Responded(False))
        self.assertEqual(self.in_flight(), 1, "still waiting for its own responder")
        self.assertTrue(responder.respond(incoming.token, b"fits"))
        self.assertEqual(requester.wait_response(rid), kc.Response(rid, kc.OutcomeReply(b"fits")))
        # respond() sends Fail{ReplyTooLarge} for a reply that does not fit (section 16 step 14).
        rid, incoming = self.given(requester, responder, "svc.big")
        self.assertTrue(responder.respond(incoming.token, bytes(20000)))
        self.assertEqual(requester.wait_response(rid), kc.Response(rid, kc.OutcomeReplyTooLarge(20000)))
        # The length in a Fail is passed on as it is.
        for length in (20000000, 0, 2 ** 64 - 1):
            rid, incoming = self.given(requester, responder, "svc.big")
            self.assertTrue(responder.fail_reply_too_large(incoming.token, length))
            with self.assertRaises(kc.ReplyTooLargeError) as ctx2:
                kc.outcome_result(requester.wait_response(rid))
            self.assertEqual(ctx2.exception.len, length)
        # A Request whose event (48 + t + p bytes) would not fit: TooLarge, nothing sent.
        fits = self.LIMIT - 48 - len("svc.big")
        rid, incoming = self.given(requester, responder, "svc.big", bytes(fits))
        self.assertTrue(responder.respond(incoming.token, b""))
        with self.assertRaises(kc.TooLargeError):
            requester.request("svc.big", bytes(fits + 1))
        with self.assertRaises(kc.KeyholeTimeout):
            responder.next_request(timeout=0.2)

    def test_failed(self) -> None:
        requester, responder = self.clients(2)
        responder.serve("svc.fail")
        rid, incoming = self.given(requester, responder, "svc.fail")
        self.assertEqual(responder.call(kc.Fail(incoming.token, kc.FailureFailed("no clock"))), kc.Responded(True))
        self.assertEqual(requester.wait_response(rid), kc.Response(rid, kc.OutcomeFailed("no clock")))
        self.assertFalse(responder.fail(incoming.token, "again"), "a request ends once")
        # A message over 512 bytes is cut to 512, at a character boundary.
        cases = {"": 0, "x" * 512: 512, "x" * 513: 512, "x" * 600: 512, "a" + "é" * 300: 511, "é" * 300: 512,
                 "€" * 200: 510, "a€" + "€" * 200: 511, "😀" * 200: 512, "ab" + "😀" * 200: 510, "abc" + "😀" * 200: 511}
        for message, cut in cases.items():
            with self.subTest(length=len(message.encode()), cut=cut):
                rid, incoming = self.given(requester, responder, "svc.fail")
                self.assertTrue(responder.fail(incoming.token, message))
                with self.assertRaises(kc.RequestFailed) as ctx:
                    kc.outcome_result(requester.wait_response(rid))
                got = ctx.exception.message
                expected = message
                while len(expected.encode()) > 512:
                    expected = expected[:-1]
                self.assertEqual(got, expected, "its longest start of at most 512 bytes on a character boundary")
                self.assertEqual(len(got.encode()), cut)
        with Responder(self.d, "svc.fail2", lambda q: kc.FailureFailed("out of order")):
            with self.assertRaises(kc.RequestFailed) as ctx:
                requester.request("svc.fail2", b"", timeout=5)
        self.assertEqual(ctx.exception.message, "out of order")

    def test_answers_from_elsewhere_go_nowhere(self) -> None:
        """Only the connection a request was given to can answer it."""
        requester, responder, other = self.clients(3)
        responder.serve("svc.x")
        other.serve("svc.y")
        rid, incoming = self.given(requester, responder, "svc.x")
        self.assertFalse(other.respond(incoming.token, b"forged"))
        self.assertFalse(other.fail(incoming.token, "forged"))
        self.assertFalse(requester.respond(incoming.token, b"forged"), "not even the requester")
        self.assertFalse(responder.respond(incoming.token ^ 0xFFFF, b"unknown token"))
        self.assertTrue(responder.respond(incoming.token, b"real"))
        self.assertEqual(requester.wait_response(rid), kc.Response(rid, kc.OutcomeReply(b"real")))
        self.assertEqual(requester.queued_events, 0, "exactly one Response")
        # A requester that leaves forgets its request: it is no longer in
        # flight, and an answer to it goes nowhere.
        leaving = self.d.client()
        _, forgotten = self.given(leaving, responder, "svc.x")
        self.assertEqual(self.in_flight(), 1)
        leaving.close()
        wait_for(lambda: self.in_flight() == 0, "the requester's request to be forgotten")
        self.assertFalse(responder.respond(forgotten.token, b"to nobody"))

    def test_requests_in_flight_are_routed_by_call_id(self) -> None:
        """Several requests in flight, to several names (one served by the
        requester itself), answered in another order."""
        requester, a, b = self.clients(3)
        a.serve("svc.a")
        b.serve("svc.b")
        requester.serve("svc.self")
        ids = requester.send_many([kc.RequestTo(n, 10_000, n.encode()) for n in ("svc.a", "svc.b", "svc.self")])
        self.assertEqual([requester.result(i) for i in ids], [kc.Requested()] * 3)
        mine = requester.next_request()
        ia, ib = a.next_request(), b.next_request()
        self.assertEqual(mine.pid, os.getpid())
        self.assertTrue(b.respond(ib.token, b"B"))
        self.assertTrue(requester.respond(mine.token, b"SELF"))
        self.assertTrue(a.fail(ia.token, "A"))
        self.assertEqual(requester.wait_response(ids[0]), kc.Response(ids[0], kc.OutcomeFailed("A")))
        self.assertEqual(requester.wait_response(ids[2]), kc.Response(ids[2], kc.OutcomeReply(b"SELF")))
        self.assertEqual(requester.wait_response(ids[1]), kc.Response(ids[1], kc.OutcomeReply(b"B")))

    def next_of(self, members: Sequence[kc.KeyholeClient]) -> Tuple[int, kc.IncomingRequest]:
        """The next request given to any of ``members``: (its index, the request)."""
        deadline = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < deadline:
            for i, m in enumerate(members):
                try:
                    return i, m.next_request(timeout=0.01)
                except kc.KeyholeTimeout:
                    pass
        raise AssertionError("no member was given the request")

    def take(self, requester: kc.KeyholeClient, members: Sequence[kc.KeyholeClient], name: str, n: int) -> List[int]:
        """Send ``n`` requests to ``name`` one after the other; each is
        answered by the member it went to. Returns their indexes in
        ``members``; the tokens are collected in ``self.tokens``."""
        takers = []
        for _ in range(n):
            rid = requester.send(kc.RequestTo(name, 10_000, b""))
            self.assertEqual(requester.result(rid), kc.Requested())
            who, incoming = self.next_of(members)
            takers.append(who)
            self.tokens.append(incoming.token)
            self.assertTrue(members[who].respond(incoming.token, b""))
            requester.wait_response(rid)
        return takers

    def test_round_robin_takes_the_members_in_the_order_they_joined(self) -> None:
        """Section 14: the members take turns in the order they joined, each
        request going to the member after the one the previous request went
        to; a member that joins last gets its first request when the turn
        comes round; one that leaves and serves again joins at the end. The
        turn is per name."""
        requester, m0, m1, m2 = self.clients(4)
        members = [m0, m1, m2]
        self.tokens: List[int] = []
        for m in (m0, m1, m2):
            m.serve("svc.order")
        self.assertEqual(self.take(requester, members, "svc.order", 7), [0, 1, 2, 0, 1, 2, 0])
        for m in (m2, m0):
            m.serve("svc.late")
        self.assertEqual(self.take(requester, members, "svc.late", 3), [2, 0, 2])
        m1.serve("svc.late")  # joins last: its turn comes after m0's
        self.assertEqual(self.take(requester, members, "svc.late", 4), [0, 1, 2, 0])
        for m in (m0, m1, m2):
            m.serve("svc.rejoin")
        m0.unserve("svc.rejoin")
        m0.serve("svc.rejoin")  # now the last to have joined
        self.assertEqual(self.take(requester, members, "svc.rejoin", 4), [1, 2, 0, 1])
        # Each name has its own turn, even for the same members.
        for m in (m0, m1):
            m.serve("svc.g")
            m.serve("svc.h")
        self.assertEqual([self.take(requester, members, n, 1)[0] for n in ("svc.g", "svc.h", "svc.g", "svc.h")],
                         [0, 0, 1, 1])
        self.assertEqual(len(set(self.tokens)), len(self.tokens), "a token per request, over every name and member")

    def test_round_robin_and_unserve(self) -> None:
        requester, r1, r2 = self.clients(3)
        members = [r1, r2]
        for m in members:
            m.serve("svc.rr")
        self.assertEqual(requester.topics().names, (("svc.rr", 2),))
        takers = []
        for i in range(6):
            rid = requester.send(kc.RequestTo("svc.rr", 10_000, b"%d" % i))
            self.assertEqual(requester.result(rid), kc.Requested())
            who, incoming = self.next_of(members)
            takers.append(who)
            self.assertEqual(incoming.payload, b"%d" % i)
            self.assertTrue(members[who].respond(incoming.token, b"ok"))
            self.assertEqual(kc.outcome_result(requester.wait_response(rid)), b"ok")
        self.assertEqual(sorted(takers), [0, 0, 0, 1, 1, 1])
        self.assertTrue(all(takers[i] != takers[i + 1] for i in range(5)), f"members take turns: {takers}")
        self.assertEqual((r1.queued_requests, r2.queued_requests), (0, 0), "each request went to one member")
        # After Unserve a member gets no more; a request it holds stays its to answer.
        held = requester.send(kc.RequestTo("svc.rr", 10_000, b"held"))
        requester.result(held)
        who, kept = self.next_of(members)
        members[who].unserve("svc.rr")
        self.assertEqual(requester.topics().names, (("svc.rr", 1),))
        for _ in range(3):
            rid = requester.send(kc.RequestTo("svc.rr", 10_000, b""))
            requester.result(rid)
            other, incoming = self.next_of(members)
            self.assertNotEqual(other, who)
            members[other].respond(incoming.token, b"")
            requester.wait_response(rid)
        self.assertTrue(members[who].respond(kept.token, b"after unserve"))
        self.assertEqual(kc.outcome_result(requester.wait_response(held)), b"after unserve")

    def test_busy_at_256_requests_in_flight(self) -> None:
        """Section 14: a member with 256 requests in flight is skipped; when
        every member is full, Busy (1005). The 256 count per responder
        connection, over all the names it serves."""
        requester, r1, r2 = self.clients(3)
        r1.serve("svc.full")
        r1.serve("svc.other")
        n = kc.MAX_IN_FLIGHT_PER_RESPONDER
        replies = requester.pipeline([kc.RequestTo("svc.full", 60_000, b"") for _ in range(n)])
        self.assertEqual({type(f.reply) for f in replies}, {kc.Requested})  # type: ignore[union-attr]
        self.assertEqual(self.in_flight(), n)
        rids = requester.send_many([kc.RequestTo("svc.full", 60_000, b""), kc.RequestTo("svc.other", 60_000, b"")])
        for rid in rids:
            f = requester.wait_reply(rid)
            self.assertEqual((type(f), f.code, f.id), (kc.Error, 1005, rid))  # type: ignore[union-attr]
        with self.assertRaises(kc.BusyError) as ctx:
            requester.request("svc.full", b"")
        self.assertEqual((ctx.exception.closes, ctx.exception.requested_name), (False, "svc.full"))
        # A new member takes the next one; an answer makes room again.
        r2.serve("svc.full")
        rid, _ = self.given(requester, r2, "svc.full")
        first = r1.next_request()
        self.assertTrue(r1.respond(first.token, b""))
        self.assertEqual(kc.outcome_result(requester.wait_response(replies[0].id)), b"")  # type: ignore
        r2.unserve("svc.full")
        self.assertEqual(requester.result(requester.send(kc.RequestTo("svc.full", 60_000, b""))), kc.Requested())
        # The responder leaving ends all of its requests with ResponderGone.
        r1.close()
        outcomes = [requester.wait_response(f.id).outcome for f in replies[1:]]  # type: ignore[union-attr]
        self.assertEqual(set(map(type, outcomes)), {kc.OutcomeResponderGone})

    def test_timed_out_requests_stop_counting(self) -> None:
        """Section 14: a request stops counting against its responder's 256
        when it times out, and no longer counts in requests_in_flight, though
        its responder may still answer it (delivered: false). Tokens are
        distinct for every request."""
        requester, responder = self.clients(2)
        responder.serve("svc.t1")
        responder.serve("svc.t2")
        n = kc.MAX_IN_FLIGHT_PER_RESPONDER
        specs = [kc.RequestTo("svc.t1" if i % 2 else "svc.t2", 400, b"%d" % i) for i in range(n)]
        replies = requester.pipeline(specs)
        self.assertEqual({type(f.reply) for f in replies}, {kc.Requested})  # type: ignore[union-attr]
        with self.assertRaises(kc.BusyError):
            requester.request("svc.t1", b"", timeout=0.4)
        self.assertEqual(self.in_flight(), n)
        outcomes = [requester.wait_response(f.id).outcome for f in replies]  # type: ignore[union-attr]
        self.assertEqual(set(map(type, outcomes)), {kc.OutcomeTimeout})
        self.assertEqual(self.in_flight(), 0, "timed out: no longer in flight")
        given = [responder.next_request() for _ in range(n)]
        self.assertEqual(sorted(q.payload for q in given), sorted(b"%d" % i for i in range(n)))
        rid = requester.send(kc.RequestTo("svc.t1", 10_000, b"fresh"))
        self.assertEqual(requester.result(rid), kc.Requested(), "the timed-out ones left room")
        fresh = responder.next_request()
        self.assertEqual(fresh.payload, b"fresh")
        tokens = [q.token for q in given] + [fresh.token]
        self.assertEqual(len(set(tokens)), n + 1, "a token per request")
        self.assertEqual(requester.status().requests_in_flight, 1)
        self.assertEqual([responder.respond(q.token, b"late") for q in given[:8]], [False] * 8)
        self.assertTrue(responder.respond(fresh.token, b"in time"))
        self.assertEqual(kc.outcome_result(requester.wait_response(rid)), b"in time")
        with self.assertRaises(kc.KeyholeTimeout):
            requester.next_event(timeout=0.2)  # the late answers reached nobody

    def test_requests_of_a_requester_that_left_free_their_slots(self) -> None:
        leaving, responder, other = self.clients(3)
        responder.serve("svc.c")
        n = kc.MAX_IN_FLIGHT_PER_RESPONDER
        leaving.pipeline([kc.RequestTo("svc.c", 60_000, b"") for _ in range(n)])
        with self.assertRaises(kc.BusyError):
            other.request("svc.c", b"")
        leaving.close()
        wait_for(lambda: self.in_flight() == 0, "the forgotten requests")
        rid = other.send(kc.RequestTo("svc.c", 60_000, b"fresh"))
        self.assertEqual(other.result(rid), kc.Requested())
        tokens = [responder.next_request() for _ in range(n + 1)]
        self.assertEqual(tokens[-1].payload, b"fresh")
        self.assertEqual([responder.respond(t.token, b"") for t in tokens], [False] * n + [True])


class WildcardTests(unittest.TestCase):
    """Section 14's patterns against the daemon: `*` matches one token, a
    final `>` one or more; each matching subscription gets its own copy, on
    its own stream, with the concrete topic."""

    PATTERNS = ["*", ">", "a", "a.*", "a.>", "*.b", "a.*.c", "*.*", "*.>", "a.b.>", "*.*.*", "b.*", "a.b"]
    TOPICS = ["a", "b", "a.b", "a.c", "x.b", "a.b.c", "a.x.c", "a.b.c.d", "b.b.b", "ab", "a.bc"]

    def test_patterns_deliver_the_concrete_topic(self) -> None:
        with Daemon() as d, d.client() as sub, d.client() as pub:
            subs = [sub.subscribe(p, sid=100 + i) for i, p in enumerate(self.PATTERNS)]
            self.assertEqual([p for p, _ in pub.topics().patterns], sorted(self.PATTERNS, key=str.encode))
            for i, topic in enumerate(self.TOPICS):
                expected = sum(spec_matches(p, topic) for p in self.PATTERNS)
                with self.subTest(topic=topic):
                    self.assertEqual(pub.publish(topic, b"%d" % i), expected, "receivers: the matching subscriptions")
            for s in subs:
                want = [(t, b"%d" % i) for i, t in enumerate(self.TOPICS) if spec_matches(s.pattern, t)]
                got = []
                for _ in want:
                    m = s.next()
                    assert isinstance(m, kc.Message), m
                    self.assertEqual(m.sequence, 1, "each topic was published once")
                    got.append((m.topic, m.payload))
                with self.subTest(pattern=s.pattern):
                    self.assertEqual(got, want)
            self.assertEqual(sub.queued_events, 0)
            with self.assertRaises(kc.KeyholeTimeout):
                sub.next_event(timeout=0.2)  # nothing else: no subscription got a topic it does not match
            # Sequences are per topic, consecutive within each subscription.
            star = sub.subscribe("s.*")
            exact = sub.subscribe("s.b")
            for t in ("s.a", "s.b", "s.a", "s.c", "s.b"):
                pub.publish(t, b"")
            self.assertEqual([(m.topic, m.sequence) for m in (star.next() for _ in range(5))],  # type: ignore
                             [("s.a", 1), ("s.b", 1), ("s.a", 2), ("s.c", 1), ("s.b", 2)])
            self.assertEqual([(m.topic, m.sequence) for m in (exact.next() for _ in range(2))],  # type: ignore
                             [("s.b", 1), ("s.b", 2)])

    def test_the_rust_cli_subscribes_with_wildcards(self) -> None:
        with Daemon() as d, d.client() as pub:
            proc = subprocess.Popen([KEYHOLE, "sub", "sensors.*.temp", "--count", "2"], env={**os.environ, **d.env},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                wait_for(lambda: pub.status().subscriptions == 1, "the Rust subscriber")
                for t in ("sensors.kitchen.temp", "sensors.temp", "sensors.a.b.temp", "sensors.hall.temp"):
                    pub.publish(t, t.encode())
                out, err = proc.communicate(timeout=IO_TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            self.assertEqual(proc.returncode, 0, err)
            self.assertEqual(out.decode().splitlines(),
                             ["sensors.kitchen.temp 1 sensors.kitchen.temp", "sensors.hall.temp 1 sensors.hall.temp"])


class LagTests(unittest.TestCase):
    """Section 9's drop-oldest policy: a subscriber that stalls loses its
    oldest events, is told how many with Lagged, and stays connected."""

    QUEUE = 65536

    def setUp(self) -> None:
        self.d = Daemon("--max-frame-len", "4096", "--outbound-queue-bytes", str(self.QUEUE))
        self.addCleanup(self.d.close)

    def drain(self, c: kc.KeyholeClient) -> List[Union[kc.Event, kc.Lagged]]:
        """Every item the connection gets until it has been quiet for 0.5 s."""
        items: List[Union[kc.Event, kc.Lagged]] = []
        while True:
            try:
                items.append(c.next_event(timeout=0.5))
            except kc.KeyholeTimeout:
                return items

    def check_stream(self, items: List[Union[kc.Message, kc.Lagged]], sid: int, published: int) -> int:
        """One topic's items on one drop-oldest stream: consecutive sequence
        numbers except across a Lagged, which counts exactly the numbers
        skipped; received + missed = published. Returns the loss."""
        expected_seq, missed = 1, 0
        for item in items:
            if isinstance(item, kc.Lagged):
                self.assertEqual(item.stream, sid)
                self.assertGreaterEqual(item.missed, 1)
                expected_seq += item.missed
                missed += item.missed
            else:
                self.assertEqual(item.sequence, expected_seq, "consecutive, except across a Lagged")
                self.assertEqual(item.payload[:6], b"%06d" % item.sequence, "the event's own payload")
                expected_seq += 1
        received = sum(isinstance(i, kc.Message) for i in items)
        self.assertEqual(received + missed, published)
        self.assertIsInstance(items[-1], kc.Message, "the newest events are kept")
        return missed

    def test_a_stalled_drop_oldest_subscriber_sees_lagged_with_the_exact_count(self) -> None:
        with self.d.client() as sub, self.d.client() as pub:
            lag = sub.subscribe("lag", kc.Lag.DropOldest)
            n = 600  # 600 events of about 1 kB: ten times the queue, and more than the socket buffers hold
            for i in range(n):
                self.assertEqual(pub.publish("lag", b"%06d" % (i + 1) + bytes(1000)), 1,
                                 "a publisher is never held up, and each event is queued")
            items = [f if isinstance(f, kc.Lagged) else f.event for f in self.drain(sub)]
            lagged = [i for i in items if isinstance(i, kc.Lagged)]
            self.assertEqual(len(lagged), 1, "one stall, one Lagged with the total")
            missed = self.check_stream(items, lag.sid, n)  # type: ignore[arg-type]
            self.assertEqual(lagged[0], kc.Lagged(lag.sid, missed))
            self.assertEqual((lag.received, lag.missed, lag.lagged), (n - missed, missed, 1))
            self.assertFalse(sub.closed, "the connection stays")
            # The stream goes on, with no further loss.
            self.assertEqual(pub.publish("lag", b"%06d" % (n + 1)), 1)
            self.assertEqual(lag.next(), kc.Message("lag", n + 1, b"%06d" % (n + 1)))
            sub.ping()

    def test_drop_oldest_streams_make_room_for_a_disconnect_stream(self) -> None:
        """One connection, three subscriptions: `fast` and `>` drop their
        oldest, `slow` (Disconnect) must stay complete: room is made for it
        by dropping events of the drop-oldest streams, and the connection stays."""
        with self.d.client() as sub, self.d.client() as pub:
            fast = sub.subscribe("fast", kc.Lag.DropOldest)
            slow = sub.subscribe("slow", kc.Lag.Disconnect)
            every = sub.subscribe(">", kc.Lag.DropOldest)
            n_fast = n_slow = 0
            for i in range(400):
                n_fast += 1
                self.assertEqual(pub.publish("fast", b"%06d" % n_fast + bytes(1000)), 2)
                if i % 10 == 0:
                    n_slow += 1
                    self.assertEqual(pub.publish("slow", b"%06d" % n_slow + bytes(500)), 2)
            items = self.drain(sub)
            self.assertFalse(sub.closed)
            on = lambda sid, topic: [f if isinstance(f, kc.Lagged) else f.event for f in items  # noqa: E731
                                     if f.stream == sid and (isinstance(f, kc.Lagged) or f.event.topic == topic)]
            self.assertEqual([m.sequence for m in on(slow.sid, "slow")], list(range(1, n_slow + 1)),  # type: ignore
                             "the Disconnect stream is complete")
            self.assertGreater(self.check_stream(on(fast.sid, "fast"), fast.sid, n_fast), 0)  # type: ignore[arg-type]
            # `>` gets both topics; its Lagged count covers them together.
            mixed = [f if isinstance(f, kc.Lagged) else f.event for f in items if f.stream == every.sid]
            received = sum(isinstance(m, kc.Message) for m in mixed)
            missed = sum(m.missed for m in mixed if isinstance(m, kc.Lagged))
            self.assertGreater(missed, 0)
            self.assertEqual(received + missed, n_fast + n_slow)
            self.assertEqual((every.received, every.missed), (received, missed))
            self.assertEqual((slow.received, slow.missed, slow.lagged), (n_slow, 0, 0))

    def test_a_lagged_after_its_queue_ran_empty_and_a_publish_dropped_at_once(self) -> None:
        """Sections 7, 9 and 14, on one stalled connection: 300 events of a
        DropOldest stream, then 16 of 4 kB of a Disconnect stream, which
        fill the 64 kB queue by dropping every queued event of the first.
        The queue now holds only Disconnect events: one more event of the
        DropOldest stream cannot be queued and nothing can be dropped for it,
        so it is dropped at once and not counted in receivers. Reading then
        gives the first stream's events written before the stall, the
        Disconnect stream complete, and one Lagged with the total (the
        stream's queue ran empty first: it comes after every frame queued
        before it), before the stream's next event."""
        with self.d.client() as sub, self.d.client() as pub:
            fast = sub.subscribe("fast", kc.Lag.DropOldest)
            slow = sub.subscribe("slow", kc.Lag.Disconnect)
            n_fast, n_slow = 300, 16
            for i in range(n_fast):
                self.assertEqual(pub.publish("fast", b"%06d" % (i + 1) + bytes(1000)), 1)
            for i in range(n_slow):
                self.assertEqual(pub.publish("slow", b"%06d" % (i + 1) + bytes(3994)), 1)
            self.assertEqual(pub.publish("fast", b"%06d" % (n_fast + 1) + bytes(1000)), 0,
                             "dropped at once: not counted, told with Lagged")
            items = self.drain(sub)
            self.assertFalse(sub.closed, "the Disconnect stream fitted")
            self.assertEqual([f.event.sequence for f in items if isinstance(f, kc.Event)  # type: ignore[union-attr]
                              and f.stream == slow.sid], list(range(1, n_slow + 1)), "the Disconnect stream is complete")
            lagged = [f for f in items if isinstance(f, kc.Lagged)]
            got = [f.event.sequence for f in items if isinstance(f, kc.Event) and f.stream == fast.sid]  # type: ignore
            k = len(got)
            self.assertEqual(got, list(range(1, k + 1)))
            self.assertLess(k, n_fast)
            self.assertEqual(lagged, [kc.Lagged(fast.sid, n_fast + 1 - k)], "one stall, one Lagged, with the total")
            self.assertIs(items[-1], lagged[0], "after every event sent before the drop")
            self.assertEqual((fast.received, fast.missed, fast.lagged), (k, n_fast + 1 - k, 1))
            self.assertEqual(pub.publish("fast", b"%06d" % (n_fast + 2)), 1)
            self.assertEqual(fast.next(), kc.Message("fast", n_fast + 2, b"%06d" % (n_fast + 2)),
                             "the stream's events after the Lagged follow the dropped ones")
            self.assertEqual(fast.lagged, 1)

    def test_unsubscribe_drops_a_pending_lagged_count(self) -> None:
        """Section 14, raw: a stalled DropOldest subscription has lost events
        (a Lagged count not sent yet) and has more queued. Unsubscribe(1) and
        Subscribe(1) in one write: what arrives before the Unsubscribed reply
        adds up (consecutive except across a Lagged, which counts exactly
        the gap); after it, neither the Lagged nor an old event: the new
        subscription's first event on the same sid comes alone."""
        with self.d.client() as pub:
            s, _ = self.d.authenticated_raw()
            self.addCleanup(s.close)
            s.sendall(call_frame(1, kc.Subscribe(1, "lagre.old", kc.Lag.DropOldest)))
            self.assertEqual(read_frames(s, 1), [kc.Reply(1, kc.Subscribed())])
            n = 600
            for i in range(n):
                self.assertEqual(pub.publish("lagre.old", b"%06d" % (i + 1) + bytes(1000)), 1)
            s.sendall(call_frame(2, kc.Unsubscribe(1)) + call_frame(3, kc.Subscribe(1, "lagre.new", kc.Lag.DropOldest)))
            frames: List[kc.DaemonFrame] = []
            while kc.Reply(3, kc.Subscribed()) not in frames:
                frames.extend(read_frames(s, 1))
            self.assertEqual(pub.publish("lagre.old", b"nobody"), 0)
            self.assertEqual(pub.publish("lagre.new", b"mine"), 1)
            self.assertEqual(read_frames(s, 1), [kc.Event(1, kc.Message("lagre.new", 1, b"mine"))])
            s.settimeout(0.3)
            with self.assertRaises(socket.timeout):
                s.recv(1)
            cut = frames.index(kc.Reply(2, kc.Unsubscribed()))
            self.assertEqual(frames[cut + 1:], [kc.Reply(3, kc.Subscribed())])
            before = frames[:cut]
            expected_seq = 1
            for f in before:
                if isinstance(f, kc.Lagged):
                    self.assertEqual(f.stream, 1)
                    expected_seq += f.missed
                else:
                    self.assertIsInstance(f, kc.Event)
                    self.assertEqual(f.event.sequence, expected_seq)  # type: ignore[union-attr]
                    self.assertEqual(f.event.payload[:6], b"%06d" % expected_seq)  # type: ignore[union-attr]
                    expected_seq += 1
            self.assertGreater(len(before), 0)
            self.assertLessEqual(expected_seq - 1, n)
            self.assertLess(sum(isinstance(f, kc.Event) for f in before), n, "the queued ones were dropped")

    def test_the_python_cli_reports_a_loss(self) -> None:
        """``python3 -m keyhole_client sub --drop-oldest``, stopped with SIGSTOP
        while 600 events are published: the lines it prints and the loss it
        reports on stderr add up to what was published."""
        n = 600
        with self.d.client() as pub:
            proc = subprocess.Popen([*PY_CLI, "sub", "cli.lag", "--drop-oldest"], env=py_env(self.d.env),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                wait_for(lambda: pub.status().subscriptions == 1, "the CLI's subscription")
                os.kill(proc.pid, signal.SIGSTOP)
                for i in range(n):
                    pub.publish("cli.lag", b"%06d" % (i + 1) + b"." * 1000)
                os.kill(proc.pid, signal.SIGCONT)
                pub.publish("cli.lag", b"end")
                lines = []
                while True:  # until the marker, sequence n + 1
                    line = proc.stdout.readline()  # type: ignore[union-attr]
                    self.assertTrue(line, "the CLI ended early")
                    if line.startswith(b"cli.lag %d " % (n + 1)):
                        break
                    lines.append(line)
                proc.terminate()
                _, err = proc.communicate(timeout=IO_TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        losses = [int(x) for x in re.findall(rb"lost (\d+) events of subscription 1\b", err)]
        self.assertGreater(sum(losses), 0, err)
        self.assertEqual(len(lines) + sum(losses), n)
        self.assertEqual([int(line.split()[1]) for line in lines][-1], n, "the newest are kept")


class TopicsTruncationTests(unittest.TestCase):
    """Section 13: a Topics reply that does not fit is cut to a prefix of
    each sorted list, by the rule written out in :func:`expected_topics`;
    checked against a daemon with the smallest frame limit, 1024 bytes
    (so the entries may take 1024 - 256 = 768 bytes)."""

    LIMIT = 1024

    @classmethod
    def setUpClass(cls) -> None:
        cls.daemon = Daemon("--max-frame-len", str(cls.LIMIT))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.close()

    @staticmethod
    def expected_topics(patterns: Dict[str, int], names: Dict[str, int], max_frame_len: int) -> kc.TopicList:
        """Section 13's rule, written here from its text: each list sorted
        by text, bytewise; entries are kept from the start of the pattern
        list while each entry's text length plus 16 fits in what is left of
        max_frame_len - 256, then from the start of the name list in what
        the patterns left (nothing if the pattern list was cut); truncated
        when an entry was left out."""
        left = max_frame_len - 256

        def prefix(entries: Dict[str, int]) -> Tuple[Tuple[str, int], ...]:
            nonlocal left
            kept = []
            for text, count in sorted(entries.items(), key=lambda e: e[0].encode()):
                cost = len(text.encode()) + 16
                if cost > left:
                    break
                left -= cost
                kept.append((text, count))
            return tuple(kept)

        ps = prefix(patterns)
        ns = prefix(names) if len(ps) == len(patterns) else ()
        return kc.TopicList(ps, ns, len(ps) + len(ns) < len(patterns) + len(names))

    def topics_with(self, patterns: Dict[str, int], names: Dict[str, int]) -> kc.TopicList:
        """Subscribe each pattern (count times) and serve each name (by count
        connections), then ask for Topics; everything goes with the connections."""
        d = self.daemon
        conns = [d.client() for _ in range(max([1, *names.values()]))]
        try:
            for text, count in patterns.items():
                for _ in range(count):
                    conns[0].subscribe(text)
            for text, count in names.items():
                for c in conns[:count]:
                    c.serve(text)
            t = conns[0].topics()
            self.assertEqual(t, self.expected_topics(patterns, names, self.LIMIT))
            return t
        finally:
            for c in conns:
                c.close()
            with d.client() as c:
                wait_for(lambda: c.topics() == kc.TopicList((), (), False), "the connections' topics to go")

    @staticmethod
    def text(prefix: str, length: int) -> str:
        return prefix + "." + "x" * (length - len(prefix) - 1)

    def test_the_limit_itself_fits(self) -> None:
        # 9 x (64 + 16) + (32 + 16) = 768 bytes exactly: nothing cut.
        patterns = {self.text("k%02d" % i, 64): 1 for i in range(9)}
        t = self.topics_with({**patterns, self.text("k09", 32): 2}, {})
        self.assertEqual((len(t.patterns), t.truncated), (10, False))
        t = self.topics_with({**patterns, self.text("k09", 33): 1}, {})
        self.assertEqual((len(t.patterns), t.truncated), (9, True), "one byte more: the last is cut")
        t = self.topics_with(patterns, {self.text("s00", 32): 1})
        self.assertEqual((len(t.patterns), len(t.names), t.truncated), (9, 1, False), "768 over both lists")
        t = self.topics_with(patterns, {self.text("s00", 33): 1})
        self.assertEqual((len(t.patterns), t.names, t.truncated), (9, (), True))

    def test_a_cut_list_is_a_prefix(self) -> None:
        """After the first entry that does not fit, nothing more: not a later
        shorter pattern, and no name (the pattern list was cut), though
        either would fit in what is left."""
        patterns = {self.text("k%02d" % i, 64): 1 for i in range(9)}  # 720 bytes
        patterns[self.text("k09", 40)] = 1  # 56 more would be 776: cut
        patterns["k10"] = 3  # 19 would still fit
        t = self.topics_with(patterns, {"n": 1})
        self.assertEqual((len(t.patterns), t.names, t.truncated), (9, (), True))
        # The name list cut the same way, after every pattern.
        names = {self.text("s%02d" % i, 64): 1 for i in range(4)}
        names[self.text("s04", 49)] = 1
        names["s05"] = 2
        t = self.topics_with({self.text("k%02d" % i, 64): 1 for i in range(5)}, names)
        self.assertEqual((len(t.patterns), [n for n, _ in t.names], t.truncated),
                         (5, sorted(names, key=str.encode)[:4], True))

    def test_cut_by_the_rule_even_when_the_whole_reply_would_fit(self) -> None:
        """11 patterns of 64 bytes take 880 bytes of entries: the whole
        reply (33 + 880 = 913 bytes of payload) would fit in 1024, but the
        entries are over 1024 - 256, so the list is cut by the rule (the
        daemon cuts whenever the rule leaves an entry out)."""
        t = self.topics_with({self.text("k%02d" % i, 64): 1 for i in range(11)}, {})
        self.assertEqual((len(t.patterns), t.truncated), (9, True))

    def test_sorted_bytewise_with_counts_and_multibyte_text(self) -> None:
        """Random lists (fixed seeds) of patterns and names, some of them
        non-ASCII (the rule counts bytes), with counts above 1."""
        alphabet = "abcXYZ019_-é€"
        seen = set()
        for seed in range(8):
            rng = random.Random(seed)

            def subject(wildcards: bool) -> str:
                tokens = []
                for _ in range(rng.randint(1, 4)):
                    if wildcards and rng.random() < 0.2:
                        tokens.append("*")
                    else:
                        tokens.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))))
                if wildcards and rng.random() < 0.2:
                    tokens.append(">")
                return ".".join(tokens)

            patterns = {subject(True): rng.randint(1, 3) for _ in range(rng.randint(2, 20))}
            names = {subject(False): rng.randint(1, 2) for _ in range(rng.randint(1, 10))}
            with self.subTest(seed=seed):
                t = self.topics_with(patterns, names)
                seen.add("whole" if not t.truncated else "patterns cut" if len(t.patterns) < len(patterns)
                         else "names cut")
        self.assertEqual(seen, {"whole", "patterns cut", "names cut"}, "the seeds cover each case")

class MemoryBudgetTests(unittest.TestCase):
    """Section 9, "Memory budget": past the daemon-wide budget, the
    connection holding the most is sent Error OverBudget (15) and closed."""

    def test_a_subscriber_that_does_not_read_is_cut_with_over_budget(self) -> None:
        # --memory-budget 1 is raised to its floor of two frames (of 65536 bytes).
        with Daemon("--max-frame-len", "65536", "--memory-budget", "1") as d:
            slow = d.client()  # reads nothing until the publisher is done
            mem = slow.subscribe("mem")
            n, size = 200, 30000
            with d.client() as pub:
                for start in range(0, n, 20):
                    replies = pub.pipeline([kc.Publish("mem", b"%05d" % (start + i) + bytes(size))
                                            for i in range(20)])
                    self.assertEqual({type(r.reply) for r in replies}, {kc.Published},  # type: ignore[union-attr]
                                     "a publisher is never held up by a subscriber")
                pub.ping()
                self.assertFalse(pub.closed)
            got: List[kc.Message] = []
            with self.assertRaises(kc.OverBudgetError) as ctx:
                while True:
                    got.append(mem.next())
            self.assertEqual((ctx.exception.id, ctx.exception.closes), (None, True))
            self.assertTrue(slow.closed)
            self.assertEqual(slow.final_frame.code, kc.ErrorCode.OverBudget)  # type: ignore[union-attr]
            # The events before the Error are the first ones, in order; the rest were discarded.
            self.assertLess(len(got), n)
            self.assertEqual([m.payload[:5] for m in got], [b"%05d" % i for i in range(len(got))])
            with d.client() as c:
                c.ping()  # the daemon serves on

    def test_frames_being_received_count_in_full_from_their_length_prefix(self) -> None:
        """With the budget at its floor of two frames, two connections can
        each announce a 16 MiB frame; a third goes over, and exactly one of
        the three connections holding the most is cut."""
        big = kc.PROTOCOL_MAX_FRAME_LEN
        with Daemon("--memory-budget", "1") as d:
            conns = []
            for _ in range(2):
                s, _ = d.authenticated_raw()
                s.sendall(struct.pack("<I", big))  # and nothing of the payload
                conns.append(s)
            time.sleep(0.2)
            for s in conns:
                s.settimeout(0.2)
                with self.assertRaises(socket.timeout):  # two frames fit
                    s.recv(1)
            s, _ = d.authenticated_raw()
            s.sendall(struct.pack("<I", big))
            conns.append(s)
            outcomes = [read_to_close(s, timeout=1.0) for s in conns]
            cut = [i for i, (frames, end) in enumerate(outcomes) if end != "TIMEOUT"]
            self.assertEqual(len(cut), 1, outcomes)
            frames, end = outcomes[cut[0]]
            self.assertEqual([(f.code, f.id) for f in frames], [(kc.ErrorCode.OverBudget, None)])  # type: ignore
            self.assertIn(end, ("EOF", "ECONNRESET"))
            for i, (frames, _) in enumerate(outcomes):
                if i != cut[0]:
                    self.assertEqual(frames, [])
            # A smaller frame going over: one of the 16 MiB holders goes, not the newcomer.
            keep = [conns[i] for i in range(3) if i != cut[0]]
            small, _ = d.authenticated_raw()
            small.sendall(struct.pack("<I", 200000))
            outcomes = [read_to_close(s, timeout=1.0) for s in keep + [small]]
            self.assertEqual([end == "TIMEOUT" for _, end in outcomes].count(False), 1, outcomes)
            self.assertEqual(outcomes[-1], ([], "TIMEOUT"), "the connection holding the most goes")
            for s in conns + [small]:
                s.close()


class FrameLimitTests(unittest.TestCase):
    """``--max-frame-len 4096``: the limit is announced and enforced."""

    def test_frame_limit_4096(self) -> None:
        with Daemon("--max-frame-len", "4096") as d:
            with d.client() as sub, d.client() as pub:
                self.assertEqual(pub.welcome.max_frame_len, 4096)
                big = sub.subscribe("big")
                payload = b"z" * (4096 - 32 - 3)  # topic "big": the Publish is exactly 4096 bytes
                self.assertEqual(len(kc.encode_request_payload(
                    kc.Request(1, kc.RequestKind.Call, kc.Publish("big", payload)))), 4096)
                # Its Message event would be 8 bytes more: refused with TooLarge, nothing published.
                for extra in range(8):  # Publish of 4096 - extra bytes: an Event of 4104 - extra
                    with self.assertRaises(kc.TooLargeError) as ctx:
                        pub.publish("big", payload[:len(payload) - extra])
                    self.assertEqual((ctx.exception.code, ctx.exception.closes), (1007, False))
                self.assertEqual(pub.publish("big", payload[:-8]), 1)  # a Publish of 4088: an Event of 4096
                self.assertEqual(big.next(), kc.Message("big", 1, payload[:-8]), "the refused ones took no number")
                with self.assertRaises(kc.RequestTooLarge):
                    pub.publish("big", payload + b"!")
                pub.ping()
            s, w = d.authenticated_raw()
            self.assertEqual(w.max_frame_len, 4096)
            s.sendall(call_frame(1, kc.Publish("big", payload + b"!")))
            frames, end = read_to_close(s)
            self.assertEqual([frame_to_json(f) for f in frames][0]["Error"]["code"], kc.ErrorCode.FrameTooLarge)
            self.assertEqual(len(frames), 1)
            self.assertIsNone(frames[0].id)  # type: ignore[union-attr]
            self.assertIn(end, ("EOF", "ECONNRESET"))
            s = d.raw()  # before Welcome the limit is the handshake's: 44 bytes
            s.sendall(struct.pack("<I", 4097))
            frames, end = read_to_close(s)
            self.assertEqual([(f.code, f.id) for f in frames], [(kc.ErrorCode.HandshakeExpected, None)])  # type: ignore


# --------------------------------------------------------------------------
# 4. Malformed input: exactly the documented error, then close or not
# --------------------------------------------------------------------------


class MalformedInputTests(unittest.TestCase):
    """Every negative vector a client can send, and the handshake's rules."""

    daemon: Daemon

    @classmethod
    def setUpClass(cls) -> None:
        cls.daemon = Daemon()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.close()

    def check_outcome(self, s: socket.socket, code: int, error_id: Optional[int], closes: bool) -> None:
        """Exactly one Error with ``code`` and ``error_id``; then the close
        (EOF or ECONNRESET), or, if it does not close, a working connection."""
        if closes:
            frames, end = read_to_close(s)
            self.assertEqual(len(frames), 1, frames)
            self.assertIn(end, ("EOF", "ECONNRESET"))
        else:
            frames = read_frames(s, 1)
        err = frames[0]
        self.assertIsInstance(err, kc.Error)
        self.assertEqual((err.code, err.id), (code, error_id))  # type: ignore[union-attr]
        self.assertLessEqual(len(err.message.encode()), 512)  # type: ignore[union-attr]
        if not closes:
            s.sendall(ping_frame(99))
            self.assertEqual(read_frames(s, 1), [kc.Ack(99)])
            s.settimeout(0.05)
            with self.assertRaises(socket.timeout):
                s.recv(1)  # and nothing else was sent
        s.close()

    def test_every_client_negative_vector_against_the_daemon(self) -> None:
        names = [n for n, v in NEGATIVE.items() if v["direction"] != "daemon_to_client"]
        self.assertEqual(len(names), 14)
        for name in names:
            v = NEGATIVE[name]
            data = bytes.fromhex(v["hex"])
            variants = [data]
            if name in ("handshake_bad_magic", "handshake_version_1"):
                variants.append(data[:12] + self.daemon.token())  # the real token: only the tested field is wrong
            for i, sent in enumerate(variants):
                with self.subTest(name, variant=i):
                    if v["direction"] == "handshake":
                        s = self.daemon.raw()
                    else:
                        s, _ = self.daemon.authenticated_raw()
                    s.sendall(sent)
                    self.check_outcome(s, v["error_code"], v["error_id"], v["closes"])

    def test_version_1_handshake_is_refused(self) -> None:
        s = self.daemon.raw()
        s.sendall(bytes(kc.encode_handshake(self.daemon.token(), version=1)))
        self.check_outcome(s, kc.ErrorCode.UnsupportedVersion, None, True)
        s = self.daemon.raw()  # a v1 client pipelining its first request behind the handshake
        s.sendall(bytes(kc.encode_handshake(self.daemon.token(), version=1)) + struct.pack("<IQI", 12, 1, 0))
        self.check_outcome(s, kc.ErrorCode.UnsupportedVersion, None, True)

    def test_checks_in_order_magic_version_token(self) -> None:
        bad_token = bytearray(self.daemon.token())
        bad_token[31] ^= 0xFF
        for magic, version, token, code in ((b"KYHM", 1, bad_token, kc.ErrorCode.BadMagic),
                                            (b"KYHL", 1, bad_token, kc.ErrorCode.UnsupportedVersion),
                                            (b"KYHL", 3, bad_token, kc.ErrorCode.UnsupportedVersion),
                                            (b"kyhl", 2, self.daemon.token(), kc.ErrorCode.BadMagic),
                                            (b"KYHL", 2, bad_token, kc.ErrorCode.BadToken)):
            with self.subTest(magic=magic, version=version):
                hs = kc.encode_handshake(token, version)
                hs[4:8] = magic
                s = self.daemon.raw()
                s.sendall(bytes(hs))
                self.check_outcome(s, code, None, True)

    def test_wrong_token(self) -> None:
        token = bytearray(self.daemon.token())
        token[0] ^= 0x01
        s = self.daemon.raw()
        s.sendall(bytes(kc.encode_handshake(token)))
        self.check_outcome(s, kc.ErrorCode.BadToken, None, True)
        with self.assertRaises(kc.BadTokenError) as ctx:
            kc.KeyholeClient.connect(self.daemon.socket_path, bytearray(token))
        self.assertEqual((ctx.exception.code, ctx.exception.name), (3, "BadToken"))
        self.assertIsInstance(ctx.exception, kc.HandshakeRefused)

    def test_requests_after_a_failed_handshake_are_discarded(self) -> None:
        s = self.daemon.raw()
        pings = b"".join(ping_frame(i) for i in range(10))
        s.sendall(bytes(kc.encode_handshake(TEST_TOKEN)) + pings)
        self.check_outcome(s, kc.ErrorCode.BadToken, None, True)
        # The client reports the refusal, not ten failed requests.
        with self.assertRaises(kc.BadTokenError):
            kc.KeyholeClient.connect(self.daemon.socket_path, bytearray(TEST_TOKEN),
                                     early=[kc.RequestKind.Ping] * 10 + [kc.Publish("x", bytes(900))])

    def test_request_of_40_bytes_before_the_handshake_is_read_as_a_handshake(self) -> None:
        s = self.daemon.raw()
        s.sendall(call_frame(1, kc.Subscribe(1, "aaaa")))  # payload: 12 + 4 + 8 + 8 + 4 + 4 = 40 bytes
        self.check_outcome(s, kc.ErrorCode.BadMagic, None, True)

    def test_handshake_delivered_in_pieces(self) -> None:
        s = self.daemon.raw()
        hs = bytes(kc.encode_handshake(self.daemon.token())) + ping_frame(3)
        for i in range(0, len(hs), 5):
            s.sendall(hs[i:i + 5])
            time.sleep(0.002)
        w, ack = read_frames(s, 2)
        self.assertIsInstance(w, kc.Welcome)
        self.assertEqual(ack, kc.Ack(3))
        s.close()

    def test_oversize_and_short_frames_after_welcome(self) -> None:
        cases = [
            (struct.pack("<I", 16777216 + 1) + b"x" * 100, kc.ErrorCode.FrameTooLarge),
            (struct.pack("<I", 0xFFFFFFFF), kc.ErrorCode.FrameTooLarge),
            (struct.pack("<I", 0), kc.ErrorCode.Malformed),
            (struct.pack("<I", 11) + b"\x00" * 8 + b"\x01\x00\x00", kc.ErrorCode.Malformed),
            (ping_frame(1) + struct.pack("<I", 3) + b"abc", kc.ErrorCode.Malformed),
        ]
        for data, code in cases:
            with self.subTest(code=code.name, data=data[:8].hex()):
                s, _ = self.daemon.authenticated_raw()
                s.sendall(data)
                if data.startswith(ping_frame(1)):
                    self.assertEqual(read_frames(s, 1), [kc.Ack(1)])
                self.check_outcome(s, code, None, True)

    def test_a_pending_connection_gets_one_frame_at_most(self) -> None:
        s = self.daemon.raw()
        s.sendall(struct.pack("<I", 12) + b"x" * 5000)
        self.check_outcome(s, kc.ErrorCode.HandshakeExpected, None, True)
        # The peer closes (its writing side) before a complete handshake: HandshakeExpected (section 8).
        for data in (b"", b"\x28\x00", b"\x28\x00\x00\x00", bytes(kc.encode_handshake(self.daemon.token()))[:43]):
            with self.subTest(sent=data.hex()):
                s = self.daemon.raw()
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                frames, end = read_to_close(s)
                self.assertEqual([(f.code, f.id) for f in frames],  # type: ignore[union-attr]
                                 [(kc.ErrorCode.HandshakeExpected, None)])
                self.assertIn(end, ("EOF", "ECONNRESET"))
                s.close()


class AuthTimeoutTests(unittest.TestCase):

    def test_silent_and_partial_connections_get_one_auth_timeout(self) -> None:
        with Daemon("--auth-timeout", "1") as d:
            silent = d.raw()
            partial = d.raw()
            partial.sendall(bytes(kc.encode_handshake(d.token()))[:10])
            t0 = time.monotonic()
            results = {}

            def run(name: str, s: socket.socket) -> None:
                results[name] = read_to_close(s, timeout=5) + (time.monotonic() - t0,)

            threads = [threading.Thread(target=run, args=a) for a in (("silent", silent), ("partial", partial))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for name, (frames, end, elapsed) in results.items():
                with self.subTest(name):
                    self.assertEqual(len(frames), 1, frames)
                    self.assertEqual((frames[0].code, frames[0].id), (kc.ErrorCode.AuthTimeout, None))  # type: ignore
                    self.assertIn(end, ("EOF", "ECONNRESET"))
                    self.assertGreater(elapsed, 0.7)
                    self.assertLess(elapsed, 3.0)
            # An authenticated connection is not subject to the deadline.
            with d.client() as c:
                time.sleep(1.3)
                c.ping()


def spawn_silent_connections(path: str, n: int) -> subprocess.Popen:
    """Another process that opens ``n`` connections to ``path`` and sends
    nothing. It prints ``connected`` once they are all open; when its stdin
    closes it waits 0.3 s and prints, as JSON, the error code each connection
    received (None if nothing came: still pending, or waiting)."""
    code = ("import json,socket,struct,sys,time\n"
            "ss=[]\n"
            "for _ in range(int(sys.argv[2])):\n"
            " s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);ss.append(s)\n"
            "print('connected',flush=True)\n"
            "sys.stdin.read()\n"
            "time.sleep(0.3)\n"
            "out=[]\n"
            "for s in ss:\n"
            " s.setblocking(False)\n"
            " try:\n  d=s.recv(100)\n except BlockingIOError:\n  d=None\n"
            " out.append(None if d is None else (struct.unpack_from('<I',d,9)[0] if len(d)>=13 else -1))\n"
            "print(json.dumps(out),flush=True)\n")
    return subprocess.Popen([sys.executable, "-c", code, path, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


class AdmissionTests(unittest.TestCase):
    """Section 9, "Admission": pending slots, waiting unread, the grace
    period and TooManyUnauthenticated, the deadline counted from arrival;
    section 4 step 1: the connection cap."""

    def assert_one_error(self, s: socket.socket, code: int, timeout: float = IO_TIMEOUT) -> None:
        frames, end = read_to_close(s, timeout)
        self.assertEqual([(f.code, f.id) for f in frames], [(code, None)])  # type: ignore[union-attr]
        self.assertIn(end, ("EOF", "ECONNRESET"))

    def assert_still_pending(self, s: socket.socket, seconds: float) -> None:
        """Nothing arrives for ``seconds``, and the connection stays open."""
        s.settimeout(seconds)
        with self.assertRaises(socket.timeout):
            s.recv(1)

    def test_a_client_that_sends_its_handshake_at_once_is_admitted(self) -> None:
        """With every pending slot held by a silent connection, a client that
        sends its handshake right after connecting still gets Welcome: it
        waits, and the oldest slot holder past the grace period gives its
        slot up (TooManyUnauthenticated). Once nobody waits, the other
        silent holder keeps its slot."""
        with Daemon("--max-pending", "2") as d, d.client() as observer:
            a = d.raw()
            wait_for(lambda: observer.status().pending == 1, "a to hold a slot")
            b = d.raw()
            wait_for(lambda: observer.status().pending == 2, "b to hold a slot")
            time.sleep(0.3)  # both past the grace (200 ms)
            t0 = time.monotonic()
            with d.client() as c:
                elapsed = time.monotonic() - t0
                self.assertEqual(c.attempts, 1, "admitted by waiting, not by retrying")
                c.ping()
            self.assertLess(elapsed, 2.0)
            self.assert_one_error(a, kc.ErrorCode.TooManyUnauthenticated)
            self.assert_still_pending(b, 0.5)  # past its grace, but nobody waits now
            self.assertEqual(observer.status().pending, 1)
            # The raw bytes: a handshake written while waiting stays in the
            # socket, and is read when the slot comes (b's, the oldest).
            x = d.raw()
            wait_for(lambda: observer.status().pending == 2, "x to hold the other slot")
            s = d.raw()
            s.sendall(bytes(kc.encode_handshake(d.token())) + ping_frame(5))
            w, ack = read_frames(s, 2)
            self.assertIsInstance(w, kc.Welcome)
            self.assertEqual(ack, kc.Ack(5))
            self.assert_one_error(b, kc.ErrorCode.TooManyUnauthenticated)
            self.assert_still_pending(x, 0.3)
            for sock in (s, x):
                sock.close()

    def test_a_silent_slot_holder_loses_its_slot_after_the_grace_while_another_waits(self) -> None:
        with Daemon("--max-pending", "1", "--pending-grace", "1") as d, d.client() as observer:
            t0 = time.monotonic()
            a = d.raw()
            wait_for(lambda: observer.status().pending == 1, "a to hold the slot")
            self.assert_still_pending(a, 0.3)  # nobody waits: no grace applies
            w = d.raw()  # waits for the slot, silent too
            wait_for(lambda: observer.status().pending == 2, "w to wait (a waiting connection is pending)")
            self.assert_one_error(a, kc.ErrorCode.TooManyUnauthenticated)
            elapsed = time.monotonic() - t0
            self.assertGreater(elapsed, 0.85, "not before the grace period (1 s) from getting the slot")
            self.assertLess(elapsed, 2.0)
            self.assertEqual(observer.status().pending, 1)
            self.assert_still_pending(w, 1.3)  # w holds the slot past its grace; nobody waits
            w.close()

    def test_a_waiting_connection_is_not_read_and_its_deadline_runs_while_it_waits(self) -> None:
        """While it waits, the daemon reads nothing from a connection (a
        wrong length prefix is answered only once it holds a slot), and the
        handshake deadline counts from its arrival, waiting included."""
        with Daemon("--max-pending", "1", "--pending-grace", "30", "--auth-timeout", "1.5") as d, \
                d.client() as observer:
            a = d.raw()  # holds the slot until its own AuthTimeout (the grace is longer)
            t_a = time.monotonic()
            wait_for(lambda: observer.status().pending == 1, "a to hold the slot")
            time.sleep(0.5)  # w's own deadline comes well after a's
            w = d.raw()
            w.sendall(bytes.fromhex(NEGATIVE["request_before_handshake"]["hex"]))
            self.assert_one_error(a, kc.ErrorCode.AuthTimeout)
            self.assert_one_error(w, kc.ErrorCode.HandshakeExpected)
            elapsed = time.monotonic() - t_a
            self.assertGreater(elapsed, 1.3, "w's bytes (sent at 0.5 s) were not looked at while it waited")
            self.assertLess(elapsed, 2.5)
            wait_for(lambda: observer.status().pending == 0, "the slot to be free")
            a = d.raw()
            wait_for(lambda: observer.status().pending == 1, "a to hold the slot")
            time.sleep(0.5)
            t_v = time.monotonic()
            v = d.raw()  # silent; gets the slot when a times out, about 1 s after arriving
            self.assert_one_error(a, kc.ErrorCode.AuthTimeout)
            self.assert_one_error(v, kc.ErrorCode.AuthTimeout)
            elapsed = time.monotonic() - t_v
            self.assertGreater(elapsed, 1.2)
            self.assertLess(elapsed, 2.0, "the deadline counts from arrival (1.5 s), not from getting the slot (2 s)")

    def test_the_slot_given_up_is_the_oldest_of_the_process_holding_the_most(self) -> None:
        with Daemon("--max-pending", "3") as d, d.client() as observer:
            child = spawn_silent_connections(d.socket_path, 1)
            try:
                self.assertEqual(child.stdout.readline(), b"connected\n")  # type: ignore[union-attr]
                wait_for(lambda: observer.status().pending == 1, "the child's connection: the oldest of all")
                a = d.raw()
                # "Oldest" is the daemon's accept order: let it register a before b arrives.
                wait_for(lambda: observer.status().pending == 2, "a to hold a slot")
                b = d.raw()
                wait_for(lambda: observer.status().pending == 3, "all slots taken")
                time.sleep(0.3)  # every holder past the grace
                e1 = d.raw()  # waits: we hold 2 slots, the child 1, so our oldest (a) goes
                self.assert_one_error(a, kc.ErrorCode.TooManyUnauthenticated)
                self.assert_still_pending(b, 0.1)
                e2 = d.raw()  # we hold b and e1: b, the older, goes
                self.assert_one_error(b, kc.ErrorCode.TooManyUnauthenticated)
                out, _ = child.communicate(b"", timeout=IO_TIMEOUT)
                self.assertEqual(json.loads(out), [None], "the child's connection kept its slot")
                e1.close()
                e2.close()
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()

    def test_a_flood_of_silent_connections_does_not_keep_a_client_out(self) -> None:
        """Section 12: a flood from another process delays a real client by
        at most (connections waiting) x grace / slots."""
        n, slots, grace = 40, 4, 0.2
        with Daemon("--max-pending", str(slots)) as d, d.client() as observer:
            child = spawn_silent_connections(d.socket_path, n)
            try:
                self.assertEqual(child.stdout.readline(), b"connected\n")  # type: ignore[union-attr]
                # The flood evicts itself already: its slot holders past the grace
                # give their slots up to its own waiting connections.
                wait_for(lambda: observer.status().pending > slots, "the flood to wait for slots")
                t0 = time.monotonic()
                with d.client() as c:
                    elapsed = time.monotonic() - t0
                    c.ping()
                self.assertEqual(c.attempts, 1)
                self.assertLess(elapsed, n * grace / slots + 1.0)
                out, _ = child.communicate(b"", timeout=IO_TIMEOUT)
                codes = json.loads(out)
                self.assertEqual(len(codes), n)
                self.assertTrue(set(codes) <= {None, kc.ErrorCode.TooManyUnauthenticated}, codes)
                self.assertIn(kc.ErrorCode.TooManyUnauthenticated, codes, "holders past the grace gave slots up")
                print(f"\n    admitted past {n} silent connections in {elapsed * 1000:.0f} ms", file=sys.stderr)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()

    def test_the_connection_cap_takes_no_slot_and_the_client_retries(self) -> None:
        with Daemon("--max-pending", "2", "--max-connections", "4") as d, d.client() as c:
            y, _ = d.authenticated_raw()
            wait_for(lambda: c.status().authenticated == 2, "start()'s connection to go")
            a = d.raw()
            wait_for(lambda: c.status().pending == 1, "a to be pending")
            b = d.raw()
            wait_for(lambda: c.status().pending == 2, "b to be pending")  # 4 connections: c, y, a, b
            time.sleep(0.3)  # a and b past the grace
            over = d.raw()  # refused for the cap: it takes no slot and waits for none
            self.assert_one_error(over, kc.ErrorCode.TooManyConnections, timeout=2.0)
            self.assert_still_pending(a, 0.4)  # so nobody gave a slot up
            self.assert_still_pending(b, 0.01)
            self.assertEqual((c.status().pending, c.status().authenticated), (2, 2))
            # The client retries TooManyConnections until its connect timeout...
            t0 = time.monotonic()
            with self.assertRaises(kc.TooManyConnectionsError) as ctx:
                d.client(connect_timeout=0.6)
            self.assertGreaterEqual(time.monotonic() - t0, 0.55)
            self.assertGreater(ctx.exception.attempts, 2)
            self.assertIsInstance(ctx.exception, kc.HandshakeRefused)
            # ... and is admitted once there is room.
            result: Dict[str, Any] = {}

            def connect() -> None:
                try:
                    result["client"] = d.client(connect_timeout=5)
                except BaseException as err:  # noqa: BLE001 - reported below
                    result["error"] = err

            thread = threading.Thread(target=connect)
            thread.start()
            time.sleep(0.4)
            y.close()
            thread.join(IO_TIMEOUT)
            self.assertNotIn("error", result)
            with result["client"] as late:
                self.assertGreater(late.attempts, 1)
                late.ping()
            a.close()
            b.close()

    def test_eagain_from_the_daemons_full_listen_queue_is_retried(self) -> None:
        """A connect storm against the real daemon: while it accepts nothing
        (stopped), its listen queue fills and connect fails with EAGAIN; the
        client retries, and is admitted once the daemon runs again."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 20000 and hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100
        with Daemon() as d:
            fillers: List[socket.socket] = []
            result: Dict[str, Any] = {}
            d.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            try:
                while len(fillers) < limit:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.setblocking(False)
                    try:
                        s.connect(d.socket_path)
                    except BlockingIOError:
                        s.close()
                        break
                    fillers.append(s)
                else:
                    self.fail(f"no EAGAIN after {len(fillers)} connects: the listen queue never filled")

                def connect() -> None:
                    try:
                        result["client"] = d.client(connect_timeout=8)
                    except BaseException as err:  # noqa: BLE001 - reported below
                        result["error"] = err

                thread = threading.Thread(target=connect)
                thread.start()
                time.sleep(0.4)
            finally:
                d.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
                for s in fillers:
                    s.close()
            thread.join(IO_TIMEOUT)
            self.assertNotIn("error", result)
            with result["client"] as c:
                self.assertGreater(c.attempts, 2, "EAGAIN was retried")
                c.ping()
            print(f"\n    listen queue full after {len(fillers)} connections; admitted after "
                  f"{c.attempts} attempts", file=sys.stderr)


# --------------------------------------------------------------------------
# 5. Closing: shutdown, restart, slow consumers
# --------------------------------------------------------------------------


class ClosingTests(unittest.TestCase):

    def test_sigterm_sends_closing_shutdown_after_queued_events(self) -> None:
        with Daemon() as d:
            sub = d.client()
            sub.subscribe("bye")
            with d.client() as pub:
                for i in range(3):
                    pub.publish("bye", b"%d" % i)
            pending = d.raw()
            with d.client() as observer:  # not `sub`: its replies would pull the events in
                wait_for(lambda: observer.status().pending == 1, "the pending connection")
            self.assertEqual(d.stop(), 0)
            frames, end = read_to_close(sub.sock)
            self.assertEqual([f.event.payload for f in frames[:-1]], [b"0", b"1", b"2"])  # type: ignore
            self.assertEqual(frames[-1], kc.Closing(kc.CloseReason.Shutdown))
            self.assertIn(end, ("EOF", "ECONNRESET"))
            frames, end = read_to_close(pending)
            self.assertEqual([(f.code, f.id) for f in frames], [(kc.ErrorCode.ShuttingDown, None)])  # type: ignore
            self.assertIn(end, ("EOF", "ECONNRESET"))
            self.assertFalse(os.path.exists(d.socket_path), "a clean stop removes the socket")
            self.assertFalse(os.path.exists(d.token_path), "a clean stop removes the token file")
            with self.assertRaises((kc.DaemonNotRunning, kc.TokenNotFoundError)):
                d.client()
            sub.close()

    def test_sighup_and_sigquit_shut_down_gracefully(self) -> None:
        """Section 9: SIGTERM, SIGINT, SIGHUP and SIGQUIT all stop keyholed
        gracefully: queued events, then Closing{Shutdown}; ShuttingDown to a
        pending connection; socket and token file removed; exit 0."""
        for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGINT):
            with self.subTest(sig=sig.name), Daemon() as d:
                sub = d.client()
                bye = sub.subscribe("bye")
                with d.client() as pub:
                    pub.publish("bye", b"last")
                pending = d.raw()
                with d.client() as observer:
                    wait_for(lambda: observer.status().pending == 1, "the pending connection")
                self.assertEqual(d.stop(sig), 0)
                self.assertEqual(bye.next().payload, b"last")
                with self.assertRaises(kc.DaemonClosing) as ctx:
                    sub.next_event()
                self.assertEqual(ctx.exception.reason, kc.CloseReason.Shutdown)
                frames, end = read_to_close(pending)
                self.assertEqual([(f.code, f.id) for f in frames], [(kc.ErrorCode.ShuttingDown, None)])  # type: ignore
                self.assertFalse(os.path.exists(d.socket_path))
                self.assertFalse(os.path.exists(d.token_path))
                sub.close()
                pending.close()

    def test_client_raises_daemon_closing_on_sigterm(self) -> None:
        with Daemon() as d:
            with d.client() as sub:
                sub.subscribe("bye")
                d.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                with self.assertRaises(kc.DaemonClosing) as ctx:
                    for _ in sub.events():
                        pass
                self.assertEqual(ctx.exception.reason, kc.CloseReason.Shutdown)
            self.assertEqual(d.stop(), 0)

    def test_shutdown_request_acks_then_closes(self) -> None:
        with Daemon() as d:
            with d.client() as c:
                s, _ = d.authenticated_raw()
                c.send_many([kc.RequestKind.Shutdown, kc.RequestKind.Ping, kc.StatusRequest()], [6, 7, 8])
                self.assertEqual(c.wait_reply(6), kc.Ack(6))
                with self.assertRaises(kc.DaemonClosing) as ctx:
                    c.wait_reply(7)  # requests after the Shutdown get no reply
                self.assertEqual(ctx.exception.reason, kc.CloseReason.Shutdown)
                self.assertEqual(ctx.exception.unanswered, [7, 8])
                frames, end = read_to_close(s)  # another connection gets Closing{Shutdown} too
                self.assertEqual(frames, [kc.Closing(kc.CloseReason.Shutdown)])
            self.assertEqual(d.proc.wait(IO_TIMEOUT), 0)  # type: ignore[union-attr]
            self.assertFalse(os.path.exists(d.socket_path))
            # The spec's vector bytes, through the high-level call.
            d.start()
            s, _ = d.authenticated_raw()
            s.sendall(bytes.fromhex(VECTORS["shutdown"]["hex"]))
            frames, end = read_to_close(s)
            self.assertEqual(frames, [kc.Ack(2), kc.Closing(kc.CloseReason.Shutdown)])
            self.assertEqual(d.proc.wait(IO_TIMEOUT), 0)  # type: ignore[union-attr]
            d.start()
            with d.client() as c:
                c.shutdown()
                with self.assertRaises(kc.DaemonClosing):
                    c.next_event()
            self.assertEqual(d.proc.wait(IO_TIMEOUT), 0)  # type: ignore[union-attr]

    def test_publishes_racing_a_shutdown(self) -> None:
        """Section 14: every Publish answered Published is delivered before
        Closing{Shutdown}; once shutdown began every Publish gets hub error
        1001 with its id and nothing is delivered for it."""
        with Daemon() as d:
            sub = d.client()
            race = sub.subscribe("race")
            pub = d.client()
            stopper = d.client()
            ids: List[int] = []
            try:
                for batch in range(100):  # keep publishing while the daemon shuts down
                    batch_ids = list(range(batch * 200 + 1, batch * 200 + 201))
                    ids += batch_ids  # before sending: a write the daemon cuts short still counts
                    pub.send_many([kc.Publish("race", b"%06d" % (rid - 1)) for rid in batch_ids], batch_ids)
                    if batch == 3:
                        stopper.send(kc.RequestKind.Shutdown)
            except kc.ConnectionClosed:
                pass  # the daemon closed while we were still writing
            outcome = []
            for rid in ids:
                try:
                    f = pub.wait_reply(rid)
                except kc.ConnectionClosed:
                    outcome.append("unanswered")
                    continue
                if isinstance(f, kc.Reply):
                    self.assertEqual(f.reply, kc.Published(1))
                    outcome.append("published")
                else:
                    self.assertEqual((f.code, f.id), (1001, rid))  # type: ignore[union-attr]
                    outcome.append("refused")
            self.assertEqual(pub.final_frame, kc.Closing(kc.CloseReason.Shutdown))
            order = "".join({"published": "p", "refused": "r", "unanswered": "u"}[o] for o in outcome)
            self.assertRegex(order, r"^p*r*u*$", "no publish is accepted once shutdown began")
            delivered = []
            with self.assertRaises(kc.DaemonClosing) as ctx:
                while True:
                    delivered.append(race.next().payload)
            self.assertEqual(ctx.exception.reason, kc.CloseReason.Shutdown)
            n_pub = order.count("p")
            self.assertEqual(delivered, [b"%06d" % i for i in range(n_pub)],
                             "exactly the Published ones are delivered, before Closing")
            self.assertEqual(d.proc.wait(IO_TIMEOUT), 0)  # type: ignore[union-attr]
            for c in (sub, pub, stopper):
                c.close()
            print(f"\n    race: {order.count('p')} published, {order.count('r')} refused with 1001, "
                  f"{order.count('u')} unanswered", file=sys.stderr)

    def test_a_subscriber_that_reads_nothing_is_dropped_within_about_2_seconds(self) -> None:
        """Section 9: after its queue overflows, a connection that reads
        nothing is cut within about 2 s; reading then finds the events already
        in its socket buffer, at most one truncated frame, and the end."""
        with Daemon("--outbound-queue-bytes", "65536", "--max-frame-len", "4096") as d:
            slow = d.client()
            deaf = slow.subscribe("deaf")
            with d.client() as pub:
                for start in range(0, 600, 100):
                    pub.pipeline([kc.Publish("deaf", b"%05d" % (start + i) + bytes(4000)) for i in range(100)])
            time.sleep(2.6)
            got: List[kc.Message] = []
            with self.assertRaises(kc.ConnectionClosed) as ctx:
                while True:
                    got.append(deaf.next())
            if isinstance(ctx.exception, kc.DaemonClosing):
                self.assertEqual(ctx.exception.reason, kc.CloseReason.SlowConsumer)
            self.assertLess(len(got), 600)
            self.assertEqual([m.payload[:5] for m in got], [b"%05d" % i for i in range(len(got))])
            slow.close()

    def test_replies_do_not_count_against_the_event_queue(self) -> None:
        """Section 9 step 4: a client that does not read its replies is not
        cut; the daemon stops reading its requests instead."""
        with Daemon("--outbound-queue-bytes", "65536", "--max-frame-len", "4096") as d:
            s, _ = d.authenticated_raw()
            n = 10000  # 10000 Status replies: about 700 kB, ten times the event queue
            data = b"".join(call_frame(i, kc.StatusRequest()) for i in range(n))
            writer = threading.Thread(target=s.sendall, args=(data,))
            writer.start()
            time.sleep(1.0)  # the daemon's replies back up; it must wait, not cut us
            frames = read_frames(s, n, timeout=IO_TIMEOUT)
            writer.join(IO_TIMEOUT)
            self.assertEqual([f.id for f in frames], list(range(n)))  # type: ignore[union-attr]
            self.assertTrue(all(isinstance(f, kc.Reply) and isinstance(f.reply, kc.Status) for f in frames))
            s.sendall(ping_frame(n))
            self.assertEqual(read_frames(s, 1), [kc.Ack(n)])
            s.close()

    def test_event_queue_is_never_below_the_frame_limit(self) -> None:
        """Section 10: the queue bound is "never below the frame limit": a
        queue option of 1000 bytes still carries one 4096-byte event."""
        with Daemon("--outbound-queue-bytes", "1000", "--max-frame-len", "4096") as d:
            with d.client() as sub, d.client() as pub:
                q = sub.subscribe("q")
                for size in (4096 - 41, 2000, 4096 - 41):  # an Event of 4096 bytes (40 + t + p)
                    self.assertEqual(pub.publish("q", bytes(size)), 1)
                    self.assertEqual(len(q.next().payload), size)

    def test_restart_changes_instance_id_and_token(self) -> None:
        """Section 16 step 13: a reconnecting client tells a restart by
        Welcome.instance_id (and the hub's numbering starts again)."""
        with Daemon() as d:
            old_token = d.token()
            with d.client() as c, d.client() as c2:
                old_instance = c.welcome.instance_id
                self.assertEqual(c2.welcome.instance_id, old_instance, "one instance id per daemon start")
                s = c.subscribe("numbered")
                for _ in range(3):
                    c2.publish("numbered", b"")
                self.assertEqual([s.next().sequence for _ in range(3)], [1, 2, 3])  # type: ignore[union-attr]
            instances = {old_instance}
            for _ in range(2):
                self.assertEqual(d.stop(), 0)
                d.start()
                self.assertNotEqual(d.token(), old_token)
                with self.assertRaises(kc.BadTokenError):
                    kc.KeyholeClient.connect(d.socket_path, bytearray(old_token))
                with d.client() as c, d.client() as c2:  # reads the token again
                    self.assertNotIn(c.welcome.instance_id, instances, "another instance id at every start")
                    instances.add(c.welcome.instance_id)
                    s = c.subscribe("numbered")
                    c2.publish("numbered", b"")
                    self.assertEqual(s.next().sequence, 1, "the numbering started again")  # type: ignore[union-attr]
                old_token = d.token()

    def test_slow_consumer_ends_with_closing_slow_consumer(self) -> None:
        with Daemon("--outbound-queue-bytes", "65536", "--max-frame-len", "4096") as d:
            slow, _ = d.authenticated_raw()
            slow.sendall(call_frame(1, kc.Subscribe(1, "flood")))
            self.assertEqual(read_frames(slow, 1), [kc.Reply(1, kc.Subscribed())])
            n, size = 300, 4000
            with d.client() as pub:
                for start in range(0, n, 50):
                    replies = pub.pipeline([kc.Publish("flood", b"%05d" % (start + i) + b"." * size)
                                            for i in range(50)])
                    self.assertTrue(all(isinstance(r, kc.Reply) for r in replies), "the publisher is not slowed")
                pub.ping()
            frames, end = read_to_close(slow)
            self.assertEqual(frames[-1], kc.Closing(kc.CloseReason.SlowConsumer))
            events = frames[:-1]
            self.assertTrue(all(isinstance(e, kc.Event) for e in events))
            # Events still queued when the queue overflowed are discarded.
            self.assertLess(len(events), n)
            seqs = [e.event.sequence for e in events]  # type: ignore[union-attr]
            self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(events))) if seqs else [])
            self.assertEqual([e.event.payload[:5] for e in events],  # type: ignore[union-attr]
                             [b"%05d" % i for i in range(len(events))])
            self.assertIn(end, ("EOF", "ECONNRESET"))
            # The client surfaces it as DaemonClosing(SlowConsumer).
            slow2 = d.client()
            slow2.subscribe("flood")
            with d.client() as pub:
                for start in range(0, n, 50):
                    pub.pipeline([kc.Publish("flood", b"." * size) for _ in range(50)])
            with self.assertRaises(kc.DaemonClosing) as ctx:
                while True:
                    slow2.next_event()
            self.assertEqual(ctx.exception.reason, kc.CloseReason.SlowConsumer)
            slow.close()
            slow2.close()


# --------------------------------------------------------------------------
# 6. Cross-language: the Rust CLI and the Python client on one daemon
# --------------------------------------------------------------------------


class CrossLanguageTests(unittest.TestCase):

    def test_rust_subscriber_receives_python_publications(self) -> None:
        n = 40
        payloads = [f"message {i}: ünïcødé ✓ {'x' * i}" for i in range(n)]
        with Daemon() as d, d.client() as pub:
            proc = subprocess.Popen([KEYHOLE, "sub", "xl", "--count", str(n)], env={**os.environ, **d.env},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                wait_for(lambda: pub.status().subscriptions == 1, "the Rust subscriber")
                for p in payloads:
                    pub.publish("xl", p.encode())
                out, err = proc.communicate(timeout=IO_TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            self.assertEqual(proc.returncode, 0, err)
            lines = out.decode("utf-8").splitlines()
            self.assertEqual(len(lines), n)
            parsed = [line.split(" ", 2) for line in lines]
            self.assertEqual({t for t, _, _ in parsed}, {"xl"})
            seqs = [int(s) for _, s, _ in parsed]
            self.assertEqual(seqs, list(range(seqs[0], seqs[0] + n)))
            self.assertEqual([p for _, _, p in parsed], payloads)

    def test_python_subscriber_receives_rust_publications(self) -> None:
        messages = [f"from rust {i} ✓" for i in range(10)]
        binary = bytes(range(256)) + b"end"
        with Daemon() as d, d.client() as sub:
            lx = sub.subscribe("lx")
            for m in messages:
                r = cli(["pub", "lx", m], d.env)
                self.assertEqual(r.returncode, 0, r.stderr)
            r = cli(["pub", "lx", "-"], d.env, input_=binary)
            self.assertEqual(r.returncode, 0, r.stderr)
            events = [lx.next() for _ in range(len(messages) + 1)]
            self.assertEqual([e.payload for e in events], [m.encode() for m in messages] + [binary])
            seqs = [e.sequence for e in events]
            self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(events))))
            for args in (["status"], ["ping"], ["ping", "-c", "3"]):
                r = cli(args, d.env)
                self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(cli(["token"], d.env).stdout.strip(), d.token().hex().encode())
            r = cli(["stop"], d.env)
            self.assertEqual(r.returncode, 0, r.stderr)
            with self.assertRaises(kc.DaemonClosing):
                sub.next_event()
            self.assertEqual(d.proc.wait(IO_TIMEOUT), 0)  # type: ignore[union-attr]

    def test_rust_responder_answers_python_requests(self) -> None:
        """``keyhole reply`` serves a name for a Python requester: it sees the
        requester's uid and pid, and a failing command fails the request."""
        script = ('x=$(cat); [ "$x" = fail ] && exit 3; '
                  'printf "%s %s %s %s" "$KEYHOLE_REQUEST_UID" "$KEYHOLE_REQUEST_PID" "$KEYHOLE_REQUEST_NAME" "$x"')
        with Daemon() as d, d.client() as requester:
            proc = subprocess.Popen([KEYHOLE, "reply", "svc.rust", "--count", "2", "--", "sh", "-c", script],
                                    env={**os.environ, **d.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                wait_for(lambda: requester.topics().names == (("svc.rust", 1),), "the Rust responder")
                self.assertEqual(requester.request("svc.rust", b"hello", timeout=5),
                                 b"%d %d svc.rust hello" % (os.geteuid(), os.getpid()))
                with self.assertRaises(kc.RequestFailed) as ctx:
                    requester.request("svc.rust", b"fail", timeout=5)
                self.assertTrue(ctx.exception.message)
                _, err = proc.communicate(timeout=IO_TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            self.assertEqual(proc.returncode, 0, err)
            wait_for(lambda: requester.topics().names == (), "the responder to leave after --count 2")
            with self.assertRaises(kc.NoRespondersError):
                requester.request("svc.rust", b"")

    def test_rust_cli_against_a_daemon_of_another_service(self) -> None:
        """`ping` works with any keyhole daemon; `status` exits 8 for a daemon
        that is not the hub (keyhole --help)."""
        def notes(conn: socket.socket, hs: bytes) -> None:
            conn.sendall(welcome_bytes("notes", 1))
            while True:
                head = conn.recv(4)
                if len(head) < 4:
                    return
                (length,) = struct.unpack("<I", head)
                rid, kind = struct.unpack("<QI", recv_exactly(conn, length)[:12])
                conn.sendall(kc.encode_daemon_frame(kc.Ack(rid)))

        for args, code in ((["ping"], 0), (["status"], 8)):
            with self.subTest(args=args):
                token_dir = tempfile.mkdtemp(prefix="khpy-tok-")
                self.addCleanup(shutil.rmtree, token_dir, True)
                with FakeDaemon(notes) as fake:
                    r = cli(args, fake.env)
                    self.assertEqual(r.returncode, code, r.stderr)
                    self.assertEqual(fake.handshakes[0].hex(), VECTORS["handshake"]["hex"])
        with FakeDaemon(notes) as fake:  # our own client: the same behaviour
            self.assertEqual(py_cli(["ping"], fake.env).returncode, 0)
        with FakeDaemon(notes) as fake:
            r = py_cli(["status"], fake.env)
            self.assertEqual(r.returncode, 8, r.stderr)
            self.assertIn(b"the daemon serves `notes` version 1, not `hub` version 2", r.stderr)

    def test_python_command_line(self) -> None:
        with Daemon() as d:
            r = py_cli(["ping", "-c", "2"], d.env)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(len(r.stdout.splitlines()), 2)
            r = py_cli(["status"], d.env)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn(b"authenticated 1", r.stdout)
            with d.client() as sub:
                clisub = sub.subscribe("cli")
                r = py_cli(["pub", "cli", "hi there"], d.env)
                self.assertEqual((r.returncode, r.stdout), (0, b"1\n"), r.stderr)  # the receivers
                self.assertEqual(py_cli(["pub", "cli", "-"], d.env, input_=b"\x00\x01").returncode, 0)
                self.assertEqual([clisub.next().payload for _ in range(2)], [b"hi there", b"\x00\x01"])
                self.assertEqual(py_cli(["pub", "", "x"], d.env).returncode, 2)
                self.assertEqual(py_cli(["pub", "a.*", "x"], d.env).returncode, 2, "a wildcard in a topic")
                with Responder(d, "svc.echo", lambda req: req.payload[::-1]) as echo:
                    r = py_cli(["topics"], d.env)
                    self.assertEqual(r.stdout, b"pattern cli 1\nname svc.echo 1\n", r.stderr)
                    r = py_cli(["req", "svc.echo", "abc"], d.env)
                    self.assertEqual((r.returncode, r.stdout), (0, b"cba"), r.stderr)
                    self.assertEqual([(q.name, q.payload, q.uid) for q in echo.seen],
                                     [("svc.echo", b"abc", os.geteuid())])
                    self.assertNotEqual(echo.seen[0].pid, os.getpid(), "the requester is the CLI's process")
                    self.assertEqual(echo.delivered, [True])
                with Responder(d, "svc.fail", lambda req: kc.FailureFailed("no clock")):
                    r = py_cli(["req", "svc.fail", "abc", "--request-timeout", "5"], d.env)
                    self.assertEqual(r.returncode, 7, r.stderr)
                    self.assertIn(b"no clock", r.stderr)
                def late(req: kc.IncomingRequest) -> bytes:
                    time.sleep(0.5)  # past the request's timeout
                    return b"late"

                with Responder(d, "svc.slow", late) as slow:
                    r = py_cli(["req", "svc.slow", "abc", "--request-timeout", "0.2"], d.env)
                    self.assertEqual(r.returncode, 6, r.stderr)
                    self.assertIn(b"Timeout", r.stderr)
                    wait_for(lambda: slow.delivered == [False], "the late answer, not delivered")
                r = py_cli(["req", "svc.none", "abc"], d.env)
                self.assertEqual(r.returncode, 7, r.stderr)
                self.assertIn(b"NoResponders", r.stderr)
            bad = {**d.env, "KEYHOLE_TOKEN": "00" * 32}
            self.assertEqual(py_cli(["ping"], bad).returncode, 5)
            self.assertEqual(py_cli(["ping"], {"KEYHOLE_DIR": os.path.join(d.tmp, "none")}).returncode, 3)
            self.assertEqual(py_cli(["ping"], {**d.env, "KEYHOLE_SOCKET": os.path.join(d.tmp, "no.sock")}).returncode,
                             3)
            self.assertEqual(py_cli(["stop"], d.env).returncode, 0)
            self.assertEqual(d.proc.wait(IO_TIMEOUT), 0)  # type: ignore[union-attr]


# --------------------------------------------------------------------------
# 7. Token and peer checks on the client side
# --------------------------------------------------------------------------


class ClientCheckTests(unittest.TestCase):

    daemon: Daemon

    @classmethod
    def setUpClass(cls) -> None:
        cls.daemon = Daemon()
        cls.tmp = tempfile.mkdtemp(prefix="khpy-files-")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.close()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def token_file(self, name: str, content: bytes, mode: int = 0o600) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, mode)
        return path

    def listening(self, name: str) -> socket.socket:
        """A socket that accepts nothing unless someone connects (to prove nobody did)."""
        path = os.path.join(self.tmp, name)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(4)
        s.setblocking(False)
        self.addCleanup(os.unlink, path)
        self.addCleanup(s.close)
        return s

    def test_token_file_0644_is_refused_before_anything_is_sent(self) -> None:
        """The socket is checked first (so that no daemon reads "daemon not
        running", as with the Rust CLI), then the token file: refused, the
        connection is closed without a byte sent."""
        path = self.token_file("t644", open(self.daemon.token_path, "rb").read(), 0o644)
        fake = self.listening("fake.sock")
        with self.assertRaises(kc.TokenPermissionError) as ctx:
            kc.KeyholeClient.connect(env={"KEYHOLE_SOCKET": os.path.join(self.tmp, "fake.sock"),
                                          "KEYHOLE_TOKEN_FILE": path})
        self.assertIn("0644", str(ctx.exception))
        conn, _ = fake.accept()  # connected, peer checked ...
        with conn:
            conn.settimeout(IO_TIMEOUT)
            self.assertEqual(conn.recv(100), b"", "... and closed with nothing sent")
        with self.assertRaises(kc.DaemonNotRunning):  # no socket: that is the answer, not the token
            kc.KeyholeClient.connect(env={"KEYHOLE_SOCKET": os.path.join(self.tmp, "none.sock"),
                                          "KEYHOLE_TOKEN_FILE": path})
        with self.assertRaises(kc.TokenPermissionError):
            kc.KeyholeClient.connect(env={**self.daemon.env, "KEYHOLE_TOKEN_FILE": path})
        r = cli(["ping"], {**self.daemon.env, "KEYHOLE_TOKEN_FILE": path})  # the Rust CLI agrees
        self.assertEqual(r.returncode, 4, r.stderr)

    def test_token_file_content_and_kind(self) -> None:
        good = open(self.daemon.token_path, "rb").read()
        self.assertEqual(len(good), 65)
        env = self.daemon.env
        for name, content, mode, exc in (
            ("t640", good, 0o640, kc.TokenPermissionError),
            ("t604", good, 0o604, kc.TokenPermissionError),
            ("t700", good, 0o700, None),
            ("t400", good, 0o400, None),
            ("tupper", good.upper(), 0o600, kc.TokenFormatError),
            ("tcrlf", good[:64] + b"\r\n", 0o600, kc.TokenFormatError),
            ("t2nl", good + b"\n", 0o600, kc.TokenFormatError),
            ("tspace", good[:64] + b" ", 0o600, kc.TokenFormatError),
            ("tshort", good[:63], 0o600, kc.TokenFormatError),
            ("tlong", good * 20, 0o600, kc.TokenFormatError),
            ("tempty", b"", 0o600, kc.TokenFormatError),
            ("tnonl", good[:64], 0o600, None),
        ):
            with self.subTest(name):
                path = self.token_file(name, content, mode)
                if exc is None:
                    with kc.KeyholeClient.connect(env={**env, "KEYHOLE_TOKEN_FILE": path}) as c:
                        c.ping()
                    continue
                with self.assertRaises(exc):
                    kc.KeyholeClient.connect(env={**env, "KEYHOLE_TOKEN_FILE": path})
                self.assertEqual(cli(["ping"], {**env, "KEYHOLE_TOKEN_FILE": path}).returncode, 4)
        with self.assertRaises(kc.TokenPermissionError):
            kc.read_token_file(self.tmp)  # a directory
        fifo = os.path.join(self.tmp, "fifo")
        os.mkfifo(fifo, 0o600)
        t0 = time.monotonic()
        with self.assertRaises(kc.TokenPermissionError):
            kc.read_token_file(fifo)  # does not block
        self.assertLess(time.monotonic() - t0, 1.0)
        with self.assertRaises(kc.TokenNotFoundError):
            kc.read_token_file(os.path.join(self.tmp, "missing"))
        link = os.path.join(self.tmp, "link")
        os.symlink(self.daemon.token_path, link)  # a symbolic link to a good file is followed
        with kc.KeyholeClient.connect(env={**env, "KEYHOLE_TOKEN_FILE": link}) as c:
            c.ping()
        os.chown(self.token_file("tother", good), 65534, 65534)
        with self.assertRaises(kc.TokenPermissionError) as ctx:
            kc.read_token_file(os.path.join(self.tmp, "tother"))
        self.assertIn("owned by uid 65534", str(ctx.exception))

    def test_token_sources_and_precedence(self) -> None:
        bad_file = self.token_file("tbad", b"garbage", 0o644)
        hex_token = self.daemon.token().hex()
        env = {**self.daemon.env, "KEYHOLE_TOKEN": hex_token, "KEYHOLE_TOKEN_FILE": bad_file}
        with kc.KeyholeClient.connect(env=env) as c:  # KEYHOLE_TOKEN before KEYHOLE_TOKEN_FILE
            c.ping()
        self.assertEqual(cli(["ping"], env).returncode, 0)
        wrong = bytearray(32)
        with self.assertRaises(kc.BadTokenError):  # an explicit token before KEYHOLE_TOKEN
            kc.KeyholeClient.connect(token=wrong, env=env)
        env = {**self.daemon.env, "KEYHOLE_TOKEN": "", "KEYHOLE_TOKEN_FILE": "", "KEYHOLE_SOCKET": "",
               "KEYHOLE_DAEMON_UID": ""}
        with kc.KeyholeClient.connect(env=env) as c:  # empty counts as unset
            c.ping()
        self.assertEqual(cli(["ping"], env).returncode, 0)
        with self.assertRaises(kc.TokenFormatError) as ctx:
            kc.load_token({"KEYHOLE_TOKEN": hex_token.upper()})
        self.assertNotIn(hex_token[:16], str(ctx.exception))
        # The forwarded-socket recipe: socket and token given, no runtime directory.
        env = {"KEYHOLE_SOCKET": self.daemon.socket_path, "KEYHOLE_TOKEN": hex_token + "\n"}
        with kc.KeyholeClient.connect(env=env) as c:
            c.ping()
        env = {"KEYHOLE_SOCKET": self.daemon.socket_path, "KEYHOLE_TOKEN_FILE": self.daemon.token_path}
        with kc.KeyholeClient.connect(env=env) as c:
            c.ping()
        with self.assertRaises(kc.ConfigError) as ctx2:
            kc.KeyholeClient.connect(env={"KEYHOLE_TOKEN": hex_token})
        self.assertIn("KEYHOLE_SOCKET", str(ctx2.exception))

    def test_peer_uid_mismatch_sends_nothing(self) -> None:
        fake_path = os.path.join(self.tmp, "peer.sock")
        fake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fake.bind(fake_path)
        fake.listen(1)
        fake.settimeout(IO_TIMEOUT)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(fake_path)
        server_side, _ = fake.accept()
        try:
            self.assertEqual(kc.peer_uid(client), os.geteuid())
            kc.check_peer(client, os.geteuid())
            with self.assertRaises(kc.PeerCredentialsError):
                kc.check_peer(client, expected_uid=os.geteuid() + 1)
            client.close()
            server_side.settimeout(IO_TIMEOUT)
            self.assertEqual(server_side.recv(100), b"", "nothing may be sent to a peer of another uid")
        finally:
            server_side.close()
            fake.close()
            os.unlink(fake_path)

    def test_keyhole_daemon_uid(self) -> None:
        env = self.daemon.env
        with kc.KeyholeClient.connect(env={**env, "KEYHOLE_DAEMON_UID": str(os.geteuid())}) as c:
            c.ping()
        with self.assertRaises(kc.PeerCredentialsError) as ctx:
            kc.KeyholeClient.connect(env={**env, "KEYHOLE_DAEMON_UID": str(os.geteuid() + 4242)})
        self.assertIn("the token was not sent", str(ctx.exception))
        fake = self.listening("uid.sock")
        token = bytearray(self.daemon.token())
        with self.assertRaises(kc.ConfigError) as ctx2:
            kc.KeyholeClient.connect(os.path.join(self.tmp, "uid.sock"), token,
                                     env={**env, "KEYHOLE_DAEMON_UID": "+0"})
        self.assertIn("KEYHOLE_DAEMON_UID", str(ctx2.exception))
        self.assertEqual(token, bytearray(32), "the token is wiped on every failure")
        with self.assertRaises(BlockingIOError):
            fake.accept()  # nothing was sent: not even a connection was made
        r = cli(["ping"], {**env, "KEYHOLE_DAEMON_UID": "x1"})
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(b"KEYHOLE_DAEMON_UID", r.stderr)

    def test_rust_cli_refuses_keyhole_daemon_uid_with_a_sign_or_spaces(self) -> None:
        """Section 11: KEYHOLE_DAEMON_UID is "a decimal number with no sign ...
        Any other text is an error that names the variable, and nothing is
        sent". Our own uid with a sign or spaces around it is such text.
        (Fails against keyhole 0.1.0, which accepts "+0", " 0" and "0 ".)"""
        uid = str(os.geteuid())
        for text in ("+" + uid, " " + uid, uid + " "):
            with self.subTest(text=text):
                with self.assertRaises(kc.ConfigError):
                    kc.daemon_uid({"KEYHOLE_DAEMON_UID": text})  # our client
                r = cli(["ping"], {**self.daemon.env, "KEYHOLE_DAEMON_UID": text})
                self.assertNotEqual(r.returncode, 0, f"keyhole ping accepted KEYHOLE_DAEMON_UID={text!r}")
                self.assertIn(b"KEYHOLE_DAEMON_UID", r.stderr)

    def test_daemon_not_running(self) -> None:
        token = bytearray(self.daemon.token())
        with self.assertRaises(kc.DaemonNotRunning):
            kc.KeyholeClient.connect(os.path.join(self.tmp, "no-such.sock"), bytearray(token))
        stale = os.path.join(self.tmp, "stale.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(stale)  # bound, never listening: what a killed daemon leaves behind
        try:
            with self.assertRaises(kc.DaemonNotRunning):
                kc.KeyholeClient.connect(stale, token)
            self.assertEqual(token, bytearray(32), "the token is wiped even when connecting fails")
        finally:
            s.close()
            os.unlink(stale)
        with self.assertRaises(kc.ConfigError):
            kc.KeyholeClient.connect("/tmp/" + "x" * 120 + ".sock", bytearray(32))
        with self.assertRaises(kc.ConfigError):
            kc.KeyholeClient.connect("\0abstract", bytearray(32))

    def test_token_is_wiped_after_sending(self) -> None:
        token = bytearray(self.daemon.token())
        with kc.KeyholeClient.connect(self.daemon.socket_path, token) as c:
            c.ping()
        self.assertEqual(token, bytearray(32))


@unittest.skipUnless(os.geteuid() == 0, "needs root to run a peer as another uid")
class OtherUidTests(unittest.TestCase):
    """PeerNotAllowed, NotPermitted, KEYHOLE_DAEMON_UID and the client's peer
    check, with a real second uid (65534). Runs only as root."""

    OTHER = 65534

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="khpy-uid-")
        self.public = os.path.join(self.tmp, "public")
        os.mkdir(self.public)
        os.chmod(self.tmp, 0o755)
        os.chmod(self.public, 0o755)
        self.sock_path = os.path.join(self.public, "k.sock")

    def tearDown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def start(self, *flags: str) -> Tuple[Daemon, str]:
        """A daemon (running as root) whose socket the other uid can reach."""
        d = Daemon(*flags, socket_path=self.sock_path)
        os.chmod(self.sock_path, 0o777)
        return d, d.token().hex()

    def test_peer_not_allowed_and_client_refuses_foreign_daemon(self) -> None:
        d, token_hex = self.start()
        path = self.sock_path
        try:
            def raw_attempt() -> Any:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(IO_TIMEOUT)
                s.connect(path)
                frames, end = read_to_close(s)
                return [frame_to_json(f) for f in frames], end

            frames, end = run_as_uid(self.OTHER, raw_attempt)
            self.assertEqual(len(frames), 1)
            self.assertEqual((frames[0]["Error"]["code"], frames[0]["Error"]["id"]), (5, None))
            self.assertIn(end, ("EOF", "ECONNRESET"))

            def python_client() -> Any:
                try:
                    kc.KeyholeClient.connect(path, bytearray.fromhex(token_hex), env={})
                except kc.PeerCredentialsError as err:
                    return f"refused: {err}"
                return "connected"

            self.assertTrue(run_as_uid(self.OTHER, python_client).startswith("refused"))

            def python_client_uid0() -> Any:  # told the daemon's uid, but not allowed by it
                try:
                    kc.KeyholeClient.connect(env={"KEYHOLE_SOCKET": path, "KEYHOLE_TOKEN": token_hex,
                                                  "KEYHOLE_DAEMON_UID": "0"})
                except kc.PeerNotAllowedError as err:
                    return ["PeerNotAllowed", isinstance(err, kc.HandshakeRefused)]
                return "connected"

            self.assertEqual(run_as_uid(self.OTHER, python_client_uid0), ["PeerNotAllowed", True])
        finally:
            d.close()

    def test_allowed_uid_with_keyhole_daemon_uid_and_not_permitted_shutdown(self) -> None:
        d, token_hex = self.start("--allow-uid", str(self.OTHER))
        path = self.sock_path
        try:
            def attempt() -> Any:
                env = {"KEYHOLE_SOCKET": path, "KEYHOLE_TOKEN": token_hex, "KEYHOLE_DAEMON_UID": "0"}
                with kc.KeyholeClient.connect(env=env) as c:
                    c.subscribe("shared")
                    try:
                        c.shutdown()
                    except kc.NotPermittedError as err:
                        result = [err.code, err.id is not None, err.closes]
                    else:
                        result = ["shut down"]
                    c.ping()  # the connection stays open
                    s = c.status()
                    return result + [s.subscriptions]

            self.assertEqual(run_as_uid(self.OTHER, attempt), [12, True, False, 1])
            self.assertIsNone(d.proc.poll())  # type: ignore[union-attr]

            # A request from the other uid: the responder sees its uid and pid.
            def requester() -> Any:
                env = {"KEYHOLE_SOCKET": path, "KEYHOLE_TOKEN": token_hex, "KEYHOLE_DAEMON_UID": "0"}
                with kc.KeyholeClient.connect(env=env) as c:
                    return [c.request("svc.who", b"me", timeout=5).decode(), os.getpid()]

            with Responder(d, "svc.who", lambda q: b"%d %d %s" % (q.uid, q.pid, q.payload)) as who:
                reply, pid = run_as_uid(self.OTHER, requester)
            self.assertEqual(reply, f"{self.OTHER} {pid} me")
            self.assertEqual([(q.uid, q.pid) for q in who.seen], [(self.OTHER, pid)])

            def raw() -> Any:  # the spec's bytes, raw
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(IO_TIMEOUT)
                s.connect(path)
                s.sendall(bytes(kc.encode_handshake(bytes.fromhex(token_hex)))
                          + kc.encode_request(kc.Request(11, kc.RequestKind.Shutdown)) + ping_frame(12))
                return [frame_to_json(f) for f in read_frames(s, 3)]

            welcome, err, ack = run_as_uid(self.OTHER, raw)
            self.assertIn("Welcome", welcome)
            self.assertEqual((err["Error"]["code"], err["Error"]["id"]), (12, 11))
            self.assertEqual(ack, {"Ack": {"id": 12}})
            self.assertIsNone(d.proc.poll())  # type: ignore[union-attr]
        finally:
            d.close()


# --------------------------------------------------------------------------
# 8. The asyncio API (the same behaviours as the blocking one)
# --------------------------------------------------------------------------


def arun(coro: Any) -> Any:
    """Run one coroutine on a fresh event loop, bounded by IO_TIMEOUT * 3."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, IO_TIMEOUT * 3)
    return asyncio.run(bounded())


class AsyncDaemonTests(unittest.TestCase):
    """:class:`kc.AsyncKeyholeClient` against the real daemon."""

    daemon: Daemon

    @classmethod
    def setUpClass(cls) -> None:
        cls.daemon = Daemon()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.close()

    async def connect(self, **kw: Any) -> kc.AsyncKeyholeClient:
        return await kc.AsyncKeyholeClient.connect(env=self.daemon.env, timeout=IO_TIMEOUT, **kw)

    def test_handshake_welcome_ping_and_the_token_wiped(self) -> None:
        async def main() -> None:
            token = bytearray(self.daemon.token())
            async with await kc.AsyncKeyholeClient.connect(self.daemon.socket_path, token) as c:
                self.assertEqual(token, bytearray(32), "the token is wiped once the handshake is written")
                w = c.welcome
                self.assertEqual((w.protocol_version, w.service, w.service_version, w.max_frame_len),
                                 (2, "hub", 2, 16777216))
                self.assertEqual(w.instance_id, self.daemon.instance_id)
                self.assertGreater(await c.ping(), 0)
                s = await c.status()
                self.assertGreaterEqual(s.authenticated, 1)
                self.assertEqual(s.version, w.software_version)
            self.assertTrue(c.closed)
            with self.assertRaises(kc.ConnectionClosed):
                await c.ping()
            async with await self.connect(service=kc.RAW) as raw:  # a generic client: Ping only
                await raw.ping()
        arun(main())

    def test_pub_sub_streams_and_sids(self) -> None:
        async def main() -> None:
            async with await self.connect() as sub, await self.connect() as pub:
                wide = await sub.subscribe("as.*")
                narrow = await sub.subscribe("as.b", kc.Lag.DropOldest)
                self.assertEqual((wide.sid, narrow.sid), (1, 2))
                self.assertEqual(await pub.publish("as.b", b"one"), 2, "two subscriptions reached")
                self.assertEqual(await pub.publish("as.c", b"two"), 1)
                self.assertEqual(await pub.publish("as.b.deep", b"none"), 0)
                got = []
                async for item in wide:
                    got.append(item)
                    if len(got) == 2:
                        break
                self.assertEqual([(m.topic, m.payload) for m in got], [("as.b", b"one"), ("as.c", b"two")])
                m = await narrow.next()
                self.assertEqual((m.topic, m.payload, m.sequence), ("as.b", b"one", got[0].sequence))
                await wide.unsubscribe()
                self.assertFalse(wide.active)
                again = await sub.subscribe("as.c", sid=1)
                self.assertEqual(again.sid, 1, "the sid is free at its Unsubscribed reply")
                self.assertEqual((await sub.subscribe("as.d")).sid, 3, "the counter goes on")
                await pub.publish("as.c", b"three")
                self.assertEqual((await again.next()).payload, b"three")
                self.assertEqual(narrow.queued, 0)
                with self.assertRaises(kc.KeyholeTimeout):
                    await narrow.next(timeout=0.1)
                self.assertFalse(sub.closed, "a timeout leaves the connection usable")
                await sub.ping()
        arun(main())

    def test_request_reply_outcomes_and_concurrent_requests(self) -> None:
        async def serve(responder: kc.AsyncKeyholeClient, seen: List[kc.IncomingRequest]) -> None:
            while True:
                q = await responder.next_request(timeout=math.inf)
                seen.append(q)
                if q.payload == b"fail":
                    self.assertTrue(await responder.fail(q.token, "asked to fail"))
                elif q.payload == b"ignore":
                    continue  # never answered: the requester's timeout ends it
                else:
                    self.assertTrue(await responder.respond(q.token, q.payload[::-1]))

        async def main() -> None:
            async with await self.connect() as responder, await self.connect() as requester:
                await responder.serve("svc.async")
                seen: List[kc.IncomingRequest] = []
                task = asyncio.ensure_future(serve(responder, seen))
                try:
                    self.assertEqual(await requester.request("svc.async", b"abc", timeout=5), b"cba")
                    self.assertEqual((seen[0].name, seen[0].uid, seen[0].pid), ("svc.async", os.geteuid(),
                                                                              os.getpid()))
                    payloads = [b"r%03d" % i for i in range(40)]
                    replies = await asyncio.gather(*(requester.request("svc.async", p, timeout=5)
                                                     for p in payloads))
                    self.assertEqual(replies, [p[::-1] for p in payloads], "each task gets its own reply")
                    with self.assertRaises(kc.RequestFailed) as failed:
                        await requester.request("svc.async", b"fail", timeout=5)
                    self.assertEqual(failed.exception.message, "asked to fail")
                    with self.assertRaises(kc.RequestTimeout):
                        await requester.request("svc.async", b"ignore", timeout=0.2)
                    with self.assertRaises(kc.NoRespondersError):
                        await requester.request("svc.nobody", b"")
                    await requester.ping()
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        arun(main())

    def test_errors_keep_or_close_the_connection_as_section_8_says(self) -> None:
        async def main() -> None:
            async with await self.connect() as c:
                with self.assertRaises(kc.TopicError):
                    await c.publish("a..b", b"")  # refused before sending
                with self.assertRaises(kc.InvalidTopicError) as ctx:
                    await c.call(kc.Subscribe(7, ""))  # sent raw: the hub's 1000, with the id
                self.assertEqual((ctx.exception.code, ctx.exception.closes), (1000, False))
                with self.assertRaises(kc.SidInUseError):
                    await c.call(kc.Subscribe(0, "x"))
                await c.ping()  # the connection stays open
                bogus = kc.Request(99, 7)  # an unknown kind: UnknownRequest, id kept, stays open
                rid = await c.send(bogus)
                with self.assertRaises(kc.UnknownRequestError):
                    await c.result(rid)
                await c.ping()
            c2 = await self.connect()
            c2.sock.sendall(struct.pack("<I", 5) + b"short")  # type: ignore[union-attr]  # Malformed: closes
            with self.assertRaises(kc.MalformedError):
                await c2.next_event()
            with self.assertRaises(kc.ConnectionClosed):
                await c2.ping()
            self.assertTrue(c2.closed)
        arun(main())

    def test_client_checks_before_the_token_is_sent(self) -> None:
        tmp = tempfile.mkdtemp(prefix="khpy-async-")
        self.addCleanup(shutil.rmtree, tmp, True)
        bad = os.path.join(tmp, "t644")
        shutil.copy(self.daemon.token_path, bad)
        os.chmod(bad, 0o644)

        async def main() -> None:
            env = self.daemon.env
            with self.assertRaises(kc.DaemonNotRunning):
                await kc.AsyncKeyholeClient.connect(env={"KEYHOLE_SOCKET": os.path.join(tmp, "none.sock"),
                                                         "KEYHOLE_TOKEN_FILE": bad})
            with self.assertRaises(kc.TokenPermissionError):
                await kc.AsyncKeyholeClient.connect(env={**env, "KEYHOLE_TOKEN_FILE": bad})
            with self.assertRaises(kc.PeerCredentialsError) as ctx:
                await kc.AsyncKeyholeClient.connect(env={**env, "KEYHOLE_DAEMON_UID": str(os.geteuid() + 4242)})
            self.assertIn("the token was not sent", str(ctx.exception))
            with self.assertRaises(kc.DaemonUidError):
                await kc.AsyncKeyholeClient.connect(env={**env, "KEYHOLE_DAEMON_UID": "+0"})
            wrong = bytearray(32)
            with self.assertRaises(kc.BadTokenError) as refused:
                await kc.AsyncKeyholeClient.connect(self.daemon.socket_path, wrong)
            self.assertIsInstance(refused.exception, kc.HandshakeRefused)
        arun(main())

    def test_pipelining_replies_in_order(self) -> None:
        async def main() -> None:
            async with await self.connect() as c:
                await c.subscribe("apipe")
                specs: List[Any] = [kc.RequestKind.Ping, kc.StatusRequest(), kc.Publish("apipe", b"p"),
                                    kc.Subscribe(0, "apipe"), kc.TopicsRequest()]
                specs = [specs[i % len(specs)] for i in range(1000)]
                ids = [(i * 7919 + 12345) * 1_000_003 % (2 ** 64) for i in range(1000)]
                await c.send_many(specs, ids)
                replies = [await c.wait_reply(rid) for rid in ids]
                self.assertEqual([r.id for r in replies], ids)  # type: ignore[union-attr]
                for spec, r in zip(specs, replies):
                    if spec == kc.RequestKind.Ping:
                        self.assertIsInstance(r, kc.Ack)
                    elif isinstance(spec, kc.Subscribe):
                        self.assertEqual(r.code, 1003)  # type: ignore[union-attr]
                    else:
                        self.assertIsInstance(r, kc.Reply)
                sub = c.subscriptions[1]
                seqs = [(await sub.next()).sequence for _ in range(200)]  # each event before or after its reply
                self.assertEqual(seqs, list(range(seqs[0], seqs[0] + 200)), "none lost while replies were read")
                # Tasks that send at once: their replies matched in the order they sent.
                results = await asyncio.gather(*[c.status() if i % 3 == 0 else c.topics() for i in range(60)])
                for i, r in enumerate(results):
                    self.assertIsInstance(r, kc.Status if i % 3 == 0 else kc.TopicList)
                # A long pipeline: more than both socket buffers hold, read while written.
                ids = await c.send_many([kc.RequestKind.Ping] * 30000)
                acks = [await c.wait_reply(rid) for rid in ids]
                self.assertEqual(acks, [kc.Ack(rid) for rid in ids])
        arun(main())

    def test_events_are_delivered_while_requests_are_in_flight(self) -> None:
        async def main() -> None:
            async with await self.connect() as c, await self.connect() as pub:
                sub = await c.subscribe("inflight")
                # One task waits for events while another sends requests on the same connection.
                reader = asyncio.ensure_future(asyncio.gather(*[sub.next() for _ in range(1)]))
                await asyncio.sleep(0)
                for i in range(20):
                    await pub.publish("inflight", b"%d" % i)
                    await c.ping()
                first = (await reader)[0]
                self.assertEqual(first.payload, b"0")
                rest = [(await sub.next()).payload for _ in range(19)]
                self.assertEqual(rest, [b"%d" % i for i in range(1, 20)])
                # Publishes on this connection: each event before or after its
                # reply (section 9), none lost, replies matched in order.
                rids = await c.send_many([kc.Publish("inflight", b"own%d" % i) for i in range(10)]
                                         + [kc.RequestKind.Ping])
                self.assertEqual([(await c.result(rid)) for rid in rids[:-1]], [kc.Published(1)] * 10)
                self.assertIsNone(await c.result(rids[-1]))
                self.assertEqual([(await sub.next()).payload for _ in range(10)],
                                 [b"own%d" % i for i in range(10)])
                ev = asyncio.ensure_future(c.next_event(timeout=math.inf))
                await pub.publish("inflight", b"last")
                self.assertEqual((await ev).event.payload, b"last")  # type: ignore[union-attr]
        arun(main())

    def test_closing_shutdown_on_sigterm(self) -> None:
        async def main(d: Daemon) -> None:
            c = await kc.AsyncKeyholeClient.connect(env=d.env, timeout=IO_TIMEOUT)
            sub = await c.subscribe("bye")
            async with await kc.AsyncKeyholeClient.connect(env=d.env) as pub:
                await pub.publish("bye", b"queued first")
            d.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            self.assertEqual((await sub.next()).payload, b"queued first")
            with self.assertRaises(kc.DaemonClosing) as ctx:
                await sub.next()
            self.assertEqual(ctx.exception.reason, kc.CloseReason.Shutdown)
            with self.assertRaises(kc.DaemonClosing):
                await c.ping()
            c.close()

        with Daemon() as d:
            arun(main(d))
            self.assertEqual(d.proc.wait(IO_TIMEOUT), 0)  # type: ignore[union-attr]


class AsyncFakeDaemonTests(unittest.TestCase):
    """The asyncio client against scripted daemon bytes on a socketpair: the
    protocol-error rules, the bounded queue, the end of the connection."""

    async def make(self, max_frame_len: int = 4096, **kw: Any) -> Tuple[kc.AsyncKeyholeClient, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.settimeout(IO_TIMEOUT)
        self.addCleanup(theirs.close)
        welcome = kc.Welcome(2, "hub", 2, "fake", 1, 1, max_frame_len)
        c = await kc.AsyncKeyholeClient.from_socket(ours, welcome, timeout=IO_TIMEOUT, **kw)
        return c, theirs

    @staticmethod
    def f(frame: kc.DaemonFrame) -> bytes:
        return kc.encode_daemon_frame(frame)

    def test_replies_and_events_interleaved(self) -> None:
        async def main() -> None:
            c, d = await self.make()
            d.sendall(self.f(kc.Reply(1, kc.Subscribed())))
            sub = await c.subscribe("t")
            ids = await c.send_many([kc.RequestKind.Ping, kc.StatusRequest()])
            status = kc.Status(1, 0, 1, 1, 0, 0, 5, "fake")
            d.sendall(self.f(kc.Event(1, kc.Message("t", 8, b"x"))) + self.f(kc.Ack(ids[0]))
                      + self.f(kc.Event(1, kc.Message("t", 9, b"y"))) + self.f(kc.Reply(ids[1], status)))
            self.assertEqual(await c.result(ids[1]), status)
            self.assertEqual(await c.wait_reply(ids[0]), kc.Ack(ids[0]))
            self.assertEqual([(await sub.next()).sequence, (await sub.next()).sequence], [8, 9])
            # Two tasks wait at once, one for an event, one for a reply: the
            # one that reads hands the other its frame.
            rid = await c.send(kc.RequestKind.Ping)
            both = asyncio.ensure_future(asyncio.gather(sub.next(), c.wait_reply(rid)))
            await asyncio.sleep(0.05)
            self.assertFalse(both.done())
            d.sendall(self.f(kc.Event(1, kc.Message("t", 10, b"z"))) + self.f(kc.Ack(rid)))
            self.assertEqual(await both, [kc.Message("t", 10, b"z"), kc.Ack(rid)])
            c.close()
        arun(main())

    def test_a_reply_for_another_id_is_a_protocol_error(self) -> None:
        async def main() -> None:
            c, d = await self.make()
            rid = await c.send(kc.RequestKind.Ping)
            d.sendall(self.f(kc.Ack(rid + 1)))
            with self.assertRaises(kc.ProtocolError):
                await c.wait_reply(rid)
            self.assertTrue(c.closed)
            c2, d2 = await self.make()
            d2.sendall(struct.pack("<I", 5000))  # over max_frame_len 4096: refused before its payload
            with self.assertRaises(kc.FrameTooLargeError):
                await c2.next_event()
        arun(main())

    def test_event_queue_is_bounded(self) -> None:
        async def main() -> None:
            c, d = await self.make(max_queued_event_bytes=100)
            d.sendall(self.f(kc.Reply(1, kc.Subscribed())))
            sub = await c.subscribe("t")
            ev = [self.f(kc.Event(1, kc.Message("t", i, b"x"))) for i in range(1, 5)]
            rid = await c.send(kc.RequestKind.Ping)
            d.sendall(ev[0] + ev[1] + ev[2] + self.f(kc.Ack(rid)))
            self.assertIsNone(await c.result(rid))
            rid = await c.send(kc.RequestKind.Ping)
            d.sendall(ev[3] + self.f(kc.Ack(rid)))
            with self.assertRaises(kc.EventQueueFull):
                await c.wait_reply(rid)
            self.assertFalse(c.closed)
            self.assertEqual([(await sub.next()).sequence for _ in range(4)], [1, 2, 3, 4])
            self.assertIsNone(await c.result(rid))
            c.close()
        arun(main())

    def test_the_final_error_before_econnreset_is_reported(self) -> None:
        async def main() -> None:
            c, d = await self.make()
            await c.send_many([kc.RequestKind.Ping] * 3)  # left unread: closing now resets our end
            await asyncio.sleep(0.05)
            d.sendall(bytes.fromhex(VECTORS["error_frame_too_large"]["hex"]))
            d.close()
            with self.assertRaises(kc.FrameTooLargeDaemonError):
                await c.next_event()
            with self.assertRaises(kc.ConnectionClosed):
                await c.next_event()
            c2, d2 = await self.make()
            await c2.send(kc.RequestKind.Ping)
            await asyncio.sleep(0.05)
            d2.close()
            with self.assertRaises(kc.ConnectionClosed) as ctx:
                await c2.next_event()
            self.assertTrue(ctx.exception.reset)
        arun(main())

    def test_a_write_that_fails_after_the_final_frame_keeps_it(self) -> None:
        """As the blocking client's test of the same name (section 9)."""
        async def main() -> None:
            c, d = await self.make(max_frame_len=16777216)
            d.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

            def daemon() -> None:
                recv_exactly(d, 64)
                d.sendall(bytes.fromhex(VECTORS["error_over_budget"]["hex"]))
                d.close()

            thread = threading.Thread(target=daemon)
            thread.start()
            try:
                with self.assertRaises(kc.KeyholeError) as ctx:
                    await c.publish("big", bytes(4 * 1024 * 1024))
                self.assertEqual(ctx.exception.code, kc.ErrorCode.OverBudget)
                self.assertEqual(c.final_frame.code, kc.ErrorCode.OverBudget)  # type: ignore[union-attr]
                with self.assertRaises(kc.ConnectionClosed) as later:
                    await c.ping()
                self.assertEqual(later.exception.final_frame, c.final_frame)
            finally:
                thread.join()
        arun(main())

    def test_a_write_that_fails_reports_what_the_daemon_said(self) -> None:
        async def main() -> None:
            c, d = await self.make(max_frame_len=16777216)
            d.sendall(bytes.fromhex(VECTORS["error_malformed"]["hex"]))
            d.shutdown(socket.SHUT_WR)
            d.close()
            with self.assertRaises(kc.MalformedError):  # not a bare EPIPE
                await c.send(kc.Publish("t", bytes(4_000_000)))
        arun(main())

    def test_busy_refusals_are_retried(self) -> None:
        refusals = [bytes.fromhex(VECTORS["error_too_many_unauthenticated"]["hex"]),
                    bytes.fromhex(VECTORS["error_too_many_connections"]["hex"])]
        fake: FakeDaemon

        def script(conn: socket.socket, hs: bytes) -> Any:
            if fake.accepted <= len(refusals):
                conn.sendall(refusals[fake.accepted - 1])
                return "close"
            conn.sendall(welcome_bytes())
            recv_exactly(conn, 16)
            conn.sendall(kc.encode_daemon_frame(kc.Ack(1)))
            return None

        fake = FakeDaemon(script, connections=3)
        self.addCleanup(fake.close)

        async def main() -> None:
            c = await kc.AsyncKeyholeClient.connect(env=fake.env, timeout=IO_TIMEOUT, connect_timeout=5,
                                                    early=[kc.RequestKind.Ping])
            async with c:
                self.assertEqual((c.attempts, fake.accepted), (3, 3))
                self.assertEqual(fake.handshakes, [bytes.fromhex(VECTORS["handshake"]["hex"])] * 3)
                self.assertEqual(await c.wait_reply(1), kc.Ack(1))
        arun(main())

    def test_another_service_is_refused(self) -> None:
        fake = FakeDaemon(lambda conn, hs: conn.sendall(welcome_bytes("notes", 1)))
        self.addCleanup(fake.close)

        async def main() -> None:
            with self.assertRaises(kc.WrongServiceError) as ctx:
                await kc.AsyncKeyholeClient.connect(env=fake.env, timeout=IO_TIMEOUT)
            self.assertEqual((ctx.exception.service, ctx.exception.service_version), ("notes", 1))
        arun(main())


# --------------------------------------------------------------------------
# 9. File descriptors (Part V, section 19)
# --------------------------------------------------------------------------


def own_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def is_cloexec(fd: int) -> bool:
    import fcntl
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


class DescriptorDaemonTests(unittest.TestCase):
    """Section 19 against the real daemon: memfds published to subscribers
    that accepted descriptors and to ones that did not, the refusals
    (``BadMemfd`` 1008, ``DescriptorsNotAccepted`` 17), and the daemon's
    descriptors coming back to their baseline."""

    daemon: Daemon

    @classmethod
    def setUpClass(cls) -> None:
        cls.daemon = Daemon()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.close()

    def daemon_fds(self) -> int:
        """The daemon's open descriptors with no client connected: counted
        while only a probe is connected (its one socket taken off)."""
        assert self.daemon.proc is not None
        with self.daemon.client() as probe:
            wait_for(lambda: probe.status().authenticated == 1, "the other connections to be gone")
            return len(os.listdir(f"/proc/{self.daemon.proc.pid}/fd")) - 1

    def assert_back_to(self, baseline: int) -> None:
        counts: List[int] = []

        def settled() -> bool:
            counts.append(self.daemon_fds())
            return counts[-1] == baseline
        try:
            wait_for(settled, "the daemon's descriptors to come back to their baseline")
        except AssertionError:
            self.fail(f"the daemon holds {counts[-1]} descriptors, {baseline} before")

    def test_a_memfd_reaches_both_kinds_of_subscriber(self) -> None:
        baseline = self.daemon_fds()
        payload = os.urandom(200_000)
        with self.daemon.client() as taker, self.daemon.client() as inline, self.daemon.client() as pub:
            taker.accept_fds()
            taker.accept_fds()  # again: Ack, nothing changes
            self.assertTrue(taker.fds_accepted)
            s1 = taker.subscribe("blob.>")
            s2 = inline.subscribe("blob.*")
            pub.accept_fds()
            self.assertEqual(pub.publish_memfd_data("blob.a", payload), 2, "Published counts both kinds")
            m = s1.next()
            self.assertIsInstance(m, kc.MessageMemfd)
            assert isinstance(m, kc.MessageMemfd)
            with m:
                self.assertEqual((m.topic, m.sequence, m.len), ("blob.a", 1, len(payload)))
                self.assertTrue(is_cloexec(m.fd), "received with MSG_CMSG_CLOEXEC")
                self.assertEqual(kc.memfd_seals(m.fd) & kc.MEMFD_SEALS, kc.MEMFD_SEALS)
                self.assertEqual(os.fstat(m.fd).st_size, len(payload))
                offset = os.lseek(m.fd, 0, os.SEEK_CUR)
                self.assertEqual(m.read(), payload)
                self.assertEqual(m.read(5, 10), payload[5:15])
                self.assertEqual(os.lseek(m.fd, 0, os.SEEK_CUR), offset, "pread leaves the shared offset")
                with self.assertRaises(OSError):  # sealed: nobody can change its bytes
                    os.pwrite(m.fd, b"x", 0)
            self.assertTrue(m.closed)
            m2 = s2.next()
            self.assertEqual(m2, kc.Message("blob.a", 1, payload), "the same publish, inline")
            # From a file, and one sequence for Publish and PublishMemfd.
            with tempfile.TemporaryFile() as f:
                f.write(b"from a file")
                f.seek(0)
                self.assertEqual(pub.publish_memfd_data("blob.b", f), 2)
            self.assertEqual(pub.publish("blob.b", b"plain"), 2)
            with s1.next() as m3:
                self.assertEqual((m3.topic, m3.sequence, m3.read()), ("blob.b", 1, b"from a file"))
            m4 = s1.next()
            self.assertEqual(m4, kc.Message("blob.b", 2, b"plain"), "a plain publish stays a Message")
            self.assertEqual([s2.next(), s2.next()], [kc.Message("blob.b", 1, b"from a file"),
                                                       kc.Message("blob.b", 2, b"plain")])
            # The publisher's own memfd: stays open on its side.
            fd = kc.sealed_memfd(b"mine")
            try:
                self.assertEqual(pub.publish_memfd("blob.c", fd), 2)
                os.fstat(fd)
            finally:
                os.close(fd)
            with s1.next() as m5:
                self.assertEqual(m5.read(), b"mine")
            self.assertEqual(s2.next().payload, b"mine")
            # An empty memfd is an empty payload.
            self.assertEqual(pub.publish_memfd_data("blob.d", b""), 2)
            with s1.next() as m6:
                self.assertEqual((m6.len, m6.read()), (0, b""))
            self.assertEqual(s2.next(), kc.Message("blob.d", 1, b""))
        self.assert_back_to(baseline)

    def test_memfds_not_taken_are_closed_by_the_client(self) -> None:
        baseline = self.daemon_fds()
        c = self.daemon.client()
        c.accept_fds()
        sub = c.subscribe("left.t")
        with self.daemon.client() as pub:
            pub.accept_fds()
            for _ in range(3):
                self.assertEqual(pub.publish_memfd_data("left.t", b"abc"), 1)
        wait_for(lambda: (c.ping(), sub.queued)[1] == 3, "three memfds queued")
        before = own_fd_count()
        c.unsubscribe(sub)  # the items not taken are dropped, their memfds closed
        self.assertEqual(own_fd_count(), before - 3)
        c.close()
        self.assert_back_to(baseline)

    def test_unsealed_memfds_and_other_descriptors_get_bad_memfd(self) -> None:
        import fcntl
        baseline = self.daemon_fds()
        with self.daemon.client() as c, self.daemon.client() as sub_c:
            sub = sub_c.subscribe("bad.t")
            c.accept_fds()
            unsealed = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
            half = os.memfd_create("half", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
            try:
                os.write(unsealed, b"abc")
                os.write(half, b"abc")
                fcntl.fcntl(half, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)  # shrink and grow missing
                with tempfile.TemporaryFile() as plain:
                    plain.write(b"abc")
                    plain.flush()
                    for fd in (unsealed, half, plain.fileno()):
                        with self.subTest(fd=fd), self.assertRaises(kc.BadMemfdError) as ctx:
                            c.publish_memfd("bad.t", fd)
                        self.assertEqual((ctx.exception.code, ctx.exception.closes), (1008, False))
                    # Another hub request carrying descriptors: BadMemfd too.
                    sealed = kc.sealed_memfd(b"abc")
                    try:
                        with self.assertRaises(kc.BadMemfdError):
                            c.call_fds(kc.StatusRequest(), [sealed])
                        with self.assertRaises(kc.BadMemfdError):  # two descriptors
                            c.call_fds(kc.PublishMemfd("bad.t"), [sealed, sealed])
                    finally:
                        os.close(sealed)
            finally:
                os.close(unsealed)
                os.close(half)
            c.ping()
            self.assertFalse(c.closed)
            # Nothing was published: the next publish is the topic's first.
            self.assertEqual(c.publish("bad.t", b"ok"), 1)
            self.assertEqual(sub.next(), kc.Message("bad.t", 1, b"ok"))
        self.assert_back_to(baseline)

    def test_descriptors_before_accept_fds_are_refused_with_17(self) -> None:
        baseline = self.daemon_fds()
        with self.daemon.client() as c, self.daemon.client() as sub_c:
            sub = sub_c.subscribe("early.t")
            fd = kc.sealed_memfd(b"abc")
            try:
                with self.assertRaises(kc.DescriptorsNotAcceptedError) as ctx:
                    c.publish_memfd("early.t", fd)
                self.assertEqual((ctx.exception.code, ctx.exception.closes), (17, False))
                self.assertIsNotNone(ctx.exception.id)
                c.ping()  # the connection stays open
                c.accept_fds()
                self.assertEqual(c.publish_memfd("early.t", fd), 1)
            finally:
                os.close(fd)
            self.assertEqual(sub.next(), kc.Message("early.t", 1, b"abc"))
        self.assert_back_to(baseline)

    def test_asyncio_memfds(self) -> None:
        baseline = self.daemon_fds()
        payload = os.urandom(70_000)

        async def main() -> None:
            taker = await kc.AsyncKeyholeClient.connect(env=self.daemon.env, timeout=IO_TIMEOUT)
            inline = await kc.AsyncKeyholeClient.connect(env=self.daemon.env, timeout=IO_TIMEOUT)
            pub = await kc.AsyncKeyholeClient.connect(env=self.daemon.env, timeout=IO_TIMEOUT)
            try:
                s1 = await taker.subscribe("as.>")
                await taker.accept_fds()  # after a subscription: what the transport read is kept
                s2 = await inline.subscribe("as.>")
                with self.assertRaises(kc.DescriptorsNotAcceptedError):
                    await pub.publish_memfd_data("as.x", payload)
                await pub.accept_fds()
                results = await asyncio.gather(pub.publish_memfd_data("as.x", payload), pub.publish("as.y", b"p"),
                                               pub.publish_memfd_data("as.z", b"z"))
                self.assertEqual(results, [2, 2, 2])
                got = [await s1.next() for _ in range(3)]
                self.assertIsInstance(got[0], kc.MessageMemfd)
                self.assertEqual(got[1], kc.Message("as.y", 1, b"p"))
                with got[0] as m0, got[2] as m2:  # type: ignore[union-attr]
                    self.assertTrue(is_cloexec(m0.fd))
                    self.assertEqual((m0.read(), m2.read()), (payload, b"z"))
                self.assertEqual([await s2.next() for _ in range(3)],
                                 [kc.Message("as.x", 1, payload), kc.Message("as.y", 1, b"p"),
                                  kc.Message("as.z", 1, b"z")])
                self.assertIsInstance(await taker.status(), kc.Status)
            finally:
                for c in (taker, inline, pub):
                    c.close()
                    await c.wait_closed()
        arun(main())
        self.assert_back_to(baseline)


class DescriptorAttributionTests(unittest.TestCase):
    """Section 19.3's attribution rule, against a scripted daemon on a
    socketpair: descriptors belong to the first frame announcing some whose
    first byte came with them; anything else is a protocol error, and every
    descriptor the client does not hand on is closed."""

    def make(self) -> Tuple[kc.KeyholeClient, socket.socket, kc.Subscription]:
        """A client subscribed to "t" (sid 1) that sent AcceptFds (id 2,
        not answered yet)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(IO_TIMEOUT)
        theirs.settimeout(IO_TIMEOUT)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        c = kc.KeyholeClient(ours, kc.Welcome(2, "hub", 2, "fake", 1, 1, 4096), bytearray())
        theirs.sendall(kc.encode_daemon_frame(kc.Reply(1, kc.Subscribed())))
        sub = c.subscribe("t")
        recv_exactly(theirs, 4 + 36 + 1)
        self.assertEqual(c.send(kc.RequestKind.AcceptFds), 2)
        self.assertEqual(recv_exactly(theirs, 16), kc.encode_request(kc.Request(2, kc.RequestKind.AcceptFds)))
        self.assertTrue(c.fds_requested)
        self.assertFalse(c.fds_accepted)
        return c, theirs, sub

    @staticmethod
    def memfd_event(seq: int, data: bytes, fds: int = 1, stream: int = 1) -> bytes:
        return kc.encode_daemon_frame(kc.EventFds(stream, kc.MessageMemfd("t", seq, len(data)), fds))

    @staticmethod
    def plain(seq: int) -> bytes:
        return kc.encode_daemon_frame(kc.Event(1, kc.Message("t", seq, b"x")))

    def assert_protocol_error(self, c: kc.KeyholeClient, fn: Callable[[], Any]) -> None:
        with self.assertRaises(kc.ProtocolError):
            fn()
        self.assertTrue(c.closed)

    def test_tables_of_sections_6_7_and_13(self) -> None:
        """The request kinds, daemon frames and hub tables, parsed from the
        spec, match the client's enumerations (Part V added to each)."""
        def rows(start: str, end: str) -> Dict[int, str]:
            section = SPEC[SPEC.index(start):SPEC.index(end, SPEC.index(start))]
            return {int(n): name for n, name in re.findall(r"^\| (\d+) \| `(\w+)` \|", section, re.M)}
        self.assertEqual(rows("| kind | name | body", "\n\n"), {k.value: k.name for k in kc.RequestKind})
        self.assertEqual(rows("| tag | frame | fields", "\n\n"), {t.value: t.name for t in kc.FrameTag})
        hub_requests = rows("| tag | request | fields after the tag | reply |", "\n\n")
        self.assertEqual(hub_requests, {t.value: t.name for t in kc.HubRequestTag})
        self.assertEqual(rows("| tag | event | stream |", "\n\n"), {t.value: t.name for t in kc.HubEventTag})
        self.assertEqual(kc.RequestKind.AcceptFds, 4)
        self.assertEqual(kc.RequestKind.CallFds, 5)
        self.assertEqual(kc.HubErrorCode.BadMemfd + 1000, 1008)
        # Byte layouts: a PublishMemfd in a CallFds, the EventFds of its MessageMemfd.
        req = kc.encode_request_payload(kc.Request(3, kc.RequestKind.CallFds, kc.PublishMemfd("news"), fds=(9,)))
        self.assertEqual(req, struct.pack("<QIII", 3, 5, 1, 10) + kc._string("news"))
        ev = kc.EventFds(2, kc.MessageMemfd("news", 7, 1 << 20), 1)
        payload = kc.encode_daemon_frame_payload(ev)
        self.assertEqual(payload, struct.pack("<IQII", 8, 2, 1, 3) + kc._string("news") + struct.pack("<QQ", 7, 1 << 20))
        self.assertEqual(kc.decode_daemon_frame(payload), ev)
        self.assertEqual(kc.decode_daemon_frame(payload).descriptors, (), "descriptors come from the socket")  # type: ignore[union-attr]
        self.assertEqual(len(kc.encode_request_payload(kc.Request(1, kc.RequestKind.AcceptFds))), 12)
        self.assertEqual(kc.RECV_CONTROL_LEN, socket.CMSG_SPACE(9 * 4))

    def test_descriptors_glued_to_earlier_bytes(self) -> None:
        c, d, sub = self.make()
        fd = kc.sealed_memfd(b"glued")
        try:
            # Plain bytes first (the Ack and an Event), then the frame with
            # its descriptor and, in the same sendmsg, a plain frame after
            # it (section 19.2 allows it): one recvmsg returns the plain
            # bytes with the descriptor; it belongs to the EventFds.
            d.sendall(kc.encode_daemon_frame(kc.Ack(2)) + self.plain(1))
            socket.send_fds(d, [self.memfd_event(2, b"glued") + self.plain(3)], [fd])
            before = own_fd_count()
            self.assertIsNone(c.result(2))
            self.assertTrue(c.fds_accepted)
            self.assertEqual(sub.next(), kc.Message("t", 1, b"x"))
            m = sub.next()
            assert isinstance(m, kc.MessageMemfd)
            self.assertNotEqual(m.fd, fd, "a new descriptor of the same open file")
            self.assertEqual(os.fstat(m.fd).st_ino, os.fstat(fd).st_ino)
            self.assertTrue(is_cloexec(m.fd))
            self.assertEqual(m.read(), b"glued")
            self.assertEqual(sub.next(), kc.Message("t", 3, b"x"))
            self.assertEqual(own_fd_count(), before + 1)
            m.close()
            self.assertEqual(own_fd_count(), before)
            # The descriptor with the first bytes of its frame, the rest of
            # the frame in later writes.
            frame = self.memfd_event(4, b"glued")
            socket.send_fds(d, [frame[:3]], [fd])
            d.sendall(frame[3:10])
            d.sendall(frame[10:] + self.plain(5))
            with sub.next() as m2:
                self.assertEqual((m2.sequence, m2.read()), (4, b"glued"))
            self.assertEqual(sub.next(), kc.Message("t", 5, b"x"))
            # Descriptors announced by a frame after plain frames, in one sendmsg.
            socket.send_fds(d, [self.plain(6) + self.memfd_event(7, b"glued")], [fd])
            self.assertEqual(sub.next(), kc.Message("t", 6, b"x"))
            with sub.next() as m3:
                self.assertEqual(m3.sequence, 7)
            self.assertEqual(own_fd_count(), before)
            self.assertFalse(c.closed)
        finally:
            os.close(fd)

    def test_a_frame_whose_descriptors_are_missing(self) -> None:
        c, d, sub = self.make()
        d.sendall(kc.encode_daemon_frame(kc.Ack(2)) + self.memfd_event(1, b"abc"))
        self.assertIsNone(c.result(2))
        self.assert_protocol_error(c, sub.next)

    def test_descriptors_that_no_frame_announces(self) -> None:
        for case in ("plain frame", "before the frame with descriptors"):
            with self.subTest(case):
                c, d, sub = self.make()
                d.sendall(kc.encode_daemon_frame(kc.Ack(2)))
                self.assertIsNone(c.result(2))
                fd = kc.sealed_memfd(b"abc")
                try:
                    if case == "plain frame":
                        socket.send_fds(d, [self.plain(1)], [fd])
                    else:  # the descriptors of a frame sent ahead of it: they come with other bytes
                        socket.send_fds(d, [self.plain(1)], [fd])
                        socket.send_fds(d, [self.memfd_event(2, b"abc")], [fd])
                    before = own_fd_count()
                    with self.assertRaises(kc.ProtocolError):
                        while True:
                            sub.next()
                    self.assertTrue(c.closed)
                    # The socket and every descriptor received are closed.
                    self.assertLessEqual(own_fd_count(), before - 1)
                finally:
                    os.close(fd)

    def test_wrong_counts_msg_ctrunc_and_misplaced_frames(self) -> None:
        fds = [kc.sealed_memfd(b"abc") for _ in range(12)]
        try:
            cases: List[Tuple[str, bytes, List[int]]] = [
                ("announces 2, carries 1", self.memfd_event(1, b"abc", fds=2), fds[:1]),
                ("announces 1, carries 2", self.memfd_event(1, b"abc", fds=1), fds[:2]),
                ("9 descriptors", self.memfd_event(1, b"abc", fds=8), fds[:9]),
                # CMSG_SPACE(9 * 4) has room for 10 on Linux (alignment): 12 overflow it.
                ("12 descriptors: MSG_CTRUNC", self.memfd_event(1, b"abc", fds=8), fds[:12]),
                ("a ReplyFds to a hub client", kc.encode_daemon_frame(kc.ReplyFds(3, kc.Published(1), 1)), fds[:1]),
                ("an EventFds that is not a MessageMemfd",
                 kc.encode_daemon_frame(kc.EventFds(1, kc.Message("t", 1, b""), 1)), fds[:1]),
                ("a MessageMemfd in a plain Event",
                 kc.encode_daemon_frame(kc.Event(1, kc.MessageMemfd("t", 1, 3))), []),
                ("an EventFds announcing 0",
                 struct.pack("<IIQI", 16, 8, 1, 0), fds[:1]),
                ("an EventFds announcing 9",
                 self.memfd_event(1, b"abc", fds=9), fds[:8]),
            ]
            for name, data, sent in cases:
                with self.subTest(name):
                    c, d, sub = self.make()
                    d.sendall(kc.encode_daemon_frame(kc.Ack(2)))
                    self.assertIsNone(c.result(2))
                    c.send(kc.Publish("t", b""))  # id 3, for the ReplyFds
                    before = own_fd_count()
                    if sent:
                        socket.send_fds(d, [data], sent)
                    else:
                        d.sendall(data)
                    with self.assertRaises(kc.ProtocolError) as ctx:
                        sub.next()
                    if "MSG_CTRUNC" in name:
                        self.assertIn("MSG_CTRUNC", str(ctx.exception))
                    self.assertTrue(c.closed)
                    self.assertEqual(own_fd_count(), before - 1, "only our socket went: every descriptor closed")
        finally:
            for fd in fds:
                os.close(fd)

    def test_frames_with_descriptors_without_accept_fds(self) -> None:
        """Section 19.4's last row: tag 7 or 8 on a connection that did not
        send AcceptFds is a protocol error (its bytes alone decide)."""
        for data in (kc.encode_daemon_frame(kc.EventFds(1, kc.MessageMemfd("t", 1, 3), 1)),
                     kc.encode_daemon_frame(kc.ReplyFds(2, kc.Published(0), 1))):
            with self.subTest(data=data.hex()):
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                ours.settimeout(IO_TIMEOUT)
                self.addCleanup(ours.close)
                self.addCleanup(theirs.close)
                c = kc.KeyholeClient(ours, kc.Welcome(2, "raw", 1, "fake", 1, 1, 4096), bytearray(), service=kc.RAW)
                c.send(kc.RequestKind.Ping)
                theirs.sendall(data)
                with self.assertRaises(kc.ProtocolError) as ctx:
                    c.next_event()
                self.assertIn("AcceptFds", str(ctx.exception))
                self.assertTrue(c.closed)

    def test_a_generic_client_gets_the_descriptors_on_the_frame(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(IO_TIMEOUT)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        c = kc.KeyholeClient(ours, kc.Welcome(2, "raw", 1, "fake", 1, 1, 4096), bytearray(), service=kc.RAW)
        c.send(kc.RequestKind.AcceptFds)
        fd = kc.sealed_memfd(b"abc")
        try:
            theirs.sendall(kc.encode_daemon_frame(kc.Ack(1), kc.RAW))
            rid = c.send(b"call")
            socket.send_fds(theirs, [kc.encode_daemon_frame(kc.ReplyFds(rid, b"answer", 1), kc.RAW)
                                     + kc.encode_daemon_frame(kc.Event(5, b"ev"), kc.RAW)], [fd])
            socket.send_fds(theirs, [kc.encode_daemon_frame(kc.EventFds(5, b"ev2", 2), kc.RAW)], [fd, fd])
            self.assertIsNone(c.result(1))
            r = c.wait_reply(rid)
            assert isinstance(r, kc.ReplyFds)
            self.assertEqual((r.reply, r.fds, len(r.descriptors)), (b"answer", 1, 1))
            self.assertEqual(c.next_event(), kc.Event(5, b"ev"))
            e = c.next_event()
            assert isinstance(e, kc.EventFds)
            self.assertEqual((e.event, len(e.descriptors)), (b"ev2", 2))
            kc.close_fds(r.descriptors + e.descriptors)
        finally:
            os.close(fd)

    def test_requests_with_descriptors_on_the_wire(self) -> None:
        """Section 19.2, both APIs: the bytes before a frame with
        descriptors go first; the descriptors come with the read that holds
        the frame's first byte; a frame with descriptors waits for the Ack
        of an AcceptFds in flight."""
        def check(received: List[Tuple[int, int, List[int]]], data: bytes) -> None:
            # Find each CallFds frame's start and the group that holds it.
            pos, starts = 0, []
            while pos < len(data):
                (length,) = struct.unpack_from("<I", data, pos)
                if struct.unpack_from("<I", data, pos + 12)[0] == kc.RequestKind.CallFds:
                    starts.append((pos, struct.unpack_from("<I", data, pos + 16)[0]))
                pos += 4 + length
            groups = [g for g in received if g[2]]
            self.assertEqual(len(groups), len(starts))
            for (start, n), (a, b, fds) in zip(starts, groups):
                self.assertTrue(a <= start < b, (start, a, b))
                self.assertEqual(len(fds), n)
                self.assertTrue(is_cloexec(fds[0]))
                kc.close_fds(fds)

        def read_all(d: socket.socket, n: int) -> Tuple[bytes, List[Tuple[int, int, List[int]]]]:
            data, groups = b"", []
            while len(data) < n:
                # (Not socket.recv_fds: CPython's ignores its flags, MSG_CMSG_CLOEXEC included.)
                chunk, fds, flags = kc.recv_with_fds(d, 1 << 16)
                self.assertFalse(flags & socket.MSG_CTRUNC)
                groups.append((len(data), len(data) + len(chunk), list(fds)))
                data += chunk
            return data, groups

        fd1, fd2 = kc.sealed_memfd(b"one"), kc.sealed_memfd(b"two")
        self.addCleanup(os.close, fd1)
        self.addCleanup(os.close, fd2)
        specs = [kc.RequestKind.Ping, kc.CallWithFds(kc.PublishMemfd("a"), (fd1,)), kc.StatusRequest(),
                 kc.CallWithFds(kc.PublishMemfd("b"), (fd1, fd2)), kc.CallWithFds(kc.PublishMemfd("c"), (fd2,))]
        expected = b"".join(kc.encode_request(kc.Request(i + 1, kind, call, fds=fds)) for i, (kind, call, fds) in
                            enumerate([(kc.RequestKind.Ping, None, ()), (5, kc.PublishMemfd("a"), (fd1,)),
                                       (0, kc.StatusRequest(), ()), (5, kc.PublishMemfd("b"), (fd1, fd2)),
                                       (5, kc.PublishMemfd("c"), (fd2,))]))
        # Blocking.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(IO_TIMEOUT)
        theirs.settimeout(IO_TIMEOUT)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        c = kc.KeyholeClient(ours, kc.Welcome(2, "hub", 2, "fake", 1, 1, 4096), bytearray())
        self.assertEqual(c.send_many(specs), [1, 2, 3, 4, 5])
        data, groups = read_all(theirs, len(expected))
        self.assertEqual(data, expected)
        check(groups, data)
        with self.assertRaises(ValueError):
            c.send_fds(kc.PublishMemfd("a"), [])
        with self.assertRaises(ValueError):
            c.send_fds(kc.PublishMemfd("a"), [fd1] * 9)
        with self.assertRaises(ValueError):  # not in the handshake's write
            kc.KeyholeClient.connect(env={"KEYHOLE_SOCKET": "/nonexistent/s", "KEYHOLE_TOKEN": "0" * 64},
                                     early=[kc.RequestKind.AcceptFds])

        # Asyncio: after an AcceptFds in flight, the frame with descriptors
        # waits for its Ack; then it goes with sendmsg, after the bytes before it.
        async def main() -> None:
            ours2, theirs2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            theirs2.settimeout(IO_TIMEOUT)
            self.addCleanup(theirs2.close)
            ac = await kc.AsyncKeyholeClient.from_socket(ours2, kc.Welcome(2, "hub", 2, "fake", 1, 1, 4096),
                                                         timeout=IO_TIMEOUT)
            await ac.send(kc.RequestKind.Ping)  # through the transport, before descriptors are involved
            accept = await ac.send(kc.RequestKind.AcceptFds)
            sending = asyncio.ensure_future(ac.send_many(specs[1:]))
            await asyncio.sleep(0.1)
            self.assertFalse(sending.done(), "waits for the Ack of AcceptFds")
            head = await asyncio.get_running_loop().run_in_executor(None, recv_exactly, theirs2, 32)
            self.assertEqual(head, kc.encode_request(kc.Request(1, kc.RequestKind.Ping))
                             + kc.encode_request(kc.Request(2, kc.RequestKind.AcceptFds)))
            fd = kc.sealed_memfd(b"ev")
            try:  # the Ack, and an EventFds of a stream that is none of ours: a protocol error later
                socket.send_fds(theirs2, [kc.encode_daemon_frame(kc.Ack(1)) + kc.encode_daemon_frame(kc.Ack(accept))],
                                [fd])
            finally:
                os.close(fd)
            with self.assertRaises(kc.ProtocolError):  # descriptors no frame announces
                await sending
            self.assertTrue(ac.closed)
            ac.close()

            ours3, theirs3 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            theirs3.settimeout(IO_TIMEOUT)
            self.addCleanup(theirs3.close)
            ac = await kc.AsyncKeyholeClient.from_socket(ours3, kc.Welcome(2, "hub", 2, "fake", 1, 1, 4096),
                                                         timeout=IO_TIMEOUT)
            self.assertEqual(await ac.send_many(specs), [1, 2, 3, 4, 5])
            data, groups = await asyncio.get_running_loop().run_in_executor(None, read_all, theirs3, len(expected))
            self.assertEqual(data, expected)
            check(groups, data)
            ac.close()
            await ac.wait_closed()
        arun(main())

    def test_asyncio_attribution(self) -> None:
        async def main() -> None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            theirs.settimeout(IO_TIMEOUT)
            self.addCleanup(theirs.close)
            c = await kc.AsyncKeyholeClient.from_socket(ours, kc.Welcome(2, "hub", 2, "fake", 1, 1, 4096),
                                                        timeout=IO_TIMEOUT)
            theirs.sendall(kc.encode_daemon_frame(kc.Reply(1, kc.Subscribed())) + self.plain(1))
            sub = await c.subscribe("t")
            fd = kc.sealed_memfd(b"async")
            try:
                # The Ack, a plain event and the EventFds in one read, sent
                # before accept_fds reads anything.
                theirs.sendall(kc.encode_daemon_frame(kc.Ack(2)) + self.plain(2))
                socket.send_fds(theirs, [self.memfd_event(3, b"async")], [fd])
                await c.accept_fds()
                self.assertTrue(c.fds_accepted)
                self.assertEqual([await sub.next(), await sub.next()],
                                 [kc.Message("t", 1, b"x"), kc.Message("t", 2, b"x")])
                m = await sub.next()
                assert isinstance(m, kc.MessageMemfd)
                with m:
                    self.assertEqual(m.read(), b"async")
                    self.assertTrue(is_cloexec(m.fd))
                # A frame whose descriptors did not come with it.
                theirs.sendall(self.memfd_event(4, b"async"))
                with self.assertRaises(kc.ProtocolError):
                    await sub.next()
                self.assertTrue(c.closed)
            finally:
                os.close(fd)
            c.close()
            await c.wait_closed()
        arun(main())


class _Api:
    """One of the two APIs, driven the same way: ``run(x)`` is ``x`` for the
    blocking client and runs the coroutine ``x`` on this object's event loop
    for the asyncio one (one loop for the whole test, as its streams need)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop() if name == "asyncio" else None

    def run(self, x: Any) -> Any:
        if self.loop is None:
            return x
        return self.loop.run_until_complete(asyncio.wait_for(x, IO_TIMEOUT * 3))

    def connect(self, *args: Any, **kw: Any) -> Any:
        kw.setdefault("timeout", IO_TIMEOUT)
        if self.loop is None:
            return kc.KeyholeClient.connect(*args, **kw)
        return self.run(kc.AsyncKeyholeClient.connect(*args, **kw))

    def close(self, c: Any) -> None:
        c.close()
        if self.loop is not None:
            self.run(c.wait_closed())

    def end(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()

    def __enter__(self) -> "_Api":
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


API_NAMES = ("blocking", "asyncio")


def expect_frame(rid: int, service: str = "hub", version: int = 2) -> bytes:
    return kc.encode_request(kc.Request(rid, kc.RequestKind.Expect, expect=kc.Expect(service, version)))


class PipelinedHandshakeTests(unittest.TestCase):
    """Section 4 and 16 step 4: the handshake, an ``Expect`` of the hub and
    the first requests in one write, before ``Welcome`` is read; ``Expect``
    and ``WrongService`` (sections 6 and 8) against the real daemon; a
    refused handshake reported as such; busy refusals retried with the same
    bytes. Each test runs both APIs."""

    daemon: Daemon

    @classmethod
    def setUpClass(cls) -> None:
        cls.daemon = Daemon()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.close()

    # -- the real daemon ----------------------------------------------------

    def test_the_daemon_answers_expect_on_the_wire(self) -> None:
        """Raw bytes: an Expect of the hub is acked; one of another service,
        or of another version, gets Error WrongService (no id) and the end of
        the connection, and the Ping pipelined after it no answer; a
        malformed Expect is BadRequest with its id, and the connection stays."""
        hs = bytes(kc.encode_handshake(self.daemon.token()))
        s = self.daemon.raw()
        s.sendall(hs + bytes.fromhex(VECTORS["expect"]["hex"]) + ping_frame(1))
        self.assertEqual(read_frames(s, 3)[1:], [kc.Ack(0), kc.Ack(1)])
        s.sendall(expect_frame(2))  # at any time, any number of times
        self.assertEqual(read_frames(s, 1), [kc.Ack(2)])
        s.close()
        for service, version in (("notes", 1), ("hub", 1), ("hub", 3), ("Hub", 2), ("hub ", 2), ("", 2)):
            with self.subTest(service=service, version=version):
                s = self.daemon.raw()
                s.sendall(hs + ping_frame(1) + expect_frame(2, service, version) + ping_frame(3))
                frames, end = read_to_close(s)
                self.assertIsInstance(frames[0], kc.Welcome)
                self.assertEqual(frames[1], kc.Ack(1), "requests before the Expect are answered")
                self.assertEqual(len(frames), 3, frames)
                err = frames[2]
                self.assertIsInstance(err, kc.Error)
                self.assertEqual((err.id, err.code), (None, kc.ErrorCode.WrongService))  # type: ignore[union-attr]
                self.assertLessEqual(len(err.message.encode()), kc.MAX_ERROR_MESSAGE_LEN)  # type: ignore
                self.assertIn(end, ("EOF", "ECONNRESET"))
                s.close()
        for body in (b"", kc._string("hub"), kc._string("hub") + kc._u32(2) + b"\x00",
                     struct.pack("<Q", 2) + b"\xc3\x28" + kc._u32(2)):
            with self.subTest(body=body.hex()):
                s = self.daemon.raw()
                s.sendall(hs + kc.frame(struct.pack("<QI", 5, kc.RequestKind.Expect) + body) + ping_frame(6))
                w, err, ack = read_frames(s, 3)
                self.assertIsInstance(err, kc.Error)
                self.assertEqual((err.id, err.code), (5, kc.ErrorCode.BadRequest))  # type: ignore[union-attr]
                self.assertEqual(ack, kc.Ack(6), "the connection stays open")
                s.close()

    def test_an_expect_of_another_service_closes_with_wrong_service(self) -> None:
        """Through the client: expect() of the hub returns; an Expect of
        another service raises WrongServiceDaemonError naming both services,
        the connection is over, and the requests pipelined after it (a
        Publish here) are neither answered nor acted on."""
        for name in API_NAMES:
            with self.subTest(api=name), _Api(name) as api:
                topic = f"wrong.{api.name}"
                with self.daemon.client() as watcher:
                    sub = watcher.subscribe(topic)
                    c = api.connect(env=self.daemon.env)
                    self.assertIsNone(api.run(c.expect()))
                    self.assertIsNone(api.run(c.expect("hub", 2)))
                    ids = api.run(c.send_many([kc.Expect("notes", 1), kc.RequestKind.Ping,
                                               kc.Publish(topic, b"pipelined")]))
                    with self.assertRaises(kc.WrongServiceDaemonError) as ctx:
                        api.run(c.wait_reply(ids[0]))
                    err = ctx.exception
                    self.assertIsInstance(err, kc.WrongServiceError)
                    self.assertIsInstance(err, kc.KeyholeError)
                    self.assertEqual((err.code, err.id, err.closes), (16, None, True))
                    self.assertEqual((err.service, err.service_version, err.expected), ("hub", 2, ("notes", 1)))
                    self.assertIn("the daemon serves `hub` version 2, not `notes` version 1", str(err))
                    self.assertTrue(c.closed)
                    self.assertEqual(c.final_frame.code, kc.ErrorCode.WrongService)
                    with self.assertRaises(kc.ConnectionClosed) as ended:
                        api.run(c.wait_reply(ids[1]))
                    self.assertEqual(ended.exception.final_frame, c.final_frame, "no Ack for the Ping after it")
                    api.close(c)
                    with self.daemon.client() as p:
                        self.assertEqual(p.publish(topic, b"after"), 1)
                    m = sub.next()
                    self.assertEqual((m.payload, m.sequence), (b"after", 1), "the pipelined Publish never happened")

    def test_connect_pipelines_an_expect_and_the_first_requests(self) -> None:
        """Against the daemon: connect(early=[...]) gets every reply, and
        the ``Expect`` it put in front is acked (and kept off the replies)."""
        for name in API_NAMES:
            with self.subTest(api=name), _Api(name) as api:
                # A topic per API: the daemon may not have seen the previous connection's close yet.
                c = api.connect(env=self.daemon.env, early=[kc.StatusRequest(), kc.Subscribe(7, f"early.{name}.>"),
                                                            kc.Publish(f"early.{name}.one", b"1")])
                self.assertEqual(c.early_ids, [1, 2, 3])
                self.assertIsInstance(api.run(c.result(1)), kc.Status)
                self.assertEqual(api.run(c.result(2)), kc.Subscribed())
                self.assertEqual(api.run(c.result(3)), kc.Published(1))
                self.assertEqual(c.expect_reply, kc.Ack(0))
                self.assertEqual(api.run(c.subscriptions[7].next()).payload, b"1")
                with self.assertRaises(ValueError):  # id 0 is nobody's to wait for
                    api.run(c.wait_reply(0))
                api.close(c)

    def test_a_refused_handshake_with_pipelined_requests_is_the_refusal(self) -> None:
        """A wrong token with an Expect and a Publish behind it: BadToken, a
        HandshakeRefused, not a failed request; the Publish was discarded."""
        for name in API_NAMES:
            with self.subTest(api=name), _Api(name) as api:
                topic = f"refused.{api.name}"
                with self.daemon.client() as watcher:
                    sub = watcher.subscribe(topic)
                    with self.assertRaises(kc.BadTokenError) as ctx:
                        api.connect(self.daemon.socket_path, bytearray(TEST_TOKEN),
                                    early=[kc.Publish(topic, b"pipelined"), kc.RequestKind.Ping])
                    self.assertIsInstance(ctx.exception, kc.HandshakeRefused)
                    self.assertNotIsInstance(ctx.exception, kc.ConnectionClosed)
                    self.assertEqual(ctx.exception.attempts, 1)
                    with self.daemon.client() as p:
                        self.assertEqual(p.publish(topic, b"after"), 1)
                    self.assertEqual(sub.next().payload, b"after")

    # -- scripted daemons ---------------------------------------------------

    def test_everything_is_written_before_welcome_is_read(self) -> None:
        """The fake reads the handshake, the Expect and the first request
        before it sends a byte: a client that waited for Welcome first would
        hang here (and fail on its timeout)."""
        expected = expect_frame(0) + call_frame(1, kc.StatusRequest()) + call_frame(2, kc.Publish("a.b", b"x"))
        status = kc.Status(1, 0, 0, 0, 0, 0, 5, "9.9.9")
        for name in API_NAMES:
            with self.subTest(api=name), _Api(name) as api:
                seen: List[bytes] = []

                def script(conn: socket.socket, hs: bytes) -> None:
                    conn.settimeout(3.0)
                    seen.append(recv_exactly(conn, len(expected)))  # nothing sent yet
                    conn.sendall(welcome_bytes() + kc.encode_daemon_frame(kc.Ack(0))
                                 + kc.encode_daemon_frame(kc.Reply(1, status))
                                 + kc.encode_daemon_frame(kc.Reply(2, kc.Published(0))))

                fake = FakeDaemon(script)
                self.addCleanup(fake.close)
                c = api.connect(env=fake.env, timeout=5.0, early=[kc.StatusRequest(), kc.Publish("a.b", b"x")])
                self.assertEqual(fake.errors, [])
                self.assertEqual(fake.handshakes, [bytes.fromhex(VECTORS["handshake"]["hex"])])
                self.assertEqual(seen, [expected], "handshake, Expect (the vector's bytes), requests")
                self.assertEqual(expect_frame(0).hex(), VECTORS["expect"]["hex"])
                self.assertEqual(api.run(c.result(1)), status)
                self.assertEqual(api.run(c.result(2)), kc.Published(0))
                self.assertEqual(c.expect_reply, kc.Ack(0))
                self.assertEqual(api.run(c.send(kc.RequestKind.Ping)), 3, "ids go on after the early requests")
                api.close(c)

    def test_expect_is_sent_only_in_front_of_calls_unless_asked(self) -> None:
        """No Expect for Pings only (they mean the same to every daemon) nor
        for a generic client; expect=True sends one anyway, expect=False
        none; an early list that starts with its own Expect gets no second."""
        cases = [
            (dict(early=[kc.RequestKind.Ping]), ping_frame(1), [kc.Ack(1)]),
            (dict(early=[kc.RequestKind.Ping], expect=True), expect_frame(0) + ping_frame(1), [kc.Ack(0), kc.Ack(1)]),
            (dict(early=[kc.StatusRequest()], expect=False), call_frame(1, kc.StatusRequest()), None),
            (dict(early=[kc.Expect("hub", 2), kc.RequestKind.Ping]), expect_frame(1) + ping_frame(2),
             [kc.Ack(1), kc.Ack(2)]),
            (dict(early=[b"\x00\x00\x00\x00"], service=kc.RAW), call_frame(1, kc.StatusRequest()), None),
        ]
        for name in API_NAMES:
            with self.subTest(api=name), _Api(name) as api:
                for kw, wire, acks in cases:
                    with self.subTest(kw=repr(kw)):
                        seen: List[bytes] = []

                        def script(conn: socket.socket, hs: bytes, wire: bytes = wire, acks: Any = acks) -> None:
                            conn.settimeout(3.0)
                            seen.append(recv_exactly(conn, len(wire)))
                            replies = b"".join(kc.encode_daemon_frame(a) for a in acks or [])
                            if acks is None:
                                replies = kc.encode_daemon_frame(kc.Reply(1, kc.Status(1, 0, 0, 0, 0, 0, 5, "v")))
                            conn.sendall(welcome_bytes() + replies)

                        fake = FakeDaemon(script)
                        self.addCleanup(fake.close)
                        c = api.connect(env=fake.env, timeout=5.0, **kw)
                        self.assertEqual(seen, [wire])
                        for rid in c.early_ids:
                            api.run(c.wait_reply(rid))
                        api.close(c)

    def test_a_refusal_behind_pipelined_requests_is_reported_as_the_handshakes(self) -> None:
        """Every refusal a pending connection can get, sent once the fake has
        read the whole pipelined write: the handshake's error, never failed
        requests; and a Welcome of another service followed by WrongService
        is reported from the Welcome, naming both services."""
        pipelined = len(expect_frame(0) + call_frame(1, kc.Publish("a.b", b"x")))
        for name in API_NAMES:
            with self.subTest(api=name), _Api(name) as api:
                for name, cls in (("error_bad_token", kc.BadTokenError), ("error_bad_magic", kc.BadMagicError),
                                  ("error_auth_timeout", kc.AuthTimeoutError),
                                  ("error_shutting_down", kc.ShuttingDownError),
                                  ("error_too_many_connections", kc.TooManyConnectionsError)):
                    with self.subTest(name):
                        data = bytes.fromhex(VECTORS[name]["hex"])

                        def script(conn: socket.socket, hs: bytes, data: bytes = data) -> Any:
                            recv_exactly(conn, pipelined)
                            conn.sendall(data)
                            return "close"

                        fake = FakeDaemon(script)
                        self.addCleanup(fake.close)
                        with self.assertRaises(cls) as ctx:
                            api.connect(env=fake.env, early=[kc.Publish("a.b", b"x")], connect_timeout=0)
                        self.assertIsInstance(ctx.exception, kc.HandshakeRefused)
                        self.assertNotIsInstance(ctx.exception, kc.ConnectionClosed)
                        self.assertIsNone(ctx.exception.id)
                        self.assertEqual(fake.errors, [])

                def other(conn: socket.socket, hs: bytes) -> Any:
                    recv_exactly(conn, pipelined)
                    conn.sendall(welcome_bytes("notes", 1) + bytes.fromhex(VECTORS["error_wrong_service"]["hex"]))
                    return "close"

                fake = FakeDaemon(other)
                self.addCleanup(fake.close)
                with self.assertRaises(kc.WrongServiceError) as wrong:
                    api.connect(env=fake.env, early=[kc.Publish("a.b", b"x")])
                self.assertEqual(str(wrong.exception), "the daemon serves `notes` version 1, not `hub` version 2")

    def test_busy_refusals_are_retried_with_the_same_bytes(self) -> None:
        """TooManyUnauthenticated and TooManyConnections of a pipelined
        handshake: the client connects again and writes the same bytes
        (handshake, Expect, requests), within its connect timeout."""
        hs = bytes.fromhex(VECTORS["handshake"]["hex"])
        pipelined = expect_frame(0) + call_frame(1, kc.StatusRequest())
        refusals = [bytes.fromhex(VECTORS["error_too_many_unauthenticated"]["hex"]),
                    bytes.fromhex(VECTORS["error_too_many_connections"]["hex"])]
        status = kc.Status(1, 0, 0, 0, 0, 0, 5, "9.9.9")
        for name in API_NAMES:
            with self.subTest(api=name), _Api(name) as api:
                writes: List[bytes] = []
                fake: FakeDaemon

                def script(conn: socket.socket, hs: bytes) -> Any:
                    writes.append(hs + recv_exactly(conn, len(pipelined)))
                    if fake.accepted <= len(refusals):
                        conn.sendall(refusals[fake.accepted - 1])
                        return "close"
                    conn.sendall(welcome_bytes() + kc.encode_daemon_frame(kc.Ack(0))
                                 + kc.encode_daemon_frame(kc.Reply(1, status)))
                    return None

                fake = FakeDaemon(script, connections=3)
                self.addCleanup(fake.close)
                token = bytearray(TEST_TOKEN)
                c = api.connect(fake.path, token, connect_timeout=5, early=[kc.StatusRequest()])
                self.assertEqual(token, bytearray(32), "the token kept for the retries, then wiped")
                self.assertEqual((c.attempts, fake.accepted), (3, 3))
                self.assertEqual(writes, [hs + pipelined] * 3, "the same bytes on every attempt")
                self.assertEqual(api.run(c.result(1)), status)
                api.close(c)


# --------------------------------------------------------------------------
# 9. The command line, the package, the README's examples
# --------------------------------------------------------------------------


class CommandLineTests(unittest.TestCase):
    """``python3 -m keyhole_client``: help, and the Rust CLI's exit codes."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="khpy-cli-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def test_help(self) -> None:
        r = py_cli(["--help"], {})
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout.decode()
        self.assertTrue(out.startswith("usage: python3 -m keyhole_client"), out)
        for command in ("ping", "status", "topics", "pub", "sub", "req", "stop"):
            self.assertIn(command, out)
        for line in ("3  daemon not running", "4  permission or token problem", "2  bad usage",
                     "5  authentication refused", "6  timeout", "8  the daemon serves another service"):
            self.assertIn(line, out)
        rust = cli(["--help"], {}).stdout.decode()  # the same codes as the Rust CLI's help
        for code, words in ((3, "daemon not running"), (4, "permission or token problem"), (2, "bad usage"),
                            (5, "authentication refused"), (6, "timeout")):
            self.assertIn(f"{code} {words}", rust)
        r = py_cli(["sub", "--help"], {})
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(b"--drop-oldest", r.stdout)
        for args in ([], ["frob"], ["sub"], ["--timeout", "0", "ping"], ["--timeout", "nan", "ping"],
                     ["ping", "-c", "0"]):
            with self.subTest(args=args):
                r = py_cli(args, {})
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertIn(b"usage:", r.stderr)

    def test_no_daemon_is_daemon_not_running_whatever_the_token(self) -> None:
        """Exit 3, as the Rust CLI: the socket is checked before the token."""
        missing = os.path.join(self.tmp, "rt")
        stale = os.path.join(self.tmp, "stale.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(stale)  # bound, never listening
        self.addCleanup(s.close)
        bad_file = os.path.join(self.tmp, "t644")
        with open(bad_file, "w") as f:
            f.write("0" * 64 + "\n")
        os.chmod(bad_file, 0o644)
        for env in ({"KEYHOLE_DIR": missing},
                    {"KEYHOLE_DIR": missing, "KEYHOLE_TOKEN_FILE": bad_file},
                    {"KEYHOLE_DIR": missing, "KEYHOLE_TOKEN": "not a token"},
                    {"KEYHOLE_SOCKET": stale},
                    {"KEYHOLE_SOCKET": stale, "KEYHOLE_TOKEN_FILE": bad_file},
                    {}):  # no runtime directory at all
            with self.subTest(env=env):
                r = py_cli(["ping"], env)
                self.assertEqual(r.returncode, 3, r.stderr)
                self.assertEqual(cli(["ping"], env).returncode, 3, "the Rust CLI agrees")
                if env:
                    self.assertIn(b"daemon not running", r.stderr)
                else:
                    self.assertIn(b"KEYHOLE_DIR", r.stderr)

    def test_token_and_permission_problems_exit_4(self) -> None:
        with Daemon() as d:
            bad_file = os.path.join(self.tmp, "t644")
            shutil.copy(d.token_path, bad_file)
            os.chmod(bad_file, 0o644)
            for args, env in ((["ping"], {**d.env, "KEYHOLE_TOKEN_FILE": bad_file}),
                              (["--token-file", bad_file, "ping"], d.env),
                              (["--token-file", os.path.join(self.tmp, "none"), "ping"], d.env),
                              (["ping"], {**d.env, "KEYHOLE_TOKEN": "zz"}),
                              (["ping"], {**d.env, "KEYHOLE_DAEMON_UID": str(os.geteuid() + 4242)}),
                              (["ping"], {**d.env, "KEYHOLE_DAEMON_UID": "+1"}),
                              (["ping"], {"KEYHOLE_SOCKET": d.socket_path})):  # no token, no runtime directory
                with self.subTest(args=args, env=env):
                    r = py_cli(args, env)
                    self.assertEqual(r.returncode, 4, r.stderr)
                    self.assertEqual(cli(args, env).returncode, 4, "the Rust CLI agrees")
            self.assertEqual(py_cli(["ping"], {**d.env, "KEYHOLE_TOKEN": "00" * 32}).returncode, 5)
            self.assertEqual(py_cli(["ping"], d.env).returncode, 0)

    def test_an_invalid_subject_is_a_usage_error_before_connecting(self) -> None:
        path = os.path.join(self.tmp, "fake.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(4)
        listener.setblocking(False)
        self.addCleanup(listener.close)
        env = {"KEYHOLE_SOCKET": path, "KEYHOLE_TOKEN": TEST_TOKEN.hex()}
        for args in (["pub", "a..b", "x"], ["pub", "a.*", "x"], ["sub", "ok", "a.>.b"], ["req", "svc.>", "x"],
                     ["pub", "", "x"], ["pub", "x" * 256, "x"]):
            with self.subTest(args=args):
                r = py_cli(args, env)
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertIn(b"keyhole_client:", r.stderr)
        with self.assertRaises(BlockingIOError):
            listener.accept()  # nobody connected: the check is local
        self.assertEqual(py_cli(["pub", "a..b", "x"], {"KEYHOLE_DIR": os.path.join(self.tmp, "none")}).returncode,
                         2, "with no daemon at all, too")


class PackageTests(unittest.TestCase):

    def test_the_package_under_test_is_the_one_expected(self) -> None:
        """From the source tree by default; with KEYHOLE_EXPECT_INSTALLED=1,
        the installed package in this interpreter's site-packages (and the
        command line's child process imports the same one)."""
        here = os.path.realpath(kc.__file__)
        if EXPECT_INSTALLED:
            site = os.path.realpath(sysconfig.get_paths()["purelib"])
            self.assertTrue(here.startswith(site + os.sep), f"{here} is not in {site}")
            self.assertFalse(here.startswith(os.path.realpath(PACKAGE_ROOT) + os.sep), here)
            self.assertNotEqual(sys.prefix, sys.base_prefix, "not in a virtual environment")
        else:
            self.assertEqual(here, os.path.realpath(os.path.join(PACKAGE_ROOT, "keyhole_client", "__init__.py")))
        r = subprocess.run([sys.executable, "-c", "import keyhole_client; print(keyhole_client.__file__)"],
                           env=py_env({}), capture_output=True, timeout=IO_TIMEOUT, cwd=tempfile.gettempdir())
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(os.path.realpath(r.stdout.decode().strip()), here)
        self.assertTrue(os.path.isfile(os.path.join(os.path.dirname(here), "py.typed")), "typed: py.typed")

    def test_stdlib_only(self) -> None:
        """Every module of the package imports only the standard library and itself."""
        pkg = os.path.dirname(kc.__file__)
        stdlib = set(sys.stdlib_module_names)
        for name in sorted(os.listdir(pkg)):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(pkg, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for mod in mods:
                    self.assertIn(mod.split(".")[0], stdlib | {"__future__"}, f"{name} imports {mod}")


class ConformanceKitTests(unittest.TestCase):
    """The conformance kit (proto-spec.md Part IV, ``keyhole-conformance``,
    from ``KEYHOLE_CONFORMANCE_BIN``) against this client's driver,
    ``python -m keyhole_client.conformance``, as section 17.1 runs it."""

    KIT_TIMEOUT = 120.0
    """The whole run: a passing one takes a few seconds."""

    def kit_steps(self) -> List[str]:
        r = subprocess.run([KEYHOLE_CONFORMANCE, "--list"], capture_output=True, timeout=IO_TIMEOUT)
        self.assertEqual(r.returncode, 0, r.stderr)
        steps = [line.split()[0] for line in r.stdout.decode().splitlines() if line.strip()]
        self.assertEqual(steps[0], "hello")
        return steps

    def run_kit(self, *args: str) -> Tuple[Dict[str, Any], subprocess.CompletedProcess]:
        """Start the kit on a temporary directory, run the driver once
        ``session-token`` exists, and return the kit's JSON report and the
        driver's process."""
        with tempfile.TemporaryDirectory(prefix="keyhole-kit-") as tmp:
            kit_dir = os.path.join(tmp, "kit")
            kit = subprocess.Popen([KEYHOLE_CONFORMANCE, "--dir", kit_dir, "--json", *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                wait_for(lambda: os.path.exists(os.path.join(kit_dir, "session-token")) or kit.poll() is not None,
                         "the kit's session-token")
                self.assertIsNone(kit.poll(), "the kit exited before the driver ran")
                driver = subprocess.run([sys.executable, "-m", "keyhole_client.conformance"],
                                        env=py_env({"KEYHOLE_DIR": kit_dir}), capture_output=True,
                                        timeout=self.KIT_TIMEOUT, cwd=tmp)
                out, err = kit.communicate(timeout=self.KIT_TIMEOUT)
            finally:
                if kit.poll() is None:
                    kit.kill()
                    kit.wait()
            detail = (f"kit exit {kit.returncode}\n--- kit stdout\n{out.decode()}\n--- kit stderr\n{err.decode()}"
                      f"\n--- driver exit {driver.returncode}, stderr\n{driver.stderr.decode()}")
            try:
                result: Dict[str, Any] = json.loads(out)
            except ValueError:
                self.fail(f"the kit's report is not JSON\n{detail}")
            result["detail"] = detail
            self.assertFalse(os.path.exists(os.path.join(kit_dir, "keyhole.sock")), "the kit removes its socket")
            return result, driver

    def check_pass(self, *args: str) -> None:
        steps = self.kit_steps()
        result, driver = self.run_kit(*args)
        why = result.pop("detail")
        self.assertEqual(result["verdict"], "pass", why)
        self.assertIsNone(result["failed"], why)
        self.assertEqual(result["skipped"], [], why)
        # Every step of --list passed; hello, the run's start, is not counted.
        self.assertEqual(result["passed"], steps[1:], why)
        self.assertEqual(int(result["steps"]), len(steps) - 1, why)
        self.assertEqual(driver.returncode, 0, why)

    def test_the_driver_passes_every_step_of_the_kit(self) -> None:
        self.check_pass()

    def test_the_driver_passes_every_step_under_a_frame_limit_of_65536(self) -> None:
        """``--max-frame-len``: the steps at the frame limit follow it (below
        about 8 KiB the frame-limit steps' instructions and reports do not
        fit in the main connection's frames: a defect of the kit)."""
        self.check_pass("--max-frame-len", "65536")

    def test_the_driver_exits_1_without_a_kit(self) -> None:
        with tempfile.TemporaryDirectory(prefix="keyhole-kit-") as tmp:
            r = subprocess.run([sys.executable, "-m", "keyhole_client.conformance"],
                               env=py_env({"KEYHOLE_DIR": tmp}), capture_output=True, timeout=IO_TIMEOUT, cwd=tmp)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn(b"could not connect", r.stderr)

    def test_payloads_follow_section_17_3(self) -> None:
        from keyhole_client import conformance as k
        self.assertEqual(k.show_payload(b""), "")
        self.assertEqual(k.show_payload(b"\x00\xab"), "00ab")
        self.assertEqual(k.show_payload(b"\x07" * 4096), "07" * 4096)
        self.assertEqual(k.show_payload(b"\x07" * 4097), {"fill": "07", "len": "4097"})
        self.assertEqual(k.show_payload(b"\x07" * 4096 + b"\x08"), {"len": "4097"})
        self.assertEqual(k.parse_payload({"fill": "ff", "len": "3"}), b"\xff\xff\xff")
        self.assertEqual(k.parse_payload("00ff"), b"\x00\xff")
        self.assertEqual(k.num(2 ** 64 - 1), "18446744073709551615")
        self.assertEqual(k.error_result(kc.ProtocolError("x")), {"error": {"kind": "protocol"}})
        self.assertEqual(k.error_result(kc.ReplyTooLargeError(9)),
                         {"error": {"kind": "outcome", "outcome": "reply_too_large", "len": "9"}})


def readme_examples() -> List[Tuple[str, str]]:
    """The README's Python client examples: each ```python block of the
    "Python client" section that is followed by a ```text block (its output)."""
    with open(README_PATH, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^## Python client\n(.*?)(?=^## )", text, re.S | re.M)
    assert m is not None, "the README has no Python client section"
    return re.findall(r"```python\n(.*?)```\n(?:(?!```).)*?```text\n(.*?)```", m.group(1), re.S)


class ReadmeExampleTests(unittest.TestCase):

    def test_the_readme_examples_run_and_print_what_it_shows(self) -> None:
        examples = readme_examples()
        self.assertGreaterEqual(len(examples), 2, "a blocking and an asyncio example")
        self.assertTrue(any("AsyncKeyholeClient" in code for code, _ in examples))
        self.assertTrue(any("KeyholeClient.connect" in code and "async" not in code for code, _ in examples))
        for code, expected in examples:
            with self.subTest(code=code.splitlines()[0]), Daemon() as d:
                r = subprocess.run([sys.executable, "-c", code], env=py_env(d.env), capture_output=True,
                                   timeout=IO_TIMEOUT * 2, cwd=d.tmp)
                self.assertEqual(r.returncode, 0, r.stderr.decode())
                self.assertEqual(r.stdout.decode(), expected)


# --------------------------------------------------------------------------


def main() -> int:
    """Run every test; print ``N passed, N failed``; exit non-zero on failure."""
    faulthandler.dump_traceback_later(240, exit=True)  # never hang a CI job
    missing = [name for name, path in (("KEYHOLED_BIN", KEYHOLED), ("KEYHOLE_BIN", KEYHOLE),
                                       ("KEYHOLE_CONFORMANCE_BIN", KEYHOLE_CONFORMANCE))
               if not path or not os.access(path, os.X_OK)]
    if missing:
        print(f"{', '.join(missing)} must name the keyholed/keyhole/keyhole-conformance executables",
              file=sys.stderr)
        print("0 passed, 1 failed")
        return 1
    start = time.monotonic()
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    try:
        result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)
    finally:
        _kill_leftovers()
    # Count test methods, not subtests: a method with failing subtests fails once.
    failed_ids = {getattr(t, "test_case", t).id() for t, _ in result.failures + result.errors}
    failed = len(failed_ids) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    if skipped:
        print(f"{skipped} skipped (see above)")
    print(f"finished in {time.monotonic() - start:.1f} s")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or result.testsRun == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
