"""metallic end to end on a GPU: correctness first, then pp512 / tg128 beside HF transformers.

For each model (the real Gemma 3 270M given with --model, synthetic ones written with
--synthetic PRESET):

1. Checks. On a real model with --fixture: teacher-forced argmax agreement with llama.cpp's
   recorded logits and the identical greedy prefix per prompt (issue 4: >= 98%, >= 16 tokens);
   the GPU logits against metallic's CPU torch path on the same tokens; greedy text with and
   without CUDA graphs identical.
2. Speed, llama-bench's definitions: pp512 = a 512-token prompt processed (to the last token's
   logits); tg128 = 128 tokens generated one at a time after a 1-token prompt (greedy, including
   sampling and detokenization: what a user gets).
3. Baselines in the same run: the bandwidth floor (weight bytes read per token / measured copy
   bandwidth) and HF transformers in bf16 at the same shapes (weights random: transformers
   dequantizes a GGUF to bf16 anyway, and speed does not depend on the values).

Prints a table and writes JSON to $OUT (the device tool's folder) or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.gguf.config import ModelConfig
from metallic.kernels import quant_gemv
from metallic.testing.synthetic import write_synthetic_model

PP, TG = 512, 128


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def bytes_per_token(engine: Engine) -> int:
    """Weight bytes one decode step reads: every layer matrix and vector, the output matrix,
    and (untied) one embedding row's worth, which is negligible and left out."""
    w = engine.model.weights
    embedding = 0 if w.embedding is w.output else w.embedding.nbytes
    return w.nbytes - embedding


def file_tensor_bytes(engine: Engine) -> int:
    return sum(t.n_bytes for t in engine.gguf.tensors.values())


def greedy(engine: Engine, ids: list[int], n: int) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [step.token_id for step in engine.generate_tokens(ids, params)]


def prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def checks(engine: Engine, fixture: Path | None, cpu_engine: Engine | None) -> dict:
    out: dict[str, object] = {}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(100, engine.config.vocab_size, (40,), generator=gen).tolist()
    sampled = SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True)
    with_graphs = greedy(engine, ids, 32)
    with_graphs_sampled = [s.token_id for s in engine.generate_tokens(ids, sampled)]
    engine.runner.cuda_graphs = False  # eager steps
    without = greedy(engine, ids, 32)
    without_sampled = [s.token_id for s in engine.generate_tokens(ids, sampled)]
    engine.runner.cuda_graphs = True
    out["graphs_same_greedy_tokens"] = prefix(with_graphs, without)
    out["graphs_same_sampled_tokens"] = prefix(with_graphs_sampled, without_sampled)
    if cpu_engine is not None:  # the kernel path against the torch path, same tokens
        cpu, gpu = cpu_engine.logits(ids), engine.logits(ids).cpu()
        out["cpu_rel_logit_err"] = float((gpu - cpu).norm() / cpu.norm())
        out["cpu_argmax_agreement"] = float((cpu.argmax(-1) == gpu.argmax(-1)).float().mean())
        out["cpu_same_greedy_tokens"] = prefix(greedy(cpu_engine, ids, 16), with_graphs[:16])
        # Past sliding windows (whose blocks the paged cache recycles) and prompt chunks.
        long_ids = torch.randint(100, engine.config.vocab_size, (1100,), generator=gen).tolist()
        cpu, gpu = cpu_engine.logits(long_ids), engine.logits(long_ids).cpu()
        out["cpu_long_rel_logit_err"] = float((gpu - cpu).norm() / cpu.norm())
        out["cpu_long_argmax_agreement"] = float((cpu.argmax(-1) == gpu.argmax(-1)).float().mean())
    if fixture is None:
        return out
    ref = json.loads(fixture.read_text())
    tf = ref["teacher_forcing"]
    logits = engine.logits(tf["ids"])
    argmax = logits.argmax(-1).tolist()
    out["llamacpp_argmax_agreement"] = sum(
        a == b for a, b in zip(argmax, tf["argmax"], strict=True)
    ) / len(argmax)
    worst = 0.0
    for pos, top in zip(tf["sampled_positions"], tf["sampled_top_logits"], strict=True):
        top_ids = torch.tensor([i for i, _ in top], device=logits.device)
        values = torch.tensor([v for _, v in top], device=logits.device)
        worst = max(worst, float((logits[pos, top_ids] - values).abs().max()))
    out["llamacpp_max_top20_logit_diff"] = worst
    out["llamacpp_greedy_prefixes"] = [
        prefix(greedy(engine, p["prompt_ids"], len(p["greedy_ids"])), p["greedy_ids"])
        for p in ref["prompts"]
    ]
    return out


