"""Weight sync by process-group broadcast (`rollout.weight_sync: broadcast`), for engines that live
in other processes (Ray actors).

Train rank 0 and every rollout engine form one stateless gloo group (NCCL on GPU is the same
shape) outside torch's global state, so it coexists with the trainer's DeepSpeed group and the
engine's own. Rank 0 is the sender; engine i is rank i + 1. Each sync sends, bucket by bucket,
a header (names, dtypes, shapes, byte counts; pickled) and the bucket's tensors packed into one
contiguous byte buffer, then an empty header to end. The engine brackets the whole sync with
`begin_weight_update` / `finish_weight_update`, so vLLM reloads once and re-ties tied embeddings.
Each engine reports the weight version (the step) it now serves; the controller checks it.
"""
from __future__ import annotations

import pickle
import socket
from datetime import timedelta
from typing import Any, Iterable, Iterator

import torch

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def stateless_gloo_group(host: str, port: int, rank: int, world: int, timeout_s: float) -> Any:
    """A gloo process group of its own, rendezvousing through a TCPStore that rank 0 hosts."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore("llmrl-weights", store), rank, world, timeout)


def _broadcast(group: Any, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def _send_blob(group: Any, payload: torch.Tensor) -> None:
    _broadcast(group, torch.tensor([payload.numel()], dtype=torch.int64))
    if payload.numel():
        _broadcast(group, payload)


def _receive_blob(group: Any) -> torch.Tensor:
    size = torch.zeros(1, dtype=torch.int64)
    _broadcast(group, size)
    payload = torch.empty(int(size), dtype=torch.uint8)
    if payload.numel():
        _broadcast(group, payload)
    return payload


def send_buckets(group: Any, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> int:
    """Rank 0's side: every bucket, then the end marker. Returns the bytes of weights sent."""
    sent = 0
    for bucket in buckets:
        sent += _send_bucket(group, bucket)
        # Under ZeRO-3 the tensors are views of a gathered bucket: holding them while the next one
        # is gathered would keep two gathered buckets alive at once.
        del bucket
    _send_blob(group, torch.empty(0, dtype=torch.uint8))  # an empty header ends the sync
    return sent


def _send_bucket(group: Any, bucket: list[tuple[str, torch.Tensor]]) -> int:
    flat = [t.detach().contiguous().cpu().reshape(-1).view(torch.uint8) for _, t in bucket]
    header = [(name, str(t.dtype), tuple(t.shape), f.numel()) for (name, t), f in zip(bucket, flat)]
    _send_blob(group, torch.frombuffer(bytearray(pickle.dumps(header)), dtype=torch.uint8))
    # A lone tensor goes as it is: packing would copy it, and the largest bucket (the embedding,
    # alone in its bucket) would then cost twice its size on top of the sender's weights.
    payload = flat[0] if len(flat) == 1 else torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)
    _send_blob(group, payload)
    return sum(f.numel() for f in flat)


def receive_buckets(group: Any) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """An engine's side: the buckets as (name, tensor) lists, until the end marker."""
    while True:
        header_bytes = _receive_blob(group)
        if not header_bytes.numel():
            return
        header = pickle.loads(header_bytes.numpy().tobytes())
        payload = _receive_blob(group)
        bucket, offset = [], 0
        for name, dtype, shape, nbytes in header:
            bucket.append((name, payload[offset : offset + nbytes].view(_DTYPES[dtype]).reshape(shape)))
            offset += nbytes
        yield bucket
