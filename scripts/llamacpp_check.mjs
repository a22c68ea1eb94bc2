// Holds a GGUF that strata wrote to llama.cpp's reading of it: node scripts/llamacpp_check.mjs
// MODEL.gguf LOGITS.json [LORA.gguf], where LOGITS.json is `strata inspect MODEL.gguf --logits
// TEXT --json LOGITS.json` (with `--adapter` when llama.cpp is given the adapter as LORA.gguf). llama.cpp (node-llama-cpp's prebuilt CPU build, installed by llamacpp_check.sh)
// tokenizes the same text and scores the same ids; printed as one JSON line: whether the token
// ids agree, the arg-max agreement of the next-token distributions, the largest probability
// gap, and both sides' mean negative log-likelihood of the text's own next tokens.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [modelPath, logitsPath, loraPath] = process.argv.slice(2);
const dir = process.env.LLAMACPP_DIR;
if (!modelPath || !logitsPath || !dir) {
  console.error("usage: LLAMACPP_DIR=DIR node scripts/llamacpp_check.mjs MODEL.gguf LOGITS.json [LORA.gguf]");
  process.exit(2);
}
const { getLlama, LlamaLogLevel } = await import(
  pathToFileURL(`${dir}/node_modules/node-llama-cpp/dist/index.js`).href
);
const ref = JSON.parse(readFileSync(logitsPath, "utf8"));
if (ref.logits_f32) {
  // Large vocabularies: raw little-endian f32 [tokens, vocab] beside the JSON.
  const buf = readFileSync(new URL(ref.logits_f32, pathToFileURL(logitsPath)));
  const all = new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
  ref.logits = ref.ids.map((_, i) => Array.from(all.subarray(i * ref.vocab, (i + 1) * ref.vocab)));
}
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath });
const ids = Array.from(model.tokenize(ref.text, false));
const sameIds = ids.length === ref.ids.length && ids.every((t, i) => t === ref.ids[i]);
const ctx = await model.createContext({
  contextSize: Math.max(64, ref.ids.length + 8),
  ...(loraPath ? { lora: { adapters: [{ filePath: loraPath, scale: 1 }] } } : {}),
});
const seq = ctx.getSequence();
// Every position scored on strata's ids, so both sides see the same inputs even if the
// tokenizers were to disagree (which `same_ids` reports).
const out = await seq.controlledEvaluate(ref.ids.map((t) => [t, { generateNext: { probabilities: true } }]));

const softmax = (row) => {
  // A loop, not Math.max(...row): spreading a 152k-entry vocabulary overflows the stack.
  let m = -Infinity;
  for (const x of row) if (x > m) m = x;
  const e = row.map((x) => Math.exp(x - m));
  const z = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / z);
};
let agree = 0, maxGap = 0, nllStrata = 0, nllLlama = 0;
const n = ref.ids.length;
for (let i = 0; i < n; i++) {
  const p = softmax(ref.logits[i]);
  const q = out[i].next.probabilities;
  let top = 0;
  for (let v = 1; v < p.length; v++) if (p[v] > p[top]) top = v;
  const llamaTop = q.entries().next().value[0];
  if (top === llamaTop) agree++;
  for (let v = 0; v < p.length; v++) maxGap = Math.max(maxGap, Math.abs(p[v] - (q.get(v) ?? 0)));
  if (i + 1 < n) {
    const next = ref.ids[i + 1];
    nllStrata -= Math.log(p[next]);
    nllLlama -= Math.log(Math.max(q.get(next) ?? 0, 1e-30));
  }
}
console.log(JSON.stringify({
  model: modelPath,
  lora: loraPath ?? null,
  tokens: n,
  same_ids: sameIds,
  argmax_agreement: agree / n,
  max_prob_gap: maxGap,
  nll_strata: nllStrata / (n - 1),
  nll_llamacpp: nllLlama / (n - 1),
}));
await llama.dispose();
