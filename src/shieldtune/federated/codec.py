"""Conversions between adapter tensors / sealed records and Flower records.

Flower carries adapter state dicts as an ``ArrayRecord`` (plain-fedavg) or, in secure-fedavg,
only opaque channel records: each one a 1-D ``uint8`` array in an ``ArrayRecord`` (keys
``r000``, ``r001``... in sending order), so the server host never sees a tensor name or value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from shieldtune.errors import ChannelError

__all__ = [
    "to_array_record",
    "from_array_record",
    "pack_records",
    "unpack_records",
    "message_nbytes",
]


def to_array_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An adapter state dict as a Flower ``ArrayRecord`` (float32 / int64 as they are)."""
    return ArrayRecord(
        {name: Array(t.detach().cpu().contiguous().numpy()) for name, t in state.items()}
    )


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A Flower ``ArrayRecord`` as a state dict of new tensors."""
    return {
        name: torch.from_numpy(np.array(arr.numpy(), copy=True)) for name, arr in record.items()
    }


def pack_records(records: Sequence[bytes | bytearray]) -> ArrayRecord:
    """Channel records, in order, as ``uint8`` arrays of an ``ArrayRecord``."""
    return ArrayRecord(
        {f"r{i:03d}": Array(np.frombuffer(bytes(r), dtype=np.uint8)) for i, r in enumerate(records)}
    )


def unpack_records(record: ArrayRecord) -> list[bytes]:
    """The channel records of :func:`pack_records`, in order.

    Raises:
        ChannelError: A key or dtype that :func:`pack_records` does not write.
    """
    out = []
    for i, key in enumerate(sorted(record.keys())):
        arr = record[key].numpy()
        if key != f"r{i:03d}" or arr.dtype != np.uint8 or arr.ndim != 1:
            raise ChannelError(f"sealed records: unexpected entry {key!r} ({arr.dtype})")
        out.append(arr.tobytes())
    return out


def message_nbytes(message: Message) -> int:
    """Payload bytes of a Flower message (arrays, metrics, configs); 0 for an error reply."""
    if not message.has_content():
        return 0
    content = message.content
    records = [*content.array_records.values(), *content.metric_records.values()]
    records.extend(content.config_records.values())
    return sum(r.count_bytes() for r in records)
