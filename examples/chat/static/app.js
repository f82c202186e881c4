// The example page: rooms, messages, who is here, typing, the bot, a status
// indicator. All protocol work is in chatcore.js; this file is only UI.
import { ChatClient } from "/chatcore.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// room -> {epoch, messages: Map(offset -> {from, text, offset}), users: Map(user -> metas),
//          loaded: history shown, reloads: counts reloads (only the latest one's answer counts)}
const rooms = new Map();
let client = null;
let current = null;
let typingTimer = null;

function display(data) {
  if (data && typeof data === "object" && typeof data.text === "string") return data.text;
  return typeof data === "string" ? data : JSON.stringify(data);
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

function renderMessages() {
  $("room-title").textContent = current ?? "";
  const list = $("messages");
  list.replaceChildren();
  const messages = [...(rooms.get(current)?.messages.values() ?? [])];
  for (const m of messages.sort((a, b) => a.offset - b.offset)) {
    const li = document.createElement("li");
    li.dataset.offset = m.offset;
    const from = document.createElement("span");
    from.className = "from";
    from.textContent = m.from;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = m.text;
    li.append(from, text);
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

function switchTo(room) {
  current = room;
  $("typing").textContent = "";
  renderRooms();
  renderMessages();
  renderPresence();
}

function addMessage(state, m) {
  state.messages.set(m.offset, { from: m.from, text: display(m.data), offset: m.offset });
}

// Show the room as the server has it: its latest messages (`history`), plus the
// live ones arriving meanwhile. Keyed by offset, so overlaps show once.
async function reload(room, epoch) {
  const state = rooms.get(room);
  if (!state) return;
  const attempt = ++state.reloads;
  state.epoch = epoch;
  state.messages.clear();
  state.loaded = false;
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

async function join(room) {
  try {
    await client.join(room);
  } catch (error) {
    console.error(`join ${room}: ${error.message}`);
    return;
  }
  switchTo(room);
}

function start(user, token) {
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
  client.addEventListener("joined", (e) => {
    const { room, epoch, reset } = e.detail;
    if (!rooms.has(room)) rooms.set(room, { epoch, messages: new Map(), users: new Map(), loaded: false, reloads: 0 });
    if (reset || !rooms.get(room).loaded) reload(room, epoch);
  });
  // A live message of a new epoch, or after a gap: reload the room.
  client.addEventListener("reset", (e) => reload(e.detail.room, e.detail.epoch));
  client.addEventListener("message", (e) => {
    const m = e.detail;
    const state = rooms.get(m.room);
    if (!state || m.epoch !== state.epoch) return;
    addMessage(state, m);
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
    $("typing").textContent = `${e.detail.user} is typing…`;
    clearTimeout(typingTimer);
    typingTimer = setTimeout(() => ($("typing").textContent = ""), 3000);
  });
  client.addEventListener("bot", (e) => {
    const bot = $("bot");
    bot.hidden = false;
    if (e.detail.event === "started") bot.textContent = "bot: ";
    else if (e.detail.event === "chunk") bot.textContent += e.detail.text;
    else if (e.detail.event === "completed") bot.dataset.completed = String(e.detail.stream);
  });
  client.connect();
  $("login").hidden = true;
  $("chat").hidden = false;
}

$("login").onsubmit = (e) => {
  e.preventDefault();
  start($("user").value.trim(), $("token").value.trim());
};
$("join").onsubmit = async (e) => {
  e.preventDefault();
  const room = $("room").value.trim();
  $("room").value = "";
  await join(room);
};
$("compose").onsubmit = async (e) => {
  e.preventDefault();
  if (!current) return;
  const text = $("text").value;
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
  if (room) {
    client.addEventListener("hello", () => {
      if (!rooms.has(room)) join(room);
    }, { once: true });
  }
}
