"""Training jobs: the SQLite job store, the runner that spawns trainer processes, and the HTTP routes."""
