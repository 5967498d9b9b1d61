// llproxy's operator page: the queue of requests waiting for a person, the conversation of
// the one being answered, and the controls to answer it. It speaks the operator protocol
// (version 1, in the README) over the WebSocket /operator/ws.
//
// Conversation content is untrusted: it is only ever put in the page as text
// (textContent, text nodes, input values), never as HTML.
"use strict";

const RECONNECT_DELAYS_MS = [1000, 2000, 4000, 8000, 15000]; // the last one repeats
const URGENT_SECONDS = 30;
const MAX_NOTICES = 6;
// How long a notice stays before it vanishes by itself, by kind (ms).
const NOTICE_MS = { info: 6000, warning: 12000, error: 20000 };
const CONFIRM_MS = 4000; // a second click within this long confirms a reject or hand-off
const CLOSE_UNAUTHORIZED = 4401; // the server's: no valid operator key
const CLOSE_TOO_MANY_SIGN_INS = 4429; // the server's: this address failed too often
const CLOSE_GOING_AWAY = 1001; // the server's: this worker is retiring, reconnect
const KNOWN_ROLES = ["system", "developer", "user", "assistant", "tool"];

const state = {
  // The operator key lives in this variable only: not in the URL, not in storage. A
  // reload asks for it again; the browser's password manager can fill it in.
  token: null,
  socket: null,
  operator: null, // our name, from hello
  connectedAt: 0, // when hello came (0: not connected)
  goneAwayAt: -Infinity, // when a retiring worker last closed our socket (1001)
  failures: 0, // connection attempts in a row that ended without a hello
  reconnectTimer: null,
  requests: new Map(), // id → a request as the server describes it, plus local fields
  current: null, // the request shown in the main area (it may have ended since)
  held: new Set(), // ids of the requests this connection holds a claim on
  reclaim: new Set(), // ids held when the connection dropped: claimed again once back
  pending: new Map(), // command id → the command, until its ack or refusal
  nextCommandId: 1,
  toolInputs: [], // the inputs of the tool-call form, built from the tool's schema
  ring: false, // ring (and notify when the tab is hidden) on each new request
  audio: null, // the AudioContext made by the click that turned ringing on
  rings: 0, // how many times it rang (for the tests)
};

// --- small helpers ----------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

// An element with properties set from code and children appended as nodes or as text.
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "for" || name === "role" || name.startsWith("aria-") || name.startsWith("data-")) {
      node.setAttribute(name, value);
    } else node[name] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// The protocol counts characters as Unicode code points; a JS string's length counts
// UTF-16 units (an emoji is 2).
const codePoints = (text) => Array.from(text).length;
const afterCodePoints = (text, count) => Array.from(text).slice(count).join("");

const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);
const now = () => performance.now();

function formatSeconds(seconds) {
  const whole = Math.max(0, Math.ceil(seconds));
  const minutes = Math.floor(whole / 60);
  return `${minutes}:${String(whole % 60).padStart(2, "0")}`;
}

function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return String(text);
  }
}

// --- the connection ---------------------------------------------------------------------

function signIn(event) {
  event.preventDefault();
  const input = $("token");
  const token = input.value.trim();
  if (!token) {
    $("login-error").textContent = "Enter your operator key.";
    input.focus();
    return;
  }
  input.value = "";
  $("login-error").textContent = "";
  state.token = token;
  state.failures = 0;
  $("sign-out").hidden = false;
  connect();
}

function signOut(why = "") {
  state.token = null;
  clearTimeout(state.reconnectTimer);
  const socket = state.socket;
  state.socket = null;
  if (socket) socket.close(1000, "signed out");
  forgetDesk();
  state.operator = null;
  $("sign-out").hidden = true;
  $("desk-view").hidden = true;
  $("login-view").hidden = false;
  $("login-error").textContent = why;
  showConnection("Signed out", "off");
  $("token").focus();
}

