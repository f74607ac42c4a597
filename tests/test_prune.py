"""Pruning the teacher (student_train/prune.py) on tiny Llamas: importance, plans, the cut model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PhiConfig

from student_train.model import count_parameters
from student_train.prune import (
    Layout,
    PrunePlan,
    PruneSpec,
    Shape,
    apply_plan,
    make_plan,
    measure_importance,
    resolve_shape,
)
from teacher_cache.errors import ConfigError

VOCAB = 96


def tiny_llama(dtype=torch.float32, seed: int = 0, **changes) -> LlamaForCausalLM:
    """4 layers, hidden 32, 4 query heads in 2 KV groups (head_dim 8), 48 MLP neurons. Weights of
    std 0.2, so that every block changes the residual stream as much as a trained one does."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
                            "num_hidden_layers": 4, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "tie_word_embeddings": True,
                            "initializer_range": 0.2, "use_cache": False} | changes)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # logits of std ~1, as a trained model's, not the init's ~0.02
        model.model.embed_tokens.weight.normal_(0.0, 0.3)
    return model


def calibration_ids(rows: int = 6, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


def prune(model, text: str) -> tuple[LlamaForCausalLM, PrunePlan]:
    layout = Layout.of(model, "teacher")
    shape = resolve_shape(PruneSpec.parse(text), layout, "teacher")
    importance = measure_importance(model, calibration_ids(), PruneSpec.parse(text).depth)
    plan = make_plan(importance, layout.shape, shape)
    return apply_plan(model, plan), plan


def test_pruning_nothing_gives_the_teachers_logits_exactly():
    teacher = tiny_llama()
    student, plan = prune(teacher, "prune:layers=4,hidden=32,intermediate=48,heads=4")
    assert plan.shape == Shape.of(teacher.config)
    ids = calibration_ids(seed=5)
    assert torch.equal(logits(student, ids), logits(teacher, ids))


def plant_dead_units(model) -> None:
    """Layer 1: MLP neuron 5 never fires. Layer 2: KV group 1 carries no values, so its query
    heads 2 and 3 output nothing. Layer 3: almost the identity. Channel 7: zero everywhere."""
    layers = model.model.layers
    with torch.no_grad():
        layers[1].mlp.gate_proj.weight[5] = 0
        layers[1].mlp.up_proj.weight[5] = 0
        layers[2].self_attn.v_proj.weight[8:16] = 0  # KV head 1 (head_dim 8)
        layers[3].self_attn.o_proj.weight.mul_(1e-4)
        layers[3].mlp.down_proj.weight.mul_(1e-4)
        model.model.embed_tokens.weight[:, 7] = 0
        for layer in layers:
            layer.self_attn.o_proj.weight[7] = 0
            layer.mlp.down_proj.weight[7] = 0
            layer.input_layernorm.weight[7] = 0
            layer.post_attention_layernorm.weight[7] = 0
        model.model.norm.weight[7] = 0


def test_planted_dead_units_rank_last_and_pruning_removes_them():
    teacher = tiny_llama()
    plant_dead_units(teacher)
    importance = measure_importance(teacher, calibration_ids(), "block")
    assert importance.layers.argmin() == 3
    assert importance.hidden.argmin() == 7 and importance.hidden[7] == 0
    assert importance.neurons[1].argmin() == 5 and importance.neurons[1, 5] == 0
    assert importance.heads[2, 2:].max() < importance.heads[2, :2].min()
    assert importance.heads[2, 2:].max() == 0
    shape = Shape(layers=3, hidden=31, intermediate=47, heads=2, kv_heads=1)
    plan = make_plan(importance, Shape.of(teacher.config), shape)
    assert plan.layers == [0, 1, 2]
    assert 7 not in plan.hidden and len(plan.hidden) == 31
    assert 5 not in plan.neurons[1] and len(plan.neurons[1]) == 47
    assert plan.kv_heads[2] == [0] and plan.heads[2] == [0, 1]  # the dead group goes whole


def ce(model, input_ids: torch.Tensor) -> float:
    """The CE of the next token from the full logits, in float64."""
    x = logits(model, input_ids)[:, :-1].double()
    return float(torch.nn.functional.cross_entropy(x.flatten(0, 1), input_ids[:, 1:].flatten()))


def test_loss_depth_importance_is_the_ce_increase_without_the_block():
    teacher = tiny_llama()
    plant_dead_units(teacher)
    ids = calibration_ids()
    importance = measure_importance(teacher, ids, "loss")
    full, shape = ce(teacher, ids), Shape.of(teacher.config)
    every = list(range(shape.layers))
    for block in every:
        # An independent oracle: the model built without the block.
        kept = [i for i in every if i != block]
        plan = PrunePlan(kept, list(range(shape.hidden)), [list(range(4))] * 3, [[0, 1]] * 3,
                         [list(range(shape.intermediate))] * 3)
        assert importance.layers[block] == pytest.approx(ce(apply_plan(teacher, plan), ids) - full,
                                                         abs=1e-5)
    assert abs(importance.layers).argmin() == 3  # the near-identity block
    assert abs(importance.layers[3]) < 1e-3 < abs(importance.layers[:3]).min()


def masked_teacher(teacher, plan: PrunePlan):
    """The teacher at full size with the pruned units zeroed, in its own float64 weights: dropped
    blocks write nothing to the residual stream, pruned heads and neurons nothing to their output
    projection, pruned channels are zero in the embedding and every write to the residual stream;
    the norms average over the kept channels (weights and eps rescaled)."""
    model = copy.deepcopy(teacher)
    shape, head_dim = Shape.of(teacher.config), teacher.config.head_dim
    keep = len(plan.hidden) / shape.hidden
    gone_channels = [c for c in range(shape.hidden) if c not in plan.hidden]
    norms = [model.model.norm]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, gone_channels] = 0
        for index, layer in enumerate(model.model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
            if index not in plan.layers:
                attention.o_proj.weight.zero_()
                mlp.down_proj.weight.zero_()
                continue
            k = plan.layers.index(index)
            for head in set(range(shape.heads)) - set(plan.heads[k]):
                attention.o_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0
            mlp.down_proj.weight[:, [n for n in range(shape.intermediate)
                                     if n not in plan.neurons[k]]] = 0
            attention.o_proj.weight[gone_channels] = 0
            mlp.down_proj.weight[gone_channels] = 0
        for norm in norms:
            norm.weight.mul_(math.sqrt(keep))
            norm.variance_epsilon *= keep
    return model


@pytest.mark.parametrize("spec", [
    "prune:layers=3,hidden=24,intermediate=40,heads=2,kv_heads=1",  # one KV group, both heads
    "prune:layers=2,hidden=20,intermediate=48,heads=2",  # one query head in each KV group
])
def test_a_pruned_model_is_the_teacher_with_its_pruned_units_masked(spec, tmp_path):
    teacher = tiny_llama(torch.float64)
    student, plan = prune(teacher, spec)
    ids = calibration_ids(seed=7)
    want = logits(masked_teacher(teacher, plan), ids)
    # float64 but for the RMSNorms, which compute in float32 whatever the dtype: the masked
    # teacher's sum over all channels rounds otherwise than the student's over the kept ones.
    float32_norms = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(logits(student, ids), want, **float32_norms)
    # GQA stays consistent: each kept query head sits in its KV head's group, as many per group.
    per_group = teacher.config.num_attention_heads // teacher.config.num_key_value_heads
    for heads, groups in zip(plan.heads, plan.kv_heads, strict=True):
        assert [h // per_group for h in heads] == sorted(
            g for g in groups for _ in range(len(heads) // len(groups)))
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert Shape.of(loaded.config) == plan.shape
    torch.testing.assert_close(logits(loaded, ids), logits(student, ids), rtol=0, atol=0)


def test_a_parameter_target_picks_a_shape_within_it_and_the_count_is_exact():
    teacher = tiny_llama()
    layout = Layout.of(teacher, "teacher")
    full = count_parameters(teacher)
    assert layout.count(layout.shape) == full
    for text in ("prune:params=10K", "prune:params=20K,layers=2", "prune:params=0.025M,hidden=32"):
        spec = PruneSpec.parse(text)
        shape = resolve_shape(spec, layout, "teacher")
        student, _ = prune(teacher, text)
        assert layout.count(shape) == count_parameters(student) <= spec.params < full
        for axis in ("layers", "hidden"):
            if getattr(spec, axis) is not None:
                assert getattr(shape, axis) == getattr(spec, axis)


@pytest.mark.parametrize(("text", "message"), [
    ("prune:", "expected prune:KEY=VALUE"),
    ("prune:layer=3", "expected prune:KEY=VALUE"),
    ("prune:depth=block", "nothing to prune"),
    ("prune:depth=cosine,layers=2", "depth=cosine: choose one of block, loss"),
    ("prune:layers=0", "layers=0: expected a positive integer"),
    ("prune:params=lots", "params=lots: expected a positive count"),
    ("prune:layers=9", "layers=9: must be in [1, 4]"),
    ("prune:heads=3", "heads=3 is not a multiple of the teacher's 2 KV heads"),
    ("prune:heads=4,kv_heads=1", "each KV head keeps the same number of query heads"),
    ("prune:params=100", "below the smallest shape"),
    ("prune:hidden=30", "llama refuses the shape .*: The hidden size \\(30\\) is not a multiple"),
])
def test_bad_prune_specs_are_one_line_errors(text, message):
    layout = Layout.of(tiny_llama(), "teacher")
    with pytest.raises(ConfigError, match=message.replace("[1", r"\[1")) as error:
        resolve_shape(PruneSpec.parse(text), layout, "teacher")
    assert "\n" not in str(error.value)


def test_an_architecture_pruning_does_not_know_is_refused():
    phi = AutoModelForCausalLM.from_config(PhiConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2))
    with pytest.raises(ConfigError, match="cannot prune a phi teacher; pruning knows"):
        Layout.of(phi, "teacher")
