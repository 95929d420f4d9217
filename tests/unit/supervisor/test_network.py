"""The network forwarder without Docker: pinning, socket layout, forwarding, limits, cleanup."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dativo import _forward
from dativo.errors import ConfigError
from dativo.host._network import LoopbackRelay, destinations_from_env
from dativo.supervisor import _network
from dativo.supervisor._network import PluginNetwork, pin

# -- helpers ---------------------------------------------------------------------------------


class Server:
    """A TCP server on 127.0.0.1 that runs `handler(conn)` for each connection."""

    def __init__(self, handler: Any) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.accepted = 0
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            self.handler(conn)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def hold(conn: socket.socket) -> None:
    conn.recv(1)  # until the other side goes away


@pytest.fixture
def echo_server() -> Iterator[Server]:
    server = Server(echo)
    yield server
    server.close()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def unix_connect(path: Path | str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def sockdir(tmp_path: Path) -> Path:
    directory = tmp_path / "reader"
    directory.mkdir()
    return directory


def network(sockdir: Path, *destinations: str, **kwargs: Any) -> PluginNetwork:
    pinned = pin(destinations, field_path="source.reader")
    net = PluginNetwork(pinned, sockdir, role="reader", plugin="test", **kwargs)
    net.start()
    return net


def socket_of(net: PluginNetwork, sockdir: Path, destination: str) -> Path:
    for d in net.destinations:
        if d.pinned.destination == destination:
            return sockdir / d.socket_rel
    raise KeyError(destination)


def fake_resolver(table: dict[str, list[str]]) -> Any:
    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host not in table:
            if args and args[-1] & socket.AI_NUMERICHOST:
                return socket.getaddrinfo(host, port, *args)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for address in table[host]:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr = (address, port, 0, 0) if family == socket.AF_INET6 else (address, port)
            out.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
        return out

    return resolve


# -- pinning ---------------------------------------------------------------------------------


def test_pin_literals_without_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(host: str, port: int, family: int, kind: int, proto: int, flags: int) -> Any:
        assert flags & socket.AI_NUMERICHOST, "an IP literal must never reach a resolver"
        return socket.getaddrinfo(host, port, family, kind, proto, flags)

    monkeypatch.setattr(_network, "getaddrinfo", no_dns)
    v4, v6, loop = pin(
        ["10.0.0.7:5432", "[::1]:443", "127.0.0.1:80", "10.0.0.7:5432"], field_path="x"
    )
    assert (v4.host, v4.port, v4.literal, v4.shown) == ("10.0.0.7", 5432, True, "10.0.0.7:5432")
    assert (v6.host, v6.shown) == ("::1", "[::1]:443")
    assert loop.shown == "127.0.0.1:80"  # a literal may name the supervisor's machine


def test_pin_names_once_and_refuse_what_a_name_may_not_stand_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        _network,
        "getaddrinfo",
        fake_resolver(
            {
                "db.example.com": ["10.1.2.3", "10.1.2.4"],
                "sneaky.example.com": ["10.9.9.9", "127.0.0.1"],
                "metadata.example.com": ["169.254.169.254"],
                "mapped.example.com": ["::ffff:127.0.0.1"],
            }
        ),
    )
    (db,) = pin(["db.example.com:5432"], field_path="source.reader")
    assert db.literal is False
    assert db.shown == "10.1.2.3:5432, 10.1.2.4:5432"
    for name, why in (
        ("sneaky.example.com", "a loopback address"),
        ("metadata.example.com", "a link-local address"),
        ("mapped.example.com", "a loopback address"),
    ):
        with pytest.raises(ConfigError) as caught:
            pin([f"{name}:443"], field_path="source.reader")
        assert f"`{name}:443`" in str(caught.value)
        assert why in str(caught.value)
        assert caught.value.field == "source.reader.network"
    with pytest.raises(ConfigError) as caught:
        pin(["nowhere.example.com:5432"], field_path="target.writer")
    assert "cannot resolve the granted destination `nowhere.example.com:5432`" in str(caught.value)
    assert "nothing was started" in str(caught.value)
    assert caught.value.field == "target.writer.network"
    assert caught.value.transient is True


# -- layout and what the container is told ---------------------------------------------------


def test_socket_layout_environment_and_hosts(
    sockdir: Path, echo_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = echo_server.port
    monkeypatch.setattr(_network, "getaddrinfo", fake_resolver({"db.test": ["10.0.0.1"]}))
    pinned = pin([f"127.0.0.1:{port}", "db.test:5432", "db.test:6432"], field_path="x")
    net = PluginNetwork(pinned, sockdir, role="reader", plugin="p")
    try:
        assert [d.socket_rel for d in net.destinations] == [
            f"net/127.0.0.1/.s.PGSQL.{port}",
            "net/db.test/.s.PGSQL.5432",
            "net/db.test/.s.PGSQL.6432",
        ]
        for directory in (sockdir / "net", sockdir / "net" / "db.test"):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o755
        sock_path = sockdir / "net" / "db.test" / ".s.PGSQL.5432"
        assert stat.S_ISSOCK(sock_path.lstat().st_mode)
        assert stat.S_IMODE(sock_path.lstat().st_mode) == 0o666
        env = net.environment()
        assert env["DATIVO_NETWORK"] == (
            f"127.0.0.1:{port}=/run/dativo/net/127.0.0.1/.s.PGSQL.{port};"
            "db.test:5432=/run/dativo/net/db.test/.s.PGSQL.5432;"
            "db.test:6432=/run/dativo/net/db.test/.s.PGSQL.6432"
        )
        # One loopback address per host: the same host name keeps one address for its ports.
        assert env["DATIVO_NETWORK_TCP"] == (
            f"127.0.0.1:{port}=127.0.0.2:{port};db.test:5432=127.0.0.3:5432;"
            "db.test:6432=127.0.0.3:6432"
        )
        assert net.extra_hosts() == {"db.test": "127.0.0.3"}  # names only, never literals
        found = destinations_from_env(env)
        assert found["db.test:6432"].host == "127.0.0.3"
        assert found["db.test:6432"].port == 6432
        assert found["db.test:6432"].socket_dir == "/run/dativo/net/db.test"
    finally:
        net.close()


def test_long_names_and_deep_directories(tmp_path: Path, echo_server: Server) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    long_host = ".".join(["a" * 60, "b" * 20]) + ".example"
    (pinned,) = pin([f"127.0.0.1:{echo_server.port}"], field_path="x")
    long = _network.Pinned(
        f"{long_host}:{echo_server.port}",
        long_host,
        echo_server.port,
        pinned.addresses,
        False,
    )
    net = PluginNetwork([long], deep, role="reader", plugin="p")
    net.start()
    try:
        (d,) = net.destinations
        digest = hashlib.sha256(long_host.encode()).hexdigest()[:16]
        assert d.socket_rel == f"net/h-{digest}/.s.PGSQL.{echo_server.port}"
        assert len(f"/run/dativo/{d.socket_rel}") <= 107
        assert len(str(deep / d.socket_rel)) > 107  # bound through /proc/self/fd
        # Connect through a short path to the same directory (sun_path is 108 bytes).
        fd = os.open(deep / "net" / f"h-{digest}", os.O_RDONLY | os.O_DIRECTORY)
        try:
            with unix_connect(f"/proc/self/fd/{fd}/.s.PGSQL.{echo_server.port}") as sock:
                sock.sendall(b"ping")
                assert sock.recv(4) == b"ping"
        finally:
            os.close(fd)
    finally:
        net.close()


# -- forwarding --------------------------------------------------------------------------------


def test_forwards_and_counts_both_ways(sockdir: Path, echo_server: Server) -> None:
    destination = f"127.0.0.1:{echo_server.port}"
    net = network(sockdir, destination)
    try:
        path = socket_of(net, sockdir, destination)
        payload = os.urandom(5 << 20)
        with unix_connect(path) as sock:
            sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(1)))
            sender.start()
            echoed = recv_all(sock)
            sender.join()
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        for _ in range(3):
            with unix_connect(path) as sock:
                sock.sendall(b"abc")
                assert sock.recv(3) == b"abc"
        wait_for(lambda: net.report()[destination]["connections"] == 4 and not net._live)
        report = net.report()[destination]
        assert report == {
            "pinned": [destination],
            "connections": 4,
            "failed_connects": 0,
            "refused_over_limit": 0,
            "bytes_in": len(payload) + 9,
            "bytes_out": len(payload) + 9,
        }
        assert net.failure_note() is None
    finally:
        net.close()


def test_half_close_reaches_the_destination(sockdir: Path) -> None:
    def answer_after_eof(conn: socket.socket) -> None:
        got = recv_all(conn)
        conn.sendall(b"got %d bytes" % len(got))

    server = Server(answer_after_eof)
    destination = f"127.0.0.1:{server.port}"
    net = network(sockdir, destination)
    try:
        with unix_connect(socket_of(net, sockdir, destination)) as sock:
            sock.sendall(b"x" * 1000)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"got 1000 bytes"
    finally:
        net.close()
        server.close()


def test_a_destination_that_is_down(sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    destination = f"127.0.0.1:{closed_port()}"
    net = network(sockdir, destination)
    try:
        with unix_connect(socket_of(net, sockdir, destination)) as sock:
            assert sock.recv(1) == b""  # the plugin's connection is closed at once
        wait_for(lambda: net.report()[destination]["failed_connects"] == 1)
        note = net.failure_note()
        assert note is not None
        assert f"granted destination `{destination}` ({destination}) refused the connection" in (
            note
        )
        assert "ECONNREFUSED" in note
        assert net.report()[destination]["connections"] == 0
        assert f"connect failed: granted destination `{destination}`" in caplog.text
    finally:
        net.close()


def test_connection_cap(sockdir: Path) -> None:
    server = Server(hold)
    destination = f"127.0.0.1:{server.port}"
    net = network(sockdir, destination, max_connections=2)
    path = socket_of(net, sockdir, destination)
    try:
        held = [unix_connect(path) for _ in range(2)]
        wait_for(lambda: server.accepted == 2)
        with unix_connect(path) as extra:
            assert extra.recv(1) == b""
        report = net.report()[destination]
        assert report["refused_over_limit"] == 1
        assert "more than 2 at a time" in (net.failure_note() or "")
        for sock in held:
            sock.close()
        wait_for(lambda: not net._live)
        with unix_connect(path) as again:  # room again
            wait_for(lambda: server.accepted == 3)
            assert again.fileno() >= 0
    finally:
        net.close()
        server.close()


def test_close_ends_everything(sockdir: Path) -> None:
    server = Server(hold)
    destination = f"127.0.0.1:{server.port}"
    before = threading.active_count()
    net = network(sockdir, destination)
    path = socket_of(net, sockdir, destination)
    clients = [unix_connect(path) for _ in range(3)]
    wait_for(lambda: server.accepted == 3)
    assert threading.active_count() >= before + 1 + 3 * 2
    net.close()
    net.close()  # idempotent
    for sock in clients:
        assert sock.recv(1) == b""  # shut down by the supervisor
        sock.close()
    with pytest.raises(ConnectionRefusedError):
        unix_connect(path)
    wait_for(lambda: threading.active_count() <= before)
    server.close()


def test_no_grants_nothing_created(sockdir: Path) -> None:
    net = PluginNetwork((), sockdir, role="writer", plugin="p")
    net.start()
    assert net.environment() == {}
    assert net.extra_hosts() == {}
    assert not (sockdir / "net").exists()
    net.close()


def test_copy_fallback_without_splice(
    sockdir: Path, echo_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_forward, "_SPLICE", False)
    destination = f"127.0.0.1:{echo_server.port}"
    net = network(sockdir, destination)
    try:
        payload = os.urandom(1 << 20)
        with unix_connect(socket_of(net, sockdir, destination)) as sock:
            threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(1))).start()
            assert recv_all(sock) == payload
    finally:
        net.close()


# -- the plugin host's loopback relay ------------------------------------------------------------


def test_loopback_relay(sockdir: Path, echo_server: Server) -> None:
    import logging

    destination = f"127.0.0.1:{echo_server.port}"
    net = network(sockdir, destination)
    relay_port = closed_port()
    env = {
        "DATIVO_NETWORK": f"{destination}={socket_of(net, sockdir, destination)}",
        "DATIVO_NETWORK_TCP": f"{destination}=127.0.0.2:{relay_port}",
    }
    found = destinations_from_env(env)
    assert (found[destination].host, found[destination].port) == ("127.0.0.2", relay_port)
    relay = LoopbackRelay(found, logging.getLogger("test"))
    try:
        with socket.create_connection(("127.0.0.2", relay_port), timeout=10) as sock:
            payload = os.urandom(1 << 20)
            threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(1))).start()
            assert recv_all(sock) == payload
        wait_for(lambda: net.report()[destination]["bytes_in"] == 1 << 20)
    finally:
        relay.close()
        net.close()


def test_destinations_from_env_ignores_junk() -> None:
    assert destinations_from_env({}) == {}
    found = destinations_from_env(
        {"DATIVO_NETWORK": "a:1=/s/a;;junk;[::1]:443=/s/b", "DATIVO_NETWORK_TCP": "a:1=bad"}
    )
    assert sorted(found) == ["[::1]:443", "a:1"]
    assert (found["a:1"].host, found["a:1"].port) == ("a", 1)  # no relay address: the grant
    assert found["[::1]:443"].socket_path == "/s/b"


def test_connection_logs_are_bounded(
    sockdir: Path, echo_server: Server, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="dativo.supervisor._network")
    monkeypatch.setattr(_network, "LOGGED_CONNECTIONS", 2)
    destination = f"127.0.0.1:{echo_server.port}"
    net = network(sockdir, destination)
    try:
        for _ in range(5):
            with unix_connect(socket_of(net, sockdir, destination)) as sock:
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
            wait_for(lambda: not net._live)
        assert caplog.text.count(") opened") == 2
        assert caplog.text.count("closed after") == 2
        assert caplog.text.count("no longer logging each one") == 1
        assert net.report()[destination]["connections"] == 5
    finally:
        net.close()


def test_a_destination_that_does_not_answer(sockdir: Path) -> None:
    # A listener with a full backlog never completes another handshake: a silent destination.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    destination = f"127.0.0.1:{port}"
    net = network(sockdir, destination, connect_timeout=0.5)
    try:
        with unix_connect(socket_of(net, sockdir, destination)) as sock:
            assert sock.recv(1) == b""
        wait_for(lambda: net.report()[destination]["failed_connects"] == 1)
        assert "did not accept the connection within 0.5 s" in (net.failure_note() or "")
    finally:
        net.close()
        for filler in fillers:
            filler.close()
        server.close()
