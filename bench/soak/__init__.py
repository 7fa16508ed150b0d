"""Soak test: sustained mixed load on a real server over loopback, then proof that nothing leaked.

    python -m bench.soak                                  # 64 clients, 10 minutes, 20 adapters, chaos
    python -m bench.soak --clients 16 --duration 15 --adapters 5 --no-chaos --json out.json

It starts ``python -m service`` on a free loopback port (its own process group, a tiny random-weight
GPT-2 unless ``--model`` names a folder, two API processes), then for ``--duration`` seconds runs:
  * ``--clients`` concurrent clients, each sending /generate requests back to back (random adapter or
    the base, random length, a fifth of them streamed);
  * one churn client that uploads new versions of some adapters and deletes and re-creates others;
  * training jobs one after another (each must succeed; the one still running at the end is cancelled);
  * a sampler of the resident memory of the server's processes (the trainer children, in their own
    sessions, are not counted: a training job is not a leak);
  * chaos (unless ``--no-chaos``): ``kill -9`` of the generation worker at 15 % of the load (the server
    heals in place) and of the running job's trainer at 50 % (that job must end ``failed``).
Clients mix /generate (a fifth streamed, some dropped after the first event), /v1/completions and
/v1/chat/completions.
Every request is checked: success, or a designed 503/429 with Retry-After (404 only for an adapter
the churn client may just have deleted); a transport error, a timeout or any other status is a
violation. Afterwards: no request left running or waiting, at most ``max_loaded_adapters`` adapters
in memory, a burst of exactly ``max_in_flight`` requests is admitted whole (no leaked in-flight slot),
every adapter still answers (no leaked adapter pin), resident memory grew less than 10 %, and the
counters of ``/metrics`` equal what the client counted, request by request and token by token, every
adapter serves the version last published (no half-published one), every training job is listed once
and ran once, and the adapter cache's pins are back to 0.

Loopback only, bounded in time and count; it stops by itself. Progress is JSON lines on stderr; the
result is one JSON object on stdout (and in ``--json``); the exit status is 0 only when every check
passed. ``tests/test_reliability_load.py`` runs a short version against a server it starts itself.

One module per job: ``config`` (the server's limits and the soak's knobs), ``traffic`` (the clients,
the churn client and the training jobs, every response judged and counted), ``chaos`` (the kills),
``checks`` (what must hold after the load), ``run`` (``Load``: one soak against a ready server),
``__main__`` (the command line, which starts the server).
"""
