"""Operators' tools: backup and restore of a whole Graft deployment (database and storage)."""
