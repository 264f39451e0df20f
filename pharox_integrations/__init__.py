"""Lease a proxy per request from a managed pharox pool."""
