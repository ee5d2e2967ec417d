"""The `minilora` command line: parse, call the library, print.

Every subcommand is a small function over the library. Bad input (a wrong argument, a bad file,
an adapter for another base) ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from minilora import __version__
from minilora.errors import BaseConfigNeeded, MiniloraError, OutputError
from minilora.outputs import FolderLock, check_not_an_input, check_own_folder

ASSETS = Path(__file__).resolve().parent / "assets"
BASE_MODEL = ASSETS / "base"
EXIT_USAGE = 2


class CliError(MiniloraError):
    """A user mistake the command line reports in one line (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (not the usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# ------------------------------------------------------------------------------------------------
# Shared pieces: loading a model, its tokenizer and adapters; answering chat messages
# ------------------------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser, *, adapters: bool = True) -> None:
    p.add_argument("--model", default=str(BASE_MODEL), metavar="PATH",
                   help="base model: a Hugging Face folder (config.json + *.safetensors) or a "
                        "MiniMind .pth (default: the embedded tiny model)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or its folder (default: the model's folder)")
    _add_model_config_arg(p, "--config", "--model-config")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load the weights in (default: %(default)s)")
    if adapters:
        p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                       help="adapter folder (PEFT layout), a training run's folder (its "
                            "adapter/) or a MiniMind .pth to apply; chat and generate take "
                            "several (named NAME, else after the folder)")
        p.add_argument("--no-fingerprint-check", action="store_true",
                       help="apply an adapter even if it was trained on another base")


def _add_model_config_arg(p: argparse.ArgumentParser, *flags: str) -> None:
    p.add_argument(*flags, dest="model_config", default=None, metavar="FILE",
                   help="the model's config when --model has no config.json beside it (a bare "
                        "MiniMind .pth): MiniMind's config.json or transformers', or minimind2 / "
                        "minimind3 for that MiniMind generation's defaults (default: the "
                        "config.json beside the model)")


def _load_base(args: argparse.Namespace, *, tokenizer: bool = True) -> tuple[Any, Any]:
    """The model and tokenizer that --model / --config / --tokenizer name (tokenizer=False:
    the model only, the tokenizer None)."""
    from minilora.threads import configure_threads
    from minilora.tokenizer import Tokenizer
    from minilora.weights import load_model

    configure_threads()  # the CPUs other processes leave free (a shared machine)
    model_path = Path(args.model)
    model = load_model(model_path, dtype=args.dtype, config=getattr(args, "model_config", None))
    if not tokenizer:
        return model, None
    return model, Tokenizer.from_file(_tokenizer_path(args, model_path))


def _tokenizer_path(args: argparse.Namespace, model_path: Path) -> Path:
    """--tokenizer, else the model's folder (a .pth's own folder)."""
    if args.tokenizer:
        return Path(args.tokenizer)
    return model_path if model_path.is_dir() else model_path.parent


def _apply_adapters(model: Any, args: argparse.Namespace, *, several: bool = False
                    ) -> list[str]:
    """Loads the --adapter options; returns their names (the first one is active)."""
    from minilora.named_adapters import set_active

    if len(args.adapter) > 1 and not several:
        raise CliError(f"one --adapter at a time for `{args.command}` (chat and generate take "
                       "several)")
    if len(args.adapter) == 1 and "=" not in args.adapter[0]:
        _load_adapter(model, args.adapter[0], args)  # one adapter: "default", as always
        return ["default"]
    names = _load_named_adapters(model, args.adapter, args, "--adapter NAME=PATH")
    if names:
        set_active(model, names[0])
    return names


def _load_named_adapters(model: Any, specs: list[str], args: argparse.Namespace,
                         how: str) -> list[str]:
    """Loads each [NAME=]PATH of specs as a named adapter; returns the names in order."""
    names: list[str] = []
    for spec in specs:
        name, path = _adapter_spec(spec)
        if name in names:
            raise CliError(f"two adapters are named {name!r}: name them with {how}")
        _load_adapter(model, path, args, name=name)
        names.append(name)
    return names


def _adapter_spec(spec: str) -> tuple[str, str]:
    """NAME=PATH, or PATH named after its folder (or file stem)."""
    name, eq, path = spec.partition("=")
    if not eq or Path(spec).exists():
        path = spec
        name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(spec).stem or "adapter").lstrip("-")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", name) or name == "base":
        raise CliError(f"--adapter {spec}: the name {name!r} must be letters, digits, '_' or '-' "
                       "(and not 'base')")
    return name, path


