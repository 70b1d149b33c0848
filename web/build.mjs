// Bundles src/main.ts (and the generated API types it imports) into the one script the
// gateway serves: gateway/storyreel_gateway/studio/studio.js. `make studio` runs it after
// regenerating src/gen; tests/web/test_bundle.py checks the committed file is this build's.
// `node build.mjs --outfile PATH` writes elsewhere (the staleness test).
import { build } from "esbuild";

const at = process.argv.indexOf("--outfile");
const outfile = at > 0 ? process.argv[at + 1] : "../gateway/storyreel_gateway/studio/studio.js";

await build({
  entryPoints: [new URL("./src/main.ts", import.meta.url).pathname],
  outfile,
  bundle: true,
  format: "esm",
  target: ["chrome111", "firefox111", "safari16.4"],
  minify: true,
  sourcemap: false,
  legalComments: "eof",
  charset: "utf8",
  logLevel: "warning",
  absWorkingDir: new URL(".", import.meta.url).pathname,
});
