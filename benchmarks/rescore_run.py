"""Re-score a finished seq-cls run's saved adapter on the whole test split, through PEFT.

    PYTHONPATH=src python benchmarks/rescore_run.py RUN_DIR [RUN_DIR ...]

For each run folder: its ``config.yaml`` rebuilds the data split and the base model (as the
recipe did), ``PeftModel.from_pretrained`` loads the exported ``adapter/`` on top (so this also
checks that the export loads in PEFT), and the test split is scored in one pass. Printed:
accuracy and macro-F1 of the whole split; for a federated run also the sample-weighted mean of
the clients' macro-F1 on their test shares (what federated runs recorded before the server
summed the shares' confusion matrices); and the run's own recorded final figures beside them.
Only adapters written in the clear can be read: a shielded or secure run's sealed adapter
cannot (its enclave alone holds the key).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from peft import PeftModel  # noqa: E402

from shieldtune.config import load_config  # noqa: E402
from shieldtune.data import accuracy, macro_f1  # noqa: E402
from shieldtune.federated.partition import client_shares  # noqa: E402
from shieldtune.recipes._common import prepare  # noqa: E402


@torch.no_grad()
def predictions(model: torch.nn.Module, test: dict[str, torch.Tensor], batch: int) -> list[int]:
    """Arg-max class of every test row, ``batch`` rows per forward."""
    inputs = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in test]
    preds: list[int] = []
    for i in range(0, int(test["labels"].shape[0]), batch):
        logits = model(**{k: test[k][i : i + batch] for k in inputs}).logits  # (B, C)
        preds += logits.argmax(-1).tolist()
    return preds


def rescore(run: Path, batch: int) -> dict[str, float]:
    adapter = run / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        raise SystemExit(f"{run}: no adapter/adapter_model.safetensors (sealed, or not kept)")
    cfg = load_config(run / "config.yaml")
    if cfg.model.task != "seq-cls":
        raise SystemExit(f"{run}: task {cfg.model.task!r}; only seq-cls runs are re-scored")
    prep = prepare(cfg)
    model = PeftModel.from_pretrained(prep.loaded.model, str(adapter)).eval()
    preds, labels = predictions(model, prep.test, batch), prep.test["labels"].tolist()
    k = prep.num_labels
    out = {"accuracy": accuracy(preds, labels), "macro_f1": macro_f1(preds, labels, k)}
    if cfg.mode.endswith("fedavg"):  # the clients' IID test shares, as the recipe cut them
        f = cfg.federated
        train = prep.train["labels"].tolist()
        shares = client_shares(
            train, len(train), len(labels), f.num_clients, f.partition, f.alpha, f.partition_seed
        )
        out["macro_f1_client_mean"] = sum(
            macro_f1([preds[r] for r in rows], [labels[r] for r in rows], k) * len(rows)
            for _, rows in shares
        ) / len(labels)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--batch", type=int, default=64, help="rows per forward")
    args = parser.parse_args()
    for run in args.runs:
        summary = json.loads((run / "summary.json").read_text())
        scores = rescore(run, args.batch)
        recorded = {k: summary[k] for k in ("accuracy", "macro_f1") if k in summary}
        print(f"{run.name}: rescored {json.dumps(scores)} · recorded {json.dumps(recorded)}")


if __name__ == "__main__":
    main()
