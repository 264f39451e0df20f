"""The `pharox-integrations demo`: a local site, real local proxies, every door through one pool.

Constants shared by the demo's proxy processes and its site live here, so that the
site (in the demo process) never imports proxy.py.
"""

#: Loopback address a demo proxy connects upstream from (where 127.0.0.x can be bound).
SOURCE_IP_ENV = "PHAROX_DEMO_SOURCE_IP"
#: Label a demo proxy adds to every request it forwards, in the `VIA_HEADER` header.
VIA_ENV = "PHAROX_DEMO_VIA"
VIA_HEADER = "X-Demo-Via"
