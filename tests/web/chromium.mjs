// Unpacks the Chromium that @sparticuz/chromium ships (brotli-compressed, with its
// SwiftShader libraries, fonts and the few shared libraries it needs) into
// node_modules/.chromium/ beside this file and prints the binary's path. Run by `make browser`, or by tests/web/test_studio.py when
// the package is installed but not yet unpacked. Takes a few seconds; a second run
// finds the binary and returns at once.
import { mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const folder = join(dirname(fileURLToPath(import.meta.url)), "node_modules", ".chromium");
mkdirSync(folder, { recursive: true });
// The package unpacks into os.tmpdir(), which follows TMPDIR at each call.
process.env.TMPDIR = folder;
const { default: chromium, inflate } = await import("@sparticuz/chromium");
const executable = await chromium.executablePath();
// NSS, NSPR and expat, which the binary links to: for a machine that lacks them, the tests
// put this folder (.chromium/al2023/lib) on LD_LIBRARY_PATH.
await inflate(join(dirname(fileURLToPath(import.meta.resolve("@sparticuz/chromium"))), "..", "bin", "al2023.tar.br"));
console.log(executable);
