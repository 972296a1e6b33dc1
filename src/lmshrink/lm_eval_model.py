"""lm-evaluation-harness on lmshrink models: ``lmshrink eval --tasks`` and an lm-eval model named "lmshrink".

Importing this module registers the lm-eval model "lmshrink" (lm-eval's ``register_model``), so
``lm_eval.simple_evaluate(model="lmshrink", model_args="pretrained=DIR", ...)`` works after
``import lmshrink.lm_eval_model``; lm-eval's own ``lm_eval --model lmshrink`` finds it through the installed hook
(``_lmshrink_lm_eval``), and ``python -m lmshrink.lm_eval_model run ...`` is that command line without the hook. The model is lm-eval's ``HFLM`` given the
transformers model that lmshrink.load rebuilt, so every task type HFLM scores works unchanged.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from lmshrink.errors import InvalidArgument

# What a YAML task needs before lm-eval can score it (lm-eval itself fails late with a bare TypeError without them).
_REQUIRED_FIELDS = ("task", "dataset_path", "doc_to_text", "doc_to_target")
_TASK_FIELDS_HELP = ("a task YAML with task, dataset_path (or custom_dataset), test_split or validation_split, doc_to_text, "
                     "doc_to_target, and doc_to_choice for output_type multiple_choice")


_CHOICE_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_choice_task(folder: str | Path, name: str, documents: list[dict]) -> Path:
    """A local multiple-choice task for ``--tasks NAME --include-path FOLDER``: ``NAME.jsonl`` (one document per line:
    "question", "choices" (a list of strings), "answer" (the right choice's index)) and ``NAME.yaml``, lm-eval's
    task format read offline. Returns the YAML file's path."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in documents))
    yaml = folder / f"{name}.yaml"
    yaml.write_text(_CHOICE_TASK_YAML.format(name=name, data=data))
    return yaml


def task_manager(tasks: list[str], include_path: str | Path | None = None, include_defaults: bool = True):
    """lm-eval's TaskManager for ``tasks``, after checking that each name exists and each YAML task has its fields."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise InvalidArgument("--include-path", f"{str(include_path)!r} is not a directory", "a folder of lm-eval task YAML files")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None, include_defaults=include_defaults)
    for name in tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            raise InvalidArgument("--tasks", f"unknown task {name!r}" + (f"; close matches: {', '.join(close)}" if close else ""),
                                  "tasks lm-eval knows (`lm-eval ls tasks`) or ones defined in YAML under --include-path")
        _check_task_fields(name, manager.task_index[name])
    return manager


def _check_task_fields(name: str, entry) -> None:
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    if entry.kind is not Kind.TASK or entry.yaml_path is None:
        return  # groups, tags and Python tasks: lm-eval checks their members itself
    config = load_yaml(entry.yaml_path, resolve_func=False)  # reading only: no !function code is imported here
    missing = [field for field in _REQUIRED_FIELDS if config.get(field) in (None, "")]
    if "custom_dataset" in config and "dataset_path" in missing:
        missing.remove("dataset_path")
    if not (config.get("test_split") or config.get("validation_split")):
        missing.append("test_split (or validation_split)")
    if config.get("output_type") == "multiple_choice" and config.get("doc_to_choice") in (None, ""):
        missing.append("doc_to_choice")
    if missing:
        raise InvalidArgument("--tasks", f"task {name!r} ({entry.yaml_path}) lacks {', '.join(missing)}", _TASK_FIELDS_HELP)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def evaluate_tasks(loaded, tasks: list[str], manager, limit: int | float | None = None, batch_size: int = 1) -> dict[str, dict]:
    """Run lm-eval ``tasks`` on ``loaded`` (a causal LM): {task: {metric: value, metric_stderr: value, "samples": n}}."""
    import lm_eval

    if not loaded.causal:
        raise InvalidArgument("--tasks", f"{loaded.source!r} is an encoder", "a causal language model (lm-eval scores next-token log-likelihoods)")
    model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, backend="causal", batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit)
    summary = {}
    for task, metrics in output["results"].items():
        row = {}
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name:
                continue  # "alias", "name", ...
            label = metric if filter_name == "none" else f"{metric} ({filter_name})"
            if label.endswith("_stderr") or _number(value) is not None:
                row[label] = _number(value)  # a stderr lm-eval could not compute ("N/A") becomes None
        samples = output.get("n-samples", {}).get(task, {})
        row["samples"] = samples.get("effective", samples.get("original"))
        summary[task] = row
    return summary


class LmshrinkLM(HFLM):
    """lm-eval model "lmshrink": ``--model_args pretrained=DIR`` loads a saved lmshrink directory (``device``, ``dtype``
    honoured; other arguments as lm-eval's "hf" model)."""

    def __init__(self, pretrained, device: str | None = None, dtype: str | torch.dtype | None = None, **kwargs):
        from lmshrink.hf_compat import as_transformers, parse_dtype
        from lmshrink.models import load_model

        loaded = load_model(pretrained)
        if not loaded.causal:
            raise InvalidArgument("pretrained", f"{str(pretrained)!r} is an encoder", "a saved causal language model")
        model = as_transformers(loaded)
        target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device=target, dtype=parse_dtype(dtype))
        kwargs.setdefault("tokenizer", loaded.tokenizer)
        kwargs.pop("backend", None)
        super().__init__(pretrained=model, backend="causal", **kwargs)


def main() -> None:
    """lm-eval's own command line, with the "lmshrink" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    # Run as a script, this file is a second copy of the module: register the class of the importable one, once.
    from lmshrink.lm_eval_model import main

    main()
else:
    register_model("lmshrink")(LmshrinkLM)
