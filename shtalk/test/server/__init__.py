"""Unit tests of the server: connection, handlers, store, accounts, operations."""
