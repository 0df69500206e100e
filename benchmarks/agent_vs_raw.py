"""Agent bench vs a plain llama-cpp-python loop: same model, prompt, threads, greedy, 64 tokens.

The agent path adds a worker process, a pipe hop per token, chat templating through the GGUF's
Jinja template and UTF-8 reassembly. This prints what that costs, as ratios (agent ÷ raw; goal
≥ 0.98 for decode tok/s and ≤ 1.02 for TTFT). Runs alternate between the two paths so slow drift
on a shared VM hits both alike.

    .venv/bin/python benchmarks/agent_vs_raw.py [--runs 5] [--threads 2] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from agent.bench import DEFAULT_MESSAGES
from agent.generation import run_generation
from agent.models import resolve_model
from agent.worker import InferenceWorker, WorkerConfig
from backends.base import BackendOptions, GenerationRequest, ModelSpec


def raw_run(llm, max_tokens: int, eog: set[int]) -> tuple[float, float, int]:
    """One generation straight on llama-cpp-python: (ttft_ms, decode_tok_s, tokens)."""
    import llama_cpp

    llm.reset()
    t0 = time.monotonic_ns()
    messages = [dict(m) for m in DEFAULT_MESSAGES]
    times = []
    def ban(_ids, scores):
        scores[sorted(eog)] = -float("inf")
        return scores
    for chunk in llm.create_chat_completion(
        messages, max_tokens=max_tokens, stream=True, temperature=0.0,
        logits_processor=llama_cpp.LogitsProcessorList([ban]),
    ):
        if chunk["choices"][0]["delta"].get("content"):
            times.append(time.monotonic_ns())
    n = len(times)
    return (times[0] - t0) / 1e6, (n - 1) / ((times[-1] - times[0]) / 1e9), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    import llama_cpp

    model = resolve_model("smollm2-135m")
    llm = llama_cpp.Llama(model_path=str(model.path), n_ctx=2048, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    eog = {llm.token_eos()}
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eog |= {t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    worker = InferenceWorker(WorkerConfig(
        backend="llamacpp",
        model=ModelSpec(model.name, model.path, model.format, model.sha256),
        options=BackendOptions(threads=args.threads, context_tokens=2048),
    ))
    worker.start()
    request = GenerationRequest(messages=DEFAULT_MESSAGES, max_tokens=args.max_tokens,
                                ignore_eos=True)
    # warm both paths
    raw_run(llm, 8, eog)
    run_generation(worker, GenerationRequest(messages=DEFAULT_MESSAGES, max_tokens=8))
    raw_ttft, raw_tgs, agent_ttft, agent_tgs = [], [], [], []
    for _ in range(args.runs):
        ttft, tgs, _n = raw_run(llm, args.max_tokens, eog)
        raw_ttft.append(ttft)
        raw_tgs.append(tgs)
        r = run_generation(worker, request)
        assert r.completion_tokens == args.max_tokens, r.completion_tokens
        agent_ttft.append(r.timings.ttft_ms or float("nan"))
        agent_tgs.append(r.timings.decode_tok_s or float("nan"))
    worker.stop()

    med = statistics.median
    load = os.getloadavg()
    print(f"SmolLM2-135M Q4_1, {args.threads} threads, {args.max_tokens} tokens, "
          f"{args.runs} alternating runs (medians); load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'metric':<16}{'raw llama.cpp':>15}{'agent':>12}{'agent/raw':>12}")
    print(f"{'decode tok/s':<16}{med(raw_tgs):>15.1f}{med(agent_tgs):>12.1f}"
          f"{med(agent_tgs) / med(raw_tgs):>12.3f}")
    print(f"{'TTFT ms':<16}{med(raw_ttft):>15.1f}{med(agent_ttft):>12.1f}"
          f"{med(agent_ttft) / med(raw_ttft):>12.3f}")
    # Each agent run against the raw run just before it: drift between pairs cancels.
    paired = med(a / r for a, r in zip(agent_tgs, raw_tgs, strict=True))
    print(f"{'decode, paired':<16}{'':>15}{'':>12}{paired:>12.3f}")


if __name__ == "__main__":
    main()
