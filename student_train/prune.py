"""Students pruned from the teacher, as Minitron prunes (Muralidharan et al., "Compact Language
Models via Pruning and Knowledge Distillation", 2024, and NVIDIA ModelOpt's pruning):

- Width importance from activations, in one forward pass of the teacher over a few calibration
  rows of the cache's training split: an MLP neuron by its |activation| at the input of down_proj,
  an attention head by the L2 norm of its output (the input of o_proj), an embedding channel by
  the |output| of every RMSNorm, summed over the norms. Each is aggregated as Minitron's best
  width setting: the mean over positions, then the L2 norm over rows.
- Depth importance by block importance, `block`: 1 - the mean cosine similarity of a block's
  input and output (ShortGPT's and Minitron's BI); or `loss`: the increase of the teacher's CE
  on the calibration rows when the block alone is dropped (one teacher pass per block).
- The plan keeps the most important units of each axis; under GQA a KV head is kept with query
  heads of its own group only, as many in every kept group. Slicing the teacher's weights gives a
  model of the smaller shape that transformers builds from its config.

Llama-family layouts only (PRUNABLE_MODEL_TYPES); another architecture is refused.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from student_train.data import ShardRows
from student_train.heldout import HeldoutText, text_ce
from student_train.quantity import COUNT_UNITS, parse_quantity
from teacher_cache.errors import ConfigError
from teacher_cache.reader import TeacherCache

PRUNABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DepthMetric = Literal["block", "loss"]
DEFAULT_CALIBRATION_ROWS = 32  # ~30 s of the default teacher on 2 CPU cores (BENCHMARKS.md)
MAX_CALIBRATION_ROWS = 1024  # Minitron calibrates on 1,024 samples
IMPORTANCE_BATCH_ROWS = 4
# Widths a `params=` target chooses are multiples of this (kept as they are when given).
WIDTH_MULTIPLE = 32

# The axis each dimension of a parameter is cut along: hidden (embedding channels), q (query heads
# x head_dim), kv (KV heads x head_dim), neurons (MLP), None (kept whole). Per decoder layer, by
# the parameter's name within the layer, then outside the layers.
LAYER_RULES: dict[str, tuple[str | None, ...]] = {
    "self_attn.q_proj.weight": ("q", "hidden"), "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "hidden"), "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"), "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hidden", "q"), "self_attn.o_proj.bias": ("hidden",),
    "self_attn.q_norm.weight": (None,), "self_attn.k_norm.weight": (None,),  # over head_dim
    "mlp.gate_proj.weight": ("neurons", "hidden"), "mlp.gate_proj.bias": ("neurons",),
    "mlp.up_proj.weight": ("neurons", "hidden"), "mlp.up_proj.bias": ("neurons",),
    "mlp.down_proj.weight": ("hidden", "neurons"), "mlp.down_proj.bias": ("hidden",),
    "input_layernorm.weight": ("hidden",), "post_attention_layernorm.weight": ("hidden",),
}
TOP_RULES: dict[str, tuple[str | None, ...]] = {
    "model.embed_tokens.weight": (None, "hidden"), "model.norm.weight": ("hidden",),
    "lm_head.weight": (None, "hidden"),
}
LAYER_PREFIX = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int  # query heads
    kv_heads: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> Shape:
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   config.num_attention_heads, config.num_key_value_heads)

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads


AXES = tuple(f.name for f in fields(Shape))


@dataclass(frozen=True)
class PruneSpec:
    """`prune:KEY=VALUE,...`: the shape to cut the teacher to (each axis not given keeps the
    teacher's, unless `params` chooses it), the depth metric and the calibration rows."""

    layers: int | None = None
    hidden: int | None = None
    intermediate: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    params: int | None = None  # a target size: the axes not given shrink together to fit it
    depth: DepthMetric = "block"
    rows: int = DEFAULT_CALIBRATION_ROWS

    PREFIX = "prune:"

    @classmethod
    def parse(cls, text: str) -> PruneSpec:
        keys = [f.name for f in fields(cls)]
        usage = (f"{text!r}: expected prune:KEY=VALUE,... with keys {', '.join(keys)}, e.g. "
                 f"prune:layers=15 or prune:hidden=384,intermediate=1024,heads=6 or "
                 f"prune:params=30M")
        values: dict[str, Any] = {}
        for item in text.removeprefix(cls.PREFIX).split(","):
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or key not in keys or key in values:
                raise ConfigError(f"student {usage}")
            values[key] = cls._value(text, key, value)
        spec = cls(**values)
        if not any(getattr(spec, axis) is not None for axis in (*AXES, "params")):
            raise ConfigError(f"student {text!r}: nothing to prune; give at least one of "
                              f"{', '.join((*AXES, 'params'))}")
        if not 1 <= spec.rows <= MAX_CALIBRATION_ROWS:
            raise ConfigError(f"student {text!r}: rows={spec.rows}: calibration rows must be in "
                              f"[1, {MAX_CALIBRATION_ROWS}]")
        return spec

    @staticmethod
    def _value(text: str, key: str, value: str) -> int | str:
        if key == "depth":
            if value not in get_args(DepthMetric):
                raise ConfigError(f"student {text!r}: depth={value}: choose one of "
                                  f"{', '.join(get_args(DepthMetric))}")
            return value
        units = COUNT_UNITS if key == "params" else {"": 1}
        quantity = parse_quantity(value, units) if key == "params" or value.isdigit() else None
        number = quantity[0] * units[quantity[1]] if quantity else 0
        if number < 1:
            raise ConfigError(f"student {text!r}: {key}={value}: expected a positive "
                              f"{'count such as 30M' if key == 'params' else 'integer'}")
        return int(number)


@dataclass(frozen=True)
class Layout:
    """What pruning reads off a Llama-family teacher: its config, shape, head_dim and the names
    and shapes of its parameters (one decoder layer's, and those outside the layers)."""

    config: PretrainedConfig
    shape: Shape
    head_dim: int
    layer_params: dict[str, tuple[int, ...]]
    top_params: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, model: PreTrainedModel, where: str) -> Layout:
        config = model.config
        if config.model_type not in PRUNABLE_MODEL_TYPES:
            raise ConfigError(f"{where}: cannot prune a {config.model_type} teacher; pruning knows "
                              f"the Llama-family layouts {', '.join(PRUNABLE_MODEL_TYPES)}")
        layer_params, top_params = {}, {}
        for name, parameter in model.named_parameters():
            layer = LAYER_PREFIX.match(name)
            if layer is None and name in TOP_RULES:
                top_params[name] = tuple(parameter.shape)
            elif layer is not None and layer[2] in LAYER_RULES:
                layer_params.setdefault(layer[2], tuple(parameter.shape))
            else:
                raise ConfigError(f"{where}: its parameter {name} is not of the Llama layout "
                                  f"pruning knows; cannot prune this teacher")
        head_dim = (getattr(config, "head_dim", None)
                    or config.hidden_size // config.num_attention_heads)
        return cls(config, Shape.of(config), head_dim, layer_params, top_params)

    def sizes(self, shape: Shape) -> dict[str, int]:
        """The length of each axis of LAYER_RULES/TOP_RULES at `shape`."""
        return {"hidden": shape.hidden, "q": shape.heads * self.head_dim,
                "kv": shape.kv_heads * self.head_dim, "neurons": shape.intermediate}

    def count(self, shape: Shape) -> int:
        """Parameters of the teacher cut to `shape` (a tied embedding counts once)."""
        sizes = self.sizes(shape)

        def numel(params: dict[str, tuple[int, ...]], rules: dict) -> int:
            return sum(math.prod(sizes[axis] if axis else dim
                                 for axis, dim in zip(rules[name], dims, strict=True))
                       for name, dims in params.items())

        return (numel(self.top_params, TOP_RULES)
                + shape.layers * numel(self.layer_params, LAYER_RULES))


    def pruned_config(self, shape: Shape, layers: list[int], where: str) -> PretrainedConfig:
        """The teacher's config at `shape`, keeping the per-layer settings of `layers`;
        ConfigError for a shape the architecture's config refuses."""
        config = copy.deepcopy(self.config)
        config.num_hidden_layers, config.hidden_size = shape.layers, shape.hidden
        config.intermediate_size = shape.intermediate
        config.num_attention_heads, config.num_key_value_heads = shape.heads, shape.kv_heads
        config.head_dim = self.head_dim  # no longer hidden_size / heads
        if getattr(config, "layer_types", None):
            config.layer_types = [self.config.layer_types[i] for i in layers]
        config.use_cache = False  # training calls; save_student turns it on
        try:
            config.validate()  # what save_pretrained checks, at the end of training
        except Exception as e:  # the validator's own error types, which say what is wrong
            cause = e.__cause__ or e
            raise ConfigError(f"{where}: {config.model_type} refuses the shape {asdict(shape)}: "
                              f"{str(cause).splitlines()[-1].strip()}") from None
        return config


def _scaled(value: int, factor: float, multiple: int) -> int:
    return min(value, max(multiple, round(value * factor / multiple) * multiple))


def resolve_shape(spec: PruneSpec, layout: Layout, where: str) -> Shape:
    """The student's shape: the spec's axes, the teacher's for the others, or for `params=N` a
    shape within N parameters whose free axes (those not given) are the teacher's scaled by one
    common factor, the largest bisection finds (widths in multiples of WIDTH_MULTIPLE, the hidden
    size also of the query heads, as Llama's config demands; query heads per KV group)."""
    teacher = layout.shape
    given = {axis: getattr(spec, axis) for axis in AXES if getattr(spec, axis) is not None}
    if "heads" in given and "kv_heads" not in given:
        if given["heads"] % teacher.kv_heads:
            raise ConfigError(f"{where}: heads={given['heads']} is not a multiple of the "
                              f"teacher's {teacher.kv_heads} KV heads; add kv_heads=K for a K "
                              f"that divides it (a KV head keeps query heads of its own group)")
        given["kv_heads"] = teacher.kv_heads
    if "kv_heads" in given and "heads" not in given:  # whole KV groups with all their heads
        given["heads"] = given["kv_heads"] * teacher.heads_per_group
    fixed = replace(teacher, **given)

    def at(factor: float) -> Shape:
        heads = (fixed.heads if "heads" in given
                 else fixed.kv_heads * max(1, round(teacher.heads_per_group * factor)))
        free = {"layers": max(1, round(teacher.layers * factor)),
                "hidden": _scaled(teacher.hidden, factor, math.lcm(WIDTH_MULTIPLE, heads)),
                "intermediate": _scaled(teacher.intermediate, factor, WIDTH_MULTIPLE),
                "heads": heads}
        return replace(fixed, **{axis: v for axis, v in free.items() if axis not in given})

    shape = fixed
    if spec.params is not None:
        if set(given) >= {"layers", "hidden", "intermediate", "heads"}:
            raise ConfigError(f"{where}: params= with every axis given leaves nothing to choose; "
                              f"drop params or an axis")
        if layout.count(at(0.0)) > spec.params:
            raise ConfigError(f"{where}: params={spec.params:,} is below the smallest shape the "
                              f"free axes reach ({layout.count(at(0.0)):,} parameters); give a "
                              f"larger target or fewer axes")
        low, high = 0.0, 1.0  # the count grows with the factor: bisect for the largest that fits
        for _ in range(40):
            middle = (low + high) / 2
            low, high = (middle, high) if layout.count(at(middle)) <= spec.params else (low, middle)
        shape = at(low)
    _check_shape(shape, teacher, where)
    layout.pruned_config(shape, list(range(shape.layers)), where)
    return shape


def _check_shape(shape: Shape, teacher: Shape, where: str) -> None:
    for axis in AXES:
        value, limit = getattr(shape, axis), getattr(teacher, axis)
        if not 1 <= value <= limit:
            raise ConfigError(f"{where}: {axis}={value}: must be in [1, {limit}], the "
                              f"teacher's {axis}")
    if shape.heads % shape.kv_heads or shape.heads_per_group > teacher.heads_per_group:
        raise ConfigError(f"{where}: heads={shape.heads} with kv_heads={shape.kv_heads}: each KV "
                          f"head keeps the same number of query heads of its own group, at most "
                          f"the teacher's {teacher.heads_per_group}")


def calibration_rows(cache: TeacherCache, train_ids: np.ndarray, count: int,
                     seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """`count` training rows (all of them if fewer) drawn with `seed`: their sorted seq_ids and
    int64 input_ids [rows, seq_len]."""
    rng = np.random.default_rng(seed)
    seq_ids = np.sort(rng.choice(train_ids, size=min(count, len(train_ids)), replace=False))
    source = ShardRows(cache, seq_ids)
    rows = [source.take(i, int(seq_id)).input_ids for i, seq_id in enumerate(seq_ids.tolist())]
    return seq_ids, torch.from_numpy(np.concatenate(rows).astype(np.int64))


@dataclass
class Importance:
    """Per unit of the teacher, higher is more important."""

    depth_metric: DepthMetric
    layers: torch.Tensor  # [layers]
    hidden: torch.Tensor  # [hidden]
    heads: torch.Tensor  # [layers, heads]
    neurons: torch.Tensor  # [layers, intermediate]


class _SkippedBlock(nn.Module):
    """A decoder layer dropped: its input passes through."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def dropped_block(layers: nn.ModuleList, index: int) -> Iterator[None]:
    block = layers[index]
    layers[index] = _SkippedBlock()
    try:
        yield
    finally:
        layers[index] = block


def _first(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value[0]


@torch.no_grad()
def measure_importance(teacher: PreTrainedModel, input_ids: torch.Tensor,
                       depth: DepthMetric) -> Importance:
    """Every axis' importance on the calibration rows `input_ids` [rows, seq_len]."""
    decoder, layout = teacher.model, Layout.of(teacher, "teacher")
    shape, device = layout.shape, teacher.device
    norms = [m for layer in decoder.layers
             for m in (layer.input_layernorm, layer.post_attention_layernorm)] + [decoder.norm]
    squares = {"heads": torch.zeros(shape.layers, shape.heads, dtype=torch.float64),
               "neurons": torch.zeros(shape.layers, shape.intermediate, dtype=torch.float64),
               "hidden": torch.zeros(len(norms), shape.hidden, dtype=torch.float64)}
    cosine = torch.zeros(shape.layers, dtype=torch.float64)

    def add(name: str, index: int, per_row: torch.Tensor) -> None:  # [rows, units]
        squares[name][index] += per_row.double().square().sum(0).cpu()

    def block_hook(index: int):
        def hook(module, args, kwargs, output):
            before = args[0] if args else kwargs["hidden_states"]
            similarity = F.cosine_similarity(before.double(), _first(output).double(), dim=-1)
            cosine[index] += similarity.sum().cpu()
        return hook

    hooks = []
    for i, layer in enumerate(decoder.layers):
        hooks.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, args, i=i: add("heads", i, args[0].unflatten(-1, (shape.heads, -1))
                                     .norm(dim=-1).mean(1))))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, args, i=i: add("neurons", i, args[0].abs().mean(1))))
    for j, norm in enumerate(norms):
        hooks.append(norm.register_forward_hook(
            lambda m, args, output, j=j: add("hidden", j, _first(output).abs().mean(1))))
    was_training = teacher.training
    teacher.eval()
    try:
        for batch in input_ids.split(IMPORTANCE_BATCH_ROWS):
            decoder(input_ids=batch.to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        teacher.train(was_training)
    if depth == "block":
        layer_scores = 1 - cosine / input_ids.numel()
    else:
        layer_scores = _loss_increase(teacher, input_ids)
    return Importance(depth, layer_scores, squares["hidden"].sqrt().sum(0),
                      squares["heads"].sqrt(), squares["neurons"].sqrt())


def _loss_increase(teacher: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's CE on the rows with each block dropped, minus its CE with every block."""
    text = HeldoutText("calibration rows", input_ids)

    def ce() -> float:
        return text_ce(teacher, text, teacher.device, batch_size=IMPORTANCE_BATCH_ROWS)

    full, layers = ce(), teacher.model.layers
    increases = []
    for i in range(len(layers)):
        with dropped_block(layers, i):
            increases.append(ce() - full)
    return torch.tensor(increases, dtype=torch.float64)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores (ties: the lower index), in ascending order."""
    return sorted(torch.argsort(scores, descending=True, stable=True)[:k].tolist())


@dataclass(frozen=True)
class PrunePlan:
    """The teacher's units the student keeps, in the student's order."""

    layers: list[int]
    hidden: list[int]
    heads: list[list[int]]  # per kept layer: query heads, grouped by kept KV head
    kv_heads: list[list[int]]  # per kept layer
    neurons: list[list[int]]  # per kept layer

    @property
    def shape(self) -> Shape:
        return Shape(len(self.layers), len(self.hidden), len(self.neurons[0]),
                     len(self.heads[0]), len(self.kv_heads[0]))


def make_plan(importance: Importance, teacher: Shape, shape: Shape) -> PrunePlan:
    """Keep the most important units of every axis. Under GQA the KV groups are ranked by the
    summed importance of their query heads, then each kept group keeps its best heads."""
    layers = _top(importance.layers, shape.layers)
    heads, kv_heads, neurons = [], [], []
    for layer in layers:
        grouped = importance.heads[layer].view(teacher.kv_heads, teacher.heads_per_group)
        groups = _top(grouped.sum(1), shape.kv_heads)
        kv_heads.append(groups)
        heads.append([g * teacher.heads_per_group + h for g in groups
                      for h in _top(grouped[g], shape.heads_per_group)])
        neurons.append(_top(importance.neurons[layer], shape.intermediate))
    return PrunePlan(layers, _top(importance.hidden, shape.hidden), heads, kv_heads, neurons)


def _rows(units: list[int], width: int) -> list[int]:
    """The rows of `units` (heads) of `width` (head_dim) rows each."""
    return [u * width + r for u in units for r in range(width)]


def _cut(tensor: torch.Tensor, rule: tuple[str | None, ...],
         index: dict[str, torch.Tensor]) -> torch.Tensor:
    for dim, axis in enumerate(rule):
        if axis is not None:
            tensor = tensor.index_select(dim, index[axis])
    return tensor


@torch.no_grad()
def apply_plan(teacher: PreTrainedModel, plan: PrunePlan) -> PreTrainedModel:
    """A new model of the plan's shape holding the teacher's kept weights, in the teacher's
    dtype, on the CPU."""
    layout = Layout.of(teacher, "teacher")
    config = layout.pruned_config(plan.shape, plan.layers, "teacher")
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    weights = teacher.state_dict()
    device = next(iter(weights.values())).device

    def index(units: list[int]) -> torch.Tensor:
        return torch.tensor(units, dtype=torch.long, device=device)

    hidden = index(plan.hidden)
    state = {}
    for name in student.state_dict():
        layer = LAYER_PREFIX.match(name)
        if layer is None:
            state[name] = _cut(weights[name], TOP_RULES[name], {"hidden": hidden})
            continue
        k, local = int(layer[1]), layer[2]
        cuts = {"hidden": hidden, "q": index(_rows(plan.heads[k], layout.head_dim)),
                "kv": index(_rows(plan.kv_heads[k], layout.head_dim)),
                "neurons": index(plan.neurons[k])}
        state[name] = _cut(weights[f"model.layers.{plan.layers[k]}.{local}"], LAYER_RULES[local],
                           cuts)
    student.load_state_dict(state, strict=True)
    return student


def _retained(scores: torch.Tensor, kept: list[int]) -> float:
    return float(scores[kept].sum() / scores.sum()) if float(scores.sum()) else 1.0


def prune_record(importance: Importance, plan: PrunePlan, teacher: Shape, seq_ids: np.ndarray,
                 seed: int) -> dict[str, Any]:
    """The plan and its importance figures, for the training record: every kept index, the
    depth and head scores in full, the channel scores, and per axis the share of the teacher's
    importance the student keeps (neurons: summed over the kept layers)."""
    kept_layers = plan.layers
    neurons = importance.neurons[kept_layers]
    heads = importance.heads[kept_layers]
    return {
        "teacher_shape": asdict(teacher),
        "calibration": {"rows": len(seq_ids), "seed": seed, "seq_ids": seq_ids.tolist()},
        "importance": {
            "depth_metric": importance.depth_metric,
            "layers": importance.layers.tolist(), "heads": importance.heads.tolist(),
            "hidden": importance.hidden.tolist(),
            "retained": {
                "layers": _retained(importance.layers.clamp(min=0), kept_layers),
                "hidden": _retained(importance.hidden, plan.hidden),
                "heads": _retained(heads.flatten(), [k * teacher.heads + h
                                                     for k, row in enumerate(plan.heads)
                                                     for h in row]),
                "neurons": _retained(neurons.flatten(), [k * teacher.intermediate + n
                                                         for k, row in enumerate(plan.neurons)
                                                         for n in row]),
            },
        },
        "plan": asdict(plan),
    }