function connect() {
  clearTimeout(state.reconnectTimer);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/operator/ws`);
  state.socket = socket;
  state.connectedAt = 0;
  showConnection(state.failures ? "Reconnecting…" : "Connecting…", "pending");
  // A browser cannot set headers on a WebSocket: the key goes in the first message.
  socket.addEventListener("open", () => socket.send(JSON.stringify({ type: "auth", token: state.token })));
  socket.addEventListener("message", (message) => {
    if (socket === state.socket) receive(message.data);
  });
  socket.addEventListener("close", (closed) => {
    if (socket === state.socket) connectionClosed(closed);
  });
}

function connectionClosed(closed) {
  state.socket = null;
  state.connectedAt = 0;
  // The server gives our claims back to the queue; claim them again once back.
  for (const id of state.held) state.reclaim.add(id);
  state.held.clear();
  state.pending.clear();
  renderAll();
  if (closed.code === CLOSE_TOO_MANY_SIGN_INS) {
    signOut(`Too many failed sign-ins from this address: ${closed.reason}.`);
    return;
  }
  if (closed.code === CLOSE_UNAUTHORIZED) {
    // A key revoked, expired or deleted while the socket was open: the reason says which.
    const lapsed = closed.reason.startsWith("the operator key ");
    signOut(lapsed ? `Signed out: ${closed.reason}.` : "That is not an operator key.");
    return;
  }
  if (state.token === null) return;
  // A retiring worker: another one takes us at once (unless they all seem to be going).
  if (closed.code === CLOSE_GOING_AWAY && now() - state.goneAwayAt > 5000) {
    state.goneAwayAt = now();
    notify("This llproxy worker is retiring: reconnecting to another one.", "info");
    connect();
    return;
  }
  const delay = RECONNECT_DELAYS_MS[Math.min(state.failures, RECONNECT_DELAYS_MS.length - 1)];
  state.failures += 1;
  showConnection(`Disconnected: reconnecting in ${Math.round(delay / 1000)} s…`, "off");
  state.reconnectTimer = setTimeout(connect, delay);
}

function showConnection(text, kind) {
  const status = $("connection");
  status.textContent = text;
  status.className = `connection state-${kind}`;
}

function connected() {
  return state.socket !== null && state.socket.readyState === WebSocket.OPEN && state.connectedAt > 0;
}

// Send a command; its ack or refusal comes back with the same id.
function sendCommand(type, requestId, fields = {}) {
  if (!connected()) {
    notify("Not connected: wait until the page has reconnected.", "error");
    return null;
  }
  const command = { type, id: state.nextCommandId++, request: requestId, ...fields };
  state.pending.set(command.id, command);
  state.socket.send(JSON.stringify(command));
  return command.id;
}

function receive(data) {
  let event;
  try {
    event = JSON.parse(data);
  } catch {
    return;
  }
  if (isObject(event)) handleServerEvent(event);
}

// --- the one place that handles what the server says ---------------------------------------

function handleServerEvent(event) {
  switch (event.type) {
    case "hello":
      state.operator = event.operator;
      state.connectedAt = now();
      state.failures = 0;
      $("login-view").hidden = true;
      $("desk-view").hidden = false;
      showConnection(`Connected as ${event.operator}`, "on");
      break;
    case "snapshot":
      loadSnapshot(event.requests || []);
      break;
    case "added":
      storeRequest(event.request);
      renderQueue();
      ring(event.request);
      break;
    case "claimed":
      requestClaimed(event);
      break;
    case "released":
      requestReleased(event);
      break;
    case "cancelled":
      requestEnded(event.request, "The client left: stop answering, nothing more reaches it.", "warning");
      break;
    case "removed":
      requestEnded(event.request, describeRemoval(event), "info");
      break;
    case "timed_out":
      requestEnded(event.request, describeTimeout(event), "warning");
      break;
    case "deadline":
      deadlineNear(event);
      break;
    case "ack":
      commandDone(event);
      break;
    case "refused":
      commandRefused(event);
      break;
    case "stats":
      showStats(event);
      break;
    case "error":
      notify(`The server says: ${event.message}`, "error");
      break;
  }
}

// The queue's numbers, as the server counts them every few seconds.
function showStats(event) {
  const waiting = Number(event.waiting) || 0;
  const online = Number(event.operators_online) || 0;
  const parts = [`${waiting} waiting`];
  if (waiting) parts.push(`oldest ${formatSeconds(Number(event.oldest_wait) || 0)}`);
  parts.push(`${online} operator${online === 1 ? "" : "s"} online`);
  $("queue-stats").textContent = parts.join(" · ");
}

function loadSnapshot(requests) {
  const shown = state.current;
  state.requests.clear();
  for (const request of requests) storeRequest(request);
  if (shown && !state.requests.has(shown.id) && !shown.ended) {
    markEnded(shown, "It ended while this page was disconnected.");
  } else if (shown && state.requests.has(shown.id)) {
    const fresh = state.requests.get(shown.id);
    // Text we typed that the server may not have got: kept, to go out once claimed again.
    if (state.reclaim.has(fresh.id) && shown.text.startsWith(fresh.text)) fresh.text = shown.text;
    state.current = fresh;
  }
  for (const id of [...state.reclaim]) {
    const request = state.requests.get(id);
    if (!request) {
      state.reclaim.delete(id);
    } else if (request.state === "queued") {
      claimAgain(request);
    } else if (request.operator !== state.operator) {
      state.reclaim.delete(id);
      notify(`${request.operator} claimed the request you were answering.`, "warning");
    } // else: our old connection still holds it, until the server sees it gone (released)
  }
  renderAll();
}

function storeRequest(request) {
  if (!isObject(request) || typeof request.id !== "string") return null;
  const stored = {
    ...request,
    messages: Array.isArray(request.messages) ? request.messages : [],
    tools: Array.isArray(request.tools) ? request.tools : [],
    text: typeof request.text === "string" ? request.text : "",
    tool_calls: Array.isArray(request.tool_calls) ? request.tool_calls : [],
    acked: 0, // characters of the answer the server confirmed
    deadlineAt: null,
    ended: null,
  };
  stored.acked = codePoints(stored.text);
  setDeadline(stored, request.deadline_in);
  state.requests.set(stored.id, stored);
  return stored;
}

function setDeadline(request, seconds) {
  request.deadlineAt = typeof seconds === "number" ? now() + seconds * 1000 : null;
}

function requestClaimed(event) {
  const request = state.requests.get(event.request);
  if (!request) return;
  request.state = request.text || request.tool_calls.length ? "answering" : "claimed";
  request.operator = event.by;
  setDeadline(request, event.deadline_in);
  if (claimPending(request.id)) {
    // Our own claim: its ack follows.
  } else if (state.reclaim.delete(request.id)) {
    notify(`${event.by} claimed the request you were answering.`, "warning");
  } else if (state.current === request && event.by !== state.operator) {
    notify(`${event.by} claimed the request you are viewing.`, "info");
  }
  renderAll();
}

function requestReleased(event) {
  const request = state.requests.get(event.request);
  if (!request) return;
  request.state = "queued";
  request.operator = null;
  setDeadline(request, event.deadline_in);
  state.held.delete(request.id);
  if (state.reclaim.has(request.id)) claimAgain(request);
  renderAll();
}

function claimPending(id) {
  return [...state.pending.values()].some((c) => c.type === "claim" && c.request === id);
}

function claimAgain(request) {
  if (sendCommand("claim", request.id) !== null) notify("Reconnected: claiming your request again.", "info");
}

function describeRemoval(event) {
  if (state.held.has(event.request)) {
    return {
      done: "Finished: the answer reached the client.",
      rejected: "Rejected: the client got your message as an error.",
      "handed off": "Handed off: a model answers the client instead.",
    }[event.outcome] || `Ended: ${event.outcome}.`;
  }
  const by = event.by || "someone";
  return event.outcome === "done" ? `${by} finished this request.` : `${by}: ${event.outcome}.`;
}

function describeTimeout(event) {
  const why =
    event.waited === "queue_timeout"
      ? "Timed out: nobody claimed it in time"
      : "Timed out: nothing was sent for too long (idle timeout)";
  return event.fallback
    ? `${why}; the model ${event.fallback} answers the client instead.`
    : `${why}; the client got a timeout error.`;
}

// A request left the desk: gone from the queue; if we hold or show it, say how it ended.
function requestEnded(id, text, kind) {
  const request = state.requests.get(id);
  const mine = state.held.has(id) || state.reclaim.has(id);
  state.requests.delete(id);
  state.held.delete(id);
  state.reclaim.delete(id);
  if (request && (mine || state.current === request)) {
    markEnded(request, text);
    notify(text, kind);
  }
  renderAll();
}

function markEnded(request, text) {
  request.ended = text;
  request.deadlineAt = null;
}

function deadlineNear(event) {
  const request = state.requests.get(event.request);
  if (!request) return;
  setDeadline(request, event.in);
  if (state.held.has(request.id)) {
    notify(
      `${Math.round(event.in)} s left on the request you hold: send something, or it times out.`,
      "warning",
    );
  }
  renderAll();
}

function commandDone(ack) {
  const command = state.pending.get(ack.id);
  state.pending.delete(ack.id);
  if (!command) return;
  const request = state.requests.get(command.request);
  if (request && typeof ack.deadline_in === "number") setDeadline(request, ack.deadline_in);
  switch (command.type) {
    case "claim":
      if (request) claimGranted(request, ack);
      break;
    case "delta":
      if (request && typeof ack.length === "number") request.acked = ack.length;
      break;
    case "tool_call":
      if (request) {
        request.tool_calls.push({
          id: ack.call_id,
          name: command.name,
          arguments: JSON.stringify(command.arguments),
        });
        $("tool-error").textContent = "";
        $("tool-sent").textContent = `Sent ${command.name} (${ack.call_id}).`;
      }
      break;
    case "release":
      notify("Released: the request is back in the queue.", "info");
      break;
  }
  renderAll();
}

function claimGranted(request, ack) {
  state.held.add(request.id);
  const wasReclaim = state.reclaim.delete(request.id);
  // What reached the client so far is the server's to say (another operator may have
  // begun the answer, or some of ours was lost with the connection).
  const ours = request.text;
  if (typeof ack.text === "string") {
    request.text = ack.text;
    request.acked = codePoints(ack.text);
  }
  if (Array.isArray(ack.tool_calls)) request.tool_calls = ack.tool_calls;
  request.state = request.text || request.tool_calls.length ? "answering" : "claimed";
  request.operator = state.operator;
  const switching = state.current !== request;
  state.current = request;
  renderAll();
  if (switching || wasReclaim) {
    $("answer-text").focus();
    moveCaretToEnd();
  }
  // Back after a dropped connection: what we typed that never arrived goes out now.
  if (wasReclaim && ours.length > request.text.length && ours.startsWith(request.text)) {
    $("answer-text").value = ours;
    answerEdited();
  }
  if (request.text && !wasReclaim) {
    notify(`${codePoints(request.text)} characters were sent already: go on from there.`, "info");
  }
}

function commandRefused(refusal) {
  const command = state.pending.get(refusal.id);
  state.pending.delete(refusal.id);
  const reason = String(refusal.reason || "refused");
  const type = command ? command.type : refusal.command;
  if (type === "delta") {
    deltaRefused(command, reason);
  } else if (type === "tool_call") {
    $("tool-sent").textContent = "";
    $("tool-error").textContent = `Refused: ${reason}`;
  } else if (type === "claim") {
    if (command) state.reclaim.delete(command.request);
    notify(`Could not claim it: ${reason}.`, "warning");
  } else {
    notify(`${type} refused: ${reason}`, "error");
  }
  renderAll();
}

// A delta the server would not take. Past the end: it has fewer characters than we sent
// (it says how many); send the rest again from there.
function deltaRefused(command, reason) {
  const request = command && state.requests.get(command.request);
  if (!request || request.ended) return; // the end of the request was told already
  const gap = /past the (\d+) characters/.exec(reason);
  if (gap && state.held.has(request.id)) {
    const length = Number(gap[1]);
    request.acked = length;
    sendCommand("delta", request.id, { text: afterCodePoints(request.text, length), offset: length });
    notify(`The server had ${length} characters of your answer: resent the rest from there.`, "info");
    return;
  }
  notify(`Text not sent: ${reason}`, "error");
}

// --- answering ------------------------------------------------------------------------------

function heldCurrent() {
  const request = state.current;
  return request && !request.ended && state.held.has(request.id) && connected() ? request : null;
}

const SENT_NOTICE = "Sent text cannot be taken back: it has reached the client. Type on after it (Ctrl+End).";

// Only additions at the end are ever sent. Deletions, undo, and typing inside the text
// already sent are stopped before they happen, the caret left where it was: moving it to
// the end would send the next keys typed there, a word the operator meant for elsewhere.
// `answerEdited` puts the sent text back should anything else change it.
function answerBeforeInput(event) {
  const request = heldCurrent();
  if (!request || event.isComposing) return;
  const box = $("answer-text");
  const sentUnits = request.text.length; // UTF-16 units, as selectionStart counts
  const appending = event.inputType.startsWith("insert") && box.selectionStart >= sentUnits;
  if (!appending) {
    event.preventDefault();
    showAnswerNotice(SENT_NOTICE);
  }
}

function answerEdited(event) {
  if (event && event.isComposing) return; // sent when the composition ends
  const request = heldCurrent();
  const box = $("answer-text");
  if (!request) return;
  const typed = box.value;
  if (typed.startsWith(request.text)) {
    const added = typed.slice(request.text.length);
    if (added) {
      sendCommand("delta", request.id, { text: added, offset: codePoints(request.text) });
      request.text = typed;
      request.state = "answering";
      hideAnswerNotice();
    }
  } else {
    // Undone, nothing sent; the caret goes back to where the change began.
    const caret = Math.max(0, Math.min(box.selectionStart - (typed.length - request.text.length), request.text.length));
    box.value = request.text;
    box.setSelectionRange(caret, caret);
    showAnswerNotice(SENT_NOTICE);
  }
  renderAnswerInfo(request);
}

function moveCaretToEnd() {
  const box = $("answer-text");
  box.setSelectionRange(box.value.length, box.value.length);
}

function showAnswerNotice(text) {
  const notice = $("answer-notice");
  notice.textContent = text;
  notice.hidden = false;
}

function hideAnswerNotice() {
  $("answer-notice").hidden = true;
}

function finishAnswer(event) {
  event.preventDefault();
  const request = heldCurrent();
  if (!request) return;
  const reason = $("finish-reason").value;
  sendCommand("finish", request.id, reason ? { reason } : {});
}

// A destructive button asks once more: the first click turns it into "Confirm …" (its
// title says what exactly), which goes back by itself after a few seconds.
function confirmed(form, label, what) {
  const button = form.querySelector("button[type=submit]");
  if (button.classList.contains("confirming")) {
    resetConfirm(button);
    return true;
  }
  button.dataset.label = button.textContent;
  button.textContent = `Confirm ${label}`;
  button.title = `Click again to ${what}`;
  button.classList.add("confirming");
  button.dataset.timer = String(setTimeout(() => resetConfirm(button), CONFIRM_MS));
  return false;
}

function resetConfirm(button) {
  if (!button.classList.contains("confirming")) return;
  clearTimeout(Number(button.dataset.timer));
  button.textContent = button.dataset.label;
  button.title = "";
  button.classList.remove("confirming");
}

function rejectRequest(event) {
  event.preventDefault();
  const request = state.current;
  if (!request || !canTriage(request)) return;
  if (!confirmed($("reject-form"), "reject", "reject the request")) return;
  const message = $("reject-message").value.trim();
  sendCommand("reject", request.id, message ? { message } : {});
}

function handOff(event) {
  event.preventDefault();
  const request = state.current;
  if (!request || !canTriage(request)) return;
  const model = $("handoff-model").value.trim();
  if (!model) {
    notify("Name the model to hand the request to.", "error");
    $("handoff-model").focus();
    return;
  }
  if (!confirmed($("handoff-form"), "hand-off", `hand the request off to ${model}`)) return;
  sendCommand("handoff", request.id, { model, mode: $("handoff-mode").value });
}

function releaseRequest() {
  const request = heldCurrent();
  if (request) sendCommand("release", request.id);
}

// Reject and hand off work on a request nobody holds, too: triage from the queue.
function canTriage(request) {
  if (request.ended || !connected()) return false;
  return state.held.has(request.id) || request.state === "queued";
}

// --- the tool-call form, built from the tool's JSON Schema -------------------------------

function offeredTools(request) {
  return request.tools.map((tool) => (isObject(tool) ? tool.function : null)).filter(
    (fn) => isObject(fn) && typeof fn.name === "string",
  );
}

function renderToolForm(request) {
  const tools = offeredTools(request);
  const form = $("tool-form");
  const select = $("tool-name");
  form.hidden = tools.length === 0;
  if (select.dataset.request === request.id) return; // built already: keep what is typed
  select.dataset.request = request.id;
  select.replaceChildren(...tools.map((fn) => el("option", { value: fn.name }, fn.name)));
  $("tool-error").textContent = "";
  $("tool-sent").textContent = "";
  renderToolFields();
}

function selectedTool() {
  const request = state.current;
  const name = $("tool-name").value;
  return request ? offeredTools(request).find((fn) => fn.name === name) || null : null;
}

// The input for each property: string → text, integer/number → number, boolean → checkbox,
// enum → select, anything else (objects, arrays, unions) → JSON in a textarea.
function renderToolFields() {
  const fn = selectedTool();
  const fields = $("tool-fields");
  state.toolInputs = [];
  fields.replaceChildren();
  $("tool-description").textContent = fn && typeof fn.description === "string" ? fn.description : "";
  if (!fn) return;
  const schema = isObject(fn.parameters) ? fn.parameters : {};
  const required = new Set(Array.isArray(schema.required) ? schema.required : []);
  if (!isObject(schema.properties)) {
    const input = { name: null, kind: "arguments", required: true, schema };
    fields.append(fieldFor(input, 0));
    return;
  }
  Object.entries(schema.properties).forEach(([name, property], index) => {
    const input = {
      name,
      kind: fieldKind(isObject(property) ? property : {}),
      required: required.has(name),
      schema: isObject(property) ? property : {},
    };
    fields.append(fieldFor(input, index));
  });
}

function fieldKind(property) {
  if (Array.isArray(property.enum) && property.enum.length) return "enum";
  let type = property.type;
  if (Array.isArray(type)) {
    const concrete = type.filter((t) => t !== "null");
    type = concrete.length === 1 ? concrete[0] : null;
  }
  return ["string", "integer", "number", "boolean"].includes(type) ? type : "json";
}

function fieldFor(input, index) {
  const id = `tool-field-${index}`;
  const hintId = `${id}-hint`;
  const property = input.schema;
  const hints = [];
  if (typeof property.description === "string") hints.push(property.description);
  if (input.kind === "json") hints.push(`JSON${typeof property.type === "string" ? ` (${property.type})` : ""}`);
  if (input.kind === "arguments") hints.push("The arguments as a JSON object.");
  if (property.default !== undefined) hints.push(`default: ${JSON.stringify(property.default)}`);
  const labelText = input.name === null ? "Arguments" : input.name;
  const label = el("label", { for: id }, labelText, input.required ? el("span", { class: "required" }, " (required)") : null);
  let control;
  if (input.kind === "enum") {
    control = el("select", { id }, el("option", { value: "" }, "— choose —"));
    property.enum.forEach((value, i) => {
      control.append(el("option", { value: String(i) }, typeof value === "string" ? value : JSON.stringify(value)));
    });
  } else if (input.kind === "boolean") {
    control = el("input", { id, type: "checkbox" });
  } else if (input.kind === "integer" || input.kind === "number") {
    control = el("input", { id, type: "number", step: input.kind === "integer" ? "1" : "any" });
  } else if (input.kind === "string") {
    control = el("input", { id, type: "text" });
  } else {
    control = el("textarea", { id, rows: 3, spellcheck: false, placeholder: input.kind === "arguments" ? "{}" : "" });
  }
  if (input.name !== null) control.dataset.property = input.name;
  if (input.required) control.setAttribute("aria-required", "true");
  if (hints.length) control.setAttribute("aria-describedby", hintId);
  input.node = control;
  state.toolInputs.push(input);
  const field = el("div", { class: `field kind-${input.kind}` });
  if (input.kind === "boolean") field.append(el("div", { class: "check" }, control, label));
  else field.append(label, control);
  if (hints.length) field.append(el("p", { id: hintId, class: "hint" }, hints.join(" · ")));
  return field;
}

// The arguments object from the form. Empty fields are left out (the schema says whether
// they may be); whether the arguments fit the schema is the server's to say.
function collectArguments() {
  const args = {};
  for (const input of state.toolInputs) {
    const node = input.node;
    if (input.kind === "boolean") {
      args[input.name] = node.checked;
      continue;
    }
    if (input.kind === "number" || input.kind === "integer") {
      if (node.validity.badInput) throw new Error(`${input.name}: not a number`);
      if (node.value.trim() !== "") args[input.name] = Number(node.value);
      continue;
    }
    if (input.kind === "enum") {
      if (node.value !== "") args[input.name] = input.schema.enum[Number(node.value)];
      continue;
    }
    if (input.kind === "string") {
      if (node.value !== "") args[input.name] = node.value;
      continue;
    }
    const text = node.value.trim();
    if (text === "") continue;
    let value;
    try {
      value = JSON.parse(text);
    } catch (error) {
      throw new Error(`${input.name || "arguments"}: not valid JSON (${error.message})`);
    }
    if (input.kind === "arguments") {
      if (!isObject(value)) throw new Error("arguments: a JSON object is needed");
      return value;
    }
    args[input.name] = value;
  }
  return args;
}

function sendToolCall(event) {
  event.preventDefault();
  const request = heldCurrent();
  const fn = selectedTool();
  if (!request || !fn) return;
  $("tool-sent").textContent = "";
  let args;
  try {
    args = collectArguments();
  } catch (error) {
    $("tool-error").textContent = error.message;
    return;
  }
  $("tool-error").textContent = "";
  sendCommand("tool_call", request.id, { name: fn.name, arguments: args });
}

// --- rendering ------------------------------------------------------------------------------

function renderAll() {
  renderQueue();
  renderCurrent();
}

function holderText(request) {
  if (state.held.has(request.id)) return "held by you";
  if (request.state === "queued") return "waiting";
  if (request.operator === state.operator) return "held by you in another window";
  return `held by ${request.operator}`;
}

function lastUserText(request) {
  for (let i = request.messages.length - 1; i >= 0; i -= 1) {
    const message = request.messages[i];
    if (!isObject(message) || message.role !== "user") continue;
    const text = typeof message.content === "string"
      ? message.content
      : Array.isArray(message.content)
        ? message.content.filter((p) => isObject(p) && p.type === "text").map((p) => p.text).join(" ")
        : "";
    return text.length > 140 ? `${text.slice(0, 140)}…` : text;
  }
  return "";
}

function renderQueue() {
  const list = $("queue-list");
  // Rebuilt on every event: keep the keyboard focus where it was.
  const focused = document.activeElement;
  const focusKey = list.contains(focused) ? focused.dataset.focusKey : null;
  const requests = [...state.requests.values()].sort((a, b) => a.created - b.created);
  const filter = $("queue-filter").value.trim().toLowerCase();
  const shown = filter ? requests.filter((r) => matches(r, filter)) : requests;
  list.replaceChildren(...shown.map(queueRow));
  $("queue-empty").hidden = requests.length > 0;
  $("queue-unmatched").hidden = !requests.length || shown.length > 0;
  const count = shown.length === requests.length ? `${requests.length}` : `${shown.length} of ${requests.length}`;
  $("queue-count").textContent = requests.length ? `(${count})` : "";
  // The tab's title shows the requests waiting, for an operator working in another tab.
  const waiting = requests.filter((r) => r.state === "queued").length;
  document.title = waiting ? `(${waiting}) llproxy operator` : "llproxy operator";
  if (focusKey) {
    const again = list.querySelector(`[data-focus-key="${CSS.escape(focusKey)}"]`);
    if (again) again.focus();
  }
  tickCountdowns();
}

// The filter finds a request by its model, its client, or the text it asks.
function matches(request, filter) {
  return [request.model, request.client || "", lastUserText(request)].some((text) => text.toLowerCase().includes(filter));
}

function queueRow(request) {
  const mine = state.held.has(request.id);
  const classes = ["request", `state-${request.state}`];
  if (mine) classes.push("mine");
  if (state.current === request) classes.push("current");
  const claimable = request.state === "queued" && connected();
  const view = el("button", { type: "button", class: "quiet" }, state.current === request ? "Viewing" : "View");
  view.dataset.focusKey = `view-${request.id}`;
  view.addEventListener("click", () => showRequest(request));
  const claim = el("button", { type: "button", class: "primary", disabled: !claimable }, mine ? "Yours" : "Claim");
  claim.dataset.focusKey = `claim-${request.id}`;
  claim.addEventListener("click", () => sendCommand("claim", request.id));
  const snippet = lastUserText(request);
  return el(
    "li",
    { class: classes.join(" "), "data-request": request.id },
    el(
      "div",
      { class: "request-head" },
      el("span", { class: "model" }, request.model),
      el("span", { class: "countdown", "data-countdown": request.id, "aria-label": "time left" }),
    ),
    el("p", { class: "meta" }, `${request.client || "anonymous"} · ${request.dialect} · ${request.stream ? "stream" : "whole answer"} · ${holderText(request)}`),
    el("p", { class: "snippet" }, snippet || "—"),
    el("div", { class: "row-actions" }, view, claim),
  );
}

// Countdowns tick every second from the deadline the server last gave.
function tickCountdowns() {
  for (const node of document.querySelectorAll("[data-countdown]")) {
    const request = state.requests.get(node.dataset.countdown);
    showCountdown(node, request);
  }
  const request = state.current;
  const status = $("request-status");
  if (request && !request.ended) showCountdown($("request-countdown") || status, request);
}

function showCountdown(node, request) {
  if (!node || !request) return;
  const othersClaim = request.state !== "queued" && !state.held.has(request.id);
  if (request.deadlineAt === null || othersClaim) {
    // Another operator's every action renews their claim's deadline: not ours to count.
    node.textContent = "—";
    node.classList.remove("urgent");
    return;
  }
  const left = (request.deadlineAt - now()) / 1000;
  node.textContent = formatSeconds(left);
  node.classList.toggle("urgent", left <= URGENT_SECONDS);
}

function showRequest(request) {
  state.current = request;
  renderAll();
}

function renderCurrent() {
  const request = state.current;
  $("no-request").hidden = request !== null;
  $("request-header").hidden = request === null;
  $("answer-panel").hidden = request === null;
  if (!request) {
    $("messages").replaceChildren();
    return;
  }
  renderRequestHeader(request);
  const panel = $("answer-panel");
  if (panel.dataset.request !== request.id) {
    // Another request: what was typed to reject or hand off the last one does not apply.
    panel.dataset.request = request.id;
    $("reject-message").value = "";
    $("handoff-model").value = "";
    for (const button of panel.querySelectorAll("button.confirming")) resetConfirm(button);
  }
  if ($("messages").dataset.request !== request.id) renderMessages(request);
  renderAnswer(request);
}

function renderRequestHeader(request) {
  $("request-title").textContent = request.asked && request.asked !== request.model
    ? `${request.model} (asked as ${request.asked})`
    : request.model;
  const meta = [
    `client: ${request.client || "anonymous"}`,
    `dialect: ${request.dialect}`,
    request.stream ? "streamed" : "whole answer at the finish",
  ];
  if (typeof request.max_tokens === "number") meta.push(`max_tokens ${request.max_tokens}`);
  if (request.tool_choice !== null && request.tool_choice !== undefined) {
    meta.push(`tool_choice ${typeof request.tool_choice === "string" ? request.tool_choice : JSON.stringify(request.tool_choice)}`);
  }
  meta.push(request.id);
  $("request-meta").textContent = meta.join(" · ");
  const status = $("request-status");
  status.classList.toggle("ended", Boolean(request.ended));
  if (request.ended) {
    status.textContent = request.ended;
    return;
  }
  const label = state.held.has(request.id)
    ? "You hold it. Time left before it times out unless you act (each action renews it): "
    : request.state === "queued"
      ? "Waiting to be claimed. Time left: "
      : `${request.state}, ${holderText(request)}. `;
  status.replaceChildren(label, el("span", { id: "request-countdown", class: "countdown" }));
  tickCountdowns();
}

function roleLabel(role) {
  return { system: "System", developer: "Developer", user: "User", assistant: "Assistant", tool: "Tool result" }[role] || role;
}

function renderMessages(request) {
  const container = $("messages");
  container.dataset.request = request.id;
  const callNames = new Map();
  for (const message of request.messages) {
    if (isObject(message) && Array.isArray(message.tool_calls)) {
      for (const call of message.tool_calls) {
        if (isObject(call) && isObject(call.function)) callNames.set(call.id, call.function.name);
      }
    }
  }
  container.replaceChildren(...request.messages.map((message) => renderMessage(message, callNames)));
  // A long conversation opens at its latest message: the one to answer.
  const scroller = container.closest(".conversation");
  scroller.scrollTop = scroller.scrollHeight;
}

function renderMessage(message, callNames) {
  if (!isObject(message)) return el("article", { class: "message role-other" }, el("pre", {}, JSON.stringify(message)));
  const role = typeof message.role === "string" ? message.role : "unknown";
  const roleClass = KNOWN_ROLES.includes(role) ? role : "other";
  const heading = [roleLabel(role)];
  if (typeof message.name === "string") heading.push(`(${message.name})`);
  if (role === "tool" && message.tool_call_id !== undefined) {
    const name = callNames.get(message.tool_call_id);
    heading.push(`for ${name ? `${name}, ` : ""}${message.tool_call_id}`);
  }
  const article = el("article", { class: `message role-${roleClass}` }, el("h3", { class: "role" }, heading.join(" ")));
  article.append(...renderContent(message.content));
  if (Array.isArray(message.tool_calls)) {
    for (const call of message.tool_calls) article.append(renderToolCall(call));
  }
  return article;
}

function renderContent(content) {
  if (typeof content === "string") return [el("p", { class: "text" }, content)];
  if (content === null || content === undefined) return [];
  if (!Array.isArray(content)) return [el("pre", { class: "json" }, JSON.stringify(content, null, 2))];
  return content.map((part) => {
    if (!isObject(part)) return el("p", { class: "text" }, String(part));
    if (part.type === "text") return el("p", { class: "text" }, String(part.text ?? ""));
    if (part.type === "image_url") {
      const url = isObject(part.image_url) ? part.image_url.url : part.image_url;
      if (typeof url === "string" && url.startsWith("data:image/")) {
        return el("figure", { class: "image" }, el("img", { src: url, alt: "[image]" }), el("figcaption", {}, "[image]"));
      }
      return el("p", { class: "part" }, `[image: ${typeof url === "string" ? url : "?"}]`);
    }
    return el("p", { class: "part" }, `[${part.type || "part"}]`);
  });
}

function renderToolCall(call) {
  const fn = isObject(call) && isObject(call.function) ? call.function : {};
  return el(
    "div",
    { class: "tool-call" },
    el("p", { class: "tool-call-name" }, `Tool call ${fn.name ?? "?"}`, call && call.id ? ` (${call.id})` : ""),
    el("pre", { class: "json" }, prettyJson(fn.arguments ?? "")),
  );
}

function renderAnswer(request) {
  const mine = state.held.has(request.id) && !request.ended && connected();
  const box = $("answer-text");
  // The answer as sent so far; while we type, the box may also hold what an input method
  // is still composing (sent when the composition ends): leave that be.
  const typing = mine && box.dataset.request === request.id && box.value.startsWith(request.text);
  if (!typing) {
    if (box.value !== request.text) box.value = request.text;
    if (box.dataset.request !== request.id) hideAnswerNotice();
    box.dataset.request = request.id;
  }
  box.readOnly = !mine;
  box.classList.toggle("locked", !mine);
  box.placeholder = mine ? "Type your answer: it reaches the client as you type." : "Claim the request, then type here…";
  renderAnswerInfo(request);
  renderSentCalls(request);
  renderToolForm(request);
  for (const id of ["tool-form", "finish-form"]) setFormEnabled(id, mine);
  for (const id of ["reject-form", "handoff-form"]) {
    setFormEnabled(id, canTriage(request));
    if (!canTriage(request)) resetConfirm($(id).querySelector("button[type=submit]"));
  }
  $("release").disabled = !mine;
  // Once text reached the client a model can only continue it.
  const mode = $("handoff-mode");
  if (mode.dataset.request !== request.id || (request.text && mode.value === "replace")) {
    mode.value = request.text ? "continue" : "replace";
    mode.dataset.request = request.id;
  }
}

function setFormEnabled(id, enabled) {
  for (const node of $(id).querySelectorAll("input, select, textarea, button")) node.disabled = !enabled;
}

function renderAnswerInfo(request) {
  const sent = codePoints(request.text);
  const inFlight = sent - request.acked;
  const parts = [`${sent} character${sent === 1 ? "" : "s"} sent`];
  if (inFlight > 0) parts.push(`${inFlight} on the way`);
  $("answer-info").textContent = parts.join(", ");
}

function renderSentCalls(request) {
  const container = $("sent-calls");
  if (!request.tool_calls.length) {
    container.replaceChildren();
    return;
  }
  container.replaceChildren(
    el("h3", {}, "Tool calls sent"),
    ...request.tool_calls.map((call) =>
      el(
        "div",
        { class: "tool-call" },
        el("p", { class: "tool-call-name" }, `${call.name} (${call.id})`),
        el("pre", { class: "json" }, prettyJson(call.arguments)),
      ),
    ),
  );
}

function notify(text, kind = "info") {
  const list = $("notices");
  const time = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  const dismiss = el("button", { type: "button", class: "quiet", "aria-label": "Dismiss notice" }, "Dismiss");
  const item = el("li", { class: `notice ${kind}` }, el("span", { class: "time" }, time), el("span", { class: "text" }, text), dismiss);
  dismiss.addEventListener("click", () => item.remove());
  setTimeout(() => item.remove(), NOTICE_MS[kind] || NOTICE_MS.info);
  list.prepend(item);
  while (list.children.length > MAX_NOTICES) list.lastElementChild.remove();
}

// Ringing is the operator's choice, made once with the button (browsers let a page play
// sound and ask to notify only after a click).
function toggleRing() {
  state.ring = !state.ring;
  const button = $("ring");
  button.setAttribute("aria-pressed", String(state.ring));
  button.textContent = state.ring ? "Ring: on" : "Ring: off";
  if (!state.ring) return;
  state.audio = state.audio || new AudioContext();
  if ("Notification" in window && Notification.permission === "default") Notification.requestPermission();
}

function ring(request) {
  if (!state.ring || !isObject(request)) return;
  if (state.audio) {
    const tone = state.audio.createOscillator();
    const gain = state.audio.createGain();
    gain.gain.value = 0.15;
    tone.frequency.value = 880;
    tone.connect(gain).connect(state.audio.destination);
    tone.start();
    tone.stop(state.audio.currentTime + 0.18);
  }
  if (document.hidden && "Notification" in window && Notification.permission === "granted") {
    new Notification(`New request for ${request.model}`, { body: lastUserText(request), tag: "llproxy-operator" });
  }
  state.rings += 1;
}

function forgetDesk() {
  state.requests.clear();
  state.held.clear();
  state.reclaim.clear();
  state.pending.clear();
  state.current = null;
  $("notices").replaceChildren();
  $("messages").dataset.request = "";
  renderAll();
}

// --- start ------------------------------------------------------------------------------

function start() {
  $("login-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  const box = $("answer-text");
  box.addEventListener("beforeinput", answerBeforeInput);
  box.addEventListener("input", answerEdited);
  box.addEventListener("compositionend", () => answerEdited());
  $("tool-name").addEventListener("change", () => {
    $("tool-error").textContent = "";
    $("tool-sent").textContent = "";
    renderToolFields();
  });
  $("tool-form").addEventListener("submit", sendToolCall);
  $("finish-form").addEventListener("submit", finishAnswer);
  $("reject-form").addEventListener("submit", rejectRequest);
  $("handoff-form").addEventListener("submit", handOff);
  $("release").addEventListener("click", releaseRequest);
  $("queue-filter").addEventListener("input", renderQueue);
  $("ring").addEventListener("click", toggleRing);
  setInterval(tickCountdowns, 1000);
  $("token").focus();
}

document.addEventListener("DOMContentLoaded", start);
