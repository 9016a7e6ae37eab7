"""Named access keys (DESIGN §11, issue 13): `[keys.<name>]` tables in the config file and in
LLMPROXY_KEYS_FILE, found by the key or its SHA-256; a bad table stops start-up with one line
that names it and never repeats the key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.access import KeyRing
from llmproxy.config import Configuration, ConfigurationError, load_configuration
from llmproxy.limits import KeyLimits

SECRET = "sk-proxy-team-a-SECRET-0001"
OTHER = "sk-proxy-team-b-SECRET-0002"
UNNAMED = "sk-proxy-unnamed-SECRET-0003"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def never_shown(key: str) -> list[str]:
    """What no message and no repr may contain about a key: the key, and its digest (as hex,
    and as the repr of its bytes)."""
    digest = hashlib.sha256(key.encode()).digest()
    return [key, sha(key), sha(key).upper(), repr(digest)[2:-1]]


TEAM_A = f'[keys.team-a]\nkey = "{SECRET}"\n'
TEAM_B_BY_DIGEST = f'[keys.team-b]\nkey_sha256 = "{sha(OTHER)}"\n'


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_from(place: str, tmp_path: Path, text: str, **environ: str) -> Configuration:
    """The configuration with `text` as the config file or as LLMPROXY_KEYS_FILE."""
    if place == "config file":
        return load_configuration(environ, config_file=write(tmp_path, "llmproxy.toml", text))
    keys_file = write(tmp_path, "keys.toml", text)
    return load_configuration({**environ, "LLMPROXY_KEYS_FILE": keys_file})


PLACES = ["config file", "keys file"]

# --- keys that work ---------------------------------------------------------------------------


@pytest.mark.parametrize("place", PLACES)
def test_a_table_gives_its_key_by_value_or_by_digest_with_its_limits(
    tmp_path: Path, place: str
) -> None:
    text = (
        TEAM_A + "requests_per_minute = 600\ntokens_per_minute = 200000\n"
        "tokens_per_day = 5000000\nmax_concurrent = 20\n\n" + TEAM_B_BY_DIGEST
    )
    ring = KeyRing(load_from(place, tmp_path, text).proxy_access_keys())
    team_a = ring.find(SECRET)
    assert team_a is not None
    assert team_a.name == "team-a"
    assert team_a.limits == KeyLimits(
        requests_per_minute=600,
        tokens_per_minute=200_000,
        tokens_per_day=5_000_000,
        max_concurrent=20,
    )
    team_b = ring.find(OTHER)
    assert team_b is not None
    assert team_b.name == "team-b"
    assert team_b.limits == KeyLimits()  # every limit is optional
    assert not team_b.limits.any


@pytest.mark.parametrize("place", PLACES)
def test_only_the_key_itself_opens_the_proxy(tmp_path: Path, place: str) -> None:
    ring = KeyRing(load_from(place, tmp_path, TEAM_A + TEAM_B_BY_DIGEST).proxy_access_keys())
    for wrong in (sha(SECRET), sha(OTHER), SECRET[:-1], SECRET + "x", SECRET.upper(), "team-a", ""):
        assert ring.find(wrong) is None, wrong


def test_a_digest_in_capitals_is_the_same_digest(tmp_path: Path) -> None:
    text = f'[keys.team-b]\nkey_sha256 = "{sha(OTHER).upper()}"\n'
    found = KeyRing(load_from("keys file", tmp_path, text).proxy_access_keys()).find(OTHER)
    assert found is not None
    assert found.name == "team-b"


def test_keys_from_every_place_are_all_found(tmp_path: Path) -> None:
    keys_file = write(tmp_path, "keys.toml", TEAM_B_BY_DIGEST)
    config_file = write(tmp_path, "llmproxy.toml", TEAM_A)
    configuration = load_configuration(
        {"LLMPROXY_ACCESS_KEYS": UNNAMED, "LLMPROXY_KEYS_FILE": keys_file},
        config_file=config_file,
    )
    ring = KeyRing(configuration.proxy_access_keys())
    names = {key: found.name for key in (SECRET, OTHER, UNNAMED) if (found := ring.find(key))}
    assert names == {SECRET: "team-a", OTHER: "team-b", UNNAMED: "key-" + sha(UNNAMED)[:8]}


def test_the_config_file_may_name_the_keys_file(tmp_path: Path) -> None:
    keys_file = write(tmp_path, "keys.toml", TEAM_B_BY_DIGEST)
    config_file = write(tmp_path, "llmproxy.toml", f'keys_file = "{keys_file}"\n' + TEAM_A)
    ring = KeyRing(load_configuration({}, config_file=config_file).proxy_access_keys())
    assert [found.name for key in (SECRET, OTHER) if (found := ring.find(key))] == [
        "team-a",
        "team-b",
    ]


ACCESS_KEYS = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=","),
    min_size=1,
    max_size=80,
)


@given(st.lists(ACCESS_KEYS, min_size=1, max_size=5, unique=True))
def test_keys_without_a_table_are_named_by_the_first_8_hex_digits_of_their_sha256(
    keys: list[str],
) -> None:
    configuration = load_configuration({"LLMPROXY_ACCESS_KEYS": ",".join(keys)})
    ring = KeyRing(configuration.proxy_access_keys())
    for key in keys:
        found = ring.find(key)
        assert found is not None
        assert found.name == "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
        assert found.limits == KeyLimits()


def test_repr_of_the_configuration_shows_no_key_and_no_digest(tmp_path: Path) -> None:
    keys_file = write(tmp_path, "keys.toml", TEAM_B_BY_DIGEST)
    configuration = load_configuration(
        {"LLMPROXY_ACCESS_KEYS": UNNAMED, "LLMPROXY_KEYS_FILE": keys_file},
        config_file=write(tmp_path, "llmproxy.toml", TEAM_A + "requests_per_minute = 5\n"),
    )
    assert len(configuration.proxy_access_keys()) == 3
    shown = repr(configuration) + str(configuration) + repr(configuration.proxy_access_keys())
    for key in (SECRET, OTHER, UNNAMED):
        for text in never_shown(key):
            assert text not in shown
    assert "3 configured" in repr(configuration)


# --- bad tables: one line, naming the table, never the key -------------------------------------

# (what is wrong, the tables, the table the line must name)
BAD_TABLES = [
    ("unknown field", TEAM_A + "request_per_minute = 600\n", "team-a"),
    ("unknown field holding the key", f'[keys.team-a]\nsecret = "{SECRET}"\n', "team-a"),
    ("negative limit", TEAM_A + "tokens_per_minute = -1\n", "team-a"),
    ("zero limit", TEAM_A + "max_concurrent = 0\n", "team-a"),
    ("bool limit", TEAM_A + "requests_per_minute = true\n", "team-a"),
    ("float limit", TEAM_A + "tokens_per_day = 1.5\n", "team-a"),
    ("string limit", TEAM_A + 'requests_per_minute = "600"\n', "team-a"),
    ("both key and digest", TEAM_A + f'key_sha256 = "{sha(SECRET)}"\n', "team-a"),
    ("neither key nor digest", "[keys.team-a]\nrequests_per_minute = 5\n", "team-a"),
    ("digest too short", f'[keys.team-a]\nkey_sha256 = "{sha(SECRET)[:63]}"\n', "team-a"),
    ("digest too long", f'[keys.team-a]\nkey_sha256 = "{sha(SECRET)}0"\n', "team-a"),
    ("digest not hex", f'[keys.team-a]\nkey_sha256 = "{sha(SECRET)[:63]}g"\n', "team-a"),
    ("digest is the key", f'[keys.team-a]\nkey_sha256 = "{SECRET}"\n', "team-a"),
    ("digest not a string", "[keys.team-a]\nkey_sha256 = 12345\n", "team-a"),
    ("key with a space", f'[keys.team-a]\nkey = "{SECRET} x"\n', "team-a"),
    ("empty key", '[keys.team-a]\nkey = ""\n', "team-a"),
    ("key not a string", "[keys.team-a]\nkey = 42\n", "team-a"),
    ("table not a table", f'[keys]\nteam-a = "{SECRET}"\n', "team-a"),
    ("same key twice", TEAM_A + f'[keys.team-b]\nkey = "{SECRET}"\n', "team-b"),
    (
        "same key as key and as digest",
        TEAM_A + f'[keys.team-b]\nkey_sha256 = "{sha(SECRET)}"\n',
        "team-b",
    ),
    (
        "same digest in two spellings",
        f'[keys.team-a]\nkey_sha256 = "{sha(SECRET)}"\n'
        f'[keys.team-b]\nkey_sha256 = "{sha(SECRET).upper()}"\n',
        "team-b",
    ),
    ("bad name", f'[keys."team a"]\nkey = "{SECRET}"\n', "team a"),
]


def assert_one_line_naming(error: ConfigurationError, table: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert "\r" not in message, message
    assert f"keys.{table}" in message, message
    for key in (SECRET, OTHER, UNNAMED):
        for text in never_shown(key):
            assert text not in message, message


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize(("problem", "text", "table"), BAD_TABLES, ids=[c[0] for c in BAD_TABLES])
def test_a_bad_table_stops_with_one_line_naming_it(
    tmp_path: Path, place: str, problem: str, text: str, table: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_from(place, tmp_path, text)
    assert_one_line_naming(raised.value, table)


@pytest.mark.parametrize(
    ("in_config_file", "in_keys_file"),
    [
        (TEAM_A, f'[keys.team-b]\nkey = "{SECRET}"\n'),
        (TEAM_A, f'[keys.team-b]\nkey_sha256 = "{sha(SECRET)}"\n'),
        (f'[keys.team-a]\nkey_sha256 = "{sha(SECRET)}"\n', f'[keys.team-b]\nkey = "{SECRET}"\n'),
    ],
    ids=["key-key", "key-digest", "digest-key"],
)
def test_the_same_key_in_the_config_file_and_the_keys_file_stops(
    tmp_path: Path, in_config_file: str, in_keys_file: str
) -> None:
    keys_file = write(tmp_path, "keys.toml", in_keys_file)
    with pytest.raises(ConfigurationError) as raised:
        load_configuration(
            {"LLMPROXY_KEYS_FILE": keys_file},
            config_file=write(tmp_path, "llmproxy.toml", in_config_file),
        )
    assert_one_line_naming(raised.value, "team-b")
    assert "keys.team-a" in str(raised.value)  # where it was first


def test_the_same_table_name_in_both_files_stops(tmp_path: Path) -> None:
    keys_file = write(tmp_path, "keys.toml", f'[keys.team-a]\nkey = "{OTHER}"\n')
    with pytest.raises(ConfigurationError) as raised:
        load_configuration(
            {"LLMPROXY_KEYS_FILE": keys_file},
            config_file=write(tmp_path, "llmproxy.toml", TEAM_A),
        )
    assert_one_line_naming(raised.value, "team-a")


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize(
    "table", [TEAM_A, f'[keys.team-a]\nkey_sha256 = "{sha(SECRET)}"\n'], ids=["key", "digest"]
)
@pytest.mark.parametrize("source", ["LLMPROXY_ACCESS_KEYS", "LLMPROXY_ACCESS_KEYS_FILE"])
def test_an_unnamed_key_also_in_a_table_stops(
    tmp_path: Path, place: str, table: str, source: str
) -> None:
    if source == "LLMPROXY_ACCESS_KEYS":
        environ = {source: f"{UNNAMED},{SECRET}"}
    else:
        environ = {source: write(tmp_path, "access-keys.txt", f"{UNNAMED}\n{SECRET}\n")}
    with pytest.raises(ConfigurationError) as raised:
        load_from(place, tmp_path, table, **environ)
    assert_one_line_naming(raised.value, "team-a")
    assert source in str(raised.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (f'upstream_url = "http://h/v1"\n{TEAM_A}', "upstream_url"),  # only key tables
        ("# nothing\n", "no [keys.<name>]"),
        (f'[keys.team-a]\nkey = "{SECRET}\n', "not valid TOML"),  # the string is not closed
    ],
)
def test_a_bad_keys_file_stops_with_one_line(tmp_path: Path, text: str, fragment: str) -> None:
    keys_file = write(tmp_path, "keys.toml", text)
    with pytest.raises(ConfigurationError) as raised:
        load_configuration({"LLMPROXY_KEYS_FILE": keys_file})
    message = str(raised.value)
    assert message.startswith("LLMPROXY_KEYS_FILE: "), message
    assert fragment in message
    assert "\n" not in message
    for shown in never_shown(SECRET):
        assert shown not in message


def test_a_missing_keys_file_stops_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_configuration({"LLMPROXY_KEYS_FILE": str(tmp_path / "absent.toml")})
    assert str(raised.value).startswith("LLMPROXY_KEYS_FILE: cannot be read")
    assert "\n" not in str(raised.value)
