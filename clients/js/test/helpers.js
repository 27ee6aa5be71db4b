import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const VECTORS = path.resolve(REPO, 'tests/vectors');
export const readJson = (p) => JSON.parse(readFileSync(p, 'utf8'));
export const hex = (s) => new Uint8Array(Buffer.from(s, 'hex'));
export const toHex = (b) => Buffer.from(b).toString('hex');

let fixture = null;
/** The simulated-TEE node entry and signed manifests of make_sim_bundle.py (Python), or null (t skipped). */
export function simFixture(t) {
  const py = process.env.PYTHON || 'python3';
  try {
    // A script's own folder (not the cwd) heads sys.path: put the repository on it.
    const env = { ...process.env, PYTHONPATH: [REPO, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter) };
    fixture ??= JSON.parse(execFileSync(py, [path.join(REPO, 'clients/js/test/make_sim_bundle.py')], { cwd: REPO, env }).toString());
  } catch (e) {
    t.skip(`python openpcc unavailable: ${e.message.split('\n')[0]}`);
    return null;
  }
  return fixture;
}
