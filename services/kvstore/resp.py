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

import asyncio
import queue
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

MAX_LINE = 4096  # a bulk reply's length line ("$1048640\r\n") is ~10 bytes; error lines are longer
MAX_IDLE = 4  # idle connections kept
IOV_MAX = 512  # buffers per sendmsg (Linux allows 1024)


def command(*args: bytes) -> bytes:
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
            hello.append(command(b"AUTH", *((username.encode(),) if username else ()), password.encode()))
        if db:
            hello.append(command(b"SELECT", str(db).encode()))
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
        gets = b"".join(command(b"GET", k.encode()) for k in keys)
        while True:
            try:
                conn, pooled = self._idle.get_nowait(), True
            except queue.Empty:
                conn, pooled = self._connect(), False
            try:
                conn.sock.sendall(gets)
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


# ---- writes from the event loop ------------------------------------------------------
class _More(Exception):
    """The reply buffer ends inside a reply: read more."""


def command_head(*args: bytes, value_len: int) -> bytes:
    """RESP of a command whose last argument is a value of `value_len` bytes, up to the value:
    send it, the value's own buffer and CRLF as the pieces of one writev."""
    n = len(args) + 1
    return b"".join([b"*%d\r\n" % n, *(b"$%d\r\n%s\r\n" % (len(a), a) for a in args), b"$%d\r\n" % value_len])


def set_head(key: bytes, value_len: int, px_ms: int) -> tuple[bytes, bytes]:
    """(head, tail) of `SET key <value> PX px_ms`: the pieces around the value."""
    head = b"*5\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, value_len)
    return head, b"\r\n$2\r\nPX\r\n$%d\r\n%d\r\n" % (len(str(px_ms)), px_ms)


