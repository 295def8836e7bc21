"""``python3 -m keyhole_client``: a small command line over the blocking
client, with the exit codes of the Rust ``keyhole`` CLI."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from ._blocking import KeyholeClient
from ._protocol import (DEFAULT_TIMEOUT, HUB, MIN_MAX_FRAME_LEN, RAW, ConnectionClosed, DaemonNotRunning,
                        DaemonUidError, Event, HandshakeRefused, KeyholeError, KeyholeException, KeyholeTimeout, Lag,
                        Lagged, Message, NoRuntimeDirectory, PeerCredentialsError, Publish, Request, RequestError,
                        RequestKind, RequestTimeout, RequestTooLarge, StatusRequest, Subscribe, TokenError,
                        TopicError, TopicsRequest, WrongServiceError, check_subject, encode_request_payload)

EXIT_OK = 0
EXIT_OTHER = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_PERMISSION = 4
EXIT_REFUSED = 5
EXIT_TIMEOUT = 6
EXIT_DAEMON_ERROR = 7
EXIT_WRONG_SERVICE = 8

PROG = "python3 -m keyhole_client"

EXIT_CODES = f"""\
exit codes (those of the Rust `keyhole` CLI):
  {EXIT_OK}  success
  {EXIT_OTHER}  other error
  {EXIT_USAGE}  bad usage (an invalid topic, pattern or name included: checked before connecting)
  {EXIT_NOT_RUNNING}  daemon not running (socket missing or nobody listening, no runtime directory)
  {EXIT_PERMISSION}  permission or token problem (no token, token file refused, socket served by another uid,
     a bad KEYHOLE_DAEMON_UID)
  {EXIT_REFUSED}  authentication refused by the daemon
  {EXIT_TIMEOUT}  timeout
  {EXIT_DAEMON_ERROR}  the daemon reported an error or closed the connection (a request that got no reply included)
  {EXIT_WRONG_SERVICE}  the daemon serves another service than the hub (`ping` and `stop` work with any)

The socket is checked before the token: with no daemon running the answer
is "daemon not running" (3), whatever the token.

environment: KEYHOLE_SOCKET, KEYHOLE_TOKEN, KEYHOLE_TOKEN_FILE, KEYHOLE_DIR,
XDG_RUNTIME_DIR, HOME, KEYHOLE_DAEMON_UID (proto-spec.md, section 11)."""


class _UsageError(Exception):
    pass


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds and finite: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (``--help`` on it and on every command)."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES,
        description="Talk to a keyhole daemon serving the hub (keyholed): ping it, publish, "
                    "subscribe, send requests. The Python client, written from proto-spec.md alone.")
    parser.add_argument("--socket", metavar="PATH",
                        help="socket path [default: $KEYHOLE_SOCKET, else the runtime directory's keyhole.sock]")
    parser.add_argument("--token-file", metavar="PATH",
                        help="token file [default: $KEYHOLE_TOKEN, else $KEYHOLE_TOKEN_FILE, "
                             "else the runtime directory's session-token]")
    parser.add_argument("--timeout", metavar="SECS", type=_positive_seconds, default=DEFAULT_TIMEOUT,
                        help=f"seconds to wait for the daemon's answers [default: {DEFAULT_TIMEOUT:g}]")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    p = sub.add_parser("ping", help="round trips to the daemon (any keyhole daemon), with their times")
    p.add_argument("-c", "--count", type=_count, default=1, help="how many pings [default: 1]")
    sub.add_parser("status", help="the daemon's connections, topics, subscriptions, names, uptime and version")
    sub.add_parser("topics", help="every pattern subscribed and every name served, with their counts")
    p = sub.add_parser("pub", help="publish MESSAGE (or stdin with -) on TOPIC; prints how many "
                                   "subscriptions it reached")
    p.add_argument("topic", metavar="TOPIC")
    p.add_argument("message", metavar="MESSAGE", nargs="?", default="")
    p = sub.add_parser("sub", help='print events of PATTERNs as "TOPIC SEQUENCE PAYLOAD" lines '
                                   "(a pattern's `*` matches one token, a final `>` the rest)")
    p.add_argument("patterns", metavar="PATTERN", nargs="+")
    p.add_argument("-c", "--count", type=_count, help="exit after this many events")
    p.add_argument("--drop-oldest", action="store_true",
                   help="lose the oldest events when falling behind (each loss is reported on stderr) "
                        "rather than be cut as a slow consumer")
    p = sub.add_parser("req", help="send MESSAGE (or stdin with -) to whoever serves NAME and print the reply")
    p.add_argument("name", metavar="NAME")
    p.add_argument("message", metavar="MESSAGE", nargs="?", default="")
    p.add_argument("--request-timeout", metavar="SECS", type=_positive_seconds,
                   help="how long the hub lets the request wait for its answer [default: the hub's, 30]")
    sub.add_parser("stop", help="ask the daemon to shut down gracefully")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Local usage checks, before connecting (section 14's subject rules)."""
    if args.cmd == "pub":
        check_subject(args.topic, "topic")
    elif args.cmd == "sub":
        for pattern in args.patterns:
            check_subject(pattern, "pattern")
    elif args.cmd == "req":
        check_subject(args.name, "name")


