'use strict';
// Node.js client of lossgrad.v1.LossService, built at run time from
// proto/lossgrad/v1/lossgrad.proto with @grpc/proto-loader (no generated code).
//
//   const { LossClient, tensor } = require('./client');
//   const client = new LossClient('127.0.0.1:50051', { timeoutMs: 10000 });
//   const result = await client.computeGradient(
//     'huber', tensor(new Float32Array([0.5, 2.0]), [2]), tensor(new Float32Array([0, 0])),
//     { params: { delta: 1.0 } });
//   // result.loss: a number; result.gradient: { data: Float32Array, shape: [2] }
//   client.close();
//
// Tensors are { data, shape }: data is a Float32Array or Float64Array (predictions,
// weights), or an Int32Array or BigInt64Array (class indices); its dtype is the dtype
// on the wire. Parameter names are those ListLosses gives: the LossParams fields (delta,
// from_logits, ...) are set as such, any other name (a plugin loss's parameter) travels in
// LossParams.by_name, typed by its value: a boolean, an integer (a Number with no fraction,
// or a BigInt; the server takes it for a double parameter too), another Number, or an
// array of numbers. Errors are grpc-js ServiceErrors (code, details).

const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = 'lossgrad/v1/lossgrad.proto';
const DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024;

const DTYPES = {
  DATA_TYPE_FLOAT32: Float32Array,
  DATA_TYPE_FLOAT64: Float64Array,
  DATA_TYPE_INT32: Int32Array,
  DATA_TYPE_INT64: BigInt64Array,
};
const REDUCTIONS = { none: 'REDUCTION_NONE', sum: 'REDUCTION_SUM', mean: 'REDUCTION_MEAN' };

const definition = protoLoader.loadSync(PROTO_FILE, {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names as in the proto: sample_weight, from_logits, ...
  longs: Number, // int64 shapes and counts (all below 2**53)
  enums: String,
  defaults: true,
});
const LossService = grpc.loadPackageDefinition(definition).lossgrad.v1.LossService;
const PARAM_NAMES = definition['lossgrad.v1.LossParams'].type.field.map((f) => f.name);

/** A tensor argument: a typed array and its shape (default: one dimension). */
function tensor(data, shape = [data.length]) {
  return { data, shape };
}

function toMessage(value, field) {
  const { data, shape } = value;
  const dtype = Object.keys(DTYPES).find((name) => data instanceof DTYPES[name]);
  if (dtype === undefined) {
    throw new TypeError(`${field}: expected a Float32Array, Float64Array, Int32Array or ` +
                        `BigInt64Array, got ${data && data.constructor && data.constructor.name}`);
  }
  if (shape.reduce((n, d) => n * d, 1) !== data.length) {
    throw new RangeError(`${field}: shape [${shape}] does not hold ${data.length} elements`);
  }
  // The wire is little-endian: the typed array's own bytes, without a copy.
  return { dtype, shape, data: Buffer.from(data.buffer, data.byteOffset, data.byteLength) };
}

function fromMessage(message, field) {
  const Type = DTYPES[message.dtype];
  if (Type === undefined) throw new Error(`${field}: unknown dtype ${message.dtype}`);
  const shape = message.shape.map(Number);
  const length = shape.reduce((n, d) => n * d, 1);
  const bytes = message.data;
  if (bytes.length !== length * Type.BYTES_PER_ELEMENT) {
    throw new Error(`${field}: ${bytes.length} bytes for shape [${shape}] of ${message.dtype}`);
  }
  if (bytes.byteOffset % Type.BYTES_PER_ELEMENT === 0) {
    return { data: new Type(bytes.buffer, bytes.byteOffset, length), shape };
  }
  const data = new Type(length); // a view needs aligned bytes: copy
  new Uint8Array(data.buffer).set(bytes);
  return { data, shape };
}

