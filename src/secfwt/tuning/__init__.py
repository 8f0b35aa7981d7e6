"""Forward-only prompt tuning (BBT, Sun et al. 2022; SecFwT/SecP-Tuning, arXiv 2506.15307).

Typical use (plaintext; an MPC client implementing :class:`Evaluator` plugs in the same way)::

    from secfwt.tuning import HFPlainEvaluator, TuneConfig, get_task, load_task_data, tune

    task = get_task("sst2")                                   # or a path to a .toml task file
    data = load_task_data(task, root=None, k=16, seed=13)     # root: --data-root / $SECFWT_DATA / ../shared/data
    ev = HFPlainEvaluator.from_pretrained(model_dir, task)
    result = tune(ev, data, TuneConfig(n_prompt=50, popsize=20, budget_calls=8000), checkpoint_dir="ckpt")
    write_report(result, "report.json"); plot_history(result.history, "history.png"); print_summary(result)
"""

from secfwt.tuning.data import Example, TaskData, data_root, load_task_data, sample_k_shot
from secfwt.tuning.fot import IterRecord, Projection, TuneConfig, TuneResult, tune
from secfwt.tuning.objective import (
    Batch,
    EvalCost,
    Evaluator,
    HFPlainEvaluator,
    accuracy,
    cross_entropy,
    hinge,
)
from secfwt.tuning.report import plot_history, print_summary, report_dict, write_report
from secfwt.tuning.tasks import BUILTIN_TASKS, TaskSpec, get_task, load_task_file

__all__ = [
    "BUILTIN_TASKS", "Batch", "EvalCost", "Evaluator", "Example", "HFPlainEvaluator", "IterRecord", "Projection",
    "TaskData", "TaskSpec", "TuneConfig", "TuneResult", "accuracy", "cross_entropy", "data_root", "get_task",
    "hinge", "load_task_data", "load_task_file", "plot_history", "print_summary", "report_dict",
    "sample_k_shot", "tune", "write_report",
]
