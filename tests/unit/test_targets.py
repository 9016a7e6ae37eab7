"""The request target the upstream receives (`llmproxy.targets.request_target`)."""

from __future__ import annotations

import pytest

from llmproxy.targets import request_target


@pytest.mark.parametrize(
    ("base_path", "raw_path", "query", "target"),
    [
        ("/v1", b"/v1/chat/completions", b"", "/v1/chat/completions"),
        ("/v1", b"/v1/models", b"a=1&b=%20", "/v1/models?a=1&b=%20"),
        ("/v1", b"/v1", b"", "/v1"),
        ("/openai/v1", b"/v1/files/a%2Fb//c", b"", "/openai/v1/files/a%2Fb//c"),
        # A bare-host upstream URL: the origin-form target is never empty (RFC 9112 §3.2.1).
        ("", b"/v1", b"", "/"),
        ("", b"/v1", b"a=1", "/?a=1"),
        ("", b"/v1/", b"", "/"),
        ("", b"/v1/models", b"", "/models"),
        ("", b"/v1/models", b"a=1", "/models?a=1"),
    ],
)
def test_the_target_is_the_base_path_then_the_rest_and_the_query(
    base_path: str, raw_path: bytes, query: bytes, target: str
) -> None:
    assert request_target(base_path, raw_path, query) == target
