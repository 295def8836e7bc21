#!/usr/bin/env python3
"""Tests for the Python keyhole client (protocol version 2), written from
``proto-spec.md`` alone.

Run with the Rust binaries in the environment::

    KEYHOLED_BIN=target/debug/keyholed KEYHOLE_BIN=target/debug/keyhole \\
        python3 tests/clients/python/test_client.py

The script checks the client's encoders and decoders against
``tests/vectors/golden.json`` and the vector blocks of ``proto-spec.md``,
plays scripted fake daemons to check the client's protocol-error rules, and
starts its own ``keyholed`` daemons in temporary directories to drive the real
daemon (and the Rust CLI) through every behaviour the spec documents. It uses
the standard library only, exits non-zero on any failure, and ends with a line
``N passed, N failed``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree

import keyhole_client as kc  # noqa: E402

REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
GOLDEN_PATH = os.path.join(REPO, "tests", "vectors", "golden.json")
SPEC_PATH = os.path.join(REPO, "proto-spec.md")
CLIENT_PATH = os.path.join(HERE, "keyhole_client.py")
KEYHOLED = os.environ.get("KEYHOLED_BIN", "")
KEYHOLE = os.environ.get("KEYHOLE_BIN", "")

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
    14: ("Internal", True, False), 15: ("OverBudget", False, True),
}


# --------------------------------------------------------------------------
# Helpers: JSON forms of the golden file, raw connections, daemons
# --------------------------------------------------------------------------


def hub_request_from_json(call: Any) -> kc.HubRequest:
    """A hub request from golden.json's externally tagged serde form."""
    if call == "Status":
        return kc.StatusRequest()
    (name, fields), = call.items()
    if name == "Subscribe":
        return kc.Subscribe(fields["topic"])
    if name == "Unsubscribe":
        return kc.Unsubscribe(fields["topic"])
    if name == "Publish":
        return kc.Publish(fields["topic"], bytes(fields["payload"]))
    raise AssertionError(f"unknown hub request in golden.json: {call!r}")


def request_from_json(obj: Dict[str, Any]) -> kc.Request:
    """A transport request from golden.json's ``request`` object."""
    kind = kc.RequestKind[obj["kind"]]
    call = hub_request_from_json(obj["call"]) if kind == kc.RequestKind.Call else None
    return kc.Request(obj["id"], kind, call)


def hub_reply_to_json(reply: Any) -> Any:
    if isinstance(reply, kc.Status):
        return {"Status": {"authenticated": reply.authenticated, "pending": reply.pending, "topics": reply.topics,
                           "subscriptions": reply.subscriptions, "uptime_ms": reply.uptime_ms,
                           "version": reply.version}}
    return type(reply).__name__  # unit variants are strings


def frame_to_json(f: kc.DaemonFrame) -> Dict[str, Any]:
    """The externally tagged serde form of a decoded daemon frame (golden.json's ``frame``)."""
    if isinstance(f, kc.Welcome):
        return {"Welcome": {"protocol_version": f.protocol_version, "service": f.service,
                            "service_version": f.service_version, "software_version": f.software_version,
                            "instance_id": f.instance_id, "connection_id": f.connection_id,
                            "max_frame_len": f.max_frame_len}}
    if isinstance(f, kc.Reply):
        return {"Reply": {"id": f.id, "reply": hub_reply_to_json(f.reply)}}
    if isinstance(f, kc.Event):
        m = f.event
        return {"Event": {"event": {"Message": {"topic": m.topic, "sequence": m.sequence,
                                                "payload": list(m.payload)}}}}
    if isinstance(f, kc.Ack):
        return {"Ack": {"id": f.id}}
    if isinstance(f, kc.Error):
        return {"Error": {"id": f.id, "code": f.code, "message": f.message}}
    if isinstance(f, kc.Closing):
        return {"Closing": f.reason.name}
    raise AssertionError(f"not a daemon frame: {f!r}")


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


def welcome_bytes(service: str = "hub", service_version: int = 1, protocol_version: int = 2,
                  max_frame_len: int = 16777216) -> bytes:
    return kc.encode_daemon_frame(kc.Welcome(protocol_version, service, service_version, "9.9.9",
                                             0x1122334455667788, 42, max_frame_len))


