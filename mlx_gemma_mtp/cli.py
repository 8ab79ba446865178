"""The `mlx-gemma-mtp` command: `convert`, `generate`, `chat`, `bench`, `serve`.

Each subcommand is a parser and a `main(argv) -> int`; `main` here only dispatches. `convert` and
`bench` live in the top-level packages of the same names, and `serve` in `server.py` (FastAPI
and uvicorn, an optional extra): each is imported only when asked for.
A user's mistake (a bad flag, a model that cannot be loaded) ends with one line on stderr and a
non-zero exit, not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading

from mlx_lm.tokenizer_utils import TokenizerWrapper

from .chat import ChatBusyError, ChatSession, drafter_warning, stats_line
from .costs import batch_sizes, cost_path, load_costs, progress_bar
from .cuda import without_graphs_unless_set
from .drafter import Drafter
from .generate import DEFAULT_MAX_TOKENS, check_arguments, stream_generate
from .load import load, load_pair
from .quantize import BITS, GROUP_SIZES
from .target import Target

PROG = "mlx-gemma-mtp"
DEFAULT_MODEL = "google/gemma-4-E2B-it"  # its drafter, google/gemma-4-E2B-it-assistant, is found beside it
PROMPT = ">>> "
PREFIX_CACHE = 8  # the server's kept caches of finished requests (--prefix-cache)
CHAT_HELP = """\
/reset   start a new conversation (the --system message is kept)
/stats   speed and drafting statistics of the last answer
/help    this list
/quit    leave (Ctrl-D too)
Ctrl-C stops an answer; the conversation goes on from what was shown."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --------------------------------------------------------------------------------------------
# Flags shared by generate and chat


def _draft_length(value: str) -> int | str:
    if value in ("auto", "heuristic"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, 'auto' or 'heuristic', got {value!r}") from None


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value!r}")
    return n


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help=f"model directory or hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--model", dest="model_flag", metavar="MODEL", help="the same, as mlx-lm spells it")
    drafting = parser.add_mutually_exclusive_group()
    drafting.add_argument(
        "--draft-model",
        metavar="PATH",
        help="drafter directory or hub id (default: the pair's own, an '-assistant' sibling, or the hub's)",
    )
    drafting.add_argument("--no-draft", action="store_true", help="decode with the target alone")
    quant = parser.add_argument_group(
        "quantize in memory (an unquantized checkpoint, the converter's recipe)"
    )
    quant.add_argument("-q", "--quantize", action="store_true", help="quantize target and drafter at load")
    quant.add_argument("--q-bits", type=int, choices=BITS, default=4, help="bits per weight (default 4)")
    quant.add_argument(
        "--q-group-size", type=int, choices=GROUP_SIZES, default=64, help="weights per scale (default 64)"
    )


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse a subcommand's flags; the model from the positional or --model (not both)."""
    args = parser.parse_args(argv)
    if args.model and args.model_flag and args.model != args.model_flag:
        parser.error(f"two models named: {args.model} and --model {args.model_flag}")
    args.model = args.model or args.model_flag or DEFAULT_MODEL
    return args


# Sampling and draft-length flags: only those given are passed on, so the library's defaults
# hold otherwise.
_GENERATION_FLAGS = {
    "num_draft_tokens": (
        ("-k", "--num-draft-tokens"),
        _draft_length,
        "draft length: an int, 'auto' or 'heuristic'",
    ),
    "temperature": (("--temperature", "--temp"), float, "sampling temperature (0: greedy)"),
    "top_p": (("--top-p",), float, "nucleus sampling threshold"),
    "top_k": (("--top-k",), int, "sample from the k most likely tokens (0: all)"),
    "min_p": (("--min-p",), float, "drop tokens below min_p times the top probability"),
    "repetition_penalty": (("--repetition-penalty",), float, "penalty for tokens already in the context"),
    "seed": (("--seed",), int, "random seed for sampling"),
}


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-m",
        "--max-tokens",
        type=_positive_int,
        default=DEFAULT_MAX_TOKENS,
        help=f"answer length limit (default {DEFAULT_MAX_TOKENS})",
    )
    for dest, (flags, kind, help_text) in _GENERATION_FLAGS.items():
        parser.add_argument(*flags, dest=dest, type=kind, default=None, help=help_text)
    parser.add_argument(
        "--system", "--system-prompt", dest="system", help="system message (chat template only)"
    )


