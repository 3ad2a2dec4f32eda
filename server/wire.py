"""Building the messages the server sends, and counting the bytes each one costs on the wire."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.serde import recorddict_to_proto

from proper_fed.bundle import Bundle, bundle_to_records, tensor_to_numpy


def payload_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content, as Flower puts it on the wire (before chunking)."""
    return recorddict_to_proto(content).ByteSize()


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def bundle_content(bundle: Bundle, extra: dict[str, str | int | float]) -> RecordDict:
    arrays, config = bundle_to_records(bundle)
    return RecordDict(
        {
            "bundle-arrays": array_record(arrays),
            "bundle-config": ConfigRecord(dict(config)),
            "run": ConfigRecord(dict(extra)),
        }
    )


def base_content(state: dict, files: dict[str, bytes], base_hash: str) -> RecordDict:
    """The base weights for a device that lacks them; dtypes numpy lacks travel as same-width int views."""
    arrays = {k: tensor_to_numpy(v) for k, v in state.items()}
    dtypes = ",".join(f"{k}={str(v.dtype).removeprefix('torch.')}" for k, v in state.items())
    return RecordDict(
        {
            "base-arrays": array_record(arrays),
            "base-files": ConfigRecord({k: v for k, v in files.items()}),
            "base-meta": ConfigRecord({"hash": base_hash, "dtypes": dtypes}),
        }
    )


def make_message(content: RecordDict, node_id: int, message_type: str, group: str) -> Message:
    return Message(content=content, dst_node_id=node_id, message_type=message_type, group_id=group)
