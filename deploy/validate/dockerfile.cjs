// Lints a Dockerfile with dockerfile-utils (the Docker language server's validator):
// unknown instructions or flags, bad arguments, several CMD/ENTRYPOINT/HEALTHCHECK …
//
//   node dockerfile.cjs NODE_MODULES_DIR Dockerfile
//
// Prints every diagnostic and exits 1 if there is any.
const { resolve } = require("node:path");
const { readFileSync } = require("node:fs");

const [modules, file] = process.argv.slice(2);
if (!modules || !file) {
  console.error("usage: node dockerfile.cjs NODE_MODULES_DIR Dockerfile");
  process.exit(2);
}
const { validate } = require(resolve(modules, "dockerfile-utils"));
const ERROR = 1;
const diagnostics = validate(readFileSync(file, "utf8"), {
  // Flag everything the validator can flag, as errors.
  deprecatedMaintainer: ERROR,
  directiveCasing: ERROR,
  emptyContinuationLine: ERROR,
  instructionCasing: ERROR,
  instructionCmdMultiple: ERROR,
  instructionEntrypointMultiple: ERROR,
  instructionHealthcheckMultiple: ERROR,
  instructionJSONInSingleQuotes: ERROR,
  instructionWorkdirRelative: ERROR,
});
for (const d of diagnostics) {
  console.log(`${file}:${d.range.start.line + 1}: ${d.message}`);
}
console.log(`${diagnostics.length} diagnostic(s)`);
process.exit(diagnostics.length ? 1 : 0);
