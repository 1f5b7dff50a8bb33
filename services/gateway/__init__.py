"""HTTP/JSON gateway: the original system's REST API and our gRPC resources over HTTP.

    mlxu serve gateway            # http://127.0.0.1:8700/docs  (MLXU_GATEWAY_PORT)

It holds no state of its own: every request becomes calls to the gRPC services (addresses
from ``MLXU_<SERVICE>_ADDR``), with the caller's ``X-API-Key`` forwarded. Modules:
app.py (the FastAPI app, auth, health, serving), backends.py (channels and calls),
errors.py (gRPC status -> HTTP answer), convert.py (JSON <-> proto), legacy.py and
legacy_spec.py (the original endpoints), resources.py (the /v1 resources generated from the
contracts), events.py (Server-Sent Events). docs/http.md is the user's guide.
"""
