"""Tools that run on the parent EC2 instance, outside the enclave: the enclave lookup by name
(:mod:`keyutil.host.nitro`), the log sink (:mod:`keyutil.host.logsink`) and the readiness
check (:mod:`keyutil.host.ready`). Nothing here is imported by the enclave's boot path."""
