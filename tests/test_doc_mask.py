"""--doc-mask: each document of a packed row attends only to itself, in training, evaluation and
the held-out text, exactly as if it were run alone; rows without a boundary are unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, TRAINING_FIGURES, assert_same_run, tiny_config, train_until_killed
from transformers import AutoModelForCausalLM, BloomConfig, MistralConfig, Qwen2Config

from kernels import IGNORE_INDEX
from student_train.__main__ import main as train_main
from student_train.checkpoint import load_checkpoint, save_checkpoint
from student_train.data import make_batch, row_positions
from student_train.heldout import HeldoutText, text_ce
from student_train.model import build_student, final_hidden, output_weight, resolve_doc_mask
from student_train.presets import llama_config, resolve_preset
from student_train.run_dir import STUDENT_DIR, SUMMARY_FILE
from student_train.train import Trainer, train
from teacher_cache.errors import ConfigError
from teacher_cache.reader import open_cache
from teacher_cache.synth import document_starts, write_synthetic_cache

L = 16
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
ARCHITECTURES = {
    "llama": lambda: llama_config(resolve_preset("xs", dict(TINY, num_hidden_layers="2")), 128, L),
    "qwen2": lambda: Qwen2Config(vocab_size=128, **SMALL),
    # A window shorter than the documents: the block-causal mask composes with it.
    "mistral": lambda: MistralConfig(vocab_size=128, sliding_window=3, **SMALL),
}
# Document starts of one row: one document; two; several; a boundary at position 1 and one at
# the last position; a row whose first tokens continue the previous row's document.
STARTS = {"one": [0], "two": [0, 6], "several": [0, 2, 5, 9, 13], "at-1": [0, 1],
          "at-last": [0, L - 1], "continued": [4, 11]}
# Rows of the caches the training tests read: a third with boundaries, the others without.
BOUNDARIES = [[0, 5], [0, 1, 9], [0, L - 1]]


def student64(arch: str, attention: str):
    config = ARCHITECTURES[arch]()
    config._attn_implementation = attention
    return build_student(config, seed=0).double().eval()


def segments(starts: list[int]) -> list[tuple[int, int]]:
    bounds = sorted({0, *starts, L})
    return list(zip(bounds, bounds[1:], strict=False))


@pytest.mark.parametrize("starts", STARTS.values(), ids=STARTS)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_packed_row_gives_each_document_its_logits_alone(arch, attention, starts):
    student = student64(arch, attention)
    ids = torch.randint(0, 128, (1, L), generator=torch.Generator().manual_seed(len(starts)))
    positions = torch.from_numpy(row_positions([np.array(starts)], L))
    weight = output_weight(student)
    # eager attention takes its softmax in float32 even in a float64 model
    atol = 1e-12 if attention == "sdpa" else 1e-6
    with torch.no_grad():
        packed = final_hidden(student, ids, positions) @ weight.T
        for start, end in segments(starts):
            alone = final_hidden(student, ids[:, start:end]) @ weight.T
            torch.testing.assert_close(packed[:, start:end], alone, rtol=0, atol=atol)
    assert resolve_doc_mask("on", student, "student")


def test_row_positions_restart_at_every_document_start():
    got = row_positions([np.array([0]), np.array([0, 1]), np.array([0, 3, 7]), np.array([2]),
                         np.array([], np.int32), np.array([0, 7])], 8)
    assert got.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 2, 3, 4, 5, 6],
                            [0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 3, 4, 5],
                            [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 0]]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_row_without_boundaries_is_unchanged(arch):
    student = student64(arch, "sdpa")
    ids = torch.randint(0, 128, (2, L), generator=torch.Generator().manual_seed(0))
    positions = torch.from_numpy(row_positions([np.array([0]), np.array([], np.int32)], L))
    with torch.no_grad():
        assert torch.equal(final_hidden(student, ids, positions), final_hidden(student, ids))


def packed_cache(path: Path, boundaries: bool) -> str:
    starts = [BOUNDARIES[i // 3 % 3] if boundaries and i % 3 == 0 else [0] for i in range(24)]
    write_synthetic_cache(path, sequences=24, seq_len=L, top_k=4, vocab_size=128,
                          rows_per_shard=8, seed=3, doc_starts=starts)
    return str(path)


def trainer(cache: str, out: Path, doc_mask: str, **changes) -> Trainer:
    return Trainer(tiny_config(cache, out, doc_mask=doc_mask, batch_size=6, **changes))


def test_training_with_the_mask_changes_only_the_rows_with_boundaries(tmp_path):
    plain = packed_cache(tmp_path / "plain", boundaries=False)
    on, off = trainer(plain, tmp_path / "on", "on"), trainer(plain, tmp_path / "off", "off")
    assert on.doc_mask and not off.doc_mask
    for _ in range(2):
        on.train_step(), off.train_step()
    for (name, mine), theirs in zip(on.student.state_dict().items(),
                                    off.student.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name

    packed = packed_cache(tmp_path / "packed", boundaries=True)
    on, off = trainer(packed, tmp_path / "on2", "on"), trainer(packed, tmp_path / "off2", "off")
    batch = make_batch([open_cache(packed).read_shard(0)])  # rows 0, 3 and 6 with boundaries
    with torch.no_grad():
        masked = final_hidden(on.student, batch.input_ids, batch.positions(True))
        unmasked = final_hidden(on.student, batch.input_ids, batch.positions(False))
        losses = {mask: [on.model(batch.input_ids[rows], batch.labels[rows],
                                  batch.topk_ids[rows], batch.topk_logprobs[rows],
                                  batch.position_ids[rows] if mask else None)[0].item()
                         for rows in ([0, 3, 6], [1, 2, 4, 5, 7])]
                  for mask in (True, False)}
    # A token is changed by the mask exactly when a boundary lies at or before it.
    differs = (masked - unmasked).abs().amax(-1) > 1e-4
    assert torch.equal(differs, torch.cumsum(batch.position_ids == 0, 1) > 1)
    assert losses[True][0] != pytest.approx(losses[False][0], rel=1e-4)
    assert losses[True][1] == pytest.approx(losses[False][1], rel=1e-6)
    for _ in range(3):  # 18 of the 19 training rows, a third of them with boundaries
        on.train_step(), off.train_step()
    assert not torch.equal(on.student.lm_head.weight, off.student.lm_head.weight)


def per_document_ce(student, input_ids, labels, position_ids) -> float:
    """CE on the true next token (`labels`) with each document run alone, in float64."""
    student = student.double()
    weight, total, tokens = output_weight(student), 0.0, 0
    for row in range(len(input_ids)):
        starts = torch.nonzero(position_ids[row] == 0)[:, 0].tolist()
        for start, end in zip(starts, [*starts[1:], L], strict=True):
            logits = final_hidden(student, input_ids[row:row + 1, start:end])[0] @ weight.T
            valid = labels[row, start:end] != IGNORE_INDEX
            logprobs = torch.log_softmax(logits[valid], -1)
            total -= logprobs.gather(1, labels[row, start:end][valid, None]).sum().item()
            tokens += int(valid.sum())
    return total / tokens


def test_evaluation_runs_each_document_alone(tmp_path):
    packed = packed_cache(tmp_path / "packed", boundaries=True)
    on, off = trainer(packed, tmp_path / "on", "on"), trainer(packed, tmp_path / "off", "off")
    got = on.evaluate()["val_ce"]
    assert any((b.position_ids[:, 1:] == 0).any() for b in on._val_batches)
    assert got != pytest.approx(off.evaluate()["val_ce"], rel=1e-4)
    rows = {name: torch.cat([getattr(b, name) for b in on._val_batches])
            for name in ("input_ids", "labels", "position_ids")}
    assert got == pytest.approx(per_document_ce(on.student, **rows), rel=1e-5)


def test_heldout_text_runs_each_document_alone():
    student = AutoModelForCausalLM.from_config(ARCHITECTURES["llama"]())
    ids = torch.randint(0, 128, (3, L), generator=torch.Generator().manual_seed(2))
    starts = [np.array(s) for s in ([0, 7], [3], [0, 1, L - 1])]
    text = HeldoutText("packed", ids, torch.from_numpy(row_positions(starts, L)))
    got = text_ce(student, text, torch.device("cpu"), batch_size=2, doc_mask=True)
    unmasked = text_ce(student, text, torch.device("cpu"), batch_size=2)
    labels = torch.cat([ids[:, 1:], torch.full((3, 1), IGNORE_INDEX)], 1)
    assert got == pytest.approx(per_document_ce(student, ids, labels, text.position_ids),
                                rel=1e-5)
    assert got != pytest.approx(unmasked, rel=1e-4)


def test_the_compiled_decoder_masks_like_the_eager_one(tmp_path):
    packed = packed_cache(tmp_path / "packed", boundaries=True)
    compiled = trainer(packed, tmp_path / "compiled", "on", compile="on",
                       compile_backend="aot_eager")
    eager = trainer(packed, tmp_path / "eager", "on")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for _ in range(2):
        compiled.train_step(), eager.train_step()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(compiled.interval.sums, eager.interval.sums, rtol=1e-5, atol=0)


def test_a_config_only_qwen2_student_masks_and_records_it(tmp_path):
    config = tmp_path / "qwen2"
    Qwen2Config(vocab_size=128, **SMALL).save_pretrained(config)
    packed = packed_cache(tmp_path / "packed", boundaries=True)
    summary = train(tiny_config(packed, tmp_path / "run", student=str(config / "config.json"),
                                overrides={}, max_steps=2, eval_every=0, checkpoint_every=0))
    assert summary["doc_mask"] is True
    assert json.loads((tmp_path / "run" / STUDENT_DIR / "training.json").read_text())["doc_mask"]
    assert load_checkpoint(tmp_path / "run")["config"]["doc_mask"] == "auto"


def test_a_killed_masked_run_resumes_exactly(tmp_path, monkeypatch):
    packed = packed_cache(tmp_path / "packed", boundaries=True)
    train(tiny_config(packed, tmp_path / "straight"))
    train_until_killed(tiny_config(packed, tmp_path / "resumed"), monkeypatch)
    train(tiny_config(packed, tmp_path / "resumed", resume=True))
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", (*TRAINING_FIGURES, "val_ce"),
                    rel=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "resumed" / SUMMARY_FILE).read_text())["doc_mask"] is True


def test_changing_the_mask_is_refused_on_resume(tmp_path):
    packed = packed_cache(tmp_path / "packed", boundaries=True)
    train(tiny_config(packed, tmp_path / "run", max_steps=2, eval_every=0))
    with pytest.raises(ConfigError, match="doc_mask: 'auto' -> 'off'"):
        Trainer(tiny_config(packed, tmp_path / "run", max_steps=4, resume=True, doc_mask="off"))


def test_fsdp_with_activation_checkpointing_masks_as_the_plain_run(tmp_path):
    packed = packed_cache(tmp_path / "packed", boundaries=True)
    settings = dict(max_steps=3, eval_every=2, val_max_rows=5, eval_batch_size=2)
    train(tiny_config(packed, tmp_path / "plain", **settings))
    train(tiny_config(packed, tmp_path / "fsdp", parallel="fsdp", activation_checkpointing="full",
                      **settings))
    # One process sums in the same order: equal to the last bit.
    assert_same_run(tmp_path / "plain", tmp_path / "fsdp", (*TRAINING_FIGURES, "val_ce"), rel=0,
                    atol=0)
    train(tiny_config(packed, tmp_path / "off", doc_mask="off", **settings))
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path / "plain", tmp_path / "off", ("val_ce",), rel=1e-6, atol=0)


def test_a_run_from_before_the_flag_resumes_without_the_mask_under_auto(tmp_path):
    packed = packed_cache(tmp_path / "packed", boundaries=True)
    train(tiny_config(packed, tmp_path / "run", max_steps=2, eval_every=0, doc_mask="off"))
    state = load_checkpoint(tmp_path / "run")
    del state["config"]["doc_mask"]  # as a version without --doc-mask wrote it
    save_checkpoint(tmp_path / "run", state)
    with pytest.raises(ConfigError, match="doc_mask: 'off' -> 'on'"):
        Trainer(tiny_config(packed, tmp_path / "run", max_steps=4, resume=True, doc_mask="on"))
    summary = train(tiny_config(packed, tmp_path / "run", max_steps=4, resume=True))
    assert summary["steps"] == 4 and summary["doc_mask"] is False
    assert load_checkpoint(tmp_path / "run")["config"]["doc_mask"] == "off"


def test_a_student_whose_attention_crosses_documents_is_refused_on_and_off_by_default(
        tmp_path, capsys):
    # BLOOM masks from its attention mask alone (and has no position ids: ALiBi).
    BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4).save_pretrained(
        tmp_path / "bloom")
    student = str(tmp_path / "bloom" / "config.json")
    packed = packed_cache(tmp_path / "packed", boundaries=True)
    flags = ["--cache", packed, "--student", student, "--max-steps", "1", "--batch-size", "2",
             "--eval-every", "0"]
    assert train_main([*flags, "--out", str(tmp_path / "on"), "--doc-mask", "on"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--doc-mask on:" in err and "BloomForCausalLM" in err, err
    assert train_main([*flags, "--out", str(tmp_path / "auto")]) == 0
    assert "--doc-mask auto is off for this student" in capsys.readouterr().err
    assert json.loads((tmp_path / "auto" / SUMMARY_FILE).read_text())["doc_mask"] is False


def test_synthetic_document_starts_pack_documents_of_the_mean_length():
    starts = document_starts(64, 512, 128, seed=0)
    offsets = [r * 512 + s for r, row in enumerate(starts) for s in row]
    assert offsets[0] == 0 and offsets == sorted(set(offsets))
    assert all(0 <= s < 512 for row in starts for s in row)
    assert 100 < 64 * 512 / len(offsets) < 160  # mean document length, geometric around 128
