"""Crowd membership materialised in Redis (layout, derivation of crowds from facts, store)."""
