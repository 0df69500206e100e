"""Tokenization and chat templating for converted models, on HF ``tokenizers`` + jinja2 only.

The ONNX and LiteRT backends run models converted from the GGUF (``agentctl models prepare``)
whose folder holds ``tokenizer.json`` and the chat template (``tokenizer_config.json`` key
``chat_template``, or ``chat_template.jinja`` as transformers 5 writes it). Neither torch nor
transformers is needed at run time.

Facts this module relies on:

- onnxruntime-genai's own tokenizer mis-handles this GGUF-derived ``tokenizer.json``: the
  43-token ChatML bench prompt becomes 118 tokens (special tokens not matched) and decoding
  yields ``ĠĊ`` bytes (measured with onnxruntime-genai 0.18.0, shared/notes/feasibility.md §3).
  HF ``tokenizers`` gets 43, the same count as llama.cpp.
- SmolLM2 uses a GPT-2 byte-level BPE: every token string is a sequence of the 256 "printable"
  stand-ins of GPT-2's ``bytes_to_unicode`` table (openai/gpt-2 ``encoder.py``), so a single
  token maps to exact bytes, and a multi-byte UTF-8 character may be split across tokens.
  :class:`backends.base.Utf8StreamDecoder` reassembles those bytes.
- Chat templates are rendered the way transformers does (``trim_blocks``, ``lstrip_blocks``,
  a sandboxed environment, ``raise_exception``), with ``add_generation_prompt=True``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from backends.base import BackendError, read_json_object

# Token strings that end a turn in common chat vocabularies (besides the configured EOS).
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (openai/gpt-2, src/encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class HfChatTokenizer:
    """A ``tokenizer.json`` plus chat template, with exact per-token bytes for streaming.

    Args:
        folder: Directory holding ``tokenizer.json`` and the template/config files.

    Raises:
        BackendError: ``backend_failed`` if ``tokenizers`` is missing or the files are absent.
    """

    def __init__(self, folder: Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise BackendError(
                "backend_failed", f"the 'tokenizers' package is required: {exc}"
            ) from exc
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise BackendError("unknown_model", f"no tokenizer.json in {folder}")
        self.folder = folder
        self._tok: Any = Tokenizer.from_file(str(path))
        spec = json.loads(path.read_text(encoding="utf-8"))
        decoder = spec.get("decoder") or {}
        self.byte_level = decoder.get("type") == "ByteLevel" or any(
            d.get("type") == "ByteLevel" for d in decoder.get("decoders", []) or []
        )
        self._config = read_json_object(folder / "tokenizer_config.json")
        self._special_ids: set[int] = {
            int(i) for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        self.template: str | None = self._find_template()
        self.bos_token = _token_content(self._config.get("bos_token"))
        self.eos_token = _token_content(self._config.get("eos_token"))
        self.eog_ids: frozenset[int] = frozenset(self._find_eog_ids())
        self._render: Any = None

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def _find_template(self) -> str | None:
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = self._config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        return template if isinstance(template, str) else None

    def _find_eog_ids(self) -> set[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            eos = read_json_object(self.folder / name).get("eos_token_id")
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list):
                ids.update(int(e) for e in eos)
        for text in (self.eos_token, *_END_TOKENS):
            if text:
                tid = self._tok.token_to_id(text)
                if tid is not None:
                    ids.add(int(tid))
        return ids

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """Apply the chat template with ``add_generation_prompt=True``.

        Raises:
            BackendError: ``bad_request`` if the model has no template or it rejects the input.
        """
        if self.template is None:
            raise BackendError("bad_request", "this model has no chat template; send 'prompt'")
        if self._render is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise BackendError("bad_request", f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent)
            self._render = env.from_string(self.template)
        try:
            return str(self._render.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            ))
        except BackendError:
            raise
        except Exception as exc:  # jinja2 errors: a template/message mismatch
            raise BackendError("bad_request", f"chat template failed: {exc}") from exc

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``; special-token strings in it are matched as single tokens."""
        return [int(i) for i in self._tok.encode(text, add_special_tokens=add_special_tokens).ids]

    def prompt_ids(
        self,
        messages: Sequence[Mapping[str, str]] | None,
        prompt: str | None,
        prompt_token_ids: Sequence[int] | None,
    ) -> list[int]:
        """The prompt tokens of a request (exactly one of the three is set)."""
        if prompt_token_ids is not None:
            return [int(t) for t in prompt_token_ids]
        if messages is not None:
            # The template writes BOS/role markers itself.
            return self.encode(self.render_chat(messages), add_special_tokens=False)
        if prompt is None:
            raise BackendError("bad_request", "a request needs messages, prompt or token ids")
        return self.encode(prompt, add_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token contributes to the output (special tokens: none)."""
        if token_id in self._special_ids:
            return b""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self.byte_level:
            table = _byte_decoder()
            try:
                return bytes(table[ch] for ch in piece)
            except KeyError:
                return str(piece).encode("utf-8")
        # SentencePiece-style vocabularies: ▁ is a space, <0xNN> a raw byte.
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        return str(piece).replace("▁", " ").encode("utf-8")

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, special tokens skipped."""
        return str(self._tok.decode(list(ids), skip_special_tokens=True))


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def tokenizer_folder(model_path: Path) -> Path:
    """The folder holding the tokenizer files for a model file or model folder."""
    return model_path if model_path.is_dir() else model_path.parent
