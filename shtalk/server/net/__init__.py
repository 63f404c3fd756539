"""The connection: framing, limits, timers, admission before the TLS handshake,
dispatch to request handlers."""
