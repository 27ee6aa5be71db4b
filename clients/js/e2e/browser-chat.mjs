// Headless Chromium run of the example extension's popup page, served as a plain web page
// from its own origin (http://127.0.0.1:PAGE_PORT) by a static file server: the page calls
// the relay and the issuer directly, cross-origin, so the stack must allow that origin:
//     openpcc up --allow-origin http://127.0.0.1:PAGE_PORT
// Then the same page from a second origin the stack does not allow must fail with a CORS
// error. Usage: OPENPCC_PAGE_PORT=PORT node e2e/browser-chat.mjs STATE/client.json
// -> prints a JSON summary (tests/test_js_client.py checks it).
import http from 'node:http';
import { readFileSync, existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const pageDir = path.resolve(here, '../examples/extension');
const cfg = JSON.parse(readFileSync(process.argv[2] ?? process.env.OPENPCC_CLIENT_CONFIG, 'utf8'));
const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.json': 'application/json' };
const relayOrigin = new URL(cfg.relay_url).origin;
const issuerOrigin = new URL(cfg.issuer_url).origin;

// Static files and the page's settings, nothing else: no path here reaches the stack.
function pageServer() {
  return http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    if (url.pathname === '/config.json') {
      res.writeHead(200, { 'content-type': 'application/json' });
      return res.end(JSON.stringify({
        relayUrl: cfg.relay_url,
        issuerUrl: cfg.issuer_url,
        apiKey: readFileSync(cfg.api_key_file, 'utf8').trim(),
        model: cfg.model,
        policy: readFileSync(cfg.policy, 'utf8'),
        releasePublicKey: readFileSync(cfg.release_pubkey, 'utf8'),
      }));
    }
    const file = path.join(pageDir, url.pathname === '/' ? 'popup.html' : path.normalize(url.pathname));
    if (!file.startsWith(pageDir) || !existsSync(file)) { res.writeHead(404); return res.end(); }
    res.writeHead(200, { 'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream' });
    res.end(readFileSync(file));
  });
}

async function listen(port) {
  const server = pageServer();
  await new Promise((resolve, reject) => { server.once('error', reject); server.listen(port, '127.0.0.1', resolve); });
  return { server, origin: `http://127.0.0.1:${server.address().port}` };
}

const allowed = await listen(Number(process.env.OPENPCC_PAGE_PORT ?? 0));
const denied = await listen(0); // an origin no --allow-origin names

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
const logs = [];
const toStack = []; // every request the page sent to the relay or the issuer
try {
  const page = await browser.newPage();
  page.on('console', (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
  page.on('requestfinished', (r) => {
    const target = new URL(r.url()).origin;
    if (target !== relayOrigin && target !== issuerOrigin) return;
    toStack.push((async () => ({
      method: r.method(),
      to: target === relayOrigin ? 'relay' : 'issuer',
      origin: (await r.allHeaders()).origin ?? null,
      allow_origin: (await (await r.response())?.allHeaders())?.['access-control-allow-origin'] ?? null,
    }))());
  });
  await page.goto(allowed.origin + '/');
  await page.waitForSelector('body[data-ready="1"]', { timeout: 20000 });
  await page.click('#send');
  await page.waitForFunction(() => document.body.dataset.result, null, { timeout: 60000 });
  const out = await page.evaluate(() => ({
    result: document.body.dataset.result,
    status: document.getElementById('status').textContent,
    text: document.getElementById('output').textContent,
    chunk_times_ms: (document.body.dataset.chunkTimes || '').split(',').filter(Boolean).map(Number),
    user_agent: navigator.userAgent,
    has_process: typeof globalThis.process !== 'undefined',
    page_origin: location.origin,
  }));

  // Negative check: the same calls from an origin the stack does not allow.
  const other = await browser.newPage();
  const otherLogs = [];
  other.on('console', (m) => otherLogs.push(m.text()));
  await other.goto(denied.origin + '/');
  await other.waitForSelector('body[data-ready="1"]', { timeout: 20000 });
  const deniedResults = await other.evaluate(async ({ relay, issuer }) => {
    const attempt = async (url, init) => {
      try { const r = await fetch(url, init); return `readable ${r.status}`; } catch (e) { return `${e.name}: ${e.message}`; }
    };
    return {
      relay_keys: await attempt(relay + '/.well-known/ohttp-gateway'),
      relay_post: await attempt(relay + '/', { method: 'POST', headers: { 'Content-Type': 'message/ohttp-req' }, body: new Uint8Array(8) }),
      issuer_directory: await attempt(issuer + '/.well-known/private-token-issuer-directory'),
    };
  }, { relay: cfg.relay_url, issuer: cfg.issuer_url });
  await new Promise((r) => setTimeout(r, 200)); // let the console messages arrive

  process.stdout.write(JSON.stringify({
    ...out,
    relay_origin: relayOrigin,
    issuer_origin: issuerOrigin,
    to_stack: await Promise.all(toStack),
    denied: {
      page_origin: denied.origin,
      ...deniedResults,
      cors_errors: otherLogs.filter((t) => t.includes('blocked by CORS policy')).length,
    },
    logs: logs.slice(-20),
  }) + '\n');
} finally {
  await browser.close();
  allowed.server.close();
  denied.server.close();
}
