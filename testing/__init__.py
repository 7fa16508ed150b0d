"""The harness that tests and benchmarks share: no product code imports it.

``server``: start the real service (or any HTTP server under test) as a subprocess on loopback and stop
its whole process group; ``procs``: every ``/proc`` read the harness makes (process groups, liveness,
command lines, resident memory, a job's trainer); ``weights``: random-weight bases and LoRA adapters;
``jobs``: training rows and ``wait_job``, the one poller of a job through the HTTP API.
"""
