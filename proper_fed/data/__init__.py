"""LaMP-style personalization data: loaders, tasks, examples, metrics and their statistics, scoring protocols,
federation splits, synthetic data, baselines."""

from proper_fed.data.baselines import majority_predictions, user_majority_predictions
from proper_fed.data.inspect import DatasetStats, inspect_dataset
from proper_fed.data.lamp import load_lamp
from proper_fed.data.loader import load_dataset
from proper_fed.data.metrics import (
    classification_metrics,
    cohort_metrics,
    evaluate_predictions,
    history_cohorts,
    per_user_metrics,
    rating_metrics,
    rouge_metrics,
)
from proper_fed.data.oppu import load_oppu
from proper_fed.data.splits import (
    FederationSplit,
    device_eval_examples,
    device_training_examples,
    server_training_examples,
    server_validation_examples,
    split_federation,
    subset_dataset,
)
from proper_fed.data.synthetic import SyntheticConfig, SyntheticData, generate_synthetic, write_synthetic
from proper_fed.data.task_spec import TaskSpec, load_task_spec
from proper_fed.data.tasks import builtin_tasks, find_task, get_task, register_task
from proper_fed.data.types import Dataset, ProfileItem, Query, User

__all__ = [
    "Dataset",
    "DatasetStats",
    "FederationSplit",
    "ProfileItem",
    "Query",
    "SyntheticConfig",
    "SyntheticData",
    "TaskSpec",
    "User",
    "builtin_tasks",
    "classification_metrics",
    "cohort_metrics",
    "device_eval_examples",
    "device_training_examples",
    "evaluate_predictions",
    "find_task",
    "generate_synthetic",
    "get_task",
    "history_cohorts",
    "inspect_dataset",
    "load_dataset",
    "load_lamp",
    "load_oppu",
    "load_task_spec",
    "majority_predictions",
    "per_user_metrics",
    "rating_metrics",
    "register_task",
    "rouge_metrics",
    "server_training_examples",
    "server_validation_examples",
    "split_federation",
    "subset_dataset",
    "user_majority_predictions",
    "write_synthetic",
]
