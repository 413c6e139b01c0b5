// Validates KEDA objects (ScaledObject, TriggerAuthentication) offline.
//
//   python yaml2json.py deploy/k8s/*.yaml | node keda.mjs NODE_MODULES_DIR
//
// Input: the JSON array yaml2json.py prints; non-KEDA documents are ignored. Checks:
//  1. the schema of KEDA's API types as packaged by @kubernetes-models/keda (required
//     fields, types; generated from github.com/kedacore/keda/v2/apis/keda/v1alpha1);
//  2. strict fields: every key of spec and its nested KEDA types must be a property of
//     that type (the API server rejects unknown fields with strict validation, the
//     generated validators alone do not);
//  3. each `redis-streams` / `redis-cluster-streams` and `prometheus` trigger's
//     metadata against the parameters the scaler documents
//     (keda.sh/docs/2.11/scalers/redis-streams, keda.sh/docs/2.11/scalers/prometheus).
// Prints one line per problem and exits 1 if there is any; prints what it checked.
import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2] && resolve(process.argv[2]);
if (!modules) {
  console.error("usage: node keda.mjs NODE_MODULES_DIR < documents.json");
  process.exit(2);
}
const typesDir = join(modules, "@kubernetes-models/keda/keda.sh/v1alpha1");
const load = async (kind) =>
  (await import(pathToFileURL(join(typesDir, `${kind}.js`)).href))[kind];
const models = {
  ScaledObject: await load("ScaledObject"),
  TriggerAuthentication: await load("TriggerAuthentication"),
};

// Properties of a KEDA interface, from its .d.ts: name -> referenced KEDA type or null.
const PREFIX = "IComGithubKedacoreKedaV2ApisKedaV1alpha1";
const cache = new Map();
function props(type) {
  if (cache.has(type)) return cache.get(type);
  const text = readFileSync(join(typesDir, `${type}.d.ts`), "utf8");
  // An alias (`export type IX = IComGithub…Y;`) stands for Y.
  const alias = text.match(new RegExp(`export type I${type} = ${PREFIX}(\\w+);`));
  if (alias) {
    const map = props(alias[1]);
    cache.set(type, map);
    return map;
  }
  const body = text.match(/export interface I\w+ \{\n([\s\S]*?)\n\}/);
  if (!body) throw new Error(`no interface in ${type}.d.ts`);
  const map = new Map();
  for (const m of body[1].matchAll(/^ {4}"([^"]+)"\??: (.*?);?$/gm)) {
    const ref = m[2].match(new RegExp(`${PREFIX}(\\w+)`));
    map.set(m[1], ref ? ref[1] : null);
  }
  cache.set(type, map);
  return map;
}

function strict(value, type, path, problems) {
  if (Array.isArray(value)) {
    value.forEach((v, i) => strict(v, type, `${path}[${i}]`, problems));
    return;
  }
  if (value === null || typeof value !== "object") return;
  const known = props(type);
  for (const [k, v] of Object.entries(value)) {
    if (!known.has(k)) {
      problems.push(`${path}.${k}: unknown field (${type} has: ${[...known.keys()].join(", ")})`);
    } else if (known.get(k)) {
      strict(v, known.get(k), `${path}.${k}`, problems);
    }
  }
}

const REDIS_STREAMS_PARAMS = new Set([
  "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
  "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup",
  "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
  "enableTLS", "unsafeSsl", "databaseIndex",
]);
const REDIS_CLUSTER_STREAMS_PARAMS = new Set([
  "addresses", "addressesFromEnv", "hosts", "hostsFromEnv", "ports", "portsFromEnv",
  "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup",
  "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
  "enableTLS", "unsafeSsl",
]);
const INTEGER_PARAMS = ["port", "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount", "databaseIndex"];
const BOOL_PARAMS = ["enableTLS", "unsafeSsl"];

