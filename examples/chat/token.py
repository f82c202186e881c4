"""Chat tokens: ``python -m examples.chat.token NAME`` prints the token of NAME.

A token is the lowercase hex HMAC-SHA256 of the user name, keyed with the
server's secret. The command reads the secret from ``CHAT_SECRET``, the same
variable the server reads. This module does not import the server, so
printing a token never builds a hub.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys


def token_for(user: str, secret: str) -> str:
    """The token of ``user``: lowercase hex HMAC-SHA256 of the name, keyed with ``secret``."""
    return hmac.new(secret.encode(), user.encode(), hashlib.sha256).hexdigest()


def main(argv: list[str]) -> int:
    """Print ``token_for(argv[0], $CHAT_SECRET)``; 2 with a usage line if misused."""
    secret = os.environ.get("CHAT_SECRET")
    if len(argv) != 1 or not secret:
        module = __spec__.name if __spec__ is not None else "token"  # this module's own name
        print(f"usage: CHAT_SECRET=... python -m {module} NAME", file=sys.stderr)
        return 2
    print(token_for(argv[0], secret))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
