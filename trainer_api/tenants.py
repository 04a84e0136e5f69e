"""API keys and the tenants they stand for.

Each configured key is one tenant: everything a request creates belongs to the
key that sent it. Keys come from a file (``--api-keys-file``) or from the
``TRAINER_API_KEY`` environment variable, never from the command line, where
``ps`` and shell histories would show them. A tenant is identified on disk by a
fingerprint of its key (a truncated SHA-256), so the key itself is never written
anywhere and its runs are its own again after a restart.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .exceptions import ServiceError

KEY_PREFIX = "tml-"
"""The tinker SDK refuses keys without it."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class KeyConfigError(ValueError):
    """The keys could not be configured; the message says which line or setting is wrong (never the key)."""


class Unauthorized(ServiceError):
    """No key, or a key this service does not know."""

    status_code = 401
    category = "user"


@dataclass(frozen=True)
class Tenant:
    """Who a request acts for: ``id`` owns resources (stable across restarts), ``name`` is for logs."""

    id: str
    name: str


ANONYMOUS = Tenant("anonymous", "anonymous")
"""The one tenant of a service started without keys (loopback only, unless explicitly allowed)."""


def fingerprint(key: str) -> str:
    """The tenant id of a key: enough of its SHA-256 to tell keys apart, useless for recovering the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Keyring:
    """The configured keys. Lookup goes through the key's digest, so it takes the same time for every wrong key."""

    def __init__(self, tenants_by_key: Mapping[str, Tenant]) -> None:
        self._by_digest = {hashlib.sha256(k.encode()).digest(): t for k, t in tenants_by_key.items()}

    @property
    def is_open(self) -> bool:
        """True when no key is configured: every request acts for :data:`ANONYMOUS`."""
        return not self._by_digest

    @property
    def tenants(self) -> list[Tenant]:
        return list(self._by_digest.values())

    def authenticate(self, presented: str | None) -> Tenant:
        """The tenant of the ``X-API-Key`` value ``presented``; :class:`Unauthorized` when it is missing or unknown."""
        if self.is_open:
            return ANONYMOUS
        if presented is None:
            raise Unauthorized("missing X-API-Key header: this service requires an API key")
        tenant = self._by_digest.get(hashlib.sha256(presented.encode()).digest())
        if tenant is None:
            raise Unauthorized("wrong X-API-Key header: this key is not one of this service's API keys")
        return tenant


def _check_key(key: str, where: str) -> str:
    if not key.startswith(KEY_PREFIX):
        raise KeyConfigError(f"{where}: an API key must start with {KEY_PREFIX!r} (the tinker SDK refuses other keys)")
    if len(key) <= len(KEY_PREFIX):
        raise KeyConfigError(f"{where}: the API key is empty after {KEY_PREFIX!r}")
    return key


def parse_keys(text: str, source: str) -> dict[str, Tenant]:
    """Parse a keys file: ``KEY [NAME]`` per line; blank lines and lines starting with ``#`` are skipped.

    A line without a name is named after its fingerprint. Duplicate keys or names are refused, since
    two lines for one tenant are almost certainly a copy-paste mistake.
    """
    tenants: dict[str, Tenant] = {}
    names: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        fields = line.split()
        if len(fields) > 2:
            raise KeyConfigError(f"{where}: expected 'KEY [NAME]', got {len(fields)} fields")
        key = _check_key(fields[0], where)
        tenant_id = fingerprint(key)
        name = fields[1] if len(fields) == 2 else tenant_id
        if not _NAME_RE.match(name):
            raise KeyConfigError(f"{where}: a name is 1-64 letters, digits, '.', '_', '@' or '-'")
        if key in first_line:
            raise KeyConfigError(f"{where}: the same key as line {first_line[key]}")
        if name in names:
            raise KeyConfigError(f"{where}: the name {name!r} is already used on line {names[name]}")
        first_line[key], names[name] = number, number
        tenants[key] = Tenant(tenant_id, name)
    if not tenants:
        raise KeyConfigError(f"{source} has no keys")
    return tenants


def load_keyring(keys_file: str | Path | None, environ: Mapping[str, str]) -> Keyring:
    """The keys to enforce: ``keys_file``, else ``TRAINER_API_KEY``, else none (an open service).

    Both at once is refused: a key left over in the environment must not quietly become a tenant.
    """
    env_key = environ.get("TRAINER_API_KEY") or None
    if keys_file is not None:
        if env_key is not None:
            raise KeyConfigError("give the keys either in --api-keys-file or in TRAINER_API_KEY, not both")
        try:
            text = Path(keys_file).read_text()
        except OSError as exc:
            raise KeyConfigError(f"cannot read the API keys file {keys_file}: {exc.strerror}") from None
        return Keyring(parse_keys(text, str(keys_file)))
    if env_key is not None:
        key = _check_key(env_key, "TRAINER_API_KEY")
        return Keyring({key: Tenant(fingerprint(key), "TRAINER_API_KEY")})
    return Keyring({})


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (a hostname other than localhost does not count)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keyring: Keyring, allow_unauthenticated: bool) -> None:
    """Refuse to serve without keys on anything but loopback, where anyone on the network could train and read."""
    if keyring.is_open and not is_loopback(host) and not allow_unauthenticated:
        raise KeyConfigError(
            f"no API key configured (--api-keys-file or TRAINER_API_KEY): refusing to listen on {host}, "
            "which is beyond loopback; pass --allow-unauthenticated to serve it without keys"
        )
