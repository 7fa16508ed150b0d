"""Adapters: the folder on disk (store) and the worker's in-memory LRU (cache)."""
