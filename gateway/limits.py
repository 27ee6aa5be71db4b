"""Sizes the gateway derives from the sealed-request layer (openpcc/wire/sealed.py) and the
OHTTP request prefix (openpcc/wire/ohttp.py).

Apart from gateway/config.py because that is imported while ``openpcc`` builds its parser,
and the sealed layer brings the crypto libraries with it.
"""

from __future__ import annotations

from openpcc.wire import ohttp, sealed

# Largest envelope a client can build, of any version (v2's X-Wing header is the larger:
# 8 candidates of 1 176 bytes each).
MAX_ENVELOPE = sealed.MAX_ENVELOPE_LEN
# Inner BHTTP request: envelope plus headers (the token is ~480 bytes) and framing.
MAX_INNER_REQUEST = MAX_ENVELOPE + 64 * 1024
# Outer OHTTP body: the request prefix hdr ‖ enc of the largest KEM (X-Wing: 7 + 1120
# bytes, where X25519's is 7 + 32), then the inner request, plus per-chunk framing and
# tags (64 KiB covers a chunk every 2 KiB).
DEFAULT_MAX_BODY = ohttp.MAX_REQUEST_PREFIX_LEN + MAX_INNER_REQUEST + 64 * 1024
