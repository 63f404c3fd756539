"""Sender Keys per room: our own sending chain, every member's chains, and handing our
key out over the pairwise sessions.

Any change of membership starts a new epoch of our sender key (removed members cannot
read what follows; joiners cannot read what came before), and so do the rotation
bounds (shtalk.client.rotation).  In the store a room is one "roomown" row (our own
state) and one "roomchain" row per sender chain, so a received message rewrites one
small row, not the whole room.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.logger import Logger

import shtalk.client.e2ee.common as common
from shtalk.client import payload as pl
from shtalk.client.e2ee.common import Batch, Local, NotYet, Put, Unreadable, chain_key
from shtalk.client.e2ee.pairwise import Pairwise
from shtalk.client.errors import ClientError, IdentityNotAccepted, ServerError
from shtalk.crypto import CryptoError, Envelope, ReplayError, RoomSession, StateError
from shtalk.wire.requests import Send, Target

log = Logger()


class RoomKeys:
    def __init__(self, local: Local, pairwise: Pairwise) -> None:
        self.local = local
        self.pairwise = pairwise
        self.rooms: dict[str, RoomSession] = {}
        self.members: dict[str, set[str]] = {}
        #: room -> keys of its "roomchain" rows in the store
        self.rows: dict[str, set[str]] = {}

    async def load(self) -> None:
        local, store = self.local, self.local.store
        for key, value in await store.items("roomown"):
            self.rooms[key] = RoomSession.from_bytes(value)
            self.rows[key] = set()
        for key, value in await store.items("roomchain"):
            room = key.partition("/")[0]
            rs = self.rooms.get(room)
            if rs is None:
                rs = self.rooms[room] = RoomSession(room, local.me, local.device)
            rs.load_chain(value)
            self.rows.setdefault(room, set()).add(key)
        # Stores written before that kept the whole RoomSession in one "room" row.
        migrate: list[Put] = []
        for key, value in await store.items("room"):
            if key not in self.rooms:
                self.rooms[key] = RoomSession.from_bytes(value)
                migrate += self.puts(key, self.rooms[key])
            migrate.append(("room", key, None))
        if migrate:
            await store.commit(puts=migrate)

    def clear(self) -> None:
        self.rooms.clear()
        self.rows.clear()

    # -- rows ---------------------------------------------------------------------------

    def puts(self, room: str, rs: RoomSession) -> list[Put]:
        """The whole room: our own state, every sender chain, deletes for chains gone."""
        ids = {chain_key(room, u, d, e): (u, d, e) for u, d, e in rs.chain_ids()}
        puts: list[Put] = [("roomown", room, rs.own_to_bytes())]
        puts += [("roomchain", k, rs.chain_to_bytes(*i)) for k, i in ids.items()]
        gone = sorted(self.rows.get(room, set()) - ids.keys())
        puts += [("roomchain", k, None) for k in gone]
        self.rows[room] = set(ids)
        return puts

    def _delete(self, room: str) -> list[Put]:
        puts: list[Put] = [("roomown", room, None), ("room", room, None)]
        puts += [("roomchain", k, None) for k in sorted(self.rows.pop(room, set()))]
        return puts

    def chain_value(self, room: str, user: str, device: str,
                    epoch: int) -> Callable[[], bytes | None]:
        def value() -> bytes | None:
            rs = self.rooms.get(room)
            if rs is None or epoch not in rs.chains.get((user, device), {}):
                self.rows.get(room, set()).discard(chain_key(room, user, device, epoch))
                return None
            self.rows.setdefault(room, set()).add(chain_key(room, user, device, epoch))
            return rs.chain_to_bytes(user, device, epoch)

        return value

    # -- our sender key -----------------------------------------------------------------

    async def session(self, room: str) -> RoomSession:
        """Our state in ``room``, with a sender key (a new one if we had none)."""
        rs = self.rooms.get(room)
        if rs is None or rs.epoch is None:
            rs = rs or RoomSession(room, self.local.me, self.local.device)
            await self.new_epoch(room, rs)
        return rs

    async def new_epoch(self, room: str, rs: RoomSession) -> None:
        """A fresh sender key for our messages in ``room``, saved, then handed out."""
        local = self.local
        rs.rotate(now=int(local.clock()))
        self.rooms[room] = rs
        await local.store.commit(puts=self.puts(room, rs))
        await self._distribute(room, rs)

    async def _distribute(self, room: str, rs: RoomSession) -> None:
        """Hand our current sender key to every member's devices over pairwise sessions."""
        local = self.local
        data = pl.encode(pl.SenderKey(room, rs.distribution().to_bytes()))
        members = set(self.members.get(room, set())) | {local.me}
        for member in sorted(members):
            puts: list[Put] = []
            try:
                envelopes = await self.pairwise.encrypt(member, data, puts)
            except IdentityNotAccepted as e:
                # Never hand a room key to a device whose identity changed unaccepted.
                log.warn("not sending {room}'s key to {user}: {e}", room=room, user=member, e=e)
                continue
            except ServerError as e:
                # A member whose device never published keys (no_such_device): skip that
                # member, not every member sorted after it.
                log.warn("not sending {room}'s key to {user}: {e}", room=room, user=member, e=e)
                envelopes = {}
            if puts:
                await local.store.commit(puts=puts)
            if envelopes:
                local.request(Send(to=Target(user=member), envelopes=envelopes,
                                   client_id=common.new_client_id()))

    async def joined(self, room: str, members: Iterable[str]) -> None:
        """We joined or created ``room``: start a fresh sender key and hand it out."""
        local = self.local
        async with local.lock:
            self.members[room] = set(members) | {local.me}
            rs = self.rooms.get(room) or RoomSession(room, local.me, local.device)
            await self.new_epoch(room, rs)

    async def rotate_key(self, room: str) -> None:
        """A new sender key for our messages in ``room`` now, handed to every member
        (sends do this by themselves at the room bounds: shtalk.client.rotation)."""
        async with self.local.lock:
            rs = self.rooms.get(room)
            if rs is None or rs.epoch is None:
                raise ClientError(f"no sender key of ours in {room} yet: join it first")
            await self.new_epoch(room, rs)

    async def left(self, room: str) -> None:
        local = self.local
        async with local.lock:
            self.members.pop(room, None)
            self.rooms.pop(room, None)
            local.durable.rooms.pop(room, None)
            await local.store.commit(puts=self._delete(room))

    async def membership_changed(self, room: str, user: str, event: str) -> None:
        """Any change of membership starts a new epoch of our sender key (removed
        members cannot read what follows; joiners cannot read what came before)."""
        local = self.local
        async with local.lock:
            members = self.members.setdefault(room, {local.me})
            if event == "joined":
                members.add(user)
            elif event in ("left", "kicked"):
                members.discard(user)
            else:
                return
            rs = self.rooms.get(room)
            if rs is None:
                return
            if event in ("left", "kicked"):
                rs.remove_member(user)
            await self.new_epoch(room, rs)

    # -- receiving ----------------------------------------------------------------------

    def decrypt(self, env: Envelope, room: str, batch: Batch) -> tuple[str, bytes]:
        """The sender's name (as we spell it) and the plaintext of a room message; the
        chain that advanced goes into ``batch``.  Raises `NotYet` while its sender key
        has not arrived, `ReplayError` for a message already read, `Unreadable` for one
        that fails; none of them changes anything."""
        user, device = self.local.own(env.sender_user), env.sender_device
        contact = self.pairwise.directory.contacts.get((user, device))
        rs = self.rooms.get(room)
        if contact is None or rs is None:
            raise NotYet(room)
        try:
            # Verify before decrypt: the envelope under the sender's pinned identity key,
            # then (inside decrypt, before any key is derived) the sender key's signature.
            env.verify(contact.identity_key())
            epoch = RoomSession.header_epoch(env.header)
            plaintext = rs.decrypt(user, device, env.header, env.ciphertext)
        except StateError:
            raise NotYet(room) from None
        except ReplayError:
            raise
        except CryptoError as e:
            raise Unreadable(f"failed verification or decryption: {type(e).__name__}") from None
        # Only the chain that advanced is written: one small row, not the whole room.
        batch.put("roomchain", chain_key(room, user, device, epoch),
                  self.chain_value(room, user, device, epoch))
        return user, plaintext

    def install(self, room: str, user: str, device: str, dist: bytes, batch: Batch) -> None:
        """A member's sender key arrived (over a pairwise session): the whole room is
        written with the batch.  `Unreadable` if it is not a valid key."""
        rs = self.rooms.get(room) or RoomSession(room, self.local.me, self.local.device)
        try:
            rs.add_distribution(user, device, dist)
        except CryptoError as e:
            raise Unreadable(f"bad sender key: {e}") from None
        self.rooms[room] = rs
        batch.rooms.add(room)
