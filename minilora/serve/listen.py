"""The listening socket and the HTTP protocol `minilora serve` runs under uvicorn, with the bounds
uvicorn does not give by itself.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) and caps the size of an
unfinished header (h11's incomplete-event limit), but it waits forever for a client that sends
its header or its body a byte at a time, and it accepts connections until the process runs out
of file descriptors. `guarded_protocol` adds both: a request must arrive whole (header and body)
within ``read_timeout`` seconds of its first byte or of the previous answer, else the connection
is closed; and past ``max_connections`` open connections a new one gets a 503 and is closed at
once.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from minilora.core.errors import ConfigError

MAX_HEADER_BYTES = 16 * 1024  # h11's limit on a header still being received


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, made before anything slow (the model) is loaded.

    Raises:
        ConfigError: the port is out of range, the host has no address, or the address cannot
            be bound (in use, not this machine's, not permitted); one line each.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port number from 0 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host}: not an address of this machine or a known name "
                          f"({e})") from None
    # "localhost" may list ::1 first; clients mostly try 127.0.0.1, so IPv4 wins a tie
    family, kind, proto, _, address = sorted(infos, key=lambda i: i[0] != socket.AF_INET)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        reason = e.strerror or str(e)
        hint = " (another server is listening there: pick another --port)" if (
            e.errno in (98, 48, 10048)) else ""
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}{hint}") from None
    sock.set_inheritable(True)
    return sock


def guarded_protocol(read_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with a whole-request read timeout and a connection cap.

    Args:
        read_timeout: seconds a request's header and body may take to arrive, counted from the
            connection's start or the end of the previous answer.
        max_connections: most connections open at once; one more is answered 503 and closed.

    Returns:
        A protocol class for ``uvicorn.Config(http=...)``.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    busy = _busy_response()

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            self._read_timer: asyncio.TimerHandle | None = None
            self._armed_for = None
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy)
                transport.close()
                return
            self._arm(after=None)

        def _arm(self, after: Any) -> None:
            """Starts the clock for the request after `after` (its header and whole body)."""
            self._disarm()
            self._armed_for = after
            self._read_timer = self.loop.call_later(read_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _too_slow(self) -> None:
            self._read_timer = None
            if not self.transport.is_closing():
                self.transport.close()  # the app, if it was reading the body, sees a disconnect

        def handle_events(self) -> None:
            super().handle_events()
            cycle = self.cycle
            if cycle is not None and cycle is not self._armed_for and not cycle.more_body:
                self._disarm()  # the request is all here; answering it has no read deadline

        def on_response_complete(self) -> None:
            finished = self.cycle
            super().on_response_complete()  # may start a pipelined request already received
            if self.transport.is_closing():
                return
            if self.cycle is finished or self.cycle.more_body:
                self._arm(after=finished)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def _busy_response() -> bytes:
    body = json.dumps({"error": {
        "message": "the server has too many open connections; retry shortly",
        "type": "server_error", "param": None, "code": "too_many_connections"}}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"retry-after: 1\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n")
    return head.encode() + body


def server_config(app: Any, *, read_timeout: float, keep_alive: int, max_connections: int,
                  log_level: str = "warning", **more: Any) -> Any:
    """The uvicorn.Config `minilora serve` runs: the guarded h11 protocol, keep-alive and
    header-size limits, no access log (prompts are the users' own); `more` goes to
    uvicorn.Config as it is (host and port, say)."""
    import uvicorn

    return uvicorn.Config(app, http=guarded_protocol(read_timeout, max_connections),
                          timeout_keep_alive=keep_alive, log_level=log_level,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, access_log=False,
                          lifespan="off", ws="none", **more)
