"""The expert store. disk.py: imported experts on disk (the slowest tier)."""
