// The room page: history from the API, live messages from the websocket,
// reconnection that fills the gap with ?after=<last id seen>.
//
// The socket speaks sharechat.v1: each message goes out as {"text", "ref"}, and
// its echo or the `failed` about it comes back with the same ref, so a failure
// is shown on the very message it is about, however many are under way.
//
// Every text that comes from the network is put in the page with textContent,
// never as HTML.

import { HttpError, requestJSON, wireNewRoomButton } from '/static/common.js';

const HISTORY_PAGE = 200; // messages loaded on open and per "Load earlier"
const GAP_PAGE = 1000; // the API's largest page, used to catch up after a reconnect
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 20000;
const ANNOUNCED_KEPT = 5; // lines left in the aria-live region
const PROTOCOL = 'sharechat.v1';

const $ = (id) => document.getElementById(id);
const el = {
  loading: $('loading'),
  missing: $('missing'),
  loadError: $('load-error'),
  loadErrorText: $('load-error-text'),
  room: $('room'),
  roomName: $('room-name'),
  shareLink: $('share-link'),
  copyStatus: $('copy-status'),
  myName: $('my-name'),
  connection: $('connection'),
  connectionText: $('connection-text'),
  reconnectNow: $('reconnect-now'),
  membersBox: $('members-box'),
  members: $('members'),
  memberCount: $('member-count'),
  scroller: $('scroller'),
  loadEarlier: $('load-earlier'),
  messages: $('messages'),
  outbox: $('outbox'),
  composer: $('composer'),
  input: $('input'),
  send: $('send'),
  announcer: $('announcer'),
};

const roomId = parseRoomId(location.pathname);
const apiRoom = '/api/room/' + encodeURIComponent(roomId);

const state = {
  roomName: '',
  memberId: null, // this tab's member on the current connection
  memberName: null,
  myIds: new Set(), // every member this tab has been, across reconnects
  members: new Map(), // id -> name
  seen: new Set(), // ids of stored messages already shown
  lastSeenId: null, // newest stored message shown: the cursor for ?after=
  oldestId: null, // oldest shown: the cursor for ?before=
  socket: null,
  live: false, // socket open and history caught up: sending allowed
  gone: false, // the room answered 404: stop reconnecting
  pending: [], // sent, not yet echoed: {text, ref, memberId, li}
  lastRef: 0, // refs are unique for the page's life, across reconnects
  wake: null, // cuts the reconnect wait short
  unread: 0,
};

function parseRoomId(path) {
  const m = /^\/r\/([^/]+)\/?$/.exec(path);
  if (!m) return '';
  try {
    return decodeURIComponent(m[1]);
  } catch {
    return '';
  }
}

function isMessage(m) {
  return (
    m !== null &&
    typeof m === 'object' &&
    typeof m.id === 'string' &&
    typeof m.memberId === 'string' &&
    typeof m.memberName === 'string' &&
    typeof m.type === 'string' &&
    typeof m.message === 'string'
  );
}

// ---------------------------------------------------------------- views

function show(view) {
  for (const v of [el.loading, el.missing, el.loadError, el.room]) v.hidden = v !== view;
}

function showMissing() {
  state.gone = true;
  if (state.socket) state.socket.close(1000);
  document.title = 'Room not found — sharechat';
  show(el.missing);
  $('missing-new-room').focus();
}

wireNewRoomButton($('missing-new-room'), $('missing-status'));
$('load-retry').addEventListener('click', () => {
  show(el.loading);
  open();
});

// ---------------------------------------------------------------- rendering

function formatTime(sent) {
  const d = new Date(sent);
  if (Number.isNaN(d.getTime())) return '';
  return d.toLocaleTimeString([], { hour: 'numeric', minute: '2-digit' });
}

function timeElement(sent) {
  const t = document.createElement('time');
  if (typeof sent === 'string') {
    t.dateTime = sent;
    t.textContent = formatTime(sent);
    const d = new Date(sent);
    if (!Number.isNaN(d.getTime())) t.title = d.toLocaleString();
  }
  return t;
}

