"""`metallic` command line: inspect, tokenize, run, chat, serve, bench, doctor, known models.

Generated text goes to stdout, everything else (progress, stats, errors) to stderr. Every
`MetallicError` and every bad flag ends the process with one line and exit code 2 (flags are
checked before any model is loaded); Ctrl-C exits with 130, except during a chat reply, where it
stops only that reply.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import closing, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from metallic import __version__
from metallic.engine import arguments
from metallic.errors import MetallicError
from metallic.progress import terminal_bar

if TYPE_CHECKING:  # heavy imports (torch) wait until a command needs them
    from metallic.engine.chat import ChatTemplate, Message
    from metallic.engine.engine import Engine
    from metallic.engine.sampling import SamplingParams
    from metallic.gguf.registry import KnownModel
    from metallic.tools.profiling import ProfileSession

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where help is, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {line} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default in --help where it has one to show (not None, False, "" or [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default in ("", [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _checked(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a check: its one-line error becomes argparse's (exit 2)."""

    def convert(text: str) -> Any:
        try:
            return check(text)
        except MetallicError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _int_at_least(least: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return convert


def _device(text: str) -> str:
    arguments.check_device(text)
    return text


def _dtype(text: str) -> str:
    arguments.check_dtype(text)
    return text


def _size(text: str) -> int | None:
    return arguments.memory_size(text, name=None)


def _model_path(value: str | None, default: KnownModel) -> Path:
    from metallic.gguf.registry import resolve_model

    return resolve_model(value, default)


def _read_text(source: str) -> str:
    """The text of a file, or of standard input for '-' (UTF-8 either way)."""
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as err:
        raise MetallicError(f"cannot read {source}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        where = "standard input" if source == "-" else source
        raise MetallicError(f"{where} is not UTF-8 text (byte {err.start})") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    from metallic.gguf.default_model import DEFAULT_MODEL
    from metallic.gguf.reader import open_gguf

    path = _model_path(args.model, DEFAULT_MODEL)
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


def _names_a_model(word: str) -> bool:
    """Whether a lone `tokenize` argument is a model rather than text: a known name, a .gguf
    name or an existing file (its text would be tokenized otherwise, a silent surprise)."""
    from metallic.gguf.registry import KNOWN_MODELS

    return word.lower() in KNOWN_MODELS or word.lower().endswith(".gguf") or Path(word).is_file()


def cmd_tokenize(args: argparse.Namespace) -> int:
    from metallic.gguf import tokenizer_cache
    from metallic.gguf.default_model import DEFAULT_MODEL
    from metallic.gguf.reader import open_gguf
    from metallic.gguf.tokenizer import Tokenizer

    words = list(args.words)
    if args.file is not None:
        if len(words) > 1:
            raise MetallicError("give TEXT or -f FILE, not both")
        model, text = (words or [None])[0], _read_text(args.file)
    elif len(words) == 2:
        model, text = words
    elif len(words) == 1 and not _names_a_model(words[0]):
        model, text = None, words[0]
    elif words:
        raise MetallicError(f"no TEXT to tokenize after the model {words[0]} (or pass -f FILE)")
    else:
        raise MetallicError("no TEXT to tokenize (give TEXT, or -f FILE; - reads stdin)")
    if text == "-":
        text = _read_text("-")
    metadata = open_gguf(_model_path(model, DEFAULT_MODEL)).metadata
    tokenizer = Tokenizer.from_metadata(metadata, tokenizer_cache.default_folder())
    ids = tokenizer.encode(text, add_special=not args.no_bos, parse_special=args.special)
    print(json.dumps(ids))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from metallic.gguf.cache import cache_dir
    from metallic.gguf.registry import KNOWN_MODELS

    rows = [
        {
            "name": m.name,
            "title": m.title,
            "size": m.size,
            "architecture": m.architecture,
            "purpose": m.purpose,
            "source": m.source.describe(),
            "cached": m.is_cached(),
            "path": str(m.path),
        }
        for m in KNOWN_MODELS.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(row["name"]) for row in rows)
    print(f"{'NAME':<{width}}  {'SIZE':>8}  {'ARCH':<7} {'CACHED':<6}  PURPOSE / SOURCE")
    for row in rows:
        size = f"{row['size'] / 2**20:.0f} MiB"
        cached = "yes" if row["cached"] else "no"
        print(
            f"{row['name']:<{width}}  {size:>8}  {row['architecture']:<7} {cached:<6}  "
            f"{row['title']}: {row['purpose']}"
        )
        print(f"{'':<{width}}  {'':>8}  {'':<7} {'':<6}  from {row['source']}")
    print(f"cache: {cache_dir() / 'models'} (METALLIC_CACHE moves it)")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from metallic.gguf.registry import known_model

    print(known_model(args.name).fetch())
    return 0


def _add_sampling(p: argparse.ArgumentParser, temperature: float = 0.8) -> None:
    defaults = "as llama.cpp" if temperature == 0.8 else "as llama.cpp, but greedy"
    g = p.add_argument_group(f"sampling (defaults {defaults})")
    g.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens to generate")
    g.add_argument("--temp", type=float, default=temperature, help="temperature; 0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95, help="1.0 = off")
    g.add_argument("--min-p", type=float, default=0.05, help="0 = off")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="1.0 = off")
    g.add_argument("--repeat-last-n", type=int, default=64, help="window of the penalties")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="0 = off")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="0 = off")
    g.add_argument("--seed", type=int, default=None, help="same seed, same text (default: random)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")


