// Headless Chromium run of the example extension's popup page, served as a plain web page
// over http://127.0.0.1 by a tiny same-origin server that also forwards /relay/* to the
// relay and the issuer's two paths to the issuer (so the page needs no CORS from them).
// Usage: node test/browser-e2e.mjs STATE/client.json  -> prints a JSON summary.
import http from 'node:http';
import { readFileSync, existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const pageDir = path.resolve(here, '../examples/extension');
const cfg = JSON.parse(readFileSync(process.argv[2] ?? process.env.OPENPCC_CLIENT_CONFIG, 'utf8'));
const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.json': 'application/json' };
const ISSUER_PATHS = ['/.well-known/private-token-issuer-directory', '/token-request'];
const seen = { relay: 0, issuer: 0 };

function forward(req, res, target) {
  const up = http.request(target, { method: req.method, headers: { ...req.headers, host: new URL(target).host } }, (ur) => {
    res.writeHead(ur.statusCode, ur.headers);
    ur.pipe(res); // streams: chunked OHTTP responses flow through as they arrive
  });
  up.on('error', (e) => { res.writeHead(502); res.end(String(e)); });
  req.pipe(up);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  const origin = `http://${req.headers.host}`;
  if (url.pathname.startsWith('/relay/') || url.pathname === '/relay') {
    seen.relay++;
    return forward(req, res, cfg.relay_url + (url.pathname.slice(6) || '/') + url.search);
  }
  if (ISSUER_PATHS.includes(url.pathname)) {
    seen.issuer++;
    return forward(req, res, cfg.issuer_url + url.pathname + url.search);
  }
  if (url.pathname === '/config.json') {
    res.writeHead(200, { 'content-type': 'application/json' });
    return res.end(JSON.stringify({
      relayUrl: origin + '/relay',
      issuerUrl: origin,
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
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const base = `http://127.0.0.1:${server.address().port}/`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
const logs = [];
try {
  const page = await browser.newPage();
  page.on('console', (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
  await page.goto(base);
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
  }));
  process.stdout.write(JSON.stringify({ ...out, proxied: seen, logs: logs.slice(-20) }) + '\n');
} finally {
  await browser.close();
  server.close();
}