def _load_adapter(model: Any, path: str | Path, args: argparse.Namespace,
                  name: str | None = None) -> None:
    from minilora.adapter import load_adapter
    from minilora.errors import FingerprintMismatch

    run_adapter = Path(path) / "adapter"
    if (Path(path) / "metrics.jsonl").is_file() and run_adapter.is_dir():
        path = run_adapter  # a training run's folder (runs/<name>) means the adapter it wrote
    try:
        load_adapter(model, path, check_fingerprint=not args.no_fingerprint_check, name=name)
    except FingerprintMismatch as err:  # the library's hint names its keyword; here it is a flag
        err.override = "--no-fingerprint-check"
        raise


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="most tokens to generate per reply (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0: greedy; > 0: sample from softmax(logits / T) (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K most likely tokens; 0: all (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling threshold; 1: off (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="divide the logits of tokens already seen by R; 1: off "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for sampling, so a run can be repeated")


def _sampling(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    eos = tokenizer.stop_token_ids
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                eos_token_id=eos, seed=args.seed)


def stream_text(tokenizer: Any, tokens: Iterator[int]) -> Iterator[str]:
    """Decodes a token stream into text pieces as soon as they are whole characters."""
    ids: list[int] = []
    shown = ""
    for t in tokens:
        ids.append(t)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            continue
        yield text[len(shown):]
        shown = text
    text = tokenizer.decode(ids)
    if len(text) > len(shown):
        yield text[len(shown):]


def chat_answerer(model: Any, tokenizer: Any, **sampling: Any) -> Callable[[list[dict]], str]:
    """A function from chat messages to the model's reply text (for tasks.score)."""
    from minilora.model import generate

    def answer(messages: list[dict]) -> str:
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        return tokenizer.decode(generate(model, ids, **sampling)).strip()

    return answer


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------

# --preset: settings measured to teach on such data (docs/quality.md, "Small data"). A few dozen
# rows give a handful of steps an epoch, so the preset fixes the number of steps, not epochs, and
# takes the demo's learning rate: 1e-4 for 20 steps moves a LoRA adapter nowhere.
PRESETS: dict[str, dict[str, Any]] = {
    "small-data": {"lr": 2e-3, "max_steps": 300, "batch_size": 16, "warmup_steps": 10,
                   "lora_dropout": 0.0},
}

# The TrainConfig fields the command line does not offer: the library sets them itself (model
# and tokenizer are --model / --tokenizer, added by hand with the other model arguments).
_HIDDEN_FIELDS = {"device", "model", "tokenizer"}
_SHORT = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
          "lora_targets": "targets", "lora_exclude": "exclude", "lora_init": "init",
          "use_rslora": "rslora", "out_dir": "out"}


def _parse_targets(text: str) -> list[str] | str:
    if text in ("all-linear", "square") or not re.fullmatch(r"[\w.,]+", text):
        return text  # a special rule or a regex
    return [t for t in text.split(",") if t]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from minilora.train import TrainConfig

    p.add_argument("--model", default=None, metavar="PATH",
                   help="base model folder or MiniMind .pth (default: the embedded tiny model)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or its folder (default: the model's folder)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a JSON file of these settings (a run's config.json, say), keys named "
                        "as the flags with _ for - (lora_r for --r); flags given override it; "
                        "the run goes to a new --out folder unless --resume")
    p.add_argument("--tasks", nargs="*", default=None, metavar="FILE",
                   help="eval files (tasks format) scored before and after training")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="settings for a case, under the flags given: small-data (a few dozen to "
                        "a few hundred conversations): " + ", ".join(
                            f"--{_SHORT.get(k, k).replace('_', '-')} {v}"
                            for k, v in PRESETS["small-data"].items()) + " (default: none)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in _HIDDEN_FIELDS:
            continue
        flag = "--" + _SHORT.get(f.name, f.name).replace("_", "-")
        help_text = f.metadata["help"] + f" (default: {_shown_default(f)})"
        kind = str(f.type)
        if kind == "bool":
            p.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
        elif f.name == "lora_targets":
            p.add_argument(flag, dest=f.name, type=_parse_targets, default=None,
                           metavar="LIST|REGEX", help=help_text + " (comma-separated list)")
        elif f.name == "lora_exclude":
            p.add_argument(flag, dest=f.name, type=_parse_targets, default=None,
                           metavar="LIST", help=help_text + " (comma-separated)")
        else:
            conv = int if "int" in kind else float if "float" in kind else str
            p.add_argument(flag, dest=f.name, type=conv, default=None,
                           metavar=f.name.split("_")[-1].upper(), help=help_text)