def cli(args: Sequence[str], env: Dict[str, str], input_: Optional[bytes] = None,
        timeout: float = IO_TIMEOUT) -> subprocess.CompletedProcess:
    """Run the Rust ``keyhole`` CLI with only ``env`` (plus PATH) as its environment."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    return subprocess.run([KEYHOLE, *args], env=full_env, input=input_, capture_output=True, timeout=timeout)


def py_cli(args: Sequence[str], env: Dict[str, str], input_: Optional[bytes] = None) -> subprocess.CompletedProcess:
    """Run this client's own command line."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1", **env}
    return subprocess.run([sys.executable, CLIENT_PATH, *args], env=full_env, input=input_,
                          capture_output=True, timeout=IO_TIMEOUT)


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
        self.assertEqual(sorted(names), ["ping", "publish", "shutdown", "status", "subscribe", "unsubscribe"])
        for name in names:
            with self.subTest(name):
                v = VECTORS[name]
                req = request_from_json(v["request"])
                self.assertEqual(kc.encode_request(req).hex(), v["hex"])
                payload, rest = kc.split_frame(bytes.fromhex(v["hex"]))
                self.assertEqual(rest, b"")
                self.assertEqual(kc.decode_request(payload), req)

    def test_every_daemon_vector_decodes_to_its_json_frame(self) -> None:
        names = [n for n, v in VECTORS.items() if v["direction"] == "daemon_to_client"]
        codes_seen = set()
        kinds_seen = set()
        for name in names:
            with self.subTest(name):
                v = VECTORS[name]
                payload, rest = kc.split_frame(bytes.fromhex(v["hex"]))
                self.assertEqual(rest, b"")
                f = kc.decode_daemon_frame(payload)
                self.assertEqual(frame_to_json(f), v["frame"])
                self.assertEqual(kc.encode_daemon_frame(f).hex(), v["hex"])
                kinds_seen.add(type(f).__name__)
                if isinstance(f, kc.Error):
                    codes_seen.add(f.code)
                    self.assertEqual(f.id is not None, not f.closes)
                    self.assertLessEqual(len(f.message.encode()), kc.MAX_ERROR_MESSAGE_LEN)
                if isinstance(f, kc.Welcome):
                    kc.check_welcome(f)  # the example Welcome is acceptable to a hub client
        self.assertEqual(kinds_seen, {"Welcome", "Reply", "Event", "Ack", "Error", "Closing"})
        self.assertEqual(codes_seen, set(range(16)) | {1000, 1001, 1002}, "one Error vector per code")
        replies = {frame_to_json(kc.decode_daemon_frame(kc.split_frame(bytes.fromhex(v["hex"]))[0]))["Reply"]["reply"]
                   .__class__.__name__ for v in VECTORS.values() if v["name"].startswith("reply_")}
        self.assertEqual(replies, {"dict", "str"})

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
                    self.assertEqual(req, kc.Request(7, kc.RequestKind.Call, kc.Subscribe("")))
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
                self.assertEqual(cls.__name__, name + "Error")
                err = kc.KeyholeError.from_frame(kc.Error(5 if has_id else None, code, "text"))
                self.assertIsInstance(err, cls)
                self.assertEqual((err.code, err.name, err.message, err.closes), (code, name, "text", closes))
                self.assertFalse(err.is_service_error)
                kc.check_error_frame(kc.Error(5 if has_id else None, code, ""))
                with self.assertRaises(kc.ProtocolError):  # id presence contradicting the table
                    kc.check_error_frame(kc.Error(None if has_id else 5, code, ""))
        self.assertEqual(max(SECTION_8), 15)
        for code in (16, 17, 500, 999):  # 16 is the negative vector server_unknown_error_code
            with self.assertRaises(kc.ProtocolError):
                kc.check_error_frame(kc.Error(None, code, ""))
        for code in (0, 1, 2, 3, 4, 5, 6, 7, 13):
            self.assertTrue(issubclass(kc.ERROR_CLASSES[kc.ErrorCode(code)], kc.HandshakeRefused))
        for code in (8, 9, 10, 11, 12, 14, 15):  # OverBudget is for authenticated connections only
            self.assertFalse(issubclass(kc.ERROR_CLASSES[kc.ErrorCode(code)], kc.HandshakeRefused))
        self.assertEqual(kc.BUSY_ERRORS, {kc.ErrorCode.TooManyUnauthenticated, kc.ErrorCode.TooManyConnections})
        err = kc.KeyholeError.from_frame(kc.Error(None, 15, "budget"))
        self.assertIsInstance(err, kc.OverBudgetError)
        self.assertEqual((err.code, err.name, err.id, err.closes), (15, "OverBudget", None, True))

    def test_hub_error_codes(self) -> None:
        e = kc.KeyholeError.from_frame(kc.Error(13, 1000, "m"))
        self.assertIsInstance(e, kc.InvalidTopicError)
        self.assertEqual((e.code, e.service_code, e.id, e.closes, e.is_service_error), (1000, 0, 13, False, True))
        e = kc.KeyholeError.from_frame(kc.Error(14, 1001, "m"))
        self.assertIsInstance(e, kc.HubShuttingDownError)
        self.assertNotIsInstance(e, kc.ShuttingDownError)  # transport ShuttingDown (13) is another error
        e = kc.KeyholeError.from_frame(kc.Error(15, 1002, "m"))
        self.assertIsInstance(e, kc.TooManySubscriptionsError)
        self.assertEqual((e.code, e.service_code, e.id, e.closes, e.name), (1002, 2, 15, False,
                                                                           "TooManySubscriptions"))
        self.assertEqual(kc.MAX_SUBSCRIPTIONS, 4096)
        e = kc.KeyholeError.from_frame(kc.Error(3, 1007, "m"))  # unknown to this client: reported
        self.assertIs(type(e), kc.ServiceError)
        self.assertEqual((e.service_code, e.id, e.closes), (7, 3, False))
        self.assertIn("service error 7", str(e))
        kc.check_error_frame(kc.Error(1, 0xFFFFFFFF, ""))
        for code in (1000, 1001, 1002, 1007):
            with self.assertRaises(kc.ProtocolError):  # a service's errors always carry the id
                kc.check_error_frame(kc.Error(None, code, ""))

    def test_hub_layout_sizes(self) -> None:
        """Section 13's byte layout table."""
        size = lambda call: len(kc.encode_request_payload(kc.Request(1, kc.RequestKind.Call, call)))  # noqa: E731
        self.assertEqual(size(kc.StatusRequest()), 16)
        for t in ("a", "news", "é" * 100, "x" * 255):
            n = len(t.encode())
            self.assertEqual(size(kc.Subscribe(t)), 24 + n)
            self.assertEqual(size(kc.Unsubscribe(t)), 24 + n)
            for p in (b"", b"hello", bytes(1000)):
                self.assertEqual(size(kc.Publish(t, p)), 32 + n + len(p))
                ev = kc.encode_daemon_frame_payload(kc.Event(kc.Message(t, 2 ** 64 - 1, p)))
                self.assertEqual(len(ev), 32 + n + len(p), "an Event is the size of its Publish")
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
        good = kc.encode_daemon_frame_payload(kc.Event(kc.Message("news", 1, b"hello")))
        self.assertEqual(kc.decode_daemon_frame(good), kc.Event(kc.Message("news", 1, b"hello")))
        cases = {
            "trailing byte": good + b"\x00",
            "truncated": good[:-1],
            "unknown frame tag": struct.pack("<I", 6),
            "unknown hub event tag": struct.pack("<II", 2, 1) + good[8:],
            "bad UTF-8 topic": struct.pack("<IIQ", 2, 0, 2) + b"\xc3\x28" + struct.pack("<QQ", 1, 0),
            "bad option byte": struct.pack("<IB", 4, 2) + struct.pack("<IQ", 0, 0),
            "huge length": struct.pack("<IIQ", 2, 0, 2 ** 63) + b"x",
            "unknown hub reply tag": struct.pack("<IQI", 1, 1, 4),
            "reply without body": struct.pack("<IQ", 1, 1),
            "event without body": struct.pack("<I", 2),
            "Ack with a trailing byte": struct.pack("<IQ", 3, 1) + b"\x00",
            "Ack truncated": struct.pack("<I", 3) + b"\x01\x00",
            "Closing reason 2": struct.pack("<II", 5, 2),
            "Closing trailing": struct.pack("<III", 5, 0, 0),
            "Welcome truncated": bytes.fromhex(VECTORS["welcome"]["hex"])[4:-1],
            "Welcome trailing": bytes.fromhex(VECTORS["welcome"]["hex"])[4:] + b"\x00",
            "Error trailing": bytes.fromhex(VECTORS["error_bad_token"]["hex"])[4:] + b"!",
            "Error bad UTF-8 message": struct.pack("<IBIQ", 4, 0, 3, 1) + b"\xff",
            "empty payload": b"",
        }
        for what, payload in cases.items():
            with self.subTest(what), self.assertRaises(kc.ProtocolError):
                kc.decode_daemon_frame(payload)
        t0 = time.monotonic()
        for _ in range(1000):  # a short frame announcing a long string costs nothing
            with self.assertRaises(kc.DecodeError):
                kc.decode_daemon_frame(struct.pack("<IIQ", 2, 0, 2 ** 63 - 1))
        self.assertLess(time.monotonic() - t0, 1.0)
        with self.assertRaises(kc.FrameTooLargeError):
            kc.split_frame(struct.pack("<I", kc.PROTOCOL_MAX_FRAME_LEN + 1))
        # A byte-order mark is part of the text, not stripped.
        bom = struct.pack("<IIQ", 2, 0, 4) + b"\xef\xbb\xbfa" + struct.pack("<QQ", 1, 0)
        self.assertEqual(kc.decode_daemon_frame(bom).event.topic, "\ufeffa")  # type: ignore[union-attr]
        # An Error message over 512 bytes is not one of section 7's protocol errors.
        long = kc.Error(None, 9, "x" * 600)
        self.assertEqual(kc.decode_daemon_frame(kc.encode_daemon_frame_payload(long)), long)

    def test_welcome_checks(self) -> None:
        w = kc.decode_daemon_frame(bytes.fromhex(VECTORS["welcome"]["hex"])[4:])
        assert isinstance(w, kc.Welcome)
        kc.check_welcome(w)
        for field, value in (("protocol_version", 1), ("protocol_version", 3), ("max_frame_len", 1023),
                             ("max_frame_len", 0), ("max_frame_len", 16777217), ("max_frame_len", 2 ** 32 - 1)):
            with self.subTest(f"{field}={value}"), self.assertRaises(kc.ProtocolError):
                kc.check_welcome(kc.Welcome(**{**w.__dict__, field: value}))
        for value in (1024, 4096, 16777216):
            kc.check_welcome(kc.Welcome(**{**w.__dict__, "max_frame_len": value}))
        with self.assertRaises(kc.WrongServiceError) as ctx:
            kc.check_welcome(kc.Welcome(**{**w.__dict__, "service": "notes"}))
        self.assertEqual(str(ctx.exception), "the daemon serves `notes` version 1, not `hub` version 1")
        self.assertEqual((ctx.exception.service, ctx.exception.service_version), ("notes", 1))
        with self.assertRaises(kc.WrongServiceError) as ctx:
            kc.check_welcome(kc.Welcome(**{**w.__dict__, "service_version": 2}))
        self.assertEqual(str(ctx.exception), "the daemon serves `hub` version 2, not `hub` version 1")
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
        self.assertEqual(rejected(struct.pack("<QI", 4, 3)), (kc.ErrorCode.UnknownRequest, 4, False))
        self.assertEqual(rejected(struct.pack("<QI", 4, 0xFFFFFFFF) + b"junk"), (kc.ErrorCode.UnknownRequest, 4, False))
        self.assertEqual(rejected(struct.pack("<QI", 5, 2) + b"\x00"), (kc.ErrorCode.BadRequest, 5, False))
        self.assertEqual(rejected(struct.pack("<QI", 6, 0)), (kc.ErrorCode.BadRequest, 6, False))  # Call, no body
        self.assertEqual(rejected(struct.pack("<QII", 7, 0, 3) + struct.pack("<Q", 1) + b"t"),
                         (kc.ErrorCode.BadRequest, 7, False))  # Publish without its payload

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

    def test_topic_checks(self) -> None:
        for ok in ("a", "t" * 255, "é" * 127, "news/sub topic"):
            kc.check_topic(ok)
        for bad in ("", "t" * 256, "é" * 128, "\ud800"):
            with self.subTest(bad=bad[:4]), self.assertRaises(kc.TopicError):
                kc.check_topic(bad)


