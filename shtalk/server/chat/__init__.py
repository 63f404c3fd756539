"""The chat domain: avatars, rooms, presence, delivery of opaque envelopes, mailbox names."""
