"""Hugging Face checkpoint directories: load and save the model, its config and its tokenizer.

The layout transformers and vLLM read and write: config.json, generation_config.json (eos and pad
ids), model.safetensors or numbered shards with model.safetensors.index.json, and the tokenizer.

Simplified against transformers: safetensors only (no `pytorch_model.bin`), Qwen2 only, no quantised
weights, no loading into a sharded (FSDP) model: a distributed trainer passes a gathered `state_dict=`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from minir1ci.inference.devices import named_dtype
from minir1ci.inference.model import ModelConfig, Qwen2ForCausalLM, RotaryEmbedding
from minir1ci.inference.model_config import read_json
from minir1ci.inference.tokenizer import Tokenizer

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

# dtype names inside a safetensors header
HEADER_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
# Older transformers saved the rotary buffer; it is recomputed here, so such entries are skipped.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch dtype from a dtype or a name (`devices.named_dtype`); None stays None."""
    return None if dtype is None else named_dtype(dtype)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '2GB' (10**9, as HF counts) or '500MiB' (2**20)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
    if match is None:
        raise ValueError(f"cannot parse size {size!r}; write e.g. '2GB', '500MB' or '1GiB'")
    return int(float(match[1]) * SIZE_UNITS[match[2] or "B"])


def load_pretrained(path: str | Path, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> tuple[Qwen2ForCausalLM, Tokenizer | None]:
    """(model, tokenizer) from a HF checkpoint directory, or from a LoRA adapter directory (its base model with
    the adapter merged in, lora.py); tokenizer is None without tokenizer.json.
    dtype None keeps the checkpoint's (config `dtype`/`torch_dtype`, else the tensors'); device None is CPU."""
    from minir1ci.inference import lora  # here, not at the top: lora.py imports this module
    if lora.is_adapter_dir(path):
        model, tokenizer = lora.load_adapter(path, dtype, device)
        return lora.merge_lora(model), tokenizer
    return load_model(path, dtype, device), _load_tokenizer(Path(path))


def check_checkpoint(path: str | Path, need_tokenizer: bool = True) -> ModelConfig:
    """Everything loading would refuse, found without reading a weight (config.json, the weight headers
    against the model, tokenizer.json when `need_tokenizer`); raises naming the file, returns the config.
    A LoRA adapter directory is checked with its base model (the adapter's tensors when loaded)."""
    from minir1ci.inference import lora  # here, not at the top: lora.py imports this module
    path = _checkpoint_dir(path)
    if lora.is_adapter_dir(path):
        return check_checkpoint(lora.adapter_config(path)[1], need_tokenizer)
    if need_tokenizer and not (path / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {path}: a checkpoint to train or sample from needs "
                                "its tokenizer")
    return _plan(path)[0]


def _plan(path: Path):
    """(config, raw config dict, meta-device model, {name: file}, headers), all checked."""
    config, raw = _read_config(path)
    files = _weight_files(path)
    headers = {file: _read_header(file) for file in files}   # file -> {name: (shape, dtype)}
    location = {name: file for file, header in headers.items() for name in header}
    shapes = {name: headers[file][name][0] for name, file in location.items()}
    with torch.device("meta"):  # parameters without storage: nothing allocated yet
        model = Qwen2ForCausalLM(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied: no lm_head
    _check_tensors(path, expected, shapes, config.tie_word_embeddings)
    return config, raw, model, location, headers


def load_model(path: str | Path, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None) -> Qwen2ForCausalLM:
    """The model alone (e.g. to start a critic from a policy checkpoint); see `load_pretrained`.
    Built on the meta device and filled one tensor at a time, cast on the way: the peak is one model
    plus one tensor (Qwen-2.5-14B: 30 GB, not 60); headers are checked first (`_plan`)."""
    path = _checkpoint_dir(path)
    config, raw, model, location, headers = _plan(path)
    device = torch.device(device or "cpu")
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    dtype = (resolve_dtype(dtype) or resolve_dtype(raw.get("dtype") or raw.get("torch_dtype"))
             or headers[location["model.embed_tokens.weight"]]["model.embed_tokens.weight"][1])

    for name, file in location.items():
        if name in expected:
            module_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(_read_tensor(file, name, device, dtype)))
    # The rotary table is a non-persistent buffer: recompute it in fp32 on the target device.
    model.model.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta).to(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        # A tied checkpoint may still carry lm_head.weight: accepted only if it equals the embedding.
        head_file = location.get("lm_head.weight")
        if head_file and not torch.equal(_read_tensor(head_file, "lm_head.weight", device, dtype),
                                         model.lm_head.weight.detach()):
            raise ValueError(f"{head_file}: lm_head.weight differs from model.embed_tokens.weight, "
                             "but config.json says tie_word_embeddings=true")
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a parameter the model has but the check above did not expect: a bug here
        raise RuntimeError(f"parameters left unloaded: {leftover}")
    return model.eval()


def init_from_config(path: str | Path, seed: int = 0, dtype: torch.dtype | str | None = None,
                     device: torch.device | str | None = None) -> tuple[Qwen2ForCausalLM, Tokenizer | None]:
    """(model, tokenizer) with random weights, for training from scratch (e.g. the tiny preset).
    `path` holds config.json (and tokenizer.json); any weights there are ignored. dtype None is fp32."""
    path = _checkpoint_dir(path)
    model = Qwen2ForCausalLM(_read_config(path)[0])
    model.init_weights(seed)
    model.to(torch.device(device or "cpu"))
    dtype = resolve_dtype(dtype)
    if dtype is not None:  # cast parameters only: Module.to(dtype) would also round the rotary table
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(dtype)
    return model.eval(), _load_tokenizer(path)


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    return path


def _read_config(path: Path) -> tuple[ModelConfig, dict]:
    """(config, raw config.json dict); an invalid config raises naming the file."""
    raw = read_json(path / CONFIG)
    try:
        return ModelConfig.from_json(raw), raw
    except ValueError as e:
        raise ValueError(f"{path / CONFIG}: {e}") from None


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from the index when there is one."""
    index_file = path / INDEX_FILE
    if index_file.is_file():
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_file} has no weight_map")
        files = [path / name for name in dict.fromkeys(weight_map.values())]  # unique, in order
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {file.name} listed in {index_file} is missing: {file}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".safetensors"))
    raise FileNotFoundError(
        f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE}"
        + (f" (found {found}; only safetensors checkpoints are supported)" if found else "")
        + f". To train from scratch, use minir1ci.init_from_config({str(path)!r}, seed=...).")


def _open(file: Path):
    """safe_open with a ValueError naming the file when the header is corrupt or truncated."""
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises SafetensorError (or OSError) with no file name
        raise ValueError(f"cannot read safetensors file {file}: {e}") from e


def _read_header(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """{tensor name: (shape, dtype)} from a file's header, without reading any weights."""
    with _open(file) as f:
        header = {}
        for name in f.keys():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            view = f.get_slice(name)
            header[name] = (tuple(view.get_shape()), HEADER_DTYPES.get(view.get_dtype()))
        return header


def _check_tensors(path: Path, expected: dict[str, tuple[int, ...]],
                   found: dict[str, tuple[int, ...]], tied: bool) -> None:
    """One ValueError listing every missing, unexpected and misshaped tensor."""
    optional = {"lm_head.weight": expected["model.embed_tokens.weight"]} if tied else {}
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected and n not in optional]
    misshaped = [f"{n}: checkpoint {list(found[n])} vs model {list(want)}"
                 for n, want in {**expected, **optional}.items() if n in found and found[n] != want]
    problems = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("shape mismatch", misshaped)):
        if items:
            more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
            problems.append(f"{label} ({len(items)}): " + "; ".join(items[:10]) + more)
    if problems:
        raise ValueError(f"checkpoint {path} does not match its config.json:\n  " + "\n  ".join(problems))


