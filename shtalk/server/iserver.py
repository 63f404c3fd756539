"""The server's seams, in one module (as twisted.words' iwords; refusals in eserver).

Interfaces (zope): the store (`IStore`, with its account-security tables `ICodeStore`:
every method returns a Deferred and never runs SQL on the reactor thread), the avatar
(`IChatUser`) and the connection as the avatar's mind (`IChatMind`), the registry of
live connections (`IPresence`) and the bus that carries committed messages to them
(`IDeliveryBus`).  Each can be swapped (a memory store in tests, a cross-process bus)
without touching the code on the other side.  What several processes of a cluster share
is in ``shtalk.server.ishared``.

The refusals that go with them are in ``shtalk.server.eserver``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from shtalk.server.store.records import (
    AppendResult,
    ChainLink,
    ClaimedBundle,
    Device,
    Member,
    NewMessage,
    OneTimeKey,
    Room,
    Session,
    StoredMessage,
    TotpRecord,
    User,
)


class IStore(Interface):
    """Durable state of the server: accounts, sessions, rooms, queued envelopes."""

    path = Attribute("Where the data lives, for messages to operators.")
    codes = Attribute("The account-security tables of this store (an ICodeStore).")

    def open() -> Deferred[None]:
        """Open, migrate and check the database; fires when ready."""

    def close() -> Deferred[None]:
        """Flush pending writes and close."""

    # accounts
    def create_user(name: str, key: str, email: str, pw_hash: bytes, status: str) -> Deferred[User]:
        """Insert; errback Conflict if the key is taken."""

    def email_of(user_id: int) -> Deferred[str | None]:
        """The account's email address (stored sealed); None if it has none."""

    def user_by_key(key: str) -> Deferred[User | None]: ...

    def user_by_id(user_id: int) -> Deferred[User | None]: ...

    def users_by_ids(user_ids: Iterable[int]) -> Deferred[dict[int, User]]: ...

    def set_status(user_id: int, status: str) -> Deferred[bool]:
        """Set an account's status (any but "active" revokes its sessions); False if the
        account is unknown or deleted."""

    def delete_account(user_id: int, dummy_hash: bytes) -> Deferred[bool]:
        """Leave a tombstone (name kept, status "deleted", password hash replaced by
        ``dummy_hash``): email, sessions, devices, memberships, invites, direct-message
        partners and inbox go.  False if the account is unknown."""

    # devices
    def upsert_device(user_id: int, device_id: str, label: str) -> Deferred[Device]:
        """Create (cursors start after every message already stored) or relabel."""

    def devices(user_id: int) -> Deferred[list[Device]]: ...

    def remove_device(user_id: int, device_id: str) -> Deferred[bool]:
        """Delete the device, its cursors, keys and sessions; False if unknown."""

    # prekey directory (opaque bundles; one-time keys handed out once)
    def publish_keys(
        user_id: int,
        device_id: str,
        bundle: bytes | None,
        one_time: Sequence[OneTimeKey],
        replace: bool = False,
    ) -> Deferred[tuple[dict[str, int], bool]]:
        """Replace the bundle (if given), add one-time keys (after dropping every earlier
        one if ``replace``); return the remaining counts by kind, and whether the device's
        keys changed (a new or different bundle, or ``replace``)."""

    def key_counts(user_id: int, device_id: str) -> Deferred[dict[str, int]]: ...

    def claim_keys(user_id: int, device_id: str | None) -> Deferred[list[ClaimedBundle]]:
        """Bundles of the user's devices (or one device), each with at most one one-time
        key of each kind, deleted in the same transaction: never handed out twice."""

    def device_bundle(user_id: int, device_id: str) -> Deferred[bytes | None]:
        """The device's published bundle (its identity key), without claiming anything."""

    # sessions: refresh-token families
    def create_session(
        family: str, user_id: int, device_id: str, refresh_hash: bytes, expires: float
    ) -> Deferred[None]: ...

    def rotate_refresh(
        old_hash: bytes, new_hash: bytes, new_expires: float, now: float
    ) -> Deferred[Session]:
        """Swap a live refresh token for a new one.

        Errback TokenReuse (and revoke the family) if ``old_hash`` was
        already rotated; TokenRevoked if its family is revoked; TokenUnknown
        if unknown or expired.
        """

    def session(family: str) -> Deferred[Session | None]: ...

    def revoke_session(family: str) -> Deferred[None]: ...

    def revoke_user_sessions(user_id: int) -> Deferred[None]: ...

    # rooms
    def create_room(name: str, key: str, owner_id: int, invite_only: bool) -> Deferred[Room]:
        """Insert and add the owner as member with role "owner"; Conflict if taken."""

    def room_by_key(key: str) -> Deferred[Room | None]: ...

    def rooms_visible_to(user_id: int) -> Deferred[list[tuple[Room, int, bool]]]:
        """(room, member count, joined) for public rooms and rooms joined or invited to."""

    def rooms_of(user_id: int) -> Deferred[list[Room]]: ...

    def members(room_id: int) -> Deferred[list[Member]]: ...

    def member_since(room_id: int, user_id: int) -> Deferred[float | None]:
        """When the user joined the room; None if not a member."""

    def add_member(room_id: int, user_id: int, role: str) -> Deferred[ChainLink]:
        """Add; the new member's devices start after the room's last message.  The
        change takes its place in the room mailbox's chain (the link returned)."""

    def remove_member(room_id: int, user_id: int) -> Deferred[ChainLink]:
        """Remove the member, their invite and their devices' cursors; the change takes
        its place in the room mailbox's chain (the link returned)."""

    def set_role(room_id: int, user_id: int, role: str) -> Deferred[None]: ...

    def add_invite(room_id: int, user_id: int, by_id: int) -> Deferred[None]: ...

    def has_invite(room_id: int, user_id: int) -> Deferred[bool]: ...

    def dm_partners(user_id: int) -> Deferred[list[int]]:
        """Users this user has exchanged direct messages with."""

    def presence_readers(user_id: int) -> Deferred[list[int]]:
        """Users this user has sent a direct message to (they may see its presence)."""

    def presence_subjects(user_id: int) -> Deferred[list[int]]:
        """Users who have sent this user a direct message (it may see their presence)."""

    def has_written(writer_id: int, reader_id: int) -> Deferred[bool]:
        """Whether ``writer_id`` has ever sent ``reader_id`` a direct message."""

    # messages
    def append(message: NewMessage) -> Deferred[AppendResult]:
        """Store durably (group commit); fires after the commit.

        A repeated (sender, sender_device, client_id) is not stored again:
        the result has ``duplicate=True`` and the original sequence numbers.
        Direct messages record the sender/recipient pair for dm_partners.
        """

    def mailbox_heads(mailboxes: Sequence[str]) -> Deferred[dict[str, int]]:
        """The seq of the last change (message or membership) of each mailbox; 0 if it
        has none.  What a process subscribing to a mailbox starts its chain from."""

    def messages_between(mailbox: str, after: int, upto: int) -> Deferred[list[StoredMessage]]:
        """The mailbox's stored messages with ``after < seq <= upto``, in seq order
        (with their ``prev_seq``): how a receiver fills a gap in the chain."""

    def pending(user_id: int, device_id: str) -> Deferred[list[StoredMessage]]:
        """Everything stored for this device past its cursors, in seq order."""

    def delivered(mailbox: str, seq: int) -> None:
        """A message this process did not append was delivered here (from another
        process, over the bus): a hint, so the acks for it need no look-up."""

    def add_batch_listener(listener: Any) -> None:
        """``listener.batch_begins()`` before the answers of one committed batch of
        writes fire, ``listener.batch_ends()`` after the last (a store without batches
        never calls them)."""

    def ack(user_id: int, device_id: str, seqs: Sequence[int]) -> Deferred[None]:
        """Advance this device's cursor in each mailbox to the highest acked seq;
        delete messages every device of their mailbox has acknowledged."""

    def purge_expired(now: float) -> Deferred[int]:
        """Delete messages past their expiry or the retention limit; return how many."""

    def queued() -> Deferred[int]:
        """How many messages are stored, waiting for some device's acknowledgement."""


