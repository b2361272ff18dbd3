"""Secure aggregation cost: medfed's SecAgg+ vs Flower's legacy SecAgg+ primitives vs plain FedAvg.

One run, same model (an MLP of ~1.6 M float32 parameters), same sites (10 by default),
same local training (SGD on random 28x28 images, unequal site sizes), in one process:

* ``plain``: each site trains and uploads its float32 state; the server takes FedAvg's
  weighted mean (Flower's ``aggregate_arrayrecords``).
* ``medfed``: the real ``client/secagg_mod.py`` and ``server/secagg.py`` (all four stages,
  X25519/HKDF/AES-GCM/Shamir, AES-CTR masks, uint32 vectors) over an in-process transport.
* ``flower``: Flower 1.41's legacy SecAgg+ masking path, rebuilt from its own primitives
  as in ``flwr/client/mod/secure_aggregation/secaggplus_mod.py::_collect_masked_vectors``
  and the server's unmasking (quantize, ``pseudo_rand_gen`` masks, int64 arrays,
  ``ndarray_to_bytes``): key agreement and Shamir are left out (they are cheap), so its
  time is a lower bound.

Writes ``bench/results/secagg.json`` with bytes uploaded per parameter and round time
relative to plain FedAvg (wall and process CPU time; sites run one after the other, as
one CPU would run them), all measured in this run.

Usage: ``.venv/bin/python bench/secagg.py [--sites 10] [--repeats 3] [--steps 16 64]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.secagg_mod import secagg_mod  # noqa: E402
from common.config import SecAggConfig  # noqa: E402
from server.secagg import SecAggRound  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "secagg.json"


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 784), nn.ReLU(),
        nn.Linear(784, 2),
    )  # fmt: skip


def train(arrays: ArrayRecord, node: int, *, steps: int) -> tuple[ArrayRecord, int]:
    """Local SGD: ``steps`` batches of 32 random images; returns (state, num-examples)."""
    model = make_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    g = torch.Generator().manual_seed(node)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n = 32 * steps
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    for i in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[32 * i : 32 * i + 32]), y[32 * i : 32 * i + 32])
        loss.backward()
        opt.step()
    return ArrayRecord({k: v.detach() for k, v in model.state_dict().items()}), n + node


def _metadata(node: int, message_type: str = MessageType.TRAIN) -> Metadata:
    return Metadata(
        run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=node,
        reply_to_message_id="", group_id="1", created_at=0.0, ttl=3600.0,
        message_type=message_type,
    )  # fmt: skip


class Clock:
    """Wall time and this process's CPU time (robust when other jobs load the machine)."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def plain_round(
    arrays: ArrayRecord, nodes: list[int], steps: int
) -> tuple[tuple[float, float], int]:
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    clock = Clock()
    replies, up = [], 0
    for node in nodes:
        trained, n = train(arrays, node, steps=steps)
        up += sum(len(a.data) for a in trained.values())
        replies.append(
            RecordDict({"arrays": trained, "metrics": MetricRecord({"num-examples": n})})
        )
    aggregate_arrayrecords(replies, "num-examples")
    return clock.read(), up


def medfed_round(
    arrays: ArrayRecord, nodes: list[int], steps: int
) -> tuple[tuple[float, float], int, int]:
    contexts = {
        n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
        for n in nodes
    }

    def handler(msg: Message, context: Context) -> Message:
        trained, n = train(msg.content.array_records["arrays"], context.node_id, steps=steps)
        return Message(
            RecordDict({"arrays": trained, "metrics": MetricRecord({"num-examples": n})}),
            reply_to=msg,
        )

    masked_bytes = 0

    def transport(stage: str, contents: dict[int, RecordDict]) -> dict[int, RecordDict | str]:
        nonlocal masked_bytes
        out: dict[int, RecordDict | str] = {}
        for node, content in contents.items():
            reply = secagg_mod(Message(content, metadata=_metadata(node)), contexts[node], handler)
            out[node] = reply.error.reason if reply.has_error() else reply.content
            if not reply.has_error():
                masked_bytes += sum(
                    len(a.data) for ar in reply.content.array_records.values() for a in ar.values()
                )
        return out

    clock = Clock()
    rnd = SecAggRound(
        params=SecAggConfig(), server_round=1, global_arrays=arrays, transport=transport
    )
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    result = rnd.run({n: content for n in nodes})
    seconds = clock.read()
    assert result.survivors == nodes
    return seconds, masked_bytes, sum(rnd.report.bytes_up.values())


