"""The Qwen-2.5 tokenizer and its ChatML chat template, with the loss mask rollouts need.

Plain text never turns into control tokens: `encode(text)` spells a literal "<|im_end|>" in
interpreter output out byte by byte, so a program cannot end the assistant turn; only
`allow_special=True` maps it to its id.

Simplified: no tool-call rendering, no truncation or padding, and every added token is treated as
special (Qwen's file marks `<tool_call>` and the FIM tokens non-special).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import tokenizers
from tokenizers import AddedToken

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Jinja for transformers' `apply_chat_template`: the same ChatML as `Tokenizer.apply_chat_template`
# (segment lists are joined), so what `save_pretrained` writes renders identically elsewhere.
CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for segment in message['content'] %}{{- segment['text'] }}{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class Tokenizer:
    """Qwen-2.5 byte-level BPE with ChatML; see the module docstring."""

    def __init__(self, tok: tokenizers.Tokenizer, config: dict[str, Any] | None = None):
        """Wrap `tok`, marking all its added tokens special in place (so `_plain` spells them all out);
        of `config` (tokenizer_config.json) `pad_token` is used and the rest kept."""
        added = tok.get_added_tokens_decoder()
        loose = [t.content for t in added.values() if not t.special]
        if loose:
            tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in loose])
        self._tok = tok
        # `encode_special_tokens` is a mutable flag; a second object keeps encode thread-safe.
        self._plain = tokenizers.Tokenizer.from_str(tok.to_str())
        self._plain.encode_special_tokens = True
        self.config: dict[str, Any] = dict(config or {})
        for name in (ENDOFTEXT, IM_START, IM_END):
            if tok.token_to_id(name) is None:
                raise ValueError(f"tokenizer has no {name!r} token; a Qwen-2.5 vocabulary is required")
        # <|im_end|> ends an assistant turn (the sampler's stop token for chat); <|endoftext|> ends a
        # base model's document.
        self.eos_token_id = self.im_end_id = tok.token_to_id(IM_END)
        self.im_start_id, self.endoftext_id = tok.token_to_id(IM_START), tok.token_to_id(ENDOFTEXT)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)  # the model's embedding may be larger
        pad = self.config.get("pad_token") or ENDOFTEXT
        if isinstance(pad, dict):  # older configs store AddedToken dicts
            pad = pad.get("content", ENDOFTEXT)
        if pad == IM_END:  # it would mask the real end of turn out of the loss
            raise ValueError("pad_token must differ from the chat eos token <|im_end|>")
        self.pad_token_id = self.token_to_id(pad)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` (and `tokenizer_config.json` when present) from `directory`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"cannot read {path}: {e}") from e
        config = None
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"cannot read {config_path}: {e}") from e
        return cls(tok, config)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `tokenizer.json` and a `tokenizer_config.json` that transformers can load."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "errors": "replace",
            "clean_up_tokenization_spaces": False, "split_special_tokens": False, "add_prefix_space": False,
            # tokenizer.json is authoritative for added tokens; drop a loaded copy of them.
            **{k: v for k, v in self.config.items() if k != "added_tokens_decoder"},
            # Qwen2.5-Instruct's roles: chat turns end with <|im_end|>, padding is <|endoftext|>.
            "bos_token": None, "unk_token": None, "eos_token": IM_END,
            "pad_token": self._tok.id_to_token(self.pad_token_id), "chat_template": CHAT_TEMPLATE,
        }
        text = json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings are ordinary text unless `allow_special`."""
        tok = self._tok if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or a 1-D tensor); incomplete UTF-8 becomes U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Id of one token string (e.g. "<|im_end|>"); KeyError if it is not in the vocabulary."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token not in vocabulary: {token!r}")
        return i

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                            return_assistant_mask: bool = False) -> list[int] | tuple[list[int], list[int]]:
        """ChatML ids of `messages` (Qwen2.5-Instruct's default system message first when there is
        none), and with `return_assistant_mask` the loss mask: 1 on assistant content and its closing
        <|im_end|>, 0 on headers, the "\\n" after <|im_end|>, other roles, output segments and the
        generation prompt. The special tokens split the rendered string, so each turn is tokenized
        on its own: [im_start] + encode(role + "\\n" + content) + [im_end] + encode("\\n").

        `content` may be a list of segments {"type": "text" | "output", "text": str}: the header and
        each segment are tokenized separately and concatenated, as a rollout builds its ids (the same
        ids as a string unless a boundary falls inside a pre-tokenizer piece, e.g. a leading "\\n").
        """
        messages = list(messages)
        if not messages or messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": DEFAULT_SYSTEM_PROMPT})
        newline = self.encode("\n")
        ids: list[int] = []
        mask: list[int] = []
        for message in messages:
            role, content = message["role"], message["content"]
            learn = 1 if role == "assistant" else 0
            ids.append(self.im_start_id)
            mask.append(0)
            head = self.encode(role + "\n")
            if isinstance(content, str):
                body = self.encode(role + "\n" + content)
                # The header's tokens end where the two tokenizations first disagree
                # (content that starts with whitespace and a newline merges into "\n").
                n_head = 0
                while n_head < len(head) and body[n_head] == head[n_head]:
                    n_head += 1
                ids += body
                mask += [0] * n_head + [learn] * (len(body) - n_head)
            else:
                ids += head
                mask += [0] * len(head)
                for segment in content:
                    kind = segment.get("type", "text")
                    if kind not in ("text", "output"):
                        raise ValueError(f"segment type must be 'text' or 'output', got {kind!r}")
                    seg_ids = self.encode(segment["text"])
                    ids += seg_ids
                    mask += [learn if kind == "text" else 0] * len(seg_ids)
            ids.append(self.im_end_id)
            mask.append(learn)
            ids += newline
            mask += [0] * len(newline)
        if add_generation_prompt:
            prompt = [self.im_start_id] + self.encode("assistant\n")
            ids += prompt
            mask += [0] * len(prompt)
        return (ids, mask) if return_assistant_mask else ids
