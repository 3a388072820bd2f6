// The console's one build step (./scripts/setup runs it): bundle src/main.js with its npm
// dependencies into dist/app.js and copy the static files beside it. dist/ is what
// twinhub_cli/console.py serves.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";

const out = new URL("./dist/", import.meta.url).pathname;
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
await build({
  entryPoints: ["src/main.js"],
  bundle: true,
  minify: true,
  format: "esm",
  target: ["es2022"],
  outfile: `${out}app.js`,
  legalComments: "linked",
  logLevel: "warning",
});
copyFileSync("src/index.html", `${out}index.html`);
copyFileSync("src/style.css", `${out}style.css`);
copyFileSync("node_modules/uplot/dist/uPlot.min.css", `${out}uplot.css`);
