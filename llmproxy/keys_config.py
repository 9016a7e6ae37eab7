"""Named access keys in the configuration (DESIGN §11): `[keys.<name>]` TOML tables, in the
config file or in a separate keys file (`LLMPROXY_KEYS_FILE`, so secrets can be mounted apart).

    [keys.team-a]
    key_sha256 = "9f86d0..."      # or key = "sk-proxy-...": the file need not hold the secret
    requests_per_minute = 600     # all limits optional
    tokens_per_minute = 200000
    tokens_per_day = 5000000
    max_concurrent = 20

Errors name the table, never the key: the messages end up on terminals and in CI logs.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Sequence

from llmproxy.access import AccessKey, key_digest, unnamed_key_name
from llmproxy.limits import KeyLimits

_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_concurrent")
_FIELDS = ("key", "key_sha256", *_LIMIT_FIELDS)
# Names go into log lines and metric labels: plain characters only, and never `-` alone (the
# name of requests without a key).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")


def parse_key_tables(raw: object) -> tuple[AccessKey, ...]:
    """The `[keys.<name>]` tables of a TOML document."""
    if not isinstance(raw, dict):
        raise ValueError("must be a table of key tables ([keys.<name>])")
    keys = tuple(_parse_key_table(name, table) for name, table in raw.items())
    check_distinct(keys, {})
    return keys


def parse_keys_file(raw: object) -> tuple[AccessKey, ...]:
    """A TOML file of `[keys.<name>]` tables and nothing else."""
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError("must be the path of a TOML file of [keys.<name>] tables")
    try:
        with open(raw.strip(), "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise ValueError(f"cannot be read ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"is not valid TOML ({error})") from None
    unknown = sorted(name for name in document if name != "keys")
    if unknown:
        raise ValueError(f"holds {unknown[0]!r}; a keys file holds only [keys.<name>] tables")
    if "keys" not in document:
        raise ValueError("holds no [keys.<name>] tables")
    return parse_key_tables(document["keys"])


def _parse_key_table(name: object, table: object) -> AccessKey:
    label = f"table keys.{name}"
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"{label}: a key's name is 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    if not isinstance(table, dict):
        raise ValueError(f"{label}: must be a table")
    unknown = sorted(field for field in table if field not in _FIELDS)
    if unknown:
        raise ValueError(f"{label}: unknown field {unknown[0]!r} (known: {', '.join(_FIELDS)})")
    if ("key" in table) == ("key_sha256" in table):
        raise ValueError(f"{label}: needs exactly one of 'key' and 'key_sha256'")
    if "key" in table:
        key = table["key"]
        if not isinstance(key, str) or not key or any(not 0x21 <= ord(c) <= 0x7E for c in key):
            raise ValueError(f"{label}: 'key' must be printable ASCII without spaces")
        digest = key_digest(key)
    else:
        hex_digest = table["key_sha256"]
        if not isinstance(hex_digest, str) or not _HEX_DIGEST.match(hex_digest):
            raise ValueError(f"{label}: 'key_sha256' must be 64 hexadecimal digits")
        digest = bytes.fromhex(hex_digest)
    limits: dict[str, int] = {}
    for field in _LIMIT_FIELDS:
        if field in table:
            value = table[field]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label}: {field!r} must be a whole number of at least 1")
            limits[field] = value
    return AccessKey(name, digest, KeyLimits(**limits))


def unnamed_keys(keys: Iterable[str]) -> tuple[AccessKey, ...]:
    """Keys given without names (`LLMPROXY_ACCESS_KEYS`, a keys-per-line file), named by their
    digest; a key given twice is one key."""
    named = {key_digest(key): unnamed_key_name(key) for key in keys}
    return tuple(AccessKey(name, digest) for digest, name in named.items())


def check_distinct(keys: Sequence[AccessKey], earlier: dict[bytes, str]) -> dict[bytes, str]:
    """No key and no table name twice, across `earlier` (digest → where it was given) and
    `keys`; returns `earlier` with `keys` added. Messages name the tables, never a key."""
    seen = dict(earlier)
    names = {where for where in seen.values()}
    for key in keys:
        where = f"keys.{key.name}"
        if key.sha256 in seen:
            raise ValueError(f"table {where}: holds the same key as {seen[key.sha256]}")
        if where in names:
            raise ValueError(f"table {where}: the name is used twice")
        seen[key.sha256] = where
        names.add(where)
    return seen
