"""Credentials in URLs never reach what a person or a log sees."""

from __future__ import annotations

import pytest

from reconciler.redact import has_credentials, redact_text, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:s3cret@git.example/org/fleet.git", "https://***@git.example/org/fleet.git"),
        ("https://s3cret@git.example/fleet", "https://***@git.example/fleet"),
        ("ssh://git:s3cret@host:22/fleet", "ssh://***@host:22/fleet"),
        ("https://git.example/org/fleet.git", "https://git.example/org/fleet.git"),
        ("git@github.example:org/fleet.git", "git@github.example:org/fleet.git"),
        ("/srv/fleet", "/srv/fleet"),
        ("https://git.example/a@b", "https://git.example/a@b"),
    ],
)
def test_userinfo_is_redacted(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)
    assert has_credentials(url) == (url != shown)


def test_free_text_is_scrubbed_everywhere() -> None:
    message = (
        "fatal: unable to access 'https://bot:tok3n@git.example/f.git/': "
        "and again http://a:b@other/x"
    )
    scrubbed = redact_text(message)
    assert "tok3n" not in scrubbed
    assert ":b@" not in scrubbed
    assert scrubbed.count("***@") == 2
