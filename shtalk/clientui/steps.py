"""Account steps the server asks for, driven by its replies and refusals.

Registration and login are retried with whatever the refusal asked for: a CAPTCHA
(``captcha_required`` / ``captcha_failed`` carry the challenge in the error), a TOTP code
(``otp_required``), an email code (a ``pending`` registration, or ``email_not_verified``).
Unknown steps fall through as errors, so a newer server never leaves the client stuck.
Esc in any of these prompts raises `Cancelled`: the caller goes back one step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from twisted.internet.defer import Deferred

from shtalk.client.errors import OTP_REJECTED, ServerError
from shtalk.clientui.dialogs import Pressed
from shtalk.clientui.qr import qr_text
from shtalk.wire.errors import ErrorCode

if TYPE_CHECKING:
    from shtalk.wire.records import ClientRequest

T = TypeVar("T")
MAX_STEPS = 12
CODE_REJECTED = ("That code was not accepted: wrong, expired or already used. Type the "
                 "current code from the app (or an unused recovery code).")
CAPTCHA_CODES = (ErrorCode.CAPTCHA_REQUIRED, ErrorCode.CAPTCHA_FAILED)


class Cancelled(Exception):
    """The person pressed Esc in a step."""


class StepUI(Protocol):
    def ask(self, title: str, text: Any, label: str, *, mask: bool = False,
            default: str = "", error: str = "") -> Deferred[str | None]: ...
    def ask_actions(self, title: str, text: Any, label: str, *, mask: bool = False,
                    default: str = "", error: str = "", actions: Sequence[str] = (),
                    footer: str = "Enter: OK    Esc: back", full: bool = False
                    ) -> Deferred[str | Pressed | None]: ...
    def choose(self, title: str, text: Any, choices: Sequence[tuple[str, str]], *,
               full: bool = False) -> Deferred[str | None]: ...
    def confirm(self, title: str, text: Any) -> Deferred[bool]: ...
    def message(self, title: str, text: Any) -> Deferred[None]: ...


Request = Callable[["ClientRequest"], Deferred[dict[str, Any]]]


def captcha_text(challenge: dict[str, Any]) -> list[Any]:
    """What the CAPTCHA dialog shows: the picture (never wrapped: a wrapped line breaks
    the glyphs) and which characters can appear, or the question in words."""
    import urwid

    if challenge.get("kind") == "words" or "question" in challenge:
        return [urwid.Text(("body", str(challenge.get("question", "")))), urwid.Divider(),
                urwid.Text("Answer in digits or in words (e.g. 74 or seventy-four).")]
    art = urwid.Text(("body", str(challenge.get("art", ""))), wrap="clip")
    alphabet = str(challenge.get("alphabet", ""))
    length = challenge.get("length", "the")
    if alphabet:
        hint = (f"Type the {length} characters drawn above. They are among "
                f"{' '.join(alphabet)} (no look-alikes such as 0/O or 1/I); case does not "
                "matter.")
    else:
        hint = str(challenge.get("hint", "Type the characters drawn above."))
    return [art, urwid.Text(hint)]


class Steps:
    def __init__(self, ui: StepUI, request: Request, username: str) -> None:
        self.ui = ui
        self.request = request  # a pre-authentication request (verify_email, captcha ...)
        self.username = username

    async def _ask(self, title: str, text: Any, label: str, *, mask: bool = False,
                   error: str = "") -> str:
        answer = await self.ui.ask(title, text, label, mask=mask, error=error)
        if answer is None:
            raise Cancelled(title)
        return answer

    async def run(self, op: Callable[[dict[str, Any]], Awaitable[T]]) -> T:
        """``op(extra)`` until it succeeds or fails with something that is not a step."""
        extra: dict[str, Any] = {}
        for _ in range(MAX_STEPS):
            try:
                return await op(dict(extra))
            except ServerError as e:
                if e.code in CAPTCHA_CODES:
                    extra["captcha"] = await self.captcha(
                        e.detail.get("captcha"), failed=e.code == ErrorCode.CAPTCHA_FAILED)
                elif e.code == ErrorCode.OTP_REQUIRED:
                    extra["otp"] = await self.otp()
                elif "otp" in extra and e.code in (ErrorCode.INVALID_CREDENTIALS,
                                                   ErrorCode.INVALID_CODE):
                    # The password was accepted (the server asked for the code): the code
                    # is what failed.
                    extra.pop("captcha", None)
                    extra["otp"] = await self.otp(retry=True)
                elif e.code == ErrorCode.EMAIL_NOT_VERIFIED:
                    await self.verify_email()
                else:
                    raise
        raise Cancelled("too many steps")

    async def otp(self, retry: bool = False) -> str:
        return (await self._ask(
            "Two-factor code",
            "This account has two-factor authentication. Type the 6-digit code "
            "from your authenticator app (or a recovery code).",
            "Code:", error=CODE_REJECTED if retry else "")).strip()

    async def answer(self, code: str, error: dict[str, Any]) -> dict[str, Any]:
        """What a login refusal asks for, as ServerSession's ``ask_extra`` wants it (the
        reconnect loop's password login of an account with TOTP or under a CAPTCHA)."""
        if code in CAPTCHA_CODES:
            return {"captcha": await self.captcha(error.get("captcha"),
                                                  failed=code == ErrorCode.CAPTCHA_FAILED)}
        if code in (ErrorCode.OTP_REQUIRED, OTP_REJECTED):
            return {"otp": await self.otp(retry=code == OTP_REJECTED)}
        raise Cancelled(code)

    async def _challenge(self, kind: str) -> dict[str, Any]:
        # (Requests are imported where they are made: the app imports this module for
        # the first frame, before the client stack.)
        from shtalk.wire.requests import Captcha

        reply = await self.request(Captcha(kind=kind if kind != "art" else None))
        challenge: dict[str, Any] = reply.get("captcha", reply)
        return challenge

    async def captcha(self, challenge: Any, failed: bool = False) -> dict[str, str]:
        """The CAPTCHA dialog, whole at 80x24: F5 draws a new one, F6 switches between the
        picture and a question in words; neither costs a registration attempt."""
        from shtalk.clientui.errors import describe

        error = "That answer was wrong or has expired; here is a new one." if failed else ""
        if not isinstance(challenge, dict) or "id" not in challenge:
            challenge = await self._challenge("art")
        for _ in range(MAX_STEPS * 4):
            words = challenge.get("kind") == "words"
            footer = ("Enter: OK   F5: another question   F6: a picture instead   Esc: back"
                      if words else
                      "Enter: OK   F5: new picture   F6: a question in words   Esc: back")
            answer = await self.ui.ask_actions(
                "Are you a person?", captcha_text(challenge), "Answer:", error=error,
                actions=("captcha_new", "captcha_words"), footer=footer, full=True)
            if answer is None:
                raise Cancelled("captcha")
            if isinstance(answer, Pressed):
                kind = ("art" if words else "words") if answer.action == "captcha_words" \
                    else ("words" if words else "art")
                try:
                    challenge, error = await self._challenge(kind), ""
                except ServerError as e:
                    error = describe(e)
                continue
            return {"id": str(challenge["id"]), "answer": answer.strip()}
        raise Cancelled("captcha")

    async def verify_email(self) -> dict[str, Any]:
        """Ask for the emailed code (empty: send it again) until the account is active."""
        from shtalk.wire.requests import ResendVerification

        error = ""
        for _ in range(MAX_STEPS):
            code = (await self._ask(
                "Confirm your email address",
                f"The server sent a code to the email address of {self.username}. Type it "
                "here (leave it empty and press Enter to have it sent again).",
                "Code:", error=error)).strip()
            if not code:
                await self.request(ResendVerification(username=self.username))
                # The server does not say whether it mailed one (no account probing):
                # it mails none within its resend interval of the last, which still works.
                error = ("A new code is on its way, unless one was sent in the last "
                         "minute: that one still works.")
                continue
            try:
                reply: dict[str, Any] = await self.run(partial(self._verify, code))
                return reply
            except ServerError as e:
                if e.code != ErrorCode.INVALID_CODE:
                    raise
                error = "That code is wrong or expired; check the mail or ask for a new one."
        raise Cancelled("email code")

    async def _verify(self, code: str, extra: dict[str, Any]) -> dict[str, Any]:
        from shtalk.client.authflow import amend
        from shtalk.wire.requests import VerifyEmail

        reply: dict[str, Any] = await self.request(
            amend(VerifyEmail(username=self.username, code=code), extra))
        return reply

    async def after_register(self, reply: dict[str, Any]) -> None:
        if reply.get("status") in ("pending", "pending_verification", "unverified"):
            await self.verify_email()


