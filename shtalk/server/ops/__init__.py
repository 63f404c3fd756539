"""Operations: rate limits, sealed logs, the spam monitor, moderation, metrics and
the admin socket."""