class ICodeStore(Interface):
    """The account-security tables: emailed codes, TOTP enrolment, recovery codes.

    Codes arrive hashed and TOTP secrets sealed; each check that consumes something
    is atomic, so two concurrent attempts with one code cannot both succeed.
    """

    def put_email_code(
        user_id: int, purpose: str, code_hash: bytes, expires: float, now: float,
        min_interval: float,
    ) -> Deferred[bool]:
        """Replace the account's code for ``purpose``; False (and nothing stored) if the
        last one was sent less than ``min_interval`` seconds ago."""

    def check_email_code(
        user_id: int, purpose: str, code_hash: bytes, now: float, max_attempts: int
    ) -> Deferred[str]:
        """CODE_OK (consumed; a "verify" code also activates a pending account),
        CODE_WRONG (attempt counted) or CODE_NONE (none live)."""

    def reset_with_code(
        user_id: int, code_hash: bytes, now: float, max_attempts: int, pw_hash: bytes
    ) -> Deferred[tuple[str, list[str]]]:
        """Consume a "reset" code and set the password at once; the outcome and the
        session families revoked."""

    def set_password(user_id: int, pw_hash: bytes) -> Deferred[list[str]]:
        """New password hash; every live session revoked; their families returned."""

    def purge_pending(cutoff: float) -> Deferred[int]:
        """Delete accounts still pending (never verified) created before ``cutoff``."""

    def totp(user_id: int) -> Deferred[TotpRecord | None]: ...

    def put_pending_totp(user_id: int, sealed: bytes, now: float) -> Deferred[bool]:
        """A new, not yet confirmed secret; False if TOTP is already enabled."""

    def enable_totp(user_id: int, step: int, code_hashes: list[bytes]) -> Deferred[bool]:
        """Confirm the pending secret with a code of ``step``, and set recovery codes."""

    def replace_recovery(user_id: int, code_hashes: list[bytes]) -> Deferred[None]: ...

    def accept_step(user_id: int, step: int) -> Deferred[bool]:
        """Record ``step`` as used; False if it (or a later one) was accepted before."""

    def use_recovery(user_id: int, code_hash: bytes) -> Deferred[bool]:
        """Consume a recovery code; False if it is not (or no longer) one."""

    def disable_totp(user_id: int) -> Deferred[None]: ...

    def recovery_left(user_id: int) -> Deferred[int]: ...

