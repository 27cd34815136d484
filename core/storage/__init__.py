"""Storage: the atomic, checksummed result cache, code hashes, guarded reads of user files."""
