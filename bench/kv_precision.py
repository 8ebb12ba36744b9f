"""What flash attention and the KV cache types cost in precision: how far each moves the model's next-token
distributions from the most precise setting (an f32 cache, flash attention off), over a text the model reads.

For every position of the text (`--tokens`, the project's docs by default) the script takes the model's log
probabilities under each setting and reports the mean KL divergence from the reference and how often the most
likely token is the same: llama.cpp's `llama-perplexity --kl-divergence` measure, through the node's own
options (`LlamaOptions`), so the settings are the node's flags.

    .venv/bin/python bench/kv_precision.py [--model NAME_OR_GGUF] [--tokens 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import llama_cpp
import numpy as np

from llamakit.catalog import DEFAULT_MODEL, resolve_model
from llamakit.node.placement import LlamaOptions, load_model

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
# (flash attention, K type, V type), the reference first.
SETTINGS = [
    ("off", "f32", "f32"),
    ("off", "f16", "f16"),
    ("on", "f16", "f16"),
    ("on", "bf16", "bf16"),
    ("on", "q8_0", "f16"),
    ("on", "q8_0", "q8_0"),
    ("on", "f16", "q4_0"),
    ("on", "q4_0", "q4_0"),
]


def log_probs(model: object, tokens: list[int], options: LlamaOptions, threads: int) -> np.ndarray:
    """The log probabilities of the next token at every position of `tokens`, decoded BATCH at a time."""
    params = options.context_params(llama_cpp.llama_context_default_params())
    params.n_ctx = len(tokens) + BATCH
    params.n_batch = params.n_ubatch = BATCH
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model.model, params)  # type: ignore[attr-defined]
    if not ctx:
        raise RuntimeError(f"llama.cpp refused a context with {options}")
    n_vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)  # type: ignore[attr-defined]
    batch = llama_cpp.llama_batch_init(BATCH, 0, 1)
    rows = []
    try:
        for start in range(0, len(tokens), BATCH):
            chunk = tokens[start : start + BATCH]
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, True
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(chunk)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            logits = llama_cpp.llama_get_logits(ctx)
            rows.append(np.ctypeslib.as_array(logits, shape=(len(chunk), n_vocab)).astype(np.float64))
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    out = np.concatenate(rows)
    out -= out.max(axis=1, keepdims=True)
    result: np.ndarray = out - np.log(np.exp(out).sum(axis=1, keepdims=True))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or .gguf path")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of text read (default 1024)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    parser.add_argument("--text", type=Path, help="the text to read (default: the project's docs)")
    args = parser.parse_args()
    resolved = resolve_model(args.model)
    model, _ = load_model(resolved.path, LlamaOptions(gpu_layers=0))
    sources = [args.text] if args.text else sorted((ROOT / "docs").glob("*.md"))
    text = "\n\n".join(path.read_text() for path in sources)
    tokens = model.tokenize(text.encode(), add_bos=True, special=False)[: args.tokens]
    print(f"{resolved.name}, {len(tokens)} tokens, llama-cpp-python {llama_cpp.__version__}")
    print(f"{'flash attention':<16} {'K':<5} {'V':<5} {'mean KL':>9} {'same top token':>15}")
    reference: np.ndarray | None = None
    for flash_attn, k, v in SETTINGS:
        options = LlamaOptions(gpu_layers=0, flash_attn=flash_attn, cache_type_k=k, cache_type_v=v)  # type: ignore[arg-type]
        lp = log_probs(model, tokens, options, args.threads)
        if reference is None:
            reference = lp
        kl = float((np.exp(reference) * (reference - lp)).sum(axis=1).mean())
        same = float((reference.argmax(axis=1) == lp.argmax(axis=1)).mean())
        print(f"{flash_attn:<16} {k:<5} {v:<5} {kl:>9.5f} {same * 100:>14.1f}%", flush=True)
    model.close()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
