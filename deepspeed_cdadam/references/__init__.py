"""Plain per-method references written from the specs; simulate.py holds the older ones."""
