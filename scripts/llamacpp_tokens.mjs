// llama.cpp's own tokenizer on a text, for holding strata's against it: node
// scripts/llamacpp_tokens.mjs MODEL.gguf TEXT_FILE prints the token ids (no BOS; special tokens
// such as <start_of_turn> read as themselves, as Hugging Face tokenizers and strata do) as one JSON line. Uses node-llama-cpp 3.21.1 from LLAMACPP_DIR (installed by
// scripts/llamacpp_check.sh); compare with `strata inspect MODEL.gguf --tokenize "$(cat TEXT_FILE)"`.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [modelPath, textPath] = process.argv.slice(2);
const dir = process.env.LLAMACPP_DIR;
if (!modelPath || !textPath || !dir) {
  console.error("usage: LLAMACPP_DIR=DIR node scripts/llamacpp_tokens.mjs MODEL.gguf TEXT_FILE");
  process.exit(2);
}
const { getLlama, LlamaLogLevel } = await import(
  pathToFileURL(`${dir}/node_modules/node-llama-cpp/dist/index.js`).href
);
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath, vocabOnly: true });
console.log(JSON.stringify(Array.from(model.tokenize(readFileSync(textPath, "utf8"), true))));
await llama.dispose();
