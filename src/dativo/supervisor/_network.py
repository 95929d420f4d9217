"""Network grants: each granted `host:port` reaches its plugin as a Unix socket, and nothing else.

A plugin container keeps `network_mode: none` (only `lo`). For every destination the job grants
it (already checked against the plugin's manifest by `dativo.signing`), the supervisor, before
the container starts:

1. **pins** the destination: the host is resolved once, here, by the supervisor's resolver (an
   IP literal is not resolved at all), and the run uses those addresses until it ends. A host
   name that does not resolve, or that resolves to a loopback, link-local, multicast or
   unspecified address (the supervisor's own machine, a cloud metadata service), refuses the
   run; such an address can be granted only by writing it literally;
2. **binds** a listening Unix socket in the plugin's socket directory (mounted read-only at
   `/run/dativo`), at `net/<host>/.s.PGSQL.<port>`: libpq's naming, so `host=/run/dativo/net/<host>
   port=<port>` works as is, and any other client takes the path from `DATIVO_NETWORK`;
3. **forwards**: each connection the plugin makes to that socket is joined to a new TCP
   connection to the pinned address (`splice(2)`, bounded buffers, backpressure), counted in
   bytes both ways, and logged. At most `MAX_CONNECTIONS` at a time per plugin; more are
   closed at once and counted as refused. A destination that does not accept the connection
   (down, refusing, unreachable) closes the plugin's connection and is recorded, so a failing
   run names it.

When the run ends, whatever happened, the listeners close and every forwarded connection is
shut down. See docs/network-policy.md.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dativo._forward import forward
from dativo.errors import ConfigError, EngineError

__all__ = [
    "CONNECT_TIMEOUT",
    "ENV_SOCKETS",
    "ENV_TCP",
    "MAX_CONNECTIONS",
    "NET_DIR",
    "Pinned",
    "PluginNetwork",
    "pin",
    "split_destination",
]

log = logging.getLogger(__name__)

NET_DIR = "net"
ENV_SOCKETS = "DATIVO_NETWORK"
ENV_TCP = "DATIVO_NETWORK_TCP"
MAX_CONNECTIONS = 32
CONNECT_TIMEOUT = 10.0
LOGGED_CONNECTIONS = 200  # per plugin; after that, the counts in the run report only
_MAX_SUN_PATH = 107
_JOIN_GRACE = 5.0

Resolver = Callable[..., list[tuple[Any, ...]]]


def _system_resolver(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
    return socket.getaddrinfo(*args, **kwargs)


# Tests replace this to give a host name an address without touching the machine's resolver.
getaddrinfo: Resolver = _system_resolver


def split_destination(destination: str) -> tuple[str, int]:
    """`db.example.com:5432` -> (`db.example.com`, 5432); `[::1]:443` -> (`::1`, 443)."""
    host, _, port = destination.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@dataclass(frozen=True)
class Pinned:
    """A granted destination and the addresses it was pinned to for this run."""

    destination: str  # as granted, normalised: `db.example.com:5432`
    host: str  # without brackets
    port: int
    addresses: tuple[tuple[int, tuple[Any, ...]], ...]  # (family, sockaddr), in order
    literal: bool  # the grant names an IP address, not a host name

    @property
    def shown(self) -> str:
        """The pinned addresses, for messages: `10.0.0.7:5432` or `[2001:db8::1]:443, ...`."""
        return ", ".join(_show(family, sockaddr) for family, sockaddr in self.addresses)


def _show(family: int, sockaddr: tuple[Any, ...]) -> str:
    if family == socket.AF_INET6:
        return f"[{sockaddr[0]}]:{sockaddr[1]}"
    return f"{sockaddr[0]}:{sockaddr[1]}"


def _forbidden(address: str) -> str | None:
    """Why a host *name* may not resolve to `address`, or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address (the supervisor's own machine)"
    if ip.is_link_local:
        return "a link-local address (such as a cloud metadata service)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "the unspecified address"
    return None


def pin(destinations: Iterable[str], *, field_path: str) -> tuple[Pinned, ...]:
    """Resolve each granted destination once; the run uses these addresses until it ends.

    Raises:
        ConfigError: a host name does not resolve, or resolves to an address a name may not
            stand for (loopback, link-local, multicast, unspecified); the message names the
            destination and the job field.
    """
    pinned: list[Pinned] = []
    seen: set[str] = set()
    for destination in destinations:
        if destination in seen:
            continue
        seen.add(destination)
        host, port = split_destination(destination)
        try:
            ipaddress.ip_address(host)
            literal = True
        except ValueError:
            literal = False
        flags = socket.AI_NUMERICHOST if literal else 0
        try:
            infos = getaddrinfo(host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP, flags)
        except (OSError, UnicodeError) as exc:
            error = ConfigError(
                f"`{field_path}.network`: cannot resolve the granted destination "
                f"`{destination}`: {_reason(exc)}; nothing was started",
                field=f"{field_path}.network",
            )
            error.transient = True  # a resolver may answer later
            raise error from None
        addresses: list[tuple[int, tuple[Any, ...]]] = []
        for family, _type, _proto, _name, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            entry = (int(family), tuple(sockaddr))
            if entry not in addresses:
                addresses.append(entry)
            if not literal:
                why = _forbidden(str(sockaddr[0]))
                if why is not None:
                    raise ConfigError(
                        f"`{field_path}.network`: the host name of the granted destination "
                        f"`{destination}` resolves to {sockaddr[0]}, {why}; a grant reaches such "
                        "an address only when it names it literally (for example "
                        f"`{_show(family, sockaddr)}`); nothing was started",
                        field=f"{field_path}.network",
                    )
        if not addresses:
            raise ConfigError(
                f"`{field_path}.network`: the granted destination `{destination}` resolves to "
                "no IPv4 or IPv6 address; nothing was started",
                field=f"{field_path}.network",
            )
        pinned.append(Pinned(destination, host, port, tuple(addresses), literal))
    return tuple(pinned)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        try:
            name = errno.errorcode[exc.errno]
        except KeyError:
            name = str(exc.errno)
        if isinstance(exc, socket.gaierror):
            return f"{exc.strerror}"
        return f"{exc.strerror} ({name})"
    return str(exc) or type(exc).__name__


def _failure(exc: BaseException, timeout: float) -> str:
    """What a failed connection to a destination did, in plain words."""
    if isinstance(exc, socket.timeout | TimeoutError):
        return f"did not accept the connection within {timeout:g} s"
    code = getattr(exc, "errno", None)
    if code == errno.ECONNREFUSED:
        return f"refused the connection ({_reason(exc)})"
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"is unreachable ({_reason(exc)})"
    return f"could not be connected ({_reason(exc)})"


@dataclass
class _Stats:
    connections: int = 0
    failed_connects: int = 0
    refused_over_limit: int = 0
    bytes_in: int = 0  # destination -> plugin
    bytes_out: int = 0  # plugin -> destination
    last_failure: str | None = None


@dataclass
class _Destination:
    pinned: Pinned
    socket_rel: str  # `net/<host>/.s.PGSQL.<port>`, relative to the socket directory
    loopback: str  # where the plugin host's TCP relay listens inside the container
    listener: socket.socket
    stats: _Stats = field(default_factory=_Stats)


@dataclass
class _Connection:
    number: int
    destination: _Destination
    plugin_side: socket.socket
    upstream: socket.socket | None = None
    thread: threading.Thread | None = None

    def shut(self) -> None:
        for sock in (self.plugin_side, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _dir_name(host: str, port: int, container_root: str) -> str:
    """The directory of a host's sockets: the host itself when the container path fits."""
    path = f"{container_root}/{NET_DIR}/{host}/.s.PGSQL.{port}"
    if len(path) <= _MAX_SUN_PATH:
        return host
    return "h-" + hashlib.sha256(host.encode()).hexdigest()[:16]


class PluginNetwork:
    """The forwarders of one plugin: a listening Unix socket per granted destination.

    The listeners are bound when the object is made (before the container starts); `start`
    begins accepting; `close` stops everything and is safe to call more than once.
    """

    def __init__(
        self,
        pinned: Sequence[Pinned],
        socket_dir: Path,
        *,
        role: str,
        plugin: str,
        container_root: str = "/run/dativo",
        max_connections: int = MAX_CONNECTIONS,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.role = role
        self.plugin = plugin
        self.container_root = container_root
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.destinations: list[_Destination] = []
        self._lock = threading.Lock()
        self._live: dict[int, _Connection] = {}
        self._count = 0
        self._logged = 0
        self._stopping = threading.Event()
        self._acceptor: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._closed = False
        try:
            self._bind(pinned, socket_dir)
        except BaseException:
            self.close()
            raise

    def _bind(self, pinned: Sequence[Pinned], socket_dir: Path) -> None:
        if not pinned:
            return
        net = socket_dir / NET_DIR
        net.mkdir(mode=0o755)
        os.chmod(net, 0o755)  # umask-proof: the plugin's user must traverse it
        loopbacks: dict[str, str] = {}
        for item in pinned:
            name = _dir_name(item.host, item.port, self.container_root)
            host_dir = net / name
            if not host_dir.exists():
                host_dir.mkdir(mode=0o755)
                os.chmod(host_dir, 0o755)
            loopback = loopbacks.setdefault(item.host, f"127.0.0.{len(loopbacks) + 2}")
            socket_name = f".s.PGSQL.{item.port}"
            listener = _bind_unix(host_dir, socket_name)
            self.destinations.append(
                _Destination(
                    pinned=item,
                    socket_rel=f"{NET_DIR}/{name}/{socket_name}",
                    loopback=loopback,
                    listener=listener,
                )
            )

    # -- what the container is told --------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """`DATIVO_NETWORK` (destination=socket path) and `DATIVO_NETWORK_TCP`
        (destination=loopback address:port of the plugin host's relay), `;`-separated."""
        if not self.destinations:
            return {}
        sockets = ";".join(
            f"{d.pinned.destination}={self.container_root}/{d.socket_rel}"
            for d in self.destinations
        )
        tcp = ";".join(
            f"{d.pinned.destination}={d.loopback}:{d.pinned.port}" for d in self.destinations
        )
        return {ENV_SOCKETS: sockets, ENV_TCP: tcp}

    def extra_hosts(self) -> dict[str, str]:
        """Granted host *names* -> the loopback address of their relay, for `/etc/hosts`."""
        return {d.pinned.host: d.loopback for d in self.destinations if not d.pinned.literal}

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        if not self.destinations or self._acceptor is not None:
            return
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        for destination in self.destinations:
            destination.listener.setblocking(False)
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"dativo-net-{self.role}", daemon=True
        )
        self._acceptor.start()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ, None)
            for destination in self.destinations:
                selector.register(destination.listener, selectors.EVENT_READ, destination)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.data is None:
                        return  # woken by close()
                    self._accept(key.data)

    def _accept(self, destination: _Destination) -> None:
        try:
            conn, _ = destination.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            log.warning(
                "network: accept on `%s` failed", destination.pinned.destination, exc_info=True
            )
            return
        conn.setblocking(True)
        with self._lock:
            if self._stopping.is_set():
                conn.close()
                return
            if len(self._live) >= self.max_connections:
                destination.stats.refused_over_limit += 1
                first = destination.stats.refused_over_limit == 1
                conn.close()
                if first:
                    log.warning(
                        "%s plugin `%s`: more than %d connections at once through its network "
                        "grants; closing the excess (first: to `%s`)",
                        self.role,
                        self.plugin,
                        self.max_connections,
                        destination.pinned.destination,
                    )
                return
            self._count += 1
            connection = _Connection(self._count, destination, conn)
            self._live[connection.number] = connection
            connection.thread = threading.Thread(
                target=self._serve,
                args=(connection,),
                name=f"dativo-net-{self.role}-{connection.number}",
                daemon=True,
            )
        connection.thread.start()

    def _connect(self, destination: _Destination) -> tuple[socket.socket, str]:
        """A TCP connection to the first pinned address that accepts, and that address."""
        last: BaseException | None = None
        for family, sockaddr in destination.pinned.addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.connect_timeout)
                sock.connect(sockaddr)
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock, _show(family, sockaddr)
            except OSError as exc:
                sock.close()
                last = exc
            if self._stopping.is_set():
                break
        assert last is not None
        raise last

    def _serve(self, connection: _Connection) -> None:
        destination = connection.destination
        pinned = destination.pinned
        started = time.monotonic()
        try:
            try:
                upstream, address = self._connect(destination)
            except OSError as exc:
                what = _failure(exc, self.connect_timeout)
                with self._lock:
                    destination.stats.failed_connects += 1
                    destination.stats.last_failure = what
                if self._log_event():
                    log.warning(
                        "%s plugin `%s`: connect failed: granted destination `%s` (%s) %s",
                        self.role,
                        self.plugin,
                        pinned.destination,
                        pinned.shown,
                        what,
                    )
                return
            with self._lock:
                connection.upstream = upstream
                destination.stats.connections += 1
                stopping = self._stopping.is_set()
            if stopping:
                return
            logged = self._log_event()
            if logged:
                log.info(
                    "%s plugin `%s`: connection %d to `%s` (%s) opened",
                    self.role,
                    self.plugin,
                    connection.number,
                    pinned.destination,
                    address,
                )
            inbound: list[int] = []
            back = threading.Thread(
                target=lambda: inbound.append(forward(upstream, connection.plugin_side)),
                name=f"dativo-net-{self.role}-{connection.number}-in",
                daemon=True,
            )
            back.start()
            sent = forward(connection.plugin_side, upstream)
            back.join()
            received = inbound[0] if inbound else 0
            with self._lock:
                destination.stats.bytes_out += sent
                destination.stats.bytes_in += received
            if logged:
                log.info(
                    "%s plugin `%s`: connection %d to `%s` closed after %.3f s: %d bytes sent, "
                    "%d received",
                    self.role,
                    self.plugin,
                    connection.number,
                    pinned.destination,
                    time.monotonic() - started,
                    sent,
                    received,
                )
        except Exception:
            log.warning("network: forwarding to `%s` failed", pinned.destination, exc_info=True)
        finally:
            connection.shut()
            connection.plugin_side.close()
            if connection.upstream is not None:
                connection.upstream.close()
            with self._lock:
                self._live.pop(connection.number, None)

    def _log_event(self) -> bool:
        """Whether to log one more connection: the first LOGGED_CONNECTIONS of the plugin are,
        so a plugin cannot flood the supervisor's log by connecting in a loop."""
        with self._lock:
            self._logged += 1
            logged = self._logged
        if logged == LOGGED_CONNECTIONS + 1:
            log.warning(
                "%s plugin `%s`: more than %d connections through its network grants; no longer "
                "logging each one (the run report counts them all)",
                self.role,
                self.plugin,
                LOGGED_CONNECTIONS,
            )
        return logged <= LOGGED_CONNECTIONS

    def close(self) -> None:
        """Stop accepting, shut every forwarded connection down, close the listeners."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._acceptor is not None:
            self._acceptor.join(_JOIN_GRACE)
        for destination in self.destinations:
            destination.listener.close()
        with self._lock:
            live = list(self._live.values())
        for connection in live:
            connection.shut()
        deadline = time.monotonic() + _JOIN_GRACE
        for connection in live:
            if connection.thread is not None:
                connection.thread.join(max(0.0, deadline - time.monotonic()))
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- reporting -------------------------------------------------------------------------

    def report(self) -> dict[str, dict[str, Any]]:
        """Per destination: pinned addresses, connections, failures, bytes both ways."""
        with self._lock:
            return {
                d.pinned.destination: {
                    "pinned": [_show(f, a) for f, a in d.pinned.addresses],
                    "connections": d.stats.connections,
                    "failed_connects": d.stats.failed_connects,
                    "refused_over_limit": d.stats.refused_over_limit,
                    "bytes_in": d.stats.bytes_in,
                    "bytes_out": d.stats.bytes_out,
                }
                for d in self.destinations
            }

    def failure_note(self) -> str | None:
        """What went wrong with the grants, for the message of a failed run; None if nothing."""
        notes = []
        with self._lock:
            for d in self.destinations:
                stats = d.stats
                if stats.failed_connects:
                    times = (
                        "" if stats.failed_connects == 1 else f" ({stats.failed_connects} times)"
                    )
                    notes.append(
                        f"granted destination `{d.pinned.destination}` ({d.pinned.shown}) "
                        f"{stats.last_failure}{times}"
                    )
                if stats.refused_over_limit:
                    notes.append(
                        f"{stats.refused_over_limit} connection(s) to `{d.pinned.destination}` "
                        f"were closed at once: more than {self.max_connections} at a time"
                    )
        return "; ".join(notes) or None


def _bind_unix(directory: Path, name: str) -> socket.socket:
    """A listening Unix socket `directory/name`, connectable by the plugin's user.

    Bound through `/proc/self/fd/<dir>` when the host path is longer than `sun_path` allows.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        path = str(directory / name)
        if len(path) > _MAX_SUN_PATH:
            path = f"/proc/self/fd/{dir_fd}/{name}"
        try:
            listener.bind(path)
            os.chmod(path, 0o666)  # the plugin's non-root user must be able to connect
        except OSError as exc:
            listener.close()
            raise EngineError(
                f"cannot create the network socket `{directory / name}`: {exc}"
            ) from None
        listener.listen(MAX_CONNECTIONS)
    finally:
        os.close(dir_fd)
    return listener
