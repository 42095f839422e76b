"""Regenerate the tiny preset: a ~1000-token Qwen-style tokenizer and a 4-layer Qwen2 config.

With it every part of the project runs on a CPU in seconds with the real file formats. The tokenizer
has Qwen-2.5's pipeline (NFC, the same pre-tokenizer regex, byte-level BPE) and its 22 special tokens
in the same order, after 1000 regular tokens instead of 151643, trained on a deterministic synthetic
corpus shaped like the data (system prompts, questions, reasoning, python, interpreter output,
<<<answers>>>). Simplified: templated text, not real trajectories; the config is a shape for tests
and demos, not a model anyone pretrained.

Qwen's tokenizer pipeline (special tokens, pre-tokenizer, `byte_level_bpe`) is defined here, where
tokenizer files are made; tests/qwen_vocab.py builds the real Qwen-2.5 vocabulary through it too.

Run: `python scripts/build_tiny.py [--out DIR]` (default: minir1ci/presets/tiny). The output is byte
for byte the same with the same `tokenizers` version (TRAINED_WITH); tests/test_tokenizer.py checks
the committed files against a fresh build.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from datetime import datetime, timedelta
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

from minir1ci import presets
from minir1ci.env import prompts
from minir1ci.inference.tokenizer import DEFAULT_SYSTEM_PROMPT, ENDOFTEXT, IM_END, IM_START, Tokenizer

# Qwen-2.5's 22 special tokens, in id order; they follow the regular vocabulary.
SPECIAL_TOKENS = (
    ENDOFTEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
# Splits text into pieces before BPE; each digit is its own piece.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TRAINED_WITH = "0.23.3"  # tokenizers version that produced the committed files
REGULAR_TOKENS = 1000  # 256 bytes + 744 merges
SEED = 0


def qwen_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Split into PRETOKENIZE_REGEX pieces, then map each piece's bytes to GPT-2's unicode."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
    """Qwen-2.5's pipeline (NFC, PRETOKENIZE_REGEX, bytes to unicode, BPE; ByteLevel decoder) around a
    BPE of `vocab` (GPT-2 byte-to-unicode strings -> ids 0..len-1) and `merges` (in priority order),
    with SPECIAL_TOKENS appended."""
    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                     continuing_subword_prefix="", end_of_word_suffix="",
                     fuse_unk=False, byte_fallback=False)
    tok = tokenizers.Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = qwen_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok


WORDS = ("apple banana cherry strawberry orange grape lemon mango peach pear plum melon "
         "river mountain forest ocean island desert valley garden window table chair book "
         "letter number string list word sentence matrix puzzle answer result value total "
         "red green blue yellow black white north south east west left right first second "
         "Monday Tuesday Wednesday Thursday Friday Saturday Sunday January March June "
         "October December Alice Bob Carol Dave Eve box block stack queen board grid").split()
VERBS = "count sort check compute find verify print add multiply convert list reverse".split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
REASONING = (
    "Let me think step by step.",
    "First, I need to understand what the question is asking.",
    "I will write Python code to {verb} the {noun}s.",
    "The code prints the result, so I can read it directly.",
    "So the total is {a} + {b} = {sum}.",
    "Multiplying {a} by {b} gives {prod}.",
    "The word \"{word}\" has {length} letters.",
    "Now let's verify the calculation with code.",
    "The output shows that the answer is {a}.",
    "This matches my earlier reasoning, so the answer is correct.",
    "Wait, that is not right. Let me recount the {noun}s.",
    "Sorting the list in ascending order, the smallest value is {a}.",
    "There are {a} {noun}s and {b} {word}s, which makes {sum} in total.",
    "Therefore, the final answer is <<<{a}>>>.",
    "The answer is <<<{word}>>>.",
    "Converting {bin} from base 2 gives {binval}.",
    "The date is a {weekday}, {b} days after the start.",
    "Each {noun} appears exactly {b} times in the {word}.",
)
QUESTIONS = (
    "How many times does the letter '{letter}' appear in the word '{word}'?",
    "What is {a} * {b}?",
    "Sort the following numbers in ascending order: {nums}.",
    "What is the value of the binary number {bin} in decimal?",
    "What day of the week is {b} days after a {weekday}?",
    "How many permutations of {small} distinct items are there?",
    "Find the sum of the list [{nums}].",
    "Reverse the string '{word}' and count its vowels.",
)


def _snippet(rng: random.Random, f: dict[str, object]) -> tuple[str, str]:
    """One python block (as the model writes it) and the stdout it produces."""
    kind = rng.randrange(8)
    word, nums = f["word"], f["numlist"]
    if kind == 0:
        code, out = f"s = \"{word}\"\nprint(s.count(\"{f['letter']}\"))", str(str(word).count(str(f["letter"])))
    elif kind == 1:
        code, out = f"nums = [{f['nums']}]\nprint(sorted(nums))", str(sorted(nums))
    elif kind == 2:
        code, out = f"print(int(\"{f['bin']}\", 2))", str(f["binval"])
    elif kind == 3:
        code = (f"from datetime import datetime, timedelta\n"
                f"d = datetime(2024, {f['month']}, {f['day']}) + timedelta(days={f['b']})\n"
                f"print(d.strftime(\"%A %Y-%m-%d\"))")
        day = datetime(2024, int(f["month"]), int(f["day"])) + timedelta(days=int(f["b"]))
        out = day.strftime("%A %Y-%m-%d")
    elif kind == 4:
        code = (f"import itertools\ncount = 0\n"
                f"for p in itertools.permutations(range({f['small']})):\n    count += 1\nprint(count)")
        out = str(math.factorial(int(f["small"])))
    elif kind == 5:
        code = f"words = {str(f['words'])}\nfor w in words:\n    print(w, len(w))"
        out = "\n".join(f"{w} {len(w)}" for w in f["words"])
    elif kind == 6:
        code, out = f"total = 0\nfor x in [{f['nums']}]:\n    total += x\nprint(total)", str(sum(nums))
    else:
        code = f"a = {f['a']}\nb = {f['b']}\nprint(a * b, a + b, a // b, a % b)"
        a, b = int(f["a"]), int(f["b"])
        out = f"{a * b} {a + b} {a // b} {a % b}"
    return prompts.CODE_OPEN + code + prompts.CODE_CLOSE, out


def _fields(rng: random.Random) -> dict[str, object]:
    a, b = rng.randint(2, 999), rng.randint(1, 99)
    nums = [rng.randint(-50, 500) for _ in range(rng.randint(3, 7))]
    word = rng.choice(WORDS)
    binval = rng.randint(1, 1023)
    return {
        "a": a, "b": b, "sum": a + b, "prod": a * b, "word": word, "length": len(word),
        "letter": rng.choice(word.lower()), "noun": rng.choice(WORDS).lower(),
        "verb": rng.choice(VERBS), "numlist": nums, "nums": ", ".join(map(str, nums)),
        "bin": format(binval, "b"), "binval": binval, "weekday": rng.choice(WEEKDAYS),
        "month": rng.randint(1, 12), "day": rng.randint(1, 28), "small": rng.randint(2, 6),
        "words": rng.sample(WORDS, 3),
    }


def _trajectory(rng: random.Random) -> str:
    """A rendered conversation in ChatML text, without the special tokens themselves."""
    f = _fields(rng)
    use_code = rng.random() < 0.7
    parts = ["system\n" + prompts.system_prompt(use_code),
             "user\n" + rng.choice(QUESTIONS).format(**f)]
    reply = [rng.choice(REASONING).format(**f) for _ in range(rng.randint(1, 3))]
    if use_code:
        for _ in range(rng.randint(1, 2)):
            code, out = _snippet(rng, f)
            reply += [code, prompts.render_output(out), rng.choice(REASONING).format(**f)]
    reply.append(rng.choice(REASONING[-2:]).format(**f))
    parts.append("assistant\n" + " ".join(reply))
    return "\n".join(parts) + "\n"


def corpus(n: int = 3000, seed: int = SEED) -> list[str]:
    """Deterministic training text: conversations plus the fixed prompts and markers."""
    rng = random.Random(seed)
    return [_trajectory(rng) for _ in range(n)] + [
        DEFAULT_SYSTEM_PROMPT, prompts.SYSTEM_PROMPT_CODE, prompts.SYSTEM_PROMPT_TEXT, prompts.OUTPUT_HEADER,
        "<<<", ">>>", " ".join(WORDS), " ".join(map(str, range(100)))]


def train_tokenizer(texts: list[str]) -> tokenizers.Tokenizer:
    """Byte-level BPE with REGULAR_TOKENS tokens, then Qwen's 22 special tokens."""
    trainee = tokenizers.Tokenizer(models.BPE())
    trainee.normalizer = normalizers.NFC()
    trainee.pre_tokenizer = qwen_pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=REGULAR_TOKENS, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    trainee.train_from_iterator(texts, trainer=trainer)
    model = json.loads(trainee.to_str())["model"]
    # Rebuild through the one constructor the real vocabulary also uses.
    return byte_level_bpe(model["vocab"], [tuple(m) for m in model["merges"]])


