"""An Ollama Modelfile for an exported GGUF: FROM (and ADAPTER), the chat template in Ollama's
Go template language, and the stop tokens.

Ollama does not run a model's Jinja template; its own TEMPLATE must render the same text. A
general Jinja-to-Go translation does not exist, so the ChatML layout (MiniMind's, Qwen's, the
embedded model's) is written, and only after checking that the model's own template renders
exactly ChatML on a probe conversation; any other template is refused rather than guessed.
"""

from __future__ import annotations

from pathlib import Path

from minilora.core.errors import ExportError
from minilora.data.tokenizer import IM_END, IM_START, Tokenizer

# ChatML in Ollama's Go template: every message, then the assistant's turn opened.
_CHATML_GO = ("{{- range .Messages }}" + IM_START + "{{ .Role }}\n{{ .Content }}" + IM_END
              + "\n{{ end }}" + IM_START + "assistant\n")


def _chatml(messages: list[dict[str, str]]) -> str:
    turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return turns + f"{IM_START}assistant\n"


def modelfile_text(tokenizer: Tokenizer, gguf_path: str | Path, *, adapter_only: bool = False,
                   base: str | Path | None = None) -> str:
    """The Modelfile for ``gguf_path`` (written beside it).

    Args:
        tokenizer: the model's tokenizer (its chat template and stop tokens).
        gguf_path: the exported file; the Modelfile names it relative to its own folder.
        adapter_only: the file is an adapter: FROM names ``base``, ADAPTER names the file.
        base: the base model's GGUF (adapter_only).

    Raises:
        ExportError: the chat template is not ChatML (Ollama's template would differ), or an
            adapter without its base.
    """
    probe = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    if tokenizer.apply_chat_template(probe, add_generation_prompt=True) != _chatml(probe):
        raise ExportError("--ollama writes the ChatML chat template only, and this model's "
                          "template renders something else; export without --ollama and write "
                          "the Modelfile's TEMPLATE by hand")
    own = f"./{Path(gguf_path).name}"
    if adapter_only:
        if base is None:
            raise ExportError("an adapter's Modelfile needs the base GGUF for its FROM")
        head = f"FROM {Path(base).resolve()}\nADAPTER {own}\n"
    else:
        head = f"FROM {own}\n"
    stops = [IM_END] + [t for t in (tokenizer.decode([i], skip_special_tokens=False)
                                    for i in tokenizer.stop_token_ids) if t and t != IM_END]
    params = "".join(f'PARAMETER stop "{s}"\n' for s in dict.fromkeys(stops))
    return f'{head}TEMPLATE """{_CHATML_GO}"""\n{params}'
