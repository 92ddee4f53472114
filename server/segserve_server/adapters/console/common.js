// Shared pieces of the console's modules: the API call with the token, DOM helpers, formats.

export const TOKEN_KEY = "segserve.token";

export const $ = (id) => document.getElementById(id);

/** A failed call: the HTTP status (0 when the server was not reached), the code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  describe() {
    const where = this.status ? `HTTP ${this.status}${this.code ? " " + this.code : ""}` : this.code;
    return `${where}: ${this.message}`;
  }
}

export function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** fetch() with the token; a non-2xx answer throws ApiError with the server's own message. */
export async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...options.headers } });
  } catch (err) {
    throw new ApiError(0, "UNREACHABLE", `could not reach the server (${err.message})`);
  }
  if (!response.ok) {
    const text = await response.text();
    let code = "";
    let message = text.trim();
    try {
      const body = JSON.parse(text);
      message = String(body.error ?? body.message ?? text);
      code = String(body.code ?? "");
    } catch {
      // not JSON (a proxy's page, say): its text is the message
    }
    if (message.length > 2000) message = message.slice(0, 2000) + "…";
    throw new ApiError(response.status, code || response.statusText, message || "(empty answer)");
  }
  return response;
}

export function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "style") Object.assign(node.style, value);
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

export function rgb(colour) {
  return `rgb(${colour[0]}, ${colour[1]}, ${colour[2]})`;
}

export function bump(node, attribute) {
  node.dataset[attribute] = String(Number(node.dataset[attribute] || 0) + 1);
}

export function formatDuration(seconds) {
  const s = Math.floor(seconds);
  const [d, h, m] = [Math.floor(s / 86400), Math.floor(s / 3600) % 24, Math.floor(s / 60) % 60];
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  return m ? `${m}m ${s % 60}s` : `${s}s`;
}

export function clock() {
  return new Date().toLocaleTimeString();
}
