"""What a monitoring flag does to its subject: a CAPTCHA, a throttle, a suspension.

The monitor (shtalk.server.ops.monitor) decides which action a flag takes
(``[monitor] action_*``); these carry it out.  An action aimed at an account that only
makes sense for one (throttle, suspend) asks an address for a CAPTCHA instead.
"""

from __future__ import annotations

from shtalk.collaborators import collaborators
from shtalk.server.config import MonitorSection
from shtalk.server.ishared import ICaptchaDemands
from shtalk.server.ops.moderation import Moderation
from shtalk.server.ops.monitor import Action, Flag
from shtalk.server.ops.ratelimit import RateLimiter


@collaborators
class MonitorActions:
    demands: ICaptchaDemands
    limiter: RateLimiter
    moderation: Moderation
    config: MonitorSection

    def table(self) -> dict[str, Action]:
        """flag.action -> what it does (the monitor's ``actions``)."""
        return {"captcha": self.captcha, "throttle": self.throttle, "suspend": self.suspend}

    def captcha(self, flag: Flag) -> None:
        if flag.kind == "account":
            self.demands.require(account_id=int(flag.subject))
        else:
            self.demands.require(address=flag.subject)

    def throttle(self, flag: Flag) -> None:
        if flag.kind == "account":
            self.limiter.throttle(flag.subject, self.config.throttle_factor,
                                  self.config.throttle_seconds)
        else:
            self.captcha(flag)

    def suspend(self, flag: Flag) -> None:
        if flag.kind == "account":
            self.moderation.set_status(int(flag.subject), "suspended")
        else:
            self.captcha(flag)