# --- the chat side: avatar, mind, presence, delivery ---------------------------------------


class IChatUser(Interface):
    """The avatar: what one authenticated device may do (twisted.cred hands it out).

    Request handlers call it; each method checks what the request means (names,
    membership, roles), raises a `Refused` kind when it may not, and returns the reply's
    fields once every write it made is committed."""

    user = Attribute("The account (a store.records.User).")
    device_id = Attribute("The device this avatar acts for.")
    family = Attribute("The session (refresh-token family) it belongs to; None until bound.")

    def create_room(raw: str, invite_only: bool) -> Deferred[dict[str, Any]]: ...

    def join(raw: str) -> Deferred[dict[str, Any]]: ...

    def leave(raw: str) -> Deferred[dict[str, Any]]: ...

    def invite(raw_room: str, raw_user: str) -> Deferred[dict[str, Any]]: ...

    def kick(raw_room: str, raw_user: str) -> Deferred[dict[str, Any]]: ...

    def set_role(raw_room: str, raw_user: str, new_role: str) -> Deferred[dict[str, Any]]: ...

    def list_rooms() -> Deferred[dict[str, Any]]: ...

    def members(raw: str) -> Deferred[dict[str, Any]]: ...

    def devices(raw_user: str | None) -> Deferred[dict[str, Any]]: ...

    def send(
        to: Mapping[str, str],
        envelope: bytes | None,
        envelopes: Mapping[str, bytes] | None,
        client_id: str,
        expires_in: int | None,
    ) -> Deferred[dict[str, Any]]:
        """Store durably, then deliver to every online device it is for, then reply."""

    def remove_device(device_id: str) -> Deferred[dict[str, Any]]: ...

    def publish_keys(
        bundle: bytes | None, one_time: Sequence[Mapping[str, Any]], replace: bool
    ) -> Deferred[dict[str, Any]]: ...

    def key_counts() -> Deferred[dict[str, Any]]: ...

    def fetch_keys(raw_user: str, device_id: str | None) -> Deferred[dict[str, Any]]: ...

    def ack(seqs: Sequence[int]) -> Deferred[None]:
        """Advance this device's cursors; fires once committed (the reply has no fields)."""

    def pending() -> Deferred[list[StoredMessage]]:
        """What the store holds for this device: the backlog replayed at login."""

    def logout(family: str) -> Deferred[None]:
        """Revoke the session family in the store."""