def model_config(n_tokens: int, tokenizer: Tokenizer) -> dict[str, object]:
    """A standard HF Qwen2 config.json (0.92M parameters); vocab rounded up to a multiple of 64 like Qwen's.

    At this width a CPU step takes ~0.4 s, so the copy corpus forms induction heads (~400 steps) and
    SFT converges (~400 steps) within the demo's minutes. RoPE base 10,000, not Qwen's 1,000,000: with
    32-dim heads the larger base leaves too few rotating frequencies to tell neighbours apart."""
    layers = 4
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": -(-n_tokens // 64) * 64,
        "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": layers, "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": tokenizer.token_to_id(ENDOFTEXT), "eos_token_id": tokenizer.token_to_id(IM_END),
        "torch_dtype": "float32", "use_cache": True,
    }


def build(out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and config.json into `out`."""
    tok = Tokenizer(train_tokenizer(corpus()), config={"model_max_length": 4096})
    assert tok.vocab_size == REGULAR_TOKENS + len(SPECIAL_TOKENS), tok.vocab_size
    tok.save_pretrained(out)
    config = model_config(tok.vocab_size, tok)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=presets.tiny_dir())
    args = parser.parse_args()
    build(args.out)
    if tokenizers.__version__ != TRAINED_WITH:
        print(f"note: trained with tokenizers {tokenizers.__version__}, committed files used {TRAINED_WITH}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
