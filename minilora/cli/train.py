"""`minilora train`: TrainConfig's fields as flags, presets, the run, the before/after table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minilora.cli.common import ASSETS, BASE_MODEL, SHORT, CliError, flag
from minilora.core.outputs import check_not_an_input

# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------

# --preset: settings measured to teach on such data (docs/quality.md, "Small data"). A few dozen
# rows give a handful of steps an epoch, so the preset fixes the number of steps, not epochs, and
# takes the demo's learning rate: 1e-4 for 20 steps moves a LoRA adapter nowhere.
PRESETS: dict[str, dict[str, Any]] = {
    "small-data": {"lr": 2e-3, "max_steps": 300, "batch_size": 16, "warmup_steps": 10,
                   "lora_dropout": 0.0},
    # docs/quality.md, "A new skill": the LoRA nearest full fine-tuning on a skill whose answers
    # use tokens the base rarely writes
    "new-skill": {"lora_r": 8, "lora_alpha": 16.0, "lr": 1e-3, "answer_tokens": True,
                  "max_steps": 600, "batch_size": 16, "warmup_steps": 20},
}

PRESET_USES = {
    "small-data": "a few dozen to a few hundred conversations",
    "new-skill": "a skill whose answers the base never writes, hundreds of conversations",
}


def _preset_flags(name: str, leave_out: tuple[str, ...] = ()) -> str:
    return ", ".join(flag(k) if v is True else f"{flag(k)} {v:g}" if isinstance(v, float)
                     else f"{flag(k)} {v}" for k, v in PRESETS[name].items()
                     if k not in leave_out)

# The TrainConfig fields the command line does not offer: the library sets them itself (model
# and tokenizer are --model / --tokenizer, added by hand with the other model arguments).
_HIDDEN_FIELDS = {"device", "model", "tokenizer"}


def _parse_targets(text: str) -> list[str] | str:
    if text in ("all-linear", "square") or not re.fullmatch(r"[\w.,]+", text):
        return text  # a special rule or a regex
    return [t for t in text.split(",") if t]


def _token_id(text: str) -> int:
    """A --trainable-tokens value: a token id, an integer (its range is checked with the model)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected token ids (integers), got {text!r}") from None


# Old flag -> the field it sets; it still works, with a one-line note naming the new flag
# (train's --dtype was the autocast dtype, where --dtype elsewhere is the weights' dtype).
_OLD_FLAGS = {"--dtype": "amp_dtype"}


