"""The `pharox-integrations demo`: a local site, real local proxies, every door through one pool."""
