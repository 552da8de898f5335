"""The QEMU runtime (``qemu-system-x86_64 -M microvm``). So far: the machine facts every QEMU
boot needs (``machine.py``); the VM lifecycle driver comes with ``reconciler apply``."""