# --------------------------------------------------------------------------
# 2. The connection logic against scripted daemon bytes
# --------------------------------------------------------------------------


class FakeDaemonTests(unittest.TestCase):
    """Section 7's protocol-error rules, events, errors and the end of the
    connection, against scripted daemon bytes on a socketpair."""

    def make(self, max_frame_len: int = 4096, **kw: Any) -> Tuple[kc.KeyholeClient, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(IO_TIMEOUT)
        theirs.settimeout(IO_TIMEOUT)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        welcome = kc.Welcome(2, "hub", 1, "fake", 1, 1, max_frame_len)
        return kc.KeyholeClient(ours, welcome, bytearray(), **kw), theirs

    @staticmethod
    def ev(seq: int, topic: str = "t", payload: bytes = b"x") -> bytes:
        return kc.encode_daemon_frame(kc.Event(kc.Message(topic, seq, payload)))

    @staticmethod
    def reply(rid: int, r: Any) -> bytes:
        return kc.encode_daemon_frame(kc.Reply(rid, r))

    @staticmethod
    def ack(rid: int) -> bytes:
        return kc.encode_daemon_frame(kc.Ack(rid))

    @staticmethod
    def err(rid: Optional[int], code: int) -> bytes:
        return kc.encode_daemon_frame(kc.Error(rid, code, "scripted"))

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

    def test_events_interleaved_with_replies_are_queued(self) -> None:
        c, d = self.make()
        ids = c.send_many([kc.RequestKind.Ping, kc.StatusRequest()])
        status = kc.Status(1, 0, 1, 1, 5, "fake")
        d.sendall(self.ev(8) + self.ack(ids[0]) + self.ev(9) + self.reply(ids[1], status))
        self.assertEqual(c.result(ids[1]), status)  # the Ack is kept for its own waiter
        self.assertEqual(c.wait_reply(ids[0]), kc.Ack(ids[0]))
        self.assertEqual(c.queued_events, 2)
        self.assertEqual([c.next_event().sequence, c.next_event().sequence], [8, 9])

    def test_next_event_keeps_replies_that_arrive_meanwhile(self) -> None:
        c, d = self.make()
        rid = c.send(kc.Subscribe("t"))
        d.sendall(self.reply(rid, kc.Subscribed()) + self.ev(1))
        self.assertEqual(c.next_event(), kc.Message("t", 1, b"x"))
        self.assertEqual(c.result(rid), kc.Subscribed())

    def test_reply_for_another_id_is_a_protocol_error(self) -> None:
        c, d = self.make()
        ids = c.send_many([kc.RequestKind.Ping, kc.RequestKind.Ping])
        d.sendall(self.ack(ids[1]))
        self.assert_protocol_error(c, lambda: c.wait_reply(ids[1]))

    def test_reply_with_no_request_outstanding_is_a_protocol_error(self) -> None:
        for data in (self.ack(1), self.reply(1, kc.Published()), self.err(1, 1000), self.err(1, 11)):
            with self.subTest(data=data.hex()):
                c, d = self.make()
                d.sendall(data)
                self.assert_protocol_error(c, c.next_event)

    def test_reply_of_the_wrong_kind_is_a_protocol_error(self) -> None:
        for spec, data in ((kc.StatusRequest(), self.ack(1)),
                           (kc.RequestKind.Ping, self.reply(1, kc.Published())),
                           (kc.RequestKind.Shutdown, self.reply(1, kc.Subscribed())),
                           (kc.StatusRequest(), self.reply(1, kc.Published())),
                           (kc.Subscribe("t"), self.reply(1, kc.Unsubscribed()))):
            with self.subTest(spec=spec, data=data.hex()):
                c, d = self.make()
                rid = c.send(spec)
                d.sendall(data)
                self.assert_protocol_error(c, lambda: c.wait_reply(rid))

    def test_a_second_welcome_is_a_protocol_error(self) -> None:
        c, d = self.make()
        rid = c.send(kc.RequestKind.Ping)
        d.sendall(welcome_bytes() + self.ack(rid))
        self.assert_protocol_error(c, lambda: c.wait_reply(rid))

    def test_error_id_presence_contradicting_section_8_is_a_protocol_error(self) -> None:
        for data in (self.err(1, 9), self.err(1, 3), self.err(None, 11), self.err(None, 10),
                     self.err(None, 1000), self.err(None, 1001), self.err(None, 1002), self.err(1, 15),
                     self.err(None, 16), self.err(1, 16)):
            with self.subTest(data=data.hex()):
                c, d = self.make()
                rid = c.send(kc.RequestKind.Ping)
                d.sendall(data)
                self.assert_protocol_error(c, lambda: c.wait_reply(rid))

    def test_an_event_the_hub_decoder_rejects_is_a_protocol_error(self) -> None:
        bad_events = (struct.pack("<II", 2, 1) + self.ev(1)[12:],  # hub event tag 1
                      self.ev(1)[4:] + b"\x00",                    # trailing byte
                      struct.pack("<I", 2))                        # no event at all
        for payload in bad_events:
            with self.subTest(payload=payload.hex()):
                c, d = self.make()
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
        d.sendall(kc.frame(struct.pack("<II", 2, 0) + bytes(1016)))  # exactly 1024: read (and decoded)
        with self.assertRaises(kc.DecodeError):
            c.next_event()

    def test_an_error_with_an_id_fails_that_request_only(self) -> None:
        c, d = self.make()
        ids = c.send_many([kc.Subscribe("a"), kc.RequestKind.Shutdown, kc.Publish("b", b""), kc.RequestKind.Ping,
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
        d.sendall(self.err(rid, 1005))  # a hub code this client does not know: reported, not fatal
        with self.assertRaises(kc.ServiceError) as ctx2:
            c.result(rid)
        self.assertEqual(ctx2.exception.service_code, 5)
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
        c, d = self.make()
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
        self.assertEqual(c.next_event(), kc.Message("t", 1, b"x"))
        with self.assertRaises(kc.ConnectionClosed) as ctx2:
            c.next_event()
        self.assertEqual(ctx2.exception.final_frame.code, 15)  # type: ignore[union-attr]

    def test_closing_shutdown_with_requests_outstanding(self) -> None:
        c, d = self.make()
        ids = c.send_many([kc.RequestKind.Shutdown, kc.RequestKind.Ping])
        d.sendall(self.ack(ids[0]) + self.ev(3) + bytes.fromhex(VECTORS["closing_shutdown"]["hex"]))
        self.assertIsNone(c.result(ids[0]))
        with self.assertRaises(kc.DaemonClosing) as ctx:
            c.wait_reply(ids[1])
        self.assertEqual(ctx.exception.reason, kc.CloseReason.Shutdown)
        self.assertEqual(ctx.exception.unanswered, [ids[1]])
        self.assertEqual(c.next_event(), kc.Message("t", 3, b"x"), "events before Closing are kept")
        with self.assertRaises(kc.DaemonClosing):
            c.next_event()

    def test_closing_slow_consumer(self) -> None:
        c, d = self.make()
        d.sendall(self.ev(1) + bytes.fromhex(VECTORS["closing_slow_consumer"]["hex"]))
        self.assertEqual(list(zip(range(1), c.events())), [(0, kc.Message("t", 1, b"x"))])
        with self.assertRaises(kc.DaemonClosing) as ctx:
            c.next_event()
        self.assertEqual(ctx.exception.reason, kc.CloseReason.SlowConsumer)

    def test_end_of_stream_without_a_final_frame(self) -> None:
        c, d = self.make()
        d.sendall(bytes.fromhex(VECTORS["event"]["hex"]))
        d.close()
        self.assertEqual(c.next_event(), kc.Message("news", 1, b"hello"))
        with self.assertRaises(kc.ConnectionClosed) as ctx:
            c.next_event()
        self.assertIsNone(ctx.exception.final_frame)
        self.assertFalse(isinstance(ctx.exception, kc.DaemonClosing))

    def test_connection_dropped_in_the_middle_of_a_frame(self) -> None:
        c, d = self.make()
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

    def test_event_queue_is_bounded(self) -> None:
        c, d = self.make(max_queued_event_bytes=100)
        rid = c.send(kc.RequestKind.Ping)
        d.sendall(self.ev(1) + self.ev(2) + self.ev(3) + self.ack(rid))  # 3 x 38 bytes: over 100 after the third
        self.assertIsNone(c.result(rid), "a reply right behind the events is still read")
        self.assertEqual(c.queued_events, 3)
        rid = c.send(kc.RequestKind.Ping)
        d.sendall(self.ev(4) + self.ack(rid))
        with self.assertRaises(kc.EventQueueFull):
            c.wait_reply(rid)
        self.assertFalse(c.closed)
        self.assertEqual(c.queued_events, 3, "the event was left unread")
        self.assertEqual([c.next_event().sequence for _ in range(4)], [1, 2, 3, 4])
        self.assertIsNone(c.result(rid))

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
        d.sendall(self.ack(5) + self.reply(5, kc.Status(0, 0, 0, 0, 0, "")))
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
        self.assertEqual(str(err), "the daemon serves `notes` version 1, not `hub` version 1")
        self.assertTrue(fake.ended.wait(IO_TIMEOUT), "the client closes the connection")
        self.assertEqual(bytes(fake.received), b"", "nothing after the handshake")
        fake, err = self.run_fake(lambda conn, hs: conn.sendall(welcome_bytes("hub", 2)))
        self.assertIsInstance(err, kc.WrongServiceError)
        self.assertIn("`hub` version 2", str(err))

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
            self.assertEqual((w.protocol_version, w.service, w.service_version), (2, "hub", 1))
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
        with Daemon() as d, d.client() as a, d.client() as b:
            wait_for(lambda: a.status().authenticated == 2, "start()'s connection to go")
            s0 = a.status()
            self.assertEqual((s0.authenticated, s0.pending, s0.topics, s0.subscriptions), (2, 0, 0, 0))
            a.subscribe("t1")
            a.subscribe("t1")  # twice: one subscription
            a.subscribe("t2")
            b.subscribe("t1")
            pending = d.raw()
            wait_for(lambda: a.status().pending == 1, "the pending connection to be counted")
            time.sleep(0.02)
            s1 = a.status()
            self.assertEqual((s1.authenticated, s1.pending, s1.topics, s1.subscriptions), (2, 1, 2, 3))
            self.assertGreater(s1.uptime_ms, s0.uptime_ms)
            pending.close()
            b.unsubscribe("t1")
            a.unsubscribe("t2")  # its last subscriber leaves: the topic ceases to exist
            a.unsubscribe("never-subscribed")  # answered Unsubscribed too
            s2 = b.status()
            self.assertEqual((s2.topics, s2.subscriptions), (1, 1))
            # The raw replies, as in section 15.4.
            rids = a.send_many([kc.Subscribe("t1"), kc.Unsubscribe("zz"), kc.Publish("zz", b"")])
            self.assertEqual([a.wait_reply(r) for r in rids],
                             [kc.Reply(rids[0], kc.Subscribed()), kc.Reply(rids[1], kc.Unsubscribed()),
                              kc.Reply(rids[2], kc.Published())])

    def test_subscribe_publish_unsubscribe(self) -> None:
        with self.daemon.client() as sub, self.daemon.client() as pub:
            sub.subscribe("news")
            sub.subscribe("other")
            payloads = [b"hello", b"", bytes(range(256)), "ünïcødé ✓".encode(), b"x" * 100000]
            for p in payloads:
                pub.publish("news", p)
            pub.publish("nobody-listens", b"lost")
            events = [sub.next_event() for _ in payloads]
            self.assertEqual([e.payload for e in events], payloads)
            self.assertEqual({e.topic for e in events}, {"news"})
            seqs = [e.sequence for e in events]
            self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(payloads))))
            # Own publication on a subscribed topic: the event and the reply in either order.
            sub.publish("news", b"mine")
            self.assertEqual(sub.next_event(), kc.Message("news", seqs[-1] + 1, b"mine"))
            sub.unsubscribe("news")
            pub.publish("news", b"after")
            pub.publish("other", b"still")
            ev = sub.next_event()
            self.assertEqual((ev.topic, ev.payload), ("other", b"still"))

    def test_topics_compared_byte_for_byte(self) -> None:
        with self.daemon.client() as sub, self.daemon.client() as pub:
            for t in ("Case", "t" * 255, "é" * 127, "a/b", "a/*"):
                sub.subscribe(t)
            for t in ("case", "a/b ", "a", "a/*", "Case", "é" * 127, "t" * 255):
                pub.publish(t, t.encode())
            got = [sub.next_event().topic for _ in range(4)]
            self.assertEqual(got, ["a/*", "Case", "é" * 127, "t" * 255])

    def test_pipelining_1000_requests_in_one_write(self) -> None:
        with self.daemon.client() as c:
            c.subscribe("pipe")
            kinds: List[Any] = [kc.RequestKind.Ping, kc.StatusRequest(), kc.Publish("pipe", b"p"),
                                kc.Subscribe("pipe"), kc.Subscribe(""), kc.Unsubscribe("nope")]
            specs = [kinds[i % len(kinds)] for i in range(1000)]
            ids = [(i * 7919 + 12345) * 1_000_003 % (2 ** 64) for i in range(1000)]  # distinct, scrambled
            self.assertEqual(len(set(ids)), 1000)
            c.send_many(specs, ids)  # Subscribe("") goes out: the low-level path does not check topics
            replies = [c.wait_reply(rid) for rid in ids]
            expected = {kc.StatusRequest: kc.Status, kc.Publish: kc.Published, kc.Subscribe: kc.Subscribed,
                        kc.Unsubscribe: kc.Unsubscribed}
            for rid, spec, reply in zip(ids, specs, replies):
                self.assertEqual(reply.id, rid)  # type: ignore[union-attr]
                if spec == kc.RequestKind.Ping:
                    self.assertIsInstance(reply, kc.Ack)
                elif spec == kc.Subscribe(""):
                    self.assertIsInstance(reply, kc.Error)
                    self.assertEqual(reply.code, 1000)  # type: ignore[union-attr]
                else:
                    self.assertIsInstance(reply.reply, expected[type(spec)])  # type: ignore[union-attr]
            n_pub = sum(isinstance(s, kc.Publish) for s in specs)
            seqs = [c.next_event().sequence for _ in range(n_pub)]
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
        with self.daemon.client(early=[kc.RequestKind.Ping, kc.StatusRequest(), kc.Subscribe("early")]) as c:
            self.assertIsNone(c.result(1))
            self.assertIsInstance(c.result(2), kc.Status)
            self.assertEqual(c.result(3), kc.Subscribed())
            self.assertEqual(c.send(kc.RequestKind.Ping), 4)
            with self.assertRaises(kc.RequestTooLarge):  # early requests must fit the smallest limit, 1024
                self.daemon.client(early=[kc.Publish("t", bytes(1024))])

    def test_topic_limits(self) -> None:
        with self.daemon.client() as c:
            c.subscribe("t" * 255)
            c.subscribe("é" * 127)  # 254 bytes of UTF-8
            for call in (c.subscribe, c.unsubscribe, lambda t: c.publish(t, b"x")):
                for topic in ("", "t" * 256, "é" * 128):
                    with self.assertRaises(kc.TopicError):
                        call(topic)  # refused before sending
            for call in (kc.Subscribe("t" * 256), kc.Publish("é" * 128, b"x"), kc.Unsubscribe(""),
                         kc.Publish("", b"")):
                with self.subTest(call=type(call).__name__), self.assertRaises(kc.InvalidTopicError) as ctx:
                    c.call(call)  # the low-level path sends it: the hub answers 1000 with the id
                self.assertEqual((ctx.exception.code, ctx.exception.closes), (1000, False))
                self.assertIsNotNone(ctx.exception.id)
            c.ping()

    def test_errors_with_an_id_keep_the_connection(self) -> None:
        with self.daemon.client() as c:
            cases = [(kc.Request(100, kc.RequestKind.Ping, extra=b"\x00"), kc.BadRequestError),
                     (kc.Request(101, kc.RequestKind.Shutdown, extra=b"junk"), kc.BadRequestError),
                     (kc.Request(102, kc.RequestKind.Call), kc.BadRequestError),
                     (kc.Request(103, kc.RequestKind.Call, kc.StatusRequest(), b"\x00"), kc.BadRequestError),
                     (kc.Request(104, 3), kc.UnknownRequestError),
                     (kc.Request(105, 4, extra=b"anything at all"), kc.UnknownRequestError),
                     (kc.Request(106, 0xFFFFFFFF), kc.UnknownRequestError),
                     (kc.Request(107, kc.RequestKind.Call, kc.Subscribe("")), kc.InvalidTopicError)]
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
            sub.subscribe("bounded")
            for i in range(60):
                pub.publish("bounded", b"%03d" % i + bytes(40))
            with self.assertRaises(kc.EventQueueFull):
                sub.ping()
            self.assertFalse(sub.closed)
            got = [sub.next_event() for _ in range(60)]
            self.assertEqual([e.payload[:3] for e in got], [b"%03d" % i for i in range(60)])
            sub.ping()  # its Ack was waiting behind the events


