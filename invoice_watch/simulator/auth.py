"""The simulator's two real authentication schemes, without the HTTP plumbing:
HTTP Digest for API keys (RFC 7616, as Atlas challenges) and OAuth 2.0 client
credentials for service accounts (opaque bearer tokens with a lifetime).

Time comes from an injected :class:`~invoice_watch.clock.Clock`, so tests expire nonces
and tokens by moving a ``FakeClock`` instead of waiting.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass, field
from urllib.request import parse_http_list, parse_keqv_list

from invoice_watch.clock import Clock

REALM = "MMS Public API"
DIGEST_ALGORITHMS = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


class DigestResult(enum.Enum):
    OK = "ok"
    STALE = "stale"  # right credentials, expired nonce: challenge again with stale=true
    INVALID = "invalid"


def new_public_key() -> str:
    """Atlas-like public key: 8 lowercase letters."""
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(8))


def new_private_key() -> str:
    """Atlas-like private key: a random UUID-shaped string."""
    raw = secrets.token_hex(16)
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def new_client_id() -> str:
    return f"mdb_sa_id_{secrets.token_hex(12)}"


def new_client_secret() -> str:
    return f"mdb_sa_sk_{secrets.token_hex(20)}"


@dataclass
class _Nonce:
    issued: float
    seen_nc: set[int] = field(default_factory=set)


class DigestVerifier:
    """Issues Digest challenges and checks the answers: user, realm, uri, algorithm,
    ``qop=auth``, the response hash, a known unexpired nonce, and each ``nc`` used once
    per nonce (in any order, so concurrent requests sharing a nonce all pass)."""

    def __init__(
        self, username: str, password: str, algorithm: str, nonce_lifetime: float, clock: Clock
    ) -> None:
        if algorithm not in DIGEST_ALGORITHMS:
            raise ValueError(f"digest algorithm must be one of {', '.join(DIGEST_ALGORITHMS)}")
        self.username = username
        self._password = password
        self.algorithm = algorithm
        self.nonce_lifetime = nonce_lifetime
        self.revoked = False
        self._clock = clock
        self._nonces: dict[str, _Nonce] = {}

    def challenge(self, *, stale: bool = False) -> str:
        """A ``WWW-Authenticate`` value with a fresh nonce."""
        now = self._clock.now().timestamp()
        # Forget nonces long expired; recently expired ones still earn a stale=true.
        for nonce, state in list(self._nonces.items()):
            if now - state.issued > 2 * self.nonce_lifetime:
                del self._nonces[nonce]
        nonce = secrets.token_hex(16)
        self._nonces[nonce] = _Nonce(issued=now)
        return (
            f'Digest realm="{REALM}", domain="", nonce="{nonce}", '
            f'algorithm={self.algorithm}, qop="auth", stale={"true" if stale else "false"}'
        )

    def verify(self, authorization: str, method: str, uri: str) -> DigestResult:
        """Check an ``Authorization: Digest ...`` header against the request line."""
        scheme, _, rest = authorization.partition(" ")
        if scheme.lower() != "digest":
            return DigestResult.INVALID
        params = parse_keqv_list(parse_http_list(rest))
        needed = ("username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce")
        if any(name not in params for name in needed) or self.revoked:
            return DigestResult.INVALID
        state = self._nonces.get(params["nonce"])
        if (
            state is None
            or not hmac.compare_digest(params["username"], self.username)
            or params["realm"] != REALM
            or params["uri"] != uri
            or params.get("algorithm", "MD5").upper() != self.algorithm
            or params["qop"] != "auth"
        ):
            return DigestResult.INVALID
        try:
            nc = int(params["nc"], 16)
        except ValueError:
            return DigestResult.INVALID
        expected = self._response(method, params)
        if not hmac.compare_digest(expected, params["response"].lower()):
            return DigestResult.INVALID
        if self._clock.now().timestamp() - state.issued > self.nonce_lifetime:
            return DigestResult.STALE
        if nc in state.seen_nc:  # a replayed request
            return DigestResult.INVALID
        state.seen_nc.add(nc)
        return DigestResult.OK

    def _response(self, method: str, params: dict[str, str]) -> str:
        hash_fn = DIGEST_ALGORITHMS[self.algorithm]

        def h(text: str) -> str:
            return hash_fn(text.encode()).hexdigest()

        ha1 = h(f"{self.username}:{REALM}:{self._password}")
        ha2 = h(f"{method.upper()}:{params['uri']}")
        return h(f"{ha1}:{params['nonce']}:{params['nc']}:{params['cnonce']}:auth:{ha2}")


class TokenIssuer:
    """OAuth 2.0 client credentials: checks HTTP Basic client credentials, issues
    opaque bearer tokens, and answers whether a token is (still) valid."""

    def __init__(self, client_id: str, client_secret: str, lifetime: float, clock: Clock) -> None:
        self.client_id = client_id
        self._client_secret = client_secret
        self.lifetime = lifetime
        self.revoked = False
        self._clock = clock
        self._tokens: dict[str, float] = {}  # token -> expiry timestamp

    def client_ok(self, authorization: str | None) -> bool:
        """Whether ``Authorization: Basic base64(id:secret)`` names this service account."""
        if self.revoked or authorization is None:
            return False
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        client_id, _, secret = decoded.partition(":")
        return hmac.compare_digest(client_id, self.client_id) and hmac.compare_digest(
            secret, self._client_secret
        )

    def issue(self) -> str:
        now = self._clock.now().timestamp()
        self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
        token = secrets.token_urlsafe(32)
        self._tokens[token] = now + self.lifetime
        return token

    def valid(self, token: str) -> bool:
        expiry = self._tokens.get(token)
        return not self.revoked and expiry is not None and self._clock.now().timestamp() < expiry

    def revoke_tokens(self) -> None:
        self._tokens.clear()
