// Validates a Grafana dashboard (JSON) against Grafana's published dashboard schema: the
// `Dashboard` type that @grafana/schema generates from Grafana's own schema definition,
// turned into a JSON Schema (no extra properties anywhere) and checked with Ajv.
// Usage: node check.js DASHBOARD.json
const path = require("path");
const fs = require("fs");
const Ajv = require("ajv");
const tsj = require("ts-json-schema-generator");

const types = path.join(
  __dirname,
  "node_modules/@grafana/schema/dist/types/raw/dashboard/x/types.gen.d.ts",
);
const schema = tsj
  .createGenerator({ path: types, type: "Dashboard", skipTypeCheck: true })
  .createSchema("Dashboard");
const validate = new Ajv({ allErrors: true, strict: false }).compile(schema);
const dashboard = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
if (validate(dashboard)) {
  console.log("valid");
} else {
  console.log(JSON.stringify(validate.errors, null, 1));
  process.exit(1);
}
