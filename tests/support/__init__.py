"""Test support: real services (private redis-server processes, free ports)."""