class IChatMind(Interface):
    """The connection, as the avatar's mind: it receives what happens elsewhere."""

    device_id = Attribute("The device a password login names (the realm registers it).")
    device_label = Attribute("That device's label, as the login request gave it.")

    def send_bytes(data: bytes) -> None:
        """Write one already-encoded line."""

    def deliver(seq: int, line: bytes) -> None:
        """A message push; the mind may hold it while it replays the backlog."""

    def session_revoked(reason: str) -> None:
        """The session ended elsewhere (logout, password change, device removed, account
        suspended): tell the peer why, then drop authentication."""


class IPresence(Interface):
    """The one registry of live connections: per user and device, and per session family.

    Every revocation goes through it, so whatever ends a session (logout, refresh-token
    reuse, password change or reset, device removal, suspension, deletion) reaches the
    same connections the same way."""

    def attach(user_id: int, device_id: str, mind: IChatMind) -> Deferred[bool]:
        """Register a logged-in connection (at once); fires True if it is the user's
        first anywhere (in a cluster: in any process)."""

    def detach(mind: IChatMind) -> Any:
        """Forget a connection: a `Departure` (its user, whether this process has none
        of theirs left, and a Deferred firing whether no process has), or None if it was
        not registered."""

    def online_among(user_ids: Iterable[int]) -> Deferred[set[int]]:
        """Those of ``user_ids`` online anywhere (in a cluster: in any process)."""

    def devices_online_anywhere(user_id: int) -> Deferred[set[str]]:
        """The user's devices online in any process."""

    def bind_family(mind: IChatMind, family: str) -> None:
        """The connection now belongs to this session family (and to no other)."""

    def is_online(user_id: int) -> bool: ...

    def minds_of(user_id: int) -> Iterable[tuple[str, IChatMind]]:
        """(device, connection) for every live connection of the user."""

    def send_to_users(user_ids: Iterable[int], line: bytes) -> None:
        """Write one line to every live connection of these users."""

    def revoke_families(families: Iterable[str], reason: str, keep: object = None) -> None:
        """End these sessions on every connection bound to them (but ``keep``)."""

    def revoke_device(user_id: int, device_id: str, reason: str) -> None: ...

    def revoke_user(user_id: int, reason: str) -> None: ...


class IDeliveryBus(Interface):
    def publish(message: StoredMessage) -> None:
        """Deliver a committed message to every online device it is for."""

    def membership_changed(
        link: ChainLink | None, room_id: int, user_id: int, joined: bool
    ) -> None:
        """A join/leave/kick committed here, cached; ``link``: its place in the chain."""

    def attach(user_id: int) -> Deferred[None]:
        """A device logs in: fires once its mailboxes reach here (before the backlog)."""

    def detach(user_id: int) -> None:
        """A connection `attach` counted is gone."""

    def reconcile() -> Deferred[None]:
        """Read what the bus missed from the store (e.g. a peer process died)."""
