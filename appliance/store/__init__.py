"""Persistence adapters: the metadata database (SQLite) and the object store (local dir or S3)."""
