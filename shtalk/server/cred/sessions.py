"""Sessions: one login of one device, as a family of rotating refresh tokens.

A password login opens a family; each refresh swaps the live refresh token for a new
one, and a rotated token that comes back revokes its whole family (the store's
`TokenReuse`), since one of its two holders is a thief.  Access tokens are short-lived
JWTs naming the user, the device and the family (shtalk.server.cred.tokens).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from shtalk.collaborators import collaborators
from shtalk.server.cred.tokens import TokenIssuer, new_family, new_refresh_token, refresh_hash
from shtalk.server.iserver import IStore


@collaborators
class Sessions:
    store: IStore
    issuer: TokenIssuer
    clock: IReactorTime

    @property
    def access_ttl(self) -> int:
        return int(self.issuer.access_ttl)

    @inlineCallbacks
    def start(self, user_id: int, device_id: str) -> Any:
        """After a password login (or a password change): (family, access, refresh)."""
        family = new_family()
        refresh = new_refresh_token()
        now = self.clock.seconds()
        yield self.store.create_session(
            family, user_id, device_id, refresh_hash(refresh), now + self.issuer.refresh_ttl
        )
        access = self.issuer.issue_access(user_id, device_id, family, now)
        return family, access, refresh

    @inlineCallbacks
    def refresh(self, token: str) -> Any:
        """Rotate: (session, access, refresh).  Errbacks with the store's TokenReuse,
        TokenRevoked or TokenUnknown."""
        new = new_refresh_token()
        now = self.clock.seconds()
        session = yield self.store.rotate_refresh(
            refresh_hash(token), refresh_hash(new), now + self.issuer.refresh_ttl, now
        )
        access = self.issuer.issue_access(session.user_id, session.device_id, session.family, now)
        return session, access, new
