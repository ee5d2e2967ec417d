"""LoRA's settings: `LoraConfig` and the checks on its fields and on adapter names.

Free of torch, so the command line's help and config checks do not pay for importing it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from minilora.core.errors import ConfigError

SPECIAL_TARGETS = ("all-linear", "square")
INITS = ("gaussian", "kaiming", "pissa")
DEFAULT_ADAPTER = "default"
# Row names that mean "the base model" in a mixed batch; "base" can therefore not name an adapter.
BASE_ROW = "base"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


@dataclass
class LoraConfig:
    """What to adapt and how.

    Attributes:
        r: rank of the update B @ A.
        alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).
        dropout: dropout probability on the LoRA branch's input (training only).
        targets: module-name suffixes (["q_proj", "v_proj"]), a full-match regex on module
            names, "all-linear" (every Linear but the output head) or "square" (in == out,
            MiniMind's rule).
        exclude: module-name suffixes (or a full-match regex) never adapted.
        init: "gaussian" (A ~ N(0, 0.02), MiniMind's), "kaiming" (uniform, PEFT's default) or
            "pissa" (A, B from the top-r SVD of the base weight, which keeps the residual).
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        use_dora: weight-decomposed LoRA (a learned magnitude per output row).
        modules_to_save: names of modules (a module is chosen when its full name ends with
            one, PEFT's rule) that train as a whole copy, saved whole (PEFT's modules_to_save).
        trainable_token_indices: token ids whose rows of the input embedding train (a tied
            head follows), or module name -> ids (PEFT's trainable_token_indices).

    Raises:
        ConfigError: naming every bad field (``err.problems``: field -> what is wrong).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = "all-linear"
    exclude: list[str] | str = field(default_factory=list)
    init: str = "gaussian"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    trainable_token_indices: list[int] | dict[str, list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:  # every bad field, in one error
            raise ConfigError(
                "; ".join(f"{{{name}}} {what}" for name, what in problems.items()),
                fields={name: f"LoraConfig.{name}" for name in problems}, problems=problems)
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        for name in ("targets", "exclude"):  # a tuple of names reads as a list
            if not isinstance(getattr(self, name), str):
                setattr(self, name, list(getattr(self, name)))
        self.modules_to_save = list(self.modules_to_save)
        ids = self.trainable_token_indices
        self.trainable_token_indices = ({k: list(v) for k, v in ids.items()}
                                        if isinstance(ids, dict) else list(ids))

    def _problems(self) -> dict[str, str]:
        """field -> what is wrong with its value, for every bad field."""
        problems = {}
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            problems["r"] = f"must be an integer >= 1, got {self.r!r}"
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            problems["alpha"] = f"must be a number > 0, got {self.alpha!r}"
        elif not self.alpha > 0:
            problems["alpha"] = f"must be > 0, got {self.alpha!r}"
        elif not math.isfinite(self.alpha):
            problems["alpha"] = f"must be a finite number, got {self.alpha!r}"
        elif "r" not in problems and not isinstance(self.use_rslora, bool):
            pass  # reported below
        elif "r" not in problems and \
                lora_scaling(self.r, self.alpha, self.use_rslora) > MAX_SCALING:
            # The fused layers compute in float16 / bfloat16 under autocast: a scale past
            # float16's range overflows there (a RuntimeError from deep inside torch).
            problems["alpha"] = (
                f"gives a scaling of {lora_scaling(self.r, self.alpha, self.use_rslora):g} "
                f"(alpha / {'sqrt(r)' if self.use_rslora else 'r'}), beyond {MAX_SCALING:g}, "
                f"the largest float16 number the update is computed in; got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            problems["dropout"] = f"must be a number in [0, 1), got {self.dropout!r}"
        elif not 0.0 <= self.dropout < 1.0:
            problems["dropout"] = f"must be in [0, 1), got {self.dropout!r}"
        for name, allow_empty in (("targets", False), ("exclude", True)):
            why = _names_problem(getattr(self, name), allow_empty=allow_empty)
            if why:
                problems[name] = why
        if "exclude" not in problems and self.exclude in SPECIAL_TARGETS:
            problems["exclude"] = f"cannot be {self.exclude!r}"
        if self.init not in INITS:
            problems["init"] = f"must be one of {INITS}, got {self.init!r}"
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                problems[name] = f"must be a bool, got {getattr(self, name)!r}"
        saved = self.modules_to_save
        if not isinstance(saved, (list, tuple)) or not all(isinstance(s, str) and s
                                                          for s in saved):
            problems["modules_to_save"] = f"must be a list of module names, got {saved!r}"
        why = token_ids_problem(self.trainable_token_indices)
        if why:
            problems["trainable_token_indices"] = why
        return problems

    @property
    def scaling(self) -> float:
        """The factor on B @ A: alpha / r, or alpha / sqrt(r) with use_rslora."""
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict that `from_dict` reads back."""
        d = asdict(self)
        for key in ("targets", "exclude"):
            if isinstance(d[key], list):
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        """Builds a config from a dict such as `to_dict()` returns.

        Raises:
            ConfigError: on an unknown key (the message lists the valid ones) or an invalid value.
        """
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise ConfigError(f"unknown LoraConfig key(s) {unknown}; valid keys: {valid}")
        return cls(**d)


def token_ids_problem(value: object) -> str | None:
    """What is wrong with a trainable_token_indices value (a list of distinct token ids >= 0, or
    module name -> such a list), or None."""
    def ids_problem(ids: object) -> str | None:
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return f"must be a list of integer token ids, got {ids!r}"
        negative = [i for i in ids if i < 0]
        if negative:
            return f"must be token ids >= 0, got {negative[:5]}"
        seen: set[int] = set()
        twice = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
        if twice:
            return f"lists token ids more than once: {twice[:5]}"
        return None

    if isinstance(value, dict):
        for key, ids in value.items():
            if not isinstance(key, str) or not key:
                return f"keys must be module names, got {key!r}"
            why = ids_problem(ids)
            if why is None and not ids:
                why = "must not be empty"
            if why:
                return f"{why} (for {key!r})"
        return None
    return ids_problem(value)


def _names_problem(value: object, *, allow_empty: bool) -> str | None:
    """What is wrong with a targets / exclude value, or None."""
    if isinstance(value, str):
        if value in SPECIAL_TARGETS:
            return None
        try:
            check_regex(value)
        except ValueError as e:
            return f"is not a usable regex {value!r}: {e}"
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
        return f"must be a list of module-name suffixes or a regex string, got {value!r}"
    if not value and not allow_empty:
        return "is empty; name at least one module suffix"
    return None


try:  # Python 3.11+; 3.10 has the same parser under its old, now deprecated, names
    from re import _constants as _sre_constants  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_constants as _sre_constants
    import sre_parse as _sre_parse

# Module names are short; a longer pattern is not a target list but an attack or a mistake.
MAX_REGEX_LENGTH = 500


def check_regex(pattern: str) -> None:
    """Refuse a regex that could take exponential time on a module name.

    Python's ``re`` backtracks: a repeat over something that can itself match in several ways
    (``(a+)+``, ``(a|a)*``, ``(a*)*``) can take 2**n steps on a name of n characters, and no
    timeout can stop a match in progress. So the rule is structural: no repeat may hold another
    repeat or an alternation. Target patterns need neither (``.*\\.(q|v)_proj`` is fine: the
    alternation is not under a repeat).

    Raises:
        ValueError: the pattern is invalid, longer than MAX_REGEX_LENGTH, or nests as above.
    """
    if len(pattern) > MAX_REGEX_LENGTH:
        raise ValueError(f"longer than {MAX_REGEX_LENGTH} characters")
    try:
        parsed = _sre_parse.parse(pattern)
    except re.error as e:
        raise ValueError(str(e)) from None
    if _nested_repeat(parsed, inside_repeat=False):
        raise ValueError("a repeated group holds another repeat or an alternation (such as "
                         "(a+)+ or (a|b)*), which can take exponential time; simplify it")


def _nested_repeat(items: Any, inside_repeat: bool) -> bool:
    # items: an sre_parse SubPattern or an op's argument list, internals with no published types
    constants = _sre_constants
    repeats = tuple(getattr(constants, n) for n in ("MAX_REPEAT", "MIN_REPEAT",
                                                     "POSSESSIVE_REPEAT") if hasattr(constants, n))
    for op, arg in items:
        if op in repeats:
            _, high, sub = arg
            if high != 1 and inside_repeat:
                return True
            if _nested_repeat(sub, inside_repeat or high != 1):
                return True
        elif op is constants.BRANCH:
            if inside_repeat:
                return True
            if any(_nested_repeat(b, inside_repeat) for b in arg[1]):
                return True
        elif op is constants.SUBPATTERN:
            if _nested_repeat(arg[-1], inside_repeat):
                return True
        elif op in (constants.ASSERT, constants.ASSERT_NOT):
            if _nested_repeat(arg[1], inside_repeat):
                return True
    return False


# float16's largest finite number: the LoRA scale must be representable in every dtype the
# update is computed in.
MAX_SCALING = 65504.0


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def matches(name: str, patterns: list[str] | str) -> bool:
    """Whether module `name` is one `patterns` names: a full-match regex (a string), or a list
    of module-name suffixes that match at a "." boundary (PEFT's rule for both)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def check_adapter_name(name: object) -> str:
    """Returns `name` when it can name an adapter (a folder name and a key part).

    Raises:
        ConfigError: unless it is letters, digits, '_' or '-' (not first), and not "base".
    """
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == BASE_ROW:
        raise ConfigError(
            f"adapter name {name!r}: expected letters, digits, '_' or '-' (not starting with '-'),"
            f" and not {BASE_ROW!r} (which means the base model in a mixed batch)"
        )
    return name


