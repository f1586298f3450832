"""Enclave programs shipped with shieldtune (registered in ``ENCLAVE_PROGRAMS``)."""
