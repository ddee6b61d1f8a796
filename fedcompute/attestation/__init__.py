"""Attestation (RFC 9334 roles): the local attester (launcher), evidence handlers, the verifier, results.

Local mode has no hardware TEE: the launcher is a software process whose evidence says
``hwmodel = LOCAL_SOFTWARE``. See docs/architecture.md for what that does and does not protect.
"""