class _OldFlagToo(argparse.Action):
    """A flag that also answers to its old name, with a one-line note when that one is used."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if option_string in _OLD_FLAGS:
            print(f"minilora train: note: {option_string} is now {flag(self.dest)}",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from minilora.training.config import TrainConfig

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
    p.add_argument("--samples", type=int, default=0, metavar="K",
                   help="also score --tasks sampled, before and after: K answers a question, "
                        "with the base's generation_config.json (else temperature 1), the share "
                        "of them right (default: 0, greedy only)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="settings for a case, under the flags given: " + "; ".join(
                       f"{name} ({PRESET_USES[name]}): {_preset_flags(name)}"
                       for name in PRESETS) + " (default: none)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in _HIDDEN_FIELDS:
            continue
        flag = "--" + SHORT.get(f.name, f.name).replace("_", "-")
        help_text = f.metadata["help"] + f" (default: {_shown_default(f)})"
        kind = str(f.type)
        if kind == "bool":
            p.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
        elif f.name == "lora_targets":
            p.add_argument(flag, dest=f.name, type=_parse_targets, default=None,
                           metavar="LIST|REGEX", help=help_text + " (comma-separated list)")
        elif f.name == "eval_tasks":
            p.add_argument(flag, dest=f.name, nargs="+", default=None, metavar="FILE",
                           help=help_text)
        elif f.name == "lora_exclude":
            p.add_argument(flag, dest=f.name, type=_parse_targets, default=None,
                           metavar="LIST", help=help_text + " (comma-separated)")
        elif f.name == "modules_to_save":
            p.add_argument(flag, dest=f.name, nargs="+", default=None, metavar="NAME",
                           help=help_text)
        elif f.name == "trainable_tokens":
            p.add_argument(flag, dest=f.name, nargs="+", type=_token_id, default=None,
                           metavar="ID", help=help_text)
        else:
            conv = int if "int" in kind else float if "float" in kind else str
            old = [o for o, name in _OLD_FLAGS.items() if name == f.name]
            p.add_argument(flag, *old, dest=f.name, type=conv, default=None,
                           action=_OldFlagToo, metavar=f.name.split("_")[-1].upper(),
                           help=help_text + "".join(f" ({o}: its old name)" for o in old))


def _train_config(args: argparse.Namespace, given: dict[str, Any]) -> tuple[Any, bool]:
    """The run's TrainConfig from the demo, --config or a resumed run's config.json, then the
    flags given; returns it and whether this is the demo."""
    from minilora.training.config import TrainConfig
    from minilora.training.run_layout import RunLayout

    saved = RunLayout(given["out_dir"]).config if "out_dir" in given else None
    resuming_saved = bool(given.get("resume")) and not args.config and saved is not None
    if resuming_saved and saved is not None and not saved.is_file():  # (saved is set)
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
    elif resuming_saved and saved is not None:  # (saved is set)
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
    preset = PRESETS.get(getattr(args, "preset", None) or "", {})
    clash = [k for k in ("full", "fsdp", "quantize") if settings.get(k)]
    if preset.get("answer_tokens") and "answer_tokens" not in given and clash:
        # the preset's own field would be refused under a name the user never typed
        others = _preset_flags(args.preset, leave_out=("answer_tokens",))
        raise CliError(f"--preset {args.preset} trains the answers' token rows beside LoRA, "
                       f"which {flag(clash[0])} does not take: leave out --preset, or give its "
                       f"other settings yourself ({others})")
    if not settings.get("data"):
        raise CliError("--data is required with --model or --config (a chat or text jsonl)")
    if not settings.get("out_dir"):
        stem = Path(settings["data"]).stem
        settings["out_dir"] = str(Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    model = Path(args.model or settings.get("model") or BASE_MODEL)
    # absolute, so a rerun, a resume and the adapter's base_model_name_or_path find it from any
    # folder (a path that is not here is left for the loader to name)
    settings["model"] = str(model.absolute() if model.exists() else model)
    if args.tokenizer:
        settings["tokenizer"] = str(args.tokenizer)
    return TrainConfig.from_dict(settings), demo


# What a None default means on the command line, where "None" would say nothing.
_NONE_MEANS = {"data": "the demo data with no --model", "eval_data": "no eval",
               "max_steps": "epochs x steps per epoch", "stop_after": "the end",
               "model_config": "the config.json beside the model",
               "beta": "0.1 for dpo, 2.0 for simpo", "from_adapter": "a new adapter",
               "eval_tasks": "none", "loraplus_lr_ratio": "one rate for all", "log_to": "none"}


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
    from minilora.training.config import TrainConfig
    from minilora.training.run_layout import RunLayout

    started = time.perf_counter()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    config, demo = _train_config(args, given)
    if args.samples < 0:
        raise CliError(f"--samples: expected an integer >= 0, got {args.samples}")
    # torch only now: a bad setting is answered before it loads (a second and 230 MB)
    from minilora.core.threads import configure_threads
    from minilora.data import tasks
    from minilora.data.tokenizer import Tokenizer
    from minilora.decoding.chat import chat_answerer
    from minilora.model.io import load_model, load_skeleton
    from minilora.model.state_files import sliceable
    from minilora.training.datasets import load_datasets
    from minilora.training.loop import train

    configure_threads()  # the CPUs other processes leave free (a shared machine)
    check_not_an_input(config.out_dir, {"--model": config.model, "--tokenizer": config.tokenizer,
                                        "--config": args.config, "--tasks": args.tasks},
                       "--out")
    model_path = Path(config.model)
    # --fsdp: each process reads only its shards of the base (after sharding); a torch file of
    # the legacy format (it does not map) is read whole by every process first, then sharded.
    sharded_load = config.fsdp and not config.from_adapter and sliceable(model_path)
    model = (load_skeleton(model_path, config=config.model_config) if sharded_load
             else load_model(model_path, config=config.model_config))
    tokenizer = Tokenizer.from_file(Path(config.tokenizer) if config.tokenizer else
                                    (model_path if model_path.is_dir() else model_path.parent))
    train_set, eval_set = load_datasets(config, tokenizer)

    task_files = args.tasks
    if task_files is None and demo:
        task_files = [str(ASSETS / f) for f in ("persona_eval.jsonl", "base_eval.jsonl")]
    samples = [s for f in task_files or [] for s in tasks.load_samples(f)]
    answer = chat_answerer(model, tokenizer, max_new_tokens=48,
                           eos_token_id=tokenizer.stop_token_ids)
    sampled = _sampled_answerer(model, tokenizer, model_path, args.samples, config.seed)
    if samples and config.fsdp:  # no process holds the whole model, before or after
        if os.environ.get("RANK", "0") == "0":
            print("tasks: not scored with --fsdp; score the adapter with `minilora eval`",
                  file=sys.stderr)
        samples = []
    before = tasks.score(samples, answer) if samples else None
    sampled_before = tasks.score(samples, sampled[0]) if samples and sampled else None

    try:
        result = train(model, train_set, config, eval_set, tokenizer=tokenizer)
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
        _before_and_after(before, samples, answer)
    if sampled_before is not None and not config.fsdp:
        assert sampled is not None  # what sampled_before was scored with
        print(f"sampled ({sampled[1]}; {args.samples} answers a question, the share right):")
        _before_and_after(sampled_before, samples, sampled[0], examples=False)
    print(f"adapter: {result.output_dir}")
    run = RunLayout(config.out_dir)
    written = [p.name + ("/" if p.is_dir() else "")
               for p in (run.metrics, run.plot, run.config, run.checkpoints) if p.exists()]
    print(f"outputs: {config.out_dir} ({', '.join(written)})")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


# A task the base answered at least this share of right before training is one of its own
# skills, which the adapter should keep; a task it could not do (what the run teaches) is not.
BASE_SKILL = 0.5


def _before_and_after(before: Any, samples: list[Any],
                      answer: Callable[[list[dict[str, Any]]], Any], *,
                      examples: bool = True) -> None:
    """The tasks' table before and after training, and a few answers of the trained model."""
    from minilora.data import tasks

    after = tasks.score(samples, answer)
    # The base's own skills, pooled: what the adapter should leave intact (never the task the
    # run teaches, which the base could not do).
    kept = [t for t in before.tasks if before.accuracy(t) >= BASE_SKILL]
    groups = {"base skills": kept} if len(kept) > 1 else None
    print()
    print(tasks.format_table({"before": before, "after": after}, groups=groups, ratio=True))
    if groups:
        print(f"base skills: {', '.join(kept)} (the tasks the base answered at least "
              f"{BASE_SKILL:.0%} right before training)")
    print()
    if not examples:
        return
    for sample in samples[:3]:
        question = sample.chat()[-1]["content"]
        print(f"Q: {question}\nA: {answer(sample.chat())}\n")


