import { wireNewRoomButton } from '/static/common.js';

wireNewRoomButton(document.getElementById('new-room'), document.getElementById('new-room-status'));

// The terminal hints name the server the page came from.
const wsOrigin = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host;
for (const el of document.querySelectorAll('.origin')) el.textContent = location.origin;
for (const el of document.querySelectorAll('.ws-origin')) el.textContent = wsOrigin;