class LoopPipe:
    """One Redis connection driven from the event loop, pipelined: each command goes out as
    one `sendmsg` of its pieces (values straight from the caller's buffers, no join), without
    waiting for its reply; the replies are read later, in order (`replies`), or whatever has
    arrived so far (`poll`). A send the socket cannot take at once waits until it can.

    Error replies come back as ResponseError values, not raised, so every reply is read and the
    connection stays usable. A pipe whose send was interrupted midway is `broken` (half a
    command is on the wire) until `finish_sends()` completes it."""

    def __init__(self, sock: socket.socket, timeout_s: float):
        self.sock, self.timeout_s = sock, timeout_s
        self.pending = 0  # commands sent whose replies are unread
        self._buf = bytearray()
        self._unsent: list[memoryview] = []  # the rest of an interrupted send

    @property
    def broken(self) -> bool:
        return bool(self._unsent)

    def send_nowait(self, pieces: list, commands: int = 1) -> bool:
        """Send the pieces of `commands` whole commands; True when all left now, False when the
        socket is full (then `finish_sends` before anything else). OSError when the connection is gone."""
        if self._unsent:
            raise RuntimeError("finish_sends() first: a command is half sent")
        self.pending += commands
        self._unsent = [memoryview(p) for p in pieces]
        self._push()
        return not self._unsent

    def _push(self) -> None:
        """Write what the socket takes now, keeping account of what is left."""
        while self._unsent:
            try:
                sent = self.sock.sendmsg(self._unsent[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                return
            while sent and self._unsent:
                n = len(self._unsent[0])
                if sent < n:
                    self._unsent[0] = self._unsent[0][sent:]
                    break
                sent -= n
                self._unsent.pop(0)
            while self._unsent and not len(self._unsent[0]):
                self._unsent.pop(0)

    async def _ready(self, writing: bool) -> None:
        """Wait until the socket can be written (or read). Nothing is lost when the wait is
        cancelled: every byte sent or received is accounted for outside it."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fd = self.sock.fileno()
        add, remove = (loop.add_writer, loop.remove_writer) if writing else (loop.add_reader, loop.remove_reader)
        add(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            remove(fd)

    async def finish_sends(self) -> None:
        while self._unsent:
            await self._ready(writing=True)
            self._push()

    async def send(self, pieces: list, commands: int = 1) -> None:
        if not self.send_nowait(pieces, commands):
            await self.finish_sends()

    def _parse(self, pos: int):
        """(reply, position after it) of the reply at `pos`; _More when it is not all there."""
        buf = self._buf
        end = buf.find(b"\r\n", pos)
        if end < 0:
            if len(buf) - pos > MAX_LINE:
                raise RedisConnectionError(f"redis reply line over {MAX_LINE} bytes")
            raise _More
        kind, line, nxt = buf[pos], bytes(buf[pos + 1 : end]), end + 2
        if kind == 0x2B:  # +
            return line, nxt
        if kind == 0x2D:  # -
            return ResponseError(line.decode(errors="replace")), nxt
        if kind == 0x3A:  # :
            return int(line), nxt
        if kind == 0x24:  # $
            n = int(line)
            if n < 0:
                return None, nxt
            if len(buf) < nxt + n + 2:
                raise _More
            return bytes(buf[nxt : nxt + n]), nxt + n + 2
        if kind == 0x2A:  # *
            n = int(line)
            if n < 0:
                return None, nxt
            out = []
            for _ in range(n):
                v, nxt = self._parse(nxt)
                out.append(v)
            return out, nxt
        raise RedisConnectionError(f"unexpected redis reply {bytes(buf[pos:end])[:80]!r}")

    def _take(self, limit: int) -> list:
        out, pos = [], 0
        try:
            while self.pending and len(out) < limit:
                v, pos = self._parse(pos)
                out.append(v)
                self.pending -= 1
        except _More:
            pass
        del self._buf[:pos]
        return out

    def _receive(self) -> None:
        """Take what has arrived, without waiting."""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                raise RedisConnectionError("redis closed the connection")
            self._buf += data
            if len(data) < 1 << 16:
                return

    def poll(self) -> list:
        """The replies already received (none waited for)."""
        self._receive()
        return self._take(self.pending)

    async def replies(self) -> list:
        """Every pending reply, in order (waiting for them)."""
        await self.finish_sends()
        out = self.poll()
        while self.pending:
            await self._ready(writing=False)
            out += self.poll()
        return out

    def alive(self) -> bool:
        """Idle and still connected (an idle connection Redis closed reads as EOF)."""
        if self.pending or self._unsent or self._buf:
            return False
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return False  # EOF, or bytes nobody asked for

    def close(self) -> None:
        self.sock.close()


class LoopConnections:
    """A small pool of `LoopPipe`s to one Redis (plain redis:// or unix:// URLs, AUTH and SELECT
    as the URL says), for use from one event loop."""

    def __init__(self, addr: tuple[str, int] | str, timeout_s: float, hello: bytes = b"", hello_replies: int = 0):
        self.addr, self.timeout_s = addr, timeout_s
        self._hello, self._hello_replies = hello, hello_replies  # AUTH / SELECT, each answered +OK
        self._idle: list[LoopPipe] = []

    @classmethod
    def for_url(cls, url: str, timeout_s: float) -> LoopConnections | None:
        reader = BulkReader.for_url(url, timeout_s)
        if reader is None:
            return None
        return cls(reader.addr, timeout_s, reader._hello, reader._hello_replies)

    async def acquire(self) -> LoopPipe:
        while self._idle:
            pipe = self._idle.pop()
            if pipe.alive():
                return pipe
            pipe.close()
        loop = asyncio.get_running_loop()
        unix = isinstance(self.addr, str)
        if unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            infos = await loop.getaddrinfo(*self.addr, type=socket.SOCK_STREAM)
            sock = socket.socket(infos[0][0], socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.timeout_s):
                await loop.sock_connect(sock, self.addr if unix else infos[0][4])
                if not unix:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pipe = LoopPipe(sock, self.timeout_s)
                if self._hello:
                    await pipe.send([self._hello])
                    pipe.pending = self._hello_replies
                    for r in await pipe.replies():
                        if isinstance(r, ResponseError):
                            raise r
        except BaseException:
            sock.close()
            raise
        return pipe

    def release(self, pipe: LoopPipe) -> None:
        """Back to the pool when clean (nothing pending, nothing half sent), else closed."""
        if not pipe.pending and not pipe.broken and not pipe._buf and len(self._idle) < MAX_IDLE:
            self._idle.append(pipe)
        else:
            pipe.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


# ---- writes from a worker thread -------------------------------------------------------
def send_blocking(sock: socket.socket, pieces: list, deadline: float) -> None:
    """Send every piece on `sock` (non-blocking; waiting in poll() while it is full), in order,
    as one command: `sendmsg` of up to IOV_MAX views at a time, the GIL released in each system
    call. TimeoutError past `deadline` (time.monotonic()); OSError when the connection is gone."""
    views = [memoryview(p) for p in pieces]
    poller = None
    while views:
        try:
            sent = sock.sendmsg(views[:IOV_MAX])
        except (BlockingIOError, InterruptedError):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("redis did not take a write within the deadline") from None
            if poller is None:
                poller = select.poll()
                poller.register(sock.fileno(), select.POLLOUT)
            poller.poll(max(1, int(left * 1000)))
            continue
        while sent and views:
            n = len(views[0])
            if sent < n:
                views[0] = views[0][sent:]
                break
            sent -= n
            views.pop(0)
        while views and not len(views[0]):
            views.pop(0)


class ThreadSender:
    """Sends the commands of one `LoopPipe` from a worker thread, in order, while the event loop
    goes on receiving: the loop hands each command over (`put`, no system call) and the thread
    does the kernel's copy of it into the socket, with the GIL released.

    At most `limit` bytes wait unsent: past that, `put` returns a future the loop awaits until
    the thread has caught up. `close()` says no more commands come; `done` (an asyncio future)
    resolves once every command handed over has been sent, or the first failure (`error`, after
    which the rest are not sent and the pipe is half written: close it). The pipe's replies are
    read by the loop as before (`LoopPipe.poll` / `replies`), never by the thread; the pipe's own
    `send` must not be used until `done`."""

    def __init__(self, pipe: LoopPipe, run: "Callable[[Callable[[], None]], object]", limit: int,
                 timeout_s: float):
        self.pipe, self.limit, self.timeout_s = pipe, limit, timeout_s
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future = self.loop.create_future()
        self.error: BaseException | None = None
        self._cv = threading.Condition()
        self._queue: deque[tuple[list, int]] = deque()
        self._queued = 0  # bytes handed over and not yet sent
        self._closed = False
        self._finished = False  # the thread is done with the socket
        self._abandoned = False  # nobody takes the pipe back: the thread closes it when done
        self._space: asyncio.Future | None = None  # the loop waits on it while over the limit
        run(self._run)

    def put(self, pieces: list, nbytes: int, commands: int = 1) -> asyncio.Future | None:
        """Hand one command over; None, or a future to await before the next (over the limit)."""
        if self.error is not None:
            raise self.error
        self.pipe.pending += commands
        with self._cv:
            self._queue.append((pieces, nbytes))
            self._queued += nbytes
            self._cv.notify()
            if self._queued > self.limit:
                self._space = self.loop.create_future()
                return self._space
        return None

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def abandon(self) -> None:
        """The loop gives up waiting for `done` (a deadline, a cancelled call): nothing more is
        sent and the pipe is closed, by the thread once its send in progress ends (never under
        it: the socket's number could be reused by another connection meanwhile)."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._abandoned = True
            finished = self._finished
            self._cv.notify()
        if finished:
            self.pipe.close()

    def _run(self) -> None:
        wake: list[asyncio.Future] = []
        try:
            while True:
                with self._cv:
                    while not self._queue and not self._closed:
                        self._cv.wait()
                    if not self._queue:
                        return
                    pieces, nbytes = self._queue[0]
                send_blocking(self.pipe.sock, pieces, time.monotonic() + self.timeout_s)
                with self._cv:
                    if self._queue:  # (abandon() may have emptied it meanwhile)
                        self._queue.popleft()
                    self._queued -= nbytes
                    if self._space is not None and self._queued <= self.limit:
                        wake.append(self._space)
                        self._space = None
                if wake:
                    try:
                        self.loop.call_soon_threadsafe(_resolve, wake.pop())
                    except RuntimeError:  # the loop is closed: nobody waits any more
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it
            self.error = e
        finally:
            with self._cv:
                self._closed = self._finished = True
                self._queue.clear()
                space, self._space = self._space, None
                abandoned = self._abandoned
            if abandoned:
                self.pipe.close()
            for fut in (space, self.done):
                if fut is not None:
                    try:
                        self.loop.call_soon_threadsafe(_resolve, fut)
                    except RuntimeError:  # the loop is closed: nobody waits any more
                        pass


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
