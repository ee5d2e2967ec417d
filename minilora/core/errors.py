"""The errors minilora raises for a condition of the world: bad input, a bad file, a refused output.

The command line catches `MiniloraError` (and `OSError`) and prints one line with exit code 2;
anything else is a bug and keeps its traceback. Each class also derives from the builtin a caller
would have caught before (`ValueError`, `RuntimeError`), so code written against those still works.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class MiniloraError(Exception):
    """Base of every error that means "the input or the world is wrong", not "minilora is wrong".

    A message may name settings of a config as ``{field}`` placeholders, given in ``fields``
    with the library's words for each (``{"resume": "resume=True"}``); a layer with other words
    for them (the command line's flags) sets ``words`` and the message speaks its language, with
    no rewriting of the text.

    Attributes:
        fields: the config fields the error is about -> the library's words for each.
        words: field -> the caller's words for it (set by the command line); None: the library's.
    """

    def __init__(self, *args: object, fields: Mapping[str, str] | None = None) -> None:
        super().__init__(*args)
        self.fields: dict[str, str] = dict(fields or {})
        self.words: Mapping[str, str] | None = None

    def __str__(self) -> str:
        text = super().__str__()
        fields = getattr(self, "fields", None)
        if not fields:
            return text
        words = getattr(self, "words", None) or {}
        for name, said in fields.items():
            text = text.replace("{" + name + "}", words.get(name, said))
        return text


class ConfigError(MiniloraError, ValueError):
    """A configuration value (a flag, a config field) that is out of range or of the wrong type.

    Attributes:
        problems: field -> what is wrong with it (``"must be > 0, got 0"``), one entry per bad
            field, for a config that checks them all (LoraConfig); empty otherwise.
    """

    def __init__(self, *args: object, fields: Mapping[str, str] | None = None,
                 problems: Mapping[str, str] | None = None) -> None:
        super().__init__(*args, fields=fields)
        self.problems: dict[str, str] = dict(problems or {})


class MessageError(ConfigError):
    """A conversation that is not a list of ``{"role", "content"}`` objects.

    Attributes:
        field: the field at fault, ``"messages[1].role"``.
        said: the problem as the SFT reader words it: what was found, then what is expected.
        expected: the problem as "expected ..., got ..."; ``str(error)`` is field and this.
    """

    def __init__(self, field: str, said: str, expected: str | None = None) -> None:
        self.field, self.said, self.expected = field, said, expected or said
        super().__init__(f"{field}: {self.expected}")


class ChatTemplateError(ConfigError):
    """A chat template that cannot be rendered (a Jinja error or its own raise_exception)."""


class TemplateBoundError(ChatTemplateError):
    """A chat template stopped at a render bound (time, size): whatever it renders runs into it
    again, so a caller that falls back on another conversation should not try."""


class DataError(MiniloraError, ValueError):
    """A training or eval file that cannot be read; the message names file, line and field.

    Attributes:
        path: the file.
        line: 1-based line number, or None for a problem with the whole file.
        field: the JSON field at fault (``"conversations[1].role"``), or None.
    """

    def __init__(
        self, path: str | Path, message: str, *, line: int | None = None, field: str | None = None
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


class TaskError(MiniloraError, ValueError):
    """An eval (tasks) file or sample that does not follow the tasks format."""


class MergeError(ConfigError):
    """A merge that would put a non-finite value into the base weight; nothing was changed."""


class WeightsError(MiniloraError, ValueError):
    """A base checkpoint that cannot be read or does not fit the model."""


class AdapterError(MiniloraError, ValueError):
    """An adapter file or folder that cannot be read, written or applied as asked."""


class FingerprintMismatch(AdapterError):
    """An adapter trained on another base. Its message names how to skip the check as the field
    ``check_fingerprint`` (the library's ``check_fingerprint=False``; the command line's flag).

    Attributes:
        message: what differs, without the way around it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}; pass {{check_fingerprint}} to load it anyway",
                         fields={"check_fingerprint": "check_fingerprint=False"})
        self.message = message


class MissingFile(MiniloraError, FileNotFoundError):
    """A file the input needs is not there (a model folder without its config.json). Still a
    FileNotFoundError; its ``fields`` name the settings that can stand in for the file."""


class BaseConfigNeeded(WeightsError):
    """Base weights that do not say their config (a bare MiniMind .pth).

    Attributes:
        flag: how to pass the config, in the words of the caller's layer: the library's
            keyword (``config=``); the command line names its own flag.
    """

    def __init__(self, path: str, unknown: list[str], generation: str,
                 flag: str = "config=") -> None:
        super().__init__(path)
        self.path, self.unknown, self.generation, self.flag = path, unknown, generation, flag

    def __str__(self) -> str:
        g = self.generation
        file, name = ((f"{self.flag}FILE", f"{self.flag}{g!r}") if self.flag.endswith("=")
                      else (f"{self.flag} FILE", f"{self.flag} {g}"))
        return (f"{self.path}: a bare .pth does not tell {', '.join(self.unknown)} (its tensors "
                f"are a {g} model's); pass its config ({file}: MiniMind's config.json or "
                f"MiniMindConfig.to_dict() as JSON), or {name} to take {g}'s MiniMindConfig "
                f"defaults")


class TrainError(MiniloraError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class CheckpointError(MiniloraError, ValueError):
    """A checkpoint that cannot be resumed: another config, another base, or a damaged file."""


class OutputError(MiniloraError, ValueError):
    """An output path that would overwrite what the user owns, or that another run holds."""


class ExportError(MiniloraError, ValueError):
    """A model or adapter that an export format cannot hold exactly (an architecture, a
    tokenizer or a weight the format would change)."""
class CliError(MiniloraError):
    """A user mistake the command line reports in one line (exit code 2)."""


class MissingExtra(MiniloraError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, feature: str, extra: str) -> None:
        self.extra = extra
        super().__init__(f"{feature} needs the optional extra: {install_command(extra)}")


def install_command(extra: str) -> str:
    """The command that installs an optional extra: into this clone (an editable install of a
    source checkout, where `minilora[...]` would fetch another copy from PyPI) or from PyPI."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "minilora" / "__init__.py").is_file():
        return f"pip install -e '.[{extra}]' (in {root})"
    return f"pip install 'minilora[{extra}]'"