async def offer_totp(ui: StepUI, request: Request) -> bool:
    """After the first login of a new account: optional TOTP enrolment with a QR code."""
    want = await ui.confirm(
        "Two-factor authentication",
        "Protect the account with a one-time code from an authenticator app (TOTP)? "
        "You can also do it later with /2fa.")
    if not want:
        return False
    return await enroll_totp(ui, request)


async def enroll_totp(ui: StepUI, request: Request) -> bool:
    """The QR code alone on the screen first (whole at 80x24: two modules per character
    cell), then the code prompt with the key to type by hand.  Esc goes back a step."""
    from shtalk.wire.requests import TotpConfirm, TotpEnroll

    try:
        reply = await request(TotpEnroll())
    except ServerError as e:
        if e.code in (ErrorCode.UNKNOWN_TYPE, ErrorCode.BAD_FIELD):
            await ui.message("Two-factor authentication",
                             "This server does not offer two-factor authentication.")
            return False
        raise
    uri = str(reply.get("uri", ""))
    secret = str(reply.get("secret", ""))
    drawn = qr_text(uri)
    body = ["Or enter this key in the app by hand:\n", ("help_key", secret + "\n"),
            ("info", uri + "\n")]
    error = ""
    show_qr = bool(drawn)
    for _ in range(MAX_STEPS):
        if show_qr:
            import urwid

            seen = await ui.choose(
                "Scan this with your authenticator app",
                [urwid.Text(("body", drawn), wrap="clip")],
                [("enter", "type the code the app shows")], full=True)
            if seen is None:
                return False
            show_qr = False
        code = await ui.ask("Set up two-factor authentication", body,
                            "Code from the app:", error=error)
        if code is None:
            show_qr = bool(drawn)
            if not show_qr:
                return False
            continue
        try:
            done = await request(TotpConfirm(code=code.strip()))
        except ServerError as e:
            if e.code != ErrorCode.INVALID_CODE:
                raise
            error = "That code was not accepted; check the phone's clock and try the next one."
            continue
        codes = "\n".join("  " + c for c in done.get("recovery_codes", []))
        await ui.message("Two-factor authentication is on",
                         "Write these recovery codes down and keep them safe; each works "
                         f"once if you lose the phone:\n\n{codes}")
        return True
    return False
