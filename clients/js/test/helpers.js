import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const VECTORS = path.resolve(REPO, 'tests/vectors');
export const readJson = (p) => JSON.parse(readFileSync(p, 'utf8'));
export const hex = (s) => new Uint8Array(Buffer.from(s, 'hex'));
export const toHex = (b) => Buffer.from(b).toString('hex');