def metallic_speed(engine: Engine, repeats: int = 3) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    vocab = engine.config.vocab_size
    prompt = torch.randint(100, vocab, (PP,), generator=gen).tolist()
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    tg = SamplingParams(temperature=0.0, max_tokens=TG + 1, ignore_eos=True)
    pp_s, tg_s = [], []
    for _ in range(repeats + 1):  # the first round warms up (compiles, captures the graph)
        list(engine.generate_tokens(prompt, one))
        pp_s.append(engine.last_stats.prefill_seconds)
        list(engine.generate_tokens(prompt[:1], tg))
        tg_s.append(engine.last_stats.decode_seconds)
    return {"pp512": PP / statistics.median(pp_s[1:]), "tg128": TG / statistics.median(tg_s[1:])}


def float_gemv_baseline(engine: Engine) -> dict[str, object]:
    """The same engine with every one-row product on the float kernel (the dp4a kernels off):
    its speed, and how far its logits and greedy tokens are from the dp4a run's."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(100, engine.config.vocab_size, (40,), generator=gen).tolist()
    dp4a_tokens = greedy(engine, ids, 32)
    dp4a_logits = engine.logits(ids[:1]).float()  # one row: the decode kernels
    limit = quant_gemv.DP4A_MIN_BYTES
    quant_gemv.DP4A_MIN_BYTES = 1 << 62
    engine.runner.graphs = None  # recapture without the dp4a kernels
    try:
        result: dict[str, object] = dict(metallic_speed(engine))
        float_logits = engine.logits(ids[:1]).float()
        result["same_greedy_tokens"] = prefix(greedy(engine, ids, 32), dp4a_tokens)
        result["decode_rel_logit_diff"] = float(
            (dp4a_logits - float_logits).norm() / float_logits.norm()
        )
    finally:
        quant_gemv.DP4A_MIN_BYTES = limit
        engine.runner.graphs = None
    return result


def hf_speed(c: ModelConfig, repeats: int = 3) -> dict[str, float]:
    """HF transformers, bf16, random weights at the model's shapes, on the same GPU."""
    import transformers

    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.ffn_size,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_eps,
        max_position_embeddings=4096,
    )
    if c.arch == "gemma3":
        config = transformers.Gemma3TextConfig(
            **common, sliding_window=c.sliding_window, rope_theta=c.rope_base
        )
        model_class = transformers.Gemma3ForCausalLM
    else:
        config = transformers.LlamaConfig(**common, rope_theta=c.rope_base)
        model_class = transformers.LlamaForCausalLM
    with torch.device("cuda"):
        model = model_class(config).to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, c.vocab_size, (1, PP), generator=gen).cuda()
    pp_s, tg_s = [], []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            began = time.perf_counter()
            model(prompt, logits_to_keep=1)
            torch.cuda.synchronize()
            pp_s.append(time.perf_counter() - began)
            began = time.perf_counter()
            model.generate(prompt[:, :1], max_new_tokens=TG, min_new_tokens=TG, do_sample=False)
            torch.cuda.synchronize()
            tg_s.append(time.perf_counter() - began)
    del model
    torch.cuda.empty_cache()
    return {"pp512": PP / statistics.median(pp_s[1:]), "tg128": TG / statistics.median(tg_s[1:])}


