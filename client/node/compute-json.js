'use strict';
// Runs requests given as JSON on stdin against a server and writes the results as JSON.
//
//   node client/node/compute-json.js 127.0.0.1:50051 < requests.json
//
// stdin: a list of { method: "computeLoss" | "computeGradient", loss, predictions,
// targets, sample_weight?, reduction?, params?, allow_nonfinite? }, each tensor as
// { dtype: "float32" | "float64" | "int32" | "int64", shape, data: base64 of its
// little-endian bytes }. stdout: one entry per request, in order: { loss, positions,
// positions_counted, weight_sum, gradient? } with tensors in the same form (loss is a
// tensor for reduction "none"), or { error: { code, details } }.

const { LossClient, tensor } = require('./client');

const TYPES = { float32: Float32Array, float64: Float64Array, int32: Int32Array, int64: BigInt64Array };

function decode(value) {
  const bytes = Buffer.from(value.data, 'base64');
  const Type = TYPES[value.dtype];
  const data = new Type(bytes.length / Type.BYTES_PER_ELEMENT);
  new Uint8Array(data.buffer).set(bytes);
  return tensor(data, value.shape);
}

function encode({ data, shape }) {
  const dtype = Object.keys(TYPES).find((name) => data instanceof TYPES[name]);
  return { dtype, shape, data: Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString('base64') };
}

async function run(client, req) {
  const options = {
    reduction: req.reduction || 'mean',
    sampleWeight: req.sample_weight ? decode(req.sample_weight) : null,
    params: req.params || {},
    allowNonfinite: Boolean(req.allow_nonfinite),
  };
  try {
    const out = await client[req.method](req.loss, decode(req.predictions), decode(req.targets), options);
    return {
      loss: typeof out.loss === 'number' ? out.loss : encode(out.loss),
      positions: out.positions,
      positions_counted: out.positionsCounted,
      weight_sum: out.weightSum,
      ...(out.gradient ? { gradient: encode(out.gradient) } : {}),
    };
  } catch (err) {
    if (err.code === undefined) throw err; // not a gRPC status: a bug here
    return { error: { code: err.code, details: err.details } };
  }
}

async function main() {
  const [target] = process.argv.slice(2);
  if (!target) {
    process.stderr.write('usage: node compute-json.js HOST:PORT < requests.json\n');
    process.exit(2);
  }
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const requests = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  const client = new LossClient(target, { timeoutMs: 30000 });
  try {
    const results = [];
    for (const req of requests) results.push(await run(client, req));
    process.stdout.write(`${JSON.stringify(results)}\n`);
  } finally {
    client.close();
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