class HubLimitTests(unittest.TestCase):
    """Section 14: at most 4096 subscriptions per connection."""

    def test_the_4097th_subscription_is_refused_with_1002(self) -> None:
        with Daemon() as d, d.client() as c, d.client() as other:
            n = kc.MAX_SUBSCRIPTIONS
            replies = c.pipeline([kc.Subscribe(f"t{i}") for i in range(n)])
            self.assertEqual({type(r.reply) for r in replies}, {kc.Subscribed})  # type: ignore[union-attr]
            # Raw frames: 1002 with the request's id, and the connection stays open.
            rids = c.send_many([kc.Subscribe(f"t{n}"), kc.Subscribe("t5"), kc.RequestKind.Ping],
                               ids=[15, 16, 17])
            err, again, ack = [c.wait_reply(r) for r in rids]
            self.assertIsInstance(err, kc.Error)
            self.assertEqual((err.code, err.id), (1002, 15))  # type: ignore[union-attr]
            self.assertEqual(again, kc.Reply(16, kc.Subscribed()), "a topic already held is still Subscribed")
            self.assertEqual(ack, kc.Ack(17))
            # The high-level call raises the hub's error class; nothing changed.
            with self.assertRaises(kc.TooManySubscriptionsError) as ctx:
                c.subscribe("one-more")
            self.assertEqual((ctx.exception.code, ctx.exception.service_code, ctx.exception.closes), (1002, 2, False))
            self.assertIsNotNone(ctx.exception.id)
            self.assertFalse(c.closed)
            st = other.status()
            self.assertEqual((st.topics, st.subscriptions), (n, n))
            other.publish("one-more", b"nobody")  # c did not get the subscription
            other.publish("t7", b"seven")
            self.assertEqual(c.next_event().payload, b"seven")
            # The cap is per connection, and unsubscribing makes room.
            other.subscribe("one-more")
            c.unsubscribe("t0")
            c.subscribe("one-more")
            with self.assertRaises(kc.TooManySubscriptionsError):
                c.subscribe("t0")
            st = other.status()
            self.assertEqual((st.topics, st.subscriptions), (n, n + 1))
            # When a connection closes, its subscriptions go with it.
            c.close()
            wait_for(lambda: other.status().subscriptions == 1, "c's subscriptions to go")
            self.assertEqual(other.status().topics, 1)


