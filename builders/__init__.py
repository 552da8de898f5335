"""Build-target matrix: one builder per target (executable, unikernel, microvm), the
content-addressed artifact cache and the kernel registry. Only this package runs build tools."""
