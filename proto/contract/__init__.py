"""The contract every side of gradhub shares: the job spec and its validation, the errors (and
how they cross the wire), the lifecycles of jobs and workers, and the optimizer builder that
the server (ps modes) and the workers (allreduce) both use. It imports nothing else of
gradhub's: the protocol, the worker, the server and the client are built on top of it
(``tests/unit/test_layers.py`` keeps it that way).
"""