def _read_tensor(file: Path, name: str, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """One tensor of `file`, cast and moved, in memory of its own: safetensors returns views of a
    mapping of the whole file, so opening it per tensor and copying out releases the mapping (and its
    resident pages) after each tensor; a model backed by the file would also pin a deleted file's space."""
    with _open(file) as f:
        view = f.get_tensor(name)
    out = view.to(device=device, dtype=dtype)
    return out.clone() if out.data_ptr() == view.data_ptr() else out


def _load_tokenizer(path: Path) -> Tokenizer | None:
    return Tokenizer.from_pretrained(path) if (path / TOKENIZER_FILE).is_file() else None


def save_pretrained(model: Qwen2ForCausalLM, tokenizer: Tokenizer | None, path: str | Path,
                    max_shard_size: int | str = "2GB", dtype: torch.dtype | str | None = None,
                    state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write a HF checkpoint directory at `path` atomically; returns the path.

    dtype None keeps the parameters'. `state_dict` (full tensors, e.g. gathered from FSDP) replaces
    `model.state_dict()`. An existing checkpoint at `path` is replaced; a non-empty directory without
    config.json is refused. Written in a temporary sibling, fsynced, renamed into place (the old one
    moved aside first, deleted last), so a crash leaves at most a `.NAME.tmp-*` directory that a
    training run deletes; one shard's CPU copies exist at a time.
    """
    path = Path(path).absolute()
    config = model.config
    tensors = dict(model.state_dict() if state_dict is None else state_dict)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # HF layout: the head is the embedding
    dtype = resolve_dtype(dtype) or tensors["model.embed_tokens.weight"].dtype
    limit = parse_size(max_shard_size)
    with write_atomically(path, CONFIG) as tmp:
        _write_weights(tensors, dtype, limit, tmp)
        dtype_name = str(dtype).removeprefix("torch.")
        _write_json(tmp / CONFIG, {**config.to_hf_dict(), "torch_dtype": dtype_name, "dtype": dtype_name})
        _write_json(tmp / GENERATION_CONFIG, _generation_config(config, tokenizer))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


@contextmanager
def write_atomically(path: Path, marker: str):
    """A temporary sibling directory to write into, fsynced and renamed to `path` at the end (an old one moved
    aside first, deleted last), removed if the block raises; a non-empty `path` without `marker` is refused."""
    _check_target(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))  # same filesystem
    try:
        umask = os.umask(0)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a checkpoint gets the usual mode
        yield tmp
        for file in [*tmp.iterdir(), tmp]:  # on disk before the rename: a power loss cannot expose empty files
            _fsync(file)
        _move_into_place(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave the temporary directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_weights(tensors: dict[str, Tensor], dtype: torch.dtype, limit: int, directory: Path) -> None:
    """Shards of at most `limit` bytes, split greedily in state-dict order (a larger tensor gets a shard
    of its own), and the index when there are several."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards):
        file = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        _write_shard({name: tensors[name] for name in names}, dtype, directory / file)
        weight_map.update(dict.fromkeys(names, file))
    if n > 1:
        total = sum(t.numel() * itemsize for t in tensors.values())
        _write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_shard(tensors: dict[str, Tensor], dtype: torch.dtype, file: Path) -> None:
    """One safetensors file; only this shard's CPU copies are alive while it is written."""
    # .to() returns the tensor itself when it is already a contiguous CPU tensor of this dtype.
    cpu = {name: t.detach().to(device="cpu", dtype=dtype).contiguous() for name, t in tensors.items()}
    save_file(cpu, str(file), metadata={"format": "pt"})


def _generation_config(config: ModelConfig, tokenizer: Tokenizer | None) -> dict:
    """Stop tokens for samplers: with a tokenizer, <|im_end|> and <|endoftext|> (as Qwen2.5-Instruct)."""
    out: dict = {}
    if config.bos_token_id is not None:
        out["bos_token_id"] = config.bos_token_id
    if tokenizer is not None:
        eos = list(dict.fromkeys([tokenizer.im_end_id, tokenizer.endoftext_id]))
        out.update(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    elif config.eos_token_id is not None:
        out["eos_token_id"] = config.eos_token_id
    return out


def _write_json(file: Path, obj: dict) -> None:
    file.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _check_target(path: Path, marker: str) -> None:
    """Refuse to replace anything that is not a checkpoint (a file, or a directory of other things)."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"cannot save a checkpoint to {path}: it exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise FileExistsError(f"refusing to replace {path}: a non-empty directory without {marker}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an old checkpoint is moved aside first and removed last (a crash
    between the two renames leaves it complete at `.NAME.old-*`)."""
    if not path.exists():
        os.rename(tmp, path)
    else:
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync(path.parent)
