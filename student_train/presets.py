"""Student sizes by name. Field names are LlamaConfig's, so `--set` reads like the HF config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING

from teacher_cache.errors import ConfigError

if TYPE_CHECKING:  # transformers is imported where a config is built, so --help stays fast
    from transformers import LlamaConfig

DEFAULT_VOCAB_SIZE = 49152  # the default teacher's (SmolLM2) tokenizer


@dataclass(frozen=True)
class StudentPreset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    vocab_size: int | None = None  # None: the cache's; anything else must equal it


# With the 49152-token vocabulary the tied embedding dominates the small presets (3.1M of xs).
PRESETS = {
    "xs": StudentPreset(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, intermediate_size=256),
    "s": StudentPreset(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=512),
    "m": StudentPreset(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, intermediate_size=1536),
    "l": StudentPreset(hidden_size=768, num_hidden_layers=16, num_attention_heads=12,
                       num_key_value_heads=4, intermediate_size=2048),
}

# Peak learning rate of each preset, TrainConfig.lr when --lr is not given. xs and s: the best of
# the rates tried on the `make pretrain` demo (200 steps of 2 x 512 tokens, BENCHMARKS.md): xs 1e-3,
# 3e-3 and 1e-2; s 5e-4, 1e-3, 3e-3 and 1e-2 (at 3e-3 s was no better than xs on text outside the
# corpus). m and l keep 3e-3, the rate of the H100 runs in BENCHMARKS.md: not tuned.
LEARNING_RATES = {"xs": 3e-3, "s": 1e-3, "m": 3e-3, "l": 3e-3}


def parameter_count(preset: StudentPreset, vocab_size: int) -> int:
    """Parameters of the Llama built from `preset` (llama_config), counted without building it."""
    h = preset.hidden_size
    kv = h // preset.num_attention_heads * preset.num_key_value_heads
    # q and o projections, k and v, the gated MLP's three matrices, two RMSNorm weights
    layer = 2 * h * h + 2 * h * kv + 3 * h * preset.intermediate_size + 2 * h
    embeddings = vocab_size * h * (1 if preset.tie_word_embeddings else 2)
    return embeddings + preset.num_hidden_layers * layer + h  # + the final norm


def describe_presets(vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """`xs (3.4M), s (...), ...`: every preset with its size for this vocabulary."""
    sizes = ", ".join(f"{name} ({parameter_count(p, vocab_size) / 1e6:.1f}M)"
                      for name, p in PRESETS.items())
    return f"{sizes} parameters with a {vocab_size:,}-token vocabulary"


def _parse_value(name: str, kind: str, text: str) -> int | float | bool:
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        return float(text) if kind == "float" else int(text)
    except ValueError:
        raise ConfigError(f"--set {name}={text}: expected a {kind.split(' ')[0]}") from None


def resolve_preset(name: str, overrides: dict[str, str]) -> StudentPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown student preset {name!r}; choose one of {', '.join(PRESETS)}")
    kinds = {f.name: f.type for f in fields(StudentPreset)}
    unknown = sorted(set(overrides) - set(kinds))
    if unknown:
        raise ConfigError(f"--set {unknown[0]}: not a student field; valid: {', '.join(kinds)}")
    return replace(PRESETS[name], **{k: _parse_value(k, kinds[k], v) for k, v in overrides.items()})


def llama_config(preset: StudentPreset, vocab_size: int, seq_len: int) -> LlamaConfig:
    """The HF config of a student reading a cache with this vocabulary and sequence length."""
    if preset.vocab_size is not None and preset.vocab_size != vocab_size:
        raise ConfigError(f"student vocab_size {preset.vocab_size} does not match the cache's "
                          f"vocabulary ({vocab_size} in manifest.json); drop --set vocab_size or "
                          f"use a cache built with the same tokenizer")
    if preset.hidden_size % preset.num_attention_heads:
        raise ConfigError(f"hidden_size {preset.hidden_size} is not a multiple of "
                          f"num_attention_heads {preset.num_attention_heads}")
    if preset.num_attention_heads % preset.num_key_value_heads:
        raise ConfigError(f"num_attention_heads {preset.num_attention_heads} is not a multiple of "
                          f"num_key_value_heads {preset.num_key_value_heads}")
    from transformers import LlamaConfig

    values = asdict(preset) | {"vocab_size": vocab_size}
    return LlamaConfig(**values, max_position_embeddings=seq_len, use_cache=False)