def _sampled_answerer(model: Any, tokenizer: Any, model_path: Path, k: int, seed: int
                      ) -> tuple[Callable[[list[dict[str, Any]]], list[str]], str] | None:
    """--samples K: an answerer giving K sampled replies with the base's sampling defaults
    (temperature 1 where it has none), and those settings in words; None when K is 0."""
    from minilora.decoding.chat import sampled_answerer
    from minilora.decoding.sampling import SamplingParams, generation_defaults

    if k == 0:
        return None
    params = SamplingParams.resolve({}, generation_defaults(model_path), {"temperature": 1.0})
    if params.temperature == 0:  # a file that asks for greedy: the greedy table says it all
        params = SamplingParams.resolve({"temperature": 1.0}, params.as_kwargs())
    answer = sampled_answerer(model, tokenizer, k, seed=seed, max_new_tokens=48,
                              eos_token_id=tokenizer.stop_token_ids, **params.as_kwargs())
    return answer, params.describe()


def _say_how_to_resume(config: Any) -> None:
    """Ctrl-C during training: which checkpoint is kept and the command that continues it."""
    from minilora.training.checkpoint import latest_checkpoint
    from minilora.training.run_layout import RunLayout

    kept = latest_checkpoint(RunLayout(config.out_dir).checkpoints)
    if kept is None:
        print("minilora train: interrupted before its first step ended, so nothing was kept; "
              f"start it over with: minilora train --resume --out {config.out_dir}",
              file=sys.stderr)
        return
    print(f"minilora train: interrupted; kept {kept}. Resume with: minilora train --resume "
          f"--out {config.out_dir}", file=sys.stderr)


def add_train_parser(sub: Any, *, flags: bool = True) -> None:
    """Adds `train`; its flags come from TrainConfig (which imports torch), so they are added
    only when `flags` (main leaves them out unless the command is `train`)."""
    p = sub.add_parser("train", help="LoRA fine-tune (no arguments: the embedded demo)",
                       description="LoRA fine-tuning (or --full). With no arguments: the embedded "
                                   "tiny model learns a new persona, with a before/after table.")
    if flags:
        _add_train_args(p)
    p.set_defaults(run=cmd_train)