def _add_model(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "model",
        nargs="?",
        help=f"GGUF file or known model name (`metallic models`; default: {default})",
    )
    p.add_argument(
        "-c",
        "--ctx-size",
        type=_int_at_least(2),
        default=None,
        help="context size in tokens (default: the model's training context, at most 4096)",
    )
    p.add_argument(
        "--ctx-size-override",
        action="store_true",
        help="allow a --ctx-size past the model's training context",
    )
    p.add_argument(
        "--device",
        type=_checked(_device),
        default=None,
        help="cpu, cuda or cuda:N (default: cuda if any)",
    )
    p.add_argument(
        "--dtype", type=_checked(_dtype), default=None, help="f32, f16 or bf16 (default: by device)"
    )
    p.add_argument(
        "--gpu-layers",
        type=_int_at_least(0),
        default=None,
        metavar="N",
        help="CUDA only: keep the first N layers on the device, stream the rest from host memory",
    )
    p.add_argument(
        "--gpu-memory",
        type=_checked(_size),
        default=None,
        metavar="SIZE",
        help="CUDA only: device memory budget, e.g. 2G: layers that don't fit are streamed from"
        " the host, and moved there when the KV cache needs room",
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


def _gpu_options(args: argparse.Namespace) -> dict[str, Any]:
    """--gpu-layers / --gpu-memory, or none of them on a machine that will run on the CPU: there
    they would only route the CPU path through the GPU path's machinery (slower), so they are
    dropped with a warning."""
    from metallic.runtime.device import choose_device

    given = [
        flag
        for flag, value in (("--gpu-layers", args.gpu_layers), ("--gpu-memory", args.gpu_memory))
        if value is not None
    ]
    if given and choose_device(args.device).type != "cuda":
        print(
            f"metallic: warning: {' and '.join(given)} ignored: GPU-only, and this run is on"
            " the CPU",
            file=sys.stderr,
        )
        return {}
    return {"gpu_layers": args.gpu_layers, "memory_budget": args.gpu_memory}


def _load(args: argparse.Namespace, default: KnownModel) -> Engine:
    from metallic.engine.engine import Engine

    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="metallic: %(message)s", stream=sys.stderr)
    gpu = _gpu_options(args)
    return Engine(
        _model_path(args.model, default),
        device=args.device,
        dtype=args.dtype,
        context_size=args.ctx_size,
        context_override=args.ctx_size_override,
        progress=terminal_bar("loading"),
        **gpu,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from metallic.gguf.default_model import DEFAULT_MODEL

    params = _sampling_params(args)
    prompt = _read_text(args.file) if args.file is not None else args.prompt
    if prompt == "-" and args.file is None:
        prompt = _read_text("-")
    _check_run_outputs(args)
    engine = _load(args, DEFAULT_MODEL)
    ids = engine.encode_prompt(prompt, truncate=args.truncate, max_tokens=params.max_tokens)
    profiling = _start_run_profiling(args, engine)
    if args.json:
        steps = list(engine.generate_tokens(ids, params, logprobs=5))
        tok = engine.tokenizer
        result = {
            "prompt_ids": ids,
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
        for step in engine.generate_tokens(ids, params):
            print(step.text, end="", flush=True)
        print(flush=True)
    if args.stats:
        _print_stats(engine)
    if profiling is not None:
        _finish_run_profiling(engine, profiling, args)
    return 0


def _print_stats(engine: Engine) -> None:
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


class _Conversation:
    """A chat's history and how it becomes a prompt that fits the context."""

    def __init__(self, engine: Engine, template: ChatTemplate, system: str, reply_room: int):
        self.engine = engine
        self.template = template
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        # tokens kept free for the reply: -n, but at most half the context
        self.reply_room = min(reply_room, engine.context_size // 2)
        self.told_dropping = False

    def _ids(self, messages: Sequence[Message]) -> list[int]:
        prompt = self.template.render(messages)
        bos = self.template.bos_token
        add_bos = not (bos and prompt.startswith(bos))
        return self.engine.tokenizer.encode(prompt, add_special=add_bos, parse_special=True)

    def prompt_for(self, user_text: str) -> list[int] | None:
        """The prompt ids with the user's new message, dropping the oldest turns when the
        history outgrows the context (said once on stderr); None when the message alone is too
        long (it is then left out of the history)."""
        from metallic.engine.chat import fit_history

        room = self.engine.context_size - self.reply_room
        candidate = [*self.messages, {"role": "user", "content": user_text}]
        kept, dropped = fit_history(candidate, lambda m: len(self._ids(m)) <= room)
        ids = self._ids(kept)
        if len(ids) > room:
            print(
                f"metallic: error: that message needs {len(ids)} tokens with the system prompt,"
                f" more than the {room} the context leaves (raise --ctx-size or lower -n)",
                file=sys.stderr,
            )
            return None
        if dropped and not self.told_dropping:
            print(
                f"metallic: the conversation outgrew the context ({self.engine.context_size}"
                " tokens): dropping its oldest turns (the system prompt stays)",
                file=sys.stderr,
            )
            self.told_dropping = True
        self.messages = kept
        return ids

    def reply(self, ids: list[int], params: SamplingParams) -> None:
        """Stream the model's reply and add it to the history. Ctrl-C stops the reply (what was
        shown so far stays in the history as the reply) and the chat goes on."""
        pieces: list[str] = []
        try:
            with closing(self.engine.generate_tokens(ids, params)) as steps:
                for step in steps:
                    print(step.text, end="", flush=True)
                    pieces.append(step.text)
        except KeyboardInterrupt:
            print(flush=True)
            print("metallic: reply stopped", file=sys.stderr)
        else:
            print(flush=True)
        self.messages.append({"role": "assistant", "content": "".join(pieces)})


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
    from metallic.gguf.default_model import CHAT_MODEL

    params = _sampling_params(args)
    engine = _load(args, CHAT_MODEL)
    template = ChatTemplate.for_model(engine.gguf.metadata)
    chat = _Conversation(engine, template, args.system, params.max_tokens or 256)
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            "metallic chat: Ctrl-C stops a reply; an empty line, Ctrl-D or Ctrl-C here quits",
            file=sys.stderr,
        )
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        if not line.strip():
            return 0
        ids = chat.prompt_for(line)
        if ids is not None:
            chat.reply(ids, params)


# `metallic bench`


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    about = "measure prompt and generation speed (llama-bench's tests)"
    p = sub.add_parser("bench", help=about, description=about, formatter_class=_HelpFormatter)
    _add_model(p, "gemma-3-270m")
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
    from metallic.gguf.default_model import DEFAULT_MODEL
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
        _model_path(args.model, DEFAULT_MODEL),
        device=args.device,
        dtype=args.dtype,
        context_size=args.ctx_size or settings.context(),
        context_override=args.ctx_size_override,
        progress=terminal_bar("loading"),
        max_num_seqs=max([*settings.batch, 1]),
        prefix_cache=False,
        **_gpu_options(args),
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
        command = " ".join(["metallic", *args.argv])
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
    about = "show the device, versions and kernel path metallic uses"
    p = sub.add_parser("doctor", help=about, description=about, formatter_class=_HelpFormatter)
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


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from metallic.gguf.registry import SMOLLM2_135M_INSTRUCT
    from metallic.server.launch import serve

    if not 0 <= args.port <= 65535:
        raise MetallicError(f"--port must be in [0, 65535], got {args.port}")
    return serve(
        _model_path(args.model, SMOLLM2_135M_INSTRUCT),
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("METALLIC_API_KEY"),
        model_name=args.served_model_name,
        shutdown_timeout=args.shutdown_timeout,
        verbose=args.verbose,
        device=args.device,
        dtype=args.dtype,
        context_size=args.ctx_size,
        context_override=args.ctx_size_override,
        max_num_seqs=args.max_num_seqs,
        **_gpu_options(args),
        prefix_cache=not args.no_prefix_cache,
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    about = "serve the model over an OpenAI-compatible HTTP API"
    p = sub.add_parser("serve", help=about, description=about, formatter_class=_HelpFormatter)
    _add_model(p, "smollm2-135m-instruct")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument(
        "--api-key",
        help="require Authorization: Bearer KEY on every route but /health"
        " (default: $METALLIC_API_KEY)",
    )
    p.add_argument("--served-model-name", help="the model's name in the API (default: file name)")
    p.add_argument(
        "--max-num-seqs", type=_int_at_least(1), default=64, help="sequences running at once"
    )
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
    from metallic.gguf.registry import GEMMA3_270M, SMOLLM2_135M_INSTRUCT

    run_default, chat_default = GEMMA3_270M.name, SMOLLM2_135M_INSTRUCT.name
    parser = _Parser(
        prog="metallic", description=__doc__.splitlines()[0], formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"metallic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=_HelpFormatter
        )

    p = command("inspect", "describe a GGUF model file")
    p.add_argument(
        "model", nargs="?", help=f"GGUF file or known model name (default: {run_default})"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = command("tokenize", "print the token ids of TEXT as JSON")
    p.add_argument(
        "words",
        nargs="*",
        metavar="[MODEL] TEXT",
        help=f"GGUF file or known model name (default: {run_default}), then the text; "
        "TEXT - reads stdin",
    )
    p.add_argument("-f", "--file", help="read the text from FILE (- for stdin)")
    p.add_argument("--no-bos", action="store_true", help="do not add BOS/EOS")
    p.add_argument("--special", action="store_true", help="parse special-token texts")
    p.set_defaults(func=cmd_tokenize)

    p = command("run", "generate a completion of a prompt")
    _add_model(p, run_default)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-p", "--prompt", help="prompt text; - reads it from stdin")
    source.add_argument("-f", "--file", help="read the prompt from FILE (- for stdin)")
    p.add_argument("--json", action="store_true", help="one JSON object with ids and logprobs")
    p.add_argument(
        "--truncate",
        action="store_true",
        help="cut the start of a too-long prompt (its BOS stays) to leave room for -n tokens",
    )
    p.add_argument("--stats", action="store_true", help="print speed figures to stderr")
    p.add_argument("--profile", action="store_true", help="print time per op and layer (stderr)")
    p.add_argument("--trace", metavar="FILE.json", help="write a Chrome/Perfetto trace")
    _add_sampling(p)
    p.set_defaults(func=cmd_run)

    p = command(
        "chat",
        "chat with the model's template; the oldest turns go when the context is full",
    )
    _add_model(p, chat_default)
    p.add_argument("--system", default="", help="system prompt")
    # greedy: the small default chat model answers best so (at 0.8 it drifts off topic often)
    _add_sampling(p, temperature=0.0)
    p.set_defaults(func=cmd_chat)

    p = command("models", "list the models metallic knows by name")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_models)

    p = command("pull", "fetch a known model into the cache and print its path")
    p.add_argument("name", help="a name from `metallic models`")
    p.set_defaults(func=cmd_pull)

    _add_bench_parser(sub)
    _add_doctor_parser(sub)
    _add_serve(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a record says was run
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


def entry() -> NoReturn:
    """The `metallic` command: `main`, then the process ends at once. Tearing down a loaded
    engine (every tensor, graph and pinned buffer freed one by one, the CUDA context, torch's
    modules) takes ~0.5 s on a CPU run and does nothing for a process that is done; its output
    is flushed first. Under a profiler, tracer or coverage tool, which write their results as
    the interpreter exits, it exits the usual way."""
    code = main()  # argparse's SystemExit (--help, bad flags) passes: nothing is loaded then
    if _watched():
        raise SystemExit(code)
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a closed pipe has nothing to flush
            stream.flush()
    os._exit(code)


def _watched() -> bool:
    """Whether a profiler or tracer watches the process (`python -m cProfile -m metallic`)."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12's tools (coverage, profilers)
    return monitoring is not None and any(monitoring.get_tool(i) for i in range(6))


if __name__ == "__main__":
    entry()
