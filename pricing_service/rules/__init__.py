"""Discount rules: the durable store (SQLite | PostgreSQL), its change feed, the in-process
index of the hot path, validation at the boundary and the command-line tools."""
