"""``reconciler daemon``: the continuous reconcile loop, its triggers, leader election wiring and
the operator's HTTP view. ``loop.Daemon`` is the entry point; ``cycle`` is one reconcile."""
