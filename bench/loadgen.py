"""A cheap raw-socket WebSocket load generator.

One process drives thousands of connections with plain non-blocking sockets and one epoll
loop: it writes the HTTP upgrade itself, sends masked client frames, and parses server frames
only as far as it must (walk the frame headers, count deliveries, answer pings, pull the
send timestamp out of a payload when latency is measured). It is not a WebSocket client per
connection, so it costs far less CPU than the servers it measures; its own CPU is reported.

The servers differ only in an adapter: this broker (protocol v1 JSON), nats-server over
WebSocket (the NATS text protocol inside WebSocket frames) and Socket.IO 4 (Engine.IO v4 over
WebSocket, with a room per topic, see ``peers/socketio/server.js``).

Payloads carry ``@@`` followed by 16 digits of ``time.monotonic_ns()`` at sending, padded to
the payload size, so a subscriber can compute publication-to-delivery latency (the clock is
shared by every process of the machine).

:class:`Generator` runs several agent processes (forked) and talks to them over pipes; the
agents publish their delivery counts in shared memory, so a closed-loop publisher in one agent
can keep a bounded number of deliveries in flight across all of them.

Loopback has about 28,000 ephemeral ports per (source address, server address, server port)
(``net.ipv4.ip_local_port_range``). For more connections than that, give the
:class:`Generator` several ``sources`` (127.0.0.2, 127.0.0.3, ...: all of 127.0.0.0/8 is
loopback): each agent binds its sockets to one of them before connecting, with
``IP_BIND_ADDRESS_NO_PORT`` so that the port is still chosen per destination at connect.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import heapq
import json
import multiprocessing as mp
import os
import random
import re
import resource
import select
import socket
import struct
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["ADAPTERS", "Generator", "machine_busy_seconds", "make_payload", "proc_cpu_seconds"]

TS_RE = re.compile(rb"@@(\d{16})")
CARRY = 17  # shorter than a timestamp match; longer than every adapter's prefix
RECV_SIZE = 256 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

# connection states
CONNECTING, UPGRADING, OPENING, SUBSCRIBING, READY, CLOSED = range(6)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP
LINGER_RST = struct.pack("ii", 1, 0)
# Linux: a bind() to port 0 leaves the port to connect(), which picks it per destination
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def make_payload(size: int = 64) -> str:
    """A payload of ``size`` ASCII characters that starts with the current monotonic time."""
    head = f"@@{time.monotonic_ns():016d}"
    return head + "x" * max(0, size - len(head))


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final, masked client frame (RFC 6455 section 5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    key = random.randbytes(4)
    if not n:
        return head + key
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + masked


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy (not idle or waiting for I/O) so far."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / CLK_TCK


class Conn:
    __slots__ = (
        "acked",
        "ident",
        "pending",
        "rbuf",
        "sock",
        "state",
        "token",
        "topics",
        "wbuf",
    )

    def __init__(self, sock: socket.socket, ident: int, token: str, topics: list[str]) -> None:
        self.sock = sock
        self.ident = ident
        self.token = token
        self.topics = topics
        self.state = CONNECTING
        self.rbuf = b""
        self.wbuf = b""
        self.pending = 0
        self.acked = False


# ---------------------------------------------------------------------------------------------
# protocol adapters


class Adapter:
    """What differs between servers: the upgrade request, the setup exchange, subscribing,
    publishing and how deliveries are recognised in a text frame."""

    name = ""
    path = "/"
    subprotocol = ""
    # a text frame whose payload starts with this is one delivery (unless ``multi`` is set)
    prefix = b""
    # deliveries are counted by occurrences of ``prefix`` (several per frame)
    multi = False
    # in READY, occurrences of this count as error replies; this one needs an answer
    error_marker = b""
    ping_marker = b""

    def headers(self, token: str) -> list[str]:
        return []

    def request_path(self, token: str) -> str:
        return self.path

    def on_upgraded(self, agent: Agent, conn: Conn) -> None:
        """The 101 arrived; send what the server expects first."""

    def on_setup(self, agent: Agent, conn: Conn, payload: bytes) -> None:
        """A text frame while OPENING or SUBSCRIBING."""
        raise NotImplementedError

    def subscribe(self, agent: Agent, conn: Conn) -> None:
        """Send the subscriptions for ``conn.topics`` and set ``conn.pending`` to the number of
        acknowledgements to wait for."""
        raise NotImplementedError

    def publish(self, topic: str, data: str) -> bytes:
        """The text payload of one publication."""
        raise NotImplementedError

    def on_other(self, agent: Agent, conn: Conn, payload: bytes) -> None:
        """A text frame in READY that is not a delivery (a ping, an error reply)."""
        agent.other_frames += 1


class BrokerAdapter(Adapter):
    name = "broker"
    path = "/ws"
    subprotocol = "pubsub.v1"
    prefix = b'{"op":"message"'
    error_marker = b'"ok":false'

    def headers(self, token: str) -> list[str]:
        return [f"Authorization: Bearer {token}"] if token else []

    def on_setup(self, agent: Agent, conn: Conn, payload: bytes) -> None:
        if conn.state == OPENING:
            if payload.startswith(b'{"op":"welcome"'):
                agent.opened(conn)
            else:
                agent.fail(conn, "setup: " + payload[:120].decode(errors="replace"))
        elif b'"ok":true' in payload:
            agent.ack(conn)
        elif payload.startswith(self.prefix):
            pass  # a publication racing the last subscribe reply
        else:
            agent.fail(conn, "subscribe: " + payload[:120].decode(errors="replace"))

    def subscribe(self, agent: Agent, conn: Conn) -> None:
        frames = [
            client_frame(json.dumps({"op": "subscribe", "topic": t, "id": i}).encode())
            for i, t in enumerate(conn.topics)
        ]
        conn.pending = len(frames)
        agent.send(conn, b"".join(frames))

    def publish(self, topic: str, data: str) -> bytes:
        return f'{{"op":"publish","topic":"{topic}","data":"{data}"}}'.encode()


class NatsAdapter(Adapter):
    name = "nats"
    prefix = b"MSG "
    multi = True
    error_marker = b"-ERR"
    ping_marker = b"PING\r\n"

    def on_setup(self, agent: Agent, conn: Conn, payload: bytes) -> None:
        if payload.startswith(b"-ERR"):
            agent.fail(conn, payload[:120].decode(errors="replace"))
        elif conn.state == OPENING:
            if payload.startswith(b"INFO"):
                opts: dict[str, Any] = {
                    "verbose": False,
                    "pedantic": False,
                    "protocol": 1,
                    "lang": "bench",
                    "version": "1",
                    "headers": False,
                }
                if conn.token:
                    opts["auth_token"] = conn.token
                cmd = f"CONNECT {json.dumps(opts)}\r\nPING\r\n"
                agent.send(conn, client_frame(cmd.encode()))
            elif b"PONG" in payload:
                agent.opened(conn)
        elif b"PONG" in payload:
            agent.ack(conn)
        if b"PING\r\n" in payload:
            agent.send(conn, client_frame(b"PONG\r\n"))

    def subscribe(self, agent: Agent, conn: Conn) -> None:
        subs = "".join(f"SUB {t} {i + 1}\r\n" for i, t in enumerate(conn.topics))
        conn.pending = 1
        agent.send(conn, client_frame((subs + "PING\r\n").encode()))

    def publish(self, topic: str, data: str) -> bytes:
        return f"PUB {topic} {len(data)}\r\n{data}\r\n".encode()

    def on_other(self, agent: Agent, conn: Conn, payload: bytes) -> None:
        if b"PING\r\n" in payload:
            agent.send(conn, client_frame(b"PONG\r\n"))
        else:
            agent.other_frames += 1


class SocketIOAdapter(Adapter):
    name = "socketio"
    path = "/socket.io/?EIO=4&transport=websocket"
    prefix = b'42["msg"'

    def on_setup(self, agent: Agent, conn: Conn, payload: bytes) -> None:
        if payload == b"2":
            agent.send(conn, client_frame(b"3"))
        elif conn.state == OPENING:
            if payload.startswith(b"0{"):
                auth = json.dumps({"token": conn.token}) if conn.token else ""
                agent.send(conn, client_frame(f"40{auth}".encode()))
            elif payload.startswith(b"40"):
                agent.opened(conn)
            else:
                agent.fail(conn, "setup: " + payload[:120].decode(errors="replace"))
        elif payload.startswith(b"43"):
            agent.ack(conn)

    def subscribe(self, agent: Agent, conn: Conn) -> None:
        frames = [
            client_frame(f'42{i}["sub",{json.dumps(t)}]'.encode())
            for i, t in enumerate(conn.topics)
        ]
        conn.pending = len(frames)
        agent.send(conn, b"".join(frames))

    def publish(self, topic: str, data: str) -> bytes:
        return f'42["pub","{topic}","{data}"]'.encode()

    def on_other(self, agent: Agent, conn: Conn, payload: bytes) -> None:
        if payload == b"2":
            agent.send(conn, client_frame(b"3"))
        else:
            agent.other_frames += 1


ADAPTERS: dict[str, type[Adapter]] = {
    a.name: a for a in (BrokerAdapter, NatsAdapter, SocketIOAdapter)
}


# ---------------------------------------------------------------------------------------------
# the agent: one process, one epoll loop


class Agent:
    def __init__(
        self,
        index: int,
        ctl: Connection,
        shared: Any,
        adapter: str,
        host: str,
        port: int,
        source: str = "",
    ) -> None:
        self.index = index
        self.ctl = ctl
        self.shared = shared
        self.adapter = ADAPTERS[adapter]()
        self.host = host
        self.port = port
        self.source = source  # the local address to connect from ("": the kernel's choice)
        self.ep = select.epoll()
        self.ep.register(ctl.fileno(), EPOLLIN)
        self.conns: dict[int, Conn] = {}
        self.received = 0
        self.other_frames = 0
        self.errors: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        self.latency: list[int] = []
        self.lat_every = 0  # measure latency on every n-th connection (0: off)
        self.rx = bytearray(RECV_SIZE)
        self.rxview = memoryview(self.rx)
        self.stream = os.environ.get("BENCH_LOADGEN_WALK") != "1"
        # seconds to sleep between two polls: lets deliveries pile up in the socket buffers so
        # that one read takes many (throughput runs only; 0 while measuring latency)
        self.pace = 0.0
        self.job: dict[str, Any] | None = None
        self.next_ident = 0
        self.stop = False

    # -- connections ---------------------------------------------------------------------

    def open_conn(self, token: str, topics: list[str]) -> Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock, self.next_ident, token, topics)
        self.next_ident += 1
        if self.source:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
        err = sock.connect_ex((self.host, self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            conn.state = CLOSED
            self.errors[f"connect: {errno.errorcode.get(err, err)}"] += 1
            self.job_conn_done(conn, ok=False)
            return conn
        self.conns[sock.fileno()] = conn
        self.ep.register(sock.fileno(), EPOLLOUT | EPOLLIN)
        return conn

    def send(self, conn: Conn, data: bytes) -> None:
        if conn.state == CLOSED:
            return
        if conn.wbuf:
            conn.wbuf += data
            return
        try:
            n = conn.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.fail(conn, f"send: {exc.strerror}")
            return
        if n < len(data):
            conn.wbuf = data[n:]
            self.ep.modify(conn.sock.fileno(), EPOLLIN | EPOLLOUT)

    def close(self, conn: Conn, rst: bool = True) -> None:
        if conn.state == CLOSED:
            return
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        with contextlib.suppress(OSError):
            self.ep.unregister(fd)
        if rst:
            with contextlib.suppress(OSError):
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        conn.sock.close()
        conn.state = CLOSED

    def fail(self, conn: Conn, reason: str) -> None:
        was = conn.state
        self.errors[reason[:100]] += 1
        self.close(conn)
        if was < READY:
            self.job_conn_done(conn, ok=False)

    def opened(self, conn: Conn) -> None:
        if self.job and self.job["kind"] == "churn":
            self.job_conn_done(conn, ok=True)
            self.close(conn)
            return
        if conn.topics:
            conn.state = SUBSCRIBING
            self.adapter.subscribe(self, conn)
        else:
            conn.state = READY
            self.job_conn_done(conn, ok=True)

    def ack(self, conn: Conn) -> None:
        conn.pending -= 1
        if conn.pending <= 0 and conn.state == SUBSCRIBING:
            conn.state = READY
            self.job_conn_done(conn, ok=True)

    # -- I/O -----------------------------------------------------------------------------

    def on_writable(self, conn: Conn) -> None:
        if conn.state == CONNECTING:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(conn, f"connect: {errno.errorcode.get(err, err)}")
                return
            conn.state = UPGRADING
            self.ep.modify(conn.sock.fileno(), EPOLLIN)
            self.send(conn, self.upgrade_request(conn))
            return
        try:
            n = conn.sock.send(conn.wbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(conn, f"send: {exc.strerror}")
            return
        conn.wbuf = conn.wbuf[n:]
        if not conn.wbuf:
            self.ep.modify(conn.sock.fileno(), EPOLLIN)

    def upgrade_request(self, conn: Conn) -> bytes:
        a = self.adapter
        key = base64.b64encode(random.randbytes(16)).decode()
        lines = [
            f"GET {a.request_path(conn.token)} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if a.subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {a.subprotocol}")
        lines.extend(a.headers(conn.token))
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def on_readable(self, conn: Conn) -> None:
        try:
            # into one preallocated buffer: a fresh 256 KiB bytes per recv() would be an
            # mmap/munmap pair each time, which costs more than the read itself
            n = conn.sock.recv_into(self.rx)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(conn, f"recv: {exc.strerror}")
            return
        data = self.rxview[:n].tobytes()
        if not data:
            if conn.state == READY:
                self.closes["eof"] += 1
                self.close(conn)
            else:
                self.fail(conn, f"eof in state {conn.state}")
            return
        if conn.state == READY and self.stream:
            self.count_stream(conn, data)
            return
        if conn.rbuf:
            data = conn.rbuf + data
            conn.rbuf = b""
        if conn.state == UPGRADING:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                conn.rbuf = data
                return
            status = data[: data.find(b"\r\n")]
            if b" 101 " not in status:
                self.fail(conn, "upgrade: " + status.decode(errors="replace"))
                return
            conn.state = OPENING
            self.adapter.on_upgraded(self, conn)
            data = data[end + 4 :]
        self.parse(conn, data)

    def count_stream(self, conn: Conn, data: bytes) -> None:
        """The cheap path once a connection is READY: count the delivery marker in the byte
        stream (with a carry of the previous chunk's last bytes, so that a marker split by a
        read is found once) instead of walking frame headers. The servers are configured not
        to ping during a run; a NATS protocol PING is still answered."""
        carry = conn.rbuf
        buf = carry + data if carry else data
        adapter = self.adapter
        c = buf.count(adapter.prefix)
        if carry:
            c -= carry.count(adapter.prefix)
        self.received += c
        if adapter.error_marker and adapter.error_marker in data:
            self.other_frames += data.count(adapter.error_marker)
        if adapter.ping_marker and adapter.ping_marker in buf:
            adapter.on_other(self, conn, adapter.ping_marker)
        if self.lat_every and conn.ident % self.lat_every == 0:
            now = time.monotonic_ns()
            lat = self.latency
            for ts in TS_RE.findall(buf):  # a whole match (18 bytes) never fits in the carry
                lat.append((now - int(ts)) // 1000)
        conn.rbuf = buf[-CARRY:]

    def parse(self, conn: Conn, data: bytes) -> None:
        adapter = self.adapter
        prefix = adapter.prefix
        multi = adapter.multi
        lat = self.lat_every and conn.ident % self.lat_every == 0
        ready = conn.state == READY
        n = len(data)
        i = 0
        count = 0
        while n - i >= 2:
            ln = data[i + 1] & 127
            if ln < 126:
                s = i + 2
            elif ln == 126:
                if n - i < 4:
                    break
                ln = (data[i + 2] << 8) | data[i + 3]
                s = i + 4
            else:
                if n - i < 10:
                    break
                ln = int.from_bytes(data[i + 2 : i + 10], "big")
                s = i + 10
            end = s + ln
            if end > n:
                break
            op = data[i] & 15
            i = end
            if ready and op <= 2:
                if multi:
                    c = data.count(prefix, s, end)
                    if c:
                        count += c
                        if data.find(b"PING\r\n", s, end) >= 0:
                            self.send(conn, client_frame(b"PONG\r\n"))
                    else:
                        adapter.on_other(self, conn, data[s:end])
                elif data.startswith(prefix, s):
                    count += 1
                else:
                    adapter.on_other(self, conn, data[s:end])
                    continue
                if lat:
                    now = time.monotonic_ns()
                    for ts in TS_RE.findall(data, s, end):
                        self.latency.append((now - int(ts)) // 1000)
            elif op <= 2:
                adapter.on_setup(self, conn, data[s:end])
                if conn.state == CLOSED:
                    return
                ready = conn.state == READY
            elif op == 9:
                self.send(conn, client_frame(data[s:end], 0xA))
            elif op == 8:
                code = (data[s] << 8 | data[s + 1]) if ln >= 2 else 1005
                if conn.state == READY:
                    self.closes[f"close {code}"] += 1
                    self.close(conn)
                else:
                    self.fail(conn, f"close {code} {data[s + 2 : end][:80]!r}")
                return
        if i < n:
            conn.rbuf = data[i:]
        if count:
            self.received += count

    # -- jobs ----------------------------------------------------------------------------

    def job_conn_done(self, conn: Conn, ok: bool) -> None:
        job = self.job
        if job is not None and job["kind"] == "storm":
            self.storm_conn_done(job, conn, ok)
            return
        if job is None or job["kind"] not in ("connect", "churn"):
            return
        if ok:
            job["ok"] += 1
        else:
            job["failed"] += 1
        job["inflight"] -= 1

    def start_job(self, job: dict[str, Any]) -> None:
        job["t0"] = time.monotonic()
        job["started"] = 0
        job["ok"] = 0
        job["failed"] = 0
        job["inflight"] = 0
        job["published"] = 0
        job["base"] = sum(self.shared)
        self.job = job

    def tick(self) -> None:
        job = self.job
        if job is None:
            return
        kind = job["kind"]
        now = time.monotonic()
        if kind in ("connect", "churn"):
            total = job["count"]
            while job["started"] < total and job["inflight"] < job["concurrency"]:
                k = job["started"]
                tokens = job["tokens"]
                topics = job["topics"]
                job["started"] += 1
                job["inflight"] += 1
                self.open_conn(tokens[k % len(tokens)], topics[k] if topics else [])
            done = job["ok"] + job["failed"]
            if done >= total or now - job["t0"] > job["timeout"]:
                self.reply(
                    ok=job["ok"],
                    failed=job["failed"] + total - done,
                    elapsed=now - job["t0"],
                    errors=dict(self.errors.most_common(5)),
                )
        elif kind == "storm":
            self.tick_storm(job, now)
        elif kind == "burst":
            self.tick_burst(job, now)
        elif kind == "rate":
            self.tick_rate(job, now)

    def tick_storm(self, job: dict[str, Any], now: float) -> None:
        """Clients coming back after a restart: client k first connects at a random moment
        of [0, jitter] s after the start, and after each refusal (or failure) again after an
        exponential backoff, ``backoff`` s doubling up to ``backoff_max``, each delay drawn from
        its upper half. Done once every client is subscribed, or at ``timeout``."""
        due = job.get("due")
        if due is None:
            rng = random.Random(job.get("seed", 0) + self.index)
            due = job["due"] = [
                (job["t0"] + rng.uniform(0, job["jitter"]), k, 0) for k in range(job["count"])
            ]
            heapq.heapify(due)
            job["who"] = {}  # connection ident -> (client, attempt)
            job["retries"] = 0
            job["back"] = []  # when each client was back, seconds from the start
        tokens, topics = job["tokens"], job["topics"]
        while due and due[0][0] <= now:
            _, k, attempt = heapq.heappop(due)
            job["who"][self.next_ident] = (k, attempt)  # open_conn may fail at once
            self.open_conn(tokens[k % len(tokens)], topics[k] if topics else [])
        if job["ok"] >= job["count"] or now - job["t0"] > job["timeout"]:
            self.reply(
                ok=job["ok"],
                failed=job["count"] - job["ok"],
                retries=job["retries"],
                back=job["back"],
                errors=dict(self.errors.most_common(5)),
            )

    def storm_conn_done(self, job: dict[str, Any], conn: Conn, ok: bool) -> None:
        k, attempt = job["who"].pop(conn.ident)
        now = time.monotonic()
        if ok:
            job["ok"] += 1
            job["back"].append(now - job["t0"])
            return
        job["retries"] += 1
        delay = min(job["backoff_max"], job["backoff"] * 2**attempt) * random.uniform(0.5, 1)
        heapq.heappush(job["due"], (now + delay, k, attempt + 1))

    def publisher(self) -> Conn | None:
        for conn in self.conns.values():
            if conn.state == READY:
                return conn
        return None

    def publishers(self) -> list[Conn]:
        """This agent's ready connections (agent 0 holds only publishers)."""
        return [conn for conn in self.conns.values() if conn.state == READY]

    def tick_burst(self, job: dict[str, Any], now: float) -> None:
        """Closed loop: a burst of ``burst`` publications in one write, then another once all
        but ``window`` expected deliveries have arrived (counted over every agent)."""
        if now - job["t0"] >= job["duration"]:
            self.reply(published=job["published"], elapsed=now - job["t0"])
            return
        conns = self.publishers()
        if not conns:
            self.reply(published=job["published"], elapsed=now - job["t0"], error="no publisher")
            return
        received = sum(self.shared)
        topics = job["topics"]
        adapter = self.adapter
        burst = job["burst"]
        # with ``own``, publisher k publishes only to topics[k] (a topic per publisher)
        own = job.get("own", False)
        # several bursts per tick when the window allows (the loop ticks about once a
        # millisecond, which would otherwise cap small fan-outs)
        for _ in range(64):
            expected = job["published"] * job["fanout"] + job["base"]
            if expected - received > job["window"]:
                return
            # bursts take turns over the publishers (with several, spread over the workers)
            k = (job["published"] + burst) // burst % len(conns)
            frames = []
            for _ in range(burst):
                topic = topics[k % len(topics) if own else job["published"] % len(topics)]
                job["published"] += 1
                frames.append(client_frame(adapter.publish(topic, make_payload(job["size"]))))
            self.send(conns[k], b"".join(frames))

    def tick_rate(self, job: dict[str, Any], now: float) -> None:
        """Open loop: ``rate`` publications per second, spread round-robin over the topics."""
        elapsed = now - job["t0"]
        if elapsed >= job["duration"]:
            self.reply(published=job["published"], elapsed=elapsed)
            return
        conn = self.publisher()
        if conn is None:
            self.reply(published=job["published"], elapsed=elapsed, error="no publisher")
            return
        due = int(elapsed * job["rate"]) - job["published"]
        if due <= 0:
            return
        topics = job["topics"]
        adapter = self.adapter
        frames = []
        for _ in range(due):
            topic = topics[job["published"] % len(topics)]
            job["published"] += 1
            frames.append(client_frame(adapter.publish(topic, make_payload(job["size"]))))
        self.send(conn, b"".join(frames))

    def reply(self, **fields: Any) -> None:
        self.job = None
        self.ctl.send(fields)

    def command(self) -> None:
        cmd = self.ctl.recv()
        kind = cmd["kind"]
        if kind in ("connect", "churn", "burst", "rate", "storm"):
            cmd.setdefault("timeout", 120.0)
            self.start_job(cmd)
        elif kind == "publish_once":
            conn = self.publisher()
            t = time.monotonic()
            if conn is not None:
                payload = self.adapter.publish(cmd["topic"], make_payload(cmd["size"]))
                self.send(conn, client_frame(payload))
            self.ctl.send({"t": t, "ok": conn is not None})
        elif kind == "stats":
            lat = self.latency
            if cmd.get("reset_latency"):
                self.latency = []
            self.ctl.send(
                {
                    "received": self.received,
                    "ready": sum(1 for c in self.conns.values() if c.state == READY),
                    "open": len(self.conns),
                    "other_frames": self.other_frames,
                    "errors": dict(self.errors.most_common(5)),
                    "closes": dict(self.closes),
                    "latency": lat if cmd.get("latency") else None,
                }
            )
        elif kind == "latency":
            self.lat_every = cmd["every"]
            self.latency = []
            self.ctl.send({"ok": True})
        elif kind == "pace":
            self.pace = cmd["seconds"]
            self.ctl.send({"ok": True})
        elif kind == "stall":
            # stop reading every connection, for good: the server sees subscribers whose
            # receive buffers fill and stay full (slow consumers)
            for conn in self.conns.values():
                self.ep.modify(conn.sock.fileno(), 0)
            self.ctl.send({"ok": True, "stalled": len(self.conns)})
        elif kind == "close_all":
            for conn in list(self.conns.values()):
                self.close(conn)
            self.ctl.send({"ok": True})
        elif kind == "exit":
            # reset rather than close: no TIME_WAIT left behind to eat the ephemeral ports
            # that the next workload's thousands of connections need
            for conn in list(self.conns.values()):
                self.close(conn)
            self.stop = True

    def run(self) -> None:
        ctl_fd = self.ctl.fileno()
        conns = self.conns
        while not self.stop:
            busy = self.job is not None and self.job["kind"] in ("burst", "rate")
            timeout = 0.001 if busy else 0.02
            for fd, ev in self.ep.poll(timeout, 4096):
                if fd == ctl_fd:
                    self.command()
                    continue
                conn = conns.get(fd)
                if conn is None:
                    continue
                if ev & EPOLLOUT:
                    self.on_writable(conn)
                    if conn.state == CLOSED:
                        continue
                if ev & (EPOLLIN | EPOLLERR):
                    self.on_readable(conn)
            self.tick()
            self.shared[self.index] = self.received
            if self.pace:
                time.sleep(self.pace)