function span(className, text) {
  const s = document.createElement('span');
  s.className = className;
  s.textContent = text;
  return s;
}

/** One stored message (chat, joined, left) as a list item. */
function messageItem(msg) {
  const li = document.createElement('li');
  li.dataset.id = msg.id;
  li.dataset.type = msg.type;
  const mine = state.myIds.has(msg.memberId);
  if (msg.type === 'chat') {
    li.className = mine ? 'msg chat mine' : 'msg chat';
    const meta = document.createElement('div');
    meta.className = 'meta';
    meta.append(span('author', msg.memberName));
    if (mine) meta.append(' ', span('you', '(you)'));
    meta.append(' ', timeElement(msg.sent));
    const text = document.createElement('p');
    text.className = 'text';
    text.textContent = msg.message;
    li.append(meta, text);
  } else {
    li.className = mine ? 'msg notice mine' : 'msg notice';
    let what = `${msg.memberName} ${msg.type === 'joined' ? 'joined' : msg.type === 'left' ? 'left' : msg.type}`;
    if (mine && msg.type === 'joined') what = `You joined as ${msg.memberName}`;
    li.append(span('text', what), ' ', timeElement(msg.sent));
  }
  return li;
}

function nearBottom() {
  const s = el.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function scrollToBottom() {
  el.scroller.scrollTop = el.scroller.scrollHeight;
}

function announce(text) {
  const line = document.createElement('p');
  line.textContent = text;
  el.announcer.append(line);
  while (el.announcer.childElementCount > ANNOUNCED_KEPT) el.announcer.firstElementChild.remove();
  if (document.hidden) {
    state.unread += 1;
    updateTitle();
  }
}

function updateTitle() {
  const unread = state.unread ? `(${state.unread}) ` : '';
  document.title = `${unread}${state.roomName || 'Room'} — sharechat`;
}

document.addEventListener('visibilitychange', () => {
  if (!document.hidden && state.unread) {
    state.unread = 0;
    updateTitle();
  }
});

function renderMembers() {
  const entries = [...state.members].sort(([ida, a], [idb, b]) => {
    if (ida === state.memberId) return -1;
    if (idb === state.memberId) return 1;
    return a.localeCompare(b);
  });
  const items = entries.map(([id, name]) => {
    const li = document.createElement('li');
    li.textContent = name;
    if (id === state.memberId) {
      li.className = 'mine';
      li.append(' ', span('you', '(you)'));
    }
    return li;
  });
  el.members.replaceChildren(...items);
  el.memberCount.textContent = String(entries.length);
}

function applyPresence(msg) {
  if (msg.type === 'joined') state.members.set(msg.memberId, msg.memberName);
  else if (msg.type === 'left') state.members.delete(msg.memberId);
  else return;
  renderMembers();
}

/**
 * Show a stored message once, at the end of the log. Returns false for one
 * already shown: history, catch-up pages and live frames overlap on purpose.
 */
function appendStored(msg, { live }) {
  if (state.seen.has(msg.id)) return false;
  state.seen.add(msg.id);
  state.lastSeenId = msg.id;
  if (state.oldestId === null) state.oldestId = msg.id;
  if (msg.type === 'chat' && state.myIds.has(msg.memberId)) settlePending(msg);
  const stick = nearBottom() || (msg.type === 'chat' && msg.memberId === state.memberId);
  el.messages.append(messageItem(msg));
  if (stick) scrollToBottom();
  if (live && !state.myIds.has(msg.memberId)) {
    announce(msg.type === 'chat' ? `${msg.memberName}: ${msg.message}` : `${msg.memberName} ${msg.type}`);
  }
  return true;
}

// ---------------------------------------------------------------- sending

function pendingItem(text) {
  const li = document.createElement('li');
  li.className = 'msg chat mine pending';
  const meta = document.createElement('div');
  meta.className = 'meta';
  meta.append(span('author', state.memberName || 'You'), ' ', span('you', '(you)'), ' ', span('state', 'sending…'));
  const p = document.createElement('p');
  p.className = 'text';
  p.textContent = text;
  li.append(meta, p);
  return li;
}

/** The pending message a frame's ref names, or -1. */
function pendingIndex(msg) {
  return typeof msg.ref === 'string' ? state.pending.findIndex((p) => p.ref === msg.ref) : -1;
}

/** The echo of one of our own messages: it replaces the pending copy. */
function settlePending(msg) {
  let i = pendingIndex(msg);
  // No ref: the history shows what an earlier connection sent. Its text tells
  // which; failing that, the echoes come in the order we sent.
  if (i < 0 && typeof msg.ref !== 'string') {
    i = state.pending.findIndex((p) => p.memberId === msg.memberId && p.text === msg.message);
    if (i < 0) i = state.pending.findIndex((p) => p.memberId === msg.memberId);
  }
  if (i < 0) return;
  const [p] = state.pending.splice(i, 1);
  p.li.remove();
}

/** Mark a pending message as not sent, next to its text, with a way to retry. */
function failPending(p, reason) {
  state.pending.splice(state.pending.indexOf(p), 1);
  const li = p.li;
  li.classList.remove('pending');
  li.classList.add('failed');
  li.querySelector('.state').textContent = 'not sent';
  const why = document.createElement('p');
  why.className = 'reason';
  why.textContent = `Not sent: ${reason}`;
  const retry = document.createElement('button');
  retry.type = 'button';
  retry.className = 'retry';
  retry.textContent = 'Retry';
  retry.addEventListener('click', () => {
    if (sendText(p.text)) li.remove();
    else if (!el.input.value) el.input.value = p.text;
  });
  why.append(' ', retry);
  li.append(why);
  const stick = nearBottom();
  el.messages.append(li); // where it failed, in the flow of the room
  if (stick) scrollToBottom();
  announce(`Message not sent: ${reason}`);
}

/** A `failed` frame is about the message its ref names, and no other. */
function handleFailed(msg) {
  const i = pendingIndex(msg);
  if (i >= 0) {
    failPending(state.pending[i], msg.message);
    return;
  }
  const li = document.createElement('li');
  li.className = 'msg notice failed';
  li.append(span('text', `Not sent: ${msg.message}`), ' ', timeElement(msg.sent));
  el.messages.append(li);
  scrollToBottom();
  announce(`Not sent: ${msg.message}`);
}

function sendText(raw) {
  // Blank lines around a message are noise; indentation inside it is not.
  const text = raw.replace(/^(\s*\n)+/, '').replace(/\s+$/, '');
  if (!text || !state.live || !state.socket) return false;
  state.lastRef += 1;
  const ref = String(state.lastRef);
  state.socket.send(JSON.stringify({ text, ref }));
  const li = pendingItem(text);
  state.pending.push({ text, ref, memberId: state.memberId, li });
  el.outbox.append(li);
  scrollToBottom();
  return true;
}

function setLive(live) {
  state.live = live;
  el.send.disabled = !live;
}

el.composer.addEventListener('submit', (ev) => {
  ev.preventDefault();
  if (sendText(el.input.value)) el.input.value = '';
  el.input.focus();
});

el.input.addEventListener('keydown', (ev) => {
  // Enter sends; Shift+Enter (and Enter while an IME is composing) does not.
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
    ev.preventDefault();
    el.composer.requestSubmit();
  }
});

