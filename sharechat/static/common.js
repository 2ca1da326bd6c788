// Shared by the landing page and the room page: the few API calls both need.

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** GET or POST JSON; a non-2xx answer throws HttpError with the server's `error` text. */
export async function requestJSON(url, options = {}) {
  const res = await fetch(url, {
    ...options,
    headers: { Accept: 'application/json' },
    cache: 'no-store',
  });
  if (!res.ok) {
    let text = `HTTP ${res.status}`;
    try {
      const body = await res.json();
      if (body && typeof body.error === 'string') text = body.error;
    } catch {
      // not JSON: keep the status line
    }
    throw new HttpError(res.status, text);
  }
  return res.json();
}

export function roomPath(roomId) {
  return '/r/' + encodeURIComponent(roomId);
}

/** POST /api/room, then go to the new room. */
export function wireNewRoomButton(button, statusEl) {
  const label = button.textContent;
  button.addEventListener('click', async () => {
    button.disabled = true;
    button.textContent = 'Creating…';
    statusEl.textContent = '';
    try {
      const room = await requestJSON('/api/room', { method: 'POST' });
      location.assign(roomPath(room.roomId));
    } catch (err) {
      statusEl.textContent = `Could not create a room: ${err.message}. Try again in a moment.`;
      button.disabled = false;
      button.textContent = label;
    }
  });
}
