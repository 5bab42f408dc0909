"""BulkReader: pipelined GETs of chunk frames, each value received straight into its own buffer.

The store's Get sends every stored frame back out, so how a frame comes off the Redis socket
is on its bulk path. redis-py's parsers copy a 1 MiB bulk reply three or four times before
the caller sees it: asyncio's stream buffer, `readexactly`, the tail join and the slice that
drops the CRLF; the blocking parser goes through a BytesIO and slices as well. Measured in the
store during 24 MB gets, memmove was a quarter of its CPU. Here a reply's length line is read
first and its value then lands with one `recv_into` in a buffer of exactly that size: a
single copy, by the kernel.

Blocking sockets, used from the Redis backend's worker threads (one connection per caller at
a time, kept in a small pool). Plain `redis://` and `unix://` URLs only (AUTH and SELECT as
the URL says); for anything else (TLS) `BulkReader.for_url` returns None and the backend
keeps redis-py. Errors: OSError / TimeoutError from the socket, redis-py's ConnectionError for
a reply that is not RESP, ResponseError for an error reply; the connection is dropped in each case
(a pooled one found dead is replaced and the GETs sent again).
"""

from __future__ import annotations

import queue
import socket
from collections.abc import Sequence

from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

MAX_LINE = 4096  # a bulk reply's length line ("$1048640\r\n") is ~10 bytes; error lines are longer
MAX_IDLE = 4  # idle connections kept


def _command(*args: bytes) -> bytes:
    return b"".join([b"*%d\r\n" % len(args), *(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)])


class _Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def line(self) -> bytes:
        """One reply line without its CRLF, read byte by byte so nothing of the value is taken."""
        out = bytearray()
        while not out.endswith(b"\r\n"):
            b = self.sock.recv(1)
            if not b:
                raise RedisConnectionError("redis closed the connection mid-reply")
            out += b
            if len(out) > MAX_LINE:
                raise RedisConnectionError(f"redis reply line over {MAX_LINE} bytes: {bytes(out[:MAX_LINE])!r}")
        return bytes(out[:-2])

    def exact(self, view: memoryview) -> None:
        while view:
            n = self.sock.recv_into(view)
            if n == 0:
                raise RedisConnectionError("redis closed the connection mid-value")
            view = view[n:]

    def simple(self) -> None:
        """Expect +OK (AUTH, SELECT)."""
        line = self.line()
        if line[:1] == b"-":
            raise ResponseError(line[1:].decode(errors="replace"))
        if line[:1] != b"+":
            raise RedisConnectionError(f"unexpected redis reply {line!r}")

    def bulk(self) -> memoryview | None:
        line = self.line()
        if line[:1] == b"-":
            raise ResponseError(line[1:].decode(errors="replace"))
        if line[:1] != b"$" or not line[1:].lstrip(b"-").isdigit():
            raise RedisConnectionError(f"expected a bulk reply from redis, got {line[:MAX_LINE]!r}")
        n = int(line[1:])
        if n < 0:
            return None
        buf = bytearray(n + 2)
        self.exact(memoryview(buf))
        if buf[n:] != b"\r\n":
            raise RedisConnectionError("redis bulk reply not terminated by CRLF")
        return memoryview(buf)[:n]


class BulkReader:
    def __init__(self, addr: tuple[str, int] | str, timeout_s: float, db: int = 0, username: str | None = None,
                 password: str | None = None):
        self.addr, self.timeout_s = addr, timeout_s
        hello = []  # sent on every new connection, each answered by +OK
        if password is not None:
            hello.append(_command(b"AUTH", *((username.encode(),) if username else ()), password.encode()))
        if db:
            hello.append(_command(b"SELECT", str(db).encode()))
        self._hello, self._hello_replies = b"".join(hello), len(hello)
        self._idle: queue.SimpleQueue[_Conn] = queue.SimpleQueue()

    @classmethod
    def for_url(cls, url: str, timeout_s: float) -> BulkReader | None:
        """A reader for a redis:// or unix:// URL; None for a URL it does not handle (TLS)."""
        kw = parse_url(url)
        if "connection_class" in kw and "path" not in kw:  # rediss://: leave TLS to redis-py
            return None
        addr = kw["path"] if "path" in kw else (kw.get("host", "localhost"), int(kw.get("port", 6379)))
        return cls(addr, timeout_s, int(kw.get("db", 0) or 0), kw.get("username"), kw.get("password"))

    def _connect(self) -> _Conn:
        if isinstance(self.addr, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.addr)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection(self.addr, timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock)
        try:
            if self._hello:
                sock.sendall(self._hello)
                for _ in range(self._hello_replies):
                    conn.simple()
        except BaseException:
            sock.close()
            raise
        return conn

    def get(self, keys: Sequence[str]) -> list[memoryview | None]:
        """The values of `keys` (None where absent), one pipelined round of GETs. A pooled
        connection that turns out dead (Redis restarted since) is replaced once: GETs repeat safely."""
        command = b"".join(_command(b"GET", k.encode()) for k in keys)
        while True:
            try:
                conn, pooled = self._idle.get_nowait(), True
            except queue.Empty:
                conn, pooled = self._connect(), False
            try:
                conn.sock.sendall(command)
                out = [conn.bulk() for _ in keys]
            except TimeoutError:  # slow, not dead: another try would only wait again
                conn.sock.close()
                raise
            except (OSError, RedisConnectionError):
                conn.sock.close()
                if pooled:
                    continue
                raise
            except BaseException:
                conn.sock.close()
                raise
            if self._idle.qsize() < MAX_IDLE:
                self._idle.put(conn)
            else:
                conn.sock.close()
            return out

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().sock.close()
            except queue.Empty:
                return
