"""lm-evaluation-harness on dynamoq models, with no hub: multiple-choice tasks made from the built-in
corpora (or any documents) and written as local task folders, evaluated through lm_eval's Hugging Face
model class (HFLM) on a model object.

    from dynamoq import lmeval
    names = lmeval.write_tasks("tasks/")                      # tasks/dynamoq_<domain>.{jsonl,yaml}
    results = lmeval.evaluate(model, tokenizer, "tasks/")     # {task: {"acc,none": ..., ...}}

A task folder is plain lm_eval: `lm_eval --include_path tasks/ --tasks dynamoq ...` reads it too
(but lm_eval's own command line loads the model without importing dynamoq; for a quantized
checkpoint use `python -m dynamoq.lmeval CHECKPOINT tasks/`, which does).

Each task is a continuation task (`dynamoq.eval.continuation_task`): the start of a document of
the domain's test split and n choices, one its true continuation, the others passages of other
documents; the model picks the choice it gives the highest log-likelihood (acc) or the highest per
byte (acc_norm). A `dynamoq_domains` task asks which passage comes from the context's domain.

Needs the `lmeval` extra: pip install "dynamoq[lmeval]".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

TAG = "dynamoq"
METRICS = ("acc", "acc_norm")


def _yaml(task: str, data_file: Path) -> str:
    # JSON is valid YAML: no YAML writer needed, and the jinja templates stay verbatim.
    config = {
        "task": task,
        "tag": [TAG],
        "dataset_path": "json",                                   # datasets' built-in JSON-lines reader
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())},
                           "cache_dir": str(data_file.resolve().parent / ".cache")},  # datasets' cache, kept beside
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",                                   # continuations start with their own whitespace
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
        "metadata": {"version": 1.0},
    }
    return json.dumps(config, indent=1, ensure_ascii=False) + "\n"


def _write(out: Path, task: str, items) -> None:
    data = out / f"{task}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"context": it.context, "choices": list(it.choices), "answer": int(it.answer_index)},
                               ensure_ascii=False) + "\n")
    (out / f"{task}.yaml").write_text(_yaml(task, data), encoding="utf-8")


def write_tasks(out_dir, domains=None, split: str = "test", n_items: int = 100, n_choices: int = 4,
                context_chars: int = 400, continuation_chars: int = 100, domain_task: bool = True,
                docs: dict | None = None, seed: int = 0) -> list[str]:
    """Write one continuation task per domain (and, with domain_task and two domains or more, a
    `dynamoq_domains` task) into out_dir as `<task>.jsonl` + `<task>.yaml`; return the task names.

    domains: built-in domain names (default: all of dynamoq.data.domains()), read from `split`;
    docs: {name: list of documents} of your own instead. Same arguments, same items."""
    from . import data
    from . import eval as ev

    if docs is None:
        names = list(domains) if domains is not None else data.domains()
        docs = {d: data.load(d, split) for d in names}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for name, texts in docs.items():
        task = f"{TAG}_{name}"
        _write(out, task, ev.continuation_task(texts, n_items=n_items, n_choices=n_choices, seed=seed,
                                                context_chars=context_chars, continuation_chars=continuation_chars))
        tasks.append(task)
    if domain_task and len(docs) >= 2:
        task = f"{TAG}_domains"
        _write(out, task, ev.domain_task(docs, n_items=n_items, n_choices=min(n_choices, len(docs)), seed=seed,
                                         context_chars=context_chars, continuation_chars=continuation_chars))
        tasks.append(task)
    return tasks


def tasks_in(task_dir) -> list[str]:
    """Names of the tasks written in a folder."""
    return sorted(p.stem for p in Path(task_dir).glob(f"{TAG}_*.yaml"))


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ImportError('dynamoq.lmeval needs lm-evaluation-harness: pip install "dynamoq[lmeval]"') from e
    return lm_eval


def evaluate(model, tokenizer, task_dir, tasks=None, limit: int | float | None = None, batch_size: int = 8,
             num_fewshot: int | None = None, log_samples: bool = False, **kwargs) -> dict:
    """Evaluate a model object (quantized or not) with lm_eval's HFLM on the tasks of task_dir
    (default: all of them); returns lm_eval's whole result dict: result["results"][task]["acc,none"], ...
    Extra keyword arguments go to lm_eval.simple_evaluate."""
    _import_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = list(tasks) if tasks is not None else tasks_in(task_dir)
    if not tasks:
        raise ValueError(f"{task_dir} holds no dynamoq task; write some with dynamoq.lmeval.write_tasks")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                           log_samples=log_samples, bootstrap_iters=kwargs.pop("bootstrap_iters", 1000), **kwargs)


def table(result: dict) -> str:
    """lm_eval's Markdown table of a result."""
    from lm_eval.utils import make_table
    return make_table(result)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynamoq.lmeval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a checkpoint folder (dynamoq-quantized or not) or a hub id")
    p.add_argument("task_dir", help="task folder; written first if it holds no dynamoq task")
    p.add_argument("--tasks", nargs="*", default=None, help="task names (default: every task in the folder)")
    p.add_argument("--domains", nargs="*", default=None, help="domains to write tasks for (default: all)")
    p.add_argument("--items", type=int, default=100, help="items per task when writing tasks")
    p.add_argument("--limit", type=float, default=None, help="items per task to evaluate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    import torch
    import transformers

    import dynamoq  # noqa: F401  (registers quant_method "dynamoq" with transformers)
    if not tasks_in(args.task_dir):
        write_tasks(args.task_dir, args.domains, n_items=args.items)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    result = evaluate(model, tok, args.task_dir, args.tasks, limit=limit, batch_size=args.batch_size)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result["results"], indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.exit(main())