def run_model(label: str, path: Path, args: argparse.Namespace, copy_bw: float) -> dict:
    began = time.perf_counter()
    engine = Engine(path, device="cuda", context_size=args.ctx)
    load_s = time.perf_counter() - began
    row: dict[str, object] = {"model": label, "load_s": load_s}
    row["weight_bytes_device"] = engine.model.weights.nbytes
    row["weight_bytes_file"] = file_tensor_bytes(engine)
    row["bytes_per_token"] = bytes_per_token(engine)
    row["floor_tok_s"] = copy_bw / row["bytes_per_token"]
    small = path.stat().st_size < 1 << 30  # the CPU path of an 8B model would take minutes
    cpu = Engine(path, device="cpu", context_size=args.ctx) if args.cpu and small else None
    row["checks"] = checks(engine, args.fixture if label == "gemma" else None, cpu)
    row["kv_pools"] = engine.stats()["kv_pools"]
    print(label, json.dumps(row["checks"]), flush=True)
    row["metallic"] = metallic_speed(engine)
    config = engine.config
    print(label, "metallic", row["metallic"], flush=True)
    if args.float_gemv:
        row["float_gemv"] = float_gemv_baseline(engine)
        print(label, "float GEMV only", row["float_gemv"], flush=True)
    del engine
    torch.cuda.empty_cache()
    if args.hf:
        row["hf"] = hf_speed(config)
        print(label, "hf", row["hf"], flush=True)
    return row


def print_table(rows: list[dict], copy_bw: float, device: str) -> None:
    print(f"\n{device}; copy bandwidth (read+write) {copy_bw / 1e12:.2f} TB/s")
    print(
        f"{'model':<12} {'test':<6} {'metallic':>10} {'HF bf16':>10} {'floor':>10} "
        f"{'% floor':>8} {'weights/file':>12}"
    )
    for r in rows:
        for test in ("pp512", "tg128"):
            hf = r.get("hf", {}).get(test)
            floor = r["floor_tok_s"] if test == "tg128" else None
            got = r["metallic"][test]
            print(
                f"{r['model']:<12} {test:<6} {got:>10.0f} "
                f"{(f'{hf:.0f}' if hf else '-'):>10} {(f'{floor:.0f}' if floor else '-'):>10} "
                f"{(f'{100 * got / floor:.0f}%' if floor else '-'):>8} "
                f"{r['weight_bytes_device'] / r['weight_bytes_file']:>12.3f}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a real GGUF (checked against --fixture)")
    parser.add_argument("--fixture", type=Path, help="llama.cpp fixture JSON for --model")
    parser.add_argument(
        "--cpu", action="store_true", help="compare models under 1 GB with the CPU path"
    )
    parser.add_argument("--synthetic", action="append", default=[], help="preset, e.g. llama3-8b")
    parser.add_argument("--mix", default="Q4_K_M")
    parser.add_argument("--hf", action="store_true", help="HF transformers baseline")
    parser.add_argument(
        "--float-gemv", action="store_true", help="also time decode without the dp4a kernels"
    )
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/metallic-bench"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_generate: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    rows = []
    if args.model:
        rows.append(run_model("gemma", args.model, args, copy_bw))
    args.workdir.mkdir(parents=True, exist_ok=True)
    for preset in args.synthetic:
        path = args.workdir / f"{preset}-{args.mix}.gguf"
        if not path.exists():
            began = time.perf_counter()
            write_synthetic_model(path, preset, args.mix)
            print(f"wrote {path} in {time.perf_counter() - began:.0f} s", flush=True)
        rows.append(run_model(preset, path, args, copy_bw))
    print_table(rows, copy_bw, device)
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "copy_bandwidth": copy_bw, "rows": rows}
    (out / "gpu_generate.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
