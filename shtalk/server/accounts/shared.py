"""What the account-security parts share, built once (in shtalk.server.compose).

Each part (`MailedCodes`, `EmailVerification`, `NewPassword`, `TwoFactor`,
`AccountSecurity`) works with the same store, code tables, gates, account cache, bcrypt
pool, clock and ``[accounts]`` settings; `AccountPart` takes them from one `Shared` so
each part's constructor names only what is its own.  Each part keeps its own reference
to the clock (tests shift one part's time).
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from shtalk.server.accounts.gates import Gates
from shtalk.server.chat.users import Users
from shtalk.server.config import AccountsSection
from shtalk.server.cred.passwords import PasswordHasher
from shtalk.server.iserver import ICodeStore, IStore


@dataclass(frozen=True)
class Shared:
    store: IStore
    codes: ICodeStore
    gates: Gates
    users: Users
    hasher: PasswordHasher
    clock: IReactorTime
    settings: AccountsSection


class AccountPart:
    def __init__(self, shared: Shared) -> None:
        self.store = shared.store
        self.codes = shared.codes
        self.gates = shared.gates
        self.users = shared.users
        self.hasher = shared.hasher
        self.clock = shared.clock
        self.s = shared.settings