// ---------------------------------------------------------------- sharing

async function copyLink() {
  const url = el.shareLink.value;
  let ok = false;
  try {
    await navigator.clipboard.writeText(url);
    ok = true;
  } catch {
    // No clipboard API (plain http on a LAN address): the old way.
    el.shareLink.select();
    try {
      ok = document.execCommand('copy');
    } catch {
      ok = false;
    }
  }
  el.copyStatus.textContent = ok ? 'Link copied' : 'Select the link and copy it';
  if (!ok) {
    el.shareLink.parentElement.classList.add('manual');
    el.shareLink.select();
  }
}

$('copy-link').addEventListener('click', copyLink);
el.shareLink.addEventListener('focus', () => el.shareLink.select());
if (navigator.share) {
  const b = $('share-link-button');
  b.hidden = false;
  b.addEventListener('click', () => {
    navigator.share({ title: `${state.roomName} — sharechat`, url: el.shareLink.value }).catch(() => {});
  });
}

// ---------------------------------------------------------------- history

async function fetchLatest() {
  const page = await requestJSON(`${apiRoom}/messages?limit=${HISTORY_PAGE}`);
  return { messages: page, hasEarlier: page.length >= HISTORY_PAGE };
}

/** Everything stored after `cursor`, in pages; falls back to the latest page. */
async function fetchAfter(cursor) {
  const all = [];
  for (;;) {
    let page;
    try {
      page = await requestJSON(`${apiRoom}/messages?after=${encodeURIComponent(cursor)}&limit=${GAP_PAGE}`);
    } catch (err) {
      if (err instanceof HttpError && err.status === 400 && all.length === 0) return fetchLatest();
      throw err;
    }
    all.push(...page);
    if (page.length < GAP_PAGE) return { messages: all, hasEarlier: null };
    cursor = page[page.length - 1].id;
  }
}