def _early(args: argparse.Namespace, payload: Optional[bytes]) -> List[Any]:
    """The command's first requests, sent in the handshake's write (behind
    an ``Expect`` of the hub) when they fit the 1024 bytes allowed before
    ``Welcome``: one round trip for the whole command. (``pub TOPIC -``
    reads stdin once connected, as before, and publishes after ``Welcome``.)"""
    if args.cmd == "status":
        return [StatusRequest()]
    if args.cmd == "topics":
        return [TopicsRequest()]
    if args.cmd == "pub" and payload is not None:
        publish = Publish(args.topic, payload)
        fits = len(encode_request_payload(Request(1, RequestKind.Call, publish))) <= MIN_MAX_FRAME_LEN
        return [publish] if fits else []
    if args.cmd == "sub":
        lag = Lag.DropOldest if args.drop_oldest else Lag.Disconnect
        return [Subscribe(sid, pattern, lag) for sid, pattern in enumerate(args.patterns, 1)]
    return []


def _run(args: argparse.Namespace) -> None:
    env: Dict[str, str] = dict(os.environ)
    if args.socket:
        env["KEYHOLE_SOCKET"] = args.socket
    if args.token_file:
        env.pop("KEYHOLE_TOKEN", None)
        env["KEYHOLE_TOKEN_FILE"] = args.token_file
    service = RAW if args.cmd in ("ping", "stop") else HUB
    payload: Optional[bytes] = None
    if args.cmd in ("pub", "req") and args.message != "-":
        payload = args.message.encode()
    early = _early(args, payload)
    with KeyholeClient.connect(env=env, timeout=args.timeout, service=service, early=early) as client:
        if args.cmd == "ping":
            for _ in range(args.count):
                print(f"ack in {client.ping() * 1000:.3f} ms", flush=True)
        elif args.cmd == "status":
            s = client.result(client.early_ids[0])
            print(f"authenticated {s.authenticated}\npending {s.pending}\ntopics {s.topics}\n"
                  f"subscriptions {s.subscriptions}\nnames {s.names}\n"
                  f"requests_in_flight {s.requests_in_flight}\nuptime_ms {s.uptime_ms}\nversion {s.version}")
        elif args.cmd == "topics":
            t = client.result(client.early_ids[0])
            for text, n in t.patterns:
                print(f"pattern {text} {n}")
            for text, n in t.names:
                print(f"name {text} {n}")
            if t.truncated:
                print("truncated")
        elif args.cmd == "pub":
            if early:
                print(client.result(client.early_ids[0]).receivers)
            else:
                if payload is None:
                    payload = sys.stdin.buffer.read()
                print(client.publish(args.topic, payload))
        elif args.cmd == "sub":
            for rid in client.early_ids:
                client.result(rid)
            subs = {request.sid for request in early}
            seen = 0
            while args.count is None or seen < args.count:
                f = client.next_event(timeout=math.inf)
                if isinstance(f, Lagged):
                    print(f"keyhole_client: lost {f.missed} events of subscription {f.stream}",
                          file=sys.stderr, flush=True)
                    continue
                if not isinstance(f, Event) or f.stream not in subs or not isinstance(f.event, Message):
                    continue
                m = f.event
                sys.stdout.write(f"{m.topic} {m.sequence} {m.payload.decode('utf-8', 'replace')}\n")
                sys.stdout.flush()
                seen += 1
        elif args.cmd == "req":
            if payload is None:
                payload = sys.stdin.buffer.read()
            sys.stdout.buffer.write(client.request(args.name, payload, args.request_timeout))
            sys.stdout.flush()
        else:
            client.shutdown()


def exit_code(err: BaseException) -> int:
    """The exit code for an exception, as the Rust CLI chooses it."""
    if isinstance(err, (TopicError, RequestTooLarge)):
        return EXIT_USAGE
    if isinstance(err, (NoRuntimeDirectory, DaemonNotRunning)):
        return EXIT_NOT_RUNNING
    if isinstance(err, (TokenError, PeerCredentialsError, DaemonUidError)):
        return EXIT_PERMISSION
    if isinstance(err, HandshakeRefused):
        return EXIT_REFUSED
    if isinstance(err, (KeyholeTimeout, RequestTimeout)):
        return EXIT_TIMEOUT
    if isinstance(err, WrongServiceError):
        return EXIT_WRONG_SERVICE
    if isinstance(err, (KeyholeError, ConnectionClosed, RequestError)):
        return EXIT_DAEMON_ERROR
    return EXIT_OTHER


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:  # --help (0) or bad usage (2), already printed
        return EXIT_USAGE if exc.code else EXIT_OK
    try:
        _check_args(args)
        _run(args)
    except KeyholeException as err:
        prefix = "authentication refused: " if isinstance(err, HandshakeRefused) else ""
        print(f"keyhole_client: {prefix}{err}", file=sys.stderr)
        return exit_code(err)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # stdout closed (e.g. piped into head)
        return EXIT_OK
    return EXIT_OK


def run() -> None:
    """The entry point of ``python3 -m keyhole_client``."""
    sys.exit(main())
