"""The hub probe goes through huggingface_hub's own HTTP client: HF_ENDPOINT, proxies and offline mode apply.

Nothing here leaves 127.0.0.1: the endpoints are a closed local port, a local server, or `hub.invalid`
behind a local stand-in proxy.
"""

import http.server
import socket
import threading
import time

import pytest

from model import BackboneLoadError, hub_unreachable_reason, load_backbone

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


class AnswerEverything(http.server.BaseHTTPRequestHandler):
    """200 to any request (origin-form, absolute-URI form, CONNECT), recorded as (method, target)."""

    timeout = 5  # seconds a connection may sit idle: the server thread never hangs on a silent client

    def answer(self):
        self.server.seen.append((self.command, self.path))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        if self.command == "CONNECT":  # no TLS to offer: the tunnel ends here
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_CONNECT = answer

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server():
    """A ThreadingHTTPServer on 127.0.0.1 that answers everything; `.seen` lists what it was asked."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AnswerEverything)
    server.daemon_threads = True
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def hub_settings(monkeypatch):
    """Configure huggingface_hub as a process started with these variables would see it.

    huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import (tests/conftest.py sets offline),
    and its shared HTTP client reads the proxy variables when it is created: set both, and drop the client.
    """
    import huggingface_hub
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def configure(endpoint: str, proxy: str | None = None):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        if proxy is not None:
            for name in ("HTTP_PROXY", "HTTPS_PROXY"):
                monkeypatch.setenv(name, proxy)
        huggingface_hub.close_session()

    yield configure
    huggingface_hub.close_session()  # the next test's client is made with the restored variables


def test_uncached_model_with_an_unreachable_endpoint_fails_within_seconds_with_the_local_copy_hint(hub_settings):
    hub_settings(f"http://127.0.0.1:{closed_port()}")
    started = time.perf_counter()
    with pytest.raises(BackboneLoadError, match="unreachable") as raised:
        load_backbone("someone/no-such-model", 64)
    assert time.perf_counter() - started < 5
    assert "local" in str(raised.value) and "model.backbone=" in str(raised.value)


def test_the_probe_asks_the_configured_endpoint(hub_settings, local_server):
    hub_settings(f"http://127.0.0.1:{local_server.server_address[1]}")
    assert hub_unreachable_reason() is None
    assert local_server.seen == [("HEAD", "/")]


def test_the_probe_reaches_the_hub_through_an_http_proxy(hub_settings, local_server):
    """hub.invalid never resolves: only the proxy can answer, so an answer proves the request went through it."""
    hub_settings("http://hub.invalid", proxy=f"http://127.0.0.1:{local_server.server_address[1]}")
    assert hub_unreachable_reason() is None
    assert local_server.seen == [("HEAD", "http://hub.invalid/")]  # absolute-URI form: a proxy request


def test_an_https_endpoint_is_tunnelled_through_the_proxy(hub_settings, local_server):
    """The real hub is https: the probe asks the proxy for a tunnel (which this stand-in cannot carry TLS over)."""
    hub_settings("https://hub.invalid", proxy=f"http://127.0.0.1:{local_server.server_address[1]}")
    hub_unreachable_reason(timeout_s=2.0)
    assert local_server.seen == [("CONNECT", "hub.invalid:443")]


@pytest.mark.parametrize("offline_by", ["environment", "huggingface_hub"])
def test_offline_mode_short_circuits_the_probe(hub_settings, local_server, monkeypatch, offline_by):
    hub_settings(f"http://127.0.0.1:{local_server.server_address[1]}")
    if offline_by == "environment":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "offline" in hub_unreachable_reason()
    with pytest.raises(BackboneLoadError, match="HF_HUB_OFFLINE"):
        load_backbone("someone/no-such-model", 64)
    assert local_server.seen == []
