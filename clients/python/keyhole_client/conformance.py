"""The driver of keyhole's conformance kit for this client (proto-spec.md
Part IV, section 17): ``python -m keyhole_client.conformance``.

Start ``keyhole-conformance --dir DIR``, then run this module with
``KEYHOLE_DIR=DIR`` (or ``KEYHOLE_SOCKET`` and ``KEYHOLE_TOKEN_FILE``): it
connects with the blocking client's normal :meth:`KeyholeClient.connect`,
subscribes to ``conformance.control``, reports the step ``hello`` on
``conformance.report`` and then performs every instruction the kit sends,
reporting one result per op, until the end instruction. It exits 0 if the
kit's verdict is ``"pass"``, 1 otherwise (printing the kit's failure on
stderr), and 1 if the main connection ends without an end instruction.

Every op is done with the client's public API; the driver only translates
instructions into calls and outcomes (values or exceptions) into the
results of section 17.3. Each wait is bounded by :data:`OP_TIMEOUT` seconds
(the connection's timeout), shorter than the kit's step timeout, so that a
frame the client wrongly ignores fails the step with ``{"error": {"kind":
"timeout"}}`` rather than a silent timeout.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Union

from ._blocking import KeyholeClient, Subscription
from ._protocol import (SERVICE_CODE_BASE, MessageMemfd, CloseReason, Closing, ConnectionClosed, DaemonClosing, Error,
                        HandshakeRefused, IncomingRequest, KeyholeError, KeyholeTimeout, Lag, Lagged, Message,
                        ProtocolError, Publish, ReplyTooLargeError, RequestFailed, RequestKind, RequestTimeout,
                        RequestTo, RequestTooLarge, ResponderGoneError, Status, StatusRequest, TopicList,
                        TopicsRequest, WrongServiceError, check_subject, outcome_result)

CONTROL_TOPIC = "conformance.control"
REPORT_TOPIC = "conformance.report"
OP_TIMEOUT = 8.0
"""Seconds any single wait of an op may take (the Rust driver's bound too)."""
INSTRUCTION_TIMEOUT = 120.0
"""Seconds to wait for the kit's next instruction (the kit bounds its own steps)."""
MAX_HEX_PAYLOAD = 4096

Json = Any


class DriverError(Exception):
    """The kit sent an instruction this driver cannot follow."""


# -- JSON conventions (section 17.3) -----------------------------------------

def num(value: int) -> str:
    """Every integer is a JSON string of decimal digits."""
    return str(int(value))


def parse_num(value: Json) -> int:
    if not isinstance(value, str) or not value.isdigit() or not value.isascii():
        raise DriverError(f"not an integer string: {value!r}")
    return int(value)


def parse_payload(value: Json) -> bytes:
    """A payload: lowercase hex, or ``{"fill": "XX", "len": "N"}``."""
    if isinstance(value, str):
        return bytes.fromhex(value)
    if isinstance(value, dict) and "fill" in value:
        fill = bytes.fromhex(value["fill"])
        if len(fill) != 1:
            raise DriverError(f"bad fill byte: {value!r}")
        return fill * parse_num(value["len"])
    raise DriverError(f"not a payload: {value!r}")


def show_payload(data: bytes) -> Json:
    """A payload as a report writes it."""
    if len(data) <= MAX_HEX_PAYLOAD:
        return data.hex()
    if data.count(data[0]) == len(data):
        return {"fill": f"{data[0]:02x}", "len": num(len(data))}
    return {"len": num(len(data))}


def ok(value: Json) -> Json:
    return {"ok": value}


def err(kind: str, **fields: Json) -> Json:
    return {"error": dict(kind=kind, **fields)}


_REASONS = {CloseReason.Shutdown: "shutdown", CloseReason.SlowConsumer: "slow_consumer"}


def error_result(exc: BaseException, connecting: bool = False) -> Json:
    """The result of an op that raised ``exc`` (section 17.3, failed ops)."""
    if isinstance(exc, RequestTooLarge):
        return err("too_large")
    if isinstance(exc, ProtocolError):
        return err("protocol")
    if isinstance(exc, ResponderGoneError):
        return err("outcome", outcome="responder_gone")
    if isinstance(exc, RequestTimeout):
        return err("outcome", outcome="timeout")
    if isinstance(exc, ReplyTooLargeError):
        return err("outcome", outcome="reply_too_large", len=num(exc.len))
    if isinstance(exc, RequestFailed):
        return err("outcome", outcome="failed", message=exc.message)
    if isinstance(exc, DaemonClosing):
        return err("closed", reason=_REASONS.get(exc.reason))
    if isinstance(exc, KeyholeError):
        if connecting and isinstance(exc, HandshakeRefused):
            return err("refused", code=num(exc.code))
        if exc.code >= SERVICE_CODE_BASE:
            return err("service", code=num(exc.code))
        return err("daemon", code=num(exc.code))
    if isinstance(exc, WrongServiceError):
        return err("wrong_service", service=exc.service, version=num(exc.service_version))
    if isinstance(exc, ConnectionClosed):
        final = exc.final_frame
        if isinstance(final, Error):
            return err("daemon", code=num(final.code))
        if isinstance(final, Closing):
            return err("closed", reason=_REASONS.get(final.reason))
        return err("closed", reason=None)
    if isinstance(exc, KeyholeTimeout):
        return err("timeout")
    return err("other", text=f"{type(exc).__name__}: {exc}")


# -- one connection and its ops ---------------------------------------------

class Conn:
    """A connection the driver runs ops on, with the result that tells why
    it ended once it has (every later op on it reports the same), and its
    labels: they belong to the connection they were made on (section 17.3)."""

    def __init__(self, client: KeyholeClient) -> None:
        self.client = client
        self.ended: Optional[Json] = None
        self.subs: Dict[str, Subscription] = {}
        self.requests: Dict[str, IncomingRequest] = {}
        self.kept: List[IncomingRequest] = []
        """Requests read while ``next_request`` waited for another name,
        in order, for a later ``next_request`` of theirs."""

    def next_request(self, name: str) -> IncomingRequest:
        """The next request to ``name``: one kept already, else the next to
        arrive (requests to other names that arrive meanwhile are kept)."""
        for i, incoming in enumerate(self.kept):
            if incoming.name == name:
                return self.kept.pop(i)
        deadline = time.monotonic() + OP_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KeyholeTimeout(f"no request to {name!r} within {OP_TIMEOUT} s")
            incoming = self.client.next_request(timeout=left)
            if incoming.name == name:
                return incoming
            self.kept.append(incoming)

    def failed(self, exc: BaseException) -> Json:
        """The result of an op that raised ``exc`` on this connection."""
        if self.ended is not None and isinstance(exc, ConnectionClosed) and not isinstance(exc, DaemonClosing):
            return self.ended
        result = error_result(exc)
        if self.ended is None and self.client.closed and result["error"]["kind"] in ("protocol", "closed", "daemon"):
            self.ended = result
        return result


class Driver:

    # Each op returns its result; the client's exceptions become error results.
    def run_ops(self, conn: Conn, ops: Sequence[Json]) -> List[Json]:
        results = []
        for op in ops:
            try:
                results.append(self.run_op(conn, op))
            except DriverError as exc:
                results.append(err("other", text=f"driver: {exc}"))
            except Exception as exc:  # noqa: BLE001  (every outcome is reported)
                results.append(conn.failed(exc))
        return results

    def run_op(self, conn: Conn, op: Json) -> Json:
        c = conn.client
        name = op.get("op")
        if name == "ping":
            c.ping()
            return ok("ack")
        if name == "shutdown":
            c.shutdown()
            return ok("ack")
        if name == "status":
            return ok(show_reply(c.status()))
        if name == "topics":
            return ok(show_reply(c.topics()))
        if name == "subscribe":
            lag = {"disconnect": Lag.Disconnect, "drop_oldest": Lag.DropOldest}.get(op["lag"])
            if lag is None:
                raise DriverError(f"unknown lag {op['lag']!r}")
            conn.subs[op["as"]] = c.subscribe(op["pattern"], lag)
            return ok("subscribed")
        if name == "unsubscribe":
            sub = self.sub(conn, op["sub"])
            c.unsubscribe(sub)
            return ok("unsubscribed")
        if name == "next_event":
            sub = self.sub(conn, op["sub"])
            item = sub.next(timeout=OP_TIMEOUT)
            if isinstance(item, Lagged):
                return ok({"lagged": num(item.missed)})
            return ok(show_message(item))
        if name == "publish":
            return ok({"published": num(c.publish(op["topic"], parse_payload(op["payload"])))})
        if name == "serve":
            c.serve(op["name"])
            return ok("serving")
        if name == "unserve":
            c.unserve(op["name"])
            return ok("unserved")
        if name == "next_request":
            incoming = conn.next_request(op["name"])
            conn.requests[op["as"]] = incoming
            return ok({"request": {"name": incoming.name, "uid": num(incoming.uid), "pid": num(incoming.pid),
                                   "payload": show_payload(incoming.payload)}})
        if name == "respond":
            incoming = self.request(conn, op["request"])
            return ok({"delivered": c.respond(incoming.token, parse_payload(op["payload"]))})
        if name == "fail":
            incoming = self.request(conn, op["request"])
            return ok({"delivered": c.fail(incoming.token, op["message"])})
        if name == "request":
            call = request_to(op)
            rid = c.send(call)
            return self.finish_request(c, rid)
        if name == "pipeline":
            return ok({"results": self.pipeline(conn, op["ops"])})
        if name == "connect":
            return self.connect(op)
        raise DriverError(f"unknown op {name!r}")

    @staticmethod
    def sub(conn: Conn, label: str) -> Subscription:
        if label not in conn.subs:
            raise DriverError(f"no subscription labelled {label!r} on this connection")
        return conn.subs[label]

    @staticmethod
    def request(conn: Conn, label: str) -> IncomingRequest:
        if label not in conn.requests:
            raise DriverError(f"no request labelled {label!r} on this connection")
        return conn.requests[label]

    @staticmethod
    def finish_request(c: KeyholeClient, rid: int) -> Json:
        """Wait for a ``Request``'s ``Requested`` reply, then for its ``Response``."""
        c.result(rid)
        response = c.wait_response(rid, timeout=OP_TIMEOUT)
        return ok({"reply": show_payload(outcome_result(response))})

    def pipeline(self, conn: Conn, ops: Sequence[Json]) -> List[Json]:
        """Send every op's request in one write, then wait for each in order."""
        c = conn.client
        specs: List[Any] = []
        for op in ops:
            name = op.get("op")
            if name == "ping":
                specs.append(RequestKind.Ping)
            elif name == "shutdown":
                specs.append(RequestKind.Shutdown)
            elif name == "status":
                specs.append(StatusRequest())
            elif name == "topics":
                specs.append(TopicsRequest())
            elif name == "publish":
                check_subject(op["topic"], "topic")
                specs.append(Publish(op["topic"], parse_payload(op["payload"])))
            elif name == "request":
                specs.append(request_to(op))
            else:
                raise DriverError(f"op {name!r} cannot be pipelined")
        try:
            rids = c.send_many(specs)
        except Exception as exc:  # noqa: BLE001  (nothing was sent: every op fails alike)
            return [conn.failed(exc) for _ in ops]
        results: List[Json] = []
        for op, rid in zip(ops, rids):
            try:
                name = op["op"]
                if name == "request":
                    results.append(self.finish_request(c, rid))
                    continue
                reply = c.result(rid)
                if name in ("ping", "shutdown"):
                    results.append(ok("ack"))
                elif name == "publish":
                    results.append(ok({"published": num(reply.receivers)}))
                else:
                    results.append(ok(show_reply(reply)))
            except Exception as exc:  # noqa: BLE001
                results.append(conn.failed(exc))
        return results

    def connect(self, op: Json) -> Json:
        """Open an extra connection (with the client options that the op's
        ``next_request_id``, ``next_sid`` and ``connect_timeout_ms`` set,
        section 17.3), run the ops on it, close it."""
        options: Dict[str, Any] = {}
        try:
            if "next_request_id" in op:
                options["next_request_id"] = parse_num(op["next_request_id"])
            if "next_sid" in op:
                options["next_subscription_id"] = parse_num(op["next_sid"])
            if "connect_timeout_ms" in op:
                options["connect_timeout"] = parse_num(op["connect_timeout_ms"]) / 1000
        except DriverError as exc:
            return err("other", text=f"driver: {exc}")
        try:
            client = KeyholeClient.connect(timeout=OP_TIMEOUT, **options)
        except Exception as exc:  # noqa: BLE001
            return error_result(exc, connecting=True)
        ops = op.get("ops", [])
        try:
            w = client.welcome
            welcome = {"protocol_version": num(w.protocol_version), "service": w.service,
                       "service_version": num(w.service_version), "software_version": w.software_version,
                       "instance_id": num(w.instance_id), "connection_id": num(w.connection_id),
                       "max_frame_len": num(w.max_frame_len)}
            results = self.run_ops(Conn(client), ops)
        finally:
            client.close()
        return ok({"welcome": welcome, "results": results})


def request_to(op: Json) -> RequestTo:
    check_subject(op["name"], "name")
    return RequestTo(op["name"], parse_num(op["timeout_ms"]), parse_payload(op["payload"]))


def show_reply(reply: Any) -> Json:
    if isinstance(reply, Status):
        return {"status": {"authenticated": num(reply.authenticated), "pending": num(reply.pending),
                           "topics": num(reply.topics), "subscriptions": num(reply.subscriptions),
                           "names": num(reply.names), "requests_in_flight": num(reply.requests_in_flight),
                           "uptime_ms": num(reply.uptime_ms), "version": reply.version}}
    if isinstance(reply, TopicList):
        return {"topics": {"patterns": [[p, num(n)] for p, n in reply.patterns],
                           "names": [[p, num(n)] for p, n in reply.names], "truncated": reply.truncated}}
    raise DriverError(f"unexpected reply {reply!r}")


def show_message(m: Union[Message, MessageMemfd]) -> Json:
    return {"event": {"topic": m.topic, "sequence": num(m.sequence), "payload": show_payload(m.payload)}}


# -- the run (section 17.2) ----------------------------------------------------

def report(client: KeyholeClient, step: str, results: List[Json]) -> None:
    text = json.dumps({"step": step, "results": results}, separators=(",", ":"), ensure_ascii=False)
    client.publish(REPORT_TOPIC, text.encode("utf-8"))


def run(out: Any = sys.stderr) -> int:
    """One run of the kit; returns the exit status."""
    try:
        client = KeyholeClient.connect(timeout=OP_TIMEOUT)
    except Exception as exc:  # noqa: BLE001
        print(f"keyhole-conformance driver: could not connect: {exc}", file=out)
        return 1
    driver = Driver()
    main = Conn(client)
    try:
        control = client.subscribe(CONTROL_TOPIC, Lag.Disconnect)
        report(client, "hello", [])
        while True:
            item = control.next(timeout=INSTRUCTION_TIMEOUT)
            if not isinstance(item, Message):
                print(f"keyhole-conformance driver: lost instructions: {item!r}", file=out)
                return 1
            instruction = json.loads(item.payload.decode("utf-8"))
            step = instruction.get("step")
            if step == "end":
                if instruction.get("verdict") == "pass":
                    return 0
                print("keyhole-conformance driver: the kit's verdict is a fail: "
                      + json.dumps(instruction.get("failed"), ensure_ascii=False), file=out)
                return 1
            results = driver.run_ops(main, instruction.get("ops", []))
            report(client, step, results)
    except Exception as exc:  # noqa: BLE001
        print(f"keyhole-conformance driver: the main connection ended without an end instruction: "
              f"{type(exc).__name__}: {exc}", file=out)
        return 1
    finally:
        client.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if args:
        print(f"usage: python -m keyhole_client.conformance (no arguments; got {args!r})", file=sys.stderr)
        return 2
    return run()


if __name__ == "__main__":
    sys.exit(main())
