"""The SQLite store's SQL, one module per group of tables.

Plain functions of a connection, run by `shtalk.server.store.sqlite.SQLiteStore` in its
threads (writes inside the group commit's savepoints); nothing here touches the reactor,
the cipher of envelopes is handed in, and every value is bound, never formatted in.
"""
