"""Adapters on disk: the folder store (the worker's in-memory LRU is ``service/engine/cache.py``)."""
