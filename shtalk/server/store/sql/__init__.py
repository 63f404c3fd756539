"""The store's SQL, one module per group of tables, for SQLite and PostgreSQL alike.

Plain functions of a connection, run by the stores (`shtalk.server.store.facade`) in
their threads (writes inside the group commit's savepoints); nothing here touches the
reactor, the cipher of envelopes is handed in, and every value is bound, never
formatted in.  Statements use ``?`` placeholders (PostgreSQL's connection translates
them) and the SQL both engines accept; what really differs is asked of the
connection's dialect (`shtalk.server.store.sql.dialect`).
"""
