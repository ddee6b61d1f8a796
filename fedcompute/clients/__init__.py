"""Typed clients (one method per RPC), the device simulator, and the demo."""
