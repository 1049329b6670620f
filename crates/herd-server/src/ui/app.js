// The chat page: talks to this server's /v1/models and streamed /v1/chat/completions, as any
// OpenAI client would. No dependencies and no build step; model text only ever goes into the
// page as text (textContent / text nodes), never as HTML.
'use strict';

const $ = (id) => document.getElementById(id);
const els = {
  status: $('status'), messages: $('messages'), message: $('message'), send: $('send'),
  stop: $('stop'), newChat: $('new-chat'), settings: $('settings'), apiKey: $('api-key'),
  system: $('system'),
};

// Sampling fields: input id, request field, whether it must be an integer.
const SAMPLING = [
  ['temperature', 'temperature', false], ['top-p', 'top_p', false], ['top-k', 'top_k', true],
  ['min-p', 'min_p', false], ['max-tokens', 'max_tokens', true], ['seed', 'seed', true],
];
// Everything the user sets survives a reload; the key stays in this browser's storage.
const STORED = ['api-key', 'system', ...SAMPLING.map(([id]) => id)];
const storageKey = (id) => `herd.${id}`;

let modelName = null;   // learned from /v1/models
let history = [];       // [{role, content}] sent with each request (the system prompt apart)
let controller = null;  // the AbortController of the request in flight, if any
let chat = 0;           // bumped by "New chat": a reply still ending then belongs to no chat

function headers(json) {
  const h = {};
  const key = els.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h['Content-Type'] = 'application/json';
  return h;
}

function setStatus(text, kind = '') {
  els.status.textContent = text;
  els.status.className = kind;
}

// The message of an OpenAI-shaped error body ({"error": {"message"}}), else the raw text.
async function errorText(res) {
  const text = await res.text().catch(() => '');
  try {
    const body = JSON.parse(text);
    const msg = body?.error?.message ?? body?.error;
    if (typeof msg === 'string' && msg) return `${res.status}: ${msg}`;
  } catch { /* not JSON: show it as it came */ }
  return `${res.status} ${res.statusText}${text ? `: ${text.slice(0, 500)}` : ''}`;
}

// --- The served model -----------------------------------------------------------------------

let retryTimer = null;
let modelsSeq = 0;  // only the latest lookup may update the page (the key can change meanwhile)

// Ask /v1/models for the served name. Returns null on success, else what went wrong.
async function loadModel() {
  clearTimeout(retryTimer);
  const seq = ++modelsSeq;
  let res;
  try {
    res = await fetch('/v1/models', { headers: headers(false) });
  } catch (e) {
    if (seq === modelsSeq) {
      setStatus('Cannot reach the server; retrying…', 'warn');
      retryTimer = setTimeout(loadModel, 2000);
    }
    return `cannot reach the server (${e.message})`;
  }
  if (seq !== modelsSeq) return 'superseded';
  if (res.ok) {
    let body = null;
    try {
      body = await res.json();
    } catch {
      modelName = null;
      setStatus('The server answered /v1/models with something that is not JSON', 'error');
      return 'the model list is not JSON';
    }
    modelName = body?.data?.[0]?.id ?? null;
    setStatus(modelName ? `Model: ${modelName}` : 'The server lists no model', modelName ? 'ok' : 'error');
    return modelName ? null : 'the server lists no model';
  }
  const why = await errorText(res);
  modelName = null;
  if (res.status === 401) {
    // Point at the key field rather than failing quietly.
    setStatus('This server needs an API key: enter it under Settings.', 'error');
    els.settings.open = true;
  } else if (res.status === 503) {
    // The model is still loading: the server says to come back in a second.
    setStatus('The model is loading…', 'warn');
    retryTimer = setTimeout(loadModel, 1000);
  } else {
    setStatus(`Could not list models: ${why}`, 'error');
  }
  return why;
}

// --- The conversation -----------------------------------------------------------------------

const nearBottom = () =>
  els.messages.scrollHeight - els.messages.scrollTop - els.messages.clientHeight < 80;

// Follow the newest text, unless the user scrolled up to read.
function follow(wasNear) {
  if (wasNear) els.messages.scrollTop = els.messages.scrollHeight;
}

