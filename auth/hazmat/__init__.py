"""Low-level primitives used inside :mod:`auth` (constant-time comparison, key loading).

Nothing outside :mod:`auth` imports this package. It is empty so far: the PKI code in
:mod:`auth.pki` compares only public values (names, public keys, fingerprints), which
need no constant-time helper.
"""
