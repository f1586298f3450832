"""Datasets, splits, client partitions, task encodings and metrics.

- :mod:`~shieldtune.data.tables`: the :class:`Dataset` type and :func:`load_table` (CSV, JSONL,
  JSON with column mapping).
- :mod:`~shieldtune.data.builtin`: the medical sets in ``../shared/data`` and the generated
  ``medical_sample`` (:func:`load_builtin`).
- :mod:`~shieldtune.data.splits`: seeded train/test splits, IID and Dirichlet partitions.
- :mod:`~shieldtune.data.tasks`: tokenization for classification and instruction tuning.
- :mod:`~shieldtune.data.metrics`: accuracy, macro-F1, perplexity.
"""

from shieldtune.data.builtin import (
    BUILTIN_DATASETS,
    DATA_DIR_ENV,
    MEDICAL_CONDITIONS,
    BuiltinInfo,
    builtin_info,
    default_data_dirs,
    generate_medical_sample,
    load_builtin,
    resolve_data_dir,
)
from shieldtune.data.metrics import (
    accuracy,
    confusion_matrix,
    macro_f1,
    macro_f1_from_confusion,
    perplexity,
)
from shieldtune.data.splits import (
    partition_dirichlet,
    partition_iid,
    subset,
    train_test_indices,
    train_test_split,
)
from shieldtune.data.tables import Dataset, Example, TableFormat, load_table
from shieldtune.data.tasks import (
    ANSWER_PROMPTS,
    DEFAULT_TASK_PROMPT,
    IGNORE_INDEX,
    PAIR_SEPARATOR,
    answer_token_ids,
    batches,
    encode_classification,
    encode_instruction,
    encode_prompt,
    ensure_pad_token,
    format_instruction,
    instruction_prompts,
    render_prompt,
    task_prompt_for,
)

__all__ = [
    "ANSWER_PROMPTS",
    "BUILTIN_DATASETS",
    "DATA_DIR_ENV",
    "DEFAULT_TASK_PROMPT",
    "IGNORE_INDEX",
    "MEDICAL_CONDITIONS",
    "PAIR_SEPARATOR",
    "BuiltinInfo",
    "Dataset",
    "Example",
    "TableFormat",
    "accuracy",
    "answer_token_ids",
    "batches",
    "builtin_info",
    "confusion_matrix",
    "default_data_dirs",
    "encode_classification",
    "encode_instruction",
    "encode_prompt",
    "ensure_pad_token",
    "format_instruction",
    "instruction_prompts",
    "generate_medical_sample",
    "load_builtin",
    "load_table",
    "macro_f1",
    "macro_f1_from_confusion",
    "partition_dirichlet",
    "partition_iid",
    "perplexity",
    "render_prompt",
    "resolve_data_dir",
    "subset",
    "task_prompt_for",
    "train_test_indices",
    "train_test_split",
]
