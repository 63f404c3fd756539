"""This device's entry in the server's prekey directory: publish the signed bundle at
every login, keep the one-time pre-keys topped up, rotate the signed pre-keys on
schedule and delete the previous pair once its grace period is over
(shtalk.client.rotation; docs/SECURITY.md, "Key rotation")."""

from __future__ import annotations

from twisted.logger import Logger

from shtalk.client.e2ee.common import Local, Put
from shtalk.wire.requests import KeysCount, KeysPublish, OneTimeKey

log = Logger()

REPLENISH_BELOW = 20
REPLENISH_TO = 60
KEM_REPLENISH_BELOW = 5
KEM_REPLENISH_TO = 15


class Prekeys:
    def __init__(self, local: Local) -> None:
        self.local = local

    async def publish(self) -> dict[str, int]:
        """Publish the bundle and top up one-time pre-keys (run at every login); first
        delete a previous signed pre-key whose grace period is over and rotate the
        signed pre-keys when due."""
        local = self.local
        ident, store = local.ident, local.store
        async with local.lock:
            await self._expire()
            if local.rotation.prekeys_due(ident, local.clock()):
                ident.rotate_prekeys(int(local.clock()))
                await store.commit(puts=[("identity", "self", ident.to_bytes())])
                log.info("new signed pre-key {id} (and last-resort ML-KEM pre-key)",
                         id=ident.signed_prekey[0])
            bundle = ident.public_bundle()
            counts = (await local.request(KeysCount()))["counts"]
            new_ec = new_pq = []
            if counts.get("ec", 0) < REPLENISH_BELOW:
                new_ec = ident.generate_one_time_prekeys(REPLENISH_TO - counts.get("ec", 0))
            if counts.get("pq", 0) < KEM_REPLENISH_BELOW:
                new_pq = ident.generate_kem_one_time_prekeys(
                    KEM_REPLENISH_TO - counts.get("pq", 0)
                )
            if new_ec or new_pq:
                await store.commit(puts=[("identity", "self", ident.to_bytes())])
            # The first publish of this device also uploads the keys made at creation.
            first = await store.get("meta", "published") is None
            ec = list(bundle.one_time_prekeys) if first else []
            pq = list(bundle.kem_one_time_prekeys) if first else []
            ec += [k for k in new_ec if k not in ec]
            pq += [k for k in new_pq if k not in pq]
            fresh = [OneTimeKey(kind="ec", id=k.key_id, key=k.to_bytes()) for k in ec]
            fresh += [OneTimeKey(kind="pq", id=k.key_id, key=k.to_bytes()) for k in pq]
            result: dict[str, int] = counts
            for i in range(0, max(1, len(fresh)), 100):
                reply = await local.request(KeysPublish(
                    bundle=bundle.base().to_bytes(),
                    one_time=tuple(fresh[i : i + 100]),
                    # A new identity on a device id the server knows (local state lost):
                    # the one-time keys it still holds belong to the old identity.
                    replace=first and i == 0,
                ))
                result = reply["counts"]
            puts: list[Put] = [("meta", "published", b"1")]
            # Initiators now fetch the new pair: the previous one's grace period starts.
            if ident.published(int(local.clock())):
                puts.append(("identity", "self", ident.to_bytes()))
            await store.commit(puts=puts)
            return result

    def next_event(self) -> float:
        """When ``maintain`` has work (the clock's time; rotation.KeyTimer)."""
        return self.local.rotation.next_prekey_event(self.local.ident)

    async def maintain(self) -> None:
        """Rotate and publish the signed pre-keys when due (also a publication that
        failed before), delete a previous pair whose grace period is over."""
        local = self.local
        ident, now = local.ident, local.clock()
        unpublished = ident.has_previous and not ident.previous_retired
        if unpublished or local.rotation.prekeys_due(ident, now):
            await self.publish()
            return
        async with local.lock:
            await self._expire()

    async def _expire(self) -> None:
        """Delete the previous signed pre-key pair once its grace period is over, from
        memory and from the store: the identity row is rewritten, secure_delete zeroes
        the old row's pages and the checkpoint drops the old page images from the WAL."""
        local = self.local
        ident = local.ident
        old = ident.previous_signed_prekey
        if not ident.expire_previous(local.clock(), local.rotation.prekey_grace):
            return
        await local.store.commit(puts=[("identity", "self", ident.to_bytes())])
        await local.store.scrub()
        log.info("deleted the previous signed pre-key {id}", id=old[0] if old else "?")
