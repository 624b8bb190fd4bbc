"""`metallic` command line: inspect, tokenize, run, chat, bench and doctor.

Generated text goes to stdout, everything else (progress, stats, errors) to stderr. Every
`MetallicError` ends the process with one line and exit code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from metallic.errors import MetallicError

if TYPE_CHECKING:  # heavy imports (torch) wait until a command needs them
    from metallic.engine.engine import Engine
    from metallic.engine.sampling import SamplingParams
    from metallic.tools.profiling import ProfileSession

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _progress_bar(label: str) -> Callable[[int, int], None] | None:
    """A one-line progress bar on a terminal's stderr; silent when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        bar = "#" * filled + "-" * (width - filled)
        end = "\n" if done >= total else ""
        print(f"\r{label} [{bar}] {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def _model_path(value: str | None) -> Path:
    from metallic.gguf.default_model import default_model_path

    return Path(value) if value else default_model_path()


def cmd_inspect(args: argparse.Namespace) -> int:
    from metallic.gguf.reader import open_gguf

    path = _model_path(args.model)
    gguf = open_gguf(path)
    meta = gguf.metadata
    formats = Counter(t.type_name for t in gguf)
    params = sum(t.n_elements for t in gguf)
    arch = gguf.architecture
    info = {
        "file": str(path),
        "architecture": arch,
        "name": meta.get("general.name", ""),
        "parameters": params,
        "file_size": gguf.file_size,
        "tensors": len(gguf.tensors),
        "tensor_formats": dict(sorted(formats.items())),
        "context_length": meta.get(f"{arch}.context_length"),
        "tokenizer": meta.get("tokenizer.ggml.model"),
        "pre_tokenizer": meta.get("tokenizer.ggml.pre"),
        "vocab_size": len(meta.get("tokenizer.ggml.tokens") or []),
        "chat_template": isinstance(meta.get("tokenizer.chat_template"), str),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"file            {info['file']}")
    print(f"architecture    {arch}  {info['name']}")
    print(f"parameters      {params:,} ({params / 1e9:.3f} B)")
    print(f"file size       {gguf.file_size:,} bytes ({gguf.file_size / 2**20:.1f} MiB)")
    kinds = ", ".join(f"{name} {count}" for name, count in info["tensor_formats"].items())
    print(f"tensors         {len(gguf.tensors)}  ({kinds})")
    print(f"context length  {info['context_length']}")
    print(
        f"tokenizer       {info['tokenizer']} (pre: {info['pre_tokenizer']}), "
        f"{info['vocab_size']} tokens"
    )
    print(f"chat template   {'yes' if info['chat_template'] else 'no (built-in used)'}")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from metallic.gguf.reader import open_gguf
    from metallic.gguf.tokenizer import Tokenizer

    if len(args.words) == 1:
        model, text = None, args.words[0]
    elif len(args.words) == 2:
        model, text = args.words
    else:
        raise MetallicError("usage: metallic tokenize [MODEL] TEXT")
    tokenizer = Tokenizer.from_metadata(open_gguf(_model_path(model)).metadata)
    ids = tokenizer.encode(text, add_special=not args.no_bos, parse_special=args.special)
    print(json.dumps(ids))
    return 0


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults as llama.cpp)")
    g.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate")
    g.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95, help="1.0 = off")
    g.add_argument("--min-p", type=float, default=0.05, help="0 = off")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="1.0 = off")
    g.add_argument("--repeat-last-n", type=int, default=64, help="window of the penalties")
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="same seed, same text")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="GGUF file (default: Gemma 3 270M Q4_K_M)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size in tokens")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="f32, f16 or bf16 (default: by device)")
    p.add_argument(
        "--gpu-layers",
        type=int,
        default=None,
        metavar="N",
        help="keep the first N layers on the device, stream the rest from host memory",
    )
    p.add_argument(
        "--gpu-memory",
        default=None,
        metavar="SIZE",
        help="device memory budget, e.g. 2G: layers that don't fit are streamed from the host,"
        " and moved there when the KV cache needs room",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log placement and residency")


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    from metallic.engine.sampling import SamplingParams

    params = SamplingParams(
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        penalty_last_n=args.repeat_last_n,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    params.validate()
    return params


def _load(args: argparse.Namespace) -> Engine:
    from metallic.engine.engine import Engine

    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="metallic: %(message)s", stream=sys.stderr)
    return Engine(
        _model_path(args.model),
        device=args.device,
        dtype=args.dtype,
        context_size=args.ctx_size,
        progress=_progress_bar("loading"),
        gpu_layers=args.gpu_layers,
        memory_budget=args.gpu_memory,
    )


def cmd_run(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    _check_run_outputs(args)
    engine = _load(args)
    profiling = _start_run_profiling(args, engine)
    if args.json:
        steps = list(
            engine.generate_tokens(args.prompt, params, logprobs=5, truncate=args.truncate)
        )
        tok = engine.tokenizer
        result = {
            "prompt_ids": engine.encode_prompt(args.prompt, truncate=args.truncate),
            "generated_ids": [s.token_id for s in steps],
            "text": "".join(s.text for s in steps),
            "finish_reason": engine.last_stats.finish_reason,
            "top_logprobs": [
                [
                    {"id": i, "token": tok.token_bytes(i).decode("utf-8", "replace"), "logprob": lp}
                    for i, lp in s.top_logprobs
                ]
                for s in steps
            ],
        }
        print(json.dumps(result, ensure_ascii=False))
    else:
        for step in engine.generate_tokens(args.prompt, params, truncate=args.truncate):
            print(step.text, end="", flush=True)
        print(flush=True)
    if args.stats:
        s = engine.last_stats
        print(
            f"prompt {s.prompt_tokens} tokens in {s.prefill_seconds:.2f} s "
            f"({s.prompt_tokens / max(s.prefill_seconds, 1e-9):.1f} tok/s); "
            f"generated {s.generated_tokens} tokens, "
            f"decode {s.decode_tokens_per_second:.1f} tok/s ({s.finish_reason})",
            file=sys.stderr,
        )
        memory = engine.stats()
        pools = "".join(
            f"; {p['layers']} {'window ' + str(p['window']) if p['window'] else 'global'} layers "
            f"{p['blocks_used']}/{p['blocks']} blocks"
            for p in memory["kv_pools"]  # type: ignore[union-attr]
        )
        place: dict[str, int] = memory["placement"]  # type: ignore[assignment]
        streamed = ""
        if place["layers_streamed"]:
            streamed = (
                f"; {place['layers_streamed']} layers streamed from the host "
                f"({place['host_bytes'] / 2**20:.0f} MiB copied per step)"
            )
        if "evictions" in place:
            streamed += f"; residency moves out/back {place['evictions']}/{place['restores']}"
        print(
            f"{memory['device']} {memory['dtype']}: weights {memory['weight_bytes'] / 2**20:.0f} "
            f"MiB, KV cache {memory['kv_cache_bytes'] / 2**20:.0f} MiB{pools}{streamed}",
            file=sys.stderr,
        )
        print(_memory_kinds(memory), file=sys.stderr)
    if profiling is not None:
        _finish_run_profiling(engine, profiling, args)
    return 0


# `run --stats`: memory per kind; `run --profile` / `--trace`: where a step's time goes.


def _memory_kinds(stats: dict[str, object]) -> str:
    """The memory pool's current, peak and time-averaged bytes per kind; without a pool (the
    CPU path) the process's peak resident memory."""
    pool = stats["memory_pool"]
    if not isinstance(pool, dict):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return f"process peak memory {peak / 2**20:.0f} MiB (resident)"
    kinds = ", ".join(
        f"{kind} {k['current_bytes'] / 2**20:.1f}/{k['peak_bytes'] / 2**20:.1f}/"
        f"{k['average_bytes'] / 2**20:.1f}"
        for kind, k in pool["kinds"].items()
    )
    return f"memory pool MiB (current/peak/average): {kinds}"


def _check_run_outputs(args: argparse.Namespace) -> None:
    if args.trace:
        from metallic.tools.files import check_writable

        check_writable(Path(args.trace), "--trace")


def _start_run_profiling(args: argparse.Namespace, engine: Engine) -> ProfileSession | None:
    if not (args.profile or args.trace):
        return None
    from metallic.tools.profiling import ProfileSession

    return ProfileSession(engine, trace=Path(args.trace) if args.trace else None)


def _finish_run_profiling(
    engine: Engine, session: ProfileSession, args: argparse.Namespace
) -> None:
    from metallic.tools.profiling import format_report, profile_report

    session.stop()
    if args.profile:
        print(format_report(profile_report(engine, session.phases())), file=sys.stderr)
    if args.trace:
        print(f"trace written to {args.trace}", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    from metallic.engine.chat import ChatTemplate

    params = _sampling_params(args)
    engine = _load(args)
    template = ChatTemplate.for_model(engine.gguf.metadata)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("metallic chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line})
        prompt = template.render(messages)
        add_bos = not (template.bos_token and prompt.startswith(template.bos_token))
        ids = engine.tokenizer.encode(prompt, add_special=add_bos, parse_special=True)
        reply = []
        for step in engine.generate_tokens(ids, params):
            print(step.text, end="", flush=True)
            reply.append(step.text)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


# `metallic bench`


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure prompt and generation speed (llama-bench's tests)")
    _add_model(p)
    p.add_argument("-p", "--n-prompt", default="512", metavar="P[,P...]", help="prompt tokens")
    p.add_argument("-n", "--n-gen", default="128", metavar="N[,N...]", help="generated tokens")
    p.add_argument(
        "-b", "--batch", default="", metavar="B[,B...]", help="sequences at once (S_TG tests)"
    )
    p.add_argument("--batch-prompt", default="128", help="prompt tokens of the -b tests")
    p.add_argument("-r", "--repetitions", default="5", help="timed runs of each test")
    p.add_argument("--seed", type=int, default=0, help="of the random prompts")
    p.add_argument("--name", help="the model's name in the table, JSON and record")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--record", metavar="FILE", help="write a record (benchmarks/common.py)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the figures and a profile (PNG)")
    p.add_argument("--profile", action="store_true", help="time per op and layer, roofline")
    p.add_argument("--trace", metavar="FILE.json", help="a Chrome/Perfetto trace of the profile")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from metallic.engine.engine import Engine
    from metallic.tools import bench
    from metallic.tools.files import check_writable
    from metallic.tools.profiling import format_report

    settings = bench.Settings(
        prompt=bench.parse_counts(args.n_prompt, "-p"),
        generate=bench.parse_counts(args.n_gen, "-n"),
        batch=bench.parse_counts(args.batch, "-b") if args.batch else [],
        batch_prompt=bench.parse_counts(args.batch_prompt, "--batch-prompt")[0],
        repetitions=bench.parse_counts(args.repetitions, "-r")[0],
        seed=args.seed,
    )
    outputs = {"--json": args.json, "--record": args.record, "--plot": args.plot}
    outputs["--trace"] = args.trace
    for option, value in outputs.items():
        if value:
            check_writable(Path(value), option)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="metallic: %(message)s", stream=sys.stderr)
    engine = Engine(
        _model_path(args.model),
        device=args.device,
        dtype=args.dtype,
        context_size=args.ctx_size or settings.context(),
        progress=_progress_bar("loading"),
        gpu_layers=args.gpu_layers,
        memory_budget=args.gpu_memory,
        max_num_seqs=max([*settings.batch, 1]),
        prefix_cache=False,
    )
    status = _status_line("bench")
    results = bench.run_tests(engine, settings, status)
    doc = bench.bench_document(engine, settings, results, args.name)
    if args.profile or args.plot or args.trace:
        status("profile")
        trace = Path(args.trace) if args.trace else None
        doc["profile"] = bench.profile_tests(engine, settings, trace)
    status("")
    print(bench.format_table(doc))
    if args.profile:
        print()
        print(format_report(doc["profile"]))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if args.record:
        command = " ".join(["metallic", *sys.argv[1:]])
        record = bench.bench_record(doc, args.name or doc["model"]["name"], command)
        Path(args.record).write_text(json.dumps(record, indent=1) + "\n")
    if args.plot:
        from metallic.tools.plot import plot_bench

        plot_bench(doc, Path(args.plot))
    return 0


def _status_line(label: str) -> Callable[[str], None]:
    """Progress on stderr: one line rewritten in place on a terminal, a line per update
    elsewhere; an empty text ends it."""
    tty = sys.stderr.isatty()

    def show(text: str) -> None:
        if tty:
            line = f"{label}: {text}" if text else ""
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
        elif text:
            print(f"{label}: {text}", file=sys.stderr, flush=True)

    return show


# `metallic doctor`


def _add_doctor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="show the device, versions and kernel path metallic uses")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="measure copy bandwidth and matmul throughput, and cache them for the roofline",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from metallic.tools import doctor

    if args.calibrate:
        print("calibrating: a large copy and a large matmul...", file=sys.stderr, flush=True)
        found, path = doctor.calibrate(args.device)
        print(f"{doctor.format_calibration(vars(found))}; saved in {path}", file=sys.stderr)
    diagnosis = doctor.diagnose(args.device)
    print(json.dumps(diagnosis, indent=2) if args.json else doctor.format_diagnosis(diagnosis))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metallic", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="describe a GGUF model file")
    p.add_argument("model", nargs="?", help="GGUF file (default: Gemma 3 270M Q4_K_M)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("tokenize", help="print token ids of TEXT as JSON")
    p.add_argument("words", nargs="+", metavar="[MODEL] TEXT")
    p.add_argument("--no-bos", action="store_true", help="do not add BOS/EOS")
    p.add_argument("--special", action="store_true", help="parse special-token texts")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("run", help="generate a completion of a prompt")
    _add_model(p)
    p.add_argument("-p", "--prompt", required=True, help="prompt text")
    p.add_argument("--json", action="store_true", help="one JSON object with ids and logprobs")
    p.add_argument("--truncate", action="store_true", help="keep the end of a too-long prompt")
    p.add_argument("--stats", action="store_true", help="print speed figures to stderr")
    p.add_argument("--profile", action="store_true", help="print time per op and layer (stderr)")
    p.add_argument("--trace", metavar="FILE.json", help="write a Chrome/Perfetto trace")
    _add_sampling(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat using the model's chat template")
    _add_model(p)
    p.add_argument("--system", default="", help="system prompt")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    _add_bench_parser(sub)
    _add_doctor_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MetallicError as err:
        print(f"metallic: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
