"""What runs inside the enclave around the key release: the supervisor that is the image's
entrypoint (:mod:`keyutil.enclave.supervisor`, ``keyutil run``), its configuration
(:mod:`keyutil.enclave.config`) and the log bridge's sending side
(:mod:`keyutil.enclave.logsend`)."""
