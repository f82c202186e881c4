"""The example multi-room chat server: ``chatcore serve examples.chat.app:app``.

Everything a chat backend needs, small enough to read in one sitting:

* **Auth**: clients connect to ``/ws?user=NAME&token=TOKEN`` where the token is
  the lowercase hex HMAC-SHA256 of the user name keyed with ``CHAT_SECRET``
  (``python -m examples.chat.token NAME`` prints one). Without ``CHAT_SECRET``
  a loudly logged dev mode accepts any valid user name.
* **Origin**: a browser handshake must come from the page's own origin (scheme
  + the request's ``Host``) or one listed in ``CHAT_ORIGINS`` (comma-separated);
  otherwise 403. Clients that send no ``Origin`` are judged by their token.
* **Rooms** with ordered messages (protocol v1), **typing indicators** as
  ephemeral coalesced messages, and a **bot**: a message starting with
  ``/ask `` is published as usual and the asker alone then gets a streamed
  answer, from a task owned by the asker's connection (closing the tab
  cancels it).
* **Presence** (who is in each room) and **history**: ``{"type":"history",
  "room":…,"ref":…}`` answers a member with the room's latest messages, which
  the page shows on joining and whenever it could not recover what it missed.
  ``CHAT_PRESENCE_GRACE`` (seconds, default 5) is how long a user who closed
  their last tab still counts as present.
* The page at ``/``, health at ``/healthz``, and the browser client
  ``/chatcore.js`` (served by :class:`~chatcore.asgi.ASGIApp` itself).
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any

import trio

from chatcore import ErrorReply, HandshakeRequest, Hub, HubConfig, Identity, Reject, Session
from chatcore.asgi import ASGIApp
from chatcore.sansio import AppMessage, valid_room, valid_user

from .pages import Pages
from .token import token_for

logger = logging.getLogger(__name__)

#: The server secret tokens are keyed with (``None``: dev mode).
SECRET: str | None = os.environ.get("CHAT_SECRET") or None
#: Extra browser origins allowed besides the page's own.
EXTRA_ORIGINS = frozenset(
    o.strip() for o in os.environ.get("CHAT_ORIGINS", "").split(",") if o.strip()
)
#: Seconds a user stays present after their last connection in a room is gone.
PRESENCE_GRACE = float(os.environ.get("CHAT_PRESENCE_GRACE", "5"))

# Once per server: `chatcore serve --workers N` sets CHATCORE_WORKER in its workers.
if SECRET is None and not os.environ.get("CHATCORE_WORKER"):
    logger.warning(
        "CHAT_SECRET is not set: DEV MODE, any valid user name is accepted without a token"
    )


def own_origins(request: HandshakeRequest) -> set[str]:
    """The origins a browser on this server's own page sends (scheme + Host)."""
    host = request.host
    if not host:
        return set()
    scheme = "https" if request.scheme == "wss" else "http"
    return {f"{scheme}://{host}"}


async def authenticate(request: HandshakeRequest) -> Identity | Reject:
    """401 without a valid user and token; 403 for a foreign browser origin."""
    user = request.query.get("user", "")
    if not valid_user(user):
        return Reject(401, b"missing or invalid user (1-64 of A-Z a-z 0-9 _ . -)")
    if SECRET is not None:
        token = request.query.get("token", "")
        if not hmac.compare_digest(token.encode(), token_for(user, SECRET).encode()):
            return Reject(401, b"missing or wrong token")
    origin = request.origin
    if origin is not None and origin not in own_origins(request) | EXTRA_ORIGINS:
        return Reject(403, b"origin not allowed")
    return Identity(user)


def _text_of(data: Any) -> str | None:
    if isinstance(data, str):
        return data
    if isinstance(data, dict) and isinstance(data.get("text"), str):
        return str(data["text"])
    return None


_streams = itertools.count(1)


async def stream_answer(session: Session, room: str, question: str) -> None:
    """The bot: stream an answer to the asker only, as started/chunk…/completed.

    Every event names the ``room`` the question was asked in. Runs in the
    asker's connection nursery: if the tab closes mid-stream this task is
    cancelled, so nothing is ever sent after the close.
    """
    stream = next(_streams)
    head = {"type": "bot", "room": room, "stream": stream}
    await session.send({**head, "event": "started"})
    words = f"You asked: {question}. Here is a streamed answer, one chunk at a time.".split()
    for word in words:
        await trio.sleep(0.05)  # stands in for a model producing tokens
        await session.send({**head, "event": "chunk", "text": word + " "})
    await session.send({**head, "event": "completed"})


async def on_publish(session: Session, room: str, data: Any) -> Any:
    """Publish as usual; a ``/ask …`` message also starts the bot for the asker."""
    text = _text_of(data)
    if text is not None and text.startswith("/ask "):
        # At most 200 characters of the question: that bounds the stream's length.
        session.start_soon(stream_answer, session, room, text[5:].strip()[:200], name="bot")
    return data


hub = Hub(
    authenticate=authenticate,
    on_publish=on_publish,
    config=HubConfig(presence=True, presence_grace=PRESENCE_GRACE),
)


@hub.on("typing")
async def typing(session: Session, message: AppMessage) -> None:
    """``{"type":"typing","room":…}``: tell the room, ephemeral and coalesced."""
    room = message.fields.get("room")
    if not valid_room(room) or room not in session.rooms:
        raise ErrorReply("not_joined", "join the room first")
    await hub.broadcast(
        str(room),
        {"type": "typing", "room": room, "user": session.user},
        key=f"typing:{room}:{session.user}",
        exclude=session,
    )


#: The most messages, and bytes, a ``history`` reply holds. A reply must fit the
#: connection's outbox (1 MiB by default) or the connection closes as a slow consumer.
HISTORY_MESSAGES = 50
HISTORY_BYTES = 256 * 1024


@hub.on("history")
async def history(session: Session, message: AppMessage) -> dict[str, Any]:
    """``{"type":"history","room":…}``: the room's latest messages, oldest first."""
    room = message.fields.get("room")
    if not valid_room(room) or room not in session.rooms:
        raise ErrorReply("not_joined", "join the room first")
    messages = await hub.history(str(room), HISTORY_MESSAGES)
    # Keep the newest ones that fit in HISTORY_BYTES: no gap in what the page shows.
    size = 0
    for start in range(len(messages) - 1, -1, -1):
        size += len(json.dumps(messages[start], separators=(",", ":"))) + 1
        if size > HISTORY_BYTES:
            return {"messages": messages[start + 1 :]}
    return {"messages": messages}


#: The ASGI application: ``/ws``, ``/healthz``, and the page.
app = ASGIApp(
    hub, http_app=Pages(Path(__file__).parent / "static"), path="/ws", health_path="/healthz"
)
