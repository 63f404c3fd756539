"""Unit tests of the headless client: connection, session, E2EE, local store."""