def _train_config(args: argparse.Namespace, given: dict[str, Any]) -> tuple[Any, bool]:
    """The run's TrainConfig from the demo, --config or a resumed run's config.json, then the
    flags given; returns it and whether this is the demo."""
    from minilora.train import TrainConfig

    saved = Path(given["out_dir"]) / "config.json" if "out_dir" in given else None
    resuming_saved = bool(given.get("resume")) and not args.config and saved is not None
    if resuming_saved and not saved.is_file():
        raise CliError(f"--resume: {saved} does not exist, so there is no run to continue in "
                       f"{given['out_dir']}; check --out")
    demo = (args.model is None and args.config is None and "data" not in given
            and not resuming_saved)
    settings: dict[str, Any] = {}
    if demo:
        settings = json.loads((ASSETS / "demo_train.json").read_text(encoding="utf-8"))
        settings["data"] = str(ASSETS / settings["data"])
        if settings.get("eval_data"):
            settings["eval_data"] = str(ASSETS / settings["eval_data"])
    elif resuming_saved:
        settings = TrainConfig.from_json(saved).to_dict()  # the run's own settings, no retyping
        settings.pop("stop_after", None)  # where that invocation stopped, not this one
        settings.pop("overwrite", None)  # nor may its --overwrite replace anything now
    elif args.config:
        settings = TrainConfig.from_json(args.config).to_dict()
        for key in ("overwrite", "resume", "stop_after"):  # that invocation's, not this one's
            settings.pop(key, None)
        if not given.get("resume"):  # a rerun of a saved config is a new run, in a new folder
            settings.pop("out_dir", None)
    if getattr(args, "preset", None):
        settings.update(PRESETS[args.preset])
    settings.update(given)
    if not settings.get("data"):
        raise CliError("--data is required with --model or --config (a chat or text jsonl)")
    if not settings.get("out_dir"):
        stem = Path(settings["data"]).stem
        settings["out_dir"] = str(Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    settings["model"] = str(args.model or settings.get("model") or BASE_MODEL)
    if args.tokenizer:
        settings["tokenizer"] = str(args.tokenizer)
    return TrainConfig.from_dict(settings), demo


# What a None default means on the command line, where "None" would say nothing.
_NONE_MEANS = {"data": "the demo data with no --model", "eval_data": "no eval",
               "max_steps": "epochs x steps per epoch", "stop_after": "the end",
               "model_config": "the config.json beside the model"}


def _shown_default(f: Any) -> str:
    if f.name == "out_dir":
        return "runs/<data name>-<date>-<time>"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        return _NONE_MEANS.get(f.name, "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(value) or "none"
    return str(value)


def cmd_train(args: argparse.Namespace) -> int:
    """`minilora train`: LoRA (or --full) fine-tuning; with no arguments, the demo."""
    from minilora import tasks
    from minilora.tokenizer import Tokenizer
    from minilora.train import TrainConfig, train
    from minilora.weights import load_model

    started = time.perf_counter()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    config, demo = _train_config(args, given)
    from minilora.threads import configure_threads

    configure_threads()  # the CPUs other processes leave free (a shared machine)
    check_not_an_input(config.out_dir, {"--model": config.model, "--tokenizer": config.tokenizer,
                                        "--config": args.config, "--tasks": args.tasks},
                       "--out")
    model_path = Path(config.model)
    model = load_model(model_path, config=config.model_config)
    tokenizer = Tokenizer.from_file(Path(config.tokenizer) if config.tokenizer else
                                    (model_path if model_path.is_dir() else model_path.parent))

    task_files = args.tasks
    if task_files is None and demo:
        task_files = [str(ASSETS / f) for f in ("persona_eval.jsonl", "base_eval.jsonl")]
    samples = [s for f in task_files or [] for s in tasks.load_samples(f)]
    answer = chat_answerer(model, tokenizer, max_new_tokens=48,
                           eos_token_id=tokenizer.stop_token_ids)
    before = tasks.score(samples, answer) if samples else None

    try:
        result = train(model, tokenizer, config)
    except KeyboardInterrupt:
        _say_how_to_resume(config)
        return 130
    if result.output_dir is None:  # not rank 0 under torchrun: rank 0 reports
        return 0
    last = f"; last loss {result.losses[-1][1]:.4f}" if result.losses else ""
    resumed = f"resumed at step {result.start_step}, " if result.start_step else ""
    print(f"{resumed}trained {result.steps - result.start_step} steps in {result.seconds:.1f} s"
          f"{last}")
    if before is not None:
        model.eval()
        after = tasks.score(samples, answer)
        # The tasks the run did not train on, pooled: what the adapter should leave intact.
        kept = [t for t in before.tasks if t != "persona"]
        groups = {"base skills": kept} if len(kept) > 1 else None
        print()
        print(tasks.format_table({"before": before, "after": after}, groups=groups, ratio=True))
        print()
        for sample in samples[:3]:
            question = sample.chat()[-1]["content"]
            print(f"Q: {question}\nA: {answer(sample.chat())}\n")
    print(f"adapter: {result.output_dir}")
    written = [f for f in ("metrics.jsonl", "loss.png", "config.json", "checkpoints/")
               if (Path(config.out_dir) / f).exists()]
    print(f"outputs: {config.out_dir} ({', '.join(written)})")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def _say_how_to_resume(config: Any) -> None:
    """Ctrl-C during training: which checkpoint is kept and the command that continues it."""
    from minilora.train import CHECKPOINTS, latest_checkpoint

    kept = latest_checkpoint(Path(config.out_dir) / CHECKPOINTS)
    if kept is None:
        print("minilora train: interrupted; no checkpoint was written yet (--save-every N "
              "writes one every N steps), so a rerun starts over", file=sys.stderr)
        return
    print(f"minilora train: interrupted; kept {kept}. Resume with: minilora train --resume "
          f"--out {config.out_dir}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# chat, generate
# ------------------------------------------------------------------------------------------------


def cmd_chat(args: argparse.Namespace) -> int:
    """`minilora chat`: a conversation on stdin/stdout, streamed."""
    from minilora.model import stream_generate

    model, tokenizer = _load_base(args)
    adapters = _apply_adapters(model, args, several=True)
    model.eval()
    sampling = _sampling(args, tokenizer)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("minilora chat: type a message; /reset starts over, exit, quit, /quit or Ctrl-D "
              "ends; Ctrl-C stops a reply.")
        if len(adapters) > 1:
            print(f"adapters {adapters} ({adapters[0]} active); /adapter NAME switches "
                  "(NAME,NAME adds them up; base: none)")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/quit", "exit", "quit", "/exit"):
            break
        if text == "/reset":
            messages = list(system)
            continue
        if text == "/adapter" or text.startswith("/adapter "):
            _switch_adapter(model, text.removeprefix("/adapter").strip(), adapters)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        reply = ""
        try:
            for piece in stream_text(tokenizer, stream_generate(model, ids, **sampling)):
                print(piece, end="", flush=True)
                reply += piece
        except KeyboardInterrupt:  # stops this reply; the conversation goes on
            print(" [stopped]", end="")
        print()
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0


def _switch_adapter(model: Any, text: str, adapters: list[str]) -> None:
    """`/adapter NAME` in chat: NAME, NAME,NAME (their updates add up) or base; a bare
    `/adapter` says which are loaded and active. Messages go to stderr."""
    from minilora.named_adapters import active_adapters, set_active

    if text:
        names = [n for n in re.split(r"[,+ ]+", text) if n]
        unknown = [n for n in names if n not in adapters and n != "base"]
        if unknown:
            print(f"no adapter {unknown[0]!r}; loaded: {adapters or 'none'} (and base)",
                  file=sys.stderr)
            return
        set_active(model, names)
    print(f"active: {active_adapters(model) or 'base'} (loaded: {adapters or 'none'})",
          file=sys.stderr)


def _generate_per_prompt(model: Any, tokenizer: Any, args: argparse.Namespace,
                         adapters: list[str]) -> int:
    """--adapter-per-prompt: JSON lines {"prompt": ..., "adapter": NAME|null} on stdin, all
    generated in one batch whose rows use their own adapter; one JSON line out per prompt."""
    from minilora.model import generate_batch

    rows = []
    for number, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"stdin line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise CliError(f'stdin line {number}: expected {{"prompt": TEXT, "adapter": NAME}}')
        name = row.get("adapter")
        if name not in (None, "base", *adapters):
            raise CliError(f"stdin line {number}: no adapter {name!r}; loaded: {adapters}")
        rows.append((row["prompt"], name))
    if not rows:
        raise CliError('no prompts on stdin (one JSON line each: {"prompt": ..., "adapter": ...})')
    prompts = [_prompt_ids(tokenizer, prompt, args) for prompt, _ in rows]
    sampling = _sampling(args, tokenizer)
    outputs = generate_batch(model, prompts, adapter_names=[name for _, name in rows],
                             **sampling)
    for (prompt, name), tokens in zip(rows, outputs, strict=True):
        print(json.dumps({"adapter": name, "prompt": prompt, "text": tokenizer.decode(tokens)},
                         ensure_ascii=False))
    return 0


def _prompt_ids(tokenizer: Any, prompt: str, args: argparse.Namespace) -> list[int]:
    if args.raw:
        ids = tokenizer.encode(prompt)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
    if not ids:
        raise CliError("the prompt is empty")
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    """`minilora generate`: one prompt in, the reply streamed out."""
    from minilora.model import stream_generate

    model, tokenizer = _load_base(args)
    adapters = _apply_adapters(model, args, several=True)
    model.eval()
    if args.adapter_per_prompt:
        if args.prompt is not None:
            raise CliError("--adapter-per-prompt reads JSON lines from stdin, not a prompt "
                           "argument")
        return _generate_per_prompt(model, tokenizer, args, adapters)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    ids = _prompt_ids(tokenizer, prompt, args)
    for piece in stream_text(tokenizer, stream_generate(model, ids, **_sampling(args, tokenizer))):
        print(piece, end="", flush=True)
    print()
    return 0


# ------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    """`minilora eval`: loss / perplexity on a jsonl, and task accuracy on eval files."""
    from minilora import tasks
    from minilora.data import load_jsonl
    from minilora.train import evaluate

    if not args.data and not args.tasks:
        raise CliError("give --data (loss, perplexity) and/or --tasks (accuracy)")
    model, tokenizer = _load_base(args)
    _apply_adapters(model, args)
    model.eval()
    report: dict[str, Any] = {}
    if args.data:
        dataset = load_jsonl(args.data, tokenizer, args.max_seq_len)
        report.update(evaluate(model, dataset, args.batch_size))
        print(f"{args.data}: loss {report['eval_loss']:.4f}, perplexity {report['eval_ppl']:.2f} "
              f"({len(dataset)} samples)")
    if args.tasks:
        from tqdm import tqdm

        samples = [s for f in args.tasks for s in tasks.load_samples(f)]
        answer = chat_answerer(model, tokenizer, max_new_tokens=args.max_new_tokens,
                               eos_token_id=tokenizer.stop_token_ids)
        with tqdm(total=len(samples), unit="question", desc="tasks", file=sys.stderr) as bar:
            result = tasks.score(samples, answer, on_result=lambda _: bar.update(1))
        label = "adapter" if args.adapter else "base"
        print(tasks.format_table({label: result}))
        report["tasks"] = result.to_dict()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------------------------
# merge, convert, info
# ------------------------------------------------------------------------------------------------


def _copy_tokenizer(args: argparse.Namespace, out: Path) -> None:
    from minilora.tokenizer import Tokenizer

    source = _tokenizer_path(args, Path(args.model))
    try:
        Tokenizer.from_file(source).save(out)
    except FileNotFoundError:  # MiniMind keeps tokenizer.json apart from its weights
        print(f"note: no tokenizer found at {source}; the merged folder has none "
              "(--tokenizer names one to copy)", file=sys.stderr)
    except (OSError, ValueError) as err:
        print(f"note: the tokenizer was not copied ({err}); the merged folder has none",
              file=sys.stderr)


def cmd_merge(args: argparse.Namespace) -> int:
    """`minilora merge`: base + adapter -> a plain model folder transformers loads."""
    from minilora.injection import merge_and_unload
    from minilora.weights import save_model

    if not args.adapter:
        raise CliError("--adapter is required: the adapter to merge into the base")
    out = Path(args.out)
    check_not_an_input(out, _inputs(args), "--out")
    check_own_folder(out, _MERGE_OUTPUTS, "merge", "--out")
    model, _ = _load_base(args, tokenizer=False)  # copied beside the result when there is one
    _apply_adapters(model, args)
    model = merge_and_unload(model)
    with FolderLock(out, "merge"):
        save_model(model, out, dtype=args.save_dtype)
        _copy_tokenizer(args, out)
    print(f"merged model written to {out}")
    return 0


# What merge writes into --out: a model folder and its tokenizer.
_MERGE_OUTPUTS = re.compile(r"config\.json|model\.safetensors|model\.safetensors\.index\.json|"
                            r"model-\d+-of-\d+\.safetensors|tokenizer\.json|"
                            r"tokenizer_config\.json")


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The paths a model command reads, by flag: what its output may not overwrite."""
    adapters = [_adapter_spec(a)[1] for a in getattr(args, "adapter", None) or []]
    adapters += [_adapter_spec(a)[1] for a in getattr(args, "adapters", None) or []]
    return {"--model": args.model, "--tokenizer": args.tokenizer, "--adapter": adapters,
            "INPUT": getattr(args, "input", None)}


def _check_adapter_out(out: Path, args: argparse.Namespace) -> None:
    """An adapter output: not an input; an existing one is replaced only if it is an adapter
    minilora wrote (a .pth: a MiniMind LoRA file), never a user's other files."""
    from minilora.adapter import describe_adapter

    check_not_an_input(out, _inputs(args), "output" if args.command == "convert" else "--out")
    if not out.exists() or out.is_dir() and not any(out.iterdir()):
        return
    try:
        info = describe_adapter(out)
        ours = out.suffix == ".pth" or info["minilora version"] != "-"
    except (MiniloraError, OSError):
        ours = False
    if not ours:
        kind = "an adapter minilora wrote" if out.is_dir() else "a MiniMind LoRA .pth"
        raise OutputError(f"{out} exists and is not {kind}; nothing is overwritten: choose a new "
                          "output path")


def cmd_convert(args: argparse.Namespace) -> int:
    """`minilora convert`: MiniMind .pth adapter <-> PEFT adapter folder."""
    from minilora.adapter import save_adapter

    src, dst = Path(args.input), Path(args.output)
    to_minimind = dst.suffix == ".pth"
    if to_minimind == (src.suffix == ".pth"):
        raise CliError("convert turns a .pth into a folder or a folder into a .pth: "
                       f"got {src} -> {dst}")
    _check_adapter_out(dst, args)
    model, _ = _load_base(args, tokenizer=False)
    _load_adapter(model, src, args)
    save_adapter(model, dst, format="minimind" if to_minimind else "peft",
                 base_model_name_or_path=None if to_minimind else args.model)
    print(f"{src} -> {dst}")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    """`minilora combine`: a weighted combination of adapters, written as one adapter."""
    from minilora.adapter import save_adapter
    from minilora.checks import number as checked_number
    from minilora.named_adapters import combine_adapters

    if len(args.weights) != len(args.adapters):
        raise CliError(f"{len(args.adapters)} adapters but {len(args.weights)} --weights")
    for weight in args.weights:
        checked_number("--weights", weight)
    _check_adapter_out(Path(args.out), args)
    model, _ = _load_base(args)
    names = _load_named_adapters(model, args.adapters, args, "NAME=PATH")
    out = Path(args.out)
    name = re.sub(r"[^A-Za-z0-9_-]", "_", out.name).lstrip("-") or "combined"
    if name in names or name == "base":
        name = "combined"
    report = combine_adapters(model, dict(zip(names, args.weights, strict=True)), name,
                              method=args.method, r=args.r)
    save_adapter(model, out, name=name, base_model_name_or_path=args.model)
    print(report)
    print(f"adapter written to {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """`minilora info`: what a model or adapter folder (or .pth) holds."""
    from minilora.adapter import describe_adapter
    from minilora.weights import describe_model

    path = Path(args.path)
    if not path.exists():
        raise CliError(f"{path}: no such file or folder")
    is_adapter = (path / "adapter_config.json").exists() or (
        path.suffix == ".pth" and _looks_like_minimind_adapter(path))
    if (path / "state.pt").is_file() and (path / "trainable.safetensors").is_file():
        info = _describe_checkpoint(path)
    elif (path / "metrics.jsonl").is_file() and (path / "config.json").is_file():
        info = _describe_run(path)
    else:
        info = describe_adapter(path) if is_adapter else describe_model(path, args.model_config)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key.ljust(width)}  {value}")
    return 0


def _describe_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint (checkpoints/step-N): where the run stands and how it was set."""
    import torch

    from minilora.files import torch_load_reason

    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # a refused pickle or a torn file: say which, in one line
        raise CliError(f"{path}/state.pt: not a readable checkpoint ({torch_load_reason(err)})"
                       ) from None
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise CliError(f"{path}/state.pt: not a minilora checkpoint")
    config = state["config"]
    run = path.parent.parent
    return {"checkpoint": str(path), "step": f"{state['step']} of {state.get('total_steps')}",
            "base": config.get("model"), "data": config.get("data"),
            "lr": config.get("lr"), "r": config.get("lora_r"),
            "fingerprint": state.get("fingerprint"),
            "resume": f"minilora train --resume --out {run}"}


def _describe_run(path: Path) -> dict[str, Any]:
    """A training run's folder: its settings, progress, and the adapter it wrote."""
    from minilora.adapter import describe_adapter
    from minilora.files import read_json
    from minilora.train import CHECKPOINTS, latest_checkpoint

    config = read_json(path / "config.json", "a run's config.json")
    if not isinstance(config, dict):
        raise CliError(f"{path / 'config.json'}: expected a JSON object of TrainConfig fields, "
                       f"got {type(config).__name__}")
    records = []
    text = (path / "metrics.jsonl").read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a killed run, as train's resume skips it
    losses = [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)
              and isinstance(r.get("loss"), (int, float))]
    info: dict[str, Any] = {"run": str(path), "base": config.get("model"),
                            "data": config.get("data"), "lr": config.get("lr")}
    if losses:
        info["last step"] = losses[-1]["step"]
        info["last loss"] = round(losses[-1]["loss"], 4)
    kept = latest_checkpoint(path / CHECKPOINTS)
    info["checkpoint"] = str(kept) if kept else "none"
    if (path / "adapter" / "adapter_config.json").is_file():
        info.update({f"adapter {k}": v for k, v in describe_adapter(path / "adapter").items()})
    return info


def _looks_like_minimind_adapter(path: Path) -> bool:
    import torch

    if not path.is_file():  # a FIFO or a device: describe_model refuses it in one line
        return False
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a hostile or broken file: describe_model reports it properly
        return False
    return isinstance(sd, dict) and any(".lora.A." in k for k in sd)


# ------------------------------------------------------------------------------------------------
# serve
# ------------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """`minilora serve`: an OpenAI-compatible server; each request names its adapter."""
    from minilora.errors import MissingExtra

    try:
        import uvicorn
    except ImportError:
        raise MissingExtra("minilora serve", "serve") from None
    from minilora.serve import ServeState, create_app
    from minilora.serve_engine import Engine

    if args.max_batch < 1:
        raise CliError(f"--max-batch: expected >= 1, got {args.max_batch}")
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        raise CliError(f"--adapter-dir {args.adapter_dir}: no such folder")
    model, tokenizer = _load_base(args)
    names = _load_named_adapters(model, args.adapter, args, "--adapter NAME=PATH")
    base_name = args.model_name or Path(args.model).stem
    if base_name in names:
        raise CliError(f"--model-name {base_name!r} is also an adapter's name")
    engine = Engine(model, tokenizer, max_batch=args.max_batch)
    state = ServeState(engine, tokenizer, base_name,
                       adapters={n: str(_adapter_spec(s)[1]) for n, s in zip(names, args.adapter,
                                                                          strict=True)},
                       api_key=args.api_key,
                       adapter_dir=None if args.adapter_dir is None else Path(args.adapter_dir),
                       check_fingerprint=not args.no_fingerprint_check)
    app = create_app(state)
    engine.start()
    print(f"minilora serve: {base_name} + adapters {names or 'none'} on "
          f"http://{args.host}:{args.port} (chat page at /, API at /v1)", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0


# ------------------------------------------------------------------------------------------------
# The parser and main
# ------------------------------------------------------------------------------------------------


def build_parser(train_args: bool = True) -> argparse.ArgumentParser:
    """The `minilora` argument parser with every subcommand.

    Args:
        train_args: add `train`'s flags, which come from TrainConfig and so import torch; main
            leaves them out unless the command is `train`, so help and errors answer at once.
    """
    parser = _Parser(prog="minilora", description="LoRA fine-tuning of small causal LMs.")
    parser.add_argument("--version", action="version", version=f"minilora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="LoRA fine-tune (no arguments: the embedded demo)",
                       description="LoRA fine-tuning (or --full). With no arguments: the embedded "
                                   "tiny model learns a new persona, with a before/after table.")
    if train_args:
        _add_train_args(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("chat", help="talk to a model, optionally with adapters "
                                    "(/adapter NAME switches)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="a system message to start with")
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("generate", help="one prompt in, text out (scriptable)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("prompt", nargs="?", default=None,
                   help="the prompt (default: read from stdin)")
    p.add_argument("--system", default=None, help="a system message before the prompt")
    p.add_argument("--raw", action="store_true",
                   help="continue the prompt as plain text, without the chat template")
    p.add_argument("--adapter-per-prompt", action="store_true",
                   help='read JSON lines {"prompt": TEXT, "adapter": NAME|null} from stdin and '
                        "answer them in one batch, each row with its own adapter; JSON lines out")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("eval", help="loss / perplexity and task accuracy")
    _add_model_args(p)
    p.add_argument("--data", default=None, metavar="FILE",
                   help="chat or text jsonl: loss and perplexity on its trained tokens")
    p.add_argument("--tasks", nargs="+", default=None, metavar="FILE",
                   help="eval files (questions with expected answers): accuracy per task")
    p.add_argument("--max-seq-len", type=int, default=512, metavar="N",
                   help="samples of --data are cut to N tokens (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="samples per forward pass for --data (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=48, metavar="N",
                   help="most tokens per answer for --tasks (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("merge", help="base + adapter -> a merged model folder")
    _add_model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: as loaded)")
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("convert", help="MiniMind .pth adapter <-> adapter folder")
    _add_model_args(p, adapters=False)
    p.add_argument("input", help="a MiniMind .pth LoRA file or an adapter folder")
    p.add_argument("output", help="an adapter folder (from a .pth) or a .pth (from a folder)")
    p.add_argument("--no-fingerprint-check", action="store_true",
                   help="convert even if the adapter was trained on another base")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("combine", help="weighted combination of adapters -> one adapter")
    _add_model_args(p, adapters=False)
    p.add_argument("adapters", nargs="+", metavar="[NAME=]PATH", help="the adapters to combine")
    p.add_argument("--weights", nargs="+", type=float, required=True, metavar="W",
                   help="one weight per adapter (e.g. 0.7 0.3)")
    p.add_argument("--out", required=True, metavar="DIR", help="the adapter folder to write")
    p.add_argument("--method", default="linear", choices=["linear", "svd"],
                   help="linear: ranks concatenated, exact; svd: re-factored to --r with the "
                        "error reported (default: %(default)s)")
    p.add_argument("--r", type=int, default=None, metavar="N",
                   help="rank for --method svd (default: the sum of the ranks)")
    p.add_argument("--no-fingerprint-check", action="store_true",
                   help="combine even if an adapter was trained on another base")
    p.set_defaults(run=cmd_combine)

    p = sub.add_parser("serve", help="an OpenAI-compatible server; each request picks its "
                                     "adapter (needs the serve extra)")
    _add_model_args(p)
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the base's name in requests and /v1/models (default: the model's "
                        "folder name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: none)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="most requests decoded together; more wait (default: %(default)s)")
    p.add_argument("--adapter-dir", default=None, metavar="DIR",
                   help="allow POST /v1/load_lora_adapter to read adapters under DIR "
                        "(default: run-time loading is refused)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("info", help="what a model or adapter folder holds")
    p.add_argument("path", help="a model folder, an adapter folder or a .pth file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a listing")
    _add_model_config_arg(p, "--config", "--model-config")
    p.set_defaults(run=cmd_info)
    return parser


def _unknown_flags(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """An unknown argument: one line naming the nearest flag of that subcommand; exit 2."""
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = [f for action in sub.choices[command]._actions for f in action.option_strings]
    word = unknown[0]
    near = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else ""
    print(f"minilora {command}: error: unknown argument {word}{hint} (see `minilora {command} "
          "--help`)", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _flag(field: str) -> str:
    return "--" + _SHORT.get(field, field).replace("_", "-")


def _in_flag_words(message: str) -> str:
    """A library message in the command line's words: its flags, not the library's keywords."""
    message = re.sub(r"TrainConfig\.lora_\*: LoraConfig\.(\w+)",
                     lambda m: _flag("use_rslora" if m[1] == "use_rslora" else f"lora_{m[1]}"),
                     message)
    message = re.sub(r"TrainConfig\.(\w+)", lambda m: _flag(m[1]), message)
    return (message.replace("TrainConfig key(s)", "config key(s)")
            .replace("resume=True (--resume)", "--resume")
            .replace("pass name=...", "name the adapter (--adapter NAME=PATH)")
            .replace("format='peft'", "an adapter folder"))


def _user_errors() -> tuple[type[BaseException], ...]:
    # What a bad input or the world raises: minilora's own error types and OS errors (a missing
    # file, a folder that cannot be written, a full disk). Anything else is a bug in minilora and
    # keeps its traceback (exit 1), rather than being passed off as the user's mistake.
    return (MiniloraError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `minilora ARGS`; returns the exit code (2 for bad input)."""
    from minilora.threads import prepare_env

    argv = list(sys.argv[1:] if argv is None else argv)
    if not {"-h", "--help", "--version"} & set(argv):  # help computes nothing: no CPU sample
        prepare_env()  # before torch is imported: OpenMP reads it once
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(train_args=command == "train")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unknown_flags(parser, args.command, unknown)
    try:
        return args.run(args)
    except _user_errors() as err:
        if isinstance(err, BaseConfigNeeded):  # train's --config is its own settings file
            err.flag = "--model-config" if args.command == "train" else "--config"
        # One line whatever the message holds (a wrapped library error may carry newlines or
        # terminal colour codes).
        message = re.sub(r"\s*\n\s*", " ", re.sub(r"\x1b\[[0-9;]*m", "", str(err))).strip()
        message = _in_flag_words(message)
        print(f"minilora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"minilora {args.command}: interrupted", file=sys.stderr)
        return 130
