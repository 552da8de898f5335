"""Runtimes that run VMs and processes (qemu, firecracker, process) and their networking.
Only this package touches VMMs and netlink."""
