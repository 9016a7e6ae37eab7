"""TLS towards the upstream (DESIGN §12): the system's trust store, plus what is configured.

`upstream_ca_bundle` adds a PEM file of CAs to the system's (it does not replace them: a
private gateway's CA and the public internet's both verify). `upstream_client_cert` and
`upstream_client_key` present a client certificate to upstreams that ask for one (mTLS
gateways and service meshes). Built once at start-up; a file that is missing or not PEM stops
start-up with one line naming the setting.
"""

from __future__ import annotations

import ssl


class TlsFileError(ValueError):
    """A TLS file cannot be used; `setting` names the configuration field it came from."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def upstream_ssl_context(
    ca_bundle: str | None, client_cert: str | None, client_key: str | None
) -> ssl.SSLContext | None:
    """The context for `https://` upstreams, or None when nothing is configured (the default
    context, the system's trust store, is then used)."""
    if ca_bundle is None and client_cert is None and client_key is None:
        return None
    context = ssl.create_default_context()  # the system's trust store, hostname checks on
    if ca_bundle is not None:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as error:
            raise TlsFileError(
                "upstream_ca_bundle", f"holds no usable PEM certificates ({_reason(error)})"
            ) from None
    if client_cert is not None or client_key is not None:
        if client_cert is None:
            raise TlsFileError("upstream_client_key", "needs upstream_client_cert as well")
        try:
            context.load_cert_chain(client_cert, client_key)
        except (OSError, ssl.SSLError) as error:
            setting = "upstream_client_key" if client_key else "upstream_client_cert"
            raise TlsFileError(
                setting, f"is not a PEM certificate and key that match ({_reason(error)})"
            ) from None
    return context


def _reason(error: OSError | ssl.SSLError) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason or type(error).__name__
    return error.strerror or type(error).__name__