// One turn: a small "who" label, the bubble, and (for replies) a stats line.
function addTurn(role, text, who) {
  const wasNear = nearBottom();
  const turn = document.createElement('div');
  turn.className = `turn ${role}-turn`;
  const label = document.createElement('p');
  label.className = 'who';
  label.textContent = who;
  const bubble = document.createElement('div');
  bubble.className = `bubble ${role}`;
  bubble.textContent = text;
  turn.append(label, bubble);
  els.messages.append(turn);
  follow(wasNear);
  return { turn, bubble };
}

function addStats(turn, text) {
  const p = document.createElement('p');
  p.className = 'stats';
  p.textContent = text;
  turn.append(p);
}

function addError(text) {
  const wasNear = nearBottom();
  const p = document.createElement('p');
  p.className = 'error-msg';  // inside the log, which already announces it
  p.textContent = `Error: ${text}`;
  els.messages.append(p);
  follow(wasNear);
}

function setGenerating(on) {
  // Focus on a button about to be disabled would fall to the page: hand it to the other one.
  const moveTo = on && document.activeElement === els.send ? els.stop
    : !on && document.activeElement === els.stop ? els.send : null;
  els.send.disabled = on;
  els.stop.disabled = !on;
  moveTo?.focus();
  els.messages.setAttribute('aria-busy', String(on));
}

// The sampling fields, blank ones left out; or throws naming the field that is not a number.
function sampling() {
  const out = {};
  for (const [id, field, integer] of SAMPLING) {
    const input = $(id);
    const raw = input.value.trim();
    if (raw === '') continue;
    const n = Number(raw);
    if (!Number.isFinite(n) || (integer && !Number.isInteger(n)) || !input.checkValidity()) {
      input.focus();
      const label = document.querySelector(`label[for="${id}"]`).textContent;
      throw new Error(`${label}: "${raw}" is not valid (${input.validationMessage || 'a number is needed'})`);
    }
    out[field] = n;
  }
  return out;
}

async function send() {
  const text = els.message.value;
  if (controller || !text.trim()) return;
  let params;
  try {
    params = sampling();
  } catch (e) {
    addError(e.message);
    return;
  }
  setGenerating(true);
  const thisChat = chat;
  controller = new AbortController();
  const { signal } = controller;
  els.message.value = '';
  const user = addTurn('user', text, 'You');
  history.push({ role: 'user', content: text });

  if (!modelName) {
    const why = await loadModel();
    if (why && !modelName) return failed(user, history.length - 1, text, `could not find the model: ${why}`);
    if (thisChat !== chat) return failed(user, 0, text, 'superseded');
  }
  const messages = [];
  const system = els.system.value.trim();
  if (system) messages.push({ role: 'system', content: system });
  messages.push(...history);
  const body = {
    model: modelName, messages, stream: true, stream_options: { include_usage: true }, ...params,
  };

  const started = performance.now();
  let res;
  try {
    res = await fetch('/v1/chat/completions', {
      method: 'POST', headers: headers(true), body: JSON.stringify(body), signal,
    });
  } catch (e) {
    const why = e.name === 'AbortError' ? 'stopped before the reply started' : `network error: ${e.message}`;
    return failed(user, history.length - 1, text, why);
  }
  if (!res.ok) return failed(user, history.length - 1, text, await errorText(res));

  const { turn, bubble } = addTurn('assistant', '', modelName);
  let content = '';
  let deltas = 0;
  let firstAt = null;
  let usage = null;
  let finish = null;
  let streamError = null;
  let stopped = false;
  let sawDone = false;

  // One `data:` line of the event stream.
  const onData = (data) => {
    if (data === '[DONE]') {
      sawDone = true;
      return;
    }
    const chunk = JSON.parse(data);
    if (chunk.error) {
      streamError = chunk.error.message ?? JSON.stringify(chunk.error);
      return;
    }
    if (chunk.usage) usage = chunk.usage;
    const choice = chunk.choices?.[0];
    if (!choice) return;
    if (choice.finish_reason) finish = choice.finish_reason;
    const piece = choice.delta?.content;
    if (piece) {
      firstAt ??= performance.now();
      deltas += 1;
      content += piece;
      const wasNear = nearBottom();
      bubble.append(piece);  // a text node: model text is never parsed as HTML
      follow(wasNear);
    }
  };

  const reader = res.body.getReader();
  try {
    const decoder = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      // A chunk may end mid-line (or mid-character): keep the unfinished tail for the next.
      buf += done ? decoder.decode() + '\n' : decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, '');
        buf = buf.slice(nl + 1);
        if (line.startsWith('data:')) onData(line.slice(5).trimStart());
      }
      if (done) break;
    }
    if (!sawDone && !streamError) streamError = 'the stream ended before [DONE]';
  } catch (e) {
    if (e.name === 'AbortError') stopped = true;
    else streamError = `the stream broke: ${e.message}`;
  } finally {
    // A stream that broke off (bad data, a lost [DONE]) must not keep the request running on
    // the server: cancelling the body closes the connection, which cancels the request.
    if (!sawDone) reader.cancel().catch(() => {});
  }
  const endedAt = performance.now();
  controller = null;
  setGenerating(false);
  if (thisChat !== chat) return;

  // Keep what arrived, even a stopped reply, so that the conversation can go on from it. With
  // nothing arrived (stopped during the prompt's processing, an empty reply, an error), the
  // user's turn goes too: two user turns in a row would break a chat template that requires
  // alternating roles.
  if (content) {
    history.push({ role: 'assistant', content });
  } else {
    const at = history.length - 1;
    if (history[at]?.role === 'user' && history[at].content === text) history.splice(at, 1);
    user.turn.classList.add('unsent');
    if (!els.message.value) els.message.value = text;
  }
  if (stopped) turn.classList.add('stopped');

  // Tokens/s counts the tokens after the first over the time from the first to the end (the
  // first token's time is the prompt's processing, shown apart). A stopped request sends no
  // usage: each content delta is about one token's text then (hence the ≈).
  const tokens = usage?.completion_tokens ?? deltas;
  const approx = usage ? '' : '≈';
  const parts = [];
  if (stopped) parts.push('Stopped');
  parts.push(`${approx}${tokens} token${tokens === 1 ? '' : 's'}`);
  if (firstAt !== null) {
    const secs = (endedAt - firstAt) / 1000;
    if (tokens > 1 && secs > 0) parts.push(`${approx}${((tokens - 1) / secs).toFixed(1)} tokens/s`);
    parts.push(`first token ${((firstAt - started) / 1000).toFixed(2)} s`);
  }
  if (finish === 'length') parts.push('cut at max tokens');
  addStats(turn, parts.join(', '));
  if (streamError) addError(streamError);
  if (!content && !stopped && !streamError) addError('the reply was empty');
  refocus();
}

