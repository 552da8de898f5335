"""Execution: the effectful half of apply. ``observer`` refreshes what runs from the runtimes,
``executor`` runs a plan wave by wave, ``health`` judges VMs from the guest, ``launch`` and
``vms`` turn settings into what a runtime starts."""