class MemoryBudgetTests(unittest.TestCase):
    """Section 9, "Memory budget": past the daemon-wide budget, the
    connection holding the most is sent Error OverBudget (15) and closed."""

    def test_a_subscriber_that_does_not_read_is_cut_with_over_budget(self) -> None:
        # --memory-budget 1 is raised to its floor of two frames (of 65536 bytes).
        with Daemon("--max-frame-len", "65536", "--memory-budget", "1") as d:
            slow = d.client()  # reads nothing until the publisher is done
            slow.subscribe("mem")
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
                    got.append(slow.next_event())
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
                sub.subscribe("big")
                payload = b"z" * (4096 - 32 - 3)  # topic "big": the Publish is exactly 4096 bytes
                self.assertEqual(len(kc.encode_request_payload(
                    kc.Request(1, kc.RequestKind.Call, kc.Publish("big", payload)))), 4096)
                pub.publish("big", payload)
                self.assertEqual(sub.next_event().payload, payload)  # an Event of 4096 bytes
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
        s.sendall(call_frame(1, kc.Subscribe("a" * 16)))  # payload: 12 + 4 + 8 + 16 = 40 bytes
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
                sub.subscribe("bye")
                with d.client() as pub:
                    pub.publish("bye", b"last")
                pending = d.raw()
                with d.client() as observer:
                    wait_for(lambda: observer.status().pending == 1, "the pending connection")
                self.assertEqual(d.stop(sig), 0)
                self.assertEqual(sub.next_event().payload, b"last")
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
            sub.subscribe("race")
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
                    self.assertEqual(f.reply, kc.Published())
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
                    delivered.append(sub.next_event().payload)
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
            slow.subscribe("deaf")
            with d.client() as pub:
                for start in range(0, 600, 100):
                    pub.pipeline([kc.Publish("deaf", b"%05d" % (start + i) + bytes(4000)) for i in range(100)])
            time.sleep(2.6)
            got: List[kc.Message] = []
            with self.assertRaises(kc.ConnectionClosed) as ctx:
                while True:
                    got.append(slow.next_event())
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
                sub.subscribe("q")
                for size in (4096 - 33, 2000, 4096 - 33):
                    pub.publish("q", bytes(size))
                    self.assertEqual(len(sub.next_event().payload), size)

    def test_restart_changes_instance_id_and_token(self) -> None:
        with Daemon() as d:
            old_token = d.token()
            with d.client() as c:
                old_instance = c.welcome.instance_id
            self.assertEqual(d.stop(), 0)
            d.start()
            self.assertNotEqual(d.token(), old_token)
            with self.assertRaises(kc.BadTokenError):
                kc.KeyholeClient.connect(d.socket_path, bytearray(old_token))
            with d.client() as c:  # reads the token again
                self.assertNotEqual(c.welcome.instance_id, old_instance)
                c.ping()

    def test_slow_consumer_ends_with_closing_slow_consumer(self) -> None:
        with Daemon("--outbound-queue-bytes", "65536", "--max-frame-len", "4096") as d:
            slow, _ = d.authenticated_raw()
            slow.sendall(call_frame(1, kc.Subscribe("flood")))
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
            sub.subscribe("lx")
            for m in messages:
                r = cli(["pub", "lx", m], d.env)
                self.assertEqual(r.returncode, 0, r.stderr)
            r = cli(["pub", "lx", "-"], d.env, input_=binary)
            self.assertEqual(r.returncode, 0, r.stderr)
            events = [sub.next_event() for _ in range(len(messages) + 1)]
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
            self.assertIn(b"the daemon serves `notes` version 1, not `hub` version 1", r.stderr)

    def test_python_command_line(self) -> None:
        with Daemon() as d:
            r = py_cli(["ping", "-c", "2"], d.env)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(len(r.stdout.splitlines()), 2)
            r = py_cli(["status"], d.env)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn(b"authenticated 1", r.stdout)
            with d.client() as sub:
                sub.subscribe("cli")
                self.assertEqual(py_cli(["pub", "cli", "hi there"], d.env).returncode, 0)
                self.assertEqual(py_cli(["pub", "cli", "-"], d.env, input_=b"\x00\x01").returncode, 0)
                self.assertEqual([sub.next_event().payload for _ in range(2)], [b"hi there", b"\x00\x01"])
                self.assertEqual(py_cli(["pub", "", "x"], d.env).returncode, 2)
            bad = {**d.env, "KEYHOLE_TOKEN": "00" * 32}
            self.assertEqual(py_cli(["ping"], bad).returncode, 5)
            self.assertEqual(py_cli(["ping"], {"KEYHOLE_DIR": os.path.join(d.tmp, "none")}).returncode, 4)
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

    def test_token_file_0644_is_refused_before_connecting(self) -> None:
        path = self.token_file("t644", open(self.daemon.token_path, "rb").read(), 0o644)
        fake = self.listening("fake.sock")
        with self.assertRaises(kc.TokenPermissionError) as ctx:
            kc.KeyholeClient.connect(env={"KEYHOLE_SOCKET": os.path.join(self.tmp, "fake.sock"),
                                          "KEYHOLE_TOKEN_FILE": path})
        self.assertIn("0644", str(ctx.exception))
        with self.assertRaises(BlockingIOError):
            fake.accept()  # nobody connected
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


def main() -> int:
    """Run every test; print ``N passed, N failed``; exit non-zero on failure."""
    faulthandler.dump_traceback_later(240, exit=True)  # never hang a CI job
    missing = [name for name, path in (("KEYHOLED_BIN", KEYHOLED), ("KEYHOLE_BIN", KEYHOLE))
               if not path or not os.access(path, os.X_OK)]
    if missing:
        print(f"{', '.join(missing)} must name the keyholed/keyhole executables", file=sys.stderr)
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