def _generation_kwargs(args: argparse.Namespace) -> dict:
    return {dest: getattr(args, dest) for dest in _GENERATION_FLAGS if getattr(args, dest) is not None}


def load_from_flags(args: argparse.Namespace) -> tuple[Target, TokenizerWrapper, Drafter | None]:
    """The target, its tokenizer and the drafter the flags ask for (or the one found); says
    on stderr which drafter decodes."""
    quantization = {"q_bits": args.q_bits, "q_group_size": args.q_group_size} if args.quantize else {}
    if args.no_draft:
        return (*load(args.model, **quantization), None)
    model, tokenizer, drafter = load_pair(args.model, args.draft_model, **quantization)
    if drafter is None:
        print(
            f"No drafter found for {args.model}: decoding with the target alone (--draft-model names one).",
            file=sys.stderr,
        )
    else:
        print(f"Drafter: {drafter.source}", file=sys.stderr)
    return model, tokenizer, drafter


# --------------------------------------------------------------------------------------------
# generate


def setup_generate_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} generate",
        description="Generate once: the text to stdout, a statistics line to stderr.",
    )
    _add_model_args(parser)
    parser.add_argument("-p", "--prompt", help="the prompt (default: stdin, less its final newlines)")
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the model's chat template (default: when the tokenizer has one)",
    )
    parser.add_argument(
        "--ignore-chat-template", dest="chat_template", action="store_false", help="as --no-chat-template"
    )
    parser.add_argument(
        "--verbose",
        type=_boolean,
        nargs="?",
        const=True,
        default=True,
        help="the statistics line on stderr (default True; --verbose False: none)",
    )
    _add_generation_args(parser)
    return parser


def _boolean(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def generate_main(argv: list[str] | None = None) -> int:
    parser = setup_generate_parser()
    args = parse(parser, argv)
    if args.prompt is None and sys.stdin.isatty():
        parser.error("no prompt: pass --prompt or pipe one on stdin")
    prompt = sys.stdin.read().rstrip("\n") if args.prompt is None else args.prompt
    if not prompt.strip():
        parser.error("the prompt is empty")
    check_arguments("generate", args.max_tokens, _generation_kwargs(args))  # before a long load
    model, tokenizer, drafter = load_from_flags(args)
    use_template = tokenizer.has_chat_template if args.chat_template is None else args.chat_template
    if use_template:
        if not tokenizer.has_chat_template:
            parser.error(f"{args.model} has no chat template (use --no-chat-template)")
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    elif args.system:
        parser.error("--system needs the chat template")
    for r in stream_generate(
        model, tokenizer, prompt, args.max_tokens, draft_model=drafter, **_generation_kwargs(args)
    ):
        sys.stdout.write(r.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        print(stats_line(r), file=sys.stderr)
    warning = drafter_warning(r.drafted, r.accepted, drafter)
    if warning:
        print(warning, file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# chat


def setup_chat_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} chat",
        description="Chat with a Gemma 4 model and its drafter; /help inside lists the commands.",
    )
    _add_model_args(parser)
    _add_generation_args(parser)
    return parser


def chat_main(argv: list[str] | None = None) -> int:
    args = parse(setup_chat_parser(), argv)
    check_arguments("chat", args.max_tokens, _generation_kwargs(args))  # before a long load
    print(f"Loading {args.model} ...", flush=True)
    model, tokenizer, drafter = load_from_flags(args)
    if drafter is not None and _generation_kwargs(args).get("num_draft_tokens", "auto") == "auto":
        load_costs(model, drafter)  # measured now, if never on this device: not inside the first answer
    session = ChatSession(
        model, tokenizer, drafter, system=args.system, max_tokens=args.max_tokens, **_generation_kwargs(args)
    )
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    drafting = "no drafter" if drafter is None else f"drafter {drafter.source}"
    print(f"Chatting with {args.model} ({drafting}). /help for commands, Ctrl-D to leave.")
    repl(session)
    return 0


def repl(session: ChatSession) -> None:
    """Read a line, answer it, until /quit or end of input."""
    while True:
        try:
            line = input(PROMPT).strip()
        except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
            print()
            continue
        except EOFError:
            print()
            return
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line):
                return
            continue
        _answer(session, line)