el.loadEarlier.addEventListener('click', async () => {
  if (!state.oldestId) return;
  el.loadEarlier.disabled = true;
  try {
    const page = await requestJSON(
      `${apiRoom}/messages?before=${encodeURIComponent(state.oldestId)}&limit=${HISTORY_PAGE}`,
    );
    const fresh = page.filter((m) => isMessage(m) && m.type !== 'failed' && !state.seen.has(m.id));
    const before = el.scroller.scrollHeight;
    const items = fresh.map((m) => {
      state.seen.add(m.id);
      return messageItem(m);
    });
    el.messages.prepend(...items);
    el.scroller.scrollTop += el.scroller.scrollHeight - before; // keep the reader's place
    if (page.length) state.oldestId = page[0].id;
    el.loadEarlier.hidden = page.length < HISTORY_PAGE;
  } catch (err) {
    if (err instanceof HttpError && err.status === 404) showMissing();
  } finally {
    el.loadEarlier.disabled = false;
  }
});

// ---------------------------------------------------------------- connection

function setConnection(text, { canRetry = false } = {}) {
  el.connection.hidden = !text;
  el.connectionText.textContent = text;
  el.reconnectNow.hidden = !canRetry;
}

el.reconnectNow.addEventListener('click', () => state.wake && state.wake());
window.addEventListener('online', () => state.wake && state.wake());
document.addEventListener('visibilitychange', () => {
  if (!document.hidden && state.wake) state.wake();
});
window.addEventListener('offline', () => {
  if (!state.live) setConnection('You are offline. Waiting for the network…');
});

function wsUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/api/serve/${encodeURIComponent(roomId)}`;
}

/**
 * Catch up after our own `joined` arrived: the member list and the messages we
 * have not seen, while live frames wait in `buffer`. History is read after the
 * socket is open, so the two overlap and nothing falls between them; the
 * overlap is dropped by message id.
 */
async function catchUp(buffer) {
  const [room, history] = await Promise.all([
    requestJSON(apiRoom),
    state.lastSeenId ? fetchAfter(state.lastSeenId) : fetchLatest(),
  ]);
  state.members = new Map(room.members.map((m) => [m.id, m.name]));
  for (const msg of history.messages) {
    if (isMessage(msg) && msg.type !== 'failed') appendStored(msg, { live: false });
  }
  if (history.hasEarlier !== null) el.loadEarlier.hidden = !history.hasEarlier;
  // Whatever an earlier connection sent and the history did not show was lost.
  for (const p of [...state.pending]) {
    if (p.memberId !== state.memberId) failPending(p, 'the connection was lost before the server confirmed it.');
  }
  // Frames that came in meanwhile: presence is replayed over the snapshot
  // (joined/left are idempotent), messages are shown if the history had not.
  while (buffer.length) handleFrame(buffer.shift(), { live: true });
  renderMembers();
}

function handleFrame(msg, { live }) {
  if (msg.type === 'failed') {
    handleFailed(msg);
    return;
  }
  applyPresence(msg);
  appendStored(msg, { live });
}

/** One websocket's life; resolves once it is closed and its catch-up is done. */
function connectOnce() {
  return new Promise((resolve) => {
    let ws;
    try {
      ws = new WebSocket(wsUrl(), PROTOCOL);
    } catch {
      resolve(false);
      return;
    }
    state.socket = ws;
    let joined = false;
    let buffer = null; // live frames held while catching up
    let broken = false; // catch-up failed: this socket's frames must not be shown
    let sync = Promise.resolve();

    ws.addEventListener('message', (ev) => {
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (!isMessage(msg) || broken) return;
      if (!joined) {
        // The first frame is our own `joined`: who we are on this connection.
        if (msg.type !== 'joined') {
          broken = true;
          ws.close(4000, 'expected joined first');
          return;
        }
        joined = true;
        state.memberId = msg.memberId;
        state.memberName = msg.memberName;
        state.myIds.add(msg.memberId);
        el.myName.textContent = msg.memberName;
        buffer = [msg];
        sync = catchUp(buffer).then(
          () => {
            buffer = null;
            if (ws.readyState === WebSocket.OPEN) {
              setLive(true);
              setConnection('');
            }
          },
          (err) => {
            // A gap we could not fill: drop this connection and its frames (the
            // next catch-up, from the same cursor, brings them), start over.
            broken = true;
            buffer = null;
            if (err instanceof HttpError && err.status === 404) showMissing();
            else ws.close(4000, 'catch-up failed');
          },
        );
        return;
      }
      if (buffer) buffer.push(msg);
      else handleFrame(msg, { live: true });
    });

    ws.addEventListener('close', () => {
      setLive(false);
      if (state.socket === ws) state.socket = null;
      for (const p of state.pending) p.li.querySelector('.state').textContent = 'waiting for the connection…';
      sync.finally(() => resolve(joined));
    });
  });
}

function backoff(attempt) {
  // Exponential, capped, with jitter so a room's members do not all come back at once.
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

function wait(ms) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      state.wake = null;
      resolve();
    };
    const timer = setTimeout(done, ms);
    state.wake = done;
  });
}

/** Does the room still exist? true, false (404), or null (cannot tell). */
async function roomExists() {
  try {
    await requestJSON(apiRoom);
    return true;
  } catch (err) {
    return err instanceof HttpError && err.status === 404 ? false : null;
  }
}

async function connectionLoop() {
  let attempt = 0;
  for (;;) {
    const wasJoined = await connectOnce();
    if (state.gone) return;
    if (wasJoined) attempt = 0;
    if ((await roomExists()) === false) {
      showMissing();
      return;
    }
    const delay = backoff(attempt);
    attempt += 1;
    const offline = navigator.onLine === false;
    setConnection(
      offline
        ? 'You are offline. Waiting for the network…'
        : `Connection lost. Reconnecting in ${Math.ceil(delay / 1000)} s…`,
      { canRetry: true },
    );
    await wait(delay);
    if (state.gone) return;
    setConnection('Reconnecting…');
  }
}

// ---------------------------------------------------------------- start

async function open() {
  if (!roomId) {
    showMissing();
    return;
  }
  let room;
  try {
    room = await requestJSON(apiRoom);
  } catch (err) {
    if (err instanceof HttpError && err.status === 404) {
      showMissing();
    } else {
      el.loadErrorText.textContent = err.message;
      show(el.loadError);
    }
    return;
  }
  state.roomName = room.roomName;
  updateTitle();
  el.roomName.textContent = room.roomName;
  el.shareLink.value = location.origin + location.pathname;
  const wide = window.matchMedia('(min-width: 48rem)').matches;
  el.membersBox.open = wide;
  if (wide) el.input.placeholder = 'Message — Enter sends, Shift+Enter for a new line';
  state.members = new Map(room.members.map((m) => [m.id, m.name]));
  renderMembers();
  show(el.room);
  setConnection('Connecting…');
  // With a mouse, ready to type; on a touch screen, no keyboard popping up unasked.
  if (window.matchMedia('(pointer: fine)').matches) el.input.focus();
  connectionLoop();
}

open();
