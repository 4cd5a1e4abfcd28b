// dist/cjs holds CommonJS under a "type": "module" package: mark the folder so Node reads it as such.
require("node:fs").writeFileSync(__dirname + "/../dist/cjs/package.json", '{"type": "commonjs"}\n');
