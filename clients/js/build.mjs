// Browser build: one ESM bundle with no Node built-ins (platform "browser" makes any
// node: import a build error), copied into the example extension.
import { build } from 'esbuild';
import { copyFileSync, mkdirSync } from 'node:fs';

mkdirSync('dist', { recursive: true });
await build({
  entryPoints: ['src/index.js'],
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: ['chrome120', 'firefox120', 'safari17'],
  outfile: 'dist/openpcc.browser.js',
  sourcemap: true,
  logLevel: 'warning',
});
copyFileSync('dist/openpcc.browser.js', 'examples/extension/openpcc.js');
console.log('built dist/openpcc.browser.js and examples/extension/openpcc.js');
