"""TrainConfig: every setting of a training run, validated, round-tripping through config.json.

Imports no torch: the command line builds its flags and reports a bad value without it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from minilora.core.checks import field_type_problems
from minilora.core.errors import ConfigError
from minilora.core.files import atomic_write, read_json
from minilora.lora.config import LoraConfig

AMP_DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANT_KINDS = ("nf4", "int8")  # bitsandbytes' 4-bit NF4 and LLM.int8()
# What a run optimises: next-token cross-entropy on answers (sft), or preference pairs: DPO
# against a reference, or SimPO with none (see training/preference.py).
METHODS = ("sft", "dpo", "simpo")
DPO_LOSSES = ("sigmoid", "ipo")
# beta when none is given: DPO's paper and TRL use 0.1; SimPO's paper 2.0 (its reward is a
# per-token mean, so it needs a larger scale).
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}
# The preference settings and their defaults: set with --method sft they are refused, not ignored.
_PREFERENCE_DEFAULTS = {"beta": None, "dpo_loss": "sigmoid", "label_smoothing": 0.0,
                        "simpo_gamma": 1.0, "from_adapter": None}
# Fields that do not change what is computed, so a resume may change them.
RESUMABLE_CHANGES = (
    "data", "eval_data", "out_dir", "eval_every", "save_every", "compile", "resume",
    "log_every", "max_bad_steps", "stop_after", "device", "overwrite",
    "model", "tokenizer", "model_config",  # the base fingerprint in the checkpoint checks the base
    "activation_checkpointing",
)
# Keys of an older config.json (or checkpoint) -> today's field.
RENAMED = {"dtype": "amp_dtype"}
# torch's device types (torch.device accepts these); checked here without importing torch, the
# device's presence is checked when the run starts.
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|meta|hpu|mtia|xla|hip|ipu|maia|privateuseone)(:\d+)?")
_POSITIVE = ("lora_r", "epochs", "batch_size", "accumulation_steps", "max_seq_len", "log_every",
             "max_bad_steps", "max_steps", "stop_after")
_NOT_NEGATIVE = ("warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip")
# TrainConfig field -> LoraConfig field, for the settings LoraConfig checks itself.
_LORA_FIELDS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                "lora_targets": "targets", "lora_exclude": "exclude", "lora_init": "init",
                "use_rslora": "use_rslora", "use_dora": "use_dora",
                "modules_to_save": "modules_to_save", "trainable_tokens": "trainable_token_indices"}


def _arg(default: Any, doc: str) -> Any:
    """A TrainConfig field with its one-line doc in ``metadata["help"]`` (the --help text of
    ``minilora train``); a list default is copied for each config (a default_factory)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as config.json beside its outputs."""

    data: str | None = _arg(None, "training data: .jsonl, .json or .parquet (chat, ShareGPT, "
                                  "Alpaca or text), or a folder of them")
    eval_data: str | None = _arg(None, "held-out jsonl: loss and perplexity every eval_every steps")
    out_dir: str = _arg("runs/minilora", "outputs: adapter, checkpoints, metrics.jsonl, loss.png")
    full: bool = _arg(False, "train every weight instead of LoRA adapters")
    lora_r: int = _arg(8, "rank of the LoRA update")
    lora_alpha: float = _arg(16.0, "the update is scaled by alpha / r (alpha / sqrt(r), rsLoRA)")
    lora_dropout: float = _arg(0.0, "dropout on the LoRA branch input, in [0, 1)")
    lora_targets: list[str] | str = _arg("all-linear", 'suffixes, regex, "all-linear" or "square";'
                                         " embed_tokens puts LoRA on the embedding table too")
    lora_exclude: list[str] | str = _arg([], "suffixes or regex: never adapted")
    lora_init: str = _arg("gaussian", "init of A: gaussian (MiniMind's), kaiming (PEFT's) or "
                          "pissa (A, B from the base's top-r SVD; the base keeps the residual)")
    use_rslora: bool = _arg(False, "rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = _arg(False, "weight-decomposed LoRA (DoRA): a trained magnitude per output "
                          "row (PEFT's use_dora)")
    epochs: int = _arg(1, "passes over the data (when max_steps is None)")
    max_steps: int | None = _arg(None, "optimizer steps in all; None: epochs x steps per epoch")
    batch_size: int = _arg(8, "samples per micro-batch, per process")
    accumulation_steps: int = _arg(1, "micro-batches per optimizer step")
    lr: float = _arg(1e-4, "peak learning rate")
    min_lr_ratio: float = _arg(0.1, "the cosine ends at lr x min_lr_ratio")
    warmup_steps: int = _arg(0, "linear warmup from lr / warmup_steps to lr")
    weight_decay: float = _arg(0.0, "AdamW's decoupled weight decay")
    loraplus_lr_ratio: float | None = _arg(
        None, "LoRA+: the B matrices learn at lr x this ratio, A at lr (PEFT's loraplus_lr_ratio; "
        "the LoRA+ paper suggests 16); None: one rate for all")
    grad_clip: float = _arg(1.0, "max global norm of the trainable gradients; 0: no clipping")
    amp_dtype: str = _arg("auto", 'autocast: "auto" | "float32" | "bfloat16" | "float16" (CUDA '
                                  "only)")
    max_seq_len: int = _arg(512, "samples are cut to this many tokens")
    pack: bool = _arg(False, "pack whole samples into rows of max_seq_len, each attending only "
                             "to itself, instead of one padded row a sample")
    eval_tasks: list[str] | str | None = _arg(
        None, "task files (held-out questions, as `minilora eval --tasks` reads): their greedy "
        "accuracy at every evaluation, in metrics.jsonl as task/<name>")
    eval_every: int = _arg(0, "evaluate every N steps; 0: at the end only")
    save_every: int = _arg(0, "checkpoint every N steps; 0: at the end only")
    seed: int = _arg(42, "LoRA init, data order and dropout")
    compile: bool = _arg(False, "run the forward through torch.compile")
    resume: bool = _arg(False, "continue from the latest checkpoint in out_dir")
    log_every: int = _arg(10, "log loss, lr and tokens/s every N steps")
    log_to: str | None = _arg(None, '"tensorboard": the logged metrics also go to TensorBoard '
                              "event files in out_dir/tensorboard (needs minilora[tensorboard])")
    skip_bad: bool = _arg(False, "skip (and count) bad jsonl lines instead of stopping")
    max_bad_steps: int = _arg(5, "stop after this many non-finite steps in a row")
    stop_after: int | None = _arg(None, "end this run at this step (checkpointed), schedule kept")
    device: str = _arg("auto", '"auto" (cuda:LOCAL_RANK with CUDA, else cpu), "cpu", "cuda:0"')
    overwrite: bool = _arg(False, "replace the outputs of an earlier run in out_dir (without it, "
                                  "a folder holding a run is refused; --resume continues one)")
    # The base's path is recorded in config.json (a resume needs no retyping) and in the
    # adapter's base_model_name_or_path (PEFT's AutoPeftModel finds the base with it).
    model: str | None = _arg(None, "base model folder or MiniMind .pth (default: the embedded "
                                   "tiny model)")
    tokenizer: str | None = _arg(None, "tokenizer.json or its folder (default: the model's "
                                       "folder)")
    model_config: str | None = _arg(
        None, "the base's config when the model has no config.json beside it (a bare MiniMind "
              ".pth): MiniMind's config.json or transformers', or minimind2 / minimind3 for that "
              "MiniMind generation's defaults")
    replay: str | None = _arg(None, "data of what the base already does (its own answers), mixed "
                                    "in so the adapter keeps it")
    replay_ratio: float = _arg(0.5, "replay rows per training row (0.5: one replayed for two)")
    activation_checkpointing: bool = _arg(
        False, "recompute each decoder block in backward: less memory, about 1/3 more compute")
    quantize: str | None = _arg(
        None, 'QLoRA: the frozen Linears in bitsandbytes "nf4" (4-bit) or "int8"; needs '
        "minilora[qlora]")
    fsdp: bool = _arg(
        False, "shard the model (frozen base and LoRA) across the processes torchrun starts "
        "(FSDP2), so a base too large for one device trains on several")
    method: str = _arg("sft", 'what to train on: "sft" (answers, cross-entropy), "dpo" (pairs '
                       'of a chosen and a rejected answer, against the base with the adapter '
                       'off as reference) or "simpo" (pairs, no reference)')
    beta: float | None = _arg(None, "dpo/simpo: how strongly the preference pulls (None: the "
                                    "method's default)")
    dpo_loss: str = _arg("sigmoid", 'dpo: "sigmoid" (the DPO paper\'s) or "ipo" (squared, '
                                    "per-token mean log-ratios)")
    label_smoothing: float = _arg(0.0, "dpo sigmoid/simpo: the share of pairs assumed mislabelled "
                                       "(conservative DPO), in [0, 0.5)")
    simpo_gamma: float = _arg(1.0, "simpo: the target reward margin gamma")
    from_adapter: str | None = _arg(
        None, "dpo/simpo: start from this (SFT) adapter folder: dpo trains a copy of it with "
              "the adapter itself, frozen, as reference")
    modules_to_save: list[str] = _arg(
        [], "modules trained as a whole copy beside LoRA and saved whole in the adapter "
            "(PEFT's modules_to_save), e.g. lm_head or model.norm; a module is chosen when its "
            "name ends with one")
    trainable_tokens: list[int] = _arg(
        [], "token ids whose rows of the input embedding train (a tied lm_head follows), "
            "e.g. new special tokens (PEFT's trainable_token_indices); a word's ids are what "
            "the tokenizer's encode gives")
    answer_tokens: bool = _arg(
        False, "also train the embedding rows of every token the training answers use (as "
               "--trainable-tokens with those ids, found in the data): for answers in words or "
               "symbols the base rarely writes")

    def preference_beta(self) -> float:
        """beta as given, or the method's default (DEFAULT_BETA)."""
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.method, 0.1)

    def __post_init__(self) -> None:
        for name in ("lora_targets", "lora_exclude"):  # a tuple of names reads as a list
            value = getattr(self, name)
            if isinstance(value, tuple):
                setattr(self, name, list(value))
        typed = field_type_problems(self)  # the range checks read only well-typed fields
        problems = {**self._lora_problems(typed), **self._range_problems(typed), **typed}
        if problems:  # every bad field, in one error
            raise config_error({f.name: problems[f.name] for f in fields(self)
                                if f.name in problems})

    def _range_problems(self, typed: dict[str, str]) -> dict[str, str]:
        ok = {f.name for f in fields(self)} - set(typed)
        problems: dict[str, str] = {}
        for name in _POSITIVE:
            value = getattr(self, name)
            if name in ok and value is not None and value < 1:
                problems[name] = f"expected an integer >= 1, got {value}"
        for name in _NOT_NEGATIVE:
            if name in ok and getattr(self, name) < 0:
                problems[name] = f"expected >= 0, got {getattr(self, name)}"
        return {**self._other_ranges(ok), **problems}

    def _other_ranges(self, ok: set[str]) -> dict[str, str]:
        problems: dict[str, str] = {}
        if "seed" in ok and not 0 <= self.seed < 2**63:
            problems["seed"] = f"expected an integer in [0, 2**63), got {self.seed}"
        if "device" in ok and self.device != "auto" and not _DEVICE.fullmatch(self.device):
            problems["device"] = (f'unknown device {self.device!r}; expected "auto", "cpu", '
                                  '"cuda" or "cuda:N"')
        ratio = self.loraplus_lr_ratio
        if "loraplus_lr_ratio" in ok and ratio is not None and not (
                math.isfinite(ratio) and ratio > 0):
            problems["loraplus_lr_ratio"] = f"expected a finite number > 0, got {ratio}"
        elif "loraplus_lr_ratio" in ok and ratio is not None and self.full:
            problems["loraplus_lr_ratio"] = "LoRA+ sets the rate of LoRA's B matrices; --full " \
                                            "trains no LoRA: leave it out"
        extras = [n for n in ("modules_to_save", "trainable_tokens", "answer_tokens")
                  if n in ok and getattr(self, n)]
        for name in extras:
            # FSDP shards and QLoRA quantizes whole modules, which these copy or wrap
            why = ("--full trains every weight already" if self.full else
                   "not with --fsdp" if self.fsdp else "not with --quantize" if self.quantize
                   else None)
            if why:
                problems[name] = f"trains beside LoRA; {why}: leave it out"
        if "log_to" in ok and self.log_to not in (None, "tensorboard"):
            problems["log_to"] = f'expected "tensorboard" (or nothing), got {self.log_to!r}'
        if "lr" in ok and not self.lr > 0:
            problems["lr"] = f"expected a finite number > 0, got {self.lr}"
        if "replay_ratio" in ok and not 0 <= self.replay_ratio <= 100:
            problems["replay_ratio"] = f"expected [0, 100], got {self.replay_ratio}"
        if "min_lr_ratio" in ok and not 0 <= self.min_lr_ratio <= 1:
            problems["min_lr_ratio"] = f"expected [0, 1], got {self.min_lr_ratio}"
        if "max_seq_len" in ok and self.max_seq_len == 1:
            problems["max_seq_len"] = f"expected >= 2, got {self.max_seq_len}"
        if "amp_dtype" in ok and self.amp_dtype not in AMP_DTYPES:
            problems["amp_dtype"] = f"expected one of {AMP_DTYPES}, got {self.amp_dtype!r}"
        if "fsdp" in ok and self.fsdp is True:
            problems.update(_fsdp_problems(self, ok))
        problems.update(self._preference_problems(ok))
        if "quantize" not in ok or self.quantize is None:
            return problems
        if self.quantize not in QUANT_KINDS:
            problems["quantize"] = f"expected one of {QUANT_KINDS} or null, got {self.quantize!r}"
        elif self.full is True:
            problems["quantize"] = ("a quantized base is frozen; it cannot go with {full} "
                                    "(which trains every weight)")
        elif self.lora_init == "pissa":  # checked before a step is taken (was: at the save)
            problems["quantize"] = ("PiSSA ({lora_init} pissa) replaces the base weights with "
                                    "their residual, which a quantized base cannot hold; train "
                                    "PiSSA on the full-precision base, or quantize with another "
                                    "{lora_init}")
        return problems

    def _preference_problems(self, ok: set[str]) -> dict[str, str]:
        """The preference settings: in range, and only with a method that reads them."""
        problems: dict[str, str] = {}
        if "method" in ok and self.method not in METHODS:
            problems["method"] = f"expected one of {METHODS}, got {self.method!r}"
            return problems
        if "beta" in ok and self.beta is not None and not (
                self.beta > 0 and math.isfinite(self.beta)):
            problems["beta"] = f"expected a finite number > 0, got {self.beta}"
        if "dpo_loss" in ok and self.dpo_loss not in DPO_LOSSES:
            problems["dpo_loss"] = f"expected one of {DPO_LOSSES}, got {self.dpo_loss!r}"
        if "label_smoothing" in ok and not 0 <= self.label_smoothing < 0.5:
            problems["label_smoothing"] = f"expected [0, 0.5), got {self.label_smoothing}"
        if "simpo_gamma" in ok and not (self.simpo_gamma >= 0 and math.isfinite(self.simpo_gamma)):
            problems["simpo_gamma"] = f"expected a finite number >= 0, got {self.simpo_gamma}"
        if "method" not in ok:
            return problems
        if self.method == "sft":
            for name, default in _PREFERENCE_DEFAULTS.items():
                if name in ok and name not in problems and getattr(self, name) != default:
                    problems[name] = ("only for preference pairs; set {method} dpo or simpo "
                                      "(the data then holds chosen and rejected answers)")
            return problems
        only = {"dpo_loss": ("dpo", self.dpo_loss != "sigmoid"),
                "simpo_gamma": ("simpo", self.simpo_gamma != 1.0)}
        for name, (method, given) in only.items():
            if name in ok and name not in problems and given and self.method != method:
                problems[name] = f"only for {{method}} {method}"
        if self.dpo_loss == "ipo" and self.label_smoothing and "label_smoothing" not in problems:
            problems["label_smoothing"] = "the ipo loss has no label smoothing; leave it at 0"
        sft_only = {"pack": self.pack, "replay": self.replay is not None,
                    "compile": self.compile, "full": self.full and self.method == "dpo"}
        why = {"pack": "a pair is one chosen and one rejected row, never packed",
               "replay": "replay mixes SFT rows into the data",
               "compile": "the preference step runs uncompiled",
               "full": "dpo's reference is the base with the adapter off, which full "
                       "fine-tuning changes"}
        for name, given in sft_only.items():
            if name in ok and given:
                problems[name] = f"not with {{method}} {self.method}: {why[name]}"
        return problems

    def _lora_problems(self, typed: dict[str, str]) -> dict[str, str]:
        """LoraConfig's own checks, each bad field under this config's name for it."""
        ours = {lora_name: name for name, lora_name in _LORA_FIELDS.items() if name not in typed}
        try:
            LoraConfig(**{lora_name: getattr(self, name) for lora_name, name in ours.items()})
        except ConfigError as err:
            return {ours[lora_name]: f" {what}" for lora_name, what in err.problems.items()}
        return {}

    def lora_config(self) -> LoraConfig:
        """The LoraConfig these settings describe."""
        return LoraConfig(
            r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
            targets=self.lora_targets, exclude=self.lora_exclude, init=self.lora_init,
            use_rslora=self.use_rslora, use_dora=self.use_dora,
            modules_to_save=self.modules_to_save, trainable_token_indices=self.trainable_tokens,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``from_dict`` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build a config from a dict such as ``to_dict()`` returns (an older one's keys too).

        Raises:
            ConfigError: on an unknown key (naming it and listing the valid ones) or a bad
                value.
        """
        d = renamed_keys(d)
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {valid}")
        return cls(**d)

    def save_json(self, path: str | Path) -> None:
        """Write the config as JSON (atomically)."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(Path(path), text)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        """Read a config written by ``save_json``.

        Raises:
            ConfigError: on a file that is not a JSON object, or a bad key or value.
        """
        d = read_json(path, "a TrainConfig JSON file")
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object of TrainConfig fields")
        return cls.from_dict(d)


def _fsdp_problems(config: TrainConfig, ok: set[str]) -> dict[str, str]:
    """The settings FSDP does not take here, each a reason."""
    problems: dict[str, str] = {}
    if "full" in ok and config.full is True:
        problems["full"] = "cannot go with {fsdp} yet: sharded training trains LoRA adapters only"
    if "quantize" in ok and config.quantize is not None:
        # FSDP-QLoRA needs the 4-bit storage to be sharded as one dtype with the rest of a
        # block (bitsandbytes' quant_storage); not wired here, so refused rather than inexact.
        problems["quantize"] = "cannot go with {fsdp}: a quantized base is not sharded here"
    if "lora_init" in ok and config.lora_init == "pissa":
        problems["lora_init"] = ("pissa cannot go with {fsdp}: its adapter is converted with "
                                 "the whole base weights when saved")
    if "compile" in ok and config.compile is True:
        problems["compile"] = "cannot go with {fsdp} yet"
    if "eval_tasks" in ok and config.eval_tasks:
        # the questions are answered by rank 0 alone, which cannot run a sharded model
        problems["eval_tasks"] = ("cannot go with {fsdp} yet: score the adapter after the run "
                                  "with `minilora eval --tasks`")
    return problems


def field_defaults() -> dict[str, Any]:
    """Every field's default: what a config (or checkpoint) written before a field existed
    meant by leaving it out."""
    out = {}
    for f in fields(TrainConfig):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def renamed_keys(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with the keys of an older config.json under today's names (``dtype`` ->
    ``amp_dtype``); a key given under both names keeps today's."""
    out = {RENAMED.get(k, k): v for k, v in d.items() if RENAMED.get(k, k) == k or
           RENAMED[k] not in d}
    return out


def config_error(problems: dict[str, str]) -> ConfigError:
    """One ConfigError naming every bad field (``TrainConfig.lr: expected ...; ...``); the
    fields travel as data (``err.fields``), so the command line can name its flags instead."""
    text = "; ".join(f"{{{name}}}{what}" if what.startswith((" ", ":")) else
                     f"{{{name}}}: {what}" for name, what in problems.items())
    named = [f.name for f in fields(TrainConfig) if "{" + f.name + "}" in text]  # others too
    return ConfigError(text, fields={name: f"TrainConfig.{name}"
                                     for name in [*problems, *named]})
