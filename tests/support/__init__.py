"""The test kit, shared by the tests and the benchmarks.

One copy of what both need to stand up real things: a scratch fleet repository (``repo``),
ports and waiting (``waiting``), Debian's kernel (``kernel``), QEMU boots of built artifacts on
the runtime's own command line (``qemu``), process-VM deployments on a pool of their own
(``process_fleet``), and ``reconciler daemon`` subprocesses (``daemons``). Fakes of the
project's own seams are in ``fakes``.

Tests import it as ``support`` (pytest puts ``tests/`` on ``sys.path`` for its root
``conftest.py``); a benchmark puts ``tests/`` on ``sys.path`` itself. Submodules are imported by
name, so importing one never drags in the others' dependencies.
"""
