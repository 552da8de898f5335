"""Options shared by several commands, and turning them into the objects the commands use.

Every command that reads the fleet repository takes the same repository options from here:
where it is (``--repo``, ``--path``, ``--ref``), how to authenticate to it
(``--repo-credential-file`` or ``$RECONCILER_GIT_CREDENTIAL``, never the URL) and which keys
its commits must be signed with (``--trusted-key``, ``--revoked-key``). ``apply``, ``build``
and ``daemon`` act only on verified commits when keys are given; ``validate``, ``diff`` and
``plan`` verify only when keys are given too.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.cli.environment import STORE_ENV, read_environment
from reconciler.defaults import AGE_KEY_ENV, AGE_KEY_FILE
from reconciler.errors import ConfigError
from reconciler.manifests.compile_cache import CACHE_FILE
from reconciler.pipeline import RevisionLoader
from reconciler.secrets import open_resolver
from reconciler.source import open_source
from reconciler.source.credentials import CREDENTIAL_ENV, GitCredential

if TYPE_CHECKING:
    from reconciler.source.signatures import TrustedKeys
    from reconciler.state import StoreLocation


def add_repo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repo",
        default=".",
        help="fleet repository: a local path or a git URL (default: the current directory); "
        "give an HTTPS URL without user or token and the credential with "
        "--repo-credential-file",
    )
    parser.add_argument(
        "--path", default="", help="sub-directory of the repository holding the manifests"
    )
    parser.add_argument(
        "--ref",
        default=None,
        help="branch or tag to follow: refs/heads/NAME, refs/tags/NAME, or a NAME that is "
        "only one of them (default: HEAD / the remote's default branch)",
    )
    parser.add_argument(
        "--repo-credential-file",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"file holding user:token (or a token) for an HTTPS --repo (default: "
        f"${CREDENTIAL_ENV}); never put it in the URL: arguments are visible in ps",
    )
    parser.add_argument(
        "--age-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"age identity that decrypts the fleet's secrets (default: ${AGE_KEY_ENV}, else "
        f"<state dir>/{AGE_KEY_FILE}); needed only when the fleet declares secrets",
    )
    parser.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="act only on commits signed by this OpenPGP or SSH public key (repeatable); "
        "without it nothing is verified",
    )
    parser.add_argument(
        "--revoked-key",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="an OpenPGP revocation certificate, SSH public keys or an OpenSSH KRL whose keys "
        "no longer count (repeatable)",
    )


def add_history_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-non-descendant",
        action="store_true",
        help="apply a revision that does not descend from the applied one (a deliberate "
        "rollback or a rewritten branch); refused otherwise",
    )


def add_state_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="state directory (default: $RECONCILER_STATE_DIR or ~/.local/state/reconciler)",
    )
    parser.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help=f"state store: 'sqlite' (in the state directory) or a postgresql:// URL shared by "
        f"the fleet's hosts (default: ${STORE_ENV}, else sqlite); a password is best given in "
        "the variable or ~/.pgpass, not here: arguments are visible in ps",
    )


def state_dir(args: argparse.Namespace) -> Path:
    chosen: Path | None = getattr(args, "state_dir", None)
    return chosen if chosen is not None else read_environment().state_dir


def store_location(args: argparse.Namespace) -> StoreLocation:
    """Where the command's state store is: ``--store``, else ``$RECONCILER_STORE``, else
    SQLite in the state directory."""
    chosen: str | None = getattr(args, "store", None)
    url = chosen if chosen is not None else read_environment().store
    # Imported here: a command that opens no store (``diff --base``) loads no database driver.
    from reconciler.state import StoreLocation  # noqa: PLC0415

    return StoreLocation(state_dir(args), url=url).validated()


class _StoreDigestKeys:
    """The fleet's digest key in a PostgreSQL store, asked for only when a secret is digested:
    a command against a multi-host fleet (``diff --store``, ``apply --store``) must digest
    secrets under the key the hosts use, or every secret would show as a change."""

    def __init__(self, location: StoreLocation) -> None:
        self.location = location

    def fleet_digest_key(self, candidate: bytes) -> bytes:
        from reconciler.state.location import open_host_registry  # noqa: PLC0415 (as above)

        with open_host_registry(self.location) as store:
            return store.fleet_digest_key(candidate)


def _store_digest_keys(args: argparse.Namespace) -> _StoreDigestKeys | None:
    """The store's digest key source when the command's store is PostgreSQL, else None."""
    chosen: str | None = getattr(args, "store", None)
    url = chosen if chosen is not None else read_environment().store
    if url is None:
        return None
    from reconciler.state.location import is_postgres_url  # noqa: PLC0415 (as above)

    if not is_postgres_url(url):
        return None
    return _StoreDigestKeys(store_location(args))


def repo_credential(args: argparse.Namespace) -> GitCredential | None:
    """The repository credential from ``--repo-credential-file``, else the environment."""
    path: Path | None = getattr(args, "repo_credential_file", None)
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the credential file {path}: {exc.strerror or exc}"
            ) from exc
        return GitCredential.parse(text, origin=str(path))
    value = read_environment().git_credential
    if value:
        return GitCredential.parse(value, origin=f"${CREDENTIAL_ENV}")
    return None


def trusted_keys(args: argparse.Namespace) -> TrustedKeys:
    # Imported here, as in ``revision_loader``: signature checks are only for --trusted-key.
    from reconciler.source.signatures import TrustedKeys  # noqa: PLC0415

    return TrustedKeys.from_paths(
        getattr(args, "trusted_key", []), getattr(args, "revoked_key", [])
    )


def age_key_file(args: argparse.Namespace) -> Path | None:
    """``--age-key-file``, else ``$SOPS_AGE_KEY_FILE`` (else the state directory's file, found
    by ``reconciler.secrets``)."""
    chosen: Path | None = getattr(args, "age_key_file", None)
    return chosen if chosen is not None else read_environment().age_key_file


def revision_loader(
    args: argparse.Namespace, *, decrypt: bool = True, create_digest_key: bool = False
) -> RevisionLoader:
    """The fleet repository of the options; with trusted keys, one whose trees come only from
    commits signed by them. ``decrypt``: secrets are decrypted with the age key (commands that
    plan or start VMs); without, only checked (``validate``, ``build``). ``create_digest_key``:
    the fleet's digest key is created when missing (commands that write the state)."""
    verified = getattr(args, "trusted_key", None) or getattr(args, "revoked_key", None)
    keys = trusted_keys(args) if verified else None  # a bad key file fails before any fetch
    source = open_source(
        args.repo, ref=args.ref, cache_dir=state_dir(args) / "git", credential=repo_credential(args)
    )
    secrets = (
        open_resolver(
            state_dir(args),
            age_key_file=age_key_file(args),
            create_digest_key=create_digest_key,
            fleet=_store_digest_keys(args),
        )
        if decrypt
        else None
    )
    compiled = state_dir(args) / CACHE_FILE
    if not keys:
        return RevisionLoader(
            source=source, subpath=args.path, secrets=secrets, compile_cache=compiled
        )
    # Imported here: the signature tools (gpg, ssh-keygen) are no concern of a repository
    # that is not verified, and ``diff`` starts in every pull request.
    from reconciler.source.signatures import SignatureVerifier, VerifiedSource  # noqa: PLC0415

    verifier = SignatureVerifier(keys, state_dir(args) / "signatures")
    verifier.prepare()
    return RevisionLoader(
        source=VerifiedSource(source, verifier, source.repo_path),
        subpath=args.path,
        secrets=secrets,
        compile_cache=compiled,
    )
