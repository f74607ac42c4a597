"""The model card (README.md) of a saved student: what it is, what it learned from, how it began
and how it scored on held-out text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from teacher_cache.format import Manifest, Targets

CARD_FILE = "README.md"
UNITS = {"layers": "blocks", "hidden": "embedding channels", "heads": "attention heads",
         "neurons": "MLP neurons"}
FRONT_MATTER = """---
library_name: transformers
pipeline_tag: text-generation
tags: [distillation, knowledge-distillation]
---
"""
USAGE = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(PATH)
model = AutoModelForCausalLM.from_pretrained(PATH)
ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))
```
"""


def teacher_quantization(teacher: dict[str, Any]) -> str | None:
    """The teacher's weight format when it came from a GGUF: its quantization type, which the
    converted directory's name carries after the model's name (`SmolLM2-135M-Instruct.Q4_1`)."""
    if teacher.get("quantization"):
        return teacher["quantization"]
    name, directory = teacher.get("name") or "", Path(teacher.get("path") or "").name
    if name and directory.startswith(name + ".") and len(directory) > len(name) + 1:
        return directory[len(name) + 1:]
    return None


def _corpus(manifest: Manifest) -> str:
    description = manifest.corpus.get("description", "?")
    if description.startswith("files:"):  # local paths: only their names
        paths = description.removeprefix("files:").rsplit(":", 1)[0].split()
        description = "files " + ", ".join(Path(p).name for p in paths)
    return description


def _init(training: dict[str, Any]) -> str:
    record = training.get("init_details") or {"init": training.get("init", "random")}
    init = record["init"]
    if init == "pruned":
        prune = record["prune"]
        teacher, shape = prune["teacher_shape"], record["shape"]
        cut = ", ".join(f"{axis} {teacher[axis]} -> {shape[axis]}" for axis in shape
                        if shape[axis] != teacher[axis]) or "nothing cut"
        retained = prune["importance"]["retained"]
        calibration = prune["calibration"]
        return (f"Pruned from the teacher ({cut}), Minitron-style: depth by "
                f"{prune['importance']['depth_metric']} importance, width by activation "
                f"magnitude, on {calibration['rows']} calibration rows of the cache's training "
                f"split (seed {calibration['seed']}); the kept units hold "
                + ", ".join(f"{share:.0%} of the {UNITS[axis]}' importance"
                            for axis, share in retained.items())
                + ". The plan and every importance figure are in training.json.")
    if init == "pretrained":
        return f"Continued from the pretrained weights of {record.get('source', 'the model')}."
    return f"Random init ({record.get('student', training.get('student'))} shape)."


def model_card(manifest: Manifest, training: dict[str, Any],
               outside_text: tuple[str, float] | None = None) -> str:
    """The card of a student trained on `manifest`'s cache; `outside_text`: (description, CE) of
    text outside the cache's corpus."""
    teacher, get = manifest.teacher, training.get
    quantization = teacher_quantization(teacher)
    weights = f"dequantized from a {quantization} GGUF" if quantization else "as stored"
    targets = Targets.from_manifest(manifest.targets)
    target_text = (f"{targets.spec} (draws at temperature {targets.temperature:g})"
                   if targets.kind == "sample" else f"{targets.spec} (its top-k logprobs)")
    loss = ("cross-entropy plus a sparse KL to the teacher" if get("kd_weight", 0) > 0
            else "cross-entropy only")
    first_target = "its most drawn token" if targets.kind == "sample" else "its top-1"
    rows = [("validation CE (nats/token)", get("val_ce")),
            ("KL to the teacher's targets", get("val_kl")),
            (f"argmax = the teacher's first target ({first_target})", get("val_top1"))]
    if outside_text is not None:
        rows.append((f"CE on {outside_text[0]}", outside_text[1]))
    table = "\n".join(f"| {what} | {value:.3f} |" for what, value in rows if value is not None)
    speed = f" It trained at {get('tokens_per_s'):,.0f} tokens/s." if get("tokens_per_s") else ""
    sections = {
        "Teacher": f"{teacher.get('name')}, {weights}, run in {teacher.get('dtype', '?')} by the "
                   f"{teacher.get('backend', '?')} backend.",
        "Cache": f"{_corpus(manifest)}: {manifest.totals.get('tokens', 0):,} tokens in sequences "
                 f"of {manifest.seq_len}; teacher targets per position: {target_text}.",
        "Initialisation": _init(training),
        "Training": f"{get('steps')} steps, {get('tokens_seen', 0):,} tokens seen "
                    f"({get('rows_per_step')} sequences per step), peak learning rate "
                    f"{get('lr')}, CE weight {get('ce_weight')}, KD weight {get('kd_weight')} "
                    f"({get('divergence')}), rows {get('select')}, seed {get('seed')}.{speed}",
        "Held-out results": f"On the cache's held-out sequences ({get('val_tokens', 0):,} tokens "
                            f"of the training corpus' documents)"
                            + (" and on text outside the corpus" if outside_text else "")
                            + f":\n\n| measure | value |\n|---|---|\n{table}",
        "Use": USAGE + f"\nJudge it by the figures above: {get('tokens_seen', 0):,} training "
                       f"tokens make a small model that continues text like its corpus.",
    }
    header = (f"{FRONT_MATTER}\n# {get('student')} student of {teacher.get('name')}\n\n"
              f"A {get('parameters', 0) / 1e6:.1f}M-parameter causal language model trained from "
              f"a teacher cache with {loss}. It is a base model: it continues text, and its "
              f"tokenizer carries no chat template unless it was trained with "
              f"`--chat-template`.\n")
    return header + "".join(f"\n## {title}\n\n{text}\n" for title, text in sections.items())


def write_model_card(out: Path, manifest: Manifest, training: dict[str, Any],
                     outside_text: tuple[str, float] | None = None) -> Path:
    path = Path(out) / CARD_FILE
    path.write_text(model_card(manifest, training, outside_text), encoding="utf-8")
    return path
