"""The Firecracker runtime: config generation (``config``), the API client (``api``) and the VM
lifecycle (``driver``). Tests that need a ``firecracker`` binary and usable KVM run where both
exist; config generation and the API sequence are tested everywhere."""
