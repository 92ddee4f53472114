"""The bearer tokens the security tests of the gRPC and HTTP ports share, and their token file."""

from __future__ import annotations

from segserve_server.auth import token_sha256

__all__ = ["ADMIN", "FULL", "LIMITED", "SCOPED", "TOKENS"]

FULL = "full-access-token-0123456789"
SCOPED = "colour-only-token-0123456789"  # stored as its sha256
ADMIN = "admin-token-abcdefghijklmnop"
LIMITED = "limited-token-abcdefghijklmn"  # 2 requests, then (practically) none
TOKENS = f"""
[[tokens]]
name = "full"
secret = "{FULL}"

[[tokens]]
name = "scoped"
sha256 = "{token_sha256(SCOPED)}"
models = ["colour"]

[[tokens]]
name = "admin"
secret = "{ADMIN}"
admin = true

[[tokens]]
name = "limited"
secret = "{LIMITED}"
rate_per_s = 0.0001
burst = 2
"""
"""A token file: full (every model), scoped (colour only), admin, and limited (rate)."""