/** A plugin parameter's ParamValue, typed by the JavaScript value. */
function paramValue(value, field) {
  if (typeof value === 'boolean') return { bool_value: value };
  if (typeof value === 'bigint') return { int64_value: value.toString() };
  if (typeof value === 'number') {
    return Number.isSafeInteger(value) ? { int64_value: value } : { double_value: value };
  }
  if (Array.isArray(value) && value.every((v) => typeof v === 'number')) {
    return { double_list_value: { values: value } };
  }
  throw new TypeError(`${field}: expected a boolean, number, BigInt or array of numbers, ` +
                      `got ${value === null ? 'null' : typeof value}`);
}

function request(loss, predictions, targets, options) {
  const { reduction = 'mean', sampleWeight = null, params = {}, allowNonfinite = false } = options;
  if (!(reduction in REDUCTIONS)) {
    throw new RangeError(`reduction: expected one of ${Object.keys(REDUCTIONS)}, got ${reduction}`);
  }
  const typed = {};
  const byName = {};
  for (const [name, value] of Object.entries(params)) {
    if (PARAM_NAMES.includes(name) && name !== 'by_name') typed[name] = value;
    else byName[name] = paramValue(value, `params.${name}`);
  }
  if (Object.keys(byName).length > 0) typed.by_name = byName;
  return {
    loss,
    predictions: toMessage(predictions, 'predictions'),
    targets: toMessage(targets, 'targets'),
    sample_weight: sampleWeight === null ? null : toMessage(sampleWeight, 'sample_weight'),
    reduction: REDUCTIONS[reduction],
    params: Object.keys(typed).length > 0 ? typed : null,
    allow_nonfinite: allowNonfinite,
  };
}

function result(response, reduction) {
  return {
    // A number, or the per-position values { data, shape } for reduction 'none'.
    loss: reduction === 'none' ? fromMessage(response.losses, 'losses') : response.loss,
    positions: response.positions,
    positionsCounted: response.positions_counted,
    weightSum: response.weight_sum,
  };
}

class LossClient {
  /**
   * target: 'host:port' or any gRPC target ('dns:///lossgrad-headless.ns.svc.cluster.local:50051').
   * timeoutMs: the deadline of every call (null: none). credentials: grpc.credentials.* (default
   * plaintext). options: extra channel options.
   */
  constructor(target, { timeoutMs = null, credentials = grpc.credentials.createInsecure(),
    maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES, options = {} } = {}) {
    this.timeoutMs = timeoutMs;
    this.stub = new LossService(target, credentials, {
      'grpc.max_send_message_length': maxMessageBytes,
      'grpc.max_receive_message_length': maxMessageBytes,
      ...options,
    });
  }

  call(method, message) {
    const callOptions = this.timeoutMs === null ? {} : { deadline: Date.now() + this.timeoutMs };
    return new Promise((resolve, reject) => {
      this.stub[method](message, callOptions, (err, response) => (err ? reject(err) : resolve(response)));
    });
  }

  /** The loss: { loss, positions, positionsCounted, weightSum }. */
  async computeLoss(loss, predictions, targets, options = {}) {
    const message = request(loss, predictions, targets, options);
    return result(await this.call('ComputeLoss', message), options.reduction || 'mean');
  }

  /** The loss and its gradient w.r.t. the predictions ({ data, shape }, the predictions' dtype). */
  async computeGradient(loss, predictions, targets, options = {}) {
    const message = request(loss, predictions, targets, options);
    const response = await this.call('ComputeGradient', message);
    return {
      ...result(response, options.reduction || 'mean'),
      gradient: fromMessage(response.gradient, 'gradient'),
    };
  }

  /** The catalog: the ListLossesResponse's losses, as plain objects. */
  async listLosses() {
    return (await this.call('ListLosses', {})).losses;
  }

  close() {
    this.stub.close();
  }
}

if (os.endianness() !== 'LE') {
  throw new Error('lossgrad tensors are little-endian; this client sends typed arrays as they are');
}

module.exports = { LossClient, tensor };
