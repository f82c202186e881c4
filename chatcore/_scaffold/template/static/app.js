// The example page: rooms, messages, who is here, typing, the bot, a status
// indicator. All protocol work is in chatcore.js (served by chatcore itself
// at /chatcore.js); this file is only UI.
import { ChatClient } from "/chatcore.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// The server's rules for names (protocol v1), checked here to say what is wrong.
const USER = /^[A-Za-z0-9_.\-]{1,64}$/;
const ROOM = /^[A-Za-z0-9_.:\-]{1,64}$/;
// The most messages kept from before a room's history was lost on the server.
const EARLIER_KEPT = 100;
// room -> {epoch, messages: Map(offset -> {from, text, offset}), earlier: [{from, text}],
//          users: Map(user -> metas), loaded: history shown, reloads: counts reloads
//          (only the latest one's answer counts), notice: text or "", bot: {text, completed}}
const rooms = new Map();
let client = null;
let current = null;
let typing = null; // {room, user, timer}: who the typing line names

function display(data) {
  if (data && typeof data === "object" && typeof data.text === "string") return data.text;
  return typeof data === "string" ? data : JSON.stringify(data);
}

function newRoom(epoch) {
  return { epoch, messages: new Map(), earlier: [], users: new Map(), loaded: false, reloads: 0, notice: "", bot: null };
}

function renderRooms() {
  const list = $("rooms");
  list.replaceChildren();
  for (const room of rooms.keys()) {
    const li = document.createElement("li");
    li.textContent = room;
    li.dataset.room = room;
    if (room === current) li.className = "active";
    li.onclick = () => switchTo(room);
    list.append(li);
  }
}

function messageItem(from, text, className) {
  const li = document.createElement("li");
  if (className) li.className = className;
  const who = document.createElement("span");
  who.className = "from";
  who.textContent = from;
  const what = document.createElement("span");
  what.className = "text";
  what.textContent = text;
  li.append(who, what);
  return li;
}

function renderMessages() {
  const state = rooms.get(current);
  $("room-title").textContent = current ?? "";
  $("room-notice").textContent = state?.notice ?? "";
  $("room-notice").hidden = !state?.notice;
  const list = $("messages");
  list.replaceChildren();
  if (!state) return;
  for (const m of state.earlier) list.append(messageItem(m.from, m.text, "earlier"));
  if (state.earlier.length) list.append(Object.assign(document.createElement("li"), { className: "divider" }));
  for (const m of [...state.messages.values()].sort((a, b) => a.offset - b.offset)) {
    const li = messageItem(m.from, m.text);
    li.dataset.offset = m.offset;
    list.append(li);
  }
  list.scrollTop = list.scrollHeight;
}

function renderPresence() {
  const list = $("presence");
  list.replaceChildren();
  for (const user of [...(rooms.get(current)?.users.keys() ?? [])].sort()) {
    const li = document.createElement("li");
    li.textContent = user;
    li.dataset.user = user;
    list.append(li);
  }
}

function renderBot() {
  const bot = rooms.get(current)?.bot;
  $("bot").hidden = !bot;
  $("bot").textContent = bot?.text ?? "";
  if (bot?.completed) $("bot").dataset.completed = String(bot.completed);
  else delete $("bot").dataset.completed;
}

function clearTyping() {
  if (typing) clearTimeout(typing.timer);
  typing = null;
  $("typing").textContent = "";
}

function switchTo(room) {
  current = room;
  clearTyping();
  // Send and Leave only make sense in a room.
  $("compose").hidden = room === null;
  renderRooms();
  renderMessages();
  renderPresence();
  renderBot();
}

function addMessage(state, m) {
  state.messages.set(m.offset, { from: m.from, text: display(m.data), offset: m.offset });
}

// Show the room as the server has it: its latest messages (`history`), plus the
// live ones arriving meanwhile. Keyed by offset, so overlaps show once. When the
// server lost the room (a new epoch), what this page saw stays, marked as earlier.
async function reload(room, epoch, notice) {
  const state = rooms.get(room);
  if (!state) return;
  const attempt = ++state.reloads;
  if (epoch !== state.epoch && state.messages.size) {
    const seen = [...state.messages.values()].sort((a, b) => a.offset - b.offset);
    state.earlier = [...state.earlier, ...seen].slice(-EARLIER_KEPT);
  }
  state.epoch = epoch;
  state.messages.clear();
  state.loaded = false;
  if (notice) state.notice = notice;
  if (room === current) renderMessages();
  let reply;
  try {
    reply = await client.request("history", { room });
  } catch (error) {
    console.error(`history ${room}: ${error.message}`); // the next `joined` tries again
    return;
  }
  if (rooms.get(room) !== state || state.reloads !== attempt) return; // left, or reloading again
  for (const m of reply.messages) if (m.epoch === state.epoch) addMessage(state, m);
  state.loaded = true;
  if (room === current) renderMessages();
}

const LOST = "The server could not recover the messages sent while this page was away " +
  "(it restarted or forgot the room). Shown: what it still has";
function lostNotice(state) {
  return state.earlier.length || state.messages.size ? `${LOST}; greyed above the line: what this page saw before.` : `${LOST}.`;
}

async function join(room) {
  $("join-error").textContent = "";
  try {
    await client.join(room);
  } catch (error) {
    $("join-error").textContent = `Could not join ${room}: ${error.message}`;
    return;
  }
  switchTo(room);
}

