"""Granted network destinations inside a plugin container: what they are, and a TCP relay.

The container has no network but `lo`. The supervisor forwards each granted destination as a
Unix socket and says so in two environment variables (docs/protocol.md, "Network grants"):

    DATIVO_NETWORK="db.example.com:5432=/run/dativo/net/db.example.com/.s.PGSQL.5432;..."
    DATIVO_NETWORK_TCP="db.example.com:5432=127.0.0.2:5432;..."

For TCP clients that cannot use a Unix socket, the Python plugin host listens on each loopback
address of `DATIVO_NETWORK_TCP` and relays every connection to the destination's Unix socket
(two threads per connection, bounded buffers). Granted host names resolve to that loopback
address inside the container (the supervisor writes them into its `/etc/hosts`).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from collections.abc import Mapping

from dativo._forward import forward
from dativo.sdk import NetworkDestination

__all__ = ["ENV_SOCKETS", "ENV_TCP", "LoopbackRelay", "destinations_from_env"]

ENV_SOCKETS = "DATIVO_NETWORK"
ENV_TCP = "DATIVO_NETWORK_TCP"
_BACKLOG = 16


def _pairs(text: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for entry in text.split(";"):
        destination, sep, value = entry.strip().partition("=")
        if sep and destination and value:
            pairs[destination] = value
    return pairs


def destinations_from_env(environ: Mapping[str, str]) -> dict[str, NetworkDestination]:
    """The granted destinations the supervisor announced, by `host:port`."""
    sockets = _pairs(environ.get(ENV_SOCKETS, ""))
    tcp = _pairs(environ.get(ENV_TCP, ""))
    found: dict[str, NetworkDestination] = {}
    for destination, path in sockets.items():
        relay = tcp.get(destination, "")
        host, _, port = relay.rpartition(":")
        if not host or not port.isdigit():
            host, _, port = destination.rpartition(":")
        found[destination] = NetworkDestination(
            destination=destination, host=host, port=int(port), socket_path=path
        )
    return found


class LoopbackRelay:
    """Listens on each destination's loopback address and relays to its Unix socket."""

    def __init__(self, destinations: Mapping[str, NetworkDestination], log: logging.Logger) -> None:
        self._log = log
        self._listeners: dict[socket.socket, NetworkDestination] = {}
        self._stop_r, self._stop_w = socket.socketpair()
        for destination in destinations.values():
            if destination.socket_path is None:
                continue
            try:
                listener = socket.create_server(
                    (destination.host, destination.port), backlog=_BACKLOG
                )
            except OSError as exc:
                log.warning(
                    "cannot relay `%s` on %s:%d (%s); connect to its socket %s instead",
                    destination.destination,
                    destination.host,
                    destination.port,
                    exc,
                    destination.socket_path,
                )
                continue
            listener.setblocking(False)
            self._listeners[listener] = destination
        self._thread: threading.Thread | None = None
        if self._listeners:
            self._thread = threading.Thread(target=self._run, name="dativo-relay", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._stop_r, selectors.EVENT_READ)
            for listener in self._listeners:
                selector.register(listener, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._stop_r:
                        return
                    ready = key.fileobj
                    if isinstance(ready, socket.socket):
                        self._accept(ready, self._listeners[ready])

    def _accept(self, listener: socket.socket, destination: NetworkDestination) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        client.setblocking(True)
        assert destination.socket_path is not None
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(destination.socket_path)
        except OSError as exc:
            self._log.warning(
                "cannot reach `%s` through %s: %s",
                destination.destination,
                destination.socket_path,
                exc,
            )
            upstream.close()
            client.close()
            return
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def pump() -> None:
            back = threading.Thread(target=forward, args=(upstream, client), daemon=True)
            back.start()
            forward(client, upstream)
            back.join()
            client.close()
            upstream.close()

        try:
            threading.Thread(target=pump, name="dativo-relay-conn", daemon=True).start()
        except RuntimeError:  # the process limit: no thread for this connection
            client.close()
            upstream.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stop_w.send(b"x")
        if self._thread is not None:
            self._thread.join(2.0)
        for listener in self._listeners:
            listener.close()
        self._stop_r.close()
        self._stop_w.close()
