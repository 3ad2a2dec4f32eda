"""The server's side of the wire contract (`proper_fed.federation.wire`): the messages it sends as Flower records, and
the bytes each one costs on the wire."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.serde import recorddict_to_proto

from proper_fed.artifacts.bundle import Bundle, bundle_to_records
from proper_fed.federation import wire


def payload_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content, as Flower puts it on the wire (before chunking)."""
    return recorddict_to_proto(content).ByteSize()


def array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def base_probe(base_hash: str, model_id: str) -> RecordDict:
    """query.base: does the device hold the base with this content hash?"""
    return RecordDict(
        {wire.BASE_PROBE: ConfigRecord({wire.PROBE_HASH: base_hash, wire.PROBE_MODEL: model_id})}
    )


def has_base(reply: Message) -> bool:
    """The device's answer to `base_probe` (an error reply: no)."""
    return reply.has_content() and bool(reply.content[wire.BASE_PROBE][wire.HAS_BASE])


def bundle_content(bundle: Bundle, run_info: Mapping[str, str | list[str]]) -> RecordDict:
    """train.user without the base: the signed bundle and the run's public facts (`wire.RUN_*`)."""
    arrays, config = bundle_to_records(bundle)
    return RecordDict(
        {
            wire.BUNDLE_ARRAYS: array_record(arrays),
            wire.BUNDLE_CONFIG: ConfigRecord(dict(config)),
            wire.RUN: ConfigRecord(dict(run_info)),
        }
    )


def base_content(state: Mapping[str, torch.Tensor], files: Mapping[str, bytes], base_hash: str) -> RecordDict:
    """The base weights (through the one tensor codec) and side files, for a device that lacks them."""
    arrays, dtypes = wire.encode_tensors(state)
    return RecordDict(
        {
            wire.BASE_ARRAYS: array_record(arrays),
            wire.BASE_FILES: ConfigRecord(dict(files)),
            wire.BASE_META: ConfigRecord({wire.META_HASH: base_hash, wire.META_DTYPES: dtypes}),
        }
    )


def with_base(shared: RecordDict, base: RecordDict | None) -> RecordDict:
    """One device's train.user content: the shared records, plus the base's when it lacks it."""
    content = RecordDict(dict(shared.items()))
    for k, v in (base or RecordDict()).items():
        content[k] = v
    return content


def make_message(content: RecordDict, node_id: int, kind: wire.MessageKind) -> Message:
    return Message(content=content, dst_node_id=node_id, message_type=kind.type, group_id=kind.name)
