"""Egress through a corporate HTTP proxy (DESIGN §12): which proxy an upstream goes through.

Pure functions over the environment, with curl's semantics: `HTTPS_PROXY` for `https://`
upstreams, `HTTP_PROXY` for `http://` ones, `ALL_PROXY` for either when the scheme's own is
unset (each upper or lower case; lower case wins, as in curl), and `NO_PROXY`: a comma list of
host names (with or without a leading dot: the name and its subdomains), IP addresses, CIDR
ranges and `*` (everything). There is no implicit exception for loopback. An explicit
`upstream_proxy` setting wins over the environment (`none`: no proxy whatever it says).

Only `http://` proxy URLs: a `CONNECT` tunnel carries TLS to `https://` upstreams end to end, so
the proxy never sees the traffic; TLS to the proxy itself is not supported. Credentials in the
URL become `Proxy-Authorization: Basic`, never logged and never in an error body.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

NO_PROXY_SETTING = "none"
# The variables read, in the order they win (curl's: lower case first).
PROXY_VARIABLES = (
    "https_proxy",
    "HTTPS_PROXY",
    "http_proxy",
    "HTTP_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
)


@dataclass(frozen=True, slots=True)
class EgressProxy:
    """An HTTP proxy between llmproxy and its upstreams."""

    host: str
    port: int
    # `Basic <base64>` from the URL's credentials; hidden from repr (it ends up in logs).
    authorization: str | None = field(default=None, repr=False)

    @property
    def shown(self) -> str:
        """Host and port, for messages: never the credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_proxy_url(url: str) -> EgressProxy:
    """`http://[user:password@]host[:port]` (port 1080 by default, as curl's)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text  # curl reads a bare host[:port] as an HTTP proxy
    parts = urlsplit(text)
    if parts.scheme.lower() != "http":
        raise ValueError(
            f"must be an http:// proxy URL (got {parts.scheme}://); TLS to a proxy is not "
            "supported, and https:// upstreams are tunnelled through an http:// one"
        )
    if not parts.hostname:
        raise ValueError("names no proxy host")
    try:
        port = parts.port or 1080
    except ValueError:
        raise ValueError("has a port that is not a number from 0 to 65535") from None
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
    return EgressProxy(parts.hostname, port, authorization)


def proxy_variable_in_use(scheme: str, environ: Mapping[str, str]) -> str:
    """The name of the variable that gives an upstream of `scheme` its proxy (for messages)."""
    names = ("https_proxy", "HTTPS_PROXY") if scheme == "https" else ("http_proxy", "HTTP_PROXY")
    for name in (*names, "all_proxy", "ALL_PROXY"):
        if environ.get(name, "").strip():
            return name
    return names[1]


def proxy_from_environment(scheme: str, environ: Mapping[str, str]) -> str | None:
    """The proxy URL the environment names for an upstream of `scheme`, or None."""
    value = environ.get(proxy_variable_in_use(scheme, environ), "").strip()
    return value or None


def no_proxy_list(environ: Mapping[str, str]) -> str:
    return environ.get("no_proxy", environ.get("NO_PROXY", ""))


def bypasses_proxy(host: str, no_proxy: str) -> bool:
    """Whether `host` matches an entry of a `NO_PROXY` list (curl's rules)."""
    name = host.strip("[]").lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
    except ValueError:
        address = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.lstrip(".").rstrip(".")
        if entry and (name == entry or name.endswith("." + entry)):
            return True
    return False


def proxy_for(
    upstream_url: str, environ: Mapping[str, str], explicit: str | None
) -> EgressProxy | None:
    """The proxy an upstream goes through, or None to connect directly.

    `explicit` is the `upstream_proxy` setting: a URL, `none`, or None to read the environment.
    `NO_PROXY` applies either way, as in curl.
    """
    parts = urlsplit(upstream_url)
    if explicit is not None:
        if explicit.strip().lower() == NO_PROXY_SETTING:
            return None
        url: str | None = explicit
    else:
        url = proxy_from_environment(parts.scheme, environ)
    if url is None or bypasses_proxy(parts.hostname or "", no_proxy_list(environ)):
        return None
    return parse_proxy_url(url)
