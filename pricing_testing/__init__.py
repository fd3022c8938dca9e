"""Helpers for testing and benchmarking the crowd pricing service against private services.

Shipped beside the service (as ``structlog.testing`` and ``temporalio.testing`` are) because both
the test suite (``tests/``) and the benchmarks (``bench/``) use them: private ``redis-server``
processes and clusters (:mod:`.redis_server`, :mod:`.redis_cluster`), test certificates
(:mod:`.certs`), the real console programs as child processes (:mod:`.procs`), rule store
locations (:mod:`.rule_stores`), an OTLP/HTTP receiver (:mod:`.otlp`), the seed design's key
layout (:mod:`.legacy_layout`) and the mixed load with its model (:mod:`.load`).

Never imported by ``pricing_service`` or ``sync_worker`` (``scripts/check_structure.py`` checks
it); it imports them, and nothing from ``tests`` or ``bench``. Beyond the service's own
dependencies it needs the ``dev`` extra's ``cryptography`` (:mod:`.certs`) and
``opentelemetry-proto`` (:mod:`.otlp`); the image (``Dockerfile``) does not ship it.
"""
