"""fedcompute: a federated-compute server suite (see docs/architecture.md)."""

__version__ = "0.1.0"