def _agent_main(
    index: int, ctl: Connection, shared: Any, adapter: str, host: str, port: int, source: str
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt, EOFError, BrokenPipeError):
        Agent(index, ctl, shared, adapter, host, port, source).run()


# ---------------------------------------------------------------------------------------------
# the controller side


class Generator:
    """Agent processes for one server. Agent 0 holds the publisher; subscribers are spread
    over agents 1..n. With ``sources``, agent i connects from ``sources[i % len(sources)]``."""

    def __init__(
        self,
        adapter: str,
        host: str,
        port: int,
        sub_procs: int = 1,
        sources: list[str] | None = None,
    ) -> None:
        ctx = mp.get_context("fork")
        self.nagents = 1 + sub_procs
        self.shared = ctx.Array("q", self.nagents, lock=False)
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(self.nagents):
            parent, child = ctx.Pipe()
            source = sources[i % len(sources)] if sources else ""
            p = ctx.Process(
                target=_agent_main,
                args=(i, child, self.shared, adapter, host, port, source),
                daemon=True,
            )
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(pid) for pid in self.pids)

    def received(self) -> int:
        return sum(self.shared)

    def call(self, index: int, timeout: float = 300.0, **cmd: Any) -> dict[str, Any]:
        self.pipes[index].send(cmd)
        if not self.pipes[index].poll(timeout):
            raise TimeoutError(f"agent {index} did not answer {cmd['kind']}")
        reply: dict[str, Any] = self.pipes[index].recv()
        return reply

    def call_all(
        self, indices: list[int], timeout: float = 300.0, **cmd: Any
    ) -> list[dict[str, Any]]:
        for i in indices:
            self.pipes[i].send(cmd)
        replies = []
        deadline = time.monotonic() + timeout
        for i in indices:
            if not self.pipes[i].poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"agent {i} did not answer {cmd['kind']}")
            replies.append(self.pipes[i].recv())
        return replies

    @property
    def subscriber_agents(self) -> list[int]:
        return list(range(1, self.nagents))

    def connect_publisher(self, token: str, timeout: float = 30.0) -> None:
        r = self.call(
            0, kind="connect", count=1, concurrency=1, tokens=[token], topics=None, timeout=timeout
        )
        if r["ok"] != 1:
            raise RuntimeError(f"publisher did not connect: {r['errors']}")

    def connect_subscribers(
        self,
        count: int,
        tokens: list[str],
        topics: list[list[str]] | None,
        concurrency: int = 200,
        timeout: float = 120.0,
        agents: list[int] | None = None,
    ) -> dict[str, Any]:
        """Open ``count`` connections spread over ``agents`` (by default every subscriber
        agent; connection k gets ``topics[k]``); returns ok, failed, elapsed, errors."""
        agents = agents or self.subscriber_agents
        per: list[list[int]] = [[] for _ in agents]
        for k in range(count):
            per[k % len(agents)].append(k)
        t0 = time.monotonic()
        for a, ks in zip(agents, per, strict=True):
            self.pipes[a].send(
                {
                    "kind": "connect",
                    "count": len(ks),
                    "concurrency": max(1, concurrency // len(agents)),
                    "tokens": [tokens[k % len(tokens)] for k in ks],
                    "topics": [topics[k] for k in ks] if topics else None,
                    "timeout": timeout,
                }
            )
        replies = [self.pipes[a].recv() for a in agents]
        errors: Counter[str] = Counter()
        for r in replies:
            errors.update(r["errors"])
        return {
            "ok": sum(r["ok"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "elapsed": time.monotonic() - t0,
            "errors": dict(errors.most_common(5)),
        }

    def stats(self, latency: bool = False) -> dict[str, Any]:
        replies = self.call_all(list(range(self.nagents)), kind="stats", latency=latency)
        errors: Counter[str] = Counter()
        closes: Counter[str] = Counter()
        lat: list[int] = []
        for r in replies:
            errors.update(r["errors"])
            closes.update(r["closes"])
            if r["latency"]:
                lat.extend(r["latency"])
        return {
            "received": sum(r["received"] for r in replies),
            "ready": sum(r["ready"] for r in replies),
            "open": sum(r["open"] for r in replies),
            "other_frames": sum(r["other_frames"] for r in replies),
            "errors": dict(errors.most_common(5)),
            "closes": dict(closes),
            "latency": lat,
        }

    def close(self) -> None:
        for i, pipe in enumerate(self.pipes):
            with contextlib.suppress(OSError):
                pipe.send({"kind": "exit"})
            self.procs[i].join(timeout=5)
            if self.procs[i].is_alive():
                self.procs[i].kill()
                self.procs[i].join()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
