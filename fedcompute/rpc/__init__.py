"""gRPC runtime shared by every process: server factory, error mapping, auth, metrics, client channels.

Lives apart from ``server`` so the key services and the aggregator (which must never import ``server`` or
``store``) use the same runtime.
"""