// Back to the message box after a reply, unless the user has moved on to another field.
function refocus() {
  const at = document.activeElement;
  if (!at || at === document.body || at === els.send || at === els.stop || at === els.message) {
    els.message.focus();
  }
}

// The request failed before any reply: say why, drop the unanswered turn from the history,
// and give the text back to the message box so that it can be sent again.
function failed(user, index, text, why) {
  controller = null;
  setGenerating(false);
  if (user.turn.parentNode !== els.messages) return;  // "New chat" cleared it meanwhile
  history.splice(index, 1);
  user.turn.classList.add('unsent');
  addError(why);
  if (!els.message.value) els.message.value = text;
  refocus();
}

function stop() {
  controller?.abort();
}

function newChat() {
  stop();
  chat += 1;
  history = [];
  els.messages.replaceChildren();
  els.message.focus();
}

// --- Wiring ---------------------------------------------------------------------------------

// Storage can be switched off (private modes, policies): the page then just forgets.
for (const id of STORED) {
  const input = $(id);
  try {
    const saved = localStorage.getItem(storageKey(id));
    if (saved !== null) input.value = saved;
  } catch { /* nothing kept */ }
  input.addEventListener('input', () => {
    try { localStorage.setItem(storageKey(id), input.value); } catch { /* not kept */ }
  });
}

// A new key: look the model up again (after a pause, not on every keystroke).
let keyTimer = null;
els.apiKey.addEventListener('input', () => {
  clearTimeout(keyTimer);
  keyTimer = setTimeout(loadModel, 300);
});

els.message.addEventListener('keydown', (e) => {
  // Enter sends, Shift+Enter is a newline; not while an input method is composing.
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
document.addEventListener('keydown', (e) => {
  if (e.key === 'Escape' && controller) stop();
});
els.send.addEventListener('click', send);
els.stop.addEventListener('click', stop);
els.newChat.addEventListener('click', newChat);

loadModel();
