"""Creating accounts: the checks a registration must pass, then the account itself.

The cheap checks (the name's form, the password policy, the email's form, a name
already taken) run before any CAPTCHA or bcrypt, so a typo costs the newcomer no
challenge and the server no hashing; registering always showed that a name is taken
(docs/SECURITY.md, "Enumeration").  New accounts start ``pending`` until their email is
verified, or ``active`` where the operator turned verification off.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from shtalk.collaborators import collaborators
from shtalk.server.chat.naming import check_email, user_key
from shtalk.server.cred.passwords import PasswordHasher
from shtalk.server.eserver import Conflict, UsernameTaken
from shtalk.server.iserver import IStore
from shtalk.wire.passwords import check_password_policy

log = Logger()


@collaborators
class Registration:
    store: IStore
    hasher: PasswordHasher
    min_password_length: int = 12
    new_account_status: str = "active"

    @inlineCallbacks
    def check(self, username: str, password: str, email: str) -> Any:
        """What a registration is refused for before any CAPTCHA or bcrypt."""
        display, key = user_key(username)
        check_password_policy(password, display, self.min_password_length)
        check_email(email)
        existing = yield self.store.user_by_key(key)
        if existing is not None:
            raise UsernameTaken("that username is taken; pick another")

    @inlineCallbacks
    def register(self, username: str, password: str, email: str) -> Any:
        display, key = user_key(username)
        check_password_policy(password, display, self.min_password_length)
        email = check_email(email)
        pw_hash = yield self.hasher.hash(password)
        try:
            user = yield self.store.create_user(
                display, key, email, pw_hash, self.new_account_status
            )
        except Conflict:
            raise UsernameTaken("that username is taken; pick another") from None
        log.info("account registered", user_id=user.id)
        return {"user": user.name, "status": user.status}
