"""DP-SGD overhead per registered model: step time and peak memory, DP / non-DP.

Step times are measured interleaved in one process (blocks of non-DP and DP steps
alternate, so machine load affects both alike); the ratio is of medians. Peak memory:
on CUDA, ``torch.cuda.max_memory_allocated`` per phase; on CPU, the peak resident-set
growth of a fresh (spawned) child from the built model over the same steps, sampled
every millisecond from ``/proc/self/statm``, since the CPU allocator keeps no
per-phase peak.

Both phases run with the allocator settings training uses
(``common.host_memory.keep_training_buffers_in_heap``, called by ``train_epochs``);
without them glibc unmaps DP-SGD's per-step buffers and the DP step time turns bimodal.

Writes ``bench/results/dp_overhead.json`` (on a GPU: ``dp_overhead_cuda.json``).
Targets on CPU: CNN step-time ratio <= 2.0 (issue 4); U-Net <= 2.5 and GRU <= 4.0
(issue 7). Segmentation models train on random masks with their task's loss
(Dice + CE); the GRU/LSTM non-DP baseline is the same model built with
``torch.nn.GRU`` / ``LSTM`` (``dp_layers=False``), the DP run uses Opacus's
``DPGRU`` / ``DPLSTM``.

Usage: python bench/dp_overhead.py [--batch-size 32] [--blocks 10] [--steps 5] [--models cnn ...]
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
import warnings
from pathlib import Path

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from common.host_memory import keep_training_buffers_in_heap
from common.models import get_model, get_spec, list_models
from common.tasks import get_task, list_tasks

OUT = Path(__file__).parent / "results" / "dp_overhead.json"


def _plain_kwargs(name: str) -> dict:
    """Non-DP baseline: models with Opacus DP layers (GRU/LSTM) use torch's own layers."""
    accepts = inspect.signature(get_spec(name).factory).parameters
    return {"dp_layers": False} if "dp_layers" in accepts else {}


def _criterion(name: str) -> torch.nn.Module:
    """The task's training loss (DiceCE for segmentation), cross-entropy otherwise."""
    task = get_spec(name).task
    return get_task(task).make_loss() if task in list_tasks() else torch.nn.CrossEntropyLoss()


def _setup(name: str, *, dp: bool, batch_size: int, device: torch.device):
    torch.manual_seed(0)
    spec = get_spec(name)
    model = get_model(name, **({} if dp else _plain_kwargs(name))).to(device)
    n = batch_size * 8
    x = torch.rand((n, *spec.input_shape))
    # Segmentation models get (n, H, W) masks, classifiers (n,) labels.
    y_shape = (n, *spec.input_shape[1:]) if spec.task == "segmentation" else (n,)
    y = torch.randint(0, 2, y_shape)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if dp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, opt, loader = PrivacyEngine(accountant="rdp").make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=False,
                grad_sample_mode="hooks",
            )
    return model, opt, loader


def _steps(model, opt, loader, k: int, device: torch.device, crit) -> list[float]:
    times = []
    it = iter(loader)
    for _ in range(k):
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        xb, yb = xb.to(device), yb.to(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        crit(model(xb), yb).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def _rss_mib() -> float:
    with Path("/proc/self/statm").open() as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _child_peak(name, dp, batch_size, steps, conn):
    """Peak RSS growth (MiB) from the built model through the first ``steps`` steps.

    Sampled every millisecond. The baseline is taken before the first step, so the
    gradients, per-sample gradients and temporaries every step needs are counted (the
    allocator keeps freed buffers in the heap, so later steps reuse the first step's).
    """
    import threading

    warnings.simplefilter("ignore")
    keep_training_buffers_in_heap()
    model, opt, loader = _setup(name, dp=dp, batch_size=batch_size, device=torch.device("cpu"))
    crit = _criterion(name)
    base, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    _steps(model, opt, loader, steps, torch.device("cpu"), crit)
    done.set()
    t.join()
    conn.send(max(peak[0] - base, 0.0))
    conn.close()


def _cpu_peak_mib(name: str, dp: bool, batch_size: int, steps: int) -> float:
    ctx = mp.get_context("spawn")  # fork after torch threads start can deadlock
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child_peak, args=(name, dp, batch_size, steps, child))
    p.start()
    value = parent.recv()
    p.join()
    return float(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument(
        "--models",
        nargs="*",
        default=None,
        help="subset of registered models; their results are merged into the existing JSON",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON to write (default bench/results/dp_overhead.json on CPU, "
        "bench/results/dp_overhead_cuda.json on CUDA)",
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: Path = args.out or (
        OUT if device.type == "cpu" else OUT.with_name("dp_overhead_cuda.json")
    )
    warnings.simplefilter("ignore")
    allocator_tuned = keep_training_buffers_in_heap()
    results = {}
    if args.models and out.exists():
        results = json.loads(out.read_text()).get("models", {})
    for name in args.models or list_models():
        plain = _setup(name, dp=False, batch_size=args.batch_size, device=device)
        private = _setup(name, dp=True, batch_size=args.batch_size, device=device)
        crit = _criterion(name)
        _steps(*plain, 2, device, crit)  # warm-up
        _steps(*private, 2, device, crit)
        t_plain: list[float] = []
        t_dp: list[float] = []
        mem = {}
        for _ in range(args.blocks):  # interleaved blocks
            t_plain += _steps(*plain, args.steps, device, crit)
            t_dp += _steps(*private, args.steps, device, crit)
        if device.type == "cuda":
            for label, objs in (("plain", plain), ("dp", private)):
                torch.cuda.reset_peak_memory_stats()
                _steps(*objs, args.steps, device, crit)
                mem[label] = torch.cuda.max_memory_allocated() / 2**20
        else:
            mem = {
                "plain": _cpu_peak_mib(name, False, args.batch_size, args.steps),
                "dp": _cpu_peak_mib(name, True, args.batch_size, args.steps),
            }
        results[name] = {
            "step_seconds_plain_median": statistics.median(t_plain),
            "step_seconds_dp_median": statistics.median(t_dp),
            "step_time_ratio_dp_over_plain": statistics.median(t_dp) / statistics.median(t_plain),
            "peak_memory_mib_plain": mem["plain"],
            "peak_memory_mib_dp": mem["dp"],
            "peak_memory_ratio_dp_over_plain": mem["dp"] / max(mem["plain"], 1e-9),
            "memory_method": "cuda.max_memory_allocated"
            if device.type == "cuda"
            else "spawned child RSS growth from the built model over the steps (1 ms sampling)",
        }
        print(name, json.dumps(results[name], indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "dp_overhead",
                "device": str(device),
                "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
                "batch_size": args.batch_size,
                "grad_sample_mode": "hooks",
                "glibc_allocator_tuned": allocator_tuned,
                "models": results,
                "targets": {
                    "cnn_step_time_ratio_max_cpu": 2.0,
                    "unet_step_time_ratio_max_cpu": 2.5,
                    "gru_step_time_ratio_max_cpu": 4.0,
                },
                "baselines": {
                    n: "torch.nn layers (dp_layers=False)"
                    for n in list_models()
                    if _plain_kwargs(n)
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