function redisStreams(trigger, path, problems) {
  const cluster = trigger.type === "redis-cluster-streams";
  const allowed = cluster ? REDIS_CLUSTER_STREAMS_PARAMS : REDIS_STREAMS_PARAMS;
  const md = trigger.metadata ?? {};
  for (const [k, v] of Object.entries(md)) {
    if (!allowed.has(k)) problems.push(`${path}.metadata.${k}: not a parameter of the ${trigger.type} scaler`);
    if (typeof v !== "string") problems.push(`${path}.metadata.${k}: must be a string, is ${typeof v}`);
  }
  for (const k of INTEGER_PARAMS) {
    if (k in md && !/^[0-9]+$/.test(String(md[k]))) problems.push(`${path}.metadata.${k}: "${md[k]}" is not a non-negative integer`);
  }
  for (const k of BOOL_PARAMS) {
    if (k in md && !["true", "false"].includes(String(md[k]))) problems.push(`${path}.metadata.${k}: must be "true" or "false"`);
  }
  if (!md.stream) problems.push(`${path}.metadata.stream: required`);
  const where = cluster
    ? ["addresses", "addressesFromEnv", "hosts", "hostsFromEnv"]
    : ["address", "addressFromEnv", "host", "hostFromEnv"];
  if (!where.some((k) => md[k])) problems.push(`${path}.metadata: one of ${where.join(", ")} is required`);
  if (!cluster && (md.host || md.hostFromEnv) && !(md.port || md.portFromEnv)) {
    problems.push(`${path}.metadata: host needs port (or portFromEnv)`);
  }
  if ("lagCount" in md) {
    if (!md.consumerGroup) problems.push(`${path}.metadata.consumerGroup: required with lagCount`);
    if (!("activationLagCount" in md)) problems.push(`${path}.metadata.activationLagCount: required with lagCount`);
  }
  if (("pendingEntriesCount" in md || "lagCount" in md) && !md.consumerGroup) {
    problems.push(`${path}.metadata.consumerGroup: required for pendingEntriesCount/lagCount`);
  }
}

// KEDA 2.11+ (metricName and cortexOrgID are deprecated there, gone in 2.12).
const PROMETHEUS_PARAMS = new Set([
  "serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
  "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "authModes", "timeout",
]);

function prometheus(trigger, path, problems) {
  const md = trigger.metadata ?? {};
  for (const [k, v] of Object.entries(md)) {
    if (!PROMETHEUS_PARAMS.has(k)) problems.push(`${path}.metadata.${k}: not a parameter of the prometheus scaler`);
    if (typeof v !== "string") problems.push(`${path}.metadata.${k}: must be a string, is ${typeof v}`);
  }
  for (const k of ["serverAddress", "query", "threshold"]) {
    if (!md[k]) problems.push(`${path}.metadata.${k}: required`);
  }
  for (const k of ["threshold", "activationThreshold"]) {
    if (k in md && !/^[0-9]+(\.[0-9]+)?$/.test(String(md[k]))) problems.push(`${path}.metadata.${k}: "${md[k]}" is not a non-negative number`);
  }
  for (const k of ["ignoreNullValues", "unsafeSsl"]) {
    if (k in md && !["true", "false"].includes(String(md[k]))) problems.push(`${path}.metadata.${k}: must be "true" or "false"`);
  }
  if (md.serverAddress && !/^https?:\/\/[^\s/]+/.test(md.serverAddress)) {
    problems.push(`${path}.metadata.serverAddress: "${md.serverAddress}" is not an http(s) URL`);
  }
}

const input = JSON.parse(readFileSync(0, "utf8"));
const problems = [];
let checked = 0;
for (const { file, index, doc } of input) {
  if (typeof doc?.apiVersion !== "string" || !doc.apiVersion.startsWith("keda.sh/")) continue;
  const where = `${file}#${index} ${doc.kind}/${doc.metadata?.name}`;
  const Model = models[doc.kind];
  if (doc.apiVersion !== "keda.sh/v1alpha1" || !Model) {
    problems.push(`${where}: unsupported KEDA kind ${doc.apiVersion} ${doc.kind}`);
    continue;
  }
  checked++;
  try {
    new Model(doc).validate();
  } catch (e) {
    problems.push(`${where}: schema: ${e.message}`);
  }
  const local = [];
  for (const k of Object.keys(doc)) {
    if (!["apiVersion", "kind", "metadata", "spec"].includes(k)) local.push(`.${k}: unknown top-level field`);
  }
  strict(doc.spec, `${doc.kind}Spec`, ".spec", local);
  if (doc.kind === "ScaledObject") {
    (doc.spec?.triggers ?? []).forEach((t, i) => {
      if (t.type === "redis-streams" || t.type === "redis-cluster-streams") redisStreams(t, `.spec.triggers[${i}]`, local);
      else if (t.type === "prometheus") prometheus(t, `.spec.triggers[${i}]`, local);
      else local.push(`.spec.triggers[${i}].type: ${t.type} is not a scaler this check knows`);
    });
  }
  problems.push(...local.map((p) => `${where}: ${p}`));
  console.log(`checked ${where}`);
}
for (const p of problems) console.log(`PROBLEM ${p}`);
console.log(`${checked} KEDA object(s) checked, ${problems.length} problem(s)`);
process.exit(problems.length ? 1 : 0);
