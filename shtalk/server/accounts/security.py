"""Account security: email verification and reset codes, CAPTCHA gates, TOTP, throttling.

`AccountSecurity` holds the parts (each a module of its own: gates, verification,
newpassword, twofactor, registration) and is their service in the tree, so the timer
that prunes the throttle, sweeps the mail outbox and deletes accounts never verified
starts and stops with the server.  The request handlers (shtalk.server.net.account)
only translate requests to calls of the parts and results to replies.  The choices and
their reasons are in docs/SECURITY.md, "Account security".

Rules every part keeps:

* Secrets (passwords, codes) never reach a log line or an error message.
* Unknown user, wrong password and wrong code give the same reply after the same work:
  lookups and code checks run against account id 0 (which never exists) when the
  account does not, and a bcrypt check runs against a dummy hash.
* Every failure of a secret goes to the throttle, keyed by the name tried and the
  address; every attempt first asks the throttle (and maybe for a CAPTCHA).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from shtalk.server.accounts.mailer import Mailer
from shtalk.server.accounts.newpassword import NewPassword
from shtalk.server.accounts.registration import Registration
from shtalk.server.accounts.shared import AccountPart, Shared
from shtalk.server.accounts.twofactor import TwoFactor
from shtalk.server.accounts.verification import EmailVerification
from shtalk.server.repeating import Repeating

log = Logger()

PURGE_INTERVAL = 3600.0


class AccountSecurity(AccountPart, Repeating):
    name = "security"

    def __init__(
        self,
        shared: Shared,
        registration: Registration,
        verification: EmailVerification,
        new_password: NewPassword,
        two_factor: TwoFactor,
        mailer: Mailer,
    ) -> None:
        AccountPart.__init__(self, shared)
        Repeating.__init__(
            self, shared.clock, PURGE_INTERVAL, self._purge_now,
            "purging unverified accounts failed", first=60.0,
        )
        self.registration = registration
        self.verification = verification
        self.new_password = new_password
        self.two_factor = two_factor
        self.mailer = mailer

    def _purge_now(self) -> Any:
        self.gates.throttle.prune()
        self.mailer.sweep()  # outbox files whose codes expired (also those of a past run)
        return self.purge_pending()

    @inlineCallbacks
    def purge_pending(self) -> Any:
        n = yield self.codes.purge_pending(self.clock.seconds() - self.s.pending_purge_after)
        if n:
            log.info("deleted {n} accounts whose email was never verified", n=n)
        return n
