"""Durable state: the IStore backends (SQLite with group commit) and their SQL."""