function showSignIn(message) {
  $("login-error").textContent = message;
  $("login").hidden = false;
  $("chat").hidden = true;
  $("me").textContent = "";
}

function start(user, token) {
  if (!USER.test(user)) {
    showSignIn("A name is 1 to 64 letters, digits, dots, dashes or underscores.");
    return;
  }
  $("user").value = user;
  $("token").value = token;
  $("login-error").textContent = "";
  rooms.clear();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = new URLSearchParams({ user });
  if (token) query.set("token", token);
  client = new ChatClient(`${scheme}://${location.host}/ws?${query}`);
  window.chat = client; // handy in the console and for tests
  client.addEventListener("status", (e) => {
    $("status").textContent = e.detail;
    $("status").className = `status ${e.detail}`;
  });
  client.addEventListener("hello", (e) => ($("me").textContent = `signed in as ${e.detail.user}`));
  // Never got in: a browser is not told why (401, 403 or no server), so ask
  // the health check whether the server is there at all.
  client.addEventListener("failed", async () => {
    let up = false;
    try {
      up = (await fetch("/healthz", { cache: "no-store" })).ok;
    } catch {
      up = false;
    }
    showSignIn(
      up
        ? "Could not sign in: the server refused this name or token. Check them and connect again."
        : "Could not sign in: the server is not reachable. Try again in a moment.",
    );
  });
  client.addEventListener("joined", (e) => {
    const { room, epoch, reset, recovered } = e.detail;
    if (!rooms.has(room)) rooms.set(room, newRoom(epoch));
    const state = rooms.get(room);
    if (recovered === false) reload(room, epoch, lostNotice(state));
    else if (reset || !state.loaded) reload(room, epoch);
  });
  // A live message of a new epoch, or after a gap: reload the room.
  client.addEventListener("reset", (e) => {
    const state = rooms.get(e.detail.room);
    if (state) reload(e.detail.room, e.detail.epoch, lostNotice(state));
  });
  client.addEventListener("message", (e) => {
    const m = e.detail;
    const state = rooms.get(m.room);
    if (!state || m.epoch !== state.epoch) return;
    addMessage(state, m);
    // Their message is here: they are no longer typing it.
    if (typing && typing.room === m.room && typing.user === m.from) clearTyping();
    if (m.room === current) renderMessages();
  });
  client.addEventListener("presence_state", (e) => {
    const state = rooms.get(e.detail.room);
    if (!state) return;
    state.users = new Map(Object.entries(e.detail.users));
    if (e.detail.room === current) renderPresence();
  });
  client.addEventListener("presence_diff", (e) => {
    const state = rooms.get(e.detail.room);
    if (!state) return;
    for (const user of Object.keys(e.detail.leaves)) state.users.delete(user);
    for (const [user, metas] of Object.entries(e.detail.joins)) state.users.set(user, metas);
    if (e.detail.room === current) renderPresence();
  });
  client.addEventListener("typing", (e) => {
    if (e.detail.room !== current) return;
    clearTyping();
    $("typing").textContent = `${e.detail.user} is typing…`;
    typing = { room: e.detail.room, user: e.detail.user, timer: setTimeout(clearTyping, 3000) };
  });
  // The bot answers in the room it was asked in; each room keeps its own panel.
  client.addEventListener("bot", (e) => {
    const state = rooms.get(e.detail.room);
    if (!state) return;
    if (e.detail.event === "started") state.bot = { text: "bot: ", completed: null };
    else if (state.bot && e.detail.event === "chunk") state.bot.text += e.detail.text;
    else if (state.bot && e.detail.event === "completed") state.bot.completed = e.detail.stream;
    if (e.detail.room === current) renderBot();
  });
  client.connect();
  $("login").hidden = true;
  $("chat").hidden = false;
  switchTo(null);
}

$("login").onsubmit = (e) => {
  e.preventDefault();
  if (client) client.close();
  start($("user").value.trim(), $("token").value.trim());
};
$("join").onsubmit = async (e) => {
  e.preventDefault();
  const room = $("room").value.trim();
  if (!ROOM.test(room)) {
    $("join-error").textContent = "A room name is 1 to 64 letters, digits, or . _ : -";
    return;
  }
  $("room").value = "";
  await join(room);
};
$("compose").onsubmit = async (e) => {
  e.preventDefault();
  const text = $("text").value;
  if (!current || !text.trim()) return;
  $("text").value = "";
  try {
    await client.publish(current, { text });
  } catch (error) {
    console.error(`publish: ${error.message}`);
    if (!$("text").value) $("text").value = text; // not sent: give it back
  }
};
let typingSent = 0;
$("text").oninput = () => {
  // At most one typing notice per 2 s: the others show it for 3 s.
  if (current && Date.now() - typingSent > 2000 && client.send({ type: "typing", room: current })) {
    typingSent = Date.now();
  }
};
$("leave").onclick = async () => {
  if (!current) return;
  const room = current;
  rooms.delete(room);
  switchTo(rooms.keys().next().value ?? null);
  await client.leave(room).catch((error) => console.error(`leave ${room}: ${error.message}`));
};

// /?user=alice&token=…&room=lobby connects straight away (used by the tests).
if (params.get("user")) {
  start(params.get("user"), params.get("token") ?? "");
  const room = params.get("room");
  if (room && client) {
    client.addEventListener("hello", () => {
      if (!rooms.has(room)) join(room);
    }, { once: true });
  }
}