def _command(session: ChatSession, line: str) -> bool:
    """Run a /command; False to leave."""
    name = line.split()[0]
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        print("(new conversation)")
    elif name == "/stats":
        print("no answer yet" if session.last is None else stats_line(session.last))
    elif name == "/help":
        print(CHAT_HELP)
    else:
        print(f"unknown command {name}; /help lists them")
    return True


def _answer(session: ChatSession, text: str) -> None:
    interrupted = threading.Event()
    try:
        with _ctrl_c_cancels(session, interrupted):
            for r in session.send(text):
                sys.stdout.write(r.text)
                sys.stdout.flush()
                if interrupted.is_set():  # pressed before the stream began: cancel() came too early
                    break
    except KeyboardInterrupt:  # a second Ctrl-C, while a forward was running
        print(" [interrupted]")
        return
    except ValueError as e:  # the conversation is full, an empty message: said, and the chat goes on
        print(f"({_one_line(e)})")
        return
    finish = session.last.finish_reason if session.last else None
    if finish == "length" and session.full:
        print(" [the conversation fills the model's context: /reset starts a new one]")
    else:
        print({None: " [stopped]", "length": " [max tokens]"}.get(finish, ""))
    warning = session.drafter_warning()
    if warning:
        print(f"({warning})")


@contextlib.contextmanager
def _ctrl_c_cancels(session: ChatSession, interrupted: threading.Event):
    """While an answer streams, Ctrl-C cancels it: the stream ends after the token being computed
    and the cache stays consistent. A second Ctrl-C interrupts at once."""

    def on_interrupt(signum, frame):
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        session.cancel()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------------------------
# serve

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {value!r}")
    return n


def setup_serve_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} serve",
        description="An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, "
        "/health): every request is a row of one batch, decoded speculatively with the drafter.",
    )
    _add_model_args(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)"
    )
    parser.add_argument("--port", type=_positive_int, default=8080, help="port (default 8080)")
    parser.add_argument(
        "-m",
        "--max-tokens",
        type=_positive_int,
        default=DEFAULT_MAX_TOKENS,
        help=f"answer length limit of a request that sets none (default {DEFAULT_MAX_TOKENS})",
    )
    for dest, (flags, kind, help_text) in _GENERATION_FLAGS.items():
        if dest != "seed":  # a seed is per request
            parser.add_argument(*flags, dest=dest, type=kind, default=None, help=f"default {help_text}")
    parser.add_argument(
        "--max-batch", type=_positive_int, default=8, help="requests decoded together (default 8)"
    )
    parser.add_argument(
        "--max-queue",
        type=_non_negative_int,
        default=32,
        help="requests waiting for a row; beyond: 429 (default 32)",
    )
    parser.add_argument(
        "--prefix-cache",
        type=_non_negative_int,
        default=PREFIX_CACHE,
        help="finished requests' caches kept, so that a conversation's next turn prefills only what is new "
        f"(default {PREFIX_CACHE}; 0: none)",
    )
    parser.add_argument("--served-model-name", help="the model id clients see (default: MODEL as given)")
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds requests in flight get after SIGTERM (default 30)",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    return parser


def serve_main(argv: list[str] | None = None, *, propose=None) -> int:
    """`propose(model, drafter)`, if given, makes the engine's draft source (a benchmark's
    replayed drafts, say) in place of the drafter's own."""
    args = parse(setup_serve_parser(), argv)
    try:
        from . import server
        from .engine import Engine
        from .generate import draft_length
        from .sample import make_sampling
    except ImportError as e:
        print(
            f"{PROG} serve: {_one_line(e)}; the server needs its extra: pip install 'mlx-gemma-mtp[server]'",
            file=sys.stderr,
        )
        return 1
    sampling = {
        dest: getattr(args, dest) for dest in server.SAMPLING_FIELDS if getattr(args, dest) is not None
    }
    make_sampling(**sampling)  # a bad default says so now, not after a long load
    config = server.ServeConfig(
        model=args.served_model_name or args.model,
        max_tokens=args.max_tokens,
        sampling=sampling,
        max_pending=args.max_batch + args.max_queue,
        grace=args.shutdown_grace,
    )
    draft = "auto" if args.num_draft_tokens is None else args.num_draft_tokens

    def make_engine(model, drafter):  # on the worker thread: "auto" measures costs here, once per device
        policy = draft_length(draft, model, drafter, args.max_batch)
        return Engine(
            model,
            drafter,
            num_draft_tokens=policy,
            max_batch=args.max_batch,
            prefix_cache_size=args.prefix_cache,
            propose=None if propose is None else propose(model, drafter),
        )

    worker = server.Worker(lambda: load_from_flags(args), make_engine)
    print(
        f"Loading {args.model} (and measuring draft costs if this device has none yet) ...", file=sys.stderr
    )
    instance = server.make_server(worker, config, host=args.host, port=args.port, log_level=args.log_level)
    print(f"OpenAI base URL: http://{args.host}:{args.port}/v1", file=sys.stderr)
    instance.run()
    return 0