def flower_round(
    arrays: ArrayRecord, nodes: list[int], steps: int
) -> tuple[tuple[float, float], int]:
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import generate_key_pairs

    # Flower's SecAggPlusWorkflow defaults
    clipping_range, target_range, mod_range, max_weight = 8.0, 2**22, 2**32, 1000.0
    clock = Clock()
    keys = {n: generate_key_pairs() for n in nodes}
    seeds = {n: np.random.default_rng(n).bytes(32) for n in nodes}
    total: list[np.ndarray] | None = None
    up = 0
    for node in nodes:
        trained, n = train(arrays, node, steps=steps)
        params = [a.numpy() for a in trained.values()]
        q_ratio = round(n / max_weight * target_range)
        params = parameters_multiply(params, q_ratio / target_range)
        q = factor_combine(q_ratio, quantize(params, clipping_range, target_range))
        dims = [a.shape for a in q]
        q = parameters_addition(q, pseudo_rand_gen(seeds[node], mod_range, dims))
        for other in nodes:
            if other == node:
                continue
            shared = generate_shared_key(keys[node][0], keys[other][1])
            mask = pseudo_rand_gen(shared, mod_range, dims)
            q = (parameters_addition if node > other else parameters_subtraction)(q, mask)
        q = parameters_mod(q, mod_range)
        up += sum(len(ndarray_to_bytes(a)) for a in q)
        total = q if total is None else parameters_addition(total, q)
    assert total is not None
    for node in nodes:  # server removes every survivor's private mask
        dims = [a.shape for a in total]
        total = parameters_subtraction(total, pseudo_rand_gen(seeds[node], mod_range, dims))
    total = parameters_mod(total, mod_range)
    dequantize(total[1:], clipping_range, target_range)
    return clock.read(), up


def measure(
    arrays: ArrayRecord, nodes: list[int], *, steps: int, repeats: int
) -> dict[str, object]:
    """Median round wall and CPU time of the three methods at one local workload."""
    wall: dict[str, list[float]] = {"plain": [], "medfed": [], "flower": []}
    cpu: dict[str, list[float]] = {"plain": [], "medfed": [], "flower": []}
    for _ in range(repeats):  # interleaved, so machine-load drift hits all three alike
        for name, fn in (
            ("plain", plain_round),
            ("medfed", medfed_round),
            ("flower", flower_round),
        ):
            w, c = fn(arrays, nodes, steps)[0]
            wall[name].append(w)
            cpu[name].append(c)
    out: dict[str, object] = {
        "local_sgd_batches_per_site": steps,
        "local_examples_per_site": 32 * steps,
    }
    for label, times in (("wall", wall), ("cpu", cpu)):
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"round_{label}_seconds_median"] = med
        out[f"protocol_overhead_{label}_seconds_per_site"] = (med["medfed"] - med["plain"]) / len(
            nodes
        )
        out[f"round_{label}_time_vs_plain"] = {
            "medfed": med["medfed"] / med["plain"],
            "flower_legacy": med["flower"] / med["plain"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[16, 64],
        help="local SGD batches (of 32) per site; one measurement per value",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = make_model()
    arrays = ArrayRecord({k: v.detach() for k, v in model.state_dict().items()})
    n_params = sum(int(np.prod(a.shape)) for a in arrays.values())
    nodes = [1000 + i for i in range(args.sites)]

    # warm-up (torch kernels, imports, page cache), not timed; also the byte counts
    _, plain_up = plain_round(arrays, nodes, 1)
    _, medfed_masked, medfed_total = medfed_round(arrays, nodes, 1)
    _, flower_up = flower_round(arrays, nodes, 1)
    per_param = args.sites * n_params
    workloads = [measure(arrays, nodes, steps=s, repeats=args.repeats) for s in args.steps]
    result = {
        "name": "secagg",
        "setup": {
            "sites": args.sites,
            "parameters": n_params,
            "model": "MLP 784-1000-784-2, float32",
            "repeats": args.repeats,
            "torch_threads": 1,
            "in_process": True,
            "sites_run": "sequentially in one process (a deployment runs them in parallel)",
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()),
        },
        "bytes_per_parameter_up": {
            "plain_float32": plain_up / per_param,
            "medfed_masked_vector": medfed_masked / per_param,
            "medfed_all_stages": medfed_total / per_param,
            "flower_legacy_masked_vector": flower_up / per_param,
        },
        "workloads": workloads,
        "note": (
            "this machine is shared (see load_average): process CPU time is the reliable "
            "figure; wall time includes waiting for other jobs"
        ),
        "targets": {"medfed_bytes_per_parameter": 4.2, "medfed_round_time_vs_plain": 1.25},
    }
    result["setup"]["load_average_at_end"] = list(os.getloadavg())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
