// Popup of the example MV3 extension. Settings live in chrome.storage.local; opened as
// a plain web page (no chrome.storage), it reads ./config.json instead (used by the
// headless test). Every request goes through the relay; the API key only to the issuer.
import { createClient, OpenPCCError } from './openpcc.js';

const FIELDS = ['relayUrl', 'issuerUrl', 'apiKey', 'model', 'policy', 'releasePublicKey'];
const $ = (id) => document.getElementById(id);
const hasStorage = typeof chrome !== 'undefined' && chrome.storage?.local;

async function loadConfig() {
  if (hasStorage) return chrome.storage.local.get(FIELDS);
  const r = await fetch('config.json');
  return r.ok ? r.json() : {};
}

let client = null;
let config = {};

function setStatus(s) { $('status').textContent = s; }

async function init() {
  config = await loadConfig();
  for (const f of FIELDS) if (config[f]) $(f).value = config[f];
  document.body.dataset.ready = '1';
}

$('save').addEventListener('click', async () => {
  config = Object.fromEntries(FIELDS.map((f) => [f, $(f).value.trim()]));
  if (hasStorage) await chrome.storage.local.set(config);
  client = null;
  setStatus('saved');
});

$('send').addEventListener('click', async () => {
  $('output').textContent = '';
  document.body.dataset.result = '';
  const t0 = performance.now();
  const times = [];
  try {
    client ??= createClient(config);
    setStatus('verifying nodes and sealing…');
    const stream = await client.chat.completions.create({
      model: config.model,
      messages: [{ role: 'user', content: $('prompt').value }],
      stream: true,
    });
    setStatus('streaming…');
    for await (const chunk of stream) {
      times.push(Math.round(performance.now() - t0));
      $('output').textContent += chunk.choices?.[0]?.delta?.content ?? '';
    }
    setStatus('done');
    document.body.dataset.chunkTimes = times.join(',');
    document.body.dataset.result = 'ok';
  } catch (e) {
    setStatus(`error: ${e instanceof OpenPCCError ? e.name : 'Error'}: ${e.message}`);
    document.body.dataset.result = 'error';
    console.error(e);
  }
});

init().catch((e) => setStatus(`settings error: ${e.message}`));
