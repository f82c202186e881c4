"""The browser client ships in the package and every ASGIApp serves it.

In memory (ASGI calls); the client itself runs in real Chromium in
``tests/test_e2e_browser.py``.
"""

from __future__ import annotations

import re
from typing import Any

from chatcore import Hub
from chatcore.asgi import ASGIApp
from chatcore.static import client_script, client_types
from tests.test_asgi import call_http


async def http_app(scope: Any, receive: Any, send: Any) -> None:
    """An application's own HTTP side: answers every request with 418 and its path."""
    body = scope["path"].encode()
    await send({"type": "http.response.start", "status": 418, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def test_asgi_app_serves_the_client_at_chatcore_js() -> None:
    app = ASGIApp(Hub(), http_app=http_app)
    status, headers, body = await call_http(app, "/chatcore.js")
    assert status == 200
    assert headers[b"content-type"] == b"text/javascript; charset=utf-8"
    assert int(headers[b"content-length"]) == len(body)
    assert body == client_script()
    assert b"export class ChatClient extends EventTarget" in body
    status, headers, body = await call_http(app, "/chatcore.js", "HEAD")
    assert (status, body) == (200, b"")
    assert int(headers[b"content-length"]) == len(client_script())
    status, headers, _ = await call_http(app, "/chatcore.js", "POST")
    assert (status, headers[b"allow"]) == (405, b"GET, HEAD")
    # Everything else still goes to the application.
    assert await call_http(app, "/chatcore.jsx") == (418, {}, b"/chatcore.jsx")


async def test_the_client_path_can_move_or_be_turned_off() -> None:
    app = ASGIApp(Hub(), http_app=http_app)
    app.client_path = "/static/chat.js"
    assert (await call_http(app, "/static/chat.js"))[2] == client_script()
    assert (await call_http(app, "/chatcore.js"))[0] == 418
    app.client_path = None
    assert (await call_http(app, "/static/chat.js"))[0] == 418
    assert (await call_http(ASGIApp(Hub()), "/nope"))[0] == 404


def test_the_declarations_cover_the_client() -> None:
    """Every public method of ChatClient is declared in chatcore.d.ts, and nothing more."""
    script = client_script().decode()
    types = client_types().decode()
    body = script[script.index("export class ChatClient") : script.index("// -- internals")]
    methods = set(re.findall(r"^  (?:async )?([a-z]\w*)\(", body, re.MULTILINE)) - {"constructor"}
    declared = set(re.findall(r"^  ([a-z]\w*)(?:<[^>]*>)?\(", types, re.MULTILINE))
    assert methods == declared - {"constructor", "addEventListener", "removeEventListener"}
    options = set(re.findall(r"options\.(\w+)", script))
    assert options == set(re.findall(r"^  (\w+)\?:", types, re.MULTILINE)) & options
    for option in options:
        assert f"  {option}?: number;" in types
