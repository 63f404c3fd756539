"""Durable state behind IStore: the SQLite backend, and an in-memory one for unit tests.

SQLite: `sqlite` (the facade), `groupcommit` and `acks` (the write lane), `sealing`
(encryption at rest), `connections`, `schema`, and `sql` (the SQL, by table); `codes` is
its ICodeStore.  In memory: `memory`, `memtables`, `memcodes`.  Shared: `records` (what
crosses the boundary) and `mailbox` (the mailbox names rows are filed under).
"""