# --------------------------------------------------------------------------------------------
# calibrate


def setup_calibrate_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} calibrate",
        description="Measure this device's drafting costs for a model and its drafter and store them "
        "(what num_draft_tokens='auto' reads; measured once per device, else at first use).",
    )
    _add_model_args(parser)
    parser.add_argument(
        "--max-batch",
        type=_positive_int,
        default=1,
        help="measure batches of up to this many rows (1, 2, 4, ... and it; default 1)",
    )
    parser.add_argument("--force", action="store_true", help="measure again what is stored")
    return parser


def calibrate_main(argv: list[str] | None = None) -> int:
    parser = setup_calibrate_parser()
    args = parse(parser, argv)
    if args.no_draft:
        parser.error("calibrate measures drafting: it needs a drafter")
    model, _, drafter = load_from_flags(args)
    if drafter is None:
        print(
            f"{PROG} calibrate: error: no drafter for {args.model}; --draft-model names one", file=sys.stderr
        )
        return 1
    path = cost_path(model, drafter)
    if args.force:
        path.unlink(missing_ok=True)
    batches = batch_sizes(args.max_batch)
    print(
        f"Measuring batch sizes {', '.join(map(str, batches))} (what is stored already is read) ...",
        file=sys.stderr,
    )
    costs = load_costs(model, drafter, batches, progress=progress_bar())
    for b, verify, draft in zip(costs.batches, costs.verify, costs.draft):
        rounds = " ".join(f"{(verify[k] + k * draft) * 1e3:.1f}" for k in (1, 2, 4, 8, 16))
        print(
            f"batch {b:>3}: plain step {verify[0] * 1e3:.2f} ms, drafter step {draft * 1e3:.2f} ms, "
            f"rounds of k = 1 2 4 8 16: {rounds} ms"
        )
    print(f"stored in {path}")
    return 0


# --------------------------------------------------------------------------------------------
# Dispatch


def _package_main(package: str):
    def run(argv: list[str]) -> int:
        try:
            module_main = importlib.import_module(package).main
        except (ImportError, AttributeError) as e:
            print(
                f"{PROG} {package}: the {package!r} package is not available ({_one_line(e)}); "
                "run from the repository root or install it",
                file=sys.stderr,
            )
            return 1
        return module_main(argv)

    return run


COMMANDS = {
    "convert": (
        "Hugging Face checkpoint -> MLX pair directory (optionally quantized)",
        _package_main("convert"),
    ),
    "generate": ("generate once from --prompt or stdin", generate_main),
    "chat": ("chat in the terminal", chat_main),
    "calibrate": ("measure and store this device's drafting costs (what 'auto' reads)", calibrate_main),
    "bench": ("benchmark speculative against plain decoding", _package_main("bench")),
    "serve": ("OpenAI-compatible HTTP server, batched", serve_main),
}
USAGE = f"usage: {PROG} {{{','.join(COMMANDS)}}} [--help] ...\n\n" + "\n".join(
    f"  {name:<9} {summary}" for name, (summary, _) in COMMANDS.items()
)


def main(argv: list[str] | None = None) -> int:
    without_graphs_unless_set()  # before any command computes (mlx_gemma_mtp/cuda.py says why)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{PROG}: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name][1](rest)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError, ChatBusyError) as e:  # what loading and arguments raise, as one line
        print(f"{PROG} {name}: error: {_one_line(e)}", file=sys.stderr)
        return 1
