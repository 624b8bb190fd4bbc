"""`metallic` command line: inspect, tokenize, run and chat.

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
    engine = _load(args)
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
    return 0


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


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from metallic.server.launch import serve

    if not 0 <= args.port <= 65535:
        raise MetallicError(f"--port must be in [0, 65535], got {args.port}")
    return serve(
        _model_path(args.model),
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("METALLIC_API_KEY"),
        model_name=args.served_model_name,
        shutdown_timeout=args.shutdown_timeout,
        verbose=args.verbose,
        device=args.device,
        dtype=args.dtype,
        context_size=args.ctx_size,
        progress=_progress_bar("loading"),
        gpu_layers=args.gpu_layers,
        memory_budget=args.gpu_memory,
        max_num_seqs=args.max_num_seqs,
        prefix_cache=not args.no_prefix_cache,
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument(
        "--api-key",
        help="require Authorization: Bearer KEY on every route but /health"
        " (default: $METALLIC_API_KEY)",
    )
    p.add_argument("--served-model-name", help="the model's name in the API (default: file name)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once")
    p.add_argument("--no-prefix-cache", action="store_true", help="recompute shared prefixes")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long requests in flight may take to finish",
    )
    p.set_defaults(func=cmd_serve)


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
    _add_sampling(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat using the model's chat template")
    _add_model(p)
    p.add_argument("--system", default="", help="system prompt")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)
    _add_serve(sub)
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
