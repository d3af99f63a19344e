"""The control channel (``nanovllm/parallel/control.py``) on two CPU ranks over gloo: calls arrive in the order
sent, payloads intact, and rank 0's ``send`` does not wait for a rank that is busy (it returns while rank 1 has
not posted a receive yet); ``flush`` waits until rank 1 took every call."""
import datetime
import json
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port

CALLS = [(0, 0, b""), (1, 7, b"x" * 100_000), (2, 3, b""), (0, 0, b""), (1, 0, b"\x00\x01")]
BUSY_S = 2.0


def rank_main(rank: int, port: int, out: str) -> None:
    from nanovllm.parallel import control
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", rank=rank, world_size=2, store=store)
    control.open_channel()
    if rank == 0:
        start = time.monotonic()
        for call in CALLS:
            control.send(*call)
        sent = time.monotonic() - start
        control.flush()
        result = {"sent_s": sent, "flushed_s": time.monotonic() - start}
    else:
        time.sleep(BUSY_S)  # busy with an earlier call: no receive posted
        result = {"calls": [[op, arg, payload.hex()] for op, arg, payload in (control.receive() for _ in CALLS)]}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    control.leave_group()


def test_calls_arrive_in_order_and_sending_does_not_wait_for_a_busy_rank(tmp_path):
    port = free_port()
    out = str(tmp_path / "result")
    mp.spawn(rank_main, args=(port, out), nprocs=2)
    with open(out + ".0") as f:
        zero = json.load(f)
    with open(out + ".1") as f:
        one = json.load(f)
    assert one["calls"] == [[op, arg, payload.hex()] for op, arg, payload in CALLS]
    assert zero["sent_s"] < BUSY_S / 2 <= BUSY_S * 0.9 <= zero["flushed_s"]
